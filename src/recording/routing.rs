//! The tracker's tables, and which of them each request goes to: the pools of requests no
//! manifest has claimed, the images manifests opened, and the claim that moves requests from one
//! to the other. See the tracker's module docs for the rules.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::time::Instant;

use super::claims::{pull_claims, push_claims, take};
use super::manifests::{manifest_digest, KnownManifests};
use super::model::Transfer;
use super::session::{direction_of, expect, is_v1_image_op, request_failed, Image, Key, Session, Want};
use super::tracker::TrackerConfig;
use super::HashMap;
use crate::body::ExchangeRecord;
use crate::protocol::{Api, ManifestRefs, Operation, TransferDirection};
use crate::traces::TraceId;

#[derive(Default)]
pub(super) struct State {
    /// Pools: requests no manifest has claimed, per (client, repository, direction).
    pub(super) open: HashMap<Key, Session>,
    /// Images a manifest opened that are not over yet.
    pub(super) images: Vec<Image>,
    pub(super) next_slot: u64,
    /// The v1 repository (and direction) each client is working on.
    pub(super) v1_current: HashMap<IpAddr, (Arc<str>, TransferDirection)>,
    /// Where each in-flight exchange was counted when it started: its pool, or an image's slot.
    pub(super) in_flight_keys: HashMap<u64, (Key, Option<u64>)>,
    pub(super) finished: VecDeque<Arc<Transfer>>,
    pub(super) next_id: u64,
    /// Requests held by open sessions, against `max_total_requests`.
    pub(super) held_requests: usize,
    /// Requests held by finished transfers, against `max_total_requests` too.
    pub(super) finished_requests: usize,
    /// Manifests seen pushed or fetched, for pulls that only ask `HEAD`.
    pub(super) known: KnownManifests,
    /// Token requests of a client for a repository it has no transfer of yet, waiting for one.
    pub(super) held_tokens: HashMap<(IpAddr, Arc<str>), Vec<ExchangeRecord>>,
}

impl State {
    /// Keeps a token request that no open transfer claims, for the transfer its client starts
    /// next on that repository; bounded like everything else.
    pub(super) fn hold_token_request(&mut self, record: ExchangeRecord) {
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
    pub(super) fn remove(&mut self, key: &Key) -> Option<Session> {
        let session = self.open.remove(key)?;
        self.held_requests -= session.records.len();
        Some(session)
    }

    /// Closes an image, giving back the requests it held.
    pub(super) fn remove_image(&mut self, index: usize) -> (Key, Session) {
        let image = self.images.swap_remove(index);
        self.held_requests -= image.session.records.len();
        (image.key, image.session)
    }

    pub(super) fn image_of_slot(&self, slot: u64) -> Option<usize> {
        self.images.iter().position(|i| i.slot == slot)
    }

    /// Drops a pool that holds nothing a transfer would show: every request of it was claimed,
    /// or all it has left are token requests.
    pub(super) fn drop_if_hollow(&mut self, key: &Key) {
        let hollow = self.open.get(key).is_some_and(|pool| pool.in_flight.is_empty() && pool.hollow());
        if hollow {
            self.remove(key);
        }
    }

    /// The open image a v2 pull request belongs to, if one claims it: a manifest by digest that
    /// an image names, a tag an image resolved, or a blob an image's manifest names.
    pub(super) fn pull_image_for(&self, key: &Key, r: &ExchangeRecord) -> Option<usize> {
        // Storage requests (a redirect followed) count as v2: only v1 has no manifest.
        if r.api == Api::V1 || key.direction != TransferDirection::Pull {
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
                (want > Want::No).then_some(n)
            }
            _ => None,
        }
    }

    /// The most recently active image of `key`.
    pub(super) fn latest_image(&self, key: &Key) -> Option<usize> {
        let ours = self.images.iter().enumerate().filter(|(_, i)| i.key == *key);
        ours.max_by_key(|(_, i)| i.session.last_activity).map(|(n, _)| n)
    }

