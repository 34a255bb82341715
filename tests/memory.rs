//! After a crowd of clients leaves, regscope gives the heap it grew for them back to the system
//! (`src/trim.rs`), and says so. Upstream connections that read large are not kept idle for
//! long, and with many client connections open a new exchange reads small (`src/buffers.rs`).

mod support;

use std::time::Duration;

use support::client::{start_upload, target_at, Conn};
use support::{eventually, metric_sum, Registry, Regscope};

/// Uploads in progress at once: each holds a client connection's grown read buffer (56 KiB) and
/// an upstream connection of its own, about 90 KiB (52 MiB resident with the crowd when
/// measured, 16 after the trim), so together well over the trim's 16 MiB.
const CROWD: usize = 400;

const TRIMMED: &str = "free heap returned to the system";

#[test]
fn the_heap_a_crowd_grew_is_given_back_once_it_has_left() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let origin = format!("http://{host}");

    // A crowd of uploads, each started and part-way through its first chunk, all still open.
    // Past the 64 upload slots each waits for the slot of one gone quiet (src/admission.rs), so
    // the crowd builds up 64 a second, and all of it streams in the end.
    let chunk = vec![0x5A; 128 << 10];
    let mut crowd: Vec<_> = (0..CROWD)
        .map(|_| {
            let mut conn = Conn::connect(proxy);
            let location = start_upload(&mut conn, &host, "trim/crowd");
            conn.send_head(
                "PATCH",
                &target_at(&location, &origin),
                &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
            )
            .unwrap();
            conn.send_chunk(&chunk).unwrap();
            conn
        })
        .collect();
    // Present for at least two looks at the process's memory (once a second): all of it is live.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(regscope.events(TRIMMED).is_empty(), "trimmed with the crowd still there");

    crowd.clear();
    let trimmed = eventually(Duration::from_secs(10), || !regscope.events(TRIMMED).is_empty());
    assert!(trimmed, "no trim within 10 s of {CROWD} uploads going away; log:\n{}", regscope.log_lines().join("\n"));
    let event = &regscope.events(TRIMMED)[0]["fields"];
    eprintln!("trim: {event}");
    let kib = |name: &str| event[name].as_u64().unwrap_or_else(|| panic!("{name} in {event}"));
    let (before, live, after) = (kib("resident_kib_before"), kib("live_kib"), kib("resident_kib_after"));
    assert!(before >= live + (16 << 10), "trimmed with less than 16 MiB resident beyond the live heap: {event}");
    assert!(after + (8 << 10) <= before, "the trim gave back less than 8 MiB: {event}");
}

/// Open connections on one side, from the `regscope_connections` gauge.
fn open(regscope: &Regscope, side: &str) -> f64 {
    metric_sum(&regscope.metrics_text(), "regscope_connections", &[("side", side)])
}

#[test]
fn a_crowd_of_open_connections_reads_small_and_large_readers_are_not_kept_idle() {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url()]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let before = open(&regscope, "registry");
    // A blob GET takes the pool (a small exchange would take the client connection's own).
    let blob = "/v2/regscope-test/crowd/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000";

    // A quiet proxy: the exchange takes a large-read upstream connection, pooled after it.
    let mut client = Conn::connect(proxy);
    assert_eq!(client.request("GET", blob, &[("Host", &host)], b"").unwrap().status(), 404);
    assert!(eventually(Duration::from_secs(5), || open(&regscope, "registry") == before + 1.0));

    // With more than 64 client connections open, the next exchange takes the smallest class:
    // a pool of its own, so a second upstream connection, although the large one is idle.
    let crowd: Vec<_> = (0..70).map(|_| Conn::connect(proxy)).collect();
    assert!(
        eventually(Duration::from_secs(5), || open(&regscope, "client") >= 71.0),
        "the crowd is not counted: {}",
        open(&regscope, "client")
    );
    assert_eq!(client.request("GET", blob, &[("Host", &host)], b"").unwrap().status(), 404);
    assert!(
        eventually(Duration::from_secs(5), || open(&regscope, "registry") == before + 2.0),
        "the crowded exchange reused the large-read connection: {} open upstream",
        open(&regscope, "registry")
    );

    // The large-read connection is closed after its 2 s; the small one stays for the idle timeout.
    assert!(
        eventually(Duration::from_secs(10), || open(&regscope, "registry") == before + 1.0),
        "the large-read connection was kept idle: {} open upstream",
        open(&regscope, "registry")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(open(&regscope, "registry"), before + 1.0, "the small-read connection was not kept");
    drop(crowd);
}
