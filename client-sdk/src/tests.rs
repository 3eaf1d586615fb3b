//! Tests of the connection logic against a scripted peer: a small TCP (or TLS) server inside the
//! test that speaks the framed protocol and plays the node's part step by step. It is a unit-test
//! double only; tests against real `herald node` processes live in the integration suite.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use herald_proto::client::frame::Kind;
use herald_proto::client::{
    Bye, Error as WireError, ErrorCode, Frame, Gap as WireGap, GapReason as WireGapReason, Hello, KickReason,
    Kicked, Ping, Pong, Push, Qos as WireQos, SessionClosed, Subscribed, UpstreamReply, Welcome,
};
use herald_proto::frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{timeout, Instant};

use crate::transport::Io;
use crate::*;

const WAIT: Duration = Duration::from_secs(5);

// ---- the scripted peer ----------------------------------------------------------------------

struct Peer {
    listener: TcpListener,
    addr: String,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Peer {
    async fn bind() -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Peer {
            listener,
            addr,
            tls: None,
        }
    }

    async fn accept(&self) -> PeerConn {
        let (tcp, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("no connection came")
            .unwrap();
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(acceptor) => Box::new(acceptor.accept(tcp).await.expect("tls accept")),
        };
        PeerConn {
            io,
            buf: BytesMut::new(),
            answer_pings: true,
            pings: Vec::new(),
        }
    }

    /// Asserts that nobody connects within `d`.
    async fn no_connection_within(&self, d: Duration) {
        if let Ok(Ok(_)) = timeout(d, self.listener.accept()).await {
            panic!("unexpected connection to {}", self.addr);
        }
    }
}

/// Accepts on whichever peer the client picks (the static list starts at a random node).
async fn accept_any(peers: &[&Peer]) -> (usize, PeerConn) {
    let futs = peers.iter().enumerate().map(|(i, p)| {
        Box::pin(async move {
            let (tcp, _) = p.listener.accept().await.unwrap();
            (i, tcp)
        })
    });
    let ((i, tcp), _, _) = timeout(WAIT, futures::future::select_all(futs))
        .await
        .expect("no connection came");
    (
        i,
        PeerConn {
            io: Box::new(tcp),
            buf: BytesMut::new(),
            answer_pings: true,
            pings: Vec::new(),
        },
    )
}

struct PeerConn {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// Answer PINGs with PONGs (and skip them) while receiving.
    answer_pings: bool,
    /// Every PING seen: (when, interval_ms).
    pings: Vec<(Instant, u32)>,
}

