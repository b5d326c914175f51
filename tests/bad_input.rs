//! Bad input on the serial line: damaged, garbage and oversized frames are
//! NAKed and kept in `rejected_frames`, and the run goes on.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hearth::reading::{Kind, Priority, Reading};
use hearth::serial::frame::{Decoded, Decoder, Frame};

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, hold_pty, readings};
use crate::support::{Subscriber, wait_for};

/// A linked pair of ptys made by socat, as a real null-modem pair.
pub(crate) struct SocatPair {
    child: Child,
    pub(crate) a: PathBuf,
    pub(crate) b: PathBuf,
    /// Both slaves held open until the links are gone (see `Sim`): no
    /// gateway reopening `b` may land on another test's pty.
    _hold: Vec<std::fs::File>,
}

impl SocatPair {
    pub(crate) fn start(dir: &Path) -> SocatPair {
        let a = dir.join("tty-a");
        let b = dir.join("tty-b");
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is installed (scripts/test.sh installs it)");
        wait_for(Duration::from_secs(10), "socat's pty links", || {
            (a.exists() && b.exists()).then_some(())
        });
        let hold = vec![hold_pty(&a), hold_pty(&b)];
        SocatPair {
            child,
            a,
            b,
            _hold: hold,
        }
    }
}

impl Drop for SocatPair {
    fn drop(&mut self) {
        // SIGKILL leaves socat's links behind: remove them first, then let
        // the pty numbers go.
        let _ = std::fs::remove_file(&self.a);
        let _ = std::fs::remove_file(&self.b);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self._hold.clear();
    }
}

pub(crate) fn open_device(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the device end")
}

fn ack(seq: u32) -> Frame {
    Frame::Ack {
        device_id: "PM-RAW".into(),
        epoch: None,
        seq,
    }
}

fn reading(seq: u32) -> Vec<u8> {
    Frame::Reading(Reading {
        device_id: "PM-RAW".into(),
        epoch: None,
        seq,
        device_time: chrono::Utc::now(),
        kind: Kind::HeartRate,
        value: 61.0,
        priority: Priority::Routine,
        detail: None,
    })
    .encode()
}

/// Reads answers from the device end until `n` frames were decoded.
pub(crate) fn answers(port: &mut std::fs::File, decoder: &mut Decoder, n: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while out.len() < n {
        let k = port.read(&mut buf).expect("read device end");
        decoder.extend(&buf[..k]);
        while let Some(d) = decoder.next() {
            match d {
                Decoded::Frame(f) => out.push(f),
                Decoded::Rejected(r) => panic!("gateway sent a bad frame: {r:?}"),
            }
        }
    }
    out
}

