//! MQTT payloads, schema version 1 (specified in `docs/mqtt-payloads.md`).
//!
//! Every reading carries a stable id `{gateway}/{device}/{key}` so that a
//! receiver can deduplicate whatever happens on the way; `key` is the seq,
//! with the epoch, run and variant added when they are not 0 (see
//! [`reading_id`]).

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
    /// The device's boot epoch (protocol v1.1); omitted when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
    /// A run the gateway began when a v1 device counted again; omitted when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub run: u32,
    /// This reading began such a run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub restart: bool,
    /// A higher seq of the same device run went out on this topic before it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub late: bool,
    /// Another reading was stored before under the same device, epoch, run
    /// and seq; this one is variant `variant` of it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub conflict: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub variant: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !b
}

/// The body of a `readings` or `alerts` message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Batch {
    pub schema: u32,
    pub gateway: String,
    pub readings: Vec<ReadingOut>,
}

/// `{gateway}/{device}/{seq}`, and `-e{epoch}`, `-r{run}`, `-c{variant}`
/// after the seq for each that is not 0: `gw-0001/ICD-0042/42-e3-c1`. A v1
/// device that never restarts keeps the ids of schema 1 exactly.
pub fn reading_id(gateway: &str, r: &Queued) -> String {
    format!(
        "{gateway}/{}/{}",
        r.device,
        reading_key(r.seq, r.epoch, r.run, r.variant)
    )
}

/// The last part of a reading id: `42`, `42-e3`, `42-r1`, `42-e3-c1`, ...
pub fn reading_key(seq: u32, epoch: u32, run: u32, variant: u32) -> String {
    let mut key = seq.to_string();
    for (tag, n) in [("e", epoch), ("r", run), ("c", variant)] {
        if n != 0 {
            key.push_str(&format!("-{tag}{n}"));
        }
    }
    key
}

pub fn batch(gateway: &str, readings: &[Queued]) -> Vec<u8> {
    let body = Batch {
        schema: SCHEMA,
        gateway: gateway.to_owned(),
        readings: readings
            .iter()
            .map(|r| ReadingOut {
                id: reading_id(gateway, r),
                device: r.device.clone(),
                seq: r.seq,
                kind: r.kind.clone(),
                value: r.value,
                unit: r.unit.clone(),
                priority: r.priority.as_str().to_owned(),
                detail: r.detail.clone(),
                device_time: r.device_time,
                received_at: r.received_at,
                epoch: r.epoch,
                run: r.run,
                restart: r.restart,
                late: r.late,
                conflict: r.variant > 0,
                variant: r.variant,
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

/// The head of the gateway's audit trail when a status was built: the copy
/// the hospital keeps, against which `hearth audit verify --head ID:HASH`
/// shows a trail cut short or rewritten (docs/mqtt-payloads.md, 4.9).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditHead {
    /// The last entry's id.
    pub id: i64,
    /// Its SHA-256, hex.
    pub hash: String,
    /// False when the gateway found its own chain broken (`hearth audit
    /// verify` says where).
    pub intact: bool,
}

impl AuditHead {
    /// The head a walk of the chain found; `None` for an empty trail.
    pub fn from_verdict(v: &crate::audit::Verdict) -> Option<AuditHead> {
        v.head.as_ref().map(|(id, hash)| AuditHead {
            id: *id,
            hash: hash.clone(),
            intact: v.broken.is_none(),
        })
    }
}

/// A status as the connected gateway publishes it: the [`Status`] fields,
/// then `audit_head`. The will is a bare [`Status`]: it is written into the
/// CONNECT, and a head that old would only mislead.
#[derive(Debug, Serialize)]
pub struct StatusReport<'a> {
    #[serde(flatten)]
    pub status: &'a Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_head: Option<AuditHead>,
}

impl StatusReport<'_> {
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::Priority;

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
            epoch: 0,
            run: 0,
            variant: 0,
            late: false,
            restart: false,
        };
        let json: serde_json::Value = serde_json::from_slice(&batch("gw-1", &[q])).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["readings"][0]["id"], "gw-1/PM-1/42");
        assert_eq!(
            json["readings"][0]["device_time"],
            "2025-11-25T17:26:01.123Z"
        );
        assert!(json["readings"][0].get("detail").is_none());
        assert!(json["readings"][0].get("epoch").is_none());
        assert!(json["readings"][0].get("late").is_none());
    }

    #[test]
    fn restarted_late_and_conflicting_readings_get_their_own_ids() {
        let t = DateTime::from_timestamp_millis(1_764_091_561_123).unwrap();
        let q = |epoch, run, variant, late, restart| Queued {
            id: 1,
            device: "PM-1".into(),
            seq: 5,
            kind: "heart_rate".into(),
            value: 72.0,
            unit: "bpm".into(),
            priority: Priority::Routine,
            detail: None,
            device_time: t,
            received_at: t,
            epoch,
            run,
            variant,
            late,
            restart,
        };
        let all = [
            q(0, 0, 0, false, false),
            q(0, 1, 0, false, true),
            q(3, 0, 0, true, false),
            q(3, 0, 1, false, false),
            q(2, 4, 7, false, false),
        ];
        let json: serde_json::Value = serde_json::from_slice(&batch("gw", &all)).unwrap();
        let r = &json["readings"];
        let ids: Vec<&str> = (0..5).map(|i| r[i]["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "gw/PM-1/5",
                "gw/PM-1/5-r1",
                "gw/PM-1/5-e3",
                "gw/PM-1/5-e3-c1",
                "gw/PM-1/5-e2-r4-c7"
            ]
        );
        assert_eq!(r[1]["restart"], true);
        assert_eq!(r[1]["run"], 1);
        assert_eq!(r[2]["late"], true);
        assert_eq!(r[2]["epoch"], 3);
        assert_eq!(r[3]["conflict"], true);
        assert_eq!(r[3]["variant"], 1);
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
            epoch: 0,
            run: 0,
            variant: 0,
            late: false,
            restart: false,
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

    #[test]
    fn a_status_report_ends_with_the_audit_head() {
        let s = Status {
            schema: SCHEMA,
            gateway: "gw-1".into(),
            state: "online".into(),
            reason: Reason::Heartbeat,
            session: 3,
            at: DateTime::from_timestamp_millis(1_764_091_561_123).unwrap(),
            backlog: None,
            devices: vec![],
            alarms: vec![],
        };
        let head = AuditHead {
            id: 42,
            hash: "9f86".into(),
            intact: true,
        };
        let body = StatusReport {
            status: &s,
            audit_head: Some(head.clone()),
        }
        .to_vec();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"schema":1,"gateway":"gw-1","state":"online","reason":"heartbeat","session":3,"at":"2025-11-25T17:26:01.123Z","alarms":[],"audit_head":{"id":42,"hash":"9f86","intact":true}}"#
        );
        // A receiver that reads it as a bare status loses nothing else.
        let back: Status = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, s);
        let none = StatusReport {
            status: &s,
            audit_head: None,
        };
        assert_eq!(none.to_vec(), s.to_vec());
    }
}
