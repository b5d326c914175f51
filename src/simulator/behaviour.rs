//! What real devices do that a tidy one would not: count from 0, reboot and
//! count again (with or without a boot epoch), send some readings late, share
//! a port with another device, lose ACKs on the line, and wait as long as the
//! protocol suggests (5 s for an answer, 10 s doubling to 5 min after BUSY).
//!
//! [`Behaviour::default`] is the simulator of before: one v1 device that
//! never reboots, sends in order and hears every ACK; only the BUSY back-off
//! follows the protocol (scaled by `time_scale`).

use std::time::Duration;

use super::SimulatorError;

/// The first wait after a BUSY, doubled on each BUSY for the same reading
/// (protocol rule 7), before `time_scale`.
pub const BUSY_BACKOFF_FIRST: Duration = Duration::from_secs(10);
/// The longest wait after a BUSY, before `time_scale`.
pub const BUSY_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// The shortest time between two transmissions of one reading on a NAK
/// `gap` or `missing`, before `time_scale`: the gateway holds a reading for
/// up to 2 s behind a gap, and a device's line is slow; without a floor the
/// device would resend as fast as the gateway can NAK.
pub const NAK_RESEND_MIN: Duration = Duration::from_millis(50);
/// No scaled wait is shorter than this: the device loop's read granularity.
pub const SCALED_FLOOR: Duration = Duration::from_millis(20);

/// How the simulated device(s) behave beyond sending readings in order.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Devices sharing the port, each with its own count, window and
    /// patient. With more than one, the ids are `{device_id}-1` to `-N`.
    pub devices: u32,
    /// Protocol v1.1: the boot epoch sent with every seq as `EPOCH:SEQ`,
    /// raised by one at each reboot. `None`: protocol v1 (plain seq).
    pub epoch: Option<u32>,
    /// Reboot once this many readings made since the last boot are ACKed
    /// (and some are left to make): the count starts again at `start_seq`,
    /// unACKed readings are kept and resent at once (protocol rule 2).
    pub restart_every: Option<u64>,
    /// Every Nth reading is held back and sent only once `late_by` later
    /// readings have been ACKed, so it reaches the gateway after them.
    pub late_every: Option<u64>,
    /// See `late_every`.
    pub late_by: u64,
    /// Share (0..1) of ACKs the device never hears, as if lost on the line:
    /// it resends the reading after its timeout.
    pub drop_ack_rate: f64,
    /// Factor on the resend timeout, the BUSY back-off and the NAK resend
    /// floor, e.g. 0.01 for tests.
    pub time_scale: f64,
    /// Lists every ACKed reading's frame in the summary (`acked_frames`),
    /// so a test can check each one reached the hospital.
    pub list_acked: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            devices: 1,
            epoch: None,
            restart_every: None,
            late_every: None,
            late_by: 3,
            drop_ack_rate: 0.0,
            time_scale: 1.0,
            list_acked: false,
        }
    }
}

