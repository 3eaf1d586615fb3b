//! The replicated state machine on RocksDB: apply, snapshots, and the read handle.
//!
//! On-disk layout under the state machine's dir:
//! - `CURRENT` names the live generation (`gen-<n>`); replaced atomically (tmp, fsync, rename,
//!   fsync dir) when a snapshot is installed.
//! - `gen-<n>/` is the live RocksDB (column families in [`keys::Cf`]).
//! - `snapshots/<term>-<index>-<millis>/` are built or installed snapshots: flat RocksDB
//!   checkpoints plus `meta.bin`; the newest two are kept.
//! - `incoming/<random>/` are dirs handed out by `begin_receiving_snapshot`.
//!
//! On open, generations other than the live one (a crash during install, or an old generation not
//! yet deleted), incoming dirs and unfinished snapshot dirs are removed. No `CURRENT` means a fresh
//! store: gen-1 is created and then `CURRENT` written.
//!
//! Durability: apply writes one WriteBatch per `apply()` call with the WAL on but not synced. The
//! Raft log is the durable record; after a crash openraft re-applies from the last applied id this
//! DB holds (which is in the same batch as the effects, so they never disagree). Snapshots are made
//! durable before they are reported (see [`snapshot`]).

mod app_record;
mod apply;
mod keys;
mod reader;
mod snapshot;
mod txn;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use parking_lot::RwLock;
use rocksdb::{ColumnFamilyDescriptor, DBCompressionType, Options, WriteOptions, DB};
use tokio::sync::watch;

pub use reader::StateReader;
pub(crate) use reader::MEMTABLE_BYTES;

use self::apply::{Applier, Clocks};
use self::keys::{Cf, META_CLOCKS, META_LAST_APPLIED, META_MEMBERSHIP};
use self::snapshot::{io_err, remove_dir_logged, TMP_PREFIX};
use self::txn::{encode, ReadCache, Txn};
use crate::error::StoreError;
use crate::tuning::Tuning;
use crate::types::typ::{LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership};
use crate::types::*;

const CURRENT_FILE: &str = "CURRENT";
const SNAPSHOTS_DIR: &str = "snapshots";
const INCOMING_DIR: &str = "incoming";
const GEN_PREFIX: &str = "gen-";

/// What the state machine shares with its readers and snapshot builders.
pub(crate) struct Shared {
    /// The live DB. Swapped when a snapshot is installed; read-locked only to clone the Arc.
    db: RwLock<Arc<DB>>,
    /// Index of the last applied entry (0 before any), for cheap progress checks.
    applied: AtomicU64,
    /// Log time after the last applied entry.
    log_time: AtomicU64,
    /// Broadcasts `applied` to `wait_applied` callers.
    applied_tx: watch::Sender<u64>,
    /// Snapshot counters for metrics (see [`SnapshotStats`]).
    snapshots_built: AtomicU64,
    snapshots_installed: AtomicU64,
    snapshot_build_ms_total: AtomicU64,
    snapshot_build_ms_last: AtomicU64,
    /// Apps as the live DB holds them, for [`StateReader::app`] (read on every push and every
    /// client connect). Emptied after every batch that writes the apps column family and when a
    /// snapshot is installed.
    pub(crate) apps: AppCache,
}

/// Decoded app configs by id (`None`: no such app), with a generation so a reader that read the
/// DB before a change cannot put the old value back after the change emptied the cache.
#[derive(Default)]
pub(crate) struct AppCache {
    inner: parking_lot::Mutex<AppCacheInner>,
}

#[derive(Default)]
struct AppCacheInner {
    generation: u64,
    apps: std::collections::HashMap<String, Option<AppConfig>>,
}

impl AppCache {
    /// Most apps held; past it the cache starts over (a node serves few apps).
    const CAP: usize = 4096;

