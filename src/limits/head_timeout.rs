//! The header read timeout of an HTTP/1 connection, kept by one lazy timer per connection.
//!
//! hyper's own header timeout allocates and registers a timer for every request head. Here a
//! connection notes when it began waiting for a head (when it opened, or when its last response
//! body was let go) and when one arrived; its one timer wakes at most once per timeout, looks at
//! those notes, and either cuts the connection or sleeps until the new deadline. A connection
//! is cut only while it waits for a head: a slow request or response is never cut by this.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// When a connection began waiting for a request head, and whether a request is in progress.
#[derive(Debug)]
pub(crate) struct HeadClock {
    opened: Instant,
    busy: AtomicBool,
    /// Nanoseconds after `opened` at which the connection began waiting for its next head.
    waiting_since: AtomicU64,
}

impl HeadClock {
    /// A connection that opened now, waiting for its first head.
    pub(crate) fn new() -> Self {
        HeadClock { opened: Instant::now(), busy: AtomicBool::new(false), waiting_since: AtomicU64::new(0) }
    }

    /// A request head arrived: until its response is let go, the connection waits for no head.
    pub(crate) fn head_arrived(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// The response was let go (written, or abandoned): the connection waits for its next head.
    pub(crate) fn response_done(&self) {
        let since = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waiting_since.store(since, Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);
    }

    /// When the next head is due, or `None` while a request is in progress.
    pub(crate) fn deadline(&self, limit: Duration) -> Option<Instant> {
        if self.busy.load(Ordering::Acquire) {
            return None;
        }
        let since = Duration::from_nanos(self.waiting_since.load(Ordering::Relaxed));
        Some(self.opened + since + limit)
    }
}

/// Runs a connection to its end, or cuts it (`None`) once it has waited `limit` for a head.
///
/// Per poll this costs a waker comparison and one load; the timer is polled (and its waker
/// registered) only when it has fired or the task's waker changed.
pub(crate) fn cut_when_idle<F: Future>(conn: F, clock: &HeadClock, limit: Duration) -> CutWhenIdle<'_, F> {
    CutWhenIdle { conn, timer: tokio::time::sleep(limit), registered: None, clock, limit }
}

pin_project_lite::pin_project! {
    /// The future of [`cut_when_idle`]. A struct, not an `async fn`: that would hold the
    /// connection's future twice, once as its argument and once pinned.
    pub(crate) struct CutWhenIdle<'a, F> {
        #[pin]
        conn: F,
        #[pin]
        timer: tokio::time::Sleep,
        registered: Option<Waker>,
        clock: &'a HeadClock,
        limit: Duration,
    }
}

impl<F: Future> Future for CutWhenIdle<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.conn.poll(cx) {
            return Poll::Ready(Some(out));
        }
        let same_waker = this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_waker && !this.timer.is_elapsed() {
            return Poll::Pending;
        }
        *this.registered = Some(cx.waker().clone());
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            match this.clock.deadline(*this.limit) {
                Some(due) if due <= now => return Poll::Ready(None),
                Some(due) => this.timer.as_mut().reset(due),
                None => this.timer.as_mut().reset(now + *this.limit),
            }
        }
    }
}

/// A response body that tells its connection's [`HeadClock`], if it keeps one, when it is let go.
#[derive(Debug)]
pub(crate) struct EndsRequest<B> {
    body: B,
    clock: Option<Arc<HeadClock>>,
}

impl<B> EndsRequest<B> {
    pub(crate) fn new(body: B, clock: Option<Arc<HeadClock>>) -> Self {
        EndsRequest { body, clock }
    }
}

impl<B> Drop for EndsRequest<B> {
    fn drop(&mut self) {
        if let Some(clock) = &self.clock {
            clock.response_done();
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for EndsRequest<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn the_deadline_follows_what_the_connection_waits_for() {
        let clock = HeadClock::new();
        let opened = Instant::now();
        assert_eq!(clock.deadline(LIMIT), Some(opened + LIMIT), "a new connection waits for its first head");
        tokio::time::advance(Duration::from_secs(5)).await;
        clock.head_arrived();
        assert_eq!(clock.deadline(LIMIT), None, "a request in progress waits for no head");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(clock.deadline(LIMIT), None, "however long it takes");
        clock.response_done();
        assert_eq!(clock.deadline(LIMIT), Some(opened + Duration::from_secs(65) + LIMIT));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_is_cut_at_the_limit() {
        let clock = HeadClock::new();
        let started = Instant::now();
        let cut = cut_when_idle(std::future::pending::<()>(), &clock, LIMIT).await;
        assert_eq!(cut, None);
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_is_not_cut_and_the_wait_after_it_is() {
        let clock = Arc::new(HeadClock::new());
        let started = Instant::now();
        let requests = {
            let clock = clock.clone();
            async move {
                for _ in 0..3 {
                    tokio::time::sleep(LIMIT / 2).await;
                    clock.head_arrived();
                    tokio::time::sleep(LIMIT * 3).await;
                    drop(EndsRequest::new(http_body_util::Empty::<Bytes>::new(), Some(clock.clone())));
                }
                std::future::pending::<()>().await
            }
        };
        assert_eq!(cut_when_idle(requests, &clock, LIMIT).await, None);
        // Three requests of 3.5 limits each, then a whole limit without a head.
        assert_eq!(started.elapsed(), LIMIT * 21 / 2 + LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_is_not_cut() {
        let clock = HeadClock::new();
        let conn = async {
            tokio::time::sleep(LIMIT * 2).await;
            7
        };
        clock.head_arrived();
        assert_eq!(cut_when_idle(conn, &clock, LIMIT).await, Some(7));
    }

    #[tokio::test]
    async fn the_connection_is_held_once() {
        // A connection's future lives as long as the connection: kilobytes held twice, a
        // thousand times over, is what an `async fn` here cost.
        let clock = HeadClock::new();
        let wrapped = cut_when_idle(std::future::ready([0u8; 4096]), &clock, LIMIT);
        let overhead = std::mem::size_of_val(&wrapped) - std::mem::size_of::<std::future::Ready<[u8; 4096]>>();
        assert!(overhead < 1024, "cut_when_idle adds {overhead} bytes to the connection's future");
    }
}
