//! The seed itself: the 2015 v1 push and pull (SEED.md), request for request, replayed
//! through regscope into the seed's own registry (docker-registry 0.9.1), with the seed's slow
//! parts made real and scaled down (1 s in the seed is 50 ms here). The tables `regscope report`
//! prints must be the ones the author built by hand from the access log, and agree with the
//! replayed timings within 5 % (or 20 ms for short ones).
//!
//! What is made slow, and how:
//! - before each image's json PUT the client sleeps (the daemon preparing the image): an `idle`
//!   row;
//! - each json PUT sends its head, waits, then its body: the `put json` row (seed: 3 s and 6 s);
//! - each layer PUT body is chunked and paced to end at a known time: the `put layer` row (seed:
//!   34 s and 325 s);
//! - between a layer and its checksum the client sleeps (hashing): the image's `gap` row;
//! - on pull, the client sleeps before the first json GET (seed: 6 s) and reads each layer at a
//!   pace that ends at a known time (seed: 42 s, and the 61 s the log shows for layer 2), through a
//!   small receive buffer so that regscope feels the slow reader at once.
//!
//! A `get layer` row short by ~4 MB worth of reading, followed by an `idle` row of that length,
//! means regscope took a layer's end to be when its last byte entered regscope's own socket send
//! buffer (Linux autotunes it up to `net.ipv4.tcp_wmem` max, 4 MiB), not when the client read it.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use regscope::Api;
use regscope::{BlobOutcome, Outcome, Transfer, TransferDirection};
use sha2::{Digest, Sha256};
use support::client::{hex, Conn, Pattern};
use support::replay::{
    assert_shares_add_up, pretty, read_paced, report_table, report_text, send_paced_chunked, short, wait_for_transfer,
    V1Registry,
};
use support::timing::connect_with_small_rcvbuf;
use support::Regscope;

/// Seconds of replay per second of the seed: the 371 s push takes about 19 s, the 116 s pull 6 s.
/// Layer 1 then moves at about 20 MB/s, well under what the v1 registry behind a debug-built
/// regscope absorbs here (about 45 MB/s), so the client's pace, not the path, sets its time.
const SCALE: f64 = 0.050;
const REPOSITORY: &str = "bigtest2";
/// The seed's layers were 37,124,367 B and 420,084,375 B: layer 1 at its real size, layer 2 at a
/// tenth to keep the test quick. Sizes matter: whatever sits in buffers between regscope and the
/// reader (kernel, HTTP library) is time regscope cannot see, and it must stay a small part of a
/// layer for the rows to be right.
const LAYER_BYTES: [usize; 2] = [37_124_367, 42_008_438];

// Push, per image (parent first), in seed seconds.
/// The daemon preparing the image before its json PUT (not in the seed's table).
const PUSH_IDLE_BEFORE_JSON: [f64; 2] = [4.0, 8.0];
/// The seed's `put json` rows.
const PUSH_JSON: [f64; 2] = [3.0, 6.0];
/// The seed's `put layer` rows.
const PUSH_LAYER: [f64; 2] = [34.0, 325.0];
/// The daemon finishing the checksum between the layer and the checksum PUT.
const PUSH_CHECKSUM_GAP: f64 = 2.0;

// Pull, per image (parent first), in seed seconds.
/// The seed's `get json` rows: the daemon's pause before each json GET.
const PULL_IDLE_BEFORE_JSON: [f64; 2] = [6.0, 0.0];
/// The seed's `get layer 1` (42 s) and what its log shows for layer 2 (61 s, not the table's 2 s).
const PULL_LAYER: [f64; 2] = [42.0, 61.0];

/// Receive buffer of the pulling client (the kernel doubles it): small, so that what the client's
/// own kernel holds ahead of its reads (32 KiB, under 10 ms of either layer's pace) is below what
/// the report shows as an idle row.
const CLIENT_RCVBUF: u32 = 16 << 10;

