//! Route classification: which registry operation a request is.
//!
//! A pure function of method, path and query. Paths are matched from the right, as
//! distribution's own router does, because repository names may contain `/` and may even
//! contain the words `blobs`, `manifests`, `uploads` or `tags` as components.

use http::Method;

use super::vocabulary::{Api, Operation};

/// A classified request: the operation plus the identifiers the path carries.
///
/// Borrowed from the request so classification allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub operation: Operation,
    /// Repository name (v2 `<name>`, v1 `<ns>/<repo>` or `<repo>`).
    pub repository: Option<&'a str>,
    /// Manifest tag or digest, v1 tag, or v1 image id.
    pub reference: Option<&'a str>,
    /// Blob digest (`sha256:…`), from the path or from `?digest=` / `?mount=`.
    pub digest: Option<&'a str>,
    /// v2 upload session id: the path component after `blobs/uploads/`.
    pub upload_id: Option<&'a str>,
}

impl<'a> Route<'a> {
    pub(crate) fn op(operation: Operation) -> Self {
        Route { operation, repository: None, reference: None, digest: None, upload_id: None }
    }

    fn with_repo(operation: Operation, repository: &'a str) -> Self {
        Route { repository: Some(repository), ..Route::op(operation) }
    }

    pub fn api(&self) -> Api {
        self.operation.api()
    }
}

/// Classifies a request. `path` is the raw (still percent-encoded) path, `query` the raw query.
pub fn classify<'a>(method: &Method, path: &'a str, query: Option<&'a str>) -> Route<'a> {
    if let Some(rest) = path.strip_prefix("/v2") {
        return classify_v2(method, rest, query);
    }
    if path == "/_ping" || path == "/v1/_ping" {
        return Route::op(if is_read(method) { Operation::V1Ping } else { Operation::Other });
    }
    if let Some(rest) = path.strip_prefix("/v1/") {
        return classify_v1(method, rest);
    }
    Route::op(Operation::Other)
}

