//! One RocksDB and one fsync thread for every Raft group of a node ([`LogEngine`]).
//!
//! Layout. Group 0 keeps the layout of a single-group data dir: column family `logs` (index u64 BE
//! -> bincode(Entry)) and `meta` (`vote`, `purged`, `committed`, `vote_hold`), so a data dir written
//! before groups existed is group 0 as it is, with no migration. Every other group shares the
//! column families `glogs` and `gmeta` with the same keys behind its id (u32 BE): one memtable and
//! one set of SST files for all of them, however many groups a node hosts. A group's keys are
//! exactly its prefix plus an 8-byte index (or a meta name), so a range from `prefix + index` to
//! `prefix + [0xff; 9]` never reaches another group's keys.
//!
//! Durability: all groups write to the one WAL. The syncer thread drains every flush callback
//! queued by any group's append, calls `flush_wal(true)` once and completes them all, so S groups
//! appending at once share one fsync; a synced vote of one group syncs every earlier write of all
//! of them. What a group's store does with that is in the parent module's docs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};

use openraft::storage::LogFlushed;
use rocksdb::{ColumnFamilyDescriptor, DBCompressionType, DBRecoveryMode, Options, DB};

use super::{GroupShared, LogStore};
use crate::error::StoreError;
use crate::tuning::Tuning;
use crate::types::{GroupId, TypeConfig};

/// Column families of group 0 (a single-group data dir's layout).
pub(super) const CF_LOGS: &str = "logs";
pub(super) const CF_META: &str = "meta";
/// Column families every other group shares, keys behind the group id.
pub(super) const CF_GROUP_LOGS: &str = "glogs";
pub(super) const CF_GROUP_META: &str = "gmeta";
const ALL_CFS: [&str; 4] = [CF_LOGS, CF_META, CF_GROUP_LOGS, CF_GROUP_META];

/// Where one group's keys live.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) logs: &'static str,
    pub(super) meta: &'static str,
    /// Empty for group 0, the group id (u32 BE) for the others.
    pub(super) prefix: Vec<u8>,
}

impl Layout {
    pub(super) fn for_group(group: GroupId) -> Layout {
        if group == 0 {
            return Layout {
                logs: CF_LOGS,
                meta: CF_META,
                prefix: Vec::new(),
            };
        }
        Layout {
            logs: CF_GROUP_LOGS,
            meta: CF_GROUP_META,
            prefix: group.to_be_bytes().to_vec(),
        }
    }

    pub(super) fn log_key(&self, index: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + 8);
        key.extend_from_slice(&self.prefix);
        key.extend_from_slice(&index.to_be_bytes());
        key
    }

    /// An exclusive upper bound above every log key of this group and below every key of the next.
    pub(super) fn log_end(&self) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(&[0xff; 9]);
        key
    }

    pub(super) fn meta_key(&self, name: &[u8]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(name);
        key
    }

    /// The index a log key holds: `Ok(None)` for another group's key, an error for a key of this
    /// group that is not prefix + 8 bytes (damage).
    pub(super) fn index_of(&self, key: &[u8]) -> Result<Option<u64>, String> {
        let Some(rest) = key.strip_prefix(self.prefix.as_slice()) else {
            return Ok(None);
        };
        match <[u8; 8]>::try_from(rest) {
            Ok(k) => Ok(Some(u64::from_be_bytes(k))),
            Err(_) => Err(format!("a log key of {} bytes", key.len())),
        }
    }
}

/// How many fsyncs the engine ran and how many appends (of any group) they completed.
#[derive(Debug, Default)]
pub(super) struct SyncStats {
    syncs: AtomicU64,
    completed: AtomicU64,
}

/// A node's Raft log engine: one RocksDB at one dir holding the logs and votes of every group the
/// node is a member of, and one syncer thread. Cheap to clone; the DB closes (its lock released)
/// when the engine and every group's store are dropped.
#[derive(Clone)]
pub struct LogEngine {
    pub(super) inner: Arc<EngineInner>,
}

pub(super) struct EngineInner {
    /// The log DB; the syncer thread holds another reference.
    pub(super) db: Arc<DB>,
    /// For error messages.
    pub(super) path: PathBuf,
    /// Appends of every group hand their flush callbacks to the syncer here; dropping it (with
    /// the engine) ends the thread.
    pub(super) syncer: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    /// Joined on drop, so the DB is closed when the engine is gone and the dir can be opened again.
    thread: Option<std::thread::JoinHandle<()>>,
    pub(super) stats: Arc<SyncStats>,
    /// The stores handed out, one per group: two stores of one group would keep two in-memory
    /// copies of its tail that disagree.
    groups: Mutex<HashMap<GroupId, Weak<GroupShared>>>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.syncer.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "log syncer thread panicked");
            }
        }
    }
}

fn open_err(path: &Path, source: rocksdb::Error) -> StoreError {
    if matches!(source.kind(), rocksdb::ErrorKind::Corruption) {
        return StoreError::Damaged {
            path: path.display().to_string(),
            detail: source.to_string(),
        };
    }
    StoreError::Rocks {
        path: path.display().to_string(),
        source,
    }
}

