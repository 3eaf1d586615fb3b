//! The admin HTTP server (`--admin-addr`): Prometheus metrics, health and readiness probes, and
//! the dashboard (a static page embedded in the binary) with the JSON API it reads.
//!
//! | path | auth | what |
//! |---|---|---|
//! | `/metrics` | open | Prometheus text exposition ([`render_metrics`]) |
//! | `/healthz` | open | 200 while the process and its Raft core run |
//! | `/readyz` | open | 200 when this node is a member, caught up and accepting clients; else 503 with reasons |
//! | `/` | open | the dashboard page (it holds no data; it shows a login form when a call is refused) |
//! | `POST /login`, `POST /logout` | form | open or end a dashboard session ([`session`]) |
//! | `/api/cluster`, `/api/apps`, `/api/user?app=&user=`, `/api/rates` | admin token | JSON |
//!
//! When the node has an admin token, `/api/*` needs it as `Authorization: Bearer <token>`, or a
//! dashboard session cookie; a token in the URL is not accepted. Without a token (loopback only,
//! see `config`) they are open, like the gRPC admin calls. With `--admin-tls` (or
//! `--admin-tls-cert`/`--admin-tls-key`) the server speaks HTTPS only ([`tls`]).
//!
//! Architecture Invariant: the admin server only reads (local indexes, counters, the state
//! machine through `StateReader`, peers' load through the peer service); it never writes to Raft.

pub mod metrics;
pub mod session;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_proto::peer::peer_client::PeerClient;
use herald_proto::peer::{RateSample, RatesRequest};
use herald_raft::raft_node::now_ms;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::metrics::{Exposition, Transport, SAMPLE_EVERY};
use self::session::{authorize, Http};
use crate::archive::ArchiveStats;
use crate::node::Node;

/// The dashboard page, served at `/`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Entries a member may be behind the leader's log and still count as caught up (`/readyz`).
pub const READY_MAX_LAG: u64 = 1_000;

/// What the admin handlers read.
pub struct AdminState {
    pub node: Node,
    /// Set once the node announced itself and accepts clients (see `node::announce`).
    pub announced: Arc<AtomicBool>,
    /// The archiver's counters, when the cold archive is configured.
    pub archive: Option<Arc<ArchiveStats>>,
}

/// The admin server's rustls config when the node serves it over HTTPS (loaded at start, so a
/// bad certificate stops the node with a clear error).
pub fn tls_config(config: &crate::config::NodeConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    match (&config.admin_listen, &config.admin_tls) {
        (Some(_), Some(files)) => Ok(Some(tls::server_config(&files.cert, &files.key)?)),
        _ => Ok(None),
    }
}

/// Serves the admin API on `listener` until `shutdown`: HTTPS with `tls`, else plain HTTP.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "admin http listener has no address");
            return;
        }
    };
    let http = Arc::new(Http::new(state, addr.port(), tls.is_some()));
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/login", post(session::login))
        .route("/logout", post(session::logout))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/cluster", get(api_cluster))
        .route("/api/apps", get(api_apps))
        .route("/api/user", get(api_user))
        .route("/api/rates", get(api_rates))
        .with_state(http);
    let served = match tls {
        Some(config) => {
            let listener = match tls::TlsListener::new(listener, config, shutdown.clone()) {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "admin https listener failed");
                    return;
                }
            };
            info!(%addr, "admin https listener up");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        None => {
            info!(%addr, "admin http listener up");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    };
    if let Err(e) = served {
        warn!(error = %e, "admin http server failed");
    }
}

/// Samples the node's load every [`SAMPLE_EVERY`] into the rate ring (dashboards, peers ask).
pub async fn run_sampler(node: Node, shutdown: CancellationToken) {
    let room = node.room().clone();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let read = |room: &crate::room::Room| {
        let s = &room.stats;
        (
            s.deliveries.load(Ordering::Relaxed),
            s.ops.pushes(),
            s.acks.load(Ordering::Relaxed),
            s.connects.load(Ordering::Relaxed),
        )
    };
    let mut last = read(&room);
    let mut last_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = read(&room);
        let secs = last_at.elapsed().as_secs_f64().max(0.001);
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs;
        room.stats.ops.record_sample(RateSample {
            at_ms: now_ms(),
            connections: room.connections(),
            deliveries_per_s: rate(now.0, last.0),
            pushes_per_s: rate(now.1, last.1),
            acks_per_s: rate(now.2, last.2),
            connects_per_s: rate(now.3, last.3),
        });
        last = now;
        last_at = std::time::Instant::now();
    }
}

