//! One push is one image: concurrent pushes and pulls of different tags of one repository, from
//! one client (the test run's dockerd, or skopeo processes on one address), are one complete
//! transfer each, with exactly their own blobs and bytes; a layer two concurrent pushes share is
//! listed in both and counted once; a multi-platform push is one transfer.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use regscope::{BlobOutcome, Outcome, Transfer, TransferDirection};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::replay::{assert_blobs_match, manifest_blobs, pretty, registry_manifest, transfers};
use support::{docker, skopeo, Registry, Regscope, TempDir, TestImage};

/// Waits until regscope has a finished transfer of `direction` on `repository` for each of `tags`;
/// returns them by tag. Panics, showing everything regscope has, if one is missing or a tag has
/// more than one.
fn wait_for_tags(
    admin: std::net::SocketAddr,
    direction: TransferDirection,
    repository: &str,
    tags: &[String],
) -> BTreeMap<String, Transfer> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all: Vec<Transfer> =
            transfers(admin).into_iter().filter(|t| t.direction == direction && t.repository == repository).collect();
        let found: BTreeMap<String, Transfer> = all
            .iter()
            .filter_map(|t| Some((t.tag.clone()?, t.clone())))
            .filter(|(tag, _)| tags.contains(tag))
            .collect();
        if found.len() == tags.len() {
            for tag in tags {
                let n = all.iter().filter(|t| t.tag.as_deref() == Some(tag.as_str())).count();
                assert_eq!(n, 1, "one {} of {repository}:{tag}, not {n}:\n{}", direction.as_str(), dump(&all));
            }
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "want one {} of each of {tags:?} on {repository}; regscope has:\n{}",
            direction.as_str(),
            dump(&all)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn dump(transfers: &[Transfer]) -> String {
    transfers.iter().map(pretty).collect::<Vec<_>>().join("\n")
}

/// Each transfer complete, with exactly the blobs and bytes of its tag's manifest in the registry.
fn assert_own_blobs(registry: &Registry, repository: &str, found: &BTreeMap<String, Transfer>, outcome: BlobOutcome) {
    for (tag, t) in found {
        assert_eq!(t.outcome, Outcome::Complete, "{}", pretty(t));
        let stored = manifest_blobs(&registry_manifest(registry.addr(), repository, tag));
        assert_blobs_match(t, &stored, outcome);
    }
}

/// Whether at least two of the transfers were on the wire at once: otherwise the test proved
/// nothing about concurrency.
fn assert_some_overlap(found: &BTreeMap<String, Transfer>) {
    let spans: Vec<(f64, f64)> = found
        .values()
        .map(|t| {
            let start = t.started_unix_ns as f64 / 1e9;
            (start, start + t.wall_seconds)
        })
        .collect();
    let overlap = spans.iter().enumerate().any(|(i, a)| spans[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlap, "the transfers ran one after another, not at once: {spans:?}");
}

/// Runs `job` for each item at once, one thread each, and waits for all.
fn all_at_once<T: Sync>(items: &[T], job: impl Fn(&T) + Sync) {
    thread::scope(|scope| {
        for item in items {
            scope.spawn(|| job(item));
        }
    });
}

#[test]
fn concurrent_docker_pushes_and_pulls_of_one_repository_are_one_transfer_each() {
    const REPOSITORY: &str = "regscope-test/concurrent-docker";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "5s"]);
    let (admin, docker) = (regscope.admin_addr(), docker());

    let mut references = Vec::new();
    for count in [2u64, 8] {
        let tags: Vec<String> = (0..count).map(|i| format!("of{count}-{i}")).collect();
        let images: Vec<TestImage> = (0..count)
            .map(|i| {
                let reference = format!("{}/{REPOSITORY}:{}", regscope.proxy_addr(), tags[i as usize]);
                TestImage::build(&reference, &[(1 << 20) + i * 4096, (2 << 20) + i * 4096])
            })
            .collect();
        for image in &images {
            docker.load(image);
        }
        all_at_once(&images, |image| {
            docker.push(&image.reference);
        });
        let pushes = wait_for_tags(admin, TransferDirection::Push, REPOSITORY, &tags);
        assert_own_blobs(&registry, REPOSITORY, &pushes, BlobOutcome::Committed);
        assert_some_overlap(&pushes);
        references.push((tags, images));
    }

    // Pull the eight back at once.
    let (tags, images) = references.pop().unwrap();
    for image in &images {
        docker.rmi(&image.reference);
    }
    all_at_once(&images, |image| {
        docker.pull(&image.reference);
    });
    for image in &images {
        assert_eq!(docker.image_id(&image.reference), image.image_id, "pulled image differs from the pushed one");
    }
    let pulls = wait_for_tags(admin, TransferDirection::Pull, REPOSITORY, &tags);
    assert_own_blobs(&registry, REPOSITORY, &pulls, BlobOutcome::Fetched);
    assert_some_overlap(&pulls);
    for image in images.iter().chain(references.iter().flat_map(|(_, images)| images)) {
        docker.rmi(&image.reference);
    }
}

