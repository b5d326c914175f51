//! Summaries of the store for `hearth readings gaps` and `hearth readings
//! stats`, fast on a million readings because neither walks the readings.
//!
//! **Gaps.** A gap is a range of seqs of one device run (device, epoch, run)
//! with no reading stored and none pruned after delivery (`pruned`), lying
//! between two stored readings of that run. Below a run's lowest stored
//! seq nothing is knowable (a device may count from 0 or from 1), so
//! nothing is reported there. The ingest bookkeeping
//! (`src/outbox/ingest.rs`) says where gaps can be in each (device, epoch)'s
//! current run: every seq from `start` up to `frontier` was used (stored,
//! perhaps pruned since) unless the run gave it up (`given_up`); above the
//! frontier, up to `high`, only alerts stored ahead of a gap are used; below
//! `start`, only late readings. Those candidate ranges are checked against
//! the readings and tombstones they hold (index range lookups on
//! `readings_key` and `pruned`'s key), so a late reading that filled part
//! of a given-up range is no longer missing. A run that is not current any
//! more (a v1 device counted again, or an operator reset) has no
//! bookkeeping left: its keys are walked on `readings_key`, which costs one
//! index entry per reading of that device and epoch, and only for devices
//! that restarted. A seq whose reading was pruned and whose tombstone was
//! then forgotten (one retention later) counts as used in a current run and
//! as missing in an earlier one.
//!
//! The gap the gateway waits on right now (`device_runs.gap_missing`, a
//! routine reading held for it since `gap_since`) is shown even when no
//! reading is stored above it yet; its end is then unknown.
//!
//! **Stats.** Count, min, max, mean and last value per device and kind of
//! the readings received in a window, through `readings_received`; the
//! readings still waiting for delivery (queued or in flight) are counted
//! among the window's, and over all time through `readings_queue`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use crate::outbox::store::{from_ms, to_ms};
use crate::outbox::{Store, StoreError};

/// Where each device and epoch's current run stands.
const RUNS: &str = "SELECT device, epoch, run, frontier, start, high, gap_missing, gap_since
    FROM device_runs WHERE ?1 IS NULL OR device = ?1 ORDER BY device, epoch";
/// The seq ranges runs gave up waiting for.
const GIVEN_UP: &str = "SELECT device, epoch, run, from_seq, to_seq FROM given_up
    WHERE ?1 IS NULL OR device = ?1";
/// The lowest seq stored in run `?3` below its start `?4` (late readings).
const LOWEST_BELOW_START: &str = "SELECT min(seq) FROM readings
    WHERE device = ?1 AND epoch = ?2 AND seq < ?4 AND run = ?3";
/// The seqs of run `?3` from `?4` to `?5` that have a reading, stored or
/// pruned after delivery.
const USED_IN_RANGE: &str = "SELECT seq FROM readings
    WHERE device = ?1 AND epoch = ?2 AND seq BETWEEN ?4 AND ?5 AND run = ?3
    UNION SELECT seq FROM pruned
    WHERE device = ?1 AND epoch = ?2 AND seq BETWEEN ?4 AND ?5 AND run = ?3
    ORDER BY seq";
/// Every used seq of the runs before `?3` (no bookkeeping left for them).
const USED_IN_EARLIER_RUNS: &str = "SELECT seq, run FROM readings
    WHERE device = ?1 AND epoch = ?2 AND run < ?3
    UNION SELECT seq, run FROM pruned WHERE device = ?1 AND epoch = ?2 AND run < ?3
    ORDER BY run, seq";
/// The stored reading of run `?3` just before seq `?4`.
const BEFORE: &str = "SELECT seq, device_time, received_at FROM readings
    WHERE device = ?1 AND epoch = ?2 AND seq < ?4 AND run = ?3 ORDER BY seq DESC LIMIT 1";
/// The stored reading of run `?3` just after seq `?4`.
const AFTER: &str = "SELECT seq, device_time, received_at FROM readings
    WHERE device = ?1 AND epoch = ?2 AND seq > ?4 AND run = ?3 ORDER BY seq LIMIT 1";

/// The readings received in a window, for the stats (`?3`, `?4`: device
/// and kind, or NULL for all).
const IN_WINDOW: &str = "SELECT device, kind, unit, value, device_time, state <> 'delivered'
    FROM readings WHERE received_at >= ?1 AND received_at <= ?2
    AND (?3 IS NULL OR device = ?3) AND (?4 IS NULL OR kind = ?4)";