impl PeerConn {
    async fn send(&mut self, kind: Kind) {
        let bytes = frame::encode_to_bytes(&Frame { kind: Some(kind) });
        self.io.write_all(&bytes).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next frame (PINGs answered and skipped when `answer_pings`); `None` at EOF.
    async fn try_recv(&mut self) -> Option<Kind> {
        loop {
            if let Some(f) = frame::decode(&mut self.buf, frame::DEFAULT_MAX_FRAME).unwrap() {
                let kind = f.kind.unwrap();
                if let Kind::Ping(Ping { id, interval_ms }) = &kind {
                    self.pings.push((Instant::now(), *interval_ms));
                    if self.answer_pings {
                        let id = *id;
                        self.send(Kind::Pong(Pong { id })).await;
                        continue;
                    }
                }
                return Some(kind);
            }
            let n = timeout(WAIT, self.io.read_buf(&mut self.buf))
                .await
                .expect("peer waited too long")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    async fn recv(&mut self) -> Kind {
        self.try_recv().await.expect("client closed the connection")
    }

    /// Skips frames until `pick` takes one.
    async fn recv_until<T>(&mut self, mut pick: impl FnMut(Kind) -> Option<T>) -> T {
        loop {
            if let Some(t) = pick(self.recv().await) {
                return t;
            }
        }
    }

    async fn hello(&mut self) -> Hello {
        match self.recv().await {
            Kind::Hello(h) => h,
            other => panic!("expected HELLO, got {other:?}"),
        }
    }

    /// Reads until the client closes; returns what came before.
    async fn until_closed(&mut self) -> Vec<Kind> {
        let mut out = Vec::new();
        while let Some(k) = self.try_recv().await {
            out.push(k);
        }
        out
    }

    /// Waits for an ACK of at least `seq` for session `sid`.
    async fn acked(&mut self, sid: u32, seq: u64) {
        self.recv_until(|k| match k {
            Kind::Ack(a) if a.session_id == sid && a.seq >= seq => {
                assert_eq!(a.seq, seq, "acked past what was delivered");
                Some(())
            }
            _ => None,
        })
        .await
    }
}

fn welcome(sid: u32, heartbeat_ms: u32, acked_seq: u64) -> Kind {
    Kind::Welcome(Welcome {
        session_id: sid,
        epoch: 100 + sid as u64,
        node_id: 2,
        heartbeat_ms,
        heartbeat_min_ms: heartbeat_ms,
        heartbeat_max_ms: heartbeat_ms,
        max_frame: 65_536,
        version: 1,
        acked_seq,
        redelivery_upto: 0,
        ..Default::default()
    })
}

fn subscribed(sid: u32, topic: &str, seq: u64) -> Kind {
    Kind::Subscribed(Subscribed {
        session_id: sid,
        topic: topic.into(),
        seq,
        ..Default::default()
    })
}

fn refused(sid: u32, topic: &str, code: ErrorCode, message: &str) -> Kind {
    Kind::Subscribed(Subscribed {
        session_id: sid,
        topic: topic.into(),
        seq: 0,
        error: code as i32,
        message: message.into(),
    })
}

/// The session key the tests' builder uses.
fn alice_phone() -> SessionKey {
    SessionKey {
        app: "demo".into(),
        user: "alice".into(),
        device: "phone-1".into(),
    }
}

/// Waits until the cursors saved for `key` satisfy `ok` (saves are write-behind).
async fn wait_saved(store: &impl CursorStore, key: &SessionKey, ok: impl Fn(&Cursors) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let saved = store.load(key).unwrap().unwrap_or_default();
        if ok(&saved) {
            return;
        }
        assert!(Instant::now() < deadline, "cursors not saved: {saved:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kicked(sid: u32, code: KickReason, reason: &str) -> Kind {
    Kind::Kicked(Kicked {
        session_id: sid,
        reason: reason.into(),
        redirect: vec![],
        code: code as i32,
    })
}

fn push(sid: u32, id: &str, seq: u64) -> Kind {
    Kind::Push(Push {
        session_id: sid,
        msg_id: id.into(),
        seq,
        payload: Bytes::from(format!("payload of {id}")),
        qos: WireQos::AtLeastOnce as i32,
        pushed_at_ms: 1_700_000_000_000,
        ..Default::default()
    })
}

fn qos0(sid: u32, id: &str) -> Kind {
    Kind::Push(Push {
        session_id: sid,
        msg_id: id.into(),
        qos: WireQos::AtMostOnce as i32,
        ..Default::default()
    })
}

fn topic_push(sid: u32, id: &str, topic: &str, topic_seq: u64) -> Kind {
    Kind::Push(Push {
        session_id: sid,
        msg_id: id.into(),
        topic: topic.into(),
        topic_seq,
        qos: WireQos::AtLeastOnce as i32,
        ..Default::default()
    })
}

fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(80),
        reset_after: Duration::from_secs(60),
    }
}

fn builder(nodes: &[&Peer]) -> ClientBuilder {
    Client::builder("demo", "alice", "phone-1")
        .token("t1")
        .nodes(nodes.iter().map(|p| p.addr.clone()))
        .backoff(fast_backoff())
}

async fn next(events: &mut Events) -> Event {
    timeout(WAIT, events.next())
        .await
        .expect("no event came")
        .expect("stream ended")
}

/// The next event that is a message (connection events in between are allowed).
async fn next_message(events: &mut Events) -> Message {
    loop {
        match next(events).await {
            Event::Message(m) => return m,
            Event::Connected { .. } | Event::Disconnected { .. } | Event::Subscribed { .. } => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

async fn expect_connected(events: &mut Events) -> (u64, u64) {
    match next(events).await {
        Event::Connected { node_id, epoch, .. } => (node_id, epoch),
        other => panic!("expected Connected, got {other:?}"),
    }
}

async fn expect_disconnected(events: &mut Events) -> DisconnectReason {
    match next(events).await {
        Event::Disconnected { reason } => reason,
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

async fn expect_end(events: &mut Events) {
    let r = timeout(WAIT, events.next()).await.expect("stream did not end");
    assert!(r.is_none(), "expected the end of the stream, got {r:?}");
}

// ---- handshake, messages, acks ---------------------------------------------------------------

#[tokio::test]
async fn hello_carries_the_session_and_messages_arrive_once_with_automatic_acks() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer])
        .platform("ios")
        .topics(["news"])
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let hello = conn.hello().await;
    assert_eq!(hello.version, 1);
    assert!(
        hello.client.starts_with("herald-client-rust/"),
        "{}",
        hello.client
    );
    assert_eq!(hello.heartbeat_ms, 0, "fixed heartbeat: the server's default");
    let s = hello.session.unwrap();
    assert_eq!(s.session_id, client.session_id());
    assert_eq!(
        (s.app.as_str(), s.user.as_str(), s.device.as_str()),
        ("demo", "alice", "phone-1")
    );
    assert_eq!(
        (s.platform.as_str(), s.token.as_str(), s.last_acked_seq),
        ("ios", "t1", 0)
    );
    // The configured topic, and the implicit broadcast topic whose seq the first open learns.
    let topics: Vec<_> = s.topics.iter().map(|t| (t.topic.as_str(), t.last_seq)).collect();
    assert_eq!(topics, vec![("news", None), ("*", None)]);

    conn.send(welcome(s.session_id, 10_000, 0)).await;
    assert_eq!(expect_connected(&mut events).await, (2, 101));
    // The server answers each handshake topic, in order; `*` is confirmed silently.
    conn.send(subscribed(s.session_id, "news", 4)).await;
    conn.send(subscribed(s.session_id, "*", 0)).await;
    match next(&mut events).await {
        Event::Subscribed { topic, seq } => assert_eq!((topic.as_str(), seq), ("news", 4)),
        other => panic!("expected Subscribed, got {other:?}"),
    }
    assert_eq!(
        client.connection().state(),
        ConnectionState::Connected {
            addr: peer.addr.clone(),
            node_id: 2
        }
    );

    let sid = s.session_id;
    conn.send(push(sid, "m1", 1)).await;
    conn.send(push(sid, "m2", 2)).await;
    conn.send(push(sid, "m1", 1)).await; // re-delivery
    conn.send(push(sid, "m2-again", 2)).await; // same seq under another id: still a duplicate
    conn.send(topic_push(sid, "n5", "news", 5)).await;
    conn.send(topic_push(sid, "n5", "news", 5)).await;
    conn.send(qos0(sid, "q1")).await;
    conn.send(qos0(sid, "q1")).await;
    conn.send(push(sid, "m3", 3)).await;

    let m1 = next_message(&mut events).await;
    assert_eq!((m1.msg_id.as_str(), m1.seq, m1.qos), ("m1", 1, Qos::AtLeastOnce));
    assert_eq!(m1.payload, Bytes::from("payload of m1"));
    assert_eq!(m1.pushed_at_ms, 1_700_000_000_000);
    assert_eq!(next_message(&mut events).await.msg_id, "m2");
    let n5 = next_message(&mut events).await;
    assert_eq!((n5.topic.as_deref(), n5.topic_seq, n5.seq), (Some("news"), 5, 0));
    let q1 = next_message(&mut events).await;
    assert_eq!((q1.msg_id.as_str(), q1.qos), ("q1", Qos::AtMostOnce));
    assert_eq!(next_message(&mut events).await.msg_id, "m3");

    // Acks follow what was handed out, cumulative.
    conn.acked(sid, 3).await;
    let c = client.cursors();
    assert_eq!(c.last_acked_seq, 3);
    assert_eq!(c.topics.get("news"), Some(&5));
    assert!(c.recent_ids.contains(&"q1".to_string()));
    // Nothing else was queued: the duplicates were dropped.
    assert!(timeout(Duration::from_millis(100), events.next()).await.is_err());
}

#[tokio::test]
async fn gaps_are_surfaced_and_cover_their_range() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(push(sid, "m1", 1)).await;
    conn.send(Kind::Gap(WireGap {
        session_id: sid,
        topic: String::new(),
        from_seq: 2,
        to_seq: 4,
        reason: WireGapReason::Trimmed as i32,
    }))
    .await;
    conn.send(push(sid, "m3", 3)).await; // inside the gap: cannot be new
    conn.send(push(sid, "m5", 5)).await;
    assert_eq!(next_message(&mut events).await.seq, 1);
    match next(&mut events).await {
        Event::Gap(g) => {
            assert_eq!(
                g,
                Gap {
                    topic: None,
                    from_seq: 2,
                    to_seq: 4,
                    reason: GapReason::Trimmed
                }
            );
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(next_message(&mut events).await.seq, 5);
    conn.acked(sid, 5).await;
}

// ---- reconnect and resume --------------------------------------------------------------------

#[tokio::test]
async fn reconnect_resumes_from_the_cursors_and_replays_are_not_shown_again() {
    let (a, b) = (Peer::bind().await, Peer::bind().await);
    let (client, mut events) = builder(&[&a, &b]).topics(["news"]).connect().await.unwrap();
    let (first, mut conn) = accept_any(&[&a, &b]).await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    for s in 1..=3 {
        conn.send(push(sid, &format!("m{s}"), s)).await;
    }
    conn.send(topic_push(sid, "n7", "news", 7)).await;
    for _ in 0..4 {
        next_message(&mut events).await;
    }
    conn.acked(sid, 3).await;
    // Buffered in the channel but not yet taken by the app: must survive the reconnect.
    conn.send(push(sid, "m4", 4)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn); // the node dies

    // The client rotates to the other node.
    let other = if first == 0 { &b } else { &a };
    let mut conn = other.accept().await;
    let s = conn.hello().await.session.unwrap();
    assert_eq!(s.session_id, sid, "same session id on the new connection");
    assert_eq!(
        s.last_acked_seq, 3,
        "m4 was not handed out yet, so it is not acked"
    );
    let topics: Vec<_> = s.topics.iter().map(|t| (t.topic.as_str(), t.last_seq)).collect();
    assert_eq!(topics, vec![("news", Some(7)), ("*", None)]);
    // The app takes the buffered message now, before the new session is accepted.
    assert_eq!(
        next_message(&mut events).await.msg_id,
        "m4",
        "the buffered message first"
    );
    match expect_disconnected(&mut events).await {
        DisconnectReason::ClosedByServer | DisconnectReason::Io(_) => {}
        other => panic!("unexpected reason {other:?}"),
    }
    // The server's record lags (the last ack was lost with the node): it replays from 2.
    conn.send(welcome(sid, 10_000, 1)).await;
    for s in 2..=5 {
        conn.send(push(sid, &format!("m{s}"), s)).await;
    }
    conn.send(topic_push(sid, "n7", "news", 7)).await;
    conn.send(topic_push(sid, "n8", "news", 8)).await;
    expect_connected(&mut events).await;
    // Our cursor (4) is ahead of the server's (1): it is sent at once.
    conn.acked(sid, 4).await;
    assert_eq!(next_message(&mut events).await.msg_id, "m5");
    assert_eq!(next_message(&mut events).await.msg_id, "n8");
    conn.acked(sid, 5).await;
    assert_eq!(client.cursors().topics.get("news"), Some(&8));
}

#[tokio::test]
async fn bye_redirect_is_tried_before_the_list() {
    let (a, c) = (Peer::bind().await, Peer::bind().await);
    let (_client, mut events) = builder(&[&a]).connect().await.unwrap();
    let mut conn = a.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(Kind::Bye(Bye {
        reason: "draining".into(),
        redirect: vec![c.addr.clone()],
    }))
    .await;
    match expect_disconnected(&mut events).await {
        DisconnectReason::Bye { reason, redirect } => {
            assert_eq!(reason, "draining");
            assert_eq!(redirect, vec![c.addr.clone()]);
        }
        other => panic!("expected Bye, got {other:?}"),
    }
    let mut conn2 = c.accept().await;
    assert_eq!(conn2.hello().await.session.unwrap().session_id, sid);
    conn2.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
}

#[tokio::test]
async fn not_ready_moves_to_another_node() {
    let (a, b) = (Peer::bind().await, Peer::bind().await);
    let (_client, mut events) = builder(&[&a, &b]).connect().await.unwrap();
    let (first, mut conn) = accept_any(&[&a, &b]).await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(Kind::Error(WireError {
        session_id: sid,
        code: ErrorCode::NotReady as i32,
        message: "no leader".into(),
    }))
    .await;
    let other = if first == 0 { &b } else { &a };
    let mut conn = other.accept().await;
    conn.hello().await;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
}

// ---- heartbeats --------------------------------------------------------------------------------

#[tokio::test]
async fn pings_follow_the_server_interval_and_a_dead_link_is_found_within_two_intervals() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 100, 0)).await;
    expect_connected(&mut events).await;
    // Answer pings for a while.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(450) {
        let _ = timeout(Duration::from_millis(50), conn.try_recv()).await;
    }
    assert!(conn.pings.len() >= 3, "pings: {:?}", conn.pings.len());
    assert!(
        conn.pings.iter().all(|(_, iv)| *iv == 100),
        "PING.interval_ms announces the interval"
    );
    let gaps: Vec<_> = conn.pings.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.iter()
            .all(|g| *g >= Duration::from_millis(80) && *g < Duration::from_millis(250)),
        "{gaps:?}"
    );

