//! `hearth readings tail [--follow]`: the newest readings, then (with
//! `--follow`) each reading stored and each state change as it happens.
//!
//! Safe beside a running `hearth run`: the store is opened read-only and
//! followed by polling ([`Store::tail_poll`]) in short read transactions
//! that take no write lock and hold no snapshot between polls. The one
//! write is the audit entry of this read, appended once at start before
//! anything is shown ([`super::audit::record_read`], with the count of the
//! readings shown first; what `--follow` shows later is covered by the
//! same entry, whose command line says `--follow`).
//!
//! Ends on SIGINT or SIGTERM, and quietly (exit 0) once stdout is closed
//! (`| head`).
//!
//! [`Store::tail_poll`]: crate::outbox::Store::tail_poll

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::ConfigArg;
use super::readings::safe_bytes;
use super::render::{self, TimeArgs};
use crate::outbox::views::stream::{Event, StreamFilter};
use crate::reading::Kind;

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Keep going: print each reading as it is stored and each state
    /// change (published, delivered, ...) as it happens, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How many of the newest readings to show first.
    #[arg(long, short = 'n', default_value_t = 20, value_name = "N")]
    pub lines: usize,
    /// Only readings of this device (implant serial).
    #[arg(long)]
    pub device: Option<String>,
    /// Only readings of this kind.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Kind::ALL.map(Kind::as_str)))]
    pub kind: Option<String>,
    /// Only readings of this priority.
    #[arg(long, value_parser = ["alert", "routine"])]
    pub priority: Option<String>,
    #[arg(long, value_enum, default_value_t = TailFormat::Table)]
    pub format: TailFormat,
    #[command(flatten)]
    pub time: TimeArgs,
    /// Milliseconds between two looks at the store.
    #[arg(long, default_value_t = 200, hide = true)]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TailFormat {
    /// One line per event, for a person.
    Table,
    /// One JSON object per event: `event`, `at`, `journey` (of a state
    /// change) and the `reading` as `readings list --format json` has it.
    Ndjson,
}

/// An event as NDJSON.
#[derive(Serialize)]
struct EventView<'a> {
    /// `stored`, `published`, `delivered`, `acknowledged`, `refused`,
    /// `requeued`.
    event: &'static str,
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    journey: Option<JourneyView>,
    reading: &'a crate::outbox::ReadingRow,
}

#[derive(Serialize)]
struct JourneyView {
    id: i64,
    pkid: u16,
}

pub fn run(args: TailArgs) -> anyhow::Result<()> {
    let (config, store) = super::readings::open(&args.config)?;
    let filter = StreamFilter {
        device: args.device.clone(),
        kind: args.kind.clone(),
        priority: args.priority.clone(),
    };
    let (first, mut cursor) = store.tail_start(&filter, args.lines)?;
    // Patient data: shown only once the read is in the audit trail.
    super::audit::record_read(&config, first.len(), args.device.as_deref())?;
    if args.follow {
        stop_on_signals();
    }
    let mut out = io::BufWriter::new(io::stdout().lock());
    let printed = (|| -> io::Result<()> {
        if args.format == TailFormat::Table {
            header(&mut out)?;
        }
        print(&mut out, &first, args.format, &args.time)?;
        out.flush()?;
        let interval = Duration::from_millis(args.interval_ms.max(10));
        while args.follow && !STOP.load(Ordering::SeqCst) && !stdout_closed() {
            let poll = store
                .tail_poll(&mut cursor, &filter)
                .map_err(io::Error::other)?;
            print(&mut out, &poll.events, args.format, &args.time)?;
            out.flush()?;
            if !poll.more {
                std::thread::sleep(interval);
            }
        }
        Ok(())
    })();
    match printed {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => match e.downcast::<crate::outbox::StoreError>() {
            Ok(store_error) => Err(store_error.into()),
            Err(e) => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
        },
        Ok(()) => Ok(()),
    }
}

/// Set by SIGINT or SIGTERM: `--follow` ends after its current poll.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handler before anything is printed, so that a signal from
/// someone who saw output always ends the tail cleanly (exit 0).
fn stop_on_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// Whether the reader of stdout has gone (a pipe whose other end closed),
/// so that a quiet `tail --follow | head` ends without waiting for a row.
fn stdout_closed() -> bool {
    let mut fd = libc::pollfd {
        fd: 1,
        events: 0,
        revents: 0,
    };
    // SAFETY: poll on one pollfd that lives through the call, no wait.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

fn header(out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{:<29}  {:<12} {:>7}  {:<12} {:>10}  {:<18} {:>12}  {:<8} NOTE",
        "TIME", "EVENT", "ID", "DEVICE", "SEQ", "KIND", "VALUE", "PRIORITY"
    )
}

fn print(
    out: &mut impl Write,
    events: &[Event],
    format: TailFormat,
    time: &TimeArgs,
) -> io::Result<()> {
    for e in events {
        match format {
            TailFormat::Table => line(out, e, time)?,
            TailFormat::Ndjson => {
                let view = EventView {
                    event: e.what,
                    at: time.rfc3339(e.at),
                    journey: e.journey.map(|(id, pkid)| JourneyView { id, pkid }),
                    reading: &e.reading,
                };
                serde_json::to_writer(&mut *out, &view)?;
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

fn line(out: &mut impl Write, e: &Event, time: &TimeArgs) -> io::Result<()> {
    let r = &e.reading;
    let kind = match &r.detail {
        Some(d) => format!("{} {}", r.kind, safe_bytes(d.as_bytes())),
        None => r.kind.clone(),
    };
    // `late`, `restart`, `conflict` as `readings list` has them, then the
    // journey of a state change.
    let mut note = super::readings::notes(r);
    if let Some((id, pkid)) = e.journey {
        if !note.is_empty() {
            note.push_str(", ");
        }
        note.push_str(&format!("journey {id} pkid {pkid}"));
    }
    let text = format!(
        "{:<29}  {:<12} {:>7}  {:<12} {:>10}  {:<18} {:>12}  {:<8} {}",
        time.show(e.at),
        e.what,
        r.id,
        safe_bytes(r.device.as_bytes()),
        crate::mqtt::payload::reading_key(r.seq, r.epoch, r.run, r.variant),
        kind,
        render::value(r.value, &r.unit),
        r.priority,
        note
    );
    writeln!(out, "{}", text.trim_end())
}
