//! skopeo (containers/image, the other client family) copies an image into the registry through
//! regscope and back out again, byte for byte.

mod support;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{sha256_digest, sha256_file, skopeo, Registry, Regscope, TempDir, TestImage};

#[test]
fn skopeo_copy_through_regscope_round_trips_the_image() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let image = TestImage::build("regscope-test/skopeo:v1", &[2 << 20, 9 << 20]);
    let through_proxy = format!("docker://{}/regscope-test/skopeo:v1", regscope.proxy_addr());
    let direct = format!("docker://{}/regscope-test/skopeo:v1", registry.addr());
    let work = TempDir::new("skopeo");
    let digest_file = work.path().join("digest");

    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--digestfile",
        digest_file.to_str().unwrap(),
        &image.skopeo_source(),
        &through_proxy,
    ]);
    let pushed = std::fs::read_to_string(&digest_file).unwrap().trim().to_string();

    // The registry holds that manifest, whether asked through regscope or directly.
    assert_eq!(inspect_digest(&through_proxy), pushed);
    assert_eq!(inspect_digest(&direct), pushed);

    let out = work.path().join("out");
    skopeo(&["copy", "--quiet", "--src-tls-verify=false", &through_proxy, &format!("dir:{}", out.display())]);

    assert_eq!(sha256_file(&out.join("manifest.json")), pushed, "manifest bytes changed on the way back");
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["config"]["digest"], image.image_id.as_str());
    assert_eq!(sha256_file(&blob_path(&out, &image.image_id)), image.image_id, "config blob corrupted");
    let layers = manifest["layers"].as_array().expect("manifest has layers");
    assert_eq!(layers.len(), image.layers.len());
    for (descriptor, expected) in layers.iter().zip(&image.layers) {
        let digest = descriptor["digest"].as_str().unwrap();
        let blob = blob_path(&out, digest);
        assert_eq!(sha256_file(&blob), digest, "layer blob corrupted");
        assert_eq!(std::fs::metadata(&blob).unwrap().len(), descriptor["size"].as_u64().unwrap());
        assert_eq!(uncompressed_digest(&blob), expected.diff_id, "layer content differs from what was pushed");
    }
}

/// The manifest digest `skopeo inspect` reports for `image`.
fn inspect_digest(image: &str) -> String {
    let inspected: Value = serde_json::from_str(&skopeo(&["inspect", "--tls-verify=false", image])).unwrap();
    inspected["Digest"].as_str().expect("inspect output has a Digest").to_string()
}

/// Where a `dir:` layout keeps the blob with `digest`.
fn blob_path(dir: &Path, digest: &str) -> std::path::PathBuf {
    dir.join(digest.trim_start_matches("sha256:"))
}

/// The diff ID of a layer blob: skopeo gzips layers on push, so hash what `gzip -dc` gives back.
fn uncompressed_digest(blob: &Path) -> String {
    let mut magic = [0u8; 2];
    std::io::Read::read_exact(&mut File::open(blob).unwrap(), &mut magic).unwrap();
    if magic != [0x1f, 0x8b] {
        return sha256_file(blob);
    }
    let mut gzip = Command::new("gzip").arg("-dc").arg(blob).stdout(Stdio::piped()).spawn().expect("spawn gzip");
    let digest = sha256_digest(gzip.stdout.take().unwrap());
    assert!(gzip.wait().unwrap().success(), "gzip -dc {} failed", blob.display());
    digest
}
