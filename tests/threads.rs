//! `--threads`: how many event loops serve connections, and that each setting proxies.

mod support;

use std::process::{Command, Stdio};

use support::client::Conn;
use support::{Registry, Regscope};

/// How many of the process's threads have a name starting with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[test]
fn threads_sets_the_loops_and_every_loop_proxies() {
    let registry = Registry::start();
    for (threads, extra_loops) in [("1", 0), ("3", 2)] {
        let regscope = Regscope::start(&["--upstream", &registry.url(), "--threads", threads]);
        let host = regscope.proxy_addr().to_string();
        // Connections are dealt to the loops in turn: three or more reach every loop.
        for _ in 0..6 {
            let mut conn = Conn::connect(regscope.proxy_addr());
            let response = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
            assert_eq!(response.status(), 200, "--threads {threads}");
        }
        assert_eq!(threads_named(regscope.pid(), "regscope-loop-"), extra_loops, "--threads {threads}: loop threads");
        // No work-stealing runtime: each loop is a current-thread runtime.
        assert_eq!(threads_named(regscope.pid(), "tokio-rt-worker"), 0, "--threads {threads}: runtime workers");
    }
}

#[test]
fn zero_threads_is_refused_with_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_regscope"))
        .args(["serve", "--upstream", "http://127.0.0.1:9", "--threads", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "--threads 0 was accepted: {stderr}");
    assert!(stderr.contains("--threads"), "the error names the flag: {stderr}");
}
