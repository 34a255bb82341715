//! Traces: every finished push and pull leaves as one OpenTelemetry trace (OTLP/HTTP, protobuf)
//! that says what `report --json` says, joins the client's trace when the client sends a
//! `traceparent`, tells the registry regscope's span, and never costs a client anything when the
//! collector is down, slow or failing.
//!
//! No OpenTelemetry Collector is installable on these machines, so the receiver is
//! `support::otlp`, which decodes every request with the official protobuf definitions.

mod support;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::Span;
use regscope::{Outcome, Transfer, TransferDirection};
use support::client::{digest_of, push_small_image, start_upload, Conn};
use support::otlp::{attribute, hex, Answer, Collector};
use support::replay::{pretty, transfers, wait_for_transfer};
use support::{
    docker, eventually, free_port, head_header, metric_sum, read_request_head, Registry, Regscope, RequestHead,
    TestImage,
};

/// Exports quickly, so tests need not wait the specification's five seconds.
const FAST: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

/// A span's time in nanoseconds from the transfer's offsets, as the exporter computes it.
fn at(t: &Transfer, offset: f64) -> u64 {
    t.started_unix_ns + (offset.max(0.0) * 1e9).round() as u64
}

fn duration_us(span: &Span) -> f64 {
    (span.end_time_unix_nano - span.start_time_unix_nano) as f64 / 1e3
}

fn attr(span: &Span, key: &str) -> Option<String> {
    attribute(&span.attributes, key)
}

/// The spans of one trace, waiting until its root (the transfer) has arrived.
fn trace_of(collector: &Collector, trace_id: &str) -> Vec<Span> {
    let arrived = eventually(Duration::from_secs(20), || {
        collector.spans().iter().any(|(_, s)| hex(&s.trace_id) == trace_id && s.parent_span_id.is_empty())
    });
    assert!(arrived, "no root span of trace {trace_id} reached the collector");
    collector.spans().into_iter().map(|(_, s)| s).filter(|s| hex(&s.trace_id) == trace_id).collect()
}

/// Checks one exported trace against the transfer as `report --json` has it, to the microsecond.
fn assert_trace_matches(t: &Transfer, spans: &[Span]) {
    let close = |a: u64, b: u64, what: &str| {
        assert!(a.abs_diff(b) <= 1_000, "{what}: trace {a} ns, report {b} ns (off by more than 1 µs)\n{}", pretty(t))
    };
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root per transfer trace");
    let root = roots[0];
    assert_eq!(attr(root, "regscope.transfer.id"), Some(t.id.to_string()));
    assert_eq!(root.name, format!("{} {}", t.direction.as_str(), t.image()));
    assert_eq!(attr(root, "regscope.outcome").as_deref(), Some(t.outcome.as_str()));
    assert_eq!(attr(root, "regscope.bytes"), Some(t.bytes.to_string()));
    close(root.start_time_unix_nano, at(t, 0.0), "transfer start");
    close(root.end_time_unix_nano, at(t, t.wall_seconds), "transfer end");
    let children =
        |parent: &Span| -> Vec<&Span> { spans.iter().filter(|s| s.parent_span_id == parent.span_id).collect() };

    // One span per blob, under the root, with the blob's times and bytes.
    let blob_spans: Vec<&Span> =
        children(root).into_iter().filter(|s| attr(s, "regscope.blob.outcome").is_some()).collect();
    assert_eq!(blob_spans.len(), t.blobs.len(), "one span per blob");
    let mut bytes = 0;
    for blob in &t.blobs {
        let span = blob_spans
            .iter()
            .find(|s| attr(s, "regscope.blob.digest") == blob.digest)
            .unwrap_or_else(|| panic!("no span for blob {:?}", blob.digest));
        close(span.start_time_unix_nano, at(t, blob.start), "blob start");
        close(span.end_time_unix_nano, at(t, blob.end), "blob end");
        assert_eq!(attr(span, "regscope.blob.outcome").as_deref(), Some(blob.outcome.as_str()));
        assert_eq!(attr(span, "regscope.bytes"), Some(blob.bytes.to_string()));
        bytes += blob.bytes;
        // Push: the phase spans add up to the report's phases.
        if let Some(phases) = &blob.phases {
            let mut sums: HashMap<String, u64> = HashMap::new();
            for phase in children(span).into_iter().filter_map(|s| Some((attr(s, "regscope.phase")?, s))) {
                *sums.entry(phase.0).or_default() += phase.1.end_time_unix_nano - phase.1.start_time_unix_nano;
            }
            for (name, seconds) in
                [("start", phases.start), ("transfer", phases.transfer), ("commit", phases.commit), ("gap", phases.gap)]
            {
                let got = sums.get(name).copied().unwrap_or(0);
                close(got, (seconds * 1e9).round() as u64, &format!("phase {name} of {:?}", blob.digest));
            }
        }
        // Its requests hang under it.
        for id in &blob.requests {
            let request = spans.iter().find(|s| attr(s, "regscope.request.id") == Some(id.to_string())).unwrap();
            assert_eq!(request.parent_span_id, span.span_id, "request {id} under its blob");
        }
    }
    if t.direction == TransferDirection::Push || t.blobs.iter().all(|b| b.bytes > 0) {
        assert!(bytes <= t.bytes, "blob bytes {bytes} within the transfer's {}", t.bytes);
    }

    // One span per request, with its times, bytes and status.
    let request_spans: Vec<&Span> = spans.iter().filter(|s| attr(s, "regscope.request.id").is_some()).collect();
    assert_eq!(request_spans.len(), t.requests.len(), "one span per request");
    let (mut request_in, mut request_out) = (0, 0);
    for r in &t.requests {
        let span = request_spans.iter().find(|s| attr(s, "regscope.request.id") == Some(r.id.to_string())).unwrap();
        close(span.start_time_unix_nano, at(t, r.start), "request start");
        close(span.end_time_unix_nano, at(t, r.end), "request end");
        assert_eq!(span.name, format!("{} {}", r.method, r.operation.as_str()));
        assert_eq!(attr(span, "http.response.status_code"), r.status.map(|s| s.to_string()));
        assert_eq!(attr(span, "http.request.body.size"), Some(r.bytes_in().to_string()));
        assert_eq!(attr(span, "http.response.body.size"), Some(r.bytes_out().to_string()));
        request_in += r.bytes_in();
        request_out += r.bytes_out();
    }
    let moved = if t.direction == TransferDirection::Push { request_in } else { request_out };
    assert_eq!(moved, t.bytes, "the request spans' bytes add up to the transfer's");
}

