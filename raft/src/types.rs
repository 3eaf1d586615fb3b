//! The command language of Herald's replicated state machine: what a log entry asks for
//! ([`Request`] = a batch of [`Op`]s stamped with the leader's time) and what applying it answers
//! ([`Response`] = one [`OpResult`] per op), plus the records the state machine keeps.
//!
//! Everything here is encoded with bincode into log entries and snapshots. Compatibility rule:
//! append new enum variants and new trailing struct fields only behind a new variant; never reorder.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A Raft member's id (stable for the life of its data dir).
pub type NodeId = u64;

/// A Raft group's id within a node's log engine. Group 0 is the one a single-group node runs (and
/// keeps the data-dir layout of the time before groups).
pub type GroupId = u32;

openraft::declare_raft_types!(
    /// openraft type configuration for Herald.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotDir,
        AsyncRuntime = crate::runtime::HeraldRuntime,
);

/// Commonly used openraft types, instantiated for Herald.
pub mod typ {
    use super::{NodeId, TypeConfig};
    pub type Raft = openraft::Raft<TypeConfig>;
    pub type Node = openraft::BasicNode;
    pub type Entry = openraft::Entry<TypeConfig>;
    pub type LogId = openraft::LogId<NodeId>;
    pub type Vote = openraft::Vote<NodeId>;
    pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
    pub type Snapshot = openraft::Snapshot<TypeConfig>;
    pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
    pub type StorageError = openraft::StorageError<NodeId>;
    pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;
    pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
    pub type RpcError<E = openraft::error::Infallible> =
        openraft::error::RPCError<NodeId, Node, RaftError<E>>;
    pub type StreamingError<E> = openraft::error::StreamingError<TypeConfig, E>;
    pub type Fatal = openraft::error::Fatal<NodeId>;
    pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Node>;
    pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, Node>;
    pub type InitializeError = openraft::error::InitializeError<NodeId, Node>;
    pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
    pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
    pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
    pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
    pub type SnapshotResponse = openraft::raft::SnapshotResponse<NodeId>;
}

/// A snapshot on disk: a directory holding a RocksDB checkpoint of the state machine.
///
/// The directory is immutable once built or received; its files are streamed in chunks to a
/// follower and installed there by hard-linking (or copying) them into a fresh state-machine dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDir {
    pub path: PathBuf,
}

/// One log entry's payload: ops committed together, applied atomically in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Cluster time (unix ms) when the leader built the entry: the members' clocks, never the
    /// leader's alone (`crate::clock`). The state machine's log time is
    /// `max(previous log time, ts_ms)`, so it never goes back even across leader changes; TTLs are
    /// judged by log time only, never by a replica's clock.
    pub ts_ms: u64,
    /// Shared, so that cloning an entry (the log store's cache of recent entries hands out
    /// clones) does not copy its ops. Stored and sent exactly as a plain list.
    #[serde(with = "shared_ops")]
    pub ops: Arc<Vec<Op>>,
}

impl Request {
    pub fn new(ts_ms: u64, ops: Vec<Op>) -> Self {
        Request {
            ts_ms,
            ops: Arc::new(ops),
        }
    }
}

/// `Arc<Vec<Op>>` on the wire and on disk as the `Vec<Op>` it holds (bincode encodes both the
/// same way; this keeps serde's `rc` feature out of the build).
mod shared_ops {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Op;

    pub(super) fn serialize<S: Serializer>(ops: &Arc<Vec<Op>>, s: S) -> Result<S::Ok, S::Error> {
        ops.as_slice().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<Op>>, D::Error> {
        Vec::<Op>::deserialize(d).map(Arc::new)
    }
}

/// What applying one entry produced: one result per op, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<OpResult>,
}

