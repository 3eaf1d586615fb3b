//! No acknowledged QoS-1 push is lost when nodes die with SIGKILL.
//!
//! There is no mailbox read API yet, so what a node holds is read through the mailbox sequence:
//! seqs are per user and gapless, so if user u had k acknowledged pushes, the next push to u
//! gets seq k + 1 only if all k are in the replicated state. The restarted node is also checked
//! directly: `herald cluster status` asked of that node must show it applied every index an
//! acknowledgement named.
//!
//! SIGKILL loses what the process had not handed to the kernel; it does not lose the page cache,
//! so these tests check that a node acknowledges only what it has written (and that a restarted
//! node recovers from its own files), not fsync ordering on a real power cut.

use std::collections::{BTreeMap, BTreeSet};

use crate::harness::{eventually, herald_admin, App, Cluster, NODE_WAIT};

const USERS: [&str; 3] = ["alice", "bob", "carol"];

/// One acknowledged push.
#[derive(Debug, Clone)]
struct Acked {
    user: String,
    key: String,
    payload: String,
    msg_id: String,
    seq: u64,
    log_index: u64,
}

/// Pushes `count` messages spread over [`USERS`], through every node in `via` at once (one
/// sequential stream per node, so entries are batched and forwarded), each with its own
/// idempotency key `<tag>-<i>`. Returns every acknowledgement.
async fn push_many(c: &Cluster, app: &App, via: &[u64], count: usize, tag: &str) -> Vec<Acked> {
    let streams = via.iter().enumerate().map(|(k, id)| {
        let addr = c.grpc_addr(*id).to_string();
        let mine: Vec<usize> = (0..count).filter(|i| i % via.len() == k).collect();
        async move {
            let mut acked = Vec::new();
            for i in mine {
                let user = USERS[i % USERS.len()];
                let key = format!("{tag}-{i}");
                let payload = format!("payload {tag} {i}");
                let r = app.push_acked(&addr, user, &payload, &key).await;
                assert!(!r.duplicate, "first push of {key} reported as a duplicate: {r:?}");
                assert_eq!(r.seqs.len(), 1, "one target, one seq: {r:?}");
                assert_eq!(r.seqs[0].user, user);
                acked.push(Acked {
                    user: user.into(),
                    key,
                    payload,
                    msg_id: r.msg_id,
                    seq: r.seqs[0].seq,
                    log_index: r.log_index,
                });
            }
            acked
        }
    });
    futures::future::join_all(streams)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Checks that per user the acknowledged seqs are exactly `1..=k` and message ids are unique;
/// returns k per user.
#[track_caller]
fn gapless(acked: &[Acked]) -> BTreeMap<String, u64> {
    let mut by_user: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for a in acked {
        by_user.entry(a.user.clone()).or_default().push(a.seq);
    }
    let mut counts = BTreeMap::new();
    for (user, mut seqs) in by_user {
        seqs.sort_unstable();
        let k = seqs.len() as u64;
        assert_eq!(
            seqs,
            (1..=k).collect::<Vec<_>>(),
            "seqs of {user} are not 1..={k}"
        );
        counts.insert(user, k);
    }
    let ids: BTreeSet<&str> = acked.iter().map(|a| a.msg_id.as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "message ids are not unique");
    counts
}

/// Asks node `id` itself (`herald cluster status --server <node id>`) for its applied index
/// until it reaches `index`.
async fn wait_applied_cli(c: &Cluster, id: u64, index: u64) {
    let addr = c.grpc_addr(id).to_string();
    eventually(
        &format!("node {id} to report applied index >= {index} in `herald cluster status`"),
        NODE_WAIT,
        || async {
            let out = herald_admin(&addr, &["cluster", "status"]).await;
            anyhow::ensure!(out.code == Some(0), "exit {:?}: {}", out.code, out.stderr);
            let v = out.json();
            assert_eq!(v["node_id"], id, "answered by another node: {v}");
            let me = v["members"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["node_id"] == id))
                .unwrap_or_else(|| panic!("node {id} does not list itself: {v}"));
            let applied = me["applied_index"].as_u64().unwrap_or(0);
            anyhow::ensure!(applied >= index, "applied {applied}");
            Ok(())
        },
    )
    .await;
}

