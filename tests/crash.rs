//! kill -9 of `hearth run`: the broker publishes the will in time, a restart
//! comes back online with a higher session, and nothing ACKed is lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, readings};
use crate::support::Subscriber;

#[test]
fn kill9_publishes_the_will_and_a_restart_loses_nothing() {
    let rig = Rig::new("gw-kill");
    let gw = GatewayOpts::new("gw-kill");
    let keep_alive = Duration::from_secs(gw.keep_alive.into());
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-kill",
        &["hearth/v1/gw-kill/#"],
    );
    let sim = Sim::start(&["--count", "400", "--interval-ms", "5", "--seed", "11"]);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth = Hearth::start(&config);

    let is_status = |d: &crate::support::Delivery, state: &str| {
        d.topic.ends_with("/status") && d.payload["state"] == state
    };
    // Online, and some readings through, before the crash.
    let got = sub.collect_until(Duration::from_secs(20), |all| {
        all.iter().any(|d| is_status(d, "online"))
            && all
                .iter()
                .filter(|d| d.topic.ends_with("/readings"))
                .count()
                >= 5
    });
    let first_session = got
        .iter()
        .find(|d| is_status(d, "online"))
        .expect("online status")
        .payload["session"]
        .as_u64()
        .unwrap();

    hearth.kill9();
    let killed = Instant::now();
    // The issue asks for 1.5 keep-alives + 2 s; a kill closes the socket, so
    // the broker publishes the will at once: hold it to 3 s.
    let limit = (keep_alive.mul_f64(1.5) + Duration::from_secs(2)).min(Duration::from_secs(3));
    let will = sub
        .collect_until(limit + Duration::from_secs(5), |all| {
            all.iter().any(|d| is_status(d, "offline"))
        })
        .into_iter()
        .find(|d| is_status(d, "offline"))
        .expect("the will arrived");
    let after = will.at.duration_since(killed);
    assert!(after <= limit, "will after {after:?}, limit {limit:?}");
    assert_eq!(will.payload["reason"], "connection-lost");
    assert!(will.payload["session"].as_u64().unwrap() >= first_session);

    hearth.restart();
    let online = sub
        .collect_until(Duration::from_secs(20), |all| {
            all.iter().any(|d| is_status(d, "online"))
        })
        .into_iter()
        .find(|d| is_status(d, "online"))
        .expect("online again");
    assert!(
        online.payload["session"].as_u64().unwrap() > first_session,
        "{:?}",
        online.payload
    );

    // The device resends what was not ACKed; every reading arrives once.
    let summary = sim.finish(Duration::from_secs(120));
    assert_eq!(summary["acked"], 400);
    let all = sub.wait_all(Duration::from_secs(30), |all| {
        crate::e2e::reading_deliveries(all).len() >= 400
    });
    let mut seen: HashMap<String, usize> = HashMap::new();
    for d in &all {
        if d.topic.ends_with("/status") {
            continue;
        }
        for id in crate::harness::ids(&d.payload) {
            *seen.entry(id).or_default() += 1;
        }
    }
    for seq in 1..=400 {
        let id = format!("gw-kill/PM-000001/{seq}");
        assert_eq!(
            seen.get(&id),
            Some(&1),
            "reading {id} delivered {:?} times",
            seen.get(&id)
        );
    }
    let rows = crate::support::wait_for(Duration::from_secs(20), "all rows delivered", || {
        let rows = readings(&config, &[]);
        (rows.len() == 400 && rows.iter().all(|r| r["state"] == "delivered")).then_some(rows)
    });
    assert_eq!(rows.len(), 400);
}

/// A crash at each window of the exactly-once protocol, aimed with a
/// failpoint (`src/failpoint.rs`: the process aborts as kill -9 would),
/// then a restart: every reading arrives exactly once, in order.
#[test]
fn a_crash_in_every_window_of_the_protocol_loses_and_repeats_nothing() {
    use crate::support::Receiver;
    for point in hearth::failpoint::POINTS {
        let id = format!("gw-fp-{}", point.replace('-', ""));
        let rig = Rig::new(&id);
        let mut gw = GatewayOpts::new(&id);
        gw.batch = 4;
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
        let sim = Sim::start(&[
            "--count",
            "60",
            "--interval-ms",
            "5",
            "--ack-timeout-ms",
            "300",
        ]);
        let config = rig.config(&gw, &sim.pty);
        // The third time, so that some exchanges completed before.
        let spec = format!("{point}:3");
        let mut hearth = Hearth::start_with_env(&config, &[("HEARTH_TEST_FAILPOINT", &spec)]);
        let status = hearth.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{point}: hearth should have aborted");
        assert!(
            hearth
                .log_text()
                .contains(&format!("failpoint `{point}` reached")),
            "{point}"
        );

        hearth.restart();
        let summary = sim.finish(Duration::from_secs(60));
        assert_eq!(summary["acked"], 60, "{point}: {summary}");
        assert!(
            receiver.wait_until(Duration::from_secs(30), |all| {
                let ids: std::collections::HashSet<String> = all
                    .iter()
                    .flat_map(|d| crate::harness::ids(&serde_json::from_slice(&d.payload).unwrap()))
                    .collect();
                ids.len() == 60
            }),
            "{point}: not every reading arrived"
        );
        assert!(hearth.stop().success());
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut last = 0;
        for d in receiver.deliveries() {
            if d.topic.ends_with("/readings") {
                for id in crate::harness::ids(&serde_json::from_slice(&d.payload).unwrap()) {
                    let seq: u64 = id.rsplit('/').next().unwrap().parse().unwrap();
                    assert!(seq > last, "{point}: seq {seq} after {last}");
                    last = seq;
                    *seen.entry(id).or_default() += 1;
                }
            } else {
                for id in crate::harness::ids(&serde_json::from_slice(&d.payload).unwrap()) {
                    *seen.entry(id).or_default() += 1;
                }
            }
        }
        assert_eq!(seen.len(), 60, "{point}");
        let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(dups.is_empty(), "{point}: duplicates {dups:?}");
    }
}
