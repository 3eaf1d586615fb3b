//! A cluster of real `herald node` processes on loopback, for integration tests.
//!
//! Every node is a child process of the test: the `herald` binary cargo built for this test
//! (`CARGO_BIN_EXE_herald`), its own ports, its own data dir under one [`TempDir`], its stdout and
//! stderr appended to `<tmp>/node-<id>.log`. Nodes are named by their Raft id (`1..=n`), the same
//! id their `--id` flag and their log lines carry.
//!
//! ```ignore
//! let mut c = Cluster::start(3).await;          // three nodes, a leader elected
//! let app = c.create_app("demo").await;         // secret and API key
//! let mut grpc = c.client(1).await;             // herald.v1.Herald on node 1
//! let reply = grpc.push(app.push_request("alice", "hi", "key-1")).await?;
//! c.kill9(2);                                   // SIGKILL, reaped
//! c.restart(2);                                 // same ports, same data dir
//! c.wait_caught_up(2).await;
//! ```
//!
//! What it promises, so tests built on it are not flaky:
//! - **Ports** come from [`free_port`]: below the kernel's ephemeral range (an outgoing connection
//!   never takes one, so a node restarted on its old ports can bind them again), handed out once
//!   per test process and checked free by binding. Parallel tests never share a port.
//! - **Waits** poll with a deadline ([`eventually`]) and fail with what they were waiting for and
//!   the last thing they saw; there are no fixed sleeps. Deadlines are generous (debug builds on
//!   two cores, tests in parallel) but bounded.
//! - **Failures are debuggable**: when a test panics, dropping the [`Cluster`] prints the tail of
//!   every node's log (`HERALD_IT_LOG_LINES`, default 60). `HERALD_IT_KEEP=1` keeps the temp dir;
//!   `HERALD_IT_LOG=<filter>` sets the nodes' log filter (e.g. `debug`).
//! - **No leftovers**: dropping the cluster SIGKILLs and reaps every node. Nodes also run with
//!   `--exit-with-stdin` and the test holds their stdin, so they exit even if the test process is
//!   killed before it can drop anything (a CI timeout).
//! - **Clean environment**: `HERALD_*` and `RUST_LOG` variables of the test's environment are not
//!   passed on (a developer's `HERALD_ADMIN_TOKEN` must not change a test); logs are plain text.

#![allow(dead_code)] // The harness is shared by test modules; not every helper is used by each.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use herald_proto::v1 as pb;
use herald_proto::v1::herald_client::HeraldClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The admin token every harness node is started with.
pub const ADMIN_TOKEN: &str = "it-admin-token-0123456789abcdef";

/// How long to wait for a leader (elections, process start-up of a debug build).
pub const LEADER_WAIT: Duration = Duration::from_secs(45);
/// How long to wait for a node to answer, catch up or apply an index.
pub const NODE_WAIT: Duration = Duration::from_secs(45);
/// How long a node may take to exit after SIGTERM (its own grace period is 10 s).
pub const EXIT_WAIT: Duration = Duration::from_secs(20);
/// Longest a `herald` command run by [`herald`] may take.
pub const CLI_WAIT: Duration = Duration::from_secs(90);

/// The `herald` binary under test.
pub fn herald_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_herald"))
}

// ---------------------------------------------------------------------------------------------
// Ports

/// First port and end (exclusive) of the range ports are taken from.
fn port_range() -> (u32, u32) {
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    *RANGE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let mut it = text.split_whitespace().filter_map(|s| s.parse::<u32>().ok());
        let (lo, hi) = (it.next().unwrap_or(32768), it.next().unwrap_or(60999));
        if lo >= 12_000 {
            (10_000, lo) // below the ephemeral range (the usual case: 32768-60999)
        } else if hi <= 55_000 {
            (hi + 1, 65_536) // above it
        } else {
            (20_000, 30_000) // no gap: rely on the bind check alone
        }
    })
}

