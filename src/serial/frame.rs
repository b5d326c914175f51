//! Serial protocol v1: a pure, synchronous codec for the text frames that a
//! bedside device and the gateway exchange. The spec for device makers is
//! `docs/serial-protocol.md`; this module is its reference implementation.
//!
//! # Format
//!
//! One frame per line, ASCII: `$` BODY `*` CRC `\r\n`. BODY is comma-separated
//! fields, the first naming the frame type (`R` reading, `A` ack, `N` nak,
//! `B` busy). CRC is [`crc16`] (CRC-16/CCITT-FALSE) over the bytes strictly
//! between `$` and `*`, as four uppercase hex digits. A frame is at most
//! [`MAX_FRAME_LEN`] bytes from `$` through `\n`.
//!
//! ```text
//! $R,ICD-0042,1,2025-03-01T08:30:00.000Z,heart_rate,72,bpm,routine*097D\r\n
//! $A,ICD-0042,1*50F1\r\n
//! ```
//!
//! The decoder is lenient where it costs nothing (lowercase hex, a bare `\n`,
//! any RFC 3339 offset) and strict about content: a frame is either every field
//! valid or rejected whole. The encoder does not validate; a [`Frame`] built
//! from invalid fields encodes to bytes that decode as [`Decoded::Rejected`].
//!
//! # Decoder guarantees
//!
//! - It never panics, whatever bytes it is fed.
//! - Memory is bounded: once [`Decoder::next`] has returned `None` the decoder
//!   holds fewer than `MAX_FRAME_LEN` bytes, so a caller that feeds reads of at
//!   most `MAX_FRAME_LEN` bytes and drains after each never buffers more than
//!   `2 × MAX_FRAME_LEN`.
//! - It resyncs: a `$` always starts a new frame, so one damaged frame never
//!   costs the next.
//! - Every rejected byte run is reported once, as a [`Rejected`] holding the run
//!   (its first `MAX_FRAME_LEN` bytes) and why. Only whitespace between frames
//!   is dropped silently.
//! - The output depends only on the byte stream, not on how it was split into
//!   [`Decoder::extend`] calls.
//! - A [`RejectReason`]'s message never contains a device id or a value
//!   (patient data); [`Rejected::raw`] does, so log it at DEBUG only.
//!
//! [`Rejected::nak`] gives the NAK the spec prescribes for each rejection, so
//! the reader does not restate the policy.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Utc};

use crate::reading::{Kind, Priority, Reading, unknown};

/// Longest frame the decoder accepts, from `$` through `\n` inclusive.
pub const MAX_FRAME_LEN: usize = 256;

/// Longest device id, in bytes.
const MAX_DEVICE_ID_LEN: usize = 32;
/// Longest NAK reason token, in bytes.
const MAX_REASON_LEN: usize = 32;
/// Values whose `{}` form is longer than this are sent in exponent form, so
/// that `1e300` cannot push a reading past `MAX_FRAME_LEN`.
const MAX_PLAIN_VALUE_LEN: usize = 24;
const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";
const EPISODE_DETAILS: [&str; 3] = ["AF", "VT", "VF"];

/// A decoded frame, in either direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Device to gateway.
    Reading(Reading),
    /// Gateway to device: the reading is committed (or was already stored).
    Ack {
        device_id: String,
        epoch: Option<u32>,
        seq: u32,
    },
    /// Gateway to device: rejected, resend. `reason` is a code token `[a-z-]`.
    Nak {
        device_id: Option<String>,
        epoch: Option<u32>,
        seq: Option<u32>,
        reason: String,
    },
    /// Gateway to device: the store is full; keep the reading, resend later.
    Busy {
        device_id: String,
        epoch: Option<u32>,
        seq: u32,
    },
}

impl Frame {
    /// The frame's wire bytes, `$` through `\r\n`.
    pub fn encode(&self) -> Vec<u8> {
        let body = match self {
            Frame::Reading(r) => {
                let mut body = format!(
                    "R,{},{},{},{},{},{},{}",
                    r.device_id,
                    SeqField(r.epoch, r.seq),
                    r.device_time.format(TIME_FORMAT),
                    r.kind,
                    format_value(r.value),
                    r.kind.unit(),
                    r.priority
                );
                if let Some(detail) = &r.detail {
                    body.push(',');
                    body.push_str(detail);
                }
                body
            }
            Frame::Ack {
                device_id,
                epoch,
                seq,
            } => format!("A,{device_id},{}", SeqField(*epoch, *seq)),
            Frame::Busy {
                device_id,
                epoch,
                seq,
            } => format!("B,{device_id},{}", SeqField(*epoch, *seq)),
            Frame::Nak {
                device_id,
                epoch,
                seq,
                reason,
            } => format!(
                "N,{},{},{reason}",
                device_id.as_deref().unwrap_or(""),
                seq.map(|s| SeqField(*epoch, s).to_string())
                    .unwrap_or_default()
            ),
        };
        format!("${body}*{:04X}\r\n", crc16(body.as_bytes())).into_bytes()
    }
}

/// Shortest round-trip form: plain (`72`, `2.95`) unless that would be long.
fn format_value(value: f64) -> String {
    let plain = format!("{value}");
    if plain.len() > MAX_PLAIN_VALUE_LEN {
        format!("{value:e}")
    } else {
        plain
    }
}

/// One result of [`Decoder::next`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Frame(Frame),
    Rejected(Rejected),
}

/// A byte run the decoder could not turn into a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The run as received, at most `MAX_FRAME_LEN` bytes. Holds patient data.
    pub raw: Vec<u8>,
    pub reason: RejectReason,
}

