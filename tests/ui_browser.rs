//! The admin web UI as a real browser (headless Chromium) shows it.
//!
//! - After a real `docker push` and `docker pull`, `/` lists both, and each transfer's page has one
//!   `tr.layer` per blob of the registry's manifest with the registry's size; screenshots of the
//!   pages are left in `target/test-artifacts/ui_browser/`.
//! - The waterfall agrees with the transfer's JSON: each request's segments add up to its duration
//!   (and to its client / registry / moving split), and each segment is as wide as its seconds
//!   times the axis scale.
//! - During a slow upload `/` shows the request in progress, its byte count growing between loads.
//! - `regscope report --svg/--html` write the same waterfall and layers.
//!
//! `readme_waterfall_screenshot` pushes a ~30 MB + ~100 MB image and screenshots its page; with
//! `REGSCOPE_UPDATE_DOCS=1` it writes `docs/waterfall.png`, the picture in the README.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use regscope::{BlobOutcome, Outcome, Transfer, TransferDirection};
use support::browser::{artifact_path, by_id, chromium, elements, png_size, with_class, Browser, Element};
use support::client::{start_upload, target_at, with_digest, Conn, Pattern};
use support::replay::{manifest_blobs, pretty, registry_manifest, send_paced_chunks, wait_for_transfer};
use support::{check, docker, eventually, http_get, Registry, Regscope, TempDir, TestImage};

const REPOSITORY: &str = "regscope-test/ui-browser";

#[test]
fn docker_push_and_pull_show_in_the_browser_with_the_registrys_layer_sizes() {
    let browser = chromium();
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let admin = regscope.admin_addr();
    let docker = docker();
    let reference = format!("{}/{REPOSITORY}:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[3 << 20, 9 << 20]);
    docker.load(&image);

    docker.push(&reference);
    let stored = manifest_blobs(&registry_manifest(registry.addr(), REPOSITORY, "v1"));
    assert_eq!(stored.len(), 3, "config + two layers in the registry's manifest: {stored:?}");
    let push = wait_for_transfer(admin, TransferDirection::Push, REPOSITORY, Duration::from_secs(20));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));

    docker.rmi(&reference);
    docker.pull(&reference);
    assert_eq!(docker.image_id(&reference), image.image_id, "pulled image differs from the pushed one");
    let pull = wait_for_transfer(admin, TransferDirection::Pull, REPOSITORY, Duration::from_secs(20));
    assert_eq!(pull.outcome, Outcome::Complete, "{}", pretty(&pull));
    docker.rmi(&reference);

    // --- `/`: both transfers, nothing in progress ---
    let url = |path: &str| format!("http://{admin}{path}");
    let index = browser.dump_dom(&url("/"));
    save_artifact("index.html", &index);
    assert!(
        elements(&index, "meta")
            .iter()
            .any(|m| m.attr("http-equiv") == Some("refresh") && m.attr("content") == Some("2")),
        "/ does not refresh itself every 2 s:\n{index}"
    );
    assert_eq!(with_class(&index, "tr", "live-request").len(), 0, "nothing should be in progress:\n{index}");
    by_id(&index, "p", "live-empty");
    let rows = with_class(&index, "tr", "transfer");
    assert_eq!(rows.len(), 2, "one row per finished transfer on /:\n{index}");
    // Newest first.
    assert_eq!(rows[0].num("data-id") as u64, pull.id, "{index}");
    assert_eq!(rows[1].num("data-id") as u64, push.id, "{index}");
    for (row, t) in rows.iter().zip([&pull, &push]) {
        assert_recent_row(row, t);
    }
    screenshot(&browser, &url("/"), "index.png", 1280, 500);

    // --- each transfer's page: the layers and the waterfall ---
    for (t, outcome, name) in [(&push, BlobOutcome::Committed, "push"), (&pull, BlobOutcome::Fetched, "pull")] {
        let page = browser.dump_dom(&url(&format!("/transfers/{}", t.id)));
        save_artifact(&format!("{name}.html"), &page);
        assert_layer_rows(&page, &stored, outcome);
        // The JSON of the same transfer, as the API serves it now.
        let json = transfer_json(admin, t.id);
        let svg = waterfall_in(&page);
        assert_waterfall_matches(&svg, &json);
        // The standalone SVG is the one the page embeds.
        let standalone = http_get(admin, &format!("/transfers/{}.svg", t.id));
        assert_eq!(standalone.status, 200);
        assert_eq!(standalone.header("content-type"), Some("image/svg+xml"));
        assert_waterfall_matches(&elements(&standalone.text(), "svg").remove(0), &json);
        screenshot(&browser, &url(&format!("/transfers/{}", t.id)), &format!("{name}.png"), 1180, 900);
    }

    // --- `regscope report --svg/--html` write the same ---
    let dir = TempDir::new("ui-report");
    let (svg_file, html_file) = (dir.path().join("push.svg"), dir.path().join("push.html"));
    check(
        std::process::Command::new(env!("CARGO_BIN_EXE_regscope"))
            .args(["report", "--admin", &url(""), "--id", &push.id.to_string()])
            .arg("--svg")
            .arg(&svg_file)
            .arg("--html")
            .arg(&html_file),
        Duration::from_secs(30),
    );
    let push_json = transfer_json(admin, push.id);
    let svg_text = std::fs::read_to_string(&svg_file).unwrap();
    assert!(svg_text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg_text}");
    assert_waterfall_matches(&elements(&svg_text, "svg").remove(0), &push_json);
    let html_text = std::fs::read_to_string(&html_file).unwrap();
    assert_layer_rows(&html_text, &stored, BlobOutcome::Committed);
    assert_waterfall_matches(&waterfall_in(&html_text), &push_json);
    // And a browser opens the file as it is: no server, no external assets.
    let offline = browser.dump_dom(&format!("file://{}", html_file.display()));
    assert_layer_rows(&offline, &stored, BlobOutcome::Committed);
    assert!(only_svg_namespace(&html_text), "an absolute URL in the report page:\n{html_text}");
}

