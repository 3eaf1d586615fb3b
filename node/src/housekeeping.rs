//! Work a group's leader does on a timer: delete what expired by log time (in every group this
//! node leads).

use std::time::Duration;

use herald_raft::{Op, OpResult, RaftNode};
use tracing::{debug, info};

use crate::node::Node;

/// Most items one Expire entry deletes, so an entry's apply stays short.
const EXPIRE_BATCH: u32 = 10_000;

pub async fn run(node: Node) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.cancel_token().cancelled() => return,
            _ = tick.tick() => {}
        }
        let leading = node.groups().all().iter().filter(|g| g.is_leader());
        futures::future::join_all(leading.map(expire_due)).await;
    }
}

async fn expire_due(raft: &RaftNode) {
    let group = raft.group();
    loop {
        let due = match raft.reader().next_expiry_ms() {
            // Due by cluster time (what the Expire entry will be stamped with), not this
            // node's clock: a leader's clock running ahead would only propose empty Expires.
            Ok(Some(t)) => t <= raft.cluster_now_ms(),
            Ok(None) => false,
            Err(e) => {
                debug!(group, error = %e, "cannot read the expiry index");
                false
            }
        };
        if !due {
            return;
        }
        match raft.write_one(Op::Expire { max: EXPIRE_BATCH }).await {
            Ok((
                OpResult::Expired {
                    messages,
                    topic_entries,
                    keys,
                },
                log_index,
            )) => {
                info!(
                    group,
                    messages, topic_entries, keys, log_index, "expired by log time"
                );
                if messages + topic_entries + keys < EXPIRE_BATCH {
                    return;
                }
            }
            Ok(_) => return,
            Err(e) => {
                debug!(group, error = %e, "expire not committed");
                return;
            }
        }
    }
}
