//! UNSUBSCRIBE (§3.10) and UNSUBACK (§3.11).

use bytes::{BufMut, BytesMut};

use super::{check_filter, check_properties, check_string, properties_len, read_packet_id, write_properties};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolError};
use crate::header::PacketType;
use crate::properties::{Place, Properties};
use crate::qos::PacketId;
use crate::reason::ReasonCode;
use crate::wire::{put_str, Reader};
use crate::Version;

/// An UNSUBSCRIBE: at least one topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    /// 5.0: user properties only.
    pub properties: Properties,
    pub filters: Vec<String>,
}

impl Unsubscribe {
    pub(crate) fn read(r: &mut Reader, version: Version) -> Result<Unsubscribe, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = match version {
            Version::V311 => Properties::default(),
            Version::V5 => Properties::read(r, Place::Packet(PacketType::Unsubscribe))?,
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.string()?;
            check_filter(&filter, version).map_err(DecodeError::TopicFilterInvalid)?;
            filters.push(filter);
        }
        if filters.is_empty() {
            return Err(ProtocolError::NoTopicFilters(PacketType::Unsubscribe).into());
        }
        Ok(Unsubscribe {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        check_properties(&self.properties, Place::Packet(PacketType::Unsubscribe), version)?;
        if self.filters.is_empty() {
            return Err(ProtocolError::NoTopicFilters(PacketType::Unsubscribe).into());
        }
        for f in &self.filters {
            check_string(f)?;
            check_filter(f, version).map_err(DecodeError::TopicFilterInvalid)?;
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        2 + properties_len(&self.properties, version)
            + self.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        write_properties(&self.properties, version, out);
        for f in &self.filters {
            put_str(out, f);
        }
    }
}

/// An UNSUBACK. In 3.1.1 it carries only the packet identifier: no properties, no reason codes.
/// In 5.0 one reason code per topic filter, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub reasons: Vec<ReasonCode>,
}

impl UnsubAck {
    pub(crate) fn read(r: &mut Reader, version: Version) -> Result<UnsubAck, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let mut ack = UnsubAck {
            packet_id,
            properties: Properties::default(),
            reasons: Vec::new(),
        };
        if version == Version::V311 {
            r.finish()?;
            return Ok(ack);
        }
        ack.properties = Properties::read(r, Place::Packet(PacketType::UnsubAck))?;
        while !r.is_empty() {
            ack.reasons.push(ReasonCode::read(r.u8()?, PacketType::UnsubAck)?);
        }
        if ack.reasons.is_empty() {
            return Err(ProtocolError::NoReasonCodes(PacketType::UnsubAck).into());
        }
        Ok(ack)
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        check_properties(&self.properties, Place::Packet(PacketType::UnsubAck), version)?;
        match version {
            Version::V311 if !self.reasons.is_empty() => Err(EncodeError::NotInVersion {
                what: "UNSUBACK reason codes",
                version,
            }),
            Version::V311 => Ok(()),
            Version::V5 if self.reasons.is_empty() => {
                Err(ProtocolError::NoReasonCodes(PacketType::UnsubAck).into())
            }
            Version::V5 => match self.reasons.iter().find(|c| !c.allowed_in(PacketType::UnsubAck)) {
                Some(c) => Err(Malformed::ReasonCodeNotAllowed {
                    code: c.value(),
                    packet: PacketType::UnsubAck,
                }
                .into()),
                None => Ok(()),
            },
        }
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        match version {
            Version::V311 => 2,
            Version::V5 => 2 + self.properties.encoded_len() + self.reasons.len(),
        }
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version == Version::V5 {
            self.properties.write(out);
            for c in &self.reasons {
                out.put_u8(c.value());
            }
        }
    }
}
