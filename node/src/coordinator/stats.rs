//! Counters the coordinator keeps for the metrics endpoint: plain atomics, read with a snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since the node started (gauges say so). Relaxed atomics: each value is exact, a
/// snapshot is not one consistent instant.
#[derive(Debug, Default)]
pub struct CoordinatorStats {
    /// Upstream requests accepted into a queue.
    pub upstream_queued: AtomicU64,
    /// Upstream requests refused at once because the app's queue was full.
    pub upstream_queue_full: AtomicU64,
    /// Upstream requests the backend answered with a reply.
    pub upstream_ok: AtomicU64,
    /// Upstream requests the backend answered with an error status (not retried).
    pub upstream_failed: AtomicU64,
    /// Upstream requests that ended unavailable (deadline, attempts, no healthy backend, shutdown).
    pub upstream_unavailable: AtomicU64,
    /// Backend calls for upstream that were retried (after a transport error, UNAVAILABLE or hang).
    pub upstream_retries: AtomicU64,
    /// Gauge: upstream requests queued or in flight on this node, all apps.
    pub upstream_depth: AtomicU64,
    /// Session events a backend accepted (counted per event, duplicates included).
    pub events_sent: AtomicU64,
    /// SessionEvents calls that failed (each is retried).
    pub event_send_failures: AtomicU64,
    /// Session events skipped because their app is gone or has no callbacks any more.
    pub events_skipped: AtomicU64,
    /// EventsDone entries committed by this node.
    pub events_done_commits: AtomicU64,
    /// Events the replicated outbox dropped on overflow, as last read from the state machine.
    pub events_dropped: AtomicU64,
}

impl CoordinatorStats {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// The counters' current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            upstream_queued: l(&self.upstream_queued),
            upstream_queue_full: l(&self.upstream_queue_full),
            upstream_ok: l(&self.upstream_ok),
            upstream_failed: l(&self.upstream_failed),
            upstream_unavailable: l(&self.upstream_unavailable),
            upstream_retries: l(&self.upstream_retries),
            upstream_depth: l(&self.upstream_depth),
            events_sent: l(&self.events_sent),
            event_send_failures: l(&self.event_send_failures),
            events_skipped: l(&self.events_skipped),
            events_done_commits: l(&self.events_done_commits),
            events_dropped: l(&self.events_dropped),
            apps: Vec::new(),
        }
    }
}

/// A copy of [`CoordinatorStats`] plus per-app group state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub upstream_queued: u64,
    pub upstream_queue_full: u64,
    pub upstream_ok: u64,
    pub upstream_failed: u64,
    pub upstream_unavailable: u64,
    pub upstream_retries: u64,
    pub upstream_depth: u64,
    pub events_sent: u64,
    pub event_send_failures: u64,
    pub events_skipped: u64,
    pub events_done_commits: u64,
    pub events_dropped: u64,
    /// One entry per app this node has called back, ordered by app id.
    pub apps: Vec<AppGroupStats>,
}

/// An app's backend group as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppGroupStats {
    pub app: String,
    /// Endpoints in the app's callbacks list.
    pub members: usize,
    /// Of those, taken out (cooling down or being probed).
    pub unhealthy: usize,
    /// Upstream requests of this app queued or in flight on this node.
    pub queue_depth: usize,
}
