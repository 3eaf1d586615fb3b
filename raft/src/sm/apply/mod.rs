//! Applying ops: the semantics of every [`Op`], written against a [`Txn`] overlay.
//!
//! Everything here is deterministic: it reads only the replicated state and the entry (log time
//! included), so every replica computes the same results, events and writes. A rejected op
//! validates before it writes, so it changes nothing.
//!
//! One file per concern, each an `impl Applier` block: `apps.rs`, `sessions.rs` (the registry and
//! its callback outbox), `kept.rs` (persistent sessions' subscriptions), `mailboxes.rs`,
//! `topics.rs` (with retained messages), `expiry.rs` and `archive.rs`. This file
//! holds the applier, the dispatch of ops to them and what several of them share (log time,
//! counters, idempotency keys).

mod apps;
mod archive;
mod expiry;
mod kept;
mod mailboxes;
mod sessions;
mod topics;

use serde::{Deserialize, Serialize};

use super::keys::{self, Cf};
use super::txn::Txn;
use crate::error::StoreError;
use crate::types::*;

/// How long an idempotency key is remembered, in log time.
pub(crate) const IDEMPOTENCY_TTL_MS: u64 = 24 * 3600 * 1000;

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
            Op::RegisterSeen { register, seen_epoch } => self.register_seen(register, *seen_epoch),
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
            Op::Publish(p) => self.publish(p, false),
            Op::PublishRetained { publish, ttl_ms } => self.publish_retained(publish, *ttl_ms),
            Op::SessionStart(start) => self.session_start(start),
            Op::SessionSubs {
                app,
                user,
                device,
                epoch,
                change,
            } => self.session_subs(app, user, device, *epoch, change),
            Op::Expire { max } => self.expire(*max),
            Op::EventsDone { upto } => self.events_done(*upto),
            Op::SetArchive { enabled } => self.set_archive(*enabled),
            Op::ArchiveDone { upto } => self.archive_done(*upto),
        }
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

    /// What a push (Enqueue) and a publish check before they write, in this order: the app exists,
    /// a repeated idempotency key is answered with its first result, the payload fits the app's
    /// limit. `Err` holds the op's answer when one of them ends it.
    fn admit_message(
        &self,
        app_id: &str,
        idempotency_key: Option<&String>,
        size: usize,
    ) -> Result<Result<AppConfig, OpResult>, StoreError> {
        let Some(app) = self.app(app_id)? else {
            return Ok(Err(reject_unknown(app_id)));
        };
        if let Some(first) = self.idem_seen(app_id, idempotency_key)? {
            return Ok(Err(first));
        }
        if size > app.limits.max_payload as usize {
            return Ok(Err(OpResult::Rejected(Rejection::PayloadTooLarge {
                size,
                max: app.limits.max_payload,
            })));
        }
        Ok(Ok(app))
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
}
