//! An S3 API server for a registry's blobs: moto's server (PyPI), installed by `script/test` and
//! named in `REGSCOPE_TEST_MOTO_DIR`. Each test starts its own, with one bucket, and reads its
//! access log to see which blob downloads reached it.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::client::Conn;
use super::net::{free_port, wait_for_tcp};
use super::process::TempDir;
use super::relay::{Relay, Shape};

/// Where `script/test` installed moto: `DIR/venv/bin/moto_server`.
const DIR_VAR: &str = "REGSCOPE_TEST_MOTO_DIR";

/// A running `moto_server`, killed on drop.
pub struct ObjectStorage {
    child: Child,
    addr: SocketAddr,
    /// Holds its log; removed on drop.
    dir: TempDir,
}

impl ObjectStorage {
    /// Starts moto's S3 server on a free loopback port with an empty bucket named `bucket`.
    pub fn start(bucket: &str) -> ObjectStorage {
        let moto = std::env::var(DIR_VAR)
            .unwrap_or_else(|_| panic!("{DIR_VAR} is not set: run script/test, which installs moto's server"));
        let dir = TempDir::new("moto");
        let log = OpenOptions::new().create(true).append(true).open(dir.path().join("moto.log")).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(format!("{moto}/venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn moto_server");
        let storage = ObjectStorage { child, addr, dir };
        assert!(wait_for_tcp(addr, Duration::from_secs(30)), "moto_server did not start:\n{}", storage.log_text());
        let host = addr.to_string();
        let created = Conn::connect(addr).request("PUT", &format!("/{bucket}"), &[("Host", &host)], b"").unwrap();
        assert_eq!(created.status(), 200, "create bucket {bucket}: {}", created.text());
        storage
    }

    /// `http://127.0.0.1:PORT`: the registry's `regionendpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_text(&self) -> String {
        std::fs::read(self.dir.path().join("moto.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// How many presigned blob GETs (the ones a client makes after a registry's redirect, signed in
    /// the query rather than by header as the registry's own calls are) the server answered.
    pub fn presigned_gets(&self) -> usize {
        self.log_text().lines().filter(|l| l.contains("\"GET ") && l.contains("X-Amz-Signature=")).count()
    }
}

impl Drop for ObjectStorage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay in front of an S3 server that holds back the response to every presigned request
/// (query-signed, as clients send them after a redirect) by a fixed delay: slow storage of a
/// known slowness, while the registry's own storage calls pass at full speed.
pub struct SlowStorage {
    relay: Relay,
}

impl SlowStorage {
    pub fn start(target: SocketAddr, delay: Duration) -> SlowStorage {
        let presigned =
            move |sent: &[u8]| sent.windows(16).any(|w| w == b"X-Amz-Signature=").then_some(Shape::Delay(delay));
        SlowStorage { relay: Relay::start(target, Arc::new(presigned)) }
    }

    /// `http://127.0.0.1:PORT`: the registry's `regionendpoint`, so presigned URLs name the relay.
    pub fn url(&self) -> String {
        self.relay.url()
    }
}
