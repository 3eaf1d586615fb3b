//! Shard leaders spread over the nodes, and back after failures heal.
//!
//! A shard's writes are ordered, replicated and fanned out by its leader, so the shards' leaders
//! are what spreads the work. Every shard has a preferred leader: `shard::place` over the
//! metadata group's voters gives each node about S/N of them. Every node checks the shards it is
//! the preferred leader of every [`BALANCE_EVERY`]; for one led by another node it takes the lead
//! (`RaftNode::take_lead`: only once its log has everything the leader's has). A node that was
//! down leads its shards again once it caught up. Elections decide who leads meanwhile, so a
//! failure never waits for this.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use herald_raft::{GroupId, Groups, NodeId};
use tracing::debug;

use crate::node::Node;

/// How often a node looks at the shards it prefers to lead.
pub const BALANCE_EVERY: Duration = Duration::from_secs(3);
/// How long a node leaves a shard alone after trying to take its lead.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The preferred leader of every shard, from the metadata group's voters (every node holds a
/// replica of every shard for now).
pub fn preferred_leaders(groups: &Groups) -> BTreeMap<GroupId, NodeId> {
    let voters: Vec<NodeId> = {
        let m = groups.meta().metrics();
        let m = m.borrow();
        m.membership_config.membership().voter_ids().collect()
    };
    if voters.is_empty() {
        return BTreeMap::new();
    }
    herald_raft::shard::place(groups.shards(), &voters, voters.len())
        .into_iter()
        .filter_map(|(g, replicas)| replicas.first().map(|first| (g, *first)))
        .collect()
}

/// Takes the lead of every shard this node prefers and does not lead, at most once per
/// [`RETRY_AFTER`] each. Returns the shards it stood for.
pub async fn balance_once(node: &Node, tried: &mut HashMap<GroupId, Instant>) -> Vec<GroupId> {
    let groups = node.groups();
    let me = node.config().id;
    let mut stood = Vec::new();
    for (group, preferred) in preferred_leaders(groups) {
        if preferred != me {
            continue;
        }
        let Some(raft) = groups.get(group) else { continue };
        if raft.is_leader() || tried.get(&group).is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            continue;
        }
        match raft.take_lead().await {
            Ok(()) => {
                tried.insert(group, Instant::now());
                stood.push(group);
            }
            Err(why) => debug!(group, %why, "not taking the lead of a preferred shard now"),
        }
    }
    stood
}

/// Runs [`balance_once`] every [`BALANCE_EVERY`] until the node stops (nothing without shards).
pub async fn run(node: Node) {
    if node.groups().shards() == 0 {
        return;
    }
    let mut tried = HashMap::new();
    let mut tick = tokio::time::interval(BALANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.cancel_token().cancelled() => return,
            _ = tick.tick() => {}
        }
        balance_once(&node, &mut tried).await;
    }
}
