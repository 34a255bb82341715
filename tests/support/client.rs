//! A raw HTTP/1.1 client for tests that need what a library client hides: a request body streamed
//! from a generator (chunked, paced, or cut short), a response body hashed as it arrives, request
//! lines a proxy must refuse (absolute-form, `CONNECT`), and the same over TLS through rustls.
//! Nothing is ever buffered whole, so a test can move gigabytes with a flat memory profile.
//!
//! Also here: [`Pattern`], a deterministic byte stream cheap enough to produce gigabytes of in a
//! debug build, and the blob-upload steps of the registry API that several tests share.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// How long a read may wait for the peer before the test fails instead of hanging. Generous: the
/// registry hashes and moves a large blob before it answers the final `PUT`.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes read or written per step when streaming.
const IO_CHUNK: usize = 256 << 10;

/// One HTTP/1.1 connection over any byte stream (`TcpStream`, or rustls' `StreamOwned`).
pub struct Conn<S: Read + Write> {
    /// Buffered for response parsing; writes go to the inner stream directly.
    io: BufReader<S>,
}

/// A TLS connection as [`tls_connect`] makes it.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Conn<TcpStream> {
    /// Connects over plain TCP; panics naming `addr` if it cannot.
    pub fn connect(addr: SocketAddr) -> Conn<TcpStream> {
        Conn::new(tcp_connect(addr))
    }
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn { io: BufReader::with_capacity(IO_CHUNK, stream) }
    }

    pub fn stream(&self) -> &S {
        self.io.get_ref()
    }

    /// Writes a request line and headers. The caller's headers choose the body framing
    /// (`Content-Length` or `Transfer-Encoding: chunked`) and must include `Host`.
    pub fn send_head(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) -> io::Result<()> {
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.io.get_mut().write_all(head.as_bytes())?;
        self.io.get_mut().flush()
    }

    /// Writes body bytes as they are (for a `Content-Length` body).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.get_mut().write_all(bytes)
    }

    /// Writes one chunk of a chunked body; an empty slice writes nothing (it would end the body).
    pub fn send_chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let stream = self.io.get_mut();
        stream.write_all(format!("{:x}\r\n", bytes.len()).as_bytes())?;
        stream.write_all(bytes)?;
        stream.write_all(b"\r\n")
    }

    /// Ends a chunked body.
    pub fn finish_chunks(&mut self) -> io::Result<()> {
        self.io.get_mut().write_all(b"0\r\n\r\n")?;
        self.io.get_mut().flush()
    }

    /// Reads a response head, skipping interim `1xx` responses.
    pub fn read_head(&mut self) -> io::Result<ResponseHead> {
        loop {
            let mut status_line = String::new();
            if self.io.read_line(&mut status_line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
            }
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                if self.io.read_line(&mut line)? == 0 {
                    return Err(invalid("connection closed inside a response head".into()));
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("bad header {line:?}")))?;
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            return Ok(ResponseHead { status, headers });
        }
    }

    /// Streams the body that follows `head` into `sink`, a slice at a time; returns its length.
    /// Not for responses to `HEAD`, which have no body whatever their headers say.
    pub fn read_body(&mut self, head: &ResponseHead, mut sink: impl FnMut(&[u8])) -> io::Result<u64> {
        if head.status == 204 || head.status == 304 {
            return Ok(0);
        }
        let chunked = head.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            let mut total = 0;
            loop {
                let mut size_line = String::new();
                self.io.read_line(&mut size_line)?;
                let size_field = size_line.split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size_field, 16)
                    .map_err(|_| invalid(format!("bad chunk size line {size_line:?}")))?;
                if size == 0 {
                    // Trailers, if any, then the empty line.
                    loop {
                        let mut line = String::new();
                        if self.io.read_line(&mut line)? == 0 || line.trim_end_matches(['\r', '\n']).is_empty() {
                            return Ok(total);
                        }
                    }
                }
                self.copy_exact(size, &mut sink)?;
                total += size;
                let mut crlf = [0u8; 2];
                self.io.read_exact(&mut crlf)?;
                if &crlf != b"\r\n" {
                    return Err(invalid("chunk not followed by CRLF".into()));
                }
            }
        }
        match head.content_length() {
            Some(len) => {
                self.copy_exact(len, &mut sink)?;
                Ok(len)
            }
            // Delimited by the end of the connection.
            None => {
                let mut total = 0;
                loop {
                    let buf = self.io.fill_buf()?;
                    if buf.is_empty() {
                        return Ok(total);
                    }
                    let n = buf.len();
                    sink(buf);
                    self.io.consume(n);
                    total += n as u64;
                }
            }
        }
    }

    fn copy_exact(&mut self, mut remaining: u64, sink: &mut impl FnMut(&[u8])) -> io::Result<()> {
        while remaining > 0 {
            let buf = self.io.fill_buf()?;
            if buf.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended {remaining} bytes short"),
                ));
            }
            let n = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
            sink(&buf[..n]);
            self.io.consume(n);
            remaining -= n as u64;
        }
        Ok(())
    }

    /// Reads a whole response with its body in memory: for the small ones.
    pub fn read_response(&mut self) -> io::Result<Response> {
        let head = self.read_head()?;
        let mut body = Vec::new();
        self.read_body(&head, |bytes| body.extend_from_slice(bytes))?;
        Ok(Response { head, body })
    }

    /// Sends a request with a small in-memory body (`Content-Length` framed when non-empty or for
    /// POST/PUT/PATCH) and reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let length = body.len().to_string();
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            all.push(("Content-Length", &length));
        }
        self.send_head(method, target, &all)?;
        self.send_raw(body)?;
        self.io.get_mut().flush()?;
        if method == "HEAD" {
            return Ok(Response { head: self.read_head()?, body: Vec::new() });
        }
        self.read_response()
    }

    /// `GET target` and hash the body as it streams in; returns the head, the body's length and
    /// its `sha256:` digest.
    pub fn get_hashed(&mut self, target: &str, headers: &[(&str, &str)]) -> io::Result<(ResponseHead, u64, String)> {
        self.send_head("GET", target, headers)?;
        let head = self.read_head()?;
        let mut hash = Sha256::new();
        let len = self.read_body(&head, |bytes| hash.update(bytes))?;
        Ok((head, len, format!("sha256:{}", hex(&hash.finalize()))))
    }
}

