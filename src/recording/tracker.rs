//! The transfer tracker: grouping requests into sessions, closing them, and keeping a bounded
//! ring of finished transfers.
//!
//! Requests are grouped per (client address, repository, direction); `session` says when one
//! is over. A session that says nothing ends after `idle_timeout` with no request in flight, as
//! `incomplete` (or `failed` if a request was cut off). v1 image requests carry no repository,
//! so they join the v1 session their client opened last.
//!
//! Memory is bounded whatever clients do: open sessions, requests per session, and finished
//! transfers are all capped.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::model::{LiveTransfer, Transfer};
use super::publish::publish;
use super::results::build_transfer;
use super::session::{direction_of, is_v1_image_op, update, Key, Session};
use super::HashMap;
use crate::body::{Exchange, ExchangeRecord, ExchangeSink};
use crate::metrics::Metrics;
use crate::protocol::TransferDirection;
use crate::protocol::{parse_ancestry, Api, Operation, ParsedManifests};

/// Limits and timeouts of the tracker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrackerConfig {
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
pub(crate) struct Tracker {
    state: Mutex<State>,
    manifests: ParsedManifests,
    config: TrackerConfig,
    metrics: Arc<Metrics>,
}

impl Tracker {
    pub(crate) fn new(config: TrackerConfig, metrics: Arc<Metrics>) -> Self {
        Tracker { state: Mutex::new(State::default()), manifests: ParsedManifests::new(), config, metrics }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Transfers in progress, oldest first, with what each of their requests on the wire has
    /// moved so far.
    pub(crate) fn live(&self) -> Vec<LiveTransfer> {
        let now = Instant::now();
        let state = self.lock();
        let mut live: Vec<LiveTransfer> = state.open.iter().map(|(key, s)| s.live(key, now)).collect();
        live.sort_by(|a, b| b.elapsed.total_cmp(&a.elapsed));
        live
    }

    /// Finished transfers, newest first.
    pub(crate) fn recent(&self, limit: usize) -> Vec<Arc<Transfer>> {
        self.lock().finished.iter().rev().take(limit).cloned().collect()
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Transfer>> {
        self.lock().finished.iter().find(|t| t.id == id).cloned()
    }

    /// Closes sessions idle for longer than the idle timeout. Called periodically.
    pub(crate) fn sweep(&self, now: Instant) {
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
        publish(&self.metrics, &transfer);
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

/// Periodically closes idle sessions, until the tracker is dropped.
pub(crate) fn spawn_sweeper(tracker: &Arc<Tracker>) {
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
    use crate::body::BodyOutcome;
    use crate::body::ResponseInfo;
    use crate::protocol::{BlobKind, Outcome};
    use crate::protocol::{BodyEnd, Direction};
    use crate::recording::BlobOutcome;

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
            first_poll: Some(from),
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