fn rejected_raw(db: &Path) -> Vec<Vec<u8>> {
    let conn = crate::harness::open_db_with(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY);
    let mut stmt = conn
        .prepare("SELECT raw FROM rejected_frames ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn rejected_reasons(db: &Path) -> Vec<String> {
    let conn = crate::harness::open_db_with(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY);
    let mut stmt = conn
        .prepare("SELECT reason FROM rejected_frames ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn damaged_garbage_and_oversized_frames_are_naked_kept_and_the_run_goes_on() {
    let rig = Rig::new("gw-bad");
    let gw = GatewayOpts::new("gw-bad");
    let pair = SocatPair::start(rig.dir.path());
    let config = rig.config(&gw, &pair.b);
    let _hearth = Hearth::start(&config);
    _hearth.wait_log_count("Serial port opened.", 1, Duration::from_secs(60));
    let mut device = open_device(&pair.a);
    let mut decoder = Decoder::new();

    // A good frame is ACKed once the gateway has opened its end.
    device.write_all(&reading(1)).unwrap();
    assert_eq!(answers(&mut device, &mut decoder, 1), [ack(1)]);

    // One byte flipped: the checksum catches it.
    let mut corrupt = reading(2);
    corrupt[12] ^= 0x01;
    let mut oversized = b"$R,".to_vec();
    oversized.extend(std::iter::repeat_n(b'7', 400));
    oversized.extend(b"\r\n");
    let truncated = &reading(3)[..20];
    let bad: Vec<&[u8]> = vec![&corrupt, b"boot banner v1.2 ", &oversized, truncated];
    for b in &bad {
        device.write_all(b).unwrap();
    }
    // A good frame ends the truncated one (its `$` comes before a `\n`).
    device.write_all(&reading(2)).unwrap();
    let got = answers(&mut device, &mut decoder, 5);
    let naks: Vec<&str> = got
        .iter()
        .filter_map(|f| match f {
            Frame::Nak { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        naks,
        ["checksum", "garbage", "oversized", "truncated"],
        "{got:?}"
    );
    assert_eq!(got[4], ack(2));

    // Every rejected run is kept, with its reason and raw bytes.
    assert_eq!(
        rejected_reasons(&rig.db(&gw)),
        ["checksum", "garbage", "oversized", "truncated"]
    );

    let raw = rejected_raw(&rig.db(&gw));
    assert_eq!(raw[0], corrupt, "the damaged frame is kept as it came");
    assert_eq!(raw[1], b"boot banner v1.2", "the garbage run is kept");
    assert_eq!(
        &raw[2][..],
        &oversized[..hearth::serial::frame::MAX_FRAME_LEN]
    );
    assert_eq!(&raw[3][..], truncated);

    // The run goes on: both good readings are stored (and delivered).
    let rows = wait_for(Duration::from_secs(20), "two readings delivered", || {
        let rows = readings(&config, &["--state", "delivered"]);
        (rows.len() == 2).then_some(rows)
    });
    assert_eq!(rows[1]["seq"], 2);
}

#[test]
fn a_device_with_a_noisy_line_still_gets_every_reading_through_once() {
    let rig = Rig::new("gw-noisy");
    let gw = GatewayOpts::new("gw-noisy");
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-noisy",
        &["hearth/v1/gw-noisy/+"],
    );
    let sim = Sim::start(&[
        "--count",
        "300",
        "--interval-ms",
        "0",
        "--seed",
        "5",
        "--ack-timeout-ms",
        "300",
        "--corrupt-rate",
        "0.1",
        "--garbage-rate",
        "0.1",
        "--truncate-rate",
        "0.1",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    let summary = sim.finish(Duration::from_secs(120));
    assert_eq!(summary["acked"], 300, "{summary}");
    let damaged = summary["corrupted"].as_u64().unwrap()
        + summary["garbage"].as_u64().unwrap()
        + summary["truncated"].as_u64().unwrap();
    assert!(damaged > 30, "{summary}");

    let all = sub.wait_all(Duration::from_secs(30), |all| {
        crate::e2e::reading_deliveries(all).len() >= 300
    });
    let deliveries = crate::e2e::reading_deliveries(&all);
    // Frames lost to the noise are asked for again; each topic carries the
    // device's readings in seq order, except those flagged `late`, which
    // follow a higher seq (docs/mqtt-payloads.md 5.3).
    let mut top: std::collections::HashMap<String, u64> = Default::default();
    for (topic, r) in &deliveries {
        let seq = r["seq"].as_u64().unwrap();
        let late = r["late"] == true;
        match top.get(topic) {
            Some(&high) if late => assert!(seq < high, "seq {seq} flagged late after {high}"),
            Some(&high) => assert!(
                seq > high,
                "seq {seq} after {high} on {topic}, not flagged late"
            ),
            None => assert!(!late, "the first reading on {topic} flagged late"),
        }
        if !late {
            top.insert(topic.clone(), seq);
        }
    }
    let mut ids: Vec<String> = deliveries
        .into_iter()
        .map(|(_, r)| r["id"].as_str().unwrap().to_owned())
        .collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((total, ids.len()), (300, 300), "every reading exactly once");

    // The simulator ends a truncated frame with `\r\n`: it has no `*`, so
    // it is `malformed` (`truncated` is a `$` inside a frame, tested above).
    let reasons = rejected_reasons(&rig.db(&gw));
    for reason in ["checksum", "garbage", "malformed"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no `{reason}` in {reasons:?}"
        );
    }
}

#[test]
fn the_reader_waits_out_an_unplugged_port_and_carries_on() {
    let rig = Rig::new("gw-plug");
    let gw = GatewayOpts::new("gw-plug");
    let pair = SocatPair::start(rig.dir.path());
    let config = rig.config(&gw, &pair.b);
    let hearth = Hearth::start(&config);
    hearth.wait_log_count("Serial port opened.", 1, Duration::from_secs(60));
    let mut device = open_device(&pair.a);
    let mut decoder = Decoder::new();
    device.write_all(&reading(1)).unwrap();
    assert_eq!(answers(&mut device, &mut decoder, 1), [ack(1)]);

    // Unplug: both ends vanish. The reader logs it and waits.
    let dir = rig.dir.path().to_owned();
    drop(device);
    drop(pair);
    hearth.wait_log_count("Serial port lost", 1, Duration::from_secs(10));
    hearth.wait_log_count("Waiting for the serial port", 1, Duration::from_secs(10));

    // Plug it back in: the reader reopens it and takes readings again.
    let pair = SocatPair::start(&dir);
    hearth.wait_log_count("Serial port opened", 2, Duration::from_secs(20));
    let mut device = open_device(&pair.a);
    let mut decoder = Decoder::new();
    device.write_all(&reading(2)).unwrap();
    assert_eq!(answers(&mut device, &mut decoder, 1), [ack(2)]);
    wait_for(Duration::from_secs(20), "both readings delivered", || {
        (readings(&config, &["--state", "delivered"]).len() == 2).then_some(())
    });
}

/// `hearth readings rejected`: a frame holding terminal escape sequences is
/// kept as it came and shown harmless, with its reason and time, in every
/// format; the read of raw (patient) bytes is audited.
#[test]
fn readings_rejected_renders_escape_sequences_harmless() {
    let rig = Rig::new("gw-rej");
    let gw = GatewayOpts::new("gw-rej");
    let pair = SocatPair::start(rig.dir.path());
    let config = rig.config(&gw, &pair.b);
    let hearth = Hearth::start(&config);
    hearth.wait_log_count("Serial port opened.", 1, Duration::from_secs(60));
    let mut device = open_device(&pair.a);
    let mut decoder = Decoder::new();
    let hostile: &[u8] = b"\x1b[2J\x1b]0;owned\x07 \\ \x9b31m";
    device.write_all(hostile).unwrap();
    device.write_all(&reading(1)).unwrap();
    let got = answers(&mut device, &mut decoder, 2);
    assert!(
        matches!(&got[0], Frame::Nak { reason, .. } if reason == "garbage"),
        "{got:?}"
    );
    let c = config.to_str().unwrap();
    for format in ["table", "json", "csv"] {
        let out = std::process::Command::new(crate::support::hearth_bin())
            .args(["readings", "rejected", "--config", c, "--format", format])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = out.stdout;
        assert!(
            text.iter()
                .all(|&b| b == b'\n' || (0x20..0x7f).contains(&b)),
            "{format}: a control or non-ASCII byte reached the terminal: {:?}",
            String::from_utf8_lossy(&text)
        );
        let text = String::from_utf8(text).unwrap();
        let expected = r"\x1b[2J\x1b]0;owned\x07 \\ \x9b31m";
        let shown = if format == "json" {
            let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(rows[0]["reason"], "garbage");
            assert_eq!(rows[0]["bytes"], hostile.len());
            rows[0]["raw"].as_str().unwrap().to_owned()
        } else {
            text.clone()
        };
        assert!(shown.contains(expected), "{format}: {text}");
    }
    let audit = std::process::Command::new(crate::support::hearth_bin())
        .args([
            "audit",
            "--kind",
            "patient-data-read",
            "--format",
            "json",
            "--config",
            c,
        ])
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 3, "{entries:#}");
}
