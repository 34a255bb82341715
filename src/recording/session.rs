//! One transfer in progress, and the rules that say when it is over.
//!
//! A push ends with its manifest `PUT` by tag (v1: the repository images `PUT`). A pull is
//! anchored on the manifests it resolved (v1: the ancestry) and ends when every blob they name
//! has been fetched, or, since clients fetch only the blobs they lack, when its manifest was
//! resolved and nothing more came for the settle time (the tracker's sweep decides that). A
//! manifest is resolved by a `GET`, or by a `HEAD` that names a digest: what that manifest names
//! comes from the manifests regscope has seen before. Anything else ends when the tracker closes
//! it as idle.

use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::manifests::{manifest_digest, KnownManifests};
use super::model::LiveTransfer;
use super::{HashMap, HashSet};
use crate::body::{Exchange, ExchangeRecord, LiveExchange};
use crate::protocol::{Api, BlobRef, ManifestRefs, Operation, Outcome, TransferDirection};
use crate::traces::TraceId;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) client: IpAddr,
    pub(crate) repository: Arc<str>,
    pub(crate) direction: TransferDirection,
}

/// An image's transfer in progress: a session a manifest opened, with the requests it claimed.
pub(crate) struct Image {
    pub(crate) key: Key,
    pub(crate) session: Session,
    /// Manifests that belong to it by digest: its own, and the platform manifests its index names.
    pub(crate) manifests: Vec<Box<str>>,
    /// Names it in the tracker's in-flight table while requests of it are on the wire.
    pub(crate) slot: u64,
}

/// Manifests an image answers to: an index and its platforms, far more than any index lists.
const MAX_IMAGE_MANIFESTS: usize = 128;

impl Image {
    /// The platform manifests an index of this image names belong to it too.
    pub(crate) fn adopt_manifests(&mut self, children: &[String]) {
        for child in children {
            if self.manifests.len() < MAX_IMAGE_MANIFESTS && !self.manifests.iter().any(|m| **m == **child) {
                self.manifests.push(child.as_str().into());
            }
        }
    }

    /// Whether a request for the manifest `reference` (a tag or a digest), answered with
    /// `digest` if the registry said one, belongs to this image.
    pub(crate) fn answers_to(&self, reference: &str, digest: Option<&str>) -> bool {
        if reference.contains(':') {
            return self.manifests.iter().any(|m| &**m == reference);
        }
        self.session.tag.as_deref() == Some(reference)
            && digest.is_none_or(|d| self.manifests.first().is_none_or(|m| &**m == d))
    }

    /// How much this image wants a fetch of the blob `digest`.
    pub(crate) fn wants_blob(&self, digest: &str) -> Want {
        let s = &self.session;
        if s.expected.iter().any(|b| b.digest == digest) {
            if s.fetched.contains(digest) {
                Want::Fetched
            } else {
                Want::Needed
            }
        } else if s.candidates.iter().any(|c| c.blobs.iter().any(|b| b.digest == digest)) {
            Want::Candidate
        } else {
            Want::No
        }
    }
}

/// How much an image wants a blob fetch, least first: a fetch goes to the image that wants it most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Want {
    No,
    /// Only a platform manifest it may pull names it.
    Candidate,
    /// It names it and fetched it already.
    Fetched,
    /// It names it and has not fetched it.
    Needed,
}