/// Every reading still waiting for delivery, whenever it came.
const WAITING: &str = "SELECT count(*) FROM readings WHERE state IN ('queued', 'inflight')";

/// A stored reading beside a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    pub seq: u32,
    pub device_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
}

/// Why a gap is open.
#[derive(Debug, Clone, PartialEq)]
pub enum GapStatus {
    /// Seen, not (yet) given up: alerts were stored ahead of it, or it lies
    /// in a run that is over.
    Open,
    /// The gateway holds a routine reading for `missing` since `since`.
    Waiting { since: Option<DateTime<Utc>> },
    /// The run gave up waiting for `from..=to`; `filled` of those seqs have
    /// a reading since (late, or an alert stored ahead before it gave up).
    GivenUp { from: u32, to: u32, filled: u64 },
}

/// Missing seqs `first..=last` of one device run.
#[derive(Debug, Clone, PartialEq)]
pub struct Gap {
    pub device: String,
    pub epoch: u32,
    pub run: u32,
    pub first: u32,
    /// `None`: the gateway waits for `first` and nothing is stored above it
    /// yet, so the end is unknown.
    pub last: Option<u32>,
    pub before: Option<Neighbour>,
    pub after: Option<Neighbour>,
    pub status: GapStatus,
}

impl Gap {
    /// How many seqs are missing, when the end is known.
    pub fn count(&self) -> Option<u64> {
        self.last
            .map(|last| u64::from(last) - u64::from(self.first) + 1)
    }
}

/// One device and kind over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct KindStats {
    pub device: String,
    pub kind: String,
    pub unit: String,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// The value with the latest device time, and that time.
    pub last: f64,
    pub last_time: DateTime<Utc>,
    /// Of these readings, how many are queued or in flight.
    pub waiting: u64,
}

/// `hearth readings stats`' answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub groups: Vec<KindStats>,
    /// Readings waiting for delivery in the whole store, whatever their
    /// time, device or kind.
    pub waiting_all: u64,
}

/// One row of `device_runs`.
struct RunRow {
    device: String,
    epoch: u32,
    run: u32,
    frontier: Option<u32>,
    start: Option<u32>,
    high: Option<u32>,
    gap_missing: Option<u32>,
    gap_since: Option<i64>,
}

type RunKey = (String, u32, u32);

/// One kind of one device, being folded.
struct Fold {
    kind: String,
    unit: String,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
    last_ms: i64,
    waiting: u64,
}

impl Store {
    /// Every gap, by device, epoch, run and seq (see the module doc).
    pub fn gaps(&self, device: Option<&str>) -> Result<Vec<Gap>, StoreError> {
        self.find_gaps(device).map_err(|e| self.err(e))
    }

