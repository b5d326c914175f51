//! A slow uplink must not drop a connection that is carrying data: a backlog
//! buffered while the broker was away drains over 5 kbit/s (625 bytes per
//! second each way, the fault proxy's bandwidth cap) on one connection,
//! exactly once, at the default batch size and at the largest.
//!
//! Before the send budget (`src/mqtt/publisher.rs`), the PINGREQ queued
//! behind the backlog and "no PINGRESP within the keep-alive" cut the link
//! again and again; with `batch_max_readings = 1000` it never drained.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, ids};
use crate::support::{FaultProxy, Receiver};

/// 5 kbit/s.
const BYTES_PER_SEC: u64 = 625;
/// About 250 bytes each on the wire: some 50 s at 625 bytes per second.
const BACKLOG: usize = 120;

fn reading_ids(deliveries: &[crate::support::Received]) -> Vec<String> {
    deliveries
        .iter()
        .flat_map(|d| {
            let v: Value = serde_json::from_slice(&d.payload).expect("a JSON payload");
            ids(&v)
        })
        .collect()
}

/// Buffers [`BACKLOG`] readings while the broker is down, then lets the
/// link open at 5 kbit/s and checks the backlog drains exactly once on one
/// connection, with no reconnect in hearth's log.
fn a_backlog_drains_over_5_kbit_on_one_connection(id: &str, batch: usize) {
    let mut rig = Rig::new(id);
    let proxy = FaultProxy::start(([127, 0, 0, 1], rig.broker.port).into());
    let mut gw = GatewayOpts::new(id);
    gw.mqtt_port = Some(proxy.port);
    gw.batch = batch;
    // The minimum keep-alive, so that a PINGREQ stuck behind data shows.
    gw.keep_alive = 5;
    let topics = [
        format!("hearth/v1/{id}/readings"),
        format!("hearth/v1/{id}/alerts"),
    ];
    let receiver = Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        &format!("hospital-{id}"),
        &[&topics[0], &topics[1]],
    );

    // A first run makes the broker session, so that the drain below needs
    // no clean-session round first (a new store makes one connection for
    // that, then the real one).
    let warmup = Sim::start(&[
        "--count",
        "1",
        "--interval-ms",
        "0",
        "--alert-rate",
        "0",
        "--device-id",
        "PM-WARMUP",
    ]);
    let config = rig.config(&gw, &warmup.pty);
    let mut hearth = Hearth::start(&config);
    warmup.finish(Duration::from_secs(20));
    assert!(
        receiver.wait_until(Duration::from_secs(20), |all| reading_ids(all).len() == 1),
        "the warm-up reading did not arrive"
    );
    assert!(hearth.stop().success());

    // The hospital is away while the device hands over its backlog.
    rig.broker.stop();
    let count = BACKLOG.to_string();
    let sim = Sim::start(&["--count", &count, "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let hearth = Hearth::start(&config);
    let summary = sim.finish(Duration::from_secs(60));
    assert_eq!(summary["acked"], BACKLOG, "{summary}");

    // Back, over 5 kbit/s.
    proxy.set_bandwidth(Some(BYTES_PER_SEC));
    let log_before = hearth.log_text().len();
    let forwarded_before = proxy.forwarded();
    let opened = Instant::now();
    rig.broker.relaunch();
    let want = BACKLOG + 1;
    // Twice the time the bytes need at the cap, and some.
    let limit = Duration::from_secs((BACKLOG as u64 * 250 * 2) / BYTES_PER_SEC + 30);
    let drained = receiver.wait_until(limit, |all| reading_ids(all).len() >= want);
    let took = opened.elapsed();
    let log = hearth.log_text()[log_before..].to_owned();
    let connections = proxy.forwarded() - forwarded_before;
    eprintln!(
        "slow link ({id}, batch {batch}): {BACKLOG} readings over {BYTES_PER_SEC} B/s in {took:.1?} on {connections} connection(s)"
    );
    assert!(
        drained,
        "{} of {want} readings arrived within {limit:?}\n{log}",
        reading_ids(&receiver.deliveries()).len()
    );
    // Exactly once.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in reading_ids(&receiver.deliveries()) {
        *seen.entry(id).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert_eq!(seen.len(), want);
    // On one connection: the proxy forwarded one, hearth connected once and
    // never lost it.
    assert_eq!(connections, 1, "connections through the proxy\n{log}");
    assert_eq!(log.matches("Connected to broker.").count(), 1, "{log}");
    assert!(!log.contains("Broker connection lost"), "{log}");
}

#[test]
fn a_backlog_drains_over_5_kbit_on_one_connection_at_the_default_batch() {
    a_backlog_drains_over_5_kbit_on_one_connection("gw-slow", 64);
}

#[test]
fn a_backlog_drains_over_5_kbit_on_one_connection_with_batches_of_1000() {
    a_backlog_drains_over_5_kbit_on_one_connection("gw-slow-1000", 1000);
}
