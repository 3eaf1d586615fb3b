//! herald-mqtt's integration tests: the spec's own examples, hand-written byte vectors of every
//! packet in both versions, refusals, topic matching and property-based round trips.

mod errors;
mod roundtrip;
mod spec;
mod topic;
mod vectors_v311;
mod vectors_v5;

use bytes::BytesMut;
use herald_mqtt::{decode, encode, Packet, PacketId, Version};

/// A generous limit for tests that are not about size.
pub const MAX: usize = 1 << 20;

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("test packet ids are not 0")
}

/// Decodes `bytes` as one whole packet (`version` `None` for a CONNECT).
pub fn decode_all(bytes: &[u8], version: Option<Version>) -> Result<Packet, herald_mqtt::DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, MAX)?.expect("a complete packet");
    assert!(buf.is_empty(), "{} bytes left after {packet:?}", buf.len());
    Ok(packet)
}

/// `bytes`, written from the spec's field layout, decode to `packet` and `packet` encodes to
/// exactly `bytes`.
#[track_caller]
pub fn vector(version: Version, bytes: &[u8], packet: Packet) {
    let decode_version = if matches!(packet, Packet::Connect(_)) {
        None
    } else {
        Some(version)
    };
    assert_eq!(decode_all(bytes, decode_version).unwrap(), packet);
    let mut out = BytesMut::new();
    encode(&packet, version, &mut out).unwrap();
    assert_eq!(&out[..], bytes, "encoding of {packet:?}");
}
