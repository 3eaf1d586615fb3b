//! The FUSE side: a passthrough of a backing dir that tells the [`Journal`] before every change
//! of a file's bytes or size, and after every fsync.
//!
//! Inodes: the kernel's inode numbers are ours (1 is the root), each mapped to the backing
//! file's inode and to its names (paths relative to the backing dir; a hard-linked file has
//! several). A name is added on lookup/create/link and moved or dropped by rename, unlink and
//! rmdir; a backing inode whose last name is gone gets a new number if it is seen again, so the
//! kernel never mixes two files up. One mutex guards it all: requests run on several threads
//! and each holds it while it works (a slow fsync sleeps before taking it; what it then makes
//! durable is the file as it is when the sleep ends, which a real fsync may also do).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use nix::fcntl::FallocateFlags;
use nix::libc;
use parking_lot::Mutex;

use super::journal::Journal;

/// How long the kernel may cache entries and attributes. Short, because a cut changes sizes
/// behind its back (the cut also invalidates what it changed, see `PowerFs::cut`).
const TTL: Duration = Duration::from_millis(200);

/// A kernel inode.
struct Node {
    /// The backing file's inode number.
    backing: u64,
    /// Its names, relative to the backing dir ("" is the root).
    paths: BTreeSet<PathBuf>,
    /// Lookups the kernel holds (it forgets them with `forget`).
    nlookup: u64,
}

/// An open file.
struct Handle {
    file: Arc<File>,
    /// The backing inode (journal key).
    backing: u64,
    /// Opened with O_SYNC or O_DSYNC: every write is synced.
    sync: bool,
}

/// Everything the requests and the cut share.
pub(super) struct State {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_backing: HashMap<u64, u64>,
    next_ino: u64,
    files: HashMap<u64, Handle>,
    dirs: HashMap<u64, Vec<(u64, FileType, std::ffi::OsString)>>,
    next_fh: u64,
    pub(super) journal: Journal,
    /// Cuts so far: an fsync that a cut overtook makes nothing durable.
    pub(super) cuts: u64,
}

impl State {
    pub(super) fn new(root: PathBuf) -> io::Result<State> {
        let meta = fs::symlink_metadata(&root)?;
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                backing: meta.ino(),
                paths: BTreeSet::from([PathBuf::new()]),
                nlookup: 1,
            },
        );
        Ok(State {
            root,
            by_backing: HashMap::from([(meta.ino(), INodeNo::ROOT.0)]),
            nodes,
            next_ino: 2,
            files: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            journal: Journal::default(),
            cuts: 0,
        })
    }

    /// The kernel inode of a backing inode, if it has one.
    pub(super) fn kernel_ino(&self, backing: u64) -> Option<u64> {
        self.by_backing.get(&backing).copied()
    }

    /// A name of a backing inode the kernel knows, relative to the backing dir.
    pub(super) fn name_of(&self, backing: u64) -> Option<String> {
        let node = self.nodes.get(&self.kernel_ino(backing)?)?;
        node.paths.first().map(|p| p.display().to_string())
    }

    fn rel(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino.0)
            .and_then(|n| n.paths.first().cloned())
            .ok_or(Errno::ENOENT)
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.rel(parent)?.join(name))
    }

    /// Counts a lookup of `rel` (with its metadata) and returns its attributes.
    fn remember(&mut self, rel: PathBuf, meta: &fs::Metadata) -> FileAttr {
        let ino = match self.by_backing.get(&meta.ino()) {
            Some(&ino) => ino,
            None => {
                let ino = self.next_ino;
                self.next_ino += 1;
                self.by_backing.insert(meta.ino(), ino);
                self.nodes.insert(
                    ino,
                    Node {
                        backing: meta.ino(),
                        paths: BTreeSet::new(),
                        nlookup: 0,
                    },
                );
                ino
            }
        };
        let node = self.nodes.get_mut(&ino).expect("mapped inodes have nodes");
        node.paths.insert(rel);
        node.nlookup += 1;
        attr(INodeNo(ino), meta)
    }

    /// Name `rel` is gone; if it was its inode's last, the backing inode is unmapped.
    fn drop_name(&mut self, rel: &Path) {
        let mut emptied = Vec::new();
        for (ino, n) in self.nodes.iter_mut() {
            if n.paths.remove(rel) && n.paths.is_empty() {
                emptied.push((*ino, n.backing));
            }
        }
        for (ino, backing) in emptied {
            if self.by_backing.get(&backing) == Some(&ino) {
                self.by_backing.remove(&backing);
            }
        }
    }

    fn add_file(&mut self, file: File, backing: u64, flags: i32) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.files.insert(
            fh,
            Handle {
                file: Arc::new(file),
                backing,
                sync: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
            },
        );
        fh
    }

    /// Tells the journal before bytes `[start, end)` of the file behind `fh` change.
    fn before_change(&mut self, fh: u64, start: u64, end: u64) -> Result<(Arc<File>, u64, bool), Errno> {
        let h = self.files.get(&fh).ok_or(Errno::EBADF)?;
        let (file, backing, sync) = (h.file.clone(), h.backing, h.sync);
        self.journal
            .before_change(backing, start, end, || reopen(&file))?;
        Ok((file, backing, sync))
    }
}