    /// The cached value, or the generation to hand to [`AppCache::fill`] after reading the DB.
    pub(crate) fn get(&self, id: &str) -> Result<Option<AppConfig>, u64> {
        let inner = self.inner.lock();
        match inner.apps.get(id) {
            Some(hit) => Ok(hit.clone()),
            None => Err(inner.generation),
        }
    }

    /// Caches what was read from the DB, unless the apps changed since `generation`.
    pub(crate) fn fill(&self, generation: u64, id: &str, app: Option<AppConfig>) {
        let mut inner = self.inner.lock();
        if inner.generation != generation {
            return;
        }
        if inner.apps.len() >= Self::CAP {
            inner.apps.clear();
        }
        inner.apps.insert(id.to_string(), app);
    }

    /// Called after the DB holds a change to the apps (or was replaced).
    pub(crate) fn invalidate(&self) {
        let mut inner = self.inner.lock();
        inner.generation += 1;
        inner.apps.clear();
    }
}

/// What this replica did with snapshots since it started (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Snapshots built here, and how long they took (all of them, and the last one).
    pub built: u64,
    pub build_ms_total: u64,
    pub build_ms_last: u64,
    /// Snapshots received from a leader and installed.
    pub installed: u64,
}

impl Shared {
    pub(crate) fn snapshot_stats(&self) -> SnapshotStats {
        SnapshotStats {
            built: self.snapshots_built.load(Ordering::Relaxed),
            build_ms_total: self.snapshot_build_ms_total.load(Ordering::Relaxed),
            build_ms_last: self.snapshot_build_ms_last.load(Ordering::Relaxed),
            installed: self.snapshots_installed.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    pub(crate) fn db(&self) -> Arc<DB> {
        self.db.read().clone()
    }

    fn publish(&self, applied: Option<LogId>, log_time_ms: u64) {
        let index = applied.map_or(0, |l| l.index);
        self.applied.store(index, Ordering::Release);
        self.log_time.store(log_time_ms, Ordering::Release);
        self.applied_tx.send_replace(index);
    }
}

/// The replicated state machine (its own RocksDB, separate from the log).
pub struct StateMachine {
    /// Root of the layout described in the module docs.
    dir: PathBuf,
    /// Live DB handle and applied progress, shared with readers and builders.
    shared: Arc<Shared>,
    /// Told what each applied entry did, after its batch is written.
    observer: Arc<dyn ApplyObserver>,
    /// Generation number of the live DB dir (`gen-<n>`).
    gen: u64,
    /// Cached copy of what the live DB holds, so `applied_state` reads no disk.
    last_applied: Option<LogId>,
    membership: StoredMembership,
    clocks: Clocks,
    /// Replaced generations some reader or builder still holds; deleted once we hold the last
    /// reference (deleting files under an open DB would break its reads).
    retired: Vec<(Arc<DB>, PathBuf)>,
    /// Committed values of the hot column families, for the applier's point reads.
    cache: ReadCache,
    /// Options of this node's DBs, kept for the generations opened on snapshot install.
    tuning: Tuning,
}

/// Block cache shared by a state-machine DB's column families.
const SM_BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Memtable size of the column families whose few keys are rewritten on every apply.
const HOT_CF_WRITE_BUFFER_BYTES: usize = 2 << 20;
/// Hash buckets of the Mail memtable (8 bytes each): mailboxes sharing a bucket share its list.
const MAIL_MEMTABLE_BUCKETS: usize = 1 << 16;

/// Options of every state-machine DB (live generations); all column families are created.
fn open_db(path: &Path, create: bool, tuning: Tuning) -> Result<DB, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(true);
    opts.set_compression_type(DBCompressionType::Lz4);
    // RocksDB's info logs are for debugging; keep a few, not its default thousand.
    opts.set_keep_log_file_num(4);
    // One writer (the apply loop); the Mail column family's hash-skiplist memtable does not take
    // concurrent inserts, which RocksDB would otherwise enable.
    opts.set_allow_concurrent_memtable_write(false);
    // One block cache for every column family; bloom filters so the apply loop's point reads of
    // keys that do not exist (a new msg id, an unused idempotency key) skip the SST files, and a
    // memtable bloom so they skip the memtable's skiplist too.
    let cache = rocksdb::Cache::new_lru_cache(SM_BLOCK_CACHE_BYTES);
    let cfs = Cf::ALL.iter().map(|cf| {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&table);
        // A few keys rewritten on every apply (mailbox metas, counters, cursors, last applied)
        // pile up one memtable version per write: a small memtable keeps the skiplist that every
        // apply searches shallow, and its flush collapses the versions to one. The registry's
        // column families get the same for connection churn: each connect and disconnect puts
        // and deletes the session and its node-index key. Kept sessions (rewritten by every login
        // of a persistent session) and retained messages (one small value per topic) are few
        // keys too, written far less often than a memtable of the default size would hold.
        if matches!(
            cf,
            Cf::MailMeta
                | Cf::Counters
                | Cf::Meta
                | Cf::TopicMeta
                | Cf::Devices
                | Cf::Sessions
                | Cf::NodeSessions
                | Cf::Kept
                | Cf::Retained
        ) {
            cf_opts.set_write_buffer_size(HOT_CF_WRITE_BUFFER_BYTES);
        }
        if *cf == Cf::Mail {
            // Every mailbox its own memtable skiplist: a push appends to the end of its
            // mailbox's list (the skiplist's sequential-insert fast path) instead of searching one
            // list of all mailboxes from the top (a profile at 256 publishers had that search at
            // 15% of the machine). Iterators over Mail must stay in one mailbox or ask for total
            // order (`Txn::scan` and `state_hash` do).
            cf_opts.set_prefix_extractor(rocksdb::SliceTransform::create(
                "herald.mail.mailbox",
                keys::mailbox_of,
                None,
            ));
            // A flush must first sort the whole hash-skiplist memtable into one list (RocksDB
            // does that in the flush thread): at 64 MiB the sort took 170-530 ms and the flush
            // 160-200 ms of CPU, and the tail benchmark's slowest pushes (175 and 350 ms) fell on
            // it. 16 MiB on average keeps each sort short; the size differs by node so the
            // replicas do not sort at the same moment (see `crate::tuning`).
            cf_opts.set_write_buffer_size(tuning.mail_memtable_bytes);
            cf_opts.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
                bucket_count: MAIL_MEMTABLE_BUCKETS,
                height: 4,
                branching_factor: 4,
            });
        }
        cf_opts.set_memtable_whole_key_filtering(true);
        cf_opts.set_memtable_prefix_bloom_ratio(0.05);
        // Young data is rewritten soon by compaction: compress only from level 2 down.
        let lz4 = DBCompressionType::Lz4;
        let none = DBCompressionType::None;
        cf_opts.set_compression_per_level(&[none, none, lz4, lz4, lz4, lz4, lz4]);
        ColumnFamilyDescriptor::new(cf.name(), cf_opts)
    });
    DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| StoreError::Rocks {
        path: path.display().to_string(),
        source: e,
    })
}

