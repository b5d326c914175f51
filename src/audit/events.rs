//! The security events the running gateway records, each once:
//!
//! - at start ([`at_start`]): a damaged store moved aside; the SHA-256 of
//!   the configuration file and of the files it names (CA, certificate,
//!   key, CRL, store key) compared with the hashes the last start recorded
//!   (`gateway_state` key `config_hash`): one `config-changed` entry names
//!   every key whose file changed, or `config-first-seen` records the
//!   baseline of a new store. Hashes only, never contents.
//! - a certificate near its end ([`certificates`]): one entry when a
//!   certificate's state becomes `expiring` or `expired`, not one per
//!   12-hourly check, and not again after a restart (the state is kept in
//!   the store); a renewed certificate is recorded by the file check.
//! - seq conflicts ([`seq_conflicts`]): at most one entry per device per
//!   `serial.device_alarm_secs`, counting the conflicts it stands for, so
//!   that a device stuck in conflicts cannot grow the trail (which is never
//!   pruned) faster than a few entries a day.
//!
//! A failure to record is logged at WARN and never stops the gateway: the
//! readings matter more than their audit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{GATEWAY_ACTOR, kind, pseudonym};
use crate::config::Config;
use crate::health::{CertRole, CertificateRecord};
use crate::mqtt::payload::time_format::rfc3339;
use crate::outbox::{Encryption, Store, StoreError, StoreHandle};

/// The `gateway_state` key of the hashes the last start recorded.
pub const CONFIG_HASH_STATE: &str = "config_hash";
/// The `gateway_state` key of the seq-conflict entries' pace per device.
const CONFLICTS_STATE: &str = "audit_seq_conflicts";

/// A reading stored as a seq conflict: its device, epoch and seq.
pub type Conflict = (String, Option<u32>, u32);
/// A reading's epoch and seq.
type SeqKey = (Option<u32>, u32);

/// A watched file and the SHA-256 (hex) of its bytes; `None` if it could
/// not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashed {
    pub file: PathBuf,
    pub sha256: Option<String>,
}

/// The watched files by config key (`config` for the file itself).
pub type Fingerprint = BTreeMap<String, Hashed>;

/// Records the start's events: see the module comment. Call it once the
/// store is open, before the tasks start.
pub async fn at_start(store: &StoreHandle, config: &Config, moved_aside: Option<&Path>) {
    let files = watched(config);
    let moved = moved_aside.map(|aside| (config.store.path.clone(), aside.to_owned()));
    let encryption = Encryption::from_config(&config.store, &config.source);
    let done = store
        .call(move |s| {
            if let Some((path, aside)) = moved {
                store_moved_aside(s, &path, &aside, &encryption)?;
            }
            pseudonym::ensure_key(s)?;
            config_check(s, &fingerprint(&files))
        })
        .await;
    match done {
        Ok(ConfigCheck::Changed(keys)) => tracing::info!(
            changed = %keys.join(","),
            "Configuration or its files changed since the last start: recorded in the audit trail."
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Cannot record the start in the audit trail."),
    }
}

/// The files whose change is a security event, by config key.
fn watched(config: &Config) -> Vec<(&'static str, PathBuf)> {
    let mut files = vec![
        ("config", config.source.clone()),
        ("mqtt.ca_file", config.mqtt.ca_file.clone()),
        ("mqtt.cert_file", config.mqtt.cert_file.clone()),
        ("mqtt.key_file", config.mqtt.key_file.clone()),
    ];
    if let Some(crl) = &config.mqtt.crl_file {
        files.push(("mqtt.crl_file", crl.clone()));
    }
    if let Some(key) = &config.store.key_file {
        files.push(("store.key_file", key.clone()));
    }
    // A configuration built in code (the demo) has no file.
    files.retain(|(_, path)| !path.as_os_str().is_empty());
    files
}

/// Hashes each file as it is now.
pub fn fingerprint(files: &[(&str, PathBuf)]) -> Fingerprint {
    files
        .iter()
        .map(|(key, file)| {
            let sha256 = std::fs::read(file).ok().map(|bytes| {
                let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
                super::hex(digest.as_ref())
            });
            (
                (*key).to_owned(),
                Hashed {
                    file: file.clone(),
                    sha256,
                },
            )
        })
        .collect()
}

/// What [`config_check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigCheck {
    /// No hashes were recorded: a new store.
    FirstSeen,
    /// These config keys' files changed.
    Changed(Vec<String>),
    Unchanged,
}

