//! One request's timeline, and what it records when it is over.
//!
//! An [`Exchange`] is shared (`Arc`) by the handler and the two timed bodies: one allocation
//! per request. What they learn as it goes on is written under one lock, a few times per
//! exchange and never per frame (first write wins); the last one to let go triggers `Drop`,
//! which records the metrics, writes the one log event, and hands the finished
//! [`ExchangeRecord`] to the transfer tracker. So a request is recorded exactly once, however it
//! ended.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::Method;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::outcome::{BodyOutcome, BodyRecorder};
use crate::limits::buffers::Stream;
use crate::metrics::{Metrics, THROUGHPUT_MIN_BYTES};
use crate::protocol::{Api, Operation, Route};
use crate::protocol::{Direction, Side, UpstreamErrorKind};
use crate::traces::{RequestTrace, TraceId};

/// Where finished exchanges go after metrics and logs (the transfer tracker).
pub(crate) trait ExchangeSink: Send + Sync {
    /// A request head has arrived and is about to be forwarded.
    fn started(&self, exchange: &Arc<Exchange>);
    /// The exchange is over; called exactly once, after metrics and the log event.
    fn finished(&self, record: ExchangeRecord);
}

/// What an exchange looked like, once it is over. Owned, so it can outlive the request.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeRecord {
    pub id: u64,
    pub api: Api,
    pub operation: Operation,
    pub method: Method,
    /// Shared with the transfer tracker's session key, which would otherwise copy it.
    pub repository: Option<Arc<str>>,
    pub reference: Option<Box<str>>,
    pub digest: Option<Box<str>>,
    pub upload_id: Option<Box<str>>,
    pub client: SocketAddr,
    /// Response status; `None` if no response was ever produced.
    pub status: Option<u16>,
    /// Request head received.
    pub received: Instant,
    /// Request handed to the upstream client.
    pub forwarded: Option<Instant>,
    /// Upstream response head received.
    pub response_head: Option<Instant>,
    /// When the whole exchange was over.
    pub ended: Instant,
    pub upload: Option<BodyOutcome>,
    pub download: Option<BodyOutcome>,
    pub upstream_error: Option<UpstreamErrorKind>,
    /// Selected response headers the transfer tracker needs (upload uuid, digest, length).
    pub response_info: ResponseInfo,
    /// A body captured whole: a pushed manifest (request), a fetched manifest or v1 ancestry
    /// (response).
    pub captured: Option<Vec<u8>>,
    /// Its span, when traces are on (boxed: off, it costs a pointer).
    pub trace: Option<Box<RequestTrace>>,
}

/// The few response headers that tie requests into uploads and transfers.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResponseInfo {
    pub upload_uuid: Option<Box<str>>,
    pub content_digest: Option<Box<str>>,
    pub content_length: Option<u64>,
}

impl ExchangeRecord {
    /// A `GET` from `client` at `at` that nothing is known of yet; also what is left in an
    /// exchange once its record has moved out (it owns nothing).
    pub(crate) fn empty(client: SocketAddr, at: Instant) -> ExchangeRecord {
        ExchangeRecord {
            id: 0,
            api: Api::V2,
            operation: Operation::Other,
            method: Method::GET,
            repository: None,
            reference: None,
            digest: None,
            upload_id: None,
            client,
            status: None,
            received: at,
            forwarded: None,
            response_head: None,
            ended: at,
            upload: None,
            download: None,
            upstream_error: None,
            response_info: ResponseInfo::default(),
            captured: None,
            trace: None,
        }
    }

    /// Request head in → response fully sent (or the exchange's end).
    pub(crate) fn duration(&self) -> Duration {
        self.ended.saturating_duration_since(self.received)
    }

    /// Request fully forwarded → response head: the registry's own processing time.
    pub(crate) fn upstream_wait(&self) -> Option<Duration> {
        let head = self.response_head?;
        let sent = match (self.forwarded, self.upload.as_ref().map(|u| u.ended)) {
            (Some(f), Some(u)) if u <= head => f.max(u),
            (Some(f), _) => f,
            (None, _) => return None,
        };
        Some(head.saturating_duration_since(sent))
    }

    /// The side that cut the exchange off, if any.
    pub(crate) fn aborted_by(&self) -> Option<Side> {
        let body = |b: &Option<BodyOutcome>| b.as_ref().and_then(|b| b.aborted_by());
        body(&self.upload).or(body(&self.download)).or(self.upstream_error.map(|_| Side::Registry))
    }
}

