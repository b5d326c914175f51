//! `hearth readings stats`: per device and kind, over the readings received
//! in a window (24 hours by default): count, min, max, mean, the last value
//! (by device time) and how many of them still wait for delivery; and how
//! many readings wait in the whole store. Values are patient data: the
//! read is audited before any output.

use std::io::Write;

use chrono::Utc;
use clap::Args;
use serde_json::json;

use super::render::{RowsFormat, Table, TimeArgs, csv_field, terminal_width, value};
use super::{ConfigArg, UsageError};
use crate::outbox::views::summary::KindStats;
use crate::reading::Kind;

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Readings received since TIME: RFC 3339 (`2026-11-25T08:00:00Z`) or
    /// an age such as `90s`, `15m`, `2h`, `7d`.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// ... and up to TIME (RFC 3339 or an age), inclusive; default now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this device (implant serial).
    #[arg(long)]
    pub device: Option<String>,
    /// Only this kind (`heart_rate`, `battery_voltage`, ...).
    #[arg(long)]
    pub kind: Option<String>,
    #[arg(long, value_enum, default_value_t = RowsFormat::Table)]
    pub format: RowsFormat,
    #[command(flatten)]
    pub time: TimeArgs,
}

pub fn run(args: StatsArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let since = super::readings::parse_since(&args.since, now)?;
    let until = match &args.until {
        Some(u) => super::readings::parse_since(u, now)
            .map_err(|_| UsageError(format!("`--until {u}` is neither an RFC 3339 time (2026-11-25T08:00:00Z) nor an age (90s, 15m, 2h, 7d)")))?,
        None => now,
    };
    if until < since {
        return Err(UsageError(format!(
            "`--until {}` is before `--since {}`: the window is empty",
            args.until.as_deref().unwrap_or("now"),
            args.since
        ))
        .into());
    }
    if let Some(k) = &args.kind
        && Kind::parse(k).is_none()
    {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        return Err(UsageError(format!(
            "`--kind {k}` is not a kind of reading (one of: {})",
            known.join(", ")
        ))
        .into());
    }
    let (config, store) = super::readings::open(&args.config)?;
    let stats = store.stats(since, until, args.device.as_deref(), args.kind.as_deref())?;
    // Values and serials: shown only once the read is in the audit trail.
    let rows: u64 = stats.groups.iter().map(|g| g.count).sum();
    super::audit::record_read(&config, rows as usize, args.device.as_deref())?;

    let t = args.time;
    let waiting: u64 = stats.groups.iter().map(|g| g.waiting).sum();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.format {
        RowsFormat::Json => {
            let doc = json!({
                "since": t.rfc3339(since),
                "until": t.rfc3339(until),
                "groups": stats.groups.iter().map(|g| object(g, t)).collect::<Vec<_>>(),
                "total": {"count": rows, "waiting": waiting},
                "waiting_all_time": stats.waiting_all,
            });
            serde_json::to_writer_pretty(&mut out, &doc)?;
            writeln!(out)?;
        }
        RowsFormat::Ndjson => {
            for g in &stats.groups {
                serde_json::to_writer(&mut out, &object(g, t))?;
                writeln!(out)?;
            }
        }
        RowsFormat::Csv => {
            writeln!(
                out,
                "device,kind,unit,count,min,max,mean,last,last_device_time,waiting"
            )?;
            for g in &stats.groups {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&g.device),
                    g.kind,
                    csv_field(&g.unit),
                    g.count,
                    g.min,
                    g.max,
                    g.mean,
                    g.last,
                    t.rfc3339(g.last_time),
                    g.waiting
                )?;
            }
        }
        RowsFormat::Table => {
            let mut table = Table::new(&[
                ("DEVICE", false, 0),
                ("KIND", false, 0),
                ("COUNT", true, 0),
                ("MIN", true, 3),
                ("MAX", true, 3),
                ("MEAN", true, 2),
                ("LAST", true, 0),
                ("LAST AT (DEVICE TIME)", false, 1),
                ("WAITING", true, 0),
            ]);
            for g in &stats.groups {
                table.row(vec![
                    g.device.clone(),
                    g.kind.clone(),
                    g.count.to_string(),
                    value(round(g.min, 1e6), &g.unit),
                    value(round(g.max, 1e6), &g.unit),
                    value(round(g.mean, 1e4), &g.unit),
                    value(round(g.last, 1e6), &g.unit),
                    t.show(g.last_time),
                    g.waiting.to_string(),
                ]);
            }
            let empty = String::new;
            table.row(vec![
                "total".into(),
                empty(),
                rows.to_string(),
                empty(),
                empty(),
                empty(),
                empty(),
                empty(),
                waiting.to_string(),
            ]);
            for line in table.render(terminal_width()) {
                writeln!(out, "{line}")?;
            }
            writeln!(
                out,
                "received {} to {}; WAITING: of these, queued or in flight; {} waiting in the whole store",
                t.show(since),
                t.show(until),
                stats.waiting_all
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A value for a person, to `1 / scale`: no binary noise
/// (`2.9400030000000004`), a mean to four decimals. JSON and CSV keep
/// every digit.
fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}

fn object(g: &KindStats, t: TimeArgs) -> serde_json::Value {
    json!({
        "device": g.device,
        "kind": g.kind,
        "unit": g.unit,
        "count": g.count,
        "min": g.min,
        "max": g.max,
        "mean": g.mean,
        "last": g.last,
        "last_device_time": t.rfc3339(g.last_time),
        "waiting": g.waiting,
    })
}