    /// Decides which session a request belongs to (and, for v1, which repository).
    pub(super) fn key_for(&mut self, r: &ExchangeRecord) -> Option<Key> {
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
            if self.v1_current.len() >= 4096 {
                self.v1_current.clear();
            }
            self.v1_current.insert(client, (repo, direction));
        }
        // A token request belongs to whichever transfer of its repository its client has open
        // (the request the registry challenged opened it); the most recently active one.
        if op == Operation::AuthToken {
            let repository = repository?;
            let keys =
                TransferDirection::ALL.map(|direction| Key { client, repository: repository.clone(), direction });
            let activity = |k: &Key| {
                let pool = self.open.get(k).map(|s| s.last_activity);
                let images = self.images.iter().filter(|i| i.key == *k).map(|i| i.session.last_activity);
                pool.into_iter().chain(images).max()
            };
            return keys
                .into_iter()
                .filter_map(|k| activity(&k).map(|at| (k, at)))
                .max_by_key(|&(_, at)| at)
                .map(|(k, _)| k);
        }
        if is_v1_image_op(op) {
            let (repo, current) = self.v1_current.get(&client)?;
            // An image json GET is an existence check in a push, a fetch in a pull.
            let direction = if op == Operation::V1ImageJsonGet { *current } else { direction_of(op)? };
            return Some(Key { client, repository: repo.clone(), direction });
        }
        let direction = direction_of(op)?;
        Some(Key { client, repository: repository?, direction })
    }

    /// Makes sure `key` has an open session, closing the longest-idle one if the table is full
    /// (returned, to be finished outside the lock).
    pub(super) fn open_session(
        &mut self,
        config: &TrackerConfig,
        key: &Key,
        api: Api,
        now: Instant,
    ) -> Option<(Key, Session)> {
        if self.open.contains_key(key) {
            return None;
        }
        let mut evicted = None;
        if self.open.len() >= config.max_open {
            if let Some(oldest) = self
                .open
                .iter()
                .filter(|(_, s)| s.in_flight.is_empty())
                .min_by_key(|(_, s)| s.last_activity)
                .map(|(k, _)| k.clone())
            {
                evicted = self.remove(&oldest).map(|s| (oldest, s));
            }
        }
        let mut session = Session::new(api, now);
        // Token requests made before the transfer's first request (clients fetch the token for a
        // repository's scope ahead of using it) are its first requests.
        if let Some(held) = self.held_tokens.remove(&(key.client, key.repository.clone())) {
            for record in held.into_iter().filter(|r| now.saturating_duration_since(r.ended) < config.idle_timeout) {
                session.base = session.base.min(record.received);
                session.records.push(record);
                self.held_requests += 1;
            }
        }
        self.open.insert(key.clone(), session);
        evicted
    }

    /// Where a finished request that no image counted on the wire goes.
    pub(super) fn target(&self, key: &Key, r: &ExchangeRecord, parsed: bool) -> Target {
        use Operation::*;
        if r.api == Api::V1 {
            return Target::Pool;
        }
        let ok = r.status.is_some_and(|c| (200..300).contains(&c)) && r.aborted_by().is_none();
        match (key.direction, r.operation) {
            (TransferDirection::Push, ManifestPut) if parsed => Target::NewImage,
            (TransferDirection::Pull, ManifestGet | ManifestHead) => match self.pull_image_for(key, r) {
                Some(n) => Target::Image(n),
                None if ok => Target::NewImage,
                None => Target::Pool,
            },
            (TransferDirection::Pull, BlobGet | StorageGet | StorageHead) => {
                self.pull_image_for(key, r).map_or(Target::Pool, Target::Image)
            }
            (_, AuthToken) if !self.open.contains_key(key) => {
                self.latest_image(key).map_or(Target::Pool, Target::Image)
            }
            _ => Target::Pool,
        }
    }

    /// Opens the image the manifest request `r` names, claiming its requests from the pool (and,
    /// for a pushed index, the platform manifests pushed before it). Returns its index, and an
    /// image evicted to make room (to be finished outside the lock).
    pub(super) fn open_image(
        &mut self,
        config: &TrackerConfig,
        key: &Key,
        r: &ExchangeRecord,
        parsed: Option<&Arc<ManifestRefs>>,
        now: Instant,
    ) -> (usize, Option<(Key, Session)>) {
        let digest = manifest_digest(r);
        let refs = parsed.cloned().or_else(|| digest.and_then(|d| self.known.get(d)).cloned());
        let mut session = Session::new(r.api, now);
        let manifests: Vec<Box<str>> = digest.map(Box::from).into_iter().collect();
        if let Some(pool) = self.open.get_mut(key) {
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
            for n in (0..self.images.len()).rev() {
                let child = &self.images[n];
                let named = child.manifests.first().is_some_and(|m| refs.manifests.iter().any(|c| **c == **m));
                if child.key == *key && named {
                    // Its requests move with it: the count held stays the same.
                    let child = self.images.swap_remove(n);
                    expect(&mut session, &child.session.expected);
                    session.records.extend(child.session.records);
                    session.dropped += child.session.dropped;
                    session.request_failed |= child.session.request_failed;
                    session.in_flight.extend(child.session.in_flight);
                }
            }
        }
        session.base = session.records.iter().map(|r| r.received).fold(r.received, Instant::min);
        let mut evicted = None;
        if self.images.len() >= config.max_open {
            let idle = self.images.iter().enumerate().filter(|(_, i)| i.session.in_flight.is_empty());
            if let Some(oldest) = idle.min_by_key(|(_, i)| i.session.last_activity).map(|(n, _)| n) {
                evicted = Some(self.remove_image(oldest));
            }
        }
        self.next_slot += 1;
        let mut image = Image { key: key.clone(), session, manifests, slot: self.next_slot };
        if let Some(refs) = &refs {
            image.adopt_manifests(&refs.manifests);
        }
        self.images.push(image);
        (self.images.len() - 1, evicted)
    }
}

