//! The SQLite outbox: every reading the gateway ACKed, and every open MQTT
//! QoS 2 exchange.
//!
//! Guarantees, in the order the pipeline relies on them:
//! - The database runs in WAL mode with `synchronous=FULL`: a transaction
//!   that returned is on disk and survives a process crash or power loss.
//! - It is encrypted at rest, WAL included, unless `store.encrypt = false`
//!   ([`super::cipher`], key from [`super::key`]); a key that does not open
//!   it is an error, never a reason to move it aside or start a new one.
//! - A reading is committed before the device gets its ACK
//!   ([`Store::commit_serial`] returns only after COMMIT). Where it goes,
//!   and why no well-formed reading is refused, is [`super::ingest`]'s to
//!   say; a resent frame is reported `Duplicate` and ACKed again.
//! - An exchange row (packet id, topic, stage `publish`; its readings point
//!   to it, and its payload is rebuilt from them byte for byte) is committed
//!   before its PUBLISH is written ([`Store::begin_exchange`]); it moves to
//!   stage `release` before its PUBREL is written ([`Store::exchange_released`]);
//!   its readings become `delivered` only in the transaction that deletes it
//!   on PUBCOMP ([`Store::complete_exchange`]). A packet id is therefore never
//!   reused while the broker may still hold it.
//! - That last transaction alone is not synced (`synchronous=NORMAL` for
//!   it): it survives a process crash, and a power loss may undo it, which
//!   leaves the exchange in stage `release`; its PUBREL is then sent again.
//!   Under MQTT 3.1.1 the broker's PUBCOMP completes it (no duplicate);
//!   under MQTT 5 its PUBCOMP 0x92 has the readings queued again (a
//!   possible duplicate, same ids). Never a loss; one fsync saved per
//!   exchange. Every later synced commit carries it to disk too
//!   (the WAL is written in order), so its packet id is not reused before.
//! - Rejected frames are kept with their raw bytes: nothing a device sent
//!   disappears silently.
//! - A reading deleted after delivery leaves its key and content hash in
//!   `pruned`, so that its resend is still ACKed and not stored again.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::cipher::{self, Access, OnDisk};
use super::ingest::{self, Insert};
use super::key::{Encryption, Key, KeyError, Keyring, Source};
use crate::reading::{Kind, Priority, Reading};

/// Schema migrations, applied in order; `PRAGMA user_version` counts them.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "01-initial",
        include_str!("../../migrations/01-initial/up.sql"),
    ),
    (
        "02-device-runs",
        include_str!("../../migrations/02-device-runs/up.sql"),
    ),
    (
        "03-prune-index",
        include_str!("../../migrations/03-prune-index/up.sql"),
    ),
    ("04-audit", include_str!("../../migrations/04-audit/up.sql")),
    (
        "05-journeys",
        include_str!("../../migrations/05-journeys/up.sql"),
    ),
];

const INSERT_REJECTED: &str = "INSERT INTO rejected_frames
    (received_at, port, reason, detail, raw) VALUES (?1, ?2, ?3, ?4, ?5)";
const NEXT_QUEUED: &str = "SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at, epoch, run, variant, late, restart FROM readings
    WHERE state = 'queued' AND priority = ?1 ORDER BY id LIMIT ?2";
/// A journey ([`Store::begin_exchange`]); `sends` starts with the first
/// PUBLISH.
const INSERT_JOURNEY: &str = "INSERT INTO journeys
    (id, pkid, topic, qos, encoding, readings, began_at, sends, bytes, digest)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
/// Puts a queued reading in flight ([`Store::begin_exchange_with`]).
const MARK_INFLIGHT: &str = "UPDATE readings SET state = 'inflight', exchange_id = ?1,
    pkid = ?2, attempts = attempts + 1, inflight_at = ?3 WHERE id = ?4 AND state = 'queued'";
/// [`MARK_INFLIGHT`], adding the exchange to the reading's journeys; past
/// about 200 characters (a reading the broker kept refusing) the oldest
/// go, so that the row stays small.
const MARK_INFLIGHT_JOURNEY: &str = "UPDATE readings SET state = 'inflight', exchange_id = ?1,
    pkid = ?2, attempts = attempts + 1, inflight_at = ?3,
    journeys = CASE
        WHEN journeys IS NULL THEN ?1
        WHEN length(journeys) > 200 THEN substr(journeys, instr(journeys, ',') + 1) || ',' || ?1
        ELSE journeys || ',' || ?1 END
    WHERE id = ?4 AND state = 'queued'";

/// The digest a journey keeps of its payload: the first 8 bytes of its
/// SHA-256, in hex.
pub(crate) fn digest(payload: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, payload);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}
/// How a journey ended, once: a journey whose readings were queued again
/// keeps that outcome when its exchange is released later.
const END_JOURNEY: &str = "UPDATE journeys SET ended_at = ?2, outcome = ?3
    WHERE id = ?1 AND outcome IS NULL";
/// Marks the readings of `exchange` delivered at `now`, ends its journey
/// with `outcome` and deletes the exchange (its packet id is free again);
/// returns how many readings were delivered.
fn close_delivered(
    tx: &Connection,
    journey: bool,
    exchange: i64,
    now: DateTime<Utc>,
    outcome: &str,
) -> rusqlite::Result<usize> {
    let n = tx
        .prepare_cached(
            "UPDATE readings SET state = 'delivered', exchange_id = NULL,
             delivered_at = ?1 WHERE exchange_id = ?2",
        )?
        .execute(params![to_ms(now), exchange])?;
    end_journey(tx, journey, exchange, to_ms(now), outcome)?;
    tx.prepare_cached("DELETE FROM exchanges WHERE id = ?1")?
        .execute(params![exchange])?;
    Ok(n)
}

/// Adds `n` to `requeued_after_lost_session`, the count `hearth status`
/// shows of readings queued again because the broker lost them.
fn count_requeued(tx: &Connection, n: usize) -> rusqlite::Result<()> {
    let total: u64 = tx
        .query_row(
            "SELECT value FROM gateway_state WHERE key = 'requeued_after_lost_session'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    tx.prepare_cached(UPSERT_STATE)?.execute(params![
        "requeued_after_lost_session",
        (total + n as u64).to_string()
    ])?;
    Ok(())
}

/// Ends the journey of `exchange` ([`END_JOURNEY`]) when `journey` says
/// journeys are written now ([`Store::journeys_fit`]).
fn end_journey(
    tx: &Connection,
    journey: bool,
    exchange: i64,
    at: i64,
    outcome: &str,
) -> rusqlite::Result<()> {
    if journey {
        tx.prepare_cached(END_JOURNEY)?
            .execute(params![exchange, at, outcome])?;
    }
    Ok(())
}
const UPSERT_STATE: &str = "INSERT INTO gateway_state (key, value) VALUES (?1, ?2)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// Present while a CONNECT was written whose CONNACK is not yet settled.
const CONNECT_PENDING: &str = "connect_pending";
/// A reading by id, as [`EXCHANGE_READINGS`] gives it (`hearth readings
/// show` rebuilds a journey's payload with it).
pub(crate) const EXCHANGE_READINGS_BY_ID: &str = "SELECT id, device, seq, kind, value, unit,
    priority, detail, device_time, received_at, epoch, run, variant, late, restart
    FROM readings WHERE id = ?1";
pub(crate) const EXCHANGE_READINGS: &str =
    "SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at, epoch, run, variant, late, restart FROM readings
    WHERE exchange_id = ?1 ORDER BY id";
pub(crate) const LIST_COLUMNS: &str = "SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at, state, pkid, attempts, delivered_at, epoch, run, variant, late,
    restart, stored_at FROM readings";
/// What is left of a pruned reading.
const TOMBSTONE: &str = "INSERT OR IGNORE INTO pruned
    (device, epoch, seq, run, variant, hash, pruned_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database `{path}`: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no database at `{0}` (has `hearth run` started with this config?)")]
    Missing(PathBuf),
    #[error(
        "database `{path}` has schema version {found}, newer than this hearth knows ({known}): upgrade hearth"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database `{path}` is full: it reached its size cap or the disk is full")]
    Full { path: PathBuf },
    #[error("database `{path}`: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot move damaged database `{path}` aside to `{to}`: {source}")]
    MoveAside {
        path: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("the store thread has stopped")]
    Closed,
    #[error(
        "store `{path}` cannot be opened with the key from {key}: wrong key, or not a hearth store: {source}{hint}"
    )]
    WrongKey {
        path: PathBuf,
        /// The key's source, as [`crate::outbox::key::Source`] shows it.
        key: String,
        source: Box<rusqlite::Error>,
        /// What to try, for the sources that have a way out.
        hint: &'static str,
    },
    #[error(
        "store `{path}` cannot be opened: its key `{key}` does not exist (restore it, or name the right one with `store.key_file`); hearth makes a key only for a new store, never for an existing one"
    )]
    KeyMissing { path: PathBuf, key: PathBuf },
    #[error("store `{path}`: {source}")]
    Key {
        path: PathBuf,
        source: crate::outbox::key::KeyError,
    },
    #[error(
        "store `{0}` is not a plain SQLite database (it is encrypted, or damaged) and `store.encrypt = false`: hearth never decrypts a store silently; set `encrypt = true` with its key, or move the file away"
    )]
    NotPlain(PathBuf),
    #[error("cannot encrypt the plain store `{path}` in place: cannot {step}: {source}")]
    Encrypt {
        path: PathBuf,
        step: &'static str,
        source: rusqlite::Error,
    },
    #[error("cannot encrypt the plain store `{path}` in place: {problem}")]
    EncryptCheck { path: PathBuf, problem: String },
    #[error(
        "store `{0}` is open in another process: stop the gateway first (`systemctl stop hearth`), change the key, then start it again"
    )]
    InUse(PathBuf),
    #[error(
        "store `{0}` is not encrypted yet: `hearth run` encrypts it at its next start; change its key after that"
    )]
    NotEncrypted(PathBuf),
    #[error(
        "the key change of `{path}` did not take: {problem}; the store keeps its old key and nothing was lost (free some space and run `hearth store rekey` again)"
    )]
    RekeyFailed { path: PathBuf, problem: String },
    #[error(
        "store `{0}` is used by another `hearth run`: only one gateway may use a store (is the service running? `systemctl status hearth`)"
    )]
    Locked(PathBuf),
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Each connection's page cache, in KiB (negative: `PRAGMA cache_size`
/// counts KiB when below zero).
const CACHE_KIB: i64 = -1024;

