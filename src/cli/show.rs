//! `hearth readings show ID`: one reading and its whole journey, from the
//! serial line to the hospital's broker: received (off the line), stored
//! (the commit after which the ACK was written), each MQTT exchange it went
//! out in (packet id, topic, QoS, every PUBLISH or PUBREL with the
//! connection it went on, PUBREC, how it ended), and the exact payload,
//! rebuilt byte for byte from the readings of its last exchange.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::readings::{notes, open, safe_bytes};
use super::render::{self, TimeArgs};
use super::{ConfigArg, Format, UsageError};
use crate::config::Encoding;
use crate::outbox::views::journey::Journey;

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The reading's id (the ID column of `hearth readings list`).
    pub id: i64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    #[command(flatten)]
    pub time: TimeArgs,
}

/// The payload a journey carried, rebuilt.
struct Payload {
    journey: i64,
    bytes: Vec<u8>,
    encoding: Encoding,
    /// Whether its size and digest match what the journey recorded of the
    /// payload sent; `None` when it recorded none.
    verified: Option<bool>,
}

pub fn run(args: ShowArgs) -> anyhow::Result<()> {
    if args.format == Format::Csv {
        return Err(UsageError(
            "`hearth readings show` has no CSV form: use `--format table` or `--format json`"
                .into(),
        )
        .into());
    }
    let (config, store) = open(&args.config)?;
    let Some((reading, journey_ids)) = store.reading(args.id)? else {
        return Err(UsageError(format!(
            "no reading `{}` in `{}`: it may have been pruned after delivery (`store.retention_days`); `hearth readings list` shows the ids held",
            args.id,
            config.store.path.display()
        ))
        .into());
    };
    let mut journeys: Vec<(i64, Option<Journey>)> = Vec::new();
    for id in &journey_ids {
        journeys.push((*id, store.journey(*id)?));
    }
    // The exact bytes of the last exchange it went out in.
    let mut payload = None;
    let mut payload_gone = None;
    if let Some((_, Some(j))) = journeys.last() {
        match store.readings_by_id(&j.readings)? {
            Ok(batch) => {
                let encoding = match j.encoding.as_str() {
                    "cbor" => Encoding::Cbor,
                    _ => Encoding::Json,
                };
                let bytes =
                    crate::mqtt::publisher::encode_batch(encoding, &config.gateway_id, &batch);
                let verified = j.digest.as_ref().map(|d| {
                    j.bytes == Some(bytes.len() as u64)
                        && *d == crate::outbox::store::digest(&bytes)
                });
                payload = Some(Payload {
                    journey: j.id,
                    bytes,
                    encoding,
                    verified,
                });
            }
            Err(gone) => payload_gone = Some(gone),
        }
    }
    super::audit::record_read(&config, 1, Some(&reading.device))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.format == Format::Json {
        let view = json!({
            "reading": reading,
            "notes": notes(&reading).split(',').filter(|n| !n.is_empty()).collect::<Vec<_>>(),
            "journeys": journeys.iter().map(|(id, j)| match j {
                Some(j) => json!(j),
                None => json!({"id": id, "pruned": true}),
            }).collect::<Vec<_>>(),
            "payload": payload.as_ref().map(|p| json!({
                "journey": p.journey,
                "encoding": match p.encoding { Encoding::Json => "json", Encoding::Cbor => "cbor" },
                "bytes": p.bytes.len(),
                "verified": p.verified,
                "text": (p.encoding == Encoding::Json).then(|| String::from_utf8_lossy(&p.bytes).into_owned()),
                "hex": (p.encoding == Encoding::Cbor).then(|| hex(&p.bytes)),
            })),
        });
        serde_json::to_writer_pretty(&mut out, &view)?;
        writeln!(out)?;
        out.flush()?;
        return Ok(());
    }

    let t = &args.time;
    let r = &reading;
    let mut line = |label: &str, text: String| writeln!(out, "{label:<14}{text}");
    line("reading", format!("{}", r.id))?;
    line(
        "device",
        format!(
            "{}  epoch {}  run {}  seq {}  (reading key {})",
            safe_bytes(r.device.as_bytes()),
            r.epoch,
            r.run,
            r.seq,
            crate::mqtt::payload::reading_key(r.seq, r.epoch, r.run, r.variant)
        ),
    )?;
    let detail = r
        .detail
        .as_deref()
        .map(|d| format!(" {}", safe_bytes(d.as_bytes())))
        .unwrap_or_default();
    line(
        "kind",
        format!(
            "{}{detail}  {}  ({})",
            r.kind,
            render::value(r.value, &r.unit),
            r.priority
        ),
    )?;
    let flags = notes(r);
    line(
        "flags",
        if flags.is_empty() {
            "none".into()
        } else {
            let mut words = Vec::new();
            if r.late {
                words.push("late (a higher seq of its run was stored before it)".to_owned());
            }
            if r.restart {
                words.push("restart (it began a run: the device counted again)".to_owned());
            }
            if r.variant > 0 {
                words.push(format!(
                    "conflict (variant {}: another reading came first under the same seq)",
                    r.variant
                ));
            }
            words.join("; ")
        },
    )?;
    line(
        "measured",
        format!("{}  (device time)", t.show(r.device_time)),
    )?;
    line(
        "received",
        format!("{}  (off the serial line)", t.show(r.received_at)),
    )?;
    match r.stored_at {
        Some(s) => line(
            "stored",
            format!(
                "{}  (+{} ms; committed, then ACKed to the device)",
                t.show(s),
                (s - r.received_at).num_milliseconds()
            ),
        )?,
        None => line(
            "stored",
            "before schema 5 (time not recorded); ACKed after its commit".into(),
        )?,
    }
    let state = match (&r.state[..], r.delivered_at) {
        ("delivered", Some(at)) => format!("delivered {}", t.show(at)),
        (state, _) => state.to_owned(),
    };
    line(
        "state",
        format!("{state}  (put in flight {} time(s))", r.attempts),
    )?;
    if journeys.is_empty() {
        let why = if r.state == "queued" && r.attempts == 0 {
            "not published yet (queued)".to_owned()
        } else {
            format!(
                "none recorded (sent before schema 5, or while the store was near its size cap); last packet id {}",
                r.pkid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "none".into())
            )
        };
        writeln!(out, "\njourney       {why}")?;
    }
    for (n, (id, j)) in journeys.iter().enumerate() {
        writeln!(out)?;
        let Some(j) = j else {
            writeln!(out, "exchange {}  (#{id}: pruned)", n + 1)?;
            continue;
        };
        writeln!(
            out,
            "exchange {}  (#{}): packet id {} on `{}`, QoS {}, {}, {} reading(s)",
            n + 1,
            j.id,
            j.pkid,
            safe_bytes(j.topic.as_bytes()),
            j.qos,
            j.encoding,
            j.readings.len()
        )?;
        writeln!(
            out,
            "  {:<12}{}  (committed; each send below is recorded just before it is written)",
            "begun",
            t.show(j.began_at)
        )?;
        for (k, s) in j.sends.iter().enumerate() {
            let what = if k == 0 {
                "sent"
            } else if s.packet == "PUBREL" {
                "re-released"
            } else {
                "resent"
            };
            writeln!(
                out,
                "  {:<12}{}  {} on connection {}",
                what,
                t.show(s.at),
                s.packet,
                s.connection
            )?;
        }
        if let Some(at) = j.pubrec_at {
            writeln!(
                out,
                "  {:<12}{}  (the broker has it; PUBREL sent)",
                "PUBREC",
                t.show(at)
            )?;
        }
        let end = match (j.outcome.as_deref(), j.ended_at) {
            (Some("delivered"), Some(at)) => format!("{}  delivered (PUBCOMP)", t.show(at)),
            (Some("acknowledged"), Some(at)) => {
                format!("{}  delivered (PUBACK: at least once)", t.show(at))
            }
            (Some("refused"), Some(at)) => format!(
                "{}  refused by the broker (MQTT 5 reason code); queued again",
                t.show(at)
            ),
            (Some("requeued"), Some(at)) => format!(
                "{}  queued again (the broker lost the session or the PUBREL)",
                t.show(at)
            ),
            _ => "open (in flight)".to_owned(),
        };
        writeln!(out, "  {:<12}{end}", "ended")?;
    }
    writeln!(out)?;
    match (&payload, payload_gone) {
        (Some(p), _) => {
            let check = match p.verified {
                Some(true) => "rebuilt from its readings; size and SHA-256 match what was sent",
                Some(false) => {
                    "rebuilt from its readings, but NOT what was sent (size or SHA-256 differ: was `gateway_id` changed, or is this another gateway's config?)"
                }
                None => "rebuilt from its readings; no digest was recorded to check it against",
            };
            writeln!(
                out,
                "payload       exchange #{}, {} bytes, {} ({check})",
                p.journey,
                p.bytes.len(),
                match p.encoding {
                    Encoding::Json => "JSON (docs/mqtt-payloads.md)",
                    Encoding::Cbor => "CBOR (docs/compact-encoding.md), in hex",
                }
            )?;
            match p.encoding {
                Encoding::Json => {
                    let text = std::str::from_utf8(&p.bytes).context("payload is not UTF-8")?;
                    writeln!(out, "{}", safe_bytes(text.as_bytes()))?;
                }
                Encoding::Cbor => writeln!(out, "{}", hex(&p.bytes))?,
            }
        }
        (None, Some(gone)) => writeln!(
            out,
            "payload       cannot be rebuilt: reading {gone} of its exchange was pruned"
        )?,
        (None, None) => {}
    }
    out.flush()?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
