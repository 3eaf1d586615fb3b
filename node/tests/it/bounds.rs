//! Bounds on what one caller can make the cluster do (issue 25, item 4): targets per push, qos
//! values, msg id reuse, requests the server cannot decode, QoS 0 across nodes with different
//! frame limits, and a client trickling a partial frame.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use herald_proto::client::frame::Kind;
use herald_proto::v1 as pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::harness::{admin_request, App, Cluster};
use crate::raw::{Raw, Who};

fn target(user: &str, devices: &[&str]) -> pb::Target {
    pb::Target {
        user: user.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
    }
}

fn push(app: &App, targets: Vec<pb::Target>, payload: &str) -> pb::PushRequest {
    pb::PushRequest {
        app: app.id.clone(),
        targets,
        payload: payload.as_bytes().to_vec().into(),
        qos: pb::Qos::AtLeastOnce as i32,
        ..Default::default()
    }
}

fn who(app: &App, user: &str, device: &str) -> Who {
    Who {
        app: app.id.clone(),
        user: user.into(),
        device: device.into(),
        platform: "ios".into(),
        token: app.token(user, None),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn targets_per_push_are_capped_per_app_and_duplicates_stored_once() {
    let c = Cluster::start(1).await;
    let app = c.create_app("targets").await;
    let mut grpc = c.client(1).await;
    let current = grpc
        .get_app(admin_request(pb::GetAppRequest { id: app.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    assert_eq!(current.limits.as_ref().unwrap().max_targets, 1000, "the default");

    // Over the default: refused before anything is proposed.
    let many: Vec<pb::Target> = (0..1001).map(|i| target(&format!("u{i}"), &[])).collect();
    let e = grpc.push(app.request(push(&app, many, "x"))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("limit of 1000"), "{e:?}");

    // A user listed three times is stored once, for the union of the devices listed.
    let r = grpc
        .push(app.request(push(
            &app,
            vec![
                target("alice", &["phone"]),
                target("bob", &[]),
                target("alice", &["tablet", "phone"]),
                target("bob", &[]),
            ],
            "once",
        )))
        .await
        .unwrap()
        .into_inner();
    let users: Vec<(&str, u64)> = r.seqs.iter().map(|s| (s.user.as_str(), s.seq)).collect();
    assert_eq!(users, [("alice", 1), ("bob", 1)]);
    let status = grpc
        .status(app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "alice".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.pending, status.next_seq), (1, 2), "{status:?}");
    // Both listed devices get it, another device does not.
    for device in ["tablet", "phone"] {
        let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
        raw.hello(&who(&app, "alice", device), 0).await.unwrap();
        let p = raw.pushes(1).await.unwrap().remove(0);
        assert_eq!((&p.payload[..], p.seq), (&b"once"[..], 1), "{device}");
    }
    let mut watch = Raw::connect(c.client_addr(1)).await.unwrap();
    watch.hello(&who(&app, "alice", "watch"), 0).await.unwrap();
    let got = watch.recv_within(Duration::from_secs(1)).await;
    assert!(got.is_err(), "the watch was not listed, yet got {got:?}");

    // The limit is the app's: lowered to 2, three targets are refused and two pass.
    let mut lowered = current.clone();
    lowered.limits.as_mut().unwrap().max_targets = 2;
    let updated = grpc
        .update_app(admin_request(pb::UpdateAppRequest { app: Some(lowered) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.app.unwrap().limits.unwrap().max_targets, 2);
    let three = vec![target("a", &[]), target("b", &[]), target("c", &[])];
    let e = grpc.push(app.request(push(&app, three, "x"))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let two = vec![target("a", &[]), target("b", &[])];
    grpc.push(app.request(push(&app, two, "x"))).await.unwrap();
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_qos_and_a_reused_msg_id_are_refused() {
    let c = Cluster::start(1).await;
    let app = c.create_app("qosmsg").await;
    let mut grpc = c.client(1).await;
    for qos in [2, -1, 7] {
        let mut req = push(&app, vec![target("carol", &[])], "x");
        req.qos = qos;
        let e = grpc.push(app.request(req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "qos {qos}: {e:?}");
        assert!(e.message().contains("qos"), "{e:?}");
    }
    let status = grpc
        .status(app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "carol".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.pending, 0, "nothing was stored");

    let with_id = |payload: &str, key: &str| {
        let mut req = push(&app, vec![target("carol", &[])], payload);
        req.msg_id = "order-1".into();
        req.idempotency_key = key.into();
        app.request(req)
    };
    let first = grpc.push(with_id("a", "k1")).await.unwrap().into_inner();
    assert_eq!((first.msg_id.as_str(), first.seqs[0].seq), ("order-1", 1));
    // Another payload under the same msg id: refused, whatever the key.
    for (payload, key) in [("b", ""), ("b", "k2"), ("a", "")] {
        let e = grpc.push(with_id(payload, key)).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{payload}/{key}: {e:?}");
        assert!(e.message().contains("order-1"), "{e:?}");
    }
    // A retry with the first push's key is that push's answer.
    let again = grpc.push(with_id("a", "k1")).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.seqs, first.seqs);
    // So the msg id names exactly one stored message.
    let d = grpc
        .delivery_status(app.request(pb::DeliveryStatusRequest {
            app: app.id.clone(),
            msg_id: "order-1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let at: Vec<(&str, u64)> = d.users.iter().map(|u| (u.user.as_str(), u.seq)).collect();
    assert_eq!(at, [("carol", 1)]);
    c.assert_no_panics();
}

/// Sends and receives message bodies as they are, so a test can put any bytes on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Not a protobuf message: a varint that never ends.
const GARBAGE: &[u8] = &[0xff; 12];

#[tokio::test(flavor = "multi_thread")]
async fn requests_the_server_cannot_decode_are_invalid_argument() {
    let c = Cluster::start(1).await;
    let app = c.create_app("garbage").await;
    let channel = Channel::from_shared(format!("http://{}", c.grpc_addr(1)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for method in [
        "Push",
        "Status",
        "DeliveryStatus",
        "Dispatch",
        "GetApp",
        "CreateApp",
    ] {
        grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/herald.v1.Herald/{method}")).unwrap();
        let e = grpc
            .unary(app.request(Bytes::from_static(GARBAGE)), path, RawCodec)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{method}: {e:?}");
    }

    // A PushStream: the pushes before the bad one are answered, then the stream ends with
    // INVALID_ARGUMENT.
    let good = {
        use prost::Message;
        let mut req = push(&app, vec![target("dave", &[])], "fine");
        req.idempotency_key = "s1".into();
        Bytes::from(req.encode_to_vec())
    };
    grpc.ready().await.unwrap();
    let body = tokio_stream::iter(vec![good, Bytes::from_static(GARBAGE)]);
    let mut replies = grpc
        .streaming(
            app.request(body),
            PathAndQuery::from_static("/herald.v1.Herald/PushStream"),
            RawCodec,
        )
        .await
        .unwrap()
        .into_inner();
    let first = replies.message().await.unwrap().expect("the good push's answer");
    let first = <pb::PushStreamReply as prost::Message>::decode(first).unwrap();
    assert_eq!(first.reply.unwrap().seqs[0].seq, 1);
    let e = replies.message().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn qos0_through_a_peer_is_held_to_the_receiving_nodes_frame_limit() {
    let mut c = Cluster::new(2);
    c.spec_mut(2)
        .extra_args
        .extend(["--max-frame", "2048"].map(String::from));
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("peerframe").await;
    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    let welcome = raw.hello(&who(&app, "erin", "phone"), 0).await.unwrap();
    assert_eq!(welcome.max_frame, 2048);
    let mut grpc = c.client(1).await;
    let qos0 = |payload: Vec<u8>| {
        app.request(pb::PushRequest {
            app: app.id.clone(),
            targets: vec![target("erin", &[])],
            payload: payload.into(),
            qos: pb::Qos::AtMostOnce as i32,
            ..Default::default()
        })
    };
    // Fits node 1's frame (64 KiB) but not node 2's: node 2 refuses it, so it is dropped.
    let r = grpc.push(qos0(vec![b'x'; 10_000])).await.unwrap().into_inner();
    assert_eq!((r.delivered, r.dropped), (0, 1), "{r:?}");
    // One that fits node 2 is delivered; it is the first push erin sees.
    let r = grpc.push(qos0(b"small".to_vec())).await.unwrap().into_inner();
    assert_eq!((r.delivered, r.dropped), (1, 0), "{r:?}");
    let p = raw.pushes(1).await.unwrap().remove(0);
    assert_eq!(&p.payload[..], b"small");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_trickling_a_partial_frame_is_closed_at_the_idle_deadline() {
    let mut c = Cluster::new(1).node_args(&[
        "--client-heartbeat-ms",
        "1000",
        "--client-heartbeat-min-ms",
        "500",
    ]);
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("trickle").await;
    let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
    raw.hello(&who(&app, "frank", "phone"), 0).await.unwrap();
    // The start of a 100-byte frame, then one more byte of it every 400 ms: bytes keep arriving,
    // but no whole frame ever does. The idle deadline is 2.5 x 1 s.
    let started = Instant::now();
    raw.send_bytes(&100u32.to_be_bytes()).await.unwrap();
    let bye = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still open after {:?} of trickling",
            started.elapsed()
        );
        if raw.send_bytes(&[0]).await.is_err() {
            panic!("closed without a BYE");
        }
        match raw.recv_within(Duration::from_millis(400)).await {
            Ok(Kind::Bye(b)) => break b,
            Ok(_) => {}
            Err(e) if e.to_string().contains("no frame within") => {}
            Err(e) => panic!("closed without a BYE: {e:#}"),
        }
    };
    assert_eq!(bye.reason, "idle timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "closed after {took:?}; the deadline is 2.5 s (checked every second)"
    );
    c.assert_no_panics();
}
