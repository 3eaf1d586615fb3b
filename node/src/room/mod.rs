//! The room server: client connections and the sessions on them, and the local indexes that route
//! what the state machine applies (pushes, topic messages, kicks) to the right connections.
//!
//! Architecture Invariant: the room never reads a socket of another connection and never blocks
//! the apply path: the observer only looks up local indexes and hands work to connections through
//! their outboxes (bounded, `try`-style). Mailbox messages are pulled by the connection from the
//! local state machine after a poke, so their order is the state machine's seq order whatever the
//! timing; topic messages are pushed as one shared buffer to every subscriber.

pub mod acks;
pub mod conn;
pub mod listener;
pub mod mqtt;
pub mod observer;
pub mod outbox;
pub mod registrations;
pub mod tls;
mod tls_stream;
pub mod ws;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use herald_proto::client::{frame::Kind, ErrorCode, Frame, KickReason, Push, Qos};
use herald_raft::{GroupId, Groups, RaftNode, StateReader, TopicMessage};
use parking_lot::RwLock;
use prost::Message;
use tracing::{debug, info};

use self::acks::AckBatcher;
use self::outbox::{Close, ConnShared, Kick, Outbound};
use crate::coordinator::Coordinator;

/// The broadcast topic every session is subscribed to.
pub const BROADCAST: &str = "*";
/// Sessions one connection may carry.
pub const MAX_SESSIONS_PER_CONN: usize = 16;
/// Topics one session may subscribe to.
pub const MAX_TOPICS_PER_SESSION: usize = 128;
/// Longest app id, user, device, platform or topic name, in bytes.
pub const MAX_NAME: usize = 256;

/// Room-server settings (from the node config).
#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub node_id: u64,
    pub heartbeat: Duration,
    pub heartbeat_min: Duration,
    pub heartbeat_max: Duration,
    pub max_frame: usize,
    pub auth_timeout: Duration,
    pub send_queue: usize,
    pub max_connections: usize,
    pub accept_rate_per_ip: u32,
}

/// Counters for metrics and status.
#[derive(Default)]
pub struct RoomStats {
    pub connections: AtomicU64,
    pub sessions: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub deliveries: AtomicU64,
    pub acks: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub qos0_dropped: AtomicU64,
    pub rejected_frames: AtomicU64,
    pub rejected_auth: AtomicU64,
    pub rejected_rate: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// MQTT wills waiting for their Will Delay Interval on this node (bounded, see `mqtt.rs`).
    pub mqtt_delayed_wills: AtomicU64,
    /// Latency histogram, per-transport gauges, API push counters, load samples (admin metrics).
    pub ops: crate::admin::metrics::OpsStats,
}

/// A session as the local indexes know it.
#[derive(Clone)]
pub struct LocalSession {
    pub conn: Arc<ConnShared>,
    pub session_id: u32,
    pub device: Arc<str>,
    pub epoch: u64,
}

/// A topic subscription of one local session.
#[derive(Clone)]
pub struct TopicSub {
    pub conn: Arc<ConnShared>,
    pub session_id: u32,
    /// False while the session catches up from the retained log; live messages skip it then (the
    /// catch-up reads them from the state machine instead).
    pub ready: bool,
    /// Live messages at or below this topic seq skip the subscription: the session was told (by
    /// SUBSCRIBED or its replay) that it starts after them. A message is written to the state
    /// machine before the apply path fans it out, so a subscriber that read the topic's seq in
    /// between would otherwise get it live as well, behind the seq it was told.
    pub floor: u64,
}

impl TopicSub {
    /// Whether a live message with topic seq `seq` goes to this subscription.
    pub fn takes(&self, seq: u64) -> bool {
        self.ready && seq > self.floor
    }
}

const SHARDS: usize = 32;

/// One shard of an [`Index`]: app -> key -> entries.
type Shard<T> = RwLock<HashMap<Box<str>, HashMap<Box<str>, Vec<T>>>>;

/// app -> key -> entries, split over shards by the key's hash so lookups from the apply path and
/// connection tasks rarely contend.
struct Index<T> {
    shards: Vec<Shard<T>>,
}

