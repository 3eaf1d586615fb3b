//! Fan-out: one publisher → N subscribers of one topic on one node, small messages. Deliveries/s,
//! server CPU-seconds per million deliveries, publish → receive latency; for Herald (topic push
//! and app broadcast), Mosquitto and nats-server side by side.
//!
//! The publisher is paced by a window: it never has more than `window` messages that its own
//! echo subscriber (subscribed after all the others) has not received yet; otherwise the run
//! would measure queue overflow rather than throughput. Subscribers live in generator processes
//! that count every delivery and record the latency carried in the payload's timestamp.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::cluster::{app_request, ClusterOpts, LocalCluster};
use crate::gen::{self, ConnSpec, Proto};
use crate::genctl::Gens;
use crate::idle::Server;
use crate::peers;
use crate::plot::{cdf_series, Chart, Series};
use crate::report::{ratio, Out};
use crate::stats::{self, Latency};
use crate::sys;
use crate::wire;

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 15.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Messages published and not yet echoed, at most.
    #[arg(long, default_value_t = 16)]
    pub window: u64,
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Generator processes holding the subscribers.
    #[arg(long, default_value_t = 2)]
    pub gens: usize,
    /// herald-topic, herald-broadcast, herald-mqtt (subscribers over MQTT), mosquitto, nats.
    #[arg(
        long,
        default_value = "herald-topic,herald-broadcast,mosquitto,nats",
        value_delimiter = ','
    )]
    pub systems: Vec<String>,
    #[arg(long, default_value_t = 20400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub system: String,
    pub subscribers_held: u64,
    pub published: u64,
    pub deliveries: u64,
    pub seconds: f64,
    pub deliveries_per_sec: f64,
    /// Server CPU (user + system, every server process) per million deliveries.
    pub cpu_s_per_million: f64,
    /// The same for the node holding the subscribers only (Herald; equal to the above for peers).
    pub cpu_s_per_million_node: f64,
    pub server_cpu_util: f64,
    pub latency: Latency,
    /// (seconds since start, deliveries/s over the last interval), warm-up included.
    pub timeline: Vec<(f64, f64)>,
    pub publish_errors: u64,
    pub subscribers_lost: u64,
}

enum Publisher {
    Herald {
        client: herald_proto::v1::herald_client::HeraldClient<tonic::transport::Channel>,
        app: String,
        key: String,
        broadcast: bool,
    },
    Stream {
        s: gen::Stream,
        proto: Proto,
    },
}

pub async fn run(args: FanoutArgs, out: &Out) -> Result<Vec<FanoutResult>> {
    let missing = peers::ensure_installed().await;
    let dir = tempfile::Builder::new()
        .prefix("herald-bench-fanout-")
        .tempdir()?;
    let mut results = Vec::new();
    for (k, system) in args.systems.iter().enumerate() {
        if peers::not_installed(system, &missing) {
            continue;
        }
        let sub = dir.path().join(system);
        std::fs::create_dir_all(&sub)?;
        let r = one(&args, system, args.base_port + k as u16 * 300, &sub).await?;
        eprintln!(
            "{:>16}: {:>10.0} deliveries/s  {:.3} CPU-s per million  p50 {} ms  p99 {} ms",
            r.system,
            r.deliveries_per_sec,
            r.cpu_s_per_million,
            stats::ms(r.latency.p50_us),
            stats::ms(r.latency.p99_us)
        );
        results.push(r);
    }
    print_table(&results);
    out.json("fanout", crate::idle::versions().await, &results)?;
    out.svg(
        "fanout-rate.svg",
        Chart {
            title: &format!(
                "Fan-out to {} subscribers: deliveries/s over time",
                args.subscribers
            ),
            x_label: "seconds",
            y_label: "deliveries/s",
            x_log: false,
            series: results
                .iter()
                .map(|r| Series {
                    name: r.system.clone(),
                    points: r.timeline.clone(),
                })
                .collect(),
        }
        .svg(),
    )?;
    out.svg(
        "fanout-latency-cdf.svg",
        Chart {
            title: "Fan-out: publish → receive latency CDF",
            x_label: "latency (ms, log)",
            y_label: "fraction of deliveries",
            x_log: true,
            series: results
                .iter()
                .map(|r| cdf_series(&r.system, &r.latency.cdf))
                .collect(),
        }
        .svg(),
    )?;
    Ok(results)
}

