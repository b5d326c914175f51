//! The `hearth` command line: one subcommand per job, each a function that
//! returns `anyhow::Result`; `main` turns errors into a message and an exit
//! code (2 for a bad config or bad arguments, 1 otherwise).

mod audit;
mod chart;
mod chart_text;
mod devices;
mod docs;
mod export;
mod gaps;
mod png;
mod readings;
pub mod render;
mod show;
mod stats;
mod store;
mod tail;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, Config};
use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    about = "Home gateway for cardiac-implant telemetry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, short = 'c', env = "HEARTH_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The log's shape: `auto` is journald (with structured fields) when
    /// systemd connected stderr to the journal, else text.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: serial port -> store -> broker.
    Run(RunArgs),
    /// Simulate a bedside device on a serial port or a new pseudo-terminal.
    Simulate(SimulateArgs),
    /// See what the gateway holds: list readings, one reading's journey,
    /// follow them, export them, find gaps, rejected frames, stats, charts.
    Readings {
        #[command(subcommand)]
        command: ReadingsCommand,
    },
    /// Show each bedside device's count, gaps and alarms, or reset one.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Show what the gateway holds and how its links are; a health check:
    /// exits 1 when something needs attention (listed under `problems`).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show the audit trail of security events, oldest first, or `verify`
    /// its hash chain (docs/audit.md).
    Audit(audit::AuditArgs),
    /// The store itself: `rekey` changes its encryption key.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Check or print the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The whole pipeline on this machine: throwaway certificates, an
    /// embedded broker, a simulated implant and a subscriber.
    Demo(DemoArgs),
    /// Print the shell completion script (the package installs those for
    /// bash, zsh and fish).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page `hearth.1`, or write every page into a folder.
    Man {
        /// Write `hearth.1` and one page per subcommand (`hearth-run.1`, …)
        /// into this folder instead.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReadingsCommand {
    /// List readings, oldest first.
    List(readings::ListArgs),
    /// The frames the decoder refused, with reason, time and their raw bytes
    /// rendered safe (no control character reaches the terminal).
    Rejected(readings::RejectedArgs),
    /// One reading and its whole journey: received, stored, ACKed,
    /// published (packet id, attempts, connections), PUBREC, delivered, and
    /// the exact payload it went out in.
    Show(show::ShowArgs),
    /// New readings and deliveries as they happen (`--follow`), from a
    /// read-only connection that never holds the running gateway back.
    Tail(tail::TailArgs),
    /// Write readings to a file (CSV, JSON or NDJSON), streamed, with a
    /// progress bar on a terminal.
    Export(export::ExportArgs),
    /// Missing seq ranges per device and epoch, with the time around each.
    Gaps(gaps::GapsArgs),
    /// Per device and kind over a window: count, min, max, mean, last value,
    /// and how many still wait for delivery.
    Stats(stats::StatsArgs),
    /// A trend of one kind: in the terminal, or as a PNG or SVG picture
    /// with axes, units and alert episodes marked.
    Chart(chart::ChartArgs),
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Change the store's encryption key, where it is kept (the sealed
    /// credential needs root). Stop the gateway first; the change is
    /// recorded in the audit trail and the old key no longer opens the store.
    Rekey(store::RekeyArgs),
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// One line per device: epoch, run, highest seq, last heard, open gap,
    /// late readings, restarts, conflicts and its alarm.
    List(devices::ListArgs),
    /// Start a device's count afresh (after a battery change or a swap): its
    /// next reading begins a new run, its alarm clears. Recorded in the
    /// store and the log.
    Reset(devices::ResetArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Accept a serial port that does not exist yet (the device is
    /// unplugged): `hearth run` waits for it. The package's install uses it.
    #[arg(long)]
    pub allow_absent_port: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration, then say so.
    Check(CheckArgs),
    /// Print a commented default configuration.
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["port", "pty"])))]
pub struct SimulateArgs {
    /// The serial port to talk on (e.g. one end of a socat pair).
    #[arg(long)]
    pub port: Option<PathBuf>,
    /// Make a pseudo-terminal pair and print the path for the gateway.
    #[arg(long)]
    pub pty: bool,
    #[arg(long, default_value_t = 115_200)]
    pub baud_rate: u32,
    /// The implant's serial number.
    #[arg(long, default_value = "PM-000001")]
    pub device_id: String,
    /// Readings each device gets ACKed before exiting.
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// Milliseconds between new readings (0: as fast as ACKs allow).
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// First sequence number (0 allowed), and again after each reboot.
    #[arg(long, default_value_t = 1)]
    pub start_seq: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of readings that are arrhythmia alerts.
    #[arg(long, default_value_t = 0.02)]
    pub alert_rate: f64,
    /// Most frames per device sent and not yet ACKed.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Resend a frame not ACKed within this many milliseconds (times
    /// `--time-scale`; the protocol suggests 5000).
    #[arg(long, default_value_t = 1000)]
    pub ack_timeout_ms: u64,
    /// Factor on the resend timeout, the BUSY back-off (10 s doubling to
    /// 5 min) and the NAK resend floor (50 ms), e.g. 0.01 for tests.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub time_scale: f64,
    /// Devices on the port, ids `{device-id}-1` to `-N`, each with its own
    /// count; their readings interleave.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub devices: u32,
    /// Speak protocol v1.1: send seqs as `E:SEQ`, starting at epoch E and
    /// raising it at each reboot (without it: v1, plain seqs).
    #[arg(long, value_name = "E")]
    pub epoch: Option<u32>,
    /// Reboot once N readings of the boot are ACKed: count again from
    /// `--start-seq`, keeping and resending the readings not yet ACKed.
    #[arg(long, value_name = "N")]
    pub restart_every: Option<u64>,
    /// Hold every Nth reading back and send it late (see `--late-by`).
    #[arg(long, value_name = "N")]
    pub late_every: Option<u64>,
    /// A reading held back is sent once K later readings are ACKed.
    #[arg(long, default_value_t = 3, value_name = "K")]
    pub late_by: u64,
    /// Share of ACKs the device never hears (lost on the line); it resends
    /// those readings after its timeout.
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub drop_ack_rate: f64,
    /// List every ACKed reading's frame in the JSON summary
    /// (`acked_frames`), for tests that check each one arrived.
    #[arg(long)]
    pub list_acked: bool,
    /// Fault: share of frames with one corrupted byte.
    #[arg(long, default_value_t = 0.0)]
    pub corrupt_rate: f64,
    /// Fault: share of frames preceded by garbage bytes.
    #[arg(long, default_value_t = 0.0)]
    pub garbage_rate: f64,
    /// Fault: share of frames cut short.
    #[arg(long, default_value_t = 0.0)]
    pub truncate_rate: f64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Readings the simulated implant sends.
    #[arg(long, default_value_t = 40)]
    pub count: u64,
    /// Milliseconds between readings.
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
}

