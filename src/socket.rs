//! Socket options that keep the proxy's view of the wire honest.
//!
//! Linux lets a socket's send buffer grow to megabytes (`tcp_wmem`). Bytes parked there look
//! "sent" to the proxy while the peer has not read them yet, so a slow reader's last megabytes
//! would be timed as an idle gap after the response instead of as the reader's stall.
//! `TCP_NOTSENT_LOWAT` bounds only the *unsent* part of the buffer (bytes in flight are not
//! limited), so a write waits when the peer stops reading, and the wait is seen and attributed.

use tokio::net::TcpStream;

/// Unsent bytes a socket may hold: small enough that the time a peer takes to read them is
/// noise (128 KiB is 1 ms at 1 Gbit/s), large enough to keep loopback throughput.
pub const UNSENT_LOWAT: u32 = 128 * 1024;

/// No Nagle delay, and a bound on unsent bytes (Linux; elsewhere only `TCP_NODELAY`).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_LOWAT);
    }
}
