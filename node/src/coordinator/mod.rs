//! The coordinator (360's coordinator service): everything a node sends to an app's backend, the
//! gRPC service `herald.callback.v1.Callback` the backend implements.
//!
//! - **Upstream** ([`Coordinator::upstream`]): data a client sent goes to the app's backend and the
//!   reply back to the client. Never blocks the caller: a request joins a bounded per-app queue or
//!   is refused at once ([`UpstreamError::QueueFull`]). One user's requests reach the backend in the
//!   order the node received them (a FIFO per user with one call in flight); different users run
//!   in parallel, up to a per-app limit of concurrent calls. Transport errors, UNAVAILABLE and hung
//!   calls are retried with exponential backoff and jitter, within a bounded number of attempts and
//!   an overall deadline; any other status from the backend is final ([`UpstreamFailure::Failed`]).
//! - **Consumer groups**: an app's `callbacks` list is a group. A user's requests go to the first
//!   member of the user's rendezvous (HRW) order that takes traffic, so they stay on one member.
//!   A member failing at the transport level is taken out for a cool-down and then readmitted by a
//!   single probe request; meanwhile its users move to their next member, in order, because the
//!   request that failed is retried there before the user's later requests are sent.
//! - **State callbacks** ([`Coordinator::run_event_sender`]): on the leader only, session events
//!   from the replicated outbox are sent to each app's backend (dedupe key `"{app}:{id}"`), then
//!   `Op::EventsDone` is committed. At least once: a failure, a crash or a leader change makes the
//!   next leader send them again from the outbox.
//!
//! Architecture Invariant: the coordinator reads replicated state only through `StateReader` and
//! writes only `Op::EventsDone` through `RaftNode`; it knows nothing about client connections (the
//! room server calls it and maps its results to client frames).

mod backend;
mod events;
mod stats;
pub mod test_backend;
mod upstream;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_raft::{AppConfig, NodeId};
use parking_lot::RwLock;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use backend::{Backends, HealthPolicy};
pub use events::event_key;
pub use stats::{AppGroupStats, CoordinatorStats, StatsSnapshot};
use upstream::AppGroup;

/// Tuning of the coordinator. Built with [`CoordinatorConfig::standard`] and adjusted.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Upstream requests one app may have queued or in flight on this node; past it
    /// [`Coordinator::upstream`] answers [`UpstreamError::QueueFull`].
    pub queue_capacity: usize,
    /// Of those, what one client connection may have queued or in flight; past it
    /// [`Coordinator::upstream`] answers [`UpstreamError::ConnShareFull`] to that connection only.
    pub queue_share_per_conn: usize,
    /// Backend calls one app may have in flight at once from this node.
    pub max_inflight_per_app: usize,
    /// How long an upstream request may take from being queued to its outcome.
    pub upstream_deadline: Duration,
    /// Longest single backend call; a call that takes longer counts as a hung member.
    pub attempt_timeout: Duration,
    /// TCP/HTTP2 connect timeout to a backend.
    pub connect_timeout: Duration,
    /// Backend calls one upstream request may make (first try included).
    pub max_attempts: u32,
    /// Backoff between retries of one request: from `backoff_base`, doubling, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long a failed member stays out before a probe; doubles while probes fail.
    pub cooldown: Duration,
    pub cooldown_max: Duration,
    /// Session events read from the outbox per round.
    pub events_batch: usize,
    /// The event sender re-checks the outbox this often even without a wake-up.
    pub events_poll: Duration,
    /// Longest single SessionEvents call.
    pub events_attempt_timeout: Duration,
    /// Backoff between rounds when a backend did not take its events.
    pub events_backoff_base: Duration,
    pub events_backoff_max: Duration,
}

impl CoordinatorConfig {
    /// Values for production: 10,000 queued upstream requests per app, 10 s deadline.
    pub fn standard() -> Self {
        CoordinatorConfig {
            queue_capacity: 10_000,
            queue_share_per_conn: 1_000,
            max_inflight_per_app: 256,
            upstream_deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            max_attempts: 6,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            cooldown: Duration::from_secs(2),
            cooldown_max: Duration::from_secs(30),
            events_batch: 500,
            events_poll: Duration::from_secs(1),
            events_attempt_timeout: Duration::from_secs(5),
            events_backoff_base: Duration::from_millis(100),
            events_backoff_max: Duration::from_secs(10),
        }
    }

    /// Refuses values that would make the coordinator stall or spin.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("queue_capacity", self.queue_capacity as u128),
            ("queue_share_per_conn", self.queue_share_per_conn as u128),
            ("max_inflight_per_app", self.max_inflight_per_app as u128),
            ("max_attempts", u128::from(self.max_attempts)),
            ("events_batch", self.events_batch as u128),
            ("upstream_deadline", self.upstream_deadline.as_micros()),
            ("attempt_timeout", self.attempt_timeout.as_micros()),
            ("connect_timeout", self.connect_timeout.as_micros()),
            ("backoff_base", self.backoff_base.as_micros()),
            ("cooldown", self.cooldown.as_micros()),
            ("events_poll", self.events_poll.as_micros()),
            ("events_attempt_timeout", self.events_attempt_timeout.as_micros()),
            ("events_backoff_base", self.events_backoff_base.as_micros()),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError(format!("{name} must be greater than zero")));
        }
        if self.max_inflight_per_app > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError("max_inflight_per_app is too large".into()));
        }
        let ordered = [
            ("backoff_max", self.backoff_max, "backoff_base", self.backoff_base),
            ("cooldown_max", self.cooldown_max, "cooldown", self.cooldown),
            (
                "events_backoff_max",
                self.events_backoff_max,
                "events_backoff_base",
                self.events_backoff_base,
            ),
        ];
        if let Some((hi, _, lo, _)) = ordered.iter().find(|(_, h, _, l)| h < l) {
            return Err(ConfigError(format!("{hi} must be at least {lo}")));
        }
        Ok(())
    }
}

