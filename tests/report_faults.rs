//! Transfers that go wrong: an upload left hanging, a client that vanishes mid-body, and a
//! pull of a tag that does not exist. Each must end as a transfer with the right outcome, and
//! regscope must keep serving.

mod support;

use std::net::Shutdown;
use std::time::{Duration, Instant};

use regscope::{BlobOutcome, Outcome, TransferDirection};
use support::client::{digest_of, start_upload, target_at, with_digest, Conn, Pattern};
use support::replay::{assert_shares_add_up, pretty, report_table, report_text, wait_for_transfer};
use support::{docker, http_get, Registry, Regscope};

/// What every test here runs regscope with: idle transfers close after 2 s.
const IDLE_TIMEOUT: &str = "2s";

fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut pattern = Pattern::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = len - out.len();
        out.extend_from_slice(pattern.next_slice(n));
    }
    out
}

#[test]
fn an_upload_left_hanging_is_abandoned_when_the_transfer_goes_idle() {
    const REPOSITORY: &str = "regscope-test/abandoned";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", IDLE_TIMEOUT]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();

    // POST, one PATCH with a part of the blob, then nothing: the connection stays open and idle.
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPOSITORY);
    let part = pattern_bytes(41, 1 << 20);
    let target = target_at(&location, &format!("http://{proxy}"));
    let patched = conn
        .request("PATCH", &target, &[("Host", &host), ("Content-Type", "application/octet-stream")], &part)
        .unwrap();
    assert_eq!(patched.status(), 202, "PATCH: {}", patched.text());
    let last_request = Instant::now();

    let push = wait_for_transfer(regscope.admin_addr(), TransferDirection::Push, REPOSITORY, Duration::from_secs(15));
    let closed_after = last_request.elapsed();
    eprintln!("closed {closed_after:?} after the PATCH:\n{}", pretty(&push));
    assert!(
        closed_after >= Duration::from_millis(1900),
        "the transfer closed {closed_after:?} after its last request, before the 2 s idle timeout"
    );
    assert_eq!(push.outcome, Outcome::Incomplete, "{}", pretty(&push));
    assert_eq!(push.blobs.len(), 1, "{}", pretty(&push));
    let blob = &push.blobs[0];
    assert_eq!(blob.outcome, BlobOutcome::Abandoned, "{}", pretty(&push));
    assert_eq!(blob.bytes, part.len() as u64, "{}", pretty(&push));
    assert_shares_add_up(&push);

    let text = report_text(regscope.admin_addr(), 1);
    eprintln!("{text}");
    let table = report_table(&text, TransferDirection::Push, REPOSITORY);
    assert!(table.lines().next().unwrap().contains("incomplete"), "{table}");
    drop(conn);
}

#[test]
fn a_client_that_vanishes_mid_patch_fails_the_push_and_commits_nothing() {
    const REPOSITORY: &str = "regscope-test/vanished";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", IDLE_TIMEOUT]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let blob = pattern_bytes(42, 4 << 20);
    let digest = digest_of(&blob);

    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPOSITORY);
    let target = target_at(&location, &format!("http://{proxy}"));
    conn.send_head(
        "PATCH",
        &target,
        &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
    )
    .unwrap();
    // Half the blob, in chunks, then the connection closes with the chunked body unfinished.
    for piece in blob[..blob.len() / 2].chunks(256 << 10) {
        conn.send_chunk(piece).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    conn.stream().shutdown(Shutdown::Both).unwrap();
    drop(conn);

    let push = wait_for_transfer(regscope.admin_addr(), TransferDirection::Push, REPOSITORY, Duration::from_secs(15));
    eprintln!("{}", pretty(&push));
    assert_eq!(push.outcome, Outcome::Failed, "{}", pretty(&push));
    assert_eq!(push.blobs.len(), 1, "{}", pretty(&push));
    assert_eq!(push.blobs[0].outcome, BlobOutcome::Failed, "{}", pretty(&push));
    let patch = push.requests.iter().find(|r| r.method == "PATCH").expect("the PATCH is in the transfer");
    assert_eq!(patch.aborted_by, Some(regscope::Side::Client), "{}", pretty(&push));
    assert!(patch.bytes_in() <= (blob.len() / 2) as u64, "{}", pretty(&push));
    assert_shares_add_up(&push);

    // The registry, asked directly: no such blob, and the upload cannot be finished as the whole blob.
    let registry_host = registry.addr().to_string();
    let mut direct = Conn::connect(registry.addr());
    let got =
        direct.request("GET", &format!("/v2/{REPOSITORY}/blobs/{digest}"), &[("Host", &registry_host)], b"").unwrap();
    assert_eq!(got.status(), 404, "the registry has a blob the client never finished sending: {}", got.text());
    let status = direct.request("GET", &target, &[("Host", &registry_host)], b"").unwrap();
    eprintln!("upload status at the registry: {} Range {:?}", status.status(), status.header("range"));
    let finish = direct.request("PUT", &with_digest(&target, &digest), &[("Host", &registry_host)], b"").unwrap();
    eprintln!("PUT ?digest=<whole blob> at the registry: {} {}", finish.status(), finish.text());
    assert!(finish.status() >= 400, "the registry finished a half-sent upload as the whole blob: {}", finish.status());
    let got =
        direct.request("GET", &format!("/v2/{REPOSITORY}/blobs/{digest}"), &[("Host", &registry_host)], b"").unwrap();
    assert_eq!(got.status(), 404, "after the failed finish: {}", got.text());
}

#[test]
fn a_pull_of_a_missing_tag_fails_and_regscope_keeps_serving() {
    const REPOSITORY: &str = "regscope-test/missing";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", IDLE_TIMEOUT]);
    let docker = docker();
    let reference = format!("{}/{REPOSITORY}:nope", regscope.proxy_addr());

    let out = docker.try_run(&["pull", &reference]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("docker pull: {} {stderr}", out.status);
    assert!(!out.status.success(), "docker pull of a missing tag succeeded");

    let pull = wait_for_transfer(regscope.admin_addr(), TransferDirection::Pull, REPOSITORY, Duration::from_secs(15));
    eprintln!("{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Failed, "{}", pretty(&pull));
    assert!(pull.blobs.is_empty(), "{}", pretty(&pull));
    assert!(
        pull.requests.iter().any(|r| r.status == Some(404)),
        "the registry's 404 is in the transfer: {}",
        pretty(&pull)
    );

    let text = report_text(regscope.admin_addr(), 1);
    eprintln!("{text}");
    assert!(
        report_table(&text, TransferDirection::Pull, REPOSITORY).lines().next().unwrap().contains("failed"),
        "{text}"
    );

    // Still alive and serving, both ports.
    let mut conn = Conn::connect(regscope.proxy_addr());
    let version = conn.request("GET", "/v2/", &[("Host", &regscope.proxy_addr().to_string())], b"").unwrap();
    assert_eq!(version.status(), 200, "GET /v2/ through regscope after the failed pull: {}", version.text());
    assert_eq!(http_get(regscope.admin_addr(), "/healthz").status, 200);
}
