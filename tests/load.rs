//! Load: 1000 concurrent client connections pull blobs of 256 KiB to 4 MiB and push small blobs for
//! 60 s, first straight
//! at the registry, then through regscope. Through regscope there is no error that direct access
//! does not also give, every byte arrives with the right digest, regscope's metrics count exactly
//! what the clients saw, its peak RSS stays under 256 MiB, and afterwards it is back where it
//! started: nothing in flight, no client or registry connection open, no file descriptor leaked.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use support::client::{digest_of, hex, start_upload, target_at, with_digest, Conn, Pattern};
use support::hostile::open_fds;
use support::{eventually, metric_sum, Registry, Regscope};

const CONNECTIONS: usize = 1000;
const RUN: Duration = Duration::from_secs(60);
/// Connections open over this long at the start, so the accept backlogs are not the test.
const RAMP: Duration = Duration::from_secs(2);
/// No single request may take longer: a hang fails the run instead of stalling it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const BLOB_SIZES: [usize; 5] = [256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20];
const PUSH_SIZE: usize = 16 << 10;
/// One request in this many is a push (POST + PUT); the rest are pulls.
const PUSH_EVERY: usize = 5;
const REPO: &str = "regscope-test/load";
const PEAK_RSS_LIMIT_KIB: u64 = 256 << 10;

