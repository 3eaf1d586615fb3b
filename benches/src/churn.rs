//! Connection churn: authenticated connects per second into a 3-node cluster. Each connect is a
//! TCP connect, HELLO with a token, the session registered through Raft (committed on a
//! majority) and WELCOME; then the client says BYE and closes (the node commits the session's
//! end through Raft too). Workers in generator processes loop over that, spread over the three
//! nodes and many source addresses.

use anyhow::Result;
use serde::Serialize;

use crate::cluster::{ClusterOpts, LocalCluster};
use crate::gen::{self, ConnSpec};
use crate::genctl::Gens;
use crate::report::Out;
use crate::stats::{self, Latency};

#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Concurrent connect loops (over all generators).
    #[arg(long, default_value_t = 512)]
    pub workers: usize,
    #[arg(long, default_value_t = 2)]
    pub gens: usize,
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 23400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    pub workers: usize,
    pub seconds: f64,
    pub connects: u64,
    pub failed: u64,
    pub connects_per_sec: f64,
    /// TCP connect → WELCOME.
    pub latency: Latency,
    pub first_error: Option<String>,
    pub server_cpu_util: f64,
}

pub async fn run(args: ChurnArgs, out: &Out) -> Result<ChurnResult> {
    let mut c = LocalCluster::start_with(ClusterOpts::new(args.base_port)).await?;
    let r = async {
        let (app, _) = c.create_app("bench").await?;
        let mut spec = ConnSpec::herald(
            c.nodes.iter().map(|n| n.client.clone()).collect(),
            vec![app],
            "churn",
        );
        // Every worker its own source address: TIME_WAIT sockets stay spread thin.
        spec.src_ips = gen::src_ips(2, args.workers.max(1));
        spec.per_ip = 1;
        let gens = Gens::spawn(args.gens).await?;
        let pids = c.pids();
        let cpu0 = crate::sys::cpu_seconds_all(&pids)?;
        let (connects, failed, hist, first_error) = gens.churn(&spec, args.workers, args.seconds).await?;
        let cpu1 = crate::sys::cpu_seconds_all(&pids)?;
        Ok::<_, anyhow::Error>(ChurnResult {
            workers: args.workers,
            seconds: args.seconds,
            connects,
            failed,
            connects_per_sec: connects as f64 / args.seconds,
            latency: stats::summarize(&hist),
            first_error,
            server_cpu_util: (cpu1 - cpu0) / args.seconds,
        })
    }
    .await;
    c.stop().await;
    let r = r?;
    println!(
        "\nconnection churn: {:.0} authenticated connects/s ({} in {:.0} s, {} failed), connect → WELCOME p50 {} ms p99 {} ms; nodes used {:.2} cores",
        r.connects_per_sec,
        r.connects,
        r.seconds,
        r.failed,
        stats::ms(r.latency.p50_us),
        stats::ms(r.latency.p99_us),
        r.server_cpu_util
    );
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
    out.json("churn", crate::idle::versions().await, &r)?;
    Ok(r)
}
