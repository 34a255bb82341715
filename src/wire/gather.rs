//! Fewer wake-ups while a client streams a request body: the kernel wakes us per 32 to 128 KiB,
//! not per write.
//!
//! `docker push` sends a layer in 32 KiB chunks, each in three writes (4 KiB, the rest, CRLF).
//! Woken per write, the proxy read and forwarded each piece on its own, so the registry was woken
//! as often, and the wake-ups of both competed with the daemon's compression for the same cores.
//! While a streaming body is in flight, the client socket's `SO_RCVLOWAT` makes the kernel
//! signal it readable only once a quarter of its receive buffer waits, up to [`GATHER`]. Bytes
//! below the mark are never signalled, so a read that finds nothing arms a timer: within
//! [`WITHIN`] the mark drops back to one byte and stays there until a read returns data. A body's
//! tail, or a client that pauses, so waits at most that long, and the connection can never stall
//! on the mark.
//!
//! Only the socket's reads change; nothing is held back in the proxy.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The most bytes a read waits for: four of docker's chunks. The mark is at most a quarter of the
/// socket's receive buffer, read each time it is raised (the buffer grows as the body streams):
/// a mark above about half of it makes Linux grow the buffer and clamp the window to the mark.
pub(crate) const GATHER: usize = 128 * 1024;

/// The longest bytes below the mark wait before they are read anyway.
pub(crate) const WITHIN: Duration = Duration::from_millis(1);

/// Whether a connection is streaming a request body, shared by the connection's IO and its
/// requests. Set by [`Gathering::start`], cleared when the guard is dropped with the body.
#[derive(Debug, Default)]
pub(crate) struct Gathering {
    streaming: AtomicBool,
}

impl Gathering {
    /// Marks the connection as streaming a body until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> Streaming {
        self.streaming.store(true, Ordering::Relaxed);
        Streaming(self.clone())
    }
}

/// Held by a request body for as long as it streams (see [`Gathering::start`]).
#[derive(Debug)]
pub(crate) struct Streaming(Arc<Gathering>);

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.store(false, Ordering::Relaxed);
    }
}

/// Whether a request body is worth gathering: one of unknown length (chunked) or of at least a
/// megabyte. A smaller body arrives in a read or two, and its tail would only wait.
pub(crate) fn worth_gathering(declared: Option<u64>) -> bool {
    declared.is_none_or(|n| n >= 1 << 20)
}

/// A plain client connection's socket, gathering reads while [`Gathering`] says so.
pub(crate) struct Gathered {
    stream: TcpStream,
    gathering: Arc<Gathering>,
    /// Whether the socket's mark is up now.
    raised: bool,
    /// Set when the timer dropped the mark: it stays down until a read returns data.
    lowered: bool,
    /// Made on the first gathered read; re-armed, never reallocated.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` holds the deadline of the wait in progress (set by its first `Pending`,
    /// cleared by any read that completes).
    armed: bool,
}

impl Gathered {
    pub(crate) fn new(stream: TcpStream, gathering: Arc<Gathering>) -> Self {
        Gathered { stream, gathering, raised: false, lowered: false, timer: None, armed: false }
    }

    fn set_mark(&mut self, up: bool) {
        let mark = if up { mark_for(&self.stream) } else { 1 };
        self.raised = up;
        // A socket that refuses the option just wakes us per write, as it did before.
        let _ = set_rcvlowat(&self.stream, mark);
    }
}

