//! Pulls as clients really pull: they fetch only the blobs they lack, and a client that already
//! holds the manifest asks only `HEAD` before fetching blobs. Such a pull is listed as complete soon after the client is
//! done (it ends at its last byte and settles), with the blobs its manifest names that it did not
//! fetch listed as present on the client, whatever the client: dockerd, skopeo, containerd.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use regscope::{BlobKind, BlobOutcome, Operation, Outcome, Transfer, TransferDirection};
use support::client::Conn;
use support::replay::{manifest_blobs, pretty, registry_manifest, report_table, report_text, transfers, SCHEMA2};
use support::{ctr, docker, go_arch, skopeo, Registry, Regscope, TempDir, TestImage};

/// How soon after the client returns the pull must be listed: the settle time (1 s by default)
/// and a sweep.
const LISTED_WITHIN: Duration = Duration::from_secs(2);

/// The newest finished pull of `repository:tag` with an id above `after`, waited for.
fn wait_pull(admin: SocketAddr, repository: &str, tag: &str, after: u64, timeout: Duration) -> Transfer {
    let deadline = Instant::now() + timeout;
    loop {
        let all = transfers(admin);
        let found = all.iter().find(|t| {
            t.direction == TransferDirection::Pull
                && t.repository == repository
                && t.tag.as_deref() == Some(tag)
                && t.id > after
        });
        if let Some(t) = found {
            return t.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no finished pull of {repository}:{tag} (after #{after}) within {timeout:?}; in progress:\n{}\nfinished:\n{}",
            String::from_utf8_lossy(&support::http_get(admin, "/api/v1/live").body),
            serde_json::to_string_pretty(&all).unwrap()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `(digest, outcome, bytes moved, declared size)` of each blob, sorted by digest.
fn blob_outcomes(t: &Transfer) -> Vec<(String, BlobOutcome, u64, Option<u64>)> {
    let mut blobs: Vec<_> =
        t.blobs.iter().map(|b| (b.digest.clone().unwrap_or_default(), b.outcome, b.bytes, b.declared_size)).collect();
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    blobs
}

/// What a complete pull of `stored` (the registry's config and layers) should list when the
/// client already held the blobs at the positions in `present`.
fn expected(stored: &[(String, u64)], present: &[usize]) -> Vec<(String, BlobOutcome, u64, Option<u64>)> {
    let mut blobs: Vec<_> = stored
        .iter()
        .enumerate()
        .map(|(i, (digest, size))| {
            if present.contains(&i) {
                (digest.clone(), BlobOutcome::Present, 0, Some(*size))
            } else {
                (digest.clone(), BlobOutcome::Fetched, *size, Some(*size))
            }
        })
        .collect();
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    blobs
}

/// The longest time between one request of a transfer ending and the next one starting: what the
/// settle time has to outlast.
fn longest_gap(t: &Transfer) -> f64 {
    let mut spans: Vec<(f64, f64)> = t.requests.iter().map(|r| (r.start, r.end)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut covered = 0.0_f64;
    let mut gap = 0.0_f64;
    for (start, end) in spans {
        gap = gap.max(start - covered);
        covered = covered.max(end);
    }
    gap
}

fn assert_partial(pull: &Transfer, stored: &[(String, u64)], returned: Instant, client: &str) {
    eprintln!(
        "{client}: listed {:.3} s after it returned; longest gap between its requests {:.3} s\n{}",
        returned.elapsed().as_secs_f64(),
        longest_gap(pull),
        pretty(pull)
    );
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(pull));
    let got = blob_outcomes(pull);
    for (i, (digest, size)) in stored.iter().enumerate().skip(1) {
        let present = i < stored.len() - 1;
        let outcome = if present { BlobOutcome::Present } else { BlobOutcome::Fetched };
        let bytes = if present { 0 } else { *size };
        assert!(
            got.contains(&(digest.clone(), outcome, bytes, Some(*size))),
            "{client}: layer {i} {digest} should be {outcome:?} with {bytes} B: {got:?}"
        );
    }
    let layers = pull.blobs.iter().filter(|b| b.kind == Some(BlobKind::Layer)).count();
    assert_eq!(layers, stored.len() - 1, "every layer of the manifest is listed: {got:?}");
}

#[test]
fn docker_pulls_only_the_layers_it_lacks_and_the_pull_is_listed_complete() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let admin = regscope.admin_addr();
    let docker = docker();
    let repository = "regscope-test/partial-docker";
    let base_ref = format!("{}/{repository}:base", regscope.proxy_addr());
    let top_ref = format!("{}/{repository}:top", regscope.proxy_addr());
    let base = TestImage::build(&base_ref, &[2 << 20, 3 << 20]);
    let top = base.extend(&top_ref, &[4 << 20]);
    docker.load(&base);
    docker.load(&top);
    docker.push(&base_ref);
    docker.push(&top_ref);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), repository, "top"));
    assert_eq!(stored.len(), 4, "config and three layers: {stored:?}");
    docker.rmi(&top_ref);
    docker.rmi(&base_ref);

    docker.pull(&base_ref);
    let full = wait_pull(admin, repository, "base", 0, Duration::from_secs(10));
    assert_eq!(full.outcome, Outcome::Complete, "{}", pretty(&full));
    assert!(full.blobs.iter().all(|b| b.outcome == BlobOutcome::Fetched), "{}", pretty(&full));

    // The base layers are on the daemon now: it fetches the config and the top layer only.
    docker.pull(&top_ref);
    let returned = Instant::now();
    let partial = wait_pull(admin, repository, "top", full.id, LISTED_WITHIN);
    assert_eq!(blob_outcomes(&partial), expected(&stored, &[1, 2]), "{}", pretty(&partial));
    assert_partial(&partial, &stored, returned, "docker pull");
    let last_byte = partial.requests.iter().map(|r| r.end).fold(0.0, f64::max);
    assert_eq!(partial.wall_seconds, last_byte, "the pull ends at its last byte");

    let text = report_text(admin, 1);
    let table = report_table(&text, TransferDirection::Pull, repository);
    eprintln!("{table}");
    assert!(table.contains("fetched 1 of 3 layers (2 already present)"), "{table}");
    for (i, (digest, size)) in stored.iter().enumerate().take(3).skip(1) {
        let row = format!("present layer {i} {}", support::replay::short(digest));
        let line = table.lines().find(|l| l.contains(&row)).unwrap_or_else(|| panic!("no {row:?} in\n{table}"));
        assert!(line.contains(&regscope::report::bytes(*size)), "{line}");
    }

    docker.rmi(&top_ref);
    docker.rmi(&base_ref);
}

