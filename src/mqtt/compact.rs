//! The compact batch: the body of a `readings` or `alerts` message
//! (`docs/mqtt-payloads.md`, section 2) in CBOR (RFC 8949): 15 bytes a
//! reading instead of 210 in a batch of 50. The format is specified in
//! `docs/compact-encoding.md`.
//!
//! Guarantees, each proven by the tests named after it:
//! - A receiver loses nothing: [`decode`] of [`encode`] is the [`Batch`]
//!   that [`payload::batch`] writes for the same readings, and serialises
//!   to the very same JSON bytes (ids, flags, times to the millisecond,
//!   values to the bit).
//! - [`decode`] never panics on untrusted bytes, and allocates at most
//!   [`MAX_READINGS`] readings of strings of at most [`MAX_TEXT`] bytes,
//!   whatever lengths the input claims.
//!
//! What readings share is said once per batch: the gateway, and each
//! *series* (device, kind, unit, priority, epoch, run, detail). A reading is
//! then a series index, three running deltas (seq, device time, and the lag
//! of its receive time behind it) and a value; ids and `conflict` are not
//! sent, since they follow from the rest ([`payload::reading_id`]).
//!
//! The CBOR is written and read here: the format uses six kinds of item,
//! fewer lines than a crate's glue (the doc says why no crate).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::payload::{self, Batch, ReadingOut, SCHEMA};
use crate::outbox::Queued;

/// The MQTT 5 content type of a compact batch.
pub const CONTENT_TYPE: &str = "application/cbor; hearth-batch=1";
/// The first item of every compact batch; a batch of this version carries
/// readings of JSON schema [`SCHEMA`].
pub const VERSION: u64 = 1;
/// Most readings (and series) [`decode`] takes: the bound of
/// `mqtt.batch_max_readings`.
pub const MAX_READINGS: usize = 1000;
/// Longest string [`decode`] takes, in bytes: a gateway id's bound (device
/// ids are at most 32, the other strings shorter still).
pub const MAX_TEXT: usize = 64;

/// Bits of a reading's `marks`; the variant is `marks >> VARIANT_SHIFT`.
const LATE: u64 = 1;
const RESTART: u64 = 2;
const VARIANT_SHIFT: u32 = 2;

/// CBOR major types, and tag 4 (a decimal fraction `[exponent, mantissa]`).
const UINT: u8 = 0;
const NINT: u8 = 1;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const TAG: u8 = 6;
const SIMPLE: u8 = 7;
const DECIMAL: u64 = 4;
/// The initial byte of a float64.
const FLOAT64: u8 = 0xfb;

/// Why bytes are not a compact batch. `at` is a byte offset in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("compact batch ends inside an item at byte {0}")]
    Truncated(usize),
    #[error("compact batch: byte {at}: expected {expected}")]
    Unexpected { at: usize, expected: &'static str },
    #[error("compact batch has version {0}; this gateway reads version 1")]
    Version(u64),
    #[error("compact batch: byte {at}: `{field}` out of range")]
    OutOfRange { at: usize, field: &'static str },
    #[error("compact batch has {0} bytes after its end")]
    Trailing(usize),
}

/// What the readings of one series share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Series<'a> {
    device: &'a str,
    kind: &'a str,
    unit: &'a str,
    priority: &'a str,
    epoch: u32,
    run: u32,
    detail: Option<&'a str>,
}

/// The three quantities a reading sends as deltas from the one before it
/// (all 0 before the first): seq, device time (ms since 1970) and lag
/// (`received_at - device_time`, ms).
#[derive(Debug, Clone, Copy, Default)]
struct Running {
    seq: i128,
    time: i128,
    lag: i128,
}