    // The link goes silent (a NAT dropped the mapping): no PONG, no frame, socket still open.
    conn.answer_pings = false;
    let silent_from = Instant::now();
    let reason = expect_disconnected(&mut events).await;
    let took = silent_from.elapsed();
    assert_eq!(reason, DisconnectReason::HeartbeatTimeout);
    assert!(
        took <= Duration::from_millis(350),
        "dead link found after {took:?}"
    );
    // And the client comes back.
    let mut conn2 = peer.accept().await;
    conn2.hello().await;
    drop(conn);
}

#[tokio::test]
async fn adaptive_heartbeat_probes_longer_intervals_and_falls_back_after_a_miss() {
    let peer = Peer::bind().await;
    let hb = HeartbeatConfig {
        adaptive: true,
        confirmations: 1,
        pong_timeout: Duration::from_millis(150),
        fallback_interval: Duration::from_secs(30),
    };
    let (_client, mut events) = builder(&[&peer]).heartbeat(hb).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(Kind::Welcome(Welcome {
        session_id: sid,
        node_id: 1,
        heartbeat_ms: 100,
        heartbeat_min_ms: 50,
        heartbeat_max_ms: 400,
        ..Default::default()
    }))
    .await;
    expect_connected(&mut events).await;
    while conn.pings.len() < 4 {
        let _ = timeout(Duration::from_millis(50), conn.try_recv()).await;
    }
    let announced: Vec<u32> = conn.pings.iter().map(|(_, iv)| *iv).collect();
    // Each PING announces the interval until the next one; the first ping after a longer
    // interval tests it, so every step takes one ping at the old spacing and one at the new.
    assert_eq!(
        &announced[..4],
        &[100, 200, 200, 400],
        "doubling while pings succeed"
    );
    // The path stops carrying pings: the probe of 400 ms is missed, detected within the pong
    // timeout.
    conn.answer_pings = false;
    let reason = expect_disconnected(&mut events).await;
    assert_eq!(reason, DisconnectReason::HeartbeatTimeout);
    // The next connection announces the last good interval.
    let mut conn2 = peer.accept().await;
    let hello = conn2.hello().await;
    assert_eq!(
        hello.heartbeat_ms, 200,
        "fell back to the last confirmed interval"
    );
}

// ---- upstream --------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_replies_are_matched_by_request_id_and_errors_are_typed() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer])
        .session(|s| s.upstream_timeout(Duration::from_millis(300)))
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;

    let (c1, c2) = (client.clone(), client.clone());
    let r1 = tokio::spawn(async move { c1.upstream("first").await });
    let ups = (
        conn.recv_until(|k| if let Kind::Upstream(u) = k { Some(u) } else { None })
            .await,
        {
            let r2 = tokio::spawn(async move { c2.upstream("second").await });
            (
                conn.recv_until(|k| if let Kind::Upstream(u) = k { Some(u) } else { None })
                    .await,
                r2,
            )
        },
    );
    let (u1, (u2, r2)) = ups;
    assert_eq!(u1.payload, Bytes::from("first"));
    assert_eq!(u2.payload, Bytes::from("second"));
    assert_ne!(u1.request_id, u2.request_id);
    // Replies in the other order; the second one failed in the backend.
    conn.send(Kind::UpstreamReply(UpstreamReply {
        session_id: sid,
        request_id: u2.request_id,
        error: ErrorCode::UpstreamFailed as i32,
        message: "backend said no".into(),
        ..Default::default()
    }))
    .await;
    conn.send(Kind::UpstreamReply(UpstreamReply {
        session_id: sid,
        request_id: u1.request_id,
        payload: Bytes::from("reply to first"),
        ..Default::default()
    }))
    .await;
    assert_eq!(r1.await.unwrap().unwrap(), Bytes::from("reply to first"));
    match r2.await.unwrap() {
        Err(ClientError::Upstream { code, message }) => {
            assert_eq!(code, ErrorCode::UpstreamFailed);
            assert_eq!(message, "backend said no");
        }
        other => panic!("expected an upstream error, got {other:?}"),
    }
    // No reply at all: a timeout.
    let e = client.upstream("third").await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout), "{e}");
    assert!(e.is_retryable());
    // Too large for the server's frame limit.
    let e = client.upstream(vec![0u8; 70_000]).await.unwrap_err();
    assert!(matches!(e, ClientError::TooLarge { max: 65_536, .. }), "{e}");
    // Sent, then the connection is lost: the outcome is unknown.
    let c3 = client.clone();
    let r3 = tokio::spawn(async move { c3.upstream("fourth").await });
    conn.recv_until(|k| {
        if let Kind::Upstream(u) = k {
            (u.payload == "fourth").then_some(())
        } else {
            None
        }
    })
    .await;
    drop(conn);
    assert!(matches!(r3.await.unwrap(), Err(ClientError::Disconnected)));
}

#[tokio::test]
async fn upstream_while_offline_is_sent_after_the_reconnect() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer]).connect().await.unwrap();
    // Not answered yet: the request waits for the session.
    let c = client.clone();
    let r = tokio::spawn(async move { c.upstream("early").await });
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    let u = conn
        .recv_until(|k| if let Kind::Upstream(u) = k { Some(u) } else { None })
        .await;
    conn.send(Kind::UpstreamReply(UpstreamReply {
        session_id: sid,
        request_id: u.request_id,
        payload: Bytes::from("ok"),
        ..Default::default()
    }))
    .await;
    assert_eq!(r.await.unwrap().unwrap(), Bytes::from("ok"));
}

// ---- subscriptions -----------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_waits_for_the_server_and_rides_in_the_next_handshake() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;

    let c = client.clone();
    let sub = tokio::spawn(async move { c.subscribe("sport").await });
    let s = conn
        .recv_until(|k| if let Kind::Subscribe(s) = k { Some(s) } else { None })
        .await;
    assert_eq!((s.session_id, s.topic.as_str(), s.last_seq), (sid, "sport", None));
    conn.send(Kind::Subscribed(Subscribed {
        session_id: sid,
        topic: "sport".into(),
        seq: 10,
        ..Default::default()
    }))
    .await;
    sub.await.unwrap().unwrap();
    match next(&mut events).await {
        Event::Subscribed { topic, seq } => assert_eq!((topic.as_str(), seq), ("sport", 10)),
        other => panic!("expected Subscribed, got {other:?}"),
    }
    assert_eq!(
        client.cursors().topics.get("sport"),
        Some(&10),
        "cursor starts at the topic's seq"
    );
    conn.send(topic_push(sid, "s11", "sport", 11)).await;
    conn.send(topic_push(sid, "b3", "*", 3)).await;
    assert_eq!(next_message(&mut events).await.topic_seq, 11);
    assert!(next_message(&mut events).await.is_broadcast());

    // A refused subscribe: SUBSCRIBED with an error answers it; the session goes on.
    let c = client.clone();
    let bad = tokio::spawn(async move { c.subscribe("x".repeat(10)).await });
    conn.recv_until(|k| {
        if let Kind::Subscribe(_) = k {
            Some(())
        } else {
            None
        }
    })
    .await;
    conn.send(refused(
        sid,
        &"x".repeat(10),
        ErrorCode::BadRequest,
        "too many topics",
    ))
    .await;
    let e = bad.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    assert!(e.to_string().contains("too many topics"), "{e}");
    match next(&mut events).await {
        Event::SubscribeFailed { topic, error } => {
            assert_eq!(topic, "x".repeat(10));
            assert_eq!(error.code(), Some(ErrorCode::BadRequest));
        }
        other => panic!("expected SubscribeFailed, got {other:?}"),
    }
    conn.send(topic_push(sid, "s12", "sport", 12)).await;
    assert_eq!(
        next_message(&mut events).await.topic_seq,
        12,
        "the session goes on"
    );

    // Reconnect: the topic and both cursors ride in HELLO, with a topic subscribed while
    // offline (unless the reconnect won the race; then it is sent after WELCOME).
    drop(conn);
    assert!(matches!(
        expect_disconnected(&mut events).await,
        DisconnectReason::ClosedByServer | DisconnectReason::Io(_)
    ));
    let c = client.clone();
    let offline = tokio::spawn(async move { c.subscribe("golf").await });
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    let topics: Vec<_> = s.topics.iter().map(|t| (t.topic.as_str(), t.last_seq)).collect();
    let golf_in_hello = topics.contains(&("golf", None));
    let others: Vec<_> = topics.iter().filter(|(t, _)| *t != "golf").copied().collect();
    assert_eq!(
        others,
        vec![("sport", Some(12)), ("*", Some(3))],
        "the refused topic is not asked for again"
    );

    // Subscribed while the session is opening: not in that HELLO, so sent after WELCOME.
    let c = client.clone();
    let opening = tokio::spawn(async move { c.subscribe("chess").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!opening.is_finished());
    conn.send(welcome(sid, 10_000, 0)).await;
    // Handshake topics are answered first, in order; golf (if it rode in HELLO) resolves then.
    for (t, _) in &topics {
        conn.send(subscribed(sid, t, 1)).await;
    }
    let mut expected = vec!["chess".to_string()];
    if !golf_in_hello {
        expected.push("golf".to_string());
    }
    expected.sort();
    let mut sent = Vec::new();
    while sent.len() < expected.len() {
        let sub = conn
            .recv_until(|k| if let Kind::Subscribe(s) = k { Some(s) } else { None })
            .await;
        conn.send(subscribed(sid, &sub.topic, 1)).await;
        sent.push(sub.topic);
    }
    sent.sort();
    assert_eq!(sent, expected);
    timeout(WAIT, opening).await.unwrap().unwrap().unwrap();
    timeout(WAIT, offline).await.unwrap().unwrap().unwrap();
    client.unsubscribe("sport").await.unwrap();
    let u = conn
        .recv_until(|k| {
            if let Kind::Unsubscribe(u) = k {
                Some(u)
            } else {
                None
            }
        })
        .await;
    assert_eq!(u.topic, "sport");
    assert_eq!(client.cursors().topics.get("sport"), None);
}

