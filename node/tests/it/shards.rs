//! A cluster created with `--shards S` (issue 27): users and topics spread over S Raft groups
//! beside the metadata group, and every feature answers across them. Real node processes, the
//! SDK as the client.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_proto::v1 as pb;
use herald_raft::shard::{shard_of, topic_shard};

use crate::harness::{admin_request, connect, eventually, herald_with, App, Cluster, NODE_WAIT};
use crate::sdk::{client, Inbox, CLIENT_WAIT};

const SHARDS: u32 = 4;

/// One SDK client per user, on the nodes in turn, each connected.
async fn connect_in_turn(
    c: &Cluster,
    app: &App,
    users: &[String],
) -> (Vec<herald_client::Client>, Vec<Inbox>) {
    let (mut clients, mut inboxes) = (Vec::new(), Vec::new());
    for (i, u) in users.iter().enumerate() {
        let node = c.ids()[i % c.ids().len()];
        let (cl, events) = client(app, u)
            .nodes([c.client_addr(node).to_string()])
            .connect()
            .await
            .unwrap();
        let mut inbox = Inbox::new(events);
        inbox.connected(CLIENT_WAIT).await;
        clients.push(cl);
        inboxes.push(inbox);
    }
    (clients, inboxes)
}

async fn sharded(n: u64) -> Cluster {
    let mut c = Cluster::new(n).node_args(&["--shards", &SHARDS.to_string()]);
    c.start_all();
    c.wait_leader().await;
    c
}

