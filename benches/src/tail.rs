//! Tail latency under load: Herald QoS-1 unicast push → deliver at half its maximum rate.
//!
//! Receivers (raw protocol connections in generator processes, acking what they get) are spread
//! over the three nodes. First a closed-loop probe finds the maximum acked push rate to those
//! online users; then an open-loop pusher sends at half that rate for the measured time. Each
//! payload carries its *scheduled* send time, so a stall is charged to every push it delayed
//! (no coordinated omission). Latency is receiver-side: scheduled send → PUSH read by the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use herald_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::cluster::{app_request, connect, ClusterOpts, LocalCluster};
use crate::gen::ConnSpec;
use crate::genctl::{self, Gens};
use crate::plot::{cdf_series, Chart};
use crate::raft;
use crate::report::Out;
use crate::stats::{self, Latency};
use crate::sys;
use crate::wire;

#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Online receivers (users), spread over the 3 nodes.
    #[arg(long, default_value_t = 1000)]
    pub receivers: usize,
    /// Seconds of the closed-loop probe for the maximum rate.
    #[arg(long, default_value_t = 10)]
    pub probe_seconds: u64,
    /// Writers of the probe.
    #[arg(long, default_value_t = 256)]
    pub probe_writers: usize,
    /// Measured seconds at half the maximum rate.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Use this rate instead of half the probed maximum.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    #[arg(long, default_value_t = 22400)]
    pub base_port: u16,
    /// Plaintext cluster plane (`--insecure-cluster`) instead of mutual TLS, to read off what TLS
    /// between nodes costs the tail (run it beside a default run).
    #[arg(long)]
    pub insecure_cluster: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TailResult {
    pub max_rate: f64,
    pub rate: f64,
    pub seconds: f64,
    pub pushed: u64,
    pub push_errors: u64,
    pub delivered: u64,
    /// Scheduled send → delivered to the client.
    pub deliver_latency: Latency,
    /// Scheduled send → the pusher got the committed reply.
    pub ack_latency: Latency,
    pub receivers_held: u64,
    /// The slowest pushes by committed reply: (ms after the measured phase began that the push
    /// was scheduled, latency in µs), in send order. Shows whether the tail is spread out or
    /// comes in stalls, and when.
    pub slowest_acks: Vec<(u64, u64)>,
}

/// How many of the slowest committed replies [`TailResult::slowest_acks`] keeps.
const SLOWEST_KEPT: usize = 40;

/// Keeps the `SLOWEST_KEPT` largest (latency, sent at) pairs.
#[derive(Default)]
struct Slowest(std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64)>>);

impl Slowest {
    fn record(&mut self, latency_us: u64, sent_ms: u64) {
        self.0.push(std::cmp::Reverse((latency_us, sent_ms)));
        if self.0.len() > SLOWEST_KEPT {
            self.0.pop();
        }
    }

    /// (sent at, latency) in send order.
    fn into_sorted(self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.0.into_iter().map(|r| (r.0 .1, r.0 .0)).collect();
        v.sort_unstable();
        v
    }
}

pub async fn run(args: TailArgs, out: &Out) -> Result<TailResult> {
    let mut o = ClusterOpts::new(args.base_port);
    o.insecure_cluster = args.insecure_cluster;
    let mut c = LocalCluster::start_with(o).await?;
    let r = measure(&args, &c).await;
    if r.is_err() {
        eprintln!("node logs: {}", c.dir.path().display());
    }
    c.stop().await;
    let r = r?;
    println!(
        "\ntail latency at half the maximum rate ({:.0}/s of {:.0}/s), {:.0} s",
        r.rate, r.max_rate, r.seconds
    );
    println!(
        "push → deliver: p50 {} ms  p99 {} ms  p99.9 {} ms  max {} ms  ({} delivered of {} pushed, {} errors)",
        stats::ms(r.deliver_latency.p50_us),
        stats::ms(r.deliver_latency.p99_us),
        stats::ms(r.deliver_latency.p999_us),
        stats::ms(r.deliver_latency.max_us),
        r.delivered,
        r.pushed,
        r.push_errors
    );
    println!(
        "push → committed reply: p50 {} ms  p99 {} ms  p99.9 {} ms  max {} ms",
        stats::ms(r.ack_latency.p50_us),
        stats::ms(r.ack_latency.p99_us),
        stats::ms(r.ack_latency.p999_us),
        stats::ms(r.ack_latency.max_us)
    );
    let slow: Vec<String> = r
        .slowest_acks
        .iter()
        .map(|(at, us)| format!("{:.1}s:{}ms", *at as f64 / 1000.0, us / 1000))
        .collect();
    println!(
        "slowest committed replies (sent at : latency): {}",
        slow.join(" ")
    );
    out.json("tail", crate::idle::versions().await, &r)?;
    out.svg(
        "tail-latency-cdf.svg",
        Chart {
            title: &format!("Unicast QoS-1 at {:.0}/s: latency CDF", r.rate),
            x_label: "latency (ms, log)",
            y_label: "fraction of pushes",
            x_log: true,
            series: vec![
                cdf_series("push → deliver", &r.deliver_latency.cdf),
                cdf_series("push → committed reply", &r.ack_latency.cdf),
            ],
        }
        .svg(),
    )?;
    Ok(r)
}