// ---- several apps on one connection -----------------------------------------------------------

#[tokio::test]
async fn several_sessions_share_one_connection_and_are_all_reopened() {
    let peer = Peer::bind().await;
    let conn_handle = Connection::builder()
        .nodes([peer.addr.clone()])
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (chat, mut chat_ev) = conn_handle
        .open(SessionConfig::new("chat", "alice", "p1").token("tc"))
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let h = conn.hello().await.session.unwrap();
    assert_eq!((h.app.as_str(), h.session_id), ("chat", chat.session_id()));
    // Opened before WELCOME: waits for the handshake, then OPEN_SESSION.
    let (news, mut news_ev) = conn_handle
        .open(SessionConfig::new("news", "alice", "p1").token("tn"))
        .await
        .unwrap();
    let (mail, mut mail_ev) = conn_handle
        .open(SessionConfig::new("mail", "alice", "p1").token("tm"))
        .await
        .unwrap();
    assert!(chat.session_id() != news.session_id() && news.session_id() != mail.session_id());
    conn.send(welcome(chat.session_id(), 10_000, 0)).await;
    let mut opened = Vec::new();
    for _ in 0..2 {
        let o = conn
            .recv_until(|k| {
                if let Kind::OpenSession(o) = k {
                    Some(o)
                } else {
                    None
                }
            })
            .await;
        opened.push((o.session_id, o.app.clone(), o.token.clone()));
        conn.send(welcome(o.session_id, 10_000, 0)).await;
    }
    opened.sort();
    assert_eq!(
        opened,
        vec![
            (news.session_id(), "news".to_string(), "tn".to_string()),
            (mail.session_id(), "mail".to_string(), "tm".to_string())
        ]
    );
    expect_connected(&mut chat_ev).await;
    expect_connected(&mut news_ev).await;
    expect_connected(&mut mail_ev).await;

    // Frames are routed by session id; seqs are per session.
    conn.send(push(news.session_id(), "n1", 1)).await;
    conn.send(push(chat.session_id(), "c1", 1)).await;
    assert_eq!(next_message(&mut chat_ev).await.msg_id, "c1");
    assert_eq!(next_message(&mut news_ev).await.msg_id, "n1");

    // Closing one app leaves the others.
    mail.close().await.unwrap();
    let closed = conn
        .recv_until(|k| {
            if let Kind::CloseSession(c) = k {
                Some(c)
            } else {
                None
            }
        })
        .await;
    assert_eq!(closed.session_id, mail.session_id());
    expect_end(&mut mail_ev).await;
    conn.send(Kind::SessionClosed(SessionClosed {
        session_id: mail.session_id(),
        reason: "closed".into(),
    }))
    .await;
    assert!(matches!(mail.upstream("x").await, Err(ClientError::Closed)));

    // After a reconnect, HELLO carries the first live session and OPEN_SESSION the other.
    drop(conn);
    let mut conn = peer.accept().await;
    let h = conn.hello().await.session.unwrap();
    assert_eq!((h.session_id, h.last_acked_seq), (chat.session_id(), 1));
    conn.send(welcome(h.session_id, 10_000, 1)).await;
    let o = conn
        .recv_until(|k| {
            if let Kind::OpenSession(o) = k {
                Some(o)
            } else {
                None
            }
        })
        .await;
    assert_eq!((o.session_id, o.last_acked_seq), (news.session_id(), 1));
    conn_handle.close().await;
    assert_eq!(conn_handle.state(), ConnectionState::Closed);
}

// ---- server-initiated endings ---------------------------------------------------------------

#[tokio::test]
async fn replaced_session_is_kicked_and_not_reconnected() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(kicked(sid, KickReason::Replaced, "replaced by a newer login"))
        .await;
    match next(&mut events).await {
        Event::Kicked { code, reason, .. } => {
            assert_eq!(code, KickReason::Replaced);
            assert_eq!(reason, "replaced by a newer login");
        }
        other => panic!("expected Kicked, got {other:?}"),
    }
    expect_end(&mut events).await;
    // With no session left the client says goodbye and closes.
    let rest = conn.until_closed().await;
    assert!(rest.iter().any(|k| matches!(k, Kind::Bye(_))), "{rest:?}");
    peer.no_connection_within(Duration::from_millis(300)).await;
    assert!(matches!(client.subscribe("t").await, Err(ClientError::Closed)));
}

/// Found by the fault suite (a broadcast shown twice): messages queued before the session ended
/// are still handed to the app, and in auto-ack mode they move the cursors; the saver had made its
/// last save at the end, so the next run on the same store showed them again.
#[tokio::test]
async fn messages_taken_after_the_session_ended_are_saved() {
    let store = MemoryStore::new();
    let peer = Peer::bind().await;
    let key = alice_phone();
    let (_client, mut events) = builder(&[&peer])
        .topics(["news"])
        .store(store.clone())
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // The app is busy: the push and the kick queue up, the session ends, the saver stops.
    conn.send(topic_push(sid, "n4", "news", 4)).await;
    conn.send(kicked(sid, KickReason::Replaced, "replaced by a newer login"))
        .await;
    let _ = conn.until_closed().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Now it takes them.
    assert_eq!(next_message(&mut events).await.msg_id, "n4");
    assert!(matches!(next(&mut events).await, Event::Kicked { .. }));
    wait_saved(&store, &key, |c| {
        c.topics.get("news") == Some(&4) && c.recent_ids == vec!["n4"]
    })
    .await;
}

/// The bug found by the fault suite: a HELLO sent into a partition got no WELCOME in time, the SDK
/// gave up on it and logged in elsewhere, and the abandoned registration committed later with a
/// higher epoch and replaced the live session. That REPLACED is the client's own doing: the SDK
/// reconnects and resumes, once per abandoned attempt.
#[tokio::test]
async fn replaced_by_an_abandoned_hello_reconnects_once_and_resumes() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer])
        .connection(|c| c.handshake_timeout(Duration::from_millis(300)))
        .connect()
        .await
        .unwrap();
    // First attempt: the node takes the HELLO and never answers; the SDK gives up on it.
    let mut stuck = peer.accept().await;
    let sid = stuck.hello().await.session.unwrap().session_id;
    let sent = Instant::now();
    let rest = stuck.until_closed().await;
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "gave up only at the handshake timeout"
    );
    // Second attempt: welcomed; a message is handled and acked.
    let mut conn = peer.accept().await;
    assert_eq!(conn.hello().await.session.unwrap().session_id, sid);
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(push(sid, "m1", 1)).await;
    assert_eq!(next_message(&mut events).await.msg_id, "m1");
    conn.acked(sid, 1).await;

    // The abandoned registration commits now and replaces the live session.
    conn.send(kicked(
        sid,
        KickReason::Replaced,
        "replaced by a newer login on node 1",
    ))
    .await;
    assert_eq!(
        expect_disconnected(&mut events).await,
        DisconnectReason::ReplacedByOwnAttempt
    );
    // Alone on the connection (the server would close it): the SDK leaves and comes back.
    let rest = conn.until_closed().await;
    assert!(rest.iter().any(|k| matches!(k, Kind::Bye(_))), "{rest:?}");
    let mut conn = peer.accept().await;
    let h = conn.hello().await.session.unwrap();
    assert_eq!(
        (h.session_id, h.last_acked_seq),
        (sid, 1),
        "resumes from its cursor"
    );
    conn.send(welcome(sid, 10_000, 1)).await;
    expect_connected(&mut events).await;
    conn.send(push(sid, "m1", 1)).await; // a replay: not shown again
    conn.send(push(sid, "m2", 2)).await;
    assert_eq!(next_message(&mut events).await.msg_id, "m2");
    conn.acked(sid, 2).await;

    // The attempt was used up and none was abandoned since: this REPLACED is final.
    conn.send(kicked(
        sid,
        KickReason::Replaced,
        "replaced by a newer login on node 3",
    ))
    .await;
    match next(&mut events).await {
        Event::Kicked { code, reason, .. } => {
            assert_eq!(code, KickReason::Replaced);
            assert_eq!(reason, "replaced by a newer login on node 3");
        }
        other => panic!("expected Kicked, got {other:?}"),
    }
    expect_end(&mut events).await;
    peer.no_connection_within(Duration::from_millis(300)).await;
    assert!(matches!(client.subscribe("t").await, Err(ClientError::Closed)));
}

