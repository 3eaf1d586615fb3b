//! One run: network and nodes up, app created, workloads and nemesis for `--time`, heal, drain,
//! final state hashes, checkers, report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checker::{self, Results, Validity};
use crate::cluster::{AppCreds, Cluster, NodeOpts};
use crate::history::{Recorder, Val, F, MONITOR};
use crate::nemesis::{Fault, Nemesis, Timing};
use crate::workload::{self, Ctx, Tracker};
use crate::{net, plot, report};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunOpts {
    pub nodes: u64,
    /// Seconds of workload under faults.
    pub time_s: u64,
    pub nemesis: String,
    pub workloads: Vec<String>,
    /// Client operations per second, all workloads together.
    pub rate: f64,
    pub seed: u64,
    pub out: PathBuf,
    /// The `herald` binary to run.
    pub herald_bin: PathBuf,
    /// The injected bug the binary was built with, if any (for the report).
    pub bug: Option<String>,
    pub timing: Timing,
    /// Longest wait for the drain after heal.
    pub drain_s: u64,
    pub availability_min: f64,
    /// Search budget (states) of the linearizability checker per user.
    pub wgl_budget: u64,
    pub node_opts: NodeOpts,
    /// (node, ms): every fsync on that node's powerfs disk takes ms (a slow disk).
    pub slow_disk: Option<(u64, u64)>,
    /// The command line, for the report.
    pub command: String,
}

/// What a run produced.
pub struct RunOutcome {
    pub results: Results,
    pub out: PathBuf,
    pub summary: String,
}

impl RunOutcome {
    /// Process exit code: 0 valid, 1 a violation, 3 undecided.
    pub fn exit_code(&self) -> i32 {
        match self.results.valid {
            Validity::Valid => 0,
            Validity::Invalid => 1,
            Validity::Unknown => 3,
        }
    }
}

pub async fn run(opts: RunOpts) -> anyhow::Result<RunOutcome> {
    for w in &opts.workloads {
        if !workload::ALL.contains(&w.as_str()) {
            bail!("unknown workload {w:?} (known: {})", workload::ALL.join(", "));
        }
    }
    let faults = Fault::parse_list(&opts.nemesis, opts.nodes)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let removed = net::cleanup_stale();
    if !removed.is_empty() {
        eprintln!(
            "herald-jepsen: removed leftovers of crashed runs: {}",
            removed.join(" ")
        );
    }
    let exe = std::env::current_exe()?;
    let cluster = Arc::new(Cluster::new(
        opts.herald_bin.clone(),
        &exe,
        opts.out.join("nodes"),
        opts.nodes,
        opts.node_opts.clone(),
    )?);
    if let Some((id, ms)) = opts.slow_disk {
        match &cluster.disks {
            Some(d) => d.set_sync_delay(id, ms)?,
            None => bail!("--slow-disk needs powerfs disks"),
        }
    }
    // Tear down on Ctrl-C / SIGTERM too (a crash of the harness leaves namespaces that the next
    // run removes; the nodes exit with their stdin).
    let interrupted = CancellationToken::new();
    {
        let (c, i) = (cluster.clone(), interrupted.clone());
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let t = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => futures::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = t => {}
            }
            eprintln!("herald-jepsen: interrupted; tearing down");
            i.cancel();
            c.shutdown();
            std::process::exit(130);
        });
    }
    let result = run_inner(&opts, cluster.clone(), faults, interrupted).await;
    cluster.shutdown();
    result
}

