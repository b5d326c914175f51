//! End to end through the real binary: simulator on a pty -> `hearth run`
//! -> mosquitto (mutual TLS) -> an independent QoS 2 subscriber.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, ids, readings};
use crate::support::{Delivery, Subscriber};

pub fn reading_deliveries(all: &[Delivery]) -> Vec<(String, Value)> {
    all.iter()
        .filter(|d| !d.topic.ends_with("/status"))
        .flat_map(|d| {
            d.payload["readings"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|r| (d.topic.clone(), r))
        })
        .collect()
}

#[test]
fn thousand_readings_reach_the_subscriber_exactly_once_in_seq_order() {
    let rig = Rig::new("gw-e2e");
    let gw = GatewayOpts::new("gw-e2e");
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-e2e",
        &[
            "hearth/v1/gw-e2e/readings",
            "hearth/v1/gw-e2e/alerts",
            "hearth/v1/gw-e2e/status",
        ],
    );
    let sim = Sim::start(&[
        "--count",
        "1000",
        "--interval-ms",
        "0",
        "--seed",
        "7",
        "--alert-rate",
        "0.03",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth = Hearth::start(&config);

    let summary = sim.finish(Duration::from_secs(120));
    assert_eq!(summary["acked"], 1000, "{summary}");
    let got = sub.wait_all(Duration::from_secs(60), |all| {
        reading_deliveries(all).len() >= 1000
    });
    let deliveries = reading_deliveries(&got);

    // Exactly once: 1000 messages' worth of readings, 1000 distinct ids.
    let mut count: HashMap<String, usize> = HashMap::new();
    for (_, r) in &deliveries {
        *count
            .entry(r["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert_eq!(deliveries.len(), 1000);
    for seq in 1..=1000 {
        assert!(
            count.contains_key(&format!("gw-e2e/PM-000001/{seq}")),
            "seq {seq} missing"
        );
    }

    // In per-device seq order on each topic; alerts on the alerts topic.
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut alerts = 0;
    for (topic, r) in &deliveries {
        let seq = r["seq"].as_u64().unwrap();
        let key = (topic.clone(), r["device"].as_str().unwrap().to_owned());
        if let Some(prev) = last.insert(key, seq) {
            assert!(seq > prev, "seq {seq} after {prev} on {topic}");
        }
        let is_alert = r["priority"] == "alert";
        assert_eq!(topic.ends_with("/alerts"), is_alert, "{topic}: {r}");
        alerts += usize::from(is_alert);
        for field in ["device_time", "received_at", "kind", "value", "unit"] {
            assert!(r.get(field).is_some(), "reading lacks `{field}`: {r}");
        }
    }
    assert!(alerts > 0, "the seeded run should hold alerts");
    assert_eq!(alerts as u64, summary["alerts"].as_u64().unwrap());

    // The CLI shows all of them delivered (marked on PUBCOMP, which may
    // trail the subscriber by a round trip).
    let rows = crate::support::wait_for(Duration::from_secs(20), "all rows delivered", || {
        let rows = readings(&config, &[]);
        rows.iter()
            .all(|r| r["state"] == "delivered")
            .then_some(rows)
    });
    assert_eq!(rows.len(), 1000);
    for field in [
        "id",
        "device",
        "seq",
        "kind",
        "value",
        "unit",
        "priority",
        "device_time",
        "received_at",
        "state",
    ] {
        assert!(
            rows[0].get(field).is_some(),
            "row lacks `{field}`: {}",
            rows[0]
        );
    }
    assert_eq!(readings(&config, &["--state", "queued"]).len(), 0);
    let cfg = config.to_str().unwrap();
    let (code, table, err) = crate::harness::hearth(&["status", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "delivered        1000",
        "in flight        0",
        "broker           connected",
    ] {
        assert!(
            table.contains(line),
            "`hearth status` lacks `{line}`:\n{table}"
        );
    }
    let (code, csv, _) =
        crate::harness::hearth(&["readings", "list", "--format", "csv", "--config", cfg]);
    assert_eq!(code, 0);
    assert_eq!(csv.lines().count(), 1001, "a header and 1000 rows");
    assert_eq!(
        readings(&config, &["--limit", "10", "--device", "PM-000001"]).len(),
        10
    );

    // A clean stop leaves a retained offline status with reason shutdown,
    // and nothing arrived twice by then either.
    assert!(hearth.stop().success());
    let late = reading_deliveries(&sub.all());
    assert_eq!(late.len(), 1000, "a late duplicate arrived");
    let statuses = sub.collect_until(Duration::from_secs(10), |all| {
        all.iter()
            .any(|d| d.topic.ends_with("/status") && d.payload["state"] == "offline")
    });
    let last_status = statuses
        .iter()
        .chain(got.iter())
        .filter(|d| d.topic.ends_with("/status"))
        .max_by_key(|d| d.at)
        .expect("a status");
    assert_eq!(
        last_status.payload["reason"], "shutdown",
        "{:?}",
        last_status.payload
    );
    let _ = ids;
}

#[test]
fn heartbeat_tells_when_the_implant_was_last_heard_and_what_waits() {
    let rig = Rig::new("gw-beat");
    let mut gw = GatewayOpts::new("gw-beat");
    gw.heartbeat = 1;
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-beat",
        &["hearth/v1/gw-beat/status"],
    );
    let sim = Sim::start(&[
        "--count",
        "20",
        "--interval-ms",
        "0",
        "--device-id",
        "ICD-0042",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    let got = sub.wait_all(Duration::from_secs(10), |all| {
        all.iter().any(|d| d.payload["reason"] == "heartbeat")
    });
    let beat = got
        .iter()
        .find(|d| d.payload["reason"] == "heartbeat")
        .expect("a heartbeat within 10 s");
    let p = &beat.payload;
    assert_eq!(p["state"], "online");
    assert_eq!(p["devices"][0]["device"], "ICD-0042", "{p}");
    assert!(
        p["devices"][0]["last_heard"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{p}"
    );
    for key in ["alert", "routine", "inflight"] {
        assert!(p["backlog"][key].is_u64(), "backlog lacks `{key}`: {p}");
    }
    assert_eq!(p["alarms"], serde_json::json!([]));
}