/// What the node actually answers when it cannot get the registration committed in time:
/// NOT_READY, "write outcome unknown". The registration may still commit, so the attempt counts
/// as abandoned just like an unanswered one.
#[tokio::test]
async fn replaced_after_a_not_ready_login_reconnects() {
    let (a, b) = (Peer::bind().await, Peer::bind().await);
    let (_client, mut events) = builder(&[&a, &b]).connect().await.unwrap();
    let (first, mut conn) = accept_any(&[&a, &b]).await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(Kind::Error(WireError {
        session_id: sid,
        code: ErrorCode::NotReady as i32,
        message: "cannot register the session: write outcome unknown: timed out waiting for commit".into(),
    }))
    .await;
    let other = if first == 0 { &b } else { &a };
    let mut conn = other.accept().await;
    conn.hello().await;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(kicked(
        sid,
        KickReason::Replaced,
        "replaced by a newer login on node 1",
    ))
    .await;
    assert_eq!(
        expect_disconnected(&mut events).await,
        DisconnectReason::ReplacedByOwnAttempt
    );
    let (_, mut conn) = accept_any(&[&a, &b]).await;
    assert_eq!(conn.hello().await.session.unwrap().session_id, sid);
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
}

/// An OPEN_SESSION lost with its link counts too; the replaced session is opened again on the same
/// connection after its delay, and the other session does not notice. A session that abandoned
/// nothing still takes REPLACED as final.
#[tokio::test]
async fn an_abandoned_open_session_excuses_one_replaced_and_reopens_on_the_same_connection() {
    let peer = Peer::bind().await;
    let conn_handle = Connection::builder()
        .nodes([peer.addr.clone()])
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (chat, mut chat_ev) = conn_handle
        .open(SessionConfig::new("chat", "alice", "p1").token("tc"))
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    assert_eq!(conn.hello().await.session.unwrap().session_id, chat.session_id());
    let (news, mut news_ev) = conn_handle
        .open(SessionConfig::new("news", "alice", "p1").token("tn"))
        .await
        .unwrap();
    conn.send(welcome(chat.session_id(), 10_000, 0)).await;
    expect_connected(&mut chat_ev).await;
    // The news OPEN_SESSION goes out and the link dies before its answer.
    let o = conn
        .recv_until(|k| {
            if let Kind::OpenSession(o) = k {
                Some(o)
            } else {
                None
            }
        })
        .await;
    assert_eq!(o.session_id, news.session_id());
    drop(conn);
    expect_disconnected(&mut chat_ev).await;
    let mut conn = peer.accept().await;
    assert_eq!(conn.hello().await.session.unwrap().session_id, chat.session_id());
    conn.send(welcome(chat.session_id(), 10_000, 0)).await;
    let o = conn
        .recv_until(|k| {
            if let Kind::OpenSession(o) = k {
                Some(o)
            } else {
                None
            }
        })
        .await;
    assert_eq!(o.session_id, news.session_id());
    conn.send(welcome(news.session_id(), 10_000, 0)).await;
    expect_connected(&mut chat_ev).await;
    expect_connected(&mut news_ev).await;

    conn.send(kicked(
        news.session_id(),
        KickReason::Replaced,
        "replaced by a newer login on node 1",
    ))
    .await;
    assert_eq!(
        expect_disconnected(&mut news_ev).await,
        DisconnectReason::ReplacedByOwnAttempt
    );
    let o = conn
        .recv_until(|k| {
            if let Kind::OpenSession(o) = k {
                Some(o)
            } else {
                None
            }
        })
        .await;
    assert_eq!(o.session_id, news.session_id());
    conn.send(welcome(news.session_id(), 10_000, 0)).await;
    expect_connected(&mut news_ev).await;
    conn.send(push(chat.session_id(), "c1", 1)).await;
    assert_eq!(next_message(&mut chat_ev).await.msg_id, "c1");
    conn.send(push(news.session_id(), "n1", 1)).await;
    assert_eq!(next_message(&mut news_ev).await.msg_id, "n1");

    conn.send(kicked(
        chat.session_id(),
        KickReason::Replaced,
        "replaced by a newer login on node 2",
    ))
    .await;
    match next(&mut chat_ev).await {
        Event::Kicked { code, .. } => assert_eq!(code, KickReason::Replaced),
        other => panic!("expected Kicked, got {other:?}"),
    }
    expect_end(&mut chat_ev).await;
    conn.send(push(news.session_id(), "n2", 2)).await;
    assert_eq!(next_message(&mut news_ev).await.msg_id, "n2");
    conn_handle.close().await;
}

#[tokio::test]
async fn abandoned_attempts_are_used_oldest_first_once_each_within_the_window_and_bounded() {
    use crate::task::AbandonedOpens;
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let window = s(40);
    let mut a = AbandonedOpens::default();
    assert!(a.take(t0, window).is_none());
    a.record(t0, "n1");
    a.record(t0 + s(5), "n3");
    assert_eq!(a.take(t0 + s(10), window).map(|x| x.1).as_deref(), Some("n1"));
    assert_eq!(a.take(t0 + s(10), window).map(|x| x.1).as_deref(), Some("n3"));
    assert!(a.take(t0 + s(10), window).is_none(), "each excuses one kick");
    // Too old: forgotten, not used.
    a.record(t0, "old");
    a.record(t0 + s(30), "new");
    assert_eq!(a.take(t0 + s(45), window).map(|x| x.1).as_deref(), Some("new"));
    assert_eq!(a.count(), 0);
    a.record(t0, "old");
    assert!(a.take(t0 + s(41), window).is_none());
    // Bounded: the oldest are forgotten first.
    for i in 0..20 {
        a.record(t0, &format!("n{i}"));
    }
    assert_eq!(a.count(), 8);
    assert_eq!(a.take(t0, window).map(|x| x.1).as_deref(), Some("n12"));
}

#[tokio::test]
async fn node_down_kick_moves_the_connection() {
    let (a, b) = (Peer::bind().await, Peer::bind().await);
    let (_client, mut events) = builder(&[&a]).connect().await.unwrap();
    let mut conn = a.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // The code decides, not the text.
    conn.send(Kind::Kicked(Kicked {
        session_id: sid,
        reason: "whatever the server says".into(),
        redirect: vec![b.addr.clone()],
        code: KickReason::NodeDown as i32,
    }))
    .await;
    assert_eq!(expect_disconnected(&mut events).await, DisconnectReason::NodeDown);
    let mut conn2 = b.accept().await;
    conn2.hello().await;
}

