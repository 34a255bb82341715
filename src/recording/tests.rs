//! The tracker end to end on scripted requests: how requests become pushes and pulls, when each
//! is over, and that memory stays bounded.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tracker::{Tracker, TrackerConfig};
use crate::body::{BodyOutcome, ExchangeRecord, ExchangeSink};
use crate::metrics::Metrics;
use crate::protocol::{BlobKind, BodyEnd, Direction, Operation, Outcome, TransferDirection};
use crate::recording::BlobOutcome;

pub(super) fn record(id: u64, op: Operation, repo: &str, at: Instant, secs: f64, status: u16) -> ExchangeRecord {
    let end = at + Duration::from_secs_f64(secs);
    ExchangeRecord {
        id,
        api: op.api(),
        operation: op,
        repository: Some(repo.into()),
        status: Some(status),
        forwarded: Some(at),
        response_head: Some(end),
        ended: end,
        ..ExchangeRecord::empty("10.0.0.7:40000".parse().unwrap(), at)
    }
}

pub(super) fn body(direction: Direction, bytes: u64, from: Instant, to: Instant) -> Option<BodyOutcome> {
    Some(BodyOutcome {
        direction,
        bytes,
        first_poll: Some(from),
        last_byte: Some(to),
        ended: to,
        source_wait: Duration::ZERO,
        sink_wait: Duration::ZERO,
        end: BodyEnd::Complete,
    })
}

pub(super) fn tracker(config: TrackerConfig) -> Tracker {
    Tracker::new(config, Arc::new(Metrics::new(0)))
}

#[tokio::test(start_paused = true)]
async fn a_docker_style_push_becomes_one_complete_transfer() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let mut post = record(1, Operation::UploadStart, "team/app", at(0.0), 0.1, 202);
    post.response_info.upload_uuid = Some("u-1".into());
    let mut patch = record(2, Operation::UploadChunk, "team/app", at(0.2), 2.0, 202);
    patch.upload_id = Some("u-1".into());
    patch.upload = body(Direction::Upload, 1000, at(0.2), at(2.1));
    let mut put = record(3, Operation::UploadFinish, "team/app", at(2.3), 0.2, 201);
    put.upload_id = Some("u-1".into());
    put.digest = Some("sha256:aa".into());
    let mut manifest = record(4, Operation::ManifestPut, "team/app", at(2.6), 0.1, 201);
    manifest.reference = Some("v1".into());
    manifest.captured =
        Some(br#"{"config":{"digest":"sha256:cc","size":5},"layers":[{"digest":"sha256:aa","size":1000}]}"#.to_vec());
    for r in [post, patch, put] {
        t.finished(r);
        assert!(t.recent(10).is_empty(), "not over before the manifest");
    }
    t.finished(manifest);
    let done = t.recent(10);
    assert_eq!(done.len(), 1);
    let push = &done[0];
    assert_eq!(
        (push.direction, push.outcome, push.tag.as_deref()),
        (TransferDirection::Push, Outcome::Complete, Some("v1"))
    );
    assert_eq!(push.blobs.len(), 2, "the layer pushed, and the config the registry had");
    let config = push.blobs.iter().find(|b| b.digest.as_deref() == Some("sha256:cc")).unwrap();
    assert_eq!((config.outcome, config.bytes), (BlobOutcome::Present, 0));
    let blob = push.blobs.iter().find(|b| b.digest.as_deref() == Some("sha256:aa")).unwrap();
    assert_eq!((blob.digest.as_deref(), blob.kind, blob.bytes), (Some("sha256:aa"), Some(BlobKind::Layer), 1000));
    assert_eq!(blob.outcome, BlobOutcome::Committed);
    assert!((push.parties.total() - push.wall_seconds).abs() < 1e-9);
    assert_eq!(push.client, "10.0.0.7");
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_close_as_incomplete_and_memory_stays_bounded() {
    let config = TrackerConfig { max_requests: 10, max_total_requests: 25, ..TrackerConfig::default() };
    let t = tracker(config);
    let t0 = Instant::now();
    for i in 0..40u64 {
        let repo = format!("r{}", i % 2);
        t.finished(record(i, Operation::BlobGet, &repo, t0, 0.01, 200));
    }
    assert_eq!(t.lock().held_requests, 20, "each session keeps at most max_requests");
    t.finished(record(100, Operation::BlobGet, "r3", t0, 0.01, 200));
    t.finished(record(101, Operation::BlobGet, "r4", t0, 0.01, 200));
    t.finished(record(102, Operation::BlobGet, "r5", t0, 0.01, 200));
    t.finished(record(103, Operation::BlobGet, "r6", t0, 0.01, 200));
    t.finished(record(104, Operation::BlobGet, "r7", t0, 0.01, 200));
    t.finished(record(105, Operation::BlobGet, "r8", t0, 0.01, 200));
    assert_eq!(t.lock().held_requests, 25, "never more than max_total_requests");
    t.sweep(t0 + Duration::from_secs(121));
    assert_eq!(t.lock().held_requests, 0);
    let closed = t.recent(100);
    assert_eq!(closed.len(), 8);
    assert!(closed.iter().all(|c| c.outcome == Outcome::Incomplete));
    let r0 = closed.iter().find(|c| c.repository == "r0").unwrap();
    assert_eq!((r0.requests.len(), r0.requests_dropped), (10, 10));

    // Finished transfers keep their requests for the waterfall, within the same bound: the
    // oldest give way.
    for i in 0..10u64 {
        t.finished(record(200 + i, Operation::BlobGet, "r9", t0, 0.01, 200));
    }
    t.sweep(t0 + Duration::from_secs(400));
    let kept = t.recent(100);
    let held: usize = kept.iter().map(|c| c.requests.len()).sum();
    assert!((16..=25).contains(&held), "{held}: the bound, less at most one evicted transfer's worth");
    assert!(kept.len() < 9, "older transfers made room for the new one");
    assert!(kept.iter().any(|c| c.repository == "r9" && c.requests.len() == 10));
    assert_eq!(t.lock().finished_requests, held);
}

#[tokio::test(start_paused = true)]
async fn polling_one_manifest_does_not_grow_the_session() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    let body = br#"{"config":{"digest":"sha256:c","size":1},"layers":[{"digest":"sha256:l","size":2}]}"#;
    for id in 0..1000 {
        let mut get = record(id, Operation::ManifestGet, "polled", t0, 0.001, 200);
        get.reference = Some("latest".into());
        get.captured = Some(body.to_vec());
        t.finished(get);
    }
    let state = t.lock();
    assert_eq!((state.images.len(), state.open.len()), (1, 0), "one image, its pool claimed");
    assert_eq!(state.images[0].session.expected.len(), 2);
}

