//! Building a finished transfer from a closed session: its blobs, phases and shares.

use std::time::UNIX_EPOCH;

use super::attempts::AttemptOutcome;
use super::attempts::{
    download_attempts, is_fetch, lost_spans as lost_spans_of, retry_chains, upload_attempts, UploadTry,
};
use super::attribution::attribute_with;
use super::model::{Blob, BlobOutcome, Transfer};
use super::phases::UploadOutcome;
use super::phases::{is_upload_request, upload_outcome, upload_phases};
use super::session::{Key, Session};
use super::split::Split;
use super::timeline::RequestView;
use super::{HashMap, HashSet};
use crate::protocol::{Api, BlobKind, BlobRef, Operation};
use crate::protocol::{Outcome, TransferDirection};

/// Builds the finished transfer from a closed session.
pub(crate) fn build_transfer(key: &Key, s: Session, idle_closed: bool) -> Transfer {
    let mut requests: Vec<RequestView> = s.records.iter().map(|r| RequestView::new(r, s.base)).collect();
    requests.sort_by(|a, b| a.start.total_cmp(&b.start));
    let wall = requests.iter().map(|r| r.end).fold(0.0, f64::max);
    let outcome = s.outcome.unwrap_or(if s.failed || requests.iter().any(|r| r.aborted_by.is_some()) {
        Outcome::Failed
    } else {
        Outcome::Incomplete
    });
    let blobs = match key.direction {
        TransferDirection::Push => {
            let mut blobs = push_blobs(&requests, &s.expected, idle_closed);
            if outcome == Outcome::Complete && s.api == Api::V2 {
                add_present(&mut blobs, &s.expected);
            }
            blobs
        }
        TransferDirection::Pull => {
            let mut blobs = pull_blobs(&requests, &s.expected);
            if outcome == Outcome::Complete {
                add_present(&mut blobs, &s.expected);
            }
            blobs
        }
    };
    // Failed attempts, and the client's wait after each, are lost to whoever failed.
    let mut lost_spans = Vec::new();
    let mut failed_requests = HashSet::default();
    let mut wasted_bytes = 0;
    for attempt in blobs.iter().flat_map(|b| &b.attempts).filter(|a| a.outcome == AttemptOutcome::Failed) {
        failed_requests.extend(attempt.requests.iter().copied());
        wasted_bytes += attempt.bytes;
    }
    for blob in &blobs {
        lost_spans_of(&blob.attempts, &mut lost_spans);
    }
    let kept = requests.iter().filter(|r| !failed_requests.contains(&r.id));
    let (parties, lost) = attribute_with(kept, wall, &lost_spans);
    let bytes = requests
        .iter()
        .map(|r| match key.direction {
            TransferDirection::Push => r.bytes_in(),
            TransferDirection::Pull => r.bytes_out(),
        })
        .sum();
    // The session's clock was read when it opened; its base may be an earlier request (a token
    // request held for it, requests claimed from a pool) or a later one (an image claimed from a
    // pool opened before it), and every offset counts from the base.
    let started = if s.base <= s.created {
        s.started_wall.checked_sub(s.created - s.base).unwrap_or(s.started_wall)
    } else {
        s.started_wall + (s.base - s.created)
    };
    let started_ns = started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    Transfer {
        id: 0,
        direction: key.direction,
        outcome,
        api: s.api,
        repository: key.repository.to_string(),
        tag: s.tag,
        client: key.client.to_string(),
        started_unix_ms: (started_ns / 1_000_000) as u64,
        started_unix_ns: started_ns as u64,
        trace_id: None,
        wall_seconds: wall,
        parties,
        lost,
        wasted_bytes,
        bytes,
        blobs,
        requests,
        requests_dropped: s.dropped,
    }
}

/// A blob's 1-based position among the manifest's layers, so a layer has the same number in
/// the push and the pull of one image.
pub(crate) fn layer_number(expected: &[BlobRef], digest: Option<&str>) -> Option<usize> {
    let digest = digest?;
    let mut layers = expected.iter().filter(|b| b.kind == BlobKind::Layer);
    layers.position(|b| b.digest == digest).map(|i| i + 1)
}

pub(crate) fn kind_and_size(expected: &[BlobRef], digest: Option<&str>) -> (Option<BlobKind>, Option<u64>) {
    digest.and_then(|d| expected.iter().find(|b| b.digest == d)).map_or((None, None), |b| (Some(b.kind), b.size))
}

