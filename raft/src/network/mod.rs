//! The raft transport over tonic: how members talk to each other.
//!
//! - [`PeerClients`]: a pool of lazily connected channels to peers (one per address for raft RPCs,
//!   another for snapshot streams), with the node's direct calls: write forwarding and probes.
//! - [`Network`] / [`PeerConnection`]: openraft's `RaftNetworkFactory` / `RaftNetwork` over it.
//! - [`RaftRouter`] / [`RaftGrpc`]: the `herald.raft.v1.RaftService` every node serves, one
//!   server for all of the node's Raft groups (each request names its group), one handler a group.
//! - `heartbeats`: every group's entry-less AppendEntries to one peer coalesced into batch calls.
//! - [`snapshot`]: snapshot directories streamed file by file with crc32 checks.
//! - [`codec`]: openraft's messages and Herald's ops as bincode inside the protobuf messages.
//!
//! Every request carries the sender's and the intended receiver's node id and its Raft group; a
//! node refuses requests meant for another id with `FAILED_PRECONDITION` and requests for a group
//! it does not have with `NOT_FOUND`, which callers treat as "peer unreachable".
//!
//! Architecture Invariant: nothing here buffers without bound for a peer that is down. openraft
//! makes one call at a time per peer, channels queue at most `request_buffer` requests, and a call
//! to an unreachable peer fails at once or after `connect_timeout`.

use std::sync::Arc;

use futures::future::BoxFuture;
use herald_proto::raft::{ProbeReply, ProbeRequest};

use crate::error::WriteError;
use crate::types::{Op, OpResult};

mod client;
pub mod codec;
mod heartbeats;
mod raft_network;
mod server;
pub mod snapshot;
pub mod tls;

pub use client::{
    is_connect_error, is_node_id_mismatch, is_unknown_group, InvalidAddr, NetworkOptions, PeerClients,
};
pub use raft_network::{Network, PeerConnection};
pub use server::{raft_server, RaftApi, RaftGrpc, RaftRouter, SNAPSHOT_IDLE_TIMEOUT};
pub use tls::{node_name, AllowedPeers, ClusterTls, PeerGuard, PeerNode, TlsFilesError};

/// Largest gRPC message the raft service sends or accepts (AppendEntries batches, snapshot chunks).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What the raft gRPC service needs from the running node beyond openraft itself.
pub trait RaftServiceHooks: Send + Sync + 'static {
    /// Commit `ops` as one log entry if this node is the leader. Returns the results and the
    /// entry's log index, or `WriteError::Unavailable` naming the leader if this node is not it.
    fn forward(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(Vec<OpResult>, u64), WriteError>>;
    /// This node's identity, configured peers and progress.
    fn probe(&self, req: ProbeRequest) -> ProbeReply;
}

pub type Hooks = Arc<dyn RaftServiceHooks>;