/// `s` around its last `/`: `rsplit_once('/')`, searched byte by byte, which for paths this short
/// is cheaper than the `char` searcher (docs/performance.md).
fn split_last(s: &str) -> Option<(&str, &str)> {
    let at = s.bytes().rposition(|b| b == b'/')?;
    Some((&s[..at], &s[at + 1..]))
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn classify_v2<'a>(method: &Method, rest: &'a str, query: Option<&'a str>) -> Route<'a> {
    use Operation::*;
    if rest.is_empty() || rest == "/" {
        return Route::op(if is_read(method) { VersionCheck } else { Other });
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Route::op(Other);
    };
    if rest == "_catalog" {
        return Route::op(if is_read(method) { Catalog } else { Other });
    }

    // `<name>/tags/list`
    if let Some(name) = rest.strip_suffix("/tags/list").filter(|n| is_repository_name(n)) {
        let op = if is_read(method) { TagsList } else { Other };
        return Route::with_repo(op, name);
    }
    // `<name>/blobs/uploads/` or `<name>/blobs/uploads` (no `:` so it cannot be a digest).
    let start = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads"));
    if let Some(name) = start.filter(|n| is_repository_name(n)) {
        return classify_upload_start(method, name, query);
    }
    let Some((head, last)) = split_last(rest) else {
        return Route::op(Other);
    };
    let Some((name, kind)) = split_last(head) else {
        return Route::op(Other);
    };
    if last.is_empty() {
        return Route::op(Other);
    }
    if kind == "uploads" {
        if let Some(name) = name.strip_suffix("/blobs").filter(|n| is_repository_name(n)) {
            if last.contains(':') {
                return Route::op(Other);
            }
            let op = match *method {
                Method::PATCH => UploadChunk,
                Method::PUT => UploadFinish,
                Method::GET | Method::HEAD => UploadStatus,
                Method::DELETE => UploadCancel,
                _ => Other,
            };
            let digest = if op == UploadFinish { query_param(query, "digest") } else { None };
            return Route { upload_id: Some(last), digest, ..Route::with_repo(op, name) };
        }
    }
    if !is_repository_name(name) {
        return Route::op(Other);
    }
    match kind {
        "manifests" => {
            let op = match *method {
                Method::GET => ManifestGet,
                Method::HEAD => ManifestHead,
                Method::PUT => ManifestPut,
                Method::DELETE => ManifestDelete,
                _ => Other,
            };
            let digest = last.contains(':').then_some(last);
            Route { reference: Some(last), digest, ..Route::with_repo(op, name) }
        }
        "blobs" if last.contains(':') => {
            let op = match *method {
                Method::GET => BlobGet,
                Method::HEAD => BlobHead,
                Method::DELETE => BlobDelete,
                _ => Other,
            };
            Route { digest: Some(last), ..Route::with_repo(op, name) }
        }
        "referrers" if last.contains(':') => {
            let op = if is_read(method) { Referrers } else { Other };
            Route { digest: Some(last), ..Route::with_repo(op, name) }
        }
        _ => Route::op(Other),
    }
}

fn classify_upload_start<'a>(method: &Method, name: &'a str, query: Option<&'a str>) -> Route<'a> {
    use Operation::*;
    if method != Method::POST {
        return Route::with_repo(Other, name);
    }
    if let Some(mount) = query_param(query, "mount") {
        return Route { digest: Some(mount), ..Route::with_repo(BlobMount, name) };
    }
    if let Some(digest) = query_param(query, "digest") {
        return Route { digest: Some(digest), ..Route::with_repo(UploadStartMonolithic, name) };
    }
    Route::with_repo(UploadStart, name)
}

fn classify_v1<'a>(method: &Method, rest: &'a str) -> Route<'a> {
    use Operation::*;
    if rest == "search" || rest == "search/" {
        return Route::op(if is_read(method) { V1Search } else { Other });
    }
    if let Some(image) = rest.strip_prefix("images/") {
        let Some((id, what)) = image.split_once('/') else {
            return Route::op(Other);
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Route::op(Other);
        }
        let op = match (what, method) {
            ("json", &Method::GET | &Method::HEAD) => V1ImageJsonGet,
            ("json", &Method::PUT) => V1ImageJsonPut,
            ("layer", &Method::GET | &Method::HEAD) => V1LayerGet,
            ("layer", &Method::PUT) => V1LayerPut,
            ("checksum", &Method::PUT) => V1ChecksumPut,
            ("ancestry", &Method::GET | &Method::HEAD) => V1AncestryGet,
            _ => Other,
        };
        return Route { reference: Some(id), ..Route::op(op) };
    }
    let Some(repo_path) = rest.strip_prefix("repositories/") else {
        return Route::op(Other);
    };
    // `<repo>/tags/<tag>`: checked first so that a tag named `images` stays a tag.
    if let Some((head, tag)) = split_last(repo_path) {
        if let Some(repo) = head.strip_suffix("/tags").filter(|r| is_repository_name(r)) {
            if !tag.is_empty() {
                let op = match *method {
                    Method::GET | Method::HEAD => V1TagsGet,
                    Method::PUT => V1TagPut,
                    _ => Other,
                };
                return Route { reference: Some(tag), ..Route::with_repo(op, repo) };
            }
        }
    }
    if let Some(repo) = repo_path.strip_suffix("/tags").filter(|r| is_repository_name(r)) {
        let op = if is_read(method) { V1TagsGet } else { Other };
        return Route::with_repo(op, repo);
    }
    if let Some(repo) = repo_path.strip_suffix("/images").filter(|r| is_repository_name(r)) {
        let op = match *method {
            Method::GET | Method::HEAD => V1RepositoryImagesGet,
            Method::PUT => V1RepositoryImagesPut,
            _ => Other,
        };
        return Route::with_repo(op, repo);
    }
    let repo = repo_path.strip_suffix('/').unwrap_or(repo_path);
    if is_repository_name(repo) {
        let op = if method == Method::PUT { V1RepositoryPut } else { Other };
        return Route::with_repo(op, repo);
    }
    Route::op(Other)
}

/// The value of the first `key=` parameter in a raw query string.
pub(crate) fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key && !v.is_empty()).then_some(v)
    })
}