type Params = Query<HashMap<String, String>>;

fn error(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({ "error": msg }))).into_response()
}

async fn dashboard() -> Response {
    (
        [
            // The login form must not be framed by another site (clickjacking).
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(DASHBOARD),
    )
        .into_response()
}

async fn metrics_handler(State(h): State<Arc<Http>>) -> Response {
    let s = &h.state;
    let body = render_metrics(s);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn healthz(State(h): State<Arc<Http>>) -> Response {
    match h.state.node.groups().fatal() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("raft stopped: {e}\n")).into_response(),
    }
}

/// What `/readyz` decides from, read from the node by [`readiness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyInputs {
    /// Why this node's Raft core stopped on an error (full disk, EIO), if it did: nothing it
    /// reports is current any more and it is about to exit.
    pub raft_stopped: Option<String>,
    /// This node is in the Raft membership (voter or learner).
    pub member: bool,
    /// This node knows a leader.
    pub leader_known: bool,
    /// Last index in this node's log.
    pub last_log: u64,
    /// Last index applied to the state machine.
    pub applied: u64,
    /// The node announced itself (its previous run's sessions are cleared).
    pub announced: bool,
    /// The room accepts clients (false while draining).
    pub accepting: bool,
}

/// Why a node in state `i` is not ready (empty = ready).
pub fn not_ready_reasons(i: &ReadyInputs) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(reason) = &i.raft_stopped {
        why.push(format!("raft stopped: {reason}"));
    }
    if !i.member {
        why.push("not a member of the cluster".to_string());
    }
    if !i.leader_known {
        why.push("no leader known".into());
    } else if i.last_log.saturating_sub(i.applied) > READY_MAX_LAG {
        why.push(format!("applying: {} of {}", i.applied, i.last_log));
    }
    if !i.announced {
        why.push("not announced yet (clearing sessions of a previous run)".into());
    }
    if !i.accepting {
        why.push("draining".into());
    }
    why
}

/// Why this node is not ready (empty = ready): every one of its Raft groups must be running,
/// have it as a member, know a leader and be applied (the furthest behind group is reported).
pub fn readiness(s: &AdminState) -> Vec<String> {
    let node = &s.node;
    let (mut member, mut leader_known, mut last_log, mut applied) = (true, true, 0u64, 0u64);
    for g in node.groups().all() {
        let m = g.metrics().borrow().clone();
        member &= m
            .membership_config
            .membership()
            .get_node(&node.config().id)
            .is_some();
        leader_known &= m.current_leader.is_some();
        let (last, done) = (m.last_log_index.unwrap_or(0), g.reader().applied_index());
        if last.saturating_sub(done) >= last_log.saturating_sub(applied) {
            (last_log, applied) = (last, done);
        }
    }
    not_ready_reasons(&ReadyInputs {
        raft_stopped: node.groups().fatal(),
        member,
        leader_known,
        last_log,
        applied,
        announced: s.announced.load(Ordering::Relaxed),
        accepting: node.room().accepting(),
    })
}

async fn readyz(State(h): State<Arc<Http>>) -> Response {
    let why = readiness(&h.state);
    if why.is_empty() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": why})),
        )
            .into_response()
    }
}

