//! Applying ops: the semantics of every [`Op`], written against a [`Txn`] overlay.
//!
//! Everything here is deterministic: it reads only the replicated state and the entry (log time
//! included), so every replica computes the same results, events and writes. A rejected op
//! validates before it writes, so it changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::keys::{self, Cf, ExpiryItem, KeyBuf};
use super::txn::Txn;
use crate::error::StoreError;
use crate::types::*;

/// How long an idempotency key is remembered, in log time.
pub(crate) const IDEMPOTENCY_TTL_MS: u64 = 24 * 3600 * 1000;
/// The callback outbox holds at most this many events; past it the oldest is dropped (counted).
pub(crate) const OUTBOX_CAP: u64 = 100_000;
/// The archive outbox holds at most this many removed messages; past it the oldest is dropped
/// (counted in [`ArchiveState::dropped`]), so a cold archive that is down never blocks apply.
pub(crate) const ARCHIVE_CAP: u64 = 100_000;
/// Expire skips index entries whose target is gone (left by DeleteApp) without counting them
/// against `max`; this bounds how many such entries one Expire op looks at.
pub(crate) const EXPIRE_ORPHAN_SCAN: usize = 10_000;

/// Replicated bookkeeping kept under one Meta key; cached in memory by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Clocks {
    /// max(ts_ms) over applied entries: the clock every TTL is judged by.
    pub log_time_ms: u64,
    /// Highest session epoch handed out (0 = none yet).
    pub last_epoch: u64,
    /// Id the next outbox event gets (first is 1).
    pub next_event_id: u64,
    /// Lowest event id still in the outbox (== next_event_id when empty): the outbox is always the
    /// contiguous range `[outbox_first, next_event_id)`, so caps and EventsDone need no scans.
    pub outbox_first: u64,
    /// Events dropped because the outbox was full.
    pub events_dropped: u64,
}

impl Default for Clocks {
    fn default() -> Self {
        Clocks {
            log_time_ms: 0,
            last_epoch: 0,
            next_event_id: 1,
            outbox_first: 1,
            events_dropped: 0,
        }
    }
}

/// The first result of an idempotent push, remembered until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct IdemRecord {
    pub expires_ms: u64,
    pub result: OpResult,
}

/// Applies the entries of one `apply()` call into one overlay.
pub(crate) struct Applier<'a> {
    pub txn: Txn<'a>,
    /// Working copy of the bookkeeping; written into the batch at the end.
    pub clocks: Clocks,
    /// Events of the entry being applied.
    events: Vec<ApplyEvent>,
    /// Whether the entry being applied added outbox events (then it reports EventsPending).
    outbox_grew: bool,
    /// The archive outbox's bookkeeping, read on first use in this apply call; `dirty` once
    /// changed (written back by [`Applier::finish`]).
    archive: Option<ArchiveState>,
    archive_dirty: bool,
}

fn reject_unknown(app: &str) -> OpResult {
    OpResult::Rejected(Rejection::UnknownApp(app.to_string()))
}

fn payload_check(app: &AppConfig, size: usize) -> Option<OpResult> {
    (size > app.limits.max_payload as usize).then_some(OpResult::Rejected(Rejection::PayloadTooLarge {
        size,
        max: app.limits.max_payload,
    }))
}

/// Whether every device the message is for has acked it. `devices` are the user's device records.
pub(crate) fn fully_acked(msg: &StoredMessage, devices: &BTreeMap<String, DeviceState>) -> bool {
    if msg.devices.is_empty() {
        !devices.is_empty() && devices.values().all(|d| d.acked >= msg.seq)
    } else {
        msg.devices
            .iter()
            .all(|d| devices.get(d).is_some_and(|s| s.acked >= msg.seq))
    }
}

impl<'a> Applier<'a> {
    pub(crate) fn new(txn: Txn<'a>, clocks: Clocks) -> Self {
        Applier {
            txn,
            clocks,
            events: Vec::new(),
            outbox_grew: false,
            archive: None,
            archive_dirty: false,
        }
    }

    /// Writes what the apply call changed in the bookkeeping kept outside [`Clocks`] into the
    /// overlay (call once, after the last entry).
    pub(crate) fn finish(&mut self) -> Result<(), StoreError> {
        if std::mem::take(&mut self.archive_dirty) {
            if let Some(state) = self.archive {
                self.txn.put(Cf::Meta, keys::META_ARCHIVE.to_vec(), &state)?;
            }
        }
        Ok(())
    }

