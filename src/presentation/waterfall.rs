//! A transfer as a waterfall, the way browser devtools show a page load: one row per request
//! on a shared time axis, each row's segments coloured by what the bytes were waiting on.
//! Silent gaps between requests stay visible as gaps. Rendered as a standalone SVG.
//!
//! Segment widths are exact: every `<rect>` carries `data-seconds`, and its width is that
//! duration times the axis scale.

use std::fmt::Write as _;

use crate::protocol::{Culprit, Operation};
use crate::recording::RequestView;
use crate::recording::Transfer;

/// Colours per party: the same in the waterfall, the stacked bars and the legend.
pub(crate) const CLIENT: &str = "#d1495b";
pub(crate) const REGISTRY: &str = "#edae49";
pub(crate) const MOVING: &str = "#00798c";
pub(crate) const STORAGE: &str = "#6a4c93";
pub(crate) const AUTH: &str = "#8d6e63";

const WIDTH: f64 = 1100.0;
const LABEL: f64 = 330.0;
const ROW: f64 = 20.0;
/// Where the first row starts: below the title (line 1), the legend (line 2) and the tick labels.
const TOP: f64 = 62.0;

/// Escapes text for HTML and SVG.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A request's label: its operation and what it names.
pub(crate) fn request_label(r: &RequestView) -> String {
    let manifest = matches!(
        r.operation,
        Operation::ManifestGet | Operation::ManifestHead | Operation::ManifestPut | Operation::ManifestDelete
    );
    let what = if manifest { r.reference.as_deref().or(r.digest.as_deref()) } else { r.digest.as_deref() };
    let what = what.or(r.reference.as_deref()).or(r.upload_id.as_deref()).unwrap_or("");
    let what = what.split_once(':').map_or(what, |(_, hex)| hex);
    let what = &what[..what.len().min(12)];
    let status = r.status.map_or("—".to_owned(), |s| s.to_string());
    let moved = r.bytes_in() + r.bytes_out();
    let size = if moved >= 1024 { format!(" {}", crate::presentation::report::bytes(moved)) } else { String::new() };
    format!("{} {} {} {}{size}", r.method, r.operation.as_str(), what, status)
}

/// The coloured pieces of one request, in time order: (party, start offset, seconds). Derived
/// from the request's segments (`RequestView::segments`, the cut the attribution uses too); a
/// body's mix is drawn as its client / registry / moving parts, in that order within the body.
pub(crate) fn pieces(r: &RequestView) -> Vec<(&'static str, f64, f64)> {
    let mut out = Vec::new();
    for segment in r.segments() {
        let length = segment.to - segment.from;
        let mut at = segment.from;
        let mix = segment.mix;
        let parts = [
            ("client", mix.client),
            ("registry", mix.registry),
            ("storage", mix.storage),
            ("auth", mix.auth),
            ("moving", mix.moving),
        ];
        for (party, share) in parts {
            let seconds = share * length;
            if seconds > 0.0 {
                out.push((party, at, seconds));
                at += seconds;
            }
        }
    }
    out
}

fn colour(party: &str) -> &'static str {
    match party {
        "client" => CLIENT,
        "registry" => REGISTRY,
        "storage" => STORAGE,
        "auth" => AUTH,
        _ => MOVING,
    }
}

/// Pixels per second for a transfer of this wall time.
pub fn scale(wall: f64) -> f64 {
    (WIDTH - LABEL - 10.0) / wall.max(1e-6)
}

