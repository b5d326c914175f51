//! A simulated bedside device speaking protocol v1 or v1.1 (`hearth
//! simulate`), or several sharing one port.
//!
//! Guarantee, as a real device must give it: **a reading leaves the
//! simulator's memory only when the gateway ACKs its (epoch, seq) and the
//! device hears that ACK**, across its own reboots (protocol rule 2). Until
//! then the frame is kept byte for byte (faults are applied to a copy) and
//! sent again: at once after a reboot, on a NAK naming it (never faster than
//! [`behaviour::NAK_RESEND_MIN`] scaled), after the BUSY back-off (10 s
//! doubling to 5 min, scaled), or when no answer came within `ack_timeout`
//! (scaled). At most `window` frames per device are outstanding; new
//! readings wait for room.
//!
//! - [`patient`]: the seeded model that produces plausible readings.
//! - [`faults`]: seeded line faults (corrupted, garbage-prefixed, truncated
//!   frames) that the simulator does not know about, like a noisy cable.
//! - [`behaviour`]: what real devices do: reboots, epochs, late readings,
//!   several devices on a port, lost ACKs, the protocol's timing.
//! - [`device`]: one device's send/ACK state.
//! - [`line`]: the port the devices share.
//! - [`simulation`]: the loop that runs the devices on the line.

pub mod behaviour;
pub mod device;
pub mod faults;
pub mod line;
pub mod patient;
pub mod simulation;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use behaviour::Behaviour;
pub use faults::Faults;
pub use patient::Patient;
pub use simulation::{run, run_on, run_with};

/// What the simulated device does, and how badly its line behaves.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    /// The device serial sent in every frame.
    pub device_id: String,
    /// Readings each device gets ACKed, then the run ends.
    pub count: u64,
    /// Time between new readings; zero means as fast as the window allows.
    pub interval: Duration,
    /// Seq of the first reading, and again after each reboot; later ones
    /// count up (wrapping). 0 is allowed.
    pub start_seq: u32,
    /// Seeds the patient and the faults: a run is repeatable.
    pub seed: u64,
    /// Chance (0..=1) that a reading is an episode alert.
    pub alert_rate: f64,
    /// Most frames per device sent but not yet ACKed.
    pub window: usize,
    /// A frame without an answer for this long (times
    /// [`Behaviour::time_scale`]) is sent again; the protocol suggests 5 s.
    pub ack_timeout: Duration,
    /// Faults injected on the line.
    pub faults: Faults,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        SimulatorOptions {
            device_id: "PM-000001".to_owned(),
            count: 100,
            interval: Duration::from_secs(1),
            start_seq: 1,
            seed: 1,
            alert_rate: 0.02,
            window: 8,
            ack_timeout: Duration::from_secs(1),
            faults: Faults::default(),
        }
    }
}

impl SimulatorOptions {
    /// Checks what would make a run meaningless or the frames unencodable.
    pub fn validate(&self) -> Result<(), SimulatorError> {
        let invalid = |key: &str, why: &str| {
            Err(SimulatorError::InvalidOption {
                key: key.to_owned(),
                reason: why.to_owned(),
            })
        };
        // Protocol v1: 1..=32 characters of `[A-Za-z0-9._-]`.
        let id_ok = (1..=32).contains(&self.device_id.len())
            && self
                .device_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !id_ok {
            return invalid("device_id", "must be 1 to 32 characters of `A-Za-z0-9._-`");
        }
        if self.window == 0 {
            return invalid("window", "must be at least 1");
        }
        if self.ack_timeout.is_zero() {
            return invalid("ack_timeout", "must be longer than zero");
        }
        let rates = [
            ("alert_rate", self.alert_rate),
            ("corrupt_rate", self.faults.corrupt_rate),
            ("garbage_rate", self.faults.garbage_rate),
            ("truncate_rate", self.faults.truncate_rate),
        ];
        for (key, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return invalid(key, "must be between 0 and 1");
            }
        }
        Ok(())
    }
}

