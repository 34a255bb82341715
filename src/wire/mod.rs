//! The wire: listeners and TLS, one exchange forwarded end to end, the upstream pool, header
//! and `Location` rewriting, and the errors a client sees when the registry cannot answer.

pub(crate) mod elsewhere;
pub(crate) mod error;
pub(crate) mod front;
pub(crate) mod gather;
pub(crate) mod h1;
pub(crate) mod h1_front;
pub mod headers;
pub(crate) mod identity;
pub(crate) mod location;
pub(crate) mod loops;
pub(crate) mod paired;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub(crate) mod redact;
pub(crate) mod redirects;
pub(crate) mod send;
pub(crate) mod server;
pub(crate) mod socket;
pub(crate) mod tls;
pub(crate) mod upstream;