/// A transfer in progress.
pub(crate) struct Session {
    pub(crate) api: Api,
    pub(crate) started_wall: SystemTime,
    /// When it opened, read with `started_wall`.
    pub(crate) created: Instant,
    /// The trace it is exported as (when traces are on), known from its first request so the
    /// registry can be told it.
    pub(crate) trace_id: TraceId,
    /// First request received: the origin of all offsets.
    pub(crate) base: Instant,
    pub(crate) last_activity: Instant,
    /// Requests on the wire now, for idleness and live views.
    pub(crate) in_flight: HashMap<u64, Weak<Exchange>>,
    pub(crate) records: Vec<ExchangeRecord>,
    pub(crate) dropped: u64,
    pub(crate) tag: Option<String>,
    /// Blobs the parsed manifests name (pull), or the pushed manifest names (push).
    pub(crate) expected: Vec<BlobRef>,
    /// Image manifests parsed (pull): completion needs at least one.
    pub(crate) manifests_seen: usize,
    /// v1 pull: image ids from the ancestry.
    pub(crate) expected_images: Vec<String>,
    pub(crate) fetched: HashSet<String>,
    /// A request failed in a way that dooms the transfer if nothing else happens.
    pub(crate) failed: bool,
    /// Pull: the registry answered for a manifest (or index) of it, so the pull may settle.
    pub(crate) resolved: bool,
    /// Pull: platform manifests an index names that regscope knows, when the client holds the
    /// platform manifest itself; the one whose blob it fetches first is the one it pulls.
    pub(crate) candidates: Vec<Arc<ManifestRefs>>,
    /// A request of it failed (an error status other than an auth challenge or a `HEAD` probe's
    /// 404, or a body cut off): a settled pull with one is `failed`, not `complete`.
    pub(crate) request_failed: bool,
    /// Pull: blobs whose fetch failed and that no fetch has delivered since, each with whether
    /// the registry (or storage) ended it: the client is then likely to try again.
    pub(crate) failed_fetches: HashMap<Box<str>, bool>,
    pub(crate) outcome: Option<Outcome>,
}

impl Session {
    pub(crate) fn new(api: Api, now: Instant) -> Session {
        Session {
            api,
            started_wall: SystemTime::now(),
            created: now,
            trace_id: TraceId::random(),
            base: now,
            last_activity: now,
            in_flight: HashMap::default(),
            records: Vec::new(),
            dropped: 0,
            tag: None,
            expected: Vec::new(),
            manifests_seen: 0,
            expected_images: Vec::new(),
            fetched: HashSet::default(),
            failed: false,
            resolved: false,
            candidates: Vec::new(),
            request_failed: false,
            failed_fetches: HashMap::default(),
            outcome: None,
        }
    }

    /// Whether it holds nothing a transfer would show: every request of it was claimed, or all
    /// it has left are token requests.
    pub(crate) fn hollow(&self) -> bool {
        self.dropped == 0 && self.records.iter().all(|r| r.operation == Operation::AuthToken)
    }

    /// What this session looks like now, with what each of its requests on the wire has moved.
    pub(crate) fn live(&self, key: &Key, now: Instant) -> LiveTransfer {
        let mut requests: Vec<LiveExchange> =
            self.in_flight.values().filter_map(Weak::upgrade).map(|e| e.live(now)).collect();
        requests.sort_by_key(|r| r.id);
        for r in &mut requests {
            if r.expected.is_none() {
                r.expected =
                    self.expected.iter().find(|b| Some(b.digest.as_str()) == r.digest.as_deref()).and_then(|b| b.size);
            }
        }
        let moved = |r: &ExchangeRecord| {
            let body = match key.direction {
                TransferDirection::Push => r.upload.as_ref(),
                TransferDirection::Pull => r.download.as_ref(),
            };
            body.map_or(0, |b| b.bytes)
        };
        LiveTransfer {
            direction: key.direction,
            api: self.api,
            repository: key.repository.to_string(),
            tag: self.tag.clone(),
            client: key.client.to_string(),
            elapsed: now.saturating_duration_since(self.base).as_secs_f64(),
            requests_done: self.records.len() as u64 + self.dropped,
            bytes_done: self.records.iter().map(moved).sum(),
            failed_requests: self.records.iter().filter(|r| request_failed(r)).count() as u64,
            in_flight: requests,
        }
    }
}

