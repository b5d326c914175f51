//! `hearth readings gaps` and `hearth readings stats` through the real
//! binary, on stores filled through the real store code
//! (`support::fill`). What each view must say is worked out here from the
//! fill's spec (`fill::reading`, the readings the fill sends) and, where the
//! store decides (what was delivered and pruned), from its own listing:
//! never copied from the output.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use hearth::outbox::{Encryption, Insert, ListFilter, Store};
use hearth::reading::{Priority, Reading};
use serde_json::Value;

use crate::harness::hearth;
use crate::support::TestDir;
use crate::support::fill::{self, FillSpec, Filled, device_name, reading};

/// `hearth readings <view> --config C <args>`: (exit code, stdout, stderr).
fn view(filled: &Filled, name: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        "readings",
        name,
        "--config",
        filled.config.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    hearth(&all)
}

fn json_of(filled: &Filled, name: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let (code, out, err) = view(filled, name, &all);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The store `fill` made, opened for writing as `hearth run` would.
fn open(filled: &Filled) -> Store {
    let text = std::fs::read_to_string(&filled.config).unwrap();
    let c = hearth::config::Config::parse(&text, &filled.config).unwrap();
    let encryption = Encryption::from_config(&c.store, &filled.config);
    Store::open_checked(&filled.db, &encryption).unwrap().0
}

/// Seqs each device has stored, as the store lists them (all epochs/runs).
fn stored_seqs(filled: &Filled) -> BTreeMap<String, BTreeSet<u32>> {
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for r in open(filled).list(&ListFilter::default()).unwrap() {
        out.entry(r.device).or_default().insert(r.seq);
    }
    out
}

/// What `gaps` must report for a fill with one run per device: each
/// `missing` range of the spec (joined when they touch) that has a stored
/// reading below and above it. (device, first, last).
fn expected_gaps(
    spec: &FillSpec,
    stored: &BTreeMap<String, BTreeSet<u32>>,
) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for d in 0..spec.devices {
        let name = device_name(d);
        let mut ranges: Vec<(u32, u32)> = spec
            .missing
            .iter()
            .filter(|m| m.0 == d)
            .map(|m| (m.1, m.2))
            .collect();
        ranges.sort();
        let mut joined: Vec<(u32, u32)> = Vec::new();
        for (a, b) in ranges {
            match joined.last_mut() {
                Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
                _ => joined.push((a, b)),
            }
        }
        let seqs = stored.get(&name).cloned().unwrap_or_default();
        for (a, b) in joined {
            let below = seqs.range(..a).next_back().is_some();
            let above = seqs.range(b + 1..).next().is_some();
            if below && above {
                out.push((name.clone(), a, b));
            }
        }
    }
    out
}

/// (device, first, last, count) of each gap in a JSON answer.
fn ranges(gaps: &Value) -> Vec<(String, u32, u32)> {
    gaps.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let (first, last) = (g["first"].as_u64().unwrap(), g["last"].as_u64().unwrap());
            assert_eq!(g["count"].as_u64().unwrap(), last - first + 1, "{g}");
            (
                g["device"].as_str().unwrap().to_owned(),
                first as u32,
                last as u32,
            )
        })
        .collect()
}

fn spec_with_gaps() -> FillSpec {
    FillSpec {
        missing: vec![
            // In the middle (the default), and a second one in the device.
            (0, 50, 59),
            (0, 120, 120),
            // At the start: the device may count from 5, nothing to say.
            (1, 0, 4),
            // Just before an alert (193): it is stored ahead of the gap,
            // then the gap is given up with it inside.
            (1, 190, 192),
            // Two that touch are one gap.
            (1, 200, 210),
            (1, 211, 230),
            // At the end: not knowable either.
            (2, 298, 299),
        ],
        ..FillSpec::small(3, 300)
    }
}

