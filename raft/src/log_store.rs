//! The Raft log and vote on RocksDB.
//!
//! Durability contract (what is written in which order, and when it is on disk). One RocksDB at
//! the store's dir, WAL always on, column families `logs` (index u64 BE -> bincode(Entry)) and
//! `meta` (`vote`, `purged`, `committed`):
//! - `save_vote`: a synced write (`WriteOptions::set_sync(true)`): on disk before it returns. A
//!   synced write also syncs every earlier write in the WAL.
//! - `append`: all entries in one WriteBatch, not synced, so they are readable when `append`
//!   returns (openraft requires that). The `LogFlushed` callback goes to the syncer thread, which
//!   drains every queued callback, calls `flush_wal(true)` once (an fsync of the WAL, which covers
//!   every write made before it) and then completes them all: group commit, many appends share
//!   one fsync. openraft counts an entry as persisted (votes for it, acks it to the leader) only
//!   after its callback, so an entry is never reported before it is on disk. On an fsync error
//!   every waiting callback gets the error.
//! - `truncate` (delete logs >= index) and `purge` (delete logs <= index, with the last purged id
//!   in the same batch): one WriteBatch each, not synced. The WAL is ordered, so the next synced
//!   write (an append's flush, a vote) persists them too. Lost in a crash before that, a truncate
//!   brings back uncommitted entries this node never acknowledged after the truncate (no
//!   acknowledgement happens before the next flush), and a purge brings back entries that are
//!   already in a snapshot: both harmless, openraft redoes either.
//! - `save_committed`: a plain write; losing it only means re-applying fewer entries at start.
//!
//! Damage (what a power cut may do, and what it must not): the WAL is recovered in
//! `TolerateCorruptedTailRecords` mode. A torn last record (the tail a power cut cuts off) is
//! dropped, like every other write that was not synced yet: this node never acknowledged those
//! entries, and a leader sends them again. A bad record anywhere else (a checksum mismatch in the
//! middle, which RocksDB's default point-in-time mode silently takes for the end of the log,
//! dropping the synced writes after it) fails the open with [`StoreError::Damaged`], and the node
//! refuses to start until it is rejoined (`herald node --rejoin`). `open` also refuses a log
//! whose first entry does not follow the purged id (a hole), and one whose last entry is of a
//! newer term than the stored vote (the vote, a synced write, was lost).
//! [`LogStore::step_down_after_restart`] keeps a restarted leader from reusing log ids.
//!
//! Reads of the newest entries (replication to each follower and the state machine's apply read
//! every entry back soon after it is appended) are served from [`Recent`], an in-memory copy of
//! the log's tail kept by the same calls that change the log, so they skip RocksDB and decoding.
//!
//! Read or decode errors become openraft `StorageError`s; errors while opening are [`StoreError`].

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{
    ColumnFamilyDescriptor, DBCompressionType, DBRecoveryMode, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::de::DeserializeOwned;

use crate::error::StoreError;
use crate::tuning::Tuning;
use crate::types::typ::{Entry, LogId, StorageError, Vote};
use crate::types::TypeConfig;

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";
const KEY_COMMITTED: &[u8] = b"committed";
/// After a rejoin: the log index this node must hold before it grants votes (see
/// `raft_node::rejoin_vote_floor`).
const KEY_VOTE_HOLD: &[u8] = b"vote_hold";
/// An exclusive upper bound above every 8-byte index key.
const KEY_END: [u8; 9] = [0xff; 9];
/// Bounds of [`Recent`]: entries, and their encoded bytes. Small on purpose: only entries that are
/// about to be replicated or applied need to be there (at 256 writers an entry holds ~128 pushes,
/// ~40 KB), and an idle node should not hold much.
const RECENT_MAX_ENTRIES: usize = 256;
const RECENT_MAX_BYTES: usize = 1 << 20;

/// The log's newest entries, in memory. Invariant: it holds entries with contiguous indexes, and
/// each equals the DB's entry at its index, so a range that lies inside it reads the same as from
/// RocksDB. Every append, truncate and purge updates it under its lock together with the DB write
/// (normally it then ends at the log's last entry); when a write fails it keeps at most a subset
/// of what the DB holds, and reads outside it go to the DB.
#[derive(Default)]
struct Recent {
    /// (entry, its encoded size), oldest first.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Drops entries with index >= `index`.
    fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries with index <= `index`.
    fn purge_upto(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// Records an appended entry (the new last entry of the log).
    fn push(&mut self, entry: Entry, size: usize) {
        let index = entry.log_id.index;
        // An append at or below the tail replaces what follows (the DB write did the same); one
        // past a gap starts over, so the kept entries stay contiguous.
        self.truncate_from(index);
        if self.last_index().is_some_and(|last| last + 1 != index) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_MAX_ENTRIES
            || (self.bytes > RECENT_MAX_BYTES && self.entries.len() > 1)
        {
            self.pop_oldest();
        }
    }

    /// The entries with `start <= index < end` when all of them are here; `None` otherwise.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        if start < first || end > last + 1 {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }
}

/// Raft log and vote store. Clones share one DB and one syncer thread.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

/// The shared part of a [`LogStore`].
struct Inner {
    /// The log DB; the syncer thread holds another reference.
    db: Arc<DB>,
    /// For error messages.
    path: PathBuf,
    /// Appends hand their flush callbacks to the syncer here; dropping it (with the last clone of
    /// the store) ends the thread.
    syncer: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    /// Joined on drop, so the DB is closed (its lock released) when the last clone is gone and
    /// the dir can be opened again at once.
    thread: Option<std::thread::JoinHandle<()>>,
    /// The newest entries (see [`Recent`]); held while the DB is changed, so readers see the DB
    /// and the copy agree.
    recent: Mutex<Recent>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.syncer.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "log syncer thread panicked");
            }
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
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

fn damaged(path: &Path, detail: String) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        detail,
    }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// Drains queued callbacks, fsyncs the WAL once per drained group, completes the group.
