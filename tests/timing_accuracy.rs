//! regscope's timings against ground truth, over real sockets: a client that pauses while
//! uploading, an upstream that thinks before it answers, a reader that falls behind, and an
//! upstream that trickles. Each pause is made (and measured) by the test, so each figure regscope
//! reports has a known right answer.
//!
//! The upload goes to a real registry. The other three need an upstream that delays or trickles on
//! command, which no registry does: [`Origin`] is a small HTTP/1.1 server written for that.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::client::{start_upload, target_at, with_digest, Conn, Pattern};
use support::timing::connect_with_small_rcvbuf;
use support::{eventually, metric_sum, Registry, Regscope};

/// Agreement demanded between regscope and the ground truth: 5 %, or 20 ms for short waits.
fn tolerance(truth: f64) -> f64 {
    (truth * 0.05).max(0.020)
}

fn assert_close(what: &str, measured: f64, truth: f64) {
    let error = measured - truth;
    assert!(
        error.abs() <= tolerance(truth),
        "{what}: regscope measured {measured:.4}s, ground truth {truth:.4}s (off by {:+.1} ms, allowed ±{:.1} ms)",
        error * 1e3,
        tolerance(truth) * 1e3
    );
}

/// The idle time between a sender's writes: from the end of one write to the start of the next.
#[derive(Default)]
struct Gaps {
    last_write_end: Option<Instant>,
    total: f64,
}

impl Gaps {
    /// Call right before a write.
    fn writing(&mut self) -> Option<f64> {
        let gap = self.last_write_end.take()?.elapsed().as_secs_f64();
        self.total += gap;
        Some(gap)
    }

    /// Call right after a write.
    fn wrote(&mut self) {
        self.last_write_end = Some(Instant::now());
    }

    fn total(&self) -> f64 {
        self.total
    }
}

/// Sleeps `d` and returns how long the sleep really took (a busy machine oversleeps).
fn measured_sleep(d: Duration) -> f64 {
    let start = Instant::now();
    thread::sleep(d);
    start.elapsed().as_secs_f64()
}

const STALL: &str = "regscope_body_stall_seconds_total";

/// The stall counter for one operation, direction and side.
fn stall(text: &str, operation: &str, direction: &str, side: &str) -> f64 {
    metric_sum(text, STALL, &[("operation", operation), ("direction", direction), ("side", side)])
}

/// The `request` log event of the one exchange matching `method` and `operation`, once written.
fn request_event(regscope: &Regscope, method: &str, operation: &str) -> serde_json::Value {
    let find = || {
        regscope
            .events("request")
            .into_iter()
            .find(|e| e["fields"]["method"] == method && e["fields"]["operation"] == operation)
    };
    assert!(
        eventually(Duration::from_secs(5), || find().is_some()),
        "no {method} {operation} event: {:#?}",
        regscope.log_lines()
    );
    find().unwrap()
}

fn number(event: &serde_json::Value, field: &str) -> f64 {
    let value = &event["fields"][field];
    value.as_f64().or_else(|| value.as_str()?.parse().ok()).unwrap_or_else(|| panic!("no number {field} in {event}"))
}

// === (a) a client that pauses while uploading ===

const UPLOAD_CHUNKS: usize = 10;
const UPLOAD_CHUNK_SIZE: usize = 64 << 10;
const UPLOAD_PAUSE: Duration = Duration::from_millis(150);