/// The WAL file of the database at `path`.
fn wal_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Bytes free to an unprivileged writer on the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid C string and a zeroed statvfs for the call to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// A frame the serial decoder refused, as `rejected_frames` keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedFrame {
    /// The reject code (`garbage`, `checksum`, `invalid`, ...).
    pub code: &'static str,
    /// The cause in words; never patient data.
    pub detail: String,
    /// The bytes as received; patient data.
    pub raw: Vec<u8>,
}

/// A queued reading as the publisher needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub id: i64,
    pub device: String,
    pub seq: u32,
    pub kind: String,
    pub value: f64,
    pub unit: String,
    pub priority: Priority,
    pub detail: Option<String>,
    pub device_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// Identity beyond (device, seq): see [`super::ingest`].
    pub epoch: u32,
    pub run: u32,
    pub variant: u32,
    pub late: bool,
    pub restart: bool,
}

/// What a CONNACK said, for [`Store::settle_connack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connack {
    /// Our own clean-session CONNECT for a new store.
    Reset,
    /// `session_present = false` on a persistent session: the broker lost it.
    Absent,
    /// `session_present = true`.
    Present,
}

/// An open QoS 2 exchange, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub pkid: u16,
    pub topic: String,
    /// Its readings, in the order they were sent (empty once they were
    /// queued again after a missed CONNACK: only its release is owed).
    pub readings: Vec<Queued>,
    /// True once PUBREC was recorded: resume with PUBREL, not PUBLISH.
    pub released: bool,
}

/// One row of `hearth readings rejected`: a frame the decoder refused.
#[derive(Debug, Clone)]
pub struct RejectedRow {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub port: String,
    /// The reject code (`garbage`, `checksum`, ...).
    pub reason: String,
    /// The cause in words.
    pub detail: String,
    /// The bytes as received: patient data, and maybe terminal control
    /// sequences.
    pub raw: Vec<u8>,
}

/// One row of `hearth readings list`.
#[derive(Debug, Clone, Serialize)]
pub struct ReadingRow {
    pub id: i64,
    pub device: String,
    pub seq: u32,
    pub kind: String,
    pub value: f64,
    pub unit: String,
    pub priority: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub device_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub state: String,
    pub pkid: Option<u16>,
    pub attempts: u32,
    pub delivered_at: Option<DateTime<Utc>>,
    pub epoch: u32,
    pub run: u32,
    pub variant: u32,
    pub late: bool,
    pub restart: bool,
    /// When its row was written (the ACK followed that commit); `None` for
    /// readings stored before schema 5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_at: Option<DateTime<Utc>>,
}

/// One device (its newest epoch) for `hearth devices`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub device: String,
    pub epoch: u32,
    pub run: u32,
    /// Highest seq stored in the current run.
    pub high: Option<u32>,
    pub last_heard: Option<DateTime<Utc>>,
    /// The seq a routine reading is being held for, and since when.
    pub gap_missing: Option<u32>,
    pub gap_since: Option<DateTime<Utc>>,
    pub stored: u64,
    pub late: u64,
    pub restarts: u64,
    pub conflicts: u64,
    /// `device-restart` or `seq-conflict` while its alarm holds.
    pub alarm: Option<String>,
    pub alarm_until: Option<DateTime<Utc>>,
}

/// Filters of `hearth readings list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `None` means every state.
    pub state: Option<String>,
    pub device: Option<String>,
    pub kind: Option<String>,
    pub priority: Option<String>,
    /// Received at or after.
    pub since: Option<DateTime<Utc>>,
    /// Received before.
    pub until: Option<DateTime<Utc>>,
    /// Seqs in this range, inclusive.
    pub seq: Option<(u32, u32)>,
    /// The page after this cursor: rows after (received_at ms, id).
    pub after: Option<(i64, i64)>,
    pub limit: Option<u64>,
}

/// Counters for `hearth status` and the heartbeat.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub queued_alert: u64,
    pub queued_routine: u64,
    pub inflight: u64,
    pub delivered: u64,
    pub rejected_frames: u64,
    pub oldest_queued: Option<DateTime<Utc>>,
    pub last_received: Option<DateTime<Utc>>,
    pub last_delivered: Option<DateTime<Utc>>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// SQLCipher-encrypted (else plain: `store.encrypt = false`, or an
    /// earlier hearth's store not yet encrypted).
    encrypted: bool,
    /// Above this many used pages, new readings are refused (BUSY) so that
    /// the publisher keeps room to drain; `None` means no cap.
    intake_limit: Option<u64>,
    /// See [`ingest::GAP_WAIT`].
    gap_wait: std::time::Duration,
    /// How long a device restart or seq conflict keeps its alarm.
    alarm_for: std::time::Duration,
    /// What the journeys of new exchanges record: the connection (the
    /// session counter of the last [`Store::begin_connect`]), the QoS and
    /// the payload encoding ([`Store::set_publish_profile`]).
    session: u64,
    qos: u8,
    encoding: &'static str,
}

/// Rows one prune step deletes at most (see [`Store::prune_delivered_chunk`]).
pub const PRUNE_CHUNK: usize = 2000;

/// How long a device restart or a seq conflict keeps its alarm by default.
pub const DEVICE_ALARM: std::time::Duration = std::time::Duration::from_secs(3600);

/// Share of the size cap that readings may fill; the rest is headroom for
/// exchange rows and state updates, so the outbox can always drain.
const INTAKE_SHARE: f64 = 0.9;
/// Fewest pages kept free for draining, however small the cap.
const MIN_RESERVE_PAGES: u64 = 12;
/// A reading delivered this recently is never deleted for space.
const PRESSURE_PRUNE_MIN_AGE_MS: i64 = 10_000;
/// Delivered routine readings deleted at once when the cap is near.
const PRESSURE_PRUNE_ROWS: i64 = 2000;

