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

pub struct Node {
    pub id: u64,
    pub grpc: String,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub admin_token: String,
    bin: PathBuf,
}

impl LocalCluster {
    /// Starts `n` nodes with ports from `base` (gRPC base+i, clients base+100+i).
    pub async fn start(n: u64, base: u16, extra: &[&str]) -> Result<LocalCluster> {
        let dir = tempfile::Builder::new().prefix("herald-bench-").tempdir()?;
        let bin = herald_bin()?;
        let admin_token = "bench-admin-token-0123456789".to_string();
        let peers: Vec<String> = (1..=n)
            .map(|i| format!("{i}=127.0.0.1:{}", base as u64 + i))
            .collect();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let grpc = format!("127.0.0.1:{}", base as u64 + i);
            let client = format!("127.0.0.1:{}", base as u64 + 100 + i);
            let mut args = vec![
                "node".to_string(),
                "--id".into(),
                i.to_string(),
                "--data-dir".into(),
                dir.path().join(format!("node-{i}")).display().to_string(),
                "--grpc-addr".into(),
                grpc.clone(),
                "--client-addr".into(),
                client,
                "--peers".into(),
                peers.join(","),
                "--admin-token".into(),
                admin_token.clone(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let log = dir.path().join(format!("node-{i}.log"));
            nodes.push(Node {
                id: i,
                grpc,
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
        Ok(c)
    }

    fn spawn(&mut self, idx: usize) -> Result<()> {
        let node = &mut self.nodes[idx];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.bin)
            .args(&node.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits for a leader; returns its index in `nodes`.
    pub async fn wait_leader(&self, limit: Duration) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            for (i, n) in self.nodes.iter().enumerate() {
                if n.child.is_none() {
                    continue;
                }
                if let Ok(mut c) = connect(&n.grpc).await {
                    if let Ok(s) = c.cluster_status(pb::ClusterStatusRequest {}).await {
                        let s = s.into_inner();
                        if s.has_leader {
                            if let Some(j) = self.nodes.iter().position(|m| m.id == s.leader_id) {
                                if self.nodes[j].child.is_some() {
                                    let _ = i;
                                    return Ok(j);
                                }
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
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates an app; returns its API key.
    pub async fn create_app(&self, id: &str) -> Result<pb::App> {
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
        c.create_app(req).await?.into_inner().app.context("no app")
    }

    /// SIGTERM to all, then wait.
    pub async fn stop(&mut self) {
        for n in &self.nodes {
            if let Some(pid) = n.child.as_ref().and_then(|c| c.id()) {
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
    }
}

pub async fn connect(addr: &str) -> Result<HeraldClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(HeraldClient::new(ch))
}
