//! Benchmark, not a timed test: the support views on a store of 1,000,000
//! readings filled through the real store code, while a real gateway runs
//! on that store, drains its backlog to a real mosquitto and ACKs a device
//! on a real pty pair. For each command it prints the median and worst
//! wall time of a few runs through the real binary, and the serial ACK p99
//! while it runs against the ACK p99 with nothing running. Asserts only
//! that each command succeeds; the indexes are checked by the
//! EXPLAIN QUERY PLAN unit tests in `src/outbox/views/`. Run it alone:
//!
//! ```sh
//! cargo test --release --test tests cli_speed -- --ignored --nocapture
//! ```
//!
//! `HEARTH_SPEED_ROWS` changes the store's size (default 1,000,000).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use hearth::reading::{Kind, Priority, Reading};
use hearth::serial::frame::{Decoder, Frame};

use crate::bad_input::{SocatPair, answers, open_device};
use crate::harness::{GatewayOpts, Hearth, Rig, hearth};
use crate::support::fill::{FillSpec, fill};

/// Runs of each command.
const RUNS: usize = 5;

#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn views_on_a_million_readings() {
    let rows: u32 = std::env::var("HEARTH_SPEED_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rig = Rig::new("views");
    let mut gw = GatewayOpts::new("views");
    gw.max_size_mb = 4096.0;
    gw.heartbeat = 1;
    let devices = 5;
    let per_device = rows / devices as u32;
    // One reading per device every 20 s: 1,000,000 readings are 46 days.
    let step = chrono::Duration::seconds(20);
    let spec = FillSpec {
        devices,
        per_device,
        start: Utc::now() - step * per_device as i32,
        step,
        missing: (0..devices)
            .flat_map(|d| {
                (1..=4).map(move |k| (d, k * per_device / 5, k * per_device / 5 + 3 + d as u32))
            })
            .collect(),
        alert_every: 211,
        delivered: 0.98,
        batch: 200,
    };
    let filled = fill(rig.dir.path(), &spec);
    assert_eq!(
        filled.db,
        rig.db(&gw),
        "the gateway runs on the filled store"
    );
    let size = std::fs::metadata(&filled.db).map(|m| m.len()).unwrap_or(0);
    println!(
        "filled {} readings ({} delivered) through the store code in {:.1} s; store {:.0} MiB",
        filled.stored,
        filled.delivered,
        filled.secs,
        size as f64 / 1048576.0
    );

    let pair = SocatPair::start(rig.dir.path());
    let config = rig.config(&gw, &pair.b);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("info,hearth=debug", "info")).unwrap();
    let hearth_run = Hearth::start(&config);
    hearth_run.wait_log_count("Connected to broker", 1, Duration::from_secs(60));

    // A device sending a reading every 20 ms, timing each ACK.
    let acks: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let (acks, stop, path) = (acks.clone(), stop.clone(), pair.a.clone());
        std::thread::spawn(move || {
            let mut port = open_device(&path);
            let mut decoder = Decoder::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let frame = Frame::Reading(Reading {
                    device_id: "PM-ACK".into(),
                    epoch: None,
                    seq,
                    device_time: Utc::now(),
                    kind: Kind::HeartRate,
                    value: 61.0,
                    priority: Priority::Routine,
                    detail: None,
                })
                .encode();
                let sent = Instant::now();
                port.write_all(&frame).unwrap();
                let got = answers(&mut port, &mut decoder, 1);
                assert!(matches!(got[0], Frame::Ack { .. }), "{got:?}");
                acks.lock().unwrap().push((sent, sent.elapsed()));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let p99_between = |from: Instant, to: Instant| -> (usize, Duration) {
        let mut t: Vec<Duration> = acks
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, d)| *d)
            .collect();
        t.sort();
        let p99 = t
            .get(((t.len() as f64 * 0.99) as usize).min(t.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        (t.len(), p99)
    };

    // Nothing running: the baseline, once the backlog has drained.
    crate::support::wait_for(Duration::from_secs(120), "the backlog drained", || {
        let (_, view, _) = crate::harness::status_json(&config);
        (view["readings"]["queued_routine"] == 0 && view["readings"]["queued_alert"] == 0)
            .then_some(())
    });
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (n0, base) = p99_between(from, Instant::now());
    println!("ACK p99 with no command running: {base:.2?} ({n0} readings)");

    let c = config.to_str().unwrap().to_owned();
    let mid = (filled.stored / 2).to_string();
    let export = rig.dir.join("export.ndjson");
    let export_s = export.to_str().unwrap().to_owned();
    let commands: Vec<(&str, Vec<String>)> = vec![
        // Controls: a process that reads nothing, and one that opens the
        // store and appends its audit entry but reads no reading.
        (
            "control: config default (no store)",
            vec!["config", "default"],
        ),
        (
            "control: open + audit entry only",
            vec!["readings", "rejected", "--limit", "0"],
        ),
        ("list (a table page, 1000 rows)", vec!["readings", "list"]),
        (
            "list --device --since 2h (JSON)",
            vec![
                "readings", "list", "--device", "PM-0003", "--since", "2h", "--format", "json",
            ],
        ),
        (
            "list --kind shock_delivered --limit 100",
            vec![
                "readings",
                "list",
                "--kind",
                "shock_delivered",
                "--limit",
                "100",
                "--format",
                "json",
            ],
        ),
        (
            "list --device --seq range",
            vec![
                "readings",
                "list",
                "--device",
                "PM-0002",
                "--seq",
                "150000-150200",
                "--format",
                "json",
            ],
        ),
        ("show ID", vec!["readings", "show", &mid]),
        ("gaps", vec!["readings", "gaps"]),
        ("stats (24 h)", vec!["readings", "stats"]),
        (
            "chart heart_rate (24 h, terminal)",
            vec![
                "readings",
                "chart",
                "--kind",
                "heart_rate",
                "--device",
                "PM-0001",
            ],
        ),
        ("tail (last 20)", vec!["readings", "tail"]),
        ("status", vec!["status"]),
        (
            "export all (NDJSON)",
            vec![
                "readings", "export", "--format", "ndjson", "--output", &export_s, "--force",
            ],
        ),
    ]
    .into_iter()
    .map(|(name, args)| (name, args.into_iter().map(String::from).collect()))
    .collect();
    println!(
        "{:<42} {:>6} {:>10} {:>10} {:>12} {:>8}",
        "command", "runs", "median", "worst", "ACK p99", "ratio"
    );
    for (name, mut args) in commands {
        if args[0] != "config" {
            args.extend(["--config".to_owned(), c.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Again and again for 3 s (at least RUNS times; export once), so
        // that the device gets ~150 readings ACKed meanwhile.
        let runs = if name.starts_with("export") { 1 } else { RUNS };
        let mut times = Vec::new();
        let from = Instant::now();
        while times.len() < runs || (runs > 1 && from.elapsed() < Duration::from_secs(3)) {
            let began = Instant::now();
            let (code, out, err) = hearth(&args);
            times.push(began.elapsed());
            // `status` exits 1 while the backlog drains ("needs attention").
            assert!(
                code == 0 || name == "status",
                "{name}: exit {code}: {err}\n{out}"
            );
        }
        let (_, p99) = p99_between(from, Instant::now());
        times.sort();
        println!(
            "{:<42} {:>6} {:>10.1?} {:>10.1?} {:>12.2?} {:>8.2}",
            name,
            times.len(),
            times[times.len() / 2],
            times[times.len() - 1],
            p99,
            p99.as_secs_f64() / base.as_secs_f64().max(1e-9)
        );
    }
    stop.store(true, Ordering::Relaxed);
    device.join().unwrap();
    drop(hearth_run);
}
