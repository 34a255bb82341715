//! Every Prometheus family regscope exports, in one place: this file is the contract.
//!
//! Labels only ever come from closed enums (`Api`, `Operation`, `Direction`, `Side`, a fixed
//! method set, the status code): never from a path, digest, upload id or user string. The one
//! opt-in exception, `--label-repository N`, is capped by [`RepositoryLabels`].

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use http::Method;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::route::Operation;
use crate::timed_body::{Direction, Side};

/// Durations from 1 ms to 1 h.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Sizes from 1 KiB to 64 GiB, by powers of four.
pub const SIZE_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
    68719476736.0,
];

/// Throughput from 64 KiB/s to 8 GiB/s, by powers of two.
pub const THROUGHPUT_BUCKETS: &[f64] = &[
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
    2147483648.0,
    4294967296.0,
    8589934592.0,
];

/// Bodies smaller than this are not observed in the throughput histogram: their rate says
/// more about latency than about bandwidth.
pub const THROUGHPUT_MIN_BYTES: u64 = 1 << 20;

/// The method label's values: a closed set, anything else is `other` ([`method_index`]).
const METHODS: [&str; 8] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::PUT => 2,
        Method::POST => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The `code` label: the status as text, from a table built once (no formatting per request).
/// No status (the client left before one was sent) is `0`.
fn status_label(status: Option<u16>) -> &'static str {
    static CODES: OnceLock<Vec<String>> = OnceLock::new();
    let codes = CODES.get_or_init(|| (100..600).map(|c: u16| c.to_string()).collect());
    match status {
        Some(s @ 100..=599) => &codes[usize::from(s - 100)],
        _ => "0",
    }
}

/// The statuses registries answer with, whose request children are kept by index; any other
/// is looked up by label values.
const STATUSES: [Option<u16>; 24] = [
    None,
    Some(200),
    Some(201),
    Some(202),
    Some(204),
    Some(206),
    Some(301),
    Some(302),
    Some(304),
    Some(307),
    Some(308),
    Some(400),
    Some(401),
    Some(403),
    Some(404),
    Some(405),
    Some(409),
    Some(413),
    Some(416),
    Some(429),
    Some(500),
    Some(502),
    Some(503),
    Some(504),
];

/// Why an upstream exchange failed. A metric label: closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamErrorKind {
    ConnectRefused,
    ConnectTimeout,
    Tls,
    Reset,
    ResponseTimeout,
    Other,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::ConnectRefused => "connect_refused",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::ResponseTimeout => "response_timeout",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// All metric families. Cloning the handles inside is cheap (they are `Arc`s).
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_response: HistogramVec,
    pub body_bytes_total: IntCounterVec,
    pub body_size: HistogramVec,
    pub body_transfer: HistogramVec,
    pub body_stall_total: prometheus::CounterVec,
    pub body_stall: HistogramVec,
    pub throughput: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub connections: IntGaugeVec,
    pub upstream_connect: Histogram,
    pub uploads_waiting: IntGauge,
    pub upload_admission_wait: Histogram,
    pub upstream_errors: IntCounterVec,
    pub aborted: IntCounterVec,
    pub stalled: IntCounterVec,
    pub repository_requests: Option<IntCounterVec>,
    pub repository_bytes: Option<IntCounterVec>,
    pub upload_phase: HistogramVec,
    pub image_transfer: HistogramVec,
    pub image_time_total: prometheus::CounterVec,
    /// Caps the opt-in repository label.
    pub repositories: RepositoryLabels,
    /// The per-request families' children, resolved once per label set. Built on first use:
    /// it clones the families above.
    children: OnceLock<PerRequest>,
}

/// Children of a family whose label values all follow from enums, reached by index.
///
/// `with_label_values` hashes the values and takes the family's lock on every call, and a request
/// made a dozen such calls. Here each label set is resolved on first use (so the exposition still
/// shows only label sets that happened) and read after that without hashing or locking.
struct Children<F: Family> {
    family: F,
    slots: Box<[OnceLock<F::Child>]>,
}

/// A labelled family (any `MetricVec`): what [`Children`] resolves through.
trait Family {
    type Child;
    fn child(&self, labels: &[&str]) -> Self::Child;
}

