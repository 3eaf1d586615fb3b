//! Upstream forwarding: per-app bounded queues, a FIFO and one delivery task per active user,
//! retries across the app's backend group.
//!
//! Queue shape: an app's queue is a map user -> FIFO of requests, with one count (`depth`) of
//! everything queued or in flight, capped by `queue_capacity`. A user's FIFO exists exactly while
//! a delivery task runs for that user; the task sends one request at a time (retries included)
//! and ends when the FIFO is empty. So one user's requests reach the backend in arrival order,
//! while different users proceed in parallel, limited by the app's call semaphore.
//!
//! Each client connection may hold at most `queue_share_per_conn` of an app's queue (queued or in
//! flight, counted per connection id), so one connection cannot fill the whole queue and starve
//! the app's other clients on this node.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use herald_proto::callback::UpstreamRequest;
use herald_raft::AppConfig;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, Semaphore};
use tracing::debug;

use super::backend::{describe, is_retryable, next_available, pick, Backends, Backoff, Member};
use super::stats::{AppGroupStats, CoordinatorStats};
use super::{Inner, UpstreamError, UpstreamFailure, UpstreamOutcome, NO_HEALTHY_BACKEND};

/// One app's backend group and upstream queue on this node.
pub(crate) struct AppGroup {
    pub app: String,
    /// The app's callbacks list as last seen, and its members (rebuilt when the list changes).
    members: RwLock<GroupMembers>,
    queue: Mutex<Queue>,
    /// Caps this app's concurrent backend calls, so one app cannot open unbounded streams.
    calls: Semaphore,
}

/// An app's callbacks list and the members built from it.
struct GroupMembers {
    callbacks: Vec<String>,
    members: Arc<[Arc<Member>]>,
}

struct Queue {
    /// Requests queued or in flight (the capacity check counts both).
    depth: usize,
    /// Per user: requests not yet started, oldest first. Present while the user's task runs.
    users: HashMap<String, VecDeque<Job>>,
    /// Per client connection: its requests queued or in flight (entries at 0 are removed).
    per_conn: HashMap<u64, usize>,
}

struct Job {
    /// The client connection that sent it (its share of the queue).
    conn: u64,
    device: String,
    request_id: u64,
    payload: Bytes,
    /// Queued at + the upstream deadline: the outcome is due by then.
    deadline: Instant,
    reply: oneshot::Sender<UpstreamOutcome>,
}

impl AppGroup {
    fn new(app: &AppConfig, backends: &Backends, max_calls: usize) -> Self {
        AppGroup {
            app: app.id.clone(),
            members: RwLock::new(GroupMembers {
                callbacks: app.callbacks.clone(),
                members: backends.group(&app.callbacks).into(),
            }),
            queue: Mutex::new(Queue {
                depth: 0,
                users: HashMap::new(),
                per_conn: HashMap::new(),
            }),
            calls: Semaphore::new(max_calls),
        }
    }

    /// Follows a change of the app's callbacks list (queued requests use the new list).
    fn refresh(&self, callbacks: &[String], backends: &Backends) {
        if self.members.read().callbacks == callbacks {
            return;
        }
        let members: Arc<[Arc<Member>]> = backends.group(callbacks).into();
        *self.members.write() = GroupMembers {
            callbacks: callbacks.to_vec(),
            members,
        };
    }

    pub fn members(&self) -> Arc<[Arc<Member>]> {
        self.members.read().members.clone()
    }

    pub fn stats(&self) -> AppGroupStats {
        let members = self.members();
        AppGroupStats {
            app: self.app.clone(),
            members: members.len(),
            unhealthy: members.iter().filter(|m| !m.is_healthy()).count(),
            queue_depth: self.queue.lock().depth,
        }
    }
}

