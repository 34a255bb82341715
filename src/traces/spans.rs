//! A finished transfer as OTLP spans: the push or pull, its blobs with their upload phases, and
//! its requests. Every time is the transfer's wall-clock start plus the offsets `report --json`
//! shows, so the trace and the report agree to the nanosecond.
//!
//! ```text
//! push team/app:1                   (root: outcome, bytes, seconds per party)
//! ├── layer 1 3f4e…                 (blob: digest, outcome, bytes)
//! │   ├── start / gap / transfer / gap / commit   (upload phases, as they happened)
//! │   └── POST upload_start, PATCH upload_chunk, PUT upload_finish   (requests)
//! └── PUT manifest_put              (requests of no blob)
//! ```
//! A request that came with a client's `traceparent` belongs to the client's trace instead,
//! under the client's span; the root links to it.

use std::collections::HashMap;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

use super::context::{SpanId, TraceId};
use crate::presentation::report::blob_name;
use crate::protocol::{Outcome, Party, Phase};
use crate::recording::{upload_pieces, Blob, RequestView, Transfer};

/// How many spans `transfer_spans` makes of a transfer, without making them.
pub(crate) fn span_count(t: &Transfer) -> usize {
    let by_id: HashMap<u64, &RequestView> = t.requests.iter().map(|r| (r.id, r)).collect();
    let phases: usize = t.blobs.iter().filter(|b| b.phases.is_some()).map(|b| phase_pieces(b, &by_id).len()).sum();
    1 + t.blobs.len() + phases + t.requests.len()
}

/// The spans of one finished transfer (which must have a trace id).
pub(crate) fn transfer_spans(t: &Transfer, registry: &str) -> Vec<Span> {
    let trace = t.trace_id.unwrap_or_else(TraceId::random);
    let at = |offset: f64| t.started_unix_ns + (offset.max(0.0) * 1e9).round() as u64;
    let by_id: HashMap<u64, &RequestView> = t.requests.iter().map(|r| (r.id, r)).collect();
    let root_id = SpanId::random();
    let mut spans = Vec::with_capacity(1 + t.blobs.len() + t.requests.len());

    let mut attributes = vec![
        int("regscope.transfer.id", t.id),
        text("regscope.direction", t.direction.as_str()),
        text("regscope.outcome", t.outcome.as_str()),
        text("regscope.api", t.api.as_str()),
        text("regscope.repository", &t.repository),
        text("client.address", &t.client),
        int("regscope.bytes", t.bytes),
        int("regscope.blobs", t.blobs.len() as u64),
        int("regscope.requests_dropped", t.requests_dropped),
    ];
    if let Some(tag) = &t.tag {
        attributes.push(text("regscope.tag", tag));
    }
    attributes.extend(seconds(|p| t.parties.get(p), true));
    let links = t
        .requests
        .iter()
        .filter_map(|r| {
            let trace = r.trace.as_ref()?;
            let client = trace.client?;
            Some(Link {
                trace_id: client.trace_id.0.to_vec(),
                span_id: trace.span_id.0.to_vec(),
                attributes: vec![int("regscope.request.id", r.id)],
                ..Link::default()
            })
        })
        .collect();
    let failed = t.outcome == Outcome::Failed;
    spans.push(Span {
        links,
        status: failed.then(|| error("the transfer failed")),
        ..span(trace, root_id, None, format!("{} {}", t.direction.as_str(), t.image()), SpanKind::Internal)
            .times(at(0.0), at(t.wall_seconds))
            .with(attributes)
    });

    let mut parent_of: HashMap<u64, SpanId> = HashMap::new();
    for (index, blob) in t.blobs.iter().enumerate() {
        let blob_id = SpanId::random();
        let mut attributes = vec![
            text("regscope.blob.outcome", blob.outcome.as_str()),
            int("regscope.bytes", blob.bytes),
            int("regscope.requests", blob.requests.len() as u64),
        ];
        if let Some(digest) = &blob.digest {
            attributes.push(text("regscope.blob.digest", digest));
        }
        if let Some(size) = blob.declared_size {
            attributes.push(int("regscope.blob.declared_size", size));
        }
        attributes.extend(seconds(|p| blob.split.get(p), false));
        spans.push(
            span(trace, blob_id, Some(root_id), blob_name(blob, index), SpanKind::Internal)
                .times(at(blob.start), at(blob.end))
                .with(attributes),
        );
        if blob.phases.is_some() {
            for (phase, from, to) in phase_pieces(blob, &by_id) {
                spans.push(
                    span(trace, SpanId::random(), Some(blob_id), phase.as_str().to_owned(), SpanKind::Internal)
                        .times(at(from), at(to))
                        .with(vec![text("regscope.phase", phase.as_str())]),
                );
            }
        }
        for id in &blob.requests {
            parent_of.entry(*id).or_insert(blob_id);
        }
    }

    for r in &t.requests {
        spans.push(request_span(r, trace, parent_of.get(&r.id).copied().unwrap_or(root_id), registry, &at, &t.client));
    }
    spans
}

