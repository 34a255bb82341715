//! When the registry is down, silent, or the request is not for a registry at all, regscope answers
//! itself: registry-shaped JSON errors a client can print, counters that say why, a readiness probe
//! that tells the truth, and nothing forwarded that should not be.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::client::{Conn, Response};
use support::{eventually, free_port, http_get, metric_sum, LoggedRequest, Registry, Regscope};

/// Asserts `response` is regscope's own registry-style error: `status`, JSON, code `UNAVAILABLE`,
/// a message naming `upstream`. Returns the message.
fn assert_registry_error(response: &Response, status: u16, upstream: &str) -> String {
    assert_eq!(response.status(), status, "{:?} {}", response.head, response.text());
    assert_eq!(response.header("content-type"), Some("application/json"), "{:?}", response.head);
    let json = response.json();
    let errors = json["errors"].as_array().unwrap_or_else(|| panic!("no errors array: {json}"));
    assert_eq!(errors.len(), 1, "{json}");
    assert_eq!(errors[0]["code"], "UNAVAILABLE", "{json}");
    let message = errors[0]["message"].as_str().unwrap_or_else(|| panic!("no message: {json}")).to_string();
    assert!(message.contains(upstream), "the message names the upstream {upstream}: {message}");
    message
}

fn upstream_errors(regscope: &Regscope, kind: &str) -> f64 {
    metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[("kind", kind)])
}

#[test]
fn a_registry_that_is_down_is_a_502_naming_the_upstream_and_the_cause() {
    // Nothing listens here: the port was free a moment ago and nobody is told about it.
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let regscope = Regscope::start(&["--upstream", &upstream]);
    let host = regscope.proxy_addr().to_string();
    assert_eq!(upstream_errors(&regscope, "connect_refused"), 0.0);

    let mut conn = Conn::connect(regscope.proxy_addr());
    let ping = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    let message = assert_registry_error(&ping, 502, &upstream);
    assert!(message.to_ascii_lowercase().contains("refused"), "the message names the cause: {message}");
    assert_eq!(upstream_errors(&regscope, "connect_refused"), 1.0, "{}", regscope.metrics_text());

    // A request with a body fails the same way.
    let mut conn = Conn::connect(regscope.proxy_addr());
    let patch = conn
        .request(
            "PATCH",
            "/v2/regscope-test/down/blobs/uploads/0b4f0d3e-0000-4000-8000-000000000000?_state=x",
            &[("Host", &host), ("Content-Type", "application/octet-stream")],
            &[7u8; 4096],
        )
        .unwrap();
    assert_registry_error(&patch, 502, &upstream);
    assert_eq!(upstream_errors(&regscope, "connect_refused"), 2.0, "{}", regscope.metrics_text());

    let ready = http_get(regscope.admin_addr(), "/readyz");
    assert_eq!(ready.status, 503, "/readyz with the upstream down: {}", ready.text());
    assert!(ready.text().contains(&upstream), "/readyz says which upstream: {}", ready.text());
    assert_eq!(http_get(regscope.admin_addr(), "/healthz").status, 200, "/healthz is about regscope itself");
}

