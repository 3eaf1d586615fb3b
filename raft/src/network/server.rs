//! The server side of the raft service: every node serves it on its gRPC address.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
use herald_proto::raft::snapshot_chunk::Body;
use herald_proto::raft::{
    forward_reply, ForwardReply, ForwardRequest, NotLeader, ProbeReply, ProbeRequest, RaftBatch,
    RaftBatchReply, RaftReply, RaftRequest, SnapshotChunk,
};
use openraft::error::RaftError;
use parking_lot::{Mutex, RwLock};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, instrument, warn};

use super::codec;
use super::heartbeats::{item_from, MAX_BATCH};
use super::snapshot::{receive_snapshot_files, validate_file_list};
use super::{Hooks, MAX_MESSAGE_BYTES};
use crate::error::WriteError;
use crate::types::{typ, GroupId, NodeId, Op, SnapshotDir};

/// Start of the message a node sends when a request is addressed to another node id.
pub(crate) const ID_MISMATCH: &str = "node id mismatch";

/// Start of the message a node sends when a request is for a Raft group it does not have.
pub(crate) const UNKNOWN_GROUP: &str = "unknown raft group";

/// Longest the receiver waits for the next snapshot chunk before giving the transfer up.
pub const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the raft service needs from openraft. Implemented by [`typ::Raft`]; a seam so the
/// transport can be tested against a stand-in.
pub trait RaftApi: Clone + Send + Sync + 'static {
    fn append_entries(
        &self,
        rpc: typ::AppendEntriesRequest,
    ) -> impl Future<Output = Result<typ::AppendEntriesResponse, typ::RaftError>> + Send;
    fn vote(
        &self,
        rpc: typ::VoteRequest,
    ) -> impl Future<Output = Result<typ::VoteResponse, typ::RaftError>> + Send;
    /// An empty directory to receive a snapshot into.
    fn begin_receiving_snapshot(
        &self,
    ) -> impl Future<Output = Result<Box<SnapshotDir>, typ::RaftError>> + Send;
    fn install_full_snapshot(
        &self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
    ) -> impl Future<Output = Result<typ::SnapshotResponse, typ::Fatal>> + Send;
    /// Stands for election now (see [`RaftGrpc::campaign_after`]); a stand-in may ignore it.
    fn elect(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// This node leads now.
    fn leads(&self) -> bool {
        false
    }
    /// The highest log index this node holds (in its log or in its state machine's snapshot);
    /// a stand-in holds everything.
    fn held_index(&self) -> u64 {
        u64::MAX
    }
}

impl RaftApi for typ::Raft {
    fn append_entries(
        &self,
        rpc: typ::AppendEntriesRequest,
    ) -> impl Future<Output = Result<typ::AppendEntriesResponse, typ::RaftError>> + Send {
        typ::Raft::append_entries(self, rpc)
    }
    fn vote(
        &self,
        rpc: typ::VoteRequest,
    ) -> impl Future<Output = Result<typ::VoteResponse, typ::RaftError>> + Send {
        typ::Raft::vote(self, rpc)
    }
    fn begin_receiving_snapshot(
        &self,
    ) -> impl Future<Output = Result<Box<SnapshotDir>, typ::RaftError>> + Send {
        typ::Raft::begin_receiving_snapshot(self)
    }
    fn install_full_snapshot(
        &self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
    ) -> impl Future<Output = Result<typ::SnapshotResponse, typ::Fatal>> + Send {
        typ::Raft::install_full_snapshot(self, vote, snapshot)
    }
    async fn elect(&self) {
        // Err only when the core stopped (shutdown); nothing to do then.
        let _ = self.trigger().elect().await;
    }
    fn leads(&self) -> bool {
        self.metrics().borrow().state == openraft::ServerState::Leader
    }
    fn held_index(&self) -> u64 {
        let m = self.metrics();
        let m = m.borrow();
        let log = m.last_log_index.unwrap_or(0);
        let snap = m.snapshot.map_or(0, |s| s.index);
        log.max(snap)
    }
}

/// The raft service of node `node_id` with one group (0), ready to mount on a tonic server.
pub fn raft_server(
    node_id: NodeId,
    raft: typ::Raft,
    hooks: Hooks,
) -> RaftServiceServer<RaftRouter<typ::Raft>> {
    RaftGrpc::new(node_id, raft, hooks).into_server()
}

