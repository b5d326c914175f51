//! The brokers hospitals run, as they behave: a real mosquitto whose ACL
//! refuses the readings topic (MQTT 5 says so with a reason code), at-least-
//! once delivery with `mqtt.qos = 1`, and MQTT 3.1.1 kept for brokers that
//! refuse 5.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, readings, status_view};
use crate::support::{Subscriber, wait_for};

/// Adds `lines` under `[mqtt]` in the config at `path`.
fn mqtt_settings(path: &std::path::Path, lines: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(
        path,
        text.replace("[mqtt]\n", &format!("[mqtt]\n{lines}\n")),
    )
    .unwrap();
}

/// An ACL for mosquitto (`use_identity_as_username`: the user is the
/// certificate's CN): the hospital reads everything; the gateway `id` may
/// write its status, and its readings only if `readings_allowed`.
fn acl(rig: &Rig, id: &str, readings_allowed: bool) -> String {
    let path = rig.dir.join("acl");
    let mut text = format!(
        "user {hospital}\ntopic read hearth/v1/#\n\nuser {id}\ntopic write hearth/v1/{id}/status\n",
        hospital = hearth::certs::HOSPITAL_COMMON_NAME
    );
    if readings_allowed {
        text.push_str(&format!(
            "topic write hearth/v1/{id}/readings\ntopic write hearth/v1/{id}/alerts\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    format!("acl_file {}", path.display())
}

/// The distinct reading ids among `got`, sorted (at least once: a
/// duplicate counts once).
fn unique_ids(got: &[(String, Value)]) -> Vec<String> {
    let mut ids: Vec<String> = got
        .iter()
        .map(|(_, r)| r["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn deliveries(sub: &Subscriber) -> Vec<(String, Value)> {
    crate::e2e::reading_deliveries(&sub.all())
}

/// Over MQTT 3.1.1 mosquitto acknowledges a refused QoS 2 PUBLISH as if it
/// had been delivered. Over MQTT 5 its PUBREC says 0x87: nothing may count
/// as delivered, an alarm must say why, and the readings must go out once
/// the ACL is fixed.
#[test]
fn an_acl_refusal_is_seen_held_with_an_alarm_and_delivered_once_the_acl_is_fixed() {
    let id = "gw-acl";
    let mut rig = Rig::new(id);
    let deny = acl(&rig, id, false);
    rig.broker.reconfigure(&rig.certs, &deny);
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-acl",
        &["hearth/v1/gw-acl/+"],
    );
    let sim = Sim::start(&["--count", "10", "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    let hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));

    // The alarm, the reason code and the topic, in `hearth status`.
    let view = wait_for(Duration::from_secs(30), "the broker-refused alarm", || {
        let view = status_view(&config);
        view["alarms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "broker-refused"))
            .then_some(view)
    });
    let refusal = &view["broker_refusal"];
    assert_eq!(refusal["code"], 0x87, "{view:#}");
    assert_eq!(refusal["reason"], "Not authorized", "{view:#}");
    assert_eq!(refusal["topic"], "hearth/v1/gw-acl/readings", "{view:#}");
    assert_eq!(view["healthy"], false);

    // A second refusal comes only after the back-off: no loop at full
    // speed (hold 2 s, then 4 s: at most a handful in 10 s).
    let refusals = || {
        rig.broker
            .log()
            .matches("Denied PUBLISH from gw-acl")
            .count()
    };
    let first = refusals();
    std::thread::sleep(Duration::from_secs(10));
    let in_ten_seconds = refusals() - first;
    assert!(
        in_ten_seconds <= 4,
        "{in_ten_seconds} refused PUBLISHes in 10 s: a resend loop"
    );

    // Nothing counted delivered, nothing at the hospital, all still queued.
    let rows = readings(&config, &[]);
    assert_eq!(rows.len(), 10);
    assert!(rows.iter().all(|r| r["state"] == "queued"), "{rows:#?}");
    assert!(deliveries(&sub).is_empty(), "{:#?}", deliveries(&sub));
    let log = hearth.log_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") && l.contains("refused readings"))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR per refusal streak: {errors:#?}");
    assert!(errors[0].contains("0x87"), "{}", errors[0]);
    assert!(
        errors[0].contains("hearth/v1/gw-acl/readings"),
        "{}",
        errors[0]
    );

    // The operator fixes the ACL; mosquitto reloads it on SIGHUP.
    let allow = acl(&rig, id, true);
    rig.broker.reconfigure(&rig.certs, &allow);
    let got = sub.wait_all(Duration::from_secs(60), |all| {
        crate::e2e::reading_deliveries(all).len() >= 10
    });
    let got = crate::e2e::reading_deliveries(&got);
    let ids = unique_ids(&got);
    assert_eq!(ids.len(), 10, "each reading once: {got:#?}");
    wait_for(
        Duration::from_secs(30),
        "all delivered and the alarm cleared",
        || {
            let view = status_view(&config);
            let rows = readings(&config, &[]);
            (rows.iter().all(|r| r["state"] == "delivered")
                && !view["alarms"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "broker-refused"))
                && view["broker_refusal"].is_null())
            .then_some(())
        },
    );
    assert!(
        hearth
            .log_text()
            .contains("accepts readings on this topic again")
    );
}

/// `mqtt.qos = 1`, for brokers without QoS 2: every reading arrives (at
/// least once, each with its id) and is counted delivered on PUBACK.
#[test]
fn qos_1_delivers_every_reading_with_its_id() {
    let id = "gw-qos1";
    let rig = Rig::new(id);
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-qos1",
        &["hearth/v1/gw-qos1/+"],
    );
    let sim = Sim::start(&["--count", "200", "--interval-ms", "0"]);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    mqtt_settings(&config, "qos = 1");
    let hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(60));
    let got = sub.wait_all(Duration::from_secs(60), |all| {
        crate::e2e::reading_deliveries(all).len() >= 200
    });
    let got = crate::e2e::reading_deliveries(&got);
    let ids = unique_ids(&got);
    assert_eq!(ids.len(), 200);
    wait_for(Duration::from_secs(30), "all delivered", || {
        readings(&config, &[])
            .iter()
            .all(|r| r["state"] == "delivered")
            .then_some(())
    });
    let broker_log = rig.broker.log();
    assert!(
        broker_log.contains("Received PUBLISH from gw-qos1 (d0, q1"),
        "readings went at QoS 1"
    );
    assert!(!broker_log.contains("Received PUBLISH from gw-qos1 (d0, q2"));
    assert!(
        !hearth.log_text().contains(" ERROR "),
        "{}",
        hearth.log_text()
    );
}

/// MQTT 5 is the default; `protocol = "3.1.1"` still works, and the broker
/// sees each version as configured.
#[test]
fn mqtt_5_is_the_default_and_3_1_1_still_delivers() {
    for (id, setting, version) in [
        ("gw-v5", "", "p5"),
        ("gw-v311", "protocol = \"3.1.1\"", "p2"),
    ] {
        let rig = Rig::new(id);
        let sub = Subscriber::start(
            &rig.broker,
            &rig.certs,
            &format!("hospital-{id}"),
            &[&format!("hearth/v1/{id}/+")],
        );
        let sim = Sim::start(&["--count", "20", "--interval-ms", "0"]);
        let config = rig.config(&GatewayOpts::new(id), &sim.pty);
        mqtt_settings(&config, setting);
        let _hearth = Hearth::start(&config);
        sim.finish(Duration::from_secs(30));
        let got = sub.wait_all(Duration::from_secs(30), |all| {
            crate::e2e::reading_deliveries(all).len() >= 20
        });
        assert_eq!(crate::e2e::reading_deliveries(&got).len(), 20, "{id}");
        // mosquitto logs "New client connected from ... as gw-v5 (p5, c0, ...)": p5 is MQTT 5, p2 is 3.1.1.
        let needle = format!("as {id} ({version},");
        assert!(
            rig.broker.log().contains(&needle),
            "{id}: no `{needle}` in the broker log"
        );
    }
}

/// RabbitMQ (Debian's 3.10, MQTT 3.1.1 only, no QoS 2) over TLS: with
/// `qos = 1` everything is delivered; with `qos = 2` one clear ERROR naming
/// the missing QoS 2 and `mqtt.qos`, the `broker-qos` alarm, and no resend
/// loop; with the default MQTT 5, one clear line to set `protocol`.
#[test]
fn rabbitmq_without_qos_2_delivers_at_qos_1_and_says_clearly_what_is_missing() {
    let id = "gw-rabbit";
    let dir = crate::support::TestDir::new();
    let certs = hearth::certs::DevCerts::generate(&dir.subdir("certs"), id).expect("dev certs");
    let rabbit = crate::support::RabbitMq::start(&dir.subdir("rabbit"), &certs);
    // A rig for its layout only: its mosquitto stays idle.
    let rig = Rig::new(id);
    let mut gw = GatewayOpts::new(id);
    gw.mqtt_port = Some(rabbit.port);
    let with_certs = |config: &std::path::Path| {
        // The rig made its own certificates: use the ones RabbitMQ trusts.
        let text = std::fs::read_to_string(config).unwrap();
        let text = text
            .replace(
                &rig.certs.ca_cert.display().to_string(),
                &certs.ca_cert.display().to_string(),
            )
            .replace(
                &rig.certs.gateway_cert.display().to_string(),
                &certs.gateway_cert.display().to_string(),
            )
            .replace(
                &rig.certs.gateway_key.display().to_string(),
                &certs.gateway_key.display().to_string(),
            );
        std::fs::write(config, text).unwrap();
    };

    // 1. The default, MQTT 5: RabbitMQ 3.10 refuses the protocol version.
    let sim = Sim::start(&["--count", "5", "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&gw, &sim.pty);
    with_certs(&config);
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    // It hangs up on an MQTT 5 CONNECT without a CONNACK.
    let needle = "closed the connection on our MQTT 5 CONNECT";
    hearth.wait_log_count(needle, 1, Duration::from_secs(30));
    wait_for(
        Duration::from_secs(30),
        "the broker-protocol alarm and a few retries",
        || {
            let view = status_view(&config);
            (hearth.log_text().matches("on our CONNECT again").count() >= 2
                && view["alarms"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "broker-protocol")))
            .then_some(())
        },
    );
    let log = hearth.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one WARN, then DEBUG: {log}");
    assert!(
        lines[0].contains("mqtt.protocol = \"3.1.1\""),
        "{}",
        lines[0]
    );
    assert!(hearth.stop().success());

    // 2. 3.1.1 with qos = 2: RabbitMQ answers PUBACK; one ERROR, an alarm.
    mqtt_settings(&config, "protocol = \"3.1.1\"");
    hearth.restart();
    let view = wait_for(Duration::from_secs(30), "the broker-qos alarm", || {
        let view = status_view(&config);
        view["alarms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "broker-qos"))
            .then_some(view)
    });
    assert_eq!(view["healthy"], false);
    // No loop: after the first exchange, readings wait (2 s, then 4 s...).
    std::thread::sleep(Duration::from_secs(5));
    let log = hearth.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("has no QoS 2")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains(" ERROR "), "{}", errors[0]);
    assert!(errors[0].contains("`mqtt.qos = 1`"), "{}", errors[0]);
    let exchanges = log.matches("Publishing.").count();
    assert!(
        exchanges <= 3,
        "{exchanges} exchanges in 5 s: a loop\n{log}"
    );
    assert!(hearth.stop().success());

    // 3. qos = 1: everything is delivered, at the hospital too.
    let sub = Subscriber::start_on(
        rabbit.port,
        &certs,
        "hospital-rabbit",
        &["hearth/v1/gw-rabbit/+"],
    );
    let sim = Sim::start(&["--count", "50", "--interval-ms", "0", "--start-seq", "6"]);
    let config = rig.config(&gw, &sim.pty);
    with_certs(&config);
    mqtt_settings(&config, "protocol = \"3.1.1\"\nqos = 1");
    hearth.restart();
    sim.finish(Duration::from_secs(30));
    wait_for(Duration::from_secs(60), "all 55 delivered", || {
        let rows = readings(&config, &[]);
        (rows.len() == 55 && rows.iter().all(|r| r["state"] == "delivered")).then_some(())
    });
    let got = sub.wait_all(Duration::from_secs(30), |all| {
        crate::e2e::reading_deliveries(all).len() >= 50
    });
    let got = crate::e2e::reading_deliveries(&got);
    let ids = unique_ids(&got);
    assert!(
        ids.len() >= 50,
        "{} of the 50 new readings at the hospital",
        ids.len()
    );
    assert!(hearth.stop().success(), "{}", rabbit.log().len());
}

/// The compact encoding (`encoding = "cbor"`): every reading arrives in
/// CBOR batches that decode to exactly what the JSON batch would say, the
/// broker sees few bytes per reading, and MQTT 5 names it by content type.
#[test]
fn the_compact_encoding_delivers_every_reading_in_few_bytes() {
    let id = "gw-cbor";
    let rig = Rig::new(id);
    let receiver = crate::support::Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-cbor",
        &["hearth/v1/gw-cbor/readings", "hearth/v1/gw-cbor/alerts"],
    );
    let sim = Sim::start(&["--count", "300", "--interval-ms", "0"]);
    let mut gw = GatewayOpts::new(id);
    gw.batch = 50;
    let config = rig.config(&gw, &sim.pty);
    mqtt_settings(&config, "encoding = \"cbor\"");
    let _hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(60));
    let count = |all: &[crate::support::Received]| -> usize {
        all.iter()
            .map(|d| {
                hearth::mqtt::compact::decode(&d.payload)
                    .map(|b| b.readings.len())
                    .unwrap_or_else(|e| panic!("not a compact batch on {}: {e}", d.topic))
            })
            .sum()
    };
    assert!(receiver.wait_until(Duration::from_secs(60), |all| count(all) >= 300));
    let deliveries = receiver.deliveries();
    let mut ids: Vec<String> = deliveries
        .iter()
        .flat_map(|d| hearth::mqtt::compact::decode(&d.payload).unwrap().readings)
        .map(|r| r.id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300, "each reading once");
    wait_for(
        Duration::from_secs(30),
        "all 300 delivered in the store",
        || {
            let rows = readings(&config, &[]);
            (rows.len() == 300 && rows.iter().all(|r| r["state"] == "delivered")).then_some(())
        },
    );
    // The broker's own count of payload bytes ("... (N bytes))").
    let log = rig.broker.log();
    let payload: usize = log
        .lines()
        .filter(|l| l.contains("Received PUBLISH from gw-cbor") && !l.contains("/status"))
        .filter_map(|l| {
            l.rsplit_once(" (")?
                .1
                .strip_suffix(" bytes))")?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let per_reading = payload as f64 / 300.0;
    assert!(
        per_reading <= 30.0,
        "{per_reading:.1} payload bytes per reading"
    );
}

/// `mqtt.hosts`: two real mosquittos. The first dies mid-stream; hearth
/// moves to the second, counts the move as a lost session (what was in
/// flight is queued again) and loses nothing: every reading reaches the
/// hospital, which listens on both.
#[test]
fn failover_to_the_second_broker_loses_nothing_and_counts_the_move() {
    let id = "gw-failover";
    let mut rig = Rig::new(id);
    let second = crate::support::Mosquitto::start(&rig.dir.subdir("broker-b"), &rig.certs);
    let topics = [
        "hearth/v1/gw-failover/readings",
        "hearth/v1/gw-failover/alerts",
    ];
    let at_a = crate::support::Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-a",
        &topics,
    );
    let at_b = crate::support::Receiver::start(
        "127.0.0.1",
        second.port,
        &rig.certs,
        "hospital-b",
        &topics,
    );
    let sim = Sim::start(&["--count", "200", "--interval-ms", "20"]);
    let mut gw = GatewayOpts::new(id);
    gw.batch = 4;
    let config = rig.config(&gw, &sim.pty);
    mqtt_settings(
        &config,
        &format!(
            "hosts = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
            rig.broker.port, second.port
        ),
    );
    let hearth = Hearth::start(&config);
    let ids = |r: &crate::support::Receiver| -> Vec<String> {
        r.deliveries()
            .iter()
            .flat_map(|d| crate::harness::ids(&serde_json::from_slice(&d.payload).unwrap()))
            .collect()
    };
    assert!(at_a.wait_until(Duration::from_secs(30), |all| all.len() >= 10));
    rig.broker.kill();
    sim.finish(Duration::from_secs(60));
    wait_for(
        Duration::from_secs(60),
        "all 200 readings at the hospital",
        || {
            let mut all = ids(&at_a);
            all.extend(ids(&at_b));
            all.sort();
            all.dedup();
            (all.len() == 200).then_some(())
        },
    );
    assert!(
        !ids(&at_b).is_empty(),
        "nothing went through the second broker"
    );
    let log = hearth.log_text();
    assert!(
        log.contains("Trying the next broker in `mqtt.hosts`."),
        "{log}"
    );
    assert!(log.contains("Moved to another broker"), "{log}");
    wait_for(
        Duration::from_secs(30),
        "all delivered in the store",
        || {
            readings(&config, &[])
                .iter()
                .all(|r| r["state"] == "delivered")
                .then_some(())
        },
    );
    assert_eq!(status_view(&config)["broker"]["state"], "connected");
}

/// Where the time of an exchange goes (not a test: `--ignored`, prints).
#[test]
#[ignore = "a probe that prints timings"]
fn probe_exchange_timing() {
    let id = "gw-probe";
    let mut rig = Rig::new(id);
    let n: usize = std::env::var("PROBE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    rig.broker.stop();
    let sim = Sim::start(&[
        "--count",
        &n.to_string(),
        "--interval-ms",
        "0",
        "--alert-rate",
        "0",
    ]);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    let hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(120));
    rig.broker.relaunch();
    wait_for(Duration::from_secs(120), "all delivered", || {
        readings(&config, &[])
            .iter()
            .all(|r| r["state"] == "delivered")
            .then_some(())
    });
    let log = hearth.log_text();
    let mut sent = std::collections::HashMap::new();
    let mut lat = Vec::new();
    let t = |l: &str| {
        chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next().unwrap()).unwrap()
    };
    for l in log.lines() {
        if l.contains("Publishing.") {
            let pkid: u16 = l
                .split("pkid=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            sent.insert(pkid, t(l));
        } else if l.contains("Delivered.") {
            let ids: Vec<u16> = if let Some(list) = l.split("pkids=[").nth(1) {
                list.split(']')
                    .next()
                    .unwrap()
                    .split(", ")
                    .filter_map(|x| x.parse().ok())
                    .collect()
            } else {
                vec![
                    l.split("pkid=")
                        .nth(1)
                        .unwrap()
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap(),
                ]
            };
            for p in ids {
                if let Some(s) = sent.remove(&p) {
                    lat.push((t(l) - s).num_microseconds().unwrap());
                }
            }
        }
    }
    lat.sort();
    eprintln!(
        "PROBE exchanges {} p50 {} us p90 {} us max {} us",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10],
        lat[lat.len() - 1]
    );
    let first = log
        .lines()
        .find(|l| l.contains("Publishing."))
        .map(t)
        .unwrap();
    let last = log
        .lines()
        .rfind(|l| l.contains("Delivered."))
        .map(t)
        .unwrap();
    eprintln!("PROBE drain {} ms", (last - first).num_milliseconds());
    let grep: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Publishing.") || l.contains("Delivered.") || l.contains("budget"))
        .take(40)
        .collect();
    eprintln!("{}", grep.join("\n"));
}

/// A broker's CONNACK limits (MQTT 5): mosquitto's `max_packet_size` and
/// `max_inflight_messages` become Maximum Packet Size and Receive Maximum.
/// hearth cuts its batches to fit and keeps its window within them:
/// everything arrives, and the broker never drops the link for a packet too
/// large or too many in flight.
#[test]
fn the_brokers_maximum_packet_size_and_receive_maximum_are_kept() {
    let id = "gw-limits";
    let mut rig = Rig::new(id);
    let limited = crate::support::Mosquitto::start_with(
        &rig.dir.subdir("broker-limits"),
        &rig.certs,
        "max_packet_size 4096\nmax_inflight_messages 3",
    );
    rig.broker = limited;
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-limits",
        &["hearth/v1/gw-limits/+"],
    );
    let sim = Sim::start(&["--count", "400", "--interval-ms", "0"]);
    let mut gw = GatewayOpts::new(id);
    gw.batch = 200;
    gw.max_inflight = 16;
    let config = rig.config(&gw, &sim.pty);
    let hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(60));
    let got = sub.wait_all(Duration::from_secs(60), |all| {
        crate::e2e::reading_deliveries(all).len() >= 400
    });
    assert_eq!(crate::e2e::reading_deliveries(&got).len(), 400);
    let log = rig.broker.log();
    let largest = log
        .lines()
        .filter(|l| l.contains("Received PUBLISH from gw-limits"))
        .filter_map(|l| {
            l.rsplit_once(" (")?
                .1
                .strip_suffix(" bytes))")?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap();
    assert!(largest < 4096, "a {largest}-byte payload");
    let hearth_log = hearth.log_text();
    assert!(
        !hearth_log.contains("Broker connection lost"),
        "{hearth_log}"
    );
    assert!(hearth_log.contains("Broker limits."), "{hearth_log}");
}
