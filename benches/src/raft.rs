//! Raft benchmark: QoS-1 pushes (200-byte payloads) through a 3-node cluster of real `herald node`
//! processes with fsync on, over real gRPC, at several numbers of concurrent writers. Each writer
//! sends one push, waits for the committed reply, and sends the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use herald_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::cluster::{app_request, connect, LocalCluster};
use crate::genctl;
use crate::plot::{cdf_series, Chart};
use crate::report::Out;
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
    /// Small and fast (CI): 1 s per step.
    #[arg(long)]
    pub quick: bool,
    /// How writers push, comma separated: `unary` (one Push call per push), `stream` (one
    /// PushStream per writer, one push in flight on it) and/or `shared` (the writers share one
    /// PushStream per connection, as a backend's push client would pipeline them; each writer
    /// still has one push in flight and waits for its own answer); each writer count runs with
    /// each.
    #[arg(long, default_value = "unary,stream", value_delimiter = ',')]
    pub api: Vec<Api>,
}

/// How a writer sends its pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// One unary `Push` call per push.
    Unary,
    /// One `PushStream` per writer.
    Stream,
    /// One `PushStream` per connection (up to 4), shared by the writers: pushes pipelined, answers
    /// matched to writers in order.
    Shared,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub writers: usize,
    pub api: Api,
    pub seconds: f64,
    pub committed: u64,
    pub errors: u64,
    pub commits_per_sec: f64,
    pub latency: Latency,
    /// CPU-seconds the server processes used per second of the measured window (cores busy).
    pub server_cores: f64,
}

pub async fn run(args: RaftArgs, out: &Out) -> Result<Vec<Step>> {
    let seconds = if args.quick { 1 } else { args.seconds };
    let mut cluster = LocalCluster::start(3, args.base_port, &[]).await?;
    let result = async {
        let (app, key) = cluster.create_app("bench").await?;
        let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
        let addr = cluster.nodes[leader].grpc.clone();
        eprintln!(
            "raft bench: leader is node {} at {addr}; {seconds}s per step",
            cluster.nodes[leader].id
        );
        let mut steps = Vec::new();
        for &w in &args.writers {
            for &api in &args.api {
                let step = measure(
                    &addr,
                    &app.app,
                    &key,
                    w,
                    api,
                    args.payload,
                    Duration::from_secs(seconds),
                    &format!("raft, {w} writers, {api:?}"),
                    &cluster.pids(),
                )
                .await?;
                eprintln!(
                    "writers {:>4} {:>6}: {:>9.0} commits/s  p50 {} ms  p99 {} ms  p99.9 {} ms  ({} errors)",
                    w,
                    format!("{api:?}").to_lowercase(),
                    step.commits_per_sec,
                    stats::ms(step.latency.p50_us),
                    stats::ms(step.latency.p99_us),
                    stats::ms(step.latency.p999_us),
                    step.errors
                );
                steps.push(step);
            }
        }
        Ok::<_, anyhow::Error>(steps)
    }
    .await;
    cluster.stop().await;
    let steps = result?;
    out.json("raft", crate::idle::versions().await, &steps)?;
    out.svg(
        "raft-latency-cdf.svg",
        Chart {
            title: "Raft: QoS-1 push commit latency CDF (3 nodes, fsync)",
            x_label: "latency (ms, log)",
            y_label: "fraction of pushes",
            x_log: true,
            series: steps
                .iter()
                .map(|s| {
                    cdf_series(
                        &format!("{} writers, {:?}", s.writers, s.api).to_lowercase(),
                        &s.latency.cdf,
                    )
                })
                .collect(),
        }
        .svg(),
    )?;
    Ok(steps)
}