/// A bad configuration or argument: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run_gateway(&args),
        Command::Simulate(args) => simulate(args),
        Command::Readings { command } => match command {
            ReadingsCommand::List(args) => readings::list(args),
            ReadingsCommand::Rejected(args) => readings::rejected(args),
            ReadingsCommand::Show(args) => show::run(args),
            ReadingsCommand::Tail(args) => tail::run(args),
            ReadingsCommand::Export(args) => export::run(args),
            ReadingsCommand::Gaps(args) => gaps::run(args),
            ReadingsCommand::Stats(args) => stats::run(args),
            ReadingsCommand::Chart(args) => chart::run(args),
        },
        Command::Status { config, format } => readings::status(&config, format),
        Command::Audit(args) => audit::run(args),
        Command::Store {
            command: StoreCommand::Rekey(args),
        } => store::rekey(args),
        Command::Devices {
            command: DevicesCommand::List(args),
        } => devices::list(args),
        Command::Devices {
            command: DevicesCommand::Reset(args),
        } => devices::reset(args),
        Command::Config {
            command: ConfigCommand::Check(args),
        } => {
            let c = &args.config;
            let config = Config::load(&c.config)?;
            if !args.allow_absent_port && !config.serial.port.exists() {
                anyhow::bail!(UsageError(format!(
                    "config `{}`: key `serial.port` names `{}`, which does not exist (is the device plugged in?)",
                    c.config.display(),
                    config.serial.port.display()
                )));
            }
            println!("config `{}` is valid", c.config.display());
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            crate::demo::run(args.count, Duration::from_millis(args.interval_ms))
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo(_) => Err(UsageError(
            "this hearth was built without the `demo` feature (a production build): run the demo from a checkout with `cargo run --release -- demo`".into(),
        )
        .into()),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man { out: None } => docs::man_page(),
        Command::Man { out: Some(dir) } => docs::man_pages(&dir),
    }
}