async fn run_inner(
    opts: &RunOpts,
    cluster: Arc<Cluster>,
    faults: Vec<Fault>,
    interrupted: CancellationToken,
) -> anyhow::Result<RunOutcome> {
    let rec = Recorder::new(Some(&opts.out.join("history.jsonl")))?;
    for id in &cluster.ids {
        cluster.start(*id)?;
    }
    let leader = cluster.wait_leader(Duration::from_secs(90)).await?;
    eprintln!("herald-jepsen: {} nodes up, leader {leader}", opts.nodes);
    let (secret, api_key) = cluster.create_app("jepsen").await?;
    let app = AppCreds {
        id: "jepsen".into(),
        secret,
        api_key,
    };
    rec.phase("setup-done");

    // Monitor: Raft probes of every node, and nodes that exit on their own.
    let monitor_stop = CancellationToken::new();
    let monitor = tokio::spawn(monitor(cluster.clone(), rec.clone(), monitor_stop.clone()));

    let stop = CancellationToken::new();
    let n_workloads = opts.workloads.len().max(1) as f64;
    let ctx = Ctx {
        rec: rec.clone(),
        cluster: cluster.clone(),
        app,
        stop: stop.clone(),
        rate: opts.rate / n_workloads,
        seed: opts.seed,
        tracker: Arc::new(Tracker::default()),
    };
    let has = |w: &str| opts.workloads.iter().any(|x| x == w);
    rec.phase("workload-start");
    let mut qos1 = if has("qos1") {
        Some(workload::qos1::Qos1::start(&ctx, 6, 4).await?)
    } else {
        None
    };
    let mut offline = has("offline").then(|| workload::offline::Offline::start(&ctx, 6, 3));
    let mut registry = has("registry").then(|| workload::registry::Registry::start(&ctx, 4));
    let mut storm = if has("storm") {
        Some(workload::storm::Storm::start(&ctx, 6, 3).await?)
    } else {
        None
    };
    let mut topics = if has("topics") {
        Some(workload::topics::Topics::start(&ctx, 4, 3).await?)
    } else {
        None
    };
    let mut mqtt = has("mqtt").then(|| workload::mqtt::Mqtt::start(&ctx, 4, 3));

    // Faults for --time seconds; everything healed when it returns.
    let until = Instant::now() + Duration::from_secs(opts.time_s);
    let mut nemesis = Nemesis::new(cluster.clone(), rec.clone(), faults, opts.timing, opts.seed);
    nemesis.run(until, interrupted.clone()).await;
    rec.phase("healed");
    stop.cancel();
    if let Some(w) = qos1.as_mut() {
        w.stopped().await;
    }
    if let Some(w) = offline.as_mut() {
        w.stopped().await;
    }
    if let Some(w) = registry.as_mut() {
        w.stopped().await;
    }
    if let Some(w) = storm.as_mut() {
        w.stopped(&ctx).await;
    }
    if let Some(w) = topics.as_mut() {
        w.stopped().await;
    }
    if let Some(w) = mqtt.as_mut() {
        w.stopped().await;
    }
    rec.phase("workload-stopped");

    // Healthy again: a leader, every node caught up.
    if let Err(e) = wait_healthy(&cluster, Duration::from_secs(90)).await {
        eprintln!("herald-jepsen: cluster not healthy after heal: {e:#}");
    }
    rec.phase("drain-start");
    if let Some(w) = qos1.as_mut() {
        w.drain_online(&ctx).await;
    }
    if let Some(w) = topics.as_mut() {
        w.drain_online(&ctx).await;
    }
    if let Some(w) = offline.as_mut() {
        w.drain_online(&ctx).await;
    }
    if let Some(w) = storm.as_mut() {
        w.drain_online(&ctx).await;
    }
    drain(&ctx, Duration::from_secs(opts.drain_s)).await;
    rec.phase("drain-end");
    if let Some(w) = qos1 {
        w.close(&ctx).await;
    }
    if let Some(w) = offline {
        w.close(&ctx).await;
    }
    if let Some(w) = storm {
        w.close(&ctx).await;
    }
    if let Some(w) = topics {
        w.close(&ctx).await;
    }
    if let Some(w) = mqtt {
        w.close().await;
    }
    rec.phase("clients-closed");
    final_hashes(&cluster, &rec, Duration::from_secs(60)).await;
    monitor_stop.cancel();
    let _ = monitor.await;
    rec.phase("end");
    rec.flush();

    let history = rec.snapshot();
    let ctx = checker::Context {
        nodes: cluster.ids.clone(),
        availability_min: opts.availability_min,
        wgl_budget: opts.wgl_budget,
        shards: opts.node_opts.shards,
        ..checker::Context::default()
    };
    let results = checker::check_all(&history, &ctx);
    let summary = report::write(&opts.out, opts, &history, &results)?;
    plot::write(&opts.out, &history)?;
    Ok(RunOutcome {
        results,
        out: opts.out.clone(),
        summary,
    })
}

