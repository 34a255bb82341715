//! A private distribution registry (Debian's `docker-registry`, distribution 2.8.2) per test, so
//! what it stores and what it logs belong to that test alone.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::net::free_port;
use super::process::TempDir;

/// How to configure a [`Registry`] beyond the defaults (plain HTTP, no auth).
#[derive(Default, Clone, Debug)]
pub struct RegistryOptions {
    /// PEM certificate and key: the registry then serves HTTPS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// An htpasswd file (bcrypt entries): the registry then wants HTTP Basic auth (`auth:
    /// htpasswd:`), answering 401 with `WWW-Authenticate: Basic realm=…` without it.
    pub htpasswd: Option<PathBuf>,
    /// Store blobs in this S3 bucket (`http://…` endpoint, bucket name) instead of on disk, with
    /// distribution's storage redirects on: blob GETs answer 307 to a presigned URL.
    pub s3: Option<(String, String)>,
    /// Token auth (`auth: token:`): the realm, and the token service's root certificate.
    pub token: Option<(String, PathBuf)>,
}

/// One request as the registry's access log recorded it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoggedRequest {
    pub method: String,
    /// The request target without its query (upload URLs carry a `_state` that changes every time).
    pub path: String,
    pub status: u16,
}

/// A running `docker-registry serve`, killed and its storage removed on drop.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    tls: bool,
    /// Holds config.yml, the storage root and the captured output; removed on drop.
    dir: TempDir,
}

impl Registry {
    /// Starts a plain-HTTP registry with deletes enabled.
    pub fn start() -> Registry {
        Registry::start_with(RegistryOptions::default())
    }

    /// Starts a registry on a free loopback port and waits until it accepts connections.
    ///
    /// Readiness is a TCP connect, not a `GET /v2/`, so the access log holds only the test's own
    /// requests: tests compare it with what regscope saw. A port taken between choosing and binding
    /// it is retried with another.
    pub fn start_with(opts: RegistryOptions) -> Registry {
        let dir = TempDir::new("registry");
        let log_path = dir.path().join("registry.log");
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config = dir.path().join("config.yml");
            std::fs::write(&config, config_yaml(dir.path(), addr, &opts)).unwrap();
            let log = OpenOptions::new().create(true).write(true).truncate(true).open(&log_path).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                // The machine names a CA bundle for AWS SDKs; distribution's panics at start on it.
                .env_remove("AWS_CA_BUNDLE")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn docker-registry (is the docker-registry package installed?): {e}"));
            match wait_ready(&mut child, addr, Duration::from_secs(20)) {
                Ok(()) => return Registry { child, addr, tls: opts.tls.is_some(), dir },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if !log.contains("address already in use") {
                        panic!("docker-registry did not start on {addr}: {why}\n{log}");
                    }
                }
            }
        }
        panic!("docker-registry found no free port in 5 tries");
    }

    /// `127.0.0.1:PORT`, the registry host as an image reference spells it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://…`: what regscope's `--upstream` takes.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// The storage root, to look at what the registry wrote.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything the registry printed so far (its own log and the access log), for failure messages.
    pub fn log_text(&self) -> String {
        // Lossy: a test that sends non-UTF-8 bytes in a path must not blank the whole log.
        std::fs::read(self.dir.path().join("registry.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Every request the registry has answered so far, in the order it logged them.
    ///
    /// distribution 2.8.2 writes one Apache combined-format line per response, after the handler
    /// returns, e.g. `127.0.0.1 - - [27/Nov/2026:20:49:37 +0000] "PATCH /v2/t/blobs/uploads/<uuid>?_state=… HTTP/1.1" 202 0 "" "docker/20.10.24 …"`.
    /// A client can see its response before that line is written: see [`served_requests_once`].
    ///
    /// [`served_requests_once`]: Registry::served_requests_once
    pub fn served_requests(&self) -> Vec<LoggedRequest> {
        self.log_text().lines().filter_map(parse_access_line).collect()
    }

    /// The requests served, once `ready` holds of them: a client has its response before the
    /// registry logs the request, so a test that counts what the registry served waits for the
    /// lines it expects. After 5 s, the requests as they are then, for the caller's assertion to
    /// show.
    pub fn served_requests_once(&self, ready: impl Fn(&[LoggedRequest]) -> bool) -> Vec<LoggedRequest> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut served = self.served_requests();
        while !ready(&served) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            served = self.served_requests();
        }
        served
    }
}

impl Registry {
    /// Kills the registry process, as a crash would; its config and storage stay for [`restart`].
    ///
    /// [`restart`]: Registry::restart
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same address, with the same config and storage, and waits
    /// until it accepts connections. Its log is appended to, so `served_requests` keeps the
    /// requests of before the restart. Panics if it cannot start (e.g. the port was taken).
    pub fn restart(&mut self) {
        self.stop();
        let log_path = self.dir.path().join("registry.log");
        let log = OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        self.child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .env_remove("AWS_CA_BUNDLE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("respawn docker-registry: {e}"));
        if let Err(why) = wait_ready(&mut self.child, self.addr, Duration::from_secs(20)) {
            panic!("docker-registry did not restart on {}: {why}\n{}", self.addr, self.log_text());
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the registry accepts connections, or says why not.
fn wait_ready(child: &mut Child, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("exited with {status}"));
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(format!("not listening after {timeout:?}"))
}

fn config_yaml(dir: &Path, addr: SocketAddr, opts: &RegistryOptions) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
         storage:\n{backend}  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n",
        backend = match &opts.s3 {
            Some((endpoint, bucket)) => format!(
                "  s3:\n    accesskey: regscope\n    secretkey: regscope-test\n    region: us-east-1\n    \
                 regionendpoint: {endpoint}\n    bucket: {bucket}\n    secure: false\n    v4auth: true\n  \
                 redirect:\n    disable: false\n"
            ),
            None => format!("  filesystem:\n    rootdirectory: {}\n", dir.join("storage").display()),
        }
    );
    if let Some((cert, key)) = &opts.tls {
        yaml += &format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display());
    }
    if let Some((realm, root)) = &opts.token {
        yaml += &format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            super::token::SERVICE,
            super::token::ISSUER,
            root.display()
        );
    }
    if let Some(htpasswd) = &opts.htpasswd {
        yaml += &format!("auth:\n  htpasswd:\n    realm: regscope-test\n    path: {}\n", htpasswd.display());
    }
    yaml
}

/// Parses one combined-format access log line; other lines (logrus `time=…` lines) give `None`.
fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    let (_, rest) = line.split_once("] \"")?;
    let (request_line, rest) = rest.split_once("\" ")?;
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    parts.next().filter(|proto| proto.starts_with("HTTP/"))?;
    let status = rest.split(' ').next()?.parse().ok()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Some(LoggedRequest { method, path, status })
}
