//! A cluster of real `herald node` processes on loopback, for benchmarks.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use herald_proto::v1 as pb;
use herald_proto::v1::herald_client::HeraldClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::gen::AppCred;

/// The `herald` binary: `$HERALD_BIN`, else next to this benchmark binary.
pub fn herald_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("HERALD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let p = me
        .parent()
        .context("benchmark binary has no directory")?
        .join("herald");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p herald-node) or set HERALD_BIN",
            p.display()
        );
    }
    Ok(p)
}

/// Node flags every benchmark cluster gets: connection limits raised for load generators on
/// loopback (the generators spread over many source addresses anyway), a short drain so a run
/// ends quickly, and warnings-only logs (a benchmark of 15,000 logins does not measure the
/// logger).
pub const BENCH_FLAGS: &[&str] = &[
    "--accept-rate-per-ip",
    "1000000",
    "--max-connections",
    "18000",
    "--drain-timeout-ms",
    "1000",
];

/// The cluster's CA and node certificates, made with `herald certs` (mutual TLS between nodes).
async fn make_certs(bin: &std::path::Path, dir: &std::path::Path, nodes: u64) -> Result<()> {
    let d = dir.display().to_string();
    let mut calls = vec![vec!["ca".to_string(), "--dir".into(), d.clone()]];
    for i in 1..=nodes {
        calls.push(vec![
            "node".into(),
            "--dir".into(),
            d.clone(),
            "--id".into(),
            i.to_string(),
        ]);
    }
    for args in calls {
        let out = Command::new(bin).arg("certs").args(&args).output().await?;
        if !out.status.success() {
            bail!("herald certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

pub struct Node {
    pub id: u64,
    pub grpc: String,
    pub client: String,
    pub tls: Option<String>,
    /// Admin HTTP address (metrics), when started with [`ClusterOpts::admin`].
    pub admin: Option<String>,
    /// MQTT listener address, when started with [`ClusterOpts::mqtt`].
    pub mqtt: Option<String>,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub nodes: u64,
    pub base_port: u16,
    /// Extra node flags (after [`BENCH_FLAGS`]).
    pub extra: Vec<String>,
    /// PEM cert and key: nodes also listen for TLS clients (base+200+i).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Nodes serve the admin HTTP endpoint (metrics) on base+250+i.
    pub admin: bool,
    /// Nodes serve MQTT (`--mqtt-addr`) on base+230+i.
    pub mqtt: bool,
    /// Plaintext cluster plane (`--insecure-cluster`) instead of mutual TLS, to measure what
    /// TLS between nodes costs. The cluster plane listens on base+50+i either way.
    pub insecure_cluster: bool,
}

impl ClusterOpts {
    pub fn new(base_port: u16) -> ClusterOpts {
        ClusterOpts {
            nodes: 3,
            base_port,
            extra: Vec::new(),
            tls: None,
            admin: false,
            mqtt: false,
            insecure_cluster: false,
        }
    }
}

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub admin_token: String,
    bin: PathBuf,
}

impl LocalCluster {
    /// Starts `n` nodes with ports from `base` (gRPC base+i, clients base+100+i, TLS base+200+i).
    pub async fn start(n: u64, base: u16, extra: &[&str]) -> Result<LocalCluster> {
        let mut o = ClusterOpts::new(base);
        o.nodes = n;
        o.extra = extra.iter().map(|s| s.to_string()).collect();
        Self::start_with(o).await
    }

    pub async fn start_with(o: ClusterOpts) -> Result<LocalCluster> {
        let dir = tempfile::Builder::new().prefix("herald-bench-").tempdir()?;
        let bin = herald_bin()?;
        let admin_token = "bench-admin-token-0123456789".to_string();
        let base = o.base_port as u64;
        let peers: Vec<String> = (1..=o.nodes)
            .map(|i| format!("{i}=127.0.0.1:{}", base + 50 + i))
            .collect();
        let certs = dir.path().join("certs");
        if !o.insecure_cluster {
            make_certs(&bin, &certs, o.nodes).await?;
        }
        let mut nodes = Vec::new();
        for i in 1..=o.nodes {
            let grpc = format!("127.0.0.1:{}", base + i);
            let client = format!("127.0.0.1:{}", base + 100 + i);
            let mut args = vec![
                "node".to_string(),
                "--id".into(),
                i.to_string(),
                "--data-dir".into(),
                dir.path().join(format!("node-{i}")).display().to_string(),
                "--grpc-addr".into(),
                grpc.clone(),
                "--client-addr".into(),
                client.clone(),
                "--peers".into(),
                peers.join(","),
                "--admin-token".into(),
                admin_token.clone(),
                "--cluster-addr".into(),
                format!("127.0.0.1:{}", base + 50 + i),
            ];
            if o.insecure_cluster {
                args.push("--insecure-cluster".into());
            } else {
                args.extend([
                    "--cluster-ca".into(),
                    certs.join("ca.pem").display().to_string(),
                    "--cluster-cert".into(),
                    certs.join(format!("node-{i}.pem")).display().to_string(),
                    "--cluster-key".into(),
                    certs.join(format!("node-{i}.key")).display().to_string(),
                ]);
            }
            let mut tls = None;
            if let Some((cert, key)) = &o.tls {
                let a = format!("127.0.0.1:{}", base + 200 + i);
                args.extend([
                    "--tls-addr".into(),
                    a.clone(),
                    "--tls-cert".into(),
                    cert.display().to_string(),
                    "--tls-key".into(),
                    key.display().to_string(),
                ]);
                tls = Some(a);
            }
            let mut admin = None;
            if o.admin {
                let a = format!("127.0.0.1:{}", base + 250 + i);
                args.extend(["--admin-addr".into(), a.clone()]);
                admin = Some(a);
            }
            let mut mqtt = None;
            if o.mqtt {
                let a = format!("127.0.0.1:{}", base + 230 + i);
                args.extend(["--mqtt-addr".into(), a.clone()]);
                mqtt = Some(a);
            }
            args.extend(BENCH_FLAGS.iter().map(|s| s.to_string()));
            args.extend(o.extra.iter().cloned());
            let log = dir.path().join(format!("node-{i}.log"));
            nodes.push(Node {
                id: i,
                grpc,
                client,
                tls,
                admin,
                mqtt,
                child: None,
                args,
                log,
            });
        }
        let mut c = LocalCluster {
            dir,
            nodes,
            admin_token,
            bin,
        };
        for i in 0..c.nodes.len() {
            c.spawn(i)?;
        }
        c.wait_leader(Duration::from_secs(60)).await?;
        Ok(c)
    }

    /// Starts (or restarts, on its data dir) node `idx`.
    pub fn spawn(&mut self, idx: usize) -> Result<()> {
        let node = &mut self.nodes[idx];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.bin)
            .args(&node.args)
            .env(
                "HERALD_LOG",
                std::env::var("HERALD_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.pid()).collect()
    }

    /// kill -9 node `idx`; returns when the process is gone.
    pub async fn kill9(&mut self, idx: usize) -> Result<()> {
        let n = &mut self.nodes[idx];
        if let Some(mut c) = n.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        Ok(())
    }

    /// Waits for a leader that is one of our running nodes; returns its index in `nodes`.
    pub async fn wait_leader(&self, limit: Duration) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            for n in self.nodes.iter().filter(|n| n.running()) {
                if let Ok(s) = self.status_of(n).await {
                    if s.has_leader {
                        if let Some(j) = self.nodes.iter().position(|m| m.id == s.leader_id) {
                            if self.nodes[j].running() {
                                return Ok(j);
                            }
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader within {limit:?}; logs in {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn status_of(&self, n: &Node) -> Result<pb::ClusterStatusReply> {
        let mut c = connect(&n.grpc).await?;
        let s = tokio::time::timeout(
            Duration::from_secs(2),
            c.cluster_status(pb::ClusterStatusRequest {}),
        )
        .await
        .context("cluster status timed out")??;
        Ok(s.into_inner())
    }

    /// Client connections node `idx` holds, as it reports them.
    pub async fn connections(&self, idx: usize) -> Result<u64> {
        let n = &self.nodes[idx];
        let s = self.status_of(n).await?;
        s.members
            .iter()
            .find(|m| m.node_id == n.id)
            .map(|m| m.connections)
            .context("node is not in its own status")
    }

    /// Waits until every running node applied at least what the leader has.
    pub async fn wait_caught_up(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let leader = self.wait_leader(limit).await?;
            let want = self.status_of(&self.nodes[leader]).await?.committed_index;
            let mut ok = true;
            for n in self.nodes.iter().filter(|n| n.running()) {
                match self.status_of(n).await {
                    Ok(s) if s.committed_index >= want => {}
                    _ => ok = false,
                }
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nodes did not catch up within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates an app; returns its id and signing secret, and the API key.
    pub async fn create_app(&self, id: &str) -> Result<(AppCred, String)> {
        let leader = self.wait_leader(Duration::from_secs(30)).await?;
        let mut c = connect(&self.nodes[leader].grpc).await?;
        let mut req = tonic::Request::new(pb::CreateAppRequest {
            id: id.into(),
            limits: Some(pb::AppLimits {
                mailbox_cap: 1_000_000,
                ..Default::default()
            }),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {}", self.admin_token).parse()?);
        let app = c.create_app(req).await?.into_inner().app.context("no app")?;
        let cred = AppCred {
            app: app.id.clone(),
            secret: app.secrets.first().context("app has no secret")?.clone(),
        };
        Ok((cred, app.api_keys.first().context("app has no api key")?.clone()))
    }

    /// SIGTERM to all, then wait.
    pub async fn stop(&mut self) {
        for n in &self.nodes {
            if let Some(pid) = n.pid() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                if tokio::time::timeout(Duration::from_secs(15), c.wait())
                    .await
                    .is_err()
                {
                    let _ = c.kill().await;
                }
            }
            n.child = None;
        }
        // HERALD_BENCH_KEEP=1 keeps the nodes' data dirs and logs (with HERALD_BENCH_NODE_LOG for
        // the log filter) for a look after the run.
        if std::env::var_os("HERALD_BENCH_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("node data and logs kept in {}", self.dir.path().display());
        }
    }
}

/// Bytes in a node's RocksDB memtables (state and log DBs), from its `/metrics`.
pub async fn memtable_bytes(admin: &str) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    let total: f64 = body
        .lines()
        .filter(|l| l.starts_with("herald_rocksdb_memtable_bytes{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    anyhow::ensure!(
        body.contains("herald_rocksdb_memtable_bytes{"),
        "{admin}/metrics has no herald_rocksdb_memtable_bytes"
    );
    Ok(total as u64)
}

pub async fn connect(addr: &str) -> Result<HeraldClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(HeraldClient::new(ch))
}

/// A development PKI (a CA and a certificate for 127.0.0.1 signed by it) in `dir`: (CA PEM, cert
/// path, key path).
pub fn make_pki(dir: &std::path::Path) -> Result<(String, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "herald-bench CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "herald-bench node");
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, leaf.pem())?;
    std::fs::write(&key, leaf_key.serialize_pem())?;
    Ok((ca.pem(), cert, key))
}

/// Adds the app's metadata to a request.
pub fn app_request<T>(msg: T, app: &str, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    md.insert("x-herald-app", app.parse().expect("ascii app id"));
    md.insert("x-herald-api-key", key.parse().expect("ascii api key"));
    req
}
