//! AUTH (5.0 §3.15): extended authentication exchange; MQTT 3.1.1 has no such packet.

use bytes::BytesMut;

use super::{check_reason_tail, read_reason_tail, reason_tail_len, write_reason_tail};
use crate::error::{DecodeError, EncodeError};
use crate::header::PacketType;
use crate::properties::Properties;
use crate::reason::ReasonCode;
use crate::wire::Reader;
use crate::Version;

/// An AUTH: Success, Continue authentication or Re-authenticate, with the authentication method
/// and data in its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Auth {
    /// Only called for 5.0: the fixed header refuses type 15 in 3.1.1.
    pub(crate) fn read(r: &mut Reader) -> Result<Auth, DecodeError> {
        let (reason, properties) = read_reason_tail(r, PacketType::Auth)?;
        Ok(Auth { reason, properties })
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        match version {
            Version::V311 => Err(EncodeError::NotInVersion {
                what: "AUTH",
                version,
            }),
            Version::V5 => check_reason_tail(self.reason, &self.properties, PacketType::Auth),
        }
    }

    pub(crate) fn body_len(&self) -> usize {
        reason_tail_len(self.reason, &self.properties)
    }

    pub(crate) fn write(&self, out: &mut BytesMut) {
        write_reason_tail(self.reason, &self.properties, out);
    }
}