fn syncer_loop(db: Arc<DB>, rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        // BUG INJECTION (test-only cargo feature `bug-skip-fsync`, for the jepsen suite): report
        // appends durable without writing the WAL out. With `manual_wal_flush` (set in `open`
        // under the same feature) the appended entries then sit in RocksDB's in-process WAL
        // buffer, so a SIGKILL loses them just as a power cut loses unsynced page cache.
        #[cfg(feature = "bug-skip-fsync")]
        let flushed: Result<(), rocksdb::Error> = Ok(());
        #[cfg(not(feature = "bug-skip-fsync"))]
        let flushed = db.flush_wal(true);
        match flushed {
            Ok(()) => {
                for cb in group {
                    cb.log_io_completed(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(path = %db.path().display(), error = %e, "log fsync failed");
                for cb in group {
                    cb.log_io_completed(Err(std::io::Error::other(e.to_string())));
                }
            }
        }
    }
    tracing::debug!(path = %db.path().display(), "log syncer stopped");
}

impl LogStore {
    /// Opens or creates the log store at `dir`. Fails (never panics) on an unreadable dir, a dir
    /// that is not a RocksDB, or stored values that do not decode.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_tuned(dir, Tuning::default())
    }

    /// [`LogStore::open`] with this node's memtable size (see [`crate::tuning`]).
    pub fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
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
        let cfs = [CF_LOGS, CF_META].map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(DBCompressionType::Lz4);
            if name == CF_LOGS {
                cf_opts.set_write_buffer_size(tuning.log_memtable_bytes);
            }
            ColumnFamilyDescriptor::new(name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| open_err(dir, e))?;
        let db = Arc::new(db);
        let mut inner = Inner {
            db: db.clone(),
            path: dir.to_path_buf(),
            syncer: None,
            thread: None,
            recent: Mutex::new(Recent::default()),
        };
        // Check what we will serve from decodes, so corruption stops the node at start.
        {
            let corrupt = |what: &str, e: StorageError| StoreError::Corrupt {
                what: format!("{} {what}", dir.display()),
                detail: e.to_string(),
            };
            inner.meta::<Vote>(KEY_VOTE).map_err(|e| corrupt("vote", e))?;
            inner
                .meta::<LogId>(KEY_PURGED)
                .map_err(|e| corrupt("purged", e))?;
            inner
                .meta::<Option<LogId>>(KEY_COMMITTED)
                .map_err(|e| corrupt("committed", e))?;
            inner.last_entry_id().map_err(|e| corrupt("last entry", e))?;
            inner.check_consistent().map_err(|e| match e {
                Ok(detail) => damaged(dir, detail),
                Err(e) => corrupt("log", e),
            })?;
        }
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("herald-log-sync".into())
            .spawn(move || syncer_loop(db, rx))
            .map_err(|e| StoreError::Io {
                path: dir.display().to_string(),
                source: e,
            })?;
        inner.syncer = Some(tx);
        inner.thread = Some(thread);
        tracing::info!(path = %dir.display(), "log store opened");
        Ok(LogStore {
            inner: Arc::new(inner),
        })
    }
}

