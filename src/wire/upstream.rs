//! The pooled client to the registry: HTTP/1.1 and h2 (by ALPN), rustls, connect timing, and
//! a gauge of open upstream connections.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{Histogram, IntGauge};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::limits::buffers::{Reads, Slots, Stream};
use crate::metrics::{Counted, Metrics, OpenClients};
use crate::protocol::Side;
use crate::wire::error::SetupError;
use crate::wire::socket::Watched;

/// Where requests go: the parsed `--upstream`.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamTarget {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The authority as a header value, for `--host-header upstream`.
    pub host_header: HeaderValue,
    /// `scheme://authority`, for messages.
    pub display: String,
}

impl UpstreamTarget {
    pub(crate) fn parse(uri: &Uri) -> Result<Self, SetupError> {
        let bad = || SetupError::UpstreamUrl(uri.to_string());
        let scheme = uri.scheme().cloned().ok_or_else(bad)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad());
        }
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad());
        }
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| bad())?;
        let display = format!("{scheme}://{authority}");
        Ok(UpstreamTarget { scheme, authority, host_header, display })
    }

    /// The upstream URI for a request's path and query, kept byte for byte.
    pub(crate) fn uri_for(&self, path_and_query: Option<&http::uri::PathAndQuery>) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query =
            Some(path_and_query.cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        Ok(Uri::from_parts(parts)?)
    }
}

/// Idle connections kept per pool (nginx's usual `keepalive 64`).
const MAX_IDLE: usize = 64;

/// How long an idle connection of a class larger than the smallest is kept (when the idle
/// timeout is longer). hyper keeps a pooled connection's read buffer at its last size, up to
/// about 1 MiB: a transfer that follows within this reuses it, one later pays a connect (about a
/// round trip), where the pool would hold megabytes for the whole idle timeout.
const LARGER_CLASS_IDLE: Duration = Duration::from_secs(2);

pub(crate) type Connector = TimedConnector<HttpsConnector<HttpConnector>>;
pub(crate) type UpstreamClient<B> = Client<Connector, B>;

/// The registry behind one pool per read class (see [`crate::limits::buffers`]): each exchange takes
/// a connection of the largest class the load allows (exchanges in flight, and open client
/// connections when there are many). Each event loop has pools of its own, so a pooled
/// connection's task runs on the thread of the exchanges it serves (see [`crate::wire::loops`]).
pub(crate) struct Upstreams<B> {
    /// By event loop, then by class, from the largest.
    pools: Box<[Box<[Pool<B>]>]>,
    /// For connections outside the pools (see [`crate::wire::paired`]).
    connector: Connector,
    slots: Slots,
    clients_open: OpenClients,
}

/// A class's connections. Exchanges that send a body read [`Reads::sending`]: a pool of their
/// own only where that differs from the class's reads, the class's pool otherwise.
struct Pool<B> {
    receiving: UpstreamClient<B>,
    sending: Option<UpstreamClient<B>>,
}

impl<B> Upstreams<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// `large_slots` exchanges at a time, on all `loops` together, may read about 1 MiB at once.
    pub(crate) fn new(
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        idle_timeout: Duration,
        metrics: &Metrics,
        large_slots: usize,
        loops: usize,
    ) -> Self {
        let connector = connector(tls, connect_timeout, metrics);
        let slots = Slots::new(large_slots);
        // Idle connections keep their buffers: no more of a class than it may use at once, and
        // after a burst of a thousand transfers, not a thousand either; the loops share that.
        let classes = slots.classes();
        let smallest = classes.len() - 1;
        let loops = loops.max(1);
        let pools_of_a_loop = || {
            classes
                .iter()
                .enumerate()
                .map(|(i, class)| {
                    let idle = if i < smallest { idle_timeout.min(LARGER_CLASS_IDLE) } else { idle_timeout };
                    let max_idle = class.until.min(MAX_IDLE).div_ceil(loops);
                    let client = |reads| client(connector.clone(), reads, max_idle, idle);
                    let sending = (class.reads.sending() != class.reads).then(|| client(class.reads.sending()));
                    Pool { receiving: client(class.reads), sending }
                })
                .collect()
        };
        let pools = (0..loops).map(|_| pools_of_a_loop()).collect();
        Upstreams { pools, connector, slots, clients_open: metrics.open_clients() }
    }

    /// The client for a new exchange on event loop `on_loop` (below the `loops` it was made
    /// for), and the stream it counts as until the exchange is over. `sends_body`: the request
    /// has a body to forward.
    pub(crate) fn pick(&self, sends_body: bool, on_loop: usize) -> (&UpstreamClient<B>, Stream) {
        let stream = self.slots.start_with_open(self.clients_open.now());
        let pool = &self.pools[on_loop][stream.class()];
        let client = match &pool.sending {
            Some(sending) if sends_body => sending,
            _ => &pool.receiving,
        };
        (client, stream)
    }
}

impl<B> Upstreams<B> {
    /// Opens a connection of its own to `uri`'s host, timed and counted as the pools' are.
    pub(crate) fn dial(&self, uri: Uri) -> impl Future<Output = Result<UpstreamIo, BoxError>> {
        let mut connector = self.connector.clone();
        connector.call(uri)
    }