/// A status and headers.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

/// A response read whole.
#[derive(Clone, Debug)]
pub struct Response {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics showing the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// A TCP connection with the test's read timeout; panics naming `addr` if it cannot connect.
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A TLS connection to `addr` as `server_name`, trusting only `roots`, offering `alpn`. The
/// handshake completes before this returns, so the negotiated protocol can be checked.
pub fn tls_connect(addr: SocketAddr, server_name: &str, roots: rustls::RootCertStore, alpn: &[&[u8]]) -> TlsStream {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let session = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut stream = rustls::StreamOwned::new(session, tcp_connect(addr));
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    }
    stream
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of a byte slice.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

// === Pattern ===

/// Size of the random block a [`Pattern`] is cut from.
const PATTERN_BLOCK: usize = 1 << 20;
/// Rotation between consecutive blocks: odd, so the first 2^20 blocks (1 TiB) are all distinct.
const PATTERN_STRIDE: usize = 7919;

/// A deterministic pseudo-random byte stream: block `i` (1 MiB) is a seeded random block rotated
/// by `i * 7919` bytes. The same seed always gives the same stream, so a digest can be computed
/// before sending and the bytes regenerated while sending; and producing it is a `memcpy` per
/// block, fast even in a debug build (a per-word generator there runs at ~200 MiB/s).
pub struct Pattern {
    /// The random block twice over, so any rotation of it is one contiguous slice.
    doubled: Vec<u8>,
    /// Stream position of the next byte.
    position: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut state = seed | 1;
        let mut block = Vec::with_capacity(PATTERN_BLOCK);
        while block.len() < PATTERN_BLOCK {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            block.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let mut doubled = block.clone();
        doubled.extend_from_slice(&block);
        Pattern { doubled, position: 0 }
    }

