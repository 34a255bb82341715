//! Rendering transfers as the table people otherwise build by hand from registry logs: one
//! row per phase per layer, its time and share of the whole, then a one-line verdict.

use std::fmt::Write as _;

use crate::protocol::BlobKind;
use crate::protocol::{Api, Operation};
use crate::protocol::{Culprit, Party, TransferDirection};
use crate::recording::{Attempt, AttemptOutcome, Blob, BlobOutcome, Transfer};

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub operation: String,
    pub seconds: f64,
    /// Waiting on the client / registry / bytes moving, where that split is known.
    pub split: Option<crate::recording::Split>,
}

fn short(id: &str) -> &str {
    let hex = id.split_once(':').map_or(id, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

/// A digest, or a v1 image id (64 hex digits): shown shortened. Tags are shown whole.
fn is_id(reference: &str) -> bool {
    reference.contains(':') || (reference.len() == 64 && reference.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(crate) fn blob_name(blob: &Blob, index: usize) -> String {
    let kind = match blob.kind {
        Some(BlobKind::Config) => "config".to_owned(),
        Some(BlobKind::Layer) | None => format!("layer {}", blob.layer.unwrap_or(index + 1)),
    };
    match &blob.digest {
        Some(d) => format!("{kind} {}", short(d)),
        None => kind,
    }
}

/// Human units: `1.0 GB`, `37.1 MB`, `512 B` (decimal, like the registry logs and the seed).
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}

/// The rows of one transfer, in the order things happened.
pub(crate) fn rows(t: &Transfer) -> Vec<Row> {
    // (start offset, order within a group, row): sorted at the end.
    let mut out: Vec<(f64, usize, Row)> = Vec::new();
    let mut layer_index = 0;
    let mut blobs: Vec<&Blob> = t.blobs.iter().collect();
    blobs.sort_by(|a, b| a.start.total_cmp(&b.start));
    let v1 = t.api == Api::V1;
    for blob in blobs {
        let name = blob_name(blob, layer_index);
        if blob.kind != Some(BlobKind::Config) {
            layer_index += 1;
        }
        if blob.outcome == BlobOutcome::Present {
            let size = blob.declared_size.map(|n| format!(" ({})", bytes(n))).unwrap_or_default();
            // A push's registry had it (or a concurrent push moved it); a pull's client had it.
            let verb = match t.direction {
                TransferDirection::Push => "in registry",
                TransferDirection::Pull => "present",
            };
            let row = Row { operation: format!("{verb} {name}{size}"), seconds: 0.0, split: None };
            out.push((blob.start, 0, row));
            continue;
        }
        // Failed attempts first, each with the client's wait after it: lost to whoever failed.
        for (i, a) in blob.attempts.iter().enumerate().filter(|(_, a)| a.outcome == AttemptOutcome::Failed) {
            let by = a.failed_by.map_or(String::new(), |c| format!(": {}", failure_words(c, a)));
            let operation = format!("failed attempt {name} ({}){by}", bytes(a.bytes));
            out.push((a.start, 0, Row { operation, seconds: a.end - a.start, split: None }));
            if let Some(next) = blob.attempts.get(i + 1) {
                let operation = format!("retry wait {name}");
                out.push((a.end, 0, Row { operation, seconds: (next.start - a.end).max(0.0), split: None }));
            }
        }
        let size = format!(" ({})", bytes(blob.bytes));
        let mut push = |i: usize, operation: String, seconds: f64, split| {
            out.push((blob.start, i, Row { operation, seconds, split }))
        };
        match (&blob.phases, t.direction) {
            (Some(p), TransferDirection::Push) => {
                let (start, transfer, commit) =
                    if v1 { ("put json", "put layer", "put checksum") } else { ("start", "transfer", "commit") };
                let id = if v1 { blob.digest.as_deref().map_or("", short).to_owned() } else { name.clone() };
                push(0, format!("{start} {id}"), p.start, None);
                push(1, format!("{transfer} {id}{size}"), p.transfer, Some(p.transfer_split));
                push(2, format!("{commit} {id}"), p.commit, None);
                push(3, format!("gap {id}"), p.gap, None);
            }
            _ if v1 => {
                let id = blob.digest.as_deref().map_or("", short);
                push(0, format!("get json {id}"), blob.metadata_seconds, None);
                push(1, format!("get layer {id}{size}"), blob.split.total(), Some(blob.split));
            }
            _ => push(0, format!("get {name}{size}"), blob.split.total(), Some(blob.split)),
        }
    }
    for r in &t.requests {
        let label = match r.operation {
            Operation::ManifestPut => "put manifest",
            Operation::ManifestGet => "get manifest",
            Operation::ManifestHead => "head manifest",
            Operation::V1TagPut => "put tag",
            Operation::V1RepositoryImagesPut => "put images",
            Operation::V1RepositoryImagesGet => "get images",
            Operation::V1TagsGet => "get tags",
            Operation::V1AncestryGet => "get ancestry",
            _ => continue,
        };
        let reference = r.reference.as_deref().map(|x| if is_id(x) { short(x) } else { x }).unwrap_or("");
        let row =
            Row { operation: format!("{label} {reference}").trim_end().to_owned(), seconds: r.duration(), split: None };
        out.push((r.start, 0, row));
    }
    // The silent gaps between uploads, when nothing of the transfer was on the wire: the
    // client working. Gaps inside one upload are already its `gap` row.
    // Nor are the waits after failed attempts: they are lost to whoever failed.
    let mut spans: Vec<(f64, f64)> = t.blobs.iter().filter(|b| b.phases.is_some()).map(|b| (b.start, b.end)).collect();
    for b in &t.blobs {
        spans.extend(
            b.attempts.windows(2).filter(|w| w[0].outcome == AttemptOutcome::Failed).map(|w| (w[0].start, w[1].start)),
        );
    }
    let threshold = (t.wall_seconds * 0.005).max(0.010);
    for (from, to) in idle_intervals(t) {
        let inside_upload = spans.iter().any(|&(a, b)| a <= from && to <= b);
        if to - from >= threshold && !inside_upload {
            out.push((from, 0, Row { operation: "idle (client working)".to_owned(), seconds: to - from, split: None }));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    out.into_iter().map(|(_, _, row)| row).collect()
}

/// Intervals of the transfer's wall time with no request on the wire.
pub(crate) fn idle_intervals(t: &Transfer) -> Vec<(f64, f64)> {
    let mut spans: Vec<(f64, f64)> = t.requests.iter().map(|r| (r.start, r.end)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut idle = Vec::new();
    let mut covered = 0.0_f64;
    for (start, end) in spans {
        if start > covered {
            idle.push((covered, start));
        }
        covered = covered.max(end);
    }
    if t.wall_seconds > covered {
        idle.push((covered, t.wall_seconds));
    }
    idle
}

/// "fetched 1 of 3 layers (2 already present)", for a pull that found layers on its client; "pushed
/// 1 of 3 layers (2 already in the registry)" for a push.
fn layers_fetched(t: &Transfer) -> Option<String> {
    let layers = || t.blobs.iter().filter(|b| b.kind == Some(BlobKind::Layer));
    let present = layers().filter(|b| b.outcome == BlobOutcome::Present).count();
    let (verb, moved, had) = match t.direction {
        TransferDirection::Pull => ("fetched", BlobOutcome::Fetched, "already present"),
        TransferDirection::Push => ("pushed", BlobOutcome::Committed, "already in the registry"),
    };
    let moved = layers().filter(|b| b.outcome == moved).count();
    (present > 0).then(|| format!("{verb} {moved} of {} layers ({present} {had})", layers().count()))
}

/// How a failed attempt ended, in words: "registry (connection lost, 502)".
fn failure_words(culprit: Culprit, a: &Attempt) -> String {
    let cause = a.cause.map_or("", |c| c.as_str()).replace('_', " ");
    match a.status {
        Some(status) => format!("{} ({cause}, {status})", culprit.as_str()),
        None => format!("{} ({cause})", culprit.as_str()),
    }
}

/// "4.9 s (46 %) lost to a registry failure at 53.7 MB and the client's retry; ", for each party
/// that failed; empty when nothing did.
fn losses(t: &Transfer) -> String {
    let mut text = String::new();
    for culprit in Culprit::ALL.into_iter().filter(|&c| t.lost.get(c) > 0.0) {
        let seconds = t.lost.get(culprit);
        let attempts = t.blobs.iter().flat_map(|b| b.attempts.iter().enumerate().map(move |(i, a)| (b, i, a)));
        let failed: Vec<_> = attempts.filter(|(_, _, a)| a.failed_by == Some(culprit)).collect();
        let moved: u64 = failed.iter().map(|(_, _, a)| a.bytes).sum();
        let retried = failed.iter().any(|(b, i, _)| b.attempts.len() > i + 1);
        let what = match (culprit, failed.len()) {
            (Culprit::Client, _) => "the client giving up".to_owned(),
            (c, 1) => format!("a {} failure", c.as_str()),
            (c, n) => format!("{n} {} failures", c.as_str()),
        };
        let _ = write!(
            text,
            "{seconds:.1} s ({:.0} %) lost to {what} at {}{}; ",
            100.0 * seconds / t.wall_seconds,
            bytes(moved),
            if retried { " and the client's retry" } else { "" }
        );
    }
    text
}

/// The one-line verdict: where this transfer's time went.
pub(crate) fn verdict(t: &Transfer) -> String {
    let wall = t.wall_seconds;
    if wall <= 0.0 {
        return format!("this {} took no measurable time", t.direction.as_str());
    }
    let pct = |x: f64| 100.0 * x / wall;
    let client_doing = match t.direction {
        TransferDirection::Push => "compressing, hashing, or idle between requests",
        TransferDirection::Pull => "reading slowly (extracting), or idle between requests",
    };
    let mut storage = String::new();
    for (party, name) in [(Party::Storage, "storage"), (Party::Auth, "auth (tokens)")] {
        let seconds = t.parties.get(party);
        if seconds > 0.0 {
            storage += &format!(", {:.0} % in {name}", pct(seconds));
        }
    }
    format!(
        "{}{}{:.0} % of this {} was spent in the client ({client_doing}), {:.0} % in the registry{storage}, {:.0} % moving bytes",
        losses(t),
        layers_fetched(t).map(|s| s + "; ").unwrap_or_default(),
        pct(t.parties.client),
        t.direction.as_str(),
        pct(t.parties.registry),
        pct(t.parties.moving),
    )
}

/// A row's `client / registry / moving` split, and the time waited on storage or a token
/// service after it when there was any.
fn split_text(p: crate::recording::Split) -> String {
    let mut text = format!("{:.2}s / {:.2}s / {:.2}s", p.client, p.registry, p.moving);
    for (party, name) in [(Party::Storage, "storage"), (Party::Auth, "auth")] {
        if p.get(party) > 0.0 {
            text += &format!(" + {:.2}s {name}", p.get(party));
        }
    }
    text
}

/// The whole table for one transfer.
pub fn render(t: &Transfer) -> String {
    let mut s = String::new();
    let title = format!(
        "{} {} {} from {} — {} ({} requests, {})",
        t.api.as_str(),
        t.direction.as_str(),
        t.image(),
        t.client,
        t.outcome.as_str(),
        t.requests.len() as u64 + t.requests_dropped,
        bytes(t.bytes),
    );
    let _ = writeln!(s, "transfer {}: {title}", t.id);
    let rows = rows(t);
    let width = rows.iter().map(|r| r.operation.chars().count()).max().unwrap_or(0).max(24);
    let heading = format!("{} phase", t.direction.as_str());
    let _ = writeln!(s, "  {heading:<width$}  {:>10}  {:>7}  {:>26}", "time", "share", "client / registry / moving");
    for row in &rows {
        let share = if t.wall_seconds > 0.0 { 100.0 * row.seconds / t.wall_seconds } else { 0.0 };
        let split = row.split.map(split_text).unwrap_or_default();
        let _ = writeln!(s, "  {:<width$}  {:>9.3}s  {:>6.1}%  {:>26}", row.operation, row.seconds, share, split);
    }
    for culprit in Culprit::ALL.into_iter().filter(|&c| t.lost.get(c) > 0.0) {
        let seconds = t.lost.get(culprit);
        let share = 100.0 * seconds / t.wall_seconds;
        let _ = writeln!(
            s,
            "  {:<width$}  {seconds:>9.3}s  {share:>6.1}%",
            format!("lost to {} failures", culprit.as_str())
        );
    }
    let _ = writeln!(s, "  {:<width$}  {:>9.3}s  {:>6.1}%", "total (wall)", t.wall_seconds, 100.0);
    if rows.len() > 1 {
        let _ = writeln!(s, "  (blobs move in parallel, so rows may add up to more than the wall time)");
    }
    let _ = writeln!(s, "  verdict: {}", verdict(t));
    s
}

/// Why `regscope report` could not get the transfers.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not an http:// admin address")]
    Address(String),
    #[error("asking {url}: {cause}")]
    Request { url: String, cause: String },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url} sent something that is not a transfers list: {cause}")]
    Decode { url: String, cause: String },
}

/// Fetches the newest `last` transfers from a running regscope's admin port.
pub async fn fetch(admin: &http::Uri, last: usize) -> Result<Vec<Transfer>, FetchError> {
    use http_body_util::{BodyExt, Empty};
    let authority = admin.authority().ok_or_else(|| FetchError::Address(admin.to_string()))?;
    if admin.scheme_str().is_some_and(|s| s != "http") {
        return Err(FetchError::Address(admin.to_string()));
    }
    let url = format!("http://{authority}/api/v1/transfers?limit={last}");
    let uri: http::Uri = url.parse().map_err(|_| FetchError::Address(admin.to_string()))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let failed = |cause: String| FetchError::Request { url: url.clone(), cause };
    let response = client.get(uri).await.map_err(|e| failed(crate::wire::error::classify_client_error(&e).1))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| failed(e.to_string()))?.to_bytes();
    if !status.is_success() {
        let body = String::from_utf8_lossy(&body).trim().to_owned();
        return Err(FetchError::Status { url, status: status.as_u16(), body });
    }
    #[derive(serde::Deserialize)]
    struct List {
        transfers: Vec<Transfer>,
    }
    let list: List =
        serde_json::from_slice(&body).map_err(|e| FetchError::Decode { url: url.clone(), cause: e.to_string() })?;
    Ok(list.transfers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;
    use crate::recording::{BlobOutcome, Split, UploadPhases};

    fn transfer() -> Transfer {
        let phases = UploadPhases {
            start: 0.5,
            transfer: 8.0,
            commit: 0.5,
            gap: 1.0,
            total: 10.0,
            transfer_split: Split { client: 6.0, registry: 1.0, moving: 1.0, ..Split::default() },
            bytes: 37_124_367,
        };
        Transfer {
            id: 7,
            direction: TransferDirection::Push,
            outcome: Outcome::Complete,
            api: Api::V2,
            repository: "bigtest2".into(),
            tag: Some("latest".into()),
            client: "127.0.0.1".into(),
            started_unix_ms: 0,
            started_unix_ns: 0,
            trace_id: None,
            wall_seconds: 10.0,
            parties: Split { client: 8.2, registry: 1.1, moving: 0.7, ..Split::default() },
            lost: Default::default(),
            wasted_bytes: 0,
            bytes: 37_124_367,
            blobs: vec![Blob {
                digest: Some("sha256:0123456789abcdef".into()),
                kind: Some(BlobKind::Layer),
                bytes: 37_124_367,
                declared_size: None,
                layer: Some(1),
                outcome: BlobOutcome::Committed,
                start: 0.0,
                end: 10.0,
                phases: Some(phases),
                metadata_seconds: 0.0,
                split: phases.transfer_split,
                requests: vec![],
                attempts: Vec::new(),
            }],
            requests: vec![],
            requests_dropped: 0,
        }
    }

    /// The fixture's layer, first cut off by the registry at 5 MB after 1 s, retried 2 s later.
    fn retried() -> Transfer {
        let mut t = transfer();
        let attempt = |outcome, failed_by, bytes, start, end| crate::recording::Attempt {
            outcome,
            failed_by,
            cause: failed_by.map(|_| crate::protocol::FailureCause::ConnectionLost),
            status: Some(502),
            bytes,
            start,
            end,
            requests: vec![],
        };
        use crate::recording::AttemptOutcome::{Failed, Succeeded};
        t.blobs[0].attempts = vec![
            attempt(Failed, Some(Culprit::Registry), 5_000_000, 0.0, 1.0),
            attempt(Succeeded, None, 37_124_367, 3.0, 10.0),
        ];
        t.lost.registry = 3.0;
        t.parties.client -= 3.0;
        t
    }

    #[test]
    fn a_failed_attempt_and_the_wait_after_it_are_lost_to_whoever_failed() {
        let t = retried();
        let rows = rows(&t);
        let row =
            |name: &str| rows.iter().find(|r| r.operation.starts_with(name)).map(|r| (r.operation.clone(), r.seconds));
        assert_eq!(
            row("failed attempt"),
            Some(("failed attempt layer 1 0123456789ab (5.0 MB): registry (connection lost, 502)".into(), 1.0))
        );
        assert_eq!(row("retry wait"), Some(("retry wait layer 1 0123456789ab".into(), 2.0)));
        assert!(
            verdict(&t).starts_with(
                "3.0 s (30 %) lost to a registry failure at 5.0 MB and the client's retry; 52 % of this push"
            ),
            "{}",
            verdict(&t)
        );
        let table = render(&t);
        assert!(table.contains("lost to registry failures"), "{table}");
        assert!(!table.contains("idle (client working)"), "the wait is not the client's:\n{table}");
    }

    #[test]
    fn rows_follow_the_phases() {
        let rows = rows(&transfer());
        let ops: Vec<_> = rows.iter().map(|r| r.operation.as_str()).collect();
        assert_eq!(
            ops,
            [
                "start layer 1 0123456789ab",
                "transfer layer 1 0123456789ab (37.1 MB)",
                "commit layer 1 0123456789ab",
                "gap layer 1 0123456789ab"
            ]
        );
        assert_eq!(rows[1].seconds, 8.0);
    }

    #[test]
    fn verdict_names_the_shares() {
        assert_eq!(
            verdict(&transfer()),
            "82 % of this push was spent in the client (compressing, hashing, or idle between requests), 11 % in the registry, 7 % moving bytes"
        );
    }

    #[test]
    fn table_has_total_and_verdict() {
        let text = render(&transfer());
        assert!(text.contains("total (wall)"), "{text}");
        assert!(text.contains("80.0%"), "{text}");
        assert!(text.contains("verdict: 82 %"), "{text}");
    }

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(37_124_367), "37.1 MB");
        assert_eq!(bytes(1_078_000_000), "1.08 GB");
    }
}
