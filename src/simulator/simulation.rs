//! The simulator's loop: the devices on one port, taking turns.
//!
//! Each turn resends what is due, sends the readings held back long enough,
//! lets each device in turn make one new reading until none can (so the
//! readings of several devices interleave), then reads the gateway's answers
//! for up to [`READ_TIMEOUT`](super::line::READ_TIMEOUT) and hands each to
//! the device it names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serialport::SerialPort;
use tracing::debug;

use super::behaviour::Behaviour;
use super::device::Device;
use super::faults::FaultInjector;
use super::line::{Line, READ_TIMEOUT, pty_pair};
use super::{PortSpec, SimulatorError, SimulatorOptions, Summary};
use crate::serial::frame::{Decoded, Frame};

/// Keeps the fault stream independent of the patient's for the same seed.
const FAULT_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;
/// Keeps the lost-ACK draws independent of the other streams.
const LOST_ACK_SEED_MIX: u64 = 0x5851_f42d_4c95_7f2d;

/// Runs one plain device (see [`run_with`]).
pub fn run(
    port: PortSpec,
    opts: &SimulatorOptions,
    on_ready: &mut dyn FnMut(&str),
    stop: &AtomicBool,
) -> Result<Summary, SimulatorError> {
    run_with(port, opts, &Behaviour::default(), on_ready, stop)
}

/// Runs the simulated device(s) on `port` until each has `opts.count`
/// readings ACKed or `stop` is set (then returns the summary so far).
///
/// For [`PortSpec::Pty`] it creates a pty pair and keeps both ends open for
/// the whole run, so the gateway may open and close the slave freely without
/// the master seeing a hangup. `on_ready` gets the path the gateway should
/// open (the slave, or the given path) before the first frame is sent.
pub fn run_with(
    port: PortSpec,
    opts: &SimulatorOptions,
    behaviour: &Behaviour,
    on_ready: &mut dyn FnMut(&str),
    stop: &AtomicBool,
) -> Result<Summary, SimulatorError> {
    opts.validate()?;
    behaviour.validate(&opts.device_id)?;
    match port {
        PortSpec::Path(path, baud) => {
            let path = path.to_string_lossy().into_owned();
            let port = serialport::new(&path, baud)
                .timeout(READ_TIMEOUT)
                .open()
                .map_err(|e| SimulatorError::open(&path, e))?;
            on_ready(&path);
            run_on(port, opts, behaviour, stop)
        }
        PortSpec::Pty => {
            let (master, slave) = pty_pair()?;
            let Some(slave_path) = slave.name() else {
                let error =
                    serialport::Error::new(serialport::ErrorKind::Unknown, "the slave has no path");
                return Err(SimulatorError::Pty(error));
            };
            on_ready(&slave_path);
            let summary = run_on(Box::new(master), opts, behaviour, stop);
            drop(slave);
            summary
        }
    }
}

/// Runs the simulated device(s) on an already open port (see [`run_with`]).
pub fn run_on(
    port: Box<dyn SerialPort>,
    opts: &SimulatorOptions,
    behaviour: &Behaviour,
    stop: &AtomicBool,
) -> Result<Summary, SimulatorError> {
    opts.validate()?;
    behaviour.validate(&opts.device_id)?;
    let faults = FaultInjector::new(opts.faults.clone(), opts.seed ^ FAULT_SEED_MIX);
    let mut line = Line::open(port, faults)?;
    let started = Instant::now();
    let mut devices: Vec<Device> = behaviour
        .device_ids(&opts.device_id)
        .into_iter()
        .enumerate()
        .map(|(i, id)| Device::new(i, id, opts, behaviour, started))
        .collect();
    let mut lost_acks = fastrand::Rng::with_seed(opts.seed ^ LOST_ACK_SEED_MIX);
    let mut lost = || behaviour.drop_ack_rate > 0.0 && lost_acks.f64() < behaviour.drop_ack_rate;

    let result = (|| {
        let mut answers = Vec::new();
        while !devices.iter().all(Device::done) && !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            for device in &mut devices {
                device.resend_due(now, &mut line)?;
                device.send_late(now, &mut line)?;
            }
            let mut made = true;
            while made {
                made = false;
                for device in &mut devices {
                    made |= device.make_reading(now, &mut line)?;
                }
            }
            line.read(&mut answers)?;
            let now = Instant::now();
            for answer in answers.drain(..) {
                dispatch(answer, &mut devices, line.last_sender, now, &mut lost);
            }
        }
        Ok(())
    })();

    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut summary = Summary {
        device_id: opts.device_id.clone(),
        ..Summary::default()
    };
    for device in devices {
        let mut own = device.summary;
        own.elapsed_ms = elapsed_ms;
        summary.add(&own);
        summary.devices.push(own);
    }
    summary.elapsed_ms = elapsed_ms;
    result.map(|()| summary)
}

/// Hands one answer from the gateway to the device it names.
fn dispatch(
    answer: Decoded,
    devices: &mut [Device],
    last_sender: usize,
    now: Instant,
    lost: &mut dyn FnMut() -> bool,
) {
    fn named<'d, 'a>(devices: &'d mut [Device<'a>], id: &str) -> Option<&'d mut Device<'a>> {
        devices.iter_mut().find(|d| d.id == id)
    }
    match answer {
        Decoded::Frame(Frame::Ack {
            device_id,
            epoch,
            seq,
        }) => match named(devices, &device_id) {
            Some(device) => device.on_ack(epoch, seq, now, lost),
            None => debug!("Ignored an ACK for another device."),
        },
        Decoded::Frame(Frame::Busy {
            device_id,
            epoch,
            seq,
        }) => match named(devices, &device_id) {
            Some(device) => device.on_busy(epoch, seq, now),
            None => debug!("Ignored a BUSY for another device."),
        },
        Decoded::Frame(Frame::Nak {
            device_id,
            epoch,
            seq,
            reason,
        }) => {
            let device = match device_id {
                Some(id) => named(devices, &id),
                // About a frame whose id the gateway could not trust: most
                // likely the last one sent.
                None => devices.get_mut(last_sender),
            };
            match device {
                Some(device) => device.on_nak(epoch, seq, &reason, now),
                None => debug!("Ignored a NAK for another device."),
            }
        }
        Decoded::Frame(other) => debug!(?other, "Ignored a frame a gateway does not send."),
        Decoded::Rejected(rejected) => debug!(?rejected, "Ignored a garbled answer."),
    }
}