/// Text logging on stderr for the commands other than `run`.
pub fn init_logging(default: &str) {
    crate::logging::init(default, LogFormat::Text);
}

fn run_gateway(args: &RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config.config)?;
    crate::logging::init(&config.log_level, args.log_format);
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        crate::gateway::cancel_on_signals(shutdown.clone())
            .context("cannot install signal handlers")?;
        let gateway = crate::gateway::Gateway::new(config);
        let result = gateway
            .run(shutdown, || {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            })
            .await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        result
    })
}

fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use crate::simulator::{Behaviour, Faults, PortSpec, SimulatorOptions};
    init_logging("warn");
    let opts = SimulatorOptions {
        device_id: args.device_id,
        count: args.count,
        interval: Duration::from_millis(args.interval_ms),
        start_seq: args.start_seq,
        seed: args.seed,
        alert_rate: args.alert_rate,
        window: args.window,
        ack_timeout: Duration::from_millis(args.ack_timeout_ms),
        faults: Faults {
            corrupt_rate: args.corrupt_rate,
            garbage_rate: args.garbage_rate,
            truncate_rate: args.truncate_rate,
        },
    };
    let behaviour = Behaviour {
        devices: args.devices,
        epoch: args.epoch,
        restart_every: args.restart_every,
        late_every: args.late_every,
        late_by: args.late_by,
        drop_ack_rate: args.drop_ack_rate,
        time_scale: args.time_scale,
        list_acked: args.list_acked,
    };
    opts.validate()
        .and_then(|()| behaviour.validate(&opts.device_id))
        .map_err(|e| UsageError(e.to_string()))?;
    let port = match args.port {
        Some(p) => PortSpec::Path(p, args.baud_rate),
        None => PortSpec::Pty,
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        // SIGINT/SIGTERM end the run early with a summary of what was ACKed.
        let _ = ctrlc_like(move || stop.store(true, std::sync::atomic::Ordering::SeqCst));
    }
    let summary = crate::simulator::run_with(
        port,
        &opts,
        &behaviour,
        &mut |path| {
            println!("pty: {path}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
        &stop,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        // One line per device, then the totals if there are several.
        for device in &summary.devices {
            println!("{device}");
        }
        if summary.devices.len() > 1 {
            println!("{summary}");
        }
    }
    Ok(())
}

/// Runs `f` on SIGINT or SIGTERM, from a small thread.
fn ctrlc_like(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("hearth-signals".into())
        .spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                f();
            })
        })?;
    Ok(())
}

/// The error and its causes on one line: `a: b: c`.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = config::one_line(cause);
        // thiserror messages often embed their source already.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// 2 for a bad configuration or argument, 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let usage = e
        .chain()
        .any(|c| c.is::<config::ConfigError>() || c.is::<UsageError>());
    if usage { 2 } else { 1 }
}