#[tokio::test]
async fn policy_and_admin_kicks_end_only_their_session() {
    let peer = Peer::bind().await;
    let conn_handle = Connection::builder()
        .nodes([peer.addr.clone()])
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (chat, mut chat_ev) = conn_handle
        .open(SessionConfig::new("chat", "alice", "p1").token("tc"))
        .await
        .unwrap();
    let (news, mut news_ev) = conn_handle
        .open(SessionConfig::new("news", "alice", "p1").token("tn"))
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    conn.hello().await;
    conn.send(welcome(chat.session_id(), 10_000, 0)).await;
    conn.recv_until(|k| matches!(k, Kind::OpenSession(_)).then_some(()))
        .await;
    conn.send(welcome(news.session_id(), 10_000, 0)).await;
    expect_connected(&mut chat_ev).await;
    expect_connected(&mut news_ev).await;

    conn.send(kicked(chat.session_id(), KickReason::Admin, "kicked by the app"))
        .await;
    match next(&mut chat_ev).await {
        Event::Kicked { code, .. } => assert_eq!(code, KickReason::Admin),
        other => panic!("expected Kicked, got {other:?}"),
    }
    expect_end(&mut chat_ev).await;
    match chat.upstream("x").await {
        Err(ClientError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    // The other app's session is untouched: same connection, no reconnect.
    conn.send(push(news.session_id(), "n1", 1)).await;
    assert_eq!(next_message(&mut news_ev).await.msg_id, "n1");

    conn.send(kicked(news.session_id(), KickReason::Policy, "over the limit"))
        .await;
    match next(&mut news_ev).await {
        Event::Kicked { code, reason, .. } => {
            assert_eq!((code, reason.as_str()), (KickReason::Policy, "over the limit"))
        }
        other => panic!("expected Kicked, got {other:?}"),
    }
    expect_end(&mut news_ev).await;
    let rest = conn.until_closed().await;
    assert!(rest.iter().any(|k| matches!(k, Kind::Bye(_))), "{rest:?}");
    peer.no_connection_within(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn token_expired_kick_reopens_the_session_with_a_fresh_token() {
    let peer = Peer::bind().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let provider = move || {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(format!("tok-{n}")) }
    };
    let conn_handle = Connection::builder()
        .nodes([peer.addr.clone()])
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let (chat, mut chat_ev) = conn_handle
        .open(SessionConfig::new("chat", "alice", "p1").token_provider(provider))
        .await
        .unwrap();
    let (news, mut news_ev) = conn_handle
        .open(SessionConfig::new("news", "alice", "p1").token("tn"))
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    assert_eq!(conn.hello().await.session.unwrap().token, "tok-0");
    conn.send(welcome(chat.session_id(), 10_000, 0)).await;
    conn.recv_until(|k| matches!(k, Kind::OpenSession(_)).then_some(()))
        .await;
    conn.send(welcome(news.session_id(), 10_000, 0)).await;
    expect_connected(&mut chat_ev).await;
    expect_connected(&mut news_ev).await;
    conn.send(push(chat.session_id(), "c1", 1)).await;
    assert_eq!(next_message(&mut chat_ev).await.seq, 1);
    conn.acked(chat.session_id(), 1).await;

    // One session's token expires: it is reopened on the same connection with a fresh token and
    // its cursor; the other session does not notice.
    conn.send(kicked(
        chat.session_id(),
        KickReason::TokenExpired,
        "token expired",
    ))
    .await;
    assert_eq!(
        expect_disconnected(&mut chat_ev).await,
        DisconnectReason::TokenExpired
    );
    let o = conn
        .recv_until(|k| {
            if let Kind::OpenSession(o) = k {
                Some(o)
            } else {
                None
            }
        })
        .await;
    assert_eq!(
        (o.session_id, o.token.as_str(), o.last_acked_seq),
        (chat.session_id(), "tok-1", 1)
    );
    conn.send(welcome(chat.session_id(), 10_000, 1)).await;
    expect_connected(&mut chat_ev).await;
    conn.send(push(chat.session_id(), "c1", 1)).await; // a replay: not shown again
    conn.send(push(chat.session_id(), "c2", 2)).await;
    assert_eq!(next_message(&mut chat_ev).await.msg_id, "c2");
    conn.send(push(news.session_id(), "n1", 1)).await;
    assert_eq!(next_message(&mut news_ev).await.msg_id, "n1");

    // Alone on its connection, the server would close it after the kick: the SDK leaves and
    // comes back with a fresh token at once (no backoff: nothing failed).
    news.close().await.unwrap();
    expect_end(&mut news_ev).await;
    conn.send(kicked(
        chat.session_id(),
        KickReason::TokenExpired,
        "token expired",
    ))
    .await;
    assert_eq!(
        expect_disconnected(&mut chat_ev).await,
        DisconnectReason::TokenExpired
    );
    let rest = conn.until_closed().await;
    assert!(rest.iter().any(|k| matches!(k, Kind::Bye(_))), "{rest:?}");
    let mut conn = peer.accept().await;
    let h = conn.hello().await.session.unwrap();
    assert_eq!(
        (h.session_id, h.token.as_str(), h.last_acked_seq),
        (chat.session_id(), "tok-2", 2)
    );
    conn.send(welcome(h.session_id, 10_000, 2)).await;
    expect_connected(&mut chat_ev).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_fixed_token_that_expires_ends_the_session() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(kicked(sid, KickReason::TokenExpired, "token expired"))
        .await;
    match next(&mut events).await {
        Event::Closed(ClientError::Auth { code, .. }) => assert_eq!(code, ErrorCode::TokenExpired),
        other => panic!("expected Closed(Auth), got {other:?}"),
    }
    expect_end(&mut events).await;
    peer.no_connection_within(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_refused_topic_at_open_is_dropped_and_the_broadcast_cursor_is_learned() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer]).topics(["bad", "ok"]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    let sid = s.session_id;
    let topics: Vec<_> = s.topics.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(topics, vec!["bad", "ok", "*"]);
    conn.send(welcome(sid, 10_000, 0)).await;
    conn.send(refused(sid, "bad", ErrorCode::BadRequest, "no such topic"))
        .await;
    conn.send(subscribed(sid, "ok", 3)).await;
    conn.send(subscribed(sid, "*", 7)).await;
    expect_connected(&mut events).await;
    match next(&mut events).await {
        Event::SubscribeFailed { topic, error } => {
            assert_eq!(topic, "bad");
            assert_eq!(error.code(), Some(ErrorCode::BadRequest));
        }
        other => panic!("expected SubscribeFailed, got {other:?}"),
    }
    match next(&mut events).await {
        Event::Subscribed { topic, seq } => assert_eq!((topic.as_str(), seq), ("ok", 3)),
        other => panic!("expected Subscribed, got {other:?}"),
    }
    let c = client.cursors();
    assert_eq!(c.topics.get("ok"), Some(&3));
    assert_eq!(
        c.topics.get("*"),
        Some(&7),
        "broadcasts resume from the first open"
    );
    assert_eq!(c.topics.get("bad"), None);
    // A subscribe made now is answered after the handshake topics, in order.
    let c2 = client.clone();
    let sub = tokio::spawn(async move { c2.subscribe("late").await });
    conn.recv_until(|k| matches!(k, Kind::Subscribe(_)).then_some(()))
        .await;
    conn.send(subscribed(sid, "late", 0)).await;
    sub.await.unwrap().unwrap();
    match next(&mut events).await {
        Event::Subscribed { topic, .. } => assert_eq!(topic, "late"),
        other => panic!("expected Subscribed, got {other:?}"),
    }
    drop(conn);
    expect_disconnected(&mut events).await;
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    let topics: Vec<_> = s.topics.iter().map(|t| (t.topic.as_str(), t.last_seq)).collect();
    assert_eq!(topics, vec![("late", Some(0)), ("ok", Some(3)), ("*", Some(7))]);
}

#[tokio::test]
async fn connection_errors_and_garbage_from_the_server_lead_to_a_reconnect() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(Kind::Error(WireError {
        session_id: 0,
        code: ErrorCode::SlowConsumer as i32,
        message: "slow".into(),
    }))
    .await;
    match expect_disconnected(&mut events).await {
        DisconnectReason::ServerError { code, .. } => assert_eq!(code, ErrorCode::SlowConsumer),
        other => panic!("{other:?}"),
    }
    let mut conn = peer.accept().await;
    conn.hello().await;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // Not protobuf.
    conn.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    assert!(matches!(
        expect_disconnected(&mut events).await,
        DisconnectReason::Protocol(_)
    ));
    let mut conn = peer.accept().await;
    conn.hello().await;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // A length over the announced maximum.
    let mut b = BytesMut::new();
    b.put_u32(1_000_000);
    conn.send_raw(&b).await;
    assert!(matches!(
        expect_disconnected(&mut events).await,
        DisconnectReason::Protocol(_)
    ));
    let mut conn = peer.accept().await;
    conn.hello().await;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // A frame only a client sends.
    conn.send(Kind::Hello(Hello::default())).await;
    assert!(matches!(
        expect_disconnected(&mut events).await,
        DisconnectReason::Protocol(_)
    ));
}

#[tokio::test]
async fn unsupported_version_ends_every_session() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    conn.hello().await;
    conn.send(Kind::Error(WireError {
        session_id: 0,
        code: ErrorCode::UnsupportedVersion as i32,
        message: "v2 only".into(),
    }))
    .await;
    match next(&mut events).await {
        Event::Closed(e) => assert_eq!(e.code(), Some(ErrorCode::UnsupportedVersion)),
        other => panic!("{other:?}"),
    }
    expect_end(&mut events).await;
}

// ---- tokens ------------------------------------------------------------------------------------

#[tokio::test]
async fn refused_token_asks_the_provider_once_and_gives_up_on_the_same_token() {
    let peer = Peer::bind().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let provider = move || {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(if n == 0 {
                "old".to_string()
            } else {
                "new".to_string()
            })
        }
    };
    let (_client, mut events) = Client::builder("demo", "alice", "phone-1")
        .token_provider(provider)
        .nodes([peer.addr.clone()])
        .backoff(fast_backoff())
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    assert_eq!(s.token, "old");
    conn.send(Kind::Error(WireError {
        session_id: s.session_id,
        code: ErrorCode::TokenExpired as i32,
        message: "expired".into(),
    }))
    .await;
    drop(conn); // the server closes after a failed HELLO
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    assert_eq!(s.token, "new");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    conn.send(welcome(s.session_id, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // Refused again; the provider has nothing newer: the session ends with an auth error.
    conn.send(Kind::Error(WireError {
        session_id: s.session_id,
        code: ErrorCode::BadToken as i32,
        message: "bad".into(),
    }))
    .await;
    assert!(matches!(
        expect_disconnected(&mut events).await,
        DisconnectReason::ServerError { .. }
    ));
    match next(&mut events).await {
        Event::Closed(ClientError::Auth { code, .. }) => assert_eq!(code, ErrorCode::BadToken),
        other => panic!("expected Closed(Auth), got {other:?}"),
    }
    expect_end(&mut events).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn fixed_token_refusal_is_final() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(Kind::Error(WireError {
        session_id: sid,
        code: ErrorCode::BadToken as i32,
        message: "no".into(),
    }))
    .await;
    match next(&mut events).await {
        Event::Closed(e) => {
            assert!(matches!(e, ClientError::Auth { .. }));
            assert!(!e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    expect_end(&mut events).await;
    peer.no_connection_within(Duration::from_millis(200)).await;
}

// ---- back-pressure, close --------------------------------------------------------------------

#[tokio::test]
async fn a_slow_app_gets_every_message_in_order() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer])
        .session(|s| s.event_buffer(4))
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 100, 0)).await;
    expect_connected(&mut events).await;
    let writer = tokio::spawn(async move {
        for s in 1..=300u64 {
            conn.send(push(sid, &format!("m{s}"), s)).await;
        }
        conn
    });
    // The app is busy for longer than two heartbeat intervals: not a dead link, nothing lost.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for s in 1..=300u64 {
        let m = next_message(&mut events).await;
        assert_eq!(m.seq, s);
    }
    let mut conn = writer.await.unwrap();
    conn.acked(sid, 300).await;
}

