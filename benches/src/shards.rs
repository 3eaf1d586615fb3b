//! Shards side by side (issue 27): the same 3-node cluster created with `--shards S` for each S
//! in one run, measured the same way: durable acked pushes/s at 256 publishers (PushStream, one
//! push in flight each, users `u0..u255`, clients on node 1), the CPU each node used meanwhile
//! (the spread max/min shows whether one leader does the work), authenticated connects/s (the
//! churn loop over the three nodes) and the tail (push → deliver at half the probed maximum, the
//! tail bench's measure). S = 0 is the single-group cluster; S = 1 the same work behind the
//! metadata group. On a 2-core machine every node shares the same CPUs, so shards cannot add
//! throughput here; what this shows is what they cost and how they spread the leaders' work.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cluster::{connect, ClusterOpts, LocalCluster};
use crate::report::Out;

#[derive(Debug, Clone, clap::Args)]
pub struct ShardsArgs {
    /// Shard counts measured, in this order (0: one Raft group).
    #[arg(long, default_value = "0,1,3,8", value_delimiter = ',')]
    pub shards: Vec<u32>,
    #[arg(long, default_value_t = 256)]
    pub publishers: usize,
    /// Measured seconds of the durable step.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Connect loops of the churn step.
    #[arg(long, default_value_t = 256)]
    pub churn_workers: usize,
    #[arg(long, default_value_t = 10.0)]
    pub churn_seconds: f64,
    /// Online receivers of the tail step.
    #[arg(long, default_value_t = 300)]
    pub tail_receivers: usize,
    #[arg(long, default_value_t = 15.0)]
    pub tail_seconds: f64,
    #[arg(long, default_value_t = 5)]
    pub probe_seconds: u64,
    #[arg(long, default_value_t = 27400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shards: u32,
    pub acked_per_sec: f64,
    pub push_p99_ms: f64,
    pub push_errors: u64,
    /// Cores each node used during the durable step, by node id.
    pub node_cores: Vec<(u64, f64)>,
    /// Busiest node's cores over the idlest's.
    pub cpu_spread: f64,
    /// Shards each node led during the measurement, by node id (the metadata group not counted).
    pub leaders: Vec<(u64, usize)>,
    pub connects_per_sec: f64,
    pub connect_p99_ms: f64,
    pub connect_failed: u64,
    pub tail_rate: f64,
    pub tail_deliver_p99_ms: f64,
    pub tail_deliver_p999_ms: f64,
}

pub async fn run(args: ShardsArgs, out: &Out) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (k, &s) in args.shards.iter().enumerate() {
        let mut o = ClusterOpts::new(args.base_port + k as u16 * 400);
        o.extra = vec!["--shards".into(), s.to_string()];
        let mut c = LocalCluster::start_with(o).await?;
        let r = measure(&args, s, &c).await;
        if r.is_err() {
            eprintln!("node logs: {}", c.dir.path().display());
        }
        c.stop().await;
        let r = r?;
        eprintln!(
            "S={:<2} {:>8.0} acked/s p99 {:>6.1} ms | cpu spread {:.2} {:?} | {:>6.0} connects/s p99 {:.1} ms | tail p99 {:.1} ms at {:.0}/s",
            r.shards,
            r.acked_per_sec,
            r.push_p99_ms,
            r.cpu_spread,
            r.node_cores,
            r.connects_per_sec,
            r.connect_p99_ms,
            r.tail_deliver_p99_ms,
            r.tail_rate
        );
        rows.push(r);
    }
    print_table(&rows);
    out.json("shards", crate::idle::versions().await, &rows)?;
    Ok(rows)
}

