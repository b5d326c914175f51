//! Valid readings as real devices send them, through the real binary on a
//! socat pty pair, to a real mosquitto: counting from 0, counting again after
//! a restart, slow resends after a gap, late readings, resends during a gap,
//! alerts out of order, epochs, conflicts, answer frames from the device and
//! the operator's reset. Each was refused or stranded by hearth 0.1 (issue 6,
//! "Found" 1 to 8); none may be now.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use hearth::reading::{Kind, Priority, Reading};
use hearth::serial::frame::{Decoder, Frame, crc16};
use serde_json::Value;

use crate::bad_input::{SocatPair, answers, open_device};
use crate::harness::{GatewayOpts, Hearth, Rig, hearth};
use crate::support::{Subscriber, wait_for};

const DEVICE: &str = "PM-REAL";

/// A gateway on one end of a socat pair, the test's device on the other,
/// and a subscriber at the hospital.
struct Bench {
    rig: Rig,
    gw: GatewayOpts,
    config: std::path::PathBuf,
    hearth: Hearth,
    sub: Subscriber,
    device: std::fs::File,
    decoder: Decoder,
    _pair: SocatPair,
}

impl Bench {
    /// `serial` is extra `[serial]` settings, e.g. `device_alarm_secs = 2`.
    fn start(id: &str, serial: &str) -> Bench {
        let rig = Rig::new(id);
        let gw = GatewayOpts::new(id);
        let sub = Subscriber::start(
            &rig.broker,
            &rig.certs,
            &format!("hospital-{id}"),
            &[&format!("hearth/v1/{id}/+")],
        );
        let pair = SocatPair::start(rig.dir.path());
        let config = rig.config(&gw, &pair.b);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("[serial]\n", &format!("[serial]\n{serial}\n")),
        )
        .unwrap();
        let hearth = Hearth::start(&config);
        // Frames go out once hearth has the port: a start slowed by a busy
        // machine must not turn into a missing answer.
        hearth.wait_log_count("Serial port opened.", 1, Duration::from_secs(60));
        let device = open_device(&pair.a);
        Bench {
            rig,
            gw,
            config,
            hearth,
            sub,
            device,
            decoder: Decoder::new(),
            _pair: pair,
        }
    }

    /// Sends frames and returns the next `n` answers; panics after 10 s
    /// without them (a device left waiting is a failure, not a hang).
    fn send(&mut self, frames: &[Vec<u8>], n: usize) -> Vec<Frame> {
        for f in frames {
            self.device.write_all(f).unwrap();
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.device);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis() as libc::c_int) };
            assert!(ready > 0, "no answer within 10 s; got so far: {got:?}");
            got.extend(answers(&mut self.device, &mut self.decoder, 1));
        }
        got
    }

    /// Waits until the hospital has `n` readings; returns them by arrival.
    fn delivered(&self, n: usize) -> Vec<(String, Value)> {
        let all = self.sub.wait_all(Duration::from_secs(30), |all| {
            crate::e2e::reading_deliveries(all).len() >= n
        });
        let got = crate::e2e::reading_deliveries(&all);
        assert_eq!(got.len(), n, "readings at the hospital: {got:#?}");
        got
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend([
            "--format",
            "json",
            "--config",
            self.config.to_str().unwrap(),
        ]);
        let (code, out, err) = hearth(&all);
        assert_eq!(code, 0, "hearth {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap()
    }

    fn alarms(&self) -> Value {
        // `hearth status` is a health check: it exits 1 while an alarm is
        // active, and still prints the whole status.
        crate::harness::status_view(&self.config)["alarms"].clone()
    }
}

fn time(seq: u32) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_764_000_000_000).unwrap() + TimeDelta::seconds(seq.into())
}

fn reading(epoch: Option<u32>, seq: u32, priority: Priority, value: f64) -> Reading {
    Reading {
        device_id: DEVICE.into(),
        epoch,
        seq,
        device_time: time(seq) + TimeDelta::milliseconds(value as i64),
        kind: match priority {
            Priority::Alert => Kind::ShockDelivered,
            Priority::Routine => Kind::HeartRate,
        },
        value,
        priority,
        detail: None,
    }
}

fn routine(seq: u32) -> Vec<u8> {
    Frame::Reading(reading(None, seq, Priority::Routine, 70.0)).encode()
}

fn alert(seq: u32) -> Vec<u8> {
    Frame::Reading(reading(None, seq, Priority::Alert, 30.0)).encode()
}

fn ack(epoch: Option<u32>, seq: u32) -> Frame {
    Frame::Ack {
        device_id: DEVICE.into(),
        epoch,
        seq,
    }
}

fn nak(seq: u32, reason: &str) -> Frame {
    Frame::Nak {
        device_id: Some(DEVICE.into()),
        epoch: None,
        seq: Some(seq),
        reason: reason.into(),
    }
}

