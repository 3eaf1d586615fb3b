//! Property tests: every valid packet of either version survives encode then decode, every
//! prefix of its encoding asks for more bytes, and no input makes the decoder panic.
//!
//! Which properties each packet may carry is written here again from the table of 5.0
//! §2.2.2.2, independently of the codec's own table: a disagreement fails the round trip.

use bytes::{Bytes, BytesMut};
use herald_mqtt::{
    decode, encode, Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, PacketId, PacketType,
    Properties, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, Version, Will, VARINT_MAX,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V311), Just(Version::V5)]
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1..=u16::MAX).prop_map(|n| PacketId::new(n).unwrap())
}

/// Any UTF-8 without U+0000, short.
fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,6}"
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z$ ]{1,3}(/[a-zé]{0,3}){0,3}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    (
        vec(prop_oneof!["[a-z]{0,3}", Just("+".to_string())], 1..4),
        any::<bool>(),
    )
        .prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            if f.is_empty() {
                // A filter is at least one character ([MQTT-4.7.3-1]); "/" is two empty levels.
                f.push('/');
            }
            f
        })
}

fn shared_filter() -> impl Strategy<Value = String> {
    ("[a-z]{1,3}", topic_filter()).prop_map(|(name, f)| format!("$share/{name}/{f}"))
}

fn reason(packet: PacketType) -> impl Strategy<Value = ReasonCode> {
    let codes: Vec<ReasonCode> = (0..=255u8)
        .filter_map(ReasonCode::from_u8)
        .filter(|c| c.allowed_in(packet))
        .collect();
    proptest::sample::select(codes)
}

/// Where a property list is, for [`mask`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    Packet(PacketType),
    Will,
}

/// Any properties, every field at random.
fn any_properties() -> impl Strategy<Value = Properties> {
    let a = (
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic_name()),
        option::of(bytes(4)),
        vec(1..=VARINT_MAX, 0..3),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(any::<u16>()),
        option::of(text()),
        option::of(bytes(4)),
        option::of(any::<bool>()),
    );
    let b = (
        option::of(any::<u32>()),
        option::of(any::<bool>()),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(1..=u16::MAX),
        option::of(any::<u16>()),
        option::of(1..=u16::MAX),
        option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
        option::of(any::<bool>()),
        vec((text(), text()), 0..3),
        option::of(1..=u32::MAX),
    );
    let c = (
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
    );
    (a, b, c).prop_map(|(a, b, c)| Properties {
        payload_format_indicator: a.0,
        message_expiry_interval: a.1,
        content_type: a.2,
        response_topic: a.3,
        correlation_data: a.4,
        subscription_identifiers: a.5,
        session_expiry_interval: a.6,
        assigned_client_identifier: a.7,
        server_keep_alive: a.8,
        authentication_method: a.9,
        authentication_data: a.10,
        request_problem_information: a.11,
        will_delay_interval: b.0,
        request_response_information: b.1,
        response_information: b.2,
        server_reference: b.3,
        reason_string: b.4,
        receive_maximum: b.5,
        topic_alias_maximum: b.6,
        topic_alias: b.7,
        maximum_qos: b.8,
        retain_available: b.9,
        user_properties: b.10,
        maximum_packet_size: b.11,
        wildcard_subscription_available: c.0,
        subscription_identifier_available: c.1,
        shared_subscription_available: c.2,
    })
}

/// Clears the properties `at` may not carry (5.0 §2.2.2.2, written out per field).
fn mask(mut p: Properties, at: At) -> Properties {
    use PacketType::*;
    let is = |packets: &[PacketType]| matches!(at, At::Packet(t) if packets.contains(&t));
    let message = is(&[Publish]) || at == At::Will;
    if !message {
        p.payload_format_indicator = None;
        p.message_expiry_interval = None;
        p.content_type = None;
        p.response_topic = None;
        p.correlation_data = None;
    }
    if !is(&[Publish, Subscribe]) {
        p.subscription_identifiers.clear();
    }
    if is(&[Subscribe]) {
        p.subscription_identifiers.truncate(1);
    }
    if !is(&[Connect, ConnAck, Disconnect]) {
        p.session_expiry_interval = None;
    }
    if !is(&[ConnAck]) {
        p.assigned_client_identifier = None;
        p.server_keep_alive = None;
        p.response_information = None;
        p.maximum_qos = None;
        p.retain_available = None;
        p.wildcard_subscription_available = None;
        p.subscription_identifier_available = None;
        p.shared_subscription_available = None;
    }
    if !is(&[Connect, ConnAck, Auth]) {
        p.authentication_method = None;
    }
    if p.authentication_method.is_none() {
        p.authentication_data = None;
    }
    if !is(&[Connect]) {
        p.request_problem_information = None;
        p.request_response_information = None;
    }
    if at != At::Will {
        p.will_delay_interval = None;
    }
    if !is(&[ConnAck, Disconnect]) {
        p.server_reference = None;
    }
    if !is(&[
        ConnAck, PubAck, PubRec, PubRel, PubComp, SubAck, UnsubAck, Disconnect, Auth,
    ]) {
        p.reason_string = None;
    }
    if !is(&[Connect, ConnAck]) {
        p.receive_maximum = None;
        p.topic_alias_maximum = None;
        p.maximum_packet_size = None;
    }
    if !is(&[Publish]) {
        p.topic_alias = None;
    }
    if is(&[PingReq, PingResp]) {
        p.user_properties.clear();
    }
    p
}

