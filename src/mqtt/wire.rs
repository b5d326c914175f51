//! hearth's view of MQTT packets, one for MQTT 3.1.1 and MQTT 5: the few
//! packets the publisher writes ([`Out`]) and the ones it reacts to
//! ([`In`]), encoded and decoded with rumqttc's codecs (`rumqttc::mqttbytes`
//! for 3.1.1, `rumqttc::v5::mqttbytes::v5` for 5). The publisher never sees
//! a protocol version: a 3.1.1 ack is an MQTT 5 ack with reason code 0.
//!
//! What MQTT 5 adds, and hearth uses:
//! - reason codes on PUBACK, PUBREC and PUBCOMP (0x80 and above is a
//!   refusal), on CONNACK and on the broker's DISCONNECT;
//! - from CONNACK: Receive Maximum, Maximum Packet Size, Maximum QoS, Topic
//!   Alias Maximum;
//! - on CONNECT: Session Expiry Interval; on the will: Will Delay Interval;
//! - on every PUBLISH: Content Type and a `schema` user property, and a
//!   topic alias when the broker allows one ([`Aliases`]).

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as m5;

/// Largest remaining length accepted from the broker (we only get small
/// acks).
pub const MAX_INCOMING: usize = 64 * 1024;
/// Largest whole packet accepted: the fixed header (type byte and at most
/// four bytes of remaining length) and [`MAX_INCOMING`].
pub const MAX_PACKET: usize = MAX_INCOMING + 5;

/// The MQTT version spoken on a connection (`mqtt.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[default]
    #[serde(rename = "5")]
    V5,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "MQTT 3.1.1",
            Protocol::V5 => "MQTT 5",
        })
    }
}

/// A PUBLISH as hearth writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    /// 1 or 2.
    pub qos: u8,
    pub pkid: u16,
    pub dup: bool,
    pub retain: bool,
    /// MQTT 5 Content Type (ignored under 3.1.1).
    pub content_type: Option<&'static str>,
    /// MQTT 5 user properties (ignored under 3.1.1).
    pub properties: Vec<(&'static str, String)>,
}

/// The last will, published by the broker when the link dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval, seconds.
    pub delay_secs: u32,
    pub content_type: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub client_id: String,
    pub keep_alive: u16,
    /// Clean session (3.1.1) or Clean Start (5).
    pub clean: bool,
    pub will: Will,
    /// MQTT 5 Session Expiry Interval, seconds (3.1.1 keeps a session for
    /// as long as the broker likes).
    pub session_expiry_secs: u32,
}

/// What hearth writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Connect(Box<Connect>),
    Publish(Publish),
    PubRel(u16),
    PubComp(u16),
    PingReq,
    Disconnect,
}

/// What the broker's CONNACK says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// 0 is success. 3.1.1 return codes 1 to 5 are mapped to their MQTT 5
    /// reason codes (e.g. 4, bad user name or password, to 0x86).
    pub code: u8,
    /// The code's name, for messages.
    pub reason: &'static str,
    pub reason_string: Option<String>,
    pub receive_max: Option<u16>,
    pub max_packet_size: Option<u32>,
    pub max_qos: Option<u8>,
    pub topic_alias_max: Option<u16>,
    pub session_expiry_secs: Option<u32>,
}

/// What hearth reads, once connected. Reason codes are MQTT 5's (0 under
/// 3.1.1); 0x80 and above is a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    ConnAck(ConnAck),
    PubAck {
        pkid: u16,
        code: u8,
    },
    PubRec {
        pkid: u16,
        code: u8,
    },
    PubComp {
        pkid: u16,
        code: u8,
    },
    PubRel {
        pkid: u16,
    },
    PingResp,
    /// MQTT 5 only: the broker's reason for closing the link.
    Disconnect {
        code: u8,
        reason: Option<String>,
    },
    /// Any other packet, by its type: never its content.
    Other(&'static str),
}

impl In {
    /// The packet's type, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            In::ConnAck(_) => "CONNACK",
            In::PubAck { .. } => "PUBACK",
            In::PubRec { .. } => "PUBREC",
            In::PubComp { .. } => "PUBCOMP",
            In::PubRel { .. } => "PUBREL",
            In::PingResp => "PINGRESP",
            In::Disconnect { .. } => "DISCONNECT",
            In::Other(kind) => kind,
        }
    }
}

