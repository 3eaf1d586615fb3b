//! A node's members of all the cluster's Raft groups: the metadata group and the shards.
//!
//! A cluster created with `--shards S` (S ≥ 1) runs S + 1 groups on every node: group 0, the
//! metadata group (apps, node addresses), and the shards 1..=S holding per-user state (sessions,
//! mailboxes, cursors, idempotency keys) and topics. A user's shard is [`shard_of`] (app, user), a
//! topic's [`topic_shard`] (app, topic). With S = 0 (a cluster created without `--shards`) group 0
//! holds everything and every lookup here answers it, so the node layer has one code path.
//!
//! Every group runs on the node's one [`RaftHost`]: one log engine, one connection per peer, one
//! raft server. Each group has its own state machine directory and its own apply observer.

use std::sync::Arc;

use tracing::info;

use crate::raft_node::{RaftConfig, RaftHost, RaftNode, StartError};
use crate::shard::{shard_of, topic_shard, META_GROUP};
use crate::types::{ApplyObserver, GroupId, NodeId};

/// Every group this node is a member of. Cheap to clone.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    host: RaftHost,
    /// Index = group id: 0 the metadata group, then the shards.
    groups: Vec<RaftNode>,
    shards: u32,
}

impl Groups {
    /// Opens the node's host and starts its member of every group, `observer(group)` being the
    /// apply observer of each.
    pub async fn start(
        config: RaftConfig,
        observer: impl Fn(GroupId) -> Arc<dyn ApplyObserver>,
    ) -> Result<Groups, StartError> {
        let host = RaftHost::open(&config)?;
        let shards = config.shards;
        let mut groups = Vec::with_capacity(shards as usize + 1);
        for g in 0..=shards {
            match RaftNode::start_group(config.clone(), observer(g), &host, g).await {
                Ok(node) => groups.push(node),
                Err(e) => {
                    for started in &groups {
                        started.shutdown().await;
                    }
                    return Err(e);
                }
            }
        }
        if shards > 0 {
            info!(node_id = config.node_id, shards, "raft groups started");
        }
        Ok(Groups {
            inner: Arc::new(Inner { host, groups, shards }),
        })
    }

    pub fn id(&self) -> NodeId {
        self.meta().id()
    }

    /// The number of shards (0: one group holds everything).
    pub fn shards(&self) -> u32 {
        self.inner.shards
    }

    /// The metadata group (with no shards, the only group).
    pub fn meta(&self) -> &RaftNode {
        &self.inner.groups[META_GROUP as usize]
    }

    /// Group `group`, if this node runs it.
    pub fn get(&self, group: GroupId) -> Option<&RaftNode> {
        self.inner.groups.get(group as usize)
    }

    /// The group holding `user` of `app`.
    pub fn of_user(&self, app: &str, user: &str) -> &RaftNode {
        &self.inner.groups[shard_of(app, user, self.inner.shards) as usize]
    }

    /// The group id holding `user` of `app`.
    pub fn group_of_user(&self, app: &str, user: &str) -> GroupId {
        shard_of(app, user, self.inner.shards)
    }

    /// The group holding topic `topic` of `app` (the broadcast is the topic `*`).
    pub fn of_topic(&self, app: &str, topic: &str) -> &RaftNode {
        &self.inner.groups[topic_shard(app, topic, self.inner.shards) as usize]
    }

    /// The groups holding users and topics: the shards, or the one group when there are none.
    pub fn data(&self) -> &[RaftNode] {
        match self.inner.shards {
            0 => &self.inner.groups[..1],
            _ => &self.inner.groups[1..],
        }
    }

    /// Every group, the metadata group first.
    pub fn all(&self) -> &[RaftNode] {
        &self.inner.groups
    }

    /// Why a group's Raft core stopped, naming the group, or None while all run.
    pub fn fatal(&self) -> Option<String> {
        self.all().iter().find_map(|g| {
            g.fatal().map(|why| match self.inner.shards {
                0 => why,
                _ => format!("raft group {}: {why}", g.group()),
            })
        })
    }

    /// Resolves once any group's core stopped on an error (see [`RaftNode::wait_fatal`]).
    pub async fn wait_fatal(&self) -> String {
        let waits = self.all().iter().map(|g| {
            let g = g.clone();
            Box::pin(async move { (g.group(), g.wait_fatal().await) })
        });
        let ((group, why), _, _) = futures::future::select_all(waits).await;
        match self.inner.shards {
            0 => why,
            _ => format!("raft group {group}: {why}"),
        }
    }

    /// The node's shared host.
    pub fn host(&self) -> &RaftHost {
        &self.inner.host
    }

    /// Reports client connections to peers' probes (every group's).
    pub fn set_load(&self, connections: u64) {
        for g in self.all() {
            g.set_load(connections);
        }
    }

    /// Stops every group.
    pub async fn shutdown(&self) {
        futures::future::join_all(self.all().iter().map(|g| g.shutdown())).await;
    }
}
