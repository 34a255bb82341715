//! The HTTP/1.1 regscope's front speaks to a client (see [`crate::wire::front`]): a request head
//! read in and judged, a response head written out by hyper's server's rules, and the framing
//! of the body after it (RFC 9112 §6). Pure functions over bytes.
//!
//! The front serves only plain bodiless HTTP/1.1 requests; everything else (a body, an upgrade,
//! `Expect`, HTTP/1.0, a malformed or oversized head) is [`Head::Other`], and hyper serves it
//! and the rest of the connection, with its own answers to bad input.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use crate::wire::h1;

/// The most header lines a request head may have (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// What the start of a connection's buffer holds. Returned by value once per head: boxing the
/// request would cost an allocation per request.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Head {
    /// Not a whole head yet: read more.
    Partial,
    /// A bodiless request the front may serve: the head's length, the request, and whether the
    /// client lets the connection carry another one.
    Bodiless { len: usize, request: Request<()>, keep_alive: bool },
    /// Anything else: hyper serves it.
    Other,
}

/// Parses a request head at the start of `buf`. A head that has not ended within `max_head`
/// bytes is [`Head::Other`] (hyper answers it 431). The request's headers go into `headers`
/// (the last response's map, cleared, so its room is used again; as hyper does), which is taken
/// for the request.
pub(crate) fn parse_request(buf: &[u8], max_head: usize, headers: &mut HeaderMap) -> Head {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Head::Partial,
        _ => return Head::Other,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else { return Head::Other };
    if !path.starts_with('/') {
        return Head::Other;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Head::Other };
    if method == Method::CONNECT {
        return Head::Other;
    }
    // One copy of the head; the target and every value are slices of it.
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    let start = offset(buf, path.as_bytes());
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice(start..start + path.len())) else { return Head::Other };
    headers.clear();
    headers.reserve(req.headers.len());
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else { return Head::Other };
        let start = offset(buf, h.value);
        let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(start..start + h.value.len())) else {
            return Head::Other;
        };
        match name {
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT => return Head::Other,
            header::CONTENT_LENGTH if value.as_bytes() != b"0" => return Head::Other,
            header::CONNECTION if h1::lists(&value, "upgrade") => return Head::Other,
            header::CONNECTION if h1::lists(&value, "close") => keep_alive = false,
            _ => {}
        }
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = std::mem::take(headers);
    Head::Bodiless { len, request, keep_alive }
}

/// Where `part`, a slice of `buf`, starts in it.
fn offset(buf: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

/// What a response body tells of its length before it is read (`http_body::Body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// It has ended already.
    Empty,
    Known(u64),
    Unknown,
}

/// How the body after a written head goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes (none: the body is not sent at all).
    Length(u64),
    Chunked,
}

/// A response head that cannot be written.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub(crate) enum EncodeError {
    #[error("invalid or conflicting Content-Length in a response")]
    ContentLength,
    #[error("1xx responses are not sent")]
    Informational,
}

/// A written head: how its body goes out, and whether the connection closes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub framing: Framing,
    pub close: bool,
}

