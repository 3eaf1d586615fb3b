//! Connection churn: authenticated connects per second into a 3-node cluster. Each connect is a
//! TCP connect, HELLO with a token, the session registered through Raft (committed on a
//! majority) and WELCOME; then the client says BYE and closes (the node commits the session's
//! end through Raft too). Workers in generator processes loop over that, spread over the three
//! nodes and many source addresses. The same loop runs against Mosquitto (MQTT CONNECT with a
//! password, CONNACK, DISCONNECT) and nats-server (CONNECT with a password, PING/PONG, close) as
//! the bar: single processes that replicate nothing.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cluster::{ClusterOpts, LocalCluster};
use crate::gen::{self, ConnSpec, Proto};
use crate::genctl::Gens;
use crate::peers;
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
    /// Systems measured, in this order: herald (3 nodes, each connect registered through Raft),
    /// mosquitto and nats (one process each, password checked, nothing replicated).
    #[arg(long, default_value = "herald,mosquitto,nats", value_delimiter = ',')]
    pub systems: Vec<String>,
    #[arg(long, default_value_t = 23400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnResult {
    pub system: String,
    pub workers: usize,
    pub seconds: f64,
    pub connects: u64,
    pub failed: u64,
    pub connects_per_sec: f64,
    /// TCP connect → WELCOME (MQTT: CONNACK; NATS: PONG after CONNECT).
    pub latency: Latency,
    pub first_error: Option<String>,
    /// Cores used by the server processes (the three nodes for Herald).
    pub server_cpu_util: f64,
    /// Server CPU per connect (connect and disconnect), in microseconds.
    pub server_cpu_us_per_connect: f64,
}

pub async fn run(args: ChurnArgs, out: &Out) -> Result<Vec<ChurnResult>> {
    let missing = peers::ensure_installed().await;
    let dir = tempfile::Builder::new().prefix("herald-bench-churn-").tempdir()?;
    let mut results = Vec::new();
    for (k, system) in args.systems.iter().enumerate() {
        if peers::not_installed(system, &missing) {
            continue;
        }
        let port = args.base_port + k as u16 * 300;
        let r = match system.as_str() {
            "herald" => herald(&args, port).await?,
            "mosquitto" | "nats" => {
                let sub = dir.path().join(system);
                std::fs::create_dir_all(&sub)?;
                peer(&args, system, port, &sub).await?
            }
            other => bail!("unknown system {other:?} (herald, mosquitto, nats)"),
        };
        println!(
            "\nconnection churn, {}: {:.0} authenticated connects/s ({} in {:.0} s, {} failed), connect → welcome p50 {} ms p99 {} ms; server used {:.2} cores, {:.0} µs per connect",
            r.system,
            r.connects_per_sec,
            r.connects,
            r.seconds,
            r.failed,
            stats::ms(r.latency.p50_us),
            stats::ms(r.latency.p99_us),
            r.server_cpu_util,
            r.server_cpu_us_per_connect
        );
        if let Some(e) = &r.first_error {
            println!("first error: {e}");
        }
        results.push(r);
    }
    out.json("churn", crate::idle::versions().await, &results)?;
    Ok(results)
}

async fn herald(args: &ChurnArgs, port: u16) -> Result<ChurnResult> {
    let mut c = LocalCluster::start_with(ClusterOpts::new(port)).await?;
    let r = async {
        let (app, _) = c.create_app("bench").await?;
        let spec = ConnSpec::herald(
            c.nodes.iter().map(|n| n.client.clone()).collect(),
            vec![app],
            "churn",
        );
        measure(args, "herald", spec, &c.pids()).await
    }
    .await;
    c.stop().await;
    r
}

async fn peer(args: &ChurnArgs, system: &str, port: u16, dir: &std::path::Path) -> Result<ChurnResult> {
    let (proc_, proto) = if system == "mosquitto" {
        (peers::mosquitto(port, dir).await?, Proto::Mqtt)
    } else {
        (peers::nats(port, dir).await?, Proto::Nats)
    };
    let spec = ConnSpec::peer(proto, proc_.addr.clone(), peers::USER, peers::PASS, "churn");
    let r = measure(args, system, spec, &[proc_.pid()]).await;
    proc_.stop().await;
    r
}

pub(crate) async fn measure(
    args: &ChurnArgs,
    system: &str,
    mut spec: ConnSpec,
    pids: &[u32],
) -> Result<ChurnResult> {
    // Every worker its own source address: TIME_WAIT sockets stay spread thin.
    spec.src_ips = gen::src_ips(2, args.workers.max(1));
    spec.per_ip = 1;
    let gens = Gens::spawn(args.gens).await?;
    let cpu0 = crate::sys::cpu_seconds_all(pids)?;
    let (connects, failed, hist, first_error) = gens.churn(&spec, args.workers, args.seconds).await?;
    let cpu1 = crate::sys::cpu_seconds_all(pids)?;
    Ok(ChurnResult {
        system: system.into(),
        workers: args.workers,
        seconds: args.seconds,
        connects,
        failed,
        connects_per_sec: connects as f64 / args.seconds,
        latency: stats::summarize(&hist),
        first_error,
        server_cpu_util: (cpu1 - cpu0) / args.seconds,
        server_cpu_us_per_connect: (cpu1 - cpu0) * 1e6 / connects.max(1) as f64,
    })
}
