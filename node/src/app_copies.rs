//! Apps live in the metadata group and are copied into every shard.
//!
//! A shard applies registrations and pushes against the app's limits and device policy, and the
//! apply must be deterministic on every replica, so the shard cannot look at another group's
//! state: it holds a copy of each app. The metadata group is the authority (the API reads apps
//! there and writes them there first); CreateApp, UpdateApp and DeleteApp then write the same
//! record into every shard before they answer, so an app a call returned is usable in every shard.
//! A call that fails half-way (a shard without a leader, the node stopping) leaves a shard behind;
//! the metadata group's leader compares the copies every [`RECONCILE_EVERY`] and rewrites what
//! differs, so every shard converges on the metadata group's apps.
//!
//! With no shards (one group) there is nothing to copy.

use std::time::Duration;

use herald_raft::{AppConfig, Groups, Op, OpResult, RaftNode, WriteError};
use tracing::{debug, info};

use crate::node::Node;

/// How often the metadata group's leader checks the shards' copies.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// Writes `app` (as the metadata group applied it) into every shard and waits until this node
/// applied each write.
pub async fn put_everywhere(groups: &Groups, app: &AppConfig) -> Result<(), WriteError> {
    if groups.shards() == 0 {
        return Ok(());
    }
    let writes = groups.data().iter().map(|g| async move {
        let (_, index) = g.write_one(Op::PutApp(app.clone())).await?;
        g.reader().wait_applied(index).await;
        Ok::<_, WriteError>(())
    });
    futures::future::join_all(writes).await.into_iter().collect()
}

/// Deletes app `id` (and everything of it) from every shard.
pub async fn delete_everywhere(groups: &Groups, id: &str) -> Result<(), WriteError> {
    if groups.shards() == 0 {
        return Ok(());
    }
    let writes = groups.data().iter().map(|g| async move {
        // Already gone there (an earlier attempt): rejected as unknown, which is the goal.
        g.write_one(Op::DeleteApp { app: id.to_string() }).await?;
        Ok::<_, WriteError>(())
    });
    futures::future::join_all(writes).await.into_iter().collect()
}

/// The metadata group's leader keeps every shard's apps equal to its own, until the node stops.
pub async fn reconcile(node: Node) {
    let groups = node.groups().clone();
    if groups.shards() == 0 {
        return;
    }
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.cancel_token().cancelled() => return,
            _ = tick.tick() => {}
        }
        if !groups.meta().is_leader() {
            continue;
        }
        for shard in groups.data() {
            if let Err(e) = reconcile_shard(&node, shard).await {
                debug!(group = shard.group(), error = %e, "app copies: shard not reconciled now; next round");
            }
        }
    }
}

/// Rewrites the apps of `shard` that differ from the metadata group's, and deletes the ones the
/// metadata group no longer has. The shard is read first, the metadata group second (each after a
/// catch-up with its leader): the API writes the metadata group before the shards, so whatever
/// the shard holds, the metadata group held by then, and a copy written meanwhile is never undone.
/// (A rewrite racing a newer UpdateApp may leave the older record in the shard until the next
/// round, which writes the newer one.)
async fn reconcile_shard(node: &Node, shard: &RaftNode) -> Result<(), WriteError> {
    let store = |e: herald_raft::StoreError| WriteError::Indeterminate(e.to_string());
    let barrier = &node.room().barrier;
    barrier.catch_up(shard).await;
    let have = shard.reader().apps().map_err(store)?;
    let meta = node.groups().meta();
    barrier.catch_up(meta).await;
    let apps = meta.reader().apps().map_err(store)?;
    let stale: Vec<AppConfig> = apps
        .iter()
        .filter(|a| !have.iter().any(|h| same_app(h, a)))
        .cloned()
        .collect();
    let gone: Vec<String> = have
        .iter()
        .filter(|h| !apps.iter().any(|a| a.id == h.id))
        .map(|h| h.id.clone())
        .collect();
    for app in stale {
        let id = app.id.clone();
        let (_, index) = shard.write_one(Op::PutApp(app)).await?;
        info!(group = shard.group(), app = %id, log_index = index, "app copies: shard's copy rewritten");
    }
    for id in gone {
        let (r, index) = shard.write_one(Op::DeleteApp { app: id.clone() }).await?;
        if !matches!(r, OpResult::Rejected(_)) {
            info!(group = shard.group(), app = %id, log_index = index, "app copies: app deleted from a shard");
        }
    }
    Ok(())
}

/// The same app, but for when each group first stored it (`created_ms` is each group's log time).
fn same_app(a: &AppConfig, b: &AppConfig) -> bool {
    let mut a = a.clone();
    a.created_ms = b.created_ms;
    a == *b
}
