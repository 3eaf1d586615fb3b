//! `herald dev`: a local 3-node cluster on loopback, each node its own `herald node` process, with
//! a demo app and a token printed. Ctrl-C stops all three cleanly; a second run reuses the data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use herald_proto::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::cli::{CliError, ClientOpts};
use crate::token;

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the three nodes keep their data, logs and the dev admin token.
    #[arg(long, default_value = "./herald-dev")]
    pub data_dir: PathBuf,
    /// Node i listens for gRPC on base+i, plain TCP clients on base+10+i, TLS clients on base+20+i,
    /// admin HTTP (metrics, dashboard) on base+30+i, WebSocket clients on base+40+i, its cluster
    /// plane (mutual TLS, other nodes only) on base+50+i, MQTT clients on base+60+i and MQTT over
    /// TLS on base+70+i.
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// The demo app's id.
    #[arg(long, default_value = "demo")]
    pub app: String,
    /// Start the cluster, print the summary and exit, leaving the nodes running (for scripts).
    #[arg(long)]
    pub detach: bool,
    /// Give every node this cold archive (mysql://user:pass@host:port/database).
    #[arg(long)]
    pub archive_url: Option<String>,
    /// Shard groups of the cluster (`herald node --shards`; 0: one Raft group). Fixed when the
    /// data dir is created: a second run must give the same.
    #[arg(long, default_value_t = 0)]
    pub shards: u32,
}

const NODES: u64 = 3;

/// Addresses of dev node `i`.
pub fn grpc_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + i)
}

pub fn client_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 10 + i)
}

pub fn tls_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 20 + i)
}

pub fn admin_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 30 + i)
}

pub fn ws_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 40 + i)
}

pub fn mqtt_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 60 + i)
}

pub fn mqtt_tls_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 70 + i)
}

pub fn cluster_addr(base: u16, i: u64) -> String {
    format!("127.0.0.1:{}", base as u64 + 50 + i)
}

