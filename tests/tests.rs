//! All integration tests, compiled into one binary (`autotests = false`).

mod bad_input;
mod chaos;
mod config;
mod crash;
mod e2e;
mod faults;
mod harness;
mod ingest;
mod support;
mod support_kit_selftest;
mod support_selftest;
