//! Many Raft groups on three real members in one test process: each member runs one
//! [`RaftHost`] (one log engine, one connection pool, one tonic server) and a member of every
//! group on it. Groups elect, commit and catch up independently, over the same connections, with
//! their logs in the same RocksDB; a member restarted on its data dir brings every group back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use herald_proto::raft::ProbeRequest;
use herald_raft::network::is_unknown_group;
use herald_raft::{
    AppConfig, AppLimits, DevicePolicy, Enqueue, GroupId, NoObserver, NodeId, Op, OpResult, RaftConfig,
    RaftHost, RaftNode, Target,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const GROUPS: [GroupId; 3] = [0, 1, 2];

struct Member {
    host: RaftHost,
    groups: BTreeMap<GroupId, RaftNode>,
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

    async fn start(&mut self, id: NodeId) -> Result<()> {
        let addr = self.addrs[&id];
        let deadline = Instant::now() + Duration::from_secs(5);
        let l = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(e).context("rebind"),
            }
        };
        self.start_on(id, l).await
    }

    async fn start_on(&mut self, id: NodeId, l: TcpListener) -> Result<()> {
        let cfg = config(id, self.root.path().join(format!("node-{id}")), &self.addrs);
        let host = RaftHost::open(&cfg)?;
        let mut groups = BTreeMap::new();
        for g in GROUPS {
            let node = RaftNode::start_group(cfg.clone(), Arc::new(NoObserver), &host, g).await?;
            groups.insert(g, node);
        }
        // One server for every group: the host's router.
        let svc = host.grpc_service();
        let stop = CancellationToken::new();
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
        self.members.insert(
            id,
            Member {
                host,
                groups,
                stop,
                server,
            },
        );
        Ok(())
    }

    async fn stop(&mut self, id: NodeId) {
        if let Some(m) = self.members.remove(&id) {
            for node in m.groups.values() {
                node.shutdown().await;
            }
            m.stop.cancel();
            let _ = m.server.await;
        }
    }

    fn node(&self, id: NodeId, g: GroupId) -> &RaftNode {
        &self.members[&id].groups[&g]
    }

    /// Waits until every running member names the same running leader of group `g`.
    async fn leader(&self, g: GroupId, limit: Duration) -> Result<NodeId> {
        let deadline = Instant::now() + limit;
        loop {
            let leaders: Vec<Option<NodeId>> = self
                .members
                .values()
                .map(|m| m.groups[&g].leader().map(|(id, _)| id))
                .collect();
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) && self.members.contains_key(l) {
                    return Ok(*l);
                }
            }
            if Instant::now() > deadline {
                bail!("group {g}: no agreed leader within {limit:?}: {leaders:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running member of group `g` applied `index` with equal state hashes.
    async fn converged(&self, g: GroupId, index: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let mut seen = Vec::new();
            for (id, m) in &self.members {
                let r = m.groups[&g].reader();
                seen.push((*id, r.applied_index(), r.state_hash()?));
            }
            let done = seen.iter().all(|s| s.1 >= index)
                && seen.windows(2).all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2);
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("group {g}: members did not converge on index {index}: {seen:?}");
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
        payload: Bytes::from(vec![b'x'; 100]),
        ttl_ms: 0,
        idempotency_key: None,
    })
}

/// `n` pushes to `user` through `node` from 4 concurrent writers; the highest log index.
async fn pushes(node: &RaftNode, user: &str, from: u64, n: u64) -> Result<u64> {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (node, user) = (node.clone(), user.to_string());
        tasks.push(tokio::spawn(async move {
            let mut max = 0;
            let mut i = from + w;
            while i < from + n {
                let (r, idx) = node.write_one(push(&user, i)).await?;
                if !matches!(r, OpResult::Enqueued(_)) {
                    bail!("unexpected result {r:?}");
                }
                max = max.max(idx);
                i += 4;
            }
            Ok::<_, anyhow::Error>(max)
        }));
    }
    let mut max = 0;
    for t in tasks {
        max = max.max(t.await??);
    }
    Ok(max)
}

fn user_of(g: GroupId) -> String {
    format!("user-of-group-{g}")
}

/// Through a follower of each group (forwarded to that group's leader), all groups at once.
async fn push_to_every_group(c: &Cluster, from: u64, n: u64) -> Result<BTreeMap<GroupId, u64>> {
    let mut writes = Vec::new();
    for g in GROUPS {
        let leader = c.leader(g, Duration::from_secs(20)).await?;
        let via = *c.members.keys().find(|id| **id != leader).expect("a follower");
        let node = c.node(via, g).clone();
        writes.push(async move { (g, pushes(&node, &user_of(g), from, n).await) });
    }
    let mut out = BTreeMap::new();
    for (g, r) in futures::future::join_all(writes).await {
        out.insert(g, r?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_share_engine_connections_and_server_and_stay_apart() -> Result<()> {
    let mut c = Cluster::new(3).await?;
    for g in GROUPS {
        let leader = c.leader(g, Duration::from_secs(20)).await?;
        let (r, _) = c.node(leader, g).write_one(Op::PutApp(app())).await?;
        assert_eq!(r, OpResult::Done);
    }
    let done = push_to_every_group(&c, 0, 120).await?;
    for (g, idx) in &done {
        c.converged(*g, *idx, Duration::from_secs(20)).await?;
    }
    // Each group holds its own user's mailbox and nothing of the others'.
    for g in GROUPS {
        for other in GROUPS {
            let meta = c.node(1, g).reader().mailbox_meta("app1", &user_of(other))?;
            match (g == other, meta) {
                (true, Some(m)) => assert_eq!(m.next_seq, 121, "group {g}"),
                (true, None) => bail!("group {g} lost its mailbox"),
                (false, None) => {}
                (false, Some(m)) => bail!("group {g} holds group {other}'s mailbox: {m:?}"),
            }
        }
    }
    // All groups' appends went through one engine per node, fsyncs shared among them.
    for (id, m) in &c.members {
        let (syncs, completed) = m.host.engine().sync_counts();
        assert!(
            completed > syncs && syncs > 0,
            "node {id}: {completed} appends in {syncs} fsyncs"
        );
    }
    // A group the peer does not run is refused as such, not served by another group.
    let addr = c.addrs[&2].to_string();
    let req = ProbeRequest {
        group: 9,
        ..Default::default()
    };
    let refused = c.members[&1]
        .host
        .clients()
        .probe(2, &addr, req, Duration::from_secs(2))
        .await;
    match refused {
        Err(status) if is_unknown_group(&status) => {}
        other => bail!("probe of group 9 answered {other:?}"),
    }

    // A member stopped with every group, writes go on in all groups, then it comes back on its
    // data dir and every group catches up.
    c.stop(3).await;
    let done = push_to_every_group(&c, 120, 80).await?;
    c.start(3).await?;
    for (g, idx) in &done {
        c.converged(*g, *idx, Duration::from_secs(30)).await?;
        let meta = c.node(3, *g).reader().mailbox_meta("app1", &user_of(*g))?;
        assert_eq!(
            meta.map(|m| m.next_seq),
            Some(201),
            "group {g} on the restarted node"
        );
    }
    Ok(())
}
