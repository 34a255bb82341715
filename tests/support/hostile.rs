//! For tests that misbehave on purpose: raw request bytes no library client would send, uploads
//! cut off part way, an origin that dies mid-response, and the questions such tests ask afterwards
//! (did the registry commit anything? are the metric labels still a closed set? how many file
//! descriptors does regscope hold?).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::client::{digest_of, start_upload, target_at, with_digest, Conn};
use super::registry::Registry;

// === raw exchanges ===

/// What came back for bytes written as they are.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Everything read before the peer closed or the wait ran out.
    pub bytes: Vec<u8>,
    /// The status of the first response, if one came.
    pub status: Option<u16>,
    /// Whether the peer closed the connection (EOF or reset) within the wait.
    pub closed: bool,
}

impl RawReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The first response's body as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        let start = self.bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let end = self.bytes[start..].iter().rposition(|b| *b == b'}').map(|i| start + i + 1)?;
        serde_json::from_slice(&self.bytes[start..end]).ok()
    }
}

/// Connects to `addr`, writes `request` byte for byte, and reads until the peer closes or `wait`
/// passes. Send `Connection: close` in requests that are meant to be answered normally, or the
/// read waits out the keep-alive.
pub fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> RawReply {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_nodelay(true).unwrap();
    // The peer may answer and close before reading everything: a failed write is not a failure.
    let _ = stream.write_all(request);
    let _ = stream.flush();
    read_until_closed(&mut stream, wait)
}

/// Reads from `stream` until EOF, a reset, or `wait` passes.
pub fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> RawReply {
    let deadline = Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break true,
        }
    };
    RawReply { status: status_of(&bytes), bytes, closed }
}

fn status_of(bytes: &[u8]) -> Option<u16> {
    let line_end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&bytes[..line_end]).ok()?;
    line.strip_prefix("HTTP/1.")?.split(' ').nth(1)?.parse().ok()
}

/// Whether a new TCP connection to `addr` is refused (rather than accepted or timed out).
pub fn connection_refused(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

/// `GET /v2/` through `proxy` on a fresh connection: the status. The "still serving" check.
pub fn ping(proxy: SocketAddr) -> u16 {
    let mut conn = Conn::connect(proxy);
    conn.stream().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.request("GET", "/v2/", &[("Host", &proxy.to_string())], b"")
        .unwrap_or_else(|e| panic!("GET /v2/ through {proxy}: {e}"))
        .status()
}

// === uploads cut short ===

/// How a body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    ContentLength,
    Chunked,
}

/// A monolithic upload (`PUT <Location>&digest=…`) whose head and first bytes are on the wire
/// and whose end never comes: the test then closes, half-closes, or just stops.
pub struct CutUpload {
    pub conn: Conn<TcpStream>,
    /// Data bytes sent (for chunked, the data of every chunk, the last one maybe partial).
    pub sent: Vec<u8>,
    /// The digests a proxy that "finished" the body early could get committed: that of every
    /// byte sent, and for chunked that of the complete chunks only.
    pub truncated_digests: Vec<String>,
    /// The upload session's path (no query), as the registry logs it.
    pub upload_path: String,
}

/// Starts an upload of `repo` through `proxy` and sends the head of a `PUT ?digest=<digest>`
/// declaring `full.len()` bytes (Content-Length) or chunked, then only `full[..cut]`. For
/// chunked, the body goes in 64 KiB chunks and the cut falls inside one: its size line promises
/// more than is sent. `digest` is what the `?digest=` says.
pub fn start_cut_upload(
    proxy: SocketAddr,
    repo: &str,
    full: &[u8],
    cut: usize,
    digest: &str,
    framing: Framing,
) -> CutUpload {
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, repo);
    let target = with_digest(&target_at(&location, &format!("http://{host}")), digest);
    let upload_path = target.split('?').next().unwrap().to_string();
    let length = full.len().to_string();
    let mut truncated_digests = vec![digest_of(&full[..cut])];
    match framing {
        Framing::ContentLength => {
            conn.send_head(
                "PUT",
                &target,
                &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Content-Length", &length)],
            )
            .unwrap();
            conn.send_raw(&full[..cut]).unwrap();
        }
        Framing::Chunked => {
            conn.send_head(
                "PUT",
                &target,
                &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
            )
            .unwrap();
            const CHUNK: usize = 64 << 10;
            let whole = cut / CHUNK * CHUNK;
            for piece in full[..whole].chunks(CHUNK) {
                conn.send_chunk(piece).unwrap();
            }
            if cut > whole {
                // A size line for a full chunk, then only part of its data.
                raw_write(&conn, format!("{CHUNK:x}\r\n").as_bytes()).unwrap();
                raw_write(&conn, &full[whole..cut]).unwrap();
                truncated_digests.push(digest_of(&full[..whole]));
            }
        }
    }
    raw_write(&conn, b"").unwrap();
    CutUpload { conn, sent: full[..cut].to_vec(), truncated_digests, upload_path }
}

