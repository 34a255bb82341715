//! The body wrapper: where a stream's time went, measured on the wire.
//!
//! Hyper's HTTP/1 dispatcher polls a body only when it can write. So, seen from inside
//! `poll_frame`, the time from the inner body's `Pending` to its next `Ready` is time the
//! *source* made us wait, and the time from our returning `Ready` to the next poll is time the
//! *sink* made us wait (backpressure). What is left of the body's life is bytes moving.
//!
//! Per frame this does arithmetic on `Instant`s and one relaxed atomic add: no allocation, no
//! lock, no formatting. The outcome is handed to a [`BodyRecorder`] exactly once: at end of
//! stream, on error, or when the body is dropped early.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::capture::Capture;
use super::drain::{Deferred, Drain};
use super::outcome::{finish, BodyRecorder, Tally};
use crate::protocol::{BodyEnd, Direction};
/// The error a stalled body ends with: the connection it feeds is aborted, never finished.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes for {0:?}: the {1} stalled")]
pub(super) struct Stalled(pub Duration, pub &'static str);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Watches for a source that sends nothing for too long. The timer is armed once, when the
/// source first makes us wait, and re-armed only when it fires after progress: never per frame.
#[derive(Debug)]
struct Watchdog {
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Watchdog {
    /// Polled while the source is pending. Ready when it has been silent for the timeout.
    fn poll_stalled(&mut self, cx: &mut Context<'_>, last_progress: Instant) -> Poll<()> {
        let deadline = last_progress + self.timeout;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

pin_project! {
    /// A body that times its own stream. See the module docs for what is measured.
    pub struct TimedBody<B: Body> {
        #[pin]
        inner: B,
        direction: Direction,
        tally: Tally,
        capture: Capture,
        // Taken on the first end so the outcome is recorded exactly once.
        recorder: Option<Arc<dyn BodyRecorder>>,
        // Whether the inner body has reported its last frame.
        done: bool,
        // Cuts the body off when its source goes silent; `None` when stall detection is off.
        watchdog: Option<Watchdog>,
        // The sink connection's flush signal; `None`: the body ends when its source does.
        drain: Option<Arc<Drain>>,
        // Kept until the body is dropped (its end, or its abandonment): a download slot.
        held: Option<Box<dyn std::any::Any + Send + Sync>>,
    }

    impl<B: Body> PinnedDrop for TimedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(recorder) = this.recorder.take() {
                // An untouched empty body is complete; anything else dropped early was cut off.
                let end = if *this.done || this.inner.is_end_stream() {
                    BodyEnd::Complete
                } else {
                    BodyEnd::SinkDropped
                };
                recorder.record(finish(*this.direction, this.tally, end, Instant::now()), this.capture.take_bytes());
            }
        }
    }
}

impl<B: Body> TimedBody<B> {
    pub(crate) fn new(inner: B, direction: Direction, recorder: Arc<dyn BodyRecorder>) -> Self {
        TimedBody {
            inner,
            direction,
            tally: Tally::default(),
            capture: Capture::default(),
            recorder: Some(recorder),
            done: false,
            watchdog: None,
            drain: None,
            held: None,
        }
    }

    /// Keeps `held` for as long as the body lives.
    pub(crate) fn hold(mut self, held: Option<Box<dyn std::any::Any + Send + Sync>>) -> Self {
        self.held = held;
        self
    }

    /// Records the end only once the sink's connection has written everything out (see [`Drain`]).
    pub(crate) fn drain(mut self, drain: Option<Arc<Drain>>) -> Self {
        self.drain = drain;
        self
    }

    /// Aborts the body (an error, so the peer never sees a clean end) when its source sends
    /// nothing for `timeout`.
    pub(crate) fn stall_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.watchdog = timeout.map(|timeout| Watchdog { timeout, sleep: None });
        self
    }

    /// Keeps a copy of the body's bytes, up to `limit` (a body larger than that is not kept).
    /// `expected` (e.g. from Content-Length) sizes the one allocation.
    pub(crate) fn capture(mut self, limit: usize, expected: Option<u64>) -> Self {
        let initial = expected.map_or(16 * 1024, |n| n.min(limit as u64) as usize);
        self.capture = Capture { bytes: Vec::with_capacity(initial), limit, overflowed: false };
        self
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let now = Instant::now();
        let tally = this.tally;
        if tally.first_poll.is_none() {
            tally.first_poll = Some(now);
        }
        if let Some(at) = tally.returned_at.take() {
            tally.sink_wait += now.saturating_duration_since(at);
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        let Poll::Ready(item) = polled else {
            if tally.pending_since.is_none() {
                tally.pending_since = Some(now);
            }
            if let Some(watchdog) = this.watchdog {
                let last_progress = tally.last_byte.or(tally.first_poll).unwrap_or(now);
                if watchdog.poll_stalled(cx, last_progress).is_ready() {
                    *this.done = true;
                    let timeout = watchdog.timeout;
                    if let Some(recorder) = this.recorder.take() {
                        let outcome = finish(*this.direction, tally, BodyEnd::SourceStalled, Instant::now());
                        recorder.record(outcome, Vec::new());
                    }
                    let source = this.direction.source().as_str();
                    return Poll::Ready(Some(Err(Box::new(Stalled(timeout, source)))));
                }
            }
            return Poll::Pending;
        };
        // Re-read the clock only if we waited: the common fast path reads it once.
        let now = match tally.pending_since.take() {
            Some(since) => {
                let woke = Instant::now();
                tally.source_wait += woke.saturating_duration_since(since);
                woke
            }
            None => now,
        };
        let end = match &item {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.remaining() as u64;
                    if n > 0 {
                        tally.bytes += n;
                        tally.last_byte = Some(now);
                        if let Some(recorder) = this.recorder {
                            recorder.progressed(*this.direction, n);
                        }
                        this.capture.take(data);
                    }
                }
                tally.returned_at = Some(now);
                None
            }
            Some(Err(_)) => Some(BodyEnd::SourceError),
            None => Some(BodyEnd::Complete),
        };
        let end = end.or_else(|| this.inner.is_end_stream().then_some(BodyEnd::Complete));
        if let Some(end) = end {
            *this.done = true;
            if let Some(recorder) = this.recorder.take() {
                match this.drain {
                    Some(drain) if end == BodyEnd::Complete && tally.bytes > 0 => {
                        // From here until the write-out, the body waits on its sink.
                        let tally = Tally { returned_at: Some(now), ..tally.clone() };
                        drain.defer(Deferred {
                            direction: *this.direction,
                            tally,
                            captured: this.capture.take_bytes(),
                            recorder,
                        });
                    }
                    _ => recorder.record(finish(*this.direction, tally, end, now), this.capture.take_bytes()),
                }
            }
        }
        Poll::Ready(item.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BodyOutcome;
    use crate::protocol::Side;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::task::ready;

    /// A scripted body: each step is either a delay (the source is slow) or a frame.
    struct Scripted {
        steps: VecDeque<Step>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    enum Step {
        Wait(Duration),
        Data(usize),
        Fail,
    }

    impl Body for Scripted {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            loop {
                if let Some(sleep) = self.sleep.as_mut() {
                    ready!(sleep.as_mut().poll(cx));
                    self.sleep = None;
                }
                match self.steps.pop_front() {
                    None => return Poll::Ready(None),
                    Some(Step::Wait(d)) => self.sleep = Some(Box::pin(tokio::time::sleep(d))),
                    Some(Step::Data(n)) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7u8; n]))))),
                    Some(Step::Fail) => return Poll::Ready(Some(Err(std::io::Error::other("reset")))),
                }
            }
        }

        fn is_end_stream(&self) -> bool {
            self.steps.is_empty() && self.sleep.is_none()
        }
    }

    #[derive(Default)]
    struct Collect(Mutex<Vec<BodyOutcome>>, Mutex<Vec<Vec<u8>>>, AtomicU64);

    impl BodyRecorder for Collect {
        fn record(&self, outcome: BodyOutcome, captured: Vec<u8>) {
            self.0.lock().unwrap().push(outcome);
            self.1.lock().unwrap().push(captured);
        }

        fn progressed(&self, _: Direction, bytes: u64) {
            self.2.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    fn timed(steps: Vec<Step>, dir: Direction) -> (TimedBody<Scripted>, Arc<Collect>) {
        let rec = Arc::new(Collect::default());
        let body = Scripted { steps: steps.into(), sleep: None };
        (TimedBody::new(body, dir, rec.clone()), rec)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_drain_a_body_ends_when_its_connection_has_written_it_out() {
        for explicit_end in [false, true] {
            // `explicit_end`: the source ends with a final `None` rather than through
            // `is_end_stream` after its last frame.
            let steps = if explicit_end { vec![Step::Data(10), Step::Wait(ms(0))] } else { vec![Step::Data(10)] };
            let (body, rec) = timed(steps, Direction::Download);
            let drain = Arc::new(Drain::default());
            let mut body = body.drain(Some(drain.clone()));
            drain.flushed(); // nothing waits yet: a no-op
            while let Some(frame) = body.frame().await {
                frame.unwrap();
            }
            drop(body);
            tokio::time::advance(ms(300)).await;
            assert!(rec.0.lock().unwrap().is_empty(), "still queued in the connection");
            drain.flushed();
            let outcome = rec.0.lock().unwrap()[0];
            assert_eq!((outcome.end, outcome.bytes), (BodyEnd::Complete, 10));
            assert_eq!(outcome.sink_wait, ms(300), "the write-out was the sink's wait");
            assert_eq!(outcome.active(), ms(300));
            drain.flushed();
            assert_eq!(rec.0.lock().unwrap().len(), 1, "recorded once");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_whose_connection_closed_before_the_write_out_was_cut_off_by_the_sink() {
        let (body, rec) = timed(vec![Step::Data(10)], Direction::Download);
        let drain = Arc::new(Drain::default());
        let mut body = body.drain(Some(drain.clone()));
        body.frame().await.unwrap().unwrap();
        drop(body);
        drain.abandoned();
        assert_eq!(rec.0.lock().unwrap()[0].end, BodyEnd::SinkDropped);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_and_failed_bodies_do_not_wait_for_a_drain() {
        let (body, rec) = timed(vec![], Direction::Download);
        let mut body = body.drain(Some(Arc::new(Drain::default())));
        assert!(body.frame().await.is_none());
        let (body, rec2) = timed(vec![Step::Data(3), Step::Fail], Direction::Download);
        let mut body = body.drain(Some(Arc::new(Drain::default())));
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(rec.0.lock().unwrap()[0].end, BodyEnd::Complete);
        assert_eq!(rec2.0.lock().unwrap()[0].end, BodyEnd::SourceError);
    }

    #[tokio::test(start_paused = true)]
    async fn source_stalls_are_attributed_to_the_source() {
        let steps = vec![Step::Wait(ms(100)), Step::Data(10), Step::Wait(ms(250)), Step::Data(5)];
        let (mut body, rec) = timed(steps, Direction::Upload);
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        drop(body);
        let outcomes = rec.0.lock().unwrap();
        assert_eq!(outcomes.len(), 1, "recorded exactly once");
        let o = outcomes[0];
        assert_eq!((o.bytes, o.end), (15, BodyEnd::Complete));
        assert_eq!(o.source_wait, ms(350));
        assert_eq!(o.sink_wait, Duration::ZERO);
        assert_eq!(o.wait_on(Side::Client), ms(350));
        assert_eq!(o.active(), ms(350));
    }

    #[tokio::test(start_paused = true)]
    async fn sink_stalls_are_attributed_to_the_sink() {
        let steps = vec![Step::Data(10), Step::Data(10), Step::Data(10)];
        let (mut body, rec) = timed(steps, Direction::Download);
        while let Some(frame) = body.frame().await {
            frame.unwrap();
            tokio::time::advance(ms(40)).await; // a slow reader
        }
        let o = rec.0.lock().unwrap()[0];
        // The last frame ends the stream (is_end_stream), so only two reader pauses count.
        assert_eq!(o.sink_wait, ms(80));
        assert_eq!(o.wait_on(Side::Client), ms(80));
        assert_eq!(o.source_wait, Duration::ZERO);
        assert_eq!(o.end, BodyEnd::Complete);
    }

    #[tokio::test(start_paused = true)]
    async fn source_error_is_a_source_abort() {
        let steps = vec![Step::Data(3), Step::Wait(ms(20)), Step::Fail, Step::Data(3)];
        let (mut body, rec) = timed(steps, Direction::Upload);
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_err());
        drop(body);
        let outcomes = rec.0.lock().unwrap();
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].end, BodyEnd::SourceError);
        assert_eq!(outcomes[0].aborted_by(), Some(Side::Client));
        assert_eq!(outcomes[0].bytes, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn early_drop_is_a_sink_abort_and_counts_the_open_wait() {
        let steps = vec![Step::Data(3), Step::Data(3), Step::Data(3)];
        let (mut body, rec) = timed(steps, Direction::Download);
        body.frame().await.unwrap().unwrap();
        tokio::time::advance(ms(30)).await;
        drop(body);
        let o = rec.0.lock().unwrap()[0];
        assert_eq!((o.end, o.aborted_by()), (BodyEnd::SinkDropped, Some(Side::Client)));
        assert_eq!(o.sink_wait, ms(30));
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_body_never_polled_is_complete() {
        let (body, rec) = timed(vec![], Direction::Upload);
        drop(body);
        let o = rec.0.lock().unwrap()[0];
        assert_eq!((o.end, o.bytes, o.first_poll), (BodyEnd::Complete, 0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_counter_follows_bytes() {
        let rec = Arc::new(Collect::default());
        let body = Scripted { steps: vec![Step::Data(4), Step::Data(6)].into(), sleep: None };
        let mut body = TimedBody::new(body, Direction::Upload, rec.clone());
        body.frame().await.unwrap().unwrap();
        assert_eq!(rec.2.load(Ordering::Relaxed), 4);
        body.frame().await.unwrap().unwrap();
        assert_eq!(rec.2.load(Ordering::Relaxed), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn capture_keeps_small_bodies_and_drops_large_ones() {
        for (limit, want) in [(100, 10), (5, 0)] {
            let rec = Arc::new(Collect::default());
            let body = Scripted { steps: vec![Step::Data(4), Step::Data(6)].into(), sleep: None };
            let mut body = TimedBody::new(body, Direction::Download, rec.clone()).capture(limit, Some(10));
            while let Some(frame) = body.frame().await {
                frame.unwrap();
            }
            assert_eq!(rec.1.lock().unwrap()[0].len(), want, "limit {limit}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_is_cut_off_after_the_stall_timeout() {
        let steps = vec![Step::Data(3), Step::Wait(ms(10_000)), Step::Data(3)];
        let rec = Arc::new(Collect::default());
        let body = Scripted { steps: steps.into(), sleep: None };
        let mut body = TimedBody::new(body, Direction::Upload, rec.clone()).stall_timeout(Some(ms(1_000)));
        body.frame().await.unwrap().unwrap();
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("client stalled"), "{err}");
        assert_eq!(Instant::now() - started, ms(1_000));
        let o = rec.0.lock().unwrap()[0];
        assert_eq!((o.end, o.aborted_by()), (BodyEnd::SourceStalled, Some(Side::Client)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_source_is_not_a_stall() {
        let steps: Vec<Step> = (0..6).flat_map(|_| [Step::Wait(ms(600)), Step::Data(1)]).collect();
        let rec = Arc::new(Collect::default());
        let body = Scripted { steps: steps.into(), sleep: None };
        let mut body = TimedBody::new(body, Direction::Download, rec.clone()).stall_timeout(Some(ms(1_000)));
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(rec.0.lock().unwrap()[0].end, BodyEnd::Complete);
    }
}