#[test]
fn concurrent_docker_pushes_sharing_a_layer_count_it_once() {
    const REPOSITORY: &str = "regscope-test/concurrent-shared";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "5s"]);
    let (admin, docker) = (regscope.admin_addr(), docker());
    let at = |tag: &str| format!("{}/{REPOSITORY}:{tag}", regscope.proxy_addr());
    let base = TestImage::build(&at("base"), &[3 << 20]);
    let images = [base.extend(&at("a"), &[1 << 20]), base.extend(&at("b"), &[2 << 20])];
    for image in &images {
        docker.load(image);
    }
    all_at_once(&images, |image| {
        docker.push(&image.reference);
    });
    let tags = ["a".to_string(), "b".to_string()];
    let pushes = wait_for_tags(admin, TransferDirection::Push, REPOSITORY, &tags);

    let stored_a = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "a"));
    let (shared, shared_size) = stored_a[1].clone();
    let mut moved = 0;
    for (tag, push) in &pushes {
        assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(push));
        let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, tag));
        assert_eq!(push.blobs.len(), stored.len(), "every blob of {tag}'s manifest, once:\n{}", pretty(push));
        for (digest, size) in &stored {
            let blob = push.blobs.iter().find(|b| b.digest.as_deref() == Some(digest.as_str()));
            let blob = blob.unwrap_or_else(|| panic!("{digest} not listed in {tag}'s push:\n{}", pretty(push)));
            if *digest == shared {
                moved += blob.bytes;
                continue;
            }
            assert_eq!((blob.outcome, blob.bytes), (BlobOutcome::Committed, *size), "{tag}'s own blob {digest}");
        }
        let listed = push.blobs.iter().find(|b| b.digest.as_deref() == Some(shared.as_str())).unwrap();
        assert!(
            matches!(listed.outcome, BlobOutcome::Committed | BlobOutcome::Present),
            "the shared layer in {tag}'s push: {:?}",
            listed.outcome
        );
    }
    assert_eq!(moved, shared_size, "the shared layer's bytes, counted once over both pushes");
    for image in &images {
        docker.rmi(&image.reference);
    }
}

#[test]
fn parallel_skopeo_copies_are_one_transfer_each() {
    const REPOSITORY: &str = "regscope-test/concurrent-skopeo";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "5s"]);
    let admin = regscope.admin_addr();
    let tags: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    let images: Vec<TestImage> = (0..4u64)
        .map(|i| TestImage::build(&format!("x/{REPOSITORY}:s{i}"), &[(1 << 20) + i * 4096, (3 << 20) + i * 4096]))
        .collect();
    let destination = |tag: &str| format!("docker://{}/{REPOSITORY}:{tag}", regscope.proxy_addr());
    let pairs: Vec<(&TestImage, &String)> = images.iter().zip(&tags).collect();
    all_at_once(&pairs, |(image, tag)| {
        skopeo(&["copy", "--quiet", "--dest-tls-verify=false", &image.skopeo_source(), &destination(tag)]);
    });
    let pushes = wait_for_tags(admin, TransferDirection::Push, REPOSITORY, &tags);
    assert_own_blobs(&registry, REPOSITORY, &pushes, BlobOutcome::Committed);
    assert_some_overlap(&pushes);

    let work = TempDir::new("skopeo-out");
    all_at_once(&tags, |tag| {
        let out = format!("dir:{}", work.path().join(tag).display());
        skopeo(&["copy", "--quiet", "--src-tls-verify=false", &destination(tag), &out]);
    });
    let pulls = wait_for_tags(admin, TransferDirection::Pull, REPOSITORY, &tags);
    assert_own_blobs(&registry, REPOSITORY, &pulls, BlobOutcome::Fetched);
    assert_some_overlap(&pulls);
}

