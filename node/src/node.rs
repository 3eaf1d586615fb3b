//! A Herald node: a member of each of the cluster's Raft groups plus the gRPC API (and, on top,
//! the room server), started by [`run`] on listeners the caller bound, stopped by one
//! cancellation token.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_proto::v1::herald_client::HeraldClient;
use herald_raft::network::ClusterTls;
use herald_raft::raft_node::now_ms;
use herald_raft::{Groups, NodeInfo, Op, RaftConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::api::error::ApiError;
use crate::api::HeraldApi;
use crate::config::NodeConfig;
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::peers::{PeerMonitor, PeerService};
use crate::room::listener::{Acceptor, Wrap};
use crate::room::observer::NodeObserver;
use crate::room::{Room, RoomConfig};

/// Sockets a node serves on, bound before it starts (so tests can use port 0 and learn the port).
pub struct Listeners {
    /// The public gRPC API.
    pub grpc: TcpListener,
    /// The cluster plane: Raft, forwarding, peer delivery (other nodes only).
    pub cluster: TcpListener,
    pub client: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    /// WebSocket client listener.
    pub ws: Option<TcpListener>,
    /// MQTT listener, plain and over TLS.
    pub mqtt: Option<TcpListener>,
    pub mqtt_tls: Option<TcpListener>,
    /// Admin HTTP server (metrics, probes, dashboard).
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &NodeConfig) -> anyhow::Result<Listeners> {
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
        let cluster = TcpListener::bind(config.cluster_listen)
            .await
            .with_context(|| format!("cannot listen for the cluster plane on {}", config.cluster_listen))?;
        let client = match config.client_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen for clients on {a}"))?,
            ),
            None => None,
        };
        let tls = match config.tls_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen for TLS on {a}"))?,
            ),
            None => None,
        };
        let ws = match config.ws_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen for WebSocket clients on {a}"))?,
            ),
            None => None,
        };
        let mqtt = match config.mqtt_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen for MQTT clients on {a}"))?,
            ),
            None => None,
        };
        let mqtt_tls = match config.mqtt_tls_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen for MQTT clients over TLS on {a}"))?,
            ),
            None => None,
        };
        let admin = match config.admin_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen for admin HTTP on {a}"))?,
            ),
            None => None,
        };
        Ok(Listeners {
            grpc,
            cluster,
            client,
            tls,
            ws,
            mqtt,
            mqtt_tls,
            admin,
        })
    }
}

/// Shared handle on a running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    config: NodeConfig,
    groups: Groups,
    room: Arc<Room>,
    peers: Arc<PeerMonitor>,
    /// Makes message ids unique per node process: `<node>-<boot>-<counter>`.
    boot: u64,
    next_msg: AtomicU64,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The node's Raft groups (see [`Groups`]).
    pub fn groups(&self) -> &Groups {
        &self.inner.groups
    }

    pub fn room(&self) -> &Arc<Room> {
        &self.inner.room
    }

    pub fn peers(&self) -> &Arc<PeerMonitor> {
        &self.inner.peers
    }

    pub fn cancel_token(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// A message id unique in the cluster.
    pub fn new_msg_id(&self) -> String {
        let n = self.inner.next_msg.fetch_add(1, Ordering::Relaxed);
        format!("{}-{:x}-{n}", self.inner.config.id, self.inner.boot)
    }

    /// Re-sends an admin call to the leader's gRPC API (membership changes must run there).
    pub async fn forward_admin<Req, Rep, F, Fut>(
        &self,
        request: Request<Req>,
        call: F,
    ) -> Result<Response<Rep>, Status>
    where
        F: FnOnce(HeraldClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        let Some((leader, addr)) = self
            .groups()
            .meta()
            .leader()
            .filter(|(id, _)| *id != self.config().id)
        else {
            return Err(ApiError::Unavailable {
                msg: "no leader is known right now; retry".into(),
                leader: None,
            }
            .into());
        };
        // Over the cluster plane (mutual TLS), where every node also serves the API for this.
        let channel = self
            .groups()
            .meta()
            .peer_channel(leader)
            .map_err(|e| ApiError::Unavailable {
                msg: format!("leader node {leader} at {addr} unreachable: {e}"),
                leader: Some((leader, addr.clone())),
            })?;
        let auth = request.metadata().get("authorization").cloned();
        let mut fwd = Request::new(request.into_inner());
        if let Some(a) = auth {
            fwd.metadata_mut().insert("authorization", a);
        }
        call(HeraldClient::new(channel), fwd).await
    }
}

