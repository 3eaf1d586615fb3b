//! Per-user mailboxes: Enqueue (with the per-user cap), Cursors (with the trim of acked
//! messages), and removing a held message with its expiry entry and msg-id location.

use std::collections::BTreeMap;

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

/// Whether every device the message is for has acked it. `devices` are the user's device records.
fn fully_acked(msg: &StoredMessage, devices: &BTreeMap<String, DeviceState>) -> bool {
    if msg.devices.is_empty() {
        !devices.is_empty() && devices.values().all(|d| d.acked >= msg.seq)
    } else {
        msg.devices
            .iter()
            .all(|d| devices.get(d).is_some_and(|s| s.acked >= msg.seq))
    }
}

impl Applier<'_> {
    pub(super) fn mail_meta(&self, app: &str, user: &str) -> Result<MailboxMeta, StoreError> {
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
            Some((k, v)) => crate::sm::txn::decode(Cf::Mail, &k, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes a held message with its expiry entry. An expired message also loses its msg-id
    /// location; one acked or trimmed keeps it (so `DeliveryStatus` can still say what happened)
    /// until the time the message would have expired, through an expiry entry of its own. The
    /// caller fixes the mailbox meta and counters.
    pub(super) fn remove_message(
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
    pub(super) fn drop_location(
        &mut self,
        app: &str,
        msg_id: &str,
        user: &str,
        seq: u64,
    ) -> Result<bool, StoreError> {
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

    pub(super) fn enqueue(&mut self, e: &Enqueue) -> Result<OpResult, StoreError> {
        let app = match self.admit_message(&e.app, e.idempotency_key.as_ref(), e.payload.len())? {
            Ok(app) => app,
            Err(answer) => return Ok(answer),
        };
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
    pub(super) fn cursors(&mut self, updates: &[CursorUpdate]) -> Result<OpResult, StoreError> {
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
                let state: DeviceState = crate::sm::txn::decode(Cf::Devices, &k, &v)?;
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
}
