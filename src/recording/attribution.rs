//! The rule that attributes every instant of a transfer's wall time to exactly one party.
//!
//! # The attribution rule
//! Each request is cut into segments whose state is known: waiting on the registry (connect,
//! processing between request and response head), bytes moving (proxy turnaround), or a
//! body, which is a mix: of its active life we know how long it waited on the client, on the
//! registry, and how long bytes moved, but not in what order, so the mix is spread evenly
//! over the body's life. At any instant, over the segments active then:
//! - bytes are **moving** if any stream moves;
//! - otherwise the **registry** holds things up if any request waits on it;
//! - otherwise it is the **client**, and so is every instant when no request of the transfer
//!   is on the wire at all (the daemon working: compressing, hashing, deciding).
//!
//! With mixes, "any stream moves" is taken with the mixes as independent probabilities:
//! P(moving) = 1 − Π(1 − mᵢ), P(client) = Π cᵢ, P(registry) = the rest. The three shares of
//! each instant add to one, so the shares of a transfer add to exactly 100 %.

use super::attempts::{Lost, LostSpan};
use super::split::Split;
use super::timeline::{RequestView, Segment};
use crate::protocol::Culprit;

/// Attributes every instant of `[0, wall]` to the client, the registry or bytes moving, by the
/// rule in the module docs. The result's total equals `wall`.
#[cfg(test)]
pub(super) fn attribute(requests: &[RequestView], wall: f64) -> Split {
    attribute_with(requests.iter(), wall, &[]).0
}

/// The same, where `requests` leaves out those of failed attempts and `lost` holds the stretches
/// their failures cost: an instant that would be the client's goes instead to whoever failed, when
/// a lost stretch covers it (the registry first, then storage, regscope, the client). The two
/// results' totals add up to `wall`.
pub(super) fn attribute_with<'a>(
    requests: impl Iterator<Item = &'a RequestView>,
    wall: f64,
    lost: &[LostSpan],
) -> (Split, Lost) {
    let segments = clipped_segments(requests, wall);
    // A sweep over start and end events, O(n log n): the products over the active segments are
    // kept as sums of logarithms plus a count of zero factors, updated as segments come and go.
    let mut events: Vec<(f64, bool, usize)> =
        segments.iter().enumerate().flat_map(|(i, s)| [(s.from, true, i), (s.to, false, i)]).collect();
    // Lost stretches come after the segments in the index space.
    let clip = |t: f64| t.clamp(0.0, wall);
    let lost_events = lost.iter().enumerate().filter(|(_, l)| clip(l.to) > clip(l.from));
    let n = segments.len();
    events.extend(lost_events.flat_map(|(i, l)| [(clip(l.from), true, n + i), (clip(l.to), false, n + i)]));
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut losing = [0usize; Culprit::ALL.len()];
    let mut lost_shares = Lost::default();
    let mut none_moving = LogProduct::default();
    let mut all_client = LogProduct::default();
    // How much of the active segments waits on each upstream party: what the waiting is split by.
    let mut waiting = Split::default();
    let mut active = 0usize;
    let mut shares = Split::default();
    let mut at = 0.0;
    for (time, starts, i) in events {
        let len = time - at;
        if len > 0.0 {
            let client_before = shares.client;
            add_interval(&mut shares, len, active, none_moving.value(), all_client.value(), &waiting);
            if let Some(culprit) = BLAME_ORDER.into_iter().find(|&c| losing[c as usize] > 0) {
                *lost_shares.get_mut(culprit) += shares.client - client_before;
                shares.client = client_before;
            }
            at = time;
        }
        if i >= n {
            let culprit = lost[i - n].culprit as usize;
            if starts {
                losing[culprit] += 1;
            } else {
                losing[culprit] -= 1;
            }
            continue;
        }
        let mix = segments[i].mix;
        if starts {
            active += 1;
            none_moving.push(1.0 - mix.moving);
            all_client.push(mix.client);
            waiting.registry += mix.registry;
            waiting.storage += mix.storage;
            waiting.auth += mix.auth;
        } else {
            active -= 1;
            none_moving.pop(1.0 - mix.moving);
            all_client.pop(mix.client);
            waiting.registry -= mix.registry;
            waiting.storage -= mix.storage;
            waiting.auth -= mix.auth;
        }
    }
    if wall > at {
        shares.client += wall - at;
    }
    (shares, lost_shares)
}

/// Whose failure an instant is lost to when several lost stretches cover it.
const BLAME_ORDER: [Culprit; 4] = [Culprit::Registry, Culprit::Storage, Culprit::Regscope, Culprit::Client];

