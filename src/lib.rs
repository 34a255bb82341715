//! regscope: a transparent instrumenting reverse proxy for container registries.
//!
//! It forwards registry traffic byte for byte and measures where the time of every push and
//! pull goes. The layout follows the domain:
//!
//! - [`route`]: which registry operation a request is (pure).
//! - [`headers`]: hop-by-hop stripping, forwarding headers, `Location` rewriting, redaction.
//! - [`timed_body`]: the body wrapper that splits a stream's time between client and registry.
//! - [`exchange`]: one request's timeline and what it records when it is over.
//! - [`proxy`]: one exchange end to end; [`upstream`]: the pooled client; [`tls`]: rustls.
//! - [`server`]: listeners, accept loops, graceful shutdown; [`admin`]: the admin port.
//! - [`buffers`]: how much a connection reads at once, by load (memory stays bounded);
//!   [`admission`]: how many uploads stream through at once; [`trim`]: freed heap given back
//!   to the system once a burst of transfers is over.
//! - [`phases`]: upload phases, v1 and v2 in one vocabulary; [`manifest`]: what a pull fetches.
//! - [`timeline`]: a transfer's requests on one time axis, and who each instant belongs to.
//! - [`transfers`]: grouping requests into pushes and pulls; [`report`]: the table people read.
//! - [`waterfall`] and [`ui`]: each transfer as a waterfall, and the admin port's pages.
//! - [`metrics`]: every Prometheus family (the contract); [`config`]: flags and env twins.
// One audited exception: `trim` calls glibc's `malloc_trim`.
#![deny(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod buffers;
pub mod config;
pub mod error;
pub mod exchange;
pub mod headers;
pub mod manifest;
pub mod metrics;
pub mod phases;
pub mod proxy;
pub mod report;
pub mod route;
pub mod server;
pub mod socket;
pub mod timed_body;
pub mod timeline;
pub mod tls;
pub mod transfers;
pub mod trim;
pub mod ui;
pub mod upstream;
pub mod waterfall;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::config::ServeConfig;
use crate::error::SetupError;
use crate::exchange::Recorders;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::server::ProxyListener;
use crate::transfers::{Tracker, TrackerConfig};
use crate::upstream::UpstreamTarget;

/// Binds the listeners, logs where they are, and serves until `shutdown` resolves.
pub async fn serve(config: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), SetupError> {
    let upstream = UpstreamTarget::parse(&config.upstream)?;
    let tls_client = tls::client_config(config.upstream_ca.as_deref())?;
    let tls_server = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(cert, key)?)),
        _ => None,
    };
    let metrics = Arc::new(Metrics::new(config.label_repository));
    let tracker = Arc::new(Tracker::new(
        TrackerConfig {
            idle_timeout: config.transfer_idle_timeout,
            keep_finished: config.keep_transfers.max(1),
            ..TrackerConfig::default()
        },
        metrics.clone(),
    ));
    transfers::spawn_sweeper(&tracker);
    trim::spawn();
    let recorders = Arc::new(Recorders { metrics: metrics.clone(), sink: tracker.clone() });
    let proxy = Arc::new(Proxy {
        upstreams: upstream::Upstreams::new(
            tls_client.clone(),
            config.upstream_connect_timeout,
            config.upstream_idle_timeout,
            &metrics,
            config.large_read_streams,
        ),
        upstream: upstream.clone(),
        host_mode: config.host_header,
        response_timeout: config.upstream_response_timeout,
        stall_timeout: (!config.body_stall_timeout.is_zero()).then_some(config.body_stall_timeout),
        admission: (config.upload_slots > 0).then(|| admission::Admission::new(config.upload_slots, &metrics)),
        recorders,
    });
    let probe =
        upstream::probe_client(tls_client, config.upstream_connect_timeout, config.upstream_idle_timeout, &metrics);
    let transfers_api = (!config.disable_transfers_api).then_some(tracker);
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
    };
    server::run(listener, admin_listener, proxy, admin, limits, shutdown).await;
    Ok(())
}
