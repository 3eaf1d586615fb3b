//! Each node's "disk": a `powerfs` mount (see `powerfs`) that a power cut empties of what the
//! node wrote and did not fsync.
//!
//! For node `id`, under the run's `nodes/` dir: the backing files in `disk-<id>.backing/`, the
//! mount at `disk-<id>/` (the node's data dir is `disk-<id>/node-<id>`, so wiping the data dir
//! never touches the mount point), the control socket `disk-<id>.sock` and the file system's log
//! `disk-<id>.log`. Each is served by a `herald-jepsen powerfs` process in the root namespace,
//! started before the nodes (the nodes' namespaces see the mounts) and stopped after them. It
//! unmounts when its stdin closes, which the harness holds, so the mounts go with the harness
//! however it exits; `herald-jepsen cleanup` lazily unmounts any left behind.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;

use crate::powerfs;

struct Disk {
    child: Child,
    /// Closing it unmounts.
    lifeline: Option<ChildStdin>,
}

/// The nodes' disks.
pub struct Disks {
    dir: PathBuf,
    running: Mutex<BTreeMap<u64, Disk>>,
}

impl Disks {
    /// Mounts one disk per node under `dir`; fails if any does not come up within 20 s.
    pub fn start(exe: &Path, dir: &Path, ids: &[u64]) -> anyhow::Result<Disks> {
        let disks = Disks {
            dir: dir.to_path_buf(),
            running: Mutex::new(BTreeMap::new()),
        };
        for &id in ids {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(disks.file(id, ".log"))?;
            let _ = std::fs::remove_file(disks.control(id));
            let mut child = Command::new(exe)
                .arg("powerfs")
                .arg("--backing")
                .arg(disks.file(id, ".backing"))
                .arg("--mount")
                .arg(disks.mountpoint(id))
                .arg("--control")
                .arg(disks.control(id))
                .stdin(Stdio::piped())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start herald-jepsen powerfs")?;
            let lifeline = child.stdin.take();
            disks.running.lock().insert(id, Disk { child, lifeline });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for &id in ids {
            while powerfs::control(&disks.control(id), "dirty").is_err() {
                let exited = disks
                    .running
                    .lock()
                    .get_mut(&id)
                    .is_some_and(|d| d.child.try_wait().ok().flatten().is_some());
                if exited || Instant::now() >= deadline {
                    let log = std::fs::read_to_string(disks.file(id, ".log")).unwrap_or_default();
                    bail!(
                        "the powerfs disk of node {id} did not come up (root and /dev/fuse are needed; --no-powerfs runs without): {}",
                        log.trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(disks)
    }

    fn file(&self, id: u64, suffix: &str) -> PathBuf {
        self.dir.join(format!("disk-{id}{suffix}"))
    }

    fn mountpoint(&self, id: u64) -> PathBuf {
        self.file(id, "")
    }

    fn control(&self, id: u64) -> PathBuf {
        self.file(id, ".sock")
    }

    /// Node `id`'s data dir, on its disk.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.mountpoint(id).join(format!("node-{id}"))
    }

    /// Power cut of node `id`'s disk (the node must be stopped): what the node wrote and did not
    /// sync is gone. Returns the file system's account (`files=.. dropped=.. restored=..`).
    pub fn cut(&self, id: u64) -> anyhow::Result<String> {
        powerfs::control(&self.control(id), "cut")
    }

    /// Every later fsync on node `id`'s disk takes `ms` (a slow disk).
    pub fn set_sync_delay(&self, id: u64, ms: u64) -> anyhow::Result<()> {
        powerfs::control(&self.control(id), &format!("sync-delay {ms}")).map(|_| ())
    }

    /// Unmounts every disk (the nodes must be stopped); a no-op the second time.
    pub fn stop(&self) {
        let mut running = std::mem::take(&mut *self.running.lock());
        for d in running.values_mut() {
            d.lifeline.take();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (id, d) in running.iter_mut() {
            while d.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if d.child.try_wait().ok().flatten().is_none() {
                let _ = d.child.kill();
                let _ = d.child.wait();
                let _ = nix::mount::umount2(&self.mountpoint(*id), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.stop();
    }
}
