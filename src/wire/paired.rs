//! An upstream connection of a client connection's own.
//!
//! The small exchanges of an HTTP/1 client connection (manifests, HEADs, pings, tag lists: no
//! request body, no blob in the answer) go over one upstream HTTP/1 connection that the
//! exchange itself writes to and reads from, in the client connection's task: no pool is
//! consulted, and no request, response or wake-up crosses between tasks. The HTTP/1 it speaks
//! is [`crate::wire::h1`]'s: a bodiless request, a response of any framing. Blobs, bodies, h2
//! clients and TLS upstreams keep the pool, whose read classes bound their memory (and which
//! shares a TLS upstream's handshakes). A pair reads small, and pairs are only made while at
//! most [`PAIRS_UNTIL`] client connections are open, so there are never more pairs than that.
//!
//! A client connection's first small exchange still takes the pool: a pair is made for its
//! second, so a client that opens a connection per request reuses pooled connections as
//! before instead of opening one upstream per request.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::rt::{Read, ReadBuf, Write};

use crate::limits::buffers::CLASSES;
use crate::wire::h1::{self, Chunked, Framing, H1Error};
use crate::wire::proxy::UploadBody;
use crate::wire::upstream::{BoxError, UpstreamIo};

/// New pairs are made only while at most this many client connections are open (the largest
/// pooled class's bound), so at most this many pairs exist at once.
pub(crate) const PAIRS_UNTIL: usize = CLASSES[0].until;

/// A pair's read buffer: the smallest class's reads. Also the most a response head may take.
const READ_SIZE: usize = CLASSES[CLASSES.len() - 1].reads.max();

/// A client connection's upstream connection, taken by one exchange at a time.
#[derive(Default)]
pub(crate) struct Pair {
    slot: Mutex<Slot>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Slot {
    /// The connection, while no exchange holds it.
    idle: Option<Box<Conn>>,
    /// An exchange holds it (its response body may still be streaming).
    busy: bool,
    /// The client connection has offered a small exchange before.
    reused: bool,
}

/// How a request offered to a pair went.
pub(crate) enum Sent {
    /// The pair sent it: the response, or why there is none.
    Answered(Result<Response<PairBody>, PairError>),
    /// Not sent: it is the connection's first small exchange, the pair is busy or may not
    /// connect now.
    Declined(Request<UploadBody>),
}

/// Why a paired exchange has no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PairError {
    #[error("connecting: {0}")]
    Connect(BoxError),
    #[error(transparent)]
    Io(io::Error),
    #[error(transparent)]
    Protocol(H1Error),
}

impl Pair {
    /// Sends `req` over the pair's connection, opening one with `dial` if it has none (or one
    /// the registry has closed); `dial` gives `None` when no pair may be made now.
    pub(crate) async fn send<D>(self: &Arc<Self>, req: Request<UploadBody>, dial: impl FnOnce() -> Option<D>) -> Sent
    where
        D: Future<Output = Result<UpstreamIo, BoxError>>,
    {
        let idle = match self.take() {
            Taken::Held(idle) => idle,
            Taken::Busy | Taken::First => return Sent::Declined(req),
        };
        // From here the pair is this exchange's until the lease is let go, however it ends.
        let mut lease = Lease { conn: idle, pair: self.clone(), reusable: false };
        if lease.conn.is_none() {
            let Some(dial) = dial() else { return Sent::Declined(req) };
            // Boxed: opening a connection holds its IO in the future, which every exchange in
            // flight would otherwise carry whether it opens one or not.
            match Box::pin(dial).await {
                Ok(io) => lease.conn = Some(Conn::new(io)),
                Err(error) => return Sent::Answered(Err(PairError::Connect(error))),
            }
        }
        let head = match lease.conn().exchange(req.into_parts().0).await {
            Ok(head) => head,
            Err(error) => return Sent::Answered(Err(error)),
        };
        let body = PairBody::new(lease, head.framing, head.keep_alive);
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if let Some(reason) = head.reason {
            response.extensions_mut().insert(reason);
        }
        Sent::Answered(Ok(response))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds the pair (marks it busy), with its idle connection if the registry has not closed
    /// it meanwhile; or declines.
    fn take(&self) -> Taken {
        let mut slot = self.lock();
        if slot.busy {
            return Taken::Busy;
        }
        if !slot.reused {
            slot.reused = true;
            return Taken::First;
        }
        slot.busy = true;
        let mut idle = slot.idle.take();
        if idle.as_mut().is_some_and(|conn| conn.gone()) {
            idle = None;
        }
        Taken::Held(idle)
    }

    /// Ends an exchange's hold, keeping `conn` for the next one.
    fn release(&self, conn: Option<Box<Conn>>) {
        let mut slot = self.lock();
        slot.busy = false;
        slot.idle = conn;
    }
}

enum Taken {
    /// The pair is the exchange's now, with its connection if it has a live one.
    Held(Option<Box<Conn>>),
    Busy,
    /// The connection's first small exchange: it takes the pool.
    First,
}

/// An exchange's hold on its pair's connection. Let go, it gives the connection back if the
/// exchange ended cleanly, else closes it.
struct Lease {
    conn: Option<Box<Conn>>,
    pair: Arc<Pair>,
    reusable: bool,
}

impl Lease {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let conn = self.conn.take().filter(|conn| self.reusable && conn.buffered().is_empty());
        self.pair.release(conn);
    }
}

