//! A reading's journey for `hearth readings show`: its row, and each MQTT
//! exchange (`journeys`, schema 5) it went out in.

/// Reading ids as ranges, `7-12,15`: short in the journey row however
/// large the batch. `ids` in any order; the ranges are sorted.
pub fn id_ranges(ids: &[i64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// The ids of [`id_ranges`] text, in order; `None` if it is not such text.
pub fn parse_id_ranges(text: &str) -> Option<Vec<i64>> {
    let mut ids = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 1_000_000 {
                    return None;
                }
                ids.extend(a..=b);
            }
            None => ids.push(part.parse().ok()?),
        }
    }
    Some(ids)
}

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::outbox::store::{
    EXCHANGE_READINGS_BY_ID, LIST_COLUMNS, from_ms, queued_row, reading_row,
};
use crate::outbox::{Queued, ReadingRow, Store, StoreError};

/// One MQTT exchange a reading went out in.
#[derive(Debug, Clone, Serialize)]
pub struct Journey {
    pub id: i64,
    pub pkid: u16,
    pub topic: String,
    pub qos: u8,
    pub encoding: String,
    /// The reading ids of its payload, in payload order.
    pub readings: Vec<i64>,
    /// The payload's size and digest ([`crate::outbox::store::digest`]) as
    /// sent; `None` when the publisher gave none.
    pub bytes: Option<u64>,
    pub digest: Option<String>,
    /// Committed before its first PUBLISH was written.
    pub began_at: DateTime<Utc>,
    /// Each PUBLISH or re-sent PUBREL written.
    pub sends: Vec<Send>,
    pub pubrec_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `delivered`, `acknowledged`, `refused`, `requeued`; `None` while open.
    pub outcome: Option<String>,
}

/// One packet of a journey written to the broker.
#[derive(Debug, Clone, Serialize)]
pub struct Send {
    /// The connection: the store's session counter, as `hearth status`
    /// shows it (`session`).
    pub connection: u64,
    /// `PUBLISH` or `PUBREL`.
    pub packet: &'static str,
    pub at: DateTime<Utc>,
}

/// `12P@1764489600000,13R@...` as [`Send`]s; what does not parse is left out.
fn parse_sends(text: &str) -> Vec<Send> {
    text.split(',')
        .filter_map(|part| {
            let (head, at) = part.split_once('@')?;
            let (connection, packet) = head.split_at(head.len().checked_sub(1)?);
            Some(Send {
                connection: connection.parse().ok()?,
                packet: match packet {
                    "P" => "PUBLISH",
                    "R" => "PUBREL",
                    _ => return None,
                },
                at: from_ms(at.parse().ok()?),
            })
        })
        .collect()
}

const JOURNEY: &str = "SELECT id, pkid, topic, qos, encoding, readings, began_at, sends,
    pubrec_at, ended_at, outcome, bytes, digest FROM journeys WHERE id = ?1";

impl Store {
    /// The reading `id` and the ids of its journeys, oldest first.
    pub fn reading(&self, id: i64) -> Result<Option<(ReadingRow, Vec<i64>)>, StoreError> {
        let run = || -> rusqlite::Result<Option<(ReadingRow, Vec<i64>)>> {
            let row = self
                .conn()
                .prepare_cached(&format!("{LIST_COLUMNS} WHERE id = ?1"))?
                .query_row(params![id], reading_row)
                .optional()?;
            let Some(row) = row else { return Ok(None) };
            let journeys: Option<String> = self
                .conn()
                .prepare_cached("SELECT journeys FROM readings WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))?;
            let ids = journeys
                .unwrap_or_default()
                .split(',')
                .filter_map(|j| j.parse().ok())
                .collect();
            Ok(Some((row, ids)))
        };
        run().map_err(|e| self.err(e))
    }

    /// The journey `id`; `None` once pruned.
    pub fn journey(&self, id: i64) -> Result<Option<Journey>, StoreError> {
        let run = || -> rusqlite::Result<Option<Journey>> {
            self.conn()
                .prepare_cached(JOURNEY)?
                .query_row(params![id], |r| {
                    let readings: String = r.get(5)?;
                    let sends: String = r.get(7)?;
                    Ok(Journey {
                        id: r.get(0)?,
                        pkid: r.get(1)?,
                        topic: r.get(2)?,
                        qos: r.get(3)?,
                        encoding: r.get(4)?,
                        readings: parse_id_ranges(&readings).unwrap_or_default(),
                        began_at: from_ms(r.get(6)?),
                        sends: parse_sends(&sends),
                        pubrec_at: r.get::<_, Option<i64>>(8)?.map(from_ms),
                        ended_at: r.get::<_, Option<i64>>(9)?.map(from_ms),
                        outcome: r.get(10)?,
                        bytes: r.get(11)?,
                        digest: r.get(12)?,
                    })
                })
                .optional()
        };
        run().map_err(|e| self.err(e))
    }

    /// The readings `ids` as the publisher encodes them, in that order;
    /// `Err(id)` names the first one no longer in the store.
    pub fn readings_by_id(&self, ids: &[i64]) -> Result<Result<Vec<Queued>, i64>, StoreError> {
        let run = || -> rusqlite::Result<Result<Vec<Queued>, i64>> {
            let mut stmt = self.conn().prepare_cached(EXCHANGE_READINGS_BY_ID)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                match stmt.query_row(params![id], queued_row).optional()? {
                    Some(q) => out.push(q),
                    None => return Ok(Err(*id)),
                }
            }
            Ok(Ok(out))
        };
        run().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::store::tests::reading;
    use crate::outbox::{Connack, Encryption};
    use crate::reading::Priority;

    #[test]
    fn a_journey_records_each_exchange_its_sends_and_how_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db"), &Encryption::Off).unwrap();
        let now = Utc::now();
        store
            .commit_serial("p", &[reading(1, Priority::Routine)], &[], now)
            .unwrap();
        let id = store.next_queued(Priority::Routine, 1).unwrap()[0].id;
        let (first, _) = store.begin_connect().unwrap();
        store.settle_connack(Connack::Reset, false).unwrap();
        store.begin_exchange(7, "t/readings", &[id], now).unwrap();
        // Sent again on the same connection, then the broker lost the session.
        store.exchange_resent(7).unwrap();
        let (second, _) = store.begin_connect().unwrap();
        store.settle_connack(Connack::Absent, false).unwrap();
        store.begin_exchange(8, "t/readings", &[id], now).unwrap();
        store.exchanges_released(&[8]).unwrap();
        store.complete_exchanges(&[8], Utc::now()).unwrap();

        let (row, journeys) = store.reading(id).unwrap().unwrap();
        assert_eq!(row.state, "delivered");
        assert_eq!(row.attempts, 2);
        assert!(row.stored_at.is_some());
        assert_eq!(journeys.len(), 2);
        let lost = store.journey(journeys[0]).unwrap().unwrap();
        assert_eq!((lost.pkid, lost.outcome.as_deref()), (7, Some("requeued")));
        assert_eq!(lost.readings, vec![id]);
        let sends: Vec<(u64, &str)> = lost
            .sends
            .iter()
            .map(|s| (s.connection, s.packet))
            .collect();
        assert_eq!(sends, vec![(first, "PUBLISH"), (first, "PUBLISH")]);
        assert!(lost.pubrec_at.is_none());
        let done = store.journey(journeys[1]).unwrap().unwrap();
        assert_eq!((done.pkid, done.outcome.as_deref()), (8, Some("delivered")));
        assert_eq!(done.sends[0].connection, second);
        assert!(done.pubrec_at.is_some());
        assert_eq!(done.ended_at, row.delivered_at);
        // Its payload's readings, in order.
        assert_eq!(
            store.readings_by_id(&done.readings).unwrap().unwrap()[0].id,
            id
        );

        // Pruned with its reading.
        store
            .prune_delivered(Utc::now() + chrono::Duration::hours(1))
            .unwrap();
        assert!(store.reading(id).unwrap().is_none());
        assert!(store.journey(journeys[0]).unwrap().is_none());
        assert!(store.journey(journeys[1]).unwrap().is_none());
    }

