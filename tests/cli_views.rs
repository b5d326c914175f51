//! `hearth readings list` and `hearth readings show` through the real
//! binary: on a store filled through the real store code
//! (`support::fill`), and on the store of a real gateway that delivered to
//! a real mosquitto.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::e2e::reading_deliveries;
use crate::harness::{GatewayOpts, Hearth, Rig, Sim, hearth, readings};
use crate::support::TestDir;
use crate::support::fill::{FillSpec, device_name, fill, reading};
use crate::support::{Subscriber, wait_for};

/// A store with fixed times, so that its views can be compared with
/// snapshots: 3 devices × 40 readings a minute apart from 2026-11-30 08:00Z.
fn fixed_spec() -> FillSpec {
    FillSpec {
        devices: 3,
        per_device: 40,
        start: DateTime::parse_from_rfc3339("2026-11-30T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc),
        step: chrono::Duration::minutes(1),
        missing: vec![(0, 10, 12)],
        alert_every: 17,
        delivered: 0.5,
        batch: 6,
    }
}

fn run_ok(args: &[&str]) -> String {
    let (code, out, err) = hearth(args);
    assert_eq!(code, 0, "hearth {args:?} failed: {err}");
    out
}

/// `readings list` for `config` with `extra`, as text.
fn list(config: &Path, extra: &[&str]) -> String {
    let mut args = vec!["readings", "list", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_ok(&args)
}

/// Compares `got` with `tests/snapshots/NAME`, or writes it there when
/// `UPDATE_SNAPSHOTS=1`.
fn snapshot(name: &str, got: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var("UPDATE_SNAPSHOTS").as_deref() == Ok("1") {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no snapshot `{}` ({e}): run with UPDATE_SNAPSHOTS=1 once",
            path.display()
        )
    });
    assert_eq!(
        got, want,
        "`{name}` differs from its snapshot (UPDATE_SNAPSHOTS=1 rewrites it after a deliberate change)"
    );
}

/// Blanks what the fill stamps with the wall clock (delivery and store
/// times) so that a snapshot holds only what the fixed spec decides.
fn steady_json(text: &str) -> String {
    let mut rows: Vec<Value> = serde_json::from_str(text).unwrap();
    for r in &mut rows {
        for key in ["delivered_at", "stored_at"] {
            if !r[key].is_null() {
                r[key] = Value::from("<clock>");
            }
        }
    }
    serde_json::to_string_pretty(&rows).unwrap() + "\n"
}

fn steady_csv(text: &str) -> String {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let blank: Vec<usize> = ["delivered_at", "stored_at"]
        .iter()
        .map(|k| header.iter().position(|h| h == k).unwrap())
        .collect();
    let mut out = header.join(",") + "\n";
    for line in lines {
        let cells: Vec<String> = line
            .split(',')
            .enumerate()
            .map(|(i, c)| {
                if blank.contains(&i) && !c.is_empty() {
                    "<clock>".into()
                } else {
                    c.to_owned()
                }
            })
            .collect();
        out += &(cells.join(",") + "\n");
    }
    out
}

#[test]
fn list_table_csv_and_json_match_their_snapshots() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &fixed_spec());
    let c = &filled.config;
    let filter = ["--device", "PM-0001", "--seq", "8-18", "--utc"];
    let table = list(c, &[&filter[..], &["--format", "table"]].concat());
    snapshot("list-table.txt", &table);
    let csv = list(c, &[&filter[..], &["--format", "csv"]].concat());
    snapshot("list.csv", &steady_csv(&csv));
    let json = list(c, &[&filter[..], &["--format", "json"]].concat());
    snapshot("list.json", &steady_json(&json));
    // The same rows in each: seqs 8, 9, then 13 to 18 (10-12 never came).
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    let seqs: Vec<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![8, 9, 13, 14, 15, 16, 17, 18]);
    assert_eq!(csv.lines().count(), 1 + rows.len());
    assert!(table.contains("8 reading(s)"), "{table}");
}

