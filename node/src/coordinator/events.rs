//! State callbacks: the leader sends the replicated outbox's session events to each app's backend
//! and commits `Op::EventsDone` once they were taken.
//!
//! Delivery contract (at least once, never lost): events leave the outbox only through
//! `EventsDone { upto }`, committed after every app with events `<= upto` accepted them (or its
//! app is gone / has no callbacks any more). A failure before that commit, a crash or a leader
//! change means the events are sent again, by this node or the next leader, with the same key
//! `"{app}:{id}"`. The one loss is the outbox's own cap: past it the state machine drops the oldest
//! events and counts them, and this loop logs a warning.
//!
//! The outbox is one ordered log for all apps, so an app whose backend stays down holds back
//! `EventsDone` for everyone (other apps' events in the same batch are still sent once, but later
//! batches wait) until the backend returns or the outbox cap drops events.

use herald_proto::callback as pb;
use herald_raft::{Op, RaftNode, SessionEvent, StateReader};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backend::{describe, is_retryable, pick, Backoff};
use super::stats::CoordinatorStats;
use super::{Coordinator, Inner, NO_HEALTHY_BACKEND};

/// What became of one app's events in one round.
enum AppSend {
    Sent,
    /// The app is gone or has no callbacks: nobody to tell.
    Skipped,
    Failed(String),
}

impl Coordinator {
    /// Sends session events from Raft group `raft`'s replicated outbox while this node leads the
    /// group, until `shutdown`.
    ///
    /// Wakes on [`Coordinator::events_pending_in`] and polls every `events_poll` as a fallback
    /// (also to notice that this node became leader). Spawn it once per node and group holding
    /// users.
    pub async fn run_event_sender(&self, raft: RaftNode, shutdown: CancellationToken) {
        let inner = &self.inner;
        let cfg = &inner.config;
        let reader = raft.reader().clone();
        let wake = inner.events_wake(raft.group());
        // Events up to here are known done (an EventsDone this node committed).
        let mut done_upto = 0u64;
        let mut dropped_seen: Option<u64> = None;
        let mut backoff = Backoff::new(cfg.events_backoff_base, cfg.events_backoff_max);
        let mut leading = false;
        let mut wait = false;
        debug!(node_id = inner.node_id, "event sender started");
        loop {
            if wait {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(cfg.events_poll) => {}
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            wait = true;
            let is_leader = raft.is_leader();
            if is_leader != leading {
                leading = is_leader;
                info!(
                    node_id = inner.node_id,
                    leading, "event sender leadership changed"
                );
            }
            if !is_leader {
                continue;
            }
            inner.check_dropped(&reader, &mut dropped_seen);
            let events = match reader.events_since(done_upto, cfg.events_batch) {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "cannot read the callback outbox");
                    continue;
                }
            };
            let Some(upto) = events.last().map(|e| e.id) else {
                continue;
            };
            if !inner.send_round(&raft, &events, &mut backoff, &shutdown).await {
                // Stopped, or no longer leader: whoever leads next sends them again.
                continue;
            }
            let committed = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = raft.write_one(Op::EventsDone { upto }) => r,
            };
            match committed {
                Ok((_, log_index)) => {
                    done_upto = upto;
                    backoff.reset();
                    CoordinatorStats::inc(&inner.stats.events_done_commits);
                    debug!(upto, log_index, events = events.len(), "session events done");
                    // More may be waiting: read again at once.
                    wait = false;
                }
                Err(e) => {
                    // The events went out; unless the entry committed anyway they go out again.
                    warn!(upto, error = %e, "events done not committed; events will be sent again");
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    wait = false;
                }
            }
        }
        debug!(node_id = inner.node_id, "event sender stopped");
    }
}

impl Inner {
    /// The wake-up of group `group`'s event sender.
    pub(super) fn events_wake(&self, group: herald_raft::GroupId) -> std::sync::Arc<tokio::sync::Notify> {
        self.events_wake.lock().entry(group).or_default().clone()
    }

    fn check_dropped(&self, reader: &StateReader, seen: &mut Option<u64>) {
        match reader.events_dropped() {
            Ok(total) => {
                let before = seen.replace(total).unwrap_or(0);
                self.stats
                    .events_dropped
                    .store(total, std::sync::atomic::Ordering::Relaxed);
                if total > before {
                    warn!(
                        dropped = total - before,
                        total, "callback outbox overflowed; the oldest session events were dropped unsent"
                    );
                }
            }
            Err(e) => debug!(error = %e, "cannot read the outbox drop counter"),
        }
    }

