//! Readings as a stream, for `hearth readings tail` and `hearth readings
//! export`.
//!
//! `tail` never holds the running gateway back. Each poll
//! ([`Store::tail_poll`]) is one short read transaction (`BEGIN DEFERRED`:
//! a snapshot, never a write lock) that reads only what is new since its
//! [`Cursor`], through primary keys, at most [`POLL_READINGS`] readings and
//! [`POLL_JOURNEYS`] journeys, and then ends: between polls the CLI holds
//! no snapshot, so the gateway's WAL checkpoints are never held back.
//!
//! - New readings: `readings` past the cursor's id. Ids are handed out by
//!   the one writer in commit order, so none is skipped.
//! - State changes: `journeys` (schema 5), one row per MQTT exchange. A
//!   journey past the cursor's id is new (its readings were published); a
//!   journey seen open is looked up again by id until it has ended
//!   (delivered, acknowledged, refused or requeued). No clock is compared:
//!   two journeys ending in the same millisecond, or the gateway's clock
//!   stepping back, lose nothing. Open journeys are as many as the
//!   gateway's in-flight window.
//!
//! `export` ([`Store::export`]) counts, then streams its rows from one
//! statement in the same read transaction, so the count it reports (and
//! audits) is the number of rows it writes.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::journey::parse_id_ranges;
use crate::outbox::store::{from_ms, reading_row, to_ms};
use crate::outbox::{ReadingRow, Store, StoreError};

/// Most readings one poll reads; more wait for the next poll (at once).
pub const POLL_READINGS: usize = 1000;
/// Most new journeys one poll reads (each holds up to a batch of readings).
pub const POLL_JOURNEYS: usize = 50;

/// The columns of [`ReadingRow`] in the order of
/// [`crate::outbox::store::LIST_COLUMNS`], which `reading_row` maps.
macro_rules! columns {
    () => {
        "id, device, seq, kind, value, unit, priority, detail, device_time, received_at, \
         state, pkid, attempts, delivered_at, epoch, run, variant, late, restart, stored_at"
    };
}

const MAX_IDS: &str = "SELECT coalesce((SELECT max(id) FROM readings), 0),
    coalesce((SELECT max(id) FROM journeys), 0)";
/// Once, at start: the journeys still under way (a scan of a table that
/// holds one row per exchange, not per reading).
const OPEN_JOURNEYS: &str = "SELECT id FROM journeys WHERE ended_at IS NULL";
const NEW_READINGS: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM readings WHERE id > ?1 ORDER BY id LIMIT ?2"
);
const READINGS_BY_ID: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM readings WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
);
const NEW_JOURNEYS: &str = "SELECT id, pkid, readings, began_at, ended_at, outcome
    FROM journeys WHERE id > ?1 ORDER BY id LIMIT ?2";
const JOURNEYS_BY_ID: &str = "SELECT id, pkid, readings, began_at, ended_at, outcome
    FROM journeys WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id";

/// Which readings a stream shows; `None` lets all through.
#[derive(Debug, Clone, Default)]
pub struct StreamFilter {
    pub device: Option<String>,
    pub kind: Option<String>,
    pub priority: Option<String>,
}

impl StreamFilter {
    pub fn matches(&self, r: &ReadingRow) -> bool {
        self.device.as_ref().is_none_or(|d| *d == r.device)
            && self.kind.as_ref().is_none_or(|k| *k == r.kind)
            && self.priority.as_ref().is_none_or(|p| *p == r.priority)
    }
}

/// Which readings `export` writes.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    pub device: Option<String>,
    pub kind: Option<String>,
    /// `queued`, `inflight` or `delivered`.
    pub state: Option<String>,
    /// Received at or after.
    pub since: Option<DateTime<Utc>>,
    /// Received before.
    pub until: Option<DateTime<Utc>>,
}

/// Where a tail stands: the newest reading and journey seen, and the
/// journeys seen under way.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    reading: i64,
    journey: i64,
    open: BTreeSet<i64>,
}

