//! A 2 GiB blob goes up through regscope as one chunked `PATCH` and comes back down through it,
//! byte for byte, while regscope's memory stays flat: the proxy streams, it never buffers a body.

mod support;

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::client::{hex, start_upload, target_at, with_digest, Conn, Pattern};
use support::{eventually, Registry, Regscope};

const BLOB_SIZE: u64 = 2 << 30;
/// Peak resident memory allowed to regscope over the whole exchange. Buffering even a small
/// fraction of the blob would blow through it.
const PEAK_RSS_LIMIT_KIB: u64 = 64 << 10;
const REPO: &str = "regscope-test/large-blob";

#[test]
fn a_two_gib_blob_streams_up_and_down_through_regscope_in_bounded_memory() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let origin = format!("http://{proxy}");
    let started = Instant::now();

    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPO);
    let target = target_at(&location, &origin);

    // One PATCH, chunked, generated and hashed on the fly.
    conn.send_head(
        "PATCH",
        &target,
        &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
    )
    .unwrap();
    let mut pattern = Pattern::new(0x5EED_0002);
    let mut hash = Sha256::new();
    let mut sent = 0u64;
    while sent < BLOB_SIZE {
        let slice = pattern.next_slice((BLOB_SIZE - sent).min(1 << 20) as usize);
        hash.update(slice);
        conn.send_chunk(slice).unwrap_or_else(|e| panic!("PATCH body write failed after {sent} bytes: {e}"));
        sent += slice.len() as u64;
    }
    conn.finish_chunks().unwrap();
    let digest = format!("sha256:{}", hex(&hash.finalize()));
    let patched = conn.read_response().unwrap();
    let upload_time = started.elapsed();
    assert_eq!(patched.status(), 202, "PATCH of {BLOB_SIZE} bytes: {:?} {}", patched.head, patched.text());
    assert_eq!(patched.header("range"), Some(format!("0-{}", BLOB_SIZE - 1).as_str()), "{:?}", patched.head);
    let location = patched.header("location").expect("PATCH 202 without Location").to_string();

    let finished =
        conn.request("PUT", &with_digest(&target_at(&location, &origin), &digest), &[("Host", &host)], b"").unwrap();
    assert_eq!(finished.status(), 201, "PUT ?digest={digest}: {:?} {}", finished.head, finished.text());
    assert_eq!(finished.header("docker-content-digest"), Some(digest.as_str()));
    let finish_time = started.elapsed();

    let mut conn = Conn::connect(proxy);
    let (head, len, downloaded) = conn.get_hashed(&format!("/v2/{REPO}/blobs/{digest}"), &[("Host", &host)]).unwrap();
    let total_time = started.elapsed();
    assert_eq!(head.status, 200, "GET blob: {head:?}");
    assert_eq!(len, BLOB_SIZE, "downloaded length");
    assert_eq!(downloaded, digest, "the download hashes to the digest the registry accepted");

    // Every byte of the upload and the download crossed regscope: its own log says so.
    assert!(eventually(Duration::from_secs(5), || regscope.request_log().len() >= 4), "{:#?}", regscope.request_log());
    let log = regscope.request_log();
    let patch = log.iter().find(|r| r.method == "PATCH").expect("regscope logged the PATCH");
    assert_eq!(patch.bytes_in, BLOB_SIZE, "{patch:?}");
    let get = log.iter().find(|r| r.method == "GET" && r.path.contains("/blobs/sha256:")).expect("logged GET");
    assert_eq!(get.bytes_out, BLOB_SIZE, "{get:?}");

    let peak = regscope.peak_rss_kib();
    eprintln!(
        "large_blob: upload {:.1}s, finish {:.1}s, download {:.1}s; regscope peak RSS {peak} KiB, now {} KiB",
        upload_time.as_secs_f64(),
        (finish_time - upload_time).as_secs_f64(),
        (total_time - finish_time).as_secs_f64(),
        regscope.rss_kib()
    );
    assert!(peak < PEAK_RSS_LIMIT_KIB, "regscope peak RSS {peak} KiB >= {PEAK_RSS_LIMIT_KIB} KiB");
}
