//! herald-node: a Herald node (room server, gRPC API, dispatcher) and the `herald` command.
//!
//! Architecture Invariant: no RocksDB here; replicated state is reached only through
//! `herald_raft::RaftNode` (writes) and `herald_raft::StateReader` (reads).

pub mod admin;
pub mod api;
pub mod app_copies;
pub mod archive;
pub mod balance;
pub mod barrier;
pub mod certs;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod dev;
pub mod dispatch;
pub mod housekeeping;
pub mod logging;
pub mod node;
pub mod peers;
pub mod room;
pub mod token;
