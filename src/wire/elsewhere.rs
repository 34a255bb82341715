//! The headers of what regscope sends to hosts other than the registry on a client's behalf: the
//! storage a registry redirected a blob to, and the token service its `Bearer` challenge names.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::headers::Origin;

/// Whether an absolute `location` names a host that is neither the upstream nor regscope as the
/// client reached it: a redirect away from the registry (object storage, a CDN).
pub(crate) fn points_elsewhere(location: &str, upstream: &Origin<'_>, client: &Origin<'_>) -> bool {
    let Some((scheme, rest)) = location.split_once("://") else { return false };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let target = Origin { scheme, authority: &rest[..authority_end] };
    !target.authority.is_empty() && target.host_port() != upstream.host_port() && !target.same_as(client)
}

/// The request headers sent on to the storage a registry redirected to: what a fetch of a signed
/// URL needs (ranges, conditions, content negotiation) and nothing that could carry credentials
/// (`Authorization`, `Cookie`) or point elsewhere. `Host` is the storage's own.
pub(crate) fn storage_request_headers(from: &HeaderMap, host: &HeaderValue) -> HeaderMap {
    const PASSED: [HeaderName; 9] = [
        header::RANGE,
        header::IF_RANGE,
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
        header::ACCEPT,
        header::ACCEPT_ENCODING,
        header::USER_AGENT,
    ];
    let mut to = HeaderMap::with_capacity(PASSED.len() + 1);
    for name in PASSED {
        for value in from.get_all(&name) {
            to.append(name.clone(), value.clone());
        }
    }
    to.insert(header::HOST, host.clone());
    to
}

/// The request headers sent on to a registry's token service: those of the storage fetch, plus
/// the client's own `Authorization` (its credentials are for the token service) and what a
/// `POST` form needs.
pub(crate) fn auth_request_headers(from: &HeaderMap, host: &HeaderValue) -> HeaderMap {
    let mut to = storage_request_headers(from, host);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        for value in from.get_all(&name) {
            to.append(name.clone(), value.clone());
        }
    }
    to
}

/// The `realm` of a `Bearer` challenge (`Bearer realm="https://auth.example/token",service=…`),
/// as the byte range of the URL inside `challenge`.
pub(crate) fn bearer_realm(challenge: &str) -> Option<std::ops::Range<usize>> {
    let scheme = challenge.get(..7)?;
    if !scheme.eq_ignore_ascii_case("bearer ") {
        return None;
    }
    let lower = challenge.to_ascii_lowercase();
    let mut from = 7;
    while let Some(at) = lower[from..].find("realm=\"") {
        let start = from + at;
        let boundary = start == 7 || matches!(lower.as_bytes()[start - 1], b',' | b' ');
        let url_start = start + "realm=\"".len();
        let url_end = url_start + challenge[url_start..].find('"')?;
        if boundary {
            return Some(url_start..url_end);
        }
        from = url_end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_realm_of_a_bearer_challenge_is_found_and_nothing_else_is() {
        fn realm(c: &str) -> Option<&str> {
            bearer_realm(c).map(|r| &c[r])
        }
        let docker_hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#;
        assert_eq!(realm(docker_hub), Some("https://auth.docker.io/token"));
        assert_eq!(realm(r#"bearer service="s",realm="http://127.0.0.1:9/t""#), Some("http://127.0.0.1:9/t"));
        assert_eq!(realm(r#"Bearer xrealm="http://a/",realm="http://b/""#), Some("http://b/"));
        for none in [r#"Basic realm="registry""#, "Bearer", r#"Bearer realm="unterminated"#, ""] {
            assert_eq!(realm(none), None, "{none}");
        }
    }

    #[test]
    fn storage_gets_no_credentials_and_a_token_service_gets_the_clients() {
        let mut from = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("cookie", "session=1"),
            ("range", "bytes=10-"),
            ("x-forwarded-for", "10.0.0.1"),
            ("content-type", "application/x-www-form-urlencoded"),
        ] {
            from.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        let host = HeaderValue::from_static("storage.example:9000");
        let storage = storage_request_headers(&from, &host);
        let names: Vec<&str> = storage.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["range", "host"]);
        assert_eq!(storage[header::HOST], "storage.example:9000");
        let auth = auth_request_headers(&from, &host);
        assert_eq!(auth[header::AUTHORIZATION], "Basic dXNlcjpwYXNz");
        assert!(auth.get(header::COOKIE).is_none() && auth.get("x-forwarded-for").is_none());
    }

    #[test]
    fn only_a_location_on_another_host_points_elsewhere() {
        let upstream = Origin { scheme: "http", authority: "127.0.0.1:5000" };
        let client = Origin { scheme: "http", authority: "127.0.0.1:5001" };
        assert!(points_elsewhere("http://127.0.0.1:9000/bucket/blob?X-Amz-Signature=x", &upstream, &client));
        assert!(!points_elsewhere("http://127.0.0.1:5000/v2/x/blobs/uploads/u", &upstream, &client));
        assert!(!points_elsewhere("http://127.0.0.1:5001/_regscope/storage/ab", &upstream, &client));
        assert!(!points_elsewhere("/v2/x/blobs/uploads/u", &upstream, &client));
    }
}
