//! Replaying clients and reading back what regscope made of them.
//!
//! - The transfers API and `regscope report`, as a test reads them: [`transfers`],
//!   [`wait_for_transfer`], [`report_text`], and [`assert_shares_add_up`].
//! - What the registry stored, asked directly (never through regscope): [`registry_manifest`].
//! - Bodies with a known pace: [`send_paced_chunked`] writes a request body so its last byte leaves at
//!   a chosen time; [`read_paced`] reads a response body so its last byte is read at a chosen time.
//! - The seed's own v1 registry (docker-registry 0.9.1, see `script/v1-registry`): [`V1Registry`].

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use regscope::{Party, Transfer, TransferDirection};

use super::client::{Conn, ResponseHead};
use super::net::{free_port, http_get};
use super::process::{check, output, TempDir};

// === the transfers API and the report ===

/// Every finished transfer regscope keeps, newest first, from `GET /api/v1/transfers`.
pub fn transfers(admin: SocketAddr) -> Vec<Transfer> {
    let response = http_get(admin, "/api/v1/transfers?limit=1000");
    assert_eq!(response.status, 200, "GET /api/v1/transfers: {}", response.text());
    #[derive(serde::Deserialize)]
    struct List {
        transfers: Vec<Transfer>,
    }
    let list: List = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("/api/v1/transfers is not a transfers list ({e}): {}", response.text()));
    list.transfers
}

