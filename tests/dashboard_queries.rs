//! The dashboard and the recording rules are proven against a real Prometheus: it scrapes a real
//! regscope while docker pushes and pulls through it, then every query of grafana/regscope.json and
//! every recording rule of deploy/prometheus/regscope-rules.yml is evaluated through Prometheus'
//! HTTP API, with Grafana's variables filled in as Grafana would. Each must be valid and return
//! at least one sample with a real (not NaN) value.
//!
//! Prometheus runs with the scrape job of deploy/prometheus/prometheus.yml, pointed at the test's
//! regscope and scraping every second, and loads the rule file itself, so its recorded series are
//! checked too.

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{docker, eventually, free_port, http_get, Registry, Regscope, TempDir, TestImage};

/// Grafana's `$__rate_interval` is at least four scrape intervals. The test uses at least a
/// minute, and always enough to reach back to before the first push: a rate needs a sample from
/// before the increase it measures, however slowly the pushes ran.
const MIN_RATE_INTERVAL: Duration = Duration::from_secs(60);
const RANGE: &str = "10m";
const SCRAPE_INTERVAL: &str = "1s";

#[test]
fn every_dashboard_query_and_recording_rule_returns_data_from_a_real_prometheus() {
    let registry = Registry::start();
    // Transfers close 2 s after their last request, and idle upstream connections after 1 s, so
    // the second round of traffic opens new ones and the connect histogram moves too.
    let regscope = Regscope::start(&[
        "--upstream",
        &registry.url(),
        "--transfer-idle-timeout",
        "2s",
        "--upstream-idle-timeout",
        "1s",
    ]);
    let prometheus = Prometheus::start(regscope.admin_addr());
    let started = Instant::now();
    prometheus.wait_for("up{job=\"regscope\"} == 1", 1.0);

    // Two rounds of push and pull: the first creates the series, the second moves them while
    // Prometheus watches, so every rate has an increase to see.
    let docker = docker();
    for round in 1..=2 {
        let reference = format!("{}/regscope-test/dashboard-{round}:v1", regscope.proxy_addr());
        let image = TestImage::build(&reference, &[3 << 20, 2 << 20]);
        docker.load(&image);
        docker.push(&reference);
        docker.rmi(&reference);
        docker.pull(&reference);
        docker.rmi(&reference);
        for direction in ["push", "pull"] {
            let counted = format!(
                "sum(regscope_image_transfer_seconds_count{{job=\"regscope\", direction=\"{direction}\", outcome=\"complete\"}})"
            );
            prometheus.wait_for(&counted, f64::from(round));
        }
    }
    // A few more scrapes after the last increase.
    thread::sleep(Duration::from_secs(3));

    let rate_interval = MIN_RATE_INTERVAL.max(started.elapsed() + Duration::from_secs(10));
    let instance = regscope.admin_addr().to_string();
    let variables = BTreeMap::from([
        ("job", "regscope".to_string()),
        // A single selected value, regex-escaped as Grafana formats it for `=~`.
        ("instance", instance.replace('.', "\\\\.")),
        ("__rate_interval", format!("{}s", rate_interval.as_secs())),
        ("__interval", "15s".to_string()),
        ("__range", RANGE.to_string()),
    ]);

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (origin, expr) in dashboard_queries().into_iter().chain(recording_rules()) {
        let query = substitute(&expr, &variables);
        let outcome = match prometheus.query(&query) {
            Err(error) => Err(format!("invalid: {error}")),
            Ok(samples) if samples.is_empty() => Err("no data".to_string()),
            Ok(samples) if samples.iter().all(|(_, v)| v.is_nan()) => Err(format!("only NaN: {samples:?}")),
            Ok(samples) => Ok(samples),
        };
        match &outcome {
            Ok(samples) => {
                report.push(format!("ok   {origin}: {} series, e.g. {:?}\n     {query}", samples.len(), samples[0]))
            }
            Err(why) => {
                report.push(format!("FAIL {origin}: {why}\n     {query}"));
                failures.push(format!("{origin}: {why}\n  {query}"));
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} queries failed:\n{}", failures.len(), failures.join("\n"));

    // Alert expressions need conditions this test does not create; they must still be valid.
    for (name, expr) in alert_rules() {
        if let Err(error) = prometheus.query(&expr) {
            panic!("alert {name}: invalid expression: {error}\n{expr}");
        }
    }

    // Prometheus loaded the rule file, evaluates every rule without error, and records series.
    let rules = prometheus.api("/api/v1/rules");
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    assert!(groups.len() >= 2, "rule groups loaded: {rules}");
    for rule in groups.iter().flat_map(|g| g["rules"].as_array().expect("rules")) {
        assert_eq!(rule["health"], "ok", "rule {} is unhealthy: {}", rule["name"], rule["lastError"]);
    }
    for (name, _) in recording_rules() {
        let name = name.trim_start_matches("record ");
        let recorded = || prometheus.query(name).is_ok_and(|s| !s.is_empty());
        assert!(eventually(Duration::from_secs(5), recorded), "Prometheus recorded no {name}");
    }

    // The template variables resolve: regscope_build_info names the job and this instance.
    let info = prometheus.query("regscope_build_info{job=\"regscope\"}").expect("build info");
    assert!(info.iter().any(|(labels, _)| labels.get("instance") == Some(&instance)), "build info: {info:?}");
}

// === the queries ===

/// `(where, expr)` of every target of every panel of every dashboard in grafana/.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = repo().join("grafana");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    for file in files {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut panels: Vec<&Value> = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            panels.push(panel);
            panels.extend(panel["panels"].as_array().into_iter().flatten());
        }
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let origin = format!("{name} {:?} {}", panel["title"].as_str().unwrap_or(""), target["refId"]);
                    out.push((origin, expr.to_string()));
                }
            }
        }
    }
    out
}

