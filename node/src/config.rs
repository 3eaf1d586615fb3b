//! Node configuration: one set of options read from flags, `HERALD_*` environment variables and an
//! optional TOML file (flags beat env vars, which beat the file, which beats the defaults), then
//! resolved into a validated [`NodeConfig`] with clear errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Names of every environment variable a node reads.
pub mod env {
    pub const CONFIG: &str = "HERALD_CONFIG";
    pub const ID: &str = "HERALD_ID";
    pub const DATA_DIR: &str = "HERALD_DATA_DIR";
    pub const GRPC_ADDR: &str = "HERALD_GRPC_ADDR";
    pub const ADVERTISE_GRPC_ADDR: &str = "HERALD_ADVERTISE_GRPC_ADDR";
    pub const CLIENT_ADDR: &str = "HERALD_CLIENT_ADDR";
    pub const ADVERTISE_CLIENT_ADDR: &str = "HERALD_ADVERTISE_CLIENT_ADDR";
    pub const TLS_ADDR: &str = "HERALD_TLS_ADDR";
    pub const ADVERTISE_TLS_ADDR: &str = "HERALD_ADVERTISE_TLS_ADDR";
    pub const TLS_CERT: &str = "HERALD_TLS_CERT";
    pub const TLS_KEY: &str = "HERALD_TLS_KEY";
    pub const PEERS: &str = "HERALD_PEERS";
    pub const CLUSTER_ADDR: &str = "HERALD_CLUSTER_ADDR";
    pub const ADVERTISE_CLUSTER_ADDR: &str = "HERALD_ADVERTISE_CLUSTER_ADDR";
    pub const CLUSTER_CA: &str = "HERALD_CLUSTER_CA";
    pub const CLUSTER_CERT: &str = "HERALD_CLUSTER_CERT";
    pub const CLUSTER_KEY: &str = "HERALD_CLUSTER_KEY";
    pub const INSECURE_CLUSTER: &str = "HERALD_INSECURE_CLUSTER";
    pub const GRPC_TLS: &str = "HERALD_GRPC_TLS";
    pub const GRPC_TLS_CERT: &str = "HERALD_GRPC_TLS_CERT";
    pub const GRPC_TLS_KEY: &str = "HERALD_GRPC_TLS_KEY";
    pub const ADMIN_TOKEN: &str = "HERALD_ADMIN_TOKEN";
    pub const RAFT_HEARTBEAT_MS: &str = "HERALD_RAFT_HEARTBEAT_MS";
    pub const ELECTION_TIMEOUT_MS: &str = "HERALD_ELECTION_TIMEOUT_MS";
    pub const SNAPSHOT_EVERY: &str = "HERALD_SNAPSHOT_EVERY";
    pub const REJOIN: &str = "HERALD_REJOIN";
    pub const SHARDS: &str = "HERALD_SHARDS";
    pub const WRITE_TIMEOUT_MS: &str = "HERALD_WRITE_TIMEOUT_MS";
    pub const CLIENT_HEARTBEAT_MS: &str = "HERALD_CLIENT_HEARTBEAT_MS";
    pub const CLIENT_HEARTBEAT_MIN_MS: &str = "HERALD_CLIENT_HEARTBEAT_MIN_MS";
    pub const CLIENT_HEARTBEAT_MAX_MS: &str = "HERALD_CLIENT_HEARTBEAT_MAX_MS";
    pub const MAX_CONNECTIONS: &str = "HERALD_MAX_CONNECTIONS";
    pub const MAX_FRAME: &str = "HERALD_MAX_FRAME";
    pub const AUTH_TIMEOUT_MS: &str = "HERALD_AUTH_TIMEOUT_MS";
    pub const ACCEPT_RATE_PER_IP: &str = "HERALD_ACCEPT_RATE_PER_IP";
    pub const SEND_QUEUE: &str = "HERALD_SEND_QUEUE";
    pub const NODE_DOWN_TIMEOUT_MS: &str = "HERALD_NODE_DOWN_TIMEOUT_MS";
    pub const DRAIN_TIMEOUT_MS: &str = "HERALD_DRAIN_TIMEOUT_MS";
    pub const LOG_FORMAT: &str = "HERALD_LOG_FORMAT";
    pub const ADMIN_ADDR: &str = "HERALD_ADMIN_ADDR";
    pub const ADMIN_TLS: &str = "HERALD_ADMIN_TLS";
    pub const ADMIN_TLS_CERT: &str = "HERALD_ADMIN_TLS_CERT";
    pub const ADMIN_TLS_KEY: &str = "HERALD_ADMIN_TLS_KEY";
    pub const WS_ADDR: &str = "HERALD_WS_ADDR";
    pub const ADVERTISE_WS_ADDR: &str = "HERALD_ADVERTISE_WS_ADDR";
    pub const MQTT_ADDR: &str = "HERALD_MQTT_ADDR";
    pub const MQTT_TLS_ADDR: &str = "HERALD_MQTT_TLS_ADDR";
    pub const ARCHIVE_URL: &str = "HERALD_ARCHIVE_URL";
    pub const ARCHIVE_BATCH: &str = "HERALD_ARCHIVE_BATCH";
}

