//! `hearth devices`: where each bedside device's count stands (epoch, run,
//! highest seq, an open gap, late readings, restarts, conflicts, its alarm),
//! and `hearth devices reset`, the operator's word that a device starts
//! counting afresh.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use super::{ConfigArg, Format, UsageError};
use crate::mqtt::payload::time_format::rfc3339;
use crate::outbox::{DeviceRow, Store};

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The device id, as `hearth devices` shows it.
    pub device: String,
    /// Why, for the record (e.g. "battery changed").
    #[arg(long)]
    pub reason: String,
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let (config, store) = super::readings::open(&args.config)?;
    let rows = store.devices()?;
    // Device ids are patient data: shown only once the read is audited.
    super::audit::record_read(&config, rows.len(), None)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
        Format::Csv => {
            writeln!(
                out,
                "device,epoch,run,high,last_heard,gap_missing,gap_since,stored,late,restarts,conflicts,alarm,alarm_until"
            )?;
            for d in &rows {
                let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_default();
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    d.device,
                    d.epoch,
                    d.run,
                    opt(d.high),
                    d.last_heard.as_ref().map(rfc3339).unwrap_or_default(),
                    opt(d.gap_missing),
                    d.gap_since.as_ref().map(rfc3339).unwrap_or_default(),
                    d.stored,
                    d.late,
                    d.restarts,
                    d.conflicts,
                    d.alarm.as_deref().unwrap_or(""),
                    d.alarm_until.as_ref().map(rfc3339).unwrap_or_default()
                )?;
            }
        }
        Format::Table => table(&mut out, &rows)?,
    }
    Ok(())
}

fn table(out: &mut impl Write, rows: &[DeviceRow]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<16} {:>5} {:>4} {:>10}  {:<24} {:<12} {:>8} {:>5} {:>8} {:>9}  ALARM",
        "DEVICE",
        "EPOCH",
        "RUN",
        "HIGH SEQ",
        "LAST HEARD",
        "GAP",
        "STORED",
        "LATE",
        "RESTARTS",
        "CONFLICTS"
    )?;
    for d in rows {
        let gap = match d.gap_missing {
            Some(missing) => format!("waits {missing}"),
            None => "-".into(),
        };
        let alarm = match (&d.alarm, &d.alarm_until) {
            (Some(a), Some(until)) => format!("{a} until {}", rfc3339(until)),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<16} {:>5} {:>4} {:>10}  {:<24} {:<12} {:>8} {:>5} {:>8} {:>9}  {}",
            d.device,
            d.epoch,
            d.run,
            d.high.map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
            d.last_heard
                .as_ref()
                .map(rfc3339)
                .unwrap_or_else(|| "-".into()),
            gap,
            d.stored,
            d.late,
            d.restarts,
            d.conflicts,
            alarm
        )?;
    }
    writeln!(out, "{} device(s)", rows.len())
}

/// Opens the store for writing (safe beside a running gateway: SQLite
/// serialises the two writers), resets the device and logs it.
pub fn reset(args: ResetArgs) -> anyhow::Result<()> {
    super::init_logging("info");
    let (config, _read_only) = super::readings::open(&args.config)?;
    if args.reason.trim().is_empty() {
        return Err(UsageError(
            "`--reason` is empty: say why the device is reset (e.g. \"battery changed\")".into(),
        )
        .into());
    }
    let encryption = crate::outbox::Encryption::from_config(&config.store, &config.source);
    let mut store = Store::open(&config.store.path, &encryption).with_context(|| {
        format!(
            "cannot open store `{}` to reset a device",
            config.store.path.display()
        )
    })?;
    match store.reset_device(&args.device, &args.reason)? {
        Some(run) => {
            // The trail names the device by its reference, never its id.
            super::audit::record_reset(&mut store, &args.device, &args.reason, run)
                .with_context(|| {
                    format!(
                        "device `{}` was reset, but the reset could not be recorded in the audit trail",
                        args.device
                    )
                })?;
            // The device id is patient data: the log says what was done,
            // `operator_actions` says to which device.
            tracing::info!(
                run,
                reason = %args.reason,
                "Device reset by an operator: its next reading begins a new run (see `operator_actions`)."
            );
            println!(
                "device `{}` reset: its next reading begins run {run}; recorded in `operator_actions`",
                args.device
            );
            Ok(())
        }
        None => Err(UsageError(format!(
            "no device `{}` in store `{}`: `hearth devices` lists the known ones",
            args.device,
            config.store.path.display()
        ))
        .into()),
    }
}