/// What happened to a reading.
#[derive(Debug, Clone)]
pub struct Event {
    /// `stored`, `published`, or how its journey ended: `delivered`,
    /// `acknowledged`, `refused`, `requeued`.
    pub what: &'static str,
    pub at: DateTime<Utc>,
    /// The journey (id, packet id) of a `published` or ending event.
    pub journey: Option<(i64, u16)>,
    /// The reading as it is now.
    pub reading: ReadingRow,
}

/// One poll's events, oldest first.
#[derive(Debug, Default)]
pub struct Poll {
    pub events: Vec<Event>,
    /// A limit was reached: poll again at once.
    pub more: bool,
}

struct JourneyRow {
    id: i64,
    pkid: u16,
    readings: String,
    began_at: i64,
    ended_at: Option<i64>,
    outcome: Option<String>,
}

fn journey_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JourneyRow> {
    Ok(JourneyRow {
        id: row.get(0)?,
        pkid: row.get(1)?,
        readings: row.get(2)?,
        began_at: row.get(3)?,
        ended_at: row.get(4)?,
        outcome: row.get(5)?,
    })
}

/// The word for how a journey ended.
fn ending(outcome: Option<&str>) -> &'static str {
    match outcome {
        Some("delivered") => "delivered",
        Some("acknowledged") => "acknowledged",
        Some("refused") => "refused",
        Some("requeued") => "requeued",
        _ => "ended",
    }
}

/// A stored event's time: when its row was written, or (stored before
/// schema 5) when it was received.
fn stored_time(r: &ReadingRow) -> DateTime<Utc> {
    r.stored_at.unwrap_or(r.received_at)
}

/// The SQL of the newest `n` readings that pass `filter`, newest first.
fn newest_query(filter: &StreamFilter) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("SELECT {} FROM readings WHERE 1 = 1", columns!());
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    for (column, value) in [
        ("device", &filter.device),
        ("kind", &filter.kind),
        ("priority", &filter.priority),
    ] {
        if let Some(v) = value {
            args.push(v.clone().into());
            sql.push_str(&format!(" AND {column} = ?{}", args.len()));
        }
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    (sql, args)
}

/// The WHERE clause of `export` and its arguments.
fn export_where(filter: &ExportFilter) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = String::from(" WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    for (column, value) in [
        ("state", &filter.state),
        ("device", &filter.device),
        ("kind", &filter.kind),
    ] {
        if let Some(v) = value {
            args.push(v.clone().into());
            sql.push_str(&format!(" AND {column} = ?{}", args.len()));
        }
    }
    if let Some(t) = filter.since {
        args.push(to_ms(t).into());
        sql.push_str(&format!(" AND received_at >= ?{}", args.len()));
    }
    if let Some(t) = filter.until {
        args.push(to_ms(t).into());
        sql.push_str(&format!(" AND received_at < ?{}", args.len()));
    }
    (sql, args)
}

/// The rows of `export` for its WHERE `clause`. They are read in the
/// order of `readings_received`, whatever the filter: another index (the
/// device's, the state's) would leave SQLite a sort of every row it finds,
/// held in memory (this build keeps temporary data in memory, never in a
/// plain file), where walking this index holds one row at a time.
fn export_sql(clause: &str) -> String {
    format!(
        "SELECT {} FROM readings INDEXED BY readings_received{clause} ORDER BY received_at, id",
        columns!()
    )
}

/// `ids` as a JSON array, for `json_each`.
fn json_ids<'a>(ids: impl IntoIterator<Item = &'a i64>) -> String {
    let ids: Vec<String> = ids.into_iter().map(i64::to_string).collect();
    format!("[{}]", ids.join(","))
}

