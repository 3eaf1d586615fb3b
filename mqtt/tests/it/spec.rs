//! The examples the specs give: Remaining Length encodings, the UTF-8 string example and the
//! CONNECT variable header examples, each inside a complete packet built by hand.

use bytes::{Bytes, BytesMut};
use herald_mqtt::{
    decode, encode, Connect, DecodeError, Malformed, Packet, Properties, Publish, QoS, Version, Will,
};

use crate::{decode_all, MAX};

/// 3.1.1 §2.2.3 Table 2.4 / 5.0 §1.5.5: the bounds of each encoded length.
const REMAINING_LENGTHS: [(usize, &[u8]); 8] = [
    (0, &[0x00]),
    (127, &[0x7f]),
    (128, &[0x80, 0x01]),
    (16_383, &[0xff, 0x7f]),
    (16_384, &[0x80, 0x80, 0x01]),
    (2_097_151, &[0xff, 0xff, 0x7f]),
    (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
    (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
];

#[test]
fn remaining_length_table_is_decoded_from_the_header() {
    for (value, encoded) in REMAINING_LENGTHS {
        // A PUBLISH header alone: with a limit of 0 the decoder reports the size it read.
        let mut buf = BytesMut::from(&[0x30][..]);
        buf.extend_from_slice(encoded);
        let size = 1 + encoded.len() + value;
        assert_eq!(
            decode(&mut buf, Some(Version::V311), 0),
            Err(DecodeError::PacketTooLarge { size, max: 0 }),
            "{value}"
        );
    }
}

#[test]
fn remaining_length_table_is_encoded() {
    // Up to 2,097,152 a real packet is cheap enough to build: PINGREQ for 0, else a QoS 0
    // PUBLISH to "t" (3 bytes of topic) with the rest as payload.
    for (value, encoded) in &REMAINING_LENGTHS[..7] {
        let packet = if *value == 0 {
            Packet::PingReq
        } else {
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "t".into(),
                packet_id: None,
                properties: Properties::default(),
                payload: Bytes::from(vec![0u8; value - 3]),
            })
        };
        let mut out = BytesMut::new();
        encode(&packet, Version::V311, &mut out).unwrap();
        assert_eq!(&out[1..1 + encoded.len()], *encoded, "{value}");
        assert_eq!(out.len(), 1 + encoded.len() + value);
    }
}

#[test]
fn a_fifth_remaining_length_byte_is_refused() {
    let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
    assert_eq!(
        decode(&mut buf, Some(Version::V5), MAX),
        Err(Malformed::VarintTooLong.into())
    );
    // Refused as soon as the fourth byte says a fifth follows.
    let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0xff, 0x80][..]);
    assert_eq!(
        decode(&mut buf, Some(Version::V5), MAX),
        Err(Malformed::VarintTooLong.into())
    );
}

/// 3.1.1 §1.5.3 Figure 1.1: "A" then U+2A6D4 is 0x00 0x05 0x41 0xF0 0xAA 0x9B 0x94.
#[test]
fn utf8_string_example() {
    let string = [0x00, 0x05, 0x41, 0xf0, 0xaa, 0x9b, 0x94];
    let mut bytes = vec![0x30, 7 + 2];
    bytes.extend_from_slice(&string);
    bytes.extend_from_slice(b"hi");
    let Packet::Publish(p) = decode_all(&bytes, Some(Version::V311)).unwrap() else {
        panic!("not a PUBLISH")
    };
    assert_eq!(p.topic, "A\u{2A6D4}");
    assert_eq!(&p.payload[..], b"hi");
    let mut out = BytesMut::new();
    encode(&Packet::Publish(p), Version::V311, &mut out).unwrap();
    assert_eq!(&out[..], &bytes[..]);
}

/// The variable header both examples share, from the protocol name to the keep alive: "MQTT",
/// the level, flags 0b11001110 (user name, password, will QoS 1, will, clean) and keep alive 10.
fn variable_header(level: u8) -> Vec<u8> {
    vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0b1100_1110, 0x00, 0x0a]
}

/// A payload for those flags: client id "c", [will properties], will topic "w", will message "m",
/// user name "u", password "p".
fn payload(will_properties: &[u8]) -> Vec<u8> {
    let mut p = vec![0x00, 0x01, b'c'];
    p.extend_from_slice(will_properties);
    p.extend_from_slice(&[
        0x00, 0x01, b'w', 0x00, 0x01, b'm', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
    ]);
    p
}

fn packet(body: Vec<u8>) -> Vec<u8> {
    let mut bytes = vec![0x10, u8::try_from(body.len()).unwrap()];
    bytes.extend(body);
    bytes
}

fn expected(version: Version, properties: Properties) -> Connect {
    Connect {
        version,
        clean_start: true,
        keep_alive: 10,
        properties,
        client_id: "c".into(),
        will: Some(Will {
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            topic: "w".into(),
            payload: Bytes::from_static(b"m"),
        }),
        user_name: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
    }
}

/// 3.1.1 §3.1.2.10, Figure 3.6: the CONNECT variable header example.
#[test]
fn connect_variable_header_example_v311() {
    let mut body = variable_header(4);
    body.extend(payload(&[]));
    let bytes = packet(body);
    assert_eq!(bytes[1], 25);
    let connect = expected(Version::V311, Properties::default());
    assert_eq!(
        decode_all(&bytes, None).unwrap(),
        Packet::Connect(connect.clone())
    );
    let mut out = BytesMut::new();
    encode(&Packet::Connect(connect), Version::V311, &mut out).unwrap();
    assert_eq!(&out[..], &bytes[..]);
}

/// 5.0 §3.1.2.12 "Variable Header non-normative example": the same fields, level 5, then
/// Properties: length 5, Session Expiry Interval (17) of 10.
#[test]
fn connect_variable_header_example_v5() {
    let mut body = variable_header(5);
    body.extend_from_slice(&[0x05, 0x11, 0x00, 0x00, 0x00, 0x0a]);
    body.extend(payload(&[0x00]));
    let bytes = packet(body);
    let properties = Properties {
        session_expiry_interval: Some(10),
        ..Properties::default()
    };
    let connect = expected(Version::V5, properties);
    assert_eq!(
        decode_all(&bytes, None).unwrap(),
        Packet::Connect(connect.clone())
    );
    let mut out = BytesMut::new();
    encode(&Packet::Connect(connect), Version::V5, &mut out).unwrap();
    assert_eq!(&out[..], &bytes[..]);
}
