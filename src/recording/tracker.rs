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

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::claims::{pull_claims, push_claims, take};
use super::manifests::{manifest_digest, KnownManifests};
use super::model::{LiveTransfer, Transfer};
use super::publish::publish;
use super::results::build_transfer;
use super::session::{direction_of, expect, is_v1_image_op, request_failed, update, Image, Key, Session};
use super::HashMap;
use crate::body::{Exchange, ExchangeRecord, ExchangeSink};
use crate::metrics::Metrics;
use crate::protocol::{parse_ancestry, Api, ManifestRefs, Operation, Outcome, ParsedManifests, TransferDirection};
use crate::traces::{Exporter, TraceId};

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
    /// Pools: requests no manifest has claimed, per (client, repository, direction).
    pub(super) open: HashMap<Key, Session>,
    /// Images a manifest opened that are not over yet.
    pub(super) images: Vec<Image>,
    next_slot: u64,
    /// The v1 repository (and direction) each client is working on.
    v1_current: HashMap<IpAddr, (Arc<str>, TransferDirection)>,
    /// Where each in-flight exchange was counted when it started: its pool, or an image's slot.
    in_flight_keys: HashMap<u64, (Key, Option<u64>)>,
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

    /// Closes an image, giving back the requests it held.
    fn remove_image(&mut self, index: usize) -> (Key, Session) {
        let image = self.images.swap_remove(index);
        self.held_requests -= image.session.records.len();
        (image.key, image.session)
    }

    fn image_of_slot(&self, slot: u64) -> Option<usize> {
        self.images.iter().position(|i| i.slot == slot)
    }

    /// Drops a pool that holds nothing a transfer would show: every request of it was claimed,
    /// or all it has left are token requests.
    fn drop_if_hollow(&mut self, key: &Key) {
        let hollow = self.open.get(key).is_some_and(|pool| pool.in_flight.is_empty() && pool.hollow());
        if hollow {
            self.remove(key);
        }
    }

    /// The open image a v2 pull request belongs to, if one claims it: a manifest by digest that
    /// an image names, a tag an image resolved, or a blob an image's manifest names.
    fn pull_image_for(&self, key: &Key, r: &ExchangeRecord) -> Option<usize> {
        if r.api != Api::V2 || key.direction != TransferDirection::Pull {
            return None;
        }
        let ours = self.images.iter().enumerate().filter(|(_, i)| i.key == *key);
        match r.operation {
            Operation::ManifestGet | Operation::ManifestHead => {
                let reference = r.reference.as_deref()?;
                let digest = r.response_info.content_digest.as_deref();
                ours.filter(|(_, i)| i.answers_to(reference, digest)).map(|(n, _)| n).next()
            }
            Operation::BlobGet | Operation::StorageGet | Operation::StorageHead => {
                let digest = r.digest.as_deref()?;
                // The first image that still needs it, else one that has it, else a candidate.
                let (n, want) = ours.map(|(n, i)| (n, i.wants_blob(digest))).rev().max_by_key(|&(_, w)| w)?;
                (want > 0).then_some(n)
            }
            _ => None,
        }
    }

    /// The most recently active image of `key`.
    fn latest_image(&self, key: &Key) -> Option<usize> {
        let ours = self.images.iter().enumerate().filter(|(_, i)| i.key == *key);
        ours.max_by_key(|(_, i)| i.session.last_activity).map(|(n, _)| n)
    }
}

/// Where a finished request goes.
enum Target {
    Pool,
    Image(usize),
    /// A manifest that opens an image of its own (a push's `PUT`, a pull's first answer).
    NewImage,
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
                let failed = session.request_failed;
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
            let activity = |k: &Key| {
                let pool = state.open.get(k).map(|s| s.last_activity);
                let images = state.images.iter().filter(|i| i.key == *k).map(|i| i.session.last_activity);
                pool.into_iter().chain(images).max()
            };
            return keys
                .into_iter()
                .filter_map(|k| activity(&k).map(|at| (k, at)))
                .max_by_key(|&(_, at)| at)
                .map(|(k, _)| k);
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

impl Tracker {
    /// Where a finished request that no image counted on the wire goes.
    fn target(state: &State, key: &Key, r: &ExchangeRecord, parsed: bool) -> Target {
        use Operation::*;
        if r.api != Api::V2 {
            return Target::Pool;
        }
        let ok = r.status.is_some_and(|c| (200..300).contains(&c)) && r.aborted_by().is_none();
        match (key.direction, r.operation) {
            (TransferDirection::Push, ManifestPut) if parsed => Target::NewImage,
            (TransferDirection::Pull, ManifestGet | ManifestHead) => match state.pull_image_for(key, r) {
                Some(n) => Target::Image(n),
                None if ok => Target::NewImage,
                None => Target::Pool,
            },
            (TransferDirection::Pull, BlobGet | StorageGet | StorageHead) => {
                state.pull_image_for(key, r).map_or(Target::Pool, Target::Image)
            }
            (_, AuthToken) if !state.open.contains_key(key) => {
                state.latest_image(key).map_or(Target::Pool, Target::Image)
            }
            _ => Target::Pool,
        }
    }

