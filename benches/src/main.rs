//! `herald-bench`: Herald's benchmarks. Each subcommand starts what it measures (real node
//! processes on loopback) and prints a table; `--out` writes JSON. See BENCHMARKS.md for the
//! recorded figures and the exact commands.

mod cluster;
mod raft;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "herald-bench", about = "Herald benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Committed QoS-1 pushes/s and commit latency through a 3-node cluster (fsync on).
    Raft(raft::RaftArgs),
    /// Every benchmark in small form (CI keeps them working; asserts nothing about speed).
    Quick,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Raft(args) => {
            raft::run(args).await?;
        }
        Cmd::Quick => {
            raft::run(raft::RaftArgs {
                writers: vec![1, 16],
                seconds: 1,
                payload: 200,
                base_port: 17400,
                out: None,
                quick: true,
            })
            .await?;
        }
    }
    Ok(())
}
