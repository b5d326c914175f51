//! The readings `hearth readings chart` draws: the values of one kind in a
//! window of received time, with the alert episodes (kinds `episode` and
//! `shock_delivered`, priority `alert`) of the same window.
//!
//! One query reads the window and nothing else: a range on `received_at`
//! through the index `readings_received` (the device filter is written so
//! that it cannot steer SQLite to `readings_key`, which would read every
//! reading the device ever sent). The rows are sorted here by device time.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rusqlite::params;

use crate::outbox::store::{from_ms, to_ms};
use crate::outbox::{Store, StoreError};

/// The window's readings of kind `?3` and its alert episodes, of device
/// `?4` (NULL: every device). `?1 <= received_at < ?2`.
pub const SERIES_SQL: &str = "\
SELECT device, kind, priority, detail, value, unit, device_time
  FROM readings
 WHERE received_at >= ?1 AND received_at < ?2
   AND (kind = ?3 OR (priority = 'alert' AND kind IN ('episode', 'shock_delivered')))
   AND (?4 IS NULL OR device = ?4)";

/// The kinds whose alert readings are marked on a chart as episodes.
pub const EPISODE_KINDS: [&str; 2] = ["episode", "shock_delivered"];

/// What a chart shows, per device.
#[derive(Debug, Default)]
pub struct Series {
    /// Per device, in serial order: its line.
    pub lines: BTreeMap<String, Line>,
    /// Alert episodes of every device that matched, in device-time order.
    pub alerts: Vec<AlertMark>,
}

/// One device's readings of the kind, in device-time order.
#[derive(Debug, Default, Clone)]
pub struct Line {
    /// The unit of the values (the last one read; a kind has one unit).
    pub unit: String,
    /// (device time in ms since the Unix epoch, value).
    pub points: Vec<(i64, f64)>,
}

/// An alert episode marked on the chart.
#[derive(Debug, Clone)]
pub struct AlertMark {
    pub device: String,
    /// `episode` or `shock_delivered`.
    pub kind: String,
    /// The episode's type (`VT`, ...), when the device gave one.
    pub detail: Option<String>,
    pub device_time: DateTime<Utc>,
}

impl Series {
    /// Keeps only `device`'s line and alerts.
    pub fn only(mut self, device: &str) -> Series {
        self.lines.retain(|d, _| d == device);
        self.alerts.retain(|a| a.device == device);
        self
    }
}

impl Store {
    /// The readings of `kind` received in `since <= t < until`, of `device`
    /// or of every device, and the alert episodes of the same window.
    pub fn series(
        &self,
        kind: &str,
        device: Option<&str>,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Series, StoreError> {
        let run = || -> rusqlite::Result<Series> {
            let mut stmt = self.conn().prepare_cached(SERIES_SQL)?;
            let mut rows = stmt.query(params![to_ms(since), to_ms(until), kind, device])?;
            let mut series = Series::default();
            while let Some(row) = rows.next()? {
                let device: String = row.get(0)?;
                let row_kind: String = row.get(1)?;
                let priority: String = row.get(2)?;
                let time: i64 = row.get(6)?;
                if priority == "alert" && EPISODE_KINDS.contains(&row_kind.as_str()) {
                    series.alerts.push(AlertMark {
                        device: device.clone(),
                        kind: row_kind.clone(),
                        detail: row.get(3)?,
                        device_time: from_ms(time),
                    });
                }
                if row_kind == kind {
                    let line = series.lines.entry(device).or_default();
                    let unit: String = row.get(5)?;
                    if line.unit != unit {
                        line.unit = unit;
                    }
                    line.points.push((time, row.get(4)?));
                }
            }
            Ok(series)
        };
        let mut series = run().map_err(|e| self.err(e))?;
        for line in series.lines.values_mut() {
            line.points.sort_by_key(|p| p.0);
        }
        series.alerts.sort_by_key(|a| a.device_time);
        Ok(series)
    }

    /// SQLite's plan for [`SERIES_SQL`], one step per `; `: it names the
    /// index `readings_received` (a check for the speed tests).
    pub fn series_plan(&self) -> Result<String, StoreError> {
        let run = || -> rusqlite::Result<String> {
            let mut stmt = self
                .conn()
                .prepare(&format!("EXPLAIN QUERY PLAN {SERIES_SQL}"))?;
            let steps = stmt
                .query_map(params![0i64, 1i64, "heart_rate", "PM-0001"], |r| {
                    r.get::<_, String>(3)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(steps.join("; "))
        };
        run().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::store::tests::open;
    use crate::reading::{Kind, Priority, Reading};

    fn reading(device: &str, seq: u32, kind: Kind, priority: Priority, minute: i64) -> Reading {
        Reading {
            device_id: device.into(),
            epoch: None,
            seq,
            device_time: from_ms(1_700_000_000_000 + minute * 60_000),
            kind,
            value: 60.0 + seq as f64,
            priority,
            detail: (kind == Kind::Episode).then(|| "VT".to_owned()),
        }
    }

    #[test]
    fn the_series_query_reads_only_the_window() {
        let (_dir, store) = open();
        let plan = store.series_plan().unwrap();
        assert!(plan.contains("readings_received"), "{plan}");
        assert!(!plan.contains("readings_key"), "{plan}");
    }

    #[test]
    fn a_series_holds_its_kind_in_device_time_order_and_the_episodes() {
        let (_dir, mut store) = open();
        let at = from_ms(1_700_000_000_000);
        let readings = vec![
            // Sent late: measured before seq 1.
            reading("PM-1", 0, Kind::HeartRate, Priority::Routine, 5),
            reading("PM-1", 1, Kind::HeartRate, Priority::Routine, 1),
            reading("PM-1", 2, Kind::BatteryVoltage, Priority::Routine, 2),
            reading("PM-1", 3, Kind::Episode, Priority::Alert, 3),
            reading("PM-2", 0, Kind::HeartRate, Priority::Routine, 4),
            reading("PM-2", 1, Kind::ShockDelivered, Priority::Alert, 4),
        ];
        store.commit_serial("p", &readings, &[], at).unwrap();
        let window = |since: i64, until: i64| {
            (
                from_ms(1_700_000_000_000 + since),
                from_ms(1_700_000_000_000 + until),
            )
        };
        let (since, until) = window(0, 1);
        let all = store.series("heart_rate", None, since, until).unwrap();
        assert_eq!(all.lines.len(), 2);
        let pm1 = &all.lines["PM-1"];
        assert_eq!(pm1.unit, "bpm");
        let times: Vec<i64> = pm1.points.iter().map(|p| p.0).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert_eq!(pm1.points[0].1, 61.0);
        assert_eq!(all.alerts.len(), 2);
        let one = all.only("PM-1");
        assert_eq!(one.lines.len(), 1);
        assert_eq!(one.alerts.len(), 1);
        assert_eq!(one.alerts[0].kind, "episode");
        assert_eq!(one.alerts[0].detail.as_deref(), Some("VT"));
        let pm2 = store
            .series("heart_rate", Some("PM-2"), since, until)
            .unwrap();
        assert_eq!(pm2.lines.keys().collect::<Vec<_>>(), ["PM-2"]);
        assert_eq!(pm2.alerts[0].kind, "shock_delivered");
        // Received before the window: nothing.
        let (since, until) = window(1, 2);
        let none = store.series("heart_rate", None, since, until).unwrap();
        assert!(none.lines.is_empty() && none.alerts.is_empty());
    }
}
