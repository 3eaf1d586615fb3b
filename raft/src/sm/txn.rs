//! A write overlay over the live RocksDB: what one `apply()` call has changed so far.
//!
//! Ops inside one apply call must see each other's effects (two Enqueues to one user get seq n and
//! n+1), but nothing reaches RocksDB until the whole call's WriteBatch is written. So every read
//! during apply goes through [`Txn`]: the overlay first, then the DB. Readers use a `Txn` with an
//! empty overlay as a typed read helper.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use parking_lot::Mutex;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::keys::{prefix_range, Cf};
use crate::error::StoreError;

/// One key/value pair as stored.
pub(crate) type Kv = (Vec<u8>, Vec<u8>);

/// Committed values of the few small column families the apply loop reads on nearly every op
/// (app configs, mailbox metas, counters), kept by the state machine across apply calls so those
/// point reads skip RocksDB (a memtable search of a key with many versions, then the SST files).
///
/// Only the applier uses it, and it holds exactly what the live DB holds: a value enters on a
/// read from the DB or, after an apply call's batch is written, from that batch
/// ([`ReadCache::absorb`]); anything else that changes the DB (a failed write, a range delete, a
/// snapshot install) clears it. Bounded: it is emptied when it reaches [`ReadCache::CAP`] keys.
#[derive(Default)]
pub(crate) struct ReadCache {
    /// One map per held column family (see [`ReadCache::slot`]), so a lookup borrows the key.
    maps: Mutex<[CacheMap; 3]>,
}

type CacheMap = HashMap<Vec<u8>, Option<Vec<u8>>>;

impl ReadCache {
    /// Most keys held (about 100 bytes each).
    pub(crate) const CAP: usize = 32_768;

    /// Which map holds `cf`; `None` for the column families the cache does not hold.
    fn slot(cf: Cf) -> Option<usize> {
        match cf {
            Cf::Apps => Some(0),
            Cf::MailMeta => Some(1),
            Cf::Counters => Some(2),
            _ => None,
        }
    }

    fn holds(cf: Cf) -> bool {
        Self::slot(cf).is_some()
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let slot = Self::slot(cf)?;
        self.maps.lock()[slot].get(key).cloned()
    }

    fn fill(&self, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
        let Some(slot) = Self::slot(cf) else {
            return;
        };
        let mut maps = self.maps.lock();
        let held: usize = maps.iter().map(HashMap::len).sum();
        if held >= Self::CAP && !maps[slot].contains_key(&key) {
            maps.iter_mut().for_each(HashMap::clear);
        }
        maps[slot].insert(key, value);
    }

    pub(crate) fn clear(&self) {
        self.maps.lock().iter_mut().for_each(HashMap::clear);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.maps.lock().iter().map(HashMap::len).sum()
    }

    /// Takes in what a written batch changed (the [`Txn::cached_writes`] of the batch).
    pub(crate) fn absorb(&self, writes: CachedWrites) {
        match writes {
            CachedWrites::Clear => self.clear(),
            CachedWrites::Points(points) => {
                for (cf, k, v) in points {
                    self.fill(cf, k, v);
                }
            }
        }
    }
}

/// What a batch did to the column families a [`ReadCache`] holds.
pub(crate) enum CachedWrites {
    /// Point writes (`None`: deleted).
    Points(Vec<(Cf, Vec<u8>, Option<Vec<u8>>)>),
    /// A range delete touched them: the cache must start over.
    Clear,
}

pub(crate) struct Txn<'a> {
    db: &'a DB,
    /// Committed values of hot column families (the applier's Txn only).
    cache: Option<&'a ReadCache>,
    /// Point writes made by this batch, per column family; `None` is a delete. Newest wins.
    writes: BTreeMap<Cf, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Range deletes `[lo, hi)` made by this batch (DeleteApp). A point write recorded after a range
    /// delete overrides it; point writes inside the range made before it are dropped when it is
    /// recorded, so the batch can list range deletes first and point writes after.
    ranges: Vec<(Cf, Vec<u8>, Vec<u8>)>,
}

pub(crate) fn cf_handle(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(cf.name()).ok_or_else(|| StoreError::Corrupt {
        what: db.path().display().to_string(),
        detail: format!("column family {} missing", cf.name()),
    })
}

