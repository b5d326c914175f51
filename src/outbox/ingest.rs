//! Ingest rules: how a well-formed reading from the serial line becomes a
//! stored row. The principle: **a well-formed reading for which there is room
//! is always stored, ACKed and delivered exactly once. Order is the
//! publisher's duty, never a reason to refuse a reading.**
//!
//! A reading's identity is (device, epoch, run, seq, variant); see
//! `migrations/02-device-runs/up.sql`. Each device and epoch has a row in
//! `device_runs` saying where its current run stands: its `frontier` (every
//! seq up to it is stored or was given up) and `high` (the highest seq stored,
//! overall and per priority; alerts can be ahead of the frontier). The rules,
//! in the order they are applied to each reading (a batch is taken in
//! (device, epoch, seq) order):
//!
//! 1. **Resend.** A reading whose (device, epoch, seq) and content hash match
//!    a stored reading, or one pruned after delivery (`pruned`), in any run
//!    or variant, is a resend: ACK it, store nothing. This is checked first,
//!    so a resend is ACKed in every state: store full, gap open, pruned.
//! 2. **First of its device and epoch**, or first after an operator reset:
//!    stored, whatever its seq (0 included).
//! 3. **Next in order** (`seq = frontier + 1`): stored; the frontier moves
//!    over it and over any alerts stored ahead.
//! 4. **After a gap** (`seq > frontier + 1`, seq not used in this run): an
//!    alert is stored at once and the device is asked for the missing seq
//!    (NAK `missing`). A routine reading
//!    is held (NAK `missing`, NAK `gap`) so that routine readings keep seq
//!    order, but only for [`GAP_WAIT`] counted from the first time the gap
//!    was seen, never restarted by a resend; after that it is stored and the
//!    device is taken to have skipped numbers.
//! 5. **At or below the frontier, seq never used in this run** (below the
//!    run's first seq, or in a gap it gave up on, table `given_up`): a late
//!    reading, stored.
//! 6. **Seq used in this run with other content**: stored, or stored and
//!    then pruned (even once its tombstone is gone: any seq from the run's
//!    first up to the frontier that was not given up was used):
//!    - from a v1 device (no epoch on the wire): the device started counting
//!      again (battery change, firmware update). A new run begins with this
//!      reading (flagged `restart`), and the `device-restart` alarm holds for
//!      the device alarm period;
//!    - from a v1.1 device (epoch given): a conflict, since the device says
//!      it is the same count. Stored as the next variant (flagged as a
//!      conflict, its own id), and the `seq-conflict` alarm holds for the
//!      device alarm period.
//!
//! A reading of a v1 device that is older (by its device time) than the
//! first reading of the device's current restarted run was made before the
//! restart and sent late: it goes to the run before when its seq is free
//! there, instead of disturbing the new count (flagged `late` by the rule
//! below, against the readings of that run still in the store).
//!
//! Any stored reading is flagged `late` when a higher seq of the same run
//! and priority was stored before it: it leaves after that one on its topic.
//!
//! Nothing here refuses a well-formed reading for good: the only answers
//! that make a device keep one are BUSY (no room, decided by the caller) and
//! the bounded `gap` hold of rule 4.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::store::to_ms;
use crate::reading::{Priority, Reading};

/// How long a routine reading after a gap is held for the missing one,
/// counted from the first time the gap was seen. A device resends a reading
/// NAKed `missing` at once, so a gap left by a line fault or a crash closes
/// within a round trip or two; a gap that stays open is the device's own.
pub const GAP_WAIT: Duration = Duration::from_secs(2);

/// What happened to one reading handed to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Newly stored: ACK.
    Stored(Flag),
    /// Stored ahead of a gap (an alert): ACK, and ask for `missing`.
    StoredAhead { missing: u32 },
    /// Already stored, or delivered and pruned, with the same content: a
    /// resend; ACK it again.
    Duplicate,
    /// Held for now (rule 4): NAK `missing` for the seq not yet seen, NAK
    /// `gap` for this one. Stored on a resend once the gap wait is over.
    Gap { missing: u32 },
    /// No room: BUSY; the device keeps it and resends later.
    Busy,
}

/// How a stored reading stands against its device's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// In order.
    None,
    /// After a higher seq of its run and priority.
    Late,
    /// Began a new run: a v1 device counted again.
    Restart,
    /// Same (device, epoch, run, seq) as a stored reading, other content.
    Conflict,
}

/// The alarm a device's state raises.
pub const RESTART_ALARM: &str = "device-restart";
pub const CONFLICT_ALARM: &str = "seq-conflict";

