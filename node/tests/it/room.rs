//! The room server on real node processes: delivery across nodes, the offline store and resume,
//! QoS 0, topics, multi-device kicks, TLS, and the bad-input table.

use std::time::Duration;

use herald_node::token;
use herald_proto::client::{self as pc, frame::Kind, ErrorCode, GapReason, KickReason};
use herald_proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus::{self, NotServing, Serving};

use crate::harness::{admin_request, eventually, App, Cluster, NODE_WAIT};
use crate::raw::{error_code, Raw, Who};

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn who(app: &App, user: &str, device: &str) -> Who {
    Who {
        app: app.id.clone(),
        user: user.into(),
        device: device.into(),
        platform: "ios".into(),
        token: token::mint(
            &token::Claims {
                app: app.id.clone(),
                sub: user.into(),
                dev: None,
                iat: now_s(),
                exp: now_s() + 3600,
            },
            &app.secret,
        ),
    }
}

fn payload(p: &pc::Push) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn qos1_pushed_through_node_1_reaches_a_client_on_node_3() {
    let c = Cluster::start(3).await;
    let app = c.create_app("cross").await;
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    let w = raw.hello(&who(&app, "alice", "phone"), 0).await.unwrap();
    assert_eq!(w.node_id, 3);
    assert!(w.epoch > 0);
    let r = app
        .push_acked(c.grpc_addr(1), "alice", "hello from 1", "k1")
        .await;
    let p = raw.pushes(1).await.unwrap();
    assert_eq!(p[0].msg_id, r.msg_id);
    assert_eq!(p[0].seq, 1);
    assert_eq!(p[0].session_id, 1);
    assert_eq!(payload(&p[0]), "hello from 1");
    assert_eq!(p[0].qos(), pc::Qos::AtLeastOnce);
}

