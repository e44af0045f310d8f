//! jobmirror: mirrors Pleo export jobs into SQLite, claims them oldest-first (one at a time
//! per company), resumes held jobs after a crash without claiming twice, and tracks every
//! held job's expiry deadline. See ARCHITECTURE.md for the map.

pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod edge;
pub mod health;
pub mod logging;
pub mod memory;
pub mod ops;
pub mod pleo;
pub mod processing;
pub mod replay;
pub mod sandbox;
pub mod service;
pub mod store;
pub mod wire;
