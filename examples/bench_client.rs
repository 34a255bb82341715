//! The byte-moving client of `script/bench`: raw HTTP/1.1 over keep-alive connections, reads
//! into large buffers, writes large chunks, one thread. Cheap enough that on a loopback
//! benchmark the proxy and the origin, not this client, set the pace.
//!
//! Subcommands (each prints one line of `key=value` results on stdout):
//! - `digest --bytes N`: the sha256 digest of the N bytes `upload` sends.
//! - `get --addr A --path P [--count N] [--conns C] [--idle-ms M]`: N GETs over C connections.
//!   With `--idle-ms`, all C connections are opened first, left idle for M ms, then used at once.
//! - `upload --addr A --repo R --bytes N --digest D [--conns C]`: POST, one chunked PATCH of N
//!   bytes, PUT `?digest=D` (the registry's upload protocol); C such uploads at once.
//! - `put-image --addr A --repo R --tag T`: a tiny config + layer + schema2 manifest, so there
//!   is a manifest to GET; prints its digest.
//!
//! `cargo build --release --example bench_client`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Digest {
        #[arg(long)]
        bytes: u64,
    },
    Get {
        /// host:port to connect to (also sent as Host).
        #[arg(long)]
        addr: String,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Open every connection, wait this long, then start all requests at once.
        #[arg(long)]
        idle_ms: Option<u64>,
        /// Read buffer per connection.
        #[arg(long, default_value_t = 1 << 20)]
        buf_bytes: usize,
    },
    Upload {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        repo: String,
        #[arg(long)]
        bytes: u64,
        /// The digest of the bytes (`digest --bytes N`); computed here when absent.
        #[arg(long)]
        digest: Option<String>,
        /// Size of each chunk of the chunked PATCH body.
        #[arg(long, default_value_t = 1 << 20)]
        chunk_bytes: usize,
        /// Concurrent uploads, each of `bytes`, each on its own connection.
        #[arg(long, default_value_t = 1)]
        conns: usize,
    },
    PutImage {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        repo: String,
        #[arg(long)]
        tag: String,
    },
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    if let Err(error) = runtime.block_on(run(args.command)) {
        eprintln!("bench_client: {error}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> io::Result<()> {
    match command {
        Command::Digest { bytes } => {
            println!("digest={}", content_digest(bytes));
            Ok(())
        }
        Command::Get { addr, path, count, conns, idle_ms, buf_bytes } => {
            get(addr, path, count, conns.max(1), idle_ms, buf_bytes).await
        }
        Command::Upload { addr, repo, bytes, digest, chunk_bytes, conns } => {
            let digest = digest.unwrap_or_else(|| content_digest(bytes));
            let pattern: Arc<[u8]> = pattern().into();
            if conns > 1 {
                return upload_many(addr, repo, bytes, digest, chunk_bytes, conns, pattern).await;
            }
            let mut conn = Conn::connect(&addr, 64 * 1024).await?;
            let started = Instant::now();
            let (patch, pushed) = conn.upload(&repo, bytes, &digest, chunk_bytes, &pattern).await?;
            let total = started.elapsed().as_secs_f64();
            let patch = patch.as_secs_f64();
            println!(
                "bytes={bytes} patch_secs={patch:.6} total_secs={total:.6} gibps={:.4} digest={pushed}",
                bytes as f64 / f64::from(1u32 << 30) / patch
            );
            Ok(())
        }
        Command::PutImage { addr, repo, tag } => {
            let mut conn = Conn::connect(&addr, 64 * 1024).await?;
            let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
            let layer = vec![7u8; 1024];
            let config_digest = conn.upload_bytes(&repo, config).await?;
            let layer_digest = conn.upload_bytes(&repo, &layer).await?;
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":{},"digest":"{config_digest}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":{},"digest":"{layer_digest}"}}]}}"#,
                config.len(),
                layer.len()
            );
            let head = format!(
                "PUT /v2/{repo}/manifests/{tag} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/vnd.docker.distribution.manifest.v2+json\r\nContent-Length: {}\r\n\r\n",
                manifest.len()
            );
            conn.stream.write_all(head.as_bytes()).await?;
            conn.stream.write_all(manifest.as_bytes()).await?;
            let response = conn.response().await?;
            expect(&response, 201, "manifest PUT")?;
            println!("digest=sha256:{:x}", Sha256::digest(manifest.as_bytes()));
            Ok(())
        }
    }
}

// === GET ===

