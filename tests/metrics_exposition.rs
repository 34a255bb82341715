//! `/metrics` under load: 200 blob uploads in flight at once through regscope, then 200
//! downloads, while the admin port is scraped over and over. Every scrape answers 200, the exposition passes
//! `promtool check metrics`, and every label value comes from a closed set: request data (paths,
//! digests, upload ids, odd methods) never becomes a label.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use regscope::{Api, Operation};
use regscope::{Direction, Side};
use support::client::{digest_of, start_upload, target_at, with_digest, Conn, Pattern};
use support::{eventually, http_get, metric_sum, Registry, Regscope};

const CLIENTS: usize = 200;
/// Each client's blob. 200 of them move 200 MiB each way.
const BLOB_SIZE: usize = 1 << 20;
const REPO: &str = "regscope-test/exposition";
/// How long clients may take to all reach the middle of their uploads before the test fails.
const HOLD_LIMIT: Duration = Duration::from_secs(60);
/// How long all 200 uploads are held open together, half sent, while the scraper runs.
const HOLD: Duration = Duration::from_millis(500);

#[test]
fn metrics_scrape_during_200_concurrent_transfers_and_pass_promtool() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    send_label_bait(proxy);

    // Scrape continuously from before the load until after it.
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(Mutex::new(Vec::<(Instant, u16, String)>::new()));
    let scraper = {
        let (stop, scrapes, admin) = (stop.clone(), scrapes.clone(), regscope.admin_addr());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let response = http_get(admin, "/metrics");
                scrapes.lock().unwrap().push((Instant::now(), response.status, response.text()));
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Each client uploads its own blob in one chunked PATCH, and stops half way until all 200
    // are half way: 200 uploads in flight together, which no buffer can finish for them. Then
    // they finish, and each downloads its blob back, all at about the same time.
    let base: Arc<Vec<u8>> = Arc::new(Pattern::new(0xE4).next_slice(BLOB_SIZE).to_vec());
    let halfway = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let load_started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (base, halfway, release) = (base.clone(), halfway.clone(), release.clone());
            thread::spawn(move || {
                let mut blob = base.to_vec();
                blob[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let digest = digest_of(&blob);
                let host = proxy.to_string();
                let origin = format!("http://{proxy}");
                let mut conn = Conn::connect(proxy);
                let target = target_at(&start_upload(&mut conn, &host, REPO), &origin);
                conn.send_head("PATCH", &target, &[("Host", &host), ("Transfer-Encoding", "chunked")]).unwrap();
                conn.send_chunk(&blob[..BLOB_SIZE / 2]).unwrap();
                halfway.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + HOLD_LIMIT;
                while !release.load(Ordering::SeqCst) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                conn.send_chunk(&blob[BLOB_SIZE / 2..]).unwrap();
                conn.finish_chunks().unwrap();
                let patched = conn.read_response().unwrap();
                assert_eq!(patched.status(), 202, "PATCH {:?} {}", patched.head, patched.text());
                let location = patched.header("location").expect("PATCH 202 without Location");
                let put = with_digest(&target_at(location, &origin), &digest);
                let finished = conn.request("PUT", &put, &[("Host", &host)], b"").unwrap();
                assert_eq!(finished.status(), 201, "PUT {:?} {}", finished.head, finished.text());

                let (head, len, got) =
                    conn.get_hashed(&format!("/v2/{REPO}/blobs/{digest}"), &[("Host", &host)]).unwrap();
                assert_eq!((head.status, len), (200, BLOB_SIZE as u64), "GET {head:?}");
                assert_eq!(got, digest, "the blob came back as it went up");
            })
        })
        .collect();
    let all_halfway = eventually(HOLD_LIMIT, || halfway.load(Ordering::SeqCst) == CLIENTS);
    // The POSTs are over once their clients moved on; what is left in flight is the 200 PATCHes.
    let in_flight = |text: &str| metric_sum(text, "regscope_in_flight_requests", &[("api", "v2")]);
    let mut mid_load = regscope.metrics_text();
    let settled = eventually(Duration::from_secs(10), || {
        mid_load = regscope.metrics_text();
        in_flight(&mid_load) == CLIENTS as f64
    });
    thread::sleep(HOLD);
    release.store(true, Ordering::SeqCst);
    assert!(all_halfway, "only {} of {CLIENTS} uploads got half way", halfway.load(Ordering::SeqCst));
    assert!(settled, "{} requests in flight with {CLIENTS} uploads half way", in_flight(&mid_load));
    let hold_ended = Instant::now();
    for client in clients {
        client.join().expect("a client failed");
    }
    let load_ended = Instant::now();
    // Let the scraper get one more in after the load.
    let scraped_after = || scrapes.lock().unwrap().iter().any(|(at, _, _)| *at > load_ended);
    assert!(eventually(Duration::from_secs(10), scraped_after), "the scraper stopped");
    stop.store(true, Ordering::Relaxed);
    scraper.join().unwrap();

    let scrapes = scrapes.lock().unwrap();
    let between = |from: Instant, to: Instant| scrapes.iter().filter(|(at, _, _)| *at > from && *at < to).count();
    let (during, while_held) = (between(load_started, load_ended), between(hold_ended - HOLD, hold_ended));
    eprintln!(
        "{} scrapes: {during} during the {:.2}s load, {while_held} while all {CLIENTS} uploads were held half way",
        scrapes.len(),
        (load_ended - load_started).as_secs_f64()
    );
    for (_, status, text) in scrapes.iter() {
        assert_eq!(*status, 200, "a scrape failed: {text}");
    }
    assert!(while_held >= 3, "only {while_held} scrapes landed while the 200 uploads were in flight");
    assert!(during > while_held, "no scrape landed during the downloads");

    let last = regscope.metrics_text();
    assert_eq!(in_flight(&last), 0.0, "requests left in flight after the load");
    let total = (CLIENTS * BLOB_SIZE) as f64;
    let count = |operation: &str, code: &str| {
        metric_sum(&last, "regscope_requests_total", &[("operation", operation), ("code", code)])
    };
    assert_eq!(count("upload_chunk", "202"), CLIENTS as f64, "PATCHes counted");
    assert_eq!(count("blob_get", "200"), CLIENTS as f64, "blob GETs counted");
    let bytes = |operation: &str, direction: &str| {
        metric_sum(&last, "regscope_body_bytes_total", &[("operation", operation), ("direction", direction)])
    };
    assert_eq!(bytes("upload_chunk", "upload"), total, "upload bytes counted");
    assert_eq!(bytes("blob_get", "download"), total, "download bytes counted");

    for text in [&mid_load, &scrapes[scrapes.len() / 2].2, &last] {
        promtool_check(text);
        check_labels(text);
    }
}