/// A packet the codec refused: the stream is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

/// The next whole packet at the front of `buf`, or `None` when more bytes
/// are needed; then nothing was consumed, and `buf` has room reserved for
/// as much of the packet as its fixed header tells so far (never beyond
/// [`MAX_PACKET`] bytes in all). A length prefix beyond [`MAX_INCOMING`] is
/// refused from the fixed header alone, before any of its body is awaited.
pub fn next_packet(protocol: Protocol, buf: &mut BytesMut) -> Result<Option<In>, WireError> {
    let before = buf.len();
    let read = match protocol {
        Protocol::V311 => match rumqttc::Packet::read(buf, MAX_INCOMING) {
            Ok(packet) => Ok(from_v4(packet)),
            Err(rumqttc::Error::InsufficientBytes(more)) => Err(more),
            Err(e) => return Err(WireError(format!("{e:?}"))),
        },
        // A CONNACK of remaining length 2 is MQTT 3.1.1's (MQTT 5 always
        // has a property length): a broker that speaks 3.1.1 only answers
        // our MQTT 5 CONNECT with one, return code 1, "unacceptable
        // protocol version".
        Protocol::V5 if buf.len() >= 4 && buf[..2] == [0x20, 0x02] => {
            match rumqttc::Packet::read(buf, MAX_INCOMING) {
                Ok(packet) => Ok(from_v4(packet)),
                Err(e) => return Err(WireError(format!("{e:?}"))),
            }
        }
        Protocol::V5 => match m5::Packet::read(buf, Some(MAX_INCOMING as u32)) {
            Ok(packet) => Ok(from_v5(packet)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(more)) => Err(more),
            Err(e) => return Err(WireError(format!("{e:?}"))),
        },
    };
    match read {
        Ok(packet) => Ok(Some(packet)),
        // The codecs also say "insufficient bytes" for a field that runs
        // past the end of a packet already framed (and taken from the
        // buffer): that packet is malformed, not incomplete.
        Err(_) if buf.len() != before => {
            Err(WireError("a field runs past the end of its packet".into()))
        }
        Err(more) => {
            buf.reserve(more);
            Ok(None)
        }
    }
}

fn from_v4(packet: rumqttc::Packet) -> In {
    use rumqttc::Packet as P;
    match packet {
        P::ConnAck(ack) => In::ConnAck(ConnAck {
            session_present: ack.session_present,
            code: v4_connack_code(ack.code),
            reason: v4_connack_name(ack.code),
            ..ConnAck::default()
        }),
        P::PubAck(a) => In::PubAck {
            pkid: a.pkid,
            code: 0,
        },
        P::PubRec(a) => In::PubRec {
            pkid: a.pkid,
            code: 0,
        },
        P::PubComp(a) => In::PubComp {
            pkid: a.pkid,
            code: 0,
        },
        P::PubRel(a) => In::PubRel { pkid: a.pkid },
        P::PingResp => In::PingResp,
        P::Connect(..) => In::Other("CONNECT"),
        P::Publish(_) => In::Other("PUBLISH"),
        P::Subscribe(_) => In::Other("SUBSCRIBE"),
        P::SubAck(_) => In::Other("SUBACK"),
        P::Unsubscribe(_) => In::Other("UNSUBSCRIBE"),
        P::UnsubAck(_) => In::Other("UNSUBACK"),
        P::PingReq => In::Other("PINGREQ"),
        P::Disconnect => In::Other("DISCONNECT"),
    }
}