fn scaled(seed_seconds: f64) -> Duration {
    Duration::from_secs_f64(seed_seconds * SCALE)
}

/// Agreement demanded: 5 %, or 20 ms for short rows.
fn tolerance(truth: f64) -> f64 {
    (truth * 0.05).max(0.020)
}

/// One image of the replayed repository.
struct Image {
    id: String,
    json: Vec<u8>,
    layer: Vec<u8>,
    /// `X-Docker-Checksum-Payload`, computed ahead so hashing is not in the replayed timings.
    checksum: String,
}

impl Image {
    fn new(index: usize, parent: Option<&str>) -> Image {
        let id = hex(&Sha256::digest(format!("regscope seed image {index} {}", std::process::id())));
        let mut json = serde_json::json!({
            "id": id,
            "created": "2015-03-10T08:40:00Z",
            "container_config": { "Cmd": ["/bin/sh", "-c", format!("#(nop) layer {index}")] },
            "Size": LAYER_BYTES[index],
        });
        if let Some(parent) = parent {
            json["parent"] = parent.into();
        }
        let mut pattern = Pattern::new(0xb16_7e57 + index as u64);
        let mut layer = Vec::with_capacity(LAYER_BYTES[index]);
        while layer.len() < LAYER_BYTES[index] {
            let n = LAYER_BYTES[index] - layer.len();
            layer.extend_from_slice(pattern.next_slice(n));
        }
        let json = serde_json::to_vec(&json).unwrap();
        // sha256 of the json as PUT, a newline, and the layer.
        let mut hash = Sha256::new();
        hash.update(&json);
        hash.update(b"\n");
        hash.update(&layer);
        let checksum = format!("sha256:{}", hex(&hash.finalize()));
        Image { id, json, layer, checksum }
    }
}

/// The client's own clock. It brackets each request's true span as regscope should see it: the
/// span starts just before the client sends its head, and ends after the client has done its part
/// (sent its last byte; for a paced download, read its last byte) but no later than when the
/// client has read the response. The registry's answer lies between those two ends, and so does a
/// client the busy machine schedules late: the truth is an interval, narrow (a few ms) when the
/// machine is quiet.
struct Clock {
    origin: Instant,
    /// What, start, done its part, response read.
    spans: Vec<(String, f64, f64, f64)>,
}

/// Seconds known to lie between two bounds.
#[derive(Clone, Copy)]
struct Interval(f64, f64);

impl std::ops::Add for Interval {
    type Output = Interval;
    fn add(self, other: Interval) -> Interval {
        Interval(self.0 + other.0, self.1 + other.1)
    }
}