    /// The events of the entry just applied (EventsPending last when the outbox grew).
    pub(crate) fn take_events(&mut self) -> Vec<ApplyEvent> {
        if std::mem::take(&mut self.outbox_grew) {
            self.events.push(ApplyEvent::EventsPending);
        }
        std::mem::take(&mut self.events)
    }

    pub(crate) fn apply_request(&mut self, req: &Request) -> Result<Response, StoreError> {
        self.clocks.log_time_ms = self.clocks.log_time_ms.max(req.ts_ms);
        let mut results = Vec::with_capacity(req.ops.len());
        for op in req.ops.iter() {
            results.push(self.apply_op(op)?);
        }
        Ok(Response { results })
    }

    fn now(&self) -> u64 {
        self.clocks.log_time_ms
    }

    fn apply_op(&mut self, op: &Op) -> Result<OpResult, StoreError> {
        match op {
            Op::PutApp(cfg) => self.put_app(cfg),
            Op::PutAppV1(cfg) => self.put_app(&cfg.clone().into()),
            Op::PutAppV2(cfg) => self.put_app(&cfg.clone().into()),
            Op::DeleteApp { app } => self.delete_app(app),
            Op::SetNode(info) => {
                self.txn.put(Cf::Nodes, keys::node(info.id), info)?;
                self.events.push(ApplyEvent::NodeChanged { node: info.id });
                Ok(OpResult::Done)
            }
            Op::Register(r) => self.register(r),
            Op::RegisterSeen { register, seen_epoch } => match self.txn.get::<Session>(
                Cf::Sessions,
                &keys::device(&register.app, &register.user, &register.device),
            )? {
                Some(current) if current.epoch > *seen_epoch => {
                    Ok(OpResult::Superseded { epoch: current.epoch })
                }
                _ => self.register(register),
            },
            Op::Unregister {
                app,
                user,
                device,
                epoch,
            } => self.unregister(app, user, device, *epoch),
            Op::NodeDown { node } => self.node_down(*node),
            Op::Kick {
                app,
                user,
                device,
                reason,
            } => self.kick(app, user, device.as_deref(), reason),
            Op::Enqueue(e) => self.enqueue(e),
            Op::Cursors(updates) => self.cursors(updates),
            Op::Publish(p) => self.publish(p),
            Op::Expire { max } => self.expire(*max),
            Op::EventsDone { upto } => self.events_done(*upto),
            Op::SetArchive { enabled } => {
                let mut st = self.archive_state()?;
                st.enabled = *enabled;
                self.set_archive_state(st);
                Ok(OpResult::Done)
            }
            Op::ArchiveDone { upto } => self.archive_done(*upto),
        }
    }

    // ---- archive outbox ---------------------------------------------------------------------

    fn archive_state(&mut self) -> Result<ArchiveState, StoreError> {
        if let Some(st) = self.archive {
            return Ok(st);
        }
        let st = self.txn.get(Cf::Meta, keys::META_ARCHIVE)?.unwrap_or_default();
        self.archive = Some(st);
        Ok(st)
    }

    fn set_archive_state(&mut self, st: ArchiveState) {
        self.archive = Some(st);
        self.archive_dirty = true;
    }

    /// Appends a message just removed from a mailbox to the archive outbox, if archiving is on.
    /// Bounded: past [`ARCHIVE_CAP`] the oldest entry is dropped and counted.
    fn archive_removed(
        &mut self,
        app: &str,
        user: &str,
        msg: &StoredMessage,
        outcome: ArchiveOutcome,
    ) -> Result<(), StoreError> {
        let mut st = self.archive_state()?;
        if !st.enabled {
            return Ok(());
        }
        let id = st.next_id;
        st.next_id += 1;
        let entry = ArchivedMessage {
            id,
            app: app.to_string(),
            user: user.to_string(),
            message: msg.clone(),
            removed_ms: self.now(),
            outcome,
        };
        self.txn.put(Cf::Archive, keys::archive(id), &entry)?;
        if st.next_id - st.first > ARCHIVE_CAP {
            self.txn.delete(Cf::Archive, keys::archive(st.first));
            st.first += 1;
            st.dropped += 1;
        }
        self.set_archive_state(st);
        Ok(())
    }

