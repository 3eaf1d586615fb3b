//! The `herald` client commands: thin wrappers over the gRPC API (`messages`: push, broadcast,
//! publish, status, delivery, kick) and the SDK (`listen`). Every command prints JSON on stdout
//! (one document, or one line per item or event) and its errors as one `error: ...` line on
//! stderr.
//!
//! Exit codes a script can rely on: 0 success, 2 usage error, 3 cluster unavailable or unreachable,
//! 4 refused (invalid argument, not found, permission, already exists, bad token), 5 outcome
//! unknown (a write that timed out may still commit), 6 `listen --count` timed out before the
//! count, 1 anything else.

pub mod listen;
pub mod messages;

use std::time::Duration;

use herald_proto::v1 as pb;
use herald_proto::v1::herald_client::HeraldClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub mod env {
    pub const SERVER: &str = "HERALD_SERVER";
    pub const ADMIN_TOKEN: &str = "HERALD_ADMIN_TOKEN";
    pub const APP: &str = "HERALD_APP";
    pub const API_KEY: &str = "HERALD_API_KEY";
    pub const SERVER_CA: &str = "HERALD_SERVER_CA";
}

/// Where and as whom a command talks to the cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// gRPC address of any node (host:port).
    #[arg(long, short = 's', env = env::SERVER, default_value = "127.0.0.1:7401", global = true)]
    pub server: String,
    /// Admin token for admin calls.
    #[arg(long, env = env::ADMIN_TOKEN, global = true, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// App id for app calls.
    #[arg(long, env = env::APP, global = true)]
    pub app: Option<String>,
    /// The app's API key for app calls.
    #[arg(long, env = env::API_KEY, global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Per-call timeout in milliseconds.
    #[arg(long, default_value_t = 10_000, global = true)]
    pub timeout_ms: u64,
    /// CA certificate (PEM) to verify --server's TLS with: the node serves its gRPC API over TLS
    /// (`--grpc-tls`). Without it the connection is plaintext.
    #[arg(long, env = env::SERVER_CA, global = true)]
    pub server_ca: Option<std::path::PathBuf>,
}

/// A command failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: msg.into(),
        }
    }
    pub fn other(msg: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: msg.into(),
        }
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::Unavailable => 3,
            Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::ResourceExhausted => 4,
            Code::DeadlineExceeded => 5,
            _ => 1,
        };
        let leader = s
            .metadata()
            .get(crate::api::error::LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(|l| format!(" (leader: {l})"))
            .unwrap_or_default();
        CliError {
            code,
            message: format!("{:?}: {}{leader}", s.code(), s.message()),
        }
    }
}

impl ClientOpts {
    /// Connects to `--server`.
    pub async fn connect(&self) -> Result<HeraldClient<Channel>, CliError> {
        let scheme = if self.server_ca.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{}", self.server))
            .map_err(|e| CliError::usage(format!("--server {:?}: {e}", self.server)))?;
        if let Some(ca) = &self.server_ca {
            let pem = std::fs::read(ca)
                .map_err(|e| CliError::usage(format!("--server-ca {}: {e}", ca.display())))?;
            let host = self
                .server
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&self.server);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                        .domain_name(host),
                )
                .map_err(|e| CliError::usage(format!("--server-ca: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_millis(self.timeout_ms))
            .connect()
            .await
            .map_err(|e| CliError {
                code: 3,
                message: format!("cannot reach {}: {e}", self.server),
            })?;
        Ok(HeraldClient::new(channel).max_decoding_message_size(64 << 20))
    }

    /// A request carrying the admin token, if any.
    pub fn admin<T>(&self, msg: T) -> Result<Request<T>, CliError> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.admin_token {
            let v: MetadataValue<_> = format!("Bearer {t}")
                .parse()
                .map_err(|_| CliError::usage("--admin-token has characters not allowed in a header"))?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }

    /// A request carrying the app's id and API key.
    pub fn app_request<T>(&self, msg: T) -> Result<Request<T>, CliError> {
        let app = self.app_id()?;
        let key = self
            .api_key
            .as_deref()
            .ok_or_else(|| CliError::usage("this command needs --api-key (or HERALD_API_KEY)"))?;
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            crate::api::auth::APP_METADATA,
            app.parse()
                .map_err(|_| CliError::usage("--app has characters not allowed in a header"))?,
        );
        md.insert(
            crate::api::auth::API_KEY_METADATA,
            key.parse()
                .map_err(|_| CliError::usage("--api-key has characters not allowed in a header"))?,
        );
        Ok(r)
    }

    pub fn app_id(&self) -> Result<String, CliError> {
        self.app
            .clone()
            .ok_or_else(|| CliError::usage("this command needs --app (or HERALD_APP)"))
    }
}

/// `herald cluster status`: one JSON document.
pub async fn cluster_status(opts: &ClientOpts) -> Result<serde_json::Value, CliError> {
    let mut c = opts.connect().await?;
    let r = c.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
    Ok(serde_json::json!({
        "node_id": r.node_id,
        "leader_id": if r.has_leader { Some(r.leader_id) } else { None },
        "term": r.term,
        "committed_index": r.committed_index,
        "members": r.members.iter().map(|m| serde_json::json!({
            "node_id": m.node_id,
            "grpc_addr": m.grpc_addr,
            "cluster_addr": m.cluster_addr,
            "client_addr": m.client_addr,
            "role": m.role,
            "reachable": m.reachable,
            "state": m.state,
            "last_log_index": m.last_log_index,
            "applied_index": m.applied_index,
            "matched_index": m.matched_index,
            "connections": m.connections,
        })).collect::<Vec<_>>(),
        "shards": r.shards,
        "groups": r.groups.iter().map(group_json).collect::<Vec<_>>(),
    }))
}

/// One Raft group of `herald cluster status` / `rebalance`.
pub fn group_json(g: &pb::GroupStatus) -> serde_json::Value {
    serde_json::json!({
        "group": g.group,
        "role": if g.group == 0 { "meta" } else { "shard" },
        "leader_id": (g.leader_id != 0).then_some(g.leader_id),
        "preferred_leader_id": (g.preferred_leader_id != 0).then_some(g.preferred_leader_id),
        "term": g.term,
        "applied_index": g.applied_index,
        "voters": g.voters,
        "learners": g.learners,
    })
}

pub fn app_json(a: &pb::App) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "name": a.name,
        "secrets": a.secrets,
        "api_keys": a.api_keys,
        "limits": a.limits.as_ref().map(|l| serde_json::json!({
            "mailbox_cap": l.mailbox_cap,
            "default_ttl_ms": l.default_ttl_ms,
            "max_ttl_ms": l.max_ttl_ms,
            "topic_retain": l.topic_retain,
            "max_payload": l.max_payload,
            "max_targets": l.max_targets,
        })),
        "policy": a.policy.as_ref().map(|p| serde_json::json!({
            "max_per_platform": p.max_per_platform,
            "max_per_user": p.max_per_user,
        })),
        "callbacks": a.callbacks,
        "created_ms": a.created_ms,
        "client_publish": a.client_publish,
    })
}
