//! The seeded chaos test: exactly once under kill -9, broker restarts, cut
//! and blackholed links, all at once.
//!
//! A simulated device sends 5,000 readings (resending what is not ACKed, as
//! a device must). Meanwhile the test kills `hearth run` with SIGKILL at 20
//! random instants (and restarts it), restarts mosquitto (persistence on) 5
//! times, and cuts or blackholes the gateway's link 20 times through a
//! fault-injecting proxy. An exactly-once QoS 2 receiver with a persistent
//! session, connected to the broker directly, records every delivery.
//!
//! Asserted: every reading delivered, 0 duplicate deliveries (counted per
//! MQTT message the receiver delivered, not after deduplication), per-device
//! seq order on each topic, and `PRAGMA integrity_check` = ok.
//!
//! `HEARTH_CHAOS_SEED=N` replays a run; the seed is printed either way.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::harness::{GatewayOpts, Hearth, Rig, Sim};
use crate::support::{FaultProxy, Received, Receiver};

const READINGS: u64 = 5000;
const KILLS: usize = 20;
const BROKER_RESTARTS: usize = 5;
const LINK_FAULTS: usize = 20;
/// The faults are spread over this much time.
const SPAN: Duration = Duration::from_secs(45);

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    BrokerRestart,
    Cut,
    CutAfterBytes(u64),
    Blackhole(Duration),
}