    fn archive_done(&mut self, upto: u64) -> Result<OpResult, StoreError> {
        let mut st = self.archive_state()?;
        let end = upto.saturating_add(1).min(st.next_id);
        if st.first >= end {
            return Ok(OpResult::Done);
        }
        while st.first < end {
            self.txn.delete(Cf::Archive, keys::archive(st.first));
            st.first += 1;
        }
        self.set_archive_state(st);
        Ok(OpResult::Done)
    }

    // ---- apps -------------------------------------------------------------------------------

    fn app(&self, app: &str) -> Result<Option<AppConfig>, StoreError> {
        let key = keys::app(app);
        match self.txn.get_raw(Cf::Apps, &key)? {
            Some(bytes) => super::app_record::decode_app(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn put_app(&mut self, cfg: &AppConfig) -> Result<OpResult, StoreError> {
        if cfg.id.is_empty() {
            return Ok(OpResult::Rejected(Rejection::Invalid("empty app id".into())));
        }
        let mut cfg = cfg.clone();
        cfg.created_ms = match self.app(&cfg.id)? {
            Some(old) => old.created_ms,
            None => self.now(),
        };
        self.txn
            .put_raw(Cf::Apps, keys::app(&cfg.id), super::app_record::encode_app(&cfg)?);
        self.events.push(ApplyEvent::AppChanged { app: cfg.id });
        Ok(OpResult::Done)
    }

    /// Removes the app and everything keyed by it. Its sessions' node-index entries are deleted one
    /// by one (that index is keyed by node). Its expiry-index entries stay behind as orphans that
    /// Expire skips and deletes; its outbox events stay until EventsDone.
    fn delete_app(&mut self, app: &str) -> Result<OpResult, StoreError> {
        if self.app(app)?.is_none() {
            return Ok(reject_unknown(app));
        }
        let sessions: Vec<Session> = self.txn.values_prefix(Cf::Sessions, keys::app(app), usize::MAX)?;
        for s in &sessions {
            self.txn.delete(
                Cf::NodeSessions,
                keys::node_session(s.node, &s.app, &s.user, &s.device),
            );
        }
        for cf in Cf::APP_KEYED {
            self.txn.delete_prefix(cf, keys::app(app));
        }
        self.events.push(ApplyEvent::AppChanged { app: app.to_string() });
        Ok(OpResult::Done)
    }

    // ---- sessions ---------------------------------------------------------------------------

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
    fn remove_session(&mut self, s: &Session, app: Option<&AppConfig>) -> Result<(), StoreError> {
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

    fn register(&mut self, r: &Register) -> Result<OpResult, StoreError> {
        let Some(app) = self.app(&r.app)? else {
            return Ok(reject_unknown(&r.app));
        };
        let now = self.now();
        self.clocks.last_epoch += 1;
        let epoch = self.clocks.last_epoch;

        let mut kicked = Vec::new();
        let dkey = keys::device(&r.app, &r.user, &r.device);
        if let Some(old) = self.txn.get::<Session>(Cf::Sessions, &dkey)? {
            self.remove_session(&old, Some(&app))?;
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

    fn unregister(
        &mut self,
        app: &str,
        user: &str,
        device: &str,
        epoch: u64,
    ) -> Result<OpResult, StoreError> {
        let Some(cfg) = self.app(app)? else {
            return Ok(reject_unknown(app));
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

    fn node_down(&mut self, node: NodeId) -> Result<OpResult, StoreError> {
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

    fn kick(
        &mut self,
        app: &str,
        user: &str,
        device: Option<&str>,
        reason: &str,
    ) -> Result<OpResult, StoreError> {
        let Some(cfg) = self.app(app)? else {
            return Ok(reject_unknown(app));
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

    // ---- outbox -----------------------------------------------------------------------------

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

    fn events_done(&mut self, upto: u64) -> Result<OpResult, StoreError> {
        let end = upto.saturating_add(1).min(self.clocks.next_event_id);
        while self.clocks.outbox_first < end {
            self.txn
                .delete(Cf::Outbox, keys::outbox(self.clocks.outbox_first));
            self.clocks.outbox_first += 1;
        }
        Ok(OpResult::Done)
    }

    // ---- counters / idempotency -------------------------------------------------------------

    fn counters(&self, app: &str) -> Result<AppCounters, StoreError> {
        Ok(self.txn.get(Cf::Counters, &keys::app(app))?.unwrap_or_default())
    }

    fn bump(&mut self, app: &str, f: impl FnOnce(&mut AppCounters)) -> Result<(), StoreError> {
        let mut c = self.counters(app)?;
        f(&mut c);
        self.txn.put(Cf::Counters, keys::app(app), &c)
    }

    /// The first result of an earlier push with this key, marked duplicate.
    fn idem_seen(&self, app: &str, key: Option<&String>) -> Result<Option<OpResult>, StoreError> {
        let Some(key) = key else { return Ok(None) };
        let rec: Option<IdemRecord> = self.txn.get(Cf::Idem, &keys::idem(app, key))?;
        Ok(rec.map(|r| match r.result {
            OpResult::Enqueued(mut e) => {
                e.duplicate = true;
                OpResult::Enqueued(e)
            }
            OpResult::Published(mut p) => {
                p.duplicate = true;
                OpResult::Published(p)
            }
            other => other,
        }))
    }

    fn idem_store(&mut self, app: &str, key: Option<&String>, result: &OpResult) -> Result<(), StoreError> {
        let Some(key) = key else { return Ok(()) };
        let expires_ms = self.now().saturating_add(IDEMPOTENCY_TTL_MS);
        let rec = IdemRecord {
            expires_ms,
            result: result.clone(),
        };
        self.txn.put(Cf::Idem, keys::idem(app, key), &rec)?;
        self.txn
            .put_raw(Cf::Expiry, keys::expiry_idem(expires_ms, app, key), Vec::new());
        Ok(())
    }

    // ---- mailboxes --------------------------------------------------------------------------

    fn mail_meta(&self, app: &str, user: &str) -> Result<MailboxMeta, StoreError> {
        Ok(self
            .txn
            .get(Cf::MailMeta, &keys::user(app, user))?
            .unwrap_or(MailboxMeta {
                next_seq: 1,
                count: 0,
                trimmed_upto: 0,
                expired_upto: 0,
            }))
    }

    /// The user's oldest held message with seq >= `from`.
    fn oldest_message(&self, app: &str, user: &str, from: u64) -> Result<Option<StoredMessage>, StoreError> {
        let lo = keys::mail(app, user, from);
        let (_, hi) = keys::prefix_range(keys::user(app, user));
        match self.txn.scan(Cf::Mail, &lo, &hi, 1)?.pop() {
            Some((k, v)) => super::txn::decode(Cf::Mail, &k, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes a held message with its expiry entry. An expired message also loses its msg-id
    /// location; one acked or trimmed keeps it (so `DeliveryStatus` can still say what happened)
    /// until the time the message would have expired, through an expiry entry of its own. The
    /// caller fixes the mailbox meta and counters.
    fn remove_message(
        &mut self,
        app: &str,
        user: &str,
        msg: &StoredMessage,
        why: ArchiveOutcome,
    ) -> Result<(), StoreError> {
        self.txn.delete(Cf::Mail, keys::mail(app, user, msg.seq));
        self.txn.delete(
            Cf::Expiry,
            keys::expiry_message(msg.expires_ms, app, user, msg.seq),
        );
        if why != ArchiveOutcome::Expired {
            self.txn.put_raw(
                Cf::Expiry,
                keys::expiry_location(msg.expires_ms, app, &msg.msg_id, user, msg.seq),
                Vec::new(),
            );
            return Ok(());
        }
        self.drop_location(app, &msg.msg_id, user, msg.seq)?;
        Ok(())
    }

    /// Removes (user, seq) from a msg id's locations; false when it was not there.
    fn drop_location(&mut self, app: &str, msg_id: &str, user: &str, seq: u64) -> Result<bool, StoreError> {
        let ikey = keys::msg_idx(app, msg_id);
        let mut locs: Vec<(String, u64)> = self.txn.get(Cf::MsgIdx, &ikey)?.unwrap_or_default();
        let before = locs.len();
        locs.retain(|(u, s)| !(u == user && *s == seq));
        if locs.len() == before {
            return Ok(false);
        }
        if locs.is_empty() {
            self.txn.delete(Cf::MsgIdx, ikey);
        } else {
            self.txn.put(Cf::MsgIdx, ikey, &locs)?;
        }
        Ok(true)
    }

    fn enqueue(&mut self, e: &Enqueue) -> Result<OpResult, StoreError> {
        let Some(app) = self.app(&e.app)? else {
            return Ok(reject_unknown(&e.app));
        };
        if let Some(first) = self.idem_seen(&e.app, e.idempotency_key.as_ref())? {
            return Ok(first);
        }
        if let Some(rejected) = payload_check(&app, e.payload.len()) {
            return Ok(rejected);
        }
        if e.targets.is_empty() {
            return Ok(OpResult::Rejected(Rejection::Invalid(
                "enqueue without targets".into(),
            )));
        }
        // A msg id names one message while any trace of it is kept (held, or acked / trimmed and
        // not yet past its expiry), so DeliveryStatus of a msg id always describes one push. A
        // retry after an unknown outcome carries the idempotency key and was answered above.
        if self
            .txn
            .get_raw(Cf::MsgIdx, &keys::msg_idx(&e.app, &e.msg_id))?
            .is_some()
        {
            return Ok(OpResult::Rejected(Rejection::MsgIdInUse(e.msg_id.clone())));
        }
        let now = self.now();
        let ttl = if e.ttl_ms == 0 {
            app.limits.default_ttl_ms
        } else {
            e.ttl_ms
        };
        let expires_ms = now.saturating_add(ttl.min(app.limits.max_ttl_ms));
        let mut counters = self.counters(&e.app)?;
        let mut seqs = Vec::with_capacity(e.targets.len());
        for t in &e.targets {
            let mut meta = self.mail_meta(&e.app, &t.user)?;
            let seq = meta.next_seq;
            meta.next_seq += 1;
            meta.count += 1;
            let msg = StoredMessage {
                seq,
                msg_id: e.msg_id.clone(),
                payload: e.payload.clone(),
                devices: t.devices.clone(),
                pushed_ms: now,
                expires_ms,
            };
            self.txn.put(Cf::Mail, keys::mail(&e.app, &t.user, seq), &msg)?;
            self.txn.put_raw(
                Cf::Expiry,
                keys::expiry_message(expires_ms, &e.app, &t.user, seq),
                Vec::new(),
            );
            let ikey = keys::msg_idx(&e.app, &e.msg_id);
            let mut locs: Vec<(String, u64)> = self.txn.get(Cf::MsgIdx, &ikey)?.unwrap_or_default();
            locs.push((t.user.clone(), seq));
            self.txn.put(Cf::MsgIdx, ikey, &locs)?;
            counters.stored += 1;

            // Per-user cap: drop the oldest held messages. Nothing at or below `trimmed_upto` is
            // held (the cap always drops the oldest), so the scan starts above it instead of
            // walking the deletion markers of every message trimmed before.
            let mut from = meta.trimmed_upto + 1;
            while meta.count > u64::from(app.limits.mailbox_cap) {
                let Some(oldest) = self.oldest_message(&e.app, &t.user, from)? else {
                    break;
                };
                self.remove_message(&e.app, &t.user, &oldest, ArchiveOutcome::Trimmed)?;
                self.archive_removed(&e.app, &t.user, &oldest, ArchiveOutcome::Trimmed)?;
                meta.count -= 1;
                meta.trimmed_upto = meta.trimmed_upto.max(oldest.seq);
                counters.trimmed += 1;
                from = oldest.seq + 1;
            }
            self.txn.put(Cf::MailMeta, keys::user(&e.app, &t.user), &meta)?;
            seqs.push((t.user.clone(), seq));
            self.events.push(ApplyEvent::Enqueued {
                app: e.app.clone(),
                user: t.user.clone(),
                message: msg,
            });
        }
        self.txn.put(Cf::Counters, keys::app(&e.app), &counters)?;
        let result = OpResult::Enqueued(Enqueued {
            msg_id: e.msg_id.clone(),
            seqs,
            duplicate: false,
            expires_ms,
        });
        self.idem_store(&e.app, e.idempotency_key.as_ref(), &result)?;
        Ok(result)
    }

    /// Cursor moves for devices of known apps with a device record; others are skipped (an app
    /// deleted meanwhile must not reject the other devices' acks batched with it). Cursors are
    /// clamped to the highest seq handed out, so a bogus ack cannot pre-ack future messages.
    fn cursors(&mut self, updates: &[CursorUpdate]) -> Result<OpResult, StoreError> {
        for u in updates {
            if self.app(&u.app)?.is_none() {
                continue;
            }
            let dkey = keys::device(&u.app, &u.user, &u.device);
            let Some(mut dev) = self.txn.get::<DeviceState>(Cf::Devices, &dkey)? else {
                continue;
            };
            let highest = self.mail_meta(&u.app, &u.user)?.next_seq - 1;
            let delivered = dev.delivered.max(u.delivered.min(highest));
            let acked = dev.acked.max(u.acked.min(highest));
            if delivered != dev.delivered || acked != dev.acked {
                dev.delivered = delivered;
                dev.acked = acked;
                self.txn.put(Cf::Devices, dkey, &dev)?;
            }
            self.trim_acked(&u.app, &u.user)?;
        }
        Ok(OpResult::Done)
    }

    /// Removes the user's oldest messages while every device they are for has acked them.
    fn trim_acked(&mut self, app: &str, user: &str) -> Result<(), StoreError> {
        let devices: BTreeMap<String, DeviceState> = self
            .txn
            .scan_prefix(Cf::Devices, keys::user(app, user), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let mut r = keys::KeyReader::new(&k);
                let name = (r.str(), r.str(), r.str());
                let state: DeviceState = super::txn::decode(Cf::Devices, &k, &v)?;
                match name {
                    (Some(_), Some(_), Some(d)) => Ok((d, state)),
                    _ => Err(StoreError::Corrupt {
                        what: "devices key".into(),
                        detail: "unparsable".into(),
                    }),
                }
            })
            .collect::<Result<_, StoreError>>()?;
        if devices.is_empty() {
            return Ok(());
        }
        let mut meta = self.mail_meta(app, user)?;
        let mut removed = 0;
        let mut from = 0;
        while let Some(msg) = self.oldest_message(app, user, from)? {
            if !fully_acked(&msg, &devices) {
                break;
            }
            self.remove_message(app, user, &msg, ArchiveOutcome::Acked)?;
            self.archive_removed(app, user, &msg, ArchiveOutcome::Acked)?;
            meta.count = meta.count.saturating_sub(1);
            removed += 1;
            from = msg.seq + 1;
        }
        if removed > 0 {
            self.txn.put(Cf::MailMeta, keys::user(app, user), &meta)?;
            self.bump(app, |c| c.acked += removed)?;
        }
        Ok(())
    }

    // ---- topics -----------------------------------------------------------------------------

    fn publish(&mut self, p: &Publish) -> Result<OpResult, StoreError> {
        let Some(app) = self.app(&p.app)? else {
            return Ok(reject_unknown(&p.app));
        };
        if let Some(first) = self.idem_seen(&p.app, p.idempotency_key.as_ref())? {
            return Ok(first);
        }
        if let Some(rejected) = payload_check(&app, p.payload.len()) {
            return Ok(rejected);
        }
        let now = self.now();
        let tkey = keys::topic(&p.app, &p.topic);
        let mut meta: TopicMeta = self.txn.get(Cf::TopicMeta, &tkey)?.unwrap_or(TopicMeta {
            next_seq: 1,
            count: 0,
            trimmed_upto: 0,
        });
        let seq = meta.next_seq;
        meta.next_seq += 1;
        meta.count += 1;
        let msg = TopicMessage {
            seq,
            msg_id: p.msg_id.clone(),
            payload: p.payload.clone(),
            pushed_ms: now,
        };
        self.txn
            .put(Cf::TopicLog, keys::topic_msg(&p.app, &p.topic, seq), &msg)?;
        let mut counters = self.counters(&p.app)?;
        counters.published += 1;
        let (_, hi) = keys::prefix_range(tkey.clone());
        // Retention drops the oldest first: nothing at or below `trimmed_upto` is left.
        let mut from = meta.trimmed_upto + 1;
        while meta.count > u64::from(app.limits.topic_retain) {
            let lo = keys::topic_msg(&p.app, &p.topic, from);
            let Some((k, _)) = self.txn.scan(Cf::TopicLog, &lo, &hi, 1)?.pop() else {
                break;
            };
            let mut r = keys::KeyReader::new(&k);
            let oldest = match (r.str(), r.str(), r.u64()) {
                (Some(_), Some(_), Some(seq)) => seq,
                _ => {
                    return Err(StoreError::Corrupt {
                        what: "topic_log key".into(),
                        detail: "unparsable".into(),
                    })
                }
            };
            self.txn.delete(Cf::TopicLog, k);
            meta.count -= 1;
            meta.trimmed_upto = meta.trimmed_upto.max(oldest);
            counters.topic_trimmed += 1;
            from = oldest + 1;
        }
        self.txn.put(Cf::TopicMeta, tkey, &meta)?;
        self.txn.put(Cf::Counters, keys::app(&p.app), &counters)?;
        self.events.push(ApplyEvent::Published {
            app: p.app.clone(),
            topic: p.topic.clone(),
            message: msg,
        });
        let result = OpResult::Published(Published {
            msg_id: p.msg_id.clone(),
            topic: p.topic.clone(),
            seq,
            duplicate: false,
        });
        self.idem_store(&p.app, p.idempotency_key.as_ref(), &result)?;
        Ok(result)
    }

    // ---- expiry -----------------------------------------------------------------------------

    /// Deletes up to `max` due items in expiry-index order: (expires_ms, messages before keys, app,
    /// user or key, seq), strings compared by (length, bytes) as the key encoding orders them.
    fn expire(&mut self, max: u32) -> Result<OpResult, StoreError> {
        let now = self.now();
        let hi = match now.checked_add(1) {
            Some(n) => KeyBuf::new().u64(n).done(),
            None => vec![0xff; 9],
        };
        let (mut messages, mut keys_removed, mut orphans) = (0u32, 0u32, 0usize);
        let mut cursor: Vec<u8> = Vec::new();
        'scan: while messages + keys_removed < max && orphans < EXPIRE_ORPHAN_SCAN {
            let page = self.txn.scan(Cf::Expiry, &cursor, &hi, 64)?;
            if page.is_empty() {
                break;
            }
            for (key, _) in page {
                cursor = key.clone();
                cursor.push(0);
                let live = match keys::parse_expiry(&key) {
                    Some(ExpiryItem::Message {
                        expires_ms,
                        app,
                        user,
                        seq,
                    }) => {
                        let msg: Option<StoredMessage> =
                            self.txn.get(Cf::Mail, &keys::mail(&app, &user, seq))?;
                        match msg {
                            Some(m) if m.expires_ms == expires_ms => {
                                self.remove_message(&app, &user, &m, ArchiveOutcome::Expired)?;
                                self.archive_removed(&app, &user, &m, ArchiveOutcome::Expired)?;
                                let mut meta = self.mail_meta(&app, &user)?;
                                meta.count = meta.count.saturating_sub(1);
                                meta.expired_upto = meta.expired_upto.max(m.seq);
                                self.txn.put(Cf::MailMeta, keys::user(&app, &user), &meta)?;
                                self.bump(&app, |c| c.expired += 1)?;
                                messages += 1;
                                true
                            }
                            _ => false,
                        }
                    }
                    Some(ExpiryItem::Location {
                        app,
                        msg_id,
                        user,
                        seq,
                        ..
                    }) => {
                        // A held message at (user, seq) means the app was deleted and made
                        // again since: the location is that message's, not this entry's.
                        let held = self
                            .txn
                            .get_raw(Cf::Mail, &keys::mail(&app, &user, seq))?
                            .is_some();
                        if !held && self.drop_location(&app, &msg_id, &user, seq)? {
                            keys_removed += 1;
                            true
                        } else {
                            false
                        }
                    }
                    Some(ExpiryItem::Idem {
                        expires_ms,
                        app,
                        key: k,
                    }) => {
                        let ikey = keys::idem(&app, &k);
                        match self.txn.get::<IdemRecord>(Cf::Idem, &ikey)? {
                            Some(rec) if rec.expires_ms == expires_ms => {
                                self.txn.delete(Cf::Idem, ikey);
                                keys_removed += 1;
                                true
                            }
                            _ => false,
                        }
                    }
                    None => false,
                };
                // Live items delete their own index entry; orphans are deleted here.
                self.txn.delete(Cf::Expiry, key);
                if !live {
                    orphans += 1;
                }
                if messages + keys_removed >= max || orphans >= EXPIRE_ORPHAN_SCAN {
                    break 'scan;
                }
            }
        }
        Ok(OpResult::Expired {
            messages,
            topic_entries: 0,
            keys: keys_removed,
        })
    }
}
