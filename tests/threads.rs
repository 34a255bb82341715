//! `--threads`: how many threads serve connections, and that each setting proxies.

mod support;

use std::process::{Command, Stdio};

use support::client::Conn;
use support::{Registry, Regscope};

/// tokio names its multi-thread workers `tokio-rt-worker`; a current-thread runtime has none.
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

#[test]
fn threads_sets_the_workers_and_one_thread_still_proxies() {
    let registry = Registry::start();
    for (threads, workers) in [("1", 0), ("3", 3)] {
        let regscope = Regscope::start(&["--upstream", &registry.url(), "--threads", threads]);
        let host = regscope.proxy_addr().to_string();
        for _ in 0..3 {
            let mut conn = Conn::connect(regscope.proxy_addr());
            let response = conn.request("GET", "/v2/", &[("Host", &host)], b"").unwrap();
            assert_eq!(response.status(), 200, "--threads {threads}");
        }
        assert_eq!(runtime_workers(regscope.pid()), workers, "--threads {threads}: runtime worker threads");
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