fn rules_of(kind: &str) -> Vec<(String, String)> {
    let path = repo().join("deploy/prometheus/regscope-rules.yml");
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| Some((format!("{kind} {}", r[kind].as_str()?), r["expr"].as_str()?.to_string())))
        .collect()
}

fn recording_rules() -> Vec<(String, String)> {
    rules_of("record")
}

fn alert_rules() -> Vec<(String, String)> {
    rules_of("alert")
}

/// Replaces Grafana's `$name` and `${name}` variables; panics on one it does not know, so a query
/// never reaches Prometheus with a `$` left in it.
fn substitute(expr: &str, variables: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').unwrap_or_else(|| panic!("unterminated ${{ in {expr}"));
                (&braced[..end], end + 2)
            }
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = variables.get(name).unwrap_or_else(|| panic!("unknown variable ${name} in {expr}"));
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// === Prometheus ===

/// A real `prometheus` server on a free loopback port, its storage in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    /// Holds the config, the TSDB and the log; removed on drop.
    dir: TempDir,
}

/// One sample of an instant vector: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

impl Prometheus {
    /// Writes a config from deploy/prometheus/prometheus.yml: its `regscope` job only, aimed at
    /// `target` every second, and its rule file by absolute path. Waits for `/-/ready`.
    fn start(target: SocketAddr) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, serde_yaml::to_string(&config_for(target)).unwrap()).unwrap();
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = File::create(dir.path().join("prometheus.log")).unwrap();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn prometheus (Debian package `prometheus`): {e}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                if std::net::TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").status == 200 {
                    return Prometheus { child, addr, dir };
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
            if !log.contains("address already in use") {
                panic!("prometheus did not become ready on {addr}:\n{log}");
            }
        }
        panic!("prometheus found no free port in 5 tries");
    }

    /// `GET path` on the API; panics unless it answers `status: success`.
    fn api(&self, path: &str) -> Value {
        let response = http_get(self.addr, path);
        let body: Value = serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {}", response.text()));
        assert_eq!(body["status"], "success", "GET {path}: {body}");
        body
    }

    /// Evaluates `expr` now. Err carries Prometheus' error for an invalid query.
    fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let response = http_get(self.addr, &format!("/api/v1/query?query={}", percent_encode(expr)));
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("HTTP {} not JSON ({e}): {}", response.status, response.text()))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        let data = &body["data"];
        let value = |v: &Value| v[1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
        Ok(match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .expect("result")
                .iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
                        .unwrap_or_default();
                    (labels, value(&s["value"]))
                })
                .collect(),
            Some("scalar") => vec![(BTreeMap::new(), value(&data["result"]))],
            other => return Err(format!("unexpected result type {other:?}")),
        })
    }

    /// Waits up to 60 s until the single value of `expr` is at least `at_least`.
    fn wait_for(&self, expr: &str, at_least: f64) {
        let reached = || {
            self.query(expr)
                .map(|samples| samples.iter().any(|(_, v)| *v >= at_least))
                .unwrap_or_else(|e| panic!("{expr}: {e}"))
        };
        if !eventually(Duration::from_secs(60), reached) {
            panic!(
                "Prometheus never saw {expr} >= {at_least}; it has {:?}\nlog:\n{}",
                self.query(expr),
                std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
            );
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped config with its `regscope` job aimed at `target`, every second.
fn config_for(target: SocketAddr) -> serde_yaml::Value {
    let path = repo().join("deploy/prometheus/prometheus.yml");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut job = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"] == "regscope")
        .expect("a scrape job named regscope")
        .clone();
    job["static_configs"] = serde_yaml::from_str(&format!("[{{targets: ['{target}']}}]")).unwrap();
    config["scrape_configs"] = serde_yaml::Value::Sequence(vec![job]);
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL.into();
    config["global"]["scrape_timeout"] = SCRAPE_INTERVAL.into();
    config["global"]["evaluation_interval"] = SCRAPE_INTERVAL.into();
    let rules = repo().join("deploy/prometheus/regscope-rules.yml");
    config["rule_files"] = serde_yaml::Value::Sequence(vec![rules.display().to_string().into()]);
    config
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
