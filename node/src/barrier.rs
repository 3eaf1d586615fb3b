//! Read-your-writes across nodes. A write is acknowledged once the leader applied it, but another
//! node applies it a little later (the commit index reaches followers with the next append). A
//! node that is about to answer "does not exist" from its own state machine (an unknown app, a
//! wrong API key, an offline user) first catches up with the leader once: it asks the leader for
//! its applied index and waits, bounded, until it applied as much. Everything acknowledged
//! before the call began is then visible here.

use std::time::{Duration, Instant};

use herald_proto::peer::peer_client::PeerClient;
use herald_proto::peer::AppliedIndexRequest;
use herald_raft::RaftNode;
use tracing::debug;

/// Longest one catch-up takes (the leader's answer plus the local apply).
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(1);

/// Waits until this node has applied everything the leader had applied when asked. Returns
/// whether it did (false: no leader, the leader did not answer, or the apply did not get there in
/// time; the caller answers from what it has). On the leader this returns true at once: it
/// applied every write it acknowledged.
pub async fn catch_up(raft: &RaftNode) -> bool {
    let started = Instant::now();
    let Some(target) = leader_applied(raft).await else {
        return false;
    };
    let reader = raft.reader();
    if reader.applied_index() >= target {
        return true;
    }
    let left = CATCH_UP_LIMIT.saturating_sub(started.elapsed());
    let caught_up = tokio::time::timeout(left, reader.wait_applied(target))
        .await
        .is_ok();
    debug!(
        target,
        caught_up,
        waited_ms = started.elapsed().as_millis() as u64,
        "read barrier"
    );
    caught_up
}

/// The leader's applied index (this node's own if it leads).
async fn leader_applied(raft: &RaftNode) -> Option<u64> {
    let (leader, _) = raft.leader()?;
    if leader == raft.id() {
        return Some(raft.reader().applied_index());
    }
    let channel = raft.peer_channel(leader).ok()?;
    let mut client = PeerClient::new(channel);
    let mut req = tonic::Request::new(AppliedIndexRequest {});
    req.set_timeout(CATCH_UP_LIMIT);
    match tokio::time::timeout(CATCH_UP_LIMIT, client.applied_index(req)).await {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            r.leader.then_some(r.applied_index)
        }
        Ok(Err(e)) => {
            debug!(leader, error = %e, "read barrier: leader did not answer");
            None
        }
        Err(_) => None,
    }
}