/// Every node option, each optional so that flags, env vars and the file can be layered.
/// The same struct is the TOML file's schema (keys are the field names).
#[derive(Debug, Clone, Default, clap::Args, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeOptions {
    /// This node's Raft id (a positive integer, stable for the life of its data dir).
    #[arg(long, env = env::ID)]
    pub id: Option<u64>,
    /// Directory for the Raft log, the state machine and snapshots (created if missing).
    #[arg(long, env = env::DATA_DIR)]
    pub data_dir: Option<PathBuf>,
    /// Listen address of the public gRPC API: apps' backends, admins, the CLI (host:port).
    #[arg(long, env = env::GRPC_ADDR)]
    pub grpc_addr: Option<String>,
    /// Address backends and tools use to reach this node's gRPC API (default: --grpc-addr).
    #[arg(long, env = env::ADVERTISE_GRPC_ADDR)]
    pub advertise_grpc_addr: Option<String>,
    /// Serve the gRPC API over TLS with --tls-cert/--tls-key (or --grpc-tls-cert/--grpc-tls-key) [default: false].
    #[arg(long, env = env::GRPC_TLS, num_args = 0..=1, default_missing_value = "true")]
    pub grpc_tls: Option<bool>,
    /// Certificate chain (PEM) of the gRPC API's TLS, if not --tls-cert; implies --grpc-tls.
    #[arg(long, env = env::GRPC_TLS_CERT)]
    pub grpc_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the gRPC API's TLS, if not --tls-key.
    #[arg(long, env = env::GRPC_TLS_KEY)]
    pub grpc_tls_key: Option<PathBuf>,
    /// Listen address of the cluster plane: Raft, forwarding and peer delivery between nodes, with
    /// mutual TLS (host:port). Only other nodes need to reach it.
    #[arg(long, env = env::CLUSTER_ADDR)]
    pub cluster_addr: Option<String>,
    /// Address other nodes reach this node's cluster plane at; --peers names it (default: --cluster-addr).
    #[arg(long, env = env::ADVERTISE_CLUSTER_ADDR)]
    pub advertise_cluster_addr: Option<String>,
    /// The cluster's CA certificate(s), PEM; several during a CA rotation (`herald certs`).
    #[arg(long, env = env::CLUSTER_CA)]
    pub cluster_ca: Option<PathBuf>,
    /// This node's cluster certificate, PEM, naming `herald-node-<id>` (`herald certs node`).
    #[arg(long, env = env::CLUSTER_CERT)]
    pub cluster_cert: Option<PathBuf>,
    /// This node's cluster private key, PEM.
    #[arg(long, env = env::CLUSTER_KEY)]
    pub cluster_key: Option<PathBuf>,
    /// Plaintext, unauthenticated cluster traffic instead of mutual TLS (logs a warning every minute); without it the --cluster-ca/cert/key files are required.
    #[arg(long, env = env::INSECURE_CLUSTER, num_args = 0..=1, default_missing_value = "true")]
    pub insecure_cluster: Option<bool>,
    /// Listen address of the plain-TCP client protocol (empty: disabled).
    #[arg(long, env = env::CLIENT_ADDR)]
    pub client_addr: Option<String>,
    /// Address clients are told to use for plain TCP (default: --client-addr).
    #[arg(long, env = env::ADVERTISE_CLIENT_ADDR)]
    pub advertise_client_addr: Option<String>,
    /// Listen address of the TLS client protocol (needs --tls-cert and --tls-key; empty: disabled).
    #[arg(long, env = env::TLS_ADDR)]
    pub tls_addr: Option<String>,
    /// Address clients are told to use for TLS (default: --tls-addr).
    #[arg(long, env = env::ADVERTISE_TLS_ADDR)]
    pub advertise_tls_addr: Option<String>,
    /// PEM certificate chain for the TLS client listener.
    #[arg(long, env = env::TLS_CERT)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS client listener.
    #[arg(long, env = env::TLS_KEY)]
    pub tls_key: Option<PathBuf>,
    /// Initial cluster members as id=host:port (their --cluster-addr addresses), comma separated, this node included.
    #[arg(long, env = env::PEERS)]
    pub peers: Option<String>,
    /// Bearer token required for admin calls (gRPC apps and membership calls, the admin HTTP
    /// server's JSON API and dashboard). Required when any listener is on a non-loopback address;
    /// unset on loopback: admin calls are open (the node warns at start). Prefer the env var or the
    /// file to the flag (a flag is visible in the process list).
    #[arg(long, env = env::ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Raft heartbeat interval in ms [default: 50].
    #[arg(long, env = env::RAFT_HEARTBEAT_MS)]
    pub raft_heartbeat_ms: Option<u64>,
    /// Raft election timeout in ms (randomized between it and twice it; openraft adds a leader lease of twice it) [default: 200].
    #[arg(long, env = env::ELECTION_TIMEOUT_MS)]
    pub election_timeout_ms: Option<u64>,
    /// Build a Raft snapshot after this many log entries [default: 50000].
    #[arg(long, env = env::SNAPSHOT_EVERY)]
    pub snapshot_every: Option<u64>,
    /// If the Raft log is damaged (entries lost or garbled), wipe this node's Raft state and catch
    /// up from the cluster instead of refusing to start; an intact log is kept [default: false].
    #[arg(long, env = env::REJOIN, num_args = 0..=1, default_missing_value = "true")]
    pub rejoin: Option<bool>,
    /// Shard groups holding users and topics, beside the metadata group (0: one Raft group holds
    /// everything). Fixed when the cluster is created: every node of a cluster names the same,
    /// and a data dir refuses another (docs/SCALING.md) [default: 0].
    #[arg(long, env = env::SHARDS)]
    pub shards: Option<u32>,
    /// How long a write waits for a leader and commit before it is reported indeterminate [default: 5000].
    #[arg(long, env = env::WRITE_TIMEOUT_MS)]
    pub write_timeout_ms: Option<u64>,
    /// Client heartbeat interval advertised to clients, in ms [default: 30000].
    #[arg(long, env = env::CLIENT_HEARTBEAT_MS)]
    pub client_heartbeat_ms: Option<u64>,
    /// Shortest heartbeat interval a client may use, in ms (the default drops to --client-heartbeat-ms when that is lower) [default: 5000].
    #[arg(long, env = env::CLIENT_HEARTBEAT_MIN_MS)]
    pub client_heartbeat_min_ms: Option<u64>,
    /// Longest heartbeat interval a client may adapt to, in ms (the default rises to --client-heartbeat-ms when that is higher) [default: 600000].
    #[arg(long, env = env::CLIENT_HEARTBEAT_MAX_MS)]
    pub client_heartbeat_max_ms: Option<u64>,
    /// Most client connections this node holds at once [default: 18000].
    #[arg(long, env = env::MAX_CONNECTIONS)]
    pub max_connections: Option<usize>,
    /// Largest client frame accepted, in bytes [default: 65536].
    #[arg(long, env = env::MAX_FRAME)]
    pub max_frame: Option<usize>,
    /// A connection that has not completed HELLO within this many ms is closed [default: 10000].
    #[arg(long, env = env::AUTH_TIMEOUT_MS)]
    pub auth_timeout_ms: Option<u64>,
    /// New connections accepted per second from one IP address (burst of the same size) [default: 1000].
    #[arg(long, env = env::ACCEPT_RATE_PER_IP)]
    pub accept_rate_per_ip: Option<u32>,
    /// Frames queued per connection before a slow consumer is disconnected [default: 1024].
    #[arg(long, env = env::SEND_QUEUE)]
    pub send_queue: Option<usize>,
    /// A peer unreachable this long is declared down and its sessions go offline [default: 10000].
    #[arg(long, env = env::NODE_DOWN_TIMEOUT_MS)]
    pub node_down_timeout_ms: Option<u64>,
    /// On SIGTERM, how long to wait for clients to move and deliveries to finish [default: 5000].
    #[arg(long, env = env::DRAIN_TIMEOUT_MS)]
    pub drain_timeout_ms: Option<u64>,
    /// Log format: "text" or "json" [default: text].
    #[arg(long, env = env::LOG_FORMAT)]
    pub log_format: Option<String>,
    /// Listen address of the admin HTTP server: /metrics (Prometheus), /healthz, /readyz, the
    /// dashboard at / and its JSON API under /api/ (empty: disabled).
    #[arg(long, env = env::ADMIN_ADDR)]
    pub admin_addr: Option<String>,
    /// Serve the admin HTTP server over HTTPS with the client TLS listener's --tls-cert and
    /// --tls-key (or with --admin-tls-cert and --admin-tls-key, which turn HTTPS on by themselves).
    #[arg(long, env = env::ADMIN_TLS, num_args = 0..=1, default_missing_value = "true")]
    pub admin_tls: Option<bool>,
    /// PEM certificate chain of the admin HTTPS server (with --admin-tls-key; default: --tls-cert
    /// when --admin-tls is set).
    #[arg(long, env = env::ADMIN_TLS_CERT)]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of the admin HTTPS server (with --admin-tls-cert; default: --tls-key when
    /// --admin-tls is set).
    #[arg(long, env = env::ADMIN_TLS_KEY)]
    pub admin_tls_key: Option<PathBuf>,
    /// Listen address of the WebSocket client listener (same frames as binary messages; empty: disabled).
    #[arg(long, env = env::WS_ADDR)]
    pub ws_addr: Option<String>,
    /// Address clients are told to use for WebSocket (default: --ws-addr).
    #[arg(long, env = env::ADVERTISE_WS_ADDR)]
    pub advertise_ws_addr: Option<String>,
    /// Listen address of the MQTT 3.1.1 / 5.0 listener (plain TCP; user name = app id, password =
    /// client token, client id = device; see docs/MQTT.md; empty: disabled).
    #[arg(long, env = env::MQTT_ADDR)]
    pub mqtt_addr: Option<String>,
    /// Listen address of the MQTT listener over TLS (the certificate of --tls-cert/--tls-key;
    /// empty: disabled).
    #[arg(long, env = env::MQTT_TLS_ADDR)]
    pub mqtt_tls_addr: Option<String>,
    /// MySQL/MariaDB URL of the cold archive, e.g. mysql://user:pass@host:3306/herald (empty:
    /// no archive). Acked, expired and trimmed messages are written there by the leader.
    #[arg(long, env = env::ARCHIVE_URL, hide_env_values = true)]
    pub archive_url: Option<String>,
    /// Archived messages written to MySQL per INSERT [default: 500].
    #[arg(long, env = env::ARCHIVE_BATCH)]
    pub archive_batch: Option<usize>,
}

