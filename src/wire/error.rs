//! Errors, and how upstream failures are answered: like a registry would, so that `docker`
//! and `skopeo` print something a person can act on.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use crate::protocol::UpstreamErrorKind;
use crate::wire::paired::PairError;

/// Why the proxy could not produce the registry's answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("upstream {upstream} unreachable: {cause}")]
    Unreachable { upstream: String, kind: UpstreamErrorKind, cause: String },
    #[error("upstream {upstream} sent no response head within {after:?} of the request being forwarded")]
    ResponseTimeout { upstream: String, after: Duration },
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("method {0} is not supported: regscope is a registry proxy, not a forward proxy")]
    MethodNotAllowed(String),
    /// A redirect handle that regscope did not make, or that has expired.
    #[error("unknown or expired redirect")]
    UnknownRedirect,
    /// The client's own body broke off (closed, malformed, or silent past the stall timeout):
    /// the upstream request was aborted, and the registry is not to blame.
    #[error("the request body was cut off by the client ({0}); the registry received an aborted request")]
    ClientAborted(ClientFault),
}

/// How a client broke off its request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// It sent nothing for the stall timeout.
    Stalled,
    /// It closed the connection or sent a malformed body.
    Broken,
}

impl std::fmt::Display for ClientFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientFault::Stalled => "stalled",
            ClientFault::Broken => "closed or malformed",
        })
    }
}

/// Start-up failures: configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream {0:?} must be an http:// or https:// URL with a host")]
    UpstreamUrl(String),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("no {what} found in {path}")]
    EmptyPem { what: &'static str, path: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("OpenTelemetry export: {0}")]
    Otlp(String),
    #[error("binding {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("starting {threads} threads: {source}")]
    Threads { threads: usize, source: std::io::Error },
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unreachable { kind: UpstreamErrorKind::ConnectTimeout, .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnknownRedirect => StatusCode::NOT_FOUND,
            ProxyError::ClientAborted(ClientFault::Stalled) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientAborted(ClientFault::Broken) => StatusCode::BAD_REQUEST,
        }
    }

    /// The registry error code (distribution's vocabulary) for the JSON body.
    fn code(&self) -> &'static str {
        match self {
            ProxyError::Unreachable { .. } | ProxyError::ResponseTimeout { .. } => "UNAVAILABLE",
            ProxyError::BadRequest(_) => "UNSUPPORTED",
            ProxyError::MethodNotAllowed(_) => "UNSUPPORTED",
            ProxyError::UnknownRedirect => "BLOB_UNKNOWN",
            ProxyError::ClientAborted(_) => "UNKNOWN",
        }
    }

    pub(crate) fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::Unreachable { kind, .. } => Some(*kind),
            ProxyError::ResponseTimeout { .. } => Some(UpstreamErrorKind::ResponseTimeout),
            _ => None,
        }
    }

    /// A registry-style error response: `{"errors":[{"code":…,"message":…}]}`.
    pub(crate) fn to_response(&self) -> Response<Full<Bytes>> {
        let message = format!("regscope: {self}");
        let body = serde_json::json!({ "errors": [{ "code": self.code(), "message": message }] });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        headers.insert(crate::wire::headers::API_VERSION, header::HeaderValue::from_static("registry/2.0"));
        if matches!(self, ProxyError::BadRequest(_) | ProxyError::MethodNotAllowed(_)) {
            headers.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        response
    }
}

/// Whether a rustls error hides in `e`. rustls errors arrive wrapped in io::Errors (twice,
/// through hyper-rustls), and an io::Error's `source()` skips the error it wraps, so each
/// wrapper is opened explicitly.
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        Some(inner) => is_tls_failure(inner),
        None => false,
    }
}

/// Classifies a failure of the upstream client into a cause a person can act on.
pub(crate) fn classify_client_error(err: &hyper_util::client::legacy::Error) -> (UpstreamErrorKind, String) {
    use std::error::Error as _;
    classify_chain(err.source(), err.is_connect(), || err.to_string())
}

/// As [`classify_client_error`], for an exchange on a client connection's own upstream connection.
pub(crate) fn classify_pair_error(err: &PairError) -> (UpstreamErrorKind, String) {
    match err {
        PairError::Connect(error) => classify_chain(Some(&**error), true, || error.to_string()),
        PairError::Io(error) => classify_chain(Some(error), false, || error.to_string()),
        PairError::Protocol(error) => (UpstreamErrorKind::Other, error.to_string()),
    }
}

/// The kind of the first cause in the chain from `first` that names one, and every cause's text.
fn classify_chain(
    first: Option<&(dyn std::error::Error + 'static)>,
    is_connect: bool,
    fallback: impl FnOnce() -> String,
) -> (UpstreamErrorKind, String) {
    let mut cause = first;
    let mut text = String::new();
    let mut kind = None;
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = kind.or(match io.kind() {
                std::io::ErrorKind::ConnectionRefused => Some(UpstreamErrorKind::ConnectRefused),
                std::io::ErrorKind::TimedOut => Some(UpstreamErrorKind::ConnectTimeout),
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => Some(UpstreamErrorKind::Reset),
                _ => None,
            });
        }
        if is_tls_failure(e) {
            kind = Some(UpstreamErrorKind::Tls);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                kind = kind.or(Some(UpstreamErrorKind::Reset));
            }
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&e.to_string());
        cause = e.source();
    }
    if text.is_empty() {
        text = fallback();
    }
    let kind = kind.unwrap_or(if is_connect { UpstreamErrorKind::ConnectRefused } else { UpstreamErrorKind::Other });
    (kind, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_bodies_are_registry_shaped() {
        let e = ProxyError::Unreachable {
            upstream: "http://127.0.0.1:5000".into(),
            kind: UpstreamErrorKind::ConnectRefused,
            cause: "connection refused".into(),
        };
        let response = e.to_response();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");
        let message = json["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("http://127.0.0.1:5000") && message.contains("connection refused"), "{message}");
    }

    #[test]
    fn statuses() {
        let timeout = ProxyError::ResponseTimeout { upstream: "u".into(), after: Duration::from_secs(1) };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ProxyError::MethodNotAllowed("CONNECT".into()).status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(ProxyError::BadRequest("x").status(), StatusCode::BAD_REQUEST);
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use std::sync::Arc;

    /// A TLS server whose certificate the client does not trust: the failure is `tls`.
    #[tokio::test]
    async fn untrusted_certificate_is_a_tls_error() {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(stream).await;
        });
        let metrics = crate::metrics::Metrics::new(0);
        let client = crate::wire::upstream::probe_client::<http_body_util::Empty<bytes::Bytes>>(
            crate::wire::tls::client_config(None).unwrap(),
            Duration::from_secs(5),
            Duration::from_secs(5),
            &metrics,
        );
        let uri: http::Uri = format!("https://{addr}/v2/").parse().unwrap();
        let err = client.get(uri).await.unwrap_err();
        let (kind, cause) = classify_client_error(&err);
        assert_eq!(kind, UpstreamErrorKind::Tls, "{cause}");
    }
}
