//! One hand-written MQTT 5.0 packet of each type (several forms where the spec allows them),
//! bytes from the spec's field layout.

use bytes::Bytes;
use herald_mqtt::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Properties, Publish, QoS, ReasonCode, RetainHandling,
    SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Version, Will,
};

use crate::{decode_all, pid, vector};

const V: Version = Version::V5;

fn props() -> Properties {
    Properties::default()
}

#[test]
fn connect() {
    // "MQTT", level 5, clean start, keep alive 60, no properties, client id "c".
    let bytes = [
        0x10, 0x0e, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x01, b'c',
    ];
    let connect = Connect {
        version: V,
        clean_start: true,
        keep_alive: 60,
        properties: props(),
        client_id: "c".into(),
        will: None,
        user_name: None,
        password: None,
    };
    vector(V, &bytes, Packet::Connect(connect));
}

#[test]
fn connect_with_a_will_and_properties() {
    #[rustfmt::skip]
    let bytes = [
        0x10, 0x24,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05,
        // flags: will retain, will QoS 2, will; keep alive 0
        0b0011_0100, 0x00, 0x00,
        // properties: receive maximum 20, user property ("k", "v")
        0x0a, 0x21, 0x00, 0x14, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v',
        // client id ""
        0x00, 0x00,
        // will properties: will delay interval 5
        0x05, 0x18, 0x00, 0x00, 0x00, 0x05,
        // will topic "w", will payload [1, 2]
        0x00, 0x01, b'w', 0x00, 0x02, 0x01, 0x02,
    ];
    let connect = Connect {
        version: V,
        clean_start: false,
        keep_alive: 0,
        properties: Properties {
            receive_maximum: Some(20),
            user_properties: vec![("k".into(), "v".into())],
            ..props()
        },
        client_id: String::new(),
        will: Some(Will {
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                will_delay_interval: Some(5),
                ..props()
            },
            topic: "w".into(),
            payload: Bytes::from_static(&[1, 2]),
        }),
        user_name: None,
        password: None,
    };
    vector(V, &bytes, Packet::Connect(connect));
}

#[test]
fn connack() {
    let ok = ConnAck {
        session_present: false,
        reason: ReasonCode::SUCCESS,
        properties: props(),
    };
    vector(V, &[0x20, 0x03, 0x00, 0x00, 0x00], Packet::ConnAck(ok));
    // Receive maximum 20, topic alias maximum 10.
    let bytes = [0x20, 0x09, 0x01, 0x00, 0x06, 0x21, 0x00, 0x14, 0x22, 0x00, 0x0a];
    let with_props = ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: Properties {
            receive_maximum: Some(20),
            topic_alias_maximum: Some(10),
            ..props()
        },
    };
    vector(V, &bytes, Packet::ConnAck(with_props));
    let refused = ConnAck {
        session_present: false,
        reason: ReasonCode::NOT_AUTHORIZED,
        properties: props(),
    };
    vector(V, &[0x20, 0x03, 0x00, 0x87, 0x00], Packet::ConnAck(refused));
}

#[test]
fn publish() {
    // QoS 1 to "a/b", packet id 7, payload format indicator 1 and topic alias 5, payload "hi".
    #[rustfmt::skip]
    let bytes = [
        0x32, 0x0f, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07,
        0x05, 0x01, 0x01, 0x23, 0x00, 0x05,
        b'h', b'i',
    ];
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "a/b".into(),
        packet_id: Some(pid(7)),
        properties: Properties {
            payload_format_indicator: Some(true),
            topic_alias: Some(5),
            ..props()
        },
        payload: Bytes::from_static(b"hi"),
    };
    vector(V, &bytes, Packet::Publish(publish));
    // An empty topic name stands for topic alias 5; QoS 0, no payload.
    let aliased = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: String::new(),
        packet_id: None,
        properties: Properties {
            topic_alias: Some(5),
            ..props()
        },
        payload: Bytes::new(),
    };
    vector(
        V,
        &[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05],
        Packet::Publish(aliased),
    );
    // Two subscription identifiers (server to client).
    let multi = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: Properties {
            subscription_identifiers: vec![1, 128],
            ..props()
        },
        payload: Bytes::from_static(b"x"),
    };
    vector(
        V,
        &[
            0x30, 0x0a, 0x00, 0x01, b't', 0x05, 0x0b, 0x01, 0x0b, 0x80, 0x01, b'x',
        ],
        Packet::Publish(multi),
    );
}