/// Runs a node until `shutdown` is cancelled, then drains and stops it cleanly.
pub async fn run(
    config: NodeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) if listeners.tls.is_some() || listeners.mqtt_tls.is_some() => {
            Some(crate::room::tls::server_config(c, k)?)
        }
        _ => None,
    };
    let cluster_tls = match &config.cluster_tls {
        Some(f) => Some(
            ClusterTls::load(config.id, &f.ca, &f.cert, &f.key)
                .context("cannot use the cluster certificates")?,
        ),
        None => None,
    };
    let grpc_tls = match &config.grpc_tls {
        Some(f) => Some(grpc_server_tls(&f.cert, &f.key)?),
        None => None,
    };
    let admin_tls = crate::admin::tls_config(&config)?;
    crate::api::auth::warn_if_admin_open(&config);
    let mut raft_config = RaftConfig::standard(
        config.id,
        config.data_dir.clone(),
        config.cluster_advertise.clone(),
        config.peers.clone(),
    );
    raft_config.tls = cluster_tls.clone();
    raft_config.heartbeat_ms = config.raft_heartbeat.as_millis() as u64;
    raft_config.election_timeout_min_ms = config.election_timeout.as_millis() as u64;
    raft_config.election_timeout_max_ms = 2 * config.election_timeout.as_millis() as u64;
    raft_config.snapshot_every = config.snapshot_every;
    raft_config.write_timeout = config.write_timeout;
    raft_config.rejoin = config.rejoin;
    raft_config.shards = config.shards;
    let observers: Vec<Arc<NodeObserver>> = (0..=config.shards)
        .map(|g| Arc::new(NodeObserver::new(g)))
        .collect();
    let groups = Groups::start(raft_config, |g| {
        let o: Arc<dyn herald_raft::ApplyObserver> = observers[g as usize].clone();
        o
    })
    .await
    .with_context(|| format!("cannot start raft on {}", config.data_dir.display()))?;
    let raft = groups.meta().clone();

    // Background work stops on `background` (after the drain), the rest on `shutdown`.
    let background = CancellationToken::new();
    let coordinator = Coordinator::new(CoordinatorConfig::standard(), config.id, background.clone())
        .context("invalid coordinator config")?;
    let room = Room::new(
        RoomConfig {
            node_id: config.id,
            heartbeat: config.client_heartbeat,
            heartbeat_min: config.client_heartbeat_min,
            heartbeat_max: config.client_heartbeat_max,
            max_frame: config.max_frame,
            auth_timeout: config.auth_timeout,
            send_queue: config.send_queue,
            max_connections: config.max_connections,
            accept_rate_per_ip: config.accept_rate_per_ip,
        },
        groups.clone(),
        coordinator.clone(),
    );
    for o in &observers {
        o.attach(room.clone());
    }
    let peers = PeerMonitor::new(groups.clone(), room.clone(), config.node_down_timeout);
    let node = Node {
        inner: Arc::new(NodeInner {
            config: config.clone(),
            groups: groups.clone(),
            room: room.clone(),
            peers: peers.clone(),
            boot: rand::random::<u32>() as u64,
            next_msg: AtomicU64::new(1),
            cancel: background.clone(),
            tasks: TaskTracker::new(),
        }),
    };

    let archive = match &config.archive_url {
        Some(url) => Some(Arc::new(
            crate::archive::Archive::new(url, config.archive_batch).context("invalid --archive-url")?,
        )),
        None => None,
    };
    let announced = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<herald_proto::v1::herald_server::HeraldServer<HeraldApi>>()
        .await;
    // The public port's reflection lists the public services only (Herald, Archive, health).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::PUBLIC_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let cluster_addr = listeners.cluster.local_addr()?;
    let grpc_shutdown = CancellationToken::new();
    // `Server::tcp_nodelay` is ignored for a listener we bind ourselves (tonic applies it only
    // when it binds); without TCP_NODELAY, Nagle + delayed ACK holds small replies ~40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let mut public = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)));
    if let Some(tls) = grpc_tls {
        public = public.tls_config(tls).context("invalid gRPC API TLS config")?;
    }
    let grpc = public
        .layer(crate::api::leader_hint::layer(raft.reader().clone()))
        .add_service(herald_proto::v1::herald_server::HeraldServer::new(
            HeraldApi::new(node.clone()),
        ))
        .add_service(crate::archive::ArchiveApi::server(node.clone(), archive.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, grpc_shutdown.clone().cancelled_owned());
    let grpc_task = tokio::spawn(grpc);

    // The cluster plane: raft RPCs, write forwarding and probes, peer delivery, and the API again
    // for calls a node forwards to the leader (Status, DeliveryStatus, membership changes).
    // Every request passes the peer guard first (with TLS: a certificate naming an accepted node).
    let cluster_incoming =
        tonic::transport::server::TcpIncoming::from(listeners.cluster).with_nodelay(Some(true));
    let mut cluster = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)));
    match &cluster_tls {
        Some(tls) => {
            cluster = cluster
                .tls_config(tls.server_config())
                .context("invalid cluster TLS config")?;
        }
        None => {
            node.inner
                .tasks
                .spawn(warn_insecure_cluster(config.id, background.clone()));
        }
    }
    let cluster = cluster
        .layer(tonic::service::InterceptorLayer::new(raft.peer_guard()))
        .add_service(raft.grpc_service())
        .add_service(PeerService::server(room.clone()))
        .add_service(herald_proto::v1::herald_server::HeraldServer::new(
            HeraldApi::new(node.clone()),
        ))
        .serve_with_incoming_shutdown(cluster_incoming, grpc_shutdown.clone().cancelled_owned());
    let cluster_task = tokio::spawn(cluster);
    info!(
        node_id = config.id,
        %grpc_addr,
        %cluster_addr,
        grpc_tls = config.grpc_tls.is_some(),
        cluster_tls = cluster_tls.is_some(),
        data_dir = %config.data_dir.display(),
        "node started"
    );

    let tasks = &node.inner.tasks;
    tasks.spawn(crate::housekeeping::run(node.clone()));
    tasks.spawn(crate::app_copies::reconcile(node.clone()));
    tasks.spawn(crate::balance::run(node.clone()));
    tasks.spawn(room.acks.clone().run(background.clone()));
    tasks.spawn(peers.clone().run(background.clone()));
    tasks.spawn(crate::admin::run_sampler(node.clone(), background.clone()));
    // The outboxes (cold archive, session events) are per group holding users: each group's
    // leader drains its own.
    for g in groups.data() {
        match &archive {
            Some(a) => {
                tasks.spawn(a.clone().run(g.clone(), background.clone()));
            }
            None => {
                tasks.spawn(crate::archive::keep_disabled(g.clone(), background.clone()));
            }
        }
        let (c, r, stop) = (coordinator.clone(), g.clone(), background.clone());
        tasks.spawn(async move { c.run_event_sender(r, stop).await });
    }
    // The admin server runs until the very end (probes answer "not ready" while draining).
    let admin_stop = CancellationToken::new();
    let admin_task = listeners.admin.map(|l| {
        let state = Arc::new(crate::admin::AdminState {
            node: node.clone(),
            announced: announced.clone(),
            archive: archive.as_ref().map(|a| a.stats.clone()),
        });
        tokio::spawn(crate::admin::serve(l, state, admin_tls, admin_stop.clone()))
    });
    {
        let room = room.clone();
        let stop = background.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => room.sweep(),
                }
            }
        });
    }

    // Clients are accepted once this node's previous sessions are cleared from the registry.
    let accept_stop = CancellationToken::new();
    let conn_tasks = TaskTracker::new();
    {
        let node = node.clone();
        let accept_stop = accept_stop.clone();
        let conn_tasks = conn_tasks.clone();
        let announced = announced.clone();
        tasks.spawn(async move {
            if !announce(node.clone()).await {
                return;
            }
            announced.store(true, Ordering::Relaxed);
            let acceptor = Acceptor::new(node.room().clone(), conn_tasks);
            if let Some(l) = listeners.client {
                tokio::spawn(acceptor.clone().run(l, None, accept_stop.clone()));
            }
            if let (Some(l), Some(cfg)) = (listeners.mqtt_tls, tls.clone()) {
                tokio::spawn(
                    acceptor
                        .clone()
                        .run_wrapped(l, Wrap::MqttTls(cfg), accept_stop.clone()),
                );
            }
            if let (Some(l), Some(cfg)) = (listeners.tls, tls) {
                tokio::spawn(acceptor.clone().run(l, Some(cfg), accept_stop.clone()));
            }
            if let Some(l) = listeners.ws {
                tokio::spawn(acceptor.clone().run_wrapped(l, Wrap::Ws, accept_stop.clone()));
            }
            if let Some(l) = listeners.mqtt {
                tokio::spawn(acceptor.clone().run_wrapped(l, Wrap::Mqtt, accept_stop.clone()));
            }
        });
    }

    // A Raft core stopped on a storage error (full disk, EIO) never comes back in this process:
    // stop like a SIGTERM (clients get BYE with redirects) and exit non-zero for the supervisor.
    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        reason = groups.wait_fatal() => Some(reason),
    };
    match &fatal {
        None => info!(node_id = config.id, "shutting down"),
        Some(reason) => tracing::error!(
            node_id = config.id,
            %reason,
            "raft stopped on an error; moving clients away and exiting (restart once the disk is fixed)"
        ),
    }
    // Load balancers and health checkers stop sending work here first (grpc.health.v1: the
    // service and the server as a whole answer NOT_SERVING while the node drains).
    health
        .set_not_serving::<herald_proto::v1::herald_server::HeraldServer<HeraldApi>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    accept_stop.cancel();
    drain(&node, &conn_tasks).await;
    background.cancel();
    if tokio::time::timeout(Duration::from_secs(5), coordinator.wait_stopped())
        .await
        .is_err()
    {
        warn!(node_id = config.id, "upstream requests still running at shutdown");
    }
    node.inner.tasks.close();
    let stop = async {
        node.inner.tasks.wait().await;
        groups.shutdown().await;
        grpc_shutdown.cancel();
        let _ = grpc_task.await;
        let _ = cluster_task.await;
        admin_stop.cancel();
        if let Some(t) = admin_task {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), stop).await.is_err() {
        warn!(node_id = config.id, "shutdown did not finish within 10s");
    }
    info!(node_id = config.id, "node stopped");
    match fatal {
        None => Ok(()),
        Some(reason) => Err(anyhow::anyhow!("raft stopped on an error: {reason}")),
    }
}