impl Rejected {
    /// The NAK the gateway answers this run with, as the spec prescribes:
    /// garbage too (it may be what is left of a damaged frame), with the device id and seq
    /// only when the checksum held and those two fields are valid, since
    /// otherwise they cannot be trusted.
    pub fn nak(&self) -> Frame {
        let (device_id, (epoch, seq)) = match self.reason {
            RejectReason::InvalidField { .. } => self.ids(),
            _ => (None, (None, None)),
        };
        Frame::Nak {
            device_id,
            epoch,
            seq,
            reason: self.reason.code().to_owned(),
        }
    }

    /// Device id and `(epoch, seq)` (fields 2 and 3 of every frame type)
    /// where valid.
    fn ids(&self) -> (Option<String>, (Option<u32>, Option<u32>)) {
        let body = self.raw.get(1..).unwrap_or_default();
        let body = body.split(|&b| b == b'*').next().unwrap_or_default();
        let mut fields = body.split(|&b| b == b',').skip(1).map(std::str::from_utf8);
        let mut next = || fields.next().and_then(Result::ok);
        let device_id = next().and_then(|id| parse_device_id(id).ok());
        let seq = next().and_then(|seq| parse_seq_field(seq).ok());
        (device_id, seq.map_or((None, None), |(e, s)| (e, Some(s))))
    }
}

/// Why a byte run was rejected. Messages never quote device ids or values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RejectReason {
    /// Bytes outside any frame, other than whitespace.
    #[error("garbage outside a frame")]
    Garbage,
    /// No `\n` within `MAX_FRAME_LEN` bytes of the `$`.
    #[error("oversized frame: no line end within {} bytes", MAX_FRAME_LEN)]
    Oversized,
    /// A new `$` arrived before the frame's `\n`.
    #[error("truncated frame: a new `$` arrived before the line end")]
    Truncated,
    /// `expected` is computed over the body; `found` is what the frame carries.
    #[error("bad checksum: frame carries {found:04X}, body computes {expected:04X}")]
    BadChecksum { expected: u16, found: u16 },
    /// The frame's shape is wrong: field count, missing `*`, bad hex, unknown type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The shape is right but one field's content is not.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

impl RejectReason {
    /// Short token for logs, metrics and the NAK `reason` field.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Garbage => "garbage",
            RejectReason::Oversized => "oversized",
            RejectReason::Truncated => "truncated",
            RejectReason::BadChecksum { .. } => "checksum",
            RejectReason::Malformed(_) => "malformed",
            RejectReason::InvalidField { .. } => "invalid",
        }
    }
}

/// Incremental decoder: feed bytes with [`extend`](Self::extend), then call
/// [`next`](Self::next) until it returns `None`.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Received bytes not yet consumed are `buf[pos..]`; consuming only moves
    /// `pos`, so draining a large chunk is linear, not quadratic.
    buf: Vec<u8>,
    pos: usize,
    /// Dropping the tail of an oversized run (already reported) up to the next
    /// `\n` or `$`.
    skipping: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet consumed: fewer than `MAX_FRAME_LEN` once
    /// [`next`](Self::next) has returned `None`. For the fuzzer's check of
    /// the memory bound (`tests/fuzz`).
    #[doc(hidden)]
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next frame or rejected run, or `None` when more bytes are needed.
    #[allow(
        clippy::should_implement_trait,
        reason = "`None` means \"not yet\", not \"finished\", so this is no `Iterator`"
    )]
    pub fn next(&mut self) -> Option<Decoded> {
        loop {
            let pending = &self.buf[self.pos..];
            if self.skipping {
                let Some(i) = pending.iter().position(|&b| b == b'\n' || b == b'$') else {
                    self.pos = self.buf.len();
                    self.compact();
                    return None;
                };
                self.skipping = false;
                self.pos += if pending[i] == b'\n' { i + 1 } else { i };
                continue;
            }

            let spaces = pending.iter().take_while(|&&b| is_space(b)).count();
            let pending = &pending[spaces..];
            self.pos += spaces;
            let window = &pending[..pending.len().min(MAX_FRAME_LEN)];
            let full = window.len() == MAX_FRAME_LEN;

            let (decoded, consumed) = match window.first() {
                None => break,
                Some(b'$') => match window[1..].iter().position(|&b| b == b'\n' || b == b'$') {
                    Some(i) if window[i + 1] == b'\n' => (decode_frame(&window[..i + 2]), i + 2),
                    Some(i) => (reject(&window[..=i], RejectReason::Truncated), i + 1),
                    None if full => {
                        self.skipping = true;
                        (reject(window, RejectReason::Oversized), MAX_FRAME_LEN)
                    }
                    None => break,
                },
                Some(_) => match window.iter().position(|&b| b == b'$') {
                    Some(i) => {
                        let run = &window[..i];
                        let kept =
                            run.len() - run.iter().rev().take_while(|&&b| is_space(b)).count();
                        (reject(&run[..kept], RejectReason::Garbage), i)
                    }
                    None if full => (reject(window, RejectReason::Garbage), MAX_FRAME_LEN),
                    None => break,
                },
            };
            self.pos += consumed;
            return Some(decoded);
        }
        self.compact();
        None
    }

    /// Drops consumed bytes, and gives back memory a large chunk left behind.
    fn compact(&mut self) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        if self.buf.capacity() > 4 * MAX_FRAME_LEN && self.buf.len() < MAX_FRAME_LEN {
            self.buf.shrink_to(2 * MAX_FRAME_LEN);
        }
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | b' ')
}

fn reject(raw: &[u8], reason: RejectReason) -> Decoded {
    Decoded::Rejected(Rejected {
        raw: raw.to_vec(),
        reason,
    })
}

/// Decodes one complete line, `$` through `\n`.
fn decode_frame(raw: &[u8]) -> Decoded {
    match parse_frame(raw) {
        Ok(frame) => Decoded::Frame(frame),
        Err(reason) => reject(raw, reason),
    }
}

