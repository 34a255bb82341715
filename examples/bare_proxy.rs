//! A bare HTTP/1 reverse proxy with no instrumentation: the reference point for what regscope's
//! recording and structure cost per request (docs/performance.md, "What sets these figures").
//!
//! - `pooled`: hyper's server and hyper-util's pooled client, as regscope forwards.
//! - `paired`: each client connection gets one upstream connection of its own, driven in the
//!   client connection's task, so no request or response crosses between tasks.
//! - `raw`: no HTTP library at all. Each client connection gets its own upstream connection; heads
//!   are parsed by httparse only to find their ends and the response's `Content-Length`, then
//!   passed on as read. GETs without a body only (anything else closes the connection): it
//!   is the least a tokio proxy can do per manifest GET, a floor, not a proxy to use.
//!
//! `cargo build --release --example bare_proxy`, then
//! `target/release/examples/bare_proxy pooled 127.0.0.1:5210 127.0.0.1:5000`; read its CPU per
//! request from `/proc` while wrk runs, as `script/bench` does for the contenders.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client1;
use hyper::server::conn::http1 as server1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

fn main() -> anyhow::Result<()> {
    let usage = "usage: bare_proxy pooled|paired|raw LISTEN UPSTREAM (host:port each)";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, upstream] = args.as_slice() else { anyhow::bail!(usage) };
    let mode = match mode.as_str() {
        "pooled" => Mode::Pooled,
        "paired" => Mode::Paired,
        "raw" => Mode::Raw,
        _ => anyhow::bail!(usage),
    };
    let authority: http::uri::Authority = upstream.parse().context("UPSTREAM is host:port")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build_http();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            match mode {
                Mode::Pooled => {
                    tokio::spawn(serve_pooled(stream, client.clone(), authority.clone()));
                }
                Mode::Paired => {
                    tokio::spawn(serve_paired(stream, authority.clone()));
                }
                Mode::Raw => {
                    tokio::spawn(serve_raw(stream, authority.clone()));
                }
            }
        }
    })
}

#[derive(Clone, Copy)]
enum Mode {
    Pooled,
    Paired,
    Raw,
}

async fn serve_raw(mut client: TcpStream, authority: http::uri::Authority) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use tokio::io::AsyncWriteExt;
    let mut upstream = TcpStream::connect(authority.as_str()).await?;
    upstream.set_nodelay(true)?;
    let (mut request, mut response) = (Vec::with_capacity(8192), Vec::with_capacity(16384));
    loop {
        let Some(head) = read_head(&mut client, &mut request).await? else { return Ok(()) };
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut fields);
        parsed.parse(&request[..head]).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
        if parsed.method != Some("GET")
            || parsed.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
            })
        {
            return Err(ErrorKind::Unsupported.into());
        }
        upstream.write_all(&request[..head]).await?;
        request.drain(..head);
        let Some(head) = read_head(&mut upstream, &mut response).await? else { return Ok(()) };
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut fields);
        parsed.parse(&response[..head]).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
        let length = parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .ok_or(ErrorKind::Unsupported)?;
        while response.len() < head + length {
            read_more(&mut upstream, &mut response).await?;
        }
        client.write_all(&response[..head + length]).await?;
        response.drain(..head + length);
    }
}

/// The length of the head at the start of `buf`, reading into it until it is there; `None` if
/// the stream ends first.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        match read_more(stream, buf).await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && buf.is_empty() => return Ok(None),
            read => read?,
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    buf.reserve(8192);
    match stream.read_buf(buf).await? {
        0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

async fn serve_pooled(
    stream: TcpStream,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>,
    authority: http::uri::Authority,
) {
    let service = service_fn(move |mut req: Request<Incoming>| {
        let mut target = http::uri::Parts::default();
        target.scheme = Some(http::uri::Scheme::HTTP);
        target.authority = Some(authority.clone());
        target.path_and_query = req.uri().path_and_query().cloned();
        if let Ok(uri) = http::Uri::from_parts(target) {
            *req.uri_mut() = uri;
        }
        client.request(req)
    });
    let _ = server1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
}

async fn serve_paired(stream: TcpStream, authority: http::uri::Authority) {
    let Ok(upstream) = TcpStream::connect(authority.as_str()).await else { return };
    let _ = upstream.set_nodelay(true);
    let Ok((sender, connection)) = client1::handshake(TokioIo::new(upstream)).await else { return };
    // HTTP/1 clients send one request at a time, so the connection's sender is free whenever a
    // request arrives.
    let sender = Arc::new(Mutex::new(sender));
    let service =
        service_fn(move |req: Request<Incoming>| sender.lock().unwrap_or_else(|e| e.into_inner()).send_request(req));
    let server = server1::Builder::new().serve_connection(TokioIo::new(stream), service);
    Both { server, upstream: Some(connection) }.await;
}

/// Drives the client connection and its upstream connection in one task.
struct Both<S, U> {
    server: S,
    upstream: Option<U>,
}

impl<S: Future + Unpin, U: Future + Unpin> Both<S, U> {
    fn poll_upstream(&mut self, cx: &mut Context<'_>) {
        if let Some(upstream) = self.upstream.as_mut() {
            if Pin::new(upstream).poll(cx).is_ready() {
                self.upstream = None;
            }
        }
    }
}

impl<S: Future + Unpin, U: Future + Unpin> Future for Both<S, U> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_upstream(cx);
        let served = Pin::new(&mut self.server).poll(cx).is_ready();
        // Serving may have handed the upstream a request: let it write now.
        self.poll_upstream(cx);
        if served {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
