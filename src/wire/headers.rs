//! Header handling: what regscope reads from a head, hop-by-hop stripping, forwarding headers,
//! and (re-exported from their own files) `Location` rewriting and redaction of what must never
//! reach a log.
//!
//! All pure functions over `HeaderMap`s and strings, so they are table-tested here and fuzzed.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub use super::location::{rewrite_location, Origin};
pub use super::redact::{redact_path, SECRET_PARAMS};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the
/// non-standard `Proxy-Connection` and `Keep-Alive`). `Expect` is answered by our own server
/// (hyper sends `100 Continue` when we start reading the body), so it is not forwarded either.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Copies a request's target and header values into one fresh buffer of their own size.
///
/// hyper parses an HTTP/1 request head into slices of the connection's read buffer, and reads the
/// connection again (to notice a hang-up) as soon as it has handed the request over: while any
/// slice is alive, that read must allocate a second buffer, kept for the whole exchange. Called
/// where hyper hands the request over, this lets the read reuse the first: 8 KiB less per
/// transfer for a copy of a few hundred bytes. An absolute-form target is left as it is (it is
/// refused before anything is forwarded).
pub fn detach_head<B>(req: &mut http::Request<B>) {
    let target = match req.uri().path_and_query() {
        Some(pq) if req.uri().authority().is_none() => pq.as_str(),
        _ => "",
    };
    let size = target.len() + req.headers().values().map(HeaderValue::len).sum::<usize>();
    let mut copy = bytes::BytesMut::with_capacity(size);
    copy.extend_from_slice(target.as_bytes());
    for value in req.headers().values() {
        copy.extend_from_slice(value.as_bytes());
    }
    let copy = copy.freeze();
    let target_len = target.len();
    if target_len > 0 {
        if let Ok(uri) = http::Uri::from_maybe_shared(copy.slice(..target_len)) {
            *req.uri_mut() = uri;
        }
    }
    let mut at = target_len;
    for value in req.headers_mut().values_mut() {
        let end = at + value.len();
        if let Ok(mut detached) = HeaderValue::from_maybe_shared(copy.slice(at..end)) {
            detached.set_sensitive(value.is_sensitive());
            *value = detached;
        }
        at = end;
    }
}

/// What regscope reads from a message's headers, found in one pass over them: looking each up
/// by name would hash the name again. First values, as `HeaderMap::get` gives them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    pub host: Option<HeaderValue>,
    /// `Content-Length`, when it is a number.
    pub content_length: Option<u64>,
    /// `Docker-Upload-UUID` and `Docker-Content-Digest` (responses), when they are text.
    pub upload_uuid: Option<Box<str>>,
    pub content_digest: Option<Box<str>>,
    /// Whether any hop-by-hop header is there (stripping has work to do).
    pub hop_by_hop: bool,
    pub location: bool,
    pub forwarded: bool,
    pub forwarded_for: bool,
    pub forwarded_host: bool,
}

/// The registry's own headers (distribution's API), which `http` does not know.
pub(crate) const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
pub(crate) const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
pub(crate) const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// One pass over `headers`: see [`Seen`].
pub fn seen(headers: &HeaderMap) -> Seen {
    let text = |v: &HeaderValue| v.to_str().ok().map(Box::<str>::from);
    let mut seen = Seen::default();
    let mut content_length = None;
    for (name, value) in headers {
        match *name {
            header::HOST => {
                seen.host.get_or_insert_with(|| value.clone());
            }
            header::CONTENT_LENGTH => {
                content_length.get_or_insert(value);
            }
            header::LOCATION => seen.location = true,
            header::FORWARDED => seen.forwarded = true,
            _ if *name == X_FORWARDED_FOR => seen.forwarded_for = true,
            _ if *name == X_FORWARDED_HOST => seen.forwarded_host = true,
            _ if *name == UPLOAD_UUID => {
                if seen.upload_uuid.is_none() {
                    seen.upload_uuid = text(value);
                }
            }
            _ if *name == CONTENT_DIGEST => {
                if seen.content_digest.is_none() {
                    seen.content_digest = text(value);
                }
            }
            _ => seen.hop_by_hop |= HOP_BY_HOP.contains(&name.as_str()),
        }
    }
    seen.content_length = content_length.and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    seen
}