/// The SQL and arguments of `hearth readings list` for `filter`.
pub(crate) fn list_query(filter: &ListFilter) -> (String, Vec<rusqlite::types::Value>) {
    // The rows come in `readings_received` order (received_at, id), so that
    // a page or a `--since` reads only the rows it lists. A unary `+` keeps
    // SQLite from serving a filter with another index and then sorting all
    // its matches (a device's 200,000 readings, say): except the few that
    // are selective on their own, a seq range of a device (`readings_key`)
    // and the waiting states (`readings_queue`).
    let mut sql = format!("{LIST_COLUMNS} WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    // `clause` with one `?` per value, in order.
    let mut and = |clause: &str, values: Vec<rusqlite::types::Value>| {
        sql.push_str(" AND ");
        sql.push_str(clause);
        args.extend(values);
    };
    let waiting = filter.state.as_deref().is_some_and(|s| s != "delivered");
    if let Some(state) = &filter.state {
        and(
            if waiting { "state = ?" } else { "+state = ?" },
            vec![state.clone().into()],
        );
    }
    if let Some(device) = &filter.device {
        let seq = filter.seq.is_some();
        and(
            if seq { "device = ?" } else { "+device = ?" },
            vec![device.clone().into()],
        );
    }
    if let Some(kind) = &filter.kind {
        and("+kind = ?", vec![kind.clone().into()]);
    }
    if let Some(priority) = &filter.priority {
        // With a waiting state, `readings_queue` (state, priority) serves it.
        and(
            if waiting {
                "priority = ?"
            } else {
                "+priority = ?"
            },
            vec![priority.clone().into()],
        );
    }
    if let Some(since) = filter.since {
        and("received_at >= ?", vec![to_ms(since).into()]);
    }
    if let Some(until) = filter.until {
        and("received_at < ?", vec![to_ms(until).into()]);
    }
    if let Some((from, to)) = filter.seq {
        and(
            "seq BETWEEN ? AND ?",
            vec![i64::from(from).into(), i64::from(to).into()],
        );
    }
    if let Some((received, id)) = filter.after {
        // Row values: the index `readings_received` (received_at, then the
        // rowid) serves it as a range.
        and(
            "(received_at, id) > (?, ?)",
            vec![received.into(), id.into()],
        );
    }
    // `received_at, id` is the index order of `readings_received`, so a
    // `--since` on a large table reads only the rows it lists.
    sql.push_str(" ORDER BY received_at, id");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    (sql, args)
}

/// Maps a row of [`LIST_COLUMNS`].
pub(crate) fn reading_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReadingRow> {
    Ok(ReadingRow {
        id: row.get(0)?,
        device: row.get(1)?,
        seq: row.get(2)?,
        kind: row.get(3)?,
        value: row.get(4)?,
        unit: row.get(5)?,
        priority: row.get(6)?,
        detail: row.get(7)?,
        device_time: from_ms(row.get(8)?),
        received_at: from_ms(row.get(9)?),
        state: row.get(10)?,
        pkid: row.get(11)?,
        attempts: row.get(12)?,
        delivered_at: row.get::<_, Option<i64>>(13)?.map(from_ms),
        epoch: row.get(14)?,
        run: row.get(15)?,
        variant: row.get(16)?,
        late: row.get(17)?,
        restart: row.get(18)?,
        stored_at: row.get::<_, Option<i64>>(19)?.map(from_ms),
    })
}

/// Maps a row of [`NEXT_QUEUED`] or [`EXCHANGE_READINGS`].
pub(crate) fn queued_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Queued> {
    let priority: String = row.get(6)?;
    Ok(Queued {
        epoch: row.get(10)?,
        run: row.get(11)?,
        variant: row.get(12)?,
        late: row.get(13)?,
        restart: row.get(14)?,
        id: row.get(0)?,
        device: row.get(1)?,
        seq: row.get(2)?,
        kind: row.get(3)?,
        value: row.get(4)?,
        unit: row.get(5)?,
        priority: Priority::parse(&priority).unwrap_or(Priority::Routine),
        detail: row.get(7)?,
        device_time: from_ms(row.get(8)?),
        received_at: from_ms(row.get(9)?),
    })
}

fn is_corruption(e: &StoreError) -> bool {
    let source = match e {
        StoreError::Open { source, .. }
        | StoreError::Sql { source, .. }
        | StoreError::Encrypt { source, .. } => source,
        _ => return false,
    };
    matches!(
        source.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// What is damaged, when `e` (from opening the gateway's store) comes from
/// damage; else `e` back. SQLCipher answers a damaged page (other than the
/// first, which the key check reads) with a plain `SQLITE_ERROR`, so an
/// encrypted store's page HMACs are checked then.
fn damage(path: &Path, encryption: &Encryption, e: StoreError) -> Result<String, StoreError> {
    if is_corruption(&e) {
        return Ok(e.to_string());
    }
    if matches!(e, StoreError::Open { .. } | StoreError::Sql { .. })
        && cipher::on_disk(path)? == OnDisk::Encrypted
        // A writer: as it closes it removes the `-shm` a reader would leave.
        && let Ok((conn, true)) = cipher::connect(path, encryption, Access::Write)
        && let Ok(Some(pages)) = cipher::damaged_pages(&conn)
    {
        return Ok(format!("{e}: {pages}"));
    }
    Err(e)
}

/// Renames the database and its WAL/SHM files to `NAME.corrupt-TIME*`.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}{suffix}", aside.display()));
        if from.exists() {
            std::fs::rename(&from, &to).map_err(|e| StoreError::MoveAside {
                path: from.clone(),
                to: to.clone(),
                source: e,
            })?;
        }
    }
    Ok(aside)
}

pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) the database for writing and applies
    /// migrations. With encryption on, its key must exist: only `hearth
    /// run` makes one ([`Store::open_checked`]); a plain store opens as it
    /// is until `hearth run` encrypts it.
    pub fn open(path: &Path, encryption: &Encryption) -> Result<Store, StoreError> {
        let (conn, encrypted) = cipher::connect(path, encryption, Access::Write)?;
        Store::writer(conn, path, encrypted)
    }

    /// Configures a writable connection and migrates its schema.
    fn writer(conn: Connection, path: &Path, encrypted: bool) -> Result<Store, StoreError> {
        let mut store = Store {
            conn,
            path: path.to_owned(),
            encrypted,
            intake_limit: None,
            gap_wait: ingest::GAP_WAIT,
            alarm_for: DEVICE_ALARM,
            session: 0,
            qos: 2,
            encoding: "json",
        };
        store.configure().map_err(|e| store.err(e))?;
        // Every write transaction takes the write lock when it begins, so a
        // second writer (`hearth devices reset` beside a running gateway)
        // makes it wait out the busy timeout instead of failing it half way
        // (a deferred transaction that read before the other wrote cannot
        // upgrade).
        store
            .conn
            .set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        store.migrate()?;
        Ok(store)
    }

    /// Opens the gateway's database, as `hearth run` does at start. With
    /// encryption on it first makes the key of a new store (or of a plain
    /// one) beside it, if that is where the key belongs, and encrypts a
    /// plain store in place ([`cipher::encrypt_in_place`]). Then a `PRAGMA
    /// quick_check` (and, encrypted, the pages' HMACs): a damaged database
    /// is moved aside (never deleted) and a fresh one is created, with the
    /// same key; the second value is then the path it was moved to. A key
    /// that does not open the store is an error, never damage.
    pub fn open_checked(
        path: &Path,
        encryption: &Encryption,
    ) -> Result<(Store, Option<PathBuf>), StoreError> {
        let opened = Store::prepare(path, encryption).and_then(|()| {
            let store = Store::open(path, encryption)?;
            Ok(store.integrity()?.map_or(Ok(store), Err))
        });
        let problem = match opened {
            Ok(Ok(store)) => return Ok((store, None)),
            Ok(Err(problem)) => problem,
            Err(e) => damage(path, encryption, e)?,
        };
        let aside = move_aside(path)?;
        tracing::error!(
            damaged = %path.display(),
            moved_to = %aside.display(),
            %problem,
            "Database is damaged: moved aside, starting a fresh one. Its readings need an operator."
        );
        // A fresh store: its key too, if the damage came before it was made.
        Store::prepare(path, encryption)?;
        Ok((Store::open(path, encryption)?, Some(aside)))
    }

    /// The gateway's steps before its open: the key of a new or plain
    /// store (when hearth keeps it), and a plain store encrypted.
    fn prepare(path: &Path, encryption: &Encryption) -> Result<(), StoreError> {
        let Encryption::On(ring) = encryption else {
            return Ok(());
        };
        let found = cipher::on_disk(path)?;
        let key_err = |source| StoreError::Key {
            path: path.to_owned(),
            source,
        };
        if found != OnDisk::Encrypted
            && ring.can_create()
            && ring.load().map_err(key_err)?.is_none()
        {
            ring.create().map_err(key_err)?;
            tracing::info!(
                key = %ring.source(),
                "Store key generated (mode 0600): keep it with the store; without it the store cannot be read."
            );
        }
        if found == OnDisk::Plain {
            let loaded = ring
                .load()
                .map_err(key_err)?
                .ok_or_else(|| StoreError::KeyMissing {
                    path: path.to_owned(),
                    key: ring.source().path().to_owned(),
                })?;
            match cipher::encrypt_in_place(path, &loaded.key) {
                Ok(()) => tracing::info!(
                    store = %path.display(),
                    key = %ring.source(),
                    "Plain store encrypted in place: every reading kept."
                ),
                // No room for the encrypted copy: a gateway that stays down
                // takes no readings and forwards no alert, so it runs on the
                // plain store, as it was, and tries again at every start.
                Err(e) if cipher::is_full(&e) => tracing::error!(
                    store = %path.display(),
                    error = %e,
                    "Cannot encrypt the plain store in place: no room for its encrypted copy (about its size again). Running on it unencrypted; every start tries again. Free space beside it."
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `None` when the store checks out: `PRAGMA quick_check`, and for an
    /// encrypted store, when that fails or complains, the pages' HMACs
    /// (SQLCipher answers a damaged page with a plain `SQLITE_ERROR`).
    fn integrity(&self) -> Result<Option<String>, StoreError> {
        let checked = self.quick_check();
        if !self.encrypted || matches!(checked, Ok(None)) {
            return checked;
        }
        match cipher::damaged_pages(&self.conn).map_err(|e| self.err(e))? {
            Some(pages) => Ok(Some(pages)),
            None => checked,
        }
    }

    /// Changes the key of the encrypted store at `path` to `new`, where
    /// `ring` keeps it: `NAME.new` written durably first, then `PRAGMA
    /// rekey` (one transaction), the change recorded in the audit trail,
    /// the WAL checkpointed into the file (no page under the old key is
    /// left), and last `NAME.new` renamed over `NAME`. A crash at any step
    /// leaves a store that the old key or `NAME.new` opens, and the next
    /// open settles which ([`cipher::connect`]). The store must not be open
    /// elsewhere: a running gateway would be locked out, so that is refused
    /// ([`StoreError::InUse`]).
    pub fn rekey(
        path: &Path,
        ring: &Keyring,
        new: &Key,
        actor: &str,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        match cipher::on_disk(path)? {
            OnDisk::Fresh => return Err(StoreError::Missing(path.to_owned())),
            OnDisk::Plain => return Err(StoreError::NotEncrypted(path.to_owned())),
            OnDisk::Encrypted => {}
        }
        let key_err = |source| StoreError::Key {
            path: path.to_owned(),
            source,
        };
        if matches!(ring.source(), Source::Credential(_)) {
            return Err(key_err(KeyError::NotHere));
        }
        // A gateway holds the store's lock: the change would lock it out.
        let _lock = super::lock_store(path).map_err(|e| match e {
            StoreError::Locked(p) => StoreError::InUse(p),
            other => other,
        })?;
        let conn = cipher::open_for_rekey(path, ring)?;
        let store = Store::writer(conn, path, true)?;
        // `PRAGMA rekey` rewrites every page into the WAL: it needs about
        // the store's size free.
        let need = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(wal_of(path))
                .map(|m| m.len())
                .unwrap_or(0);
        if let Some(free) = free_bytes(path)
            && free < need + need / 10
        {
            return Err(StoreError::RekeyFailed {
                path: path.to_owned(),
                problem: format!(
                    "{free} bytes free beside it, and a key change needs about {need}"
                ),
            });
        }
        ring.write_pending(new).map_err(key_err)?;
        crate::failpoint::hit("rekey-pending-written");
        if let Err(e) = new.execute(&store.conn, "PRAGMA rekey = \"{key}\";") {
            let _ = ring.discard_pending();
            return Err(store.err(e));
        }
        // SQLCipher 4.6 answers OK even when rewriting the pages failed
        // (say, the disk filled) and it rolled back, while the connection
        // goes on with the new key. So nothing more is written on it: the
        // WAL is checkpointed into the file, the connection closed, and
        // the result judged on fresh connections.
        let busy: i64 = store
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| store.err(e))?;
        debug_assert_eq!(busy, 0, "the store is held exclusively");
        drop(store);
        if let Err(problem) = cipher::check_key(path, new) {
            let old = ring.load().map_err(key_err)?.map(|l| l.key);
            if let Some(old) = old
                && cipher::check_key(path, &old).is_ok()
            {
                let _ = ring.discard_pending();
                return Err(StoreError::RekeyFailed {
                    path: path.to_owned(),
                    problem,
                });
            }
            // Neither key reads every page: keep both files for an
            // operator; the next open tries each.
            return Err(StoreError::EncryptCheck {
                path: path.to_owned(),
                problem: format!(
                    "after the key change neither the old key nor the new one (kept as `NAME.new`) reads the whole store: {problem}"
                ),
            });
        }
        // The change stands; its record goes on a fresh connection with
        // the new key, before the key file changes (a crash from here on
        // leaves the record and `NAME.new`, which the next open puts in
        // place).
        let recorded = cipher::open_keyed(path, rusqlite::OpenFlags::default(), new, None, true)
            .map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: e,
            })
            .and_then(|(conn, _)| Store::writer(conn, path, true))
            .and_then(|mut s| s.audit(crate::audit::kind::STORE_REKEYED, actor, detail));
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "The key was changed, but the audit trail could not record it.");
        }
        crate::failpoint::hit("rekey-committed");
        ring.promote_pending().map_err(key_err)?;
        Ok(())
    }

    /// `None` when `PRAGMA quick_check` finds nothing wrong.
    pub fn quick_check(&self) -> Result<Option<String>, StoreError> {
        let lines: Vec<String> = self
            .conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        Ok((lines != ["ok"]).then(|| lines.join("; ")))
    }

    /// Caps the database file at `max_bytes` (`PRAGMA max_page_count`, so
    /// deletes still work at the cap) and keeps 10% of it for draining.
    pub fn set_size_cap(&mut self, max_bytes: u64) -> Result<(), StoreError> {
        // SQLCipher answers for an encrypted store, as text.
        let page_size: u64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| {
                let value = r.get_ref(0)?;
                value
                    .as_i64()
                    .ok()
                    .or_else(|| value.as_str().ok().and_then(|s| s.parse().ok()))
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or(rusqlite::Error::InvalidColumnType(
                        0,
                        "page_size".into(),
                        value.data_type(),
                    ))
            })
            .map_err(|e| self.err(e))?;
        let pages = (max_bytes / page_size).max(16);
        let set: u64 = self
            .conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        let reserve = ((set as f64 * (1.0 - INTAKE_SHARE)) as u64).max(MIN_RESERVE_PAGES);
        self.intake_limit = Some(set.saturating_sub(reserve));
        Ok(())
    }

    /// Pages in use (file pages less free ones).
    fn used_pages(&self) -> rusqlite::Result<u64> {
        let count: u64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: u64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok(count.saturating_sub(free))
    }

    /// True when new readings fit under the intake limit, after deleting
    /// the oldest delivered routine readings if needed. Readings not yet
    /// delivered, and alerts, are never deleted for space.
    fn make_room(&mut self) -> Result<bool, StoreError> {
        let Some(limit) = self.intake_limit else {
            return Ok(true);
        };
        if self.used_pages().map_err(|e| self.err(e))? < limit {
            return Ok(true);
        }
        // Oldest delivered routine readings first, never one delivered in
        // the last moments (its device might still resend it), never alerts.
        let before = to_ms(Utc::now()) - PRESSURE_PRUNE_MIN_AGE_MS;
        let pruned = self
            .prune(
                "(SELECT id FROM readings WHERE state = 'delivered' AND priority = 'routine'
                 AND delivered_at < ?1 ORDER BY id LIMIT ?2)",
                params![before, PRESSURE_PRUNE_ROWS],
            )
            .map_err(|e| self.err(e))?;
        let deleted_rejected = self
            .conn
            .execute(
                "DELETE FROM rejected_frames WHERE id IN
                 (SELECT id FROM rejected_frames ORDER BY id LIMIT ?1)",
                params![PRESSURE_PRUNE_ROWS],
            )
            .map_err(|e| self.err(e))?;
        // Last, what is left of pruned readings, oldest first: without it a
        // very late resend is stored again under the same id, which the
        // receiver drops as a duplicate. Never a loss.
        let mut forgotten = 0;
        if self.used_pages().map_err(|e| self.err(e))? >= limit {
            forgotten = self
                .conn
                .execute(
                    "DELETE FROM pruned WHERE (device, epoch, seq, run, variant) IN
                     (SELECT device, epoch, seq, run, variant FROM pruned
                      ORDER BY pruned_at LIMIT ?1)",
                    params![PRESSURE_PRUNE_ROWS],
                )
                .map_err(|e| self.err(e))?;
        }
        if pruned + deleted_rejected + forgotten > 0 {
            tracing::info!(
                pruned,
                deleted_rejected,
                forgotten,
                "Store near its size cap: oldest delivered readings, rejected frames and tombstones of pruned readings deleted before their retention ended."
            );
        }
        Ok(self.used_pages().map_err(|e| self.err(e))? < limit)
    }

    /// Opens an existing database read-only, for the CLI; safe while
    /// `hearth run` writes to it (WAL readers never block the writer).
    /// Needs the key, as [`Store::open`].
    pub fn open_read_only(path: &Path, encryption: &Encryption) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        Store::reader(path, encryption, cipher::on_disk(path)?)
    }

    /// A read-only connection beside this one (the gateway's report
    /// thread), to the store as this one found it.
    pub fn open_reader(&self, encryption: &Encryption) -> Result<Store, StoreError> {
        let found = if self.encrypted {
            OnDisk::Encrypted
        } else {
            OnDisk::Plain
        };
        Store::reader(&self.path, encryption, found)
    }

    fn reader(path: &Path, encryption: &Encryption, found: OnDisk) -> Result<Store, StoreError> {
        let (conn, encrypted) = cipher::connect_found(path, encryption, Access::Read, found)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .and_then(|()| conn.pragma_update(None, "cache_size", CACHE_KIB))
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Store {
            conn,
            path: path.to_owned(),
            encrypted,
            intake_limit: None,
            gap_wait: ingest::GAP_WAIT,
            alarm_for: DEVICE_ALARM,
            session: 0,
            qos: 2,
            encoding: "json",
        })
    }

    /// Whether the store is encrypted (SQLCipher).
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// Overrides [`ingest::GAP_WAIT`] (tests).
    pub fn set_gap_wait(&mut self, wait: std::time::Duration) {
        self.gap_wait = wait;
    }

    /// How long a device restart or seq conflict keeps its alarm.
    pub fn set_device_alarm(&mut self, period: std::time::Duration) {
        self.alarm_for = period;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection itself, for tests that must make a state the
    /// gateway's own calls cannot (a row deleted behind its back).
    #[cfg(test)]
    pub(crate) fn conn_for_tests(&self) -> &Connection {
        &self.conn
    }

    /// The connection, for the read-only views of the CLI
    /// ([`super::views`]); they map errors with [`Store::err`].
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn err(&self, source: rusqlite::Error) -> StoreError {
        if let rusqlite::Error::SqliteFailure(e, _) = &source
            && e.code == rusqlite::ErrorCode::DiskFull
        {
            return StoreError::Full {
                path: self.path.clone(),
            };
        }
        StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn configure(&self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        debug_assert_eq!(mode, "wal");
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        // A small box: 1 MiB of page cache (SQLite's default is 2 MiB per
        // connection). What the gateway reads again is the newest pages.
        self.conn.pragma_update(None, "cache_size", CACHE_KIB)?;
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len() as i64;
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if found > known {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found,
                known,
            });
        }
        for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction().map_err(|source| StoreError::Sql {
                path: self.path.clone(),
                source,
            })?;
            // Schema 2 brought content hashes: the readings stored before
            // get theirs in the same transaction, so that no later open
            // needs to look for one without (a scan of every reading).
            let backfill = |tx: &Connection| match *name {
                // 05 again: a store whose separate backfill (before 05)
                // never committed.
                "02-device-runs" | "05-journeys" => backfill_hashes(tx),
                _ => Ok(0),
            };
            let filled = tx
                .execute_batch(sql)
                .and_then(|()| backfill(&tx))
                .and_then(|n| {
                    tx.pragma_update(None, "user_version", (i + 1) as i64)
                        .map(|()| n)
                })
                .and_then(|n| tx.commit().map(|()| n))
                .map_err(|source| StoreError::Sql {
                    path: self.path.clone(),
                    source,
                })?;
            tracing::info!(migration = name, "Database migrated.");
            if filled > 0 {
                tracing::info!(
                    readings = filled,
                    "Content hashes computed for readings stored before schema 2."
                );
            }
        }
        Ok(())
    }
}

