//! Client acks and delivery progress, batched into one Raft entry every few milliseconds.
//!
//! Connections record (app, user, device) -> (delivered, acked); records for the same device
//! coalesce (max of each), so the pending map is bounded by the number of local devices whatever
//! the ack rate. A flusher commits the map as one `Op::Cursors` and waits for it before the next,
//! so at most one batch is in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_raft::{CursorUpdate, Op, RaftNode};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often pending cursor moves are committed.
pub const FLUSH_EVERY: Duration = Duration::from_millis(5);

type Key = (Arc<str>, Arc<str>, Arc<str>);

#[derive(Clone)]
pub struct AckBatcher {
    inner: Arc<Inner>,
}

struct Inner {
    raft: RaftNode,
    pending: Mutex<HashMap<Key, (u64, u64)>>,
    /// Wakes the flusher early (shutdown drain).
    wake: Notify,
}

impl AckBatcher {
    pub fn new(raft: RaftNode) -> Self {
        AckBatcher {
            inner: Arc::new(Inner {
                raft,
                pending: Mutex::new(HashMap::new()),
                wake: Notify::new(),
            }),
        }
    }

    /// Records a device's progress (both cursors only move forward).
    pub fn record(&self, app: &Arc<str>, user: &Arc<str>, device: &Arc<str>, delivered: u64, acked: u64) {
        let mut p = self.inner.pending.lock();
        let e = p
            .entry((app.clone(), user.clone(), device.clone()))
            .or_insert((0, 0));
        e.0 = e.0.max(delivered);
        e.1 = e.1.max(acked);
    }

    pub fn pending(&self) -> usize {
        self.inner.pending.lock().len()
    }

    /// Commits whatever is pending now.
    pub async fn flush(&self) {
        let batch: Vec<CursorUpdate> = {
            let mut p = self.inner.pending.lock();
            if p.is_empty() {
                return;
            }
            std::mem::take(&mut *p)
                .into_iter()
                .map(|((app, user, device), (delivered, acked))| CursorUpdate {
                    app: app.to_string(),
                    user: user.to_string(),
                    device: device.to_string(),
                    delivered,
                    acked,
                })
                .collect()
        };
        let n = batch.len();
        match self.inner.raft.write_one(Op::Cursors(batch.clone())).await {
            Ok(_) => debug!(devices = n, "cursors committed"),
            Err(e) => {
                // Put them back (merged with newer records) for the next round; nothing is lost
                // while the node lives, and a client re-acks after reconnecting anyway.
                warn!(devices = n, error = %e, "cursor batch not committed; will retry");
                let mut p = self.inner.pending.lock();
                for u in batch {
                    let e = p
                        .entry((u.app.into(), u.user.into(), u.device.into()))
                        .or_insert((0, 0));
                    e.0 = e.0.max(u.delivered);
                    e.1 = e.1.max(u.acked);
                }
            }
        }
    }

    /// Flushes every [`FLUSH_EVERY`] until `shutdown`, then once more.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.inner.wake.notified() => {}
            }
            self.flush().await;
        }
        self.flush().await;
    }
}
