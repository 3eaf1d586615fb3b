//! Why bytes could not be decoded or a packet encoded.
//!
//! [`DecodeError`]'s variants follow the spec's classes of failure, so a server can answer with
//! the right CONNACK or DISCONNECT reason code ([`DecodeError::reason_code`]) before it closes
//! the connection. MQTT 3.1.1 has no DISCONNECT from the server: there a server closes the
//! connection, except that a CONNECT of an unsupported version is answered CONNACK return code
//! 0x01 first ([MQTT-3.1.2-2]).

use crate::header::PacketType;
use crate::reason::ReasonCode;
use crate::topic::TopicError;
use crate::Version;

/// Why the bytes of a stream are not a valid MQTT packet. Each one ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The fixed header announces a packet larger than the receiver accepts; refused before its
    /// body arrives. `size` counts the whole packet, fixed header included, as MQTT 5.0's Maximum
    /// Packet Size does (§3.1.2.11.4).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// A CONNECT names a protocol or level this codec does not speak (only "MQTT" level 4 and 5;
    /// MQTT 3.1's "MQIsdp" level 3 lands here).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocolVersion { name: String, level: u8 },
    /// The bytes break the packet format (5.0 reason code 0x81).
    #[error("malformed packet: {0}")]
    Malformed(#[from] Malformed),
    /// The packet is well-formed but breaks a rule of the protocol (5.0 reason code 0x82).
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// A PUBLISH (or a Will, or a Response Topic) names an invalid topic (5.0 reason code 0x90).
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(TopicError),
    /// A SUBSCRIBE or UNSUBSCRIBE carries an invalid topic filter (5.0 reason code 0x8F).
    #[error("invalid topic filter: {0}")]
    TopicFilterInvalid(TopicError),
}

impl DecodeError {
    /// The MQTT 5.0 reason code a server sends (in CONNACK when the failing packet was the
    /// CONNECT, in DISCONNECT otherwise) before closing the connection.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::Malformed(_) => ReasonCode::MALFORMED_PACKET,
            DecodeError::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::TopicNameInvalid(_) => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::TopicFilterInvalid(_) => ReasonCode::TOPIC_FILTER_INVALID,
        }
    }
}

/// How a packet breaks the format (MQTT 5.0 "Malformed Packet").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("variable byte integer longer than four bytes")]
    VarintTooLong,
    #[error("variable byte integer not in its shortest encoding")]
    VarintNotMinimal,
    #[error("a field runs past the end of the packet")]
    Truncated,
    #[error("{0} bytes after the last field of the packet")]
    TrailingBytes(usize),
    #[error("string is not well-formed UTF-8")]
    InvalidUtf8,
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for {packet:?}")]
    InvalidFlags { packet: PacketType, flags: u8 },
    #[error("QoS 3")]
    QosThree,
    #[error("DUP set on a QoS 0 PUBLISH")]
    DupWithQosZero,
    #[error("CONNECT reserved flag set")]
    ConnectReservedFlag,
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    #[error("password flag set without the user name flag")]
    PasswordWithoutUserName,
    #[error("CONNACK acknowledge flags reserved bits set")]
    ConnAckReservedFlags,
    #[error("unknown CONNACK return code {0}")]
    UnknownReturnCode(u8),
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    #[error("property {id:#04x} may not appear in {packet:?}")]
    PropertyNotAllowed { id: u8, packet: PacketType },
    #[error("reason code {code:#04x} may not appear in {packet:?}")]
    ReasonCodeNotAllowed { code: u8, packet: PacketType },
    #[error("subscription options reserved bits set")]
    SubscribeOptionsReserved,
}

/// How a well-formed packet breaks a rule of the protocol (MQTT 5.0 "Protocol Error").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the first packet must be CONNECT, got {0:?}")]
    FirstPacketNotConnect(PacketType),
    #[error("second CONNECT on a connection")]
    SecondConnect,
    #[error("packet identifier 0")]
    PacketIdZero,
    #[error("property {0:#04x} included more than once")]
    DuplicateProperty(u8),
    #[error("property {id:#04x} has the invalid value {value}")]
    InvalidPropertyValue { id: u8, value: u32 },
    #[error("authentication data without an authentication method")]
    AuthDataWithoutMethod,
    #[error("{0:?} without any topic filter")]
    NoTopicFilters(PacketType),
    #[error("{0:?} without any reason code")]
    NoReasonCodes(PacketType),
    #[error("retain handling 3")]
    RetainHandlingThree,
    #[error("no local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    #[error("session present set on a refused connection")]
    SessionPresentOnError,
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
}

/// Why a packet could not be encoded. Nothing is written to the output then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The packet breaks a rule a receiver checks; encoding it would only get the connection
    /// closed.
    #[error("a receiver would refuse the packet: {0}")]
    Invalid(#[from] DecodeError),
    /// A string or binary field is longer than its two-byte length prefix can say.
    #[error("field of {len} bytes is longer than 65535")]
    FieldTooLong { len: usize },
    /// The Remaining Length would exceed 268,435,455.
    #[error("packet body of {len} bytes exceeds the maximum remaining length")]
    PacketTooLarge { len: usize },
    /// The packet carries something the version has no encoding for (AUTH, properties, reason
    /// codes or subscription options in MQTT 3.1.1).
    #[error("{what} cannot be encoded in {version:?}")]
    NotInVersion { what: &'static str, version: Version },
    /// A CONNECT is encoded for a version other than the one it names.
    #[error("CONNECT of {packet:?} encoded as {requested:?}")]
    VersionMismatch { packet: Version, requested: Version },
    /// A PUBLISH has a packet identifier with QoS 0 or none with QoS 1 or 2.
    #[error("PUBLISH packet identifier does not fit its QoS")]
    PacketIdDoesNotFitQos,
}

impl From<Malformed> for EncodeError {
    fn from(e: Malformed) -> Self {
        EncodeError::Invalid(e.into())
    }
}

impl From<ProtocolError> for EncodeError {
    fn from(e: ProtocolError) -> Self {
        EncodeError::Invalid(e.into())
    }
}