/// `writers` closed loops of QoS-1 pushes (to user `u<writer>`) against `addr` for `dur` after a
/// warm-up of a fifth of it. `pids`: the server processes whose CPU time is read.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    addr: &str,
    app: &str,
    key: &str,
    writers: usize,
    api: Api,
    payload: usize,
    dur: Duration,
    label: &str,
    pids: &[u32],
) -> Result<Step> {
    let channels = writers.clamp(1, 4);
    let mut clients = Vec::new();
    for _ in 0..channels {
        clients.push(connect(addr).await?);
    }
    let shared: Vec<SharedStream> = if api == Api::Shared {
        clients
            .iter()
            .map(|c| SharedStream::start(c.clone(), app, key))
            .collect()
    } else {
        Vec::new()
    };
    let hist = Arc::new(Mutex::new(stats::new_histogram()));
    let warmup = dur / 5;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + dur;
    let pb = genctl::timer((warmup + dur).as_secs_f64(), label.to_string());
    let cpu = cpu_window(pids.to_vec(), measure_from, end);
    let ticker = {
        let pb = pb.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                pb.set_position(start.elapsed().as_secs());
            }
        })
    };
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = clients[w % channels].clone();
        let shared = shared.get(w % channels).cloned();
        let hist = hist.clone();
        let (app, key) = (app.to_string(), key.to_string());
        let body = bytes::Bytes::from(vec![b'p'; payload]);
        tasks.push(tokio::spawn(async move {
            let mut local = stats::new_histogram();
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut stream: Option<PushStream> = None;
            while Instant::now() < end {
                let msg = pb::PushRequest {
                    app: app.clone(),
                    targets: vec![pb::Target {
                        user: format!("u{w}"),
                        devices: vec![],
                    }],
                    payload: body.clone(),
                    qos: pb::Qos::AtLeastOnce as i32,
                    ..Default::default()
                };
                let t0 = Instant::now();
                let r = match api {
                    Api::Unary => client
                        .push(app_request(msg, &app, &key))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Api::Stream => {
                        let s = match stream.as_mut() {
                            Some(s) => s,
                            None => match PushStream::open(&mut client, &app, &key).await {
                                Ok(s) => stream.insert(s),
                                Err(e) => {
                                    errors += 1;
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    tracing::debug!(error = %e, "push stream open failed");
                                    continue;
                                }
                            },
                        };
                        let r = s.push(msg).await;
                        if r.is_err() {
                            stream = None;
                        }
                        r
                    }
                    Api::Shared => match shared.as_ref() {
                        Some(s) => s.push(msg).await,
                        None => Err("no shared stream".into()),
                    },
                };
                let us = t0.elapsed().as_micros() as u64;
                if t0 >= measure_from && Instant::now() <= end {
                    match r {
                        Ok(()) => {
                            ok += 1;
                            stats::record(&mut local, us);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
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
    ticker.abort();
    pb.finish_and_clear();
    let h = hist.lock().await;
    let secs = dur.as_secs_f64();
    Ok(Step {
        writers,
        api,
        seconds: secs,
        committed,
        errors,
        commits_per_sec: committed as f64 / secs,
        latency: stats::summarize(&h),
        server_cores: cpu.await.unwrap_or(0.0),
    })
}

/// CPU-seconds per second that `pids` used between `from` and `to` (read by a task that sleeps
/// until each instant).
pub fn cpu_window(pids: Vec<u32>, from: Instant, to: Instant) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let c0 = crate::sys::cpu_seconds_all(&pids).unwrap_or(0.0);
        tokio::time::sleep_until(to.into()).await;
        let c1 = crate::sys::cpu_seconds_all(&pids).unwrap_or(0.0);
        (c1 - c0) / to.duration_since(from).as_secs_f64()
    })
}

/// A writer's PushStream: one push in flight at a time.
struct PushStream {
    tx: tokio::sync::mpsc::Sender<pb::PushRequest>,
    rx: tonic::Streaming<pb::PushStreamReply>,
}

impl PushStream {
    async fn open(
        client: &mut pb::herald_client::HeraldClient<tonic::transport::Channel>,
        app: &str,
        key: &str,
    ) -> Result<PushStream> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let replies = client.push_stream(app_request(outbound, app, key)).await?;
        Ok(PushStream {
            tx,
            rx: replies.into_inner(),
        })
    }

    /// Sends one push and waits for its answer; Err(why) if it failed or the stream broke.
    async fn push(&mut self, msg: pb::PushRequest) -> std::result::Result<(), String> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| "push stream closed".to_string())?;
        match self.rx.message().await {
            Ok(Some(r)) if r.code == 0 => Ok(()),
            Ok(Some(r)) => Err(format!("push failed: code {}: {}", r.code, r.message)),
            Ok(None) => Err("push stream ended".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A PushStream shared by several writers: a task owns the stream, sends what the writers hand it
/// and answers each writer from the replies, which the node sends in request order. A broken
/// stream fails every push waiting on it and is opened again for the next.
#[derive(Clone)]
struct SharedStream {
    tx: tokio::sync::mpsc::Sender<(pb::PushRequest, Answer)>,
}

type Answer = tokio::sync::oneshot::Sender<std::result::Result<(), String>>;

impl SharedStream {
    /// The owning task runs until no handle is left.
    fn start(
        client: pb::herald_client::HeraldClient<tonic::transport::Channel>,
        app: &str,
        key: &str,
    ) -> SharedStream {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(Self::own(client, app.to_string(), key.to_string(), rx));
        SharedStream { tx }
    }

    async fn push(&self, msg: pb::PushRequest) -> std::result::Result<(), String> {
        let (answer, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send((msg, answer))
            .await
            .map_err(|_| "shared stream gone".to_string())?;
        wait.await
            .unwrap_or_else(|_| Err("shared stream dropped the push".into()))
    }

    async fn own(
        mut client: pb::herald_client::HeraldClient<tonic::transport::Channel>,
        app: String,
        key: String,
        mut rx: tokio::sync::mpsc::Receiver<(pb::PushRequest, Answer)>,
    ) {
        use std::collections::VecDeque;
        'open: loop {
            let (out, out_rx) = tokio::sync::mpsc::channel(1024);
            let outbound = tokio_stream::wrappers::ReceiverStream::new(out_rx);
            let mut replies = match client.push_stream(app_request(outbound, &app, &key)).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    // Fail one waiting push so its writer counts the error, then retry.
                    match rx.recv().await {
                        Some((_, answer)) => {
                            let _ = answer.send(Err(format!("push stream open failed: {e}")));
                        }
                        None => return,
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'open;
                }
            };
            let mut waiting: VecDeque<Answer> = VecDeque::new();
            loop {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some((msg, answer)) => {
                            if out.send(msg).await.is_err() {
                                let _ = answer.send(Err("push stream closed".into()));
                                break;
                            }
                            waiting.push_back(answer);
                        }
                        None => return,
                    },
                    reply = replies.message(), if !waiting.is_empty() => {
                        let (r, broken) = match reply {
                            Ok(Some(r)) if r.code == 0 => (Ok(()), false),
                            Ok(Some(r)) => (Err(format!("push failed: code {}: {}", r.code, r.message)), false),
                            Ok(None) => (Err("push stream ended".into()), true),
                            Err(e) => (Err(e.to_string()), true),
                        };
                        if let Some(answer) = waiting.pop_front() {
                            let _ = answer.send(r);
                        }
                        if broken {
                            break;
                        }
                    }
                }
            }
            for answer in waiting.drain(..) {
                let _ = answer.send(Err("push stream broke".into()));
            }
        }
    }
}
