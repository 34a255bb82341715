//! Failures and retries in the verdict: a push whose layer the registry cut off (the registry
//! killed mid-layer and restarted), a pull whose blob download was cut mid-body, and a client
//! killed mid-upload. Each failed attempt is its blob's, named with who ended it, and the time it
//! cost (the attempt and the client's wait before retrying) is lost to that party, not the
//! client's work.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use regscope::{AttemptOutcome, BlobOutcome, Culprit, LiveTransfer, Operation, Outcome, TransferDirection};
use support::relay::{Relay, Shape};
use support::replay::{
    assert_shares_add_up, manifest_blobs, pretty, registry_manifest, report_table, report_text, wait_for_transfer,
};
use support::{docker, eventually, http_get, metric_sum, Registry, Regscope, TestImage};

/// What regscope shows in progress.
fn live(admin: SocketAddr) -> Vec<LiveTransfer> {
    serde_json::from_slice(&http_get(admin, "/api/v1/live").body).expect("/api/v1/live is a list of transfers")
}

/// Bytes the in-flight requests of `op` have moved so far.
fn in_flight_bytes(admin: SocketAddr, op: Operation) -> u64 {
    live(admin).iter().flat_map(|t| &t.in_flight).filter(|r| r.operation == op).map(|r| r.bytes).max().unwrap_or(0)
}

