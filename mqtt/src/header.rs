//! The fixed header (3.1.1 and 5.0 §2.1): packet type, flags and Remaining Length.

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError, Malformed, ProtocolError};
use crate::qos::QoS;
use crate::wire::{peek_varint, put_varint, varint_len, VarintPeek, VARINT_MAX};
use crate::Version;

/// The type of an MQTT control packet (the high nibble of its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    /// MQTT 5.0 only; type 15 is reserved in 3.1.1.
    Auth = 15,
}

impl PacketType {
    /// The type of a high nibble. `version` is `None` before CONNECT, when any 5.0 type is read
    /// (the caller then refuses everything but CONNECT).
    fn from_nibble(nibble: u8, version: Option<Version>) -> Result<PacketType, Malformed> {
        use PacketType::*;
        Ok(match nibble {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            15 if version != Some(Version::V311) => Auth,
            _ => return Err(Malformed::ReservedPacketType(nibble)),
        })
    }

    /// The flags every packet but PUBLISH must carry (§2.1.3 table): 0b0010 for PUBREL,
    /// SUBSCRIBE and UNSUBSCRIBE, 0 for the others.
    fn fixed_flags(self) -> u8 {
        match self {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        }
    }
}

/// A decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FixedHeader {
    pub packet_type: PacketType,
    /// The low nibble of the first byte (only PUBLISH's vary).
    pub flags: u8,
    /// Bytes of the fixed header: the first byte and the Remaining Length.
    pub header_len: usize,
    /// The Remaining Length: bytes of the variable header and payload.
    pub remaining: usize,
}

impl FixedHeader {
    /// Bytes of the whole packet.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Reads the fixed header at the start of `src`, which may be a prefix of the stream: `Ok(None)`
/// until the Remaining Length is complete. The first byte is checked as soon as it arrives.
pub(crate) fn peek_header(src: &[u8], version: Option<Version>) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = src.first() else {
        return Ok(None);
    };
    let packet_type = PacketType::from_nibble(first >> 4, version)?;
    let flags = first & 0x0f;
    match version {
        None if packet_type != PacketType::Connect => {
            return Err(ProtocolError::FirstPacketNotConnect(packet_type).into())
        }
        Some(_) if packet_type == PacketType::Connect => return Err(ProtocolError::SecondConnect.into()),
        _ => {}
    }
    if packet_type == PacketType::Publish {
        let qos = QoS::from_bits((flags >> 1) & 0b11)?;
        if qos == QoS::AtMostOnce && flags & 0b1000 != 0 {
            return Err(Malformed::DupWithQosZero.into());
        }
    } else if flags != packet_type.fixed_flags() {
        return Err(Malformed::InvalidFlags {
            packet: packet_type,
            flags,
        }
        .into());
    }
    match peek_varint(&src[1..])? {
        VarintPeek::Incomplete => Ok(None),
        VarintPeek::Done(remaining, len) => Ok(Some(FixedHeader {
            packet_type,
            flags,
            header_len: 1 + len,
            remaining: remaining as usize,
        })),
    }
}

/// Writes a fixed header for a body of `remaining` bytes; `flags` is PUBLISH's, ignored for
/// the other types.
pub(crate) fn put_header(
    out: &mut BytesMut,
    packet_type: PacketType,
    flags: u8,
    remaining: usize,
) -> Result<(), EncodeError> {
    let len = u32::try_from(remaining)
        .ok()
        .filter(|&l| l <= VARINT_MAX)
        .ok_or(EncodeError::PacketTooLarge { len: remaining })?;
    let flags = if packet_type == PacketType::Publish {
        flags
    } else {
        packet_type.fixed_flags()
    };
    out.reserve(1 + varint_len(len) + remaining);
    out.put_u8(((packet_type as u8) << 4) | flags);
    put_varint(out, len);
    Ok(())
}
