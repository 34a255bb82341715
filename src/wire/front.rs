//! A plain HTTP/1 client connection, served by regscope's own code while its requests are
//! small and bodiless, and handed to hyper at the first that is not.
//!
//! Most requests a registry sees are manifest GETs, HEADs and pings: no body either way worth
//! streaming, answered over the connection's pair (see [`crate::wire::paired`]). hyper's server
//! machinery (its dispatcher, its message state, its write queue, its slot for the service's
//! future) costs about as much per such request as all of regscope's recording. The front reads
//! the head itself ([`crate::wire::h1_front`]), runs the same [`Proxy::handle`], and writes the
//! response. The first request that is anything else (a body, a blob, an upgrade, a malformed
//! or oversized head) is left unread in the buffer, and hyper serves the connection from there
//! on, with its own answers to bad input: the front never answers a request it does not serve.
//!
//! As with hyper: a client that closes its side while its request is handled cancels it, a
//! response body that ends short of its length closes the connection, and the connection
//! closes after the response in progress when shutdown begins.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http_body::Body;
use tokio::net::TcpStream;

use crate::body::Drain;
use crate::limits::head_timeout::HeadClock;
use crate::wire::h1_front::{self, BodyLength, Framing, Head};
use crate::wire::proxy::{ConnInfo, Proxy, SentBody};
use crate::wire::redirects::{AUTH_PREFIX, PREFIX};

/// Each thread's scratch buffer for reads (hyper's first read size too).
const READ_SIZE: usize = 8 * 1024;

/// How a connection left the front.
pub(crate) enum Left {
    /// It is closed (or failed): nothing more to serve.
    Closed,
    /// Its next request is for hyper: the bytes already read, unconsumed.
    ToHyper(Vec<u8>),
}

/// The connection's parts the front uses.
pub(crate) struct Front<'a> {
    pub stream: &'a mut TcpStream,
    pub proxy: &'a Arc<Proxy>,
    pub conn: &'a ConnInfo,
    pub clock: &'a HeadClock,
    pub drain: &'a Drain,
    pub max_head: usize,
    /// Turns `true` when shutdown begins.
    pub stop: &'a tokio::sync::watch::Receiver<bool>,
}

impl Front<'_> {
    /// Serves requests until the connection closes or a request is for hyper.
    pub(crate) async fn serve(self) -> Left {
        let Front { stream, proxy, conn, clock, drain, max_head, stop } = self;
        let mut buf = Buffer::default();
        let mut headers = http::HeaderMap::new();
        // Made once: a watch registers its waker when first polled, not on every read.
        let mut shutdown = stop.clone();
        let mut stopped = pin!(async move {
            let _ = shutdown.changed().await;
        });
        let mut stopping = false;
        loop {
            // An idle connection ends at shutdown; one in the middle of a head is let finish it.
            let head = poll_fn(|cx| {
                if buf.held.is_empty() && !stopping && stopped.as_mut().poll(cx).is_ready() {
                    stopping = true;
                }
                if buf.held.is_empty() && stopping {
                    return Poll::Ready(None);
                }
                buf.poll_head(stream, cx, max_head, &mut headers)
            })
            .await;
            let (request, keep_alive) = match head {
                Some(Head::Bodiless { request, keep_alive, .. }) => (request, keep_alive),
                Some(_) => return Left::ToHyper(buf.held),
                None => return Left::Closed,
            };
            clock.head_arrived();
            let head_request = request.method() == http::Method::HEAD;
            // Pinned where it is made: the handler's future is kilobytes, and each move of it is a
            // copy into memory that is cold by the connection's next request.
            let handling = pin!(proxy.clone().handle(request.map(|()| None), conn.clone()));
            let Some(Ok(response)) = until_client_leaves(handling, stream, &mut buf, max_head).await else {
                return Left::Closed;
            };
            let closing = !keep_alive || *stop.borrow();
            match write_response(stream, response, head_request, closing, drain, &mut headers).await {
                Ok(true) if !*stop.borrow() => {}
                _ => return Left::Closed,
            }
        }
    }
}

/// Whether the front serves a request: anything but a blob's or a v1 layer's bytes, and
/// regscope's own storage and realm handles, which may stream large answers. hyper's write
/// queue is built for those, and their slots and redirects are hyper's path's alone.
fn serves(method: &http::Method, path: &str) -> bool {
    !path.starts_with(PREFIX) && !path.starts_with(AUTH_PREFIX) && !may_get_blob(method, path)
}

