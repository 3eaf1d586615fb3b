//! `powerfs`: a FUSE passthrough file system that can lose power.
//!
//! A process crash (SIGKILL) loses nothing the process wrote: the kernel's page cache survives
//! it. A power cut loses what was written and not yet fsynced. `powerfs` makes that loss happen
//! on demand, in the spirit of LazyFS's `clear-cache` (which Jepsen uses), on the `fuser` crate
//! (pure-Rust mount: no libfuse, no `fusermount3` as root).
//!
//! # The model
//! - **Data**: every write, truncate and fallocate goes through to the backing dir at once, so
//!   reads see it. Before a file's synced bytes or size change, the [`journal::Journal`] keeps
//!   what the change destroys (its size at the last sync, and each synced byte before it is first
//!   overwritten, truncated away or punched). `fsync` and `fdatasync` (and writes through an
//!   `O_SYNC`/`O_DSYNC` handle) make the file's current content its synced content.
//!   `sync_file_range` makes nothing durable (it never reaches a FUSE file system). An fsync
//!   still under way when the power is cut (see `sync-delay`) makes nothing durable.
//! - **The cut** ([`PowerFs::cut`], or `cut` on the control socket): every file goes back to its
//!   last-synced size and content; data written and not synced is gone, synced data survives. A
//!   file created and never synced is left **empty** (its name survives: see metadata). Data
//!   written before an earlier SIGKILL and never synced is lost too: unlike a real kernel, which
//!   writes dirty pages back within ~30 s, this model keeps nothing unsynced (the stricter
//!   adversary, as LazyFS is).
//! - **Metadata** (create, mkdir, rename, link, unlink, rmdir, chmod, times) is durable at once,
//!   as in LazyFS: a cut brings back no unlinked file and undoes no rename, and `fsync` of a
//!   directory is a no-op. A journaling file system that commits metadata before the data it
//!   names (ext4 `data=ordered` with delayed allocation) can likewise show a renamed-over or new
//!   file empty after a crash; it can also lose a rename that was not followed by a directory
//!   fsync, which this model does not do (RocksDB fsyncs its directory after each such change).
//! - The backing files are never fsynced themselves: durability is the model's, the test
//!   machine does not lose power.
//! - Locks (`fcntl`, `flock`) are the kernel's own (FUSE without `FUSE_POSIX_LOCKS`): local to
//!   this machine, which is all RocksDB's `LOCK` file needs. `fallocate` supports plain
//!   allocation, `KEEP_SIZE`, `PUNCH_HOLE` and `ZERO_RANGE`; other modes answer `EOPNOTSUPP`.
//!
//! A cut is meant for a file system no process uses: the harness SIGKILLs the node first, cuts,
//! and restarts the node on the same mount (no unmount). The cut also tells the kernel to drop
//! what it cached of the files it changed.
//!
//! The fault suite runs one `herald-jepsen powerfs` process per node (its own "disk"; see
//! `cluster.rs`), mounted for the whole run, with a unix control socket: a line `cut` answers
//! `ok files=F dropped=D restored=R largest=NAME:BYTES,...` (bytes past the synced sizes dropped,
//! synced bytes written back, the files that lost most), `dirty` answers `ok files=F`, and
//! `sync-delay MS` makes every later fsync take MS (a slow disk: a wider window in which data a
//! node wrote is readable, and replicated, and not yet durable).

mod fs;
pub mod journal;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fuser::{BackgroundSession, Config, INodeNo, MountOption, Notifier};
use parking_lot::Mutex;

pub use journal::CutStats;

/// The mount's file system type in /proc/mounts.
pub const FS_TYPE: &str = "fuse.herald-powerfs";

/// A mounted `powerfs`. Dropping it unmounts.
pub struct PowerFs {
    state: Arc<Mutex<fs::State>>,
    notifier: Notifier,
    /// See `fs::PowerFs::sync_delay_ms`.
    sync_delay_ms: Arc<AtomicU64>,
    mountpoint: PathBuf,
    /// `None` once unmounted.
    session: Mutex<Option<BackgroundSession>>,
}

