//! kill -9 of `hearth run`: the broker publishes the will in time, a restart
//! comes back online with a higher session, and nothing ACKed is lost.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, readings};
use crate::support::{Subscriber, wait_for};

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

/// How an aimed crash reaches its failpoint.
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// The third visit in the first run, so that some exchanges completed
    /// before.
    Third,
    /// A first crash right after the first exchange was recorded leaves it
    /// open in stage `publish`; the restart crashes at the point (between
    /// its CONNECT and the CONNACK).
    OnRestart,
    /// The link is blackholed until two or more exchanges are open, hearth
    /// is killed, and the restart crashes at the point (in the resume,
    /// after some of the resumed packets were written).
    OnResume,
}

fn aim(point: &str) -> Aim {
    match point {
        "connect-sent" => Aim::OnRestart,
        "resume-partly-sent" => Aim::OnResume,
        _ => Aim::Third,
    }
}

/// Runs `hearth` with the failpoint `spec` until it aborts there.
fn crash_at(hearth: &mut Hearth, spec: &str, restart: bool) {
    let env = [("HEARTH_TEST_FAILPOINT", spec)];
    if restart {
        hearth.restart_with_env(&env);
    }
    let status = hearth.wait_exit(Duration::from_secs(30));
    let point = spec.split(':').next().unwrap_or(spec);
    assert!(!status.success(), "{spec}: hearth should have aborted");
    assert!(
        hearth
            .log_text()
            .contains(&format!("failpoint `{point}` reached")),
        "{spec}: the failpoint was not reached\n{}",
        hearth.log_text()
    );
}

/// A crash at each window of the exactly-once protocol, aimed with a
/// failpoint (`src/failpoint.rs`: the process aborts as kill -9 would),
/// then a restart: every reading arrives exactly once, in order. The
/// windows of a reconnect (between CONNECT and CONNACK, and inside the
/// resume) are reached with open exchanges left by an earlier crash.
#[test]
fn a_crash_in_every_window_of_the_protocol_loses_and_repeats_nothing() {
    use crate::support::{FaultProxy, Receiver};
    for point in hearth::failpoint::POINTS {
        let id = format!("gw-fp-{}", point.replace('-', ""));
        let rig = Rig::new(&id);
        let proxy = FaultProxy::start(([127, 0, 0, 1], rig.broker.port).into());
        let mut gw = GatewayOpts::new(&id);
        gw.batch = 4;
        gw.mqtt_port = Some(proxy.port);
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
        let mut hearth = match aim(point) {
            Aim::Third => {
                let spec = format!("{point}:3");
                let mut hearth =
                    Hearth::start_with_env(&config, &[("HEARTH_TEST_FAILPOINT", &spec)]);
                crash_at(&mut hearth, &spec, false);
                hearth
            }
            Aim::OnRestart => {
                let first = "publish-recorded:1";
                let mut hearth =
                    Hearth::start_with_env(&config, &[("HEARTH_TEST_FAILPOINT", first)]);
                crash_at(&mut hearth, first, false);
                crash_at(&mut hearth, &format!("{point}:1"), true);
                hearth
            }
            Aim::OnResume => {
                let mut hearth = Hearth::start(&config);
                assert!(
                    receiver.wait_until(Duration::from_secs(20), |all| !all.is_empty()),
                    "{point}: nothing arrived before the stall"
                );
                proxy.blackhole(true);
                wait_for(Duration::from_secs(20), "two exchanges open", || {
                    let pkids: HashSet<u64> = readings(&config, &["--state", "inflight"])
                        .iter()
                        .filter_map(|r| r["pkid"].as_u64())
                        .collect();
                    (pkids.len() >= 2).then_some(())
                });
                hearth.kill9();
                proxy.blackhole(false);
                proxy.cut_now();
                crash_at(&mut hearth, &format!("{point}:1"), true);
                hearth
            }
        };

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