/// A TCP server that accepts connections and never says a word: a hung registry.
struct SilentUpstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl SilentUpstream {
    fn start() -> SilentUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop_flag, held) = (stop.clone(), accepted.clone());
        thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.lock().unwrap().push(stream),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SilentUpstream { addr, stop, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

impl Drop for SilentUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_registry_that_never_answers_is_a_504_after_the_response_timeout() {
    let silent = SilentUpstream::start();
    let upstream = format!("http://{}", silent.addr);
    let regscope = Regscope::start(&["--upstream", &upstream, "--upstream-response-timeout", "1s"]);
    let host = regscope.proxy_addr().to_string();
    let mut conn = Conn::connect(regscope.proxy_addr());

    let cases: [(&str, &str, Vec<u8>); 2] =
        [("GET", "/v2/", Vec::new()), ("PUT", "/v2/regscope-test/silent/manifests/v1", vec![b'{'; 50_000])];
    for (round, (method, target, body)) in cases.iter().enumerate() {
        let started = Instant::now();
        let response = conn
            .request(method, target, &[("Host", &host), ("Content-Type", "application/octet-stream")], body)
            .unwrap_or_else(|e| panic!("{method} {target}: no response after {:?}: {e}", started.elapsed()));
        let elapsed = started.elapsed();
        let message = assert_registry_error(&response, 504, &upstream);
        eprintln!("{method} {target} to a silent upstream: 504 after {elapsed:?}");
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
            "{method} {target}: 504 after {elapsed:?}, expected about 1 s"
        );
        assert!(message.contains("1s"), "the message says how long it waited: {message}");
        assert_eq!(upstream_errors(&regscope, "response_timeout"), (round + 1) as f64, "{}", regscope.metrics_text());
    }
    assert!(silent.connections() >= 1, "regscope did reach the silent upstream");
}

#[test]
fn forward_proxy_requests_are_refused_and_never_reach_the_registry() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let host = regscope.proxy_addr().to_string();

    let mut conn = Conn::connect(regscope.proxy_addr());
    let absolute = conn.request("GET", "http://example.com/", &[("Host", "example.com")], b"").unwrap();
    assert!((400..500).contains(&absolute.status()), "absolute-form GET: {:?} {}", absolute.head, absolute.text());
    assert_eq!(absolute.json()["errors"][0]["code"], "UNSUPPORTED", "{}", absolute.text());

    // Same for an absolute-form registry path: a forward-proxy request whatever it asks for.
    let mut conn = Conn::connect(regscope.proxy_addr());
    let absolute_v2 = conn.request("GET", "http://example.com/v2/", &[("Host", "example.com")], b"").unwrap();
    assert!((400..500).contains(&absolute_v2.status()), "absolute-form GET /v2/: {:?}", absolute_v2.head);

    let mut conn = Conn::connect(regscope.proxy_addr());
    let connect = conn.request("CONNECT", "example.com:443", &[("Host", "example.com:443")], b"").unwrap();
    assert_eq!(connect.status(), 405, "CONNECT: {:?} {}", connect.head, connect.text());
    assert_eq!(connect.json()["errors"][0]["code"], "UNSUPPORTED", "{}", connect.text());

    // A request that is forwarded, so the registry's log has caught up once it shows this one.
    let mut conn = Conn::connect(regscope.proxy_addr());
    let ping = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    assert_eq!(ping.status(), 200, "{:?}", ping.head);
    let only_the_ping = vec![LoggedRequest { method: "GET".into(), path: "/v2/".into(), status: 200 }];
    let caught_up = eventually(Duration::from_secs(5), || !registry.served_requests().is_empty());
    assert!(caught_up, "the registry never logged the ping:\n{}", registry.log_text());
    thread::sleep(Duration::from_millis(200));
    assert_eq!(registry.served_requests(), only_the_ping, "the registry served more than the ping");
    let forwarded = metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[]);
    assert_eq!(forwarded, 0.0, "no refused request was attempted upstream");
}

#[test]
fn readiness_follows_the_registry_and_health_does_not() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let ready = http_get(regscope.admin_addr(), "/readyz");
    assert_eq!(ready.status, 200, "/readyz with the registry up: {}", ready.text());
    assert_eq!(http_get(regscope.admin_addr(), "/healthz").status, 200);

    drop(registry);
    let down = eventually(Duration::from_secs(10), || http_get(regscope.admin_addr(), "/readyz").status == 503);
    assert!(down, "/readyz stayed {} after the registry stopped", http_get(regscope.admin_addr(), "/readyz").text());
    assert_eq!(http_get(regscope.admin_addr(), "/healthz").status, 200, "/healthz is about regscope itself");
}
