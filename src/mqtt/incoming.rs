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

/// Largest remaining length accepted from the broker (we only get small
/// acks).
pub const MAX_INCOMING: usize = 64 * 1024;
/// Largest whole packet accepted: the fixed header (type byte and at most
/// four bytes of remaining length) and [`MAX_INCOMING`].
pub const MAX_PACKET: usize = MAX_INCOMING + 5;

/// The next whole packet at the front of `buf`, or `None` when more bytes
/// are needed; then nothing was consumed, and `buf` has room reserved for
/// as much of the packet as its fixed header tells so far (never beyond
/// [`MAX_PACKET`] bytes in all).
/// An error leaves the stream unusable: drop the connection.
pub fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, rumqttc::Error> {
    match Packet::read(buf, MAX_INCOMING) {
        Ok(packet) => Ok(Some(packet)),
        Err(rumqttc::Error::InsufficientBytes(more)) => {
            buf.reserve(more);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a packet id is used for on the current connection, as far as a
/// packet from the broker is concerned (the publisher's slot, seen from
/// here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdUse {
    /// Not in use.
    Free,
    /// A QoS 2 exchange whose PUBLISH awaits PUBREC.
    Published,
    /// A QoS 2 exchange past PUBREC: PUBREL written, PUBCOMP awaited.
    Released,
    /// The QoS 1 status message, awaiting PUBACK.
    Status,
    /// An id the broker holds without our record: never used on this link.
    Blocked,
}

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
    /// PUBREC for the status message or a blocked id: ignored (WARN).
    IgnoreRec(u16),
    /// PUBCOMP for a released exchange: its readings are delivered and the
    /// id is free.
    Complete(u16),
    /// PUBCOMP for an id not released: ignored (WARN).
    IgnoreComp(u16),
    /// PUBACK of the status message: the id is free.
    StatusAcked(u16),
    /// PUBACK for anything else (e.g. a late duplicate): ignored silently.
    IgnoreAck(u16),
    /// PINGRESP: the broker has read everything before our PINGREQ.
    PingAnswered,
    /// PUBREL from the broker: we subscribe to nothing, but a broker that
    /// sends one waits for its PUBCOMP, so answer it.
    AnswerPubRel(u16),
    /// Any other packet, by its type: ignored (DEBUG).
    Unexpected(&'static str),
}

/// The publisher's reaction to `packet` on an established connection, given
/// what each packet id is used for.
pub fn react(packet: &Packet, id_use: impl Fn(u16) -> IdUse) -> Reaction {
    match packet {
        Packet::PubRec(rec) => match id_use(rec.pkid) {
            IdUse::Published => Reaction::Release(rec.pkid),
            IdUse::Released => Reaction::ReleaseAgain(rec.pkid),
            IdUse::Status | IdUse::Blocked => Reaction::IgnoreRec(rec.pkid),
            IdUse::Free => Reaction::Block(rec.pkid),
        },
        Packet::PubComp(comp) => match id_use(comp.pkid) {
            IdUse::Released => Reaction::Complete(comp.pkid),
            _ => Reaction::IgnoreComp(comp.pkid),
        },
        Packet::PubAck(ack) => match id_use(ack.pkid) {
            IdUse::Status => Reaction::StatusAcked(ack.pkid),
            _ => Reaction::IgnoreAck(ack.pkid),
        },
        Packet::PingResp => Reaction::PingAnswered,
        Packet::PubRel(rel) => Reaction::AnswerPubRel(rel.pkid),
        other => Reaction::Unexpected(kind(other)),
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
    use rumqttc::{ConnAck, ConnectReturnCode, PubAck, PubComp, PubRec, PubRel, Publish, QoS};

    use super::*;

    fn wire(packet: &Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).unwrap();
        buf.to_vec()
    }

    #[test]
    fn every_split_point_of_a_packet_waits_without_consuming() {
        let mut publish = Publish::new("hearth/v1/gw/readings", QoS::ExactlyOnce, vec![7; 300]);
        publish.pkid = 9;
        let bytes = wire(&Packet::Publish(publish.clone()));
        for split in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..split]);
            assert_eq!(next_packet(&mut buf).unwrap(), None, "split {split}");
            assert_eq!(&buf[..], &bytes[..split], "split {split} consumed bytes");
            // Once the fixed header (3 bytes here) is in, the whole packet
            // has room.
            assert!(split < 3 || buf.capacity() >= bytes.len(), "split {split}");
            buf.extend_from_slice(&bytes[split..]);
            assert_eq!(
                next_packet(&mut buf).unwrap(),
                Some(Packet::Publish(publish.clone()))
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
        assert!(matches!(
            next_packet(&mut buf),
            Ok(Some(Packet::Publish(_)))
        ));
        let mut buf = BytesMut::from(&wire(&publish(MAX_INCOMING - 2))[..]);
        assert!(matches!(
            next_packet(&mut buf),
            Err(rumqttc::Error::PayloadSizeLimitExceeded(n)) if n == MAX_INCOMING + 1
        ));
    }

    /// A 256 MB length prefix is refused from its five header bytes: no
    /// buffer is grown for a body that may never come.
    #[test]
    fn a_huge_length_prefix_is_refused_before_any_allocation() {
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        let capacity = buf.capacity();
        assert!(matches!(
            next_packet(&mut buf),
            Err(rumqttc::Error::PayloadSizeLimitExceeded(268_435_455))
        ));
        assert_eq!(buf.capacity(), capacity);
        // A fifth length byte is malformed, whatever it says.
        let mut buf = BytesMut::from(&[0x50, 0x80, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            next_packet(&mut buf),
            Err(rumqttc::Error::MalformedRemainingLength)
        ));
    }

    #[test]
    fn malformed_acks_are_errors_not_waits() {
        let cases: [&[u8]; 4] = [
            &[0x50, 0x01, 0x00],       // PUBREC with a one-byte packet id
            &[0x50, 0x00],             // PUBREC without a packet id
            &[0x00, 0x00],             // packet type 0
            &[0xF0, 0x02, 0x00, 0x01], // packet type 15
        ];
        for case in cases {
            let mut buf = BytesMut::from(case);
            assert!(next_packet(&mut buf).is_err(), "{case:02X?}");
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

    /// Invariant 7: PUBREL only for an exchange we recorded.
    #[test]
    fn pubrec_releases_only_a_recorded_exchange() {
        let rec = |pkid| react(&Packet::PubRec(PubRec::new(pkid)), table);
        assert_eq!(rec(1), Reaction::Release(1));
        assert_eq!(rec(2), Reaction::ReleaseAgain(2));
        assert_eq!(rec(3), Reaction::IgnoreRec(3));
        assert_eq!(rec(4), Reaction::IgnoreRec(4));
        assert_eq!(rec(5), Reaction::Block(5));
        assert_eq!(rec(0), Reaction::Block(0));
    }

    #[test]
    fn pubcomp_completes_only_a_released_exchange() {
        for pkid in 0..=5 {
            let expected = if pkid == 2 {
                Reaction::Complete(2)
            } else {
                Reaction::IgnoreComp(pkid)
            };
            assert_eq!(react(&Packet::PubComp(PubComp::new(pkid)), table), expected);
        }
    }

    #[test]
    fn the_other_packets() {
        assert_eq!(
            react(&Packet::PubAck(PubAck::new(3)), table),
            Reaction::StatusAcked(3)
        );
        assert_eq!(
            react(&Packet::PubAck(PubAck::new(1)), table),
            Reaction::IgnoreAck(1)
        );
        assert_eq!(react(&Packet::PingResp, table), Reaction::PingAnswered);
        assert_eq!(
            react(&Packet::PubRel(PubRel::new(7)), table),
            Reaction::AnswerPubRel(7)
        );
        let connack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true));
        assert_eq!(react(&connack, table), Reaction::Unexpected("CONNACK"));
        let publish = Packet::Publish(Publish::new("a", QoS::AtMostOnce, "72"));
        assert_eq!(react(&publish, table), Reaction::Unexpected("PUBLISH"));
    }
}