#[tokio::test]
async fn close_acks_says_bye_and_ends_the_stream() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(push(sid, "m1", 1)).await;
    next_message(&mut events).await;
    client.close().await.unwrap();
    let rest = conn.until_closed().await;
    assert!(matches!(rest.last(), Some(Kind::Bye(_))), "{rest:?}");
    assert!(
        rest.iter().any(|k| matches!(k, Kind::Ack(a) if a.seq == 1)),
        "{rest:?}"
    );
    expect_end(&mut events).await;
    assert_eq!(client.connection().state(), ConnectionState::Closed);
    client.close().await.unwrap();
}

#[tokio::test]
async fn dropping_the_stream_closes_the_session() {
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    drop(events);
    let c = conn
        .recv_until(|k| {
            if let Kind::CloseSession(c) = k {
                Some(c)
            } else {
                None
            }
        })
        .await;
    assert_eq!(c.session_id, sid);
}

// ---- manual acks -------------------------------------------------------------------------------

#[tokio::test]
async fn manual_acks_are_sent_when_the_app_says_and_never_past_what_it_saw() {
    let peer = Peer::bind().await;
    let (client, mut events) = builder(&[&peer])
        .ack_mode(AckMode::Manual)
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(push(sid, "m1", 1)).await;
    conn.send(push(sid, "m2", 2)).await;
    let m1 = next_message(&mut events).await;
    let _m2 = next_message(&mut events).await;
    assert_eq!(
        client.cursors().last_acked_seq,
        0,
        "handed out is not handled in manual mode"
    );
    m1.ack();
    conn.acked(sid, 1).await;
    client.ack(99); // capped at the highest seq handed out
    conn.acked(sid, 2).await;
    assert_eq!(client.cursors().last_acked_seq, 2);
}

// ---- cursors across app restarts -------------------------------------------------------------

#[tokio::test]
async fn a_restart_resumes_from_the_store_and_hides_what_was_shown() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let peer = Peer::bind().await;
    let key = alice_phone();
    {
        let (_client, mut events) = builder(&[&peer])
            .topics(["news"])
            .store(store.clone())
            .connect()
            .await
            .unwrap();
        let mut conn = peer.accept().await;
        let sid = conn.hello().await.session.unwrap().session_id;
        conn.send(welcome(sid, 10_000, 0)).await;
        expect_connected(&mut events).await;
        conn.send(push(sid, "m1", 1)).await;
        conn.send(push(sid, "m2", 2)).await;
        conn.send(qos0(sid, "q1")).await;
        conn.send(topic_push(sid, "n4", "news", 4)).await;
        for _ in 0..4 {
            next_message(&mut events).await;
        }
        // Write-behind: the file catches up shortly after the messages were handed out, while
        // the app is still running (a crash from here on does not re-show them).
        wait_saved(&store, &key, |c| c.last_acked_seq == 2 && c.recent_ids.len() == 4).await;
        // The app is killed: the server never got the acks.
        drop(events);
        drop(conn);
    }
    let saved = store.load(&key).unwrap().unwrap();
    assert_eq!(saved.last_acked_seq, 2);
    assert_eq!(saved.topics.get("news"), Some(&4));
    assert_eq!(saved.recent_ids, vec!["m1", "m2", "q1", "n4"]);

    // The next run resumes from the file.
    let (_client, mut events) = builder(&[&peer])
        .topics(["news"])
        .store(store.clone())
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    assert_eq!(s.last_acked_seq, 2);
    assert_eq!(s.topics[0].last_seq, Some(4));
    conn.send(welcome(s.session_id, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // The server knows no ack: it replays everything; the SDK shows only what is new.
    conn.send(push(s.session_id, "m1", 1)).await;
    conn.send(push(s.session_id, "m2", 2)).await;
    conn.send(qos0(s.session_id, "q1")).await;
    conn.send(topic_push(s.session_id, "n4", "news", 4)).await;
    conn.send(push(s.session_id, "m3", 3)).await;
    assert_eq!(next_message(&mut events).await.msg_id, "m3");
    conn.acked(s.session_id, 3).await;
}

#[tokio::test]
async fn manual_mode_shows_again_after_a_restart_what_was_not_acked() {
    let store = MemoryStore::new();
    let peer = Peer::bind().await;
    {
        let (client, mut events) = builder(&[&peer])
            .ack_mode(AckMode::Manual)
            .store(store.clone())
            .connect()
            .await
            .unwrap();
        let mut conn = peer.accept().await;
        let sid = conn.hello().await.session.unwrap().session_id;
        conn.send(welcome(sid, 10_000, 0)).await;
        expect_connected(&mut events).await;
        conn.send(push(sid, "m1", 1)).await;
        conn.send(push(sid, "m2", 2)).await;
        next_message(&mut events).await.ack();
        next_message(&mut events).await; // shown, never acked: the app crashed while handling it
        conn.acked(sid, 1).await;
        client.close().await.unwrap();
    }
    let (_client, mut events) = builder(&[&peer])
        .ack_mode(AckMode::Manual)
        .store(store.clone())
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    assert_eq!(s.last_acked_seq, 1);
    conn.send(welcome(s.session_id, 10_000, 1)).await;
    expect_connected(&mut events).await;
    conn.send(push(s.session_id, "m2", 2)).await;
    assert_eq!(next_message(&mut events).await.msg_id, "m2");
}

#[tokio::test]
async fn a_corrupt_cursor_file_is_reported_and_the_session_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let key = alice_phone();
    std::fs::write(store.path_for(&key), b"garbage").unwrap();
    let peer = Peer::bind().await;
    let (_client, mut events) = builder(&[&peer]).store(store).connect().await.unwrap();
    match next(&mut events).await {
        Event::Error(ClientError::Store(e)) => assert!(e.contains("corrupt"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut conn = peer.accept().await;
    assert_eq!(conn.hello().await.session.unwrap().last_acked_seq, 0);
}

// ---- configuration -----------------------------------------------------------------------------

#[tokio::test]
async fn configuration_errors_are_reported_before_anything_starts() {
    let e = Connection::builder().build().unwrap_err();
    assert!(matches!(e, ClientError::Config(_)), "{e}");
    let e = Client::builder("demo", "alice", "phone")
        .nodes(["127.0.0.1:1"])
        .connect()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("token"), "{e}");
    let failing = || async { Err::<String, BoxError>("backend down".into()) };
    let e = Client::builder("demo", "alice", "phone")
        .token_provider(failing)
        .nodes(["127.0.0.1:1"])
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Token(_)), "{e}");
}

#[test]
fn build_outside_a_runtime_is_a_config_error() {
    let e = Connection::builder().nodes(["127.0.0.1:1"]).build().unwrap_err();
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}

#[tokio::test]
async fn unreachable_nodes_are_retried_with_jittered_delays() {
    // Ports nothing listens on.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        })
        .collect();
    let conn = Connection::builder()
        .nodes(dead)
        .backoff(BackoffConfig {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(40),
            reset_after: Duration::from_secs(1),
        })
        .build()
        .unwrap();
    let (_c, _e) = conn
        .open(SessionConfig::new("a", "u", "d").token("t"))
        .await
        .unwrap();
    let mut rx = conn.watch_state();
    let mut delays = Vec::new();
    while delays.len() < 6 {
        timeout(WAIT, rx.changed()).await.unwrap().unwrap();
        if let ConnectionState::Backoff { retry_in } = rx.borrow().clone() {
            delays.push(retry_in);
        }
    }
    assert!(
        delays.iter().all(|d| *d <= Duration::from_millis(40)),
        "{delays:?}"
    );
    assert!(
        delays.iter().any(|d| *d != delays[0]),
        "jittered, not fixed: {delays:?}"
    );
    conn.close().await;
}

// ---- dispatch ----------------------------------------------------------------------------------

mod fake_dispatch {
    use herald_proto::v1::herald_server::{Herald, HeraldServer};
    use herald_proto::v1::*;
    use tonic::{Request, Response, Status};

    use super::*;

    type R<T> = Result<Response<T>, Status>;

    #[derive(Clone)]
    pub(super) struct Fake {
        /// The node list of each answer in turn; the last one is repeated.
        pub(super) answers: Vec<Vec<String>>,
        pub(super) seen: Arc<Mutex<Vec<DispatchRequest>>>,
    }

    fn no<T>() -> R<T> {
        Err(Status::unimplemented("fake"))
    }

