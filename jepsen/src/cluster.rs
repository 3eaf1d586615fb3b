//! Real `herald node` processes, one per network namespace, and the gRPC calls the harness makes
//! to them.
//!
//! Node `id` serves its public gRPC API on `ip:7401` (fronted by a proxy on `ip:7402`, see
//! `proxy.rs`), its cluster plane (Raft, forwarding, peer delivery; mutual TLS) on `ip:7501`
//! advertised as `ip:7502` (its proxy), and clients on `ip:7411`. The cluster CA and node
//! certificates are made with `herald certs` under the run's dir (`nodes/certs/`). Its data dir
//! and log live under the run's output dir (`nodes/node-<id>/`, or `nodes/disk-<id>/node-<id>/`
//! on a powerfs disk, and `nodes/node-<id>.log`). Nodes run with `--exit-with-stdin`
//! and the harness holds their stdin, so they exit when the harness dies, however it dies.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::{ProbeReply, ProbeRequest};
use herald_proto::v1 as pb;
use herald_proto::v1::herald_client::HeraldClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tonic::transport::Channel;
use tonic::Request;

use crate::disk::Disks;
use crate::net::Net;
use crate::proxy::{Faults, Proxy};

pub const GRPC_PORT: u16 = 7401;
pub const PROXY_PORT: u16 = 7402;
pub const CLUSTER_PORT: u16 = 7501;
pub const CLUSTER_PROXY_PORT: u16 = 7502;
pub const CLIENT_PORT: u16 = 7411;
/// Every node's MQTT listener (the `mqtt` workload).
pub const MQTT_PORT: u16 = 7461;
/// The admin token every node is started with.
pub const ADMIN_TOKEN: &str = "herald-jepsen-admin-token-0123456789";

/// Timing and extra flags for the nodes.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub node_down_timeout_ms: u64,
    pub election_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub snapshot_every: u64,
    pub client_heartbeat_ms: u64,
    /// `HERALD_LOG` for the nodes.
    pub log_filter: String,
    /// Data dirs on `powerfs` disks (see `disk.rs`), so that the power nemesis loses what was
    /// not fsynced.
    pub powerfs: bool,
    /// `--shards` of every node (0: one Raft group).
    pub shards: u32,
}

impl Default for NodeOpts {
    fn default() -> Self {
        NodeOpts {
            node_down_timeout_ms: 4000,
            election_timeout_ms: 400,
            heartbeat_ms: 100,
            snapshot_every: 2000,
            client_heartbeat_ms: 2000,
            log_filter: "info".into(),
            powerfs: false,
            shards: 0,
        }
    }
}

struct Running {
    child: Child,
    /// With `--exit-with-stdin` the node exits when this closes.
    _lifeline: Option<ChildStdin>,
    paused: bool,
}

#[derive(Default)]
struct Slot {
    running: Option<Running>,
    clock_offset_ms: i64,
    /// Bumped when the data dir is wiped (or the node's raft state, by `--rejoin`).
    generation: u64,
    starts: u32,
    /// The next start passes `--rejoin` (the damage nemesis, after a refused start).
    rejoin_next: bool,
    /// The harness waits for this node's exit itself: `crashes` leaves it alone.
    watched: bool,
}

/// A node process that exited without the harness asking.
#[derive(Debug, Clone)]
pub struct Crash {
    pub id: u64,
    pub status: String,
    pub log_tail: String,
}

/// The nodes of a run.
pub struct Cluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
    /// The initial members (ids 1..=n).
    pub ids: Vec<u64>,
    pub net: Mutex<Net>,
    pub opts: NodeOpts,
    /// The nodes' powerfs disks (`opts.powerfs`).
    pub disks: Option<Disks>,
    slots: Mutex<BTreeMap<u64, Slot>>,
    /// Per node: the proxy in front of its gRPC API and the one in front of its cluster plane.
    proxies: Mutex<BTreeMap<u64, Vec<Proxy>>>,
    /// The certificates directory the harness's probes take their identity from: a probe of
    /// node N presents node N's own certificate (the harness acts as an operator who holds the
    /// cluster's keys), which N accepts whatever the membership says of other nodes.
    probe_tls: PathBuf,
    channels: Mutex<BTreeMap<(u64, bool), Channel>>,
    /// Channels to the nodes' cluster planes (probes), by node id.
    cluster_channels: Mutex<BTreeMap<u64, Channel>>,
}