async fn api_cluster(State(h): State<Arc<Http>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&h, &headers) {
        return r;
    }
    let s = &h.state;
    let node = &s.node;
    let meta = node.groups().meta();
    let view = meta.cluster_view().await;
    let infos = meta.reader().nodes().unwrap_or_default();
    let newest = view
        .members
        .iter()
        .filter_map(|m| m.probe.as_ref().map(|p| p.last_log_index))
        .max()
        .unwrap_or(0);
    let members: Vec<Value> = view
        .members
        .iter()
        .map(|m| {
            let info = infos.iter().find(|i| i.id == m.node_id);
            let p = m.probe.clone().unwrap_or_default();
            json!({
                "node_id": m.node_id,
                "grpc_addr": info.map(|i| i.grpc_addr.clone()).unwrap_or_default(),
                "cluster_addr": m.grpc_addr,
                "client_addr": info.map(|i| i.client_addr.clone()).unwrap_or_default(),
                "tls_addr": info.map(|i| i.tls_addr.clone()).unwrap_or_default(),
                "ws_addr": info.map(|i| i.ws_addr.clone()).unwrap_or_default(),
                "role": if m.voter { "voter" } else { "learner" },
                "reachable": m.reachable,
                "state": if m.reachable { p.state.clone() } else { "unreachable".into() },
                "leader": view.leader == Some(m.node_id),
                "term": p.term,
                "last_log_index": p.last_log_index,
                "applied_index": p.applied_index,
                "matched_index": m.matched_index,
                "lag": if m.reachable { Some(newest.saturating_sub(p.applied_index)) } else { None },
                "connections": p.connections,
            })
        })
        .collect();
    let archive = node.groups().data()[0].reader().archive_state().ok();
    Json(json!({
        "node_id": view.node_id,
        "leader_id": view.leader,
        "term": view.term,
        "applied_index": view.committed_index,
        "log_time_ms": meta.reader().log_time_ms(),
        "ready": readiness(s).is_empty(),
        "members": members,
        "shards": node.groups().shards(),
        "groups": groups_json(node),
        "archive": archive.map(|a| json!({
            "enabled": a.enabled,
            "pending": a.next_id - a.first,
            "dropped": a.dropped,
            "configured_here": s.archive.is_some(),
        })),
    }))
    .into_response()
}

async fn api_apps(State(h): State<Arc<Http>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&h, &headers) {
        return r;
    }
    let s = &h.state;
    let apps = match s.node.room().meta().apps() {
        Ok(a) => a,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let here = s.node.room().sessions_by_app();
    let list: Vec<Value> = apps
        .into_iter()
        .map(|a| {
            let c = app_counters(&s.node, &a.id);
            json!({
                "id": a.id,
                "name": a.name,
                "created_ms": a.created_ms,
                "callbacks": a.callbacks.len(),
                "limits": {
                    "mailbox_cap": a.limits.mailbox_cap,
                    "default_ttl_ms": a.limits.default_ttl_ms,
                    "topic_retain": a.limits.topic_retain,
                    "max_payload": a.limits.max_payload,
                },
                "sessions_on_this_node": here.get(&a.id).copied().unwrap_or(0),
                "counters": {
                    "stored": c.stored, "acked": c.acked, "expired": c.expired, "trimmed": c.trimmed,
                    "published": c.published, "topic_trimmed": c.topic_trimmed,
                },
            })
        })
        .collect();
    Json(json!({ "apps": list })).into_response()
}

