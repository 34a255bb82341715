//! The one Docker daemon a test run shares: `script/test` starts it and names its socket in
//! `REGSCOPE_TEST_DOCKER_HOST`; tests only drive the `docker` client against it.

use std::process::{Command, Output};
use std::time::Duration;

use super::image::TestImage;
use super::process::{check, output};

/// Names the daemon socket, e.g. `unix:///tmp/regscope-dockerd.X/docker.sock`.
const HOST_VAR: &str = "REGSCOPE_TEST_DOCKER_HOST";

/// How long one docker command may take: a push or pull of tens of MiB through the proxy takes
/// seconds; minutes mean something hangs.
const TIMEOUT: Duration = Duration::from_secs(300);

/// A `docker` client bound to the test daemon.
pub struct Docker {
    /// The `DOCKER_HOST` every command gets.
    host: String,
}

/// The shared test daemon. Panics when none is configured: a docker test that skipped itself would
/// report a pass that proves nothing.
pub fn docker() -> Docker {
    match std::env::var(HOST_VAR) {
        Ok(host) if !host.is_empty() => Docker { host },
        _ => panic!(
            "{HOST_VAR} is not set: run script/test, or start dockerd and set {HOST_VAR}=unix:///path/to/docker.sock"
        ),
    }
}

impl Docker {
    /// `docker` with `DOCKER_HOST` set, for commands the helpers below do not cover.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", &self.host);
        cmd
    }

    /// Runs `docker ARGS`, panicking with its output unless it exits 0; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        check(self.command().args(args), TIMEOUT)
    }

    /// Runs `docker ARGS` and returns whatever happened, for tests that expect a failure.
    pub fn try_run(&self, args: &[&str]) -> Output {
        output(self.command().args(args), TIMEOUT)
    }

    /// `docker load` of the image's archive; afterwards the daemon knows it by `image.reference`.
    pub fn load(&self, image: &TestImage) {
        let archive = image.archive.to_str().expect("UTF-8 temp path");
        self.run(&["load", "--input", archive]);
    }

    /// The image ID (`sha256:…` of its config) of a local image.
    pub fn image_id(&self, reference: &str) -> String {
        self.run(&["image", "inspect", "--format", "{{.Id}}", reference]).trim().to_string()
    }

    pub fn push(&self, reference: &str) -> String {
        self.run(&["push", reference])
    }

    pub fn pull(&self, reference: &str) -> String {
        self.run(&["pull", reference])
    }

    /// Removes a local tag and, with its last tag, the image and its layers, so a later pull has to
    /// fetch everything again.
    pub fn rmi(&self, reference: &str) {
        self.run(&["rmi", reference]);
    }
}

/// Runs `ctr ARGS` in `namespace` against the containerd of the test run's daemon; panics unless
/// it exits 0.
pub fn ctr(namespace: &str, args: &[&str]) {
    let mut ctr = Command::new("ctr");
    ctr.args(["--address", &containerd_socket(), "--namespace", namespace]);
    check(ctr.args(args), Duration::from_secs(120));
}

/// The containerd that the test run's dockerd supervises: `script/test` gives dockerd
/// `--exec-root D/exec` beside `-H unix://D/docker.sock`.
pub fn containerd_socket() -> String {
    let host = std::env::var("REGSCOPE_TEST_DOCKER_HOST").expect("REGSCOPE_TEST_DOCKER_HOST (run script/test)");
    let dir = host.strip_prefix("unix://").and_then(|s| s.strip_suffix("/docker.sock")).expect("unix://D/docker.sock");
    format!("{dir}/exec/containerd/containerd.sock")
}
