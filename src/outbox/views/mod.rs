//! Read-only views of the store for the CLI (`hearth readings ...`): each
//! runs on a connection from [`super::Store::open_read_only`], in short
//! reads, so that it never holds the running gateway back. Each query is
//! served by an index; `tests/cli_speed.rs` checks the plans.

pub mod journey;
pub mod series;
pub mod stream;
pub mod summary;

/// The query plan of `sql` with `args`, one detail line per step.
#[cfg(test)]
pub(crate) fn plan(
    store: &super::Store,
    sql: &str,
    args: &[rusqlite::types::Value],
) -> Vec<String> {
    let mut stmt = store
        .conn()
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap();
    stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
        r.get::<_, String>(3)
    })
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::plan;
    use crate::outbox::store::{EXCHANGE_READINGS_BY_ID, LIST_COLUMNS, ListFilter, list_query};
    use crate::outbox::{Encryption, Store};

    /// A plan reads `readings` through `index` (or its primary key), never
    /// all of it without one.
    fn indexed(steps: &[String], index: &str) {
        let text = steps.join(" | ");
        assert!(
            steps.iter().any(|s| s.contains(index)),
            "expected `{index}` in the plan: {text}"
        );
        assert!(
            !steps.iter().any(|s| s == "SCAN readings"),
            "a full scan of readings: {text}"
        );
    }

    /// No sort of the rows unless the plan searched a selective index.
    fn unsorted(steps: &[String]) {
        assert!(
            !steps.iter().any(|s| s.contains("TEMP B-TREE")),
            "a sort of the rows: {}",
            steps.join(" | ")
        );
    }

    #[test]
    fn the_views_of_readings_list_and_show_use_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("plan.db"), &Encryption::Off).unwrap();
        let now = Utc::now();
        let cases: Vec<(&str, ListFilter, &str)> = vec![
            (
                "a page",
                ListFilter {
                    limit: Some(1000),
                    ..Default::default()
                },
                // In index order, stopping at the limit.
                "SCAN readings USING INDEX readings_received",
            ),
            (
                "since",
                ListFilter {
                    since: Some(now),
                    until: Some(now),
                    ..Default::default()
                },
                "SEARCH readings USING INDEX readings_received (received_at>? AND received_at<?)",
            ),
            (
                "after a cursor",
                ListFilter {
                    after: Some((1, 2)),
                    limit: Some(100),
                    ..Default::default()
                },
                "SEARCH readings USING INDEX readings_received (received_at>?)",
            ),
            (
                "a device, a kind and a time",
                ListFilter {
                    device: Some("PM-1".into()),
                    kind: Some("heart_rate".into()),
                    since: Some(now),
                    ..Default::default()
                },
                "SEARCH readings USING INDEX readings_received (received_at>?)",
            ),
            (
                "delivered, a device and a kind, a page",
                ListFilter {
                    state: Some("delivered".into()),
                    device: Some("PM-1".into()),
                    kind: Some("heart_rate".into()),
                    limit: Some(1000),
                    ..Default::default()
                },
                "SCAN readings USING INDEX readings_received",
            ),
            (
                "what waits, alerts only (few rows, sorted)",
                ListFilter {
                    state: Some("queued".into()),
                    priority: Some("alert".into()),
                    ..Default::default()
                },
                "SEARCH readings USING INDEX readings_queue (state=? AND priority=?)",
            ),
            (
                "a seq range of a device (few rows, sorted)",
                ListFilter {
                    device: Some("PM-1".into()),
                    seq: Some((100, 200)),
                    ..Default::default()
                },
                "SEARCH readings USING INDEX readings_key (device=?)",
            ),
        ];
        for (what, filter, index) in cases {
            let (sql, args) = list_query(&filter);
            let steps = plan(&store, &sql, &args);
            println!("{what}: {}", steps.join(" | "));
            indexed(&steps, index);
            if !what.contains("sorted") {
                unsorted(&steps);
            }
        }
        // `show`: the reading, its journeys, the readings of its payload.
        let by_id = format!("{LIST_COLUMNS} WHERE id = ?1");
        for sql in [by_id.as_str(), EXCHANGE_READINGS_BY_ID] {
            indexed(&plan(&store, sql, &[1.into()]), "INTEGER PRIMARY KEY");
        }
        let journey = plan(&store, "SELECT * FROM journeys WHERE id = ?1", &[1.into()]);
        assert!(
            journey.iter().any(|s| s.contains("INTEGER PRIMARY KEY")),
            "{journey:?}"
        );
    }
}
