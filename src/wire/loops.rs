//! Event loops: the accepting runtime and one current-thread runtime per further thread, each
//! serving the connections handed to it.
//!
//! A connection stays on the loop it was given for its whole life, and its exchanges (with the
//! paired upstream connection, see [`crate::wire::paired`]) run on that one thread: no request
//! wakes another thread, and a thread with nothing to do sleeps in its own `epoll_wait` instead
//! of handing work to a sibling. Connections are dealt in turn.

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
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
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

    /// Serves `stream` with `serve` on the next loop in turn.
    pub(crate) fn spawn<F, Fut>(&mut self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next;
        self.next = (index + 1) % self.handles.len();
        if index == 0 {
            tokio::spawn(serve(stream));
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
                Ok(stream) => serve(stream).await,
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

    /// The names of the threads that served `n` connections, and the connections' client ends.
    async fn serving_threads(loops: &mut Loops, n: usize) -> (Vec<String>, Vec<std::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            loops.spawn(stream, move |stream| async move {
                let name = std::thread::current().name().unwrap_or_default().to_owned();
                tx.send(name).unwrap();
                // Held open until the loop ends.
                let _stream = stream;
                std::future::pending::<()>().await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..n {
            names.push(rx.recv().await.unwrap());
        }
        (names, clients)
    }

    #[tokio::test]
    async fn connections_are_dealt_in_turn_and_end_with_their_loops() {
        let mut loops = Loops::start(3).unwrap();
        let here = std::thread::current().name().unwrap_or_default().to_owned();
        let (names, mut clients) = serving_threads(&mut loops, 6).await;
        let dealt = [here.as_str(), "regscope-loop-1", "regscope-loop-2"];
        let mut sorted = names.clone();
        sorted.sort();
        let mut expected: Vec<String> = dealt.iter().chain(dealt.iter()).map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(sorted, expected, "each loop served two connections");
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
        let (names, _clients) = serving_threads(&mut loops, 3).await;
        assert_eq!(names, vec![here; 3]);
    }
}
