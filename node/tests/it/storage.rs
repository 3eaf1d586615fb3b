//! Storage faults on real node processes: a full disk stops the node honestly (not ready, clients
//! moved away, non-zero exit, back after a restart on a freed disk), and damaged raft logs never
//! make replicas diverge.
//!
//! The full-disk test mounts a small tmpfs (the test runs as root, as `scripts/test` does) and
//! unmounts it when it ends, also when it fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use herald_proto::client::frame::Kind;

use crate::harness::{eventually, free_port, App, Cluster, NODE_WAIT};
use crate::ops::http_get;
use crate::raw::{Raw, Who};

/// A tmpfs mounted on a temp dir for the test's lifetime (lazily unmounted on drop).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("herald-tmpfs-")
            .tempdir()
            .expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (the storage tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes a file in `dir` until the file system is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("ballast file");
    for chunk in [1 << 20, 4096, 1] {
        let buf = vec![0xa5u8; chunk];
        while f.write_all(&buf).and_then(|_| f.flush()).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

fn who(app: &App, user: &str) -> Who {
    Who {
        app: app.id.clone(),
        user: user.into(),
        device: "phone".into(),
        platform: "ios".into(),
        token: app.token(user, None),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_makes_the_node_unready_moves_its_clients_and_exits_non_zero() {
    let disk = Tmpfs::mount("64m");
    let mut c = Cluster::new(3);
    let admin = format!("127.0.0.1:{}", free_port());
    {
        let spec = c.spec_mut(3);
        spec.data_dir = disk.path().join("node-3");
        // The drain waits for clients to leave: long enough to see /readyz while it does.
        spec.extra_args.extend([
            "--admin-addr".into(),
            admin.clone(),
            "--drain-timeout-ms".into(),
            "20000".into(),
        ]);
    }
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("full").await;
    c.wait_caught_up(3).await;
    eventually("node 3 to be ready", NODE_WAIT, || async {
        let r = http_get(&admin, "/readyz", None).await?;
        anyhow::ensure!(r.status == 200, "{r:?}");
        Ok(())
    })
    .await;
    let mut raw = Raw::connect(c.client_addr(3)).await.unwrap();
    raw.hello(&who(&app, "jack"), 0).await.unwrap();

    let ballast = fill(disk.path());
    // Every push is an entry node 3 must append: one of them meets the full disk.
    let mut n = 0u32;
    let why = eventually("node 3's /readyz to report its stopped raft", NODE_WAIT, || {
        n += 1;
        let (app, addr, admin) = (app.clone(), c.grpc_addr(1).to_string(), admin.clone());
        async move {
            app.push_acked(&addr, "jill", &"x".repeat(2048), &format!("k{n}"))
                .await;
            let r = http_get(&admin, "/readyz", None).await?;
            anyhow::ensure!(r.status == 503, "still {}: {}", r.status, r.body);
            Ok(r.json())
        }
    })
    .await;
    let reasons = why["reasons"].to_string();
    assert!(reasons.contains("raft stopped"), "{why}");
    assert!(reasons.contains("No space left on device"), "{why}");

    // Its clients are sent to the other nodes.
    let (bye, _) = raw
        .until(|k| match k {
            Kind::Bye(b) => Some(b.clone()),
            _ => None,
        })
        .await
        .expect("a BYE from the stopped node");
    let others = [c.client_addr(1).to_string(), c.client_addr(2).to_string()];
    assert!(
        !bye.redirect.is_empty() && bye.redirect.iter().all(|a| others.contains(a)),
        "{bye:?}"
    );
    drop(raw);

    // It exits non-zero for its supervisor, having said why once.
    let status = c.wait_exit(3, Duration::from_secs(40)).await;
    assert!(
        status.code().is_some_and(|code| code != 0),
        "node 3 ended with {status:?}"
    );
    assert_eq!(
        c.log_count(3, "raft stopped on an error"),
        2,
        "the error and the exit line"
    );
    assert_eq!(c.log_count(3, "panicked"), 0);

    // The cluster went on; with space again, a restart catches up.
    app.push_acked(c.grpc_addr(2), "jill", "after", "after").await;
    std::fs::remove_file(&ballast).unwrap();
    c.restart(3);
    c.wait_caught_up(3).await;
    eventually("node 3 to be ready again", NODE_WAIT, || async {
        let r = http_get(&admin, "/readyz", None).await?;
        anyhow::ensure!(r.status == 200, "{r:?}");
        Ok(())
    })
    .await;
    drop(c);
    drop(disk);
}

/// The newest WAL file (`*.log`) of the raft log under `data_dir`.
fn newest_wal(data_dir: &Path) -> PathBuf {
    let dir = data_dir.join("raft-log");
    let mut wals: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    // RocksDB numbers its files in order of creation, zero-padded.
    wals.sort();
    wals.pop()
        .unwrap_or_else(|| panic!("no WAL in {}", dir.display()))
}

/// QoS-1 pushes to `users` users from `tasks` tasks through `addr` until `stop` is set; each
/// push has a key of its own (errors, e.g. when the nodes are killed, are ignored).
fn push_stream(
    app: &App,
    addr: &str,
    users: u32,
    tasks: u32,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..tasks)
        .map(|t| {
            let (app, addr, stop) = (app.clone(), addr.to_string(), stop.clone());
            tokio::spawn(async move {
                let mut acked = 0;
                let Ok(mut client) = crate::harness::connect(&addr).await else {
                    return 0;
                };
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let user = format!("u{}", (t * 7 + i) % users);
                    let req = app.push_request(&user, &format!("{t}-{i}"), &format!("s{t}-{i}"));
                    match client.push(req).await {
                        Ok(_) => acked += 1,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                acked
            })
        })
        .collect()
}

/// Waits until every node reports its state hash at one applied index, then asserts the hashes
/// are equal: the replicas hold the same sessions, mailboxes (seqs, msg ids), cursors, topics.
async fn assert_replicas_equal(c: &Cluster) {
    use herald_proto::raft::raft_service_client::RaftServiceClient;
    use herald_proto::raft::ProbeRequest;
    let ids = c.ids();
    let hashes = eventually(
        "every node's state hash at one applied index",
        NODE_WAIT,
        || async {
            let mut seen = Vec::new();
            for id in &ids {
                let channel = c.cluster_channel(*id).await?;
                let r = RaftServiceClient::new(channel)
                    .probe(ProbeRequest {
                        from: 0,
                        target: *id,
                        want_state_hash: true,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                seen.push((*id, r.state_hash_index, r.state_hash));
            }
            let index = seen[0].1;
            anyhow::ensure!(
                index > 0 && seen.iter().all(|s| s.1 == index),
                "applied indexes differ: {seen:?}"
            );
            Ok(seen)
        },
    )
    .await;
    assert!(
        hashes.iter().all(|h| h.2 == hashes[0].2),
        "replicas differ at one applied index (node, index, hash): {hashes:?}"
    );
}

/// Issue 26 case 1: the leader's newest WAL loses its last KiBs (what a power cut does to
/// writes not yet fsynced, which the followers may already hold). It must not come back as
/// leader in its old term and append under log ids the followers hold with other contents.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_lost_its_log_tail_does_not_make_replicas_diverge() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("tail").await;
    let leader = c.wait_leader().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pushers = push_stream(&app, c.grpc_addr(leader), 40, 16, &stop);
    eventually("pushes to be flowing", NODE_WAIT, || async {
        let applied = c.applied_index(leader).await?;
        anyhow::ensure!(applied > 300, "applied {applied}");
        Ok(())
    })
    .await;
    c.kill9_all();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: u32 = futures::future::join_all(pushers)
        .await
        .into_iter()
        .map(|r| r.unwrap_or(0))
        .sum();
    assert!(acked > 0);

    let wal = newest_wal(c.data_dir(leader));
    let len = std::fs::metadata(&wal).unwrap().len();
    let cut = (32 * 1024).min(len / 2);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len - cut)
        .unwrap();

    c.start_all();
    c.wait_leader().await;
    for u in 0..40 {
        let via = c.grpc_addr(1 + u % 3).to_string();
        app.push_acked(&via, &format!("u{u}"), "after", &format!("after-{u}"))
            .await;
    }
    assert_replicas_equal(&c).await;
    assert!(
        c.log_count(leader, "standing again in a new term") >= 1,
        "the old leader did not step down at restart"
    );
    c.assert_no_panics();
}

/// Garbage in the middle of a raft log's WAL (not a torn tail): RocksDB's default recovery would
/// drop everything after it without a word. The node refuses to start, naming `--rejoin`; with
/// it, it wipes its raft state and catches up.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_in_the_middle_of_a_log_refuses_start_until_the_node_rejoins() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("garbage").await;
    let leader = c.wait_leader().await;
    let victim = if leader == 3 { 2 } else { 3 };
    let pushes = (0..6).map(|t| {
        let (app, addr) = (app.clone(), c.grpc_addr(leader).to_string());
        async move {
            for i in 0..50 {
                let key = format!("k{t}-{i}");
                app.push_acked(&addr, &format!("u{}", i % 20), &"p".repeat(200), &key)
                    .await;
            }
        }
    });
    futures::future::join_all(pushes).await;
    c.wait_caught_up(victim).await;
    c.kill9(victim);

    let wal = newest_wal(c.data_dir(victim));
    let len = std::fs::metadata(&wal).unwrap().len();
    assert!(len >= 64 * 1024, "{} is only {len} bytes", wal.display());
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    c.restart(victim);
    let status = c.wait_exit(victim, Duration::from_secs(30)).await;
    assert!(status.code().is_some_and(|code| code != 0), "{status:?}");
    let log = c.log_text(victim);
    assert!(
        log.contains("is damaged") && log.contains("herald node --rejoin"),
        "no refusal naming the recovery in node {victim}'s log"
    );

    c.spec_mut(victim).extra_args.push("--rejoin".into());
    c.restart(victim);
    c.wait_log(victim, "rejoin: vote floor set", 1).await;
    c.wait_leader().await;
    c.wait_caught_up(victim).await;
    app.push_acked(c.grpc_addr(victim), "u1", "after", "after").await;
    assert_replicas_equal(&c).await;
    c.assert_no_panics();
}

/// Found by the fault suite's `damage` nemesis: a follower whose log lost entries it had already
/// applied (the end of its WAL cut off) restarted into a panic of openraft's core, again at every
/// start ("purge_upto <= snapshot_last_log_id"): openraft purges the gap up to the applied id,
/// which must not pass the newest snapshot. The node now builds a snapshot of its applied state
/// first, starts, and catches up.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_whose_log_lost_applied_entries_starts_and_catches_up() {
    // No snapshot during the test: the newest one (none) is older than the applied index.
    let mut c = Cluster::new(3).node_args(&["--snapshot-every", "1000000"]);
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("gap").await;
    let victim = if leader == 3 { 2 } else { 3 };
    let pushes = (0..6).map(|t| {
        let (app, addr) = (app.clone(), c.grpc_addr(leader).to_string());
        async move {
            for i in 0..50 {
                let key = format!("k{t}-{i}");
                app.push_acked(&addr, &format!("u{}", i % 20), &"p".repeat(200), &key)
                    .await;
            }
        }
    });
    futures::future::join_all(pushes).await;
    c.wait_caught_up(victim).await;
    c.kill9(victim);

    let wal = newest_wal(c.data_dir(victim));
    let len = std::fs::metadata(&wal).unwrap().len();
    let cut = (32 * 1024).min(len / 2);
    let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
    f.set_len(len - cut).unwrap();
    f.sync_all().unwrap();

    c.restart(victim);
    c.wait_log(
        victim,
        "snapshot of the applied state built over the log's gap",
        1,
    )
    .await;
    c.wait_leader().await;
    c.wait_caught_up(victim).await;
    app.push_acked(c.grpc_addr(victim), "u1", "after", "after").await;
    assert_replicas_equal(&c).await;
    c.assert_no_panics();
}
