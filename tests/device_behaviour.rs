//! What real devices do, through the real parts: `hearth simulate` on a pty
//! -> `hearth run` -> mosquitto (mutual TLS) -> a QoS 2 subscriber.
//!
//! One test per device behaviour (issue 6): counting from 0, a v1 reboot, a
//! v1.1 reboot with epochs, late readings, two devices on one port, lost
//! ACKs. Each checks, from what the hospital received, that every reading
//! the simulator got ACKed arrived exactly once (one copy of each distinct
//! `id`, as many ids as ACKed readings) and that the simulator finished its
//! count, so nothing was refused or held forever.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim};
use crate::support::{Delivery, Subscriber};

/// How long a simulator run may take; each test stays well under it.
const SIM_TIMEOUT: Duration = Duration::from_secs(15);

/// One reading as the hospital received it, with its topic.
struct Received {
    topic: String,
    reading: Value,
}

impl Received {
    fn id(&self) -> &str {
        self.reading["id"].as_str().expect("a reading has an id")
    }

    fn device(&self) -> &str {
        self.reading["device"]
            .as_str()
            .expect("a reading has a device")
    }

    fn seq(&self) -> u64 {
        self.reading["seq"].as_u64().expect("a reading has a seq")
    }

    /// `epoch` and `run` are omitted when 0.
    fn number(&self, field: &str) -> u64 {
        self.reading[field].as_u64().unwrap_or(0)
    }

    fn flag(&self, field: &str) -> bool {
        self.reading[field].as_bool().unwrap_or(false)
    }
}

/// The readings in `deliveries`, in arrival order.
fn received(deliveries: &[Delivery]) -> Vec<Received> {
    deliveries
        .iter()
        .filter(|d| !d.topic.ends_with("/status"))
        .flat_map(|d| {
            let readings = d.payload["readings"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            readings.into_iter().map(|reading| Received {
                topic: d.topic.clone(),
                reading,
            })
        })
        .collect()
}

fn distinct_ids(deliveries: &[Delivery]) -> usize {
    let ids: BTreeSet<String> = received(deliveries)
        .iter()
        .map(|r| r.id().to_owned())
        .collect();
    ids.len()
}

/// What one scenario produced.
struct Outcome {
    summary: Value,
    readings: Vec<Received>,
    took: Duration,
}

/// Runs the simulator with `args` against a real gateway `id` until it has
/// finished its count, then checks that the `expected` readings it got
/// ACKed reached the hospital exactly once.
fn scenario(id: &str, args: &[&str], expected: u64) -> Outcome {
    let started = Instant::now();
    let rig = Rig::new(id);
    let gw = GatewayOpts::new(id);
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        &format!("hospital-{id}"),
        &[
            &format!("hearth/v1/{id}/readings"),
            &format!("hearth/v1/{id}/alerts"),
        ],
    );
    let mut all_args = vec!["--interval-ms", "0", "--seed", "3"];
    all_args.extend_from_slice(args);
    let sim = Sim::start(&all_args);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth = Hearth::start(&config);

    // The count is finished: every reading was ACKed in the end.
    let summary = sim.finish(SIM_TIMEOUT);
    assert_eq!(summary["acked"], expected, "{summary}");
    sub.wait_all(Duration::from_secs(10), |all| {
        distinct_ids(all) as u64 >= expected
    });
    // Counted after hearth stopped, so that a late second copy would show.
    assert!(hearth.stop().success(), "{}", hearth.log_text());
    let readings = received(&sub.all());

    let mut copies: HashMap<&str, usize> = HashMap::new();
    for r in &readings {
        *copies.entry(r.id()).or_default() += 1;
    }
    let twice: BTreeMap<&&str, &usize> = copies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    assert_eq!(
        copies.len() as u64,
        expected,
        "distinct ids received, for {summary}"
    );
    Outcome {
        summary,
        readings,
        took: started.elapsed(),
    }
}

#[test]
fn a_device_counting_from_0_is_delivered_from_seq_0() {
    let out = scenario(
        "gw-seq0",
        &["--count", "10", "--start-seq", "0", "--alert-rate", "0"],
        10,
    );
    let seqs: Vec<u64> = out.readings.iter().map(Received::seq).collect();
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>());
    assert_eq!(out.readings[0].id(), "gw-seq0/PM-000001/0");
    for r in &out.readings {
        assert!(!r.flag("late") && !r.flag("restart"), "{}", r.reading);
    }
    eprintln!("seq 0: {:?}", out.took);
}

