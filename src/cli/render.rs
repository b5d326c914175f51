//! What the readings views share: output formats, times in the local time
//! zone with their offset (or UTC with `--utc`), values with their unit,
//! CSV fields, and the terminal's width.

use chrono::{DateTime, Local, Utc};
use clap::{Args, ValueEnum};

/// The shape of a view of readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RowsFormat {
    /// Aligned columns for a person, fitted to the terminal's width.
    Table,
    /// One JSON array.
    Json,
    /// One JSON object per line (newline-delimited JSON), for `jq` and logs.
    Ndjson,
    /// RFC 4180 CSV with a header line.
    Csv,
}

/// `--utc`: how a view shows times.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct TimeArgs {
    /// Show times in UTC (`2026-11-30T08:00:00Z`) instead of the local time
    /// zone with its offset (`2026-11-30 09:00:00+01:00`). JSON, NDJSON
    /// and CSV always carry RFC 3339 times in UTC.
    #[arg(long)]
    pub utc: bool,
}

impl TimeArgs {
    /// `t` for a table: local time with its UTC offset, or UTC.
    pub fn show(&self, t: DateTime<Utc>) -> String {
        if self.utc {
            t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
        } else {
            t.with_timezone(&Local)
                .format("%Y-%m-%d %H:%M:%S%.3f%:z")
                .to_string()
        }
    }

    /// `t` for JSON, NDJSON and CSV: RFC 3339 in UTC, whatever `--utc`
    /// says, so that what a script reads never depends on the machine's
    /// time zone.
    pub fn rfc3339(&self, t: DateTime<Utc>) -> String {
        crate::mqtt::payload::time_format::rfc3339(&t)
    }
}

/// A value with its unit: `72 bpm`, `2.79 V`, `540 ohm`, `12.5 %`.
pub fn value(v: f64, unit: &str) -> String {
    if unit.is_empty() {
        format!("{v}")
    } else {
        format!("{v} {unit}")
    }
}

/// A CSV field (RFC 4180): quoted when it holds a comma, a quote or a line
/// break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The width of the terminal on stdout: `COLUMNS` when set, else the
/// terminal's own; `None` when stdout is not a terminal (then tables are
/// not cut).
pub fn terminal_width() -> Option<usize> {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return Some(n);
    }
    // SAFETY: isatty and ioctl(TIOCGWINSZ) on fd 1 with a zeroed winsize.
    unsafe {
        if libc::isatty(1) != 1 {
            return None;
        }
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0)
            .then_some(ws.ws_col as usize)
    }
}

/// Whether stderr is a terminal (progress bars go there, and only then).
pub fn stderr_is_terminal() -> bool {
    // SAFETY: isatty on fd 2.
    unsafe { libc::isatty(2) == 1 }
}

/// A table fitted to a width: each column has a minimum and a preferred
/// width; when the preferred widths do not fit, the columns given up first
/// (highest `drop` rank) are left out, then the rest are cut with `…`.
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

struct Column {
    title: &'static str,
    right: bool,
    /// Left out first when space is short: higher goes first; 0 never.
    drop: u8,
}

impl Table {
    /// `columns`: (title, right-aligned, drop rank).
    pub fn new(columns: &[(&'static str, bool, u8)]) -> Table {
        Table {
            columns: columns
                .iter()
                .map(|&(title, right, drop)| Column { title, right, drop })
                .collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    /// The table as lines, fitted to `width` (`None`: as wide as it needs).
    pub fn render(&self, width: Option<usize>) -> Vec<String> {
        let n = self.columns.len();
        let mut widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.columns[i].title.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut shown: Vec<bool> = vec![true; n];
        let total = |widths: &[usize], shown: &[bool]| -> usize {
            let k = shown.iter().filter(|s| **s).count();
            widths
                .iter()
                .zip(shown)
                .filter(|(_, s)| **s)
                .map(|(w, _)| *w)
                .sum::<usize>()
                + 2 * k.saturating_sub(1)
        };
        if let Some(width) = width {
            // Leave out columns, highest drop rank first.
            let mut ranks: Vec<(u8, usize)> = self
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.drop > 0)
                .map(|(i, c)| (c.drop, i))
                .collect();
            ranks.sort_by(|a, b| b.cmp(a));
            for (_, i) in ranks {
                if total(&widths, &shown) <= width {
                    break;
                }
                shown[i] = false;
            }
            // Then cut the widest column that is shown, down to 8.
            while total(&widths, &shown) > width {
                let Some((i, w)) = widths
                    .iter()
                    .enumerate()
                    .filter(|(i, w)| shown[*i] && **w > 8)
                    .max_by_key(|(_, w)| **w)
                    .map(|(i, w)| (i, *w))
                else {
                    break;
                };
                widths[i] = w - 1;
            }
        }
        let line = |cells: &mut dyn Iterator<Item = (usize, &str)>| -> String {
            let parts: Vec<String> = cells
                .filter(|(i, _)| shown[*i])
                .map(|(i, cell)| {
                    let w = widths[i];
                    let cell = cut(cell, w);
                    if self.columns[i].right {
                        format!("{cell:>w$}")
                    } else {
                        format!("{cell:<w$}")
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_owned()
        };
        let mut out = Vec::with_capacity(self.rows.len() + 1);
        out.push(line(&mut self.columns.iter().map(|c| c.title).enumerate()));
        for r in &self.rows {
            out.push(line(&mut r.iter().map(String::as_str).enumerate()));
        }
        out
    }
}

/// `s` cut to `w` characters, the last one `…` when cut.
fn cut(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(w.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_drops_low_rank_columns_then_cuts_to_fit() {
        let mut t = Table::new(&[("ID", true, 0), ("NOTE", false, 2), ("KIND", false, 0)]);
        t.row(vec!["1".into(), "late,restart".into(), "heart_rate".into()]);
        let wide = t.render(None);
        assert_eq!(wide[1], " 1  late,restart  heart_rate");
        let narrow = t.render(Some(16));
        assert_eq!(narrow[0], "ID  KIND");
        assert_eq!(narrow[1], " 1  heart_rate");
        let tiny = t.render(Some(12));
        assert!(tiny.iter().all(|l| l.chars().count() <= 12), "{tiny:?}");
        assert!(tiny[1].ends_with('…'));
    }

    #[test]
    fn times_show_in_utc_or_with_the_local_offset() {
        let t = DateTime::parse_from_rfc3339("2026-11-30T08:00:00.250Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(TimeArgs { utc: true }.show(t), "2026-11-30T08:00:00.250Z");
        let local = TimeArgs { utc: false }.show(t);
        // `+00:00` on a machine in UTC, else its own offset: always one.
        assert!(
            local.len() == "2026-11-30 08:00:00.250+00:00".len()
                && matches!(&local[23..24], "+" | "-"),
            "{local}"
        );
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a"), "a");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