/// Compares `now` with the recorded hashes, appends `config-first-seen` or
/// `config-changed` as needed and records `now`.
pub fn config_check(s: &mut Store, now: &Fingerprint) -> Result<ConfigCheck, StoreError> {
    let before: Option<Fingerprint> = s
        .state(CONFIG_HASH_STATE)?
        .and_then(|v| serde_json::from_str(&v).ok());
    let found = match &before {
        None => {
            s.audit(
                kind::CONFIG_FIRST_SEEN,
                GATEWAY_ACTOR,
                &json!({ "files": now }),
            )?;
            ConfigCheck::FirstSeen
        }
        Some(before) => {
            let keys: std::collections::BTreeSet<&String> =
                before.keys().chain(now.keys()).collect();
            let changed: Vec<&String> = keys
                .into_iter()
                .filter(|k| before.get(*k) != now.get(*k))
                .collect();
            if changed.is_empty() {
                return Ok(ConfigCheck::Unchanged);
            }
            let changes: Vec<serde_json::Value> = changed
                .iter()
                .map(|k| {
                    let (was, is) = (before.get(*k), now.get(*k));
                    let mut change = json!({
                        "key": k,
                        "file": is.or(was).map(|h| &h.file),
                        "previous": was.and_then(|h| h.sha256.as_ref()),
                        "now": is.and_then(|h| h.sha256.as_ref()),
                    });
                    if let (Some(was), Some(is)) = (was, is)
                        && was.file != is.file
                    {
                        change["previous_file"] = json!(was.file);
                    }
                    change
                })
                .collect();
            s.audit(
                kind::CONFIG_CHANGED,
                GATEWAY_ACTOR,
                &json!({ "changed": changes }),
            )?;
            ConfigCheck::Changed(changed.into_iter().cloned().collect())
        }
    };
    // After the entry: a crash in between records the change again at the
    // next start rather than never.
    let value = serde_json::to_string(now).expect("hashes serialize");
    s.set_state(CONFIG_HASH_STATE, &value)?;
    Ok(found)
}

/// Appends `store-moved-aside`, with the head of the trail the damaged
/// store held, if it can still be read (with the key it was kept under).
fn store_moved_aside(
    s: &mut Store,
    path: &Path,
    aside: &Path,
    encryption: &Encryption,
) -> Result<i64, StoreError> {
    let old = Store::open_read_only(aside, encryption).and_then(|old| old.audit_verify());
    let previous_head = match &old {
        Ok(v) => json!(
            v.head
                .as_ref()
                .map(|(id, hash)| json!({"id": id, "hash": hash}))
        ),
        Err(_) => json!(null),
    };
    s.audit(
        kind::STORE_MOVED_ASIDE,
        GATEWAY_ACTOR,
        &json!({
            "store": path,
            "moved_to": aside,
            "previous_head": previous_head,
            "previous_entries": old.as_ref().ok().map(|v| v.entries),
        }),
    )
}

/// Records a change of the loaded certificates' state (see the module
/// comment). Called by the health task at each check.
pub async fn certificates(
    store: &StoreHandle,
    loaded: &[(CertRole, CertificateRecord)],
    now: DateTime<Utc>,
) {
    let loaded = loaded.to_vec();
    if let Err(e) = store
        .call(move |s| certificate_entries(s, &loaded, now))
        .await
    {
        tracing::warn!(error = %e, "Cannot record a certificate's state in the audit trail.");
    }
}

/// What a certificate's state is recorded as, per role.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CertificateState {
    file: PathBuf,
    not_after: i64,
    state: String,
}

/// The synchronous core of [`certificates`]; returns the entries appended.
fn certificate_entries(
    s: &mut Store,
    loaded: &[(CertRole, CertificateRecord)],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, StoreError> {
    let mut appended = Vec::new();
    for (role, record) in loaded {
        let end = record.not_after();
        let state = if end <= now {
            "expired"
        } else if crate::health::expiring(end, now) {
            "expiring"
        } else {
            "valid"
        };
        let current = CertificateState {
            file: record.file.clone(),
            not_after: record.not_after,
            state: state.to_owned(),
        };
        let key = format!("audit_{}", role.state_key());
        let before: Option<CertificateState> =
            s.state(&key)?.and_then(|v| serde_json::from_str(&v).ok());
        if before.as_ref() == Some(&current) {
            continue;
        }
        if state != "valid" {
            appended.push(s.audit(
                kind::CERTIFICATE_EXPIRING,
                GATEWAY_ACTOR,
                &json!({
                    "certificate": role.name(),
                    "file": record.file,
                    "state": state,
                    "not_after": rfc3339(&end),
                    "days_left": (end - now).num_days(),
                }),
            )?);
        }
        let value = serde_json::to_string(&current).expect("a state serializes");
        s.set_state(&key, &value)?;
    }
    Ok(appended)
}

/// Records seq conflicts, each `(device, epoch, seq)` a reading stored as a
/// conflict; at most one entry per device per `period` (see the module
/// comment).
pub async fn seq_conflicts(store: &StoreHandle, conflicts: Vec<Conflict>, period: Duration) {
    if let Err(e) = store
        .call(move |s| conflict_entries(s, &conflicts, period, Utc::now()))
        .await
    {
        tracing::warn!(error = %e, "Cannot record a seq conflict in the audit trail.");
    }
}

/// When a device's last seq-conflict entry was made, and how many conflicts
/// came since without one.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Pace {
    last: i64,
    unrecorded: u64,
}