fn parse_frame(raw: &[u8]) -> Result<Frame, RejectReason> {
    let line = raw.strip_prefix(b"$").unwrap_or(raw);
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let star = line
        .iter()
        .rposition(|&b| b == b'*')
        .ok_or_else(|| malformed("missing `*` before the checksum".into()))?;
    let (body, crc_text) = (&line[..star], &line[star + 1..]);
    let found = parse_crc(crc_text).ok_or_else(|| {
        malformed(format!(
            "checksum `{}` is not 4 hex digits",
            crc_text.escape_ascii()
        ))
    })?;
    let expected = crc16(body);
    if found != expected {
        return Err(RejectReason::BadChecksum { expected, found });
    }
    let body = std::str::from_utf8(body)
        .ok()
        .filter(|body| body.is_ascii())
        .ok_or_else(|| malformed("body is not ASCII".into()))?;

    let fields: Vec<&str> = body.split(',').collect();
    let count = |expected: &str| {
        malformed(format!(
            "`{}` frame has {} fields, expected {expected}",
            fields[0],
            fields.len()
        ))
    };
    match fields[0] {
        "R" => match fields[1..] {
            [id, seq, time, kind, value, unit, priority] => {
                parse_reading(id, seq, time, kind, value, unit, priority, None)
            }
            [id, seq, time, kind, value, unit, priority, detail] => {
                parse_reading(id, seq, time, kind, value, unit, priority, Some(detail))
            }
            _ => Err(count("8 or 9")),
        },
        "A" | "B" => {
            let [_, id, seq] = fields[..] else {
                return Err(count("3"));
            };
            let (device_id, (epoch, seq)) = (parse_device_id(id)?, parse_seq_field(seq)?);
            Ok(if fields[0] == "A" {
                Frame::Ack {
                    device_id,
                    epoch,
                    seq,
                }
            } else {
                Frame::Busy {
                    device_id,
                    epoch,
                    seq,
                }
            })
        }
        "N" => {
            let [_, id, seq, reason] = fields[..] else {
                return Err(count("4"));
            };
            let device_id = (!id.is_empty()).then(|| parse_device_id(id)).transpose()?;
            let seq = (!seq.is_empty())
                .then(|| parse_seq_field(seq))
                .transpose()?;
            Ok(Frame::Nak {
                device_id,
                epoch: seq.and_then(|(e, _)| e),
                seq: seq.map(|(_, s)| s),
                reason: parse_reason(reason)?,
            })
        }
        other => Err(malformed(format!(
            "unknown frame type `{}` (expected one of R, A, N, B)",
            other.escape_default()
        ))),
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one argument per wire field, in wire order"
)]
fn parse_reading(
    device_id: &str,
    seq: &str,
    device_time: &str,
    kind: &str,
    value: &str,
    unit: &str,
    priority: &str,
    detail: Option<&str>,
) -> Result<Frame, RejectReason> {
    let device_id = parse_device_id(device_id)?;
    let (epoch, seq) = parse_seq_field(seq)?;
    let device_time = DateTime::parse_from_rfc3339(device_time)
        .map_err(|e| invalid("device_time", format!("not an RFC 3339 timestamp ({e})")))?
        .with_timezone(&Utc);
    // An offset can carry 0000-01-01 or 9999-12-31 out of RFC 3339's
    // four-digit years, where neither this encoder nor the MQTT payload
    // (`+10000-01-01T...`) could write it as RFC 3339 again.
    if !(0..=9999).contains(&device_time.year()) {
        return Err(invalid(
            "device_time",
            "is outside the years 0000 to 9999 once converted to UTC".into(),
        ));
    }
    let kind = Kind::from_str(kind).map_err(|e| invalid("kind", e))?;
    let value = match value.parse::<f64>() {
        Ok(v) if v.is_finite() => v,
        Ok(_) => return Err(invalid("value", "not finite".into())),
        Err(_) => return Err(invalid("value", "not a decimal number".into())),
    };
    if unit != kind.unit() {
        return Err(invalid(
            "unit",
            format!(
                "unit `{}` does not match kind `{kind}` (expected `{}`)",
                unit.escape_default(),
                kind.unit()
            ),
        ));
    }
    let priority = Priority::from_str(priority).map_err(|e| invalid("priority", e))?;
    if matches!(kind, Kind::Episode | Kind::ShockDelivered) && priority != Priority::Alert {
        return Err(invalid(
            "priority",
            format!("kind `{kind}` must have priority `alert`"),
        ));
    }
    let detail = match (kind, detail) {
        (Kind::Episode, Some(d)) if EPISODE_DETAILS.contains(&d) => Some(d.to_owned()),
        (Kind::Episode, Some(d)) => {
            return Err(invalid(
                "detail",
                unknown("episode type", d, EPISODE_DETAILS),
            ));
        }
        (Kind::Episode, None) => {
            return Err(invalid(
                "detail",
                "kind `episode` requires one of AF, VT, VF".into(),
            ));
        }
        (_, Some(_)) => return Err(invalid("detail", format!("kind `{kind}` takes no detail"))),
        (_, None) => None,
    };
    Ok(Frame::Reading(Reading {
        device_id,
        epoch,
        seq,
        device_time,
        kind,
        value,
        priority,
        detail,
    }))
}

fn parse_device_id(s: &str) -> Result<String, RejectReason> {
    if s.is_empty() || s.len() > MAX_DEVICE_ID_LEN {
        return Err(invalid(
            "device_id",
            format!(
                "must be 1 to {MAX_DEVICE_ID_LEN} characters, got {}",
                s.len()
            ),
        ));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "device_id",
            "has a character outside [A-Za-z0-9._-]".into(),
        ));
    }
    Ok(s.to_owned())
}