/// Ports handed out so far by this process.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A block of `len` consecutive loopback ports, all free right now and never handed out before by
/// this test process. Returns the first.
///
/// The block starts at an offset derived from the process id, so two test processes running at
/// once (two `cargo test`s, another crate's tests) rarely even try the same ports.
pub fn free_port_block(len: u32) -> u16 {
    let (lo, hi) = port_range();
    let span = hi - lo - len;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..2_000 {
        let offset = HANDED_OUT.fetch_add(len, Ordering::Relaxed);
        let base = lo + (start + offset) % span;
        let free = (base..base + len).all(|p| std::net::TcpListener::bind(("127.0.0.1", p as u16)).is_ok());
        if free {
            return base as u16;
        }
    }
    panic!("no block of {len} free ports in {lo}..{hi}");
}

/// One free loopback port (see [`free_port_block`]).
pub fn free_port() -> u16 {
    free_port_block(1)
}

// ---------------------------------------------------------------------------------------------
// Polling

/// Calls `f` until it returns `Ok`, backing off from 20 ms to 250 ms between tries. Panics after
/// `limit` with `what` and the last error. A try still running at the deadline is abandoned (given
/// at least 1 s), so this returns or panics within about `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(20);
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let attempt = match tokio::time::timeout(left, f()).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("the last try did not finish within {left:?}")),
        };
        match attempt {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {limit:?} waiting for {what}; last: {e:#}")
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC

/// A client for `herald.v1.Herald` at `addr` (host:port): 2 s to connect, 15 s per call.
pub async fn connect(addr: &str) -> anyhow::Result<HeraldClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(HeraldClient::new(channel))
}

/// `msg` with the harness admin token.
pub fn admin_request<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().expect("ascii token"),
    );
    r
}

/// True for errors after which a write is worth retrying with the same idempotency key: no
/// leader right now, outcome unknown, or the node could not be reached.
pub fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// An app (tenant) created by [`Cluster::create_app`].
#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    /// Signs client tokens.
    pub secret: String,
    /// Authenticates the app's server-to-server calls (`x-herald-api-key`).
    pub api_key: String,
}

impl App {
    /// `msg` with this app's `x-herald-app` / `x-herald-api-key` metadata.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert("x-herald-app", self.id.parse().expect("ascii app id"));
        md.insert("x-herald-api-key", self.api_key.parse().expect("ascii api key"));
        r
    }

    /// A client token (HS256 JWT) for `user`, for every device or only `device`, valid 1 h.
    pub fn token(&self, user: &str, device: Option<&str>) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let claims = herald_node::token::Claims {
            app: self.id.clone(),
            sub: user.into(),
            dev: device.map(str::to_string),
            iat: now,
            exp: now + 3600,
        };
        herald_node::token::mint(&claims, &self.secret)
    }

    /// A QoS-1 push of `payload` to every device of `user`, with an idempotency key (empty: none).
    pub fn push_request(&self, user: &str, payload: &str, idempotency_key: &str) -> Request<pb::PushRequest> {
        self.request(pb::PushRequest {
            app: self.id.clone(),
            targets: vec![pb::Target {
                user: user.into(),
                devices: vec![],
            }],
            payload: payload.as_bytes().to_vec().into(),
            qos: pb::Qos::AtLeastOnce as i32,
            ttl_ms: 0,
            idempotency_key: idempotency_key.into(),
            msg_id: String::new(),
        })
    }

    /// Pushes through the node at `addr` until the push is acknowledged, retrying transient
    /// errors (see [`is_transient`]) with the same idempotency key so that the message is stored
    /// exactly once. Panics on any other error or after [`NODE_WAIT`].
    pub async fn push_acked(
        &self,
        addr: &str,
        user: &str,
        payload: &str,
        idempotency_key: &str,
    ) -> pb::PushReply {
        assert!(
            !idempotency_key.is_empty(),
            "push_acked retries, so it needs an idempotency key"
        );
        eventually(
            &format!("push {idempotency_key:?} through {addr} to be acknowledged"),
            NODE_WAIT,
            || async {
                let mut c = connect(addr).await?;
                match c.push(self.push_request(user, payload, idempotency_key)).await {
                    Ok(r) => Ok(r.into_inner()),
                    Err(s) if is_transient(&s) => Err(anyhow!("{:?}: {}", s.code(), s.message())),
                    Err(s) => panic!("push {idempotency_key:?} through {addr} refused: {s:?}"),
                }
            },
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The `herald` command

/// What a finished `herald` command left.
#[derive(Debug)]
pub struct Output {
    /// The exit code; None when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }

    /// Panics unless the command exited with `code`.
    #[track_caller]
    pub fn code(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "expected exit code {code}: {self:#?}");
        self
    }

    /// stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// stdout as JSON lines.
    #[track_caller]
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line is not JSON ({e}): {l:?}")))
            .collect()
    }
}

