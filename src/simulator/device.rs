//! One simulated device's send/ACK state: its count, its boot epoch, the
//! readings it holds until ACKed and the ones it holds back to send late.
//!
//! A reading leaves [`Device`] only by an ACK for its (epoch, seq) that the
//! device heard (see the guarantee in [`super`]). It is sent again: at once
//! after a reboot; on a NAK naming it, at once but never sooner than
//! [`Behaviour::nak_resend_min`] after its last transmission; after the
//! BUSY back-off; and when no answer came within the resend timeout.
//! A device never makes a new reading whose (epoch, seq) it still holds (a
//! v1 device after a reboot), since it could not tell their ACKs apart.

use std::time::{Duration, Instant};

use tracing::{debug, trace};

use super::behaviour::Behaviour;
use super::faults::Injected;
use super::line::Line;
use super::patient::Patient;
use super::{SimulatorError, SimulatorOptions, Summary};
use crate::reading::Priority;
use crate::serial::frame::Frame;

/// A reading sent and not yet ACKed.
struct Outstanding {
    epoch: Option<u32>,
    seq: u32,
    /// Order of making, across reboots: what "later" means for late readings.
    made: u64,
    /// The boot it was made in.
    boot: u64,
    /// The frame as encoded, never damaged: what a resend sends.
    frame: Vec<u8>,
    last_sent: Instant,
    resend_at: Instant,
    /// BUSY answers for it in a row.
    busy: u32,
}

/// A reading made but held back to be sent late.
struct HeldBack {
    epoch: Option<u32>,
    seq: u32,
    made: u64,
    boot: u64,
    frame: Vec<u8>,
    alert: bool,
    /// Readings made after it and ACKed since.
    later_acked: u64,
}

pub struct Device<'a> {
    /// Index on the line, for [`Line::transmit`].
    index: usize,
    pub id: String,
    opts: &'a SimulatorOptions,
    behaviour: &'a Behaviour,
    patient: Patient,
    epoch: Option<u32>,
    next_seq: u32,
    next_reading_at: Instant,
    made: u64,
    /// Reboots so far.
    boot: u64,
    /// Readings made in this boot and ACKed.
    acked_this_boot: u64,
    window: Vec<Outstanding>,
    held_back: Vec<HeldBack>,
    pub summary: Summary,
}

impl<'a> Device<'a> {
    pub fn new(
        index: usize,
        id: String,
        opts: &'a SimulatorOptions,
        behaviour: &'a Behaviour,
        now: Instant,
    ) -> Self {
        // Device 0 keeps the patient a single-device run always had.
        let seed = opts.seed.wrapping_add(index as u64);
        Device {
            index,
            summary: Summary {
                device_id: id.clone(),
                ..Summary::default()
            },
            id,
            opts,
            behaviour,
            patient: Patient::new(seed, opts.alert_rate),
            epoch: behaviour.epoch,
            next_seq: opts.start_seq,
            next_reading_at: now,
            made: 0,
            boot: 0,
            acked_this_boot: 0,
            window: Vec::with_capacity(opts.window),
            held_back: Vec::new(),
        }
    }

    /// All `count` readings are ACKed.
    pub fn done(&self) -> bool {
        self.summary.acked >= self.opts.count
    }

    /// Resends every reading whose time has come.
    pub fn resend_due(&mut self, now: Instant, line: &mut Line) -> Result<(), SimulatorError> {
        for i in 0..self.window.len() {
            if self.window[i].resend_at <= now {
                debug!(seq = self.window[i].seq, "Resending.");
                self.summary.resent += 1;
                self.transmit(i, now, line)?;
            }
        }
        Ok(())
    }

    /// Makes one new reading if the window, the interval and the count
    /// allow; sends it unless it is held back. True if one was made.
    pub fn make_reading(&mut self, now: Instant, line: &mut Line) -> Result<bool, SimulatorError> {
        if !self.may_make() || self.window.len() >= self.opts.window || now < self.next_reading_at {
            return Ok(false);
        }
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        self.made += 1;
        self.next_reading_at = now + self.opts.interval;
        let mut reading = self.patient.next_reading(&self.id, seq, chrono::Utc::now());
        reading.epoch = self.epoch;
        let alert = matches!(reading.priority, Priority::Alert);
        trace!(seq, kind = reading.kind.as_str(), "New reading.");
        let frame = Frame::Reading(reading).encode();
        if self
            .behaviour
            .late_every
            .is_some_and(|n| self.made.is_multiple_of(n))
        {
            debug!(seq, "Holding a reading back to send it late.");
            self.held_back.push(HeldBack {
                epoch: self.epoch,
                seq,
                made: self.made,
                boot: self.boot,
                frame,
                alert,
                later_acked: 0,
            });
        } else {
            let made = (self.made, self.boot);
            self.send_first(self.epoch, seq, made, frame, alert, now, line)?;
        }
        Ok(true)
    }

    /// Sends the readings held back long enough (or that nothing is left to
    /// wait for), while the window has room.
    pub fn send_late(&mut self, now: Instant, line: &mut Line) -> Result<(), SimulatorError> {
        while self.window.len() < self.opts.window {
            let idle = self.window.is_empty() && !self.may_make();
            let Some(i) = self
                .held_back
                .iter()
                .position(|h| idle || h.later_acked >= self.behaviour.late_by)
            else {
                break;
            };
            let h = self.held_back.remove(i);
            debug!(seq = h.seq, "Sending a reading late.");
            self.summary.late_sent += 1;
            self.send_first(
                h.epoch,
                h.seq,
                (h.made, h.boot),
                h.frame,
                h.alert,
                now,
                line,
            )?;
        }
        Ok(())
    }

