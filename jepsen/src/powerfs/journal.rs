//! What a power cut would lose: per file, its size at the last fsync and the synced bytes that
//! were changed since (an undo log). Writes go through to the backing file at once; this journal
//! is what lets a cut put every file back to its last-synced content and size.
//!
//! Invariant: a file with no entry reads on the backing dir exactly as it was at its last sync
//! (or as it was when the journal started). A file's entry is made before its first change after
//! a sync, so every byte below `synced_len` that is not in `saved` is still the synced byte.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// One file changed since its last sync.
struct Dirty {
    /// A read-write handle of its own (the handle that wrote may be write-only, or closed by the
    /// time of the cut), also for files unlinked and still open.
    file: File,
    /// Its size at the last sync.
    synced_len: u64,
    /// Synced bytes overwritten, truncated away or punched since: offset -> the synced bytes.
    /// Ranges do not overlap and lie below `synced_len`.
    saved: BTreeMap<u64, Vec<u8>>,
}

/// What a cut put back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutStats {
    /// Files that had unsynced changes.
    pub files: u64,
    /// Unsynced bytes past the synced size, dropped.
    pub bytes_dropped: u64,
    /// Synced bytes written back (they had been overwritten, truncated or punched).
    pub bytes_restored: u64,
    /// The files that lost the most unsynced bytes past their synced size (name, bytes), at
    /// most [`LARGEST`], largest first. Filled in by `PowerFs::cut`, which knows the names.
    pub largest: Vec<(String, u64)>,
}

/// Files listed in [`CutStats::largest`].
pub const LARGEST: usize = 4;

/// The undo log of every file with unsynced changes, keyed by the backing file's inode number.
#[derive(Default)]
pub struct Journal {
    dirty: HashMap<u64, Dirty>,
}

impl Journal {
    /// Files with unsynced changes.
    pub fn dirty_files(&self) -> usize {
        self.dirty.len()
    }

    /// A file was just created: until it is synced, a cut leaves it empty.
    pub fn created(&mut self, ino: u64, file: File) {
        self.dirty.insert(
            ino,
            Dirty {
                file,
                synced_len: 0,
                saved: BTreeMap::new(),
            },
        );
    }

    /// Bytes `[start, end)` of file `ino` are about to change (a write, a truncate, a punched
    /// hole), or its size is about to grow (`start == end`). `reopen` gives a read-write handle
    /// to the file, called only for its first change since a sync.
    pub fn before_change(
        &mut self,
        ino: u64,
        start: u64,
        end: u64,
        reopen: impl FnOnce() -> io::Result<File>,
    ) -> io::Result<()> {
        let d = match self.dirty.entry(ino) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = reopen()?;
                let synced_len = file.metadata()?.len();
                v.insert(Dirty {
                    file,
                    synced_len,
                    saved: BTreeMap::new(),
                })
            }
        };
        let end = end.min(d.synced_len);
        if start >= end {
            return Ok(());
        }
        for (a, b) in gaps(&d.saved, start, end) {
            let mut buf = vec![0u8; (b - a) as usize];
            read_full_at(&d.file, &mut buf, a)?;
            d.saved.insert(a, buf);
        }
        Ok(())
    }

    /// File `ino` was fsynced (or fdatasynced): what it holds now is what a cut keeps.
    pub fn synced(&mut self, ino: u64) {
        self.dirty.remove(&ino);
    }

    /// File `ino`'s last name is gone: nothing to put back.
    pub fn forget(&mut self, ino: u64) {
        self.dirty.remove(&ino);
    }

    /// The power cut: every file back to its last-synced size and content. Returns the inode
    /// numbers put back, each with the bytes it lost past its synced size, and the totals.
    pub fn cut(&mut self) -> io::Result<(Vec<(u64, u64)>, CutStats)> {
        let mut stats = CutStats::default();
        let mut inos = Vec::with_capacity(self.dirty.len());
        for (ino, d) in self.dirty.drain() {
            let len = d.file.metadata()?.len();
            d.file.set_len(d.synced_len)?;
            for (off, bytes) in &d.saved {
                d.file.write_all_at(bytes, *off)?;
                stats.bytes_restored += bytes.len() as u64;
            }
            stats.files += 1;
            stats.bytes_dropped += len.saturating_sub(d.synced_len);
            inos.push((ino, len.saturating_sub(d.synced_len)));
        }
        Ok((inos, stats))
    }
}

/// Reads `buf.len()` bytes at `off`; what lies past the end of the file reads as zeros.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// The parts of `[start, end)` that no range in `saved` covers.
fn gaps(saved: &BTreeMap<u64, Vec<u8>>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    // The range that starts at or before `start` may cover its beginning.
    let first = saved.range(..=start).next_back();
    for (&off, bytes) in first.into_iter().chain(saved.range(start + 1..end)) {
        let stop = off + bytes.len() as u64;
        if off > at {
            out.push((at, off.min(end)));
        }
        at = at.max(stop);
        if at >= end {
            break;
        }
    }
    if at < end {
        out.push((at, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn rw(path: &std::path::Path) -> File {
        OpenOptions::new().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn gaps_skip_saved_ranges() {
        let mut s = BTreeMap::new();
        s.insert(10, vec![0; 10]); // [10, 20)
        s.insert(30, vec![0; 5]); // [30, 35)
        assert_eq!(gaps(&s, 0, 40), vec![(0, 10), (20, 30), (35, 40)]);
        assert_eq!(gaps(&s, 12, 18), vec![]);
        assert_eq!(gaps(&s, 15, 32), vec![(20, 30)]);
        assert_eq!(gaps(&s, 20, 30), vec![(20, 30)]);
        assert_eq!(gaps(&BTreeMap::new(), 3, 7), vec![(3, 7)]);
    }

    #[test]
    fn cut_restores_synced_content_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap(); // synced state: existed before the journal
        let f = rw(&p);
        let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        let mut j = Journal::default();

        // Overwrite the middle twice, append, then truncate below the synced size.
        j.before_change(ino, 2, 5, || Ok(rw(&p))).unwrap();
        f.write_all_at(b"abc", 2).unwrap();
        j.before_change(ino, 4, 12, || Ok(rw(&p))).unwrap();
        f.write_all_at(b"XXXXXXXX", 4).unwrap();
        j.before_change(ino, 6, 12, || Ok(rw(&p))).unwrap();
        f.set_len(6).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"01abXX");
        assert_eq!(j.dirty_files(), 1);

        let (inos, stats) = j.cut().unwrap();
        assert_eq!(inos, vec![(ino, 0)]);
        assert_eq!(std::fs::read(&p).unwrap(), b"0123456789");
        assert_eq!(stats.files, 1);
        assert_eq!(j.dirty_files(), 0);
    }

    #[test]
    fn synced_changes_survive_and_new_files_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        let mut j = Journal::default();
        j.created(ino, rw(&p));
        j.before_change(ino, 0, 4, || Ok(rw(&p))).unwrap();
        f.write_all_at(b"abcd", 0).unwrap();
        j.synced(ino);
        j.before_change(ino, 4, 8, || Ok(rw(&p))).unwrap();
        f.write_all_at(b"efgh", 4).unwrap();
        let (_, stats) = j.cut().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abcd");
        assert_eq!(stats.bytes_dropped, 4);

        let q = dir.path().join("g");
        let g = File::create(&q).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&g.metadata().unwrap());
        j.created(ino, rw(&q));
        g.write_all_at(b"never synced", 0).unwrap();
        j.cut().unwrap();
        assert_eq!(std::fs::read(&q).unwrap(), b"");
    }
}
