//! Manifests regscope has seen pushed or fetched, by digest: what a pull will fetch when its
//! client asks only `HEAD` (it holds the manifest already) and then fetches blobs.

use std::collections::VecDeque;
use std::sync::Arc;

use super::HashMap;
use crate::body::ExchangeRecord;
use crate::protocol::ManifestRefs;

/// A bounded map from manifest digest to what the manifest names. The oldest go first, so that
/// neither the number of manifests nor the references they hold in total can grow without bound.
#[derive(Default)]
pub(crate) struct KnownManifests {
    by_digest: HashMap<Box<str>, Arc<ManifestRefs>>,
    /// Digests, oldest first.
    order: VecDeque<Box<str>>,
    /// Blob and child references held, against [`KnownManifests::MAX_REFS`].
    refs: usize,
}

impl KnownManifests {
    /// References kept in all: thousands of images' worth, a few MiB at most.
    pub(crate) const MAX_REFS: usize = 32 * 1024;

    /// Remembers `refs` as what the manifest `digest` names.
    pub(crate) fn remember(&mut self, digest: &str, refs: Arc<ManifestRefs>) {
        let size = weight(&refs);
        if size > Self::MAX_REFS || self.by_digest.contains_key(digest) {
            return;
        }
        while self.refs + size > Self::MAX_REFS {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(gone) = self.by_digest.remove(&oldest) {
                self.refs -= weight(&gone);
            }
        }
        self.refs += size;
        self.order.push_back(digest.into());
        self.by_digest.insert(digest.into(), refs);
    }

    pub(crate) fn get(&self, digest: &str) -> Option<&Arc<ManifestRefs>> {
        self.by_digest.get(digest)
    }
}

/// What one manifest costs the map: its references, and one for itself.
fn weight(refs: &ManifestRefs) -> usize {
    1 + refs.blobs.len() + refs.manifests.len()
}

/// The digest of the manifest a request pushed, fetched or asked about: the registry's
/// `Docker-Content-Digest`, or the reference when the request named a digest.
pub(crate) fn manifest_digest(r: &ExchangeRecord) -> Option<&str> {
    r.response_info.content_digest.as_deref().or(r.reference.as_deref().filter(|reference| reference.contains(':')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BlobKind, BlobRef};

    fn manifest(blobs: usize) -> Arc<ManifestRefs> {
        let blob = |i| BlobRef { digest: format!("sha256:{i}"), size: Some(1), kind: BlobKind::Layer };
        Arc::new(ManifestRefs { blobs: (0..blobs).map(blob).collect(), manifests: Vec::new() })
    }

    #[test]
    fn the_oldest_manifests_make_room_and_the_total_stays_bounded() {
        let mut known = KnownManifests::default();
        for i in 0..10_000 {
            known.remember(&format!("sha256:m{i}"), manifest(9));
        }
        assert!(known.refs <= KnownManifests::MAX_REFS, "{}", known.refs);
        assert_eq!(known.by_digest.len(), known.order.len());
        assert!(known.get("sha256:m9999").is_some());
        assert!(known.get("sha256:m0").is_none());
        known.remember("sha256:huge", manifest(KnownManifests::MAX_REFS));
        assert!(known.get("sha256:huge").is_none(), "a manifest larger than the whole map is not kept");
    }
}
