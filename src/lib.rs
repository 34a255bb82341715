//! regscope: a transparent instrumenting reverse proxy for container registries.
//!
//! It forwards registry traffic byte for byte and measures where the time of every push and
//! pull goes. The folders are the layers, outermost first; arrows point inward and down:
//!
//! - `wire`: listeners and TLS, one exchange forwarded end to end, the upstream pool, headers.
//! - `limits`: read sizes by load, upload admission, memory given back after a burst.
//! - `body`: the timed body and the exchange that records one request exactly once.
//! - `recording`: pushes and pulls, upload phases, and who each instant of a transfer belongs to.
//! - `protocol`: route classification, manifests and the shared vocabulary (pure).
//! - `metrics`: every Prometheus family: the contract.
//! - `presentation`: the admin port, the report, the waterfall and the pages.
//!
//! The crate's public face is [`serve`], [`config`], the transfer model the API serves, the
//! report and waterfall renderers, and the pure functions the fuzzer drives.
// One audited exception: `limits::trim` calls glibc's `malloc_trim`.
#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod body;
pub mod config;
mod limits;
mod metrics;
mod presentation;
mod protocol;
mod recording;
mod traces;
mod wire;

pub use body::LiveExchange;
pub use presentation::{report, ui, waterfall};
pub use protocol::{
    classify, is_repository_name, percent_decode, Api, BlobKind, BodyEnd, Direction, Operation, Route, Side,
};
pub use protocol::{
    Culprit, FailureCause, Outcome, Party, Phase, Redirected, SpanDrop, TransferDirection, UpstreamErrorKind,
};
pub use recording::{
    Attempt, AttemptOutcome, Blob, BlobOutcome, BodyView, LiveTransfer, Lost, RequestView, Split, Transfer,
    UploadPhases,
};
pub use traces::{parse_traceparent, traceparent, ClientContext, RequestTrace, SpanId, TraceId};
pub use wire::error::SetupError;
pub use wire::headers;
pub use wire::identity::Cidr;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::body::Recorders;
use crate::config::ServeConfig;
use crate::limits::admission::Admission;
use crate::limits::shares::Shares;
use crate::limits::trim;
use crate::metrics::Metrics;
use crate::presentation::admin::Admin;
use crate::recording::{Tracker, TrackerConfig};
use crate::wire::loops::Loops;
use crate::wire::proxy::Proxy;
use crate::wire::redirects::Redirects;
use crate::wire::server::{self, ProxyListener};
use crate::wire::tls;
use crate::wire::upstream::{self, UpstreamTarget};

/// Binds the listeners, logs where they are, and serves until `shutdown` resolves.
pub async fn serve(config: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), SetupError> {
    let upstream = UpstreamTarget::parse(&config.upstream)?;
    let tls_client = tls::client_config(config.upstream_ca.as_deref())?;
    let tls_server = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(cert, key)?)),
        _ => None,
    };
    let metrics = Arc::new(Metrics::new(config.label_repository));
    let export = traces::export_config(config.otlp_endpoint.as_ref(), |name| std::env::var(name).ok())?;
    let exporter = export.map(|c| Arc::new(traces::Exporter::new(c, upstream.authority.to_string(), metrics.clone())));
    let export_task = exporter.as_ref().map(traces::Exporter::spawn).transpose()?;
    let tracker = Arc::new(
        Tracker::new(
            TrackerConfig {
                idle_timeout: config.transfer_idle_timeout,
                keep_finished: config.keep_transfers.max(1),
                pull_settle: config.pull_settle,
                ..TrackerConfig::default()
            },
            metrics.clone(),
        )
        .with_exporter(exporter.clone()),
    );
    let threads =
        config.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, usize::from), usize::from);
    let loops = Loops::start(threads).map_err(|source| SetupError::Threads { threads, source })?;
    recording::spawn_sweeper(&tracker);
    trim::spawn();
    let recorders = Arc::new(Recorders { metrics: metrics.clone(), sink: tracker.clone() });
    let proxy = Arc::new(Proxy {
        upstreams: upstream::Upstreams::new(
            tls_client.clone(),
            config.upstream_connect_timeout,
            config.upstream_idle_timeout,
            &metrics,
            config.large_read_streams,
            loops.len(),
        ),
        upstream: upstream.clone(),
        host_mode: config.host_header,
        response_timeout: config.upstream_response_timeout,
        stall_timeout: (!config.body_stall_timeout.is_zero()).then_some(config.body_stall_timeout),
        admission: (config.upload_slots > 0)
            .then(|| Shares::new(config.upload_slots, loops.len(), Admission::uploads, &metrics)),
        download_admission: (config.download_slots > 0)
            .then(|| Shares::new(config.download_slots, loops.len(), Admission::downloads, &metrics)),
        redirects: Arc::new(Redirects::new()),
        capture_storage: config.redirects == config::RedirectMode::Capture,
        capture_auth: config.auth_realms == config::RedirectMode::Capture,
        traces: exporter.is_some(),
        trusted: config.trusted_proxies.clone(),
        recorders,
    });
    let probe =
        upstream::probe_client(tls_client, config.upstream_connect_timeout, config.upstream_idle_timeout, &metrics);
    let transfers_api = (!config.disable_transfers_api).then(|| tracker.clone());
    let mut admin = Admin::new(metrics, probe, upstream.clone(), transfers_api);
    admin.ui = !config.no_ui;
    let admin = Arc::new(admin);

    let bind = |addr| async move { TcpListener::bind(addr).await.map_err(|source| SetupError::Bind { addr, source }) };
    let proxy_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        proxy = local(&proxy_listener),
        admin = local(&admin_listener),
        upstream = upstream.display,
        tls = tls_server.is_some(),
        host_header = ?config.host_header,
        "listening"
    );
    let listener = ProxyListener { listener: proxy_listener, tls: tls_server };
    let limits = server::Limits {
        header_read_timeout: config.header_read_timeout,
        max_header_bytes: config.max_header_bytes,
        max_connections: config.max_connections.max(1),
        large_read_connections: config.large_read_streams,
        grace: config.shutdown_grace,
        proxy_protocol: config.proxy_protocol,
    };
    server::run(listener, loops, admin_listener, proxy, admin, limits, shutdown).await;
    tracker.close_all();
    if let (Some(exporter), Some(task)) = (exporter, export_task) {
        exporter.flush(task, config.shutdown_grace.min(std::time::Duration::from_secs(10))).await;
    }
    Ok(())
}
