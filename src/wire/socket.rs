//! Socket options that keep the proxy's view of the wire honest.
//!
//! Linux lets a socket's send buffer grow to megabytes (`tcp_wmem`). Bytes parked there look
//! "sent" to the proxy while the peer has not read them yet, so a slow reader's last megabytes
//! would be timed as an idle gap after the response instead of as the reader's stall.
//! `TCP_NOTSENT_LOWAT` bounds only the *unsent* part of the buffer (bytes in flight are not
//! limited), so a write waits when the peer stops reading, and the wait is seen and attributed.
//!
//! Also here: the pass-through wrappers around a connection's IO: [`Watched`], which both sides
//! use to learn of its flushes and its end, and [`Prefixed`], a connection the front hands to hyper.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::net::TcpStream;

use crate::metrics::Counted;

/// Unsent bytes a socket may hold: small enough that the time a peer takes to read them is
/// noise (128 KiB is 1 ms at 1 Gbit/s), large enough to keep loopback throughput.
pub(crate) const UNSENT_LOWAT: u32 = 128 * 1024;

/// No Nagle delay, and a bound on unsent bytes (Linux; elsewhere only `TCP_NODELAY`).
pub(crate) fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_LOWAT);
    }
}

/// What a [`Watched`] connection tells its watcher. The watcher is dropped with the connection,
/// so its own `Drop` is the "connection closed" hook.
pub(crate) trait Watch {
    /// A flush succeeded (hyper flushes only once its write queue is empty).
    fn flushed(&self) {}
}

/// A connection's IO, passed through unchanged, with a watcher.
pub(crate) struct Watched<T, W> {
    io: T,
    watch: W,
}

impl<T, W: Watch> Watched<T, W> {
    pub(crate) fn new(io: T, watch: W) -> Self {
        Watched { io, watch }
    }
}

impl<T: Read + Unpin, W: Unpin> Read for Watched<T, W> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin, W: Watch + Unpin> Write for Watched<T, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            this.watch.flushed();
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection, W> Connection for Watched<T, W> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

/// A connection counted in an open-connections gauge: counted for as long as it lives.
impl Watch for Counted {}

/// A connection handed to hyper: the bytes the front read and did not consume come first.
pub(crate) struct Prefixed<T> {
    prefix: Bytes,
    io: T,
}

impl<T> Prefixed<T> {
    /// `prefix` holds only what the front read past its last request (it reads into a per-thread
    /// scratch buffer), so it is taken as it is, not copied.
    pub(crate) fn new(prefix: Vec<u8>, io: T) -> Self {
        Prefixed { prefix: Bytes::from(prefix), io }
    }
}

impl<T: Read + Unpin> Read for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        if this.prefix.is_empty() {
            this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: Write + Unpin> Write for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
