//! A running Raft member: openraft wired to the RocksDB stores and the tonic transport, plus what
//! Herald adds on top of openraft:
//!
//! - **Batched proposals**: callers hand ops to one proposer task; while a few entries are in flight
//!   it gathers everything that arrives into the next entry, so many pushes share one log entry,
//!   one replication round and one fsync.
//! - **Write forwarding**: on a follower the proposer sends its batch to the leader (raft transport
//!   `Forward`), which commits it as one entry; callers never see "not leader".
//! - **Bootstrap once**: only the lowest id of the configured peers initializes, and only when a
//!   majority of peers answers, all agree on the peer list and none has Raft state.
//! - **Membership changes**: add a node as learner, wait until it caught up, then promote it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use herald_proto::raft::{ProbeReply, ProbeRequest};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::ClusterClock;
use crate::error::{StoreError, WriteError};
use crate::log_store::{LogEngine, LogStore};
use crate::network::{
    AllowedPeers, ClusterTls, Network, NetworkOptions, PeerClients, PeerGuard, RaftRouter, RaftServiceHooks,
};
use crate::sm::{StateMachine, StateReader};
use crate::tuning::Tuning;
use crate::types::{typ, ApplyObserver, GroupId, NodeId, Op, OpResult, Request};

/// What a member needs to run. Built by the node's config layer (validated there).
#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: NodeId,
    /// Holds `raft-log/` and `sm/`.
    pub data_dir: PathBuf,
    /// The address peers reach this node's cluster gRPC service at (host:port): `--cluster-addr`,
    /// the address stored in membership. (Not the public API's address.)
    pub grpc_addr: String,
    /// Mutual TLS for the cluster plane, or `None` for plaintext (`--insecure-cluster`).
    pub tls: Option<ClusterTls>,
    /// Initial members (id -> cluster address), this node included. Used to bootstrap a fresh
    /// cluster; afterwards membership comes from the log.
    pub peers: BTreeMap<NodeId, String>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Log entries kept behind the newest snapshot (a briefly lagging follower catches up from
    /// the log instead of needing a snapshot).
    pub keep_logs_after_snapshot: u64,
    /// Most ops one log entry may carry.
    pub max_batch_ops: usize,
    /// Entries a node's proposer keeps in flight before it starts gathering the next batch.
    pub max_inflight_batches: usize,
    /// How long a write may wait for a leader and a commit before it is reported indeterminate.
    pub write_timeout: Duration,
    pub network: NetworkOptions,
    /// When the raft log is damaged ([`StoreError::Damaged`]): wipe this node's Raft state
    /// (`raft-log/`, `sm/`) and come back empty, with no vote in a term a reachable peer has
    /// reached, to catch up from the leader (by snapshot once the log was purged). Without it
    /// such a node refuses to start. An intact log is used as it is, so the flag may stay set.
    pub rejoin: bool,
    /// Shard groups of the cluster (`--shards`; 0: one group holds everything). Fixed when the
    /// cluster is created: the data dir records it, and nodes that disagree do not bootstrap.
    pub shards: u32,
}

impl RaftConfig {
    /// Timing suited to a LAN or loopback cluster.
    pub fn standard(
        node_id: NodeId,
        data_dir: PathBuf,
        grpc_addr: String,
        peers: BTreeMap<NodeId, String>,
    ) -> Self {
        RaftConfig {
            node_id,
            data_dir,
            grpc_addr,
            tls: None,
            peers,
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_every: 50_000,
            keep_logs_after_snapshot: 1000,
            max_batch_ops: 1024,
            // Measured (BENCHMARKS.md): on 2 cores, 1–2 entries in flight carry more pushes per
            // second than 8 (fewer, fuller entries; less per-entry work competing for the CPU).
            max_inflight_batches: 2,
            write_timeout: Duration::from_secs(5),
            network: NetworkOptions::standard(),
            rejoin: false,
            shards: 0,
        }
    }
}

/// Starting a member failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid raft config: {0}")]
    Config(String),
    #[error("raft failed to start: {0}")]
    Raft(String),
}

/// The peers a member accepts cluster requests from (see [`RaftNode::peer_guard`]).
struct Members(RaftNode);

impl AllowedPeers for Members {
    /// The newest membership's nodes, plus the leader this node follows: a leader that removes
    /// itself keeps replicating the change to the new members until it commits, and they must
    /// keep taking its AppendEntries although their newest membership no longer names it.
    fn allowed(&self) -> Vec<NodeId> {
        let mut ids = self.0.member_ids();
        if ids.is_empty() {
            return self.0.inner.config.peers.keys().copied().collect();
        }
        let leader = self.0.inner.raft.metrics().borrow().current_leader;
        if let Some(l) = leader.filter(|l| !ids.contains(l)) {
            ids.push(l);
        }
        ids
    }
}

/// Result of a committed batch: one result per op and the entry's log index.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub results: Vec<OpResult>,
    pub log_index: u64,
}

/// Makes the newest snapshot reach `applied` (see the gap check in [`RaftNode::start`]).
async fn cover_the_gap_with_a_snapshot(
    me: NodeId,
    sm: &mut StateMachine,
    applied: u64,
) -> Result<(), StartError> {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let newest = sm
        .get_current_snapshot()
        .await
        .map_err(|e| StartError::Raft(format!("reading the newest snapshot: {e}")))?
        .and_then(|s| s.meta.last_log_id)
        .map_or(0, |l| l.index);
    if newest >= applied {
        return Ok(());
    }
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .map_err(|e| StartError::Raft(format!("building a snapshot over the log's gap: {e}")))?;
    info!(
        node_id = me,
        previous = newest,
        snapshot = ?built.meta.last_log_id,
        "snapshot of the applied state built over the log's gap"
    );
    Ok(())
}

/// A membership change failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("this node is not the leader{}", .0.as_ref().map(|(id, a)| format!(" (leader is node {id} at {a})")).unwrap_or_default())]
    NotLeader(Option<(NodeId, String)>),
    #[error("{0}")]
    Refused(String),
    #[error("node {0} did not catch up in time")]
    CatchUpTimeout(NodeId),
}

