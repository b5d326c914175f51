//! The guarantees the fuzz targets check, one function per target, each
//! taking the raw input and panicking when a guarantee breaks. Shared: the
//! targets (`fuzz_targets/*.rs`) call them on libFuzzer's inputs, and
//! `tests/property.rs` (`#[path]`) calls them on every committed seed and on
//! proptest's inputs, so `cargo test` checks the same things on stable.
//!
//! Each input is the raw bytes as they arrive (a serial stream, a config
//! file, a broker's stream), so the seeds in `seeds/TARGET` are plain
//! protocol text, TOML and MQTT packets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use chrono::Timelike as _;
use hearth::config::{Config, ConfigError};
use hearth::mqtt::incoming::{IdUse, MAX_PACKET, Protocol, Reaction, next_packet, react};
use hearth::mqtt::wire::In;
use hearth::serial::frame::{Decoded, Decoder, Frame, MAX_FRAME_LEN};

// ---- frame_decoder: the serial frame decoder (`src/serial/frame.rs`) ----

/// The decoder's module guarantees: no panic, bounded memory, bounded
/// rejected runs, the same output however the stream is split into reads;
/// and what it accepts is what the encoder writes: every decoded frame, and
/// every NAK the gateway answers a rejection with, encodes to at most
/// `MAX_FRAME_LEN` bytes that decode to the same frame (device time to the
/// millisecond, as the wire carries it).
pub fn frame_decoder(data: &[u8]) {
    let whole = decode(data, [data.len().max(1)].into_iter().cycle());
    assert_eq!(whole, decode(data, std::iter::repeat(1)), "byte by byte");
    // Reads of 1 to MAX_FRAME_LEN bytes, chosen from the data itself.
    let mut state = data.iter().fold(0x9E37_79B9_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let reads = std::iter::from_fn(|| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        Some(state as usize % MAX_FRAME_LEN + 1)
    });
    assert_eq!(whole, decode(data, reads), "in reads of random size");

    for decoded in &whole {
        match decoded {
            Decoded::Frame(frame) => {
                let again = round_trip(frame);
                assert_eq!(at_millis(frame), again, "re-encoded frame");
            }
            Decoded::Rejected(rejected) => {
                assert!(!rejected.raw.is_empty() && rejected.raw.len() <= MAX_FRAME_LEN);
                let nak = rejected.nak();
                assert_eq!(nak, round_trip(&nak), "the NAK for a rejection");
            }
        }
    }
}

/// Feeds `data` in reads of the sizes `reads` gives, draining after each,
/// and checks the memory bound the decoder promises for reads of at most
/// `MAX_FRAME_LEN` bytes.
fn decode(data: &[u8], reads: impl Iterator<Item = usize>) -> Vec<Decoded> {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    let mut rest = data;
    for size in reads {
        if rest.is_empty() {
            break;
        }
        let (read, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        decoder.extend(read);
        out.extend(std::iter::from_fn(|| decoder.next()));
        assert!(
            decoder.buffered() < MAX_FRAME_LEN,
            "{} bytes held",
            decoder.buffered()
        );
    }
    out
}

/// `frame` encoded and decoded again.
fn round_trip(frame: &Frame) -> Frame {
    let wire = frame.encode();
    assert!(wire.len() <= MAX_FRAME_LEN, "{} bytes", wire.len());
    let mut decoder = Decoder::new();
    decoder.extend(&wire);
    match (decoder.next(), decoder.next()) {
        (Some(Decoded::Frame(again)), None) => again,
        other => panic!(
            "{frame:?} encodes to {} which decodes to {other:?}",
            wire.escape_ascii()
        ),
    }
}

/// The frame as the wire carries it: device time to the millisecond.
fn at_millis(frame: &Frame) -> Frame {
    let mut frame = frame.clone();
    if let Frame::Reading(r) = &mut frame {
        let ms = r.device_time.timestamp_subsec_millis();
        r.device_time = r.device_time.with_nanosecond(ms * 1_000_000).unwrap();
    }
    frame
}

// ---- config_parse: the config parser (`src/config.rs`) -----------------

/// `Config::parse` on the file's bytes (invalid UTF-8 replaced, as a lossy
/// read would): no panic, and a refused file gets the one-line message
/// naming the file that the module promises. A file that parses goes on
/// through `Config::validate`'s value checks (the log filter among them);
/// its file names are pointed away first, so that no real file is opened.
pub fn config_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/etc/hearth/fuzz.toml");
    let mut config = match Config::parse(&text, path) {
        Ok(config) => config,
        Err(e) => return one_line_naming_the_file(&e),
    };
    let _ = (config.keep_alive(), config.topic("readings"));
    // A folder that exists, and certificate files that do not: validation
    // runs every value check and stops at `mqtt.ca_file`.
    config.source = path.to_owned();
    config.store.path = std::env::temp_dir().join("hearth-fuzz.db");
    let absent = PathBuf::from("/nonexistent/hearth-fuzz.pem");
    config.mqtt.ca_file = absent.clone();
    config.mqtt.cert_file = absent.clone();
    config.mqtt.key_file = absent;
    config.mqtt.crl_file = None;
    config.store.key_file = None;
    match config.validate() {
        Ok(()) => panic!("validation passed without certificate files"),
        Err(e) => one_line_naming_the_file(&e),
    }
}