/// Waits up to `timeout` for a finished transfer of `direction` on `repository`; returns the newest
/// one. Panics showing every transfer regscope has (as JSON) if none appears.
pub fn wait_for_transfer(
    admin: SocketAddr,
    direction: TransferDirection,
    repository: &str,
    timeout: Duration,
) -> Transfer {
    let deadline = Instant::now() + timeout;
    loop {
        let all = transfers(admin);
        if let Some(t) = all.iter().find(|t| t.direction == direction && t.repository == repository) {
            return t.clone();
        }
        if Instant::now() >= deadline {
            panic!(
                "no finished {} of {repository} after {timeout:?}; regscope has:\n{}",
                direction.as_str(),
                serde_json::to_string_pretty(&all).unwrap()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The transfer as pretty JSON, for failure messages.
pub fn pretty(t: &Transfer) -> String {
    serde_json::to_string_pretty(t).unwrap()
}

/// `regscope report --admin http://ADMIN --last N`, run as a child process; its stdout.
pub fn report_text(admin: SocketAddr, last: usize) -> String {
    check(
        Command::new(env!("CARGO_BIN_EXE_regscope")).args([
            "report",
            "--admin",
            &format!("http://{admin}"),
            "--last",
            &last.to_string(),
        ]),
        Duration::from_secs(30),
    )
}

/// The one table of `text` (several transfers' tables) whose title line names `direction` and
/// `repository`, e.g. `transfer 3: v2 push regscope-test/x:v1 from 127.0.0.1 — complete (…)`.
pub fn report_table<'a>(text: &'a str, direction: TransferDirection, repository: &str) -> &'a str {
    let needle = format!(" {} {repository}", direction.as_str());
    let start = text
        .match_indices("transfer ")
        .map(|(i, _)| i)
        .find(|&i| (i == 0 || text[..i].ends_with('\n')) && text[i..].lines().next().unwrap().contains(&needle))
        .unwrap_or_else(|| panic!("no {needle:?} table in the report:\n{text}"));
    let rest = &text[start..];
    // A table ends at the blank line `report` prints after it.
    let end = rest.find("\n\n").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The seconds of the row of `table` whose operation column starts with `operation`; panics if
/// there is no such row, or more than one.
pub fn row_seconds(table: &str, operation: &str) -> f64 {
    let rows: Vec<f64> = table
        .lines()
        .filter(|l| l.trim_start().starts_with(operation))
        .map(|l| {
            let seconds = l.split_whitespace().find(|w| w.ends_with('s') && w[..w.len() - 1].parse::<f64>().is_ok());
            seconds.unwrap_or_else(|| panic!("row {l:?} has no seconds column")).trim_end_matches('s').parse().unwrap()
        })
        .collect();
    assert_eq!(rows.len(), 1, "want exactly one {operation:?} row in:\n{table}");
    rows[0]
}

/// The client, registry and moving percentages of the table's `verdict:` line.
pub fn verdict_percentages(table: &str) -> (f64, f64, f64) {
    let line = table
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("verdict: "))
        .unwrap_or_else(|| panic!("no verdict line in:\n{table}"));
    let numbers: Vec<f64> = line.split(" % ").filter_map(|part| part.rsplit(' ').next()?.parse().ok()).collect();
    assert_eq!(numbers.len(), 3, "verdict {line:?} does not name three shares");
    (numbers[0], numbers[1], numbers[2])
}

/// The parties' shares of a transfer cover its wall time exactly: every instant belongs to the
/// client, the registry, the storage it redirected to, bytes moving, or is lost to a failure, and
/// to only one.
pub fn assert_shares_add_up(t: &Transfer) {
    let p = t.parties;
    assert!(Party::ALL.iter().all(|&party| p.get(party) >= 0.0), "negative share: {p:?}");
    assert!(regscope::Culprit::ALL.iter().all(|&c| t.lost.get(c) >= 0.0), "negative loss: {:?}", t.lost);
    let sum = p.total() + t.lost.total();
    assert!(t.wall_seconds > 0.0, "transfer {} has no wall time", t.id);
    assert!(
        (sum - t.wall_seconds).abs() <= 1e-6 * t.wall_seconds.max(1.0),
        "{p:?} add up to {sum:.6} s, wall {:.6} s",
        t.wall_seconds
    );
}

/// The first 12 hex digits of a digest or v1 image id: how `report` names a blob.
pub fn short(id: &str) -> &str {
    let hex = id.split_once(':').map_or(id, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

// === the registry, asked directly ===

pub const SCHEMA2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What `registry_manifest` accepts: schema2 first, and the OCI types and lists (so a
/// multi-platform tag gives its index).
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

/// The manifest `repository:reference` as the registry at `registry` serves it (schema2 for an
/// image docker pushed, an index for a multi-platform tag).
pub fn registry_manifest(registry: SocketAddr, repository: &str, reference: &str) -> serde_json::Value {
    let mut conn = Conn::connect(registry);
    let response = conn
        .request(
            "GET",
            &format!("/v2/{repository}/manifests/{reference}"),
            &[("Host", &registry.to_string()), ("Accept", MANIFEST_TYPES)],
            b"",
        )
        .unwrap_or_else(|e| panic!("GET manifest {repository}:{reference} from {registry}: {e}"));
    assert_eq!(response.status(), 200, "GET manifest {repository}:{reference}: {}", response.text());
    response.json()
}

/// `(digest, size)` of the config then every layer of a schema2 or OCI manifest.
pub fn manifest_blobs(manifest: &serde_json::Value) -> Vec<(String, u64)> {
    let descriptor = |d: &serde_json::Value| {
        (d["digest"].as_str().expect("descriptor digest").to_string(), d["size"].as_u64().expect("descriptor size"))
    };
    let mut blobs = vec![descriptor(&manifest["config"])];
    blobs.extend(manifest["layers"].as_array().expect("manifest layers").iter().map(descriptor));
    blobs
}

// === paced bodies ===

/// Writes `body` as a chunked request body (the head must already be sent, with
/// `Transfer-Encoding: chunked`) in `chunk`-byte pieces, timed so that piece k of n leaves at
/// `duration * k / n` after the call: the last byte leaves at `duration`. Returns the seconds it
/// really took.
pub fn send_paced_chunked<S: Read + Write>(conn: &mut Conn<S>, body: &[u8], chunk: usize, duration: Duration) -> f64 {
    let start = Instant::now();
    send_paced_chunks(conn, body, chunk, duration);
    conn.finish_chunks().expect("end the chunked body");
    start.elapsed().as_secs_f64()
}

/// [`send_paced_chunked`] without ending the body: more chunks may follow.
pub fn send_paced_chunks<S: Read + Write>(conn: &mut Conn<S>, body: &[u8], chunk: usize, duration: Duration) {
    let start = Instant::now();
    let pieces: Vec<&[u8]> = body.chunks(chunk).collect();
    let n = pieces.len() as u32;
    for (k, piece) in pieces.iter().enumerate() {
        sleep_until(start + duration * (k as u32 + 1) / n);
        conn.send_chunk(piece).expect("send a chunk");
    }
}

/// Reads the body that follows `head` so that the bytes read by any moment never run ahead of a
/// steady pace that ends at `duration` after the call: before each read it waits until the bytes
/// already read are due. Use it on a connection with a small receive buffer, or the sender finishes
/// into kernel buffers long before the reader does. Returns the body length and the seconds
/// taken.
pub fn read_paced<S: Read + Write>(conn: &mut Conn<S>, head: &ResponseHead, duration: Duration) -> (u64, f64) {
    let total = head.content_length().expect("a paced read needs a Content-Length");
    let start = Instant::now();
    let mut done = 0u64;
    // `read_body` hands over what each read returned; waiting in the callback delays the next read.
    let len = conn
        .read_body(head, |bytes| {
            done += bytes.len() as u64;
            if done < total {
                sleep_until(start + duration.mul_f64(done as f64 / total as f64));
            }
        })
        .expect("read the body");
    (len, start.elapsed().as_secs_f64())
}

pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

// === the seed's v1 registry ===

/// Where `script/test` installed the v1 registry (`script/v1-registry install DIR`).
const V1_DIR_VAR: &str = "REGSCOPE_TEST_V1_REGISTRY_DIR";

/// A running docker-registry 0.9.1 (the seed's Python v1 registry) on a free loopback port, with
/// its own storage; stopped on drop.
pub struct V1Registry {
    install_dir: PathBuf,
    port: u16,
    /// Storage and run directory (pid file, access log, error log).
    dir: TempDir,
}

fn v1_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("script/v1-registry")
}

impl V1Registry {
    /// Starts one. Panics when `REGSCOPE_TEST_V1_REGISTRY_DIR` is not set: a v1 test that skipped
    /// itself would pass proving nothing.
    pub fn start() -> V1Registry {
        let install_dir = match std::env::var(V1_DIR_VAR) {
            Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => panic!(
                "{V1_DIR_VAR} is not set: run script/test, or `script/v1-registry install DIR` and set {V1_DIR_VAR}=DIR"
            ),
        };
        let dir = TempDir::new("v1-registry");
        let mut last_failure = String::new();
        for _ in 0..5 {
            let port = free_port();
            let out = output(
                Command::new(v1_script())
                    .arg("start")
                    .arg(&install_dir)
                    .arg(port.to_string())
                    .arg(dir.path().join("storage"))
                    .arg(dir.path().join("run")),
                Duration::from_secs(60),
            );
            if out.status.success() {
                return V1Registry { install_dir, port, dir };
            }
            last_failure = format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.path().join("run/error.log")).unwrap_or_default()
            );
            if !last_failure.contains("already") && !last_failure.contains("in use") {
                break;
            }
        }
        panic!("script/v1-registry start failed:\n{last_failure}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Its access log (combined format plus the request time in µs), for failure messages.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run/access.log")).unwrap_or_default()
    }
}

impl Drop for V1Registry {
    fn drop(&mut self) {
        let _ = output(
            Command::new(v1_script())
                .arg("stop")
                .arg(&self.install_dir)
                .arg(self.port.to_string())
                .arg(self.dir.path().join("run")),
            Duration::from_secs(30),
        );
    }
}

// === what a transfer must say about the blobs of a manifest ===

/// `t` has exactly one blob per entry of `expected` (`manifest_blobs` order: config, then layers),
/// each with the kind, byte count and declared size the registry stored, and `outcome`; and no
/// other blob.
pub fn assert_blobs_match(t: &Transfer, expected: &[(String, u64)], outcome: regscope::BlobOutcome) {
    use regscope::BlobKind;
    for (i, (digest, size)) in expected.iter().enumerate() {
        let kind = if i == 0 { BlobKind::Config } else { BlobKind::Layer };
        let found: Vec<_> = t.blobs.iter().filter(|b| b.digest.as_deref() == Some(digest.as_str())).collect();
        assert_eq!(found.len(), 1, "want one blob {digest} ({kind:?}, {size} B) in transfer:\n{}", pretty(t));
        let blob = found[0];
        assert_eq!(blob.bytes, *size, "bytes of {kind:?} {digest} vs the registry's size; transfer:\n{}", pretty(t));
        assert_eq!(blob.declared_size, Some(*size), "declared size of {digest}; transfer:\n{}", pretty(t));
        assert_eq!(blob.kind, Some(kind), "kind of {digest}; transfer:\n{}", pretty(t));
        assert_eq!(blob.outcome, outcome, "outcome of {digest}; transfer:\n{}", pretty(t));
    }
    assert_eq!(t.blobs.len(), expected.len(), "blobs beyond the manifest's; transfer:\n{}", pretty(t));
}

/// The report table has one row per blob of `expected` naming it (kind and short digest) with the
/// registry's size, under `verb` (`transfer` for a v2 push, `get` for a v2 pull); a `total (wall)`
/// row at 100 %; and a verdict whose three shares add up to 100 % (each is rounded).
pub fn assert_table_lists(table: &str, expected: &[(String, u64)], verb: &str) {
    for (i, (digest, size)) in expected.iter().enumerate() {
        let kind = if i == 0 { "config" } else { "layer " };
        let size_text = format!("({})", regscope::report::bytes(*size));
        let rows: Vec<&str> = table
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with(&format!("{verb} {kind}")) && l.contains(short(digest)))
            .collect();
        assert_eq!(rows.len(), 1, "want one `{verb} {kind}… {}` row in:\n{table}", short(digest));
        assert!(rows[0].contains(&size_text), "row {:?} does not show the size {size_text}:\n{table}", rows[0]);
    }
    let total = table.lines().find(|l| l.trim_start().starts_with("total (wall)")).expect("a total (wall) row");
    assert!(total.contains("100.0%"), "total row {total:?}");
    let (client, registry, moving) = verdict_percentages(table);
    assert!(
        (client + registry + moving - 100.0).abs() <= 1.5,
        "verdict shares {client} + {registry} + {moving} ≠ 100:\n{table}"
    );
}