/// The seq field: `SEQ` (v1) or `EPOCH:SEQ` (v1.1), each a decimal u32.
fn parse_seq_field(s: &str) -> Result<(Option<u32>, u32), RejectReason> {
    match s.split_once(':') {
        None => Ok((None, parse_seq(s)?)),
        Some((epoch, seq)) => {
            let epoch = parse_number(epoch).ok_or_else(|| {
                invalid(
                    "seq",
                    format!(
                        "epoch before `:` is not a decimal number from 0 to {}",
                        u32::MAX
                    ),
                )
            })?;
            Ok((Some(epoch), parse_seq(seq)?))
        }
    }
}

/// A decimal u32 of digits only (`u32::from_str` alone would take a `+`).
fn parse_number(s: &str) -> Option<u32> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())
        .flatten()
}

/// Writes the seq field: `SEQ`, or `EPOCH:SEQ` when an epoch is given.
struct SeqField(Option<u32>, u32);

impl fmt::Display for SeqField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(epoch) => write!(f, "{epoch}:{}", self.1),
            None => write!(f, "{}", self.1),
        }
    }
}

fn parse_seq(s: &str) -> Result<u32, RejectReason> {
    parse_number(s).ok_or_else(|| {
        invalid(
            "seq",
            format!("not a decimal number from 0 to {}", u32::MAX),
        )
    })
}

fn parse_reason(s: &str) -> Result<String, RejectReason> {
    if s.is_empty()
        || s.len() > MAX_REASON_LEN
        || !s.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        return Err(invalid(
            "reason",
            format!(
                "`{}` is not a code token of 1 to {MAX_REASON_LEN} characters [a-z-]",
                s.escape_default()
            ),
        ));
    }
    Ok(s.to_owned())
}

fn parse_crc(text: &[u8]) -> Option<u16> {
    if text.len() != 4 || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(text).ok()?, 16).ok()
}

fn malformed(reason: String) -> RejectReason {
    RejectReason::Malformed(reason)
}

fn invalid(field: &'static str, reason: String) -> RejectReason {
    RejectReason::InvalidField { field, reason }
}

/// CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, xorout 0.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn reading(seq: u32, at: &str, kind: Kind, value: f64, priority: Priority) -> Reading {
        Reading {
            device_id: "ICD-0042".into(),
            epoch: None,
            seq,
            device_time: time(at),
            kind,
            value,
            priority,
            detail: (kind == Kind::Episode).then(|| "AF".to_owned()),
        }
    }

    fn ack(seq: u32) -> Frame {
        Frame::Ack {
            device_id: "ICD-0042".into(),
            epoch: None,
            seq,
        }
    }

    /// Wraps a hand-written body with a correct checksum.
    fn framed(body: &str) -> Vec<u8> {
        format!("${body}*{:04X}\r\n", crc16(body.as_bytes())).into_bytes()
    }

    fn decode_all(bytes: &[u8]) -> Vec<Decoded> {
        let mut decoder = Decoder::new();
        decoder.extend(bytes);
        std::iter::from_fn(|| decoder.next()).collect()
    }

    fn decode_one(bytes: &[u8]) -> Decoded {
        let mut all = decode_all(bytes);
        assert_eq!(
            all.len(),
            1,
            "expected one result from {:?}: {all:?}",
            bytes.escape_ascii().to_string()
        );
        all.remove(0)
    }

    fn rejected(raw: &[u8], reason: RejectReason) -> Decoded {
        Decoded::Rejected(Rejected {
            raw: raw.to_vec(),
            reason,
        })
    }

    fn reason(bytes: &[u8]) -> RejectReason {
        match decode_one(bytes) {
            Decoded::Rejected(r) => r.reason,
            Decoded::Frame(f) => panic!("expected a rejection, decoded {f:?}"),
        }
    }

    fn invalid_field(bytes: &[u8]) -> &'static str {
        match reason(bytes) {
            RejectReason::InvalidField { field, .. } => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    const HEART_RATE: &str = "R,ICD-0042,1,2025-03-01T08:30:00.000Z,heart_rate,72,bpm,routine";

    /// The vectors published in `docs/serial-protocol.md`, byte for byte.
    fn doc_vectors() -> Vec<(Frame, &'static str)> {
        let r = |seq, at, kind, value, priority| {
            Frame::Reading(reading(seq, at, kind, value, priority))
        };
        vec![
            (
                r(
                    1,
                    "2025-03-01T08:30:00Z",
                    Kind::HeartRate,
                    72.0,
                    Priority::Routine,
                ),
                "$R,ICD-0042,1,2025-03-01T08:30:00.000Z,heart_rate,72,bpm,routine*097D\r\n",
            ),
            (
                r(
                    2,
                    "2025-03-01T08:30:05.250Z",
                    Kind::BatteryVoltage,
                    2.95,
                    Priority::Routine,
                ),
                "$R,ICD-0042,2,2025-03-01T08:30:05.250Z,battery_voltage,2.95,V,routine*9A55\r\n",
            ),
            (
                r(
                    3,
                    "2025-03-01T08:31:12Z",
                    Kind::Episode,
                    42.0,
                    Priority::Alert,
                ),
                "$R,ICD-0042,3,2025-03-01T08:31:12.000Z,episode,42,s,alert,AF*9771\r\n",
            ),
            (
                r(
                    4,
                    "2025-03-01T08:32:00.500Z",
                    Kind::ShockDelivered,
                    35.0,
                    Priority::Alert,
                ),
                "$R,ICD-0042,4,2025-03-01T08:32:00.500Z,shock_delivered,35,J,alert*580F\r\n",
            ),
            (ack(1), "$A,ICD-0042,1*50F1\r\n"),
            (
                Frame::Nak {
                    device_id: None,
                    epoch: None,
                    seq: None,
                    reason: "checksum".into(),
                },
                "$N,,,checksum*DE5C\r\n",
            ),
            (
                Frame::Nak {
                    device_id: Some("ICD-0042".into()),
                    epoch: None,
                    seq: Some(2),
                    reason: "invalid".into(),
                },
                "$N,ICD-0042,2,invalid*E534\r\n",
            ),
            (
                Frame::Busy {
                    device_id: "ICD-0042".into(),
                    epoch: None,
                    seq: 4,
                },
                "$B,ICD-0042,4*05CB\r\n",
            ),
            (
                r(
                    5,
                    "2025-03-01T08:33:00Z",
                    Kind::LeadImpedance,
                    540.0,
                    Priority::Routine,
                ),
                "$R,ICD-0042,5,2025-03-01T08:33:00.000Z,lead_impedance,540,ohm,routine*D76D\r\n",
            ),
            (
                r(
                    6,
                    "2025-03-01T08:33:00Z",
                    Kind::PacingPercent,
                    12.5,
                    Priority::Routine,
                ),
                "$R,ICD-0042,6,2025-03-01T08:33:00.000Z,pacing_percent,12.5,%,routine*8E12\r\n",
            ),
            (
                r(
                    7,
                    "2025-03-01T08:33:00Z",
                    Kind::AfBurden,
                    3.2,
                    Priority::Routine,
                ),
                "$R,ICD-0042,7,2025-03-01T08:33:00.000Z,af_burden,3.2,%,routine*2A7E\r\n",
            ),
            // v1.1: the boot epoch in the seq field, echoed by the answers.
            (
                Frame::Reading(Reading {
                    epoch: Some(3),
                    ..reading(
                        8,
                        "2025-03-01T08:34:00Z",
                        Kind::HeartRate,
                        70.0,
                        Priority::Routine,
                    )
                }),
                "$R,ICD-0042,3:8,2025-03-01T08:34:00.000Z,heart_rate,70,bpm,routine*B8B4\r\n",
            ),
            (
                Frame::Ack {
                    device_id: "ICD-0042".into(),
                    epoch: Some(3),
                    seq: 8,
                },
                "$A,ICD-0042,3:8*C2E4\r\n",
            ),
            (
                Frame::Nak {
                    device_id: Some("ICD-0042".into()),
                    epoch: Some(3),
                    seq: Some(7),
                    reason: "missing".into(),
                },
                "$N,ICD-0042,3:7,missing*B55A\r\n",
            ),
            (
                Frame::Busy {
                    device_id: "ICD-0042".into(),
                    epoch: Some(3),
                    seq: 8,
                },
                "$B,ICD-0042,3:8*4F47\r\n",
            ),
            (
                Frame::Nak {
                    device_id: Some("ICD-0042".into()),
                    epoch: None,
                    seq: Some(9),
                    reason: "gap".into(),
                },
                "$N,ICD-0042,9,gap*FA65\r\n",
            ),
            (
                r(
                    0,
                    "2025-03-01T08:30:00Z",
                    Kind::HeartRate,
                    72.0,
                    Priority::Routine,
                ),
                "$R,ICD-0042,0,2025-03-01T08:30:00.000Z,heart_rate,72,bpm,routine*723D\r\n",
            ),
        ]
    }

    #[test]
    fn a_bad_epoch_is_an_invalid_seq() {
        for body in [
            "A,ICD-0042,:8",
            "A,ICD-0042,x:8",
            "A,ICD-0042,3:",
            "A,ICD-0042,1:2:3",
            "A,ICD-0042,4294967296:1",
        ] {
            let frame = format!("${body}*{:04X}\r\n", crc16(body.as_bytes()));
            let mut d = Decoder::new();
            d.extend(frame.as_bytes());
            match d.next() {
                Some(Decoded::Rejected(Rejected {
                    reason: RejectReason::InvalidField { field, .. },
                    ..
                })) => assert_eq!(field, "seq", "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn crc16_matches_the_ccitt_false_check_value() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
        assert_eq!(crc16(b""), 0xFFFF);
    }

    #[test]
    fn encode_produces_the_documented_test_vectors() {
        for (frame, wire) in doc_vectors() {
            assert_eq!(String::from_utf8(frame.encode()).unwrap(), wire);
            assert_eq!(decode_one(wire.as_bytes()), Decoded::Frame(frame));
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            let priority = match kind {
                Kind::Episode | Kind::ShockDelivered => Priority::Alert,
                _ => Priority::Routine,
            };
            for value in [
                0.0,
                -0.5,
                0.1,
                72.0,
                1e-7,
                1e300,
                -2.2250738585072014e-308,
                f64::MAX,
            ] {
                let frame = Frame::Reading(reading(
                    i as u32,
                    "2025-03-01T08:30:00.123Z",
                    kind,
                    value,
                    priority,
                ));
                let wire = frame.encode();
                assert!(
                    wire.len() <= MAX_FRAME_LEN,
                    "{kind} {value} encodes to {} bytes",
                    wire.len()
                );
                assert_eq!(decode_one(&wire), Decoded::Frame(frame));
            }
        }
    }

    #[test]
    fn every_frame_type_round_trips() {
        let frames = [
            Frame::Reading(reading(
                u32::MAX,
                "2025-12-31T23:59:59.999Z",
                Kind::HeartRate,
                61.5,
                Priority::Alert,
            )),
            ack(0),
            Frame::Busy {
                device_id: "a.b_c-D9".into(),
                epoch: None,
                seq: 7,
            },
            Frame::Nak {
                device_id: Some("x".repeat(MAX_DEVICE_ID_LEN)),
                epoch: None,
                seq: None,
                reason: "out-of-order".into(),
            },
            Frame::Nak {
                device_id: None,
                epoch: None,
                seq: Some(3),
                reason: "malformed".into(),
            },
        ];
        for frame in frames {
            assert_eq!(decode_one(&frame.encode()), Decoded::Frame(frame));
        }
    }

    #[test]
    fn kind_and_priority_names_agree_everywhere() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
        }
        for priority in [Priority::Alert, Priority::Routine] {
            assert_eq!(priority.as_str().parse::<Priority>(), Ok(priority));
            assert_eq!(
                serde_json::to_string(&priority).unwrap(),
                format!("\"{priority}\"")
            );
        }
        assert!(Priority::Alert < Priority::Routine);
        assert_eq!(
            "urgent".parse::<Priority>(),
            Err("unknown priority `urgent` (expected one of alert, routine)".to_owned())
        );
    }

    #[test]
    fn decoder_accepts_lowercase_hex_and_a_bare_newline() {
        let wire = "$A,ICD-0042,1*50f1\n";
        assert_eq!(decode_one(wire.as_bytes()), Decoded::Frame(ack(1)));
    }

    #[test]
    fn device_time_with_an_offset_is_converted_to_utc() {
        let body = "R,ICD-0042,1,2025-03-01T10:30:00+02:00,heart_rate,72,bpm,routine";
        let expected = reading(
            1,
            "2025-03-01T08:30:00Z",
            Kind::HeartRate,
            72.0,
            Priority::Routine,
        );
        assert_eq!(
            decode_one(&framed(body)),
            Decoded::Frame(Frame::Reading(expected))
        );
    }

    /// Found by the fuzzer (`tests/fuzz/seeds/frame_decoder/regression-year-*`):
    /// accepted, these re-encoded as `-0001-...` and `+10000-...`, which
    /// neither this decoder nor an RFC 3339 parser at the hospital reads.
    #[test]
    fn device_time_outside_four_digit_years_in_utc_is_rejected() {
        for time in ["0000-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"] {
            let body = format!("R,ICD-0042,1,{time},heart_rate,72,bpm,routine");
            assert_eq!(invalid_field(&framed(&body)), "device_time", "{time}");
        }
        for time in ["0000-01-01T00:30:00-01:00", "9999-12-31T23:30:00+01:00"] {
            let body = format!("R,ICD-0042,1,{time},heart_rate,72,bpm,routine");
            let Decoded::Frame(frame) = decode_one(&framed(&body)) else {
                panic!("{time} rejected");
            };
            assert_eq!(decode_one(&frame.encode()), Decoded::Frame(frame));
        }
    }

    /// The reader hands the decoder whatever `read` returned; where a chunk
    /// ends must not change what comes out.
    #[test]
    fn every_split_point_decodes_the_same() {
        let mut stream = b"boot v1.2\r\n".to_vec();
        stream.extend(framed(HEART_RATE));
        stream.extend(b"$R,ICD-0042,2,2025-03");
        stream.extend(doc_vectors()[2].1.as_bytes());
        stream.extend(framed("N,,,checksum"));
        let whole = decode_all(&stream);
        assert_eq!(whole.len(), 5);

        for split in 0..=stream.len() {
            let mut decoder = Decoder::new();
            let mut out = Vec::new();
            for chunk in [&stream[..split], &stream[split..]] {
                decoder.extend(chunk);
                out.extend(std::iter::from_fn(|| decoder.next()));
            }
            assert_eq!(out, whole, "split at {split}");
        }

        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for byte in &stream {
            decoder.extend(std::slice::from_ref(byte));
            out.extend(std::iter::from_fn(|| decoder.next()));
        }
        assert_eq!(out, whole, "byte by byte");
    }

    #[test]
    fn garbage_before_and_between_frames_is_reported_and_frames_survive() {
        let mut stream = b"\r\n  boot v1.2 \r\n".to_vec();
        stream.extend(ack(1).encode());
        stream.extend(b"\x00\xff\x07junk\n");
        stream.extend(ack(2).encode());
        stream.extend(b" \r\n\n");
        assert_eq!(
            decode_all(&stream),
            [
                rejected(b"boot v1.2", RejectReason::Garbage),
                Decoded::Frame(ack(1)),
                rejected(b"\x00\xff\x07junk", RejectReason::Garbage),
                Decoded::Frame(ack(2)),
            ]
        );
    }

    #[test]
    fn long_garbage_is_reported_in_bounded_runs() {
        let mut decoder = Decoder::new();
        decoder.extend(&[b'x'; 600]);
        let out: Vec<_> = std::iter::from_fn(|| decoder.next()).collect();
        let run = rejected(&[b'x'; MAX_FRAME_LEN], RejectReason::Garbage);
        assert_eq!(out, [run.clone(), run]);
        assert_eq!(decoder.buf.len(), 600 - 2 * MAX_FRAME_LEN);

        decoder.extend(&ack(1).encode());
        let out: Vec<_> = std::iter::from_fn(|| decoder.next()).collect();
        let rest = rejected(&[b'x'; 600 - 2 * MAX_FRAME_LEN], RejectReason::Garbage);
        assert_eq!(out, [rest, Decoded::Frame(ack(1))]);
    }

    #[test]
    fn oversized_frame_is_reported_then_skipped_to_the_next_line() {
        let mut long = b"$R,".to_vec();
        long.extend([b'9'; 400]);
        let mut stream = long.clone();
        stream.extend(b"*0000\r\n");
        stream.extend(ack(1).encode());
        assert_eq!(
            decode_all(&stream),
            [
                rejected(&long[..MAX_FRAME_LEN], RejectReason::Oversized),
                Decoded::Frame(ack(1)),
            ]
        );
    }

    #[test]
    fn oversized_frame_is_skipped_to_the_next_dollar() {
        let mut stream = vec![b'$'; 1];
        stream.extend([b'A'; 300]);
        stream.extend(ack(1).encode());
        let out = decode_all(&stream);
        assert_eq!(out[1..], [Decoded::Frame(ack(1))]);
        assert!(
            matches!(&out[0], Decoded::Rejected(r) if r.reason == RejectReason::Oversized && r.raw.len() == MAX_FRAME_LEN)
        );
    }

    #[test]
    fn a_line_of_exactly_max_frame_len_is_framed_and_one_more_byte_is_oversized() {
        // An unknown type proves the line was framed and parsed, not cut.
        let pad = |extra: usize| {
            let body = format!("X,{}", "a".repeat(MAX_FRAME_LEN + extra - 10));
            let wire = framed(&body);
            assert_eq!(wire.len(), MAX_FRAME_LEN + extra);
            wire
        };
        assert_eq!(reason(&pad(0)).code(), "malformed");
        assert_eq!(reason(&pad(1)), RejectReason::Oversized);
    }

    #[test]
    fn truncated_frame_is_reported_and_the_next_frame_decodes() {
        let mut stream = b"$R,ICD-0042,1,2025-03-01T08:3".to_vec();
        stream.extend(framed(HEART_RATE));
        assert_eq!(
            decode_all(&stream),
            [
                rejected(b"$R,ICD-0042,1,2025-03-01T08:3", RejectReason::Truncated),
                decode_one(&framed(HEART_RATE)),
            ]
        );
    }

    #[test]
    fn bad_checksum_names_both_values() {
        assert_eq!(
            reason(b"$A,ICD-0042,1*50F2\r\n"),
            RejectReason::BadChecksum {
                expected: 0x50F1,
                found: 0x50F2
            }
        );
        // One flipped bit in the body.
        let found = reason(b"$A,ICD-0042,3*50F1\r\n");
        assert_eq!(found.code(), "checksum");
        assert_eq!(
            found.to_string(),
            format!(
                "bad checksum: frame carries 50F1, body computes {:04X}",
                crc16(b"A,ICD-0042,3")
            )
        );
    }

    #[test]
    fn malformed_frames_are_rejected() {
        let cases: [&[u8]; 9] = [
            b"$A,ICD-0042,1\r\n",
            b"$A,ICD-0042,1*50F\r\n",
            b"$A,ICD-0042,1*50F1F\r\n",
            b"$A,ICD-0042,1*ZZZZ\r\n",
            b"$A,ICD-0042,1*+0F1\r\n",
            &framed("A,ICD-0042"),
            &framed("N,,checksum"),
            &framed("Q,ICD-0042,1"),
            &framed("R,ICD-0042,1,2025-03-01T08:30:00Z,heart_rate,72,bpm"),
        ];
        for case in cases {
            assert_eq!(reason(case).code(), "malformed", "{}", case.escape_ascii());
        }
        let mut non_ascii = b"A,ICD-0042,\xc3\xa9".to_vec();
        let crc = format!("*{:04X}\r\n", crc16(&non_ascii));
        non_ascii.insert(0, b'$');
        non_ascii.extend(crc.as_bytes());
        assert_eq!(
            reason(&non_ascii),
            RejectReason::Malformed("body is not ASCII".into())
        );
    }

    #[test]
    fn each_invalid_field_is_named() {
        let base = [
            "R",
            "ICD-0042",
            "1",
            "2025-03-01T08:30:00Z",
            "heart_rate",
            "72",
            "bpm",
            "routine",
        ];
        let with = |index: usize, value: &str| {
            let mut fields = base.to_vec();
            fields[index] = value;
            framed(&fields.join(","))
        };
        let long_id = "x".repeat(MAX_DEVICE_ID_LEN + 1);
        let cases = [
            (with(1, ""), "device_id"),
            (with(1, &long_id), "device_id"),
            (with(1, "ICD 42"), "device_id"),
            (with(1, "ICD/42"), "device_id"),
            (with(2, ""), "seq"),
            (with(2, "-1"), "seq"),
            (with(2, "+1"), "seq"),
            (with(2, "4294967296"), "seq"),
            (with(3, "yesterday"), "device_time"),
            (with(3, "2025-03-01T08:30:00"), "device_time"),
            (with(4, "HeartRate"), "kind"),
            (with(5, ""), "value"),
            (with(5, "72bpm"), "value"),
            (with(6, "BPM"), "unit"),
            (with(7, "urgent"), "priority"),
            (framed(&format!("{HEART_RATE},AF")), "detail"),
            (framed("A,ICD-0042,x"), "seq"),
            (framed("B,,1"), "device_id"),
            (framed("N,ICD 42,,checksum"), "device_id"),
            (framed("N,,x,checksum"), "seq"),
            (framed("N,,,"), "reason"),
            (framed("N,,,Checksum"), "reason"),
            (
                framed(&format!("N,,,{}", "a".repeat(MAX_REASON_LEN + 1))),
                "reason",
            ),
        ];
        for (wire, field) in cases {
            assert_eq!(invalid_field(&wire), field, "{}", wire.escape_ascii());
            assert_eq!(reason(&wire).code(), "invalid");
        }
    }

    #[test]
    fn non_finite_values_are_rejected() {
        for value in ["NaN", "nan", "inf", "-inf", "infinity", "1e999"] {
            let body = format!("R,ICD-0042,1,2025-03-01T08:30:00Z,heart_rate,{value},bpm,routine");
            assert_eq!(
                reason(&framed(&body)).to_string(),
                "invalid field `value`: not finite",
                "{value}"
            );
        }
    }

    #[test]
    fn unknown_kind_lists_the_valid_ones() {
        let body = "R,ICD-0042,1,2025-03-01T08:30:00Z,foo,72,bpm,routine";
        assert_eq!(
            reason(&framed(body)).to_string(),
            "invalid field `kind`: unknown kind `foo` (expected one of heart_rate, battery_voltage, \
             lead_impedance, pacing_percent, af_burden, episode, shock_delivered)"
        );
    }

    #[test]
    fn unit_must_match_the_kind() {
        let body = "R,ICD-0042,1,2025-03-01T08:30:00Z,battery_voltage,2.9,mV,routine";
        assert_eq!(
            reason(&framed(body)).to_string(),
            "invalid field `unit`: unit `mV` does not match kind `battery_voltage` (expected `V`)"
        );
    }

    #[test]
    fn episode_needs_a_known_detail_and_alert_priority() {
        let episode = "R,ICD-0042,3,2025-03-01T08:31:12Z,episode,42,s";
        assert_eq!(
            reason(&framed(&format!("{episode},alert"))).to_string(),
            "invalid field `detail`: kind `episode` requires one of AF, VT, VF"
        );
        assert_eq!(
            invalid_field(&framed(&format!("{episode},alert,af"))),
            "detail"
        );
        assert_eq!(
            invalid_field(&framed(&format!("{episode},alert,"))),
            "detail"
        );
        assert_eq!(
            invalid_field(&framed(&format!("{episode},routine,AF"))),
            "priority"
        );
        let shock = "R,ICD-0042,4,2025-03-01T08:32:00Z,shock_delivered,35,J,routine";
        assert_eq!(
            reason(&framed(shock)).to_string(),
            "invalid field `priority`: kind `shock_delivered` must have priority `alert`"
        );
    }

    /// Rejections get logged; device ids and values are patient data.
    #[test]
    fn rejection_messages_never_quote_device_id_or_value() {
        let cases = [
            "R,ICD 0042,1,2025-03-01T08:30:00Z,heart_rate,72,bpm,routine",
            "R,ICD-0042,1,2025-03-01T08:30:00Z,heart_rate,73.25x,bpm,routine",
        ];
        for body in cases {
            let message = reason(&framed(body)).to_string();
            for secret in ["0042", "73.25"] {
                assert!(!message.contains(secret), "{message}");
            }
        }
    }

    #[test]
    fn rejected_frames_map_to_the_nak_the_gateway_sends() {
        let nak = |device_id: Option<&str>, seq, reason: &str| Frame::Nak {
            device_id: device_id.map(Into::into),
            epoch: None,
            seq,
            reason: reason.into(),
        };
        let nak_for = |bytes: &[u8]| match decode_all(bytes).remove(0) {
            Decoded::Rejected(r) => r.nak(),
            Decoded::Frame(f) => panic!("expected a rejection, decoded {f:?}"),
        };
        assert_eq!(nak_for(b"junk$"), nak(None, None, "garbage"));
        assert_eq!(
            nak_for(b"$A,ICD-0042,1*0000\r\n"),
            nak(None, None, "checksum")
        );
        assert_eq!(nak_for(b"$A,ICD-0042,1$"), nak(None, None, "truncated"));
        assert_eq!(nak_for(&framed("A,ICD-0042")), nak(None, None, "malformed"));
        let unit = "R,ICD-0042,9,2025-03-01T08:30:00Z,heart_rate,72,V,routine";
        assert_eq!(
            nak_for(&framed(unit)),
            nak(Some("ICD-0042"), Some(9), "invalid")
        );
        let bad_seq = "R,ICD-0042,-9,2025-03-01T08:30:00Z,heart_rate,72,bpm,routine";
        assert_eq!(
            nak_for(&framed(bad_seq)),
            nak(Some("ICD-0042"), None, "invalid")
        );
        assert_eq!(nak_for(&framed("A,,1")), nak(None, Some(1), "invalid"));
    }

    /// A tiny deterministic generator, so the test needs no extra crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Feeds 1 MB in reads of up to `MAX_FRAME_LEN` bytes and checks the
    /// module guarantees: no panic, bounded buffer, bounded raw, and the
    /// same output as one big read.
    fn fuzz(seed: u64, alphabet: Option<&[u8]>) {
        let mut rng = XorShift(seed);
        let stream: Vec<u8> = (0..1 << 20)
            .map(|_| {
                let r = rng.next();
                match alphabet {
                    Some(a) => a[(r % a.len() as u64) as usize],
                    None => r as u8,
                }
            })
            .collect();

        let mut decoder = Decoder::new();
        let mut chunked = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let take = (rng.next() as usize % MAX_FRAME_LEN + 1).min(rest.len());
            decoder.extend(&rest[..take]);
            rest = &rest[take..];
            assert!(decoder.buf.len() < 2 * MAX_FRAME_LEN);
            while let Some(decoded) = decoder.next() {
                if let Decoded::Rejected(r) = &decoded {
                    assert!(!r.raw.is_empty() && r.raw.len() <= MAX_FRAME_LEN);
                    r.nak(); // must not panic either
                }
                chunked.push(decoded);
            }
            assert!(decoder.buf.len() < MAX_FRAME_LEN);
            assert!(decoder.buf.capacity() <= 4 * MAX_FRAME_LEN);
        }

        let mut whole = Decoder::new();
        whole.extend(&stream);
        let at_once: Vec<_> = std::iter::from_fn(|| whole.next()).collect();
        assert!(
            whole.buf.capacity() <= 4 * MAX_FRAME_LEN,
            "a big read's memory is given back"
        );
        assert_eq!(chunked, at_once);
    }

    #[test]
    fn random_bytes_never_panic_and_memory_stays_bounded() {
        fuzz(0x9E37_79B9_7F4A_7C15, None);
    }

    #[test]
    fn protocol_like_noise_never_panics_and_memory_stays_bounded() {
        // Mostly frame characters, so every parser branch gets exercised.
        fuzz(
            0xD1B5_4A32_D192_ED03,
            Some(b"$$\r\n,,,,*RANB019afAF.-eTZ:+ \x00\xff"),
        );
        let mut stream = Vec::new();
        for (frame, _) in doc_vectors() {
            stream.extend(frame.encode());
        }
        let mut rng = XorShift(7);
        for _ in 0..2000 {
            let i = rng.next() as usize % stream.len();
            let mut damaged = stream.clone();
            damaged[i] ^= 1 << (rng.next() % 8);
            let out = decode_all(&damaged);
            let good = out
                .iter()
                .filter(|d| matches!(d, Decoded::Frame(_)))
                .count();
            assert!(
                good >= doc_vectors().len() - 2,
                "one flipped bit cost more than two frames"
            );
        }
    }
}
