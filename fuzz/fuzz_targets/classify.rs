//! Fuzzes the pure request-facing functions: route classification, percent-decoding, header
//! forwarding, `Location` rewriting and log redaction. Beyond "never panics", each call is held to
//! the properties the proxy relies on.
//!
//! Input, split at `\n`: method, path-and-query, `Location`, upstream origin, client origin
//! (`scheme://authority`), then header lines `name:value`. Text seeds in `fuzz/seeds/classify`.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use libfuzzer_sys::fuzz_target;
use regscope::headers::{
    forward_request_headers, forward_response_headers, forwarded_for, redact_path, rewrite_location, strip_hop_by_hop, ClientView,
    HostMode, Origin, HOP_BY_HOP, SECRET_PARAMS,
};
use regscope::{classify, is_repository_name, percent_decode, Operation, Route};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let mut next = || lines.next().unwrap_or_default();
    let method_bytes = next();
    let target = String::from_utf8_lossy(next()).into_owned();
    let location = String::from_utf8_lossy(next()).into_owned();
    let upstream = String::from_utf8_lossy(next()).into_owned();
    let client = String::from_utf8_lossy(next()).into_owned();
    let header_lines: Vec<&[u8]> = lines.collect();

    let method = Method::from_bytes(method_bytes).unwrap_or(Method::GET);
    routes(&method, &target);
    decoding(&target);
    redaction(&target);

    let upstream = origin(&upstream);
    let client = origin(&client);
    locations(&location, &upstream, &client);
    headers(&header_lines, &upstream, &client, data.len());
});

// === route ===

fn routes(method: &Method, target: &str) {
    // Raw, as no HTTP parser would hand it over, and as hyper's `Uri` would.
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    check_route(method, path, query);
    if let Ok(pq) = http::uri::PathAndQuery::try_from(target) {
        check_route(method, pq.path(), pq.query());
    }
}

fn check_route(method: &Method, path: &str, query: Option<&str>) {
    let route: Route<'_> = classify(method, path, query);
    assert_eq!(route, classify(method, path, query), "classification is a pure function");
    assert_eq!(route.api(), route.operation.api());
    assert!(Operation::ALL.contains(&route.operation));
    if route.operation != Operation::Other {
        assert!(path.starts_with("/v2") || path.starts_with("/v1/") || path == "/_ping", "{path}");
    }
    if let Some(repository) = route.repository {
        assert!(is_repository_name(repository), "repository {repository:?} from {path:?}");
        assert!(path.contains(repository));
    }
    if let Some(id) = route.upload_id {
        assert!(!id.is_empty() && !id.contains('/') && !id.contains(':'), "upload id {id:?} from {path:?}");
    }
    if let Some(digest) = route.digest {
        assert!(!digest.is_empty());
        let from_query = query.is_some_and(|q| q.contains(digest));
        assert!(path.contains(digest) || from_query, "digest {digest:?} from {path:?} {query:?}");
        let _ = percent_decode(digest);
    }
    if let Some(reference) = route.reference {
        assert!(!reference.is_empty() && !reference.contains('/'), "reference {reference:?} from {path:?}");
    }
}

fn decoding(text: &str) {
    let decoded = percent_decode(text);
    if !text.contains('%') {
        assert_eq!(decoded, text);
    }
    // Escaping every byte and decoding gives the text back.
    let escaped: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
    assert_eq!(percent_decode(&escaped), text);
}

fn redaction(target: &str) {
    let redacted = redact_path(target);
    // A storage or token-realm handle is a capability: the whole target is hidden.
    for prefix in ["/_regscope/storage/", "/_regscope/auth/"] {
        if target.starts_with(prefix) {
            assert_eq!(redacted, format!("{prefix}REDACTED"));
            return;
        }
    }
    let Some((path, query)) = target.split_once('?') else {
        assert_eq!(redacted, target);
        return;
    };
    let (out_path, out_query) = redacted.split_once('?').expect("the query survives");
    assert_eq!(out_path, path);
    let pairs: Vec<&str> = out_query.split('&').collect();
    assert_eq!(pairs.len(), query.split('&').count());
    for (pair, original) in pairs.iter().zip(query.split('&')) {
        match original.split_once('=') {
            Some((key, _)) if SECRET_PARAMS.contains(&key) => assert_eq!(*pair, format!("{key}=REDACTED")),
            _ => assert_eq!(pair, &original),
        }
    }
}

