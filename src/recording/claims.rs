//! Which of a pool's requests a manifest claims for its image.
//!
//! Requests that no manifest names yet wait in a pool per (client, repository, direction). A
//! manifest takes from it the requests of the blobs it names, found by digest: a `HEAD`'s path, a
//! mount's `mount=`, a commit's `?digest=`, and every request of the upload that commit ended. It
//! also takes what belongs to no blob (token requests, challenges) and uploads that died before
//! naming their blob, since they were part of whichever image came next. An upload still going
//! and the blobs of other images stay in the pool for their own manifest.

use super::session::request_failed;
use super::HashMap;
use crate::body::ExchangeRecord;
use crate::protocol::Operation;

/// The upload a request belongs to: its path names it, or (a `POST`) its answer's `Location`.
pub(crate) fn upload_of(r: &ExchangeRecord) -> Option<&str> {
    r.upload_id.as_deref().or(r.response_info.upload_uuid.as_deref())
}

/// What a pool's requests say of one upload.
#[derive(Default)]
struct Upload<'a> {
    /// The digest its commit (or monolithic start, or mount) names.
    named: Option<&'a str>,
    committed: bool,
    /// Cancelled, or a request of it failed: it cannot go on.
    dead: bool,
}

/// Push: for each of `records`, whether the manifest naming the blobs `wants` accepts claims it.
/// Of several uploads that committed one digest, it claims the first: the others were another
/// image's (two clients pushing the same layer), left for that image's manifest.
pub(crate) fn push_claims(records: &[ExchangeRecord], wants: impl Fn(&str) -> bool) -> Vec<bool> {
    let mut uploads: HashMap<&str, Upload<'_>> = HashMap::default();
    // The first upload that committed each digest, in the order requests finished.
    let mut first_commit: HashMap<&str, &str> = HashMap::default();
    for r in records {
        let Some(id) = upload_of(r) else { continue };
        let upload = uploads.entry(id).or_default();
        upload.dead |= r.operation == Operation::UploadCancel || request_failed(r);
        if matches!(r.operation, Operation::UploadFinish | Operation::UploadStartMonolithic | Operation::BlobMount) {
            if let Some(digest) = r.digest.as_deref() {
                upload.named = Some(digest);
                if !request_failed(r) {
                    upload.committed = true;
                    first_commit.entry(digest).or_insert(id);
                }
            }
        }
    }
    records
        .iter()
        .map(|r| match upload_of(r) {
            Some(id) => match &uploads[id] {
                Upload { named: Some(digest), committed, .. } => {
                    wants(digest) && (!committed || first_commit.get(digest) == Some(&id))
                }
                Upload { dead, .. } => *dead,
            },
            // A `HEAD`, a mount the registry did at once, or what belongs to no blob.
            None => r.digest.as_deref().is_none_or(&wants),
        })
        .collect()
}

/// Pull: everything but other blobs' fetches (a pull's pool holds its token requests, challenges
/// and probes, made before the manifest that opens the image was resolved).
pub(crate) fn pull_claims(records: &[ExchangeRecord], wants: impl Fn(&str) -> bool) -> Vec<bool> {
    records
        .iter()
        .map(|r| match (r.operation, r.digest.as_deref()) {
            (Operation::BlobGet | Operation::StorageGet | Operation::StorageHead, Some(digest)) => wants(digest),
            _ => true,
        })
        .collect()
}

/// Moves the records `claims` marks out of `records`, keeping the order of both.
pub(crate) fn take(records: &mut Vec<ExchangeRecord>, claims: &[bool]) -> Vec<ExchangeRecord> {
    let mut kept = Vec::with_capacity(records.len());
    let mut taken = Vec::new();
    for (record, &claimed) in std::mem::take(records).into_iter().zip(claims) {
        if claimed {
            taken.push(record);
        } else {
            kept.push(record);
        }
    }
    *records = kept;
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::tests::record;

    fn op(id: u64, operation: Operation, digest: Option<&str>, upload: Option<&str>, status: u16) -> ExchangeRecord {
        let mut r = record(id, operation, "team/app", tokio::time::Instant::now(), 0.01, status);
        r.digest = digest.map(Box::from);
        match operation {
            Operation::UploadStart | Operation::UploadStartMonolithic | Operation::BlobMount => {
                r.response_info.upload_uuid = upload.map(Box::from)
            }
            _ => r.upload_id = upload.map(Box::from),
        }
        r
    }

    #[test]
    fn a_push_manifest_claims_its_blobs_and_what_belongs_to_none() {
        use Operation::*;
        let records = vec![
            op(1, AuthToken, None, None, 200),
            op(2, BlobHead, Some("sha256:a"), None, 404),
            op(3, UploadStart, None, Some("u-a"), 202),
            op(4, UploadChunk, None, Some("u-a"), 202),
            op(5, UploadFinish, Some("sha256:a"), Some("u-a"), 201),
            // Another image's layer, committed.
            op(6, BlobHead, Some("sha256:b"), None, 404),
            op(7, UploadStart, None, Some("u-b"), 202),
            op(8, UploadFinish, Some("sha256:b"), Some("u-b"), 201),
            // Another image's layer, still uploading: stays.
            op(9, UploadStart, None, Some("u-c"), 202),
            // An upload the registry cut off before it named its blob: claimed with the next image.
            op(10, UploadStart, None, Some("u-d"), 202),
            op(11, UploadChunk, None, Some("u-d"), 502),
            // A mount of a wanted blob, a challenge, a cancelled upload.
            op(12, BlobMount, Some("sha256:m"), None, 201),
            op(13, UploadStart, None, None, 401),
            op(14, UploadStart, None, Some("u-e"), 202),
            op(15, UploadCancel, None, Some("u-e"), 204),
            // A second upload of a wanted digest: another client's, for another image.
            op(16, UploadStart, None, Some("u-a2"), 202),
            op(17, UploadFinish, Some("sha256:a"), Some("u-a2"), 201),
            // A commit the registry refused, then its retry: both this image's.
            op(18, UploadStart, None, Some("u-m1"), 202),
            op(19, UploadFinish, Some("sha256:m"), Some("u-m1"), 400),
        ];
        let wants = |d: &str| ["sha256:a", "sha256:m"].contains(&d);
        let claims = push_claims(&records, wants);
        let claimed: Vec<u64> = records.iter().zip(&claims).filter(|(_, &c)| c).map(|(r, _)| r.id).collect();
        assert_eq!(claimed, [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 18, 19]);
    }

    #[test]
    fn a_pull_manifest_leaves_other_images_fetches() {
        use Operation::*;
        let records = vec![
            op(1, AuthToken, None, None, 200),
            op(2, ManifestGet, None, None, 401),
            op(3, BlobGet, Some("sha256:a"), None, 200),
            op(4, StorageGet, Some("sha256:b"), None, 200),
            op(5, BlobGet, Some("sha256:c"), None, 307),
        ];
        let claims = pull_claims(&records, |d| d != "sha256:b");
        assert_eq!(claims, [true, true, true, false, true]);
    }

    #[test]
    fn taking_keeps_both_orders() {
        let mut records: Vec<ExchangeRecord> = (1..=5).map(|i| op(i, Operation::BlobHead, None, None, 200)).collect();
        let taken = take(&mut records, &[true, false, true, false, false]);
        let ids = |v: &[ExchangeRecord]| v.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!((ids(&taken), ids(&records)), (vec![1, 3], vec![2, 4, 5]));
    }
}