/// Writes `bytes` straight to the socket under `conn`, for what `Conn` has no method for.
pub fn raw_write(conn: &Conn<TcpStream>, bytes: &[u8]) -> io::Result<()> {
    let mut stream: &TcpStream = conn.stream();
    stream.write_all(bytes)?;
    stream.flush()
}

impl CutUpload {
    /// Closes the socket outright, as a client that crashed or lost its network would.
    pub fn close(self) {
        let _ = self.conn.stream().shutdown(Shutdown::Both);
    }

    /// Half-closes (the client says it is done sending) and reads whatever comes back within
    /// `wait`.
    pub fn half_close_and_read(self, wait: Duration) -> RawReply {
        let _ = self.conn.stream().shutdown(Shutdown::Write);
        let mut stream = self.conn.stream().try_clone().unwrap();
        read_until_closed(&mut stream, wait)
    }
}

// === what the registry committed ===

/// The status the registry itself gives `GET /v2/<repo>/blobs/<digest>` (not through regscope).
pub fn registry_blob_status(registry: &Registry, repo: &str, digest: &str) -> u16 {
    let mut conn = Conn::connect(registry.addr());
    let response = conn
        .request("GET", &format!("/v2/{repo}/blobs/{digest}"), &[("Host", &registry.addr().to_string())], b"")
        .unwrap_or_else(|e| panic!("GET blob {digest} from the registry: {e}"));
    response.status()
}

/// Every blob the registry's filesystem storage holds (`sha256:<hex>`): committed content, as
/// opposed to upload sessions in progress.
pub fn committed_blobs(storage: &Path) -> BTreeSet<String> {
    let root = storage.join("docker/registry/v2/blobs/sha256");
    let mut found = BTreeSet::new();
    for prefix in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for blob in std::fs::read_dir(prefix.path()).into_iter().flatten().flatten() {
            if blob.path().join("data").is_file() {
                found.insert(format!("sha256:{}", blob.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Waits up to `timeout` for the registry to log a request of `method` on `path` (its access log
/// line is written when its handler returns, i.e. once the request is over for it); returns the
/// statuses it logged for it.
pub fn wait_registry_logged(registry: &Registry, method: &str, path: &str, timeout: Duration) -> Vec<u16> {
    let mut statuses = Vec::new();
    super::process::eventually(timeout, || {
        statuses = registry
            .served_requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .map(|r| r.status)
            .collect();
        !statuses.is_empty()
    });
    statuses
}

// === an origin that dies mid-response ===

/// What [`DyingOrigin`] sends before it closes.
#[derive(Debug, Clone, Copy)]
pub struct DyingResponse {
    /// `Content-Length` to declare; `None` sends `Transfer-Encoding: chunked`.
    pub declared: Option<u64>,
    /// Body bytes actually sent before the connection is closed (never the terminating chunk).
    pub sent: u64,
}

/// A plain TCP "registry" that answers every request with a 200 whose body it cuts off (then
/// closes the connection), like a registry process that died mid-download.
pub struct DyingOrigin {
    pub addr: SocketAddr,
    /// Requests it has read.
    pub served: Arc<AtomicUsize>,
}

impl DyingOrigin {
    pub fn start(response: DyingResponse) -> DyingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        // The thread lives as long as the test process; each connection gets one response.
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = counter.clone();
                thread::spawn(move || serve_dying(stream, response, &counter));
            }
        });
        DyingOrigin { addr, served }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn serve_dying(mut stream: TcpStream, response: DyingResponse, served: &AtomicUsize) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    served.fetch_add(1, Ordering::SeqCst);
    let framing = match response.declared {
        Some(length) => format!("Content-Length: {length}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDocker-Distribution-Api-Version: registry/2.0\r\n{framing}\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let block = vec![0x5au8; 64 << 10];
    let mut left = response.sent;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        let ok = if response.declared.is_some() {
            stream.write_all(&block[..n])
        } else {
            stream.write_all(format!("{n:x}\r\n").as_bytes()).and_then(|()| {
                stream.write_all(&block[..n])?;
                stream.write_all(b"\r\n")
            })
        };
        if ok.is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = stream.flush();
    // Let the bytes reach regscope before the connection goes: a death, not a race.
    thread::sleep(Duration::from_millis(200));
    let _ = stream.shutdown(Shutdown::Both);
}

// === process and metrics inspection ===

/// How many file descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")).count()
}

/// Every sample of a Prometheus text exposition: metric name and its labels.
pub fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let series = l.rsplit_once(' ').map_or(l, |(s, _)| s);
            match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = parse_labels(rest.strip_suffix('}').unwrap_or(rest))
                        .unwrap_or_else(|| panic!("unparseable labels in {l:?}"));
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            }
        })
        .collect()
}

/// Label pairs as a map; the parsing is the harness's own (`regscope::parse_labels`).
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    super::regscope::parse_labels(text).map(|pairs| pairs.into_iter().collect())
}

/// Every value label `label` takes anywhere in the exposition, with the families it appears in.
pub fn label_values(text: &str, label: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, labels) in samples(text) {
        if let Some(value) = labels.get(label) {
            values.entry(value.clone()).or_default().insert(name);
        }
    }
    values
}