/// Removes hop-by-hop headers, including any named in `Connection`.
///
/// Most messages carry none: one pass over the names they do carry decides that, where removing
/// each of the ten by name would parse and hash every name twice per request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection` is hop-by-hop itself, so a message naming others there takes the long way.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(&name.as_str())) {
        return;
    }
    // Names listed in Connection are hop-by-hop too. Collected first: we cannot remove while
    // borrowing. Rare enough (almost always `keep-alive` or `close`) to allocate for.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

// Built at compile time: `from_static` at run time validates the name on every call.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Which `Host` the registry sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostMode {
    /// Forward the client's `Host`: the registry builds `Location` URLs that point back at us.
    Preserve,
    /// Send the upstream's authority (virtual-hosted registries), and tell the registry who the
    /// client asked for with `X-Forwarded-Host`/`-Proto`.
    Upstream,
}

/// How the client reached us, as needed to build forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct ClientView<'a> {
    /// The client's IP address as [`forwarded_for`] writes it.
    pub ip: &'a HeaderValue,
    /// `http` or `https`: the scheme of the client's connection to us.
    pub scheme: &'static str,
    /// The authority the client asked for (`Host`, or the h2 `:authority`).
    pub host: Option<&'a str>,
}

/// Turns the client's request headers into the headers sent upstream.
pub fn forward_request_headers(
    headers: &mut HeaderMap,
    client: &ClientView<'_>,
    mode: HostMode,
    upstream_authority: &HeaderValue,
) {
    let seen = seen(headers);
    forward_request_headers_seen(headers, &seen, client, mode, upstream_authority);
}

/// [`forward_request_headers`], for headers `seen` has already been taken of. Returns what they
/// say after hop-by-hop stripping (the same, unless there was some).
pub fn forward_request_headers_seen(
    headers: &mut HeaderMap,
    seen: &Seen,
    client: &ClientView<'_>,
    mode: HostMode,
    upstream_authority: &HeaderValue,
) -> Option<Seen> {
    // `Connection` may name any header: after stripping, look again.
    let stripped = seen.hop_by_hop.then(|| {
        strip_hop_by_hop(headers);
        self::seen(headers)
    });
    let seen = stripped.as_ref().unwrap_or(seen);
    append_forwarded_for(headers, seen.forwarded_for, client.ip);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
    // Over HTTP/1 `host` is the client's own `Host`: shared, not copied, and already in place for
    // `Preserve`. An h2 `:authority` is made into a header value.
    let (client_host, in_place) = match (client.host, &seen.host) {
        (Some(h), Some(own)) if own.as_bytes() == h.as_bytes() => (Some(own.clone()), true),
        (h, _) => (h.and_then(|h| HeaderValue::from_str(h).ok()), false),
    };
    match mode {
        HostMode::Preserve => {
            if let Some(host) = client_host.as_ref().filter(|_| !in_place) {
                headers.insert(header::HOST, host.clone());
            }
        }
        HostMode::Upstream => {
            headers.insert(header::HOST, upstream_authority.clone());
        }
    }
    // Sent in both modes: over h2 the registry sees `:authority` (the upstream) whatever
    // `Host` says, and distribution builds `Location` from X-Forwarded-Host when present.
    match client_host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None if seen.forwarded_host => {
            headers.remove(X_FORWARDED_HOST);
        }
        None => {}
    }
    // `Forwarded` takes precedence over X-Forwarded-* in distribution: a client-supplied one
    // could point Location URLs anywhere, so it never passes.
    if seen.forwarded {
        headers.remove(header::FORWARDED);
    }
    stripped
}

/// A client address as `X-Forwarded-For` carries it. Made once per connection: formatting the
/// address was a sizeable part of what regscope did to a small request's headers.
pub fn forwarded_for(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

fn append_forwarded_for(headers: &mut HeaderMap, present: bool, ip: &HeaderValue) {
    let prior = if present { headers.get(X_FORWARDED_FOR) } else { None };
    let value = match prior.and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            let joined = [prior.as_bytes(), b", ", ip.as_bytes()].concat();
            match HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
                Ok(value) => value,
                Err(_) => return,
            }
        }
        _ => ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, value);
}