/// One write to the replicated state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Create or replace an app, as written before `AppLimits::max_targets` (read from old log
    /// entries only; new ones are [`Op::PutApp`]).
    PutAppV1(crate::legacy::AppConfigV1),
    /// Delete an app and everything it owns (sessions, mailboxes, topics, counters).
    DeleteApp { app: String },
    /// Record a node's client-facing addresses (proposed by each node at start).
    SetNode(NodeInfo),
    /// A client session is live on `node` (the register service). Fences older sessions of the same
    /// device and applies the app's multi-device policy (newest wins).
    Register(Register),
    /// A session ended. Ignored unless `epoch` is the device's current epoch.
    Unregister {
        app: String,
        user: String,
        device: String,
        epoch: u64,
    },
    /// Every session on `node` registered before this entry goes offline (node lost or restarted).
    NodeDown { node: NodeId },
    /// An admin or API kick: drop the user's sessions (one device or all).
    Kick {
        app: String,
        user: String,
        device: Option<String>,
        reason: String,
    },
    /// Store a QoS-1 message in the mailbox of each target user.
    Enqueue(Enqueue),
    /// Batched per-device cursor moves (delivered / acked); trims what every device has acked.
    Cursors(Vec<CursorUpdate>),
    /// Append a message to a topic's retained log (a room, a tag, or `*` = app broadcast).
    Publish(Publish),
    /// Delete what expired by log time (messages, topic entries, idempotency keys), at most `max`
    /// items. Proposed by the leader when its state shows something due.
    Expire { max: u32 },
    /// Drop session events up to and including `upto` from the callback outbox (they were sent).
    EventsDone { upto: u64 },
    /// Turn the archive outbox on or off: while on, every mailbox message removed by an ack, its
    /// TTL or the mailbox cap is also appended to the archive outbox (same write batch). Entries
    /// already in the outbox stay when it is turned off.
    SetArchive { enabled: bool },
    /// Drop archive entries up to and including `upto` (they are in the cold archive).
    ArchiveDone { upto: u64 },
    /// Create or replace an app, as written before `AppConfig::client_publish` (read from old log
    /// entries only; new ones are [`Op::PutApp`]).
    PutAppV2(crate::legacy::AppConfigV2),
    /// [`Op::Register`] that must not replace a session of the device newer than the proposer
    /// saw: if the device's current session has an epoch above `seen_epoch` (0: none seen), the
    /// op changes nothing and yields [`OpResult::Superseded`]. A registration that commits late
    /// (its HELLO already failed) thus never ends the login that replaced it.
    RegisterSeen { register: Register, seen_epoch: u64 },
    /// Create or replace an app.
    PutApp(AppConfig),
    /// [`Op::Publish`], and the message also becomes the topic's retained message (MQTT's retain
    /// flag), replacing the one before; an empty payload clears it instead (the empty message is
    /// still published). `ttl_ms` > 0: the retained message expires that long after this entry's
    /// log time (MQTT 5.0 Message Expiry Interval); 0: kept until replaced or cleared. Touches the
    /// topic's state only. A refused or duplicate publish leaves the retained message as it was.
    PublishRetained { publish: Publish, ttl_ms: u64 },
    /// A session starts keeping its subscriptions (MQTT's persistent session), in the entry of its
    /// registration, after it. Applies only if the device's current session is the one
    /// `node`/`conn`/`session` registered (else [`OpResult::Superseded`]); yields
    /// [`OpResult::Kept`]. See [`KeptSession`] for what is kept and for how long.
    SessionStart(SessionStart),
    /// A change to the kept subscriptions of the session of `epoch`: ignored (answering
    /// [`OpResult::Superseded`]) unless that session is the device's current one and keeps its
    /// subscriptions, so a stale connection never overwrites a newer one's.
    SessionSubs {
        app: String,
        user: String,
        device: String,
        epoch: u64,
        change: SubsChange,
    },
}

/// A persistent session's start ([`Op::SessionStart`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    pub app: String,
    pub user: String,
    pub device: String,
    /// The registration this start belongs to (the connection that holds the session).
    pub node: NodeId,
    pub conn: u64,
    pub session: u32,
    /// Drop what the device's earlier sessions kept (MQTT Clean Start / Clean Session 1).
    pub clean: bool,
    /// How long the kept subscriptions outlive the session, in seconds ([`KEPT_FOREVER`]: no
    /// end). 0: nothing is kept beyond this connection (the start only reads, then drops, what
    /// an earlier session kept).
    pub expiry_s: u32,
}

/// A [`SessionStart::expiry_s`] that never ends (MQTT 5.0's 0xFFFFFFFF, MQTT 3.1.1's Clean
/// Session 0).
pub const KEPT_FOREVER: u32 = u32::MAX;

