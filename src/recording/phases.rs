//! Upload phases, v1 and v2 in one vocabulary.
//!
//! | phase    | v2                                   | v1                |
//! |----------|--------------------------------------|-------------------|
//! | start    | `POST …/blobs/uploads/` (or a mount) | `PUT …/json`      |
//! | transfer | `PATCH` bodies, or a body-carrying `PUT` | `PUT …/layer` |
//! | commit   | `PUT …?digest=` (after its body)     | `PUT …/checksum`  |
//! | gap      | time between those requests: nothing of this upload on the wire (the client working) |
//! | total    | first request in to last response out |

use serde::{Deserialize, Serialize};

use crate::protocol::{Operation, Phase};
use crate::recording::{RequestView, Split};

/// How one upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum UploadOutcome {
    /// The registry accepted the blob (v2 finish 2xx) or image (v1 checksum 2xx).
    Committed,
    /// A cross-repository mount: the registry already had it, no bytes moved.
    Mounted,
    /// The client cancelled it (`DELETE`).
    Cancelled,
    /// A request failed or was cut off, and it never committed.
    Failed,
    /// It stopped without an end: closed after the idle timeout.
    Abandoned,
}

/// One upload's phases, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UploadPhases {
    pub start: f64,
    pub transfer: f64,
    pub commit: f64,
    pub gap: f64,
    pub total: f64,
    /// The transfer phase split: waiting on the client, on the registry, bytes moving.
    pub transfer_split: Split,
    /// Bytes carried by the transfer phase.
    pub bytes: u64,
}

impl UploadPhases {
    pub fn get(&self, phase: Phase) -> f64 {
        match phase {
            Phase::Start => self.start,
            Phase::Transfer => self.transfer,
            Phase::Commit => self.commit,
            Phase::Gap => self.gap,
            Phase::Total => self.total,
        }
    }
}

/// What a request does for an upload.
fn role(op: Operation) -> Option<Phase> {
    use Operation::*;
    match op {
        UploadStart | UploadStartMonolithic | BlobMount | V1ImageJsonPut => Some(Phase::Start),
        UploadChunk | V1LayerPut => Some(Phase::Transfer),
        UploadFinish | V1ChecksumPut | UploadCancel => Some(Phase::Commit),
        _ => None,
    }
}

/// Whether a request belongs to an upload at all.
pub(super) fn is_upload_request(op: Operation) -> bool {
    role(op).is_some() || op == Operation::UploadStatus
}

/// One upload's phases as they happened, for drawing them: each start, transfer and commit request
/// (a commit that carries the blob is its transfer up to its last byte, as in `upload_phases`), and
/// every gap where none of its requests was on the wire. The pieces of a phase add up to it.
pub(crate) fn upload_pieces(requests: &[&RequestView]) -> Vec<(Phase, f64, f64)> {
    let mut requests = requests.to_vec();
    requests.sort_by(|a, b| a.start.total_cmp(&b.start));
    let mut pieces = Vec::new();
    let mut covered = requests.first().map_or(0.0, |r| r.start);
    for r in requests {
        if r.start > covered {
            pieces.push((Phase::Gap, covered, r.start));
        }
        covered = covered.max(r.end);
        match role(r.operation) {
            Some(Phase::Commit) => match r.upload.as_ref().filter(|b| b.bytes > 0) {
                Some(body) => {
                    let split = body.end.clamp(r.start, r.end);
                    pieces.push((Phase::Transfer, r.start, split));
                    pieces.push((Phase::Commit, split, r.end));
                }
                None => pieces.push((Phase::Commit, r.start, r.end)),
            },
            Some(phase) => pieces.push((phase, r.start, r.end)),
            None => {}
        }
    }
    pieces
}