/// The raft gRPC service of a node: one server (one connection per peer) for all the Raft groups
/// the node is a member of, each request routed by its `group` to that group's [`RaftGrpc`]. A
/// request for a group the node does not have is `NOT_FOUND` ([`UNKNOWN_GROUP`]), which callers
/// treat as "peer unreachable" (it may not have created the group yet).
pub struct RaftRouter<R = typ::Raft> {
    node_id: NodeId,
    groups: Arc<RwLock<HashMap<GroupId, Arc<RaftGrpc<R>>>>>,
    /// `AppendEntriesBatch` calls taken and the requests they carried.
    batches: Arc<[AtomicU64; 2]>,
}

impl<R> Clone for RaftRouter<R> {
    fn clone(&self) -> Self {
        RaftRouter {
            node_id: self.node_id,
            groups: self.groups.clone(),
            batches: self.batches.clone(),
        }
    }
}

impl<R: RaftApi> RaftRouter<R> {
    /// A router of node `node_id` with no group yet.
    pub fn new(node_id: NodeId) -> Self {
        RaftRouter {
            node_id,
            groups: Arc::new(RwLock::new(HashMap::new())),
            batches: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    /// (`AppendEntriesBatch` calls taken, entry-less AppendEntries they carried) so far.
    pub fn batch_counts(&self) -> (u64, u64) {
        (
            self.batches[0].load(Ordering::Relaxed),
            self.batches[1].load(Ordering::Relaxed),
        )
    }

    /// Routes `group`'s requests to `handler` from now on (replacing an earlier handler).
    pub fn insert(&self, group: GroupId, handler: RaftGrpc<R>) {
        self.groups.write().insert(group, Arc::new(handler));
    }

    /// Stops routing `group`'s requests (the node left the group).
    pub fn remove(&self, group: GroupId) {
        self.groups.write().remove(&group);
    }

    /// The groups requests are routed to, in order.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = self.groups.read().keys().copied().collect();
        groups.sort_unstable();
        groups
    }

    fn handler(&self, group: GroupId) -> Result<Arc<RaftGrpc<R>>, Status> {
        self.groups.read().get(&group).cloned().ok_or_else(|| {
            debug!(
                node_id = self.node_id,
                group, "request for a raft group this node does not have"
            );
            Status::not_found(format!(
                "{UNKNOWN_GROUP}: node {} has no raft group {group}",
                self.node_id
            ))
        })
    }

    /// Wraps the service with message limits raised for raft traffic.
    pub fn into_server(self) -> RaftServiceServer<Self> {
        RaftServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Implementation of one Raft group's side of the raft gRPC service over openraft (`R`) and the
/// node's [`Hooks`]; mounted through a [`RaftRouter`].
pub struct RaftGrpc<R = typ::Raft> {
    /// This node's id: requests addressed to another id are refused, so a mis-wired address or a
    /// peer with the wrong data dir never mixes two nodes' Raft state.
    node_id: NodeId,
    raft: R,
    hooks: Hooks,
    /// How long a snapshot stream may stall between chunks before it is discarded.
    snapshot_idle_timeout: Duration,
    /// See [`RaftGrpc::campaign_after`]; zero = off.
    campaign_after: Duration,
    /// When this node last took an AppendEntries (a leader's heartbeat or entries).
    last_append: Arc<Mutex<Option<Instant>>>,
    /// A campaign started by a refused vote is under way.
    campaigning: Arc<AtomicBool>,
    /// See [`RaftGrpc::with_vote_hold`]; dropped once reached.
    vote_hold: Arc<Mutex<Option<typ::LogId>>>,
}

impl<R: RaftApi> RaftGrpc<R> {
    pub fn new(node_id: NodeId, raft: R, hooks: Hooks) -> Self {
        RaftGrpc {
            node_id,
            raft,
            hooks,
            snapshot_idle_timeout: SNAPSHOT_IDLE_TIMEOUT,
            campaign_after: Duration::ZERO,
            last_append: Arc::new(Mutex::new(None)),
            campaigning: Arc::new(AtomicBool::new(false)),
            vote_hold: Arc::new(Mutex::new(None)),
        }
    }

    /// Refuses vote requests until this node holds the log up to `hold` (a rejoined node, see
    /// `raft_node::rejoin_vote_floor`), except from a candidate whose last log id is at least
    /// `hold` (by log matching, it holds every entry up to it): a wiped node could otherwise
    /// elect, with its empty log, a candidate that lacks entries this node helped commit before
    /// the wipe. The refusal is an `UNAVAILABLE` answer, which the candidate counts as no vote.
    pub fn with_vote_hold(self, hold: Option<typ::LogId>) -> Self {
        *self.vote_hold.lock() = hold;
        self
    }

    /// Why a vote request from a candidate whose last log id is `candidate_log` must be refused
    /// now, if it must; drops the hold once this node's log reached it.
    fn vote_held(&self, candidate_log: Option<typ::LogId>) -> Option<String> {
        let mut guard = self.vote_hold.lock();
        let hold = (*guard)?;
        let held = self.raft.held_index();
        if held >= hold.index {
            *guard = None;
            info!(node_id = self.node_id, %hold, held, "rejoin: caught up; granting votes again");
            return None;
        }
        if candidate_log.is_some_and(|c| c >= hold) {
            return None;
        }
        Some(format!(
            "node {} rejoined and grants votes only to candidates with log {hold} until its own log \
             reaches index {} (it holds {held})",
            self.node_id, hold.index
        ))
    }

    /// Turns on the follower's answer to a candidate whose log is behind this node's: when the
    /// vote is refused for that reason and no AppendEntries came for `silence` (the leader is
    /// gone, not merely slow), this node stands for election at once instead of after its own
    /// timer — which the refused request has just reset to a full leader lease plus election
    /// timeout (openraft 0.9 has no pre-vote). It tries twice, 30 ms apart: the first try can
    /// land in the behind candidate's own term, which that candidate refuses (it voted for
    /// itself); the second is a term above it. Elections are always safe in Raft; this only
    /// changes who stands first. It stops as soon as this node leads or a leader's
    /// AppendEntries arrives. Measured in BENCHMARKS.md (failover).
    pub fn campaign_after(mut self, silence: Duration) -> Self {
        self.campaign_after = silence;
        self
    }

    /// Shares the time of the last AppendEntries taken with the node (it gates elections after
    /// a restart on it).
    pub fn with_last_append(mut self, last_append: Arc<Mutex<Option<Instant>>>) -> Self {
        self.last_append = last_append;
        self
    }

    fn leader_silent_for(&self, d: Duration) -> bool {
        match *self.last_append.lock() {
            Some(t) => t.elapsed() >= d,
            None => true,
        }
    }

    fn campaign(&self, candidate: NodeId) {
        if self.campaigning.swap(true, Ordering::AcqRel) {
            return;
        }
        info!(
            node_id = self.node_id,
            candidate,
            "refused a candidate whose log is behind ours while the leader is silent; standing for election"
        );
        let (raft, last_append, campaigning) = (
            self.raft.clone(),
            self.last_append.clone(),
            self.campaigning.clone(),
        );
        let started = Instant::now();
        tokio::spawn(async move {
            for _ in 0..2 {
                let heard = matches!(*last_append.lock(), Some(t) if t > started);
                if raft.leads() || heard {
                    break;
                }
                raft.elect().await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            campaigning.store(false, Ordering::Release);
        });
    }

    /// Overrides [`SNAPSHOT_IDLE_TIMEOUT`].
    pub fn with_snapshot_idle_timeout(mut self, timeout: Duration) -> Self {
        self.snapshot_idle_timeout = timeout;
        self
    }

    /// A server with this handler as group 0 and no other group (a single-group node).
    pub fn into_server(self) -> RaftServiceServer<RaftRouter<R>> {
        let router = RaftRouter::new(self.node_id);
        router.insert(0, self);
        router.into_server()
    }

    fn check_target(&self, from: NodeId, target: NodeId) -> Result<(), Status> {
        if target == self.node_id {
            return Ok(());
        }
        warn!(
            node_id = self.node_id,
            from, target, "refusing a request meant for another node"
        );
        Err(Status::failed_precondition(format!(
            "{ID_MISMATCH}: this is node {}, request was for node {target}",
            self.node_id
        )))
    }

    /// The snapshot transfer after its header: receive into an incoming dir, then install.
    async fn receive_and_install(
        &self,
        header: herald_proto::raft::SnapshotHeader,
        stream: &mut Streaming<SnapshotChunk>,
    ) -> Result<RaftReply, Status> {
        let vote: typ::Vote = codec::decode("vote", &header.vote).map_err(invalid)?;
        let meta: typ::SnapshotMeta = codec::decode("snapshot meta", &header.meta).map_err(invalid)?;
        validate_file_list(&header.files).map_err(|e| e.to_status())?;
        let dir = match self.raft.begin_receiving_snapshot().await {
            Ok(dir) => dir,
            Err(e) => return reply_payload("snapshot reply", &Err::<typ::SnapshotResponse, _>(e)),
        };
        let incoming = IncomingDir::new(dir.path.clone());
        let total: u64 = header.files.iter().map(|f| f.size).sum();
        info!(from = header.from, snapshot = %meta.snapshot_id, files = header.files.len(), bytes = total, "receiving snapshot");

        if let Err(e) =
            receive_snapshot_files(&dir.path, &header.files, stream, self.snapshot_idle_timeout).await
        {
            warn!(from = header.from, snapshot = %meta.snapshot_id, error = %e, "snapshot refused, discarding it");
            incoming.discard().await;
            return Err(e.to_status());
        }
        incoming.keep();
        info!(from = header.from, snapshot = %meta.snapshot_id, "snapshot received, installing");
        let res = self
            .raft
            .install_full_snapshot(vote, typ::Snapshot { meta, snapshot: dir })
            .await;
        reply_payload("snapshot reply", &res.map_err(RaftError::<NodeId>::Fatal))
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn reply_payload<T: serde::Serialize>(what: &'static str, value: &T) -> Result<RaftReply, Status> {
    let payload = codec::encode(what, value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(RaftReply { payload })
}

/// An incoming snapshot directory that is removed unless [`IncomingDir::keep`] is called, also
/// when the handler is dropped mid-stream (the client reset the call, the server shut down).
struct IncomingDir {
    path: Option<PathBuf>,
}

impl IncomingDir {
    fn new(path: PathBuf) -> Self {
        IncomingDir { path: Some(path) }
    }

    /// The directory now belongs to openraft.
    fn keep(mut self) {
        self.path = None;
    }

    async fn discard(mut self) {
        if let Some(path) = self.path.take() {
            let shown = path.display().to_string();
            match tokio::task::spawn_blocking(move || remove_dir(&path)).await {
                Ok(()) => {}
                Err(e) => warn!(dir = %shown, error = %e, "cannot remove incoming snapshot dir"),
            }
        }
    }
}

impl Drop for IncomingDir {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else { return };
        warn!(dir = %path.display(), "snapshot transfer abandoned, discarding it");
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || remove_dir(&path));
            }
            Err(_) => remove_dir(&path),
        }
    }
}

fn remove_dir(path: &std::path::Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => debug!(dir = %path.display(), "incoming snapshot dir removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %path.display(), error = %e, "cannot remove incoming snapshot dir"),
    }
}

impl<R: RaftApi> RaftGrpc<R> {
    #[instrument(level = "trace", skip_all)]
    async fn append_entries(&self, req: RaftRequest) -> Result<RaftReply, Status> {
        self.check_target(req.from, req.target)?;
        let rpc: typ::AppendEntriesRequest =
            codec::decode("append entries request", &req.payload).map_err(invalid)?;
        let res = self.raft.append_entries(rpc).await;
        if matches!(&res, Ok(r) if r.is_success()) {
            *self.last_append.lock() = Some(Instant::now());
        }
        reply_payload("append entries reply", &res)
    }

    #[instrument(level = "trace", skip_all)]
    async fn vote(&self, req: RaftRequest) -> Result<RaftReply, Status> {
        self.check_target(req.from, req.target)?;
        let rpc: typ::VoteRequest = codec::decode("vote request", &req.payload).map_err(invalid)?;
        if let Some(why) = self.vote_held(rpc.last_log_id) {
            debug!(node_id = self.node_id, candidate = req.from, "{why}");
            return Err(Status::unavailable(why));
        }
        let candidate_log = rpc.last_log_id;
        let res = self.raft.vote(rpc).await;
        if let Ok(r) = &res {
            let behind = !r.vote_granted && r.last_log_id > candidate_log;
            // A leader takes no AppendEntries, so it would always look silent: leave it out.
            if behind
                && !self.campaign_after.is_zero()
                && !self.raft.leads()
                && self.leader_silent_for(self.campaign_after)
            {
                self.campaign(req.from);
            }
        }
        reply_payload("vote reply", &res)
    }

    #[instrument(level = "debug", skip_all)]
    async fn install_snapshot(
        &self,
        header: herald_proto::raft::SnapshotHeader,
        mut stream: Streaming<SnapshotChunk>,
    ) -> Result<RaftReply, Status> {
        self.check_target(header.from, header.target)?;
        self.receive_and_install(header, &mut stream).await
    }

    #[instrument(level = "debug", skip_all)]
    async fn forward(&self, req: ForwardRequest) -> Result<ForwardReply, Status> {
        self.check_target(req.from, req.target)?;
        let ops: Vec<Op> = codec::decode("ops", &req.ops).map_err(invalid)?;
        let reply = match self.hooks.forward(ops).await {
            Ok((results, log_index)) => {
                let bytes =
                    codec::encode("op results", &results).map_err(|e| Status::internal(e.to_string()))?;
                ForwardReply {
                    result: Some(forward_reply::Result::Ok(bytes)),
                    log_index,
                }
            }
            Err(WriteError::Unavailable { leader }) => {
                // An empty address means "leader unknown" (node ids may be 0).
                let (leader_id, leader_addr) = leader.unwrap_or_default();
                ForwardReply {
                    result: Some(forward_reply::Result::NotLeader(NotLeader {
                        leader_id,
                        leader_addr,
                    })),
                    log_index: 0,
                }
            }
            Err(e) => ForwardReply {
                result: Some(forward_reply::Result::Error(codec::forward_error_to_text(&e))),
                log_index: 0,
            },
        };
        Ok(reply)
    }

    #[instrument(level = "debug", skip_all)]
    async fn probe(&self, req: ProbeRequest) -> Result<ProbeReply, Status> {
        self.check_target(req.from, req.target)?;
        Ok(self.hooks.probe(req))
    }
}

#[tonic::async_trait]
impl<R: RaftApi> RaftService for RaftRouter<R> {
    async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let handler = self.handler(req.group)?;
        handler.append_entries(req).await.map(Response::new)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let handler = self.handler(req.group)?;
        handler.vote(req).await.map(Response::new)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(SnapshotChunk {
                body: Some(Body::Header(header)),
            })) => header,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "a snapshot stream must start with its header",
                ))
            }
            Some(Err(status)) => return Err(status),
            None => return Err(Status::invalid_argument("empty snapshot stream")),
        };
        let handler = self.handler(header.group)?;
        handler.install_snapshot(header, stream).await.map(Response::new)
    }

    async fn forward(&self, request: Request<ForwardRequest>) -> Result<Response<ForwardReply>, Status> {
        let req = request.into_inner();
        let handler = self.handler(req.group)?;
        handler.forward(req).await.map(Response::new)
    }

    async fn probe(&self, request: Request<ProbeRequest>) -> Result<Response<ProbeReply>, Status> {
        let req = request.into_inner();
        let handler = self.handler(req.group)?;
        handler.probe(req).await.map(Response::new)
    }

    async fn append_entries_batch(
        &self,
        request: Request<RaftBatch>,
    ) -> Result<Response<RaftBatchReply>, Status> {
        let requests = request.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch of {} requests (at most {MAX_BATCH})",
                requests.len()
            )));
        }
        self.batches[0].fetch_add(1, Ordering::Relaxed);
        self.batches[1].fetch_add(requests.len() as u64, Ordering::Relaxed);
        // Every group's handler at once: one slow group does not hold the others' answers back
        // more than the call itself does.
        let answers = requests.into_iter().map(|req| async move {
            let handler = self.handler(req.group)?;
            handler.append_entries(req).await.map(|r| r.payload)
        });
        let replies = futures::future::join_all(answers)
            .await
            .into_iter()
            .map(item_from)
            .collect();
        Ok(Response::new(RaftBatchReply { replies }))
    }
}
