//! `hearth audit` and `hearth audit verify`: the audit trail of security
//! events ([`crate::audit`]), and the records the CLI itself adds to it.
//!
//! A command that shows patient data (reading values, device ids) records
//! who ran it, what they typed and when, before it prints anything; if the
//! record cannot be written it prints nothing and says why
//! ([`record_read`]). Reading the trail itself shows no patient data and is
//! not recorded.

use std::io::Write;

use chrono::Utc;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::json;

use super::{ConfigArg, UsageError};
use crate::audit::operator::{self, Operator};
use crate::audit::{self, kind, pseudonym};
use crate::config::Config;
use crate::mqtt::payload::time_format::rfc3339;
use crate::outbox::{Encryption, Store};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain: "audit trail intact: N entries, head ID HASH"
    /// (exit 0), or "audit trail broken at entry N: WHY" (exit 1).
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only entries made since TIME: RFC 3339 (`2026-11-25T08:00:00Z`) or
    /// an age such as `90s`, `15m`, `2h`, `7d`.
    #[arg(long)]
    pub since: Option<String>,
    /// Only entries of this kind (e.g. `patient-data-read`).
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// Only entries about this device (its serial; the trail holds only
    /// its reference, which this computes).
    #[arg(long, value_name = "SERIAL")]
    pub device: Option<String>,
    #[arg(long, value_enum, default_value_t = AuditFormat::Table)]
    pub format: AuditFormat,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// A copy of the head kept elsewhere, `ID:HASH` (the status payload's
    /// `audit_head` as the hospital received it): fails too if that entry
    /// is gone or differs, which shows a trail cut short.
    #[arg(long, value_name = "ID:HASH")]
    pub head: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditFormat {
    Table,
    Json,
}

/// The chain does not hold: exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("audit trail broken at entry {id}: {why}")]
pub struct Broken {
    pub id: i64,
    pub why: String,
}

/// A read of patient data that could not be recorded, so was not shown.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot record this read of patient data in the audit trail of store `{store}`, so nothing is shown: {cause} (run it as a user who may write the store, e.g. `sudo -u hearth hearth ...`)"
)]
pub struct ReadNotRecorded {
    pub store: String,
    pub cause: String,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        Some(AuditCommand::Verify(v)) => verify(v),
        None => list(args.list),
    }
}

#[derive(Debug, Serialize)]
struct EntryView {
    id: i64,
    at: String,
    kind: String,
    actor: String,
    detail: serde_json::Value,
    prev: String,
    hash: String,
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let since = args
        .since
        .as_deref()
        .map(|s| super::readings::parse_since(s, Utc::now()))
        .transpose()?;
    if let Some(k) = &args.kind
        && !kind::ALL.contains(&k.as_str())
    {
        return Err(UsageError(format!(
            "`--kind {k}` is no kind of audit entry: one of {}",
            kind::ALL.join(", ")
        ))
        .into());
    }
    let (_, store) = super::readings::open(&args.config)?;
    let reference = match &args.device {
        Some(device) => Some(pseudonym::device_ref_read_only(&store, device)?),
        None => None,
    };
    let entries: Vec<EntryView> = store
        .audit_entries(since)?
        .into_iter()
        .map(|e| EntryView {
            detail: serde_json::from_str(&e.detail).unwrap_or(json!(e.detail)),
            id: e.id,
            at: rfc3339(&e.at),
            kind: e.kind,
            actor: e.actor,
            prev: e.prev,
            hash: e.hash,
        })
        .filter(|e| args.kind.as_ref().is_none_or(|k| e.kind == *k))
        // A store without a reference key has no entry about any device.
        .filter(|e| {
            reference
                .as_ref()
                .is_none_or(|r| r.is_some() && e.detail["device"] == json!(r))
        })
        .collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.format {
        AuditFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &entries)?;
            writeln!(out)?;
        }
        AuditFormat::Table => table(&mut out, &entries)?,
    }
    out.flush()?;
    Ok(())
}

fn table(out: &mut impl Write, entries: &[EntryView]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>6}  {:<24}  {:<20}  {:<28}  DETAIL",
        "ID", "TIME", "KIND", "ACTOR"
    )?;
    for e in entries {
        writeln!(
            out,
            "{:>6}  {:<24}  {:<20}  {:<28}  {}",
            e.id,
            e.at,
            e.kind,
            e.actor,
            short_hashes(&e.detail)
        )?;
    }
    let n = entries.len();
    writeln!(out, "{n} entr{}", if n == 1 { "y" } else { "ies" })
}

