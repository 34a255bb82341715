//! A client connection's small exchanges (no request body, no blob in the answer) go over an
//! upstream connection of its own, opened on its second one and kept; its first, blobs and
//! bodies take the pool; and no pairs are made while more than 64 client connections are open. Counted with
//! regscope's own connect histogram, in front of the real registry.

mod support;

use std::net::TcpStream;
use std::time::Duration;

use support::client::{digest_of, start_upload, target_at, with_digest, Conn};
use support::{eventually, metric_sum, Registry, Regscope};

const REPO: &str = "regscope-test/paired";

/// regscope on one event loop. A pooled connection goes back to the pool a moment after the
/// response it carried; with more loops that happens on other threads, and a next request that
/// arrives first opens a connection of its own, which would make the counts below a race.
fn regscope_on_one_loop(registry: &Registry) -> Regscope {
    Regscope::start(&["--upstream", &registry.url(), "--threads", "1"])
}

/// Upstream connections regscope has opened so far.
fn connects(regscope: &Regscope) -> f64 {
    metric_sum(&regscope.metrics_text(), "regscope_upstream_connect_seconds_count", &[])
}

/// `n` small exchanges on `conn`, each answered as the registry answers it.
fn small_exchanges(conn: &mut Conn<TcpStream>, host: &str, n: usize) {
    for i in 0..n {
        let (method, target, status) = match i % 3 {
            0 => ("GET", "/v2/".to_string(), 200),
            1 => ("HEAD", format!("/v2/{REPO}/manifests/latest"), 404),
            _ => ("GET", format!("/v2/{REPO}/tags/list"), 404),
        };
        let response = conn.request(method, &target, &[("Host", host)], &[]).unwrap();
        assert_eq!(response.status(), status, "{method} {target}: {}", response.text());
    }
}

#[test]
fn small_exchanges_share_an_upstream_connection_of_their_client_connection() {
    let mut registry = Registry::start();
    let regscope = regscope_on_one_loop(&registry);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let before = connects(&regscope);
    let opened = || connects(&regscope) - before;

    // The first exchange takes the pool (one connection), the second makes the pair (another).
    let mut a = Conn::connect(proxy);
    small_exchanges(&mut a, &host, 9);
    assert_eq!(opened(), 2.0, "nine small exchanges on one client connection: the pool's and its own");
    let mut b = Conn::connect(proxy);
    small_exchanges(&mut b, &host, 6);
    assert_eq!(opened(), 3.0, "a second client connection reuses the pool's, then opens its own");
    small_exchanges(&mut a, &host, 3);
    assert_eq!(opened(), 3.0, "the first keeps its own");

    // A blob's upload and download take the pool, whose connection is idle.
    let blob = vec![0x5a; 256 << 10];
    let location = start_upload(&mut a, &host, REPO);
    let target = with_digest(&target_at(&location, &format!("http://{host}")), &digest_of(&blob));
    let put = a.request("PUT", &target, &[("Host", &host), ("Content-Type", "application/octet-stream")], &blob);
    assert_eq!(put.unwrap().status(), 201);
    let (head, len, digest) =
        a.get_hashed(&format!("/v2/{REPO}/blobs/{}", digest_of(&blob)), &[("Host", &host)]).unwrap();
    assert_eq!((head.status, len, digest), (200, blob.len() as u64, digest_of(&blob)));
    assert_eq!(opened(), 3.0, "the PUT and the GET took the pooled connection");
    small_exchanges(&mut a, &host, 3);
    assert_eq!(opened(), 3.0, "and the client connection's own is still there");

    // The registry restarts: the pair's connection is gone, and the next exchange opens another.
    registry.restart();
    small_exchanges(&mut a, &host, 3);
    assert_eq!(opened(), 4.0, "one new connection after the restart");
}

#[test]
fn a_client_that_opens_a_connection_per_request_reuses_the_pool() {
    let registry = Registry::start();
    let regscope = regscope_on_one_loop(&registry);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let before = connects(&regscope);
    for _ in 0..8 {
        small_exchanges(&mut Conn::connect(proxy), &host, 1);
    }
    assert_eq!(connects(&regscope) - before, 1.0, "eight one-request client connections, one after the other");
}

#[test]
fn no_pairs_are_made_while_more_than_64_client_connections_are_open() {
    let registry = Registry::start();
    let regscope = regscope_on_one_loop(&registry);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let clients_open = || metric_sum(&regscope.metrics_text(), "regscope_connections", &[("side", "client")]);

    let mut idle: Vec<TcpStream> = (0..70).map(|_| TcpStream::connect(proxy).unwrap()).collect();
    assert!(eventually(Duration::from_secs(10), || clients_open() >= 70.0), "{} open", clients_open());
    let before = connects(&regscope);
    let mut busy: Vec<Conn<TcpStream>> = (0..3).map(|_| Conn::connect(proxy)).collect();
    for conn in &mut busy {
        small_exchanges(conn, &host, 2);
    }
    assert_eq!(connects(&regscope) - before, 1.0, "three client connections, one after the other, share the pool");

    idle.clear();
    assert!(eventually(Duration::from_secs(10), || clients_open() <= 64.0), "{} open", clients_open());
    small_exchanges(&mut busy[0], &host, 3);
    assert_eq!(connects(&regscope) - before, 2.0, "with 64 or fewer open, a client connection gets its own");
    small_exchanges(&mut busy[0], &host, 3);
    assert_eq!(connects(&regscope) - before, 2.0, "and keeps it");
}