/// One request, in its transfer's trace under `parent`, or in its client's trace.
fn request_span(
    r: &RequestView,
    transfer: TraceId,
    parent: SpanId,
    registry: &str,
    at: &impl Fn(f64) -> u64,
    client: &str,
) -> Span {
    let context = r.trace.as_ref();
    let id = context.map_or_else(SpanId::random, |c| c.span_id);
    let (trace, parent) = match context.and_then(|c| c.client) {
        Some(client) => (client.trace_id, client.span_id),
        None => (transfer, parent),
    };
    let mut attributes = vec![
        text("http.request.method", &r.method),
        text("regscope.operation", r.operation.as_str()),
        int("regscope.request.id", r.id),
        text("client.address", client),
        int("http.request.body.size", r.bytes_in()),
        int("http.response.body.size", r.bytes_out()),
    ];
    if let Some(context) = context {
        let (path, query) = context.path.split_once('?').map_or((context.path.as_str(), None), |(p, q)| (p, Some(q)));
        attributes.push(text("url.path", path));
        if let Some(query) = query {
            attributes.push(text("url.query", query));
        }
    }
    let server = context.and_then(|c| c.upstream.as_deref()).unwrap_or(registry);
    attributes.push(text("server.address", server));
    if let Some(status) = r.status {
        attributes.push(int("http.response.status_code", u64::from(status)));
    }
    if let Some(digest) = &r.digest {
        attributes.push(text("regscope.digest", digest));
    }
    if let Some(side) = r.aborted_by {
        attributes.push(text("regscope.aborted_by", side.as_str()));
    }
    attributes.extend(seconds(|p| r.split().get(p), false));
    let failed = r.aborted_by.is_some() || r.status.is_none_or(|s| s >= 500);
    Span {
        status: failed.then(|| error("no complete response")),
        ..span(trace, id, Some(parent), format!("{} {}", r.method, r.operation.as_str()), SpanKind::Server)
            .times(at(r.start), at(r.end))
            .with(attributes)
    }
}

/// A pushed blob's phases as they happened (see `recording::upload_pieces`).
fn phase_pieces(blob: &Blob, by_id: &HashMap<u64, &RequestView>) -> Vec<(Phase, f64, f64)> {
    let requests: Vec<&RequestView> = blob.requests.iter().filter_map(|id| by_id.get(id).copied()).collect();
    upload_pieces(&requests)
}

/// `regscope.seconds.<party>`: every party on the root, the non-zero ones elsewhere.
fn seconds(get: impl Fn(Party) -> f64, all: bool) -> impl Iterator<Item = KeyValue> {
    Party::ALL.into_iter().filter_map(move |party| {
        let value = get(party);
        (all || value > 0.0).then(|| KeyValue {
            key: format!("regscope.seconds.{}", party.as_str()),
            value: Some(AnyValue { value: Some(any_value::Value::DoubleValue(value)) }),
            ..KeyValue::default()
        })
    })
}

/// The request body of one export: the spans of these transfers under one resource.
pub(crate) fn resource_spans(resource: &[(String, String)], spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(Resource {
            attributes: resource.iter().map(|(k, v)| text(k, v)).collect(),
            ..Resource::default()
        }),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: "regscope".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ..InstrumentationScope::default()
            }),
            spans,
            ..ScopeSpans::default()
        }],
        ..ResourceSpans::default()
    }
}