/// The compact batch of `readings` from `gateway`: the same readings, in the
/// same order, as [`payload::batch`].
pub fn encode(gateway: &str, readings: &[Queued]) -> Vec<u8> {
    let mut series: Vec<Series<'_>> = Vec::new();
    let mut index: HashMap<Series<'_>, u64> = HashMap::new();
    let of: Vec<u64> = readings
        .iter()
        .map(|r| {
            let s = Series {
                device: &r.device,
                kind: &r.kind,
                unit: &r.unit,
                priority: r.priority.as_str(),
                epoch: r.epoch,
                run: r.run,
                detail: r.detail.as_deref(),
            };
            *index.entry(s).or_insert_with(|| {
                series.push(s);
                series.len() as u64 - 1
            })
        })
        .collect();

    let mut w = Vec::with_capacity(64 + 32 * series.len() + 16 * readings.len());
    head(&mut w, ARRAY, 4);
    head(&mut w, UINT, VERSION);
    text(&mut w, gateway);
    head(&mut w, ARRAY, series.len() as u64);
    for s in &series {
        head(&mut w, ARRAY, if s.detail.is_some() { 7 } else { 6 });
        for t in [s.device, s.kind, s.unit, s.priority] {
            text(&mut w, t);
        }
        head(&mut w, UINT, s.epoch.into());
        head(&mut w, UINT, s.run.into());
        if let Some(d) = s.detail {
            text(&mut w, d);
        }
    }
    head(&mut w, ARRAY, readings.len() as u64);
    let mut last = Running::default();
    for (r, s) in readings.iter().zip(of) {
        let time = r.device_time.timestamp_millis();
        let now = Running {
            seq: r.seq.into(),
            time: time.into(),
            lag: i128::from(r.received_at.timestamp_millis()) - i128::from(time),
        };
        let marks = u64::from(r.variant) << VARIANT_SHIFT
            | if r.restart { RESTART } else { 0 }
            | if r.late { LATE } else { 0 };
        head(&mut w, ARRAY, if marks == 0 { 5 } else { 6 });
        head(&mut w, UINT, s);
        int(&mut w, now.seq - last.seq);
        int(&mut w, now.time - last.time);
        int(&mut w, now.lag - last.lag);
        number(&mut w, r.value);
        if marks != 0 {
            head(&mut w, UINT, marks);
        }
        last = now;
    }
    w
}

/// The batch in `bytes`, as [`payload::batch`] would have written it.
pub fn decode(bytes: &[u8]) -> Result<Batch, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    r.array(4..=4, "a batch: an array of 4 items")?;
    let version = r.uint()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let gateway = r.text("gateway")?.to_owned();
    let n = r.array(0..=MAX_READINGS, "`series`: an array of at most 1000")?;
    let mut series = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.array(6..=7, "a series: an array of 6 or 7 items")?;
        series.push(Series {
            device: r.text("device")?,
            kind: r.text("kind")?,
            unit: r.text("unit")?,
            priority: r.text("priority")?,
            epoch: r.u32("epoch")?,
            run: r.u32("run")?,
            detail: if len == 7 {
                Some(r.text("detail")?)
            } else {
                None
            },
        });
    }
    let n = r.array(0..=MAX_READINGS, "`readings`: an array of at most 1000")?;
    let mut readings = Vec::with_capacity(n);
    let mut now = Running::default();
    for _ in 0..n {
        let len = r.array(5..=6, "a reading: an array of 5 or 6 items")?;
        let at = r.at;
        let s = usize::try_from(r.uint()?)
            .ok()
            .and_then(|i| series.get(i))
            .ok_or(DecodeError::OutOfRange {
                at,
                field: "series",
            })?;
        // Each sum is checked before the next delta (at most 2^64) is added,
        // so none can overflow an i128.
        let at = r.at;
        now.seq += r.int()?;
        let seq =
            u32::try_from(now.seq).map_err(|_| DecodeError::OutOfRange { at, field: "seq" })?;
        let at = r.at;
        now.time += r.int()?;
        let device_time = time(now.time).ok_or(DecodeError::OutOfRange {
            at,
            field: "device_time",
        })?;
        let at = r.at;
        now.lag += r.int()?;
        let received_at = time(now.time + now.lag).ok_or(DecodeError::OutOfRange {
            at,
            field: "received_at",
        })?;
        let value = r.number()?;
        let at = r.at;
        let marks = if len == 6 { r.uint()? } else { 0 };
        let variant = u32::try_from(marks >> VARIANT_SHIFT)
            .map_err(|_| DecodeError::OutOfRange { at, field: "marks" })?;
        let key = payload::reading_key(seq, s.epoch, s.run, variant);
        readings.push(ReadingOut {
            id: format!("{gateway}/{}/{key}", s.device),
            device: s.device.to_owned(),
            seq,
            kind: s.kind.to_owned(),
            value,
            unit: s.unit.to_owned(),
            priority: s.priority.to_owned(),
            detail: s.detail.map(str::to_owned),
            device_time,
            received_at,
            epoch: s.epoch,
            run: s.run,
            restart: marks & RESTART != 0,
            late: marks & LATE != 0,
            conflict: variant > 0,
            variant,
        });
    }
    match bytes.len() - r.at {
        0 => Ok(Batch {
            schema: SCHEMA,
            gateway,
            readings,
        }),
        extra => Err(DecodeError::Trailing(extra)),
    }
}

