//! The other client families: skopeo (containers/image: POST, one PATCH, PUT) and a
//! containerd-style uploader (HEAD, POST, then one `PUT ?digest=` carrying the whole blob, no
//! PATCH). Their pushes and pulls must be reported blob by blob with the sizes the registry stored.

mod support;

use std::time::Duration;

use regscope::{BlobOutcome, Outcome, TransferDirection};
use support::client::{digest_of, target_at, with_digest, Conn, Pattern};
use support::replay::{
    assert_blobs_match, assert_shares_add_up, assert_table_lists, manifest_blobs, pretty, registry_manifest,
    report_table, report_text, sleep_until, wait_for_transfer, SCHEMA2,
};
use support::{skopeo, Registry, Regscope, TempDir, TestImage};

#[test]
fn skopeo_copy_in_and_out_is_reported_blob_by_blob() {
    const REPOSITORY: &str = "regscope-test/report-skopeo";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let admin = regscope.admin_addr();
    let image = TestImage::build(&format!("{REPOSITORY}:v1"), &[3 << 20, 12 << 20]);
    let through_proxy = format!("docker://{}/{REPOSITORY}:v1", regscope.proxy_addr());

    // --- push: docker-archive → regscope → registry ---
    skopeo(&["copy", "--quiet", "--dest-tls-verify=false", &image.skopeo_source(), &through_proxy]);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "v1"));
    assert_eq!(stored.len(), 3, "config + two layers in the registry's manifest: {stored:?}");
    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(10));
    eprintln!("skopeo push:\n{}", pretty(&push));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));
    assert_eq!(push.tag.as_deref(), Some("v1"));
    assert_blobs_match(&push, &stored, BlobOutcome::Committed);
    assert_shares_add_up(&push);
    for blob in &push.blobs {
        let phases = blob.phases.expect("a pushed blob has phases");
        assert!(phases.transfer > 0.0, "no transfer phase for {:?}: {}", blob.digest, pretty(&push));
    }

    // --- pull: regscope → dir: ---
    let work = TempDir::new("skopeo-report");
    let out = work.path().join("out");
    skopeo(&["copy", "--quiet", "--src-tls-verify=false", &through_proxy, &format!("dir:{}", out.display())]);
    let pull = wait_for_transfer(admin, TransferDirection::Pull, REPOSITORY, Duration::from_secs(10));
    eprintln!("skopeo pull:\n{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    assert_blobs_match(&pull, &stored, BlobOutcome::Fetched);
    assert_shares_add_up(&pull);

    let text = report_text(admin, 2);
    eprintln!("regscope report:\n{text}");
    let push_table = report_table(&text, TransferDirection::Push, REPOSITORY);
    assert!(push_table.lines().next().unwrap().contains("complete"), "{push_table}");
    assert_table_lists(push_table, &stored, "transfer");
    let pull_table = report_table(&text, TransferDirection::Pull, REPOSITORY);
    assert!(pull_table.lines().next().unwrap().contains("complete"), "{pull_table}");
    assert_table_lists(pull_table, &stored, "get");
}

/// How long the containerd-style client takes to send its layer: a known client-paced body.
const LAYER_SEND: Duration = Duration::from_millis(400);
const LAYER_BYTES: usize = 8 << 20;

