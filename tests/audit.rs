//! The audit trail (issue 8, item 3) through the real binary: a real
//! SQLite store, a real mosquitto, the simulator on a real pty. Reads of
//! patient data and a device reset are recorded with the user and the
//! command and without the device's serial; `hearth audit verify` finds an
//! edited entry, and with the head the hospital holds (the status payload's
//! `audit_head`) a deleted newest one; a config change between starts, a seq
//! conflict and a prune are shown as they land in the trail.
//!
//! The tampering is done with rusqlite by [`attacker`]: a fake, standing for
//! someone with access to the store's files (and so to its key, which is
//! kept beside it), since hearth itself never edits the trail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::bad_input::{SocatPair, open_device};
use crate::harness::{GatewayOpts, Hearth, Rig, Sim};
use crate::support::{Subscriber, hearth_bin, wait_for};

/// Runs `hearth ARGS` with extra environment; `SUDO_USER` and
/// `HEARTH_CONFIG` are cleared unless given. Returns (exit code, stdout,
/// stderr).
fn hearth_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(hearth_bin())
        .args(args)
        .env_remove("HEARTH_CONFIG")
        .env_remove("SUDO_USER")
        .envs(env.iter().copied())
        .output()
        .expect("run hearth");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hearth(args: &[&str]) -> (i32, String, String) {
    hearth_env(args, &[])
}

/// `hearth audit --format json` with `extra` arguments.
fn audit(config: &Path, extra: &[&str]) -> Vec<Value> {
    try_audit(config, extra).unwrap_or_else(|err| panic!("hearth audit failed: {err}"))
}

/// [`audit`], or its stderr if it failed (e.g. no store yet).
fn try_audit(config: &Path, extra: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["audit", "--format", "json", "--config"];
    args.push(config.to_str().unwrap());
    args.extend_from_slice(extra);
    let (code, out, err) = hearth(&args);
    if code != 0 {
        return Err(err);
    }
    Ok(serde_json::from_str::<Vec<Value>>(&out)
        .unwrap_or_else(|e| panic!("bad JSON from hearth audit: {e}\n{out}")))
}

fn of_kind<'a>(entries: &'a [Value], kind: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["kind"] == kind).collect()
}

