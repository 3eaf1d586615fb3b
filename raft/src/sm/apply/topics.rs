//! Topics (Publish): a gapless per-topic log, trimmed to the app's retention.

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

impl Applier<'_> {
    pub(super) fn publish(&mut self, p: &Publish) -> Result<OpResult, StoreError> {
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
}
