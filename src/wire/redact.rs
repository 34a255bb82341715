//! Redaction: what of a request's path and query may reach a log.

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
