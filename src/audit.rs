//! The audit trail: security events, hash-chained in the store's `audit`
//! table (schema 4).
//!
//! Each entry's hash is the SHA-256 of the previous entry's hash and of its
//! own id, time, kind, actor and detail, so that an edit, an insertion or a
//! deletion in the middle breaks the chain ([`verify`]). hearth only ever
//! appends; the table's triggers refuse UPDATE and DELETE through SQLite.
//! What a chain alone cannot show is the loss of its newest entries: the
//! head (last id and hash) also goes out in the retained status payload,
//! where the hospital keeps it.
//!
//! An entry's detail is a JSON object of facts about the event (a file, a
//! reason, a command): never patient values, and never an implant serial.
//! A device is named by its [`pseudonym::device_ref`], a keyed hash that
//! only the store can tie back to a serial.
//!
//! The trail is never pruned: the prune of delivered readings
//! ([`crate::outbox::Store::prune_delivered`]) and the deletions made for
//! space touch `readings`, `rejected_frames` and `pruned` only.
//!
//! Who writes it: the running gateway ([`events`]: the config and key files
//! at start, a store moved aside, certificates near their end, seq
//! conflicts; the TLS and authentication failures of the broker link), and
//! the CLI ([`operator`]: a device reset, every command that shows patient
//! data, which refuses to show it when the read cannot be recorded).

pub mod events;
pub mod operator;
pub mod pseudonym;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// The kinds of event; `hearth audit` shows them as they are. A new kind
/// goes into [`kind::ALL`] too, so that `hearth audit --kind` knows it.
pub mod kind {
    /// A TLS handshake or authentication with the broker failed.
    pub const TLS_FAILURE: &str = "tls-failure";
    /// The broker refused the CONNECT (bad credentials, not authorised).
    pub const AUTH_FAILURE: &str = "auth-failure";
    /// A certificate expires within 30 days, or has expired.
    pub const CERTIFICATE_EXPIRING: &str = "certificate-expiring";
    /// The configuration file, or a key or certificate file it names,
    /// changed since the last start.
    pub const CONFIG_CHANGED: &str = "config-changed";
    /// The first start with this store: the hashes of the configuration
    /// and of the files it names, the baseline for `config-changed`.
    pub const CONFIG_FIRST_SEEN: &str = "config-first-seen";
    /// A damaged store was moved aside and a new one started.
    pub const STORE_MOVED_ASIDE: &str = "store-moved-aside";
    /// An operator reset a device's count (`hearth devices reset`).
    pub const DEVICE_RESET: &str = "device-reset";
    /// A device sent two different readings under one id.
    pub const SEQ_CONFLICT: &str = "seq-conflict";
    /// The CLI showed or exported patient data.
    pub const PATIENT_DATA_READ: &str = "patient-data-read";
    /// The store's encryption key was changed.
    pub const STORE_REKEYED: &str = "store-rekeyed";

    /// Every kind, for `hearth audit --kind`.
    pub const ALL: &[&str] = &[
        TLS_FAILURE,
        AUTH_FAILURE,
        CERTIFICATE_EXPIRING,
        CONFIG_CHANGED,
        CONFIG_FIRST_SEEN,
        STORE_MOVED_ASIDE,
        DEVICE_RESET,
        SEQ_CONFLICT,
        PATIENT_DATA_READ,
        STORE_REKEYED,
    ];
}

/// The actor of the entries the running gateway appends.
pub const GATEWAY_ACTOR: &str = "hearth run";

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry of the trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub actor: String,
    /// A JSON object, as stored.
    pub detail: String,
    pub prev: String,
    pub hash: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Entries in the trail.
    pub entries: u64,
    /// The last entry's id and hash, to compare with the copy the hospital
    /// holds (the status payload's `audit_head`); the last one stored, also
    /// when the chain is broken before it.
    pub head: Option<(i64, String)>,
    /// The first entry whose hash or link does not hold, with why.
    pub broken: Option<(i64, String)>,
}