/// Polls every node's Raft probe and records it; records (and restarts) nodes that exited on
/// their own.
async fn monitor(cluster: Arc<Cluster>, rec: Recorder, stop: CancellationToken) {
    loop {
        for crash in cluster.crashes() {
            rec.record(
                MONITOR,
                crate::history::Type::Ok,
                F::Probe,
                Some(crash.id),
                Val {
                    state: Some("crashed".into()),
                    generation: Some(cluster.generation(crash.id)),
                    ..Val::default()
                },
                Some(format!("{}; log tail:\n{}", crash.status, crash.log_tail)),
            );
            eprintln!(
                "herald-jepsen: node {} exited on its own ({})",
                crash.id, crash.status
            );
            let _ = cluster.start(crash.id);
        }
        // Every node's member of every group (with shards: each group's terms, leaders and
        // applied indexes are its own).
        let targets: Vec<(u64, u32)> = cluster
            .ids
            .iter()
            .flat_map(|id| (0..=cluster.shards()).map(move |g| (*id, g)))
            .collect();
        let probes = futures::future::join_all(
            targets
                .iter()
                .map(|(id, g)| cluster.probe_group(*id, *g, false, Duration::from_millis(400))),
        )
        .await;
        for ((id, g), p) in targets.iter().zip(probes) {
            let Ok(p) = p else { continue };
            rec.ok(
                MONITOR,
                F::Probe,
                Some(*id),
                Val {
                    term: Some(p.term),
                    leader: p.has_leader.then_some(p.leader_id),
                    state: Some(p.state),
                    last_log: Some(p.last_log_index),
                    applied: Some(p.applied_index),
                    generation: Some(cluster.generation(*id)),
                    group: (cluster.shards() > 0).then_some(*g),
                    ..Val::default()
                },
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Waits for a leader and for every node to have applied what the leader had committed.
async fn wait_healthy(cluster: &Cluster, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let leader = cluster.wait_leader(limit).await?;
    let target = cluster
        .probe(leader, false, Duration::from_secs(2))
        .await?
        .applied_index;
    loop {
        let mut behind = Vec::new();
        for id in &cluster.ids {
            match cluster.probe(*id, false, Duration::from_secs(1)).await {
                Ok(p) if p.applied_index >= target => {}
                Ok(p) => behind.push(format!("node {id} at {}", p.applied_index)),
                Err(e) => behind.push(format!("node {id}: {e}")),
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not caught up to {target}: {}", behind.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until every acknowledged message was delivered and deliveries went quiet for 3 s (or
/// the limit passed).
async fn drain(ctx: &Ctx, limit: Duration) {
    let start = Instant::now();
    let quiet = 3_000_000u64;
    loop {
        let (n, sample) = ctx.tracker.outstanding();
        let last = ctx
            .tracker
            .last_recv_us
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = ctx.rec.now_us();
        if n == 0 && now.saturating_sub(last) >= quiet {
            eprintln!("herald-jepsen: drained in {:.1}s", start.elapsed().as_secs_f64());
            return;
        }
        if start.elapsed() >= limit {
            eprintln!(
                "herald-jepsen: drain gave up after {limit:?} with {n} messages outstanding: {sample:?}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Records every node's state hash of every Raft group, once the nodes report one applied index
/// in each (or at the last try).
async fn final_hashes(cluster: &Cluster, rec: &Recorder, limit: Duration) {
    let deadline = Instant::now() + limit;
    for group in 0..=cluster.shards() {
        final_group_hashes(cluster, rec, group, deadline).await;
    }
}

async fn final_group_hashes(cluster: &Cluster, rec: &Recorder, group: u32, deadline: Instant) {
    let recorded_group = (cluster.shards() > 0).then_some(group);
    loop {
        let ids = cluster.ids.clone();
        let probes = futures::future::join_all(
            ids.iter()
                .map(|id| cluster.probe_group(*id, group, true, Duration::from_secs(10))),
        )
        .await;
        let mut got: Vec<(u64, u64, u64)> = Vec::new();
        let mut silent: Vec<(u64, String)> = Vec::new();
        for (id, p) in ids.iter().zip(probes) {
            match p {
                Ok(p) => got.push((*id, p.state_hash_index, p.state_hash)),
                Err(e) => silent.push((*id, format!("{e:#}"))),
            }
        }
        let agreed = got.len() == ids.len() && got.iter().all(|(_, i, _)| *i > 0 && *i == got[0].1);
        if agreed || Instant::now() >= deadline {
            // A node that did not answer is recorded too: the convergence checker compares every
            // node of the run and must not take silence for agreement.
            for (id, error) in silent {
                rec.fail(
                    MONITOR,
                    F::Hash,
                    Some(id),
                    Val {
                        generation: Some(cluster.generation(id)),
                        group: recorded_group,
                        ..Val::default()
                    },
                    error,
                );
            }
            for (id, index, hash) in got {
                rec.ok(
                    MONITOR,
                    F::Hash,
                    Some(id),
                    Val {
                        applied: Some(index),
                        hash: Some(hash),
                        generation: Some(cluster.generation(id)),
                        group: recorded_group,
                        ..Val::default()
                    },
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
