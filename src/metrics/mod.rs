//! Every Prometheus family regscope exports, in one place: this file is the contract.
//!
//! Labels only ever come from closed sets (the `protocol` vocabulary, and the method and status
//! in `labels`): never from a path, digest, upload id or user string. The one opt-in exception,
//! `--label-repository N`, is capped by [`RepositoryLabels`].

mod children;
mod labels;

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use children::PerRequest;
pub(crate) use labels::RepositoryLabels;

use crate::protocol::{
    Api, Culprit, Direction, FailureCause, Operation, Outcome, Party, Redirected, Side, SpanDrop, TransferDirection,
    UpstreamErrorKind,
};

/// Durations from 1 ms to 1 h.
pub(crate) const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Sizes from 1 KiB to 64 GiB, by powers of four.
pub(crate) const SIZE_BUCKETS: &[f64] = &[
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
pub(crate) const THROUGHPUT_BUCKETS: &[f64] = &[
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
pub(crate) const THROUGHPUT_MIN_BYTES: u64 = 1 << 20;

/// All metric families. Cloning the handles inside is cheap (they are `Arc`s).
pub(crate) struct Metrics {
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
    pub downloads_waiting: IntGauge,
    pub download_admission_wait: Histogram,
    pub upstream_errors: IntCounterVec,
    pub aborted: IntCounterVec,
    pub stalled: IntCounterVec,
    pub repository_requests: Option<IntCounterVec>,
    pub repository_bytes: Option<IntCounterVec>,
    pub upload_phase: HistogramVec,
    pub image_transfer: HistogramVec,
    pub image_time_total: prometheus::CounterVec,
    pub failed_attempts: IntCounterVec,
    pub lost_seconds: prometheus::CounterVec,
    pub redirects: IntCounterVec,
    pub trace_spans_exported: prometheus::IntCounter,
    pub trace_spans_dropped: IntCounterVec,
    /// Caps the opt-in repository label.
    pub repositories: RepositoryLabels,
    /// The per-request families' children, resolved once per label set. Built on first use:
    /// it clones the families above.
    children: OnceLock<PerRequest>,
}

/// Counts one in a gauge for as long as it lives (an open connection, a waiting upload), however
/// its life ends.
pub(crate) struct Counted(IntGauge);

impl Counted {
    pub(crate) fn new(gauge: IntGauge) -> Self {
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
    pub(crate) fn new(repository_cap: usize) -> Self {
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
            downloads_waiting: IntGauge::new(
                "regscope_downloads_waiting",
                "Blob downloads waiting for a slot (--download-slots) before being forwarded, right now.",
            )
            .expect("valid gauge definition"),
            download_admission_wait: unlabelled_histogram(
                "regscope_download_admission_wait_seconds",
                "Per blob download that found every slot (--download-slots) taken: how long it waited to be forwarded.",
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
            failed_attempts: counter(
                "regscope_failed_attempts_total",
                "Blob uploads and downloads that failed (did not commit, or did not deliver every byte), by who ended them and how.",
                &["direction", "failed_by", "cause"],
            ),
            lost_seconds: float_counter(
                "regscope_lost_seconds_total",
                "Wall time of whole pushes and pulls lost to failures (the failed attempt and the client's wait before its retry), by who failed; with regscope_image_time_seconds_total it adds up to the wall time.",
                &["direction", "party"],
            ),
            redirects: counter(
                "regscope_redirects_total",
                "Registry redirects to other hosts: storage (object storage, CDNs) and auth (token realms), captured through regscope, or passed to the client unseen (--redirects, --auth-realms pass).",
                &["party", "handling"],
            ),
            trace_spans_exported: prometheus::IntCounter::new(
                "regscope_trace_spans_exported_total",
                "Spans sent to the OpenTelemetry collector and accepted by it (--otlp-endpoint).",
            )
            .expect("valid metric"),
            trace_spans_dropped: counter(
                "regscope_trace_spans_dropped_total",
                "Spans not exported: the queue was full, the export failed or timed out, or the collector rejected them.",
                &["reason"],
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
        register(Box::new(m.downloads_waiting.clone()));
        register(Box::new(m.download_admission_wait.clone()));
        register(Box::new(m.upstream_errors.clone()));
        register(Box::new(m.aborted.clone()));
        register(Box::new(m.stalled.clone()));
        register(Box::new(m.upload_phase.clone()));
        register(Box::new(m.image_transfer.clone()));
        register(Box::new(m.image_time_total.clone()));
        register(Box::new(m.failed_attempts.clone()));
        register(Box::new(m.lost_seconds.clone()));
        register(Box::new(m.redirects.clone()));
        register(Box::new(m.trace_spans_exported.clone()));
        register(Box::new(m.trace_spans_dropped.clone()));
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
        for api in Api::ALL {
            self.in_flight.with_label_values(&[api.as_str()]);
        }
        for side in Side::ALL {
            self.connections.with_label_values(&[side.as_str()]);
        }
        for direction in Direction::ALL {
            self.stalled.with_label_values(&[direction.as_str()]);
        }
        for op in Operation::ALL {
            for side in Side::ALL {
                self.aborted.with_label_values(&[op.as_str(), side.as_str()]);
            }
        }
        for direction in TransferDirection::ALL {
            for party in Party::ALL {
                self.image_time_total.with_label_values(&[direction.as_str(), party.as_str()]);
            }
            for outcome in Outcome::ALL {
                self.image_transfer.with_label_values(&[direction.as_str(), outcome.as_str()]);
            }
            for culprit in Culprit::ALL {
                self.lost_seconds.with_label_values(&[direction.as_str(), culprit.as_str()]);
                for cause in FailureCause::ALL {
                    self.failed_attempts.with_label_values(&[direction.as_str(), culprit.as_str(), cause.as_str()]);
                }
            }
        }
        for party in [Party::Storage, Party::Auth] {
            for handling in Redirected::ALL {
                self.redirects.with_label_values(&[party.as_str(), handling.as_str()]);
            }
        }
        for reason in SpanDrop::ALL {
            self.trace_spans_dropped.with_label_values(&[reason.as_str()]);
        }
        for kind in UpstreamErrorKind::ALL {
            self.upstream_errors.with_label_values(&[kind.as_str()]);
        }
    }

    /// The Prometheus text exposition of every family.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding into a Vec cannot fail");
        out
    }

    pub(crate) fn connection_gauge(&self, side: Side) -> IntGauge {
        self.connections.with_label_values(&[side.as_str()])
    }

    /// The client connections open now, as the upstream read classes read them.
    pub(crate) fn open_clients(&self) -> OpenClients {
        OpenClients(self.connection_gauge(Side::Client))
    }
}

/// Reads the client side of the connections gauge as a count (one atomic load).
#[derive(Clone)]
pub(crate) struct OpenClients(IntGauge);

impl OpenClients {
    pub(crate) fn now(&self) -> usize {
        usize::try_from(self.0.get()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

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