/// Shared context an exchange needs to record itself.
pub(crate) struct Recorders {
    pub metrics: Arc<Metrics>,
    pub sink: Arc<dyn ExchangeSink>,
}

/// A live exchange. See the module docs.
pub(crate) struct Exchange {
    /// What was known when the request arrived; the rest is filled in from `marks` at the end.
    record: ExchangeRecord,
    recorders: Arc<Recorders>,
    /// The path with secrets redacted, for the log event; `None` while that event is off.
    log_path: Option<Box<str>>,
    marks: Mutex<Marks>,
    /// Woken when the request body has been fully forwarded (starts the response timeout).
    pub upload_done: Notify,
    /// Live byte counts, for in-progress views and upload admission.
    upload_progress: AtomicU64,
    download_progress: AtomicU64,
}

/// What the handler and the bodies learn while the exchange goes on.
#[derive(Default)]
struct Marks {
    forwarded: Option<Instant>,
    response_head: Option<Instant>,
    /// The status of the response sent to the client; the last one set.
    status: Option<u16>,
    upload: Option<BodyOutcome>,
    download: Option<BodyOutcome>,
    upstream_error: Option<UpstreamErrorKind>,
    response_info: Option<ResponseInfo>,
    /// A body captured whole (a pushed manifest, a fetched manifest or v1 ancestry).
    captured: Option<Vec<u8>>,
    /// The request's declared body length, for progress bars.
    upload_expected: Option<u64>,
    /// What the exchange counts as on the upstream side (and its large-read slot, if any),
    /// until it is over.
    stream: Option<Stream>,
    /// The trace of the transfer it joined when it started (set only when traces are on).
    transfer_trace: Option<TraceId>,
}