impl Clock {
    fn new() -> Clock {
        Clock { origin: Instant::now(), spans: Vec::new() }
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    fn start(&mut self, what: &str) {
        let now = self.now();
        self.spans.push((what.to_string(), now, now, now));
    }

    /// The span opened last: the client has done its part.
    fn done(&mut self) {
        let now = self.now();
        let span = self.spans.last_mut().expect("a span to end");
        (span.2, span.3) = (now, now);
    }

    /// The span opened last: the client has read the response.
    fn read(&mut self) {
        let now = self.now();
        self.spans.last_mut().expect("a span to end").3 = now;
    }

    fn span(&self, what: &str) -> (f64, f64, f64) {
        self.spans
            .iter()
            .find(|(w, ..)| w == what)
            .map(|&(_, s, d, r)| (s, d, r))
            .unwrap_or_else(|| panic!("no span {what}"))
    }

    fn duration(&self, what: &str) -> Interval {
        let (start, done, read) = self.span(what);
        Interval(done - start, read - start)
    }

    /// Time between the end of `before` and the start of `after`: the client alone.
    fn between(&self, before: &str, after: &str) -> Interval {
        let (_, done, read) = self.span(before);
        let (start, ..) = self.span(after);
        Interval(start - read, start - done)
    }

    /// From the start of `first` to the end of `last`.
    fn wall(&self, first: &str, last: &str) -> Interval {
        let (start, ..) = self.span(first);
        let (_, done, read) = self.span(last);
        Interval(done - start, read - start)
    }
}

/// A request with a small body (or none), through regscope; asserts the status. With `span`, times
/// it on `clock` (see [`Clock`]).
#[allow(clippy::too_many_arguments)]
fn call(
    conn: &mut Conn<TcpStream>,
    clock: &mut Clock,
    span: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    want: u16,
) -> Vec<u8> {
    if let Some(what) = span {
        clock.start(what);
    }
    let length = body.len().to_string();
    let mut all = headers.to_vec();
    if method == "PUT" {
        all.push(("Content-Length", &length));
    }
    conn.send_head(method, path, &all).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    conn.send_raw(body).unwrap();
    if span.is_some() {
        clock.done();
    }
    let response = conn.read_response().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    if span.is_some() {
        clock.read();
    }
    assert_eq!(response.status(), want, "{method} {path}: {}", response.text());
    response.body
}

/// The seed's push, in its order: `GET /v2/` (404), `GET /v1/_ping`, `PUT` the repository, check
/// both images (404), then per image json, layer, checksum; then the tag and the images list.
fn replay_push(conn: &mut Conn<TcpStream>, host: &str, images: &[Image], clock: &mut Clock) {
    let plain = [("Host", host)];
    let json = [("Host", host), ("Content-Type", "application/json")];
    call(conn, clock, None, "GET", "/v2/", &plain, b"", 404);
    call(conn, clock, None, "GET", "/v1/_ping", &plain, b"", 200);
    let list =
        serde_json::to_vec(&serde_json::json!([{ "id": images[0].id }, { "id": images[1].id, "Tag": "latest" }]))
            .unwrap();
    let repository = format!("/v1/repositories/{REPOSITORY}/");
    call(conn, clock, Some("put repository"), "PUT", &repository, &json, &list, 200);
    for (i, image) in images.iter().enumerate() {
        let last = (i + 1 == images.len()).then_some("checks done");
        call(conn, clock, last, "GET", &format!("/v1/images/{}/json", image.id), &plain, b"", 404);
    }
    for (i, image) in images.iter().enumerate() {
        std::thread::sleep(scaled(PUSH_IDLE_BEFORE_JSON[i]));
        // The head at once, the body after the seed's `put json` time.
        clock.start(&format!("put json {i}"));
        let path = format!("/v1/images/{}/json", image.id);
        let length = image.json.len().to_string();
        conn.send_head(
            "PUT",
            &path,
            &[("Host", host), ("Content-Type", "application/json"), ("Content-Length", &length)],
        )
        .unwrap();
        std::thread::sleep(scaled(PUSH_JSON[i]));
        conn.send_raw(&image.json).unwrap();
        clock.done();
        let response = conn.read_response().unwrap();
        clock.read();
        assert_eq!(response.status(), 200, "PUT {path}: {}", response.text());

        // The layer chunked, its last byte leaving at the seed's `put layer` time.
        clock.start(&format!("put layer {i}"));
        let path = format!("/v1/images/{}/layer", image.id);
        let headers = [("Host", host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")];
        conn.send_head("PUT", &path, &headers).unwrap();
        send_paced_chunked(conn, &image.layer, 64 << 10, scaled(PUSH_LAYER[i]));
        clock.done();
        let response = conn.read_response().unwrap();
        clock.read();
        assert_eq!(response.status(), 200, "PUT {path}: {}", response.text());

        std::thread::sleep(scaled(PUSH_CHECKSUM_GAP));
        let headers = [("Host", host), ("X-Docker-Checksum-Payload", image.checksum.as_str())];
        let path = format!("/v1/images/{}/checksum", image.id);
        call(conn, clock, Some(&format!("put checksum {i}")), "PUT", &path, &headers, b"", 200);
    }
    let tag = serde_json::to_vec(&images[1].id).unwrap();
    let tags = format!("/v1/repositories/{REPOSITORY}/tags/latest");
    call(conn, clock, Some("put tag"), "PUT", &tags, &json, &tag, 200);
    let list_path = format!("/v1/repositories/{REPOSITORY}/images");
    call(conn, clock, Some("put images"), "PUT", &list_path, &json, &list, 204);
}

/// The seed's pull, in its order, with the tags asked for under `library/` as the 2015 daemon did.
fn replay_pull(conn: &mut Conn<TcpStream>, host: &str, images: &[Image], clock: &mut Clock) {
    let plain = [("Host", host)];
    call(conn, clock, None, "GET", "/v2/", &plain, b"", 404);
    call(conn, clock, None, "GET", "/v1/_ping", &plain, b"", 200);
    call(conn, clock, Some("get images"), "GET", &format!("/v1/repositories/{REPOSITORY}/images"), &plain, b"", 200);
    let tags_path = format!("/v1/repositories/library/{REPOSITORY}/tags");
    let tags = call(conn, clock, Some("get tags"), "GET", &tags_path, &plain, b"", 200);
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert_eq!(tags["latest"], images[1].id.as_str(), "tags: {tags}");
    let ancestry_path = format!("/v1/images/{}/ancestry", images[1].id);
    let ancestry = call(conn, clock, Some("get ancestry"), "GET", &ancestry_path, &plain, b"", 200);
    let ancestry: Vec<String> = serde_json::from_slice(&ancestry).unwrap();
    assert_eq!(ancestry, [images[1].id.clone(), images[0].id.clone()]);
    for (i, image) in images.iter().enumerate() {
        std::thread::sleep(scaled(PULL_IDLE_BEFORE_JSON[i]));
        let json_path = format!("/v1/images/{}/json", image.id);
        let json = call(conn, clock, Some(&format!("get json {i}")), "GET", &json_path, &plain, b"", 200);
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["id"], image.id.as_str());

        // Read at a steady pace that ends at the seed's `get layer` time.
        clock.start(&format!("get layer {i}"));
        let path = format!("/v1/images/{}/layer", image.id);
        conn.send_head("GET", &path, &plain).unwrap();
        let head = conn.read_head().unwrap();
        assert_eq!(head.status, 200, "GET {path}");
        let (len, _) = read_paced(conn, &head, scaled(PULL_LAYER[i]));
        clock.done();
        assert_eq!(len, image.layer.len() as u64, "GET {path} length");
    }
}

/// One expected row of a table: its operation text (a prefix of the row) and the true seconds.
struct Expected {
    row: String,
    seconds: Interval,
}

fn expect(row: impl Into<String>, seconds: Interval) -> Expected {
    Expected { row: row.into(), seconds }
}

impl Interval {
    /// How far `x` lies outside the interval widened by the tolerance of each bound (0 inside).
    fn miss(self, x: f64) -> f64 {
        let (lo, hi) = (self.0 - tolerance(self.0), self.1 + tolerance(self.1));
        if x < lo {
            x - lo
        } else if x > hi {
            x - hi
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.1 - self.0 < 0.0015 {
            write!(f, "{:.3}s", self.0)
        } else {
            write!(f, "{:.3}-{:.3}s", self.0, self.1)
        }
    }
}

/// The table's rows, in order, must be exactly `expected` (operation text by prefix), each within
/// its true interval widened by the tolerance; the total likewise within `wall`. Checks every row before
/// failing, so the message shows everything that disagrees. Returns the comparison.
fn assert_table(table: &str, expected: &[Expected], wall: Interval) -> String {
    let rows: Vec<(String, f64)> = table
        .lines()
        .skip(2) // title and column heads
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('(') && !l.starts_with("verdict:"))
        .map(|l| {
            let columns: Vec<&str> = l.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
            let seconds = columns[1].trim_end_matches('s').parse::<f64>().unwrap_or_else(|_| panic!("row {l:?}"));
            (columns[0].to_string(), seconds)
        })
        .collect();
    let all: Vec<Expected> =
        expected.iter().map(|e| expect(e.row.clone(), e.seconds)).chain([expect("total (wall)", wall)]).collect();
    // Walk the reported rows in order, matching each to the next expected row by name; a row that
    // does not match is unexpected, expected rows left over are missing.
    let mut comparison = String::new();
    let mut problems = Vec::new();
    let mut line = |want: Option<&Expected>, got: Option<&(String, f64)>| {
        comparison += &format!(
            "  {:<36} {:>13}   | {:<36} {:>8}\n",
            want.map_or("-", |w| w.row.as_str()),
            want.map_or(String::new(), |w| w.seconds.to_string()),
            got.map_or("-", |g| g.0.get(..g.0.len().min(36)).unwrap_or(&g.0)),
            got.map_or(String::new(), |g| format!("{:.3}s", g.1)),
        );
    };
    let mut next = 0;
    for got in &rows {
        let (name, seconds) = got;
        match all.get(next) {
            Some(want) if name.starts_with(&want.row) => {
                line(Some(want), Some(got));
                let miss = want.seconds.miss(*seconds);
                if miss != 0.0 {
                    problems.push(format!(
                        "{name:?}: reported {seconds:.3}s, replayed {} ({:+.0} ms beyond the ±5 % / 20 ms allowed)",
                        want.seconds,
                        miss * 1e3
                    ));
                }
                next += 1;
            }
            _ => {
                line(None, Some(got));
                problems.push(format!("unexpected row {name:?} ({seconds:.3}s)"));
            }
        }
    }
    for want in &all[next..] {
        line(Some(want), None);
        problems.push(format!("missing row {:?} ({})", want.row, want.seconds));
    }
    let comparison = format!("  {:<36} {:>13}   | {:<36} {:>8}\n{comparison}", "replayed", "", "reported", "");
    assert!(
        problems.is_empty(),
        "the report disagrees with the replay:\n  {}\n{comparison}\n{table}",
        problems.join("\n  ")
    );
    comparison
}

#[test]
fn the_seeds_v1_push_and_pull_give_the_seeds_tables() {
    let v1 = V1Registry::start();
    let regscope = Regscope::start(&["--upstream", &v1.url(), "--transfer-idle-timeout", "2s"]);
    let admin = regscope.admin_addr();
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let parent = Image::new(0, None);
    let top = Image::new(1, Some(&parent.id));
    let images = [parent, top];
    let ids: Vec<&str> = images.iter().map(|i| i.id.as_str()).collect();

    // --- push ---
    let mut clock = Clock::new();
    let mut conn = Conn::connect(proxy);
    replay_push(&mut conn, &host, &images, &mut clock);
    drop(conn);
    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(10));
    eprintln!("v1 push transfer:\n{}", pretty(&push));
    assert_eq!(push.api, Api::V1, "{}", pretty(&push));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));
    assert_eq!(push.tag.as_deref(), Some("latest"), "{}", pretty(&push));
    assert_v1_blobs(&push, &images, BlobOutcome::Committed);
    assert_shares_add_up(&push);
    assert!(
        push.parties.client >= 0.8 * push.wall_seconds,
        "the client paced every slow part, so it holds most of the push (the seed's conclusion): {:?} of {:.3} s",
        push.parties,
        push.wall_seconds
    );

    let c = &clock;
    let wall = c.wall("put repository", "put images");
    let mut want = Vec::new();
    for i in 0..2 {
        let id = short(ids[i]);
        let before = if i == 0 { "checks done".to_string() } else { "put checksum 0".to_string() };
        want.push(expect("idle (client working)", c.between(&before, &format!("put json {i}"))));
        want.push(expect(format!("put json {id}"), c.duration(&format!("put json {i}"))));
        let size = regscope::report::bytes(LAYER_BYTES[i] as u64);
        want.push(expect(format!("put layer {id} ({size})"), c.duration(&format!("put layer {i}"))));
        want.push(expect(format!("put checksum {id}"), c.duration(&format!("put checksum {i}"))));
        let gap = c.between(&format!("put json {i}"), &format!("put layer {i}"))
            + c.between(&format!("put layer {i}"), &format!("put checksum {i}"));
        want.push(expect(format!("gap {id}"), gap));
    }
    want.push(expect("put tag latest", c.duration("put tag")));
    want.push(expect("put images", c.duration("put images")));

    let text = report_text(admin, 1);
    let table = report_table(&text, TransferDirection::Push, REPOSITORY);
    assert!(table.lines().next().unwrap().contains("v1 push bigtest2:latest"), "{table}");
    assert!(table.lines().next().unwrap().contains("complete"), "{table}");
    let comparison = assert_table(table, &want, wall);
    eprintln!("regscope report of the push:\n{table}\nagainst the replay:\n{comparison}");

    // --- pull ---
    let mut clock = Clock::new();
    let mut conn = Conn::new(connect_with_small_rcvbuf(proxy, CLIENT_RCVBUF));
    replay_pull(&mut conn, &host, &images, &mut clock);
    drop(conn);
    let pull = wait_for_transfer(admin, TransferDirection::Pull, REPOSITORY, Duration::from_secs(10));
    eprintln!("v1 pull transfer:\n{}", pretty(&pull));
    assert_eq!(pull.api, Api::V1, "{}", pretty(&pull));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    assert_v1_blobs(&pull, &images, BlobOutcome::Fetched);
    assert_shares_add_up(&pull);
    assert!(
        pull.parties.client > pull.parties.registry && pull.parties.client > pull.parties.moving,
        "the client read slowly, so it holds the largest share of the pull: {:?}",
        pull.parties
    );

    let c = &clock;
    let wall = c.wall("get images", "get layer 1");
    let want = [
        expect("get images", c.duration("get images")),
        expect("get tags", c.duration("get tags")),
        expect(format!("get ancestry {}", short(ids[1])), c.duration("get ancestry")),
        expect("idle (client working)", c.between("get ancestry", "get json 0")),
        expect(format!("get json {}", short(ids[0])), c.duration("get json 0")),
        expect(
            format!("get layer {} ({})", short(ids[0]), regscope::report::bytes(LAYER_BYTES[0] as u64)),
            c.duration("get layer 0"),
        ),
        expect(format!("get json {}", short(ids[1])), c.duration("get json 1")),
        expect(
            format!("get layer {} ({})", short(ids[1]), regscope::report::bytes(LAYER_BYTES[1] as u64)),
            c.duration("get layer 1"),
        ),
    ];
    let text = report_text(admin, 2);
    let table = report_table(&text, TransferDirection::Pull, REPOSITORY);
    assert!(table.lines().next().unwrap().contains("v1 pull bigtest2"), "{table}");
    assert!(table.lines().next().unwrap().contains("complete"), "{table}");
    let comparison = assert_table(table, &want, wall);
    eprintln!("regscope report of the pull:\n{table}\nagainst the replay:\n{comparison}");
    eprintln!("v1 registry access log:\n{}", v1.access_log());
}

/// One blob per image, named by its id, carrying its layer's bytes.
fn assert_v1_blobs(t: &Transfer, images: &[Image], outcome: BlobOutcome) {
    assert_eq!(t.blobs.len(), images.len(), "{}", pretty(t));
    for image in images {
        let blob = t
            .blobs
            .iter()
            .find(|b| b.digest.as_deref() == Some(image.id.as_str()))
            .unwrap_or_else(|| panic!("no blob for image {}: {}", image.id, pretty(t)));
        assert_eq!(blob.bytes, image.layer.len() as u64, "layer bytes of {}: {}", image.id, pretty(t));
        assert_eq!(blob.outcome, outcome, "outcome of {}: {}", image.id, pretty(t));
    }
}
