//! The raft transport over real sockets on 127.0.0.1: snapshot streaming, identity checks, peers
//! that are down or silent, write forwarding. openraft is replaced by a recording stand-in
//! ([`FakeRaft`]) so these run without the storage layer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::future::BoxFuture;
use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::snapshot_chunk::Body;
use herald_proto::raft::{
    ProbeReply, ProbeRequest, SnapshotChunk, SnapshotData, SnapshotDone, SnapshotFile, SnapshotHeader,
};
use herald_raft::network::{
    codec, is_node_id_mismatch, snapshot, Hooks, Network, NetworkOptions, PeerClients, RaftApi, RaftGrpc,
    RaftRouter, RaftServiceHooks,
};
use herald_raft::{typ, NodeId, Op, OpResult, SnapshotDir, WriteError};
use openraft::error::{RPCError, ReplicationClosed, StreamingError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesResponse, VoteResponse};
use openraft::{BasicNode, CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// Stand-ins and helpers
// ---------------------------------------------------------------------------------------------

/// openraft as the server sees it, recording what it is asked.
#[derive(Clone)]
struct FakeRaft(Arc<FakeInner>);

struct FakeInner {
    /// Incoming snapshot dirs are created under here.
    root: PathBuf,
    next_dir: AtomicU64,
    rpcs: AtomicU64,
    begun: Mutex<Vec<PathBuf>>,
    installed: Mutex<Vec<(typ::Vote, typ::SnapshotMeta, PathBuf)>>,
    /// When set, votes are refused and this is the last log id the refusal reports.
    refuse_with_log: Mutex<Option<typ::LogId>>,
    elections: AtomicU64,
    /// What [`RaftApi::held_index`] answers.
    held: AtomicU64,
}

impl FakeRaft {
    fn new(root: &Path) -> Self {
        FakeRaft(Arc::new(FakeInner {
            root: root.to_path_buf(),
            next_dir: AtomicU64::new(0),
            rpcs: AtomicU64::new(0),
            begun: Mutex::new(Vec::new()),
            installed: Mutex::new(Vec::new()),
            refuse_with_log: Mutex::new(None),
            elections: AtomicU64::new(0),
            held: AtomicU64::new(u64::MAX),
        }))
    }
    fn elections(&self) -> u64 {
        self.0.elections.load(Ordering::SeqCst)
    }
    fn rpcs(&self) -> u64 {
        self.0.rpcs.load(Ordering::SeqCst)
    }
    fn begun(&self) -> Vec<PathBuf> {
        self.0.begun.lock().clone()
    }
    fn installed(&self) -> Vec<(typ::Vote, typ::SnapshotMeta, PathBuf)> {
        self.0.installed.lock().clone()
    }
}

impl RaftApi for FakeRaft {
    async fn append_entries(
        &self,
        _rpc: typ::AppendEntriesRequest,
    ) -> Result<typ::AppendEntriesResponse, typ::RaftError> {
        self.0.rpcs.fetch_add(1, Ordering::SeqCst);
        Ok(AppendEntriesResponse::Success)
    }
    async fn vote(&self, rpc: typ::VoteRequest) -> Result<typ::VoteResponse, typ::RaftError> {
        self.0.rpcs.fetch_add(1, Ordering::SeqCst);
        let refuse = *self.0.refuse_with_log.lock();
        Ok(VoteResponse {
            vote: rpc.vote,
            vote_granted: refuse.is_none(),
            last_log_id: refuse,
        })
    }
    async fn elect(&self) {
        self.0.elections.fetch_add(1, Ordering::SeqCst);
    }
    fn held_index(&self) -> u64 {
        self.0.held.load(Ordering::SeqCst)
    }
    async fn begin_receiving_snapshot(&self) -> Result<Box<SnapshotDir>, typ::RaftError> {
        let n = self.0.next_dir.fetch_add(1, Ordering::SeqCst);
        let path = self.0.root.join(format!("incoming-{n}"));
        std::fs::create_dir_all(&path).map_err(|e| {
            openraft::error::RaftError::Fatal(openraft::error::Fatal::StorageError(
                openraft::StorageIOError::write_snapshot(None, openraft::AnyError::new(&e)).into(),
            ))
        })?;
        self.0.begun.lock().push(path.clone());
        Ok(Box::new(SnapshotDir { path }))
    }
    async fn install_full_snapshot(
        &self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
    ) -> Result<typ::SnapshotResponse, typ::Fatal> {
        self.0
            .installed
            .lock()
            .push((vote, snapshot.meta, snapshot.snapshot.path.clone()));
        Ok(openraft::raft::SnapshotResponse::new(vote))
    }
}

/// The node's hooks: answers forwards with a scripted result.
struct FakeHooks {
    node_id: NodeId,
    forward: Mutex<Result<(Vec<OpResult>, u64), WriteError>>,
    forwarded: Mutex<Vec<Vec<Op>>>,
}

impl FakeHooks {
    fn new(node_id: NodeId) -> Arc<Self> {
        Arc::new(FakeHooks {
            node_id,
            forward: Mutex::new(Err(WriteError::Unavailable { leader: None })),
            forwarded: Mutex::new(Vec::new()),
        })
    }
}

impl RaftServiceHooks for FakeHooks {
    fn forward(&self, ops: Vec<Op>) -> BoxFuture<'static, Result<(Vec<OpResult>, u64), WriteError>> {
        self.forwarded.lock().push(ops);
        let res = self.forward.lock().clone();
        Box::pin(async move { res })
    }
    fn probe(&self, _req: ProbeRequest) -> ProbeReply {
        ProbeReply {
            node_id: self.node_id,
            initialized: true,
            ..Default::default()
        }
    }
}