/// What one run of the load saw.
#[derive(Default, Debug)]
struct Tally {
    pulls: u64,
    pushes: u64,
    pulled_bytes: u64,
    pushed_bytes: u64,
    /// Every response head received, by (operation, status).
    responses: BTreeMap<(&'static str, u16), u64>,
    /// Failures by kind (what failed and how, without ids).
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn merge(&mut self, other: Tally) {
        self.pulls += other.pulls;
        self.pushes += other.pushes;
        self.pulled_bytes += other.pulled_bytes;
        self.pushed_bytes += other.pushed_bytes;
        for (k, v) in other.responses {
            *self.responses.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect: timed out".to_string())?
        .map_err(|e| format!("connect: {:?}", e.kind()))?;
    stream.set_nodelay(true).unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

fn request(method: &str, target: &str, host: &str, body: Bytes) -> http::Request<Full<Bytes>> {
    let mut builder = http::Request::builder().method(method).uri(target).header("host", host);
    if !body.is_empty() || method == "PUT" || method == "POST" {
        builder = builder.header("content-type", "application/octet-stream").header("content-length", body.len());
    }
    builder.body(Full::new(body)).unwrap()
}

/// Short, id-free text for a hyper error, so failures group by kind.
fn kind_of(e: &hyper::Error) -> String {
    if e.is_closed() {
        "connection closed".into()
    } else if e.is_incomplete_message() {
        "incomplete message".into()
    } else if e.is_canceled() {
        "canceled".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else {
        let text = e.to_string();
        text.chars().take(60).collect()
    }
}

async fn pull(sender: &mut Sender, host: &str, blob: &(String, usize), tally: &mut Tally) -> Result<(), String> {
    sender.ready().await.map_err(|e| format!("pull: {}", kind_of(&e)))?;
    let response = sender
        .send_request(request("GET", &format!("/v2/{REPO}/blobs/{}", blob.0), host, Bytes::new()))
        .await
        .map_err(|e| format!("pull: {}", kind_of(&e)))?;
    *tally.responses.entry(("blob_get", response.status().as_u16())).or_default() += 1;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut hash = Sha256::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("pull body: {}", kind_of(&e)))?;
        if let Some(data) = frame.data_ref() {
            hash.update(data);
            len += data.len();
        }
    }
    if status != 200 {
        return Err(format!("pull: status {status}"));
    }
    if len != blob.1 {
        return Err(format!("pull: short body ({len} of {})", blob.1));
    }
    if format!("sha256:{}", hex(&hash.finalize())) != blob.0 {
        return Err("pull: corrupted body (digest mismatch)".into());
    }
    tally.pulls += 1;
    tally.pulled_bytes += len as u64;
    Ok(())
}

async fn push(sender: &mut Sender, host: &str, data: Bytes, tally: &mut Tally) -> Result<(), String> {
    sender.ready().await.map_err(|e| format!("push: {}", kind_of(&e)))?;
    let started = sender
        .send_request(request("POST", &format!("/v2/{REPO}/blobs/uploads/"), host, Bytes::new()))
        .await
        .map_err(|e| format!("push start: {}", kind_of(&e)))?;
    let status = started.status().as_u16();
    *tally.responses.entry(("upload_start", status)).or_default() += 1;
    let location = started.headers().get("location").and_then(|l| l.to_str().ok()).map(str::to_string);
    started.into_body().collect().await.map_err(|e| format!("push start body: {}", kind_of(&e)))?;
    if status != 202 {
        return Err(format!("push start: status {status}"));
    }
    let location = location.ok_or("push start: no Location")?;
    let target = location
        .strip_prefix(&format!("http://{host}"))
        .ok_or_else(|| "push start: Location points elsewhere".to_string())?;
    let digest = digest_of(&data);
    let len = data.len();
    sender.ready().await.map_err(|e| format!("push: {}", kind_of(&e)))?;
    let finished = sender
        .send_request(request("PUT", &with_digest(target, &digest), host, data))
        .await
        .map_err(|e| format!("push finish: {}", kind_of(&e)))?;
    let status = finished.status().as_u16();
    *tally.responses.entry(("upload_finish", status)).or_default() += 1;
    let stored = finished.headers().get("docker-content-digest").and_then(|d| d.to_str().ok()).map(str::to_string);
    finished.into_body().collect().await.map_err(|e| format!("push finish body: {}", kind_of(&e)))?;
    if status != 201 {
        return Err(format!("push finish: status {status}"));
    }
    if stored.as_deref() != Some(digest.as_str()) {
        return Err("push finish: wrong Docker-Content-Digest".into());
    }
    tally.pushes += 1;
    tally.pushed_bytes += len as u64;
    Ok(())
}

/// One client connection's loop until `deadline`: pulls, and every `PUSH_EVERY`th request a push
/// of a blob no one else pushes. A failed connection is replaced.
async fn client(index: usize, addr: SocketAddr, blobs: Arc<Vec<(String, usize)>>, deadline: Instant) -> Tally {
    let host = addr.to_string();
    let mut tally = Tally::default();
    let mut sender: Option<Sender> = None;
    let mut n = 0usize;
    tokio::time::sleep(RAMP * index as u32 / CONNECTIONS as u32).await;
    while Instant::now() < deadline {
        let mut current = match sender.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    *tally.errors.entry(e).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let outcome = if (index + n) % PUSH_EVERY == 0 {
            let mut data = vec![0u8; PUSH_SIZE];
            data[..16].copy_from_slice(&(index as u64).to_le_bytes().repeat(2));
            data[16..24].copy_from_slice(&(n as u64).to_le_bytes());
            data[24..32].copy_from_slice(&(addr.port() as u64).to_le_bytes());
            tokio::time::timeout(REQUEST_TIMEOUT, push(&mut current, &host, Bytes::from(data), &mut tally)).await
        } else {
            let blob = &blobs[(index + n) % blobs.len()];
            tokio::time::timeout(REQUEST_TIMEOUT, pull(&mut current, &host, blob, &mut tally)).await
        };
        match outcome {
            Ok(Ok(())) => sender = Some(current),
            Ok(Err(e)) => *tally.errors.entry(e).or_default() += 1,
            Err(_) => *tally.errors.entry("request timed out".into()).or_default() += 1,
        }
        n += 1;
    }
    tally
}

/// The whole load against `addr`; returns the combined tally. Every connection is closed when
/// this returns.
fn run_load(addr: SocketAddr, blobs: &Arc<Vec<(String, usize)>>) -> Tally {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let total = Arc::new(Mutex::new(Tally::default()));
    runtime.block_on(async {
        let deadline = Instant::now() + RAMP + RUN;
        let tasks: Vec<_> = (0..CONNECTIONS).map(|i| tokio::spawn(client(i, addr, blobs.clone(), deadline))).collect();
        for task in tasks {
            let tally = task.await.expect("a load task panicked");
            total.lock().unwrap().merge(tally);
        }
    });
    // Dropping the runtime closes every connection task and socket.
    drop(runtime);
    Arc::try_unwrap(total).unwrap().into_inner().unwrap()
}

fn seed_blobs(registry: &Registry) -> Arc<Vec<(String, usize)>> {
    let host = registry.addr().to_string();
    let blobs = BLOB_SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let mut pattern = Pattern::new(0x10AD_0000 + i as u64);
            let mut data = Vec::with_capacity(size);
            while data.len() < size {
                data.extend_from_slice(pattern.next_slice(size - data.len()));
            }
            let digest = digest_of(&data);
            let mut conn = Conn::connect(registry.addr());
            let location = start_upload(&mut conn, &host, REPO);
            let target = with_digest(&target_at(&location, &format!("http://{host}")), &digest);
            let response = conn.request("PUT", &target, &[("Host", &host)], &data).unwrap();
            assert_eq!(response.status(), 201, "seeding blob {i}: {}", response.text());
            (digest, size)
        })
        .collect();
    Arc::new(blobs)
}

fn gauge(regscope: &Regscope, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&regscope.metrics_text(), name, labels)
}

