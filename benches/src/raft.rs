//! Raft benchmark: QoS-1 pushes (200-byte payloads) through a 3-node cluster of real `herald node`
//! processes with fsync on, over real gRPC, at several numbers of concurrent writers. Each writer
//! sends one push, waits for the committed reply, and sends the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use herald_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::cluster::{connect, LocalCluster};
use crate::stats::{self, Latency};

#[derive(Debug, Clone, clap::Args)]
pub struct RaftArgs {
    /// Concurrent writers, comma separated.
    #[arg(long, default_value = "1,16,256", value_delimiter = ',')]
    pub writers: Vec<usize>,
    /// Measured seconds per writer count (after a warm-up of a fifth of it).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// First port (nodes use base+1..3 for gRPC, base+101..103 for clients).
    #[arg(long, default_value_t = 17400)]
    pub base_port: u16,
    /// Write results as JSON here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Small and fast (CI): 1 s per step.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub writers: usize,
    pub seconds: f64,
    pub committed: u64,
    pub errors: u64,
    pub commits_per_sec: f64,
    pub latency: Latency,
}

pub async fn run(args: RaftArgs) -> Result<Vec<Step>> {
    let seconds = if args.quick { 1 } else { args.seconds };
    let mut cluster = LocalCluster::start(3, args.base_port, &[]).await?;
    let result = async {
        let app = cluster.create_app("bench").await?;
        let key = app.api_keys[0].clone();
        let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        let addr = cluster.nodes[leader].grpc.clone();
        eprintln!(
            "raft bench: leader is node {} at {addr}; {seconds}s per step",
            cluster.nodes[leader].id
        );
        let mut steps = Vec::new();
        for &w in &args.writers {
            let step = measure(&addr, &key, w, args.payload, Duration::from_secs(seconds)).await?;
            eprintln!(
                "writers {:>4}: {:>9.0} commits/s  p50 {} ms  p99 {} ms  p99.9 {} ms  ({} errors)",
                w,
                step.commits_per_sec,
                stats::ms(step.latency.p50_us),
                stats::ms(step.latency.p99_us),
                stats::ms(step.latency.p999_us),
                step.errors
            );
            steps.push(step);
        }
        Ok::<_, anyhow::Error>(steps)
    }
    .await;
    cluster.stop().await;
    let steps = result?;
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&steps)?)?;
    }
    Ok(steps)
}

async fn measure(addr: &str, key: &str, writers: usize, payload: usize, dur: Duration) -> Result<Step> {
    let channels = writers.clamp(1, 4);
    let mut clients = Vec::new();
    for _ in 0..channels {
        clients.push(connect(addr).await?);
    }
    let hist = Arc::new(Mutex::new(stats::new_histogram()));
    let warmup = dur / 5;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + dur;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = clients[w % channels].clone();
        let hist = hist.clone();
        let key = key.to_string();
        let body = bytes::Bytes::from(vec![b'p'; payload]);
        tasks.push(tokio::spawn(async move {
            let mut local = stats::new_histogram();
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut i = 0u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let mut req = tonic::Request::new(pb::PushRequest {
                    app: "bench".into(),
                    targets: vec![pb::Target {
                        user: format!("u{w}"),
                        devices: vec![],
                    }],
                    payload: body.clone(),
                    qos: pb::Qos::AtLeastOnce as i32,
                    ..Default::default()
                });
                let md = req.metadata_mut();
                md.insert("x-herald-app", "bench".parse().expect("ascii"));
                md.insert("x-herald-api-key", key.parse().expect("ascii"));
                let t0 = Instant::now();
                let r = client.push(req).await;
                let us = t0.elapsed().as_micros() as u64;
                if t0 >= measure_from {
                    match r {
                        Ok(_) => {
                            ok += 1;
                            let _ = local.record(us.max(1));
                        }
                        Err(_) => errors += 1,
                    }
                }
                i += 1;
            }
            let _ = i;
            hist.lock().await.add(&local).ok();
            (ok, errors)
        }));
    }
    let mut committed = 0;
    let mut errors = 0;
    for t in tasks {
        let (o, e) = t.await?;
        committed += o;
        errors += e;
    }
    let h = hist.lock().await;
    let secs = dur.as_secs_f64();
    Ok(Step {
        writers,
        seconds: secs,
        committed,
        errors,
        commits_per_sec: committed as f64 / secs,
        latency: stats::summarize(&h),
    })
}