#[test]
fn a_paused_upload_is_client_stall_equal_to_the_pauses() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let origin = format!("http://{proxy}");

    let mut conn = Conn::connect(proxy);
    let target = target_at(&start_upload(&mut conn, &host, "regscope-test/paced-upload"), &origin);
    let before = regscope.metrics_text();

    // The head and the first chunk at once, then a pause before each further chunk. Ground truth
    // is the time between one write's end and the next one's start: the pause, plus whatever the
    // scheduler added to it on a busy machine.
    conn.send_head(
        "PATCH",
        &target,
        &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
    )
    .unwrap();
    let mut pattern = Pattern::new(0xA11CE);
    let mut gaps = Gaps::default();
    for i in 0..UPLOAD_CHUNKS {
        if i > 0 {
            thread::sleep(UPLOAD_PAUSE);
        }
        gaps.writing();
        conn.send_chunk(pattern.next_slice(UPLOAD_CHUNK_SIZE)).unwrap();
        gaps.wrote();
    }
    conn.finish_chunks().unwrap();
    let pauses = gaps.total();
    let response = conn.read_response().unwrap();
    let total = (UPLOAD_CHUNKS * UPLOAD_CHUNK_SIZE) as u64;
    assert_eq!(response.status(), 202, "{:?} {}", response.head, response.text());
    assert_eq!(response.header("range"), Some(format!("0-{}", total - 1).as_str()), "the registry took every byte");

    let event = request_event(&regscope, "PATCH", "upload_chunk");
    let after = regscope.metrics_text();
    let client = stall(&after, "upload_chunk", "upload", "client") - stall(&before, "upload_chunk", "upload", "client");
    let registry_side =
        stall(&after, "upload_chunk", "upload", "registry") - stall(&before, "upload_chunk", "upload", "registry");
    let logged = number(&event, "client_wait_ms") / 1e3;
    eprintln!(
        "paced upload: pauses {pauses:.4}s; regscope client stall {client:.4}s (log {logged:.4}s), registry stall {registry_side:.4}s"
    );
    assert_eq!(number(&event, "bytes_in") as u64, total, "{event}");
    assert_close("client stall of the paused PATCH (metric)", client, pauses);
    assert_close("client_wait_ms of the paused PATCH (log)", logged, pauses);
    assert!(registry_side < tolerance(pauses), "the registry kept up, yet it is charged {registry_side:.4}s");
}

// === (b) an upstream that thinks before it answers ===

const HEAD_DELAY: Duration = Duration::from_millis(400);
/// A pause in the middle of a request body: time that is the client's, not the registry's.
const BODY_PAUSE: Duration = Duration::from_millis(300);

