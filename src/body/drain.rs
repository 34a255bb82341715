//! Ending a response body when its connection has written it out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::outcome::{finish, BodyRecorder, Tally};
use crate::protocol::{BodyEnd, Direction};

/// Ends a response body when its connection has written it out, not when its source ended.
///
/// Hyper queues up to its buffer size of a response before it stops asking the body for more,
/// so the source can end while a megabyte still waits for a slow client. With a `Drain`, a body
/// whose source completed hands its outcome here, and the outcome is recorded at the
/// connection's next flush with nothing left queued (hyper flushes the IO only once its queue is
/// empty): the tail is the sink's wait, not an idle gap after the response. Per flush this costs
/// the IO one relaxed load; the lock is taken once per body.
#[derive(Default)]
pub(crate) struct Drain {
    pub(crate) armed: AtomicBool,
    pub(crate) pending: Mutex<Option<Deferred>>,
}

/// A completed body's outcome, waiting for the write-out.
pub(crate) struct Deferred {
    pub(crate) direction: Direction,
    pub(crate) tally: Tally,
    pub(crate) captured: Vec<u8>,
    pub(crate) recorder: Arc<dyn BodyRecorder>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").field("armed", &self.armed).finish_non_exhaustive()
    }
}

impl Drain {
    /// Called by the connection's IO after a flush that left nothing queued.
    pub(crate) fn flushed(&self) {
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::AcqRel) {
            self.settle(BodyEnd::Complete);
        }
    }

    /// Called when the connection is gone: a body still waiting never fully reached its sink.
    pub(crate) fn abandoned(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.settle(BodyEnd::SinkDropped);
        }
    }

    pub(crate) fn defer(&self, deferred: Deferred) {
        // HTTP/1 writes one response at a time; one still waiting is settled by the next.
        let previous = self.lock().replace(deferred);
        self.armed.store(true, Ordering::Release);
        if let Some(previous) = previous {
            record_deferred(previous, BodyEnd::Complete);
        }
    }

    fn settle(&self, end: BodyEnd) {
        let deferred = self.lock().take();
        if let Some(deferred) = deferred {
            record_deferred(deferred, end);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Deferred>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The time since the last frame went out is the sink's: it was writing the tail.
pub(crate) fn record_deferred(mut d: Deferred, end: BodyEnd) {
    let now = Instant::now();
    if let Some(at) = d.tally.returned_at.take() {
        d.tally.sink_wait += now.saturating_duration_since(at);
    }
    d.recorder.record(finish(d.direction, &d.tally, end, now), d.captured);
}
