//! Recording: requests grouped into pushes and pulls, their upload phases, and the timeline
//! that gives every instant of a transfer to exactly one party.

mod attempts;
mod attribution;
mod claims;
mod manifests;
mod model;
mod phases;
mod publish;
mod results;
mod routing;
mod session;
mod split;
#[cfg(test)]
mod tests;
mod timeline;
mod tracker;

pub use attempts::{Attempt, AttemptOutcome, Lost};
pub(crate) use model::image_name;
pub use model::{Blob, BlobOutcome, LiveTransfer, Transfer};
pub(crate) use phases::upload_pieces;
pub use phases::UploadPhases;

pub use split::Split;
pub use timeline::{BodyView, RequestView};
pub(crate) use tracker::{spawn_sweeper, Tracker, TrackerConfig};

/// The tracker's maps are looked up several times per request under its lock, so they hash with
/// foldhash rather than SipHash. Its seeds are random per process and per map, so colliding
/// repository names cannot be worked out ahead of time; and every table is capped anyway.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
