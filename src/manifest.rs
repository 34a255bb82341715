//! What a pull will fetch: the blobs a manifest names, the child manifests an index names,
//! the images a v1 ancestry lists. Parsed from bodies captured while they streamed past.

use serde::Deserialize;

/// How much of a manifest body is kept for parsing. Real manifests are a few KiB; OCI
/// recommends registries accept at least 4 MiB.
pub const CAPTURE_LIMIT: usize = 4 * 1024 * 1024;

/// The references a manifest-like body carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestRefs {
    /// Blobs to fetch: the config first, then the layers, with their declared sizes.
    pub blobs: Vec<BlobRef>,
    /// Child manifests (an index or manifest list): each is fetched by digest.
    pub manifests: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
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
pub fn parse_manifest(body: &[u8]) -> Option<ManifestRefs> {
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

/// Parses a v1 ancestry (`["<top id>", …, "<base id>"]`) into image ids, base first.
pub fn parse_ancestry(body: &[u8]) -> Option<Vec<String>> {
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

    #[test]
    fn ancestry() {
        assert_eq!(parse_ancestry(br#"["top","base"]"#).unwrap(), ["base", "top"]);
        assert_eq!(parse_ancestry(b"{}"), None);
    }
}
