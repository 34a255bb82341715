//! Whole pushes and pulls: grouping requests into transfers, deciding when one is over,
//! and keeping a bounded ring of finished ones.
//!
//! Requests are grouped per (client address, repository, direction). A push ends with its
//! manifest `PUT` by tag (v1: the repository images `PUT`); a pull is anchored on the
//! manifests it fetched (v1: the ancestry) and ends when every blob they name has been
//! fetched. Anything else ends after `idle_timeout` with no request in flight, as
//! `incomplete` (or `failed` if a request was cut off). v1 image requests carry no
//! repository, so they join the v1 session their client opened last.
//!
//! Memory is bounded whatever clients do: open sessions, requests per session, and finished
//! transfers are all capped.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::exchange::{Exchange, ExchangeRecord, ExchangeSink, LiveExchange};
use crate::manifest::{parse_ancestry, BlobKind, BlobRef, ManifestRefs, ParsedManifests};
use crate::metrics::Metrics;
use crate::phases::{upload_outcome, upload_phases, Phase, UploadOutcome, UploadPhases};
use crate::route::{Api, Operation};
use crate::timeline::{attribute, RequestView, Split};

/// The tracker's maps are looked up four to eight times per request under its lock: with std's
/// SipHash, about 6 % of a proxied manifest GET's instructions (callgrind); with foldhash the
/// whole request takes 3 % fewer. Its seeds are random per process and per map, so colliding
/// repository names cannot be worked out ahead of time; and the tables are capped anyway.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Push or pull. A metric label: closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferDirection {
    Push,
    Pull,
}

impl TransferDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferDirection::Push => "push",
            TransferDirection::Pull => "pull",
        }
    }
}

/// How a transfer ended. A metric label: closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Complete,
    Incomplete,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Incomplete => "incomplete",
            Outcome::Failed => "failed",
        }
    }
}

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
    pub wall_seconds: f64,
    /// Every instant of the wall time attributed to exactly one party (see `timeline`).
    pub parties: Split,
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
    pub in_flight: Vec<LiveExchange>,
}

impl Transfer {
    /// `repository:tag`, or the repository alone when no tag was seen.
    pub fn image(&self) -> String {
        image_name(&self.repository, self.tag.as_deref())
    }
}

/// `repository:tag`, or the repository alone.
pub fn image_name(repository: &str, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("{repository}:{tag}"),
        None => repository.to_owned(),
    }
}

/// Limits and timeouts of the tracker.
#[derive(Debug, Clone, Copy)]
pub struct TrackerConfig {
    pub idle_timeout: Duration,
    pub keep_finished: usize,
    pub max_open: usize,
    pub max_requests: usize,
    /// Requests kept across all open sessions: bounds memory however many clients misbehave.
    pub max_total_requests: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            idle_timeout: Duration::from_secs(120),
            keep_finished: 1000,
            max_open: 4096,
            max_requests: 4096,
            max_total_requests: 65_536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    client: IpAddr,
    repository: Arc<str>,
    direction: TransferDirection,
}

/// A transfer in progress.
struct Session {
    api: Api,
    started_wall: SystemTime,
    /// First request received: the origin of all offsets.
    base: Instant,
    last_activity: Instant,
    /// Requests on the wire now, for idleness and live views.
    in_flight: HashMap<u64, Weak<Exchange>>,
    records: Vec<ExchangeRecord>,
    dropped: u64,
    tag: Option<String>,
    /// Blobs the parsed manifests name (pull), or the pushed manifest names (push).
    expected: Vec<BlobRef>,
    /// Image manifests parsed (pull): completion needs at least one.
    manifests_seen: usize,
    /// v1 pull: image ids from the ancestry.
    expected_images: Vec<String>,
    fetched: HashSet<String>,
    /// A request failed in a way that dooms the transfer if nothing else happens.
    failed: bool,
    outcome: Option<Outcome>,
}

impl Session {
    fn new(api: Api, now: Instant) -> Session {
        Session {
            api,
            started_wall: SystemTime::now(),
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
            outcome: None,
        }
    }
}