/// `hearth audit verify` with `extra` arguments: (exit code, stdout, stderr).
fn verify(config: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["audit", "verify", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    hearth(&args)
}

/// The head `hearth audit verify` prints for an intact trail.
fn verified_head(config: &Path) -> (u64, String) {
    let (code, out, err) = verify(config, &[]);
    assert_eq!(code, 0, "verify failed: {err}{out}");
    let line = out.lines().next().unwrap_or_default();
    let rest = line
        .strip_prefix("audit trail intact: ")
        .unwrap_or_else(|| panic!("unexpected verify line `{line}`"));
    let (_, head) = rest.split_once(", head ").expect("a head");
    let (id, hash) = head.split_once(' ').expect("ID HASH");
    (id.parse().unwrap(), hash.to_owned())
}

/// The user the tests run as, as the password database names it.
fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// A connection to the store's file as an attacker with file access has
/// it: keyed with the key file beside the store, if there is one. Not
/// hearth: the fake that edits what hearth never would.
fn attacker(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open the store's file");
    let key = PathBuf::from(format!("{}.key", db.display()));
    if key.exists() {
        hearth::outbox::key::Key::read_file(&key)
            .expect("read the key beside the store")
            .apply(&conn)
            .expect("key the connection");
    }
    conn
}

/// Waits until `hearth status` counts `n` delivered readings. A status
/// that fails while the gateway is still creating its store is retried.
#[track_caller]
fn wait_delivered(config: &Path, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        let (_, out, err) = hearth(&[
            "status",
            "--format",
            "json",
            "--config",
            config.to_str().unwrap(),
        ]);
        match serde_json::from_str::<Value>(&out) {
            Ok(view) if view["readings"]["delivered"] == n => return,
            Ok(view) => last = view["readings"].to_string(),
            Err(_) => last = err,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{n} readings not delivered within 30 s; last status: {last}");
}

/// A gateway whose serial port does not exist (it waits for it): enough
/// for everything the trail records at start. Returns once its first
/// entries are in.
fn idle_gateway(rig: &Rig, gw: &GatewayOpts) -> (PathBuf, Hearth) {
    let config = rig.config(gw, &rig.dir.join("no-such-tty"));
    let gateway = Hearth::start(&config);
    wait_for(Duration::from_secs(20), "the start's audit entry", || {
        try_audit(&config, &[])
            .is_ok_and(|entries| !entries.is_empty())
            .then_some(())
    });
    (config, gateway)
}

#[test]
fn reads_of_patient_data_and_a_device_reset_are_recorded_with_user_and_command() {
    let id = "gw-audit-cli";
    let rig = Rig::new(id);
    let sim = Sim::start(&["--count", "5", "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    let _gateway = Hearth::start(&config);
    assert_eq!(sim.finish(Duration::from_secs(60))["acked"], 5);
    // `hearth status` shows no patient data: it is not recorded, so it can
    // poll.
    wait_delivered(&config, 5);
    assert!(
        of_kind(&audit(&config, &[]), "patient-data-read").is_empty(),
        "`hearth status` was recorded as a read of patient data"
    );

    let c = config.to_str().unwrap();
    let (code, out, err) = hearth(&["readings", "list", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 reading(s)"), "{out}");
    let (code, out, err) = hearth_env(
        &[
            "readings",
            "list",
            "--device",
            "PM-000001",
            "--format",
            "json",
            "--config",
            c,
        ],
        &[("SUDO_USER", "alice")],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 5);
    let (code, out, err) = hearth(&["devices", "list", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("PM-000001"), "{out}");
    let (code, _, err) = hearth(&[
        "devices",
        "reset",
        "PM-000001",
        "--reason",
        "battery changed",
        "--config",
        c,
    ]);
    assert_eq!(code, 0, "{err}");

    let entries = audit(&config, &[]);
    let me = format!("{} (uid {})", user_name(), uid());
    let reads = of_kind(&entries, "patient-data-read");
    assert_eq!(reads.len(), 3, "{entries:#?}");
    assert_eq!(reads[0]["actor"], me);
    assert_eq!(
        reads[0]["detail"]["command"],
        format!("hearth readings list --config {c}")
    );
    assert_eq!(reads[0]["detail"]["rows"], 5);
    assert_eq!(reads[0]["detail"]["uid"], uid());
    assert_eq!(reads[0]["detail"]["sudo_user"], Value::Null);

    // Named by its reference, on the command line too.
    let device = reads[1]["detail"]["device"].as_str().unwrap().to_owned();
    assert!(
        device.len() == 16 && device.chars().all(|c| c.is_ascii_hexdigit()),
        "{device}"
    );
    assert_eq!(
        reads[1]["actor"],
        format!("{} (uid {}, sudo from alice)", user_name(), uid())
    );
    assert_eq!(reads[1]["detail"]["sudo_user"], "alice");
    assert_eq!(
        reads[1]["detail"]["command"],
        format!("hearth readings list --device '<device {device}>' --format json --config {c}")
    );
    assert_eq!(
        reads[2]["detail"]["command"],
        format!("hearth devices list --config {c}")
    );
    assert_eq!(reads[2]["detail"]["rows"], 1);

    let resets = of_kind(&entries, "device-reset");
    assert_eq!(resets.len(), 1, "{entries:#?}");
    assert_eq!(resets[0]["actor"], me);
    assert_eq!(resets[0]["detail"]["device"], device);
    assert_eq!(resets[0]["detail"]["reason"], "battery changed");
    assert_eq!(resets[0]["detail"]["run"], 1);

    // The serial is nowhere in the trail, in either format.
    let (code, table, err) = hearth(&["audit", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("    ID  TIME"), "{table}");
    assert!(
        table.ends_with(&format!("{} entries\n", entries.len())),
        "{table}"
    );
    for text in [&table, &serde_json::to_string(&entries).unwrap()] {
        assert!(!text.contains("PM-000001"), "a serial in the trail: {text}");
    }

    // Whoever holds the serial finds what concerns it.
    let about = audit(&config, &["--device", "PM-000001"]);
    let kinds: Vec<&str> = about.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["patient-data-read", "device-reset"]);
    assert_eq!(audit(&config, &["--kind", "device-reset"]).len(), 1);
    assert!(audit(&config, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    assert_eq!(audit(&config, &["--since", "1h"]).len(), entries.len());

    let (code, _, err) = hearth(&["audit", "--kind", "resets", "--config", c]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`--kind resets` is no kind"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // Intact, and its head is the newest entry.
    let last = entries.last().unwrap();
    assert_eq!(
        verified_head(&config),
        (
            last["id"].as_u64().unwrap(),
            last["hash"].as_str().unwrap().to_owned()
        )
    );
    let (_, out, _) = verify(&config, &[]);
    assert!(
        out.starts_with(&format!("audit trail intact: {} entries,", entries.len())),
        "{out}"
    );
}

#[test]
fn an_entry_edited_in_the_file_breaks_verify_at_that_entry() {
    let id = "gw-audit-edit";
    let rig = Rig::new(id);
    let gw = GatewayOpts::new(id);
    let (config, mut gateway) = idle_gateway(&rig, &gw);
    let c = config.to_str().unwrap();
    for _ in 0..2 {
        assert_eq!(hearth(&["readings", "list", "--config", c]).0, 0);
    }
    gateway.stop();
    let entries = audit(&config, &[]);
    assert_eq!(entries.len(), 3, "{entries:#?}");
    assert_eq!(verify(&config, &[]).0, 0);

    // hearth's own SQL cannot change the trail...
    let db = attacker(&rig.db(&gw));
    let refused = db.execute("UPDATE audit SET actor = 'nobody' WHERE id = 2", []);
    assert!(
        refused.unwrap_err().to_string().contains("append-only"),
        "the trigger refuses an edit"
    );
    // ...someone with the file can, around the triggers.
    db.execute_batch(
        "DROP TRIGGER audit_no_update;
         UPDATE audit SET actor = 'nobody (uid 65534)' WHERE id = 2;",
    )
    .unwrap();
    drop(db);

    let (code, out, err) = verify(&config, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        err.trim(),
        "hearth: audit trail broken at entry 2: its content does not match its hash (edited)"
    );
    assert!(out.is_empty(), "{out}");
}

#[test]
fn the_head_the_hospital_holds_catches_a_deleted_newest_entry() {
    let id = "gw-audit-cut";
    let rig = Rig::new(id);
    let gw = GatewayOpts::new(id);
    let (config, mut gateway) = idle_gateway(&rig, &gw);
    let c = config.to_str().unwrap();
    for _ in 0..2 {
        assert_eq!(hearth(&["readings", "list", "--config", c]).0, 0);
    }
    gateway.stop();
    let (id3, hash3) = verified_head(&config);
    assert_eq!(id3, 3);
    let head = format!("{id3}:{hash3}");
    assert_eq!(verify(&config, &["--head", &head]).0, 0);

    // The newest entry deleted: what is left still chains...
    let db = attacker(&rig.db(&gw));
    db.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id = 3;")
        .unwrap();
    drop(db);
    assert_eq!(verified_head(&config).0, 2, "the chain alone cannot tell");
    // ...but the copy of the head names an entry that is gone.
    let (code, out, err) = verify(&config, &["--head", &head]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.starts_with("hearth: audit trail broken at entry 3: it is missing"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // A bad `--head` says what it wants.
    let (code, _, err) = verify(&config, &["--head", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`--head 3` is not ID:HASH"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn a_trail_rewritten_with_new_hashes_is_caught_by_the_head_only() {
    let id = "gw-audit-rewrite";
    let rig = Rig::new(id);
    let gw = GatewayOpts::new(id);
    let (config, mut gateway) = idle_gateway(&rig, &gw);
    assert_eq!(
        hearth(&["readings", "list", "--config", config.to_str().unwrap()]).0,
        0
    );
    gateway.stop();
    let (id2, hash2) = verified_head(&config);
    assert_eq!(id2, 2);

    // The attacker edits entry 2 and computes its hash again.
    let db = attacker(&rig.db(&gw));
    db.execute_batch("DROP TRIGGER audit_no_update;").unwrap();
    let (prev, at, kind, detail): (String, i64, String, String) = db
        .query_row(
            "SELECT prev, at, kind, detail FROM audit WHERE id = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    let actor = "nobody (uid 65534)";
    let hash = hearth::audit::entry_hash(&prev, 2, at, &kind, actor, &detail);
    db.execute(
        "UPDATE audit SET actor = ?1, hash = ?2 WHERE id = 2",
        rusqlite::params![actor, hash],
    )
    .unwrap();
    drop(db);

    assert_eq!(verified_head(&config), (2, hash.clone()));
    let (code, out, err) = verify(&config, &["--head", &format!("2:{hash2}")]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.starts_with("hearth: audit trail broken at entry 2: its hash"),
        "{err}"
    );
    assert!(err.contains("differs from the copy of the head"), "{err}");
}

#[test]
fn a_config_change_between_two_starts_is_recorded_naming_the_files() {
    let id = "gw-audit-config";
    let rig = Rig::new(id);
    let gw = GatewayOpts::new(id);
    let (config, mut gateway) = idle_gateway(&rig, &gw);
    let first = audit(&config, &[]);
    let seen = of_kind(&first, "config-first-seen");
    assert_eq!(seen.len(), 1, "{first:#?}");
    let files = &seen[0]["detail"]["files"];
    for key in ["config", "mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"] {
        let sha = files[key]["sha256"].as_str().unwrap_or_default();
        assert_eq!(sha.len(), 64, "{key}: {files:#}");
    }
    assert_eq!(files["config"]["file"], config.to_str().unwrap());

    // A start with nothing changed records nothing.
    gateway.stop();
    gateway.restart();
    gateway.wait_log_count("Gateway running.", 2, Duration::from_secs(20));
    gateway.stop();
    assert_eq!(audit(&config, &[]).len(), first.len());

    // The config edited and the CA bundle swapped between two starts.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("heartbeat_secs = 60", "heartbeat_secs = 30"),
    )
    .unwrap();
    let mut ca = std::fs::read_to_string(&rig.certs.ca_cert).unwrap();
    ca.push('\n');
    std::fs::write(&rig.certs.ca_cert, ca).unwrap();
    gateway.restart();
    let entry = wait_for(Duration::from_secs(20), "a config-changed entry", || {
        audit(&config, &["--kind", "config-changed"]).pop()
    });
    let changed = entry["detail"]["changed"].as_array().unwrap();
    let keys: Vec<&str> = changed.iter().map(|c| c["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["config", "mqtt.ca_file"], "{entry:#}");
    assert_eq!(changed[0]["previous"], files["config"]["sha256"]);
    assert_ne!(changed[0]["now"], changed[0]["previous"]);
    assert_eq!(entry["actor"], "hearth run");
    assert!(
        gateway
            .log_text()
            .contains("Configuration or its files changed since the last start"),
        "the log says so too"
    );
    assert_eq!(verify(&config, &[]).0, 0);
}

#[test]
fn a_seq_conflict_from_the_simulator_is_recorded_by_device_reference() {
    let id = "gw-audit-conflict";
    let rig = Rig::new(id);
    let pair = SocatPair::start(rig.dir.path());
    // Held open so that the pty pair outlives each simulator run.
    let _line = open_device(&pair.a);
    let config = rig.config(&GatewayOpts::new(id), &pair.b);
    let _gateway = Hearth::start(&config);

    // Two runs of a v1.1 device at the same epoch: the second sends seqs
    // 1 to 3 again with other content.
    for seed in ["1", "2"] {
        let run = Command::new(hearth_bin())
            .args(["simulate", "--port"])
            .arg(&pair.a)
            .args(["--epoch", "7", "--count", "3", "--interval-ms", "0"])
            .args(["--alert-rate", "0", "--seed", seed, "--json"])
            .stdin(Stdio::null())
            .output()
            .expect("run the simulator");
        assert!(
            run.status.success(),
            "simulator run {seed}: {}\n{}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let entry = wait_for(Duration::from_secs(20), "a seq-conflict entry", || {
        audit(&config, &["--kind", "seq-conflict"]).pop()
    });
    let detail = &entry["detail"];
    assert_eq!(entry["actor"], "hearth run");
    assert_eq!(
        (detail["epoch"].as_u64(), detail["seq"].as_u64()),
        (Some(7), Some(1))
    );
    assert!(detail["conflicts"].as_u64().unwrap() >= 1, "{detail}");
    // One entry per device and alarm period, however many conflicts.
    assert_eq!(audit(&config, &["--kind", "seq-conflict"]).len(), 1);
    let about = audit(
        &config,
        &["--device", "PM-000001", "--kind", "seq-conflict"],
    );
    assert_eq!(about.len(), 1, "the reference is the serial's");
    let all = serde_json::to_string(&audit(&config, &[])).unwrap();
    assert!(!all.contains("PM-000001"), "a serial in the trail: {all}");
}

#[test]
fn the_status_payload_carries_the_head_that_verify_prints() {
    let id = "gw-audit-head";
    let rig = Rig::new(id);
    let mut gw = GatewayOpts::new(id);
    gw.heartbeat = 1;
    let topic = format!("hearth/v1/{id}/status");
    let hospital = Subscriber::start(&rig.broker, &rig.certs, "hospital-audit", &[&topic]);
    let (config, mut gateway) = idle_gateway(&rig, &gw);

    // A new entry; the next heartbeat carries it.
    assert_eq!(
        hearth(&["readings", "list", "--config", config.to_str().unwrap()]).0,
        0
    );
    let (id, hash) = verified_head(&config);
    let carries = |d: &crate::support::Delivery| d.payload["audit_head"]["id"] == id;
    let got = hospital.wait_all(Duration::from_secs(20), |all| all.iter().any(carries));
    let status = got
        .iter()
        .find(|d| carries(d))
        .expect("a status with the head");
    assert_eq!(
        status.payload["audit_head"],
        serde_json::json!({"id": id, "hash": hash, "intact": true}),
        "{:#}",
        status.payload
    );

    // The copy the hospital holds checks the trail.
    let copy = format!(
        "{id}:{}",
        status.payload["audit_head"]["hash"].as_str().unwrap()
    );
    let (code, out, err) = verify(&config, &["--head", &copy]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("entry {id} matches")), "{out}");

    // The shutdown status carries it too; the will does not.
    gateway.stop();
    let all = hospital.wait_all(Duration::from_secs(10), |all| {
        all.iter().any(|d| d.payload["reason"] == "shutdown")
    });
    let bye = all
        .iter()
        .find(|d| d.payload["reason"] == "shutdown")
        .unwrap();
    assert_eq!(bye.payload["audit_head"]["hash"], hash.as_str());
}

#[test]
fn a_prune_of_delivered_readings_leaves_the_audit_trail_whole() {
    let id = "gw-audit-prune";
    let rig = Rig::new(id);
    let sim = Sim::start(&["--count", "5", "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    let mut gateway = Hearth::start(&config);
    assert_eq!(sim.finish(Duration::from_secs(60))["acked"], 5);
    wait_delivered(&config, 5);
    let c = config.to_str().unwrap();
    assert_eq!(hearth(&["readings", "list", "--config", c]).0, 0);
    gateway.stop();
    let before = audit(&config, &[]);

    // Retention 0 days: the start's prune deletes every delivered reading.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[store]\n", "[store]\nretention_days = 0\n"),
    )
    .unwrap();
    gateway.restart();
    gateway.wait_log_count(
        "Delivered readings past retention pruned.",
        1,
        Duration::from_secs(20),
    );
    wait_delivered(&config, 0);
    gateway.stop();

    // Every entry is still there, unchanged; the trail verifies.
    let after = audit(&config, &[]);
    assert_eq!(&after[..before.len()], &before[..]);
    assert_eq!(of_kind(&after, "config-changed").len(), 1, "{after:#?}");
    assert_eq!(verified_head(&config).0, after.len() as u64);
}

#[test]
fn a_read_that_cannot_be_recorded_shows_no_patient_data() {
    let id = "gw-audit-refuse";
    let rig = Rig::new(id);
    let sim = Sim::start(&["--count", "3", "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    let mut gateway = Hearth::start(&config);
    assert_eq!(sim.finish(Duration::from_secs(60))["acked"], 3);
    wait_delivered(&config, 3);
    gateway.stop();

    // The fake: a trail that can take no entry (its table renamed away).
    let db = attacker(&rig.db(&GatewayOpts::new(id)));
    db.execute_batch("ALTER TABLE audit RENAME TO audit_gone;")
        .unwrap();
    drop(db);

    let c = config.to_str().unwrap();
    for args in [
        &["readings", "list", "--config", c][..],
        &["devices", "list", "--format", "json", "--config", c][..],
    ] {
        let (code, out, err) = hearth(args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?} showed patient data: {out}");
        assert!(
            err.starts_with(&format!(
                "hearth: cannot record this read of patient data in the audit trail of store `{}`, so nothing is shown:",
                rig.db(&GatewayOpts::new(id)).display()
            )),
            "{err}"
        );
        assert!(err.contains("no such table: audit"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
