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

use super::manifests::{manifest_digest, KnownManifests};
use super::model::{LiveTransfer, Transfer};
use super::publish::publish;
use super::results::build_transfer;
use super::session::{direction_of, is_v1_image_op, update, Key, Session};
use super::HashMap;
use crate::body::{Exchange, ExchangeRecord, ExchangeSink};
use crate::metrics::Metrics;
use crate::protocol::{parse_ancestry, Api, Operation, Outcome, ParsedManifests, TransferDirection};
use crate::traces::Exporter;

/// Limits and timeouts of the tracker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrackerConfig {
    pub idle_timeout: Duration,
    pub keep_finished: usize,
    pub max_open: usize,
    pub max_requests: usize,
    /// Requests kept across all open sessions: bounds memory however many clients misbehave.
    pub max_total_requests: usize,
    /// A pull whose manifest is resolved ends once nothing more came for this long.
    pub pull_settle: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            idle_timeout: Duration::from_secs(120),
            keep_finished: 1000,
            max_open: 4096,
            max_requests: 4096,
            max_total_requests: 65_536,
            pull_settle: Duration::from_secs(1),
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) open: HashMap<Key, Session>,
    /// The v1 repository (and direction) each client is working on.
    v1_current: HashMap<IpAddr, (Arc<str>, TransferDirection)>,
    /// The session key of each in-flight exchange, decided when it started.
    in_flight_keys: HashMap<u64, Key>,
    finished: VecDeque<Arc<Transfer>>,
    next_id: u64,
    /// Requests held by open sessions, against `max_total_requests`.
    pub(super) held_requests: usize,
    /// Requests held by finished transfers, against `max_total_requests` too.
    pub(super) finished_requests: usize,
    /// Manifests seen pushed or fetched, for pulls that only ask `HEAD`.
    known: KnownManifests,
    /// Token requests of a client for a repository it has no transfer of yet, waiting for one.
    held_tokens: HashMap<(IpAddr, Arc<str>), Vec<ExchangeRecord>>,
}

impl State {
    /// Keeps a token request that no open transfer claims, for the transfer its client starts
    /// next on that repository; bounded like everything else.
    fn hold_token_request(&mut self, record: ExchangeRecord) {
        const CLIENTS: usize = 1024;
        const PER_CLIENT: usize = 8;
        let (Operation::AuthToken, Some(repository)) = (record.operation, record.repository.clone()) else { return };
        if self.held_tokens.len() >= CLIENTS {
            self.held_tokens.clear();
        }
        let held = self.held_tokens.entry((record.client.ip(), repository)).or_default();
        if held.len() < PER_CLIENT {
            held.push(record);
        }
    }

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
    /// Where finished transfers go as traces, when traces are on.
    exporter: Option<Arc<Exporter>>,
}

impl Tracker {
    pub(crate) fn new(config: TrackerConfig, metrics: Arc<Metrics>) -> Self {
        Tracker {
            state: Mutex::new(State::default()),
            manifests: ParsedManifests::new(),
            config,
            metrics,
            exporter: None,
        }
    }

    /// Exports every finished transfer as a trace through `exporter`.
    pub(crate) fn with_exporter(mut self, exporter: Option<Arc<Exporter>>) -> Self {
        self.exporter = exporter;
        self
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
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

    /// Closes pulls that have settled and sessions idle for longer than the idle timeout.
    /// Called periodically.
    pub(crate) fn sweep(&self, now: Instant) {
        let (idle, settle) = (self.config.idle_timeout, self.config.pull_settle);
        let over: Vec<(Key, Session, bool)> = {
            let mut state = self.lock();
            let keys: Vec<(Key, bool)> = state
                .open
                .iter()
                .filter(|(_, s)| s.in_flight.is_empty())
                .filter_map(|(k, s)| {
                    let quiet = now.saturating_duration_since(s.last_activity);
                    let settled = s.settles_after(k, settle).is_some_and(|after| quiet >= after);
                    (settled || quiet >= idle).then(|| (k.clone(), settled))
                })
                .collect();
            keys.into_iter()
                .filter_map(|(k, settled)| {
                    let mut session = state.remove(&k)?;
                    if settled {
                        let failed = session.request_failed;
                        session.outcome.get_or_insert(if failed { Outcome::Failed } else { Outcome::Complete });
                    }
                    Some((k, session, !settled))
                })
                .collect()
        };
        for (key, session, idle_closed) in over {
            self.finish(key, session, idle_closed);
        }
    }

    /// Closes every open session as `incomplete`: regscope is stopping, and what it saw of them
    /// is recorded and logged like any other transfer rather than lost.
    pub(crate) fn close_all(&self) {
        let open: Vec<(Key, Session)> = {
            let mut state = self.lock();
            let keys: Vec<Key> = state.open.keys().cloned().collect();
            keys.into_iter().filter_map(|k| state.remove(&k).map(|s| (k, s))).collect()
        };
        for (key, mut session) in open {
            session.outcome = Some(Outcome::Incomplete);
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
        // A token request belongs to whichever transfer of its repository its client has open
        // (the request the registry challenged opened it); the most recently active one.
        if op == Operation::AuthToken {
            let repository = repository?;
            let keys =
                TransferDirection::ALL.map(|direction| Key { client, repository: repository.clone(), direction });
            return keys.into_iter().filter(|k| state.open.contains_key(k)).max_by_key(|k| state.open[k].last_activity);
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
        let mut session = Session::new(api, now);
        // Token requests made before the transfer's first request (clients fetch the token for a
        // repository's scope ahead of using it) are its first requests.
        if let Some(held) = state.held_tokens.remove(&(key.client, key.repository.clone())) {
            for record in held.into_iter().filter(|r| now.saturating_duration_since(r.ended) < self.config.idle_timeout)
            {
                session.base = session.base.min(record.received);
                session.records.push(record);
                state.held_requests += 1;
            }
        }
        state.open.insert(key.clone(), session);
        evicted
    }

    /// Turns a closed session into a finished transfer: metrics, log, ring.
    fn finish(&self, key: Key, session: Session, idle_closed: bool) {
        let trace_id = session.trace_id;
        let mut transfer = build_transfer(&key, session, idle_closed);
        if self.exporter.is_some() {
            transfer.trace_id = Some(trace_id);
        }
        publish(&self.metrics, &transfer);
        let mut state = self.lock();
        state.next_id += 1;
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
        let transfer = Arc::new(transfer);
        state.finished.push_back(transfer.clone());
        drop(state);
        if let Some(exporter) = &self.exporter {
            exporter.enqueue(transfer);
        }
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
            if r.trace.is_some() {
                exchange.set_transfer_trace(session.trace_id);
            }
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
                    None => {
                        state.hold_token_request(record);
                        return;
                    }
                },
            };
            evicted = self.open_session(state, &key, record.api, now);
            if let (Some(refs), Some(200..=299)) = (&parsed_manifest, record.status) {
                if let Some(digest) = manifest_digest(&record) {
                    state.known.remember(digest, refs.clone());
                }
            }
            let session = state.open.get_mut(&key).expect("open_session leaves it open");
            session.in_flight.remove(&record.id);
            session.last_activity = now;
            session.base = session.base.min(record.received);
            update(session, &record, parsed_manifest, ancestry, &state.known);
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
    let shortest = tracker.config.idle_timeout.min(tracker.config.pull_settle);
    let period = (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(tracker) = weak.upgrade() else { return };
            tracker.sweep(Instant::now());
        }
    });
}
