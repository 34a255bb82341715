//! The registry restarts under a running regscope (same port, same storage): while it is down,
//! `/readyz` says 503 and requests get registry-style 502s; once it is back, the very next
//! requests succeed, on the same client connection, without restarting regscope.

mod support;

use std::time::{Duration, Instant};

use support::client::{digest_of, start_upload, target_at, with_digest, Conn, Pattern};
use support::{eventually, http_get, metric_sum, Registry, Regscope};

const REPO: &str = "regscope-test/restart";

fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut pattern = Pattern::new(seed);
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        bytes.extend_from_slice(pattern.next_slice(len - bytes.len()));
    }
    bytes
}

/// A monolithic upload through `conn`; returns the final status and `Docker-Content-Digest`.
fn push_blob(conn: &mut Conn<std::net::TcpStream>, host: &str, data: &[u8]) -> (u16, Option<String>) {
    let location = start_upload(conn, host, REPO);
    let target = with_digest(&target_at(&location, &format!("http://{host}")), &digest_of(data));
    let response =
        conn.request("PUT", &target, &[("Host", host), ("Content-Type", "application/octet-stream")], data).unwrap();
    (response.status(), response.header("docker-content-digest").map(str::to_string))
}

#[test]
fn a_registry_restart_is_502_while_down_and_transparent_once_back() {
    let mut registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let admin = regscope.admin_addr();

    // Before: a blob pushed and read back through one keep-alive client connection.
    let mut conn = Conn::connect(proxy);
    let before = blob(0x4E57_0A47, 1 << 20);
    let before_digest = digest_of(&before);
    assert_eq!(push_blob(&mut conn, &host, &before), (201, Some(before_digest.clone())));
    let blob_path = format!("/v2/{REPO}/blobs/{before_digest}");
    let (head, len, got) = conn.get_hashed(&blob_path, &[("Host", &host)]).unwrap();
    assert_eq!((head.status, len, got.as_str()), (200, before.len() as u64, before_digest.as_str()));
    assert_eq!(http_get(admin, "/readyz").status, 200);

    // Down.
    registry.stop();
    let down = eventually(Duration::from_secs(10), || http_get(admin, "/readyz").status == 503);
    assert!(down, "/readyz after the registry stopped: {}", http_get(admin, "/readyz").text());
    let refused_before = metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[]);
    for (method, target, body) in [
        ("GET", "/v2/".to_string(), Vec::new()),
        ("GET", blob_path.clone(), Vec::new()),
        ("POST", format!("/v2/{REPO}/blobs/uploads/"), Vec::new()),
        ("PATCH", format!("/v2/{REPO}/blobs/uploads/0b4f0d3e-0000-4000-8000-000000000000"), vec![1u8; 64 << 10]),
    ] {
        // The same client connection throughout: a 502 does not cost the client its connection.
        // Except after a request whose body was never read (the registry could not be reached to
        // take it): then the server may close, as HTTP/1.1 allows, so that one gets its own.
        let mut own = None;
        let on = if body.is_empty() { &mut conn } else { own.insert(Conn::connect(proxy)) };
        let response = on
            .request(method, &target, &[("Host", &host), ("Content-Type", "application/octet-stream")], &body)
            .unwrap_or_else(|e| panic!("{method} {target} while the registry is down: {e}"));
        assert_eq!(response.status(), 502, "{method} {target} while down: {}", response.text());
        assert_eq!(response.json()["errors"][0]["code"], "UNAVAILABLE", "{}", response.text());
    }
    let errors = metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[]);
    assert_eq!(errors - refused_before, 4.0, "each 502 is counted as an upstream error");

    // Back, on the same port with the same storage; regscope is not touched.
    let restarted = Instant::now();
    registry.restart();
    let ready = eventually(Duration::from_secs(10), || http_get(admin, "/readyz").status == 200);
    assert!(ready, "/readyz after the registry came back: {}", http_get(admin, "/readyz").text());
    eprintln!("ready again {:?} after the restart began", restarted.elapsed());

    // The very first requests succeed: no stale pooled connection to the dead registry is used.
    let (head, len, got) = conn.get_hashed(&blob_path, &[("Host", &host)]).unwrap();
    assert_eq!(
        (head.status, len, got.as_str()),
        (200, before.len() as u64, before_digest.as_str()),
        "the blob stored before the restart, through the same client connection"
    );
    let after = blob(0x4E57_0A48, 2 << 20);
    assert_eq!(push_blob(&mut conn, &host, &after), (201, Some(digest_of(&after))), "a new upload after the restart");
    let mut fresh = Conn::connect(proxy);
    let (head, len, got) =
        fresh.get_hashed(&format!("/v2/{REPO}/blobs/{}", digest_of(&after)), &[("Host", &host)]).unwrap();
    assert_eq!((head.status, len, got), (200, after.len() as u64, digest_of(&after)));
    let errors_after = metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[]);
    assert_eq!(errors_after, errors, "no upstream error once the registry is back");

    // A quick restart between two requests: regscope's pooled connections to the old process are
    // dead, and the next request (an upload, which cannot be retried blindly) must not land on one.
    for round in 0..3 {
        assert_eq!(conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap().status(), 200);
        registry.restart();
        let data = blob(0x4E57_0A50 + round, 256 << 10);
        let pushed = push_blob(&mut conn, &host, &data);
        assert_eq!(pushed, (201, Some(digest_of(&data))), "round {round}: the first upload after a quick restart");
    }
    let errors_end = metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[]);
    assert_eq!(errors_end, errors, "no upstream error across quick restarts");
}