#[test]
fn acks_in_their_short_and_long_forms() {
    vector(V, &[0x40, 0x02, 0x00, 0x07], Packet::PubAck(Ack::new(pid(7))));
    let no_match = Ack {
        reason: ReasonCode::NO_MATCHING_SUBSCRIBERS,
        ..Ack::new(pid(7))
    };
    vector(V, &[0x40, 0x03, 0x00, 0x07, 0x10], Packet::PubAck(no_match));
    // Unspecified error with reason string "x".
    let with_reason_string = Ack {
        reason: ReasonCode::UNSPECIFIED_ERROR,
        properties: Properties {
            reason_string: Some("x".into()),
            ..props()
        },
        ..Ack::new(pid(7))
    };
    vector(
        V,
        &[0x50, 0x08, 0x00, 0x07, 0x80, 0x04, 0x1f, 0x00, 0x01, b'x'],
        Packet::PubRec(with_reason_string),
    );
    let not_found = Ack {
        reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
        ..Ack::new(pid(7))
    };
    vector(V, &[0x62, 0x03, 0x00, 0x07, 0x92], Packet::PubRel(not_found));
    vector(V, &[0x70, 0x02, 0x00, 0x07], Packet::PubComp(Ack::new(pid(7))));
    // Success and an empty property list spelled out decode like the short form.
    assert_eq!(
        decode_all(&[0x40, 0x04, 0x00, 0x07, 0x00, 0x00], Some(V)).unwrap(),
        Packet::PubAck(Ack::new(pid(7)))
    );
}

#[test]
fn subscribe_and_suback() {
    #[rustfmt::skip]
    let bytes = [
        0x82, 0x18, 0x00, 0x0a,
        // properties: subscription identifier 1
        0x02, 0x0b, 0x01,
        // "a/+": QoS 1, no local, retain as published, retain handling 2
        0x00, 0x03, b'a', b'/', b'+', 0b0010_1101,
        // "$share/g/x": QoS 0
        0x00, 0x0a, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', b'x', 0x00,
    ];
    let subscribe = Subscribe {
        packet_id: pid(10),
        properties: Properties {
            subscription_identifiers: vec![1],
            ..props()
        },
        subscriptions: vec![
            Subscription {
                filter: "a/+".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            },
            Subscription {
                filter: "$share/g/x".into(),
                options: SubscriptionOptions::new(QoS::AtMostOnce),
            },
        ],
    };
    vector(V, &bytes, Packet::Subscribe(subscribe));
    let suback = SubAck {
        packet_id: pid(10),
        properties: props(),
        reasons: vec![
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
        ],
    };
    vector(
        V,
        &[0x90, 0x05, 0x00, 0x0a, 0x00, 0x01, 0xa2],
        Packet::SubAck(suback),
    );
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsubscribe = Unsubscribe {
        packet_id: pid(11),
        properties: props(),
        filters: vec!["a/+".into()],
    };
    vector(
        V,
        &[0xa2, 0x08, 0x00, 0x0b, 0x00, 0x00, 0x03, b'a', b'/', b'+'],
        Packet::Unsubscribe(unsubscribe),
    );
    let unsuback = UnsubAck {
        packet_id: pid(11),
        properties: props(),
        reasons: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
    };
    vector(
        V,
        &[0xb0, 0x04, 0x00, 0x0b, 0x00, 0x11],
        Packet::UnsubAck(unsuback),
    );
}

#[test]
fn ping() {
    vector(V, &[0xc0, 0x00], Packet::PingReq);
    vector(V, &[0xd0, 0x00], Packet::PingResp);
}

#[test]
fn disconnect() {
    vector(V, &[0xe0, 0x00], Packet::Disconnect(Disconnect::default()));
    let will = Disconnect {
        reason: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
        properties: props(),
    };
    vector(V, &[0xe0, 0x01, 0x04], Packet::Disconnect(will));
    // Normal disconnection with session expiry interval 0.
    let expiry = Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties {
            session_expiry_interval: Some(0),
            ..props()
        },
    };
    vector(
        V,
        &[0xe0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x00],
        Packet::Disconnect(expiry),
    );
}

#[test]
fn auth() {
    vector(
        V,
        &[0xf0, 0x00],
        Packet::Auth(Auth {
            reason: ReasonCode::SUCCESS,
            properties: props(),
        }),
    );
    // Continue authentication, method "m".
    let cont = Auth {
        reason: ReasonCode::CONTINUE_AUTHENTICATION,
        properties: Properties {
            authentication_method: Some("m".into()),
            ..props()
        },
    };
    vector(
        V,
        &[0xf0, 0x06, 0x18, 0x04, 0x15, 0x00, 0x01, b'm'],
        Packet::Auth(cont),
    );
}