const FIND_RESEND: &str = "SELECT 1 FROM readings WHERE device = ?1 AND epoch = ?2 AND seq = ?3
    AND hash = ?4 UNION ALL SELECT 1 FROM pruned WHERE device = ?1 AND epoch = ?2 AND seq = ?3
    AND hash = ?4 LIMIT 1";
const GET_RUN: &str = "SELECT run, frontier, high, high_alert, high_routine, gap_missing,
    gap_since, start, conflicts, start_time FROM device_runs WHERE device = ?1 AND epoch = ?2";
/// Counts a reading stored in an earlier run; the current run's marks stay.
const COUNT_EARLIER: &str = "UPDATE device_runs SET last_heard = ?3, stored = stored + 1,
    late = late + ?4 WHERE device = ?1 AND epoch = ?2";
/// Whether run `?4` holds a higher seq than `?3` of priority `?5`.
const HIGHER_IN_RUN: &str = "SELECT 1 FROM readings WHERE device = ?1 AND epoch = ?2
    AND seq > ?3 AND run = ?4 AND priority = ?5";
/// Whether `?4` lies in a gap the run gave up on.
const GIVEN_UP: &str = "SELECT 1 FROM given_up WHERE device = ?1 AND epoch = ?2 AND run = ?3
    AND from_seq <= ?4 AND to_seq >= ?4";
const GIVE_UP: &str = "INSERT OR IGNORE INTO given_up (device, epoch, run, from_seq, to_seq)
    VALUES (?1, ?2, ?3, ?4, ?5)";
/// The highest variant under (device, epoch, seq, run), stored or pruned.
const TOP_VARIANT: &str = "SELECT max(v) FROM (
    SELECT variant AS v FROM readings WHERE device = ?1 AND epoch = ?2 AND seq = ?3 AND run = ?4
    UNION ALL
    SELECT variant FROM pruned WHERE device = ?1 AND epoch = ?2 AND seq = ?3 AND run = ?4)";
const INSERT_READING: &str = "INSERT INTO readings
    (device, epoch, run, seq, variant, hash, late, restart, kind, value, unit, priority,
     detail, device_time, received_at, stored_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";
const PUT_RUN: &str = "INSERT INTO device_runs (device, epoch, run, high, high_alert,
    high_routine, gap_missing, gap_since, last_heard, stored, late, restarts, conflicts,
    attention, attention_until, frontier, start, start_time)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL, ?7, 1, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
    ON CONFLICT (device, epoch) DO UPDATE SET run = excluded.run, high = excluded.high,
    frontier = excluded.frontier, start = excluded.start, start_time = excluded.start_time,
    high_alert = excluded.high_alert, high_routine = excluded.high_routine,
    gap_missing = NULL, gap_since = NULL, last_heard = excluded.last_heard,
    stored = stored + 1, late = late + excluded.late, restarts = restarts + excluded.restarts,
    conflicts = conflicts + excluded.conflicts,
    attention = coalesce(excluded.attention, attention),
    attention_until = coalesce(excluded.attention_until, attention_until)";
const SET_GAP: &str = "UPDATE device_runs SET gap_missing = ?3, gap_since = ?4
    WHERE device = ?1 AND epoch = ?2";

/// A device run as `device_runs` holds it.
struct Run {
    run: u32,
    frontier: Option<u32>,
    high: Option<u32>,
    high_alert: Option<u32>,
    high_routine: Option<u32>,
    gap_missing: Option<u32>,
    gap_since: Option<i64>,
    start: Option<u32>,
    conflicts: u32,
    start_time: Option<i64>,
}

/// Where a new reading goes, decided by rules 2 to 6.
struct Placement {
    run: u32,
    variant: u32,
    flag: Flag,
    /// The seq this reading skipped over (rule 4, an alert).
    ahead_of: Option<u32>,
    /// The run starts afresh at this reading (rules 2 and 6, restart).
    fresh: bool,
    /// A gap was given up: the frontier jumps to this reading (rule 4).
    skipping: bool,
}

/// Rule 1: is this frame a resend of a reading stored or pruned before?
pub fn is_resend(tx: &Connection, r: &Reading) -> rusqlite::Result<bool> {
    tx.prepare_cached(FIND_RESEND)?.exists(params![
        r.device_id,
        r.epoch_or_zero(),
        r.seq,
        r.content_hash()
    ])
}