impl PowerFs {
    /// Mounts `backing` at `mountpoint` (both must exist). Needs root and /dev/fuse.
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<PowerFs> {
        let backing = backing
            .canonicalize()
            .with_context(|| format!("backing dir {}", backing.display()))?;
        let state = Arc::new(Mutex::new(fs::State::new(backing)?));
        let sync_delay_ms = Arc::new(AtomicU64::new(0));
        let mut config = Config::default();
        // Several request threads, so that writes go on while an fsync takes its time (a
        // single thread would stall the whole disk behind a slow fsync, and nothing unsynced
        // would ever pile up). Every request takes the state's lock; a slow fsync sleeps
        // outside it.
        config.n_threads = Some(4);
        config.mount_options = vec![
            MountOption::FSName("herald-powerfs".into()),
            MountOption::Subtype("herald-powerfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        let session = fuser::spawn_mount(
            fs::PowerFs {
                state: state.clone(),
                sync_delay_ms: sync_delay_ms.clone(),
            },
            mountpoint,
            &config,
        )
        .with_context(|| {
            format!(
                "cannot mount powerfs at {} (root and /dev/fuse needed)",
                mountpoint.display()
            )
        })?;
        Ok(PowerFs {
            state,
            notifier: session.notifier(),
            sync_delay_ms,
            mountpoint: mountpoint.to_path_buf(),
            session: Mutex::new(Some(session)),
        })
    }

    /// The power cut (see the module doc). Meant for a mount no process uses.
    pub fn cut(&self) -> anyhow::Result<CutStats> {
        let (inos, stats) = {
            let mut st = self.state.lock();
            st.cuts += 1;
            let (mut backing, mut stats) = st.journal.cut()?;
            let inos: Vec<u64> = backing.iter().filter_map(|(b, _)| st.kernel_ino(*b)).collect();
            backing.sort_by_key(|(_, lost)| std::cmp::Reverse(*lost));
            stats.largest = backing
                .iter()
                .filter(|(_, lost)| *lost > 0)
                .take(journal::LARGEST)
                .map(|(b, lost)| (st.name_of(*b).unwrap_or_else(|| format!("inode {b}")), *lost))
                .collect();
            (inos, stats)
        };
        // Outside the lock: the kernel may need an answer from us to drop a page.
        for ino in inos {
            let _ = self.notifier.inval_inode(INodeNo(ino), 0, 0);
        }
        Ok(stats)
    }

    /// Every fsync from now on takes `ms` (a slow disk).
    pub fn set_sync_delay(&self, ms: u64) {
        self.sync_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Files with unsynced changes.
    pub fn dirty_files(&self) -> usize {
        self.state.lock().journal.dirty_files()
    }

    /// Unmounts (lazily if busy) and waits for the session to end; a no-op the second time.
    pub fn unmount(&self) -> anyhow::Result<()> {
        let Some(s) = self.session.lock().take() else {
            return Ok(());
        };
        if let Err(e) = s.umount_and_join() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            bail!("unmount of {}: {e}", self.mountpoint.display());
        }
        Ok(())
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        let _ = self.unmount();
    }
}

/// `herald-jepsen powerfs`: mounts, serves the control socket, and unmounts when stdin closes
/// (the harness holds it, so the mount goes when the harness dies, however it dies).
pub fn serve(backing: &Path, mountpoint: &Path, control: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(backing)?;
    std::fs::create_dir_all(mountpoint)?;
    let _ = std::fs::remove_file(control);
    let fs = Arc::new(PowerFs::mount(backing, mountpoint)?);
    // The socket appears only once the mount is up: the harness waits for it.
    let listener =
        UnixListener::bind(control).with_context(|| format!("control socket {}", control.display()))?;
    let served = fs.clone();
    std::thread::spawn(move || serve_control(&listener, &served, usize::MAX));
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    let _ = std::fs::remove_file(control);
    // A mount that another mount namespace still holds would keep the session (and its join)
    // alive: give the clean unmount 5 s, then detach it and exit, which ends the session.
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fs.clone();
    std::thread::spawn(move || {
        let _ = tx.send(f.unmount());
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => r,
        Err(_) => {
            nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)?;
            Ok(())
        }
    }
}

/// Answers up to `conns` connections on the control socket.
fn serve_control(listener: &UnixListener, fs: &PowerFs, conns: usize) {
    for conn in listener.incoming().take(conns).flatten() {
        let _ = answer(fs, conn);
    }
}

fn answer(fs: &PowerFs, conn: UnixStream) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut line = String::new();
    while r.read_line(&mut line)? > 0 {
        let reply = match line.trim() {
            "cut" => match fs.cut() {
                Ok(s) => {
                    let largest: Vec<String> = s.largest.iter().map(|(n, b)| format!("{n}:{b}")).collect();
                    format!(
                        "ok files={} dropped={} restored={} largest={}",
                        s.files,
                        s.bytes_dropped,
                        s.bytes_restored,
                        largest.join(",")
                    )
                }
                Err(e) => format!("err {e:#}"),
            },
            "dirty" => format!("ok files={}", fs.dirty_files()),
            cmd if cmd.starts_with("sync-delay ") => match cmd["sync-delay ".len()..].parse() {
                Ok(ms) => {
                    fs.set_sync_delay(ms);
                    format!("ok sync-delay={ms}")
                }
                Err(e) => format!("err sync-delay: {e}"),
            },
            other => format!("err unknown command {other:?}"),
        };
        writeln!(w, "{reply}")?;
        line.clear();
    }
    Ok(())
}

