//! One exchange: classify, rewrite, forward, wrap both bodies in timers, and map upstream
//! failures to registry-style responses.
//!
//! Nothing is buffered: the client's `Incoming` body is the upstream request's body, and the
//! upstream's body is the client's response body, each inside a [`TimedBody`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{Drain, TimedBody};
use crate::body::{Exchange, Recorders, ResponseInfo};
use crate::limits::admission;
use crate::limits::head_timeout::{EndsRequest, HeadClock};
use crate::limits::shares::Shares;
use crate::protocol::CAPTURE_LIMIT;
use crate::protocol::{classify, Operation, Route};
use crate::protocol::{percent_decode, query_param, BodyEnd, Direction, Party, Redirected};
use crate::traces::{parse_traceparent, traceparent, RequestTrace, SpanId};
use crate::wire::elsewhere;
use crate::wire::error::ProxyError;
use crate::wire::gather::{self, Gathering};
use crate::wire::headers::{self, ClientView, HostMode, Origin};
use crate::wire::identity::{self, Cidr};
use crate::wire::paired::Pair;
use crate::wire::redirects::{Kind, Redirect, Redirects, AUTH_PREFIX, PREFIX};
use crate::wire::send::UpstreamBody;
use crate::wire::upstream::{UpstreamTarget, Upstreams};

/// The body of every response regscope sends: the registry's, streamed and timed, or one of
/// our own small error bodies.
pub(crate) type ProxyBody = Either<TimedBody<UpstreamBody>, Full<Bytes>>;

/// A response body as hyper gets it: it tells the connection's head clock when it is let go.
pub(crate) type SentBody = EndsRequest<ProxyBody>;

/// The body of every request regscope forwards: none, or the client's, timed. Boxed: hyper
/// queues requests to an upstream connection in blocks of 32, allocated per connection, so the
/// request's size is paid 32 times over for each of a thousand pooled connections.
pub(crate) type UploadBody = Either<Empty<Bytes>, Box<TimedBody<Incoming>>>;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as `X-Forwarded-For` carries it, made once for all its requests.
    pub forwarded_for: HeaderValue,
    /// Whether the client reached us over TLS.
    pub tls: bool,
    /// The connection's flush signal (HTTP/1), so a response ends when its bytes are out.
    pub drain: Option<Arc<Drain>>,
    /// Whether the connection waits for a request head (HTTP/1: its header read timeout).
    pub head_clock: Option<Arc<HeadClock>>,
    /// The connection's own upstream connection for small exchanges (HTTP/1, plain upstream).
    pub pair: Option<Arc<Pair>>,
    /// The event loop serving the connection (see [`crate::wire::loops`]).
    pub on_loop: usize,
    /// Whether its socket gathers a streaming body's reads (plain HTTP/1, see [`gather`]).
    pub gathering: Option<Arc<Gathering>>,
}