fn from_v5(packet: m5::Packet) -> In {
    use m5::Packet as P;
    match packet {
        P::ConnAck(ack) => {
            let mut out = ConnAck {
                session_present: ack.session_present,
                code: v5_connack_code(ack.code),
                reason: v5_connack_name(ack.code),
                ..ConnAck::default()
            };
            if let Some(props) = ack.properties {
                out.reason_string = props.reason_string;
                out.receive_max = props.receive_max;
                out.max_packet_size = props.max_packet_size;
                out.max_qos = props.max_qos;
                out.topic_alias_max = props.topic_alias_max;
                out.session_expiry_secs = props.session_expiry_interval;
            }
            In::ConnAck(out)
        }
        P::PubAck(a) => In::PubAck {
            pkid: a.pkid,
            code: puback_code(a.reason),
        },
        P::PubRec(a) => In::PubRec {
            pkid: a.pkid,
            code: pubrec_code(a.reason),
        },
        P::PubComp(a) => In::PubComp {
            pkid: a.pkid,
            code: match a.reason {
                m5::PubCompReason::Success => 0x00,
                m5::PubCompReason::PacketIdentifierNotFound => 0x92,
            },
        },
        P::PubRel(a) => In::PubRel { pkid: a.pkid },
        P::PingResp(_) => In::PingResp,
        P::Disconnect(d) => In::Disconnect {
            code: d.reason_code as u8,
            reason: d.properties.and_then(|p| p.reason_string),
        },
        P::Auth(_) => In::Other("AUTH"),
        P::Connect(..) => In::Other("CONNECT"),
        P::Publish(_) => In::Other("PUBLISH"),
        P::Subscribe(_) => In::Other("SUBSCRIBE"),
        P::SubAck(_) => In::Other("SUBACK"),
        P::Unsubscribe(_) => In::Other("UNSUBSCRIBE"),
        P::UnsubAck(_) => In::Other("UNSUBACK"),
        P::PingReq(_) => In::Other("PINGREQ"),
    }
}

fn puback_code(r: m5::PubAckReason) -> u8 {
    use m5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code(r: m5::PubRecReason) -> u8 {
    use m5::PubRecReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// The name of an MQTT 5 reason code on PUBACK, PUBREC, PUBCOMP or
/// DISCONNECT, for messages.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "Success",
        0x04 => "Disconnect with Will Message",
        0x10 => "No matching subscribers",
        0x80 => "Unspecified error",
        0x81 => "Malformed Packet",
        0x82 => "Protocol Error",
        0x83 => "Implementation specific error",
        0x87 => "Not authorized",
        0x89 => "Server busy",
        0x8B => "Server shutting down",
        0x8D => "Keep Alive timeout",
        0x8E => "Session taken over",
        0x90 => "Topic Name invalid",
        0x91 => "Packet Identifier in use",
        0x92 => "Packet Identifier not found",
        0x93 => "Receive Maximum exceeded",
        0x94 => "Topic Alias invalid",
        0x95 => "Packet too large",
        0x96 => "Message rate too high",
        0x97 => "Quota exceeded",
        0x98 => "Administrative action",
        0x99 => "Payload format invalid",
        0x9A => "Retain not supported",
        0x9B => "QoS not supported",
        0x9C => "Use another server",
        0x9D => "Server moved",
        0x9F => "Connection rate exceeded",
        _ => "unknown reason code",
    }
}

fn v4_connack_code(code: rumqttc::ConnectReturnCode) -> u8 {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::Success => 0x00,
        C::RefusedProtocolVersion => 0x84,
        C::BadClientId => 0x85,
        C::ServiceUnavailable => 0x88,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
    }
}

fn v4_connack_name(code: rumqttc::ConnectReturnCode) -> &'static str {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::Success => "Success",
        C::RefusedProtocolVersion => "RefusedProtocolVersion",
        C::BadClientId => "BadClientId",
        C::ServiceUnavailable => "ServiceUnavailable",
        C::BadUserNamePassword => "BadUserNamePassword",
        C::NotAuthorized => "NotAuthorized",
    }
}

