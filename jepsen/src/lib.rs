//! herald-jepsen: Herald's fault suite, in the spirit of Jepsen and openraft's `jepsen/`.
//!
//! It starts real `herald node` processes, each in its own network namespace with its own
//! address, drives them with clients built on the SDK (`herald-client`) while a nemesis injects
//! faults, records everything as a JSON-lines history, heals every fault, and checks the history
//! against what DESIGN.md says must hold. See `README.md` in this directory.
//!
//! - `net`: namespaces, veths, bridge, partitions (iptables);
//! - `cluster`: the node processes and the harness's gRPC calls to them;
//! - `disk`: each node's powerfs disk (power cuts);
//! - `proxy`: the user-space TCP proxy for delay and loss;
//! - `powerfs`: the FUSE file system that loses unsynced writes on a power cut;
//! - `nemesis`: the faults and their schedule;
//! - `workload`: the clients;
//! - `history`: the JSON-lines history and its outcome classes;
//! - `checker`: one file per invariant;
//! - `runner`, `report`, `plot`: a run and what it leaves in `--out`;
//! - `bugbuild`: builds `herald` with an injected bug.

pub mod bugbuild;
pub mod checker;
pub mod cluster;
pub mod disk;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod plot;
pub mod powerfs;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod token;
pub mod workload;
