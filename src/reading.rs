//! The domain types every layer shares: a reading as the implant's device
//! reported it, its kind and its priority. The serial codec parses them, the
//! outbox stores them and the MQTT payloads carry them; none of those layers
//! needs another's wire format to talk about a reading.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// What a reading measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    HeartRate,
    BatteryVoltage,
    LeadImpedance,
    PacingPercent,
    AfBurden,
    /// An arrhythmia episode; the value is its duration, the detail its type.
    Episode,
    /// A delivered shock; the value is its energy.
    ShockDelivered,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::HeartRate,
        Kind::BatteryVoltage,
        Kind::LeadImpedance,
        Kind::PacingPercent,
        Kind::AfBurden,
        Kind::Episode,
        Kind::ShockDelivered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HeartRate => "heart_rate",
            Kind::BatteryVoltage => "battery_voltage",
            Kind::LeadImpedance => "lead_impedance",
            Kind::PacingPercent => "pacing_percent",
            Kind::AfBurden => "af_burden",
            Kind::Episode => "episode",
            Kind::ShockDelivered => "shock_delivered",
        }
    }

    /// The unit a reading of this kind must carry on the wire.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::HeartRate => "bpm",
            Kind::BatteryVoltage => "V",
            Kind::LeadImpedance => "ohm",
            Kind::PacingPercent | Kind::AfBurden => "%",
            Kind::Episode => "s",
            Kind::ShockDelivered => "J",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::parse(s).ok_or_else(|| unknown("kind", s, Kind::ALL.map(Kind::as_str)))
    }
}

/// How urgently a reading must reach the clinic.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Declared first so that alerts sort before routine readings.
    Alert,
    Routine,
}

impl Priority {
    const ALL: [Priority; 2] = [Priority::Alert, Priority::Routine];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Alert => "alert",
            Priority::Routine => "routine",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::parse(s)
            .ok_or_else(|| unknown("priority", s, Priority::ALL.map(Priority::as_str)))
    }
}

/// One measurement from the implant, as the device reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// 1..=32 characters of `[A-Za-z0-9._-]`.
    pub device_id: String,
    /// The device's boot epoch (protocol v1.1): a counter the device raises
    /// each time its seq count starts again. `None` for a v1 device, which
    /// the gateway treats as epoch 0.
    pub epoch: Option<u32>,
    /// Monotonic per device and epoch.
    pub seq: u32,
    /// Carried on the wire to millisecond precision.
    pub device_time: DateTime<Utc>,
    pub kind: Kind,
    /// Finite; its unit is `kind.unit()`.
    pub value: f64,
    pub priority: Priority,
    /// Episode: required, one of `AF`, `VT`, `VF`. Other kinds: `None`.
    pub detail: Option<String>,
}

impl Reading {
    /// The epoch this reading belongs to (0 for a v1 device).
    pub fn epoch_or_zero(&self) -> u32 {
        self.epoch.unwrap_or(0)
    }

    /// A stable 64-bit hash of what the reading says (kind, value, priority,
    /// detail, device time), not of where it sits (device, epoch, seq): two
    /// frames with the same key and hash are the same reading sent twice.
    /// FNV-1a, so it never changes between builds; it is stored on disk.
    pub fn content_hash(&self) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            // A separator, so that field boundaries count.
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        eat(self.kind.as_str().as_bytes());
        eat(&self.value.to_bits().to_le_bytes());
        eat(self.priority.as_str().as_bytes());
        eat(self.detail.as_deref().unwrap_or("").as_bytes());
        eat(&self.device_time.timestamp_millis().to_le_bytes());
        h as i64
    }
}

/// `unknown kind `foo` (expected one of a, b)`; never quotes patient data,
/// only the token that did not parse.
pub(crate) fn unknown<const N: usize>(what: &str, got: &str, valid: [&str; N]) -> String {
    format!(
        "unknown {what} `{}` (expected one of {})",
        got.escape_default(),
        valid.join(", ")
    )
}
