//! The raft transport over tonic. STUB: the network work replaces the bodies.

use std::sync::Arc;

use futures::future::BoxFuture;
use herald_proto::raft::{ProbeReply, ProbeRequest};

use crate::error::WriteError;
use crate::types::{Op, OpResult};

/// What the raft gRPC service needs from the running node beyond openraft itself.
pub trait RaftServiceHooks: Send + Sync + 'static {
    /// Commit `ops` as one log entry if this node is the leader. Returns the results and the
    /// entry's log index, or `WriteError::Unavailable` naming the leader if this node is not it.
    fn forward(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(Vec<OpResult>, u64), WriteError>>;
    /// This node's identity, configured peers and progress.
    fn probe(&self, req: ProbeRequest) -> ProbeReply;
}

pub type Hooks = Arc<dyn RaftServiceHooks>;