#[test]
fn gaps_are_the_missing_ranges_between_stored_readings_with_their_neighbours() {
    let dir = TestDir::new();
    let spec = spec_with_gaps();
    let filled = fill::fill(dir.path(), &spec);
    let stored = stored_seqs(&filled);
    let want = expected_gaps(&spec, &stored);
    assert_eq!(
        want,
        [
            ("PM-0001".to_owned(), 50, 59),
            ("PM-0001".to_owned(), 120, 120),
            ("PM-0002".to_owned(), 190, 192),
            ("PM-0002".to_owned(), 200, 230)
        ],
        "the spec itself"
    );
    let gaps = json_of(&filled, "gaps", &["--utc"]);
    assert_eq!(ranges(&gaps), want);

    // Each gap's window: the readings just before and after, their times
    // as the fill sent them (device time = start + step * seq).
    for g in gaps.as_array().unwrap() {
        let d: usize = g["device"].as_str().unwrap()[3..].parse::<usize>().unwrap() - 1;
        for (side, seq) in [
            ("before", g["first"].as_u64().unwrap() as u32 - 1),
            ("after", g["last"].as_u64().unwrap() as u32 + 1),
        ] {
            assert_eq!(g[side]["seq"], seq, "{g}");
            let t = reading(&spec, d, seq).device_time;
            let shown: DateTime<Utc> = g[side]["device_time"].as_str().unwrap().parse().unwrap();
            assert_eq!(shown.timestamp_millis(), t.timestamp_millis(), "{g}");
            assert!(g[side]["received_at"].as_str().unwrap().ends_with('Z'));
        }
        // The fill waits zero: every gap was given up at once.
        assert_eq!(g["status"], "given_up", "{g}");
    }
    // The alert stored ahead of 190..=192 lies in the range given up.
    let g = &gaps[2];
    assert_eq!(
        (
            &g["given_up"]["from"],
            &g["given_up"]["to"],
            &g["given_up"]["filled"]
        ),
        (&Value::from(190), &Value::from(193), &Value::from(1))
    );

    // --device narrows it; the table says the same in words.
    let one = json_of(&filled, "gaps", &["--device", "PM-0002"]);
    assert_eq!(ranges(&one), want[2..]);
    let (code, table, err) = view(&filled, "gaps", &["--utc"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("DEVICE"), "{table}");
    assert!(
        lines[1].starts_with("PM-0001") && lines[1].contains("50-59"),
        "{table}"
    );
    assert!(lines[2].contains(" 120 "), "{table}");
    assert_eq!(
        lines.last(),
        Some(&"4 gap(s), 45 seq(s) missing"),
        "{table}"
    );

    // NDJSON and CSV carry the same rows.
    let (_, nd, _) = view(&filled, "gaps", &["--format", "ndjson"]);
    let nd: Vec<Value> = nd
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ranges(&Value::Array(nd)), want);
    let (_, csv, _) = view(&filled, "gaps", &["--format", "csv"]);
    let mut csv = csv.lines();
    let header: Vec<&str> = csv.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<(String, u32, u32)> = csv
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), header.len(), "{l}");
            let (a, b): (u32, u32) = (
                f[col("first")].parse().unwrap(),
                f[col("last")].parse().unwrap(),
            );
            assert_eq!(f[col("count")], (b - a + 1).to_string());
            (f[col("device")].to_owned(), a, b)
        })
        .collect();
    assert_eq!(rows, want);
}

