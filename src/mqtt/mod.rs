//! The broker side: mutual TLS, one MQTT connection, payloads and the
//! publisher that drives QoS 2 from the outbox.

pub mod compact;
pub mod connection;
pub mod incoming;
pub mod payload;
pub mod publisher;
pub mod tls;
pub mod wire;
