//! One hand-written MQTT 3.1.1 packet of each type, bytes from the spec's field layout.

use bytes::Bytes;
use herald_mqtt::{
    Ack, ConnAck, Connect, Disconnect, Packet, Properties, Publish, QoS, ReasonCode, SubAck, Subscribe,
    Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Version,
};

use crate::{pid, vector};

const V: Version = Version::V311;

#[test]
fn connect() {
    // "MQTT", level 4, clean session, keep alive 60, client id "c".
    let bytes = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'c',
    ];
    let connect = Connect {
        version: V,
        clean_start: true,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: "c".into(),
        will: None,
        user_name: None,
        password: None,
    };
    vector(V, &bytes, Packet::Connect(connect));
}

#[test]
fn connack() {
    let ok = ConnAck {
        session_present: true,
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    };
    vector(V, &[0x20, 0x02, 0x01, 0x00], Packet::ConnAck(ok));
    // Return code 5: not authorized.
    let refused = ConnAck {
        session_present: false,
        reason: ReasonCode::NOT_AUTHORIZED,
        properties: Properties::default(),
    };
    vector(V, &[0x20, 0x02, 0x00, 0x05], Packet::ConnAck(refused));
}

#[test]
fn publish() {
    // QoS 1 to "a/b", packet id 7, payload "hi".
    let bytes = [0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x07, b'h', b'i'];
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "a/b".into(),
        packet_id: Some(pid(7)),
        properties: Properties::default(),
        payload: Bytes::from_static(b"hi"),
    };
    vector(V, &bytes, Packet::Publish(publish));
    // QoS 0 retained, no packet id; DUP with QoS 2.
    let retained = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: "a".into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    };
    vector(
        V,
        &[0x31, 0x04, 0x00, 0x01, b'a', b'x'],
        Packet::Publish(retained),
    );
    let dup = Publish {
        dup: true,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "a".into(),
        packet_id: Some(pid(0x0102)),
        properties: Properties::default(),
        payload: Bytes::new(),
    };
    vector(
        V,
        &[0x3c, 0x05, 0x00, 0x01, b'a', 0x01, 0x02],
        Packet::Publish(dup),
    );
}

#[test]
fn acks() {
    vector(V, &[0x40, 0x02, 0x00, 0x07], Packet::PubAck(Ack::new(pid(7))));
    vector(V, &[0x50, 0x02, 0x00, 0x07], Packet::PubRec(Ack::new(pid(7))));
    vector(V, &[0x62, 0x02, 0x00, 0x07], Packet::PubRel(Ack::new(pid(7))));
    vector(
        V,
        &[0x70, 0x02, 0xff, 0xff],
        Packet::PubComp(Ack::new(pid(0xffff))),
    );
}

#[test]
fn subscribe_and_suback() {
    let bytes = [
        0x82, 0x0c, 0x00, 0x0a, 0x00, 0x03, b'a', b'/', b'+', 0x01, 0x00, 0x01, b'#', 0x02,
    ];
    let subscribe = Subscribe {
        packet_id: pid(10),
        properties: Properties::default(),
        subscriptions: vec![
            Subscription {
                filter: "a/+".into(),
                options: SubscriptionOptions::new(QoS::AtLeastOnce),
            },
            Subscription {
                filter: "#".into(),
                options: SubscriptionOptions::new(QoS::ExactlyOnce),
            },
        ],
    };
    vector(V, &bytes, Packet::Subscribe(subscribe));
    let suback = SubAck {
        packet_id: pid(10),
        properties: Properties::default(),
        reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::UNSPECIFIED_ERROR],
    };
    vector(V, &[0x90, 0x04, 0x00, 0x0a, 0x01, 0x80], Packet::SubAck(suback));
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsubscribe = Unsubscribe {
        packet_id: pid(11),
        properties: Properties::default(),
        filters: vec!["a/+".into()],
    };
    vector(
        V,
        &[0xa2, 0x07, 0x00, 0x0b, 0x00, 0x03, b'a', b'/', b'+'],
        Packet::Unsubscribe(unsubscribe),
    );
    let unsuback = UnsubAck {
        packet_id: pid(11),
        properties: Properties::default(),
        reasons: vec![],
    };
    vector(V, &[0xb0, 0x02, 0x00, 0x0b], Packet::UnsubAck(unsuback));
}

#[test]
fn ping_and_disconnect() {
    vector(V, &[0xc0, 0x00], Packet::PingReq);
    vector(V, &[0xd0, 0x00], Packet::PingResp);
    vector(V, &[0xe0, 0x00], Packet::Disconnect(Disconnect::default()));
}
