//! Upload and download admission (`--upload-slots`, `--download-slots`,
//! `src/limits/admission.rs`) against the real registry, with one slot: a transfer that keeps
//! moving keeps it, and the next one waits until it is over; one whose client goes quiet loses it
//! after about a second and carries on without it. Either way every blob arrives whole, and the
//! waits are counted.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use support::client::{digest_of, start_upload, target_at, with_digest, Conn, Pattern};
use support::{metric_sum, Registry, Regscope};

const REPO: &str = "admission/blobs";

fn one_slot() -> (Registry, Regscope) {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--upload-slots", "1"]);
    (registry, regscope)
}

/// A connection that has started an upload and sent the head of a chunked PATCH for it.
fn open_chunked_patch(proxy: SocketAddr) -> Conn<std::net::TcpStream> {
    let mut conn = Conn::connect(proxy);
    let host = proxy.to_string();
    let location = start_upload(&mut conn, &host, REPO);
    let headers =
        [("Host", host.as_str()), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")];
    conn.send_head("PATCH", &target_at(&location, &format!("http://{host}")), &headers).unwrap();
    conn
}

/// Ends the chunked PATCH on `conn`, then commits the blob with a PUT.
fn finish_chunked(conn: &mut Conn<std::net::TcpStream>, proxy: SocketAddr, blob: &[u8]) {
    conn.finish_chunks().unwrap();
    let patched = conn.read_response().unwrap();
    assert_eq!(patched.status(), 202, "PATCH: {}", patched.text());
    commit(conn, proxy, patched.header("location").expect("202 with a Location"), blob);
}

fn commit(conn: &mut Conn<std::net::TcpStream>, proxy: SocketAddr, location: &str, blob: &[u8]) {
    let host = proxy.to_string();
    let target = with_digest(&target_at(location, &format!("http://{host}")), &digest_of(blob));
    let put = conn.request("PUT", &target, &[("Host", &host)], b"").unwrap();
    assert_eq!(put.status(), 201, "PUT: {}", put.text());
}

/// A whole upload on a connection of its own: POST, one PATCH with the blob, PUT.
fn upload_whole(proxy: SocketAddr, blob: &[u8]) {
    let host = proxy.to_string();
    let mut conn = Conn::connect(proxy);
    let location = start_upload(&mut conn, &host, REPO);
    let headers = [("Host", host.as_str()), ("Content-Type", "application/octet-stream")];
    let patched = conn.request("PATCH", &target_at(&location, &format!("http://{host}")), &headers, blob).unwrap();
    assert_eq!(patched.status(), 202, "PATCH: {}", patched.text());
    commit(&mut conn, proxy, patched.header("location").expect("202 with a Location"), blob);
}

/// The registry holds the blob at its length (asked directly, not through regscope).
fn assert_stored(registry: &Registry, blob: &[u8]) {
    let host = registry.addr().to_string();
    let mut conn = Conn::connect(registry.addr());
    let target = format!("/v2/{REPO}/blobs/{}", digest_of(blob));
    let head = conn.request("HEAD", &target, &[("Host", &host)], b"").unwrap();
    assert_eq!(head.status(), 200, "HEAD {target} at the registry");
    assert_eq!(head.header("content-length"), Some(blob.len().to_string().as_str()), "HEAD {target}");
}

/// `len` bytes of the pattern for `seed`, however many of its blocks that takes.
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut pattern = Pattern::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(pattern.next_slice(len - out.len()));
    }
    out
}

/// (transfers waiting now, waits counted, seconds waited in all), of `kind` "upload" or "download".
fn waits(regscope: &Regscope, kind: &str) -> (f64, f64, f64) {
    let text = regscope.metrics_text();
    (
        metric_sum(&text, &format!("regscope_{kind}s_waiting"), &[]),
        metric_sum(&text, &format!("regscope_{kind}_admission_wait_seconds_count"), &[]),
        metric_sum(&text, &format!("regscope_{kind}_admission_wait_seconds_sum"), &[]),
    )
}