/// Whether a connection's first request is one the front would hand over, told from its
/// request line as it waits in the socket (peeked, not read). Such a connection goes to hyper at
/// once, and the front allocates nothing for it. `false` when the line is not all there yet:
/// the front then reads it, and hands it over as usual.
pub(crate) async fn first_is_for_hyper(stream: &TcpStream) -> bool {
    poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut room = tokio::io::ReadBuf::new(scratch);
            match ready!(stream.poll_peek(cx, &mut room)) {
                Ok(_) => Poll::Ready(line_is_for_hyper(room.filled())),
                Err(_) => Poll::Ready(false),
            }
        })
    })
    .await
}

/// Whether a request line (and whatever follows it) is for a request the front does not serve.
fn line_is_for_hyper(data: &[u8]) -> bool {
    let Some(end) = data.iter().position(|&b| b == b'\n') else { return false };
    let mut words = data[..end].split(|&b| b == b' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else { return false };
    let (Ok(method), Ok(target)) = (http::Method::from_bytes(method), std::str::from_utf8(target)) else {
        return false;
    };
    target.starts_with('/') && !serves(&method, target.split('?').next().unwrap_or(target))
}

/// Whether a request may be one [`classify`] calls `BlobGet` or `V1LayerGet`, told from the
/// path's shape alone (it is never `false` for one): classifying checks the repository name,
/// which the request's handler does once anyway.
fn may_get_blob(method: &http::Method, path: &str) -> bool {
    if method != http::Method::GET && method != http::Method::HEAD {
        return false;
    }
    if let Some(rest) = path.strip_prefix("/v2/") {
        return rest.rsplit_once('/').is_some_and(|(head, last)| head.ends_with("/blobs") && last.contains(':'));
    }
    path.starts_with("/v1/images/") && path.ends_with("/layer")
}

/// The front's reads: into one scratch buffer per thread, so a connection holds no read buffer
/// of its own. A head that arrives whole in one read (nearly all) is parsed where it was read;
/// only what is left over (part of a head, a pipelined request, the bytes hyper is handed) is
/// kept, in `held`.
#[derive(Default)]
struct Buffer {
    held: Vec<u8>,
}

thread_local!(static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_SIZE]));

impl Buffer {
    /// The next request head: one the front serves (consumed), [`Head::Other`] (nothing
    /// consumed: `held` has every byte read), or `None` when the connection has ended.
    fn poll_head(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
        max_head: usize,
        headers: &mut http::HeaderMap,
    ) -> Poll<Option<Head>> {
        loop {
            if !self.held.is_empty() {
                match judge(&self.held, max_head, headers) {
                    Head::Partial => {}
                    Head::Other => return Poll::Ready(Some(Head::Other)),
                    Head::Bodiless { len, request, keep_alive } => {
                        self.held.drain(..len);
                        if self.held.is_empty() {
                            self.held = Vec::new();
                        }
                        return Poll::Ready(Some(Head::Bodiless { len, request, keep_alive }));
                    }
                }
            }
            let read = SCRATCH.with_borrow_mut(|scratch| {
                let Some(data) = ready!(read_into(stream, cx, scratch)) else { return Poll::Ready(None) };
                if self.held.is_empty() {
                    if let Head::Bodiless { len, request, keep_alive } = judge(data, max_head, headers) {
                        self.held.extend_from_slice(&data[len..]);
                        return Poll::Ready(Some(Some(Head::Bodiless { len, request, keep_alive })));
                    }
                }
                self.held.extend_from_slice(data);
                Poll::Ready(Some(None))
            });
            match ready!(read) {
                Some(Some(head)) => return Poll::Ready(Some(head)),
                Some(None) => {}
                None => return Poll::Ready(None),
            }
        }
    }

    /// Reads what the socket has into `held`, up to `max`: whether the connection still lives.
    fn poll_more(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>, max: usize) -> Poll<bool> {
        while self.held.len() < max {
            let read = SCRATCH.with_borrow_mut(|scratch| {
                let Some(data) = ready!(read_into(stream, cx, scratch)) else { return Poll::Ready(None) };
                self.held.extend_from_slice(data);
                Poll::Ready(Some(()))
            });
            if ready!(read).is_none() {
                return Poll::Ready(false);
            }
        }
        Poll::Pending
    }
}

