//! After a crowd of clients leaves, regscope gives the heap it grew for them back to the system
//! (`src/trim.rs`), and says so.

mod support;

use std::time::Duration;

use support::client::Conn;
use support::{eventually, Registry, Regscope};

const CROWD: usize = 120;

#[test]
fn the_heap_a_crowd_grew_is_given_back_once_it_has_left() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();

    // A crowd of clients, each with a request answered through the registry, all still connected.
    let mut crowd: Vec<_> = (0..CROWD)
        .map(|_| {
            let mut conn = Conn::connect(proxy);
            let response = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
            assert_eq!(response.status(), 200);
            conn
        })
        .collect();
    // Present for at least one full look at the open connections (once a second).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        regscope.events("burst over: free heap returned to the system").is_empty(),
        "trimmed with the crowd still there"
    );

    crowd.clear();
    let trimmed = eventually(Duration::from_secs(10), || {
        !regscope.events("burst over: free heap returned to the system").is_empty()
    });
    assert!(trimmed, "no trim within 10 s of {CROWD} connections closing; log:\n{}", regscope.log_lines().join("\n"));
    let event = &regscope.events("burst over: free heap returned to the system")[0]["fields"];
    eprintln!("trim: {event}");
    assert!(event["peak"].as_u64().unwrap() >= CROWD as u64, "the burst's peak is the crowd: {event}");
    assert!(event["open"].as_u64().unwrap() <= CROWD as u64 / 4, "trimmed only once the crowd had left: {event}");
    let before = event["resident_kib_before"].as_u64().expect("resident memory before");
    let after = event["resident_kib_after"].as_u64().expect("resident memory after");
    assert!(after <= before, "a trim never grows the process: {before} KiB before, {after} KiB after");
}