#[test]
fn a_late_reading_fills_part_of_a_gap_and_pruned_readings_are_not_missing() {
    let dir = TestDir::new();
    let spec = FillSpec {
        // Half delivered (alerts first), then pruned below.
        delivered: 0.5,
        // 193 is an alert: delivered first and pruned, it lies in the
        // range given up (190..=193) and its tombstone says it came.
        missing: vec![(0, 200, 209), (1, 190, 192), (1, 250, 250), (2, 20, 24)],
        ..FillSpec::small(3, 300)
    };
    let filled = fill::fill(dir.path(), &spec);
    let filled_at = Utc::now().timestamp_millis();
    {
        let mut store = open(&filled);
        // Seq 205 comes late: no longer missing.
        let out = store
            .commit_serial("/dev/fill", &[reading(&spec, 0, 205)], &[], Utc::now())
            .unwrap();
        assert!(matches!(out[..], [Insert::Stored(_)]), "{out:?}");
        // Every delivered reading pruned: the alerts (97th seqs) among the
        // stored ones are gone, their tombstones (made after `before`)
        // stay and say they came.
        let before = loop {
            let now = Utc::now();
            if now.timestamp_millis() > filled_at {
                break now;
            }
        };
        let pruned = store.prune_delivered(before).unwrap();
        assert_eq!(pruned as u64, filled.delivered);
    }
    let stored = stored_seqs(&filled);
    for d in 0..3 {
        let name = device_name(d);
        for alert in [193, 290] {
            assert!(
                !stored[&name].contains(&alert),
                "alert {alert} of {name} was pruned"
            );
            assert!(stored[&name].contains(&(alert + 1)));
        }
    }
    let mut spec_now = spec.clone();
    spec_now.missing = vec![
        (0, 200, 204),
        (0, 206, 209),
        (1, 190, 192),
        (1, 250, 250),
        (2, 20, 24),
    ];
    let want = expected_gaps(&spec_now, &stored);
    // 2's gap lay in the delivered half: pruned around it, not knowable.
    assert_eq!(
        want,
        [
            ("PM-0001".to_owned(), 200, 204),
            ("PM-0001".to_owned(), 206, 209),
            ("PM-0002".to_owned(), 190, 192),
            ("PM-0002".to_owned(), 250, 250)
        ]
    );
    let gaps = json_of(&filled, "gaps", &[]);
    assert_eq!(ranges(&gaps), want, "{gaps:#}");
    for g in &gaps.as_array().unwrap()[..2] {
        assert_eq!(
            g["given_up"],
            serde_json::json!({"from": 200, "to": 209, "filled": 1})
        );
    }
}

/// `count` readings of device `name` with `epoch`, seqs `seqs`, one minute
/// apart from `t0`, each one transaction (as a device sends them).
fn send(
    store: &mut Store,
    name: &str,
    epoch: Option<u32>,
    seqs: impl IntoIterator<Item = u32>,
    t0: DateTime<Utc>,
    bump: f64,
) -> Vec<Insert> {
    let spec = FillSpec::small(1, 1);
    let mut out = Vec::new();
    for seq in seqs {
        let mut r: Reading = reading(&spec, 0, seq);
        r.device_id = name.to_owned();
        r.epoch = epoch;
        r.device_time = t0 + Duration::minutes(i64::from(seq));
        r.value += bump;
        out.extend(
            store
                .commit_serial("/dev/test", &[r], &[], r_time(t0, seq))
                .unwrap(),
        );
    }
    out
}

fn r_time(t0: DateTime<Utc>, seq: u32) -> DateTime<Utc> {
    t0 + Duration::minutes(i64::from(seq))
}