/// A snapshot of an exchange still on the wire, for live views.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LiveExchange {
    pub id: u64,
    pub operation: Operation,
    pub digest: Option<String>,
    pub upload_id: Option<String>,
    /// Seconds since the request arrived.
    pub elapsed: f64,
    /// Body bytes so far in the exchange's main direction, and how many are expected.
    pub bytes: u64,
    pub expected: Option<u64>,
    pub direction: Direction,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Exchange {
    pub(crate) fn start(
        route: &Route<'_>,
        method: &Method,
        client: SocketAddr,
        path_and_query: &str,
        trace: Option<Box<RequestTrace>>,
        recorders: Arc<Recorders>,
    ) -> Arc<Exchange> {
        let api = route.api();
        recorders.metrics.in_flight_of(route.operation).inc();
        let owned = |s: Option<&str>| s.map(Box::from);
        let exchange = Arc::new(Exchange {
            record: ExchangeRecord {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                api,
                operation: route.operation,
                method: method.clone(),
                repository: route.repository.map(Arc::from),
                reference: owned(route.reference),
                digest: route.digest.map(|d| Box::from(crate::protocol::percent_decode(d).as_ref())),
                upload_id: owned(route.upload_id),
                client,
                status: None,
                received: Instant::now(),
                forwarded: None,
                response_head: None,
                ended: Instant::now(),
                upload: None,
                download: None,
                upstream_error: None,
                response_info: ResponseInfo::default(),
                captured: None,
                trace,
            },
            recorders,
            // Only the log event carries the path: redacted (a copy) only while that event is on.
            log_path: tracing::enabled!(target: REQUEST_LOG, tracing::Level::DEBUG)
                .then(|| crate::wire::headers::redact_path(path_and_query).into()),
            marks: Mutex::new(Marks::default()),
            upload_done: Notify::new(),
            upload_progress: AtomicU64::new(0),
            download_progress: AtomicU64::new(0),
        });
        exchange.recorders.sink.started(&exchange);
        exchange
    }

    pub(crate) fn id(&self) -> u64 {
        self.record.id
    }

    /// What was known when the request arrived: route, client, start time.
    pub(crate) fn info(&self) -> &ExchangeRecord {
        &self.record
    }

    fn marks(&self) -> MutexGuard<'_, Marks> {
        // Nothing under the lock can panic half way; poisoned marks are still whole.
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The transfer this exchange joined has this trace (the tracker says so when it starts).
    pub(crate) fn set_transfer_trace(&self, trace: TraceId) {
        self.marks().transfer_trace.get_or_insert(trace);
    }

    /// The trace its span belongs to and the flags to send on, if it has a span that will be
    /// exported: the client's trace when it sent one, else its transfer's.
    pub(crate) fn trace_parent(&self) -> Option<(TraceId, crate::traces::SpanId, u8)> {
        let trace = self.record.trace.as_deref()?;
        let transfer = self.marks().transfer_trace?;
        Some(match trace.client {
            Some(client) => (client.trace_id, trace.span_id, client.flags),
            None => (transfer, trace.span_id, 1),
        })
    }

    pub(crate) fn set_upload_expected(&self, length: u64) {
        self.marks().upload_expected.get_or_insert(length);
    }

    /// Keeps the upstream stream (and its large-read slot) until the exchange is over.
    pub(crate) fn hold(&self, stream: Stream) {
        self.marks().stream.get_or_insert(stream);
    }

    /// What this exchange is doing right now.
    pub(crate) fn live(&self, now: Instant) -> LiveExchange {
        let r = &self.record;
        let marks = self.marks();
        let uploading = marks.upload.is_none() && self.upload_progress.load(Ordering::Relaxed) > 0;
        let (direction, bytes, expected) = if uploading || marks.response_head.is_none() {
            (Direction::Upload, self.upload_progress.load(Ordering::Relaxed), marks.upload_expected)
        } else {
            let expected = marks.response_info.as_ref().and_then(|i| i.content_length);
            (Direction::Download, self.download_progress.load(Ordering::Relaxed), expected)
        };
        drop(marks);
        LiveExchange {
            id: r.id,
            operation: r.operation,
            digest: r.digest.as_deref().map(str::to_owned),
            upload_id: r.upload_id.as_deref().map(str::to_owned),
            elapsed: now.saturating_duration_since(r.received).as_secs_f64(),
            bytes,
            expected,
            direction,
        }
    }

    /// The request goes upstream now. Without a body (`sends_body` false) it is all sent: its
    /// empty upload is over, complete, at this moment.
    pub(crate) fn mark_forwarded(&self, sends_body: bool) {
        let now = Instant::now();
        let mut marks = self.marks();
        marks.forwarded.get_or_insert(now);
        if !sends_body {
            marks.upload.get_or_insert(BodyOutcome {
                direction: Direction::Upload,
                bytes: 0,
                first_poll: None,
                last_byte: None,
                ended: now,
                source_wait: Duration::ZERO,
                sink_wait: Duration::ZERO,
                end: crate::protocol::BodyEnd::Complete,
            });
        }
    }

    pub(crate) fn mark_response_head(&self, status: u16, info: ResponseInfo) {
        let now = Instant::now();
        let mut marks = self.marks();
        marks.response_head.get_or_insert(now);
        marks.status = Some(status);
        marks.response_info.get_or_insert(info);
    }

    /// The status of the response sent to the client (also for locally made responses).
    pub(crate) fn set_status(&self, status: u16) {
        self.marks().status = Some(status);
    }

    pub(crate) fn mark_upstream_error(&self, kind: UpstreamErrorKind) {
        self.marks().upstream_error.get_or_insert(kind);
    }

    /// How the request body ended, if it has.
    pub(crate) fn upload_end(&self) -> Option<crate::protocol::BodyEnd> {
        self.marks().upload.map(|u| u.end)
    }

    /// When the request body's life ended (fully forwarded, or cut off), if it has.
    pub(crate) fn upload_ended(&self) -> Option<Instant> {
        self.marks().upload.map(|u| u.ended)
    }
}

impl BodyRecorder for Exchange {
    fn record(&self, outcome: BodyOutcome, captured: Vec<u8>) {
        let mut marks = self.marks();
        match outcome.direction {
            Direction::Upload => {
                marks.upload.get_or_insert(outcome);
            }
            Direction::Download => {
                marks.download.get_or_insert(outcome);
            }
        }
        if !captured.is_empty() && outcome.end == crate::protocol::BodyEnd::Complete {
            marks.captured.get_or_insert(captured);
        }
        drop(marks);
        if outcome.direction == Direction::Upload {
            self.upload_done.notify_one();
        }
    }

