//! W3C trace context: trace and span ids, and the `traceparent` header that carries them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 16-byte trace id; never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

/// What a client's `traceparent` said: its trace, the span the request was sent from, its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
}

/// One request's place in a trace, decided when its head arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestTrace {
    /// The request's own span: the `traceparent` the registry receives names it.
    pub span_id: SpanId,
    /// The client's context, when it sent one: the request's span joins the client's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientContext>,
    /// The request path and query, secrets redacted.
    pub path: String,
    /// The host it went to, when not the registry (object storage, a token service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

/// Ids are a bijective mix of a process-wide counter and a random key: unique within the
/// process, unpredictable across processes, and one atomic add each (no lock, no syscall).
fn next_u64() -> u64 {
    static KEY: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let key = *KEY.get_or_init(|| {
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .expect("the system random source is available");
        u64::from_le_bytes(seed)
    });
    mix(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_add(key))
}

/// splitmix64's finaliser: a bijection on u64, so distinct inputs give distinct ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl TraceId {
    pub fn random() -> TraceId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&next_u64().to_be_bytes());
        id[8..].copy_from_slice(&next_u64().to_be_bytes());
        TraceId(id)
    }
}

impl SpanId {
    pub fn random() -> SpanId {
        loop {
            let id = next_u64();
            if id != 0 {
                return SpanId(id.to_be_bytes());
            }
        }
    }
}

/// Parses a `traceparent` header (version 00, or a later version read as 00 per the spec).
/// Anything malformed, or an all-zero id, is no context at all.
pub fn parse_traceparent(value: &[u8]) -> Option<ClientContext> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let version = u8::from_str_radix(hex_exact(version, 2)?, 16).ok()?;
    // Version 00 has exactly four fields; later versions may append more. ff is invalid.
    if version == 0xff || (version == 0 && parts.next().is_some()) {
        return None;
    }
    let trace_id = TraceId(decode_hex(hex_exact(trace, 32)?)?);
    let span_id = SpanId(decode_hex(hex_exact(span, 16)?)?);
    let flags = u8::from_str_radix(hex_exact(flags, 2)?, 16).ok()?;
    if trace_id.0 == [0; 16] || span_id.0 == [0; 8] {
        return None;
    }
    Some(ClientContext { trace_id, span_id, flags })
}

/// The `traceparent` value naming `span` in `trace`, on the stack: it is written per request.
pub fn traceparent(trace: TraceId, span: SpanId, flags: u8) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut out[3..35], &trace.0);
    hex_into(&mut out[36..52], &span.0);
    hex_into(&mut out[53..55], &[flags]);
    out
}

/// Lower-case hex of `bytes` into `out` (twice as long), without the formatting machinery.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

fn hex_exact(text: &str, len: usize) -> Option<&str> {
    // Lower case only: the spec forbids upper-case hex in traceparent.
    (text.len() == len && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(text)
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    if text.len() != 2 * N {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let mut buffer = [0u8; 32];
    let out = &mut buffer[..2 * bytes.len()];
    hex_into(out, bytes);
    f.write_str(std::str::from_utf8(out).map_err(|_| fmt::Error)?)
}

macro_rules! hex_id {
    ($name:ident, $len:literal) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = &'static str;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bytes = decode_hex::<$len>(hex_exact(s, 2 * $len).ok_or("not lower-case hex of the right length")?)
                    .ok_or("not hex")?;
                Ok($name(bytes))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(TraceId, 16);
hex_id!(SpanId, 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_values() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = parse_traceparent(good.as_bytes()).expect("valid");
        assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(ctx.flags, 1);
        assert_eq!(&traceparent(ctx.trace_id, ctx.span_id, ctx.flags)[..], good.as_bytes());
        // A later version may carry more fields; it is read as version 00.
        assert!(parse_traceparent(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some());
        let bad: &[&str] = &[
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e47é6-00f067aa0ba902b7-01",
        ];
        for value in bad {
            assert_eq!(parse_traceparent(value.as_bytes()), None, "{value:?}");
        }
    }

    #[test]
    fn ids_are_distinct_and_round_trip() {
        let spans: std::collections::HashSet<[u8; 8]> = (0..10_000).map(|_| SpanId::random().0).collect();
        assert_eq!(spans.len(), 10_000);
        let trace = TraceId::random();
        assert_ne!(trace.0, [0; 16]);
        assert_eq!(trace.to_string().parse::<TraceId>().unwrap(), trace);
        let json = serde_json::to_string(&trace).unwrap();
        assert_eq!(serde_json::from_str::<TraceId>(&json).unwrap(), trace);
    }
}