#[test]
fn gaps_across_epochs_runs_and_the_one_the_gateway_waits_on() {
    let dir = TestDir::new();
    let spec = FillSpec {
        missing: vec![],
        ..FillSpec::small(1, 10)
    };
    let filled = fill::fill(dir.path(), &spec);
    let t0 = Utc.with_ymd_and_hms(2026, 11, 30, 8, 0, 0).unwrap();
    let since_ms;
    {
        let mut store = open(&filled);
        store.set_gap_wait(std::time::Duration::ZERO);
        // A v1.1 device: epoch 1 with 4..=6 missing, epoch 2 with 3 missing.
        send(&mut store, "PM-E", Some(1), (1..=3).chain(7..=9), t0, 0.0);
        send(&mut store, "PM-E", Some(2), [1, 2, 4, 5], t0, 0.5);
        // A v1 device counts 1..=20 without 8..=9, then again from 1 (a
        // new run, 1..=5 without 3): run 0's gap is still found.
        send(&mut store, "PM-R", None, (1..=7).chain(10..=20), t0, 0.0);
        let again = send(
            &mut store,
            "PM-R",
            None,
            [1, 2, 4, 5],
            t0 + Duration::days(1),
            1.0,
        );
        assert_eq!(again[0], Insert::Stored(hearth::outbox::Flag::Restart));
        // The gateway holds a routine reading for 11 (alert 15 stored
        // ahead of it; 16 held while the gap wait runs).
        store.set_gap_wait(std::time::Duration::from_secs(3600));
        send(&mut store, "PM-W", None, 1..=10, t0, 0.0);
        let mut alert = reading(&spec, 0, 15);
        alert.device_id = "PM-W".into();
        alert.priority = Priority::Alert;
        let mut held = reading(&spec, 0, 16);
        held.device_id = "PM-W".into();
        let at = t0 + Duration::minutes(16);
        let out = store
            .commit_serial("/dev/test", &[alert, held], &[], at)
            .unwrap();
        assert_eq!(
            out,
            [
                Insert::StoredAhead { missing: 11 },
                Insert::Gap { missing: 11 }
            ]
        );
        since_ms = at.timestamp_millis();
        // A device waited on with nothing stored above the missing seq.
        send(&mut store, "PM-X", None, 1..=3, t0, 0.0);
        let out = send(&mut store, "PM-X", None, [5], t0, 0.0);
        assert_eq!(out, [Insert::Gap { missing: 4 }]);
    }
    let gaps = json_of(&filled, "gaps", &["--utc"]);
    let got: Vec<(String, u64, u64, Value, String)> = gaps
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["device"].as_str().unwrap().to_owned(),
                g["epoch"].as_u64().unwrap(),
                g["run"].as_u64().unwrap(),
                g["first"].clone(),
                format!(
                    "{}..{} {}",
                    g["first"],
                    g["last"],
                    g["status"].as_str().unwrap()
                ),
            )
        })
        .collect();
    let want = [
        ("PM-E", 1, 0, 4, "4..6 given_up"),
        ("PM-E", 2, 0, 3, "3..3 given_up"),
        ("PM-R", 0, 0, 8, "8..9 given_up"),
        ("PM-R", 0, 1, 3, "3..3 given_up"),
        ("PM-W", 0, 0, 11, "11..14 waiting"),
        ("PM-X", 0, 0, 4, "4..null waiting"),
    ];
    let want: Vec<(String, u64, u64, Value, String)> = want
        .iter()
        .map(|w| (w.0.to_owned(), w.1, w.2, Value::from(w.3), w.4.to_owned()))
        .collect();
    assert_eq!(got, want, "{gaps:#}");
    let since = |i: usize| -> i64 {
        gaps[i]["since"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp_millis()
    };
    assert_eq!(since(4), since_ms);
    assert_eq!(gaps[5]["count"], Value::Null);
    assert_eq!(gaps[5]["before"]["seq"], 3);
    let (_, table, _) = view(&filled, "gaps", &["--device", "PM-W", "--utc"]);
    assert!(
        table.contains("11-14") && table.contains("waiting since 2026-11-30T08:16:00.000Z"),
        "{table}"
    );
    let (_, table, _) = view(&filled, "gaps", &["--device", "PM-X"]);
    assert!(table.contains("4-?"), "{table}");
}

#[test]
fn no_gaps_says_so_and_exits_0() {
    let dir = TestDir::new();
    let spec = FillSpec {
        missing: vec![(0, 0, 9), (0, 90, 99)],
        ..FillSpec::small(2, 100)
    };
    let filled = fill::fill(dir.path(), &spec);
    let (code, out, err) = view(&filled, "gaps", &[]);
    assert_eq!((code, out.as_str()), (0, "no gaps\n"), "{err}");
    assert_eq!(json_of(&filled, "gaps", &[]), Value::Array(vec![]));
    let (code, out, _) = view(&filled, "gaps", &["--format", "csv"]);
    assert_eq!((code, out.lines().count()), (0, 1));
}

/// Expected stats from the fill's own readings: (count, min, max, mean,
/// last value, last device time) per (device, kind) over `seqs`.
type Expected = BTreeMap<(String, String), (u64, f64, f64, f64, f64, DateTime<Utc>)>;

fn expected_stats(
    spec: &FillSpec,
    seqs: std::ops::RangeInclusive<u32>,
    kind: Option<&str>,
) -> Expected {
    let mut by: BTreeMap<(String, String), Vec<Reading>> = BTreeMap::new();
    for d in 0..spec.devices {
        for seq in seqs.clone() {
            let r = reading(spec, d, seq);
            if kind.is_none_or(|k| k == r.kind.as_str()) {
                by.entry((r.device_id.clone(), r.kind.as_str().to_owned()))
                    .or_default()
                    .push(r);
            }
        }
    }
    by.into_iter()
        .map(|(k, rs)| {
            let values: Vec<f64> = rs.iter().map(|r| r.value).collect();
            let last = rs.iter().max_by_key(|r| r.device_time).unwrap();
            (
                k,
                (
                    rs.len() as u64,
                    values.iter().copied().fold(f64::INFINITY, f64::min),
                    values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    values.iter().sum::<f64>() / values.len() as f64,
                    last.value,
                    last.device_time,
                ),
            )
        })
        .collect()
}

