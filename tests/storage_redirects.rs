//! A registry on object storage redirects blob downloads to presigned storage URLs. regscope
//! routes those redirects back through itself under short-lived handles, so the bytes are
//! forwarded and timed like the rest, as storage's time; a handle it did not make reaches no host.
//! The storage is moto's S3 server (PyPI), the registry distribution 2.8.2 with `storage.s3`.

mod support;

use std::time::Duration;

use regscope::{BlobOutcome, Operation, Outcome, Transfer, TransferDirection};
use support::client::Conn;
use support::replay::{
    assert_blobs_match, assert_shares_add_up, manifest_blobs, pretty, registry_manifest, report_table, report_text,
    wait_for_transfer,
};
use support::{
    ctr, docker, metric_sum, skopeo, ObjectStorage, Registry, RegistryOptions, Regscope, SlowStorage, TempDir,
    TestImage,
};

const BUCKET: &str = "regscope";

fn registry_on(storage: &ObjectStorage) -> Registry {
    Registry::start_with(RegistryOptions { s3: Some((storage.url(), BUCKET.into())), ..RegistryOptions::default() })
}

#[test]
fn docker_and_skopeo_pulls_fetch_every_blob_byte_through_regscope_from_storage() {
    let storage = ObjectStorage::start(BUCKET);
    let registry = registry_on(&storage);
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let admin = regscope.admin_addr();
    let repository = "regscope-test/on-storage";
    let reference = format!("{}/{repository}:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[3 << 20, 5 << 20]);
    let docker = docker();
    docker.load(&image);
    docker.push(&reference);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), repository, "v1"));
    wait_for_transfer(admin, TransferDirection::Push, repository, Duration::from_secs(10));

    docker.rmi(&reference);
    let before = storage.presigned_gets();
    let captured = || metric_sum(&regscope.metrics_text(), "regscope_redirects_total", &[("handling", "captured")]);
    let captured_before = captured();
    docker.pull(&reference);
    let pull = wait_for_transfer(admin, TransferDirection::Pull, repository, Duration::from_secs(10));
    eprintln!("{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    assert_blobs_match(&pull, &stored, BlobOutcome::Fetched);
    let storage_gets = pull.requests.iter().filter(|r| r.operation == Operation::StorageGet).count();
    assert_eq!(storage_gets, stored.len(), "every blob came from storage, through regscope");
    assert_eq!(storage.presigned_gets() - before, storage_gets, "nothing reached the storage past regscope");
    assert_shares_add_up(&pull);
    assert!(pull.parties.storage > 0.0, "storage's share: {:?}", pull.parties);
    let text = report_text(admin, 1);
    let table = report_table(&text, TransferDirection::Pull, repository);
    assert!(table.contains("% in storage"), "the verdict names storage:\n{table}");
    assert_eq!(captured() - captured_before, stored.len() as f64, "one redirect captured per blob");
    docker.rmi(&reference);

    // skopeo: the same bytes, the same way.
    let out = TempDir::new("skopeo-dir");
    let before = storage.presigned_gets();
    let src = format!("docker://{reference}");
    skopeo(&["copy", "--src-tls-verify=false", &src, &format!("dir:{}", out.path().display())]);
    let copy = assert_pulled_through_storage(admin, pull.id, &stored, &storage, before);

    // containerd: `ctr content fetch` follows the redirects too.
    let before = storage.presigned_gets();
    ctr(&format!("regscope-storage-{}", std::process::id()), &["content", "fetch", "--plain-http", &reference]);
    assert_pulled_through_storage(admin, copy.id, &stored, &storage, before);
}

/// The first pull after `after`: complete, every blob of `stored` fetched whole, each through a
/// storage GET of regscope's, and the storage saw no download besides (`before`: its count then).
fn assert_pulled_through_storage(
    admin: std::net::SocketAddr,
    after: u64,
    stored: &[(String, u64)],
    storage: &ObjectStorage,
    before: usize,
) -> Transfer {
    let pulls = support::replay::transfers(admin);
    let pull = pulls
        .into_iter()
        .filter(|t| t.direction == TransferDirection::Pull && t.id > after)
        .last()
        .unwrap_or_else(|| panic!("no pull after #{after}"));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    assert_blobs_match(&pull, stored, BlobOutcome::Fetched);
    let gets = pull.requests.iter().filter(|r| r.operation == Operation::StorageGet).count();
    assert_eq!((gets, storage.presigned_gets() - before), (stored.len(), gets));
    pull
}

