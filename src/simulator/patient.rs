//! A plausible patient with an implant: the source of the simulator's readings.
//!
//! Everything is drawn from one seeded [`fastrand::Rng`], so a seed and the
//! same sequence of `now` values give the same readings, on every machine.
//! The model is deliberately simple; it only has to look like a real implant
//! to a human reading the gateway's output:
//! - heart rate follows a day–night rhythm (lowest around 03:00, highest in
//!   the afternoon, by the device time's hour) plus noise;
//! - the battery starts near 3.0 V and falls slowly;
//! - lead impedance wanders within 400–700 ohm;
//! - pacing percent is higher when the intrinsic rate is low (at night);
//! - AF burden rises after each AF episode and decays;
//! - episodes (AF, sometimes VT or VF) come as alerts at `alert_rate` per
//!   reading, and a VT or VF is sometimes followed by a `shock_delivered` alert.

use std::f64::consts::TAU;

use chrono::{DateTime, Timelike, Utc};

use crate::reading::{Kind, Priority, Reading};

/// Heart rate is clamped to this range (bpm).
pub const HEART_RATE_RANGE: (f64, f64) = (40.0, 150.0);
/// Battery voltage never reported outside this range (V).
pub const BATTERY_RANGE: (f64, f64) = (2.2, 3.1);
/// Lead impedance is clamped to this range (ohm).
pub const IMPEDANCE_RANGE: (f64, f64) = (400.0, 700.0);

/// Battery drain per reading (V): about 0.1 V per 5000 readings.
const BATTERY_DRAIN: f64 = 0.000_02;
/// Chance that a VT is followed by a shock; a VF almost always is.
const SHOCK_AFTER_VT: f64 = 0.3;
const SHOCK_AFTER_VF: f64 = 0.9;

/// One simulated patient and implant. Deterministic for a seed.
#[derive(Debug, Clone)]
pub struct Patient {
    rng: fastrand::Rng,
    alert_rate: f64,
    /// Resting rate at midday, before the day–night swing.
    base_rate: f64,
    battery: f64,
    impedance: f64,
    af_burden: f64,
    /// Energy (J) of a shock to report with the next reading.
    pending_shock: Option<f64>,
}

impl Patient {
    /// A patient whose values are drawn from `seed`; `alert_rate` (0..=1) is
    /// the chance that a reading is an episode alert.
    pub fn new(seed: u64, alert_rate: f64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let base_rate = 64.0 + rng.f64() * 12.0;
        let battery = 2.98 + rng.f64() * 0.04;
        let impedance = 450.0 + rng.f64() * 200.0;
        let af_burden = rng.f64() * 2.0;
        Patient {
            rng,
            alert_rate: alert_rate.clamp(0.0, 1.0),
            base_rate,
            battery,
            impedance,
            af_burden,
            pending_shock: None,
        }
    }

    /// The next reading: a shock owed after a VT/VF comes first, then an
    /// episode with probability `alert_rate`, else a routine measurement.
    pub fn next_reading(&mut self, device_id: &str, seq: u32, now: DateTime<Utc>) -> Reading {
        self.age();
        let (kind, value, priority, detail) = if let Some(joules) = self.pending_shock.take() {
            (Kind::ShockDelivered, joules, Priority::Alert, None)
        } else if self.rng.f64() < self.alert_rate {
            let (rhythm, seconds) = self.episode();
            (
                Kind::Episode,
                seconds,
                Priority::Alert,
                Some(rhythm.to_owned()),
            )
        } else {
            let kind = self.routine_kind();
            (kind, self.measure(kind, now), Priority::Routine, None)
        };
        Reading {
            device_id: device_id.to_owned(),
            epoch: None,
            seq,
            device_time: now,
            kind,
            value,
            priority,
            detail,
        }
    }

    /// Slow drifts that happen whatever is measured.
    fn age(&mut self) {
        self.battery = (self.battery - BATTERY_DRAIN).max(BATTERY_RANGE.0);
        self.impedance = (self.impedance + self.noise(5.0)).clamp(420.0, 680.0);
        self.af_burden *= 0.999;
    }

