//! `hearth readings export`: readings to a file, as CSV, JSON or NDJSON.
//!
//! - Streamed: rows go from one statement through a `BufWriter` to the
//!   file; none is collected, so a million rows need little memory.
//! - All or nothing under the name: the export is written to
//!   `FILE.partial` beside `FILE`, flushed to disk (fsync), then renamed to
//!   `FILE`, so a failed or killed export never leaves a half file under
//!   that name (a killed one may leave the `.partial`). An existing `FILE`
//!   is kept unless `--force`.
//! - Audited: the rows are counted first, in the same snapshot the export
//!   then reads, and the read is recorded with that count before the
//!   first byte is written ([`super::audit::record_read`], the only write).
//! - A progress bar on stderr when stderr is a terminal, nothing else
//!   there but the closing line ("exported N readings to FILE ...").

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::Utc;
use clap::{Args, ValueEnum};

use super::render;
use super::{ConfigArg, UsageError};
use crate::outbox::ReadingRow;
use crate::outbox::views::stream::ExportFilter;
use crate::reading::Kind;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The file to write, or `-` for stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Replace `FILE` if it exists.
    #[arg(long)]
    pub force: bool,
    /// Only readings of this device (implant serial).
    #[arg(long)]
    pub device: Option<String>,
    /// Only readings received since TIME: RFC 3339 (`2026-11-25T08:00:00Z`)
    /// or an age such as `90s`, `15m`, `2h`, `7d`.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only readings received before TIME (RFC 3339 or an age).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only readings in this state.
    #[arg(long, default_value = "all", value_parser = ["queued", "inflight", "delivered", "all"])]
    pub state: String,
    /// Only readings of this kind.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Kind::ALL.map(Kind::as_str)))]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header line: the columns of `readings list
    /// --format csv`.
    Csv,
    /// One JSON array of the objects of `readings list --format json`
    /// (times RFC 3339 UTC, as there).
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where the rows go: stdout, or `FILE.partial` until it is complete.
enum Target {
    Stdout,
    File { partial: PathBuf, file: PathBuf },
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Stdout => "stdout".into(),
            Target::File { file, .. } => format!("`{}`", file.display()),
        }
    }
}

