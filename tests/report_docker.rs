//! docker: a real `docker push` and `docker pull` through regscope give transfers (API
//! and `regscope report`) that name every blob with the size the registry stored, attribute the
//! whole wall time, and find what the seed found: the client (the daemon compressing) takes most of
//! a push.

mod support;

use std::time::Duration;

use regscope::Api;
use regscope::{BlobOutcome, Outcome, TransferDirection};
use support::replay::{
    assert_blobs_match, assert_shares_add_up, assert_table_lists, manifest_blobs, pretty, registry_manifest,
    report_table, report_text, verdict_percentages, wait_for_transfer,
};
use support::{docker, Registry, Regscope, TestImage};

const REPOSITORY: &str = "regscope-test/report-docker";

#[test]
fn docker_push_and_pull_are_reported_blob_by_blob_with_the_registrys_sizes() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let admin = regscope.admin_addr();
    let docker = docker();
    let reference = format!("{}/{REPOSITORY}:v1", regscope.proxy_addr());
    // Two incompressible layers: gzip in the daemon works hard and gains nothing.
    let image = TestImage::build(&reference, &[6 << 20, 24 << 20]);
    docker.load(&image);

    // --- push ---
    docker.push(&reference);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "v1"));
    assert_eq!(stored.len(), 3, "config + two layers in the registry's manifest: {stored:?}");
    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(10));
    eprintln!("push transfer:\n{}", pretty(&push));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));
    assert_eq!(push.api, Api::V2);
    assert_eq!(push.tag.as_deref(), Some("v1"));
    assert_blobs_match(&push, &stored, BlobOutcome::Committed);
    assert!(push.bytes >= stored.iter().map(|(_, size)| size).sum::<u64>(), "{}", pretty(&push));
    assert_shares_add_up(&push);
    let p = push.parties;
    assert!(
        p.client > p.registry && p.client > p.moving,
        "the daemon (compressing) should take the largest share of a push: client {:.3} s, registry {:.3} s, moving {:.3} s of {:.3} s",
        p.client,
        p.registry,
        p.moving,
        push.wall_seconds
    );

    let text = report_text(admin, 1);
    eprintln!("regscope report after the push:\n{text}");
    let table = report_table(&text, TransferDirection::Push, REPOSITORY);
    assert!(table.lines().next().unwrap().contains(&format!("v2 push {REPOSITORY}:v1")), "{table}");
    assert!(table.lines().next().unwrap().contains("complete"), "{table}");
    assert_table_lists(table, &stored, "transfer");
    let (client, registry, moving) = verdict_percentages(table);
    assert!(client >= registry && client >= moving, "verdict puts the client first: {table}");

    // --- pull ---
    docker.rmi(&reference);
    docker.pull(&reference);
    assert_eq!(docker.image_id(&reference), image.image_id, "pulled image differs from the pushed one");
    let pull = wait_for_transfer(admin, TransferDirection::Pull, REPOSITORY, Duration::from_secs(10));
    eprintln!("pull transfer:\n{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    assert_eq!(pull.tag.as_deref(), Some("v1"));
    assert_blobs_match(&pull, &stored, BlobOutcome::Fetched);
    assert_shares_add_up(&pull);

    let text = report_text(admin, 2);
    eprintln!("regscope report after the pull:\n{text}");
    let table = report_table(&text, TransferDirection::Pull, REPOSITORY);
    assert!(table.lines().next().unwrap().contains("complete"), "{table}");
    assert_table_lists(table, &stored, "get");
    // The push table is still there, older.
    report_table(&text, TransferDirection::Push, REPOSITORY);

    docker.rmi(&reference);
}