impl<T: Clone> Index<T> {
    fn new() -> Self {
        Index {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &Shard<T> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    fn insert(&self, app: &str, key: &str, v: T) {
        let mut s = self.shard(key).write();
        let entries = s.entry(app.into()).or_default().entry(key.into()).or_default();
        // Most users have one or two sessions on a node: no idle slots for them.
        conn::push_small(entries, v);
    }

    fn remove(&self, app: &str, key: &str, pred: impl Fn(&T) -> bool) {
        let mut s = self.shard(key).write();
        if let Some(m) = s.get_mut(app) {
            if let Some(v) = m.get_mut(key) {
                v.retain(|x| !pred(x));
                if v.is_empty() {
                    m.remove(key);
                }
            }
            if m.is_empty() {
                s.remove(app);
            }
        }
    }

    fn get(&self, app: &str, key: &str) -> Vec<T> {
        self.shard(key)
            .read()
            .get(app)
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    }

    fn with<R>(&self, app: &str, key: &str, f: impl FnOnce(&[T]) -> R) -> R {
        let s = self.shard(key).read();
        let v = s
            .get(app)
            .and_then(|m| m.get(key))
            .map(|v| v.as_slice())
            .unwrap_or(&[]);
        f(v)
    }

    fn update(&self, app: &str, key: &str, f: impl FnOnce(&mut Vec<T>)) {
        let mut s = self.shard(key).write();
        if let Some(v) = s.get_mut(app).and_then(|m| m.get_mut(key)) {
            f(v);
        }
    }

    fn all(&self) -> Vec<T> {
        self.all_where(|_, _| true)
    }

    /// The entries whose (app, key) passes `keep`.
    fn all_where(&self, keep: impl Fn(&str, &str) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for s in &self.shards {
            for (app, m) in s.read().iter() {
                for (_, v) in m.iter().filter(|(key, _)| keep(app, key)) {
                    out.extend(v.iter().cloned());
                }
            }
        }
        out
    }
}

/// The room server of one node.
pub struct Room {
    pub config: RoomConfig,
    /// The node's Raft groups: the metadata group (apps, nodes) and the shards (users, topics).
    pub groups: Groups,
    pub stats: RoomStats,
    pub acks: AckBatcher,
    pub coordinator: Coordinator,
    /// This node's registrations from proposal until a connection takes them (orphans reaped).
    pub registrations: registrations::Registrations,
    /// The shared read barrier (read-your-writes before answering "does not exist").
    pub barrier: crate::barrier::Barrier,
    /// Per group (index = group id): the last log index whose events the observer has handled.
    observed_index: Vec<AtomicU64>,
    /// Per group: the highest `upto_epoch` of a NodeDown of this node the observer has handled:
    /// every registration of this node in that group at or below it was ended by that NodeDown
    /// (epochs count per group).
    declared_down_upto: Vec<AtomicU64>,
    started: Instant,
    next_conn: AtomicU64,
    accepting: AtomicBool,
    conns: RwLock<HashMap<u64, Arc<ConnShared>>>,
    /// (app, user) -> local sessions.
    users: Index<LocalSession>,
    /// (app, topic) -> local subscriptions; `*` holds every session of the app.
    topics: Index<TopicSub>,
    /// app -> filter subscriptions (names with MQTT's `+` / `#`, see [`is_filter`]): matched
    /// against every topic message of the app, live only.
    filters: RwLock<HashMap<Box<str>, Vec<FilterSub>>>,
    /// Client addresses of the other nodes, for BYE/KICKED redirects (refreshed by the node).
    redirects: RwLock<Vec<String>>,
}

impl Room {
    pub fn new(config: RoomConfig, groups: Groups, coordinator: Coordinator) -> Arc<Room> {
        let acks = AckBatcher::new(groups.clone());
        let per_group = || (0..groups.all().len()).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Room {
            config,
            observed_index: per_group(),
            declared_down_upto: per_group(),
            groups,
            stats: RoomStats::default(),
            acks,
            coordinator,
            registrations: Default::default(),
            barrier: Default::default(),
            started: Instant::now(),
            next_conn: AtomicU64::new(1),
            accepting: AtomicBool::new(true),
            conns: RwLock::new(HashMap::new()),
            users: Index::new(),
            topics: Index::new(),
            filters: RwLock::new(HashMap::new()),
            redirects: RwLock::new(Vec::new()),
        })
    }

    /// Called by group `group`'s observer after it handled the events of `index`.
    pub(crate) fn observed(&self, group: GroupId, index: u64) {
        if let Some(o) = self.observed_index.get(group as usize) {
            o.fetch_max(index, Ordering::AcqRel);
        }
    }

    /// Called by group `group`'s observer for a NodeDown of this node.
    pub(crate) fn declared_down(&self, group: GroupId, upto_epoch: u64) {
        if let Some(d) = self.declared_down_upto.get(group as usize) {
            d.fetch_max(upto_epoch, Ordering::AcqRel);
        }
    }

    /// Whether a NodeDown of this node ended the registration with `epoch` in `user`'s group, as
    /// far as the observer has seen; waits (up to 2 s) until it has handled everything applied now.
    pub(crate) async fn ended_by_node_down(&self, app: &str, user: &str, epoch: u64) -> bool {
        let group = self.groups.group_of_user(app, user) as usize;
        let target = self.groups.of_user(app, user).reader().applied_index();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.observed_index[group].load(Ordering::Acquire) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.declared_down_upto[group].load(Ordering::Acquire) >= epoch
    }

    /// The metadata group's state (apps, nodes).
    pub fn meta(&self) -> &StateReader {
        self.groups.meta().reader()
    }

    /// The group holding `user` of `app` (sessions, devices, mailbox).
    pub fn user_group(&self, app: &str, user: &str) -> &RaftNode {
        self.groups.of_user(app, user)
    }

    /// The state of the group holding `user` of `app`.
    pub fn user_state(&self, app: &str, user: &str) -> &StateReader {
        self.groups.of_user(app, user).reader()
    }

    /// The state of the group holding topic `topic` of `app`.
    pub fn topic_state(&self, app: &str, topic: &str) -> &StateReader {
        self.groups.of_topic(app, topic).reader()
    }

    /// Coarse clock: ms since the room started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Unix seconds to judge client tokens by (`iat`, `exp`): cluster time as the members' clocks
    /// tell it ([`RaftNode::cluster_now_ms`]), not this node's clock alone. A node whose clock is
    /// hours behind would otherwise refuse every fresh token as issued in the future (the fault
    /// suite's two-hour run lost its QoS-1 clients so) and accept expired ones; one hours ahead
    /// would end sessions early.
    pub fn token_now_s(&self) -> u64 {
        self.groups.meta().cluster_now_ms() / 1000
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    pub fn set_redirects(&self, addrs: Vec<String>) {
        *self.redirects.write() = addrs;
    }

    pub fn redirects(&self) -> Vec<String> {
        self.redirects.read().clone()
    }

    /// Registers a new connection.
    pub fn add_conn(
        &self,
        peer: std::net::SocketAddr,
        transport: crate::admin::metrics::Transport,
    ) -> Arc<ConnShared> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let idle = (self.config.heartbeat.as_millis() as u64) * 5 / 2;
        let c = Arc::new(ConnShared::new(
            id,
            peer,
            self.now(),
            idle,
            self.config.send_queue,
        ));
        self.conns.write().insert(id, c.clone());
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.stats.ops.conn_opened(id, transport);
        c
    }

    pub fn remove_conn(&self, id: u64) {
        if self.conns.write().remove(&id).is_some() {
            self.stats.connections.fetch_sub(1, Ordering::Relaxed);
            self.stats.disconnects.fetch_add(1, Ordering::Relaxed);
            self.stats.ops.conn_removed(id);
        }
    }

    pub fn conn(&self, id: u64) -> Option<Arc<ConnShared>> {
        self.conns.read().get(&id).cloned()
    }

    /// Makes a session reachable by pushes, broadcasts and kicks.
    pub fn index_session(&self, app: &str, user: &str, s: LocalSession) {
        self.topics.insert(
            app,
            BROADCAST,
            TopicSub {
                conn: s.conn.clone(),
                session_id: s.session_id,
                ready: true,
                floor: 0,
            },
        );
        self.users.insert(app, user, s);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a session and its subscriptions from the indexes.
    pub fn unindex_session(&self, app: &str, user: &str, conn: u64, session_id: u32, topics: &[String]) {
        self.users
            .remove(app, user, |s| s.conn.id == conn && s.session_id == session_id);
        for t in topics.iter().map(String::as_str).chain([BROADCAST]) {
            self.unsubscribe(app, t, conn, session_id);
        }
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }

    /// Subscribes a local session; live messages at or below `floor` skip it (see
    /// [`TopicSub::floor`]).
    pub fn subscribe(
        &self,
        app: &str,
        topic: &str,
        conn: &Arc<ConnShared>,
        session_id: u32,
        ready: bool,
        floor: u64,
    ) {
        if is_filter(topic) {
            let sub = TopicSub {
                conn: conn.clone(),
                session_id,
                ready: true,
                floor: 0,
            };
            let mut f = self.filters.write();
            f.entry(app.into()).or_default().push((topic.into(), sub));
            return;
        }
        self.topics.insert(
            app,
            topic,
            TopicSub {
                conn: conn.clone(),
                session_id,
                ready,
                floor,
            },
        );
    }

    /// Raises the floor of an existing subscription (the implicit broadcast one, whose SUBSCRIBED
    /// comes after the session was indexed).
    pub fn raise_floor(&self, app: &str, topic: &str, conn: u64, session_id: u32, floor: u64) {
        self.topics.update(app, topic, |subs| {
            for s in subs
                .iter_mut()
                .filter(|s| s.conn.id == conn && s.session_id == session_id)
            {
                s.floor = s.floor.max(floor);
            }
        });
    }

    pub fn unsubscribe(&self, app: &str, topic: &str, conn: u64, session_id: u32) {
        if is_filter(topic) {
            let mut f = self.filters.write();
            if let Some(v) = f.get_mut(app) {
                v.retain(|(t, s)| !(&**t == topic && s.conn.id == conn && s.session_id == session_id));
                if v.is_empty() {
                    f.remove(app);
                }
            }
            return;
        }
        self.topics
            .remove(app, topic, |s| s.conn.id == conn && s.session_id == session_id);
    }

    /// Marks a caught-up subscription live if nothing was published since `delivered`; returns
    /// false (stay in catch-up) otherwise. Runs under the topic's shard lock, which the apply path
    /// also takes, so no message falls between the check and the switch; one already written but
    /// not yet fanned out was read by the replay and stays below the raised floor.
    pub fn mark_ready(&self, app: &str, topic: &str, conn: u64, session_id: u32, delivered: u64) -> bool {
        let mut ok = false;
        self.topics.update(app, topic, |subs| {
            let current = self
                .topic_state(app, topic)
                .topic_meta(app, topic)
                .ok()
                .flatten()
                .map(|m| m.next_seq - 1)
                .unwrap_or(0);
            if current <= delivered {
                for s in subs
                    .iter_mut()
                    .filter(|s| s.conn.id == conn && s.session_id == session_id)
                {
                    s.ready = true;
                    s.floor = s.floor.max(delivered);
                }
                ok = true;
            }
        });
        ok
    }

    /// Local sessions of a user.
    pub fn sessions_of(&self, app: &str, user: &str) -> Vec<LocalSession> {
        self.users.get(app, user)
    }

    /// Local sessions per app (metrics, dashboard). Walks the index: for scrapes, not hot paths.
    pub fn sessions_by_app(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for s in &self.users.shards {
            for (app, users) in s.read().iter() {
                *out.entry(app.to_string()).or_insert(0) +=
                    users.values().map(|v| v.len() as u64).sum::<u64>();
            }
        }
        out
    }

    /// Open connections carrying at least one session of an app, per (app, transport name): a
    /// connection shared by several apps counts once under each of them, so the counts of one
    /// transport may add up to more than its connections. Connections whose transport is not
    /// known count as `unknown`. Walks the index: for scrapes, not hot paths.
    pub fn connections_by_app_and_transport(
        &self,
    ) -> std::collections::BTreeMap<(String, &'static str), u64> {
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.users.shards {
            for (app, users) in s.read().iter() {
                for l in users.values().flatten() {
                    seen.insert((app.to_string(), l.conn.id));
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        for (app, conn) in seen {
            let t = self
                .stats
                .ops
                .transport_of(conn)
                .map(|t| t.name())
                .unwrap_or("unknown");
            *out.entry((app, t)).or_insert(0) += 1;
        }
        out
    }

    /// All local sessions (drain, node down).
    pub fn all_sessions(&self) -> Vec<LocalSession> {
        self.users.all()
    }

    /// The local sessions of the users Raft group `group` holds.
    pub fn sessions_of_group(&self, group: GroupId) -> Vec<LocalSession> {
        match self.groups.shards() {
            0 => self.users.all(),
            _ => self
                .users
                .all_where(|app, user| self.groups.group_of_user(app, user) == group),
        }
    }

    /// Wakes the local sessions of `user` whose device the message is for.
    pub fn poke_user(&self, app: &str, user: &str, devices: &[String]) {
        self.users.with(app, user, |sessions| {
            for s in sessions {
                if devices.is_empty() || devices.iter().any(|d| **d == *s.device) {
                    s.conn.poke(s.session_id);
                }
            }
        });
    }

    /// Hands a topic message to every ready local subscriber: one encoded body shared by all,
    /// plus a few bytes per subscriber naming its session. `retain`: its publisher set the retain
    /// flag (the PUSH says RETAIN_SET).
    pub fn fan_out(&self, app: &str, topic: &str, msg: &TopicMessage, retain: bool) -> usize {
        let body = topic_push_body(topic, msg, retain);
        let mut n = 0;
        let send = |s: &TopicSub, n: &mut usize| {
            let (head, head_len) = shared_head(s.session_id, body.len());
            if s.conn.push(Outbound::Shared {
                head,
                head_len,
                body: body.clone(),
            }) {
                *n += 1;
            } else {
                self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
            }
        };
        self.topics.with(app, topic, |subs| {
            for s in subs.iter().filter(|s| s.takes(msg.seq)) {
                send(s, &mut n);
            }
        });
        // Filters: every filter subscription of the app is matched (cost: one match per filter
        // subscription on this node per topic message). The broadcast topic has its own implicit
        // subscription and is never matched by a filter.
        if topic != BROADCAST {
            if let Some(subs) = self.filters.read().get(app) {
                for (_, s) in subs.iter().filter(|(f, _)| herald_mqtt::topic::matches(f, topic)) {
                    send(s, &mut n);
                }
            }
        }
        self.stats.deliveries.fetch_add(n as u64, Ordering::Relaxed);
        let lag = herald_raft::raft_node::now_ms().saturating_sub(msg.pushed_ms);
        self.stats.ops.delivery_latency.observe_n(lag, n as u64);
        n
    }

    /// Online-only delivery to the local sessions of a user; returns how many got it.
    pub fn deliver_direct(
        &self,
        app: &str,
        user: &str,
        devices: &[String],
        msg_id: &str,
        payload: &Bytes,
        at_ms: u64,
    ) -> u32 {
        let mut n = 0;
        self.users.with(app, user, |sessions| {
            for s in sessions {
                if !(devices.is_empty() || devices.iter().any(|d| **d == *s.device)) {
                    continue;
                }
                let f = Frame {
                    kind: Some(Kind::Push(Push {
                        session_id: s.session_id,
                        msg_id: msg_id.to_string(),
                        seq: 0,
                        topic: String::new(),
                        topic_seq: 0,
                        payload: payload.clone(),
                        qos: Qos::AtMostOnce as i32,
                        pushed_at_ms: at_ms,
                        expires_at_ms: 0,
                        retain: 0,
                    })),
                };
                if s.conn
                    .push(Outbound::Frame(herald_proto::frame::encode_to_bytes(&f)))
                {
                    n += 1;
                }
            }
        });
        self.stats.deliveries.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Ends a local session (kick, node down), fenced by epoch.
    pub fn kick_local(&self, conn: u64, session_id: u32, epoch: u64, code: KickReason, reason: &str) {
        if let Some(c) = self.conn(conn) {
            debug!(conn, session_id, epoch, reason, "kicking session");
            c.kick(Kick {
                session_id,
                epoch,
                code,
                reason: reason.into(),
            });
        }
    }

    /// Closes idle connections, unauthenticated ones past the auth timeout, and asks every
    /// connection to check its sessions' token expiry. Runs every second.
    pub fn sweep(&self) {
        self.reap_orphans();
        let now = self.now();
        let now_s = self.token_now_s();
        let auth = self.config.auth_timeout.as_millis() as u64;
        let conns: Vec<Arc<ConnShared>> = self.conns.read().values().cloned().collect();
        for c in conns {
            if !c.authed() {
                if now.saturating_sub(c.opened_at) > auth {
                    c.close(Close::Error(
                        ErrorCode::AuthTimeout,
                        "no HELLO within the auth timeout".into(),
                    ));
                }
            } else if now.saturating_sub(c.last_rx()) > c.idle_limit() {
                c.close(Close::Bye("idle timeout".into(), vec![]));
            } else if c.token_deadline() != 0 && c.token_deadline() <= now_s {
                c.wake();
            }
        }
    }

    /// Stops accepting and asks every connection to leave with a redirect.
    pub fn start_drain(&self) -> usize {
        self.accepting.store(false, Ordering::Relaxed);
        let redirect = self.redirects();
        let conns: Vec<Arc<ConnShared>> = self.conns.read().values().cloned().collect();
        for c in &conns {
            c.close(Close::Bye("draining".into(), redirect.clone()));
        }
        info!(connections = conns.len(), "draining client connections");
        conns.len()
    }
}

/// The encoded `Frame { push: Push { .. } }` of a topic message, without length prefix and
/// without a session id (each receiver's head adds it; protobuf merges the two `push` fields).
/// A filter subscription: the filter and the subscription.
type FilterSub = (Box<str>, TopicSub);

/// Whether a subscription name is a filter (MQTT's syntax: `+` one level, `#` the rest, levels
/// split by `/`) rather than a topic name.
pub fn is_filter(topic: &str) -> bool {
    topic.contains(['+', '#'])
}

pub fn topic_push_body(topic: &str, msg: &TopicMessage, retain: bool) -> Bytes {
    let f = Frame {
        kind: Some(Kind::Push(Push {
            session_id: 0,
            msg_id: msg.msg_id.clone(),
            seq: 0,
            topic: topic.to_string(),
            topic_seq: msg.seq,
            payload: msg.payload.clone(),
            qos: Qos::AtLeastOnce as i32,
            pushed_at_ms: msg.pushed_ms,
            expires_at_ms: 0,
            retain: if retain {
                herald_proto::client::Retain::Set as i32
            } else {
                herald_proto::client::Retain::None as i32
            },
        })),
    };
    let mut b = BytesMut::with_capacity(f.encoded_len());
    f.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// Length prefix + `Frame.push { session_id }` for a shared body of `body_len` bytes.
pub fn shared_head(session_id: u32, body_len: usize) -> ([u8; 16], u8) {
    let tail = Frame {
        kind: Some(Kind::Push(Push {
            session_id,
            ..Default::default()
        })),
    };
    let mut t = BytesMut::with_capacity(12);
    tail.encode(&mut t).expect("small");
    let mut head = [0u8; 16];
    let total = (t.len() + body_len) as u32;
    let mut w = &mut head[..];
    w.put_u32(total);
    w.put_slice(&t);
    (head, (4 + t.len()) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_takes_only_live_messages_after_its_floor() {
        let peer = "127.0.0.1:1".parse().unwrap();
        let conn = Arc::new(ConnShared::new(1, peer, 0, 1_000, 8));
        let sub = |ready, floor| TopicSub {
            conn: conn.clone(),
            session_id: 1,
            ready,
            floor,
        };
        // Told SUBSCRIBED seq 3: seqs 1-3, written before and fanned out after, stay away.
        assert!(!sub(true, 3).takes(3));
        assert!(!sub(true, 3).takes(1));
        assert!(sub(true, 3).takes(4));
        // Catching up from the retained log: nothing live.
        assert!(!sub(false, 0).takes(9));
    }

    #[test]
    fn a_shared_frame_decodes_as_one_push_with_the_session_id() {
        let msg = TopicMessage {
            seq: 7,
            msg_id: "m7".into(),
            payload: Bytes::from_static(b"hello"),
            pushed_ms: 42,
        };
        let body = topic_push_body("room-1", &msg, false);
        let (head, head_len) = shared_head(3, body.len());
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&head[..head_len as usize]);
        wire.extend_from_slice(&body);
        let f = herald_proto::frame::decode(&mut wire, 1 << 16).unwrap().unwrap();
        match f.kind {
            Some(Kind::Push(p)) => {
                assert_eq!(p.session_id, 3);
                assert_eq!(p.topic, "room-1");
                assert_eq!(p.topic_seq, 7);
                assert_eq!(p.msg_id, "m7");
                assert_eq!(&p.payload[..], b"hello");
                assert_eq!(p.pushed_at_ms, 42);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(wire.is_empty());
    }
}
