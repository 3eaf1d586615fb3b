//! Builds `herald` with an injected bug (a test-only cargo feature of herald-node) into the
//! suite's own target dir, so the normal build is never touched.
//!
//! | bug | feature | where | what the suite must report |
//! |---|---|---|---|
//! | `ack-before-commit` | `bug-ack-before-commit` | node/src/api/push.rs `push_one` | `lost` (acknowledged pushes that never committed, under partitions) |
//! | `skip-fsync` | `bug-skip-fsync` (raft) | raft/src/log_store.rs | `lost` / `convergence` / `raft` after power loss |
//! | `stale-registry` | `bug-stale-registry` | node/src/room/observer.rs | `fencing` (a replaced session still gets messages) |
//! | `leader-clock` | `bug-leader-clock` (raft) | raft/src/clock.rs | `lost` (`expired-early`: a leader hours ahead expires messages with TTLs of minutes) |

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

pub const BUGS: [&str; 4] = [
    "ack-before-commit",
    "skip-fsync",
    "stale-registry",
    "leader-clock",
];

/// The suite's target dir for bugged builds (one dir: RocksDB is compiled once for all bugs).
pub fn target_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/herald/target-jepsen")
}

/// Builds the binary for `bug` and returns a copy of it named after the bug.
pub fn build(bug: &str) -> anyhow::Result<PathBuf> {
    if !BUGS.contains(&bug) {
        bail!("unknown bug {bug:?} (known: {})", BUGS.join(", "));
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace dir")?
        .to_path_buf();
    let target = target_dir();
    eprintln!(
        "herald-jepsen: building herald with bug-{bug} into {} (the first build compiles RocksDB)",
        target.display()
    );
    let status = Command::new("cargo")
        .args(["build", "-p", "herald-node", "--bin", "herald", "--features"])
        .arg(format!("bug-{bug}"))
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        // Cargo reads `.cargo/config.toml` (the build's target features) from the directory it
        // runs in, not from the manifest's: run anywhere else and every crate, RocksDB
        // included, is built again with other flags.
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building herald with bug-{bug} failed");
    }
    let dir = target.join("bugs");
    std::fs::create_dir_all(&dir)?;
    let dest = dir.join(format!("herald-{bug}"));
    std::fs::copy(target.join("debug/herald"), &dest)?;
    Ok(dest)
}
