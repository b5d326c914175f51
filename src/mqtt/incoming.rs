//! What hearth does with bytes from the broker, decided without I/O: the
//! packet codec under hearth's size limit ([`next_packet`]) and the
//! publisher's reaction to each packet ([`react`]). Both are pure, so unit
//! tests and the fuzzer (`tests/fuzz`, target `mqtt_incoming`) drive them
//! without a broker; `connection.rs` and `publisher.rs` do the I/O and the
//! store calls.
//!
//! # Guarantees
//!
//! - Neither function panics, whatever the broker sends.
//! - Memory is bounded: a packet whose remaining length exceeds
//!   [`MAX_INCOMING`] is refused from its fixed header alone, before any of
//!   its body is awaited, so a read buffer fed by [`next_packet`] never has
//!   to grow past [`MAX_PACKET`] bytes (about twice that with `BytesMut`'s
//!   growth): a length prefix of 256 MB allocates nothing.
//! - An incomplete packet is `Ok(None)` and leaves every byte in the buffer,
//!   so the result does not depend on how the stream was split into reads.
//! - A PUBREL is only written for an exchange we recorded (invariant 7 of
//!   `publisher.rs`): PUBREC for an id with no record blocks the id on this
//!   connection instead. PUBCOMP completes only an exchange past PUBREC.

use bytes::BytesMut;
use rumqttc::Packet;

use super::wire::{In, WireError};
pub use super::wire::{MAX_INCOMING, MAX_PACKET, Protocol};

/// The next whole packet at the front of `buf`, or `None` when more bytes
/// are needed; then nothing was consumed, and `buf` has room reserved for
/// as much of the packet as its fixed header tells so far (never beyond
/// [`MAX_PACKET`] bytes in all).
/// An error leaves the stream unusable: drop the connection.
pub fn next_packet(protocol: Protocol, buf: &mut BytesMut) -> Result<Option<In>, WireError> {
    super::wire::next_packet(protocol, buf)
}

/// What a packet id is used for on the current connection, as far as a
/// packet from the broker is concerned (the publisher's slot, seen from
/// here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdUse {
    /// Not in use.
    Free,
    /// An exchange whose PUBLISH awaits PUBREC (QoS 2) or PUBACK (QoS 1).
    Published,
    /// A QoS 2 exchange past PUBREC: PUBREL written, PUBCOMP awaited.
    Released,
    /// The QoS 1 status message, awaiting PUBACK.
    Status,
    /// An id the broker holds without our record: never used on this link.
    Blocked,
}

/// The first MQTT 5 reason code that means failure.
pub const FAILURE: u8 = 0x80;

/// What the publisher does with one packet from the broker. Each variant
/// names the log level its caller uses, if any; a log line names the packet
/// type and id, never a payload (patient data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// PUBREC for a published exchange: record the release in the store,
    /// then write PUBREL (invariant 2). If the store no longer has the
    /// exchange, block the id instead (WARN).
    Release(u16),
    /// PUBREC again for an exchange already released: write PUBREL again;
    /// nothing new to record.
    ReleaseAgain(u16),
    /// PUBREC for an id we have no record of (e.g. the broker restored an
    /// old state): releasing it could deliver twice, so the id is kept out
    /// of use on this connection (WARN).
    Block(u16),
    /// PUBREC for the status message, a blocked id, or a QoS 1 exchange:
    /// ignored (WARN).
    IgnoreRec(u16),
    /// The exchange is done: PUBCOMP for a released QoS 2 exchange, or
    /// PUBACK for a QoS 1 one. Its readings are delivered, the id is free.
    Complete(u16),
    /// MQTT 5: PUBCOMP with a failure (0x92) for a released exchange: the
    /// broker does not know it; its readings are queued again (WARN).
    Unknown(u16),
    /// PUBCOMP for an id not released: ignored (WARN).
    IgnoreComp(u16),
    /// PUBACK of the status message: the id is free.
    StatusAcked(u16),
    /// PUBACK for anything else (e.g. a late duplicate): ignored silently.
    IgnoreAck(u16),
    /// MQTT 5: PUBREC (QoS 2) or PUBACK (QoS 1) with a reason code of 0x80
    /// or more for a published exchange. The exchange is over, undelivered:
    /// its readings go back to the queue, held with back-off, and the
    /// `broker-refused` alarm is raised (ERROR).
    Refused { pkid: u16, code: u8 },
    /// PUBACK for a QoS 2 PUBLISH: the broker has no QoS 2 (RabbitMQ) and
    /// took the message at QoS 1. Its readings are delivered (at least
    /// once); the `broker-qos` alarm is raised (ERROR naming `mqtt.qos`)
    /// and new exchanges are held.
    NoQos2(u16),
    /// PINGRESP: the broker has read everything before our PINGREQ.
    PingAnswered,
    /// PUBREL from the broker: we subscribe to nothing, but a broker that
    /// sends one waits for its PUBCOMP, so answer it.
    AnswerPubRel(u16),
    /// MQTT 5 DISCONNECT from the broker, with its reason code: the link is
    /// over.
    Disconnected(u8),
    /// Any other packet, by its type: ignored (DEBUG).
    Unexpected(&'static str),
}

