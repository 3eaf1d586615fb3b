//! The SDK (`herald-client`) against real node processes: failover after kill -9, a whole-cluster
//! restart, token expiry, TLS with the dev CA, dead seeds, Dispatch.
//!
//! Every delivery assertion is on message ids and seqs: each QoS-1 push the cluster acknowledged
//! reaches the app exactly once, in seq order, whatever happened to the nodes in between.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_client::{
    BackoffConfig, BoxError, Client, ClientBuilder, DisconnectReason, Event, Events, Message, TlsConfig,
};
use herald_proto::v1 as pb;

use crate::harness::{connect, eventually, free_port, App, Cluster, NODE_WAIT};

/// How long a test waits for its client to see what it expects.
pub const CLIENT_WAIT: Duration = Duration::from_secs(60);

/// The client heartbeat of clusters whose tests bound the dead-link detection.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A reconnect backoff short enough for tests (the cluster's default goes up to 30 s).
pub fn quick_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(2),
        reset_after: Duration::from_secs(10),
    }
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `user` of `app` (any device) valid for `ttl_s` seconds.
pub fn token(app: &App, user: &str, ttl_s: u64) -> String {
    let now = now_s();
    herald_node::token::mint(
        &herald_node::token::Claims {
            app: app.id.clone(),
            sub: user.into(),
            dev: None,
            iat: now,
            exp: now + ttl_s,
        },
        &app.secret,
    )
}

/// Every node's gRPC address (Dispatch seeds).
pub fn seeds(c: &Cluster) -> Vec<String> {
    c.ids()
        .into_iter()
        .map(|id| c.grpc_addr(id).to_string())
        .collect()
}

/// Every node's client address.
pub fn client_addrs(c: &Cluster) -> Vec<String> {
    c.ids()
        .into_iter()
        .map(|id| c.client_addr(id).to_string())
        .collect()
}

/// A client of `app` for `user` on device `phone` with a 1 h token and a quick backoff.
pub fn client(app: &App, user: &str) -> ClientBuilder {
    Client::builder(&app.id, user, "phone")
        .token(token(app, user, 3600))
        .backoff(quick_backoff())
}

/// A session's event stream with everything it yielded so far.
pub struct Inbox {
    pub events: Events,
    pub messages: Vec<Message>,
    /// (node id, address, when) of every `Connected`.
    pub connected: Vec<(u64, String, Instant)>,
    /// Every `Disconnected` reason.
    pub disconnected: Vec<DisconnectReason>,
    /// A line per event, for failure messages.
    pub log: Vec<String>,
    /// The stream ended.
    pub ended: bool,
}

impl Inbox {
    pub fn new(events: Events) -> Inbox {
        Inbox {
            events,
            messages: Vec::new(),
            connected: Vec::new(),
            disconnected: Vec::new(),
            log: Vec::new(),
            ended: false,
        }
    }

    /// Takes the next event (recording it); `None` at the end of the stream or after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<Event> {
        if self.ended {
            return None;
        }
        let ev = match tokio::time::timeout(limit, self.events.next()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                self.ended = true;
                self.log.push("<end of stream>".into());
                return None;
            }
            Err(_) => return None,
        };
        let mut line = format!("{ev:?}");
        line.truncate(300);
        self.log.push(line);
        match &ev {
            Event::Message(m) => self.messages.push(m.clone()),
            Event::Connected { node_id, addr, .. } => {
                self.connected.push((*node_id, addr.clone(), Instant::now()))
            }
            Event::Disconnected { reason } => self.disconnected.push(reason.clone()),
            _ => {}
        }
        Some(ev)
    }

    /// Takes events until `done` holds; panics after `limit` with what arrived.
    pub async fn until(&mut self, what: &str, limit: Duration, done: impl Fn(&Inbox) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || (self.next(left).await.is_none() && self.ended && !done(self)) {
                panic!(
                    "waited {limit:?} for {what}; {} messages; events:\n{}",
                    self.messages.len(),
                    self.tail(40)
                );
            }
        }
    }

    /// Waits for the next `Connected`; returns its node id.
    pub async fn connected(&mut self, limit: Duration) -> u64 {
        let n = self.connected.len();
        self.until("Connected", limit, |i| i.connected.len() > n).await;
        self.connected[n].0
    }

    /// Waits until `n` messages arrived in all.
    pub async fn messages(&mut self, n: usize, limit: Duration) {
        self.until(&format!("{n} messages"), limit, |i| i.messages.len() >= n)
            .await
    }

    /// Asserts that nothing arrives for `d` (no duplicate, nothing unexpected).
    pub async fn quiet_for(&mut self, d: Duration) {
        let n = self.messages.len();
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if self.next(left).await.is_none() {
                break;
            }
        }
        assert_eq!(self.messages.len(), n, "unexpected messages:\n{}", self.tail(20));
    }

    pub fn ids(&self) -> Vec<String> {
        self.messages.iter().map(|m| m.msg_id.clone()).collect()
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.messages.iter().map(|m| m.seq).collect()
    }

    pub fn payloads(&self) -> Vec<String> {
        self.messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    pub fn tail(&self, n: usize) -> String {
        self.log[self.log.len().saturating_sub(n)..].join("\n")
    }
}

