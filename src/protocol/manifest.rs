//! What a pull will fetch: the blobs a manifest names, the child manifests an index names,
//! the images a v1 ancestry lists. Parsed from bodies captured while they streamed past.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

/// How much of a manifest body is kept for parsing. Real manifests are a few KiB; OCI
/// recommends registries accept at least 4 MiB.
pub(crate) const CAPTURE_LIMIT: usize = 4 * 1024 * 1024;

/// The references a manifest-like body carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ManifestRefs {
    /// Blobs to fetch: the config first, then the layers, with their declared sizes.
    pub blobs: Vec<BlobRef>,
    /// Child manifests (an index or manifest list): each is fetched by digest.
    pub manifests: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobRef {
    pub digest: String,
    pub size: Option<u64>,
    pub kind: BlobKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobKind {
    Config,
    Layer,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: Option<u64>,
}

/// Covers image manifests (Docker schema2, OCI), indexes and manifest lists, and the legacy
/// schema1 (`fsLayers` with `blobSum`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    fs_layers: Vec<Schema1Layer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Schema1Layer {
    blob_sum: String,
}

/// Parses a manifest or index. `None` if the body is not one.
pub(super) fn parse_manifest(body: &[u8]) -> Option<ManifestRefs> {
    let m: AnyManifest = serde_json::from_slice(body).ok()?;
    let mut refs = ManifestRefs::default();
    if let Some(config) = m.config {
        refs.blobs.push(BlobRef { digest: config.digest, size: config.size, kind: BlobKind::Config });
    }
    for layer in m.layers {
        refs.blobs.push(BlobRef { digest: layer.digest, size: layer.size, kind: BlobKind::Layer });
    }
    // schema1 lists layers top-down, often repeating the empty layer: keep each once.
    for layer in m.fs_layers.into_iter().rev() {
        if !refs.blobs.iter().any(|b| b.digest == layer.blob_sum) {
            refs.blobs.push(BlobRef { digest: layer.blob_sum, size: None, kind: BlobKind::Layer });
        }
    }
    refs.manifests = m.manifests.into_iter().map(|d| d.digest).collect();
    (!refs.blobs.is_empty() || !refs.manifests.is_empty()).then_some(refs)
}

/// Manifests recently parsed, keyed by their exact bytes.
///
/// Clients poll the same tag and fleets pull the same image: parsing each fetched manifest's JSON
/// again was a tenth of a manifest GET's CPU. The key is the body itself, not the digest the
/// registry names, so a hit is the same input by construction. Bounded in entries and in the
/// size of a body kept (larger ones are parsed every time).
pub(crate) struct ParsedManifests {
    recent: Mutex<VecDeque<Parsed>>,
}

/// A body as captured, and what it parsed to (`None`: not a manifest).
type Parsed = (Box<[u8]>, Option<Arc<ManifestRefs>>);

impl ParsedManifests {
    /// Bodies kept: far more manifests than one pull (an index and its images) fetches.
    pub(crate) const ENTRIES: usize = 32;
    /// Largest body kept: an image manifest with a hundred layers is about 20 KiB.
    pub(crate) const BODY_MAX: usize = 32 * 1024;

    pub(crate) fn new() -> Self {
        ParsedManifests { recent: Mutex::new(VecDeque::with_capacity(Self::ENTRIES)) }
    }

    /// What `parse_manifest` says of `body`, from the cache when the same bytes were parsed
    /// lately. Takes the body so a miss keeps it without a copy.
    pub(crate) fn parse(&self, body: Vec<u8>) -> Option<Arc<ManifestRefs>> {
        if body.len() > Self::BODY_MAX {
            return parse_manifest(&body).map(Arc::new);
        }
        if let Some((_, refs)) = self.lock().iter().find(|(kept, _)| **kept == *body) {
            return refs.clone();
        }
        // Parsed outside the lock: a large body must not hold up other requests.
        let refs = parse_manifest(&body).map(Arc::new);
        let mut recent = self.lock();
        if recent.len() >= Self::ENTRIES {
            recent.pop_front();
        }
        recent.push_back((body.into_boxed_slice(), refs.clone()));
        refs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Parsed>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for ParsedManifests {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses a v1 ancestry (`["<top id>", …, "<base id>"]`) into image ids, base first.
pub(crate) fn parse_ancestry(body: &[u8]) -> Option<Vec<String>> {
    let mut ids: Vec<String> = serde_json::from_slice(body).ok()?;
    ids.reverse();
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_schema2() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
          "config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":1470,"digest":"sha256:c"},
          "layers":[{"mediaType":"x","size":100,"digest":"sha256:l1"},{"mediaType":"x","size":200,"digest":"sha256:l2"}]}"#;
        let refs = parse_manifest(body).unwrap();
        let digests: Vec<_> = refs.blobs.iter().map(|b| (b.digest.as_str(), b.size, b.kind)).collect();
        assert_eq!(
            digests,
            [
                ("sha256:c", Some(1470), BlobKind::Config),
                ("sha256:l1", Some(100), BlobKind::Layer),
                ("sha256:l2", Some(200), BlobKind::Layer)
            ]
        );
        assert!(refs.manifests.is_empty());
    }

