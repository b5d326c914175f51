//! The simulated device's send/ACK loop: one thread, one blocking port.
//!
//! Each turn of the loop sends new readings while the window has room and the
//! interval has passed, resends every outstanding frame whose deadline has
//! come, then reads the gateway's answers for up to [`READ_TIMEOUT`]. A frame
//! is removed from the window only by an ACK for its seq (see the guarantee
//! in [`super`]). Line trouble that a device would live with (no reader yet,
//! a full pty buffer, a hangup) is not an error: the frame stays outstanding
//! and is resent on its timeout.

use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serialport::{SerialPort, TTYPort};
use tracing::{debug, trace};

use super::faults::{FaultInjector, Injected};
use super::patient::Patient;
use super::{PortSpec, SimulatorError, SimulatorOptions, Summary};
use crate::serial::frame::{Decoded, Decoder, Frame, MAX_FRAME_LEN, Priority};

/// How long one read waits for the gateway: the loop's time granularity.
pub const READ_TIMEOUT: Duration = Duration::from_millis(20);

/// Keeps the fault stream independent of the patient's for the same seed.
const FAULT_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// serialport's own tests say creating pty pairs concurrently is unsafe.
static PTY_CREATION: Mutex<()> = Mutex::new(());

/// Creates a pseudo-terminal pair `(master, slave)`, one at a time.
pub fn pty_pair() -> Result<(TTYPort, TTYPort), SimulatorError> {
    let _guard = PTY_CREATION.lock().unwrap_or_else(|e| e.into_inner());
    TTYPort::pair().map_err(SimulatorError::Pty)
}

/// Runs the simulated device on `port` until `opts.count` readings are ACKed
/// or `stop` is set (then returns the summary so far).
///
/// For [`PortSpec::Pty`] it creates a pty pair and keeps both ends open for
/// the whole run, so the gateway may open and close the slave freely without
/// the master seeing a hangup. `on_ready` gets the path the gateway should
/// open (the slave, or the given path) before the first frame is sent.
pub fn run(
    port: PortSpec,
    opts: &SimulatorOptions,
    on_ready: &mut dyn FnMut(&str),
    stop: &AtomicBool,
) -> Result<Summary, SimulatorError> {
    opts.validate()?;
    match port {
        PortSpec::Path(path, baud) => {
            let path = path.to_string_lossy().into_owned();
            let port = serialport::new(&path, baud)
                .timeout(READ_TIMEOUT)
                .open()
                .map_err(|e| SimulatorError::open(&path, e))?;
            on_ready(&path);
            run_on(port, opts, stop)
        }
        PortSpec::Pty => {
            let (master, slave) = pty_pair()?;
            let Some(slave_path) = slave.name() else {
                let error =
                    serialport::Error::new(serialport::ErrorKind::Unknown, "the slave has no path");
                return Err(SimulatorError::Pty(error));
            };
            on_ready(&slave_path);
            let summary = run_on(Box::new(master), opts, stop);
            drop(slave);
            summary
        }
    }
}

/// Runs the simulated device on an already open port (see [`run`]).
pub fn run_on(
    mut port: Box<dyn SerialPort>,
    opts: &SimulatorOptions,
    stop: &AtomicBool,
) -> Result<Summary, SimulatorError> {
    opts.validate()?;
    let port_name = port.name().unwrap_or_else(|| "pty master".to_owned());
    port.set_timeout(READ_TIMEOUT)
        .map_err(|e| SimulatorError::Read {
            port: port_name.clone(),
            source: e.into(),
        })?;
    let mut device = Device {
        port,
        port_name,
        opts,
        patient: Patient::new(opts.seed, opts.alert_rate),
        faults: FaultInjector::new(opts.faults.clone(), opts.seed ^ FAULT_SEED_MIX),
        decoder: Decoder::new(),
        window: Vec::with_capacity(opts.window),
        next_seq: opts.start_seq,
        next_reading_at: Instant::now(),
        hung_up: false,
        summary: Summary {
            device_id: opts.device_id.clone(),
            ..Summary::default()
        },
    };
    let started = Instant::now();
    let result = device.run(stop);
    device.summary.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    result.map(|()| device.summary)
}

/// A frame sent and not yet ACKed.
struct Outstanding {
    seq: u32,
    /// The frame as encoded, never damaged: what a resend sends.
    frame: Vec<u8>,
    resend_at: Instant,
}

struct Device<'a> {
    port: Box<dyn SerialPort>,
    port_name: String,
    opts: &'a SimulatorOptions,
    patient: Patient,
    faults: FaultInjector,
    decoder: Decoder,
    window: Vec<Outstanding>,
    next_seq: u32,
    next_reading_at: Instant,
    /// The other end is gone (EIO, hangup); logged once per outage.
    hung_up: bool,
    summary: Summary,
}