fn gen_dir(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("{GEN_PREFIX}{gen}"))
}

/// The generation `CURRENT` names, or None when there is no `CURRENT` (fresh store).
fn read_current(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(CURRENT_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, e)),
    };
    text.trim()
        .strip_prefix(GEN_PREFIX)
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt {
            what: path.display().to_string(),
            detail: format!("expected gen-<n>, found {:?}", text.trim()),
        })
}

fn write_current(dir: &Path, gen: u64) -> Result<(), StoreError> {
    snapshot::write_synced(&dir.join(CURRENT_FILE), format!("{GEN_PREFIX}{gen}\n").as_bytes())
}

/// Removes every `gen-*` dir except `keep`.
fn remove_other_gens(dir: &Path, keep: Option<u64>) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(n) = name.strip_prefix(GEN_PREFIX) else {
            continue;
        };
        if n.parse::<u64>().ok() != keep || keep.is_none() {
            remove_dir_logged(&entry.path(), "not the live generation");
        }
    }
    Ok(())
}

/// Removes every entry of `dir` (incoming snapshots left by a crash).
fn empty_dir(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            remove_dir_logged(&path, "leftover incoming snapshot");
        } else if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "stray file removal failed");
        }
    }
    Ok(())
}

fn load_state(db: &DB) -> Result<(Option<LogId>, StoredMembership, Clocks), StoreError> {
    let (last, membership) = snapshot::read_applied_from(db)?;
    let clocks = Txn::new(db).get(Cf::Meta, META_CLOCKS)?.unwrap_or_default();
    Ok((last, membership, clocks))
}