macro_rules! merge_fields {
    ($hi:expr, $lo:expr, $($f:ident),* $(,)?) => {
        NodeOptions { $($f: $hi.$f.or($lo.$f),)* }
    };
}

impl NodeOptions {
    /// Field-by-field: a value in `self` wins over one in `lower`.
    pub fn over(self, lower: NodeOptions) -> NodeOptions {
        merge_fields!(
            self,
            lower,
            id,
            data_dir,
            grpc_addr,
            advertise_grpc_addr,
            grpc_tls,
            grpc_tls_cert,
            grpc_tls_key,
            cluster_addr,
            advertise_cluster_addr,
            cluster_ca,
            cluster_cert,
            cluster_key,
            insecure_cluster,
            client_addr,
            advertise_client_addr,
            tls_addr,
            advertise_tls_addr,
            tls_cert,
            tls_key,
            peers,
            admin_token,
            raft_heartbeat_ms,
            election_timeout_ms,
            snapshot_every,
            rejoin,
            shards,
            write_timeout_ms,
            client_heartbeat_ms,
            client_heartbeat_min_ms,
            client_heartbeat_max_ms,
            max_connections,
            max_frame,
            auth_timeout_ms,
            accept_rate_per_ip,
            send_queue,
            node_down_timeout_ms,
            drain_timeout_ms,
            log_format,
            admin_addr,
            admin_tls,
            admin_tls_cert,
            admin_tls_key,
            ws_addr,
            advertise_ws_addr,
            mqtt_addr,
            mqtt_tls_addr,
            archive_url,
            archive_batch,
        )
    }

    /// Reads a TOML file holding any of the options.
    pub fn from_file(path: &Path) -> Result<NodeOptions, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
    }
}

/// The cluster plane's certificate files (checked to exist; parsed when the node starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A configuration problem, worded for the person starting the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Most shard groups a cluster may have (each costs every replica a state machine and a timer).
pub const MAX_SHARDS: u32 = 256;

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub grpc_advertise: String,
    /// TLS for the gRPC API, or `None` for plaintext.
    pub grpc_tls: Option<TlsFiles>,
    pub cluster_listen: SocketAddr,
    /// What `--peers` and membership name this node by.
    pub cluster_advertise: String,
    /// Mutual TLS of the cluster plane (CA bundle, certificate, key), or `None` with
    /// `--insecure-cluster`.
    pub cluster_tls: Option<ClusterTlsFiles>,
    pub client_listen: Option<SocketAddr>,
    pub client_advertise: String,
    pub tls_listen: Option<SocketAddr>,
    pub tls_advertise: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub peers: BTreeMap<u64, String>,
    pub admin_token: Option<String>,
    pub raft_heartbeat: Duration,
    pub election_timeout: Duration,
    pub snapshot_every: u64,
    pub rejoin: bool,
    pub shards: u32,
    pub write_timeout: Duration,
    pub client_heartbeat: Duration,
    pub client_heartbeat_min: Duration,
    pub client_heartbeat_max: Duration,
    pub max_connections: usize,
    pub max_frame: usize,
    pub auth_timeout: Duration,
    pub accept_rate_per_ip: u32,
    pub send_queue: usize,
    pub node_down_timeout: Duration,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub admin_listen: Option<SocketAddr>,
    /// Certificate and key of the admin HTTP server: HTTPS when set, plain HTTP otherwise.
    pub admin_tls: Option<TlsFiles>,
    pub ws_listen: Option<SocketAddr>,
    pub ws_advertise: String,
    pub mqtt_listen: Option<SocketAddr>,
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// The cold archive's MySQL URL (validated as a mysql:// URL), if any.
    pub archive_url: Option<String>,
    pub archive_batch: usize,
}

