//! What the decoder refuses, how it classifies it, and how it treats partial input.

use bytes::{Bytes, BytesMut};
use herald_mqtt::topic::TopicError;
use herald_mqtt::{
    decode, encode, Auth, DecodeError, EncodeError, Malformed, Packet, PacketType, Properties, ProtocolError,
    Publish, QoS, ReasonCode, Version,
};

use crate::{decode_all, pid, MAX};

const V311: Option<Version> = Some(Version::V311);
const V5: Option<Version> = Some(Version::V5);

fn flags(packet: PacketType, flags: u8) -> DecodeError {
    Malformed::InvalidFlags { packet, flags }.into()
}

#[test]
fn reserved_flag_bits_are_refused() {
    for v in [V311, V5] {
        assert_eq!(
            decode_all(&[0x80, 0x02, 0x00, 0x01], v),
            Err(flags(PacketType::Subscribe, 0))
        );
        assert_eq!(
            decode_all(&[0xa0, 0x02, 0x00, 0x01], v),
            Err(flags(PacketType::Unsubscribe, 0))
        );
        assert_eq!(
            decode_all(&[0x60, 0x02, 0x00, 0x01], v),
            Err(flags(PacketType::PubRel, 0))
        );
        assert_eq!(
            decode_all(&[0x42, 0x02, 0x00, 0x01], v),
            Err(flags(PacketType::PubAck, 2))
        );
        assert_eq!(decode_all(&[0xc1, 0x00], v), Err(flags(PacketType::PingReq, 1)));
        assert_eq!(
            decode_all(&[0xe8, 0x00], v),
            Err(flags(PacketType::Disconnect, 8))
        );
    }
    assert_eq!(
        decode_all(&[0x11, 0x00], None),
        Err(flags(PacketType::Connect, 1))
    );
}

#[test]
fn publish_flags() {
    assert_eq!(
        decode_all(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], V311),
        Err(Malformed::QosThree.into())
    );
    assert_eq!(
        decode_all(&[0x38, 0x03, 0x00, 0x01, b'a'], V311),
        Err(Malformed::DupWithQosZero.into())
    );
}

#[test]
fn packet_id_zero_is_refused_where_one_is_required() {
    let zero: DecodeError = ProtocolError::PacketIdZero.into();
    assert_eq!(decode_all(&[0x40, 0x02, 0x00, 0x00], V311), Err(zero.clone()));
    assert_eq!(
        decode_all(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], V311),
        Err(zero.clone())
    );
    assert_eq!(
        decode_all(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], V311),
        Err(zero.clone())
    );
    assert_eq!(decode_all(&[0xb0, 0x02, 0x00, 0x00], V311), Err(zero));
}

#[test]
fn subscribe_and_unsubscribe_need_a_filter() {
    let none = |p| Err(ProtocolError::NoTopicFilters(p).into());
    assert_eq!(
        decode_all(&[0x82, 0x02, 0x00, 0x01], V311),
        none(PacketType::Subscribe)
    );
    assert_eq!(
        decode_all(&[0x82, 0x03, 0x00, 0x01, 0x00], V5),
        none(PacketType::Subscribe)
    );
    assert_eq!(
        decode_all(&[0xa2, 0x02, 0x00, 0x01], V311),
        none(PacketType::Unsubscribe)
    );
}

#[test]
fn subscription_options() {
    // 3.1.1: only the QoS bits.
    let no_local = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04];
    assert_eq!(
        decode_all(&no_local, V311),
        Err(Malformed::SubscribeOptionsReserved.into())
    );
    // 5.0: retain handling 3, reserved bits, QoS 3, no local on a shared subscription.
    let sub = |opts: u8| [0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', opts];
    assert_eq!(
        decode_all(&sub(0x30), V5),
        Err(ProtocolError::RetainHandlingThree.into())
    );
    assert_eq!(
        decode_all(&sub(0x40), V5),
        Err(Malformed::SubscribeOptionsReserved.into())
    );
    assert_eq!(decode_all(&sub(0x03), V5), Err(Malformed::QosThree.into()));
    let shared = [
        0x82, 0x0e, 0x00, 0x01, 0x00, 0x00, 0x08, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', 0x04,
    ];
    assert_eq!(
        decode_all(&shared, V5),
        Err(DecodeError::TopicFilterInvalid(TopicError::SharedWithoutFilter))
    );
    let mut shared_no_local = vec![0x82, 0x10, 0x00, 0x01, 0x00, 0x00, 0x0a];
    shared_no_local.extend_from_slice(b"$share/g/a");
    shared_no_local.push(0x04);
    assert_eq!(
        decode_all(&shared_no_local, V5),
        Err(ProtocolError::NoLocalOnSharedSubscription.into())
    );
}