/// A node's raft service on a fresh loopback port.
struct TestServer {
    addr: SocketAddr,
    raft: FakeRaft,
    hooks: Arc<FakeHooks>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(node_id: NodeId) -> Result<TestServer> {
    let dir = tempfile::tempdir()?;
    let raft = FakeRaft::new(dir.path());
    let hooks = FakeHooks::new(node_id);
    let svc = RaftGrpc::new(node_id, raft.clone(), hooks.clone() as Hooks)
        .with_snapshot_idle_timeout(Duration::from_secs(5))
        .into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Ok(TestServer {
        addr,
        raft,
        hooks,
        _dir: dir,
        task,
    })
}

fn opts() -> NetworkOptions {
    let mut o = NetworkOptions::standard();
    o.connect_timeout = Duration::from_millis(500);
    o.snapshot_chunk_bytes = 64 * 1024;
    o.snapshot_timeout = Duration::from_secs(20);
    o
}

async fn connection(
    self_id: NodeId,
    target: NodeId,
    addr: SocketAddr,
) -> herald_raft::network::PeerConnection {
    let mut net = Network::new(PeerClients::new(self_id, opts(), None));
    net.new_client(
        target,
        &BasicNode {
            addr: addr.to_string(),
        },
    )
    .await
}

fn meta() -> typ::SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 42)),
        last_membership: StoredMembership::default(),
        snapshot_id: "3-1-42-abc".into(),
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// A snapshot dir with a multi-chunk file, an empty one and a small one.
fn snapshot_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("000009.sst"), random_bytes(5 * 64 * 1024 + 1234))?;
    std::fs::write(dir.path().join("LOCK"), b"")?;
    std::fs::write(dir.path().join("meta.bin"), random_bytes(77))?;
    Ok(dir)
}

fn header(from: NodeId, target: NodeId, files: Vec<SnapshotFile>) -> Result<SnapshotChunk> {
    Ok(SnapshotChunk {
        body: Some(Body::Header(SnapshotHeader {
            from,
            target,
            vote: codec::encode("vote", &Vote::new_committed(3, from))?,
            meta: codec::encode("meta", &meta())?,
            files,
            group: 0,
        })),
    })
}

fn data(file: u32, offset: u64, bytes: &[u8]) -> SnapshotChunk {
    SnapshotChunk {
        body: Some(Body::Data(SnapshotData {
            file,
            offset,
            data: bytes.to_vec().into(),
        })),
    }
}

fn done() -> SnapshotChunk {
    SnapshotChunk {
        body: Some(Body::Done(SnapshotDone {})),
    }
}

fn file_entry(name: &str, bytes: &[u8]) -> SnapshotFile {
    SnapshotFile {
        name: name.into(),
        size: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    }
}

async fn raw_client(addr: SocketAddr) -> Result<RaftServiceClient<tonic::transport::Channel>> {
    Ok(RaftServiceClient::connect(format!("http://{addr}")).await?)
}

/// Waits (up to 5 s) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dir_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path())?,
        );
    }
    Ok(out)
}

/// A peer that accepts connections and never says a word.
async fn silent_peer() -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    Ok((addr, task))
}

/// An address nobody listens on (connection refused).
async fn closed_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(addr)
}

fn never_cancelled() -> futures::future::Pending<ReplicationClosed> {
    futures::future::pending()
}

// ---------------------------------------------------------------------------------------------
// (a) snapshot round trip
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn snapshot_round_trip_delivers_identical_files() -> Result<()> {
    let server = serve(2).await?;
    let src = snapshot_dir()?;
    let mut conn = connection(1, 2, server.addr).await;
    let vote = Vote::new_committed(3, 1);
    let snap = typ::Snapshot {
        meta: meta(),
        snapshot: Box::new(SnapshotDir {
            path: src.path().to_path_buf(),
        }),
    };

    let resp = conn
        .full_snapshot(
            vote,
            snap,
            never_cancelled(),
            RPCOption::new(Duration::from_millis(200)),
        )
        .await?;
    assert_eq!(resp.vote, vote);

    let installed = server.raft.installed();
    assert_eq!(installed.len(), 1);
    let (got_vote, got_meta, dir) = &installed[0];
    assert_eq!(*got_vote, vote);
    assert_eq!(*got_meta, meta());
    assert_eq!(dir_files(dir)?, dir_files(src.path())?);
    assert_eq!(dir_files(dir)?["LOCK"].len(), 0);
    Ok(())
}