// The checks themselves must be able to fail.

#[test]
#[should_panic(expected = "outside its closed set")]
fn the_label_check_rejects_a_digest_as_operation() {
    check_labels(&format!("regscope_requests_total{{api=\"v2\",operation=\"sha256:{}\"}} 1\n", "ab".repeat(32)));
}

#[test]
#[should_panic(expected = "promtool check metrics failed")]
fn promtool_rejects_a_counter_without_total_suffix_or_help() {
    promtool_check("# TYPE regscope_bytes counter\nregscope_bytes 1\n");
}

/// Requests whose paths carry what must never become a label: digests, upload ids, unknown
/// paths, an unknown method.
fn send_label_bait(proxy: std::net::SocketAddr) {
    let host = &proxy.to_string();
    let uuid = "0b7e1f0a-5c2d-4f5e-9a77-3d1c2b4a6e8f";
    let digest = format!("sha256:{}", "de".repeat(32));
    let requests = [
        ("GET", format!("/v2/{REPO}/blobs/uploads/{uuid}?_state=secret")),
        ("DELETE", format!("/v2/{REPO}/blobs/uploads/{uuid}")),
        ("HEAD", format!("/v2/{REPO}/blobs/{digest}")),
        ("GET", format!("/v2/{REPO}/manifests/{digest}")),
        ("GET", format!("/v2/Not_A_Repo/manifests/{uuid}")),
        ("GET", format!("/some/other/path/{uuid}")),
        ("BREW", format!("/v2/{REPO}/tags/list")),
    ];
    for (method, target) in requests {
        let mut conn = Conn::connect(proxy);
        let response = conn.request(method, &target, &[("Host", host)], b"").unwrap();
        assert!(response.status() >= 200, "{method} {target}: {:?}", response.head);
    }
}

