//! The storage half against openraft's own test suite, plus durability and corruption checks.

use std::path::Path;
use std::sync::Arc;

use herald_raft::typ::{Entry, LogId, StorageError, Vote};
use herald_raft::{LogStore, NoObserver, StateMachine, StoreError, TypeConfig};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder};
use tempfile::TempDir;

/// The column families of a log engine (a direct RocksDB open must name them all).
const LOG_CFS: [&str; 4] = ["logs", "meta", "glogs", "gmeta"];

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = TempDir::new().expect("tempdir");
        let log = LogStore::open(&dir.path().join("log")).expect("open log");
        let sm = StateMachine::open(&dir.path().join("sm"), Arc::new(NoObserver)).expect("open sm");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(Builder)
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

#[tokio::test]
async fn log_survives_reopen() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let mut store = LogStore::open(&path)?;
        store
            .blocking_append((1..=10).map(|i| blank(1, i)).collect::<Vec<_>>())
            .await?;
        // Appends in flight at once share fsyncs; every one must complete.
        let mut tasks = Vec::new();
        for i in 11..=30 {
            let mut s = store.clone();
            tasks.push(tokio::spawn(
                async move { s.blocking_append(vec![blank(2, i)]).await },
            ));
            // Keep index order: each append lands before the next starts.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await??;
        }
        store.save_vote(&Vote::new(2, 1)).await?;
        store.purge(log_id(1, 4)).await?;
        store.truncate(log_id(2, 26)).await?;
        store.save_committed(Some(log_id(2, 20))).await?;
    }
    let mut store = LogStore::open(&path)?;
    assert_eq!(store.read_vote().await?, Some(Vote::new(2, 1)));
    assert_eq!(store.read_committed().await?, Some(log_id(2, 20)));
    let state = store.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
    assert_eq!(state.last_log_id, Some(log_id(2, 25)));
    let entries = store.try_get_log_entries(0..100).await?;
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (5..=25).collect::<Vec<_>>());
    let some = store.try_get_log_entries(7..=9).await?;
    assert_eq!(some.len(), 3);
    Ok(())
}

fn expect_store_error<T>(r: Result<T, StoreError>, what: &str) {
    match r {
        Ok(_) => panic!("{what}: opened a corrupt store"),
        Err(e) => eprintln!("{what}: {e}"),
    }
}

#[test]
fn corrupt_log_dir_is_an_error() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    // A file where the dir should be.
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a dir")?;
    expect_store_error(LogStore::open(&file), "file instead of dir");
    // Garbage where RocksDB's CURRENT should be.
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage)?;
    std::fs::write(garbage.join("CURRENT"), b"MANIFEST-999999\n")?;
    expect_store_error(LogStore::open(&garbage), "garbage CURRENT");
    // A real store whose CURRENT was overwritten.
    let real = dir.path().join("real");
    drop(LogStore::open(&real)?);
    std::fs::write(real.join("CURRENT"), b"\x00\x01garbage")?;
    expect_store_error(LogStore::open(&real), "overwritten CURRENT");
    Ok(())
}

#[test]
fn corrupt_sm_dir_is_an_error() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a dir")?;
    expect_store_error(
        StateMachine::open(&file, Arc::new(NoObserver)),
        "file instead of dir",
    );

    let sm_dir = dir.path().join("sm");
    drop(StateMachine::open(&sm_dir, Arc::new(NoObserver))?);
    std::fs::write(sm_dir.join("CURRENT"), b"what")?;
    expect_store_error(StateMachine::open(&sm_dir, Arc::new(NoObserver)), "bad CURRENT");
    std::fs::write(sm_dir.join("CURRENT"), b"gen-7\n")?;
    expect_store_error(StateMachine::open(&sm_dir, Arc::new(NoObserver)), "missing gen");
    std::fs::write(sm_dir.join("CURRENT"), b"gen-1\n")?;
    std::fs::write(sm_dir.join("gen-1").join("CURRENT"), b"garbage\n")?;
    expect_store_error(
        StateMachine::open(&sm_dir, Arc::new(NoObserver)),
        "garbage rocksdb CURRENT",
    );
    Ok(())
}