#[test]
fn skopeo_and_containerd_pull_what_they_lack_and_are_listed_complete() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let admin = regscope.admin_addr();
    let proxy = regscope.proxy_addr();
    let repository = "regscope-test/partial-tools";
    let base = TestImage::build(&format!("{proxy}/{repository}:base"), &[2 << 20, 3 << 20]);
    let top = base.extend(&format!("{proxy}/{repository}:top"), &[4 << 20]);
    for (image, tag) in [(&base, "base"), (&top, "top")] {
        let dest = format!("docker://{}/{repository}:{tag}", registry.addr());
        skopeo(&["copy", "--dest-tls-verify=false", &image.skopeo_source(), &dest]);
    }
    let stored = manifest_blobs(&registry_manifest(registry.addr(), repository, "top"));

    let mut last = 0;
    let mut listed = |tag: &str, client: &str| {
        let returned = Instant::now();
        let pull = wait_pull(admin, repository, tag, last, LISTED_WITHIN);
        if tag == "top" {
            assert_partial(&pull, &stored, returned, client);
        } else {
            assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
        }
        last = pull.id;
    };

    // skopeo into one OCI layout: the second copy reuses the blobs the first one wrote.
    let layout = TempDir::new("oci-layout");
    for tag in ["base", "top"] {
        let src = format!("docker://{proxy}/{repository}:{tag}");
        skopeo(&["copy", "--src-tls-verify=false", &src, &format!("oci:{}:{tag}", layout.path().display())]);
        listed(tag, "skopeo copy");
    }

    // containerd, through the daemon's own: `ctr content fetch` skips what its store holds.
    let namespace = format!("regscope-partial-{}", std::process::id());
    let fetch =
        |tag: &str| ctr(&namespace, &["content", "fetch", "--plain-http", &format!("{proxy}/{repository}:{tag}")]);
    for tag in ["base", "top"] {
        fetch(tag);
        listed(tag, "ctr content fetch");
    }

    // A client that holds the manifest already asks HEAD for the tag and fetches only the blob it
    // lacks; what the manifest names comes from the manifest regscope saw before. containerd does
    // this after `ctr content rm` of a layer, but not reliably so here (run after run it sometimes
    // found nothing to fetch), so its two requests are made as it makes them.
    let (layer, _) = stored.last().unwrap();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    let accept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";
    let head =
        conn.request("HEAD", &format!("/v2/{repository}/manifests/top"), &[("Host", &host), ("Accept", accept)], b"");
    assert_eq!(head.unwrap().status(), 200);
    let blob = conn.request("GET", &format!("/v2/{repository}/blobs/{layer}"), &[("Host", &host)], b"").unwrap();
    assert_eq!((blob.status(), blob.body.len() as u64), (200, stored.last().unwrap().1));
    let returned = Instant::now();
    let cached = wait_pull(admin, repository, "top", last, LISTED_WITHIN);
    let ops: Vec<Operation> = cached.requests.iter().map(|r| r.operation).collect();
    assert_eq!(ops, [Operation::ManifestHead, Operation::BlobGet], "HEAD, then the one blob it lacks");
    assert_eq!(blob_outcomes(&cached), expected(&stored, &[0, 1, 2]), "{}", pretty(&cached));
    assert_partial(&cached, &stored, returned, "cached manifest: HEAD, then the blob");
}

