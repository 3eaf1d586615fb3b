//! Registrations this node proposed that no connection took: found and unregistered.
//!
//! A HELLO's `Register` may commit after the node already answered it: the write timed out
//! (`NOT_READY`, outcome unknown), the node's state machine lagged past the wait for it, or the
//! registration committed in a later term after an election. Such a session names this node and
//! a connection that never got its WELCOME, so no connection will ever unregister it: without
//! this, it stays in the registry (Status reports the device online; a newer login of the device
//! is the only thing that ends it) until the node goes down.
//!
//! Architecture Invariant: a registration is reaped only when no `register` call of its
//! (connection, session id) is in flight, the local index does not hold it, and the registry still
//! holds exactly that epoch; the `Unregister` is fenced by the epoch, so a reap racing a newer
//! login of the device ends nothing else.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use herald_raft::Op;
use parking_lot::Mutex;
use tracing::{debug, info};

use super::Room;

/// How long after proposing an `Unregister` for an orphan the reaper proposes it again if the
/// registry still holds the session (the first write may not have committed).
const RETRY_MS: u64 = 5_000;
/// Most orphans remembered; beyond, the oldest are forgotten (the node's next restart or a newer
/// login of the device still ends them). A node makes orphans only when writes fail, so this is
/// never reached in practice; it bounds memory if the apply path reports a flood of them.
const MAX_TRACKED: usize = 100_000;

/// (connection id, session id on it).
type Slot = (u64, u32);

#[derive(Debug, Clone)]
struct Committed {
    app: String,
    user: String,
    device: String,
    epoch: u64,
    /// Room clock (ms) of the last `Unregister` proposed for it; 0 = none yet.
    proposed_at: u64,
}

#[derive(Default)]
struct State {
    /// `register` calls in progress, by slot (a slot may be retried while an older attempt's
    /// registration is still uncommitted, hence a count).
    inflight: HashMap<Slot, u32>,
    /// Registrations of this node the state machine applied and no `register` call took yet.
    committed: HashMap<(u64, u32, u64), Committed>,
}

/// Tracks this node's registrations from proposal to a connection taking them.
#[derive(Default)]
pub struct Registrations {
    state: Mutex<State>,
    /// Orphaned registrations unregistered (Unregister proposed), for metrics.
    pub reaped: AtomicU64,
}

/// Held by `register` while its attempt is in flight; dropping it (any exit, or the future being
/// dropped) ends the attempt.
pub struct Attempt {
    room: Arc<Room>,
    slot: Slot,
}

impl Attempt {
    /// The connection took the registration of `epoch`: it is not an orphan.
    pub fn taken(&self, epoch: u64) {
        let mut st = self.room.registrations.state.lock();
        st.committed.remove(&(self.slot.0, self.slot.1, epoch));
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut st = self.room.registrations.state.lock();
        if let Some(n) = st.inflight.get_mut(&self.slot) {
            *n -= 1;
            if *n == 0 {
                st.inflight.remove(&self.slot);
            }
        }
    }
}

impl Registrations {
    /// A `register` of (conn, session id) begins; ends when the returned value is dropped.
    pub fn begin(room: &Arc<Room>, conn: u64, session_id: u32) -> Attempt {
        let slot = (conn, session_id);
        *room.registrations.state.lock().inflight.entry(slot).or_insert(0) += 1;
        Attempt {
            room: room.clone(),
            slot,
        }
    }

    /// The state machine applied a registration naming this node (apply path: only records).
    pub fn applied(&self, s: &herald_raft::Session) {
        let mut st = self.state.lock();
        if st.committed.len() >= MAX_TRACKED {
            debug!("orphan tracker full; forgetting a registration");
            return;
        }
        st.committed.insert(
            (s.conn, s.session, s.epoch),
            Committed {
                app: s.app.clone(),
                user: s.user.clone(),
                device: s.device.clone(),
                epoch: s.epoch,
                proposed_at: 0,
            },
        );
    }

    /// How many registrations are waiting to be taken or reaped (tests, metrics).
    pub fn pending(&self) -> usize {
        self.state.lock().committed.len()
    }
}

impl Room {
    /// Finds the registrations of this node no connection took and proposes their `Unregister`
    /// (called on the room's 1 s sweep; the writes run in their own tasks).
    pub fn reap_orphans(&self) {
        let now = self.now();
        let candidates: Vec<((u64, u32, u64), Committed)> = {
            let st = self.registrations.state.lock();
            st.committed
                .iter()
                .filter(|((conn, sid, _), _)| !st.inflight.contains_key(&(*conn, *sid)))
                .map(|(k, v)| (*k, v.clone()))
                .collect()
        };
        if candidates.is_empty() {
            return;
        }
        let mut done: HashSet<(u64, u32, u64)> = HashSet::new();
        let mut propose: Vec<(u64, u32, u64)> = Vec::new();
        for (key @ (conn, sid, epoch), c) in candidates {
            let live = self
                .sessions_of(&c.app, &c.user)
                .iter()
                .any(|l| l.conn.id == conn && l.session_id == sid && l.epoch == epoch);
            let held = match self
                .user_state(&c.app, &c.user)
                .session(&c.app, &c.user, &c.device)
            {
                Ok(Some(s)) => s.epoch == epoch,
                Ok(None) => false,
                // Cannot tell now: look again on the next sweep.
                Err(_) => continue,
            };
            if live || !held {
                done.insert(key);
            } else if c.proposed_at == 0 || now.saturating_sub(c.proposed_at) >= RETRY_MS {
                propose.push(key);
            }
        }
        let mut st = self.registrations.state.lock();
        st.committed.retain(|k, _| !done.contains(k));
        for key in propose {
            let Some(c) = st.committed.get_mut(&key) else {
                continue;
            };
            let first = c.proposed_at == 0;
            c.proposed_at = now.max(1);
            if first {
                self.registrations.reaped.fetch_add(1, Ordering::Relaxed);
                info!(app = %c.app, user = %c.user, device = %c.device, epoch = c.epoch, conn = key.0,
                    "a registration no connection took; unregistering it");
            }
            let op = Op::Unregister {
                app: c.app.clone(),
                user: c.user.clone(),
                device: c.device.clone(),
                epoch: c.epoch,
            };
            let raft = self.user_group(&c.app, &c.user).clone();
            tokio::spawn(async move {
                if let Err(e) = raft.write_one(op).await {
                    debug!(error = %e, "orphan unregister not committed; retried later");
                }
            });
        }
    }
}