#[test]
fn a_push_the_registry_cut_off_mid_layer_loses_the_retry_wait_to_the_registry() {
    const REPOSITORY: &str = "regscope-test/failures-push";
    let mut registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "60s"]);
    let admin = regscope.admin_addr();
    let reference = format!("{}/{REPOSITORY}:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[10 << 20, 200 << 20]);
    let docker = docker();
    docker.load(&image);

    let pushing = {
        let reference = reference.clone();
        thread::spawn(move || support::docker().push(&reference))
    };
    // Kill the registry once the big layer is well under way, bring it back 2.1 s later.
    let under_way = eventually(Duration::from_secs(120), || in_flight_bytes(admin, Operation::UploadChunk) >= 30 << 20);
    assert!(under_way, "the big layer's upload never got going: {:?}", live(admin));
    let killed = Instant::now();
    registry.stop();
    thread::sleep(Duration::from_millis(2100));
    registry.restart();
    // The client's retry: the first upload request on the wire after the failure.
    let retried = eventually(Duration::from_secs(60), || {
        live(admin)
            .iter()
            .flat_map(|t| &t.in_flight)
            .any(|r| matches!(r.operation, Operation::UploadStart | Operation::UploadChunk | Operation::BlobHead))
    });
    assert!(retried, "docker did not retry");
    let waited = killed.elapsed().as_secs_f64();
    let output = pushing.join().expect("docker push");
    eprintln!("docker push:\n{output}");

    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(30));
    eprintln!("{}", pretty(&push));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));
    let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "v1"));
    let (big, big_size) = stored.iter().max_by_key(|(_, size)| *size).unwrap().clone();
    let blob = push.blobs.iter().find(|b| b.digest.as_deref() == Some(big.as_str())).expect("the big layer");
    assert_eq!(blob.outcome, BlobOutcome::Committed);
    assert!(blob.attempts.len() >= 2, "the failed upload is the big layer's first attempt:\n{}", pretty(&push));
    let (first, retry) = (&blob.attempts[0], &blob.attempts[1]);
    assert_eq!((first.outcome, first.failed_by), (AttemptOutcome::Failed, Some(Culprit::Registry)), "{first:?}");
    assert!(first.bytes >= 30 << 20, "the failed attempt moved what it moved: {first:?}");
    assert_eq!(blob.attempts.last().unwrap().outcome, AttemptOutcome::Succeeded);
    assert!(push.wasted_bytes >= first.bytes && blob.bytes >= big_size + first.bytes, "{}", pretty(&push));

    // The client's wait, from the failure to its retry, as the test saw it (to the 20 ms it polls).
    let backoff = retry.start - first.end;
    assert!((backoff - waited).abs() <= 0.1 * waited, "retry wait {backoff:.3} s, the client waited {waited:.3} s");
    assert!(push.lost.registry >= backoff, "lost to the registry {:?} covers the wait {backoff:.3} s", push.lost);
    assert!(
        push.lost.registry <= retry.start - first.start + 1e-6,
        "no more than the failed attempt and the wait: {:?}",
        push.lost
    );
    assert_eq!((push.lost.client, push.lost.storage), (0.0, 0.0));
    assert_shares_add_up(&push);

    let text = report_text(admin, 1);
    eprintln!("{text}");
    let table = report_table(&text, TransferDirection::Push, REPOSITORY);
    assert!(table.contains("lost to a registry failure at"), "the verdict names the failure:\n{table}");
    assert!(table.contains("failed attempt layer"), "the failed attempt has its row:\n{table}");
    assert!(!idle_covers(table, backoff), "the wait is not the client's idle time:\n{table}");
    // The waterfall draws the failed requests as such and the wait as lost to the registry; the
    // page's layer row says the layer needed a retry.
    let svg = http_get(admin, &format!("/transfers/{}.svg", push.id)).text();
    assert!(svg.contains(r#"class="request failed""#) && svg.contains(r#"data-failed-by="registry""#), "{svg}");
    assert!(svg.contains(r#"class="retry-wait" data-culprit="registry""#), "no retry wait drawn:\n{svg}");
    let page = http_get(admin, &format!("/transfers/{}", push.id)).text();
    assert!(page.contains("after 1 failed attempt (registry)"), "{page}");
    let metrics = regscope.metrics_text();
    let failed = [("direction", "push"), ("failed_by", "registry")];
    assert!(metric_sum(&metrics, "regscope_failed_attempts_total", &failed) >= 1.0);
    let lost = metric_sum(&metrics, "regscope_lost_seconds_total", &[("direction", "push"), ("party", "registry")]);
    assert!((lost - push.lost.registry).abs() < 1e-6, "{lost} s in the metrics");
    docker.rmi(&reference);
}

/// Whether an `idle (client working)` row of `table` is as long as the retry wait.
fn idle_covers(table: &str, wait: f64) -> bool {
    table.lines().filter(|l| l.trim_start().starts_with("idle (client working)")).any(|l| {
        let seconds = l.split_whitespace().find_map(|w| w.strip_suffix('s')?.parse::<f64>().ok()).unwrap_or(0.0);
        seconds >= 0.5 * wait
    })
}

/// A relay between regscope and the registry that cuts the first response to a `GET` of the blob
/// `digest` after `keep` bytes: the registry's connection going away mid-body.
fn cutting_relay(target: SocketAddr, digest: String, keep: usize) -> Relay {
    let cut = AtomicBool::new(false);
    let first_get = move |sent: &[u8]| {
        let head = String::from_utf8_lossy(sent);
        let ours = head.starts_with("GET ") && head.contains(&format!("/blobs/{digest}"));
        (ours && !cut.swap(true, Ordering::SeqCst)).then_some(Shape::CutAfter(keep))
    };
    Relay::start(target, Arc::new(first_get))
}

#[test]
fn a_pull_whose_blob_download_was_cut_joins_the_retry_to_the_same_blob() {
    const REPOSITORY: &str = "regscope-test/failures-pull";
    let registry = Registry::start();
    // Pushed straight to the registry: only the pull goes through regscope and the relay.
    let direct = format!("{}/{REPOSITORY}:v1", registry.addr());
    let image = TestImage::build(&direct, &[2 << 20, 24 << 20]);
    let docker = docker();
    docker.load(&image);
    docker.push(&direct);
    docker.rmi(&direct);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "v1"));
    let (big, big_size) = stored.iter().max_by_key(|(_, size)| *size).unwrap().clone();
    let cut_at = 5 << 20;
    let relay = cutting_relay(registry.addr(), big.clone(), cut_at);
    let regscope = Regscope::start(&["--upstream", &relay.url(), "--transfer-idle-timeout", "60s"]);
    let admin = regscope.admin_addr();
    let reference = format!("{}/{REPOSITORY}:v1", regscope.proxy_addr());
    docker.pull(&reference);
    assert_eq!(docker.image_id(&reference), image.image_id);

    let pull = wait_for_transfer(admin, TransferDirection::Pull, REPOSITORY, Duration::from_secs(30));
    eprintln!("{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    let pulls = support::replay::transfers(admin);
    assert_eq!(pulls.len(), 1, "one pull, the retry in it");
    let blob = pull.blobs.iter().find(|b| b.digest.as_deref() == Some(big.as_str())).expect("the cut blob");
    assert_eq!(blob.outcome, BlobOutcome::Fetched);
    assert!(blob.attempts.len() >= 2, "{}", pretty(&pull));
    let first = &blob.attempts[0];
    assert_eq!((first.outcome, first.failed_by), (AttemptOutcome::Failed, Some(Culprit::Registry)), "{first:?}");
    assert!(first.bytes > 0 && first.bytes < cut_at as u64, "{first:?}");
    assert_eq!(pull.wasted_bytes, first.bytes);
    let delivered: u64 = blob.attempts.iter().filter(|a| a.outcome == AttemptOutcome::Succeeded).map(|a| a.bytes).sum();
    assert!(delivered >= big_size - first.bytes, "the retry (whole or a range) brought the rest: {}", pretty(&pull));
    assert!(pull.lost.registry > 0.0 && pull.lost.client == 0.0, "{:?}", pull.lost);
    assert_shares_add_up(&pull);
    docker.rmi(&reference);
}

#[test]
fn a_client_killed_mid_upload_is_a_failure_of_the_client_not_the_registry() {
    const REPOSITORY: &str = "regscope-test/failures-client";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let admin = regscope.admin_addr();
    let image = TestImage::build("x/failures:v1", &[120 << 20]);
    let destination = format!("docker://{}/{REPOSITORY}:v1", regscope.proxy_addr());
    let mut skopeo = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", &image.skopeo_source(), &destination])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn skopeo");
    let under_way = eventually(Duration::from_secs(60), || in_flight_bytes(admin, Operation::UploadChunk) >= 10 << 20);
    let _ = skopeo.kill();
    let _ = skopeo.wait();
    assert!(under_way, "skopeo's upload never got going");

    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(30));
    eprintln!("{}", pretty(&push));
    assert_ne!(push.outcome, Outcome::Complete);
    let attempts: Vec<_> = push.blobs.iter().flat_map(|b| &b.attempts).collect();
    let cut = attempts.iter().find(|a| a.bytes >= 10 << 20).expect("the upload skopeo was killed in");
    assert_eq!((cut.outcome, cut.failed_by), (AttemptOutcome::Failed, Some(Culprit::Client)), "{cut:?}");
    assert_eq!(push.lost.registry, 0.0, "nothing blamed on the registry: {:?}", push.lost);
    assert!(push.lost.client > 0.0, "{:?}", push.lost);
    assert!(push.parties.registry < push.lost.client, "{:?} {:?}", push.parties, push.lost);
    assert_shares_add_up(&push);
}
