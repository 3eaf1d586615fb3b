//! The protocol versions this codec speaks.

/// An MQTT protocol version, as the Protocol Level of a CONNECT names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Version {
    /// The Protocol Level byte of a CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }

    /// The version of a Protocol Level byte, if this codec speaks it. MQTT 3.1 (level 3, protocol
    /// name "MQIsdp") is not spoken.
    pub fn from_level(level: u8) -> Option<Version> {
        match level {
            4 => Some(Version::V311),
            5 => Some(Version::V5),
            _ => None,
        }
    }
}

/// The Protocol Name of a CONNECT in both versions.
pub const PROTOCOL_NAME: &str = "MQTT";