fn print_table(results: &[FanoutResult]) {
    let best = results
        .iter()
        .filter(|r| !r.system.starts_with("herald"))
        .map(|r| r.cpu_s_per_million)
        .filter(|v| *v > 0.0)
        .fold(f64::NAN, f64::min);
    println!("\nfan-out");
    println!(
        "{:<17} {:>12} {:>14} {:>9} {:>9} {:>24}",
        "system", "deliveries/s", "CPU-s/million", "p50 ms", "p99 ms", "CPU ratio (best peer/x)"
    );
    for r in results {
        println!(
            "{:<17} {:>12.0} {:>14.3} {:>9} {:>9} {:>24}",
            r.system,
            r.deliveries_per_sec,
            r.cpu_s_per_million,
            stats::ms(r.latency.p50_us),
            stats::ms(r.latency.p99_us),
            ratio(best, r.cpu_s_per_million)
        );
    }
}

async fn start(
    system: &str,
    base_port: u16,
    dir: &std::path::Path,
) -> Result<(Server, Vec<u32>, u32, ConnSpec, Publisher)> {
    match system {
        "herald-topic" | "herald-broadcast" => {
            let c = LocalCluster::start_with(ClusterOpts::new(base_port)).await?;
            let (app, key) = c.create_app("bench").await?;
            let node = &c.nodes[0];
            let mut spec = ConnSpec::herald(vec![node.client.clone()], vec![app.clone()], "u");
            spec.topic = Some("bench".into());
            let client = crate::cluster::connect(&node.grpc).await?;
            let pids = c.pids();
            let pid = node.pid().unwrap_or(0);
            let publisher = Publisher::Herald {
                client,
                app: app.app.clone(),
                key,
                broadcast: system == "herald-broadcast",
            };
            Ok((Server::Herald(Box::new(c)), pids, pid, spec, publisher))
        }
        "herald-mqtt" => {
            // Subscribers over Herald's MQTT listener (3.1.1, QoS 0 subscription to the Herald
            // topic), the publisher through the gRPC API as for herald-topic.
            let mut o = ClusterOpts::new(base_port);
            o.mqtt = true;
            let c = LocalCluster::start_with(o).await?;
            let (app, key) = c.create_app("bench").await?;
            let node = &c.nodes[0];
            let mut spec = ConnSpec::peer(Proto::Mqtt, node.mqtt.clone().unwrap_or_default(), "", "", "u");
            spec.apps = vec![app.clone()];
            spec.topic = Some("bench".into());
            let client = crate::cluster::connect(&node.grpc).await?;
            let pids = c.pids();
            let pid = node.pid().unwrap_or(0);
            let publisher = Publisher::Herald {
                client,
                app: app.app.clone(),
                key,
                broadcast: false,
            };
            Ok((Server::Herald(Box::new(c)), pids, pid, spec, publisher))
        }
        "mosquitto" => {
            let p = peers::mosquitto(base_port + 50, dir).await?;
            let mut spec = ConnSpec::peer(Proto::Mqtt, p.addr.clone(), peers::USER, peers::PASS, "c");
            let mut pub_spec = spec.clone();
            pub_spec.user_prefix = "publisher".into();
            let s = gen::open(&pub_spec, 0, None).await?;
            spec.topic = Some("bench".into());
            let pid = p.pid();
            Ok((
                Server::Peer(p),
                vec![pid],
                pid,
                spec,
                Publisher::Stream {
                    s,
                    proto: Proto::Mqtt,
                },
            ))
        }
        "nats" => {
            let p = peers::nats(base_port + 51, dir).await?;
            let mut spec = ConnSpec::peer(Proto::Nats, p.addr.clone(), peers::USER, peers::PASS, "c");
            let s = gen::open(&spec, 0, None).await?;
            spec.topic = Some("bench".into());
            let pid = p.pid();
            Ok((
                Server::Peer(p),
                vec![pid],
                pid,
                spec,
                Publisher::Stream {
                    s,
                    proto: Proto::Nats,
                },
            ))
        }
        other => {
            bail!("unknown system {other:?} (herald-topic, herald-broadcast, herald-mqtt, mosquitto, nats)")
        }
    }
}

async fn one(args: &FanoutArgs, system: &str, base_port: u16, dir: &std::path::Path) -> Result<FanoutResult> {
    let (server, pids, node_pid, spec, publisher) = start(system, base_port, dir).await?;
    let r = measure(args, system, &pids, node_pid, &spec, publisher).await;
    server.stop().await;
    r
}

