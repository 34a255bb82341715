//! What a timed body did, and who receives it once the body is over.

use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{BodyEnd, Direction, Side};

/// What a body did, handed over once when it ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyOutcome {
    pub direction: Direction,
    pub bytes: u64,
    /// When the sink first asked for data; `None` if it never did (an empty body).
    pub first_poll: Option<Instant>,
    /// When the last data byte was handed to the sink.
    pub last_byte: Option<Instant>,
    /// When the body ended, however it ended.
    pub ended: Instant,
    /// Time spent waiting for the source to produce bytes.
    pub source_wait: Duration,
    /// Time spent waiting for the sink to ask for more (backpressure).
    pub sink_wait: Duration,
    pub end: BodyEnd,
}

impl BodyOutcome {
    /// First poll to end: the body's active life.
    #[cfg(test)]
    pub(crate) fn active(&self) -> Duration {
        self.first_poll.map_or(Duration::ZERO, |t| self.ended.saturating_duration_since(t))
    }

    /// Time the given side made this body wait.
    pub(crate) fn wait_on(&self, side: Side) -> Duration {
        if side == self.direction.source() {
            self.source_wait
        } else {
            self.sink_wait
        }
    }

    /// Which side aborted, if the body did not complete.
    pub(crate) fn aborted_by(&self) -> Option<Side> {
        match self.end {
            BodyEnd::Complete => None,
            BodyEnd::SourceError | BodyEnd::SourceStalled => Some(self.direction.source()),
            BodyEnd::SinkDropped => Some(self.direction.sink()),
        }
    }
}

/// Receives a body's outcome, exactly once.
pub(crate) trait BodyRecorder: Send + Sync {
    /// `captured` holds the body's first bytes when capture was asked for (see
    /// [`TimedBody::capture`]), and is empty otherwise.
    fn record(&self, outcome: BodyOutcome, captured: Vec<u8>);

    /// `bytes` more went through, for live views (per frame: a relaxed add at most).
    fn progressed(&self, _direction: Direction, _bytes: u64) {}
}

/// Running totals, kept inline in the wrapper.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    pub(crate) bytes: u64,
    pub(crate) first_poll: Option<Instant>,
    pub(crate) last_byte: Option<Instant>,
    /// Set when the inner body returned `Pending`; cleared at its next `Ready`.
    pub(crate) pending_since: Option<Instant>,
    /// Set when we returned a frame; cleared at the next poll.
    pub(crate) returned_at: Option<Instant>,
    pub(crate) source_wait: Duration,
    pub(crate) sink_wait: Duration,
}

pub(crate) fn finish(direction: Direction, tally: &Tally, end: BodyEnd, now: Instant) -> BodyOutcome {
    // A wait still open at the end counts up to now.
    let mut source_wait = tally.source_wait;
    if let Some(since) = tally.pending_since {
        source_wait += now.saturating_duration_since(since);
    }
    let mut sink_wait = tally.sink_wait;
    if let (Some(at), BodyEnd::SinkDropped) = (tally.returned_at, end) {
        sink_wait += now.saturating_duration_since(at);
    }
    BodyOutcome {
        direction,
        bytes: tally.bytes,
        first_poll: tally.first_poll,
        last_byte: tally.last_byte,
        ended: now,
        source_wait,
        sink_wait,
        end,
    }
}