impl Behaviour {
    /// Checks the values that would make a run meaningless or endless.
    pub fn validate(&self, device_id: &str) -> Result<(), SimulatorError> {
        let invalid = |key: &str, why: &str| {
            Err(SimulatorError::InvalidOption {
                key: key.to_owned(),
                reason: why.to_owned(),
            })
        };
        if self.devices == 0 {
            return invalid("devices", "must be at least 1");
        }
        if self.devices > 1 && device_id.len() + 1 + self.devices.to_string().len() > 32 {
            return invalid(
                "devices",
                "the ids `{device_id}-N` must fit in 32 characters (use a shorter `device_id`)",
            );
        }
        if self.restart_every == Some(0) {
            return invalid("restart_every", "must be at least 1");
        }
        if self.late_every.is_some_and(|n| n < 2) {
            return invalid(
                "late_every",
                "must be at least 2 (every Nth reading is late)",
            );
        }
        if self.late_by == 0 {
            return invalid("late_by", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.drop_ack_rate) {
            return invalid(
                "drop_ack_rate",
                "must be at least 0 and below 1 (at 1 no reading is ever ACKed)",
            );
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return invalid("time_scale", "must be a number above 0");
        }
        Ok(())
    }

    /// The ids of the devices on the port.
    pub fn device_ids(&self, device_id: &str) -> Vec<String> {
        match self.devices {
            1 => vec![device_id.to_owned()],
            n => (1..=n).map(|i| format!("{device_id}-{i}")).collect(),
        }
    }

    /// `wait` times `time_scale`, never below [`SCALED_FLOOR`].
    pub fn scaled(&self, wait: Duration) -> Duration {
        wait.mul_f64(self.time_scale).max(SCALED_FLOOR)
    }

    /// The wait before resending a reading BUSY `times` times in a row.
    pub fn busy_backoff(&self, times: u32) -> Duration {
        let doublings = times.saturating_sub(1).min(16);
        let wait = BUSY_BACKOFF_FIRST.saturating_mul(1 << doublings);
        self.scaled(wait.min(BUSY_BACKOFF_MAX))
    }

    /// The shortest time between two transmissions of a reading on a NAK.
    pub fn nak_resend_min(&self) -> Duration {
        self.scaled(NAK_RESEND_MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_backoff_doubles_from_10_s_to_5_min() {
        let real = Behaviour::default();
        let waits: Vec<u64> = (1..=7).map(|n| real.busy_backoff(n).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(real.busy_backoff(u32::MAX), BUSY_BACKOFF_MAX);
        let fast = Behaviour {
            time_scale: 0.01,
            ..Behaviour::default()
        };
        assert_eq!(fast.busy_backoff(1), Duration::from_millis(100));
        assert_eq!(fast.busy_backoff(9), Duration::from_secs(3));
    }

    #[test]
    fn scaled_waits_never_drop_below_the_loop_granularity() {
        let tiny = Behaviour {
            time_scale: 1e-9,
            ..Behaviour::default()
        };
        assert_eq!(tiny.nak_resend_min(), SCALED_FLOOR);
        assert_eq!(tiny.scaled(Duration::from_secs(5)), SCALED_FLOOR);
    }

    #[test]
    fn devices_get_numbered_ids_only_when_there_are_several() {
        let one = Behaviour::default();
        assert_eq!(one.device_ids("PM-1"), ["PM-1"]);
        let two = Behaviour {
            devices: 2,
            ..Behaviour::default()
        };
        assert_eq!(two.device_ids("PM-1"), ["PM-1-1", "PM-1-2"]);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let cases = [
            (
                Behaviour {
                    devices: 0,
                    ..Behaviour::default()
                },
                "invalid simulator option `devices`: must be at least 1",
            ),
            (
                Behaviour {
                    restart_every: Some(0),
                    ..Behaviour::default()
                },
                "invalid simulator option `restart_every`: must be at least 1",
            ),
            (
                Behaviour {
                    late_every: Some(1),
                    ..Behaviour::default()
                },
                "invalid simulator option `late_every`: must be at least 2 (every Nth reading is late)",
            ),
            (
                Behaviour {
                    late_by: 0,
                    ..Behaviour::default()
                },
                "invalid simulator option `late_by`: must be at least 1",
            ),
            (
                Behaviour {
                    drop_ack_rate: 1.0,
                    ..Behaviour::default()
                },
                "invalid simulator option `drop_ack_rate`: must be at least 0 and below 1 (at 1 no reading is ever ACKed)",
            ),
            (
                Behaviour {
                    time_scale: f64::NAN,
                    ..Behaviour::default()
                },
                "invalid simulator option `time_scale`: must be a number above 0",
            ),
        ];
        for (behaviour, message) in cases {
            let error = behaviour.validate("PM-1").unwrap_err();
            assert_eq!(error.to_string(), message);
        }
        let long = Behaviour {
            devices: 10,
            ..Behaviour::default()
        };
        assert!(long.validate(&"X".repeat(30)).is_err());
        assert!(long.validate(&"X".repeat(29)).is_ok());
    }
}
