//! A store filled through the real store code (`Store::commit_serial`, the
//! exchange calls the publisher makes), for the CLI's view tests: readings
//! of several devices over time, with seqs left out (gaps), alerts, and the
//! oldest share delivered through real journeys.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use hearth::outbox::{Encryption, Insert, Store};
use hearth::reading::{Kind, Priority, Reading};

#[derive(Debug, Clone)]
pub struct FillSpec {
    /// Devices `PM-0001`, `PM-0002`, ...
    pub devices: usize,
    /// Seqs each device counts through (0 ..= per_device - 1).
    pub per_device: u32,
    /// Device time (and received time) of seq 0.
    pub start: DateTime<Utc>,
    /// Between one device's readings.
    pub step: Duration,
    /// Seqs never sent: (device index, first, last), inclusive.
    pub missing: Vec<(usize, u32, u32)>,
    /// Every this-many-th seq is an alert (an episode or a shock); 0: none.
    pub alert_every: u32,
    /// Share of the readings delivered (oldest first); the rest stay queued.
    pub delivered: f64,
    /// Readings per transaction (all received at the batch's first time).
    pub batch: usize,
}

impl FillSpec {
    /// `devices` × `per_device` readings one minute apart, ending now, 90%
    /// delivered, with a gap in the first device at seqs 50..=59.
    pub fn small(devices: usize, per_device: u32) -> FillSpec {
        FillSpec {
            devices,
            per_device,
            start: Utc::now() - Duration::minutes(per_device as i64),
            step: Duration::minutes(1),
            missing: vec![(0, 50, 59)],
            alert_every: 97,
            delivered: 0.9,
            batch: 500,
        }
    }
}

pub struct Filled {
    pub config: PathBuf,
    pub db: PathBuf,
    /// Readings stored.
    pub stored: u64,
    /// Readings delivered.
    pub delivered: u64,
    /// Seconds the fill took.
    pub secs: f64,
}

pub fn device_name(i: usize) -> String {
    format!("PM-{:04}", i + 1)
}

/// The reading device `d` sends as `seq` (what a simulator would send).
pub fn reading(spec: &FillSpec, d: usize, seq: u32) -> Reading {
    let device_time = spec.start + spec.step * seq as i32;
    let alert = spec.alert_every > 0 && seq % spec.alert_every == spec.alert_every - 1;
    let (kind, value, detail) = if alert {
        if seq.is_multiple_of(2) {
            (
                Kind::Episode,
                12.0 + (seq % 40) as f64,
                Some("VT".to_owned()),
            )
        } else {
            (Kind::ShockDelivered, 35.0, None)
        }
    } else {
        match seq % 5 {
            0 | 1 => (
                Kind::HeartRate,
                60.0 + ((seq * 7 + d as u32) % 40) as f64,
                None,
            ),
            2 => (Kind::BatteryVoltage, 2.95 - (seq as f64) * 1e-6, None),
            3 => (Kind::LeadImpedance, 500.0 + (seq % 50) as f64, None),
            _ => (Kind::PacingPercent, (seq % 100) as f64, None),
        }
    };
    Reading {
        device_id: device_name(d),
        epoch: None,
        seq,
        device_time,
        kind,
        value,
        priority: if alert {
            Priority::Alert
        } else {
            Priority::Routine
        },
        detail,
    }
}

/// A minimal configuration for the CLI on `db` (the CLI reads only the
/// store's path and key from it), with the key file beside it.
pub fn config_for(dir: &Path, db: &Path) -> PathBuf {
    let config = dir.join("views.toml");
    std::fs::write(
        &config,
        format!(
            r#"gateway_id = "gw-views"
[serial]
port = "/dev/null"
[store]
path = "{db}"
[mqtt]
host = "127.0.0.1"
port = 8883
ca_file = "/nonexistent/ca.crt"
cert_file = "/nonexistent/gw.crt"
key_file = "/nonexistent/gw.key"
"#,
            db = db.display()
        ),
    )
    .expect("write views config");
    config
}

