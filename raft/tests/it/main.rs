//! herald-raft integration tests: one binary (see STYLE.md, tests in layers).

mod cluster;
mod groups;
mod sm_model;
mod storage_suite;
mod transport;
