//! Test harness: starts the real pieces (a distribution registry, regscope, the shared dockerd,
//! skopeo) on loopback sockets and gives tests what they need to look at them.
//!
//! Layout: `process` runs child commands with timeouts, `net` holds sockets and a tiny HTTP client,
//! `registry`, `regscope` and `docker` wrap one program each, and `image` writes test images.
//!
//! Every integration test file does `mod support;` and uses a subset of this module, so items a given
//! test binary does not use are expected; hence the allowances below.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod client;
mod docker;
pub mod hostile;
mod image;
mod net;
pub mod otlp;
mod process;
mod registry;
mod regscope;
pub mod relay;
pub mod replay;
mod storage;
pub mod timing;
mod token;

pub use docker::{containerd_socket, ctr, docker, Docker};
pub use image::{go_arch, sha256_digest, sha256_file, LayerInfo, TestImage};
pub use net::{free_port, head_header, http_get, read_request_head, wait_for_tcp, HttpResponse, RequestHead};
pub use process::{check, check_bytes, eventually, output, skopeo, TempDir};
pub use registry::{LoggedRequest, Registry, RegistryOptions};
pub use regscope::{metric_sum, Regscope, RequestEvent};
pub use storage::{ObjectStorage, SlowStorage};
pub use token::{TokenService, SERVICE as TOKEN_SERVICE};
