//! The admin port's small web UI: recent and in-progress transfers, and each transfer's
//! waterfall. Plain server-rendered HTML and SVG, no external assets, no script: it works
//! offline and needs no build step.

use std::fmt::Write as _;

use crate::presentation::report::bytes;
use crate::presentation::waterfall::{escape, render_svg, request_label, AUTH, CLIENT, MOVING, REGISTRY, STORAGE};
use crate::protocol::Culprit;
use crate::recording::Split;
use crate::recording::{Blob, LiveTransfer, Transfer};

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}\
td.num{text-align:right;font-variant-numeric:tabular-nums}.bar{display:flex;width:240px;height:12px;background:#eee}\
.bar span{display:block;height:12px}progress{width:240px}code{font-size:12px}#waterfall svg{max-width:100%;height:auto}";

fn page(title: &str, refresh: Option<u32>, body: &str) -> String {
    let refresh = refresh.map(|s| format!(r#"<meta http-equiv="refresh" content="{s}">"#)).unwrap_or_default();
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8">{refresh}<title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>"#,
        escape(title)
    )
}

/// A stacked bar of client / registry / moving shares.
fn shares_bar(parties: &Split, wall: f64) -> String {
    let pct = |x: f64| if wall > 0.0 { 100.0 * x / wall } else { 0.0 };
    format!(
        r#"<div class="bar" title="client {c:.1} %, registry {r:.1} %, storage {s:.1} %, auth {a:.1} %, moving {m:.1} %"><span class="client" style="width:{c:.2}%;background:{CLIENT}"></span><span class="registry" style="width:{r:.2}%;background:{REGISTRY}"></span><span class="storage" style="width:{s:.2}%;background:{STORAGE}"></span><span class="auth" style="width:{a:.2}%;background:{AUTH}"></span><span class="moving" style="width:{m:.2}%;background:{MOVING}"></span></div>"#,
        c = pct(parties.client),
        r = pct(parties.registry),
        s = pct(parties.storage),
        a = pct(parties.auth),
        m = pct(parties.moving),
    )
}

fn name(repository: &str, tag: Option<&str>) -> String {
    escape(&crate::recording::image_name(repository, tag))
}

/// `/`: transfers in progress (refreshing by itself), then recent ones, newest first.
pub(crate) fn index(live: &[LiveTransfer], recent: &[std::sync::Arc<Transfer>]) -> String {
    let mut b = String::new();
    let _ = write!(b, "<h1>regscope</h1><h2>In progress</h2>");
    if live.is_empty() {
        b.push_str(r#"<p id="live-empty">No push or pull in progress.</p>"#);
    } else {
        b.push_str(r#"<table id="live"><tr><th>direction</th><th>image</th><th>client</th><th>elapsed</th><th>request</th><th>progress</th><th>bytes</th></tr>"#);
        for t in live {
            let failed = match t.failed_requests {
                0 => String::new(),
                n => format!(r#"<br><span class="failures" data-failed="{n}">{n} failed</span>"#),
            };
            let head = format!(
                "<td>{}</td><td>{}</td><td>{}</td><td class=num>{:.1} s{failed}</td>",
                t.direction.as_str(),
                name(&t.repository, t.tag.as_deref()),
                escape(&t.client),
                t.elapsed
            );
            if t.in_flight.is_empty() {
                let _ = write!(
                    b,
                    r#"<tr class="live-transfer">{head}<td>(between requests)</td><td></td><td class="num" data-bytes="{}">{}</td></tr>"#,
                    t.bytes_done,
                    bytes(t.bytes_done)
                );
            }
            for r in &t.in_flight {
                // Docker's PATCH declares no length: show the bytes, not a bar that looks 10 % done.
                let bar = match r.expected {
                    Some(n) if n > 0 => format!(r#"<progress value="{}" max="{n}"></progress>"#, r.bytes.min(n)),
                    _ => "size unknown".to_owned(),
                };
                let of = r.expected.map(|n| format!(" of {}", bytes(n))).unwrap_or_default();
                let _ = write!(
                    b,
                    r#"<tr class="live-request" data-bytes="{}">{head}<td><code>{} {}</code></td><td>{bar}</td><td class="num">{}{of}</td></tr>"#,
                    r.bytes,
                    r.operation.as_str(),
                    escape(r.digest.as_deref().or(r.upload_id.as_deref()).unwrap_or("")),
                    bytes(r.bytes)
                );
            }
        }
        b.push_str("</table>");
    }
    b.push_str("<h2>Recent transfers</h2>");
    if recent.is_empty() {
        b.push_str("<p>None yet.</p>");
    } else {
        b.push_str(r#"<table id="recent"><tr><th>#</th><th>direction</th><th>image</th><th>client</th><th>size</th><th>wall</th><th>client / registry / moving</th><th>outcome</th></tr>"#);
        for t in recent {
            let _ = write!(
                b,
                r#"<tr class="transfer" data-id="{id}"><td><a href="/transfers/{id}">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{:.2} s</td><td>{}</td><td>{}</td></tr>"#,
                t.direction.as_str(),
                name(&t.repository, t.tag.as_deref()),
                escape(&t.client),
                bytes(t.bytes),
                t.wall_seconds,
                shares_bar(&t.parties, t.wall_seconds),
                outcome_text(t),
                id = t.id,
            );
        }
        b.push_str("</table>");
    }
    page("regscope", Some(2), &b)
}

/// ", after 1 failed attempt (registry)" for a blob that needed retries.
fn failed_attempts(blob: &Blob) -> String {
    let failed: Vec<&str> = blob.attempts.iter().filter_map(|a| a.failed_by).map(Culprit::as_str).collect();
    match failed.len() {
        0 => String::new(),
        n => format!(
            r#" <span class="failed-attempts" data-failed="{n}">after {n} failed attempt{} ({})</span>"#,
            if n == 1 { "" } else { "s" },
            failed.join(", ")
        ),
    }
}

/// Its outcome, and what failures cost it when they did: "complete, 4.9 s lost to registry".
fn outcome_text(t: &Transfer) -> String {
    let mut text = t.outcome.as_str().to_owned();
    for culprit in Culprit::ALL.into_iter().filter(|&c| t.lost.get(c) > 0.0) {
        let _ = write!(
            text,
            r#", <span class="lost" data-culprit="{c}" data-seconds="{s}">{s:.1} s lost to {c}</span>"#,
            c = culprit.as_str(),
            s = t.lost.get(culprit)
        );
    }
    text
}

/// `/transfers/<id>`: the waterfall, the layers, and every request with exact figures.
pub fn transfer_page(t: &Transfer) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<p><a href="/">← all transfers</a></p><h1>{} {} {}</h1><p>{} · {} · {} · {:.3} s wall</p>{}"#,
        t.api.as_str(),
        t.direction.as_str(),
        name(&t.repository, t.tag.as_deref()),
        escape(&t.client),
        t.outcome.as_str(),
        bytes(t.bytes),
        t.wall_seconds,
        shares_bar(&t.parties, t.wall_seconds)
    );
    // The trace id, to find the same push in the trace backend it was exported to.
    if let Some(trace) = t.trace_id {
        let _ = write!(b, r#"<p>trace <code id="trace-id">{trace}</code></p>"#);
    }
    let _ = write!(
        b,
        r#"<p><a href="/transfers/{}.svg">waterfall as SVG</a></p><div id="waterfall">{}</div>"#,
        t.id,
        render_svg(t)
    );
    b.push_str(r#"<h2>Layers</h2><table id="layers"><tr><th>blob</th><th>kind</th><th>size</th><th>outcome</th><th>time</th><th>client / registry / moving</th></tr>"#);
    for blob in &t.blobs {
        let kind = blob.kind.map_or("blob", |k| match k {
            crate::protocol::BlobKind::Config => "config",
            crate::protocol::BlobKind::Layer => "layer",
        });
        let seconds = blob.phases.map_or(blob.split.total(), |p| p.total);
        let _ = write!(
            b,
            r#"<tr class="layer" data-digest="{}" data-bytes="{}"><td><code>{}</code></td><td>{kind}</td><td class="num">{}</td><td>{}</td><td class="num">{seconds:.3} s</td><td class="num">{:.3} / {:.3} / {:.3} s</td></tr>"#,
            escape(blob.digest.as_deref().unwrap_or("")),
            blob.bytes,
            escape(blob.digest.as_deref().unwrap_or("?")),
            bytes(blob.bytes),
            blob.outcome.as_str().to_owned() + &failed_attempts(blob),
            blob.split.client,
            blob.split.registry,
            blob.split.moving,
        );
    }
    b.push_str("</table>");
    b.push_str(r#"<h2>Requests</h2><table id="requests"><tr><th>start</th><th>request</th><th>duration</th><th>in</th><th>out</th><th>client / registry / moving</th></tr>"#);
    for r in &t.requests {
        let split = r.split();
        let _ = write!(
            b,
            r#"<tr><td class="num">{:.4} s</td><td><code>{}</code></td><td class="num">{:.4} s</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.4} / {:.4} / {:.4} s</td></tr>"#,
            r.start,
            escape(&request_label(r)),
            r.duration(),
            r.bytes_in(),
            r.bytes_out(),
            split.client,
            split.registry,
            split.moving
        );
    }
    b.push_str("</table>");
    page(&format!("regscope transfer {}", t.id), None, &b)
}
