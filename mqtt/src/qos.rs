//! Quality of service and packet identifiers.

use std::num::NonZeroU16;

use crate::error::Malformed;

/// A packet identifier: never 0 ([MQTT-2.2.1-3] in 3.1.1 and 5.0), so the type cannot hold 0.
pub type PacketId = NonZeroU16;

/// A delivery guarantee (QoS bits of PUBLISH, Will QoS, subscription QoS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS of two bits; 3 is malformed everywhere a QoS appears.
    pub fn from_bits(bits: u8) -> Result<QoS, Malformed> {
        match bits {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(Malformed::QosThree),
        }
    }
}