/// Pipes the exposition into `promtool check metrics`; panics with its complaints unless clean.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool (Debian package prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every label of every sample has a known name and a value from its closed set, and no value
/// looks like request data.
fn check_labels(text: &str) {
    let apis: Vec<&str> = Api::ALL.iter().map(|a| a.as_str()).collect();
    let operations: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
    let directions: Vec<&str> = Direction::ALL.iter().map(|d| d.as_str()).chain(["push", "pull"]).collect();
    let sides: Vec<&str> = Side::ALL.iter().map(|s| s.as_str()).collect();
    let methods = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"];
    let kinds = ["connect_refused", "connect_timeout", "tls", "reset", "response_timeout", "other"];
    let phases = ["start", "transfer", "commit", "gap", "total"];
    let outcomes = ["complete", "incomplete", "failed"];
    // `regscope` is a party only to the time lost to failures (its own limits).
    let parties = ["client", "registry", "transfer", "storage", "auth", "regscope"];
    let culprits = ["client", "registry", "storage", "regscope"];
    let causes = ["error_status", "connection_lost", "timeout", "limit"];
    let handlings = ["captured", "passed"];
    let reasons = ["queue_full", "export_failed", "rejected"];
    let mut seen = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, _value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample {line:?}"));
        let Some((_, labels)) = series.split_once('{') else { continue };
        let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("malformed labels {line:?}"));
        for (key, value) in parse_labels(labels) {
            let value = value.as_str();
            let ok = match key.as_str() {
                "api" => apis.contains(&value),
                "operation" => operations.contains(&value),
                "method" => methods.contains(&value),
                "code" => {
                    value == "0" || (value.len() == 3 && value.parse::<u16>().is_ok_and(|c| (100..600).contains(&c)))
                }
                "direction" => directions.contains(&value),
                "side" => sides.contains(&value),
                "kind" => kinds.contains(&value),
                "phase" => phases.contains(&value),
                "outcome" => outcomes.contains(&value),
                "party" => parties.contains(&value),
                "failed_by" => culprits.contains(&value),
                "cause" => causes.contains(&value),
                "handling" => handlings.contains(&value),
                "reason" => reasons.contains(&value),
                "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
                "version" => value == env!("CARGO_PKG_VERSION"),
                _ => false,
            };
            assert!(ok, "label {key}={value:?} is outside its closed set: {line}");
            assert!(!looks_like_request_data(value), "label {key}={value:?} looks like request data: {line}");
            seen.insert(format!("{key}={value}"));
        }
    }
    // The bait reached the labels as the closed values it maps to.
    for expected in ["operation=other", "method=other", "operation=upload_status", "operation=blob_head"] {
        assert!(seen.contains(expected), "{expected} missing from the exposition's labels");
    }
}

/// Parses `a="x",b="y \"z\""` into (name, unescaped value) pairs.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start_matches(',');
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("malformed labels {text:?}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().unwrap_or_else(|| panic!("unterminated label value in {text:?}")) {
                (i, '"') => break i,
                (_, '\\') => value.push(chars.next().map_or('\\', |(_, c)| c)),
                (_, c) => value.push(c),
            }
        };
        pairs.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    pairs
}

fn looks_like_request_data(value: &str) -> bool {
    let uuid = value.len() == 36 && value.chars().filter(|c| *c == '-').count() == 4;
    let hexy = value.len() >= 16 && value.chars().all(|c| c.is_ascii_hexdigit());
    value.contains('/')
        || value.contains("sha256")
        || value.contains(':')
        || value.contains('?')
        || uuid
        || hexy
        || value.len() > 40
}
