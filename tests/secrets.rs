//! Nobody's secrets leak: with a registry that wants HTTP Basic auth (htpasswd, no token server),
//! a real `docker login` + `docker push` and a `skopeo copy --dest-creds` go through regscope,
//! carrying the password on every request; then nothing regscope writes or serves (its log at
//! debug level, /metrics, the transfers API, the UI pages, `regscope report`) holds the password,
//! the base64 credential, any other Authorization or Cookie value, or the `_state` upload tokens
//! the registry handed out.

mod support;

use support::otlp::{Answer, Collector};

use std::process::Command;
use std::time::Duration;

use support::hostile::raw_exchange;
use support::{
    check, docker, eventually, http_get, output, skopeo, LoggedRequest, Registry, RegistryOptions, Regscope, TempDir,
    TestImage,
};

const USER: &str = "regscope-user";
const PASSWORD: &str = "Pw-9c41e7d2-do-not-log";
const WRONG_PASSWORD: &str = "Wrong-3b8f0a61-do-not-log";
const BEARER: &str = "eyJhbGciOiJub25lIn0.bearer-5e2d7c19-do-not-log";
const COOKIE: &str = "session-8a7b6c5d-do-not-log";
const QUERY_TOKEN: &str = "qtoken-1f2e3d4c-do-not-log";

/// RFC 4648 base64 with padding, for `user:password` as a Basic credential carries it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| u8::from_str_radix(&text[i + 1..i + 3], 16).ok())
            .flatten();
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every `_state` value in the registry's log (its access log lines carry each request's query):
/// the signed upload state it handed out in `Location`s and got back.
fn state_tokens(registry_log: &str) -> Vec<String> {
    let mut tokens: Vec<String> = registry_log
        .match_indices("_state=")
        .map(|(i, _)| {
            let rest = &registry_log[i + "_state=".len()..];
            let end = rest.find(|c: char| c == '&' || c == '"' || c == ' ' || c.is_whitespace()).unwrap_or(rest.len());
            rest[..end].to_string()
        })
        .filter(|t| t.len() >= 16)
        .collect();
    tokens.sort();
    tokens.dedup();
    tokens
}