/// The waterfall of one transfer as a standalone SVG document.
pub fn render_svg(t: &Transfer) -> String {
    let scale = scale(t.wall_seconds);
    let height = TOP + ROW * t.requests.len() as f64 + 40.0;
    let mut s = String::with_capacity(512 + 400 * t.requests.len());
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="11" data-wall="{wall}" data-scale="{scale}">"#,
        wall = t.wall_seconds
    );
    let title = format!("{} {} {} — {:.3} s", t.api.as_str(), t.direction.as_str(), t.image(), t.wall_seconds);
    let _ = write!(s, r#"<text x="4" y="14" font-size="13">{}</text>"#, escape(&title));
    // Legend, on a line of its own: a long title would run into it.
    let mut legend = vec![("client", "waiting on client"), ("registry", "waiting on registry")];
    if t.parties.storage > 0.0 {
        legend.push(("storage", "waiting on storage"));
    }
    if t.parties.auth > 0.0 {
        legend.push(("auth", "waiting on auth"));
    }
    legend.push(("moving", "bytes moving"));
    for (i, (party, name)) in legend.into_iter().enumerate() {
        let x = 4.0 + i as f64 * 170.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="22" width="12" height="10" fill="{}"/><text x="{}" y="31">{name}</text>"#,
            colour(party),
            x + 16.0
        );
    }
    // Time axis ticks.
    let step = nice_step(t.wall_seconds / 8.0);
    let mut tick = 0.0;
    while tick <= t.wall_seconds + 1e-9 && step > 0.0 {
        let x = LABEL + tick * scale;
        let _ = write!(
            s,
            r##"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{}" stroke="#ddd"/><text x="{x:.2}" y="{}" fill="#666" text-anchor="middle">{}</text>"##,
            TOP - 8.0,
            height - 30.0,
            TOP - 10.0,
            format_seconds(tick)
        );
        tick += step;
    }
    // Failed attempts: their requests are marked, and the client's wait after each is drawn on
    // the row of the attempt's last request, as time lost to whoever failed.
    let mut failed: Vec<(u64, Culprit)> = Vec::new();
    let mut waits: Vec<(u64, f64, f64, Culprit)> = Vec::new();
    for blob in &t.blobs {
        for (n, a) in blob.attempts.iter().enumerate() {
            let Some(culprit) = a.failed_by else { continue };
            failed.extend(a.requests.iter().map(|&id| (id, culprit)));
            if let (Some(next), Some(&last)) = (blob.attempts.get(n + 1), a.requests.last()) {
                waits.push((last, a.end, next.start, culprit));
            }
        }
    }
    for (i, r) in t.requests.iter().enumerate() {
        let y = TOP + i as f64 * ROW;
        let label = escape(&request_label(r));
        let culprit = failed.iter().find(|(id, _)| *id == r.id).map(|&(_, c)| c);
        let _ = write!(
            s,
            r#"<g class="request{}" data-id="{}" data-start="{}" data-end="{}"{}><text x="4" y="{:.1}">{}</text>"#,
            if culprit.is_some() { " failed" } else { "" },
            r.id,
            r.start,
            r.end,
            culprit.map(|c| format!(r#" data-failed-by="{}""#, c.as_str())).unwrap_or_default(),
            y + 13.0,
            label
        );
        for &(_, from, to, culprit) in waits.iter().filter(|w| w.0 == r.id && w.2 > w.1) {
            let _ = write!(
                s,
                r##"<rect class="retry-wait" data-culprit="{c}" data-seconds="{}" x="{:.3}" y="{:.1}" width="{:.3}" height="{:.1}" fill="none" stroke="#c0392b" stroke-dasharray="4 3"><title>retry wait: {:.3} s lost to {c}</title></rect>"##,
                to - from,
                LABEL + from * scale,
                y + 3.0,
                (to - from) * scale,
                ROW - 6.0,
                to - from,
                c = culprit.as_str()
            );
        }
        // A faint span under the segments keeps sub-pixel requests visible; not a segment.
        let _ = write!(
            s,
            r##"<rect class="span" x="{:.3}" y="{:.1}" width="{:.3}" height="{:.1}" fill="#ccc"/>"##,
            LABEL + r.start * scale,
            y + 3.0,
            (r.duration() * scale).max(2.0),
            ROW - 6.0
        );
        for (party, from, seconds) in pieces(r) {
            let _ = write!(
                s,
                r#"<rect class="segment {party}" data-party="{party}" data-seconds="{seconds}" x="{:.3}" y="{:.1}" width="{:.3}" height="{:.1}" fill="{}"><title>{party}: {:.4} s</title></rect>"#,
                LABEL + from * scale,
                y + 3.0,
                seconds * scale,
                ROW - 6.0,
                colour(party),
                seconds
            );
        }
        if culprit.is_some() {
            let _ = write!(
                s,
                r##"<rect class="failed-outline" x="{:.3}" y="{:.1}" width="{:.3}" height="{:.1}" fill="none" stroke="#c0392b"/>"##,
                LABEL + r.start * scale,
                y + 2.0,
                (r.duration() * scale).max(2.0),
                ROW - 4.0
            );
        }
        let bytes = r.bytes_in() + r.bytes_out();
        let split = r.split();
        let failed_text = culprit.map(|c| format!(", failed ({})", c.as_str())).unwrap_or_default();
        let _ = write!(
            s,
            r#"<title>{label}{failed_text}: {:.4} s, {bytes} bytes, client {:.4} s / registry {:.4} s / moving {:.4} s</title></g>"#,
            r.duration(),
            split.client,
            split.registry,
            split.moving
        );
    }
    let shares = t.parties;
    let pct = |x: f64| if t.wall_seconds > 0.0 { 100.0 * x / t.wall_seconds } else { 0.0 };
    let lost =
        if t.lost.total() > 0.0 { format!(", lost to failures {:.1} %", pct(t.lost.total())) } else { String::new() };
    let _ = write!(
        s,
        r#"<text x="4" y="{:.1}">client {:.1} %, registry {:.1} %, moving {:.1} %{lost} of {:.3} s</text></svg>"#,
        height - 10.0,
        pct(shares.client),
        pct(shares.registry),
        pct(shares.moving),
        t.wall_seconds
    );
    s
}

/// A round tick step (1, 2 or 5 times a power of ten) close to `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 0.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    let n = raw / power;
    let nice = if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * power
}