// === headers ===

fn origin(text: &str) -> Origin<'_> {
    match text.split_once("://") {
        Some((scheme, authority)) => Origin { scheme, authority },
        None => Origin { scheme: "http", authority: text },
    }
}

fn locations(location: &str, upstream: &Origin<'_>, client: &Origin<'_>) {
    if let Some(rewritten) = rewrite_location(location, upstream, client) {
        let prefix = format!("{}://{}", client.scheme, client.authority);
        let tail = rewritten.strip_prefix(&prefix).expect("rewritten to the client's origin");
        assert!(location.ends_with(tail), "{location:?} -> {rewritten:?} changed the path");
        assert!(tail.is_empty() || tail.starts_with(['/', '?', '#']), "{location:?} -> {rewritten:?}");
    }
}

fn headers(lines: &[&[u8]], upstream: &Origin<'_>, client: &Origin<'_>, salt: usize) {
    let mut original = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(trim(&line[colon + 1..])))
        else {
            continue;
        };
        original.append(name, value);
    }
    let listed: Vec<HeaderName> = original
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let is_stripped = |name: &HeaderName| HOP_BY_HOP.contains(&name.as_str()) || listed.contains(name);

    let mut stripped = original.clone();
    strip_hop_by_hop(&mut stripped);
    for name in original.keys() {
        if is_stripped(name) {
            assert!(!stripped.contains_key(name), "{name} survived stripping");
        } else {
            let before: Vec<_> = original.get_all(name).iter().collect();
            let after: Vec<_> = stripped.get_all(name).iter().collect();
            assert_eq!(before, after, "{name} changed by stripping");
        }
    }

    let ip = if salt % 2 == 0 { IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) };
    let scheme = if salt % 3 == 0 { "https" } else { "http" };
    let host = (salt % 5 != 0).then_some(client.authority);
    let upstream_host = HeaderValue::from_str(upstream.authority).unwrap_or(HeaderValue::from_static("registry"));
    for mode in [HostMode::Preserve, HostMode::Upstream] {
        let mut forwarded = original.clone();
        forward_request_headers(&mut forwarded, &ClientView { ip: &forwarded_for(ip), scheme, host }, mode, &upstream_host);
        for name in HOP_BY_HOP.iter().chain(["forwarded"].iter()) {
            assert!(!forwarded.contains_key(*name), "{name} forwarded upstream");
        }
        assert_eq!(forwarded["x-forwarded-proto"], scheme);
        if let Some(xff) = forwarded.get("x-forwarded-for") {
            assert!(xff.to_str().unwrap().ends_with(&ip.to_string()), "{xff:?}");
        }
        // The registry sees the authority the client asked for (X-Forwarded-Host, and `Host` in
        // preserve mode) and never a client-supplied one: it builds `Location` URLs from them.
        let client_host = host.and_then(|h| HeaderValue::from_str(h).ok());
        assert_eq!(forwarded.get("x-forwarded-host"), client_host.as_ref());
        match mode {
            HostMode::Upstream => assert_eq!(forwarded["host"], upstream_host),
            HostMode::Preserve => {
                if let Some(h) = &client_host {
                    assert_eq!(&forwarded["host"], h);
                }
            }
        }
    }

    let mut response = original.clone();
    forward_response_headers(&mut response, upstream, Some(client));
    for name in HOP_BY_HOP {
        assert!(!response.contains_key(*name), "{name} forwarded to the client");
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &bytes[start..end]
}