fn one_line_naming_the_file(e: &ConfigError) {
    let message = e.to_string();
    assert!(
        message.starts_with("config `/etc/hearth/fuzz.toml`: "),
        "{message}"
    );
    assert!(!message.contains(['\n', '\r']), "{message}");
}

// ---- mqtt_incoming: bytes from the broker (`src/mqtt/incoming.rs`) -----

/// The packet codec under hearth's `MAX_INCOMING` limit, fed the way
/// `Connection::read` feeds it, then the publisher's reaction to each
/// packet, applied to a model of its packet-id table. No panic; the read
/// buffer stays bounded (a 256 MB length prefix allocates nothing); an
/// incomplete packet consumes nothing, so the packets do not depend on how
/// the stream was split into reads; and the QoS 2 rules hold over any
/// sequence of packets: PUBREL is written only for an exchange we recorded
/// (an unknown id is blocked for the connection, and never released later),
/// PUBCOMP completes only an exchange past PUBREC; a refusal (MQTT 5
/// reason code 0x80 or more) never releases. Both protocol versions read
/// the same bytes, and each packet list meets both `mqtt.qos` settings.
pub fn mqtt_incoming(data: &[u8]) {
    for protocol in [Protocol::V311, Protocol::V5] {
        let (packets, end) = read_all(protocol, data, usize::MAX);
        for read in [1, 7, 4096] {
            assert_eq!(
                read_all(protocol, data, read),
                (packets.clone(), end.clone()),
                "{protocol}, reads of {read}"
            );
        }
        for qos in [2, 1] {
            let mut ids = Ids::new(qos);
            for packet in &packets {
                let reaction = react(packet, qos, |pkid| ids.get(pkid));
                if !ids.apply(packet, reaction) {
                    break;
                }
            }
        }
    }
}

/// How the packets ended: the stream ran out (maybe mid-packet), or an error.
type End = Option<String>;

/// `Connection::read` over `data`, delivered in reads of at most `read`
/// bytes: the packets, and how it ended.
fn read_all(protocol: Protocol, data: &[u8], read: usize) -> (Vec<In>, End) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut rest = data;
    let mut packets = Vec::new();
    loop {
        let before = buf.len();
        match next_packet(protocol, &mut buf) {
            Ok(Some(packet)) => packets.push(packet),
            Ok(None) => {
                // The codec only ever takes bytes from the front.
                assert_eq!(buf.len(), before, "an incomplete packet consumed bytes");
                if rest.is_empty() {
                    return (packets, None);
                }
                // What tokio's `read_buf` does: fill the spare capacity,
                // making 64 bytes of room if there is none.
                if buf.capacity() == buf.len() {
                    buf.reserve(64);
                }
                let n = (buf.capacity() - buf.len()).min(read).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            Err(e) => return (packets, Some(format!("{e:?}"))),
        }
        assert!(
            buf.capacity() <= MAX_CAPACITY,
            "read buffer grew to {} bytes",
            buf.capacity()
        );
    }
}

/// The publisher's packet-id table as the reactions leave it. The first ids
/// start in use, so that a seed of a few acks meets every state; the store
/// has lost the exchanges of ids that are multiples of 5, as after a crash
/// the broker remembers better than we do.
struct Ids {
    qos: u8,
    table: BTreeMap<u16, IdUse>,
    /// Ids blocked on this connection: never released again.
    blocked: Vec<u16>,
}

