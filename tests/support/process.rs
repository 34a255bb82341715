//! Child processes with deadlines, temp dirs, and polling: the plumbing every other helper uses.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir {
    /// Absolute path of the directory.
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory whose name says which test process made it, so leftovers are traceable.
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "regscope-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `cmd` to completion with stdout and stderr captured; kills it and panics (showing what it
/// printed) if it is still running after `timeout`, so a stuck docker or skopeo fails the test
/// instead of hanging the suite.
pub fn output(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "timed out after {timeout:?}: {shown}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout.join().unwrap()),
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Like [`output`], and panics unless the command exits 0; returns its stdout as text.
pub fn check(cmd: &mut Command, timeout: Duration) -> String {
    String::from_utf8(check_bytes(cmd, timeout)).expect("command printed non-UTF-8")
}

/// Like [`check`], for commands whose stdout is not text.
pub fn check_bytes(cmd: &mut Command, timeout: Duration) -> Vec<u8> {
    let shown = format!("{cmd:?}");
    let out = output(cmd, timeout);
    if !out.status.success() {
        panic!(
            "{shown} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.stdout
}

/// Runs `skopeo ARGS` (5 minute limit) and returns its stdout; panics on failure.
pub fn skopeo(args: &[&str]) -> String {
    check(Command::new("skopeo").args(args), Duration::from_secs(300))
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes; returns whether it held.
/// For facts that become true shortly after a client returns, such as a server's log line for a
/// response the client has already read.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a pipe to its end on a thread, so a child that fills one pipe never blocks on it.
fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}