/// Which way an operation moves an image, if it is part of one at all.
pub(crate) fn direction_of(op: Operation) -> Option<TransferDirection> {
    use Operation::*;
    use TransferDirection::*;
    match op {
        UploadStart
        | UploadStartMonolithic
        | BlobMount
        | UploadChunk
        | UploadFinish
        | UploadStatus
        | UploadCancel
        | BlobHead
        | ManifestPut
        | V1RepositoryPut
        | V1ImageJsonPut
        | V1LayerPut
        | V1ChecksumPut
        | V1TagPut
        | V1RepositoryImagesPut => Some(Push),
        ManifestGet
        | ManifestHead
        | BlobGet
        | StorageGet
        | StorageHead
        | V1RepositoryImagesGet
        | V1TagsGet
        | V1AncestryGet
        | V1LayerGet => Some(Pull),
        _ => None,
    }
}

pub(crate) fn is_v1_image_op(op: Operation) -> bool {
    use Operation::*;
    matches!(op, V1ImageJsonGet | V1ImageJsonPut | V1LayerGet | V1LayerPut | V1ChecksumPut | V1AncestryGet)
}

/// Blobs a session expects, each once and at most `MAX_EXPECTED`: a client that fetches the same
/// manifest over and over must not grow the session.
pub(crate) fn expect(s: &mut Session, blobs: &[BlobRef]) {
    for blob in blobs {
        if s.expected.len() >= MAX_EXPECTED {
            return;
        }
        if !s.expected.iter().any(|b| b.digest == blob.digest) {
            s.expected.push(blob.clone());
        }
    }
}

/// Blobs one transfer may expect: far above any real image (a few hundred layers), far below
/// what would matter for memory.
pub(crate) const MAX_EXPECTED: usize = 4096;

/// How many settle times a resolved pull waits while it has fetched no blob and had nothing fail:
/// before its first blob the client is still looking through its own store for what it lacks,
/// which takes longer than the gap between two blobs (and longer still on a busy machine).
const FIRST_BLOB_SETTLES: u32 = 5;

impl Session {
    /// How long this session must be quiet for its pull to be over, or `None` while it cannot
    /// settle: a push, or a pull whose manifest is not resolved.
    pub(crate) fn settles_after(&self, key: &Key, settle: Duration) -> Option<Duration> {
        if key.direction != TransferDirection::Pull || !self.resolved {
            return None;
        }
        if self.failed_fetches.values().any(|&upstream| upstream) {
            return Some(settle * RETRY_SETTLES);
        }
        let deciding = self.fetched.is_empty() && !self.failed_so_far();
        Some(if deciding { settle * FIRST_BLOB_SETTLES } else { settle })
    }

    /// Whether something failed that dooms the transfer if nothing else happens: a request, or
    /// a blob fetch no later fetch made good.
    pub(crate) fn failed_so_far(&self) -> bool {
        self.request_failed || !self.failed_fetches.is_empty()
    }
}

/// How many settle times a pull waits after the registry (or storage) cut off one of its blobs
/// and before the client fetched it again: clients back off before retrying (docker 5 s, then 10).
const RETRY_SETTLES: u32 = 20;

/// Blobs whose failed fetches a pull remembers: far above any image's layer count.
const MAX_FAILED_FETCHES: usize = 1024;

/// Platform manifests a session keeps as candidates: more than any index lists platforms.
const MAX_CANDIDATES: usize = 64;

/// The candidate platform manifest that names `digest`, if any, becomes the pull's manifest.
fn adopt_candidate(s: &mut Session, digest: &str) {
    if let Some(refs) = s.candidates.iter().find(|c| c.blobs.iter().any(|b| b.digest == digest)).cloned() {
        s.manifests_seen += 1;
        expect(s, &refs.blobs);
        s.candidates.clear();
    }
}

/// Whether a request failed as far as its transfer is concerned. A 401 is the challenge before
/// a token, and a `HEAD` answered 404 is a probe: neither fails a transfer.
pub(crate) fn request_failed(r: &ExchangeRecord) -> bool {
    let probe = matches!(r.operation, Operation::ManifestHead | Operation::BlobHead);
    r.aborted_by().is_some()
        || match r.status {
            Some(401) => false,
            Some(404) => !probe,
            Some(status) => status >= 400,
            None => true,
        }
}

