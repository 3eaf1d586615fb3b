//! The integration tests of herald-node: one binary (`cargo test -p herald-node --test it`), one
//! module per area, all on real `herald node` processes started by [`harness::Cluster`].
//!
//! Adding tests: put them in a new module here and build on the harness (`Cluster::start(3)`,
//! `create_app`, `kill9`/`restart`, `herald(...)` for the command line). Tests run in parallel;
//! the harness gives each cluster its own ports and temp dir, so tests need no coordination.
//! Every test uses `#[tokio::test(flavor = "multi_thread")]`.
//!
//! Debugging a failure: the failing test prints the tail of every node's log; set
//! `HERALD_IT_LOG_LINES=500` for more, `HERALD_IT_LOG=debug` for a more verbose node log and
//! `HERALD_IT_KEEP=1` to keep the data dirs and logs.

mod harness;

mod attacks;
mod bad_config;
mod bootstrap;
mod bounds;
mod cli;
mod cli_client;
mod clock;
mod dev;
mod durability;
mod findings;
mod mobile;
mod mqtt;
mod ops;
mod planes;
mod proxy;
mod raw;
mod room;
mod sdk;
mod shards;
mod shutdown;
mod storage;
