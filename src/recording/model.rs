//! What regscope says about a push or pull: the JSON the API serves and the report reads.

use serde::{Deserialize, Serialize};

use super::attempts::{Attempt, Lost};
use super::phases::{UploadOutcome, UploadPhases};
use super::split::Split;
use super::timeline::RequestView;
use crate::body::LiveExchange;
use crate::protocol::{Api, BlobKind, Outcome, TransferDirection};
use crate::traces::TraceId;

/// How one blob (v1: one image) of a transfer fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobOutcome {
    Committed,
    Mounted,
    Cancelled,
    Failed,
    Abandoned,
    Fetched,
    /// Named by the manifest but not moved by this transfer: the client had it (pull), the
    /// registry had it (push), or a concurrent transfer moved it.
    Present,
}

impl BlobOutcome {
    /// Its name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobOutcome::Committed => "committed",
            BlobOutcome::Mounted => "mounted",
            BlobOutcome::Cancelled => "cancelled",
            BlobOutcome::Failed => "failed",
            BlobOutcome::Abandoned => "abandoned",
            BlobOutcome::Fetched => "fetched",
            BlobOutcome::Present => "present",
        }
    }
}

impl From<UploadOutcome> for BlobOutcome {
    fn from(o: UploadOutcome) -> Self {
        match o {
            UploadOutcome::Committed => BlobOutcome::Committed,
            UploadOutcome::Mounted => BlobOutcome::Mounted,
            UploadOutcome::Cancelled => BlobOutcome::Cancelled,
            UploadOutcome::Failed => BlobOutcome::Failed,
            UploadOutcome::Abandoned => BlobOutcome::Abandoned,
        }
    }
}

/// One blob of a transfer (v1: one image, its json and layer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Blob {
    /// The blob digest (v2) or image id (v1), when known.
    pub digest: Option<String>,
    pub kind: Option<BlobKind>,
    /// Bytes that crossed the proxy for it.
    pub bytes: u64,
    /// The size the manifest declares, when one was seen.
    pub declared_size: Option<u64>,
    /// Its 1-based position among the manifest's layers, when a manifest was seen.
    #[serde(default)]
    pub layer: Option<usize>,
    pub outcome: BlobOutcome,
    /// First request in, last response out, as offsets from the transfer's start.
    pub start: f64,
    pub end: f64,
    /// Push: the upload's phases. Pull: `None`.
    pub phases: Option<UploadPhases>,
    /// Pull: the v1 image json fetch before the layer, in seconds.
    pub metadata_seconds: f64,
    /// Push: the transfer phase's split. Pull: the fetch's split.
    pub split: Split,
    /// The ids of the requests that moved it (see `Transfer::requests`).
    #[serde(default)]
    pub requests: Vec<u64>,
    /// Its tries, in order: every upload or download of it, failed ones with who ended them.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
}

/// A finished push or pull.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    pub id: u64,
    pub direction: TransferDirection,
    pub outcome: Outcome,
    pub api: Api,
    pub repository: String,
    pub tag: Option<String>,
    pub client: String,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The same instant in nanoseconds: the origin of every offset, and of the trace's times.
    #[serde(default)]
    pub started_unix_ns: u64,
    /// The trace it was exported as, when traces are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
    pub wall_seconds: f64,
    /// Every instant of the wall time attributed to exactly one party (see `attribution`), except
    /// what failures cost: that is in `lost`, and the two add up to the wall time.
    pub parties: Split,
    /// Seconds lost to failed attempts and the client's waits after them, by who failed.
    #[serde(default)]
    pub lost: Lost,
    /// Bytes moved by attempts that failed.
    #[serde(default)]
    pub wasted_bytes: u64,
    /// Body bytes in the transfer's direction.
    pub bytes: u64,
    pub blobs: Vec<Blob>,
    pub requests: Vec<RequestView>,
    /// Requests beyond the per-transfer cap: counted, not kept.
    pub requests_dropped: u64,
}

/// A push or pull still going on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveTransfer {
    pub direction: TransferDirection,
    pub api: Api,
    pub repository: String,
    pub tag: Option<String>,
    pub client: String,
    /// Seconds since its first request.
    pub elapsed: f64,
    pub requests_done: u64,
    /// Body bytes of finished requests, in the transfer's direction.
    pub bytes_done: u64,
    /// Finished requests that failed (an error status, or cut off) so far.
    #[serde(default)]
    pub failed_requests: u64,
    pub in_flight: Vec<LiveExchange>,
}

impl Transfer {
    /// `repository:tag`, or the repository alone when no tag was seen.
    pub fn image(&self) -> String {
        image_name(&self.repository, self.tag.as_deref())
    }
}

/// `repository:tag`, or the repository alone.
pub(crate) fn image_name(repository: &str, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("{repository}:{tag}"),
        None => repository.to_owned(),
    }
}