fn sm_write_err(e: StoreError) -> StorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}
fn snap_write_err(meta: Option<&SnapshotMeta>, e: StoreError) -> StorageError {
    StorageIOError::write_snapshot(meta.map(|m| m.signature()), AnyError::new(&e)).into()
}
fn snap_read_err(e: StoreError) -> StorageError {
    StorageIOError::read_snapshot(None, AnyError::new(&e)).into()
}

impl StateMachine {
    /// Opens or creates the state machine under `dir` with the default [`Tuning`].
    pub fn open(dir: &Path, observer: Arc<dyn ApplyObserver>) -> Result<Self, StoreError> {
        Self::open_tuned(dir, observer, Tuning::default())
    }

    /// Opens or creates the state machine under `dir`.
    pub fn open_tuned(
        dir: &Path,
        observer: Arc<dyn ApplyObserver>,
        tuning: Tuning,
    ) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let snapshots = dir.join(SNAPSHOTS_DIR);
        let incoming = dir.join(INCOMING_DIR);
        for d in [&snapshots, &incoming] {
            fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        empty_dir(&incoming)?;
        snapshot::clean(&snapshots)?;
        let _ = fs::remove_file(dir.join(CURRENT_FILE).with_extension("tmp"));

        let (gen, db) = match read_current(dir)? {
            Some(gen) => {
                let path = gen_dir(dir, gen);
                if !path.is_dir() {
                    return Err(StoreError::Corrupt {
                        what: dir.join(CURRENT_FILE).display().to_string(),
                        detail: format!("names {} which does not exist", path.display()),
                    });
                }
                remove_other_gens(dir, Some(gen))?;
                (gen, open_db(&path, false, tuning)?)
            }
            None => {
                // A gen dir without CURRENT is a crash during first creation: nothing committed.
                remove_other_gens(dir, None)?;
                let db = open_db(&gen_dir(dir, 1), true, tuning)?;
                snapshot::fsync_dir(dir)?;
                write_current(dir, 1)?;
                tracing::info!(path = %dir.display(), "state machine created");
                (1, db)
            }
        };
        let (last_applied, membership, clocks) = load_state(&db)?;
        let index = last_applied.map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(index);
        let shared = Arc::new(Shared {
            db: RwLock::new(Arc::new(db)),
            applied: AtomicU64::new(index),
            log_time: AtomicU64::new(clocks.log_time_ms),
            applied_tx,
            snapshots_built: AtomicU64::new(0),
            snapshots_installed: AtomicU64::new(0),
            snapshot_build_ms_total: AtomicU64::new(0),
            snapshot_build_ms_last: AtomicU64::new(0),
            apps: AppCache::default(),
        });
        tracing::info!(
            path = %dir.display(),
            gen,
            applied = index,
            mail_memtable_bytes = tuning.mail_memtable_bytes,
            "state machine opened"
        );
        let mut sm = StateMachine {
            dir: dir.to_path_buf(),
            shared,
            observer,
            gen,
            last_applied,
            membership,
            clocks,
            retired: Vec::new(),
            cache: ReadCache::default(),
            tuning,
        };
        // Apply writes are not fsynced: after a power loss the DB may be behind the newest
        // snapshot, and the log may already be purged up to that snapshot. Catch up from it.
        if let Some((meta, path)) = snapshot::list(&snapshots)?.pop() {
            if meta.last_log_id > sm.last_applied {
                tracing::warn!(
                    snapshot_id = %meta.snapshot_id,
                    applied = ?sm.last_applied,
                    "state behind newest snapshot, reinstalling it"
                );
                sm.install(&meta, &path)?;
            }
        }
        Ok(sm)
    }

