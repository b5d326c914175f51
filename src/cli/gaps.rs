//! `hearth readings gaps`: the seqs missing in each device run, with the
//! readings on either side of each gap (their device and received times),
//! the gap the gateway waits on right now, and the ranges it gave up on.
//! Device serials are patient data: the read is audited before any output.
//! How gaps are found, and what counts as one: [`crate::outbox::views::summary`].

use std::io::Write;

use clap::Args;
use serde_json::json;

use super::ConfigArg;
use super::render::{RowsFormat, Table, TimeArgs, csv_field, terminal_width};
use crate::outbox::views::summary::{Gap, GapStatus};

#[derive(Debug, Args)]
pub struct GapsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only this device (implant serial).
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, value_enum, default_value_t = RowsFormat::Table)]
    pub format: RowsFormat,
    #[command(flatten)]
    pub time: TimeArgs,
}

pub fn run(args: GapsArgs) -> anyhow::Result<()> {
    let (config, store) = super::readings::open(&args.config)?;
    let gaps = store.gaps(args.device.as_deref())?;
    // Device serials: shown only once the read is in the audit trail.
    super::audit::record_read(&config, gaps.len(), args.device.as_deref())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let t = args.time;
    match args.format {
        RowsFormat::Json => {
            let rows: Vec<serde_json::Value> = gaps.iter().map(|g| object(g, t)).collect();
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
        RowsFormat::Ndjson => {
            for g in &gaps {
                serde_json::to_writer(&mut out, &object(g, t))?;
                writeln!(out)?;
            }
        }
        RowsFormat::Csv => {
            writeln!(
                out,
                "device,epoch,run,first,last,count,status,since,given_up_from,given_up_to,given_up_filled,\
                 before_seq,before_device_time,before_received_at,after_seq,after_device_time,after_received_at"
            )?;
            for g in &gaps {
                let opt = |v: Option<String>| v.unwrap_or_default();
                let (since, from, to, filled) = status_fields(&g.status);
                let b = g.before.as_ref();
                let a = g.after.as_ref();
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&g.device),
                    g.epoch,
                    g.run,
                    g.first,
                    opt(g.last.map(|l| l.to_string())),
                    opt(g.count().map(|c| c.to_string())),
                    status_word(&g.status),
                    opt(since.map(|s| t.rfc3339(s))),
                    opt(from.map(|v| v.to_string())),
                    opt(to.map(|v| v.to_string())),
                    opt(filled.map(|v| v.to_string())),
                    opt(b.map(|n| n.seq.to_string())),
                    opt(b.map(|n| t.rfc3339(n.device_time))),
                    opt(b.map(|n| t.rfc3339(n.received_at))),
                    opt(a.map(|n| n.seq.to_string())),
                    opt(a.map(|n| t.rfc3339(n.device_time))),
                    opt(a.map(|n| t.rfc3339(n.received_at))),
                )?;
            }
        }
        RowsFormat::Table => {
            if gaps.is_empty() {
                writeln!(out, "no gaps")?;
            } else {
                for line in table(&gaps, t).render(terminal_width()) {
                    writeln!(out, "{line}")?;
                }
                let seqs: u64 = gaps.iter().filter_map(Gap::count).sum();
                writeln!(out, "{} gap(s), {seqs} seq(s) missing", gaps.len())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn table(gaps: &[Gap], t: TimeArgs) -> Table {
    let mut table = Table::new(&[
        ("DEVICE", false, 0),
        ("EPOCH", true, 4),
        ("RUN", true, 5),
        ("MISSING", true, 0),
        ("COUNT", true, 0),
        ("BEFORE (DEVICE TIME)", false, 2),
        ("AFTER (DEVICE TIME)", false, 2),
        ("RECEIVED BEFORE", false, 6),
        ("RECEIVED AFTER", false, 6),
        ("STATUS", false, 1),
    ]);
    let dash = || "-".to_owned();
    for g in gaps {
        let missing = match g.last {
            Some(last) if last == g.first => g.first.to_string(),
            Some(last) => format!("{}-{last}", g.first),
            None => format!("{}-?", g.first),
        };
        let status = match &g.status {
            GapStatus::Open => "open".to_owned(),
            GapStatus::Waiting { since } => match since {
                Some(s) => format!("waiting since {}", t.show(*s)),
                None => "waiting".to_owned(),
            },
            GapStatus::GivenUp { from, to, filled } => {
                let range = if from == to {
                    from.to_string()
                } else {
                    format!("{from}-{to}")
                };
                match filled {
                    0 => format!("given up ({range})"),
                    n => format!("given up ({range}), {n} filled since"),
                }
            }
        };
        table.row(vec![
            g.device.clone(),
            g.epoch.to_string(),
            g.run.to_string(),
            missing,
            g.count().map_or_else(|| "?".to_owned(), |c| c.to_string()),
            g.before
                .as_ref()
                .map_or_else(dash, |n| t.show(n.device_time)),
            g.after
                .as_ref()
                .map_or_else(dash, |n| t.show(n.device_time)),
            g.before
                .as_ref()
                .map_or_else(dash, |n| t.show(n.received_at)),
            g.after
                .as_ref()
                .map_or_else(dash, |n| t.show(n.received_at)),
            status,
        ]);
    }
    table
}

fn status_word(s: &GapStatus) -> &'static str {
    match s {
        GapStatus::Open => "open",
        GapStatus::Waiting { .. } => "waiting",
        GapStatus::GivenUp { .. } => "given_up",
    }
}

/// (waiting since, given up from, to, filled since).
type StatusFields = (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<u32>,
    Option<u32>,
    Option<u64>,
);

fn status_fields(s: &GapStatus) -> StatusFields {
    match s {
        GapStatus::Open => (None, None, None, None),
        GapStatus::Waiting { since } => (*since, None, None, None),
        GapStatus::GivenUp { from, to, filled } => (None, Some(*from), Some(*to), Some(*filled)),
    }
}

/// A gap as JSON, its times as `--utc` says.
fn object(g: &Gap, t: TimeArgs) -> serde_json::Value {
    let side = |n: &Option<crate::outbox::views::summary::Neighbour>| {
        n.as_ref().map(|n| {
            json!({
                "seq": n.seq,
                "device_time": t.rfc3339(n.device_time),
                "received_at": t.rfc3339(n.received_at),
            })
        })
    };
    let (since, from, to, filled) = status_fields(&g.status);
    let mut o = json!({
        "device": g.device,
        "epoch": g.epoch,
        "run": g.run,
        "first": g.first,
        "last": g.last,
        "count": g.count(),
        "status": status_word(&g.status),
        "before": side(&g.before),
        "after": side(&g.after),
    });
    if let GapStatus::Waiting { .. } = g.status {
        o["since"] = json!(since.map(|s| t.rfc3339(s)));
    }
    if let GapStatus::GivenUp { .. } = g.status {
        o["given_up"] = json!({"from": from, "to": to, "filled": filled});
    }
    o
}