/// The checks after a restart, all through node `id`: it applied everything acknowledged (and
/// what the leader had committed), the next push to each user continues the sequence, and a
/// replayed idempotency key returns the first result.
async fn check_restarted(c: &Cluster, app: &App, id: u64, acked: &[Acked], tag: &str) {
    let counts = gapless(acked);
    let max_index = acked.iter().map(|a| a.log_index).max().unwrap_or(0);
    wait_applied_cli(c, id, max_index).await;
    let leader = c.wait_leader().await;
    let committed = c.status(leader).await.expect("leader status").committed_index;
    assert!(
        committed >= max_index,
        "leader committed {committed} < acknowledged {max_index}"
    );
    wait_applied_cli(c, id, committed).await;

    let addr = c.grpc_addr(id);
    for user in USERS {
        let r = app
            .push_acked(addr, user, "after restart", &format!("{tag}-next-{user}"))
            .await;
        let expected = counts.get(user).copied().unwrap_or(0) + 1;
        assert_eq!(
            (r.seqs[0].user.as_str(), r.seqs[0].seq),
            (user, expected),
            "next push to {user} through node {id} must get seq {expected}: every acknowledged push counted once"
        );
    }
    let first = &acked[0];
    let again = app
        .push_acked(addr, &first.user, &first.payload, &first.key)
        .await;
    assert!(
        again.duplicate,
        "replayed key {} not recognized: {again:?}",
        first.key
    );
    assert_eq!(again.msg_id, first.msg_id);
    assert_eq!(again.seqs[0].seq, first.seq);
}

#[derive(Debug, Clone, Copy)]
enum Victim {
    Follower,
    Leader,
}

async fn kill9_one_node_and_restart(victim: Victim) {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("durable").await;
    let leader = c.wait_leader().await;
    let id = match victim {
        Victim::Leader => leader,
        Victim::Follower => c.ids().into_iter().find(|i| *i != leader).expect("a follower"),
    };
    let mut acked = push_many(&c, &app, &c.ids(), 60, "before").await;
    gapless(&acked);
    // Right after the last acknowledgement: entries may be unapplied (or, on a follower, not yet
    // received) when it dies.
    c.kill9(id);

    // The two survivors keep acknowledging while it is down; it must catch up on these too.
    let survivors: Vec<u64> = c.ids().into_iter().filter(|i| *i != id).collect();
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, id, "a killed node cannot lead");
    acked.extend(push_many(&c, &app, &survivors, 15, "while-down").await);
    gapless(&acked);

    c.restart(id);
    check_restarted(&c, &app, id, &acked, "restarted").await;
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_pushes_survive_kill9_of_a_follower() {
    kill9_one_node_and_restart(Victim::Follower).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_pushes_survive_kill9_of_the_leader() {
    kill9_one_node_and_restart(Victim::Leader).await;
}

/// Power-loss style: all three nodes die together right after the acknowledgements. Snapshots
/// are taken every few entries, so the restart also recovers from snapshot plus log.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_pushes_survive_kill9_of_every_node() {
    let mut c = Cluster::new(3).node_args(&["--snapshot-every", "16"]);
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("durable").await;
    let acked = push_many(&c, &app, &c.ids(), 60, "before").await;
    let counts = gapless(&acked);
    c.kill9_all();
    c.start_all();
    c.wait_leader().await;
    let max_index = acked.iter().map(|a| a.log_index).max().unwrap_or(0);
    for id in c.ids() {
        wait_applied_cli(&c, id, max_index).await;
    }
    // One more push per user through each node in turn: seqs continue k+1, k+2, k+3.
    for user in USERS {
        for (n, id) in c.ids().into_iter().enumerate() {
            let r = app
                .push_acked(
                    c.grpc_addr(id),
                    user,
                    "after power loss",
                    &format!("after-{user}-{id}"),
                )
                .await;
            assert_eq!(
                r.seqs[0].seq,
                counts[user] + 1 + n as u64,
                "push to {user} through node {id}"
            );
        }
    }
    // A replayed idempotency key still returns the first result.
    let first = &acked[0];
    let again = app
        .push_acked(c.grpc_addr(1), &first.user, &first.payload, &first.key)
        .await;
    assert!(
        again.duplicate,
        "replayed key {} not recognized: {again:?}",
        first.key
    );
    assert_eq!(
        (again.msg_id.as_str(), again.seqs[0].seq),
        (first.msg_id.as_str(), first.seq)
    );
    c.assert_no_panics();
}

/// SIGSTOP the leader: the others elect a new one and keep acknowledging; after SIGCONT the old
/// leader steps down, catches up, and pushes through it continue the same sequences.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_and_catches_up_after_resume() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("paused").await;
    let old = c.wait_leader().await;
    let mut acked = push_many(&c, &app, &c.ids(), 30, "before").await;
    let term = c.status(old).await.expect("leader status").term;
    c.pause(old);
    let new = c.wait_leader().await;
    assert_ne!(new, old, "a paused node cannot stay the established leader");
    let others: Vec<u64> = c.ids().into_iter().filter(|i| *i != old).collect();
    acked.extend(push_many(&c, &app, &others, 15, "while-paused").await);
    c.resume(old);
    check_restarted(&c, &app, old, &acked, "resumed").await;
    // It learned of the newer term (and so stopped acting as the leader of the old one).
    let s = c.status(old).await.expect("status of the resumed node");
    assert!(
        s.has_leader && s.term > term,
        "resumed node still in term {term}: {s:?}"
    );
    c.assert_no_panics();
}