fn time(ms: i128) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(ms).ok()?)
}

/// An item's head with the shortest argument (RFC 8949, 4.2.1).
fn head(w: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => w.push(m | n as u8),
        24..=0xff => w.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            w.push(m | 25);
            w.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            w.push(m | 26);
            w.extend((n as u32).to_be_bytes());
        }
        _ => {
            w.push(m | 27);
            w.extend(n.to_be_bytes());
        }
    }
}

/// Every int written lies within CBOR's range, -2^64 ..= 2^64 - 1.
fn int(w: &mut Vec<u8>, n: i128) {
    match u64::try_from(n) {
        Ok(n) => head(w, UINT, n),
        Err(_) => head(w, NINT, (-1 - n) as u64),
    }
}

fn text(w: &mut Vec<u8>, s: &str) {
    head(w, TEXT, s.len() as u64);
    w.extend(s.as_bytes());
}

/// An int for a whole value, else the shorter of a decimal fraction (the
/// digits of the value's JSON) and a float64. Each reads back as exactly
/// `v`: the decimal is checked to before it is chosen.
fn number(w: &mut Vec<u8>, v: f64) {
    const EXACT: f64 = (1u64 << 53) as f64;
    if v.fract() == 0.0 && v.abs() <= EXACT && !(v == 0.0 && v.is_sign_negative()) {
        int(w, v as i128);
    } else if let Some(d) = decimal_item(v) {
        w.extend(d);
    } else {
        w.push(FLOAT64);
        w.extend(v.to_bits().to_be_bytes());
    }
}

/// `v` as a decimal fraction, if that is shorter than a float64 and reads
/// back as `v` bit for bit.
fn decimal_item(v: f64) -> Option<Vec<u8>> {
    let (e, m) = decimal(v)?;
    let mut d = Vec::with_capacity(16);
    head(&mut d, TAG, DECIMAL);
    head(&mut d, ARRAY, 2);
    int(&mut d, e.into());
    int(&mut d, m.into());
    let exact = from_decimal(e.into(), m.into()).map(f64::to_bits) == Some(v.to_bits());
    (d.len() < 9 && exact).then_some(d)
}

/// `(e, m)` with `v = m * 10^e`, from the shortest decimal that reads back
/// as `v` (Rust's `{:e}`, the digits serde_json writes).
fn decimal(v: f64) -> Option<(i64, i64)> {
    let s = format!("{v:e}");
    let (digits, exp) = s.split_once('e')?;
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let m: i64 = format!("{int}{frac}").parse().ok()?;
    Some((exp.parse::<i64>().ok()? - frac.len() as i64, m))
}

/// `m * 10^e` rounded to the nearest double, as a correct decimal parser
/// (Rust's, Python's `float(Decimal)`) does; `None` if not finite.
fn from_decimal(e: i128, m: i128) -> Option<f64> {
    let v: f64 = format!("{m}e{e}").parse().ok()?;
    v.is_finite().then_some(v)
}

