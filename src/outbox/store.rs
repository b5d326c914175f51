//! The SQLite outbox: every reading the gateway ACKed, and every open MQTT
//! QoS 2 exchange.
//!
//! Guarantees, in the order the pipeline relies on them:
//! - The database runs in WAL mode with `synchronous=FULL`: a transaction
//!   that returned is on disk and survives a process crash or power loss.
//! - A reading is committed before the device gets its ACK
//!   ([`Store::commit_serial`] returns only after COMMIT). It is unique on
//!   (device, seq): a resent frame is reported `Duplicate` and ACKed again.
//! - An exchange row (packet id, topic, stage `publish`; its readings point
//!   to it, and its payload is rebuilt from them byte for byte) is committed
//!   before its PUBLISH is written ([`Store::begin_exchange`]); it moves to
//!   stage `release` before its PUBREL is written ([`Store::exchange_released`]);
//!   its readings become `delivered` only in the transaction that deletes it
//!   on PUBCOMP ([`Store::complete_exchange`]). A packet id is therefore never
//!   reused while the broker may still hold it.
//! - Rejected frames are kept with their raw bytes: nothing a device sent
//!   disappears silently.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::serial::frame::{Priority, Reading, Rejected};

/// Schema migrations, applied in order; `PRAGMA user_version` counts them.
const MIGRATIONS: &[(&str, &str)] = &[(
    "01-initial",
    include_str!("../../migrations/01-initial/up.sql"),
)];

const INSERT_READING: &str = "INSERT INTO readings
    (device, seq, kind, value, unit, priority, detail, device_time, received_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
    ON CONFLICT (device, seq) DO NOTHING";
const SAME_READING: &str = "SELECT kind = ?3 AND value = ?4 AND priority = ?5
    AND detail IS ?6 AND device_time = ?7 FROM readings WHERE device = ?1 AND seq = ?2";
const GET_FRONTIER: &str = "SELECT frontier FROM devices WHERE device = ?1";
const SET_FRONTIER: &str = "INSERT INTO devices (device, frontier) VALUES (?1, ?2)
    ON CONFLICT (device) DO UPDATE SET frontier = excluded.frontier";
const HAS_SEQ: &str = "SELECT 1 FROM readings WHERE device = ?1 AND seq = ?2";
const INSERT_REJECTED: &str = "INSERT INTO rejected_frames
    (received_at, port, reason, detail, raw) VALUES (?1, ?2, ?3, ?4, ?5)";
const NEXT_QUEUED: &str = "SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at FROM readings
    WHERE state = 'queued' AND priority = ?1 ORDER BY id LIMIT ?2";
const UPSERT_STATE: &str = "INSERT INTO gateway_state (key, value) VALUES (?1, ?2)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// Set once the broker was seen to lose our session.
const LOSES_SESSIONS: &str = "broker_loses_sessions";
/// Present while a CONNECT was written whose CONNACK is not yet settled.
const CONNECT_PENDING: &str = "connect_pending";
const EXCHANGE_READINGS: &str = "SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at FROM readings WHERE exchange_id = ?1 ORDER BY id";
const LIST_COLUMNS: &str = "SELECT id, device, seq, kind, value, unit, priority, detail,
    device_time, received_at, state, pkid, attempts, delivered_at FROM readings";

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
}

/// What happened to one reading handed to [`Store::commit_serial`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Newly stored.
    Stored,
    /// Already stored with the same content: a resend; ACK it again.
    Duplicate,
    /// Not stored: it follows a gap in the device's sequence. The device is
    /// asked for `missing` first (NAK `missing`) and to resend this one (NAK
    /// `gap`), so readings are stored, and leave, in seq order. A gap that
    /// stays open for [`GAP_WAIT`] is accepted (the device skipped numbers).
    Gap { missing: u32 },
    /// Already stored with other content under the same (device, seq). The
    /// frame is kept in `rejected_frames` and NAKed (`conflict`): the stored
    /// one stands and the device must be looked at.
    Conflict,
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
}

