//! The front (regscope's own HTTP/1 for small bodiless requests) as a client sees it: pipelined
//! requests answered in order, the connection handed to hyper at the first request with a body
//! (and at a malformed or oversized head, which hyper answers), `HEAD` and `Connection: close`
//! as HTTP says, and a client that leaves cancelling its request. The origin is our own and
//! answers each request with its method and target, so every answer shows which request it is.

mod support;

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::client::Conn;
use support::Regscope;
use support::{head_header, read_request_head};

/// How long the origin waits before answering a target with `slow` in it.
const SLOW: Duration = Duration::from_secs(2);

/// Answers every request with `METHOD TARGET` (and the length of any body it read) as its body.
fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            thread::spawn(move || serve(stream));
        }
    });
    addr
}

fn serve(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    while let Some((request_line, headers)) = read_request_head(&mut reader) {
        let length = head_header(&headers, "content-length").map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut words = request_line.split(' ');
        let (method, target) = (words.next().unwrap(), words.next().unwrap());
        if target.contains("slow") {
            thread::sleep(SLOW);
        }
        let answer = format!("{method} {target} {length}");
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Origin: yes\r\n\r\n", answer.len());
        let body = if method == "HEAD" { String::new() } else { answer };
        if stream.write_all(format!("{head}{body}").as_bytes()).is_err() {
            return;
        }
    }
}

fn start() -> (Regscope, SocketAddr) {
    let regscope = Regscope::start(&["--upstream", &format!("http://{}", origin())]);
    let proxy = regscope.proxy_addr();
    (regscope, proxy)
}

fn head(method: &str, target: &str, host: &str, extra: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_regscope, proxy) = start();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    let targets = ["/v2/a/manifests/one", "/v2/a/tags/list", "/v2/", "/v2/a/manifests/four"];
    let all: String = targets.iter().map(|t| head("GET", t, &host, "")).collect();
    conn.send_raw(all.as_bytes()).unwrap();
    for target in targets {
        let response = conn.read_response().unwrap();
        assert_eq!((response.status(), response.text()), (200, format!("GET {target} 0")));
        assert_eq!(response.header("x-origin"), Some("yes"));
        assert!(response.header("date").is_some(), "a date, as hyper adds one");
    }
}

#[test]
fn a_request_with_a_body_hands_the_connection_to_hyper() {
    let (_regscope, proxy) = start();
    let host = proxy.to_string();
    let h = [("Host", host.as_str())];
    let mut conn = Conn::connect(proxy);
    let steps: [(&str, &str, &[u8]); 4] = [
        ("GET", "/v2/a/manifests/latest", b""),
        ("PUT", "/v2/a/manifests/latest", b"{\"schemaVersion\":2}"),
        ("GET", "/v2/a/manifests/latest", b""),
        ("PATCH", "/v2/a/blobs/uploads/u1", b"12345"),
    ];
    for (method, target, body) in steps {
        let response = conn.request(method, target, &h, body).unwrap();
        assert_eq!(response.text(), format!("{method} {target} {}", body.len()));
    }

    // A malformed head after a served request: hyper's 400. An oversized one: its 431.
    for (bad, status) in [("GET /v2/ HTTP/1.1\r\nBad Header\r\n\r\n".to_string(), 400), (oversized(&host), 431)] {
        let mut conn = Conn::connect(proxy);
        let response = conn.request("GET", "/v2/a/manifests/latest", &h, b"").unwrap();
        assert_eq!(response.status(), 200);
        conn.send_raw(bad.as_bytes()).unwrap();
        assert_eq!(conn.read_response().unwrap().status(), status);
    }
}

/// A request head larger than regscope takes (64 KiB by default).
fn oversized(host: &str) -> String {
    head("GET", "/v2/", host, &format!("X-Big: {}\r\n", "b".repeat(100_000)))
}

#[test]
fn heads_and_closes_follow_http() {
    let (_regscope, proxy) = start();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    // A HEAD's answer keeps its length and has no body: the next answer follows at once.
    let answer = conn.request("HEAD", "/v2/a/manifests/latest", &[("Host", &host)], b"").unwrap();
    assert_eq!(answer.head.content_length(), Some("HEAD /v2/a/manifests/latest 0".len() as u64));
    let next = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    assert_eq!(next.text(), "GET /v2/ 0");

    // `Connection: close`: answered, said so, and closed.
    conn.send_raw(head("GET", "/v2/", &host, "Connection: close\r\n").as_bytes()).unwrap();
    let response = conn.read_response().unwrap();
    assert_eq!((response.text(), response.header("connection")), ("GET /v2/ 0".to_string(), Some("close")));
    let mut rest = Vec::new();
    let mut stream = conn.stream().try_clone().unwrap();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed after the answer");
}

#[test]
fn a_client_that_leaves_cancels_its_request() {
    let (_regscope, proxy) = start();
    let host = proxy.to_string();
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_read_timeout(Some(SLOW * 5)).unwrap();
    // A served request first, so the slow one is the connection's second.
    stream.write_all(head("GET", "/v2/", &host, "").as_bytes()).unwrap();
    let mut conn = Conn::new(stream.try_clone().unwrap());
    assert_eq!(conn.read_response().unwrap().status(), 200);
    stream.write_all(head("GET", "/v2/a/manifests/slow", &host, "").as_bytes()).unwrap();
    thread::sleep(Duration::from_millis(100));
    let left = Instant::now();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no answer after the client left: {}", String::from_utf8_lossy(&rest));
    assert!(
        left.elapsed() < SLOW / 2,
        "closed when the client left, not when the origin answered: {:?}",
        left.elapsed()
    );
}
