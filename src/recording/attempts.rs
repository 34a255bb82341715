//! Attempts: each blob's uploads and downloads grouped into tries, each failed one with who
//! ended it, and the time a failure cost: the failed try and the client's wait before the next.
//!
//! A request that fails ends its attempt; the blob's next request starts the next. A v2 upload
//! that failed before naming its blob belongs to the client's next upload that started after it
//! ended (its retry): the first such upload that is not already another failure's retry and
//! whose blob is no smaller than what the failed one moved. A download redirected to storage is
//! one attempt with the storage request that follows.

use serde::{Deserialize, Serialize};

use super::timeline::RequestView;
use crate::protocol::{BodyEnd, Culprit, FailureCause, Operation, Side, UpstreamErrorKind};

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// It committed the blob (upload) or delivered every byte (download).
    Succeeded,
    Failed,
}

/// One try at moving a blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub outcome: AttemptOutcome,
    /// Who ended it, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_by: Option<Culprit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
    /// The status of the request that ended it, if it had one.
    pub status: Option<u16>,
    /// Body bytes it moved in the blob's direction.
    pub bytes: u64,
    pub start: f64,
    pub end: f64,
    pub requests: Vec<u64>,
}

/// Seconds lost to failures, by who failed. With the parties' shares they add up to the wall
/// time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Lost {
    pub client: f64,
    pub registry: f64,
    pub storage: f64,
    pub regscope: f64,
}

impl Lost {
    pub fn get(&self, culprit: Culprit) -> f64 {
        match culprit {
            Culprit::Client => self.client,
            Culprit::Registry => self.registry,
            Culprit::Storage => self.storage,
            Culprit::Regscope => self.regscope,
        }
    }

    pub(crate) fn get_mut(&mut self, culprit: Culprit) -> &mut f64 {
        match culprit {
            Culprit::Client => &mut self.client,
            Culprit::Registry => &mut self.registry,
            Culprit::Storage => &mut self.storage,
            Culprit::Regscope => &mut self.regscope,
        }
    }

    pub fn total(&self) -> f64 {
        Culprit::ALL.iter().map(|&c| self.get(c)).sum()
    }
}

/// A stretch of a transfer lost to one party's failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LostSpan {
    pub from: f64,
    pub to: f64,
    pub culprit: Culprit,
}

/// Whether a request failed as far as its blob is concerned, and if so whose doing it was and
/// how. A 401 is the challenge before a token, not a failure.
fn failure(r: &RequestView) -> Option<(Culprit, FailureCause)> {
    let upstream = match r.operation.upstream() {
        crate::protocol::Party::Storage => Culprit::Storage,
        _ => Culprit::Registry,
    };
    let stalled = [&r.upload, &r.download].into_iter().flatten().any(|b| b.outcome == BodyEnd::SourceStalled);
    if stalled {
        return Some((Culprit::Regscope, FailureCause::Limit));
    }
    if let Some(kind) = r.upstream_error {
        let cause = match kind {
            UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::ResponseTimeout => FailureCause::Timeout,
            _ => FailureCause::ConnectionLost,
        };
        return Some((upstream, cause));
    }
    match (r.aborted_by, r.status) {
        (Some(Side::Client), _) => Some((Culprit::Client, FailureCause::ConnectionLost)),
        (Some(Side::Registry), _) => Some((upstream, FailureCause::ConnectionLost)),
        (None, None) => Some((Culprit::Regscope, FailureCause::Limit)),
        // Refused before it went upstream: regscope had no room.
        (None, Some(503)) if r.forwarded.is_none() => Some((Culprit::Regscope, FailureCause::Limit)),
        (None, Some(401)) => None,
        (None, Some(status)) if status >= 400 => Some((upstream, FailureCause::ErrorStatus)),
        (None, Some(_)) => None,
    }
}

/// The attempt its requests make: `delivered` says whether it committed or delivered the blob,
/// `bytes` what it moved. A failed attempt takes who ended it from its first failed request.
fn attempt(requests: &[&RequestView], delivered: bool, bytes: u64) -> Attempt {
    let first_failure = requests.iter().find_map(|r| failure(r));
    let last = requests.iter().max_by(|a, b| a.end.total_cmp(&b.end));
    let ending = requests.iter().find(|r| failure(r).is_some()).or(last);
    let failed = !delivered;
    Attempt {
        outcome: if failed { AttemptOutcome::Failed } else { AttemptOutcome::Succeeded },
        failed_by: first_failure.filter(|_| failed).map(|(culprit, _)| culprit),
        cause: first_failure.filter(|_| failed).map(|(_, cause)| cause),
        status: ending.and_then(|r| r.status),
        bytes,
        start: requests.iter().map(|r| r.start).fold(f64::INFINITY, f64::min),
        end: requests.iter().map(|r| r.end).fold(0.0, f64::max),
        requests: requests.iter().map(|r| r.id).collect(),
    }
}

