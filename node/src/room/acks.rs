//! Client acks and delivery progress, batched into one Raft entry every few milliseconds.
//!
//! Connections record (app, user, device) -> (delivered, acked); records for the same device
//! coalesce (max of each), so the pending map is bounded by the number of local devices whatever
//! the ack rate. A flusher commits the map as one `Op::Cursors` per Raft group holding some of
//! its users (the shards commit at once) and waits for them before the next, so at most one batch
//! per group is in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_raft::{CursorUpdate, GroupId, Groups, Op};
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
    groups: Groups,
    pending: Mutex<HashMap<Key, (u64, u64)>>,
    /// Wakes the flusher early (shutdown drain).
    wake: Notify,
}

impl AckBatcher {
    pub fn new(groups: Groups) -> Self {
        AckBatcher {
            inner: Arc::new(Inner {
                groups,
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
        let groups = &self.inner.groups;
        let mut batches: HashMap<GroupId, (&herald_raft::RaftNode, Vec<CursorUpdate>)> = HashMap::new();
        {
            let mut p = self.inner.pending.lock();
            if p.is_empty() {
                return;
            }
            for ((app, user, device), (delivered, acked)) in std::mem::take(&mut *p) {
                let raft = groups.of_user(&app, &user);
                batches
                    .entry(raft.group())
                    .or_insert_with(|| (raft, Vec::new()))
                    .1
                    .push(CursorUpdate {
                        app: app.to_string(),
                        user: user.to_string(),
                        device: device.to_string(),
                        delivered,
                        acked,
                    });
            }
        }
        let writes = batches.into_iter().map(|(group, (raft, batch))| async move {
            let r = raft.write_one(Op::Cursors(batch.clone())).await;
            (group, batch, r)
        });
        for (group, batch, r) in futures::future::join_all(writes).await {
            self.settle(group, batch, r);
        }
    }

    /// After one group's cursor write: on failure the updates go back for the next round.
    fn settle(
        &self,
        group: GroupId,
        batch: Vec<CursorUpdate>,
        r: Result<(herald_raft::OpResult, u64), herald_raft::WriteError>,
    ) {
        let n = batch.len();
        match r {
            Ok(_) => debug!(devices = n, group, "cursors committed"),
            Err(e) => {
                // Put them back (merged with newer records) for the next round; nothing is lost
                // while the node lives, and a client re-acks after reconnecting anyway.
                warn!(devices = n, group, error = %e, "cursor batch not committed; will retry");
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
