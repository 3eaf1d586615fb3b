//! Reconnect storm: N SDK clients (herald-client, spread over generator processes) connected to
//! one node of three; that node is killed (kill -9); the clients reconnect to the other two with
//! the SDK's own backoff and resume. Measured: the time until 99% and 100% are connected again
//! (WELCOME of the resumed session), and, for QoS-1 pushes sent to those users throughout, how
//! many acknowledged pushes the apps never saw (lost) and how many they were handed twice
//! (duplicates after the SDK's dedupe).
//!
//! The killed node is a follower, so the storm is measured apart from a leader election (see the
//! failover benchmark for that).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use herald_proto::v1 as pb;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::cluster::{app_request, connect, ClusterOpts, LocalCluster};
use crate::gen::StormSpec;
use crate::genctl::{self, Gens};
use crate::report::Out;
use crate::sys;
use crate::wire;

#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    #[arg(long, default_value_t = 15_000)]
    pub clients: usize,
    /// SDK clients per generator process.
    #[arg(long, default_value_t = 5000)]
    pub per_gen: usize,
    /// QoS-1 pushes per second to random clients, before, during and after the storm.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds of pushes before the kill.
    #[arg(long, default_value_t = 5.0)]
    pub before: f64,
    /// Seconds of pushes after the kill.
    #[arg(long, default_value_t = 10.0)]
    pub after: f64,
    /// Give up waiting for every client after this many seconds.
    #[arg(long, default_value_t = 90.0)]
    pub limit: f64,
    /// Client starts in flight per generator.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 25400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    pub clients: u64,
    pub start_retries: u64,
    pub killed_node: u64,
    pub reconnected: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Time until every client was back (None if some never came back within the limit).
    pub all_ms: Option<f64>,
    /// Clients back per node id.
    pub landed: Vec<(u64, u64)>,
    pub pushes_acked: u64,
    pub pushes_failed: u64,
    /// Acknowledged QoS-1 pushes that no app saw.
    pub lost: u64,
    /// Pushes an app was handed twice (after the SDK's dedupe).
    pub app_duplicates: u64,
    /// Pushes that failed (outcome unknown to the pusher) but were delivered anyway.
    pub delivered_unacked: u64,
    pub gaps: u64,
    /// (ms after the kill, fraction of clients back), for the plot.
    pub curve: Vec<(f64, f64)>,
}

pub async fn run(args: StormArgs, out: &Out) -> Result<StormResult> {
    let mut c = LocalCluster::start_with(ClusterOpts::new(args.base_port)).await?;
    let r = storm(&args, &mut c).await;
    if r.is_err() {
        eprintln!("node logs: {}", c.dir.path().display());
    }
    c.stop().await;
    let r = r?;
    println!(
        "\nreconnect storm: {} SDK clients on node {} (killed): 99% back in {:.0} ms, 100% in {}; {} acked pushes, {} lost, {} duplicates seen by apps",
        r.clients,
        r.killed_node,
        r.p99_ms,
        r.all_ms.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "— (not all came back)".into()),
        r.pushes_acked,
        r.lost,
        r.app_duplicates
    );
    out.json("storm", crate::idle::versions().await, &r)?;
    out.svg(
        "storm-reconnect.svg",
        crate::plot::Chart {
            title: &format!("Reconnect storm: {} SDK clients, node killed at 0", r.clients),
            x_label: "ms after kill -9",
            y_label: "fraction of clients resumed",
            x_log: false,
            series: vec![crate::plot::Series {
                name: "resumed".into(),
                points: r.curve.clone(),
            }],
        }
        .svg(),
    )?;
    Ok(r)
}