impl<T: MetricVecBuilder> Family for MetricVec<T> {
    type Child = T::M;
    fn child(&self, labels: &[&str]) -> T::M {
        self.with_label_values(labels)
    }
}

impl<F: Family + Clone> Children<F> {
    fn new(family: &F, len: usize) -> Self {
        Children { family: family.clone(), slots: (0..len).map(|_| OnceLock::new()).collect() }
    }

    /// The child at `index`; `labels` are the values `index` stands for.
    fn get(&self, index: usize, labels: &[&str]) -> &F::Child {
        self.slots[index].get_or_init(|| self.family.child(labels))
    }
}

/// Indexes: the operation (its api follows from it), then direction, then side.
struct PerRequest {
    in_flight: Children<IntGaugeVec>,
    upstream_response: Children<HistogramVec>,
    body_bytes: Children<IntCounterVec>,
    body_size: Children<HistogramVec>,
    body_transfer: Children<HistogramVec>,
    throughput: Children<HistogramVec>,
    body_stall_total: Children<CounterVec>,
    body_stall: Children<HistogramVec>,
    requests: Requests,
}

impl PerRequest {
    fn new(m: &Metrics) -> Self {
        let ops = Operation::ALL.len();
        PerRequest {
            in_flight: Children::new(&m.in_flight, ops),
            upstream_response: Children::new(&m.upstream_response, ops),
            body_bytes: Children::new(&m.body_bytes_total, ops * 2),
            body_size: Children::new(&m.body_size, ops * 2),
            body_transfer: Children::new(&m.body_transfer, ops * 2),
            throughput: Children::new(&m.throughput, ops * 2),
            body_stall_total: Children::new(&m.body_stall_total, ops * 4),
            body_stall: Children::new(&m.body_stall, ops * 4),
            requests: Requests::new(m),
        }
    }
}

fn body_index(op: Operation, dir: Direction) -> usize {
    op as usize * 2 + dir as usize
}

fn stall_index(op: Operation, dir: Direction, side: Side) -> usize {
    body_index(op, dir) * 2 + side as usize
}

/// `regscope_requests_total` and `regscope_request_duration_seconds`, resolved together: every
/// request observes both.
type RequestFamilies = (IntCounterVec, HistogramVec);

impl Family for RequestFamilies {
    type Child = (IntCounter, Histogram);
    fn child(&self, labels: &[&str]) -> Self::Child {
        (self.0.with_label_values(labels), self.1.with_label_values(labels))
    }
}

/// The request families' children: a row per operation and method, made on first use (most
/// pairs never happen), indexed by a status of [`STATUSES`].
struct Requests {
    families: RequestFamilies,
    rows: Box<[OnceLock<Children<RequestFamilies>>]>,
}

impl Requests {
    fn new(m: &Metrics) -> Self {
        let rows = (0..Operation::ALL.len() * METHODS.len()).map(|_| OnceLock::new()).collect();
        Requests { families: (m.requests_total.clone(), m.request_duration.clone()), rows }
    }

    fn observe(&self, op: Operation, method: &Method, status: Option<u16>, seconds: f64) {
        let method = method_index(method);
        let labels = [op.api().as_str(), op.as_str(), METHODS[method], status_label(status)];
        let observe = |(total, duration): &(IntCounter, Histogram)| {
            total.inc();
            duration.observe(seconds);
        };
        match STATUSES.iter().position(|s| *s == status) {
            Some(slot) => {
                let row = &self.rows[op as usize * METHODS.len() + method];
                observe(row.get_or_init(|| Children::new(&self.families, STATUSES.len())).get(slot, &labels));
            }
            None => observe(&self.families.child(&labels)),
        }
    }
}

/// Counts one in a gauge for as long as it lives (an open connection, a waiting upload), however
/// its life ends.
pub struct Counted(IntGauge);

impl Counted {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("valid histogram definition")
}

fn unlabelled_histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid histogram definition")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

fn float_counter(name: &str, help: &str, labels: &[&str]) -> prometheus::CounterVec {
    prometheus::CounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition")
}

