//! Turns what the state machine applied into work for local connections. Called on the apply
//! path: it only reads local indexes and queues (pokes, shared frames, kicks), never waits.

use std::sync::{Arc, OnceLock};

use herald_proto::client::KickReason;
use herald_raft::{ApplyEvent, ApplyObserver, GroupId};
use tracing::info;

use super::Room;

/// The observer of one of the node's Raft groups. Created before the room (Raft must exist
/// first), connected to it with [`NodeObserver::attach`]; events applied before that (start-up
/// replay) concern no connection.
#[derive(Default)]
pub struct NodeObserver {
    group: GroupId,
    room: OnceLock<Arc<Room>>,
}

impl NodeObserver {
    pub fn new(group: GroupId) -> NodeObserver {
        NodeObserver {
            group,
            room: OnceLock::new(),
        }
    }

    pub fn attach(&self, room: Arc<Room>) {
        let _ = self.room.set(room);
    }
}

impl ApplyObserver for NodeObserver {
    fn applied(&self, log_index: u64, events: Vec<ApplyEvent>) {
        let Some(room) = self.room.get() else { return };
        handle(room, self.group, events);
        room.observed(self.group, log_index);
    }
}

fn handle(room: &Arc<Room>, group: GroupId, events: Vec<ApplyEvent>) {
    let me = room.config.node_id;
    for e in events {
        match e {
            ApplyEvent::Enqueued { app, user, message } => room.poke_user(&app, &user, &message.devices),
            ApplyEvent::Published {
                app,
                topic,
                message,
                retain,
            } => {
                room.fan_out(&app, &topic, &message, retain);
            }
            ApplyEvent::Registered { session, kicked } => {
                if session.node == me {
                    room.registrations.applied(&session);
                }
                for k in kicked.iter().filter(|k| k.node == me) {
                    // BUG INJECTION (test-only cargo feature `bug-stale-registry`, for the
                    // jepsen suite): the older session of a device that logged in again is
                    // not ended, so it keeps receiving from a stale registry entry.
                    #[cfg(feature = "bug-stale-registry")]
                    if k.device == session.device {
                        continue;
                    }
                    let code = if k.device == session.device {
                        KickReason::Replaced
                    } else {
                        KickReason::Policy
                    };
                    let reason = if code == KickReason::Replaced {
                        format!("replaced by a newer login on node {}", session.node)
                    } else {
                        "over the app's session limit; a newer login won".to_string()
                    };
                    room.kick_local(k.conn, k.session, k.epoch, code, &reason);
                }
            }
            ApplyEvent::Kicked { sessions, reason } => {
                for s in sessions.iter().filter(|s| s.node == me) {
                    room.kick_local(s.conn, s.session, s.epoch, KickReason::Admin, &reason);
                }
            }
            ApplyEvent::NodeDown { node, upto_epoch } if node == me => {
                room.declared_down(group, upto_epoch);
                // Epochs count per group: only the sessions registered in this one.
                let local = room.sessions_of_group(group);
                let mut n = 0;
                for s in local.iter().filter(|s| s.epoch <= upto_epoch) {
                    room.kick_local(
                        s.conn.id,
                        s.session_id,
                        s.epoch,
                        KickReason::NodeDown,
                        "node declared down",
                    );
                    n += 1;
                }
                if n > 0 {
                    info!(
                        sessions = n,
                        group, "this node was declared down; its sessions end"
                    );
                }
            }
            ApplyEvent::EventsPending => room.coordinator.events_pending_in(group),
            ApplyEvent::NodeDown { .. }
            | ApplyEvent::Unregistered { .. }
            | ApplyEvent::AppChanged { .. }
            | ApplyEvent::NodeChanged { .. } => {}
        }
    }
}
