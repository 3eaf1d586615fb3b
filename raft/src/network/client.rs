//! The client side of the raft service: a pool of lazily connected channels, one per peer address,
//! and the two calls the node makes directly (write forwarding and probes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald_proto::raft::forward_reply;
use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::{ForwardRequest, ProbeReply, ProbeRequest, RaftRequest};
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use super::codec;
use super::heartbeats::Beats;
use super::tls::ClusterTls;
use super::MAX_MESSAGE_BYTES;
use crate::error::WriteError;
use crate::types::{GroupId, NodeId, Op, OpResult};

/// Tuning of the raft transport's client side. Build it from [`NetworkOptions::standard`] and
/// override what a deployment needs; there is deliberately no `Default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkOptions {
    /// Longest wait for a TCP connection to a peer. Past it the peer counts as unreachable and
    /// openraft backs off, instead of queuing RPCs behind a connect that may never finish.
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on every peer connection (also while idle), so a peer that vanished
    /// without a FIN is noticed and the connection re-dialled.
    pub keepalive_interval: Duration,
    /// How long a PING may stay unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// Requests a peer's channel may queue while its connection is (re)established. Bounded so a
    /// down peer costs memory proportional to this, not to how long it stays down.
    pub request_buffer: usize,
    /// Largest gRPC message sent or accepted; AppendEntries batches above it are split by openraft.
    pub max_message_bytes: usize,
    /// Data bytes per snapshot chunk. Memory used by a snapshot transfer is a small multiple of it.
    pub snapshot_chunk_bytes: usize,
    /// Longest a whole snapshot transfer (scan, stream, install on the follower) may take.
    pub snapshot_timeout: Duration,
    /// First delay openraft waits after a peer is found unreachable; it doubles on each failure.
    pub backoff_min: Duration,
    /// Cap of that delay.
    pub backoff_max: Duration,
}

impl NetworkOptions {
    /// Settings for peers on one LAN or region:
    ///
    /// - `connect_timeout` 1 s: a peer that does not complete a handshake in a second is down for
    ///   Raft's purposes (elections run on hundreds of milliseconds);
    /// - HTTP/2 keepalive every 10 s, dropped after 5 s without answer;
    /// - `request_buffer` 64 queued requests per peer;
    /// - `max_message_bytes` 64 MiB;
    /// - `snapshot_chunk_bytes` 1 MiB; `snapshot_timeout` 10 min (several GB on a 1 Gbit/s link);
    /// - unreachable backoff 50 ms doubling to 500 ms, with jitter (a restarted peer hears from
    ///   the leader within about that, before it may stand for election; see `RaftNode::start`).
    pub fn standard() -> Self {
        NetworkOptions {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            request_buffer: 64,
            max_message_bytes: MAX_MESSAGE_BYTES,
            snapshot_chunk_bytes: 1024 * 1024,
            snapshot_timeout: Duration::from_secs(600),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
        }
    }

    /// Checks the options are usable together.
    pub fn validate(&self) -> Result<(), String> {
        if self.connect_timeout.is_zero() || self.snapshot_timeout.is_zero() {
            return Err("connect_timeout and snapshot_timeout must be positive".into());
        }
        if self.request_buffer == 0 {
            return Err("request_buffer must be at least 1".into());
        }
        if self.max_message_bytes > MAX_MESSAGE_BYTES || self.max_message_bytes < 64 * 1024 {
            return Err(format!(
                "max_message_bytes must be within 64 KiB..={MAX_MESSAGE_BYTES}"
            ));
        }
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunk_bytes > self.max_chunk_bytes() {
            return Err(format!(
                "snapshot_chunk_bytes must be within 1..={} (max_message_bytes less framing)",
                self.max_chunk_bytes()
            ));
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return Err("backoff_min must be positive and at most backoff_max".into());
        }
        Ok(())
    }

    /// The largest data chunk that still fits one message with its framing.
    fn max_chunk_bytes(&self) -> usize {
        self.max_message_bytes.saturating_sub(4096)
    }

    /// Chunk size actually used: the configured one, clamped so a chunk always fits a message.
    pub(crate) fn chunk_bytes(&self) -> usize {
        self.snapshot_chunk_bytes.clamp(1, self.max_chunk_bytes().max(1))
    }
}