/// Where a finished request goes.
pub(super) enum Target {
    Pool,
    Image(usize),
    /// A manifest that opens an image of its own (a push's `PUT`, a pull's first answer).
    NewImage,
}

/// Concurrent transfers of one repository from one client, on scripted requests.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::body::ExchangeSink;
    use crate::protocol::Outcome;
    use crate::recording::tests::{blob_get, manifest_body, manifest_get, manifest_put, outcomes, tracker, upload};
    use crate::recording::{BlobOutcome, TrackerConfig};

    #[tokio::test(start_paused = true)]
    async fn concurrent_pushes_to_one_repository_are_one_transfer_each() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut a = upload(1, "team/app", at(0.0), "sha256:a1", 1000);
        a.extend(upload(4, "team/app", at(0.1), "sha256:ca", 7));
        // B's layer is still uploading when A's manifest arrives: only its POST is over.
        let mut b = upload(11, "team/app", at(0.05), "sha256:b1", 2000);
        let b_rest = b.split_off(1);
        // Both name the base layer `s`; A uploaded it.
        a.extend(upload(21, "team/app", at(0.2), "sha256:s", 500));
        for r in b.into_iter().chain(a) {
            t.finished(r);
        }
        t.finished(manifest_put(
            30,
            "team/app",
            at(0.5),
            "a",
            "sha256:ma",
            manifest_body("sha256:ca", &["sha256:s", "sha256:a1"]),
        ));
        let done = t.recent(10);
        assert_eq!(done.len(), 1, "A is over; B is not");
        for r in b_rest {
            t.finished(r);
        }
        for r in upload(40, "team/app", at(0.7), "sha256:cb", 9) {
            t.finished(r);
        }
        t.finished(manifest_put(
            50,
            "team/app",
            at(0.9),
            "b",
            "sha256:mb",
            manifest_body("sha256:cb", &["sha256:s", "sha256:b1"]),
        ));
        let done = t.recent(10);
        assert_eq!(done.len(), 2);
        assert!(t.lock().open.is_empty() && t.lock().images.is_empty(), "nothing left open");
        assert_eq!(t.lock().held_requests, 0, "claimed requests are counted once");
        let (b, a) = (&done[0], &done[1]);
        assert_eq!((a.tag.as_deref(), a.outcome, a.bytes), (Some("a"), Outcome::Complete, 1507));
        assert_eq!(
            outcomes(a),
            [
                ("sha256:a1".into(), BlobOutcome::Committed, 1000, Some(200)),
                ("sha256:ca".into(), BlobOutcome::Committed, 7, Some(7)),
                ("sha256:s".into(), BlobOutcome::Committed, 500, Some(100)),
            ]
        );
        assert_eq!((b.tag.as_deref(), b.outcome, b.bytes), (Some("b"), Outcome::Complete, 2009));
        assert_eq!(
            outcomes(b),
            [
                ("sha256:b1".into(), BlobOutcome::Committed, 2000, Some(200)),
                ("sha256:cb".into(), BlobOutcome::Committed, 9, Some(7)),
                ("sha256:s".into(), BlobOutcome::Present, 0, Some(100)),
            ]
        );
        assert!(
            b.wall_seconds < 0.95 && b.wall_seconds > 0.85,
            "B starts at its own first request: {}",
            b.wall_seconds
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_platform_push_is_one_transfer() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        for (n, platform) in ["amd64", "arm64"].iter().enumerate() {
            let id = 100 * (n as u64 + 1);
            let (layer, config, digest) =
                (format!("sha256:l-{platform}"), format!("sha256:c-{platform}"), format!("sha256:m-{platform}"));
            for r in upload(id, "team/app", at(n as f64), &layer, 100).into_iter().chain(upload(
                id + 3,
                "team/app",
                at(n as f64),
                &config,
                5,
            )) {
                t.finished(r);
            }
            t.finished(manifest_put(
                id + 10,
                "team/app",
                at(n as f64 + 0.5),
                &digest,
                &digest,
                manifest_body(&config, &[&layer]),
            ));
            assert!(t.recent(10).is_empty(), "a platform manifest by digest waits for its index");
        }
        let index = br#"{"manifests":[{"digest":"sha256:m-amd64","size":1},{"digest":"sha256:m-arm64","size":1}]}"#;
        t.finished(manifest_put(300, "team/app", at(2.0), "multi", "sha256:idx", index.to_vec()));
        let done = t.recent(10);
        assert_eq!(done.len(), 1, "one push");
        let push = &done[0];
        assert_eq!(
            (push.tag.as_deref(), push.outcome, push.bytes, push.blobs.len()),
            (Some("multi"), Outcome::Complete, 210, 4)
        );
        assert_eq!(push.requests.len(), 15, "every upload and all three manifests");
        assert_eq!(t.lock().held_requests, 0, "merged requests are counted once");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_pulls_of_one_repository_are_one_transfer_each() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        t.finished(manifest_get(1, "team/app", at(0.0), "a", "sha256:ma", manifest_body("sha256:ca", &["sha256:a1"])));
        t.finished(manifest_get(
            2,
            "team/app",
            at(0.0),
            "b",
            "sha256:mb",
            manifest_body("sha256:cb", &["sha256:b1", "sha256:b2"]),
        ));
        t.finished(blob_get(3, "team/app", at(0.1), "sha256:cb", 7));
        t.finished(blob_get(4, "team/app", at(0.1), "sha256:ca", 7));
        t.finished(blob_get(5, "team/app", at(0.2), "sha256:b1", 100));
        t.finished(blob_get(6, "team/app", at(0.2), "sha256:a1", 100));
        let done = t.recent(10);
        assert_eq!(done.len(), 1, "A has all it names; B still lacks a layer");
        assert_eq!((done[0].tag.as_deref(), done[0].bytes, done[0].outcome), (Some("a"), 107, Outcome::Complete));
        t.finished(blob_get(7, "team/app", at(0.3), "sha256:b2", 200));
        let done = t.recent(10);
        assert_eq!(done.len(), 2);
        assert_eq!((done[0].tag.as_deref(), done[0].bytes, done[0].outcome), (Some("b"), 307, Outcome::Complete));
        assert_eq!(outcomes(&done[0]).len(), 3);
    }
}
