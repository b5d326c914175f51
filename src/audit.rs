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
//! reason, a command): never patient values, and never an implant serial
//! (a device is named by its store-local run, as in `operator_actions`).

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// The kinds of event; `hearth audit` shows them as they are.
pub mod kind {
    /// A TLS handshake or authentication with the broker failed.
    pub const TLS_FAILURE: &str = "tls-failure";
    /// The broker refused the CONNECT (bad credentials, not authorised).
    pub const AUTH_FAILURE: &str = "auth-failure";
    /// A certificate expires within 30 days, or has expired.
    pub const CERTIFICATE_EXPIRING: &str = "certificate-expiring";
    /// The configuration file changed since the last start.
    pub const CONFIG_CHANGED: &str = "config-changed";
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
}

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
    /// Entries checked.
    pub entries: u64,
    /// The last entry's id and hash, to compare with the copy the hospital
    /// holds (the status payload's `audit_head`).
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
/// before it, each hash recomputed.
pub fn verify(conn: &Connection) -> rusqlite::Result<Verdict> {
    let mut stmt =
        conn.prepare("SELECT id, at, kind, actor, detail, prev, hash FROM audit ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut entries = 0;
    let mut expected_prev = GENESIS.to_owned();
    let mut expected_id = 1;
    let mut head = None;
    while let Some(r) = rows.next()? {
        let e = row(r)?;
        entries += 1;
        let broken = if e.id != expected_id {
            Some(format!(
                "entry {expected_id} is missing (found {} next)",
                e.id
            ))
        } else if e.prev != expected_prev {
            Some("its link to the entry before does not match".to_owned())
        } else if entry_hash(
            &e.prev,
            e.id,
            e.at.timestamp_millis(),
            &e.kind,
            &e.actor,
            &e.detail,
        ) != e.hash
        {
            Some("its content does not match its hash (edited)".to_owned())
        } else {
            None
        };
        if let Some(why) = broken {
            return Ok(Verdict {
                entries,
                head: Some((e.id, e.hash)),
                broken: Some((e.id, why)),
            });
        }
        expected_prev = e.hash.clone();
        expected_id = e.id + 1;
        head = Some((e.id, e.hash));
    }
    Ok(Verdict {
        entries,
        head,
        broken: None,
    })
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

        let c = three();
        c.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE id = 2;")
            .unwrap();
        let v = verify(&c).unwrap();
        assert_eq!(v.broken.as_ref().map(|b| b.0), Some(3), "{v:?}");
        assert!(v.broken.unwrap().1.contains("entry 2 is missing"));
    }
}