/// The ids at the hospital, checked to be distinct: exactly once.
fn distinct_ids(got: &[(String, Value)]) -> Vec<String> {
    let ids: Vec<String> = got
        .iter()
        .map(|(_, r)| r["id"].as_str().unwrap().to_owned())
        .collect();
    let mut seen = HashMap::new();
    for id in &ids {
        *seen.entry(id).or_insert(0) += 1;
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "an id arrived twice: {ids:?}"
    );
    ids
}

fn framed(body: &str) -> Vec<u8> {
    format!("${body}*{:04X}\r\n", crc16(body.as_bytes())).into_bytes()
}

#[test]
fn seq_0_as_a_devices_first_reading_is_acked_and_raises_no_alarm() {
    let mut b = Bench::start("gw-seq0", "");
    assert_eq!(b.send(&[routine(0)], 1), [ack(None, 0)]);
    assert_eq!(b.send(&[routine(1)], 1), [ack(None, 1)]);
    let got = b.delivered(2);
    assert_eq!(
        distinct_ids(&got),
        ["gw-seq0/PM-REAL/0", "gw-seq0/PM-REAL/1"]
    );
    assert_eq!(b.alarms(), serde_json::json!([]));
}

#[test]
fn a_v1_device_that_counts_again_is_stored_delivered_and_its_alarm_clears() {
    let mut b = Bench::start("gw-restart", "device_alarm_secs = 2");
    for seq in 1..=3 {
        assert_eq!(b.send(&[routine(seq)], 1), [ack(None, seq)]);
    }
    // Battery changed: the count starts again, other readings, no epoch.
    let again = |seq| Frame::Reading(reading(None, seq, Priority::Routine, 80.0)).encode();
    assert_eq!(b.send(&[again(1)], 1), [ack(None, 1)]);
    assert_eq!(b.send(&[again(2)], 1), [ack(None, 2)]);
    let got = b.delivered(5);
    assert_eq!(
        distinct_ids(&got),
        [
            "gw-restart/PM-REAL/1",
            "gw-restart/PM-REAL/2",
            "gw-restart/PM-REAL/3",
            "gw-restart/PM-REAL/1-r1",
            "gw-restart/PM-REAL/2-r1"
        ]
    );
    assert_eq!(got[3].1["restart"], true);
    assert_eq!(got[3].1["run"], 1);
    assert!(got[4].1.get("restart").is_none());
    let devices = b.cli_json(&["devices", "list"]);
    assert_eq!(devices[0]["run"], 1, "{devices}");
    assert_eq!(devices[0]["restarts"], 1, "{devices}");
    // The hospital hears of the alarm, and of its clearing by itself.
    let statuses = b.sub.wait_all(Duration::from_secs(20), |all| {
        let alarmed = |d: &crate::support::Delivery| {
            d.topic.ends_with("/status")
                && d.payload["alarms"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "device-restart"))
        };
        all.iter().position(alarmed).is_some_and(|i| {
            all[i..]
                .iter()
                .any(|d| d.topic.ends_with("/status") && !alarmed(d))
        })
    });
    assert!(
        statuses
            .iter()
            .any(|d| d.payload["alarms"] == serde_json::json!(["device-restart"])),
        "no status carried the alarm"
    );
    wait_for(Duration::from_secs(15), "the alarm cleared", || {
        (b.alarms() == serde_json::json!([])).then_some(())
    });
}