fn span(trace: TraceId, id: SpanId, parent: Option<SpanId>, name: String, kind: SpanKind) -> Span {
    Span {
        trace_id: trace.0.to_vec(),
        span_id: id.0.to_vec(),
        parent_span_id: parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        name,
        kind: kind as i32,
        ..Span::default()
    }
}

trait SpanExt {
    fn times(self, start: u64, end: u64) -> Span;
    fn with(self, attributes: Vec<KeyValue>) -> Span;
}

impl SpanExt for Span {
    fn times(self, start: u64, end: u64) -> Span {
        Span { start_time_unix_nano: start, end_time_unix_nano: end.max(start), ..self }
    }

    fn with(self, attributes: Vec<KeyValue>) -> Span {
        Span { attributes, ..self }
    }
}

fn error(message: &str) -> Status {
    Status { code: StatusCode::Error as i32, message: message.to_owned() }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: u64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::IntValue(value.min(i64::MAX as u64) as i64)) }),
        ..KeyValue::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Api, BodyEnd, Operation, TransferDirection};
    use crate::recording::{BlobOutcome, BodyView, Split, UploadPhases};
    use crate::traces::{ClientContext, RequestTrace};

    fn req(id: u64, op: Operation, start: f64, end: f64, body: Option<(u64, f64)>) -> RequestView {
        RequestView {
            id,
            method: "X".into(),
            operation: op,
            status: Some(201),
            digest: None,
            reference: None,
            upload_id: None,
            start,
            forwarded: Some(start),
            response_head: Some(end),
            end,
            upload: body.map(|(bytes, body_end)| BodyView {
                bytes,
                start,
                end: body_end,
                client_wait: 0.0,
                registry_wait: 0.0,
                outcome: BodyEnd::Complete,
            }),
            download: None,
            aborted_by: None,
            upstream_error: None,
            trace: Some(RequestTrace { span_id: SpanId::random(), client: None, path: "/v2/x".into(), upstream: None }),
        }
    }

    fn push(requests: Vec<RequestView>, blob_requests: Vec<u64>) -> Transfer {
        let wall = requests.iter().map(|r| r.end).fold(0.0, f64::max);
        Transfer {
            id: 3,
            direction: TransferDirection::Push,
            outcome: Outcome::Complete,
            api: Api::V2,
            repository: "team/app".into(),
            tag: Some("1".into()),
            client: "10.0.0.7".into(),
            started_unix_ms: 1_700_000_000_000,
            started_unix_ns: 1_700_000_000_000_000_000,
            trace_id: Some(TraceId::random()),
            wall_seconds: wall,
            parties: Split::default(),
            lost: Default::default(),
            wasted_bytes: 0,
            bytes: requests.iter().map(RequestView::bytes_in).sum(),
            blobs: vec![Blob {
                digest: Some("sha256:abc".into()),
                kind: None,
                bytes: 1000,
                declared_size: None,
                layer: Some(1),
                outcome: BlobOutcome::Committed,
                start: 0.0,
                end: wall,
                phases: Some(UploadPhases::default()),
                metadata_seconds: 0.0,
                split: Split::default(),
                requests: blob_requests,
                attempts: Vec::new(),
            }],
            requests,
            requests_dropped: 0,
        }
    }

    /// (name, start, end) of the phase spans, in seconds from the transfer's start.
    fn phases(t: &Transfer, spans: &[Span]) -> Vec<(String, f64, f64)> {
        let secs = |ns: u64| ((ns - t.started_unix_ns) as f64 / 1e9 * 1e6).round() / 1e6;
        spans
            .iter()
            .filter(|s| s.attributes.iter().any(|kv| kv.key == "regscope.phase"))
            .map(|s| (s.name.clone(), secs(s.start_time_unix_nano), secs(s.end_time_unix_nano)))
            .collect()
    }

    #[test]
    fn phases_are_drawn_as_they_happened() {
        use Operation::*;
        type Case = (&'static str, Vec<RequestView>, Vec<(&'static str, f64, f64)>);
        let cases: Vec<Case> = vec![
            (
                "docker: POST, PATCH, PUT",
                vec![
                    req(1, UploadStart, 0.0, 0.1, None),
                    req(2, UploadChunk, 0.5, 10.5, Some((1000, 10.3))),
                    req(3, UploadFinish, 11.0, 11.4, None),
                ],
                vec![
                    ("start", 0.0, 0.1),
                    ("gap", 0.1, 0.5),
                    ("transfer", 0.5, 10.5),
                    ("gap", 10.5, 11.0),
                    ("commit", 11.0, 11.4),
                ],
            ),
            (
                "containerd: the commit carries the blob",
                vec![req(1, UploadStart, 0.0, 0.1, None), req(2, UploadFinish, 0.2, 5.2, Some((500, 4.2)))],
                vec![("start", 0.0, 0.1), ("gap", 0.1, 0.2), ("transfer", 0.2, 4.2), ("commit", 4.2, 5.2)],
            ),
            (
                "a status check covers its time but is no phase",
                vec![
                    req(1, UploadStart, 0.0, 0.1, None),
                    req(2, UploadStatus, 0.1, 0.3, None),
                    req(3, UploadChunk, 0.3, 1.0, Some((10, 1.0))),
                    req(4, UploadFinish, 1.0, 1.2, None),
                ],
                vec![("start", 0.0, 0.1), ("transfer", 0.3, 1.0), ("commit", 1.0, 1.2)],
            ),
        ];
        for (name, requests, want) in cases {
            let ids = requests.iter().map(|r| r.id).collect();
            let t = push(requests, ids);
            let spans = transfer_spans(&t, "registry:5000");
            assert_eq!(spans.len(), span_count(&t), "{name}: span_count agrees");
            let got = phases(&t, &spans);
            let want: Vec<(String, f64, f64)> = want.into_iter().map(|(n, a, b)| (n.to_owned(), a, b)).collect();
            assert_eq!(got, want, "{name}");
            // The root spans the wall time; requests hang under the blob, with their own ids.
            let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
            assert_eq!(root.name, "push team/app:1");
            assert_eq!(root.end_time_unix_nano - root.start_time_unix_nano, (t.wall_seconds * 1e9).round() as u64);
            let blob = spans.iter().find(|s| s.name == "layer 1 abc").unwrap();
            for r in &t.requests {
                let span = spans.iter().find(|s| s.span_id == r.trace.as_ref().unwrap().span_id.0).unwrap();
                assert_eq!(span.parent_span_id, blob.span_id, "{name}");
                assert_eq!(span.trace_id, t.trace_id.unwrap().0);
            }
        }
    }

    #[test]
    fn a_request_with_a_client_context_joins_the_clients_trace() {
        let mut manifest = req(9, Operation::ManifestPut, 0.2, 0.3, Some((400, 0.25)));
        let client = ClientContext { trace_id: TraceId::random(), span_id: SpanId::random(), flags: 1 };
        manifest.trace.as_mut().unwrap().client = Some(client);
        manifest.trace.as_mut().unwrap().path = "/v2/team/app/manifests/1?_state=REDACTED".into();
        let t = push(vec![req(1, Operation::UploadStart, 0.0, 0.1, None), manifest], vec![1]);
        let spans = transfer_spans(&t, "registry:5000");
        let span = spans.iter().find(|s| s.name == "X manifest_put").unwrap();
        assert_eq!(
            (span.trace_id.as_slice(), span.parent_span_id.as_slice()),
            (&client.trace_id.0[..], &client.span_id.0[..])
        );
        let root = spans.iter().find(|s| s.parent_span_id.is_empty()).unwrap();
        assert_eq!(root.links.len(), 1);
        assert_eq!(
            (root.links[0].trace_id.as_slice(), root.links[0].span_id.as_slice()),
            (&client.trace_id.0[..], span.span_id.as_slice())
        );
        let text = |key: &str| span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone());
        let path = Some(AnyValue { value: Some(any_value::Value::StringValue("/v2/team/app/manifests/1".into())) });
        assert_eq!(text("url.path"), path);
        assert!(text("server.address").is_some() && text("url.query").is_some());
    }
}
