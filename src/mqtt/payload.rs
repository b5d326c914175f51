//! MQTT payloads, schema version 1 (specified in `docs/mqtt-payloads.md`).
//!
//! Every reading carries a stable id `{gateway}/{device}/{seq}` so that a
//! receiver can deduplicate whatever happens on the way.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::outbox::Queued;

pub const SCHEMA: u32 = 1;

/// Formats times the way every payload does: RFC 3339, UTC, milliseconds.
pub mod time_format {
    use super::*;
    use serde::Serializer;

    pub fn rfc3339(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&rfc3339(t))
    }
}

/// One reading on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadingOut {
    pub id: String,
    pub device: String,
    pub seq: u32,
    pub kind: String,
    pub value: f64,
    pub unit: String,
    pub priority: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(serialize_with = "time_format::serialize")]
    pub device_time: DateTime<Utc>,
    #[serde(serialize_with = "time_format::serialize")]
    pub received_at: DateTime<Utc>,
}

/// The body of a `readings` or `alerts` message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Batch {
    pub schema: u32,
    pub gateway: String,
    pub readings: Vec<ReadingOut>,
}

pub fn reading_id(gateway: &str, device: &str, seq: u32) -> String {
    format!("{gateway}/{device}/{seq}")
}

pub fn batch(gateway: &str, readings: &[Queued]) -> Vec<u8> {
    let body = Batch {
        schema: SCHEMA,
        gateway: gateway.to_owned(),
        readings: readings
            .iter()
            .map(|r| ReadingOut {
                id: reading_id(gateway, &r.device, r.seq),
                device: r.device.clone(),
                seq: r.seq,
                kind: r.kind.clone(),
                value: r.value,
                unit: r.unit.clone(),
                priority: r.priority.as_str().to_owned(),
                detail: r.detail.clone(),
                device_time: r.device_time,
                received_at: r.received_at,
            })
            .collect(),
    };
    serde_json::to_vec(&body).expect("a batch always serializes")
}

/// Why a status was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Sent right after CONNACK.
    Connected,
    /// The periodic refresh while online.
    Heartbeat,
    /// An alarm was raised or cleared (see `alarms`).
    Alarm,
    /// The gateway stops on SIGTERM/SIGINT.
    Shutdown,
    /// The last will: the broker lost us without a DISCONNECT.
    ConnectionLost,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Backlog {
    pub alert: u64,
    pub routine: u64,
    pub inflight: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceSeen {
    pub device: String,
    #[serde(serialize_with = "time_format::serialize")]
    pub last_heard: DateTime<Utc>,
}

/// The retained body of the `status` topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub schema: u32,
    pub gateway: String,
    /// `online` or `offline`.
    pub state: String,
    pub reason: Reason,
    /// Raised on every connect: a will with a lower session than the last
    /// `online` is stale.
    pub session: u64,
    #[serde(serialize_with = "time_format::serialize")]
    pub at: DateTime<Utc>,
    /// Absent in the will (written at CONNECT, when it is not yet known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSeen>,
    /// Active alarms, e.g. `store-full`; empty when all is well.
    #[serde(default)]
    pub alarms: Vec<String>,
}

impl Status {
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::frame::Priority;

    #[test]
    fn batch_carries_stable_ids() {
        let t = DateTime::from_timestamp_millis(1_764_091_561_123).unwrap();
        let q = Queued {
            id: 9,
            device: "PM-1".into(),
            seq: 42,
            kind: "heart_rate".into(),
            value: 72.0,
            unit: "bpm".into(),
            priority: Priority::Routine,
            detail: None,
            device_time: t,
            received_at: t,
        };
        let json: serde_json::Value = serde_json::from_slice(&batch("gw-1", &[q])).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["readings"][0]["id"], "gw-1/PM-1/42");
        assert_eq!(
            json["readings"][0]["device_time"],
            "2025-11-25T17:26:01.123Z"
        );
        assert!(json["readings"][0].get("detail").is_none());
    }

    /// A resumed exchange rebuilds its payload from the stored readings: the
    /// bytes must not drift between versions, so they are pinned here.
    #[test]
    fn batch_bytes_are_stable() {
        let t = DateTime::from_timestamp_millis(1_764_091_561_123).unwrap();
        let q = Queued {
            id: 1,
            device: "ICD-0042".into(),
            seq: 7,
            kind: "episode".into(),
            value: 482.0,
            unit: "s".into(),
            priority: Priority::Alert,
            detail: Some("AF".into()),
            device_time: t,
            received_at: t,
        };
        assert_eq!(
            String::from_utf8(batch("gw-0001", &[q])).unwrap(),
            r#"{"schema":1,"gateway":"gw-0001","readings":[{"id":"gw-0001/ICD-0042/7","device":"ICD-0042","seq":7,"kind":"episode","value":482.0,"unit":"s","priority":"alert","detail":"AF","device_time":"2025-11-25T17:26:01.123Z","received_at":"2025-11-25T17:26:01.123Z"}]}"#
        );
    }

    #[test]
    fn will_status_has_reason_connection_lost() {
        let s = Status {
            schema: SCHEMA,
            gateway: "gw-1".into(),
            state: "offline".into(),
            reason: Reason::ConnectionLost,
            session: 3,
            at: Utc::now(),
            backlog: None,
            devices: vec![],
            alarms: vec![],
        };
        let json: serde_json::Value = serde_json::from_slice(&s.to_vec()).unwrap();
        assert_eq!(json["reason"], "connection-lost");
        assert_eq!(json["state"], "offline");
        assert_eq!(json["session"], 3);
    }
}