#[tokio::test]
async fn a_second_snapshot_to_the_same_peer_uses_a_new_dir() -> Result<()> {
    let server = serve(2).await?;
    let src = snapshot_dir()?;
    let mut conn = connection(1, 2, server.addr).await;
    for _ in 0..2 {
        let snap = typ::Snapshot {
            meta: meta(),
            snapshot: Box::new(SnapshotDir {
                path: src.path().to_path_buf(),
            }),
        };
        conn.full_snapshot(
            Vote::new_committed(3, 1),
            snap,
            never_cancelled(),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await?;
    }
    let installed = server.raft.installed();
    assert_eq!(installed.len(), 2);
    assert_ne!(installed[0].2, installed[1].2);
    assert_eq!(dir_files(&installed[1].2)?, dir_files(src.path())?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (b) a stream cut halfway installs nothing and removes the incoming dir
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn stream_ending_without_done_is_discarded() -> Result<()> {
    let server = serve(2).await?;
    let big = random_bytes(3 * 1000);
    let (tx, rx) = mpsc::channel(4);
    tx.send(header(1, 2, vec![file_entry("000009.sst", &big)])?)
        .await?;
    tx.send(data(0, 0, &big[..1000])).await?;
    drop(tx);
    let err = raw_client(server.addr)
        .await?
        .install_snapshot(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");

    let begun = server.raft.begun();
    assert_eq!(begun.len(), 1);
    assert!(!begun[0].exists(), "incoming dir left behind");
    assert!(server.raft.installed().is_empty());
    Ok(())
}

#[tokio::test]
async fn client_vanishing_mid_stream_is_discarded() -> Result<()> {
    let server = serve(2).await?;
    let big = random_bytes(3 * 1000);
    let (tx, rx) = mpsc::channel(4);
    tx.send(header(1, 2, vec![file_entry("000009.sst", &big)])?)
        .await?;
    tx.send(data(0, 0, &big[..1000])).await?;
    let mut client = raw_client(server.addr).await?;
    let call = tokio::spawn(async move { client.install_snapshot(ReceiverStream::new(rx)).await });

    // Wait until the receiver holds the first chunk on disk, then kill the call (stream reset).
    let raft = server.raft.clone();
    eventually("first chunk written", || {
        raft.begun()
            .first()
            .and_then(|d| std::fs::metadata(d.join("000009.sst")).ok())
            .is_some_and(|m| m.len() == 1000)
    })
    .await;
    call.abort();
    drop(tx);

    let dir = server.raft.begun()[0].clone();
    eventually("incoming dir removed", || !dir.exists()).await;
    assert!(server.raft.installed().is_empty());
    Ok(())
}

#[tokio::test]
async fn cancelled_full_snapshot_returns_closed_promptly() -> Result<()> {
    let (addr, _peer) = silent_peer().await?;
    let src = snapshot_dir()?;
    let mut conn = connection(1, 2, addr).await;
    let snap = typ::Snapshot {
        meta: meta(),
        snapshot: Box::new(SnapshotDir {
            path: src.path().to_path_buf(),
        }),
    };
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ReplicationClosed::new("test cancels")
    };
    let started = Instant::now();
    let err = conn
        .full_snapshot(
            Vote::new_committed(3, 1),
            snap,
            cancel,
            RPCOption::new(Duration::from_secs(1)),
        )
        .await;
    assert!(matches!(err, Err(StreamingError::Closed(_))), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (c) corrupted data and (d) hostile names are refused
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn corrupted_chunk_is_refused_by_crc() -> Result<()> {
    let server = serve(2).await?;
    let good = random_bytes(4000);
    let mut bad = good.clone();
    bad[1234] ^= 0x40;
    let chunks = vec![
        header(1, 2, vec![file_entry("000009.sst", &good)])?,
        data(0, 0, &bad),
        done(),
    ];
    let err = raw_client(server.addr)
        .await?
        .install_snapshot(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("crc32"), "{err:?}");
    let begun = server.raft.begun();
    assert_eq!(begun.len(), 1);
    assert!(!begun[0].exists(), "incoming dir left behind");
    assert!(server.raft.installed().is_empty());
    Ok(())
}

#[tokio::test]
async fn path_traversal_is_refused_before_anything_is_written() -> Result<()> {
    let server = serve(2).await?;
    let bytes = b"owned".to_vec();
    let chunks = vec![
        header(1, 2, vec![file_entry("../evil", &bytes)])?,
        data(0, 0, &bytes),
        done(),
    ];
    let err = raw_client(server.addr)
        .await?
        .install_snapshot(futures::stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        server.raft.begun().is_empty(),
        "an incoming dir was created for a bad header"
    );
    assert!(server.raft.installed().is_empty());
    assert!(!server._dir.path().join("evil").exists());
    Ok(())
}

/// The receiving core on its own, against a hand-built chunk sequence.
async fn receive(
    files: &[SnapshotFile],
    chunks: Vec<SnapshotChunk>,
) -> Result<(tempfile::TempDir, Result<(), snapshot::ReceiveError>)> {
    let dir = tempfile::tempdir()?;
    let mut stream = futures::stream::iter(chunks.into_iter().map(Ok));
    let res = snapshot::receive_snapshot_files(dir.path(), files, &mut stream, Duration::from_secs(5)).await;
    Ok((dir, res))
}

#[tokio::test]
async fn receiving_core_checks_every_rule() -> Result<()> {
    let a = random_bytes(3000);
    let b = random_bytes(10);
    let files = vec![file_entry("a", &a), file_entry("empty", b""), file_entry("b", &b)];

    // The happy path: chunks in order, the empty file gets none.
    let ok = vec![
        data(0, 0, &a[..1000]),
        data(0, 1000, &a[1000..]),
        data(2, 0, &b),
        done(),
    ];
    let (dir, res) = receive(&files, ok).await?;
    res?;
    assert_eq!(std::fs::read(dir.path().join("a"))?, a);
    assert_eq!(std::fs::read(dir.path().join("empty"))?.len(), 0);
    assert_eq!(std::fs::read(dir.path().join("b"))?, b);

    use snapshot::ReceiveError as E;
    type Expect = fn(&E) -> bool;
    let cases: Vec<(&str, Vec<SnapshotChunk>, Expect)> = vec![
        (
            "gap in offsets",
            vec![data(0, 0, &a[..1000]), data(0, 1500, &a[1500..])],
            |e| matches!(e, E::Offset { .. }),
        ),
        (
            "repeated chunk",
            vec![data(0, 0, &a[..1000]), data(0, 0, &a[..1000])],
            |e| matches!(e, E::Offset { .. }),
        ),
        ("past the size", vec![data(2, 0, &b), data(2, 10, b"x")], |e| {
            matches!(e, E::Overflow { .. })
        }),
        ("unknown file", vec![data(7, 0, b"x")], |e| {
            matches!(e, E::UnknownFile { .. })
        }),
        ("files backwards", vec![data(2, 0, &b), data(0, 0, &a)], |e| {
            matches!(e, E::FileOrder { .. })
        }),
        (
            "short file",
            vec![data(0, 0, &a[..1000]), data(2, 0, &b), done()],
            |e| matches!(e, E::Size { .. }),
        ),
        ("no done", vec![data(0, 0, &a), data(2, 0, &b)], |e| {
            matches!(e, E::Truncated)
        }),
        ("second header", vec![header(1, 2, vec![])?], |e| {
            matches!(e, E::Protocol(_))
        }),
    ];
    for (what, chunks, expected) in cases {
        let (_dir, res) = receive(&files, chunks).await?;
        match res {
            Err(e) if expected(&e) => {}
            other => panic!("{what}: unexpected {other:?}"),
        }
    }

    let mut flipped = a.clone();
    flipped[0] ^= 1;
    let (_dir, res) = receive(&files, vec![data(0, 0, &flipped), data(2, 0, &b), done()]).await?;
    assert!(matches!(res, Err(E::Crc { .. })), "{res:?}");

    let (dir, res) = receive(&[file_entry("../escape", b"x")], vec![data(0, 0, b"x"), done()]).await?;
    assert!(matches!(res, Err(E::BadName { .. })), "{res:?}");
    assert!(!dir
        .path()
        .parent()
        .map(|p| p.join("escape").exists())
        .unwrap_or(false));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (e) a peer that is another node counts as unreachable
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn peer_with_another_node_id_is_unreachable() -> Result<()> {
    let server = serve(2).await?;
    // This node believes node 3 lives at node 2's address.
    let mut conn = connection(1, 3, server.addr).await;

    let err = conn
        .vote(
            openraft::raft::VoteRequest::new(Vote::new(4, 1), None),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
    assert!(
        err.to_string().contains("this is node 2, request was for node 3"),
        "{err}"
    );

    let append = openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(4, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };
    let err = conn
        .append_entries(append, RPCOption::new(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

    let src = snapshot_dir()?;
    let snap = typ::Snapshot {
        meta: meta(),
        snapshot: Box::new(SnapshotDir {
            path: src.path().to_path_buf(),
        }),
    };
    let err = conn
        .full_snapshot(
            Vote::new_committed(4, 1),
            snap,
            never_cancelled(),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StreamingError::Unreachable(_)), "{err:?}");

    let clients = PeerClients::new(1, opts(), None);
    let err = clients
        .forward(
            3,
            &server.addr.to_string(),
            &[Op::Expire { max: 1 }],
            Duration::from_secs(1),
        )
        .await;
    assert!(
        matches!(err, Err(WriteError::Unavailable { leader: None })),
        "{err:?}"
    );
    let err = clients
        .probe(
            3,
            &server.addr.to_string(),
            ProbeRequest::default(),
            Duration::from_secs(1),
        )
        .await;
    assert!(err.as_ref().is_err_and(is_node_id_mismatch), "{err:?}");

    assert_eq!(
        server.raft.rpcs(),
        0,
        "openraft was called for another node's request"
    );
    assert!(server.raft.begun().is_empty());
    assert!(server.hooks.forwarded.lock().is_empty());

    // Addressed correctly, the same peer answers.
    let reply = clients
        .probe(
            2,
            &server.addr.to_string(),
            ProbeRequest::default(),
            Duration::from_secs(1),
        )
        .await?;
    assert_eq!(reply.node_id, 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (f) silent and absent peers fail fast
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn silent_peer_times_out_instead_of_hanging() -> Result<()> {
    let (addr, _peer) = silent_peer().await?;
    let mut conn = connection(1, 2, addr).await;
    let ttl = Duration::from_millis(300);

    let started = Instant::now();
    let append = openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(4, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };
    let err = conn
        .append_entries(append, RPCOption::new(ttl))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let clients = PeerClients::new(1, opts(), None);
    let err = clients
        .forward(2, &addr.to_string(), &[Op::Expire { max: 1 }], ttl)
        .await;
    assert!(matches!(err, Err(WriteError::Indeterminate(_))), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    let err = clients
        .probe(2, &addr.to_string(), ProbeRequest::default(), ttl)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    Ok(())
}

#[tokio::test]
async fn absent_peer_is_unreachable_and_nothing_was_sent() -> Result<()> {
    let addr = closed_port().await?;
    let mut conn = connection(1, 2, addr).await;
    let started = Instant::now();
    let err = conn
        .vote(
            openraft::raft::VoteRequest::new(Vote::new(4, 1), None),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

    let clients = PeerClients::new(1, opts(), None);
    let err = clients
        .forward(
            2,
            &addr.to_string(),
            &[Op::Expire { max: 1 }],
            Duration::from_secs(1),
        )
        .await;
    assert!(
        matches!(err, Err(WriteError::Unavailable { leader: None })),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );

    // openraft waits longer and longer between attempts, starting small.
    let delays: Vec<Duration> = conn.backoff().take(8).collect();
    assert!(delays[0] <= Duration::from_millis(50));
    let max = opts().backoff_max;
    assert!(delays[7] >= max / 2 && delays[7] <= max, "{delays:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (g) write forwarding
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forward_maps_replies() -> Result<()> {
    let server = serve(2).await?;
    let clients = PeerClients::new(1, opts(), None);
    let addr = server.addr.to_string();
    let ops = vec![Op::NodeDown { node: 9 }, Op::Expire { max: 10 }];
    let t = Duration::from_secs(2);

    *server.hooks.forward.lock() = Err(WriteError::Unavailable {
        leader: Some((3, "10.0.0.3:7001".into())),
    });
    let err = clients.forward(2, &addr, &ops, t).await;
    match err {
        Err(WriteError::Unavailable { leader: Some((3, a)) }) if a == "10.0.0.3:7001" => {}
        other => panic!("unexpected {other:?}"),
    }

    *server.hooks.forward.lock() = Err(WriteError::Unavailable { leader: None });
    assert!(matches!(
        clients.forward(2, &addr, &ops, t).await,
        Err(WriteError::Unavailable { leader: None })
    ));

    *server.hooks.forward.lock() = Err(WriteError::Invalid("too big".into()));
    let err = clients.forward(2, &addr, &ops, t).await;
    assert!(
        matches!(&err, Err(WriteError::Invalid(m)) if m == "too big"),
        "{err:?}"
    );

    for remote in [
        WriteError::Indeterminate("leader lost".into()),
        WriteError::Shutdown,
    ] {
        *server.hooks.forward.lock() = Err(remote);
        let err = clients.forward(2, &addr, &ops, t).await;
        assert!(matches!(err, Err(WriteError::Indeterminate(_))), "{err:?}");
    }

    let results = vec![
        OpResult::Done,
        OpResult::Expired {
            messages: 1,
            topic_entries: 2,
            keys: 3,
        },
    ];
    *server.hooks.forward.lock() = Ok((results.clone(), 77));
    assert_eq!(clients.forward(2, &addr, &ops, t).await?, (results, 77));
    assert!(server.hooks.forwarded.lock().iter().all(|got| *got == ops));
    Ok(())
}

#[tokio::test]
async fn raft_rpcs_round_trip() -> Result<()> {
    let server = serve(2).await?;
    let mut conn = connection(1, 2, server.addr).await;
    let vote = Vote::new(5, 1);
    let resp = conn
        .vote(
            openraft::raft::VoteRequest::new(vote, None),
            RPCOption::new(Duration::from_secs(1)),
        )
        .await?;
    assert!(resp.vote_granted);
    assert_eq!(resp.vote, vote);
    let append = openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(5, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };
    assert_eq!(
        conn.append_entries(append, RPCOption::new(Duration::from_secs(1)))
            .await?,
        AppendEntriesResponse::Success
    );
    assert_eq!(server.raft.rpcs(), 2);
    Ok(())
}

/// Entry-less AppendEntries (heartbeats) of many groups to one peer leave in shared batch calls,
/// each answered by its own group's handler; a group the peer lacks is unreachable, not served by
/// another group.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_of_many_groups_to_one_peer_share_calls() -> Result<()> {
    const GROUPS: u32 = 40;
    let dir = tempfile::tempdir()?;
    let router = RaftRouter::new(2);
    let mut rafts = Vec::new();
    for g in 0..GROUPS {
        let raft = FakeRaft::new(dir.path());
        router.insert(g, RaftGrpc::new(2, raft.clone(), FakeHooks::new(2) as Hooks));
        rafts.push(raft);
    }
    let svc = router.clone().into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let node = BasicNode {
        addr: listener.local_addr()?.to_string(),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let heartbeat = || openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(5, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };
    let clients = PeerClients::new(1, opts(), None);
    for _round in 0..3 {
        let beats = (0..GROUPS).map(|g| {
            let (clients, node) = (clients.clone(), node.clone());
            async move {
                let mut conn = Network::for_group(clients, g).new_client(2, &node).await;
                conn.append_entries(heartbeat(), RPCOption::new(Duration::from_secs(2)))
                    .await
            }
        });
        for r in futures::future::join_all(beats).await {
            assert_eq!(r?, AppendEntriesResponse::Success);
        }
    }
    for (g, raft) in rafts.iter().enumerate() {
        assert_eq!(raft.rpcs(), 3, "group {g} took its own three heartbeats");
    }
    let (calls, carried) = router.batch_counts();
    assert_eq!(carried, 3 * u64::from(GROUPS));
    assert!(calls < carried, "{carried} heartbeats took {calls} calls");

    let mut stranger = Network::for_group(clients.clone(), 99).new_client(2, &node).await;
    match stranger
        .append_entries(heartbeat(), RPCOption::new(Duration::from_secs(2)))
        .await
    {
        Err(RPCError::Unreachable(_)) => {}
        other => anyhow::bail!("a heartbeat of a group the peer lacks answered {other:?}"),
    }
    assert_eq!(rafts.iter().map(|r| r.rpcs()).sum::<u64>(), 3 * u64::from(GROUPS));
    task.abort();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Real openraft over the transport: election, replication, and a snapshot to a new learner.
// The log store and state machine are a minimal in-memory stand-in (test only); the state
// machine's snapshots are real directories, so the streaming path is the production one.
// ---------------------------------------------------------------------------------------------

mod mem {
    use std::collections::BTreeMap;
    use std::fmt::Debug;
    use std::ops::RangeBounds;
    use std::path::PathBuf;
    use std::sync::Arc;

    use herald_raft::{typ, OpResult, Response, SnapshotDir, TypeConfig};
    use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
    use openraft::{AnyError, EntryPayload, RaftLogReader, RaftSnapshotBuilder, StorageIOError};
    use tokio::sync::Mutex;

    fn io_err(e: impl std::error::Error + 'static) -> typ::StorageError {
        StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
    }

    #[derive(Default)]
    struct Log {
        vote: Option<typ::Vote>,
        entries: BTreeMap<u64, typ::Entry>,
        purged: Option<typ::LogId>,
    }

    #[derive(Clone, Default)]
    pub struct MemLog(Arc<Mutex<Log>>);

    impl RaftLogReader<TypeConfig> for MemLog {
        async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
            &mut self,
            range: RB,
        ) -> Result<Vec<typ::Entry>, typ::StorageError> {
            Ok(self
                .0
                .lock()
                .await
                .entries
                .range(range)
                .map(|(_, e)| e.clone())
                .collect())
        }
    }

    impl RaftLogStorage<TypeConfig> for MemLog {
        type LogReader = MemLog;

        async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, typ::StorageError> {
            let log = self.0.lock().await;
            let last = log.entries.values().next_back().map(|e| e.log_id).or(log.purged);
            Ok(LogState {
                last_purged_log_id: log.purged,
                last_log_id: last,
            })
        }
        async fn get_log_reader(&mut self) -> MemLog {
            self.clone()
        }
        async fn save_vote(&mut self, vote: &typ::Vote) -> Result<(), typ::StorageError> {
            self.0.lock().await.vote = Some(*vote);
            Ok(())
        }
        async fn read_vote(&mut self) -> Result<Option<typ::Vote>, typ::StorageError> {
            Ok(self.0.lock().await.vote)
        }
        async fn append<I>(
            &mut self,
            entries: I,
            callback: LogFlushed<TypeConfig>,
        ) -> Result<(), typ::StorageError>
        where
            I: IntoIterator<Item = typ::Entry> + Send,
            I::IntoIter: Send,
        {
            let mut log = self.0.lock().await;
            for e in entries {
                log.entries.insert(e.log_id.index, e);
            }
            callback.log_io_completed(Ok(()));
            Ok(())
        }
        async fn truncate(&mut self, log_id: typ::LogId) -> Result<(), typ::StorageError> {
            self.0.lock().await.entries.retain(|i, _| *i < log_id.index);
            Ok(())
        }
        async fn purge(&mut self, log_id: typ::LogId) -> Result<(), typ::StorageError> {
            let mut log = self.0.lock().await;
            log.entries.retain(|i, _| *i > log_id.index);
            log.purged = Some(log_id);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Sm {
        applied: Option<typ::LogId>,
        membership: typ::StoredMembership,
        /// The whole replicated state: how many ops were applied.
        ops: u64,
        snapshot: Option<(typ::SnapshotMeta, PathBuf)>,
        next_dir: u64,
    }

    #[derive(Clone)]
    pub struct MemSm {
        inner: Arc<Mutex<Sm>>,
        root: PathBuf,
    }

    impl MemSm {
        pub fn new(root: PathBuf) -> Self {
            MemSm {
                inner: Arc::default(),
                root,
            }
        }
        pub async fn ops(&self) -> u64 {
            self.inner.lock().await.ops
        }
    }

    impl RaftSnapshotBuilder<TypeConfig> for MemSm {
        async fn build_snapshot(&mut self) -> Result<typ::Snapshot, typ::StorageError> {
            let mut sm = self.inner.lock().await;
            sm.next_dir += 1;
            let path = self.root.join(format!("snapshot-{}", sm.next_dir));
            let meta = typ::SnapshotMeta {
                last_log_id: sm.applied,
                last_membership: sm.membership.clone(),
                snapshot_id: format!("snap-{}", sm.next_dir),
            };
            std::fs::create_dir_all(&path).map_err(io_err)?;
            std::fs::write(path.join("state.bin"), sm.ops.to_le_bytes()).map_err(io_err)?;
            // Bulk, so the stream spans many chunks.
            std::fs::write(path.join("000001.sst"), vec![7u8; 300 * 1024]).map_err(io_err)?;
            std::fs::write(path.join("meta.bin"), bincode::serialize(&meta).map_err(io_err)?)
                .map_err(io_err)?;
            sm.snapshot = Some((meta.clone(), path.clone()));
            Ok(typ::Snapshot {
                meta,
                snapshot: Box::new(SnapshotDir { path }),
            })
        }
    }

    impl RaftStateMachine<TypeConfig> for MemSm {
        type SnapshotBuilder = MemSm;

        async fn applied_state(
            &mut self,
        ) -> Result<(Option<typ::LogId>, typ::StoredMembership), typ::StorageError> {
            let sm = self.inner.lock().await;
            Ok((sm.applied, sm.membership.clone()))
        }
        async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, typ::StorageError>
        where
            I: IntoIterator<Item = typ::Entry> + Send,
            I::IntoIter: Send,
        {
            let mut sm = self.inner.lock().await;
            let mut out = Vec::new();
            for e in entries {
                sm.applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(Response::default()),
                    EntryPayload::Normal(req) => {
                        sm.ops += req.ops.len() as u64;
                        out.push(Response {
                            results: vec![OpResult::Done; req.ops.len()],
                        });
                    }
                    EntryPayload::Membership(m) => {
                        sm.membership = typ::StoredMembership::new(Some(e.log_id), m);
                        out.push(Response::default());
                    }
                }
            }
            Ok(out)
        }
        async fn get_snapshot_builder(&mut self) -> MemSm {
            self.clone()
        }
        async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotDir>, typ::StorageError> {
            let mut sm = self.inner.lock().await;
            sm.next_dir += 1;
            let path = self.root.join(format!("incoming-{}", sm.next_dir));
            std::fs::create_dir_all(&path).map_err(io_err)?;
            Ok(Box::new(SnapshotDir { path }))
        }
        async fn install_snapshot(
            &mut self,
            meta: &typ::SnapshotMeta,
            snapshot: Box<SnapshotDir>,
        ) -> Result<(), typ::StorageError> {
            let bytes = std::fs::read(snapshot.path.join("state.bin")).map_err(io_err)?;
            let ops = u64::from_le_bytes(bytes.try_into().map_err(|_| io_err(std::fmt::Error))?);
            let mut sm = self.inner.lock().await;
            sm.ops = ops;
            sm.applied = meta.last_log_id;
            sm.membership = meta.last_membership.clone();
            sm.snapshot = Some((meta.clone(), snapshot.path));
            Ok(())
        }
        async fn get_current_snapshot(&mut self) -> Result<Option<typ::Snapshot>, typ::StorageError> {
            let sm = self.inner.lock().await;
            Ok(sm.snapshot.clone().map(|(meta, path)| typ::Snapshot {
                meta,
                snapshot: Box::new(SnapshotDir { path }),
            }))
        }
    }
}

/// A hooks stand-in for the real-Raft test (forward and probe are not exercised there).
struct NoHooks;

impl RaftServiceHooks for NoHooks {
    fn forward(&self, _ops: Vec<Op>) -> BoxFuture<'static, Result<(Vec<OpResult>, u64), WriteError>> {
        Box::pin(async { Err(WriteError::Unavailable { leader: None }) })
    }
    fn probe(&self, _req: ProbeRequest) -> ProbeReply {
        ProbeReply::default()
    }
}

struct RealNode {
    raft: typ::Raft,
    sm: mem::MemSm,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

async fn real_node(id: NodeId) -> Result<RealNode> {
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = openraft::Config {
        heartbeat_interval: 100,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..Default::default()
    }
    .validate()?;
    let sm = mem::MemSm::new(dir.path().to_path_buf());
    let network = Network::new(PeerClients::new(id, opts(), None));
    let raft = typ::Raft::new(id, Arc::new(config), network, mem::MemLog::default(), sm.clone()).await?;
    let svc = herald_raft::network::raft_server(id, raft.clone(), Arc::new(NoHooks));
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Ok(RealNode {
        raft,
        sm,
        addr,
        _dir: dir,
        server,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_cluster_replicates_and_installs_snapshots_over_the_transport() -> Result<()> {
    let wait = Some(Duration::from_secs(20));
    let nodes: Vec<RealNode> = vec![real_node(1).await?, real_node(2).await?, real_node(3).await?];
    let members: BTreeMap<NodeId, BasicNode> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                i as NodeId + 1,
                BasicNode {
                    addr: n.addr.to_string(),
                },
            )
        })
        .collect();
    nodes[0].raft.initialize(members).await?;
    let m = nodes[0]
        .raft
        .wait(wait)
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await?;
    let leader_id = m.current_leader.unwrap_or(1);
    let leader = &nodes[leader_id as usize - 1];

    let mut last = 0;
    for i in 0..5u32 {
        let req = herald_raft::Request::new(1, vec![Op::Expire { max: i }, Op::NodeDown { node: 9 }]);
        let resp = leader.raft.client_write(req).await?;
        assert_eq!(resp.data.results.len(), 2);
        last = resp.log_id.index;
    }
    for n in &nodes {
        n.raft
            .wait(wait)
            .applied_index_at_least(Some(last), "replicated")
            .await?;
        assert_eq!(n.sm.ops().await, 10);
    }

    // Snapshot and purge the log, so a new member can only catch up from the snapshot.
    leader.raft.trigger().snapshot().await?;
    leader
        .raft
        .wait(wait)
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= last), "snapshot built")
        .await?;
    leader.raft.trigger().purge_log(last).await?;
    leader
        .raft
        .wait(wait)
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "log purged")
        .await?;

    let learner = real_node(4).await?;
    leader
        .raft
        .add_learner(
            4,
            BasicNode {
                addr: learner.addr.to_string(),
            },
            true,
        )
        .await?;
    learner
        .raft
        .wait(wait)
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot installed",
        )
        .await?;
    learner
        .raft
        .wait(wait)
        .applied_index_at_least(Some(last), "learner caught up")
        .await?;
    assert_eq!(learner.sm.ops().await, 10);

    for n in nodes.iter().chain(std::iter::once(&learner)) {
        n.raft.shutdown().await?;
        n.server.abort();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// a follower ahead of a candidate stands for election when the leader is silent
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_follower_ahead_of_a_refused_candidate_stands_only_when_the_leader_is_silent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raft = FakeRaft::new(dir.path());
    *raft.0.refuse_with_log.lock() = Some(LogId::new(CommittedLeaderId::new(2, 1), 10));
    let svc = RaftGrpc::new(2, raft.clone(), FakeHooks::new(2) as Hooks)
        .campaign_after(Duration::from_millis(300))
        .into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let mut conn = connection(1, 2, addr).await;
    let behind = LogId::new(CommittedLeaderId::new(2, 1), 9);
    let vote = |term| openraft::raft::VoteRequest::new(Vote::new(term, 3), Some(behind));
    let opt = || RPCOption::new(Duration::from_secs(1));

    // A leader's heartbeat just arrived: a refused candidate changes nothing.
    let heartbeat = openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(2, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: vec![],
    };
    conn.append_entries(heartbeat, opt()).await?;
    let r = conn.vote(vote(3), opt()).await?;
    assert!(!r.vote_granted);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        raft.elections(),
        0,
        "stood for election while the leader was heard"
    );

    // The leader has been silent past the threshold: the follower stands, twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.vote(vote(4), opt()).await?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while raft.elections() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(raft.elections(), 2);

    // A candidate whose log is not behind ours is simply answered.
    *raft.0.refuse_with_log.lock() = None;
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.vote(vote(5), opt()).await?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(raft.elections(), 2);
    task.abort();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// a rejoined node grants no vote before it caught up
// ---------------------------------------------------------------------------------------------

/// A rejoined (wiped) node may have been part of the majority that committed an entry; with its
/// empty log it must not help elect a candidate that lacks it. Until its log reaches the hold,
/// it answers only candidates whose log reaches the hold; after that, everyone.
#[tokio::test]
async fn a_rejoined_node_votes_only_for_candidates_at_its_hold_until_it_caught_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raft = FakeRaft::new(dir.path());
    raft.0.held.store(0, Ordering::SeqCst);
    let hold = LogId::new(CommittedLeaderId::new(5, 1), 100);
    let svc = RaftGrpc::new(2, raft.clone(), FakeHooks::new(2) as Hooks)
        .with_vote_hold(Some(hold))
        .into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let mut conn = connection(1, 2, addr).await;
    let opt = || RPCOption::new(Duration::from_secs(1));
    let vote = |term, last: Option<typ::LogId>| openraft::raft::VoteRequest::new(Vote::new(term, 3), last);

    // Behind the hold (an older leader's entries, or fewer of the same leader's): no answer,
    // and openraft is not asked.
    for last in [
        None,
        Some(LogId::new(CommittedLeaderId::new(5, 1), 99)),
        Some(LogId::new(CommittedLeaderId::new(4, 2), 500)),
    ] {
        let before = raft.rpcs();
        let e = conn.vote(vote(6, last), opt()).await;
        assert!(e.is_err(), "a candidate with log {last:?} got an answer: {e:?}");
        assert_eq!(raft.rpcs(), before, "openraft was asked for a held vote");
    }
    // At or past the hold: answered.
    for last in [hold, LogId::new(CommittedLeaderId::new(6, 3), 90)] {
        let r = conn.vote(vote(7, Some(last)), opt()).await?;
        assert!(r.vote_granted);
    }
    // Still held for candidates behind it while this node's log is short…
    raft.0.held.store(99, Ordering::SeqCst);
    assert!(conn.vote(vote(8, None), opt()).await.is_err());
    // …and released for good once it reached the hold.
    raft.0.held.store(100, Ordering::SeqCst);
    assert!(conn.vote(vote(9, None), opt()).await?.vote_granted);
    raft.0.held.store(0, Ordering::SeqCst);
    assert!(conn.vote(vote(10, None), opt()).await?.vote_granted);
    task.abort();
    Ok(())
}