fn count_dirs(path: &Path) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn sm_restart_keeps_state_and_cleans_leftovers() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("sm");
    let snapshot = {
        let mut sm = StateMachine::open(&path, Arc::new(NoObserver))?;
        sm.apply(vec![blank(1, 1), blank(1, 2)]).await?;
        let s1 = sm.get_snapshot_builder().await.build_snapshot().await?;
        sm.apply(vec![blank(1, 3)]).await?;
        let _s2 = sm.get_snapshot_builder().await.build_snapshot().await?;
        sm.apply(vec![blank(1, 4)]).await?;
        let s3 = sm.get_snapshot_builder().await.build_snapshot().await?;
        // Reading the checkpoint's own meta left it exactly as RocksDB made it.
        for f in std::fs::read_dir(&s3.snapshot.path)? {
            let name = f?.file_name().to_string_lossy().to_string();
            assert!(
                !name.starts_with("LOG") && name != "LOCK",
                "{name} written into snapshot"
            );
        }
        // Only the newest two are kept.
        assert_eq!(count_dirs(&path.join("snapshots")), 2);
        assert!(!s1.snapshot.path.exists());
        let _incoming = sm.begin_receiving_snapshot().await?;
        s3
    };
    // Simulate a crash during install: a half-written next generation.
    std::fs::create_dir_all(path.join("gen-2"))?;
    std::fs::write(path.join("gen-2").join("000001.sst"), b"half")?;
    let mut sm = StateMachine::open(&path, Arc::new(NoObserver))?;
    assert!(!path.join("gen-2").exists(), "leftover generation removed");
    assert_eq!(count_dirs(&path.join("incoming")), 0, "leftover incoming removed");
    assert_eq!(sm.applied_state().await?.0, Some(log_id(1, 4)));
    let reader = sm.reader();
    assert_eq!(reader.applied_index(), 4);
    reader.wait_applied(4).await;
    let waiter = tokio::spawn(async move { reader.wait_applied(6).await });
    sm.apply(vec![blank(1, 5)]).await?;
    assert!(!waiter.is_finished());
    sm.apply(vec![blank(1, 6)]).await?;
    tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await??;
    let current = sm.get_current_snapshot().await?.expect("snapshot after restart");
    assert_eq!(current.meta, snapshot.meta);
    Ok(())
}

#[tokio::test]
async fn install_rejects_mismatched_meta_and_keeps_state() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let mut leader = StateMachine::open(&dir.path().join("a"), Arc::new(NoObserver))?;
    let mut follower = StateMachine::open(&dir.path().join("b"), Arc::new(NoObserver))?;
    leader.apply(vec![blank(1, 1), blank(1, 2)]).await?;
    follower.apply(vec![blank(1, 1)]).await?;
    let snap = leader.get_snapshot_builder().await.build_snapshot().await?;
    let mut lying = snap.meta.clone();
    lying.last_log_id = Some(log_id(1, 9));
    let dest = follower.begin_receiving_snapshot().await?;
    assert!(follower
        .install_snapshot(&lying, Box::new((*snap.snapshot).clone()))
        .await
        .is_err());
    assert_eq!(follower.applied_state().await?.0, Some(log_id(1, 1)));
    // An unsafe snapshot id is refused too.
    let mut evil = snap.meta.clone();
    evil.snapshot_id = "../x".into();
    assert!(follower.install_snapshot(&evil, dest).await.is_err());
    // The honest one installs, and the follower keeps applying after it.
    follower
        .install_snapshot(&snap.meta, Box::new((*snap.snapshot).clone()))
        .await?;
    assert_eq!(follower.applied_state().await?.0, Some(log_id(1, 2)));
    follower.apply(vec![blank(1, 3)]).await?;
    assert_eq!(follower.reader().applied_index(), 3);
    Ok(())
}

