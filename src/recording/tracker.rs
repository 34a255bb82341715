//! The transfer tracker: grouping requests into sessions, closing them, and keeping a bounded
//! ring of finished transfers.
//!
//! A v2 transfer is an image: a push is its manifest `PUT` and the requests of the blobs that
//! manifest names, a pull its manifest `GET` or `HEAD` and the fetches of the blobs it names.
//! Requests no manifest has claimed yet wait in a pool per (client address, repository,
//! direction), which `claims` takes them from; so concurrent pushes and pulls of one repository
//! from one client stay apart. Platform manifests pushed by digest wait as images of their own
//! until the index that names them claims them: a multi-platform push is one transfer. `session`
//! says when each is over. What no manifest claims (and every v1 transfer, which has no
//! manifest) ends as the pool's own transfer: when `session` says so, or after `idle_timeout`
//! with no request in flight, as `incomplete` (or `failed` if a request was cut off). v1 image
//! requests carry no repository, so they join the v1 session their client opened last.
//!
//! Memory is bounded whatever clients do: open sessions, requests per session, and finished
//! transfers are all capped.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::manifests::manifest_digest;
use super::model::{LiveTransfer, Transfer};
use super::publish::publish;
use super::results::build_transfer;
use super::routing::{State, Target};
use super::session::{update, Key, Session};
use crate::body::{Exchange, ExchangeRecord, ExchangeSink};
use crate::metrics::Metrics;
use crate::protocol::{parse_ancestry, Operation, Outcome, ParsedManifests};
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
        let pools = state.open.iter().filter(|(_, s)| !s.records.is_empty() || !s.in_flight.is_empty());
        let mut live: Vec<LiveTransfer> = pools.map(|(key, s)| s.live(key, now)).collect();
        live.extend(state.images.iter().map(|i| i.session.live(&i.key, now)));
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
        // Whether a session is over, and if so whether it settled (rather than went idle).
        let over_now = |key: &Key, s: &Session| {
            if !s.in_flight.is_empty() {
                return None;
            }
            let quiet = now.saturating_duration_since(s.last_activity);
            let settled = s.settles_after(key, settle).is_some_and(|after| quiet >= after);
            (settled || quiet >= idle).then_some(settled)
        };
        let over: Vec<(Key, Session, bool)> = {
            let mut state = self.lock();
            let mut over = Vec::new();
            let pools: Vec<Key> = state.open.keys().cloned().collect();
            for key in pools {
                if let Some(settled) = state.open.get(&key).and_then(|s| over_now(&key, s)) {
                    let session = state.remove(&key).expect("looked up above");
                    if !session.hollow() {
                        over.push((key, session, settled));
                    }
                }
            }
            for n in (0..state.images.len()).rev() {
                let image = &state.images[n];
                if let Some(settled) = over_now(&image.key, &image.session) {
                    let (key, session) = state.remove_image(n);
                    over.push((key, session, settled));
                }
            }
            over
        };
        for (key, mut session, settled) in over {
            if settled {
                let failed = session.failed_so_far();
                session.outcome.get_or_insert(if failed { Outcome::Failed } else { Outcome::Complete });
            }
            self.finish(key, session, !settled);
        }
    }

    /// Closes every open session as `incomplete`: regscope is stopping, and what it saw of them
    /// is recorded and logged like any other transfer rather than lost.
    pub(crate) fn close_all(&self) {
        let open: Vec<(Key, Session)> = {
            let mut state = self.lock();
            let keys: Vec<Key> = state.open.keys().cloned().collect();
            for key in &keys {
                state.drop_if_hollow(key);
            }
            let mut open: Vec<(Key, Session)> =
                keys.into_iter().filter_map(|k| state.remove(&k).map(|s| (k, s))).collect();
            while !state.images.is_empty() {
                open.push(state.remove_image(0));
            }
            open
        };
        for (key, mut session) in open {
            session.outcome = Some(Outcome::Incomplete);
            self.finish(key, session, true);
        }
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
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(key) = state.key_for(r) else { return };
            let image = match r.operation {
                Operation::AuthToken if !state.open.contains_key(&key) => state.latest_image(&key),
                _ => state.pull_image_for(&key, r),
            };
            let (session, slot, evicted) = match image {
                Some(n) => {
                    let image = &mut state.images[n];
                    (&mut image.session, Some(image.slot), None)
                }
                None => {
                    let evicted = state.open_session(&self.config, &key, r.api, now);
                    (state.open.get_mut(&key).expect("open_session leaves it open"), None, evicted)
                }
            };
            session.in_flight.insert(r.id, Arc::downgrade(exchange));
            if r.trace.is_some() {
                exchange.set_transfer_trace(session.trace_id);
            }
            session.last_activity = now;
            state.in_flight_keys.insert(r.id, (key, slot));
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
        // Sessions over (evicted ones marked idle-closed), finished outside the lock.
        let mut over: Vec<(Key, Session, bool)> = Vec::new();
        {
            let mut guard = self.lock();
            // Through a plain reference, so the session and the counters are borrowed apart.
            let state = &mut *guard;
            let (key, slot) = match state.in_flight_keys.remove(&record.id) {
                Some(found) => found,
                None => match state.key_for(&record) {
                    Some(key) => (key, None),
                    None => {
                        state.hold_token_request(record);
                        return;
                    }
                },
            };
            // It is no longer on the wire, wherever it was counted.
            let counted_in = slot.and_then(|slot| state.image_of_slot(slot));
            match counted_in {
                Some(n) => {
                    state.images[n].session.in_flight.remove(&record.id);
                }
                None => {
                    if let Some(pool) = state.open.get_mut(&key) {
                        pool.in_flight.remove(&record.id);
                    }
                }
            }
            if let (Some(refs), Some(200..=299)) = (&parsed_manifest, record.status) {
                if let Some(digest) = manifest_digest(&record) {
                    state.known.remember(digest, refs.clone());
                }
            }
            let target = match counted_in {
                Some(n) => Target::Image(n),
                None => state.target(&key, &record, parsed_manifest.is_some()),
            };
            let image = match target {
                Target::Pool => {
                    let evicted = state.open_session(&self.config, &key, record.api, now);
                    over.extend(evicted.map(|(key, session)| (key, session, true)));
                    None
                }
                Target::Image(n) => Some(n),
                Target::NewImage => {
                    let (n, evicted) = state.open_image(&self.config, &key, &record, parsed_manifest.as_ref(), now);
                    over.extend(evicted.map(|(key, session)| (key, session, true)));
                    Some(n)
                }
            };
            if let (Some(n), Some(refs)) = (image, &parsed_manifest) {
                // An index fetched by digest after a `HEAD` by tag: its platform manifests are this image's.
                state.images[n].adopt_manifests(&refs.manifests);
            }
            let session = match image {
                Some(n) => &mut state.images[n].session,
                None => state.open.get_mut(&key).expect("open_session leaves it open"),
            };
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
            if session.outcome.is_some() && session.in_flight.is_empty() {
                match image {
                    Some(n) => {
                        let (key, session) = state.remove_image(n);
                        over.push((key, session, false));
                    }
                    None => over.extend(state.remove(&key).map(|session| (key.clone(), session, false))),
                }
            }
            // A pool whose requests a manifest claimed (or that the request left for an image)
            // closes quietly; a request counted in an image on the wire left no pool behind.
            if image.is_some() && counted_in.is_none() {
                state.drop_if_hollow(&key);
            }
        }
        for (key, session, idle_closed) in over {
            self.finish(key, session, idle_closed);
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
