//! Kept sessions (SessionStart, SessionSubs): the subscriptions of a persistent session (MQTT's
//! Clean Start 0), kept by (app, user, device) while a session of the device lives and for its
//! expiry interval after; all of it user state, beside the registry it is fenced by.

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

impl Applier<'_> {
    /// The device's kept session, unless its expiry passed by log time (then Expire removes it).
    fn live_kept(&self, dkey: &[u8]) -> Result<Option<KeptSession>, StoreError> {
        let now = self.now();
        Ok(self
            .txn
            .get::<KeptSession>(Cf::Kept, dkey)?
            .filter(|k| k.expires_ms == 0 || k.expires_ms > now))
    }

    pub(super) fn session_start(&mut self, start: &SessionStart) -> Result<OpResult, StoreError> {
        let dkey = keys::device(&start.app, &start.user, &start.device);
        let current: Option<Session> = self.txn.get(Cf::Sessions, &dkey)?;
        let ours = current
            .as_ref()
            .filter(|c| c.node == start.node && c.conn == start.conn && c.session == start.session);
        let Some(session) = ours else {
            return Ok(OpResult::Superseded {
                epoch: current.map_or(0, |c| c.epoch),
            });
        };
        let epoch = session.epoch;
        let stored = self.txn.get_raw(Cf::Kept, &dkey)?.is_some();
        let (present, subscriptions) = match self.live_kept(&dkey)? {
            Some(k) if !start.clean => (true, k.subscriptions),
            _ => (false, Vec::new()),
        };
        if start.expiry_s == 0 {
            // Nothing outlives this connection: what was kept is handed to it and dropped (most
            // connections keep nothing: no tombstone for them).
            if stored {
                self.txn.delete(Cf::Kept, dkey);
            }
        } else {
            let kept = KeptSession {
                epoch,
                expiry_s: start.expiry_s,
                expires_ms: 0,
                subscriptions: subscriptions.clone(),
            };
            self.txn.put(Cf::Kept, dkey, &kept)?;
        }
        Ok(OpResult::Kept {
            present,
            subscriptions,
        })
    }

    pub(super) fn session_subs(
        &mut self,
        app: &str,
        user: &str,
        device: &str,
        epoch: u64,
        change: &SubsChange,
    ) -> Result<OpResult, StoreError> {
        let dkey = keys::device(app, user, device);
        let current = self
            .txn
            .get::<Session>(Cf::Sessions, &dkey)?
            .map_or(0, |s| s.epoch);
        if current != epoch {
            return Ok(OpResult::Superseded { epoch: current });
        }
        let Some(mut kept) = self.live_kept(&dkey)?.filter(|k| k.epoch == epoch) else {
            return Ok(OpResult::Rejected(Rejection::Invalid(
                "the session keeps no subscriptions".into(),
            )));
        };
        match change {
            SubsChange::Subscribe(subs) => {
                if let Some(bad) = subs
                    .iter()
                    .find(|s| s.filter.is_empty() || s.filter.len() > MAX_KEPT_FILTER)
                {
                    return Ok(OpResult::Rejected(Rejection::Invalid(format!(
                        "a kept topic filter must be 1 to {MAX_KEPT_FILTER} bytes, not {}",
                        bad.filter.len()
                    ))));
                }
                for sub in subs {
                    match kept.subscriptions.iter_mut().find(|k| k.filter == sub.filter) {
                        Some(k) => k.options = sub.options,
                        None => kept.subscriptions.push(sub.clone()),
                    }
                }
                if kept.subscriptions.len() > MAX_KEPT_SUBSCRIPTIONS {
                    return Ok(OpResult::Rejected(Rejection::Invalid(format!(
                        "a session keeps at most {MAX_KEPT_SUBSCRIPTIONS} subscriptions"
                    ))));
                }
            }
            SubsChange::Unsubscribe(filters) => kept.subscriptions.retain(|k| !filters.contains(&k.filter)),
            SubsChange::Expiry(expiry_s) => kept.expiry_s = *expiry_s,
        }
        self.txn.put(Cf::Kept, dkey, &kept)?;
        Ok(OpResult::Done)
    }

    /// The device's session `s` ended (not taken over by a new login of the device): its kept
    /// session, if any, expires `expiry_s` from now, at once with 0, never with [`KEPT_FOREVER`].
    pub(super) fn end_kept(&mut self, s: &Session) -> Result<(), StoreError> {
        let dkey = keys::device(&s.app, &s.user, &s.device);
        let Some(mut kept) = self.txn.get::<KeptSession>(Cf::Kept, &dkey)? else {
            return Ok(());
        };
        if kept.expires_ms != 0 {
            return Ok(());
        }
        match kept.expiry_s {
            0 => {
                self.txn.delete(Cf::Kept, dkey);
                return Ok(());
            }
            KEPT_FOREVER => kept.expires_ms = u64::MAX,
            expiry_s => {
                kept.expires_ms = self
                    .now()
                    .saturating_add(u64::from(expiry_s) * 1000)
                    .min(u64::MAX - 1);
                self.txn.put_raw(
                    Cf::Expiry,
                    keys::expiry_kept(kept.expires_ms, &s.app, &s.user, &s.device),
                    Vec::new(),
                );
            }
        }
        self.txn.put(Cf::Kept, dkey, &kept)
    }
}
