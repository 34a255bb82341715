//! The limits that keep one client from hurting the others, each met by the client it is for: a
//! slowloris, an idle keep-alive connection, an oversized head, a crowd of connections, and an
//! upload that stops sending mid-body.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::client::{digest_of, start_upload, target_at, Conn, Pattern};
use support::hostile::{
    committed_blobs, ping, raw_exchange, read_until_closed, registry_blob_status, start_cut_upload,
    wait_registry_logged, Framing,
};
use support::{eventually, metric_sum, Registry, Regscope};

const REPO: &str = "regscope-test/limits";

fn client_connections(regscope: &Regscope) -> f64 {
    metric_sum(&regscope.metrics_text(), "regscope_connections", &[("side", "client")])
}

#[test]
fn a_slowloris_head_is_cut_off_after_the_header_read_timeout() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--header-read-timeout", "1s"]);
    let proxy = regscope.proxy_addr();

    let mut stream = TcpStream::connect(proxy).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {proxy}\r\nX-Slow: ").as_bytes()).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    let mut answer = Vec::new();
    // One byte every 300 ms, reading in between: a head that never ends, but never goes quiet.
    let cut_after = loop {
        if started.elapsed() > Duration::from_secs(10) {
            panic!("a slowloris sent {sent} header bytes over 10 s and was never disconnected");
        }
        if stream.write_all(b"a").is_err() {
            break started.elapsed();
        }
        sent += 1;
        stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf) {
            Ok(0) => break started.elapsed(),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break started.elapsed(),
        }
    };
    eprintln!(
        "slowloris: {sent} header bytes, disconnected after {cut_after:?}; answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(sent >= 3, "the slowloris was cut before it had sent 3 bytes ({sent}): not the timeout at work");
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(4),
        "a slowloris with --header-read-timeout 1s was disconnected after {cut_after:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "the only acceptable answer to a head that never ends is 408: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(ping(proxy), 200, "regscope keeps serving");
    assert!(
        registry.served_requests().iter().all(|r| r.path == "/v2/"),
        "the unfinished head must not reach the registry: {:?}",
        registry.served_requests()
    );
    assert!(eventually(Duration::from_secs(5), || client_connections(&regscope) == 0.0));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--header-read-timeout", "1s"]);
    let proxy = regscope.proxy_addr();

    // A keep-alive connection that has been served once, then says nothing.
    let mut served = Conn::connect(proxy);
    let response = served.request("GET", "/v2/", &[("Host", &proxy.to_string())], b"").unwrap();
    assert_eq!(response.status(), 200);
    let idle_since = Instant::now();
    let mut stream = served.stream().try_clone().unwrap();
    let reply = read_until_closed(&mut stream, Duration::from_secs(6));
    let closed_after = idle_since.elapsed();
    eprintln!("idle keep-alive connection closed after {closed_after:?}");
    assert!(reply.closed, "an idle keep-alive connection still open after 6 s with --header-read-timeout 1s");
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
        "idle keep-alive connection closed after {closed_after:?}, want about 1 s"
    );
    assert!(reply.bytes.is_empty() || reply.status == Some(408), "unexpected answer {:?}", reply.text());
    assert!(eventually(Duration::from_secs(5), || client_connections(&regscope) == 0.0));
    assert_eq!(ping(proxy), 200);
}

/// The header read timeout is for heads only: an upload whose body takes longer than it is
/// served whole, and the same connection is closed only once it has waited that long for a head.
#[test]
fn a_request_slower_than_the_header_read_timeout_is_served_and_the_wait_after_it_is_cut() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--header-read-timeout", "1s"]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPO);
    let target = target_at(&location, &format!("http://{host}"));

    let mut pattern = Pattern::new(0x510E_B0D7);
    let data = pattern.next_slice(64 * 1024).to_vec();
    let started = Instant::now();
    conn.send_head("PATCH", &target, &[("Host", &host), ("Transfer-Encoding", "chunked")]).unwrap();
    // Five pieces 600 ms apart: the body takes 2.4 s, more than twice the head timeout.
    for (i, piece) in data.chunks(data.len() / 5 + 1).enumerate() {
        if i > 0 {
            thread::sleep(Duration::from_millis(600));
        }
        conn.send_chunk(piece).unwrap();
    }
    conn.finish_chunks().unwrap();
    let response = conn.read_response().unwrap();
    assert!(started.elapsed() > Duration::from_secs(2), "the body was not slow: {:?}", started.elapsed());
    assert_eq!(response.status(), 202, "a slow body on a connection with a 1 s head timeout: {}", response.text());
    assert_eq!(response.header("range"), Some(format!("0-{}", data.len() - 1).as_str()));

    let idle_since = Instant::now();
    let mut stream = conn.stream().try_clone().unwrap();
    let reply = read_until_closed(&mut stream, Duration::from_secs(6));
    let closed_after = idle_since.elapsed();
    assert!(
        reply.closed && reply.bytes.is_empty(),
        "after the response: {:?} (closed: {})",
        reply.text(),
        reply.closed
    );
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
        "closed {closed_after:?} after its last response, want about 1 s"
    );
}

