//! PUBLISH (§3.3). The payload is split from the received bytes without a copy.

use bytes::{BufMut, Bytes, BytesMut};

use super::{check_properties, check_string, properties_len, read_packet_id, write_properties};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolError};
use crate::header::PacketType;
use crate::properties::{Place, Properties};
use crate::qos::{PacketId, QoS};
use crate::topic::{self, TopicError};
use crate::wire::{put_str, Reader};
use crate::Version;

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

/// A PUBLISH. `packet_id` is present exactly when `qos` is 1 or 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// A topic name; empty only in 5.0 with a Topic Alias property.
    pub topic: String,
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    pub payload: Bytes,
}

/// Checks a PUBLISH's topic name: in 5.0 an empty one stands for a Topic Alias (§3.3.2.1).
fn check_topic(topic: &str, properties: &Properties, version: Version) -> Result<(), DecodeError> {
    match topic::validate_name(topic) {
        Ok(()) => Ok(()),
        Err(TopicError::Empty) if version == Version::V5 => match properties.topic_alias {
            Some(_) => Ok(()),
            None => Err(ProtocolError::EmptyTopicWithoutAlias.into()),
        },
        Err(e) => Err(DecodeError::TopicNameInvalid(e)),
    }
}

impl Publish {
    /// Reads a PUBLISH body; `flags` are the fixed header's, already checked (QoS 3, DUP on QoS 0).
    pub(crate) fn read(r: &mut Reader, flags: u8, version: Version) -> Result<Publish, DecodeError> {
        let qos = QoS::from_bits((flags >> 1) & 0b11)?;
        let topic = r.string()?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(read_packet_id(r)?)
        };
        let properties = match version {
            Version::V311 => Properties::default(),
            Version::V5 => Properties::read(r, Place::Packet(PacketType::Publish))?,
        };
        check_topic(&topic, &properties, version)?;
        let payload = r.rest();
        Ok(Publish {
            dup: flags & DUP != 0,
            qos,
            retain: flags & RETAIN != 0,
            topic,
            packet_id,
            properties,
            payload,
        })
    }

    /// The fixed header's flags.
    pub(crate) fn flags(&self) -> u8 {
        let mut flags = (self.qos as u8) << 1;
        if self.dup {
            flags |= DUP;
        }
        if self.retain {
            flags |= RETAIN;
        }
        flags
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        if (self.qos == QoS::AtMostOnce) != self.packet_id.is_none() {
            return Err(EncodeError::PacketIdDoesNotFitQos);
        }
        if self.dup && self.qos == QoS::AtMostOnce {
            return Err(Malformed::DupWithQosZero.into());
        }
        check_string(&self.topic)?;
        check_properties(&self.properties, Place::Packet(PacketType::Publish), version)?;
        check_topic(&self.topic, &self.properties, version)?;
        Ok(())
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        2 + self.topic.len()
            + if self.packet_id.is_some() { 2 } else { 0 }
            + properties_len(&self.properties, version)
            + self.payload.len()
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        put_str(out, &self.topic);
        if let Some(id) = self.packet_id {
            out.put_u16(id.get());
        }
        write_properties(&self.properties, version, out);
        out.put_slice(&self.payload);
    }
}
