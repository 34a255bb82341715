//! Body framing passes through as sent: a chunked request reaches the registry chunked and a
//! `Content-Length` one with its length (the registry treats them differently: a chunked PATCH is
//! a stream, a sized one may be checked against its Range), and responses keep their framing
//! too. `Expect: 100-continue` works against the real registry.
//!
//! Framing is invisible in distribution's logs, so the first tests use an origin of their own
//! that records the raw request head; the last one uses the real registry.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use support::client::{start_upload, target_at, with_digest, Conn};
use support::{Registry, Regscope};

/// What the origin saw of one request: its head's lines (lowercased names) and its body bytes.
struct Seen {
    head: Vec<String>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// An origin that answers one request with `response` after recording it; decodes chunked and
/// sized request bodies itself so the test sees exactly what arrived.
fn origin(response: &'static [u8]) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        let seen = Seen { head, body: Vec::new() };
        let mut body = Vec::new();
        if seen.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = seen.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            reader.read_exact(&mut body).unwrap();
        }
        (&stream).write_all(response).unwrap();
        tx.send(Seen { body, ..seen }).unwrap();
    });
    (addr, rx)
}

const ACCEPTED: &[u8] = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";

fn send_upload(proxy: SocketAddr, framing: &str, body: &[u8]) -> u16 {
    let mut conn = Conn::connect(proxy);
    let host = proxy.to_string();
    let length = body.len().to_string();
    let mut headers = vec![("Host", host.as_str()), ("Content-Type", "application/octet-stream")];
    if framing == "chunked" {
        headers.push(("Transfer-Encoding", "chunked"));
        conn.send_head("PATCH", "/v2/framing/test/blobs/uploads/u-1", &headers).unwrap();
        for part in body.chunks(1000) {
            conn.send_chunk(part).unwrap();
        }
        conn.finish_chunks().unwrap();
    } else {
        headers.push(("Content-Length", length.as_str()));
        conn.send_head("PATCH", "/v2/framing/test/blobs/uploads/u-1", &headers).unwrap();
        conn.send_raw(body).unwrap();
    }
    conn.read_response().unwrap().status()
}

#[test]
fn a_chunked_request_arrives_chunked() {
    let (addr, seen) = origin(ACCEPTED);
    let regscope = Regscope::start(&["--upstream", &format!("http://{addr}")]);
    let body: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    assert_eq!(send_upload(regscope.proxy_addr(), "chunked", &body), 202);
    let seen = seen.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"), "{:?}", seen.head);
    assert_eq!(seen.header("content-length"), None, "{:?}", seen.head);
    assert_eq!(seen.body, body);
}

#[test]
fn a_sized_request_arrives_with_its_length() {
    let (addr, seen) = origin(ACCEPTED);
    let regscope = Regscope::start(&["--upstream", &format!("http://{addr}")]);
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(send_upload(regscope.proxy_addr(), "sized", &body), 202);
    let seen = seen.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(seen.header("content-length"), Some("5000"), "{:?}", seen.head);
    assert_eq!(seen.header("transfer-encoding"), None, "{:?}", seen.head);
    assert_eq!(seen.body, body);
    // The request went to the origin with forwarding headers and without hop-by-hop ones.
    assert!(seen.header("x-forwarded-for").is_some_and(|v| v.ends_with("127.0.0.1")), "{:?}", seen.head);
    assert_eq!(seen.header("host"), Some(regscope.proxy_addr().to_string().as_str()));
}

/// Reads a whole response's raw bytes up to the close.
fn raw_response(proxy: SocketAddr, target: &str) -> String {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "GET {target} HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn responses_keep_their_framing() {
    let chunked: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDocker-Content-Digest: sha256:ab\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let (addr, _seen) = origin(chunked);
    let regscope = Regscope::start(&["--upstream", &format!("http://{addr}")]);
    let raw = raw_response(regscope.proxy_addr(), "/v2/framing/test/blobs/sha256:ab");
    let lower = raw.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{raw}");
    assert!(!lower.contains("content-length"), "{raw}");
    assert!(raw.ends_with("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "{raw}");
    assert!(lower.contains("docker-content-digest: sha256:ab"), "{raw}");

    let sized: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world";
    let (addr, _seen) = origin(sized);
    let regscope = Regscope::start(&["--upstream", &format!("http://{addr}")]);
    let raw = raw_response(regscope.proxy_addr(), "/v2/framing/test/blobs/sha256:ab");
    let lower = raw.to_ascii_lowercase();
    assert!(lower.contains("content-length: 11\r\n"), "{raw}");
    assert!(!lower.contains("transfer-encoding"), "{raw}");
    assert!(raw.ends_with("\r\n\r\nhello world"), "{raw}");
}

/// `Expect: 100-continue` against the real registry: the client holds its body until regscope
/// says `100 Continue`, then the upload completes.
#[test]
fn expect_continue_works_with_the_real_registry() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, "framing/expect");
    let target = target_at(&location, &format!("http://{host}"));
    let body = b"a blob sent only after 100 Continue".to_vec();
    let digest = support::client::digest_of(&body);
    // Raw, on a connection of its own: the library client skips interim responses.
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        stream,
        "PUT {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        with_digest(&target, &digest),
        body.len()
    )
    .unwrap();
    let interim = read_until_blank_line(&mut stream);
    assert!(interim.starts_with("HTTP/1.1 100"), "regscope must invite the body first: {interim:?}");
    stream.write_all(&body).unwrap();
    let done = read_until_blank_line(&mut stream);
    assert!(done.starts_with("HTTP/1.1 201"), "{done}");
    assert!(done.to_ascii_lowercase().contains(&format!("docker-content-digest: {digest}")), "{done}");
}

/// Bytes up to and including the next empty line, as text.
fn read_until_blank_line(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
