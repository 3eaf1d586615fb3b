//! Snapshot files: building a checkpoint, and the file plumbing of receiving and installing one.
//!
//! A snapshot is a directory `snapshots/<term>-<index>-<millis>/` holding a flat RocksDB checkpoint
//! of the live state-machine DB plus `meta.bin` (bincode of the openraft `SnapshotMeta`). It is never
//! opened read-write: installing links or copies its files into a fresh generation dir.
//!
//! Durability of a built snapshot (logs may be purged up to it as soon as it is reported): RocksDB's
//! `Checkpoint::create_checkpoint` with `log_size_for_flush = 0` flushes the memtables first (flushed
//! SST files are synced by RocksDB before they are installed in the version), hard-links the SSTs,
//! writes MANIFEST/CURRENT/OPTIONS with sync, builds everything in `<dir>.tmp`, renames it into place
//! and fsyncs the checkpoint dir (utilities/checkpoint/checkpoint_impl.cc). We then write `meta.bin`
//! synced, rename the dir to its final name and fsync it and `snapshots/`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{Options, DB};

use super::keys::{Cf, META_LAST_APPLIED, META_MEMBERSHIP};
use super::txn::{decode, rocks_err, Txn};
use crate::error::StoreError;
use crate::types::typ::{LogId, SnapshotMeta, StoredMembership};

/// Name of the metadata file inside a snapshot dir.
pub(crate) const META_FILE: &str = "meta.bin";
/// Snapshots kept in `snapshots/`; older ones are deleted after a new one is built or installed.
pub(crate) const KEEP_SNAPSHOTS: usize = 2;
/// Prefix of scratch dirs (unfinished builds and copies), removed on open.
pub(crate) const TMP_PREFIX: &str = "tmp-";

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// fsync a directory so the entries created or renamed in it survive a crash.
pub(crate) fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

/// Writes `bytes` to `path` atomically and durably: tmp file, fsync, rename, fsync the parent.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| io_err(path, e))?;
    match path.parent() {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

/// Removes a directory tree, logging instead of failing: used for garbage that is safe to leave.
pub(crate) fn remove_dir_logged(path: &Path, why: &str) {
    match fs::remove_dir_all(path) {
        Ok(()) => tracing::info!(path = %path.display(), why, "dir removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, why, "dir removal failed"),
    }
}

/// A snapshot id or file name we accept from elsewhere: one plain path component.
pub(crate) fn safe_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\\') && !name.contains("..") && name != "."
}

/// SST and blob files never change once written, so they can be shared by hard link; everything
/// else (MANIFEST, CURRENT, OPTIONS, WAL) may be rewritten or appended by a DB that opens them, so
/// it is copied.
fn immutable_file(name: &str) -> bool {
    name.ends_with(".sst") || name.ends_with(".blob")
}

/// Links or copies the flat checkpoint in `src` into the empty dir `dst` (created), skipping
/// `meta.bin` and RocksDB info logs; fsyncs every file and `dst`.
pub(crate) fn clone_checkpoint(src: &Path, dst: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dst).map_err(|e| io_err(dst, e))?;
    let entries = fs::read_dir(src).map_err(|e| io_err(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(src, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(StoreError::Snapshot(format!(
                "non-utf8 file name in {}",
                src.display()
            )));
        };
        if !safe_name(name) {
            return Err(StoreError::Snapshot(format!(
                "unsafe file name {name:?} in snapshot"
            )));
        }
        let file_type = entry.file_type().map_err(|e| io_err(&entry.path(), e))?;
        if !file_type.is_file() {
            return Err(StoreError::Snapshot(format!(
                "snapshot entry {name:?} is not a regular file"
            )));
        }
        if name == META_FILE || name.starts_with("LOG") {
            continue;
        }
        let from = entry.path();
        let to = dst.join(name);
        let linked = immutable_file(name) && fs::hard_link(&from, &to).is_ok();
        if !linked {
            fs::copy(&from, &to).map_err(|e| io_err(&to, e))?;
        }
        fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&to, e))?;
    }
    fsync_dir(dst)
}

pub(crate) fn read_meta(dir: &Path) -> Result<SnapshotMeta, StoreError> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
    bincode::deserialize(&bytes).map_err(|e| StoreError::Corrupt {
        what: path.display().to_string(),
        detail: e.to_string(),
    })
}

pub(crate) fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), StoreError> {
    let bytes = super::txn::encode(meta)?;
    write_synced(&dir.join(META_FILE), &bytes)
}