#[derive(Default)]
struct State {
    open: HashMap<Key, Session>,
    /// The v1 repository (and direction) each client is working on.
    v1_current: HashMap<IpAddr, (Arc<str>, TransferDirection)>,
    /// The session key of each in-flight exchange, decided when it started.
    in_flight_keys: HashMap<u64, Key>,
    finished: VecDeque<Arc<Transfer>>,
    next_id: u64,
    /// Requests held by open sessions, against `max_total_requests`.
    held_requests: usize,
    /// Requests held by finished transfers, against `max_total_requests` too.
    finished_requests: usize,
}

impl State {
    /// Closes a session, giving back the requests it held.
    fn remove(&mut self, key: &Key) -> Option<Session> {
        let session = self.open.remove(key)?;
        self.held_requests -= session.records.len();
        Some(session)
    }
}

/// Groups exchanges into transfers. See the module docs.
pub struct Tracker {
    state: Mutex<State>,
    manifests: ParsedManifests,
    config: TrackerConfig,
    metrics: Arc<Metrics>,
}

/// Which way an operation moves an image, if it is part of one at all.
fn direction_of(op: Operation) -> Option<TransferDirection> {
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
        ManifestGet | ManifestHead | BlobGet | V1RepositoryImagesGet | V1TagsGet | V1AncestryGet | V1LayerGet => {
            Some(Pull)
        }
        _ => None,
    }
}

fn is_v1_image_op(op: Operation) -> bool {
    use Operation::*;
    matches!(op, V1ImageJsonGet | V1ImageJsonPut | V1LayerGet | V1LayerPut | V1ChecksumPut | V1AncestryGet)
}

impl Tracker {
    pub fn new(config: TrackerConfig, metrics: Arc<Metrics>) -> Self {
        Tracker { state: Mutex::new(State::default()), manifests: ParsedManifests::new(), config, metrics }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Transfers in progress, oldest first, with what each of their requests on the wire has
    /// moved so far.
    pub fn live(&self) -> Vec<LiveTransfer> {
        let now = Instant::now();
        let state = self.lock();
        let mut live: Vec<LiveTransfer> = state
            .open
            .iter()
            .map(|(key, s)| {
                let mut requests: Vec<LiveExchange> =
                    s.in_flight.values().filter_map(Weak::upgrade).map(|e| e.live(now)).collect();
                requests.sort_by_key(|r| r.id);
                for r in &mut requests {
                    if r.expected.is_none() {
                        r.expected = kind_and_size(&s.expected, r.digest.as_deref()).1;
                    }
                }
                LiveTransfer {
                    direction: key.direction,
                    api: s.api,
                    repository: key.repository.to_string(),
                    tag: s.tag.clone(),
                    client: key.client.to_string(),
                    elapsed: now.saturating_duration_since(s.base).as_secs_f64(),
                    requests_done: s.records.len() as u64 + s.dropped,
                    bytes_done: s
                        .records
                        .iter()
                        .map(|r| {
                            let body = match key.direction {
                                TransferDirection::Push => r.upload.as_ref(),
                                TransferDirection::Pull => r.download.as_ref(),
                            };
                            body.map_or(0, |b| b.bytes)
                        })
                        .sum(),
                    in_flight: requests,
                }
            })
            .collect();
        live.sort_by(|a, b| b.elapsed.total_cmp(&a.elapsed));
        live
    }

    /// Finished transfers, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Transfer>> {
        self.lock().finished.iter().rev().take(limit).cloned().collect()
    }

    pub fn get(&self, id: u64) -> Option<Arc<Transfer>> {
        self.lock().finished.iter().find(|t| t.id == id).cloned()
    }

    /// Closes sessions idle for longer than the idle timeout. Called periodically.
    pub fn sweep(&self, now: Instant) {
        let idle = self.config.idle_timeout;
        let expired: Vec<(Key, Session)> = {
            let mut state = self.lock();
            let keys: Vec<Key> = state
                .open
                .iter()
                .filter(|(_, s)| s.in_flight.is_empty() && now.saturating_duration_since(s.last_activity) >= idle)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter().filter_map(|k| state.remove(&k).map(|s| (k, s))).collect()
        };
        for (key, session) in expired {
            self.finish(key, session, true);
        }
    }

