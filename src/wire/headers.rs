//! Header handling: hop-by-hop stripping, forwarding headers, `Location` rewriting, and
//! redaction of what must never reach a log.
//!
//! All pure functions over `HeaderMap`s and strings, so they are table-tested here and fuzzed.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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
    strip_hop_by_hop(headers);
    append_forwarded_for(headers, client.ip);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
    // Over HTTP/1 `host` is the client's own `Host`: shared, not copied, and already in place for
    // `Preserve`. An h2 `:authority` is made into a header value.
    let (client_host, in_place) = match (client.host, headers.get(header::HOST)) {
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
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    // `Forwarded` takes precedence over X-Forwarded-* in distribution: a client-supplied one
    // could point Location URLs anywhere, so it never passes.
    headers.remove(header::FORWARDED);
}

/// A client address as `X-Forwarded-For` carries it. Made once per connection: formatting the
/// address was a sizeable part of what regscope did to a small request's headers.
pub fn forwarded_for(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
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
    strip_hop_by_hop(headers);
    if let Some(client_origin) = client_origin {
        if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
            if let Some(rewritten) = rewrite_location(location, upstream, client_origin) {
                if let Ok(value) = HeaderValue::from_str(&rewritten) {
                    headers.insert(header::LOCATION, value);
                }
            }
        }
    }
}

/// A scheme and authority, e.g. `http` + `127.0.0.1:5000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub scheme: &'a str,
    pub authority: &'a str,
}

impl Origin<'_> {
    fn default_port(&self) -> Option<&'static str> {
        match self.scheme {
            s if s.eq_ignore_ascii_case("http") => Some("80"),
            s if s.eq_ignore_ascii_case("https") => Some("443"),
            _ => None,
        }
    }

    /// Host and port, with the scheme's default port made explicit, host lowercased.
    pub(crate) fn host_port(&self) -> (String, Option<&str>) {
        let (host, port) = split_authority(self.authority);
        (host.to_ascii_lowercase(), port.or(self.default_port()))
    }

    pub(crate) fn same_as(&self, other: &Origin<'_>) -> bool {
        self.scheme.eq_ignore_ascii_case(other.scheme) && self.host_port() == other.host_port()
    }
}

/// Splits `host:port` (IPv6 in brackets) into host and optional port.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.starts_with('[') {
        if let Some(end) = authority.find(']') {
            let port = authority[end + 1..].strip_prefix(':');
            return (&authority[..=end], port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// If `location` is absolute and points at the upstream, returns it pointed at the address the
/// client used instead. Relative locations and other hosts are left alone.
///
/// This is what keeps uploads on the wire we watch: a `Location` naming the registry directly
/// would send the PATCH and PUT (the bytes) past the proxy.
pub fn rewrite_location(location: &str, upstream: &Origin<'_>, client: &Origin<'_>) -> Option<String> {
    let (scheme, rest) = location.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let target = Origin { scheme, authority };
    // Host and port decide, not the scheme: a registry behind TLS may still build `http://`
    // URLs for itself (from X-Forwarded-Proto), and they point at it all the same.
    if target.host_port() != upstream.host_port() || target.same_as(client) {
        return None;
    }
    Some(format!("{}://{}{}", client.scheme, client.authority, tail))
}

/// Query parameters whose values are secrets or signed state: never logged.
pub const SECRET_PARAMS: &[&str] = &["_state", "token", "access_token", "refresh_token", "password"];

/// A path and query fit for a log: secret query values replaced by `REDACTED`.
pub fn redact_path(path_and_query: &str) -> std::borrow::Cow<'_, str> {
    // A redirect handle is a capability for as long as it lives.
    for prefix in [crate::wire::redirects::PREFIX, crate::wire::redirects::AUTH_PREFIX] {
        if path_and_query.starts_with(prefix) {
            return format!("{prefix}REDACTED").into();
        }
    }
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.into();
    };
    let secret = |pair: &str| SECRET_PARAMS.contains(&pair.split_once('=').map_or(pair, |(k, _)| k));
    if !query.split('&').any(secret) {
        return path_and_query.into();
    }
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if SECRET_PARAMS.contains(&key) => {
                out.push_str(key);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
    out.into()
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
    fn location_rewriting() {
        let up = Origin { scheme: "http", authority: "127.0.0.1:5000" };
        let client = Origin { scheme: "http", authority: "127.0.0.1:5001" };
        let cases: &[(&str, Option<&str>)] = &[
            (
                "http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=x%3D",
                Some("http://127.0.0.1:5001/v2/a/blobs/uploads/u?_state=x%3D"),
            ),
            ("/v2/a/blobs/uploads/u?_state=x", None),
            ("http://127.0.0.1:5001/v2/a/blobs/uploads/u", None),
            ("http://elsewhere:5000/v2/", None),
            ("https://127.0.0.1:5000/v2/", Some("http://127.0.0.1:5001/v2/")),
            ("http://127.0.0.1/v2/", None),
            ("HTTP://127.0.0.1:5000", Some("http://127.0.0.1:5001")),
            ("https://s3.example/bucket/blob?sig=1", None),
        ];
        for (loc, want) in cases {
            assert_eq!(rewrite_location(loc, &up, &client).as_deref(), *want, "{loc}");
        }

        let up = Origin { scheme: "https", authority: "Registry.example" };
        let client = Origin { scheme: "https", authority: "proxy.example:8443" };
        assert_eq!(
            rewrite_location("https://registry.example:443/v2/x", &up, &client).as_deref(),
            Some("https://proxy.example:8443/v2/x")
        );
        let v6 = Origin { scheme: "http", authority: "[::1]:5000" };
        assert_eq!(
            rewrite_location("http://[::1]:5000/v2/", &v6, &client).as_deref(),
            Some("https://proxy.example:8443/v2/")
        );
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

    #[test]
    fn redaction() {
        let cases: &[(&str, &str)] = &[
            ("/v2/", "/v2/"),
            ("/v2/a/tags/list?n=10", "/v2/a/tags/list?n=10"),
            (
                "/v2/a/blobs/uploads/u?_state=secret%3D&digest=sha256:1",
                "/v2/a/blobs/uploads/u?_state=REDACTED&digest=sha256:1",
            ),
            ("/token?service=x&access_token=abc", "/token?service=x&access_token=REDACTED"),
            ("/x?_state", "/x?_state"),
            ("/_regscope/storage/0123456789abcdef0123456789abcdef", "/_regscope/storage/REDACTED"),
            ("/_regscope/auth/0123456789abcdef0123456789abcdef?scope=x", "/_regscope/auth/REDACTED"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_path(input), *want);
        }
    }
}