/// A read-write handle of the same file (also when it has no name any more).
fn reopen(f: &File) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

fn kind(ft: fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::NamedPipe
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else {
        FileType::RegularFile
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn attr(ino: INodeNo, m: &fs::Metadata) -> FileAttr {
    FileAttr {
        ino,
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind: kind(m.file_type()),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

/// Open options for `flags` (the access mode only: the kernel handles O_TRUNC with a setattr,
/// O_APPEND with offsets, and syncs are the journal's business, not the backing file's).
fn open_options(flags: i32) -> OpenOptions {
    let mut o = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => o.write(true),
        libc::O_RDWR => o.read(true).write(true),
        _ => o.read(true),
    };
    o
}

/// The file system: the shared state behind a mutex.
pub(super) struct PowerFs {
    pub(super) state: Arc<Mutex<State>>,
    /// How long each fsync takes, ms (a slow disk; 0 by default): a longer window in which
    /// written data is readable and not yet durable.
    pub(super) sync_delay_ms: Arc<AtomicU64>,
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.state.lock();
        let r = st.child(parent, name).and_then(|rel| {
            let meta = fs::symlink_metadata(st.full(&rel)).map_err(errno)?;
            Ok(st.remember(rel, &meta))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino == INodeNo::ROOT {
            return;
        }
        let mut st = self.state.lock();
        let gone = match st.nodes.get_mut(&ino.0) {
            Some(n) => {
                n.nlookup = n.nlookup.saturating_sub(nlookup);
                (n.nlookup == 0).then_some(n.backing)
            }
            None => None,
        };
        if let Some(backing) = gone {
            st.nodes.remove(&ino.0);
            if st.by_backing.get(&backing) == Some(&ino.0) {
                st.by_backing.remove(&backing);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = self.state.lock();
        let meta = match fh.and_then(|fh| st.files.get(&fh.0)) {
            Some(h) => h.file.metadata().map_err(errno),
            None => st
                .rel(ino)
                .and_then(|rel| fs::symlink_metadata(st.full(&rel)).map_err(errno)),
        };
        match meta {
            Ok(m) => reply.attr(&TTL, &attr(ino, &m)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.state.lock();
        let r = (|| -> Result<FileAttr, Errno> {
            let path = st.rel(ino).map(|r| st.full(&r));
            if let Some(mode) = mode {
                fs::set_permissions(path.clone()?, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(path.clone()?, uid, gid).map_err(errno)?;
            }
            if let Some(size) = size {
                // ftruncate or truncate: one handle that can write, and the journal first.
                let file = match fh.and_then(|fh| st.files.get(&fh.0)) {
                    Some(h) => reopen(&h.file).map_err(errno)?,
                    None => OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path.clone()?)
                        .map_err(errno)?,
                };
                let meta = file.metadata().map_err(errno)?;
                let len = meta.len();
                let (lo, hi) = (size.min(len), size.max(len));
                st.journal
                    .before_change(meta.ino(), lo, if size < len { hi } else { lo }, || reopen(&file))
                    .map_err(errno)?;
                file.set_len(size).map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                let to = |t: TimeOrNow| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let mut times = fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(to(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(to(t));
                }
                File::open(path.clone()?)
                    .and_then(|f| f.set_times(times))
                    .map_err(errno)?;
            }
            let meta = match fh.and_then(|fh| st.files.get(&fh.0)) {
                Some(h) => h.file.metadata(),
                None => fs::symlink_metadata(path?),
            }
            .map_err(errno)?;
            Ok(attr(ino, &meta))
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let st = self.state.lock();
        match st
            .rel(ino)
            .and_then(|rel| fs::read_link(st.full(&rel)).map_err(errno))
        {
            Ok(t) => reply.data(t.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let mut st = self.state.lock();
        let r = st.child(parent, name).and_then(|rel| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(st.full(&rel))
                .map_err(errno)?;
            let meta = f.metadata().map_err(errno)?;
            st.journal.created(meta.ino(), f);
            Ok(st.remember(rel, &meta))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut st = self.state.lock();
        let r = st.child(parent, name).and_then(|rel| {
            let full = st.full(&rel);
            fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(&full)
                .map_err(errno)?;
            let meta = fs::symlink_metadata(&full).map_err(errno)?;
            Ok(st.remember(rel, &meta))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state.lock();
        let r = st.child(parent, name).and_then(|rel| {
            let full = st.full(&rel);
            let meta = fs::symlink_metadata(&full).map_err(errno)?;
            fs::remove_file(&full).map_err(errno)?;
            if meta.nlink() <= 1 {
                st.journal.forget(meta.ino());
            }
            st.drop_name(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state.lock();
        let r = st.child(parent, name).and_then(|rel| {
            fs::remove_dir(st.full(&rel)).map_err(errno)?;
            st.drop_name(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut st = self.state.lock();
        let r = st.child(parent, link_name).and_then(|rel| {
            let full = st.full(&rel);
            std::os::unix::fs::symlink(target, &full).map_err(errno)?;
            let meta = fs::symlink_metadata(&full).map_err(errno)?;
            Ok(st.remember(rel, &meta))
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let mut st = self.state.lock();
        let r = (|| -> Result<(), Errno> {
            let from = st.child(parent, name)?;
            let to = st.child(newparent, newname)?;
            let replaced = fs::symlink_metadata(st.full(&to)).ok();
            fs::rename(st.full(&from), st.full(&to)).map_err(errno)?;
            if let Some(m) = replaced {
                if !m.is_dir() && m.nlink() <= 1 {
                    st.journal.forget(m.ino());
                }
                st.drop_name(&to);
            }
            // Every name at or under `from` moves under `to`.
            for n in st.nodes.values_mut() {
                let moved: Vec<PathBuf> = n.paths.iter().filter(|p| p.starts_with(&from)).cloned().collect();
                for p in moved {
                    n.paths.remove(&p);
                    let rest = p.strip_prefix(&from).expect("filtered by prefix");
                    n.paths.insert(if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    });
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let mut st = self.state.lock();
        let r = (|| -> Result<FileAttr, Errno> {
            let from = st.rel(ino)?;
            let to = st.child(newparent, newname)?;
            let full = st.full(&to);
            fs::hard_link(st.full(&from), &full).map_err(errno)?;
            let meta = fs::symlink_metadata(&full).map_err(errno)?;
            Ok(st.remember(to, &meta))
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.state.lock();
        let r = (|| -> Result<u64, Errno> {
            let rel = st.rel(ino)?;
            let file = open_options(flags.0).open(st.full(&rel)).map_err(errno)?;
            let backing = file.metadata().map_err(errno)?.ino();
            Ok(st.add_file(file, backing, flags.0))
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.state.lock();
        let r = (|| -> Result<(FileAttr, u64), Errno> {
            let rel = st.child(parent, name)?;
            let full = st.full(&rel);
            let existed = fs::symlink_metadata(&full).is_ok();
            let mut o = open_options(flags);
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                o.write(true); // creating needs a writable open on some backing file systems
            }
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            } else {
                o.create(true);
            }
            let file = o.mode(mode & !umask & 0o7777).open(&full).map_err(errno)?;
            let meta = file.metadata().map_err(errno)?;
            if !existed {
                st.journal.created(meta.ino(), reopen(&file).map_err(errno)?);
            }
            let a = st.remember(rel, &meta);
            let fh = st.add_file(file, meta.ino(), flags);
            Ok((a, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.state.lock().files.get(&fh.0) {
            Some(h) => h.file.clone(),
            None => return reply.error(Errno::EBADF),
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.state.lock();
        let r = (|| -> Result<(), Errno> {
            let (file, backing, sync) = st.before_change(fh.0, offset, offset + data.len() as u64)?;
            file.write_all_at(data, offset).map_err(errno)?;
            if sync {
                st.journal.synced(backing);
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.lock().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The model's durable state is the journal's: the backing file itself is not fsynced
        // (the machine under the test does not lose power).
        let delay = self.sync_delay_ms.load(Ordering::Relaxed);
        let cuts = self.state.lock().cuts;
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let mut st = self.state.lock();
        match st.files.get(&fh.0).map(|h| h.backing) {
            // A cut while this fsync was under way: the power went before the flush ended, so
            // it made nothing durable (its caller is dead anyway).
            Some(_) if st.cuts != cuts => reply.error(Errno::EIO),
            Some(backing) => {
                st.journal.synced(backing);
                reply.ok();
            }
            None => reply.error(Errno::EBADF),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.state.lock();
        let r = (|| -> Result<u64, Errno> {
            let rel = st.rel(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in fs::read_dir(st.full(&rel)).map_err(errno)? {
                let e = e.map_err(errno)?;
                let ft = e.file_type().map_err(errno)?;
                let backing = e.metadata().map(|m| m.ino()).unwrap_or(1);
                entries.push((backing.max(1), kind(ft), e.file_name()));
            }
            let fh = st.next_fh;
            st.next_fh += 1;
            st.dirs.insert(fh, entries);
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let st = self.state.lock();
        let Some(entries) = st.dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.state.lock().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Names are durable at once in this model (see the module doc of `powerfs`).
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.state.lock().root.clone();
        match nix::sys::statvfs::statvfs(&root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(flags) = FallocateFlags::from_bits(mode) else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let changes_bytes = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_ZERO_RANGE;
        if !(flags - keep - changes_bytes).is_empty() {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut st = self.state.lock();
        let r = (|| -> Result<(), Errno> {
            let end = offset.saturating_add(length);
            let file = if flags.intersects(changes_bytes) {
                st.before_change(fh.0, offset, end)?.0
            } else if !flags.contains(keep) {
                // May grow the file: the journal must know its size before.
                let (file, ..) = st.before_change(fh.0, end, end)?;
                file
            } else {
                st.files.get(&fh.0).ok_or(Errno::EBADF)?.file.clone()
            };
            nix::fcntl::fallocate(&*file, flags, offset as libc::off_t, length as libc::off_t)
                .map_err(|e| Errno::from_i32(e as i32))
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