#[test]
fn a_containerd_style_push_with_one_put_per_blob_is_reported_blob_by_blob() {
    const REPOSITORY: &str = "regscope-test/report-containerd";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let origin = format!("http://{proxy}");

    let mut pattern = Pattern::new(0x5eed_c0de);
    let mut layer = Vec::with_capacity(LAYER_BYTES);
    while layer.len() < LAYER_BYTES {
        let n = LAYER_BYTES - layer.len();
        layer.extend_from_slice(pattern.next_slice(n));
    }
    let layer_digest = digest_of(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap();
    let config_digest = digest_of(&config);

    let mut conn = Conn::connect(proxy);
    // Config first, then the layer, as containerd's pusher does: HEAD (404), POST, one PUT.
    for (blob, paced) in [(&config, false), (&layer, true)] {
        let digest = digest_of(blob);
        let head = conn.request("HEAD", &format!("/v2/{REPOSITORY}/blobs/{digest}"), &[("Host", &host)], b"").unwrap();
        assert_eq!(head.status(), 404, "HEAD of a blob not pushed yet");
        let started =
            conn.request("POST", &format!("/v2/{REPOSITORY}/blobs/uploads/"), &[("Host", &host)], b"").unwrap();
        assert_eq!(started.status(), 202, "POST: {}", started.text());
        let location = started.header("location").expect("202 with a Location").to_string();
        let target = with_digest(&target_at(&location, &origin), &digest);
        let length = blob.len().to_string();
        conn.send_head(
            "PUT",
            &target,
            &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Content-Length", &length)],
        )
        .unwrap();
        if paced {
            // 32 pieces spread over LAYER_SEND: the last byte leaves at LAYER_SEND.
            let start = std::time::Instant::now();
            let pieces: Vec<&[u8]> = blob.chunks(blob.len().div_ceil(32)).collect();
            let n = pieces.len() as u32;
            for (k, piece) in pieces.iter().enumerate() {
                sleep_until(start + LAYER_SEND * (k as u32 + 1) / n);
                conn.send_raw(piece).unwrap();
            }
        } else {
            conn.send_raw(blob).unwrap();
        }
        let finished = conn.read_response().unwrap();
        assert_eq!(finished.status(), 201, "PUT ?digest= with the whole blob: {}", finished.text());
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": config_digest },
        "layers": [{ "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": layer_digest }],
    }))
    .unwrap();
    let put = conn
        .request(
            "PUT",
            &format!("/v2/{REPOSITORY}/manifests/latest"),
            &[("Host", &host), ("Content-Type", SCHEMA2)],
            &manifest,
        )
        .unwrap();
    assert_eq!(put.status(), 201, "manifest PUT: {}", put.text());

    let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "latest"));
    assert_eq!(stored, [(config_digest.clone(), config.len() as u64), (layer_digest.clone(), layer.len() as u64)]);
    let push = wait_for_transfer(regscope.admin_addr(), TransferDirection::Push, REPOSITORY, Duration::from_secs(10));
    eprintln!("containerd-style push:\n{}", pretty(&push));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));
    assert_eq!(push.tag.as_deref(), Some("latest"));
    assert_blobs_match(&push, &stored, BlobOutcome::Committed);
    assert_shares_add_up(&push);
    for blob in &push.blobs {
        let phases = blob.phases.expect("a pushed blob has phases");
        assert!(phases.transfer > 0.0, "the PUT carried the blob, so it has a transfer phase: {}", pretty(&push));
        assert_eq!(phases.bytes, blob.bytes, "{}", pretty(&push));
    }
    // The layer's transfer phase is the paced body: at least LAYER_SEND, and mostly the client's.
    let layer_blob = push.blobs.iter().find(|b| b.digest.as_deref() == Some(layer_digest.as_str())).unwrap();
    let phases = layer_blob.phases.unwrap();
    let sent = LAYER_SEND.as_secs_f64();
    assert!(
        phases.transfer >= sent * 0.95 && phases.transfer <= sent * 1.25,
        "layer transfer phase {:.3} s for a body sent over {sent:.3} s",
        phases.transfer
    );
    assert!(
        phases.transfer_split.client >= 0.8 * sent,
        "the client paced the body, so its transfer phase is mostly client wait: {:?}",
        phases.transfer_split
    );

    let text = report_text(regscope.admin_addr(), 1);
    eprintln!("regscope report:\n{text}");
    let table = report_table(&text, TransferDirection::Push, REPOSITORY);
    assert!(table.lines().next().unwrap().contains("complete"), "{table}");
    assert_table_lists(table, &stored, "transfer");
}
