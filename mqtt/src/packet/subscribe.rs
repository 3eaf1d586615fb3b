//! SUBSCRIBE (§3.8) and SUBACK (§3.9).

use bytes::{BufMut, BytesMut};

use super::{check_filter, check_properties, check_string, properties_len, read_packet_id, write_properties};
use crate::error::{DecodeError, EncodeError, Malformed, ProtocolError};
use crate::header::PacketType;
use crate::properties::{Place, Properties};
use crate::qos::{PacketId, QoS};
use crate::reason::ReasonCode;
use crate::wire::{put_str, Reader};
use crate::Version;

/// What the server does with retained messages when the subscription is made (5.0 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send them (the only behaviour of 3.1.1).
    #[default]
    SendAtSubscribe = 0,
    /// 1: send them only if the subscription did not exist.
    SendAtNewSubscribe = 1,
    /// 2: do not send them.
    DoNotSend = 2,
}

/// The Subscription Options byte. In 3.1.1 only `qos` exists; the other fields must keep their
/// defaults there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    /// 5.0: do not send this client its own messages.
    pub no_local: bool,
    /// 5.0: keep the RETAIN flag of forwarded messages.
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with `qos` and every 5.0 option at its default (3.1.1's meaning).
    pub fn new(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }

    /// The options of a Subscription Options byte as `version` reads it (what [`Self::byte`]
    /// wrote; a listener that keeps a subscription stores the byte).
    pub fn from_byte(byte: u8, version: Version) -> Result<SubscriptionOptions, DecodeError> {
        Self::read(byte, version)
    }

    fn read(byte: u8, version: Version) -> Result<SubscriptionOptions, DecodeError> {
        let reserved = match version {
            Version::V311 => 0b1111_1100,
            Version::V5 => 0b1100_0000,
        };
        if byte & reserved != 0 {
            return Err(Malformed::SubscribeOptionsReserved.into());
        }
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtNewSubscribe,
            2 => RetainHandling::DoNotSend,
            _ => return Err(ProtocolError::RetainHandlingThree.into()),
        };
        Ok(SubscriptionOptions {
            qos: QoS::from_bits(byte & 0b11)?,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        })
    }

    /// The Subscription Options byte.
    pub fn byte(self) -> u8 {
        self.qos as u8
            | u8::from(self.no_local) << 2
            | u8::from(self.retain_as_published) << 3
            | (self.retain_handling as u8) << 4
    }
}

/// One topic filter of a SUBSCRIBE and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// A topic filter; in 5.0 possibly a shared subscription `$share/{name}/{filter}`.
    pub filter: String,
    pub options: SubscriptionOptions,
}

/// A SUBSCRIBE: at least one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    /// 5.0: at most one Subscription Identifier, and user properties.
    pub properties: Properties,
    pub subscriptions: Vec<Subscription>,
}

/// Checks a subscription as a receiver does.
fn check_subscription(s: &Subscription, version: Version) -> Result<(), DecodeError> {
    let shared = check_filter(&s.filter, version).map_err(DecodeError::TopicFilterInvalid)?;
    if shared && s.options.no_local {
        return Err(ProtocolError::NoLocalOnSharedSubscription.into());
    }
    Ok(())
}

impl Subscribe {
    pub(crate) fn read(r: &mut Reader, version: Version) -> Result<Subscribe, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = match version {
            Version::V311 => Properties::default(),
            Version::V5 => Properties::read(r, Place::Packet(PacketType::Subscribe))?,
        };
        let mut subscriptions = Vec::new();
        while !r.is_empty() {
            let filter = r.string()?;
            let options = SubscriptionOptions::read(r.u8()?, version)?;
            let s = Subscription { filter, options };
            check_subscription(&s, version)?;
            subscriptions.push(s);
        }
        if subscriptions.is_empty() {
            return Err(ProtocolError::NoTopicFilters(PacketType::Subscribe).into());
        }
        Ok(Subscribe {
            packet_id,
            properties,
            subscriptions,
        })
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        check_properties(&self.properties, Place::Packet(PacketType::Subscribe), version)?;
        if self.subscriptions.is_empty() {
            return Err(ProtocolError::NoTopicFilters(PacketType::Subscribe).into());
        }
        for s in &self.subscriptions {
            check_string(&s.filter)?;
            if version == Version::V311 && s.options != SubscriptionOptions::new(s.options.qos) {
                return Err(EncodeError::NotInVersion {
                    what: "subscription options besides QoS",
                    version,
                });
            }
            check_subscription(s, version)?;
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        2 + properties_len(&self.properties, version)
            + self
                .subscriptions
                .iter()
                .map(|s| 2 + s.filter.len() + 1)
                .sum::<usize>()
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        write_properties(&self.properties, version, out);
        for s in &self.subscriptions {
            put_str(out, &s.filter);
            out.put_u8(s.options.byte());
        }
    }
}

/// A SUBACK: one reason code per subscription, in order. 3.1.1's return codes 0x00, 0x01, 0x02
/// and 0x80 (Failure) are the 5.0 codes of the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub reasons: Vec<ReasonCode>,
}

/// The return codes of a 3.1.1 SUBACK (§3.9.3).
const V311_CODES: [ReasonCode; 4] = [
    ReasonCode::GRANTED_QOS_0,
    ReasonCode::GRANTED_QOS_1,
    ReasonCode::GRANTED_QOS_2,
    ReasonCode::UNSPECIFIED_ERROR,
];

fn suback_code_ok(code: ReasonCode, version: Version) -> bool {
    match version {
        Version::V311 => V311_CODES.contains(&code),
        Version::V5 => code.allowed_in(PacketType::SubAck),
    }
}

impl SubAck {
    pub(crate) fn read(r: &mut Reader, version: Version) -> Result<SubAck, DecodeError> {
        let packet_id = read_packet_id(r)?;
        let properties = match version {
            Version::V311 => Properties::default(),
            Version::V5 => Properties::read(r, Place::Packet(PacketType::SubAck))?,
        };
        let mut reasons = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let code = r.u8()?;
            match ReasonCode::from_u8(code).filter(|&c| suback_code_ok(c, version)) {
                Some(c) => reasons.push(c),
                None => {
                    return Err(Malformed::ReasonCodeNotAllowed {
                        code,
                        packet: PacketType::SubAck,
                    }
                    .into())
                }
            }
        }
        if reasons.is_empty() {
            return Err(ProtocolError::NoReasonCodes(PacketType::SubAck).into());
        }
        Ok(SubAck {
            packet_id,
            properties,
            reasons,
        })
    }

    pub(crate) fn check(&self, version: Version) -> Result<(), EncodeError> {
        check_properties(&self.properties, Place::Packet(PacketType::SubAck), version)?;
        if self.reasons.is_empty() {
            return Err(ProtocolError::NoReasonCodes(PacketType::SubAck).into());
        }
        if let Some(c) = self.reasons.iter().find(|&&c| !suback_code_ok(c, version)) {
            return Err(Malformed::ReasonCodeNotAllowed {
                code: c.value(),
                packet: PacketType::SubAck,
            }
            .into());
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: Version) -> usize {
        2 + properties_len(&self.properties, version) + self.reasons.len()
    }

    pub(crate) fn write(&self, version: Version, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        write_properties(&self.properties, version, out);
        for c in &self.reasons {
            out.put_u8(c.value());
        }
    }
}