    #[tonic::async_trait]
    impl Herald for Fake {
        async fn push(&self, _: Request<PushRequest>) -> R<PushReply> {
            no()
        }
        type PushStreamStream = futures::stream::Empty<Result<PushStreamReply, Status>>;
        async fn push_stream(&self, _: Request<tonic::Streaming<PushRequest>>) -> R<Self::PushStreamStream> {
            no()
        }
        async fn broadcast(&self, _: Request<BroadcastRequest>) -> R<PublishReply> {
            no()
        }
        async fn publish_topic(&self, _: Request<PublishRequest>) -> R<PublishReply> {
            no()
        }
        async fn kick(&self, _: Request<KickRequest>) -> R<KickReply> {
            no()
        }
        async fn status(&self, _: Request<StatusRequest>) -> R<StatusReply> {
            no()
        }
        async fn delivery_status(&self, _: Request<DeliveryStatusRequest>) -> R<DeliveryStatusReply> {
            no()
        }
        async fn dispatch(&self, r: Request<DispatchRequest>) -> R<DispatchReply> {
            let call = {
                let mut seen = self.seen.lock().unwrap();
                seen.push(r.into_inner());
                seen.len() - 1
            };
            let nodes = &self.answers[call.min(self.answers.len() - 1)];
            Ok(Response::new(DispatchReply {
                nodes: nodes
                    .iter()
                    .enumerate()
                    .map(|(i, a)| DispatchNode {
                        node_id: i as u64 + 1,
                        addr: a.clone(),
                        connections: 0,
                    })
                    .collect(),
                heartbeat_ms: 30_000,
                heartbeat_min_ms: 10_000,
                heartbeat_max_ms: 300_000,
                backoff_initial_ms: 20,
                backoff_max_ms: 80,
            }))
        }
        async fn cluster_status(&self, _: Request<ClusterStatusRequest>) -> R<ClusterStatusReply> {
            no()
        }
        async fn verify_replicas(
            &self,
            _: Request<herald_proto::v1::VerifyReplicasRequest>,
        ) -> R<herald_proto::v1::VerifyReplicasReply> {
            no()
        }
        async fn add_node(&self, _: Request<AddNodeRequest>) -> R<MembershipReply> {
            no()
        }
        async fn remove_node(&self, _: Request<RemoveNodeRequest>) -> R<MembershipReply> {
            no()
        }
        async fn rebalance(&self, _: Request<RebalanceRequest>) -> R<RebalanceReply> {
            no()
        }
        async fn create_app(&self, _: Request<CreateAppRequest>) -> R<AppReply> {
            no()
        }
        async fn update_app(&self, _: Request<UpdateAppRequest>) -> R<AppReply> {
            no()
        }
        async fn get_app(&self, _: Request<GetAppRequest>) -> R<AppReply> {
            no()
        }
        async fn list_apps(&self, _: Request<ListAppsRequest>) -> R<ListAppsReply> {
            no()
        }
        async fn delete_app(&self, _: Request<DeleteAppRequest>) -> R<DeleteAppReply> {
            no()
        }
    }

    /// Serves the fake on a loopback port; returns its address.
    pub(super) async fn serve(fake: Fake) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HeraldServer::new(fake))
                .serve_with_incoming(incoming),
        );
        addr
    }
}

#[tokio::test]
async fn the_node_list_comes_from_dispatch() {
    let (a, b) = (Peer::bind().await, Peer::bind().await);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let grpc = fake_dispatch::serve(fake_dispatch::Fake {
        answers: vec![vec![b.addr.clone(), a.addr.clone()]],
        seen: seen.clone(),
    })
    .await;
    // A dead seed first (maybe): any reachable one will do.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (_client, mut events) = Client::builder("demo", "alice", "phone-1")
        .token("t")
        .dispatch_seeds([dead, grpc])
        .connection(|c| c.dispatch_timeout(Duration::from_millis(500)))
        .connect()
        .await
        .unwrap();
    // The best node of the answer is tried first.
    let mut conn = b.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (
                seen[0].app.as_str(),
                seen[0].user.as_str(),
                seen[0].transport.as_str()
            ),
            ("demo", "alice", "tcp")
        );
    }
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    // The best node fails: the next one in the answer.
    drop(conn);
    let mut conn = a.accept().await;
    conn.hello().await;
}

#[tokio::test]
async fn the_node_list_is_refreshed_and_a_changed_list_is_used() {
    let (a, b) = (Peer::bind().await, Peer::bind().await);
    let seen = Arc::new(Mutex::new(Vec::new()));
    // The first answer names only `a`; every later one only `b`.
    let grpc = fake_dispatch::serve(fake_dispatch::Fake {
        answers: vec![vec![a.addr.clone()], vec![b.addr.clone()]],
        seen: seen.clone(),
    })
    .await;
    let (_client, mut events) = Client::builder("demo", "alice", "phone-1")
        .token("t")
        .dispatch_seeds([grpc])
        .connection(|c| c.dispatch_refresh(Duration::from_millis(200)))
        .connect()
        .await
        .unwrap();
    let mut conn = a.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    // While connected, Dispatch is asked again on its own (nothing failed).
    timeout(WAIT, async {
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the node list was not refreshed");
    // The link to `a` ends: the client goes to `b`, the only node of the fresh list, although
    // `a` still listens (with the first list it would have come back to `a`).
    drop(conn);
    expect_disconnected(&mut events).await;
    let mut conn = b.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    a.no_connection_within(Duration::from_millis(300)).await;
}

// ---- TLS ---------------------------------------------------------------------------------------

/// A CA and a certificate for 127.0.0.1 and localhost signed by it.
fn test_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let server =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
    (ca.pem(), server)
}

#[tokio::test]
async fn tls_with_a_custom_ca() {
    let (ca_pem, server) = test_pki();
    let mut peer = Peer::bind().await;
    peer.tls = Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let tls = TlsConfig::from_ca_pem_file(&ca_file).unwrap();
    let (_client, mut events) = builder(&[&peer]).tls(tls).connect().await.unwrap();
    let mut conn = peer.accept().await;
    let sid = conn.hello().await.session.unwrap().session_id;
    conn.send(welcome(sid, 10_000, 0)).await;
    expect_connected(&mut events).await;
    conn.send(push(sid, "m1", 1)).await;
    assert_eq!(next_message(&mut events).await.msg_id, "m1");
}

#[tokio::test]
async fn tls_refuses_a_certificate_from_another_ca() {
    let (_, server) = test_pki();
    let (other_ca, _) = test_pki();
    let peer = Peer::bind().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let conn = Connection::builder()
        .nodes([peer.addr.clone()])
        .tls(TlsConfig::from_ca_pem(other_ca.as_bytes()).unwrap())
        // A long pause after the failed attempt: with a fast one the Backoff state can come and go
        // (the watch keeps only the latest value) before this test looks, and the next attempt
        // then waits in a handshake that this peer never accepts.
        .backoff(BackoffConfig {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
        })
        .build()
        .unwrap();
    let mut rx = conn.watch_state();
    let (_c, _e) = conn
        .open(SessionConfig::new("a", "u", "d").token("t"))
        .await
        .unwrap();
    let (tcp, _) = timeout(WAIT, peer.listener.accept()).await.unwrap().unwrap();
    assert!(
        acceptor.accept(tcp).await.is_err(),
        "the client must abort the handshake"
    );
    // The refused attempt ends in Backoff; should the jittered pause be near zero, the state may
    // already have moved on, and then the next attempt's connection shows the same thing.
    timeout(WAIT, async {
        tokio::select! {
            r = rx.wait_for(|s| matches!(s, ConnectionState::Backoff { .. })) => {
                r.unwrap();
            }
            r = peer.listener.accept() => {
                r.unwrap();
            }
        }
    })
    .await
    .unwrap();
    conn.close().await;
}

#[tokio::test]
async fn a_token_about_to_expire_is_refreshed_on_the_live_session() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    // Tokens whose refresh moment (30 s before `exp`: a tenth of the 91 s lifetime, at least 30 s)
    // is one second away.
    fn token(n: usize) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = format!(
            r#"{{"app":"demo","sub":"alice","n":{n},"iat":{},"exp":{}}}"#,
            now - 60,
            now + 31
        );
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let provider = move || {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(token(n)) }
    };
    let peer = Peer::bind().await;
    let (_client, mut events) = Client::builder("demo", "alice", "phone-1")
        .token_provider(provider)
        .nodes([peer.addr.clone()])
        .connect()
        .await
        .unwrap();
    let mut conn = peer.accept().await;
    let s = conn.hello().await.session.unwrap();
    conn.send(welcome(s.session_id, 10_000, 0)).await;
    expect_connected(&mut events).await;
    let r = conn
        .recv_until(|k| {
            if let Kind::RefreshToken(r) = k {
                Some(r)
            } else {
                None
            }
        })
        .await;
    assert_eq!(r.session_id, s.session_id);
    assert_ne!(r.token, s.token);
    assert!(calls.load(Ordering::SeqCst) >= 2);
}