/// The detail as compact JSON, with each SHA-256 cut to its first 12 hex
/// digits (`--format json` has them whole).
fn short_hashes(v: &serde_json::Value) -> String {
    fn walk(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::String(s)
                if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                json!(format!("{}…", &s[..12]))
            }
            serde_json::Value::Array(a) => a.iter().map(walk).collect(),
            serde_json::Value::Object(o) => o.iter().map(|(k, v)| (k.clone(), walk(v))).collect(),
            other => other.clone(),
        }
    }
    walk(v).to_string()
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let head = args.head.as_deref().map(parse_head).transpose()?;
    let (_, store) = super::readings::open(&args.config)?;
    let verdict = store.audit_verify()?;
    if let Some((id, why)) = verdict.broken {
        return Err(Broken { id, why }.into());
    }
    if let Some((id, hash)) = &head {
        let entries = store.audit_entries(None)?;
        audit::check_head(&entries, *id, hash).map_err(|why| Broken { id: *id, why })?;
    }
    match verdict.head {
        Some((id, hash)) => println!(
            "audit trail intact: {} entries, head {id} {hash}",
            verdict.entries
        ),
        None => println!("audit trail intact: 0 entries, no head yet"),
    }
    if let Some((id, _)) = head {
        println!("entry {id} matches the head given with `--head`");
    }
    Ok(())
}

/// `ID:HASH`, as `hearth audit verify` prints a head.
fn parse_head(s: &str) -> Result<(i64, String), UsageError> {
    let parsed = s.split_once(':').and_then(|(id, hash)| {
        let id: i64 = id.trim().parse().ok().filter(|id| *id > 0)?;
        let hash = hash.trim();
        (hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| (id, hash.to_ascii_lowercase()))
    });
    parsed.ok_or_else(|| {
        UsageError(format!(
            "`--head {s}` is not ID:HASH (an entry id and its 64-digit SHA-256, as in the status payload's `audit_head` or the line `hearth audit verify` prints)"
        ))
    })
}

/// Opens the store for writing an entry, with the key the CLI reads it with.
fn open_for_append(config: &Config) -> Result<Store, crate::outbox::StoreError> {
    let encryption = Encryption::from_config(&config.store, &config.source);
    Store::open(&config.store.path, &encryption)
}

/// Records that this command shows patient data: `rows` rows, of `device`
/// only if the command named one. Call it after the query and before
/// printing; an error means print nothing.
pub(super) fn record_read(
    config: &Config,
    rows: usize,
    device: Option<&str>,
) -> anyhow::Result<()> {
    let not_recorded = |cause: String| ReadNotRecorded {
        store: config.store.path.display().to_string(),
        cause,
    };
    let mut store = open_for_append(config).map_err(|e| not_recorded(e.to_string()))?;
    let append = |store: &mut Store| -> Result<i64, crate::outbox::StoreError> {
        let reference = device
            .map(|d| pseudonym::device_ref(store, d))
            .transpose()?;
        let operator = Operator::current();
        let mut detail = operator.detail();
        detail.insert("command".into(), json!(command(device, &reference)));
        detail.insert("rows".into(), json!(rows));
        if let Some(r) = &reference {
            detail.insert("device".into(), json!(r));
        }
        store.audit(
            kind::PATIENT_DATA_READ,
            &operator.actor(),
            &serde_json::Value::Object(detail),
        )
    };
    append(&mut store).map_err(|e| not_recorded(e.to_string()))?;
    Ok(())
}

/// Records an operator's reset of `device` (already done, to `run`) in the
/// store that did it.
pub(super) fn record_reset(
    store: &mut Store,
    device: &str,
    reason: &str,
    run: u32,
) -> Result<i64, crate::outbox::StoreError> {
    let reference = pseudonym::device_ref(store, device)?;
    let operator = Operator::current();
    let mut detail = operator.detail();
    detail.insert("device".into(), json!(reference));
    detail.insert("run".into(), json!(run));
    detail.insert("reason".into(), json!(reason));
    detail.insert(
        "command".into(),
        json!(command(Some(device), &Some(reference.clone()))),
    );
    store.audit(
        kind::DEVICE_RESET,
        &operator.actor(),
        &serde_json::Value::Object(detail),
    )
}

/// This process's command line, `device` replaced by its reference.
fn command(device: Option<&str>, reference: &Option<String>) -> String {
    let args: Vec<String> = std::env::args().collect();
    let hide: Vec<(&str, &str)> = device.zip(reference.as_deref()).into_iter().collect();
    operator::command_line(&args, &hide)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_an_id_and_a_sha256() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(
            parse_head(&format!("42:{}", hash.to_uppercase())).unwrap(),
            (42, hash.to_owned())
        );
        for bad in ["42", "x:abc", "0:abc", &format!("-1:{hash}"), "42:abc"] {
            let e = parse_head(bad).unwrap_err().to_string();
            assert!(e.contains("is not ID:HASH"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_table_cuts_hashes_only() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let detail =
            json!({"files": {"config": {"sha256": hash, "file": "/etc/hearth.toml"}}, "rows": 3});
        assert_eq!(
            short_hashes(&detail),
            r#"{"files":{"config":{"file":"/etc/hearth.toml","sha256":"9f86d081884c…"}},"rows":3}"#
        );
    }
}