    /// A cheap, cloneable read handle.
    pub fn reader(&self) -> StateReader {
        StateReader::new(self.shared.clone())
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOTS_DIR)
    }

    /// Deletes retired generations nobody reads any more.
    fn sweep_retired(&mut self) {
        self.retired.retain(|(db, path)| {
            if Arc::strong_count(db) > 1 {
                return true;
            }
            remove_dir_logged(path, "retired generation");
            false
        });
    }

    /// Applies entries in one batch; returns per-entry responses and events.
    fn apply_batch(&mut self, entries: Vec<Entry>) -> Result<(Vec<Response>, EntryEvents), StorageError> {
        let db = self.shared.db();
        let mut applier = Applier::new(Txn::with_cache(&db, &self.cache), self.clocks.clone());
        let mut last_applied = self.last_applied;
        let mut membership = self.membership.clone();
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::with_capacity(entries.len());
        for entry in entries {
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(req) => applier
                    .apply_request(&req)
                    .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?,
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            };
            last_applied = Some(entry.log_id);
            responses.push(response);
            events.push((entry.log_id.index, applier.take_events()));
        }
        applier.finish().map_err(sm_write_err)?;
        let clocks = applier.clocks.clone();
        let mut txn = applier.txn;
        let cached = txn.cached_writes();
        let apps_changed = txn.touches(Cf::Apps);
        let meta = (|| {
            txn.put_raw(Cf::Meta, META_LAST_APPLIED.to_vec(), encode(&last_applied)?);
            txn.put_raw(Cf::Meta, META_MEMBERSHIP.to_vec(), encode(&membership)?);
            txn.put_raw(Cf::Meta, META_CLOCKS.to_vec(), encode(&clocks)?);
            txn.into_batch()
        })();
        let batch = meta.map_err(sm_write_err)?;
        // Not synced: the Raft log is the durable record (see module docs).
        if let Err(e) = db.write_opt(batch, &WriteOptions::default()) {
            self.cache.clear();
            self.shared.apps.invalidate();
            return Err(sm_write_err(txn::rocks_err(&db, e)));
        }
        if apps_changed {
            self.shared.apps.invalidate();
        }
        self.cache.absorb(cached);
        self.last_applied = last_applied;
        self.membership = membership;
        self.clocks = clocks;
        self.shared.publish(last_applied, self.clocks.log_time_ms);
        Ok((responses, events))
    }

    /// Installs the snapshot in `src` as a new generation; see the module docs for the order.
    fn install(&mut self, meta: &SnapshotMeta, src: &Path) -> Result<(), StoreError> {
        if !snapshot::safe_name(&meta.snapshot_id) || meta.snapshot_id.starts_with(TMP_PREFIX) {
            return Err(StoreError::Snapshot(format!(
                "unsafe snapshot id {:?}",
                meta.snapshot_id
            )));
        }
        let new_gen = self.gen + 1;
        let new_dir = gen_dir(&self.dir, new_gen);
        remove_dir_logged(&new_dir, "stale generation dir");
        let opened = (|| {
            snapshot::clone_checkpoint(src, &new_dir)?;
            // The new gen dir's own entry must be durable before CURRENT can name it.
            snapshot::fsync_dir(&self.dir)?;
            let db = open_db(&new_dir, false, self.tuning)?;
            let state = load_state(&db)?;
            if state.0 != meta.last_log_id {
                return Err(StoreError::Snapshot(format!(
                    "snapshot {} holds last applied {:?}, meta says {:?}",
                    meta.snapshot_id, state.0, meta.last_log_id
                )));
            }
            Ok((db, state))
        })();
        let (db, (last_applied, membership, clocks)) = match opened {
            Ok(v) => v,
            Err(e) => {
                remove_dir_logged(&new_dir, "failed snapshot install");
                return Err(e);
            }
        };

        // Keep a copy in snapshots/ before switching, so the state we switch to can always be
        // served to others as a snapshot.
        let snapshots = self.snapshots_dir();
        let kept = snapshots.join(&meta.snapshot_id);
        if src.parent() != Some(snapshots.as_path()) && !kept.exists() {
            let tmp = snapshots.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
            let copied = snapshot::clone_checkpoint(src, &tmp)
                .and_then(|_| snapshot::write_meta(&tmp, meta))
                .and_then(|_| fs::rename(&tmp, &kept).map_err(|e| io_err(&kept, e)))
                .and_then(|_| snapshot::fsync_dir(&snapshots));
            if let Err(e) = copied {
                remove_dir_logged(&tmp, "failed snapshot copy");
                drop(db);
                remove_dir_logged(&new_dir, "failed snapshot install");
                return Err(e);
            }
        }

        write_current(&self.dir, new_gen)?;
        let old = std::mem::replace(&mut *self.shared.db.write(), Arc::new(db));
        self.cache.clear();
        self.shared.apps.invalidate();
        let old_dir = gen_dir(&self.dir, self.gen);
        self.gen = new_gen;
        self.last_applied = last_applied;
        self.membership = membership;
        self.clocks = clocks;
        self.shared.publish(last_applied, self.clocks.log_time_ms);
        self.retired.push((old, old_dir));
        self.sweep_retired();

        if src.starts_with(self.dir.join(INCOMING_DIR)) {
            remove_dir_logged(src, "installed incoming snapshot");
        }
        snapshot::prune(&snapshots)?;
        tracing::info!(
            snapshot_id = %meta.snapshot_id,
            gen = new_gen,
            applied = ?self.last_applied,
            "snapshot installed"
        );
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let (responses, events) = self.apply_batch(entries)?;
        for (index, evs) in events {
            self.observer.applied(index, evs);
        }
        if !self.retired.is_empty() {
            self.sweep_retired();
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            snapshots: self.snapshots_dir(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotDir>, StorageError> {
        let path = self
            .dir
            .join(INCOMING_DIR)
            .join(format!("{:016x}", rand::random::<u64>()));
        fs::create_dir_all(&path).map_err(|e| snap_write_err(None, io_err(&path, e)))?;
        Ok(Box::new(SnapshotDir { path }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotDir>,
    ) -> Result<(), StorageError> {
        self.install(meta, &snapshot.path)
            .map_err(|e| snap_write_err(Some(meta), e))?;
        self.shared.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let newest = snapshot::list(&self.snapshots_dir())
            .map_err(snap_read_err)?
            .pop();
        Ok(newest.map(|(meta, path)| Snapshot {
            meta,
            snapshot: Box::new(SnapshotDir { path }),
        }))
    }
}

/// Builds snapshots from the live DB; runs beside apply (the checkpoint is consistent by itself).
pub struct SnapshotBuilder {
    /// Where the live DB handle is.
    shared: Arc<Shared>,
    /// The `snapshots/` dir to build into.
    snapshots: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let db = self.shared.db();
        let snapshots = self.snapshots.clone();
        let started = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            let built = snapshot::build(&db, &snapshots)?;
            snapshot::prune(&snapshots)?;
            Ok::<_, StoreError>(built)
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e))))?;
        let (meta, path) = built.map_err(|e| snap_write_err(None, e))?;
        let ms = started.elapsed().as_millis() as u64;
        self.shared.snapshots_built.fetch_add(1, Ordering::Relaxed);
        self.shared
            .snapshot_build_ms_total
            .fetch_add(ms, Ordering::Relaxed);
        self.shared.snapshot_build_ms_last.store(ms, Ordering::Relaxed);
        tracing::info!(snapshot_id = %meta.snapshot_id, took_ms = ms, "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotDir { path }),
        })
    }
}