/// A connection that never completes the first bytes of a request (nothing at all, or the `P` that
/// might begin an HTTP/2 preface) is a slowloris too: it must be closed after the header read
/// timeout, or a few of them hold every `--max-connections` slot for good.
#[test]
fn a_connection_that_never_sends_a_request_is_closed_and_frees_its_slot() {
    let registry = Registry::start();
    let regscope =
        Regscope::start(&["--upstream", &registry.url(), "--header-read-timeout", "1s", "--max-connections", "3"]);
    let proxy = regscope.proxy_addr();
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(proxy).unwrap()).collect();
    silent[2].write_all(b"P").unwrap();
    let mut closed_after = Vec::new();
    for stream in &mut silent {
        let reply = read_until_closed(stream, Duration::from_secs(5).saturating_sub(opened.elapsed()));
        closed_after.push(reply.closed.then(|| opened.elapsed()));
    }
    eprintln!("silent connections closed after {closed_after:?} (None: still open 5 s later)");
    let status = ping(proxy);
    assert!(
        closed_after.iter().all(|c| c.is_some_and(|t| t < Duration::from_secs(4))),
        "connections that never sent a request were still open 5 s later with --header-read-timeout 1s: \
         {closed_after:?}; a real client now gets {status} (the slots are held)"
    );
    assert_eq!(status, 200, "the slots of the silent connections are free again");
}

#[test]
fn an_oversized_head_is_refused_and_the_proxy_keeps_serving() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--max-header-bytes", "8192"]);
    let proxy = regscope.proxy_addr();

    let head = |value_len: usize| {
        format!("GET /v2/ HTTP/1.1\r\nHost: {proxy}\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(value_len))
    };
    // Under the limit: forwarded as usual, so the limit is not simply "refuse everything".
    let small = raw_exchange(proxy, head(4 << 10).as_bytes(), Duration::from_secs(10));
    assert_eq!(small.status, Some(200), "a 4 KiB header under an 8 KiB limit: {}", small.text());

    let big = raw_exchange(proxy, head(16 << 10).as_bytes(), Duration::from_secs(10));
    eprintln!("16 KiB header: {:?}", big.text().lines().next());
    assert!(
        matches!(big.status, Some(431) | Some(400)),
        "a 16 KiB header over --max-header-bytes 8192 must get 431 or 400: {:?}",
        big.text()
    );
    assert!(big.closed, "the connection is closed after the refusal");
    assert_eq!(ping(proxy), 200, "regscope keeps serving");
    assert!(eventually(Duration::from_secs(5), || registry.served_requests().len() == 2));
    thread::sleep(Duration::from_millis(200));
    assert_eq!(registry.served_requests().len(), 2, "only the 4 KiB request and the ping reached the registry");
}

#[test]
fn connections_beyond_max_connections_get_a_registry_style_503() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--max-connections", "5"]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();

    // Five keep-alive connections, each served once and left open.
    let mut held: Vec<Conn<TcpStream>> = (0..5)
        .map(|i| {
            let mut conn = Conn::connect(proxy);
            let response = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
            assert_eq!(response.status(), 200, "connection {i} of 5 is served");
            conn
        })
        .collect();
    assert_eq!(client_connections(&regscope), 5.0);

    // The sixth sends a request as any client would, and gets the registry's error shape.
    let sixth =
        raw_exchange(proxy, format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(), Duration::from_secs(10));
    assert_eq!(sixth.status, Some(503), "the 6th connection: {:?}", sixth.text());
    let json = sixth.json().unwrap_or_else(|| panic!("the 503 has a JSON body: {:?}", sixth.text()));
    assert_eq!(json["errors"][0]["code"], "UNAVAILABLE", "{json}");
    let text = sixth.text().to_ascii_lowercase();
    assert!(text.contains("content-type: application/json"), "{text}");
    assert!(text.contains("retry-after:"), "{text}");
    assert!(sixth.closed, "the refused connection is closed");
    assert!(client_connections(&regscope) <= 5.0, "the refused connection was never counted as served");

    // The held ones still work, and a freed slot is reused.
    let response = held[0].request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    assert_eq!(response.status(), 200, "a held connection still works");
    drop(held.pop());
    assert!(eventually(Duration::from_secs(5), || client_connections(&regscope) == 4.0));
    assert_eq!(ping(proxy), 200, "a slot freed by a closed connection serves a new one");
    let served = registry.served_requests_once(|served| served.len() >= 7);
    assert_eq!(served.len(), 7, "5 held + 1 reuse + 1 ping reached the registry, the refused one did not: {served:?}");
}