/// Turns the registry's response headers into the headers sent to the client.
pub fn forward_response_headers(headers: &mut HeaderMap, upstream: &Origin<'_>, client_origin: Option<&Origin<'_>>) {
    let seen = seen(headers);
    forward_response_headers_seen(headers, &seen, upstream, client_origin);
}

/// [`forward_response_headers`], for headers `seen` has already been taken of.
pub fn forward_response_headers_seen(
    headers: &mut HeaderMap,
    seen: &Seen,
    upstream: &Origin<'_>,
    client_origin: Option<&Origin<'_>>,
) {
    if seen.hop_by_hop {
        strip_hop_by_hop(headers);
    }
    if let Some(client_origin) = client_origin.filter(|_| seen.location) {
        if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
            if let Some(rewritten) = rewrite_location(location, upstream, client_origin) {
                if let Ok(value) = HeaderValue::from_str(&rewritten) {
                    headers.insert(header::LOCATION, value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn detached_head_keeps_every_value_and_releases_the_read_buffer() {
        // A head parsed the way hyper does it: target and values are slices of one buffer.
        let buffer = bytes::Bytes::copy_from_slice(b"/v2/r/blobs/sha256:ab?x=1 host.example Bearer t v1 v2");
        let mut req =
            http::Request::builder().uri(http::Uri::from_maybe_shared(buffer.slice(0..25)).unwrap()).body(()).unwrap();
        let h = req.headers_mut();
        h.insert(header::HOST, HeaderValue::from_maybe_shared(buffer.slice(26..38)).unwrap());
        let mut auth = HeaderValue::from_maybe_shared(buffer.slice(39..47)).unwrap();
        auth.set_sensitive(true);
        h.insert(header::AUTHORIZATION, auth);
        h.append("x-multi", HeaderValue::from_maybe_shared(buffer.slice(48..50)).unwrap());
        h.append("x-multi", HeaderValue::from_maybe_shared(buffer.slice(51..53)).unwrap());
        let before = (req.uri().clone(), req.headers().clone());

        detach_head(&mut req);

        assert_eq!(req.uri(), &before.0);
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers(), &before.1);
        assert_eq!(req.headers().get_all("x-multi").iter().collect::<Vec<_>>(), ["v1", "v2"]);
        assert!(req.headers()[header::AUTHORIZATION].is_sensitive());
        // Once the clones taken above are gone, nothing but `buffer` itself refers to it.
        drop(before);
        assert!(buffer.is_unique(), "the request still refers to the read buffer");
    }

    #[test]
    fn absolute_form_targets_are_left_alone() {
        let mut req = http::Request::builder().uri("http://example.com/v2/").body(()).unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("example.com"));
        detach_head(&mut req);
        assert_eq!(req.uri(), "http://example.com/v2/");
        assert_eq!(req.headers()[header::HOST], "example.com");
    }

    #[test]
    fn hop_by_hop_and_connection_listed_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Custom"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("expect", "100-continue"),
            ("proxy-authorization", "Basic x"),
            ("content-length", "10"),
            ("docker-upload-uuid", "u"),
            ("authorization", "Bearer t"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["authorization", "content-length", "docker-upload-uuid"]);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let original = map(&[
            ("accept", "application/vnd.oci.image.manifest.v1+json"),
            ("accept", "application/vnd.docker.distribution.manifest.v2+json"),
            ("authorization", "Bearer t"),
            ("x-connection", "close"),
            ("content-length", "0"),
        ]);
        let mut h = original.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, original);
    }

    #[test]
    fn one_pass_sees_what_lookups_by_name_would() {
        let cases: &[(&[(&str, &str)], Seen)] = &[
            (&[], Seen::default()),
            (
                &[("Host", "a:5001"), ("Host", "b"), ("Content-Length", "12"), ("Content-Length", "13")],
                Seen { host: Some(HeaderValue::from_static("a:5001")), content_length: Some(12), ..Seen::default() },
            ),
            (&[("content-length", "twelve")], Seen::default()),
            (
                &[("docker-upload-uuid", "u-1"), ("Docker-Content-Digest", "sha256:ab"), ("location", "/v2/x")],
                Seen {
                    upload_uuid: Some("u-1".into()),
                    content_digest: Some("sha256:ab".into()),
                    location: true,
                    ..Seen::default()
                },
            ),
            (
                &[("forwarded", "for=1.2.3.4"), ("x-forwarded-for", "1.2.3.4"), ("x-forwarded-host", "evil")],
                Seen { forwarded: true, forwarded_for: true, forwarded_host: true, ..Seen::default() },
            ),
            (&[("te", "trailers")], Seen { hop_by_hop: true, ..Seen::default() }),
            (&[("x-connection", "close"), ("accept", "*/*")], Seen::default()),
        ];
        for (pairs, want) in cases {
            assert_eq!(&seen(&map(pairs)), want, "{pairs:?}");
        }
    }

    /// `Connection` may name the headers that forwarding reads: they are gone before it reads them.
    #[test]
    fn headers_named_in_connection_are_gone_before_forwarding_reads_them() {
        let upstream = HeaderValue::from_static("registry.internal:5000");
        let ip = forwarded_for(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        let client = ClientView { ip: &ip, scheme: "http", host: Some("proxy:5001") };
        let mut h = map(&[
            ("connection", "host, x-forwarded-for, content-length"),
            ("host", "proxy:5001"),
            ("x-forwarded-for", "6.6.6.6"),
            ("content-length", "5"),
        ]);
        let before = seen(&h);
        let after = forward_request_headers_seen(&mut h, &before, &client, HostMode::Preserve, &upstream);
        assert_eq!(h[header::HOST], "proxy:5001");
        assert_eq!(h[X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(after.map(|s| s.content_length), Some(None));
        assert!(h.get(header::CONTENT_LENGTH).is_none());
    }

    #[test]
    fn forwarded_for_is_the_plain_address() {
        assert_eq!(forwarded_for(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))), "10.1.2.3");
        assert_eq!(forwarded_for("2001:db8::1".parse().unwrap()), "2001:db8::1");
    }

    #[test]
    fn forwarding_headers_per_host_mode() {
        let upstream = HeaderValue::from_static("registry.internal:5000");
        let client = ClientView {
            ip: &forwarded_for(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
            scheme: "https",
            host: Some("proxy:5001"),
        };
        let base = [("x-forwarded-for", "192.0.2.1"), ("forwarded", "host=evil"), ("x-forwarded-host", "evil")];
        // The client's host as its own Host header (HTTP/1), as another one (an h2 :authority
        // beside a stray Host), or with no Host at all (h2).
        for host in [Some("proxy:5001"), Some("other:1"), None] {
            let with_host = |mut h: HeaderMap| {
                if let Some(host) = host {
                    h.insert(header::HOST, HeaderValue::from_static(host));
                }
                h
            };
            let mut h = with_host(map(&base));
            forward_request_headers(&mut h, &client, HostMode::Preserve, &upstream);
            assert_eq!(h.get_all("host").iter().collect::<Vec<_>>(), ["proxy:5001"], "{host:?}");
            assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
            assert_eq!(h["x-forwarded-proto"], "https");
            assert_eq!(h["x-forwarded-host"], "proxy:5001");
            assert!(h.get("forwarded").is_none());

            let mut h = with_host(map(&base));
            forward_request_headers(&mut h, &client, HostMode::Upstream, &upstream);
            assert_eq!(h.get_all("host").iter().collect::<Vec<_>>(), ["registry.internal:5000"], "{host:?}");
            assert_eq!(h["x-forwarded-host"], "proxy:5001");
            assert!(h.get("forwarded").is_none());
        }
    }

    #[test]
    fn location_in_response_headers_is_rewritten() {
        let up = Origin { scheme: "http", authority: "127.0.0.1:5000" };
        let client = Origin { scheme: "http", authority: "localhost:5001" };
        let mut h = map(&[("location", "http://127.0.0.1:5000/v2/a/blobs/uploads/u"), ("connection", "close")]);
        forward_response_headers(&mut h, &up, Some(&client));
        assert_eq!(h["location"], "http://localhost:5001/v2/a/blobs/uploads/u");
        assert!(h.get("connection").is_none());
    }
}