type Entry = crate::types::typ::Entry;
/// Events of each applied entry, by log index, in log order.
type EntryEvents = Vec<(u64, Vec<ApplyEvent>)>;

#[cfg(test)]
mod app_cache_tests {
    use super::*;

    fn app(id: &str, key: &str) -> AppConfig {
        AppConfig {
            id: id.into(),
            name: id.into(),
            secrets: Vec::new(),
            api_keys: vec![key.into()],
            limits: AppLimits::STANDARD,
            policy: DevicePolicy {
                max_per_platform: 0,
                max_per_user: 0,
            },
            callbacks: Vec::new(),
            created_ms: 0,
            client_publish: Vec::new(),
        }
    }

    #[test]
    fn a_read_from_before_a_change_is_not_cached_after_it() {
        let cache = AppCache::default();
        // A reader misses, reads the DB (old key)...
        let generation = cache.get("a").unwrap_err();
        let old = Some(app("a", "old"));
        // ...meanwhile a batch changes the app and empties the cache...
        cache.invalidate();
        // ...and the reader's late fill must not bring the old value back.
        cache.fill(generation, "a", old);
        let generation = cache.get("a").expect_err("the stale read was cached");
        cache.fill(generation, "a", Some(app("a", "new")));
        assert_eq!(cache.get("a").unwrap(), Some(app("a", "new")));
    }