/// The SHA-256 (hex) of an entry's content, linked to `prev`.
pub fn entry_hash(
    prev: &str,
    id: i64,
    at_ms: i64,
    kind: &str,
    actor: &str,
    detail: &str,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Each field ends with a newline and carries no newline itself except
    // `detail`, which is last: the encoding is unambiguous.
    for field in [prev, &id.to_string(), &at_ms.to_string(), kind, actor] {
        ctx.update(field.as_bytes());
        ctx.update(b"\n");
    }
    ctx.update(detail.as_bytes());
    hex(ctx.finish().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Appends one entry; the caller holds the write transaction (or none: a
/// single INSERT is atomic). Returns its id.
pub fn append(
    conn: &Connection,
    at: DateTime<Utc>,
    kind: &str,
    actor: &str,
    detail: &serde_json::Value,
) -> rusqlite::Result<i64> {
    let (last_id, prev): (i64, String) = conn
        .query_row(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, GENESIS.to_owned()));
    let id = last_id + 1;
    let at_ms = at.timestamp_millis();
    let actor = actor.replace('\n', " ");
    let detail = detail.to_string();
    let hash = entry_hash(&prev, id, at_ms, kind, &actor, &detail);
    conn.execute(
        "INSERT INTO audit (id, at, kind, actor, detail, prev, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![id, at_ms, kind, actor, detail, prev, hash],
    )?;
    Ok(id)
}

/// Entries at or after `since`, oldest first.
pub fn list(conn: &Connection, since: Option<DateTime<Utc>>) -> rusqlite::Result<Vec<Entry>> {
    let since = since.map_or(i64::MIN, |t| t.timestamp_millis());
    let mut stmt = conn.prepare(
        "SELECT id, at, kind, actor, detail, prev, hash FROM audit
         WHERE at >= ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![since], row)?;
    rows.collect()
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let at: i64 = r.get(1)?;
    Ok(Entry {
        id: r.get(0)?,
        at: DateTime::from_timestamp_millis(at).unwrap_or_default(),
        kind: r.get(2)?,
        actor: r.get(3)?,
        detail: r.get(4)?,
        prev: r.get(5)?,
        hash: r.get(6)?,
    })
}

/// The last entry's id and hash.
pub fn head(conn: &Connection) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row(
        "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

/// Walks the whole chain: ids without holes from 1, each `prev` the hash
/// before it, each hash recomputed. It goes on past a break, so that the
/// verdict names the first break and still the true head.
pub fn verify(conn: &Connection) -> rusqlite::Result<Verdict> {
    let mut stmt =
        conn.prepare("SELECT id, at, kind, actor, detail, prev, hash FROM audit ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut entries = 0;
    let mut expected_prev = GENESIS.to_owned();
    let mut expected_id = 1;
    let mut head = None;
    let mut broken = None;
    while let Some(r) = rows.next()? {
        let e = row(r)?;
        entries += 1;
        if broken.is_none() {
            broken = fault(&e, expected_id, &expected_prev).map(|why| (e.id, why));
        }
        expected_prev = e.hash.clone();
        expected_id = e.id + 1;
        head = Some((e.id, e.hash));
    }
    Ok(Verdict {
        entries,
        head,
        broken,
    })
}

/// Why `e` does not follow an entry `expected_id - 1` with hash
/// `expected_prev`, if it does not.
fn fault(e: &Entry, expected_id: i64, expected_prev: &str) -> Option<String> {
    if e.id != expected_id {
        return Some(format!(
            "entry {expected_id} is missing (found {} next)",
            e.id
        ));
    }
    if e.prev != expected_prev {
        return Some("its link to the entry before does not match".to_owned());
    }
    let hash = entry_hash(
        &e.prev,
        e.id,
        e.at.timestamp_millis(),
        &e.kind,
        &e.actor,
        &e.detail,
    );
    (hash != e.hash).then(|| "its content does not match its hash (edited)".to_owned())
}

/// Checks the trail against a copy of its head kept elsewhere (the status
/// payload's `audit_head`, as the hospital received it): the entry must
/// still be there with that hash. This is what shows a trail cut short, or
/// rewritten from some entry on with new hashes, which the chain alone
/// cannot.
pub fn check_head(entries: &[Entry], id: i64, hash: &str) -> Result<(), String> {
    match entries.iter().find(|e| e.id == id) {
        None => Err(format!(
            "it is missing, but the copy of the head names it (the trail was cut short: {} entries left)",
            entries.len()
        )),
        Some(e) if !e.hash.eq_ignore_ascii_case(hash) => Err(format!(
            "its hash `{}` differs from the copy of the head `{hash}` (rewritten)",
            e.hash
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(include_str!("../migrations/04-audit/up.sql"))
            .unwrap();
        c
    }

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn three() -> Connection {
        let c = conn();
        for (i, k) in [kind::TLS_FAILURE, kind::CONFIG_CHANGED, kind::DEVICE_RESET]
            .into_iter()
            .enumerate()
        {
            append(
                &c,
                t(1_000 + i as i64),
                k,
                "hearth run",
                &serde_json::json!({"i": i}),
            )
            .unwrap();
        }
        c
    }

    #[test]
    fn an_intact_chain_verifies_and_names_its_head() {
        let c = three();
        let v = verify(&c).unwrap();
        assert_eq!(v.entries, 3);
        assert_eq!(v.broken, None);
        assert_eq!(v.head, head(&c).unwrap());
        assert_eq!(list(&c, Some(t(1_001))).unwrap().len(), 2);
    }

    #[test]
    fn sqlite_refuses_an_update_or_a_delete() {
        let c = three();
        let update = c.execute("UPDATE audit SET actor = 'x' WHERE id = 2", []);
        assert!(update.unwrap_err().to_string().contains("append-only"));
        let delete = c.execute("DELETE FROM audit WHERE id = 3", []);
        assert!(delete.unwrap_err().to_string().contains("append-only"));
    }

    #[test]
    fn an_edit_or_a_deletion_around_the_triggers_breaks_the_chain() {
        let c = three();
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
            .unwrap();
        c.execute("UPDATE audit SET detail = '{\"i\":9}' WHERE id = 2", [])
            .unwrap();
        let v = verify(&c).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.0), Some(2), "{v:?}");
        // The walk goes on: the verdict still names the last entry.
        assert_eq!(v.entries, 3);
        assert_eq!(v.head, head(&c).unwrap());

        let c = three();
        c.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id = 2;")
            .unwrap();
        let v = verify(&c).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.0), Some(3), "{v:?}");
        assert!(v.broken.unwrap().1.contains("entry 2 is missing"));
    }

    #[test]
    fn the_copy_of_the_head_catches_a_cut_and_a_rewrite() {
        let c = three();
        let (id, hash) = head(&c).unwrap().unwrap();
        let all = list(&c, None).unwrap();
        assert_eq!(check_head(&all, id, &hash), Ok(()));
        assert!(check_head(&all, id, &hash.to_uppercase()).is_ok());

        // The newest entry deleted: the chain that is left holds...
        c.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id = 3;")
            .unwrap();
        assert_eq!(verify(&c).unwrap().broken, None);
        // ...but not against the head the hospital kept.
        let why = check_head(&list(&c, None).unwrap(), id, &hash).unwrap_err();
        assert!(why.contains("missing"), "{why}");
        let why = check_head(&list(&c, None).unwrap(), 2, &hash).unwrap_err();
        assert!(why.contains("differs"), "{why}");
    }

    #[test]
    fn every_kind_is_listed_once() {
        let mut all = kind::ALL.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), kind::ALL.len());
    }
}