impl NodeOptions {
    /// Applies defaults and checks everything; the error names the option and what is wrong.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let id = self.id.ok_or_else(|| missing("id", env::ID))?;
        if id == 0 {
            return Err(ConfigError(
                "--id must be a positive integer (0 is reserved)".into(),
            ));
        }
        let data_dir = self.data_dir.ok_or_else(|| missing("data-dir", env::DATA_DIR))?;
        if data_dir.exists() && !data_dir.is_dir() {
            return Err(ConfigError(format!(
                "--data-dir {} exists and is not a directory",
                data_dir.display()
            )));
        }
        let grpc_raw = self
            .grpc_addr
            .ok_or_else(|| missing("grpc-addr", env::GRPC_ADDR))?;
        let grpc_listen = parse_addr("grpc-addr", &grpc_raw)?;
        let grpc_advertise = advertise("grpc", grpc_listen, self.advertise_grpc_addr)?;
        let client_listen = optional_addr("client-addr", self.client_addr)?;
        let client_advertise = match client_listen {
            Some(a) => advertise("client", a, self.advertise_client_addr)?,
            None => String::new(),
        };
        let tls_listen = optional_addr("tls-addr", self.tls_addr)?;
        let tls_advertise = match tls_listen {
            Some(a) => {
                if self.tls_cert.is_none() || self.tls_key.is_none() {
                    return Err(ConfigError("--tls-addr needs --tls-cert and --tls-key".into()));
                }
                advertise("tls", a, self.advertise_tls_addr)?
            }
            None => String::new(),
        };
        for (name, p) in [("tls-cert", &self.tls_cert), ("tls-key", &self.tls_key)] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(ConfigError(format!("--{name} {}: no such file", p.display())));
                }
            }
        }
        let cluster_raw = self
            .cluster_addr
            .ok_or_else(|| missing("cluster-addr", env::CLUSTER_ADDR))?;
        let cluster_listen = parse_addr("cluster-addr", &cluster_raw)?;
        let cluster_advertise = advertise("cluster", cluster_listen, self.advertise_cluster_addr)?;
        if cluster_listen == grpc_listen {
            return Err(ConfigError(format!(
                "--cluster-addr and --grpc-addr are both {grpc_listen}: the cluster plane needs its own port"
            )));
        }
        let cluster_tls = cluster_tls(
            self.insecure_cluster.unwrap_or(false),
            self.cluster_ca,
            self.cluster_cert,
            self.cluster_key,
        )?;
        let grpc_tls = grpc_tls(
            self.grpc_tls.unwrap_or(self.grpc_tls_cert.is_some()),
            self.grpc_tls_cert.or(self.tls_cert.clone()),
            self.grpc_tls_key.or(self.tls_key.clone()),
        )?;
        let peers_raw = self.peers.ok_or_else(|| missing("peers", env::PEERS))?;
        let peers = parse_peers(&peers_raw)?;
        match peers.get(&id) {
            None => {
                return Err(ConfigError(format!(
                    "--id {id} is not in --peers ({}); list this node too",
                    peers.keys().map(|k| k.to_string()).collect::<Vec<_>>().join(",")
                )))
            }
            Some(a) if *a != cluster_advertise => {
                return Err(ConfigError(format!(
                    "--peers says node {id} is at {a}, but this node's cluster plane is at {cluster_advertise} (--peers lists --cluster-addr addresses)"
                )))
            }
            Some(_) => {}
        }
        let raft_heartbeat =
            Duration::from_millis(positive("raft-heartbeat-ms", self.raft_heartbeat_ms, 50)?);
        let election_timeout =
            Duration::from_millis(positive("election-timeout-ms", self.election_timeout_ms, 200)?);
        if election_timeout <= raft_heartbeat * 2 {
            return Err(ConfigError(format!(
                "--election-timeout-ms ({}) must be more than twice --raft-heartbeat-ms ({})",
                election_timeout.as_millis(),
                raft_heartbeat.as_millis()
            )));
        }
        let max_frame = self.max_frame.unwrap_or(herald_proto::frame::DEFAULT_MAX_FRAME);
        if !(256..=16 * 1024 * 1024).contains(&max_frame) {
            return Err(ConfigError(format!(
                "--max-frame {max_frame} must be between 256 and 16777216"
            )));
        }
        let client_heartbeat = positive("client-heartbeat-ms", self.client_heartbeat_ms, 30_000)?;
        let client_heartbeat_min = positive(
            "client-heartbeat-min-ms",
            self.client_heartbeat_min_ms,
            5_000.min(client_heartbeat),
        )?;
        let client_heartbeat_max = positive(
            "client-heartbeat-max-ms",
            self.client_heartbeat_max_ms,
            600_000.max(client_heartbeat),
        )?;
        if !(client_heartbeat_min..=client_heartbeat_max).contains(&client_heartbeat) {
            return Err(ConfigError(format!(
                "--client-heartbeat-ms {client_heartbeat} must lie between --client-heartbeat-min-ms {client_heartbeat_min} and --client-heartbeat-max-ms {client_heartbeat_max}"
            )));
        }
        let admin_listen = optional_addr("admin-addr", self.admin_addr)?;
        let admin_tls = admin_tls(
            self.admin_tls.unwrap_or(false),
            (self.admin_tls_cert, self.admin_tls_key),
            (&self.tls_cert, &self.tls_key),
        )?;
        let ws_listen = optional_addr("ws-addr", self.ws_addr)?;
        let mqtt_listen = optional_addr("mqtt-addr", self.mqtt_addr)?;
        let mqtt_tls_listen = optional_addr("mqtt-tls-addr", self.mqtt_tls_addr)?;
        if mqtt_tls_listen.is_some() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(ConfigError(
                "--mqtt-tls-addr needs --tls-cert and --tls-key".into(),
            ));
        }
        let ws_advertise = match ws_listen {
            Some(a) => advertise("ws", a, self.advertise_ws_addr)?,
            None => String::new(),
        };
        let archive_url = match self.archive_url.map(|u| u.trim().to_string()) {
            Some(u) if !u.is_empty() => {
                if !u.starts_with("mysql://") {
                    return Err(ConfigError(
                        "--archive-url must be a mysql:// URL (mysql://user:pass@host:port/database)".into(),
                    ));
                }
                if mysql_async::Opts::from_url(&u).is_err() {
                    return Err(ConfigError(
                        "--archive-url is not a valid MySQL URL (mysql://user:pass@host:port/database)"
                            .into(),
                    ));
                }
                Some(u)
            }
            _ => None,
        };
        let archive_batch = positive("archive-batch", self.archive_batch.map(|v| v as u64), 500)? as usize;
        let admin_token = self.admin_token.filter(|t| !t.is_empty());
        if admin_token.is_none() {
            let listeners = [
                ("grpc-addr", Some(grpc_listen)),
                ("cluster-addr", Some(cluster_listen)),
                ("client-addr", client_listen),
                ("tls-addr", tls_listen),
                ("ws-addr", ws_listen),
                ("mqtt-addr", mqtt_listen),
                ("mqtt-tls-addr", mqtt_tls_listen),
                ("admin-addr", admin_listen),
            ];
            if let Some((flag, a)) = listeners
                .iter()
                .find_map(|(f, a)| a.filter(|a| !a.ip().is_loopback()).map(|a| (f, a)))
            {
                return Err(ConfigError(format!(
                    "--{flag} {a} is reachable from other machines, so the node needs an admin token: set \
                     --admin-token (or {}, or `admin_token` in the config file) to a long random secret, \
                     e.g. the output of `openssl rand -hex 32`; without one, only loopback addresses are allowed",
                    env::ADMIN_TOKEN
                )));
            }
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError(format!(
                    "--log-format {other:?}: expected \"text\" or \"json\""
                )))
            }
        };
        Ok(NodeConfig {
            id,
            data_dir,
            grpc_listen,
            grpc_advertise,
            grpc_tls,
            cluster_listen,
            cluster_advertise,
            cluster_tls,
            client_listen,
            client_advertise,
            tls_listen,
            tls_advertise,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            peers,
            admin_token,
            raft_heartbeat,
            election_timeout,
            snapshot_every: positive("snapshot-every", self.snapshot_every, 50_000)?,
            rejoin: self.rejoin.unwrap_or(false),
            shards: match self.shards.unwrap_or(0) {
                n @ 0..=MAX_SHARDS => n,
                n => return Err(ConfigError(format!("--shards {n}: at most {MAX_SHARDS}"))),
            },
            write_timeout: Duration::from_millis(positive("write-timeout-ms", self.write_timeout_ms, 5_000)?),
            client_heartbeat: Duration::from_millis(client_heartbeat),
            client_heartbeat_min: Duration::from_millis(client_heartbeat_min),
            client_heartbeat_max: Duration::from_millis(client_heartbeat_max),
            max_connections: positive("max-connections", self.max_connections.map(|v| v as u64), 18_000)?
                as usize,
            max_frame,
            auth_timeout: Duration::from_millis(positive("auth-timeout-ms", self.auth_timeout_ms, 10_000)?),
            accept_rate_per_ip: positive("accept-rate-per-ip", self.accept_rate_per_ip.map(u64::from), 1000)?
                as u32,
            send_queue: positive("send-queue", self.send_queue.map(|v| v as u64), 1024)? as usize,
            node_down_timeout: Duration::from_millis(positive(
                "node-down-timeout-ms",
                self.node_down_timeout_ms,
                10_000,
            )?),
            drain_timeout: Duration::from_millis(positive("drain-timeout-ms", self.drain_timeout_ms, 5_000)?),
            log_format,
            admin_listen,
            admin_tls,
            ws_listen,
            ws_advertise,
            mqtt_listen,
            mqtt_tls_listen,
            archive_url,
            archive_batch,
        })
    }
}