#[test]
fn a_multi_platform_push_is_one_transfer() {
    const REPOSITORY: &str = "regscope-test/multi-platform";
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "5s"]);
    let layout = TempDir::new("oci-layout");
    write_two_platform_layout(layout.path(), "multi");
    let destination = format!("docker://{}/{REPOSITORY}:multi", regscope.proxy_addr());
    let source = format!("oci:{}:multi", layout.path().display());
    skopeo(&["copy", "--quiet", "--all", "--dest-tls-verify=false", &source, &destination]);

    let tags = ["multi".to_string()];
    let push =
        wait_for_tags(regscope.admin_addr(), TransferDirection::Push, REPOSITORY, &tags).remove("multi").unwrap();
    let all: Vec<Transfer> =
        transfers(regscope.admin_addr()).into_iter().filter(|t| t.repository == REPOSITORY).collect();
    assert_eq!(all.len(), 1, "one transfer for the whole push:\n{}", dump(&all));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));

    // Every blob of both platform manifests the registry now holds, with its bytes.
    let index = registry_manifest(registry.addr(), REPOSITORY, "multi");
    let platforms = index["manifests"].as_array().expect("an index");
    assert_eq!(platforms.len(), 2);
    let mut stored = Vec::new();
    for platform in platforms {
        let digest = platform["digest"].as_str().unwrap();
        stored.extend(manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, digest)));
    }
    assert_eq!(push.blobs.len(), stored.len(), "{}", pretty(&push));
    for (digest, size) in &stored {
        let blob = push.blobs.iter().find(|b| b.digest.as_deref() == Some(digest.as_str()));
        let blob = blob.unwrap_or_else(|| panic!("{digest} missing:\n{}", pretty(&push)));
        assert_eq!((blob.outcome, blob.bytes), (BlobOutcome::Committed, *size), "{digest}");
    }
    let manifest_puts = push.requests.iter().filter(|r| r.operation == regscope::Operation::ManifestPut).count();
    assert_eq!(manifest_puts, 3, "both platform manifests and the index");
}

/// Writes an OCI image layout at `dir` whose index, named `tag`, lists two platform images
/// (linux/amd64 and linux/arm64) of one random layer each.
fn write_two_platform_layout(dir: &Path, tag: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        json!({ "digest": format!("sha256:{hex}"), "size": bytes.len() })
    };
    let mut manifests = Vec::new();
    for (n, arch) in ["amd64", "arm64"].iter().enumerate() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        let data: Vec<u8> =
            (0..(1u32 << 20) + n as u32 * 4096).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ n as u8).collect();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("platform-{arch}.bin"), data.as_slice()).unwrap();
        let layer = tar.into_inner().unwrap();
        let diff_id: String = Sha256::digest(&layer).iter().map(|b| format!("{b:02x}")).collect();
        let mut layer_desc = put(&layer);
        layer_desc["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar");
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        }))
        .unwrap();
        let mut config_desc = put(&config);
        config_desc["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }))
        .unwrap();
        let mut desc = put(&manifest);
        desc["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
        desc["platform"] = json!({ "architecture": arch, "os": "linux" });
        manifests.push(desc);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let mut index_desc = put(&index);
    index_desc["mediaType"] = json!("application/vnd.oci.image.index.v1+json");
    index_desc["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let top = json!({ "schemaVersion": 2, "manifests": [index_desc] });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}