impl Inner {
    /// The app's group, created on first use and kept in step with its callbacks list.
    pub(crate) fn group_for(&self, app: &AppConfig) -> Arc<AppGroup> {
        let existing = self.groups.read().get(&app.id).cloned();
        let group = match existing {
            Some(g) => g,
            None => self
                .groups
                .write()
                .entry(app.id.clone())
                .or_insert_with(|| {
                    Arc::new(AppGroup::new(
                        app,
                        &self.backends,
                        self.config.max_inflight_per_app,
                    ))
                })
                .clone(),
        };
        group.refresh(&app.callbacks, &self.backends);
        group
    }

    pub(crate) fn enqueue(
        self: &Arc<Self>,
        app: &AppConfig,
        conn: u64,
        user: &str,
        device: &str,
        request_id: u64,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<UpstreamOutcome>, UpstreamError> {
        if self.shutdown.is_cancelled() {
            return Err(UpstreamError::ShuttingDown);
        }
        if app.callbacks.is_empty() {
            return Err(UpstreamError::NoBackend { app: app.id.clone() });
        }
        let group = self.group_for(app);
        let (tx, rx) = oneshot::channel();
        let job = Job {
            conn,
            device: device.to_string(),
            request_id,
            payload,
            deadline: Instant::now() + self.config.upstream_deadline,
            reply: tx,
        };
        let start_task = {
            let mut q = group.queue.lock();
            if q.depth >= self.config.queue_capacity {
                CoordinatorStats::inc(&self.stats.upstream_queue_full);
                return Err(UpstreamError::QueueFull { app: app.id.clone() });
            }
            let share = self.config.queue_share_per_conn;
            let mine = q.per_conn.entry(conn).or_insert(0);
            if *mine >= share {
                debug!(app = %app.id, conn, share, "upstream refused: the connection's share of the queue is full");
                return Err(UpstreamError::ConnShareFull {
                    app: app.id.clone(),
                    share,
                });
            }
            *mine += 1;
            q.depth += 1;
            match q.users.get_mut(user) {
                Some(fifo) => {
                    fifo.push_back(job);
                    false
                }
                None => {
                    q.users.insert(user.to_string(), VecDeque::from([job]));
                    true
                }
            }
        };
        CoordinatorStats::inc(&self.stats.upstream_queued);
        CoordinatorStats::inc(&self.stats.upstream_depth);
        if start_task {
            let inner = self.clone();
            let user = user.to_string();
            self.tasks.spawn(async move { inner.run_user(group, user).await });
        }
        Ok(rx)
    }

    /// Sends the user's requests one at a time until the user's FIFO is empty.
    async fn run_user(self: Arc<Self>, group: Arc<AppGroup>, user: String) {
        loop {
            let job = {
                let mut q = group.queue.lock();
                match q.users.get_mut(&user).and_then(|fifo| fifo.pop_front()) {
                    Some(job) => job,
                    None => {
                        // Under the same lock as `enqueue`: a request arriving after this starts
                        // a new task.
                        q.users.remove(&user);
                        return;
                    }
                }
            };
            let outcome = self.deliver(&group, &user, &job).await;
            {
                let mut q = group.queue.lock();
                q.depth -= 1;
                if let Some(n) = q.per_conn.get_mut(&job.conn) {
                    *n -= 1;
                    if *n == 0 {
                        q.per_conn.remove(&job.conn);
                    }
                }
            }
            CoordinatorStats::dec(&self.stats.upstream_depth);
            match &outcome {
                Ok(_) => CoordinatorStats::inc(&self.stats.upstream_ok),
                Err(UpstreamFailure::Failed { .. }) => CoordinatorStats::inc(&self.stats.upstream_failed),
                Err(UpstreamFailure::Unavailable(reason)) => {
                    CoordinatorStats::inc(&self.stats.upstream_unavailable);
                    debug!(app = %group.app, user, request_id = job.request_id, reason, "upstream unavailable");
                }
            }
            // The client may be gone; the request was still sent.
            let _ = job.reply.send(outcome);
        }
    }

    /// One request: pick the user's member, call, retry on member failures until an answer, the
    /// attempt limit or the deadline.
    async fn deliver(&self, group: &AppGroup, user: &str, job: &Job) -> UpstreamOutcome {
        let cfg = &self.config;
        let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
        let mut attempts = 0u32;
        // Why the last try did not work, reported if the deadline passes.
        let mut last_error: Option<String> = None;
        let mut health = self.backends.subscribe();
        loop {
            if self.shutdown.is_cancelled() {
                return Err(UpstreamFailure::Unavailable("the node is shutting down".into()));
            }
            let members = group.members();
            if members.is_empty() {
                return Err(UpstreamFailure::Unavailable(format!(
                    "app {} has no callback endpoint",
                    group.app
                )));
            }
            if Instant::now() >= job.deadline {
                let reason = if members.iter().all(|m| !m.is_healthy()) {
                    NO_HEALTHY_BACKEND.to_string()
                } else {
                    last_error.unwrap_or_else(|| "deadline passed before a backend call".into())
                };
                return Err(UpstreamFailure::Unavailable(reason));
            }
            let permit = tokio::select! {
                _ = self.shutdown.cancelled() => continue,
                p = tokio::time::timeout_at(job.deadline.into(), group.calls.acquire()) => match p {
                    Ok(Ok(p)) => p,
                    // Closed never happens (the semaphore is never closed); timeout = deadline.
                    _ => continue,
                },
            };
            // Mark before picking: a health change after this wakes the wait below.
            health.borrow_and_update();
            let Some(claim) = pick(&members, user, &[]) else {
                drop(permit);
                last_error = Some(NO_HEALTHY_BACKEND.into());
                let wake = next_available(&members).map_or(job.deadline, |t| t.min(job.deadline));
                tokio::select! {
                    _ = self.shutdown.cancelled() => {}
                    _ = health.changed() => {}
                    _ = tokio::time::sleep_until(wake.into()) => {}
                }
                continue;
            };
            attempts += 1;
            let left = job.deadline.saturating_duration_since(Instant::now());
            let call_timeout = cfg.attempt_timeout.min(left);
            let endpoint = claim.member.endpoint.clone();
            let request = UpstreamRequest {
                app: group.app.clone(),
                user: user.to_string(),
                device: job.device.clone(),
                request_id: job.request_id,
                payload: job.payload.clone(),
                node_id: self.node_id,
            };
            let result = match claim.member.client() {
                Ok(mut client) => tokio::select! {
                    _ = self.shutdown.cancelled() => continue,
                    r = tokio::time::timeout(call_timeout, client.upstream(request)) => r,
                },
                Err(status) => Ok(Err(status)),
            };
            drop(permit);
            match result {
                Ok(Ok(reply)) => {
                    claim.succeeded();
                    return Ok(reply.into_inner().payload);
                }
                Ok(Err(status)) if !is_retryable(&status) => {
                    // The backend's own answer: final, and the member is fine.
                    claim.succeeded();
                    return Err(UpstreamFailure::Failed {
                        code: status.code(),
                        message: status.message().to_string(),
                    });
                }
                Ok(Err(status)) => {
                    let reason = describe(&status);
                    claim.failed(&reason);
                    last_error = Some(format!("{endpoint}: {reason}"));
                }
                Err(_) if call_timeout == cfg.attempt_timeout => {
                    claim.failed("call timed out");
                    last_error = Some(format!("{endpoint}: no answer within {call_timeout:?}"));
                }
                Err(_) => {
                    // Cut short by the request's deadline, not a verdict on the member.
                    drop(claim);
                    last_error = Some(format!("{endpoint}: no answer before the deadline"));
                }
            }
            if attempts >= cfg.max_attempts {
                return Err(UpstreamFailure::Unavailable(format!(
                    "gave up after {attempts} attempts; last: {}",
                    last_error.unwrap_or_default()
                )));
            }
            CoordinatorStats::inc(&self.stats.upstream_retries);
            let delay = backoff
                .next_delay()
                .min(job.deadline.saturating_duration_since(Instant::now()));
            debug!(app = %group.app, user, request_id = job.request_id, attempts, delay_ms = delay.as_millis() as u64,
                error = last_error.as_deref().unwrap_or_default(), "upstream call failed; retrying");
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}
