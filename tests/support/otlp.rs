//! An OTLP/HTTP trace receiver, since no OpenTelemetry Collector is installable here: it accepts
//! `POST /v1/traces` (protobuf), decodes each body with the official definitions
//! (`opentelemetry-proto`), and keeps the spans, the raw bodies and the request heads. It can be
//! told to answer late or with an error, as a collector in trouble does.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::net::{head_header, read_request_head};

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    /// 200 with an empty `ExportTraceServiceResponse`.
    Ok,
    /// 200, but only after this long.
    Late(Duration),
    /// This status, at once.
    Status(u16),
}

/// A running receiver; its threads end with the test process.
pub struct Collector {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    answer: Option<Answer>,
    requests: Vec<Received>,
    tls: bool,
}

/// One export request as received.
#[derive(Clone)]
pub struct Received {
    /// Request head lines, lower-cased names: `("content-type", "application/x-protobuf")`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub decoded: ExportTraceServiceRequest,
}

impl Collector {
    pub fn start(answer: Answer) -> Collector {
        Collector::listen(answer, None)
    }

    /// A receiver speaking TLS with a fresh self-signed certificate for `localhost`, written as
    /// PEM to `ca_file` for the exporter to trust.
    pub fn start_tls(answer: Answer, ca_file: &std::path::Path) -> Collector {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(ca_file, cert.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Collector::listen(answer, Some(Arc::new(config)))
    }

    fn listen(answer: Answer, tls: Option<Arc<rustls::ServerConfig>>) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen { answer: Some(answer), requests: Vec::new(), tls: tls.is_some() }));
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (seen, tls) = (Arc::clone(&shared), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(stream, &seen),
                    Some(config) => {
                        let session = rustls::ServerConnection::new(config).unwrap();
                        serve(rustls::StreamOwned::new(session, stream), &seen)
                    }
                });
            }
        });
        Collector { addr, seen }
    }

    /// The base endpoint, as `--otlp-endpoint` takes it.
    pub fn endpoint(&self) -> String {
        if self.seen.lock().unwrap().tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.seen.lock().unwrap().requests.clone()
    }

    /// Every span received so far, with its resource's attributes.
    pub fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let mut out = Vec::new();
        for request in self.requests() {
            for resource_spans in request.decoded.resource_spans {
                let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
                for scope in resource_spans.scope_spans {
                    out.extend(scope.spans.into_iter().map(|s| (resource.clone(), s)));
                }
            }
        }
        out
    }
}

fn serve(stream: impl Read + Write, seen: &Mutex<Seen>) {
    let mut reader = BufReader::new(stream);
    while let Some((request_line, headers)) = read_request_head(&mut reader) {
        let length: usize = head_header(&headers, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let ok = request_line.starts_with("POST /v1/traces ");
        let decoded = ExportTraceServiceRequest::decode(body.as_slice());
        let answer = {
            let mut seen = seen.lock().unwrap();
            if let (true, Ok(decoded)) = (ok, decoded.clone()) {
                seen.requests.push(Received { headers, body, decoded });
            }
            seen.answer.unwrap_or(Answer::Ok)
        };
        let status = match (ok, decoded.is_ok(), answer) {
            (false, _, _) => 404,
            (_, false, _) => 400,
            (_, _, Answer::Status(code)) => code,
            (_, _, Answer::Late(delay)) => {
                std::thread::sleep(delay);
                200
            }
            (_, _, Answer::Ok) => 200,
        };
        let head = format!("HTTP/1.1 {status} X\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        if reader.get_mut().write_all(head.as_bytes()).and_then(|()| reader.get_mut().flush()).is_err() {
            return;
        }
    }
}

/// A span's attribute as text (strings as they are, numbers printed).
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
