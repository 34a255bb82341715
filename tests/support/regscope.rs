//! The regscope binary under test, on ephemeral ports, with its JSON log captured line by line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::net::http_get;

/// A running `regscope serve`, killed on drop.
pub struct Regscope {
    child: Child,
    /// Every stderr line so far; filled by a thread so the pipe never blocks the proxy.
    lines: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    admin: SocketAddr,
}

/// One proxied exchange, from regscope's `"request"` log event.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestEvent {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub operation: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub client: String,
}

impl Regscope {
    /// Spawns the binary on `127.0.0.1:0` for both ports with JSON logs, plus `args` (e.g.
    /// `["--upstream", &registry.url()]`), and waits up to 20 s for its `"listening"` event, which
    /// tells the ports it bound. Set `REGSCOPE_TEST_ECHO=1` to copy its stderr to the test's.
    pub fn start(args: &[&str]) -> Regscope {
        Regscope::start_env(args, &[])
    }

    /// `start`, with these environment variables set for regscope (e.g. `OTEL_*`).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Regscope {
        let mut child = Command::new(env!("CARGO_BIN_EXE_regscope"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            // Every request's event, which many tests read; a test's own RUST_LOG wins.
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,regscope::request=debug".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn regscope");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&lines);
        let echo = std::env::var_os("REGSCOPE_TEST_ECHO").is_some();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[regscope] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listening = lines.lock().unwrap().iter().find_map(|l| {
                let event = parse_event(l).filter(|e| e["fields"]["message"] == "listening")?;
                let addr = |key: &str| event["fields"][key].as_str()?.parse::<SocketAddr>().ok();
                Some((addr("proxy")?, addr("admin")?))
            });
            if let Some((proxy, admin)) = listening {
                return Regscope { child, lines, proxy, admin };
            }
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "regscope {args:?} gave no \"listening\" event ({}); stderr:\n{}",
                    exited.map_or("timed out after 20s".to_string(), |s| format!("exited with {s}")),
                    lines.lock().unwrap().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where clients connect; as an image reference host: `format!("{}/repo:tag", rs.proxy_addr())`.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Every JSON log event whose `fields.message` is `message`.
    pub fn events(&self, message: &str) -> Vec<Value> {
        self.log_lines().iter().filter_map(|l| parse_event(l)).filter(|e| e["fields"]["message"] == message).collect()
    }

    /// The `"request"` events so far, one per proxied exchange, in log order. Panics on an event
    /// that lacks a field of the contract, naming the line.
    pub fn request_log(&self) -> Vec<RequestEvent> {
        self.events("request").iter().map(request_event).collect()
    }

    /// `GET /metrics` on the admin port; panics unless it answers 200.
    pub fn metrics_text(&self) -> String {
        let response = http_get(self.admin, "/metrics");
        assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
        response.text()
    }

    /// Resident set size now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS")
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM")
    }

    /// Asks for a graceful shutdown, as an orchestrator would.
    pub fn sigterm(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits for the process to exit; panics (showing its log) if it has not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("regscope still running after {timeout:?}; stderr:\n{}", self.log_lines().join("\n"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn proc_status_kib(&self, key: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {path}"))
    }
}

impl Drop for Regscope {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums the samples of metric `name` whose labels include every pair of `labels`, from Prometheus
/// text exposition. A missing family sums to 0, which is what a counter that never moved exports.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let present = parse_labels(label_text)?;
            let wanted = labels.iter().all(|(k, v)| present.iter().any(|(pk, pv)| pk == k && pv == v));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Parses `a="x",b="y \"z\""` into unescaped pairs.
pub(super) fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start_matches(',');
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        pairs.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(pairs)
}

fn parse_event(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line).ok().filter(|v| v["fields"].is_object())
}

fn request_event(event: &Value) -> RequestEvent {
    let f = &event["fields"];
    let text = |key: &str| {
        f[key].as_str().unwrap_or_else(|| panic!("request event without string {key}: {event}")).to_string()
    };
    // Numbers may be logged as JSON numbers or as their text.
    let number = |key: &str| {
        f[key]
            .as_f64()
            .or_else(|| f[key].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("request event without number {key}: {event}"))
    };
    RequestEvent {
        method: text("method"),
        path: text("path"),
        status: number("status") as u16,
        operation: text("operation"),
        bytes_in: number("bytes_in") as u64,
        bytes_out: number("bytes_out") as u64,
        duration_ms: number("duration_ms"),
        client: text("client"),
    }
}
