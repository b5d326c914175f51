//! Encryption at rest, through the real binary: `hearth run` on a pty with
//! the simulator, mosquitto, the CLI, and the store's files read byte by
//! byte. The crash points are `src/failpoint.rs`'s `STORE_POINTS`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hearth::outbox::key::{Key, write_key_file};
use serde_json::Value;

use crate::e2e::reading_deliveries;
use crate::harness::{GatewayOpts, Hearth, Rig, Sim, key_of, open_db, readings};
use crate::support::{Subscriber, free_port, hearth_bin, wait_for};

const SERIAL: &str = "SN-SECRET-123";

/// Adds `lines` to the `[store]` table of `config`.
fn set_store(config: &Path, lines: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("[store]\n"), "{text}");
    let text = text.replacen("[store]\n", &format!("[store]\n{lines}\n"), 1);
    std::fs::write(config, text).unwrap();
}

/// Points `config` at a serial port that does not exist, for a gateway
/// that outlives its simulator: `hearth run` keeps reopening its port, and
/// a finished simulator's pty path may be handed to another test's one.
fn unplug(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let nowhere = config.with_extension("unplugged");
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("port = \"/") {
                format!("port = \"{}\"", nowhere.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(config, text + "\n").unwrap();
}

/// `path` with `suffix` appended.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// The database file and its WAL and SHM, as they are on disk now.
fn store_files(db: &Path) -> Vec<(String, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| {
            (
                s.to_string(),
                std::fs::read(suffixed(db, s)).unwrap_or_default(),
            )
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What of the patient's data can be read in `files`: the implant serial,
/// readings' values as SQLite keeps a REAL on disk (8 bytes, big-endian;
/// values with a fraction, as whole ones are stored as small integers) and
/// as text (a rejected frame keeps its bytes), and the plain SQLite header.
fn readable(files: &[(String, Vec<u8>)], values: &[f64]) -> Vec<String> {
    let mut found = Vec::new();
    for (suffix, bytes) in files {
        let file = format!("hearth.db{suffix}");
        if contains(bytes, SERIAL.as_bytes()) {
            found.push(format!("{file}: the serial"));
        }
        if contains(bytes, b"SQLite format 3") {
            found.push(format!("{file}: the plain SQLite header"));
        }
        for v in values.iter().filter(|v| v.fract() != 0.0) {
            if contains(bytes, &v.to_be_bytes()) {
                found.push(format!("{file}: value {v} as a REAL"));
            }
            // As text a value stands between delimiters (a frame's `,`, a
            // JSON `:`): four digits alone would also turn up by chance in a
            // few megabytes of ciphertext (about once in 2^32 positions).
            let text = v.to_string();
            let framed = [b',', b':', b'|', b'"', b' ', b'='].iter().any(|open| {
                [b',', b'}', b'|', b'"', b' ', b'\r'].iter().any(|close| {
                    let mut needle = vec![*open];
                    needle.extend_from_slice(text.as_bytes());
                    needle.push(*close);
                    contains(bytes, &needle)
                })
            });
            if text.len() >= 4 && framed {
                found.push(format!("{file}: value {v} as text"));
            }
        }
    }
    found
}

/// Runs `hearth ARGS` with extra environment; (exit code, stdout, stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(hearth_bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("HEARTH_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("run hearth");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The single line a failed command printed.
fn one_error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line:\n{stderr}");
    lines[0].to_owned()
}

/// The last line of hearth's log (its error, after a failed start).
fn last_line(h: &Hearth) -> String {
    h.log_text().lines().last().unwrap_or_default().to_owned()
}

/// Every file in `dir` with the SHA-256 of its bytes, but logs and the
/// store's `-shm`: that is SQLite's WAL index in shared memory, which any
/// reader (one with a wrong key too) creates if it is missing and writes
/// its read mark into; it holds no data and is rebuilt from the WAL.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "log"))
        .filter(|p| !p.to_string_lossy().ends_with("-shm"))
        .map(|p| {
            let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&p).unwrap());
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            (p, hex)
        })
        .collect()
}

/// What [`run_and_read_files`] saw.
struct Observed {
    /// The store's files while hearth ran, WAL included.
    running: Vec<(String, Vec<u8>)>,
    /// The same after a kill -9.
    killed: Vec<(String, Vec<u8>)>,
    /// The readings' values.
    values: Vec<f64>,
    log: String,
}

