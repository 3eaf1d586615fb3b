//! MQTT 5.0 properties (§2.2.2): every property identifier of the spec, where each may appear,
//! which may repeat and which values are valid.
//!
//! One [`Properties`] struct serves every packet, with a field per property; which fields a
//! packet may carry is checked on decode and on encode ([`Place`]), not by the type. A property
//! that appears twice where the spec forbids it is a protocol error; an identifier the packet may
//! not carry is a malformed packet (§2.2.2.2).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError, Malformed, ProtocolError};
use crate::header::PacketType;
use crate::qos::QoS;
use crate::topic;
use crate::wire::{check_str, put_binary, put_str, put_varint, varint_len, Reader, STRING_MAX, VARINT_MAX};

/// The properties of one packet (or of a CONNECT's Will). `None` and empty vectors are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// 0x01: the payload is UTF-8 (`true`) or unspecified bytes (`false`).
    pub payload_format_indicator: Option<bool>,
    /// 0x02: seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03.
    pub content_type: Option<String>,
    /// 0x08: a topic name, no wildcards.
    pub response_topic: Option<String>,
    /// 0x09.
    pub correlation_data: Option<Bytes>,
    /// 0x0B: 1 to 268,435,455; several in a PUBLISH, at most one in a SUBSCRIBE.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11: seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x12.
    pub assigned_client_identifier: Option<String>,
    /// 0x13: seconds.
    pub server_keep_alive: Option<u16>,
    /// 0x15.
    pub authentication_method: Option<String>,
    /// 0x16: only with an authentication method.
    pub authentication_data: Option<Bytes>,
    /// 0x17.
    pub request_problem_information: Option<bool>,
    /// 0x18: seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x19.
    pub request_response_information: Option<bool>,
    /// 0x1A.
    pub response_information: Option<String>,
    /// 0x1C.
    pub server_reference: Option<String>,
    /// 0x1F.
    pub reason_string: Option<String>,
    /// 0x21: not 0.
    pub receive_maximum: Option<u16>,
    /// 0x22.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23: not 0.
    pub topic_alias: Option<u16>,
    /// 0x24: 0 or 1 only.
    pub maximum_qos: Option<QoS>,
    /// 0x25.
    pub retain_available: Option<bool>,
    /// 0x26: name and value, in order, may repeat.
    pub user_properties: Vec<(String, String)>,
    /// 0x27: not 0.
    pub maximum_packet_size: Option<u32>,
    /// 0x28.
    pub wildcard_subscription_available: Option<bool>,
    /// 0x29.
    pub subscription_identifier_available: Option<bool>,
    /// 0x2A.
    pub shared_subscription_available: Option<bool>,
}

/// Where a property list appears: a packet, or the Will of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Packet(PacketType),
    Will,
}

impl Place {
    fn packet(self) -> PacketType {
        match self {
            Place::Packet(p) => p,
            Place::Will => PacketType::Connect,
        }
    }
}