impl Ids {
    fn new(qos: u8) -> Ids {
        let table = (1..=40)
            .map(|pkid| {
                let use_ = match pkid % 4 {
                    0 => IdUse::Published,
                    1 => IdUse::Released,
                    2 => IdUse::Status,
                    _ => IdUse::Free,
                };
                (pkid, use_)
            })
            .filter(|(_, use_)| *use_ != IdUse::Free)
            .collect();
        Ids {
            qos,
            table,
            blocked: Vec::new(),
        }
    }

    fn get(&self, pkid: u16) -> IdUse {
        self.table.get(&pkid).copied().unwrap_or(IdUse::Free)
    }

    /// What the publisher does, checking the QoS 2 rules first; false once
    /// the link is over.
    fn apply(&mut self, packet: &In, reaction: Reaction) -> bool {
        let code = match *packet {
            In::PubAck { code, .. } | In::PubRec { code, .. } | In::PubComp { code, .. } => code,
            _ => 0,
        };
        match reaction {
            Reaction::Release(pkid) => {
                assert_eq!(self.get(pkid), IdUse::Published, "{reaction:?}");
                assert!(
                    !self.blocked.contains(&pkid),
                    "{reaction:?} of a blocked id"
                );
                let recorded = pkid % 5 != 0;
                self.set(
                    pkid,
                    if recorded {
                        IdUse::Released
                    } else {
                        IdUse::Blocked
                    },
                );
            }
            Reaction::ReleaseAgain(pkid) => {
                assert_eq!(self.get(pkid), IdUse::Released, "{reaction:?}");
                assert!(
                    !self.blocked.contains(&pkid),
                    "{reaction:?} of a blocked id"
                );
            }
            Reaction::Block(pkid) => {
                assert_eq!(self.get(pkid), IdUse::Free, "{reaction:?}");
                self.set(pkid, IdUse::Blocked);
            }
            Reaction::Complete(pkid) => {
                let done = self.get(pkid);
                // QoS 2: only past PUBREC. QoS 1: PUBACK ends a PUBLISH.
                assert!(
                    done == IdUse::Released
                        || (self.qos == 1 && done == IdUse::Published && code < 0x80),
                    "{reaction:?} of {done:?} at QoS {}",
                    self.qos
                );
                self.table.remove(&pkid);
            }
            Reaction::Unknown(pkid) => {
                assert_eq!(self.get(pkid), IdUse::Released, "{reaction:?}");
                assert!(code >= 0x80, "{reaction:?}");
                self.table.remove(&pkid);
            }
            Reaction::Refused {
                pkid,
                code: refused,
            } => {
                assert_eq!(self.get(pkid), IdUse::Published, "{reaction:?}");
                assert!(refused >= 0x80 && refused == code, "{reaction:?}");
                self.table.remove(&pkid);
            }
            Reaction::NoQos2(pkid) => {
                assert_eq!(self.qos, 2, "{reaction:?}");
                assert_eq!(self.get(pkid), IdUse::Published, "{reaction:?}");
                self.table.remove(&pkid);
            }
            Reaction::Disconnected(_) => return false,
            Reaction::StatusAcked(pkid) => {
                assert_eq!(self.get(pkid), IdUse::Status, "{reaction:?}");
                self.table.remove(&pkid);
            }
            Reaction::IgnoreRec(pkid) => {
                // A QoS 2 PUBLISH is never left waiting on its PUBREC.
                assert!(
                    !(self.qos == 2 && self.get(pkid) == IdUse::Published),
                    "{reaction:?}"
                );
            }
            Reaction::IgnoreComp(pkid) => assert_ne!(self.get(pkid), IdUse::Released),
            Reaction::IgnoreAck(pkid) => assert_ne!(self.get(pkid), IdUse::Status),
            Reaction::PingAnswered | Reaction::AnswerPubRel(_) | Reaction::Unexpected(_) => {}
        }
        true
    }

    fn set(&mut self, pkid: u16, use_: IdUse) {
        if use_ == IdUse::Blocked {
            self.blocked.push(pkid);
        }
        self.table.insert(pkid, use_);
    }
}

/// The read buffer's bound: `BytesMut` grows by doubling, so a buffer asked
/// for at most `MAX_PACKET` bytes may hold up to twice that.
const MAX_CAPACITY: usize = 2 * MAX_PACKET;