fn v5_connack_code(code: m5::ConnectReturnCode) -> u8 {
    use m5::ConnectReturnCode as C;
    match code {
        C::Success => 0x00,
        C::RefusedProtocolVersion => 0x84,
        C::BadClientId => 0x85,
        C::ServiceUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::UnsupportedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn v5_connack_name(code: m5::ConnectReturnCode) -> &'static str {
    use m5::ConnectReturnCode as C;
    match code {
        C::Success => "Success",
        C::RefusedProtocolVersion => "RefusedProtocolVersion",
        C::BadClientId => "BadClientId",
        C::ServiceUnavailable => "ServiceUnavailable",
        C::UnspecifiedError => "UnspecifiedError",
        C::MalformedPacket => "MalformedPacket",
        C::ProtocolError => "ProtocolError",
        C::ImplementationSpecificError => "ImplementationSpecificError",
        C::UnsupportedProtocolVersion => "UnsupportedProtocolVersion",
        C::ClientIdentifierNotValid => "ClientIdentifierNotValid",
        C::BadUserNamePassword => "BadUserNamePassword",
        C::NotAuthorized => "NotAuthorized",
        C::ServerUnavailable => "ServerUnavailable",
        C::ServerBusy => "ServerBusy",
        C::Banned => "Banned",
        C::BadAuthenticationMethod => "BadAuthenticationMethod",
        C::TopicNameInvalid => "TopicNameInvalid",
        C::PacketTooLarge => "PacketTooLarge",
        C::QuotaExceeded => "QuotaExceeded",
        C::PayloadFormatInvalid => "PayloadFormatInvalid",
        C::RetainNotSupported => "RetainNotSupported",
        C::QoSNotSupported => "QoSNotSupported",
        C::UseAnotherServer => "UseAnotherServer",
        C::ServerMoved => "ServerMoved",
        C::ConnectionRateExceeded => "ConnectionRateExceeded",
    }
}

/// Topic aliases for one MQTT 5 connection: the broker's Topic Alias
/// Maximum bounds them; a topic gets the next free alias on its first
/// PUBLISH (sent with its name and the alias), and later PUBLISHes carry
/// the alias and an empty name. A new connection starts with none.
#[derive(Debug, Default)]
pub struct Aliases {
    max: u16,
    given: Vec<String>,
}

impl Aliases {
    pub fn new(max: u16) -> Aliases {
        Aliases {
            max,
            given: Vec::new(),
        }
    }

    /// `(name to send, alias)` for `topic`.
    fn route<'a>(&mut self, topic: &'a str) -> (&'a str, Option<u16>) {
        if let Some(i) = self.given.iter().position(|t| t == topic) {
            return ("", Some(i as u16 + 1));
        }
        if (self.given.len() as u16) < self.max {
            self.given.push(topic.to_owned());
            return (topic, Some(self.given.len() as u16));
        }
        (topic, None)
    }
}

/// Encodes `packet` into `buf`; fails if it exceeds `max` bytes.
pub fn write(
    protocol: Protocol,
    packet: &Out,
    aliases: &mut Aliases,
    buf: &mut BytesMut,
    max: usize,
) -> Result<usize, WireError> {
    let err = |e: &dyn std::fmt::Debug| WireError(format!("{e:?}"));
    match protocol {
        Protocol::V311 => to_v4(packet).write(buf, max).map_err(|e| err(&e)),
        Protocol::V5 => to_v5(packet, aliases)
            .write(buf, Some(max as u32))
            .map_err(|e| err(&e)),
    }
}

