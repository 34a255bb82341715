//! SIGTERM drains: regscope stops accepting at once, but an upload already on the wire runs to its
//! end and is answered, and then the process exits 0.

mod support;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::client::{start_upload, target_at, with_digest, Conn, Pattern};
use support::{eventually, http_get, Registry, Regscope};

const BLOB_SIZE: u64 = 300 << 20;
const SLICE: usize = 1 << 20;
/// Pause between slices: 300 of them make the upload last several seconds.
const PACE: Duration = Duration::from_millis(10);
/// SIGTERM goes out once this much of the body has been sent.
const SIGTERM_AFTER: u64 = 100 << 20;
const REPO: &str = "regscope-test/shutdown";
const SEED: u64 = 0x5EED_0300;

#[test]
fn sigterm_lets_an_upload_in_flight_finish_then_exits_zero() {
    let registry = Registry::start();
    let mut regscope = Regscope::start(&["--upstream", &registry.url(), "--shutdown-grace", "60s"]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let digest = Pattern::digest(SEED, BLOB_SIZE);

    // The whole blob in the one request that finishes the upload (a monolithic PUT), so that the
    // request in flight at SIGTERM is all there is to it: no later request needs the listener.
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPO);
    let target = with_digest(&target_at(&location, &format!("http://{host}")), &digest);
    conn.send_head(
        "PUT",
        &target,
        &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
    )
    .unwrap();

    let mut pattern = Pattern::new(SEED);
    let mut sent = 0u64;
    let mut sigterm_at = None;
    let mut refused_at = None;
    while sent < BLOB_SIZE {
        let slice = pattern.next_slice((BLOB_SIZE - sent).min(SLICE as u64) as usize);
        conn.send_chunk(slice)
            .unwrap_or_else(|e| panic!("upload body write failed after {sent} bytes (SIGTERM at {sigterm_at:?}): {e}"));
        sent += slice.len() as u64;
        if sent >= SIGTERM_AFTER && sigterm_at.is_none() {
            regscope.sigterm();
            sigterm_at = Some((sent, Instant::now()));
        }
        // Once SIGTERM is in, the listener must close: poll between slices, while the upload goes on.
        if let (Some((_, at)), None) = (sigterm_at, refused_at) {
            if connection_refused(proxy) {
                refused_at = Some(at.elapsed());
            }
        }
        thread::sleep(PACE);
    }
    conn.finish_chunks().unwrap();
    let (sigterm_sent, sigterm_time) = sigterm_at.unwrap();

    // Draining: readiness says so while the upload is still being answered.
    let ready = http_get(regscope.admin_addr(), "/readyz");
    let finished = conn.read_response().unwrap_or_else(|e| {
        panic!("no response to the upload after SIGTERM: {e}\nregscope:\n{}", regscope.log_lines().join("\n"))
    });
    assert_eq!(finished.status(), 201, "PUT ?digest=: {:?} {}", finished.head, finished.text());
    assert_eq!(finished.header("docker-content-digest"), Some(digest.as_str()));
    assert!(
        sigterm_sent < BLOB_SIZE / 2 && sigterm_time.elapsed() > Duration::from_secs(1),
        "SIGTERM must come well before the end of the upload: after {sigterm_sent} bytes, {:?} before its end",
        sigterm_time.elapsed()
    );
    assert_eq!(ready.status, 503, "/readyz while draining: {}", ready.text());

    let refused_at = refused_at.unwrap_or_else(|| {
        panic!(
            "the proxy port still accepted connections {:?} after SIGTERM\nregscope:\n{}",
            sigterm_time.elapsed(),
            regscope.log_lines().join("\n")
        )
    });
    assert!(refused_at < Duration::from_secs(2), "new connections were refused only {refused_at:?} after SIGTERM");

    eprintln!(
        "shutdown: SIGTERM after {sigterm_sent} of {BLOB_SIZE} bytes, upload answered {:?} later, \
         new connections refused {refused_at:?} after SIGTERM",
        sigterm_time.elapsed()
    );
    let status = regscope.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "exit status; regscope:\n{}", regscope.log_lines().join("\n"));
    assert!(
        !regscope.events("drained").is_empty(),
        "regscope did not report a full drain:\n{}",
        regscope.log_lines().join("\n")
    );
    assert!(connection_refused(proxy), "the proxy port is closed after exit");

    // The registry has the whole blob: read it back from the registry itself.
    let mut direct = Conn::connect(registry.addr());
    let (head, len, stored) =
        direct.get_hashed(&format!("/v2/{REPO}/blobs/{digest}"), &[("Host", &registry.addr().to_string())]).unwrap();
    assert_eq!((head.status, len), (200, BLOB_SIZE), "{head:?}");
    assert_eq!(stored, digest);
}

/// Whether a new TCP connection to `addr` is refused (rather than accepted or timed out).
fn connection_refused(addr: std::net::SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
    }
}

#[test]
fn sigterm_with_nothing_in_flight_exits_zero_at_once() {
    let registry = Registry::start();
    let mut regscope = Regscope::start(&["--upstream", &registry.url(), "--shutdown-grace", "60s"]);
    let host = regscope.proxy_addr().to_string();
    // An idle keep-alive connection must not hold the drain open.
    let mut idle = Conn::connect(regscope.proxy_addr());
    assert_eq!(idle.request("GET", "/v2/", &[("Host", &host)], b"").unwrap().status(), 200);

    let started = Instant::now();
    regscope.sigterm();
    let status = regscope.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "regscope:\n{}", regscope.log_lines().join("\n"));
    assert!(started.elapsed() < Duration::from_secs(5), "exit took {:?} with nothing in flight", started.elapsed());
    assert!(eventually(Duration::from_secs(1), || connection_refused(regscope.proxy_addr())));
}