/// PushStream through a follower: answers in request order, a bad push gets its error in its
/// answer and the stream goes on, every good push is stored and delivered in order; a wrong key
/// is refused when the stream opens.
#[tokio::test(flavor = "multi_thread")]
async fn push_stream_answers_in_order_and_a_bad_push_does_not_end_it() {
    let c = Cluster::start(3).await;
    let app = c.create_app("stream").await;
    // The cluster is ready once one push went through.
    app.push_acked(c.grpc_addr(2), "alice", "m0", "k0").await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut replies = c
        .client(2)
        .await
        .push_stream(app.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect("stream opens")
        .into_inner();
    for i in 1..=5 {
        let mut m = app.push_request("alice", &format!("m{i}"), "").into_inner();
        if i == 3 {
            m.targets.clear();
        }
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let mut got = Vec::new();
    while let Some(r) = replies.message().await.expect("stream ok") {
        got.push(r);
    }
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[2].code, tonic::Code::InvalidArgument as i32, "{:?}", got[2]);
    assert!(got[2].reply.is_none());
    let seqs: Vec<u64> = [0, 1, 3, 4]
        .iter()
        .map(|&i| {
            assert_eq!(got[i].code, 0, "{:?}", got[i]);
            got[i].reply.as_ref().expect("reply").seqs[0].seq
        })
        .collect();
    assert_eq!(seqs, vec![2, 3, 4, 5]);
    let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
    raw.hello(&who(&app, "alice", "phone"), 0).await.unwrap();
    let p = raw.pushes(5).await.unwrap();
    let payloads: Vec<String> = p.iter().map(payload).collect();
    assert_eq!(payloads, vec!["m0", "m1", "m2", "m4", "m5"]);

    let mut wrong = app.clone();
    wrong.api_key = "not-the-key".into();
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::PushRequest>(1);
    let refused = c
        .client(1)
        .await
        .push_stream(wrong.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect_err("a wrong key is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_user_gets_every_push_in_order_and_acked_ones_are_not_sent_again() {
    let c = Cluster::start(3).await;
    let app = c.create_app("offline").await;
    let me = who(&app, "bob", "phone");
    // Register the device once, then go away.
    let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
    raw.hello(&me, 0).await.unwrap();
    drop(raw);
    let mut ids = Vec::new();
    for i in 0..100 {
        let r = app
            .push_acked(c.grpc_addr(2), "bob", &format!("m{i}"), &format!("k{i}"))
            .await;
        ids.push(r.msg_id);
    }
    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    raw.hello(&me, 0).await.unwrap();
    let got = raw.pushes(100).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "all 100, in seq order");
    assert_eq!(got.iter().map(|p| p.msg_id.clone()).collect::<Vec<_>>(), ids);
    raw.ack(1, 60).await.unwrap();
    raw.ping(7).await.unwrap();
    // Wait until the ack is committed (Status shows the device cursor), then reconnect elsewhere.
    let mut grpc = c.client(3).await;
    eventually("the ack to be committed", NODE_WAIT, || {
        let mut grpc = grpc.clone();
        let app = app.clone();
        async move {
            let s = grpc
                .status(app.request(pb::StatusRequest {
                    app: app.id.clone(),
                    user: "bob".into(),
                }))
                .await?
                .into_inner();
            let acked = s
                .devices
                .iter()
                .find(|d| d.device == "phone")
                .map(|d| d.acked)
                .unwrap_or(0);
            anyhow::ensure!(acked == 60, "device cursor at {acked}");
            Ok(())
        }
    })
    .await;
    drop(raw);
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    let w = raw.hello(&me, 0).await.unwrap();
    assert_eq!(w.acked_seq, 60);
    let again = raw.pushes(40).await.unwrap();
    assert_eq!(
        again.first().map(|p| p.seq),
        Some(61),
        "acked messages are not sent again"
    );
    assert_eq!(again.last().map(|p| p.seq), Some(100));
    let s = grpc
        .status(app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "bob".into(),
        }))
        .await
        .unwrap();
    assert_eq!(
        s.into_inner().pending,
        40,
        "acked messages were trimmed from the mailbox"
    );
    // DeliveryStatus still answers for a message acked and removed (until its TTL), and for one
    // still held.
    let status = |msg_id: String| {
        let mut grpc = grpc.clone();
        let app = app.clone();
        async move {
            grpc.delivery_status(app.request(pb::DeliveryStatusRequest {
                app: app.id.clone(),
                msg_id,
            }))
            .await
            .map(|r| r.into_inner())
        }
    };
    let acked = status(ids[0].clone())
        .await
        .expect("status of an acked, removed message");
    assert_eq!(acked.users.len(), 1);
    assert_eq!((acked.users[0].user.as_str(), acked.users[0].seq), ("bob", 1));
    assert!(!acked.users[0].stored, "acked messages leave the mailbox");
    let states: Vec<(String, i32)> = acked.users[0]
        .devices
        .iter()
        .map(|d| (d.device.clone(), d.state))
        .collect();
    assert_eq!(
        states,
        vec![("phone".to_string(), pb::DeliveryState::Acked as i32)]
    );
    let held = status(ids[99].clone()).await.expect("status of a held message");
    assert_eq!(held.users[0].seq, 100);
    assert!(held.users[0].stored);
    assert_ne!(held.users[0].devices[0].state, pb::DeliveryState::Acked as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn qos0_reaches_online_users_only_and_drops_are_counted() {
    let c = Cluster::start(3).await;
    let app = c.create_app("qos0").await;
    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    raw.hello(&who(&app, "carol", "phone"), 0).await.unwrap();
    let mut grpc = c.client(1).await;
    let push = |user: &str| {
        app.request(pb::PushRequest {
            app: app.id.clone(),
            targets: vec![pb::Target {
                user: user.into(),
                devices: vec![],
            }],
            payload: b"now or never".to_vec().into(),
            qos: pb::Qos::AtMostOnce as i32,
            ..Default::default()
        })
    };
    let r = grpc.push(push("carol")).await.unwrap().into_inner();
    assert_eq!(
        (r.delivered, r.dropped),
        (1, 0),
        "online on another node: forwarded and delivered"
    );
    assert!(r.seqs.is_empty(), "nothing stored");
    let p = raw.pushes(1).await.unwrap();
    assert_eq!(p[0].seq, 0);
    assert_eq!(p[0].qos(), pc::Qos::AtMostOnce);
    let r = grpc.push(push("nobody")).await.unwrap().into_inner();
    assert_eq!((r.delivered, r.dropped), (0, 1), "offline: dropped and counted");
    let s = grpc
        .status(app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "nobody".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.pending, 0, "qos 0 is never stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resuming_subscriber_catches_up_on_a_topic_then_gets_live_messages() {
    let c = Cluster::start(3).await;
    let app = c.create_app("topics").await;
    let mut grpc = c.client(1).await;
    let publish = |n: u32| {
        app.request(pb::PublishRequest {
            app: app.id.clone(),
            topic: "room-7".into(),
            payload: format!("t{n}").into_bytes().into(),
            ..Default::default()
        })
    };
    for n in 1..=5 {
        let r = grpc.publish_topic(publish(n)).await.unwrap().into_inner();
        assert_eq!(r.seq, n as u64);
    }
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    raw.hello(&who(&app, "dave", "phone"), 0).await.unwrap();
    raw.send(Kind::Subscribe(pc::Subscribe {
        session_id: 1,
        topic: "room-7".into(),
        last_seq: Some(2),
        options: 0,
    }))
    .await
    .unwrap();
    let (sub, replayed) = raw
        .until(|k| {
            if let Kind::Subscribed(s) = k {
                Some(s.clone())
            } else {
                None
            }
        })
        .await
        .unwrap();
    assert_eq!(sub.error, 0);
    assert_eq!(sub.seq, 5);
    let seqs: Vec<u64> = replayed
        .iter()
        .filter_map(|k| {
            if let Kind::Push(p) = k {
                Some(p.topic_seq)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(seqs, vec![3, 4, 5], "messages after the cursor, in order");
    // A SUBSCRIBE for a session this connection does not have is answered, not ignored.
    raw.send(Kind::Subscribe(pc::Subscribe {
        session_id: 9,
        topic: "room-7".into(),
        last_seq: None,
        options: 0,
    }))
    .await
    .unwrap();
    let (refused, _) = raw
        .until(|k| match k {
            Kind::Subscribed(s) if s.session_id == 9 => Some(s.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(refused.error, ErrorCode::UnknownSession as i32, "{refused:?}");
    grpc.publish_topic(publish(6)).await.unwrap();
    let p = raw.pushes(1).await.unwrap();
    assert_eq!(
        (p[0].topic.as_str(), p[0].topic_seq, payload(&p[0]).as_str()),
        ("room-7", 6, "t6")
    );
    // Broadcast reaches every session of the app without subscribing.
    let b = grpc
        .broadcast(app.request(pb::BroadcastRequest {
            app: app.id.clone(),
            payload: b"all".to_vec().into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let p = raw.pushes(1).await.unwrap();
    assert_eq!((p[0].topic.as_str(), p[0].topic_seq), ("*", b.seq));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_login_kicks_the_older_session_across_nodes() {
    let c = Cluster::start(3).await;
    let app = c.create_app("kick").await;
    // One session per platform for this app.
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(admin_request(pb::GetAppRequest { id: app.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.policy = Some(pb::DevicePolicy {
        max_per_platform: 1,
        max_per_user: 0,
    });
    admin
        .update_app(admin_request(pb::UpdateAppRequest { app: Some(cfg) }))
        .await
        .unwrap();

    let phone = who(&app, "erin", "phone");
    let mut first = Raw::connect(c.client_addr(1)).await.unwrap();
    let w1 = first.hello(&phone, 0).await.unwrap();
    // The same device logs in on another node: the older session is fenced and kicked.
    let mut second = Raw::connect(c.client_addr(2)).await.unwrap();
    let w2 = second.hello(&phone, 0).await.unwrap();
    assert!(w2.epoch > w1.epoch);
    let (k, _) = first.until(kicked).await.unwrap();
    assert_eq!(k.code(), KickReason::Replaced);
    assert!(
        first.closed_within(Duration::from_secs(10)).await,
        "its only session ended: connection closed"
    );
    // Another device on the same platform (policy: 1 per platform), on a third node.
    let tablet = Who {
        device: "tablet".into(),
        ..phone.clone()
    };
    let mut third = Raw::connect(c.client_addr(3)).await.unwrap();
    third.hello(&tablet, 0).await.unwrap();
    let (k, _) = second.until(kicked).await.unwrap();
    assert_eq!(k.code(), KickReason::Policy);
    // The newest session still receives.
    app.push_acked(c.grpc_addr(1), "erin", "for the tablet", "k1")
        .await;
    assert_eq!(payload(&third.pushes(1).await.unwrap()[0]), "for the tablet");
    // An API kick ends it too.
    let r = c
        .client(2)
        .await
        .kick(app.request(pb::KickRequest {
            app: app.id.clone(),
            user: "erin".into(),
            device: String::new(),
            reason: "bye".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kicked, 1);
    let (k, _) = third.until(kicked).await.unwrap();
    assert_eq!(k.code(), KickReason::Admin);
}

fn kicked(k: &Kind) -> Option<pc::Kicked> {
    if let Kind::Kicked(k) = k {
        Some(k.clone())
    } else {
        None
    }
}

fn gap(k: &Kind) -> Option<pc::Gap> {
    if let Kind::Gap(g) = k {
        Some(g.clone())
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_logins_of_one_device_on_two_nodes_leave_exactly_the_newest() {
    let c = Cluster::start(3).await;
    let app = c.create_app("race").await;
    let grpc = c.client(3).await;
    for round in 0..5 {
        let user = format!("rita-{round}");
        let phone = who(&app, &user, "phone");
        let mut a = Raw::connect(c.client_addr(1)).await.unwrap();
        let mut b = Raw::connect(c.client_addr(2)).await.unwrap();
        // Both HELLOs are in flight at once, on different nodes.
        let (wa, wb) = tokio::join!(a.hello(&phone, 0), b.hello(&phone, 0));
        let (wa, wb) = (wa.unwrap(), wb.unwrap());
        assert_ne!(wa.epoch, wb.epoch, "round {round}");
        let (mut winner, mut loser, epoch) = if wa.epoch > wb.epoch {
            (a, b, wa.epoch)
        } else {
            (b, a, wb.epoch)
        };
        // The older registration is fenced: kicked as replaced and closed; the newer one stays.
        let (k, _) = loser.until(kicked).await.unwrap();
        assert_eq!(k.code(), KickReason::Replaced, "round {round}");
        assert!(
            loser.closed_within(Duration::from_secs(10)).await,
            "round {round}"
        );
        winner.ping(1).await.unwrap();
        eventually("the registry to hold only the newest session", NODE_WAIT, || {
            let mut grpc = grpc.clone();
            let req = app.request(pb::StatusRequest {
                app: app.id.clone(),
                user: user.clone(),
            });
            async move {
                let st = grpc.status(req).await?.into_inner();
                let epochs: Vec<u64> = st.sessions.iter().map(|s| s.epoch).collect();
                anyhow::ensure!(epochs == vec![epoch], "sessions {epochs:?}, want [{epoch}]");
                Ok(())
            }
        })
        .await;
        app.push_acked(c.grpc_addr(3), &user, "to the winner", &format!("race-{round}"))
            .await;
        let p = winner.pushes(1).await.unwrap();
        assert_eq!(payload(&p[0]), "to the winner");
    }
}

/// A HELLO whose registration commits only after the node answered it (NOT_READY: the write
/// timed out without a quorum) leaves a session no connection took. The node must find it and
/// unregister it; otherwise Status reports the device online until the node goes down.
#[tokio::test(flavor = "multi_thread")]
async fn a_registration_that_commits_after_its_hello_failed_is_unregistered() {
    let mut c = Cluster::new(3);
    for id in c.ids() {
        // Long elections so pausing both followers keeps the leader; a short write timeout so
        // the HELLO is answered while its entry waits for a quorum.
        c.spec_mut(id).extra_args.extend([
            "--election-timeout-ms".into(),
            "10000".into(),
            "--write-timeout-ms".into(),
            "1500".into(),
        ]);
    }
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("orphans").await;
    let followers: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
    let olga = who(&app, "olga", "phone");
    let mut raw = Raw::connect(c.client_addr(leader)).await.unwrap();
    for &f in &followers {
        c.pause(f);
    }
    raw.send(Kind::Hello(pc::Hello {
        version: 1,
        session: Some(olga.open(1, 0)),
        ..Default::default()
    }))
    .await
    .unwrap();
    let (refused, _) = raw.until(|k| error_code(k).map(|_| k.clone())).await.unwrap();
    assert_eq!(error_code(&refused), Some(ErrorCode::NotReady), "{refused:?}");
    drop(raw);
    for &f in &followers {
        c.resume(f);
    }
    // The entry commits now, for a connection that is gone; the node reaps it.
    let logged = "a registration no connection took";
    eventually("the leader to find the orphaned registration", NODE_WAIT, || {
        let n = c.log_count(leader, logged);
        async move {
            anyhow::ensure!(n == 1, "{n} log lines {logged:?}");
            Ok(())
        }
    })
    .await;
    let mut grpc = c.client(leader).await;
    eventually("the orphaned session to leave the registry", NODE_WAIT, || {
        let mut grpc = grpc.clone();
        let req = app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "olga".into(),
        });
        async move {
            let st = grpc.status(req).await?.into_inner();
            anyhow::ensure!(st.sessions.is_empty(), "sessions {:?}", st.sessions);
            Ok(())
        }
    })
    .await;
    // A real login afterwards is untouched by the reaper.
    let mut back = Raw::connect(c.client_addr(leader)).await.unwrap();
    back.hello(&olga, 0).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = grpc
        .status(app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "olga".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.sessions.len(), 1, "{:?}", st.sessions);
    back.ping(1).await.unwrap();
    assert_eq!(c.log_count(leader, logged), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_consumer_is_closed_and_its_stored_messages_wait_for_it() {
    let mut c = Cluster::new(3);
    for id in c.ids() {
        c.spec_mut(id)
            .extra_args
            .extend(["--send-queue".into(), "16".into()]);
    }
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("slow").await;
    let mut grpc = c.client(1).await;
    // A client that subscribes, then never reads again.
    let sam = who(&app, "sam", "phone");
    let mut slow = Raw::connect(c.client_addr(1)).await.unwrap();
    let mut open = sam.open(1, 0);
    open.topics = vec![pc::TopicCursor {
        topic: "firehose".into(),
        last_seq: None,
    }];
    slow.send(Kind::Hello(pc::Hello {
        version: 1,
        session: Some(open),
        ..Default::default()
    }))
    .await
    .unwrap();
    slow.until(|k| matches!(k, Kind::Subscribed(_)).then_some(()))
        .await
        .unwrap();
    let mut good = Raw::connect(c.client_addr(1)).await.unwrap();
    good.hello(&who(&app, "good", "phone"), 0).await.unwrap();
    for n in 1..=5 {
        app.push_acked(c.grpc_addr(1), "sam", &format!("stored-{n}"), &format!("s{n}"))
            .await;
    }
    // 32 KiB topic messages until the node gives up on the client (socket buffers full, then
    // the 16-frame send queue): the session goes offline while the client has read nothing.
    let big = bytes::Bytes::from(vec![7u8; 32 * 1024]);
    let status = |grpc: &mut herald_proto::v1::herald_client::HeraldClient<tonic::transport::Channel>| {
        let mut grpc = grpc.clone();
        let req = app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "sam".into(),
        });
        async move { grpc.status(req).await.map(|r| r.into_inner()) }
    };
    let mut closed = false;
    for i in 0..1500 {
        grpc.publish_topic(app.request(pb::PublishRequest {
            app: app.id.clone(),
            topic: "firehose".into(),
            payload: big.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
        if i % 50 == 49 && !status(&mut grpc).await.unwrap().online {
            closed = true;
            break;
        }
    }
    if !closed {
        eventually("the slow consumer to be closed", Duration::from_secs(40), || {
            let f = status(&mut grpc);
            async move {
                anyhow::ensure!(!f.await?.online, "still online");
                Ok(())
            }
        })
        .await;
    }
    // What it was sent before is still readable, then the connection ends.
    assert!(slow.closed_within(Duration::from_secs(30)).await);
    // Its QoS 1 messages stayed stored and arrive on the next connection; others were unaffected.
    assert_eq!(status(&mut grpc).await.unwrap().pending, 5);
    let mut back = Raw::connect(c.client_addr(2)).await.unwrap();
    back.hello(&sam, 0).await.unwrap();
    let got: Vec<String> = back.pushes(5).await.unwrap().iter().map(payload).collect();
    assert_eq!(got, (1..=5).map(|n| format!("stored-{n}")).collect::<Vec<_>>());
    app.push_acked(c.grpc_addr(2), "good", "still here", "g1").await;
    assert_eq!(payload(&good.pushes(1).await.unwrap()[0]), "still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_its_error_and_other_clients_keep_receiving() {
    let mut c = Cluster::new(3);
    // A low accept rate so the flood case trips it quickly.
    for id in c.ids() {
        c.spec_mut(id).extra_args.extend([
            "--accept-rate-per-ip".into(),
            "20".into(),
            "--max-frame".into(),
            "4096".into(),
            "--auth-timeout-ms".into(),
            "2000".into(),
        ]);
    }
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("bad").await;
    let other = c.create_app("other").await;
    let addr = c.client_addr(1).to_string();
    // A well-behaved client on the same node, checked after every case.
    let mut good = Raw::connect(&addr).await.unwrap();
    good.hello(&who(&app, "good", "phone"), 0).await.unwrap();
    let mut n = 0;

    // Garbage bytes: a length prefix followed by something that is not a Frame.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.send_bytes(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert_eq!(error_code(&r.recv().await.unwrap()), Some(ErrorCode::BadFrame));
    assert!(r.closed_within(Duration::from_secs(5)).await);
    check_good(&c, &app, &mut good, &mut n).await;

    // A frame over the maximum size is refused from its length prefix.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.send_bytes(&[0, 0, 0x20, 0]).await.unwrap();
    assert_eq!(
        error_code(&r.recv().await.unwrap()),
        Some(ErrorCode::FrameTooLarge)
    );
    assert!(r.closed_within(Duration::from_secs(5)).await);
    check_good(&c, &app, &mut good, &mut n).await;

    // A truncated frame, then the client goes away: nothing breaks.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.send_bytes(&[0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    drop(r);
    check_good(&c, &app, &mut good, &mut n).await;
    // A truncated frame on a connection that stays open: it never completes a HELLO, so the auth
    // timeout answers it.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.send_bytes(&[0, 0, 0, 100, 1, 2, 3]).await.unwrap();
    assert_eq!(
        error_code(&r.recv_within(Duration::from_secs(10)).await.unwrap()),
        Some(ErrorCode::AuthTimeout)
    );
    assert!(r.closed_within(Duration::from_secs(5)).await);
    check_good(&c, &app, &mut good, &mut n).await;

    // A first frame that is not HELLO.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.send(Kind::Ping(pc::Ping {
        id: 1,
        interval_ms: 0,
    }))
    .await
    .unwrap();
    assert_eq!(error_code(&r.recv().await.unwrap()), Some(ErrorCode::BadRequest));
    assert!(r.closed_within(Duration::from_secs(5)).await);

    // A wrong signature, an expired token, a token for another user, an unknown app.
    let cases: Vec<(Who, ErrorCode)> = vec![
        (
            Who {
                token: who(&other, "good", "x").token,
                ..who(&app, "good", "x")
            },
            ErrorCode::BadToken,
        ),
        (
            Who {
                token: token::mint(
                    &token::Claims {
                        app: app.id.clone(),
                        sub: "good".into(),
                        dev: None,
                        iat: 1,
                        exp: 2,
                    },
                    &app.secret,
                ),
                ..who(&app, "good", "x")
            },
            ErrorCode::TokenExpired,
        ),
        (
            Who {
                token: who(&app, "mallory", "x").token,
                ..who(&app, "good", "x")
            },
            ErrorCode::PermissionDenied,
        ),
        (
            Who {
                app: "nope".into(),
                ..who(&app, "good", "x")
            },
            ErrorCode::UnknownApp,
        ),
    ];
    for (w, code) in cases {
        let mut r = Raw::connect(&addr).await.unwrap();
        r.send(Kind::Hello(pc::Hello {
            version: 1,
            session: Some(w.open(1, 0)),
            client: String::new(),
            heartbeat_ms: 0,
        }))
        .await
        .unwrap();
        let k = r.recv().await.unwrap();
        assert_eq!(error_code(&k), Some(code), "{k:?}");
        assert!(r.closed_within(Duration::from_secs(5)).await);
    }
    // An unsupported protocol version.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.send(Kind::Hello(pc::Hello {
        version: 99,
        session: Some(who(&app, "good", "x").open(1, 0)),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        error_code(&r.recv().await.unwrap()),
        Some(ErrorCode::UnsupportedVersion)
    );
    check_good(&c, &app, &mut good, &mut n).await;

    // A push to another app's user with this app's key is refused.
    let mut grpc = c.client(1).await;
    let mut req = app.push_request("good", "x", "");
    req.get_mut().app = other.id.clone();
    let e = grpc.push(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut bad_key = other.push_request("good", "x", "");
    bad_key
        .metadata_mut()
        .insert("x-herald-api-key", "wrong-key-wrong-key".parse().unwrap());
    assert_eq!(
        grpc.push(bad_key).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // Nor can it read another app's users, look up its messages or kick them.
    let e = grpc
        .status(app.request(pb::StatusRequest {
            app: other.id.clone(),
            user: "good".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "status: {e}");
    let e = grpc
        .delivery_status(app.request(pb::DeliveryStatusRequest {
            app: other.id.clone(),
            msg_id: "m".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "delivery status: {e}");
    let e = grpc
        .kick(app.request(pb::KickRequest {
            app: other.id.clone(),
            user: "good".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "kick: {e}");

    // A payload that would not fit in a client frame of this node (4096 bytes) is refused at the
    // API, never stored to poison the client's replay; one that fits is delivered.
    let fits = 4096 - herald_proto::frame::PUSH_HEADROOM;
    let too_big = "x".repeat(fits + 1);
    let e = grpc
        .push(app.push_request("good", &too_big, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("frame"), "{e}");
    let big = "y".repeat(fits);
    app.push_acked(c.grpc_addr(1), "good", &big, "big").await;
    let p = good.pushes(1).await.unwrap();
    assert_eq!(p[0].payload.len(), fits);
    check_good(&c, &app, &mut good, &mut n).await;

    // A flood of connections (and HELLOs) from one address: the rate limit (20/s, bursts of 20)
    // answers RATE_LIMITED; no more are let in than the bucket allows.
    // All at once (not one after another): on a loaded machine 60 sequential connects can take
    // longer than the bucket needs to refill, and then nothing is limited.
    let (mut limited, mut welcomed, mut other_answers) = (0u32, 0u32, Vec::new());
    let started = std::time::Instant::now();
    let flood = (0..60).map(|i| {
        let (addr, hello) = (addr.clone(), who(&app, &format!("flood-{i}"), "d").open(1, 0));
        async move {
            let mut r = Raw::connect(&addr).await.unwrap();
            let _ = r
                .send(Kind::Hello(pc::Hello {
                    version: 1,
                    session: Some(hello),
                    ..Default::default()
                }))
                .await;
            let answer = r.recv_within(Duration::from_secs(10)).await;
            (r, answer)
        }
    });
    let mut open = Vec::new();
    for (r, answer) in futures::future::join_all(flood).await {
        match answer {
            Ok(Kind::Welcome(_)) => welcomed += 1,
            Ok(k) if error_code(&k) == Some(ErrorCode::RateLimited) => limited += 1,
            other => other_answers.push(format!("{other:?}")),
        }
        open.push(r);
    }
    let allowed = 20.0 + 20.0 * started.elapsed().as_secs_f64();
    assert!(
        other_answers.is_empty(),
        "every connection is welcomed or refused: {other_answers:?}"
    );
    assert!(limited > 0, "the flood hit the per-address accept rate limit");
    assert!(
        f64::from(welcomed) <= allowed + 1.0,
        "{welcomed} connections let in, the bucket allows {allowed:.0}"
    );
    drop(open);
    check_good(&c, &app, &mut good, &mut n).await;
}

/// A push to the well-behaved client arrives: the node still serves others.
async fn check_good(c: &Cluster, app: &App, good: &mut Raw, n: &mut u32) {
    *n += 1;
    let key = format!("good-{n}");
    app.push_acked(c.grpc_addr(2), "good", &key, &key).await;
    let p = good.pushes(1).await.unwrap();
    assert_eq!(payload(&p[0]), key);
}

#[tokio::test(flavor = "multi_thread")]
async fn gaps_are_reported_when_messages_were_trimmed_or_expired() {
    let c = Cluster::start(3).await;
    let app = c.create_app("gaps").await;
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(admin_request(pb::GetAppRequest { id: app.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.limits.as_mut().unwrap().mailbox_cap = 5;
    admin
        .update_app(admin_request(pb::UpdateAppRequest { app: Some(cfg) }))
        .await
        .unwrap();
    let me = who(&app, "gary", "phone");
    let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
    raw.hello(&me, 0).await.unwrap();
    drop(raw);
    for i in 1..=8 {
        app.push_acked(c.grpc_addr(1), "gary", &format!("m{i}"), &format!("k{i}"))
            .await;
    }
    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    raw.hello(&me, 0).await.unwrap();
    let (g, _) = raw.until(gap).await.unwrap();
    assert_eq!((g.from_seq, g.to_seq, g.reason()), (1, 3, GapReason::Trimmed));
    let p = raw.pushes(5).await.unwrap();
    assert_eq!(p.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);

    // A user who has never connected: pushes are stored; the two with a short TTL expire (by log
    // time) and are reported as an EXPIRED gap when the user finally connects.
    let mut grpc = c.client(1).await;
    for (i, ttl) in [(1, 300), (2, 300), (3, 0)] {
        let mut req = app.push_request("nina", &format!("n{i}"), &format!("n{i}"));
        req.get_mut().ttl_ms = ttl;
        grpc.push(req).await.unwrap();
    }
    let pending = |grpc: &mut herald_proto::v1::herald_client::HeraldClient<tonic::transport::Channel>| {
        let mut grpc = grpc.clone();
        let req = app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "nina".into(),
        });
        async move { grpc.status(req).await.map(|r| r.into_inner().pending) }
    };
    let stored = pending(&mut grpc).await.unwrap();
    assert!(
        stored >= 1,
        "a never-connected user's pushes are stored ({stored} pending)"
    );
    eventually("the short-TTL pushes to expire", NODE_WAIT, || {
        let f = pending(&mut grpc);
        async move {
            let n = f.await?;
            anyhow::ensure!(n == 1, "{n} pending");
            Ok(())
        }
    })
    .await;
    let mut nina = Raw::connect(c.client_addr(3)).await.unwrap();
    nina.hello(&who(&app, "nina", "tablet"), 0).await.unwrap();
    let (g, _) = nina.until(gap).await.unwrap();
    assert_eq!((g.from_seq, g.to_seq, g.reason()), (1, 2, GapReason::Expired));
    let p = nina.pushes(1).await.unwrap();
    assert_eq!((p[0].seq, payload(&p[0]).as_str()), (3, "n3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_reaches_the_backend_and_session_events_are_sent_from_the_log() {
    use herald_node::coordinator::test_backend::TestBackend;
    use herald_proto::callback::SessionEventKind;
    let backend = TestBackend::start().await.unwrap();
    backend.set_reply_prefix(&b"echo:"[..]);
    let c = Cluster::start(3).await;
    let app = c.create_app("upstream").await;
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(admin_request(pb::GetAppRequest { id: app.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.callbacks = vec![backend.endpoint()];
    admin
        .update_app(admin_request(pb::UpdateAppRequest { app: Some(cfg) }))
        .await
        .unwrap();
    c.wait_caught_up(2).await;

    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    raw.hello(&who(&app, "hank", "phone"), 0).await.unwrap();
    for i in 0..3u64 {
        raw.send(Kind::Upstream(pc::Upstream {
            session_id: 1,
            request_id: 10 + i,
            payload: format!("up{i}").into_bytes().into(),
        }))
        .await
        .unwrap();
    }
    let mut replies = Vec::new();
    while replies.len() < 3 {
        if let Kind::UpstreamReply(r) = raw.recv().await.unwrap() {
            assert_eq!(r.error, 0, "{r:?}");
            replies.push((r.request_id, String::from_utf8_lossy(&r.payload).into_owned()));
        }
    }
    replies.sort();
    assert_eq!(
        replies,
        vec![
            (10, "echo:up0".into()),
            (11, "echo:up1".into()),
            (12, "echo:up2".into())
        ]
    );
    let order: Vec<u64> = backend.upstreams().iter().map(|a| a.request.request_id).collect();
    assert_eq!(
        order,
        vec![10, 11, 12],
        "one user's upstream reaches the backend in order"
    );

    // Online, then offline when the client goes away: sent from committed events, with keys.
    drop(raw);
    assert!(
        backend.wait_events(2, NODE_WAIT).await,
        "events: {:?}",
        backend.events()
    );
    let ev = backend.events();
    let kinds: Vec<SessionEventKind> = ev.iter().map(|e| e.kind()).collect();
    assert_eq!(
        &kinds[..2],
        &[SessionEventKind::Online, SessionEventKind::Offline]
    );
    assert!(ev
        .iter()
        .all(|e| e.key.starts_with("upstream:") && e.user == "hank"));

    // A dead backend: the client gets UPSTREAM_UNAVAILABLE, never a hang.
    backend.stop().await;
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    raw.hello(&who(&app, "hank", "phone"), 0).await.unwrap();
    raw.send(Kind::Upstream(pc::Upstream {
        session_id: 1,
        request_id: 99,
        payload: b"x".to_vec().into(),
    }))
    .await
    .unwrap();
    let (r, _) = raw
        .until(|k| {
            if let Kind::UpstreamReply(r) = k {
                Some(r.clone())
            } else {
                None
            }
        })
        .await
        .unwrap();
    assert_eq!(r.error(), ErrorCode::UpstreamUnavailable);
    // With the backend dead (its session events waiting in the sender's retries), delivery goes
    // on: pushes reach the client at once.
    let started = std::time::Instant::now();
    for i in 0..3 {
        app.push_acked(
            c.grpc_addr(1),
            "hank",
            &format!("while dead {i}"),
            &format!("dead-{i}"),
        )
        .await;
    }
    let got: Vec<String> = raw.pushes(3).await.unwrap().iter().map(payload).collect();
    assert_eq!(got, ["while dead 0", "while dead 1", "while dead 2"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "delivery waited for the dead backend: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_clients_connect_with_the_dev_ca() {
    use std::sync::Arc;
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = herald_node::room::tls::dev_pki(pki_dir.path()).unwrap();
    let mut c = Cluster::new(3);
    let mut tls_addrs = Vec::new();
    for id in c.ids() {
        let addr = format!("127.0.0.1:{}", crate::harness::free_port());
        tls_addrs.push(addr.clone());
        c.spec_mut(id).extra_args.extend([
            "--tls-addr".into(),
            addr,
            "--tls-cert".into(),
            pki.cert.display().to_string(),
            "--tls-key".into(),
            pki.key.display().to_string(),
        ]);
    }
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("tls").await;

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&pki.ca).unwrap();
    for cert in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = eventually("the TLS listener", NODE_WAIT, || {
        let a = tls_addrs[0].clone();
        async move { Ok(tokio::net::TcpStream::connect(a).await?) }
    })
    .await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("handshake with the dev CA");
    let mut raw = Raw::from_io(Box::new(tls));
    raw.hello(&who(&app, "ivy", "phone"), 0).await.unwrap();
    app.push_acked(c.grpc_addr(2), "ivy", "over tls", "k1").await;
    assert_eq!(payload(&raw.pushes(1).await.unwrap()[0]), "over tls");

    // A client that does not trust the dev CA fails the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_pki = herald_node::room::tls::dev_pki(other.path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&other_pki.ca).unwrap();
    for cert in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&tls_addrs[1]).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_and_timeouts_close_only_the_offending_connection() {
    let mut c = Cluster::new(3);
    for id in c.ids() {
        c.spec_mut(id).extra_args.extend(
            [
                "--max-connections",
                "3",
                "--auth-timeout-ms",
                "1000",
                "--client-heartbeat-ms",
                "1000",
                "--client-heartbeat-min-ms",
                "500",
            ]
            .map(String::from),
        );
    }
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("limits").await;
    let addr = c.client_addr(1).to_string();
    let mut good = Raw::connect(&addr).await.unwrap();
    good.hello(&who(&app, "good", "phone"), 0).await.unwrap();
    // The well-behaved client asks for a longer heartbeat (a phone on a quiet network would),
    // so the server's idle timeout for it is far beyond this test.
    good.send(Kind::Ping(pc::Ping {
        id: 7,
        interval_ms: 20_000,
    }))
    .await
    .unwrap();
    good.until(|k| matches!(k, Kind::Pong(p) if p.id == 7).then_some(()))
        .await
        .unwrap();

    // No HELLO within the auth timeout.
    let mut silent = Raw::connect(&addr).await.unwrap();
    let k = silent.recv_within(Duration::from_secs(10)).await.unwrap();
    assert_eq!(error_code(&k), Some(ErrorCode::AuthTimeout));
    assert!(silent.closed_within(Duration::from_secs(5)).await);

    // The connection cap: two more fit, the next is refused as busy.
    let mut a = Raw::connect(&addr).await.unwrap();
    a.hello(&who(&app, "a", "phone"), 0).await.unwrap();
    let mut b = Raw::connect(&addr).await.unwrap();
    b.hello(&who(&app, "b", "phone"), 0).await.unwrap();
    let mut over = Raw::connect(&addr).await.unwrap();
    assert_eq!(
        error_code(&over.recv().await.unwrap()),
        Some(ErrorCode::ServerBusy)
    );
    drop((a, b));

    // A client that stops sending anything is closed after 2.5 heartbeats (1 s here).
    let mut idle = eventually("a free connection slot", NODE_WAIT, || {
        let addr = addr.clone();
        let me = who(&app, "idle", "phone");
        async move {
            let mut r = Raw::connect(&addr).await?;
            r.hello(&me, 0).await?;
            Ok(r)
        }
    })
    .await;
    let started = std::time::Instant::now();
    let (bye, _) = idle
        .until(|k| {
            if let Kind::Bye(b) = k {
                Some(b.clone())
            } else {
                None
            }
        })
        .await
        .expect("closed for idleness");
    assert!(bye.reason.contains("idle"), "{bye:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The well-behaved client pinged meanwhile and still receives.
    good.ping(1).await.unwrap();
    app.push_acked(c.grpc_addr(2), "good", "still here", "k1").await;
    assert_eq!(payload(&good.pushes(1).await.unwrap()[0]), "still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_clients_to_other_nodes_and_loses_nothing() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("drain").await;
    let me = who(&app, "jack", "phone");
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    raw.hello(&me, 0).await.unwrap();
    app.push_acked(c.grpc_addr(1), "jack", "before", "k0").await;
    let got = raw.pushes(1).await.unwrap();
    raw.ack(1, got[0].seq).await.unwrap();
    // Received but not acked yet when the drain starts: the ack sent after the BYE still counts.
    app.push_acked(c.grpc_addr(1), "jack", "in flight", "k0b").await;
    let second = raw.pushes(1).await.unwrap();
    raw.ping(1).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc_addr(3)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(health(&channel, "").await, Serving);
    assert_eq!(health(&channel, "herald.v1.Herald").await, Serving);
    let services = reflected_services(&channel).await;
    for s in ["herald.v1.Herald", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|x| x == s), "{s} not in {services:?}");
    }
    c.sigterm(3);
    let (bye, _) = raw
        .until(|k| {
            if let Kind::Bye(b) = k {
                Some(b.clone())
            } else {
                None
            }
        })
        .await
        .unwrap();
    assert_eq!(bye.reason, "draining");
    let expected: Vec<String> = vec![c.client_addr(1).to_string(), c.client_addr(2).to_string()];
    assert!(
        !bye.redirect.is_empty() && bye.redirect.iter().all(|a| expected.contains(a)),
        "{bye:?}"
    );
    raw.ack(1, second[0].seq).await.unwrap();
    // While it drains, the node tells health checkers to send nothing new.
    for service in ["", "herald.v1.Herald"] {
        assert_eq!(health(&channel, service).await, NotServing, "{service:?}");
    }
    assert!(raw.closed_within(Duration::from_secs(10)).await);
    let grpc = c.client(1).await;
    eventually("the ack sent after the BYE to be committed", NODE_WAIT, || {
        let mut grpc = grpc.clone();
        let req = app.request(pb::StatusRequest {
            app: app.id.clone(),
            user: "jack".into(),
        });
        async move {
            let st = grpc.status(req).await?.into_inner();
            anyhow::ensure!(
                st.devices.iter().any(|d| d.device == "phone" && d.acked == 2) && st.pending == 0,
                "{st:?}"
            );
            Ok(())
        }
    })
    .await;
    // Pushes while the client moves are stored; the client resumes on a redirect target.
    app.push_acked(c.grpc_addr(1), "jack", "during", "k1").await;
    let mut moved = Raw::connect(&bye.redirect[0]).await.unwrap();
    let w = moved.hello(&me, second[0].seq).await.unwrap();
    assert_ne!(w.node_id, 3);
    let p = moved.pushes(1).await.unwrap();
    assert_eq!(
        (p[0].seq, payload(&p[0]).as_str()),
        (3, "during"),
        "nothing lost, nothing repeated"
    );
    let status = c.wait_exit(3, Duration::from_secs(20)).await;
    assert!(status.success(), "the drained node exits cleanly");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_unreachable_past_the_timeout_is_declared_down() {
    let mut c = Cluster::new(3);
    for id in c.ids() {
        c.spec_mut(id)
            .extra_args
            .extend(["--node-down-timeout-ms".into(), "2000".into()]);
    }
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("down").await;
    let victim = c.ids().into_iter().find(|id| *id != leader).unwrap();
    let mut raw = Raw::connect(c.client_addr(victim)).await.unwrap();
    raw.hello(&who(&app, "kate", "phone"), 0).await.unwrap();
    let mut grpc = c.client(leader).await;
    let status = |grpc: &mut herald_proto::v1::herald_client::HeraldClient<tonic::transport::Channel>| {
        let mut grpc = grpc.clone();
        let app = app.clone();
        async move {
            grpc.status(app.request(pb::StatusRequest {
                app: app.id.clone(),
                user: "kate".into(),
            }))
            .await
            .map(|r| r.into_inner())
        }
    };
    assert!(status(&mut grpc).await.unwrap().online);
    c.pause(victim);
    eventually("the paused node's session to go offline", NODE_WAIT, || {
        let f = status(&mut grpc);
        async move {
            let s = f.await?;
            anyhow::ensure!(!s.online, "still online: {:?}", s.sessions);
            Ok(())
        }
    })
    .await;
    // Pushes meanwhile are stored; when the node comes back its stale session is told to move.
    app.push_acked(c.grpc_addr(leader), "kate", "while down", "k1")
        .await;
    c.resume(victim);
    let (k, _) = raw.until(kicked).await.unwrap();
    assert_eq!(k.code(), KickReason::NodeDown);
    let other = c.ids().into_iter().find(|id| *id != victim).unwrap();
    let mut again = Raw::connect(c.client_addr(other)).await.unwrap();
    again.hello(&who(&app, "kate", "phone"), 0).await.unwrap();
    let p = again.pushes(1).await.unwrap();
    assert_eq!(payload(&p[0]), "while down");
}

/// The standard health service's answer for `service` ("" = the server as a whole).
async fn health(channel: &tonic::transport::Channel, service: &str) -> ServingStatus {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check answered")
        .into_inner();
    ServingStatus::try_from(r.status).expect("a known status")
}

/// The services the node lists through gRPC server reflection (v1).
pub(crate) async fn reflected_services(channel: &tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection answered")
        .into_inner();
    let first = answers
        .message()
        .await
        .expect("a reflection reply")
        .expect("one reply");
    match first.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

/// Retained messages and kept sessions over the client protocol itself (PROTOCOL.md §3, §5, §8),
/// raw frames on three nodes: a PUBLISH_TOPIC with `retain` through node 1 is what GET_RETAINED
/// answers through node 3 (after SUBSCRIBED, marked RETAIN_STORED, nothing for a filter the
/// session lacks); a live retained message is marked RETAIN_SET; a kept session's subscriptions
/// and their options come back in the WELCOME of a login through node 2 (`session_present`), which
/// then gets the topic without subscribing.
#[tokio::test(flavor = "multi_thread")]
async fn retained_messages_and_kept_sessions_over_the_client_protocol() {
    let c = Cluster::start(3).await;
    let app = c.create_app("keepnative").await;
    c.update_app(&app.id, |cfg| cfg.client_publish = vec!["room/+".into()])
        .await;
    for id in 1..=3 {
        c.wait_caught_up(id).await;
    }
    let mut publisher = Raw::connect(c.client_addr(1)).await.unwrap();
    publisher.hello(&who(&app, "pia", "phone"), 0).await.unwrap();
    publisher
        .send(Kind::PublishTopic(pc::PublishTopic {
            session_id: 1,
            request_id: 1,
            topic: "room/a".into(),
            payload: b"sticky".to_vec().into(),
            retain: true,
            retain_ttl_ms: 0,
        }))
        .await
        .unwrap();
    let (published, _) = publisher
        .until(|k| match k {
            Kind::TopicPublished(p) => Some(p.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!((published.error, published.topic_seq), (0, 1), "{published:?}");

    // A kept session (no end) through node 3.
    let mut kept = who(&app, "kim", "phone");
    kept.platform = "native".into();
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    let mut open = kept.open(1, 0);
    open.keep = Some(pc::Keep {
        clean: false,
        expiry_s: u32::MAX,
    });
    raw.send(Kind::Hello(pc::Hello {
        version: 1,
        session: Some(open.clone()),
        client: "it-raw".into(),
        heartbeat_ms: 0,
    }))
    .await
    .unwrap();
    let (welcome, _) = raw
        .until(|k| match k {
            Kind::Welcome(w) => Some(w.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert!(
        !welcome.session_present && welcome.subscriptions.is_empty(),
        "{welcome:?}"
    );
    raw.send(Kind::GetRetained(pc::GetRetained {
        session_id: 1,
        filter: "room/+".into(),
    }))
    .await
    .unwrap();
    raw.send(Kind::Subscribe(pc::Subscribe {
        session_id: 1,
        topic: "room/+".into(),
        last_seq: None,
        options: 42,
    }))
    .await
    .unwrap();
    raw.send(Kind::GetRetained(pc::GetRetained {
        session_id: 1,
        filter: "room/+".into(),
    }))
    .await
    .unwrap();
    raw.send(Kind::Ping(pc::Ping {
        id: 7,
        interval_ms: 0,
    }))
    .await
    .unwrap();
    let (_, before) = raw
        .until(|k| matches!(k, Kind::Pong(p) if p.id == 7).then_some(()))
        .await
        .unwrap();
    let seen: Vec<String> = before
        .iter()
        .filter_map(|k| match k {
            Kind::Subscribed(s) => Some(format!("subscribed {} {}", s.topic, s.error)),
            Kind::Push(p) => Some(format!(
                "push {} {} {:?}",
                p.topic,
                String::from_utf8_lossy(&p.payload),
                p.retain()
            )),
            _ => None,
        })
        .collect();
    // The first GET_RETAINED came before the SUBSCRIBE: nothing for it.
    assert_eq!(
        seen,
        ["subscribed room/+ 0", "push room/a sticky Stored"],
        "{before:?}"
    );
    // Live: a retained publish is marked RETAIN_SET.
    publisher
        .send(Kind::PublishTopic(pc::PublishTopic {
            session_id: 1,
            request_id: 2,
            topic: "room/b".into(),
            payload: b"live".to_vec().into(),
            retain: true,
            retain_ttl_ms: 60_000,
        }))
        .await
        .unwrap();
    let (live, _) = raw
        .until(|k| match k {
            Kind::Push(p) => Some(p.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!((live.topic.as_str(), live.retain()), ("room/b", pc::Retain::Set));
    drop(raw);

    // The device again, through node 2: its subscription is back, options and all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = Raw::connect(c.client_addr(2)).await.unwrap();
    again
        .send(Kind::Hello(pc::Hello {
            version: 1,
            session: Some(open),
            client: "it-raw".into(),
            heartbeat_ms: 0,
        }))
        .await
        .unwrap();
    let (welcome, _) = again
        .until(|k| match k {
            Kind::Welcome(w) => Some(w.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert!(welcome.session_present, "{welcome:?}");
    assert_eq!(
        welcome.subscriptions,
        vec![pc::KeptSubscription {
            topic: "room/+".into(),
            options: 42
        }]
    );
    publisher
        .send(Kind::PublishTopic(pc::PublishTopic {
            session_id: 1,
            request_id: 3,
            topic: "room/c".into(),
            payload: b"again".to_vec().into(),
            retain: false,
            retain_ttl_ms: 0,
        }))
        .await
        .unwrap();
    let (p, _) = again
        .until(|k| match k {
            Kind::Push(p) if p.topic == "room/c" => Some(p.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!((&p.payload[..], p.retain()), (&b"again"[..], pc::Retain::None));
    c.assert_no_panics();
}
