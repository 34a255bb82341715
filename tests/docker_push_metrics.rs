//! After a real `docker push` through regscope, the upload metrics agree with what the registry
//! stored, and they say what a docker push is: a client that compresses on the fly, so the
//! upload waits on the client most of the time.

mod support;

use std::time::Duration;

use support::client::Conn;
use support::{docker, eventually, metric_sum, Registry, Regscope, TestImage};

const REPO: &str = "regscope-test/push-metrics";
const TAG: &str = "v1";

#[test]
fn docker_push_upload_bytes_match_the_stored_blobs_and_the_client_sets_the_pace() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let docker = docker();
    let reference = format!("{}/{REPO}:{TAG}", regscope.proxy_addr());
    // Random payloads: gzip cannot shrink them, so the compressed layers are about their size.
    let image = TestImage::build(&reference, &[12 << 20, 6 << 20, 512 << 10]);
    docker.load(&image);
    docker.push(&reference);

    // What the registry stored, asked of the registry itself, not through regscope.
    let mut conn = Conn::connect(registry.addr());
    let manifest = conn
        .request(
            "GET",
            &format!("/v2/{REPO}/manifests/{TAG}"),
            &[
                ("Host", &registry.addr().to_string()),
                ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
            ],
            b"",
        )
        .unwrap();
    assert_eq!(manifest.status(), 200, "{:?} {}", manifest.head, manifest.text());
    let manifest = manifest.json();
    let size = |d: &serde_json::Value| d["size"].as_u64().unwrap_or_else(|| panic!("descriptor without size: {d}"));
    let layers: Vec<u64> =
        manifest["layers"].as_array().expect("schema2 manifest with layers").iter().map(size).collect();
    let config = size(&manifest["config"]);
    assert_eq!(layers.len(), image.layers.len(), "{manifest}");

    // docker 20.10 uploads every blob, the config included, as POST, one PATCH carrying the whole
    // blob, then an empty PUT ?digest=. So the PATCH bodies are exactly the stored blobs.
    let mut expected: Vec<u64> = layers.iter().copied().chain([config]).collect();
    expected.sort_unstable();
    let patches = || {
        let mut sizes: Vec<u64> =
            regscope.request_log().iter().filter(|r| r.operation == "upload_chunk").map(|r| r.bytes_in).collect();
        sizes.sort_unstable();
        sizes
    };
    assert!(
        eventually(Duration::from_secs(5), || patches() == expected),
        "PATCH body sizes regscope logged {:?}, blob sizes the registry stored {expected:?}",
        patches()
    );

    let metrics = regscope.metrics_text();
    let chunk = [("operation", "upload_chunk"), ("direction", "upload")];
    let counted = metric_sum(&metrics, "regscope_body_bytes_total", &chunk) as u64;
    let stored: u64 = expected.iter().sum();
    assert_eq!(counted, stored, "upload_chunk bytes counted vs layers {layers:?} + config {config}");

    let client_stall =
        metric_sum(&metrics, "regscope_body_stall_seconds_total", &[chunk[0], chunk[1], ("side", "client")]);
    let registry_stall =
        metric_sum(&metrics, "regscope_body_stall_seconds_total", &[chunk[0], chunk[1], ("side", "registry")]);
    let transfer = metric_sum(&metrics, "regscope_body_transfer_seconds_sum", &chunk);
    eprintln!(
        "docker push: {stored} bytes in {} PATCHes; transfer {transfer:.3}s, client stall {client_stall:.3}s, registry stall {registry_stall:.3}s",
        expected.len()
    );
    assert!(transfer > 0.0, "no upload_chunk transfer time recorded");
    assert!(
        client_stall > 0.5 * transfer,
        "docker compresses while it sends, so the client should stall the uploads most of the time: \
         client stall {client_stall:.3}s vs transfer time {transfer:.3}s (registry stall {registry_stall:.3}s)"
    );

    docker.rmi(&reference);
}