    #[test]
    fn oci_index() {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
          "manifests":[{"digest":"sha256:amd","size":1,"platform":{"os":"linux"}},{"digest":"sha256:arm","size":2}]}"#;
        let refs = parse_manifest(body).unwrap();
        assert_eq!(refs.manifests, ["sha256:amd", "sha256:arm"]);
        assert!(refs.blobs.is_empty());
    }

    #[test]
    fn schema1_dedups_and_orders_base_first() {
        let body = br#"{"schemaVersion":1,"fsLayers":[{"blobSum":"sha256:top"},{"blobSum":"sha256:e"},{"blobSum":"sha256:e"}]}"#;
        let refs = parse_manifest(body).unwrap();
        let digests: Vec<_> = refs.blobs.iter().map(|b| b.digest.as_str()).collect();
        assert_eq!(digests, ["sha256:e", "sha256:top"]);
    }

    #[test]
    fn not_manifests() {
        for body in [&b""[..], b"{}", b"[1,2]", b"{\"errors\":[]}", b"\xff\xfe"] {
            assert_eq!(parse_manifest(body), None);
        }
    }

    fn image(layer: &str) -> Vec<u8> {
        format!(r#"{{"schemaVersion":2,"config":{{"digest":"sha256:c","size":2}},"layers":[{{"digest":"{layer}"}}]}}"#)
            .into_bytes()
    }

    #[test]
    fn parsed_manifests_answer_the_same_bytes_from_the_cache() {
        let cache = ParsedManifests::new();
        let first = cache.parse(image("sha256:a")).unwrap();
        let again = cache.parse(image("sha256:a")).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the same bytes are parsed once");
        let other = cache.parse(image("sha256:b")).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other.blobs[1].digest, "sha256:b");
        // A prefix of a kept body is a different body.
        let mut cut = image("sha256:a");
        cut.pop();
        assert_eq!(cache.parse(cut), None);
        assert_eq!(cache.parse(b"{}".to_vec()), None);
        assert_eq!(cache.parse(b"{}".to_vec()), None, "a non-manifest stays one from the cache");
    }

    #[test]
    fn parsed_manifests_are_bounded() {
        let cache = ParsedManifests::new();
        let first = cache.parse(image("sha256:0")).unwrap();
        for i in 1..=ParsedManifests::ENTRIES {
            cache.parse(image(&format!("sha256:{i}"))).unwrap();
        }
        assert_eq!(cache.lock().len(), ParsedManifests::ENTRIES);
        let again = cache.parse(image("sha256:0")).unwrap();
        assert!(!Arc::ptr_eq(&first, &again), "the oldest was dropped and parsed anew");
        assert_eq!(*first, *again);

        // Beyond the size kept: parsed, right, not kept.
        let mut big = image("sha256:big");
        big.splice(1..1, std::iter::repeat_n(b' ', ParsedManifests::BODY_MAX));
        let before = cache.lock().len();
        assert_eq!(cache.parse(big).unwrap().blobs[1].digest, "sha256:big");
        assert_eq!(cache.lock().len(), before);
        assert!(cache.lock().iter().all(|(kept, _)| kept.len() <= ParsedManifests::BODY_MAX));
    }

    #[test]
    fn ancestry() {
        assert_eq!(parse_ancestry(br#"["top","base"]"#).unwrap(), ["base", "top"]);
        assert_eq!(parse_ancestry(b"{}"), None);
    }
}