    /// Draws an episode: rhythm and duration in seconds. May arm a shock.
    fn episode(&mut self) -> (&'static str, f64) {
        let roll = self.rng.f64();
        let (rhythm, seconds) = if roll < 0.8 {
            ("AF", 30.0 + self.rng.f64() * 3570.0)
        } else if roll < 0.95 {
            ("VT", 10.0 + self.rng.f64() * 110.0)
        } else {
            ("VF", 5.0 + self.rng.f64() * 25.0)
        };
        let seconds = seconds.round();
        match rhythm {
            "AF" => self.af_burden = (self.af_burden + seconds / 864.0).min(100.0),
            "VT" if self.rng.f64() < SHOCK_AFTER_VT => self.arm_shock(),
            "VF" if self.rng.f64() < SHOCK_AFTER_VF => self.arm_shock(),
            _ => {}
        }
        (rhythm, seconds)
    }

    fn arm_shock(&mut self) {
        self.pending_shock = Some(f64::from(self.rng.u8(25..=41)));
    }

    /// Heart rate most often; battery and impedance least.
    fn routine_kind(&mut self) -> Kind {
        match self.rng.u8(0..10) {
            0..=4 => Kind::HeartRate,
            5 | 6 => Kind::PacingPercent,
            7 => Kind::AfBurden,
            8 => Kind::LeadImpedance,
            _ => Kind::BatteryVoltage,
        }
    }

    fn measure(&mut self, kind: Kind, now: DateTime<Utc>) -> f64 {
        match kind {
            Kind::HeartRate => {
                let rate = self.rhythm_rate(now) + self.noise(4.0);
                rate.clamp(HEART_RATE_RANGE.0, HEART_RATE_RANGE.1).round()
            }
            Kind::BatteryVoltage => {
                let volts = self.battery + self.noise(0.005);
                round_to(volts.clamp(BATTERY_RANGE.0, BATTERY_RANGE.1), 3)
            }
            Kind::LeadImpedance => {
                let ohms = self.impedance + self.noise(15.0);
                ohms.clamp(IMPEDANCE_RANGE.0, IMPEDANCE_RANGE.1).round()
            }
            Kind::PacingPercent => {
                // Paced more when the intrinsic rate falls below ~70 bpm.
                let deficit = 70.0 - self.rhythm_rate(now);
                let percent = 30.0 + deficit * 4.0 + self.noise(5.0);
                round_to(percent.clamp(0.0, 100.0), 1)
            }
            Kind::AfBurden => {
                let percent = self.af_burden + self.noise(0.2);
                round_to(percent.clamp(0.0, 100.0), 1)
            }
            Kind::Episode | Kind::ShockDelivered => {
                unreachable!("alerts are not routine measurements")
            }
        }
    }

    /// The noiseless rate for the time of day: `base - 8` around 03:00,
    /// `base + 8` around 15:00.
    fn rhythm_rate(&self, now: DateTime<Utc>) -> f64 {
        let hour = f64::from(now.hour()) + f64::from(now.minute()) / 60.0;
        self.base_rate - 8.0 * (TAU * (hour - 3.0) / 24.0).cos()
    }

