//! Expire: deletes what the time-ordered `expiry` index says is due by log time (held messages,
//! idempotency keys, msg-id locations of messages acked or trimmed before their TTL, retained
//! topic messages, and kept sessions whose session ended).

use super::{Applier, IdemRecord};
use crate::error::StoreError;
use crate::sm::keys::{self, Cf, ExpiryItem, KeyBuf};
use crate::types::*;

/// Expire skips index entries whose target is gone (left by DeleteApp) without counting them
/// against `max`; this bounds how many such entries one Expire op looks at.
const EXPIRE_ORPHAN_SCAN: usize = 10_000;

impl Applier<'_> {
    /// Deletes up to `max` due items in expiry-index order: (expires_ms, messages before keys, app,
    /// user or key, seq), strings compared by (length, bytes) as the key encoding orders them.
    pub(super) fn expire(&mut self, max: u32) -> Result<OpResult, StoreError> {
        let now = self.now();
        let hi = match now.checked_add(1) {
            Some(n) => KeyBuf::new().u64(n).done(),
            None => vec![0xff; 9],
        };
        let (mut messages, mut keys_removed, mut orphans) = (0u32, 0u32, 0usize);
        let mut topic_entries = 0u32;
        let mut cursor: Vec<u8> = Vec::new();
        'scan: while messages + keys_removed + topic_entries < max && orphans < EXPIRE_ORPHAN_SCAN {
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
                    Some(ExpiryItem::Retained {
                        expires_ms,
                        app,
                        topic,
                    }) => {
                        let rkey = keys::topic(&app, &topic);
                        match self.txn.get::<RetainedMessage>(Cf::Retained, &rkey)? {
                            Some(r) if r.expires_ms == expires_ms => {
                                self.txn.delete(Cf::Retained, rkey);
                                topic_entries += 1;
                                true
                            }
                            _ => false,
                        }
                    }
                    Some(ExpiryItem::Kept {
                        expires_ms,
                        app,
                        user,
                        device,
                    }) => {
                        let dkey = keys::device(&app, &user, &device);
                        match self.txn.get::<KeptSession>(Cf::Kept, &dkey)? {
                            Some(k) if k.expires_ms == expires_ms => {
                                self.txn.delete(Cf::Kept, dkey);
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
                if messages + keys_removed + topic_entries >= max || orphans >= EXPIRE_ORPHAN_SCAN {
                    break 'scan;
                }
            }
        }
        Ok(OpResult::Expired {
            messages,
            topic_entries,
            keys: keys_removed,
        })
    }
}