#[test]
fn an_upload_that_keeps_sending_keeps_its_slot_and_the_next_waits_for_it() {
    let (registry, regscope) = one_slot();
    let proxy = regscope.proxy_addr();
    // The first upload's body goes in 40 chunks of 16 KiB, one every 100 ms: 4 s in all, never
    // quiet for anything near the second a holder may stay silent.
    let first = blob(0xA1, 640 << 10);
    let second = blob(0xB2, 256 << 10);

    let mut a = open_chunked_patch(proxy);
    let sending = thread::spawn({
        let first = first.clone();
        move || {
            for chunk in first.chunks(16 << 10) {
                a.send_chunk(chunk).unwrap();
                thread::sleep(Duration::from_millis(100));
            }
            finish_chunked(&mut a, proxy, &first);
        }
    });
    thread::sleep(Duration::from_millis(300));

    let second_done = Arc::new(AtomicBool::new(false));
    let uploading = thread::spawn({
        let (second, done) = (second.clone(), second_done.clone());
        move || {
            upload_whole(proxy, &second);
            done.store(true, Ordering::SeqCst);
        }
    });
    thread::sleep(Duration::from_millis(2500));
    assert!(
        !second_done.load(Ordering::SeqCst),
        "the second upload went through while the only slot was held by one still sending"
    );
    assert_eq!(waits(&regscope, "upload").0, 1.0, "the second upload is not counted as waiting");

    sending.join().expect("the first upload");
    uploading.join().expect("the second upload");
    assert_stored(&registry, &first);
    assert_stored(&registry, &second);
    let (waiting, count, seconds) = waits(&regscope, "upload");
    assert_eq!((waiting, count), (0.0, 1.0), "one wait (the second upload's start), none left");
    assert!(seconds >= 2.5, "the second upload waited {seconds} s, the first sent for 3.7 s after it asked");
}

#[test]
fn an_upload_whose_client_goes_quiet_loses_its_slot_and_both_arrive_whole() {
    let (registry, regscope) = one_slot();
    let proxy = regscope.proxy_addr();
    let quiet = blob(0xC3, 512 << 10);
    let other = blob(0xD4, 256 << 10);

    // The first upload sends a quarter of its body, then nothing, holding the only slot.
    let mut a = open_chunked_patch(proxy);
    a.send_chunk(&quiet[..128 << 10]).unwrap();

    let (done, finished) = mpsc::channel();
    thread::spawn({
        let other = other.clone();
        move || {
            let started = Instant::now();
            upload_whole(proxy, &other);
            let _ = done.send(started.elapsed());
        }
    });
    let took = finished.recv_timeout(Duration::from_secs(5)).expect("a quiet upload kept the only slot for 5 s");
    assert!(took >= Duration::from_millis(900), "went through in {took:?}, while a quiet upload held the only slot");

    // The quiet one was not cut off: it carries on without a slot and arrives whole.
    a.send_chunk(&quiet[128 << 10..]).unwrap();
    finish_chunked(&mut a, proxy, &quiet);
    assert_stored(&registry, &quiet);
    assert_stored(&registry, &other);

    // The slot went back exactly once: the next upload finds it free at once. (Which of the
    // first two waited depends on whether the quiet PATCH reached regscope before the second
    // upload's start did; on a loaded machine it may not.)
    let (_, waits_before, _) = waits(&regscope, "upload");
    assert!(waits_before >= 1.0, "nobody waited for the slot the quiet upload held");
    let third = blob(0xE5, 64 << 10);
    let started = Instant::now();
    upload_whole(proxy, &third);
    assert!(started.elapsed() < Duration::from_millis(900), "the slot was not free after both uploads ended");
    assert_stored(&registry, &third);
    let (waiting, count, _) = waits(&regscope, "upload");
    assert_eq!((waiting, count), (0.0, waits_before), "the third upload waited, or a wait is left");
}

// === downloads (`--download-slots`) ===

/// regscope with one download slot, and two blobs stored through it: a big one (32 MiB) and a
/// small one (64 KiB), from the patterns for `big` and `small`.
fn one_download_slot(big: u64, small: u64) -> (Registry, Regscope, Vec<u8>, Vec<u8>) {
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--download-slots", "1"]);
    let (big, small) = (blob(big, 32 << 20), blob(small, 64 << 10));
    upload_whole(regscope.proxy_addr(), &big);
    upload_whole(regscope.proxy_addr(), &small);
    (registry, regscope, big, small)
}