pub async fn run(args: DevArgs) -> Result<(), CliError> {
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| CliError::other(format!("cannot create {}: {e}", args.data_dir.display())))?;
    let admin_token = admin_token(&args.data_dir)?;
    let pki = crate::room::tls::dev_pki(&args.data_dir.join("tls"))
        .map_err(|e| CliError::other(format!("cannot create the dev TLS certificate: {e:#}")))?;
    // The cluster plane's CA and one certificate per node, made once (mutual TLS between nodes).
    let certs = args.data_dir.join("certs");
    crate::certs::ensure_cluster(&certs, 1..=NODES)
        .map_err(|e| CliError::other(format!("cannot create the cluster certificates: {e:#}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| CliError::other(format!("cannot find the herald binary: {e}")))?;
    let peers = (1..=NODES)
        .map(|i| format!("{i}={}", cluster_addr(args.base_port, i)))
        .collect::<Vec<_>>()
        .join(",");

    let mut children = Vec::new();
    // The write ends of the nodes' stdin pipes: held until we exit (Child::wait would close them).
    let mut lifelines: Vec<Option<tokio::process::ChildStdin>> = Vec::new();
    for i in 1..=NODES {
        let dir = args.data_dir.join(format!("node-{i}"));
        let log_path = args.data_dir.join(format!("node-{i}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| CliError::other(format!("cannot open {}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(|e| CliError::other(e.to_string()))?;
        let (node_cert, node_key) = crate::certs::node_paths(&certs, i);
        let mut cmd = Command::new(&exe);
        cmd.arg("node")
            .args(["--id", &i.to_string()])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--grpc-addr", &grpc_addr(args.base_port, i)])
            .args(["--client-addr", &client_addr(args.base_port, i)])
            .args(["--tls-addr", &tls_addr(args.base_port, i)])
            .args(["--admin-addr", &admin_addr(args.base_port, i)])
            .args(["--ws-addr", &ws_addr(args.base_port, i)])
            .args(["--mqtt-addr", &mqtt_addr(args.base_port, i)])
            .args(["--mqtt-tls-addr", &mqtt_tls_addr(args.base_port, i)])
            .args(["--cluster-addr", &cluster_addr(args.base_port, i)])
            .arg("--cluster-ca")
            .arg(crate::certs::ca_paths(&certs).0)
            .arg("--cluster-cert")
            .arg(&node_cert)
            .arg("--cluster-key")
            .arg(&node_key)
            .arg("--tls-cert")
            .arg(&pki.cert)
            .arg("--tls-key")
            .arg(&pki.key)
            .args(["--peers", &peers])
            .args(["--shards", &args.shards.to_string()])
            .env(crate::config::env::ADMIN_TOKEN, &admin_token)
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(!args.detach);
        if args.detach {
            cmd.stdin(Stdio::null());
        } else {
            // The node exits when this process goes away, however it goes.
            cmd.stdin(Stdio::piped()).arg("--exit-with-stdin");
        }
        if let Some(url) = &args.archive_url {
            cmd.env(crate::config::env::ARCHIVE_URL, url);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| CliError::other(format!("cannot start node {i}: {e}")))?;
        lifelines.push(child.stdin.take());
        children.push(child);
    }
    eprintln!(
        "starting 3 nodes (logs: {}/node-N.log) ...",
        args.data_dir.display()
    );

    let client = ClientOpts {
        server: grpc_addr(args.base_port, 1),
        admin_token: Some(admin_token.clone()),
        app: Some(args.app.clone()),
        api_key: None,
        timeout_ms: 10_000,
        server_ca: None,
    };
    let app = match wait_ready(&client, &args.app, Duration::from_secs(60)).await {
        Ok(app) => app,
        Err(e) => {
            stop(&mut children).await;
            return Err(e);
        }
    };
    let secret = app.secrets.first().cloned().unwrap_or_default();
    let api_key = app.api_keys.first().cloned().unwrap_or_default();
    let now = herald_raft::raft_node::now_ms() / 1000;
    let demo_token = token::mint(
        &token::Claims {
            app: args.app.clone(),
            sub: "alice".into(),
            dev: None,
            iat: now,
            exp: now + 86_400,
        },
        &secret,
    );
    let summary = serde_json::json!({
        "grpc": (1..=NODES).map(|i| grpc_addr(args.base_port, i)).collect::<Vec<_>>(),
        "client": (1..=NODES).map(|i| client_addr(args.base_port, i)).collect::<Vec<_>>(),
        "tls": (1..=NODES).map(|i| tls_addr(args.base_port, i)).collect::<Vec<_>>(),
        "tls_ca": pki.ca.display().to_string(),
        "admin": (1..=NODES).map(|i| admin_addr(args.base_port, i)).collect::<Vec<_>>(),
        "ws": (1..=NODES).map(|i| ws_addr(args.base_port, i)).collect::<Vec<_>>(),
        "mqtt": (1..=NODES).map(|i| mqtt_addr(args.base_port, i)).collect::<Vec<_>>(),
        "mqtt_tls": (1..=NODES).map(|i| mqtt_tls_addr(args.base_port, i)).collect::<Vec<_>>(),
        "cluster": (1..=NODES).map(|i| cluster_addr(args.base_port, i)).collect::<Vec<_>>(),
        "cluster_ca": crate::certs::ca_paths(&certs).0.display().to_string(),
        "dashboard": format!("http://{}/", admin_addr(args.base_port, 1)),
        "admin_token": admin_token,
        "app": args.app,
        "app_secret": secret,
        "api_key": api_key,
        "demo_user": "alice",
        "demo_token": demo_token,
        "pids": children.iter().filter_map(|c| c.id()).collect::<Vec<_>>(),
    });
    let summary_path = args.data_dir.join("dev.json");
    let _ = std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary).unwrap_or_default(),
    );
    print_summary(&args, &summary);

    if args.detach {
        for c in children {
            drop(c); // kill_on_drop is off: the nodes keep running
        }
        return Ok(());
    }
    let stopped_early = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = wait_any(&mut children) => true,
    };
    if stopped_early {
        eprintln!("a node exited; stopping the others (see the node logs)");
    } else {
        eprintln!("stopping ...");
    }
    stop(&mut children).await;
    drop(lifelines);
    eprintln!("stopped; data kept in {}", args.data_dir.display());
    Ok(())
}

fn print_summary(args: &DevArgs, s: &serde_json::Value) {
    let get = |k: &str| s[k].as_str().unwrap_or_default().to_string();
    let list = |k: &str| {
        s[k].as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    println!(
        "herald dev cluster is up (3 nodes, data in {})",
        args.data_dir.display()
    );
    println!("  gRPC API:     {}", list("grpc"));
    println!("  client (TCP): {}", list("client"));
    println!("  client (TLS): {}  (dev CA: {})", list("tls"), get("tls_ca"));
    println!(
        "  client (WS):  {}",
        list("ws")
            .split(' ')
            .map(|a| format!("ws://{a}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("  MQTT:         {}  (3.1.1 / 5.0; docs/MQTT.md)", list("mqtt"));
    println!("  MQTT (TLS):   {}  (dev CA above)", list("mqtt_tls"));
    println!("  admin (HTTP): {}  (/metrics, /healthz, /readyz)", list("admin"));
    println!(
        "  cluster:      {}  (node-to-node only, mutual TLS; CA: {})",
        list("cluster"),
        get("cluster_ca")
    );
    println!("  dashboard:    {}  (asks for the admin token)", get("dashboard"));
    println!("  admin token:  {}", get("admin_token"));
    println!("  app:          {}  (api key {})", get("app"), get("api_key"));
    println!("  token for user alice (24h):");
    println!("    {}", get("demo_token"));
    println!("push a message to alice:");
    println!(
        "  herald push --server {} --app {} --api-key {} --user alice --payload hello",
        grpc_addr(args.base_port, 1),
        get("app"),
        get("api_key")
    );
    let mqtt1 = mqtt_addr(args.base_port, 1);
    let (host, port) = mqtt1.rsplit_once(':').unwrap_or((&mqtt1, "1883"));
    println!("or listen with an MQTT client (Debian's mosquitto-clients):");
    println!(
        "  mosquitto_sub -h {host} -p {port} -V mqttv5 -q 1 -c -i alice-phone -u {} -P {} -t '$herald/inbox' -v",
        get("app"),
        get("demo_token")
    );
    println!(
        "cluster status:  herald cluster status --server {}",
        grpc_addr(args.base_port, 2)
    );
    println!(
        "(summary also in {}/dev.json; Ctrl-C stops the cluster)",
        args.data_dir.display()
    );
}

/// Waits for a leader, then creates the demo app (or finds it from an earlier run).
async fn wait_ready(client: &ClientOpts, app: &str, limit: Duration) -> Result<pb::App, CliError> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match try_app(client, app).await {
            Ok(a) => return Ok(a),
            Err(e) => last = e.message,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(CliError {
        code: 3,
        message: format!("cluster did not become ready within {limit:?}: {last}"),
    })
}

async fn try_app(client: &ClientOpts, app: &str) -> Result<pb::App, CliError> {
    let mut c = client.connect().await?;
    let status = c.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
    if !status.has_leader {
        return Err(CliError::other("no leader yet"));
    }
    match c
        .get_app(client.admin(pb::GetAppRequest { id: app.into() })?)
        .await
    {
        Ok(r) => return r.into_inner().app.ok_or_else(|| CliError::other("empty app")),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(s.into()),
    }
    let req = pb::CreateAppRequest {
        id: app.into(),
        name: "Herald demo".into(),
        ..Default::default()
    };
    Ok(c.create_app(client.admin(req)?)
        .await?
        .into_inner()
        .app
        .unwrap_or_default())
}

/// The dev admin token, created once and kept next to the data.
fn admin_token(dir: &Path) -> Result<String, CliError> {
    let path = dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let t = crate::api::auth::random_secret();
    std::fs::write(&path, &t)
        .map_err(|e| CliError::other(format!("cannot write {}: {e}", path.display())))?;
    Ok(t)
}

async fn wait_any(children: &mut [Child]) {
    let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
    let _ = futures::future::select_all(waits).await;
}

/// SIGTERM to every node, then SIGKILL to any still running after 15 s.
async fn stop(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(15), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
}