    /// The next bytes of the stream, at most `max` and never crossing a block boundary.
    pub fn next_slice(&mut self, max: usize) -> &[u8] {
        let block = (self.position / PATTERN_BLOCK as u64) as usize;
        let within = (self.position % PATTERN_BLOCK as u64) as usize;
        let start = block.wrapping_mul(PATTERN_STRIDE) % PATTERN_BLOCK + within;
        let n = max.min(PATTERN_BLOCK - within);
        self.position += n as u64;
        &self.doubled[start..start + n]
    }

    /// `sha256:` of the first `len` bytes of the stream for `seed`.
    pub fn digest(seed: u64, len: u64) -> String {
        let mut pattern = Pattern::new(seed);
        let mut hash = Sha256::new();
        let mut remaining = len;
        while remaining > 0 {
            let slice = pattern.next_slice(usize::try_from(remaining).unwrap_or(usize::MAX));
            remaining -= slice.len() as u64;
            hash.update(slice);
        }
        format!("sha256:{}", hex(&hash.finalize()))
    }
}

// === registry blob uploads ===

/// `POST /v2/<repo>/blobs/uploads/`: asserts 202 and returns the `Location` as given.
pub fn start_upload<S: Read + Write>(conn: &mut Conn<S>, host: &str, repo: &str) -> String {
    let response = conn
        .request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[("Host", host)], b"")
        .unwrap_or_else(|e| panic!("POST upload for {repo}: {e}"));
    assert_eq!(response.status(), 202, "POST /v2/{repo}/blobs/uploads/: {:?} {}", response.head, response.text());
    response.header("location").unwrap_or_else(|| panic!("202 without Location: {:?}", response.head)).to_string()
}

/// The request target (path and query) of an absolute `location`, after asserting it points at
/// `origin` (e.g. `http://127.0.0.1:5001`): the next request must go back to the same place.
pub fn target_at(location: &str, origin: &str) -> String {
    let rest = location
        .strip_prefix(origin)
        .filter(|rest| rest.starts_with('/'))
        .unwrap_or_else(|| panic!("Location {location:?} does not point at {origin}"));
    rest.to_string()
}

/// `target` with `digest=<digest>` added to its query.
pub fn with_digest(target: &str, digest: &str) -> String {
    let separator = if target.contains('?') { '&' } else { '?' };
    format!("{target}{separator}digest={digest}")
}

/// A small image (a config and one `seed`-filled 32 KiB layer) pushed over `conn` to the regscope
/// or registry at `host`, as `repository:tag`: each blob by `POST` then `PUT ?digest=`, then the
/// manifest by tag. Every request also carries `extra` headers. Asserts every status.
pub fn push_small_image<S: Read + Write>(
    conn: &mut Conn<S>,
    host: &str,
    repository: &str,
    tag: &str,
    seed: u8,
    extra: &[(&str, &str)],
) {
    let headers = |more: &[(&'static str, &'static str)]| -> Vec<(String, String)> {
        let mut all = vec![("Host".to_owned(), host.to_owned())];
        all.extend(extra.iter().chain(more).map(|(k, v)| (k.to_string(), v.to_string())));
        all
    };
    let mut send = |method: &str, target: &str, more: &[(&'static str, &'static str)], body: &[u8]| {
        let owned = headers(more);
        let borrowed: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        conn.request(method, target, &borrowed, body).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    };
    let config = format!("{{\"architecture\":\"amd64\",\"seed\":{seed}}}").into_bytes();
    let layer = vec![seed; 32 << 10];
    for blob in [&config, &layer] {
        let started = send("POST", &format!("/v2/{repository}/blobs/uploads/"), &[], b"");
        assert_eq!(started.status(), 202, "{}", started.text());
        let location = started.header("location").expect("202 with a Location").to_owned();
        let target = with_digest(&target_at(&location, &format!("http://{host}")), &digest_of(blob));
        let put = send("PUT", &target, &[("Content-Type", "application/octet-stream")], blob);
        assert_eq!(put.status(), 201, "{}", put.text());
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": digest_of(&config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": digest_of(&layer)}],
    })
    .to_string();
    let content_type = ("Content-Type", "application/vnd.docker.distribution.manifest.v2+json");
    let put = send("PUT", &format!("/v2/{repository}/manifests/{tag}"), &[content_type], manifest.as_bytes());
    assert_eq!(put.status(), 201, "{}", put.text());
}