#[test]
fn credentials_and_upload_tokens_never_appear_in_anything_regscope_writes_or_serves() {
    let work = TempDir::new("secrets");
    let htpasswd = work.path().join("htpasswd");
    let hash = bcrypt::hash_with_result(PASSWORD, 5).unwrap().format_for_version(bcrypt::Version::TwoY);
    std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
    let registry = Registry::start_with(RegistryOptions { htpasswd: Some(htpasswd), ..Default::default() });
    // Debug level: what an operator turns on when something goes wrong must not leak either.
    std::env::set_var("RUST_LOG", "debug");
    // Traces are on too: what goes to a collector must not leak either.
    let collector = Collector::start(Answer::Ok);
    let regscope = Regscope::start_env(
        &["--upstream", &registry.url(), "--otlp-endpoint", &collector.endpoint()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    std::env::remove_var("RUST_LOG");
    let proxy = regscope.proxy_addr();
    let admin = regscope.admin_addr();

    // The registry really wants the password: without it, 401 with a Basic challenge.
    let anonymous = raw_exchange(
        proxy,
        format!("GET /v2/ HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    );
    assert_eq!(anonymous.status, Some(401), "{}", anonymous.text());
    assert!(anonymous.text().to_ascii_lowercase().contains("www-authenticate: basic"), "{}", anonymous.text());

    // docker: a failed login, a login, a push. Credentials live in a private client config.
    let docker = docker();
    let docker_config = work.path().join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let docker_cmd = |args: &[&str]| {
        let mut cmd = docker.command();
        cmd.env("DOCKER_CONFIG", &docker_config).args(args);
        cmd
    };
    let server = proxy.to_string();
    let failed =
        output(&mut docker_cmd(&["login", "-u", USER, "-p", WRONG_PASSWORD, &server]), Duration::from_secs(120));
    assert!(!failed.status.success(), "docker login with a wrong password succeeded");
    check(&mut docker_cmd(&["login", "-u", USER, "-p", PASSWORD, &server]), Duration::from_secs(120));
    let reference = format!("{proxy}/regscope-test/secrets:v1");
    let image = TestImage::build(&reference, &[512 << 10, 64 << 10]);
    docker.load(&image);
    check(&mut docker_cmd(&["push", &reference]), Duration::from_secs(300));
    let _ = docker.try_run(&["rmi", &reference]);

    // skopeo with --dest-creds (no auth file involved).
    let skopeo_image = TestImage::build("regscope-test/secrets-skopeo:v1", &[256 << 10]);
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--dest-creds",
        &format!("{USER}:{PASSWORD}"),
        &skopeo_image.skopeo_source(),
        &format!("docker://{proxy}/regscope-test/secrets-skopeo:v1"),
    ]);

    // Other secrets a client may send: a bearer token, a cookie, a proxy credential, a token in
    // the query. They are forwarded (the registry answers 401 to the bearer) but never recorded.
    let other = raw_exchange(
        proxy,
        format!(
            "GET /v2/regscope-test/secrets/tags/list?access_token={QUERY_TOKEN} HTTP/1.1\r\nHost: {proxy}\r\n\
             Authorization: Bearer {BEARER}\r\nCookie: sid={COOKIE}\r\n\
             Proxy-Authorization: Basic {}\r\nConnection: close\r\n\r\n",
            base64(format!("{USER}:{WRONG_PASSWORD}").as_bytes())
        )
        .as_bytes(),
        Duration::from_secs(10),
    );
    assert_eq!(other.status, Some(401), "{}", other.text());

    // Both pushes reached the registry through regscope, with the credential.
    let manifest_put = |r: &&LoggedRequest| r.method == "PUT" && r.path.contains("/manifests/");
    let served = registry.served_requests_once(|served| served.iter().filter(manifest_put).count() >= 2);
    let manifests: Vec<_> = served.iter().filter(manifest_put).collect();
    assert_eq!(manifests.len(), 2, "two manifest PUTs: {served:?}");
    assert!(manifests.iter().all(|r| r.status == 201), "{manifests:?}");
    let tokens = state_tokens(&registry.log_text());
    assert!(tokens.len() >= 4, "the registry handed out upload _state tokens; found {tokens:?}");

    // Everything regscope writes or serves.
    let mut outputs: Vec<(String, String)> = vec![
        ("stderr log".into(), regscope.log_lines().join("\n")),
        ("/metrics".into(), regscope.metrics_text()),
        ("/api/v1/transfers".into(), http_get(admin, "/api/v1/transfers").text()),
        ("/api/v1/live".into(), http_get(admin, "/api/v1/live").text()),
        ("/".into(), http_get(admin, "/").text()),
    ];
    let transfers: serde_json::Value = serde_json::from_str(&outputs[2].1).unwrap();
    let ids: Vec<u64> = transfers["transfers"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert!(ids.len() >= 2, "both pushes are transfers: {}", outputs[2].1);
    for id in &ids {
        for page in [format!("/transfers/{id}"), format!("/transfers/{id}.svg"), format!("/api/v1/transfers/{id}")] {
            let response = http_get(admin, &page);
            assert_eq!(response.status, 200, "{page}");
            outputs.push((page, response.text()));
        }
    }
    let exported = eventually(Duration::from_secs(20), || {
        collector.spans().iter().filter(|(_, s)| s.parent_span_id.is_empty()).count() >= ids.len()
    });
    assert!(exported, "every transfer reached the collector");
    let bodies: Vec<u8> = collector.requests().into_iter().flat_map(|r| r.body).collect();
    let spans: Vec<String> = collector.spans().iter().map(|(_, s)| format!("{s:?}")).collect();
    outputs.push(("OTLP export (raw protobuf)".into(), String::from_utf8_lossy(&bodies).into_owned()));
    outputs.push(("OTLP export (decoded spans)".into(), spans.join("\n")));
    let report = check(
        Command::new(env!("CARGO_BIN_EXE_regscope")).args([
            "report",
            "--admin",
            &format!("http://{admin}"),
            "--last",
            "10",
        ]),
        Duration::from_secs(30),
    );
    outputs.push(("regscope report".into(), report));

    // A positive control: the outputs do name what they should, so a search in them means something.
    assert!(outputs[2].1.contains("regscope-test/secrets"), "the transfers API names the repository");
    assert!(outputs[0].1.contains("upload_finish"), "the log holds the upload requests");

    let mut secrets: Vec<(String, String)> = vec![
        ("password".into(), PASSWORD.into()),
        ("wrong password".into(), WRONG_PASSWORD.into()),
        ("Basic credential".into(), base64(format!("{USER}:{PASSWORD}").as_bytes())),
        ("wrong Basic credential".into(), base64(format!("{USER}:{WRONG_PASSWORD}").as_bytes())),
        ("bearer token".into(), BEARER.into()),
        ("cookie".into(), COOKIE.into()),
        ("query token".into(), QUERY_TOKEN.into()),
        ("bcrypt hash".into(), hash.clone()),
    ];
    for token in &tokens {
        secrets.push(("_state".into(), token.clone()));
        secrets.push(("_state (decoded)".into(), percent_decode(token)));
        // The part before the first encoded character: a token logged half-decoded still leaks.
        secrets.push(("_state (prefix)".into(), token.chars().take(24).collect()));
    }
    let mut leaks = Vec::new();
    for (where_, text) in &outputs {
        for (what, secret) in &secrets {
            if text.contains(secret.as_str()) {
                leaks.push(format!("{what} {secret:?} in {where_}"));
            }
        }
        let lower = text.to_ascii_lowercase();
        for header in ["authorization: ", "\"authorization\":\"", "cookie: ", "\"cookie\":\""] {
            if lower.contains(header) {
                leaks.push(format!("a header value {header:?} in {where_}"));
            }
        }
    }
    eprintln!(
        "searched {} outputs ({} bytes) for {} secrets, {} of them _state tokens",
        outputs.len(),
        outputs.iter().map(|(_, t)| t.len()).sum::<usize>(),
        secrets.len(),
        tokens.len()
    );
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