/// `FILE.partial`, in the same folder (so the rename cannot cross a file
/// system).
fn partial_of(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn writing<'a>(path: &'a Path) -> impl Fn(io::Error) -> anyhow::Error + 'a {
    move |e| anyhow::anyhow!("cannot write `{}`: {e}", path.display())
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let since = args
        .since
        .as_deref()
        .map(|s| super::readings::parse_since(s, now))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| {
            super::readings::parse_since(s, now)
                .map_err(|e| UsageError(e.0.replacen("--since", "--until", 1)))
        })
        .transpose()?;
    let target = if args.output.as_os_str() == "-" {
        Target::Stdout
    } else {
        if !args.force && std::fs::symlink_metadata(&args.output).is_ok() {
            return Err(UsageError(format!(
                "`{}` exists: give `--force` to replace it, or another `--output`",
                args.output.display()
            ))
            .into());
        }
        Target::File {
            partial: partial_of(&args.output),
            file: args.output.clone(),
        }
    };
    let (config, store) = super::readings::open(&args.config)?;
    let filter = ExportFilter {
        device: args.device.clone(),
        kind: args.kind.clone(),
        state: (args.state != "all").then(|| args.state.clone()),
        since,
        until,
    };
    let began = Instant::now();
    let result = store.export(
        &filter,
        |count| -> anyhow::Result<Writer> {
            // Patient data: written only once the read is recorded.
            super::audit::record_read(&config, count as usize, args.device.as_deref())?;
            Writer::start(&target, args.format, count)
        },
        |w, r| w.row(r),
    );
    let finished = result.and_then(|(rows, w)| {
        let bytes = w.finish()?;
        if let Target::File { partial, file } = &target {
            finish_file(partial, file)?;
        }
        Ok((rows, bytes))
    });
    let (rows, bytes) = match finished {
        Ok(done) => done,
        Err(e) => {
            if let Target::File { partial, .. } = &target {
                let _ = std::fs::remove_file(partial);
            }
            // The reader of stdout went away (`| head`): nothing to say.
            if e.chain()
                .filter_map(|c| c.downcast_ref::<io::Error>())
                .any(|io| io.kind() == io::ErrorKind::BrokenPipe)
            {
                return Ok(());
            }
            return Err(e);
        }
    };
    eprintln!(
        "exported {rows} reading{} to {} ({:.1} MB) in {:.1} s",
        if rows == 1 { "" } else { "s" },
        target.name(),
        bytes as f64 / 1e6,
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Rows on their way out, in one format, with the progress bar.
struct Writer {
    out: Counting<BufWriter<Box<dyn Write>>>,
    format: ExportFormat,
    bar: indicatif::ProgressBar,
    rows: u64,
}

/// Rows between two moves of the progress bar.
const BAR_STEP: u64 = 1024;

impl Writer {
    /// Opens the target and writes what comes before the rows.
    fn start(target: &Target, format: ExportFormat, count: u64) -> anyhow::Result<Writer> {
        let sink: Box<dyn Write> = match target {
            Target::Stdout => Box::new(io::stdout().lock()),
            Target::File { partial, .. } => Box::new(
                File::create(partial)
                    .map_err(|e| anyhow::anyhow!("cannot create `{}`: {e}", partial.display()))?,
            ),
        };
        let mut out = Counting {
            inner: BufWriter::with_capacity(256 * 1024, sink),
            bytes: 0,
        };
        match format {
            ExportFormat::Csv => writeln!(out, "{}", super::readings::CSV_HEADER)?,
            ExportFormat::Json => write!(out, "[")?,
            ExportFormat::Ndjson => {}
        }
        let bar = if render::stderr_is_terminal() {
            progress_bar(count)
        } else {
            indicatif::ProgressBar::hidden()
        };
        Ok(Writer {
            out,
            format,
            bar,
            rows: 0,
        })
    }

    fn row(&mut self, r: &ReadingRow) -> anyhow::Result<()> {
        let out = &mut self.out;
        match self.format {
            ExportFormat::Csv => writeln!(out, "{}", super::readings::csv_row(r))?,
            ExportFormat::Json => {
                out.write_all(if self.rows == 0 { b"\n" } else { b",\n" })?;
                serde_json::to_writer(&mut *out, r)?;
            }
            ExportFormat::Ndjson => {
                serde_json::to_writer(&mut *out, r)?;
                out.write_all(b"\n")?;
            }
        }
        self.rows += 1;
        if self.rows.is_multiple_of(BAR_STEP) {
            self.bar.set_position(self.rows);
        }
        Ok(())
    }

    /// Writes what comes after the rows and flushes; the bytes written.
    fn finish(mut self) -> anyhow::Result<u64> {
        self.bar.finish_and_clear();
        if self.format == ExportFormat::Json {
            let end: &[u8] = if self.rows == 0 { b"]\n" } else { b"\n]\n" };
            self.out.write_all(end)?;
        }
        self.out.flush()?;
        Ok(self.out.bytes)
    }
}

/// Puts the complete `partial` on disk and under its name `file`.
fn finish_file(partial: &Path, file: &Path) -> anyhow::Result<()> {
    File::open(partial)
        .and_then(|f| f.sync_all())
        .map_err(writing(partial))?;
    std::fs::rename(partial, file).map_err(|e| {
        anyhow::anyhow!(
            "cannot rename `{}` to `{}`: {e}",
            partial.display(),
            file.display()
        )
    })?;
    // The rename itself lasts once the folder is on disk.
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(writing(dir))?;
    Ok(())
}

/// A bar with the count it goes to, on stderr.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {human_pos}/{human_len} readings, {elapsed} gone, {eta} left",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_file_sits_beside_the_file() {
        assert_eq!(
            partial_of(Path::new("/tmp/x/readings.csv")),
            Path::new("/tmp/x/readings.csv.partial")
        );
    }
}