/// A push to users of many shards through one node: one answer with a seq per user, in target
/// order; each user's device gets it; a retry with the same idempotency key answers the first
/// result; Status, DeliveryStatus and Kick are answered by each user's shard; topics and the
/// broadcast number their messages from their own shard; every group's replicas agree.
#[tokio::test(flavor = "multi_thread")]
async fn every_feature_answers_across_shards() {
    let c = sharded(3).await;
    let app = c.create_app("sharded").await;
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let homes: BTreeSet<u32> = users.iter().map(|u| shard_of(&app.id, u, SHARDS)).collect();
    assert!(homes.len() >= 3, "the users span several shards: {homes:?}");

    let (clients, mut inboxes) = connect_in_turn(&c, &app, &users).await;

    let push = |payload: &str, key: &str| {
        app.request(pb::PushRequest {
            app: app.id.clone(),
            targets: users
                .iter()
                .rev()
                .map(|u| pb::Target {
                    user: u.clone(),
                    devices: vec![],
                })
                .collect(),
            payload: payload.as_bytes().to_vec().into(),
            qos: pb::Qos::AtLeastOnce as i32,
            ttl_ms: 0,
            idempotency_key: key.into(),
            msg_id: String::new(),
        })
    };
    let mut api = connect(c.grpc_addr(2)).await.unwrap();
    let first = api.push(push("one", "k1")).await.unwrap().into_inner();
    let second = api.push(push("two", "k2")).await.unwrap().into_inner();
    let order: Vec<&str> = first.seqs.iter().map(|s| s.user.as_str()).collect();
    let want: Vec<&str> = users.iter().rev().map(String::as_str).collect();
    assert_eq!(order, want, "one seq per user, in target order");
    assert!(first.seqs.iter().all(|s| s.seq == 1), "{first:?}");
    assert!(second.seqs.iter().all(|s| s.seq == 2), "{second:?}");
    assert!(!first.duplicate);
    let again = api.push(push("one", "k1")).await.unwrap().into_inner();
    assert!(again.duplicate, "the retry answers the first result: {again:?}");
    assert_eq!(again.seqs, first.seqs);
    assert_eq!(again.msg_id, first.msg_id);

    for (u, inbox) in users.iter().zip(inboxes.iter_mut()) {
        inbox.messages(2, CLIENT_WAIT).await;
        assert_eq!(inbox.payloads(), ["one", "two"], "user {u}");
        assert_eq!(inbox.seqs(), [1, 2], "user {u}");
    }

    // Linearizable reads at each user's shard leader, asked through any node.
    for (i, u) in users.iter().enumerate() {
        let mut via = connect(c.grpc_addr(c.ids()[i % 3])).await.unwrap();
        let st = via
            .status(app.request(pb::StatusRequest {
                app: app.id.clone(),
                user: u.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(st.online, "user {u}: {st:?}");
        assert_eq!(st.next_seq, 3, "user {u}: {st:?}");
    }
    let ds = eventually("every user's devices to have acked", NODE_WAIT, || async {
        let mut via = connect(c.grpc_addr(3)).await?;
        let r = via
            .delivery_status(app.request(pb::DeliveryStatusRequest {
                app: app.id.clone(),
                msg_id: first.msg_id.clone(),
            }))
            .await?
            .into_inner();
        let acked = r.users.iter().all(|u| {
            u.devices
                .iter()
                .all(|d| d.state == pb::DeliveryState::Acked as i32)
        });
        anyhow::ensure!(acked && r.users.len() == users.len(), "{r:?}");
        Ok(r)
    })
    .await;
    let listed: BTreeSet<&str> = ds.users.iter().map(|u| u.user.as_str()).collect();
    assert_eq!(
        listed,
        users.iter().map(String::as_str).collect(),
        "users of every shard"
    );

    let kicked = api
        .kick(app.request(pb::KickRequest {
            app: app.id.clone(),
            user: users[5].clone(),
            device: String::new(),
            reason: "test".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.kicked, 1);

    // Topics: each numbered gaplessly by its home shard.
    let topics = ["news", "sport", "weather", "music", "films", "books"];
    let homes: BTreeSet<u32> = topics.iter().map(|t| topic_shard(&app.id, t, SHARDS)).collect();
    assert!(homes.len() >= 2, "topics in several shards: {homes:?}");
    for round in 1..=2u64 {
        for t in topics {
            let r = api
                .publish_topic(app.request(pb::PublishRequest {
                    app: app.id.clone(),
                    topic: t.into(),
                    payload: format!("{t}-{round}").into_bytes().into(),
                    msg_id: String::new(),
                    idempotency_key: String::new(),
                }))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.seq, round, "topic {t}");
        }
    }
    let b = api
        .broadcast(app.request(pb::BroadcastRequest {
            app: app.id.clone(),
            payload: b"all".to_vec().into(),
            msg_id: String::new(),
            idempotency_key: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.seq, 1);
    for (u, inbox) in users
        .iter()
        .zip(inboxes.iter_mut())
        .filter(|(u, _)| **u != users[5])
    {
        inbox
            .until("the broadcast", CLIENT_WAIT, |i| {
                i.messages.iter().any(|m| m.topic.as_deref() == Some("*"))
            })
            .await;
        assert_eq!(inbox.seqs().iter().filter(|s| **s > 0).count(), 2, "user {u}");
    }

    // Every group (the metadata group and the 4 shards) on every node, and they agree.
    let v = eventually("the replicas to be comparable", NODE_WAIT, || async {
        let mut c1 = connect(c.grpc_addr(1)).await?;
        let r = c1
            .verify_replicas(admin_request(pb::VerifyReplicasRequest { timeout_ms: 10_000 }))
            .await?
            .into_inner();
        anyhow::ensure!(r.verdict == "consistent", "{r:?}");
        Ok(r)
    })
    .await;
    let groups: BTreeSet<u32> = v.replicas.iter().map(|r| r.group).collect();
    assert_eq!(groups, (0..=SHARDS).collect(), "{v:?}");
    assert_eq!(v.replicas.len(), 3 * (SHARDS as usize + 1));
    drop(clients);
    c.assert_no_panics();
}

/// A data dir keeps the shard count it was created with; a node named another refuses to start
/// and says which; a cluster of one group cannot be sharded in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_data_dir_keeps_its_shard_count() {
    let mut c = Cluster::new(1).node_args(&["--shards", "2"]);
    c.start_all();
    c.wait_leader().await;
    c.stop(1).await;
    assert_eq!(
        std::fs::read_to_string(c.data_dir(1).join("shards"))
            .unwrap()
            .trim(),
        "2"
    );
    let mut args = c.spec(1).args();
    let at = args.iter().position(|a| a == "--shards").unwrap();
    args[at + 1] = "3".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = herald_with(&args, &[], Duration::from_secs(30)).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.contains("belongs to a cluster of 2 shards") && out.stderr.contains("--shards 2"),
        "{out:#?}"
    );

    // A data dir from before shards: group 0's state machine, no record.
    let mut old = Cluster::new(1);
    old.start_all();
    old.wait_leader().await;
    old.stop(1).await;
    std::fs::remove_file(old.data_dir(1).join("shards")).unwrap();
    let mut args = old.spec(1).args();
    args.extend(["--shards".into(), "4".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = herald_with(&args, &[], Duration::from_secs(30)).await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("cannot be sharded in place"), "{out:#?}");
}

/// kill -9 of the node a client is on, in a sharded cluster: every push acknowledged meanwhile
/// reaches the client on another node, exactly once and in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_after_its_node_is_killed_in_a_sharded_cluster() {
    let mut c =
        Cluster::new(3).node_args(&["--shards", &SHARDS.to_string(), "--client-heartbeat-ms", "1000"]);
    c.start_all();
    c.wait_leader().await;
    let app: App = c.create_app("sharded-failover").await;
    let (_client, events) = client(&app, "alice")
        .dispatch_seeds(crate::sdk::seeds(&c))
        .connect()
        .await
        .unwrap();
    let mut inbox = Inbox::new(events);
    let home = inbox.connected(CLIENT_WAIT).await;
    let others: Vec<u64> = c.ids().into_iter().filter(|id| *id != home).collect();
    let mut pushed = Vec::new();
    for i in 0..3 {
        let via = c.grpc_addr(others[i % 2]).to_string();
        pushed.push(
            app.push_acked(&via, "alice", &format!("before-{i}"), &format!("b{i}"))
                .await,
        );
    }
    inbox.messages(3, CLIENT_WAIT).await;
    c.kill9(home);
    for i in 0..6 {
        let via = c.grpc_addr(others[i % 2]).to_string();
        pushed.push(
            app.push_acked(&via, "alice", &format!("during-{i}"), &format!("d{i}"))
                .await,
        );
    }
    inbox.connected(CLIENT_WAIT).await;
    inbox.messages(pushed.len(), CLIENT_WAIT).await;
    inbox.quiet_for(Duration::from_secs(1)).await;
    crate::sdk::assert_exactly_once(&inbox, &pushed, "alice");
}

/// Each shard's leader per the node at `id` (`herald cluster status`), and its preferred one.
async fn leaders(c: &Cluster, id: u64) -> anyhow::Result<Vec<(u32, u64, u64)>> {
    let mut api = connect(c.grpc_addr(id)).await?;
    let st = api
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner();
    Ok(st
        .groups
        .iter()
        .filter(|g| g.group != 0)
        .map(|g| (g.group, g.leader_id, g.preferred_leader_id))
        .collect())
}

/// Shard leaders spread over the nodes on their own (each node leads its preferred shards), move
/// away from a killed node, and come back to it once it restarted and caught up;
/// `herald cluster rebalance` answers with the leaders spread.
#[tokio::test(flavor = "multi_thread")]
async fn shard_leaders_spread_over_the_nodes_and_come_back_after_a_restart() {
    let mut c = Cluster::new(3).node_args(&["--shards", "6"]);
    c.start_all();
    c.wait_leader().await;
    let spread =
        |l: &[(u32, u64, u64)]| l.len() == 6 && l.iter().all(|(_, leader, preferred)| leader == preferred);
    let first = eventually("every shard led by its preferred node", NODE_WAIT, || async {
        let l = leaders(&c, 1).await?;
        anyhow::ensure!(spread(&l), "{l:?}");
        Ok(l)
    })
    .await;
    for id in c.ids() {
        let led = first.iter().filter(|(_, leader, _)| *leader == id).count();
        assert_eq!(led, 2, "node {id} leads 2 of the 6 shards: {first:?}");
    }

    c.kill9(2);
    let moved = eventually("node 2's shards led elsewhere", NODE_WAIT, || async {
        let l = leaders(&c, 1).await?;
        anyhow::ensure!(
            l.iter().all(|(_, leader, _)| *leader != 0 && *leader != 2),
            "{l:?}"
        );
        Ok(l)
    })
    .await;
    assert!(!spread(&moved));
    c.start_node(2);
    eventually("node 2 leading its shards again", NODE_WAIT, || async {
        let l = leaders(&c, 3).await?;
        anyhow::ensure!(spread(&l), "{l:?}");
        Ok(())
    })
    .await;
    let out = crate::harness::herald_admin(c.grpc_addr(3), &["cluster", "rebalance"])
        .await
        .ok();
    let v = out.json();
    assert_eq!(v["spread"], true, "{v}");
    assert_eq!(v["groups"].as_array().map(Vec::len), Some(7), "{v}");
    c.assert_no_panics();
}

/// `herald cluster add` and `remove` on a sharded cluster change every group (the metadata group
/// and each shard, each at its own leader): the added node holds every group's state, the
/// removed one is in none; pushes go on.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_add_and_remove_change_every_group() {
    let mut c = sharded(3).await;
    let app = c.create_app("sharded-members").await;
    for i in 0..8 {
        app.push_acked(c.grpc_addr(1), &format!("m{i}"), "before", &format!("b{i}"))
            .await;
    }
    let new = c.start_extra_node_with(&["--shards", &SHARDS.to_string()]);
    let new_addr = c.cluster_addr(new).to_string();
    eventually("node 4 to answer", NODE_WAIT, || c.status(new)).await;
    let via = c.grpc_addr(2).to_string();
    let r = crate::harness::herald_admin(
        &via,
        &["cluster", "add", "--id", "4", "--cluster-addr", &new_addr],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["voters"], serde_json::json!([1, 2, 3, 4]), "{r}");
    let groups = |id: u64| {
        let c = &c;
        async move {
            let mut api = connect(c.grpc_addr(id)).await?;
            let st = api
                .cluster_status(pb::ClusterStatusRequest {})
                .await?
                .into_inner();
            anyhow::Ok(st.groups)
        }
    };
    let g = groups(1).await.unwrap();
    assert_eq!(g.len(), SHARDS as usize + 1);
    assert!(
        g.iter().all(|g| g.voters.contains(&4)),
        "node 4 a voter of every group: {g:?}"
    );
    // Node 4 holds every group's state: every replica agrees.
    eventually("every group's replicas to agree", NODE_WAIT, || async {
        let mut api = connect(c.grpc_addr(4)).await?;
        let r = api
            .verify_replicas(admin_request(pb::VerifyReplicasRequest { timeout_ms: 10_000 }))
            .await?
            .into_inner();
        anyhow::ensure!(
            r.verdict == "consistent" && r.replicas.len() == 4 * (SHARDS as usize + 1),
            "{r:?}"
        );
        Ok(())
    })
    .await;

    let r = crate::harness::herald_admin(&via, &["cluster", "remove", "--id", "4"])
        .await
        .ok()
        .json();
    assert_eq!(r["voters"], serde_json::json!([1, 2, 3]), "{r}");
    let g = groups(1).await.unwrap();
    assert!(
        g.iter()
            .all(|g| !g.voters.contains(&4) && !g.learners.contains(&4)),
        "node 4 in no group: {g:?}"
    );
    c.kill9(new);
    for i in 0..8 {
        let r = app
            .push_acked(&via, &format!("m{i}"), "after", &format!("a{i}"))
            .await;
        assert_eq!(r.seqs[0].seq, 2, "{r:?}");
    }
    c.assert_no_panics();
}

/// Session events (the app's callbacks) of users in different shards: each shard's leader sends
/// its own outbox, every event reaches the backend once, with a key unique across shards
/// (`<app>:<group>.<id>`), online before offline for each user.
#[tokio::test(flavor = "multi_thread")]
async fn session_events_of_every_shard_reach_the_backend_once() {
    use herald_node::coordinator::test_backend::TestBackend;
    use herald_proto::callback::SessionEventKind;
    let backend = TestBackend::start().await.unwrap();
    let c = sharded(3).await;
    let app = c.create_app("sharded-events").await;
    c.update_app(&app.id, |cfg| cfg.callbacks = vec![backend.endpoint()])
        .await;
    let users: Vec<String> = (0..6).map(|i| format!("ev-{i}")).collect();
    let shards: BTreeSet<u32> = users.iter().map(|u| shard_of(&app.id, u, SHARDS)).collect();
    assert!(shards.len() >= 2, "{shards:?}");
    let (clients, _inboxes) = connect_in_turn(&c, &app, &users).await;
    for cl in clients {
        cl.close().await.unwrap();
    }
    assert!(
        backend.wait_events(2 * users.len(), NODE_WAIT).await,
        "events: {:?}",
        backend.events()
    );
    // Nothing more comes (no event sent twice by two shards or two leaders).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ev = backend.events();
    assert_eq!(ev.len(), 2 * users.len(), "{ev:?}");
    let keys: BTreeSet<&str> = ev.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys.len(), ev.len(), "keys unique across shards: {ev:?}");
    assert!(
        ev.iter()
            .all(|e| e.key.starts_with("sharded-events:") && e.key.contains('.')),
        "{ev:?}"
    );
    for u in &users {
        let kinds: Vec<SessionEventKind> = ev.iter().filter(|e| e.user == *u).map(|e| e.kind()).collect();
        assert_eq!(
            kinds,
            [SessionEventKind::Online, SessionEventKind::Offline],
            "{u}: {ev:?}"
        );
    }
}
