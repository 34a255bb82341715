//! Upload and download admission: how many blob bodies stream through at once.
//!
//! An upload streaming through holds its client connection's grown read buffer, an upstream
//! connection with its buffers, and the frames on their way between the two; one that has not
//! started holds only its client connection's first buffers and its task, a fraction of that. So
//! at most `--upload-slots` bodies stream at a time and the others wait unread, their bytes in
//! the kernel's socket buffers as behind any busy server; the crowd moves as fast (a few cores
//! move bytes as fast for dozens of streams as for a thousand) in a fraction of the memory.
//! Starting an upload takes a slot too (see [`needs_slot`]). Measurements: `docs/design.md`.
//!
//! A slot is for moving bytes, not for waiting: the slot of a holder that has moved nothing for
//! [`STALL`] (its client stopped sending, or the registry stopped reading) goes to the first
//! waiter, and that holder carries on without one. A new waiter looks on arrival; while any
//! wait, one task looks every [`LOOK_EVERY`] for all of them (a thousand waiters each looking
//! would cost more CPU than the uploads they wait for). So a stalled client holds nobody up for
//! much longer than that; a slow one that keeps sending keeps its slot.
//!
//! Blob downloads have slots of their own (`--download-slots`), taken before the GET is forwarded
//! and held by the response body until it ends: a streaming download holds an upstream
//! connection's buffers and the frames between the two, a waiting one only its client
//! connection's. A holder's bytes are then what it sent to its client.
//!
//! A wait is regscope's own time: counted in `regscope_upload_admission_wait_seconds` (and
//! `regscope_download_admission_wait_seconds`), and in a transfer's timeline it is the request's
//! turnaround before it is forwarded.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{Histogram, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::Exchange;
use crate::metrics::{Counted, Metrics};
use crate::protocol::{Direction, Operation};

/// How long a holder may move nothing before a waiter takes its slot.
pub(crate) const STALL: Duration = Duration::from_secs(1);

/// How often a stalled holder is looked for while anyone waits: a holder is seen stalled at
/// most this long after [`STALL`].
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Bodies that declare at most this many bytes need no slot (manifests, tag lists): they fit in
/// a read or two.
pub(crate) const SMALL_BODY: u64 = 64 << 10;

/// The slots, who holds them, and the metrics of waiting for one.
pub(crate) struct Admission {
    /// Which of its holders' bytes show them moving.
    direction: Direction,
    permits: Arc<Semaphore>,
    state: Mutex<State>,
    waiting: IntGauge,
    wait: Histogram,
}

/// Who holds the slots and how many wait for one.
#[derive(Default)]
struct State {
    /// At most one per slot.
    holders: Vec<Holder>,
    waiters: usize,
    /// Whether a task looks for stalled holders on the waiters' behalf.
    watched: bool,
}

/// A transfer's live byte count, as its holder reports it: in the admission's direction, an
/// upload's request body or a download's response body (sent on toward its client).
pub(crate) trait Progress: Send + Sync {
    fn bytes(&self, direction: Direction) -> u64;
}

/// One count whatever the direction: the unit tests' transfers.
#[cfg(test)]
impl Progress for std::sync::atomic::AtomicU64 {
    fn bytes(&self, _: Direction) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Progress for Exchange {
    fn bytes(&self, direction: Direction) -> u64 {
        self.progress(direction).load(Ordering::Relaxed)
    }
}

struct Holder {
    /// The transfer's live byte count (the exchange's, kept by its timed body); also what tells
    /// holders apart, as each exchange has its own.
    progress: Arc<dyn Progress>,
    watch: Watch,
}

/// Whether two byte counts are the same one (the data pointers: a vtable may be duplicated).
fn same(a: &Arc<dyn Progress>, b: &Arc<dyn Progress>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// A byte count as last seen, and since when it has not changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watch {
    bytes: u64,
    since: Instant,
}

impl Watch {
    /// Records a look at the byte count; true when it has not moved for [`STALL`].
    fn stalled(&mut self, bytes: u64, now: Instant) -> bool {
        if bytes != self.bytes {
            *self = Watch { bytes, since: now };
            return false;
        }
        now.saturating_duration_since(self.since) >= STALL
    }
}

/// Whether a request needs a slot: its body has bytes and does not declare a small size, or it
/// starts a blob upload (a thousand pushes starting at once would otherwise open a thousand
/// registry connections at once). The step that ends an upload without a body never waits: its
/// connection may still hold the buffers its body grew, so it is let through at once.
pub(crate) fn needs_slot(operation: Operation, body_is_empty: bool, declared: Option<u64>) -> bool {
    let starts = matches!(operation, Operation::UploadStart | Operation::UploadStartMonolithic | Operation::BlobMount);
    starts || (!body_is_empty && declared.is_none_or(|length| length > SMALL_BODY))
}

/// Whether a request needs a download slot: a GET of a blob or layer, or of a redirect's storage.
/// A registry that redirects answers the blob GET with a head only, so its slot is held briefly.
pub(crate) fn needs_download_slot(operation: Operation, method: &http::Method) -> bool {
    method == http::Method::GET
        && matches!(operation, Operation::BlobGet | Operation::V1LayerGet | Operation::StorageGet)
}

impl Admission {
    /// `slots` uploads at a time (at least one).
    pub(crate) fn uploads(slots: usize, metrics: &Metrics) -> Arc<Admission> {
        Admission::new(Direction::Upload, slots, &metrics.uploads_waiting, &metrics.upload_admission_wait)
    }