impl ConnInfo {
    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// Everything one exchange needs; shared by all connections.
pub(crate) struct Proxy {
    pub upstream: UpstreamTarget,
    pub upstreams: Upstreams<UploadBody>,
    pub host_mode: HostMode,
    pub response_timeout: Duration,
    /// `None`: stall detection off.
    pub stall_timeout: Option<Duration>,
    /// `None`: uploads stream through without waiting for a slot.
    pub admission: Option<Shares>,
    /// `None`: blob downloads stream through without waiting for a slot.
    pub download_admission: Option<Shares>,
    pub recorders: Arc<Recorders>,
    /// Handles for redirects to other hosts and for token realms.
    pub redirects: Arc<Redirects>,
    /// Whether redirects to storage go through regscope (`--redirects capture`).
    pub capture_storage: bool,
    /// Whether token requests to a registry's auth realm go through regscope.
    pub capture_auth: bool,
    /// Whether requests get spans (traces are exported): off, no header is read or written.
    pub traces: bool,
    /// Peers whose forwarding headers name the client (`--trusted-proxies`).
    pub trusted: Vec<Cidr>,
}

/// Where an exchange is forwarded.
enum Target {
    /// The registry, at the request's own path.
    Registry,
    /// The storage a registry redirected to, at the URL the handle stands for.
    Storage(Redirect),
    /// A registry's token service: its realm, with the client's query.
    Auth(http::Uri),
}

impl Target {
    /// The URL of a target other than the registry.
    fn url(&self) -> Option<&http::Uri> {
        match self {
            Target::Registry => None,
            Target::Storage(redirect) => Some(&redirect.url),
            Target::Auth(url) => Some(url),
        }
    }
}

impl Proxy {
    /// Handles one request. Never fails: every failure becomes a registry-style response.
    /// `None` for the body: a request the front read (see [`crate::wire::front`]), which has none.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Option<Incoming>>,
        conn: ConnInfo,
    ) -> Result<Response<SentBody>, Infallible> {
        let head_clock = conn.head_clock.clone();
        // HTTP/1 absolute-form (`GET http://host/ HTTP/1.1`) is how forward proxies are asked;
        // for h2 the URI always carries the authority, so only h1 is checked.
        let absolute_form = req.version() <= Version::HTTP_11 && req.uri().authority().is_some();
        let refusal = if req.method() == Method::CONNECT {
            Some(ProxyError::MethodNotAllowed(req.method().to_string()))
        } else if absolute_form {
            Some(ProxyError::BadRequest(
                "absolute-form request targets are not accepted: regscope is not a forward proxy",
            ))
        } else {
            None
        };

        let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let target = match refusal {
            Some(refusal) => Err(refusal),
            None => self.target(req.method(), req.uri()),
        };
        // A token request names its repository in its scope (`repository:NAME:pull,push`).
        let scope = match &target {
            Ok(Target::Auth(_)) => scope_repository(req.uri().query()),
            _ => None,
        };
        let route = match &target {
            Err(_) => Route::op(Operation::Other),
            Ok(Target::Registry) => classify(req.method(), req.uri().path(), req.uri().query()),
            Ok(Target::Storage(redirect)) => Route {
                operation: if req.method() == Method::HEAD { Operation::StorageHead } else { Operation::StorageGet },
                repository: redirect.repository.as_deref(),
                digest: redirect.digest.as_deref(),
                ..Route::op(Operation::Other)
            },
            Ok(Target::Auth(_)) => Route { repository: scope.as_deref(), ..Route::op(Operation::AuthToken) },
        };
        let trace = self.traces.then(|| request_trace(req.headers(), path_and_query, target.as_ref().ok()));
        let client = identity::client_of(conn.peer, req.headers(), &self.trusted);
        let exchange = Exchange::start(&route, req.method(), client, path_and_query, trace, self.recorders.clone());
        let target = match target {
            Ok(target) => target,
            Err(refusal) => {
                exchange.set_status(refusal.status().as_u16());
                return Ok(refusal.to_response().map(|body| EndsRequest::new(Either::Right(body), head_clock)));
            }
        };
        let response = match self.forward(req, conn, &exchange, &target).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(kind) = error.upstream_kind() {
                    exchange.mark_upstream_error(kind);
                    tracing::warn!(id = exchange.id(), error = %error, "upstream failure");
                }
                exchange.set_status(error.status().as_u16());
                let mut response = error.to_response().map(Either::Right);
                // An unread or broken request body leaves the connection unusable: say so, so
                // the client does not send its next request into a closing socket.
                if exchange.upload_end() != Some(BodyEnd::Complete) {
                    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
                }
                response
            }
        };
        Ok(response.map(|body| EndsRequest::new(body, head_clock)))
    }

    /// Where a request goes: a storage handle (GET and HEAD) or a realm handle (GET, and POST
    /// for OAuth2 refresh tokens) while it lives, and anything else to the registry.
    fn target(&self, method: &Method, uri: &http::Uri) -> Result<Target, ProxyError> {
        let refuse = || Err(ProxyError::MethodNotAllowed(method.to_string()));
        if let Some(handle) = uri.path().strip_prefix(PREFIX) {
            if !self.capture_storage {
                return Err(ProxyError::UnknownRedirect);
            }
            if method != Method::GET && method != Method::HEAD {
                return refuse();
            }
            let redirect = self.redirects.resolve(handle, Kind::Storage, Instant::now());
            return redirect.map(Target::Storage).ok_or(ProxyError::UnknownRedirect);
        }
        if let Some(handle) = uri.path().strip_prefix(AUTH_PREFIX) {
            if !self.capture_auth {
                return Err(ProxyError::UnknownRedirect);
            }
            if method != Method::GET && method != Method::POST {
                return refuse();
            }
            let realm =
                self.redirects.resolve(handle, Kind::Auth, Instant::now()).ok_or(ProxyError::UnknownRedirect)?;
            return with_query(&realm.url, uri.query()).map(Target::Auth).ok_or(ProxyError::UnknownRedirect);
        }
        Ok(Target::Registry)
    }

    async fn forward(
        &self,
        req: Request<Option<Incoming>>,
        conn: ConnInfo,
        exchange: &Arc<Exchange>,
        target: &Target,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let mut seen = headers::seen(&parts.headers);
        // Clones share the request's bytes (no copy): the headers and target are rewritten below.
        let host_header = seen.host.clone();
        let authority = parts.uri.authority().cloned();
        let client_host =
            host_header.as_ref().and_then(|h| h.to_str().ok()).or_else(|| authority.as_ref().map(|a| a.as_str()));
        match target.url() {
            None => {
                let view = ClientView { ip: &conn.forwarded_for, scheme: conn.scheme(), host: client_host };
                let (mode, upstream) = (self.host_mode, &self.upstream.host_header);
                if let Some(stripped) =
                    headers::forward_request_headers_seen(&mut parts.headers, &seen, &view, mode, upstream)
                {
                    seen = stripped;
                }
            }
            Some(url) => {
                let host = url.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                let host = host.ok_or(ProxyError::UnknownRedirect)?;
                parts.headers = if matches!(target, Target::Auth(_)) {
                    elsewhere::auth_request_headers(&parts.headers, &host)
                } else {
                    elsewhere::storage_request_headers(&parts.headers, &host)
                };
                parts.uri = url.clone();
            }
        }
        parts.version = Version::HTTP_11;
        // A request without a body sends none upstream: there is nothing to time.
        let body = body.filter(|body| !http_body::Body::is_end_stream(body));
        let sends_body = body.is_some();
        // A small exchange with the registry goes over the client connection's own upstream
        // connection when it has one, with the origin-form target it arrived with; the pooled
        // client takes the target in absolute form and supplies a missing `Host` itself.
        let pair = conn
            .pair
            .as_ref()
            .filter(|_| !sends_body && matches!(target, Target::Registry) && answers_small(exchange.info().operation));
        match pair {
            Some(_) if !parts.headers.contains_key(header::HOST) => {
                parts.headers.insert(header::HOST, self.upstream.host_header.clone());
            }
            None if target.url().is_none() => parts.uri = self.upstream_uri(&parts.uri)?,
            _ => {}
        }
        // The registry's spans nest under this request's (its `tracestate` passes untouched).
        if let Some((trace, span, flags)) = exchange.trace_parent() {
            if let Ok(value) = HeaderValue::from_bytes(&traceparent(trace, span, flags)) {
                parts.headers.insert(TRACEPARENT, value);
            }
        }

        // Requests to storage and token realms carry headers of their own making.
        let declared = match target.url() {
            None => seen.content_length,
            Some(_) => content_length(&parts.headers),
        };
        if let Some(length) = declared {
            exchange.set_upload_expected(length);
        }
        let body = match body {
            Some(body) => {
                let streaming = conn.gathering.as_ref().filter(|_| gather::worth_gathering(declared));
                let mut body = TimedBody::new(body, Direction::Upload, exchange.clone())
                    .stall_timeout(self.stall_timeout)
                    .hold(streaming.map(|gathering| Box::new(gathering.start()) as Box<_>));
                if exchange.info().operation == Operation::ManifestPut {
                    body = body.capture(CAPTURE_LIMIT, declared);
                }
                Either::Right(Box::new(body))
            }
            None => Either::Left(Empty::new()),
        };
        // Held until the response head: the upstream connection is busy until then.
        let ticket = match &self.admission {
            Some(slots) if admission::needs_slot(exchange.info().operation, !sends_body, declared) => {
                Some(slots.of_loop(conn.on_loop).admit(exchange.clone()).await)
            }
            _ => None,
        };
        // Held by the response body until it ends.
        let download_slot = match &self.download_admission {
            Some(slots) if admission::needs_download_slot(exchange.info().operation, &parts.method) => {
                Some(Box::new(slots.of_loop(conn.on_loop).admit(exchange.clone()).await) as Box<_>)
            }
            _ => None,
        };
        exchange.mark_forwarded(sends_body);
        let upstream_name = match target.url() {
            None => self.upstream.display.as_str(),
            Some(url) => url.authority().map_or("", |a| a.as_str()),
        };
        let request = Request::from_parts(parts, body);
        let response = self.await_response(request, sends_body, pair, conn.on_loop, exchange, upstream_name).await;
        drop(ticket);
        let response = response?;

        let (mut parts, body) = response.into_parts();
        let upstream_origin = match target.url() {
            None => Origin { scheme: self.upstream.scheme.as_str(), authority: self.upstream.authority.as_str() },
            Some(url) => Origin {
                scheme: url.scheme_str().unwrap_or("http"),
                authority: url.authority().map_or("", |a| a.as_str()),
            },
        };
        let client_origin = client_host.map(|authority| Origin { scheme: conn.scheme(), authority });
        let mut seen = headers::seen(&parts.headers);
        let info = ResponseInfo {
            upload_uuid: seen.upload_uuid.take(),
            content_digest: seen.content_digest.take(),
            content_length: seen.content_length,
        };
        let declared = info.content_length;
        headers::forward_response_headers_seen(&mut parts.headers, &seen, &upstream_origin, client_origin.as_ref());
        if let Some(client) = &client_origin {
            if parts.status.is_redirection() {
                self.capture_redirect(&mut parts.headers, &upstream_origin, client, exchange);
            }
            if parts.status == http::StatusCode::UNAUTHORIZED && matches!(target, Target::Registry) {
                self.capture_realm(&mut parts.headers, client);
            }
        }
        let capture = parts.status.is_success()
            && matches!(exchange.info().operation, Operation::ManifestGet | Operation::V1AncestryGet);
        exchange.mark_response_head(parts.status.as_u16(), info);
        let mut body = TimedBody::new(body, Direction::Download, exchange.clone())
            .stall_timeout(self.stall_timeout)
            .drain(conn.drain.clone())
            .hold(download_slot);
        if capture {
            body = body.capture(CAPTURE_LIMIT, declared);
        }
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

impl Proxy {
    /// A redirect to another host becomes a regscope URL under a handle (capture mode), so the
    /// bytes come through here; either way it is counted.
    fn capture_redirect(
        &self,
        headers: &mut http::HeaderMap,
        upstream: &Origin<'_>,
        client: &Origin<'_>,
        exchange: &Exchange,
    ) {
        let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else { return };
        if !elsewhere::points_elsewhere(location, upstream, client) {
            return;
        }
        let captured = self.capture_storage.then(|| {
            let url: http::Uri = location.parse().ok()?;
            let info = exchange.info();
            let handle =
                self.redirects.capture(url, info.repository.as_deref(), info.digest.as_deref(), Instant::now())?;
            HeaderValue::from_str(&format!("{}://{}{PREFIX}{handle}", client.scheme, client.authority)).ok()
        });
        let handling = match captured.flatten() {
            Some(value) => {
                headers.insert(header::LOCATION, value);
                Redirected::Captured
            }
            None => Redirected::Passed,
        };
        self.recorders.metrics.redirects.with_label_values(&[Party::Storage.as_str(), handling.as_str()]).inc();
    }

    /// A `Bearer` challenge's realm becomes a regscope URL under a handle (when auth is captured),
    /// so the client's token requests come through here; either way it is counted.
    fn capture_realm(&self, headers: &mut http::HeaderMap, client: &Origin<'_>) {
        let challenges: Vec<HeaderValue> = headers.get_all(header::WWW_AUTHENTICATE).iter().cloned().collect();
        if !challenges.iter().any(|c| c.to_str().ok().and_then(elsewhere::bearer_realm).is_some()) {
            return;
        }
        let mut handling = Redirected::Passed;
        if self.capture_auth {
            headers.remove(header::WWW_AUTHENTICATE);
            for challenge in challenges {
                let rewritten = challenge.to_str().ok().and_then(|text| {
                    let range = elsewhere::bearer_realm(text)?;
                    let handle = self.redirects.capture_realm(text[range.clone()].parse().ok()?, Instant::now())?;
                    let realm = format!("{}://{}{AUTH_PREFIX}{handle}", client.scheme, client.authority);
                    HeaderValue::from_str(&format!("{}{realm}{}", &text[..range.start], &text[range.end..])).ok()
                });
                if rewritten.is_some() {
                    handling = Redirected::Captured;
                }
                headers.append(header::WWW_AUTHENTICATE, rewritten.unwrap_or(challenge));
            }
        }
        self.recorders.metrics.redirects.with_label_values(&[Party::Auth.as_str(), handling.as_str()]).inc();
    }
}

/// `realm` with the client's query added: the token request's service and scope, as it sent them.
fn with_query(realm: &http::Uri, query: Option<&str>) -> Option<http::Uri> {
    let Some(query) = query.filter(|q| !q.is_empty()) else { return Some(realm.clone()) };
    let separator = if realm.query().is_some() { '&' } else { '?' };
    format!("{realm}{separator}{query}").parse().ok()
}

/// Whether an operation's answer is small (no blob), so it may take a connection's own
/// upstream connection, which reads small.
fn answers_small(operation: Operation) -> bool {
    !matches!(operation, Operation::BlobGet | Operation::V1LayerGet | Operation::Other)
}

/// The repository a token request's first repository scope names.
fn scope_repository(query: Option<&str>) -> Option<String> {
    let scope = percent_decode(query_param(query, "scope")?).into_owned();
    let name = scope.strip_prefix("repository:")?.rsplit_once(':')?.0;
    Some(name.to_owned())
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A request's span: its own id, the client's context if it sent one, its redacted path.
fn request_trace(headers: &http::HeaderMap, path_and_query: &str, target: Option<&Target>) -> Box<RequestTrace> {
    Box::new(RequestTrace {
        span_id: SpanId::random(),
        client: headers.get(TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes())),
        path: headers::redact_path(path_and_query).into_owned(),
        upstream: target.and_then(Target::url).and_then(|u| u.authority()).map(|a| a.as_str().to_owned()),
    })
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}