/// Properties for `at` in `version`: none in 3.1.1.
fn properties(version: Version, at: At) -> BoxedStrategy<Properties> {
    match version {
        Version::V311 => Just(Properties::default()).boxed(),
        Version::V5 => any_properties().prop_map(move |p| mask(p, at)).boxed(),
    }
}

fn props_of(version: Version, t: PacketType) -> BoxedStrategy<Properties> {
    properties(version, At::Packet(t))
}

fn connect(v: Version) -> impl Strategy<Value = Packet> {
    let will = (
        qos(),
        any::<bool>(),
        properties(v, At::Will),
        topic_name(),
        bytes(8),
    )
        .prop_map(|(qos, retain, properties, topic, payload)| Will {
            qos,
            retain,
            properties,
            topic,
            payload,
        });
    (
        any::<bool>(),
        any::<u16>(),
        props_of(v, PacketType::Connect),
        "[a-zA-Z0-9]{0,8}",
        option::of(will),
        option::of(text()),
        option::of(bytes(8)),
    )
        .prop_map(
            move |(clean_start, keep_alive, properties, client_id, will, user_name, password)| {
                // 3.1.1 has no password without a user name.
                let password = if v == Version::V311 && user_name.is_none() {
                    None
                } else {
                    password
                };
                Packet::Connect(Connect {
                    version: v,
                    clean_start,
                    keep_alive,
                    properties,
                    client_id,
                    will,
                    user_name,
                    password,
                })
            },
        )
}

fn connack(v: Version) -> BoxedStrategy<Packet> {
    let reasons = match v {
        Version::V311 => proptest::sample::select(vec![
            ReasonCode::SUCCESS,
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ReasonCode::SERVER_UNAVAILABLE,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            ReasonCode::NOT_AUTHORIZED,
        ])
        .boxed(),
        Version::V5 => reason(PacketType::ConnAck).boxed(),
    };
    (any::<bool>(), reasons, props_of(v, PacketType::ConnAck))
        .prop_map(|(present, reason, properties)| {
            let session_present = present && reason == ReasonCode::SUCCESS;
            Packet::ConnAck(ConnAck {
                session_present,
                reason,
                properties,
            })
        })
        .boxed()
}

fn publish(v: Version) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        props_of(v, PacketType::Publish),
        bytes(64),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            let (dup, packet_id) = if qos == QoS::AtMostOnce {
                (false, None)
            } else {
                (dup, Some(id))
            };
            Packet::Publish(Publish {
                dup,
                qos,
                retain,
                topic,
                packet_id,
                properties,
                payload,
            })
        })
}

fn ack(v: Version, t: PacketType) -> BoxedStrategy<Packet> {
    let reason = match v {
        Version::V311 => Just(ReasonCode::SUCCESS).boxed(),
        Version::V5 => reason(t).boxed(),
    };
    (packet_id(), reason, props_of(v, t))
        .prop_map(move |(packet_id, reason, properties)| {
            let ack = Ack {
                packet_id,
                reason,
                properties,
            };
            match t {
                PacketType::PubAck => Packet::PubAck(ack),
                PacketType::PubRec => Packet::PubRec(ack),
                PacketType::PubRel => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        })
        .boxed()
}

fn subscription(v: Version) -> BoxedStrategy<Subscription> {
    match v {
        Version::V311 => (topic_filter(), qos())
            .prop_map(|(filter, qos)| Subscription {
                filter,
                options: SubscriptionOptions::new(qos),
            })
            .boxed(),
        Version::V5 => {
            let rh = prop_oneof![
                Just(RetainHandling::SendAtSubscribe),
                Just(RetainHandling::SendAtNewSubscribe),
                Just(RetainHandling::DoNotSend)
            ];
            (
                prop_oneof![topic_filter(), shared_filter()],
                qos(),
                any::<bool>(),
                any::<bool>(),
                rh,
            )
                .prop_map(|(filter, qos, no_local, retain_as_published, retain_handling)| {
                    let no_local = no_local && !filter.starts_with("$share/");
                    let options = SubscriptionOptions {
                        qos,
                        no_local,
                        retain_as_published,
                        retain_handling,
                    };
                    Subscription { filter, options }
                })
                .boxed()
        }
    }
}

fn subscribe(v: Version) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        props_of(v, PacketType::Subscribe),
        vec(subscription(v), 1..4),
    )
        .prop_map(|(packet_id, properties, subscriptions)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                subscriptions,
            })
        })
}

