//! `herald`: run a node (`herald node`), a local dev cluster (`herald dev`), or talk to a cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_node::cli::listen::ListenCmd;
use herald_node::cli::messages::{self, BroadcastCmd, DeliveryCmd, KickCmd, PublishCmd, PushCmd, StatusCmd};
use herald_node::cli::{self, CliError, ClientOpts};
use herald_node::config::{self, NodeOptions};
use herald_node::{dev, logging, node, token};
use herald_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

/// The exit codes of the client commands (kept in step with `cli` and `cli::listen`).
const EXIT_CODES: &str = "\
Exit codes:
  0  success; listen: --count reached, Ctrl-C/SIGTERM, kicked, or --timeout without --count
  1  anything else
  2  usage error
  3  cluster unavailable or unreachable; listen: --timeout passed without ever connecting
  4  refused: invalid argument, not found, permission, already exists, bad or expired token
  5  outcome unknown: a write timed out and may still commit (retry with the same --idempotency-key)
  6  listen --count N --timeout S: the timeout passed before N messages arrived";

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: a long-connection push cluster",
    propagate_version = true,
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of a cluster.
    Node(NodeCmd),
    /// Start a local 3-node cluster with a demo app (data under ./herald-dev).
    Dev(dev::DevArgs),
    /// Cluster membership and status.
    Cluster {
        #[command(flatten)]
        client: ClientOpts,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Apps (tenants) admin.
    Apps {
        #[command(flatten)]
        client: ClientOpts,
        #[command(subcommand)]
        cmd: AppsCmd,
    },
    /// Mint a client token for a user of an app.
    Token(TokenCmd),
    /// Push a message to users (QoS 1: stored until acked or expired; QoS 0: online only).
    Push(PushCmd),
    /// Send a message to every session of the app (the `*` topic, retained for catch-up).
    Broadcast(BroadcastCmd),
    /// Publish a message to the subscribers of a topic (retained for catch-up).
    Publish(PublishCmd),
    /// A user's sessions, stored messages and device cursors, as JSON.
    Status(StatusCmd),
    /// What happened to a stored message, per user and device, as JSON.
    Delivery(DeliveryCmd),
    /// End a user's sessions (every device, or one).
    Kick(KickCmd),
    /// Connect as a client (the SDK) and print one JSON line per event.
    Listen(ListenCmd),
    /// The cluster plane's CA and node certificates (mutual TLS between nodes).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a new cluster CA (ca.pem, ca.key) in --dir.
    Ca {
        /// Directory for the files (created if missing; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name (give a new CA a new name when rotating).
        #[arg(long, default_value = "Herald cluster CA")]
        name: String,
    },
    /// Issue node --id's certificate (node-<id>.pem, node-<id>.key) from the CA in --dir.
    Node {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// Extra DNS names or IP addresses the certificate names, repeatable (the node id's
        /// name `herald-node-<id>` is always in it; peers check that one).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

#[derive(clap::Args)]
struct NodeCmd {
    /// TOML file with any of the options below (flags and env vars win over it).
    #[arg(long, env = config::env::CONFIG)]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: NodeOptions,
    /// Exit when standard input closes (used by `herald dev` so nodes never outlive it).
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term and every member's progress, as JSON.
    Status,
    /// Add a node: learner first, voter once it caught up.
    Add {
        #[arg(long)]
        id: u64,
        /// The new node's cluster-plane address (its --cluster-addr).
        #[arg(long)]
        cluster_addr: String,
        /// Keep it a learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        #[arg(long)]
        id: u64,
    },
    /// Compare a digest of every member's state machine at one applied index, as JSON; exit 0
    /// when consistent, 1 when the replicas diverged, 3 when it could not tell (a member down,
    /// or writes never paused long enough for the members to stand at one index).
    Verify {
        /// How long to keep asking, in ms (keep it below --timeout-ms).
        #[arg(long, default_value_t = 8_000)]
        wait_ms: u64,
    },
    /// Every node takes the lead of the shards it is the preferred leader of, now (they also do
    /// on their own every few seconds); prints the groups and their leaders as JSON; exit 0 when
    /// the leaders are spread, 3 when they were not within --wait-ms.
    Rebalance {
        #[arg(long, default_value_t = 8_000)]
        wait_ms: u64,
    },
}

#[derive(Subcommand)]
enum AppsCmd {
    /// Create an app; prints it (with its generated secret and API key) as JSON.
    Create {
        /// App id (letters, digits, '-', '_', '.').
        id: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Token signing secret (generated when absent).
        #[arg(long)]
        secret: Option<String>,
        /// API key (generated when absent).
        #[arg(long)]
        key: Option<String>,
        /// Messages held per user.
        #[arg(long)]
        mailbox_cap: Option<u32>,
        /// Default message TTL in ms.
        #[arg(long)]
        ttl_ms: Option<u64>,
        /// Sessions per platform (0 = unlimited; newest wins).
        #[arg(long, default_value_t = 0)]
        max_per_platform: u32,
        /// Backend callback endpoints (gRPC host:port), repeatable.
        #[arg(long = "callback")]
        callbacks: Vec<String>,
        /// A topic (or MQTT filter such as `chat/+`) the app's clients may publish to themselves
        /// (MQTT PUBLISH); repeatable. None by default.
        #[arg(long = "client-publish")]
        client_publish: Vec<String>,
    },
    /// List apps as JSON lines.
    List,
    /// Show one app as JSON.
    Get { id: String },
}

#[derive(clap::Args)]
struct TokenCmd {
    #[arg(long)]
    user: String,
    /// Restrict the token to one device.
    #[arg(long)]
    device: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: u64,
    /// The app's secret; when absent it is fetched with the admin API from --server.
    #[arg(long, env = "HERALD_APP_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Print {"token", "app", "user", "device", "exp"} instead of the bare token.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientOpts,
}

/// jemalloc instead of glibc's malloc for the node's Rust allocations (RocksDB's C++ keeps glibc's).
/// Measured side by side (BENCHMARKS.md "jemalloc"): more committed pushes per second at 256
/// writers, where glibc's malloc/free/consolidate were ~17% of the machine, and idle memory per
/// connection level with glibc (mimalloc, tried earlier, raised it).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(run(cli));
    // Bounded: a stuck blocking task must not keep a stopped node alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.cmd {
        Cmd::Node(cmd) => run_node(cmd).await,
        Cmd::Dev(args) => dev::run(args).await,
        Cmd::Cluster { client, cmd } => cluster(client, cmd).await,
        Cmd::Apps { client, cmd } => apps(client, cmd).await,
        Cmd::Token(cmd) => mint_token(cmd).await,
        Cmd::Push(cmd) => print(messages::push(cmd).await?),
        Cmd::Broadcast(cmd) => print(messages::broadcast(cmd).await?),
        Cmd::Publish(cmd) => print(messages::publish(cmd).await?),
        Cmd::Status(cmd) => print(messages::status(cmd).await?),
        Cmd::Delivery(cmd) => print(messages::delivery(cmd).await?),
        Cmd::Kick(cmd) => print(messages::kick(cmd).await?),
        Cmd::Listen(cmd) => cli::listen::run(cmd).await,
        Cmd::Certs { cmd } => certs(cmd),
    }
}

