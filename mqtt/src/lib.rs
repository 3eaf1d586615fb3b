//! MQTT 3.1.1 and MQTT 5.0 packets for Herald: a sans-IO codec of the 15 control packets, and
//! topic name and filter validation and matching. The first building block of an MQTT listener;
//! nothing here knows about sockets, sessions or Herald's own protocol.
//!
//! - [`decode`] reads at most one packet from the front of a [`bytes::BytesMut`] a connection
//!   fills; [`encode`] appends one packet to an output buffer.
//! - [`Packet`] and its bodies ([`Connect`], [`Publish`], ...) serve both versions; the 5.0-only
//!   parts ([`Properties`], reason codes other than success, subscription options besides QoS,
//!   [`Auth`]) are empty or default in 3.1.1, and [`encode`] refuses them there.
//! - [`topic`]: topic names, filters, shared subscriptions and matching (§4.7, §4.8.2).
//!
//! Section numbers (§) are those of the MQTT 5.0 OASIS Standard, and of 3.1.1 where they differ;
//! normative statements are cited by their `[MQTT-x.y.z-n]` tags.
//!
//! # Why our own codec
//!
//! The maintained Rust MQTT codecs live inside a client or broker: rumqttc and rumqttd each keep
//! their own copy of `mqttbytes`, ntex-mqtt is tied to the ntex runtime. The standalone crates
//! (`mqttbytes`, `mqttrs`) are unmaintained, and `mqttrs` speaks only 3.1.1. None offers both
//! versions with a packet size limit checked from the fixed header before the body is buffered,
//! payloads split from the read buffer as [`bytes::Bytes`] without a copy, and errors typed
//! finely enough to pick the CONNACK or DISCONNECT reason code, without pulling a runtime into
//! the tree. The format itself is small (a fixed header, five data types, 15 packets, 27
//! properties) and every rule of it can be tested here against the spec's own examples; this
//! crate depends on `bytes` and `thiserror` only. The cost is owning the spec reading: where we
//! chose between readings, the doc comment says so.
//!
//! # Guarantees
//!
//! - Decoding never panics on any input (proptest feeds it arbitrary bytes) and never buffers
//!   more than `max_packet` bytes of one packet.
//! - What [`encode`] writes, [`decode`] reads back as the same packet (proptest round trip for
//!   both versions); [`encode`] refuses a packet that [`decode`] would refuse.
//! - Strings are `String`s (one allocation per topic); binary fields and payloads are `Bytes`.
//!
//! # Not here
//!
//! Session state (packet identifier bookkeeping, topic alias maps, receive maximum, keep alive),
//! rules that depend on who sends a packet (a client must not send a Subscription Identifier in
//! PUBLISH, only a server sends CONNACK), and policy (client identifier rules, authentication).

mod codec;
mod error;
mod header;
mod packet;
mod properties;
mod qos;
mod reason;
pub mod topic;
mod version;
mod wire;

pub use codec::{decode, encode};
pub use error::{DecodeError, EncodeError, Malformed, ProtocolError};
pub use header::PacketType;
pub use packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Publish, RetainHandling, SubAck, Subscribe,
    Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
pub use properties::Properties;
pub use qos::{PacketId, QoS};
pub use reason::ReasonCode;
pub use version::{Version, PROTOCOL_NAME};
pub use wire::{STRING_MAX, VARINT_MAX};
