//! Idle memory per connection: the server's user-space RSS at several numbers of idle,
//! authenticated, subscribed connections, and the slope of a line through them (bytes per
//! connection, with R²), for Herald (plain and TLS), Mosquitto and nats-server side by side.
//!
//! Also the mobile case: one connection carrying 3 app sessions versus 3 connections of one
//! session each (`sessions`).
//!
//! Method: the server starts; its RSS and socket count are read with no client; then load
//! generators (separate processes, at most 5,000 connections each) open connections up to each
//! step, paced (a bounded number of handshakes in flight). Before sampling, the benchmark waits
//! until the server itself holds the connections (its socket count in /proc grew by the step),
//! lets it settle, and takes the median of three RSS readings.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cluster::{ClusterOpts, LocalCluster};
use crate::gen::{AppCred, ConnSpec, Proto};
use crate::genctl::Gens;
use crate::peers::{self, PeerProc};
use crate::plot::{Chart, Series};
use crate::report::Out;
use crate::stats;
use crate::sys;

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Connection counts to sample at.
    #[arg(long, default_value = "2000,5000,10000,15000", value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Servers: herald, herald-tls, herald-mqtt (Herald's MQTT listener), mosquitto, nats.
    #[arg(
        long,
        default_value = "herald,herald-tls,mosquitto,nats",
        value_delimiter = ','
    )]
    pub systems: Vec<String>,
    /// Connections per generator process.
    #[arg(long, default_value_t = 5000)]
    pub per_gen: usize,
    /// Handshakes in flight per generator.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds to let the server settle before sampling.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    #[arg(long, default_value_t = 18400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Connections the generators asked for.
    pub target: usize,
    /// Connections the server holds (its sockets minus those it had with no client).
    pub held: usize,
    pub rss_bytes: u64,
    /// Herald: bytes in the node's RocksDB memtables at this point (replicated state not yet
    /// flushed; bounded by the write buffer sizes, so it stops growing at scale).
    pub memtable_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    pub system: String,
    pub baseline_rss_bytes: u64,
    pub points: Vec<Point>,
    /// Bytes of RSS per connection (slope of the least-squares line through the points).
    pub bytes_per_conn: f64,
    pub r2: f64,
    /// Herald: the slope of RSS minus the RocksDB memtables.
    pub bytes_per_conn_without_memtables: Option<f64>,
    pub failed_connects: u64,
    pub note: String,
}

/// A server under test.
pub enum Server {
    Herald(Box<LocalCluster>),
    Peer(PeerProc),
}

impl Server {
    pub async fn stop(self) {
        match self {
            Server::Herald(mut c) => c.stop().await,
            Server::Peer(p) => p.stop().await,
        }
    }
}

/// Starts `system` and returns it with the pid to watch and how clients connect.
pub async fn start(
    system: &str,
    base_port: u16,
    dir: &std::path::Path,
) -> Result<(Server, u32, ConnSpec, String, Option<String>)> {
    match system {
        "herald" | "herald-tls" => {
            let tls = system == "herald-tls";
            let mut o = ClusterOpts::new(base_port);
            o.admin = true;
            let mut ca = None;
            if tls {
                let (ca_pem, cert, key) = crate::cluster::make_pki(dir)?;
                o.tls = Some((cert, key));
                ca = Some(ca_pem);
            }
            let c = LocalCluster::start_with(o).await?;
            let (app, _key) = c.create_app("bench").await?;
            // Every connection goes to node 1 (leader or not), whose RSS is sampled.
            let node = &c.nodes[0];
            let pid = node.pid().unwrap_or(0);
            let addr = if tls {
                node.tls.clone().unwrap_or_default()
            } else {
                node.client.clone()
            };
            let mut spec = ConnSpec::herald(vec![addr], vec![app], "u");
            spec.topic = Some("bench".into());
            if tls {
                spec.proto = Proto::HeraldTls;
                spec.tls_ca_pem = ca;
            }
            let note = format!(
                "node 1 of 3 (Raft registration on commit); {} client",
                if tls { "TLS 1.3" } else { "plain TCP" }
            );
            let admin = node.admin.clone();
            Ok((Server::Herald(Box::new(c)), pid, spec, note, admin))
        }
        "herald-mqtt" => {
            let mut o = ClusterOpts::new(base_port);
            o.admin = true;
            o.mqtt = true;
            let c = LocalCluster::start_with(o).await?;
            let (app, _key) = c.create_app("bench").await?;
            let node = &c.nodes[0];
            let pid = node.pid().unwrap_or(0);
            let addr = node.mqtt.clone().unwrap_or_default();
            let mut spec = ConnSpec::peer(Proto::Mqtt, addr, "", "", "u");
            spec.apps = vec![app];
            spec.topic = Some("bench".into());
            let admin = node.admin.clone();
            Ok((
                Server::Herald(Box::new(c)),
                pid,
                spec,
                "node 1 of 3, MQTT 3.1.1 (user = app, password = token), one QoS 0 subscription".into(),
                admin,
            ))
        }
        "mosquitto" => {
            let p = peers::mosquitto(base_port + 50, dir).await?;
            let pid = p.pid();
            let mut spec = ConnSpec::peer(Proto::Mqtt, p.addr.clone(), peers::USER, peers::PASS, "c");
            spec.topic = Some("bench".into());
            Ok((
                Server::Peer(p),
                pid,
                spec,
                "password auth, one QoS 0 subscription".into(),
                None,
            ))
        }
        "nats" => {
            let p = peers::nats(base_port + 51, dir).await?;
            let pid = p.pid();
            let mut spec = ConnSpec::peer(Proto::Nats, p.addr.clone(), peers::USER, peers::PASS, "c");
            spec.topic = Some("bench".into());
            Ok((
                Server::Peer(p),
                pid,
                spec,
                "user/password auth, one subscription".into(),
                None,
            ))
        }
        other => bail!("unknown system {other:?} (herald, herald-tls, herald-mqtt, mosquitto, nats)"),
    }
}