pub(crate) async fn measure(args: &TailArgs, c: &LocalCluster) -> Result<TailResult> {
    let (app, key) = c.create_app("bench").await?;
    let leader = c.wait_leader(Duration::from_secs(30)).await?;
    let grpc = c.nodes[leader].grpc.clone();
    let spec = ConnSpec::herald(
        c.nodes.iter().map(|n| n.client.clone()).collect(),
        vec![app.clone()],
        "u",
    );
    let mut gens = Gens::spawn(1).await?;
    let opened = gens.open(&spec, args.receivers, 32, "receivers").await?;
    if opened.failed > 0 {
        eprintln!("{} receivers failed: {:?}", opened.failed, opened.first_error);
    }
    let max_rate = match args.rate {
        Some(r) => r * 2.0,
        None => {
            // The probe pushes to users u0..u<writers>, the receivers' users.
            let s = raft::measure(
                &grpc,
                &app.app,
                &key,
                args.probe_writers,
                raft::Api::Unary,
                args.payload,
                Duration::from_secs(args.probe_seconds),
                "probe: max push rate",
                &c.pids(),
            )
            .await?;
            eprintln!("max acked push rate to online users: {:.0}/s", s.commits_per_sec);
            s.commits_per_sec
        }
    };
    let rate = max_rate / 2.0;
    // Let the probe's deliveries drain.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, _) = gens.stats(true).await?;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&grpc).await?);
    }
    let pushed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let ack_hist = Arc::new(std::sync::Mutex::new(stats::new_histogram()));
    let slowest = Arc::new(std::sync::Mutex::new(Slowest::default()));
    let slots = Arc::new(Semaphore::new(8192));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let pb = genctl::timer(args.seconds, format!("tail at {rate:.0}/s"));
    let mut i = 0u64;
    let base_ns = sys::unix_nanos();
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        if i % 1000 == 0 {
            pb.set_position(start.elapsed().as_secs());
        }
        let sched_ns = base_ns + due.duration_since(start).as_nanos() as u64;
        let permit = slots.clone().acquire_owned().await?;
        let mut client = clients[i as usize % clients.len()].clone();
        let user = format!("u{}", i as usize % args.receivers);
        let body = wire::payload(args.payload, sched_ns, i);
        let sent_ms = due.duration_since(start).as_millis() as u64;
        let (app_id, key, pushed, errors, ack_hist, slowest) = (
            app.app.clone(),
            key.clone(),
            pushed.clone(),
            errors.clone(),
            ack_hist.clone(),
            slowest.clone(),
        );
        tokio::spawn(async move {
            let req = app_request(
                pb::PushRequest {
                    app: app_id.clone(),
                    targets: vec![pb::Target {
                        user,
                        devices: vec![],
                    }],
                    payload: body.into(),
                    qos: pb::Qos::AtLeastOnce as i32,
                    ..Default::default()
                },
                &app_id,
                &key,
            );
            match client.push(req).await {
                Ok(_) => {
                    pushed.fetch_add(1, Ordering::Relaxed);
                    let us = sys::unix_nanos().saturating_sub(sched_ns) / 1000;
                    stats::record(&mut ack_hist.lock().expect("not poisoned"), us);
                    slowest.lock().expect("not poisoned").record(us, sent_ms);
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        i += 1;
    }
    pb.finish_and_clear();
    // Wait for the last pushes and their deliveries.
    let _ = slots.acquire_many(8192).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, hist) = gens.stats(false).await?;
    gens.close_all().await;
    let ack = stats::summarize(&ack_hist.lock().expect("not poisoned"));
    let slowest_acks = std::mem::take(&mut *slowest.lock().expect("not poisoned")).into_sorted();
    Ok(TailResult {
        max_rate,
        rate,
        seconds: args.seconds,
        pushed: pushed.load(Ordering::Relaxed),
        push_errors: errors.load(Ordering::Relaxed),
        delivered: after.deliveries - before.deliveries,
        deliver_latency: stats::summarize(&hist),
        ack_latency: ack,
        receivers_held: after.held,
        slowest_acks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slowest_keeps_the_largest_latencies_in_send_order() {
        let mut s = Slowest::default();
        for i in 0..1000u64 {
            // Latency i % 97, so the largest are 96, 95, ... at several send times.
            s.record(i % 97, i);
        }
        let kept = s.into_sorted();
        assert_eq!(kept.len(), SLOWEST_KEPT);
        assert!(kept.windows(2).all(|w| w[0].0 < w[1].0), "send order: {kept:?}");
        let min_kept = kept.iter().map(|(_, l)| *l).min().unwrap();
        // 1000 samples hold each latency 10 or 11 times: the 40 largest are 96..=93 at least.
        assert!(min_kept >= 92, "{kept:?}");
    }
}
