//! Where hearth's log goes, and in what shape.
//!
//! - Started by systemd with stderr connected to the journal
//!   (`JOURNAL_STREAM` names stderr's device and inode), hearth writes to
//!   journald natively: each event's fields become journal fields
//!   (`HEARTH_ERROR`, `HEARTH_TASK`, …) beside `PRIORITY`, `TARGET`,
//!   `CODE_FILE` and `CODE_LINE`, so `journalctl -u hearth
//!   TARGET=hearth::mqtt::publisher` or `-p warning` filters without parsing
//!   text.
//! - On a terminal: human-readable lines, coloured.
//! - `--log-format json`: one JSON object a line, for a log shipper.
//!
//! The level comes from `RUST_LOG` when set, else from the config's
//! `log_level`. Patient values and implant serials are logged at DEBUG only,
//! whatever the format.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The shape of the log (`hearth run --log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// journald when stderr is the journal, else text.
    #[default]
    Auto,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object a line on stderr.
    Json,
    /// Native journald entries with structured fields.
    Journald,
}

/// The prefix of hearth's own fields in the journal.
const FIELD_PREFIX: &str = "HEARTH";

/// Installs the global subscriber; a second call does nothing. `default` is
/// the filter when `RUST_LOG` is unset.
pub fn init(default: &str, format: LogFormat) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some(FIELD_PREFIX.into()))
                    .with_syslog_identifier("hearth".into());
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
            }
            Err(e) => {
                init(default, LogFormat::Text);
                tracing::warn!(error = %e, "Cannot reach journald; logging text to stderr.");
            }
        },
        LogFormat::Json => {
            let _ = tracing_subscriber::fmt()
                .json()
                .with_current_span(false)
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .try_init();
        }
        LogFormat::Text | LogFormat::Auto => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .try_init();
        }
    }
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of the stream systemd connected, and stderr is still it
/// (not redirected by a shell in between).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes one `stat` through the pointer, which points at
    // a zeroed, live `stat`; fd 2 is at worst closed, which fstat reports.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(2, &mut st) };
    rc == 0 && st.st_dev as u64 == dev && st.st_ino as u64 == ino
}
