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
    let mut ids: Vec<&str> = got.iter().map(|(_, r)| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
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
    let mut ids: Vec<&str> = got.iter().map(|(_, r)| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
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