fn certs(cmd: CertsCmd) -> Result<(), CliError> {
    let done = match cmd {
        CertsCmd::Ca { dir, name } => herald_node::certs::create_ca(&dir, &name).map(|p| vec![p]),
        CertsCmd::Node { dir, id, hosts } => {
            herald_node::certs::create_node(&dir, id, &hosts).map(|(c, k)| vec![c, k])
        }
    };
    match done {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Err(e) => Err(CliError::other(format!("{e:#}"))),
    }
}

/// One JSON document on one line.
fn print(v: serde_json::Value) -> Result<(), CliError> {
    println!("{v}");
    Ok(())
}

async fn run_node(cmd: NodeCmd) -> Result<(), CliError> {
    let file = match &cmd.config {
        Some(p) => NodeOptions::from_file(p).map_err(|e| CliError::usage(e.0))?,
        None => NodeOptions::default(),
    };
    let config = cmd
        .options
        .over(file)
        .resolve()
        .map_err(|e| CliError::usage(e.0))?;
    logging::init(config.log_format);
    let listeners = node::Listeners::bind(&config)
        .await
        .map_err(|e| CliError::other(format!("{e:#}")))?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone(), cmd.exit_with_stdin);
    node::run(config, listeners, shutdown)
        .await
        .map_err(|e| CliError::other(format!("{e:#}")))
}

/// SIGTERM, SIGINT (Ctrl-C) and optionally stdin EOF all cancel `shutdown`.
fn spawn_signal_handler(shutdown: CancellationToken, exit_with_stdin: bool) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        // Stdin is watched on a plain thread: a blocking read in the runtime would hold up its
        // shutdown for as long as the parent stays alive.
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        if exit_with_stdin {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
                let _ = gone_tx.send(());
            });
        } else {
            drop(gone_tx);
        }
        let stdin_closed = async move {
            if exit_with_stdin {
                let _ = gone_rx.await;
            } else {
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("sigterm received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
            _ = stdin_closed => tracing::info!("parent went away"),
        }
        shutdown.cancel();
    });
}