/// No attribute carries an upload's `_state`, a token or a credential.
fn assert_no_secrets(spans: &[Span]) {
    for span in spans {
        for kv in &span.attributes {
            let value = attribute(std::slice::from_ref(kv), &kv.key).unwrap_or_default();
            for (i, _) in value.match_indices("_state=") {
                assert!(value[i..].starts_with("_state=REDACTED"), "{} = {value} in span {}", kv.key, span.name);
            }
            let lower = value.to_ascii_lowercase();
            assert!(!lower.contains("bearer") && !lower.contains("basic "), "{} = {value}", kv.key);
        }
    }
}

/// The span tree as the README shows it: names, durations, the attributes that matter.
fn print_tree(spans: &[Span]) {
    fn walk(spans: &[Span], parent: &[u8], depth: usize, base: u64) {
        let mut children: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
        children.sort_by_key(|s| s.start_time_unix_nano);
        for s in children {
            let keys = [
                "regscope.outcome",
                "regscope.bytes",
                "regscope.seconds.client",
                "regscope.seconds.registry",
                "regscope.seconds.transfer",
                "regscope.blob.outcome",
                "http.response.status_code",
            ];
            let shown: Vec<String> = keys.iter().filter_map(|k| Some(format!("{k}={}", attr(s, k)?))).collect();
            eprintln!(
                "{:indent$}{} +{:.3}s {:.3}s {}",
                "",
                s.name,
                (s.start_time_unix_nano - base) as f64 / 1e9,
                duration_us(s) / 1e6,
                shown.join(" "),
                indent = depth * 2
            );
            walk(spans, &s.span_id, depth + 1, base);
        }
    }
    let base = spans.iter().map(|s| s.start_time_unix_nano).min().unwrap_or(0);
    walk(spans, &[], 0, base);
}

