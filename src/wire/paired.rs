//! An upstream connection of a client connection's own.
//!
//! The small exchanges of an HTTP/1 client connection (manifests, HEADs, pings, tag lists: no
//! request body, no blob in the answer) go over one upstream HTTP/1 connection that is polled
//! in the client connection's task. No pool is consulted and no request, response or wake-up
//! crosses between tasks. Blobs, bodies, h2 clients and TLS upstreams keep the pool, whose
//! read classes bound their memory (and which shares a TLS upstream's handshakes). A pair
//! reads small, and pairs are only made while at most [`PAIRS_UNTIL`] client connections are
//! open, so there are never more pairs than that.
//!
//! A client connection's first small exchange still takes the pool: a pair is made for its
//! second, so a client that opens a connection per request reuses pooled connections as
//! before instead of opening one upstream per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use crate::limits::buffers::CLASSES;
use crate::wire::proxy::UploadBody;
use crate::wire::upstream::{BoxError, UpstreamIo};

/// New pairs are made only while at most this many client connections are open (the largest
/// pooled class's bound), so at most this many pairs exist at once.
pub(crate) const PAIRS_UNTIL: usize = CLASSES[0].until;

type Connection = http1::Connection<UpstreamIo, UploadBody>;

/// A client connection's upstream connection, shared by its handlers (which send) and its
/// task's driver ([`drive`], which polls the connection).
#[derive(Default)]
pub(crate) struct Pair {
    slot: Mutex<Slot>,
    /// A new connection waits in the slot for the driver (set before `sent`).
    handed: AtomicBool,
    /// A request was handed to the connection since the driver last polled it.
    sent: AtomicBool,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Slot {
    sender: Option<http1::SendRequest<UploadBody>>,
    connection: Option<Pin<Box<Connection>>>,
    /// The client connection has offered a small exchange before.
    reused: bool,
}

/// How a request offered to a pair went.
pub(crate) enum Sent {
    /// The pair sent it: the response, or why there is none.
    Answered(Result<Response<Incoming>, PairError>),
    /// Not sent: it is the connection's first small exchange, the pair is busy or may not
    /// connect now, or its connection closed before the request was written.
    Declined(Request<UploadBody>),
}

/// Why a paired exchange has no response.
#[derive(Debug)]
pub(crate) enum PairError {
    Connect(BoxError),
    Exchange(hyper::Error),
}

impl Pair {
    /// Sends `req` over the pair's connection, opening one with `dial` if it has none (or only
    /// a closed one); `dial` gives `None` when no pair may be made now.
    pub(crate) async fn send<D>(&self, req: Request<UploadBody>, dial: impl FnOnce() -> Option<D>) -> Sent
    where
        D: Future<Output = Result<UpstreamIo, BoxError>>,
    {
        let mut sender = match self.take_sender() {
            Taken::Ready(sender) => sender,
            Taken::Busy | Taken::First => return Sent::Declined(req),
            Taken::None => match dial() {
                None => return Sent::Declined(req),
                // Boxed: opening a connection holds its IO in the future, which every exchange in
                // flight would otherwise carry whether it opens one or not.
                Some(dial) => match Box::pin(self.connect(dial)).await {
                    Ok(sender) => sender,
                    Err(error) => return Sent::Answered(Err(error)),
                },
            },
        };
        let response = sender.try_send_request(req);
        self.lock().sender = Some(sender);
        self.sent.store(true, Ordering::Release);
        match response.await {
            Ok(response) => Sent::Answered(Ok(response)),
            Err(mut error) => match error.take_message() {
                Some(req) => Sent::Declined(req),
                None => Sent::Answered(Err(PairError::Exchange(error.into_error()))),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_sender(&self) -> Taken {
        let mut slot = self.lock();
        match slot.sender.take() {
            Some(sender) if sender.is_ready() => Taken::Ready(sender),
            Some(sender) if !sender.is_closed() => {
                slot.sender = Some(sender);
                Taken::Busy
            }
            _ if !slot.reused => {
                slot.reused = true;
                Taken::First
            }
            _ => Taken::None,
        }
    }

    async fn connect<D>(&self, dial: D) -> Result<http1::SendRequest<UploadBody>, PairError>
    where
        D: Future<Output = Result<UpstreamIo, BoxError>>,
    {
        let io = dial.await.map_err(PairError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .read_buf_exact_size(Some(CLASSES[CLASSES.len() - 1].reads.max()))
            .handshake(io)
            .await
            .map_err(PairError::Exchange)?;
        self.lock().connection = Some(Box::pin(connection));
        self.handed.store(true, Ordering::Release);
        Ok(sender)
    }
}

enum Taken {
    Ready(http1::SendRequest<UploadBody>),
    Busy,
    /// The connection's first small exchange: it takes the pool.
    First,
    None,
}

pin_project_lite::pin_project! {
    /// Serves a client connection and polls its pair's upstream connection in the same task:
    /// before serving (the upstream may have answered), and after it if serving handed it a
    /// request, so the request is written in this poll rather than the next.
    /// Without a pair it only serves.
    pub(crate) struct Drive<'a, S> {
        #[pin]
        served: S,
        pair: Option<&'a Pair>,
        upstream: Option<Pin<Box<Connection>>>,
    }
}

pub(crate) fn drive<S: Future>(served: S, pair: Option<&Pair>) -> Drive<'_, S> {
    Drive { served, pair, upstream: None }
}

impl<S: Future> Future for Drive<'_, S> {
    type Output = S::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<S::Output> {
        let this = self.project();
        poll_upstream(this.upstream, cx);
        let out = this.served.poll(cx);
        // A new connection is only ever handed over with a request for it.
        if let Some(pair) = this.pair.filter(|pair| pair.sent.load(Ordering::Acquire)) {
            pair.sent.store(false, Ordering::Relaxed);
            if pair.handed.load(Ordering::Acquire) {
                pair.handed.store(false, Ordering::Relaxed);
                *this.upstream = pair.lock().connection.take();
            }
            poll_upstream(this.upstream, cx);
        }
        out
    }
}

fn poll_upstream(upstream: &mut Option<Pin<Box<Connection>>>, cx: &mut Context<'_>) {
    if let Some(connection) = upstream {
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            if let Err(error) = result {
                tracing::debug!(%error, "paired upstream connection ended with an error");
            }
            *upstream = None;
        }
    }
}
