//! Benchmark, not a timed test: serial ACK latency with an empty store and
//! with a store of 1,000,000 delivered readings, while the heartbeat runs
//! every second. Prints p50/p99 of both and their ratio; asserts nothing
//! about time (machines are shared and noisy). Run it on its own:
//!
//! ```sh
//! cargo test --release --test tests ack_latency -- --ignored --nocapture
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use chrono::Utc;
use hearth::reading::{Kind, Priority, Reading};
use hearth::serial::frame::{Decoder, Frame};

use crate::bad_input::{SocatPair, answers, open_device};
use crate::harness::{GatewayOpts, Hearth, Rig};
use crate::support::wait_for;

/// Readings timed per store.
const SAMPLES: u32 = 1500;
/// Rows in the large store.
const LARGE: u32 = 1_000_000;

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, preferably --release"]
fn ack_latency_with_an_empty_and_a_million_row_store() {
    let empty = measure("gw-lat-empty", 0);
    let large = measure("gw-lat-large", LARGE);
    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64().max(1e-9);
    println!(
        "ack latency, {SAMPLES} readings, heartbeat every 1 s\n  empty store:      p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}\n  {LARGE} rows: p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}\n  ratio large/empty: p50 {:.2}  p99 {:.2}",
        empty.p50,
        empty.p99,
        empty.max,
        large.p50,
        large.p99,
        large.max,
        ratio(empty.p50, large.p50),
        ratio(empty.p99, large.p99),
    );
}

struct Figures {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn measure(id: &str, rows: u32) -> Figures {
    let rig = Rig::new(id);
    let mut gw = GatewayOpts::new(id);
    gw.heartbeat = 1;
    gw.max_size_mb = 4096.0;
    if rows > 0 {
        fill(&rig.db(&gw), rows);
    }
    let pair = SocatPair::start(rig.dir.path());
    let config = rig.config(&gw, &pair.b);
    let text = std::fs::read_to_string(&config).unwrap();
    // Debug logging costs time on the serial path; benchmark at INFO.
    std::fs::write(&config, text.replace("info,hearth=debug", "info")).unwrap();
    let hearth = Hearth::start(&config);
    hearth.wait_log_count("Connected to broker", 1, Duration::from_secs(60));
    let mut device = open_device(&pair.a);
    let mut decoder = Decoder::new();
    let mut times = Vec::with_capacity(SAMPLES as usize);
    for seq in 1..=SAMPLES {
        let frame = Frame::Reading(Reading {
            device_id: "PM-LAT".into(),
            epoch: None,
            seq,
            device_time: Utc::now(),
            kind: Kind::HeartRate,
            value: 60.0,
            priority: Priority::Routine,
            detail: None,
        })
        .encode();
        let sent = Instant::now();
        device.write_all(&frame).unwrap();
        let got = answers(&mut device, &mut decoder, 1);
        times.push(sent.elapsed());
        assert!(
            matches!(got[0], Frame::Ack { seq: s, .. } if s == seq),
            "{got:?}"
        );
        // A device sends a reading every few milliseconds at most.
        std::thread::sleep(Duration::from_millis(2));
    }
    // The heartbeats ran meanwhile.
    wait_for(Duration::from_secs(5), "hearth still running", || Some(()));
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Figures {
        p50: at(0.50),
        p99: at(0.99),
        max: *times.last().unwrap(),
    }
}

/// Writes `rows` delivered readings of another device straight into the
/// store, through the schema `hearth` itself created.
fn fill(db: &std::path::Path, rows: u32) {
    let created = hearth::outbox::Store::open_checked(db, &hearth::outbox::Encryption::beside(db));
    drop(created.expect("create the store, as `hearth run` would"));
    let mut conn = crate::harness::open_db(db);
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO readings (device, seq, hash, kind, value, unit, priority,
                 device_time, received_at, state, delivered_at)
                 VALUES ('PM-BULK', ?1, ?1, 'heart_rate', 60.0, 'bpm', 'routine', ?2, ?2,
                 'delivered', ?2)",
            )
            .unwrap();
        let now = Utc::now().timestamp_millis();
        for seq in 0..rows {
            insert
                .execute(rusqlite::params![seq, now - i64::from(rows - seq)])
                .unwrap();
        }
        tx.execute(
            "INSERT INTO device_runs (device, epoch, frontier, high, high_routine, last_heard, stored)
             VALUES ('PM-BULK', 0, ?1, ?1, ?1, ?2, ?1)",
            rusqlite::params![rows - 1, Utc::now().timestamp_millis()],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}
