//! The Raft log and vote on RocksDB.
//!
//! A [`LogStore`] is one Raft group's log and vote. Every group of a node keeps them in the node's
//! one [`LogEngine`] (one RocksDB, one WAL, one fsync thread; `engine.rs` has the key layout).
//!
//! Durability contract (what is written in which order, and when it is on disk), per group, WAL
//! always on (`meta` below is the group's meta keys: `vote`, `purged`, `committed`):
//! - `save_vote`: a synced write (`WriteOptions::set_sync(true)`): on disk before it returns. A
//!   synced write also syncs every earlier write in the WAL.
//! - `append`: all entries in one WriteBatch, not synced, so they are readable when `append`
//!   returns (openraft requires that). The `LogFlushed` callback goes to the syncer thread, which
//!   drains every queued callback, calls `flush_wal(true)` once (an fsync of the WAL, which covers
//!   every write made before it) and then completes them all: group commit, many appends — of any
//!   group — share one fsync. openraft counts an entry as persisted (votes for it, acks it to the leader) only
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

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;

use crate::error::StoreError;
use crate::tuning::Tuning;
use crate::types::typ::{Entry, LogId, StorageError, Vote};
use crate::types::{GroupId, TypeConfig};

mod engine;
mod recent;

use engine::Layout;
pub use engine::LogEngine;
use recent::Recent;

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";
const KEY_COMMITTED: &[u8] = b"committed";
/// After a rejoin: the log index this node must hold before it grants votes (see
/// `raft_node::rejoin_vote_floor`).
const KEY_VOTE_HOLD: &[u8] = b"vote_hold";

/// One Raft group's log and vote store, in the node's [`LogEngine`]. Clones share the group's
/// in-memory tail; the engine hands out one store per group.
#[derive(Clone)]
pub struct LogStore {
    g: Arc<GroupShared>,
}

/// The shared part of a [`LogStore`].
struct GroupShared {
    engine: LogEngine,
    group: GroupId,
    layout: Layout,
    /// The newest entries (see [`Recent`]); held while the DB is changed, so readers see the DB
    /// and the copy agree.
    recent: Mutex<Recent>,
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

impl LogStore {
    /// Opens or creates a log engine at `dir` and returns its group 0 (a single-group node's log).
    /// Fails (never panics) on an unreadable dir, a dir that is not a RocksDB, or stored values
    /// that do not decode.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_tuned(dir, Tuning::default())
    }

    /// [`LogStore::open`] with this node's memtable size (see [`crate::tuning`]).
    pub fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        LogEngine::open(dir, tuning)?.group(0)
    }

    /// The group this store belongs to.
    pub fn group(&self) -> GroupId {
        self.g.group
    }

    /// The engine this group's log lives in (shared with the node's other groups).
    pub fn engine(&self) -> &LogEngine {
        &self.g.engine
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
        let vote: Option<Vote> = self.g.meta(KEY_VOTE).map_err(|e| self.g.corrupt("vote", e))?;
        let Some(old) = vote.filter(|v| v.committed && v.leader_id.node_id == me) else {
            return Ok(None);
        };
        let new = Vote::new(old.leader_id.term + 1, me);
        self.save_vote_synced(&new)?;
        Ok(Some((old, new)))
    }

    /// Stores `vote` with a synced write (before openraft runs; see `raft_node::rejoin_vote_floor`).
    pub fn save_vote_synced(&self, vote: &Vote) -> Result<(), StoreError> {
        self.g
            .put_meta(KEY_VOTE, vote, true)
            .map_err(|e| self.g.io_err(e))
    }

    /// Stores the log id a rejoined node must reach before it grants votes (a synced write).
    pub fn save_vote_hold_synced(&self, hold: &LogId) -> Result<(), StoreError> {
        self.g
            .put_meta(KEY_VOTE_HOLD, hold, true)
            .map_err(|e| self.g.io_err(e))
    }

    /// The log id stored by [`LogStore::save_vote_hold_synced`].
    pub fn vote_hold(&self) -> Result<Option<LogId>, StoreError> {
        self.g
            .meta(KEY_VOTE_HOLD)
            .map_err(|e| self.g.corrupt("vote hold", e))
    }

    /// The last log id, or the purged one when no entry is left (None: empty log).
    pub fn last_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let read = || -> Result<Option<LogId>, StorageError> {
            Ok(self.g.last_entry_id()?.or(self.g.meta(KEY_PURGED)?))
        };
        read().map_err(|e| self.g.corrupt("log", e))
    }

    /// Bytes in the log engine's memtables (all groups: they share them).
    pub(crate) fn memtable_bytes(&self) -> u64 {
        self.g.engine.memtable_bytes()
    }
}

impl GroupShared {
    fn new(engine: LogEngine, group: GroupId) -> Self {
        GroupShared {
            engine,
            group,
            layout: Layout::for_group(group),
            recent: Mutex::new(Recent::default()),
        }
    }

    fn db(&self) -> &DB {
        &self.engine.inner.db
    }

    fn path(&self) -> &Path {
        &self.engine.inner.path
    }

    fn corrupt(&self, what: &str, e: StorageError) -> StoreError {
        let group = match self.group {
            0 => String::new(),
            g => format!(" group {g}"),
        };
        StoreError::Corrupt {
            what: format!("{}{group} {what}", self.path().display()),
            detail: e.to_string(),
        }
    }