async fn cluster(client: ClientOpts, cmd: ClusterCmd) -> Result<(), CliError> {
    match cmd {
        ClusterCmd::Status => {
            let v = cli::cluster_status(&client).await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        ClusterCmd::Add {
            id,
            cluster_addr,
            learner,
        } => {
            let mut c = client.connect().await?;
            let r = c
                .add_node(client.admin(pb::AddNodeRequest {
                    node_id: id,
                    cluster_addr,
                    learner_only: learner,
                    ..Default::default()
                })?)
                .await?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({"voters": r.voters, "learners": r.learners, "log_index": r.log_index})
            );
        }
        ClusterCmd::Rebalance { wait_ms } => {
            let mut c = client.connect().await?;
            let req = client.admin(pb::RebalanceRequest { timeout_ms: wait_ms })?;
            let r = c.rebalance(req).await?.into_inner();
            let v = serde_json::json!({
                "spread": r.spread,
                "elections": r.elections,
                "groups": r.groups.iter().map(cli::group_json).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            if !r.spread {
                return Err(CliError {
                    code: 3,
                    message: "the shard leaders are not spread yet (a preferred leader down or behind?)"
                        .into(),
                });
            }
        }
        ClusterCmd::Verify { wait_ms } => {
            let mut c = client.connect().await?;
            let req = client.admin(pb::VerifyReplicasRequest { timeout_ms: wait_ms })?;
            let r = c.verify_replicas(req).await?.into_inner();
            let v = serde_json::json!({
                "verdict": r.verdict,
                "detail": r.detail,
                "replicas": r.replicas.iter().map(|d| serde_json::json!({
                    "group": d.group,
                    "node_id": d.node_id,
                    "applied_index": d.applied_index,
                    "digest": d.digest,
                    "error": d.error,
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            match r.verdict.as_str() {
                "consistent" => {}
                "diverged" => return Err(CliError::other(format!("replicas diverged: {}", r.detail))),
                _ => {
                    return Err(CliError {
                        code: 3,
                        message: format!("could not verify: {}", r.detail),
                    })
                }
            }
        }
        ClusterCmd::Remove { id } => {
            let mut c = client.connect().await?;
            let r = c
                .remove_node(client.admin(pb::RemoveNodeRequest { node_id: id })?)
                .await?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({"voters": r.voters, "learners": r.learners, "log_index": r.log_index})
            );
        }
    }
    Ok(())
}

async fn apps(client: ClientOpts, cmd: AppsCmd) -> Result<(), CliError> {
    let mut c = client.connect().await?;
    match cmd {
        AppsCmd::Create {
            id,
            name,
            secret,
            key,
            mailbox_cap,
            ttl_ms,
            max_per_platform,
            callbacks,
            client_publish,
        } => {
            let limits = pb::AppLimits {
                mailbox_cap: mailbox_cap.unwrap_or(0),
                default_ttl_ms: ttl_ms.unwrap_or(0),
                max_ttl_ms: ttl_ms
                    .unwrap_or(0)
                    .max(herald_raft::AppLimits::STANDARD.max_ttl_ms),
                ..Default::default()
            };
            let req = pb::CreateAppRequest {
                id,
                name,
                secret: secret.unwrap_or_default(),
                api_key: key.unwrap_or_default(),
                limits: Some(limits),
                policy: Some(pb::DevicePolicy {
                    max_per_platform,
                    max_per_user: 0,
                }),
                callbacks,
                client_publish,
            };
            let app = c
                .create_app(client.admin(req)?)
                .await?
                .into_inner()
                .app
                .unwrap_or_default();
            println!("{}", cli::app_json(&app));
        }
        AppsCmd::List => {
            for app in c
                .list_apps(client.admin(pb::ListAppsRequest {})?)
                .await?
                .into_inner()
                .apps
            {
                println!("{}", cli::app_json(&app));
            }
        }
        AppsCmd::Get { id } => {
            let app = c
                .get_app(client.admin(pb::GetAppRequest { id })?)
                .await?
                .into_inner()
                .app
                .unwrap_or_default();
            println!("{}", cli::app_json(&app));
        }
    }
    Ok(())
}

async fn mint_token(cmd: TokenCmd) -> Result<(), CliError> {
    // `--app` (or HERALD_APP) comes from the shared client options.
    let app = cmd.client.app_id()?;
    let secret = match cmd.secret {
        Some(s) => s,
        None => {
            let mut c = cmd.client.connect().await?;
            let found = c
                .get_app(cmd.client.admin(pb::GetAppRequest { id: app.clone() })?)
                .await?
                .into_inner()
                .app
                .ok_or_else(|| CliError::other("server returned no app"))?;
            found
                .secrets
                .into_iter()
                .next()
                .ok_or_else(|| CliError::other("app has no secret"))?
        }
    };
    let now = herald_raft::raft_node::now_ms() / 1000;
    let claims = token::Claims {
        app,
        sub: cmd.user,
        dev: cmd.device,
        iat: now,
        exp: now + cmd.ttl,
    };
    let minted = token::mint(&claims, &secret);
    if cmd.json {
        return print(serde_json::json!({
            "token": minted,
            "app": claims.app,
            "user": claims.sub,
            "device": claims.dev,
            "exp": claims.exp,
        }));
    }
    // The bare token, so that `TOKEN=$(herald token ...)` works.
    println!("{minted}");
    Ok(())
}
