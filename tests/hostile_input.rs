//! Hostile and malformed requests, as raw bytes: each is either refused by regscope with a clear
//! 4xx (and never reaches the registry), or forwarded byte for byte to the registry, whose own
//! answer the client gets. After every one, regscope still serves; after all of them, no request
//! reached the registry that regscope did not see and log as one (no smuggling), and every metric
//! label is still within its closed set.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use regscope::{Api, Operation};
use regscope::{Direction, Side};
use support::hostile::{label_values, ping, raw_exchange};
use support::{eventually, Registry, Regscope};

/// What must happen to a request.
#[derive(Debug, Clone)]
enum Expect {
    /// regscope answers itself with one of these statuses and closes the connection.
    Refused(&'static [u16]),
    /// Forwarded unchanged: the registry logs exactly this method and target, and its status is
    /// what the client gets.
    Forwarded { method: &'static str, path: String },
    /// Anything but a success or a crash (the body is what is malformed, not the head).
    NotSuccess,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

/// Words in the hostile requests that must never turn up as a metric label value.
const MARKERS: &[&str] = &["smuggled", "passwd", "..", "%2f", "%2e", "brew", "example.com", "x(a)", "\u{fffd}"];

fn cases(host: &str) -> Vec<Case> {
    use Expect::*;
    let req = |text: String| text.into_bytes();
    // A reference no registry accepts, so the answer is a 404 whatever the storage's name limits.
    let long_path = |len: usize| format!("/v2/regscope-test/long/manifests/{}", "a".repeat(len));
    let mut cases = vec![
        Case { name: "garbage request line", bytes: req("HELLO\r\n\r\n".into()), expect: Refused(&[400]) },
        Case {
            name: "request line without a version",
            bytes: req("GET /v2/\r\nHost: x\r\n\r\n".into()),
            expect: Refused(&[400, 505]),
        },
        Case {
            name: "unknown HTTP version",
            bytes: req(format!("GET /v2/ HTTP/3.7\r\nHost: {host}\r\n\r\n")),
            expect: Refused(&[400, 505]),
        },
        Case {
            name: "space inside the target",
            bytes: req(format!("GET /v2/ x HTTP/1.1\r\nHost: {host}\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "bare CR inside a header value",
            bytes: req(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX-A: one\rX-Injected: two\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "NUL inside a header value",
            bytes: req(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX-A: one\0two\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "header line without a colon",
            bytes: req(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nNoColonHere\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "obs-fold continuation line",
            bytes: req(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX-A: one\r\n two\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "whitespace before the colon",
            bytes: req(format!("GET /v2/ HTTP/1.1\r\nHost : {host}\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "header name that is not a token",
            bytes: req(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nX(A): 1\r\n\r\n")),
            expect: Refused(&[400]),
        },
        Case {
            name: "200 headers (more than the parser takes)",
            bytes: req(format!(
                "GET /v2/ HTTP/1.1\r\nHost: {host}\r\n{}\r\n",
                (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect::<String>()
            )),
            expect: Refused(&[431, 400]),
        },
        // Request smuggling shapes. hyper lets Transfer-Encoding win over Content-Length, drops the
        // Content-Length, re-frames the body for the registry, and closes the client connection
        // after the response (RFC 9112 §6.3): the bytes after the chunked body are never read as a
        // request, and whatever the chunked body holds stays a body.
        Case {
            name: "CL.TE: Content-Length and Transfer-Encoding, a request hidden after the 0-chunk",
            bytes: req(format!(
                "POST /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n\
                 0\r\n\r\nGET /v2/smuggled-clte/tags/list HTTP/1.1\r\nHost: {host}\r\n\r\n"
            )),
            expect: Forwarded { method: "POST", path: "/v2/".into() },
        },
        Case {
            name: "TE.CL: Transfer-Encoding then Content-Length, a request inside the chunk",
            bytes: {
                let inner = format!("GET /v2/smuggled-tecl/tags/list HTTP/1.1\r\nHost: {host}\r\n\r\n");
                req(format!(
                    "POST /v2/ HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n\
                     {:x}\r\n{inner}\r\n0\r\n\r\n",
                    inner.len()
                ))
            },
            expect: Forwarded { method: "POST", path: "/v2/".into() },
        },
        Case {
            name: "Transfer-Encoding whose last coding is not chunked",
            bytes: req(format!(
                "POST /v2/ HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
            )),
            expect: Refused(&[400]),
        },
        Case {
            name: "obfuscated Transfer-Encoding",
            bytes: req(format!(
                "POST /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            )),
            expect: Refused(&[400]),
        },
        Case {
            name: "Transfer-Encoding on HTTP/1.0",
            bytes: req(format!(
                "POST /v2/ HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )),
            expect: Refused(&[400]),
        },
        Case {
            name: "two differing Content-Length headers",
            bytes: req(format!(
                "POST /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
            )),
            expect: Refused(&[400]),
        },
        Case {
            name: "one Content-Length listing differing values",
            bytes: req(format!("POST /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5, 6\r\n\r\nhello!")),
            expect: Refused(&[400]),
        },
        Case {
            name: "signed Content-Length",
            bytes: req(format!("POST /v2/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: +5\r\n\r\nhello")),
            expect: Refused(&[400]),
        },
        Case {
            name: "chunk size that overflows 64 bits",
            bytes: req(format!(
                "PATCH /v2/regscope-test/hostile/blobs/uploads/0b4f0d3e-0000-4000-8000-000000000000 HTTP/1.1\r\n\
                 Host: {host}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"
            )),
            expect: NotSuccess,
        },
        Case {
            name: "100 KiB path (over the 64 KiB head limit)",
            bytes: req(format!("GET {} HTTP/1.1\r\nHost: {host}\r\n\r\n", long_path(100 << 10))),
            expect: Refused(&[414, 431]),
        },
        Case {
            name: "40 KiB path (under the head limit)",
            bytes: req(format!("GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n", long_path(40 << 10))),
            expect: Forwarded { method: "GET", path: long_path(40 << 10) },
        },
        Case {
            name: "dot-dot segments",
            bytes: req(format!(
                "GET /v2/regscope-test/x/../../../etc/passwd HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )),
            expect: Forwarded { method: "GET", path: "/v2/regscope-test/x/../../../etc/passwd".into() },
        },
        Case {
            name: "percent-encoded dot-dot segments",
            bytes: req(format!(
                "GET /v2/%2e%2e/%2E%2E/etc/passwd HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )),
            expect: Forwarded { method: "GET", path: "/v2/%2e%2e/%2E%2E/etc/passwd".into() },
        },
        Case {
            name: "percent-encoded slash in the repository name",
            bytes: req(format!(
                "GET /v2/regscope-test%2Fx/tags/list HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )),
            expect: Forwarded { method: "GET", path: "/v2/regscope-test%2Fx/tags/list".into() },
        },
        Case {
            name: "absolute-form target (a forward-proxy request)",
            bytes: req("GET http://example.com/v2/ HTTP/1.1\r\nHost: example.com\r\n\r\n".into()),
            expect: Refused(&[400]),
        },
        Case {
            name: "CONNECT",
            bytes: req("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".into()),
            expect: Refused(&[405]),
        },
        Case {
            name: "unknown method",
            bytes: req(format!("BREW /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")),
            expect: Forwarded { method: "BREW", path: "/v2/".into() },
        },
        Case {
            name: "h2c upgrade request (upgrade headers are hop-by-hop: a plain GET goes on)",
            bytes: req(format!(
                "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n\
                 HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            )),
            expect: Forwarded { method: "GET", path: "/v2/".into() },
        },
        Case {
            name: "bare LF line endings",
            bytes: req(format!("GET /v2/_catalog HTTP/1.1\nHost: {host}\nConnection: close\n\n")),
            expect: Forwarded { method: "GET", path: "/v2/_catalog".into() },
        },
    ];
    let mut non_utf8 = b"GET /v2/regscope-test/\xff\xfe/tags/list HTTP/1.1\r\nHost: ".to_vec();
    non_utf8.extend_from_slice(format!("{host}\r\n\r\n").as_bytes());
    cases.push(Case { name: "non-UTF-8 bytes in the path", bytes: non_utf8, expect: Refused(&[400]) });
    cases
}

#[test]
fn hostile_requests_are_refused_or_forwarded_unchanged_and_nothing_is_smuggled() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();

    let mut outcomes = Vec::new();
    for case in cases(&host) {
        let before = registry.served_requests().len();
        let reply = raw_exchange(proxy, &case.bytes, Duration::from_secs(10));
        let first_line = reply.text().lines().next().unwrap_or("").to_string();
        outcomes.push(format!(
            "{:<90} -> {}",
            case.name,
            if first_line.is_empty() { "(closed, no answer)".into() } else { first_line.clone() }
        ));
        assert_ne!(reply.status, Some(101), "{}: regscope switched protocols", case.name);
        match &case.expect {
            Expect::Refused(statuses) => {
                let status = reply.status.unwrap_or(0);
                assert!(statuses.contains(&status), "{}: want one of {statuses:?}, got {:?}", case.name, reply.text());
                assert!(reply.closed, "{}: the connection stays open after a refusal", case.name);
                // The next request proves the registry's log has caught up with this one.
                assert_eq!(ping(proxy), 200, "{}: regscope stopped serving", case.name);
                let logged = registry.served_requests();
                assert!(
                    eventually(Duration::from_secs(5), || registry.served_requests().len() > before),
                    "the ping after {} never reached the registry",
                    case.name
                );
                let new: Vec<_> = registry.served_requests().into_iter().skip(before).collect();
                assert_eq!(
                    new.iter().map(|r| (r.method.as_str(), r.path.as_str())).collect::<Vec<_>>(),
                    vec![("GET", "/v2/")],
                    "{}: a refused request reached the registry (log before: {} lines)",
                    case.name,
                    logged.len()
                );
            }
            Expect::Forwarded { method, path } => {
                let status = reply.status.unwrap_or_else(|| panic!("{}: no answer: {:?}", case.name, reply.text()));
                let found = eventually(Duration::from_secs(5), || {
                    registry.served_requests().iter().skip(before).any(|r| r.method == *method && r.path == *path)
                });
                assert!(
                    found,
                    "{}: the registry never saw {method} {path:.80} unchanged; it saw {:?}",
                    case.name,
                    registry.served_requests().iter().skip(before).collect::<Vec<_>>()
                );
                let at_registry = registry
                    .served_requests()
                    .into_iter()
                    .skip(before)
                    .find(|r| r.method == *method && r.path == *path)
                    .unwrap();
                assert_eq!(status, at_registry.status, "{}: the client gets the registry's answer", case.name);
                assert!((200..500).contains(&status), "{}: the registry answered {status}", case.name);
                assert_eq!(ping(proxy), 200, "{}: regscope stopped serving", case.name);
            }
            Expect::NotSuccess => {
                assert!(!matches!(reply.status, Some(200..=299)), "{}: {:?}", case.name, reply.text());
                assert_eq!(ping(proxy), 200, "{}: regscope stopped serving", case.name);
            }
        }
    }
    eprintln!("{}", outcomes.join("\n"));

    // No smuggling: nothing hidden in a body or after a message reached the registry, and every
    // request the registry served is one regscope saw, forwarded and logged.
    std::thread::sleep(Duration::from_millis(300));
    let served = registry.served_requests();
    assert!(served.iter().all(|r| !r.path.contains("smuggled")), "a smuggled request reached the registry: {served:?}");
    let mut logged: BTreeMap<(String, String, u16), i64> = BTreeMap::new();
    for event in regscope.request_log() {
        let path = event.path.split('?').next().unwrap().to_string();
        *logged.entry((event.method, path, event.status)).or_default() += 1;
    }
    for request in &served {
        let key = (request.method.clone(), request.path.clone(), request.status);
        let left = logged.entry(key.clone()).or_default();
        *left -= 1;
        assert!(*left >= 0, "the registry served {key:?} more often than regscope logged it: smuggled or unlogged");
    }

    assert_labels_closed(&regscope.metrics_text());
}

/// Every value of the labels regscope derives from requests is one of its closed set, and no label
/// anywhere echoes what a client sent.
fn assert_labels_closed(metrics: &str) {
    let operations: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
    let apis: Vec<&str> = Api::ALL.iter().map(|a| a.as_str()).collect();
    let sides: Vec<&str> = Side::ALL.iter().map(|s| s.as_str()).collect();
    // Bodies flow up or down; whole image transfers are pushes or pulls.
    let mut directions: Vec<&str> = Direction::ALL.iter().map(|d| d.as_str()).collect();
    directions.extend(["push", "pull"]);
    let methods = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"];
    let kinds = ["connect_refused", "connect_timeout", "tls", "reset", "response_timeout", "other"];
    let closed: [(&str, Vec<&str>); 6] = [
        ("operation", operations),
        ("api", apis),
        ("method", methods.to_vec()),
        ("side", sides),
        ("direction", directions),
        ("kind", kinds.to_vec()),
    ];
    for (label, allowed) in &closed {
        let values = label_values(metrics, label);
        assert!(!values.is_empty(), "no {label} label in /metrics at all: the check would prove nothing");
        for (value, families) in &values {
            assert!(allowed.contains(&value.as_str()), "{label}={value:?} (in {families:?}) is not in {allowed:?}");
        }
    }
    for (value, families) in label_values(metrics, "code") {
        let ok = value == "0" || value.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)) && value.len() == 3;
        assert!(ok, "code={value:?} (in {families:?}) is not a status code");
    }
    let methods = label_values(metrics, "method");
    assert!(methods.contains_key("other"), "the BREW request is counted under method=\"other\": {methods:?}");
    for (name, labels) in support::hostile::samples(metrics) {
        for (label, value) in labels {
            let lower = value.to_ascii_lowercase();
            for marker in MARKERS {
                assert!(!lower.contains(marker), "{name}{{{label}={value:?}}} echoes client input ({marker:?})");
            }
        }
    }
}

/// A client cannot point the registry's upload `Location` anywhere but back at regscope: the
/// forwarding headers it sends (`Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Proto`) are replaced.
#[test]
fn spoofed_forwarding_headers_cannot_redirect_upload_locations() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let host = regscope.proxy_addr().to_string();
    let request = format!(
        "POST /v2/regscope-test/hostile/blobs/uploads/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\
         Forwarded: host=evil.example;proto=https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n\
         Connection: close\r\n\r\n"
    );
    let reply = raw_exchange(regscope.proxy_addr(), request.as_bytes(), Duration::from_secs(10));
    assert_eq!(reply.status, Some(202), "{}", reply.text());
    let location = reply
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no Location: {}", reply.text()));
    assert!(
        location.starts_with(&format!("http://{host}/v2/regscope-test/hostile/blobs/uploads/")),
        "the upload Location points away from regscope: {location}"
    );
}