    /// Opens the image the manifest request `r` names, claiming its requests from the pool (and,
    /// for a pushed index, the platform manifests pushed before it). Returns its index, and an
    /// image evicted to make room (to be finished outside the lock).
    fn open_image(
        &self,
        state: &mut State,
        key: &Key,
        r: &ExchangeRecord,
        parsed: Option<&Arc<ManifestRefs>>,
        now: Instant,
    ) -> (usize, Option<(Key, Session)>) {
        let digest = manifest_digest(r);
        let refs = parsed.cloned().or_else(|| digest.and_then(|d| state.known.get(d)).cloned());
        let mut session = Session::new(r.api, now);
        let mut manifests: Vec<Box<str>> = digest.map(Box::from).into_iter().collect();
        if let Some(refs) = &refs {
            manifests.extend(refs.manifests.iter().map(|m| Box::from(m.as_str())));
        }
        if let Some(pool) = state.open.get_mut(key) {
            // The requests before the manifest were sent on the pool's trace: its first image
            // takes it over.
            session.trace_id = std::mem::replace(&mut pool.trace_id, TraceId::random());
            let wants = |d: &str| refs.as_ref().is_some_and(|refs| refs.blobs.iter().any(|b| b.digest == d));
            let claims = match key.direction {
                TransferDirection::Push => push_claims(&pool.records, wants),
                TransferDirection::Pull => pull_claims(&pool.records, wants),
            };
            session.records = take(&mut pool.records, &claims);
            pool.request_failed = pool.records.iter().any(request_failed);
            pool.base = pool.records.iter().map(|r| r.received).min().unwrap_or(pool.base);
        }
        session.request_failed = session.records.iter().any(request_failed);
        if let (TransferDirection::Push, Some(refs)) = (key.direction, &refs) {
            for n in (0..state.images.len()).rev() {
                let child = &state.images[n];
                let named = child.manifests.first().is_some_and(|m| refs.manifests.iter().any(|c| **c == **m));
                if child.key == *key && named {
                    // Its requests move with it: the count held stays the same.
                    let child = state.images.swap_remove(n);
                    expect(&mut session, &child.session.expected);
                    session.records.extend(child.session.records);
                    session.dropped += child.session.dropped;
                    session.request_failed |= child.session.request_failed;
                    session.in_flight.extend(child.session.in_flight);
                    manifests.extend(child.manifests);
                }
            }
        }
        session.base = session.records.iter().map(|r| r.received).fold(r.received, Instant::min);
        let mut evicted = None;
        if state.images.len() >= self.config.max_open {
            let idle = state.images.iter().enumerate().filter(|(_, i)| i.session.in_flight.is_empty());
            if let Some(oldest) = idle.min_by_key(|(_, i)| i.session.last_activity).map(|(n, _)| n) {
                evicted = Some(state.remove_image(oldest));
            }
        }
        state.held_requests += session.records.len();
        state.next_slot += 1;
        state.images.push(Image { key: key.clone(), session, manifests, slot: state.next_slot });
        (state.images.len() - 1, evicted)
    }
}

impl ExchangeSink for Tracker {
    fn started(&self, exchange: &Arc<Exchange>) {
        let r = exchange.info();
        let now = Instant::now();
        let evicted = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(key) = Self::key_for(state, r) else { return };
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
                    let evicted = self.open_session(state, &key, r.api, now);
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
                None => match Self::key_for(state, &record) {
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
                None => Self::target(state, &key, &record, parsed_manifest.is_some()),
            };
            let image = match target {
                Target::Pool => {
                    let evicted = self.open_session(state, &key, record.api, now);
                    over.extend(evicted.map(|(key, session)| (key, session, true)));
                    None
                }
                Target::Image(n) => Some(n),
                Target::NewImage => {
                    let (n, evicted) = self.open_image(state, &key, &record, parsed_manifest.as_ref(), now);
                    over.extend(evicted.map(|(key, session)| (key, session, true)));
                    Some(n)
                }
            };
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
            // A pool whose requests a manifest claimed closes quietly.
            if image.is_some() {
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
