//! Errors at this crate's boundary.

use crate::types::NodeId;

/// Opening or reading a store failed. Fatal for the node: it refuses to start rather than serve from
/// a store it cannot trust.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb error at {path}: {source}")]
    Rocks {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("i/o error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data in {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// The raft log lost or garbled entries it had made durable. Serving from it could make this
    /// node lead with, or vote by, a log that is not what it acknowledged: it refuses to start.
    #[error(
        "the raft log at {path} is damaged ({detail}); this node must not serve from it: start it \
         with `herald node --rejoin` (its other flags unchanged) to wipe its raft state and catch \
         up from the cluster, one node at a time"
    )]
    Damaged { path: String, detail: String },
    /// A snapshot could not be built, received or installed (bad files, wrong contents).
    #[error("snapshot error: {0}")]
    Snapshot(String),
}

/// A write (a batch of ops) could not be committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// No leader is known or reachable right now; safe to retry.
    #[error("no leader available{}", leader_hint(.leader))]
    Unavailable { leader: Option<(NodeId, String)> },
    /// The outcome is unknown (timeout or leader lost after the write was sent): it may commit.
    #[error("write outcome unknown: {0}")]
    Indeterminate(String),
    /// The node is shutting down.
    #[error("raft is shut down")]
    Shutdown,
    /// The request is malformed (too large, empty).
    #[error("invalid write: {0}")]
    Invalid(String),
}

fn leader_hint(leader: &Option<(NodeId, String)>) -> String {
    match leader {
        Some((id, addr)) => format!(" (leader is node {id} at {addr})"),
        None => String::new(),
    }
}