    fn find_gaps(&self, device: Option<&str>) -> rusqlite::Result<Vec<Gap>> {
        let conn = self.conn();
        let runs: Vec<RunRow> = conn
            .prepare(RUNS)?
            .query_map(params![device], |r| {
                Ok(RunRow {
                    device: r.get(0)?,
                    epoch: r.get(1)?,
                    run: r.get(2)?,
                    frontier: r.get(3)?,
                    start: r.get(4)?,
                    high: r.get(5)?,
                    gap_missing: r.get(6)?,
                    gap_since: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut given_up: HashMap<RunKey, Vec<(u32, u32)>> = HashMap::new();
        let mut stmt = conn.prepare(GIVEN_UP)?;
        let mut rows = stmt.query(params![device])?;
        while let Some(r) = rows.next()? {
            given_up
                .entry((r.get(0)?, r.get(1)?, r.get(2)?))
                .or_default()
                .push((r.get(3)?, r.get(4)?));
        }

        // Missing ranges per run, exact (checked against what is used).
        let mut missing: BTreeMap<RunKey, Vec<(u32, u32)>> = BTreeMap::new();
        let mut lowest = conn.prepare(LOWEST_BELOW_START)?;
        let mut used_in = conn.prepare(USED_IN_RANGE)?;
        for r in &runs {
            let key = (r.device.clone(), r.epoch, r.run);
            let mut candidates: Vec<(u32, u32)> = given_up.get(&key).cloned().unwrap_or_default();
            if let (Some(frontier), Some(high)) = (r.frontier, r.high)
                && high > frontier.saturating_add(1)
            {
                candidates.push((frontier + 1, high - 1));
            }
            if let Some(start) = r.start {
                let low: Option<u32> =
                    lowest.query_row(params![r.device, r.epoch, r.run, start], |row| row.get(0))?;
                if let Some(low) = low.filter(|low| low + 1 < start) {
                    candidates.push((low + 1, start - 1));
                }
            }
            let found = missing.entry(key).or_default();
            for (from, to) in candidates {
                let used: Vec<u32> = used_in
                    .query_map(params![r.device, r.epoch, r.run, from, to], |row| {
                        row.get(0)
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                found.extend(holes(from, to, &used));
            }
            if r.run > 0 {
                walk_earlier_runs(conn, r, &mut missing)?;
            }
        }

        let mut before = conn.prepare(BEFORE)?;
        let mut after = conn.prepare(AFTER)?;
        let neighbour = |stmt: &mut rusqlite::Statement, key: &RunKey, seq: u32| {
            stmt.query_row(params![key.0, key.1, key.2, seq], |row| {
                Ok(Neighbour {
                    seq: row.get(0)?,
                    device_time: from_ms(row.get(1)?),
                    received_at: from_ms(row.get(2)?),
                })
            })
            .optional()
        };
        let mut gaps = Vec::new();
        for (key, ranges) in missing {
            let current = runs
                .iter()
                .find(|r| r.device == key.0 && r.epoch == key.1 && r.run == key.2);
            let waits_for = current.and_then(|r| r.gap_missing);
            let mut waiting_shown = false;
            let merged = merge(ranges);
            for &(first, last) in &merged {
                let (Some(b), Some(a)) = (
                    neighbour(&mut before, &key, first)?,
                    neighbour(&mut after, &key, last)?,
                ) else {
                    // Not between two stored readings of the run: unknowable.
                    continue;
                };
                let status = if waits_for.is_some_and(|m| (first..=last).contains(&m)) {
                    waiting_shown = true;
                    GapStatus::Waiting {
                        since: current.and_then(|r| r.gap_since).map(from_ms),
                    }
                } else if let Some(&(from, to)) = given_up
                    .get(&key)
                    .and_then(|g| g.iter().find(|(f, t)| *f <= last && first <= *t))
                {
                    let still: u64 = merged
                        .iter()
                        .map(|&(a, b)| {
                            (u64::from(b.min(to)) + 1).saturating_sub(u64::from(a.max(from)))
                        })
                        .sum();
                    GapStatus::GivenUp {
                        from,
                        to,
                        filled: u64::from(to) - u64::from(from) + 1 - still,
                    }
                } else {
                    GapStatus::Open
                };
                gaps.push(Gap {
                    device: key.0.clone(),
                    epoch: key.1,
                    run: key.2,
                    first,
                    last: Some(last),
                    before: Some(b),
                    after: Some(a),
                    status,
                });
            }
            // Held for a seq with nothing stored above it yet.
            if let (Some(m), Some(r), false) = (waits_for, current, waiting_shown) {
                gaps.push(Gap {
                    device: key.0.clone(),
                    epoch: key.1,
                    run: key.2,
                    first: m,
                    last: None,
                    before: neighbour(&mut before, &key, m)?,
                    after: None,
                    status: GapStatus::Waiting {
                        since: r.gap_since.map(from_ms),
                    },
                });
            }
        }
        Ok(gaps)
    }
}

impl Store {
    /// Count, min, max, mean and last value per device and kind of the
    /// readings received from `since` to `until` (inclusive), by device and
    /// kind; `device` and `kind` narrow it.
    pub fn stats(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        device: Option<&str>,
        kind: Option<&str>,
    ) -> Result<Stats, StoreError> {
        self.find_stats(since, until, device, kind)
            .map_err(|e| self.err(e))
    }

    fn find_stats(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        device: Option<&str>,
        kind: Option<&str>,
    ) -> rusqlite::Result<Stats> {
        let conn = self.conn();
        // Folded here in one pass: SQL would need a second pass over the
        // window for the last value (a bare column follows only a lone max).
        // Rows come in arrival order, a device's readings mostly together:
        // the device found last is tried first, then a map; its kinds are few.
        let mut devices: Vec<(String, Vec<Fold>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut last_device = usize::MAX;
        let mut stmt = conn.prepare(IN_WINDOW)?;
        let mut rows = stmt.query(params![to_ms(since), to_ms(until), device, kind])?;
        while let Some(row) = rows.next()? {
            let device = row.get_ref(0)?.as_str()?;
            if devices.get(last_device).is_none_or(|d| d.0 != device) {
                last_device = match index.get(device) {
                    Some(&i) => i,
                    None => {
                        index.insert(device.to_owned(), devices.len());
                        devices.push((device.to_owned(), Vec::new()));
                        devices.len() - 1
                    }
                };
            }
            let kinds = &mut devices[last_device].1;
            let kind = row.get_ref(1)?.as_str()?;
            let value: f64 = row.get(3)?;
            let time: i64 = row.get(4)?;
            let waiting = u64::from(row.get::<_, bool>(5)?);
            match kinds.iter_mut().find(|f| f.kind == kind) {
                Some(f) => {
                    f.count += 1;
                    f.min = f.min.min(value);
                    f.max = f.max.max(value);
                    f.sum += value;
                    if time >= f.last_ms {
                        (f.last, f.last_ms) = (value, time);
                    }
                    f.waiting += waiting;
                }
                None => kinds.push(Fold {
                    kind: kind.to_owned(),
                    unit: row.get(2)?,
                    count: 1,
                    min: value,
                    max: value,
                    sum: value,
                    last: value,
                    last_ms: time,
                    waiting,
                }),
            }
        }
        let mut groups: Vec<KindStats> = devices
            .into_iter()
            .flat_map(|(device, kinds)| {
                kinds.into_iter().map(move |f| KindStats {
                    device: device.clone(),
                    kind: f.kind,
                    unit: f.unit,
                    count: f.count,
                    min: f.min,
                    max: f.max,
                    mean: f.sum / f.count as f64,
                    last: f.last,
                    last_time: from_ms(f.last_ms),
                    waiting: f.waiting,
                })
            })
            .collect();
        groups.sort_by(|a, b| (&a.device, &a.kind).cmp(&(&b.device, &b.kind)));
        let waiting_all = conn.query_row(WAITING, [], |r| r.get(0))?;
        Ok(Stats {
            groups,
            waiting_all,
        })
    }
}

/// Adds the holes of the runs before `r.run` of `r`'s device and epoch,
/// walking their keys (no bookkeeping is left for a run that is over).
fn walk_earlier_runs(
    conn: &rusqlite::Connection,
    r: &RunRow,
    missing: &mut BTreeMap<RunKey, Vec<(u32, u32)>>,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(USED_IN_EARLIER_RUNS)?;
    let mut rows = stmt.query(params![r.device, r.epoch, r.run])?;
    let mut last: Option<(u32, u32)> = None;
    while let Some(row) = rows.next()? {
        let (seq, run): (u32, u32) = (row.get(0)?, row.get(1)?);
        if let Some((prev_seq, prev_run)) = last
            && prev_run == run
            && seq > prev_seq + 1
        {
            missing
                .entry((r.device.clone(), r.epoch, run))
                .or_default()
                .push((prev_seq + 1, seq - 1));
        }
        last = Some((seq, run));
    }
    Ok(())
}

/// The sub-ranges of `from..=to` not in `used` (sorted, within it).
fn holes(from: u32, to: u32, used: &[u32]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = u64::from(from);
    for &u in used {
        let u = u64::from(u);
        if u > next {
            out.push((next as u32, (u - 1) as u32));
        }
        next = next.max(u + 1);
    }
    if next <= u64::from(to) {
        out.push((next as u32, to));
    }
    out
}

/// `ranges` sorted, overlapping or touching ones joined.
fn merge(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::store::tests::open;

    /// The plan SQLite makes for `sql`, one step per line.
    fn plan(store: &Store, sql: &str, n: usize) -> String {
        let conn = store.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let args: Vec<rusqlite::types::Value> = (0..n)
            .map(|i| match i {
                0 => rusqlite::types::Value::Text("PM-1".into()),
                _ => rusqlite::types::Value::Integer(1),
            })
            .collect();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap();
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("\n")
    }

    #[test]
    fn every_query_on_readings_goes_through_an_index() {
        let (_dir, store) = open();
        for (sql, n, index) in [
            (
                LOWEST_BELOW_START,
                4,
                "USING COVERING INDEX readings_key (device=? AND epoch=? AND seq<?)",
            ),
            (
                USED_IN_RANGE,
                5,
                "USING COVERING INDEX readings_key (device=? AND epoch=? AND seq>? AND seq<?)",
            ),
            (
                USED_IN_EARLIER_RUNS,
                3,
                "USING COVERING INDEX readings_key (device=? AND epoch=?)",
            ),
            (
                BEFORE,
                4,
                "USING INDEX readings_key (device=? AND epoch=? AND seq<?)",
            ),
            (
                AFTER,
                4,
                "USING INDEX readings_key (device=? AND epoch=? AND seq>?)",
            ),
            (
                IN_WINDOW,
                4,
                "USING INDEX readings_received (received_at>? AND received_at<?)",
            ),
            (WAITING, 0, "USING COVERING INDEX readings_queue (state=?)"),
        ] {
            let plan = plan(&store, sql, n);
            assert!(plan.contains(index), "{sql}\n{plan}");
            assert!(!plan.contains("SCAN readings"), "{sql}\n{plan}");
        }
        for (sql, n) in [(USED_IN_RANGE, 5), (USED_IN_EARLIER_RUNS, 3)] {
            let plan = plan(&store, sql, n);
            assert!(
                plan.contains("SEARCH pruned USING PRIMARY KEY (device=? AND epoch=?"),
                "{plan}"
            );
        }
    }

    #[test]
    fn holes_and_merges() {
        assert_eq!(holes(5, 9, &[]), [(5, 9)]);
        assert_eq!(holes(5, 9, &[5, 7, 9]), [(6, 6), (8, 8)]);
        assert_eq!(holes(5, 9, &[5, 6, 7, 8, 9]), []);
        assert_eq!(
            holes(u32::MAX - 1, u32::MAX, &[u32::MAX]),
            [(u32::MAX - 1, u32::MAX - 1)]
        );
        assert_eq!(
            merge(vec![(8, 9), (1, 3), (4, 5), (2, 2)]),
            [(1, 5), (8, 9)]
        );
    }

    /// The other way to find gaps, timed beside the one taken, on the store
    /// of `$HEARTH_SUMMARY_CONFIG` (a million-row fill): `cargo test
    /// --release --lib summary::tests::walking -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn walking_the_key_index_instead() {
        let path = std::path::PathBuf::from(std::env::var("HEARTH_SUMMARY_CONFIG").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let c = crate::config::Config::parse(&text, &path).unwrap();
        let encryption = crate::outbox::Encryption::from_config(&c.store, &path);
        let store = Store::open_read_only(&c.store.path, &encryption).unwrap();
        let time = |what: &str, f: &mut dyn FnMut() -> usize| {
            let mut best = f64::MAX;
            let mut n = 0;
            for _ in 0..5 {
                let began = std::time::Instant::now();
                n = f();
                best = best.min(began.elapsed().as_secs_f64() * 1000.0);
            }
            eprintln!("{what}: best of 5 {best:.1} ms ({n})");
        };
        time("bookkeeping, then index lookups", &mut || {
            store.gaps(None).unwrap().len()
        });
        time("LEAD() over readings_key, runs ignored", &mut || {
            store
                .conn()
                .query_row(
                    "SELECT count(*) FROM (SELECT seq, lead(seq) OVER
                     (PARTITION BY device, epoch ORDER BY seq) AS next FROM readings)
                     WHERE next > seq + 1",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap() as usize
        });
        time("LEAD() by (device, epoch, run)", &mut || {
            store
                .conn()
                .query_row(
                    "SELECT count(*) FROM (SELECT seq, lead(seq) OVER
                     (PARTITION BY device, epoch, run ORDER BY seq) AS next FROM readings)
                     WHERE next > seq + 1",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap() as usize
        });
        time("every key stepped through in Rust", &mut || {
            let mut stmt = store
                .conn()
                .prepare("SELECT epoch, seq, run FROM readings ORDER BY device, epoch, seq")
                .unwrap();
            let mut rows = stmt.query([]).unwrap();
            let (mut n, mut last) = (0, 0u32);
            while let Some(r) = rows.next().unwrap() {
                let seq: u32 = r.get(1).unwrap();
                if seq > last + 1 {
                    n += 1;
                }
                last = seq;
            }
            n
        });
    }
}