/// The synchronous core of [`seq_conflicts`]; returns the entries appended.
fn conflict_entries(
    s: &mut Store,
    conflicts: &[Conflict],
    period: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<i64>, StoreError> {
    let mut pace: BTreeMap<String, Pace> = s
        .state(CONFLICTS_STATE)?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    // By device, in the order they came.
    let mut by_device: Vec<(&str, Vec<SeqKey>)> = Vec::new();
    for (device, epoch, seq) in conflicts {
        match by_device.iter_mut().find(|(d, _)| d == device) {
            Some((_, keys)) => keys.push((*epoch, *seq)),
            None => by_device.push((device, vec![(*epoch, *seq)])),
        }
    }
    let now_ms = now.timestamp_millis();
    let period_ms = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
    let mut appended = Vec::new();
    for (device, keys) in by_device {
        let reference = pseudonym::device_ref(s, device)?;
        let p = pace.entry(reference.clone()).or_default();
        let count = keys.len() as u64;
        if p.last != 0 && now_ms.saturating_sub(p.last) < period_ms {
            p.unrecorded += count;
            continue;
        }
        let (epoch, seq) = keys[0];
        appended.push(s.audit(
            kind::SEQ_CONFLICT,
            GATEWAY_ACTOR,
            &json!({
                "device": reference,
                "epoch": epoch,
                "seq": seq,
                "conflicts": count + p.unrecorded,
            }),
        )?);
        *p = Pace {
            last: now_ms,
            unrecorded: 0,
        };
    }
    let value = serde_json::to_string(&pace).expect("the pace serializes");
    s.set_state(CONFLICTS_STATE, &value)?;
    Ok(appended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir) -> Store {
        crate::outbox::store::tests::open_at(&dir.path().join("audit.db"))
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn kinds(s: &Store) -> Vec<String> {
        s.audit_entries(None)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    #[test]
    fn the_first_start_records_a_baseline_and_a_later_one_only_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(&tmp);
        let conf = tmp.path().join("hearth.toml");
        let cert = tmp.path().join("gateway.crt");
        std::fs::write(&conf, "gateway_id = \"gw\"\n").unwrap();
        std::fs::write(&cert, "CERT 1").unwrap();
        let files = [("config", conf.clone()), ("mqtt.cert_file", cert.clone())];

        assert_eq!(
            config_check(&mut s, &fingerprint(&files)).unwrap(),
            ConfigCheck::FirstSeen
        );
        assert_eq!(
            config_check(&mut s, &fingerprint(&files)).unwrap(),
            ConfigCheck::Unchanged
        );
        assert_eq!(kinds(&s), [kind::CONFIG_FIRST_SEEN]);

        // A swapped certificate is named; the unchanged config is not.
        let before = fingerprint(&files)["mqtt.cert_file"].sha256.clone();
        std::fs::write(&cert, "CERT 2").unwrap();
        let changed = config_check(&mut s, &fingerprint(&files)).unwrap();
        assert_eq!(changed, ConfigCheck::Changed(vec!["mqtt.cert_file".into()]));
        let last = s.audit_entries(None).unwrap().pop().unwrap();
        assert_eq!(last.kind, kind::CONFIG_CHANGED);
        let detail: serde_json::Value = serde_json::from_str(&last.detail).unwrap();
        assert_eq!(detail["changed"].as_array().unwrap().len(), 1, "{detail}");
        assert_eq!(detail["changed"][0]["key"], "mqtt.cert_file");
        assert_eq!(detail["changed"][0]["previous"], json!(before));
        assert!(!last.detail.contains("CERT"), "hashes, never contents");

        // A file that is gone is a change too.
        std::fs::remove_file(&cert).unwrap();
        config_check(&mut s, &fingerprint(&files)).unwrap();
        let last = s.audit_entries(None).unwrap().pop().unwrap();
        let detail: serde_json::Value = serde_json::from_str(&last.detail).unwrap();
        assert_eq!(detail["changed"][0]["now"], json!(null), "{detail}");
        assert_eq!(s.audit_verify().unwrap().broken, None);
    }

    #[test]
    fn a_certificate_is_recorded_once_per_state_change_also_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(&tmp);
        let end = at("2026-03-31T00:00:00Z");
        let loaded = [(
            CertRole::Client,
            CertificateRecord {
                file: "/etc/hearth/certs/gateway.crt".into(),
                not_after: end.timestamp_millis(),
            },
        )];
        // Valid: nothing to record.
        let valid = at("2026-01-01T00:00:00Z");
        assert!(
            certificate_entries(&mut s, &loaded, valid)
                .unwrap()
                .is_empty()
        );
        // Within 30 days: one entry, then none at the next 12-hourly checks
        // nor after a restart (the same store, a fresh call).
        let soon = at("2026-03-10T00:00:00Z");
        assert_eq!(certificate_entries(&mut s, &loaded, soon).unwrap().len(), 1);
        for hours in [12, 24, 36] {
            let later = soon + chrono::Duration::hours(hours);
            assert!(
                certificate_entries(&mut s, &loaded, later)
                    .unwrap()
                    .is_empty()
            );
        }
        drop(s);
        let mut s = store(&tmp);
        assert!(
            certificate_entries(&mut s, &loaded, soon)
                .unwrap()
                .is_empty()
        );
        // Expired: a new state, one more entry.
        let past = at("2026-04-01T00:00:00Z");
        assert_eq!(certificate_entries(&mut s, &loaded, past).unwrap().len(), 1);
        assert!(
            certificate_entries(&mut s, &loaded, past)
                .unwrap()
                .is_empty()
        );
        let entries = s.audit_entries(None).unwrap();
        let states: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| serde_json::from_str::<serde_json::Value>(&e.detail).unwrap()["state"].clone())
            .collect();
        assert_eq!(states, [json!("expiring"), json!("expired")]);
        assert_eq!(entries[0].kind, kind::CERTIFICATE_EXPIRING);
    }

    #[test]
    fn seq_conflicts_make_one_entry_per_device_and_period_naming_no_serial() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(&tmp);
        let hour = Duration::from_secs(3600);
        let t0 = at("2026-03-01T12:00:00Z");
        let batch = vec![
            ("PM-000001".to_owned(), Some(7), 1),
            ("PM-000001".to_owned(), Some(7), 2),
            ("PM-000002".to_owned(), None, 5),
        ];
        assert_eq!(conflict_entries(&mut s, &batch, hour, t0).unwrap().len(), 2);
        // Within the hour: counted, not recorded.
        let t1 = t0 + chrono::Duration::minutes(30);
        assert!(
            conflict_entries(&mut s, &batch[..1], hour, t1)
                .unwrap()
                .is_empty()
        );
        // After it: one entry standing for this conflict and the one before.
        let t2 = t0 + chrono::Duration::minutes(61);
        assert_eq!(
            conflict_entries(&mut s, &batch[..1], hour, t2)
                .unwrap()
                .len(),
            1
        );
        let entries = s.audit_entries(None).unwrap();
        let details: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| serde_json::from_str(&e.detail).unwrap())
            .collect();
        let pm1 = pseudonym::device_ref(&mut s, "PM-000001").unwrap();
        assert_eq!(details[0]["device"], json!(pm1));
        assert_eq!(details[0]["conflicts"], 2);
        assert_eq!(
            (details[0]["epoch"].clone(), details[0]["seq"].clone()),
            (json!(7), json!(1))
        );
        assert_eq!(details[2]["device"], json!(pm1));
        assert_eq!(
            details[2]["conflicts"], 2,
            "this one and the unrecorded one"
        );
        assert!(
            entries.iter().all(|e| !e.detail.contains("PM-")),
            "{entries:?}"
        );
    }

    #[test]
    fn a_store_moved_aside_names_the_old_trails_head() {
        let tmp = tempfile::tempdir().unwrap();
        let old_path = tmp.path().join("old.db");
        let mut old = crate::outbox::store::tests::open_at(&old_path);
        old.audit(kind::DEVICE_RESET, "alice (uid 1000)", &json!({}))
            .unwrap();
        let head = old.audit_verify().unwrap().head.unwrap();
        drop(old);
        let mut s = store(&tmp);
        let path = Path::new("/var/lib/hearth/hearth.db");
        store_moved_aside(&mut s, path, &old_path, &Encryption::beside(&old_path)).unwrap();
        let e = s.audit_entries(None).unwrap().pop().unwrap();
        let detail: serde_json::Value = serde_json::from_str(&e.detail).unwrap();
        assert_eq!(e.kind, kind::STORE_MOVED_ASIDE);
        assert_eq!(detail["previous_head"]["id"], head.0);
        assert_eq!(detail["previous_head"]["hash"], json!(head.1));
        assert_eq!(detail["previous_entries"], 1);
    }
}