#[test]
fn a_slow_upload_shows_in_progress_with_a_growing_byte_count() {
    const TOTAL: usize = 20 << 20;
    // ~1.7 MiB/s. The upload also waits for each page load before it goes on (its second quarter
    // after the first load, its last after the second), so however long Chromium takes to start
    // on a busy machine (over 15 s once), both loads see it in progress and the second more of it.
    const PACE: Duration = Duration::from_secs(12);
    const PIECE: usize = 128 << 10;
    let (loaded, load_seen) = std::sync::mpsc::channel::<()>();
    let browser = chromium();
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let (proxy, admin) = (regscope.proxy_addr(), regscope.admin_addr());
    let repository = "regscope-test/ui-slow-upload";

    let mut body = vec![0u8; TOTAL];
    let mut pattern = Pattern::new(0x51_0E);
    let mut filled = 0;
    while filled < TOTAL {
        let slice = pattern.next_slice(TOTAL - filled);
        body[filled..filled + slice.len()].copy_from_slice(slice);
        filled += slice.len();
    }
    let digest = support::client::digest_of(&body);

    // A client pushing one blob at ~2 MiB/s: POST, a paced chunked PATCH, then the closing PUT.
    let uploader = thread::spawn(move || {
        let host = proxy.to_string();
        let origin = format!("http://{proxy}");
        let mut conn = Conn::connect(proxy);
        let target = target_at(&start_upload(&mut conn, &host, repository), &origin);
        conn.send_head(
            "PATCH",
            &target,
            &[("Host", &host), ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
        )
        .unwrap();
        let (first_half, rest) = body.split_at(TOTAL / 2);
        let (third_quarter, last_quarter) = rest.split_at(TOTAL / 4);
        // A test that failed before its loads drops the sender, and the upload carries on.
        let wait_for_a_load = || load_seen.recv_timeout(Duration::from_secs(120)).ok();
        send_paced_chunks(&mut conn, first_half, PIECE, PACE / 2);
        wait_for_a_load();
        send_paced_chunks(&mut conn, third_quarter, PIECE, PACE / 4);
        wait_for_a_load();
        send_paced_chunks(&mut conn, last_quarter, PIECE, PACE / 4);
        conn.finish_chunks().unwrap();
        let response = conn.read_response().unwrap();
        assert_eq!(response.status(), 202, "PATCH: {:?} {}", response.head, response.text());
        let location = response.header("location").expect("202 with a Location").to_string();
        let response = conn
            .request("PUT", &with_digest(&target_at(&location, &origin), &digest), &[("Host", &host)], b"")
            .unwrap();
        assert_eq!(response.status(), 201, "PUT: {:?} {}", response.head, response.text());
    });

    // Wait until the PATCH is on the wire, as the JSON API tells it.
    let live_bytes = || -> Option<u64> {
        let live: serde_json::Value = serde_json::from_slice(&http_get(admin, "/api/v1/live").body).ok()?;
        live.as_array()?
            .iter()
            .flat_map(|t| t["in_flight"].as_array().cloned().unwrap_or_default())
            .find_map(|r| r["bytes"].as_u64())
    };
    assert!(
        eventually(Duration::from_secs(10), || live_bytes().is_some_and(|b| b > 0)),
        "no request in progress in /api/v1/live: {}",
        http_get(admin, "/api/v1/live").text()
    );

    let url = format!("http://{admin}/");
    let started = Instant::now();
    let first = browser.dump_dom(&url);
    let _ = loaded.send(());
    thread::sleep(Duration::from_millis(500));
    let second = browser.dump_dom(&url);
    let _ = loaded.send(());
    let took = started.elapsed();
    save_artifact("live-1.html", &first);
    save_artifact("live-2.html", &second);
    let first_bytes = live_request_bytes(&first);
    let second_bytes = live_request_bytes(&second);
    assert!(first_bytes > 0, "first load shows no bytes yet:\n{first}");
    assert!(
        second_bytes > first_bytes,
        "the byte count did not grow between loads {took:?} apart: {first_bytes} then {second_bytes}\n{second}"
    );
    assert!(second_bytes < TOTAL as u64, "the upload was over before the second load, {took:?} after the first began");
    // The row says what it is and how far along.
    let row = &with_class(&second, "tr", "live-request")[0];
    let text = row.text();
    assert!(text.contains("push") && text.contains(repository), "live row {text:?}");
    // A chunked PATCH declares no length: the row says so instead of drawing a bar.
    assert!(
        !row.children("progress").is_empty() || row.inner.contains("size unknown"),
        "live row with neither a progress bar nor an unknown size: {}",
        row.inner
    );
    screenshot(&browser, &url, "live.png", 1280, 400);

    uploader.join().expect("the uploader failed");
}

/// The README's picture: a real docker push of a ~30 MB + ~100 MB image of random bytes through
/// regscope, its transfer page as Chromium paints it. Saved as a test artifact; with
/// `REGSCOPE_UPDATE_DOCS=1 script/test -E 'binary(ui_browser)'` it replaces `docs/waterfall.png`.
#[test]
fn readme_waterfall_screenshot() {
    let browser = chromium();
    let registry = Registry::start();
    let regscope = Regscope::start(&["--upstream", &registry.url(), "--transfer-idle-timeout", "2s"]);
    let admin = regscope.admin_addr();
    let docker = docker();
    let repository = "regscope-demo/app";
    let reference = format!("{}/{repository}:v1", regscope.proxy_addr());
    let image = TestImage::build(&reference, &[30_000_000, 100_000_000]);
    docker.load(&image);
    docker.push(&reference);
    docker.rmi(&reference);
    let push = wait_for_transfer(admin, TransferDirection::Push, repository, Duration::from_secs(20));
    assert_eq!(push.outcome, Outcome::Complete, "{}", pretty(&push));
    let stored = manifest_blobs(&registry_manifest(registry.addr(), repository, "v1"));
    let url = format!("http://{admin}/transfers/{}", push.id);
    assert_layer_rows(&browser.dump_dom(&url), &stored, BlobOutcome::Committed);

    // The README's picture is refreshed only on request; every run still renders and checks it.
    let file = match std::env::var_os("REGSCOPE_UPDATE_DOCS") {
        Some(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/waterfall.png"),
        None => artifact_path("ui_browser/readme-waterfall.png"),
    };
    // Tall enough for the header, the waterfall (a 20 px row per request) and the layers table (a
    // 24 px row per blob), cut before the requests table.
    let height = 300 + 20 * push.requests.len() as u32 + 70 + 24 * (push.blobs.len() as u32 + 1);
    browser.screenshot(&url, &file, 1150, height);
    eprintln!("wrote {} ({}x{}) of transfer:\n{}", file.display(), png_size(&file).0, png_size(&file).1, pretty(&push));
}

// === what the pages must show ===

/// A `tr.transfer` row of `/` shows the transfer's direction, image, size, outcome and a
/// client / registry / moving bar whose parts add up to at most the whole.
fn assert_recent_row(row: &Element, t: &Transfer) {
    let cells: Vec<String> = row.children("td").iter().map(Element::text).collect();
    let want_image = format!("{}:{}", t.repository, t.tag.as_deref().unwrap_or_default());
    assert_eq!(cells[0], t.id.to_string(), "{cells:?}");
    assert_eq!(cells[1], t.direction.as_str(), "{cells:?}");
    assert_eq!(cells[2], want_image, "{cells:?}");
    assert_eq!(cells[4], regscope::report::bytes(t.bytes), "{cells:?}");
    assert_eq!(cells[7], t.outcome.as_str(), "{cells:?}");
    let links = row.children("a");
    assert_eq!(links[0].attr("href"), Some(format!("/transfers/{}", t.id).as_str()));
    let widths = bar_widths(row);
    let sum: f64 = widths.values().sum();
    let attributed = (t.parties.client + t.parties.registry + t.parties.moving) / t.wall_seconds * 100.0;
    assert!(
        (sum - attributed).abs() < 0.1,
        "bar parts {widths:?} sum to {sum} %, the transfer attributes {attributed} %"
    );
    for (party, share) in [("client", t.parties.client), ("registry", t.parties.registry), ("moving", t.parties.moving)]
    {
        let want = share / t.wall_seconds * 100.0;
        assert!((widths[party] - want).abs() < 0.01, "{party} part is {} %, want {want} %", widths[party]);
    }
}

/// The width (percent) of each part of the first `.bar` inside `within`.
fn bar_widths(within: &Element) -> BTreeMap<String, f64> {
    let bar = within.children("div").into_iter().find(|d| d.has_class("bar")).expect("a .bar");
    bar.children("span")
        .iter()
        .map(|span| {
            let style = span.req("style");
            let width = style
                .split(';')
                .find_map(|d| d.trim().strip_prefix("width:"))
                .and_then(|w| w.trim().strip_suffix('%')?.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("bar part without a width: {style:?}"));
            (span.req("class").to_string(), width)
        })
        .collect()
}

/// The page has exactly one `tr.layer` per blob of `stored` (config first, then the layers), with
/// the registry's digest and size in its data attributes and its cells.
fn assert_layer_rows(page: &str, stored: &[(String, u64)], outcome: BlobOutcome) {
    let rows = with_class(page, "tr", "layer");
    let shown: Vec<(String, u64)> =
        rows.iter().map(|r| (r.req("data-digest").to_string(), r.num("data-bytes") as u64)).collect();
    let mut want = stored.to_vec();
    let mut got = shown.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "tr.layer rows (digest, bytes) vs the registry's manifest; page:\n{page}");
    let outcome = serde_json::to_value(outcome).unwrap().as_str().unwrap().to_string();
    for row in &rows {
        let cells: Vec<String> = row.children("td").iter().map(Element::text).collect();
        let digest = row.req("data-digest");
        let index = stored.iter().position(|(d, _)| d == digest).unwrap();
        assert_eq!(cells[0], digest, "{cells:?}");
        assert_eq!(cells[1], if index == 0 { "config" } else { "layer" }, "{cells:?}");
        assert_eq!(cells[2], regscope::report::bytes(stored[index].1), "{cells:?}");
        assert_eq!(cells[3], outcome, "{cells:?}");
    }
}

/// The waterfall `<svg>` inside the page's `#waterfall`.
fn waterfall_in(page: &str) -> Element {
    let holder = by_id(page, "div", "waterfall");
    let mut svgs = holder.children("svg");
    assert_eq!(svgs.len(), 1, "want one <svg> in #waterfall: {}", holder.inner);
    svgs.remove(0)
}

/// Within 1 %, or `floor` for values near zero.
fn close(measured: f64, truth: f64, floor: f64) -> bool {
    (measured - truth).abs() <= (truth.abs() * 0.01).max(floor)
}

/// The waterfall draws every request of `t` and nothing else; each request's segments add up to
/// its duration and, party by party, to its split; every segment is `seconds × scale` wide; and the
/// segments of a request tile its span on the axis, from `start` to `end`, without gaps or overlap.
fn assert_waterfall_matches(svg: &Element, t: &Transfer) {
    let wall = svg.num("data-wall");
    let scale = svg.num("data-scale");
    assert!(close(wall, t.wall_seconds, 1e-9), "data-wall {wall} vs the JSON's wall_seconds {}", t.wall_seconds);
    assert!(close(scale, regscope::waterfall::scale(t.wall_seconds), 1e-9), "data-scale {scale}");
    let svg_width = svg.num("width");

    let groups = with_class(&svg.inner, "g", "request");
    let by_id: BTreeMap<u64, &regscope::RequestView> = t.requests.iter().map(|r| (r.id, r)).collect();
    assert_eq!(groups.len(), t.requests.len(), "one g.request per request of the JSON\n{}", pretty(t));
    // Where the time axis starts, in pixels: the same for every row.
    let mut origin: Option<f64> = None;
    for g in &groups {
        let id = g.num("data-id") as u64;
        let r = by_id.get(&id).unwrap_or_else(|| panic!("g.request {id} is not in the JSON\n{}", pretty(t)));
        let what = format!("request {id} ({} {})", r.method, r.operation.as_str());
        assert!(close(g.num("data-start"), r.start, 1e-9), "{what}: data-start {} vs {}", g.num("data-start"), r.start);
        assert!(close(g.num("data-end"), r.end, 1e-9), "{what}: data-end {} vs {}", g.num("data-end"), r.end);
        let segments: Vec<Element> = g.children("rect").into_iter().filter(|s| s.has_class("segment")).collect();
        let duration = r.end - r.start;
        let total: f64 = segments.iter().map(|s| s.num("data-seconds")).sum();
        assert!(close(total, duration, 1e-6), "{what}: segments add up to {total} s, the JSON says {duration} s");
        let split = r.split();
        for (party, want) in [("client", split.client), ("registry", split.registry), ("moving", split.moving)] {
            let got: f64 =
                segments.iter().filter(|s| s.req("data-party") == party).map(|s| s.num("data-seconds")).sum();
            assert!(close(got, want, 1e-3), "{what}: {party} segments add up to {got} s, its split says {want} s");
        }
        for s in &segments {
            let party = s.req("data-party");
            assert!(s.has_class(party), "{what}: segment class {:?} vs data-party {party}", s.req("class"));
            let (seconds, width) = (s.num("data-seconds"), s.num("width"));
            assert!(
                close(width, seconds * scale, 0.001),
                "{what}: a {party} segment of {seconds} s is {width} px wide, want {} px",
                seconds * scale
            );
        }
        if let Some(first) = segments.first() {
            let here = first.num("x") - r.start * scale;
            let origin = *origin.get_or_insert(here);
            assert!(
                (here - origin).abs() < 0.01,
                "{what}: starts at x {} instead of {}",
                first.num("x"),
                origin + r.start * scale
            );
            let mut x = first.num("x");
            for s in &segments {
                assert!(
                    (s.num("x") - x).abs() < 0.5,
                    "{what}: a segment at x {} leaves a gap or overlaps ({x} expected)",
                    s.num("x")
                );
                x = s.num("x") + s.num("width");
            }
            assert!(
                (x - (origin + r.end * scale)).abs() < 0.5,
                "{what}: ends at x {x}, want {}",
                origin + r.end * scale
            );
            assert!(x <= svg_width + 0.01, "{what}: ends at x {x}, past the svg's width {svg_width}");
        }
    }
}

fn live_request_bytes(page: &str) -> u64 {
    let rows = with_class(page, "tr", "live-request");
    assert_eq!(rows.len(), 1, "want one request in progress on /:\n{page}");
    rows[0].num("data-bytes") as u64
}

// === plumbing ===

fn transfer_json(admin: SocketAddr, id: u64) -> Transfer {
    let response = http_get(admin, &format!("/api/v1/transfers/{id}"));
    assert_eq!(response.status, 200, "GET /api/v1/transfers/{id}: {}", response.text());
    serde_json::from_slice(&response.body).unwrap_or_else(|e| panic!("transfer {id} JSON ({e}): {}", response.text()))
}

/// The only absolute URL the pages may hold is the SVG namespace (not fetched).
fn only_svg_namespace(html: &str) -> bool {
    html.replace("http://www.w3.org/2000/svg", "").find("://").is_none()
}

fn artifact(name: &str) -> PathBuf {
    artifact_path(&format!("ui_browser/{name}"))
}

fn save_artifact(name: &str, text: &str) {
    let path = artifact(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn screenshot(browser: &Browser, url: &str, name: &str, width: u32, height: u32) {
    let path = artifact(name);
    browser.screenshot(url, &path, width, height);
    assert!(std::fs::metadata(&path).unwrap().len() > 5_000, "{} is nearly empty", path.display());
    eprintln!("screenshot of {url}: {}", path.display());
}