    /// Uniform noise in `-amplitude..amplitude`.
    fn noise(&mut self, amplitude: f64) -> f64 {
        (self.rng.f64() * 2.0 - 1.0) * amplitude
    }
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at_hour(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 3, hour, 30, 0).unwrap()
    }

    fn readings(seed: u64, alert_rate: f64, n: u32) -> Vec<Reading> {
        let mut patient = Patient::new(seed, alert_rate);
        (1..=n)
            .map(|seq| patient.next_reading("PM-000001", seq, at_hour(seq % 24)))
            .collect()
    }

    #[test]
    fn values_stay_within_physiological_ranges() {
        for seed in 0..20 {
            for r in readings(seed, 0.05, 2000) {
                let v = r.value;
                let ok = match r.kind {
                    Kind::HeartRate => (HEART_RATE_RANGE.0..=HEART_RATE_RANGE.1).contains(&v),
                    Kind::BatteryVoltage => (BATTERY_RANGE.0..=BATTERY_RANGE.1).contains(&v),
                    Kind::LeadImpedance => (IMPEDANCE_RANGE.0..=IMPEDANCE_RANGE.1).contains(&v),
                    Kind::PacingPercent | Kind::AfBurden => (0.0..=100.0).contains(&v),
                    Kind::Episode => (5.0..=3600.0).contains(&v),
                    Kind::ShockDelivered => (25.0..=41.0).contains(&v),
                };
                assert!(ok, "seed {seed}: {:?} {v} out of range", r.kind.as_str());
            }
        }
    }

    #[test]
    fn alerts_are_well_formed() {
        for r in readings(7, 0.2, 3000) {
            match r.kind {
                Kind::Episode => {
                    assert!(matches!(r.priority, Priority::Alert));
                    assert!(matches!(r.detail.as_deref(), Some("AF" | "VT" | "VF")));
                }
                Kind::ShockDelivered => {
                    assert!(matches!(r.priority, Priority::Alert));
                    assert!(r.detail.is_none());
                }
                _ => {
                    assert!(matches!(r.priority, Priority::Routine));
                    assert!(r.detail.is_none());
                }
            }
        }
    }

    #[test]
    fn same_seed_gives_same_readings() {
        let encode = |rs: Vec<Reading>| -> Vec<String> {
            rs.into_iter()
                .map(|r| format!("{} {} {:?} {}", r.seq, r.kind.as_str(), r.detail, r.value))
                .collect()
        };
        assert_eq!(
            encode(readings(42, 0.02, 500)),
            encode(readings(42, 0.02, 500))
        );
        assert_ne!(
            encode(readings(42, 0.02, 500)),
            encode(readings(43, 0.02, 500))
        );
    }

    #[test]
    fn episodes_come_at_about_the_configured_rate() {
        let n = 20_000;
        for rate in [0.0, 0.02, 0.1] {
            let episodes = readings(3, rate, n)
                .iter()
                .filter(|r| matches!(r.kind, Kind::Episode))
                .count();
            let expected = rate * f64::from(n);
            // Four standard deviations of a binomial count.
            let slack = 4.0 * (expected * (1.0 - rate)).sqrt();
            assert!(
                (episodes as f64 - expected).abs() <= slack,
                "rate {rate}: {episodes} episodes, expected about {expected}"
            );
        }
    }

    #[test]
    fn shocks_follow_only_ventricular_episodes() {
        let rs = readings(11, 0.3, 5000);
        let mut shocks = 0;
        for pair in rs.windows(2) {
            if matches!(pair[1].kind, Kind::ShockDelivered) {
                shocks += 1;
                assert!(matches!(pair[0].kind, Kind::Episode));
                assert!(matches!(pair[0].detail.as_deref(), Some("VT" | "VF")));
            }
        }
        assert!(shocks > 0, "no shock in 5000 readings at alert rate 0.3");
    }

    #[test]
    fn heart_rate_is_lower_at_night() {
        let mean_at = |hour: u32| {
            let mut patient = Patient::new(5, 0.0);
            let rates: Vec<f64> = (0..4000)
                .map(|seq| patient.next_reading("PM-000001", seq, at_hour(hour)))
                .filter(|r| matches!(r.kind, Kind::HeartRate))
                .map(|r| r.value)
                .collect();
            rates.iter().sum::<f64>() / rates.len() as f64
        };
        assert!(mean_at(3) + 10.0 < mean_at(15));
    }

    #[test]
    fn battery_falls_slowly() {
        let mut patient = Patient::new(9, 0.0);
        let start = patient.battery;
        for seq in 0..5000 {
            patient.next_reading("PM-000001", seq, at_hour(12));
        }
        let drop = start - patient.battery;
        assert!((0.05..0.2).contains(&drop), "battery fell {drop} V");
        assert!((2.95..3.05).contains(&start));
    }
}