    /// Decides which session a request belongs to (and, for v1, which repository).
    fn key_for(state: &mut State, r: &ExchangeRecord) -> Option<Key> {
        let client = r.client.ip();
        let op = r.operation;
        // v1 names `library/x` and `x` the same repository (the seed's pull uses both).
        let repository = r.repository.as_ref().map(|name| match name.strip_prefix("library/") {
            Some(short) if r.api == Api::V1 => Arc::from(short),
            _ => name.clone(),
        });
        if matches!(op, Operation::V1RepositoryPut | Operation::V1RepositoryImagesGet) {
            let direction = direction_of(op)?;
            let repo = repository.clone()?;
            if state.v1_current.len() >= 4096 {
                state.v1_current.clear();
            }
            state.v1_current.insert(client, (repo, direction));
        }
        if is_v1_image_op(op) {
            let (repo, current) = state.v1_current.get(&client)?;
            // An image json GET is an existence check in a push, a fetch in a pull.
            let direction = if op == Operation::V1ImageJsonGet { *current } else { direction_of(op)? };
            return Some(Key { client, repository: repo.clone(), direction });
        }
        let direction = direction_of(op)?;
        Some(Key { client, repository: repository?, direction })
    }

    /// Makes sure `key` has an open session, closing the longest-idle one if the table is full
    /// (returned, to be finished outside the lock).
    fn open_session(&self, state: &mut State, key: &Key, api: Api, now: Instant) -> Option<(Key, Session)> {
        // Looked up before inserting: `entry` would take (allocate) an owned key every time.
        if state.open.contains_key(key) {
            return None;
        }
        let mut evicted = None;
        if state.open.len() >= self.config.max_open {
            if let Some(oldest) = state
                .open
                .iter()
                .filter(|(_, s)| s.in_flight.is_empty())
                .min_by_key(|(_, s)| s.last_activity)
                .map(|(k, _)| k.clone())
            {
                evicted = state.remove(&oldest).map(|s| (oldest, s));
            }
        }
        state.open.insert(key.clone(), Session::new(api, now));
        evicted
    }

    /// Turns a closed session into a finished transfer: metrics, log, ring.
    fn finish(&self, key: Key, session: Session, idle_closed: bool) {
        let transfer = build_transfer(&key, session, idle_closed);
        let m = &self.metrics;
        let dir = transfer.direction.as_str();
        m.image_transfer.with_label_values(&[dir, transfer.outcome.as_str()]).observe(transfer.wall_seconds);
        for (party, seconds) in [
            ("client", transfer.parties.client),
            ("registry", transfer.parties.registry),
            ("transfer", transfer.parties.moving),
        ] {
            m.image_time_total.with_label_values(&[dir, party]).inc_by(seconds.max(0.0));
        }
        for blob in &transfer.blobs {
            if let (Some(phases), BlobOutcome::Committed) = (&blob.phases, blob.outcome) {
                for phase in Phase::ALL {
                    m.upload_phase
                        .with_label_values(&[transfer.api.as_str(), phase.as_str()])
                        .observe(phases.get(phase));
                }
            }
        }
        let pct = |x: f64| if transfer.wall_seconds > 0.0 { 100.0 * x / transfer.wall_seconds } else { 0.0 };
        tracing::info!(
            target: "regscope::transfer",
            direction = dir,
            outcome = transfer.outcome.as_str(),
            repository = transfer.repository,
            tag = transfer.tag.as_deref(),
            client = transfer.client,
            wall_s = transfer.wall_seconds,
            client_pct = pct(transfer.parties.client),
            registry_pct = pct(transfer.parties.registry),
            transfer_pct = pct(transfer.parties.moving),
            blobs = transfer.blobs.len(),
            bytes = transfer.bytes,
            "transfer"
        );
        let mut state = self.lock();
        state.next_id += 1;
        let mut transfer = transfer;
        transfer.id = state.next_id;
        // The oldest go first: beyond `keep_finished` transfers, and beyond `max_total_requests`
        // requests kept for their waterfalls (a thousand 4096-request pulls would be gigabytes).
        let held = transfer.requests.len();
        while state.finished.len() >= self.config.keep_finished
            || (!state.finished.is_empty() && state.finished_requests + held > self.config.max_total_requests)
        {
            let Some(oldest) = state.finished.pop_front() else { break };
            state.finished_requests -= oldest.requests.len();
        }
        state.finished_requests += held;
        state.finished.push_back(Arc::new(transfer));
    }
}

