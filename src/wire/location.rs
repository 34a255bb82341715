//! `Location` rewriting: an absolute URL naming the registry becomes one naming regscope, so
//! uploads stay on the wire regscope watches.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