/// Computes the phases of one upload from its requests (in any order).
pub(super) fn upload_phases(requests: &[&RequestView]) -> UploadPhases {
    let mut p = UploadPhases::default();
    let (Some(first), Some(last)) = (
        requests.iter().map(|r| r.start).min_by(f64::total_cmp),
        requests.iter().map(|r| r.end).max_by(f64::total_cmp),
    ) else {
        return p;
    };
    p.total = last - first;
    for r in requests {
        match role(r.operation) {
            Some(Phase::Start) => p.start += r.duration(),
            Some(Phase::Transfer) => {
                p.transfer += r.duration();
                add_body_split(&mut p, r, r.duration());
            }
            Some(Phase::Commit) => match &r.upload {
                // A finishing PUT that carries the blob (containerd, monolithic): its body is
                // the transfer, what follows the last byte is the commit.
                Some(body) if body.bytes > 0 => {
                    let transfer = (body.end - r.start).max(0.0);
                    p.transfer += transfer;
                    p.commit += (r.duration() - transfer).max(0.0);
                    add_body_split(&mut p, r, transfer);
                }
                _ => p.commit += r.duration(),
            },
            _ => {}
        }
    }
    // The time no request was on the wire: the gaps `upload_pieces` draws, so the report and the
    // trace agree by construction. A request's end can be recorded just after the client sent
    // the next one; the pieces count such overlaps once.
    p.gap =
        upload_pieces(requests).into_iter().filter(|piece| piece.0 == Phase::Gap).map(|(_, from, to)| to - from).sum();
    p
}

/// Adds a transfer-carrying request's split: body waits by side, registry processing, and
/// the rest of `span` as bytes moving.
fn add_body_split(p: &mut UploadPhases, r: &RequestView, span: f64) {
    let mut split = Split::default();
    if let Some(body) = &r.upload {
        p.bytes += body.bytes;
        let s = body.split();
        split.client = s.client;
        split.registry = s.registry;
    }
    if r.operation != Operation::UploadFinish {
        split.registry += r.registry_processing();
    }
    split.moving = (span - split.client - split.registry).max(0.0);
    p.transfer_split.add(split);
}