    /// `slots` blob downloads at a time (at least one).
    pub(crate) fn downloads(slots: usize, metrics: &Metrics) -> Arc<Admission> {
        Admission::new(Direction::Download, slots, &metrics.downloads_waiting, &metrics.download_admission_wait)
    }

    fn new(direction: Direction, slots: usize, waiting: &IntGauge, wait: &Histogram) -> Arc<Admission> {
        Arc::new(Admission {
            direction,
            permits: Arc::new(Semaphore::new(slots.max(1))),
            state: Mutex::new(State::default()),
            waiting: waiting.clone(),
            wait: wait.clone(),
        })
    }

    /// Waits for a slot for the transfer whose live byte count is `progress`; the slot is held
    /// until the ticket is dropped. First come, first served.
    pub(crate) async fn admit(self: &Arc<Self>, progress: Arc<dyn Progress>) -> Ticket {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => self.wait_for_slot().await,
        };
        let watch = Watch { bytes: progress.bytes(self.direction), since: Instant::now() };
        self.state().holders.push(Holder { progress: progress.clone(), watch });
        Ticket { admission: self.clone(), progress, permit: Some(permit) }
    }

    async fn wait_for_slot(self: &Arc<Self>) -> OwnedSemaphorePermit {
        let started = Instant::now();
        // Counted however the wait ends (a client that goes away drops it).
        let _waiting = Counted::new(self.waiting.clone());
        let _waiter = Waiter::enlist(self);
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        self.wait.observe(started.elapsed().as_secs_f64());
        permit
    }

