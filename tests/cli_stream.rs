//! `hearth readings tail` and `hearth readings export` through the real
//! binary: tail following a running gateway (real simulator on a pty, real
//! mosquitto), and exports of a store filled through the real store code,
//! read back and compared with `readings list`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, hearth, readings};
use crate::support::fill::{FillSpec, fill};
use crate::support::{TestDir, hearth_bin, sigterm, wait_for};

/// A `hearth readings tail` child whose stdout lines arrive on a channel.
struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tail {
    fn start(config: &Path, extra: &[&str]) -> Tail {
        let mut child = Command::new(hearth_bin())
            .args(["readings", "tail", "--config"])
            .arg(config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hearth readings tail");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Tail { child, lines }
    }

    /// Reads NDJSON events until `done` holds for one; returns all read.
    fn until(&self, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no {what} from tail within {timeout:?}; it printed {seen:#?}")
            });
            let event: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("tail printed a line that is not JSON ({e}): {line}"));
            let hit = done(&event);
            seen.push(event);
            if hit {
                return seen;
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the audit trail holds the patient-data read of a running
/// `readings tail`: it is recorded right after tail took its cursor.
fn wait_tail_ready(config: &Path) {
    let c = config.to_str().unwrap();
    wait_for(
        Duration::from_secs(20),
        "the audit entry of `readings tail`",
        || {
            let (code, out, _) = hearth(&[
                "audit",
                "--format",
                "json",
                "--kind",
                "patient-data-read",
                "--config",
                c,
            ]);
            let entries: Vec<Value> = serde_json::from_str(&out).ok()?;
            (code == 0
                && entries.iter().any(|e| {
                    e["detail"]["command"]
                        .as_str()
                        .is_some_and(|c| c.contains("readings tail"))
                }))
            .then_some(())
        },
    );
}

/// A gateway that has opened its store but has no serial port yet, a tail
/// following that store, and then a simulator on the port: every reading
/// is stored after tail took its cursor, so each must reach its stdout.
fn gateway_and_tail(
    rig: &Rig,
    gw: &GatewayOpts,
    count: u64,
) -> (Hearth, Tail, Sim, std::path::PathBuf) {
    let port = rig.dir.join("serial-port");
    let config = rig.config(gw, &port);
    let gateway = Hearth::start(&config);
    gateway.wait_log_count("Waiting for the serial port.", 1, Duration::from_secs(20));
    let tail = Tail::start(
        &config,
        &[
            "--follow",
            "--format",
            "ndjson",
            "-n",
            "0",
            "--utc",
            "--interval-ms",
            "50",
        ],
    );
    wait_tail_ready(&config);
    let count = count.to_string();
    let sim = Sim::start(&[
        "--count",
        &count,
        "--interval-ms",
        "20",
        "--alert-rate",
        "0",
    ]);
    std::os::unix::fs::symlink(&sim.pty, &port).expect("link the serial port to the simulator");
    (gateway, tail, sim, config)
}

#[test]
fn tail_follow_shows_each_reading_a_running_gateway_stores() {
    let rig = Rig::new("gw-tail");
    let gw = GatewayOpts::new("gw-tail");
    let (_gateway, tail, sim, config) = gateway_and_tail(&rig, &gw, 20);
    let summary = sim.finish(Duration::from_secs(60));
    assert_eq!(summary["acked"], 20, "{summary}");

    // The last reading the simulator sent, seq 20, shows as stored.
    let seen = tail.until(Duration::from_secs(20), "stored event of seq 20", |e| {
        e["event"] == "stored" && e["reading"]["seq"] == 20
    });
    let stored: Vec<&Value> = seen.iter().filter(|e| e["event"] == "stored").collect();
    let seqs: Vec<u64> = stored
        .iter()
        .map(|e| e["reading"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>(), "each once, in order");
    // Each event is the row `readings list` shows, stored while tail ran.
    let rows = readings(&config, &[]);
    for e in &stored {
        let r = &e["reading"];
        assert_eq!(r["device"], "PM-000001", "{e}");
        let row = rows
            .iter()
            .find(|row| row["id"] == r["id"])
            .unwrap_or_else(|| panic!("tail showed a reading `readings list` lacks: {e}"));
        for key in ["device", "seq", "kind", "value", "unit", "priority"] {
            assert_eq!(row[key], r[key], "{key} of {e}");
        }
        assert!(e["at"].as_str().unwrap().ends_with('Z'), "--utc: {e}");
    }
}

/// Needs the journeys the gateway records (schema 5) as it publishes.
#[test]
fn tail_follow_shows_a_reading_delivered_by_a_running_gateway() {
    let rig = Rig::new("gw-tail-delivered");
    let gw = GatewayOpts::new("gw-tail-delivered");
    let (_gateway, tail, sim, config) = gateway_and_tail(&rig, &gw, 10);
    // A second tail, as a person reads it: a line per event.
    let table = Tail::start(
        &config,
        &["--follow", "--utc", "-n", "0", "--interval-ms", "50"],
    );
    let summary = sim.finish(Duration::from_secs(60));
    assert_eq!(summary["acked"], 10, "{summary}");
    let seen = tail.until(Duration::from_secs(30), "delivered event of seq 10", |e| {
        e["event"] == "delivered" && e["reading"]["seq"] == 10
    });
    let events_of = |seq: u64| -> Vec<&str> {
        seen.iter()
            .filter(|e| e["reading"]["seq"] == seq)
            .map(|e| e["event"].as_str().unwrap())
            .collect()
    };
    // Stored, then published, then delivered, each once.
    assert_eq!(
        events_of(10),
        ["stored", "published", "delivered"],
        "{seen:#?}"
    );
    let delivered = seen.iter().find(|e| e["event"] == "delivered").unwrap();
    assert!(
        delivered["journey"]["id"].as_i64().unwrap() > 0,
        "{delivered}"
    );
    assert!(
        delivered["journey"]["pkid"].as_u64().unwrap() > 0,
        "{delivered}"
    );
    let mut lines = vec![table.lines.recv_timeout(Duration::from_secs(10)).unwrap()];
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("EVENT"),
        "{lines:?}"
    );
    // Each of seq 10's events: its line names the event, the value with
    // its unit and, for a state change, the journey and packet id.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines
        .iter()
        .any(|l| l.contains(" delivered ") && l.contains(" 10  "))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match table.lines.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("no delivered line for seq 10: {lines:#?}"),
        }
    }
    let of_10: Vec<&String> = lines.iter().filter(|l| l.contains(" 10  ")).collect();
    eprintln!(
        "{}\n{}",
        lines[0],
        of_10
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(of_10.len(), 3, "{of_10:#?}");
    assert!(of_10.iter().all(|l| l.contains("PM-000001")), "{of_10:#?}");
    assert!(
        of_10[2].contains("journey") && of_10[2].contains("pkid"),
        "{of_10:#?}"
    );
}

#[test]
fn tail_ends_quietly_on_sigterm_and_when_stdout_closes() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(1, 30));
    // SIGTERM: exit 0.
    let tail = Tail::start(
        &filled.config,
        &["--follow", "--format", "ndjson", "-n", "1"],
    );
    tail.until(Duration::from_secs(20), "the newest reading", |_| true);
    let mut tail = tail;
    sigterm(tail.child.id());
    let status = wait_for(Duration::from_secs(10), "tail to end on SIGTERM", || {
        tail.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    // Its reader gone: exit 0 without a word, though nothing new comes.
    let mut child = Command::new(hearth_bin())
        .args(["readings", "tail", "--follow", "--config"])
        .arg(&filled.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut header = String::new();
    stdout.read_line(&mut header).unwrap();
    assert!(header.starts_with("TIME"), "{header}");
    drop(stdout);
    let status = wait_for(
        Duration::from_secs(10),
        "tail to end once stdout closed",
        || child.try_wait().unwrap(),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success() && err.is_empty(), "{status}: {err}");
}

#[test]
fn tail_without_follow_shows_the_newest_readings_and_ends() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(2, 40));
    let c = filled.config.to_str().unwrap();
    let all = readings(&filled.config, &[]);
    let (code, out, err) = hearth(&[
        "readings", "tail", "-n", "5", "--format", "ndjson", "--config", c,
    ]);
    assert_eq!(code, 0, "{err}");
    let ids: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reading"]["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let mut newest: Vec<i64> = all.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    newest.sort_unstable();
    assert_eq!(
        ids,
        newest[newest.len() - 5..],
        "the newest 5, oldest first"
    );

    // Filtered, as a table: values carry their unit.
    let (code, out, err) = hearth(&[
        "readings",
        "tail",
        "-n",
        "3",
        "--device",
        "PM-0002",
        "--kind",
        "heart_rate",
        "--utc",
        "--config",
        c,
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "a header and 3 readings:\n{out}");
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("VALUE"),
        "{out}"
    );
    for line in &lines[1..] {
        assert!(
            line.contains("stored") && line.contains("PM-0002") && line.contains(" bpm"),
            "{line}"
        );
    }

    let (code, _, err) = hearth(&[
        "readings",
        "tail",
        "--config",
        dir.join("nowhere.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    std::fs::write(
        dir.join("gone.toml"),
        std::fs::read_to_string(&filled.config)
            .unwrap()
            .replace("views.db", "gone.db"),
    )
    .unwrap();
    let (code, _, err) = hearth(&[
        "readings",
        "tail",
        "--config",
        dir.join("gone.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no database at") && err.contains("gone.db"),
        "{err}"
    );
}

/// The fields of a `readings list --format json` row, times as instants.
fn normal(row: &Value) -> Value {
    let mut row = row.clone();
    row["value"] = row["value"].as_f64().unwrap().into();
    for key in ["device_time", "received_at", "delivered_at", "stored_at"] {
        if let Some(t) = row[key].as_str() {
            let t = chrono::DateTime::parse_from_rfc3339(t)
                .unwrap_or_else(|e| panic!("`{key}` {t}: {e}"))
                .timestamp_millis();
            row[key] = t.into();
        }
    }
    row
}

/// CSV (no field here holds a comma or quote) as JSON rows, typed by
/// what the list's JSON has for the same key.
fn csv_rows(text: &str, like: &[Value]) -> Vec<Value> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .zip(like)
        .map(|(line, like)| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{line}");
            let mut row = serde_json::Map::new();
            for (key, cell) in header.iter().zip(cells) {
                let v = match &like[*key] {
                    Value::Null if cell.is_empty() => Value::Null,
                    Value::Number(_) => serde_json::from_str(cell).unwrap(),
                    Value::Bool(_) => Value::Bool(cell == "true"),
                    _ => Value::String(cell.to_owned()),
                };
                // `detail` is left out of the JSON when it has none.
                if !(like.get(*key).is_none() && cell.is_empty()) {
                    row.insert((*key).to_owned(), v);
                }
            }
            Value::Object(row)
        })
        .collect()
}

#[test]
fn export_writes_what_readings_list_shows_in_each_format() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(3, 120));
    let c = filled.config.to_str().unwrap();
    let list: Vec<Value> = readings(&filled.config, &[]);
    assert_eq!(list.len() as u64, filled.stored);
    let want: Vec<Value> = list.iter().map(normal).collect();
    assert!(
        want.iter().any(|r| r["state"] == "queued") && want.iter().any(|r| r["detail"] == "VT")
    );

    for format in ["csv", "json", "ndjson"] {
        let file = dir.join(format!("out.{format}"));
        let f = file.to_str().unwrap();
        let (code, out, err) = hearth(&[
            "readings", "export", "--format", format, "--output", f, "--config", c,
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.is_empty(), "{out}");
        // Piped stderr: the closing line only, no progress bar bytes.
        let prefix = format!("exported {} readings to `{f}` (", filled.stored);
        assert!(
            err.starts_with(&prefix) && err.ends_with(" s\n") && err.lines().count() == 1,
            "{err:?}"
        );
        assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
        assert!(!dir.join(format!("out.{format}.partial")).exists());
        let text = std::fs::read_to_string(&file).unwrap();
        let got: Vec<Value> = match format {
            "csv" => {
                let header = text.lines().next().unwrap();
                let (_, list_csv, _) =
                    hearth(&["readings", "list", "--format", "csv", "--config", c]);
                assert_eq!(
                    header,
                    list_csv.lines().next().unwrap(),
                    "same columns as list"
                );
                csv_rows(&text, &list)
            }
            "json" => serde_json::from_str(&text).unwrap(),
            _ => text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        };
        let got: Vec<Value> = got.iter().map(normal).collect();
        assert_eq!(got.len(), want.len(), "{format}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{format}");
        }
    }

    // Filters: one device's delivered readings.
    let (code, out, err) = hearth(&[
        "readings",
        "export",
        "--format",
        "ndjson",
        "--output",
        "-",
        "--device",
        "PM-0002",
        "--state",
        "delivered",
        "--config",
        c,
    ]);
    assert_eq!(code, 0, "{err}");
    let got: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<&Value> = list
        .iter()
        .filter(|r| r["device"] == "PM-0002" && r["state"] == "delivered")
        .collect();
    assert!(!want.is_empty());
    assert_eq!(
        got.iter().map(|r| &r["id"]).collect::<Vec<_>>(),
        want.iter().map(|r| &r["id"]).collect::<Vec<_>>()
    );
    assert!(
        err.starts_with(&format!("exported {} readings to stdout", want.len())),
        "{err}"
    );
}

