//! A registry-shaped origin that moves bytes as fast as it can, for `script/bench`.
//!
//! It stores nothing: blob GETs stream bytes from one static buffer, uploads are read and
//! dropped. What is left of a transfer's cost is the client's and the proxy's.
//!
//! - `GET|HEAD /v2/<name>/blobs/<digest>`: `--blob-bytes` bytes with `Content-Length`. When the
//!   last component of `<name>` is a number, that many bytes instead (`/v2/bench/4194304/blobs/…`).
//! - `POST /v2/<name>/blobs/uploads/` → 202 + `Location`; `PATCH <Location>` swallows the body
//!   → 202; `PUT <Location>?digest=<d>` swallows the body → 201.
//! - `GET|HEAD /v2/<name>/manifests/<ref>`: one small fixed schema2 manifest.
//! - `GET /v2/` → 200 `{}`.
//!
//! `cargo build --release --example bench_origin`, then
//! `target/release/examples/bench_origin --listen 127.0.0.1:5100`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::Parser;
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5100")]
    listen: SocketAddr,
    /// Size of a blob GET when the repository name does not say.
    #[arg(long, default_value_t = 4 << 20)]
    blob_bytes: u64,
    /// Size of each body frame handed to hyper for blob GETs.
    #[arg(long, default_value_t = 1 << 20)]
    frame_bytes: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// The bytes every blob GET is cut from: allocated once, never copied.
static BUFFER: OnceLock<&'static [u8]> = OnceLock::new();
/// The manifest and its digest, built once.
static MANIFEST: OnceLock<(Bytes, String)> = OnceLock::new();
/// Upload ids: unique for the life of the process is enough.
static NEXT_UPLOAD: AtomicU64 = AtomicU64::new(1);

const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut buffer = vec![0u8; args.frame_bytes.max(1)];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in buffer.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    BUFFER.set(Vec::leak(buffer)).expect("set once");
    let manifest = Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":2,"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":4194304,"digest":"sha256:8a39d2abd3999ab73c34db2476849cddf303ce389b35826850f9a700589b4a90"}]}"#,
    );
    let digest = format!("sha256:{:x}", Sha256::digest(&manifest));
    MANIFEST.set((manifest, digest)).expect("set once");

    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    println!("bench_origin listening on {}", listener.local_addr()?);
    let blob_bytes = args.blob_bytes;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, blob_bytes));
            let _ = hyper::server::conn::http1::Builder::new()
                .max_buf_size(1 << 20)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type OriginBody = Either<StaticBlob, Full<Bytes>>;

async fn handle(req: Request<Incoming>, default_blob_bytes: u64) -> Result<Response<OriginBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
    };
    if rest.is_empty() {
        return Ok(small(StatusCode::OK, "application/json", Bytes::from_static(b"{}")));
    }
    // Uploads: swallow whatever body comes, whatever the step.
    if let Some((name, after)) = rest.split_once("/blobs/uploads/") {
        let received = swallow(req.into_body()).await;
        let name = name.to_owned();
        return Ok(match method {
            Method::POST => {
                let id = NEXT_UPLOAD.fetch_add(1, Ordering::Relaxed);
                upload_response(StatusCode::ACCEPTED, &name, &format!("bench-{id}"), 0)
            }
            Method::PATCH => upload_response(StatusCode::ACCEPTED, &name, after, received),
            Method::PUT => {
                let digest = query.split('&').find_map(|kv| kv.strip_prefix("digest=")).unwrap_or("sha256:0");
                let digest = digest.replace("%3A", ":").replace("%3a", ":");
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::LOCATION, format!("/v2/{name}/blobs/{digest}"))
                    .header("docker-content-digest", digest)
                    .header(header::CONTENT_LENGTH, "0")
                    .body(Either::Right(Full::new(Bytes::new())))
                    .expect("valid response")
            }
            Method::DELETE => small(StatusCode::NO_CONTENT, "text/plain", Bytes::new()),
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        if method != Method::GET && method != Method::HEAD {
            return Ok(error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"));
        }
        let size = name.rsplit('/').next().and_then(|last| last.parse().ok()).unwrap_or(default_blob_bytes);
        let body = if method == Method::HEAD { StaticBlob::new(0) } else { StaticBlob::new(size) };
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size)
            .header("docker-content-digest", digest)
            .header("docker-distribution-api-version", "registry/2.0")
            .body(Either::Left(body))
            .expect("valid response");
        return Ok(response);
    }
    if rest.contains("/manifests/") {
        return Ok(match method {
            Method::GET | Method::HEAD => {
                let (manifest, digest) = MANIFEST.get().expect("set in main");
                let length = manifest.len();
                let body = if method == Method::HEAD { Bytes::new() } else { manifest.clone() };
                let mut response = small(StatusCode::OK, MANIFEST_TYPE, body);
                response.headers_mut().insert(header::CONTENT_LENGTH, length.into());
                response.headers_mut().insert("docker-content-digest", digest.parse().expect("ascii"));
                response
            }
            Method::PUT => {
                swallow(req.into_body()).await;
                small(StatusCode::CREATED, "text/plain", Bytes::new())
            }
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        });
    }
    Ok(error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"))
}

/// Reads a request body to its end and drops it; returns how many bytes came.
async fn swallow(mut body: Incoming) -> u64 {
    let mut received = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            received += data.len() as u64;
        }
    }
    received
}

fn upload_response(status: StatusCode, name: &str, id: &str, received: u64) -> Response<OriginBody> {
    let range = format!("0-{}", received.saturating_sub(1));
    Response::builder()
        .status(status)
        .header(header::LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
        .header("docker-upload-uuid", id)
        .header(header::RANGE, range)
        .header(header::CONTENT_LENGTH, "0")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(Either::Right(Full::new(Bytes::new())))
        .expect("valid response")
}

fn small(status: StatusCode, content_type: &str, body: Bytes) -> Response<OriginBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header("docker-distribution-api-version", "registry/2.0")
        .body(Either::Right(Full::new(body)))
        .expect("valid response")
}

fn error(status: StatusCode, code: &str) -> Response<OriginBody> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"bench_origin"}}]}}"#);
    small(status, "application/json", Bytes::from(body))
}

/// `size` bytes, handed out as slices of the static buffer: no allocation, no copy.
struct StaticBlob {
    remaining: u64,
}

impl StaticBlob {
    fn new(size: u64) -> Self {
        StaticBlob { remaining: size }
    }
}

impl Body for StaticBlob {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let buffer: &'static [u8] = BUFFER.get().expect("set in main");
        let n = (buffer.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&buffer[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