/// Sends `cmd` to the control socket at `control`; returns the answer after `ok `.
pub fn control(control: &Path, cmd: &str) -> anyhow::Result<String> {
    let mut s =
        UnixStream::connect(control).with_context(|| format!("powerfs control {}", control.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(s, "{cmd}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let line = line.trim();
    match line.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => bail!("powerfs {cmd}: {line}"),
    }
}

/// Lazily unmounts every `powerfs` mount left by crashed runs; returns their mount points.
pub fn cleanup_stale() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split(' ');
        let (Some(_), Some(at), Some(ty)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if ty == FS_TYPE && nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH).is_ok() {
            out.push(format!("powerfs mount {at}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::io::{Read, Write};

    /// Mounts a powerfs on a temp dir. Needs root and /dev/fuse, as the whole fault suite does
    /// (CI runs as root): a machine without them fails here with that reason.
    fn mounted() -> (tempfile::TempDir, PowerFs, PathBuf) {
        assert!(
            Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root(),
            "the powerfs tests need root and /dev/fuse (as the fault suite does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let fs = PowerFs::mount(&backing, &mnt).unwrap();
        (dir, fs, mnt)
    }

    fn read(p: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(p).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn cut_loses_unsynced_writes_and_keeps_synced_ones() {
        let (_dir, fs, mnt) = mounted();
        std::fs::create_dir(mnt.join("db")).unwrap();

        // Written in two halves with an fsync between: the first half survives.
        let halves = mnt.join("db/halves.log");
        let mut f = File::create(&halves).unwrap();
        f.write_all(b"first half;").unwrap();
        f.sync_all().unwrap();
        f.write_all(b"second half").unwrap();
        assert_eq!(
            read(&halves),
            b"first half;second half",
            "reads see unsynced data"
        );
        drop(f);

        // Synced whole, then overwritten in place and not synced: the synced bytes come back.
        let synced = mnt.join("db/synced");
        let mut f = File::create(&synced).unwrap();
        f.write_all(b"durable bytes").unwrap();
        f.sync_data().unwrap();
        drop(f);
        let f = OpenOptions::new().write(true).open(&synced).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"XXXXXXX", 0).unwrap();
        f.set_len(4).unwrap();
        drop(f);

        // Never synced: empty after the cut, its name stays (metadata is durable at once).
        let fresh = mnt.join("db/fresh");
        std::fs::write(&fresh, b"never synced").unwrap();

        // A hard link and a rename of a synced file keep its content.
        let mut f = File::create(mnt.join("db/a")).unwrap();
        f.write_all(b"linked").unwrap();
        f.sync_all().unwrap();
        drop(f);
        std::fs::hard_link(mnt.join("db/a"), mnt.join("db/b")).unwrap();
        std::fs::rename(mnt.join("db/a"), mnt.join("db/c")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("db/b"))
            .unwrap()
            .write_all(b" and more")
            .unwrap();
        assert_eq!(read(&mnt.join("db/c")), b"linked and more");

        assert_eq!(fs.dirty_files(), 4, "halves, synced, fresh, the linked file");
        let stats = fs.cut().unwrap();
        assert_eq!(stats.files, 4);
        assert_eq!(read(&halves), b"first half;");
        assert_eq!(read(&synced), b"durable bytes");
        assert_eq!(read(&fresh), b"");
        assert_eq!(read(&mnt.join("db/b")), b"linked");
        assert_eq!(read(&mnt.join("db/c")), b"linked");
        assert!(!mnt.join("db/a").exists());
        assert_eq!(fs.dirty_files(), 0);

        // After the cut the file system goes on as before.
        let mut f = OpenOptions::new().append(true).open(&halves).unwrap();
        f.write_all(b"again").unwrap();
        f.sync_all().unwrap();
        drop(f);
        fs.cut().unwrap();
        assert_eq!(read(&halves), b"first half;again");
        fs.unmount().unwrap();
    }

    #[test]
    fn a_cut_during_a_slow_fsync_makes_nothing_durable() {
        let (_dir, fs, mnt) = mounted();
        fs.set_sync_delay(400);
        let p = mnt.join("wal");
        let syncing = std::thread::spawn({
            let p = p.clone();
            move || {
                let mut f = File::create(&p).unwrap();
                f.write_all(b"in flight").unwrap();
                f.sync_data()
            }
        });
        std::thread::sleep(Duration::from_millis(150));
        fs.cut().unwrap();
        assert!(syncing.join().unwrap().is_err(), "the overtaken fsync fails");
        fs.set_sync_delay(0);
        assert_eq!(read(&p), b"");
        assert_eq!(fs.dirty_files(), 0);
        fs.unmount().unwrap();
    }

    #[test]
    fn control_socket_cuts() {
        let (dir, fs, mnt) = mounted();
        let sock = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let fs = Arc::new(fs);
        let served = fs.clone();
        let t = std::thread::spawn(move || serve_control(&listener, &served, 3));
        std::fs::write(mnt.join("x"), b"lost").unwrap();
        assert_eq!(control(&sock, "dirty").unwrap(), "files=1");
        assert_eq!(
            control(&sock, "cut").unwrap(),
            "files=1 dropped=4 restored=0 largest=x:4"
        );
        assert_eq!(read(&mnt.join("x")), b"");
        assert!(control(&sock, "bogus").is_err());
        t.join().unwrap();
        fs.set_sync_delay(50);
        let f = File::create(mnt.join("y")).unwrap();
        let t0 = std::time::Instant::now();
        f.sync_all().unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "a slow disk's fsync takes its delay"
        );
        drop(f);
        fs.unmount().unwrap();
    }
}