impl LogStore {
    /// Called before openraft starts on this store. A node whose stored vote says it was the
    /// leader (a committed vote for itself in term T) would come back as leader in T at once
    /// (openraft 0.9 restores a committed vote) and append under log ids `(T, i)` from the end of
    /// its own log; if that end was cut off (an unsynced tail lost in a power cut, which the
    /// followers may hold), followers holding other entries under the same ids keep theirs: the
    /// replicas diverge for good. So the vote is replaced, synced, by an uncommitted vote for
    /// itself in T+1: exactly what a candidate does first. Votes only grow and are synced, and
    /// (T+1, me) is above every vote it held (openraft orders votes by term, then node id), so
    /// this grants nothing it could have refused; it leads again only by winning an election in
    /// a later term, against logs that hold what it lost, and a new term's entries never share
    /// ids with older ones. Returns the old and the new vote
    /// when it changed.
    pub fn step_down_after_restart(
        &self,
        me: crate::types::NodeId,
    ) -> Result<Option<(Vote, Vote)>, StoreError> {
        let path = &self.inner.path;
        let vote: Option<Vote> = self.inner.meta(KEY_VOTE).map_err(|e| StoreError::Corrupt {
            what: format!("{} vote", path.display()),
            detail: e.to_string(),
        })?;
        let Some(old) = vote.filter(|v| v.committed && v.leader_id.node_id == me) else {
            return Ok(None);
        };
        let new = Vote::new(old.leader_id.term + 1, me);
        self.save_vote_synced(&new)?;
        Ok(Some((old, new)))
    }

