//! Sockets shaped for timing tests: a client whose receive buffer is small, so that when it stops
//! reading, the sender (regscope) feels it at once instead of filling megabytes of kernel buffer.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A blocking TCP connection to `addr` whose receive buffer was set to `bytes` before connecting
/// (the window scale is fixed at the handshake, so setting it afterwards is not the same), with a
/// 60 s read timeout so a stuck peer fails the test instead of hanging it.
pub fn connect_with_small_rcvbuf(addr: SocketAddr, bytes: u32) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    runtime.block_on(async {
        let socket =
            if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        let stream = socket.connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        stream
    })
}
