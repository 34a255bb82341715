//! An S3 API server for a registry's blobs: moto's server (PyPI), installed by `script/test` and
//! named in `REGSCOPE_TEST_MOTO_DIR`. Each test starts its own, with one bucket, and reads its
//! access log to see which blob downloads reached it.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::client::Conn;
use super::net::{free_port, wait_for_tcp};
use super::process::TempDir;

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

/// A TCP relay in front of an S3 server that holds back the response to every presigned request
/// (query-signed, as clients send them after a redirect) by a fixed delay: slow storage of a
/// known slowness, while the registry's own storage calls pass at full speed.
pub struct SlowStorage {
    addr: SocketAddr,
}

impl SlowStorage {
    pub fn start(target: SocketAddr, delay: Duration) -> SlowStorage {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                relay(client, server, delay);
            }
        });
        SlowStorage { addr }
    }

    /// `http://127.0.0.1:PORT`: the registry's `regionendpoint`, so presigned URLs name the relay.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies both ways; a response to a request whose head carried `X-Amz-Signature=` starts
/// `delay` after the storage started sending it.
fn relay(client: std::net::TcpStream, server: std::net::TcpStream, delay: Duration) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let presigned = Arc::new(AtomicBool::new(false));
    let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let flag = Arc::clone(&presigned);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = client_in.read(&mut buf) {
            if n == 0 || server_out.write_all(&buf[..n]).is_err() {
                break;
            }
            if buf[..n].windows(16).any(|w| w == b"X-Amz-Signature=") {
                flag.store(true, Ordering::SeqCst);
            }
        }
        let _ = server_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut server_in, mut client_out) = (server, client);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = server_in.read(&mut buf) {
            if n == 0 {
                break;
            }
            if presigned.swap(false, Ordering::SeqCst) {
                std::thread::sleep(delay);
            }
            if client_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(std::net::Shutdown::Write);
    });
}