/// A quarter of the socket's receive buffer now, at most `GATHER`.
fn mark_for(stream: &TcpStream) -> i32 {
    let buffer = socket2::SockRef::from(stream).recv_buffer_size().unwrap_or(GATHER * 4);
    i32::try_from(GATHER.min(buffer / 4).max(1)).unwrap_or(1)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn set_rcvlowat(stream: &TcpStream, mark: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::socklen_t::try_from(std::mem::size_of::<i32>()).unwrap_or(4);
    // SAFETY: setsockopt reads `len` bytes from `mark`, a live local, and the fd is open for as
    // long as `stream` is borrowed.
    let rc = unsafe {
        libc::setsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&raw const mark).cast(), len)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere the mark does not gate poll readiness the same way: never raise it.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_rcvlowat(_: &TcpStream, _: i32) -> io::Result<()> {
    Ok(())
}

impl AsyncRead for Gathered {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = cfg!(any(target_os = "linux", target_os = "android"))
            && this.gathering.streaming.load(Ordering::Relaxed)
            && !this.lowered;
        if want != this.raised {
            this.set_mark(want);
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &polled {
            Poll::Ready(_) => {
                this.armed = false;
                if buf.filled().len() > before {
                    this.lowered = false;
                }
            }
            Poll::Pending if this.raised => {
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(WITHIN)));
                if !this.armed {
                    timer.as_mut().reset(Instant::now() + WITHIN);
                    this.armed = true;
                }
                if timer.as_mut().poll(cx).is_ready() {
                    // Dropping the mark signals the socket readable if anything waits.
                    this.armed = false;
                    this.lowered = true;
                    this.set_mark(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl AsyncWrite for Gathered {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[test]
    fn which_bodies_are_gathered() {
        for (declared, gathered) in [(None, true), (Some(0), false), (Some(4096), false), (Some(1 << 20), true)] {
            assert_eq!(worth_gathering(declared), gathered, "{declared:?}");
        }
    }

    #[tokio::test]
    async fn bytes_below_the_mark_are_read_within_the_timer() {
        let (mut client, server) = pair().await;
        let gathering = Arc::new(Gathering::default());
        let _streaming = gathering.start();
        let mut gathered = Gathered::new(server, gathering.clone());
        for round in 0..20u8 {
            // Ten bytes, far below the mark, then nothing: only the timer can bring them in.
            client.write_all(&[round; 10]).await.unwrap();
            let mut buf = [0u8; 64];
            let started = std::time::Instant::now();
            let n = tokio::time::timeout(Duration::from_secs(5), gathered.read(&mut buf)).await.unwrap().unwrap();
            assert_eq!(&buf[..n], &[round; 10][..n]);
            assert!(started.elapsed() < Duration::from_secs(1), "round {round}: {:?}", started.elapsed());
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn gathers_writes_into_one_read_and_lets_go_when_the_body_ends() {
        // docker's chunk: the mark, a quarter of Linux's default receive buffer (128 KiB).
        const CHUNK: usize = 32 * 1024;
        let (mut client, server) = pair().await;
        let gathering = Arc::new(Gathering::default());
        let streaming = gathering.start();
        let mut gathered = Gathered::new(server, gathering.clone());
        let mut buf = vec![0u8; 256 * 1024];
        // Prime: the first read raises the mark and waits.
        let reader = tokio::spawn(async move {
            let mut sizes = Vec::new();
            let mut total = 0;
            while total < 8 * CHUNK {
                let n = gathered.read(&mut buf).await.unwrap();
                sizes.push(n);
                total += n;
            }
            (gathered, sizes)
        });
        // A chunk in three writes, as docker sends one, eight times over.
        for _ in 0..8 {
            for piece in [4096, CHUNK - 4096 - 2, 2] {
                client.write_all(&vec![1u8; piece]).await.unwrap();
                tokio::task::yield_now().await;
            }
        }
        let (mut gathered, sizes) = reader.await.unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 8 * CHUNK);
        assert!(sizes.len() <= 12, "one read per chunk or close to it: {sizes:?}");
        // The body ended: a request head is read at once, without waiting for the timer.
        drop(streaming);
        client.write_all(b"HEAD / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut head = [0u8; 64];
        let n = gathered.read(&mut head).await.unwrap();
        assert!(n > 0);
        assert!(!gathered.raised);
    }
}
