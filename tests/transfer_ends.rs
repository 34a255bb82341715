//! How pushes and pulls end when they do not finish: a pull whose client dies mid-layer is
//! `failed` and names the blob it was fetching; a push still going when regscope is stopped is
//! closed as `incomplete` and logged, not dropped.

mod support;

use std::io::Read;
use std::time::Duration;

use regscope::{BlobOutcome, Outcome, TransferDirection};
use support::client::{start_upload, target_at, Conn};
use support::replay::{manifest_blobs, pretty, registry_manifest, wait_for_transfer, SCHEMA2};
use support::{skopeo, Registry, Regscope, TestImage};

#[test]
fn a_pull_whose_client_dies_mid_layer_failed_and_names_the_blob() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let repository = "regscope-test/pull-cut";
    let image = TestImage::build(&format!("{repository}:v1"), &[8 << 20]);
    let dest = format!("docker://{}/{repository}:v1", registry.addr());
    skopeo(&["copy", "--dest-tls-verify=false", &image.skopeo_source(), &dest]);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), repository, "v1"));
    let (layer, size) = stored[1].clone();

    let host = regscope.proxy_addr().to_string();
    let mut conn = Conn::connect(regscope.proxy_addr());
    let manifest = conn
        .request("GET", &format!("/v2/{repository}/manifests/v1"), &[("Host", &host), ("Accept", SCHEMA2)], b"")
        .unwrap();
    assert_eq!(manifest.status(), 200);
    conn.send_head("GET", &format!("/v2/{repository}/blobs/{layer}"), &[("Host", &host)]).unwrap();
    let head = conn.read_head().unwrap();
    assert_eq!(head.status, 200);
    let mut some = vec![0; 64 << 10];
    conn.stream().read_exact(&mut some).unwrap();
    drop(conn);

    let pull = wait_for_transfer(regscope.admin_addr(), TransferDirection::Pull, repository, Duration::from_secs(5));
    eprintln!("{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Failed, "{}", pretty(&pull));
    let cut = pull.blobs.iter().find(|b| b.digest.as_deref() == Some(layer.as_str())).expect("the layer is listed");
    assert_eq!(cut.outcome, BlobOutcome::Failed);
    assert!(cut.bytes < size, "{} of {size} bytes", cut.bytes);
    assert!(pull.blobs.iter().all(|b| b.outcome != BlobOutcome::Present), "nothing is said to be on the client");
}

#[test]
fn a_push_going_on_when_regscope_stops_is_logged_as_incomplete() {
    let registry = Registry::start();
    let mut regscope = Regscope::start(&["--upstream", &registry.url(), "--shutdown-grace", "1s"]);
    let repository = "regscope-test/push-stopped";
    let host = regscope.proxy_addr().to_string();
    let mut conn = Conn::connect(regscope.proxy_addr());
    let location = start_upload(&mut conn, &host, repository);
    let target = target_at(&location, &format!("http://{host}"));
    conn.send_head("PATCH", &target, &[("Host", &host), ("Transfer-Encoding", "chunked")]).unwrap();
    conn.send_chunk(&[7; 64 << 10]).unwrap();

    regscope.sigterm();
    regscope.wait_exit(Duration::from_secs(10));
    let events = regscope.events("transfer");
    let push = events
        .iter()
        .find(|e| e["fields"]["direction"] == "push" && e["fields"]["repository"] == repository)
        .unwrap_or_else(|| panic!("no transfer event for the push; log:\n{}", regscope.log_lines().join("\n")));
    assert_eq!(push["fields"]["outcome"], "incomplete", "{push}");
    drop(conn);
}