#[test]
fn an_upload_whose_client_stops_sending_is_cut_off_and_nothing_is_committed() {
    const BLOB: usize = 2 << 20;
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--body-stall-timeout", "1s"]);
    let mut pattern = Pattern::new(0x57A1_1ED0);
    let mut data = Vec::with_capacity(BLOB);
    while data.len() < BLOB {
        data.extend_from_slice(pattern.next_slice(BLOB - data.len()));
    }
    let stalled = |regscope: &Regscope, direction: &str| {
        metric_sum(&regscope.metrics_text(), "regscope_stalled_bodies_total", &[("direction", direction)])
    };

    for (round, framing) in [Framing::ContentLength, Framing::Chunked].into_iter().enumerate() {
        // Half the body, under the digest of that half: if the cut-off upstream body ended
        // cleanly, the registry would commit it.
        let cut = BLOB / 2 + 100;
        let upload = start_cut_upload(regscope.proxy_addr(), REPO, &data, cut, &digest_of(&data[..cut]), framing);
        let stopped = Instant::now();
        // The client keeps the connection open and sends nothing: only the stall timeout ends this.
        let mut stream = upload.conn.stream().try_clone().unwrap();
        let reply = read_until_closed(&mut stream, Duration::from_secs(8));
        let answered = stopped.elapsed();
        eprintln!(
            "{framing:?}: client stalled; after {answered:?} it saw {:?} (closed: {})",
            reply.status, reply.closed
        );
        assert!(reply.closed || reply.status.is_some(), "{framing:?}: nothing happened 8 s after the client stalled");
        assert!(
            answered >= Duration::from_millis(900) && answered < Duration::from_secs(5),
            "{framing:?}: the stalled upload was cut off after {answered:?}, want about 1 s"
        );
        assert!(
            !matches!(reply.status, Some(200..=299)),
            "{framing:?}: a success for a stalled body: {}",
            reply.text()
        );

        let statuses = wait_registry_logged(&registry, "PUT", &upload.upload_path, Duration::from_secs(10));
        assert!(!statuses.is_empty(), "{framing:?}: the upstream request was never cut:\n{}", registry.log_text());
        assert!(!statuses.contains(&201), "{framing:?}: the registry committed a stalled upload: {statuses:?}");
        for digest in &upload.truncated_digests {
            assert_eq!(registry_blob_status(&registry, REPO, digest), 404, "{framing:?}: {digest} committed");
        }
        assert!(committed_blobs(&registry.storage_dir()).is_empty(), "{framing:?}: the registry stored a blob");

        let want = (round + 1) as f64;
        assert!(
            eventually(Duration::from_secs(5), || stalled(&regscope, "upload") == want),
            "{framing:?}: regscope_stalled_bodies_total{{direction=upload}} = {}, want {want}",
            stalled(&regscope, "upload")
        );
        assert_eq!(stalled(&regscope, "download"), 0.0);
        // Logged as the metric is counted, but read from regscope's stderr by a thread.
        let logged = |regscope: &Regscope| {
            regscope.events("request").iter().filter(|e| e["fields"]["aborted"] == "client").count()
        };
        assert!(
            eventually(Duration::from_secs(5), || logged(&regscope) == round + 1),
            "{framing:?}: the stalled request's event"
        );
        let event = regscope.events("request").into_iter().rfind(|e| e["fields"]["aborted"] == "client").unwrap();
        assert_eq!(event["fields"]["operation"], "upload_finish", "{event}");
        assert_eq!(event["fields"]["aborted"], "client", "the stall is the client's: {event}");
    }
    assert_eq!(ping(regscope.proxy_addr()), 200);
}
