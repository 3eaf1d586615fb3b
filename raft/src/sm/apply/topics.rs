//! Topics (Publish, PublishRetained): a gapless per-topic log, trimmed to the app's retention,
//! and a topic's retained message (MQTT's retain flag), expiring through the expiry index.

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

impl Applier<'_> {
    pub(super) fn publish(&mut self, p: &Publish, retain: bool) -> Result<OpResult, StoreError> {
        let app = match self.admit_message(&p.app, p.idempotency_key.as_ref(), p.payload.len())? {
            Ok(app) => app,
            Err(answer) => return Ok(answer),
        };
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
            retain,
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

    /// A publish that also sets (or, with an empty payload, clears) the topic's retained message.
    pub(super) fn publish_retained(&mut self, p: &Publish, ttl_ms: u64) -> Result<OpResult, StoreError> {
        let result = self.publish(p, true)?;
        let OpResult::Published(published) = &result else {
            return Ok(result);
        };
        if published.duplicate {
            return Ok(result);
        }
        let key = keys::topic(&p.app, &p.topic);
        if p.payload.is_empty() {
            // Its expiry index entry, if any, is left for Expire to skip.
            self.txn.delete(Cf::Retained, key);
            return Ok(result);
        }
        let now = self.now();
        let expires_ms = if ttl_ms == 0 {
            0
        } else {
            now.saturating_add(ttl_ms)
        };
        let retained = RetainedMessage {
            seq: published.seq,
            msg_id: p.msg_id.clone(),
            payload: p.payload.clone(),
            pushed_ms: now,
            expires_ms,
        };
        self.txn.put(Cf::Retained, key, &retained)?;
        if expires_ms > 0 {
            self.txn.put_raw(
                Cf::Expiry,
                keys::expiry_retained(expires_ms, &p.app, &p.topic),
                Vec::new(),
            );
        }
        Ok(result)
    }
}