#[test]
fn list_filters_select_exactly_the_readings_that_match() {
    let dir = TestDir::new();
    // One batch per minute: each reading received at its own minute.
    let spec = FillSpec {
        batch: 3,
        ..FillSpec::small(3, 300)
    };
    let filled = fill(dir.path(), &spec);
    let rows = readings(
        &filled.config,
        &[
            "--device",
            "PM-0002",
            "--kind",
            "heart_rate",
            "--seq",
            "100-160",
        ],
    );
    let want: Vec<(u32, f64)> = (100..=160)
        .map(|seq| reading(&spec, 1, seq))
        .filter(|r| r.kind.as_str() == "heart_rate")
        .map(|r| (r.seq, r.value))
        .collect();
    let got: Vec<(u32, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap() as u32,
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Alerts only, of every device.
    let alerts = readings(&filled.config, &["--priority", "alert"]);
    let want_alerts = (0..3)
        .flat_map(|d| (0..300).map(move |seq| (d, seq)))
        .filter(|&(d, seq)| !(d == 0 && (50..=59).contains(&seq)))
        .filter(|&(d, seq)| reading(&spec, d, seq).priority.as_str() == "alert")
        .count();
    assert_eq!(alerts.len(), want_alerts);
    assert!(alerts.iter().all(|r| r["priority"] == "alert"));

    // A window: received in [start+100 min, start+110 min).
    let ms = |t: DateTime<Utc>| DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap();
    let from = ms(spec.start + chrono::Duration::minutes(100));
    let to = ms(spec.start + chrono::Duration::minutes(110));
    let window = readings(
        &filled.config,
        &["--since", &from.to_rfc3339(), "--until", &to.to_rfc3339()],
    );
    assert!(!window.is_empty());
    for r in &window {
        let t = DateTime::parse_from_rfc3339(r["received_at"].as_str().unwrap()).unwrap();
        assert!(t >= from && t < to, "{r}");
    }

    // NDJSON: the same rows as JSON, one per line.
    let ndjson = list(
        &filled.config,
        &["--device", "PM-0003", "--format", "ndjson"],
    );
    let json = readings(&filled.config, &["--device", "PM-0003"]);
    let lines: Vec<Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, json);

    // A bad seq range and a bad cursor: one line each, exit 2.
    for bad in [["--seq", "9-3"], ["--after", "yesterday"]] {
        let mut args = vec![
            "readings",
            "list",
            "--config",
            filled.config.to_str().unwrap(),
        ];
        args.extend_from_slice(&bad);
        let (code, _, err) = hearth(&args);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(bad[1]), "{err}");
    }
}

#[test]
fn paging_by_cursor_visits_every_reading_once() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(2, 250));
    let all = readings(&filled.config, &[]);
    assert_eq!(all.len() as u64, filled.stored);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let config = filled.config.to_str().unwrap();
    loop {
        let mut args = vec![
            "readings", "list", "--config", config, "--format", "json", "--limit", "64",
        ];
        if let Some(a) = &after {
            args.extend_from_slice(&["--after", a]);
        }
        let (code, out, err) = hearth(&args);
        assert_eq!(code, 0, "{err}");
        let page: Vec<Value> = serde_json::from_str(&out).unwrap();
        seen.extend(page.iter().map(|r| r["id"].as_i64().unwrap()));
        match err.lines().find_map(|l| l.strip_prefix("more: --after ")) {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
        assert_eq!(page.len(), 64, "a page that says more is full");
    }
    let want: Vec<i64> = all.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(seen, want, "pages in order, none twice, none missed");
}

#[test]
fn a_table_fits_the_terminal_width_and_shows_units() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(2, 30));
    let config = filled.config.to_str().unwrap();
    for width in [200, 100, 72] {
        let out = std::process::Command::new(crate::support::hearth_bin())
            .args(["readings", "list", "--config", config])
            .env("COLUMNS", width.to_string())
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        for line in text.lines() {
            assert!(line.chars().count() <= width, "{width}: {line}");
        }
        assert!(text.contains(" bpm"), "{text}");
    }
    // Local time carries its offset; --utc ends in Z.
    let local = list(&filled.config, &["--limit", "1"]);
    let utc = list(&filled.config, &["--limit", "1", "--utc"]);
    assert!(
        local.lines().nth(1).unwrap().contains("+00:00")
            || local.contains('+')
            || local.contains("-0"),
        "{local}"
    );
    assert!(utc.lines().nth(1).unwrap().contains("Z "), "{utc}");
}