/// Push: one blob per upload (v2: by upload id; v1: by image id), in order of first request; a
/// v2 upload that failed before naming its blob joins the upload that retried it (see
/// `attempts`), as that blob's earlier attempt.
pub(crate) fn push_blobs(requests: &[RequestView], expected: &[BlobRef], idle_closed: bool) -> Vec<Blob> {
    let mut groups: Vec<(String, Vec<&RequestView>)> = Vec::new();
    for r in requests.iter().filter(|r| is_upload_request(r.operation)) {
        let group = match r.operation {
            Operation::V1ImageJsonPut | Operation::V1LayerPut | Operation::V1ChecksumPut => r.reference.clone(),
            // A mount that succeeded has no upload id: the digest names it.
            _ => r.upload_id.clone().or_else(|| r.digest.clone()),
        };
        let Some(group) = group else { continue };
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(r),
            None => groups.push((group, vec![r])),
        }
    }
    let digest_of = |group: &str, members: &[&RequestView]| {
        if members.iter().any(|r| r.operation.api() == Api::V1) {
            return Some(group.to_owned());
        }
        members
            .iter()
            .filter(|r| matches!(r.operation, Operation::UploadFinish | Operation::BlobMount))
            .find_map(|r| r.digest.clone())
    };
    let uploads: Vec<Upload> = groups
        .iter()
        .map(|(group, members)| {
            let digest = digest_of(group, members);
            let outcome = upload_outcome(members, idle_closed);
            Upload { members, size: kind_and_size(expected, digest.as_deref()).1, digest, outcome }
        })
        .collect();
    let tries: Vec<UploadTry> = uploads
        .iter()
        .map(|u| UploadTry {
            unnamed_failure: u.outcome == UploadOutcome::Failed && u.digest.is_none(),
            start: u.members.iter().map(|r| r.start).fold(f64::INFINITY, f64::min),
            end: u.members.iter().map(|r| r.end).fold(0.0, f64::max),
            moved: u.members.iter().map(|r| r.bytes_in()).sum(),
            size: u.size,
        })
        .collect();
    retry_chains(&tries)
        .into_iter()
        .map(|chain| {
            let (earlier, last) = chain.split_at(chain.len() - 1);
            let last = &uploads[last[0]];
            let phases = upload_phases(last.members);
            let digest = last.digest.clone();
            let all: Vec<&RequestView> = chain.iter().flat_map(|&i| uploads[i].members.iter().copied()).collect();
            let mut attempts = Vec::new();
            for &i in &chain {
                let committed = matches!(uploads[i].outcome, UploadOutcome::Committed | UploadOutcome::Mounted);
                upload_attempts(uploads[i].members, committed, &mut attempts);
            }
            Blob {
                kind: kind_and_size(expected, digest.as_deref()).0,
                declared_size: last.size,
                layer: layer_number(expected, digest.as_deref()),
                // The last upload's transfer phase, and what the failed ones before it moved.
                bytes: phases.bytes + earlier.iter().map(|&i| tries[i].moved).sum::<u64>(),
                outcome: last.outcome.into(),
                start: all.iter().map(|r| r.start).fold(f64::INFINITY, f64::min),
                end: all.iter().map(|r| r.end).fold(0.0, f64::max),
                split: phases.transfer_split,
                phases: Some(phases),
                metadata_seconds: 0.0,
                digest,
                requests: all.iter().map(|r| r.id).collect(),
                attempts,
            }
        })
        .collect()
}

/// One upload of a push: its requests, the blob its commit names, how it ended.
struct Upload<'a> {
    members: &'a [&'a RequestView],
    digest: Option<String>,
    size: Option<u64>,
    outcome: UploadOutcome,
}

/// Pull: one blob per fetched digest (v1: per image, json then layer).
pub(crate) fn pull_blobs(requests: &[RequestView], expected: &[BlobRef]) -> Vec<Blob> {
    let mut blobs: Vec<Blob> = Vec::new();
    for r in requests {
        let (id, is_metadata) = match r.operation {
            Operation::BlobGet | Operation::StorageGet => (r.digest.clone(), false),
            Operation::V1LayerGet => (r.reference.clone(), false),
            Operation::V1ImageJsonGet => (r.reference.clone(), true),
            _ => continue,
        };
        let Some(id) = id else { continue };
        let index = match blobs.iter().position(|b| b.digest.as_deref() == Some(id.as_str())) {
            Some(i) => i,
            None => {
                let (kind, declared_size) = kind_and_size(expected, Some(&id));
                blobs.push(Blob {
                    layer: layer_number(expected, Some(&id)),
                    digest: Some(id),
                    kind,
                    bytes: 0,
                    declared_size,
                    outcome: BlobOutcome::Failed,
                    start: r.start,
                    end: r.end,
                    phases: None,
                    metadata_seconds: 0.0,
                    split: Split::default(),
                    requests: Vec::new(),
                    attempts: Vec::new(),
                });
                blobs.len() - 1
            }
        };
        let blob = &mut blobs[index];
        blob.end = blob.end.max(r.end);
        blob.requests.push(r.id);
        if is_metadata {
            blob.metadata_seconds += r.duration();
            continue;
        }
        blob.bytes += r.bytes_out();
        blob.split.add(r.split());
        // A redirect delivers nothing itself: the storage GET it leads to does.
        if r.succeeded() && r.status.is_some_and(|c| (200..300).contains(&c)) {
            blob.outcome = BlobOutcome::Fetched;
        }
    }
    let by_id: HashMap<u64, &RequestView> = requests.iter().map(|r| (r.id, r)).collect();
    for blob in &mut blobs {
        let fetches: Vec<&RequestView> =
            blob.requests.iter().filter_map(|id| by_id.get(id).copied()).filter(|r| is_fetch(r.operation)).collect();
        blob.attempts = download_attempts(&fetches);
    }
    blobs
}

/// A complete transfer's blobs that its manifest names and it did not move: the other side had
/// them (a pull's client, a push's registry), or a concurrent transfer moved them.
fn add_present(blobs: &mut Vec<Blob>, expected: &[BlobRef]) {
    for blob in expected {
        if blobs.iter().any(|b| b.digest.as_deref() == Some(blob.digest.as_str())) {
            continue;
        }
        blobs.push(Blob {
            digest: Some(blob.digest.clone()),
            kind: Some(blob.kind),
            bytes: 0,
            declared_size: blob.size,
            layer: layer_number(expected, Some(&blob.digest)),
            outcome: BlobOutcome::Present,
            start: 0.0,
            end: 0.0,
            phases: None,
            metadata_seconds: 0.0,
            split: Split::default(),
            requests: Vec::new(),
            attempts: Vec::new(),
        });
    }
}