fn clipped_segments<'a>(requests: impl Iterator<Item = &'a RequestView>, wall: f64) -> Vec<Segment> {
    requests
        .flat_map(|r| r.segments())
        .map(|s| Segment { from: s.from.max(0.0), to: s.to.min(wall), mix: s.mix })
        .filter(|s| s.to > s.from)
        .collect()
}

/// Splits one interval of constant state by the rule in the module docs.
/// The waiting upstream is shared by the parties waited on, in proportion to how much of the
/// active segments waits on each: with the registry alone it is all the registry's.
fn add_interval(shares: &mut Split, len: f64, active: usize, none_moving: f64, all_client: f64, waiting: &Split) {
    if active == 0 {
        shares.client += len;
        return;
    }
    shares.moving += (1.0 - none_moving) * len;
    shares.client += all_client * len;
    let upstream = (none_moving - all_client).max(0.0) * len;
    let (storage, auth) = (waiting.storage.max(0.0), waiting.auth.max(0.0));
    let weight = waiting.registry.max(0.0) + storage + auth;
    let part = |w: f64| if weight > 0.0 { upstream * w / weight } else { 0.0 };
    let (to_storage, to_auth) = (part(storage), part(auth));
    shares.storage += to_storage;
    shares.auth += to_auth;
    shares.registry += upstream - to_storage - to_auth;
}

/// A product of factors in [0, 1] that factors can leave again: logarithms of the non-zero
/// factors are summed, zero factors are counted.
#[derive(Debug, Default)]
struct LogProduct {
    log_sum: f64,
    zeros: usize,
}

impl LogProduct {
    /// Factors this small are zeros: their logarithm would swamp the sum.
    const ZERO: f64 = 1e-12;

    fn push(&mut self, factor: f64) {
        if factor <= Self::ZERO {
            self.zeros += 1;
        } else {
            self.log_sum += factor.ln();
        }
    }

    fn pop(&mut self, factor: f64) {
        if factor <= Self::ZERO {
            self.zeros -= 1;
        } else {
            self.log_sum -= factor.ln();
        }
    }

