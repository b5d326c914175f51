//! hearth: a home gateway for cardiac-implant telemetry.
//!
//! A bedside device streams an implant's readings over a serial line
//! ([`serial`]); each one is committed durably to an SQLite outbox
//! ([`outbox`]) before the device gets its ACK, then published to the
//! hospital's MQTT broker with QoS 2 over mutual TLS ([`mqtt`]).

pub mod alarm;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod failpoint;
pub mod gateway;
pub mod health;
pub mod logging;
pub mod mqtt;
pub mod outbox;
pub mod reading;
pub mod serial;
pub mod simulator;
pub mod watchdog;
