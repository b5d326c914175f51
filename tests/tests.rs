//! All integration tests, compiled into one binary (`autotests = false`).

mod e2e;
mod harness;
mod support;
mod support_selftest;
