//! A TCP relay in front of a loopback server that can shape the response to a request it
//! recognises: hold it back (storage of a known slowness) or cut it off after some bytes (a
//! registry whose connection dies mid-body). Everything else passes both ways unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What to do to the response to a recognised request.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// Start sending it this long after the server did.
    Delay(Duration),
    /// Send this many of its bytes, then close both connections.
    CutAfter(usize),
}

/// Looks at what the client sent (one read's worth) and says how to shape the response to it.
pub type Pick = dyn Fn(&[u8]) -> Option<Shape> + Send + Sync;

pub struct Relay {
    addr: SocketAddr,
}

impl Relay {
    pub fn start(target: SocketAddr, pick: Arc<Pick>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else { continue };
                relay(client, server, pick.clone());
            }
        });
        Relay { addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies both ways; the response after a request `pick` recognised is shaped from its first read.
fn relay(client: TcpStream, server: TcpStream, pick: Arc<Pick>) {
    let pending: Arc<Mutex<Option<Shape>>> = Arc::default();
    let (mut client_in, mut server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let recognised = pending.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = client_in.read(&mut buf) {
            if n == 0 || server_out.write_all(&buf[..n]).is_err() {
                break;
            }
            if let Some(shape) = pick(&buf[..n]) {
                *recognised.lock().unwrap() = Some(shape);
            }
        }
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let (mut server_in, mut client_out) = (server, client);
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        // Bytes the response being cut may still send.
        let mut left: Option<usize> = None;
        while let Ok(n) = server_in.read(&mut buf) {
            if n == 0 {
                break;
            }
            match pending.lock().unwrap().take() {
                Some(Shape::Delay(delay)) => thread::sleep(delay),
                Some(Shape::CutAfter(keep)) => left = Some(keep),
                None => {}
            }
            let n = left.map_or(n, |left| n.min(left));
            if client_out.write_all(&buf[..n]).is_err() {
                break;
            }
            if let Some(left) = &mut left {
                *left -= n;
                if *left == 0 {
                    let _ = server_in.shutdown(Shutdown::Both);
                    let _ = client_out.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        let _ = client_out.shutdown(Shutdown::Write);
    });
}
