//! Herald's wire definitions: the public gRPC API (`herald.v1`), the client frames
//! (`herald.client.v1`), the callback service an app's backend implements (`herald.callback.v1`),
//! and the node-to-node services (`herald.raft.v1`, `herald.peer.v1`). Code is generated at build time
//! by protox (pure Rust; no `protoc` needed) and tonic-prost-build.
//!
//! API Boundary: everything here is on the wire; change it only in backward-compatible ways
//! (new fields, new oneof arms), never renumber.

pub mod codec;
pub mod frame;

/// Public gRPC API served by every node.
pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("herald.v1");
}

/// Client wire protocol frames.
pub mod client {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("herald.client.v1");
}

/// Raft transport between nodes.
pub mod raft {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("herald.raft.v1");
}

/// Service an app's backend implements (upstream data, session events).
pub mod callback {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("herald.callback.v1");
}

/// Room-server peer service (online-only delivery between nodes).
pub mod peer {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("herald.peer.v1");
}

/// Encoded `FileDescriptorSet` of every Herald proto (public, client, node-to-node, callback).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/herald_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the public API only (`herald.v1`: Herald and Archive), for the
/// public port's gRPC server reflection: the node-to-node services are not advertised there.
pub const PUBLIC_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/herald_public_descriptor.bin"));

/// The client protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