#[test]
fn a_docker_push_and_pull_are_one_trace_each_that_agrees_with_the_report() {
    const REPOSITORY: &str = "regscope-test/traces";
    let collector = Collector::start(Answer::Ok);
    let registry = Registry::start();
    let regscope = Regscope::start_env(
        &["--upstream", &registry.url(), "--otlp-endpoint", &collector.endpoint(), "--transfer-idle-timeout", "2s"],
        &[
            FAST,
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=ci"),
        ],
    );
    let admin = regscope.admin_addr();
    let docker = docker();
    let reference = format!("{}/{REPOSITORY}:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[3 << 20, 5 << 20]);
    docker.load(&image);
    docker.push(&reference);
    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(10));
    docker.rmi(&reference);
    docker.pull(&reference);
    let pull = wait_for_transfer(admin, TransferDirection::Pull, REPOSITORY, Duration::from_secs(15));

    // What `regscope report --json` prints is what the traces are held to.
    let report = support::check(
        std::process::Command::new(env!("CARGO_BIN_EXE_regscope")).args([
            "report",
            "--admin",
            &format!("http://{admin}"),
            "--json",
            "--last",
            "50",
        ]),
        Duration::from_secs(30),
    );
    let reported: Vec<Transfer> = serde_json::from_str(&report).expect("report --json parses as transfers");
    let from_report = |id: u64| reported.iter().find(|t| t.id == id).cloned().expect("the transfer is in the report");
    let (push, pull) = (from_report(push.id), from_report(pull.id));
    for t in [&push, &pull] {
        assert_eq!(t.outcome, Outcome::Complete, "{}", pretty(t));
        let trace_id = t.trace_id.expect("a transfer names its trace when traces are on").to_string();
        let spans = trace_of(&collector, &trace_id);
        eprintln!("{} as exported:", t.image());
        print_tree(&spans);
        assert_trace_matches(t, &spans);
        assert_no_secrets(&spans);
    }
    assert_ne!(push.trace_id, pull.trace_id);
    // The web UI's page names the trace, to look it up in the backend.
    let page = support::http_get(admin, &format!("/transfers/{}", push.id)).text();
    assert!(page.contains(&format!(r#"<code id="trace-id">{}</code>"#, push.trace_id.unwrap())), "{page}");
    // One trace per transfer: every root names a distinct transfer, and every transfer has one.
    let roots = || -> Vec<String> {
        let spans = collector.spans();
        spans
            .iter()
            .filter(|(_, s)| s.parent_span_id.is_empty())
            .filter_map(|(_, s)| attr(s, "regscope.transfer.id"))
            .collect()
    };
    let all_exported = eventually(Duration::from_secs(10), || roots().len() >= transfers(admin).len());
    assert!(all_exported, "exported {:?}, finished {}", roots(), transfers(admin).len());
    let distinct: std::collections::HashSet<String> = roots().into_iter().collect();
    assert_eq!(distinct.len(), roots().len(), "a transfer exported twice: {:?}", roots());

    let (resource, _) = collector.spans().remove(0);
    assert_eq!(attribute(&resource, "service.name").as_deref(), Some("regscope"));
    assert_eq!(attribute(&resource, "deployment.environment").as_deref(), Some("test"));
    let request = collector.requests().remove(0);
    let header = |name: &str| request.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(header("content-type").as_deref(), Some("application/x-protobuf"));
    assert_eq!(header("x-tenant").as_deref(), Some("ci"), "OTEL_EXPORTER_OTLP_HEADERS are sent");
    let metrics = regscope.metrics_text();
    let exported = metric_sum(&metrics, "regscope_trace_spans_exported_total", &[]);
    assert_eq!(exported as usize, collector.spans().len(), "{metrics}");
    assert_eq!(metric_sum(&metrics, "regscope_trace_spans_dropped_total", &[]), 0.0);
}

/// A registry stand-in that serves one image and keeps every request head it receives, so the
/// test sees exactly what regscope forwarded.
struct RecordingOrigin {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<RequestHead>>>,
}

impl RecordingOrigin {
    fn start(repository: &'static str, blobs: Vec<Vec<u8>>) -> RecordingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": blobs[0].len(), "digest": digest_of(&blobs[0])},
            "layers": blobs[1..].iter().map(|b| serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": b.len(), "digest": digest_of(b)
            })).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        let shared = Arc::clone(&heads);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (heads, blobs, manifest) = (Arc::clone(&shared), blobs.clone(), manifest.clone());
                std::thread::spawn(move || serve_origin(stream, repository, &blobs, &manifest, &heads));
            }
        });
        RecordingOrigin { addr, heads }
    }

    /// The headers of the first request whose request line contains `needle`.
    fn headers_of(&self, needle: &str) -> Vec<(String, String)> {
        let heads = self.heads.lock().unwrap();
        let found = heads.iter().find(|(line, _)| line.contains(needle));
        found.unwrap_or_else(|| panic!("the origin saw no {needle}: {heads:?}")).1.clone()
    }
}