async fn measure(args: &ShardsArgs, shards: u32, c: &LocalCluster) -> Result<Row> {
    // Tail first: its measure creates the app "bench".
    let tail_args = crate::tail::TailArgs {
        receivers: args.tail_receivers,
        probe_seconds: args.probe_seconds,
        probe_writers: 64,
        seconds: args.tail_seconds,
        rate: None,
        payload: 200,
        base_port: 0,
        insecure_cluster: false,
    };
    let tail = crate::tail::measure(&tail_args, c).await.context("tail step")?;
    let (app, key) = c.create_app("bench-push").await?;
    let leaders = spread_leaders(c, shards).await?;
    let pids = c.pids();
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| crate::sys::cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let t0 = Instant::now();
    let dur = Duration::from_secs(args.seconds);
    let step = crate::raft::measure(
        &c.nodes[0].grpc,
        &app.app,
        &key,
        args.publishers,
        crate::raft::Api::Stream,
        200,
        dur,
        &format!("S={shards}: durable pushes, {} publishers", args.publishers),
        &pids,
    )
    .await?;
    let elapsed = t0.elapsed().as_secs_f64();
    let node_cores: Vec<(u64, f64)> = c
        .nodes
        .iter()
        .zip(pids.iter().zip(cpu0))
        .map(|(n, (p, before))| {
            (
                n.id,
                (crate::sys::cpu_seconds(*p).unwrap_or(before) - before) / elapsed,
            )
        })
        .collect();
    let max = node_cores.iter().map(|x| x.1).fold(0.0, f64::max);
    let min = node_cores.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    let churn_args = crate::churn::ChurnArgs {
        workers: args.churn_workers,
        gens: 2,
        seconds: args.churn_seconds,
        systems: vec!["herald".into()],
        base_port: 0,
    };
    let spec = crate::gen::ConnSpec::herald(
        c.nodes.iter().map(|n| n.client.clone()).collect(),
        vec![app.clone()],
        "churn",
    );
    let churn = crate::churn::measure(&churn_args, "herald", spec, &pids).await?;
    Ok(Row {
        shards,
        acked_per_sec: step.commits_per_sec,
        push_p99_ms: step.latency.p99_us as f64 / 1000.0,
        push_errors: step.errors,
        node_cores,
        cpu_spread: if min > 0.0 { max / min } else { f64::INFINITY },
        leaders,
        connects_per_sec: churn.connects_per_sec,
        connect_p99_ms: churn.latency.p99_us as f64 / 1000.0,
        connect_failed: churn.failed,
        tail_rate: tail.rate,
        tail_deliver_p99_ms: tail.deliver_latency.p99_us as f64 / 1000.0,
        tail_deliver_p999_ms: tail.deliver_latency.p999_us as f64 / 1000.0,
    })
}

/// Waits (up to 30 s) until every shard is led by its preferred node; returns how many shards
/// each node leads then (all of them by one node with no shards: the single group's leader).
async fn spread_leaders(c: &LocalCluster, shards: u32) -> Result<Vec<(u64, usize)>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut api = connect(&c.nodes[0].grpc).await?;
        let st = api
            .cluster_status(herald_proto::v1::ClusterStatusRequest {})
            .await?
            .into_inner();
        let data: Vec<_> = st.groups.iter().filter(|g| shards == 0 || g.group != 0).collect();
        let spread = data.iter().all(|g| {
            g.leader_id != 0 && (g.preferred_leader_id == 0 || g.leader_id == g.preferred_leader_id)
        });
        if spread || Instant::now() >= deadline {
            if !spread {
                eprintln!("S={shards}: shard leaders not spread after 30 s; measuring anyway");
            }
            return Ok(c
                .nodes
                .iter()
                .map(|n| (n.id, data.iter().filter(|g| g.leader_id == n.id).count()))
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_table(rows: &[Row]) {
    let base = rows.iter().find(|r| r.shards == 1);
    println!("\nshards on 3 nodes (same machine, same run)");
    println!(
        "{:>3} {:>10} {:>8} {:>11} {:>9} {:>10} {:>10} {:>10}  leaders by node",
        "S", "acked/s", "p99 ms", "connects/s", "p99 ms", "tail p99", "cpu max/min", "vs S=1"
    );
    for r in rows {
        let vs = base
            .map(|b| {
                format!(
                    "{:.2}/{:.2}",
                    r.acked_per_sec / b.acked_per_sec.max(1e-9),
                    r.connects_per_sec / b.connects_per_sec.max(1e-9)
                )
            })
            .unwrap_or_default();
        println!(
            "{:>3} {:>10.0} {:>8.1} {:>11.0} {:>9.1} {:>10.1} {:>10.2} {:>10}  {:?}",
            r.shards,
            r.acked_per_sec,
            r.push_p99_ms,
            r.connects_per_sec,
            r.connect_p99_ms,
            r.tail_deliver_p99_ms,
            r.cpu_spread,
            vs,
            r.leaders
        );
    }
}