#[test]
fn an_upstream_delay_before_the_response_head_is_upstream_response_time() {
    let origin = Origin::start(Behaviour::DelayHead(HEAD_DELAY));
    let regscope = Regscope::start(&["--upstream", &origin.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);

    // Without a body, and with one sent in two halves with a pause between: the registry's time
    // starts when the request is fully forwarded, not when its head is.
    let body = vec![0x5Au8; 1 << 20];
    let finish = with_digest(
        "/v2/regscope-test/slow/blobs/uploads/6f1c2e1e-0c6b-4c1e-9c39-6c2f0d9e8a11?_state=x",
        &format!("sha256:{}", "00".repeat(32)),
    );
    let cases: [(&str, &str, &str, &[u8]); 2] =
        [("GET", "/v2/", "version_check", b""), ("PUT", finish.as_str(), "upload_finish", &body)];
    for (method, target, operation, body) in cases {
        let sum = |text: &str| metric_sum(text, "regscope_upstream_response_seconds_sum", &[("operation", operation)]);
        let count =
            |text: &str| metric_sum(text, "regscope_upstream_response_seconds_count", &[("operation", operation)]);
        let before = regscope.metrics_text();
        let delays_before = origin.delays().len();
        if body.is_empty() {
            conn.send_head(method, target, &[("Host", &host)]).unwrap();
        } else {
            let length = body.len().to_string();
            conn.send_head(method, target, &[("Host", &host), ("Content-Length", &length)]).unwrap();
            let (first, second) = body.split_at(body.len() / 2);
            conn.send_raw(first).unwrap();
            thread::sleep(BODY_PAUSE);
            conn.send_raw(second).unwrap();
        }
        let response = conn.read_response().unwrap();
        assert_eq!(response.status(), 200, "{method} {target}: {:?}", response.head);
        let truth = origin.delays()[delays_before];
        request_event(&regscope, method, operation);
        let after = regscope.metrics_text();
        let measured = sum(&after) - sum(&before);
        eprintln!("{operation}: origin held the head {truth:.4}s; regscope upstream_response {measured:.4}s");
        assert_eq!(count(&after) - count(&before), 1.0, "one {operation} observed");
        assert_close(&format!("upstream response time of {method} {operation}"), measured, truth);
    }
    assert_eq!(origin.bodies(), vec![0, body.len() as u64], "the origin read each request body whole");
}

// === (c) a reader that falls behind, and an upstream that trickles ===

const BULK_SIZE: u64 = 32 << 20;
const READ_STEP: u64 = 1 << 20;
const READ_PAUSE: Duration = Duration::from_millis(100);
/// The client's receive buffer: small, so the pauses reach regscope instead of filling a buffer.
const CLIENT_RCVBUF: u32 = 64 << 10;

#[test]
fn a_slow_reader_is_client_stall_not_registry_stall() {
    let origin = Origin::start(Behaviour::Bulk(BULK_SIZE));
    let regscope = Regscope::start(&["--upstream", &origin.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let before = regscope.metrics_text();

    let mut conn = Conn::new(connect_with_small_rcvbuf(proxy, CLIENT_RCVBUF));
    conn.send_head("GET", &format!("/v2/regscope-test/slow-reader/blobs/{}", fake_digest()), &[("Host", &host)])
        .unwrap();
    let head = conn.read_head().unwrap();
    assert_eq!(head.status, 200, "{head:?}");
    let mut read = 0u64;
    let mut pauses = 0.0;
    let started = Instant::now();
    let len = conn
        .read_body(&head, |bytes| {
            let step_before = read / READ_STEP;
            read += bytes.len() as u64;
            // A pause after each whole MiB, except after the last: nothing is left to hold up.
            if read / READ_STEP > step_before && read < BULK_SIZE {
                pauses += measured_sleep(READ_PAUSE);
            }
        })
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(len, BULK_SIZE);

    let event = request_event(&regscope, "GET", "blob_get");
    let after = regscope.metrics_text();
    let client = stall(&after, "blob_get", "download", "client") - stall(&before, "blob_get", "download", "client");
    let upstream =
        stall(&after, "blob_get", "download", "registry") - stall(&before, "blob_get", "download", "registry");
    eprintln!(
        "slow reader: paused {pauses:.3}s in {wall:.3}s; regscope client stall {client:.3}s (log {:.3}s), registry stall {upstream:.4}s",
        number(&event, "client_wait_ms") / 1e3
    );
    assert_eq!(number(&event, "bytes_out") as u64, BULK_SIZE, "{event}");
    assert!(client > 10.0 * upstream, "client stall {client:.3}s is not ≫ registry stall {upstream:.4}s");
    // Kernel buffers between regscope and the reader hide the last few pauses from regscope (a few
    // MiB of send buffer); at least half of them must show, and never more than there were.
    assert!(client >= 0.5 * pauses, "client stall {client:.3}s is less than half the reader's pauses {pauses:.3}s");
    assert!(client <= pauses + tolerance(pauses), "client stall {client:.3}s exceeds the reader's pauses {pauses:.3}s");
    let logged = number(&event, "client_wait_ms") / 1e3;
    assert!((logged - client).abs() < 0.001, "log says {logged:.4}s, metric {client:.4}s");
}

const TRICKLE_CHUNKS: usize = 10;
const TRICKLE_CHUNK_SIZE: usize = 64 << 10;
const TRICKLE_PAUSE: Duration = Duration::from_millis(150);

#[test]
fn a_trickling_upstream_is_registry_stall_equal_to_its_pauses() {
    let origin =
        Origin::start(Behaviour::Trickle { chunks: TRICKLE_CHUNKS, size: TRICKLE_CHUNK_SIZE, pause: TRICKLE_PAUSE });
    let regscope = Regscope::start(&["--upstream", &origin.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let before = regscope.metrics_text();

    let mut conn = Conn::connect(proxy);
    let target = format!("/v2/regscope-test/trickle/blobs/{}", fake_digest());
    let (head, len, _) = conn.get_hashed(&target, &[("Host", &host)]).unwrap();
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(len, (TRICKLE_CHUNKS * TRICKLE_CHUNK_SIZE) as u64);
    let pauses: f64 = origin.delays().iter().sum();

    let event = request_event(&regscope, "GET", "blob_get");
    let after = regscope.metrics_text();
    let upstream =
        stall(&after, "blob_get", "download", "registry") - stall(&before, "blob_get", "download", "registry");
    let client = stall(&after, "blob_get", "download", "client") - stall(&before, "blob_get", "download", "client");
    let logged = number(&event, "registry_wait_ms") / 1e3;
    eprintln!(
        "trickle: origin paused {pauses:.4}s; regscope registry stall {upstream:.4}s (log {logged:.4}s), client stall {client:.4}s"
    );
    assert_eq!(origin.delays().len(), TRICKLE_CHUNKS - 1);
    assert_close("registry stall of the trickled download (metric)", upstream, pauses);
    assert_close("registry_wait_ms of the trickled download (log)", logged, pauses);
    assert!(client < tolerance(pauses), "the reader kept up, yet it is charged {client:.4}s");
}

fn fake_digest() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

// === Origin: an upstream that delays and trickles on command ===

/// What the origin does with each request, once it has read it whole.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Waits this long, then answers 200 with an empty body.
    DelayHead(Duration),
    /// Answers 200 with this many bytes, written as fast as the socket takes them.
    Bulk(u64),
    /// Sends the head and the first chunk at once, then each further chunk after `pause`. What it
    /// records is each idle time between writes: the pause plus any scheduling delay.
    Trickle { chunks: usize, size: usize, pause: Duration },
}

/// A minimal HTTP/1.1 server on a loopback port, one thread per connection, keep-alive.
struct Origin {
    addr: SocketAddr,
    /// Every pause the origin really made, in seconds, in order (for `Trickle`, the idle time
    /// between writes).
    delays: Arc<Mutex<Vec<f64>>>,
    /// The length of each request body it read, in order.
    bodies: Arc<Mutex<Vec<u64>>>,
}

impl Origin {
    fn start(behaviour: Behaviour) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let delays = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (d, b) = (delays.clone(), bodies.clone());
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (d, b) = (d.clone(), b.clone());
                thread::spawn(move || {
                    let _ = serve(stream, behaviour, &d, &b);
                });
            }
        });
        Origin { addr, delays, bodies }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn delays(&self) -> Vec<f64> {
        self.delays.lock().unwrap().clone()
    }

    fn bodies(&self) -> Vec<u64> {
        self.bodies.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    behaviour: Behaviour,
    delays: &Mutex<Vec<f64>>,
    bodies: &Mutex<Vec<u64>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = read_request_head(&mut reader)? else {
            return Ok(());
        };
        let body = read_request_body(&mut reader, &head)?;
        bodies.lock().unwrap().push(body);
        match behaviour {
            Behaviour::DelayHead(delay) => {
                let read_at = Instant::now();
                thread::sleep(delay);
                delays.lock().unwrap().push(read_at.elapsed().as_secs_f64());
                writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
            }
            Behaviour::Bulk(size) => {
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
                )?;
                let block = vec![0xC3u8; 256 << 10];
                let mut left = size;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    writer.write_all(&block[..n])?;
                    left -= n as u64;
                }
            }
            Behaviour::Trickle { chunks, size, pause } => {
                let block = vec![0x3Cu8; size];
                let mut first = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    chunks * size
                )
                .into_bytes();
                first.extend_from_slice(&block);
                let mut gaps = Gaps::default();
                writer.write_all(&first)?;
                gaps.wrote();
                for _ in 1..chunks {
                    thread::sleep(pause);
                    let gap = gaps.writing().expect("a write came before");
                    delays.lock().unwrap().push(gap);
                    writer.write_all(&block)?;
                    gaps.wrote();
                }
            }
        }
        writer.flush()?;
    }
}

/// The request head's lines, or `None` when the peer closed the connection between requests.
fn read_request_head(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

/// Reads and discards the body (`Content-Length` or chunked); returns its length.
fn read_request_body(reader: &mut impl BufRead, head: &[String]) -> std::io::Result<u64> {
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut total = 0;
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size = u64::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
            if size == 0 {
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(total);
                    }
                }
            }
            std::io::copy(&mut reader.take(size), &mut std::io::sink())?;
            let mut crlf = String::new();
            reader.read_line(&mut crlf)?;
            total += size;
        }
    }
    let length: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let copied = std::io::copy(&mut reader.take(length), &mut std::io::sink())?;
    Ok(copied)
}