/// Removes the test's `HERALD_*` and `RUST_LOG` variables, asks for plain-text logs and passes
/// `HERALD_IT_LOG` on as the log filter.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HERALD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1");
    if let Ok(filter) = std::env::var("HERALD_IT_LOG") {
        cmd.env("HERALD_LOG", filter);
    }
}

/// Runs `herald <args>` to completion (at most [`CLI_WAIT`]) in a clean environment.
pub async fn herald(args: &[&str]) -> Output {
    herald_with(args, &[], CLI_WAIT).await
}

/// Runs `herald <args> --server <addr> --admin-token <harness token>` (client commands take
/// these options after the subcommand).
pub async fn herald_admin(addr: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--server", addr, "--admin-token", ADMIN_TOKEN]);
    herald(&all).await
}

/// Starts `herald <args>` in a clean environment with stdout and stderr piped, for commands that
/// run until they are stopped (`herald listen`). The process is killed when the handle drops.
pub fn herald_spawn(args: &[&str]) -> tokio::process::Child {
    let mut cmd = Command::new(herald_bin());
    clean_env(&mut cmd);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn().expect("cannot run the herald binary")
}

/// Runs `herald <args>` with extra environment variables; killed and a panic after `limit`.
pub async fn herald_with(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(herald_bin());
    clean_env(&mut cmd);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().expect("cannot run the herald binary");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("herald {args:?}: {e}"),
        Err(_) => panic!("herald {args:?} did not finish within {limit:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// How one node is started. Change it (through [`Cluster::spec_mut`]) before the node starts.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    /// The public gRPC API (host:port).
    pub grpc_addr: String,
    /// The cluster plane: Raft, forwarding, peer delivery (host:port); what `--peers` names.
    pub cluster_addr: String,
    /// How the cluster plane is secured.
    pub cluster_tls: ClusterTlsSpec,
    /// Plain-TCP client listener (host:port).
    pub client_addr: String,
    pub data_dir: PathBuf,
    /// The `--peers` value.
    pub peers: String,
    /// More `herald node` flags.
    pub extra_args: Vec<String>,
    /// Environment variables of the node process, set after the clean-up of `HERALD_*` (e.g.
    /// `HERALD_CLOCK_OFFSET_MS` for one skewed node).
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    /// The `herald node` command line (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            self.id.to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--grpc-addr".into(),
            self.grpc_addr.clone(),
            "--cluster-addr".into(),
            self.cluster_addr.clone(),
            "--client-addr".into(),
            self.client_addr.clone(),
            "--peers".into(),
            self.peers.clone(),
            "--admin-token".into(),
            ADMIN_TOKEN.into(),
        ];
        let files = match &self.cluster_tls {
            ClusterTlsSpec::Dir(dir) => {
                let (cert, key) = herald_node::certs::node_paths(dir, self.id);
                Some((herald_node::certs::ca_paths(dir).0, cert, key))
            }
            ClusterTlsSpec::Files { ca, cert, key } => Some((ca.clone(), cert.clone(), key.clone())),
            ClusterTlsSpec::Insecure => None,
        };
        match files {
            Some((ca, cert, key)) => a.extend([
                "--cluster-ca".into(),
                ca.display().to_string(),
                "--cluster-cert".into(),
                cert.display().to_string(),
                "--cluster-key".into(),
                key.display().to_string(),
            ]),
            None => a.push("--insecure-cluster".into()),
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// How a node's cluster plane is secured.
#[derive(Debug, Clone)]
pub enum ClusterTlsSpec {
    /// The CA and the node's certificate from a `herald certs` directory.
    Dir(PathBuf),
    /// Explicit files (e.g. a CA bundle during a rotation).
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// `--insecure-cluster`.
    Insecure,
}

/// An endpoint for node `id`'s cluster plane at `addr` over TLS: trusting `ca`, presenting node
/// `id`'s own certificate from the `herald certs` directory `dir` (a node always accepts itself,
/// whoever else the membership names).
fn tls_endpoint(addr: &str, id: u64, ca: &Path, dir: &Path) -> anyhow::Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let (cert, key) = herald_node::certs::node_paths(dir, id);
    let cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?))
        .domain_name(herald_node::certs::node_name(id));
    Ok(Channel::from_shared(format!("https://{addr}"))?.tls_config(cfg)?)
}