/// What happened during a run. Counts are of transmissions on the line; the
/// top level adds up `devices`, which holds each device's own summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// The device's id; at the top level, the `device_id` option.
    pub device_id: String,
    /// Distinct readings ACKed by the gateway.
    pub acked: u64,
    /// Readings sent for the first time (resends not included).
    pub sent: u64,
    /// Frames sent again: after a NAK naming them, a BUSY, or a timeout.
    pub resent: u64,
    /// NAKs addressed to this device, with or without a seq.
    pub naks: u64,
    /// BUSY answers for frames this device holds.
    pub busy: u64,
    /// Transmissions with one byte of the body changed.
    pub corrupted: u64,
    /// Transmissions preceded by garbage bytes.
    pub garbage: u64,
    /// Transmissions cut short.
    pub truncated: u64,
    /// Readings sent with `Priority::Alert` (first transmissions only).
    pub alerts: u64,
    /// Reboots: the count started again.
    pub restarts: u64,
    /// Readings held back and sent after later ones.
    pub late_sent: u64,
    /// ACKs the device did not hear (simulated loss on the line).
    pub dropped_acks: u64,
    pub elapsed_ms: u64,
    /// With `--list-acked`: each ACKed reading's frame, `$R,…*CRC`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub acked_frames: Vec<String>,
    /// One summary per device on the port; empty inside those.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Summary>,
}

impl Summary {
    /// Adds `other`'s counts to this one's.
    pub fn add(&mut self, other: &Summary) {
        let pairs = [
            (&mut self.acked, other.acked),
            (&mut self.sent, other.sent),
            (&mut self.resent, other.resent),
            (&mut self.naks, other.naks),
            (&mut self.busy, other.busy),
            (&mut self.corrupted, other.corrupted),
            (&mut self.garbage, other.garbage),
            (&mut self.truncated, other.truncated),
            (&mut self.alerts, other.alerts),
            (&mut self.restarts, other.restarts),
            (&mut self.late_sent, other.late_sent),
            (&mut self.dropped_acks, other.dropped_acks),
        ];
        for (total, n) in pairs {
            *total += n;
        }
        self.acked_frames.extend(other.acked_frames.iter().cloned());
    }
}

/// The text form `hearth simulate` prints: `summary: device=… acked=…`.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "summary: device={} acked={} sent={} resent={} naks={} busy={} alerts={} \
             corrupted={} garbage={} truncated={} restarts={} late_sent={} dropped_acks={} \
             elapsed_ms={}",
            self.device_id,
            self.acked,
            self.sent,
            self.resent,
            self.naks,
            self.busy,
            self.alerts,
            self.corrupted,
            self.garbage,
            self.truncated,
            self.restarts,
            self.late_sent,
            self.dropped_acks,
            self.elapsed_ms
        )
    }
}

/// Where the simulated device is plugged in.
#[derive(Debug, Clone)]
pub enum PortSpec {
    /// An existing serial port (or one end of a `socat` pty pair) and its baud rate.
    Path(PathBuf, u32),
    /// A fresh pseudo-terminal pair; the gateway opens the slave.
    Pty,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// The cause is part of the message because the hint follows it.
    #[error("cannot open serial port `{path}`: {cause}{hint}")]
    Open {
        path: String,
        cause: String,
        hint: &'static str,
    },
    #[error("cannot create a pseudo-terminal pair: {0}")]
    Pty(#[source] serialport::Error),
    #[error("cannot read from serial port `{port}`")]
    Read {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write to serial port `{port}`")]
    Write {
        port: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid simulator option `{key}`: {reason}")]
    InvalidOption { key: String, reason: String },
}

impl SimulatorError {
    fn open(path: &str, error: serialport::Error) -> Self {
        use serialport::ErrorKind;
        use std::io::ErrorKind as Io;
        let hint = match error.kind() {
            ErrorKind::Io(Io::NotFound) => " (is the device plugged in?)",
            ErrorKind::Io(Io::PermissionDenied) => " (is the user in group `dialout`?)",
            ErrorKind::NoDevice => " (is another program using it?)",
            _ => "",
        };
        SimulatorError::Open {
            path: path.to_owned(),
            cause: error.description,
            hint,
        }
    }
}
