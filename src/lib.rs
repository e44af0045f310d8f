//! jobmirror: mirrors Pleo export jobs into SQLite, claims them oldest-first (one at a time
//! per company), resumes held jobs after a crash without claiming twice, and tracks every
//! held job's expiry deadline. See ARCHITECTURE.md for the map.

pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod fake;
pub mod fake_rules;
pub mod fuzzing;
pub mod handler;
pub mod health;
pub mod httpd;
pub mod logging;
pub mod mirror;
pub mod net;
pub mod notify;
pub mod oauth;
pub mod ops;
pub mod pipeline;
pub mod pleo;
pub mod processor;
pub mod replay;
pub mod service;
pub mod simulate;
pub mod snapshot;
pub mod store;
pub mod webhook;
pub mod wire;
