//! Presentation: the admin port (metrics, health, API, pages), the report table and verdict,
//! and the waterfall of one transfer.

pub(crate) mod admin;
pub mod report;
pub mod ui;
pub mod waterfall;