/// Which connection to a peer a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Heartbeats, AppendEntries, votes, forwards and probes: small and latency-sensitive.
    Raft,
    /// Snapshot streams: megabytes that would otherwise sit in the TCP send buffer in front of the
    /// heartbeats and cost the leader its lease.
    Snapshot,
}

/// One peer address's connections.
struct Peer {
    /// The node the channels were made for: with TLS the server must prove it is this node.
    id: NodeId,
    raft: Channel,
    snapshot: Channel,
    /// Last known reachability, so "peer unreachable" is logged once per outage, not per retry.
    down: AtomicBool,
    /// The heartbeat lane of every group's entry-less AppendEntries (started on first use).
    beats: OnceLock<Beats>,
}

/// A pool of gRPC channels to peers, keyed by address. Cheap to clone; clones share the pool.
///
/// Channels connect lazily on first use and reconnect on their own after a failure; a call to a
/// peer that cannot be reached fails at once (connection refused) or after `connect_timeout`,
/// never waits for the peer to come back.
#[derive(Clone)]
pub struct PeerClients {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// Stamped as `from` on every request so a receiver can log who called.
    self_id: NodeId,
    opts: NetworkOptions,
    /// Mutual TLS for every connection, or `None` for plaintext (`--insecure-cluster`).
    tls: Option<ClusterTls>,
    /// Address (`host:port`) → channels. Entries live until [`PeerClients::forget`]; a handful of
    /// peers, so never evicted otherwise.
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

/// The address is not a valid `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {addr:?}: {reason}")]
pub struct InvalidAddr {
    pub addr: String,
    reason: String,
}

impl PeerClients {
    /// A pool whose connections use `tls` (mutual TLS), or plaintext when it is `None`.
    pub fn new(self_id: NodeId, opts: NetworkOptions, tls: Option<ClusterTls>) -> Self {
        PeerClients {
            inner: Arc::new(PoolInner {
                self_id,
                opts,
                tls,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn self_id(&self) -> NodeId {
        self.inner.self_id
    }

    pub fn options(&self) -> &NetworkOptions {
        &self.inner.opts
    }

    /// Drops the channels to `addr` (a removed member); in-flight calls on them finish or fail.
    pub fn forget(&self, addr: &str) {
        self.inner.peers.lock().remove(addr);
    }

    fn peer(&self, target: NodeId, addr: &str) -> Result<Arc<Peer>, InvalidAddr> {
        let mut peers = self.inner.peers.lock();
        if let Some(p) = peers.get(addr).filter(|p| p.id == target) {
            return Ok(p.clone());
        }
        let endpoint = self.endpoint(target, addr)?;
        // connect_lazy only spawns the channel's buffer task; nothing is dialled under the lock.
        let peer = Arc::new(Peer {
            id: target,
            raft: endpoint.connect_lazy(),
            snapshot: endpoint.clone().http2_adaptive_window(true).connect_lazy(),
            down: AtomicBool::new(false),
            beats: OnceLock::new(),
        });
        peers.insert(addr.to_string(), peer.clone());
        Ok(peer)
    }

    fn endpoint(&self, target: NodeId, addr: &str) -> Result<Endpoint, InvalidAddr> {
        let opts = &self.inner.opts;
        let invalid = |e: &dyn std::fmt::Display| InvalidAddr {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let scheme = if self.inner.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| invalid(&e))?;
        if let Some(tls) = &self.inner.tls {
            endpoint = endpoint
                .tls_config(tls.client_config(target))
                .map_err(|e| invalid(&e))?;
        }
        Ok(endpoint
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(opts.keepalive_interval)
            .keep_alive_timeout(opts.keepalive_timeout)
            .keep_alive_while_idle(true)
            .buffer_size(opts.request_buffer))
    }

    /// The channel the node's own cluster calls to node `target` at `addr` use (peer delivery,
    /// forwarded API calls): the same connection as its raft RPCs.
    pub fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, InvalidAddr> {
        Ok(self.peer(target, addr)?.raft.clone())
    }

    /// A client for node `target` at `addr` on `lane`, with message limits raised for raft traffic.
    pub(crate) fn client(
        &self,
        target: NodeId,
        addr: &str,
        lane: Lane,
    ) -> Result<RaftServiceClient<Channel>, InvalidAddr> {
        let peer = self.peer(target, addr)?;
        Ok(self.client_of(&peer, lane))
    }

    fn client_of(&self, peer: &Peer, lane: Lane) -> RaftServiceClient<Channel> {
        let channel = match lane {
            Lane::Raft => peer.raft.clone(),
            Lane::Snapshot => peer.snapshot.clone(),
        };
        let max = self.inner.opts.max_message_bytes;
        RaftServiceClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Sends an entry-less AppendEntries to node `target` at `addr` through the peer's heartbeat
    /// lane, with whatever other groups' heartbeats are waiting (see `heartbeats.rs`). `Ok(None)`:
    /// the lane cannot take it (the peer predates batches, or the lane is full): send it unary.
    pub(crate) async fn heartbeat(
        &self,
        target: NodeId,
        addr: &str,
        req: RaftRequest,
    ) -> Result<Option<Result<bytes::Bytes, Status>>, InvalidAddr> {
        let peer = self.peer(target, addr)?;
        let beats = peer
            .beats
            .get_or_init(|| Beats::spawn(self.client_of(&peer, Lane::Raft)));
        if beats.unsupported() {
            return Ok(None);
        }
        Ok(beats.send(req).await)
    }

    /// Records that a call to `addr` could not connect; logs once per outage.
    pub(crate) fn mark_down(&self, target: NodeId, addr: &str, status: &Status) {
        let was_down = self
            .known_peer(addr)
            .map(|p| p.down.swap(true, Ordering::Relaxed));
        if was_down == Some(false) {
            warn!(target_node = target, %addr, error = %status.message(), "peer unreachable");
        } else {
            debug!(target_node = target, %addr, error = %status.message(), "peer still unreachable");
        }
    }

    /// Records that `addr` answered; logs the end of an outage.
    pub(crate) fn mark_up(&self, target: NodeId, addr: &str) {
        if self
            .known_peer(addr)
            .map(|p| p.down.swap(false, Ordering::Relaxed))
            == Some(true)
        {
            info!(target_node = target, %addr, "peer reachable again");
        }
    }

    fn known_peer(&self, addr: &str) -> Option<Arc<Peer>> {
        self.inner.peers.lock().get(addr).cloned()
    }

    /// Sends `ops` to the leader `target` at `addr` to be committed as one entry there.
    ///
    /// Errors, by what the caller may do next:
    /// - `Unavailable { leader }`: nothing was committed and nothing will be (the peer is not the
    ///   leader, could not be reached, or is not node `target`); retry, at `leader` if given;
    /// - `Indeterminate`: the request may have reached the leader (timeout, connection lost after
    ///   sending, unknown failure there): it may still commit, so do not re-send it blindly;
    /// - `Invalid`: the leader refused the batch as malformed.
    pub async fn forward(
        &self,
        target: NodeId,
        addr: &str,
        ops: &[Op],
        timeout: Duration,
    ) -> Result<(Vec<OpResult>, u64), WriteError> {
        self.forward_in(0, target, addr, ops, timeout).await
    }

    /// [`PeerClients::forward`] for the Raft group `group`.
    pub async fn forward_in(
        &self,
        group: GroupId,
        target: NodeId,
        addr: &str,
        ops: &[Op],
        timeout: Duration,
    ) -> Result<(Vec<OpResult>, u64), WriteError> {
        if timeout.is_zero() {
            // No time to even try: nothing is sent, so the caller may still retry elsewhere.
            return Err(WriteError::Unavailable { leader: None });
        }
        let payload = codec::encode("ops", ops).map_err(|e| WriteError::Invalid(e.to_string()))?;
        let mut client = self.client(target, addr, Lane::Raft).map_err(|e| {
            warn!(target_node = target, %addr, error = %e, "cannot forward");
            WriteError::Unavailable { leader: None }
        })?;
        let mut req = tonic::Request::new(ForwardRequest {
            from: self.self_id(),
            target,
            ops: payload,
            group,
        });
        req.set_timeout(timeout);
        let timed_out = || {
            WriteError::Indeterminate(format!(
                "forward to node {target} at {addr} timed out after {timeout:?}"
            ))
        };
        let reply = match tokio::time::timeout(timeout, client.forward(req)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(status)) if is_deadline(&status) => return Err(timed_out()),
            Ok(Err(status)) => return Err(self.forward_status(target, addr, status)),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        self.mark_up(target, addr);
        match reply.result {
            Some(forward_reply::Result::Ok(bytes)) => {
                let results: Vec<OpResult> = codec::decode("op results", &bytes).map_err(|e| {
                    // The entry committed but its answer is unreadable: the outcome is unknown to us.
                    WriteError::Indeterminate(format!("node {target} committed at {}: {e}", reply.log_index))
                })?;
                Ok((results, reply.log_index))
            }
            Some(forward_reply::Result::NotLeader(nl)) => {
                let leader = (!nl.leader_addr.is_empty()).then_some((nl.leader_id, nl.leader_addr));
                Err(WriteError::Unavailable { leader })
            }
            Some(forward_reply::Result::Error(text)) => Err(codec::forward_error_from_text(&text)),
            None => Err(WriteError::Indeterminate(format!(
                "node {target} sent an empty forward reply"
            ))),
        }
    }

    fn forward_status(&self, target: NodeId, addr: &str, status: Status) -> WriteError {
        if is_connect_error(&status) {
            self.mark_down(target, addr, &status);
            return WriteError::Unavailable { leader: None };
        }
        if is_node_id_mismatch(&status) {
            warn!(target_node = target, %addr, error = %status.message(), "peer is not the node it should be");
            return WriteError::Unavailable { leader: None };
        }
        if is_unknown_group(&status) {
            return WriteError::Unavailable { leader: None };
        }
        match status.code() {
            // Refused while decoding, before anything was proposed.
            Code::InvalidArgument => WriteError::Invalid(status.message().to_string()),
            _ => WriteError::Indeterminate(format!(
                "forward to node {target} at {addr} failed: {}: {}",
                status.code(),
                status.message()
            )),
        }
    }

    /// Asks the peer `target` at `addr` for its identity and progress (in the group `req.group`).
    /// `req.from` and `req.target` are filled in here. A peer with another node id answers `FAILED_PRECONDITION` (see
    /// [`is_node_id_mismatch`]); a timeout is `DEADLINE_EXCEEDED`; no connection is `UNAVAILABLE`.
    pub async fn probe(
        &self,
        target: NodeId,
        addr: &str,
        mut req: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReply, Status> {
        req.from = self.self_id();
        req.target = target;
        let mut client = self
            .client(target, addr, Lane::Raft)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut req = tonic::Request::new(req);
        req.set_timeout(timeout);
        let timed_out = || {
            Status::deadline_exceeded(format!(
                "probe of node {target} at {addr} timed out after {timeout:?}"
            ))
        };
        match tokio::time::timeout(timeout, client.probe(req)).await {
            Err(_) => Err(timed_out()),
            Ok(Err(status)) if is_deadline(&status) => Err(timed_out()),
            Ok(Err(status)) => {
                if is_connect_error(&status) {
                    self.mark_down(target, addr, &status);
                }
                Err(status)
            }
            Ok(Ok(reply)) => {
                self.mark_up(target, addr);
                Ok(reply.into_inner())
            }
        }
    }
}

/// True when the call failed because no connection could be made: nothing was sent.
pub fn is_connect_error(status: &Status) -> bool {
    caused_by::<tonic::ConnectError>(status)
}

/// True when tonic ended the call at the deadline set with `Request::set_timeout` (it enforces the
/// `grpc-timeout` it sends, so this races with the caller's own timer).
pub(crate) fn is_deadline(status: &Status) -> bool {
    caused_by::<tonic::TimeoutExpired>(status)
}

fn caused_by<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<E>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// True when the peer refused the call because it is not the node the caller addressed (a
/// mis-wired address or a peer whose data dir belongs to another node).
pub fn is_node_id_mismatch(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition && status.message().starts_with(super::server::ID_MISMATCH)
}

/// True when the peer refused the call because it is not a member of the call's Raft group (not
/// yet: a replica being added; or no more: one being removed). Nothing was done there.
pub fn is_unknown_group(status: &Status) -> bool {
    status.code() == Code::NotFound && status.message().starts_with(super::server::UNKNOWN_GROUP)
}