/// Overwrites one value in a closed log store's RocksDB.
fn poke(path: &Path, cf: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), path, LOG_CFS)?;
    let handle = db.cf_handle(cf).ok_or_else(|| anyhow::anyhow!("no cf {cf}"))?;
    db.put_cf(handle, key, value)?;
    Ok(())
}

#[tokio::test]
async fn corrupt_log_values_are_errors_not_panics() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let mut store = LogStore::open(&path)?;
        store
            .blocking_append((0..=5).map(|i| blank(1, i)).collect::<Vec<_>>())
            .await?;
        store.save_vote(&Vote::new(1, 1)).await?;
    }
    // A garbage entry in the middle: opens (only the last entry is checked), reads fail.
    poke(&path, "logs", &3u64.to_be_bytes(), b"\xff")?;
    {
        let mut store = LogStore::open(&path)?;
        assert!(store.try_get_log_entries(1..=5).await.is_err());
        assert_eq!(store.try_get_log_entries(1..3).await?.len(), 2);
    }
    // A garbage last entry or vote: the store refuses to open.
    poke(&path, "logs", &5u64.to_be_bytes(), b"\xff")?;
    expect_store_error(LogStore::open(&path), "garbage last entry");
    poke(
        &path,
        "logs",
        &5u64.to_be_bytes(),
        &bincode::serialize(&blank(1, 5))?,
    )?;
    poke(&path, "meta", b"vote", b"\x01")?;
    expect_store_error(LogStore::open(&path), "garbage vote");
    Ok(())
}

fn is_damaged<T>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Damaged { .. }) => {}
        Err(e) => panic!("{what}: expected Damaged, got {e}"),
        Ok(_) => panic!("{what}: opened a damaged log"),
    }
}

/// The newest WAL file of a closed RocksDB.
fn newest_wal(path: &Path) -> std::path::PathBuf {
    let mut wals: Vec<_> = std::fs::read_dir(path)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    wals.sort();
    wals.pop().expect("a WAL file")
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_torn_wal_tail_opens_but_garbage_before_the_tail_is_damage() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let mut store = LogStore::open(&path)?;
        store.save_vote(&Vote::new_committed(1, 1)).await?;
        for chunk in 0..40u64 {
            let entries: Vec<Entry> = (chunk * 50..chunk * 50 + 50).map(|i| blank(1, i)).collect();
            store.blocking_append(entries).await?;
        }
    }
    let wal = newest_wal(&path);
    let len = std::fs::metadata(&wal)?.len();
    assert!(len > 16 * 1024, "WAL only {len} bytes");

    // A torn tail (a power cut in the middle of the last write): the rest opens.
    let torn = dir.path().join("torn");
    copy_dir(&path, &torn)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(torn.join(wal.file_name().unwrap()))?;
    f.set_len(len - 1000)?;
    drop(f);
    let mut store = LogStore::open(&torn)?;
    let last = store.get_log_state().await?.last_log_id.expect("entries left");
    assert!(last.index < 1999 && last.index > 1000, "{last}");
    drop(store);

    // Garbage in the middle, good records after it: RocksDB's default recovery would stop at it
    // and drop the rest without a word.
    let garbled = dir.path().join("garbled");
    copy_dir(&path, &garbled)?;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(garbled.join(wal.file_name().unwrap()))?;
        f.seek(SeekFrom::Start(len / 2))?;
        f.write_all(&[0x5a; 512])?;
    }
    is_damaged(LogStore::open(&garbled), "garbage in the middle of the WAL");
    Ok(())
}