/// `GET` of the blob, its head read; the body is left to the caller. The connection's receive
/// buffer is small (loopback's grows to 32 MiB here), so regscope can send only as fast as the
/// client reads.
fn start_get(proxy: SocketAddr, blob: &[u8]) -> (Conn<std::net::TcpStream>, support::client::ResponseHead) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    socket.connect(&proxy.into()).unwrap();
    let mut conn = Conn::new(std::net::TcpStream::from(socket));
    let target = format!("/v2/{REPO}/blobs/{}", digest_of(blob));
    conn.send_head("GET", &target, &[("Host", &proxy.to_string())]).unwrap();
    let head = conn.read_head().unwrap();
    assert_eq!(head.status, 200, "GET {target}");
    (conn, head)
}

/// Reads the rest of the body, at most `rate` bytes a second (0: as fast as it comes); asserts
/// it is the blob, whole.
fn finish_get(conn: &mut Conn<std::net::TcpStream>, head: &support::client::ResponseHead, blob: &[u8], rate: u64) {
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    let len = conn
        .read_body(head, |bytes| {
            sha2::Digest::update(&mut hash, bytes);
            if rate > 0 {
                thread::sleep(Duration::from_secs_f64(bytes.len() as f64 / rate as f64));
            }
        })
        .unwrap();
    assert_eq!(len, blob.len() as u64, "the body's length");
    let digest = format!("sha256:{}", support::client::hex(&sha2::Digest::finalize(hash)));
    assert_eq!(digest, digest_of(blob), "the body is not the blob");
}

/// A whole GET of the blob on a connection of its own; returns how long it took.
fn get_whole(proxy: SocketAddr, blob: &[u8]) -> Duration {
    let started = Instant::now();
    let (mut conn, head) = start_get(proxy, blob);
    finish_get(&mut conn, &head, blob, 0);
    started.elapsed()
}

#[test]
fn a_download_whose_client_keeps_reading_keeps_its_slot_and_the_next_waits_for_it() {
    // The big blob is larger than what the socket buffers between regscope and the client hold,
    // and read at a few MiB a second: regscope sends its body for seconds, never quiet for one.
    let (_registry, regscope, big, small) = one_download_slot(0xF6, 0x17);
    let proxy = regscope.proxy_addr();

    let (mut a, head) = start_get(proxy, &big);
    let reading = thread::spawn({
        let big = big.clone();
        move || finish_get(&mut a, &head, &big, 8 << 20)
    });
    thread::sleep(Duration::from_millis(300));
    let took = get_whole(proxy, &small);
    reading.join().expect("the first download");
    assert!(took >= Duration::from_millis(1200), "the second download took {took:?} while the only slot was held");
    let (waiting, count, seconds) = waits(&regscope, "download");
    assert_eq!((waiting, count), (0.0, 1.0), "one wait (the second download's), none left");
    assert!(seconds >= 1.0, "the second download waited {seconds} s");
}

#[test]
fn a_download_whose_client_stops_reading_loses_its_slot_and_both_arrive_whole() {
    let (_registry, regscope, big, small) = one_download_slot(0x28, 0x39);
    let proxy = regscope.proxy_addr();

    // The first client reads the head and then nothing: regscope fills the socket buffers and
    // stops, holding the only slot.
    let (mut a, head) = start_get(proxy, &big);
    let (done, finished) = mpsc::channel();
    thread::spawn({
        let small = small.clone();
        move || {
            let _ = done.send(get_whole(proxy, &small));
        }
    });
    let took = finished.recv_timeout(Duration::from_secs(5)).expect("a stopped download kept the only slot for 5 s");
    assert!(
        took >= Duration::from_millis(900),
        "went through in {took:?}, while a stopped download held the only slot"
    );

    // The stopped one was not cut off: it carries on without a slot and arrives whole.
    finish_get(&mut a, &head, &big, 0);

    // The slot went back exactly once: the next download finds it free at once.
    let took = get_whole(proxy, &small);
    assert!(took < Duration::from_millis(900), "the slot was not free after both downloads ended: {took:?}");
    let (waiting, count, _) = waits(&regscope, "download");
    assert_eq!((waiting, count), (0.0, 1.0), "one wait (the second download's), none left");
}
