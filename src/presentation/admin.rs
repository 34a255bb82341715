//! The admin port: `/metrics`, `/healthz`, `/readyz`, and the transfers API.
//!
//! Kept on its own listener (loopback by default) so the proxy port never exposes any of it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::recording::Tracker;
use crate::wire::upstream::{UpstreamClient, UpstreamTarget};

/// How long `/readyz` waits for the registry's `GET /v2/`.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) struct Admin {
    pub metrics: Arc<Metrics>,
    /// A client of its own for probes: probes carry no body, proxied requests do.
    pub probe: UpstreamClient<Empty<Bytes>>,
    pub upstream: UpstreamTarget,
    /// `None` when the transfers API is turned off (which turns the UI off too).
    pub transfers: Option<Arc<Tracker>>,
    /// Whether `/` and `/transfers/<id>` serve the web UI.
    pub ui: bool,
    /// Set once shutdown begins, so load balancers stop sending new work.
    draining: AtomicBool,
}

impl Admin {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        probe: UpstreamClient<Empty<Bytes>>,
        upstream: UpstreamTarget,
        transfers: Option<Arc<Tracker>>,
    ) -> Self {
        Admin { metrics, probe, upstream, transfers, ui: true, draining: AtomicBool::new(false) }
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n"));
        }
        Ok(match req.uri().path() {
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness().await,
            path if path == TRANSFERS || path.starts_with(TRANSFERS_PREFIX) => self.transfers(path, req.uri().query()),
            "/api/v1/live" => match &self.transfers {
                Some(tracker) => json(&tracker.live()),
                None => text(StatusCode::NOT_FOUND, "the transfers API is disabled\n"),
            },
            path if self.ui && (path == "/" || path.starts_with("/transfers/")) => self.ui_page(path),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        })
    }

    /// `GET /api/v1/transfers?limit=N` (newest first) and `GET /api/v1/transfers/<id>`.
    fn transfers(&self, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        let Some(tracker) = &self.transfers else {
            return text(StatusCode::NOT_FOUND, "the transfers API is disabled (--disable-transfers-api)\n");
        };
        if path == TRANSFERS {
            let limit = match crate::protocol::query_param(query, "limit").map(str::parse::<usize>) {
                None => 100,
                Some(Ok(n)) => n,
                Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "limit must be a non-negative integer\n"),
            };
            let transfers = tracker.recent(limit);
            return json(&serde_json::json!({ "transfers": transfers }));
        }
        let id = &path[TRANSFERS_PREFIX.len()..];
        match id.parse::<u64>().ok().and_then(|id| tracker.get(id)) {
            Some(transfer) => json(&*transfer),
            None => text(StatusCode::NOT_FOUND, "no such transfer\n"),
        }
    }

    /// Ready when not draining and the registry answers `GET /v2/` with anything but a 5xx
    /// (a 401 means it is up and wants a token).
    async fn readiness(&self) -> Response<Full<Bytes>> {
        if self.draining.load(Ordering::Relaxed) {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
        }
        let Ok(uri) = self.upstream.uri_for(Some(&http::uri::PathAndQuery::from_static("/v2/"))) else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "bad upstream\n");
        };
        let mut probe = Request::new(Empty::new());
        *probe.uri_mut() = uri;
        match tokio::time::timeout(READY_PROBE_TIMEOUT, self.probe.request(probe)).await {
            Ok(Ok(response)) if !response.status().is_server_error() => text(StatusCode::OK, "ready\n"),
            Ok(Ok(response)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("upstream {} answered {}\n", self.upstream.display, response.status()),
            ),
            Ok(Err(error)) => {
                let (_, cause) = crate::wire::error::classify_client_error(&error);
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("upstream {} unreachable: {cause}\n", self.upstream.display),
                )
            }
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("upstream {} did not answer within {READY_PROBE_TIMEOUT:?}\n", self.upstream.display),
            ),
        }
    }
}

impl Admin {
    fn ui_page(&self, path: &str) -> Response<Full<Bytes>> {
        let Some(tracker) = &self.transfers else {
            return text(StatusCode::NOT_FOUND, "the UI needs the transfers API, which is disabled\n");
        };
        if path == "/" {
            return html(
                crate::presentation::ui::index(&tracker.live(), &tracker.recent(50)),
                "text/html; charset=utf-8",
            );
        }
        let rest = &path["/transfers/".len()..];
        let (id, svg) = match rest.strip_suffix(".svg") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        match id.parse::<u64>().ok().and_then(|id| tracker.get(id)) {
            Some(t) if svg => html(crate::presentation::waterfall::render_svg(&t), "image/svg+xml"),
            Some(t) => html(crate::presentation::ui::transfer_page(&t), "text/html; charset=utf-8"),
            None => text(StatusCode::NOT_FOUND, "no such transfer\n"),
        }
    }
}

fn html(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

const TRANSFERS: &str = "/api/v1/transfers";
const TRANSFERS_PREFIX: &str = "/api/v1/transfers/";

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