/// The coordinator's configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid coordinator config: {0}")]
pub struct ConfigError(String);

/// An upstream request refused at once (the room server answers UPSTREAM_UNAVAILABLE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream queue of app {app} is full")]
    QueueFull { app: String },
    #[error("this connection has {share} upstream requests of app {app} queued or in flight, its share of the queue; wait for replies")]
    ConnShareFull { app: String, share: usize },
    #[error("app {app} has no callback endpoint")]
    NoBackend { app: String },
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// What became of an accepted upstream request: the backend's reply payload, or why not.
pub type UpstreamOutcome = Result<Bytes, UpstreamFailure>;

/// Why an accepted upstream request got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamFailure {
    /// The backend answered with an error status that is not retried (UPSTREAM_FAILED).
    #[error("backend answered {code:?}: {message}")]
    Failed { code: tonic::Code, message: String },
    /// No backend answered in time: none healthy, all attempts failed, the deadline passed or the
    /// node is stopping (UPSTREAM_UNAVAILABLE). The request may or may not have reached a backend.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
}

/// The reason an upstream request carries when its app had no member to try.
pub const NO_HEALTHY_BACKEND: &str = "no healthy backend";

/// Handle on the node's coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: CoordinatorConfig,
    /// Sent to backends as `UpstreamRequest.node_id`.
    node_id: NodeId,
    /// Health and clients of every backend endpoint, shared by upstream and events.
    backends: Backends,
    /// Per-app upstream queues and member lists, created on an app's first use.
    groups: RwLock<HashMap<String, Arc<AppGroup>>>,
    stats: CoordinatorStats,
    /// Wakes the event sender of a Raft group when its outbox grew (one sender per group).
    events_wake: parking_lot::Mutex<HashMap<herald_raft::GroupId, Arc<Notify>>>,
    /// Ends per-user upstream tasks; upstream is refused once it is cancelled.
    shutdown: CancellationToken,
    /// The per-user upstream tasks, so shutdown can wait for them.
    tasks: TaskTracker,
}

impl Coordinator {
    /// A coordinator for node `node_id`. Spawns nothing until used; upstream work stops when
    /// `shutdown` is cancelled. Call from within a tokio runtime.
    pub fn new(
        config: CoordinatorConfig,
        node_id: NodeId,
        shutdown: CancellationToken,
    ) -> Result<Coordinator, ConfigError> {
        config.validate()?;
        let policy = HealthPolicy {
            cooldown: config.cooldown,
            cooldown_max: config.cooldown_max,
            connect_timeout: config.connect_timeout,
        };
        Ok(Coordinator {
            inner: Arc::new(Inner {
                config,
                node_id,
                backends: Backends::new(policy),
                groups: RwLock::new(HashMap::new()),
                stats: CoordinatorStats::default(),
                events_wake: Default::default(),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        })
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.inner.config
    }

    /// Queues `payload` from (`user`, `device`) on client connection `conn` for `app`'s backend
    /// and returns where its outcome will arrive. Never waits: a full queue (or the connection's
    /// full share of it), an app without callbacks or a stopping node are refused at once. Every accepted request resolves (reply, `Failed` or `Unavailable`) within
    /// about the configured deadline, even if the receiver was dropped (the data is still sent).
    ///
    /// Must be called from within a tokio runtime (it may spawn the user's delivery task).
    pub fn upstream(
        &self,
        app: &AppConfig,
        conn: u64,
        user: &str,
        device: &str,
        request_id: u64,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<UpstreamOutcome>, UpstreamError> {
        self.inner.enqueue(app, conn, user, device, request_id, payload)
    }

    /// Tells the event sender the outbox grew (call on `ApplyEvent::EventsPending`). Cheap, never
    /// blocks; wake-ups coalesce.
    pub fn events_pending(&self) {
        self.events_pending_in(herald_raft::shard::META_GROUP);
    }

    /// [`Coordinator::events_pending`] for the outbox of Raft group `group`.
    pub fn events_pending_in(&self, group: herald_raft::GroupId) {
        self.inner.events_wake(group).notify_one();
    }

    /// The counters, live.
    pub fn counters(&self) -> &CoordinatorStats {
        &self.inner.stats
    }

    /// The counters plus each app group's members, unhealthy members and queue depth.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snap = self.inner.stats.snapshot();
        let groups: Vec<Arc<AppGroup>> = self.inner.groups.read().values().cloned().collect();
        snap.apps = groups.iter().map(|g| g.stats()).collect();
        snap.apps.sort_by(|a, b| a.app.cmp(&b.app));
        snap
    }

    /// After `shutdown` was cancelled: waits until every upstream task has resolved its requests.
    pub async fn wait_stopped(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}
