//! All integration tests, compiled into one binary (`autotests = false`).

mod ack_latency;
mod audit;
mod bad_input;
mod brokers;
mod chaos;
mod config;
mod crash;
mod device_behaviour;
mod e2e;
mod encryption;
mod faults;
mod harness;
mod health;
mod ingest;
mod logging;
mod property;
mod slow_link;
mod support;
mod support_kit_selftest;
mod support_selftest;
mod tls_matrix;
mod watchdog;