async fn measure(
    args: &FanoutArgs,
    system: &str,
    pids: &[u32],
    node_pid: u32,
    spec: &ConnSpec,
    mut publisher: Publisher,
) -> Result<FanoutResult> {
    let mut gens = Gens::spawn(args.gens).await?;
    let opened = gens
        .open(spec, args.subscribers, 32, &format!("{system} subscribers"))
        .await?;
    if opened.failed > 0 {
        eprintln!(
            "{system}: {} subscribers failed: {:?}",
            opened.failed, opened.first_error
        );
    }
    // The echo subscriber, last to subscribe.
    let echoed = Arc::new(AtomicU64::new(0));
    let wake = Arc::new(Notify::new());
    let echo = {
        let s = gen::open(spec, 9_000_000, None)
            .await
            .context("echo subscriber")?;
        let (echoed, wake, proto) = (echoed.clone(), wake.clone(), spec.proto);
        tokio::spawn(async move {
            let _ = gen::recv_loop(s, proto, true, |_, _| {
                echoed.fetch_add(1, Ordering::Relaxed);
                wake.notify_one();
            })
            .await;
        })
    };
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    let mut sent = 0u64;
    let mut out = Vec::with_capacity(256);
    let mut timeline = Vec::new();
    let mut last_sample = (start, 0u64);
    let mut next_sample = start + Duration::from_millis(500);
    let mut at_start: Option<(Instant, u64, f64, f64)> = None;
    let pb = crate::genctl::timer(args.warmup + args.seconds, format!("{system} fan-out"));
    let mut stalled_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            let (s, _) = gens.stats(false).await?;
            let dt = now.duration_since(last_sample.0).as_secs_f64();
            timeline.push((
                now.duration_since(start).as_secs_f64(),
                (s.deliveries - last_sample.1) as f64 / dt,
            ));
            last_sample = (now, s.deliveries);
            next_sample = now + Duration::from_millis(500);
            pb.set_position(now.duration_since(start).as_secs());
            if at_start.is_none() && now >= measure_from {
                let (s, _) = gens.stats(true).await?;
                at_start = Some((
                    Instant::now(),
                    s.deliveries,
                    sys::cpu_seconds_all(pids)?,
                    sys::cpu_seconds(node_pid)?,
                ));
            }
            if now >= end {
                break;
            }
        }
        if sent - echoed.load(Ordering::Relaxed) >= args.window {
            let stalled = *stalled_since.get_or_insert(now);
            if now.duration_since(stalled) > Duration::from_secs(10) {
                bail!(
                    "{system}: no echo for 10 s (published {sent}, echoed {})",
                    echoed.load(Ordering::Relaxed)
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), wake.notified()).await;
            continue;
        }
        stalled_since = None;
        let body = wire::payload(args.payload, sys::unix_nanos(), sent);
        sent += 1;
        match &mut publisher {
            Publisher::Herald {
                client,
                app,
                key,
                broadcast,
            } => {
                let (mut c, app, key, broadcast, errors) = (
                    client.clone(),
                    app.clone(),
                    key.clone(),
                    *broadcast,
                    errors.clone(),
                );
                tokio::spawn(async move {
                    let r = if broadcast {
                        let req = herald_proto::v1::BroadcastRequest {
                            app: app.clone(),
                            payload: body.into(),
                            ..Default::default()
                        };
                        c.broadcast(app_request(req, &app, &key)).await.map(|_| ())
                    } else {
                        let req = herald_proto::v1::PublishRequest {
                            app: app.clone(),
                            topic: "bench".into(),
                            payload: body.into(),
                            ..Default::default()
                        };
                        c.publish_topic(app_request(req, &app, &key)).await.map(|_| ())
                    };
                    if r.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            Publisher::Stream { s, proto } => {
                out.clear();
                match proto {
                    Proto::Mqtt => wire::mqtt_publish(&mut out, "bench", &body),
                    _ => wire::nats_pub(&mut out, "bench", "", &body),
                }
                s.write_all(&out).await?;
            }
        }
    }
    pb.finish_and_clear();
    let (s1, hist) = gens.stats(false).await?;
    let t1 = Instant::now();
    let cpu1 = sys::cpu_seconds_all(pids)?;
    let node_cpu1 = sys::cpu_seconds(node_pid)?;
    echo.abort();
    gens.close_all().await;
    let (t0, d0, cpu0, node_cpu0) = at_start.context("measurement never started")?;
    let secs = t1.duration_since(t0).as_secs_f64();
    let deliveries = s1.deliveries - d0;
    let million = deliveries as f64 / 1e6;
    Ok(FanoutResult {
        system: system.into(),
        subscribers_held: s1.held,
        published: sent,
        deliveries,
        seconds: secs,
        deliveries_per_sec: deliveries as f64 / secs,
        cpu_s_per_million: if million > 0.0 {
            (cpu1 - cpu0) / million
        } else {
            0.0
        },
        cpu_s_per_million_node: if million > 0.0 {
            (node_cpu1 - node_cpu0) / million
        } else {
            0.0
        },
        server_cpu_util: (cpu1 - cpu0) / secs,
        latency: stats::summarize(&hist),
        timeline,
        publish_errors: errors.load(Ordering::Relaxed),
        subscribers_lost: s1.ended,
    })
}