fn serve_origin(
    stream: TcpStream,
    repository: &str,
    blobs: &[Vec<u8>],
    manifest: &[u8],
    heads: &Mutex<Vec<RequestHead>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    while let Some((line, headers)) = read_request_head(&mut reader) {
        heads.lock().unwrap().push((line.clone(), headers));
        let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
        let (status, content_type, body): (u16, &str, &[u8]) = if path == "/v2/" {
            (200, "application/json", b"{}")
        } else if path == format!("/v2/{repository}/manifests/v1") {
            (200, "application/vnd.docker.distribution.manifest.v2+json", manifest)
        } else if let Some(blob) = blobs.iter().find(|b| path == format!("/v2/{repository}/blobs/{}", digest_of(b))) {
            (200, "application/octet-stream", blob)
        } else {
            (404, "application/json", b"{\"errors\":[{\"code\":\"NOT_FOUND\"}]}")
        };
        let digest = digest_of(body);
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ndocker-content-digest: {digest}\r\ndocker-distribution-api-version: registry/2.0\r\n\r\n",
            body.len()
        );
        if writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(body)).is_err() {
            return;
        }
    }
}

#[test]
fn a_clients_traceparent_is_joined_and_the_registry_is_told_regscopes_span() {
    const REPOSITORY: &str = "traced/app";
    let blobs = vec![b"{\"architecture\":\"amd64\"}".to_vec(), vec![0x5a; 40_000]];
    let origin = RecordingOrigin::start(REPOSITORY, blobs.clone());
    let collector = Collector::start(Answer::Ok);
    let regscope = Regscope::start_env(
        &["--upstream", &format!("http://{}", origin.addr), "--otlp-endpoint", &collector.endpoint()],
        &[FAST],
    );
    let host = regscope.proxy_addr().to_string();
    let client_trace = "0af7651916cd43dd8448eb211c80319c";
    let (manifest_parent, config_parent) = ("b7ad6b7169203331", "c8be7c827a314442");
    let mut conn = Conn::connect(regscope.proxy_addr());
    // The manifest and the config come with the client's context (and vendor state); the layer without.
    let manifest = conn
        .request(
            "GET",
            &format!("/v2/{REPOSITORY}/manifests/v1"),
            &[
                ("Host", &host),
                ("traceparent", &format!("00-{client_trace}-{manifest_parent}-01")),
                ("tracestate", "vendor=opaque-1"),
                ("baggage", "build=42"),
            ],
            b"",
        )
        .unwrap();
    assert_eq!(manifest.status(), 200);
    for (blob, parent) in [(&blobs[0], Some(config_parent)), (&blobs[1], None)] {
        let traceparent = parent.map(|p| format!("00-{client_trace}-{p}-01"));
        let mut headers = vec![("Host", host.as_str())];
        if let Some(value) = &traceparent {
            headers.push(("traceparent", value));
        }
        let response =
            conn.request("GET", &format!("/v2/{REPOSITORY}/blobs/{}", digest_of(blob)), &headers, b"").unwrap();
        assert_eq!(response.status(), 200);
    }
    let pull = wait_for_transfer(regscope.admin_addr(), TransferDirection::Pull, REPOSITORY, Duration::from_secs(10));
    let transfer_trace = pull.trace_id.expect("trace id").to_string();
    let spans = trace_of(&collector, &transfer_trace);
    let all: Vec<Span> = collector.spans().into_iter().map(|(_, s)| s).collect();
    let span_named = |id: &str| all.iter().find(|s| hex(&s.span_id) == id).unwrap_or_else(|| panic!("no span {id}"));

    // The registry got regscope's span in the client's trace; that span's parent is the client's.
    let forwarded = origin.headers_of("/manifests/v1");
    let value = head_header(&forwarded, "traceparent").expect("the registry-side request carries a traceparent");
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!((fields[0], fields[1], fields[3]), ("00", client_trace, "01"), "{value}");
    assert_ne!(fields[2], manifest_parent, "regscope names its own span, not the client's");
    let span = span_named(fields[2]);
    assert_eq!(hex(&span.trace_id), client_trace, "the request's span joins the client's trace");
    assert_eq!(hex(&span.parent_span_id), manifest_parent, "under the client's span");
    assert_eq!(span.name, "GET manifest_get");
    assert_eq!(head_header(&forwarded, "tracestate"), Some("vendor=opaque-1"), "tracestate passes untouched");
    assert_eq!(head_header(&forwarded, "baggage"), Some("build=42"), "baggage passes untouched");
    let config = origin.headers_of(&digest_of(&blobs[0]));
    let config_span = span_named(head_header(&config, "traceparent").unwrap().split('-').nth(2).unwrap());
    assert_eq!(hex(&config_span.parent_span_id), config_parent);

    // A request without context is in the transfer's trace, under its blob, and so is what the
    // registry was told.
    let layer = origin.headers_of(&digest_of(&blobs[1]));
    let value = head_header(&layer, "traceparent").expect("traceparent on a request the client sent none with");
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!(fields[1], transfer_trace, "{value}");
    let layer_span = span_named(fields[2]);
    let blob_span = spans.iter().find(|s| attr(s, "regscope.blob.digest") == Some(digest_of(&blobs[1]))).unwrap();
    assert_eq!(layer_span.parent_span_id, blob_span.span_id);

    // The transfer's root links to the requests that live in the client's trace.
    let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
    let links: Vec<(String, String)> = root.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect();
    for joined in [span, config_span] {
        assert!(links.contains(&(client_trace.to_owned(), hex(&joined.span_id))), "{links:?}");
    }
    assert_eq!(links.len(), 2, "{links:?}");
    // A request that is part of no transfer gets no traceparent from regscope.
    let ping = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    assert_eq!(ping.status(), 200);
    assert_eq!(head_header(&origin.headers_of("GET /v2/ "), "traceparent"), None);
}