/// The value of one property, borrowed from [`Properties`].
enum Value<'a> {
    Byte(u8),
    Two(u16),
    Four(u32),
    Varint(u32),
    Str(&'a str),
    Bin(&'a [u8]),
    Pair(&'a str, &'a str),
}

/// Whether property `id` may appear in `place` (the table of 5.0 §2.2.2.2).
fn allowed(id: u8, place: Place) -> bool {
    use PacketType::*;
    let Place::Packet(packet) = place else {
        return matches!(id, 0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x18 | 0x26);
    };
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x23 => packet == Publish,
        0x0B => matches!(packet, Publish | Subscribe),
        0x11 => matches!(packet, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => packet == ConnAck,
        0x15 | 0x16 => matches!(packet, Connect | ConnAck | Auth),
        0x17 | 0x19 => packet == Connect,
        0x1C => matches!(packet, ConnAck | Disconnect),
        0x1F => matches!(
            packet,
            ConnAck | PubAck | PubRec | PubRel | PubComp | SubAck | UnsubAck | Disconnect | Auth
        ),
        0x21 | 0x22 | 0x27 => matches!(packet, Connect | ConnAck),
        0x26 => !matches!(packet, PingReq | PingResp),
        _ => false,
    }
}

fn byte_bool(b: bool) -> u8 {
    u8::from(b)
}

impl Properties {
    /// Whether no property is present.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Calls `f` with every present property, in identifier order.
    fn for_each<'a>(&'a self, mut f: impl FnMut(u8, Value<'a>)) {
        let p = self;
        if let Some(v) = p.payload_format_indicator {
            f(0x01, Value::Byte(byte_bool(v)));
        }
        if let Some(v) = p.message_expiry_interval {
            f(0x02, Value::Four(v));
        }
        if let Some(v) = &p.content_type {
            f(0x03, Value::Str(v));
        }
        if let Some(v) = &p.response_topic {
            f(0x08, Value::Str(v));
        }
        if let Some(v) = &p.correlation_data {
            f(0x09, Value::Bin(v));
        }
        for &v in &p.subscription_identifiers {
            f(0x0B, Value::Varint(v));
        }
        if let Some(v) = p.session_expiry_interval {
            f(0x11, Value::Four(v));
        }
        if let Some(v) = &p.assigned_client_identifier {
            f(0x12, Value::Str(v));
        }
        if let Some(v) = p.server_keep_alive {
            f(0x13, Value::Two(v));
        }
        if let Some(v) = &p.authentication_method {
            f(0x15, Value::Str(v));
        }
        if let Some(v) = &p.authentication_data {
            f(0x16, Value::Bin(v));
        }
        if let Some(v) = p.request_problem_information {
            f(0x17, Value::Byte(byte_bool(v)));
        }
        if let Some(v) = p.will_delay_interval {
            f(0x18, Value::Four(v));
        }
        if let Some(v) = p.request_response_information {
            f(0x19, Value::Byte(byte_bool(v)));
        }
        if let Some(v) = &p.response_information {
            f(0x1A, Value::Str(v));
        }
        if let Some(v) = &p.server_reference {
            f(0x1C, Value::Str(v));
        }
        if let Some(v) = &p.reason_string {
            f(0x1F, Value::Str(v));
        }
        if let Some(v) = p.receive_maximum {
            f(0x21, Value::Two(v));
        }
        if let Some(v) = p.topic_alias_maximum {
            f(0x22, Value::Two(v));
        }
        if let Some(v) = p.topic_alias {
            f(0x23, Value::Two(v));
        }
        if let Some(v) = p.maximum_qos {
            f(0x24, Value::Byte(v as u8));
        }
        if let Some(v) = p.retain_available {
            f(0x25, Value::Byte(byte_bool(v)));
        }
        for (k, v) in &p.user_properties {
            f(0x26, Value::Pair(k, v));
        }
        if let Some(v) = p.maximum_packet_size {
            f(0x27, Value::Four(v));
        }
        if let Some(v) = p.wildcard_subscription_available {
            f(0x28, Value::Byte(byte_bool(v)));
        }
        if let Some(v) = p.subscription_identifier_available {
            f(0x29, Value::Byte(byte_bool(v)));
        }
        if let Some(v) = p.shared_subscription_available {
            f(0x2A, Value::Byte(byte_bool(v)));
        }
    }

    /// The rules a receiver checks beyond the format of each value: the place, repetition of
    /// the Subscription Identifier, values the spec calls a protocol error.
    pub(crate) fn check(&self, place: Place) -> Result<(), DecodeError> {
        let mut not_allowed = None;
        self.for_each(|id, _| {
            if not_allowed.is_none() && !allowed(id, place) {
                not_allowed = Some(id);
            }
        });
        if let Some(id) = not_allowed {
            return Err(Malformed::PropertyNotAllowed {
                id,
                packet: place.packet(),
            }
            .into());
        }
        if place != Place::Packet(PacketType::Publish) && self.subscription_identifiers.len() > 1 {
            return Err(ProtocolError::DuplicateProperty(0x0B).into());
        }
        let invalid = |id: u8, value: u32| Err(ProtocolError::InvalidPropertyValue { id, value }.into());
        for &id in &self.subscription_identifiers {
            if id == 0 || id > VARINT_MAX {
                return invalid(0x0B, id);
            }
        }
        if self.receive_maximum == Some(0) {
            return invalid(0x21, 0);
        }
        if self.topic_alias == Some(0) {
            return invalid(0x23, 0);
        }
        if self.maximum_packet_size == Some(0) {
            return invalid(0x27, 0);
        }
        if self.maximum_qos == Some(QoS::ExactlyOnce) {
            return invalid(0x24, 2);
        }
        if self.authentication_data.is_some() && self.authentication_method.is_none() {
            return Err(ProtocolError::AuthDataWithoutMethod.into());
        }
        if let Some(t) = &self.response_topic {
            topic::validate_name(t).map_err(DecodeError::TopicNameInvalid)?;
        }
        Ok(())
    }

    /// Bytes of the property list, its length prefix excluded.
    fn body_len(&self) -> usize {
        let mut len = 0;
        self.for_each(|id, value| {
            len += varint_len(u32::from(id))
                + match value {
                    Value::Byte(_) => 1,
                    Value::Two(_) => 2,
                    Value::Four(_) => 4,
                    Value::Varint(v) => varint_len(v),
                    Value::Str(s) => 2 + s.len(),
                    Value::Bin(b) => 2 + b.len(),
                    Value::Pair(k, v) => 4 + k.len() + v.len(),
                };
        });
        len
    }

    /// Bytes of the property list with its length prefix, after [`Properties::check_encode`].
    pub(crate) fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body as u32) + body
    }

    /// Checks everything [`Properties::write`] relies on: the receiver's rules, string and
    /// binary lengths, no U+0000 in strings, a list length a Variable Byte Integer can hold.
    pub(crate) fn check_encode(&self, place: Place) -> Result<(), EncodeError> {
        self.check(place)?;
        let mut result = Ok(());
        let mut field = |len: usize, s: Option<&str>| {
            if result.is_ok() {
                if len > STRING_MAX {
                    result = Err(EncodeError::FieldTooLong { len });
                } else if let Some(Err(e)) = s.map(check_str) {
                    result = Err(e.into());
                }
            }
        };
        self.for_each(|_, value| match value {
            Value::Str(s) => field(s.len(), Some(s)),
            Value::Bin(b) => field(b.len(), None),
            Value::Pair(k, v) => {
                field(k.len(), Some(k));
                field(v.len(), Some(v));
            }
            Value::Byte(_) | Value::Two(_) | Value::Four(_) | Value::Varint(_) => {}
        });
        result?;
        let len = self.body_len();
        if len > VARINT_MAX as usize {
            return Err(EncodeError::PacketTooLarge { len });
        }
        Ok(())
    }

    /// Writes the property list with its length prefix, after [`Properties::check_encode`].
    pub(crate) fn write(&self, out: &mut BytesMut) {
        put_varint(out, self.body_len() as u32);
        self.for_each(|id, value| {
            put_varint(out, u32::from(id));
            match value {
                Value::Byte(v) => out.put_u8(v),
                Value::Two(v) => out.put_u16(v),
                Value::Four(v) => out.put_u32(v),
                Value::Varint(v) => put_varint(out, v),
                Value::Str(s) => put_str(out, s),
                Value::Bin(b) => put_binary(out, b),
                Value::Pair(k, v) => {
                    put_str(out, k);
                    put_str(out, v);
                }
            }
        });
    }

    /// Reads a property list (length prefix and properties) of a packet or Will at `place`.
    pub(crate) fn read(r: &mut Reader, place: Place) -> Result<Properties, DecodeError> {
        let mut r = r.sub_reader()?;
        let mut p = Properties::default();
        while !r.is_empty() {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| Malformed::UnknownProperty(id))?;
            if !allowed(id, place) {
                // An identifier the spec does not define is refused the same way.
                return Err(if allowed_anywhere(id) {
                    Malformed::PropertyNotAllowed {
                        id,
                        packet: place.packet(),
                    }
                } else {
                    Malformed::UnknownProperty(u32::from(id))
                }
                .into());
            }
            read_one(&mut r, id, &mut p)?;
        }
        p.check(place)?;
        Ok(p)
    }
}