    /// Stores `vote` with a synced write (before openraft runs; see `raft_node::rejoin_vote_floor`).
    pub fn save_vote_synced(&self, vote: &Vote) -> Result<(), StoreError> {
        self.inner
            .put_meta(KEY_VOTE, vote, true)
            .map_err(|e| StoreError::Io {
                path: self.inner.path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
    }

    /// Stores the log id a rejoined node must reach before it grants votes (a synced write).
    pub fn save_vote_hold_synced(&self, hold: &LogId) -> Result<(), StoreError> {
        self.inner
            .put_meta(KEY_VOTE_HOLD, hold, true)
            .map_err(|e| StoreError::Io {
                path: self.inner.path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
    }

    /// The log id stored by [`LogStore::save_vote_hold_synced`].
    pub fn vote_hold(&self) -> Result<Option<LogId>, StoreError> {
        self.inner.meta(KEY_VOTE_HOLD).map_err(|e| StoreError::Corrupt {
            what: format!("{} vote hold", self.inner.path.display()),
            detail: e.to_string(),
        })
    }

    /// The last log id, or the purged one when no entry is left (None: empty log).
    pub fn last_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let read = || -> Result<Option<LogId>, StorageError> {
            Ok(self.inner.last_entry_id()?.or(self.inner.meta(KEY_PURGED)?))
        };
        read().map_err(|e| StoreError::Corrupt {
            what: self.inner.path.display().to_string(),
            detail: e.to_string(),
        })
    }

    /// Bytes in the log DB's memtables (entries not yet flushed to SST files).
    pub(crate) fn memtable_bytes(&self) -> u64 {
        let db = self.inner.db();
        [CF_LOGS, CF_META]
            .iter()
            .filter_map(|name| db.cf_handle(name))
            .filter_map(|h| {
                db.property_int_value_cf(h, crate::sm::MEMTABLE_BYTES)
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

impl Inner {
    fn db(&self) -> &DB {
        &self.db
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // A panic while holding it cannot leave it inconsistent with the DB in a way that matters
        // more than the panic itself; keep serving.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db().cf_handle(name).ok_or_else(|| {
            read_err(StoreError::Corrupt {
                what: self.path.display().to_string(),
                detail: format!("column family {name} missing"),
            })
        })
    }

    fn meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let cf = self.cf(CF_META)?;
        match self.db().get_pinned_cf(cf, key).map_err(read_err)? {
            Some(bytes) => bincode::deserialize(&bytes).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T, sync: bool) -> Result<(), StorageError> {
        let cf = self.cf(CF_META)?;
        let bytes = bincode::serialize(value).map_err(write_err)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db().put_cf_opt(cf, key, bytes, &wo).map_err(write_err)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let cf = self.cf(CF_LOGS)?;
        match self.db().iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (_, value) = item.map_err(read_err)?;
                let entry: Entry = bincode::deserialize(&value).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    fn first_entry_index(&self) -> Result<Option<u64>, StorageError> {
        let cf = self.cf(CF_LOGS)?;
        match self.db().iterator_cf(cf, IteratorMode::Start).next() {
            Some(item) => {
                let (key, _) = item.map_err(read_err)?;
                let key = <[u8; 8]>::try_from(&*key).map_err(read_err)?;
                Ok(Some(u64::from_be_bytes(key)))
            }
            None => Ok(None),
        }
    }

    /// What `open` checks beyond decoding (see the module docs): `Err(Ok(detail))` is damage,
    /// `Err(Err(e))` a read error.
    fn check_consistent(&self) -> Result<(), Result<String, StorageError>> {
        let purged: Option<LogId> = self.meta(KEY_PURGED).map_err(Err)?;
        let vote: Option<Vote> = self.meta(KEY_VOTE).map_err(Err)?;
        let first = self.first_entry_index().map_err(Err)?;
        let last = self.last_entry_id().map_err(Err)?;
        // Entries start right after the purged id (index 0 when nothing was purged).
        let expected_first = purged.map_or(0, |p| p.index + 1);
        if let Some(first) = first.filter(|f| *f > expected_first) {
            return Err(Ok(format!(
                "the log starts at index {first} but entries up to {} were never purged: entries \
                 {expected_first}..{first} are lost",
                first - 1
            )));
        }
        // A node votes (synced) for a leader before it takes that leader's entries.
        let vote_term = vote.map_or(0, |v| v.leader_id.term);
        if let Some(last) = last.filter(|l| l.leader_id.term > vote_term) {
            return Err(Ok(format!(
                "the last entry {last} is of a newer term than the stored vote (term {vote_term}): \
                 the vote was lost"
            )));
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.db()
            .write_opt(batch, &WriteOptions::default())
            .map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.checked_add(1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let Some(end) = end {
            if let Some(hit) = self.inner.recent().get(start, end) {
                return Ok(hit);
            }
        }
        let cf = self.inner.cf(CF_LOGS)?;
        let from = index_key(start);
        let mut out = Vec::new();
        for item in self
            .inner
            .db()
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (key, value) = item.map_err(read_err)?;
            let index = match <[u8; 8]>::try_from(&*key) {
                Ok(k) => u64::from_be_bytes(k),
                Err(e) => return Err(read_err(e)),
            };
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = bincode::deserialize(&value).map_err(|e| {
                StorageError::from(StorageIOError::read_log_at_index(index, AnyError::new(&e)))
            })?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.inner.meta(KEY_PURGED)?;
        let last_log_id = self.inner.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.inner
            .put_meta(KEY_VOTE, vote, true)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.inner.meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.inner.put_meta(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed = self.inner.meta::<Option<LogId>>(KEY_COMMITTED)?.flatten();
        // Never past the log's end: openraft re-applies up to it at start, and a lost tail would
        // make that fail (the entries are committed all the same; the leader sends them again).
        let last = self.inner.last_entry_id()?.or(self.inner.meta(KEY_PURGED)?);
        Ok(committed.min(last))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.inner.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = bincode::serialize(&entry).map_err(|e| {
                StorageError::from(StorageIOError::write_log_entry(entry.log_id, AnyError::new(&e)))
            })?;
            batch.put_cf(cf, index_key(entry.log_id.index), &bytes);
            appended.push((entry, bytes.len()));
        }
        {
            let mut recent = self.inner.recent();
            if let Err(e) = self.inner.write(batch) {
                // What the DB holds is unknown now: read it from there.
                *recent = Recent::default();
                return Err(e);
            }
            for (entry, size) in appended {
                recent.push(entry, size);
            }
        }
        let queued = match &self.inner.syncer {
            Some(syncer) => syncer.send(callback).map_err(|mpsc::SendError(cb)| cb),
            None => Err(callback),
        };
        if let Err(callback) = queued {
            callback.log_io_completed(Err(std::io::Error::other("log syncer thread is gone")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let cf = self.inner.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, index_key(log_id.index).as_slice(), KEY_END.as_slice());
        let mut recent = self.inner.recent();
        recent.truncate_from(log_id.index);
        self.inner.write(batch)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let logs = self.inner.cf(CF_LOGS)?;
        let meta = self.inner.cf(CF_META)?;
        let mut batch = WriteBatch::default();
        let end: Vec<u8> = match log_id.index.checked_add(1) {
            Some(i) => index_key(i).to_vec(),
            None => KEY_END.to_vec(),
        };
        batch.delete_range_cf(logs, index_key(0).to_vec(), end);
        let purged = bincode::serialize(&log_id).map_err(write_err)?;
        batch.put_cf(meta, KEY_PURGED, purged);
        let mut recent = self.inner.recent();
        recent.purge_upto(log_id.index);
        self.inner.write(batch)
    }
}

#[cfg(test)]
mod recent_tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn ids(v: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| {
            v.iter()
                .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                .collect()
        })
    }

    #[test]
    fn serves_only_ranges_it_holds_in_full() {
        let mut r = Recent::default();
        assert_eq!(ids(r.get(0, 1)), None);
        for i in 5..10 {
            r.push(entry(i, 1), 10);
        }
        assert_eq!(ids(r.get(5, 10)).map(|v| v.len()), Some(5));
        assert_eq!(ids(r.get(7, 9)), Some(vec![(7, 1), (8, 1)]));
        assert_eq!(ids(r.get(4, 6)), None, "starts before the first held");
        assert_eq!(ids(r.get(8, 11)), None, "ends past the last held");
        assert_eq!(ids(r.get(7, 7)), Some(vec![]));
    }

    #[test]
    fn follows_truncate_purge_overwrite_and_gaps() {
        let mut r = Recent::default();
        for i in 1..=6 {
            r.push(entry(i, 1), 10);
        }
        // A follower's conflicting suffix: overwritten from 4 by a new term.
        r.push(entry(4, 2), 10);
        assert_eq!(ids(r.get(1, 5)), Some(vec![(1, 1), (2, 1), (3, 1), (4, 2)]));
        assert_eq!(ids(r.get(4, 6)), None, "5 and 6 of the old term are gone");
        r.truncate_from(3);
        assert_eq!(r.last_index(), Some(2));
        assert_eq!(r.bytes, 20);
        r.purge_upto(1);
        assert_eq!(r.first_index(), Some(2));
        // An append past a gap (after an installed snapshot) starts over.
        r.push(entry(100, 3), 10);
        assert_eq!(r.first_index(), Some(100));
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.bytes, 10);
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut r = Recent::default();
        for i in 0..(RECENT_MAX_ENTRIES as u64 + 50) {
            r.push(entry(i, 1), 8);
        }
        assert_eq!(r.entries.len(), RECENT_MAX_ENTRIES);
        assert_eq!(r.last_index(), Some(RECENT_MAX_ENTRIES as u64 + 49));
        let big = RECENT_MAX_BYTES / 3;
        for i in 0..5u64 {
            r.push(entry(RECENT_MAX_ENTRIES as u64 + 50 + i, 1), big);
        }
        assert!(r.bytes <= RECENT_MAX_BYTES, "{} bytes held", r.bytes);
        assert_eq!(r.bytes, r.entries.iter().map(|(_, s)| s).sum::<usize>());
        // One entry larger than the bound is still kept (the newest is always there).
        r.push(entry(RECENT_MAX_ENTRIES as u64 + 55, 1), RECENT_MAX_BYTES * 2);
        assert_eq!(r.entries.len(), 1);
    }
}