/// A small image pushed with the raw client, on a connection of its own; how long it took.
fn push_small(proxy: SocketAddr, repository: &str, tag: &str, seed: u8) -> Duration {
    let started = Instant::now();
    push_small_image(&mut Conn::connect(proxy), &proxy.to_string(), repository, tag, seed, &[]);
    started.elapsed()
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[test]
fn a_collector_down_slow_or_failing_changes_nothing_a_client_sees() {
    const PUSHES: u8 = 30;
    let registry = Registry::start();
    // One regscope per collector state, pushed to in turn, so whatever else loads the machine
    // loads them all alike.
    let down = format!("http://127.0.0.1:{}", free_port());
    let cases: Vec<(&str, Option<Collector>)> = vec![
        ("healthy", Some(Collector::start(Answer::Ok))),
        ("down", None),
        ("slow", Some(Collector::start(Answer::Late(Duration::from_secs(5))))),
        ("failing", Some(Collector::start(Answer::Status(500)))),
    ];
    let proxies: Vec<Regscope> = cases
        .iter()
        .map(|(_, collector)| {
            let endpoint = collector.as_ref().map_or(down.clone(), Collector::endpoint);
            Regscope::start_env(
                &["--upstream", &registry.url(), "--otlp-endpoint", &endpoint],
                &[
                    ("OTEL_BSP_SCHEDULE_DELAY", "20"),
                    ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
                    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "16"),
                ],
            )
        })
        .collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for i in 0..PUSHES {
        for (case, regscope) in proxies.iter().enumerate() {
            let repository = format!("regscope-test/collector-{}", cases[case].0);
            times[case].push(push_small(regscope.proxy_addr(), &repository, &format!("t{i}"), i));
        }
    }
    let medians: Vec<Duration> = times.into_iter().map(median).collect();
    for (((name, _), regscope), median) in cases.iter().zip(&proxies).zip(&medians) {
        eprintln!("{name} collector: median push {median:?}, peak RSS {} KiB", regscope.peak_rss_kib());
        let finished =
            eventually(Duration::from_secs(10), || transfers(regscope.admin_addr()).len() == PUSHES as usize);
        assert!(finished, "{name}: every push finished");
        let counted = |metrics: &str| {
            (
                metric_sum(metrics, "regscope_trace_spans_exported_total", &[]),
                metric_sum(metrics, "regscope_trace_spans_dropped_total", &[]),
            )
        };
        // Each push is at least 8 spans (root, two blobs, five requests): all are accounted for.
        let minimum = 8.0 * f64::from(PUSHES);
        let accounted = eventually(Duration::from_secs(20), || {
            let (exported, dropped) = counted(&regscope.metrics_text());
            match *name {
                "healthy" => exported >= minimum && dropped == 0.0,
                // The queue fills during the first five-second answer; the rest is dropped.
                "slow" => dropped > 0.0,
                _ => exported == 0.0 && dropped >= minimum,
            }
        });
        let metrics = regscope.metrics_text();
        assert!(accounted, "{name}: exported/dropped {:?}\n{metrics}", counted(&metrics));
        if *name == "slow" {
            let full = metric_sum(&metrics, "regscope_trace_spans_dropped_total", &[("reason", "queue_full")]);
            assert!(full > 0.0, "{name}: a slow collector fills the bounded queue: {metrics}");
        }
        assert!(regscope.peak_rss_kib() < 64 * 1024, "{name}: peak RSS {} KiB", regscope.peak_rss_kib());
        let base = medians[0];
        assert!(
            *median <= base * 3 / 2 + Duration::from_millis(25),
            "{name} collector: median push {median:?} against {base:?} with a healthy one"
        );
    }
}

