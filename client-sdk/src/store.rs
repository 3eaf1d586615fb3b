//! Resume cursors that survive an app restart.
//!
//! A session's [`Cursors`] (last acked mailbox seq, last seq per topic, recent message ids) are
//! kept in memory by the SDK and, when the session is given a [`CursorStore`], written through
//! it after they change and once more when the session closes. On the next start the session
//! loads them and sends them in HELLO, so the server replays only what the app has not handled,
//! and the id window hides what it showed but had not acked yet.
//!
//! # Why a file per session and not sled
//!
//! The state is a few kilobytes per session, written as a whole, read once at start. The
//! default [`FileStore`] writes it with the classic atomic-replace sequence: write a temporary
//! file, `fsync` it, `rename` it over the old file, `fsync` the directory. After a crash or
//! power loss the file is either the old or the new version, never a mix, with nothing to
//! recover or compact. sled was considered and rejected: its last stable line (0.34) is years
//! old and self-described beta, its on-disk format is not stable and the 1.0 line (still alpha)
//! cannot read it, and it brings background flush threads, a page cache and a large dependency
//! tree, all to hold one small record per session. It would add far more code, memory and
//! upgrade risk to a mobile app than it removes. Apps that already have a database implement
//! [`CursorStore`] over it.
//!
//! # Costs and guarantees
//!
//! Saves run on tokio's blocking pool, coalesced (at most one in flight per session) and spaced
//! by [`SessionConfig::persist_interval`](crate::SessionConfig::persist_interval). A crash can
//! therefore make the app see again a message it was handed during the last interval before the
//! crash (at least once); it can never make the app miss one, because a message id enters the
//! saved window only after the message was handed to the app.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Identifies a session's cursors: one device of one user of one app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionKey {
    /// App id.
    pub app: String,
    /// User id.
    pub user: String,
    /// Device id.
    pub device: String,
}

/// What a session needs to resume: saved through a [`CursorStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursors {
    /// Highest mailbox seq the app has handled (cumulative).
    pub last_acked_seq: u64,
    /// Highest topic seq the app has handled, per topic (`*` is the app-wide broadcast topic).
    #[serde(default)]
    pub topics: BTreeMap<String, u64>,
    /// Ids of the most recent messages handed to the app (acked ones in manual-ack mode),
    /// oldest first.
    #[serde(default)]
    pub recent_ids: Vec<String>,
}

/// Why a [`CursorStore`] could not load or save.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The stored data cannot be used.
    #[error("{path}: corrupt cursor file: {reason}")]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A custom store's own failure.
    #[error("{0}")]
    Other(String),
}

/// Where cursors are kept between app runs.
///
/// Both methods block (they do file or database I/O); the SDK calls them on tokio's blocking
/// pool, never on a runtime thread. `save` must be atomic: after a crash, `load` returns either
/// the previous or the new value.
pub trait CursorStore: Send + Sync + 'static {
    /// The cursors saved for `key`, or `None` if there are none.
    fn load(&self, key: &SessionKey) -> Result<Option<Cursors>, StoreError>;
    /// Replaces the cursors saved for `key`.
    fn save(&self, key: &SessionKey, cursors: &Cursors) -> Result<(), StoreError>;
}

impl<T: CursorStore + ?Sized> CursorStore for Arc<T> {
    fn load(&self, key: &SessionKey) -> Result<Option<Cursors>, StoreError> {
        (**self).load(key)
    }

    fn save(&self, key: &SessionKey, cursors: &Cursors) -> Result<(), StoreError> {
        (**self).save(key, cursors)
    }
}

/// Keeps cursors in memory: resume across reconnects and across sessions opened again in the
/// same process, not across a restart. Cloning shares the same map.
///
/// ```
/// use herald_client::{CursorStore, Cursors, MemoryStore, SessionKey};
///
/// let store = MemoryStore::new();
/// let key = SessionKey { app: "demo".into(), user: "alice".into(), device: "phone".into() };
/// store.save(&key, &Cursors { last_acked_seq: 7, ..Default::default() }).unwrap();
/// assert_eq!(store.load(&key).unwrap().unwrap().last_acked_seq, 7);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    /// The saved cursors, shared between clones.
    map: Arc<Mutex<HashMap<SessionKey, Cursors>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl CursorStore for MemoryStore {
    fn load(&self, key: &SessionKey) -> Result<Option<Cursors>, StoreError> {
        Ok(self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned())
    }

    fn save(&self, key: &SessionKey, cursors: &Cursors) -> Result<(), StoreError> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), cursors.clone());
        Ok(())
    }
}

/// Version of the file layout written by [`FileStore`].
const FILE_FORMAT: u32 = 1;

/// On-disk layout of one session's cursor file: the key is stored too, so a file can be read
/// and checked without knowing how its name was derived.
#[derive(Debug, Serialize, Deserialize)]
struct CursorFile {
    format: u32,
    key: SessionKey,
    cursors: Cursors,
}

/// Crash-safe cursor files in one directory, one small JSON file per session.
///
/// Each save writes a temporary file in the same directory, `fsync`s it, renames it over the
/// session's file and `fsync`s the directory (on Unix), so the file always holds a complete
/// version. Temporary files left by a crash are removed at the next load.
///
/// ```no_run
/// # fn main() -> Result<(), herald_client::StoreError> {
/// use herald_client::FileStore;
/// let store = FileStore::new("/var/lib/myapp/herald")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FileStore {
    /// The directory holding the files.
    dir: PathBuf,
}