/// Fills a new encrypted store `dir/views.db` (key beside it, as `hearth
/// run` makes it) by `spec`.
pub fn fill(dir: &Path, spec: &FillSpec) -> Filled {
    let began = Instant::now();
    let db = dir.join("views.db");
    let config = config_for(dir, &db);
    let text = std::fs::read_to_string(&config).unwrap();
    let c = hearth::config::Config::parse(&text, &config).expect("views config");
    let encryption = Encryption::from_config(&c.store, &config);
    let (mut store, _) = Store::open_checked(&db, &encryption).expect("open store");
    // A routine reading past a gap is stored at once (the gap is given up).
    store.set_gap_wait(std::time::Duration::ZERO);
    let missing = |d: usize, seq: u32| {
        spec.missing
            .iter()
            .any(|&(md, a, b)| md == d && (a..=b).contains(&seq))
    };
    let mut stored = 0u64;
    let mut batch: Vec<Reading> = Vec::with_capacity(spec.batch);
    let mut batch_time = spec.start;
    let mut flush = |store: &mut Store, batch: &mut Vec<Reading>, at: DateTime<Utc>| {
        if batch.is_empty() {
            return;
        }
        let mut outcomes = store.commit_serial("/dev/fill", batch, &[], at).unwrap();
        // Held at a gap: the device resends, and the gap is given up.
        for _ in 0..3 {
            let held: Vec<Reading> = batch
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| matches!(o, Insert::Gap { .. }))
                .map(|(r, _)| r.clone())
                .collect();
            stored += outcomes
                .iter()
                .filter(|o| matches!(o, Insert::Stored(_) | Insert::StoredAhead { .. }))
                .count() as u64;
            if held.is_empty() {
                break;
            }
            outcomes = store.commit_serial("/dev/fill", &held, &[], at).unwrap();
            *batch = held;
        }
        batch.clear();
    };
    for seq in 0..spec.per_device {
        for d in 0..spec.devices {
            if missing(d, seq) {
                continue;
            }
            if batch.is_empty() {
                batch_time = spec.start + spec.step * seq as i32;
            }
            batch.push(reading(spec, d, seq));
            if batch.len() >= spec.batch {
                flush(&mut store, &mut batch, batch_time);
            }
        }
    }
    flush(&mut store, &mut batch, batch_time);

    // Deliver the oldest share as the publisher would: begin (PUBLISH),
    // PUBREC, PUBCOMP, 100 readings per exchange, 50 exchanges per step.
    let target = (stored as f64 * spec.delivered) as u64;
    let mut delivered = 0u64;
    let mut pkid: u16 = 0;
    while delivered < target {
        let want = ((target - delivered) as usize).min(5000);
        let mut ids: Vec<i64> = store
            .next_queued(Priority::Alert, want)
            .unwrap()
            .into_iter()
            .map(|q| q.id)
            .collect();
        if ids.len() < want {
            ids.extend(
                store
                    .next_queued(Priority::Routine, want - ids.len())
                    .unwrap()
                    .into_iter()
                    .map(|q| q.id),
            );
        }
        if ids.is_empty() {
            break;
        }
        let at = Utc::now();
        let pkids: Vec<u16> = store
            .in_transaction(|s| {
                let mut pkids = Vec::new();
                for chunk in ids.chunks(100) {
                    pkid = pkid % 65535 + 1;
                    s.begin_exchange(pkid, "hospital/gw-views/readings", chunk, at)?;
                    pkids.push(pkid);
                }
                Ok(pkids)
            })
            .unwrap();
        store.exchanges_released(&pkids).unwrap();
        store.complete_exchanges(&pkids, at).unwrap();
        delivered += ids.len() as u64;
    }
    drop(store);
    Filled {
        config,
        db,
        stored,
        delivered,
        secs: began.elapsed().as_secs_f64(),
    }
}
