//! PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4-§3.7): a packet identifier, and in 5.0 an optional
//! reason code and properties.

use bytes::{BufMut, BytesMut};

use super::{check_reason_tail, read_packet_id, read_reason_tail, reason_tail_len, write_reason_tail};
use crate::error::{DecodeError, EncodeError};
use crate::header::PacketType;
use crate::properties::Properties;
use crate::qos::PacketId;
use crate::reason::ReasonCode;
use crate::wire::Reader;
use crate::Version;

/// The body of a PUBACK, PUBREC, PUBREL or PUBCOMP (which one is the [`Packet`](super::Packet)
/// variant). In 3.1.1 the reason is always Success and there are no properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Ack {
    /// An acknowledgement with reason Success and no properties.
    pub fn new(packet_id: PacketId) -> Ack {
        Ack {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }
    }

    pub(crate) fn read(r: &mut Reader, packet: PacketType, version: Version) -> Result<Ack, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let (reason, properties) = match version {
            Version::V311 => {
                r.finish()?;
                (ReasonCode::SUCCESS, Properties::default())
            }
            Version::V5 => read_reason_tail(r, packet)?,
        };
        Ok(Ack {
            packet_id,
            reason,
            properties,
        })
    }

    pub(crate) fn check(&self, packet: PacketType, version: Version) -> Result<(), EncodeError> {
        match version {
            Version::V311 if self.reason != ReasonCode::SUCCESS => Err(EncodeError::NotInVersion {
                what: "a reason code",
                version,
            }),
            Version::V311 if !self.properties.is_empty() => Err(EncodeError::NotInVersion {
                what: "properties",
                version,
            }),
            Version::V311 => Ok(()),
            Version::V5 => check_reason_tail(self.reason, &self.properties, packet),
        }
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        match version {
            Version::V311 => 2,
            Version::V5 => 2 + reason_tail_len(self.reason, &self.properties),
        }
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if version == Version::V5 {
            write_reason_tail(self.reason, &self.properties, out);
        }
    }
}