/// Logs, every minute, that the cluster plane runs without TLS (`--insecure-cluster`): anyone who
/// can reach it can join the Raft group, forge deliveries and read every message.
async fn warn_insecure_cluster(node_id: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => warn!(
                node_id,
                "--insecure-cluster: node-to-node traffic is plaintext and unauthenticated; \
                 anyone who reaches the cluster port can act as a member"
            ),
        }
    }
}

/// The gRPC API's TLS config from PEM files.
fn grpc_server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let cert_pem = std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem)))
}

/// Moves clients away before the node stops: BYE with a redirect to every connection, wait for
/// them to go (bounded), commit their acks, then take this node's sessions off the registry in
/// one entry.
async fn drain(node: &Node, conn_tasks: &TaskTracker) {
    let room = node.room();
    if room.connections() > 0 {
        node.peers().refresh_now(Duration::from_secs(1)).await;
    }
    let n = room.start_drain();
    conn_tasks.close();
    if n > 0
        && tokio::time::timeout(node.config().drain_timeout, conn_tasks.wait())
            .await
            .is_err()
    {
        warn!(
            left = room.connections(),
            "drain timeout: closing the remaining connections"
        );
    }
    room.acks.flush().await;
    if n > 0 {
        // Every group holding users: a session's registration lives in its user's group.
        let writes = node.groups().data().iter().map(|g| {
            g.write_one(Op::NodeDown {
                node: node.config().id,
            })
        });
        let write = async {
            futures::future::join_all(writes)
                .await
                .into_iter()
                .find_map(Result::err)
                .map_or(Ok(()), Err)
        };
        match tokio::time::timeout(Duration::from_secs(3), write).await {
            Ok(Ok(_)) => info!(connections = n, "drained; sessions unregistered"),
            Ok(Err(e)) => warn!(error = %e, "could not unregister this node's sessions"),
            Err(_) => warn!("unregistering this node's sessions timed out"),
        }
    }
}

