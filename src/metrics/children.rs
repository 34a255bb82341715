//! A request's series, resolved once per label set.
//!
//! `with_label_values` hashes the values and takes the family's lock on every call, and each
//! request observes about a dozen series whose labels all follow from enums, and two whose
//! status, nearly always, is one of the few registries answer with. Here each label set is
//! resolved on first use (so the exposition still shows only label sets that happened) and read
//! by index after that, without hashing or locking; a rare status goes by label values.

use std::sync::OnceLock;

use http::Method;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{Counter, CounterVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::labels::{method_index, status_label, METHODS};
use super::Metrics;
use crate::protocol::{Direction, Operation, Side};

/// Children of a family whose label values all follow from enums, reached by index.
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
pub(crate) struct PerRequest {
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
    pub(crate) fn new(m: &Metrics) -> Self {
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

/// The statuses registries answer with, whose request series are reached by index; any other
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

/// `requests_total` and `request_duration`, which share their labels.
#[derive(Clone)]
struct RequestFamilies(IntCounterVec, HistogramVec);

impl Family for RequestFamilies {
    type Child = (IntCounter, Histogram);
    fn child(&self, labels: &[&str]) -> Self::Child {
        (self.0.with_label_values(labels), self.1.with_label_values(labels))
    }
}

/// The request families' series: a row per operation and method, made on first use (most pairs
/// never happen), indexed by a status of [`STATUSES`].
struct Requests {
    families: RequestFamilies,
    rows: Box<[OnceLock<Children<RequestFamilies>>]>,
}

impl Requests {
    fn new(m: &Metrics) -> Self {
        let rows = (0..Operation::ALL.len() * METHODS.len()).map(|_| OnceLock::new()).collect();
        Requests { families: RequestFamilies(m.requests_total.clone(), m.request_duration.clone()), rows }
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

impl Metrics {
    /// One request in `regscope_requests_total` and `regscope_request_duration_seconds`.
    pub(crate) fn observe_request(&self, op: Operation, method: &Method, status: Option<u16>, seconds: f64) {
        self.children().requests.observe(op, method, status, seconds);
    }

    /// `regscope_in_flight_requests` for the operation's api.
    pub(crate) fn in_flight_of(&self, op: Operation) -> &IntGauge {
        self.children().in_flight.get(op as usize, &[op.api().as_str()])
    }

    pub(crate) fn upstream_response_of(&self, op: Operation) -> &Histogram {
        self.children().upstream_response.get(op as usize, &[op.api().as_str(), op.as_str()])
    }

    pub(crate) fn body_bytes_of(&self, op: Operation, dir: Direction) -> &IntCounter {
        self.children().body_bytes.get(body_index(op, dir), &body(op, dir))
    }

    pub(crate) fn body_size_of(&self, op: Operation, dir: Direction) -> &Histogram {
        self.children().body_size.get(body_index(op, dir), &body(op, dir))
    }

    pub(crate) fn body_transfer_of(&self, op: Operation, dir: Direction) -> &Histogram {
        self.children().body_transfer.get(body_index(op, dir), &body(op, dir))
    }

    pub(crate) fn throughput_of(&self, op: Operation, dir: Direction) -> &Histogram {
        self.children().throughput.get(body_index(op, dir), &body(op, dir))
    }

    pub(crate) fn body_stall_total_of(&self, op: Operation, dir: Direction, side: Side) -> &Counter {
        self.children().body_stall_total.get(stall_index(op, dir, side), &stall(op, dir, side))
    }

    pub(crate) fn body_stall_of(&self, op: Operation, dir: Direction, side: Side) -> &Histogram {
        self.children().body_stall.get(stall_index(op, dir, side), &stall(op, dir, side))
    }

    fn children(&self) -> &PerRequest {
        self.children.get_or_init(|| PerRequest::new(self))
    }
}

/// The `api`, `operation`, `direction` label values.
fn body(op: Operation, dir: Direction) -> [&'static str; 3] {
    [op.api().as_str(), op.as_str(), dir.as_str()]
}

fn stall(op: Operation, dir: Direction, side: Side) -> [&'static str; 4] {
    [op.api().as_str(), op.as_str(), dir.as_str(), side.as_str()]
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

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
                    assert!(seen.insert(stall_index(op, dir, side)));
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
}
