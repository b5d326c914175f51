//! `hearth readings list` and `hearth status`: views of the store, safe
//! while `hearth run` writes to it. `readings list` shows patient data, so
//! it first appends its entry to the audit trail ([`super::audit`]), its
//! only write. `hearth status` is also the health check: it exits 1 when
//! something needs attention ([`crate::health`]).

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::render::{self, RowsFormat, TimeArgs};
use super::{ConfigArg, Format, UsageError};
use crate::config::Config;
use crate::health::{
    self, CertRole, CertificateFact, CertificateRecord, Facts, Limits, Link, ProcessRecord,
};
use crate::mqtt::payload::time_format::rfc3339;
use crate::outbox::{Counts, ListFilter, ReadingRow, Store};

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only readings in this state.
    #[arg(long, default_value = "all", value_parser = ["queued", "inflight", "delivered", "all"])]
    pub state: String,
    /// Only readings of this device (implant serial).
    #[arg(long)]
    pub device: Option<String>,
    /// Only readings of this kind.
    #[arg(long, value_parser = KINDS)]
    pub kind: Option<String>,
    /// Only alerts, or only routine readings.
    #[arg(long, value_parser = ["alert", "routine"])]
    pub priority: Option<String>,
    /// Only readings received since TIME: RFC 3339 (`2026-11-25T08:00:00Z`)
    /// or an age such as `90s`, `15m`, `2h`, `7d`.
    #[arg(long)]
    pub since: Option<String>,
    /// Only readings received before TIME (RFC 3339 or an age).
    #[arg(long)]
    pub until: Option<String>,
    /// Only seqs in this range: `100-200`, or one seq (best with `--device`).
    #[arg(long, value_name = "FROM-TO")]
    pub seq: Option<String>,
    /// The page after CURSOR: the cursor a full page ends with (`more:
    /// --after CURSOR`).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    /// At most this many readings (a table shows 1000 unless told).
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long, value_enum, default_value_t = RowsFormat::Table)]
    pub format: RowsFormat,
    #[command(flatten)]
    pub time: TimeArgs,
}

/// The kinds a reading can have, for `--kind`.
pub const KINDS: [&str; 7] = [
    "heart_rate",
    "battery_voltage",
    "lead_impedance",
    "pacing_percent",
    "af_burden",
    "episode",
    "shock_delivered",
];

/// Rows a table shows when no `--limit` is given.
const TABLE_PAGE: u64 = 1000;

