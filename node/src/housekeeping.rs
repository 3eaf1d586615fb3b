//! Work the leader does on a timer: delete what expired by log time.

use std::time::Duration;

use herald_raft::{Op, OpResult};
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
        if !node.raft().is_leader() {
            continue;
        }
        expire_due(&node).await;
    }
}

async fn expire_due(node: &Node) {
    loop {
        let due = match node.raft().reader().next_expiry_ms() {
            // Due by cluster time (what the Expire entry will be stamped with), not this
            // node's clock: a leader's clock running ahead would only propose empty Expires.
            Ok(Some(t)) => t <= node.raft().cluster_now_ms(),
            Ok(None) => false,
            Err(e) => {
                debug!(error = %e, "cannot read the expiry index");
                false
            }
        };
        if !due {
            return;
        }
        match node.raft().write_one(Op::Expire { max: EXPIRE_BATCH }).await {
            Ok((
                OpResult::Expired {
                    messages,
                    topic_entries,
                    keys,
                },
                log_index,
            )) => {
                info!(messages, topic_entries, keys, log_index, "expired by log time");
                if messages + topic_entries + keys < EXPIRE_BATCH {
                    return;
                }
            }
            Ok(_) => return,
            Err(e) => {
                debug!(error = %e, "expire not committed");
                return;
            }
        }
    }
}