/// One read into `scratch`: the bytes read, or `None` at the connection's end or an error.
/// Through tokio's `poll_read`, which notes a short read as the socket drained, so the next
/// read waits for readiness instead of asking the kernel again.
fn read_into<'s>(stream: &mut TcpStream, cx: &mut Context<'_>, scratch: &'s mut [u8]) -> Poll<Option<&'s [u8]>> {
    let mut room = tokio::io::ReadBuf::new(scratch);
    match ready!(tokio::io::AsyncRead::poll_read(Pin::new(stream), cx, &mut room)) {
        Ok(()) if !room.filled().is_empty() => {
            let n = room.filled().len();
            Poll::Ready(Some(&scratch[..n]))
        }
        _ => Poll::Ready(None),
    }
}

/// A head the front serves, or [`Head::Other`] for one it does not (as for any other).
fn judge(data: &[u8], max_head: usize, headers: &mut http::HeaderMap) -> Head {
    match h1_front::parse_request(data, max_head, headers) {
        Head::Bodiless { request, .. } if !serves(request.method(), request.uri().path()) => Head::Other,
        head => head,
    }
}

/// Runs `handling` to its response, or `None` once the client has closed its side (as hyper
/// does, which drops the request's future). Bytes the client sends meanwhile (its next request)
/// are kept in `buf`, up to its limit.
async fn until_client_leaves<F: Future>(
    mut handling: Pin<&mut F>,
    stream: &mut TcpStream,
    buf: &mut Buffer,
    max_head: usize,
) -> Option<F::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(out) = handling.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        match buf.poll_more(stream, cx, max_head) {
            Poll::Ready(false) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Writes a response, head and body: whether the connection may carry another request. The
/// response's header map is left in `headers`, cleared, for the next request.
async fn write_response(
    stream: &TcpStream,
    response: http::Response<SentBody>,
    head_request: bool,
    closing: bool,
    drain: &Drain,
    headers: &mut http::HeaderMap,
) -> io::Result<bool> {
    let (mut parts, mut body) = response.into_parts();
    let length = if body.is_end_stream() {
        BodyLength::Empty
    } else {
        body.size_hint().exact().map_or(BodyLength::Unknown, BodyLength::Known)
    };
    let mut head = Vec::with_capacity(256 + parts.headers.len() * 32);
    let written = h1_front::encode_response(&parts, head_request, length, closing, &date(), &mut head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    parts.headers.clear();
    *headers = parts.headers;
    let mut left = match written.framing {
        Framing::Length(0) => {
            // Not polled: hyper does not poll a body it will not send either.
            write_all(stream, &mut [IoSlice::new(&head)]).await?;
            drain.flushed();
            return Ok(!written.close);
        }
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    // The head goes out with the body's first bytes when they are there at once.
    let mut pending_head = Some(head);
    let mut body = Pin::new(&mut body);
    loop {
        let frame = match pending_head {
            Some(_) => match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    let head = pending_head.take().unwrap_or_default();
                    write_all(stream, &mut [IoSlice::new(&head)]).await?;
                    continue;
                }
            },
            None => poll_fn(|cx| body.as_mut().poll_frame(cx)).await,
        };
        let head = pending_head.take().unwrap_or_default();
        let data = match frame {
            None => break,
            Some(Err(_)) => return Ok(false),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not sent (hyper sends them only when asked to)
            },
        };
        match &mut left {
            Some(left) => {
                let n = (*left).min(data.len() as u64) as usize;
                *left -= n as u64;
                write_all(stream, &mut [IoSlice::new(&head), IoSlice::new(&data[..n])]).await?;
                if n < data.len() {
                    return Ok(false); // more than its length: cut, as hyper does
                }
            }
            None if data.is_empty() => write_all(stream, &mut [IoSlice::new(&head)]).await?,
            None => {
                let (line, start) = chunk_size_line(data.len());
                let mut slices =
                    [IoSlice::new(&head), IoSlice::new(&line[start..]), IoSlice::new(&data), IoSlice::new(b"\r\n")];
                write_all(stream, &mut slices).await?;
            }
        }
        drain.flushed();
    }
    let head = pending_head.take().unwrap_or_default();
    match left {
        Some(0) => write_all(stream, &mut [IoSlice::new(&head)]).await?,
        Some(_) => return Ok(false), // ended short of its length
        None => write_all(stream, &mut [IoSlice::new(&head), IoSlice::new(b"0\r\n\r\n")]).await?,
    }
    drain.flushed();
    Ok(!written.close)
}