fn stats_spec() -> FillSpec {
    FillSpec {
        // One seq of every device per transaction: received_at is exactly
        // start + step * seq, so a window is a seq range.
        batch: 3,
        missing: vec![],
        delivered: 0.5,
        start: Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap(),
        ..FillSpec::small(3, 500)
    }
}

#[test]
fn stats_per_device_and_kind_match_the_readings_sent_in_the_window() {
    let dir = TestDir::new();
    let spec = stats_spec();
    let filled = fill::fill(dir.path(), &spec);
    let at = |seq: u32| (spec.start + spec.step * seq as i32).to_rfc3339();
    // Waiting: what the store lists as not delivered, seqs 100..=399.
    let mut waiting: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut waiting_all = 0;
    for r in open(&filled).list(&ListFilter::default()).unwrap() {
        if r.state != "delivered" {
            waiting_all += 1;
            if (100..=399).contains(&r.seq) {
                *waiting.entry((r.device, r.kind)).or_default() += 1;
            }
        }
    }
    let want = expected_stats(&spec, 100..=399, None);
    let doc = json_of(
        &filled,
        "stats",
        &["--since", &at(100), "--until", &at(399), "--utc"],
    );
    let groups = doc["groups"].as_array().unwrap();
    assert_eq!(groups.len(), want.len(), "{doc:#}");
    for (g, ((device, kind), (count, min, max, mean, last, last_time))) in groups.iter().zip(&want)
    {
        assert_eq!(
            (g["device"].as_str().unwrap(), g["kind"].as_str().unwrap()),
            (device.as_str(), kind.as_str())
        );
        assert_eq!(g["count"].as_u64().unwrap(), *count, "{g}");
        assert_eq!(g["min"].as_f64().unwrap(), *min, "{g}");
        assert_eq!(g["max"].as_f64().unwrap(), *max, "{g}");
        assert!(
            (g["mean"].as_f64().unwrap() - mean).abs() < 1e-9 * mean.abs(),
            "{g} {mean}"
        );
        assert_eq!(g["last"].as_f64().unwrap(), *last, "{g}");
        let t: DateTime<Utc> = g["last_device_time"].as_str().unwrap().parse().unwrap();
        assert_eq!(t, *last_time, "{g}");
        let w = waiting
            .get(&(device.clone(), kind.clone()))
            .copied()
            .unwrap_or(0);
        assert_eq!(g["waiting"].as_u64().unwrap(), w, "{g}");
    }
    let total: u64 = want.values().map(|v| v.0).sum();
    assert_eq!(total, 900);
    assert_eq!(doc["total"]["count"], total);
    assert_eq!(doc["total"]["waiting"], waiting.values().sum::<u64>());
    assert!(doc["total"]["waiting"].as_u64().unwrap() > 0);
    assert_eq!(doc["waiting_all_time"], waiting_all);

    // --device and --kind narrow it; CSV and NDJSON carry the same rows.
    let want = expected_stats(&spec, 100..=399, Some("heart_rate"));
    let args = [
        "--since",
        &at(100),
        "--until",
        &at(399),
        "--device",
        "PM-0002",
        "--kind",
        "heart_rate",
    ];
    let one = json_of(&filled, "stats", &args);
    let g = &one["groups"][0];
    let w = &want[&("PM-0002".to_owned(), "heart_rate".to_owned())];
    assert_eq!(
        (
            one["groups"].as_array().unwrap().len(),
            g["count"].as_u64().unwrap()
        ),
        (1, w.0)
    );
    assert_eq!(
        (
            g["min"].as_f64().unwrap(),
            g["max"].as_f64().unwrap(),
            g["unit"].as_str().unwrap()
        ),
        (w.1, w.2, "bpm")
    );
    let mut csv_args = args.to_vec();
    csv_args.extend(["--format", "csv"]);
    let (code, csv, _) = view(&filled, "stats", &csv_args);
    assert_eq!(code, 0);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "device,kind,unit,count,min,max,mean,last,last_device_time,waiting"
    );
    let f: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(
        (f[0], f[1], f[3].parse::<u64>().unwrap()),
        ("PM-0002", "heart_rate", w.0)
    );
    assert_eq!(f[7].parse::<f64>().unwrap(), w.4);
    let mut nd_args = args.to_vec();
    nd_args.extend(["--format", "ndjson"]);
    let (_, nd, _) = view(&filled, "stats", &nd_args);
    let nd: Value = serde_json::from_str(nd.trim()).unwrap();
    assert_eq!(&nd, g);

    // The table: values with units, a total line, the window stated.
    let (code, table, err) = view(
        &filled,
        "stats",
        &["--since", &at(100), "--until", &at(399), "--utc"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("DEVICE") && lines[0].contains("WAITING"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("PM-0001") && l.contains("heart_rate") && l.contains(" bpm")),
        "{table}"
    );
    let total_line = lines.iter().find(|l| l.starts_with("total")).unwrap();
    assert!(total_line.contains(" 900 "), "{table}");
    assert!(
        lines
            .last()
            .unwrap()
            .contains(&format!("{waiting_all} waiting in the whole store")),
        "{table}"
    );
}