/// How an upload ended, judged from its requests.
pub(super) fn upload_outcome(requests: &[&RequestView], idle_closed: bool) -> UploadOutcome {
    use Operation::*;
    let ok = |op: Operation| requests.iter().any(|r| r.operation == op && r.succeeded());
    if ok(UploadFinish) || ok(V1ChecksumPut) {
        return UploadOutcome::Committed;
    }
    if requests.iter().any(|r| r.operation == BlobMount && r.status == Some(201)) {
        return UploadOutcome::Mounted;
    }
    if ok(UploadCancel) {
        return UploadOutcome::Cancelled;
    }
    let failed = requests.iter().any(|r| r.aborted_by.is_some() || r.status.is_none_or(|s| s >= 400));
    if failed {
        return UploadOutcome::Failed;
    }
    if idle_closed {
        UploadOutcome::Abandoned
    } else {
        UploadOutcome::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::BodyEnd;
    use crate::recording::BodyView;

    fn req(op: Operation, start: f64, end: f64, status: u16) -> RequestView {
        RequestView {
            id: 0,
            method: "X".into(),
            operation: op,
            status: Some(status),
            digest: None,
            reference: None,
            upload_id: None,
            start,
            forwarded: Some(start),
            response_head: Some(end),
            end,
            upload: None,
            download: None,
            aborted_by: None,
            upstream_error: None,
            trace: None,
        }
    }

    fn with_body(mut r: RequestView, bytes: u64, end: f64, client_wait: f64) -> RequestView {
        r.upload =
            Some(BodyView { bytes, start: r.start, end, client_wait, registry_wait: 0.0, outcome: BodyEnd::Complete });
        r
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn docker_style_post_patch_put() {
        let post = req(Operation::UploadStart, 0.0, 0.1, 202);
        let patch = with_body(req(Operation::UploadChunk, 0.5, 10.5, 202), 1000, 10.3, 8.0);
        let put = req(Operation::UploadFinish, 11.0, 11.4, 201);
        let p = upload_phases(&[&post, &patch, &put]);
        assert!(close(p.start, 0.1) && close(p.transfer, 10.0) && close(p.commit, 0.4), "{p:?}");
        assert!(close(p.total, 11.4) && close(p.gap, 0.9), "{p:?}");
        assert_eq!(p.bytes, 1000);
        // 8 s client stall, 0.2 s registry processing after the body, the rest moving.
        let s = p.transfer_split;
        assert!(close(s.client, 8.0) && close(s.registry, 0.2) && close(s.moving, 1.8), "{s:?}");
        assert_eq!(upload_outcome(&[&post, &patch, &put], false), UploadOutcome::Committed);
    }

    /// The report's gap is the pieces' gaps summed, also when one request's recorded end falls
    /// after the next one's start (its response seen out only once the next request was read).
    #[test]
    fn the_gap_is_the_time_no_request_was_on_the_wire() {
        // (POST end, PATCH start, PATCH end, PUT start) -> gap
        for ((post_end, patch_start, patch_end, put_start), gap) in [
            ((0.1, 0.5, 10.5, 11.0), 0.9),
            ((0.6, 0.5, 10.5, 11.0), 0.5),
            ((0.6, 0.5, 11.2, 11.0), 0.0),
            ((0.1, 0.1, 10.5, 10.5), 0.0),
        ] {
            let post = req(Operation::UploadStart, 0.0, post_end, 202);
            let patch = req(Operation::UploadChunk, patch_start, patch_end, 202);
            let put = req(Operation::UploadFinish, put_start, 11.4, 201);
            let p = upload_phases(&[&put, &post, &patch]);
            let pieces: f64 = upload_pieces(&[&post, &patch, &put])
                .into_iter()
                .filter(|piece| piece.0 == Phase::Gap)
                .map(|(_, from, to)| to - from)
                .sum();
            assert!(close(p.gap, gap) && close(pieces, gap), "{post_end} {patch_start}: {p:?}, pieces {pieces}");
        }
    }

    #[test]
    fn containerd_style_put_carries_the_blob() {
        let post = req(Operation::UploadStart, 0.0, 0.1, 202);
        let put = with_body(req(Operation::UploadFinish, 0.2, 5.2, 201), 500, 4.2, 1.0);
        let p = upload_phases(&[&post, &put]);
        assert!(close(p.transfer, 4.0) && close(p.commit, 1.0) && close(p.gap, 0.1), "{p:?}");
        assert!(close(p.transfer_split.client, 1.0) && close(p.transfer_split.moving, 3.0));
    }

    #[test]
    fn v1_json_layer_checksum() {
        let json = req(Operation::V1ImageJsonPut, 0.0, 3.0, 200);
        let layer = with_body(req(Operation::V1LayerPut, 3.0, 37.0, 200), 37_000_000, 37.0, 30.0);
        let checksum = req(Operation::V1ChecksumPut, 37.5, 38.0, 200);
        let p = upload_phases(&[&json, &layer, &checksum]);
        assert!(close(p.start, 3.0) && close(p.transfer, 34.0) && close(p.commit, 0.5) && close(p.gap, 0.5));
    }

    #[test]
    fn outcomes() {
        let mount = req(Operation::BlobMount, 0.0, 0.1, 201);
        assert_eq!(upload_outcome(&[&mount], false), UploadOutcome::Mounted);
        let fallback = req(Operation::BlobMount, 0.0, 0.1, 202);
        let cancel = req(Operation::UploadCancel, 0.2, 0.3, 204);
        assert_eq!(upload_outcome(&[&fallback, &cancel], false), UploadOutcome::Cancelled);
        let post = req(Operation::UploadStart, 0.0, 0.1, 202);
        assert_eq!(upload_outcome(&[&post], true), UploadOutcome::Abandoned);
        let mut cut = req(Operation::UploadChunk, 0.2, 0.3, 0);
        cut.status = None;
        cut.aborted_by = Some(crate::protocol::Side::Client);
        assert_eq!(upload_outcome(&[&post, &cut], true), UploadOutcome::Failed);
    }
}
