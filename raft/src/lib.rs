//! herald-raft: Herald's replicated state.
//!
//! Every Herald node is a member of one or more openraft groups. This crate holds the openraft
//! type configuration and the command language ([`types`]), the RocksDB log engine shared by a
//! node's groups ([`log_store`]), which group holds what ([`shard`]), the
//! RocksDB state machine with its snapshots and read API ([`sm`]), the raft transport over tonic
//! ([`network`]), and [`RaftNode`], which wires them into a running member of a group with batched
//! proposals, write forwarding, one-time cluster initialization and membership changes, on a
//! [`RaftHost`] the node's groups share.
//!
//! Architecture Invariant: this crate knows nothing about client sockets, rooms or apps' backends;
//! it reports what applied entries did through [`types::ApplyObserver`] and answers reads through
//! [`sm::StateReader`]. It is the only crate that depends on RocksDB.

pub mod clock;
pub mod error;
pub mod groups;
pub mod legacy;
pub mod log_store;
pub mod network;
pub mod raft_node;
pub mod runtime;
pub mod shard;
pub mod sm;
pub mod tuning;
pub mod types;

pub use error::{StoreError, WriteError};
pub use groups::Groups;
pub use log_store::{LogEngine, LogStore};
pub use raft_node::{RaftConfig, RaftHost, RaftNode};
pub use sm::{SnapshotStats, StateMachine, StateReader};
pub use tuning::Tuning;
pub use types::*;