/// Applies one finished request to its session: what it tells about the transfer's end.
pub(crate) fn update(
    s: &mut Session,
    r: &ExchangeRecord,
    manifest: Option<Arc<ManifestRefs>>,
    ancestry: Option<Vec<String>>,
    known: &KnownManifests,
) {
    use Operation::*;
    let ok = r.status.is_some_and(|c| (200..400).contains(&c)) && r.aborted_by().is_none();
    // A blob fetch that failed is made good by a later one (the client's retry or range resume).
    let fetch = matches!(r.operation, BlobGet | StorageGet);
    match (fetch, r.digest.as_deref()) {
        (true, Some(digest)) if request_failed(r) => {
            if s.failed_fetches.len() < MAX_FAILED_FETCHES {
                s.failed_fetches.insert(digest.into(), r.aborted_by() != Some(crate::protocol::Side::Client));
            }
        }
        (true, Some(digest)) if ok && r.status.is_some_and(|c| (200..300).contains(&c)) => {
            s.failed_fetches.remove(digest);
        }
        _ => s.request_failed |= request_failed(r),
    }
    let by_tag = r.reference.as_deref().filter(|reference| !reference.contains(':'));
    match r.operation {
        ManifestPut => {
            if let Some(refs) = manifest {
                expect(s, &refs.blobs);
            }
            if ok {
                if let Some(tag) = by_tag {
                    s.tag = Some(tag.to_owned());
                    s.outcome = Some(Outcome::Complete);
                }
            } else {
                s.outcome = Some(Outcome::Failed);
            }
        }
        V1TagPut if ok => s.tag = r.reference.as_deref().map(str::to_owned),
        V1RepositoryImagesPut => s.outcome = Some(if ok { Outcome::Complete } else { Outcome::Failed }),
        ManifestGet | ManifestHead => {
            if let Some(tag) = by_tag {
                s.tag = Some(tag.to_owned());
            }
            // A HEAD carries no body: what it names is known if regscope saw the manifest before.
            let digest = manifest_digest(r);
            let refs = match manifest {
                Some(refs) => Some(refs),
                None if ok => digest.and_then(|d| known.get(d)).cloned(),
                None => None,
            };
            s.resolved |= ok && (refs.is_some() || digest.is_some());
            if let Some(refs) = refs {
                if !refs.blobs.is_empty() {
                    s.manifests_seen += 1;
                    expect(s, &refs.blobs);
                }
                for child in &refs.manifests {
                    if s.candidates.len() < MAX_CANDIDATES {
                        s.candidates.extend(known.get(child).cloned());
                    }
                }
            }
            // A missing tag or manifest ends a pull that has nothing else going on. A failed
            // HEAD is only a probe: clients follow it with a GET, which decides.
            if !ok && s.manifests_seen == 0 {
                s.failed = true;
                if r.operation == ManifestGet {
                    s.outcome = Some(Outcome::Failed);
                }
            }
        }
        // A redirect (307 to storage) has not delivered the blob: the storage GET does.
        BlobGet | StorageGet if ok && r.status.is_some_and(|c| (200..300).contains(&c)) => {
            if let Some(digest) = &r.digest {
                if s.manifests_seen == 0 {
                    adopt_candidate(s, digest);
                }
                s.fetched.insert(digest.to_string());
            }
        }
        V1AncestryGet => {
            if let Some(ids) = ancestry {
                s.expected_images = ids;
            }
        }
        V1LayerGet if ok => {
            if let Some(id) = &r.reference {
                s.fetched.insert(id.to_string());
            }
        }
        _ => {}
    }
    let all_fetched = |wanted: &mut dyn Iterator<Item = &String>| {
        let mut any = false;
        for w in wanted {
            any = true;
            if !s.fetched.contains(w) {
                return false;
            }
        }
        any
    };
    if s.outcome.is_none() {
        let v2_done = s.manifests_seen > 0 && all_fetched(&mut s.expected.iter().map(|b| &b.digest));
        let v1_done = all_fetched(&mut s.expected_images.iter());
        if v2_done || v1_done {
            s.outcome = Some(Outcome::Complete);
        }
    }
}