#[test]
fn topics_are_checked() {
    let wildcard = [0x30, 0x04, 0x00, 0x02, b'a', b'+'];
    let err = decode_all(&wildcard, V311).unwrap_err();
    assert_eq!(err, DecodeError::TopicNameInvalid(TopicError::WildcardInName));
    assert_eq!(err.reason_code(), ReasonCode::TOPIC_NAME_INVALID);
    assert_eq!(
        decode_all(&[0x30, 0x02, 0x00, 0x00], V311),
        Err(DecodeError::TopicNameInvalid(TopicError::Empty))
    );
    assert_eq!(
        decode_all(&[0x30, 0x03, 0x00, 0x00, 0x00], V5),
        Err(ProtocolError::EmptyTopicWithoutAlias.into())
    );
    let filter = [0x82, 0x07, 0x00, 0x01, 0x00, 0x02, b'a', b'#', 0x00];
    let err = decode_all(&filter, V311).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TopicFilterInvalid(TopicError::MisplacedWildcard)
    );
    assert_eq!(err.reason_code(), ReasonCode::TOPIC_FILTER_INVALID);
    // U+0000 in a string is malformed.
    assert_eq!(
        decode_all(&[0x30, 0x04, 0x00, 0x02, b'a', 0x00], V311),
        Err(Malformed::NullCharacter.into())
    );
}

#[test]
fn connect_comes_first_and_once() {
    assert_eq!(
        decode_all(&[0xc0, 0x00], None),
        Err(ProtocolError::FirstPacketNotConnect(PacketType::PingReq).into())
    );
    let connect = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c',
    ];
    assert!(decode_all(&connect, None).is_ok());
    assert_eq!(
        decode_all(&connect, V311),
        Err(ProtocolError::SecondConnect.into())
    );
}

#[test]
fn unsupported_protocol_versions() {
    // MQTT 3.1: "MQIsdp", level 3.
    let mut v31 = vec![0x10, 0x0f, 0x00, 0x06];
    v31.extend_from_slice(b"MQIsdp");
    v31.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c']);
    let err = decode_all(&v31, None).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedProtocolVersion {
            name: "MQIsdp".into(),
            level: 3
        }
    );
    assert_eq!(err.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
    let level6 = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c',
    ];
    assert_eq!(
        decode_all(&level6, None),
        Err(DecodeError::UnsupportedProtocolVersion {
            name: "MQTT".into(),
            level: 6
        })
    );
}

#[test]
fn connect_flags() {
    let with_flags = |f: u8| {
        [
            0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, f, 0x00, 0x3c, 0x00, 0x01, b'c',
        ]
    };
    assert_eq!(
        decode_all(&with_flags(0x03), None),
        Err(Malformed::ConnectReservedFlag.into())
    );
    assert_eq!(
        decode_all(&with_flags(0x08), None),
        Err(Malformed::WillFlagsWithoutWill.into())
    );
    assert_eq!(
        decode_all(&with_flags(0x20), None),
        Err(Malformed::WillFlagsWithoutWill.into())
    );
    assert_eq!(
        decode_all(&with_flags(0x1c), None),
        Err(Malformed::QosThree.into())
    );
    assert_eq!(
        decode_all(&with_flags(0x40), None),
        Err(Malformed::PasswordWithoutUserName.into())
    );
}

#[test]
fn auth_and_reserved_types() {
    assert_eq!(
        decode_all(&[0xf0, 0x00], V311),
        Err(Malformed::ReservedPacketType(15).into())
    );
    assert_eq!(
        decode_all(&[0x00, 0x00], V5),
        Err(Malformed::ReservedPacketType(0).into())
    );
    let mut out = BytesMut::new();
    let auth = Packet::Auth(Auth {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    });
    assert_eq!(
        encode(&auth, Version::V311, &mut out),
        Err(EncodeError::NotInVersion {
            what: "AUTH",
            version: Version::V311
        })
    );
    assert!(out.is_empty());
}

#[test]
fn reason_codes_outside_their_packet() {
    // Granted QoS 1 is a SUBACK code, not a PUBACK one.
    assert_eq!(
        decode_all(&[0x40, 0x03, 0x00, 0x01, 0x01], V5),
        Err(Malformed::ReasonCodeNotAllowed {
            code: 0x01,
            packet: PacketType::PubAck
        }
        .into())
    );
    assert_eq!(
        decode_all(&[0x20, 0x02, 0x00, 0x06], V311),
        Err(Malformed::UnknownReturnCode(6).into())
    );
    assert_eq!(
        decode_all(&[0x20, 0x03, 0x01, 0x87, 0x00], V5),
        Err(ProtocolError::SessionPresentOnError.into())
    );
}