#[test]
fn a_v1_device_that_reboots_gets_a_new_run_per_boot() {
    // A window of 2: each boot makes readings (some 5 or 6), and a reading
    // or two is still unACKed at each reboot, kept and resent.
    let out = scenario(
        "gw-v1boot",
        &[
            "--count",
            "15",
            "--window",
            "2",
            "--restart-every",
            "5",
            "--time-scale",
            "0.01",
            "--alert-rate",
            "0",
        ],
        15,
    );
    assert_eq!(out.summary["restarts"], 2, "{}", out.summary);
    // Both boots arrive; each new run begins with the reboot's first
    // reading, flagged `restart`, and nothing else is flagged.
    let restarts: Vec<(u64, u64)> = out
        .readings
        .iter()
        .filter(|r| r.flag("restart"))
        .map(|r| (r.number("run"), r.seq()))
        .collect();
    assert_eq!(restarts, [(1, 1), (2, 1)], "ids: {:?}", ids(&out));
    let runs: BTreeSet<u64> = out.readings.iter().map(|r| r.number("run")).collect();
    assert_eq!(runs, BTreeSet::from([0, 1, 2]));
    for r in &out.readings {
        let run = r.number("run");
        let suffix = if run == 0 {
            String::new()
        } else {
            format!("-r{run}")
        };
        assert_eq!(
            r.id(),
            format!("gw-v1boot/PM-000001/{}{suffix}", r.seq()),
            "{}",
            r.reading
        );
        assert!(!r.flag("conflict"), "{}", r.reading);
    }
    eprintln!("v1 reboot: {:?}", out.took);
}

#[test]
fn a_v1_1_device_that_reboots_is_told_apart_by_its_epoch() {
    let out = scenario(
        "gw-v11boot",
        &[
            "--count",
            "15",
            "--window",
            "2",
            "--epoch",
            "1",
            "--restart-every",
            "5",
            "--time-scale",
            "0.01",
            "--alert-rate",
            "0",
        ],
        15,
    );
    assert_eq!(out.summary["restarts"], 2, "{}", out.summary);
    let epochs: BTreeSet<u64> = out.readings.iter().map(|r| r.number("epoch")).collect();
    assert_eq!(epochs, BTreeSet::from([1, 2, 3]), "ids: {:?}", ids(&out));
    for r in &out.readings {
        let epoch = r.number("epoch");
        assert_eq!(
            r.id(),
            format!("gw-v11boot/PM-000001/{}-e{epoch}", r.seq()),
            "{}",
            r.reading
        );
        // The epoch says it all: no new run, no conflict.
        assert_eq!(r.number("run"), 0, "{}", r.reading);
        assert!(!r.flag("restart") && !r.flag("conflict"), "{}", r.reading);
    }
    eprintln!("v1.1 reboot: {:?}", out.took);
}

#[test]
fn late_readings_are_delivered_and_flagged_late_after_a_higher_seq() {
    let out = scenario(
        "gw-late",
        &[
            "--count",
            "13",
            "--late-every",
            "4",
            "--late-by",
            "2",
            "--alert-rate",
            "0.3",
            "--time-scale",
            "0.01",
        ],
        13,
    );
    assert_eq!(out.summary["late_sent"], 3, "{}", out.summary);
    // `late` exactly when a higher seq of the same device, priority (so
    // topic) and run went out before it.
    let mut highest: HashMap<(String, u64, u64, String), u64> = HashMap::new();
    let mut late = 0;
    for r in &out.readings {
        let key = (
            r.device().to_owned(),
            r.number("epoch"),
            r.number("run"),
            r.topic.clone(),
        );
        let passed = highest.get(&key).is_some_and(|h| *h > r.seq());
        assert_eq!(r.flag("late"), passed, "{}", r.reading);
        late += usize::from(passed);
        let h = highest.entry(key).or_default();
        *h = (*h).max(r.seq());
    }
    assert!(late > 0, "no reading arrived late: {:?}", ids(&out));
    eprintln!("late: {:?}", out.took);
}

#[test]
fn two_devices_on_one_port_are_each_delivered_in_full() {
    let out = scenario(
        "gw-two",
        &["--count", "10", "--devices", "2", "--alert-rate", "0.1"],
        20,
    );
    let devices = out.summary["devices"]
        .as_array()
        .expect("per-device summaries");
    assert_eq!(devices.len(), 2, "{}", out.summary);
    for (i, device) in devices.iter().enumerate() {
        let name = format!("PM-000001-{}", i + 1);
        assert_eq!(device["device_id"], name.as_str());
        assert_eq!(device["acked"], 10, "{device}");
        let seqs: BTreeSet<u64> = out
            .readings
            .iter()
            .filter(|r| r.device() == name)
            .map(Received::seq)
            .collect();
        assert_eq!(seqs, (1..=10).collect::<BTreeSet<u64>>(), "{name}");
    }
    eprintln!("two devices: {:?}", out.took);
}

#[test]
fn readings_whose_ack_was_lost_are_acked_again_and_published_once() {
    let out = scenario(
        "gw-lostack",
        &[
            "--count",
            "30",
            "--drop-ack-rate",
            "0.3",
            "--ack-timeout-ms",
            "5000",
            "--time-scale",
            "0.05",
        ],
        30,
    );
    let dropped = out.summary["dropped_acks"].as_u64().unwrap();
    let resent = out.summary["resent"].as_u64().unwrap();
    assert!(dropped > 0, "{}", out.summary);
    assert!(resent >= dropped, "{}", out.summary);
    eprintln!("lost ACKs: {:?}", out.took);
}

fn ids(out: &Outcome) -> Vec<&str> {
    out.readings.iter().map(Received::id).collect()
}