async fn storm(args: &StormArgs, c: &mut LocalCluster) -> Result<StormResult> {
    let (app, key) = c.create_app("bench").await?;
    let leader = c.wait_leader(std::time::Duration::from_secs(30)).await?;
    let target = (0..c.nodes.len()).find(|i| *i != leader).unwrap_or(0);
    let mut nodes = vec![c.nodes[target].client.clone()];
    nodes.extend(
        (0..c.nodes.len())
            .filter(|i| *i != target)
            .map(|i| c.nodes[i].client.clone()),
    );
    let spec = StormSpec {
        nodes,
        start_node: c.nodes[target].id,
        app: app.clone(),
        user_prefix: "s".into(),
        concurrency: args.concurrency,
    };
    let gens = Gens::spawn(args.clients.div_ceil(args.per_gen.max(1))).await?;
    let (started, failed, retries, err) = gens.storm_start(&spec, args.clients).await?;
    if failed > 0 {
        eprintln!("{failed} SDK clients did not start: {err:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "{started} SDK clients on node {} ({} connections there)",
        spec.start_node,
        c.connections(target).await.unwrap_or(0)
    );
    // The pusher: open loop, each push its own task, to the leader.
    let grpc = c.nodes[leader].grpc.clone();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&grpc).await?);
    }
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let failed_ids: Arc<Mutex<Vec<u64>>> = Arc::default();
    let stop = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(Semaphore::new(4096));
    let pusher = {
        let (acked, failed_ids, stop, slots, app_id, key, rate, n) = (
            acked.clone(),
            failed_ids.clone(),
            stop.clone(),
            slots.clone(),
            app.app.clone(),
            key.clone(),
            args.rate,
            started.max(1) as usize,
        );
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let start = Instant::now();
            let mut i = 0u64;
            while stop.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let user = format!("s{}", rand::thread_rng().gen_range(0..n));
                let mut client = clients[i as usize % clients.len()].clone();
                let (acked, failed_ids, app_id, key) =
                    (acked.clone(), failed_ids.clone(), app_id.clone(), key.clone());
                tokio::spawn(async move {
                    let mut req = app_request(
                        pb::PushRequest {
                            app: app_id.clone(),
                            targets: vec![pb::Target {
                                user,
                                devices: vec![],
                            }],
                            payload: wire::payload(64, sys::unix_nanos(), i).into(),
                            qos: pb::Qos::AtLeastOnce as i32,
                            ..Default::default()
                        },
                        &app_id,
                        &key,
                    );
                    req.set_timeout(Duration::from_secs(10));
                    match client.push(req).await {
                        Ok(_) => acked.lock().expect("not poisoned").push(i),
                        Err(_) => failed_ids.lock().expect("not poisoned").push(i),
                    }
                    drop(permit);
                });
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(args.before)).await;
    let killed = c.nodes[target].id;
    let t_kill = Instant::now();
    let t_kill_ns = sys::unix_nanos();
    c.kill9(target).await?;
    eprintln!("killed node {killed}");
    let pb = genctl::bar(started, "clients resumed");
    let deadline = t_kill + Duration::from_secs_f64(args.limit);
    let push_until = t_kill + Duration::from_secs_f64(args.after);
    loop {
        let back = gens.storm_connected(t_kill_ns).await?;
        pb.set_position(back);
        if Instant::now() >= push_until {
            stop.store(1, Ordering::Relaxed);
        }
        if (back >= started && Instant::now() >= push_until) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pb.finish_and_clear();
    stop.store(1, Ordering::Relaxed);
    let _ = pusher.await;
    let _ = slots.acquire_many(4096).await?;
    // Let the last deliveries and replays arrive.
    let acked_set: HashSet<u64> = acked.lock().expect("not poisoned").iter().copied().collect();
    let mut report = gens.storm_report().await?;
    for _ in 0..15 {
        let got: HashSet<u64> = report.received.iter().copied().collect();
        if acked_set.iter().all(|id| got.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        report = gens.storm_report().await?;
    }
    gens.close_all().await;
    if report.clients == 0 {
        bail!("no SDK client started: {:?}", report.first_error);
    }
    let received: HashSet<u64> = report.received.iter().copied().collect();
    let lost = acked_set.iter().filter(|id| !received.contains(id)).count() as u64;
    let failed_set: Vec<u64> = failed_ids.lock().expect("not poisoned").clone();
    let delivered_unacked = failed_set.iter().filter(|id| received.contains(id)).count() as u64;
    // Per client: the first WELCOME after the kill.
    let mut back_ms: Vec<f64> = Vec::new();
    let mut landed: std::collections::BTreeMap<u64, u64> = Default::default();
    for (times, nodes) in report.connected_ns.iter().zip(&report.connected_node) {
        if let Some(k) = times.iter().position(|t| *t >= t_kill_ns) {
            back_ms.push((times[k] - t_kill_ns) as f64 / 1e6);
            *landed.entry(nodes[k]).or_default() += 1;
        }
    }
    back_ms.sort_by(f64::total_cmp);
    let total = report.clients as usize;
    let at = |q: f64| -> f64 {
        let need = ((total as f64) * q).ceil() as usize;
        if need == 0 || back_ms.len() < need {
            f64::NAN
        } else {
            back_ms[need - 1]
        }
    };
    let curve: Vec<(f64, f64)> = (0..=100)
        .filter_map(|k| {
            let q = k as f64 / 100.0;
            let v = at(q);
            (k > 0 && v.is_finite()).then_some((v, q))
        })
        .collect();
    Ok(StormResult {
        clients: report.clients,
        start_retries: retries,
        killed_node: killed,
        reconnected: back_ms.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        all_ms: (back_ms.len() == total).then(|| at(1.0)),
        landed: landed.into_iter().collect(),
        pushes_acked: acked_set.len() as u64,
        pushes_failed: failed_set.len() as u64,
        lost,
        app_duplicates: report.app_duplicates,
        delivered_unacked,
        gaps: report.gaps,
        curve,
    })
}