#[derive(Debug, Args)]
pub struct RejectedArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only frames received since TIME: RFC 3339 or an age (`2h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many frames (the newest).
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `raw` as text that is safe on any terminal: printable ASCII as it is,
/// a backslash doubled, every other byte (control characters, escape
/// sequences, anything not ASCII) as `\xNN`. Reversible.
pub fn safe_bytes(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// `hearth readings rejected`: what the decoder refused, and why.
pub fn rejected(args: RejectedArgs) -> anyhow::Result<()> {
    let since = args
        .since
        .as_deref()
        .map(|s| parse_since(s, Utc::now()))
        .transpose()?;
    let (config, store) = open(&args.config)?;
    let rows = store.rejected(since, args.limit)?;
    // Raw frames hold patient data: shown only once the read is recorded.
    super::audit::record_read(&config, rows.len(), None)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.format {
        Format::Json => {
            let rows: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.id,
                        "received_at": rfc3339(&r.received_at),
                        "port": r.port,
                        "reason": r.reason,
                        "detail": r.detail,
                        "raw": safe_bytes(&r.raw),
                        "raw_hex": r.raw.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                        "bytes": r.raw.len(),
                    })
                })
                .collect();
            serde_json::to_writer(&mut out, &rows)?;
            writeln!(out)?;
        }
        Format::Csv => {
            writeln!(out, "id,received_at,port,reason,detail,bytes,raw")?;
            for r in &rows {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{}",
                    r.id,
                    rfc3339(&r.received_at),
                    render::csv_field(&safe_bytes(r.port.as_bytes())),
                    render::csv_field(&r.reason),
                    render::csv_field(&safe_bytes(r.detail.as_bytes())),
                    r.raw.len(),
                    render::csv_field(&safe_bytes(&r.raw))
                )?;
            }
        }
        Format::Table => {
            writeln!(
                out,
                "{:>7}  {:<24} {:<10} {:>5}  {:<40} RAW",
                "ID", "RECEIVED", "REASON", "BYTES", "DETAIL"
            )?;
            for r in &rows {
                writeln!(
                    out,
                    "{:>7}  {:<24} {:<10} {:>5}  {:<40} {}",
                    r.id,
                    rfc3339(&r.received_at),
                    safe_bytes(r.reason.as_bytes()),
                    r.raw.len(),
                    safe_bytes(r.detail.as_bytes()),
                    safe_bytes(&r.raw)
                )?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Parses `--since`: an RFC 3339 time or an age before now.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, UsageError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || {
        UsageError(format!(
            "`--since {s}` is neither an RFC 3339 time (2026-11-25T08:00:00Z) nor an age (90s, 15m, 2h, 7d)"
        ))
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    Ok(now - chrono::Duration::seconds(secs))
}

pub(super) fn open(config: &ConfigArg) -> anyhow::Result<(Config, Store)> {
    let text = std::fs::read_to_string(&config.config).map_err(|source| {
        crate::config::ConfigError::Read {
            path: config.config.clone(),
            source,
        }
    })?;
    // The CLI needs only the store path: a support engineer may lack read
    // access to the gateway's key, so the file checks are skipped here.
    let mut c = Config::parse(&text, &config.config)?;
    c.source = config.config.clone();
    let encryption = crate::outbox::Encryption::from_config(&c.store, &c.source);
    let store = Store::open_read_only(&c.store.path, &encryption)?;
    Ok((c, store))
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let time = |s: &Option<String>| s.as_deref().map(|s| parse_since(s, now)).transpose();
    let (since, until) = (time(&args.since)?, time(&args.until)?);
    let limit = match (args.limit, args.format) {
        (Some(limit), _) => Some(limit),
        (None, RowsFormat::Table) => Some(TABLE_PAGE),
        (None, _) => None,
    };
    let filter = ListFilter {
        state: (args.state != "all").then(|| args.state.clone()),
        device: args.device.clone(),
        kind: args.kind.clone(),
        priority: args.priority.clone(),
        since,
        until,
        seq: args.seq.as_deref().map(parse_seq_range).transpose()?,
        after: args.after.as_deref().map(parse_cursor).transpose()?,
        limit,
    };
    let (config, store) = open(&args.config)?;
    let rows = store.list(&filter)?;
    // Patient data: shown only once the read is in the audit trail.
    super::audit::record_read(&config, rows.len(), args.device.as_deref())?;
    // A full page: there may be more after its last row.
    let more = rows
        .last()
        .filter(|_| limit.is_some_and(|l| rows.len() as u64 == l))
        .map(cursor);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.format {
        RowsFormat::Json => {
            serde_json::to_writer(&mut out, &rows)?;
            writeln!(out)?;
        }
        RowsFormat::Ndjson => {
            for r in &rows {
                serde_json::to_writer(&mut out, r)?;
                writeln!(out)?;
            }
        }
        RowsFormat::Csv => {
            writeln!(out, "{CSV_HEADER}")?;
            for r in &rows {
                writeln!(out, "{}", csv_row(r))?;
            }
        }
        RowsFormat::Table => {
            table(&mut out, &rows, &args.time, render::terminal_width())?;
            if let Some(c) = &more {
                writeln!(out, "more: --after {c}")?;
            }
        }
    }
    out.flush()?;
    if let (Some(c), false) = (&more, args.format == RowsFormat::Table) {
        eprintln!("more: --after {c}");
    }
    Ok(())
}

/// The header of `readings list --format csv` (and `readings export`).
pub const CSV_HEADER: &str = "id,device,seq,kind,value,unit,priority,detail,device_time,received_at,state,pkid,attempts,delivered_at,epoch,run,variant,late,restart,stored_at";

/// One reading as a line of [`CSV_HEADER`]'s columns; times RFC 3339 UTC.
pub fn csv_row(r: &ReadingRow) -> String {
    let t = |t: &Option<DateTime<Utc>>| t.as_ref().map(rfc3339).unwrap_or_default();
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.id,
        render::csv_field(&r.device),
        r.seq,
        render::csv_field(&r.kind),
        r.value,
        render::csv_field(&r.unit),
        r.priority,
        render::csv_field(r.detail.as_deref().unwrap_or("")),
        rfc3339(&r.device_time),
        rfc3339(&r.received_at),
        r.state,
        r.pkid.map(|p| p.to_string()).unwrap_or_default(),
        r.attempts,
        t(&r.delivered_at),
        r.epoch,
        r.run,
        r.variant,
        r.late,
        r.restart,
        t(&r.stored_at),
    )
}

/// The cursor after `r`: `RECEIVED_MS.ID`, the order `readings list` uses.
fn cursor(r: &ReadingRow) -> String {
    format!("{}.{}", r.received_at.timestamp_millis(), r.id)
}

fn parse_cursor(s: &str) -> Result<(i64, i64), UsageError> {
    s.split_once('.')
        .and_then(|(t, id)| Some((t.parse().ok()?, id.parse().ok()?)))
        .ok_or_else(|| {
            UsageError(format!(
                "`--after {s}` is not a cursor: give the one a full page ends with (`more: --after 1764489600000.1234`)"
            ))
        })
}

/// `--seq 100-200` or `--seq 7`.
pub fn parse_seq_range(s: &str) -> Result<(u32, u32), UsageError> {
    let bad = || {
        UsageError(format!(
            "`--seq {s}` is not a seq range: give `FROM-TO` (`100-200`) or one seq (`7`)"
        ))
    };
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// The notes a reading carries: `late`, `restart`, `conflict`.
pub fn notes(r: &ReadingRow) -> String {
    let note: Vec<&str> = [
        (r.late, "late"),
        (r.restart, "restart"),
        (r.variant > 0, "conflict"),
    ]
    .into_iter()
    .filter_map(|(on, word)| on.then_some(word))
    .collect();
    note.join(",")
}

fn table(
    out: &mut impl Write,
    rows: &[ReadingRow],
    time: &TimeArgs,
    width: Option<usize>,
) -> std::io::Result<()> {
    // Left out first when the terminal is narrow: the higher rank.
    let mut t = render::Table::new(&[
        ("ID", true, 0),
        ("DEVICE", false, 0),
        ("SEQ", true, 0),
        ("KIND", false, 0),
        ("VALUE", true, 0),
        ("PRIORITY", false, 3),
        ("DEVICE TIME", false, 4),
        ("RECEIVED", false, 0),
        ("STATE", false, 0),
        ("PKID", true, 5),
        ("NOTE", false, 2),
    ]);
    for r in rows {
        let kind = match &r.detail {
            Some(d) => format!("{} {}", r.kind, safe_bytes(d.as_bytes())),
            None => r.kind.clone(),
        };
        t.row(vec![
            r.id.to_string(),
            safe_bytes(r.device.as_bytes()),
            crate::mqtt::payload::reading_key(r.seq, r.epoch, r.run, r.variant),
            kind,
            render::value(r.value, &r.unit),
            r.priority.clone(),
            time.show(r.device_time),
            time.show(r.received_at),
            r.state.clone(),
            r.pkid.map(|p| p.to_string()).unwrap_or_default(),
            notes(r),
        ]);
    }
    for line in t.render(width) {
        writeln!(out, "{line}")?;
    }
    writeln!(out, "{} reading(s)", rows.len())
}

/// `hearth status` found something that needs an operator: exit code 1,
/// after the whole view is printed (`main` adds this line on stderr).
#[derive(Debug, thiserror::Error)]
#[error("gateway `{gateway}` needs attention: {}", .problems.join("; "))]
pub struct NeedsAttention {
    pub gateway: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct StatusView {
    gateway: String,
    /// False when `problems` is not empty; `hearth status` then exits 1.
    healthy: bool,
    /// What needs an operator, worst first (see [`crate::health`]).
    problems: Vec<ProblemView>,
    /// The `hearth run` process as it recorded itself; `None` if none did.
    process: Option<ProcessView>,
    database: String,
    readings: Counts,
    oldest_queued_age_secs: Option<i64>,
    session: Option<u64>,
    broker: Option<serde_json::Value>,
    serial: Option<serde_json::Value>,
    requeued_after_lost_session: u64,
    /// Active alarms as last recorded by the running gateway.
    alarms: Vec<String>,
    /// While the broker refuses readings (MQTT 5): the reason code, its
    /// name, the topic, since when (ms), the wait before the next try.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_refusal: Option<serde_json::Value>,
    /// The client and CA certificates of the configuration, read from disk.
    certificates: Vec<CertificateView>,
    /// Where a damaged database was moved at start, if one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    moved_aside: Option<String>,
}

#[derive(Debug, Serialize)]
struct ProblemView {
    /// Stable for scripts: `not-running`, `broker-unreachable`,
    /// `implant-silent`, `alarm`, `certificate-expiring`.
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
struct ProcessView {
    pid: u32,
    /// Whether that process runs now.
    running: bool,
    version: String,
    started: DateTime<Utc>,
    /// Seconds since it started, while it runs.
    uptime_secs: Option<i64>,
}

#[derive(Debug, Serialize)]
struct CertificateView {
    role: CertRole,
    file: String,
    /// The earliest notAfter in the file as it is on disk.
    not_after: Option<DateTime<Utc>>,
    /// Whole days until then; negative once expired.
    days_left: Option<i64>,
    /// What the running gateway loaded, when that differs from the file
    /// (a renewed file is used only after a restart).
    #[serde(skip_serializing_if = "Option::is_none")]
    in_use_not_after: Option<DateTime<Utc>>,
    /// Why the file could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Prints the gateway's state; fails with [`NeedsAttention`] (exit code 1)
/// when [`health::problems`] finds anything, so that it serves as a health
/// check. Certificates are read from the files the configuration names, so
/// their expiry shows even while the gateway is down.
pub fn status(config: &ConfigArg, format: Format) -> anyhow::Result<()> {
    let (c, store) = open(config)?;
    let counts = store.counts()?;
    let json_state = |key: &str| -> anyhow::Result<Option<serde_json::Value>> {
        Ok(store
            .state(key)?
            .and_then(|v| serde_json::from_str(&v).ok()))
    };
    let now = Utc::now();
    let process: Option<ProcessRecord> =
        json_state("process")?.and_then(|v| serde_json::from_value(v).ok());
    let running = process.as_ref().is_some_and(ProcessRecord::is_running);
    let broker = json_state("broker")?;
    let serial = json_state("serial")?;
    let alarms: Vec<String> = json_state("alarms")?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();

    let mut certificates = Vec::new();
    let mut certificate_facts = Vec::new();
    for role in [CertRole::Client, CertRole::Ca] {
        let file = role.file(&c);
        let in_use = json_state(role.state_key())?
            .and_then(|v| serde_json::from_value::<CertificateRecord>(v).ok())
            .filter(|record| running && record.file == file)
            .map(|record| record.not_after());
        let on_disk = crate::certs::not_after(file, role.pem_use());
        let not_after = on_disk.as_ref().ok().copied();
        certificates.push(CertificateView {
            role,
            file: file.display().to_string(),
            not_after,
            days_left: not_after.map(|t| (t - now).num_days()),
            in_use_not_after: in_use.filter(|t| Some(*t) != not_after),
            error: on_disk.as_ref().err().map(ToString::to_string),
        });
        certificate_facts.push(CertificateFact {
            role,
            file: file.to_path_buf(),
            on_disk: not_after,
            in_use,
        });
    }

    let facts = Facts {
        now,
        process: process.clone().map(|p| (p, running)),
        broker: broker.as_ref().and_then(Link::from_json),
        serial: serial.as_ref().and_then(Link::from_json),
        last_received: counts.last_received,
        alarms: alarms.clone(),
        certificates: certificate_facts,
    };
    let problems = health::problems(&facts, &Limits::for_config(&c));
    let view = StatusView {
        gateway: c.gateway_id.clone(),
        healthy: problems.is_empty(),
        problems: problems
            .iter()
            .map(|p| ProblemView {
                code: p.code(),
                message: p.to_string(),
            })
            .collect(),
        process: process.map(|p| ProcessView {
            pid: p.pid,
            running,
            started: p.started(),
            uptime_secs: running.then(|| (now - p.started()).num_seconds()),
            version: p.version,
        }),
        database: c.store.path.display().to_string(),
        oldest_queued_age_secs: counts.oldest_queued.map(|t| (now - t).num_seconds()),
        readings: counts,
        session: store.state("session")?.and_then(|v| v.parse().ok()),
        broker,
        serial,
        broker_refusal: json_state("broker_refusal")?
            .filter(|v| !v.is_null())
            .filter(|_| {
                alarms
                    .iter()
                    .any(|a| a == crate::mqtt::publisher::REFUSED_ALARM)
            }),
        requeued_after_lost_session: store
            .state("requeued_after_lost_session")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        alarms,
        certificates,
        moved_aside: store.state("moved_aside")?,
    };
    let mut out = std::io::stdout().lock();
    if format == Format::Table {
        status_table(&mut out, &view, now)?;
    } else {
        serde_json::to_writer_pretty(&mut out, &view)?;
        writeln!(out)?;
    }
    out.flush()?;
    if view.healthy {
        return Ok(());
    }
    Err(NeedsAttention {
        gateway: view.gateway,
        problems: view.problems.into_iter().map(|p| p.message).collect(),
    }
    .into())
}

fn status_table(
    out: &mut impl Write,
    view: &StatusView,
    now: DateTime<Utc>,
) -> std::io::Result<()> {
    let ago = |t: DateTime<Utc>| match (now - t).to_std() {
        Ok(d) => format!("{} ({} ago)", rfc3339(&t), health::human(d)),
        Err(_) => rfc3339(&t),
    };
    let t = |v: Option<DateTime<Utc>>| v.map(ago).unwrap_or_else(|| "never".into());
    let link = |v: &Option<serde_json::Value>| match v {
        Some(v) => {
            let since = v["since"]
                .as_i64()
                .and_then(DateTime::from_timestamp_millis)
                .map(|t| rfc3339(&t))
                .unwrap_or_default();
            let detail = v["detail"].as_str().unwrap_or("");
            let state = v["state"].as_str().unwrap_or("?");
            if detail.is_empty() {
                format!("{state} since {since}")
            } else {
                format!("{state} since {since} ({detail})")
            }
        }
        None => "unknown (has `hearth run` started?)".into(),
    };
    let r = &view.readings;
    writeln!(out, "gateway          {}", view.gateway)?;
    let process = match &view.process {
        Some(p) if p.running => format!(
            "pid {}, running for {} (hearth {})",
            p.pid,
            health::human(std::time::Duration::from_secs(
                p.uptime_secs.unwrap_or(0).max(0) as u64
            )),
            p.version
        ),
        Some(p) => format!(
            "pid {}, not running (started {}, hearth {})",
            p.pid,
            rfc3339(&p.started),
            p.version
        ),
        None => "unknown (has `hearth run` started?)".into(),
    };
    writeln!(out, "process          {process}")?;
    writeln!(out, "database         {}", view.database)?;
    writeln!(out, "broker           {}", link(&view.broker))?;
    writeln!(out, "serial           {}", link(&view.serial))?;
    writeln!(
        out,
        "session          {}",
        view.session
            .map(|s| s.to_string())
            .unwrap_or_else(|| "none".into())
    )?;
    writeln!(
        out,
        "queued           {} alert, {} routine",
        r.queued_alert, r.queued_routine
    )?;
    writeln!(out, "in flight        {}", r.inflight)?;
    writeln!(out, "delivered        {}", r.delivered)?;
    writeln!(out, "rejected frames  {}", r.rejected_frames)?;
    writeln!(
        out,
        "oldest queued    {}",
        match view.oldest_queued_age_secs {
            Some(s) => format!("{s} s ago"),
            None => "none".into(),
        }
    )?;
    writeln!(out, "last received    {}", t(r.last_received))?;
    writeln!(out, "last delivery    {}", t(r.last_delivered))?;
    writeln!(
        out,
        "alarms           {}",
        if view.alarms.is_empty() {
            "none".to_string()
        } else {
            view.alarms.join(", ")
        }
    )?;
    for c in &view.certificates {
        let label = match c.role {
            CertRole::Client => "certificate     ",
            CertRole::Ca => "CA certificate  ",
        };
        let mut line = match (&c.not_after, c.days_left, &c.error) {
            (Some(end), Some(days), _) if *end > now => {
                format!("`{}` until {} ({days} days left)", c.file, rfc3339(end))
            }
            (Some(end), _, _) => format!("`{}` expired {}", c.file, rfc3339(end)),
            (_, _, Some(error)) => format!("unknown: {error}"),
            _ => format!("`{}` unknown", c.file),
        };
        if let Some(in_use) = &c.in_use_not_after {
            line.push_str(&format!("; hearth uses one until {}", rfc3339(in_use)));
        }
        writeln!(out, "{label} {line}")?;
    }
    if let Some(aside) = &view.moved_aside {
        writeln!(
            out,
            "moved aside      {aside} (a damaged database; needs an operator)"
        )?;
    }
    if let Some(r) = &view.broker_refusal {
        writeln!(
            out,
            "refused          by the broker: reason code 0x{:02X} ({}) on `{}`; next try in {} s",
            r["code"].as_u64().unwrap_or(0),
            r["reason"].as_str().unwrap_or("?"),
            r["topic"].as_str().unwrap_or("?"),
            r["retry_in_secs"].as_u64().unwrap_or(0)
        )?;
    }
    if view.requeued_after_lost_session > 0 {
        writeln!(
            out,
            "requeued         {} reading(s) after the broker lost the session",
            view.requeued_after_lost_session
        )?;
    }
    if view.healthy {
        return writeln!(out, "health           ok");
    }
    writeln!(out, "health           needs attention")?;
    for p in &view.problems {
        writeln!(out, "  - {}", p.message)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_bytes_passes_printable_ascii_and_escapes_the_rest_reversibly() {
        assert_eq!(safe_bytes(b"$R,ok|1A2B"), "$R,ok|1A2B");
        assert_eq!(
            safe_bytes(b"\x1b[2J\\\r\n\xff\x00"),
            r"\x1b[2J\\\x0d\x0a\xff\x00"
        );
        // Every byte value, and back.
        let all: Vec<u8> = (0..=255).collect();
        let shown = safe_bytes(&all);
        assert!(shown.bytes().all(|b| (0x20..0x7f).contains(&b)));
        let mut back = Vec::new();
        let mut rest = shown.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            match (b, tail) {
                (b'\\', [b'\\', t @ ..]) => (back.push(b'\\'), rest = t).1,
                (b'\\', [b'x', h, l, t @ ..]) => {
                    let hex = std::str::from_utf8(&[*h, *l]).unwrap().to_owned();
                    back.push(u8::from_str_radix(&hex, 16).unwrap());
                    rest = t;
                }
                _ => (back.push(b), rest = tail).1,
            }
        }
        assert_eq!(back, all);
    }

    #[test]
    fn since_accepts_times_and_ages() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_since("2h", now).unwrap(),
            now - chrono::Duration::hours(2)
        );
        assert_eq!(
            parse_since("2026-11-25T08:00:00Z", now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-25T08:00:00+00:00"
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("5w", now).is_err());
    }
}