    /// Looks for stalled holders every [`LOOK_EVERY`] until nobody waits.
    fn watch(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOOK_EVERY).await;
                let mut state = self.state();
                if state.waiters == 0 {
                    state.watched = false;
                    return;
                }
                self.take_over_stalled(&mut state);
            }
        });
    }

    /// Frees the slots of holders that have moved nothing for [`STALL`], one for each waiter
    /// that no free slot awaits; they go to the first waiters in line.
    fn take_over_stalled(&self, state: &mut State) {
        let now = Instant::now();
        let mut wanted = state.waiters.saturating_sub(self.permits.available_permits());
        let mut index = 0;
        while wanted > 0 && index < state.holders.len() {
            let holder = &mut state.holders[index];
            if holder.watch.stalled(holder.progress.bytes(self.direction), now) {
                state.holders.swap_remove(index);
                self.permits.add_permits(1);
                wanted -= 1;
            } else {
                index += 1;
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state().holders.len()
    }

    /// How many wait, and whether a watch looks for them.
    #[cfg(test)]
    fn watching(&self) -> (usize, bool) {
        let state = self.state();
        (state.waiters, state.watched)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock can panic half way; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One waiter, counted for as long as it waits.
struct Waiter<'a>(&'a Admission);

impl<'a> Waiter<'a> {
    /// Counts a new waiter and looks on its arrival (behind a crowd of stalled uploads, nobody
    /// waits for a tick); starts the watch if none runs.
    fn enlist(admission: &'a Arc<Admission>) -> Self {
        let mut state = admission.state();
        state.waiters += 1;
        admission.take_over_stalled(&mut state);
        if !std::mem::replace(&mut state.watched, true) {
            admission.clone().watch();
        }
        Waiter(admission)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.state().waiters -= 1;
    }
}

/// An admitted transfer's slot. Dropped, it goes back, unless a waiter has taken it over: then
/// the permit is forgotten, as the taker added one in its place.
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    /// Its holder's byte count: the holder, if it still holds the slot.
    progress: Arc<dyn Progress>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.admission.state();
        let holders = &mut state.holders;
        let permit = self.permit.take();
        match holders.iter().position(|h| same(&h.progress, &self.progress)) {
            Some(index) => {
                holders.swap_remove(index);
                drop(permit);
            }
            None => {
                if let Some(permit) = permit {
                    permit.forget();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn which_requests_need_a_slot() {
        use Operation::*;
        let cases: &[(Operation, bool, Option<u64>, bool)] = &[
            // Starting an upload, with a body or without.
            (UploadStart, true, Some(0), true),
            (UploadStartMonolithic, false, Some(1 << 20), true),
            (BlobMount, true, None, true),
            // Its other steps, by their bodies: ending one never waits.
            (UploadChunk, false, None, true),
            (UploadChunk, true, Some(0), false),
            (UploadFinish, false, Some(1 << 20), true),
            (UploadFinish, true, Some(0), false),
            // Other requests, by their bodies.
            (ManifestGet, true, None, false),
            (BlobGet, true, None, false),
            (ManifestPut, false, Some(4 << 10), false),
            (ManifestPut, false, Some(SMALL_BODY), false),
            (ManifestPut, false, Some(SMALL_BODY + 1), true),
            (ManifestPut, false, None, true),
            (V1LayerPut, false, Some(1 << 30), true),
            (Other, false, None, true),
            (Other, true, None, false),
        ];
        for &(operation, empty, declared, want) in cases {
            assert_eq!(
                needs_slot(operation, empty, declared),
                want,
                "{operation:?}, empty {empty}, declared {declared:?}"
            );
        }
    }

    #[test]
    fn blob_and_storage_gets_need_a_download_slot_and_nothing_else_does() {
        use Operation::*;
        let (get, head) = (http::Method::GET, http::Method::HEAD);
        let cases: &[(Operation, &http::Method, bool)] = &[
            (BlobGet, &get, true),
            (V1LayerGet, &get, true),
            (StorageGet, &get, true),
            (BlobGet, &head, false),
            (StorageHead, &head, false),
            (ManifestGet, &get, false),
            (TagsList, &get, false),
            (Other, &get, false),
            (UploadChunk, &http::Method::PATCH, false),
        ];
        for &(operation, method, want) in cases {
            assert_eq!(needs_download_slot(operation, method), want, "{method} {operation:?}");
        }
    }

    #[test]
    fn a_watch_calls_stalled_only_after_stall_without_bytes() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // (look at, bytes seen, stalled?)
        let looks: &[(u64, u64, bool)] = &[
            (0, 0, false),
            (999, 0, false),
            (1000, 0, true),
            (1200, 5, false), // moved: the clock restarts
            (2100, 5, false),
            (2200, 5, true),
            (2300, 5, true),
            (2400, 9, false),
        ];
        let mut watch = Watch { bytes: 0, since: t0 };
        for &(at, bytes, want) in looks {
            assert_eq!(watch.stalled(bytes, ms(at)), want, "at {at} ms, {bytes} bytes");
        }
    }

    fn admission(slots: usize) -> Arc<Admission> {
        Admission::uploads(slots, &Metrics::new(0))
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_slot_given_back() {
        let admission = admission(1);
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let first = admission.admit(a.clone()).await;
        let waiter = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit(b.clone()).await }
        });
        // The holder keeps moving bytes: nobody takes its slot, however long the waiter waits.
        for _ in 0..5 {
            tokio::time::sleep(STALL / 2).await;
            a.fetch_add(1, Ordering::Relaxed);
        }
        assert!(!waiter.is_finished(), "admitted while the only slot was held by an upload moving bytes");
        assert_eq!(admission.waiting.get(), 1);
        drop(first);
        let second = waiter.await.unwrap();
        assert_eq!(admission.held(), 1);
        assert_eq!(admission.waiting.get(), 0);
        assert_eq!(admission.wait.get_sample_count(), 1);
        drop(second);
        assert_eq!(admission.held(), 0);
        assert_eq!(admission.permits.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_holder_loses_its_slot_and_the_count_stays_right() {
        let admission = admission(1);
        let (a, b) = (Arc::new(AtomicU64::new(7)), Arc::new(AtomicU64::new(0)));
        let stalled = admission.admit(a.clone()).await;
        let started = Instant::now();
        let taker = tokio::time::timeout(STALL * 5, admission.admit(b.clone()))
            .await
            .expect("a stalled holder's slot was not taken over");
        let waited = started.elapsed();
        assert!(waited >= STALL && waited < STALL * 3, "took the stalled holder's slot after {waited:?}");
        assert_eq!(admission.held(), 1, "the taker holds the slot, the stalled upload none");
        // The stalled upload ends: its permit must not come back as a second slot.
        drop(stalled);
        assert_eq!(admission.permits.available_permits(), 0);
        drop(taker);
        assert_eq!(admission.permits.available_permits(), 1);
        assert_eq!(admission.held(), 0);
    }

    /// `n` transfers that will move nothing, each waiting for a slot in a task of its own.
    fn stalled_waiters(admission: &Arc<Admission>, n: usize) -> Vec<tokio::task::JoinHandle<Ticket>> {
        let wait = |admission: Arc<Admission>| async move { admission.admit(Arc::new(AtomicU64::new(0))).await };
        (0..n).map(|_| tokio::spawn(wait(admission.clone()))).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn one_watch_serves_every_waiter_and_ends_when_none_is_left() {
        let admission = admission(1);
        let stalled = || Arc::new(AtomicU64::new(0));
        let mut tickets = vec![admission.admit(stalled()).await];
        let waiters = stalled_waiters(&admission, 3);
        tokio::time::sleep(LOOK_EVERY / 10).await;
        assert_eq!(admission.watching(), (3, true));
        // Every holder moves nothing: each loses the slot to the next waiter in turn.
        for waiter in waiters {
            let ticket = tokio::time::timeout(STALL * 2, waiter).await.expect("no takeover within two stalls");
            tickets.push(ticket.unwrap());
        }
        tokio::time::sleep(LOOK_EVERY * 2).await;
        assert_eq!(admission.watching(), (0, false), "the watch outlived the waiters");
        // The last holder is not stalled yet when the next waiter arrives: only a new watch frees its slot.
        let next = tokio::time::timeout(STALL * 2, admission.admit(stalled())).await;
        tickets.push(next.expect("the watch did not start again for a new waiter"));
        assert_eq!(admission.held(), 1);
        drop(tickets);
        assert_eq!(admission.permits.available_permits(), 1);
        assert_eq!(admission.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_look_frees_a_stalled_slot_for_each_waiter() {
        let admission = admission(3);
        let moving = Arc::new(AtomicU64::new(0));
        let mut held = vec![admission.admit(moving.clone()).await];
        for _ in 0..2 {
            held.push(admission.admit(Arc::new(AtomicU64::new(0))).await);
        }
        let waiters = stalled_waiters(&admission, 3);
        // Both stalled holders lose their slots in the same look; the moving one keeps its own.
        for _ in 0..(STALL + LOOK_EVERY / 2).as_millis() / 50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            moving.fetch_add(1, Ordering::Relaxed);
        }
        let admitted = waiters.iter().filter(|w| w.is_finished()).count();
        assert_eq!(admitted, 2, "stalled slots taken over within one look");
        assert_eq!(admission.watching().0, 1);
        drop(held);
        for waiter in waiters {
            drop(waiter.await.unwrap());
        }
        assert_eq!(admission.permits.available_permits(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_leaves_no_count_behind() {
        let admission = admission(1);
        let a = Arc::new(AtomicU64::new(0));
        let _held = admission.admit(a.clone()).await;
        let b = Arc::new(AtomicU64::new(0));
        let gone = tokio::time::timeout(STALL / 2, admission.admit(b.clone())).await;
        assert!(gone.is_err());
        assert_eq!(admission.waiting.get(), 0);
        assert_eq!(admission.wait.get_sample_count(), 0);
    }
}