impl Cluster {
    /// Creates the network and the proxies; starts no node.
    pub fn new(bin: PathBuf, exe: &Path, dir: PathBuf, n: u64, opts: NodeOpts) -> anyhow::Result<Cluster> {
        let ids: Vec<u64> = (1..=n).collect();
        std::fs::create_dir_all(&dir)?;
        let certs = dir.join("certs");
        make_certs(&bin, &certs, &ids)?;
        let probe_tls = certs.clone();
        let net = Net::create(&ids)?;
        let mut proxies = BTreeMap::new();
        for n in net.nodes.values() {
            let mut both = Vec::new();
            for (listen, to, name) in [
                (PROXY_PORT, GRPC_PORT, "proxy"),
                (CLUSTER_PROXY_PORT, CLUSTER_PORT, "cluster-proxy"),
            ] {
                let listen = SocketAddr::new(n.ip.into(), listen);
                let to = SocketAddr::new(n.ip.into(), to);
                let log = dir.join(format!("{name}-{}.log", n.id));
                both.push(Proxy::start(exe, &n.ns, listen, to, &log)?);
            }
            proxies.insert(n.id, both);
        }
        // After the proxies: their namespaces then hold no copy of the mounts.
        let disks = if opts.powerfs {
            Some(Disks::start(exe, &dir, &ids)?)
        } else {
            None
        };
        let slots = ids.iter().map(|id| (*id, Slot::default())).collect();
        Ok(Cluster {
            bin,
            dir,
            ids,
            net: Mutex::new(net),
            opts,
            disks,
            slots: Mutex::new(slots),
            proxies: Mutex::new(proxies),
            probe_tls,
            channels: Mutex::new(BTreeMap::new()),
            cluster_channels: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn ip(&self, id: u64) -> String {
        self.net.lock().node(id).ip.to_string()
    }

    /// The address peers and clients use for gRPC (through the node's proxy).
    pub fn grpc_public(&self, id: u64) -> String {
        format!("{}:{PROXY_PORT}", self.ip(id))
    }

    /// The node's own gRPC listener (no proxy): for the harness's monitoring and admin calls.
    pub fn grpc_direct(&self, id: u64) -> String {
        format!("{}:{GRPC_PORT}", self.ip(id))
    }

    pub fn client_addr(&self, id: u64) -> String {
        format!("{}:{CLIENT_PORT}", self.ip(id))
    }

    pub fn mqtt_addr(&self, id: u64) -> String {
        format!("{}:{MQTT_PORT}", self.ip(id))
    }

    pub fn client_addrs(&self) -> Vec<String> {
        self.ids.iter().map(|id| self.client_addr(*id)).collect()
    }

    /// The address peers use for the cluster plane (through the node's proxy).
    pub fn cluster_public(&self, id: u64) -> String {
        format!("{}:{CLUSTER_PROXY_PORT}", self.ip(id))
    }

    /// The node's own cluster listener (no proxy): for the harness's probes.
    pub fn cluster_direct(&self, id: u64) -> String {
        format!("{}:{CLUSTER_PORT}", self.ip(id))
    }

    /// The cluster CA and node certificates.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `--peers` for the nodes.
    pub fn peers(&self) -> String {
        self.ids
            .iter()
            .map(|id| format!("{id}={}", self.cluster_public(*id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        match &self.disks {
            Some(d) => d.data_dir(id),
            None => self.dir.join(format!("node-{id}")),
        }
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    /// Starts node `id` (no-op if it runs).
    pub fn start(&self, id: u64) -> anyhow::Result<()> {
        let mut slots = self.slots.lock();
        let slot = slots.entry(id).or_default();
        if slot.running.is_some() {
            return Ok(());
        }
        slot.starts += 1;
        let ns = self.net.lock().node(id).ns.clone();
        let ip = self.ip(id);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        let _ = writeln!(
            log,
            "==== herald-jepsen: start #{} of node {id} (clock offset {} ms, generation {}) ====",
            slot.starts, slot.clock_offset_ms, slot.generation
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).arg(&self.bin).args([
            "node",
            "--id",
            &id.to_string(),
            "--data-dir",
            &self.data_dir(id).display().to_string(),
            "--grpc-addr",
            &format!("{ip}:{GRPC_PORT}"),
            "--advertise-grpc-addr",
            &format!("{ip}:{PROXY_PORT}"),
            "--cluster-addr",
            &format!("{ip}:{CLUSTER_PORT}"),
            "--advertise-cluster-addr",
            &format!("{ip}:{CLUSTER_PROXY_PORT}"),
            "--cluster-ca",
            &self.certs_dir().join("ca.pem").display().to_string(),
            "--cluster-cert",
            &self
                .certs_dir()
                .join(format!("node-{id}.pem"))
                .display()
                .to_string(),
            "--cluster-key",
            &self
                .certs_dir()
                .join(format!("node-{id}.key"))
                .display()
                .to_string(),
            "--client-addr",
            &format!("{ip}:{CLIENT_PORT}"),
            "--mqtt-addr",
            &format!("{ip}:{MQTT_PORT}"),
            "--peers",
            &self.peers(),
            "--admin-token",
            ADMIN_TOKEN,
            "--node-down-timeout-ms",
            &self.opts.node_down_timeout_ms.to_string(),
            "--election-timeout-ms",
            &self.opts.election_timeout_ms.to_string(),
            "--raft-heartbeat-ms",
            &self.opts.heartbeat_ms.to_string(),
            "--snapshot-every",
            &self.opts.snapshot_every.to_string(),
            "--client-heartbeat-ms",
            &self.opts.client_heartbeat_ms.to_string(),
            "--client-heartbeat-min-ms",
            &self.opts.client_heartbeat_ms.min(1000).to_string(),
            "--shards",
            &self.opts.shards.to_string(),
            "--exit-with-stdin",
        ]);
        if std::mem::take(&mut slot.rejoin_next) {
            cmd.arg("--rejoin");
        }
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HERALD_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .env("HERALD_LOG", &self.opts.log_filter);
        if slot.clock_offset_ms != 0 {
            // Test-only hook in herald_raft::raft_node::now_ms (clock-skew nemesis).
            cmd.env("HERALD_CLOCK_OFFSET_MS", slot.clock_offset_ms.to_string());
        }
        cmd.stdin(Stdio::piped()).stdout(log.try_clone()?).stderr(log);
        let mut child = cmd.spawn().context("cannot start a node")?;
        let lifeline = child.stdin.take();
        slot.running = Some(Running {
            child,
            _lifeline: lifeline,
            paused: false,
        });
        Ok(())
    }

    /// SIGKILL and reap (no-op if not running).
    pub fn kill9(&self, id: u64) {
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(&id) {
            if let Some(mut r) = slot.running.take() {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
    }

    /// SIGKILL every running node at once, then reap them (power loss).
    pub fn kill9_all(&self) {
        let mut slots = self.slots.lock();
        for slot in slots.values_mut() {
            if let Some(r) = slot.running.as_mut() {
                let _ = r.child.kill();
            }
        }
        for slot in slots.values_mut() {
            if let Some(mut r) = slot.running.take() {
                let _ = r.child.wait();
            }
        }
    }

    fn signal(&self, id: u64, sig: Signal, paused: bool) -> anyhow::Result<()> {
        let mut slots = self.slots.lock();
        let r = slots
            .get_mut(&id)
            .and_then(|s| s.running.as_mut())
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        kill(Pid::from_raw(r.child.id() as i32), sig)?;
        r.paused = paused;
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, Signal::SIGSTOP, true)
    }

    /// SIGCONT.
    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, Signal::SIGCONT, false)
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.slots.lock().get(&id).is_some_and(|s| s.running.is_some())
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.slots
            .lock()
            .get(&id)
            .and_then(|s| s.running.as_ref())
            .is_some_and(|r| r.paused)
    }

    /// Ids of nodes running and not paused.
    pub fn live(&self) -> Vec<u64> {
        self.slots
            .lock()
            .iter()
            .filter(|(_, s)| s.running.as_ref().is_some_and(|r| !r.paused))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Node `id` starts with this wall-clock offset from its next start on.
    pub fn set_clock_offset(&self, id: u64, ms: i64) {
        self.slots.lock().entry(id).or_default().clock_offset_ms = ms;
    }

    pub fn clock_offset(&self, id: u64) -> i64 {
        self.slots.lock().get(&id).map(|s| s.clock_offset_ms).unwrap_or(0)
    }

    /// Deletes node `id`'s data dir (it must be stopped); it comes back as a new member.
    pub fn wipe(&self, id: u64) -> anyhow::Result<()> {
        if self.is_running(id) {
            bail!("wipe({id}): the node runs");
        }
        let d = self.data_dir(id);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        self.slots.lock().entry(id).or_default().generation += 1;
        Ok(())
    }

    /// While set, an exit of node `id` is for the caller to see ([`Cluster::try_exit`]), not a
    /// crash.
    pub fn set_watched(&self, id: u64, on: bool) {
        self.slots.lock().entry(id).or_default().watched = on;
    }

    /// Reaps node `id` if it exited, returning how.
    pub fn try_exit(&self, id: u64) -> Option<ExitStatus> {
        let mut slots = self.slots.lock();
        let slot = slots.get_mut(&id)?;
        let status = slot.running.as_mut()?.child.try_wait().ok().flatten()?;
        slot.running = None;
        Some(status)
    }

    /// The next start of node `id` passes `--rejoin`: a damaged raft log is wiped and the node
    /// catches up from the cluster (a new generation: its applied index starts again).
    pub fn rejoin_next(&self, id: u64) {
        let mut slots = self.slots.lock();
        let slot = slots.entry(id).or_default();
        slot.rejoin_next = true;
        slot.generation += 1;
    }

    /// Damages node `id`'s raft log (it must be stopped): writes 4 KiB of garbage into the middle
    /// of the newest WAL file (16 KiB or more, else an error), or (`garbage` false) cuts 4–64 KiB
    /// off its end. Returns what it did.
    pub fn damage_log(&self, id: u64, garbage: bool, cut_kib: u64) -> anyhow::Result<String> {
        use std::io::{Seek, SeekFrom};
        if self.is_running(id) {
            bail!("damage_log({id}): the node runs");
        }
        let dir = self.data_dir(id).join("raft-log");
        let mut wals: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| dir.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        // RocksDB numbers its files in order of creation, zero-padded.
        wals.sort();
        let wal = wals
            .pop()
            .with_context(|| format!("no WAL in {}", dir.display()))?;
        let len = std::fs::metadata(&wal)?.len();
        let name = wal.file_name().unwrap_or_default().to_string_lossy().to_string();
        if garbage && len < 16 * 1024 {
            bail!("{name} is only {len} bytes");
        }
        if garbage {
            let at = len / 2;
            let mut f = OpenOptions::new().write(true).open(&wal)?;
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&[0x5a; 4096])?;
            f.sync_all()?;
            return Ok(format!("4 KiB of garbage at {at} of {name} ({len} bytes)"));
        }
        let cut = (cut_kib * 1024).min(len / 2);
        let f = OpenOptions::new().write(true).open(&wal)?;
        f.set_len(len - cut)?;
        f.sync_all()?;
        Ok(format!("cut the last {cut} bytes of {name} ({len} bytes)"))
    }

    pub fn generation(&self, id: u64) -> u64 {
        self.slots.lock().get(&id).map(|s| s.generation).unwrap_or(0)
    }

    /// Nodes that exited without being killed by the harness (reaped; they are not restarted).
    pub fn crashes(&self) -> Vec<Crash> {
        let mut out = Vec::new();
        let mut slots = self.slots.lock();
        for (id, slot) in slots.iter_mut().filter(|(_, s)| !s.watched) {
            let exited: Option<ExitStatus> = slot
                .running
                .as_mut()
                .and_then(|r| r.child.try_wait().ok().flatten());
            if let Some(status) = exited {
                slot.running = None;
                let text = std::fs::read_to_string(self.log_path(*id)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                out.push(Crash {
                    id: *id,
                    status: status.to_string(),
                    log_tail: tail,
                });
            }
        }
        out
    }

    /// Sets the delay/loss faults of every node's proxy.
    pub fn set_proxy_faults(&self, f: Faults) -> anyhow::Result<()> {
        for p in self.proxies.lock().values_mut().flatten() {
            p.set(f)?;
        }
        Ok(())
    }

    /// Stops every node and proxy and removes the network.
    pub fn shutdown(&self) {
        {
            let mut slots = self.slots.lock();
            for slot in slots.values_mut() {
                if let Some(mut r) = slot.running.take() {
                    if r.paused {
                        let _ = kill(Pid::from_raw(r.child.id() as i32), Signal::SIGCONT);
                    }
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
            }
        }
        if let Some(d) = &self.disks {
            d.stop();
        }
        for p in self.proxies.lock().values_mut().flatten() {
            p.stop();
        }
        self.net.lock().teardown();
    }

    // -- gRPC ----------------------------------------------------------------------------------

    /// A channel to node `id` (`direct`: bypassing its proxy). Channels are lazy and reconnect.
    pub fn channel(&self, id: u64, direct: bool) -> anyhow::Result<Channel> {
        let mut chans = self.channels.lock();
        if let Some(c) = chans.get(&(id, direct)) {
            return Ok(c.clone());
        }
        let addr = if direct {
            self.grpc_direct(id)
        } else {
            self.grpc_public(id)
        };
        let c = Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        chans.insert((id, direct), c.clone());
        Ok(c)
    }

    pub fn herald(&self, id: u64, direct: bool) -> anyhow::Result<HeraldClient<Channel>> {
        Ok(HeraldClient::new(self.channel(id, direct)?))
    }

    /// A channel to node `id`'s cluster plane, directly (mutual TLS with the harness's identity).
    fn cluster_channel(&self, id: u64) -> anyhow::Result<Channel> {
        let mut chans = self.cluster_channels.lock();
        if let Some(c) = chans.get(&id) {
            return Ok(c.clone());
        }
        let c = Channel::from_shared(format!("https://{}", self.cluster_direct(id)))?
            .tls_config(ClientIdentity::load(&self.probe_tls, id)?.config(id))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        chans.insert(id, c.clone());
        Ok(c)
    }

    /// Node `id`'s Raft probe, directly, within `limit`.
    pub async fn probe(&self, id: u64, want_hash: bool, limit: Duration) -> anyhow::Result<ProbeReply> {
        self.probe_group(id, 0, want_hash, limit).await
    }

    /// [`Cluster::probe`] of Raft group `group` (0: the metadata group, or the only one).
    pub async fn probe_group(
        &self,
        id: u64,
        group: u32,
        want_hash: bool,
        limit: Duration,
    ) -> anyhow::Result<ProbeReply> {
        let mut c = RaftServiceClient::new(self.cluster_channel(id)?);
        let mut req = Request::new(ProbeRequest {
            from: 0,
            target: id,
            want_state_hash: want_hash,
            group,
            ..Default::default()
        });
        req.set_timeout(limit);
        let r = tokio::time::timeout(limit, c.probe(req))
            .await
            .map_err(|_| anyhow!("probe of node {id} timed out"))??;
        Ok(r.into_inner())
    }

    pub async fn cluster_status(&self, id: u64) -> anyhow::Result<pb::ClusterStatusReply> {
        let mut c = self.herald(id, true)?;
        let mut req = Request::new(pb::ClusterStatusRequest {});
        req.set_timeout(Duration::from_secs(3));
        let r = tokio::time::timeout(Duration::from_secs(4), c.cluster_status(req))
            .await
            .map_err(|_| anyhow!("ClusterStatus of node {id} timed out"))??;
        Ok(r.into_inner())
    }

    /// The leader a majority of the live nodes agree on, if any.
    pub async fn leader(&self) -> Option<u64> {
        self.group_leader(0).await
    }

    /// Shard groups of the nodes (`--shards`).
    pub fn shards(&self) -> u32 {
        self.opts.shards
    }

    /// The leader of Raft group `group` a majority of the live nodes agree on, if any.
    pub async fn group_leader(&self, group: u32) -> Option<u64> {
        let live = self.live();
        let probes = futures::future::join_all(
            live.iter()
                .map(|id| self.probe_group(*id, group, false, Duration::from_millis(800))),
        )
        .await;
        let seen: Vec<ProbeReply> = probes.into_iter().filter_map(Result::ok).collect();
        for p in &seen {
            if p.state != "leader" {
                continue;
            }
            let agree = seen
                .iter()
                .filter(|o| o.has_leader && o.leader_id == p.node_id && o.term == p.term)
                .count();
            if agree * 2 > self.ids.len() {
                return Some(p.node_id);
            }
        }
        None
    }

    /// Waits until a leader is established.
    pub async fn wait_leader(&self, limit: Duration) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no leader within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The voters and learners as the leader sees them.
    pub async fn members(&self) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
        let leader = self.leader().await.context("no leader")?;
        let s = self.cluster_status(leader).await?;
        // A voter of the cluster is a voter of every group as the leader of the metadata group
        // sees them (with shards a membership change that stopped half-way leaves a node in
        // some groups only: it is not a voter then, and heal adds it again).
        let voters = s
            .members
            .iter()
            .filter(|m| m.role == "voter")
            .map(|m| m.node_id)
            .filter(|id| s.groups.iter().all(|g| g.voters.contains(id)))
            .collect();
        let learners = s
            .members
            .iter()
            .filter(|m| m.role != "voter")
            .map(|m| m.node_id)
            .collect();
        Ok((voters, learners))
    }

    /// AddNode through the leader.
    pub async fn add_node(&self, id: u64) -> anyhow::Result<pb::MembershipReply> {
        let leader = self.leader().await.context("no leader")?;
        let mut c = self.herald(leader, true)?;
        let mut req = admin(pb::AddNodeRequest {
            node_id: id,
            cluster_addr: self.cluster_public(id),
            learner_only: false,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(70));
        Ok(c.add_node(req).await?.into_inner())
    }

    /// RemoveNode through the leader.
    pub async fn remove_node(&self, id: u64) -> anyhow::Result<pb::MembershipReply> {
        let leader = self.leader().await.context("no leader")?;
        let mut c = self.herald(leader, true)?;
        let mut req = admin(pb::RemoveNodeRequest { node_id: id });
        req.set_timeout(Duration::from_secs(30));
        Ok(c.remove_node(req).await?.into_inner())
    }

    /// Creates the suite's app (caps far above what a run pushes) and waits until every node
    /// knows it. Returns (secret, api key).
    pub async fn create_app(&self, app: &str) -> anyhow::Result<(String, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (secret, key) = loop {
            let attempt = async {
                let leader = self.leader().await.context("no leader")?;
                let mut c = self.herald(leader, true)?;
                let mut req = admin(pb::CreateAppRequest {
                    id: app.into(),
                    name: app.into(),
                    limits: Some(pb::AppLimits {
                        mailbox_cap: 1_000_000,
                        default_ttl_ms: 0,
                        max_ttl_ms: 0,
                        topic_retain: 1_000_000,
                        max_payload: 0,
                        max_targets: 0,
                    }),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(10));
                let a = c.create_app(req).await?.into_inner().app.context("no app")?;
                anyhow::Ok((
                    a.secrets.first().cloned().context("no secret")?,
                    a.api_keys.first().cloned().context("no api key")?,
                ))
            };
            match attempt.await {
                Ok(v) => break v,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context("cannot create the app"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        };
        for id in &self.ids {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let mut c = self.herald(*id, true)?;
                let mut req = admin(pb::GetAppRequest { id: app.into() });
                req.set_timeout(Duration::from_secs(3));
                if c.get_app(req).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!("node {id} never learned app {app}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok((secret, key))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `msg` with the admin token.
pub fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().expect("ascii token"),
    );
    r
}

/// The app's credentials, for app calls.
#[derive(Debug, Clone)]
pub struct AppCreds {
    pub id: String,
    pub secret: String,
    pub api_key: String,
}

impl AppCreds {
    pub fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert("x-herald-app", self.id.parse().expect("ascii app id"));
        md.insert("x-herald-api-key", self.api_key.parse().expect("ascii api key"));
        r.set_timeout(timeout);
        r
    }

    pub fn token(&self, user: &str) -> String {
        crate::token::mint(&self.id, user, &self.secret, 24 * 3600)
    }
}

/// The cluster's CA and one certificate per node, made by the `herald certs` command under test.
fn make_certs(bin: &Path, dir: &Path, ids: &[u64]) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(bin)
            .arg("certs")
            .args(args)
            .output()
            .context("cannot run herald certs")?;
        if !out.status.success() {
            bail!(
                "herald certs {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    let d = dir.display().to_string();
    if !dir.join("ca.pem").exists() {
        run(&["ca", "--dir", &d])?;
    }
    for id in ids {
        if !dir.join(format!("node-{id}.pem")).exists() {
            run(&["node", "--dir", &d, "--id", &id.to_string()])?;
        }
    }
    Ok(())
}

/// A client identity on the cluster plane: the CA to trust and a node certificate to present.
struct ClientIdentity {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl ClientIdentity {
    fn load(dir: &Path, id: u64) -> anyhow::Result<ClientIdentity> {
        let read = |n: String| std::fs::read(dir.join(&n)).with_context(|| format!("cannot read {n}"));
        Ok(ClientIdentity {
            ca: read("ca.pem".into())?,
            cert: read(format!("node-{id}.pem"))?,
            key: read(format!("node-{id}.key"))?,
        })
    }

    /// TLS to node `target`, which must prove it is `herald-node-<target>`.
    fn config(&self, target: u64) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .domain_name(format!("herald-node-{target}"))
    }
}