/// IEEE 754 binary16 to a double (exact).
fn from_f16(h: u16) -> f64 {
    let sign = if h & 0x8000 == 0 { 1.0 } else { -1.0 };
    let mant = f64::from(h & 0x3ff);
    sign * match (h >> 10) & 0x1f {
        0 => mant * 2f64.powi(-24),
        0x1f if mant == 0.0 => f64::INFINITY,
        0x1f => f64::NAN,
        e => (mant + 1024.0) * 2f64.powi(i32::from(e) - 25),
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked, and a
/// length is trusted only as far as the bytes that follow it.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(DecodeError::Truncated(self.at))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    /// Major type, additional information and argument of the next item;
    /// indefinite lengths and reserved values are refused.
    fn head(&mut self) -> Result<(u8, u8, u64), DecodeError> {
        let at = self.at;
        let first = self.take(1)?[0];
        let (major, info) = (first >> 5, first & 0x1f);
        let n = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let b = self.take(1 << (info - 24))?;
                b.iter().fold(0, |n, &b| n << 8 | u64::from(b))
            }
            _ => {
                return Err(DecodeError::Unexpected {
                    at,
                    expected: "a definite-length item",
                });
            }
        };
        Ok((major, info, n))
    }

    fn expect(&mut self, major: u8, expected: &'static str) -> Result<u64, DecodeError> {
        let at = self.at;
        match self.head()? {
            (m, _, n) if m == major => Ok(n),
            _ => Err(DecodeError::Unexpected { at, expected }),
        }
    }

    fn array(
        &mut self,
        len: std::ops::RangeInclusive<usize>,
        expected: &'static str,
    ) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = self.expect(ARRAY, expected)?;
        let n = usize::try_from(n)
            .ok()
            .filter(|n| len.contains(n))
            .ok_or(DecodeError::Unexpected { at, expected })?;
        // Every item takes at least a byte.
        match n <= self.bytes.len() - self.at {
            true => Ok(n),
            false => Err(DecodeError::Truncated(at)),
        }
    }

    fn uint(&mut self) -> Result<u64, DecodeError> {
        self.expect(UINT, "an unsigned integer")
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let at = self.at;
        u32::try_from(self.uint()?).map_err(|_| DecodeError::OutOfRange { at, field })
    }

    fn int(&mut self) -> Result<i128, DecodeError> {
        let at = self.at;
        match self.head()? {
            (UINT, _, n) => Ok(n.into()),
            (NINT, _, n) => Ok(-1 - i128::from(n)),
            _ => Err(DecodeError::Unexpected {
                at,
                expected: "an integer",
            }),
        }
    }

    fn text(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let at = self.at;
        let len = self.expect(TEXT, "a text string")?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= MAX_TEXT)
            .ok_or(DecodeError::OutOfRange { at, field })?;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::Unexpected {
            at,
            expected: "UTF-8 text",
        })
    }

    /// An int, a float of any width or a decimal fraction; finite.
    fn number(&mut self) -> Result<f64, DecodeError> {
        let at = self.at;
        let v = match self.head()? {
            (UINT, _, n) => n as f64,
            (NINT, _, n) => -1.0 - n as f64,
            (TAG, _, DECIMAL) => {
                self.array(2..=2, "a decimal fraction: [exponent, mantissa]")?;
                let (e, m) = (self.int()?, self.int()?);
                from_decimal(e, m).unwrap_or(f64::NAN)
            }
            (SIMPLE, 25, n) => from_f16(n as u16),
            (SIMPLE, 26, n) => f32::from_bits(n as u32).into(),
            (SIMPLE, 27, n) => f64::from_bits(n),
            _ => {
                return Err(DecodeError::Unexpected {
                    at,
                    expected: "a number",
                });
            }
        };
        match v.is_finite() {
            true => Ok(v),
            false => Err(DecodeError::OutOfRange { at, field: "value" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Kind, Priority};
    use crate::simulator::patient::Patient;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    /// 2025-03-01T08:30:00.000Z, the story of docs/mqtt-payloads.md 2.3.
    const T0: i64 = 1_740_817_800_000;

    fn reading(seq: u32, kind: Kind, value: f64, time: i64, lag: i64) -> Queued {
        Queued {
            id: seq.into(),
            device: "ICD-0042".into(),
            seq,
            kind: kind.as_str().into(),
            value,
            unit: kind.unit().into(),
            priority: Priority::Routine,
            detail: None,
            device_time: at(time),
            received_at: at(time + lag),
            epoch: 0,
            run: 0,
            variant: 0,
            late: false,
            restart: false,
        }
    }

    /// The invariant: the decoded batch is the JSON batch, byte for byte.
    fn assert_round_trip(gateway: &str, readings: &[Queued]) {
        let bytes = encode(gateway, readings);
        let back = decode(&bytes).unwrap_or_else(|e| panic!("{e}: {bytes:02x?}"));
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&back).unwrap()).unwrap(),
            String::from_utf8(payload::batch(gateway, readings)).unwrap()
        );
        for (b, q) in back.readings.iter().zip(readings) {
            assert_eq!(b.value.to_bits(), q.value.to_bits(), "{}", q.value);
        }
    }

    /// The three routine readings of docs/mqtt-payloads.md 2.3 (seq 1, 2, 5):
    /// the worked example of docs/compact-encoding.md, pinned.
    fn story() -> Vec<Queued> {
        vec![
            reading(1, Kind::HeartRate, 72.0, T0, 412),
            reading(2, Kind::BatteryVoltage, 2.95, T0 + 5_250, 413),
            reading(5, Kind::LeadImpedance, 540.0, T0 + 180_000, 391),
        ]
    }

    #[test]
    fn compact_bytes_are_stable() {
        let series = |kind: &[u8], unit: &[u8]| {
            let kind = [&[0x60 + kind.len() as u8][..], kind];
            let unit = [&[0x60 + unit.len() as u8][..], unit];
            [
                b"\x86\x68ICD-0042",
                &kind.concat()[..],
                &unit.concat(),
                b"\x67routine\0\0",
            ]
            .concat()
        };
        let expected = [
            &b"\x84\x01\x67gw-0001\x83"[..],
            &series(b"heart_rate", b"bpm"),
            &series(b"battery_voltage", b"V"),
            &series(b"lead_impedance", b"ohm"),
            &[0x83],
            &[
                0x85, 0x00, 0x01, 0x1b, 0, 0, 0x01, 0x95, 0x50, 0xd3, 0x9b, 0x40,
            ],
            &[0x19, 0x01, 0x9c, 0x18, 0x48],
            &[
                0x85, 0x01, 0x01, 0x19, 0x14, 0x82, 0x01, 0xc4, 0x82, 0x21, 0x19, 0x01, 0x27,
            ],
            &[
                0x85, 0x02, 0x03, 0x1a, 0x00, 0x02, 0xaa, 0x9e, 0x35, 0x19, 0x02, 0x1c,
            ],
        ]
        .concat();
        assert_eq!(encode("gw-0001", &story()), expected);
        assert_eq!(expected.len(), 166);
        assert_round_trip("gw-0001", &story());
    }

    #[test]
    fn decoded_batch_is_the_json_batch() {
        let t = T0;
        let mut all = story();
        // Alerts with detail (and an empty one), epochs, runs, conflicts, late
        // and restart flags, two devices interleaved, times out of order, a
        // receive time before the device time, odd values.
        let mut episode = reading(9, Kind::Episode, 482.0, t - 60_000, 5);
        episode.priority = Priority::Alert;
        episode.detail = Some("AF".into());
        let mut empty = episode.clone();
        empty.detail = Some(String::new());
        let mut other = reading(3, Kind::HeartRate, 61.5, t + 1, -2_000);
        other.device = "PM-1".into();
        other.epoch = 7;
        other.late = true;
        let mut conflict = reading(3, Kind::AfBurden, 3.2, t + 2, 0);
        conflict.device = "PM-1".into();
        conflict.epoch = 7;
        conflict.variant = u32::MAX;
        let mut restart = reading(0, Kind::PacingPercent, 12.5, 0, 0);
        restart.run = 4;
        restart.restart = true;
        let mut odd = reading(u32::MAX, Kind::BatteryVoltage, -0.0, -62_135_596_800_000, 1);
        odd.received_at = at(253_402_300_799_999);
        all.extend([episode, empty, other, conflict, restart, odd]);
        for v in [
            1e-7,
            -0.5,
            1e300,
            5e-324,
            f64::MAX,
            0.1 + 0.2,
            2.947,
            1e20,
            9e15,
        ] {
            all.push(reading(10, Kind::BatteryVoltage, v, t, 400));
        }
        assert_round_trip("gw-0001", &all);
        assert_round_trip("gw.a_b-c", &[]);
        for i in 0..all.len() {
            assert_round_trip("g", &all[i..=i]);
        }
        // 20 devices taking turns, each with its own seqs and clock.
        let many: Vec<Queued> = (0..60u32)
            .map(|i| {
                let d = i64::from(i % 20);
                let mut q = reading(
                    i / 20 + 1000 * (i % 20),
                    Kind::HeartRate,
                    70.0,
                    t + d * 1_000_003,
                    400,
                );
                q.device = format!("PM-{d}");
                q
            })
            .collect();
        assert_round_trip("gw-0001", &many);
    }

    fn mqtt5_publish_len(topic: &str, payload: Vec<u8>) -> usize {
        let properties = PublishProperties {
            content_type: Some(CONTENT_TYPE.into()),
            user_properties: vec![("schema".into(), "1".into())],
            ..PublishProperties::default()
        };
        let mut p = Publish::new(topic, QoS::ExactlyOnce, payload, Some(properties));
        p.pkid = 1;
        let mut packet = BytesMut::new();
        p.write(&mut packet).unwrap()
    }

    /// 50 routine readings 5 s apart from one device, as the simulator's
    /// patient makes them (half heart rate, the rest pacing, AF burden,
    /// impedance and battery, with their decimals), received 350-450 ms
    /// later; and the same with heart rate only but every tenth reading a
    /// battery voltage or an impedance. Counted: the whole MQTT 5 PUBLISH as
    /// rumqttc's codec writes it; not the PUBREC/PUBREL/PUBCOMP (4 bytes
    /// each per message), nor TCP and TLS framing.
    #[test]
    fn a_batch_of_50_costs_at_most_40_bytes_a_reading_on_the_wire() {
        let topic = "hearth/v1/gw-0001/readings";
        let mut rng = fastrand::Rng::with_seed(9);
        let mut patient = Patient::new(42, 0.0);
        let mut simulated = Vec::new();
        let mut mostly_heart = Vec::new();
        for seq in 1..=50u32 {
            let time = T0 + 5_000 * i64::from(seq);
            let lag = rng.i64(350..450);
            let r = patient.next_reading("ICD-0042", seq, at(time));
            simulated.push(reading(seq, r.kind, r.value, time, lag));
            let (kind, value) = match seq % 10 {
                0 => (Kind::BatteryVoltage, 2.947),
                5 => (Kind::LeadImpedance, 540.0),
                _ => (Kind::HeartRate, f64::from(rng.u8(60..90))),
            };
            mostly_heart.push(reading(seq, kind, value, time, lag));
        }
        for (readings, at_most) in [(simulated, 820), (mostly_heart, 720)] {
            assert_round_trip("gw-0001", &readings);
            let body = encode("gw-0001", &readings);
            let (len, json) = (body.len(), payload::batch("gw-0001", &readings));
            let packet = mqtt5_publish_len(topic, body);
            // Fixed header 3, topic 2 + 26, packet id 2, properties 1 + 47:
            // content type 1 + 2 + 32, user property 1 + 2 + 6 + 2 + 1.
            assert_eq!(packet - len, 3 + 28 + 2 + 48);
            println!(
                "50 readings: {packet} bytes ({len} payload), JSON {}",
                mqtt5_publish_len(topic, json)
            );
            assert!(packet <= 40 * 50, "{packet} bytes for 50 readings");
            // The figures docs/compact-encoding.md gives.
            assert!(packet <= at_most, "{packet} bytes for 50 readings");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode("gw-0001", &story());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn lengths_beyond_the_input_or_the_bounds_are_refused() {
        let cases: [(&[u8], DecodeError); 6] = [
            // A series array claiming 2^64 - 1 items.
            (
                &[
                    0x84, 0x01, 0x60, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
                DecodeError::Unexpected {
                    at: 3,
                    expected: "`series`: an array of at most 1000",
                },
            ),
            // A gateway of 2^32 bytes in a 7-byte batch.
            (
                &[0x84, 0x01, 0x7a, 0xff, 0xff, 0xff, 0xff],
                DecodeError::OutOfRange {
                    at: 2,
                    field: "gateway",
                },
            ),
            // A gateway of 10 bytes, 1 there.
            (
                &[0x84, 0x01, 0x6a, 0x41, 0x80, 0x80],
                DecodeError::Truncated(3),
            ),
            (&[0x84, 0x02, 0x60, 0x80, 0x80], DecodeError::Version(2)),
            // An indefinite-length array.
            (
                &[0x9f],
                DecodeError::Unexpected {
                    at: 0,
                    expected: "a definite-length item",
                },
            ),
            // A reading of series 0 when there is none.
            (
                &[0x84, 0x01, 0x60, 0x80, 0x81, 0x85, 0x00, 0, 0, 0, 0],
                DecodeError::OutOfRange {
                    at: 6,
                    field: "series",
                },
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(decode(bytes), Err(error), "{bytes:02x?}");
        }
    }

    #[test]
    fn out_of_range_sums_and_values_are_refused() {
        let series = [
            0x84, 0x01, 0x60, 0x81, 0x86, 0x61, 0x44, 0x61, 0x6b, 0x61, 0x75, 0x61, 0x70, 0, 0,
        ];
        let with = |reading: &[u8]| [&series[..], &[0x81], reading].concat();
        let cases: [(&[u8], &str); 7] = [
            (&[0x85, 0, 0x20, 0, 0, 0], "seq"),
            (&[0x85, 0, 0x1b, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], "seq"),
            (
                &[0x85, 0, 0, 0x3b, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "device_time",
            ),
            (
                &[0x85, 0, 0, 0, 0x1b, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0],
                "received_at",
            ),
            (&[0x85, 0, 0, 0, 0, 0xf9, 0x7c, 0x00], "value"),
            (
                &[
                    0x85, 0, 0, 0, 0, 0xc4, 0x82, 0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                    0xff, 0x01,
                ],
                "value",
            ),
            (
                &[0x86, 0, 0, 0, 0, 0, 0x1b, 0, 0, 0, 4, 0, 0, 0, 0],
                "marks",
            ),
        ];
        for (reading, field) in cases {
            match decode(&with(reading)) {
                Err(DecodeError::OutOfRange { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{reading:02x?}: {other:?}"),
            }
        }
        // Any width of float, and a decimal fraction, are numbers.
        for (value, expected) in [
            (&[0xf9, 0x3c, 0x00][..], 1.0),
            (&[0xf9, 0x00, 0x01], 5.960464477539063e-8),
            (&[0xfa, 0x3f, 0xc0, 0x00, 0x00], 1.5),
            (&[0xc4, 0x82, 0x21, 0x19, 0x01, 0x27], 2.95),
            (&[0x38, 0x63], -100.0),
            // 1 * 10^-(2^64): as near to 0 as a double gets.
            (
                &[
                    0xc4, 0x82, 0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                0.0,
            ),
        ] {
            let bytes = with(&[&[0x85, 0, 0, 0, 0][..], value].concat());
            assert_eq!(decode(&bytes).unwrap().readings[0].value, expected);
        }
    }

    fn any_reading() -> impl Strategy<Value = Queued> {
        let kind = proptest::sample::select(Kind::ALL.to_vec());
        let value = prop_oneof![
            (0u32..300).prop_map(f64::from),
            (0u32..100_000).prop_map(|n| f64::from(n) / 1000.0),
            any::<f64>().prop_filter("finite", |v| v.is_finite()),
        ];
        // Years 0 to 9999, as the serial decoder admits.
        let time = -62_167_219_200_000i64..253_402_300_800_000;
        (
            (
                kind,
                value,
                "[A-Za-z0-9._-]{1,32}",
                any::<bool>(),
                time.clone(),
                time,
            ),
            (
                0u32..3,
                0u32..3,
                prop_oneof![Just(0), any::<u32>()],
                any::<u32>(),
            ),
            (any::<bool>(), any::<bool>(), prop::option::of("|AF|VT|VF")),
        )
            .prop_map(
                |(
                    (kind, value, device, alert, t, r),
                    (epoch, run, variant, seq),
                    (late, restart, detail),
                )| {
                    let mut q = reading(seq, kind, value, t, 0);
                    q.device = device;
                    q.priority = if alert {
                        Priority::Alert
                    } else {
                        Priority::Routine
                    };
                    q.received_at = at(r);
                    (q.epoch, q.run, q.variant, q.late, q.restart, q.detail) =
                        (epoch, run, variant, late, restart, detail);
                    q
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn decoded_batch_is_the_json_batch_for_any_readings(
            readings in prop::collection::vec(any_reading(), 0..40),
        ) {
            assert_round_trip("gw-0001", &readings);
        }

        #[test]
        fn decode_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_a_damaged_batch(
            readings in prop::collection::vec(any_reading(), 1..8),
            damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode("gw-0001", &readings);
            for (i, b) in damage {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let _ = decode(&bytes);
        }
    }
}