#[test]
fn slow_resends_after_a_gap_are_stored_and_the_missing_one_arrives_late() {
    let mut b = Bench::start("gw-slow", "");
    assert_eq!(b.send(&[routine(1)], 1), [ack(None, 1)]);
    // Seq 2 was lost; the device resends 3 on its own timer, every 2.5 s.
    assert_eq!(b.send(&[routine(3)], 2), [nak(2, "missing"), nak(3, "gap")]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(b.send(&[routine(3)], 1), [ack(None, 3)]);
    // Then seq 2 turns up after all: stored, and flagged late.
    assert_eq!(b.send(&[routine(2)], 1), [ack(None, 2)]);
    let got = b.delivered(3);
    let seqs: Vec<(u64, bool)> = got
        .iter()
        .map(|(_, r)| (r["seq"].as_u64().unwrap(), r["late"] == true))
        .collect();
    assert_eq!(seqs, [(1, false), (3, false), (2, true)]);
}

#[test]
fn a_stored_alert_resent_during_a_gap_is_acked_and_alerts_never_wait() {
    let mut b = Bench::start("gw-alertgap", "");
    assert_eq!(b.send(&[routine(1)], 1), [ack(None, 1)]);
    // An alert after a gap is stored at once; the device is asked for 2.
    assert_eq!(b.send(&[alert(3)], 2), [nak(2, "missing"), ack(None, 3)]);
    // A routine reading waits for 2; the alert's resend is ACKed meanwhile.
    assert_eq!(b.send(&[routine(4)], 2), [nak(2, "missing"), nak(4, "gap")]);
    assert_eq!(b.send(&[alert(3)], 1), [ack(None, 3)]);
    assert_eq!(
        b.send(&[routine(2), routine(4)], 2),
        [ack(None, 2), ack(None, 4)]
    );
    let got = b.delivered(4);
    distinct_ids(&got);
    let routine_seqs: Vec<u64> = got
        .iter()
        .filter(|(t, _)| t.ends_with("/readings"))
        .map(|(_, r)| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(routine_seqs, [1, 2, 4], "routine readings keep seq order");
}

#[test]
fn an_alert_that_comes_after_a_later_one_is_delivered_flagged_late() {
    let mut b = Bench::start("gw-latealert", "");
    assert_eq!(b.send(&[alert(5)], 1), [ack(None, 5)]);
    assert_eq!(b.delivered(1).len(), 1);
    assert_eq!(b.send(&[alert(3)], 1), [ack(None, 3)]);
    let got = b.delivered(2);
    assert_eq!(got[1].1["seq"], 3);
    assert_eq!(got[1].1["late"], true);
    assert!(got[0].1.get("late").is_none());
}

#[test]
fn a_v1_1_device_sends_epochs_and_a_conflict_is_kept_under_its_own_id() {
    let mut b = Bench::start("gw-epoch", "device_alarm_secs = 600");
    let r = |epoch, seq, value| {
        Frame::Reading(reading(Some(epoch), seq, Priority::Routine, value)).encode()
    };
    assert_eq!(b.send(&[r(7, 1, 70.0)], 1), [ack(Some(7), 1)]);
    // The answer echoes the epoch form: `$A,PM-REAL,7:2*...`.
    assert_eq!(b.send(&[r(7, 2, 70.0)], 1), [ack(Some(7), 2)]);
    // A reboot announced by a new epoch: no alarm.
    assert_eq!(b.send(&[r(8, 1, 71.0)], 1), [ack(Some(8), 1)]);
    assert_eq!(b.alarms(), serde_json::json!([]));
    // Same epoch and seq, other content: kept, delivered, alarmed.
    assert_eq!(b.send(&[r(8, 1, 99.0)], 1), [ack(Some(8), 1)]);
    let got = b.delivered(4);
    assert_eq!(
        distinct_ids(&got),
        [
            "gw-epoch/PM-REAL/1-e7",
            "gw-epoch/PM-REAL/2-e7",
            "gw-epoch/PM-REAL/1-e8",
            "gw-epoch/PM-REAL/1-e8-c1"
        ]
    );
    assert_eq!(got[3].1["conflict"], true);
    assert_eq!(got[3].1["epoch"], 8);
    wait_for(Duration::from_secs(10), "the seq-conflict alarm", || {
        (b.alarms() == serde_json::json!(["seq-conflict"])).then_some(())
    });

    // The operator resets the device: the alarm clears, the log says so.
    let config = b.config.to_str().unwrap().to_owned();
    let (code, out, err) = hearth(&[
        "devices",
        "reset",
        DEVICE,
        "--reason",
        "firmware updated",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reset"), "{out}");
    assert!(err.contains("Device reset by an operator"), "{err}");
    wait_for(
        Duration::from_secs(15),
        "the alarm cleared by the reset",
        || (b.alarms() == serde_json::json!([])).then_some(()),
    );
    let (code, _, err) = hearth(&[
        "devices", "reset", "PM-NONE", "--reason", "x", "--config", &config,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no device `PM-NONE`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn answer_frames_from_the_device_are_ignored_and_a_rejected_field_is_logged() {
    let mut b = Bench::start("gw-echo", "");
    // A line that echoes: the gateway's own kinds of frame come back.
    let echoed = [
        ack(None, 9).encode(),
        nak(9, "gap").encode(),
        Frame::Busy {
            device_id: DEVICE.into(),
            epoch: None,
            seq: 9,
        }
        .encode(),
    ];
    // Nothing answers those: the next answer is the reading's ACK.
    let mut frames = echoed.to_vec();
    frames.push(routine(1));
    assert_eq!(b.send(&frames, 1), [ack(None, 1)]);
    // An unknown kind is NAKed `invalid`, and the log names field and cause.
    let bad = framed(&format!(
        "R,{DEVICE},2,2025-03-01T08:30:00.000Z,heart_beat,72,bpm,routine"
    ));
    assert_eq!(b.send(&[bad], 1), [nak(2, "invalid")]);
    // At INFO, so the default log level shows it (the test runs at DEBUG).
    wait_for(
        Duration::from_secs(10),
        "an INFO line naming the field",
        || {
            b.hearth
                .log_text()
                .lines()
                .any(|l| {
                    l.contains("INFO")
                        && l.contains("invalid field `kind`: unknown kind `heart_beat`")
                })
                .then_some(())
        },
    );
    // The echoed answers were not kept as rejected frames: they are not faults.
    let db = crate::harness::open_db(&b.rig.db(&b.gw));
    let rejected: Vec<String> = db
        .prepare("SELECT reason FROM rejected_frames")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rejected, ["invalid"]);
}
