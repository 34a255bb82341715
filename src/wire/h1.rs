//! The HTTP/1.1 a pair speaks (see [`crate::wire::paired`]): a bodiless request head written
//! out, a response head read in, and the response body's framing and chunked coding
//! (RFC 9112 §6 and §7.1). Pure functions over bytes.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};

/// The most header lines a response head may have (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// The longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

/// Why a response cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum H1Error {
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("response head larger than the read buffer")]
    HeadTooLarge,
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("unexpected 101 Switching Protocols")]
    Upgrade,
    #[error("malformed chunked body")]
    Chunk,
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// None: a `HEAD`'s answer, 204, 304.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked coding: the zero-size chunk ends it.
    Chunked,
    /// The connection's end.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The reason phrase, when it is not the status's usual one (hyper's server writes it).
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub framing: Framing,
    /// Whether the connection may carry another exchange after this one.
    pub keep_alive: bool,
}

/// Writes a bodiless request's head: origin-form target, its headers as they are.
pub(crate) fn encode_request(parts: &http::request::Parts, out: &mut Vec<u8>) {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A header's name. `http` knows the standard ones; the registry's own, on nearly every answer,
/// are matched here too, so that no answer's names are copied to the heap.
fn header_name(raw: &[u8]) -> Option<HeaderName> {
    registry_name(raw).or_else(|| HeaderName::from_bytes(raw).ok())
}

/// One of the registry's own names, in any case. Told apart by length first: a loop over the
/// names costs a third of what matching them saves.
fn registry_name(raw: &[u8]) -> Option<HeaderName> {
    use crate::wire::headers::{API_VERSION, CONTENT_DIGEST, UPLOAD_UUID};
    let known = match raw.len() {
        21 => CONTENT_DIGEST,
        31 => API_VERSION,
        18 => UPLOAD_UUID,
        _ => return None,
    };
    raw.eq_ignore_ascii_case(known.as_str().as_bytes()).then_some(known)
}

/// Parses a response head at the start of `buf`: `None` while it is incomplete, else its length
/// and the head. `head_request`: the request was a `HEAD` (its answer has no body). The head's
/// headers go into `headers` (empty; the request's map, cleared, so its room is used again),
/// which is taken for the head once it is whole.
pub(crate) fn parse_response(
    buf: &[u8],
    head_request: bool,
    headers: &mut HeaderMap,
) -> Result<Option<(usize, ResponseHead)>, H1Error> {
    // Left uninitialised: httparse writes only the entries it fills, not all 3 KiB of slots on
    // every response.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut slots);
    let len = match parsed.map_err(H1Error::Head)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status =
        StatusCode::from_u16(response.code.unwrap_or(0)).map_err(|_| H1Error::Head(httparse::Error::Status))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // One copy of the head; every value is a slice of it.
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    headers.clear();
    headers.reserve(response.headers.len());
    for h in response.headers.iter() {
        let name = header_name(h.name.as_bytes()).ok_or(H1Error::Head(httparse::Error::HeaderName))?;
        let start = h.value.as_ptr() as usize - buf.as_ptr() as usize;
        let value = HeaderValue::from_maybe_shared(bytes.slice(start..start + h.value.len()))
            .map_err(|_| H1Error::Head(httparse::Error::HeaderValue))?;
        headers.append(name, value);
    }
    let map = std::mem::take(headers);
    let reason = response
        .reason
        .filter(|reason| Some(*reason) != status.canonical_reason())
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
    let framing = framing(status, head_request, &map)?;
    let keep_alive = version == Version::HTTP_11 && !asks_to_close(&map) && framing != Framing::Close;
    Ok(Some((len, ResponseHead { status, version, headers: map, reason, framing, keep_alive })))
}

/// RFC 9112 §6.3, for a response.
fn framing(status: StatusCode, head_request: bool, headers: &HeaderMap) -> Result<Framing, H1Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(H1Error::Upgrade);
    }
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers.get_all(header::TRANSFER_ENCODING).iter().next_back();
        let chunked = last.is_some_and(ends_chunked);
        return Ok(if chunked { Framing::Chunked } else { Framing::Close });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.to_str().map_err(|_| H1Error::ContentLength)?.split(',') {
            let item = item.trim();
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(H1Error::ContentLength);
            }
            let n: u64 = item.parse().map_err(|_| H1Error::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// Whether `Connection` says `close`.
fn asks_to_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| lists(v, "close"))
}