impl ExchangeSink for Tracker {
    fn started(&self, exchange: &Arc<Exchange>) {
        let r = exchange.info();
        let now = Instant::now();
        let evicted = {
            let mut state = self.lock();
            let Some(key) = Self::key_for(&mut state, r) else { return };
            let evicted = self.open_session(&mut state, &key, r.api, now);
            let session = state.open.get_mut(&key).expect("open_session leaves it open");
            session.in_flight.insert(r.id, Arc::downgrade(exchange));
            session.last_activity = now;
            state.in_flight_keys.insert(r.id, key);
            evicted
        };
        if let Some((key, session)) = evicted {
            self.finish(key, session, true);
        }
    }

    fn finished(&self, mut record: ExchangeRecord) {
        // Parse captured bodies before taking the lock.
        let parsed_manifest = match record.operation {
            Operation::ManifestGet | Operation::ManifestPut => {
                record.captured.take().and_then(|body| self.manifests.parse(body))
            }
            _ => None,
        };
        let ancestry = match record.operation {
            Operation::V1AncestryGet => record.captured.as_deref().and_then(parse_ancestry),
            _ => None,
        };
        let now = Instant::now();
        let evicted;
        let done = {
            let mut guard = self.lock();
            // Through a plain reference, so the session and the counters are borrowed apart.
            let state = &mut *guard;
            let key = match state.in_flight_keys.remove(&record.id) {
                Some(key) => key,
                None => match Self::key_for(state, &record) {
                    Some(key) => key,
                    None => return,
                },
            };
            evicted = self.open_session(state, &key, record.api, now);
            let session = state.open.get_mut(&key).expect("open_session leaves it open");
            session.in_flight.remove(&record.id);
            session.last_activity = now;
            session.base = session.base.min(record.received);
            update(session, &record, parsed_manifest, ancestry);
            if session.records.len() < self.config.max_requests && state.held_requests < self.config.max_total_requests
            {
                record.captured = None;
                session.records.push(record);
                state.held_requests += 1;
            } else {
                session.dropped += 1;
            }
            match session.outcome {
                Some(_) if session.in_flight.is_empty() => state.remove(&key).map(|s| (key, s)),
                _ => None,
            }
        };
        if let Some((key, session)) = evicted {
            self.finish(key, session, true);
        }
        if let Some((key, session)) = done {
            self.finish(key, session, false);
        }
    }
}