/// Rules 2 to 6 for a reading that is not a resend; stores it unless it is
/// held for a gap. Runs inside the caller's transaction. `alarm_for` is how
/// long a restart or conflict keeps its alarm.
pub fn take(
    tx: &Connection,
    r: &Reading,
    now: DateTime<Utc>,
    gap_wait: Duration,
    alarm_for: Duration,
    port: &str,
) -> rusqlite::Result<Insert> {
    let epoch = r.epoch_or_zero();
    let run: Option<Run> = tx
        .prepare_cached(GET_RUN)?
        .query_row(params![r.device_id, epoch], |row| {
            Ok(Run {
                run: row.get(0)?,
                frontier: row.get(1)?,
                high: row.get(2)?,
                high_alert: row.get(3)?,
                high_routine: row.get(4)?,
                gap_missing: row.get(5)?,
                gap_since: row.get(6)?,
                start: row.get(7)?,
                conflicts: row.get(8)?,
                start_time: row.get(9)?,
            })
        })
        .optional()?;
    let seq = i64::from(r.seq);
    if let Some(run) = &run
        && let Some(earlier) = made_before_restart(tx, r, run)?
    {
        let late = tx.prepare_cached(HIGHER_IN_RUN)?.exists(params![
            r.device_id,
            epoch,
            r.seq,
            earlier,
            r.priority.as_str()
        ])?;
        insert(tx, r, earlier, 0, late, false, now)?;
        tx.prepare_cached(COUNT_EARLIER)?
            .execute(params![r.device_id, epoch, to_ms(now), late])?;
        return Ok(Insert::Stored(if late { Flag::Late } else { Flag::None }));
    }
    let placement = match &run {
        // Rule 2.
        None => Placement::fresh(0, Flag::None),
        Some(run) => match run.frontier {
            None => Placement::fresh(run.run, Flag::None),
            Some(frontier) => {
                let next = i64::from(frontier) + 1;
                let mut used: Option<u32> = tx
                    .prepare_cached(TOP_VARIANT)?
                    .query_row(params![r.device_id, epoch, r.seq, run.run], |row| {
                        row.get(0)
                    })?;
                // A seq up to the frontier with no record left was used all
                // the same, unless it was never part of the run: its
                // reading and tombstone were pruned. Its variant is unknown;
                // one past every conflict of the epoch is unused.
                if used.is_none()
                    && seq < next
                    && run.start.is_some_and(|start| r.seq >= start)
                    && !tx.prepare_cached(GIVEN_UP)?.exists(params![
                        r.device_id,
                        epoch,
                        run.run,
                        r.seq
                    ])?
                {
                    used = Some(run.conflicts);
                }
                match used {
                    // Rule 6.
                    Some(_) if r.epoch.is_none() => {
                        tracing::warn!(
                            %port,
                            run = run.run + 1,
                            "A device started counting again (it sends no epoch): a new run begins; the `device-restart` alarm is raised."
                        );
                        Placement::fresh(run.run + 1, Flag::Restart)
                    }
                    Some(top) => {
                        tracing::warn!(
                            %port,
                            variant = top + 1,
                            "A device sent other content under a sequence number it used before: both are kept and delivered; the `seq-conflict` alarm is raised."
                        );
                        Placement {
                            variant: top + 1,
                            ..Placement::at(run.run, Flag::None)
                        }
                        .conflict()
                    }
                    // Rule 3.
                    None if seq == next => Placement::at(run.run, Flag::None),
                    // Rule 5.
                    None if seq < next => Placement::at(run.run, Flag::None),
                    // Rule 4.
                    None => {
                        let missing = frontier + 1;
                        if r.priority == Priority::Alert {
                            Placement {
                                ahead_of: Some(missing),
                                ..Placement::at(run.run, Flag::None)
                            }
                        } else {
                            let since = match (run.gap_missing, run.gap_since) {
                                (Some(m), Some(since)) if m == missing => since,
                                _ => {
                                    tx.prepare_cached(SET_GAP)?.execute(params![
                                        r.device_id,
                                        epoch,
                                        missing,
                                        to_ms(now)
                                    ])?;
                                    to_ms(now)
                                }
                            };
                            if to_ms(now) - since < gap_wait.as_millis() as i64 {
                                return Ok(Insert::Gap { missing });
                            }
                            tracing::warn!(
                                %port,
                                skipped = seq - next,
                                "A device skipped sequence numbers; its later readings are taken."
                            );
                            tx.prepare_cached(GIVE_UP)?.execute(params![
                                r.device_id,
                                epoch,
                                run.run,
                                missing,
                                r.seq - 1
                            ])?;
                            Placement {
                                skipping: true,
                                ..Placement::at(run.run, Flag::None)
                            }
                        }
                    }
                }
            }
        },
    };
    // Rule 5 and every other: late if a higher seq of its run and priority
    // was stored before it.
    let late = match (&run, placement.fresh) {
        (Some(run), false) => match r.priority {
            Priority::Alert => run.high_alert,
            Priority::Routine => run.high_routine,
        }
        .is_some_and(|h| r.seq < h),
        _ => false,
    };
    // A conflict can be late too; the outcome names the conflict.
    let placement = if late && placement.flag == Flag::None {
        Placement {
            flag: Flag::Late,
            ..placement
        }
    } else {
        placement
    };

    insert(
        tx,
        r,
        placement.run,
        placement.variant,
        late,
        placement.flag == Flag::Restart,
        now,
    )?;

    // The run moves on: its marks only ever rise, except when it starts afresh.
    let (mut frontier, mut high, mut high_alert, mut high_routine) = match (&run, placement.fresh) {
        (Some(run), false) => (run.frontier, run.high, run.high_alert, run.high_routine),
        _ => (None, None, None, None),
    };
    // The frontier moves over this reading when it was next (or the run
    // starts here, or a gap was given up), then over what was stored ahead.
    let next = frontier.map_or(i64::from(r.seq), |f| i64::from(f) + 1);
    if i64::from(r.seq) == next || placement.skipping {
        let mut f = r.seq;
        let mut ahead = tx.prepare_cached(TOP_VARIANT)?;
        while f < u32::MAX
            && ahead
                .query_row(params![r.device_id, epoch, f + 1, placement.run], |row| {
                    row.get::<_, Option<u32>>(0)
                })?
                .is_some()
        {
            f += 1;
        }
        frontier = Some(f);
    }
    let raise = |h: &mut Option<u32>| *h = Some(h.map_or(r.seq, |h| h.max(r.seq)));
    raise(&mut high);
    match r.priority {
        Priority::Alert => raise(&mut high_alert),
        Priority::Routine => raise(&mut high_routine),
    }
    let attention = match placement.flag {
        Flag::Restart => Some(RESTART_ALARM),
        Flag::Conflict => Some(CONFLICT_ALARM),
        _ => None,
    };
    let until = attention.map(|_| to_ms(now) + alarm_for.as_millis() as i64);
    tx.prepare_cached(PUT_RUN)?.execute(params![
        r.device_id,
        epoch,
        placement.run,
        high,
        high_alert,
        high_routine,
        to_ms(now),
        late,
        placement.flag == Flag::Restart,
        placement.flag == Flag::Conflict,
        attention,
        until,
        frontier,
        match (&run, placement.fresh) {
            (Some(run), false) => run.start,
            _ => Some(r.seq),
        },
        match (&run, placement.fresh) {
            (Some(run), false) => run.start_time,
            _ => Some(to_ms(r.device_time)),
        },
    ])?;
    Ok(match placement.ahead_of {
        Some(missing) => Insert::StoredAhead { missing },
        None => Insert::Stored(placement.flag),
    })
}