#[test]
fn stats_default_to_the_last_24_hours_and_refuse_a_bad_window() {
    let dir = TestDir::new();
    // Ends now, one reading a minute per device for 30 hours.
    let spec = FillSpec {
        missing: vec![],
        alert_every: 0,
        ..FillSpec::small(1, 30 * 60)
    };
    let filled = fill::fill(dir.path(), &spec);
    let doc = json_of(&filled, "stats", &[]);
    let count = doc["total"]["count"].as_u64().unwrap();
    // Received in batches of 500 at the batch's first time: the window's
    // edge falls inside a batch, so within one batch of 24 h.
    assert!((24 * 60 - 500..=24 * 60 + 500).contains(&count), "{count}");
    assert!(count < u64::from(spec.per_device));

    for (args, what) in [
        (vec!["--kind", "pulse"], "`--kind pulse`"),
        (vec!["--since", "yesterday"], "`--since yesterday`"),
        (vec!["--since", "1h", "--until", "2h"], "before"),
    ] {
        let (code, _, err) = view(&filled, "stats", &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(what), "{err}");
    }
}

/// The million-row figures for the note (`cargo test --release --test
/// tests cli_summary::million -- --ignored --nocapture`). Keeps the store
/// in `$HEARTH_SUMMARY_DIR` when set, so that a second run skips the fill.
#[test]
#[ignore]
fn million_rows_timings() {
    let keep = std::env::var("HEARTH_SUMMARY_DIR").ok();
    let dir = TestDir::new();
    let root = keep.as_deref().map(Path::new).unwrap_or(dir.path());
    let spec = FillSpec {
        batch: 2000,
        missing: (0..100)
            .step_by(7)
            .map(|d| (d, 5000 + d as u32, 5009 + 2 * d as u32))
            .collect(),
        ..FillSpec::small(100, 10_000)
    };
    let filled = if root.join("views.db").exists() {
        Filled {
            config: fill::config_for(root, &root.join("views.db")),
            db: root.join("views.db"),
            stored: 0,
            delivered: 0,
            secs: 0.0,
        }
    } else {
        let f = fill::fill(root, &spec);
        eprintln!("fill: {} readings in {:.1} s", f.stored, f.secs);
        f
    };
    for args in [
        vec!["gaps"],
        vec!["gaps", "--device", "PM-0008"],
        vec!["stats"],
        vec!["stats", "--since", "365d"],
        vec!["stats", "--device", "PM-0008", "--since", "365d"],
    ] {
        let mut best = f64::MAX;
        let mut lines = 0;
        for _ in 0..5 {
            let began = Instant::now();
            let (code, out, err) = view(&filled, args[0], &args[1..]);
            best = best.min(began.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(code, 0, "{err}");
            lines = out.lines().count();
        }
        eprintln!(
            "hearth readings {}: best of 5 {best:.0} ms ({lines} lines)",
            args.join(" ")
        );
    }
}
