//! Three real members in one test process, each with its own RocksDB dirs and tonic server on
//! 127.0.0.1: elections, commits, leader loss, catch-up by log and by snapshot, full restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use herald_raft::{
    AppConfig, AppLimits, DevicePolicy, Enqueue, NoObserver, NodeId, Op, OpResult, RaftConfig, RaftNode,
    Target,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Member {
    node: RaftNode,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

struct Cluster {
    root: tempfile::TempDir,
    addrs: BTreeMap<NodeId, SocketAddr>,
    members: BTreeMap<NodeId, Member>,
}

fn config(id: NodeId, dir: PathBuf, peers: &BTreeMap<NodeId, SocketAddr>) -> RaftConfig {
    let peers: BTreeMap<NodeId, String> = peers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let mut c = RaftConfig::standard(id, dir, peers[&id].clone(), peers);
    c.heartbeat_ms = 50;
    c.election_timeout_min_ms = 300;
    c.election_timeout_max_ms = 600;
    c.snapshot_every = 500;
    c.keep_logs_after_snapshot = 100;
    c.write_timeout = Duration::from_secs(10);
    c
}

impl Cluster {
    async fn new(n: u64) -> Result<Cluster> {
        let root = tempfile::tempdir()?;
        let mut addrs = BTreeMap::new();
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await?;
            addrs.insert(id, l.local_addr()?);
            listeners.insert(id, l);
        }
        let mut c = Cluster {
            root,
            addrs,
            members: BTreeMap::new(),
        };
        for (id, l) in listeners {
            c.start_on(id, l).await?;
        }
        Ok(c)
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    async fn start(&mut self, id: NodeId) -> Result<()> {
        // Re-bind the member's port; retry briefly in case the old socket is still closing.
        let addr = self.addrs[&id];
        let deadline = Instant::now() + Duration::from_secs(5);
        let l = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "rebind retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("rebind"),
            }
        };
        self.start_on(id, l).await
    }

    async fn start_on(&mut self, id: NodeId, l: TcpListener) -> Result<()> {
        let node = RaftNode::start(config(id, self.dir(id), &self.addrs), Arc::new(NoObserver)).await?;
        let stop = CancellationToken::new();
        let svc = node.grpc_service();
        let s = stop.clone();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true)),
                    s.cancelled_owned(),
                )
                .await;
        });
        self.members.insert(id, Member { node, stop, server });
        Ok(())
    }

    /// Stops a member (raft and its server); its data stays on disk.
    async fn stop(&mut self, id: NodeId) {
        if let Some(m) = self.members.remove(&id) {
            m.node.shutdown().await;
            m.stop.cancel();
            let _ = m.server.await;
        }
    }

    fn node(&self, id: NodeId) -> &RaftNode {
        &self.members[&id].node
    }

    fn any(&self) -> &RaftNode {
        &self.members.values().next().expect("a running member").node
    }

    /// Waits until every running member names the same leader, which is running.
    async fn leader(&self, limit: Duration) -> Result<NodeId> {
        let deadline = Instant::now() + limit;
        loop {
            let leaders: Vec<Option<NodeId>> = self
                .members
                .values()
                .map(|m| m.node.leader().map(|(id, _)| id))
                .collect();
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) && self.members.contains_key(l) {
                    return Ok(*l);
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {limit:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running member applied `index` and their state hashes agree.
    async fn converged(&self, index: u64, limit: Duration) -> Result<u64> {
        let deadline = Instant::now() + limit;
        loop {
            let mut hashes = Vec::new();
            let mut behind = false;
            for (id, m) in &self.members {
                let r = m.node.reader();
                if r.applied_index() < index {
                    behind = true;
                }
                hashes.push((*id, r.applied_index(), r.state_hash()?));
            }
            let same = hashes.windows(2).all(|w| w[0].2 == w[1].2 && w[0].1 == w[1].1);
            if !behind && same {
                return Ok(hashes[0].2);
            }
            if Instant::now() > deadline {
                bail!("members did not converge on index {index}: {hashes:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn app() -> AppConfig {
    AppConfig {
        id: "app1".into(),
        name: "app one".into(),
        secrets: vec!["secret-secret-secret".into()],
        api_keys: vec!["key-key-key-key-key".into()],
        limits: AppLimits {
            mailbox_cap: 100_000,
            ..AppLimits::STANDARD
        },
        policy: DevicePolicy {
            max_per_platform: 0,
            max_per_user: 0,
        },
        callbacks: vec![],
        created_ms: 0,
        client_publish: Vec::new(),
    }
}

fn push(user: &str, i: u64) -> Op {
    Op::Enqueue(Enqueue {
        app: "app1".into(),
        msg_id: format!("{user}-{i}"),
        targets: vec![Target {
            user: user.into(),
            devices: vec![],
        }],
        payload: Bytes::from(vec![b'x'; 200]),
        ttl_ms: 0,
        idempotency_key: None,
    })
}

/// `n` pushes to `user` from `writers` concurrent callers through `node`; returns the highest log
/// index and checks every push got a distinct seq.
async fn pushes(node: &RaftNode, user: &str, from: u64, n: u64, writers: u64) -> Result<u64> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let node = node.clone();
        let user = user.to_string();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = from + w;
            while i < from + n {
                let (r, idx) = node.write_one(push(&user, i)).await?;
                match r {
                    OpResult::Enqueued(e) => out.push((e.seqs[0].1, idx)),
                    other => bail!("unexpected result {other:?}"),
                }
                i += writers;
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut seqs = Vec::new();
    let mut max_index = 0;
    for t in tasks {
        for (seq, idx) in t.await?? {
            seqs.push(seq);
            max_index = max_index.max(idx);
        }
    }
    seqs.sort_unstable();
    seqs.dedup();
    if seqs.len() as u64 != n {
        bail!("{} distinct seqs for {n} pushes", seqs.len());
    }
    Ok(max_index)
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_elect_commit_fail_over_and_restart() -> Result<()> {
    init_tracing();
    let mut c = Cluster::new(3).await?;
    let leader = c.leader(Duration::from_secs(20)).await?;

    // Writes through a follower are forwarded to the leader and commit.
    let follower = *c.members.keys().find(|id| **id != leader).unwrap();
    let (r, _) = c.node(follower).write_one(Op::PutApp(app())).await?;
    assert_eq!(r, OpResult::Done);
    let idx = pushes(c.node(follower), "alice", 0, 200, 8).await?;
    c.converged(idx, Duration::from_secs(20)).await?;
    let meta = c
        .node(leader)
        .reader()
        .mailbox_meta("app1", "alice")?
        .unwrap_or_default();
    assert_eq!(meta.next_seq, 201, "200 pushes took seqs 1..=200");

    // Leader lost: a new one is elected among the two left, and writes continue.
    c.stop(leader).await;
    let new_leader = c.leader(Duration::from_secs(20)).await?;
    assert_ne!(new_leader, leader);
    let idx = pushes(c.any(), "alice", 200, 100, 4).await?;
    c.converged(idx, Duration::from_secs(20)).await?;

    // The old leader comes back on its data dir and catches up.
    c.start(leader).await?;
    c.converged(idx, Duration::from_secs(30)).await?;
    assert_eq!(
        c.node(leader)
            .reader()
            .mailbox_meta("app1", "alice")?
            .unwrap_or_default()
            .next_seq,
        301
    );

    // A follower down through 10,000 writes catches up (the log it missed was compacted into
    // snapshots meanwhile, so it may need one).
    let leader = c.leader(Duration::from_secs(10)).await?;
    let lagging = *c.members.keys().find(|id| **id != leader).unwrap();
    c.stop(lagging).await;
    let idx = pushes(c.any(), "bob", 0, 10_000, 64).await?;
    c.start(lagging).await?;
    c.converged(idx, Duration::from_secs(60)).await?;
    assert_eq!(
        c.node(lagging)
            .reader()
            .mailbox_meta("app1", "bob")?
            .unwrap_or_default()
            .next_seq,
        10_001
    );

    // A follower whose data dir was wiped catches up by snapshot.
    let leader = c.leader(Duration::from_secs(20)).await?;
    let wiped = *c.members.keys().find(|id| **id != leader).unwrap();
    c.stop(wiped).await;
    std::fs::remove_dir_all(c.dir(wiped))?;
    let idx = pushes(c.any(), "carol", 0, 50, 4).await?;
    c.start(wiped).await?;
    let hash = c.converged(idx, Duration::from_secs(60)).await?;
    let snap = c.node(wiped).metrics().borrow().snapshot;
    assert!(snap.is_some(), "the wiped member was rebuilt from a snapshot");
    assert_eq!(
        c.node(wiped)
            .reader()
            .mailbox_meta("app1", "bob")?
            .unwrap_or_default()
            .next_seq,
        10_001
    );

    // All members stopped and restarted from disk: identical state, and the cluster serves again.
    for id in [1, 2, 3] {
        c.stop(id).await;
    }
    for id in [1, 2, 3] {
        c.start(id).await?;
    }
    c.leader(Duration::from_secs(30)).await?;
    let after = c.converged(idx, Duration::from_secs(30)).await?;
    assert_eq!(after, hash, "state after a full restart equals the state before");
    let idx = pushes(c.any(), "dave", 0, 10, 2).await?;
    c.converged(idx, Duration::from_secs(20)).await?;
    for id in [1, 2, 3] {
        c.stop(id).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_grows_and_shrinks_through_any_member() -> Result<()> {
    init_tracing();
    let mut c = Cluster::new(3).await?;
    let leader = c.leader(Duration::from_secs(20)).await?;
    c.node(leader).write_one(Op::PutApp(app())).await?;
    let idx = pushes(c.node(leader), "erin", 0, 100, 4).await?;

    // A fourth member, started with the others as peers, never bootstraps a second cluster.
    let l = TcpListener::bind("127.0.0.1:0").await?;
    c.addrs.insert(4, l.local_addr()?);
    c.start_on(4, l).await?;
    let addr = c.addrs[&4].to_string();
    c.node(leader)
        .add_node(4, addr, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.converged(idx, Duration::from_secs(30)).await?;
    let voters: Vec<NodeId> = c
        .node(leader)
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);

    // A non-leader refuses and names the leader.
    let follower = *c.members.keys().find(|id| **id != leader).unwrap();
    let err = c.node(follower).remove_node(4).await.unwrap_err();
    assert!(err.to_string().contains(&format!("node {leader}")), "{err}");

    c.node(leader)
        .remove_node(4)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let voters: Vec<NodeId> = c
        .node(leader)
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, vec![1, 2, 3]);
    c.stop(4).await;
    let idx = pushes(c.node(leader), "erin", 100, 10, 2).await?;
    c.converged(idx, Duration::from_secs(20)).await?;
    for id in [1, 2, 3] {
        c.stop(id).await;
    }
    Ok(())
}
