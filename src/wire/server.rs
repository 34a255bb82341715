//! Listeners (plain and TLS), the accept loops, and graceful shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind `127.0.0.1:0`
//! and drive a real server over real sockets.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::body::Drain;
use crate::limits::buffers::{self, Slots};
use crate::limits::head_timeout::{cut_when_idle, HeadClock};
use crate::metrics::Counted;
use crate::presentation::admin::Admin;
use crate::protocol::Side;
use crate::wire::front::{self, Front, Left};
use crate::wire::gather::{Gathered, Gathering};
use crate::wire::headers;
use crate::wire::loops::Loops;
use crate::wire::paired::Pair;
use crate::wire::proxy::{ConnInfo, Proxy};
use crate::wire::proxy_protocol::{self, Source};
use crate::wire::socket::{Prefixed, Watch, Watched};

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Limits that keep one client from hurting the others.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// Client connections at a time whose reads may be large (see [`crate::limits::buffers`]).
    pub large_read_connections: usize,
    /// After shutdown begins, how long in-flight connections may finish.
    pub grace: Duration,
    /// Every connection starts with a PROXY protocol header (`--proxy-protocol`).
    pub proxy_protocol: bool,
}

/// Sent, then the connection closed, when `max_connections` are already being served.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
docker-distribution-api-version: registry/2.0\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 97\r\n\r\n\
{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"regscope: too many connections, try again shortly\"}]}";

/// What the proxy listener serves.
pub(crate) struct ProxyListener {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
}

/// Runs the proxy and admin listeners until `shutdown` resolves, then stops accepting and
/// lets in-flight connections finish for up to `grace`. Connections are served on `loops`.
pub(crate) async fn run(
    proxy_listener: ProxyListener,
    mut loops: Loops,
    admin_listener: TcpListener,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let builders = Arc::new(Builders::new(&limits));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let large_reads = Slots::new(limits.large_read_connections);

    let admin_task = tokio::spawn(admin_loop(admin_listener, admin.clone()));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = proxy_listener.listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        crate::wire::socket::tune(&stream);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_overloaded(stream, proxy_listener.tls.is_some()));
            continue;
        };
        let mut conn = ConnInfo {
            peer,
            forwarded_for: headers::forwarded_for(peer.ip()),
            tls: proxy_listener.tls.is_some(),
            drain: None,
            head_clock: None,
            pair: None,
            on_loop: 0,
            gathering: None,
        };
        let watcher = graceful.watcher();
        let (tls, proxy, builders) = (proxy_listener.tls.clone(), proxy.clone(), builders.clone());
        let large_reads = large_reads.clone();
        let mut stop = stop_rx.clone();
        let header_read_timeout = limits.header_read_timeout;
        let proxy_protocol = limits.proxy_protocol;
        loops.spawn(stream, move |mut stream, on_loop| async move {
            conn.on_loop = on_loop;
            let _slot = slot;
            let _open = Counted::new(proxy.recorders.metrics.connection_gauge(Side::Client));
            if proxy_protocol {
                let header = tokio::select! {
                    header = proxy_protocol::read_header(&mut stream, header_read_timeout) => header,
                    _ = stop.changed() => return,
                };
                match header {
                    Ok(Source::Client(client)) => {
                        conn.peer = client;
                        conn.forwarded_for = headers::forwarded_for(client.ip());
                    }
                    Ok(Source::Peer) => {}
                    Err(refused) => {
                        return tracing::debug!(peer = %conn.peer, ?refused, "no valid PROXY header: connection closed")
                    }
                }
            }
            // Until a client has said which protocol it speaks it is not served; a silent one is
            // closed after the header timeout, and shutdown does not wait for it.
            let result = match tls {
                None => {
                    let h2 = tokio::select! {
                        h2 = speaks_h2(&stream, header_read_timeout) => h2,
                        _ = stop.changed() => return,
                    };
                    match h2 {
                        None => return tracing::debug!(peer = %conn.peer, "no request head in time"),
                        Some(true) => {
                            builders.serve(TokioIo::new(stream), true, &large_reads, proxy, conn.clone(), watcher).await
                        }
                        Some(false) => {
                            builders.serve_plain_h1(stream, &large_reads, proxy, conn.clone(), watcher, &stop).await
                        }
                    }
                }
                Some(acceptor) => {
                    // Boxed: a handshake and a TLS stream are kilobytes that a plain connection's
                    // task would otherwise hold too.
                    let serving =
                        Box::pin(builders.serve_tls(acceptor, stream, &large_reads, proxy, &conn, watcher, stop));
                    serving.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(peer = %conn.peer, %error, "connection ended with an error");
            }
        });
    }
    // Readiness flips first, so nobody sees a closed port while /readyz still says ready.
    admin.set_draining();
    drop(proxy_listener);
    let _ = stop_tx.send(true);
    tracing::info!(connections = graceful.count(), "shutting down: no longer accepting, draining");
    let grace = limits.grace;
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "grace period over, exiting with requests in flight"),
    }
    admin_task.abort();
    drop(loops);
}