/// Once a leader exists: record this node's addresses and end any sessions a previous run of this
/// node left in the registry (they died with that process).
async fn announce(node: Node) -> bool {
    let c = node.config();
    let info = NodeInfo {
        id: c.id,
        grpc_addr: c.grpc_advertise.clone(),
        client_addr: c.client_advertise.clone(),
        tls_addr: c.tls_advertise.clone(),
        ws_addr: c.ws_advertise.clone(),
    };
    let mut delay = Duration::from_millis(100);
    let groups = node.groups();
    loop {
        // The addresses in the metadata group, the clean-up in every group holding sessions
        // (with no shards, one entry does both). Both are idempotent: a retry repeats them all.
        let writes = groups.all().iter().filter_map(|g| {
            let mut ops = Vec::new();
            if g.group() == herald_raft::shard::META_GROUP {
                ops.push(Op::SetNode(info.clone()));
            }
            if groups.shards() == 0 || g.group() != herald_raft::shard::META_GROUP {
                ops.push(Op::NodeDown { node: c.id });
            }
            (!ops.is_empty()).then_some(async move { (g, g.write(ops).await) })
        });
        let mut failed = None;
        for (g, r) in futures::future::join_all(writes).await {
            match r {
                // Serve from a state that includes the clean-up.
                Ok(done) => g.reader().wait_applied(done.log_index).await,
                Err(e) => failed = Some((g.group(), e)),
            }
        }
        match failed {
            None => {
                info!(
                    node_id = c.id,
                    groups = groups.all().len(),
                    at_ms = now_ms(),
                    "node announced"
                );
                return true;
            }
            Some((group, e)) => {
                tracing::debug!(node_id = c.id, group, error = %e, "announce not committed yet; retrying");
            }
        }
        tokio::select! {
            _ = node.cancel_token().cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