impl Device<'_> {
    fn run(&mut self, stop: &AtomicBool) -> Result<(), SimulatorError> {
        while self.summary.acked < self.opts.count && !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.resend_due(now)?;
            self.send_new(now)?;
            self.read_answers()?;
        }
        Ok(())
    }

    fn send_new(&mut self, now: Instant) -> Result<(), SimulatorError> {
        while self.summary.sent < self.opts.count
            && self.window.len() < self.opts.window
            && now >= self.next_reading_at
        {
            let seq = self.next_seq;
            self.next_seq = seq.wrapping_add(1);
            let reading = self
                .patient
                .next_reading(&self.opts.device_id, seq, chrono::Utc::now());
            if matches!(reading.priority, Priority::Alert) {
                self.summary.alerts += 1;
            }
            trace!(seq, kind = reading.kind.as_str(), "New reading.");
            let frame = Frame::Reading(reading).encode();
            self.summary.sent += 1;
            self.transmit(&frame)?;
            self.window.push(Outstanding {
                seq,
                frame,
                resend_at: now + self.opts.ack_timeout,
            });
            self.next_reading_at = now + self.opts.interval;
        }
        Ok(())
    }

    fn resend_due(&mut self, now: Instant) -> Result<(), SimulatorError> {
        for i in 0..self.window.len() {
            if self.window[i].resend_at <= now {
                debug!(seq = self.window[i].seq, "No ACK in time: resending.");
                self.resend(i, now)?;
            }
        }
        Ok(())
    }

    fn resend(&mut self, index: usize, now: Instant) -> Result<(), SimulatorError> {
        self.summary.resent += 1;
        let frame = std::mem::take(&mut self.window[index].frame);
        let result = self.transmit(&frame);
        let outstanding = &mut self.window[index];
        outstanding.frame = frame;
        outstanding.resend_at = now + self.opts.ack_timeout;
        result
    }

    /// Puts one transmission of `frame` on the line, faults included.
    fn transmit(&mut self, frame: &[u8]) -> Result<(), SimulatorError> {
        let (bytes, injected) = self.faults.apply(frame);
        let Injected {
            corrupted,
            garbage,
            truncated,
        } = injected;
        self.summary.corrupted += u64::from(corrupted);
        self.summary.garbage += u64::from(garbage);
        self.summary.truncated += u64::from(truncated);
        match self.port.write_all(&bytes) {
            Ok(()) => Ok(()),
            // Nobody reading, or the buffer full: the frame stays outstanding.
            Err(e) if is_transient(&e) => {
                self.note_hangup(&e);
                Ok(())
            }
            Err(source) => Err(SimulatorError::Write {
                port: self.port_name.clone(),
                source,
            }),
        }
    }

    fn read_answers(&mut self) -> Result<(), SimulatorError> {
        // The decoder stays bounded when fed at most MAX_FRAME_LEN per drain.
        let mut buf = [0u8; MAX_FRAME_LEN];
        match self.port.read(&mut buf) {
            Ok(0) => std::thread::sleep(READ_TIMEOUT),
            Ok(n) => {
                self.hung_up = false;
                self.decoder.extend(&buf[..n]);
                while let Some(decoded) = self.decoder.next() {
                    self.handle(decoded);
                }
            }
            Err(e) if is_nothing_to_read(&e) => {}
            Err(e) if is_transient(&e) => {
                // A hangup returns at once: wait as a read would have.
                self.note_hangup(&e);
                std::thread::sleep(READ_TIMEOUT);
            }
            Err(source) => {
                return Err(SimulatorError::Read {
                    port: self.port_name.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    fn handle(&mut self, decoded: Decoded) {
        let now = Instant::now();
        let opts = self.opts;
        let ours = |id: &str| id == opts.device_id;
        match decoded {
            Decoded::Frame(Frame::Ack { device_id, seq, .. }) if ours(&device_id) => {
                match self.position(seq) {
                    Some(i) => {
                        self.window.remove(i);
                        self.summary.acked += 1;
                        trace!(seq, "ACKed.");
                    }
                    None => debug!(seq, "ACK for a seq not outstanding: ignored."),
                }
            }
            Decoded::Frame(Frame::Nak {
                device_id,
                seq,
                reason,
                ..
            }) if device_id.as_deref().is_none_or(ours) => {
                self.summary.naks += 1;
                debug!(?seq, %reason, "NAK.");
                // A NAK without a seq names no frame: the timeouts recover it.
                if let Some(i) = seq.and_then(|seq| self.position(seq)) {
                    // Errors surface on the next transmit; a NAK is no place to stop.
                    let _ = self.resend(i, now);
                }
            }
            Decoded::Frame(Frame::Busy { device_id, seq, .. }) if ours(&device_id) => {
                if let Some(i) = self.position(seq) {
                    self.summary.busy += 1;
                    debug!(seq, "BUSY: keeping the frame for later.");
                    self.window[i].resend_at = now + self.opts.ack_timeout;
                }
            }
            Decoded::Frame(other) => debug!(?other, "Ignored a frame not for this device."),
            Decoded::Rejected(rejected) => debug!(?rejected, "Ignored a garbled answer."),
        }
    }

    fn position(&self, seq: u32) -> Option<usize> {
        self.window.iter().position(|o| o.seq == seq)
    }

    fn note_hangup(&mut self, error: &io::Error) {
        if !self.hung_up && error.kind() != io::ErrorKind::TimedOut {
            debug!(port = %self.port_name, %error, "The gateway's end is not open.");
            self.hung_up = true;
        }
    }
}

/// A read that found nothing in time.
fn is_nothing_to_read(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Trouble a device lives with: nothing to read, a full buffer, or no one at
/// the other end (serialport reports a pty's EIO as `Other` and a hangup as
/// `BrokenPipe`).
fn is_transient(e: &io::Error) -> bool {
    is_nothing_to_read(e)
        || matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::Other)
        || e.raw_os_error() == Some(libc::EIO)
}
