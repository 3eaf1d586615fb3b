//! openraft's network traits over the raft gRPC service.
//!
//! Error mapping (what openraft does next):
//! - no connection could be made, or the peer says it is another node → [`Unreachable`]: openraft
//!   waits [`backoff`](RaftNetwork::backoff) before trying that peer again;
//! - the RPC did not answer within its time → [`Timeout`](openraft::error::Timeout) (openraft treats
//!   it as it treats [`NetworkError`]: retry on the next heartbeat). The time is openraft's but
//!   never less than [`RPC_TIMEOUT_FLOOR`]: openraft 0.9 gives an AppendEntries the heartbeat
//!   interval, too short under load (see [`crate::runtime`]);
//! - any other transport failure or an unreadable reply → [`NetworkError`];
//! - the peer's openraft answered with an error → [`RemoteError`].

use std::future::Future;
use std::time::Duration;

use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::{RaftRequest, SnapshotHeader};
use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::{BasicNode, RPCTypes};
use rand::Rng;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, warn};

use super::client::{
    is_connect_error, is_deadline, is_node_id_mismatch, is_unknown_group, InvalidAddr, Lane, PeerClients,
};
use super::codec::{self, CodecError};
use super::snapshot::{self, SendError};
use crate::runtime::RPC_TIMEOUT_FLOOR;
use crate::types::{typ, GroupId, NodeId, TypeConfig};

type RpcResult<T> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId>>>;

/// openraft's [`RaftNetworkFactory`] of one Raft group: hands out a [`PeerConnection`] per target,
/// all sharing one [`PeerClients`] pool (openraft asks for a new client per election round; that
/// must be cheap). The groups of a node share that pool too: one connection per peer carries every
/// group's RPCs, each request naming its group.
#[derive(Clone)]
pub struct Network {
    clients: PeerClients,
    group: GroupId,
}

impl Network {
    /// The network of group 0.
    pub fn new(clients: PeerClients) -> Self {
        Self::for_group(clients, 0)
    }

    pub fn for_group(clients: PeerClients, group: GroupId) -> Self {
        Network { clients, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        PeerConnection {
            clients: self.clients.clone(),
            group: self.group,
            target,
            node: node.clone(),
        }
    }
}

/// openraft's connection to one peer. openraft drives it with one call at a time (`&mut self`),
/// so a peer never has more than one replication RPC in flight from here.
pub struct PeerConnection {
    clients: PeerClients,
    group: GroupId,
    target: NodeId,
    /// The peer's gRPC `host:port` in `node.addr`, as committed in the membership.
    node: BasicNode,
}

/// The reasons a unary call fails, before mapping into openraft's error types.
enum CallError {
    /// Nothing was sent: no connection, bad address, or the peer is another node.
    Unreachable(String),
    /// No reply within the deadline.
    Timeout(Duration),
    /// Anything else on the transport or in decoding.
    Network(String),
}

impl From<InvalidAddr> for CallError {
    fn from(e: InvalidAddr) -> Self {
        CallError::Unreachable(e.to_string())
    }
}

impl From<CodecError> for CallError {
    fn from(e: CodecError) -> Self {
        CallError::Network(e.to_string())
    }
}

impl CallError {
    fn into_rpc<E: std::error::Error>(
        self,
        action: RPCTypes,
        from: NodeId,
        target: NodeId,
    ) -> RPCError<NodeId, BasicNode, E> {
        match self {
            CallError::Unreachable(msg) => RPCError::Unreachable(Unreachable::new(&TransportError(msg))),
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: from,
                target,
                timeout,
            }),
            CallError::Network(msg) => RPCError::Network(NetworkError::new(&TransportError(msg))),
        }
    }

    fn into_streaming(self, from: NodeId, target: NodeId) -> StreamingError<TypeConfig, Fatal<NodeId>> {
        match self {
            CallError::Unreachable(msg) => {
                StreamingError::Unreachable(Unreachable::new(&TransportError(msg)))
            }
            CallError::Timeout(timeout) => StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: from,
                target,
                timeout,
            }),
            CallError::Network(msg) => StreamingError::Network(NetworkError::new(&TransportError(msg))),
        }
    }
}

