//! The control packets (chapter 3 of both specs), one file per packet or family.
//!
//! Each packet type has `read` (body of a complete packet, after the fixed header), and for
//! encoding `check` (everything that could make it fail, so nothing is written on error),
//! `body_len` (the Remaining Length) and `write`.

mod ack;
mod auth;
mod connack;
mod connect;
mod disconnect;
mod publish;
mod subscribe;
mod unsubscribe;

pub use ack::Ack;
pub use auth::Auth;
pub use connack::ConnAck;
pub use connect::{Connect, Will};
pub use disconnect::Disconnect;
pub use publish::Publish;
pub use subscribe::{RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions};
pub use unsubscribe::{UnsubAck, Unsubscribe};

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError, ProtocolError};
use crate::header::PacketType;
use crate::properties::{Place, Properties};
use crate::qos::PacketId;
use crate::reason::ReasonCode;
use crate::topic::{self, TopicError};
use crate::wire::{check_str, Reader, STRING_MAX};
use crate::Version;

/// One MQTT control packet of either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    /// MQTT 5.0 only.
    Auth(Auth),
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// Reads a packet identifier where the spec requires one: 0 is refused ([MQTT-2.2.1-3]).
pub(crate) fn read_packet_id(r: &mut Reader) -> Result<PacketId, DecodeError> {
    PacketId::new(r.u16()?).ok_or(DecodeError::Protocol(ProtocolError::PacketIdZero))
}

/// Checks a UTF-8 string field for encoding.
pub(crate) fn check_string(s: &str) -> Result<(), EncodeError> {
    check_binary(s.as_bytes())?;
    check_str(s)?;
    Ok(())
}

/// Checks a binary field for encoding.
pub(crate) fn check_binary(b: &[u8]) -> Result<(), EncodeError> {
    if b.len() > STRING_MAX {
        return Err(EncodeError::FieldTooLong { len: b.len() });
    }
    Ok(())
}

/// Refuses properties in MQTT 3.1.1, checks them in 5.0.
pub(crate) fn check_properties(p: &Properties, place: Place, version: Version) -> Result<(), EncodeError> {
    match version {
        Version::V311 if !p.is_empty() => Err(EncodeError::NotInVersion {
            what: "properties",
            version,
        }),
        Version::V311 => Ok(()),
        Version::V5 => p.check_encode(place),
    }
}

/// Bytes of a property list in `version` (none in 3.1.1).
pub(crate) fn properties_len(p: &Properties, version: Version) -> usize {
    match version {
        Version::V311 => 0,
        Version::V5 => p.encoded_len(),
    }
}

pub(crate) fn write_properties(p: &Properties, version: Version, out: &mut BytesMut) {
    if version == Version::V5 {
        p.write(out);
    }
}

/// Reads the optional Reason Code and Properties ending a 5.0 PUBACK, PUBREC, PUBREL, PUBCOMP,
/// DISCONNECT or AUTH: absent means Success and no properties (e.g. 5.0 §3.4.2.1, §3.14.2.1).
pub(crate) fn read_reason_tail(
    r: &mut Reader,
    packet: PacketType,
) -> Result<(ReasonCode, Properties), DecodeError> {
    if r.is_empty() {
        return Ok((ReasonCode::SUCCESS, Properties::default()));
    }
    let reason = ReasonCode::read(r.u8()?, packet)?;
    let properties = if r.is_empty() {
        Properties::default()
    } else {
        Properties::read(r, Place::Packet(packet))?
    };
    r.finish()?;
    Ok((reason, properties))
}

/// Checks a reason code and properties for the tail of `packet`.
pub(crate) fn check_reason_tail(
    reason: ReasonCode,
    properties: &Properties,
    packet: PacketType,
) -> Result<(), EncodeError> {
    if !reason.allowed_in(packet) {
        return Err(crate::error::Malformed::ReasonCodeNotAllowed {
            code: reason.value(),
            packet,
        }
        .into());
    }
    properties.check_encode(Place::Packet(packet))
}

/// Bytes of the shortest tail: nothing for Success without properties, the reason code alone
/// without properties.
pub(crate) fn reason_tail_len(reason: ReasonCode, properties: &Properties) -> usize {
    if properties.is_empty() {
        usize::from(reason != ReasonCode::SUCCESS)
    } else {
        1 + properties.encoded_len()
    }
}

pub(crate) fn write_reason_tail(reason: ReasonCode, properties: &Properties, out: &mut BytesMut) {
    if properties.is_empty() {
        if reason != ReasonCode::SUCCESS {
            out.put_u8(reason.value());
        }
    } else {
        out.put_u8(reason.value());
        properties.write(out);
    }
}

/// Checks a topic filter of a SUBSCRIBE or UNSUBSCRIBE: 5.0 knows shared subscriptions.
/// Returns whether the filter is a shared subscription.
pub(crate) fn check_filter(filter: &str, version: Version) -> Result<bool, TopicError> {
    if version == Version::V5 && topic::parse_shared(filter)?.is_some() {
        // parse_shared checked the share name and the filter; the length rules remain.
        topic::validate_filter(filter)?;
        return Ok(true);
    }
    topic::validate_filter(filter)?;
    Ok(false)
}
