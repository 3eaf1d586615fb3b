//! The session registry (Register, RegisterSeen, Unregister, NodeDown, Kick), the device policy,
//! and the callback outbox of session events (EventsDone).

use std::collections::BTreeMap;

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

/// The callback outbox holds at most this many events; past it the oldest is dropped (counted).
const OUTBOX_CAP: u64 = 100_000;

impl Applier<'_> {
    fn sessions_of_user(&self, app: &str, user: &str) -> Result<Vec<Session>, StoreError> {
        self.txn
            .values_prefix(Cf::Sessions, keys::user(app, user), usize::MAX)
    }

    fn put_session(&mut self, s: &Session) -> Result<(), StoreError> {
        self.txn
            .put(Cf::Sessions, keys::device(&s.app, &s.user, &s.device), s)?;
        self.txn.put_raw(
            Cf::NodeSessions,
            keys::node_session(s.node, &s.app, &s.user, &s.device),
            Vec::new(),
        );
        Ok(())
    }

    /// Removes a session and its node-index entry; queues an offline event if the app wants them.
    /// The device's kept session, if any, starts to expire.
    fn remove_session(&mut self, s: &Session, app: Option<&AppConfig>) -> Result<(), StoreError> {
        self.end_kept(s)?;
        self.take_over_session(s, app)
    }

    /// [`Self::remove_session`] for a new login of the same device: the device's kept session
    /// goes on with the new session (a start in the same entry decides what it keeps).
    fn take_over_session(&mut self, s: &Session, app: Option<&AppConfig>) -> Result<(), StoreError> {
        self.txn
            .delete(Cf::Sessions, keys::device(&s.app, &s.user, &s.device));
        self.txn.delete(
            Cf::NodeSessions,
            keys::node_session(s.node, &s.app, &s.user, &s.device),
        );
        if app.is_some_and(|a| !a.callbacks.is_empty()) {
            self.push_event(s, false)?;
        }
        Ok(())
    }

    pub(super) fn register(&mut self, r: &Register) -> Result<OpResult, StoreError> {
        let Some(app) = self.app(&r.app)? else {
            return Ok(super::reject_unknown(&r.app));
        };
        let now = self.now();
        self.clocks.last_epoch += 1;
        let epoch = self.clocks.last_epoch;

        let mut kicked = Vec::new();
        let dkey = keys::device(&r.app, &r.user, &r.device);
        if let Some(old) = self.txn.get::<Session>(Cf::Sessions, &dkey)? {
            self.take_over_session(&old, Some(&app))?;
            kicked.push(old);
        }
        let session = Session {
            app: r.app.clone(),
            user: r.user.clone(),
            device: r.device.clone(),
            platform: r.platform.clone(),
            node: r.node,
            conn: r.conn,
            session: r.session,
            epoch,
            since_ms: now,
        };
        self.put_session(&session)?;

        let mut device: DeviceState = self.txn.get(Cf::Devices, &dkey)?.unwrap_or_default();
        device.platform = r.platform.clone();
        device.last_seen_ms = now;
        self.txn.put(Cf::Devices, dkey, &device)?;

        // Device policy, newest wins: the new session has the highest epoch, so it is never the
        // oldest while a limit is at least 1.
        // The scan over the user's sessions is only needed when a limit is set (a connect storm
        // on an app without limits then costs no iterator per registration).
        let policy = app.policy;
        let mut live = if policy.max_per_platform > 0 || policy.max_per_user > 0 {
            self.sessions_of_user(&r.app, &r.user)?
        } else {
            Vec::new()
        };
        live.sort_by_key(|s| s.epoch);
        if policy.max_per_platform > 0 {
            let same: Vec<Session> = live
                .iter()
                .filter(|s| s.platform == r.platform)
                .cloned()
                .collect();
            let excess = same.len().saturating_sub(policy.max_per_platform as usize);
            for s in &same[..excess] {
                self.remove_session(s, Some(&app))?;
                live.retain(|l| l.device != s.device);
                kicked.push(s.clone());
            }
        }
        if policy.max_per_user > 0 {
            let excess = live.len().saturating_sub(policy.max_per_user as usize);
            let oldest: Vec<Session> = live[..excess].to_vec();
            for s in &oldest {
                self.remove_session(s, Some(&app))?;
                kicked.push(s.clone());
            }
        }
        if !app.callbacks.is_empty() {
            self.push_event(&session, true)?;
        }
        self.events.push(ApplyEvent::Registered {
            session,
            kicked: kicked.clone(),
        });
        Ok(OpResult::Registered(Registered {
            epoch,
            acked_seq: device.acked,
            kicked,
        }))
    }

    /// Register, unless the device already has a session newer than the proposer saw (then a
    /// no-op answering Superseded, so a late registration never ends the login that followed).
    pub(super) fn register_seen(
        &mut self,
        register: &Register,
        seen_epoch: u64,
    ) -> Result<OpResult, StoreError> {
        match self.txn.get::<Session>(
            Cf::Sessions,
            &keys::device(&register.app, &register.user, &register.device),
        )? {
            Some(current) if current.epoch > seen_epoch => Ok(OpResult::Superseded { epoch: current.epoch }),
            _ => self.register(register),
        }
    }

    pub(super) fn unregister(
        &mut self,
        app: &str,
        user: &str,
        device: &str,
        epoch: u64,
    ) -> Result<OpResult, StoreError> {
        let Some(cfg) = self.app(app)? else {
            return Ok(super::reject_unknown(app));
        };
        match self
            .txn
            .get::<Session>(Cf::Sessions, &keys::device(app, user, device))?
        {
            Some(s) if s.epoch == epoch => {
                self.remove_session(&s, Some(&cfg))?;
                self.events.push(ApplyEvent::Unregistered { session: s });
                Ok(OpResult::Dropped { sessions: 1 })
            }
            _ => Ok(OpResult::Done),
        }
    }

    pub(super) fn node_down(&mut self, node: NodeId) -> Result<OpResult, StoreError> {
        let index = self
            .txn
            .scan_prefix(Cf::NodeSessions, keys::node(node), usize::MAX)?;
        let mut apps: BTreeMap<String, Option<AppConfig>> = BTreeMap::new();
        let mut dropped = 0u32;
        for (key, _) in index {
            let Some((_, app, user, device)) = keys::parse_node_session(&key) else {
                return Err(StoreError::Corrupt {
                    what: "node_sessions index".into(),
                    detail: "unparsable key".into(),
                });
            };
            let dkey = keys::device(&app, &user, &device);
            match self.txn.get::<Session>(Cf::Sessions, &dkey)? {
                Some(s) if s.node == node => {
                    if !apps.contains_key(&app) {
                        let cfg = self.app(&app)?;
                        apps.insert(app.clone(), cfg);
                    }
                    let cfg = apps.get(&app).cloned().flatten();
                    self.remove_session(&s, cfg.as_ref())?;
                    dropped += 1;
                }
                // A stale index entry (should not exist): clean it up.
                _ => self.txn.delete(Cf::NodeSessions, key),
            }
        }
        self.events.push(ApplyEvent::NodeDown {
            node,
            upto_epoch: self.clocks.last_epoch,
        });
        Ok(OpResult::Dropped { sessions: dropped })
    }

    pub(super) fn kick(
        &mut self,
        app: &str,
        user: &str,
        device: Option<&str>,
        reason: &str,
    ) -> Result<OpResult, StoreError> {
        let Some(cfg) = self.app(app)? else {
            return Ok(super::reject_unknown(app));
        };
        let sessions = match device {
            Some(d) => self
                .txn
                .get::<Session>(Cf::Sessions, &keys::device(app, user, d))?
                .into_iter()
                .collect(),
            None => self.sessions_of_user(app, user)?,
        };
        for s in &sessions {
            self.remove_session(s, Some(&cfg))?;
        }
        let n = sessions.len() as u32;
        if !sessions.is_empty() {
            self.events.push(ApplyEvent::Kicked {
                sessions,
                reason: reason.to_string(),
            });
        }
        Ok(OpResult::Dropped { sessions: n })
    }

    // ---- callback outbox --------------------------------------------------------------------

    fn push_event(&mut self, s: &Session, online: bool) -> Result<(), StoreError> {
        let id = self.clocks.next_event_id;
        self.clocks.next_event_id += 1;
        let event = SessionEvent {
            id,
            app: s.app.clone(),
            user: s.user.clone(),
            device: s.device.clone(),
            platform: s.platform.clone(),
            online,
            epoch: s.epoch,
            node: s.node,
            at_ms: self.now(),
        };
        self.txn.put(Cf::Outbox, keys::outbox(id), &event)?;
        if self.clocks.next_event_id - self.clocks.outbox_first > OUTBOX_CAP {
            self.txn
                .delete(Cf::Outbox, keys::outbox(self.clocks.outbox_first));
            self.clocks.outbox_first += 1;
            self.clocks.events_dropped += 1;
        }
        self.outbox_grew = true;
        Ok(())
    }

    pub(super) fn events_done(&mut self, upto: u64) -> Result<OpResult, StoreError> {
        let end = upto.saturating_add(1).min(self.clocks.next_event_id);
        while self.clocks.outbox_first < end {
            self.txn
                .delete(Cf::Outbox, keys::outbox(self.clocks.outbox_first));
            self.clocks.outbox_first += 1;
        }
        Ok(OpResult::Done)
    }
}