fn seed() -> u64 {
    match std::env::var("HEARTH_CHAOS_SEED") {
        Ok(s) => s.parse().expect("HEARTH_CHAOS_SEED must be a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn schedule(rng: &mut fastrand::Rng) -> Vec<(Duration, Fault)> {
    let mut plan = Vec::new();
    let at = |rng: &mut fastrand::Rng| SPAN.mul_f64(rng.f64());
    for _ in 0..KILLS {
        plan.push((at(rng), Fault::Kill));
    }
    for _ in 0..BROKER_RESTARTS {
        plan.push((at(rng), Fault::BrokerRestart));
    }
    for _ in 0..LINK_FAULTS {
        let fault = match rng.u8(0..3) {
            0 => Fault::Cut,
            1 => Fault::CutAfterBytes(rng.u64(1..30_000)),
            _ => Fault::Blackhole(Duration::from_millis(rng.u64(500..9_000))),
        };
        plan.push((at(rng), fault));
    }
    plan.sort_by_key(|(t, _)| *t);
    plan
}

fn reading_ids(d: &Received) -> Vec<(String, String, u64)> {
    let v: serde_json::Value = serde_json::from_slice(&d.payload).expect("JSON payload");
    v["readings"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap().to_owned(),
                        r["device"].as_str().unwrap().to_owned(),
                        r["seq"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn exactly_once_through_kills_broker_restarts_and_link_faults() {
    let seed = seed();
    eprintln!("chaos: seed {seed} (HEARTH_CHAOS_SEED={seed} replays the fault plan)");
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let plan = schedule(&mut rng);

    let mut rig = Rig::new("gw-chaos");
    let proxy = FaultProxy::start(([127, 0, 0, 1], rig.broker.port).into());
    let mut gw = GatewayOpts::new("gw-chaos");
    gw.mqtt_port = Some(proxy.port);
    let receiver = Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-chaos",
        &["hearth/v1/gw-chaos/readings", "hearth/v1/gw-chaos/alerts"],
    );
    let count = READINGS.to_string();
    let sim_seed = seed.to_string();
    let sim = Sim::start(&[
        "--count",
        &count,
        "--interval-ms",
        "7",
        "--window",
        "8",
        "--ack-timeout-ms",
        "500",
        "--alert-rate",
        "0.02",
        "--seed",
        &sim_seed,
    ]);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth = Hearth::start(&config);

    let (mut kills, mut restarts, mut cuts, mut blackholes) = (0, 0, 0, 0);
    let t0 = Instant::now();
    for (at, fault) in &plan {
        if let Some(wait) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        match *fault {
            Fault::Kill => {
                hearth.kill9();
                kills += 1;
                hearth.restart();
            }
            Fault::BrokerRestart => {
                rig.broker.restart();
                restarts += 1;
            }
            Fault::Cut => {
                proxy.cut_now();
                cuts += 1;
            }
            Fault::CutAfterBytes(n) => {
                proxy.cut_after_bytes(n);
                cuts += 1;
            }
            Fault::Blackhole(d) => {
                proxy.blackhole(true);
                std::thread::sleep(d);
                proxy.blackhole(false);
                blackholes += 1;
            }
        }
    }
    eprintln!(
        "chaos: fault plan done after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let summary = sim.finish(Duration::from_secs(180));
    assert_eq!(summary["acked"], READINGS, "{summary}");
    let complete = receiver.wait_until(Duration::from_secs(120), |all| {
        let mut ids = std::collections::HashSet::new();
        for d in all {
            for (id, ..) in reading_ids(d) {
                ids.insert(id);
            }
        }
        ids.len() as u64 >= READINGS
    });
    assert!(hearth.stop().success(), "hearth did not stop cleanly");
    // Counted after hearth stopped, so a late duplicate would show.
    let deliveries = receiver.deliveries();

    // Count per delivered MQTT message: no deduplication here.
    let mut times: HashMap<String, usize> = HashMap::new();
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut out_of_order = Vec::new();
    for d in &deliveries {
        for (id, device, seq) in reading_ids(d) {
            *times.entry(id).or_default() += 1;
            if let Some(prev) = last.insert((d.topic.clone(), device), seq)
                && seq <= prev
            {
                out_of_order.push((d.topic.clone(), prev, seq));
            }
        }
    }
    let missing: Vec<u64> = (1..=READINGS)
        .filter(|seq| !times.contains_key(&format!("gw-chaos/PM-000001/{seq}")))
        .collect();
    let duplicated: usize = times.values().map(|n| n.saturating_sub(1)).sum();

    let conn = rusqlite::Connection::open(rig.db(&gw)).expect("open db");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    let log = hearth.log_text();
    let unseen = log.matches("An earlier CONNECT got no CONNACK").count();
    let lost_sessions = log.matches("Broker has no session").count();

    eprintln!(
        "chaos: seed={seed} readings={READINGS} kills={kills} broker_restarts={restarts} cuts={cuts} \
         blackholes={blackholes} lost={} duplicated={duplicated} out_of_order={} \
         messages={} broker_retransmissions_ignored={} receiver_reconnects={} \
         unseen_connack_requeues={unseen} lost_sessions={lost_sessions} wall={:.1}s",
        missing.len(),
        out_of_order.len(),
        deliveries.len(),
        receiver.broker_retransmissions(),
        receiver.connects().saturating_sub(1),
        started.elapsed().as_secs_f64()
    );
    if !out_of_order.is_empty() {
        eprintln!("chaos: out of order (topic, previous seq, seq): {out_of_order:?}");
    }
    assert!(
        complete,
        "not every reading arrived; missing seqs: {missing:?}"
    );
    assert!(missing.is_empty(), "lost readings: {missing:?}");
    assert_eq!(duplicated, 0, "duplicate deliveries (seed {seed})");
    assert!(
        out_of_order.is_empty(),
        "out of order (topic, prev, seq): {out_of_order:?}"
    );
    assert_eq!(integrity, "ok");
    // The receiver sets aside only mosquitto's own re-sends after a restart
    // (DUP=1, same id and content as the message it just completed): at
    // most a window's worth per restart.
    assert!(
        receiver.broker_retransmissions() <= BROKER_RESTARTS * 20,
        "too many messages set aside as broker retransmissions: {}",
        receiver.broker_retransmissions()
    );
    assert_eq!(
        (kills, restarts, cuts + blackholes),
        (KILLS, BROKER_RESTARTS, LINK_FAULTS)
    );
}