/// 60 readings of `SERIAL` (some frames corrupted on the line, so kept
/// raw) through a gateway with `store_lines` in its `[store]`.
fn run_and_read_files(id: &str, store_lines: &str) -> Observed {
    let rig = Rig::new(id);
    let gw = GatewayOpts::new(id);
    let sim = Sim::start(&[
        "--device-id",
        SERIAL,
        "--count",
        "60",
        "--interval-ms",
        "0",
        "--seed",
        "5",
        "--alert-rate",
        "0.2",
        "--corrupt-rate",
        "0.2",
    ]);
    let config = rig.config(&gw, &sim.pty);
    set_store(&config, store_lines);
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(60));
    let rows = wait_for(Duration::from_secs(30), "60 readings delivered", || {
        let rows = readings(&config, &[]);
        (rows.len() == 60 && rows.iter().all(|r| r["state"] == "delivered")).then_some(rows)
    });
    let values = rows.iter().map(|r| r["value"].as_f64().unwrap()).collect();
    let db = rig.db(&gw);
    let running = store_files(&db);
    assert!(
        !running[1].1.is_empty(),
        "{id}: the WAL is empty while hearth runs"
    );
    hearth.kill9();
    Observed {
        running,
        killed: store_files(&db),
        values,
        log: hearth.log_text(),
    }
}

#[test]
fn the_store_files_hold_no_serial_and_no_value_in_readable_form() {
    let seen = run_and_read_files("gw-enc-bytes", "");
    assert!(
        seen.values.iter().any(|v| v.fract() != 0.0),
        "no value with a fraction to look for: {:?}",
        seen.values
    );
    let found = readable(&seen.running, &seen.values);
    assert!(found.is_empty(), "readable while running: {found:?}");
    let found = readable(&seen.killed, &seen.values);
    assert!(found.is_empty(), "readable after kill -9: {found:?}");
    assert!(seen.log.contains("Store encrypted at rest"), "{}", seen.log);

    // The same run with a plaintext store: the search finds what it looks
    // for, so its silence above means something.
    let control = run_and_read_files("gw-enc-ctrl", "encrypt = false");
    let found = readable(&control.running, &control.values).join("; ");
    assert!(found.contains("the serial"), "{found}");
    assert!(found.contains("the plain SQLite header"), "{found}");
    assert!(found.contains("as a REAL"), "{found}");
    assert!(found.contains("as text"), "{found}");
}

