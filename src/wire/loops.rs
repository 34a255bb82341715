//! Event loops: the accepting runtime and one current-thread runtime per further thread, each
//! serving the connections handed to it.
//!
//! A connection stays on the loop it was given for its whole life, and its exchanges run on that
//! one thread: over its paired upstream connection (see [`crate::wire::paired`]) or the loop's
//! own pools (see [`crate::wire::upstream::Upstreams`]), within the loop's share of the
//! admission slots (see [`crate::limits::shares`]). No request wakes another thread, and a
//! thread with nothing to do sleeps in its own `epoll_wait` instead of handing work to a
//! sibling. Connections are dealt in turn.

use std::future::Future;
use std::io;
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The loops serving connections; dropping it ends the extra ones (and any connection still on them).
pub(crate) struct Loops {
    /// Loop 0 is the accepting runtime itself.
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
    next: usize,
}

impl Loops {
    /// The current runtime and `threads - 1` more, each on a thread of its own.
    pub(crate) fn start(threads: usize) -> io::Result<Self> {
        let mut loops = Loops { handles: vec![Handle::current()], threads: Vec::new(), next: 0 };
        for n in 1..threads {
            // Its blocking pool (DNS lookups) is named apart from the loops.
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().thread_name("regscope-block").build()?;
            let (stop, stopped) = oneshot::channel();
            loops.handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new().name(format!("regscope-loop-{n}")).spawn(move || {
                let _ = runtime.block_on(stopped);
                // Blocking work (a DNS lookup) may not end soon; nothing waits for it.
                runtime.shutdown_background();
            })?;
            loops.threads.push((stop, thread));
        }
        Ok(loops)
    }

    /// How many loops there are.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// Serves `stream` with `serve` on the next loop in turn; `serve` is told which (`0..len`).
    pub(crate) fn spawn<F, Fut>(&mut self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next;
        self.next = (index + 1) % self.handles.len();
        if index == 0 {
            tokio::spawn(serve(stream, 0));
            return;
        }
        // A socket is registered with one runtime's reactor: it leaves this one and joins the
        // other's, on that loop's thread.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return tracing::debug!(%error, "handing a connection to its loop failed"),
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream, index).await,
                Err(error) => tracing::debug!(%error, "registering a connection with its loop failed"),
            }
        });
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        let threads: Vec<JoinHandle<()>> = self
            .threads
            .drain(..)
            .map(|(stop, thread)| {
                let _ = stop.send(());
                thread
            })
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// For each of `n` connections, the loop it was told it is on and the name of the thread that
    /// served it, sorted; and the connections' client ends.
    async fn served(loops: &mut Loops, n: usize) -> (Vec<(usize, String)>, Vec<std::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            loops.spawn(stream, move |stream, on_loop| async move {
                let name = std::thread::current().name().unwrap_or_default().to_owned();
                tx.send((on_loop, name)).unwrap();
                // Held open until the loop ends.
                let _stream = stream;
                std::future::pending::<()>().await;
            });
        }
        let mut seen = Vec::new();
        for _ in 0..n {
            seen.push(rx.recv().await.unwrap());
        }
        seen.sort();
        (seen, clients)
    }

    #[tokio::test]
    async fn connections_are_dealt_in_turn_and_end_with_their_loops() {
        let mut loops = Loops::start(3).unwrap();
        assert_eq!(loops.len(), 3);
        let here = std::thread::current().name().unwrap_or_default().to_owned();
        let (seen, mut clients) = served(&mut loops, 6).await;
        let expected: Vec<(usize, String)> = [(0, here.as_str()), (1, "regscope-loop-1"), (2, "regscope-loop-2")]
            .into_iter()
            .flat_map(|(i, name)| [(i, name.to_owned()), (i, name.to_owned())])
            .collect();
        assert_eq!(seen, expected, "each loop served two connections, on its own thread");
        drop(loops);
        // The two on this runtime stay open; the four on the ended loops are closed.
        let mut closed = 0;
        for client in &mut clients {
            client.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
            if matches!(client.read(&mut [0u8; 1]), Ok(0)) {
                closed += 1;
            }
        }
        assert_eq!(closed, 4, "connections on ended loops are closed");
    }

    #[tokio::test]
    async fn one_loop_is_the_current_runtime_alone() {
        let mut loops = Loops::start(1).unwrap();
        let here = std::thread::current().name().unwrap_or_default().to_owned();
        let (seen, _clients) = served(&mut loops, 3).await;
        assert_eq!(seen, vec![(0, here); 3]);
    }
}