fn suback(v: Version) -> impl Strategy<Value = Packet> {
    let code = match v {
        Version::V311 => proptest::sample::select(vec![
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::UNSPECIFIED_ERROR,
        ])
        .boxed(),
        Version::V5 => reason(PacketType::SubAck).boxed(),
    };
    (packet_id(), props_of(v, PacketType::SubAck), vec(code, 1..4)).prop_map(
        |(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        },
    )
}

fn unsubscribe(v: Version) -> impl Strategy<Value = Packet> {
    let filter = match v {
        Version::V311 => topic_filter().boxed(),
        Version::V5 => prop_oneof![topic_filter(), shared_filter()].boxed(),
    };
    (
        packet_id(),
        props_of(v, PacketType::Unsubscribe),
        vec(filter, 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        })
}

fn unsuback(v: Version) -> impl Strategy<Value = Packet> {
    let reasons = match v {
        Version::V311 => Just(Vec::new()).boxed(),
        Version::V5 => vec(reason(PacketType::UnsubAck), 1..4).boxed(),
    };
    (packet_id(), props_of(v, PacketType::UnsubAck), reasons).prop_map(|(packet_id, properties, reasons)| {
        Packet::UnsubAck(UnsubAck {
            packet_id,
            properties,
            reasons,
        })
    })
}

fn disconnect(v: Version) -> BoxedStrategy<Packet> {
    match v {
        Version::V311 => Just(Packet::Disconnect(Disconnect::default())).boxed(),
        Version::V5 => (
            reason(PacketType::Disconnect),
            props_of(v, PacketType::Disconnect),
        )
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
            .boxed(),
    }
}

fn auth() -> impl Strategy<Value = Packet> {
    (reason(PacketType::Auth), props_of(Version::V5, PacketType::Auth))
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
}

/// Any valid packet of `v`.
fn packet(v: Version) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(v),
        connack(v),
        publish(v),
        ack(v, PacketType::PubAck),
        ack(v, PacketType::PubRec),
        ack(v, PacketType::PubRel),
        ack(v, PacketType::PubComp),
        subscribe(v),
        suback(v),
        unsubscribe(v),
        unsuback(v),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(v),
    ];
    match v {
        Version::V311 => common.boxed(),
        Version::V5 => prop_oneof![14 => common, 1 => auth()].boxed(),
    }
}

fn versioned_packet() -> impl Strategy<Value = (Version, Packet)> {
    version().prop_flat_map(|v| packet(v).prop_map(move |p| (v, p)))
}

/// The version a receiver passes to decode `p`: none before CONNECT.
fn receiver_version(p: &Packet, v: Version) -> Option<Version> {
    if matches!(p, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_the_same_packet((v, p) in versioned_packet()) {
        let mut out = BytesMut::new();
        encode(&p, v, &mut out).unwrap();
        let len = out.len();
        let rv = receiver_version(&p, v);
        // Every strict prefix asks for more bytes and leaves the buffer as it was.
        for n in 0..len {
            let mut prefix = BytesMut::from(&out[..n]);
            prop_assert_eq!(decode(&mut prefix, rv, len), Ok(None), "prefix {}", n);
            prop_assert_eq!(prefix.len(), n);
        }
        // A limit one byte short refuses it.
        let mut short = out.clone();
        prop_assert_eq!(
            decode(&mut short, rv, len - 1),
            Err(DecodeError::PacketTooLarge { size: len, max: len - 1 })
        );
        // A following packet stays in the buffer.
        out.extend_from_slice(&[0xc0, 0x00]);
        let decoded = decode(&mut out, rv, len).unwrap();
        prop_assert_eq!(decoded, Some(p));
        prop_assert_eq!(&out[..], &[0xc0, 0x00]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        input in vec(any::<u8>(), 0..64),
        v in option::of(version()),
        max in 0usize..128,
    ) {
        let mut buf = BytesMut::from(&input[..]);
        // Decode packets until the input runs out or is refused.
        while let Ok(Some(p)) = decode(&mut buf, v, max) {
            prop_assert!(!matches!(p, Packet::Connect(_)) || v.is_none());
        }
    }

    #[test]
    fn mutated_valid_packets_never_panic((v, p) in versioned_packet(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut out = BytesMut::new();
        encode(&p, v, &mut out).unwrap();
        let i = at.index(out.len());
        out[i] = byte;
        let rv = receiver_version(&p, v);
        if let Ok(Some(decoded)) = decode(&mut out, rv, usize::MAX) {
            // Whatever decoded is valid: it encodes again.
            let mut again = BytesMut::new();
            let version = match &decoded { Packet::Connect(c) => c.version, _ => v };
            prop_assert!(encode(&decoded, version, &mut again).is_ok(), "{:?}", decoded);
        }
    }
}