impl Store {
    /// The newest `n` readings that pass `filter`, oldest first, and a
    /// cursor at the newest reading and journey of the same snapshot.
    pub fn tail_start(
        &self,
        filter: &StreamFilter,
        n: usize,
    ) -> Result<(Vec<Event>, Cursor), StoreError> {
        let run = |conn: &Connection| -> rusqlite::Result<(Vec<Event>, Cursor)> {
            let tx = conn.unchecked_transaction()?;
            let (reading, journey) = tx.query_row(MAX_IDS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let open = tx
                .prepare(OPEN_JOURNEYS)?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<BTreeSet<i64>>>()?;
            let (sql, mut args) = newest_query(filter);
            args.push(i64::try_from(n).unwrap_or(i64::MAX).into());
            let mut events = tx
                .prepare(&sql)?
                .query_map(rusqlite::params_from_iter(args.iter()), reading_row)?
                .map(|r| {
                    r.map(|reading| Event {
                        what: "stored",
                        at: stored_time(&reading),
                        journey: None,
                        reading,
                    })
                })
                .collect::<rusqlite::Result<Vec<Event>>>()?;
            events.reverse();
            tx.commit()?;
            Ok((
                events,
                Cursor {
                    reading,
                    journey,
                    open,
                },
            ))
        };
        run(self.conn()).map_err(|e| self.err(e))
    }

    /// What happened since `cursor` (which moves on), to readings that
    /// pass `filter`: new readings first, then the journeys begun, then
    /// those ended. Journeys are read once the readings have caught up, so
    /// a reading's `stored` comes before its `published`.
    pub fn tail_poll(
        &self,
        cursor: &mut Cursor,
        filter: &StreamFilter,
    ) -> Result<Poll, StoreError> {
        let run = |conn: &Connection, cursor: &mut Cursor| -> rusqlite::Result<Poll> {
            let tx = conn.unchecked_transaction()?;
            let mut poll = Poll::default();
            {
                let mut stmt = tx.prepare_cached(NEW_READINGS)?;
                let mut rows = stmt.query(params![cursor.reading, POLL_READINGS as i64])?;
                let mut read = 0;
                while let Some(row) = rows.next()? {
                    let reading = reading_row(row)?;
                    read += 1;
                    cursor.reading = reading.id;
                    if filter.matches(&reading) {
                        poll.events.push(Event {
                            what: "stored",
                            at: stored_time(&reading),
                            journey: None,
                            reading,
                        });
                    }
                }
                poll.more = read == POLL_READINGS;
            }
            if !poll.more {
                let new: Vec<JourneyRow> = tx
                    .prepare_cached(NEW_JOURNEYS)?
                    .query_map(params![cursor.journey, POLL_JOURNEYS as i64], journey_row)?
                    .collect::<rusqlite::Result<_>>()?;
                poll.more = new.len() == POLL_JOURNEYS;
                let ended: Vec<JourneyRow> = if cursor.open.is_empty() {
                    Vec::new()
                } else {
                    tx.prepare_cached(JOURNEYS_BY_ID)?
                        .query_map(params![json_ids(&cursor.open)], journey_row)?
                        .collect::<rusqlite::Result<_>>()?
                };
                // An open journey that is gone (its row pruned) is let go.
                let found: BTreeSet<i64> = ended.iter().map(|j| j.id).collect();
                cursor.open.retain(|id| found.contains(id));
                let mut changes: Vec<(&'static str, i64, &JourneyRow)> = Vec::new();
                for j in &new {
                    cursor.journey = j.id;
                    changes.push(("published", j.began_at, j));
                    if j.ended_at.is_none() {
                        cursor.open.insert(j.id);
                    }
                }
                for j in ended.iter().chain(&new) {
                    if let Some(at) = j.ended_at {
                        cursor.open.remove(&j.id);
                        changes.push((ending(j.outcome.as_deref()), at, j));
                    }
                }
                changes.sort_by_key(|(_, at, j)| (*at, j.id));
                poll.events.extend(journey_events(&tx, &changes, filter)?);
            }
            tx.commit()?;
            Ok(poll)
        };
        run(self.conn(), cursor).map_err(|e| self.err(e))
    }

    /// Counts the readings that pass `filter` and calls `start` with that
    /// number, then `each` on every one in received time order, from one
    /// statement: nothing is collected. Count and rows come from one
    /// snapshot. Returns the rows passed to `each` and what `start` made.
    pub fn export<S, E: From<StoreError>>(
        &self,
        filter: &ExportFilter,
        start: impl FnOnce(u64) -> Result<S, E>,
        mut each: impl FnMut(&mut S, &ReadingRow) -> Result<(), E>,
    ) -> Result<(u64, S), E> {
        let (clause, args) = export_where(filter);
        let params = rusqlite::params_from_iter(args.iter());
        let tx = self
            .conn()
            .unchecked_transaction()
            .map_err(|e| self.err(e))?;
        let count: i64 = tx
            .query_row(
                &format!("SELECT count(*) FROM readings{clause}"),
                params.clone(),
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        let mut state = start(u64::try_from(count).unwrap_or(0))?;
        let mut written = 0u64;
        {
            let sql = export_sql(&clause);
            let mut stmt = tx.prepare(&sql).map_err(|e| self.err(e))?;
            let mut rows = stmt.query(params).map_err(|e| self.err(e))?;
            while let Some(row) = rows.next().map_err(|e| self.err(e))? {
                let reading = reading_row(row).map_err(|e| self.err(e))?;
                each(&mut state, &reading)?;
                written += 1;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok((written, state))
    }

    /// The query plans of the stream views, for the speed tests: each line
    /// `QUERY: plan`.
    pub fn stream_plans(&self, filter: &ExportFilter) -> Result<String, StoreError> {
        let (clause, args) = export_where(filter);
        let export = export_sql(&clause);
        let mut out = String::new();
        for (name, sql, args) in [
            (
                "new readings",
                NEW_READINGS.to_owned(),
                vec![0.into(), 1.into()],
            ),
            (
                "readings by id",
                READINGS_BY_ID.to_owned(),
                vec!["[1]".to_owned().into()],
            ),
            (
                "new journeys",
                NEW_JOURNEYS.to_owned(),
                vec![0.into(), 1.into()],
            ),
            (
                "journeys by id",
                JOURNEYS_BY_ID.to_owned(),
                vec!["[1]".to_owned().into()],
            ),
            ("export", export, args),
        ] {
            let args: Vec<rusqlite::types::Value> = args;
            let plan = || -> rusqlite::Result<String> {
                let mut stmt = self.conn().prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let steps = stmt
                    .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                        r.get::<_, String>(3)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(steps.join("; "))
            };
            let plan = plan().map_err(|e| self.err(e))?;
            out.push_str(&format!("{name}: {plan}\n"));
        }
        Ok(out)
    }
}

/// The events of journeys begun or ended, per reading that passes
/// `filter`, in the order of `changes`.
fn journey_events(
    conn: &Connection,
    changes: &[(&'static str, i64, &JourneyRow)],
    filter: &StreamFilter,
) -> rusqlite::Result<Vec<Event>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Vec<i64>> = changes
        .iter()
        .map(|(_, _, j)| parse_id_ranges(&j.readings).unwrap_or_default())
        .collect();
    let all: BTreeSet<i64> = ids.iter().flatten().copied().collect();
    let mut rows = std::collections::HashMap::new();
    let mut stmt = conn.prepare_cached(READINGS_BY_ID)?;
    for r in stmt.query_map(params![json_ids(&all)], reading_row)? {
        let reading = r?;
        if filter.matches(&reading) {
            rows.insert(reading.id, reading);
        }
    }
    let mut events = Vec::new();
    for ((what, at, j), ids) in changes.iter().zip(&ids) {
        let (what, at) = (*what, *at);
        // A reading pruned since is left out.
        for reading in ids.iter().filter_map(|id| rows.get(id)) {
            events.push(Event {
                what,
                at: from_ms(at),
                journey: Some((j.id, j.pkid)),
                reading: reading.clone(),
            });
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_filter_is_one_where_clause_with_numbered_arguments() {
        let (sql, args) = export_where(&ExportFilter {
            device: Some("PM-1".into()),
            state: Some("queued".into()),
            since: Some(from_ms(1000)),
            until: Some(from_ms(2000)),
            kind: None,
        });
        assert_eq!(
            sql,
            " WHERE 1 = 1 AND state = ?1 AND device = ?2 AND received_at >= ?3 AND received_at < ?4"
        );
        assert_eq!(args.len(), 4);
    }

    #[test]
    fn ids_go_to_json_each_as_an_array() {
        assert_eq!(json_ids(&[3, 4, 9]), "[3,4,9]");
        assert_eq!(json_ids(&[]), "[]");
    }
}