    /// An ACK from the gateway; `lost` draws whether the line ate it.
    pub fn on_ack(
        &mut self,
        epoch: Option<u32>,
        seq: u32,
        now: Instant,
        lost: &mut dyn FnMut() -> bool,
    ) {
        let Some(i) = self.position(epoch, seq) else {
            debug!(seq, "ACK for a seq not outstanding: ignored.");
            return;
        };
        if lost() {
            debug!(seq, "ACK lost on the line (simulated): the reading stays.");
            self.summary.dropped_acks += 1;
            return;
        }
        let acked = self.window.remove(i);
        trace!(seq, "ACKed.");
        self.summary.acked += 1;
        if self.behaviour.list_acked {
            let frame = String::from_utf8_lossy(&acked.frame);
            self.summary.acked_frames.push(frame.trim_end().to_owned());
        }
        self.acked_this_boot += u64::from(acked.boot == self.boot);
        for h in &mut self.held_back {
            if acked.made > h.made {
                h.later_acked += 1;
            }
        }
        // A reboot with no reading left to make would change nothing.
        if self
            .behaviour
            .restart_every
            .is_some_and(|n| self.acked_this_boot >= n)
            && self.made < self.opts.count
        {
            self.reboot(now);
        }
    }

    /// A NAK naming this device. `seq` (with `epoch`) is the reading to
    /// resend: the rejected one, or for `missing` the one the gateway wants.
    pub fn on_nak(&mut self, epoch: Option<u32>, seq: Option<u32>, reason: &str, now: Instant) {
        self.summary.naks += 1;
        debug!(?seq, %reason, "NAK.");
        // A NAK without a seq names no frame: the timeouts recover it.
        let Some(seq) = seq else { return };
        match self.position(epoch, seq) {
            Some(i) => {
                let o = &mut self.window[i];
                let soonest = o.last_sent + self.behaviour.nak_resend_min();
                o.resend_at = o.resend_at.min(soonest.max(now));
            }
            None if self
                .held_back
                .iter()
                .any(|h| h.epoch == epoch && h.seq == seq) =>
            {
                debug!(
                    seq,
                    "The gateway asks for a reading held back: it comes late."
                );
            }
            None => debug!(seq, %reason, "NAK for a seq not held: ignored."),
        }
    }

    /// A BUSY: keep the reading and back off (protocol rule 7).
    pub fn on_busy(&mut self, epoch: Option<u32>, seq: u32, now: Instant) {
        let Some(i) = self.position(epoch, seq) else {
            return;
        };
        self.summary.busy += 1;
        let o = &mut self.window[i];
        o.busy += 1;
        let wait = self.behaviour.busy_backoff(o.busy);
        debug!(seq, ?wait, "BUSY: keeping the reading for later.");
        o.resend_at = now + wait;
    }

    /// The device restarts: its count starts again, a v1.1 device raises its
    /// epoch, and every reading not yet ACKed is kept and resent at once.
    fn reboot(&mut self, now: Instant) {
        self.summary.restarts += 1;
        self.boot += 1;
        self.acked_this_boot = 0;
        self.next_seq = self.opts.start_seq;
        self.epoch = self.epoch.map(|e| e.saturating_add(1));
        debug!(
            epoch = ?self.epoch,
            kept = self.window.len() + self.held_back.len(),
            "Device reboots."
        );
        for o in &mut self.window {
            o.resend_at = now;
        }
    }

    /// A new reading may be made: the count is not reached and its
    /// (epoch, seq) is not held already.
    fn may_make(&self) -> bool {
        self.made < self.opts.count
            && self.position(self.epoch, self.next_seq).is_none()
            && !self
                .held_back
                .iter()
                .any(|h| h.epoch == self.epoch && h.seq == self.next_seq)
    }

    #[allow(clippy::too_many_arguments, reason = "the parts of one reading")]
    fn send_first(
        &mut self,
        epoch: Option<u32>,
        seq: u32,
        (made, boot): (u64, u64),
        frame: Vec<u8>,
        alert: bool,
        now: Instant,
        line: &mut Line,
    ) -> Result<(), SimulatorError> {
        self.summary.sent += 1;
        self.summary.alerts += u64::from(alert);
        self.window.push(Outstanding {
            epoch,
            seq,
            made,
            boot,
            frame,
            last_sent: now,
            resend_at: now,
            busy: 0,
        });
        self.transmit(self.window.len() - 1, now, line)
    }

    /// Puts window entry `i` on the line and sets its next resend.
    fn transmit(&mut self, i: usize, now: Instant, line: &mut Line) -> Result<(), SimulatorError> {
        let timeout = self.resend_timeout();
        let o = &mut self.window[i];
        o.last_sent = now;
        o.resend_at = now + timeout;
        let Injected {
            corrupted,
            garbage,
            truncated,
        } = line.transmit(self.index, &o.frame)?;
        self.summary.corrupted += u64::from(corrupted);
        self.summary.garbage += u64::from(garbage);
        self.summary.truncated += u64::from(truncated);
        Ok(())
    }

    fn resend_timeout(&self) -> Duration {
        self.behaviour.scaled(self.opts.ack_timeout)
    }

    fn position(&self, epoch: Option<u32>, seq: u32) -> Option<usize> {
        self.window
            .iter()
            .position(|o| o.epoch == epoch && o.seq == seq)
    }
}