fn v4_qos(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn to_v4(packet: &Out) -> rumqttc::Packet {
    use rumqttc::Packet as P;
    match packet {
        Out::Connect(c) => {
            let mut connect = rumqttc::Connect::new(c.client_id.clone());
            connect.keep_alive = c.keep_alive;
            connect.clean_session = c.clean;
            connect.last_will = Some(rumqttc::LastWill::new(
                c.will.topic.clone(),
                c.will.payload.clone(),
                rumqttc::QoS::AtLeastOnce,
                c.will.retain,
            ));
            P::Connect(connect)
        }
        Out::Publish(p) => {
            let mut publish =
                rumqttc::Publish::from_bytes(&p.topic, v4_qos(p.qos), p.payload.clone());
            publish.pkid = p.pkid;
            publish.dup = p.dup;
            publish.retain = p.retain;
            P::Publish(publish)
        }
        Out::PubRel(pkid) => P::PubRel(rumqttc::PubRel::new(*pkid)),
        Out::PubComp(pkid) => P::PubComp(rumqttc::PubComp::new(*pkid)),
        Out::PingReq => P::PingReq,
        Out::Disconnect => P::Disconnect,
    }
}

fn to_v5(packet: &Out, aliases: &mut Aliases) -> m5::Packet {
    use m5::Packet as P;
    match packet {
        Out::Connect(c) => {
            let connect = m5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_start: c.clean,
                properties: Some(m5::ConnectProperties {
                    session_expiry_interval: Some(c.session_expiry_secs),
                    // hearth sends no aliases the broker did not offer, and
                    // takes none.
                    topic_alias_max: Some(0),
                    // A reason string on acks says why a PUBLISH was
                    // refused.
                    request_problem_info: Some(1),
                    ..m5::ConnectProperties::new()
                }),
            };
            let will = m5::LastWill {
                topic: Bytes::from(c.will.topic.clone()),
                message: c.will.payload.clone(),
                qos: v5_qos(1),
                retain: c.will.retain,
                properties: Some(m5::LastWillProperties {
                    delay_interval: (c.will.delay_secs > 0).then_some(c.will.delay_secs),
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: c.will.content_type.map(str::to_owned),
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                }),
            };
            P::Connect(connect, Some(will), None)
        }
        Out::Publish(p) => {
            let (name, alias) = aliases.route(&p.topic);
            let properties = m5::PublishProperties {
                payload_format_indicator: None,
                message_expiry_interval: None,
                topic_alias: alias,
                response_topic: None,
                correlation_data: None,
                user_properties: p
                    .properties
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
                subscription_identifiers: Vec::new(),
                content_type: p.content_type.map(str::to_owned),
            };
            P::Publish(m5::Publish {
                dup: p.dup,
                qos: v5_qos(p.qos),
                retain: p.retain,
                topic: Bytes::from(name.to_owned()),
                pkid: p.pkid,
                payload: p.payload.clone(),
                properties: Some(properties),
            })
        }
        Out::PubRel(pkid) => P::PubRel(m5::PubRel::new(*pkid, None)),
        Out::PubComp(pkid) => P::PubComp(m5::PubComp::new(*pkid, None)),
        Out::PingReq => P::PingReq(m5::PingReq),
        Out::Disconnect => P::Disconnect(m5::Disconnect::new(
            m5::DisconnectReasonCode::NormalDisconnection,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, qos: u8) -> Publish {
        Publish {
            topic: topic.into(),
            payload: Bytes::from_static(b"{\"a\":1}"),
            qos,
            pkid: 7,
            dup: true,
            retain: false,
            content_type: Some("application/json"),
            properties: vec![("schema", "1".into())],
        }
    }

    #[test]
    fn a_v5_publish_carries_content_type_schema_and_an_alias_after_its_first_use() {
        let mut aliases = Aliases::new(2);
        let mut first = BytesMut::new();
        write(
            Protocol::V5,
            &Out::Publish(publish("h/v1/gw/readings", 2)),
            &mut aliases,
            &mut first,
            1 << 20,
        )
        .unwrap();
        let mut second = BytesMut::new();
        write(
            Protocol::V5,
            &Out::Publish(publish("h/v1/gw/readings", 2)),
            &mut aliases,
            &mut second,
            1 << 20,
        )
        .unwrap();
        assert!(
            second.len() + "h/v1/gw/readings".len() == first.len(),
            "{} vs {}",
            second.len(),
            first.len()
        );
        let m5::Packet::Publish(p) = m5::Packet::read(&mut first, None).unwrap() else {
            panic!("not a PUBLISH");
        };
        let props = p.properties.unwrap();
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            props.user_properties,
            [("schema".to_owned(), "1".to_owned())]
        );
        assert_eq!(props.topic_alias, Some(1));
        assert_eq!(&p.topic[..], b"h/v1/gw/readings");
        assert!(p.dup);
        let m5::Packet::Publish(p) = m5::Packet::read(&mut second, None).unwrap() else {
            panic!("not a PUBLISH");
        };
        assert!(p.topic.is_empty());
        assert_eq!(p.properties.unwrap().topic_alias, Some(1));
    }

    #[test]
    fn no_alias_without_the_brokers_leave_or_under_311() {
        let mut aliases = Aliases::new(0);
        let mut buf = BytesMut::new();
        write(
            Protocol::V5,
            &Out::Publish(publish("t", 1)),
            &mut aliases,
            &mut buf,
            1 << 20,
        )
        .unwrap();
        let m5::Packet::Publish(p) = m5::Packet::read(&mut buf, None).unwrap() else {
            panic!("not a PUBLISH");
        };
        assert_eq!(p.properties.unwrap().topic_alias, None);
        let mut buf = BytesMut::new();
        write(
            Protocol::V311,
            &Out::Publish(publish("t", 2)),
            &mut Aliases::new(9),
            &mut buf,
            1 << 20,
        )
        .unwrap();
        let rumqttc::Packet::Publish(p) = rumqttc::Packet::read(&mut buf, usize::MAX).unwrap()
        else {
            panic!("not a PUBLISH");
        };
        assert_eq!(p.topic, "t");
        assert_eq!((p.pkid, p.dup, p.qos), (7, true, rumqttc::QoS::ExactlyOnce));
    }

    #[test]
    fn v5_acks_carry_their_reason_codes() {
        let mut buf = BytesMut::new();
        let mut rec = m5::PubRec::new(3, None);
        rec.reason = m5::PubRecReason::NotAuthorized;
        m5::Packet::PubRec(rec).write(&mut buf, None).unwrap();
        let mut ack = m5::PubAck::new(4, None);
        ack.reason = m5::PubAckReason::QuotaExceeded;
        m5::Packet::PubAck(ack).write(&mut buf, None).unwrap();
        m5::Packet::PubRec(m5::PubRec::new(5, None))
            .write(&mut buf, None)
            .unwrap();
        let got: Vec<In> =
            std::iter::from_fn(|| next_packet(Protocol::V5, &mut buf).unwrap()).collect();
        assert_eq!(
            got,
            [
                In::PubRec {
                    pkid: 3,
                    code: 0x87
                },
                In::PubAck {
                    pkid: 4,
                    code: 0x97
                },
                In::PubRec { pkid: 5, code: 0 },
            ]
        );
    }

    #[test]
    fn a_3_1_1_connack_refusing_the_protocol_version_is_read_under_mqtt_5() {
        let mut buf = BytesMut::from(&[0x20, 0x02, 0x00, 0x01][..]);
        let Some(In::ConnAck(ack)) = next_packet(Protocol::V5, &mut buf).unwrap() else {
            panic!("not a CONNACK");
        };
        assert_eq!((ack.code, ack.reason), (0x84, "RefusedProtocolVersion"));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_v5_connack_gives_the_brokers_limits() {
        let mut buf = BytesMut::new();
        let props = m5::ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(10),
            max_qos: Some(1),
            retain_available: None,
            max_packet_size: Some(4096),
            assigned_client_identifier: None,
            topic_alias_max: Some(5),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        };
        let ack = m5::ConnAck {
            session_present: true,
            code: m5::ConnectReturnCode::Success,
            properties: Some(props),
        };
        m5::Packet::ConnAck(ack).write(&mut buf, None).unwrap();
        let Some(In::ConnAck(ack)) = next_packet(Protocol::V5, &mut buf).unwrap() else {
            panic!("not a CONNACK");
        };
        assert!(ack.session_present);
        assert_eq!(ack.code, 0);
        assert_eq!(
            (
                ack.receive_max,
                ack.max_packet_size,
                ack.max_qos,
                ack.topic_alias_max
            ),
            (Some(10), Some(4096), Some(1), Some(5))
        );
    }

    #[test]
    fn a_v5_connect_has_session_expiry_and_will_delay() {
        let connect = Connect {
            client_id: "gw".into(),
            keep_alive: 30,
            clean: false,
            will: Will {
                topic: "h/v1/gw/status".into(),
                payload: Bytes::from_static(b"{}"),
                retain: true,
                delay_secs: 5,
                content_type: Some("application/json"),
            },
            session_expiry_secs: 3600,
        };
        let mut buf = BytesMut::new();
        write(
            Protocol::V5,
            &Out::Connect(Box::new(connect)),
            &mut Aliases::default(),
            &mut buf,
            1 << 20,
        )
        .unwrap();
        let m5::Packet::Connect(c, will, _) = m5::Packet::read(&mut buf, None).unwrap() else {
            panic!("not a CONNECT");
        };
        assert!(!c.clean_start);
        assert_eq!(c.properties.unwrap().session_expiry_interval, Some(3600));
        let will = will.unwrap();
        assert!(will.retain);
        assert_eq!(will.properties.unwrap().delay_interval, Some(5));
    }
}