/// Most subscriptions one kept session holds (the node's limit of topics per session).
pub const MAX_KEPT_SUBSCRIPTIONS: usize = 128;

/// Longest kept topic filter, in bytes (the node's limit of a topic name).
pub const MAX_KEPT_FILTER: usize = 256;

/// What [`Op::SessionSubs`] changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubsChange {
    /// Add these subscriptions, or replace the options of one with the same filter.
    Subscribe(Vec<KeptSubscription>),
    /// Remove the subscriptions with these filters.
    Unsubscribe(Vec<String>),
    /// A new expiry interval (seconds) for when the session ends (MQTT 5.0 DISCONNECT).
    Expiry(u32),
}

/// One subscription of a kept session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptSubscription {
    /// A topic name or filter, as the client gave it.
    pub filter: String,
    /// The client's subscription options, kept as given and handed back (opaque here; the MQTT
    /// listener stores MQTT 5.0's options byte).
    pub options: u32,
}

/// The subscriptions a device's persistent session keeps, keyed by (app, user, device): user
/// state, like the registry.
///
/// Kept while a session of the device lives (`expires_ms` 0); when that session ends (unregister,
/// node down, kick, the app's device policy) the record expires `expiry_s` later by log time
/// (through the expiry index), or at once with `expiry_s` 0. A new login of the same device
/// takes the record over (it does not end it); a start with `clean` replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptSession {
    /// The session ([`Session::epoch`]) that started or took over the record: only it may change it.
    pub epoch: u64,
    pub expiry_s: u32,
    /// Log time the record expires; 0 while a session of the device lives; `u64::MAX`: never.
    pub expires_ms: u64,
    pub subscriptions: Vec<KeptSubscription>,
}

/// A topic's retained message (MQTT's retain flag), keyed by (app, topic): topic state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetainedMessage {
    /// The topic seq the message got when it was published.
    pub seq: u64,
    pub msg_id: String,
    pub payload: Bytes,
    /// Log time it was published, and when it expires (0: never).
    pub pushed_ms: u64,
    pub expires_ms: u64,
}

/// What one op did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpResult {
    /// Op applied with nothing to report.
    Done,
    /// The op was refused; nothing changed. Deterministic, so every replica refuses alike.
    Rejected(Rejection),
    Registered(Registered),
    /// Sessions removed by NodeDown / Kick / Unregister.
    Dropped {
        sessions: u32,
    },
    Enqueued(Enqueued),
    Published(Published),
    /// What an Expire removed: mailbox messages; retained topic messages; idempotency keys,
    /// kept msg-id locations and kept sessions.
    Expired {
        messages: u32,
        topic_entries: u32,
        keys: u32,
    },
    /// A [`Op::RegisterSeen`] refused: the device has a newer session (of `epoch`) than the
    /// proposer saw. Nothing changed.
    Superseded {
        epoch: u64,
    },
    /// A [`Op::SessionStart`] applied: whether the device had a kept session (MQTT's Session
    /// Present; never with `clean`) and its subscriptions, which the new session continues with.
    Kept {
        present: bool,
        subscriptions: Vec<KeptSubscription>,
    },
}

/// Why an op was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("unknown app {0}")]
    UnknownApp(String),
    #[error("payload of {size} bytes exceeds the app's limit of {max}")]
    PayloadTooLarge { size: usize, max: u32 },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A caller-chosen msg id that still names a stored (or recently removed) message of the app.
    #[error("msg id {0:?} is already in use by another message of this app; choose a new one, or retry with the first push's idempotency key")]
    MsgIdInUse(String),
}