#[tokio::test]
async fn a_hole_at_the_start_or_a_lost_vote_is_damage() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let mut store = LogStore::open(&path)?;
        store.save_vote(&Vote::new_committed(2, 1)).await?;
        store
            .blocking_append((0..=5).map(|i| blank(2, i)).collect::<Vec<_>>())
            .await?;
    }
    drop(LogStore::open(&path)?);
    // The vote is older than the entries it let in.
    poke(
        &path,
        "meta",
        b"vote",
        &bincode::serialize(&Vote::new_committed(1, 1))?,
    )?;
    is_damaged(LogStore::open(&path), "vote older than the log");
    poke(
        &path,
        "meta",
        b"vote",
        &bincode::serialize(&Vote::new_committed(2, 1))?,
    )?;
    drop(LogStore::open(&path)?);
    // Entry 0 gone, nothing purged.
    {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, LOG_CFS)?;
        let logs = db.cf_handle("logs").expect("logs cf");
        db.delete_cf(logs, 0u64.to_be_bytes())?;
    }
    is_damaged(LogStore::open(&path), "hole at the start");
    Ok(())
}

#[tokio::test]
async fn a_restarted_leader_stands_in_a_new_term_and_a_follower_keeps_its_vote() -> anyhow::Result<()> {
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let mut store = LogStore::open(&path)?;
        store.save_vote(&Vote::new_committed(3, 1)).await?;
        store
            .blocking_append((0..=4).map(|i| blank(3, i)).collect::<Vec<_>>())
            .await?;
        store.save_committed(Some(log_id(3, 4))).await?;
    }
    let mut store = LogStore::open(&path)?;
    assert_eq!(store.step_down_after_restart(2)?, None, "node 2 did not lead");
    assert_eq!(store.read_vote().await?, Some(Vote::new_committed(3, 1)));
    let (old, new) = store.step_down_after_restart(1)?.expect("node 1 led");
    assert_eq!(old, Vote::new_committed(3, 1));
    assert_eq!(new, Vote::new(4, 1));
    assert!(!new.is_committed());
    assert_eq!(store.step_down_after_restart(1)?, None, "only once");
    drop(store);
    let mut store = LogStore::open(&path)?;
    assert_eq!(store.read_vote().await?, Some(Vote::new(4, 1)), "synced");
    // A committed id past the log's end (a lost tail) is read as the log's end.
    store.truncate(log_id(3, 3)).await?;
    assert_eq!(store.read_committed().await?, Some(log_id(3, 2)));
    Ok(())
}