    fn progressed(&self, direction: Direction, bytes: u64) {
        self.progress(direction).fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Exchange {
    /// A body's bytes so far, live: what admission watches.
    pub(crate) fn progress(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::Upload => &self.upload_progress,
            Direction::Download => &self.download_progress,
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Moved, not copied: the record is whole only now, and it is the exchange's last act.
        let marks = std::mem::take(self.marks.get_mut().unwrap_or_else(PoisonError::into_inner));
        let placeholder = ExchangeRecord::empty(self.record.client, self.record.received);
        let mut record = std::mem::replace(&mut self.record, placeholder);
        record.forwarded = marks.forwarded;
        record.response_head = marks.response_head;
        record.status = marks.status;
        record.upload = marks.upload;
        record.download = marks.download;
        record.upstream_error = marks.upstream_error;
        record.response_info = marks.response_info.unwrap_or_default();
        record.captured = marks.captured;
        // The upstream stream is let go with the exchange, after it has been recorded.
        let _stream = marks.stream;
        record.ended = [record.download.map(|d| d.ended), record.upload.map(|u| u.ended), record.response_head]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or_else(Instant::now);

        // Log first: whoever sees the metrics move can then find the event.
        if let Some(path) = &self.log_path {
            log(&record, path);
        }
        self.recorders.metrics.in_flight_of(record.operation).dec();
        observe(&self.recorders.metrics, &record);
        self.recorders.sink.finished(record);
    }
}

fn observe(m: &Metrics, r: &ExchangeRecord) {
    let op = r.operation.as_str();
    m.observe_request(r.operation, &r.method, r.status, r.duration().as_secs_f64());
    if let Some(wait) = r.upstream_wait() {
        m.upstream_response_of(r.operation).observe(wait.as_secs_f64());
    }
    for body in [r.upload.as_ref(), r.download.as_ref()].into_iter().flatten() {
        let dir = body.direction;
        if body.bytes > 0 {
            m.body_bytes_of(r.operation, dir).inc_by(body.bytes);
            m.body_size_of(r.operation, dir).observe(body.bytes as f64);
            let span = match (body.first_poll, body.last_byte) {
                (Some(a), Some(b)) => b.saturating_duration_since(a),
                _ => Duration::ZERO,
            };
            m.body_transfer_of(r.operation, dir).observe(span.as_secs_f64());
            if body.bytes >= THROUGHPUT_MIN_BYTES && !span.is_zero() {
                let rate = body.bytes as f64 / span.as_secs_f64();
                m.throughput_of(r.operation, dir).observe(rate);
            }
        }
        if body.first_poll.is_some() {
            for side in Side::ALL {
                let wait = body.wait_on(side).as_secs_f64();
                m.body_stall_total_of(r.operation, dir, side).inc_by(wait);
                m.body_stall_of(r.operation, dir, side).observe(wait);
            }
        }
    }
    for body in [r.upload.as_ref(), r.download.as_ref()].into_iter().flatten() {
        if body.end == crate::protocol::BodyEnd::SourceStalled {
            m.stalled.with_label_values(&[body.direction.as_str()]).inc();
        }
    }
    if let Some(side) = r.aborted_by() {
        m.aborted.with_label_values(&[op, side.as_str()]).inc();
    }
    if let Some(kind) = r.upstream_error {
        m.upstream_errors.with_label_values(&[kind.as_str()]).inc();
    }
    if let Some(repos) = &m.repository_requests {
        let repo = m.repositories.label(r.repository.as_deref());
        repos.with_label_values(&[repo.as_str(), op]).inc();
        if let Some(bytes) = &m.repository_bytes {
            for body in [r.upload.as_ref(), r.download.as_ref()].into_iter().flatten() {
                bytes.with_label_values(&[repo.as_str(), body.direction.as_str()]).inc_by(body.bytes);
            }
        }
    }
}

/// The per-request log event's target (debug): `RUST_LOG=info,regscope::request=debug`.
const REQUEST_LOG: &str = "regscope::request";

fn log(r: &ExchangeRecord, path: &str) {
    let bytes = |b: &Option<BodyOutcome>| b.as_ref().map_or(0, |b| b.bytes);
    let wait = |b: &Option<BodyOutcome>, side| b.as_ref().map_or(0.0, |b| b.wait_on(side).as_secs_f64() * 1e3);
    let aborted = r.aborted_by().map(Side::as_str);
    // Debug: an access log line costs a fifth of a small request's CPU. Pushes and pulls log
    // at info; `RUST_LOG=info,regscope::request=debug` adds every request.
    tracing::debug!(
        target: REQUEST_LOG,
        id = r.id,
        method = %r.method,
        path,
        status = r.status.unwrap_or(0),
        api = r.api.as_str(),
        operation = r.operation.as_str(),
        bytes_in = bytes(&r.upload),
        bytes_out = bytes(&r.download),
        duration_ms = r.duration().as_secs_f64() * 1e3,
        upstream_ms = r.upstream_wait().map(|d| d.as_secs_f64() * 1e3),
        client_wait_ms = wait(&r.upload, Side::Client) + wait(&r.download, Side::Client),
        registry_wait_ms = wait(&r.upload, Side::Registry) + wait(&r.download, Side::Registry),
        client = %r.client,
        aborted,
        upstream_error = r.upstream_error.map(UpstreamErrorKind::as_str),
        "request"
    );
}