fn allowed_anywhere(id: u8) -> bool {
    use PacketType::*;
    allowed(id, Place::Will)
        || [
            Connect,
            ConnAck,
            Publish,
            PubAck,
            Subscribe,
            Unsubscribe,
            Disconnect,
            Auth,
        ]
        .into_iter()
        .any(|p| allowed(id, Place::Packet(p)))
}

/// Sets `slot` once; a second occurrence is a protocol error.
fn once<T>(slot: &mut Option<T>, id: u8, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(ProtocolError::DuplicateProperty(id).into());
    }
    *slot = Some(value);
    Ok(())
}

fn read_bool(r: &mut Reader, id: u8) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(ProtocolError::InvalidPropertyValue {
            id,
            value: u32::from(v),
        }
        .into()),
    }
}

fn read_one(r: &mut Reader, id: u8, p: &mut Properties) -> Result<(), DecodeError> {
    match id {
        0x01 => once(&mut p.payload_format_indicator, id, read_bool(r, id)?),
        0x02 => once(&mut p.message_expiry_interval, id, r.u32()?),
        0x03 => once(&mut p.content_type, id, r.string()?),
        0x08 => once(&mut p.response_topic, id, r.string()?),
        0x09 => once(&mut p.correlation_data, id, r.binary()?),
        0x0B => {
            p.subscription_identifiers.push(r.varint()?);
            Ok(())
        }
        0x11 => once(&mut p.session_expiry_interval, id, r.u32()?),
        0x12 => once(&mut p.assigned_client_identifier, id, r.string()?),
        0x13 => once(&mut p.server_keep_alive, id, r.u16()?),
        0x15 => once(&mut p.authentication_method, id, r.string()?),
        0x16 => once(&mut p.authentication_data, id, r.binary()?),
        0x17 => once(&mut p.request_problem_information, id, read_bool(r, id)?),
        0x18 => once(&mut p.will_delay_interval, id, r.u32()?),
        0x19 => once(&mut p.request_response_information, id, read_bool(r, id)?),
        0x1A => once(&mut p.response_information, id, r.string()?),
        0x1C => once(&mut p.server_reference, id, r.string()?),
        0x1F => once(&mut p.reason_string, id, r.string()?),
        0x21 => once(&mut p.receive_maximum, id, r.u16()?),
        0x22 => once(&mut p.topic_alias_maximum, id, r.u16()?),
        0x23 => once(&mut p.topic_alias, id, r.u16()?),
        0x24 => {
            let qos = match r.u8()? {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                v => {
                    return Err(ProtocolError::InvalidPropertyValue {
                        id,
                        value: u32::from(v),
                    }
                    .into())
                }
            };
            once(&mut p.maximum_qos, id, qos)
        }
        0x25 => once(&mut p.retain_available, id, read_bool(r, id)?),
        0x26 => {
            let k = r.string()?;
            let v = r.string()?;
            p.user_properties.push((k, v));
            Ok(())
        }
        0x27 => once(&mut p.maximum_packet_size, id, r.u32()?),
        0x28 => once(&mut p.wildcard_subscription_available, id, read_bool(r, id)?),
        0x29 => once(&mut p.subscription_identifier_available, id, read_bool(r, id)?),
        0x2A => once(&mut p.shared_subscription_available, id, read_bool(r, id)?),
        _ => Err(Malformed::UnknownProperty(u32::from(id)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &'static [u8], place: Place) -> Result<Properties, DecodeError> {
        Properties::read(&mut Reader::new(Bytes::from_static(bytes)), place)
    }

    #[test]
    fn duplicates_are_refused_except_user_properties() {
        let connect = Place::Packet(PacketType::Connect);
        assert_eq!(
            read(&[6, 0x21, 0, 1, 0x21, 0, 2], connect),
            Err(ProtocolError::DuplicateProperty(0x21).into())
        );
        let p = read(&[11, 0x26, 0, 1, b'a', 0, 0, 0x26, 0, 0, 0, 0], connect).unwrap();
        assert_eq!(
            p.user_properties,
            vec![("a".into(), String::new()), (String::new(), String::new())]
        );
    }

    #[test]
    fn subscription_identifiers_repeat_only_in_publish() {
        let bytes = &[4, 0x0B, 1, 0x0B, 2];
        let p = read(bytes, Place::Packet(PacketType::Publish)).unwrap();
        assert_eq!(p.subscription_identifiers, vec![1, 2]);
        assert_eq!(
            read(bytes, Place::Packet(PacketType::Subscribe)),
            Err(ProtocolError::DuplicateProperty(0x0B).into())
        );
        assert_eq!(
            read(&[2, 0x0B, 0], Place::Packet(PacketType::Subscribe)),
            Err(ProtocolError::InvalidPropertyValue { id: 0x0B, value: 0 }.into())
        );
    }

    #[test]
    fn a_property_outside_its_packets_is_malformed() {
        assert_eq!(
            read(&[3, 0x23, 0, 1], Place::Packet(PacketType::Connect)),
            Err(Malformed::PropertyNotAllowed {
                id: 0x23,
                packet: PacketType::Connect
            }
            .into())
        );
        assert_eq!(
            read(&[5, 0x18, 0, 0, 0, 1], Place::Packet(PacketType::Connect)),
            Err(Malformed::PropertyNotAllowed {
                id: 0x18,
                packet: PacketType::Connect
            }
            .into())
        );
        assert!(read(&[5, 0x18, 0, 0, 0, 1], Place::Will).is_ok());
        assert_eq!(
            read(&[2, 0x04, 0], Place::Packet(PacketType::Publish)),
            Err(Malformed::UnknownProperty(0x04).into())
        );
    }

    #[test]
    fn protocol_error_values() {
        let connack = Place::Packet(PacketType::ConnAck);
        assert_eq!(
            read(&[2, 0x24, 2], connack),
            Err(ProtocolError::InvalidPropertyValue { id: 0x24, value: 2 }.into())
        );
        assert_eq!(
            read(&[2, 0x25, 7], connack),
            Err(ProtocolError::InvalidPropertyValue { id: 0x25, value: 7 }.into())
        );
        assert_eq!(
            read(&[3, 0x16, 0, 0], connack),
            Err(ProtocolError::AuthDataWithoutMethod.into())
        );
        assert_eq!(
            read(&[3, 0x21, 0, 0], connack),
            Err(ProtocolError::InvalidPropertyValue { id: 0x21, value: 0 }.into())
        );
    }

    #[test]
    fn encoded_len_matches_write() {
        let p = Properties {
            subscription_identifiers: vec![1, 200, VARINT_MAX],
            user_properties: vec![("k".into(), "v".into())],
            correlation_data: Some(Bytes::from_static(b"xyz")),
            message_expiry_interval: Some(7),
            ..Properties::default()
        };
        let place = Place::Packet(PacketType::Publish);
        p.check_encode(place).unwrap();
        let mut out = BytesMut::new();
        p.write(&mut out);
        assert_eq!(out.len(), p.encoded_len());
        assert_eq!(
            Properties::read(&mut Reader::new(out.freeze()), place).unwrap(),
            p
        );
    }
}