/// The publisher's reaction to `packet` on an established connection,
/// given the configured QoS for readings (`mqtt.qos`: 1 or 2) and what
/// each packet id is used for.
pub fn react(packet: &In, qos: u8, id_use: impl Fn(u16) -> IdUse) -> Reaction {
    match *packet {
        In::PubRec { pkid, code } => match id_use(pkid) {
            IdUse::Published if qos >= 2 && code >= FAILURE => Reaction::Refused { pkid, code },
            IdUse::Published if qos >= 2 => Reaction::Release(pkid),
            IdUse::Released if code < FAILURE => Reaction::ReleaseAgain(pkid),
            // A failed PUBREC holds nothing at the broker: no id to block.
            IdUse::Free if code < FAILURE => Reaction::Block(pkid),
            _ => Reaction::IgnoreRec(pkid),
        },
        In::PubComp { pkid, code } => match id_use(pkid) {
            // 0x92 (Packet Identifier not found) after our PUBREL: the
            // broker has no record of it. It may have delivered it (and we
            // lost its PUBCOMP), or lost it with a session it claims to
            // have: the readings go again, a possible duplicate, never a
            // loss.
            IdUse::Released if code >= FAILURE => Reaction::Unknown(pkid),
            IdUse::Released => Reaction::Complete(pkid),
            _ => Reaction::IgnoreComp(pkid),
        },
        In::PubAck { pkid, code } => match id_use(pkid) {
            IdUse::Status => Reaction::StatusAcked(pkid),
            IdUse::Published if code >= FAILURE => Reaction::Refused { pkid, code },
            IdUse::Published if qos >= 2 => Reaction::NoQos2(pkid),
            IdUse::Published => Reaction::Complete(pkid),
            _ => Reaction::IgnoreAck(pkid),
        },
        In::PingResp => Reaction::PingAnswered,
        In::PubRel { pkid } => Reaction::AnswerPubRel(pkid),
        In::Disconnect { code, .. } => Reaction::Disconnected(code),
        ref other => Reaction::Unexpected(other.kind()),
    }
}

