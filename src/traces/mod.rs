//! Traces: each finished push and pull exported as an OpenTelemetry trace (OTLP/HTTP,
//! protobuf), and the W3C trace context that joins it with the client's and the registry's.
//!
//! Off unless an endpoint is configured; off, no request reads or writes a trace header.

mod context;
mod env;
mod export;
mod spans;

pub use context::{parse_traceparent, traceparent, ClientContext, RequestTrace, SpanId, TraceId};
pub(crate) use env::export_config;
pub(crate) use export::Exporter;
