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
    pub const ADMIN_TOKEN: &str = "HERALD_ADMIN_TOKEN";
    pub const RAFT_HEARTBEAT_MS: &str = "HERALD_RAFT_HEARTBEAT_MS";
    pub const ELECTION_TIMEOUT_MS: &str = "HERALD_ELECTION_TIMEOUT_MS";
    pub const SNAPSHOT_EVERY: &str = "HERALD_SNAPSHOT_EVERY";
    pub const REJOIN: &str = "HERALD_REJOIN";
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
    pub const WS_ADDR: &str = "HERALD_WS_ADDR";
    pub const ADVERTISE_WS_ADDR: &str = "HERALD_ADVERTISE_WS_ADDR";
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
    /// Listen address of the gRPC API and the Raft transport (host:port).
    #[arg(long, env = env::GRPC_ADDR)]
    pub grpc_addr: Option<String>,
    /// Address peers and tools use to reach this node's gRPC (default: --grpc-addr).
    #[arg(long, env = env::ADVERTISE_GRPC_ADDR)]
    pub advertise_grpc_addr: Option<String>,
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
    /// Initial cluster members as id=host:port (gRPC addresses), comma separated, this node included.
    #[arg(long, env = env::PEERS)]
    pub peers: Option<String>,
    /// Bearer token required for admin calls (apps, membership). Unset: admin calls are open.
    #[arg(long, env = env::ADMIN_TOKEN)]
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
    /// Listen address of the WebSocket client listener (same frames as binary messages; empty: disabled).
    #[arg(long, env = env::WS_ADDR)]
    pub ws_addr: Option<String>,
    /// Address clients are told to use for WebSocket (default: --ws-addr).
    #[arg(long, env = env::ADVERTISE_WS_ADDR)]
    pub advertise_ws_addr: Option<String>,
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
            ws_addr,
            advertise_ws_addr,
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

/// A configuration problem, worded for the person starting the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
    pub ws_listen: Option<SocketAddr>,
    pub ws_advertise: String,
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
        let peers_raw = self.peers.ok_or_else(|| missing("peers", env::PEERS))?;
        let peers = parse_peers(&peers_raw)?;
        match peers.get(&id) {
            None => {
                return Err(ConfigError(format!(
                    "--id {id} is not in --peers ({}); list this node too",
                    peers.keys().map(|k| k.to_string()).collect::<Vec<_>>().join(",")
                )))
            }
            Some(a) if *a != grpc_advertise => {
                return Err(ConfigError(format!(
                    "--peers says node {id} is at {a}, but this node advertises gRPC at {grpc_advertise}"
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
        let ws_listen = optional_addr("ws-addr", self.ws_addr)?;
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
            client_listen,
            client_advertise,
            tls_listen,
            tls_advertise,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            peers,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            raft_heartbeat,
            election_timeout,
            snapshot_every: positive("snapshot-every", self.snapshot_every, 50_000)?,
            rejoin: self.rejoin.unwrap_or(false),
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
            ws_listen,
            ws_advertise,
            archive_url,
            archive_batch,
        })
    }
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
            peers: Some("1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003".into()),
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
        .contains("advertises gRPC"));
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
            "id" | "data_dir" | "grpc_addr" | "peers" => None,
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
            "ws_addr" | "advertise_ws_addr" => {
                assert!(c.ws_listen.is_none() && c.ws_advertise.is_empty());
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
        assert_eq!(checked, 17, "options with a default");
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
}
