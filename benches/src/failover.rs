//! Leader failover: kill -9 the Raft leader under load; time until the next committed push.
//!
//! An open-loop pusher sends QoS-1 pushes at a steady rate to the two followers (they forward to
//! the leader), each push in its own task, so pushes keep being sent while earlier ones wait on
//! the dead leader. The figure is the time from the kill to the first committed reply of a push
//! *sent after* the kill. The killed node is restarted on its data dir and caught up between
//! trials.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use herald_proto::v1 as pb;
use serde::Serialize;

use crate::cluster::{app_request, connect, ClusterOpts, LocalCluster};
use crate::report::Out;

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Pushes per second sent during a trial.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of load before the kill.
    #[arg(long, default_value_t = 3.0)]
    pub before: f64,
    #[arg(long, default_value_t = 24400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub killed_node: u64,
    /// Kill → first committed reply to a push sent after the kill.
    pub next_commit_ms: f64,
    /// Kill → a node reports a new leader (ClusterStatus, polled every 20 ms).
    pub new_leader_ms: f64,
    pub new_leader: u64,
    /// Pushes that failed or timed out around the kill (their outcome is unknown to the caller).
    pub failed_pushes: u64,
    pub pushes_before_kill: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub trials: Vec<Trial>,
    pub max_ms: f64,
    pub median_ms: f64,
    pub election_timeout_ms: String,
}

#[derive(Default)]
struct Log {
    /// (sent, replied, ok) per push.
    pushes: Vec<(Instant, Instant, bool)>,
}

pub async fn run(args: FailoverArgs, out: &Out) -> Result<FailoverResult> {
    let mut c = LocalCluster::start_with(ClusterOpts::new(args.base_port)).await?;
    let r = trials(&args, &mut c).await;
    if r.is_err() {
        eprintln!("node logs: {}", c.dir.path().display());
    }
    c.stop().await;
    let trials = r?;
    let mut ms: Vec<f64> = trials.iter().map(|t| t.next_commit_ms).collect();
    ms.sort_by(f64::total_cmp);
    let result = FailoverResult {
        max_ms: ms.last().copied().unwrap_or(0.0),
        median_ms: ms.get(ms.len() / 2).copied().unwrap_or(0.0),
        trials,
        election_timeout_ms:
            "200 (randomized 200–400, plus a 400 ms leader lease), raft heartbeat 50 (node defaults)".into(),
    };
    println!("\nleader failover (kill -9 under load)");
    for (i, t) in result.trials.iter().enumerate() {
        println!(
            "trial {}: killed node {}  new leader {} after {:.0} ms  next committed push after {:.0} ms  ({} pushes failed)",
            i + 1,
            t.killed_node,
            t.new_leader,
            t.new_leader_ms,
            t.next_commit_ms,
            t.failed_pushes
        );
    }
    println!("median {:.0} ms, max {:.0} ms", result.median_ms, result.max_ms);
    out.json("failover", crate::idle::versions().await, &result)?;
    Ok(result)
}

async fn trials(args: &FailoverArgs, c: &mut LocalCluster) -> Result<Vec<Trial>> {
    let (app, key) = c.create_app("bench").await?;
    let mut out = Vec::new();
    for trial in 0..args.trials {
        c.wait_caught_up(Duration::from_secs(60)).await?;
        let leader = c.wait_leader(Duration::from_secs(30)).await?;
        let followers: Vec<usize> = (0..c.nodes.len()).filter(|i| *i != leader).collect();
        let mut clients = Vec::new();
        for &f in &followers {
            clients.push(connect(&c.nodes[f].grpc).await?);
        }
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = tokio_util_stop();
        let pusher = {
            let (log, stop, app, key, rate) =
                (log.clone(), stop.clone(), app.app.clone(), key.clone(), args.rate);
            tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let start = Instant::now();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
                    let mut client = clients[i as usize % clients.len()].clone();
                    let (log, app, key) = (log.clone(), app.clone(), key.clone());
                    tokio::spawn(async move {
                        let mut req = app_request(
                            pb::PushRequest {
                                app: app.clone(),
                                targets: vec![pb::Target {
                                    user: format!("f{}", i % 1000),
                                    devices: vec![],
                                }],
                                payload: vec![b'f'; 200].into(),
                                qos: pb::Qos::AtLeastOnce as i32,
                                ..Default::default()
                            },
                            &app,
                            &key,
                        );
                        req.set_timeout(Duration::from_secs(10));
                        let t0 = Instant::now();
                        let ok = client.push(req).await.is_ok();
                        log.lock()
                            .expect("not poisoned")
                            .pushes
                            .push((t0, Instant::now(), ok));
                    });
                    i += 1;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs_f64(args.before)).await;
        let killed = c.nodes[leader].id;
        let t_kill = Instant::now();
        c.kill9(leader).await?;
        eprintln!("trial {}: killed leader node {killed}", trial + 1);
        // Poll for the new leader while the pushes go on.
        let mut new_leader = (0u64, 0.0f64);
        let deadline = t_kill + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(j) = c.wait_leader(Duration::from_millis(20)).await {
                new_leader = (c.nodes[j].id, t_kill.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        // Wait for a committed push sent after the kill.
        let next = loop {
            let first = log
                .lock()
                .expect("not poisoned")
                .pushes
                .iter()
                .filter(|(sent, _, ok)| *ok && *sent >= t_kill)
                .map(|(_, done, _)| *done)
                .min();
            if let Some(done) = first {
                break done.duration_since(t_kill).as_secs_f64() * 1000.0;
            }
            if Instant::now() > deadline {
                bail!("no committed push within 30 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = pusher.await;
        // Let the pushes in flight finish (or time out) before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (failed, before) = {
            let l = log.lock().expect("not poisoned");
            (
                l.pushes.iter().filter(|p| !p.2).count() as u64,
                l.pushes.iter().filter(|p| p.0 < t_kill && p.2).count() as u64,
            )
        };
        eprintln!(
            "trial {}: new leader node {} after {:.0} ms; next committed push after {next:.0} ms",
            trial + 1,
            new_leader.0,
            new_leader.1
        );
        out.push(Trial {
            killed_node: killed,
            next_commit_ms: next,
            new_leader_ms: new_leader.1,
            new_leader: new_leader.0,
            failed_pushes: failed,
            pushes_before_kill: before,
        });
        c.spawn(leader)?;
    }
    Ok(out)
}

fn tokio_util_stop() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}
