//! Sending traces: a bounded queue of finished transfers, drained in batches by one task that
//! POSTs OTLP/HTTP protobuf to the collector.
//!
//! Export never slows the proxy. A finished transfer is queued (an `Arc`, no copy) or, when the
//! queue already holds `max_queue_spans`, dropped and counted; spans are only built on the
//! export task. A collector that is down, slow or failing costs each batch at most the export
//! timeout, and its spans are counted as dropped. Nothing is retried: a retry would hold memory
//! for a collector that is already behind.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::env::ExportConfig;
use super::spans::{resource_spans, span_count, transfer_spans};
use crate::metrics::Metrics;
use crate::protocol::SpanDrop;
use crate::recording::Transfer;
use crate::wire::error::SetupError;

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The exporter: the tracker queues finished transfers, the task sends them.
pub(crate) struct Exporter {
    config: ExportConfig,
    /// The registry's address, for the requests' `server.address`.
    registry: String,
    queue: Mutex<Queue>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Queue {
    transfers: VecDeque<(Arc<Transfer>, usize)>,
    spans: usize,
    closing: bool,
}

impl Exporter {
    pub(crate) fn new(config: ExportConfig, registry: String, metrics: Arc<Metrics>) -> Exporter {
        Exporter { config, registry, queue: Mutex::default(), wake: Notify::new(), metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a finished transfer for export, or drops and counts it if the queue is full.
    pub(crate) fn enqueue(&self, transfer: Arc<Transfer>) {
        let spans = span_count(&transfer);
        let full_batch = {
            let mut queue = self.lock();
            if queue.closing || queue.spans + spans > self.config.max_queue_spans {
                drop(queue);
                return self.dropped(SpanDrop::QueueFull, spans);
            }
            queue.spans += spans;
            queue.transfers.push_back((transfer, spans));
            queue.spans >= self.config.max_batch_spans
        };
        if full_batch {
            self.wake.notify_one();
        }
    }

    fn dropped(&self, reason: SpanDrop, spans: usize) {
        self.metrics.trace_spans_dropped.with_label_values(&[reason.as_str()]).inc_by(spans as u64);
    }

    /// Takes the next batch: whole transfers, up to `max_batch_spans` (at least one transfer).
    fn take(&self) -> (Vec<Arc<Transfer>>, usize, bool) {
        let mut queue = self.lock();
        let (mut batch, mut spans) = (Vec::new(), 0);
        while let Some((_, n)) = queue.transfers.front() {
            if !batch.is_empty() && spans + n > self.config.max_batch_spans {
                break;
            }
            let (transfer, n) = queue.transfers.pop_front().expect("front exists");
            spans += n;
            batch.push(transfer);
        }
        queue.spans -= spans;
        (batch, spans, queue.closing)
    }

    /// Starts the export task.
    pub(crate) fn spawn(self: &Arc<Self>) -> Result<JoinHandle<()>, SetupError> {
        let ca = std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| std::env::var_os("OTEL_EXPORTER_OTLP_CERTIFICATE"))
            .map(std::path::PathBuf::from);
        let tls = crate::wire::tls::client_config(ca.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.config.timeout));
        let https =
            HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(https);
        let exporter = self.clone();
        Ok(tokio::spawn(async move { exporter.run(client).await }))
    }

    async fn run(self: Arc<Self>, client: HttpClient) {
        let mut failing_since: Option<Instant> = None;
        loop {
            let ready = {
                let queue = self.lock();
                queue.closing || queue.spans >= self.config.max_batch_spans
            };
            if !ready {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(self.config.schedule_delay) => {}
                }
            }
            let (batch, spans, closing) = self.take();
            if batch.is_empty() {
                if closing {
                    return;
                }
                continue;
            }
            match self.send(&client, &batch).await {
                Ok(rejected) => {
                    self.metrics.trace_spans_exported.inc_by(spans.saturating_sub(rejected) as u64);
                    if rejected > 0 {
                        self.dropped(SpanDrop::Rejected, rejected);
                    }
                    if failing_since.take().is_some() {
                        tracing::info!(url = %self.config.url, "trace export works again");
                    }
                }
                Err(error) => {
                    self.dropped(SpanDrop::ExportFailed, spans);
                    // One warning when exports start failing, then one a minute while they do.
                    let now = Instant::now();
                    if failing_since.is_none_or(|since| now.duration_since(since) >= Duration::from_secs(60)) {
                        tracing::warn!(url = %self.config.url, %error, spans, "trace export failed; spans dropped");
                        failing_since = Some(now);
                    }
                }
            }
        }
    }

    /// One export request; `Ok` carries how many spans the collector said it rejected.
    async fn send(&self, client: &HttpClient, batch: &[Arc<Transfer>]) -> Result<usize, String> {
        let spans = batch.iter().flat_map(|t| transfer_spans(t, &self.registry)).collect();
        let body = ExportTraceServiceRequest { resource_spans: vec![resource_spans(&self.config.resource, spans)] };
        let mut request = Request::post(self.config.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"))
            .body(Full::new(Bytes::from(body.encode_to_vec())))
            .map_err(|e| e.to_string())?;
        for (name, value) in &self.config.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let exchange = async {
            let response =
                client.request(request).await.map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            if !status.is_success() {
                return Err(format!("collector answered {status}"));
            }
            let rejected = ExportTraceServiceResponse::decode(body)
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| usize::try_from(p.rejected_spans).unwrap_or(0));
            Ok(rejected)
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
        }
    }

    /// At shutdown: sends what is queued, for at most `within`; the rest is dropped and counted.
    pub(crate) async fn flush(&self, task: JoinHandle<()>, within: Duration) {
        self.lock().closing = true;
        self.wake.notify_one();
        if tokio::time::timeout(within, task).await.is_err() {
            let spans = std::mem::take(&mut *self.lock()).spans;
            self.dropped(SpanDrop::ExportFailed, spans);
            tracing::warn!(?within, spans, "trace export did not finish before exit; spans dropped");
        }
    }
}