#[test]
fn a_multi_platform_pull_is_one_pull_of_the_platform_it_takes() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let admin = regscope.admin_addr();
    let docker = docker();
    let repository = "regscope-test/multi-platform";
    // Two images, pushed straight to the registry; an index names them as two platforms.
    let mut entries = Vec::new();
    for (tag, arch, size) in [("native", go_arch(), 3 << 20), ("other", "s390x", 1 << 20)] {
        let image = TestImage::build(&format!("{repository}:{tag}"), &[size]);
        let dest = format!("docker://{}/{repository}:{tag}", registry.addr());
        skopeo(&["copy", "--dest-tls-verify=false", "--format", "v2s2", &image.skopeo_source(), &dest]);
        let (digest, length) = manifest_digest(registry.addr(), repository, tag);
        entries.push(format!(
            r#"{{"mediaType":"{SCHEMA2}","size":{length},"digest":"{digest}","platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        ));
    }
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{LIST}","manifests":[{}]}}"#, entries.join(","));
    let host = registry.addr().to_string();
    let put = Conn::connect(registry.addr())
        .request(
            "PUT",
            &format!("/v2/{repository}/manifests/multi"),
            &[("Host", &host), ("Content-Type", LIST)],
            index.as_bytes(),
        )
        .unwrap();
    assert_eq!(put.status(), 201, "PUT index: {}", put.text());
    let native = manifest_blobs(&registry_manifest(registry.addr(), repository, "native"));

    let reference = format!("{}/{repository}:multi", regscope.proxy_addr());
    docker.pull(&reference);
    let pull = wait_pull(admin, repository, "multi", 0, LISTED_WITHIN);
    eprintln!("{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    assert_eq!(blob_outcomes(&pull), expected(&native, &[]), "the native platform's blobs, in one pull");
    let manifests = pull.requests.iter().filter(|r| r.operation == Operation::ManifestGet).count();
    assert_eq!(manifests, 2, "the index by tag, then the platform's manifest by digest");
    assert_eq!(transfers(admin).iter().filter(|t| t.direction == TransferDirection::Pull).count(), 1);
    docker.rmi(&reference);
}

const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The digest and length of the schema2 manifest `repository:reference`, as the registry has it.
fn manifest_digest(registry: SocketAddr, repository: &str, reference: &str) -> (String, usize) {
    let host = registry.to_string();
    let response = Conn::connect(registry)
        .request(
            "GET",
            &format!("/v2/{repository}/manifests/{reference}"),
            &[("Host", &host), ("Accept", SCHEMA2)],
            b"",
        )
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text());
    let digest = response.header("docker-content-digest").expect("Docker-Content-Digest").to_string();
    (digest, response.body.len())
}
