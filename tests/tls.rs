//! TLS on both sides of regscope: clients reach it over HTTPS (HTTP/1.1 and h2 by ALPN), and it
//! reaches an HTTPS registry, trusting a private CA only when told to.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use support::client::{digest_of, start_upload, target_at, tls_connect, with_digest, Conn};
use support::{metric_sum, Registry, RegistryOptions, Regscope, TempDir};

/// A private CA and one server certificate it signed, for `localhost` and `127.0.0.1`, as PEM files.
struct Pki {
    ca_der: CertificateDer<'static>,
    ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
    /// Holds the PEM files.
    _dir: TempDir,
}

impl Pki {
    fn generate() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "regscope test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

        let dir = TempDir::new("tls-pki");
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Pki {
            ca_der: ca.der().clone(),
            ca_pem: write("ca.pem", ca.pem()),
            cert_pem: write("server.pem", cert.pem()),
            key_pem: write("server-key.pem", key.serialize_pem()),
            _dir: dir,
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        roots
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// A small blob's worth of bytes, different per `seed`.
fn small_blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

/// POST, PATCH, PUT ?digest= and GET of one blob over `conn`, following the `Location`s, which
/// must all point at `origin`.
fn upload_and_download<S: std::io::Read + std::io::Write>(
    conn: &mut Conn<S>,
    host: &str,
    origin: &str,
    repo: &str,
    blob: &[u8],
) {
    let digest = digest_of(blob);
    let location = start_upload(conn, host, repo);
    let patch_target = target_at(&location, origin);
    let patched = conn
        .request("PATCH", &patch_target, &[("Host", host), ("Content-Type", "application/octet-stream")], blob)
        .unwrap();
    assert_eq!(patched.status(), 202, "PATCH: {:?} {}", patched.head, patched.text());
    let location = patched.header("location").expect("PATCH without Location");
    let put_target = with_digest(&target_at(location, origin), &digest);
    let put = conn.request("PUT", &put_target, &[("Host", host)], b"").unwrap();
    assert_eq!(put.status(), 201, "PUT: {:?} {}", put.head, put.text());
    assert_eq!(put.header("docker-content-digest"), Some(digest.as_str()));

    let got = conn.request("GET", &format!("/v2/{repo}/blobs/{digest}"), &[("Host", host)], b"").unwrap();
    assert_eq!(got.status(), 200, "GET blob: {:?}", got.head);
    assert!(
        got.body == blob,
        "GET blob returned {} bytes that differ from the {} uploaded",
        got.body.len(),
        blob.len()
    );
}

#[test]
fn clients_reach_regscope_over_tls_with_http1_and_h2() {
    let pki = Pki::generate();
    let registry = Registry::start();
    let regscope = Regscope::start(&[
        "--upstream",
        &registry.url(),
        "--tls-cert",
        path(&pki.cert_pem),
        "--tls-key",
        path(&pki.key_pem),
    ]);
    let port = regscope.proxy_addr().port();

    // HTTP/1.1, by name.
    let stream = tls_connect(regscope.proxy_addr(), "localhost", pki.roots(), &[b"http/1.1"]);
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN");
    let mut conn = Conn::new(stream);
    let host = format!("localhost:{port}");
    let ping = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    assert_eq!(ping.status(), 200, "GET /v2/ over TLS: {:?} {}", ping.head, ping.text());
    assert_eq!(ping.header("docker-distribution-api-version"), Some("registry/2.0"));
    assert_eq!(ping.json(), serde_json::json!({}));
    upload_and_download(&mut conn, &host, &format!("https://{host}"), "regscope-test/tls-h1", &small_blob(1, 300_000));

    // h2, by address.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(h2_exchange(regscope.proxy_addr(), pki.roots()));

    // Both went through the registry: 1 ping + 4 blob requests per protocol.
    let served = registry.served_requests_once(|served| served.len() >= 10);
    assert!(served.len() >= 10, "the registry served only {served:#?}");
}

/// `GET /v2/` and a blob upload and download over h2.
async fn h2_exchange(proxy: SocketAddr, roots: rustls::RootCertStore) {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN must pick h2 when offered first");

    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let origin = format!("https://{proxy}");

    let mut send = |method: &str, uri: String, body: Vec<u8>| {
        let request = http::Request::builder().method(method).uri(uri).body(Full::new(Bytes::from(body))).unwrap();
        let response = sender.send_request(request);
        async move {
            let response = response.await.unwrap();
            assert_eq!(response.version(), http::Version::HTTP_2);
            let (parts, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts, body)
        }
    };

    let (ping, body) = send("GET", format!("{origin}/v2/"), Vec::new()).await;
    assert_eq!(ping.status, 200, "GET /v2/ over h2: {ping:?}");
    assert_eq!(&body[..], b"{}");

    let repo = "regscope-test/tls-h2";
    let blob = small_blob(2, 200_000);
    let digest = digest_of(&blob);
    let (started, _) = send("POST", format!("{origin}/v2/{repo}/blobs/uploads/"), Vec::new()).await;
    assert_eq!(started.status, 202, "POST over h2: {started:?}");
    let location = started.headers["location"].to_str().unwrap().to_string();
    target_at(&location, &origin);
    let (patched, _) = send("PATCH", location, blob.clone()).await;
    assert_eq!(patched.status, 202, "PATCH over h2: {patched:?}");
    let location = patched.headers["location"].to_str().unwrap().to_string();
    target_at(&location, &origin);
    let (put, body) = send("PUT", with_digest(&location, &digest), Vec::new()).await;
    assert_eq!(put.status, 201, "PUT over h2: {put:?} {body:?}");
    let (got, body) = send("GET", format!("{origin}/v2/{repo}/blobs/{digest}"), Vec::new()).await;
    assert_eq!(got.status, 200, "GET blob over h2: {got:?}");
    assert!(body[..] == blob[..], "GET blob over h2 returned different bytes ({} of {})", body.len(), blob.len());
}

/// The https registry case runs with both `--host-header` modes: the registry builds upload
/// `Location`s from the `Host` (or `:authority`, when the upstream connection is h2) it sees, and
/// both must come back pointing at regscope.
#[test]
fn blobs_go_through_regscope_to_an_https_registry_preserving_the_host() {
    blob_round_trip_via_https_registry("preserve");
}

#[test]
fn blobs_go_through_regscope_to_an_https_registry_sending_the_upstream_host() {
    blob_round_trip_via_https_registry("upstream");
}

fn blob_round_trip_via_https_registry(host_header: &str) {
    let pki = Pki::generate();
    let registry = Registry::start_with(RegistryOptions {
        tls: Some((pki.cert_pem.clone(), pki.key_pem.clone())),
        ..Default::default()
    });
    let upstream = registry.url();
    assert!(upstream.starts_with("https://"), "{upstream}");
    let regscope =
        Regscope::start(&["--upstream", &upstream, "--upstream-ca", path(&pki.ca_pem), "--host-header", host_header]);
    let proxy = regscope.proxy_addr();
    let host = proxy.to_string();
    let connects = || metric_sum(&regscope.metrics_text(), "regscope_upstream_connect_seconds_count", &[]);
    let before = connects();
    let mut conn = Conn::connect(proxy);
    let ping = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
    assert_eq!(ping.status(), 200, "GET /v2/ via an https upstream: {:?} {}", ping.head, ping.text());
    let repo = format!("regscope-test/https-upstream-{host_header}");
    upload_and_download(&mut conn, &host, &format!("http://{host}"), &repo, &small_blob(3, 1 << 20));
    let served = registry.served_requests_once(|served| served.len() >= 5);
    assert_eq!(served.len(), 5, "ping, POST, PATCH, PUT, GET: {served:#?}");
    // Over TLS every exchange takes the pool: no handshake for a connection of the client's own.
    assert_eq!(connects() - before, 1.0, "one pooled connection to the https registry");
}

#[test]
fn an_https_registry_signed_by_an_untrusted_ca_is_a_502_with_a_registry_error() {
    let pki = Pki::generate();
    let registry = Registry::start_with(RegistryOptions {
        tls: Some((pki.cert_pem.clone(), pki.key_pem.clone())),
        ..Default::default()
    });
    let upstream = registry.url();
    // No --upstream-ca: only the system roots, which never signed this certificate.
    let regscope = Regscope::start(&["--upstream", &upstream]);
    let host = regscope.proxy_addr().to_string();
    let mut conn = Conn::connect(regscope.proxy_addr());
    for (method, target) in
        [("GET", "/v2/".to_string()), ("POST", "/v2/regscope-test/untrusted/blobs/uploads/".to_string())]
    {
        let refused = conn.request(method, &target, &[("Host", &host)], b"").unwrap();
        assert_eq!(
            refused.status(),
            502,
            "{method} {target} via an untrusted upstream: {:?} {}",
            refused.head,
            refused.text()
        );
        assert_eq!(refused.header("content-type"), Some("application/json"));
        let json = refused.json();
        assert_eq!(json["errors"][0]["code"], "UNAVAILABLE", "{json}");
        let message = json["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&upstream), "the message names the upstream: {message}");
        assert!(message.to_ascii_lowercase().contains("certificate"), "the message names the cause: {message}");
    }
    let metrics = regscope.metrics_text();
    let tls_errors = metric_sum(&metrics, "regscope_upstream_errors_total", &[("kind", "tls")]);
    assert_eq!(tls_errors, 2.0, "regscope_upstream_errors_total{{kind=\"tls\"}}:\n{metrics}");
    assert!(
        registry.served_requests().is_empty(),
        "a refused handshake serves nothing: {:#?}",
        registry.served_requests()
    );
}