#[test]
fn handles_that_regscope_did_not_make_reach_no_host_and_pass_mode_changes_nothing() {
    let storage = ObjectStorage::start(BUCKET);
    let registry = registry_on(&storage);
    let repository = "regscope-test/handles";
    let image = TestImage::build(&format!("{repository}:v1"), &[1 << 20]);
    let dest = format!("docker://{}/{repository}:v1", registry.addr());
    skopeo(&["copy", "--dest-tls-verify=false", &image.skopeo_source(), &dest]);
    let (layer, size) = manifest_blobs(&registry_manifest(registry.addr(), repository, "v1"))[1].clone();

    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let host = regscope.proxy_addr().to_string();
    let get =
        |target: &str| Conn::connect(regscope.proxy_addr()).request("GET", target, &[("Host", &host)], b"").unwrap();
    let redirect = get(&format!("/v2/{repository}/blobs/{layer}"));
    assert_eq!(redirect.status(), 307);
    let location = redirect.header("location").unwrap().to_string();
    let target = location.strip_prefix(&format!("http://{host}")).expect("Location points back at regscope");
    assert!(target.starts_with("/_regscope/storage/"), "{location}");

    let before = storage.presigned_gets();
    let mut forged = target.to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    for bad in [forged.as_str(), "/_regscope/storage/00000000000000000000000000000000", "/_regscope/storage/nope"] {
        let refused = get(bad);
        assert_eq!(refused.status(), 404, "{bad}: {}", refused.text());
        assert!(refused.text().contains("BLOB_UNKNOWN"), "a registry-style error: {}", refused.text());
    }
    let served = registry.served_requests();
    assert!(served.iter().all(|r| !r.path.starts_with("/_regscope")), "nothing of it reached the registry");
    assert_eq!(storage.presigned_gets(), before, "nor the storage");

    let fetched = get(target);
    assert_eq!((fetched.status(), fetched.body.len() as u64), (200, size), "the real handle leads to the blob");
    drop(regscope);

    let passing = Regscope::start(&["--upstream", &registry.url(), "--redirects", "pass"]);
    let host = passing.proxy_addr().to_string();
    let redirect = Conn::connect(passing.proxy_addr())
        .request("GET", &format!("/v2/{repository}/blobs/{layer}"), &[("Host", &host)], b"")
        .unwrap();
    assert_eq!(redirect.status(), 307);
    let location = redirect.header("location").unwrap();
    assert!(location.starts_with(&storage.url()), "passed untouched: {location}");
    let metrics = passing.metrics_text();
    assert_eq!(metric_sum(&metrics, "regscope_redirects_total", &[("handling", "passed")]), 1.0);
    assert_eq!(metric_sum(&metrics, "regscope_redirects_total", &[("handling", "captured")]), 0.0);
}

#[test]
fn slow_storage_is_storage_time_and_storage_that_is_down_is_a_502() {
    const DELAY: Duration = Duration::from_secs(1);
    let storage = ObjectStorage::start(BUCKET);
    let slow = SlowStorage::start(storage.addr(), DELAY);
    let registry =
        Registry::start_with(RegistryOptions { s3: Some((slow.url(), BUCKET.into())), ..RegistryOptions::default() });
    let repository = "regscope-test/slow-storage";
    let image = TestImage::build(&format!("{repository}:v1"), &[1 << 20]);
    let dest = format!("docker://{}/{repository}:v1", registry.addr());
    skopeo(&["copy", "--dest-tls-verify=false", &image.skopeo_source(), &dest]);
    let (layer, size) = manifest_blobs(&registry_manifest(registry.addr(), repository, "v1"))[1].clone();

    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "1s"]);
    let host = regscope.proxy_addr().to_string();
    let get =
        |target: &str| Conn::connect(regscope.proxy_addr()).request("GET", target, &[("Host", &host)], b"").unwrap();
    let redirect = get(&format!("/v2/{repository}/blobs/{layer}"));
    assert_eq!(redirect.status(), 307, "{}", redirect.text());
    let handle = redirect.header("location").unwrap().strip_prefix(&format!("http://{host}")).unwrap().to_string();
    let fetched = get(&handle);
    assert_eq!((fetched.status(), fetched.body.len() as u64), (200, size));

    let pull = wait_for_transfer(regscope.admin_addr(), TransferDirection::Pull, repository, Duration::from_secs(10));
    let request = pull.requests.iter().find(|r| r.operation == Operation::StorageGet).expect("the storage GET");
    let split = request.split();
    eprintln!("storage GET split: {split:?}");
    let want = DELAY.as_secs_f64();
    assert!((split.storage - want).abs() <= 0.05 * want, "storage {:.3} s, delayed {want:.3} s", split.storage);
    assert!(split.registry < 0.05 * want, "none of it is the registry's: {split:?}");

    // The storage goes away: the handle's request is a registry-style 502, counted by kind.
    let redirect = get(&format!("/v2/{repository}/blobs/{layer}"));
    let handle = redirect.header("location").unwrap().strip_prefix(&format!("http://{host}")).unwrap().to_string();
    drop(slow);
    drop(storage);
    let failed = get(&handle);
    assert_eq!(failed.status(), 502, "{}", failed.text());
    assert!(failed.text().contains("UNAVAILABLE"), "{}", failed.text());
    let errors = metric_sum(&regscope.metrics_text(), "regscope_upstream_errors_total", &[]);
    assert!(errors >= 1.0, "counted by kind");
}