/// Whether a comma-separated header value (`Connection`, `Transfer-Encoding`) lists `token`.
pub(crate) fn lists(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`.
pub(crate) fn ends_chunked(value: &HeaderValue) -> bool {
    value.to_str().ok().and_then(|v| v.rsplit(',').next()).is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

/// One step of decoding: bytes of `buf` consumed, and where the body data among them is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub consumed: usize,
    /// `start..end` of `buf`: body data, the last bytes consumed (`end == consumed`).
    pub data: Option<(usize, usize)>,
}

impl Chunked {
    /// Decodes what it can of `buf`, stopping after a piece of data so it can be handed on.
    /// Consumes nothing while a line is incomplete.
    pub(crate) fn step(&mut self, buf: &[u8]) -> Result<Step, H1Error> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match *self {
                Chunked::Done => return Ok(Step { consumed: at, data: None }),
                Chunked::Size => match httparse::parse_chunk_size(rest).map_err(|_| H1Error::Chunk)? {
                    httparse::Status::Complete((len, 0)) => {
                        at += len;
                        *self = Chunked::Trailer;
                    }
                    httparse::Status::Complete((len, size)) => {
                        at += len;
                        *self = Chunked::Data(size);
                    }
                    httparse::Status::Partial if rest.len() > MAX_LINE => return Err(H1Error::Chunk),
                    httparse::Status::Partial => return Ok(Step { consumed: at, data: None }),
                },
                Chunked::Data(left) => {
                    if rest.is_empty() {
                        return Ok(Step { consumed: at, data: None });
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    *self = if left == 0 { Chunked::DataEnd } else { Chunked::Data(left) };
                    return Ok(Step { consumed: at + take, data: Some((at, at + take)) });
                }
                Chunked::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        at += 2;
                        *self = Chunked::Size;
                    }
                    [b'\r'] | [] => return Ok(Step { consumed: at, data: None }),
                    _ => return Err(H1Error::Chunk),
                },
                Chunked::Trailer => match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        at += 2;
                        *self = Chunked::Done;
                    }
                    Some(line) => at += line + 2,
                    None if rest.len() > MAX_LINE => return Err(H1Error::Chunk),
                    None => return Ok(Step { consumed: at, data: None }),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str, head_request: bool) -> Result<Option<(usize, ResponseHead)>, H1Error> {
        parse_response(head.as_bytes(), head_request, &mut HeaderMap::new())
    }

    #[test]
    fn request_heads_are_written_in_origin_form() {
        let req = http::Request::get("http://r.example/v2/a/manifests/latest?x=1")
            .header("host", "r.example")
            .header("accept", "a")
            .header("accept", "b")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Vec::new();
        encode_request(&parts, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /v2/a/manifests/latest?x=1 HTTP/1.1\r\nhost: r.example\r\naccept: a\r\naccept: b\r\n\r\n"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        // (head, HEAD request) -> framing, keep-alive
        let cases: &[(&str, bool, Framing, bool)] = &[
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false, Length(5), true),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false, Length(5), true),
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true, Empty, true),
            ("HTTP/1.1 204 No Content\r\n\r\n", false, Empty, true),
            ("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n", false, Empty, true),
            ("HTTP/1.1 100 Continue\r\n\r\n", false, Empty, true),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", false, Chunked, true),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\ncontent-length: 3\r\n\r\n", false, Chunked, true),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false, Close, false),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Close, false),
            ("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: Close\r\n\r\n", false, Length(0), false),
            ("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n", false, Length(2), false),
        ];
        for (head, head_request, framing, keep_alive) in cases {
            let (len, parsed) = parse(head, *head_request).unwrap().unwrap();
            assert_eq!(len, head.len(), "{head:?}");
            assert_eq!((parsed.framing, parsed.keep_alive), (*framing, *keep_alive), "{head:?}");
        }
    }

    #[test]
    fn header_names_are_lowercase_whatever_the_registry_sent() {
        use crate::wire::headers::{API_VERSION, CONTENT_DIGEST, UPLOAD_UUID};
        // raw name -> the name in the map (None: refused)
        let cases: &[(&str, Option<&str>)] = &[
            ("Docker-Content-Digest", Some("docker-content-digest")),
            ("docker-distribution-api-version", Some("docker-distribution-api-version")),
            ("DOCKER-UPLOAD-UUID", Some("docker-upload-uuid")),
            // The lengths of the known names, other names.
            ("docker-content-digesT", Some("docker-content-digest")),
            ("x-docker-content-dige", Some("x-docker-content-dige")),
            ("x-registry-custom-header-nnnnnn", Some("x-registry-custom-header-nnnnnn")),
            ("x-custom-uuid-name", Some("x-custom-uuid-name")),
            ("Content-Type", Some("content-type")),
            ("bad name with spac", None),
            ("", None),
        ];
        for (raw, want) in cases {
            assert_eq!(header_name(raw.as_bytes()).as_ref().map(HeaderName::as_str), *want, "{raw:?}");
        }
        // The registry's names take the path without an allocation, whatever their case.
        for name in [CONTENT_DIGEST, API_VERSION, UPLOAD_UUID] {
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(registry_name(upper.as_bytes()), Some(name.clone()), "{name}");
            assert_eq!(registry_name(name.as_str().as_bytes()), Some(name), "matched by length");
        }
        assert_eq!(registry_name(b"x-docker-content-dige"), None);
    }

    #[test]
    fn bad_heads_are_errors_and_partial_ones_wait() {
        let cases: &[(&str, Result<bool, H1Error>)] = &[
            ("HTTP/1.1 200 OK\r\ncontent-le", Ok(false)),
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", Err(H1Error::ContentLength)),
            ("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", Err(H1Error::ContentLength)),
            ("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n", Err(H1Error::ContentLength)),
            ("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n", Err(H1Error::ContentLength)),
            ("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", Err(H1Error::Upgrade)),
            ("HTTP/1.1 2000 OK\r\n\r\n", Err(H1Error::Head(httparse::Error::Status))),
            ("SSH-2.0-OpenSSH\r\n\r\n", Err(H1Error::Head(httparse::Error::Version))),
        ];
        for (head, expected) in cases {
            let got = parse(head, false).map(|parsed| parsed.is_some());
            assert_eq!(&got, expected, "{head:?}");
        }
    }

    #[test]
    fn header_values_are_kept_as_sent() {
        let head =
            "HTTP/1.1 200 OK\r\nDocker-Content-Digest: sha256:abc\r\nX-A: 1\r\nx-a: 2\r\ncontent-length: 0\r\n\r\n";
        let (_, parsed) = parse(head, false).unwrap().unwrap();
        assert_eq!(parsed.status, StatusCode::OK);
        assert!(parsed.reason.is_none(), "the usual reason is not kept");
        let (_, teapot) = parse("HTTP/1.1 200 Fine Thanks\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(teapot.reason.unwrap().as_bytes(), b"Fine Thanks");
        assert_eq!(parsed.headers["docker-content-digest"], "sha256:abc");
        let xs: Vec<_> = parsed.headers.get_all("x-a").iter().collect();
        assert_eq!(xs, ["1", "2"]);
    }

    /// Decodes `input` fed in pieces of `piece` bytes, as reads would deliver it.
    fn decode(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize), H1Error> {
        let mut state = Chunked::Size;
        let (mut buffered, mut out, mut fed) = (Vec::new(), Vec::new(), 0);
        while state != Chunked::Done {
            if fed < input.len() {
                let end = (fed + piece).min(input.len());
                buffered.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            loop {
                let step = state.step(&buffered)?;
                if let Some((a, b)) = step.data {
                    out.extend_from_slice(&buffered[a..b]);
                }
                buffered.drain(..step.consumed);
                if step.consumed == 0 || state == Chunked::Done {
                    break;
                }
            }
            if fed == input.len() && state != Chunked::Done && state.step(&buffered)?.consumed == 0 {
                return Err(H1Error::Chunk);
            }
        }
        Ok((out, buffered.len() + input.len() - fed))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        // (coded body, decoded, bytes left after it)
        let cases: &[(&[u8], &[u8], usize)] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello", 0),
            (b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT", b"hello world", 4),
            (b"A\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n", b"0123456789", 0),
            (b"0\r\n\r\n", b"", 0),
        ];
        for (coded, decoded, left) in cases {
            for piece in [1, 2, 3, 7, 64] {
                assert_eq!(decode(coded, piece), Ok((decoded.to_vec(), *left)), "{coded:?} in pieces of {piece}");
            }
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for coded in [&b"zz\r\nhello\r\n0\r\n\r\n"[..], b"5\r\nhelloXX0\r\n\r\n", b"5\r\nhel"] {
            assert_eq!(decode(coded, 64), Err(H1Error::Chunk), "{coded:?}");
        }
        let long = [b'1'; MAX_LINE + 2];
        assert_eq!(Chunked::Size.step(&long), Err(H1Error::Chunk));
    }
}