/// An app: a tenant of the cluster, isolated from every other app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppConfig {
    pub id: String,
    pub name: String,
    /// HMAC-SHA256 token secrets; the first signs, all verify (so a secret can be rotated).
    pub secrets: Vec<String>,
    /// API keys for server-to-server gRPC calls.
    pub api_keys: Vec<String>,
    pub limits: AppLimits,
    pub policy: DevicePolicy,
    /// The backend's callback endpoints (a consumer group; empty = no callbacks).
    pub callbacks: Vec<String>,
    /// Log time the app was first created.
    pub created_ms: u64,
    /// Topics the app's clients may publish to themselves (MQTT PUBLISH, the native
    /// PUBLISH_TOPIC): topic names or MQTT filters (`chat/+`, `rooms/#`). Empty: none; only the
    /// app's backend publishes.
    pub client_publish: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLimits {
    /// Messages held per user; past it the oldest is dropped and counted as trimmed.
    pub mailbox_cap: u32,
    /// TTL of a stored message when the push gives none, and the most a push may ask for.
    pub default_ttl_ms: u64,
    pub max_ttl_ms: u64,
    /// Messages retained per topic for catch-up; past it the oldest is dropped (counted).
    pub topic_retain: u32,
    /// Largest payload accepted, in bytes.
    pub max_payload: u32,
    /// Most entries one push may list in `targets` (the API refuses more).
    pub max_targets: u32,
}

impl AppLimits {
    /// The limits `herald apps create` uses unless told otherwise.
    pub const STANDARD: AppLimits = AppLimits {
        mailbox_cap: 1000,
        default_ttl_ms: 7 * 24 * 3600 * 1000,
        max_ttl_ms: 30 * 24 * 3600 * 1000,
        topic_retain: 1000,
        max_payload: 32 * 1024,
        max_targets: 1000,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePolicy {
    /// Live sessions per (user, platform); 0 = unlimited. The newest wins.
    pub max_per_platform: u32,
    /// Live sessions per user over all devices; 0 = unlimited. The newest wins.
    pub max_per_user: u32,
}

/// A node's addresses as clients and peers reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub grpc_addr: String,
    /// Plain TCP client listener (host:port), empty if disabled.
    pub client_addr: String,
    /// TLS client listener, empty if disabled.
    pub tls_addr: String,
    /// WebSocket client listener, empty if disabled.
    pub ws_addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub app: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    /// The node that holds the connection.
    pub node: NodeId,
    /// The connection on that node (unique per node process) and the session on it.
    pub conn: u64,
    pub session: u32,
}

/// A session as the registry stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub app: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub node: NodeId,
    pub conn: u64,
    pub session: u32,
    /// Allocated at commit from a counter that only grows; a higher epoch fences a lower one.
    pub epoch: u64,
    /// Log time of registration.
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub epoch: u64,
    /// The device's ack cursor as the state machine knows it.
    pub acked_seq: u64,
    /// Sessions this registration displaced (same device, or over the app's policy).
    pub kicked: Vec<Session>,
}

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub user: String,
    /// Empty: every device of the user; otherwise only these devices.
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enqueue {
    pub app: String,
    pub msg_id: String,
    pub targets: Vec<Target>,
    pub payload: Bytes,
    /// 0 = the app's default; capped at the app's maximum.
    pub ttl_ms: u64,
    /// A key seen before returns the first result and stores nothing.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueued {
    pub msg_id: String,
    /// (user, seq) per target, in target order.
    pub seqs: Vec<(String, u64)>,
    /// True when this is the first result of an earlier push with the same idempotency key.
    pub duplicate: bool,
    pub expires_ms: u64,
}

/// A message held in a user's mailbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub seq: u64,
    pub msg_id: String,
    pub payload: Bytes,
    /// Empty = every device of the user.
    pub devices: Vec<String>,
    /// Log time it was stored and when it expires.
    pub pushed_ms: u64,
    pub expires_ms: u64,
}

/// A device's delivery progress, moved forward only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorUpdate {
    pub app: String,
    pub user: String,
    pub device: String,
    /// Highest mailbox seq written to the device's connection.
    pub delivered: u64,
    /// Highest mailbox seq the device acked (cumulative).
    pub acked: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub delivered: u64,
    pub acked: u64,
    pub platform: String,
    /// Log time of the device's last registration.
    pub last_seen_ms: u64,
}

/// Per-user mailbox bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxMeta {
    /// The seq the next message gets (first message is seq 1).
    pub next_seq: u64,
    /// Messages currently held.
    pub count: u64,
    /// Highest seq dropped by the cap (a resuming device behind it gets a GAP "trimmed").
    pub trimmed_upto: u64,
    /// Highest seq removed because its TTL passed (a hole at or below it that is not trimmed is
    /// reported as GAP "expired"; holes above both were acked by every device they were for).
    pub expired_upto: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    pub app: String,
    /// Topic name; `*` is the app-wide broadcast topic.
    pub topic: String,
    pub msg_id: String,
    pub payload: Bytes,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub msg_id: String,
    pub topic: String,
    pub seq: u64,
    pub duplicate: bool,
}