/// One builder per protocol (and read size): the protocol is decided before serving (ALPN, or
/// the first bytes), so hyper never sniffs a silent connection without a deadline.
struct Builders {
    /// HTTP/1 connections holding a large-read slot: request bodies arrive in frames of up to about 1 MiB.
    h1_large: http1::Builder,
    h1_small: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// How long an HTTP/1 connection may wait for a request head (see [`cut_when_idle`]).
    header_read_timeout: Duration,
    /// The longest request head.
    max_head: usize,
}

impl Builders {
    fn new(limits: &Limits) -> Self {
        // The read buffer also holds the request head, so it is never smaller than the head
        // limit (rounded up as reads are, see `growth_size`); `max_header_size` is what answers
        // 431 to a head over the limit.
        let h1 = |max_read: usize| {
            let mut builder = http1::Builder::new();
            // The header read timeout is `cut_when_idle`'s: hyper's would set a timer per head.
            builder
                .header_read_timeout(None)
                .max_header_size(limits.max_header_bytes)
                .max_buf_size(buffers::growth_size(max_read.max(limits.max_header_bytes)));
            builder
        };
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        // Other client connections read adaptively up to the first smaller class (56 KiB): a
        // connection's class is fixed when it opens, long before it knows what it will carry.
        Builders {
            h1_large: h1(buffers::LARGE),
            h1_small: h1(buffers::CLASSES[0].reads.max()),
            h2,
            header_read_timeout: limits.header_read_timeout,
            max_head: limits.max_header_bytes,
        }
    }

    /// A TLS connection: its handshake (which shutdown or a timeout may end), then [`Self::serve`].
    #[allow(clippy::too_many_arguments)]
    async fn serve_tls(
        &self,
        acceptor: TlsAcceptor,
        stream: TcpStream,
        large_reads: &Slots,
        proxy: Arc<Proxy>,
        conn: &ConnInfo,
        watcher: Watcher,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), hyper::Error> {
        let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
        let accepted = tokio::select! {
            accepted = handshake => accepted,
            _ = stop.changed() => return Ok(()),
        };
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(peer = %conn.peer, %error, "TLS handshake failed");
                return Ok(());
            }
            Err(_) => {
                tracing::debug!(peer = %conn.peer, "TLS handshake timed out");
                return Ok(());
            }
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve(TokioIo::new(stream), h2, large_reads, proxy, conn.clone(), watcher).await
    }

    /// Serves one connection to its end (or until shutdown, or its header read timeout, ends
    /// it). An HTTP/1 connection takes a large-read slot for its whole life if one is free, and
    /// tells each response body when its bytes are out (see [`Drain`]).
    async fn serve<I>(
        &self,
        io: I,
        h2: bool,
        large_reads: &Slots,
        proxy: Arc<Proxy>,
        conn: ConnInfo,
        watcher: Watcher,
    ) -> Result<(), hyper::Error>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        // Boxed, so a connection's task holds only the protocol it speaks, not the larger of the two.
        if h2 {
            let service = service_fn(move |req: Request<Incoming>| proxy.clone().handle(req.map(Some), conn.clone()));
            let serving = Box::pin(watcher.watch(self.h2.serve_connection(io, service)));
            return serving.await;
        }
        let h1 = H1::new(&proxy, conn);
        let stream = large_reads.start();
        let served = self.serve_h1(io, stream.large(), &h1, proxy, watcher);
        // Made before it is awaited: a temporary would be kept beside the box for the whole await.
        let serving = Box::pin(cut_when_idle(served, &h1.clock, self.header_read_timeout));
        let result = serving.await;
        drop(stream);
        h1.ended(result)
    }

    /// A plain HTTP/1 connection: the front serves it (see [`front`]) until a request it does
    /// not serve, and hyper from there on.
    async fn serve_plain_h1(
        &self,
        mut stream: TcpStream,
        large_reads: &Slots,
        proxy: Arc<Proxy>,
        mut conn: ConnInfo,
        watcher: Watcher,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), hyper::Error> {
        let gathering = Arc::new(Gathering::default());
        conn.gathering = Some(gathering.clone());
        let h1 = H1::new(&proxy, conn);
        let slot = large_reads.start();
        let served = cut_when_idle(
            async {
                let read = if front::first_is_for_hyper(&stream).await {
                    Vec::new()
                } else {
                    let front = Front {
                        stream: &mut stream,
                        proxy: &proxy,
                        conn: &h1.conn,
                        clock: &h1.clock,
                        drain: &h1.drain,
                        max_head: self.max_head,
                        stop,
                    };
                    // Boxed, and let go at the hand-over: the front's state (the handler's future
                    // among it) would otherwise stay allocated beside hyper's for the connection's life.
                    let serving = Box::pin(front.serve());
                    match serving.await {
                        Left::Closed => {
                            h1.drain.abandoned();
                            return Ok(());
                        }
                        Left::ToHyper(read) => read,
                    }
                };
                let io = Prefixed::new(read, TokioIo::new(Gathered::new(stream, gathering)));
                self.serve_h1(io, slot.large(), &h1, proxy.clone(), watcher).await
            },
            &h1.clock,
            self.header_read_timeout,
        );
        let result = Box::pin(served).await;
        h1.ended(result)
    }

    /// hyper serves an HTTP/1 connection.
    async fn serve_h1<I>(
        &self,
        io: I,
        large: bool,
        h1: &H1,
        proxy: Arc<Proxy>,
        watcher: Watcher,
    ) -> Result<(), hyper::Error>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (conn, heads) = (h1.conn.clone(), h1.clock.clone());
        // Detached in `call`, before hyper's next read of the connection: not in the handler,
        // which hyper only polls after that read.
        let service = service_fn(move |mut req: Request<Incoming>| {
            headers::detach_head(&mut req);
            heads.head_arrived();
            proxy.clone().handle(req.map(Some), conn.clone())
        });
        let io = Watched::new(io, DrainOnClose(h1.drain.clone()));
        let builder = if large { &self.h1_large } else { &self.h1_small };
        watcher.watch(builder.serve_connection(io, service)).await
    }
}