/// A transport failure as text (openraft's error types take any `std::error::Error`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl PeerConnection {
    fn addr(&self) -> &str {
        &self.node.addr
    }

    fn client(&self, lane: Lane) -> Result<RaftServiceClient<Channel>, CallError> {
        Ok(self.clients.client(self.target, self.addr(), lane)?)
    }

    /// Classifies a failed call, logging what deserves it.
    fn status_error(&self, what: RPCTypes, status: Status) -> CallError {
        let (target, addr) = (self.target, self.addr());
        if is_connect_error(&status) {
            self.clients.mark_down(target, addr, &status);
            return CallError::Unreachable(format!(
                "{what} to node {target} at {addr}: {}",
                status.message()
            ));
        }
        if is_node_id_mismatch(&status) {
            warn!(target_node = target, %addr, error = %status.message(), "peer is not the node it should be");
            return CallError::Unreachable(status.message().to_string());
        }
        if is_unknown_group(&status) {
            debug!(target_node = target, %addr, group = self.group, "peer has no such raft group (yet)");
            return CallError::Unreachable(status.message().to_string());
        }
        debug!(target_node = target, %addr, rpc = %what, code = ?status.code(), error = %status.message(), "raft rpc failed");
        CallError::Network(format!(
            "{what} to node {target} at {addr}: {}: {}",
            status.code(),
            status.message()
        ))
    }

    /// One raft call with `payload`, bounded by `timeout`. Returns the reply payload. A
    /// `heartbeat` (an AppendEntries without entries) goes through the peer's heartbeat lane with
    /// the other groups' (see `heartbeats.rs`), unless the peer predates it.
    async fn unary(
        &mut self,
        what: RPCTypes,
        payload: bytes::Bytes,
        timeout: Duration,
        heartbeat: bool,
    ) -> Result<bytes::Bytes, CallError> {
        let body = RaftRequest {
            from: self.clients.self_id(),
            target: self.target,
            payload,
            group: self.group,
        };
        if heartbeat {
            let lane = self.clients.heartbeat(self.target, self.addr(), body.clone());
            match tokio::time::timeout(timeout, lane).await {
                Err(_) => return Err(CallError::Timeout(timeout)),
                Ok(lane) => match lane? {
                    // Not taken, or the peer does not know the batch call: unary below.
                    None => {}
                    Some(Err(status)) if status.code() == Code::Unimplemented => {}
                    Some(Err(status)) if is_deadline(&status) || status.code() == Code::DeadlineExceeded => {
                        return Err(CallError::Timeout(timeout))
                    }
                    Some(Err(status)) => return Err(self.status_error(what, status)),
                    Some(Ok(reply)) => {
                        self.clients.mark_up(self.target, self.addr());
                        return Ok(reply);
                    }
                },
            }
        }
        let mut client = self.client(Lane::Raft)?;
        let mut req = tonic::Request::new(body);
        req.set_timeout(timeout);
        let call = async {
            match what {
                RPCTypes::Vote => client.vote(req).await,
                _ => client.append_entries(req).await,
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(CallError::Timeout(timeout)),
            Ok(Err(status)) if is_deadline(&status) => Err(CallError::Timeout(timeout)),
            Ok(Err(status)) => Err(self.status_error(what, status)),
            Ok(Ok(reply)) => {
                self.clients.mark_up(self.target, self.addr());
                Ok(reply.into_inner().payload)
            }
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RemoteError<NodeId, BasicNode, E> {
        RemoteError::new_with_node(self.target, self.node.clone(), e)
    }

    /// Sends an encoded openraft request and decodes openraft's `Result<Resp, RaftError>`.
    async fn call<Resp>(
        &mut self,
        what: RPCTypes,
        payload: Result<bytes::Bytes, CodecError>,
        timeout: Duration,
        heartbeat: bool,
    ) -> RpcResult<Resp>
    where
        Resp: serde::de::DeserializeOwned,
    {
        let (from, target) = (self.clients.self_id(), self.target);
        let result = async {
            let reply = self.unary(what, payload?, timeout, heartbeat).await?;
            Ok::<_, CallError>(codec::decode::<Result<Resp, typ::RaftError>>(
                "raft reply",
                &reply,
            )?)
        }
        .await
        .map_err(|e| e.into_rpc(what, from, target))?;
        result.map_err(|e| RPCError::RemoteError(self.remote(e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: typ::AppendEntriesRequest,
        option: RPCOption,
    ) -> RpcResult<typ::AppendEntriesResponse> {
        let payload = codec::encode("append entries request", &rpc);
        // Ask openraft to split a batch that would not fit one message (with room for framing).
        if let Ok(bytes) = &payload {
            let entries = rpc.entries.len();
            if entries > 1 && bytes.len() + 1024 > self.clients.options().max_message_bytes {
                let hint = (entries as u64 / 2).max(1);
                debug!(
                    target_node = self.target,
                    size = bytes.len(),
                    entries,
                    hint,
                    "append_entries too large, splitting"
                );
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
            }
        }
        let heartbeat = rpc.entries.is_empty();
        self.call(RPCTypes::AppendEntries, payload, rpc_timeout(&option), heartbeat)
            .await
    }

    async fn vote(&mut self, rpc: typ::VoteRequest, option: RPCOption) -> RpcResult<typ::VoteResponse> {
        self.call(
            RPCTypes::Vote,
            codec::encode("vote request", &rpc),
            rpc_timeout(&option),
            false,
        )
        .await
    }

    /// Streams the snapshot directory (see [`snapshot`](super::snapshot)). The whole transfer is
    /// bounded by `NetworkOptions::snapshot_timeout`, not by `option` (openraft sizes that for one
    /// chunk of its own chunked protocol, which this transport does not use).
    async fn full_snapshot(
        &mut self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<typ::SnapshotResponse, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let (from, target) = (self.clients.self_id(), self.target);
        let opts = self.clients.options().clone();
        let header = SnapshotHeader {
            from,
            target,
            vote: codec::encode("vote", &vote)
                .map_err(|e| CallError::from(e).into_streaming(from, target))?,
            meta: codec::encode("snapshot meta", &snapshot.meta)
                .map_err(|e| CallError::from(e).into_streaming(from, target))?,
            files: Vec::new(),
            group: self.group,
        };
        let mut client = self
            .client(Lane::Snapshot)
            .map_err(|e| e.into_streaming(from, target))?;
        let dir = snapshot.snapshot.path.clone();
        let signature = snapshot.meta.signature();
        debug!(target_node = target, snapshot = %snapshot.meta.snapshot_id, dir = %dir.display(), "sending snapshot");

        let send = snapshot::send_snapshot(&mut client, header, dir, opts.chunk_bytes());
        let res = tokio::select! {
            closed = cancel => {
                debug!(target_node = target, "snapshot send cancelled");
                return Err(StreamingError::Closed(closed));
            }
            res = tokio::time::timeout(opts.snapshot_timeout, send) => res,
        };
        let reply = match res {
            Err(_) => {
                warn!(target_node = target, addr = %self.addr(), timeout = ?opts.snapshot_timeout, "snapshot send timed out");
                return Err(CallError::Timeout(opts.snapshot_timeout).into_streaming(from, target));
            }
            Ok(Err(SendError::Local { path, source })) => {
                warn!(target_node = target, %path, error = %source, "cannot read snapshot to send");
                let io = openraft::StorageIOError::read_snapshot(
                    Some(signature),
                    openraft::AnyError::new(&source),
                );
                return Err(StreamingError::StorageError(io.into()));
            }
            Ok(Err(SendError::Rpc(status))) => {
                let e = self.status_error(RPCTypes::InstallSnapshot, status);
                if let CallError::Network(msg) = &e {
                    warn!(target_node = target, addr = %self.addr(), error = %msg, "snapshot send failed");
                }
                return Err(e.into_streaming(from, target));
            }
            Ok(Ok(reply)) => reply,
        };
        self.clients.mark_up(target, self.addr());
        let resp: Result<typ::SnapshotResponse, typ::RaftError> =
            codec::decode("snapshot reply", &reply.payload)
                .map_err(|e| CallError::from(e).into_streaming(from, target))?;
        match resp {
            Ok(resp) => Ok(resp),
            Err(RaftError::Fatal(fatal)) => Err(StreamingError::RemoteError(self.remote(fatal))),
            Err(RaftError::APIError(never)) => match never {},
        }
    }

    /// Exponential backoff with jitter while a peer is unreachable: `backoff_min` doubling up to
    /// `backoff_max`, each delay drawn uniformly from its upper half so peers that went down
    /// together are not retried in lockstep.
    fn backoff(&self) -> Backoff {
        let opts = self.clients.options();
        Backoff::new(backoff_delays(opts.backoff_min, opts.backoff_max))
    }
}

/// The delays of [`PeerConnection::backoff`], endless.
pub(crate) fn backoff_delays(
    min: Duration,
    max: Duration,
) -> impl Iterator<Item = Duration> + Send + 'static {
    let mut next = min;
    std::iter::from_fn(move || {
        let base = next;
        next = (next * 2).min(max);
        let low = base / 2;
        Some(if base > low {
            rand::thread_rng().gen_range(low..=base)
        } else {
            base
        })
    })
}

/// How long one AppendEntries or Vote call may take: openraft's time, at least the floor.
fn rpc_timeout(option: &RPCOption) -> Duration {
    option.hard_ttl().max(RPC_TIMEOUT_FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let delays: Vec<Duration> = backoff_delays(Duration::from_millis(50), Duration::from_secs(2))
            .take(12)
            .collect();
        let mut base = Duration::from_millis(50);
        for d in &delays {
            assert!(
                *d >= base / 2 && *d <= base,
                "{d:?} outside {:?}..={base:?}",
                base / 2
            );
            base = (base * 2).min(Duration::from_secs(2));
        }
        assert!(delays[11] >= Duration::from_secs(1));
    }
}