#[test]
fn a_thousand_connections_of_mixed_pulls_and_pushes_lose_nothing_and_leak_nothing() {
    let registry = Registry::start();
    let blobs = seed_blobs(&registry);

    let direct = run_load(registry.addr(), &blobs);
    eprintln!(
        "direct: {} pulls ({} MiB), {} pushes, errors {:?}",
        direct.pulls,
        direct.pulled_bytes >> 20,
        direct.pushes,
        direct.errors
    );

    let regscope = Regscope::start(&["--upstream", &registry.url(), "--upstream-idle-timeout", "2s"]);
    let pid = regscope.pid();
    let fds_before = open_fds(pid);
    let rss_before = regscope.rss_kib();
    // Watch the connection gauges while the load runs: all 1000 must be open at once.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, admin) = (stop.clone(), regscope.admin_addr());
        std::thread::spawn(move || {
            let mut peak = (0.0f64, 0.0f64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = support::http_get(admin, "/metrics").text();
                peak.0 = peak.0.max(metric_sum(&text, "regscope_connections", &[("side", "client")]));
                peak.1 = peak.1.max(metric_sum(&text, "regscope_connections", &[("side", "registry")]));
                std::thread::sleep(Duration::from_millis(500));
            }
            peak
        })
    };
    let proxied = run_load(regscope.proxy_addr(), &blobs);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak_clients, peak_upstream) = sampler.join().unwrap();
    let peak_rss = regscope.peak_rss_kib();
    eprintln!(
        "through regscope: {} pulls ({} MiB), {} pushes, errors {:?}; RSS {} MiB before, peak {} MiB; fds before {fds_before}",
        proxied.pulls,
        proxied.pulled_bytes >> 20,
        proxied.pushes,
        proxied.errors,
        rss_before >> 10,
        peak_rss >> 10
    );

    eprintln!("peak connections: {peak_clients} from clients, {peak_upstream} to the registry");
    assert!(peak_clients >= (CONNECTIONS * 9 / 10) as f64, "only {peak_clients} client connections were open at once");

    // It was a real load, through regscope as much as direct.
    assert!(proxied.pulls >= 1000 && proxied.pushes >= 100, "too little got done to mean anything: {proxied:?}");

    // No error that direct access does not also give.
    for (kind, count) in &proxied.errors {
        let direct_count = direct.errors.get(kind).copied().unwrap_or(0);
        assert!(
            *count <= direct_count,
            "through regscope {count} × {kind:?}, direct {direct_count}; all through regscope: {:?}, direct: {:?}",
            proxied.errors,
            direct.errors
        );
    }

    // regscope's counters say exactly what the clients saw.
    let metrics = regscope.metrics_text();
    for ((operation, status), count) in &proxied.responses {
        let counted =
            metric_sum(&metrics, "regscope_requests_total", &[("operation", operation), ("code", &status.to_string())]);
        if proxied.error_count() == 0 {
            assert_eq!(counted, *count as f64, "regscope_requests_total{{{operation},{status}}} vs the clients");
        } else {
            assert!(counted >= *count as f64, "regscope_requests_total{{{operation},{status}}} vs the clients");
        }
    }
    if proxied.error_count() == 0 {
        let down =
            metric_sum(&metrics, "regscope_body_bytes_total", &[("operation", "blob_get"), ("direction", "download")]);
        assert_eq!(down, proxied.pulled_bytes as f64, "download bytes counted vs received");
        let up = metric_sum(
            &metrics,
            "regscope_body_bytes_total",
            &[("operation", "upload_finish"), ("direction", "upload")],
        );
        assert_eq!(up, proxied.pushed_bytes as f64, "upload bytes counted vs sent");
    }

    assert!(
        peak_rss < PEAK_RSS_LIMIT_KIB,
        "regscope's peak RSS was {} MiB under {CONNECTIONS} connections (limit {} MiB)",
        peak_rss >> 10,
        PEAK_RSS_LIMIT_KIB >> 10
    );

    // Back to rest: nothing in flight, no connection either side, no descriptor kept.
    let in_flight = gauge(&regscope, "regscope_in_flight_requests", &[]);
    assert_eq!(in_flight, 0.0, "requests still in flight after every client got its answer");
    let clients_closed =
        eventually(Duration::from_secs(10), || gauge(&regscope, "regscope_connections", &[("side", "client")]) == 0.0);
    assert!(
        clients_closed,
        "client connections still counted: {}",
        gauge(&regscope, "regscope_connections", &[("side", "client")])
    );
    let pool_drained = eventually(Duration::from_secs(20), || {
        gauge(&regscope, "regscope_connections", &[("side", "registry")]) == 0.0 && open_fds(pid) <= fds_before
    });
    let fds_after = open_fds(pid);
    eprintln!(
        "after: fds {fds_after} (before {fds_before}), registry connections {}",
        gauge(&regscope, "regscope_connections", &[("side", "registry")])
    );
    assert!(
        pool_drained,
        "20 s after the load (idle timeout 2 s): {fds_after} fds open (before: {fds_before}), {} registry connections",
        gauge(&regscope, "regscope_connections", &[("side", "registry")])
    );
}