/// Readings stored before schema 2 have no content hash: computes it from
/// their columns, so that their resends are still recognised. Returns how
/// many got one.
fn backfill_hashes(tx: &Connection) -> rusqlite::Result<usize> {
    let rows: Vec<(i64, Reading)> = tx
        .prepare(
            "SELECT id, device, seq, kind, value, priority, detail, device_time
                     FROM readings WHERE hash IS NULL",
        )?
        .query_map([], |row| {
            let kind: String = row.get(3)?;
            let priority: String = row.get(5)?;
            Ok((
                row.get(0)?,
                Reading {
                    device_id: row.get(1)?,
                    epoch: None,
                    seq: row.get(2)?,
                    kind: Kind::parse(&kind).unwrap_or(Kind::HeartRate),
                    value: row.get(4)?,
                    priority: Priority::parse(&priority).unwrap_or(Priority::Routine),
                    detail: row.get(6)?,
                    device_time: from_ms(row.get(7)?),
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut set = tx.prepare("UPDATE readings SET hash = ?1 WHERE id = ?2")?;
    for (id, r) in &rows {
        set.execute(params![r.content_hash(), id])?;
    }
    Ok(rows.len())
}

impl Store {
    /// Commits a batch read from the serial port in one transaction: the
    /// readings (by the rules of [`super::ingest`]) and the rejected frames.
    /// Returns one outcome per reading, in input order. Resends are answered
    /// even when the store is full; the others then get [`Insert::Busy`] and
    /// the rejected frames are not kept.
    pub fn commit_serial(
        &mut self,
        port: &str,
        readings: &[Reading],
        rejected: &[RejectedFrame],
        now: DateTime<Utc>,
    ) -> Result<Vec<Insert>, StoreError> {
        // Each device's readings are taken in seq order, whatever order
        // they came in within this batch; outcomes keep the input order.
        let mut order: Vec<usize> = (0..readings.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&readings[a], &readings[b]);
            (&ra.device_id, ra.epoch_or_zero(), ra.seq).cmp(&(
                &rb.device_id,
                rb.epoch_or_zero(),
                rb.seq,
            ))
        });
        let resends = readings
            .iter()
            .map(|r| ingest::is_resend(&self.conn, r))
            .collect::<rusqlite::Result<Vec<bool>>>()
            .map_err(|e| self.err(e))?;
        let fresh = resends.iter().any(|resend| !resend) || !rejected.is_empty();
        let room = !fresh || self.make_room()?;
        let (gap_wait, alarm_for) = (self.gap_wait, self.alarm_for);
        let result = (|| {
            let tx = self.conn.transaction()?;
            let mut outcomes = vec![Insert::Busy; readings.len()];
            for &i in &order {
                let r = &readings[i];
                // Checked again: the same frame may come twice in one batch.
                outcomes[i] = if resends[i] || ingest::is_resend(&tx, r)? {
                    Insert::Duplicate
                } else if room {
                    ingest::take(&tx, r, now, gap_wait, alarm_for, port)?
                } else {
                    Insert::Busy
                };
            }
            if room {
                let mut reject = tx.prepare_cached(INSERT_REJECTED)?;
                for rej in rejected {
                    reject.execute(params![to_ms(now), port, rej.code, rej.detail, rej.raw])?;
                }
            }
            tx.commit()?;
            Ok(outcomes)
        })();
        match result.map_err(|e| self.err(e)) {
            // A disk that filled before the cap: resends are still ACKed.
            Err(StoreError::Full { .. }) if fresh => Ok(resends
                .iter()
                .map(|&resend| {
                    if resend {
                        Insert::Duplicate
                    } else {
                        Insert::Busy
                    }
                })
                .collect()),
            other => other,
        }
    }

    /// The alarms device states hold now (`device-restart`, `seq-conflict`).
    pub fn device_alarms(&self, now: DateTime<Utc>) -> Result<Vec<&'static str>, StoreError> {
        ingest::active_alarms(&self.conn, now).map_err(|e| self.err(e))
    }

    /// The oldest queued readings of one priority, at most `limit`.
    pub fn next_queued(&self, priority: Priority, limit: usize) -> Result<Vec<Queued>, StoreError> {
        let run = || -> rusqlite::Result<Vec<Queued>> {
            let mut stmt = self.conn.prepare_cached(NEXT_QUEUED)?;
            let rows = stmt.query_map(params![priority.as_str(), limit as i64], queued_row)?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Inside [`Store::in_transaction`]: whether SQLite has rolled the
    /// transaction back by itself (as it may on SQLITE_FULL), undoing what
    /// `f` did so far.
    pub fn rolled_back(&self) -> bool {
        self.conn.is_autocommit()
    }

    /// Runs `f` in one write transaction (one fsync at its COMMIT); rolled
    /// back if `f` fails. Store methods that record with savepoints
    /// ([`Store::begin_exchange`]) become part of it.
    pub fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        match f(self) {
            // SQLite itself rolled the transaction back (it may on
            // SQLITE_FULL); `f` saw that ([`Store::rolled_back`]).
            Ok(value) if self.conn.is_autocommit() => Ok(value),
            Ok(value) => {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(self.err(e));
                }
                Ok(value)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// The QoS and payload encoding (`json`, `cbor`) the publisher uses,
    /// for the journeys of the exchanges it begins.
    pub fn set_publish_profile(&mut self, qos: u8, encoding: &'static str) {
        self.qos = qos;
        self.encoding = encoding;
    }

    /// Records a new exchange and puts its readings in flight, in one
    /// transaction, with its journey ([`Store::begin_exchange_with`]
    /// without the payload's digest). Must return before the PUBLISH is
    /// written.
    pub fn begin_exchange(
        &mut self,
        pkid: u16,
        topic: &str,
        reading_ids: &[i64],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.begin_exchange_with(pkid, topic, reading_ids, now, None)
    }

    /// Records a new exchange and puts its readings in flight, in one
    /// transaction; with room for it, also its journey (`journeys`, the
    /// readings' lists of journeys, and `payload`'s size and digest). Must
    /// return before the PUBLISH is written.
    pub fn begin_exchange_with(
        &mut self,
        pkid: u16,
        topic: &str,
        reading_ids: &[i64],
        now: DateTime<Utc>,
        payload: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let (session, qos, encoding) = (self.session, self.qos, self.encoding);
        let journey = self.journeys_fit();
        let digest = payload.map(|p| (p.len() as i64, digest(p)));
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            // A savepoint: its own transaction, or a part of the caller's
            // ([`Store::in_transaction`]).
            let tx = conn.savepoint()?;
            tx.prepare_cached(
                "INSERT INTO exchanges (pkid, topic, stage, created_at, sent_count)
                 VALUES (?1, ?2, 'publish', ?3, 1)",
            )?
            .execute(params![pkid, topic, to_ms(now)])?;
            let exchange = tx.last_insert_rowid();
            let mut mark = tx.prepare_cached(if journey {
                MARK_INFLIGHT_JOURNEY
            } else {
                MARK_INFLIGHT
            })?;
            let mut marked = Vec::with_capacity(reading_ids.len());
            for id in reading_ids {
                if mark.execute(params![exchange, pkid, to_ms(now), id])? == 1 {
                    marked.push(*id);
                }
            }
            drop(mark);
            if journey {
                tx.prepare_cached(INSERT_JOURNEY)?.execute(params![
                    exchange,
                    pkid,
                    topic,
                    qos,
                    encoding,
                    super::views::journey::id_ranges(&marked),
                    to_ms(now),
                    format!("{session}P@{}", to_ms(now)),
                    digest.as_ref().map(|d| d.0),
                    digest.as_ref().map(|d| d.1.clone()),
                ])?;
            }
            tx.commit()
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Whether journeys are written now: not past the intake limit, where
    /// the room kept for draining is for the exchanges themselves (a
    /// journey's row grows at PUBREC, at a resend and at its end, and a
    /// write that does not fit would fail the exchange's own).
    fn journeys_fit(&self) -> bool {
        match self.intake_limit {
            None => true,
            Some(limit) => self.used_pages().is_ok_and(|used| used < limit),
        }
    }

    /// Records that PUBREC arrived: from now on the exchange is resumed with
    /// PUBREL. Must return before the PUBREL is written. Returns false when no
    /// exchange has this packet id.
    pub fn exchange_released(&mut self, pkid: u16) -> Result<bool, StoreError> {
        Ok(self.exchanges_released(&[pkid])?[0])
    }

    /// [`Store::exchange_released`] for several PUBRECs in one transaction
    /// (one fsync): whether each exchange was found.
    pub fn exchanges_released(&mut self, pkids: &[u16]) -> Result<Vec<bool>, StoreError> {
        let journey = self.journeys_fit();
        let run = |conn: &mut Connection| -> rusqlite::Result<Vec<bool>> {
            let tx = conn.transaction()?;
            let found = {
                let mut update =
                    tx.prepare_cached("UPDATE exchanges SET stage = 'release' WHERE pkid = ?1")?;
                let mut pubrec = tx.prepare_cached(
                    "UPDATE journeys SET pubrec_at = ?2
                     WHERE id = (SELECT id FROM exchanges WHERE pkid = ?1) AND pubrec_at IS NULL",
                )?;
                let now = to_ms(Utc::now());
                pkids
                    .iter()
                    .map(|p| {
                        let found = update.execute(params![p])? == 1;
                        if found && journey {
                            pubrec.execute(params![p, now])?;
                        }
                        Ok(found)
                    })
                    .collect::<rusqlite::Result<Vec<bool>>>()?
            };
            tx.commit()?;
            Ok(found)
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// PUBCOMP arrived: the readings of the exchange are delivered and the
    /// packet id is free again. Returns how many readings were delivered.
    /// A PUBCOMP for an exchange not yet past PUBREC changes nothing.
    pub fn complete_exchange(
        &mut self,
        pkid: u16,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        self.complete_exchanges(&[pkid], now)
    }

    /// [`Store::complete_exchange`] for several PUBCOMPs in one
    /// transaction, which is not synced (`synchronous=NORMAL` for it alone,
    /// see the module documentation): a power loss may undo it, and the
    /// exchanges are then finished again with PUBREL. The next synced
    /// commit (any other write) makes it durable too: the WAL is written in
    /// order, so a packet id is never handed out again before its
    /// completion is on disk.
    pub fn complete_exchanges(
        &mut self,
        pkids: &[u16],
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let journey = self.journeys_fit();
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction()?;
            let mut total = 0;
            for pkid in pkids {
                let exchange: Option<i64> = tx
                    .prepare_cached(
                        "SELECT id FROM exchanges WHERE pkid = ?1 AND stage = 'release'",
                    )?
                    .query_row(params![pkid], |r| r.get(0))
                    .optional()?;
                let Some(exchange) = exchange else {
                    continue;
                };
                total += close_delivered(&tx, journey, exchange, now, "delivered")?;
            }
            if total > 0 {
                tx.prepare_cached(
                    "INSERT INTO gateway_state (key, value) VALUES ('last_delivery', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![to_ms(now).to_string()])?;
            }
            tx.commit()?;
            Ok(total)
        };
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| self.err(e))?;
        let result = run(&mut self.conn);
        if let Err(e) = self.conn.pragma_update(None, "synchronous", "FULL") {
            // Every later commit would go unsynced (an ACK before its
            // fsync): this connection must not be used again.
            tracing::error!(error = %e, "Cannot restore synchronous=FULL on the store; stopping.");
            return Err(StoreError::Closed);
        }
        result.map_err(|e| self.err(e))
    }

    /// Completes the exchange `pkid` in stage `publish` on the broker's
    /// PUBACK: QoS 1, or a QoS 2 PUBLISH that a broker without QoS 2 took
    /// at QoS 1. Its readings are delivered (at least once); returns how
    /// many.
    pub fn acknowledge_exchange(
        &mut self,
        pkid: u16,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let journey = self.journeys_fit();
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction()?;
            let exchange: Option<i64> = tx
                .prepare_cached("SELECT id FROM exchanges WHERE pkid = ?1 AND stage = 'publish'")?
                .query_row(params![pkid], |r| r.get(0))
                .optional()?;
            let Some(exchange) = exchange else {
                return Ok(0);
            };
            let n = close_delivered(&tx, journey, exchange, now, "acknowledged")?;
            tx.prepare_cached(
                "INSERT INTO gateway_state (key, value) VALUES ('last_delivery', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![to_ms(now).to_string()])?;
            tx.commit()?;
            Ok(n)
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Ends the exchange `pkid` that the broker refused (an MQTT 5 reason
    /// code of 0x80 or more on PUBREC or PUBACK): the broker holds nothing
    /// of it, so its readings are queued again, in their old order, and the
    /// exchange is deleted. Returns how many readings were queued again.
    pub fn exchange_refused(&mut self, pkid: u16) -> Result<usize, StoreError> {
        self.requeue_exchange(pkid, "publish", false)
    }

    /// Queues again the readings of the exchange `pkid` past PUBREC, whose
    /// PUBREL the broker did not know (MQTT 5 PUBCOMP 0x92): delivered or
    /// lost, nobody can tell, so they go again under their ids (counted
    /// with the lost sessions' requeues). Returns how many.
    pub fn requeue_released(&mut self, pkid: u16) -> Result<usize, StoreError> {
        self.requeue_exchange(pkid, "release", true)
    }

    /// Deletes the exchange `pkid` in `stage` and queues its readings
    /// again, in one transaction; `counted` adds them to
    /// `requeued_after_lost_session`.
    fn requeue_exchange(
        &mut self,
        pkid: u16,
        stage: &str,
        counted: bool,
    ) -> Result<usize, StoreError> {
        let journey = self.journeys_fit();
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction()?;
            let exchange: Option<i64> = tx
                .prepare_cached("SELECT id FROM exchanges WHERE pkid = ?1 AND stage = ?2")?
                .query_row(params![pkid, stage], |r| r.get(0))
                .optional()?;
            let Some(exchange) = exchange else {
                return Ok(0);
            };
            let n = tx
                .prepare_cached(
                    "UPDATE readings SET state = 'queued', exchange_id = NULL WHERE exchange_id = ?1",
                )?
                .execute(params![exchange])?;
            let outcome = if stage == "publish" {
                "refused"
            } else {
                "requeued"
            };
            end_journey(&tx, journey, exchange, to_ms(Utc::now()), outcome)?;
            tx.prepare_cached("DELETE FROM exchanges WHERE id = ?1")?
                .execute(params![exchange])?;
            if counted {
                count_requeued(&tx, n)?;
            }
            tx.commit()?;
            Ok(n)
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// The topic of the open exchange `pkid`.
    pub fn exchange_topic(&self, pkid: u16) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT topic FROM exchanges WHERE pkid = ?1")
            .and_then(|mut st| st.query_row(params![pkid], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    /// Counts a re-sent PUBLISH or PUBREL of an open exchange.
    /// Counts a re-sent PUBLISH or PUBREL of an open exchange and, with
    /// room for it, adds the send (connection, packet, time) to its journey
    /// (the first 40 or so), in one transaction.
    pub fn exchange_resent(&mut self, pkid: u16) -> Result<(), StoreError> {
        let journey = self.journeys_fit();
        let send = |packet: &str| format!(",{}{packet}@{}", self.session, to_ms(Utc::now()));
        let (publish, release) = (send("P"), send("R"));
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.prepare_cached("UPDATE exchanges SET sent_count = sent_count + 1 WHERE pkid = ?1")?
                .execute(params![pkid])?;
            if journey {
                tx.prepare_cached(
                    "UPDATE journeys SET sends = sends || (SELECT CASE stage
                       WHEN 'release' THEN ?3 ELSE ?2 END FROM exchanges WHERE pkid = ?1)
                     WHERE id = (SELECT id FROM exchanges WHERE pkid = ?1)
                     AND length(sends) < 1000",
                )?
                .execute(params![pkid, publish, release])?;
            }
            tx.commit()
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Every open exchange, oldest first, with its readings.
    pub fn open_exchanges(&self) -> Result<Vec<Exchange>, StoreError> {
        let run = || -> rusqlite::Result<Vec<Exchange>> {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT id, pkid, topic, stage FROM exchanges ORDER BY id")?;
            let rows: Vec<(i64, u16, String, String)> = stmt
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut members = self.conn.prepare_cached(EXCHANGE_READINGS)?;
            rows.into_iter()
                .map(|(id, pkid, topic, stage)| {
                    let readings = members
                        .query_map(params![id], queued_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(Exchange {
                        pkid,
                        topic,
                        readings,
                        released: stage == "release",
                    })
                })
                .collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Records, before a CONNECT is written, that its CONNACK is not yet
    /// seen, and raises the session counter (the will carries it). Returns
    /// the new session number and whether an earlier CONNECT's CONNACK was
    /// never seen (the process died or the link broke in between).
    pub fn begin_connect(&mut self) -> Result<(u64, bool), StoreError> {
        let run = |conn: &mut Connection| -> rusqlite::Result<(u64, bool)> {
            let tx = conn.transaction()?;
            let get = |key: &str| -> rusqlite::Result<Option<String>> {
                tx.prepare_cached("SELECT value FROM gateway_state WHERE key = ?1")?
                    .query_row(params![key], |r| r.get(0))
                    .optional()
            };
            let unseen = get(CONNECT_PENDING)?.is_some();
            let session = get("session")?
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            let mut set = tx.prepare_cached(UPSERT_STATE)?;
            set.execute(params!["session", session.to_string()])?;
            set.execute(params![CONNECT_PENDING, session.to_string()])?;
            drop(set);
            tx.commit()?;
            Ok((session, unseen))
        };
        let (session, unseen) = run(&mut self.conn).map_err(|e| self.err(e))?;
        self.session = session;
        Ok((session, unseen))
    }

    /// Settles the open exchanges once CONNACK is seen, in one transaction
    /// with clearing the pending-CONNECT record; returns how many readings
    /// were queued again.
    ///
    /// - [`Connack::Reset`] (our own clean session) and [`Connack::Absent`]:
    ///   every open exchange is void; its readings are queued again (the
    ///   receiver deduplicates by reading id).
    /// - [`Connack::Present`] after an earlier CONNECT whose CONNACK was never
    ///   seen: that CONNECT may have met a broker without our session and
    ///   made an empty one, which answers any PUBREL with PUBCOMP; MQTT 3.1.1
    ///   cannot tell that from our own session, and a broker that lost a
    ///   session once may do it the first time. Exchanges past PUBREC
    ///   therefore keep their ids (to be released, so no id is reused while
    ///   the broker may hold it) but their readings are queued again: a
    ///   possible duplicate (same reading id), never a loss.
    pub fn settle_connack(
        &mut self,
        connack: Connack,
        earlier_unseen: bool,
    ) -> Result<usize, StoreError> {
        let journey = self.journeys_fit();
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.savepoint()?;
            let n = match connack {
                Connack::Reset | Connack::Absent => {
                    if journey {
                        tx.execute(
                            "UPDATE journeys SET ended_at = ?1, outcome = 'requeued'
                             WHERE id IN (SELECT id FROM exchanges) AND outcome IS NULL",
                            params![to_ms(Utc::now())],
                        )?;
                    }
                    let n = tx.execute(
                        "UPDATE readings SET state = 'queued', exchange_id = NULL WHERE state = 'inflight'",
                        [],
                    )?;
                    tx.execute("DELETE FROM exchanges", [])?;
                    n
                }
                // The exchange goes on (its PUBREL is owed) and its journey
                // with it: a PUBCOMP then shows it delivered, and the
                // readings' next journey a possible duplicate.
                Connack::Present if earlier_unseen => tx.execute(
                    "UPDATE readings SET state = 'queued', exchange_id = NULL WHERE exchange_id IN
                     (SELECT id FROM exchanges WHERE stage = 'release')",
                    [],
                )?,
                Connack::Present => 0,
            };
            if n > 0 && connack != Connack::Reset {
                count_requeued(&tx, n)?;
                tx.prepare_cached(UPSERT_STATE)?.execute(params![
                    "last_lost_session",
                    Utc::now().timestamp_millis().to_string()
                ])?;
            }
            tx.execute(
                "DELETE FROM gateway_state WHERE key = ?1",
                params![CONNECT_PENDING],
            )?;
            tx.commit()?;
            Ok(n)
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Clears the pending-CONNECT record after a CONNACK that refused us (no
    /// session was touched), unless an earlier CONNECT's CONNACK was never
    /// seen: that doubt stays until a CONNACK settles it.
    pub fn connect_refused(&mut self, earlier_unseen: bool) -> Result<(), StoreError> {
        if earlier_unseen {
            return Ok(());
        }
        self.conn
            .execute(
                "DELETE FROM gateway_state WHERE key = ?1",
                params![CONNECT_PENDING],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Appends a security event to the audit trail ([`crate::audit`]).
    pub fn audit(
        &mut self,
        kind: &str,
        actor: &str,
        detail: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        let run = |conn: &mut Connection| -> rusqlite::Result<i64> {
            // IMMEDIATE: a CLI appending beside the gateway takes the next
            // id in turn, never the same one.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let id = crate::audit::append(&tx, Utc::now(), kind, actor, detail)?;
            tx.commit()?;
            Ok(id)
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// The audit trail's entries at or after `since`, oldest first.
    pub fn audit_entries(
        &self,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<crate::audit::Entry>, StoreError> {
        crate::audit::list(&self.conn, since).map_err(|e| self.err(e))
    }

    /// Checks the audit trail's hash chain.
    pub fn audit_verify(&self) -> Result<crate::audit::Verdict, StoreError> {
        crate::audit::verify(&self.conn).map_err(|e| self.err(e))
    }

    pub fn set_state(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO gateway_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute(params![key, value]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub fn state(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT value FROM gateway_state WHERE key = ?1")
            .and_then(|mut s| s.query_row(params![key], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    pub fn counts(&self) -> Result<Counts, StoreError> {
        let run = || -> rusqlite::Result<Counts> {
            let mut c = Counts::default();
            let mut stmt = self.conn.prepare_cached(
                "SELECT state, priority, count(*) FROM readings GROUP BY state, priority",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let state: String = row.get(0)?;
                let priority: String = row.get(1)?;
                let n: u64 = row.get(2)?;
                match (state.as_str(), priority.as_str()) {
                    ("queued", "alert") => c.queued_alert += n,
                    ("queued", _) => c.queued_routine += n,
                    ("inflight", _) => c.inflight += n,
                    _ => c.delivered += n,
                }
            }
            c.rejected_frames =
                self.conn
                    .query_row("SELECT count(*) FROM rejected_frames", [], |r| r.get(0))?;
            c.oldest_queued = self
                .conn
                .query_row(
                    "SELECT min(received_at) FROM readings WHERE state = 'queued'",
                    [],
                    |r| r.get::<_, Option<i64>>(0),
                )?
                .map(from_ms);
            c.last_received = self
                .conn
                .query_row("SELECT max(received_at) FROM readings", [], |r| {
                    r.get::<_, Option<i64>>(0)
                })?
                .map(from_ms);
            Ok(c)
        };
        let mut c = run().map_err(|e| self.err(e))?;
        c.last_delivered = self
            .state("last_delivery")?
            .and_then(|v| v.parse().ok())
            .map(from_ms);
        Ok(c)
    }

    /// When each device was last heard, newest first. Reads the small
    /// `device_runs` table, never the readings.
    pub fn last_heard(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let run = || -> rusqlite::Result<Vec<(String, DateTime<Utc>)>> {
            let mut stmt = self.conn.prepare_cached(
                "SELECT device, max(last_heard) AS t FROM device_runs
                 WHERE last_heard IS NOT NULL GROUP BY device ORDER BY t DESC",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, from_ms(r.get(1)?))))?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Every device, at its newest epoch, for `hearth devices`; counters
    /// add up over all its epochs.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let run = || -> rusqlite::Result<Vec<DeviceRow>> {
            let mut stmt = self.conn.prepare(
                "SELECT d.device, d.epoch, d.run, d.high, t.heard, d.gap_missing, d.gap_since,
                 t.stored, t.late, t.restarts, t.conflicts, t.attention, t.until
                 FROM device_runs d JOIN (SELECT device, max(epoch) AS epoch,
                   max(last_heard) AS heard, sum(stored) AS stored, sum(late) AS late,
                   sum(restarts) AS restarts, sum(conflicts) AS conflicts,
                   max(attention) AS attention, max(attention_until) AS until
                   FROM device_runs GROUP BY device) t
                 ON d.device = t.device AND d.epoch = t.epoch ORDER BY d.device",
            )?;
            let now = to_ms(Utc::now());
            let rows = stmt.query_map([], |row| {
                let until: Option<i64> = row.get(12)?;
                let active = until.is_some_and(|u| u > now);
                Ok(DeviceRow {
                    device: row.get(0)?,
                    epoch: row.get(1)?,
                    run: row.get(2)?,
                    high: row.get(3)?,
                    last_heard: row.get::<_, Option<i64>>(4)?.map(from_ms),
                    gap_missing: row.get(5)?,
                    gap_since: row.get::<_, Option<i64>>(6)?.map(from_ms),
                    stored: row.get(7)?,
                    late: row.get(8)?,
                    restarts: row.get(9)?,
                    conflicts: row.get(10)?,
                    alarm: if active { row.get(11)? } else { None },
                    alarm_until: if active { until.map(from_ms) } else { None },
                })
            })?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// An operator's reset of one device (`hearth devices reset`): its
    /// newest epoch starts a new run with its next reading, whatever its seq
    /// (no restart is detected for it), its gap is forgotten and its alarm
    /// cleared. Readings already stored are untouched. Recorded in
    /// `operator_actions`. Returns the new run, or `None` for an unknown
    /// device.
    pub fn reset_device(&mut self, device: &str, why: &str) -> Result<Option<u32>, StoreError> {
        let run = |conn: &mut Connection| -> rusqlite::Result<Option<u32>> {
            let tx = conn.transaction()?;
            let epoch: Option<u32> = tx.query_row(
                "SELECT max(epoch) FROM device_runs WHERE device = ?1",
                params![device],
                |r| r.get(0),
            )?;
            let Some(epoch) = epoch else {
                return Ok(None);
            };
            let new_run: u32 = tx.query_row(
                "UPDATE device_runs SET run = run + 1, frontier = NULL, start = NULL, start_time = NULL,
                 high = NULL, high_alert = NULL, high_routine = NULL, gap_missing = NULL,
                 gap_since = NULL
                 WHERE device = ?1 AND epoch = ?2 RETURNING run",
                params![device, epoch],
                |r| r.get(0),
            )?;
            tx.execute(
                "UPDATE device_runs SET attention = NULL, attention_until = NULL
                 WHERE device = ?1",
                params![device],
            )?;
            tx.execute(
                "INSERT INTO operator_actions (at, action, device, detail)
                 VALUES (?1, 'device-reset', ?2, ?3)",
                params![to_ms(Utc::now()), device, why],
            )?;
            tx.commit()?;
            Ok(Some(new_run))
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    pub fn list(&self, filter: &ListFilter) -> Result<Vec<ReadingRow>, StoreError> {
        let (sql, args) = list_query(filter);
        let run = || -> rusqlite::Result<Vec<ReadingRow>> {
            let mut stmt = self.conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), reading_row)?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Frames the decoder refused, oldest first: received since `since`, at
    /// most `limit` (the newest, when limited).
    pub fn rejected(
        &self,
        since: Option<DateTime<Utc>>,
        limit: Option<u64>,
    ) -> Result<Vec<RejectedRow>, StoreError> {
        let run = || -> rusqlite::Result<Vec<RejectedRow>> {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, received_at, port, reason, detail, raw FROM (
                   SELECT * FROM rejected_frames WHERE received_at >= ?1
                   ORDER BY received_at DESC, id DESC LIMIT ?2)
                 ORDER BY received_at, id",
            )?;
            let since = since.map_or(i64::MIN, to_ms);
            let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
            let rows = stmt.query_map(params![since, limit], |row| {
                Ok(RejectedRow {
                    id: row.get(0)?,
                    received_at: from_ms(row.get(1)?),
                    port: row.get(2)?,
                    reason: row.get(3)?,
                    detail: row.get(4)?,
                    raw: row.get(5)?,
                })
            })?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Deletes delivered readings delivered before `before` (leaving their
    /// key and hash in `pruned`), rejected frames received before it, and
    /// what `pruned` holds of readings pruned before it; never touches a
    /// reading that is queued or in flight.
    pub fn prune_delivered(&mut self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let (n, more) = self.prune_delivered_chunk(before, PRUNE_CHUNK)?;
            total += n;
            if !more {
                return Ok(total);
            }
        }
    }

    /// One bounded step of [`Store::prune_delivered`]: at most `limit` rows
    /// of each table, in one short transaction, so that a prune of weeks of
    /// readings never holds the store thread (and the watchdog) for long.
    /// Returns the readings deleted and whether more may be left.
    pub fn prune_delivered_chunk(
        &mut self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<(usize, bool), StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let run = |store: &mut Store| -> rusqlite::Result<(usize, bool)> {
            let n = store.prune(
                "(SELECT id FROM readings WHERE state = 'delivered' AND delivered_at < ?1
                  ORDER BY delivered_at LIMIT ?2)",
                params![to_ms(before), limit],
            )?;
            let frames = store.conn.execute(
                "DELETE FROM rejected_frames WHERE rowid IN
                 (SELECT rowid FROM rejected_frames WHERE received_at < ?1 LIMIT ?2)",
                params![to_ms(before), limit],
            )?;
            let tombstones = store.conn.execute(
                "DELETE FROM pruned WHERE (device, epoch, seq, run, variant) IN
                 (SELECT device, epoch, seq, run, variant FROM pruned
                  WHERE pruned_at < ?1 LIMIT ?2)",
                params![to_ms(before), limit],
            )?;
            let full = |k: usize| i64::try_from(k).unwrap_or(i64::MAX) >= limit;
            Ok((n, full(n) || full(frames) || full(tombstones)))
        };
        run(self).map_err(|e| self.err(e))
    }

    /// Deletes the readings `ids` selects (a parenthesised query over
    /// `params`), leaving a tombstone of each in `pruned`, in one
    /// transaction. Deletes first, so a store at its cap can still prune.
    /// Returns how many were deleted.
    fn prune(&mut self, ids: &str, params: &[&dyn rusqlite::ToSql]) -> rusqlite::Result<usize> {
        let now = to_ms(Utc::now());
        let tx = self.conn.transaction()?;
        let mut journeys: Vec<i64> = Vec::new();
        let gone: Vec<(String, u32, u32, u32, u32, Option<i64>)> = tx
            .prepare(&format!(
                "DELETE FROM readings WHERE id IN {ids}
                 RETURNING device, epoch, seq, run, variant, hash, journeys"
            ))?
            .query_map(params, |r| {
                let listed: Option<String> = r.get(6)?;
                journeys.extend(
                    listed
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|j| j.parse::<i64>().ok()),
                );
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut keep = tx.prepare_cached(TOMBSTONE)?;
        for (device, epoch, seq, run, variant, hash) in &gone {
            keep.execute(params![device, epoch, seq, run, variant, hash, now])?;
        }
        drop(keep);
        // Their journeys go with them (the readings of one exchange are
        // delivered, so pruned, together).
        journeys.sort_unstable();
        journeys.dedup();
        let mut forget = tx.prepare_cached("DELETE FROM journeys WHERE id = ?1")?;
        for j in &journeys {
            forget.execute(params![j])?;
        }
        drop(forget);
        let n = gone.len();
        tx.commit()?;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A reading of device `PM-1` (a shock for an alert, a heart rate
    /// otherwise); the ingest tests share it.
    pub(crate) fn reading(seq: u32, priority: Priority) -> Reading {
        Reading {
            device_id: "PM-1".into(),
            epoch: None,
            seq,
            device_time: from_ms(1_700_000_000_000 + seq as i64),
            kind: if priority == Priority::Alert {
                Kind::ShockDelivered
            } else {
                Kind::HeartRate
            },
            value: 70.0,
            priority,
            detail: None,
        }
    }

    pub(crate) fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = open_at(&dir.path().join("t.db"));
        (dir, store)
    }

    /// The store at `path`, encrypted as `hearth run` makes it (its key
    /// generated beside it on first use).
    pub(crate) fn open_at(path: &Path) -> Store {
        Store::open_checked(path, &Encryption::beside(path))
            .unwrap()
            .0
    }

    #[test]
    fn reading_is_delivered_only_on_pubcomp() {
        let (_dir, mut store) = open();
        let now = Utc::now();
        store
            .commit_serial(
                "p",
                &[reading(1, Priority::Routine), reading(2, Priority::Alert)],
                &[],
                now,
            )
            .unwrap();
        let alerts = store.next_queued(Priority::Alert, 10).unwrap();
        assert_eq!(alerts.len(), 1);
        store.begin_exchange(7, "t", &[alerts[0].id], now).unwrap();
        assert_eq!(store.counts().unwrap().inflight, 1);
        assert!(store.exchange_released(7).unwrap());
        let open = store.open_exchanges().unwrap();
        assert_eq!(open.len(), 1);
        assert!(open[0].released);
        assert_eq!(store.counts().unwrap().delivered, 0);
        assert_eq!(store.complete_exchange(7, now).unwrap(), 1);
        assert_eq!(store.counts().unwrap().delivered, 1);
        assert!(store.open_exchanges().unwrap().is_empty());
        // A second PUBCOMP for the same packet id changes nothing.
        assert_eq!(store.complete_exchange(7, now).unwrap(), 0);
    }

    #[test]
    fn lost_session_requeues_inflight_readings() {
        let (_dir, mut store) = open();
        let now = Utc::now();
        store
            .commit_serial("p", &[reading(1, Priority::Routine)], &[], now)
            .unwrap();
        let q = store.next_queued(Priority::Routine, 10).unwrap();
        store.begin_exchange(1, "t", &[q[0].id], now).unwrap();
        assert_eq!(store.settle_connack(Connack::Absent, false).unwrap(), 1);
        assert_eq!(store.next_queued(Priority::Routine, 10).unwrap().len(), 1);
        assert!(store.open_exchanges().unwrap().is_empty());
    }

    #[test]
    fn unseen_connack_requeues_only_released_exchanges_and_keeps_their_ids() {
        // From the very first missed CONNACK: no broker is trusted to have
        // kept the session (issue 6, Found 9).
        let (_dir, mut store) = open();
        let now = Utc::now();
        store
            .commit_serial(
                "p",
                &[reading(1, Priority::Routine), reading(2, Priority::Routine)],
                &[],
                now,
            )
            .unwrap();
        let q = store.next_queued(Priority::Routine, 10).unwrap();
        store.begin_exchange(1, "t", &[q[0].id], now).unwrap();
        store.begin_exchange(2, "t", &[q[1].id], now).unwrap();
        store.exchange_released(2).unwrap();
        // Seen CONNACKs: the session is ours, nothing moves.
        assert_eq!(store.settle_connack(Connack::Present, false).unwrap(), 0);
        assert_eq!(store.settle_connack(Connack::Present, true).unwrap(), 1);
        // Both ids stay open (one to resend, one to release)...
        assert_eq!(store.open_exchanges().unwrap().len(), 2);
        // ...but the released one's reading goes out again under a new id.
        let again = store.next_queued(Priority::Routine, 10).unwrap();
        assert_eq!(again.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
        assert_eq!(store.complete_exchange(2, now).unwrap(), 0);
    }

    #[test]
    fn pubcomp_before_pubrec_is_not_a_delivery() {
        let (_dir, mut store) = open();
        let now = Utc::now();
        store
            .commit_serial("p", &[reading(1, Priority::Routine)], &[], now)
            .unwrap();
        let q = store.next_queued(Priority::Routine, 10).unwrap();
        store.begin_exchange(5, "t", &[q[0].id], now).unwrap();
        assert_eq!(store.complete_exchange(5, now).unwrap(), 0);
        assert_eq!(store.open_exchanges().unwrap().len(), 1);
        assert_eq!(store.counts().unwrap().delivered, 0);
    }

    #[test]
    fn a_schema_1_store_is_migrated_and_its_readings_still_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let r = |seq| reading(seq, Priority::Routine);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0].1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            for seq in [1, 2] {
                conn.execute(
                    "INSERT INTO readings (device, seq, kind, value, unit, priority, detail,
                     device_time, received_at) VALUES ('PM-1', ?1, 'heart_rate', 70.0, 'bpm',
                     'routine', NULL, ?2, 0)",
                    params![seq, to_ms(r(seq).device_time)],
                )
                .unwrap();
            }
            // Readings 3 to 10 were delivered and deleted by hearth 0.1.
            conn.execute("INSERT INTO devices VALUES ('PM-1', 10)", [])
                .unwrap();
        }
        let mut store = Store::open(&path, &Encryption::Off).unwrap();
        let now = Utc::now();
        // A resend of a reading stored by hearth 0.1 is still a resend, and
        // the count goes on where it was.
        assert_eq!(
            store.commit_serial("p", &[r(2), r(11)], &[], now).unwrap(),
            [Insert::Duplicate, Insert::Stored(crate::outbox::Flag::None)]
        );
        let device = &store.devices().unwrap()[0];
        assert_eq!((device.high, device.run), (Some(11), 0));
        // A seq hearth 0.1 had used and deleted: the device counts again.
        let mut again = r(5);
        again.value = 99.0;
        assert_eq!(
            store.commit_serial("p", &[again], &[], now).unwrap(),
            [Insert::Stored(crate::outbox::Flag::Restart)]
        );
        assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 4);
    }

    #[test]
    fn session_counter_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        assert_eq!(open_at(&path).begin_connect().unwrap(), (1, false));
        // The first CONNACK was never settled: the second attempt knows.
        assert_eq!(open_at(&path).begin_connect().unwrap(), (2, true));
        let mut store = open_at(&path);
        store.settle_connack(Connack::Present, true).unwrap();
        assert_eq!(store.begin_connect().unwrap(), (3, false));
    }

    #[test]
    fn queue_query_uses_its_index() {
        let (_dir, store) = open();
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {NEXT_QUEUED}"))
            .unwrap()
            .query_map(params!["routine", 10], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|l| l.contains("readings_queue")),
            "plan: {plan:?}"
        );
    }
}