async fn api_user(State(h): State<Arc<Http>>, headers: HeaderMap, Query(q): Params) -> Response {
    if let Err(r) = authorize(&h, &headers) {
        return r;
    }
    let s = &h.state;
    let (Some(app), Some(user)) = (q.get("app"), q.get("user")) else {
        return error(StatusCode::BAD_REQUEST, "needs ?app=<app id>&user=<user>");
    };
    let reader = s.node.room().user_state(app, user);
    let found = (|| {
        let exists = s.node.room().meta().app(app)?.is_some();
        let sessions = reader.sessions(app, user)?;
        let devices = reader.devices(app, user)?;
        let meta = reader.mailbox_meta(app, user)?.unwrap_or_default();
        let pending = reader.mailbox_since(app, user, 0, 50)?;
        Ok::<_, herald_raft::StoreError>((exists, sessions, devices, meta, pending))
    })();
    let (exists, sessions, devices, meta, pending) = match found {
        Ok(v) => v,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    if !exists {
        return error(StatusCode::NOT_FOUND, &format!("unknown app {app:?}"));
    }
    Json(json!({
        "app": app,
        "user": user,
        "online": !sessions.is_empty(),
        "sessions": sessions.iter().map(|x| json!({
            "device": x.device, "platform": x.platform, "node_id": x.node,
            "epoch": x.epoch, "since_ms": x.since_ms,
        })).collect::<Vec<_>>(),
        "devices": devices.iter().map(|(d, st)| json!({
            "device": d, "platform": st.platform, "delivered": st.delivered,
            "acked": st.acked, "last_seen_ms": st.last_seen_ms,
        })).collect::<Vec<_>>(),
        "mailbox": {
            "next_seq": meta.next_seq.max(1), "count": meta.count,
            "trimmed_upto": meta.trimmed_upto, "expired_upto": meta.expired_upto,
        },
        "pending": pending.iter().map(|m| json!({
            "seq": m.seq, "msg_id": m.msg_id,
            "payload": String::from_utf8_lossy(&m.payload),
            "devices": m.devices, "pushed_ms": m.pushed_ms, "expires_ms": m.expires_ms,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn api_rates(State(h): State<Arc<Http>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&h, &headers) {
        return r;
    }
    let s = &h.state;
    let node = &s.node;
    let me = node.config().id;
    let members: Vec<(u64, String)> = node
        .groups()
        .meta()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    let asks = members.into_iter().map(|(id, _addr)| {
        let node = node.clone();
        async move {
            if id == me {
                return (id, Some(node.room().stats.ops.samples()));
            }
            let Ok(ch) = node.peers().channel(id) else {
                return (id, None);
            };
            let mut client = PeerClient::new(ch);
            match tokio::time::timeout(Duration::from_secs(2), client.rates(RatesRequest {})).await {
                Ok(Ok(r)) => (id, Some(r.into_inner().samples)),
                _ => (id, None),
            }
        }
    });
    let nodes: Vec<Value> = futures::future::join_all(asks)
        .await
        .into_iter()
        .map(|(id, samples)| {
            json!({
                "node_id": id,
                "reachable": samples.is_some(),
                "samples": samples.unwrap_or_default().iter().map(|x| json!({
                    "at_ms": x.at_ms, "connections": x.connections,
                    "deliveries_per_s": x.deliveries_per_s, "pushes_per_s": x.pushes_per_s,
                    "acks_per_s": x.acks_per_s, "connects_per_s": x.connects_per_s,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "interval_ms": SAMPLE_EVERY.as_millis() as u64, "nodes": nodes })).into_response()
}

/// Everything the node exports, as Prometheus text.
pub fn render_metrics(s: &AdminState) -> String {
    let node = &s.node;
    let room = node.room();
    let st = &room.stats;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut e = Exposition::default();
    e.single(
        "herald_node_id",
        "gauge",
        "This node's Raft id.",
        node.config().id as f64,
    );
    e.single(
        "herald_ready",
        "gauge",
        "1 when /readyz answers ready (member, caught up, accepting).",
        if readiness(s).is_empty() { 1.0 } else { 0.0 },
    );
    let (state_mem, log_mem) = node
        .groups()
        .all()
        .iter()
        .map(|g| g.memtable_bytes())
        // One log engine for every group: its figure once, the state machines' summed.
        .fold((0, 0), |(s, _), (gs, gl)| (s + gs, gl));
    e.labeled(
        "herald_rocksdb_memtable_bytes",
        "gauge",
        "Bytes in RocksDB memtables (written, not yet flushed to SST files) by database.",
        "db",
        [("state", state_mem as f64), ("log", log_mem as f64)],
    );

    // Connections and client traffic.
    e.labeled(
        "herald_connections",
        "gauge",
        "Open client connections by transport.",
        "transport",
        Transport::ALL
            .iter()
            .map(|t| (t.name(), st.ops.connections(*t) as f64)),
    );
    let by_app = room.sessions_by_app();
    e.labeled(
        "herald_sessions",
        "gauge",
        "Open client sessions on this node by app.",
        "app",
        by_app.iter().map(|(a, n)| (a.as_str(), *n as f64)),
    );
    let by_app_transport = room.connections_by_app_and_transport();
    e.multi_labeled(
        "herald_app_connections",
        "gauge",
        "Open client connections carrying at least one session of the app, by transport. A connection shared by several apps counts once under each, so summing over apps can exceed herald_connections; unknown: transport not recorded.",
        &["app", "transport"],
        by_app_transport
            .iter()
            .map(|((a, t), n)| (vec![a.as_str(), *t], *n as f64)),
    );
    e.single(
        "herald_connects_total",
        "counter",
        "Client connections accepted.",
        l(&st.connects),
    );
    e.single(
        "herald_disconnects_total",
        "counter",
        "Client connections ended.",
        l(&st.disconnects),
    );
    e.single(
        "herald_orphan_registrations_total",
        "counter",
        "Registrations of this node that committed after their HELLO was answered (timeout, lagging apply) and that the node unregistered.",
        l(&room.registrations.reaped),
    );
    e.labeled(
        "herald_pushes_total",
        "counter",
        "Pushes accepted by this node's API by qos (topic and broadcast publishes count as qos 1 stored).",
        "qos",
        [("0", l(&st.ops.pushes_qos0)), ("1", l(&st.ops.pushes_qos1))],
    );
    e.single(
        "herald_publishes_total",
        "counter",
        "Broadcasts and topic publishes accepted by this node's API.",
        l(&st.ops.publishes),
    );
    e.single(
        "herald_deliveries_total",
        "counter",
        "Messages handed to client connections of this node.",
        l(&st.deliveries),
    );
    e.single(
        "herald_acks_total",
        "counter",
        "Client acks that moved a cursor.",
        l(&st.acks),
    );
    e.single(
        "herald_read_barrier_questions_total",
        "counter",
        "Questions this node sent the leader before answering \"does not exist\" (read-your-writes; shared by the calls waiting at the same time).",
        node.room().barrier.asked() as f64,
    );
    e.histogram(
        "herald_delivery_latency_seconds",
        "QoS 1 push accepted (its log time) to written to the client's socket (replays after a reconnect included; topic and QoS 0 messages are not timed).",
        &st.ops.delivery_latency,
    );
    e.labeled(
        "herald_rejected_total",
        "counter",
        "Client inputs refused, by reason.",
        "reason",
        [
            ("bad_frame", l(&st.rejected_frames)),
            ("auth", l(&st.rejected_auth)),
            ("rate_limited", l(&st.rejected_rate)),
            ("server_busy", l(&st.rejected_busy)),
            ("slow_consumer", l(&st.slow_consumers)),
            ("qos0_offline", l(&st.qos0_dropped)),
        ],
    );

    // Replicated message counters (the same on every replica).
    let apps = node.room().meta().apps().unwrap_or_default();
    let counters: Vec<(String, herald_raft::AppCounters)> = apps
        .iter()
        .map(|a| (a.id.clone(), app_counters(node, &a.id)))
        .collect();
    type Pick = fn(&herald_raft::AppCounters) -> u64;
    let families: [(&str, &str, Pick); 4] = [
        (
            "herald_messages_stored_total",
            "Mailbox messages stored, by app (replicated).",
            |c| c.stored,
        ),
        (
            "herald_messages_acked_total",
            "Mailbox messages removed because every device acked them, by app.",
            |c| c.acked,
        ),
        (
            "herald_messages_expired_total",
            "Mailbox messages removed because their TTL passed, by app.",
            |c| c.expired,
        ),
        (
            "herald_messages_trimmed_total",
            "Mailbox messages dropped by the per-user cap, by app.",
            |c| c.trimmed,
        ),
    ];
    for (name, help, pick) in families {
        e.labeled(
            name,
            "counter",
            help,
            "app",
            counters.iter().map(|(a, c)| (a.as_str(), pick(c) as f64)),
        );
    }

    // Raft: the metadata group (the only group without shards); the shards' leaders below.
    let leads: Vec<(String, f64)> = node
        .groups()
        .all()
        .iter()
        .map(|g| (g.group().to_string(), if g.is_leader() { 1.0 } else { 0.0 }))
        .collect();
    e.labeled(
        "herald_raft_group_is_leader",
        "gauge",
        "1 for each Raft group this node leads (group 0: the metadata group, then the shards).",
        "group",
        leads.iter().map(|(g, v)| (g.as_str(), *v)),
    );
    let reader = node.groups().meta().reader();
    let m = node.groups().meta().metrics().borrow().clone();
    let last = m.last_log_index.unwrap_or(0);
    let applied = reader.applied_index();
    let commit = match &m.replication {
        // The leader's commit index: the highest index a majority of voters holds.
        Some(rep) => {
            let mut matched: Vec<u64> = m
                .membership_config
                .membership()
                .voter_ids()
                .map(|v| {
                    if v == m.id {
                        last
                    } else {
                        rep.get(&v).cloned().flatten().map(|l| l.index).unwrap_or(0)
                    }
                })
                .collect();
            matched.sort_unstable_by(|a, b| b.cmp(a));
            matched
                .get(matched.len() / 2)
                .copied()
                .unwrap_or(applied)
                .max(applied)
        }
        // A follower knows committed entries only as it applies them.
        None => applied,
    };
    e.single(
        "herald_raft_term",
        "gauge",
        "Current Raft term.",
        m.current_term as f64,
    );
    e.single(
        "herald_raft_leader_id",
        "gauge",
        "Id of the leader this node knows (0: none).",
        m.current_leader.unwrap_or(0) as f64,
    );
    e.single(
        "herald_raft_is_leader",
        "gauge",
        "1 on the leader.",
        if m.current_leader == Some(m.id) { 1.0 } else { 0.0 },
    );
    e.single(
        "herald_raft_last_log_index",
        "gauge",
        "Last index in this node's Raft log.",
        last as f64,
    );
    e.single(
        "herald_raft_commit_index",
        "gauge",
        "Commit index (the leader's majority index; on a follower, what it applied).",
        commit as f64,
    );
    e.single(
        "herald_raft_apply_index",
        "gauge",
        "Last index applied to the state machine.",
        applied as f64,
    );
    e.single(
        "herald_raft_apply_lag",
        "gauge",
        "Entries in this node's log not applied yet.",
        last.saturating_sub(applied) as f64,
    );
    if let Some(rep) = &m.replication {
        let lags: Vec<(String, f64)> = rep
            .iter()
            .filter(|(id, _)| **id != m.id)
            .map(|(id, l)| {
                (
                    id.to_string(),
                    last.saturating_sub(l.map(|l| l.index).unwrap_or(0)) as f64,
                )
            })
            .collect();
        e.labeled(
            "herald_raft_replication_lag",
            "gauge",
            "Leader only: entries each follower is behind the leader's log.",
            "peer",
            lags.iter().map(|(id, v)| (id.as_str(), *v)),
        );
    }
    let snaps = reader.snapshot_stats();
    e.single(
        "herald_raft_snapshot_index",
        "gauge",
        "Last log index covered by this node's newest snapshot.",
        m.snapshot.map(|l| l.index).unwrap_or(0) as f64,
    );
    e.single(
        "herald_raft_snapshots_built_total",
        "counter",
        "Snapshots built by this node.",
        snaps.built as f64,
    );
    e.single(
        "herald_raft_snapshots_installed_total",
        "counter",
        "Snapshots received from a leader and installed.",
        snaps.installed as f64,
    );
    e.single(
        "herald_raft_snapshot_build_seconds_total",
        "counter",
        "Time spent building snapshots.",
        snaps.build_ms_total as f64 / 1000.0,
    );
    e.single(
        "herald_raft_snapshot_build_seconds_last",
        "gauge",
        "How long the last snapshot build took.",
        snaps.build_ms_last as f64 / 1000.0,
    );

    // Callbacks (coordinator).
    let c = room.coordinator.stats();
    e.single(
        "herald_callback_queue_depth",
        "gauge",
        "Upstream requests queued or in flight to apps' backends.",
        c.upstream_depth as f64,
    );
    e.labeled(
        "herald_callback_failures_total",
        "counter",
        "Callback failures by kind.",
        "kind",
        [
            ("upstream_failed", c.upstream_failed as f64),
            ("upstream_unavailable", c.upstream_unavailable as f64),
            ("upstream_queue_full", c.upstream_queue_full as f64),
            ("session_events", c.event_send_failures as f64),
        ],
    );
    e.labeled(
        "herald_callback_group_members",
        "gauge",
        "Backend endpoints in the app's consumer group (its callbacks list), for apps this node has called back.",
        "app",
        c.apps.iter().map(|g| (g.app.as_str(), g.members as f64)),
    );
    e.labeled(
        "herald_callback_group_unhealthy",
        "gauge",
        "Members of the app's group this node has taken out (cooling down or being probed after a failure).",
        "app",
        c.apps.iter().map(|g| (g.app.as_str(), g.unhealthy as f64)),
    );
    e.labeled(
        "herald_callback_group_queue_depth",
        "gauge",
        "Upstream requests of the app queued or in flight on this node (bounded per app; full means refused).",
        "app",
        c.apps.iter().map(|g| (g.app.as_str(), g.queue_depth as f64)),
    );
    e.single(
        "herald_callback_upstream_ok_total",
        "counter",
        "Upstream requests answered.",
        c.upstream_ok as f64,
    );
    e.single(
        "herald_callback_events_sent_total",
        "counter",
        "Session events accepted by backends.",
        c.events_sent as f64,
    );

    // Cold archive.
    if let Ok(a) = reader.archive_state() {
        e.single(
            "herald_archive_enabled",
            "gauge",
            "1 when removed messages are archived (replicated setting).",
            if a.enabled { 1.0 } else { 0.0 },
        );
        e.single(
            "herald_archive_pending",
            "gauge",
            "Removed messages waiting in the replicated archive outbox.",
            (a.next_id - a.first) as f64,
        );
        e.single(
            "herald_archive_dropped_total",
            "counter",
            "Archive outbox entries dropped because it was full (never archived).",
            a.dropped as f64,
        );
    }
    if let Some(a) = &s.archive {
        e.single(
            "herald_archive_written_total",
            "counter",
            "Rows this node's archiver wrote to MySQL (duplicates ignored by MySQL included).",
            l(&a.written),
        );
        e.single(
            "herald_archive_failures_total",
            "counter",
            "Archive batches that failed (retried).",
            l(&a.failures),
        );
        e.single(
            "herald_archive_up",
            "gauge",
            "1 when the last MySQL call of this node's archiver succeeded.",
            l(&a.up),
        );
    }
    e.finish()
}

/// An app's replicated counters, summed over the groups holding its users and topics.
fn app_counters(node: &crate::node::Node, app: &str) -> herald_raft::AppCounters {
    let mut sum = herald_raft::AppCounters::default();
    for g in node.groups().data() {
        let c = g.reader().counters(app).unwrap_or_default();
        sum.stored += c.stored;
        sum.acked += c.acked;
        sum.expired += c.expired;
        sum.trimmed += c.trimmed;
        sum.published += c.published;
        sum.topic_trimmed += c.topic_trimmed;
    }
    sum
}

/// Every Raft group as this node sees it: its leader, term, applied index and members.
fn groups_json(node: &crate::node::Node) -> Vec<Value> {
    let preferred = crate::balance::preferred_leaders(node.groups());
    node.groups()
        .all()
        .iter()
        .map(|g| {
            let m = g.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            json!({
                "group": g.group(),
                "role": if g.group() == herald_raft::shard::META_GROUP { "meta" } else { "shard" },
                "leader_id": m.current_leader,
                "preferred_leader_id": preferred.get(&g.group()).copied(),
                "term": m.current_term,
                "applied_index": g.reader().applied_index(),
                "voters": membership.voter_ids().collect::<Vec<_>>(),
                "learners": membership.learner_ids().collect::<Vec<_>>(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> ReadyInputs {
        ReadyInputs {
            raft_stopped: None,
            member: true,
            leader_known: true,
            last_log: 5_000,
            applied: 5_000,
            announced: true,
            accepting: true,
        }
    }

    #[test]
    fn a_caught_up_announced_member_is_ready() {
        assert!(not_ready_reasons(&ready()).is_empty());
        // Behind by exactly the allowed lag still counts as caught up.
        let i = ReadyInputs {
            applied: 5_000 - READY_MAX_LAG,
            ..ready()
        };
        assert!(not_ready_reasons(&i).is_empty());
    }

    #[test]
    fn a_node_outside_the_membership_is_not_ready() {
        let i = ReadyInputs {
            member: false,
            ..ready()
        };
        assert_eq!(not_ready_reasons(&i), vec!["not a member of the cluster"]);
    }

    #[test]
    fn a_lagging_node_is_not_ready() {
        let i = ReadyInputs {
            applied: 5_000 - READY_MAX_LAG - 1,
            ..ready()
        };
        assert_eq!(not_ready_reasons(&i), vec!["applying: 3999 of 5000"]);
    }

    #[test]
    fn a_draining_node_is_not_ready() {
        let i = ReadyInputs {
            accepting: false,
            ..ready()
        };
        assert_eq!(not_ready_reasons(&i), vec!["draining"]);
    }

    #[test]
    fn every_reason_is_listed() {
        let i = ReadyInputs {
            raft_stopped: Some("storage error: No space left on device".into()),
            member: false,
            leader_known: false,
            last_log: 10_000,
            applied: 0,
            announced: false,
            accepting: false,
        };
        // Without a leader the lag is not judged (the log end is not known to be current).
        assert_eq!(
            not_ready_reasons(&i),
            vec![
                "raft stopped: storage error: No space left on device",
                "not a member of the cluster",
                "no leader known",
                "not announced yet (clearing sessions of a previous run)",
                "draining",
            ]
        );
    }
}