/// An upstream connection, with what has been read from it and not yet used.
struct Conn {
    io: UpstreamIo,
    /// Read into `buf[end..]`; `buf[start..end]` is unused input.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A request head on its way out.
    out: Vec<u8>,
}

impl Conn {
    fn new(io: UpstreamIo) -> Box<Conn> {
        Box::new(Conn { io, buf: vec![0; READ_SIZE].into_boxed_slice(), start: 0, end: 0, out: Vec::new() })
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The next `n` unused bytes, copied out: the buffer is read into again.
    fn take(&mut self, n: usize) -> Bytes {
        let bytes = Bytes::copy_from_slice(&self.buffered()[..n]);
        self.consume(n);
        bytes
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads more: `Ok(0)` at the connection's end. A full buffer of unused input (a head or a
    /// chunk line longer than it) is an error.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, H1Error::HeadTooLarge)));
            }
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, read.unfilled()))?;
        let n = read.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }

    /// Whether the registry closed the connection (or sent what nobody asked for) while it
    /// was idle. No system call unless the socket has become readable.
    fn gone(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        !matches!(self.poll_fill(&mut cx), Poll::Pending)
    }

    /// Writes a request's head and reads its answer's head, past interim answers (`103 Early
    /// Hints`), which are not forwarded. The answer's headers go into the request's map.
    async fn exchange(&mut self, parts: http::request::Parts) -> Result<h1::ResponseHead, PairError> {
        self.out.clear();
        h1::encode_request(&parts, &mut self.out);
        self.write_out().await.map_err(PairError::Io)?;
        let head_request = parts.method == Method::HEAD;
        let mut headers = parts.headers;
        loop {
            match h1::parse_response(self.buffered(), head_request, &mut headers).map_err(PairError::Protocol)? {
                Some((len, head)) => {
                    self.consume(len);
                    if !head.status.is_informational() {
                        return Ok(head);
                    }
                    headers = head.headers;
                }
                None => {
                    if poll_fn(|cx| self.poll_fill(cx)).await.map_err(PairError::Io)? == 0 {
                        return Err(PairError::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }

    async fn write_out(&mut self) -> io::Result<()> {
        let mut at = 0;
        while at < self.out.len() {
            let n = poll_fn(|cx| Pin::new(&mut self.io).poll_write(cx, &self.out[at..])).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            at += n;
        }
        poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await
    }
}

/// A paired exchange's response body, read from the connection as the client takes it.
pub(crate) struct PairBody {
    state: State,
}

enum State {
    Done,
    /// All of it was read with the head.
    Whole(Bytes),
    Reading {
        lease: Lease,
        left: Left,
        keep_alive: bool,
    },
}

/// What is left to read of a body.
enum Left {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl PairBody {
    fn new(mut lease: Lease, framing: Framing, keep_alive: bool) -> PairBody {
        let left = match framing {
            Framing::Empty | Framing::Length(0) => {
                lease.reusable = keep_alive;
                return PairBody { state: State::Done };
            }
            Framing::Length(n) if n <= lease.conn().buffered().len() as u64 => {
                let whole = lease.conn().take(n as usize);
                lease.reusable = keep_alive;
                return PairBody { state: State::Whole(whole) };
            }
            Framing::Length(n) => Left::Length(n),
            Framing::Chunked => Left::Chunked(Chunked::Size),
            Framing::Close => Left::Close,
        };
        PairBody { state: State::Reading { lease, left, keep_alive } }
    }
}

impl Body for PairBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let data = match &mut this.state {
            State::Done => return Poll::Ready(None),
            State::Whole(bytes) => {
                let bytes = std::mem::take(bytes);
                this.state = State::Done;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            State::Reading { lease, left, keep_alive } => {
                let data = ready!(poll_data(lease.conn(), left, cx));
                // Read to its end, the connection can carry the next exchange. A sized body's
                // end is its last byte: hyper's server lets it go then, without asking for more.
                if matches!(left, Left::Length(0) | Left::Chunked(Chunked::Done)) {
                    lease.reusable = *keep_alive;
                }
                data
            }
        };
        match data {
            Ok(Some(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            // The lease goes with the state: back to the pair if the body was read to its end,
            // else (a broken body, one until the connection's end) closed.
            end => {
                this.state = State::Done;
                Poll::Ready(end.transpose().map(|r| r.map(Frame::data)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Reading { left: Left::Length(0), .. })
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Done => SizeHint::with_exact(0),
            State::Whole(bytes) => SizeHint::with_exact(bytes.len() as u64),
            State::Reading { left: Left::Length(n), .. } => SizeHint::with_exact(*n),
            State::Reading { .. } => SizeHint::default(),
        }
    }
}

/// The body's next piece of data, `None` at its end. A connection that ends before its body
/// does is an error, never a short body.
fn poll_data(conn: &mut Conn, left: &mut Left, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        match left {
            Left::Length(0) => return Poll::Ready(Ok(None)),
            Left::Length(n) if !conn.buffered().is_empty() => {
                let take = conn.buffered().len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                return Poll::Ready(Ok(Some(conn.take(take))));
            }
            Left::Chunked(chunked) if !conn.buffered().is_empty() => {
                let step = chunked.step(conn.buffered()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                // A step with data ends with it.
                if let Some((start, end)) = step.data {
                    conn.consume(start);
                    return Poll::Ready(Ok(Some(conn.take(end - start))));
                }
                conn.consume(step.consumed);
                if *chunked == Chunked::Done {
                    return Poll::Ready(Ok(None));
                }
                if step.consumed > 0 {
                    continue;
                }
            }
            Left::Close if !conn.buffered().is_empty() => {
                let all = conn.buffered().len();
                return Poll::Ready(Ok(Some(conn.take(all))));
            }
            _ => {}
        }
        if ready!(conn.poll_fill(cx))? == 0 {
            return Poll::Ready(match left {
                Left::Close => Ok(None),
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Pending;
    use std::time::Duration;

    use http_body_util::{Either, Empty};

    use super::*;

    type NoDial = Pending<Result<UpstreamIo, BoxError>>;

    fn get() -> Request<UploadBody> {
        Request::get("/v2/").body(Either::Left(Empty::new())).unwrap()
    }

    #[tokio::test]
    async fn an_exchange_dropped_midway_lets_the_pair_go() {
        let pair = Arc::new(Pair::default());
        assert!(matches!(pair.send(get(), || None::<NoDial>).await, Sent::Declined(_)), "the first takes the pool");
        assert!(matches!(pair.send(get(), || None::<NoDial>).await, Sent::Declined(_)), "no pair may be made");
        assert!(!pair.lock().busy);
        // A connect that never ends, given up on (the response timeout).
        let sent = pair.send(get(), || Some(std::future::pending()));
        assert!(tokio::time::timeout(Duration::from_millis(20), sent).await.is_err());
        assert!(!pair.lock().busy, "the abandoned exchange let the pair go");
    }
}
