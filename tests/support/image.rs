//! Test images of random bytes, written as a docker-archive tarball (what `docker save` writes),
//! which both `docker load` and skopeo's `docker-archive:` transport read.
//!
//! Random layers cannot be compressed, so the bytes on the wire are the bytes asked for; and no two
//! images share a layer, so a pull never finds one already present in the shared daemon, unless a
//! test builds one on another with [`TestImage::extend`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::process::TempDir;

/// One layer as written into the archive.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    /// Random payload bytes: the size of the single file the layer holds.
    pub data_len: u64,
    /// Length of the uncompressed layer tar (payload plus tar headers and padding).
    pub tar_len: u64,
    /// `sha256:` of the uncompressed layer tar, as the config's `rootfs.diff_ids` lists it.
    pub diff_id: String,
}

/// A docker-archive on disk, removed on drop.
pub struct TestImage {
    /// The archive: pass it to `docker load` or as `docker-archive:PATH`.
    pub archive: PathBuf,
    /// The tag the archive names (`RepoTags`), so `docker load` tags it as given.
    pub reference: String,
    /// `sha256:` of the config JSON: the image ID docker reports, before a push and after a pull.
    pub image_id: String,
    pub layers: Vec<LayerInfo>,
    /// Each layer's tar, kept for images built on this one.
    layer_files: Vec<PathBuf>,
    /// Keeps the archive alive.
    _dir: TempDir,
}

impl TestImage {
    /// Writes an image tagged `reference` with one layer per entry of `layer_sizes` (payload bytes
    /// each, at least one layer). Streams to disk, so sizes of hundreds of MiB cost no memory.
    pub fn build(reference: &str, layer_sizes: &[u64]) -> TestImage {
        assert!(!layer_sizes.is_empty(), "an image needs at least one layer");
        Self::assemble(reference, &[], layer_sizes)
    }

    /// An image tagged `reference` with this image's layers, the same bytes, and one more random
    /// layer per entry of `layer_sizes` on top: a pull of it after a pull of this one needs only
    /// the new layers.
    pub fn extend(&self, reference: &str, layer_sizes: &[u64]) -> TestImage {
        let base: Vec<(PathBuf, LayerInfo)> =
            self.layer_files.iter().cloned().zip(self.layers.iter().cloned()).collect();
        Self::assemble(reference, &base, layer_sizes)
    }

    fn assemble(reference: &str, base: &[(PathBuf, LayerInfo)], layer_sizes: &[u64]) -> TestImage {
        let dir = TempDir::new("image");
        let mut random = XorShift::seeded();
        let mut layers = Vec::new();
        let mut layer_files = Vec::new();
        for (index, (file, info)) in base.iter().enumerate() {
            let path = dir.path().join(format!("layer{index}.tar"));
            std::fs::copy(file, &path).unwrap();
            layers.push(info.clone());
            layer_files.push(path);
        }
        for (index, &size) in (base.len()..).zip(layer_sizes) {
            let path = dir.path().join(format!("layer{index}.tar"));
            let mut tar = tar::Builder::new(HashingWriter::new(File::create(&path).unwrap()));
            let mut header = tar::Header::new_gnu();
            header.set_size(size);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, format!("regscope-layer-{index}.bin"), (&mut random).take(size)).unwrap();
            let (digest, tar_len) = tar.into_inner().unwrap().finish();
            layers.push(LayerInfo { data_len: size, tar_len, diff_id: format!("sha256:{digest}") });
            layer_files.push(path);
        }

        let config = serde_json::to_vec(&json!({
            "architecture": go_arch(),
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": { "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>() },
            "history": layers.iter().enumerate()
                .map(|(i, l)| json!({ "created": "2026-01-01T00:00:00Z", "created_by": format!("regscope test layer {i} of {} bytes", l.data_len) }))
                .collect::<Vec<_>>(),
        }))
        .unwrap();
        let config_hex = hex(&Sha256::digest(&config));
        let layer_names: Vec<String> =
            layers.iter().map(|l| format!("{}/layer.tar", l.diff_id.trim_start_matches("sha256:"))).collect();
        let manifest = serde_json::to_vec(&json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [reference],
            "Layers": layer_names,
        }]))
        .unwrap();

        let archive = dir.path().join("image.tar");
        let mut tar = tar::Builder::new(File::create(&archive).unwrap());
        for (file, name) in layer_files.iter().zip(&layer_names) {
            tar.append_path_with_name(file, name).unwrap();
        }
        append_bytes(&mut tar, &format!("{config_hex}.json"), &config);
        append_bytes(&mut tar, "manifest.json", &manifest);
        tar.into_inner().unwrap().sync_all().unwrap();

        TestImage {
            archive,
            reference: reference.to_string(),
            image_id: format!("sha256:{config_hex}"),
            layers,
            layer_files,
            _dir: dir,
        }
    }

    /// `docker-archive:PATH`, the skopeo source name.
    pub fn skopeo_source(&self) -> String {
        format!("docker-archive:{}", self.archive.display())
    }
}

/// `sha256:<hex>` of everything `reader` yields: a digest as registries write them.
pub fn sha256_digest(mut reader: impl Read) -> String {
    let mut hash = Sha256::new();
    io::copy(&mut reader, &mut hash).unwrap();
    format!("sha256:{}", hex(&hash.finalize()))
}

/// `sha256:<hex>` of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    sha256_digest(File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn append_bytes(tar: &mut tar::Builder<File>, name: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    tar.append_data(&mut header, name, bytes).unwrap();
}

/// The platform name Docker expects in an image config, for the machine the tests run on.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Counts and hashes what passes through, so a layer's diff ID comes from the one write of it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter { inner, hash: Sha256::new(), len: 0 }
    }

    /// Flushes and returns the hex digest and byte count.
    fn finish(mut self) -> (String, u64) {
        self.inner.flush().unwrap();
        (hex(&self.hash.finalize()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// xorshift64*: fast, statistically random enough that gzip cannot shrink it, and needs no crate.
struct XorShift(u64);

impl XorShift {
    /// Seeded from the clock, the process and a counter, so concurrent tests get different bytes.
    fn seeded() -> XorShift {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let seed = nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl Read for XorShift {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        Ok(buf.len())
    }
}
