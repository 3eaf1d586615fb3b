//! Read-your-writes across nodes. A write is acknowledged once the leader applied it, but another
//! node applies it a little later (the commit index reaches followers with the next append). A
//! node that is about to answer "does not exist" from its own state machine (an unknown app, a
//! wrong API key, an offline user) first catches up with the leader once: it asks the leader for
//! its applied index and waits, bounded, until it applied as much. Everything acknowledged
//! before the call began is then visible here.
//!
//! The question to the leader is shared: callers that need a barrier at the same time wait for
//! one answer, as long as that question was sent after their call began (an answer to an older
//! question could miss a write acknowledged in between). So a burst of QoS-0 pushes to offline
//! users, or of refused API keys, costs the leader one `Peer/AppliedIndex` per round trip from
//! this node, not one per request.
//!
//! Each Raft group has its own leader and log, so each has its own question in flight: a catch-up
//! names the group whose state the caller is about to read (the metadata group for apps, the
//! user's shard for sessions).

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_proto::peer::peer_client::PeerClient;
use herald_proto::peer::AppliedIndexRequest;
use herald_raft::{GroupId, RaftNode};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::debug;

/// Longest one catch-up takes (the leader's answer plus the local apply).
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(1);

/// One node's shared read barriers, one per Raft group (kept by the [`crate::room::Room`]).
#[derive(Default, Clone)]
pub struct Barrier {
    groups: Arc<Mutex<std::collections::HashMap<GroupId, Arc<Shared>>>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    answered: Notify,
}

#[derive(Default)]
struct State {
    /// When the question in flight was sent.
    asking: Option<Instant>,
    /// The latest answer: when its question was sent, and the leader's applied index (`None`:
    /// no leader, or it did not answer).
    answer: Option<(Instant, Option<u64>)>,
    /// Questions sent (tests, metrics).
    asked: u64,
}

impl Barrier {
    /// Waits until this node has applied everything the leader had applied when asked (asked
    /// after this call began). Returns whether it did (false: no leader, the leader did not
    /// answer, or the apply did not get there in time; the caller answers from what it has). On
    /// the leader this returns true at once: it applied every write it acknowledged.
    pub async fn catch_up(&self, raft: &RaftNode) -> bool {
        let started = Instant::now();
        let target = match raft.leader() {
            Some((leader, _)) if leader == raft.id() => return true,
            Some(_) => self.leader_applied(raft, started).await,
            None => None,
        };
        let Some(target) = target else {
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

    /// Questions sent to the leaders so far (all groups).
    pub fn asked(&self) -> u64 {
        self.groups.lock().values().map(|g| g.state.lock().asked).sum()
    }

    /// The leader's applied index, from a question sent at or after `since`: a shared one if
    /// there is one, else a new one.
    async fn leader_applied(&self, raft: &RaftNode, since: Instant) -> Option<u64> {
        let deadline = tokio::time::Instant::from_std(since + CATCH_UP_LIMIT);
        let shared = self.groups.lock().entry(raft.group()).or_default().clone();
        loop {
            let answered = shared.answered.notified();
            tokio::pin!(answered);
            {
                let mut st = shared.state.lock();
                if let Some((sent, index)) = st.answer {
                    if sent >= since {
                        return index;
                    }
                }
                if st.asking.is_none() {
                    // Sent from a task of its own: a caller that goes away (its request was
                    // cancelled) must not leave the others waiting for an answer never stored.
                    let sent = Instant::now();
                    st.asking = Some(sent);
                    st.asked += 1;
                    let (shared, raft) = (shared.clone(), raft.clone());
                    tokio::spawn(async move {
                        let index = ask_leader(&raft).await;
                        let mut st = shared.state.lock();
                        st.asking = None;
                        st.answer = Some((sent, index));
                        drop(st);
                        shared.answered.notify_waiters();
                    });
                }
                // Registered before the lock is released: the answer cannot slip past.
                answered.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return None;
            }
        }
    }
}

/// Asks the leader for its applied index (this node's own if it leads).
async fn ask_leader(raft: &RaftNode) -> Option<u64> {
    let (leader, _) = raft.leader()?;
    if leader == raft.id() {
        return Some(raft.reader().applied_index());
    }
    let channel = raft.peer_channel(leader).ok()?;
    let mut client = PeerClient::new(channel);
    let mut req = tonic::Request::new(AppliedIndexRequest { group: raft.group() });
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