/// Mutual TLS files for the cluster plane, or `None` when `--insecure-cluster` is set; each file
/// must exist. Both at once, or neither, is an error.
fn cluster_tls(
    insecure: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<ClusterTlsFiles>, ConfigError> {
    let given = [&ca, &cert, &key].iter().any(|p| p.is_some());
    if insecure {
        if given {
            return Err(ConfigError(
                "--insecure-cluster and --cluster-ca/--cluster-cert/--cluster-key exclude each other".into(),
            ));
        }
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
        return Err(ConfigError(
            "the cluster plane needs --cluster-ca, --cluster-cert and --cluster-key (make them with `herald certs`), \
             or --insecure-cluster for plaintext, unauthenticated node-to-node traffic"
                .into(),
        ));
    };
    for (name, p) in [
        ("cluster-ca", &ca),
        ("cluster-cert", &cert),
        ("cluster-key", &key),
    ] {
        if !p.is_file() {
            return Err(ConfigError(format!("--{name} {}: no such file", p.display())));
        }
    }
    Ok(Some(ClusterTlsFiles { ca, cert, key }))
}

/// The gRPC API's certificate and key when it serves TLS: with `--grpc-tls`, or when a
/// `--grpc-tls-cert` of its own is given.
fn grpc_tls(on: bool, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>, ConfigError> {
    if !on {
        return Ok(None);
    }
    match (cert, key) {
        (Some(c), Some(k)) => {
            for p in [&c, &k] {
                if !p.is_file() {
                    return Err(ConfigError(format!(
                        "gRPC API TLS: {}: no such file",
                        p.display()
                    )));
                }
            }
            Ok(Some(TlsFiles { cert: c, key: k }))
        }
        _ => Err(ConfigError(
            "--grpc-tls needs a certificate and key: --grpc-tls-cert/--grpc-tls-key or --tls-cert/--tls-key"
                .into(),
        )),
    }
}

/// The admin server's certificate and key: its own pair (which turns HTTPS on), else the client
/// TLS listener's pair when `on` (`--admin-tls`), else none (plain HTTP).
fn admin_tls(
    on: bool,
    own: (Option<PathBuf>, Option<PathBuf>),
    client: (&Option<PathBuf>, &Option<PathBuf>),
) -> Result<Option<TlsFiles>, ConfigError> {
    let files = match own {
        (Some(cert), Some(key)) => TlsFiles { cert, key },
        (Some(_), None) | (None, Some(_)) => {
            return Err(ConfigError(
                "--admin-tls-cert and --admin-tls-key go together (or set neither and use --admin-tls \
                 with --tls-cert and --tls-key)"
                    .into(),
            ))
        }
        (None, None) if !on => return Ok(None),
        (None, None) => match client {
            (Some(cert), Some(key)) => TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => {
                return Err(ConfigError(
                    "--admin-tls needs a certificate: --tls-cert and --tls-key, or --admin-tls-cert and \
                     --admin-tls-key"
                        .into(),
                ))
            }
        },
    };
    for (name, p) in [("admin-tls-cert", &files.cert), ("admin-tls-key", &files.key)] {
        if !p.is_file() {
            return Err(ConfigError(format!("--{name} {}: no such file", p.display())));
        }
    }
    Ok(Some(files))
}

fn missing(flag: &str, env: &str) -> ConfigError {
    ConfigError(format!(
        "missing --{flag} (or {env}, or `{}` in the config file)",
        flag.replace('-', "_")
    ))
}

fn positive(flag: &str, v: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match v {
        Some(0) => Err(ConfigError(format!("--{flag} must be greater than 0"))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn parse_addr(flag: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = raw.parse::<SocketAddr>() {
        return Ok(a);
    }
    raw.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| ConfigError(format!("--{flag} {raw:?} is not a host:port address")))
}

fn optional_addr(flag: &str, raw: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    match raw {
        Some(r) if !r.trim().is_empty() => parse_addr(flag, r.trim()).map(Some),
        _ => Ok(None),
    }
}

/// The address others should use: explicit, else the listen address if it is a concrete one.
fn advertise(what: &str, listen: SocketAddr, explicit: Option<String>) -> Result<String, ConfigError> {
    match explicit {
        Some(a) if !a.trim().is_empty() => {
            parse_addr(&format!("advertise-{what}-addr"), a.trim())?;
            Ok(a.trim().to_string())
        }
        _ if listen.ip().is_unspecified() => Err(ConfigError(format!(
            "--{what}-addr {listen} listens on all interfaces; set --advertise-{what}-addr to the address others reach"
        ))),
        _ if listen.port() == 0 => Err(ConfigError(format!("--{what}-addr {listen}: port 0 cannot be advertised"))),
        _ => Ok(listen.to_string()),
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(raw: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("--peers entry {part:?} is not id=host:port")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| ConfigError(format!("--peers entry {part:?}: {id:?} is not a node id")))?;
        if id == 0 {
            return Err(ConfigError(format!(
                "--peers entry {part:?}: node id 0 is reserved"
            )));
        }
        let addr = addr.trim();
        parse_addr("peers", addr)?;
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(ConfigError(format!("--peers names node {id} twice")));
        }
    }
    if peers.is_empty() {
        return Err(ConfigError("--peers is empty".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (id, a) in &peers {
        if !seen.insert(a) {
            return Err(ConfigError(format!(
                "--peers gives node {id} the address {a} of another node"
            )));
        }
    }
    Ok(peers)
}

/// The option reference (`docs/CONFIG.md`), generated from the clap definitions of
/// [`NodeOptions`]: flag, environment variable, TOML key (the field name), default and meaning.
/// A test compares it with the committed file, so the document cannot drift from the code.
pub fn reference_markdown() -> String {
    use clap::Args;
    let cmd = NodeOptions::augment_args(clap::Command::new("node"));
    let mut out = String::new();
    out.push_str("# Herald node configuration reference\n\n");
    out.push_str(
        "<!-- Generated from node/src/config.rs by `HERALD_UPDATE_DOCS=1 cargo test -p herald-node --lib config_reference`; do not edit by hand. -->\n\n",
    );
    out.push_str(
        "Every option of `herald node` can be given as a flag, as an environment variable, or as a key of the\n\
         TOML file named by `--config` (`HERALD_CONFIG`). Flags win over environment variables, which win\n\
         over the file, which wins over the defaults. Durations are in milliseconds (`_ms`). An empty\n\
         address disables that listener.\n\n",
    );
    out.push_str("| flag | env var | TOML key | default | meaning |\n|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| `--config` | `{}` | — | — | TOML file with any of the options below (flags and env vars win over it). |\n",
        env::CONFIG
    ));
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let long = arg.get_long().map(|l| format!("`--{l}`")).unwrap_or_default();
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "—".into());
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let (meaning, default) = match help.rfind(" [default: ") {
            Some(i) if help.ends_with(']') => (
                help[..i].to_string(),
                help[i + " [default: ".len()..help.len() - 1].to_string(),
            ),
            _ => (help.clone(), "—".to_string()),
        };
        let cell = |s: &str| s.replace('|', "\\|");
        out.push_str(&format!(
            "| {long} | {env} | `{id}` | {} | {} |\n",
            cell(&default),
            cell(&meaning)
        ));
    }
    out.push_str(
        "\nExample `herald.toml`:\n\n```toml\nid = 1\ndata_dir = \"/var/lib/herald\"\n\
         grpc_addr = \"10.0.0.1:7401\"\nclient_addr = \"10.0.0.1:7411\"\nws_addr = \"10.0.0.1:7441\"\n\
         admin_addr = \"10.0.0.1:7431\"\npeers = \"1=10.0.0.1:7401,2=10.0.0.2:7401,3=10.0.0.3:7401\"\n```\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NodeOptions {
        NodeOptions {
            id: Some(1),
            data_dir: Some(PathBuf::from("/tmp/herald-config-test")),
            grpc_addr: Some("127.0.0.1:7001".into()),
            cluster_addr: Some("127.0.0.1:7101".into()),
            insecure_cluster: Some(true),
            peers: Some("1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into()),
            ..Default::default()
        }
    }

    fn err(o: NodeOptions) -> String {
        o.resolve().unwrap_err().0
    }

    #[test]
    fn a_complete_config_resolves_with_defaults() {
        let c = base().resolve().unwrap();
        assert_eq!(c.peers.len(), 3);
        assert_eq!(c.grpc_advertise, "127.0.0.1:7001");
        assert_eq!(c.max_frame, 65536);
        assert!(c.client_listen.is_none());
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        assert!(err(NodeOptions { id: None, ..base() }).contains("missing --id (or HERALD_ID"));
        assert!(err(NodeOptions {
            data_dir: None,
            ..base()
        })
        .contains("missing --data-dir"));
        assert!(err(NodeOptions {
            grpc_addr: Some("nonsense".into()),
            ..base()
        })
        .contains("not a host:port"));
        assert!(err(NodeOptions {
            id: Some(4),
            ..base()
        })
        .contains("--id 4 is not in --peers"));
        assert!(err(NodeOptions {
            peers: Some("1=127.0.0.1:7001,1=127.0.0.1:7002".into()),
            ..base()
        })
        .contains("twice"));
        assert!(err(NodeOptions {
            peers: Some("1:127.0.0.1:7001".into()),
            ..base()
        })
        .contains("not id=host:port"));
        assert!(err(NodeOptions {
            peers: Some("1=127.0.0.1:7009".into()),
            ..base()
        })
        .contains("cluster plane is at 127.0.0.1:7101"));
        assert!(err(NodeOptions {
            grpc_addr: Some("0.0.0.0:7001".into()),
            ..base()
        })
        .contains("advertise-grpc-addr"));
        assert!(err(NodeOptions {
            raft_heartbeat_ms: Some(0),
            ..base()
        })
        .contains("greater than 0"));
        assert!(err(NodeOptions {
            tls_addr: Some("127.0.0.1:7443".into()),
            ..base()
        })
        .contains("--tls-cert"));
        assert!(err(NodeOptions {
            log_format: Some("xml".into()),
            ..base()
        })
        .contains("expected"));
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(err(NodeOptions {
            data_dir: Some(file.path().into()),
            ..base()
        })
        .contains("not a directory"));
    }

    #[test]
    fn flags_beat_the_file() {
        let file: NodeOptions = toml::from_str("id = 2\nmax_frame = 1024\ndata_dir = \"/x\"").unwrap();
        let merged = NodeOptions {
            id: Some(1),
            ..Default::default()
        }
        .over(file);
        assert_eq!(merged.id, Some(1));
        assert_eq!(merged.max_frame, Some(1024));
        assert_eq!(merged.data_dir, Some(PathBuf::from("/x")));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<NodeOptions>("idd = 2").is_err());
    }

    #[test]
    fn config_reference_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIG.md");
        let want = reference_markdown();
        if std::env::var_os("HERALD_UPDATE_DOCS").is_some_and(|v| v == "1") {
            std::fs::write(&path, &want).expect("write docs/CONFIG.md");
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/CONFIG.md is out of date with the options in node/src/config.rs; regenerate it with \
             `HERALD_UPDATE_DOCS=1 cargo test -p herald-node --lib config_reference` and commit it"
        );
    }

    /// The resolved value of option `id` in `c`, as the reference's default column writes it;
    /// `None` for options without a default (required, or off when unset).
    fn resolved(c: &NodeConfig, id: &str) -> Option<String> {
        let ms = |d: Duration| Some(d.as_millis().to_string());
        match id {
            "raft_heartbeat_ms" => ms(c.raft_heartbeat),
            "election_timeout_ms" => ms(c.election_timeout),
            "snapshot_every" => Some(c.snapshot_every.to_string()),
            "rejoin" => Some(c.rejoin.to_string()),
            "shards" => Some(c.shards.to_string()),
            "write_timeout_ms" => ms(c.write_timeout),
            "client_heartbeat_ms" => ms(c.client_heartbeat),
            "client_heartbeat_min_ms" => ms(c.client_heartbeat_min),
            "client_heartbeat_max_ms" => ms(c.client_heartbeat_max),
            "max_connections" => Some(c.max_connections.to_string()),
            "max_frame" => Some(c.max_frame.to_string()),
            "auth_timeout_ms" => ms(c.auth_timeout),
            "accept_rate_per_ip" => Some(c.accept_rate_per_ip.to_string()),
            "send_queue" => Some(c.send_queue.to_string()),
            "node_down_timeout_ms" => ms(c.node_down_timeout),
            "drain_timeout_ms" => ms(c.drain_timeout),
            "log_format" => Some(
                match c.log_format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
                .to_string(),
            ),
            "archive_batch" => Some(c.archive_batch.to_string()),
            "id" | "data_dir" | "grpc_addr" | "peers" | "cluster_addr" => None,
            "insecure_cluster" => {
                assert!(c.cluster_tls.is_none(), "base() asks for plaintext");
                None
            }
            "advertise_cluster_addr" => {
                assert_eq!(
                    c.cluster_advertise,
                    c.cluster_listen.to_string(),
                    "defaults to --cluster-addr"
                );
                None
            }
            "cluster_ca" | "cluster_cert" | "cluster_key" => None,
            "grpc_tls" => Some((c.grpc_tls.is_some()).to_string()),
            "grpc_tls_cert" | "grpc_tls_key" => {
                assert!(c.grpc_tls.is_none());
                None
            }
            "advertise_grpc_addr" => {
                assert_eq!(
                    c.grpc_advertise,
                    c.grpc_listen.to_string(),
                    "defaults to --grpc-addr"
                );
                None
            }
            "client_addr" | "advertise_client_addr" => {
                assert!(c.client_listen.is_none() && c.client_advertise.is_empty());
                None
            }
            "tls_addr" | "advertise_tls_addr" | "tls_cert" | "tls_key" => {
                assert!(c.tls_listen.is_none() && c.tls_cert.is_none() && c.tls_key.is_none());
                None
            }
            "admin_token" => {
                assert!(c.admin_token.is_none());
                None
            }
            "admin_addr" => {
                assert!(c.admin_listen.is_none());
                None
            }
            "admin_tls" | "admin_tls_cert" | "admin_tls_key" => {
                assert!(c.admin_tls.is_none(), "plain HTTP unless asked");
                None
            }
            "ws_addr" | "advertise_ws_addr" => {
                assert!(c.ws_listen.is_none() && c.ws_advertise.is_empty());
                None
            }
            "mqtt_addr" | "mqtt_tls_addr" => {
                assert!(c.mqtt_listen.is_none() && c.mqtt_tls_listen.is_none());
                None
            }
            "archive_url" => {
                assert!(c.archive_url.is_none());
                None
            }
            other => panic!("option {other} is new: say in `resolved` what it resolves to by default"),
        }
    }

    /// The `[default: ...]` of every option's help (the reference's default column) is what an
    /// otherwise empty config resolves to, and every option that has a default documents it.
    #[test]
    fn documented_defaults_are_the_resolved_defaults() {
        use clap::Args;
        let cmd = NodeOptions::augment_args(clap::Command::new("node"));
        let c = base().resolve().unwrap();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            let documented = help
                .rfind(" [default: ")
                .filter(|_| help.ends_with(']'))
                .map(|i| help[i + " [default: ".len()..help.len() - 1].to_string());
            assert_eq!(
                documented,
                resolved(&c, id),
                "--{}: the documented default (left) is not the resolved one (right)",
                id.replace('_', "-")
            );
            checked += usize::from(documented.is_some());
        }
        assert_eq!(checked, 19, "options with a default");
        // The two defaults that follow another option, as their help says.
        let low = NodeOptions {
            client_heartbeat_ms: Some(1_000),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(low.client_heartbeat_min, Duration::from_millis(1_000));
        let high = NodeOptions {
            client_heartbeat_ms: Some(900_000),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(high.client_heartbeat_max, Duration::from_millis(900_000));
    }

    #[test]
    fn every_option_has_a_flag_an_env_var_and_a_meaning() {
        use clap::Args;
        let cmd = NodeOptions::augment_args(clap::Command::new("node"));
        let doc = reference_markdown();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            assert!(arg.get_long().is_some(), "{id} has no flag");
            let env = arg.get_env().unwrap_or_else(|| panic!("{id} has no env var"));
            assert!(env.to_string_lossy().starts_with("HERALD_"), "{id}");
            assert!(arg.get_help().is_some(), "{id} has no help");
            assert!(
                doc.contains(&format!("`{id}`")),
                "{id} missing from the reference"
            );
        }
        // The TOML key of every option is its field name.
        let file: NodeOptions =
            toml::from_str("admin_addr = \"127.0.0.1:1\"\nws_addr = \"127.0.0.1:2\"\narchive_batch = 7")
                .unwrap();
        assert_eq!(file.archive_batch, Some(7));
        assert_eq!(file.ws_addr.as_deref(), Some("127.0.0.1:2"));
    }

    #[test]
    fn the_cluster_plane_needs_certificates_or_an_explicit_insecure_flag() {
        let plain = NodeOptions {
            insecure_cluster: None,
            ..base()
        };
        let e = err(plain.clone());
        assert!(
            e.contains("--cluster-ca") && e.contains("--insecure-cluster"),
            "{e}"
        );
        assert!(err(NodeOptions {
            cluster_addr: None,
            ..base()
        })
        .contains("missing --cluster-addr"));
        assert!(err(NodeOptions {
            cluster_addr: Some("127.0.0.1:7001".into()),
            peers: Some("1=127.0.0.1:7001".into()),
            ..base()
        })
        .contains("needs its own port"));
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, "x").unwrap();
            Some(p)
        };
        let with_files = NodeOptions {
            cluster_ca: f("ca.pem"),
            cluster_cert: f("node.pem"),
            cluster_key: f("node.key"),
            ..plain
        };
        let c = with_files.clone().resolve().unwrap();
        assert_eq!(c.cluster_tls.unwrap().ca, dir.path().join("ca.pem"));
        assert!(err(NodeOptions {
            insecure_cluster: Some(true),
            ..with_files.clone()
        })
        .contains("exclude each other"));
        assert!(err(NodeOptions {
            cluster_key: Some(dir.path().join("missing.key")),
            ..with_files
        })
        .contains("--cluster-key"));
        // The gRPC API's TLS falls back to the client TLS files.
        let c = NodeOptions {
            grpc_tls: Some(true),
            tls_cert: f("tls.pem"),
            tls_key: f("tls.key"),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            c.grpc_tls,
            Some(TlsFiles {
                cert: dir.path().join("tls.pem"),
                key: dir.path().join("tls.key"),
            })
        );
        assert!(err(NodeOptions {
            grpc_tls: Some(true),
            ..base()
        })
        .contains("--grpc-tls needs"));
    }

    #[test]
    fn new_listeners_and_the_archive_resolve() {
        let c = NodeOptions {
            admin_addr: Some("127.0.0.1:7431".into()),
            ws_addr: Some("127.0.0.1:7441".into()),
            archive_url: Some("mysql://root@127.0.0.1:3306/herald".into()),
            ..base()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.ws_advertise, "127.0.0.1:7441");
        assert!(c.admin_listen.is_some());
        assert_eq!(c.archive_batch, 500);
        assert!(err(NodeOptions {
            archive_url: Some("postgres://x".into()),
            ..base()
        })
        .contains("mysql://"));
        assert!(err(NodeOptions {
            ws_addr: Some("0.0.0.0:7441".into()),
            ..base()
        })
        .contains("advertise-ws-addr"));
    }

    #[test]
    fn a_non_loopback_listener_needs_an_admin_token() {
        let public = |o: NodeOptions| NodeOptions {
            grpc_addr: Some("0.0.0.0:7001".into()),
            advertise_grpc_addr: Some("127.0.0.1:7001".into()),
            ..o
        };
        let e = err(public(base()));
        assert!(e.contains("--grpc-addr 0.0.0.0:7001"), "{e}");
        assert!(
            e.contains("--admin-token") && e.contains("HERALD_ADMIN_TOKEN"),
            "{e}"
        );
        // Every listener counts, the admin server's included.
        for (flag, o) in [
            (
                "--client-addr",
                NodeOptions {
                    client_addr: Some("10.1.2.3:7411".into()),
                    ..base()
                },
            ),
            (
                "--tls-addr",
                NodeOptions {
                    tls_addr: Some("10.1.2.3:7421".into()),
                    tls_cert: Some("Cargo.toml".into()),
                    tls_key: Some("Cargo.toml".into()),
                    ..base()
                },
            ),
            (
                "--ws-addr",
                NodeOptions {
                    ws_addr: Some("10.1.2.3:7441".into()),
                    ..base()
                },
            ),
            (
                "--admin-addr",
                NodeOptions {
                    admin_addr: Some("0.0.0.0:7431".into()),
                    ..base()
                },
            ),
            (
                "--admin-addr",
                NodeOptions {
                    admin_addr: Some("[::]:7431".into()),
                    ..base()
                },
            ),
        ] {
            let e = err(o);
            assert!(e.contains(flag) && e.contains("--admin-token"), "{flag}: {e}");
        }
        // With a token it starts; an empty token counts as none.
        let c = public(NodeOptions {
            admin_token: Some("a-long-random-admin-token".into()),
            ..base()
        })
        .resolve()
        .unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("a-long-random-admin-token"));
        assert!(err(public(NodeOptions {
            admin_token: Some(String::new()),
            ..base()
        }))
        .contains("--admin-token"));
        // Loopback only (IPv4, IPv6, a name that resolves to loopback): no token needed.
        let c = NodeOptions {
            admin_addr: Some("[::1]:7431".into()),
            ws_addr: Some("localhost:7441".into()),
            ..base()
        }
        .resolve()
        .unwrap();
        assert!(c.admin_token.is_none());
    }

    #[test]
    fn admin_tls_uses_its_own_files_or_the_client_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, "pem").unwrap();
            p
        };
        let (cert, key, acert, akey) = (file("c.pem"), file("k.pem"), file("ac.pem"), file("ak.pem"));
        let client = NodeOptions {
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            ..base()
        };
        // The client listener's files alone do not turn HTTPS on.
        assert_eq!(client.clone().resolve().unwrap().admin_tls, None);
        let on = NodeOptions {
            admin_tls: Some(true),
            ..client.clone()
        };
        assert_eq!(
            on.clone().resolve().unwrap().admin_tls,
            Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone()
            })
        );
        // Its own pair wins, and turns HTTPS on by itself.
        let own = NodeOptions {
            admin_tls_cert: Some(acert.clone()),
            admin_tls_key: Some(akey.clone()),
            ..client.clone()
        };
        let want = Some(TlsFiles {
            cert: acert.clone(),
            key: akey.clone(),
        });
        assert_eq!(own.clone().resolve().unwrap().admin_tls, want);
        assert_eq!(
            NodeOptions {
                admin_tls: Some(true),
                ..own.clone()
            }
            .resolve()
            .unwrap()
            .admin_tls,
            want
        );
        // Errors: no certificate at all, half a pair, a missing file.
        assert!(err(NodeOptions {
            admin_tls: Some(true),
            ..base()
        })
        .contains("--admin-tls needs a certificate"));
        assert!(err(NodeOptions {
            admin_tls_key: None,
            ..own.clone()
        })
        .contains("go together"));
        assert!(err(NodeOptions {
            admin_tls_key: Some(dir.path().join("nope.pem")),
            ..own
        })
        .contains("no such file"));
        // `--admin-tls` is a flag (a bare `--admin-tls` means true) and a boolean env var / key.
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            o: NodeOptions,
        }
        let cli = Cli::try_parse_from(["node", "--admin-tls", "--id", "3"]).unwrap();
        assert_eq!((cli.o.admin_tls, cli.o.id), (Some(true), Some(3)));
        let cli = Cli::try_parse_from(["node", "--admin-tls=false"]).unwrap();
        assert_eq!(cli.o.admin_tls, Some(false));
        let file: NodeOptions = toml::from_str("admin_tls = true").unwrap();
        assert_eq!(file.admin_tls, Some(true));
    }
}