/// Decodes `%XX` escapes (query values arrive encoded: `digest=sha256%3Aabc…`). Invalid
/// escapes are kept as they are.
pub fn percent_decode(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('%') {
        return text.into();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

/// The OCI repository name grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn is_repository_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_name_component)
}

fn is_name_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Separators: one `.`, one or two `_`, or any run of `-`; never mixed.
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            i += 1;
            continue;
        }
        let run_end = bytes[i..].iter().position(|&c| c != b).map_or(bytes.len(), |p| i + p);
        let run = run_end - i;
        let ok = match b {
            b'.' => run == 1,
            b'_' => run <= 2,
            b'-' => true,
            _ => false,
        };
        // A separator run must be followed by an alphanumeric, not another separator kind.
        if !ok || !alnum(bytes[run_end]) {
            return false;
        }
        i = run_end;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn split(target: &str) -> (&str, Option<&str>) {
        match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        }
    }

    fn check(method: &str, target: &str, op: Operation, repo: Option<&str>) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (path, query) = split(target);
        let route = classify(&method, path, query);
        assert_eq!(route.operation, op, "{method} {target}");
        assert_eq!(route.repository, repo, "{method} {target}");
    }

    #[test]
    fn v2_endpoints() {
        let d = D;
        let cases: &[(&str, String, Operation, Option<&str>)] = &[
            ("GET", "/v2/".into(), VersionCheck, None),
            ("GET", "/v2".into(), VersionCheck, None),
            ("HEAD", "/v2/".into(), VersionCheck, None),
            ("GET", "/v2/library/alpine/manifests/latest".into(), ManifestGet, Some("library/alpine")),
            ("HEAD", format!("/v2/a/manifests/{d}"), ManifestHead, Some("a")),
            ("PUT", "/v2/a/b/c/manifests/v1.0".into(), ManifestPut, Some("a/b/c")),
            ("PUT", "/v2/a/manifests/v1?tag=x&tag=y".into(), ManifestPut, Some("a")),
            ("DELETE", format!("/v2/a/manifests/{d}"), ManifestDelete, Some("a")),
            ("GET", format!("/v2/a/blobs/{d}"), BlobGet, Some("a")),
            ("HEAD", format!("/v2/a/b/blobs/{d}"), BlobHead, Some("a/b")),
            ("DELETE", format!("/v2/a/blobs/{d}"), BlobDelete, Some("a")),
            ("POST", "/v2/a/blobs/uploads/".into(), UploadStart, Some("a")),
            ("POST", "/v2/a/blobs/uploads".into(), UploadStart, Some("a")),
            ("POST", format!("/v2/a/blobs/uploads/?digest={d}"), UploadStartMonolithic, Some("a")),
            ("POST", format!("/v2/a/blobs/uploads/?mount={d}&from=b"), BlobMount, Some("a")),
            ("PATCH", "/v2/a/blobs/uploads/6f1c-uuid?_state=abc".into(), UploadChunk, Some("a")),
            ("PUT", format!("/v2/a/blobs/uploads/6f1c-uuid?_state=x&digest={d}"), UploadFinish, Some("a")),
            ("GET", "/v2/a/blobs/uploads/6f1c-uuid".into(), UploadStatus, Some("a")),
            ("DELETE", "/v2/a/blobs/uploads/6f1c-uuid?_state=x".into(), UploadCancel, Some("a")),
            ("GET", "/v2/a/tags/list".into(), TagsList, Some("a")),
            ("GET", "/v2/a/tags/list?n=10&last=b".into(), TagsList, Some("a")),
            ("GET", format!("/v2/a/referrers/{d}?artifactType=x"), Referrers, Some("a")),
            ("GET", "/v2/_catalog?n=100".into(), Catalog, None),
        ];
        for (m, t, op, repo) in cases {
            check(m, t, *op, *repo);
        }
    }

    #[test]
    fn names_containing_route_words() {
        let d = D;
        let cases: &[(&str, String, Operation, Option<&str>)] = &[
            // Pinned by distribution's own router tests.
            ("GET", "/v2/foo/bar/manifests/manifests/tags".into(), ManifestGet, Some("foo/bar/manifests")),
            ("GET", "/v2/foo/bar/manifests/tags/list".into(), TagsList, Some("foo/bar/manifests")),
            ("GET", format!("/v2/blobs/blobs/{d}"), BlobGet, Some("blobs")),
            ("GET", format!("/v2/x/blobs/uploads/blobs/{d}"), BlobGet, Some("x/blobs/uploads")),
            ("POST", "/v2/x/blobs/blobs/uploads/".into(), UploadStart, Some("x/blobs")),
            ("PATCH", "/v2/uploads/blobs/uploads/u-1".into(), UploadChunk, Some("uploads")),
            ("GET", "/v2/tags/tags/list".into(), TagsList, Some("tags")),
            ("GET", "/v2/a/tags/manifests/list".into(), ManifestGet, Some("a/tags")),
            ("GET", "/v2/manifests/manifests/latest".into(), ManifestGet, Some("manifests")),
        ];
        for (m, t, op, repo) in cases {
            check(m, t, *op, *repo);
        }
    }

    #[test]
    fn identifiers_are_extracted() {
        let target = format!("/v2/a/b/blobs/uploads/u-42?_state=s&digest={D}");
        let (path, query) = split(&target);
        let r = classify(&Method::PUT, path, query);
        assert_eq!((r.upload_id, r.digest), (Some("u-42"), Some(D)));

        let r = classify(&Method::GET, "/v2/a/manifests/latest", None);
        assert_eq!((r.reference, r.digest), (Some("latest"), None));

        let target = format!("/v2/a/blobs/uploads/?mount={D}&from=other");
        let (path, query) = split(&target);
        assert_eq!(classify(&Method::POST, path, query).digest, Some(D));
    }

    #[test]
    fn not_registry_shaped() {
        let cases: &[(&str, &str)] = &[
            ("GET", "/"),
            ("GET", "/favicon.ico"),
            ("GET", "/v2x/"),
            ("GET", "/v2/a/blobs/notadigest"),
            ("GET", "/v2/A/manifests/latest"),
            ("GET", "/v2/a//b/manifests/latest"),
            ("GET", "/v2/a/manifests/"),
            ("GET", "/v2/../etc/manifests/x"),
            ("GET", "/v2/a%2fb/manifests/x"),
            ("POST", "/v2/a/manifests/latest"),
            ("PATCH", "/v2/a/blobs/uploads/"),
            ("GET", "/v2/a/blobs/uploads/sha256:abc"),
            ("PUT", "/v2/"),
            ("GET", "/v1/images//json"),
            ("GET", "/v1/repositories/"),
        ];
        for (m, t) in cases {
            let r = classify(&Method::from_bytes(m.as_bytes()).unwrap(), t, None);
            assert_eq!(r.operation, Other, "{m} {t}");
        }
    }

    /// Every request line of the seed's v1 push and pull (SEED.md), in order.
    #[test]
    fn seed_push_and_pull() {
        let parent = "511136ea3c5a64f264b78b5433614aec563103b4d4702f3ba7d4d2698e22c158";
        let top = "9cc2ad81d40d54dcae7fa5e8e17d9c34e8bba3b7c2cbd4fc3d1e36f3d2d47a11";
        let push: Vec<(&str, String, Operation)> = vec![
            ("GET", "/v2/".into(), VersionCheck),
            ("GET", "/v1/_ping".into(), V1Ping),
            ("PUT", "/v1/repositories/bigtest2/".into(), V1RepositoryPut),
            ("GET", format!("/v1/images/{parent}/json"), V1ImageJsonGet),
            ("GET", format!("/v1/images/{top}/json"), V1ImageJsonGet),
            ("PUT", format!("/v1/images/{parent}/json"), V1ImageJsonPut),
            ("PUT", format!("/v1/images/{parent}/layer"), V1LayerPut),
            ("PUT", format!("/v1/images/{parent}/checksum"), V1ChecksumPut),
            ("PUT", format!("/v1/images/{top}/json"), V1ImageJsonPut),
            ("PUT", format!("/v1/images/{top}/layer"), V1LayerPut),
            ("PUT", format!("/v1/images/{top}/checksum"), V1ChecksumPut),
            ("PUT", "/v1/repositories/bigtest2/tags/latest".into(), V1TagPut),
            ("PUT", "/v1/repositories/bigtest2/images".into(), V1RepositoryImagesPut),
        ];
        let pull: Vec<(&str, String, Operation)> = vec![
            ("GET", "/v2/".into(), VersionCheck),
            ("GET", "/v1/_ping".into(), V1Ping),
            ("GET", "/v1/repositories/bigtest2/images".into(), V1RepositoryImagesGet),
            ("GET", "/v1/repositories/library/bigtest2/tags".into(), V1TagsGet),
            ("GET", format!("/v1/images/{top}/ancestry"), V1AncestryGet),
            ("GET", format!("/v1/images/{parent}/json"), V1ImageJsonGet),
            ("GET", format!("/v1/images/{parent}/layer"), V1LayerGet),
            ("GET", format!("/v1/images/{top}/json"), V1ImageJsonGet),
            ("GET", format!("/v1/images/{top}/layer"), V1LayerGet),
        ];
        for (m, t, op) in push.iter().chain(pull.iter()) {
            let method = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(classify(&method, t, None).operation, *op, "{m} {t}");
        }
        let r = classify(&Method::GET, "/v1/repositories/library/bigtest2/tags", None);
        assert_eq!(r.repository, Some("library/bigtest2"));
        let r = classify(&Method::PUT, &push[6].1, None);
        assert_eq!(r.reference, Some(parent));
    }

    #[test]
    fn v1_other_endpoints() {
        let cases: &[(&str, &str, Operation, Option<&str>)] = &[
            ("GET", "/_ping", V1Ping, None),
            ("GET", "/v1/search?q=busybox", V1Search, None),
            ("GET", "/v1/repositories/ns/repo/tags/latest", V1TagsGet, Some("ns/repo")),
            ("GET", "/v1/repositories/ns/repo/tags/images", V1TagsGet, Some("ns/repo")),
            ("PUT", "/v1/repositories/ns/images/tags/v2", V1TagPut, Some("ns/images")),
            ("GET", "/v1/repositories/ns/repo/images", V1RepositoryImagesGet, Some("ns/repo")),
            ("PUT", "/v1/repositories/ns/repo/", V1RepositoryPut, Some("ns/repo")),
            ("DELETE", "/v1/repositories/ns/repo/", Other, Some("ns/repo")),
            ("PUT", "/v1/images/abc/ancestry", Other, None),
        ];
        for (m, t, op, repo) in cases {
            let (path, query) = split(t);
            let r = classify(&Method::from_bytes(m.as_bytes()).unwrap(), path, query);
            assert_eq!((r.operation, r.repository), (*op, *repo), "{m} {t}");
        }
    }

    #[test]
    fn percent_decoding() {
        let cases: &[(&str, &str)] = &[
            ("sha256%3Aabc", "sha256:abc"),
            ("sha256:abc", "sha256:abc"),
            ("a%2Fb%2f", "a/b/"),
            ("bad%zz%", "bad%zz%"),
            ("%ff", "\u{fffd}"),
        ];
        for (input, want) in cases {
            assert_eq!(percent_decode(input), *want, "{input}");
        }
    }

    #[test]
    fn name_grammar() {
        let longest = "a".repeat(255);
        for ok in
            ["a", "a0", "a.b", "a_b", "a__b", "a---b", "a/b/c", "library/ubuntu", "x-1.y_z", "a_b-c.d/e__f", &longest]
        {
            assert!(is_repository_name(ok), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in ["", "A", "a.", ".a", "a..b", "a___b", "a/", "/a", "a//b", "a._b", "a b", "..", "a%2fb"]
            .into_iter()
            .chain(["a-", "a_", "a-_b", "a_-b", "a-/b", "a_/b", "a/-b", "a/.b", &long])
        {
            assert!(!is_repository_name(bad), "{bad}");
        }
    }
}