/// Complete snapshots under `snapshots/`, oldest first. Dirs without a readable meta are skipped.
pub(crate) fn list(snapshots: &Path) -> Result<Vec<(SnapshotMeta, PathBuf)>, StoreError> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(snapshots) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_err(snapshots, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(snapshots, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(TMP_PREFIX) || name.ends_with(".tmp") || !path.is_dir() {
            continue;
        }
        match read_meta(&path) {
            Ok(meta) => found.push((meta, path)),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "snapshot dir without meta skipped"),
        }
    }
    found.sort_by(|(a, _), (b, _)| (a.last_log_id, &a.snapshot_id).cmp(&(b.last_log_id, &b.snapshot_id)));
    Ok(found)
}

/// Deletes all but the newest [`KEEP_SNAPSHOTS`] snapshots.
pub(crate) fn prune(snapshots: &Path) -> Result<(), StoreError> {
    let all = list(snapshots)?;
    let excess = all.len().saturating_sub(KEEP_SNAPSHOTS);
    for (_, path) in &all[..excess] {
        remove_dir_logged(path, "old snapshot");
    }
    Ok(())
}

/// Removes unfinished work in `snapshots/`: scratch dirs, RocksDB's `.tmp` staging dirs, and dirs
/// whose meta.bin was never written.
pub(crate) fn clean(snapshots: &Path) -> Result<(), StoreError> {
    let entries = match fs::read_dir(snapshots) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(snapshots, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(snapshots, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(TMP_PREFIX) || name.ends_with(".tmp") || read_meta(&path).is_err() {
            if path.is_dir() {
                remove_dir_logged(&path, "unfinished snapshot");
            } else if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "stray file removal failed");
            }
        }
    }
    Ok(())
}

/// Opens a checkpoint read-only to read the last applied log id and membership it holds: they are
/// consistent with its data even while apply goes on in the live DB. The info log goes to
/// `scratch` so the checkpoint dir stays exactly as RocksDB made it.
pub(crate) fn read_applied(
    checkpoint: &Path,
    scratch: &Path,
) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    fs::create_dir_all(scratch).map_err(|e| io_err(scratch, e))?;
    let mut opts = Options::default();
    opts.set_db_log_dir(scratch);
    // The column families the checkpoint has: one built by a node of an older version lacks the
    // newer ones (they are created when the snapshot is installed).
    let cfs = DB::list_cf(&opts, checkpoint).map_err(|e| StoreError::Rocks {
        path: checkpoint.display().to_string(),
        source: e,
    })?;
    let db = DB::open_cf_for_read_only(&opts, checkpoint, cfs, false).map_err(|e| StoreError::Rocks {
        path: checkpoint.display().to_string(),
        source: e,
    })?;
    let result = read_applied_from(&db);
    drop(db);
    remove_dir_logged(scratch, "snapshot read scratch");
    result
}

/// The last applied log id and membership a DB holds.
pub(crate) fn read_applied_from(db: &DB) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let txn = Txn::new(db);
    let last: Option<LogId> = match txn.get_raw(Cf::Meta, META_LAST_APPLIED)? {
        Some(b) => decode(Cf::Meta, META_LAST_APPLIED, &b)?,
        None => None,
    };
    let membership = txn.get(Cf::Meta, META_MEMBERSHIP)?.unwrap_or_default();
    Ok((last, membership))
}

/// Builds a snapshot of `db` under `snapshots/`.
pub(crate) fn build(db: &DB, snapshots: &Path) -> Result<(SnapshotMeta, PathBuf), StoreError> {
    fs::create_dir_all(snapshots).map_err(|e| io_err(snapshots, e))?;
    let tag: u64 = rand::random();
    let tmp = snapshots.join(format!("{TMP_PREFIX}{tag:016x}"));
    let scratch = snapshots.join(format!("{TMP_PREFIX}{tag:016x}-log"));
    let checkpoint = Checkpoint::new(db).map_err(|e| rocks_err(db, e))?;
    checkpoint.create_checkpoint(&tmp).map_err(|e| rocks_err(db, e))?;
    let built = (|| {
        let (last_log_id, last_membership) = read_applied(&tmp, &scratch)?;
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (term, index) = last_log_id.map_or((0, 0), |l| (l.leader_id.term, l.index));
        // Two builds of the same state in the same millisecond get distinct ids.
        let (snapshot_id, path) = (millis..)
            .map(|m| {
                let id = format!("{term}-{index}-{m}");
                let path = snapshots.join(&id);
                (id, path)
            })
            .find(|(_, p)| !p.exists())
            .ok_or_else(|| StoreError::Snapshot("no free snapshot id".into()))?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        write_meta(&tmp, &meta)?;
        fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        fsync_dir(&path)?;
        fsync_dir(snapshots)?;
        Ok((meta, path))
    })();
    if built.is_err() {
        remove_dir_logged(&tmp, "failed snapshot build");
        remove_dir_logged(&scratch, "failed snapshot build");
    }
    built
}