pub(crate) fn rocks_err(db: &DB, source: rocksdb::Error) -> StoreError {
    StoreError::Rocks {
        path: db.path().display().to_string(),
        source,
    }
}

pub(crate) fn decode<T: DeserializeOwned>(cf: Cf, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    bincode::deserialize(bytes).map_err(|e| StoreError::Corrupt {
        what: format!("{} key {}", cf.name(), hex_short(key)),
        detail: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serialize(value).map_err(|e| StoreError::Corrupt {
        what: "value to store".into(),
        detail: e.to_string(),
    })
}

fn hex_short(key: &[u8]) -> String {
    key.iter().take(32).map(|b| format!("{b:02x}")).collect()
}

impl<'a> Txn<'a> {
    pub(crate) fn new(db: &'a DB) -> Self {
        Txn {
            db,
            cache: None,
            writes: BTreeMap::new(),
            ranges: Vec::new(),
        }
    }

    /// A Txn whose point reads of the column families `cache` holds go through it. `cache` must
    /// hold what `db` holds (see [`ReadCache`]).
    pub(crate) fn with_cache(db: &'a DB, cache: &'a ReadCache) -> Self {
        Txn {
            cache: Some(cache),
            ..Txn::new(db)
        }
    }

    /// The writes of this batch to column families a [`ReadCache`] holds, for
    /// [`ReadCache::absorb`] once the batch is written.
    pub(crate) fn cached_writes(&self) -> CachedWrites {
        if self.ranges.iter().any(|(cf, _, _)| ReadCache::holds(*cf)) {
            return CachedWrites::Clear;
        }
        let mut points = Vec::new();
        for (cf, writes) in &self.writes {
            if ReadCache::holds(*cf) {
                points.extend(writes.iter().map(|(k, v)| (*cf, k.clone(), v.clone())));
            }
        }
        CachedWrites::Points(points)
    }

    /// Whether this batch writes anything to `cf` (a point write, a delete or a range delete).
    pub(crate) fn touches(&self, cf: Cf) -> bool {
        self.writes.contains_key(&cf) || self.ranges.iter().any(|(c, _, _)| *c == cf)
    }

    fn range_deleted(&self, cf: Cf, key: &[u8]) -> bool {
        self.ranges
            .iter()
            .any(|(c, lo, hi)| *c == cf && key >= lo.as_slice() && key < hi.as_slice())
    }

    pub(crate) fn get_raw(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.writes.get(&cf).and_then(|m| m.get(key)) {
            return Ok(v.clone());
        }
        if self.range_deleted(cf, key) {
            return Ok(None);
        }
        let cache = self.cache.filter(|_| ReadCache::holds(cf));
        if let Some(hit) = cache.and_then(|c| c.get(cf, key)) {
            return Ok(hit);
        }
        let handle = cf_handle(self.db, cf)?;
        let value = self
            .db
            .get_pinned_cf(handle, key)
            .map_err(|e| rocks_err(self.db, e))?
            .map(|v| v.to_vec());
        if let Some(c) = cache {
            c.fill(cf, key.to_vec(), value.clone());
        }
        Ok(value)
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, cf: Cf, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.get_raw(cf, key)? {
            Some(bytes) => decode(cf, key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn put_raw(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.writes.entry(cf).or_default().insert(key, Some(value));
    }

    pub(crate) fn put<T: Serialize>(&mut self, cf: Cf, key: Vec<u8>, value: &T) -> Result<(), StoreError> {
        let bytes = encode(value)?;
        self.put_raw(cf, key, bytes);
        Ok(())
    }

    pub(crate) fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.writes.entry(cf).or_default().insert(key, None);
    }

    /// Deletes every key starting with `prefix`.
    pub(crate) fn delete_prefix(&mut self, cf: Cf, prefix: Vec<u8>) {
        let (lo, hi) = prefix_range(prefix);
        if let Some(m) = self.writes.get_mut(&cf) {
            let inside: Vec<Vec<u8>> = m
                .range::<[u8], _>((Bound::Included(lo.as_slice()), Bound::Excluded(hi.as_slice())))
                .map(|(k, _)| k.clone())
                .collect();
            for k in inside {
                m.remove(&k);
            }
        }
        self.ranges.push((cf, lo, hi));
    }

    /// Up to `limit` live pairs with `lo <= key < hi`, in key order, overlay merged over the DB.
    pub(crate) fn scan(&self, cf: Cf, lo: &[u8], hi: &[u8], limit: usize) -> Result<Vec<Kv>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 || lo >= hi {
            return Ok(out);
        }
        let empty = BTreeMap::new();
        let overlay = self.writes.get(&cf).unwrap_or(&empty);
        let mut ov = overlay
            .range::<[u8], _>((Bound::Included(lo), Bound::Excluded(hi)))
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
            .peekable();

        let handle = cf_handle(self.db, cf)?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(hi.to_vec());
        if cf == Cf::Mail {
            // Mail has a prefix extractor (its mailbox) and a memtable bucketed by it: a scan in
            // one mailbox reads that bucket; anything wider must ask for total order.
            if super::keys::within_one_mailbox(lo, hi) {
                opts.set_prefix_same_as_start(true);
            } else {
                opts.set_total_order_seek(true);
            }
        }
        let mut it = self
            .db
            .iterator_cf_opt(handle, opts, IteratorMode::From(lo, Direction::Forward));
        // The DB side yields only keys the overlay neither rewrote nor deleted.
        let mut next_db = || -> Result<Option<Kv>, StoreError> {
            for item in it.by_ref() {
                let (k, v) = item.map_err(|e| rocks_err(self.db, e))?;
                if overlay.contains_key(&*k) || self.range_deleted(cf, &k) {
                    continue;
                }
                return Ok(Some((k.into_vec(), v.into_vec())));
            }
            Ok(None)
        };
        let mut db_item = next_db()?;
        while out.len() < limit {
            let take_db = match (&db_item, ov.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((dk, _)), Some((ok, _))) => dk.as_slice() < ok.as_slice(),
            };
            if take_db {
                if let Some(kv) = db_item.take() {
                    out.push(kv);
                }
                db_item = next_db()?;
            } else if let Some((k, v)) = ov.next() {
                out.push((k.clone(), v.clone()));
            }
        }
        Ok(out)
    }

    /// Up to `limit` live pairs whose key starts with `prefix`.
    pub(crate) fn scan_prefix(&self, cf: Cf, prefix: Vec<u8>, limit: usize) -> Result<Vec<Kv>, StoreError> {
        let (lo, hi) = prefix_range(prefix);
        self.scan(cf, &lo, &hi, limit)
    }

    /// Like [`Txn::scan_prefix`], decoding the values.
    pub(crate) fn values_prefix<T: DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        self.scan_prefix(cf, prefix, limit)?
            .into_iter()
            .map(|(k, v)| decode(cf, &k, &v))
            .collect()
    }

    /// Everything this transaction changed, as one RocksDB batch: range deletes first, then point
    /// writes (which, by construction of `writes`, all happened after any range delete they fall in).
    pub(crate) fn into_batch(self) -> Result<WriteBatch, StoreError> {
        let mut batch = WriteBatch::default();
        for (cf, lo, hi) in &self.ranges {
            batch.delete_range_cf(cf_handle(self.db, *cf)?, lo, hi);
        }
        for (cf, writes) in &self.writes {
            let handle = cf_handle(self.db, *cf)?;
            for (k, v) in writes {
                match v {
                    Some(v) => batch.put_cf(handle, k, v),
                    None => batch.delete_cf(handle, k),
                }
            }
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocksdb::{ColumnFamilyDescriptor, Options};

    fn open(dir: &std::path::Path) -> DB {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), Options::default()));
        DB::open_cf_descriptors(&opts, dir, cfs).expect("open")
    }

    fn keys_of(kvs: &[Kv]) -> Vec<Vec<u8>> {
        kvs.iter().map(|(k, _)| k.clone()).collect()
    }

    #[test]
    fn read_cache_holds_what_the_db_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open(dir.path());
        let cache = ReadCache::default();
        let k = b"app\0user".to_vec();
        // A miss is read from the DB and remembered (absent too); other column families are not.
        assert_eq!(
            Txn::with_cache(&db, &cache)
                .get_raw(Cf::MailMeta, &k)
                .expect("get"),
            None
        );
        assert_eq!(
            Txn::with_cache(&db, &cache).get_raw(Cf::Mail, &k).expect("get"),
            None
        );
        assert_eq!(cache.len(), 1);
        // A written batch's point writes replace what the cache holds.
        let mut txn = Txn::with_cache(&db, &cache);
        txn.put_raw(Cf::MailMeta, k.clone(), vec![7]);
        let cached = txn.cached_writes();
        db.write(txn.into_batch().expect("batch")).expect("write");
        cache.absorb(cached);
        assert_eq!(
            Txn::with_cache(&db, &cache)
                .get_raw(Cf::MailMeta, &k)
                .expect("get"),
            Some(vec![7])
        );
        // The cache answers without the DB: a write behind its back shows it is really used.
        db.put_cf(cf_handle(&db, Cf::MailMeta).expect("cf"), &k, [8])
            .expect("put");
        assert_eq!(
            Txn::with_cache(&db, &cache)
                .get_raw(Cf::MailMeta, &k)
                .expect("get"),
            Some(vec![7])
        );
        // A range delete over a cached column family empties it.
        let mut txn = Txn::with_cache(&db, &cache);
        txn.delete_prefix(Cf::MailMeta, b"app".to_vec());
        let cached = txn.cached_writes();
        db.write(txn.into_batch().expect("batch")).expect("write");
        cache.absorb(cached);
        assert_eq!(cache.len(), 0);
        assert_eq!(
            Txn::with_cache(&db, &cache)
                .get_raw(Cf::MailMeta, &k)
                .expect("get"),
            None
        );
        // Bounded.
        for i in 0..ReadCache::CAP + 10 {
            cache.fill(Cf::Counters, (i as u64).to_be_bytes().to_vec(), None);
        }
        assert!(cache.len() <= ReadCache::CAP);
    }

    #[test]
    fn overlay_merges_over_db() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open(dir.path());
        let mut seed = Txn::new(&db);
        for k in [1u8, 3, 5, 7] {
            seed.put_raw(Cf::Mail, vec![k], vec![k]);
        }
        db.write(seed.into_batch().expect("batch")).expect("write");

        let mut txn = Txn::new(&db);
        txn.put_raw(Cf::Mail, vec![2], vec![20]); // new, between DB keys
        txn.put_raw(Cf::Mail, vec![3], vec![30]); // overrides a DB key
        txn.delete(Cf::Mail, vec![5]); // hides a DB key
        let all = txn.scan(Cf::Mail, &[0], &[9], usize::MAX).expect("scan");
        assert_eq!(
            all,
            vec![
                (vec![1], vec![1]),
                (vec![2], vec![20]),
                (vec![3], vec![30]),
                (vec![7], vec![7])
            ]
        );
        assert_eq!(
            keys_of(&txn.scan(Cf::Mail, &[2], &[7], 2).expect("scan")),
            vec![vec![2], vec![3]]
        );
        assert_eq!(txn.get_raw(Cf::Mail, &[5]).expect("get"), None);
        // Other column families are untouched by the overlay.
        assert!(txn.scan(Cf::Apps, &[0], &[9], 10).expect("scan").is_empty());
    }

    #[test]
    fn range_delete_then_rewrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open(dir.path());
        let mut seed = Txn::new(&db);
        for k in [[1u8, 1], [1, 2], [2, 1]] {
            seed.put_raw(Cf::Mail, k.to_vec(), vec![0]);
        }
        db.write(seed.into_batch().expect("batch")).expect("write");

        let mut txn = Txn::new(&db);
        txn.put_raw(Cf::Mail, vec![1, 3], vec![9]); // dropped by the range delete below
        txn.delete_prefix(Cf::Mail, vec![1]);
        txn.put_raw(Cf::Mail, vec![1, 2], vec![7]); // written after it: survives
        assert_eq!(txn.get_raw(Cf::Mail, &[1, 1]).expect("get"), None);
        assert_eq!(txn.get_raw(Cf::Mail, &[1, 3]).expect("get"), None);
        assert_eq!(txn.get_raw(Cf::Mail, &[1, 2]).expect("get"), Some(vec![7]));
        let seen = txn.scan(Cf::Mail, &[0], &[9], usize::MAX).expect("scan");
        assert_eq!(keys_of(&seen), vec![vec![1, 2], vec![2, 1]]);

        // The batch gives the DB the same view.
        db.write(txn.into_batch().expect("batch")).expect("write");
        let after = Txn::new(&db)
            .scan(Cf::Mail, &[0], &[9], usize::MAX)
            .expect("scan");
        assert_eq!(after, vec![(vec![1, 2], vec![7]), (vec![2, 1], vec![0])]);
    }
}