/// The run before `run` when `r` is a v1 reading made (by its device time)
/// before `run` began with a restart, and its seq is free in that run.
fn made_before_restart(tx: &Connection, r: &Reading, run: &Run) -> rusqlite::Result<Option<u32>> {
    let older = r.epoch.is_none()
        && run.run > 0
        && run.start_time.is_some_and(|t| to_ms(r.device_time) < t);
    if !older {
        return Ok(None);
    }
    let earlier = run.run - 1;
    let used: Option<u32> = tx
        .prepare_cached(TOP_VARIANT)?
        .query_row(params![r.device_id, 0, r.seq, earlier], |row| row.get(0))?;
    Ok(used.is_none().then_some(earlier))
}

/// Inserts one reading row.
fn insert(
    tx: &Connection,
    r: &Reading,
    run: u32,
    variant: u32,
    late: bool,
    restart: bool,
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(INSERT_READING)?.execute(params![
        r.device_id,
        r.epoch_or_zero(),
        run,
        r.seq,
        variant,
        r.content_hash(),
        late,
        restart,
        r.kind.as_str(),
        r.value,
        r.kind.unit(),
        r.priority.as_str(),
        r.detail,
        to_ms(r.device_time),
        to_ms(now),
        to_ms(Utc::now()),
    ])?;
    Ok(())
}

impl Placement {
    fn at(run: u32, flag: Flag) -> Placement {
        Placement {
            run,
            variant: 0,
            flag,
            ahead_of: None,
            fresh: false,
            skipping: false,
        }
    }

    fn conflict(self) -> Placement {
        Placement {
            flag: Flag::Conflict,
            ..self
        }
    }

    fn fresh(run: u32, flag: Flag) -> Placement {
        Placement {
            fresh: true,
            ..Placement::at(run, flag)
        }
    }
}