/// Waits until `pid` holds `want` more sockets than `base`; returns what it holds.
async fn wait_held(pid: u32, base: usize, want: usize, limit: Duration) -> Result<usize> {
    let deadline = Instant::now() + limit;
    loop {
        let held = sys::socket_count(pid)?.saturating_sub(base);
        if held >= want || Instant::now() > deadline {
            return Ok(held);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn median_rss(pid: u32) -> Result<u64> {
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(sys::rss_bytes(pid)?);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    v.sort();
    Ok(v[1])
}

/// Opens connections up to each step with `specs` (one connection of each spec per unit: 1 for
/// the plain case, 3 for "3 separate connections") and samples RSS.
#[allow(clippy::too_many_arguments)]
pub async fn ramp(
    pid: u32,
    admin: Option<&str>,
    specs: &[ConnSpec],
    steps: &[usize],
    per_gen: usize,
    concurrency: usize,
    settle: f64,
    label: &str,
) -> Result<(u64, Vec<Point>, u64)> {
    let conns_per_unit = specs.len();
    let max = steps.iter().copied().max().unwrap_or(0) * conns_per_unit;
    let mut gens = Gens::spawn(max.div_ceil(per_gen.max(1))).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_sockets = sys::socket_count(pid)?;
    let baseline = median_rss(pid).await?;
    let mut points = Vec::new();
    let mut units = 0;
    let mut failed = 0;
    for &step in steps {
        if step > units {
            for spec in specs {
                let o = gens
                    .open(spec, step - units, concurrency, &format!("{label} → {step}"))
                    .await?;
                failed += o.failed;
                if o.failed > 0 {
                    eprintln!("{label}: {} connects failed: {:?}", o.failed, o.first_error);
                }
            }
            units = step;
        }
        let want = step * conns_per_unit;
        let held = wait_held(pid, base_sockets, want, Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs_f64(settle)).await;
        let rss = median_rss(pid).await?;
        let memtable_bytes = match admin {
            Some(a) => Some(crate::cluster::memtable_bytes(a).await?),
            None => None,
        };
        eprintln!(
            "{label:>14}: {held:>6} held (asked {want:>6})  RSS {:>8.1} MiB{}",
            rss as f64 / 1048576.0,
            memtable_bytes
                .map(|m| format!("  (RocksDB memtables {:.1} MiB)", m as f64 / 1048576.0))
                .unwrap_or_default()
        );
        points.push(Point {
            target: want,
            held,
            rss_bytes: rss,
            memtable_bytes,
        });
    }
    gens.close_all().await;
    Ok((baseline, points, failed))
}

pub async fn run(args: IdleArgs, out: &Out) -> Result<Vec<SystemResult>> {
    let missing = peers::ensure_installed().await;
    let dir = tempfile::Builder::new().prefix("herald-bench-idle-").tempdir()?;
    let mut results = Vec::new();
    for (k, system) in args.systems.iter().enumerate() {
        if peers::not_installed(system, &missing) {
            continue;
        }
        let sub = dir.path().join(system);
        std::fs::create_dir_all(&sub)?;
        let (server, pid, spec, note, admin) = start(system, args.base_port + k as u16 * 300, &sub).await?;
        let r = ramp(
            pid,
            admin.as_deref(),
            std::slice::from_ref(&spec),
            &args.steps,
            args.per_gen,
            args.concurrency,
            args.settle,
            system,
        )
        .await;
        server.stop().await;
        let (baseline, points, failed) = r?;
        let fit: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.held as f64, p.rss_bytes as f64))
            .collect();
        let (slope, _, r2) = stats::linear_fit(&fit);
        let without: Option<Vec<(f64, f64)>> = points
            .iter()
            .map(|p| Some((p.held as f64, p.rss_bytes as f64 - p.memtable_bytes? as f64)))
            .collect();
        let without = without.map(|f| stats::linear_fit(&f).0);
        eprintln!(
            "{system:>14}: {slope:.0} bytes per connection (R² {r2:.4}){}",
            without
                .map(|w| format!("; {w:.0} without the RocksDB memtables"))
                .unwrap_or_default()
        );
        results.push(SystemResult {
            system: system.clone(),
            baseline_rss_bytes: baseline,
            points,
            bytes_per_conn: slope,
            r2,
            bytes_per_conn_without_memtables: without,
            failed_connects: failed,
            note,
        });
    }
    print_table(&results);
    out.json("idle", versions().await, &results)?;
    out.svg(
        "idle-memory.svg",
        Chart {
            title: "Server RSS vs idle connections",
            x_label: "connections held",
            y_label: "RSS (MiB)",
            x_log: false,
            series: results
                .iter()
                .map(|r| Series {
                    name: format!("{} ({:.0} B/conn)", r.system, r.bytes_per_conn),
                    points: std::iter::once((0.0, r.baseline_rss_bytes as f64 / 1048576.0))
                        .chain(
                            r.points
                                .iter()
                                .map(|p| (p.held as f64, p.rss_bytes as f64 / 1048576.0)),
                        )
                        .collect(),
                })
                .collect(),
        }
        .svg(),
    )?;
    Ok(results)
}

pub async fn versions() -> Vec<(String, String)> {
    vec![
        ("mosquitto".into(), peers::version("mosquitto").await),
        ("nats-server".into(), peers::version("nats-server").await),
        (
            "herald".into(),
            crate::cluster::herald_bin()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
    ]
}

fn print_table(results: &[SystemResult]) {
    let best_peer = results
        .iter()
        .filter(|r| !r.system.starts_with("herald"))
        .map(|r| r.bytes_per_conn)
        .fold(f64::NAN, f64::min);
    println!("\nidle memory per connection (RSS slope)");
    println!(
        "{:<12} {:>12} {:>8} {:>22} {:>26}",
        "system", "bytes/conn", "R²", "vs best peer (peer/x)", "without RocksDB memtables"
    );
    for r in results {
        println!(
            "{:<12} {:>12.0} {:>8.4} {:>22} {:>26}",
            r.system,
            r.bytes_per_conn,
            r.r2,
            crate::report::ratio(best_peer, r.bytes_per_conn),
            r.bytes_per_conn_without_memtables
                .map(|w| format!("{w:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3 app sessions on one connection vs 3 connections

#[derive(Debug, Clone, clap::Args)]
pub struct SessionsArgs {
    /// Devices to sample at (each has 3 app sessions).
    #[arg(long, default_value = "1000,2000,3000,5000", value_delimiter = ',')]
    pub steps: Vec<usize>,
    #[arg(long, default_value_t = 5000)]
    pub per_gen: usize,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    #[arg(long, default_value_t = 19400)]
    pub base_port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionsResult {
    pub variant: String,
    pub baseline_rss_bytes: u64,
    pub points: Vec<Point>,
    /// RSS per device (3 app sessions), slope against devices.
    pub bytes_per_device: f64,
    pub r2: f64,
}

pub async fn run_sessions(args: SessionsArgs, out: &Out) -> Result<Vec<SessionsResult>> {
    let mut results = Vec::new();
    for (k, shared) in [true, false].into_iter().enumerate() {
        let mut c = LocalCluster::start_with(ClusterOpts::new(args.base_port + k as u16 * 300)).await?;
        let mut apps: Vec<AppCred> = Vec::new();
        for a in ["app1", "app2", "app3"] {
            apps.push(c.create_app(a).await?.0);
        }
        let node = c.nodes[0].client.clone();
        let pid = c.nodes[0].pid().unwrap_or(0);
        let specs: Vec<ConnSpec> = if shared {
            let mut s = ConnSpec::herald(vec![node], apps.clone(), "u");
            s.topic = Some("bench".into());
            vec![s]
        } else {
            apps.iter()
                .map(|a| {
                    let mut s = ConnSpec::herald(vec![node.clone()], vec![a.clone()], "u");
                    s.topic = Some("bench".into());
                    s
                })
                .collect()
        };
        let variant = if shared {
            "1 connection × 3 sessions"
        } else {
            "3 connections × 1 session"
        };
        let r = ramp(
            pid,
            None,
            &specs,
            &args.steps,
            args.per_gen,
            args.concurrency,
            args.settle,
            variant,
        )
        .await;
        c.stop().await;
        let (baseline, mut points, _) = r?;
        let per = specs.len();
        // Fit against devices: held connections / connections per device.
        let fit: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.held as f64 / per as f64, p.rss_bytes as f64))
            .collect();
        let (slope, _, r2) = stats::linear_fit(&fit);
        for p in &mut points {
            p.target /= per;
        }
        eprintln!("{variant}: {slope:.0} bytes per device (R² {r2:.4})");
        results.push(SessionsResult {
            variant: variant.into(),
            baseline_rss_bytes: baseline,
            points,
            bytes_per_device: slope,
            r2,
        });
    }
    println!("\nuser-space memory per device carrying 3 app sessions");
    for r in &results {
        println!(
            "{:<28} {:>10.0} bytes/device  (R² {:.4})",
            r.variant, r.bytes_per_device, r.r2
        );
    }
    if results.len() == 2 {
        println!(
            "shared connection uses {} of the memory of 3 connections",
            crate::report::ratio(results[0].bytes_per_device, results[1].bytes_per_device)
        );
    }
    out.json("sessions", versions().await, &results)?;
    Ok(results)
}
