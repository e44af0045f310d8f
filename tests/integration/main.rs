//! jobmirror's integration tests: one binary, real SQLite files, the real HTTP client talking
//! to the fake Pleo over loopback, and a manual clock for everything time-dependent.

mod harness;

mod backends;
mod bench;
mod by_credential;
mod cli;
mod client;
mod companies;
mod company_oauth;
mod edge;
mod handler_boundary;
mod house;
mod httpd;
mod instances;
mod leases;
mod mirror;
mod oauth;
mod openapi;
mod operations;
mod ops;
mod pg_oauth;
mod postgres;
mod processing;
mod processor;
mod reliability;
mod reload;
mod replay;
mod replay_runs;
mod scale;
mod seams;
mod standby;
mod store;
mod webhook;