/// Asserts that `inbox` holds exactly the messages `pushed` (msg ids, in order) with seqs 1..=n.
#[track_caller]
pub fn assert_exactly_once(inbox: &Inbox, pushed: &[pb::PushReply], user: &str) {
    let want_ids: Vec<String> = pushed.iter().map(|r| r.msg_id.clone()).collect();
    let want_seqs: Vec<u64> = pushed
        .iter()
        .map(|r| {
            r.seqs
                .iter()
                .find(|s| s.user == user)
                .expect("seq for the user")
                .seq
        })
        .collect();
    let unique: BTreeSet<&String> = inbox.messages.iter().map(|m| &m.msg_id).collect();
    assert_eq!(
        unique.len(),
        inbox.messages.len(),
        "a message reached the app twice:\n{}",
        inbox.tail(40)
    );
    assert_eq!(inbox.ids(), want_ids, "ids\n{}", inbox.tail(40));
    assert_eq!(inbox.seqs(), want_seqs, "seqs\n{}", inbox.tail(40));
    assert_eq!(
        want_seqs,
        (1..=pushed.len() as u64).collect::<Vec<_>>(),
        "the cluster numbered the pushes 1..=n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_on_a_killed_node_resumes_elsewhere_and_gets_what_was_pushed_meanwhile() {
    // A 1 s heartbeat bounds the dead-link detection (two missed heartbeats) used below.
    let mut c = Cluster::new(3).node_args(&["--client-heartbeat-ms", &HEARTBEAT.as_millis().to_string()]);
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("failover").await;
    let (_client, events) = client(&app, "alice")
        .dispatch_seeds(seeds(&c))
        .connect()
        .await
        .unwrap();
    let mut inbox = Inbox::new(events);
    let home = inbox.connected(CLIENT_WAIT).await;
    let others: Vec<u64> = c.ids().into_iter().filter(|id| *id != home).collect();
    let mut pushed = Vec::new();
    for i in 0..5 {
        let via = c.grpc_addr(others[i % 2]).to_string();
        pushed.push(
            app.push_acked(&via, "alice", &format!("before-{i}"), &format!("b{i}"))
                .await,
        );
    }
    inbox.messages(5, CLIENT_WAIT).await;

    c.kill9(home);
    let killed = Instant::now();
    // Pushed while the client is away from any node (acknowledged: stored on a majority).
    for i in 0..10 {
        let via = c.grpc_addr(others[i % 2]).to_string();
        pushed.push(
            app.push_acked(&via, "alice", &format!("during-{i}"), &format!("d{i}"))
                .await,
        );
    }
    inbox.connected(CLIENT_WAIT).await;
    let (node, _, at) = inbox.connected.last().cloned().unwrap();
    assert_ne!(node, home, "reconnected to a live node");
    let took = at - killed;
    // The bound, from the client's settings:
    // - detection: kill -9 closes the node's sockets, so the client reads EOF at once; were the
    //   FIN lost, silence for two heartbeats (2 x 1 s) ends the link;
    // - backoff (full jitter, 200 ms doubling, capped at 2 s): the link was the first one, so the
    //   windows are 0.2, 0.4, 0.8 s; up to three failed attempts (the killed node listed first
    //   again, a handshake refused during the election) wait at most 1.4 s, within one cap;
    // - 3 s margin: a leader election if the leader died (about 0.2-0.4 s plus its lease),
    //   connect, handshake and the session's open, on a loaded 2-core machine.
    let bound = 2 * HEARTBEAT + quick_backoff().max + Duration::from_secs(3);
    assert!(
        took <= bound,
        "reconnect took {took:?}, more than {bound:?}:\n{}",
        inbox.tail(20)
    );
    inbox.messages(15, CLIENT_WAIT).await;
    let last = app.push_acked(c.grpc_addr(node), "alice", "after", "a0").await;
    pushed.push(last);
    inbox.messages(16, CLIENT_WAIT).await;
    inbox.quiet_for(Duration::from_millis(500)).await;
    assert_exactly_once(&inbox, &pushed, "alice");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_resume_after_every_node_was_killed_and_restarted() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("restart").await;
    // One client finds nodes through Dispatch, one has a static list.
    let (_a, ev) = client(&app, "alice")
        .dispatch_seeds(seeds(&c))
        .connect()
        .await
        .unwrap();
    let mut alice = Inbox::new(ev);
    let (_b, ev) = client(&app, "bob")
        .nodes(client_addrs(&c))
        .connect()
        .await
        .unwrap();
    let mut bob = Inbox::new(ev);
    alice.connected(CLIENT_WAIT).await;
    bob.connected(CLIENT_WAIT).await;
    // Carol's device registered once and went away: everything for her waits in the store.
    {
        let (carol, ev) = client(&app, "carol")
            .nodes(client_addrs(&c))
            .connect()
            .await
            .unwrap();
        let mut inbox = Inbox::new(ev);
        inbox.connected(CLIENT_WAIT).await;
        carol.close().await.unwrap();
    }
    let (mut to_alice, mut to_bob, mut to_carol) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        to_alice.push(
            app.push_acked(c.grpc_addr(1), "alice", &format!("a{i}"), &format!("a{i}"))
                .await,
        );
        to_bob.push(
            app.push_acked(c.grpc_addr(2), "bob", &format!("b{i}"), &format!("b{i}"))
                .await,
        );
    }
    alice.messages(3, CLIENT_WAIT).await;
    bob.messages(3, CLIENT_WAIT).await;
    // Right before the power cut: acknowledged, maybe delivered, maybe acked by the client.
    for i in 3..6 {
        to_alice.push(
            app.push_acked(c.grpc_addr(3), "alice", &format!("a{i}"), &format!("a{i}"))
                .await,
        );
        to_bob.push(
            app.push_acked(c.grpc_addr(3), "bob", &format!("b{i}"), &format!("b{i}"))
                .await,
        );
        to_carol.push(
            app.push_acked(c.grpc_addr(3), "carol", &format!("c{i}"), &format!("c{i}"))
                .await,
        );
    }
    c.kill9_all();
    for id in c.ids() {
        c.restart(id);
    }
    c.wait_leader().await;
    for i in 6..9 {
        to_alice.push(
            app.push_acked(c.grpc_addr(2), "alice", &format!("a{i}"), &format!("a{i}"))
                .await,
        );
        to_bob.push(
            app.push_acked(c.grpc_addr(1), "bob", &format!("b{i}"), &format!("b{i}"))
                .await,
        );
    }
    alice.messages(9, CLIENT_WAIT).await;
    bob.messages(9, CLIENT_WAIT).await;
    assert!(
        alice.connected.len() >= 2,
        "alice reconnected:\n{}",
        alice.tail(20)
    );
    assert!(bob.connected.len() >= 2, "bob reconnected:\n{}", bob.tail(20));
    // Carol comes back with a new client (an app restart without a cursor store).
    let (_c, ev) = client(&app, "carol")
        .dispatch_seeds(seeds(&c))
        .connect()
        .await
        .unwrap();
    let mut carol = Inbox::new(ev);
    carol.messages(3, CLIENT_WAIT).await;
    alice.quiet_for(Duration::from_millis(300)).await;
    bob.quiet_for(Duration::from_millis(300)).await;
    carol.quiet_for(Duration::from_millis(300)).await;
    assert_exactly_once(&alice, &to_alice, "alice");
    assert_exactly_once(&bob, &to_bob, "bob");
    assert_eq!(
        carol.ids(),
        to_carol.iter().map(|r| r.msg_id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(carol.seqs(), vec![1, 2, 3]);
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_tokens_are_renewed_and_the_session_goes_on_without_loss() {
    let c = Cluster::start(3).await;
    let app = c.create_app("tokens").await;
    const TTL: u64 = 3;
    // Alice's provider mints a fresh token on every call: the SDK refreshes before expiry (or,
    // if late, is kicked with TOKEN_EXPIRED and reopens).
    let alice_calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let (app, calls) = (app.clone(), alice_calls.clone());
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let t = token(&app, "alice", TTL);
            async move { Ok::<_, BoxError>(t) }
        }
    };
    let (_a, ev) = Client::builder(&app.id, "alice", "phone")
        .token_provider(provider)
        .dispatch_seeds(seeds(&c))
        .backoff(quick_backoff())
        .connect()
        .await
        .unwrap();
    let mut alice = Inbox::new(ev);
    // Bob's provider caches its token until it expired, as an app's token cache would: the
    // refresh attempt gets the same token, so the server ends the session at expiry
    // (KICKED TOKEN_EXPIRED) and the SDK asks again and reopens.
    let bob_calls = Arc::new(AtomicUsize::new(0));
    let cached = Arc::new(parking_lot::Mutex::new((String::new(), 0u64)));
    let provider = {
        let (app, calls) = (app.clone(), bob_calls.clone());
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut c = cached.lock();
            if c.1 <= now_s() {
                *c = (token(&app, "bob", TTL), now_s() + TTL);
            }
            let t = c.0.clone();
            async move { Ok::<_, BoxError>(t) }
        }
    };
    let (_b, ev) = Client::builder(&app.id, "bob", "phone")
        .token_provider(provider)
        .nodes(client_addrs(&c))
        .backoff(quick_backoff())
        .connect()
        .await
        .unwrap();
    let mut bob = Inbox::new(ev);
    alice.connected(CLIENT_WAIT).await;
    bob.connected(CLIENT_WAIT).await;

    // Pushes over about 10 s: three token lifetimes.
    let (mut to_alice, mut to_bob) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(10) {
        let via = c.grpc_addr(1 + (i % 3) as u64).to_string();
        to_alice.push(
            app.push_acked(&via, "alice", &format!("a{i}"), &format!("a{i}"))
                .await,
        );
        to_bob.push(
            app.push_acked(&via, "bob", &format!("b{i}"), &format!("b{i}"))
                .await,
        );
        i += 1;
        // Drain events meanwhile so the clients are never held up by the test.
        let _ = alice.next(Duration::from_millis(100)).await;
        let _ = bob.next(Duration::from_millis(100)).await;
    }
    alice.messages(to_alice.len(), CLIENT_WAIT).await;
    bob.messages(to_bob.len(), CLIENT_WAIT).await;
    alice.quiet_for(Duration::from_millis(300)).await;
    bob.quiet_for(Duration::from_millis(300)).await;
    assert_exactly_once(&alice, &to_alice, "alice");
    assert_exactly_once(&bob, &to_bob, "bob");
    assert!(!alice.ended && !bob.ended, "the sessions go on");
    assert!(
        alice_calls.load(Ordering::SeqCst) >= 3,
        "alice's provider was asked again: {} calls",
        alice_calls.load(Ordering::SeqCst)
    );
    assert!(
        bob_calls.load(Ordering::SeqCst) >= 3,
        "bob's provider was asked again: {} calls",
        bob_calls.load(Ordering::SeqCst)
    );
    assert!(
        bob.disconnected.contains(&DisconnectReason::TokenExpired),
        "bob's session was ended by the server at expiry and reopened:\n{}",
        bob.tail(30)
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_the_dev_ca_through_static_nodes_and_dispatch() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = herald_node::room::tls::dev_pki(pki_dir.path()).unwrap();
    let mut c = Cluster::new(3);
    let mut tls_addrs = Vec::new();
    for id in c.ids() {
        let addr = format!("127.0.0.1:{}", free_port());
        tls_addrs.push(addr.clone());
        c.spec_mut(id).extra_args.extend([
            "--tls-addr".into(),
            addr,
            "--tls-cert".into(),
            pki.cert.display().to_string(),
            "--tls-key".into(),
            pki.key.display().to_string(),
        ]);
    }
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("tls").await;
    let tls = TlsConfig::from_ca_pem_file(&pki.ca).unwrap();
    let (_a, ev) = client(&app, "alice")
        .nodes(tls_addrs.clone())
        .tls(tls.clone())
        .connect()
        .await
        .unwrap();
    let mut alice = Inbox::new(ev);
    // Dispatch is asked for the TLS transport and answers the TLS addresses.
    let (_b, ev) = client(&app, "bob")
        .dispatch_seeds(seeds(&c))
        .tls(tls)
        .connect()
        .await
        .unwrap();
    let mut bob = Inbox::new(ev);
    alice.connected(CLIENT_WAIT).await;
    bob.connected(CLIENT_WAIT).await;
    assert!(tls_addrs.contains(&alice.connected[0].1), "{:?}", alice.connected);
    assert!(tls_addrs.contains(&bob.connected[0].1), "{:?}", bob.connected);
    let a = vec![app.push_acked(c.grpc_addr(1), "alice", "over tls", "k1").await];
    let b = vec![app.push_acked(c.grpc_addr(2), "bob", "over tls too", "k2").await];
    alice.messages(1, CLIENT_WAIT).await;
    bob.messages(1, CLIENT_WAIT).await;
    assert_exactly_once(&alice, &a, "alice");
    assert_exactly_once(&bob, &b, "bob");
    assert_eq!(alice.payloads(), vec!["over tls"]);

    // A client that trusts another CA never gets a session.
    let other = tempfile::tempdir().unwrap();
    let other_pki = herald_node::room::tls::dev_pki(other.path()).unwrap();
    let (_x, ev) = client(&app, "mallory")
        .nodes(tls_addrs.clone())
        .tls(TlsConfig::from_ca_pem_file(&other_pki.ca).unwrap())
        .connect()
        .await
        .unwrap();
    let mut mallory = Inbox::new(ev);
    assert!(
        mallory.next(Duration::from_secs(2)).await.is_none(),
        "{}",
        mallory.tail(5)
    );
    assert!(mallory.connected.is_empty());
}

/// A stand-in for an address that is down: it accepts every connection and closes it at once (the
/// client sees its handshake fail, as with a node that died), counting the attempts.
struct DeadEnd {
    addr: String,
    tried: Arc<AtomicUsize>,
}

impl DeadEnd {
    async fn bind() -> DeadEnd {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let tried = Arc::new(AtomicUsize::new(0));
        let count = tried.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        DeadEnd { addr, tried }
    }

    fn tried(&self) -> usize {
        self.tried.load(Ordering::SeqCst)
    }
}

/// An address in front of `upstream` that acts like a [`DeadEnd`] until every one of `dead` was
/// tried at least once, and forwards to `upstream` from then on. Lists start at a random entry
/// (against reconnect storms), so with a plain live entry a client may never touch the dead ones;
/// behind this gate it reaches the live node only after it went past each dead one.
async fn gate(upstream: String, dead: &[&DeadEnd]) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dead: Vec<Arc<AtomicUsize>> = dead.iter().map(|d| d.tried.clone()).collect();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if dead.iter().any(|t| t.load(Ordering::SeqCst) == 0) {
                drop(inbound);
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_seeds_and_dead_nodes_first_in_the_lists_are_skipped() {
    let c = Cluster::start(3).await;
    let app = c.create_app("dead-seeds").await;
    // Alice knows three gRPC seeds, two of them dead; the live one (node 2) opens only once both
    // dead ones were tried. Bob likewise with three client addresses, the live one node 3's.
    let dead_seeds = [DeadEnd::bind().await, DeadEnd::bind().await];
    let live_seed = gate(c.grpc_addr(2).to_string(), &[&dead_seeds[0], &dead_seeds[1]]).await;
    let dead_nodes = [DeadEnd::bind().await, DeadEnd::bind().await];
    let live_node = gate(c.client_addr(3).to_string(), &[&dead_nodes[0], &dead_nodes[1]]).await;
    let (_a, ev) = client(&app, "alice")
        .dispatch_seeds([dead_seeds[0].addr.clone(), dead_seeds[1].addr.clone(), live_seed])
        .connect()
        .await
        .unwrap();
    let mut alice = Inbox::new(ev);
    let (_b, ev) = client(&app, "bob")
        .nodes([
            dead_nodes[0].addr.clone(),
            dead_nodes[1].addr.clone(),
            live_node.clone(),
        ])
        .connect()
        .await
        .unwrap();
    let mut bob = Inbox::new(ev);
    alice.connected(CLIENT_WAIT).await;
    let bob_node = bob.connected(CLIENT_WAIT).await;
    assert_eq!(bob_node, 3, "the only live node of bob's list");
    assert_eq!(bob.connected[0].1, live_node);
    // Each dead entry was tried and skipped (the gates stay shut until then).
    for d in dead_seeds.iter().chain(&dead_nodes) {
        assert!(d.tried() >= 1, "{} was never tried", d.addr);
    }
    let a = vec![app.push_acked(c.grpc_addr(1), "alice", "hi", "k1").await];
    let b = vec![app.push_acked(c.grpc_addr(1), "bob", "hi", "k2").await];
    alice.messages(1, CLIENT_WAIT).await;
    bob.messages(1, CLIENT_WAIT).await;
    assert_exactly_once(&alice, &a, "alice");
    assert_exactly_once(&bob, &b, "bob");
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatch_answers_the_cluster_nodes_and_the_sdk_follows_its_order() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("dispatch").await;
    // What any node answers for (app, alice): every member's client address, best first. Every
    // node gives the same order once each has heard from its peers.
    let answer = eventually(
        "Dispatch on every node to list the three nodes alike",
        NODE_WAIT,
        || async {
            let mut answers = Vec::new();
            for id in 1..=3 {
                let r = connect(c.grpc_addr(id))
                    .await?
                    .dispatch(pb::DispatchRequest {
                        app: app.id.clone(),
                        user: "alice".into(),
                        transport: "tcp".into(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(r.nodes.len() == 3, "{r:?}");
                answers.push(r);
            }
            anyhow::ensure!(
                answers.windows(2).all(|w| w[0].nodes == w[1].nodes),
                "{answers:?}"
            );
            Ok(answers.remove(0))
        },
    )
    .await;
    let listed: BTreeSet<String> = answer.nodes.iter().map(|n| n.addr.clone()).collect();
    assert_eq!(listed, client_addrs(&c).into_iter().collect::<BTreeSet<_>>());
    assert!(
        answer.heartbeat_ms > 0 && answer.backoff_initial_ms > 0,
        "{answer:?}"
    );
    // The client knows only gRPC seeds: any client address it uses came from Dispatch, and it
    // starts with the best one.
    let (_a, ev) = Client::builder(&app.id, "alice", "phone")
        .token(token(&app, "alice", 3600))
        .dispatch_seeds(seeds(&c))
        .backoff(quick_backoff())
        .connect()
        .await
        .unwrap();
    let mut alice = Inbox::new(ev);
    let first = alice.connected(CLIENT_WAIT).await;
    assert_eq!(alice.connected[0].1, answer.nodes[0].addr, "{answer:?}");
    assert_eq!(first, answer.nodes[0].node_id);
    // Its best node dies: the next ones of the answer are used.
    c.kill9(first);
    let second = alice.connected(CLIENT_WAIT).await;
    assert_ne!(second, first);
    let addr = &alice.connected[1].1;
    assert!(
        answer.nodes[1..].iter().any(|n| n.addr == *addr),
        "{addr} is one of the other nodes Dispatch listed: {answer:?}"
    );
    let a = vec![app.push_acked(c.grpc_addr(second), "alice", "x", "k1").await];
    alice.messages(1, CLIENT_WAIT).await;
    assert_exactly_once(&alice, &a, "alice");
}