/// Writes a response head as hyper's server would for an HTTP/1.1 request: its status line,
/// its headers with lower-case names, framing headers made to match the body, `connection:
/// close` added when `close`, and `date` when the response has none.
pub(crate) fn encode_response(
    parts: &http::response::Parts,
    head_request: bool,
    body: BodyLength,
    mut close: bool,
    date: &[u8],
    out: &mut Vec<u8>,
) -> Result<Written, EncodeError> {
    let status = parts.status;
    if status.is_informational() {
        return Err(EncodeError::Informational);
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if parts.version == Version::HTTP_10 {
        out.extend_from_slice(b"HTTP/1.0 ");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
    }
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match reason {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");

    // RFC 9110 §6.4.1: no body after a HEAD, a 204 or a 304, and no length for the last two.
    let bodyless_status = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let may_chunk = !head_request && !bodyless_status;
    let mut framing = None;
    let (mut wrote_date, mut wrote_close) = (false, false);
    let mut chunked_last = true;
    let mut length = None;
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH => {
                if framing == Some(Framing::Chunked) {
                    return Err(EncodeError::ContentLength);
                }
                let parsed = std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.parse::<u64>().ok());
                let n = match (body, parsed) {
                    (BodyLength::Known(known), _) => known,
                    (_, Some(n)) => n,
                    (_, None) => return Err(EncodeError::ContentLength),
                };
                match length {
                    Some(previous) if previous != n => return Err(EncodeError::ContentLength),
                    Some(_) => continue,
                    None => length = Some(n),
                }
                // An empty body with a length is a HEAD's answer; for anything else the
                // implicit `content-length: 0` below says it.
                if body == BodyLength::Empty && !head_request {
                    length = None;
                    continue;
                }
                framing = Some(Framing::Length(n));
            }
            header::TRANSFER_ENCODING => {
                if framing.is_some_and(|f| f != Framing::Chunked) {
                    return Err(EncodeError::ContentLength);
                }
                if !may_chunk {
                    continue;
                }
                framing = Some(Framing::Chunked);
                chunked_last = h1::ends_chunked(value);
            }
            header::CONNECTION => {
                let says_close = h1::lists(value, "close");
                wrote_close |= says_close;
                close |= says_close;
            }
            header::DATE => wrote_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        if *name == header::TRANSFER_ENCODING && !chunked_last {
            out.extend_from_slice(b", chunked");
            chunked_last = true;
        }
        out.extend_from_slice(b"\r\n");
    }
    let framing = match framing {
        Some(framing) => framing,
        None => match body {
            BodyLength::Unknown if may_chunk => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            BodyLength::Unknown => Framing::Length(0),
            BodyLength::Empty | BodyLength::Known(0) => {
                if !head_request && !bodyless_status {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            BodyLength::Known(n) => {
                if !bodyless_status {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Framing::Length(n)
            }
        },
    };
    if close && !wrote_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = if head_request || bodyless_status { Framing::Length(0) } else { framing };
    Ok(Written { framing, close })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn bodiless(raw: &str) -> (usize, Request<()>, bool) {
        match parse_request(raw.as_bytes(), MAX, &mut HeaderMap::new()) {
            Head::Bodiless { len, request, keep_alive } => (len, request, keep_alive),
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn bodiless_requests_are_read_whole() {
        let raw = "GET /v2/library/alpine/manifests/3.20?x=1 HTTP/1.1\r\nHost: r:5000\r\nAccept: a\r\nAccept: b\r\n\r\nGET /next";
        let (len, req, keep_alive) = bodiless(raw);
        assert_eq!(len, raw.find("GET /next").unwrap());
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/v2/library/alpine/manifests/3.20");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers()["host"], "r:5000");
        assert_eq!(req.headers().get_all("accept").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(keep_alive);
        let (_, req, keep_alive) = bodiless("HEAD /v2/ HTTP/1.1\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(req.method(), Method::HEAD);
        assert!(!keep_alive);
        let (_, req, _) = bodiless("PUT /v2/a/blobs/uploads/u?digest=sha256:0 HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(req.method(), Method::PUT);
    }

    #[test]
    fn anything_else_is_left_to_hyper() {
        let other = [
            "PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "PUT /v2/a/manifests/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT /v2/a/manifests/t HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://elsewhere/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "CONNECT elsewhere:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "G@T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
        ];
        for raw in other {
            assert!(matches!(parse_request(raw.as_bytes(), MAX, &mut HeaderMap::new()), Head::Other), "{raw:?}");
        }
    }

    #[test]
    fn a_head_is_partial_until_it_ends_or_passes_the_limit() {
        assert!(matches!(parse_request(b"", MAX, &mut HeaderMap::new()), Head::Partial));
        assert!(matches!(
            parse_request(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n", MAX, &mut HeaderMap::new()),
            Head::Partial
        ));
        let long = format!("GET /v2/ HTTP/1.1\r\nx-long: {}\r\n", "a".repeat(100));
        assert!(
            matches!(parse_request(long.as_bytes(), 64, &mut HeaderMap::new()), Head::Other),
            "partial past the limit"
        );
        let whole = format!("{long}\r\n");
        assert!(
            matches!(parse_request(whole.as_bytes(), 64, &mut HeaderMap::new()), Head::Other),
            "whole but past the limit"
        );
        let many: String = (0..101).map(|i| format!("x-{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(
            matches!(parse_request(many.as_bytes(), MAX, &mut HeaderMap::new()), Head::Other),
            "more header lines than hyper takes"
        );
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn encode(
        parts: &http::response::Parts,
        head: bool,
        body: BodyLength,
        close: bool,
    ) -> (String, Result<Written, EncodeError>) {
        let mut out = Vec::new();
        let written = encode_response(parts, head, body, close, b"Sat, 05 Dec 2026 07:00:00 GMT", &mut out);
        (String::from_utf8(out).unwrap(), written)
    }

    #[test]
    fn response_heads_follow_hypers_rules() {
        use BodyLength::*;
        const DATE: &str = "date: Sat, 05 Dec 2026 07:00:00 GMT\r\n";
        let ok_len = |n| Ok(Written { framing: Framing::Length(n), close: false });
        let chunked = Ok(Written { framing: Framing::Chunked, close: false });
        let with_date = Ok(Written { framing: Framing::Length(3), close: false });
        let closes = Ok(Written { framing: Framing::Length(0), close: true });
        let dated = [("date", "Fri, 04 Dec 2026 00:00:00 GMT")];
        type Case = (&'static str, http::response::Parts, bool, BodyLength, bool, String, Result<Written, EncodeError>);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("a length as sent", response(200, &[("Content-Length", "3"), ("X-A", "b")]), false, Known(3), false,
             format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b\r\n{DATE}\r\n"), ok_len(3)),
            ("a length made", response(404, &[]), false, Known(3), false,
             format!("HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n{DATE}\r\n"), ok_len(3)),
            ("an empty body", response(200, &[]), false, Empty, false,
             format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{DATE}\r\n"), ok_len(0)),
            ("a stale length on an empty body", response(200, &[("content-length", "7")]), false, Empty, false,
             format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{DATE}\r\n"), ok_len(0)),
            ("a HEAD keeps its length", response(200, &[("content-length", "7")]), true, Empty, false,
             format!("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n{DATE}\r\n"), ok_len(0)),
            ("a HEAD without one gets none", response(200, &[]), true, Empty, false,
             format!("HTTP/1.1 200 OK\r\n{DATE}\r\n"), ok_len(0)),
            ("unknown length: chunked", response(200, &[]), false, Unknown, false,
             format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n{DATE}\r\n"), chunked),
            ("chunked made last", response(200, &[("transfer-encoding", "gzip")]), false, Unknown, false,
             format!("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n{DATE}\r\n"), chunked),
            ("a length read from the header", response(200, &[("content-length", "3")]), false, Unknown, false,
             format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n{DATE}\r\n"), ok_len(3)),
            ("no length on a 304", response(304, &[]), false, Known(5), false,
             format!("HTTP/1.1 304 Not Modified\r\n{DATE}\r\n"), ok_len(0)),
            ("no chunks on a 204", response(204, &[("transfer-encoding", "chunked")]), false, Unknown, false,
             format!("HTTP/1.1 204 No Content\r\n{DATE}\r\n"), ok_len(0)),
            ("close added", response(200, &[]), false, Empty, true,
             format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n{DATE}\r\n"), closes),
            ("close kept", response(502, &[("connection", "close")]), false, Empty, false,
             format!("HTTP/1.1 502 Bad Gateway\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n"), closes),
            ("the registry's date kept", response(200, &dated), false, Known(3), false,
             "HTTP/1.1 200 OK\r\ndate: Fri, 04 Dec 2026 00:00:00 GMT\r\ncontent-length: 3\r\n\r\n".into(), with_date),
            ("a bad length", response(200, &[("content-length", "x")]), false, Unknown, false,
             String::new(), Err(EncodeError::ContentLength)),
            ("two lengths", response(200, &[("content-length", "1"), ("content-length", "2")]), false, Unknown, false,
             String::new(), Err(EncodeError::ContentLength)),
            ("a 1xx", response(103, &[]), false, Empty, false, String::new(), Err(EncodeError::Informational)),
        ];
        for (what, parts, head, body, close, want, written) in cases {
            let (got, result) = encode(&parts, head, body, close);
            assert_eq!(result, written, "{what}");
            if result.is_ok() {
                assert_eq!(got, want, "{what}");
            }
        }
    }

    #[test]
    fn reason_phrases_and_versions_are_the_responses() {
        let mut parts = response(200, &[]);
        parts.extensions.insert(hyper::ext::ReasonPhrase::from_static(b"Fine"));
        parts.version = Version::HTTP_10;
        let (got, _) = encode(&parts, false, BodyLength::Empty, false);
        assert!(got.starts_with("HTTP/1.0 200 Fine\r\n"), "{got}");
        let (got, _) = encode(&response(599, &[]), false, BodyLength::Empty, false);
        assert!(got.starts_with("HTTP/1.1 599 <none>\r\n"), "{got}");
    }
}