/// Splits one blob's requests (in order of start) into attempts: a failed request ends one.
fn split_at_failures<'a>(requests: &[&'a RequestView]) -> Vec<Vec<&'a RequestView>> {
    let mut attempts: Vec<Vec<&RequestView>> = Vec::new();
    let mut current = Vec::new();
    for &r in requests {
        current.push(r);
        if failure(r).is_some() {
            attempts.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        attempts.push(current);
    }
    attempts
}

/// What the retry rule needs to know of one upload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UploadTry {
    /// It failed without naming its blob: some later upload is its retry.
    pub unnamed_failure: bool,
    pub start: f64,
    pub end: f64,
    /// Body bytes it moved.
    pub moved: u64,
    /// The declared size of the blob it names, when known.
    pub size: Option<u64>,
}

/// For a push's uploads in order of start, the index of the earlier upload each one retries.
pub(crate) fn retries(uploads: &[UploadTry]) -> Vec<Option<usize>> {
    let mut waiting: Vec<usize> = Vec::new();
    let mut retry_of = vec![None; uploads.len()];
    for (i, u) in uploads.iter().enumerate() {
        let fits = |&w: &usize| uploads[w].end <= u.start && u.size.is_none_or(|size| uploads[w].moved <= size);
        if let Some(pos) = waiting.iter().position(fits) {
            retry_of[i] = Some(waiting.remove(pos));
        }
        if u.unnamed_failure {
            waiting.push(i);
        }
    }
    retry_of
}

/// The uploads of each blob, in order: its first upload, then the ones that retried it.
pub(crate) fn retry_chains(uploads: &[UploadTry]) -> Vec<Vec<usize>> {
    let mut chains: Vec<Vec<usize>> = Vec::new();
    let mut chain_of = vec![0; uploads.len()];
    for (i, earlier) in retries(uploads).into_iter().enumerate() {
        chain_of[i] = match earlier {
            Some(earlier) => chain_of[earlier],
            None => {
                chains.push(Vec::new());
                chains.len() - 1
            }
        };
        chains[chain_of[i]].push(i);
    }
    chains
}

/// One upload's attempts: it split at its failed requests, the last one delivered if the upload
/// committed (or mounted) the blob.
pub(crate) fn upload_attempts(requests: &[&RequestView], committed: bool, out: &mut Vec<Attempt>) {
    let parts = split_at_failures(requests);
    let n = parts.len();
    for (k, part) in parts.iter().enumerate() {
        let bytes = part.iter().map(|r| r.bytes_in()).sum();
        out.push(attempt(part, committed && k + 1 == n, bytes));
    }
}

/// A blob's downloads (in order of start) as attempts: a redirect and the storage request that
/// follows are one; a request that failed, or delivered with a 2xx, ends one.
pub(crate) fn download_attempts(fetches: &[&RequestView]) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut current: Vec<&RequestView> = Vec::new();
    for &r in fetches {
        current.push(r);
        let failed = failure(r).is_some();
        let redirect = r.status.is_some_and(|s| (300..400).contains(&s)) && !failed;
        if !redirect {
            let delivered = !failed && r.status.is_some_and(|s| (200..300).contains(&s));
            let bytes = current.iter().map(|r| r.bytes_out()).sum();
            attempts.push(attempt(&current, delivered, bytes));
            current.clear();
        }
    }
    if !current.is_empty() {
        let bytes = current.iter().map(|r| r.bytes_out()).sum();
        attempts.push(attempt(&current, false, bytes));
    }
    attempts
}

/// The stretches lost to each failed attempt of one blob (attempts in order): from its start to
/// the next attempt's start (the client's wait before retrying), or to its own end when none
/// followed.
pub(crate) fn lost_spans(attempts: &[Attempt], out: &mut Vec<LostSpan>) {
    for (i, a) in attempts.iter().enumerate() {
        let Some(culprit) = a.failed_by else { continue };
        let to = attempts.get(i + 1).map_or(a.end, |next| next.start.max(a.end));
        out.push(LostSpan { from: a.start, to, culprit });
    }
}