/// Filters of `hearth readings list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `None` means every state.
    pub state: Option<String>,
    pub device: Option<String>,
    pub since: Option<DateTime<Utc>>,
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
    /// Above this many used pages, new readings are refused (BUSY) so that
    /// the publisher keeps room to drain; `None` means no cap.
    intake_limit: Option<u64>,
    /// Devices whose next reading in seq order has not come yet.
    gaps: std::collections::HashMap<String, Gap>,
    gap_wait: std::time::Duration,
}

/// How long readings after a gap wait for the missing one before the gap
/// is taken as the device's own (it skipped numbers).
pub const GAP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a reading stands against its device's frontier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    /// At or below the frontier: stored already, or a reused seq.
    Existing,
    /// The next one.
    InOrder,
    /// An alert past a gap that did not close at once: taken ahead of it.
    Ahead,
    /// Past a gap that stayed open: the device skipped numbers.
    Skipping,
}

/// How long an alert waits for a missing reading before it goes ahead of
/// it: the device resends a reading NAKed `missing` at once, so a gap left by
/// a line fault or a crash closes within a round trip or two.
pub const ALERT_GAP_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// An open gap in one device's sequence.
#[derive(Debug)]
struct Gap {
    expected: u32,
    /// When this gap was first seen...
    since: std::time::Instant,
    /// ...and last seen: a gap not seen for [`GAP_WAIT`] starts afresh, so
    /// a pause (store full, port unplugged) does not count as waiting.
    last: std::time::Instant,
}

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
fn list_query(filter: &ListFilter) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("{LIST_COLUMNS} WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(state) = &filter.state {
        args.push(state.clone().into());
        sql.push_str(&format!(" AND state = ?{}", args.len()));
    }
    if let Some(device) = &filter.device {
        args.push(device.clone().into());
        sql.push_str(&format!(" AND device = ?{}", args.len()));
    }
    if let Some(since) = filter.since {
        args.push(to_ms(since).into());
        sql.push_str(&format!(" AND received_at >= ?{}", args.len()));
    }
    // `received_at, id` is the index order of `readings_received`, so a
    // `--since` on a large table reads only the rows it lists.
    sql.push_str(" ORDER BY received_at, id");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    (sql, args)
}