    /// Sends one batch, app by app, retrying the apps that failed with backoff until all were
    /// taken. False when interrupted by shutdown or a loss of leadership.
    async fn send_round(
        &self,
        raft: &RaftNode,
        events: &[SessionEvent],
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> bool {
        // Per app, in order of first appearance; each app's events in outbox order.
        let mut pending: Vec<(String, Vec<pb::SessionEvent>)> = Vec::new();
        for e in events {
            let wire = to_wire(raft.group(), e);
            match pending.iter_mut().find(|(app, _)| *app == e.app) {
                Some((_, list)) => list.push(wire),
                None => pending.push((e.app.clone(), vec![wire])),
            }
        }
        loop {
            let mut failed = Vec::new();
            for (app, batch) in pending {
                if shutdown.is_cancelled() {
                    return false;
                }
                match self.send_app(raft.reader(), &app, &batch, shutdown).await {
                    AppSend::Sent => {}
                    AppSend::Skipped => {
                        CoordinatorStats::add(&self.stats.events_skipped, batch.len() as u64);
                        debug!(
                            app,
                            events = batch.len(),
                            "session events skipped: app gone or without callbacks"
                        );
                    }
                    AppSend::Failed(reason) => {
                        warn!(
                            app,
                            events = batch.len(),
                            reason,
                            "session events not delivered; will retry"
                        );
                        failed.push((app, batch));
                    }
                }
            }
            if failed.is_empty() {
                return true;
            }
            pending = failed;
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            if !raft.is_leader() {
                info!(
                    node_id = self.node_id,
                    "no longer leader; the next leader sends the pending session events"
                );
                return false;
            }
        }
    }

    /// One app's events to one member of its group (HRW on the app id, then the next ones).
    async fn send_app(
        &self,
        reader: &StateReader,
        app: &str,
        batch: &[pb::SessionEvent],
        shutdown: &CancellationToken,
    ) -> AppSend {
        // Read the app now: its callbacks may have changed since the events were committed.
        let config = match reader.app(app) {
            Ok(Some(c)) if !c.callbacks.is_empty() => c,
            Ok(_) => return AppSend::Skipped,
            Err(e) => return AppSend::Failed(format!("cannot read app: {e}")),
        };
        let group = self.group_for(&config);
        let members = group.members();
        let mut tried: Vec<String> = Vec::new();
        let mut last_error: Option<String> = None;
        while let Some(claim) = pick(&members, app, &tried) {
            let endpoint = claim.member.endpoint.clone();
            tried.push(endpoint.clone());
            let request = pb::SessionEventsRequest {
                events: batch.to_vec(),
            };
            let timeout = self.config.events_attempt_timeout;
            let result = match claim.member.client() {
                Ok(mut client) => tokio::select! {
                    _ = shutdown.cancelled() => return AppSend::Failed("shutting down".into()),
                    r = tokio::time::timeout(timeout, client.session_events(request)) => r,
                },
                Err(status) => Ok(Err(status)),
            };
            match result {
                Ok(Ok(_)) => {
                    claim.succeeded();
                    CoordinatorStats::add(&self.stats.events_sent, batch.len() as u64);
                    return AppSend::Sent;
                }
                Ok(Err(status)) => {
                    CoordinatorStats::inc(&self.stats.event_send_failures);
                    let reason = describe(&status);
                    if is_retryable(&status) {
                        claim.failed(&reason);
                    } else {
                        // Reachable but refusing: keep it in, try the next member, retry later.
                        claim.succeeded();
                    }
                    last_error = Some(format!("{endpoint}: {reason}"));
                }
                Err(_) => {
                    CoordinatorStats::inc(&self.stats.event_send_failures);
                    claim.failed("call timed out");
                    last_error = Some(format!("{endpoint}: no answer within {timeout:?}"));
                }
            }
        }
        AppSend::Failed(last_error.unwrap_or_else(|| NO_HEALTHY_BACKEND.into()))
    }
}

/// The event as the backend sees it; `key` is the dedupe key, stable across retries and leaders.
fn to_wire(group: herald_raft::GroupId, e: &SessionEvent) -> pb::SessionEvent {
    let kind = if e.online {
        pb::SessionEventKind::Online
    } else {
        pb::SessionEventKind::Offline
    };
    pb::SessionEvent {
        key: event_key(&e.app, group, e.id),
        app: e.app.clone(),
        user: e.user.clone(),
        device: e.device.clone(),
        kind: kind as i32,
        epoch: e.epoch,
        node_id: e.node,
        at_ms: e.at_ms,
        platform: e.platform.clone(),
    }
}

/// The dedupe key of event `id` of `app` in Raft group `group`'s outbox: `<app>:<id>` in group 0
/// (the only group of an unsharded cluster, so its keys stay what they were), `<app>:<group>.<id>`
/// in a shard (each shard numbers its outbox on its own).
pub fn event_key(app: &str, group: herald_raft::GroupId, id: u64) -> String {
    match group {
        0 => format!("{app}:{id}"),
        g => format!("{app}:{g}.{id}"),
    }
}
