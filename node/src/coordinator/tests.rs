//! The coordinator against real backends on loopback sockets ([`TestBackend`]) and, for state
//! callbacks, a real single-member `RaftNode` on a temp dir.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use herald_proto::callback::SessionEventKind;
use herald_raft::{
    AppConfig, AppLimits, ApplyEvent, ApplyObserver, DevicePolicy, Op, OpResult, RaftConfig, RaftNode,
    Register,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use super::test_backend::{Mode, TestBackend};
use super::*;

const NODE_ID: u64 = 9;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Short timings so failure paths finish quickly.
fn fast_config() -> CoordinatorConfig {
    CoordinatorConfig {
        queue_capacity: 10_000,
        queue_share_per_conn: 10_000,
        max_inflight_per_app: 64,
        upstream_deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(300),
        max_attempts: 6,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        cooldown: Duration::from_millis(200),
        cooldown_max: Duration::from_millis(400),
        events_batch: 500,
        events_poll: Duration::from_millis(200),
        events_attempt_timeout: Duration::from_secs(1),
        events_backoff_base: Duration::from_millis(50),
        events_backoff_max: Duration::from_millis(300),
    }
}

fn app(id: &str, callbacks: Vec<String>) -> AppConfig {
    AppConfig {
        id: id.into(),
        name: id.into(),
        secrets: vec!["secret-secret-secret".into()],
        api_keys: vec!["key-key-key-key-key".into()],
        limits: AppLimits::STANDARD,
        policy: DevicePolicy {
            max_per_platform: 0,
            max_per_user: 0,
        },
        callbacks,
        created_ms: 0,
        client_publish: Vec::new(),
    }
}

fn coordinator(config: CoordinatorConfig) -> (Coordinator, CancellationToken) {
    let stop = CancellationToken::new();
    let c = Coordinator::new(config, NODE_ID, stop.clone()).expect("valid config");
    (c, stop)
}

/// An address nothing listens on.
async fn dead_endpoint() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    drop(l);
    Ok(addr.to_string())
}

async fn outcome(rx: oneshot::Receiver<UpstreamOutcome>, limit: Duration) -> Result<UpstreamOutcome> {
    tokio::time::timeout(limit, rx)
        .await
        .context("no outcome in time")?
        .context("outcome sender dropped")
}

/// Per user, the request ids in the order the backends accepted them (merged over `backends`),
/// with the index of the backend that took each.
fn arrivals(backends: &[&TestBackend]) -> BTreeMap<String, Vec<(u64, usize)>> {
    let mut all = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        for a in b.upstreams() {
            all.push((a.seq, a.request.user.clone(), a.request.request_id, i));
        }
    }
    all.sort_by_key(|a| a.0);
    let mut out: BTreeMap<String, Vec<(u64, usize)>> = BTreeMap::new();
    for (_, user, id, i) in all {
        out.entry(user).or_default().push((id, i));
    }
    out
}

// ---- upstream ---------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_round_trip_returns_the_backends_reply() -> Result<()> {
    init_tracing();
    let b = TestBackend::start().await?;
    b.set_reply_prefix("re:");
    let (c, _stop) = coordinator(fast_config());
    let a = app("app1", vec![b.endpoint()]);
    let rx = c.upstream(&a, 1, "alice", "phone", 7, Bytes::from_static(b"hello"))?;
    let reply = outcome(rx, Duration::from_secs(5)).await?;
    assert_eq!(reply, Ok(Bytes::from_static(b"re:hello")));
    let got = b.upstreams();
    assert_eq!(got.len(), 1);
    let r = &got[0].request;
    assert_eq!(
        (
            r.app.as_str(),
            r.user.as_str(),
            r.device.as_str(),
            r.request_id,
            r.node_id
        ),
        ("app1", "alice", "phone", 7, NODE_ID)
    );
    assert_eq!(&r.payload[..], b"hello");
    let s = c.stats();
    assert_eq!((s.upstream_queued, s.upstream_ok, s.upstream_depth), (1, 1, 0));
    assert_eq!(
        s.apps,
        vec![AppGroupStats {
            app: "app1".into(),
            members: 1,
            unhealthy: 0,
            queue_depth: 0
        }]
    );
    Ok(())
}