/// A chunk's size line: hex digits and CRLF, at the end of the array (the start is returned).
fn chunk_size_line(mut n: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    line[16..].copy_from_slice(b"\r\n");
    let mut start = 16;
    loop {
        start -= 1;
        line[start] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return (line, start);
        }
    }
}

/// Writes all of `slices`, waiting for room as needed.
async fn write_all(stream: &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Today's `Date` header value, formatted once a second per thread (as hyper does).
fn date() -> [u8; 29] {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local!(static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) });
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, value) = cached.get();
        if at == second {
            return value;
        }
        let mut value = [0u8; 29];
        let text = httpdate::fmt_http_date(now);
        if text.len() == value.len() {
            value.copy_from_slice(text.as_bytes());
        }
        cached.set((second, value));
        value
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{classify, Operation};
    use http::Method;

    #[test]
    fn a_first_request_line_for_hyper_is_told_before_it_is_read() {
        const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let cases: &[(String, bool)] = &[
            (format!("GET /v2/a/blobs/{D} HTTP/1.1\r\nHost: r\r\n\r\n"), true),
            (format!("HEAD /v2/a/blobs/{D} HTTP/1.1\r\n"), true),
            (format!("GET /v2/a/blobs/{D}?digest=1 HTTP/1.1\r\n"), true),
            (format!("GET {PREFIX}x HTTP/1.1\r\n"), true),
            (format!("GET {AUTH_PREFIX}x HTTP/1.1\r\n"), true),
            ("GET /v1/images/0123abcd/layer HTTP/1.1\r\n".into(), true),
            // The front's: a manifest, a ping, an upload's start.
            ("GET /v2/a/manifests/latest HTTP/1.1\r\n".into(), false),
            ("GET /v2/ HTTP/1.1\r\n".into(), false),
            ("POST /v2/a/blobs/uploads/ HTTP/1.1\r\n".into(), false),
            // Told only once read: a line not all there, a body, a target that is not a path, noise.
            (format!("GET /v2/a/blobs/{D}"), false),
            ("PATCH /v2/a/blobs/uploads/0b7e HTTP/1.1\r\n".into(), false),
            (format!("GET http://r/v2/a/blobs/{D} HTTP/1.1\r\n"), false),
            ("\u{16}\u{3}\u{1} \n".into(), false),
            (String::new(), false),
        ];
        for (line, for_hyper) in cases {
            assert_eq!(line_is_for_hyper(line.as_bytes()), *for_hyper, "{line:?}");
        }
    }

    #[test]
    fn blob_gets_are_told_from_the_path_alone() {
        const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let paths = [
            format!("/v2/a/blobs/{D}"),
            format!("/v2/library/alpine/blobs/{D}"),
            format!("/v2/blobs/blobs/{D}"),
            format!("/v2/a/manifests/blobs/{D}"),
            format!("/v2/Bad_Name/blobs/{D}"),
            format!("/v2/a/blobs/uploads/{D}"),
            "/v2/a/blobs/uploads/0b7e".into(),
            "/v2/a/blobs/latest".into(),
            format!("/v2/a/manifests/{D}"),
            "/v2/a/manifests/latest".into(),
            "/v2/".into(),
            "/v1/images/0123abcd/layer".into(),
            "/v1/images/0123abcd/json".into(),
            "/v1/images/01-23/layer".into(),
            "/v1/repositories/a/images".into(),
            "/_ping".into(),
        ];
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            for path in &paths {
                let op = classify(&method, path, None).operation;
                if matches!(op, Operation::BlobGet | Operation::V1LayerGet) {
                    assert!(may_get_blob(&method, path), "{method} {path} is {op:?}");
                }
            }
        }
        assert!(!may_get_blob(&Method::GET, "/v2/a/manifests/latest"));
        assert!(!may_get_blob(&Method::GET, "/v2/a/blobs/uploads/0b7e"));
        assert!(!may_get_blob(&Method::PUT, &format!("/v2/a/blobs/{D}")));
    }
}