#[test]
fn shutdown_sends_what_is_queued_before_exiting() {
    let registry = Registry::start();
    let collector = Collector::start(Answer::Ok);
    // Nothing would leave on schedule for a minute: only the shutdown flush sends it.
    let regscope = Regscope::start_env(
        &["--upstream", &registry.url(), "--otlp-endpoint", &collector.endpoint()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    );
    push_small(regscope.proxy_addr(), "regscope-test/flush", "done", 7);
    // An upload left open: closed as incomplete at shutdown, and exported too.
    let mut conn = Conn::connect(regscope.proxy_addr());
    start_upload(&mut conn, &regscope.proxy_addr().to_string(), "regscope-test/flush-open");
    let finished = eventually(Duration::from_secs(10), || !transfers(regscope.admin_addr()).is_empty());
    assert!(finished);
    assert!(collector.spans().is_empty(), "nothing is sent before the schedule or the shutdown");
    regscope.sigterm();
    let exited = eventually(Duration::from_secs(15), || {
        collector.spans().iter().filter(|(_, s)| s.parent_span_id.is_empty()).count() >= 2
    });
    let roots: Vec<(String, Option<String>)> = collector
        .spans()
        .iter()
        .filter(|(_, s)| s.parent_span_id.is_empty())
        .map(|(_, s)| (s.name.clone(), attr(s, "regscope.outcome")))
        .collect();
    assert!(exited, "both transfers flushed at shutdown: {roots:?}");
    assert!(roots.contains(&("push regscope-test/flush:done".into(), Some("complete".into()))), "{roots:?}");
    assert!(roots.contains(&("push regscope-test/flush-open".into(), Some("incomplete".into()))), "{roots:?}");
}

#[test]
fn export_over_tls_trusts_the_system_roots_and_the_configured_ca_only() {
    let registry = Registry::start();
    let dir = support::TempDir::new("otlp-tls");
    let ca = dir.path().join("collector-ca.pem");
    let collector = Collector::start_tls(Answer::Ok, &ca);
    let ca_text = ca.to_str().unwrap();
    let trusting = Regscope::start_env(
        &["--upstream", &registry.url(), "--otlp-endpoint", &collector.endpoint()],
        &[FAST, ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca_text)],
    );
    // Without the CA, the collector's self-signed certificate is not trusted: nothing is sent.
    let doubting =
        Regscope::start_env(&["--upstream", &registry.url(), "--otlp-endpoint", &collector.endpoint()], &[FAST]);
    push_small(trusting.proxy_addr(), "regscope-test/tls-trusted", "1", 1);
    push_small(doubting.proxy_addr(), "regscope-test/tls-doubted", "1", 2);
    let arrived = eventually(Duration::from_secs(20), || {
        collector.spans().iter().any(|(_, s)| s.name == "push regscope-test/tls-trusted:1")
    });
    assert!(arrived, "the trace went over TLS to the collector");
    let refused = eventually(Duration::from_secs(20), || {
        metric_sum(&doubting.metrics_text(), "regscope_trace_spans_dropped_total", &[("reason", "export_failed")]) > 0.0
    });
    assert!(refused, "an untrusted collector certificate fails the export: {}", doubting.metrics_text());
    assert!(!collector.spans().iter().any(|(_, s)| s.name.contains("tls-doubted")));
}
