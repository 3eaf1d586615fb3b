//! DISCONNECT (§3.14): empty in 3.1.1; in 5.0 an optional reason code and properties, sent by
//! either side.

use bytes::BytesMut;

use super::{check_reason_tail, read_reason_tail, reason_tail_len, write_reason_tail};
use crate::error::{DecodeError, EncodeError};
use crate::header::PacketType;
use crate::properties::Properties;
use crate::reason::ReasonCode;
use crate::wire::Reader;
use crate::Version;

/// A DISCONNECT. In 3.1.1 the reason is always Normal disconnection and there are no properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Default for Disconnect {
    /// Normal disconnection without properties: the only DISCONNECT of 3.1.1.
    fn default() -> Self {
        Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }
    }
}

impl Disconnect {
    pub(crate) fn read(r: &mut Reader, version: Version) -> Result<Disconnect, DecodeError> {
        match version {
            Version::V311 => {
                r.finish()?;
                Ok(Disconnect::default())
            }
            Version::V5 => {
                let (reason, properties) = read_reason_tail(r, PacketType::Disconnect)?;
                Ok(Disconnect { reason, properties })
            }
        }
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        match version {
            Version::V311 if *self != Disconnect::default() => Err(EncodeError::NotInVersion {
                what: "a reason code or properties",
                version,
            }),
            Version::V311 => Ok(()),
            Version::V5 => check_reason_tail(self.reason, &self.properties, PacketType::Disconnect),
        }
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        match version {
            Version::V311 => 0,
            Version::V5 => reason_tail_len(self.reason, &self.properties),
        }
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        if version == Version::V5 {
            write_reason_tail(self.reason, &self.properties, out);
        }
    }
}