/// One member's progress as a peer reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub node_id: NodeId,
    pub grpc_addr: String,
    pub voter: bool,
    pub reachable: bool,
    pub probe: Option<ProbeReply>,
    /// The leader's view of the member's replicated index (only when this node leads).
    pub matched_index: Option<u64>,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub committed_index: u64,
    pub members: Vec<MemberView>,
}

struct Proposal {
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<Committed, WriteError>>,
}

/// A running member. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

struct Inner {
    config: RaftConfig,
    /// This member's Raft group (0 on a single-group node).
    group: GroupId,
    /// The node's raft server, where this group's handler is mounted.
    router: RaftRouter,
    /// What this node's groups share (for [`crate::Groups`]).
    host: RaftHost,
    raft: typ::Raft,
    reader: StateReader,
    /// A handle on the log store openraft owns, for its memory figures.
    log: LogStore,
    /// When the raft service last took an AppendEntries from a leader.
    last_append: Arc<parking_lot::Mutex<Option<Instant>>>,
    clients: PeerClients,
    /// Bounded: callers wait (back-pressure) rather than queue without limit.
    proposals: mpsc::Sender<Proposal>,
    /// Extra probe fields from the node layer (e.g. its connection count).
    load: watch::Sender<u64>,
    /// The members' clocks as their probe replies report them: what entries are stamped with.
    /// The host's: a node's clock reports serve all its groups (any group's probes feed it).
    clock: Arc<ClusterClock>,
    /// After a rejoin, the log id this node must hold before it grants votes.
    vote_hold: Option<typ::LogId>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl RaftNode {
    /// Opens the stores under `config.data_dir` and starts the member of a single-group node
    /// (group 0 of a [`RaftHost`] of its own). The raft gRPC service must be served by the caller
    /// ([`RaftNode::grpc_service`]) on `config.grpc_addr`.
    pub async fn start(config: RaftConfig, observer: Arc<dyn ApplyObserver>) -> Result<RaftNode, StartError> {
        let host = RaftHost::open(&config)?;
        Self::start_group(config, observer, &host, 0).await
    }

    /// Starts this node's member of Raft group `group` on the node's shared [`RaftHost`]: its log
    /// in the host's engine, its state machine in its own dir (`sm/` for group 0,
    /// `groups/<group>/sm/` for the others), its RPCs over the host's connections and server.
    pub async fn start_group(
        config: RaftConfig,
        observer: Arc<dyn ApplyObserver>,
        host: &RaftHost,
        group: GroupId,
    ) -> Result<RaftNode, StartError> {
        if !config.peers.contains_key(&config.node_id) {
            return Err(StartError::Config(format!(
                "node id {} is not in the peer list {:?}",
                config.node_id,
                config.peers.keys().collect::<Vec<_>>()
            )));
        }
        let tuning = Tuning::for_node(config.node_id);
        let me = config.node_id;
        let sm_dir = group_sm_dir(&config.data_dir, group);
        let (log_store, rejoined) = match host.engine.group(group) {
            Err(StoreError::Damaged { path, detail }) if config.rejoin => {
                warn!(node_id = me, group, %path, %detail, "raft log damaged: rejoining (wiping this group's raft state)");
                host.engine.wipe_group(group)?;
                remove_dir_if_there(&sm_dir)?;
                (host.engine.group(group)?, true)
            }
            other => (other?, host.wiped),
        };
        let mut sm = StateMachine::open_tuned(&sm_dir, observer, tuning)?;
        let reader = sm.reader();
        let clients = host.clients.clone();
        // Entries this node applied but no longer has: the log's unsynced tail was lost (a crash
        // or power cut after the state machine's write reached the disk, which apply can do
        // before the log's fsync), or the log's end was damaged. Everything applied was
        // committed, so the state machine is a committed prefix: openraft skips the gap (`purge`
        // up to the applied id) and the leader sends what follows. A purge must never pass the
        // newest snapshot (openraft checks it and its core panics at start otherwise, found by
        // the fault suite's `damage` nemesis), so a snapshot of the applied state is built first.
        let last_log = log_store.last_log_id()?.map_or(0, |l| l.index);
        let applied = reader.applied_index();
        if applied > last_log {
            warn!(
                node_id = me,
                last_log, applied, "raft log ends before the applied index: its tail was lost"
            );
            cover_the_gap_with_a_snapshot(me, &mut sm, applied).await?;
        }
        if let Some((old, new)) = log_store.step_down_after_restart(me)? {
            info!(node_id = me, %old, %new, "led before the restart: standing again in a new term");
        }
        if rejoined {
            rejoin_vote_floor(&config, group, &clients, &log_store).await?;
        }
        let network = Network::for_group(clients.clone(), group);
        let raft_config = openraft::Config {
            cluster_name: "herald".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_logs_after_snapshot,
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let log = log_store.clone();
        let vote_hold = log_store.vote_hold()?;
        let raft = typ::Raft::new(config.node_id, Arc::new(raft_config), network, log_store, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        // openraft's metrics hold placeholders (term 0, no log) until the core task it spawned
        // publishes its first report; a probe answered meanwhile would say this node lost its
        // state (the fault suite saw one right after a restart). A clone of the metrics receiver
        // has not seen any report, so this returns at once if one was published already.
        if tokio::time::timeout(Duration::from_secs(10), raft.metrics().changed())
            .await
            .is_err()
        {
            warn!(
                node_id = config.node_id,
                "raft published no metrics within 10s of start"
            );
        }

        // Holds a membership from an earlier run: this is a restart, not a fresh node.
        let initialized = raft.is_initialized().await.unwrap_or(false);
        // Peers reach this node at the address membership holds for it; a node started on another
        // address would never hear from them. (A data dir from before the cluster plane holds the
        // old gRPC address there.)
        let recorded = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&config.node_id)
            .map(|n| n.addr.clone());
        if let Some(recorded) = recorded.filter(|a| *a != config.grpc_addr) {
            raft.shutdown().await.ok();
            return Err(StartError::Config(format!(
                "this data dir's membership has node {id} at {recorded}, but its cluster address is {now}: \
                 start it with --cluster-addr (or --advertise-cluster-addr) {recorded}, or move it with \
                 `herald cluster remove` and `herald cluster add` on a fresh data dir. A data dir from before \
                 the cluster plane recorded its gRPC address: give that address to --cluster-addr and the API \
                 a new --grpc-addr",
                id = config.node_id,
                now = config.grpc_addr,
            )));
        }
        let (tx, rx) = mpsc::channel(config.max_batch_ops * 4);
        let (load, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            config,
            group,
            router: host.router.clone(),
            host: host.clone(),
            raft,
            reader,
            log,
            last_append: Arc::new(parking_lot::Mutex::new(None)),
            clients,
            proposals: tx,
            load,
            clock: host.clock.clone(),
            vote_hold,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let node = RaftNode { inner };
        host.router.insert(group, node.grpc_handler());
        if initialized {
            node.hold_elections_after_restart();
        }
        let n = node.clone();
        node.inner.tasks.spawn(async move { n.run_proposer(rx).await });
        let n = node.clone();
        node.inner.tasks.spawn(async move { n.bootstrap().await });
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.inner.config.node_id
    }

    pub fn config(&self) -> &RaftConfig {
        &self.inner.config
    }

    /// The openraft handle (metrics, low-level calls).
    pub fn raft(&self) -> &typ::Raft {
        &self.inner.raft
    }

    /// Read handle on the local state machine.
    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    /// Bytes in RocksDB memtables: (state machine DB, log DB).
    pub fn memtable_bytes(&self) -> (u64, u64) {
        (
            self.inner.reader.memtable_bytes(),
            self.inner.log.memtable_bytes(),
        )
    }

    pub fn metrics(&self) -> watch::Receiver<typ::RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// Why this member's Raft core stopped on an error, or None while it runs (and after a clean
    /// shutdown). openraft's core quits for good on a storage error (the log store's write or
    /// fsync, the state machine's apply: a full disk, EIO) and never restarts in this process:
    /// the node is a zombie from then on, so the node layer stops being ready, moves its clients
    /// away and exits non-zero (`node::run`).
    pub fn fatal(&self) -> Option<String> {
        fatal_reason(&self.inner.raft.metrics().borrow())
    }

    /// Resolves once the Raft core stopped on an error (see [`RaftNode::fatal`]), with the reason.
    /// Never resolves while the core runs; after a clean shutdown it resolves with "raft core
    /// ended", so callers select on it beside their own shutdown signal.
    pub async fn wait_fatal(&self) -> String {
        let mut m = self.inner.raft.metrics();
        loop {
            if let Some(reason) = fatal_reason(&m.borrow_and_update()) {
                return reason;
            }
            if m.changed().await.is_err() {
                // The core task ended without reporting why (a panic).
                return fatal_reason(&m.borrow()).unwrap_or_else(|| "raft core ended".into());
            }
        }
    }

    /// Client connections on this node, reported to peers through Probe.
    pub fn set_load(&self, connections: u64) {
        self.inner.load.send_replace(connections);
    }

    /// The raft transport service to mount on this node's gRPC server: the node's one server for
    /// all its groups (the host's), this group's handler already mounted in it.
    pub fn grpc_service(
        &self,
    ) -> herald_proto::raft::raft_service_server::RaftServiceServer<
        impl herald_proto::raft::raft_service_server::RaftService,
    > {
        self.inner.router.clone().into_server()
    }

    /// This group's handler of the raft service.
    fn grpc_handler(&self) -> crate::network::RaftGrpc {
        crate::network::RaftGrpc::new(self.id(), self.inner.raft.clone(), Arc::new(Hooks(self.clone())))
            .campaign_after(Duration::from_millis(self.inner.config.election_timeout_min_ms))
            .with_last_append(self.inner.last_append.clone())
            .with_vote_hold(self.inner.vote_hold)
    }

    /// The host this member runs on, shared with the node's other groups.
    pub fn host(&self) -> &RaftHost {
        &self.inner.host
    }

    /// This member's Raft group.
    pub fn group(&self) -> GroupId {
        self.inner.group
    }

    /// A node restarted on its data dir stands for election only once it heard from a leader,
    /// or after twice the maximum election timeout plus the network's reconnect backoff if no
    /// leader reaches it (the whole cluster restarted). Without this, a restarted node whose
    /// leader had not reached it yet (its replication to the dead node was backing off) stood with
    /// a stale log 0.7–1 s after start: it made the sitting leader step down, and openraft
    /// remembered the greater log it saw, adding 2 × the maximum election timeout to that node's
    /// later elections (the slow leader failovers in BENCHMARKS.md). Safety is unaffected: a node
    /// that does not stand still votes.
    fn hold_elections_after_restart(&self) {
        let raft = self.inner.raft.clone();
        raft.runtime_config().elect(false);
        let last_append = self.inner.last_append.clone();
        let cancel = self.inner.cancel.clone();
        let hold = Duration::from_millis(2 * self.inner.config.election_timeout_max_ms)
            + self.inner.config.network.backoff_max;
        let me = self.id();
        self.inner.tasks.spawn(async move {
            let deadline = tokio::time::Instant::now() + hold;
            loop {
                let heard = last_append.lock().is_some();
                if heard || tokio::time::Instant::now() >= deadline {
                    raft.runtime_config().elect(true);
                    info!(
                        node_id = me,
                        heard_from_leader = heard,
                        "elections enabled after restart"
                    );
                    return;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
    }

    /// The interceptor the cluster server runs before every request: with TLS, only the nodes of
    /// the newest membership this node knows (voters and learners), or of its configured peers
    /// while it has no membership yet, get through.
    pub fn peer_guard(&self) -> PeerGuard {
        match self.inner.config.tls {
            Some(_) => PeerGuard::new(Arc::new(Members(self.clone()))),
            None => PeerGuard::insecure(),
        }
    }

    /// A channel to member `id` on the cluster plane (the connection its raft RPCs use), for the
    /// node's own calls: peer delivery and API calls forwarded to the leader.
    pub fn peer_channel(&self, id: NodeId) -> Result<tonic::transport::Channel, String> {
        let addr = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .ok_or_else(|| format!("node {id} is not a member"))?;
        self.inner.clients.channel(id, &addr).map_err(|e| e.to_string())
    }

    /// A digest of this replica's whole state machine and the applied index it belongs to, or
    /// `None` when an entry was applied while it was computed (ask again).
    pub fn local_state_hash(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let reader = self.reader();
        let before = reader.applied_index();
        let h = reader.state_hash()?;
        Ok((reader.applied_index() == before).then_some((before, h)))
    }

    /// Every member's state digest as (applied index, hash), asked over the cluster plane within
    /// `timeout` each: `Err` for a member that did not answer or was applying meanwhile.
    pub async fn state_hashes(&self, timeout: Duration) -> Vec<(NodeId, Result<(u64, u64), String>)> {
        let members: Vec<(NodeId, String)> = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        let asks = members.into_iter().map(|(id, addr)| {
            let me = self.clone();
            async move {
                if id == me.id() {
                    let r = match me.local_state_hash() {
                        Ok(Some(h)) => Ok(h),
                        Ok(None) => Err("applying while hashing".to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    return (id, r);
                }
                let req = ProbeRequest {
                    from: me.id(),
                    target: id,
                    want_state_hash: true,
                    group: me.group(),
                    ..Default::default()
                };
                let r = match me.inner.clients.probe(id, &addr, req, timeout).await {
                    Ok(p) if p.state_hash_index > 0 => Ok((p.state_hash_index, p.state_hash)),
                    Ok(_) => Err("no digest (applying while hashing, or nothing applied)".to_string()),
                    Err(s) => Err(format!("{}: {}", s.code(), s.message())),
                };
                (id, r)
            }
        });
        futures::future::join_all(asks).await
    }

    /// Every node of the newest membership this node knows (voters and learners).
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// The current leader and its cluster address, if known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.leader().map(|(id, _)| id) == Some(self.id())
    }

    /// Commits `ops` as part of one log entry (possibly shared with other callers' ops) and returns
    /// their results. Works on any member: followers forward to the leader.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Committed, WriteError> {
        if ops.is_empty() {
            return Err(WriteError::Invalid("empty write".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .proposals
            .send(Proposal { ops, reply: tx })
            .await
            .map_err(|_| WriteError::Shutdown)?;
        match tokio::time::timeout(self.inner.config.write_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WriteError::Shutdown),
            Err(_) => Err(WriteError::Indeterminate("timed out waiting for commit".into())),
        }
    }

    /// One op; see [`RaftNode::write`].
    pub async fn write_one(&self, op: Op) -> Result<(OpResult, u64), WriteError> {
        let c = self.write(vec![op]).await?;
        let r = c
            .results
            .into_iter()
            .next()
            .ok_or_else(|| WriteError::Indeterminate("no result".into()))?;
        Ok((r, c.log_index))
    }

    /// Gathers proposals into batches and commits them (or forwards them to the leader).
    async fn run_proposer(self, mut rx: mpsc::Receiver<Proposal>) {
        let inflight = Arc::new(Semaphore::new(self.inner.config.max_inflight_batches));
        loop {
            // Wait for a free slot first: while every slot is busy, proposals pile up in the
            // channel and the next batch takes all of them.
            let permit = tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                p = inflight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let first = tokio::select! {
                _ = self.inner.cancel.cancelled() => break,
                p = rx.recv() => match p { Some(p) => p, None => break },
            };
            let mut batch = vec![first];
            let mut n_ops = batch[0].ops.len();
            while n_ops < self.inner.config.max_batch_ops {
                match rx.try_recv() {
                    Ok(p) => {
                        n_ops += p.ops.len();
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            let node = self.clone();
            self.inner.tasks.spawn(async move {
                node.commit_batch(batch).await;
                drop(permit);
            });
        }
        // Fail whatever is still queued so callers do not wait for the timeout.
        rx.close();
        while let Ok(p) = rx.try_recv() {
            let _ = p.reply.send(Err(WriteError::Shutdown));
        }
    }

    async fn commit_batch(&self, batch: Vec<Proposal>) {
        let mut ops = Vec::with_capacity(batch.iter().map(|p| p.ops.len()).sum());
        let mut sizes = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for p in batch {
            sizes.push(p.ops.len());
            ops.extend(p.ops);
            replies.push(p.reply);
        }
        let outcome = self.commit_anywhere(ops).await;
        match outcome {
            Ok(Committed { results, log_index }) => {
                let mut results = results.into_iter();
                for (reply, n) in replies.into_iter().zip(sizes) {
                    let r: Vec<OpResult> = results.by_ref().take(n).collect();
                    let _ = reply.send(Ok(Committed {
                        results: r,
                        log_index,
                    }));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Commits one batch as one entry: locally when leading, otherwise at the leader. Waits for a
    /// leader (elections) until the write timeout; a write that may have reached a leader is never
    /// re-sent (it would commit twice).
    async fn commit_anywhere(&self, ops: Vec<Op>) -> Result<Committed, WriteError> {
        let deadline = Instant::now() + self.inner.config.write_timeout;
        let mut hint: Option<(NodeId, String)> = None;
        loop {
            let leader = hint.take().or_else(|| self.leader());
            let attempt = match leader {
                Some((id, _)) if id == self.id() => self.commit_local(ops.clone()).await,
                Some((id, addr)) if !addr.is_empty() => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.inner
                        .clients
                        .forward_in(self.group(), id, &addr, &ops, left)
                        .await
                        .map(|(results, log_index)| Committed { results, log_index })
                }
                _ => Err(WriteError::Unavailable { leader: None }),
            };
            match attempt {
                Err(WriteError::Unavailable { leader }) if Instant::now() < deadline => {
                    // Nothing was committed: wait for (another) leader and retry.
                    let current = self.leader();
                    hint = leader.filter(|l| Some(l) != current.as_ref()).or(None);
                    if hint.is_none() {
                        self.wait_leader_change(current.map(|l| l.0), deadline).await;
                    }
                }
                other => return other,
            }
        }
    }

    async fn wait_leader_change(&self, old: Option<NodeId>, deadline: Instant) {
        let mut m = self.inner.raft.metrics();
        let wait = async {
            loop {
                if m.changed().await.is_err() {
                    return;
                }
                let now = m.borrow().current_leader;
                if now.is_some() && now != old {
                    return;
                }
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        let _ = tokio::time::timeout(left, wait).await;
    }

    /// The time to stamp on an entry proposed now: cluster time as the members' clocks tell it
    /// (see [`crate::clock`]), never this node's clock alone.
    async fn stamp_ms(&self) -> u64 {
        if self.inner.reader.log_time_ms() == 0 && self.voter_ids().len() > 1 {
            // A fresh cluster's first entries: nothing to cap from, so hear the members' clocks
            // now rather than stamp this node's own (the peer monitor has not probed yet).
            self.cluster_view().await;
        }
        let local = now_ms();
        let (e, warn) = self.inner.clock.stamp(
            self.id(),
            local,
            Instant::now(),
            &self.voter_ids(),
            self.inner.reader.log_time_ms(),
        );
        if warn {
            warn!(
                node_id = self.id(),
                local_ms = local,
                cluster_ms = e.ms,
                source = ?e.source,
                "this node's wall clock disagrees with the cluster's; stamping cluster time"
            );
        }
        e.ms
    }

    /// Cluster time now as this node estimates it (what it would stamp on an entry): for timers
    /// that wait for log time to reach a deadline, such as expiry.
    pub fn cluster_now_ms(&self) -> u64 {
        self.inner
            .clock
            .estimate(
                self.id(),
                now_ms(),
                Instant::now(),
                &self.voter_ids(),
                self.inner.reader.log_time_ms(),
            )
            .ms
    }

    fn voter_ids(&self) -> Vec<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Proposes one entry on this node, which must be the leader.
    async fn commit_local(&self, ops: Vec<Op>) -> Result<Committed, WriteError> {
        let req = Request::new(self.stamp_ms().await, ops);
        match self.inner.raft.client_write(req).await {
            Ok(resp) => Ok(Committed {
                results: resp.data.results,
                log_index: resp.log_id.index,
            }),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(WriteError::Unavailable {
                leader: f
                    .leader_id
                    .map(|id| (id, f.leader_node.map(|n| n.addr).unwrap_or_default())),
            }),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(WriteError::Invalid(e.to_string()))
            }
            // The entry may already be in the leader's log when the core stops: indeterminate.
            Err(RaftError::Fatal(e)) => Err(WriteError::Indeterminate(format!("raft stopped: {e}"))),
        }
    }

    /// Bootstraps a fresh cluster exactly once: see the module docs.
    async fn bootstrap(self) {
        let me = self.id();
        let peers = self.inner.config.peers.clone();
        let Some(&lowest) = peers.keys().next() else {
            return;
        };
        loop {
            match self.inner.raft.is_initialized().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => return,
            }
            if me != lowest {
                // Only the lowest id bootstraps; the others wait to be contacted by a leader.
                debug!(
                    node_id = me,
                    bootstrapper = lowest,
                    "waiting for the cluster to be initialized"
                );
            } else {
                match self.bootstrap_check(&peers).await {
                    Ok(true) => {
                        let members: BTreeMap<NodeId, BasicNode> = peers
                            .iter()
                            .map(|(id, a)| (*id, BasicNode { addr: a.clone() }))
                            .collect();
                        match self.inner.raft.initialize(members).await {
                            Ok(()) => {
                                info!(node_id = me, peers = ?peers.keys().collect::<Vec<_>>(), "cluster initialized")
                            }
                            Err(e) => info!(node_id = me, error = %e, "cluster not initialized here"),
                        }
                        return;
                    }
                    Ok(false) => {}
                    Err(msg) => {
                        // Peers disagree about the cluster: refuse to bootstrap and keep saying why.
                        warn!(node_id = me, reason = %msg, "not bootstrapping");
                    }
                }
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// True when this node may initialize now: a majority answers, none has Raft state and all
    /// name the same peer list. Err when a peer disagrees about the cluster.
    async fn bootstrap_check(&self, peers: &BTreeMap<NodeId, String>) -> Result<bool, String> {
        let me = self.id();
        let mut reached = 1; // this node
        for (id, addr) in peers.iter().filter(|(id, _)| **id != me) {
            let req = ProbeRequest {
                from: me,
                target: *id,
                peers: peers.clone().into_iter().collect(),
                group: self.group(),
                shards: self.inner.config.shards,
                ..Default::default()
            };
            match self
                .inner
                .clients
                .probe(*id, addr, req, Duration::from_millis(800))
                .await
            {
                Ok(reply) => {
                    if reply.node_id != *id {
                        return Err(format!(
                            "{addr} answers as node {}, expected node {id}",
                            reply.node_id
                        ));
                    }
                    let theirs: BTreeMap<NodeId, String> = reply.peers.into_iter().collect();
                    if theirs != *peers {
                        return Err(format!(
                            "node {id} is configured with peers {theirs:?}, this node with {peers:?}"
                        ));
                    }
                    if reply.shards != self.inner.config.shards {
                        return Err(format!(
                            "node {id} is configured with {} shards, this node with {} (--shards \
                             must be the same on every node)",
                            reply.shards, self.inner.config.shards
                        ));
                    }
                    if reply.initialized {
                        // A cluster already exists (this node's data was wiped, or it is new):
                        // never start a second one; its leader will replicate to us.
                        return Ok(false);
                    }
                    reached += 1;
                }
                Err(e) => debug!(node_id = me, peer = id, error = %e, "peer not reachable for bootstrap"),
            }
        }
        Ok(reached * 2 > peers.len())
    }

    /// Takes the lead of this group from the sitting leader, if this node is a voter whose log
    /// has everything the leader's has (openraft 0.9 has no leadership transfer). This node stands
    /// in a new term; the leader, whose own lease has long passed, grants the vote (a candidate
    /// with its whole log) and steps down, and with it this node has a quorum of three replicas.
    /// The other followers refuse while their lease from the old leader lasts, which does not
    /// matter then. Returns why it did not stand: no leader, already leading, not a voter, behind
    /// the leader, or the leader did not answer. A leader that takes an entry between the check
    /// and the vote refuses the vote; it then steps down when it sees the higher term, and an
    /// ordinary election follows (the caller retries later, rarely).
    pub async fn take_lead(&self) -> Result<(), String> {
        let (leader, addr) = self.leader().ok_or("no leader known")?;
        if leader == self.id() {
            return Err("already the leader".into());
        }
        let (mine, voter) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.id());
            (m.last_log_index.unwrap_or(0), voter)
        };
        if !voter {
            return Err("not a voter of this group".into());
        }
        let req = ProbeRequest {
            from: self.id(),
            target: leader,
            group: self.group(),
            ..Default::default()
        };
        let theirs = self
            .inner
            .clients
            .probe(leader, &addr, req, Duration::from_millis(500))
            .await
            .map_err(|s| format!("the leader did not answer: {}", s.message()))?;
        if theirs.last_log_index > mine {
            return Err(format!(
                "behind the leader: log at {mine}, the leader's at {}",
                theirs.last_log_index
            ));
        }
        info!(
            node_id = self.id(),
            group = self.group(),
            from = leader,
            log_index = mine,
            "taking the lead of this group"
        );
        self.inner.raft.trigger().elect().await.map_err(|e| e.to_string())
    }

    /// Adds `id` as a learner, waits until it has caught up, then makes it a voter (unless
    /// `learner_only`). Must run on the leader.
    pub async fn add_node(
        &self,
        id: NodeId,
        grpc_addr: String,
        learner_only: bool,
    ) -> Result<u64, MembershipError> {
        self.require_leader()?;
        let raft = &self.inner.raft;
        // `blocking = true`: returns once the learner has replicated up to the add entry.
        let resp = raft
            .add_learner(
                id,
                BasicNode {
                    addr: grpc_addr.clone(),
                },
                true,
            )
            .await
            .map_err(|e| self.membership_error(e))?;
        info!(node_id = id, addr = %grpc_addr, log_index = resp.log_id.index, "learner added");
        if learner_only {
            return Ok(resp.log_id.index);
        }
        self.wait_caught_up(id, Duration::from_secs(60)).await?;
        let resp = raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_error(e))?;
        info!(node_id = id, log_index = resp.log_id.index, "voter added");
        Ok(resp.log_id.index)
    }

    /// Removes `id` from voters and learners. Must run on the leader.
    pub async fn remove_node(&self, id: NodeId) -> Result<u64, MembershipError> {
        self.require_leader()?;
        let raft = &self.inner.raft;
        let m = raft.metrics().borrow().membership_config.clone();
        let is_voter = m.membership().voter_ids().any(|v| v == id);
        let is_node = m.membership().get_node(&id).is_some();
        if !is_node {
            return Err(MembershipError::Refused(format!("node {id} is not a member")));
        }
        // One change either way: removing a voter without `retain` drops its node entry too. A
        // second change after it (RemoveNodes) would reach a leader that just removed itself and
        // is stepping down, which openraft 0.9 answers with a panic of its core ("Only leader is
        // allowed to call update_effective_membership()").
        let change = if is_voter {
            let voters = m.membership().voter_ids().filter(|v| *v != id).count();
            if voters == 0 {
                return Err(MembershipError::Refused("cannot remove the last voter".into()));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let r = raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.membership_error(e))?;
        let index = r.log_id.index;
        info!(
            node_id = id,
            log_index = index,
            leader_removed = id == self.id(),
            "node removed"
        );
        Ok(index)
    }

    fn require_leader(&self) -> Result<(), MembershipError> {
        match self.leader() {
            Some((id, _)) if id == self.id() => Ok(()),
            other => Err(MembershipError::NotLeader(other)),
        }
    }

    fn membership_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> MembershipError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => MembershipError::NotLeader(
                f.leader_id
                    .map(|id| (id, f.leader_node.map(|n| n.addr).unwrap_or_default())),
            ),
            other => MembershipError::Refused(other.to_string()),
        }
    }

    async fn wait_caught_up(&self, id: NodeId, limit: Duration) -> Result<(), MembershipError> {
        let deadline = Instant::now() + limit;
        let mut m = self.inner.raft.metrics();
        loop {
            {
                let mm = m.borrow();
                let last = mm.last_log_index.unwrap_or(0);
                // A learner that never acknowledged anything has not caught up, however short
                // the log is (an address nothing listens on must not become a voter).
                let matched = mm
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|l| l.index);
                if matched.is_some_and(|m| last.saturating_sub(m) <= 100) {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MembershipError::CatchUpTimeout(id));
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), m.changed()).await;
        }
    }

    /// This node's identity and progress (answers peers' probes).
    pub fn probe_reply(&self) -> ProbeReply {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        ProbeReply {
            node_id: self.id(),
            initialized: m.vote.leader_id().term > 0 || m.last_log_index.is_some(),
            peers: self.inner.config.peers.clone().into_iter().collect(),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            has_leader: m.current_leader.is_some(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            committed_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            applied_term: m.last_applied.map(|l| l.leader_id.term).unwrap_or(0),
            applied_leader: m.last_applied.map(|l| l.leader_id.node_id).unwrap_or(0),
            state: state_name(m.state).into(),
            connections: *self.inner.load.borrow(),
            state_hash: 0,
            state_hash_index: 0,
            now_ms: now_ms(),
            shards: self.inner.config.shards,
        }
    }

    /// The cluster as seen from here, with every member probed (reachable or not).
    pub async fn cluster_view(&self) -> ClusterView {
        let (leader, term, committed, membership, replication) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            (
                m.current_leader,
                m.current_term,
                m.last_applied.map(|l| l.index).unwrap_or(0),
                m.membership_config.clone(),
                m.replication.clone(),
            )
        };
        let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
        self.inner
            .clock
            .observe_log_time(self.inner.reader.log_time_ms(), Instant::now());
        let mut members = Vec::new();
        let probes = membership.membership().nodes().map(|(id, node)| {
            let id = *id;
            let addr = node.addr.clone();
            let me = self.clone();
            async move {
                let probe = if id == me.id() {
                    Some(me.probe_reply())
                } else {
                    let req = ProbeRequest {
                        from: me.id(),
                        target: id,
                        group: me.group(),
                        ..Default::default()
                    };
                    let sent = Instant::now();
                    let reply = me
                        .inner
                        .clients
                        .probe(id, &addr, req, Duration::from_millis(500))
                        .await
                        .ok();
                    if let Some(r) = &reply {
                        // The peer read its clock somewhere in the round trip: take the middle.
                        let rtt = sent.elapsed();
                        me.inner.clock.report(id, r.now_ms, sent + rtt / 2);
                    }
                    reply
                };
                (id, addr, probe)
            }
        });
        for (id, addr, probe) in futures::future::join_all(probes).await {
            let matched = replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            members.push(MemberView {
                node_id: id,
                grpc_addr: addr,
                voter: voters.contains(&id),
                reachable: probe.is_some(),
                probe,
                matched_index: matched,
            });
        }
        ClusterView {
            node_id: self.id(),
            leader,
            term,
            committed_index: committed,
            members,
        }
    }

    /// Stops the proposer and openraft. Queued writes fail with `Shutdown`.
    pub async fn shutdown(&self) {
        self.inner.router.remove(self.inner.group);
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "raft shutdown reported an error");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.tasks.wait()).await;
    }
}

/// Subdirs of the data dir: the log engine (every group's log), group 0's state machine, and the
/// dirs of the other groups (`groups/<id>/sm`).
const LOG_DIR: &str = "raft-log";
const SM_DIR: &str = "sm";
const GROUPS_DIR: &str = "groups";

/// Where group `group`'s state machine lives under the data dir.
fn group_sm_dir(data_dir: &std::path::Path, group: GroupId) -> PathBuf {
    match group {
        0 => data_dir.join(SM_DIR),
        g => data_dir.join(GROUPS_DIR).join(g.to_string()).join(SM_DIR),
    }
}

fn remove_dir_if_there(dir: &std::path::Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io {
            path: dir.display().to_string(),
            source: e,
        }),
    }
}

/// What all the Raft groups of one node share: one log engine (one RocksDB, one WAL and one fsync
/// thread for every group's log), one pool of peer connections (one channel per peer carries
/// every group's RPCs), one raft server routing each request to its group's handler, and one
/// record of the members' clocks. Cheap to clone.
#[derive(Clone)]
pub struct RaftHost {
    engine: LogEngine,
    clients: PeerClients,
    router: RaftRouter,
    /// The members' wall clocks as probes report them, one set for all groups (see `crate::clock`).
    clock: Arc<ClusterClock>,
    /// The engine's WAL was damaged and everything was wiped (`--rejoin`): every group rejoins.
    wiped: bool,
}

impl RaftHost {
    /// Opens the node's log engine under `config.data_dir`. A damaged WAL (the engine's, so every
    /// group's) refuses to open with [`StoreError::Damaged`], or with `config.rejoin` wipes the
    /// node's whole raft state (`raft-log/`, `sm/`, `groups/`) and starts empty: every group then
    /// rejoins (see `rejoin_vote_floor`).
    pub fn open(config: &RaftConfig) -> Result<RaftHost, StartError> {
        check_shard_count(&config.data_dir, config.shards)?;
        let tuning = Tuning::for_node(config.node_id);
        let log_dir = config.data_dir.join(LOG_DIR);
        let (engine, wiped) = match LogEngine::open(&log_dir, tuning) {
            Err(StoreError::Damaged { path, detail }) if config.rejoin => {
                warn!(node_id = config.node_id, %path, %detail, "raft log damaged: rejoining (wiping raft state)");
                for dir in [LOG_DIR, SM_DIR, GROUPS_DIR] {
                    remove_dir_if_there(&config.data_dir.join(dir))?;
                }
                (LogEngine::open(&log_dir, tuning)?, true)
            }
            other => (other?, false),
        };
        Ok(RaftHost {
            engine,
            clients: PeerClients::new(config.node_id, config.network.clone(), config.tls.clone()),
            router: RaftRouter::new(config.node_id),
            clock: Arc::new(ClusterClock::new()),
            wiped,
        })
    }

    /// The node's log engine.
    pub fn engine(&self) -> &LogEngine {
        &self.engine
    }

    /// The node's pool of cluster connections.
    pub fn clients(&self) -> &PeerClients {
        &self.clients
    }

    /// The raft service of every group started on this host, to mount on the cluster server.
    pub fn grpc_service(
        &self,
    ) -> herald_proto::raft::raft_service_server::RaftServiceServer<
        impl herald_proto::raft::raft_service_server::RaftService,
    > {
        self.router.clone().into_server()
    }
}

/// The file under the data dir recording the cluster's shard count.
const SHARDS_FILE: &str = "shards";

/// A data dir belongs to a cluster of one shard count for its whole life: the first start records
/// `shards` in it, later starts must name the same. A data dir from before shards (group 0's state
/// machine there, no record) is a cluster of 0 shards: it cannot become sharded in place.
fn check_shard_count(data_dir: &std::path::Path, shards: u32) -> Result<(), StartError> {
    let file = data_dir.join(SHARDS_FILE);
    let io = |e: std::io::Error| {
        StartError::Store(StoreError::Io {
            path: file.display().to_string(),
            source: e,
        })
    };
    let recorded = match std::fs::read_to_string(&file) {
        Ok(text) => Some(text.trim().parse::<u32>().map_err(|_| {
            StartError::Config(format!(
                "{} holds {:?}, not a shard count: it is not a Herald data dir, or it was damaged",
                file.display(),
                text.trim()
            ))
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => data_dir.join(SM_DIR).is_dir().then_some(0),
        Err(e) => return Err(io(e)),
    };
    match recorded {
        Some(n) if n != shards && n == 0 => Err(StartError::Config(format!(
            "{} holds a cluster of one Raft group (created without --shards); it cannot be \
             sharded in place (migration is not supported): keep starting it with --shards 0, or \
             create a new cluster with --shards {shards} on empty data dirs and recreate the apps \
             (their users reconnect and re-register there; undelivered messages stay here)",
            data_dir.display()
        ))),
        Some(n) if n != shards => Err(StartError::Config(format!(
            "{} belongs to a cluster of {n} shards: start the node with --shards {n} (the shard \
             count is fixed when a cluster is created)",
            data_dir.display()
        ))),
        Some(_) => Ok(()),
        None => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            write_synced(&file, format!("{shards}\n").as_bytes()).map_err(io)
        }
    }
}

/// Writes `path` so that after a crash or power cut it holds all of `bytes` or does not exist:
/// a temp file synced, renamed over `path`, the directory synced. (Found by the fault suite's
/// power cut: a plain write left an empty record, and the node could not start again.)
fn write_synced(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A wiped node forgot its votes, so it could grant a vote below one it granted before the wipe.
/// openraft orders votes by (term, node id) (its "advanced" leader ids: a term may see several
/// candidates, each a leader id of its own), so before openraft starts this stores the uncommitted
/// vote (T, `NodeId::MAX`), T the highest term a reachable peer reports: above every vote anyone
/// could have been granted in T (no node has that id, and an uncommitted vote names no leader),
/// so the node grants nothing in T or earlier. The
/// sitting leader of T then sees a greater vote in its replies and steps down: one election
/// (in T+1), once per rejoin. A vote given before the wipe in a term no reachable peer knows (a
/// candidate now partitioned away) cannot be seen from here; rejoin one node at a time.
///
/// A wiped node also forgot the entries it acknowledged: it may have been part of the majority
/// that committed an entry only one other node holds now. With its empty log it would grant its
/// vote to a candidate lacking that entry, and the two of them elect a leader that never had it.
/// So it also stores a vote hold, the id of the newest entry its peers report applied (the
/// leader's is the newest; this waits a few seconds for every peer to answer), and the raft
/// service refuses vote requests until this node's log reaches it, except from a candidate whose
/// last log id is at least the hold: by log matching that candidate holds every entry up to it
/// ([`crate::network::RaftGrpc::with_vote_hold`]). The hold is stored (synced) so a restart before
/// catching up keeps it. Entries committed but not yet applied by any peer at the probe are not
/// covered (a window of one apply).
async fn rejoin_vote_floor(
    config: &RaftConfig,
    group: GroupId,
    clients: &PeerClients,
    log: &LogStore,
) -> Result<(), StartError> {
    let me = config.node_id;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let others = config.peers.keys().filter(|id| **id != me).count();
    loop {
        let probes = config
            .peers
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(id, addr)| {
                let req = ProbeRequest {
                    from: me,
                    target: *id,
                    group,
                    ..Default::default()
                };
                clients.probe(*id, addr, req, Duration::from_secs(1))
            });
        let replies: Vec<(u64, Option<typ::LogId>)> = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(|r| r.ok())
            .filter(|r| r.term > 0)
            .map(|r| {
                let applied = (r.applied_index > 0).then(|| {
                    typ::LogId::new(
                        openraft::CommittedLeaderId::new(r.applied_term, r.applied_leader),
                        r.applied_index,
                    )
                });
                (r.term, applied)
            })
            .collect();
        // Every peer, or whoever answered once a few seconds passed.
        let enough =
            replies.len() == others || (!replies.is_empty() && started.elapsed() >= Duration::from_secs(5));
        if enough {
            let term = replies.iter().map(|r| r.0).max().unwrap_or(0);
            // The newest applied entry any peer reports (log ids order by leader, then index).
            let hold =
                replies
                    .iter()
                    .filter_map(|r| r.1)
                    .fold(None, |best: Option<typ::LogId>, l| match best {
                        Some(b) if b >= l => Some(b),
                        _ => Some(l),
                    });
            let vote = typ::Vote::new(term, NodeId::MAX);
            if let Some(hold) = hold {
                log.save_vote_hold_synced(&hold)?;
            }
            log.save_vote_synced(&vote)?;
            if replies.len() < others {
                warn!(
                    node_id = me,
                    answered = replies.len(),
                    of = others,
                    "rejoin: not every peer answered; the vote floor and hold come from those that did"
                );
            }
            info!(node_id = me, %vote, vote_hold = ?hold, peers_answered = replies.len(), "rejoin: vote floor set");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StartError::Raft(
                "rejoin: no peer with raft state answered within 30s; a node rejoins a running \
                 cluster"
                    .into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Answers the raft service's forward and probe calls.
struct Hooks(RaftNode);

impl RaftServiceHooks for Hooks {
    fn forward(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(Vec<OpResult>, u64), WriteError>> {
        let node = self.0.clone();
        Box::pin(async move {
            // Forwarded batches were gathered by the follower's proposer: commit as one entry.
            node.commit_local(ops).await.map(|c| (c.results, c.log_index))
        })
    }

    fn probe(&self, req: ProbeRequest) -> ProbeReply {
        let mut reply = self.0.probe_reply();
        if req.want_state_hash {
            match self.0.local_state_hash() {
                Ok(Some((index, h))) => {
                    reply.state_hash = h;
                    reply.state_hash_index = index;
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "state hash failed"),
            }
        }
        reply
    }
}

/// The error a core stopped on, from its metrics; a clean shutdown (`Fatal::Stopped`) is none.
fn fatal_reason(m: &typ::RaftMetrics) -> Option<String> {
    match &m.running_state {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(e) => Some(e.to_string()),
    }
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Env var shifting this process's wall clock ([`now_ms`]) by a signed number of milliseconds.
/// **Fault tests only** (the jepsen suite's clock-skew nemesis); never set it in production. Read
/// once, at the first call.
pub const CLOCK_OFFSET_ENV: &str = "HERALD_CLOCK_OFFSET_MS";

/// Wall clock in unix milliseconds, shifted by [`CLOCK_OFFSET_ENV`] when a fault test set it.
/// Entries are not stamped with it alone: see [`crate::clock`] (it is one of the clocks there,
/// and what this node reports in its probe replies).
pub fn now_ms() -> u64 {
    static OFFSET_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET_MS.get_or_init(|| {
        std::env::var(CLOCK_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    });
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add_signed(offset)
}
