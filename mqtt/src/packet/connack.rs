//! CONNACK (§3.2). MQTT 3.1.1's return codes 0-5 are mapped onto the 5.0 reason codes the 5.0
//! spec gives for the same cases, so one type serves both versions.

use bytes::{BufMut, BytesMut};

use super::{check_properties, properties_len, write_properties};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolError};
use crate::header::PacketType;
use crate::properties::{Place, Properties};
use crate::reason::ReasonCode;
use crate::wire::Reader;
use crate::Version;

/// 3.1.1 return codes (§3.2.2.3) by value, as 5.0 reason codes.
const V311_RETURN_CODES: [ReasonCode; 6] = [
    ReasonCode::SUCCESS,
    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
    ReasonCode::SERVER_UNAVAILABLE,
    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
    ReasonCode::NOT_AUTHORIZED,
];

/// A CONNACK. In 3.1.1 `reason` is one of the six codes that have a return code and there are
/// no properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl ConnAck {
    pub(crate) fn read(r: &mut Reader, version: Version) -> Result<ConnAck, DecodeError> {
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(Malformed::ConnAckReservedFlags.into());
        }
        let session_present = flags & 1 != 0;
        let code = r.u8()?;
        let reason = match version {
            Version::V311 => *V311_RETURN_CODES
                .get(usize::from(code))
                .ok_or(Malformed::UnknownReturnCode(code))?,
            Version::V5 => ReasonCode::read(code, PacketType::ConnAck)?,
        };
        if session_present && reason != ReasonCode::SUCCESS {
            return Err(ProtocolError::SessionPresentOnError.into());
        }
        let properties = match version {
            Version::V311 => Properties::default(),
            Version::V5 => Properties::read(r, Place::Packet(PacketType::ConnAck))?,
        };
        r.finish()?;
        Ok(ConnAck {
            session_present,
            reason,
            properties,
        })
    }

    fn code(&self, version: Version) -> Option<u8> {
        match version {
            Version::V311 => V311_RETURN_CODES
                .iter()
                .position(|&c| c == self.reason)
                .map(|i| i as u8),
            Version::V5 => self
                .reason
                .allowed_in(PacketType::ConnAck)
                .then_some(self.reason.value()),
        }
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        if self.code(version).is_none() {
            let (code, packet) = (self.reason.value(), PacketType::ConnAck);
            return Err(match version {
                Version::V311 => EncodeError::NotInVersion {
                    what: "this CONNACK reason code",
                    version,
                },
                Version::V5 => Malformed::ReasonCodeNotAllowed { code, packet }.into(),
            });
        }
        if self.session_present && self.reason != ReasonCode::SUCCESS {
            return Err(ProtocolError::SessionPresentOnError.into());
        }
        check_properties(&self.properties, Place::Packet(PacketType::ConnAck), version)
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        2 + properties_len(&self.properties, version)
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        out.put_u8(u8::from(self.session_present));
        out.put_u8(self.code(version).unwrap_or(0x80));
        write_properties(&self.properties, version, out);
    }
}
