//! A Herald node: one Raft member plus the gRPC API (and, on top, the room server), started by
//! [`run`] on listeners the caller bound, stopped by one cancellation token.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_proto::v1::herald_client::HeraldClient;
use herald_raft::raft_node::now_ms;
use herald_raft::{NoObserver, NodeInfo, Op, RaftConfig, RaftNode};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::api::error::ApiError;
use crate::api::HeraldApi;
use crate::config::NodeConfig;

/// Sockets a node serves on, bound before it starts (so tests can use port 0 and learn the port).
pub struct Listeners {
    pub grpc: TcpListener,
    pub client: Option<TcpListener>,
    pub tls: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &NodeConfig) -> anyhow::Result<Listeners> {
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
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
        Ok(Listeners { grpc, client, tls })
    }
}

/// Shared handle on a running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    config: NodeConfig,
    raft: RaftNode,
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

    pub fn raft(&self) -> &RaftNode {
        &self.inner.raft
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
        let Some((leader, addr)) = self.raft().leader().filter(|(id, _)| *id != self.config().id) else {
            return Err(ApiError::Unavailable {
                msg: "no leader is known right now; retry".into(),
                leader: None,
            }
            .into());
        };
        let channel = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
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

/// Runs a node until `shutdown` is cancelled, then stops it cleanly.
pub async fn run(
    config: NodeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let mut raft_config = RaftConfig::standard(
        config.id,
        config.data_dir.clone(),
        config.grpc_advertise.clone(),
        config.peers.clone(),
    );
    raft_config.heartbeat_ms = config.raft_heartbeat.as_millis() as u64;
    raft_config.election_timeout_min_ms = config.election_timeout.as_millis() as u64;
    raft_config.election_timeout_max_ms = 2 * config.election_timeout.as_millis() as u64;
    raft_config.snapshot_every = config.snapshot_every;
    raft_config.write_timeout = config.write_timeout;
    let raft = RaftNode::start(raft_config, Arc::new(NoObserver))
        .await
        .with_context(|| format!("cannot start raft on {}", config.data_dir.display()))?;

    let node = Node {
        inner: Arc::new(NodeInner {
            config: config.clone(),
            raft: raft.clone(),
            boot: rand::random::<u32>() as u64,
            next_msg: AtomicU64::new(1),
            cancel: shutdown.clone(),
            tasks: TaskTracker::new(),
        }),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<herald_proto::v1::herald_server::HeraldServer<HeraldApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let grpc_shutdown = CancellationToken::new();
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(raft.grpc_service())
        .add_service(herald_proto::v1::herald_server::HeraldServer::new(
            HeraldApi::new(node.clone()),
        ))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listeners.grpc),
            grpc_shutdown.clone().cancelled_owned(),
        );
    let grpc_task = tokio::spawn(grpc);
    info!(node_id = config.id, %grpc_addr, data_dir = %config.data_dir.display(), "node started");

    node.inner.tasks.spawn(announce(node.clone()));
    node.inner.tasks.spawn(crate::housekeeping::run(node.clone()));

    shutdown.cancelled().await;
    info!(node_id = config.id, "shutting down");
    node.inner.tasks.close();
    let stop = async {
        node.inner.tasks.wait().await;
        raft.shutdown().await;
        grpc_shutdown.cancel();
        let _ = grpc_task.await;
    };
    if tokio::time::timeout(Duration::from_secs(10), stop).await.is_err() {
        warn!(node_id = config.id, "shutdown did not finish within 10s");
    }
    info!(node_id = config.id, "node stopped");
    Ok(())
}

/// Once a leader exists: record this node's addresses and end any sessions a previous run of this
/// node left in the registry (they died with that process).
async fn announce(node: Node) {
    let c = node.config();
    let info = NodeInfo {
        id: c.id,
        grpc_addr: c.grpc_advertise.clone(),
        client_addr: c.client_advertise.clone(),
        tls_addr: c.tls_advertise.clone(),
        ws_addr: String::new(),
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let ops = vec![Op::SetNode(info.clone()), Op::NodeDown { node: c.id }];
        match node.raft().write(ops).await {
            Ok(done) => {
                info!(
                    node_id = c.id,
                    log_index = done.log_index,
                    at_ms = now_ms(),
                    "node announced"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(node_id = c.id, error = %e, "announce not committed yet; retrying");
            }
        }
        tokio::select! {
            _ = node.cancel_token().cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