#[tokio::test]
async fn upstream_is_refused_without_callbacks_and_after_shutdown() -> Result<()> {
    let (c, stop) = coordinator(fast_config());
    let r = c.upstream(&app("app1", vec![]), 1, "u", "d", 1, Bytes::new());
    assert_eq!(r.err(), Some(UpstreamError::NoBackend { app: "app1".into() }));
    stop.cancel();
    let r = c.upstream(
        &app("app1", vec!["127.0.0.1:1".into()]),
        1,
        "u",
        "d",
        1,
        Bytes::new(),
    );
    assert_eq!(r.err(), Some(UpstreamError::ShuttingDown));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_requests_arrive_in_order_while_users_run_in_parallel() -> Result<()> {
    init_tracing();
    let b = TestBackend::start().await?;
    b.set_delay(Duration::from_millis(2));
    let (c, _stop) = coordinator(fast_config());
    let a = app("app1", vec![b.endpoint()]);
    const USERS: u64 = 40;
    const PER_USER: u64 = 25;
    let mut pending = Vec::new();
    // Interleaved, as many connections of one node would send them.
    for i in 0..PER_USER {
        for u in 0..USERS {
            let rx = c.upstream(
                &a,
                1,
                &format!("user-{u}"),
                "d",
                i,
                Bytes::from(format!("{u}/{i}")),
            )?;
            pending.push((u, i, rx));
        }
    }
    for (u, i, rx) in pending {
        let got = outcome(rx, Duration::from_secs(20)).await?;
        assert_eq!(got, Ok(Bytes::from(format!("{u}/{i}"))), "user {u} request {i}");
    }
    let per_user = arrivals(&[&b]);
    assert_eq!(per_user.len(), USERS as usize);
    for (user, ids) in &per_user {
        let ids: Vec<u64> = ids.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            (0..PER_USER).collect::<Vec<_>>(),
            "{user}'s requests out of order"
        );
    }
    // Different users are not serialized behind each other.
    assert!(
        b.max_in_flight() >= 8,
        "only {} calls were ever in flight together",
        b.max_in_flight()
    );
    let s = c.stats();
    assert_eq!(s.upstream_ok, USERS * PER_USER);
    assert_eq!(s.upstream_depth, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_spreads_users_fails_over_in_order_and_readmits_a_member() -> Result<()> {
    init_tracing();
    let backends = [
        TestBackend::start().await?,
        TestBackend::start().await?,
        TestBackend::start().await?,
    ];
    let refs: Vec<&TestBackend> = backends.iter().collect();
    let mut config = fast_config();
    config.upstream_deadline = Duration::from_secs(8);
    let (c, _stop) = coordinator(config);
    let a = app("app1", backends.iter().map(|b| b.endpoint()).collect());
    let users: Vec<String> = (0..60).map(|u| format!("user-{u}")).collect();
    let mut sent: HashMap<String, Vec<u64>> = HashMap::new();
    let mut next_id = 0u64;

    // Phase 1: every user's requests land on one member; all three members get users.
    let mut pending = Vec::new();
    for _ in 0..3 {
        for u in &users {
            next_id += 1;
            pending.push(c.upstream(&a, 1, u, "d", next_id, Bytes::from_static(b"x"))?);
            sent.entry(u.clone()).or_default().push(next_id);
        }
    }
    for rx in pending {
        ensure!(
            outcome(rx, Duration::from_secs(10)).await?.is_ok(),
            "phase 1 request failed"
        );
    }
    let mut home: HashMap<String, usize> = HashMap::new();
    for (user, got) in arrivals(&refs) {
        let members: HashSet<usize> = got.iter().map(|(_, i)| *i).collect();
        ensure!(members.len() == 1, "{user} was spread over members {members:?}");
        home.insert(user, *members.iter().next().unwrap());
    }
    let mut per_member = [0usize; 3];
    for i in home.values() {
        per_member[*i] += 1;
    }
    ensure!(
        per_member.iter().all(|n| *n >= 5),
        "users per member: {per_member:?}"
    );

    // Phase 2: kill member 1 while users keep sending; nothing may be lost or reordered.
    let victim = 1usize;
    let kill_after = 5;
    let mut pending = Vec::new();
    let mut kill_seq = 0;
    for step in 0..15 {
        if step == kill_after {
            backends[victim].stop().await;
            kill_seq = backends
                .iter()
                .flat_map(|b| b.upstreams())
                .map(|a| a.seq)
                .max()
                .unwrap_or(0);
        }
        for u in &users {
            next_id += 1;
            pending.push((
                u.clone(),
                c.upstream(&a, 1, u, "d", next_id, Bytes::from_static(b"y"))?,
            ));
            sent.entry(u.clone()).or_default().push(next_id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (u, rx) in pending {
        let got = outcome(rx, Duration::from_secs(15)).await?;
        ensure!(got.is_ok(), "request of {u} lost across the fail-over: {got:?}");
    }
    let merged = arrivals(&refs);
    for (user, got) in &merged {
        // Duplicates would be allowed (a call may be answered after its connection broke), but the
        // first arrivals must be exactly what was sent, in order.
        let mut seen = HashSet::new();
        let firsts: Vec<u64> = got
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| seen.insert(*id))
            .collect();
        ensure!(
            firsts == sent[user],
            "{user}: sent {:?}, backends saw {firsts:?}",
            sent[user]
        );
    }
    // Only the victim's users moved, and they spread over both survivors.
    let after_kill: Vec<(String, usize)> = backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            b.upstreams()
                .into_iter()
                .filter(|a| a.seq > kill_seq)
                .map(move |a| (a.request.user, i))
        })
        .collect();
    let mut moved_to = HashSet::new();
    for (user, i) in &after_kill {
        ensure!(*i != victim, "the stopped member took {user}'s request");
        if home[user] == victim {
            moved_to.insert(*i);
        } else {
            ensure!(*i == home[user], "{user} moved from member {} to {i}", home[user]);
        }
    }
    ensure!(
        moved_to.len() == 2,
        "the victim's users went to {moved_to:?} only"
    );
    let s = c.stats();
    ensure!(s.upstream_retries > 0, "no retry was counted: {s:?}");

    // Phase 3: the member comes back; after its cool-down a probe readmits it and its users return.
    backends[victim].restart().await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The first round after the cool-down readmits the member (its probe); the next is checked.
    let mut checked_from = 0;
    for round in 0..2 {
        if round == 1 {
            checked_from = backends
                .iter()
                .flat_map(|b| b.upstreams())
                .map(|a| a.seq)
                .max()
                .unwrap_or(0);
        }
        let mut pending = Vec::new();
        for u in &users {
            next_id += 1;
            pending.push(c.upstream(&a, 1, u, "d", next_id, Bytes::from_static(b"z"))?);
            sent.entry(u.clone()).or_default().push(next_id);
        }
        for rx in pending {
            ensure!(
                outcome(rx, Duration::from_secs(10)).await?.is_ok(),
                "phase 3 request failed"
            );
        }
    }
    for (i, b) in backends.iter().enumerate() {
        for a in b.upstreams().into_iter().filter(|a| a.seq > checked_from) {
            let user = &a.request.user;
            ensure!(
                home[user] == i,
                "{user} is on member {i}, its home is {}",
                home[user]
            );
        }
    }
    ensure!(
        backends[victim]
            .upstreams()
            .iter()
            .filter(|a| a.seq > checked_from)
            .count()
            == home.values().filter(|i| **i == victim).count(),
        "the readmitted member did not get all its users back"
    );
    let s = c.stats();
    assert_eq!(s.apps[0].unhealthy, 0, "{s:?}");
    // Order still holds over the whole run.
    for (user, got) in arrivals(&refs) {
        let mut seen = HashSet::new();
        let firsts: Vec<u64> = got
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| seen.insert(*id))
            .collect();
        ensure!(firsts == sent[&user], "{user} reordered over the run");
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_group_fills_the_queue_then_ends_unavailable_by_the_deadline() -> Result<()> {
    init_tracing();
    let mut config = fast_config();
    config.queue_capacity = 20;
    config.upstream_deadline = Duration::from_secs(1);
    let (c, _stop) = coordinator(config);
    let a = app("app1", vec![dead_endpoint().await?]);
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..20 {
        pending.push(c.upstream(&a, 1, &format!("user-{}", i % 10), "d", i, Bytes::new())?);
    }
    let refused_at = Instant::now();
    let refused = c.upstream(&a, 1, "user-x", "d", 99, Bytes::new());
    ensure!(
        refused_at.elapsed() < Duration::from_millis(50),
        "a full queue made the caller wait"
    );
    assert_eq!(
        refused.err(),
        Some(UpstreamError::QueueFull { app: "app1".into() })
    );
    let s = c.stats();
    assert_eq!(
        (s.upstream_queue_full, s.upstream_depth, s.apps[0].queue_depth),
        (1, 20, 20)
    );

    for rx in pending {
        let got = outcome(rx, Duration::from_secs(3)).await?;
        assert_eq!(got, Err(UpstreamFailure::Unavailable(NO_HEALTHY_BACKEND.into())));
    }
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "queued requests ended after {took:?}, deadline 1s"
    );
    let s = c.stats();
    assert_eq!((s.upstream_unavailable, s.upstream_depth), (20, 0));
    assert_eq!((s.apps[0].members, s.apps[0].unhealthy), (1, 1));
    // Room again once the queue drained.
    ensure!(c.upstream(&a, 1, "user-y", "d", 100, Bytes::new()).is_ok());
    Ok(())
}

#[tokio::test]
async fn one_connection_cannot_take_more_than_its_share_of_the_apps_queue() -> Result<()> {
    init_tracing();
    let b = TestBackend::start().await?;
    b.set_mode(Mode::Hang);
    let mut config = fast_config();
    config.queue_capacity = 20;
    config.queue_share_per_conn = 5;
    let (c, _stop) = coordinator(config);
    let a = app("app1", vec![b.endpoint()]);
    // Connection 1 sends for several users: its five requests (queued or in flight) are its share.
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(c.upstream(&a, 1, &format!("user-{i}"), "d", i, Bytes::new())?);
    }
    let refused = c.upstream(&a, 1, "user-9", "d", 9, Bytes::new());
    assert_eq!(
        refused.err(),
        Some(UpstreamError::ConnShareFull {
            app: "app1".into(),
            share: 5
        })
    );
    // Another connection still gets room in the same app's queue.
    pending.push(c.upstream(&a, 2, "user-9", "d", 10, Bytes::new())?);
    assert_eq!(c.stats().apps[0].queue_depth, 6);
    // Once connection 1's requests end, its share is free again.
    b.set_mode(Mode::Reply);
    for rx in pending {
        ensure!(outcome(rx, Duration::from_secs(5)).await?.is_ok());
    }
    let rx = c.upstream(&a, 1, "user-9", "d", 11, Bytes::new())?;
    ensure!(outcome(rx, Duration::from_secs(5)).await?.is_ok());
    Ok(())
}

#[tokio::test]
async fn a_backend_error_status_fails_at_once_without_retries() -> Result<()> {
    init_tracing();
    let b = TestBackend::start().await?;
    b.set_mode(Mode::Fail(tonic::Code::InvalidArgument));
    let (c, _stop) = coordinator(fast_config());
    let a = app("app1", vec![b.endpoint()]);
    let started = Instant::now();
    let got = outcome(
        c.upstream(&a, 1, "u", "d", 1, Bytes::new())?,
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(
        got,
        Err(UpstreamFailure::Failed {
            code: tonic::Code::InvalidArgument,
            message: "test backend told to fail".into()
        })
    );
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(b.upstream_calls(), 1, "a final error was retried");
    let s = c.stats();
    assert_eq!(
        (s.upstream_failed, s.upstream_retries, s.apps[0].unhealthy),
        (1, 0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn unavailable_is_retried_until_the_backend_recovers() -> Result<()> {
    init_tracing();
    let b = TestBackend::start().await?;
    b.set_mode(Mode::Fail(tonic::Code::Unavailable));
    let (c, _stop) = coordinator(fast_config());
    let a = app("app1", vec![b.endpoint()]);
    let rx = c.upstream(&a, 1, "u", "d", 1, Bytes::from_static(b"p"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.set_mode(Mode::Reply);
    let got = outcome(rx, Duration::from_secs(5)).await?;
    assert_eq!(got, Ok(Bytes::from_static(b"p")));
    ensure!(b.upstream_calls() >= 2, "{} calls", b.upstream_calls());
    ensure!(c.stats().upstream_retries >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_taken_out_and_its_users_fail_over() -> Result<()> {
    init_tracing();
    let good = TestBackend::start().await?;
    let hung = TestBackend::start().await?;
    hung.set_mode(Mode::Hang);
    let mut config = fast_config();
    config.attempt_timeout = Duration::from_millis(400);
    let (c, _stop) = coordinator(config);
    let a = app("app1", vec![good.endpoint(), hung.endpoint()]);
    let started = Instant::now();
    let mut pending = Vec::new();
    for u in 0..20 {
        pending.push(c.upstream(&a, 1, &format!("user-{u}"), "d", u, Bytes::new())?);
    }
    for rx in pending {
        ensure!(outcome(rx, Duration::from_secs(5)).await?.is_ok());
    }
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    ensure!(hung.upstream_calls() >= 1, "no user was homed on the hung member");
    assert_eq!(good.upstreams().len(), 20);
    assert_eq!(c.stats().apps[0].unhealthy, 1);
    Ok(())
}

#[tokio::test]
async fn a_changed_callbacks_list_takes_effect_on_the_next_request() -> Result<()> {
    let old = TestBackend::start().await?;
    let new = TestBackend::start().await?;
    let (c, _stop) = coordinator(fast_config());
    let rx = c.upstream(&app("app1", vec![old.endpoint()]), 1, "u", "d", 1, Bytes::new())?;
    ensure!(outcome(rx, Duration::from_secs(5)).await?.is_ok());
    let rx = c.upstream(&app("app1", vec![new.endpoint()]), 1, "u", "d", 2, Bytes::new())?;
    ensure!(outcome(rx, Duration::from_secs(5)).await?.is_ok());
    assert_eq!((old.upstreams().len(), new.upstreams().len()), (1, 1));
    assert_eq!(new.upstreams()[0].request.request_id, 2);
    Ok(())
}

#[tokio::test]
async fn shutdown_resolves_queued_and_in_flight_requests() -> Result<()> {
    let b = TestBackend::start().await?;
    b.set_mode(Mode::Hang);
    let (c, stop) = coordinator(fast_config());
    let a = app("app1", vec![b.endpoint()]);
    let first = c.upstream(&a, 1, "u", "d", 1, Bytes::new())?;
    let second = c.upstream(&a, 1, "u", "d", 2, Bytes::new())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.upstream_calls() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the first request never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    for rx in [first, second] {
        let got = outcome(rx, Duration::from_millis(500)).await?;
        assert_eq!(
            got,
            Err(UpstreamFailure::Unavailable("the node is shutting down".into()))
        );
    }
    tokio::time::timeout(Duration::from_secs(1), c.wait_stopped())
        .await
        .context("upstream tasks did not stop")?;
    Ok(())
}

#[test]
fn config_validation_names_the_bad_field() {
    assert!(CoordinatorConfig::standard().validate().is_ok());
    let mut c = CoordinatorConfig::standard();
    c.queue_capacity = 0;
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "invalid coordinator config: queue_capacity must be greater than zero"
    );
    let mut c = CoordinatorConfig::standard();
    c.cooldown_max = Duration::from_millis(1);
    assert!(c.validate().unwrap_err().to_string().contains("cooldown_max"));
}

// ---- state callbacks --------------------------------------------------------------------------

/// Wakes the coordinator's event sender when the outbox grows, as the node's observer does.
struct Wake(Coordinator);

impl ApplyObserver for Wake {
    fn applied(&self, _log_index: u64, events: Vec<ApplyEvent>) {
        if events.iter().any(|e| matches!(e, ApplyEvent::EventsPending)) {
            self.0.events_pending();
        }
    }
}

/// A single-member cluster on a temp dir serving its raft service on loopback.
struct OneNode {
    raft: RaftNode,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl OneNode {
    async fn start(observer: Arc<dyn ApplyObserver>) -> Result<OneNode> {
        let dir = tempfile::tempdir()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let peers = BTreeMap::from([(1u64, addr.to_string())]);
        let mut config = RaftConfig::standard(1, dir.path().to_path_buf(), addr.to_string(), peers);
        config.heartbeat_ms = 50;
        config.election_timeout_min_ms = 150;
        config.election_timeout_max_ms = 300;
        let raft = RaftNode::start(config, observer).await?;
        let stop = CancellationToken::new();
        let svc = raft.grpc_service();
        let signal = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
                .await;
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        while !raft.is_leader() {
            if Instant::now() > deadline {
                bail!("the single member did not become leader");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(OneNode {
            raft,
            stop,
            _dir: dir,
        })
    }

    async fn register(&self, app: &str, user: &str) -> Result<u64> {
        let op = Op::Register(Register {
            app: app.into(),
            user: user.into(),
            device: "phone".into(),
            platform: "ios".into(),
            node: 1,
            conn: 1,
            session: 1,
        });
        match self.raft.write_one(op).await? {
            (OpResult::Registered(r), _) => Ok(r.epoch),
            (other, _) => bail!("register answered {other:?}"),
        }
    }

    async fn unregister(&self, app: &str, user: &str, epoch: u64) -> Result<()> {
        let op = Op::Unregister {
            app: app.into(),
            user: user.into(),
            device: "phone".into(),
            epoch,
        };
        self.raft.write_one(op).await?;
        Ok(())
    }

    /// Waits until the outbox is empty (EventsDone committed for everything in it).
    async fn outbox_drained(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.raft.reader().events_since(0, 100)?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("outbox still holds {left:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(self) {
        self.raft.shutdown().await;
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_events_reach_the_backend_at_least_once_then_leave_the_outbox() -> Result<()> {
    init_tracing();
    let b = TestBackend::start().await?;
    let (c, stop) = coordinator(fast_config());
    let node = OneNode::start(Arc::new(Wake(c.clone()))).await?;
    let sender = tokio::spawn({
        let c = c.clone();
        let raft = node.raft.clone();
        let stop = stop.clone();
        async move { c.run_event_sender(raft, stop).await }
    });
    node.raft
        .write_one(Op::PutApp(app("app1", vec![b.endpoint()])))
        .await?;

    // Online then offline, with the outbox ids as dedupe keys.
    let epoch = node.register("app1", "alice").await?;
    node.unregister("app1", "alice", epoch).await?;
    ensure!(
        b.wait_events(2, Duration::from_secs(5)).await,
        "events did not arrive"
    );
    let got = b.events();
    let summary: Vec<(String, i32, String, u64)> = got
        .iter()
        .map(|e| (e.key.clone(), e.kind, e.user.clone(), e.epoch))
        .collect();
    assert_eq!(
        summary[..2],
        [
            (
                "app1:1".to_string(),
                SessionEventKind::Online as i32,
                "alice".to_string(),
                epoch
            ),
            (
                "app1:2".to_string(),
                SessionEventKind::Offline as i32,
                "alice".to_string(),
                epoch
            ),
        ]
    );
    assert_eq!(
        (
            got[0].app.as_str(),
            got[0].device.as_str(),
            got[0].platform.as_str(),
            got[0].node_id
        ),
        ("app1", "phone", "ios", 1)
    );
    node.outbox_drained(Duration::from_secs(5)).await?;
    ensure!(c.stats().events_done_commits >= 1);

    // The backend is down for a while: events wait in the outbox, then arrive, none lost.
    b.stop().await;
    let epoch = node.register("app1", "bob").await?;
    node.unregister("app1", "bob", epoch).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = node.raft.reader().events_since(0, 100)?;
    assert_eq!(
        held.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![3, 4],
        "events left the outbox unsent"
    );
    ensure!(c.stats().event_send_failures >= 1, "{:?}", c.stats());
    b.restart().await?;
    ensure!(
        b.wait_events(4, Duration::from_secs(10)).await,
        "events were lost: {:?}",
        b.events()
    );
    node.outbox_drained(Duration::from_secs(5)).await?;

    // Every key came at least once, and every copy of a key is the same event.
    let mut by_key: HashMap<String, Vec<_>> = HashMap::new();
    for e in b.events() {
        by_key.entry(e.key.clone()).or_default().push(e);
    }
    let keys: HashSet<&str> = by_key.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, HashSet::from(["app1:1", "app1:2", "app1:3", "app1:4"]));
    for (key, copies) in &by_key {
        ensure!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "{key} differs between copies: {copies:?}"
        );
    }
    assert_eq!(by_key["app1:3"][0].user, "bob");
    assert_eq!(by_key["app1:4"][0].kind, SessionEventKind::Offline as i32);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), sender).await??;
    node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_deleted_app_are_skipped_not_blocking() -> Result<()> {
    init_tracing();
    let (c, stop) = coordinator(fast_config());
    let node = OneNode::start(Arc::new(Wake(c.clone()))).await?;
    tokio::spawn({
        let c = c.clone();
        let raft = node.raft.clone();
        let stop = stop.clone();
        async move { c.run_event_sender(raft, stop).await }
    });
    // A backend that never answers: the event stays until the app is deleted.
    node.raft
        .write_one(Op::PutApp(app("gone", vec![dead_endpoint().await?])))
        .await?;
    node.register("gone", "carol").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.raft.reader().events_since(0, 10)?.len(), 1);
    node.raft.write_one(Op::DeleteApp { app: "gone".into() }).await?;
    c.events_pending();
    node.outbox_drained(Duration::from_secs(5)).await?;
    let s = c.stats();
    ensure!(s.events_skipped == 1 && s.events_sent == 0, "{s:?}");
    stop.cancel();
    node.shutdown().await;
    Ok(())
}
