//! `herald-bench`: Herald's benchmarks, and the peers it is measured against. Each subcommand
//! starts what it measures (real `herald node` processes on loopback, Mosquitto and nats-server
//! from Debian's packages), drives it from load-generator subprocesses (`herald-bench gen`),
//! prints a table and, with `--out DIR`, writes JSON and SVG plots. BENCHMARKS.md holds the
//! recorded figures with their exact commands.

mod churn;
mod cluster;
mod durable;
mod failover;
mod fanout;
mod gen;
mod genctl;
mod idle;
mod peers;
mod plot;
mod raft;
mod report;
mod shards;
mod stats;
mod storm;
mod sys;
mod tail;
mod token;
mod wire;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "herald-bench", about = "Herald benchmarks (see BENCHMARKS.md)")]
struct Cli {
    /// Directory for JSON results and SVG plots (nothing is written without it).
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Committed QoS-1 pushes/s and commit latency through a 3-node cluster (fsync on).
    Raft(raft::RaftArgs),
    /// Idle memory per connection (RSS slope): Herald plain and TLS, Mosquitto, nats-server.
    Idle(idle::IdleArgs),
    /// Memory per device with 3 app sessions: one shared connection vs 3 connections.
    Sessions(idle::SessionsArgs),
    /// One publisher → 10,000 subscribers: Herald topic and broadcast, Mosquitto, nats-server.
    Fanout(fanout::FanoutArgs),
    /// Durable replicated acked publishes: Herald QoS-1 vs JetStream R3.
    Durable(durable::DurableArgs),
    /// Unicast push → deliver latency at half the maximum rate.
    Tail(tail::TailArgs),
    /// Authenticated connects per second into a 3-node cluster.
    Churn(churn::ChurnArgs),
    /// kill -9 the leader under load: time to the next committed push.
    Failover(failover::FailoverArgs),
    /// SDK clients of a killed node reconnect and resume: time, lost and duplicate messages.
    Storm(storm::StormArgs),
    /// The same 3-node cluster with `--shards S` for several S, side by side: durable acked
    /// pushes/s, per-node CPU spread, connects/s, tail.
    Shards(shards::ShardsArgs),
    /// Every benchmark at full size, one after the other (about 25 minutes).
    All,
    /// Every benchmark in small form, in under 3 minutes (CI keeps them working; asserts
    /// nothing about speed).
    Quick,
    /// A load-generator process (started by the benchmarks; commands on stdin).
    #[command(hide = true)]
    Gen,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Gen = cli.cmd {
        return gen::main();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}

fn parse<T: clap::FromArgMatches + clap::Args>(args: &[&str]) -> T {
    let cmd = T::augment_args(clap::Command::new("x").no_binary_name(true));
    let m = cmd.get_matches_from(args);
    T::from_arg_matches(&m).expect("benchmark defaults parse")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = report::Out::new(cli.out)?;
    if out.machine.load1_at_start > 0.5 {
        eprintln!(
            "note: load average {:.2} at start: other work on the machine will show in the figures",
            out.machine.load1_at_start
        );
    }
    match cli.cmd {
        Cmd::Raft(a) => drop(raft::run(a, &out).await?),
        Cmd::Idle(a) => drop(idle::run(a, &out).await?),
        Cmd::Sessions(a) => drop(idle::run_sessions(a, &out).await?),
        Cmd::Fanout(a) => drop(fanout::run(a, &out).await?),
        Cmd::Durable(a) => drop(durable::run(a, &out).await?),
        Cmd::Tail(a) => drop(tail::run(a, &out).await?),
        Cmd::Churn(a) => drop(churn::run(a, &out).await?),
        Cmd::Failover(a) => drop(failover::run(a, &out).await?),
        Cmd::Storm(a) => drop(storm::run(a, &out).await?),
        Cmd::Shards(a) => drop(shards::run(a, &out).await?),
        Cmd::All => {
            raft::run(parse(&[]), &out).await?;
            idle::run(parse(&[]), &out).await?;
            idle::run_sessions(parse(&[]), &out).await?;
            fanout::run(parse(&[]), &out).await?;
            durable::run(parse(&[]), &out).await?;
            tail::run(parse(&[]), &out).await?;
            churn::run(parse(&[]), &out).await?;
            failover::run(parse(&[]), &out).await?;
            storm::run(parse(&[]), &out).await?;
            shards::run(parse(&[]), &out).await?;
        }
        Cmd::Quick => quick(&out).await?,
        Cmd::Gen => unreachable!("handled before the runtime starts"),
    }
    Ok(())
}

/// Every benchmark, tiny: proves they run end to end against real processes.
async fn quick(out: &report::Out) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let step = |name: &str| eprintln!("\n=== quick: {name} ({:.0} s)", t0.elapsed().as_secs_f64());
    step("raft");
    raft::run(parse(&["--writers", "1,16", "--quick"]), out).await?;
    step("idle");
    idle::run(parse(&["--steps", "100,200", "--settle", "0.3"]), out).await?;
    step("sessions");
    idle::run_sessions(parse(&["--steps", "50,100", "--settle", "0.3"]), out).await?;
    step("fanout");
    fanout::run(
        parse(&[
            "--subscribers",
            "200",
            "--seconds",
            "2",
            "--warmup",
            "1",
            "--gens",
            "1",
        ]),
        out,
    )
    .await?;
    step("durable");
    durable::run(parse(&["--publishers", "1,16", "--seconds", "1"]), out).await?;
    step("tail");
    tail::run(
        parse(&[
            "--receivers",
            "50",
            "--probe-seconds",
            "1",
            "--probe-writers",
            "16",
            "--seconds",
            "3",
        ]),
        out,
    )
    .await?;
    step("churn");
    churn::run(parse(&["--workers", "16", "--gens", "1", "--seconds", "2"]), out).await?;
    step("failover");
    failover::run(parse(&["--trials", "1", "--rate", "200", "--before", "1"]), out).await?;
    step("storm");
    storm::run(
        parse(&[
            "--clients",
            "100",
            "--per-gen",
            "100",
            "--rate",
            "50",
            "--before",
            "1",
            "--after",
            "2",
            "--limit",
            "30",
        ]),
        out,
    )
    .await?;
    step("shards");
    shards::run(
        parse(&[
            "--shards",
            "0,2",
            "--publishers",
            "16",
            "--seconds",
            "1",
            "--churn-workers",
            "16",
            "--churn-seconds",
            "1",
            "--tail-receivers",
            "20",
            "--tail-seconds",
            "2",
            "--probe-seconds",
            "1",
        ]),
        out,
    )
    .await?;
    eprintln!(
        "\nquick: every benchmark ran in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
