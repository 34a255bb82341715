//! A real Docker daemon pushes an image through regscope and pulls it back: the proxy must be
//! transparent to the client that matters most.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{docker, eventually, LoggedRequest, Registry, Regscope, TestImage};

#[test]
fn docker_push_then_pull_through_regscope_gives_back_the_same_image() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let docker = docker();
    let reference = format!("{}/regscope-test/push-pull:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[4 << 20, 32 << 20, 256 << 10]);
    let payload: u64 = image.layers.iter().map(|l| l.data_len).sum();

    docker.load(&image);
    assert_eq!(docker.image_id(&reference), image.image_id, "docker load kept the config digest");
    docker.push(&reference);
    docker.rmi(&reference);
    assert!(
        !docker.try_run(&["image", "inspect", &reference]).status.success(),
        "the image is gone locally, so the pull must fetch it"
    );
    docker.pull(&reference);
    assert_eq!(docker.image_id(&reference), image.image_id, "pulled image differs from the pushed one");

    // The pull fetched the config and every layer from the registry, and through regscope.
    let gets =
        |served: &[LoggedRequest]| blob_gets(served.iter().map(|r| (r.method.clone(), r.path.clone(), r.status)));
    let at_registry = gets(&registry.served_requests_once(|served| gets(served).len() > image.layers.len()));
    assert_eq!(at_registry.len(), image.layers.len() + 1, "blob GETs the registry served: {at_registry:?}");
    let proxied = || blob_gets(regscope.request_log().into_iter().map(|r| (r.method, r.path, r.status)));
    assert!(
        eventually(Duration::from_secs(5), || proxied() == at_registry),
        "regscope logged blob GETs {:?}, the registry served {at_registry:?}",
        proxied()
    );

    // Random layers do not compress, so the bytes each way are at least the payload.
    let log = regscope.request_log();
    let pushed: u64 = log.iter().filter(|r| r.method == "PATCH" || r.method == "PUT").map(|r| r.bytes_in).sum();
    let pulled: u64 = log.iter().filter(|r| r.method == "GET").map(|r| r.bytes_out).sum();
    assert!(pushed >= payload, "regscope counted {pushed} request bytes for a {payload}-byte push");
    assert!(pulled >= payload, "regscope counted {pulled} response bytes for a {payload}-byte pull");

    docker.rmi(&reference);
}

/// The distinct blob paths among successful GETs of `(method, path, status)` requests.
fn blob_gets(requests: impl Iterator<Item = (String, String, u16)>) -> BTreeSet<String> {
    requests
        .filter(|(method, path, status)| method == "GET" && path.contains("/blobs/sha256:") && *status == 200)
        .map(|(_, path, _)| path)
        .collect()
}