/// Every group of a node keeps its log in one engine: what one group appends, truncates, purges
/// or votes never shows in another; all survive a reopen; group 0 is the layout `LogStore::open`
/// has always read; a wiped group leaves the others as they were; concurrent appends of several
/// groups share fsyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_in_one_engine_stay_apart_and_share_fsyncs() -> anyhow::Result<()> {
    use herald_raft::{LogEngine, Tuning};
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let engine = LogEngine::open(&path, Tuning::default())?;
        let (mut g0, mut g1, mut g7) = (engine.group(0)?, engine.group(1)?, engine.group(7)?);
        g0.blocking_append((0..=9).map(|i| blank(1, i)).collect::<Vec<_>>())
            .await?;
        g1.blocking_append((0..=19).map(|i| blank(2, i)).collect::<Vec<_>>())
            .await?;
        g7.blocking_append((0..=29).map(|i| blank(3, i)).collect::<Vec<_>>())
            .await?;
        g0.save_vote(&Vote::new_committed(1, 1)).await?;
        g1.save_vote(&Vote::new(2, 2)).await?;
        g7.save_vote(&Vote::new_committed(3, 3)).await?;
        g1.truncate(log_id(2, 15)).await?;
        g7.purge(log_id(3, 9)).await?;
        // The same group asked for twice is the same store (one in-memory tail).
        let again = engine.group(1)?;
        assert_eq!(again.group(), 1);

        // Appends of four groups at once: every one completes, and fsyncs are shared.
        let (syncs_before, done_before) = engine.sync_counts();
        let mut tasks = Vec::new();
        for g in 10..14u32 {
            let mut store = engine.group(g)?;
            tasks.push(tokio::spawn(async move {
                for i in 0..30u64 {
                    store.blocking_append(vec![blank(1, i)]).await?;
                }
                Ok::<_, StorageError>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let (syncs, done) = engine.sync_counts();
        let (syncs, done) = (syncs - syncs_before, done - done_before);
        assert_eq!(done, 120, "every append completed once");
        assert!(syncs < done, "{done} appends of four groups took {syncs} fsyncs");
    }
    let engine = LogEngine::open(&path, Tuning::default())?;
    let (mut g0, mut g1, mut g7) = (engine.group(0)?, engine.group(1)?, engine.group(7)?);
    let ids = |v: Vec<Entry>| v.iter().map(|e| e.log_id).collect::<Vec<_>>();
    assert_eq!(
        ids(g0.try_get_log_entries(0..100).await?),
        (0..=9).map(|i| log_id(1, i)).collect::<Vec<_>>()
    );
    assert_eq!(
        ids(g1.try_get_log_entries(0..100).await?),
        (0..15).map(|i| log_id(2, i)).collect::<Vec<_>>()
    );
    assert_eq!(
        ids(g7.try_get_log_entries(0..100).await?),
        (10..=29).map(|i| log_id(3, i)).collect::<Vec<_>>()
    );
    assert_eq!(g0.read_vote().await?, Some(Vote::new_committed(1, 1)));
    assert_eq!(g1.read_vote().await?, Some(Vote::new(2, 2)));
    let state = g7.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 9)));
    assert_eq!(state.last_log_id, Some(log_id(3, 29)));
    let empty = engine.group(5)?.get_log_state().await?;
    assert_eq!((empty.last_purged_log_id, empty.last_log_id), (None, None));

    // A group is wiped only while nobody uses it; the others keep everything.
    assert!(engine.wipe_group(7).is_err(), "group 7's store is open");
    drop(g7);
    engine.wipe_group(7)?;
    let mut g7 = engine.group(7)?;
    let state = g7.get_log_state().await?;
    assert_eq!((state.last_purged_log_id, state.last_log_id), (None, None));
    assert_eq!(g7.read_vote().await?, None);
    assert_eq!(g1.try_get_log_entries(0..100).await?.len(), 15);
    drop((g0, g1, g7, engine));

    // Group 0 is what a single-group node's `LogStore::open` reads.
    let mut single = LogStore::open(&path)?;
    assert_eq!(single.try_get_log_entries(0..100).await?.len(), 10);
    assert_eq!(single.read_vote().await?, Some(Vote::new_committed(1, 1)));
    Ok(())
}

/// A hole in one group's log is damage of that group: the others open.
#[tokio::test]
async fn a_damaged_group_is_refused_alone() -> anyhow::Result<()> {
    use herald_raft::{LogEngine, Tuning};
    let dir = TempDir::new()?;
    let path = dir.path().join("log");
    {
        let engine = LogEngine::open(&path, Tuning::default())?;
        for g in [0u32, 3] {
            let mut s = engine.group(g)?;
            s.save_vote(&Vote::new_committed(1, 1)).await?;
            s.blocking_append((0..=5).map(|i| blank(1, i)).collect::<Vec<_>>())
                .await?;
        }
    }
    {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, LOG_CFS)?;
        let logs = db.cf_handle("glogs").expect("glogs cf");
        let mut key = 3u32.to_be_bytes().to_vec();
        key.extend_from_slice(&0u64.to_be_bytes());
        db.delete_cf(logs, key)?;
    }
    let engine = LogEngine::open(&path, Tuning::default())?;
    is_damaged(engine.group(3), "hole at the start of group 3");
    assert_eq!(engine.group(0)?.try_get_log_entries(0..10).await?.len(), 6);
    Ok(())
}
