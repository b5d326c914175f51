//! The serial line the simulated devices share: one blocking port, the line
//! faults it adds to each transmission, and the decoder for the gateway's
//! answers. Line trouble that a device would live with (no reader yet, a
//! full pty buffer, a hangup) is not an error: the frame stays outstanding
//! with its device and is resent on its timeout.

use std::io::{self, Read, Write};
use std::sync::Mutex;

use serialport::{SerialPort, TTYPort};
use tracing::debug;

use super::SimulatorError;
use super::faults::{FaultInjector, Injected};
use crate::serial::frame::{Decoded, Decoder, MAX_FRAME_LEN};

/// How long one read waits for the gateway: the loop's time granularity.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(20);

/// serialport's own tests say creating pty pairs concurrently is unsafe.
static PTY_CREATION: Mutex<()> = Mutex::new(());

/// Creates a pseudo-terminal pair `(master, slave)`, one at a time.
pub fn pty_pair() -> Result<(TTYPort, TTYPort), SimulatorError> {
    let _guard = PTY_CREATION.lock().unwrap_or_else(|e| e.into_inner());
    TTYPort::pair().map_err(SimulatorError::Pty)
}

pub struct Line {
    port: Box<dyn SerialPort>,
    port_name: String,
    faults: FaultInjector,
    decoder: Decoder,
    /// The other end is gone (EIO, hangup); logged once per outage.
    hung_up: bool,
    /// The device that transmitted last: a NAK without an id is most likely
    /// about its frame.
    pub last_sender: usize,
}

impl Line {
    pub fn open(
        mut port: Box<dyn SerialPort>,
        faults: FaultInjector,
    ) -> Result<Self, SimulatorError> {
        let port_name = port.name().unwrap_or_else(|| "pty master".to_owned());
        port.set_timeout(READ_TIMEOUT)
            .map_err(|e| SimulatorError::Read {
                port: port_name.clone(),
                source: e.into(),
            })?;
        Ok(Line {
            port,
            port_name,
            faults,
            decoder: Decoder::new(),
            hung_up: false,
            last_sender: 0,
        })
    }

    /// Puts one transmission of `frame` from device `sender` on the line,
    /// faults included; returns the faults it got.
    pub fn transmit(&mut self, sender: usize, frame: &[u8]) -> Result<Injected, SimulatorError> {
        let (bytes, injected) = self.faults.apply(frame);
        self.last_sender = sender;
        match self.port.write_all(&bytes) {
            Ok(()) => Ok(injected),
            // Nobody reading, or the buffer full: the frame stays outstanding.
            Err(e) if is_transient(&e) => {
                self.note_hangup(&e);
                Ok(injected)
            }
            Err(source) => Err(SimulatorError::Write {
                port: self.port_name.clone(),
                source,
            }),
        }
    }

    /// Reads for up to [`READ_TIMEOUT`]; appends what was decoded to `out`.
    pub fn read(&mut self, out: &mut Vec<Decoded>) -> Result<(), SimulatorError> {
        // The decoder stays bounded when fed at most MAX_FRAME_LEN per drain.
        let mut buf = [0u8; MAX_FRAME_LEN];
        match self.port.read(&mut buf) {
            Ok(0) => std::thread::sleep(READ_TIMEOUT),
            Ok(n) => {
                self.hung_up = false;
                self.decoder.extend(&buf[..n]);
                while let Some(decoded) = self.decoder.next() {
                    out.push(decoded);
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
