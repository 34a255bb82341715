//! A client connection's own upstream connection reads every framing a registry may answer
//! with: sized, chunked (with extensions and trailers), until the connection's end, after an
//! interim answer, in small pieces, larger than its buffer, and for `HEAD`. A body cut short
//! reaches the client cut short, and a head too large is a 502. The origin is our own, so each
//! case is exact; it counts the connections it accepts, so reuse shows.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::client::Conn;
use support::Regscope;

/// A large body's bytes: not a repeated pattern of the buffer's size.
fn large_body() -> Vec<u8> {
    (0..100_000u32).map(|i| (i % 251) as u8).collect()
}

/// The answer to `GET /v2/t/tags/list?case=NAME`, in the pieces the origin writes it in, and
/// whether the origin closes the connection after it.
fn answer(case: &str) -> (Vec<Vec<u8>>, bool) {
    let one = |s: &str| vec![s.as_bytes().to_vec()];
    match case {
        "length" => (one("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"), false),
        "chunked" => (
            [
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r",
                "\nhel",
                "lo\r\n6;x=y\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
            ]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
            false,
        ),
        "interim" => {
            (one("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), false)
        }
        "pieces" => {
            ("HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-A: 1\r\n\r\npieces".bytes().map(|b| vec![b]).collect(), false)
        }
        "large" => {
            let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", large_body().len()).into_bytes();
            head.extend_from_slice(&large_body());
            (vec![head], false)
        }
        "close" => (one("HTTP/1.1 200 OK\r\n\r\nuntil the end"), true),
        "truncated" => (one("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"), true),
        "huge-head" => (vec![format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "b".repeat(20_000)).into_bytes()], true),
        "head" => (one("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), false),
        other => panic!("no case {other}"),
    }
}

/// Serves every connection it accepts, answering each request by its `case`.
fn origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || serve(stream));
        }
    });
    (addr, accepted)
}

fn serve(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
        }
        let case = request_line.split("case=").nth(1).and_then(|rest| rest.split(' ').next()).unwrap_or("length");
        let case = if request_line.starts_with("HEAD") { "head" } else { case };
        let (pieces, close) = answer(case);
        for piece in pieces {
            if stream.write_all(&piece).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
        if close {
            return;
        }
    }
}

fn get(conn: &mut Conn<TcpStream>, host: &str, case: &str) -> std::io::Result<support::client::Response> {
    conn.request("GET", &format!("/v2/t/tags/list?case={case}"), &[("Host", host)], &[])
}

#[test]
fn every_framing_reads_through_the_pair() {
    let (origin, accepted) = origin();
    let regscope = Regscope::start(&["--upstream", &format!("http://{origin}")]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);

    // The first exchange takes the pool; the rest share one connection of their own.
    for (case, body) in [
        ("length", &b"hello"[..]),
        ("length", b"hello"),
        ("chunked", b"hello world"),
        ("interim", b"ok"),
        ("pieces", b"pieces"),
        ("length", b"hello"),
    ] {
        let response = get(&mut conn, &host, case).unwrap();
        assert_eq!((response.status(), &response.body[..]), (200, body), "{case}");
    }
    let response = get(&mut conn, &host, "large").unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.body == large_body(), "a body larger than the pair's buffer arrives whole");
    let head = conn.request("HEAD", "/v2/t/tags/list", &[("Host", &host)], &[]).unwrap();
    assert_eq!((head.status(), head.header("content-length")), (200, Some("5")));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the pool's connection and the pair's");

    // A body that ends with the connection is whole; the next exchange opens another.
    let response = get(&mut conn, &host, "close").unwrap();
    assert_eq!((response.status(), response.text()), (200, "until the end".to_string()));
    let response = get(&mut conn, &host, "length").unwrap();
    assert_eq!(response.text(), "hello");
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection after a close-delimited body");

    // A body cut short reaches the client cut short, never complete.
    let cut = get(&mut conn, &host, "truncated");
    let error = cut.expect_err("100 bytes were promised and 10 came");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");

    // A head larger than the pair reads is the registry's fault: a 502.
    let mut conn = Conn::connect(proxy);
    get(&mut conn, &host, "length").unwrap();
    let response = get(&mut conn, &host, "huge-head").unwrap();
    assert_eq!(response.status(), 502, "{}", response.text());
    let response = get(&mut conn, &host, "length").unwrap();
    assert_eq!(response.text(), "hello", "and the client connection goes on");
}