/// Blobs a session expects, each once and at most `MAX_EXPECTED`: a client that fetches the same
/// manifest over and over must not grow the session.
fn expect(s: &mut Session, blobs: &[BlobRef]) {
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
const MAX_EXPECTED: usize = 4096;

/// Names the session's tag, copying it only when it changes: a client polling a tag fetches the
/// same one again and again.
fn set_tag(s: &mut Session, tag: &str) {
    if s.tag.as_deref() != Some(tag) {
        s.tag = Some(tag.to_owned());
    }
}

/// Applies one finished request to its session: what it tells about the transfer's end.
fn update(s: &mut Session, r: &ExchangeRecord, manifest: Option<Arc<ManifestRefs>>, ancestry: Option<Vec<String>>) {
    use Operation::*;
    let ok = r.status.is_some_and(|c| (200..400).contains(&c)) && r.aborted_by().is_none();
    let by_tag = r.reference.as_deref().filter(|reference| !reference.contains(':'));
    match r.operation {
        ManifestPut => {
            if let Some(refs) = manifest {
                expect(s, &refs.blobs);
            }
            if ok {
                if let Some(tag) = by_tag {
                    set_tag(s, tag);
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
                set_tag(s, tag);
            }
            if let Some(refs) = manifest {
                if !refs.blobs.is_empty() {
                    s.manifests_seen += 1;
                    expect(s, &refs.blobs);
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
        BlobGet if ok => {
            if let Some(digest) = &r.digest {
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

/// Builds the finished transfer from a closed session.
fn build_transfer(key: &Key, s: Session, idle_closed: bool) -> Transfer {
    let mut requests: Vec<RequestView> = s.records.iter().map(|r| RequestView::new(r, s.base)).collect();
    requests.sort_by(|a, b| a.start.total_cmp(&b.start));
    let wall = requests.iter().map(|r| r.end).fold(0.0, f64::max);
    let parties = attribute(&requests, wall);
    let outcome = s.outcome.unwrap_or(if s.failed || requests.iter().any(|r| r.aborted_by.is_some()) {
        Outcome::Failed
    } else {
        Outcome::Incomplete
    });
    let blobs = match key.direction {
        TransferDirection::Push => push_blobs(&requests, &s.expected, idle_closed),
        TransferDirection::Pull => pull_blobs(&requests, &s.expected),
    };
    let bytes = requests
        .iter()
        .map(|r| match key.direction {
            TransferDirection::Push => r.bytes_in(),
            TransferDirection::Pull => r.bytes_out(),
        })
        .sum();
    Transfer {
        id: 0,
        direction: key.direction,
        outcome,
        api: s.api,
        repository: key.repository.to_string(),
        tag: s.tag,
        client: key.client.to_string(),
        started_unix_ms: s.started_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        wall_seconds: wall,
        parties,
        bytes,
        blobs,
        requests,
        requests_dropped: s.dropped,
    }
}

/// A blob's 1-based position among the manifest's layers, so a layer has the same number in
/// the push and the pull of one image.
fn layer_number(expected: &[BlobRef], digest: Option<&str>) -> Option<usize> {
    let digest = digest?;
    let mut layers = expected.iter().filter(|b| b.kind == BlobKind::Layer);
    layers.position(|b| b.digest == digest).map(|i| i + 1)
}

fn kind_and_size(expected: &[BlobRef], digest: Option<&str>) -> (Option<BlobKind>, Option<u64>) {
    digest.and_then(|d| expected.iter().find(|b| b.digest == d)).map_or((None, None), |b| (Some(b.kind), b.size))
}

/// Push: one blob per upload (v2: by upload id; v1: by image id), in order of first request.
fn push_blobs(requests: &[RequestView], expected: &[BlobRef], idle_closed: bool) -> Vec<Blob> {
    let mut groups: Vec<(String, Vec<&RequestView>)> = Vec::new();
    for r in requests.iter().filter(|r| crate::phases::is_upload_request(r.operation)) {
        let group = match r.operation {
            Operation::V1ImageJsonPut | Operation::V1LayerPut | Operation::V1ChecksumPut => r.reference.clone(),
            // A mount that succeeded has no upload id: the digest names it.
            _ => r.upload_id.clone().or_else(|| r.digest.clone()),
        };
        let Some(group) = group else { continue };
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(r),
            None => groups.push((group, vec![r])),
        }
    }
    groups
        .into_iter()
        .map(|(group, members)| {
            let phases = upload_phases(&members);
            let v1 = members.iter().any(|r| r.operation.api() == Api::V1);
            let digest = if v1 {
                Some(group)
            } else {
                members
                    .iter()
                    .filter(|r| matches!(r.operation, Operation::UploadFinish | Operation::BlobMount))
                    .find_map(|r| r.digest.clone())
            };
            let (kind, declared_size) = kind_and_size(expected, digest.as_deref());
            Blob {
                kind,
                declared_size,
                layer: layer_number(expected, digest.as_deref()),
                bytes: phases.bytes,
                outcome: upload_outcome(&members, idle_closed).into(),
                start: members.iter().map(|r| r.start).fold(f64::INFINITY, f64::min),
                end: members.iter().map(|r| r.end).fold(0.0, f64::max),
                split: phases.transfer_split,
                phases: Some(phases),
                metadata_seconds: 0.0,
                digest,
            }
        })
        .collect()
}

/// Pull: one blob per fetched digest (v1: per image, json then layer).
fn pull_blobs(requests: &[RequestView], expected: &[BlobRef]) -> Vec<Blob> {
    let mut blobs: Vec<Blob> = Vec::new();
    for r in requests {
        let (id, is_metadata) = match r.operation {
            Operation::BlobGet => (r.digest.clone(), false),
            Operation::V1LayerGet => (r.reference.clone(), false),
            Operation::V1ImageJsonGet => (r.reference.clone(), true),
            _ => continue,
        };
        let Some(id) = id else { continue };
        let index = match blobs.iter().position(|b| b.digest.as_deref() == Some(id.as_str())) {
            Some(i) => i,
            None => {
                let (kind, declared_size) = kind_and_size(expected, Some(&id));
                blobs.push(Blob {
                    layer: layer_number(expected, Some(&id)),
                    digest: Some(id),
                    kind,
                    bytes: 0,
                    declared_size,
                    outcome: BlobOutcome::Failed,
                    start: r.start,
                    end: r.end,
                    phases: None,
                    metadata_seconds: 0.0,
                    split: Split::default(),
                });
                blobs.len() - 1
            }
        };
        let blob = &mut blobs[index];
        blob.end = blob.end.max(r.end);
        if is_metadata {
            blob.metadata_seconds += r.duration();
            continue;
        }
        blob.bytes += r.bytes_out();
        blob.split.add(r.split());
        if r.succeeded() {
            blob.outcome = BlobOutcome::Fetched;
        }
    }
    blobs
}

/// Periodically closes idle sessions, until the tracker is dropped.
pub fn spawn_sweeper(tracker: &Arc<Tracker>) {
    let weak = Arc::downgrade(tracker);
    let period = (tracker.config.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(tracker) = weak.upgrade() else { return };
            tracker.sweep(Instant::now());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::ResponseInfo;
    use crate::timed_body::{BodyEnd, BodyOutcome, Direction};

    fn record(id: u64, op: Operation, repo: &str, at: Instant, secs: f64, status: u16) -> ExchangeRecord {
        let end = at + Duration::from_secs_f64(secs);
        ExchangeRecord {
            id,
            api: op.api(),
            operation: op,
            method: http::Method::GET,
            repository: Some(repo.into()),
            reference: None,
            digest: None,
            upload_id: None,
            client: "10.0.0.7:40000".parse().unwrap(),
            status: Some(status),
            started_wall: SystemTime::now(),
            received: at,
            forwarded: Some(at),
            response_head: Some(end),
            ended: end,
            upload: None,
            download: None,
            upstream_error: None,
            response_info: ResponseInfo::default(),
            captured: None,
        }
    }

    fn body(direction: Direction, bytes: u64, from: Instant, to: Instant) -> Option<BodyOutcome> {
        Some(BodyOutcome {
            direction,
            bytes,
            frames: 1,
            first_poll: Some(from),
            first_byte: Some(from),
            last_byte: Some(to),
            ended: to,
            source_wait: Duration::ZERO,
            sink_wait: Duration::ZERO,
            end: BodyEnd::Complete,
        })
    }

    fn tracker(config: TrackerConfig) -> Tracker {
        Tracker::new(config, Arc::new(Metrics::new(0)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_docker_style_push_becomes_one_complete_transfer() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut post = record(1, Operation::UploadStart, "team/app", at(0.0), 0.1, 202);
        post.response_info.upload_uuid = Some("u-1".into());
        let mut patch = record(2, Operation::UploadChunk, "team/app", at(0.2), 2.0, 202);
        patch.upload_id = Some("u-1".into());
        patch.upload = body(Direction::Upload, 1000, at(0.2), at(2.1));
        let mut put = record(3, Operation::UploadFinish, "team/app", at(2.3), 0.2, 201);
        put.upload_id = Some("u-1".into());
        put.digest = Some("sha256:aa".into());
        let mut manifest = record(4, Operation::ManifestPut, "team/app", at(2.6), 0.1, 201);
        manifest.reference = Some("v1".into());
        manifest.captured = Some(
            br#"{"config":{"digest":"sha256:cc","size":5},"layers":[{"digest":"sha256:aa","size":1000}]}"#.to_vec(),
        );
        for r in [post, patch, put] {
            t.finished(r);
            assert!(t.recent(10).is_empty(), "not over before the manifest");
        }
        t.finished(manifest);
        let done = t.recent(10);
        assert_eq!(done.len(), 1);
        let push = &done[0];
        assert_eq!(
            (push.direction, push.outcome, push.tag.as_deref()),
            (TransferDirection::Push, Outcome::Complete, Some("v1"))
        );
        assert_eq!(push.blobs.len(), 1);
        let blob = &push.blobs[0];
        assert_eq!((blob.digest.as_deref(), blob.kind, blob.bytes), (Some("sha256:aa"), Some(BlobKind::Layer), 1000));
        assert_eq!(blob.outcome, BlobOutcome::Committed);
        assert!((push.parties.total() - push.wall_seconds).abs() < 1e-9);
        assert_eq!(push.client, "10.0.0.7");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_close_as_incomplete_and_memory_stays_bounded() {
        let config = TrackerConfig { max_requests: 10, max_total_requests: 25, ..TrackerConfig::default() };
        let t = tracker(config);
        let t0 = Instant::now();
        for i in 0..40u64 {
            let repo = format!("r{}", i % 2);
            t.finished(record(i, Operation::BlobGet, &repo, t0, 0.01, 200));
        }
        assert_eq!(t.lock().held_requests, 20, "each session keeps at most max_requests");
        t.finished(record(100, Operation::BlobGet, "r3", t0, 0.01, 200));
        t.finished(record(101, Operation::BlobGet, "r4", t0, 0.01, 200));
        t.finished(record(102, Operation::BlobGet, "r5", t0, 0.01, 200));
        t.finished(record(103, Operation::BlobGet, "r6", t0, 0.01, 200));
        t.finished(record(104, Operation::BlobGet, "r7", t0, 0.01, 200));
        t.finished(record(105, Operation::BlobGet, "r8", t0, 0.01, 200));
        assert_eq!(t.lock().held_requests, 25, "never more than max_total_requests");
        t.sweep(t0 + Duration::from_secs(121));
        assert_eq!(t.lock().held_requests, 0);
        let closed = t.recent(100);
        assert_eq!(closed.len(), 8);
        assert!(closed.iter().all(|c| c.outcome == Outcome::Incomplete));
        let r0 = closed.iter().find(|c| c.repository == "r0").unwrap();
        assert_eq!((r0.requests.len(), r0.requests_dropped), (10, 10));

        // Finished transfers keep their requests for the waterfall, within the same bound: the
        // oldest give way.
        for i in 0..10u64 {
            t.finished(record(200 + i, Operation::BlobGet, "r9", t0, 0.01, 200));
        }
        t.sweep(t0 + Duration::from_secs(400));
        let kept = t.recent(100);
        let held: usize = kept.iter().map(|c| c.requests.len()).sum();
        assert!((16..=25).contains(&held), "{held}: the bound, less at most one evicted transfer's worth");
        assert!(kept.len() < 9, "older transfers made room for the new one");
        assert!(kept.iter().any(|c| c.repository == "r9" && c.requests.len() == 10));
        assert_eq!(t.lock().finished_requests, held);
    }

    #[tokio::test(start_paused = true)]
    async fn polling_one_manifest_does_not_grow_the_session() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let body = br#"{"config":{"digest":"sha256:c","size":1},"layers":[{"digest":"sha256:l","size":2}]}"#;
        for id in 0..1000 {
            let mut get = record(id, Operation::ManifestGet, "polled", t0, 0.001, 200);
            get.reference = Some("latest".into());
            get.captured = Some(body.to_vec());
            t.finished(get);
        }
        let state = t.lock();
        let session = state.open.values().next().unwrap();
        assert_eq!(session.expected.len(), 2);
    }
}