/// Whether an operation delivers a blob's bytes in a pull.
pub(crate) fn is_fetch(op: Operation) -> bool {
    matches!(op, Operation::BlobGet | Operation::StorageGet | Operation::V1LayerGet)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::body::{BodyOutcome, ExchangeRecord, ExchangeSink};
    use crate::protocol::{Direction, Outcome};
    use crate::recording::tests::{blob_get, body, manifest_body, manifest_get, manifest_put, record, tracker, upload};
    use crate::recording::{BlobOutcome, TrackerConfig};

    fn view(operation: Operation, status: Option<u16>, aborted_by: Option<Side>) -> RequestView {
        let t0 = Instant::now();
        let mut r = record(1, operation, "a", t0, 0.1, status.unwrap_or(0));
        r.status = status;
        let mut v = RequestView::new(&r, t0);
        v.aborted_by = aborted_by;
        v
    }

    #[test]
    fn who_ended_a_request_and_how() {
        use Culprit::*;
        use FailureCause::*;
        use Operation::*;
        let cases = [
            (view(UploadChunk, Some(202), None), None),
            (view(UploadChunk, Some(401), None), None),
            (view(UploadChunk, Some(500), None), Some((Registry, ErrorStatus))),
            (view(StorageGet, Some(503), None), Some((Storage, ErrorStatus))),
            (view(UploadChunk, Some(202), Some(Side::Client)), Some((Client, ConnectionLost))),
            (view(BlobGet, Some(200), Some(Side::Registry)), Some((Registry, ConnectionLost))),
            (view(BlobGet, None, None), Some((Regscope, Limit))),
        ];
        for (r, want) in cases {
            assert_eq!(failure(&r), want, "{:?} {:?} {:?}", r.operation, r.status, r.aborted_by);
        }
        let mut timed_out = view(UploadChunk, Some(504), Some(Side::Registry));
        timed_out.upstream_error = Some(UpstreamErrorKind::ResponseTimeout);
        assert_eq!(failure(&timed_out), Some((Registry, Timeout)));
        let mut refused = view(UploadStart, Some(503), None);
        refused.forwarded = None;
        assert_eq!(failure(&refused), Some((Regscope, Limit)));
    }

    #[test]
    fn a_failed_upload_is_retried_by_the_next_that_fits() {
        // Uploads in order of start: two fail together (3 MB and 40 MB moved), then three start
        // after: a 10 MB blob (too small for the 40 MB failure), a 50 MB one, and one more.
        let up = |unnamed_failure, start, end, moved, size| UploadTry { unnamed_failure, start, end, moved, size };
        let uploads = [
            up(true, 0.0, 1.2, 3 << 20, None),
            up(true, 0.0, 1.2, 40 << 20, None),
            up(false, 7.0, 9.0, 10 << 20, Some(10 << 20)),
            up(false, 7.1, 12.0, 50 << 20, Some(50 << 20)),
            up(false, 7.2, 8.0, 1 << 20, Some(1 << 20)),
        ];
        assert_eq!(retries(&uploads), [None, None, Some(0), Some(1), None]);
        assert_eq!(retry_chains(&uploads), [vec![0, 2], vec![1, 3], vec![4]]);
        // A failure retried by another failure, then by a success: one chain.
        let chained = [up(true, 0.0, 1.0, 5, None), up(true, 2.0, 3.0, 5, None), up(false, 4.0, 9.0, 9, Some(9))];
        assert_eq!(retries(&chained), [None, Some(0), Some(1)]);
        assert_eq!(retry_chains(&chained), [vec![0, 1, 2]]);
    }

    /// An upload's `POST` at 0 s and its `PATCH` from 0.2 s, cut off at 1.2 s after `bytes` with
    /// `status` and its body ended as `end`.
    fn cut_upload(t0: Instant, status: u16, end: crate::protocol::BodyEnd, bytes: u64) -> [ExchangeRecord; 2] {
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut post = record(1, Operation::UploadStart, "team/app", at(0.0), 0.1, 202);
        post.response_info.upload_uuid = Some("u-1".into());
        let mut patch = record(2, Operation::UploadChunk, "team/app", at(0.2), 1.0, status);
        patch.upload_id = Some("u-1".into());
        patch.upload = Some(BodyOutcome { end, ..body(Direction::Upload, bytes, at(0.2), at(1.2)).unwrap() });
        [post, patch]
    }

    /// A push whose layer upload the registry cut off at 1.2 s, retried after the client's 5 s
    /// wait: one blob, two attempts, the failed one and the wait lost to the registry.
    #[tokio::test(start_paused = true)]
    async fn a_push_retried_after_a_registry_failure_loses_that_time_to_the_registry() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let [post, mut patch] = cut_upload(t0, 502, crate::protocol::BodyEnd::SinkDropped, 53_700_000);
        patch.upstream_error = Some(UpstreamErrorKind::Reset);
        t.finished(post);
        t.finished(patch);
        for r in upload(10, "team/app", at(6.2), "sha256:big", 200_000_000) {
            t.finished(r);
        }
        let manifest =
            br#"{"config":{"digest":"sha256:c","size":7},"layers":[{"digest":"sha256:big","size":200000000}]}"#;
        t.finished(manifest_put(20, "team/app", at(6.5), "v1", "sha256:m", manifest.to_vec()));
        let push = t.recent(1)[0].clone();
        assert_eq!(push.outcome, Outcome::Complete);
        let blob = push.blobs.iter().find(|b| b.digest.as_deref() == Some("sha256:big")).unwrap();
        assert_eq!((blob.outcome, blob.bytes), (BlobOutcome::Committed, 253_700_000));
        let attempts: Vec<_> = blob.attempts.iter().map(|a| (a.outcome, a.failed_by, a.bytes)).collect();
        assert_eq!(
            attempts,
            [
                (AttemptOutcome::Failed, Some(Culprit::Registry), 53_700_000),
                (AttemptOutcome::Succeeded, None, 200_000_000)
            ]
        );
        assert_eq!(push.wasted_bytes, 53_700_000);
        assert!(
            (push.lost.registry - 6.2).abs() < 1e-9,
            "from the failed attempt's start to the retry: {:?}",
            push.lost
        );
        assert!((push.parties.total() + push.lost.total() - push.wall_seconds).abs() < 1e-9);
    }

    /// A download the registry cut off, resumed with a range: one blob, its bytes all counted,
    /// the cut-off ones wasted.
    #[tokio::test(start_paused = true)]
    async fn a_resumed_download_joins_its_blob_as_the_next_attempt() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        t.finished(manifest_get(1, "team/app", at(0.0), "v1", "sha256:m", manifest_body("sha256:c", &["sha256:l"])));
        t.finished(blob_get(2, "team/app", at(0.1), "sha256:c", 7));
        let mut cut = blob_get(3, "team/app", at(0.1), "sha256:l", 40);
        cut.download = Some(BodyOutcome { end: crate::protocol::BodyEnd::SourceError, ..cut.download.unwrap() });
        t.finished(cut);
        t.sweep(Instant::now() + Duration::from_secs(5));
        assert!(t.recent(1).is_empty(), "a pull the registry cut off waits for the client's retry");
        t.finished(blob_get(4, "team/app", at(1.0), "sha256:l", 60));
        let pull = t.recent(1)[0].clone();
        assert_eq!(pull.outcome, Outcome::Complete);
        let blob = pull.blobs.iter().find(|b| b.digest.as_deref() == Some("sha256:l")).unwrap();
        assert_eq!((blob.outcome, blob.bytes, blob.attempts.len()), (BlobOutcome::Fetched, 100, 2));
        assert_eq!(blob.attempts[0].failed_by, Some(Culprit::Registry));
        assert_eq!(pull.wasted_bytes, 40);
        // From the cut-off fetch to the resumed one, less the config's fetch beside it.
        assert!((pull.lost.registry - 0.8).abs() < 1e-9, "{:?}", pull.lost);
    }

    /// A client that gave up mid-upload: its attempt failed by the client, nothing on the registry.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_gives_up_is_not_the_registrys_failure() {
        let t = tracker(TrackerConfig::default());
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let [post, patch] = cut_upload(t0, 400, crate::protocol::BodyEnd::SourceError, 1000);
        t.finished(post);
        t.finished(patch);
        t.sweep(at(200.0));
        let push = t.recent(1)[0].clone();
        let attempt = &push.blobs[0].attempts[0];
        assert_eq!((attempt.outcome, attempt.failed_by), (AttemptOutcome::Failed, Some(Culprit::Client)));
        assert_eq!(push.lost.registry, 0.0);
        assert!(push.lost.client > 1.0, "{:?}", push.lost);
    }
}