/// A packet's type, for messages: never its content (a PUBLISH carries
/// patient data).
pub fn kind(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::{PubAck, PubComp, PubRec, PubRel, Publish, QoS};

    use super::*;

    fn wire(packet: &Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).unwrap();
        buf.to_vec()
    }

    const BOTH: [Protocol; 2] = [Protocol::V311, Protocol::V5];

    #[test]
    fn every_split_point_of_a_packet_waits_without_consuming() {
        let mut publish = Publish::new("hearth/v1/gw/readings", QoS::ExactlyOnce, vec![7; 300]);
        publish.pkid = 9;
        let bytes = wire(&Packet::Publish(publish));
        for split in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..split]);
            assert_eq!(
                next_packet(Protocol::V311, &mut buf).unwrap(),
                None,
                "split {split}"
            );
            assert_eq!(&buf[..], &bytes[..split], "split {split} consumed bytes");
            // Once the fixed header (3 bytes here) is in, the whole packet
            // has room.
            assert!(split < 3 || buf.capacity() >= bytes.len(), "split {split}");
            buf.extend_from_slice(&bytes[split..]);
            assert_eq!(
                next_packet(Protocol::V311, &mut buf).unwrap(),
                Some(In::Other("PUBLISH"))
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_packet_of_exactly_max_incoming_is_read_and_one_byte_more_is_refused() {
        // Remaining length = 2 (topic length) + topic + payload.
        let publish =
            |payload: usize| Packet::Publish(Publish::new("t", QoS::AtMostOnce, vec![0; payload]));
        let mut buf = BytesMut::from(&wire(&publish(MAX_INCOMING - 3))[..]);
        assert_eq!(buf.len(), MAX_PACKET - 1, "3-byte remaining length");
        assert_eq!(
            next_packet(Protocol::V311, &mut buf),
            Ok(Some(In::Other("PUBLISH")))
        );
        for protocol in BOTH {
            let mut buf = BytesMut::from(&wire(&publish(MAX_INCOMING - 2))[..]);
            assert!(next_packet(protocol, &mut buf).is_err(), "{protocol}");
        }
    }

    /// A 256 MB length prefix is refused from its five header bytes: no
    /// buffer is grown for a body that may never come.
    #[test]
    fn a_huge_length_prefix_is_refused_before_any_allocation() {
        for protocol in BOTH {
            let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
            let capacity = buf.capacity();
            assert!(next_packet(protocol, &mut buf).is_err(), "{protocol}");
            assert_eq!(buf.capacity(), capacity);
            // A fifth length byte is malformed, whatever it says.
            let mut buf = BytesMut::from(&[0x50, 0x80, 0x80, 0x80, 0x80, 0x01][..]);
            assert!(next_packet(protocol, &mut buf).is_err(), "{protocol}");
        }
    }

    #[test]
    fn malformed_acks_are_errors_not_waits() {
        let cases: [&[u8]; 4] = [
            &[0x50, 0x01, 0x00],       // PUBREC with a one-byte packet id
            &[0x50, 0x00],             // PUBREC without a packet id
            &[0x00, 0x00],             // packet type 0
            &[0xF0, 0x02, 0x00, 0x01], // packet type 15 (AUTH, MQTT 5 only)
        ];
        for case in cases {
            let mut buf = BytesMut::from(case);
            assert!(
                next_packet(Protocol::V311, &mut buf).is_err(),
                "{case:02X?}"
            );
        }
    }

    fn table(pkid: u16) -> IdUse {
        match pkid {
            1 => IdUse::Published,
            2 => IdUse::Released,
            3 => IdUse::Status,
            4 => IdUse::Blocked,
            _ => IdUse::Free,
        }
    }

    fn v4(packet: Packet) -> In {
        let mut buf = BytesMut::from(&wire(&packet)[..]);
        next_packet(Protocol::V311, &mut buf).unwrap().unwrap()
    }

    /// Invariant 7: PUBREL only for an exchange we recorded.
    #[test]
    fn pubrec_releases_only_a_recorded_exchange() {
        let rec = |pkid| react(&v4(Packet::PubRec(PubRec::new(pkid))), 2, table);
        assert_eq!(rec(1), Reaction::Release(1));
        assert_eq!(rec(2), Reaction::ReleaseAgain(2));
        assert_eq!(rec(3), Reaction::IgnoreRec(3));
        assert_eq!(rec(4), Reaction::IgnoreRec(4));
        assert_eq!(rec(5), Reaction::Block(5));
        // A PUBREC for a QoS 1 exchange is not a release.
        assert_eq!(
            react(&v4(Packet::PubRec(PubRec::new(1))), 1, table),
            Reaction::IgnoreRec(1)
        );
    }

    #[test]
    fn a_failure_reason_code_refuses_the_exchange_and_never_releases() {
        let rec = |pkid, code| react(&In::PubRec { pkid, code }, 2, table);
        assert_eq!(
            rec(1, 0x87),
            Reaction::Refused {
                pkid: 1,
                code: 0x87
            }
        );
        assert_eq!(
            rec(1, 0x80),
            Reaction::Refused {
                pkid: 1,
                code: 0x80
            }
        );
        // "No matching subscribers" is a success.
        assert_eq!(rec(1, 0x10), Reaction::Release(1));
        assert_eq!(rec(2, 0x87), Reaction::IgnoreRec(2));
        assert_eq!(rec(5, 0x97), Reaction::IgnoreRec(5));
        let ack = |pkid, code| react(&In::PubAck { pkid, code }, 1, table);
        assert_eq!(
            ack(1, 0x87),
            Reaction::Refused {
                pkid: 1,
                code: 0x87
            }
        );
        assert_eq!(ack(1, 0x10), Reaction::Complete(1));
        assert_eq!(ack(1, 0), Reaction::Complete(1));
    }

    #[test]
    fn a_puback_for_a_qos_2_publish_means_the_broker_has_no_qos_2() {
        assert_eq!(
            react(&v4(Packet::PubAck(PubAck::new(1))), 2, table),
            Reaction::NoQos2(1)
        );
        assert_eq!(
            react(
                &In::PubAck {
                    pkid: 1,
                    code: 0x87
                },
                2,
                table
            ),
            Reaction::Refused {
                pkid: 1,
                code: 0x87
            }
        );
    }

    #[test]
    fn pubcomp_completes_only_a_released_exchange() {
        for qos in [1, 2] {
            for pkid in 0..=5 {
                let expected = if pkid == 2 {
                    Reaction::Complete(2)
                } else {
                    Reaction::IgnoreComp(pkid)
                };
                assert_eq!(
                    react(&v4(Packet::PubComp(PubComp::new(pkid))), qos, table),
                    expected
                );
            }
        }
        assert_eq!(
            react(
                &In::PubComp {
                    pkid: 2,
                    code: 0x92
                },
                2,
                table
            ),
            Reaction::Unknown(2)
        );
    }

    #[test]
    fn the_other_packets() {
        assert_eq!(
            react(&v4(Packet::PubAck(PubAck::new(3))), 2, table),
            Reaction::StatusAcked(3)
        );
        assert_eq!(
            react(&v4(Packet::PubAck(PubAck::new(2))), 2, table),
            Reaction::IgnoreAck(2)
        );
        assert_eq!(react(&In::PingResp, 2, table), Reaction::PingAnswered);
        assert_eq!(
            react(&v4(Packet::PubRel(PubRel::new(7))), 2, table),
            Reaction::AnswerPubRel(7)
        );
        assert_eq!(
            react(
                &In::Disconnect {
                    code: 0x9B,
                    reason: None
                },
                2,
                table
            ),
            Reaction::Disconnected(0x9B)
        );
        let connack = In::ConnAck(Default::default());
        assert_eq!(react(&connack, 2, table), Reaction::Unexpected("CONNACK"));
        let publish = v4(Packet::Publish(Publish::new("a", QoS::AtMostOnce, "72")));
        assert_eq!(react(&publish, 2, table), Reaction::Unexpected("PUBLISH"));
    }
}