async fn get(
    addr: String,
    path: String,
    count: usize,
    conns: usize,
    idle_ms: Option<u64>,
    buf_bytes: usize,
) -> io::Result<()> {
    let conns = conns.min(count.max(1));
    // Open every connection first, so connecting is never part of the measured time.
    let mut opening = JoinSet::new();
    for _ in 0..conns {
        let addr = addr.clone();
        opening.spawn(async move { Conn::connect(&addr, buf_bytes).await });
    }
    let mut open = Vec::with_capacity(conns);
    while let Some(conn) = opening.join_next().await {
        open.push(conn.expect("connect task")?);
    }
    if let Some(ms) = idle_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let head: Arc<str> =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: regscope-bench\r\nAccept: */*\r\n\r\n").into();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut running = JoinSet::new();
    for mut conn in open {
        let (head, next) = (head.clone(), next.clone());
        running.spawn(async move {
            let mut latencies = Vec::new();
            let mut bytes = 0u64;
            let mut errors = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let t = Instant::now();
                let result = async {
                    conn.stream.write_all(head.as_bytes()).await?;
                    let response = conn.response().await?;
                    expect(&response, 200, "GET")?;
                    Ok::<u64, io::Error>(response.body_bytes)
                }
                .await;
                match result {
                    Ok(n) => {
                        bytes += n;
                        latencies.push(t.elapsed().as_secs_f64());
                    }
                    Err(error) => {
                        eprintln!("bench_client: GET failed: {error}");
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, bytes, errors)
        });
    }
    let (mut latencies, mut bytes, mut errors) = (Vec::with_capacity(count), 0u64, 0usize);
    while let Some(done) = running.join_next().await {
        let (l, b, e) = done.expect("request task");
        latencies.extend(l);
        bytes += b;
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1] * 1000.0
    };
    println!(
        "bytes={bytes} secs={secs:.6} gibps={:.4} reqs={} errors={errors} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        bytes as f64 / f64::from(1u32 << 30) / secs,
        latencies.len(),
        pct(50.0),
        pct(99.0),
        pct(100.0)
    );
    if errors > 0 || latencies.len() < count {
        return Err(io::Error::other(format!("{errors} failed, {} of {count} done", latencies.len())));
    }
    Ok(())
}

// === concurrent uploads ===

/// `conns` uploads at once, each on its own connection; prints the aggregate.
async fn upload_many(
    addr: String,
    repo: String,
    bytes: u64,
    digest: String,
    chunk: usize,
    conns: usize,
    pattern: Arc<[u8]>,
) -> io::Result<()> {
    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns {
        open.push(Conn::connect(&addr, 64 * 1024).await?);
    }
    let started = Instant::now();
    let mut running = JoinSet::new();
    for mut conn in open {
        let (repo, digest, pattern) = (repo.clone(), digest.clone(), pattern.clone());
        running.spawn(async move { conn.upload(&repo, bytes, &digest, chunk, &pattern).await });
    }
    let mut errors = 0usize;
    while let Some(done) = running.join_next().await {
        if let Err(error) = done.expect("upload task") {
            eprintln!("bench_client: upload failed: {error}");
            errors += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let total = bytes * (conns - errors) as u64;
    println!(
        "bytes={total} secs={secs:.6} gibps={:.4} conns={conns} errors={errors}",
        total as f64 / f64::from(1u32 << 30) / secs
    );
    if errors > 0 {
        return Err(io::Error::other(format!("{errors} of {conns} uploads failed")));
    }
    Ok(())
}

// === upload content ===

/// The 1 MiB pattern every upload repeats: pseudo-random, so nothing on the way compresses it.
fn pattern() -> Vec<u8> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for byte in buffer.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = (x >> 24) as u8;
    }
    buffer
}

fn content_digest(bytes: u64) -> String {
    let pattern = pattern();
    let mut hasher = Sha256::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        hasher.update(&pattern[..n]);
        left -= n as u64;
    }
    format!("sha256:{:x}", hasher.finalize())
}

// === one connection ===

struct Response {
    status: u16,
    location: Option<String>,
    body_bytes: u64,
}

fn expect(response: &Response, status: u16, what: &str) -> io::Result<()> {
    if response.status == status {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what}: status {} (wanted {status})", response.status)))
    }
}

struct Conn {
    stream: TcpStream,
    /// host:port, sent as `Host` and expected in absolute `Location`s.
    addr: String,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    async fn connect(addr: &str, buf_bytes: usize) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, addr: addr.to_owned(), buf: vec![0; buf_bytes.max(16 * 1024)], start: 0, end: 0 })
    }

    /// Reads more bytes after the buffered ones.
    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[self.start..self.start + i]).into_owned();
                self.start += i + 2;
                return Ok(line);
            }
            if self.end - self.start == self.buf.len() {
                return Err(io::Error::other("line too long"));
            }
            self.fill().await?;
        }
    }

    /// Drops `n` body bytes: the buffered ones, then reads of at most `n` (never past the body).
    async fn discard(&mut self, mut n: u64) -> io::Result<()> {
        let buffered = ((self.end - self.start) as u64).min(n) as usize;
        self.start += buffered;
        n -= buffered as u64;
        while n > 0 {
            let want = (self.buf.len() as u64).min(n) as usize;
            let got = self.stream.read(&mut self.buf[..want]).await?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Reads one response: head, then the body (discarded), by Content-Length or chunked.
    async fn response(&mut self) -> io::Result<Response> {
        let status_line = self.line().await?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked, mut location) = (None, false, None);
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<u64>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "location" => location = Some(value.to_owned()),
                _ => {}
            }
        }
        let mut body_bytes = 0;
        if status == 204 || status == 304 || (100..200).contains(&status) {
        } else if chunked {
            loop {
                let size_line = self.line().await?;
                let hex = size_line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(hex, 16).map_err(|_| io::Error::other("bad chunk size"))?;
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.discard(size).await?;
                body_bytes += size;
                self.line().await?;
            }
        } else if let Some(n) = length {
            self.discard(n).await?;
            body_bytes = n;
        } else {
            return Err(io::Error::other("response without a length (read to close is not supported)"));
        }
        Ok(Response { status, location, body_bytes })
    }

    /// The path and query of a `Location`; an absolute one must point back at `addr`, or the
    /// bytes would bypass whatever is being measured.
    fn follow(&self, location: Option<String>) -> io::Result<String> {
        let location = location.ok_or_else(|| io::Error::other("no Location"))?;
        if location.starts_with('/') {
            return Ok(location);
        }
        let rest = location.split_once("://").map(|(_, r)| r).unwrap_or(&location);
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority != self.addr {
            return Err(io::Error::other(format!("Location {location} points past {}", self.addr)));
        }
        Ok(path.to_owned())
    }

    async fn start_upload(&mut self, repo: &str) -> io::Result<String> {
        let head =
            format!("POST /v2/{repo}/blobs/uploads/ HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n", self.addr);
        self.stream.write_all(head.as_bytes()).await?;
        let response = self.response().await?;
        expect(&response, 202, "upload POST")?;
        self.follow(response.location)
    }

    async fn finish_upload(&mut self, location: &str, digest: &str) -> io::Result<()> {
        let sep = if location.contains('?') { '&' } else { '?' };
        let head =
            format!("PUT {location}{sep}digest={digest} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n", self.addr);
        self.stream.write_all(head.as_bytes()).await?;
        let response = self.response().await?;
        expect(&response, 201, "upload PUT")
    }

    /// POST, one chunked PATCH of `bytes` pattern bytes, PUT. Returns the PATCH's duration
    /// (first byte of its head written → response read).
    async fn upload(
        &mut self,
        repo: &str,
        bytes: u64,
        digest: &str,
        chunk: usize,
        pattern: &[u8],
    ) -> io::Result<(Duration, String)> {
        let chunk = chunk.clamp(1, pattern.len());
        let location = self.start_upload(repo).await?;
        let started = Instant::now();
        let head = format!(
            "PATCH {location} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            self.addr
        );
        self.stream.write_all(head.as_bytes()).await?;
        let (mut left, mut offset) = (bytes, 0usize);
        while left > 0 {
            let n = (chunk as u64).min(left).min((pattern.len() - offset) as u64) as usize;
            self.stream.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            self.stream.write_all(&pattern[offset..offset + n]).await?;
            self.stream.write_all(b"\r\n").await?;
            left -= n as u64;
            offset = (offset + n) % pattern.len();
        }
        self.stream.write_all(b"0\r\n\r\n").await?;
        let response = self.response().await?;
        let patched = started.elapsed();
        expect(&response, 202, "upload PATCH")?;
        let location = self.follow(response.location)?;
        self.finish_upload(&location, digest).await?;
        Ok((patched, digest.to_owned()))
    }

    /// A small blob in one request (POST, then PUT with the body). Returns its digest.
    async fn upload_bytes(&mut self, repo: &str, data: &[u8]) -> io::Result<String> {
        let digest = format!("sha256:{:x}", Sha256::digest(data));
        let location = self.start_upload(repo).await?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let head = format!(
            "PUT {location}{sep}digest={digest} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            data.len()
        );
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(data).await?;
        let response = self.response().await?;
        expect(&response, 201, "blob PUT")?;
        Ok(digest)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