fn format_seconds(t: f64) -> String {
    if t == 0.0 {
        "0".into()
    } else if t < 1.0 {
        format!("{:.0} ms", t * 1e3)
    } else {
        format!("{t:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::BodyEnd;
    use crate::recording::BodyView;

    fn request() -> RequestView {
        RequestView {
            id: 3,
            method: "PATCH".into(),
            operation: Operation::UploadChunk,
            status: Some(202),
            digest: None,
            reference: None,
            upload_id: Some("u-1".into()),
            start: 1.0,
            forwarded: Some(1.01),
            response_head: Some(5.0),
            end: 5.2,
            upload: Some(BodyView {
                bytes: 100,
                start: 1.02,
                end: 4.0,
                client_wait: 2.0,
                registry_wait: 0.5,
                outcome: BodyEnd::Complete,
            }),
            download: None,
            aborted_by: None,
            upstream_error: None,
            trace: None,
        }
    }

    #[test]
    fn pieces_cover_the_request_exactly() {
        let r = request();
        let pieces = pieces(&r);
        let total: f64 = pieces.iter().map(|p| p.2).sum();
        assert!((total - r.duration()).abs() < 1e-9, "{pieces:?}");
        let client: f64 = pieces.iter().filter(|p| p.0 == "client").map(|p| p.2).sum();
        assert!((client - 2.0).abs() < 1e-9);
        // Registry: connect (0.01) + body wait (0.5) + processing after the body (1.0).
        let registry: f64 = pieces.iter().filter(|p| p.0 == "registry").map(|p| p.2).sum();
        assert!((registry - 1.51).abs() < 1e-9, "{registry}");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.13), 0.1);
        assert_eq!(nice_step(2.7), 2.0);
        assert_eq!(nice_step(60.0), 50.0);
        assert_eq!(nice_step(0.0), 0.0);
    }

    #[test]
    fn escaping() {
        assert_eq!(escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
