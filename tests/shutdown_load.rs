//! Graceful shutdown under load: several paced uploads are on the wire when SIGTERM comes. Every
//! one of them runs to its end and is answered (201 for a finishing PUT, 202 for a PATCH) with the
//! right digest and range, new connections are refused at once, and regscope exits 0. The bytes are
//! checked at the registry itself afterwards.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::client::{digest_of, start_upload, target_at, with_digest, Conn, Pattern};
use support::hostile::connection_refused;
use support::{eventually, http_get, Registry, Regscope};

const REPO: &str = "regscope-test/shutdown-load";
const PUTS: usize = 4;
const PATCHES: usize = 2;
const SIZE: usize = 8 << 20;
const CHUNK: usize = 128 << 10;
/// Each upload spreads its 64 chunks over this long, so SIGTERM at a third leaves seconds to go.
const PACE: Duration = Duration::from_secs(6);

struct Done {
    kind: &'static str,
    status: u16,
    digest_header: Option<String>,
    range: Option<String>,
    location: Option<String>,
    digest: String,
    last_byte_sent: Instant,
}

fn upload(index: usize, proxy: std::net::SocketAddr, progress: Arc<AtomicU64>) -> Done {
    let host = proxy.to_string();
    let mut pattern = Pattern::new(0x5D0_0000 + index as u64);
    let mut data = Vec::with_capacity(SIZE);
    while data.len() < SIZE {
        data.extend_from_slice(pattern.next_slice(SIZE - data.len()));
    }
    let digest = digest_of(&data);
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPO);
    let target = target_at(&location, &format!("http://{host}"));
    let (kind, method, target) =
        if index < PUTS { ("PUT", "PUT", with_digest(&target, &digest)) } else { ("PATCH", "PATCH", target) };
    conn.send_head(
        method,
        &target,
        &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
    )
    .unwrap();
    let started = Instant::now();
    let pieces: Vec<&[u8]> = data.chunks(CHUNK).collect();
    for (k, piece) in pieces.iter().enumerate() {
        support::replay::sleep_until(started + PACE * (k as u32 + 1) / pieces.len() as u32);
        conn.send_chunk(piece)
            .unwrap_or_else(|e| panic!("upload {index} ({kind}): write failed after {k} chunks: {e}"));
        progress.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    conn.finish_chunks().unwrap();
    let last_byte_sent = Instant::now();
    let response = conn.read_response().unwrap_or_else(|e| panic!("upload {index} ({kind}): no answer: {e}"));
    Done {
        kind,
        status: response.status(),
        digest_header: response.header("docker-content-digest").map(str::to_string),
        range: response.header("range").map(str::to_string),
        location: response.header("location").map(str::to_string),
        digest,
        last_byte_sent,
    }
}