    /// Client connections open now.
    pub(crate) fn clients_open(&self) -> usize {
        self.clients_open.now()
    }
}

/// A pooled client that reads small, for the admin port's readiness probe.
pub(crate) fn probe_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    idle_timeout: Duration,
    metrics: &Metrics,
) -> UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    client(connector(tls, connect_timeout, metrics), Reads::Exactly(16 << 10), 1, idle_timeout)
}

fn connector(tls: rustls::ClientConfig, connect_timeout: Duration, metrics: &Metrics) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    TimedConnector {
        inner: https,
        connect_seconds: metrics.upstream_connect.clone(),
        open: metrics.connection_gauge(Side::Registry),
    }
}

fn client<B>(connector: Connector, reads: Reads, max_idle: usize, idle_timeout: Duration) -> UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = Client::builder(TokioExecutor::new());
    match reads {
        Reads::UpTo(max) => builder.http1_max_buf_size(max),
        Reads::Exactly(size) => builder.http1_read_buf_exact_size(size),
    };
    builder
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Times each new upstream connection (TCP and TLS) and counts the open ones.
#[derive(Clone)]
pub(crate) struct TimedConnector<C> {
    inner: C,
    connect_seconds: Histogram,
    open: IntGauge,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An open upstream connection, as the connector gives it.
pub(crate) type UpstreamIo = Watched<MaybeHttpsStream<TokioIo<TcpStream>>, Counted>;

impl<C> Service<Uri> for TimedConnector<C>
where
    C: Service<Uri, Response = MaybeHttpsStream<TokioIo<TcpStream>>> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    /// Counted in the open-connections gauge until it closes.
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let started = std::time::Instant::now();
        let connecting = self.inner.call(uri);
        let histogram = self.connect_seconds.clone();
        let open = self.open.clone();
        Box::pin(async move {
            let io = connecting.await.map_err(Into::into)?;
            histogram.observe(started.elapsed().as_secs_f64());
            crate::wire::socket::tune(match &io {
                MaybeHttpsStream::Http(tcp) => tcp.inner(),
                MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
            });
            Ok(Watched::new(io, Counted::new(open)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        for ok in ["http://127.0.0.1:5000", "https://registry.example", "http://[::1]:5000/"] {
            let t = UpstreamTarget::parse(&ok.parse().unwrap()).unwrap();
            assert!(t.display.starts_with("http"));
        }
        for bad in ["ftp://x", "127.0.0.1:5000", "/v2/", "http://x/prefix", "http://x/?q=1"] {
            assert!(UpstreamTarget::parse(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    /// Only a busy exchange that sends a body takes a pool of its own (the smallest class reads
    /// exactly, which leaves hyper's write queue at its default of about 400 KiB); downloads and
    /// quieter exchanges keep their class's pool.
    #[tokio::test]
    async fn busy_exchanges_with_a_body_take_the_pool_that_bounds_its_write_queue() {
        let metrics = Metrics::new(0);
        let tls = crate::wire::tls::client_config(None).unwrap();
        let upstreams: Upstreams<http_body_util::Empty<bytes::Bytes>> =
            Upstreams::new(tls, Duration::from_secs(1), Duration::from_secs(90), &metrics, 4, 2);
        let classes = Slots::new(4).classes();
        let smallest = classes.len() - 1;
        let open = metrics.connection_gauge(crate::protocol::Side::Client);
        // (client connections open, sends a body) -> a pool of its own?
        for ((clients_open, sends_body), own_pool) in
            [((1, true), false), ((1, false), false), ((100, true), true), ((100, false), false)]
        {
            open.set(clients_open);
            // An exchange on the second loop takes that loop's pools.
            let (client, stream) = upstreams.pick(sends_body, 1);
            let pool = &upstreams.pools[1][stream.class()];
            let in_own_pool = pool.sending.as_ref().is_some_and(|sending| std::ptr::eq(client, sending));
            let in_class_pool = std::ptr::eq(client, &pool.receiving);
            assert_eq!((in_own_pool, in_class_pool), (own_pool, !own_pool), "{clients_open} open, body {sends_body}");
            let reads = classes[stream.class()].reads;
            let reads_chosen = if sends_body { reads.sending() } else { reads };
            assert_eq!(reads_chosen != reads, own_pool, "{clients_open} open, body {sends_body}");
            assert!(matches!(reads_chosen, Reads::UpTo(_)) || !sends_body, "a sender's write queue is bounded");
            assert_eq!(stream.class() == smallest, clients_open > 64, "{clients_open} open");
        }
        assert_eq!(classes[smallest].reads.sending(), Reads::UpTo(24 << 10));
    }

    #[test]
    fn uri_keeps_path_and_query_bytes() {
        let t = UpstreamTarget::parse(&"http://127.0.0.1:5000".parse().unwrap()).unwrap();
        let pq: http::uri::PathAndQuery = "/v2/a/blobs/uploads/u?_state=AbC%3D%3D&digest=sha256%3Ax".parse().unwrap();
        let uri = t.uri_for(Some(&pq)).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=AbC%3D%3D&digest=sha256%3Ax");
    }
}