/// A running node process.
struct Running {
    child: Child,
    /// The write end of the node's stdin: with `--exit-with-stdin` the node stops when it closes,
    /// which happens at the latest when this test process dies.
    _lifeline: Option<ChildStdin>,
    paused: bool,
}

struct Slot {
    spec: NodeSpec,
    log: PathBuf,
    running: Option<Running>,
    /// How the last run ended, once reaped.
    last_exit: Option<ExitStatus>,
    starts: u32,
}

/// Real `herald node` processes; see the module docs.
pub struct Cluster {
    /// None once kept (`HERALD_IT_KEEP`).
    dir: Option<TempDir>,
    nodes: BTreeMap<u64, Slot>,
    /// Start nodes with `--exit-with-stdin` (see [`Cluster::without_lifeline`]).
    lifeline: bool,
}

impl Cluster {
    /// Starts `n` nodes (ids `1..=n`, each naming all of them in `--peers`) and waits for a leader.
    pub async fn start(n: u64) -> Cluster {
        let mut c = Cluster::new(n);
        c.start_all();
        c.wait_leader().await;
        c
    }

    /// Prepares `n` nodes without starting any: ports chosen, data dirs named. Adjust them with
    /// [`Cluster::spec_mut`], then [`Cluster::start_all`] or [`Cluster::start_node`].
    pub fn new(n: u64) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("herald-it-")
            .tempdir()
            .expect("cannot create a temp dir");
        let mut c = Cluster {
            dir: Some(dir),
            nodes: BTreeMap::new(),
            lifeline: true,
        };
        for id in 1..=n {
            c.prepare(id);
        }
        let peers = c.peers();
        for slot in c.nodes.values_mut() {
            slot.spec.peers = peers.clone();
        }
        c
    }

    /// Nodes started from now on run without `--exit-with-stdin`, exactly as an operator would
    /// start them. They exit 1 s sooner on SIGTERM (no blocked stdin reader to wait for) but could
    /// outlive a test process that is killed before it drops the cluster.
    pub fn without_lifeline(mut self) -> Cluster {
        self.lifeline = false;
        self
    }

    /// Adds `args` to the command line of every node prepared so far (before they start), e.g.
    /// `Cluster::new(3).node_args(&["--snapshot-every", "100"])`.
    pub fn node_args(mut self, args: &[&str]) -> Cluster {
        for slot in self.nodes.values_mut() {
            slot.spec.extra_args.extend(args.iter().map(|a| a.to_string()));
        }
        self
    }

    fn prepare(&mut self, id: u64) {
        let dir = self.dir().to_path_buf();
        // Every harness cluster runs the cluster plane with mutual TLS, as production does.
        let certs = dir.join("certs");
        herald_node::certs::ensure_cluster(&certs, [id]).expect("cannot create cluster certificates");
        let spec = NodeSpec {
            id,
            grpc_addr: format!("127.0.0.1:{}", free_port()),
            cluster_addr: format!("127.0.0.1:{}", free_port()),
            cluster_tls: ClusterTlsSpec::Dir(certs),
            client_addr: format!("127.0.0.1:{}", free_port()),
            data_dir: dir.join(format!("node-{id}")),
            peers: String::new(),
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        self.nodes.insert(
            id,
            Slot {
                spec,
                log: dir.join(format!("node-{id}.log")),
                running: None,
                last_exit: None,
                starts: 0,
            },
        );
    }

    /// Prepares and starts one more node, id = highest + 1, with `--peers` naming every node of
    /// the harness and itself (how a node that is about to be added is started). It does not join
    /// by itself: add it with `herald cluster add` or `AddNode`. Returns its id.
    pub fn start_extra_node(&mut self) -> u64 {
        self.start_extra_node_with(&[])
    }

    /// [`Cluster::start_extra_node`] with more `herald node` flags.
    pub fn start_extra_node_with(&mut self, args: &[&str]) -> u64 {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        self.prepare(id);
        let peers = self.peers();
        self.spec_mut(id).peers = peers;
        self.spec_mut(id)
            .extra_args
            .extend(args.iter().map(|a| a.to_string()));
        self.start_node(id);
        id
    }

    /// The temp dir holding every node's data dir and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// Every node's id, running or not.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Ids of the nodes running and not paused.
    pub fn live_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, s)| s.running.as_ref().is_some_and(|r| !r.paused))
            .map(|(id, _)| *id)
            .collect()
    }

    fn slot(&self, id: u64) -> &Slot {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("the harness has no node {id}"))
    }

    fn slot_mut(&mut self, id: u64) -> &mut Slot {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("the harness has no node {id}"))
    }

    /// How node `id` is (or will be) started.
    pub fn spec(&self, id: u64) -> &NodeSpec {
        &self.slot(id).spec
    }

    /// Changes how node `id` starts next time.
    pub fn spec_mut(&mut self, id: u64) -> &mut NodeSpec {
        &mut self.slot_mut(id).spec
    }

    /// `1=host:port,2=host:port,...` for every node of the harness.
    pub fn peers(&self) -> String {
        self.nodes
            .values()
            .map(|s| format!("{}={}", s.spec.id, s.spec.cluster_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id`'s cluster-plane address.
    pub fn cluster_addr(&self, id: u64) -> &str {
        &self.slot(id).spec.cluster_addr
    }

    /// The cluster CA and node certificates every node uses.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir().join("certs")
    }

    pub fn grpc_addr(&self, id: u64) -> &str {
        &self.slot(id).spec.grpc_addr
    }

    pub fn client_addr(&self, id: u64) -> &str {
        &self.slot(id).spec.client_addr
    }

    pub fn data_dir(&self, id: u64) -> &Path {
        &self.slot(id).spec.data_dir
    }

    pub fn log_path(&self, id: u64) -> &Path {
        &self.slot(id).log
    }

    pub fn admin_token(&self) -> &str {
        ADMIN_TOKEN
    }

    /// Process id of node `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.slot(id).running.as_ref().map(|r| r.child.id())
    }

    pub fn is_running(&mut self, id: u64) -> bool {
        self.exited(id).is_none() && self.slot(id).running.is_some()
    }

    // -- processes ------------------------------------------------------------------------------

    /// Starts every node that is not running.
    pub fn start_all(&mut self) {
        for id in self.ids() {
            if self.slot(id).running.is_none() {
                self.start_node(id);
            }
        }
    }

    /// Starts node `id` from its spec; panics if it runs.
    pub fn start_node(&mut self, id: u64) {
        let lifeline = self.lifeline;
        let slot = self.slot_mut(id);
        assert!(slot.running.is_none(), "node {id} is already running");
        slot.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.log)
            .expect("cannot open the node log");
        let _ = writeln!(log, "==== harness: start #{} of node {id} ====", slot.starts);
        let mut cmd = Command::new(herald_bin());
        clean_env(&mut cmd);
        cmd.args(slot.spec.args())
            .envs(slot.spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if lifeline {
            cmd.arg("--exit-with-stdin").stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd.spawn().expect("cannot start the herald binary");
        let lifeline = child.stdin.take();
        slot.running = Some(Running {
            child,
            _lifeline: lifeline,
            paused: false,
        });
        slot.last_exit = None;
    }

    /// Starts node `id` again on the same ports and data dir. It must have been stopped
    /// ([`Cluster::kill9`], [`Cluster::stop`], or [`Cluster::sigterm`] + [`Cluster::wait_exit`]).
    pub fn restart(&mut self, id: u64) {
        assert!(
            !self.is_running(id),
            "restart({id}): node {id} still runs; stop it first"
        );
        self.slot_mut(id).running = None;
        self.start_node(id);
    }

    /// SIGKILL node `id` and reap it.
    pub fn kill9(&mut self, id: u64) {
        let slot = self.slot_mut(id);
        let mut r = slot
            .running
            .take()
            .unwrap_or_else(|| panic!("kill9({id}): node {id} is not running"));
        let _ = r.child.kill(); // SIGKILL; works on a stopped process too
        slot.last_exit = r.child.wait().ok();
    }

    /// SIGKILL every running node at once (power loss), then reap them.
    pub fn kill9_all(&mut self) {
        for slot in self.nodes.values_mut() {
            if let Some(r) = slot.running.as_mut() {
                let _ = r.child.kill();
            }
        }
        for slot in self.nodes.values_mut() {
            if let Some(mut r) = slot.running.take() {
                slot.last_exit = r.child.wait().ok();
            }
        }
    }

    fn signal(&self, id: u64, sig: Signal) {
        let pid = self
            .pid(id)
            .unwrap_or_else(|| panic!("{sig:?} to node {id}: it is not running"));
        kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("{sig:?} to node {id}: {e}"));
    }

    /// Sends SIGTERM to node `id` (a clean stop); see [`Cluster::wait_exit`].
    pub fn sigterm(&mut self, id: u64) {
        self.signal(id, Signal::SIGTERM);
    }

    /// SIGSTOP: the node freezes (no heartbeats, no answers) but keeps its sockets open.
    pub fn pause(&mut self, id: u64) {
        self.signal(id, Signal::SIGSTOP);
        if let Some(r) = self.slot_mut(id).running.as_mut() {
            r.paused = true;
        }
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&mut self, id: u64) {
        self.signal(id, Signal::SIGCONT);
        if let Some(r) = self.slot_mut(id).running.as_mut() {
            r.paused = false;
        }
    }

    /// How node `id` ended, if it did (reaps it).
    pub fn exited(&mut self, id: u64) -> Option<ExitStatus> {
        let slot = self.slot_mut(id);
        if let Some(r) = slot.running.as_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                slot.running = None;
                slot.last_exit = Some(status);
            }
        }
        if slot.running.is_some() {
            None
        } else {
            slot.last_exit
        }
    }

    /// Waits until node `id` exits; panics after `limit`.
    pub async fn wait_exit(&mut self, id: u64, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited(id) {
                return status;
            }
            if self.slot(id).running.is_none() {
                panic!("node {id} was never started");
            }
            if Instant::now() >= deadline {
                panic!("node {id} did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait (at most [`EXIT_WAIT`]) for the exit. Returns the status and how long
    /// the node took.
    pub async fn stop(&mut self, id: u64) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.sigterm(id);
        let status = self.wait_exit(id, EXIT_WAIT).await;
        (status, t.elapsed())
    }

    // -- asking the nodes -----------------------------------------------------------------------

    /// A gRPC client for node `id`.
    pub async fn client(&self, id: u64) -> HeraldClient<Channel> {
        connect(self.grpc_addr(id))
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e:#}"))
    }

    /// A channel to node `id`'s cluster plane (its raft service), as an operator's tool would
    /// open it: with TLS, trusting the cluster CA and presenting node `id`'s own certificate (the
    /// harness holds the cluster's keys); plaintext for `--insecure-cluster`.
    pub async fn cluster_channel(&self, id: u64) -> anyhow::Result<Channel> {
        let addr = self.cluster_addr(id);
        let endpoint = match &self.spec(id).cluster_tls {
            ClusterTlsSpec::Insecure => Channel::from_shared(format!("http://{addr}"))?,
            ClusterTlsSpec::Dir(dir) => tls_endpoint(addr, id, &herald_node::certs::ca_paths(dir).0, dir)?,
            ClusterTlsSpec::Files { ca, .. } => tls_endpoint(addr, id, ca, &self.certs_dir())?,
        };
        Ok(endpoint
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?)
    }

    /// Node `id`'s `ClusterStatus`, answered within 3 s.
    pub async fn status(&self, id: u64) -> anyhow::Result<pb::ClusterStatusReply> {
        let call = async {
            let mut c = connect(self.grpc_addr(id)).await?;
            let r = c.cluster_status(pb::ClusterStatusRequest {}).await?;
            anyhow::Ok(r.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .map_err(|_| anyhow!("node {id} did not answer ClusterStatus within 3s"))?
    }

    /// The leader a majority of the voters agree on right now, if any (see [`Cluster::wait_leader`]).
    pub async fn leader(&self) -> Option<u64> {
        self.try_leader().await.ok()
    }

    /// Waits until a leader is established and returns its id: a live node that says it leads
    /// in term T, and a majority of the voters (counting it) report that leader in term T.
    /// Killed and paused nodes are not asked (so a stale leader that was paused is not taken).
    pub async fn wait_leader(&self) -> u64 {
        eventually("a leader a majority agrees on", LEADER_WAIT, || self.try_leader()).await
    }

    async fn try_leader(&self) -> anyhow::Result<u64> {
        let live = self.live_ids();
        let replies = futures::future::join_all(live.iter().map(|id| self.status(*id))).await;
        let seen: Vec<(u64, pb::ClusterStatusReply)> = live
            .iter()
            .zip(replies)
            .filter_map(|(id, r)| r.ok().map(|r| (*id, r)))
            .collect();
        for (id, r) in &seen {
            if !(r.has_leader && r.leader_id == *id) {
                continue;
            }
            let voters = r.members.iter().filter(|m| m.role == "voter").count();
            let agree = seen
                .iter()
                .filter(|(_, o)| o.has_leader && o.leader_id == *id && o.term == r.term)
                .count();
            if agree * 2 > voters {
                return Ok(*id);
            }
        }
        let views: Vec<String> = seen
            .iter()
            .map(|(id, r)| {
                format!(
                    "node {id}: leader {:?} term {}",
                    r.has_leader.then_some(r.leader_id),
                    r.term
                )
            })
            .collect();
        bail!("no established leader; live {live:?}; {}", views.join("; "))
    }

    /// Waits until node `id` answers and knows a leader.
    pub async fn wait_ready(&self, id: u64) -> pb::ClusterStatusReply {
        eventually(
            &format!("node {id} to answer and know a leader"),
            NODE_WAIT,
            || async {
                let s = self.status(id).await?;
                if s.has_leader {
                    Ok(s)
                } else {
                    bail!("node {id} knows no leader")
                }
            },
        )
        .await
    }

    /// Node `id`'s own applied index, as it reports it.
    pub async fn applied_index(&self, id: u64) -> anyhow::Result<u64> {
        let s = self.status(id).await?;
        s.members
            .iter()
            .find(|m| m.node_id == id)
            .map(|m| m.applied_index)
            .ok_or_else(|| anyhow!("node {id} does not list itself: {s:?}"))
    }

    /// Waits until node `id` itself reports an applied index of at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) -> u64 {
        eventually(
            &format!("node {id} to apply index {index}"),
            NODE_WAIT,
            || async {
                let applied = self.applied_index(id).await?;
                if applied >= index {
                    Ok(applied)
                } else {
                    bail!("node {id} applied {applied}")
                }
            },
        )
        .await
    }

    /// Waits until node `id` applied everything the leader had committed when this was called.
    pub async fn wait_caught_up(&self, id: u64) -> u64 {
        let leader = self.wait_leader().await;
        let committed = eventually("the leader's commit index", NODE_WAIT, || self.status(leader))
            .await
            .committed_index;
        self.wait_applied(id, committed).await
    }

    /// Creates an app with generated secret and API key, through the leader (retrying while
    /// leadership moves). Waits until every live node has applied it, so API-key checks pass
    /// on whichever node a test pushes through.
    pub async fn create_app(&self, app_id: &str) -> App {
        let app = eventually(&format!("app {app_id:?} to be created"), NODE_WAIT, || async {
            let leader = self.try_leader().await?;
            let mut c = connect(self.grpc_addr(leader)).await?;
            let req = pb::CreateAppRequest {
                id: app_id.into(),
                ..Default::default()
            };
            match c.create_app(admin_request(req)).await {
                Ok(r) => {
                    let a = r.into_inner().app.context("CreateApp returned no app")?;
                    Ok(App {
                        id: a.id,
                        secret: a.secrets.first().cloned().context("no secret")?,
                        api_key: a.api_keys.first().cloned().context("no api key")?,
                    })
                }
                Err(s) if is_transient(&s) => Err(anyhow!("{s:?}")),
                Err(s) => panic!("CreateApp {app_id:?} refused: {s:?}"),
            }
        })
        .await;
        for id in self.live_ids() {
            eventually(
                &format!("node {id} to know app {app_id:?}"),
                NODE_WAIT,
                || async {
                    let mut c = connect(self.grpc_addr(id)).await?;
                    c.get_app(admin_request(pb::GetAppRequest { id: app_id.into() }))
                        .await
                        .map_err(|s| anyhow!("{s:?}"))?;
                    Ok(())
                },
            )
            .await;
        }
        app
    }

    /// Changes app `id` with `change` (GetApp, then UpdateApp through node 1).
    pub async fn update_app(&self, id: &str, change: impl FnOnce(&mut pb::App)) {
        let mut admin = self.client(1).await;
        let mut cfg = admin
            .get_app(admin_request(pb::GetAppRequest { id: id.into() }))
            .await
            .expect("GetApp")
            .into_inner()
            .app
            .expect("an app");
        change(&mut cfg);
        admin
            .update_app(admin_request(pb::UpdateAppRequest { app: Some(cfg) }))
            .await
            .expect("UpdateApp");
    }

    // -- logs -----------------------------------------------------------------------------------

    /// Node `id`'s whole log so far (every run of it).
    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// How many lines of node `id`'s log contain `needle`.
    pub fn log_count(&self, id: u64, needle: &str) -> usize {
        self.log_text(id).lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until node `id`'s log has at least `count` lines containing `needle`; returns the
    /// last of them.
    pub async fn wait_log(&self, id: u64, needle: &str, count: usize) -> String {
        eventually(
            &format!("{count} line(s) with {needle:?} in node {id}'s log"),
            NODE_WAIT,
            || async {
                let text = self.log_text(id);
                let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
                if lines.len() >= count {
                    Ok(lines[lines.len() - 1].to_string())
                } else {
                    bail!("{} so far", lines.len())
                }
            },
        )
        .await
    }

    /// Panics if any node's log shows a panic.
    #[track_caller]
    pub fn assert_no_panics(&self) {
        for id in self.ids() {
            let text = self.log_text(id);
            if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
                panic!("node {id} panicked: {line}");
            }
        }
    }

    /// Prints the last `lines` lines of every node's log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        for id in self.ids() {
            print_log_tail(&format!("node {id}"), self.log_path(id), lines);
        }
    }
}

/// Prints the last `lines` lines of the file at `path`, under a header naming `what`.
pub fn print_log_tail(what: &str, path: &Path, lines: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read: {e})\n"));
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    eprintln!(
        "----- {what}: last {} of {} lines of {} -----",
        tail.len(),
        all.len(),
        path.display()
    );
    for l in tail {
        eprintln!("{l}");
    }
}

/// Lines of log printed per node when a test fails (`HERALD_IT_LOG_LINES`).
pub fn failure_log_lines() -> usize {
    std::env::var("HERALD_IT_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
}

/// True when the test's temp dirs should be kept (`HERALD_IT_KEEP=1`).
pub fn keep_dirs() -> bool {
    std::env::var_os("HERALD_IT_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(failure_log_lines());
        }
        for slot in self.nodes.values_mut() {
            if let Some(mut r) = slot.running.take() {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
        if keep_dirs() {
            if let Some(dir) = self.dir.take() {
                eprintln!("harness: kept {}", dir.keep().display());
            }
        }
    }
}
