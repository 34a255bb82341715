//! A transfer's timeline: its requests as offsets from the transfer's start, each cut into
//! segments whose state is known (see `attribution` for the rule that owns each instant).

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::split::Split;
use crate::body::BodyOutcome;
use crate::body::ExchangeRecord;
use crate::protocol::Operation;
use crate::protocol::{BodyEnd, Party, Side, UpstreamErrorKind};
use crate::traces::RequestTrace;

/// One body as seen in a transfer, offsets in seconds from the transfer's start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BodyView {
    pub bytes: u64,
    /// First poll (the sink asked for data); for an empty body never polled, its end.
    pub start: f64,
    pub end: f64,
    pub client_wait: f64,
    pub registry_wait: f64,
    pub outcome: BodyEnd,
}

impl BodyView {
    fn new(body: &BodyOutcome, base: Instant) -> BodyView {
        let at = |t: Instant| t.saturating_duration_since(base).as_secs_f64();
        BodyView {
            bytes: body.bytes,
            start: at(body.first_poll.unwrap_or(body.ended)),
            end: at(body.ended),
            client_wait: body.wait_on(Side::Client).as_secs_f64(),
            registry_wait: body.wait_on(Side::Registry).as_secs_f64(),
            outcome: body.end,
        }
    }

    pub fn active(&self) -> f64 {
        (self.end - self.start).max(0.0)
    }

    /// The body's life split by what it waited on. Waits are clamped to the active time.
    pub fn split(&self) -> Split {
        let active = self.active();
        let client = self.client_wait.min(active);
        let registry = self.registry_wait.min(active - client);
        Split { client, registry, moving: active - client - registry, ..Split::default() }
    }
}

/// One request of a transfer, offsets in seconds from the transfer's start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    pub id: u64,
    pub method: String,
    pub operation: Operation,
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Request head received.
    pub start: f64,
    /// Request handed upstream.
    pub forwarded: Option<f64>,
    /// Upstream response head.
    pub response_head: Option<f64>,
    /// Everything over.
    pub end: f64,
    pub upload: Option<BodyView>,
    pub download: Option<BodyView>,
    pub aborted_by: Option<Side>,
    /// Why the exchange with the registry (or storage) failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_error: Option<UpstreamErrorKind>,
    /// Its span, when traces are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<RequestTrace>,
}

impl RequestView {
    pub(crate) fn new(r: &ExchangeRecord, base: Instant) -> RequestView {
        let at = |t: Instant| t.saturating_duration_since(base).as_secs_f64();
        let upload_id = r.upload_id.as_deref().or(r.response_info.upload_uuid.as_deref());
        RequestView {
            id: r.id,
            method: r.method.to_string(),
            operation: r.operation,
            status: r.status,
            digest: r.digest.as_deref().or(r.response_info.content_digest.as_deref()).map(str::to_owned),
            reference: r.reference.as_deref().map(str::to_owned),
            upload_id: upload_id.map(str::to_owned),
            start: at(r.received),
            forwarded: r.forwarded.map(at),
            response_head: r.response_head.map(at),
            end: at(r.ended),
            upload: r.upload.as_ref().filter(|b| b.bytes > 0 || b.first_poll.is_some()).map(|b| BodyView::new(b, base)),
            download: r.download.as_ref().filter(|b| b.bytes > 0).map(|b| BodyView::new(b, base)),
            aborted_by: r.aborted_by(),
            upstream_error: r.upstream_error,
            trace: r.trace.as_deref().cloned(),
        }
    }

    pub fn duration(&self) -> f64 {
        (self.end - self.start).max(0.0)
    }

    pub fn bytes_in(&self) -> u64 {
        self.upload.as_ref().map_or(0, |b| b.bytes)
    }

    pub fn bytes_out(&self) -> u64 {
        self.download.as_ref().map_or(0, |b| b.bytes)
    }

    pub fn succeeded(&self) -> bool {
        self.aborted_by.is_none() && self.status.is_some_and(|s| (200..400).contains(&s))
    }

    /// Time between the request being fully sent upstream and the response head.
    pub fn registry_processing(&self) -> f64 {
        let Some(head) = self.response_head else { return 0.0 };
        let sent = match (&self.upload, self.forwarded) {
            (Some(u), _) if u.end <= head => u.end,
            (_, Some(f)) => f,
            _ => self.start,
        };
        (head - sent).max(0.0)
    }

    /// This request's time split by party (its own view, ignoring overlap with others).
    pub fn split(&self) -> Split {
        let mut split = Split::default();
        for segment in self.segments() {
            let len = segment.to - segment.from;
            for party in Party::ALL {
                *split.get_mut(party) += segment.mix.get(party) * len;
            }
        }
        split
    }

    /// The request cut into segments of known state (see the module docs).
    pub(crate) fn segments(&self) -> Vec<Segment> {
        let mut out = Vec::with_capacity(6);
        let mut push = |from: f64, to: f64, mix: Split| {
            if to > from {
                out.push(Segment { from, to, mix });
            }
        };
        let upstream = self.operation.upstream();
        let registry = Split::only(upstream, 1.0);
        let moving = Split::only(Party::Moving, 1.0);
        let fractions = |body: &BodyView| fractions(body, upstream);
        let forwarded = self.forwarded.unwrap_or(self.start);
        let head = self.response_head.unwrap_or(self.end);
        push(self.start, forwarded, moving);
        match &self.upload {
            Some(up) => {
                push(forwarded, up.start.min(head), registry);
                push(up.start, up.end, fractions(up));
                push(up.end, head, registry);
            }
            None => push(forwarded, head, registry),
        }
        match &self.download {
            Some(down) => {
                push(head, down.start, moving);
                push(down.start, down.end, fractions(down));
                push(down.end, self.end, moving);
            }
            None => push(head, self.end, moving),
        }
        out
    }
}

/// A body's mix of states over its active life; what it waited on upstream is `upstream`'s.
fn fractions(body: &BodyView, upstream: Party) -> Split {
    let active = body.active();
    if active <= 0.0 {
        return Split::only(Party::Moving, 1.0);
    }
    let s = body.split();
    let mut mix = Split::only(upstream, s.registry / active);
    mix.client = s.client / active;
    mix.moving = s.moving / active;
    mix
}

/// A stretch of one request with a known mix of states (fractions adding to one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Segment {
    pub from: f64,
    pub to: f64,
    pub mix: Split,
}