#[test]
fn trailing_bytes_are_malformed() {
    assert_eq!(
        decode_all(&[0xc0, 0x01, 0x00], V311),
        Err(Malformed::TrailingBytes(1).into())
    );
    assert_eq!(
        decode_all(&[0x40, 0x03, 0x00, 0x01, 0x00], V311),
        Err(Malformed::TrailingBytes(1).into())
    );
    // A field longer than the remaining length.
    assert_eq!(
        decode_all(&[0x30, 0x03, 0x00, 0x05, b'a'], V311),
        Err(Malformed::Truncated.into())
    );
}

#[test]
fn a_duplicate_property_is_a_protocol_error() {
    // CONNACK with receive maximum twice.
    let bytes = [0x20, 0x09, 0x00, 0x00, 0x06, 0x21, 0x00, 0x01, 0x21, 0x00, 0x02];
    let err = decode_all(&bytes, V5).unwrap_err();
    assert_eq!(err, ProtocolError::DuplicateProperty(0x21).into());
    assert_eq!(err.reason_code(), ReasonCode::PROTOCOL_ERROR);
}

#[test]
fn oversize_is_refused_from_the_header_before_the_body_arrives() {
    // A PUBLISH announcing 1,000,000 bytes; the limit is 1,024 and no body byte has arrived.
    let mut buf = BytesMut::from(&[0x30, 0xc0, 0x84, 0x3d][..]);
    let err = decode(&mut buf, V5, 1024).unwrap_err();
    assert_eq!(
        err,
        DecodeError::PacketTooLarge {
            size: 1_000_004,
            max: 1024
        }
    );
    assert_eq!(err.reason_code(), ReasonCode::PACKET_TOO_LARGE);
    // The limit counts the whole packet: a 5-byte PUBLISH fits in 5, not in 4.
    let packet = [0x30, 0x03, 0x00, 0x01, b'a'];
    assert!(decode(&mut BytesMut::from(&packet[..]), V311, 5)
        .unwrap()
        .is_some());
    assert_eq!(
        decode(&mut BytesMut::from(&packet[..2]), V311, 4),
        Err(DecodeError::PacketTooLarge { size: 5, max: 4 })
    );
}

#[test]
fn partial_input_leaves_the_buffer_untouched() {
    let packet = [0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i'];
    for n in 0..packet.len() {
        let mut buf = BytesMut::from(&packet[..n]);
        assert_eq!(decode(&mut buf, V311, MAX), Ok(None), "prefix of {n}");
        assert_eq!(&buf[..], &packet[..n]);
    }
}

#[test]
fn one_packet_is_consumed_and_its_payload_is_not_copied() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0x30, 0x06, 0x00, 0x01, b't', b'a', b'b', b'c']);
    buf.extend_from_slice(&[0xc0, 0x00]);
    let start = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, V311, MAX).unwrap() else {
        panic!("not a PUBLISH")
    };
    assert_eq!(p.payload, Bytes::from_static(b"abc"));
    assert_eq!(
        p.payload.as_ptr() as usize,
        start + 5,
        "the payload points into the read buffer"
    );
    assert_eq!(&buf[..], &[0xc0, 0x00]);
    assert_eq!(decode(&mut buf, V311, MAX), Ok(Some(Packet::PingReq)));
    assert!(buf.is_empty());
}

#[test]
fn encode_refuses_what_a_receiver_refuses_and_writes_nothing() {
    let mut out = BytesMut::new();
    let publish = |qos, packet_id, topic: &str| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id,
            properties: Properties::default(),
            payload: Bytes::new(),
        })
    };
    assert_eq!(
        encode(
            &publish(QoS::AtMostOnce, Some(pid(1)), "a"),
            Version::V311,
            &mut out
        ),
        Err(EncodeError::PacketIdDoesNotFitQos)
    );
    assert_eq!(
        encode(&publish(QoS::AtLeastOnce, None, "a"), Version::V311, &mut out),
        Err(EncodeError::PacketIdDoesNotFitQos)
    );
    assert_eq!(
        encode(&publish(QoS::AtMostOnce, None, "a/#"), Version::V5, &mut out),
        Err(EncodeError::Invalid(DecodeError::TopicNameInvalid(
            TopicError::WildcardInName
        )))
    );
    let with_props = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "a".into(),
        packet_id: None,
        properties: Properties {
            message_expiry_interval: Some(1),
            ..Properties::default()
        },
        payload: Bytes::new(),
    });
    assert_eq!(
        encode(&with_props, Version::V311, &mut out),
        Err(EncodeError::NotInVersion {
            what: "properties",
            version: Version::V311
        })
    );
    let long = "a".repeat(70_000);
    assert_eq!(
        encode(&publish(QoS::AtMostOnce, None, &long), Version::V311, &mut out),
        Err(EncodeError::FieldTooLong { len: 70_000 })
    );
    assert!(out.is_empty());
}