/// Drains queued callbacks of every group, fsyncs the WAL once per drained batch, completes them.
fn syncer_loop(db: Arc<DB>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>, stats: Arc<SyncStats>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // BUG INJECTION (test-only cargo feature `bug-skip-fsync`, for the jepsen suite): report
        // appends durable without writing the WAL out. With `manual_wal_flush` (set in `open`
        // under the same feature) the appended entries then sit in RocksDB's in-process WAL
        // buffer, so a SIGKILL loses them just as a power cut loses unsynced page cache.
        #[cfg(feature = "bug-skip-fsync")]
        let flushed: Result<(), rocksdb::Error> = Ok(());
        #[cfg(not(feature = "bug-skip-fsync"))]
        let flushed = db.flush_wal(true);
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.completed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        match flushed {
            Ok(()) => {
                for cb in batch {
                    cb.log_io_completed(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(path = %db.path().display(), error = %e, "log fsync failed");
                for cb in batch {
                    cb.log_io_completed(Err(std::io::Error::other(e.to_string())));
                }
            }
        }
    }
    tracing::debug!(path = %db.path().display(), "log syncer stopped");
}

impl LogEngine {
    /// Opens or creates the log engine at `dir`. Fails (never panics) on an unreadable dir or a
    /// dir that is not a RocksDB; a WAL damaged before its tail is [`StoreError::Damaged`].
    pub fn open(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        // A torn tail is a power cut; a bad record before it is damage (see the module docs).
        opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        // BUG INJECTION (test-only, see `syncer_loop`): keep WAL writes in process memory.
        #[cfg(feature = "bug-skip-fsync")]
        opts.set_manual_wal_flush(true);
        let cfs = ALL_CFS.map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(DBCompressionType::Lz4);
            if name == CF_LOGS || name == CF_GROUP_LOGS {
                cf_opts.set_write_buffer_size(tuning.log_memtable_bytes);
            }
            ColumnFamilyDescriptor::new(name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| open_err(dir, e))?;
        let db = Arc::new(db);
        let stats = Arc::new(SyncStats::default());
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (db, stats) = (db.clone(), stats.clone());
            std::thread::Builder::new()
                .name("herald-log-sync".into())
                .spawn(move || syncer_loop(db, rx, stats))
                .map_err(|e| StoreError::Io {
                    path: dir.display().to_string(),
                    source: e,
                })?
        };
        tracing::info!(path = %dir.display(), "log engine opened");
        Ok(LogEngine {
            inner: Arc::new(EngineInner {
                db,
                path: dir.to_path_buf(),
                syncer: Some(tx),
                thread: Some(thread),
                stats,
                groups: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The store of `group`'s log and vote. Checks what it will serve from at the first call
    /// (values decode, the log follows the purged id, no entry is newer than the vote: see the
    /// parent module) and refuses a damaged group with [`StoreError::Damaged`]; later calls for a
    /// group whose store is still in use return that same store.
    pub fn group(&self, group: GroupId) -> Result<LogStore, StoreError> {
        let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = groups.get(&group).and_then(Weak::upgrade) {
            return Ok(LogStore { g: shared });
        }
        let shared = Arc::new(GroupShared::new(self.clone(), group));
        shared.check_on_open()?;
        groups.insert(group, Arc::downgrade(&shared));
        Ok(LogStore { g: shared })
    }

    /// Deletes everything of `group` (its log, vote, purged and committed ids, vote hold) with one
    /// synced write: a damaged group rejoining (`--rejoin`). Refused while a store of the group is
    /// in use.
    pub fn wipe_group(&self, group: GroupId) -> Result<(), StoreError> {
        let groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        if groups.get(&group).and_then(Weak::upgrade).is_some() {
            return Err(StoreError::Corrupt {
                what: format!("{} group {group}", self.inner.path.display()),
                detail: "cannot wipe a group whose log store is open".into(),
            });
        }
        let layout = Layout::for_group(group);
        let db = &self.inner.db;
        let cf = |name: &str| {
            db.cf_handle(name).ok_or_else(|| StoreError::Corrupt {
                what: self.inner.path.display().to_string(),
                detail: format!("column family {name} missing"),
            })
        };
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(cf(layout.logs)?, layout.log_key(0), layout.log_end());
        // Meta names are short ASCII: below `prefix + [0xff; 9]`.
        batch.delete_range_cf(cf(layout.meta)?, layout.meta_key(b""), layout.log_end());
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo).map_err(|source| StoreError::Rocks {
            path: self.inner.path.display().to_string(),
            source,
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Bytes in the engine's memtables (entries of every group not yet flushed to SST files).
    pub fn memtable_bytes(&self) -> u64 {
        let db = &self.inner.db;
        ALL_CFS
            .iter()
            .filter_map(|name| db.cf_handle(name))
            .filter_map(|h| {
                db.property_int_value_cf(h, crate::sm::MEMTABLE_BYTES)
                    .ok()
                    .flatten()
            })
            .sum()
    }

    /// (fsyncs run, appends they completed) since the engine opened, over all groups. Their ratio
    /// is how many appends shared one fsync.
    pub fn sync_counts(&self) -> (u64, u64) {
        let s = &self.inner.stats;
        (
            s.syncs.load(Ordering::Relaxed),
            s.completed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_never_reach_another_group() {
        let g0 = Layout::for_group(0);
        let g1 = Layout::for_group(1);
        let g2 = Layout::for_group(2);
        assert_eq!(
            g0.log_key(7),
            7u64.to_be_bytes().to_vec(),
            "group 0 keeps the old layout"
        );
        assert_eq!(g0.meta_key(b"vote"), b"vote".to_vec());
        for index in [0, 1, u64::MAX / 2, u64::MAX] {
            let k1 = g1.log_key(index);
            assert!(g1.log_key(0) <= k1 && k1 < g1.log_end());
            assert!(g2.log_key(0) > g1.log_end() && g2.log_key(0) > k1);
            assert_eq!(g1.index_of(&k1), Ok(Some(index)));
            assert_eq!(g2.index_of(&k1), Ok(None));
            assert!(g0.log_key(index) < g0.log_end());
        }
        assert!(
            g1.index_of(&[0, 0, 0, 1, 5]).is_err(),
            "a short key of the group is damage"
        );
        assert!(g0.index_of(&[1, 2, 3]).is_err());
    }
}