/// Maps a row of [`NEXT_QUEUED`] or [`EXCHANGE_READINGS`].
fn queued_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Queued> {
    let priority: String = row.get(6)?;
    Ok(Queued {
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
        StoreError::Open { source, .. } | StoreError::Sql { source, .. } => source,
        _ => return false,
    };
    matches!(
        source.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
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
    /// Opens (creating if needed) the database for the gateway and applies
    /// migrations.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
            intake_limit: None,
            gaps: Default::default(),
            gap_wait: GAP_WAIT,
        };
        store.configure().map_err(|e| store.err(e))?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens the gateway's database after a `PRAGMA quick_check`. A damaged
    /// database is moved aside (never deleted) and a fresh one is created;
    /// the second value is then the path it was moved to.
    pub fn open_checked(path: &Path) -> Result<(Store, Option<PathBuf>), StoreError> {
        let problem = match Store::open(path) {
            Ok(store) => match store.quick_check() {
                Ok(None) => return Ok((store, None)),
                Ok(Some(problem)) => problem,
                Err(e) if is_corruption(&e) => e.to_string(),
                Err(e) => return Err(e),
            },
            Err(e) if is_corruption(&e) => e.to_string(),
            Err(e) => return Err(e),
        };
        let aside = move_aside(path)?;
        tracing::error!(
            damaged = %path.display(),
            moved_to = %aside.display(),
            %problem,
            "Database is damaged: moved aside, starting a fresh one. Its readings need an operator."
        );
        Ok((Store::open(path)?, Some(aside)))
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
        let page_size: u64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
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
            .conn
            .execute(
                "DELETE FROM readings WHERE id IN (SELECT id FROM readings
                 WHERE state = 'delivered' AND priority = 'routine' AND delivered_at < ?1
                 ORDER BY id LIMIT ?2)",
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
        if pruned + deleted_rejected > 0 {
            tracing::info!(
                pruned,
                deleted_rejected,
                "Store near its size cap: oldest delivered readings and rejected frames deleted before their retention ended."
            );
        }
        Ok(self.used_pages().map_err(|e| self.err(e))? < limit)
    }

    /// Opens an existing database read-only, for the CLI; safe while
    /// `hearth run` writes to it (WAL readers never block the writer).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let intake_limit = None;
        if !path.exists() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Store {
            conn,
            path: path.to_owned(),
            intake_limit,
            gaps: Default::default(),
            gap_wait: GAP_WAIT,
        })
    }

    /// Overrides [`GAP_WAIT`] (tests).
    pub fn set_gap_wait(&mut self, wait: std::time::Duration) {
        self.gap_wait = wait;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
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
            tx.execute_batch(sql)
                .and_then(|()| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .and_then(|()| tx.commit())
                .map_err(|source| StoreError::Sql {
                    path: self.path.clone(),
                    source,
                })?;
            tracing::info!(migration = name, "Database migrated.");
        }
        Ok(())
    }

    /// Commits a batch read from the serial port in one transaction: the
    /// readings and the rejected frames. Returns one outcome per reading.
    pub fn commit_serial(
        &mut self,
        port: &str,
        readings: &[Reading],
        rejected: &[Rejected],
        now: DateTime<Utc>,
    ) -> Result<Vec<Insert>, StoreError> {
        let anything = !readings.is_empty() || !rejected.is_empty();
        if anything && !self.make_room()? {
            return Err(StoreError::Full {
                path: self.path.clone(),
            });
        }
        // Each device's readings are taken in seq order, whatever order
        // they came in within this batch; outcomes keep the input order.
        let mut order: Vec<usize> = (0..readings.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&readings[a], &readings[b]);
            (&ra.device_id, ra.seq).cmp(&(&rb.device_id, rb.seq))
        });
        let gaps = &mut self.gaps;
        let gap_wait = self.gap_wait;
        let result = (|| {
            let tx = self.conn.transaction()?;
            let mut outcomes = vec![Insert::Stored; readings.len()];
            {
                let mut insert = tx.prepare_cached(INSERT_READING)?;
                let mut same = tx.prepare_cached(SAME_READING)?;
                let mut reject = tx.prepare_cached(INSERT_REJECTED)?;
                let mut get_frontier = tx.prepare_cached(GET_FRONTIER)?;
                let mut set_frontier = tx.prepare_cached(SET_FRONTIER)?;
                let mut has_seq = tx.prepare_cached(HAS_SEQ)?;
                for i in order {
                    let r = &readings[i];
                    // A device never seen before is expected to start at 1;
                    // one that starts higher waits out one gap.
                    let frontier: u32 = get_frontier
                        .query_row(params![r.device_id], |row| row.get(0))
                        .optional()?
                        .unwrap_or(0);
                    let next = frontier.saturating_add(1);
                    let take = if r.seq < next {
                        Take::Existing
                    } else if r.seq == next {
                        Take::InOrder
                    } else {
                        // A gap: hold this reading until the missing one
                        // came (the device is asked for it at once), unless
                        // the gap stays open: 2 s for routine readings, a
                        // moment for an alert, which then goes ahead.
                        let now_i = std::time::Instant::now();
                        let gap = gaps.entry(r.device_id.clone()).or_insert(Gap {
                            expected: next,
                            since: now_i,
                            last: now_i,
                        });
                        if gap.expected != next || now_i - gap.last > gap_wait {
                            gap.expected = next;
                            gap.since = now_i;
                        }
                        gap.last = now_i;
                        let alert = r.priority == Priority::Alert;
                        let wait = if alert {
                            gap_wait.min(ALERT_GAP_WAIT)
                        } else {
                            gap_wait
                        };
                        if now_i - gap.since < wait {
                            outcomes[i] = Insert::Gap { missing: next };
                            continue;
                        }
                        if alert {
                            Take::Ahead
                        } else {
                            tracing::warn!(
                                %port,
                                missing = r.seq - next,
                                "A device skipped sequence numbers; its later readings are taken."
                            );
                            Take::Skipping
                        }
                    };
                    let is_new = take != Take::Existing;
                    let inserted = if is_new {
                        insert.execute(params![
                            r.device_id,
                            r.seq,
                            r.kind.as_str(),
                            r.value,
                            r.kind.unit(),
                            r.priority.as_str(),
                            r.detail,
                            to_ms(r.device_time),
                            to_ms(now),
                        ])? == 1
                    } else {
                        false
                    };
                    outcomes[i] = if inserted {
                        Insert::Stored
                    } else {
                        let same: Option<bool> = same
                            .query_row(
                                params![
                                    r.device_id,
                                    r.seq,
                                    r.kind.as_str(),
                                    r.value,
                                    r.priority.as_str(),
                                    r.detail,
                                    to_ms(r.device_time)
                                ],
                                |row| row.get(0),
                            )
                            .optional()?;
                        if same == Some(true) {
                            Insert::Duplicate
                        } else {
                            // Other content under a stored seq, or a seq at
                            // or below the frontier that is not stored (its
                            // reading was deleted, or the device restarted
                            // its count): never stored under a used id.
                            let detail = if same.is_some() {
                                "seq already stored with other content"
                            } else {
                                "seq already used (its reading was deleted): the device reuses sequence numbers"
                            };
                            let frame = crate::serial::frame::Frame::Reading(r.clone());
                            reject.execute(params![
                                to_ms(now),
                                port,
                                "conflict",
                                detail,
                                frame.encode()
                            ])?;
                            Insert::Conflict
                        }
                    };
                    if !inserted {
                        continue;
                    }
                    // Advance the frontier over this reading and any stored
                    // after it (alerts are never held, so may be ahead).
                    let mut f = match take {
                        Take::InOrder | Take::Skipping => r.seq,
                        Take::Ahead | Take::Existing => frontier,
                    };
                    while f < u32::MAX && has_seq.exists(params![r.device_id, f + 1])? {
                        f += 1;
                    }
                    if f != frontier {
                        set_frontier.execute(params![r.device_id, f])?;
                        gaps.remove(&r.device_id);
                    }
                }
                for rej in rejected {
                    reject.execute(params![
                        to_ms(now),
                        port,
                        rej.reason.code(),
                        rej.reason.to_string(),
                        rej.raw
                    ])?;
                }
            }
            tx.commit()?;
            Ok(outcomes)
        })();
        result.map_err(|e| self.err(e))
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

    /// Records a new exchange and puts its readings in flight, in one
    /// transaction. Must return before the PUBLISH is written.
    pub fn begin_exchange(
        &mut self,
        pkid: u16,
        topic: &str,
        reading_ids: &[i64],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.prepare_cached(
                "INSERT INTO exchanges (pkid, topic, stage, created_at, sent_count)
                 VALUES (?1, ?2, 'publish', ?3, 1)",
            )?
            .execute(params![pkid, topic, to_ms(now)])?;
            let exchange = tx.last_insert_rowid();
            let mut mark = tx.prepare_cached(
                "UPDATE readings SET state = 'inflight', exchange_id = ?1, pkid = ?2,
                 attempts = attempts + 1, inflight_at = ?3 WHERE id = ?4 AND state = 'queued'",
            )?;
            for id in reading_ids {
                mark.execute(params![exchange, pkid, to_ms(now), id])?;
            }
            drop(mark);
            tx.commit()
        };
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Records that PUBREC arrived: from now on the exchange is resumed with
    /// PUBREL. Must return before the PUBREL is written. Returns false when no
    /// exchange has this packet id.
    pub fn exchange_released(&mut self, pkid: u16) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("UPDATE exchanges SET stage = 'release' WHERE pkid = ?1")
            .and_then(|mut s| s.execute(params![pkid]))
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }

    /// PUBCOMP arrived: the readings of the exchange are delivered and the
    /// packet id is free again. Returns how many readings were delivered.
    /// A PUBCOMP for an exchange not yet past PUBREC changes nothing.
    pub fn complete_exchange(
        &mut self,
        pkid: u16,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction()?;
            let exchange: Option<i64> = tx
                .prepare_cached("SELECT id FROM exchanges WHERE pkid = ?1 AND stage = 'release'")?
                .query_row(params![pkid], |r| r.get(0))
                .optional()?;
            let Some(exchange) = exchange else {
                return Ok(0);
            };
            let n = tx
                .prepare_cached(
                    "UPDATE readings SET state = 'delivered', exchange_id = NULL,
                     delivered_at = ?1 WHERE exchange_id = ?2",
                )?
                .execute(params![to_ms(now), exchange])?;
            tx.prepare_cached("DELETE FROM exchanges WHERE id = ?1")?
                .execute(params![exchange])?;
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

    /// Counts a re-sent PUBLISH or PUBREL of an open exchange.
    pub fn exchange_resent(&mut self, pkid: u16) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE exchanges SET sent_count = sent_count + 1 WHERE pkid = ?1")
            .and_then(|mut s| s.execute(params![pkid]))
            .map(drop)
            .map_err(|e| self.err(e))
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
        run(&mut self.conn).map_err(|e| self.err(e))
    }

    /// Settles the open exchanges once CONNACK is seen, in one transaction
    /// with clearing the pending-CONNECT record; returns how many readings
    /// were queued again.
    ///
    /// - [`Connack::Reset`] (our own clean session) and [`Connack::Absent`]:
    ///   every open exchange is void; its readings are queued again (the
    ///   receiver deduplicates by reading id). An unexpected `Absent` also
    ///   records that this broker loses sessions.
    /// - [`Connack::Present`] after an earlier CONNECT whose CONNACK was never
    ///   seen, with a broker known to lose sessions: that CONNECT may have met
    ///   a broker without our session and made an empty one, which answers
    ///   any PUBREL with PUBCOMP. Exchanges past PUBREC therefore keep their
    ///   ids (to be released, so no id is reused while the broker may hold
    ///   it) but their readings are queued again: a possible duplicate,
    ///   never a loss. With a broker that keeps sessions the session is ours
    ///   and nothing changes.
    pub fn settle_connack(
        &mut self,
        connack: Connack,
        earlier_unseen: bool,
    ) -> Result<usize, StoreError> {
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction()?;
            let loses_sessions = tx
                .query_row(
                    "SELECT 1 FROM gateway_state WHERE key = ?1",
                    params![LOSES_SESSIONS],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            let n = match connack {
                Connack::Reset | Connack::Absent => {
                    let n = tx.execute(
                        "UPDATE readings SET state = 'queued', exchange_id = NULL WHERE state = 'inflight'",
                        [],
                    )?;
                    tx.execute("DELETE FROM exchanges", [])?;
                    n
                }
                Connack::Present if earlier_unseen && loses_sessions => tx.execute(
                    "UPDATE readings SET state = 'queued', exchange_id = NULL WHERE exchange_id IN
                     (SELECT id FROM exchanges WHERE stage = 'release')",
                    [],
                )?,
                Connack::Present => 0,
            };
            let mut set = tx.prepare_cached(UPSERT_STATE)?;
            if connack == Connack::Absent {
                set.execute(params![
                    LOSES_SESSIONS,
                    Utc::now().timestamp_millis().to_string()
                ])?;
            }
            if n > 0 && connack != Connack::Reset {
                let total: u64 = tx
                    .query_row(
                        "SELECT value FROM gateway_state WHERE key = 'requeued_after_lost_session'",
                        [],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()?
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                set.execute(params![
                    "requeued_after_lost_session",
                    (total + n as u64).to_string()
                ])?;
                set.execute(params![
                    "last_lost_session",
                    Utc::now().timestamp_millis().to_string()
                ])?;
            }
            drop(set);
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

    /// When each device was last heard, newest first.
    pub fn last_heard(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let run = || -> rusqlite::Result<Vec<(String, DateTime<Utc>)>> {
            let mut stmt = self.conn.prepare_cached(
                "SELECT device, max(received_at) AS t FROM readings GROUP BY device ORDER BY t DESC",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, from_ms(r.get(1)?))))?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    pub fn list(&self, filter: &ListFilter) -> Result<Vec<ReadingRow>, StoreError> {
        let (sql, args) = list_query(filter);
        let run = || -> rusqlite::Result<Vec<ReadingRow>> {
            let mut stmt = self.conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |row| {
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
                })
            })?;
            rows.collect()
        };
        run().map_err(|e| self.err(e))
    }

    /// Deletes delivered readings delivered before `before` (and rejected
    /// frames received before it); never touches a reading that is queued or
    /// in flight.
    pub fn prune_delivered(&mut self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let run = |conn: &Connection| -> rusqlite::Result<usize> {
            let n = conn.execute(
                "DELETE FROM readings WHERE state = 'delivered' AND delivered_at < ?1",
                params![to_ms(before)],
            )?;
            conn.execute(
                "DELETE FROM rejected_frames WHERE received_at < ?1",
                params![to_ms(before)],
            )?;
            Ok(n)
        };
        run(&self.conn).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::frame::Kind;

    fn reading(seq: u32, priority: Priority) -> Reading {
        Reading {
            device_id: "PM-1".into(),
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

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn resent_reading_is_stored_once_and_acked_again() {
        let (_dir, mut store) = open();
        let r = reading(1, Priority::Routine);
        let now = Utc::now();
        assert_eq!(
            store
                .commit_serial("p", std::slice::from_ref(&r), &[], now)
                .unwrap(),
            [Insert::Stored]
        );
        assert_eq!(
            store
                .commit_serial("p", std::slice::from_ref(&r), &[], now)
                .unwrap(),
            [Insert::Duplicate]
        );
        let mut other = r;
        other.value = 99.0;
        assert_eq!(
            store.commit_serial("p", &[other], &[], now).unwrap(),
            [Insert::Conflict]
        );
        assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 1);
        assert_eq!(store.counts().unwrap().rejected_frames, 1);
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
        let (_dir, mut store) = open();
        // The broker was seen to lose our session once.
        store.settle_connack(Connack::Absent, false).unwrap();
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
        // A broker that keeps sessions: the session is ours, nothing moves.
        let mut trusting = Store::open(&_dir.path().join("other.db")).unwrap();
        trusting
            .commit_serial("p", &[reading(1, Priority::Routine)], &[], now)
            .unwrap();
        let t = trusting.next_queued(Priority::Routine, 1).unwrap();
        trusting.begin_exchange(3, "t", &[t[0].id], now).unwrap();
        trusting.exchange_released(3).unwrap();
        assert_eq!(trusting.settle_connack(Connack::Present, true).unwrap(), 0);
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
    fn readings_after_a_gap_wait_for_the_missing_one() {
        let (_dir, mut store) = open();
        let now = Utc::now();
        let r = |seq| reading(seq, Priority::Routine);
        store.commit_serial("p", &[r(1), r(2)], &[], now).unwrap();
        assert_eq!(
            store.commit_serial("p", &[r(4), r(5)], &[], now).unwrap(),
            [Insert::Gap { missing: 3 }, Insert::Gap { missing: 3 }]
        );
        // Out of order within one batch is put right.
        assert_eq!(
            store.commit_serial("p", &[r(4), r(3)], &[], now).unwrap(),
            [Insert::Stored, Insert::Stored]
        );
        let seqs: Vec<u32> = store
            .list(&ListFilter::default())
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        // A gap the device keeps open while resending is its own: taken
        // after the wait.
        store.set_gap_wait(std::time::Duration::from_millis(50));
        for _ in 0..2 {
            assert_eq!(
                store.commit_serial("p", &[r(9)], &[], now).unwrap(),
                [Insert::Gap { missing: 5 }]
            );
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        assert_eq!(
            store.commit_serial("p", &[r(9)], &[], now).unwrap(),
            [Insert::Stored]
        );
    }

    #[test]
    fn an_alert_waits_only_a_moment_behind_a_gap() {
        let (_dir, mut store) = open();
        let now = Utc::now();
        let r = |seq| reading(seq, Priority::Routine);
        store.commit_serial("p", &[r(1)], &[], now).unwrap();
        let alert = reading(5, Priority::Alert);
        assert_eq!(
            store
                .commit_serial("p", std::slice::from_ref(&alert), &[], now)
                .unwrap(),
            [Insert::Gap { missing: 2 }]
        );
        std::thread::sleep(ALERT_GAP_WAIT + std::time::Duration::from_millis(20));
        assert_eq!(
            store.commit_serial("p", &[alert, r(3)], &[], now).unwrap(),
            [Insert::Stored, Insert::Gap { missing: 2 }]
        );
        // The missing ones arrive; the frontier passes over the alert.
        assert_eq!(
            store
                .commit_serial("p", &[r(2), r(3), r(4), r(6)], &[], now)
                .unwrap(),
            [Insert::Stored; 4]
        );
    }

    #[test]
    fn a_seq_reused_after_its_reading_was_deleted_is_refused() {
        let (_dir, mut store) = open();
        let now = Utc::now();
        let r = |seq| reading(seq, Priority::Routine);
        store.commit_serial("p", &[r(1), r(2)], &[], now).unwrap();
        store.conn.execute("DELETE FROM readings", []).unwrap();
        // A device that restarted its count: seq 1 again, other content.
        let mut again = r(1);
        again.value = 99.0;
        assert_eq!(
            store.commit_serial("p", &[again], &[], now).unwrap(),
            [Insert::Conflict]
        );
        assert_eq!(store.counts().unwrap().rejected_frames, 1);
        assert!(store.list(&ListFilter::default()).unwrap().is_empty());
    }

    #[test]
    fn session_counter_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        assert_eq!(
            Store::open(&path).unwrap().begin_connect().unwrap(),
            (1, false)
        );
        // The first CONNACK was never settled: the second attempt knows.
        assert_eq!(
            Store::open(&path).unwrap().begin_connect().unwrap(),
            (2, true)
        );
        let mut store = Store::open(&path).unwrap();
        store.settle_connack(Connack::Present, true).unwrap();
        assert_eq!(store.begin_connect().unwrap(), (3, false));
    }

    #[test]
    fn list_filters_use_an_index() {
        let (_dir, store) = open();
        let plan = |filter: ListFilter| -> String {
            let (sql, args) = list_query(&filter);
            store
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join("; ")
        };
        let device = plan(ListFilter {
            device: Some("PM-1".into()),
            ..Default::default()
        });
        assert!(device.contains("sqlite_autoindex_readings_1"), "{device}");
        let state = plan(ListFilter {
            state: Some("queued".into()),
            ..Default::default()
        });
        assert!(state.contains("readings_queue"), "{state}");
        let since = plan(ListFilter {
            since: Some(Utc::now()),
            ..Default::default()
        });
        assert!(since.contains("readings_received"), "{since}");
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