#[test]
fn export_refuses_to_overwrite_a_file_without_force() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(1, 20));
    let c = filled.config.to_str().unwrap();
    let file = dir.join("keep.csv");
    std::fs::write(&file, "precious\n").unwrap();
    let f = file.to_str().unwrap();
    let (code, out, err) = hearth(&[
        "readings", "export", "--format", "csv", "--output", f, "--config", c,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("`{f}` exists")) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious\n");

    let (code, _, err) = hearth(&[
        "readings", "export", "--format", "csv", "--output", f, "--force", "--config", c,
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count() as u64, filled.stored + 1, "{text}");

    // A file that cannot be made: an error, and nothing left behind.
    let bad = dir.join("no-such-dir/out.csv");
    let (code, _, err) = hearth(&[
        "readings",
        "export",
        "--format",
        "csv",
        "--output",
        bad.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot create") && err.contains("out.csv.partial"),
        "{err}"
    );
}

#[test]
fn export_of_an_empty_selection_is_valid_json() {
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(1, 10));
    let (code, out, err) = hearth(&[
        "readings",
        "export",
        "--format",
        "json",
        "--output",
        "-",
        "--device",
        "PM-9999",
        "--config",
        filled.config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        serde_json::json!([])
    );
    assert!(err.starts_with("exported 0 readings to stdout"), "{err}");
}

/// Fills a store of about a million readings in `$HEARTH_STREAM_STORE`
/// (a folder) for timing `tail` and `export` by hand on a release build;
/// prints how long the fill took. Run with `--ignored`.
#[test]
#[ignore]
fn fill_a_million_readings_for_timing() {
    let Ok(dir) = std::env::var("HEARTH_STREAM_STORE") else {
        eprintln!("set HEARTH_STREAM_STORE to a folder");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = FillSpec {
        batch: 5000,
        ..FillSpec::small(10, 100_000)
    };
    let filled = fill(&dir, &spec);
    eprintln!(
        "filled {} readings ({} delivered) into `{}` in {:.1} s",
        filled.stored,
        filled.delivered,
        filled.db.display(),
        filled.secs
    );
}

/// Each poll of `tail` reads through a primary key, and `export` walks
/// the index of its order (no sort of the whole table).
#[test]
fn the_stream_queries_use_the_primary_keys_and_indexes() {
    use hearth::outbox::views::stream::ExportFilter;
    use hearth::outbox::{Encryption, Store};
    let dir = TestDir::new();
    let filled = fill(dir.path(), &FillSpec::small(1, 10));
    let text = std::fs::read_to_string(&filled.config).unwrap();
    let c = hearth::config::Config::parse(&text, &filled.config).unwrap();
    let store = Store::open_read_only(
        &filled.db,
        &Encryption::from_config(&c.store, &filled.config),
    )
    .unwrap();
    let plans = store.stream_plans(&ExportFilter::default()).unwrap();
    eprintln!("{plans}");
    let plan = |name: &str| -> &str {
        plans
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no plan of {name}: {plans}"))
    };
    for name in ["new readings", "new journeys"] {
        assert!(
            plan(name).contains("INTEGER PRIMARY KEY (rowid>?)"),
            "{plans}"
        );
    }
    for name in ["readings by id", "journeys by id"] {
        assert!(
            plan(name).contains("INTEGER PRIMARY KEY (rowid=?)"),
            "{plans}"
        );
    }
    assert!(plan("export").contains("readings_received"), "{plans}");
    assert!(!plan("export").contains("TEMP B-TREE"), "{plans}");
}