/// Distinguishes temporary files of concurrent saves within one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileStore {
    /// A store in `dir`, which is created if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(FileStore { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `key`'s cursors. Names are a hash of the key, because app, user and
    /// device may each be up to 256 bytes of anything.
    pub fn path_for(&self, key: &SessionKey) -> PathBuf {
        self.dir.join(format!("{}.json", Self::stem(key)))
    }

    fn stem(key: &SessionKey) -> String {
        let mut h = Sha256::new();
        for part in [&key.app, &key.user, &key.device] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        format!("cursors-{}", hex::encode(&h.finalize()[..16]))
    }

    fn remove_stale_tmp(&self, stem: &str) {
        let prefix = format!(".{stem}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CursorStore for FileStore {
    fn load(&self, key: &SessionKey) -> Result<Option<Cursors>, StoreError> {
        self.remove_stale_tmp(&Self::stem(key));
        let path = self.path_for(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let file: CursorFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.format != FILE_FORMAT {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("unknown format {}", file.format),
            });
        }
        if &file.key != key {
            return Err(StoreError::Corrupt {
                path,
                reason: "file belongs to another session".into(),
            });
        }
        Ok(Some(file.cursors))
    }

    fn save(&self, key: &SessionKey, cursors: &Cursors) -> Result<(), StoreError> {
        let stem = Self::stem(key);
        let path = self.path_for(key);
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{stem}.{}.{n}.tmp", std::process::id()));
        let body = serde_json::to_vec(&CursorFile {
            format: FILE_FORMAT,
            key: key.clone(),
            cursors: cursors.clone(),
        })
        .map_err(|e| StoreError::Other(e.to_string()))?;
        let result = (|| {
            // 1. The new version, complete and on disk, under a name nobody reads.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&body).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            drop(f);
            // 2. Atomically swap it in: readers see the old or the new file, never a partial one.
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
            // 3. Make the rename itself durable.
            sync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    // Directories cannot be opened for syncing on this platform; the rename is still atomic.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dev: &str) -> SessionKey {
        SessionKey {
            app: "demo".into(),
            user: "alice".into(),
            device: dev.into(),
        }
    }

    fn cursors(seq: u64) -> Cursors {
        Cursors {
            last_acked_seq: seq,
            topics: [("news".to_string(), seq * 2), ("*".to_string(), 3)]
                .into_iter()
                .collect(),
            recent_ids: vec![format!("m{seq}"), format!("m{}", seq + 1)],
        }
    }

    #[test]
    fn missing_file_loads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path().join("sub/dir")).unwrap();
        assert_eq!(s.load(&key("d1")).unwrap(), None);
    }

    #[test]
    fn save_then_load_round_trips_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).unwrap();
        s.save(&key("d1"), &cursors(5)).unwrap();
        s.save(&key("d2"), &cursors(9)).unwrap();
        s.save(&key("d1"), &cursors(6)).unwrap();
        assert_eq!(s.load(&key("d1")).unwrap(), Some(cursors(6)));
        assert_eq!(s.load(&key("d2")).unwrap(), Some(cursors(9)));
        // Nothing but the two session files is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn key_parts_do_not_run_together() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).unwrap();
        let a = SessionKey {
            app: "ab".into(),
            user: "c".into(),
            device: "d".into(),
        };
        let b = SessionKey {
            app: "a".into(),
            user: "bc".into(),
            device: "d".into(),
        };
        assert_ne!(s.path_for(&a), s.path_for(&b));
        let long = SessionKey {
            app: "x".repeat(256),
            user: "y".repeat(256),
            device: "z/..".repeat(64),
        };
        s.save(&long, &cursors(1)).unwrap();
        assert_eq!(s.load(&long).unwrap(), Some(cursors(1)));
    }

    /// A crash in the middle of a save leaves a partial temporary file: the last complete
    /// version still loads, and the debris is cleaned up.
    #[test]
    fn crash_during_save_keeps_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).unwrap();
        s.save(&key("d1"), &cursors(5)).unwrap();
        let stem = FileStore::stem(&key("d1"));
        let debris = dir.path().join(format!(".{stem}.999.0.tmp"));
        fs::write(&debris, br#"{"format":1,"key":{"app":"de"#).unwrap();
        assert_eq!(s.load(&key("d1")).unwrap(), Some(cursors(5)));
        assert!(!debris.exists(), "stale temporary file removed");
        // Saving afterwards works normally.
        s.save(&key("d1"), &cursors(6)).unwrap();
        assert_eq!(s.load(&key("d1")).unwrap(), Some(cursors(6)));
    }

    #[test]
    fn corrupt_or_foreign_files_are_reported_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).unwrap();
        fs::write(s.path_for(&key("d1")), b"{not json").unwrap();
        assert!(matches!(s.load(&key("d1")), Err(StoreError::Corrupt { .. })));
        // A file copied over from another session is refused.
        s.save(&key("d2"), &cursors(2)).unwrap();
        fs::copy(s.path_for(&key("d2")), s.path_for(&key("d1"))).unwrap();
        assert!(matches!(s.load(&key("d1")), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn memory_store_shares_between_clones() {
        let a = MemoryStore::new();
        let b = a.clone();
        a.save(&key("d1"), &cursors(3)).unwrap();
        assert_eq!(b.load(&key("d1")).unwrap(), Some(cursors(3)));
    }
}
