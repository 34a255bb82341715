//! Body timing: the wrapper that splits each body's life between its source, its sink and
//! bytes moving, and the exchange that gathers one request's facts and records them once.

mod capture;
mod drain;
mod exchange;
mod outcome;
mod timed;

pub(crate) use drain::Drain;
pub use exchange::LiveExchange;
pub(crate) use exchange::{Exchange, ExchangeRecord, ExchangeSink, Recorders, ResponseInfo};
pub(crate) use outcome::BodyOutcome;
pub(crate) use timed::TimedBody;