#[test]
fn encrypt_false_keeps_a_plain_store_with_a_warn_at_every_start() {
    let rig = Rig::new("gw-enc-off");
    let gw = GatewayOpts::new("gw-enc-off");
    let sim = Sim::start(&["--count", "10", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    set_store(&config, "encrypt = false");
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    assert!(hearth.stop().success());
    unplug(&config);
    hearth.restart();
    hearth.wait_log_count("Gateway running.", 2, Duration::from_secs(20));
    assert!(hearth.stop().success());
    let warns: Vec<String> = hearth
        .log_text()
        .lines()
        .filter(|l| l.contains("Store encryption is off"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warns.len(), 2, "{}", hearth.log_text());
    assert!(warns.iter().all(|l| l.contains(" WARN ")), "{warns:?}");
    let db = rig.db(&gw);
    assert_eq!(&std::fs::read(&db).unwrap()[..16], b"SQLite format 3\0");
    assert!(
        !key_of(&db).exists(),
        "a key was made for a plaintext store"
    );
    assert_eq!(readings(&config, &[]).len(), 10, "{}", hearth.log_text());
}

#[test]
fn a_wrong_or_missing_key_is_one_clear_error_and_the_store_stays_as_it_was() {
    let rig = Rig::new("gw-enc-key");
    let gw = GatewayOpts::new("gw-enc-key");
    let sim = Sim::start(&["--count", "20", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    wait_for(Duration::from_secs(20), "20 readings stored", || {
        (readings(&config, &[]).len() == 20).then_some(())
    });
    assert!(hearth.stop().success());
    unplug(&config);
    let db = rig.db(&gw);
    let key = key_of(&db);
    let right = std::fs::read(&key).unwrap();
    let c = config.to_str().unwrap();

    // A wrong key.
    write_key_file(&key, &Key::generate().unwrap(), None).unwrap();
    let before = snapshot(rig.dir.path());
    hearth.restart();
    let status = hearth.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", hearth.log_text());
    let line = last_line(&hearth);
    let expected = format!(
        "store `{}` cannot be opened with the key from key file `{}`: wrong key, or not a hearth store: file is not a database",
        db.display(),
        key.display()
    );
    assert!(
        line.starts_with("hearth: ") && line.contains(&expected),
        "{line}"
    );
    assert_eq!(snapshot(rig.dir.path()), before, "the files changed");
    let (code, out, err) = cli(&["readings", "list", "--config", c], &[]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(one_error_line(&err).contains(&expected), "{err}");
    assert_eq!(
        snapshot(rig.dir.path()),
        before,
        "the CLI changed the files"
    );

    // No key at all: no new key, no new store.
    std::fs::remove_file(&key).unwrap();
    let before = snapshot(rig.dir.path());
    hearth.restart();
    let status = hearth.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", hearth.log_text());
    let line = last_line(&hearth);
    let expected = format!(
        "store `{}` cannot be opened: its key `{}` does not exist",
        db.display(),
        key.display()
    );
    assert!(line.contains(&expected), "{line}");
    assert_eq!(snapshot(rig.dir.path()), before, "the files changed");
    assert!(!key.exists(), "a new key was made for an existing store");
    let (code, _, err) = cli(&["status", "--config", c], &[]);
    assert_eq!(code, 1);
    assert!(one_error_line(&err).contains(&expected), "{err}");

    // An encrypted store under `encrypt = false` is not opened either.
    std::fs::write(&key, &right).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    set_store(&config, "encrypt = false");
    let before = snapshot(rig.dir.path());
    hearth.restart();
    assert_eq!(hearth.wait_exit(Duration::from_secs(20)).code(), Some(1));
    let line = last_line(&hearth);
    assert!(
        line.contains("is not a plain SQLite database (it is encrypted, or damaged) and `store.encrypt = false`"),
        "{line}"
    );
    assert_eq!(snapshot(rig.dir.path()), before, "the files changed");

    // With the right key back, everything is there.
    std::fs::write(&config, text).unwrap();
    hearth.restart();
    hearth.wait_log_count("Gateway running.", 2, Duration::from_secs(20));
    assert_eq!(readings(&config, &[]).len(), 20);
}

#[test]
fn a_plain_store_is_encrypted_in_place_through_crashes_and_nothing_is_lost_or_sent_twice() {
    let id = "gw-enc-mig";
    let rig = Rig::new(id);
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-enc-mig",
        &[
            "hearth/v1/gw-enc-mig/readings",
            "hearth/v1/gw-enc-mig/alerts",
        ],
    );
    // An earlier hearth's store: plaintext, readings queued (no broker
    // reachable), and its WAL left behind by a kill -9.
    let mut gw = GatewayOpts::new(id);
    gw.mqtt_port = Some(free_port());
    let sim = Sim::start(&["--device-id", SERIAL, "--count", "40", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    set_store(&config, "encrypt = false");
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    let rows = readings(&config, &[]);
    assert_eq!(rows.len(), 40);
    assert!(rows.iter().all(|r| r["state"] != "delivered"));
    hearth.kill9();
    let db = rig.db(&gw);
    let key = key_of(&db);
    assert_eq!(&std::fs::read(&db).unwrap()[..16], b"SQLite format 3\0");
    assert!(std::fs::metadata(suffixed(&db, "-wal")).unwrap().len() > 0);

    // This hearth, encryption on by default, with the broker: a crash
    // between the encrypted copy and its rename leaves the plain store,
    // with the key already on disk.
    gw.mqtt_port = None;
    let config = rig.config(&gw, Path::new("/dev/null"));
    unplug(&config);
    let crash = |hearth: &mut Hearth, point: &str| {
        hearth.restart_with_env(&[("HEARTH_TEST_FAILPOINT", point)]);
        assert!(!hearth.wait_exit(Duration::from_secs(20)).success());
        assert!(
            hearth
                .log_text()
                .contains(&format!("failpoint `{point}` reached")),
            "{}",
            hearth.log_text()
        );
    };
    crash(&mut hearth, "encrypt-copied");
    assert_eq!(&std::fs::read(&db).unwrap()[..16], b"SQLite format 3\0");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let first_key = std::fs::read(&key).unwrap();
    assert_eq!(
        readings(&config, &[]).len(),
        40,
        "the CLI reads the plain store"
    );

    // Right after the rename: encrypted, with the same key.
    crash(&mut hearth, "encrypt-renamed");
    assert_ne!(&std::fs::read(&db).unwrap()[..16], b"SQLite format 3\0");
    assert_eq!(std::fs::read(&key).unwrap(), first_key);
    assert!(!suffixed(&db, ".encrypting").exists());
    assert_eq!(
        readings(&config, &[]).len(),
        40,
        "the CLI reads it with the key"
    );

    // Then a plain start delivers every reading, once.
    hearth.restart();
    let got = sub.wait_all(Duration::from_secs(60), |all| {
        reading_deliveries(all).len() >= 40
    });
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (_, r) in reading_deliveries(&got) {
        *seen
            .entry(r["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for seq in 1..=40 {
        let id = format!("{id}/{SERIAL}/{seq}");
        assert_eq!(seen.get(&id), Some(&1), "{id}: {seen:?}");
    }
    assert_eq!(seen.len(), 40);
    wait_for(Duration::from_secs(20), "40 readings delivered", || {
        let rows = readings(&config, &[]);
        (rows.len() == 40 && rows.iter().all(|r| r["state"] == "delivered")).then_some(())
    });
    assert!(hearth.stop().success());
    let values: Vec<f64> = readings(&config, &[])
        .iter()
        .map(|r| r["value"].as_f64().unwrap())
        .collect();
    let found = readable(&store_files(&db), &values);
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn a_plain_store_is_encrypted_at_the_next_start_and_the_log_says_so() {
    let rig = Rig::new("gw-enc-mig2");
    let gw = GatewayOpts::new("gw-enc-mig2");
    let sim = Sim::start(&["--count", "5", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    set_store(&config, "encrypt = false");
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    assert!(hearth.stop().success());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("encrypt = false\n", "")).unwrap();
    unplug(&config);
    hearth.restart();
    hearth.wait_log_count("Gateway running.", 2, Duration::from_secs(20));
    assert!(hearth.stop().success());
    assert_eq!(readings(&config, &[]).len(), 5, "{}", hearth.log_text());
    let log = hearth.log_text();
    assert_eq!(log.matches("Store key generated").count(), 1, "{log}");
    assert_eq!(
        log.matches("Plain store encrypted in place").count(),
        1,
        "{log}"
    );
    let db = rig.db(&gw);
    assert_ne!(&std::fs::read(&db).unwrap()[..16], b"SQLite format 3\0");
}

/// Whether the key in `key` (a key file's bytes) opens the store at `db`.
fn opens(db: &Path, key: &[u8]) -> bool {
    let key = Key::parse(key).expect("a key file");
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    hearth::outbox::cipher::unlock(&conn, &key).is_ok()
}

#[test]
fn rekey_changes_the_key_for_cli_and_gateway_and_the_old_key_stops_working() {
    let rig = Rig::new("gw-enc-rekey");
    let gw = GatewayOpts::new("gw-enc-rekey");
    let sim = Sim::start(&["--count", "20", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let c = config.to_str().unwrap();
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    wait_for(Duration::from_secs(20), "20 readings stored", || {
        (readings(&config, &[]).len() == 20).then_some(())
    });
    assert!(hearth.stop().success());
    let db = rig.db(&gw);
    let key = key_of(&db);
    let old = std::fs::read(&key).unwrap();

    // Not under a running gateway, which the change would lock out.
    unplug(&config);
    hearth.restart();
    hearth.wait_log_count("Gateway running.", 2, Duration::from_secs(20));
    let (code, out, err) = cli(&["store", "rekey", "--config", c], &[]);
    assert_eq!(code, 1, "{out}{err}\n{}", hearth.log_text());
    assert!(
        one_error_line(&err).contains("is open in another process: stop the gateway first"),
        "{err}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), old);
    assert!(!suffixed(&key, ".new").exists());
    assert!(hearth.stop().success());

    let (code, out, err) = cli(&["store", "rekey", "--config", c], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rekeyed"), "{out}");
    let new = std::fs::read(&key).unwrap();
    assert_ne!(new, old);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!suffixed(&key, ".new").exists());
    assert!(!opens(&db, &old), "the old key still opens the store");
    assert!(opens(&db, &new));
    let rows = readings(&config, &[]);
    assert_eq!(
        rows.len(),
        20,
        "the CLI reads with the new key: {:?}",
        rows.iter()
            .map(|r| format!("{} {} {}", r["device"], r["seq"], r["state"]))
            .collect::<Vec<_>>()
    );
    let audited: Vec<(String, String)> = open_db(&db)
        .prepare("SELECT actor, detail FROM audit WHERE kind = 'store-rekeyed'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert!(
        audited[0].0.starts_with("hearth store rekey"),
        "{audited:?}"
    );
    assert!(
        !audited[0]
            .1
            .contains(&String::from_utf8_lossy(&new).trim().to_string())
    );

    // A crash after the new key was written, before the store changed:
    // the old key is still the key.
    let (code, _, _) = cli(
        &["store", "rekey", "--config", c],
        &[("HEARTH_TEST_FAILPOINT", "rekey-pending-written")],
    );
    assert_ne!(code, 0);
    assert_eq!(std::fs::read(&key).unwrap(), new);
    assert!(suffixed(&key, ".new").exists());
    assert!(opens(&db, &new));
    assert_eq!(readings(&config, &[]).len(), 20);

    // A crash after the store changed, before its key file did: the key
    // waiting in `.new` opens it, and the next writer puts it in place.
    let (code, _, _) = cli(
        &["store", "rekey", "--config", c],
        &[("HEARTH_TEST_FAILPOINT", "rekey-committed")],
    );
    assert_ne!(code, 0);
    let pending = std::fs::read(suffixed(&key, ".new")).unwrap();
    assert_eq!(std::fs::read(&key).unwrap(), new);
    assert!(!opens(&db, &new));
    assert!(opens(&db, &pending));
    assert_eq!(
        readings(&config, &[]).len(),
        20,
        "the CLI finds the pending key"
    );

    // The gateway starts with it, settles it and takes new readings.
    let sim = Sim::start(&["--count", "10", "--interval-ms", "0", "--start-seq", "21"]);
    let config = rig.config(&gw, &sim.pty);
    hearth.restart();
    sim.finish(Duration::from_secs(30));
    wait_for(Duration::from_secs(30), "30 readings delivered", || {
        let rows = readings(&config, &[]);
        (rows.len() == 30 && rows.iter().all(|r| r["state"] == "delivered")).then_some(())
    });
    assert_eq!(std::fs::read(&key).unwrap(), pending);
    assert!(!suffixed(&key, ".new").exists());
    assert!(hearth.stop().success());

    // A key of the operator's choosing.
    let chosen = rig.dir.join("chosen.key");
    let chosen_key = Key::generate().unwrap();
    write_key_file(&chosen, &chosen_key, None).unwrap();
    let (code, _, err) = cli(
        &[
            "store",
            "rekey",
            "--config",
            c,
            "--new-key-file",
            chosen.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(Key::parse(&std::fs::read(&key).unwrap()), Some(chosen_key));
    assert_eq!(readings(&config, &[]).len(), 30);
    let entries: Vec<Value> = open_db(&db)
        .prepare("SELECT detail FROM audit WHERE kind = 'store-rekeyed' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|d| serde_json::from_str(&d.unwrap()).unwrap())
        .collect();
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert_eq!(entries[0]["new_key"], "generated");
    assert!(
        entries[2]["new_key"]
            .as_str()
            .unwrap()
            .contains("chosen.key")
    );
}

#[test]
fn a_configured_key_file_is_checked_and_used_and_none_is_made_beside_the_store() {
    let rig = Rig::new("gw-enc-kf");
    let gw = GatewayOpts::new("gw-enc-kf");
    let sim = Sim::start(&["--count", "10", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let c = config.to_str().unwrap();
    let key_file = rig.dir.join("store.key");
    write_key_file(&key_file, &Key::generate().unwrap(), None).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    set_store(&config, &format!("key_file = \"{}\"", key_file.display()));

    // Readable by others: refused by name, exit 2.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = cli(&["config", "check", "--config", c], &[]);
    assert_eq!(code, 2, "{err}");
    let line = one_error_line(&err);
    assert!(
        line.contains("key `store.key_file` is unusable") && line.contains("chmod 600"),
        "{line}"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Beside `encrypt = false`: a contradiction, named.
    let both = format!("encrypt = false\nkey_file = \"{}\"", key_file.display());
    std::fs::write(&config, &text).unwrap();
    set_store(&config, &both);
    let (code, _, err) = cli(&["config", "check", "--config", c], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        one_error_line(&err).contains("key `store.key_file` is set, but `store.encrypt = false`"),
        "{err}"
    );

    std::fs::write(&config, &text).unwrap();
    set_store(&config, &format!("key_file = \"{}\"", key_file.display()));
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(30));
    wait_for(Duration::from_secs(20), "10 readings stored", || {
        (readings(&config, &[]).len() == 10).then_some(())
    });
    assert!(hearth.stop().success());
    let log = hearth.log_text();
    assert!(
        log.contains(&format!(
            "key file `{}` (store.key_file)",
            key_file.display()
        )),
        "{log}"
    );
    let db = rig.db(&gw);
    assert!(!key_of(&db).exists(), "a key was made beside the store");
    assert!(opens(&db, &std::fs::read(&key_file).unwrap()));
}

/// A plain store on a disk without room for its encrypted copy: hearth
/// says so at ERROR, runs on it as it is and takes readings (a gateway that
/// stays down forwards no alert). The small disk is a tmpfs in a mount
/// namespace of the test's own (`unshare`), holding a copy of the store.
#[test]
fn a_plain_store_without_room_for_its_encrypted_copy_keeps_working_unencrypted() {
    let rig = Rig::new("gw-enc-full");
    let gw = GatewayOpts::new("gw-enc-full");
    let sim = Sim::start(&["--count", "50", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    set_store(&config, "encrypt = false");
    let mut hearth = Hearth::start(&config);
    sim.finish(Duration::from_secs(60));
    assert!(hearth.stop().success());
    let plain = rig.db(&gw);
    // 3 MiB more of an earlier hearth's rejected frames, then its WAL into
    // it (the last reader to close leaves one), so that one file is the
    // whole store.
    let conn = rusqlite::Connection::open(&plain).unwrap();
    for i in 0..12u8 {
        let raw: Vec<u8> = (0..256 * 1024)
            .map(|j: u32| (j.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i)
            .collect();
        conn.execute(
            "INSERT INTO rejected_frames (received_at, port, reason, detail, raw)
             VALUES (0, 'old', 'garbage', 'filler', ?1)",
            [raw],
        )
        .unwrap();
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(conn);
    assert!(!suffixed(&plain, "-wal").exists());
    let size = std::fs::metadata(&plain).unwrap().len();

    // The same gateway, its store on a disk with 1.5 MiB to spare: room
    // to run, none for an encrypted copy.
    let disk = rig.dir.subdir("small-disk");
    let sim = Sim::start(&[
        "--count",
        "20",
        "--interval-ms",
        "0",
        "--device-id",
        "PM-FULL",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &plain.display().to_string(),
        &disk.join("hearth.db").display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={} tmpfs '{d}' && cp '{}' '{d}/hearth.db' && exec '{}' run --config '{}'",
        (size + 1536 * 1024).div_ceil(4096) * 4096,
        plain.display(),
        hearth_bin().display(),
        config.display(),
        d = disk.display(),
    );
    let log = rig.dir.join("full.log");
    let mut child = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run unshare (util-linux)");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(Duration::from_secs(30), "the gateway running", || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("it exited ({status}):\n{}", read_log());
        }
        read_log().contains("Gateway running.").then_some(())
    });
    let stored = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.split("Readings stored. stored=").nth(1))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum()
    };
    for _ in 0..300 {
        if stored(&read_log()) >= 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stored(&read_log()) >= 20, "not stored:\n{}", read_log());
    let summary = sim.finish(Duration::from_secs(60));
    assert_eq!(summary["acked"], 20, "{summary}");
    crate::support::sigterm(child.id());
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("Cannot encrypt the plain store in place"))
        .unwrap_or_else(|| panic!("no word of it:\n{text}"));
    assert!(
        line.contains(" ERROR ") && line.contains("database or disk is full"),
        "{line}"
    );
    assert!(text.contains("Gateway running."), "{text}");
    assert!(!text.contains("Store encrypted at rest"), "{text}");
}