#[test]
fn show_tells_a_delivered_readings_journey_and_its_exact_payload() {
    let rig = Rig::new("gw-show");
    let gw = GatewayOpts::new("gw-show");
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-show",
        &["hearth/v1/gw-show/readings", "hearth/v1/gw-show/alerts"],
    );
    let sim = Sim::start(&["--count", "30", "--interval-ms", "0", "--seed", "3"]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    let summary = sim.finish(Duration::from_secs(60));
    assert_eq!(summary["acked"], 30, "{summary}");
    let got = sub.wait_all(Duration::from_secs(60), |all| {
        reading_deliveries(all).len() >= 30
    });
    wait_for(Duration::from_secs(30), "every reading delivered", || {
        readings(&config, &["--state", "delivered"])
            .len()
            .eq(&30)
            .then_some(())
    });
    let rows = readings(&config, &[]);
    let r = &rows[17];
    let id = r["id"].as_i64().unwrap().to_string();
    let c = config.to_str().unwrap();
    let view: Value = serde_json::from_str(&run_ok(&[
        "readings", "show", &id, "--config", c, "--format", "json",
    ]))
    .unwrap();

    let reading = &view["reading"];
    assert_eq!(reading["seq"], r["seq"]);
    let t = |v: &Value| DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(t(&reading["stored_at"]) >= t(&reading["received_at"]));
    let journeys = view["journeys"].as_array().unwrap();
    assert_eq!(journeys.len(), 1, "{view:#}");
    let j = &journeys[0];
    assert_eq!(j["outcome"], "delivered");
    assert_eq!(j["pkid"], r["pkid"]);
    assert_eq!(j["qos"], 2);
    assert!(
        j["readings"]
            .as_array()
            .unwrap()
            .contains(&Value::from(r["id"].as_i64().unwrap()))
    );
    let sends = j["sends"].as_array().unwrap();
    assert_eq!(sends[0]["packet"], "PUBLISH");
    let status = crate::harness::status_view(&config);
    assert_eq!(
        sends[0]["connection"], status["session"],
        "sent on this connection"
    );
    assert!(t(&j["began_at"]) >= t(&reading["stored_at"]));
    assert!(t(&j["pubrec_at"]) >= t(&j["began_at"]));
    assert!(t(&j["ended_at"]) >= t(&j["pubrec_at"]));
    assert_eq!(t(&j["ended_at"]), t(&reading["delivered_at"]));

    // The payload as the subscriber got it, and as the journey recorded it.
    assert_eq!(view["payload"]["verified"], true, "{view:#}");
    let payload: Value = serde_json::from_str(view["payload"]["text"].as_str().unwrap()).unwrap();
    let reading_id = format!("gw-show/{}/{}", r["device"].as_str().unwrap(), r["seq"]);
    assert!(
        got.iter().any(|d| d.payload == payload),
        "no delivery equals the rebuilt payload {payload}"
    );
    assert!(payload.to_string().contains(&reading_id), "{payload}");

    // The table says the same in words.
    let table = run_ok(&["readings", "show", &id, "--config", c]);
    for needle in [
        "delivered (PUBCOMP)",
        "PUBREC",
        "PUBLISH on connection",
        "payload",
        &reading_id,
    ] {
        assert!(table.contains(needle), "`{needle}` missing:\n{table}");
    }
    // An id that is not there: one line, exit 2.
    let (code, _, err) = hearth(&["readings", "show", "999999", "--config", c]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("999999"), "{err}");
    let devices: BTreeSet<String> = rows
        .iter()
        .map(|r| r["device"].as_str().unwrap().to_owned())
        .collect();
    assert!(!devices.is_empty());
    let _ = device_name(0);
}

/// Prints the README's examples from a real gateway's store:
/// `cargo test --test tests cli_views::readme_examples -- --ignored --nocapture`.
#[test]
#[ignore = "prints the README's examples"]
fn readme_examples() {
    let rig = Rig::new("gw-0001");
    let gw = GatewayOpts::new("gw-0001");
    let sim = Sim::start(&[
        "--count",
        "12",
        "--interval-ms",
        "0",
        "--seed",
        "5",
        "--alert-rate",
        "0.2",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(60));
    wait_for(Duration::from_secs(30), "every reading delivered", || {
        (readings(&config, &["--state", "delivered"]).len() == 12).then_some(())
    });
    let c = config.to_str().unwrap();
    let shown = |args: &[&str]| {
        let out = std::process::Command::new(crate::support::hearth_bin())
            .args(args)
            .args(["--config", c])
            .env("COLUMNS", "110")
            .output()
            .unwrap();
        println!(
            "$ hearth {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
    };
    shown(&["readings", "list", "--limit", "5"]);
    shown(&[
        "readings",
        "list",
        "--priority",
        "alert",
        "--format",
        "ndjson",
        "--limit",
        "1",
    ]);
    let rows = readings(&config, &["--priority", "alert"]);
    let id = rows[0]["id"].as_i64().unwrap().to_string();
    shown(&["readings", "show", &id]);
}