    #[test]
    fn absent_apps_are_cached_and_invalidate_empties() {
        let cache = AppCache::default();
        let generation = cache.get("nope").unwrap_err();
        cache.fill(generation, "nope", None);
        assert_eq!(cache.get("nope"), Ok(None));
        cache.invalidate();
        assert!(cache.get("nope").is_err());
    }
}

#[cfg(test)]
mod snapshot_compat_tests {
    use super::*;

    /// A snapshot built by a node of an older version, whose checkpoint lacks the newer column
    /// families (retained, kept), is read and installed; the missing ones are created empty.
    #[test]
    fn a_snapshot_without_the_newer_column_families_installs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("old");
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let names: Vec<&str> = Cf::ALL
            .iter()
            .filter(|cf| !matches!(cf, Cf::Retained | Cf::Kept))
            .map(|cf| cf.name())
            .collect();
        let db = DB::open_cf(&opts, &old, &names).expect("old db");
        let log_id = LogId::new(openraft::CommittedLeaderId::new(1, 1), 7);
        let meta_cf = db.cf_handle(Cf::Meta.name()).expect("meta");
        db.put_cf(meta_cf, META_LAST_APPLIED, encode(&Some(log_id)).expect("encode"))
            .expect("put");
        let snaps = dir.path().join("snaps");
        fs::create_dir_all(&snaps).expect("dir");
        let checkpoint = snaps.join("1-7-0");
        rocksdb::checkpoint::Checkpoint::new(&db)
            .expect("checkpoint")
            .create_checkpoint(&checkpoint)
            .expect("create");
        drop(db);

        let (last, _) = snapshot::read_applied(&checkpoint, &dir.path().join("scratch")).expect("read");
        assert_eq!(last, Some(log_id));
        let mut sm = StateMachine::open(&dir.path().join("sm"), Arc::new(NoObserver)).expect("open");
        let meta = SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::default(),
            snapshot_id: "1-7-0".into(),
        };
        sm.install(&meta, &checkpoint).expect("install");
        let reader = sm.reader();
        assert_eq!(reader.applied_index(), 7);
        assert_eq!(reader.retained("a", "t").expect("read"), None);
        assert_eq!(reader.kept_session("a", "u", "d").expect("read"), None);
        reader.state_hash().expect("every column family is there");
    }
}