/// The alarms that device states hold at `now` (restart, conflict).
pub fn active_alarms(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<Vec<&'static str>> {
    let mut stmt = conn
        .prepare_cached("SELECT DISTINCT attention FROM device_runs WHERE attention_until > ?1")?;
    let codes: Vec<String> = stmt
        .query_map(params![to_ms(now)], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok([RESTART_ALARM, CONFLICT_ALARM]
        .into_iter()
        .filter(|code| codes.iter().any(|c| c == code))
        .collect())
}

#[cfg(test)]
mod tests {
    //! One test per way a real device was refused or stranded by hearth
    //! 0.1 (issue 6, "Found" 1 to 7), and the review's findings after.

    use std::time::Duration;

    use chrono::{DateTime, TimeDelta, Utc};

    use super::*;
    use crate::outbox::store::tests::{open, reading};
    use crate::outbox::store::{ListFilter, Store, from_ms};

    fn routine(seq: u32) -> Reading {
        reading(seq, Priority::Routine)
    }

    fn alert(seq: u32) -> Reading {
        reading(seq, Priority::Alert)
    }

    /// The same seq with other content, as a device that counts again sends.
    fn other(mut r: Reading) -> Reading {
        r.device_time += TimeDelta::days(1);
        r.value += 1.0;
        r
    }

    fn t0() -> DateTime<Utc> {
        from_ms(1_750_000_000_000)
    }

    fn at(ms: i64) -> DateTime<Utc> {
        t0() + TimeDelta::milliseconds(ms)
    }

    fn put(store: &mut Store, readings: &[Reading], now: DateTime<Utc>) -> Vec<Insert> {
        store.commit_serial("p", readings, &[], now).unwrap()
    }

    const STORED: Insert = Insert::Stored(Flag::None);

    /// (seq, run, variant, late, restart) of every stored reading, by id.
    fn rows(store: &Store) -> Vec<(u32, u32, u32, bool, bool)> {
        let mut all = store.list(&ListFilter::default()).unwrap();
        all.sort_by_key(|r| r.id);
        all.iter()
            .map(|r| (r.seq, r.run, r.variant, r.late, r.restart))
            .collect()
    }

    #[test]
    fn seq_0_as_a_new_devices_first_reading_is_stored() {
        let (_dir, mut store) = open();
        assert_eq!(
            put(&mut store, &[routine(0), routine(1)], t0()),
            [STORED; 2]
        );
        assert!(store.device_alarms(t0()).unwrap().is_empty());
        // A new device may start anywhere, without waiting out a gap.
        let mut late_comer = routine(57);
        late_comer.device_id = "PM-2".into();
        assert_eq!(put(&mut store, &[late_comer], t0()), [STORED]);
    }

    #[test]
    fn a_v1_device_that_counts_again_is_stored_as_a_new_run_and_its_alarm_clears() {
        let (_dir, mut store) = open();
        store.set_device_alarm(Duration::from_secs(60));
        put(&mut store, &[routine(1), routine(2), routine(3)], t0());
        // Battery change: the count starts again at 1, without an epoch.
        assert_eq!(
            put(&mut store, &[other(routine(1))], at(1000)),
            [Insert::Stored(Flag::Restart)]
        );
        assert_eq!(put(&mut store, &[other(routine(2))], at(1100)), [STORED]);
        assert_eq!(store.device_alarms(at(1100)).unwrap(), [RESTART_ALARM]);
        // A resend from before the restart is still recognised.
        assert_eq!(
            put(&mut store, &[routine(3)], at(1200)),
            [Insert::Duplicate]
        );
        assert_eq!(
            rows(&store),
            [
                (1, 0, 0, false, false),
                (2, 0, 0, false, false),
                (3, 0, 0, false, false),
                (1, 1, 0, false, true),
                (2, 1, 0, false, false)
            ]
        );
        // The alarm clears itself once its period is over.
        assert!(store.device_alarms(at(61_001)).unwrap().is_empty());
        let devices = store.devices().unwrap();
        assert_eq!((devices[0].run, devices[0].restarts), (1, 1));
    }

    #[test]
    fn a_v1_1_device_announces_its_restart_with_a_new_epoch() {
        let (_dir, mut store) = open();
        let epoch = |e, r: Reading| Reading {
            epoch: Some(e),
            ..r
        };
        put(
            &mut store,
            &[epoch(1, routine(1)), epoch(1, routine(2))],
            t0(),
        );
        assert_eq!(
            put(&mut store, &[epoch(2, other(routine(1)))], at(10)),
            [STORED]
        );
        // A late reading of the earlier epoch still has its place.
        assert_eq!(put(&mut store, &[epoch(1, routine(3))], at(20)), [STORED]);
        assert!(store.device_alarms(at(20)).unwrap().is_empty());
        let devices = store.devices().unwrap();
        assert_eq!((devices[0].epoch, devices[0].stored), (2, 4));
    }

    #[test]
    fn slow_resends_of_a_reading_after_a_gap_are_stored_within_the_gap_wait() {
        let (_dir, mut store) = open();
        put(&mut store, &[routine(1)], t0());
        // Seq 2 never comes; the device resends 3 every 2.5 s.
        assert_eq!(
            put(&mut store, &[routine(3)], at(0)),
            [Insert::Gap { missing: 2 }]
        );
        assert_eq!(store.devices().unwrap()[0].gap_missing, Some(2));
        assert_eq!(put(&mut store, &[routine(3)], at(2500)), [STORED]);
        assert_eq!(store.devices().unwrap()[0].gap_missing, None);
        // Resends more often than the wait do not restart it either.
        for ms in [3000, 4000, 4900] {
            assert_eq!(
                put(&mut store, &[routine(9)], at(ms)),
                [Insert::Gap { missing: 4 }]
            );
        }
        assert_eq!(put(&mut store, &[routine(9)], at(5000)), [STORED]);
    }

    #[test]
    fn a_reading_after_its_gap_was_given_up_is_stored_late() {
        let (_dir, mut store) = open();
        put(&mut store, &[routine(1)], t0());
        put(&mut store, &[routine(3)], at(0));
        assert_eq!(put(&mut store, &[routine(3)], at(2000)), [STORED]);
        assert_eq!(
            put(&mut store, &[routine(2)], at(3000)),
            [Insert::Stored(Flag::Late)]
        );
        // A late alert too.
        put(&mut store, &[alert(5)], at(3000));
        assert_eq!(
            put(&mut store, &[alert(4)], at(3100)),
            [Insert::Stored(Flag::Late)]
        );
        assert_eq!(
            rows(&store),
            [
                (1, 0, 0, false, false),
                (3, 0, 0, false, false),
                (2, 0, 0, true, false),
                (5, 0, 0, false, false),
                (4, 0, 0, true, false)
            ]
        );
    }

    #[test]
    fn an_alert_after_a_gap_is_stored_at_once_and_its_resend_acked() {
        let (_dir, mut store) = open();
        put(&mut store, &[routine(1)], t0());
        assert_eq!(
            put(&mut store, &[alert(3)], at(0)),
            [Insert::StoredAhead { missing: 2 }]
        );
        // A routine gap is open (5 waits for 2: routine readings keep their
        // order behind the alert); the alert's resend is ACKed.
        assert_eq!(
            put(&mut store, &[routine(5), alert(3)], at(10)),
            [Insert::Gap { missing: 2 }, Insert::Duplicate]
        );
        // The missing one is not late (no routine reading passed it), and
        // the frontier moves over the alert: now 4 is missing.
        assert_eq!(put(&mut store, &[routine(2)], at(20)), [STORED]);
        assert_eq!(
            put(&mut store, &[routine(5)], at(30)),
            [Insert::Gap { missing: 4 }]
        );
        assert_eq!(
            put(&mut store, &[routine(4), routine(5)], at(40)),
            [STORED; 2]
        );
    }

    #[test]
    fn a_resend_is_acked_when_the_store_is_full_and_after_its_reading_was_pruned() {
        let (dir, mut store) = open();
        put(&mut store, &[routine(1)], t0());
        let q = store.next_queued(Priority::Routine, 1).unwrap();
        store.begin_exchange(1, "t", &[q[0].id], t0()).unwrap();
        store.exchange_released(1).unwrap();
        store.complete_exchange(1, t0()).unwrap();
        assert_eq!(store.prune_delivered(at(5)).unwrap(), 1);
        assert!(rows(&store).is_empty());
        assert_eq!(put(&mut store, &[routine(1)], at(10)), [Insert::Duplicate]);
        // Other content under the pruned seq is a new run, not a refusal.
        assert_eq!(
            put(&mut store, &[other(routine(1))], at(20)),
            [Insert::Stored(Flag::Restart)]
        );

        // Full: new readings get BUSY, resends of stored ones an ACK.
        let path = dir.path().join("full.db");
        let mut full = crate::outbox::store::tests::open_at(&path);
        full.set_size_cap(256 * 1024).unwrap();
        let mut seq = 0;
        let busy = loop {
            let batch: Vec<Reading> = (seq..seq + 50).map(routine).collect();
            seq += 50;
            let out = put(&mut full, &batch, t0());
            if out.contains(&Insert::Busy) {
                break out;
            }
            assert!(seq < 100_000, "the cap never filled");
            assert!(!out.is_empty());
        };
        let first_busy = busy.iter().position(|o| *o == Insert::Busy).unwrap();
        assert!(seq > 50, "the first batch already found the store full");
        let stored = routine(seq - 50 + first_busy as u32 - 1);
        assert_eq!(
            put(&mut full, &[stored, routine(seq + 1)], t0()),
            [Insert::Duplicate, Insert::Busy]
        );
    }

    #[test]
    fn late_alerts_leave_after_later_ones_and_are_flagged() {
        let (_dir, mut store) = open();
        put(&mut store, &[alert(5)], t0());
        put(&mut store, &[alert(3)], at(1));
        // Within one batch, order is put right.
        put(&mut store, &[alert(9), alert(8)], at(2));
        let queued = store.next_queued(Priority::Alert, 10).unwrap();
        let order: Vec<(u32, bool)> = queued.iter().map(|r| (r.seq, r.late)).collect();
        assert_eq!(order, [(5, false), (3, true), (8, false), (9, false)]);
    }

    #[test]
    fn a_conflict_from_a_v1_1_device_is_kept_under_its_own_id() {
        let (_dir, mut store) = open();
        store.set_device_alarm(Duration::from_secs(60));
        let first = Reading {
            epoch: Some(4),
            ..routine(7)
        };
        put(&mut store, std::slice::from_ref(&first), t0());
        let second = other(first.clone());
        assert_eq!(
            put(&mut store, std::slice::from_ref(&second), at(1)),
            [Insert::Stored(Flag::Conflict)]
        );
        assert_eq!(
            put(&mut store, &[second, first], at(2)),
            [Insert::Duplicate; 2]
        );
        assert_eq!(store.device_alarms(at(2)).unwrap(), [CONFLICT_ALARM]);
        assert_eq!(
            rows(&store),
            [(7, 0, 0, false, false), (7, 0, 1, false, false)]
        );
        assert_eq!(store.devices().unwrap()[0].conflicts, 1);
    }

    #[test]
    fn pruning_goes_in_bounded_steps_and_keeps_every_tombstone() {
        // Review finding: one unbounded prune held the store thread past
        // the watchdog. Each step deletes at most `limit` readings.
        let (_dir, mut store) = open();
        put(
            &mut store,
            &[routine(1), routine(2), routine(3), routine(4), routine(5)],
            t0(),
        );
        let q = store.next_queued(Priority::Routine, 10).unwrap();
        let ids: Vec<i64> = q.iter().map(|r| r.id).collect();
        store.begin_exchange(1, "t", &ids, t0()).unwrap();
        store.exchange_released(1).unwrap();
        store.complete_exchange(1, t0()).unwrap();
        // Past the delivery, before the tombstones' own time: they stay.
        let before = t0() + TimeDelta::seconds(1);
        assert_eq!(store.prune_delivered_chunk(before, 2).unwrap(), (2, true));
        assert_eq!(store.prune_delivered_chunk(before, 2).unwrap(), (2, true));
        assert_eq!(store.prune_delivered_chunk(before, 2).unwrap(), (1, false));
        assert_eq!(store.prune_delivered_chunk(before, 2).unwrap(), (0, false));
        // Every pruned reading left its tombstone: resends are still known.
        assert_eq!(
            put(&mut store, &[routine(1), routine(5)], at(10)),
            [Insert::Duplicate; 2]
        );
    }

    #[test]
    fn a_v1_device_counting_again_after_its_records_were_pruned_is_a_restart() {
        // Review finding: with the readings and their tombstones gone, the
        // seqs up to the frontier were still used; their ids are taken.
        let (_dir, mut store) = open();
        put(&mut store, &[routine(1), routine(2), routine(3)], t0());
        let q = store.next_queued(Priority::Routine, 10).unwrap();
        let ids: Vec<i64> = q.iter().map(|r| r.id).collect();
        store.begin_exchange(1, "t", &ids, t0()).unwrap();
        store.exchange_released(1).unwrap();
        store.complete_exchange(1, t0()).unwrap();
        let later = Utc::now() + TimeDelta::days(1);
        assert_eq!(store.prune_delivered(later).unwrap(), 3);
        store.prune_delivered(later).unwrap();
        assert_eq!(
            put(&mut store, &[other(routine(1)), other(routine(2))], at(10)),
            [Insert::Stored(Flag::Restart), STORED]
        );
        assert_eq!(
            rows(&store),
            [(1, 1, 0, false, true), (2, 1, 0, false, false)]
        );
        // With an epoch, a forgotten seq is a conflict with a fresh variant.
        let e = |r: Reading| Reading {
            epoch: Some(1),
            ..r
        };
        put(&mut store, &[e(routine(5)), e(routine(6))], at(20));
        store
            .conn_for_tests()
            .execute("DELETE FROM readings WHERE epoch = 1 AND seq = 5", [])
            .unwrap();
        assert_eq!(
            put(&mut store, &[e(other(routine(5)))], at(30)),
            [Insert::Stored(Flag::Conflict)]
        );
        let variants: Vec<u32> = store
            .list(&ListFilter::default())
            .unwrap()
            .iter()
            .filter(|r| r.epoch == 1 && r.seq == 5)
            .map(|r| r.variant)
            .collect();
        assert_eq!(variants, [1]);
    }

    #[test]
    fn a_reading_made_before_a_restart_and_sent_after_it_goes_to_the_run_before() {
        // Review finding 6: a v1 device keeps an unACKed reading across its
        // restart and sends it after the new count began.
        let (_dir, mut store) = open();
        put(&mut store, &[routine(1), routine(2), routine(3)], t0());
        let restarted = |seq| other(routine(seq));
        assert_eq!(
            put(&mut store, &[restarted(1), restarted(2)], at(10)),
            [Insert::Stored(Flag::Restart), STORED]
        );
        // Seq 4 of the old count, made before the restart: run 0 (not late:
        // nothing higher of run 0 left before it).
        assert_eq!(put(&mut store, &[routine(4)], at(20)), [STORED]);
        // The new count goes on undisturbed: no second restart.
        assert_eq!(
            put(&mut store, &[restarted(3), restarted(4)], at(30)),
            [STORED; 2]
        );
        assert_eq!(
            rows(&store),
            [
                (1, 0, 0, false, false),
                (2, 0, 0, false, false),
                (3, 0, 0, false, false),
                (1, 1, 0, false, true),
                (2, 1, 0, false, false),
                (4, 0, 0, false, false),
                (3, 1, 0, false, false),
                (4, 1, 0, false, false)
            ]
        );
        assert_eq!(store.devices().unwrap()[0].restarts, 1);
    }

    #[test]
    fn a_reading_for_a_seq_below_the_runs_start_or_given_up_is_late_not_a_restart() {
        let (_dir, mut store) = open();
        put(&mut store, &[routine(5)], t0());
        put(&mut store, &[routine(7)], at(0));
        put(&mut store, &[routine(7)], at(2500));
        // 4 was never part of the run, 6 was given up: both late.
        assert_eq!(
            put(&mut store, &[routine(4), routine(6)], at(3000)),
            [Insert::Stored(Flag::Late); 2]
        );
    }

    #[test]
    fn a_conflict_below_the_highest_seq_is_flagged_late_too() {
        let (_dir, mut store) = open();
        let e = |r: Reading| Reading {
            epoch: Some(1),
            ..r
        };
        put(&mut store, &[e(routine(5)), e(routine(6))], t0());
        assert_eq!(
            put(&mut store, &[e(other(routine(5)))], at(1)),
            [Insert::Stored(Flag::Conflict)]
        );
        assert_eq!(rows(&store).last(), Some(&(5, 0, 1, true, false)));
    }

    #[test]
    fn an_operator_reset_starts_a_new_run_and_clears_the_alarm() {
        let (_dir, mut store) = open();
        put(&mut store, &[routine(1), routine(2)], t0());
        put(&mut store, &[other(routine(1))], at(1));
        assert_eq!(store.device_alarms(at(1)).unwrap(), [RESTART_ALARM]);
        assert_eq!(
            store.reset_device("PM-1", "battery changed").unwrap(),
            Some(2)
        );
        assert_eq!(store.reset_device("PM-9", "").unwrap(), None);
        assert!(store.device_alarms(at(1)).unwrap().is_empty());
        // The next reading begins run 2, whatever its seq, with no alarm.
        assert_eq!(
            put(&mut store, &[other(other(routine(2)))], at(2)),
            [STORED]
        );
        assert!(store.device_alarms(at(2)).unwrap().is_empty());
        assert_eq!(rows(&store).last(), Some(&(2, 2, 0, false, false)));
        // Any seq begins the new run at once, with no gap to wait out.
        store.reset_device("PM-1", "swapped").unwrap();
        assert_eq!(put(&mut store, &[other(routine(500))], at(3)), [STORED]);
        assert_eq!(rows(&store).last(), Some(&(500, 3, 0, false, false)));
    }
}