impl Metrics {
    /// Builds and registers every family. `repository_cap` > 0 enables the repository label.
    pub fn new(repository_cap: usize) -> Self {
        let registry = Registry::new();
        let m = Metrics {
            requests_total: counter(
                "regscope_requests_total",
                "Requests proxied, by registry operation and response status.",
                &["api", "operation", "method", "code"],
            ),
            request_duration: histogram(
                "regscope_request_duration_seconds",
                "Request head received to response fully sent.",
                DURATION_BUCKETS,
                &["api", "operation", "method", "code"],
            ),
            upstream_response: histogram(
                "regscope_upstream_response_seconds",
                "Request fully forwarded to upstream response head: the registry's own processing time.",
                DURATION_BUCKETS,
                &["api", "operation"],
            ),
            body_bytes_total: counter(
                "regscope_body_bytes_total",
                "Body bytes proxied.",
                &["api", "operation", "direction"],
            ),
            body_size: histogram(
                "regscope_body_size_bytes",
                "Size of each proxied body that carried data.",
                SIZE_BUCKETS,
                &["api", "operation", "direction"],
            ),
            body_transfer: histogram(
                "regscope_body_transfer_seconds",
                "First poll (the sink asking for data) to last byte of each body that carried data.",
                DURATION_BUCKETS,
                &["api", "operation", "direction"],
            ),
            body_stall_total: float_counter(
                "regscope_body_stall_seconds_total",
                "Time bodies waited on a side: the client or the registry.",
                &["api", "operation", "direction", "side"],
            ),
            body_stall: histogram(
                "regscope_body_stall_seconds",
                "Per body, the time it waited on a side.",
                DURATION_BUCKETS,
                &["api", "operation", "direction", "side"],
            ),
            throughput: histogram(
                "regscope_transfer_throughput_bytes_per_second",
                "Per body of at least 1 MiB, bytes divided by first-to-last-byte time.",
                THROUGHPUT_BUCKETS,
                &["api", "operation", "direction"],
            ),
            in_flight: gauge("regscope_in_flight_requests", "Requests being proxied right now.", &["api"]),
            connections: gauge(
                "regscope_connections",
                "Open connections: from clients, and to the registry.",
                &["side"],
            ),
            upstream_connect: unlabelled_histogram(
                "regscope_upstream_connect_seconds",
                "Time to open a new connection to the registry (TCP, and TLS when https).",
                DURATION_BUCKETS,
            ),
            uploads_waiting: IntGauge::new(
                "regscope_uploads_waiting",
                "Uploads waiting for a slot (--upload-slots) before being forwarded, right now.",
            )
            .expect("valid gauge definition"),
            upload_admission_wait: unlabelled_histogram(
                "regscope_upload_admission_wait_seconds",
                "Per upload that found every slot (--upload-slots) taken: how long it waited to be forwarded.",
                DURATION_BUCKETS,
            ),
            upstream_errors: counter(
                "regscope_upstream_errors_total",
                "Exchanges that failed on the registry side, by cause.",
                &["kind"],
            ),
            aborted: counter(
                "regscope_aborted_requests_total",
                "Exchanges cut off before their bodies completed, by the side that cut them.",
                &["operation", "side"],
            ),
            stalled: counter(
                "regscope_stalled_bodies_total",
                "Bodies cut off because their source sent nothing for the stall timeout.",
                &["direction"],
            ),
            repository_requests: (repository_cap > 0).then(|| {
                counter(
                    "regscope_repository_requests_total",
                    "Requests per repository (opt-in, capped; excess repositories count as `other`).",
                    &["repository", "operation"],
                )
            }),
            repository_bytes: (repository_cap > 0).then(|| {
                counter(
                    "regscope_repository_body_bytes_total",
                    "Body bytes per repository (opt-in, capped; excess repositories count as `other`).",
                    &["repository", "direction"],
                )
            }),
            upload_phase: histogram(
                "regscope_upload_phase_seconds",
                "Per blob (v2) or image (v1) upload, the time of each phase.",
                DURATION_BUCKETS,
                &["api", "phase"],
            ),
            image_transfer: histogram(
                "regscope_image_transfer_seconds",
                "Wall time of whole pushes and pulls.",
                DURATION_BUCKETS,
                &["direction", "outcome"],
            ),
            image_time_total: float_counter(
                "regscope_image_time_seconds_total",
                "Wall time of whole pushes and pulls, attributed to the client, the registry or bytes moving.",
                &["direction", "party"],
            ),
            repositories: RepositoryLabels::new(repository_cap),
            registry,
            children: OnceLock::new(),
        };
        let build_info =
            gauge("regscope_build_info", "Always 1; the version label says which regscope is running.", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        let r = &m.registry;
        let register = |c: Box<dyn prometheus::core::Collector>| {
            r.register(c).expect("metric families are registered once");
        };
        register(Box::new(m.requests_total.clone()));
        register(Box::new(m.request_duration.clone()));
        register(Box::new(m.upstream_response.clone()));
        register(Box::new(m.body_bytes_total.clone()));
        register(Box::new(m.body_size.clone()));
        register(Box::new(m.body_transfer.clone()));
        register(Box::new(m.body_stall_total.clone()));
        register(Box::new(m.body_stall.clone()));
        register(Box::new(m.throughput.clone()));
        register(Box::new(m.in_flight.clone()));
        register(Box::new(m.connections.clone()));
        register(Box::new(m.upstream_connect.clone()));
        register(Box::new(m.uploads_waiting.clone()));
        register(Box::new(m.upload_admission_wait.clone()));
        register(Box::new(m.upstream_errors.clone()));
        register(Box::new(m.aborted.clone()));
        register(Box::new(m.stalled.clone()));
        register(Box::new(m.upload_phase.clone()));
        register(Box::new(m.image_transfer.clone()));
        register(Box::new(m.image_time_total.clone()));
        register(Box::new(build_info));
        if let Some(c) = &m.repository_requests {
            register(Box::new(c.clone()));
        }
        if let Some(c) = &m.repository_bytes {
            register(Box::new(c.clone()));
        }
        m.preinitialise();
        m
    }

    /// Gauges and error counters start at zero for every label value, so dashboards and
    /// alerts see a series (a 0, not "no data") before the first event.
    fn preinitialise(&self) {
        for api in crate::route::Api::ALL {
            self.in_flight.with_label_values(&[api.as_str()]);
        }
        for side in crate::timed_body::Side::ALL {
            self.connections.with_label_values(&[side.as_str()]);
        }
        for direction in crate::timed_body::Direction::ALL {
            self.stalled.with_label_values(&[direction.as_str()]);
        }
        for op in crate::route::Operation::ALL {
            for side in crate::timed_body::Side::ALL {
                self.aborted.with_label_values(&[op.as_str(), side.as_str()]);
            }
        }
        for direction in ["push", "pull"] {
            for party in ["client", "registry", "transfer"] {
                self.image_time_total.with_label_values(&[direction, party]);
            }
            for outcome in ["complete", "incomplete", "failed"] {
                self.image_transfer.with_label_values(&[direction, outcome]);
            }
        }
        for kind in [
            UpstreamErrorKind::ConnectRefused,
            UpstreamErrorKind::ConnectTimeout,
            UpstreamErrorKind::Tls,
            UpstreamErrorKind::Reset,
            UpstreamErrorKind::ResponseTimeout,
            UpstreamErrorKind::Other,
        ] {
            self.upstream_errors.with_label_values(&[kind.as_str()]);
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding into a Vec cannot fail");
        out
    }

    /// `regscope_in_flight_requests` for the operation's api.
    pub fn in_flight_of(&self, op: Operation) -> &IntGauge {
        self.children().in_flight.get(op as usize, &[op.api().as_str()])
    }

    pub fn upstream_response_of(&self, op: Operation) -> &Histogram {
        self.children().upstream_response.get(op as usize, &[op.api().as_str(), op.as_str()])
    }

    pub fn body_bytes_of(&self, op: Operation, dir: Direction) -> &IntCounter {
        self.children().body_bytes.get(body_index(op, dir), &body(op, dir))
    }

    pub fn body_size_of(&self, op: Operation, dir: Direction) -> &Histogram {
        self.children().body_size.get(body_index(op, dir), &body(op, dir))
    }

    pub fn body_transfer_of(&self, op: Operation, dir: Direction) -> &Histogram {
        self.children().body_transfer.get(body_index(op, dir), &body(op, dir))
    }

    pub fn throughput_of(&self, op: Operation, dir: Direction) -> &Histogram {
        self.children().throughput.get(body_index(op, dir), &body(op, dir))
    }

    pub fn body_stall_total_of(&self, op: Operation, dir: Direction, side: Side) -> &Counter {
        self.children().body_stall_total.get(stall_index(op, dir, side), &stall(op, dir, side))
    }

    pub fn body_stall_of(&self, op: Operation, dir: Direction, side: Side) -> &Histogram {
        self.children().body_stall.get(stall_index(op, dir, side), &stall(op, dir, side))
    }

    /// One request in `regscope_requests_total` and `regscope_request_duration_seconds`.
    pub fn observe_request(&self, op: Operation, method: &Method, status: Option<u16>, seconds: f64) {
        self.children().requests.observe(op, method, status, seconds);
    }

    fn children(&self) -> &PerRequest {
        self.children.get_or_init(|| PerRequest::new(self))
    }

    pub fn connection_gauge(&self, side: crate::timed_body::Side) -> IntGauge {
        self.connections.with_label_values(&[side.as_str()])
    }

    /// The client connections open now, as the upstream read classes read them.
    pub fn open_clients(&self) -> OpenClients {
        OpenClients(self.connection_gauge(crate::timed_body::Side::Client))
    }
}

/// The `api`, `operation`, `direction` label values.
fn body(op: Operation, dir: Direction) -> [&'static str; 3] {
    [op.api().as_str(), op.as_str(), dir.as_str()]
}

fn stall(op: Operation, dir: Direction, side: Side) -> [&'static str; 4] {
    [op.api().as_str(), op.as_str(), dir.as_str(), side.as_str()]
}

/// Reads the client side of the connections gauge as a count (one atomic load).
#[derive(Clone)]
pub struct OpenClients(IntGauge);

impl OpenClients {
    pub fn now(&self) -> usize {
        usize::try_from(self.0.get()).unwrap_or(0)
    }
}

/// The opt-in repository label, capped: the first `cap` distinct repositories get their own
/// value, every later one is `other`, so a client cannot grow the series count without bound.
pub struct RepositoryLabels {
    cap: usize,
    seen: Mutex<HashSet<Box<str>>>,
}

impl RepositoryLabels {
    fn new(cap: usize) -> Self {
        RepositoryLabels { cap, seen: Mutex::new(HashSet::new()) }
    }

    /// The label value to use for `repository`. Called once per request, only when enabled.
    pub fn label(&self, repository: Option<&str>) -> String {
        let Some(repository) = repository else {
            return "none".to_owned();
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(repository) {
            return repository.to_owned();
        }
        if seen.len() < self.cap {
            seen.insert(repository.into());
            return repository.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_increasing_and_span_the_domain() {
        for (buckets, lo, hi) in [
            (DURATION_BUCKETS, 0.001, 3600.0),
            (SIZE_BUCKETS, 1024.0, 64.0 * 1024.0 * 1024.0 * 1024.0),
            (THROUGHPUT_BUCKETS, 65536.0, 8.0 * 1024.0 * 1024.0 * 1024.0),
        ] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]));
            assert_eq!((buckets[0], *buckets.last().unwrap()), (lo, hi));
        }
    }

    #[test]
    fn repository_label_is_capped() {
        let labels = RepositoryLabels::new(2);
        assert_eq!(labels.label(Some("a")), "a");
        assert_eq!(labels.label(Some("b")), "b");
        assert_eq!(labels.label(Some("c")), "other");
        assert_eq!(labels.label(Some("a")), "a");
        assert_eq!(labels.label(None), "none");
    }

    #[test]
    fn method_label_is_closed() {
        assert_eq!(METHODS[method_index(&Method::PATCH)], "PATCH");
        assert_eq!(METHODS[method_index(&Method::from_bytes(b"BREW").unwrap())], "other");
    }

    #[test]
    fn indexes_follow_the_enums() {
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
        assert_eq!(Direction::ALL.map(|d| d as usize), [0, 1]);
        assert_eq!(Side::ALL.map(|s| s as usize), [0, 1]);
        let mut seen = HashSet::new();
        for op in Operation::ALL {
            for dir in Direction::ALL {
                for side in Side::ALL {
                    assert!(seen.insert(stall_index(*op, dir, side)));
                }
            }
        }
        assert_eq!(seen.len(), Operation::ALL.len() * 4);
        assert!(seen.iter().all(|&i| i < Operation::ALL.len() * 4));
    }

    /// The children reached by index are the family's own: what they count is exported under
    /// the labels the index stands for, and only label sets that were used appear.
    #[test]
    fn children_by_index_are_the_labelled_series() {
        let m = Metrics::new(0);
        m.body_bytes_of(Operation::BlobGet, Direction::Download).inc_by(7);
        m.body_bytes_of(Operation::BlobGet, Direction::Download).inc_by(5);
        m.body_stall_total_of(Operation::UploadChunk, Direction::Upload, Side::Registry).inc_by(1.5);
        m.upstream_response_of(Operation::ManifestGet).observe(0.25);
        m.in_flight_of(Operation::V1LayerGet).inc();
        let by_labels = |family: &IntCounterVec, labels: &[&str]| family.with_label_values(labels).get();
        assert_eq!(by_labels(&m.body_bytes_total, &["v2", "blob_get", "download"]), 12);
        assert_eq!(m.body_stall_total.with_label_values(&["v2", "upload_chunk", "upload", "registry"]).get(), 1.5);
        assert_eq!(m.upstream_response.with_label_values(&["v2", "manifest_get"]).get_sample_count(), 1);
        assert_eq!(m.in_flight.with_label_values(&["v1"]).get(), 1);
        let text = String::from_utf8(m.encode()).unwrap();
        let body_bytes: Vec<&str> = text.lines().filter(|l| l.starts_with("regscope_body_bytes_total{")).collect();
        assert_eq!(body_bytes, [r#"regscope_body_bytes_total{api="v2",direction="download",operation="blob_get"} 12"#]);
    }

    /// A request lands in the series its labels name, whether its status is one kept by index
    /// or not, and no two label sets share a child.
    #[test]
    fn requests_are_counted_under_their_labels() {
        let m = Metrics::new(0);
        let brew = Method::from_bytes(b"BREW").unwrap();
        let cases: [(Operation, &Method, Option<u16>, [&str; 4]); 6] = [
            (Operation::ManifestGet, &Method::GET, Some(200), ["v2", "manifest_get", "GET", "200"]),
            (Operation::ManifestGet, &Method::GET, Some(404), ["v2", "manifest_get", "GET", "404"]),
            (Operation::ManifestGet, &Method::HEAD, Some(200), ["v2", "manifest_get", "HEAD", "200"]),
            (Operation::UploadChunk, &Method::PATCH, None, ["v2", "upload_chunk", "PATCH", "0"]),
            (Operation::Other, &brew, Some(418), ["other", "other", "other", "418"]),
            (Operation::V1LayerGet, &Method::GET, Some(599), ["v1", "v1_layer_get", "GET", "599"]),
        ];
        for (times, (op, method, status, _)) in (1..).zip(&cases) {
            for _ in 0..times {
                m.observe_request(*op, method, *status, 0.5);
            }
        }
        for (times, (_, _, _, labels)) in (1..).zip(&cases) {
            assert_eq!(m.requests_total.with_label_values(labels).get(), times, "{labels:?}");
            let duration = m.request_duration.with_label_values(labels);
            assert_eq!(duration.get_sample_count(), times, "{labels:?}");
            assert_eq!(duration.get_sample_sum(), 0.5 * times as f64, "{labels:?}");
        }
        let text = String::from_utf8(m.encode()).unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with("regscope_requests_total{")).count(), cases.len());
    }

    #[test]
    fn exposition_contains_every_family() {
        let m = Metrics::new(0);
        let text = String::from_utf8(m.encode()).unwrap();
        for family in ["regscope_build_info", "regscope_in_flight_requests", "regscope_connections"] {
            assert!(text.contains(family), "{family} missing");
        }
    }
}