    fn value(&self) -> f64 {
        if self.zeros > 0 {
            0.0
        } else {
            self.log_sum.exp().min(1.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BodyEnd, Operation};
    use crate::recording::BodyView;

    fn request(start: f64, forwarded: f64, head: f64, end: f64) -> RequestView {
        RequestView {
            id: 1,
            method: "GET".into(),
            operation: Operation::BlobGet,
            status: Some(200),
            digest: None,
            reference: None,
            upload_id: None,
            start,
            forwarded: Some(forwarded),
            response_head: Some(head),
            end,
            upload: None,
            download: None,
            aborted_by: None,
            upstream_error: None,
            trace: None,
        }
    }

    fn body(start: f64, end: f64, client_wait: f64, registry_wait: f64) -> BodyView {
        BodyView { bytes: 1, start, end, client_wait, registry_wait, outcome: BodyEnd::Complete }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn gaps_are_the_client_and_waiting_for_a_head_is_the_registry() {
        // Two requests with a 3 s gap between them; each waits 1 s on the registry.
        let requests = [request(0.0, 0.0, 1.0, 1.0), request(4.0, 4.0, 5.0, 5.0)];
        let s = attribute(&requests, 5.0);
        assert!(close(s.client, 3.0) && close(s.registry, 2.0) && close(s.moving, 0.0), "{s:?}");
    }

    #[test]
    fn a_body_spreads_its_mix_over_its_life() {
        let mut r = request(0.0, 0.0, 0.0, 10.0);
        r.download = Some(body(0.0, 10.0, 2.0, 5.0)); // download: client = sink, registry = source
        let s = attribute(&[r.clone()], 10.0);
        assert!(close(s.client, 2.0) && close(s.registry, 5.0) && close(s.moving, 3.0), "{s:?}");
        assert!(close(r.split().total(), 10.0));
    }

    #[test]
    fn overlap_moving_wins_then_registry_then_client() {
        // Two fully overlapping uploads, each half client-wait, half moving.
        let mut a = request(0.0, 0.0, 4.0, 4.0);
        a.upload = Some(body(0.0, 4.0, 2.0, 0.0));
        let b = a.clone();
        let s = attribute(&[a, b], 4.0);
        // P(client) = 0.25, P(moving) = 0.75.
        assert!(close(s.client, 1.0) && close(s.moving, 3.0) && close(s.registry, 0.0), "{s:?}");

        // A request waiting on the registry overlapping a client-stalled upload: registry.
        let mut up = request(0.0, 0.0, 4.0, 4.0);
        up.upload = Some(body(0.0, 4.0, 4.0, 0.0));
        let waiting = request(0.0, 0.0, 4.0, 4.0);
        let s = attribute(&[up, waiting], 4.0);
        assert!(close(s.registry, 4.0), "{s:?}");
    }

    #[test]
    fn shares_always_add_up_to_the_wall() {
        let mut rs = Vec::new();
        for i in 0..20 {
            let t = i as f64 * 0.7;
            let mut r = request(t, t + 0.01, t + 1.3, t + 2.9);
            r.upload = Some(body(t + 0.02, t + 1.2, 0.3, 0.2));
            r.download = Some(body(t + 1.4, t + 2.8, 0.5, 0.4));
            rs.push(r);
        }
        let wall = 20.0;
        let s = attribute(&rs, wall);
        assert!(close(s.total(), wall), "{s:?}");
        assert!(s.client >= 0.0 && s.registry >= 0.0 && s.moving >= 0.0);
    }

    /// The rule applied literally: every elementary interval, every segment.
    fn attribute_naive(requests: &[RequestView], wall: f64) -> Split {
        let segments = clipped_segments(requests.iter(), wall);
        let mut cuts: Vec<f64> = segments.iter().flat_map(|s| [s.from, s.to]).chain([0.0, wall]).collect();
        cuts.sort_by(f64::total_cmp);
        cuts.dedup();
        let mut shares = Split::default();
        for window in cuts.windows(2) {
            let (a, b) = (window[0], window[1]);
            let active: Vec<&Segment> = segments.iter().filter(|s| s.from <= a && s.to >= b).collect();
            let none_moving: f64 = active.iter().map(|s| 1.0 - s.mix.moving).product();
            let all_client: f64 = active.iter().map(|s| s.mix.client).product();
            let mut waiting = Split::default();
            for s in &active {
                waiting.registry += s.mix.registry;
                waiting.storage += s.mix.storage;
                waiting.auth += s.mix.auth;
            }
            add_interval(&mut shares, b - a, active.len(), none_moving, all_client, &waiting);
        }
        shares
    }

    #[test]
    fn the_sweep_agrees_with_the_literal_rule() {
        // A deterministic pseudo-random mix of overlapping requests, bodies and gaps.
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 10_000) as f64 / 1000.0
        };
        for _ in 0..50 {
            let mut rs = Vec::new();
            for _ in 0..12 {
                let t = next();
                let d = next() / 2.0;
                let mut r = request(t, t + d * 0.05, t + d * 0.6, t + d);
                if next() > 5.0 {
                    r.upload = Some(body(t + d * 0.1, t + d * 0.5, d * 0.4 * next() / 10.0, 0.0));
                }
                if next() > 5.0 {
                    r.download = Some(body(t + d * 0.65, t + d * 0.95, 0.0, d * 0.3 * next() / 10.0));
                }
                rs.push(r);
            }
            let wall = rs.iter().map(|r| r.end).fold(0.0, f64::max);
            let (fast, slow) = (attribute(&rs, wall), attribute_naive(&rs, wall));
            for (a, b) in [(fast.client, slow.client), (fast.registry, slow.registry), (fast.moving, slow.moving)] {
                assert!((a - b).abs() < 1e-6, "{fast:?} vs {slow:?}");
            }
        }
    }

    #[test]
    fn many_requests_attribute_quickly() {
        let rs: Vec<RequestView> =
            (0..20_000).map(|i| request(i as f64, i as f64, i as f64 + 0.5, i as f64 + 0.7)).collect();
        let s = attribute(&rs, 20_000.0);
        assert!(close(s.total(), 20_000.0) && (s.registry - 10_000.0).abs() < 1e-3, "{s:?}");
    }

    #[test]
    fn registry_processing_starts_when_the_body_is_sent() {
        let mut r = request(0.0, 0.1, 5.0, 5.0);
        r.upload = Some(body(0.1, 3.0, 1.0, 0.0));
        assert!(close(r.registry_processing(), 2.0));
    }

    #[test]
    fn waiting_on_storage_is_the_storage_and_shared_with_the_registry_by_weight() {
        let mut storage = request(0.0, 0.0, 2.0, 2.0);
        storage.operation = Operation::StorageGet;
        let s = attribute(&[storage.clone()], 2.0);
        assert!(close(s.storage, 2.0) && close(s.registry, 0.0), "{s:?}");
        let registry = request(1.0, 1.0, 2.0, 2.0);
        let s = attribute(&[storage, registry], 2.0);
        assert!(close(s.storage, 1.5) && close(s.registry, 0.5), "the shared second goes half and half: {s:?}");
        assert!(close(s.total(), 2.0), "{s:?}");
    }
}
