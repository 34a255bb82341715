//! The registry protocol, pure: what a request is, what a manifest names, and the vocabulary
//! every other layer speaks. Nothing here knows a socket or a clock.

mod manifest;
mod route;
mod vocabulary;

pub use manifest::BlobKind;
pub(crate) use manifest::{parse_ancestry, BlobRef, ManifestRefs, ParsedManifests, CAPTURE_LIMIT};
pub(crate) use route::query_param;
pub use route::{classify, is_repository_name, percent_decode, Route};
pub use vocabulary::{
    Api, BodyEnd, Culprit, Direction, FailureCause, Operation, Outcome, Party, Phase, Redirected, Side, SpanDrop,
    TransferDirection, UpstreamErrorKind,
};
