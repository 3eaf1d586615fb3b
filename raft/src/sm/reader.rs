//! [`StateReader`]: the node's read access to the replicated state.

use std::hash::Hasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rocksdb::{IteratorMode, ReadOptions, DB};

use super::apply::IdemRecord;
use super::keys::{self, Cf, KeyReader, META_LAST_APPLIED, META_MEMBERSHIP};
use super::txn::{cf_handle, decode, rocks_err, Txn};
use super::Shared;
use crate::error::StoreError;
use crate::types::typ::StoredMembership;
use crate::types::*;

/// RocksDB property: bytes of a column family's active and immutable memtables.
pub(crate) const MEMTABLE_BYTES: &str = "rocksdb.cur-size-all-mem-tables";

/// Read handle for the node: cheap to clone, never blocks the apply loop for long.
///
/// Each call reads the live DB of that moment (the handle is cloned under a short read lock, never
/// held across an await). Reads see whole applied batches only.
#[derive(Clone)]
pub struct StateReader {
    /// Live DB handle and applied progress, shared with the state machine.
    shared: Arc<Shared>,
}

/// FNV-1a 64: a hash that is the same on every build and platform (std's is not promised to be).
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl StateReader {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        StateReader { shared }
    }

    fn db(&self) -> Arc<DB> {
        self.shared.db()
    }

    /// Index of the last applied entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// Waits until the entry at `index` is applied (returns at once if it is).
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.shared.applied_tx.subscribe();
        // Err only if the sender is gone, which cannot happen while `shared` lives.
        let _ = rx.wait_for(|applied| *applied >= index).await;
    }

    /// Snapshots built and installed by this replica since it started.
    pub fn snapshot_stats(&self) -> super::SnapshotStats {
        self.shared.snapshot_stats()
    }

    /// Bytes in the state DB's memtables over all column families: applied state not yet
    /// flushed to SST files (bounded by the column families' write buffer sizes).
    pub fn memtable_bytes(&self) -> u64 {
        let db = self.db();
        Cf::ALL
            .iter()
            .filter_map(|cf| cf_handle(&db, *cf).ok())
            .filter_map(|h| db.property_int_value_cf(h, MEMTABLE_BYTES).ok().flatten())
            .sum()
    }

    /// Log time after the last applied entry.
    pub fn log_time_ms(&self) -> u64 {
        self.shared.log_time.load(Ordering::Acquire)
    }

    /// The app's config (from the [`AppCache`](super::AppCache) when it holds it).
    pub fn app(&self, id: &str) -> Result<Option<AppConfig>, StoreError> {
        let generation = match self.shared.apps.get(id) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let db = self.db();
        let key = keys::app(id);
        let app = match Txn::new(&db).get_raw(Cf::Apps, &key)? {
            Some(bytes) => Some(super::app_record::decode_app(&key, &bytes)?),
            None => None,
        };
        self.shared.apps.fill(generation, id, app.clone());
        Ok(app)
    }

    pub fn apps(&self) -> Result<Vec<AppConfig>, StoreError> {
        let db = self.db();
        Txn::new(&db)
            .scan_prefix(Cf::Apps, Vec::new(), usize::MAX)?
            .into_iter()
            .map(|(k, v)| super::app_record::decode_app(&k, &v))
            .collect()
    }

    pub fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let db = self.db();
        Txn::new(&db).values_prefix(Cf::Nodes, Vec::new(), usize::MAX)
    }

    pub fn session(&self, app: &str, user: &str, device: &str) -> Result<Option<Session>, StoreError> {
        let db = self.db();
        Txn::new(&db).get(Cf::Sessions, &keys::device(app, user, device))
    }

    /// The user's live sessions, ordered by device (length, then bytes).
    pub fn sessions(&self, app: &str, user: &str) -> Result<Vec<Session>, StoreError> {
        let db = self.db();
        Txn::new(&db).values_prefix(Cf::Sessions, keys::user(app, user), usize::MAX)
    }

    /// Every live session held by `node`.
    pub fn sessions_on_node(&self, node: NodeId) -> Result<Vec<Session>, StoreError> {
        let db = self.db();
        let txn = Txn::new(&db);
        let mut out = Vec::new();
        for (key, _) in txn.scan_prefix(Cf::NodeSessions, keys::node(node), usize::MAX)? {
            let Some((_, app, user, device)) = keys::parse_node_session(&key) else {
                return Err(StoreError::Corrupt {
                    what: "node_sessions index".into(),
                    detail: "unparsable key".into(),
                });
            };
            if let Some(s) = txn.get::<Session>(Cf::Sessions, &keys::device(&app, &user, &device))? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The user's device records as (device, state).
    pub fn devices(&self, app: &str, user: &str) -> Result<Vec<(String, DeviceState)>, StoreError> {
        let db = self.db();
        let txn = Txn::new(&db);
        txn.scan_prefix(Cf::Devices, keys::user(app, user), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let mut r = KeyReader::new(&k);
                let device = match (r.str(), r.str(), r.str()) {
                    (Some(_), Some(_), Some(d)) => d,
                    _ => {
                        return Err(StoreError::Corrupt {
                            what: "devices key".into(),
                            detail: "unparsable".into(),
                        })
                    }
                };
                Ok((device, decode(Cf::Devices, &k, &v)?))
            })
            .collect()
    }

    /// None if the user never had a message.
    pub fn mailbox_meta(&self, app: &str, user: &str) -> Result<Option<MailboxMeta>, StoreError> {
        let db = self.db();
        Txn::new(&db).get(Cf::MailMeta, &keys::user(app, user))
    }

    /// Up to `limit` held messages with seq > `after_seq`, in seq order.
    pub fn mailbox_since(
        &self,
        app: &str,
        user: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let db = self.db();
        let lo = keys::mail(app, user, after_seq.saturating_add(1));
        let (_, hi) = keys::prefix_range(keys::user(app, user));
        Txn::new(&db)
            .scan(Cf::Mail, &lo, &hi, limit)?
            .into_iter()
            .map(|(k, v)| decode(Cf::Mail, &k, &v))
            .collect()
    }

    /// None if nothing was ever published to the topic.
    pub fn topic_meta(&self, app: &str, topic: &str) -> Result<Option<TopicMeta>, StoreError> {
        let db = self.db();
        Txn::new(&db).get(Cf::TopicMeta, &keys::topic(app, topic))
    }

    /// Up to `limit` retained topic messages with seq > `after_seq`, in seq order.
    pub fn topic_since(
        &self,
        app: &str,
        topic: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<TopicMessage>, StoreError> {
        let db = self.db();
        let lo = keys::topic_msg(app, topic, after_seq.saturating_add(1));
        let (_, hi) = keys::prefix_range(keys::topic(app, topic));
        Txn::new(&db)
            .scan(Cf::TopicLog, &lo, &hi, limit)?
            .into_iter()
            .map(|(k, v)| decode(Cf::TopicLog, &k, &v))
            .collect()
    }

    /// The topic's retained message, expired or not (the caller judges `expires_ms` by cluster
    /// time; Expire removes it once log time passed it).
    pub fn retained(&self, app: &str, topic: &str) -> Result<Option<RetainedMessage>, StoreError> {
        let db = self.db();
        Txn::new(&db).get(Cf::Retained, &keys::topic(app, topic))
    }

    /// Up to `limit` of the app's retained messages as (topic, message), in key order (topic
    /// names by length, then bytes), starting after the topic `after` (None: from the first).
    pub fn retained_page(
        &self,
        app: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, RetainedMessage)>, StoreError> {
        let db = self.db();
        let (lo, hi) = keys::prefix_range(keys::app(app));
        let lo = match after {
            Some(topic) => {
                let mut k = keys::topic(app, topic);
                k.push(0);
                k
            }
            None => lo,
        };
        Txn::new(&db)
            .scan(Cf::Retained, &lo, &hi, limit)?
            .into_iter()
            .map(|(k, v)| {
                let mut r = KeyReader::new(&k);
                let topic = match (r.str(), r.str()) {
                    (Some(_), Some(t)) if r.is_empty() => t,
                    _ => {
                        return Err(StoreError::Corrupt {
                            what: "retained key".into(),
                            detail: "unparsable".into(),
                        })
                    }
                };
                Ok((topic, decode(Cf::Retained, &k, &v)?))
            })
            .collect()
    }

    /// The subscriptions the device's persistent session keeps, if it has one (expired or not:
    /// see [`KeptSession::expires_ms`]).
    pub fn kept_session(
        &self,
        app: &str,
        user: &str,
        device: &str,
    ) -> Result<Option<KeptSession>, StoreError> {
        let db = self.db();
        Txn::new(&db).get(Cf::Kept, &keys::device(app, user, device))
    }

    /// Where the held messages with this msg id are, as (user, seq). Removed messages (acked,
    /// trimmed, expired) are no longer listed.
    pub fn msg_locations(&self, app: &str, msg_id: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let db = self.db();
        Ok(Txn::new(&db)
            .get(Cf::MsgIdx, &keys::msg_idx(app, msg_id))?
            .unwrap_or_default())
    }

    pub fn counters(&self, app: &str) -> Result<AppCounters, StoreError> {
        let db = self.db();
        Ok(Txn::new(&db)
            .get(Cf::Counters, &keys::app(app))?
            .unwrap_or_default())
    }

    /// Up to `limit` outbox events with id > `after_id`, in id order.
    pub fn events_since(&self, after_id: u64, limit: usize) -> Result<Vec<SessionEvent>, StoreError> {
        let db = self.db();
        let lo = keys::outbox(after_id.saturating_add(1));
        Txn::new(&db)
            .scan(Cf::Outbox, &lo, &[0xff; 9], limit)?
            .into_iter()
            .map(|(k, v)| decode(Cf::Outbox, &k, &v))
            .collect()
    }

    /// Up to `limit` archive outbox entries with id > `after_id`, in id order.
    pub fn archive_since(&self, after_id: u64, limit: usize) -> Result<Vec<ArchivedMessage>, StoreError> {
        let db = self.db();
        let lo = keys::archive(after_id.saturating_add(1));
        Txn::new(&db)
            .scan(Cf::Archive, &lo, &[0xff; 9], limit)?
            .into_iter()
            .map(|(k, v)| decode(Cf::Archive, &k, &v))
            .collect()
    }

    /// The archive outbox's bookkeeping (whether archiving is on, its id range, drops).
    pub fn archive_state(&self) -> Result<ArchiveState, StoreError> {
        let db = self.db();
        Ok(Txn::new(&db)
            .get(Cf::Meta, keys::META_ARCHIVE)?
            .unwrap_or_default())
    }

    /// Events dropped because the outbox was full.
    pub fn events_dropped(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let clocks: Option<super::apply::Clocks> = Txn::new(&db).get(Cf::Meta, keys::META_CLOCKS)?;
        Ok(clocks.unwrap_or_default().events_dropped)
    }

    /// Earliest expiry time in the index (the leader proposes Expire once log time passes it).
    pub fn next_expiry_ms(&self) -> Result<Option<u64>, StoreError> {
        let db = self.db();
        let first = Txn::new(&db).scan(Cf::Expiry, &[], &[0xff; 9], 1)?;
        Ok(first.first().and_then(|(k, _)| KeyReader::new(k).u64()))
    }

    /// The stored first result of an idempotent push, if the key is still remembered.
    pub fn idempotent_result(&self, app: &str, key: &str) -> Result<Option<OpResult>, StoreError> {
        let db = self.db();
        let rec: Option<IdemRecord> = Txn::new(&db).get(Cf::Idem, &keys::idem(app, key))?;
        Ok(rec.map(|r| r.result))
    }

    pub fn membership(&self) -> Result<StoredMembership, StoreError> {
        let db = self.db();
        Ok(Txn::new(&db).get(Cf::Meta, META_MEMBERSHIP)?.unwrap_or_default())
    }

    /// A hash of every replicated key and value, column family by column family in a fixed
    /// order, excluding the last applied log id: replicas that applied the same log agree.
    /// Reads one consistent RocksDB snapshot; walks the whole DB (for tests and checks).
    pub fn state_hash(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let snap = db.snapshot();
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        for cf in Cf::ALL {
            h.write(cf.name().as_bytes());
            // Total order: the Mail column family's memtable is bucketed by mailbox.
            let mut opts = ReadOptions::default();
            opts.set_total_order_seek(true);
            for item in snap.iterator_cf_opt(cf_handle(&db, cf)?, opts, IteratorMode::Start) {
                let (k, v) = item.map_err(|e| rocks_err(&db, e))?;
                if cf == Cf::Meta && &*k == META_LAST_APPLIED {
                    continue;
                }
                h.write(&(k.len() as u64).to_be_bytes());
                h.write(&k);
                h.write(&(v.len() as u64).to_be_bytes());
                h.write(&v);
            }
        }
        Ok(h.finish())
    }
}
