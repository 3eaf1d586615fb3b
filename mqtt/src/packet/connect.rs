//! CONNECT (§3.1): the first packet of a connection, which names the protocol version.

use bytes::{BufMut, Bytes, BytesMut};

use super::{check_binary, check_properties, check_string, properties_len, write_properties};
use crate::error::{DecodeError, EncodeError, Malformed};
use crate::header::PacketType;
use crate::properties::{Place, Properties};
use crate::qos::QoS;
use crate::topic;
use crate::version::PROTOCOL_NAME;
use crate::wire::{put_binary, put_str, Reader};
use crate::Version;

const CLEAN_START: u8 = 0b0000_0010;
const WILL: u8 = 0b0000_0100;
const WILL_RETAIN: u8 = 0b0010_0000;
const PASSWORD: u8 = 0b0100_0000;
const USER_NAME: u8 = 0b1000_0000;

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The version the CONNECT names; the rest of the connection is decoded in it.
    pub version: Version,
    /// Clean Session in 3.1.1, Clean Start in 5.0.
    pub clean_start: bool,
    /// Seconds; 0 turns keep alive off.
    pub keep_alive: u16,
    /// 5.0 only.
    pub properties: Properties,
    /// May be empty (the server assigns one, or refuses).
    pub client_id: String,
    pub will: Option<Will>,
    pub user_name: Option<String>,
    /// In 3.1.1 only with a user name ([MQTT-3.1.2-22]).
    pub password: Option<Bytes>,
}

/// The Will Message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub qos: QoS,
    pub retain: bool,
    /// 5.0 only: Will Delay Interval and the message's properties.
    pub properties: Properties,
    /// A topic name: no wildcards.
    pub topic: String,
    pub payload: Bytes,
}

impl Connect {
    /// Reads a CONNECT body; its protocol name and level decide the version of the rest.
    pub(crate) fn read(r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        let version = match Version::from_level(level) {
            Some(v) if name == PROTOCOL_NAME.as_bytes() => v,
            _ => {
                let name = String::from_utf8_lossy(&name).into_owned();
                return Err(DecodeError::UnsupportedProtocolVersion { name, level });
            }
        };
        let flags = r.u8()?;
        if flags & 1 != 0 {
            return Err(Malformed::ConnectReservedFlag.into());
        }
        let will_qos = QoS::from_bits((flags >> 3) & 0b11)?;
        let will_retain = flags & WILL_RETAIN != 0;
        let has_will = flags & WILL != 0;
        if !has_will && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(Malformed::WillFlagsWithoutWill.into());
        }
        if version == Version::V311 && flags & PASSWORD != 0 && flags & USER_NAME == 0 {
            return Err(Malformed::PasswordWithoutUserName.into());
        }
        let keep_alive = r.u16()?;
        let properties = match version {
            Version::V311 => Properties::default(),
            Version::V5 => Properties::read(r, Place::Packet(PacketType::Connect))?,
        };
        let client_id = r.string()?;
        let will = if has_will {
            let properties = match version {
                Version::V311 => Properties::default(),
                Version::V5 => Properties::read(r, Place::Will)?,
            };
            let topic = r.string()?;
            topic::validate_name(&topic).map_err(DecodeError::TopicNameInvalid)?;
            let payload = r.binary()?;
            Some(Will {
                qos: will_qos,
                retain: will_retain,
                properties,
                topic,
                payload,
            })
        } else {
            None
        };
        let user_name = if flags & USER_NAME != 0 {
            Some(r.string()?)
        } else {
            None
        };
        let password = if flags & PASSWORD != 0 {
            Some(r.binary()?)
        } else {
            None
        };
        r.finish()?;
        Ok(Connect {
            version,
            clean_start: flags & CLEAN_START != 0,
            keep_alive,
            properties,
            client_id,
            will,
            user_name,
            password,
        })
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        if self.version != version {
            return Err(EncodeError::VersionMismatch {
                packet: self.version,
                requested: version,
            });
        }
        check_properties(&self.properties, Place::Packet(PacketType::Connect), version)?;
        check_string(&self.client_id)?;
        if let Some(will) = &self.will {
            check_properties(&will.properties, Place::Will, version)?;
            check_string(&will.topic)?;
            topic::validate_name(&will.topic).map_err(DecodeError::TopicNameInvalid)?;
            check_binary(&will.payload)?;
        }
        if let Some(u) = &self.user_name {
            check_string(u)?;
        }
        if let Some(p) = &self.password {
            check_binary(p)?;
            if version == Version::V311 && self.user_name.is_none() {
                return Err(Malformed::PasswordWithoutUserName.into());
            }
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        let v = self.version;
        let mut len = 2 + PROTOCOL_NAME.len() + 1 + 1 + 2 + properties_len(&self.properties, v);
        len += 2 + self.client_id.len();
        if let Some(w) = &self.will {
            len += properties_len(&w.properties, v) + 2 + w.topic.len() + 2 + w.payload.len();
        }
        len += self.user_name.as_ref().map_or(0, |u| 2 + u.len());
        len += self.password.as_ref().map_or(0, |p| 2 + p.len());
        len
    }

    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean_start {
            flags |= CLEAN_START;
        }
        if let Some(w) = &self.will {
            flags |= WILL | ((w.qos as u8) << 3);
            if w.retain {
                flags |= WILL_RETAIN;
            }
        }
        if self.user_name.is_some() {
            flags |= USER_NAME;
        }
        if self.password.is_some() {
            flags |= PASSWORD;
        }
        flags
    }

    pub(crate) fn write(&self, out: &mut BytesMut) {
        let v = self.version;
        put_str(out, PROTOCOL_NAME);
        out.put_u8(v.level());
        out.put_u8(self.flags());
        out.put_u16(self.keep_alive);
        write_properties(&self.properties, v, out);
        put_str(out, &self.client_id);
        if let Some(w) = &self.will {
            write_properties(&w.properties, v, out);
            put_str(out, &w.topic);
            put_binary(out, &w.payload);
        }
        if let Some(u) = &self.user_name {
            put_str(out, u);
        }
        if let Some(p) = &self.password {
            put_binary(out, p);
        }
    }
}