/// A message in a topic's retained log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicMessage {
    pub seq: u64,
    pub msg_id: String,
    pub payload: Bytes,
    pub pushed_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub next_seq: u64,
    pub count: u64,
    /// Highest seq dropped by the retention cap.
    pub trimmed_upto: u64,
}

/// Per-app counters kept by the state machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppCounters {
    /// Messages stored into mailboxes (one per target user).
    pub stored: u64,
    /// Mailbox messages removed because every device acked them.
    pub acked: u64,
    /// Mailbox messages removed because their TTL passed.
    pub expired: u64,
    /// Mailbox messages dropped by the per-user cap.
    pub trimmed: u64,
    /// Topic messages published, and dropped by the retention cap.
    pub published: u64,
    pub topic_trimmed: u64,
}

/// An online/offline event waiting in the callback outbox (sent at least once by the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// Position in the outbox; `"{app}:{id}"` is the dedupe key a backend sees.
    pub id: u64,
    pub app: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub online: bool,
    pub epoch: u64,
    pub node: NodeId,
    pub at_ms: u64,
}

/// Why a mailbox message left the mailbox (recorded with it in the archive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveOutcome {
    /// Every device it was for acked it.
    Acked,
    /// Its TTL passed (by log time).
    Expired,
    /// The user's mailbox cap pushed it out.
    Trimmed,
}

impl ArchiveOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveOutcome::Acked => "acked",
            ArchiveOutcome::Expired => "expired",
            ArchiveOutcome::Trimmed => "trimmed",
        }
    }
}

/// A removed mailbox message waiting in the archive outbox for the cold archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchivedMessage {
    /// Position in the archive outbox: gapless, increasing, never reused.
    pub id: u64,
    pub app: String,
    pub user: String,
    pub message: StoredMessage,
    /// Log time it was removed, and why.
    pub removed_ms: u64,
    pub outcome: ArchiveOutcome,
}

/// The archive outbox's bookkeeping: the outbox is the contiguous id range `[first, next_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveState {
    /// Whether removed messages are archived (`Op::SetArchive`).
    pub enabled: bool,
    /// Id the next archived message gets (first is 1).
    pub next_id: u64,
    /// Lowest id still in the outbox (== next_id when empty); everything below was archived or
    /// dropped.
    pub first: u64,
    /// Entries dropped because the outbox was full (never archived).
    pub dropped: u64,
}

impl Default for ArchiveState {
    fn default() -> Self {
        ArchiveState {
            enabled: false,
            next_id: 1,
            first: 1,
            dropped: 0,
        }
    }
}

/// What one applied entry did that nodes act on (deliver, kick, fan out, call back).
///
/// Emitted after the entry's write batch is in RocksDB, in log order, on every replica.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyEvent {
    Registered {
        session: Session,
        kicked: Vec<Session>,
    },
    Unregistered {
        session: Session,
    },
    /// Sessions of `node` with epoch <= `upto_epoch` are gone.
    NodeDown {
        node: NodeId,
        upto_epoch: u64,
    },
    Kicked {
        sessions: Vec<Session>,
        reason: String,
    },
    Enqueued {
        app: String,
        user: String,
        message: StoredMessage,
    },
    Published {
        app: String,
        topic: String,
        message: TopicMessage,
        /// The publisher set the retain flag ([`Op::PublishRetained`]).
        retain: bool,
    },
    AppChanged {
        app: String,
    },
    NodeChanged {
        node: NodeId,
    },
    /// New events are in the callback outbox.
    EventsPending,
}

/// Where the state machine reports applied events. Implemented by the node; called on the apply
/// path, so it must only hand events off (bounded queues, `try_send`), never wait.
pub trait ApplyObserver: Send + Sync + 'static {
    fn applied(&self, log_index: u64, events: Vec<ApplyEvent>);
}

/// An observer that ignores everything (tests, tools).
pub struct NoObserver;

impl ApplyObserver for NoObserver {
    fn applied(&self, _log_index: u64, _events: Vec<ApplyEvent>) {}
}