    #[test]
    fn past_the_intake_limit_exchanges_go_on_without_journeys() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db"), &Encryption::Off).unwrap();
        store.set_size_cap(256 * 1024).unwrap();
        let now = Utc::now();
        let mut seq = 0;
        // Fill to the intake limit: the store answers BUSY.
        'fill: loop {
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    seq += 1;
                    reading(seq, Priority::Routine)
                })
                .collect();
            for outcome in store.commit_serial("p", &batch, &[], now).unwrap() {
                if outcome == crate::outbox::Insert::Busy {
                    break 'fill;
                }
            }
        }
        let journeys = |s: &Store| -> i64 {
            s.conn()
                .query_row("SELECT count(*) FROM journeys", [], |r| r.get(0))
                .unwrap()
        };
        store.begin_connect().unwrap();
        store.settle_connack(Connack::Reset, false).unwrap();
        let ids: Vec<i64> = store
            .next_queued(Priority::Routine, 20)
            .unwrap()
            .iter()
            .map(|q| q.id)
            .collect();
        store
            .begin_exchange_with(9, "t/readings", &ids, now, Some(b"payload"))
            .unwrap();
        store.exchange_resent(9).unwrap();
        assert_eq!(store.exchanges_released(&[9]).unwrap(), vec![true]);
        assert_eq!(store.complete_exchanges(&[9], now).unwrap(), ids.len());
        assert_eq!(journeys(&store), 0, "no journey written past the limit");
        let (row, listed) = store.reading(ids[0]).unwrap().unwrap();
        assert_eq!((row.state.as_str(), listed.len()), ("delivered", 0));
    }

    #[test]
    fn a_refused_exchange_ends_its_journey_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("j.db"), &Encryption::Off).unwrap();
        let now = Utc::now();
        store
            .commit_serial("p", &[reading(1, Priority::Alert)], &[], now)
            .unwrap();
        let id = store.next_queued(Priority::Alert, 1).unwrap()[0].id;
        store.begin_connect().unwrap();
        store.settle_connack(Connack::Reset, false).unwrap();
        store.begin_exchange(3, "t/alerts", &[id], now).unwrap();
        store.exchange_refused(3).unwrap();
        let (row, journeys) = store.reading(id).unwrap().unwrap();
        assert_eq!(row.state, "queued");
        let j = store.journey(journeys[0]).unwrap().unwrap();
        assert_eq!(j.outcome.as_deref(), Some("refused"));
        assert!(j.ended_at.is_some());
    }

    #[test]
    fn id_ranges_round_trip() {
        assert_eq!(id_ranges(&[15, 7, 8, 9, 10, 11, 12]), "7-12,15");
        assert_eq!(id_ranges(&[]), "");
        assert_eq!(id_ranges(&[3]), "3");
        assert_eq!(
            parse_id_ranges("7-12,15").unwrap(),
            vec![7, 8, 9, 10, 11, 12, 15]
        );
        assert_eq!(parse_id_ranges("x"), None);
    }
}