#[test]
fn sigterm_under_load_finishes_every_upload_in_flight_then_exits_zero() {
    let registry = Registry::start();
    let mut regscope = Regscope::start(&["--upstream", &registry.url(), "--shutdown-grace", "60s"]);
    let proxy = regscope.proxy_addr();

    let progress: Vec<Arc<AtomicU64>> = (0..PUTS + PATCHES).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let workers: Vec<_> = progress
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.clone();
            thread::spawn(move || upload(i, proxy, p))
        })
        .collect();

    // Bystanders that must not hold the drain open: a connection that never sent a byte, one
    // that sent only the first byte of what might be an HTTP/2 preface, an idle keep-alive one.
    let silent = std::net::TcpStream::connect(proxy).unwrap();
    let mut preface = std::net::TcpStream::connect(proxy).unwrap();
    std::io::Write::write_all(&mut preface, b"P").unwrap();
    let mut idle = Conn::connect(proxy);
    assert_eq!(idle.request("GET", "/v2/", &[("Host", &proxy.to_string())], b"").unwrap().status(), 200);

    // SIGTERM once every upload is a third of the way through.
    let all_under_way =
        eventually(Duration::from_secs(30), || progress.iter().all(|p| p.load(Ordering::SeqCst) >= (SIZE / 3) as u64));
    assert!(all_under_way, "the uploads never got under way");
    regscope.sigterm();
    let sigterm = Instant::now();
    let at_sigterm: Vec<u64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();

    // While they go on: no new connections, and readiness says draining.
    let refused = eventually(Duration::from_secs(2), || connection_refused(proxy));
    let refused_after = sigterm.elapsed();
    assert!(refused, "the proxy port still accepts connections 2 s after SIGTERM");
    assert_eq!(http_get(regscope.admin_addr(), "/readyz").status, 503, "/readyz while draining");
    let still_sending = progress.iter().filter(|p| p.load(Ordering::SeqCst) < SIZE as u64).count();
    assert_eq!(still_sending, PUTS + PATCHES, "every upload was still sending when the listener closed");

    let done: Vec<Done> = workers.into_iter().map(|w| w.join().expect("an upload thread panicked")).collect();
    for (i, d) in done.iter().enumerate() {
        let late = d.last_byte_sent.saturating_duration_since(sigterm);
        assert!(late >= Duration::from_secs(1), "upload {i} ended only {late:?} after SIGTERM: not under load");
        match d.kind {
            "PUT" => {
                assert_eq!(d.status, 201, "upload {i} (PUT ?digest=) after SIGTERM");
                assert_eq!(d.digest_header.as_deref(), Some(d.digest.as_str()), "upload {i} digest");
            }
            _ => {
                assert_eq!(d.status, 202, "upload {i} (PATCH) after SIGTERM");
                assert_eq!(d.range.as_deref(), Some(format!("0-{}", SIZE - 1).as_str()), "upload {i} Range");
            }
        }
    }
    let status = regscope.wait_exit(Duration::from_secs(30));
    let exited_after = sigterm.elapsed();
    assert_eq!(status.code(), Some(0), "exit status; regscope:\n{}", regscope.log_lines().join("\n"));
    let last_answer = done.iter().map(|d| d.last_byte_sent).max().unwrap();
    assert!(
        last_answer.elapsed() < Duration::from_secs(5),
        "regscope exited {:?} after the last upload was answered: something held the drain open",
        last_answer.elapsed()
    );
    drop((silent, preface, idle));
    assert!(!regscope.events("drained").is_empty(), "no full drain:\n{}", regscope.log_lines().join("\n"));

    // The registry holds every byte: the PUTs' blobs by digest, and the PATCHed sessions finish
    // (directly at the registry, regscope is gone) with the digest of everything sent.
    let registry_host = registry.addr().to_string();
    for (i, d) in done.iter().enumerate() {
        let mut direct = Conn::connect(registry.addr());
        if d.kind == "PATCH" {
            let location = d.location.as_deref().expect("a PATCH 202 carries the next Location");
            let target = with_digest(&target_at(location, &format!("http://{proxy}")), &d.digest);
            let finish = direct.request("PUT", &target, &[("Host", &registry_host)], b"").unwrap();
            assert_eq!(finish.status(), 201, "finishing PATCHed upload {i} at the registry: {}", finish.text());
        }
        let (head, len, stored) =
            direct.get_hashed(&format!("/v2/{REPO}/blobs/{}", d.digest), &[("Host", &registry_host)]).unwrap();
        assert_eq!((head.status, len, stored.as_str()), (200, SIZE as u64, d.digest.as_str()), "upload {i} stored");
    }
    eprintln!(
        "{} uploads of {} MiB in flight at SIGTERM (sent then: {:?} MiB); listener closed within {refused_after:?}; \
         all answered; exit 0 after {exited_after:?}",
        PUTS + PATCHES,
        SIZE >> 20,
        at_sigterm.iter().map(|b| b >> 20).collect::<Vec<_>>()
    );
}
