//! Who the client is behind a balancer: `--trusted-proxies` believes the forwarding headers of
//! trusted peers only, and `--proxy-protocol` takes the client from the PROXY header that haproxy
//! (the real one, `send-proxy` and `send-proxy-v2`) puts in front of each connection; a
//! connection without a valid header is closed with nothing forwarded.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regscope::TransferDirection;
use support::client::{push_small_image, Conn};
use support::replay::wait_for_transfer;
use support::{free_port, wait_for_tcp, Registry, Regscope, TempDir};

/// A small image pushed over `conn` to regscope at `host`, every request carrying `extra`.
fn push(conn: &mut Conn<TcpStream>, host: &str, repository: &str, extra: &[(&str, &str)]) {
    push_small_image(conn, host, repository, "v1", 0x42, extra);
}

/// A connection to `to` from the loopback address `from` (any 127/8 address is this machine).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

fn client_of(regscope: &Regscope, repository: &str) -> String {
    wait_for_transfer(regscope.admin_addr(), TransferDirection::Push, repository, Duration::from_secs(10)).client
}

#[test]
fn forwarded_headers_name_the_client_only_from_a_trusted_peer() {
    let registry = Registry::start();
    let trusting = Regscope::start(&["--upstream", &registry.url(), "--trusted-proxies", "10.0.0.0/8,127.0.0.1"]);
    let doubting = Regscope::start(&["--upstream", &registry.url(), "--trusted-proxies", "10.0.0.0/8"]);
    type Case<'a> = (&'a Regscope, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&trusting, "identity/xff", &[("X-Forwarded-For", "203.0.113.7, 10.1.2.3")], "203.0.113.7"),
        (&trusting, "identity/forwarded", &[("Forwarded", r#"for="[2001:db8::7]:4711";proto=https"#)], "2001:db8::7"),
        (&doubting, "identity/stranger", &[("X-Forwarded-For", "203.0.113.7")], "127.0.0.1"),
        (&doubting, "identity/stranger-forwarded", &[("Forwarded", "for=203.0.113.7")], "127.0.0.1"),
    ];
    for (regscope, repository, headers, want) in cases {
        let host = regscope.proxy_addr().to_string();
        push(&mut Conn::connect(regscope.proxy_addr()), &host, repository, headers);
        assert_eq!(client_of(regscope, repository), *want, "{repository} {headers:?}");
    }
    // The log names the same client as the transfer.
    let logged: Vec<String> = trusting.request_log().iter().map(|e| e.client.clone()).collect();
    assert!(logged.iter().any(|c| c.starts_with("203.0.113.7")), "{logged:?}");
}

/// haproxy in TCP mode in front of regscope: one frontend sending PROXY v1, one sending v2.
struct Haproxy {
    child: Child,
    v1: SocketAddr,
    v2: SocketAddr,
    _dir: TempDir,
}

impl Haproxy {
    fn start(regscope: SocketAddr) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let (v1, v2) = (free_port(), free_port());
        let config = format!(
            "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend v1\nbackend v1\n  server regscope {regscope} send-proxy\n\
             frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend v2\nbackend v2\n  server regscope {regscope} send-proxy-v2\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let binary = ["/usr/sbin/haproxy", "haproxy"].into_iter().find(|b| Command::new(b).arg("-v").output().is_ok());
        let child = Command::new(binary.expect("haproxy is installed (script/test installs it)"))
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let (v1, v2) = (SocketAddr::from(([127, 0, 0, 1], v1)), SocketAddr::from(([127, 0, 0, 1], v2)));
        assert!(
            wait_for_tcp(v1, Duration::from_secs(10)) && wait_for_tcp(v2, Duration::from_secs(10)),
            "haproxy listens"
        );
        Haproxy { child, v1, v2, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn haproxy_proxy_protocol_v1_and_v2_name_the_real_client() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--proxy-protocol"]);
    let haproxy = Haproxy::start(regscope.proxy_addr());
    for (front, from, repository) in
        [(haproxy.v1, "127.0.0.2", "identity/v1"), (haproxy.v2, "127.0.0.3", "identity/v2")]
    {
        let mut conn = Conn::new(connect_from(from, front));
        push(&mut conn, &front.to_string(), repository, &[]);
        assert_eq!(client_of(&regscope, repository), from, "through {repository}");
    }
}

#[test]
fn a_connection_without_a_valid_proxy_header_is_closed_with_nothing_forwarded() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--proxy-protocol", "--header-read-timeout", "2s"]);
    let proxy = regscope.proxy_addr();
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {proxy}\r\n\r\n");
    let attempts = [
        ("no header", request("/v2/identity/none/tags/list")),
        ("malformed v1", format!("PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n{}", request("/v2/identity/v1bad/tags/list"))),
        ("v1 too long", format!("PROXY TCP4 {} 1 2\r\n{}", "1".repeat(120), request("/v2/identity/long/tags/list"))),
        (
            "v2 of a bad version",
            format!("\r\n\r\n\0\r\nQUIT\n\x31\x11\0\x0c{}{}", "\0".repeat(12), request("/v2/identity/v2bad/tags/list")),
        ),
    ];
    for (what, bytes) in &attempts {
        let mut stream = TcpStream::connect(proxy).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = stream.write_all(bytes.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{what}: regscope answered {:?}", String::from_utf8_lossy(&answer));
    }
    // A valid header, written by the client itself, is served and names its client.
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.write_all(b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 5001\r\n").unwrap();
    push(&mut Conn::new(stream), &proxy.to_string(), "identity/valid", &[]);
    assert_eq!(client_of(&regscope, "identity/valid"), "192.0.2.9");
    let forwarded = registry.served_requests();
    assert!(forwarded.iter().any(|r| r.path.contains("identity/valid")), "the valid one reached the registry");
    let leaked: Vec<_> = forwarded.iter().filter(|r| r.path.contains("/tags/list")).collect();
    assert!(leaked.is_empty(), "nothing of the refused connections reached the registry: {leaked:?}");
}