/// What an HTTP/1 connection's requests share: its flush signal and head clock, and its pair.
struct H1 {
    conn: ConnInfo,
    drain: Arc<Drain>,
    clock: Arc<HeadClock>,
}

impl H1 {
    fn new(proxy: &Proxy, mut conn: ConnInfo) -> Self {
        let drain = Arc::new(Drain::default());
        conn.drain = Some(drain.clone());
        let clock = Arc::new(HeadClock::new());
        conn.head_clock = Some(clock.clone());
        // Over TLS a pair would cost a handshake per client connection where the pool shares
        // one (h2, when the registry offers it): pairs are for plain upstreams only.
        conn.pair = (proxy.upstream.scheme == http::uri::Scheme::HTTP).then(|| Arc::new(Pair::default()));
        H1 { conn, drain, clock }
    }

    /// A connection cut by its header read timeout (`None`) ended without error.
    fn ended(&self, result: Option<Result<(), hyper::Error>>) -> Result<(), hyper::Error> {
        result.unwrap_or_else(|| {
            tracing::debug!(peer = %self.conn.peer, "no request head in time");
            Ok(())
        })
    }
}

/// Tells the response in progress when hyper has flushed all it queued for the client, and
/// that it never will once the connection is gone.
struct DrainOnClose(Arc<Drain>);

impl Watch for DrainOnClose {
    fn flushed(&self) {
        self.0.flushed();
    }
}

impl Drop for DrainOnClose {
    fn drop(&mut self) {
        self.0.abandoned();
    }
}

/// Whether a plain connection opens with the HTTP/2 preface (`PRI * HTTP/2.0`), from its first
/// bytes; `None` if it closes or sends too little within `within`.
async fn speaks_h2(stream: &tokio::net::TcpStream, within: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI ";
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // Still a prefix of the preface: a byte-at-a-time sender. Peek returns at once while
        // bytes are waiting, so pause before looking again.
        tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(10))).await.ok()?;
    }
}

/// Answers a connection beyond the limit with a registry-style 503 and closes it. Over TLS
/// there is no cheap way to answer, so the connection is just closed.
async fn refuse_overloaded(mut stream: tokio::net::TcpStream, tls: bool) {
    use tokio::io::AsyncWriteExt;
    tracing::warn!("connection limit reached: refusing a connection");
    if !tls {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(OVERLOADED)).await;
        let _ = stream.shutdown().await;
    }
}

async fn admin_loop(listener: TcpListener, admin: Arc<Admin>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| admin.clone().handle(req));
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::OVERLOADED;

    #[test]
    fn overloaded_response_is_well_formed() {
        let text = std::str::from_utf8(OVERLOADED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
    }
}