    fn io_err(&self, e: StorageError) -> StoreError {
        StoreError::Io {
            path: self.path().display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    /// What opening a group checks before anything is served from it: values decode, and the log
    /// is consistent (see the module docs); refuses a damaged group.
    fn check_on_open(&self) -> Result<(), StoreError> {
        self.meta::<Vote>(KEY_VOTE).map_err(|e| self.corrupt("vote", e))?;
        self.meta::<LogId>(KEY_PURGED)
            .map_err(|e| self.corrupt("purged", e))?;
        self.meta::<Option<LogId>>(KEY_COMMITTED)
            .map_err(|e| self.corrupt("committed", e))?;
        self.last_entry_id().map_err(|e| self.corrupt("last entry", e))?;
        self.check_consistent().map_err(|e| match e {
            Ok(detail) if self.group == 0 => damaged(self.path(), detail),
            Ok(detail) => damaged(self.path(), format!("group {}: {detail}", self.group)),
            Err(e) => self.corrupt("log", e),
        })
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // A panic while holding it cannot leave it inconsistent with the DB in a way that matters
        // more than the panic itself; keep serving.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db().cf_handle(name).ok_or_else(|| {
            read_err(StoreError::Corrupt {
                what: self.path().display().to_string(),
                detail: format!("column family {name} missing"),
            })
        })
    }

    fn meta<T: DeserializeOwned>(&self, name: &[u8]) -> Result<Option<T>, StorageError> {
        let cf = self.cf(self.layout.meta)?;
        let key = self.layout.meta_key(name);
        match self.db().get_pinned_cf(cf, key).map_err(read_err)? {
            Some(bytes) => bincode::deserialize(&bytes).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, name: &[u8], value: &T, sync: bool) -> Result<(), StorageError> {
        let cf = self.cf(self.layout.meta)?;
        let bytes = bincode::serialize(value).map_err(write_err)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db()
            .put_cf_opt(cf, self.layout.meta_key(name), bytes, &wo)
            .map_err(write_err)
    }

    /// This group's log index of a key (`None` past the group's keys).
    fn index_of(&self, key: &[u8]) -> Result<Option<u64>, StorageError> {
        self.layout
            .index_of(key)
            .map_err(|e| read_err(std::io::Error::other(e)))
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let cf = self.cf(self.layout.logs)?;
        let end = self.layout.log_end();
        match self
            .db()
            .iterator_cf(cf, IteratorMode::From(&end, Direction::Reverse))
            .next()
        {
            Some(item) => {
                let (key, value) = item.map_err(read_err)?;
                if self.index_of(&key)?.is_none() {
                    return Ok(None);
                }
                let entry: Entry = bincode::deserialize(&value).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    fn first_entry_index(&self) -> Result<Option<u64>, StorageError> {
        let cf = self.cf(self.layout.logs)?;
        let start = self.layout.log_key(0);
        match self
            .db()
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
            .next()
        {
            Some(item) => {
                let (key, _) = item.map_err(read_err)?;
                self.index_of(&key)
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
            if let Some(hit) = self.g.recent().get(start, end) {
                return Ok(hit);
            }
        }
        let cf = self.g.cf(self.g.layout.logs)?;
        let from = self.g.layout.log_key(start);
        let mut out = Vec::new();
        for item in self
            .g
            .db()
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (key, value) = item.map_err(read_err)?;
            let Some(index) = self.g.index_of(&key)? else {
                break;
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
        let last_purged_log_id: Option<LogId> = self.g.meta(KEY_PURGED)?;
        let last_log_id = self.g.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.g
            .put_meta(KEY_VOTE, vote, true)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.g.meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.g.put_meta(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed = self.g.meta::<Option<LogId>>(KEY_COMMITTED)?.flatten();
        // Never past the log's end: openraft re-applies up to it at start, and a lost tail would
        // make that fail (the entries are committed all the same; the leader sends them again).
        let last = self.g.last_entry_id()?.or(self.g.meta(KEY_PURGED)?);
        Ok(committed.min(last))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.g.cf(self.g.layout.logs)?;
        let mut batch = WriteBatch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = bincode::serialize(&entry).map_err(|e| {
                StorageError::from(StorageIOError::write_log_entry(entry.log_id, AnyError::new(&e)))
            })?;
            batch.put_cf(cf, self.g.layout.log_key(entry.log_id.index), &bytes);
            appended.push((entry, bytes.len()));
        }
        {
            let mut recent = self.g.recent();
            if let Err(e) = self.g.write(batch) {
                // What the DB holds is unknown now: read it from there.
                *recent = Recent::default();
                return Err(e);
            }
            for (entry, size) in appended {
                recent.push(entry, size);
            }
        }
        let queued = match &self.g.engine.inner.syncer {
            Some(syncer) => syncer.send(callback).map_err(|mpsc::SendError(cb)| cb),
            None => Err(callback),
        };
        if let Err(callback) = queued {
            callback.log_io_completed(Err(std::io::Error::other("log syncer thread is gone")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let cf = self.g.cf(self.g.layout.logs)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, self.g.layout.log_key(log_id.index), self.g.layout.log_end());
        let mut recent = self.g.recent();
        recent.truncate_from(log_id.index);
        self.g.write(batch)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let logs = self.g.cf(self.g.layout.logs)?;
        let meta = self.g.cf(self.g.layout.meta)?;
        let mut batch = WriteBatch::default();
        let end = match log_id.index.checked_add(1) {
            Some(i) => self.g.layout.log_key(i),
            None => self.g.layout.log_end(),
        };
        batch.delete_range_cf(logs, self.g.layout.log_key(0), end);
        let purged = bincode::serialize(&log_id).map_err(write_err)?;
        batch.put_cf(meta, self.g.layout.meta_key(KEY_PURGED), purged);
        let mut recent = self.g.recent();
        recent.purge_upto(log_id.index);
        self.g.write(batch)
    }
}