/// A manifest body naming a config and layers of the given digests, each of size 100 × its
/// position.
pub(super) fn manifest_body(config: &str, layers: &[&str]) -> Vec<u8> {
    let layer = |(i, d): (usize, &&str)| format!(r#"{{"digest":"{d}","size":{}}}"#, 100 * (i + 1));
    let layers: Vec<String> = layers.iter().enumerate().map(layer).collect();
    format!(r#"{{"config":{{"digest":"{config}","size":7}},"layers":[{}]}}"#, layers.join(",")).into_bytes()
}

pub(super) fn manifest_get(
    id: u64,
    repo: &str,
    at: Instant,
    reference: &str,
    digest: &str,
    body: Vec<u8>,
) -> ExchangeRecord {
    manifest_exchange(record(id, Operation::ManifestGet, repo, at, 0.01, 200), reference, digest, body)
}

/// A manifest request for `reference`, answered with `digest`, its body `body`.
fn manifest_exchange(mut r: ExchangeRecord, reference: &str, digest: &str, body: Vec<u8>) -> ExchangeRecord {
    r.reference = Some(reference.into());
    r.response_info.content_digest = Some(digest.into());
    r.captured = Some(body);
    r
}

pub(super) fn blob_get(id: u64, repo: &str, at: Instant, digest: &str, bytes: u64) -> ExchangeRecord {
    let mut get = record(id, Operation::BlobGet, repo, at, 0.1, 200);
    get.digest = Some(digest.into());
    get.download = body(Direction::Download, bytes, at, at + Duration::from_millis(100));
    get
}

pub(super) fn outcomes(t: &Transfer) -> Vec<(String, BlobOutcome, u64, Option<u64>)> {
    let mut blobs: Vec<_> =
        t.blobs.iter().map(|b| (b.digest.clone().unwrap_or_default(), b.outcome, b.bytes, b.declared_size)).collect();
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    blobs
}

use super::model::Transfer;

#[tokio::test(start_paused = true)]
async fn a_pull_of_what_the_client_lacks_ends_when_it_settles_with_the_rest_present() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    t.finished(manifest_get(
        1,
        "team/app",
        at(0.0),
        "v2",
        "sha256:m",
        manifest_body("sha256:c", &["sha256:a", "sha256:b", "sha256:d"]),
    ));
    t.finished(blob_get(2, "team/app", at(0.1), "sha256:c", 7));
    t.finished(blob_get(3, "team/app", at(0.2), "sha256:d", 300));
    t.sweep(Instant::now() + Duration::from_millis(500));
    assert!(t.recent(10).is_empty(), "not settled yet");
    t.sweep(Instant::now() + Duration::from_secs(1));
    let pulls = t.recent(10);
    assert_eq!(pulls.len(), 1, "settled");
    let pull = &pulls[0];
    assert_eq!((pull.direction, pull.outcome, pull.bytes), (TransferDirection::Pull, Outcome::Complete, 307));
    assert_eq!(
        outcomes(pull),
        [
            ("sha256:a".into(), BlobOutcome::Present, 0, Some(100)),
            ("sha256:b".into(), BlobOutcome::Present, 0, Some(200)),
            ("sha256:c".into(), BlobOutcome::Fetched, 7, Some(7)),
            ("sha256:d".into(), BlobOutcome::Fetched, 300, Some(300)),
        ]
    );
    assert!((pull.wall_seconds - 0.3).abs() < 1e-9, "the pull ends at its last byte: {}", pull.wall_seconds);
}

#[tokio::test(start_paused = true)]
async fn a_head_only_pull_knows_its_layers_from_a_manifest_seen_before() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    let mut put = record(1, Operation::ManifestPut, "team/app", t0, 0.01, 201);
    put.reference = Some("v1".into());
    put.response_info.content_digest = Some("sha256:m".into());
    put.captured = Some(manifest_body("sha256:c", &["sha256:a", "sha256:b"]));
    t.finished(put);
    assert_eq!(t.recent(10).len(), 1, "the push");

    let mut head = record(2, Operation::ManifestHead, "team/app", t0, 0.01, 200);
    head.reference = Some("v1".into());
    head.response_info.content_digest = Some("sha256:m".into());
    t.finished(head);
    t.finished(blob_get(3, "team/app", t0, "sha256:b", 200));
    t.sweep(Instant::now() + Duration::from_secs(1));
    let pull = t.recent(1)[0].clone();
    assert_eq!(
        (pull.direction, pull.outcome, pull.tag.as_deref()),
        (TransferDirection::Pull, Outcome::Complete, Some("v1"))
    );
    assert_eq!(
        outcomes(&pull),
        [
            ("sha256:a".into(), BlobOutcome::Present, 0, Some(100)),
            ("sha256:b".into(), BlobOutcome::Fetched, 200, Some(200)),
            ("sha256:c".into(), BlobOutcome::Present, 0, Some(7)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_index_pull_takes_the_platform_whose_blob_it_fetches() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    // Another client fetched the index and both platform manifests before.
    let index = br#"{"manifests":[{"digest":"sha256:amd"},{"digest":"sha256:arm"}]}"#.to_vec();
    let mut first = manifest_get(1, "team/multi", t0, "latest", "sha256:idx", index);
    first.client = "10.0.0.9:1".parse().unwrap();
    t.finished(first);
    for (id, digest, layers) in
        [(2, "sha256:amd", ["sha256:a1", "sha256:a2"]), (3, "sha256:arm", ["sha256:r1", "sha256:r2"])]
    {
        let mut get = manifest_get(id, "team/multi", t0, digest, digest, manifest_body(&format!("{digest}c"), &layers));
        get.client = "10.0.0.9:1".parse().unwrap();
        t.finished(get);
    }
    // This client holds the platform manifest: HEAD by tag, then one layer.
    let mut head = record(4, Operation::ManifestHead, "team/multi", t0, 0.01, 200);
    head.reference = Some("latest".into());
    head.response_info.content_digest = Some("sha256:idx".into());
    t.finished(head);
    t.finished(blob_get(5, "team/multi", t0, "sha256:a2", 200));
    t.sweep(Instant::now() + Duration::from_secs(200));
    let pull = t.recent(10).into_iter().find(|p| p.client == "10.0.0.7").unwrap();
    assert_eq!(pull.outcome, Outcome::Complete);
    assert_eq!(
        outcomes(&pull),
        [
            ("sha256:a1".into(), BlobOutcome::Present, 0, Some(100)),
            ("sha256:a2".into(), BlobOutcome::Fetched, 200, Some(200)),
            ("sha256:amdc".into(), BlobOutcome::Present, 0, Some(7)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_settled_pull_with_a_cut_off_blob_failed_and_names_it() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    t.finished(manifest_get(1, "team/app", t0, "v1", "sha256:m", manifest_body("sha256:c", &["sha256:a"])));
    let mut cut = blob_get(2, "team/app", t0, "sha256:a", 40);
    cut.download.as_mut().unwrap().end = BodyEnd::SinkDropped;
    t.finished(cut);
    t.sweep(Instant::now() + Duration::from_secs(1));
    let pull = t.recent(1)[0].clone();
    assert_eq!(pull.outcome, Outcome::Failed);
    assert_eq!(outcomes(&pull), [("sha256:a".into(), BlobOutcome::Failed, 40, Some(100))], "nothing listed as present");
}

#[tokio::test(start_paused = true)]
async fn open_transfers_are_closed_as_incomplete_when_regscope_stops() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    let mut post = record(1, Operation::UploadStart, "team/app", t0, 0.1, 202);
    post.response_info.upload_uuid = Some("u-1".into());
    t.finished(post);
    t.finished(blob_get(2, "team/other", t0, "sha256:x", 10));
    assert!(t.recent(10).is_empty());
    t.close_all();
    let closed = t.recent(10);
    assert_eq!(closed.len(), 2);
    assert!(closed.iter().all(|c| c.outcome == Outcome::Incomplete), "{closed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_pull_that_needs_no_blob_waits_longer_then_lists_everything_present() {
    let t = tracker(TrackerConfig::default());
    let t0 = Instant::now();
    t.finished(manifest_get(1, "team/app", t0, "v1", "sha256:m", manifest_body("sha256:c", &["sha256:a"])));
    t.sweep(Instant::now() + Duration::from_secs(2));
    assert!(t.recent(10).is_empty(), "a client may still be looking through its store");
    t.sweep(Instant::now() + Duration::from_secs(5));
    let pull = t.recent(1)[0].clone();
    assert_eq!(pull.outcome, Outcome::Complete);
    assert_eq!(
        outcomes(&pull),
        [
            ("sha256:a".into(), BlobOutcome::Present, 0, Some(100)),
            ("sha256:c".into(), BlobOutcome::Present, 0, Some(7))
        ]
    );
}

/// One blob's upload as docker makes it: `POST`, one `PATCH` of `bytes`, the commit naming it.
pub(super) fn upload(first_id: u64, repo: &str, at: Instant, digest: &str, bytes: u64) -> Vec<ExchangeRecord> {
    let uuid = format!("u-{digest}");
    let mut post = record(first_id, Operation::UploadStart, repo, at, 0.01, 202);
    post.response_info.upload_uuid = Some(uuid.as_str().into());
    let mut patch = record(first_id + 1, Operation::UploadChunk, repo, at, 0.1, 202);
    patch.upload_id = Some(uuid.as_str().into());
    patch.upload = body(Direction::Upload, bytes, at, at + Duration::from_millis(100));
    let mut put = record(first_id + 2, Operation::UploadFinish, repo, at + Duration::from_millis(100), 0.01, 201);
    put.upload_id = Some(uuid.as_str().into());
    put.digest = Some(digest.into());
    vec![post, patch, put]
}

pub(super) fn manifest_put(
    id: u64,
    repo: &str,
    at: Instant,
    reference: &str,
    digest: &str,
    body: Vec<u8>,
) -> ExchangeRecord {
    manifest_exchange(record(id, Operation::ManifestPut, repo, at, 0.01, 201), reference, digest, body)
}
