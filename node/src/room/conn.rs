//! One client connection: the protocol of docs/PROTOCOL.md for every session on it.
//!
//! The task owns the socket and loops: take what others queued in the outbox (frames, mailbox
//! pokes, kicks, close) → write it in one go → wait for the socket to be readable or the outbox to
//! be poked. While idle it holds no read or write buffer: reads go through a per-thread scratch
//! buffer and only a partial frame is kept. Rare, large steps (opening a session: a Raft commit)
//! are boxed so they do not inflate the idle task.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_proto::client::{
    self as pc, frame::Kind, ErrorCode, Frame, GapReason, KickReason, OpenSession, Qos, TopicCursor,
};
use herald_proto::frame::{self, FrameError};
use herald_raft::raft_node::now_ms;
use herald_raft::{
    AppConfig, KeptSubscription, MailboxMeta, Op, OpResult, Register, RetainedMessage, SubsChange, WriteError,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use super::outbox::{Close, ConnShared, Kick};
use super::{LocalSession, Room, BROADCAST, MAX_NAME, MAX_SESSIONS_PER_CONN, MAX_TOPICS_PER_SESSION};
use crate::admin::metrics::Transport;
use crate::coordinator::UpstreamFailure;
use crate::token;

/// Mailbox messages read from the state machine per pull.
const PAGE: usize = 128;
/// Frames taken from the outbox per write.
const TAKE: usize = 512;
/// A write that makes no progress this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Client publishes (PUBLISH_TOPIC) one connection may have waiting for their commit.
const MAX_PUBLISHES_IN_FLIGHT: u32 = 256;
/// How long a drained connection keeps reading acks after its BYE.
const LINGER: Duration = Duration::from_secs(2);

thread_local! {
    /// Read scratch space shared by every connection on this worker thread.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 16 * 1024].into_boxed_slice());
}

/// A session on this connection.
struct Session {
    id: u32,
    app: Arc<str>,
    user: Arc<str>,
    device: Arc<str>,
    epoch: u64,
    /// Highest mailbox seq handed to the socket (or passed over: for another device, a gap).
    delivered: u64,
    /// Highest mailbox seq the client acked.
    acked: u64,
    /// Token expiry (unix seconds).
    token_exp: u64,
    /// Subscribed topics (besides the implicit `*`).
    topics: Vec<String>,
    /// The cluster keeps this session's subscriptions beyond the connection (OpenSession.keep with
    /// an expiry): subscribing and unsubscribing commit the change (`Op::SessionSubs`).
    kept: bool,
}

/// How the connection ended, for logs.
#[derive(Debug)]
enum End {
    ClientClosed,
    Io(std::io::Error),
    Closed(#[allow(dead_code)] Close),
    NoSessions,
}

struct Conn<S> {
    room: Arc<Room>,
    shared: Arc<ConnShared>,
    stream: S,
    /// Bytes of a frame not complete yet (empty, unallocated, between frames).
    rbuf: BytesMut,
    /// Frames produced while handling input, written at the top of the loop.
    out: Vec<u8>,
    sessions: Vec<Session>,
    hello_done: bool,
    transport: Transport,
    /// The listener's connection slot, given back when the connection ends.
    _slot: Option<OwnedSemaphorePermit>,
}

/// Registers an accepted connection with the room now and returns the future that serves it
/// until it ends (`stream` is plain TCP, TLS or WebSocket): the connection's task.
///
/// Not an `async fn`: an async fn's arguments stay in its future for its whole life (the peer
/// address, the stream before it moved into the connection, ...); here the future holds only
/// the connection.
pub fn serve<S>(
    room: Arc<Room>,
    peer: std::net::SocketAddr,
    transport: Transport,
    stream: S,
    slot: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let shared = room.add_conn(peer, transport);
    let mut c = Conn {
        room,
        shared,
        stream,
        rbuf: BytesMut::new(),
        out: Vec::new(),
        sessions: Vec::new(),
        hello_done: false,
        transport,
        _slot: slot,
    };
    // The block's captured `c` is used in place; an `async fn` taking the connection by value
    // would copy it into a second slot of the same future.
    async move { c.serve().await }
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn serve(&mut self) {
        match self.run().await {
            End::Io(e) => {
                debug!(conn = self.shared.id, peer = %self.shared.peer, error = %e, "connection i/o ended")
            }
            other => {
                debug!(conn = self.shared.id, peer = %self.shared.peer, end = ?other, "connection ended")
            }
        }
        self.cleanup();
        self.room.stats.ops.conn_closed(self.transport);
    }

    async fn run(&mut self) -> End {
        loop {
            // Taken apart, and each part used up before the next await: what is held across an
            // await sits in every idle connection's task (the block ends the `close` slot's life
            // here: an `Option<Close>` kept to the end of the loop body would be 56 bytes in
            // every idle task).
            let (frames, pokes, kicks) = {
                let super::outbox::Work {
                    frames,
                    pokes,
                    kicks,
                    close,
                } = self.shared.take(TAKE);
                if let Some(close) = close {
                    drop(kicks);
                    // Boxed: the closing steps and what they hold exist only while a
                    // connection closes.
                    return Box::pin(self.close_with(frames, pokes, close)).await;
                }
                (frames, pokes, kicks)
            };
            for k in kicks {
                self.kick(k);
            }
            self.expire_tokens();
            for f in &frames {
                f.write_into(&mut self.out);
            }
            drop(frames);
            let mut more = false;
            // Log times of the mailbox pushes in this write, observed once the socket took them.
            let mut pushed = Vec::new();
            for sid in pokes {
                more |= self.pull_mailbox(sid, &mut pushed);
            }
            if let Err(e) = self.write_out().await {
                return End::Io(e);
            }
            if !pushed.is_empty() {
                let now = now_ms();
                for at in pushed {
                    self.room.stats.ops.delivery_latency.observe_since(at, now);
                }
            }
            if more {
                // A full page was read: come back for the rest after the socket took this one.
                for s in &self.sessions {
                    self.shared.poke(s.id);
                }
            }
            if self.hello_done && self.sessions.is_empty() {
                return End::NoSessions;
            }
            // The wait ends before the input is handled, so the two never share the task's
            // storage (the waiting futures would otherwise stay alive through the handling).
            // One small future (three references): the doorbell first, then the socket.
            let (shared, stream, rbuf) = (&self.shared, &mut self.stream, &mut self.rbuf);
            let input = poll_fn(|cx| {
                if shared.poll_rung(cx).is_ready() {
                    return Poll::Ready(None);
                }
                poll_read_into(cx, stream, rbuf).map(Some)
            })
            .await;
            match input {
                None => continue,
                Some(Ok(0)) => return End::ClientClosed,
                Some(Err(e)) => return End::Io(e),
                Some(Ok(_)) => {}
            }
            // Boxed: frame handling (sessions opening, subscribing) awaits deep futures;
            // inline, they would sit in every idle connection's task (≈ 2 KB each), boxed they
            // exist only while a frame is handled.
            if let Some(end) = Box::pin(self.handle_input_or_end()).await {
                return end;
            }
        }
    }

    /// Handles the input; if it ends the connection, writes what it answered first.
    async fn handle_input_or_end(&mut self) -> Option<End> {
        let end = self.handle_input().await?;
        let _ = self.write_out().await;
        Some(end)
    }

    /// The outbox asked this connection to close: a drain first writes what was queued (and the
    /// mailbox pages its pokes ask for), then the final frame goes out.
    async fn close_with(
        &mut self,
        frames: Vec<super::outbox::Outbound>,
        pokes: Vec<u32>,
        close: Close,
    ) -> End {
        let drain = matches!(close, Close::Bye(..));
        if drain {
            // Drain: what was already queued for this client goes out before the BYE.
            for f in &frames {
                f.write_into(&mut self.out);
            }
            for sid in pokes {
                self.pull_mailbox(sid, &mut Vec::new());
            }
        }
        drop(frames);
        self.final_frame(&close);
        let _ = self.write_out().await;
        if drain {
            self.linger().await;
        }
        End::Closed(close)
    }

    /// After a drain's BYE: keeps reading for a short while so the acks the client sends for what
    /// it already received are recorded (the node flushes acks before it leaves), until the
    /// client closes. Other frames are ignored; the sessions are gone from this node's point of
    /// view once the client hangs up.
    async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER;
        loop {
            let read = tokio::time::timeout_at(deadline, read_some(&mut self.stream, &mut self.rbuf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            loop {
                match frame::decode(&mut self.rbuf, self.room.config.max_frame) {
                    Ok(Some(Frame {
                        kind: Some(Kind::Ack(a)),
                    })) => self.on_ack(a.session_id, a.seq),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }

    /// Decodes and handles every complete frame in the read buffer. Only a whole frame counts as
    /// life for the idle timeout (docs/PROTOCOL.md §6): bytes of a frame still incomplete do not,
    /// so a client trickling a partial frame is closed at the idle deadline like a silent one.
    async fn handle_input(&mut self) -> Option<End> {
        loop {
            match frame::decode(&mut self.rbuf, self.room.config.max_frame) {
                Ok(Some(f)) => {
                    self.shared.touch(self.room.now());
                    if let Some(end) = self.on_frame(f).await {
                        return Some(end);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.room.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::BadFrame,
                    };
                    info!(conn = self.shared.id, peer = %self.shared.peer, error = %e, "bad frame; closing");
                    let close = Close::Error(code, e.to_string());
                    self.final_frame(&close);
                    return Some(End::Closed(close));
                }
            }
        }
        if self.rbuf.is_empty() {
            // Between frames: hold no buffer.
            self.rbuf = BytesMut::new();
        }
        None
    }

    async fn on_frame(&mut self, f: Frame) -> Option<End> {
        let kind = f.kind?;
        if !self.hello_done {
            return match kind {
                Kind::Hello(h) => self.on_hello(h).await,
                _ => Some(self.fail(ErrorCode::BadRequest, "the first frame must be HELLO")),
            };
        }
        match kind {
            Kind::Hello(_) => return Some(self.fail(ErrorCode::BadRequest, "HELLO was already sent")),
            Kind::OpenSession(o) => self.on_open(o).await,
            Kind::CloseSession(c) => {
                if let Some(i) = self.find(c.session_id) {
                    if let (true, Some(expiry_s)) = (self.sessions[i].kept, c.expiry_s) {
                        if let Err(e) = self.keep_change(i, SubsChange::Expiry(expiry_s)).await {
                            info!(conn = self.shared.id, reason = %e, "kept session's expiry not changed");
                        }
                    }
                    let s = self.sessions.swap_remove(i);
                    self.drop_session(&s, true);
                }
                self.send(Kind::SessionClosed(pc::SessionClosed {
                    session_id: c.session_id,
                    reason: "closed".into(),
                }));
            }
            Kind::Ping(p) => {
                if p.interval_ms > 0 {
                    self.set_heartbeat(p.interval_ms);
                }
                self.send(Kind::Pong(pc::Pong { id: p.id }));
            }
            Kind::Ack(a) => self.on_ack(a.session_id, a.seq),
            Kind::Subscribe(s) => {
                let cursor = TopicCursor {
                    topic: s.topic,
                    last_seq: s.last_seq,
                };
                self.subscribe(s.session_id, cursor, s.options, true).await;
            }
            Kind::Unsubscribe(u) => {
                if let Some(i) = self.find(u.session_id) {
                    let s = &mut self.sessions[i];
                    if u.topic != BROADCAST {
                        s.topics.retain(|t| *t != u.topic);
                        self.room.unsubscribe(&s.app, &u.topic, self.shared.id, s.id);
                    }
                    if s.kept {
                        if let Err(e) = self.keep_change(i, SubsChange::Unsubscribe(vec![u.topic])).await {
                            info!(conn = self.shared.id, reason = %e, "unsubscribe not kept");
                        }
                    }
                }
            }
            Kind::GetRetained(g) => self.send_retained(g.session_id, g.filter).await,
            Kind::Upstream(u) => self.on_upstream(u),
            Kind::PublishTopic(p) => self.on_publish_topic(p),
            Kind::RefreshToken(r) => Box::pin(self.on_refresh(r.session_id, &r.token)).await,
            Kind::Bye(_) => return Some(End::ClientClosed),
            // Frames only a server sends.
            _ => return Some(self.fail(ErrorCode::BadRequest, "unexpected frame from a client")),
        }
        None
    }

    async fn on_hello(&mut self, h: pc::Hello) -> Option<End> {
        if h.version != herald_proto::PROTOCOL_VERSION {
            return Some(self.fail(
                ErrorCode::UnsupportedVersion,
                &format!(
                    "protocol version {} is not supported (this node speaks 1)",
                    h.version
                ),
            ));
        }
        let Some(o) = h.session else {
            return Some(self.fail(ErrorCode::BadRequest, "HELLO carries no session"));
        };
        if h.heartbeat_ms > 0 {
            self.set_heartbeat(h.heartbeat_ms);
        }
        let sid = o.session_id;
        match self.open(o).await {
            Ok(()) => {
                self.hello_done = true;
                self.shared.set_authed();
                None
            }
            Err((code, msg)) => {
                self.room.stats.rejected_auth.fetch_add(1, Ordering::Relaxed);
                info!(conn = self.shared.id, peer = %self.shared.peer, ?code, reason = %msg, "hello refused");
                self.send(Kind::Error(pc::Error {
                    session_id: sid,
                    code: code as i32,
                    message: msg.clone(),
                }));
                Some(End::Closed(Close::Error(code, msg)))
            }
        }
    }

    async fn on_open(&mut self, o: OpenSession) {
        let sid = o.session_id;
        let refused = if self.sessions.len() >= MAX_SESSIONS_PER_CONN {
            Some((
                ErrorCode::TooManySessions,
                format!("at most {MAX_SESSIONS_PER_CONN} sessions per connection"),
            ))
        } else {
            self.open(o).await.err()
        };
        if let Some((code, msg)) = refused {
            self.room.stats.rejected_auth.fetch_add(1, Ordering::Relaxed);
            self.send(Kind::Error(pc::Error {
                session_id: sid,
                code: code as i32,
                message: msg,
            }));
        }
    }

    /// Opens a session: token, Raft registration, local indexes, WELCOME, topics, mailbox replay.
    async fn open(&mut self, o: OpenSession) -> Result<(), (ErrorCode, String)> {
        if o.session_id == 0 {
            return Err((ErrorCode::BadRequest, "session_id must not be 0".into()));
        }
        if self.find(o.session_id).is_some() {
            return Err((
                ErrorCode::SessionExists,
                format!("session {} is already open here", o.session_id),
            ));
        }
        for (what, v) in [("app", &o.app), ("user", &o.user), ("device", &o.device)] {
            if v.is_empty() || v.len() > MAX_NAME {
                return Err((
                    ErrorCode::BadRequest,
                    format!("{what} must be 1 to {MAX_NAME} bytes"),
                ));
            }
        }
        if o.platform.len() > MAX_NAME || o.topics.len() > MAX_TOPICS_PER_SESSION {
            return Err((ErrorCode::BadRequest, "platform or topic list too long".into()));
        }
        let opened = Box::pin(register(self.room.clone(), self.shared.clone(), o)).await?;
        let Opened {
            session,
            welcome,
            topics,
            kept,
        } = opened;
        let sid = session.id;
        push_small(&mut self.sessions, session);
        self.send(Kind::Welcome(welcome));
        // A kept session's subscriptions first (already kept: not committed again).
        for k in kept {
            let t = TopicCursor {
                topic: k.filter,
                last_seq: None,
            };
            self.subscribe(sid, t, k.options, false).await;
        }
        for t in topics {
            self.subscribe(sid, t, 0, true).await;
        }
        // Replay what the device has not acked.
        self.shared.poke(sid);
        Ok(())
    }

    fn on_ack(&mut self, sid: u32, seq: u64) {
        let Some(i) = self.find(sid) else { return };
        let s = &mut self.sessions[i];
        // A client cannot ack what it was never sent.
        let seq = seq.min(s.delivered);
        if seq > s.acked {
            s.acked = seq;
            self.room
                .acks
                .record(&s.app, &s.user, &s.device, s.delivered, s.acked);
            self.room.stats.acks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_upstream(&mut self, u: pc::Upstream) {
        let Some(i) = self.find(u.session_id) else {
            self.send(Kind::UpstreamReply(pc::UpstreamReply {
                session_id: u.session_id,
                request_id: u.request_id,
                payload: Bytes::new(),
                error: ErrorCode::UnknownSession as i32,
                message: "no such session".into(),
            }));
            return;
        };
        let s = &self.sessions[i];
        let app = match self.room.meta().app(&s.app) {
            Ok(Some(a)) => a,
            _ => {
                self.send(upstream_error(
                    u.session_id,
                    u.request_id,
                    ErrorCode::UnknownApp,
                    "unknown app",
                ));
                return;
            }
        };
        let shared = self.shared.clone();
        let sid = u.session_id;
        let rid = u.request_id;
        let fits = self.room.config.max_frame.saturating_sub(frame::PUSH_HEADROOM);
        match self
            .room
            .coordinator
            .upstream(&app, self.shared.id, &s.user, &s.device, rid, u.payload)
        {
            Ok(rx) => {
                tokio::spawn(async move {
                    let reply = match rx.await {
                        Ok(Ok(payload)) if payload.len() > fits => {
                            warn!(size = payload.len(), fits, "backend reply exceeds the max frame");
                            let msg = format!(
                                "the backend's reply of {} bytes does not fit in a frame ({fits} bytes)",
                                payload.len()
                            );
                            upstream_error(sid, rid, ErrorCode::UpstreamFailed, &msg).into_reply()
                        }
                        Ok(Ok(payload)) => pc::UpstreamReply {
                            session_id: sid,
                            request_id: rid,
                            payload,
                            error: 0,
                            message: String::new(),
                        },
                        Ok(Err(e)) => {
                            let code = match e {
                                UpstreamFailure::Failed { .. } => ErrorCode::UpstreamFailed,
                                UpstreamFailure::Unavailable(_) => ErrorCode::UpstreamUnavailable,
                            };
                            upstream_error(sid, rid, code, &e.to_string()).into_reply()
                        }
                        Err(_) => {
                            upstream_error(sid, rid, ErrorCode::UpstreamUnavailable, "node shutting down")
                                .into_reply()
                        }
                    };
                    shared.push(super::outbox::Outbound::Frame(frame::encode_to_bytes(&Frame {
                        kind: Some(Kind::UpstreamReply(reply)),
                    })));
                });
            }
            Err(e) => self.send(upstream_error(
                sid,
                rid,
                ErrorCode::UpstreamUnavailable,
                &e.to_string(),
            )),
        }
    }

    /// A client's own publish to a topic the app allows (`AppConfig::client_publish`): committed
    /// like the API's PublishTopic; the answer comes when it is (or why not).
    fn on_publish_topic(&mut self, p: pc::PublishTopic) {
        let (sid, rid) = (p.session_id, p.request_id);
        let answer = move |seq: u64, code: ErrorCode, msg: String| pc::TopicPublished {
            session_id: sid,
            request_id: rid,
            topic_seq: seq,
            error: code as i32,
            message: msg,
        };
        let Some(i) = self.find(sid) else {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::UnknownSession,
                "no such session".into(),
            )));
        };
        let app = match self.room.meta().app(&self.sessions[i].app) {
            Ok(Some(a)) => a,
            _ => {
                return self.send(Kind::TopicPublished(answer(
                    0,
                    ErrorCode::UnknownApp,
                    "unknown app".into(),
                )))
            }
        };
        let t = p.topic.as_str();
        let valid = !t.is_empty()
            && t.len() <= MAX_NAME
            && t != BROADCAST
            && !t.starts_with('$')
            && herald_mqtt::topic::validate_name(t).is_ok();
        if !valid {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::BadRequest,
                "a topic name of 1 to 256 bytes, without + or # and not starting with $".into(),
            )));
        }
        if !app
            .client_publish
            .iter()
            .any(|f| herald_mqtt::topic::matches(f, t))
        {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::PermissionDenied,
                format!("app {:?} does not let its clients publish to {t:?}", app.id),
            )));
        }
        if p.payload.len() > app.limits.max_payload as usize {
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::BadRequest,
                format!(
                    "payload of {} bytes exceeds the app's limit of {}",
                    p.payload.len(),
                    app.limits.max_payload
                ),
            )));
        }
        // Bounded: each waits for a Raft commit in its own task.
        let in_flight = &self.shared.publishes_in_flight;
        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_PUBLISHES_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            return self.send(Kind::TopicPublished(answer(
                0,
                ErrorCode::RateLimited,
                format!("at most {MAX_PUBLISHES_IN_FLIGHT} publishes waiting per connection"),
            )));
        }
        let raft = self.room.groups.of_topic(&app.id, &p.topic).clone();
        let publish = herald_raft::Publish {
            app: app.id,
            topic: p.topic,
            msg_id: format!("c{}-{:016x}", self.room.groups.id(), rand::random::<u64>()),
            payload: p.payload,
            idempotency_key: None,
        };
        let op = if p.retain {
            Op::PublishRetained {
                publish,
                ttl_ms: p.retain_ttl_ms,
            }
        } else {
            Op::Publish(publish)
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reply = match raft.write_one(op).await {
                Ok((OpResult::Published(p), _)) => answer(p.seq, ErrorCode::Unspecified, String::new()),
                Ok((OpResult::Rejected(r), _)) => answer(0, ErrorCode::BadRequest, r.to_string()),
                Ok((other, _)) => answer(0, ErrorCode::Internal, format!("unexpected result {other:?}")),
                Err(e) => answer(0, ErrorCode::NotReady, e.to_string()),
            };
            shared.publishes_in_flight.fetch_sub(1, Ordering::AcqRel);
            shared.push(super::outbox::Outbound::Frame(frame::encode_to_bytes(&Frame {
                kind: Some(Kind::TopicPublished(reply)),
            })));
        });
    }

    async fn on_refresh(&mut self, sid: u32, tok: &str) {
        let Some(i) = self.find(sid) else { return };
        let check = |this: &Self| {
            let s = &this.sessions[i];
            let secrets = match this.room.meta().app(&s.app) {
                Ok(Some(a)) => a.secrets,
                _ => Vec::new(),
            };
            token::verify(tok, &secrets, &s.app, &s.user, &s.device, this.room.token_now_s())
        };
        let mut verdict = check(self);
        // A token signed with a secret added a moment ago on another node: catch up with the
        // leader once before refusing (read-your-writes, as for HELLO).
        if matches!(verdict, Err(token::TokenError::Signature))
            && self.room.barrier.catch_up(self.room.groups.meta()).await
        {
            verdict = check(self);
        }
        match verdict {
            Ok(c) => self.sessions[i].token_exp = c.exp,
            Err(e) => {
                let s = self.sessions.swap_remove(i);
                self.drop_session(&s, true);
                self.send(Kind::Error(pc::Error {
                    session_id: sid,
                    code: ErrorCode::BadToken as i32,
                    message: format!("refresh refused: {e}"),
                }));
            }
        }
    }

    /// Subscribes a session to a topic, replaying retained messages after the cursor first. In a
    /// kept session, `keep` commits the subscription (with the client's `options`) to the kept
    /// ones before it is answered; if that fails a new subscription is taken back and refused.
    async fn subscribe(&mut self, sid: u32, t: TopicCursor, options: u32, keep: bool) {
        let refuse = |this: &mut Self, code: ErrorCode, msg: &str| {
            this.send(Kind::Subscribed(pc::Subscribed {
                session_id: sid,
                // An over-long name is not echoed (the answer must stay a small frame).
                topic: if t.topic.len() > MAX_NAME {
                    String::new()
                } else {
                    t.topic.clone()
                },
                seq: 0,
                error: code as i32,
                message: msg.into(),
            }));
        };
        let Some(i) = self.find(sid) else {
            return refuse(self, ErrorCode::UnknownSession, "no such session");
        };
        let app = self.sessions[i].app.clone();
        if t.topic.is_empty() || t.topic.len() > MAX_NAME {
            return refuse(self, ErrorCode::BadRequest, "topic must be 1 to 256 bytes");
        }
        let is_broadcast = t.topic == BROADCAST;
        let filter = super::is_filter(&t.topic);
        if filter {
            if let Err(e) = herald_mqtt::topic::validate_filter(&t.topic) {
                return refuse(self, ErrorCode::BadRequest, &format!("bad topic filter: {e}"));
            }
            if t.last_seq.is_some() {
                return refuse(
                    self,
                    ErrorCode::BadRequest,
                    "a topic filter (+ or #) is live only: it takes no resume cursor",
                );
            }
        }
        let mut added = false;
        if !is_broadcast {
            if self.sessions[i].topics.len() >= MAX_TOPICS_PER_SESSION {
                return refuse(self, ErrorCode::BadRequest, "too many topics for this session");
            }
            if self.sessions[i].topics.contains(&t.topic) {
                self.room.unsubscribe(&app, &t.topic, self.shared.id, sid);
            } else {
                push_small(&mut self.sessions[i].topics, t.topic.clone());
                added = true;
            }
        }
        let mut current = if filter {
            0
        } else {
            self.room
                .topic_state(&app, &t.topic)
                .topic_meta(&app, &t.topic)
                .ok()
                .flatten()
                .map(|m| m.next_seq - 1)
                .unwrap_or(0)
        };
        match t.last_seq {
            None => {
                if is_broadcast {
                    self.room
                        .raise_floor(&app, BROADCAST, self.shared.id, sid, current);
                } else {
                    self.room
                        .subscribe(&app, &t.topic, &self.shared, sid, true, current);
                }
            }
            Some(cursor) => {
                // Not ready: live messages skip us until the replay below caught up.
                if is_broadcast {
                    self.room.unsubscribe(&app, BROADCAST, self.shared.id, sid);
                }
                self.room
                    .subscribe(&app, &t.topic, &self.shared, sid, false, cursor);
                let mut cursor = cursor;
                loop {
                    cursor = self.replay_topic(sid, &app, &t.topic, cursor);
                    if self.write_out().await.is_err() {
                        return;
                    }
                    if self.room.mark_ready(&app, &t.topic, self.shared.id, sid, cursor) {
                        break;
                    }
                }
                // The replay may have gone past the seq read above; live messages follow it.
                current = current.max(cursor);
            }
        }
        if keep {
            let Some(i) = self.find(sid).filter(|&i| self.sessions[i].kept) else {
                return self.answer_subscribed(sid, t.topic, current);
            };
            let sub = KeptSubscription {
                filter: t.topic.clone(),
                options,
            };
            if let Err(e) = self.keep_change(i, SubsChange::Subscribe(vec![sub])).await {
                if added {
                    self.sessions[i].topics.retain(|x| *x != t.topic);
                    self.room.unsubscribe(&app, &t.topic, self.shared.id, sid);
                }
                return refuse(
                    self,
                    ErrorCode::NotReady,
                    &format!("the subscription is not kept: {e}"),
                );
            }
        }
        self.answer_subscribed(sid, t.topic, current);
    }

    /// SUBSCRIBED for a subscription that took effect at topic seq `seq`.
    fn answer_subscribed(&mut self, sid: u32, topic: String, seq: u64) {
        self.send(Kind::Subscribed(pc::Subscribed {
            session_id: sid,
            topic,
            seq,
            error: 0,
            message: String::new(),
        }));
    }

    /// Commits a change to the session's kept subscriptions, fenced by its epoch: a newer session
    /// of the device (a login elsewhere) makes it a no-op.
    fn keep_change(
        &self,
        i: usize,
        change: SubsChange,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let s = &self.sessions[i];
        let op = Op::SessionSubs {
            app: s.app.to_string(),
            user: s.user.to_string(),
            device: s.device.to_string(),
            epoch: s.epoch,
            change,
        };
        // User state: the user's shard, like the registration the epoch belongs to.
        commit_keep(self.room.user_group(&s.app, &s.user).clone(), op)
    }

    /// GET_RETAINED: the retained messages of the topics `filter` matches, for a topic or filter
    /// the session is subscribed to, each a PUSH marked RETAIN_STORED. Read after catching up with
    /// the leader (a retained message set through another node just before is seen), skipping
    /// those expired by the cluster's time; a filter reads the app's retained messages a page at
    /// a time, writing each page out before the next.
    async fn send_retained(&mut self, sid: u32, filter: String) {
        let Some(i) = self.find(sid) else { return };
        if !self.sessions[i].topics.contains(&filter) {
            return debug!(conn = self.shared.id, %filter, "get_retained for a topic not subscribed; ignored");
        }
        let app = self.sessions[i].app.clone();
        let now = self.room.groups.meta().cluster_now_ms();
        let live = |m: &RetainedMessage| m.expires_ms == 0 || m.expires_ms > now;
        if !super::is_filter(&filter) {
            // A topic's retained message lives in the topic's shard.
            let group = self.room.groups.of_topic(&app, &filter).clone();
            self.room.barrier.catch_up(&group).await;
            match group.reader().retained(&app, &filter) {
                Ok(Some(m)) if live(&m) => self.send_retained_one(sid, &filter, m),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read a retained message"),
            }
            return;
        }
        // A filter matches topics of every shard: each group holding topics, one after the other.
        for group in self.room.groups.data().to_vec() {
            self.room.barrier.catch_up(&group).await;
            let mut after: Option<String> = None;
            loop {
                let page = match group.reader().retained_page(&app, after.as_deref(), PAGE) {
                    Ok(p) => p,
                    Err(e) => return warn!(error = %e, "cannot read retained messages"),
                };
                let full = page.len() == PAGE;
                for (topic, m) in page {
                    if live(&m) && herald_mqtt::topic::matches(&filter, &topic) {
                        self.send_retained_one(sid, &topic, m);
                    }
                    after = Some(topic);
                }
                if self.write_out().await.is_err() {
                    return;
                }
                if !full {
                    break;
                }
            }
        }
    }

    fn send_retained_one(&mut self, sid: u32, topic: &str, m: RetainedMessage) {
        self.send(Kind::Push(pc::Push {
            session_id: sid,
            msg_id: m.msg_id,
            seq: 0,
            topic: topic.to_string(),
            topic_seq: m.seq,
            payload: m.payload,
            qos: Qos::AtLeastOnce as i32,
            pushed_at_ms: m.pushed_ms,
            expires_at_ms: m.expires_ms,
            retain: pc::Retain::Stored as i32,
        }));
    }

    /// Writes retained topic messages after `cursor` into the output; returns the new cursor.
    fn replay_topic(&mut self, sid: u32, app: &str, topic: &str, mut cursor: u64) -> u64 {
        loop {
            let page = match self
                .room
                .topic_state(app, topic)
                .topic_since(app, topic, cursor, PAGE)
            {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "cannot read topic log");
                    return cursor;
                }
            };
            for m in &page {
                if m.seq > cursor + 1 {
                    self.send(Kind::Gap(pc::Gap {
                        session_id: sid,
                        topic: topic.into(),
                        from_seq: cursor + 1,
                        to_seq: m.seq - 1,
                        reason: GapReason::Trimmed as i32,
                    }));
                }
                self.send(Kind::Push(pc::Push {
                    session_id: sid,
                    msg_id: m.msg_id.clone(),
                    seq: 0,
                    topic: topic.into(),
                    topic_seq: m.seq,
                    payload: m.payload.clone(),
                    qos: Qos::AtLeastOnce as i32,
                    pushed_at_ms: m.pushed_ms,
                    expires_at_ms: 0,
                    retain: pc::Retain::None as i32,
                }));
                cursor = m.seq;
            }
            if page.len() < PAGE {
                return cursor;
            }
        }
    }

    /// Reads the next page of a session's mailbox into the output. True when a full page was read
    /// (more may follow).
    fn pull_mailbox(&mut self, sid: u32, pushed: &mut Vec<u64>) -> bool {
        let Some(i) = self.find(sid) else { return false };
        let (app, user, device) = {
            let s = &self.sessions[i];
            (s.app.clone(), s.user.clone(), s.device.clone())
        };
        let reader = self.room.user_state(&app, &user);
        // Read the bound before the page, so a message stored in between is never taken for a hole.
        let before = match reader.mailbox_meta(&app, &user) {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "cannot read mailbox meta");
                return false;
            }
        };
        let from = self.sessions[i].delivered;
        let page = match reader.mailbox_since(&app, &user, from, PAGE) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read mailbox");
                return false;
            }
        };
        let full = page.len() == PAGE;
        let mut cursor = from;
        let mut holes = Vec::new();
        let mut frames = 0u64;
        for m in &page {
            if m.seq > cursor + 1 {
                holes.push((cursor + 1, m.seq - 1));
            }
            cursor = m.seq;
        }
        let last_known = before.next_seq.saturating_sub(1);
        if !full && last_known > cursor {
            holes.push((cursor + 1, last_known));
        }
        let meta = if holes.is_empty() {
            before
        } else {
            reader.mailbox_meta(&app, &user).ok().flatten().unwrap_or(before)
        };
        let mut hole_iter = holes.into_iter().peekable();
        for m in page {
            while let Some(&(a, b)) = hole_iter.peek() {
                if a > m.seq {
                    break;
                }
                self.gap(sid, a, b, &meta);
                hole_iter.next();
            }
            if m.payload.len() > self.room.config.max_frame.saturating_sub(frame::PUSH_HEADROOM) {
                // Only when nodes disagree on --max-frame (the push API refuses what does not
                // fit): the client would drop the connection on it and get it again on every
                // resume, so it is reported as a gap instead.
                warn!(app = %app, user = %user, seq = m.seq, size = m.payload.len(), "message exceeds the max frame; sent as a gap");
                self.room.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                self.send(Kind::Gap(pc::Gap {
                    session_id: sid,
                    topic: String::new(),
                    from_seq: m.seq,
                    to_seq: m.seq,
                    reason: GapReason::TooLarge as i32,
                }));
                continue;
            }
            if m.devices.is_empty() || m.devices.iter().any(|d| **d == *device) {
                self.send(Kind::Push(pc::Push {
                    session_id: sid,
                    msg_id: m.msg_id,
                    seq: m.seq,
                    topic: String::new(),
                    topic_seq: 0,
                    payload: m.payload,
                    qos: Qos::AtLeastOnce as i32,
                    pushed_at_ms: m.pushed_ms,
                    expires_at_ms: m.expires_ms,
                    retain: pc::Retain::None as i32,
                }));
                frames += 1;
                pushed.push(m.pushed_ms);
            }
        }
        for (a, b) in hole_iter {
            self.gap(sid, a, b, &meta);
            cursor = cursor.max(b);
        }
        let s = &mut self.sessions[i];
        if cursor > s.delivered {
            s.delivered = cursor;
            self.room
                .acks
                .record(&s.app, &s.user, &s.device, s.delivered, s.acked);
        }
        self.room.stats.deliveries.fetch_add(frames, Ordering::Relaxed);
        full
    }

    /// Reports the part of a hole that was trimmed or expired (the rest was acked by every device
    /// it was for, or was for other devices).
    fn gap(&mut self, sid: u32, a: u64, b: u64, meta: &MailboxMeta) {
        let trimmed_end = b.min(meta.trimmed_upto);
        if trimmed_end >= a {
            self.send(Kind::Gap(pc::Gap {
                session_id: sid,
                topic: String::new(),
                from_seq: a,
                to_seq: trimmed_end,
                reason: GapReason::Trimmed as i32,
            }));
        }
        let a2 = a.max(trimmed_end + 1);
        let expired_end = b.min(meta.expired_upto);
        if expired_end >= a2 {
            self.send(Kind::Gap(pc::Gap {
                session_id: sid,
                topic: String::new(),
                from_seq: a2,
                to_seq: expired_end,
                reason: GapReason::Expired as i32,
            }));
        }
    }

    /// Ends sessions whose token expired without a refresh, and tells the sweeper the next expiry.
    fn expire_tokens(&mut self) {
        let now = self.room.token_now_s();
        let expired: Vec<(u32, u64)> = self
            .sessions
            .iter()
            .filter(|s| s.token_exp <= now)
            .map(|s| (s.id, s.epoch))
            .collect();
        for (id, epoch) in expired {
            self.kick(Kick {
                session_id: id,
                epoch,
                code: KickReason::TokenExpired,
                reason: "token expired; reconnect with a fresh token".into(),
            });
        }
        let next = self.sessions.iter().map(|s| s.token_exp).min().unwrap_or(0);
        self.shared.set_token_deadline(next);
    }

    /// Ends a session because of a kick (fenced by epoch).
    fn kick(&mut self, k: Kick) {
        let Some(i) = self.find(k.session_id) else { return };
        if k.epoch != 0 && self.sessions[i].epoch != k.epoch {
            return;
        }
        let s = self.sessions.swap_remove(i);
        // The registry already moved on for every reason but token expiry.
        self.drop_session(&s, k.code == KickReason::TokenExpired);
        let redirect = if k.code == KickReason::NodeDown {
            self.room.redirects()
        } else {
            Vec::new()
        };
        info!(conn = self.shared.id, session = s.id, app = %s.app, user = %s.user, device = %s.device, reason = %k.reason, "session kicked");
        self.send(Kind::Kicked(pc::Kicked {
            session_id: s.id,
            reason: k.reason,
            redirect,
            code: k.code as i32,
        }));
    }

    /// Removes a session from the local indexes; with `unregister`, also from the registry.
    fn drop_session(&self, s: &Session, unregister: bool) {
        self.room
            .unindex_session(&s.app, &s.user, self.shared.id, s.id, &s.topics);
        if unregister {
            let raft = self.room.user_group(&s.app, &s.user).clone();
            // The session's last delivery cursor goes in the same entry as its end, so a later
            // login that finds the session ended knows everything it wrote (redelivery_bound).
            let ops = vec![
                Op::Cursors(vec![herald_raft::CursorUpdate {
                    app: s.app.to_string(),
                    user: s.user.to_string(),
                    device: s.device.to_string(),
                    delivered: s.delivered,
                    acked: s.acked,
                }]),
                Op::Unregister {
                    app: s.app.to_string(),
                    user: s.user.to_string(),
                    device: s.device.to_string(),
                    epoch: s.epoch,
                },
            ];
            tokio::spawn(async move {
                if let Err(e) = raft.write(ops).await {
                    debug!(error = %e, "unregister not committed");
                }
            });
        }
    }

    fn set_heartbeat(&self, ms: u32) {
        let c = &self.room.config;
        let ms = (ms as u64).clamp(
            c.heartbeat_min.as_millis() as u64,
            c.heartbeat_max.as_millis() as u64,
        );
        self.shared.set_idle_limit(ms * 5 / 2);
    }

    fn find(&self, sid: u32) -> Option<usize> {
        self.sessions.iter().position(|s| s.id == sid)
    }

    fn send(&mut self, kind: impl Into<Kind>) {
        frame::encode_into_vec(
            &Frame {
                kind: Some(kind.into()),
            },
            &mut self.out,
        );
    }

    /// Queues a connection-level ERROR and returns the end it leads to.
    fn fail(&mut self, code: ErrorCode, msg: &str) -> End {
        self.room.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
        info!(conn = self.shared.id, peer = %self.shared.peer, ?code, reason = msg, "closing connection");
        let close = Close::Error(code, msg.into());
        self.final_frame(&close);
        End::Closed(close)
    }

    fn final_frame(&mut self, close: &Close) {
        match close {
            Close::Error(code, msg) => {
                if *code == ErrorCode::SlowConsumer {
                    self.room.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                }
                self.send(Kind::Error(pc::Error {
                    session_id: 0,
                    code: *code as i32,
                    message: msg.clone(),
                }))
            }
            Close::Bye(reason, redirect) => self.send(Kind::Bye(pc::Bye {
                reason: reason.clone(),
                redirect: redirect.clone(),
            })),
        }
    }

    async fn write_out(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        // Fast path, no timer: most writes fit in the socket's send buffer at once.
        let mut written = 0;
        let stream = &mut self.stream;
        let fast = poll_fn(|cx| {
            while written < out.len() {
                match Pin::new(&mut *stream).poll_write(cx, &out[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Ready(Ok(false)),
                }
            }
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(|()| true)),
                Poll::Pending => Poll::Ready(Ok(false)),
            }
        })
        .await?;
        if fast {
            return Ok(());
        }
        // The client reads slower than we write: wait, bounded by the write timeout. Boxed: the
        // timer exists only while a write waits, not in every idle connection's task.
        let rest = &out[written..];
        let w = async {
            self.stream.write_all(rest).await?;
            self.stream.flush().await
        };
        match Box::pin(tokio::time::timeout(WRITE_TIMEOUT, w)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled")),
        }
    }

    /// Connection gone: sessions go offline in the registry, the node forgets the connection.
    fn cleanup(&mut self) {
        for s in std::mem::take(&mut self.sessions) {
            self.drop_session(&s, true);
        }
        self.room.remove_conn(self.shared.id);
    }
}

/// Commits an `Op::SessionSubs` (see `Conn::keep_change`).
async fn commit_keep(group: herald_raft::RaftNode, op: Op) -> Result<(), String> {
    match group.write_one(op).await {
        Ok((OpResult::Done, _)) => Ok(()),
        Ok((OpResult::Superseded { epoch }, _)) => Err(format!(
            "a newer session of the device (epoch {epoch}) holds the kept subscriptions"
        )),
        Ok((OpResult::Rejected(r), _)) => Err(r.to_string()),
        Ok((other, _)) => Err(format!("unexpected result {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The session's app and its token's claims, from this node's state machine as it is.
fn check_token(room: &Room, o: &OpenSession) -> Result<token::Claims, (ErrorCode, String)> {
    let app: AppConfig = match room.meta().app(&o.app) {
        Ok(Some(a)) => a,
        Ok(None) => return Err((ErrorCode::UnknownApp, format!("unknown app {:?}", o.app))),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    token::verify(
        &o.token,
        &app.secrets,
        &o.app,
        &o.user,
        &o.device,
        room.token_now_s(),
    )
    .map_err(|e| {
        let code = match e {
            token::TokenError::Expired { .. } => ErrorCode::TokenExpired,
            token::TokenError::WrongApp { .. }
            | token::TokenError::WrongUser { .. }
            | token::TokenError::WrongDevice { .. } => ErrorCode::PermissionDenied,
            _ => ErrorCode::BadToken,
        };
        (code, e.to_string())
    })
}

/// What [`register`] hands the connection: the session, its WELCOME, the topics the client asked
/// for, and the subscriptions a kept session continues with.
struct Opened {
    session: Session,
    welcome: pc::Welcome,
    topics: Vec<TopicCursor>,
    kept: Vec<KeptSubscription>,
}

/// Token check, Raft registration (with the start of a kept session in the same entry) and local
/// indexing of a new session (boxed by the caller).
async fn register(
    room: Arc<Room>,
    shared: Arc<ConnShared>,
    o: OpenSession,
) -> Result<Opened, (ErrorCode, String)> {
    // An unknown app or a token no secret of the app signed may be an admin write this node has
    // not applied yet: catch up with the leader once before refusing (read-your-writes).
    let claims = match check_token(&room, &o) {
        Err((ErrorCode::UnknownApp | ErrorCode::BadToken, _))
            if room.barrier.catch_up(room.groups.meta()).await =>
        {
            check_token(&room, &o)?
        }
        r => r?,
    };
    let register = Register {
        app: o.app.clone(),
        user: o.user.clone(),
        device: o.device.clone(),
        platform: o.platform.clone(),
        node: room.config.node_id,
        conn: shared.id,
        session: o.session_id,
    };
    // The registration names the device's newest session this node knows of: one registered
    // after it (a login of the device elsewhere) makes it a no-op. So a registration that commits
    // after its HELLO failed never replaces the login that followed (issue 26).
    // The user's group: its registry, mailbox and epochs.
    let group = room.user_group(&o.app, &o.user);
    let mut seen_epoch = match group.reader().session(&o.app, &o.user, &o.device) {
        Ok(s) => s.map_or(0, |s| s.epoch),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    // Until dropped, this attempt's registration is not an orphan even once applied.
    let attempt = super::registrations::Registrations::begin(&room, shared.id, o.session_id);
    // A kept session starts in the registration's entry, right after it: it continues what the
    // device's earlier sessions kept (or drops it: clean) as the session it just registered.
    let start = o.keep.map(|k| {
        Op::SessionStart(herald_raft::SessionStart {
            app: o.app.clone(),
            user: o.user.clone(),
            device: o.device.clone(),
            node: register.node,
            conn: register.conn,
            session: register.session,
            clean: k.clean,
            expiry_s: k.expiry_s,
        })
    });
    let mut retried = false;
    let (registered, kept, index) = loop {
        let mut ops = vec![Op::RegisterSeen {
            register: register.clone(),
            seen_epoch,
        }];
        ops.extend(start.clone());
        let committed = group.write(ops).await.map_err(|e| match e {
            WriteError::Invalid(m) => (ErrorCode::BadRequest, m),
            other => (
                ErrorCode::NotReady,
                format!("cannot register the session: {other}"),
            ),
        })?;
        let index = committed.log_index;
        let mut results = committed.results.into_iter();
        let result = results.next().unwrap_or(OpResult::Done);
        match result {
            OpResult::Registered(r) => {
                let kept = match results.next() {
                    None => None,
                    Some(OpResult::Kept {
                        present,
                        subscriptions,
                    }) => Some((present, subscriptions)),
                    Some(other) => {
                        return Err((
                            ErrorCode::NotReady,
                            format!("the kept session did not start ({other:?}); retry"),
                        ))
                    }
                };
                break (r, kept, index);
            }
            // The device has a session this node did not know of when proposing: usually one it
            // had not applied yet (a fast re-login through another node). This call is live (its
            // connection waits for the answer), so it is the newest login: catch up, then again
            // once, naming that session. A registration whose call is over is never re-proposed.
            OpResult::Superseded { epoch } if !retried => {
                retried = true;
                room.barrier.catch_up(group).await;
                seen_epoch = match group.reader().session(&o.app, &o.user, &o.device) {
                    Ok(s) => s.map_or(0, |s| s.epoch).max(epoch),
                    Err(e) => return Err((ErrorCode::Internal, e.to_string())),
                };
            }
            OpResult::Superseded { epoch } => {
                return Err((
                    ErrorCode::NotReady,
                    format!("logins of this device keep racing this one (epoch {epoch}); retry"),
                ))
            }
            OpResult::Rejected(r) => return Err((ErrorCode::UnknownApp, r.to_string())),
            other => return Err((ErrorCode::Internal, format!("unexpected result {other:?}"))),
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), group.reader().wait_applied(index))
        .await
        .is_err()
    {
        return Err((
            ErrorCode::NotReady,
            "this node is not caught up; try another".into(),
        ));
    }
    let app_id: Arc<str> = o.app.as_str().into();
    let user: Arc<str> = o.user.as_str().into();
    let device: Arc<str> = o.device.as_str().into();
    room.index_session(
        &app_id,
        &user,
        LocalSession {
            conn: shared.clone(),
            session_id: o.session_id,
            device: device.clone(),
            epoch: registered.epoch,
        },
    );
    attempt.taken(registered.epoch);
    // A login that raced ours and won may have been applied before we were indexed: check.
    match group.reader().session(&o.app, &o.user, &o.device) {
        Ok(Some(s)) if s.epoch != registered.epoch => shared.kick(Kick {
            session_id: o.session_id,
            epoch: registered.epoch,
            code: KickReason::Replaced,
            reason: "replaced by a newer login".into(),
        }),
        // Ended between its apply and our indexing: by a Kick or an Unregister, or because this
        // node was declared down — then the client must move to another node (a NODE_DOWN kick
        // with redirects), not give up (the fault suite saw a device stop for good here).
        Ok(None) => {
            let (code, reason) = if room.ended_by_node_down(&o.app, &o.user, registered.epoch).await {
                (KickReason::NodeDown, "node declared down")
            } else {
                (KickReason::Admin, "session ended")
            };
            shared.kick(Kick {
                session_id: o.session_id,
                epoch: registered.epoch,
                code,
                reason: reason.into(),
            })
        }
        _ => {}
    }
    // The client's cursor counts as an ack of everything up to it, but never beyond the mailbox's
    // head (applied above): a cursor past it would make the session skip the seqs new messages
    // get up to the cursor (the store clamps its record the same way).
    let head = match group.reader().mailbox_meta(&o.app, &o.user) {
        Ok(meta) => meta.map_or(0, |m| m.next_seq.saturating_sub(1)),
        Err(e) => return Err((ErrorCode::Internal, e.to_string())),
    };
    let claimed = o.last_acked_seq.min(head);
    let acked = claimed.max(registered.acked_seq);
    if claimed > registered.acked_seq {
        room.acks.record(&app_id, &user, &device, acked, acked);
    }
    let redelivery_upto = redelivery_bound(&room, &o, &registered, head);
    let c = &room.config;
    let welcome = pc::Welcome {
        session_id: o.session_id,
        epoch: registered.epoch,
        node_id: c.node_id,
        heartbeat_ms: c.heartbeat.as_millis() as u32,
        heartbeat_min_ms: c.heartbeat_min.as_millis() as u32,
        heartbeat_max_ms: c.heartbeat_max.as_millis() as u32,
        max_frame: c.max_frame as u32,
        version: herald_proto::PROTOCOL_VERSION,
        acked_seq: registered.acked_seq,
        redelivery_upto,
        session_present: kept.as_ref().is_some_and(|(present, _)| *present),
        subscriptions: kept
            .iter()
            .flat_map(|(_, subs)| subs)
            .map(|k| pc::KeptSubscription {
                topic: k.filter.clone(),
                options: k.options,
            })
            .collect(),
    };
    info!(conn = shared.id, app = %o.app, user = %o.user, device = %o.device, epoch = registered.epoch, kicked = registered.kicked.len(), "session open");
    let session = Session {
        id: o.session_id,
        app: app_id,
        user,
        device,
        epoch: registered.epoch,
        delivered: acked,
        acked,
        token_exp: claims.exp,
        topics: Vec::new(),
        kept: o.keep.is_some_and(|k| k.expiry_s > 0),
    };
    Ok(Opened {
        session,
        welcome,
        topics: o.topics,
        kept: kept.map(|(_, subs)| subs).unwrap_or_default(),
    })
}

/// The highest mailbox seq an earlier connection of the device may have written
/// (`Welcome.redelivery_upto`, MQTT's DUP flag), from what the state machine holds once this
/// registration is applied (`head` is the mailbox's last seq then):
///
/// - The registration displaced a live session of the device (a takeover, a node killed and not
///   yet declared down, a client back before its old connection ended): that connection may have
///   written anything stored until now, so `head`.
/// - Otherwise the earlier session ended first, and its end was committed together with its last
///   delivery cursor (`Conn::drop_session`), so the device's replicated delivery cursor bounds
///   what any earlier connection wrote, except when the earlier session's node died with its last
///   cursor batch uncommitted and was declared down before this login (then up to one batch of
///   `acks::FLUSH_EVERY` is resent as if new), or a kick ended it just before.
fn redelivery_bound(room: &Room, o: &OpenSession, registered: &herald_raft::Registered, head: u64) -> u64 {
    let same_device = |k: &herald_raft::Session| k.app == o.app && k.user == o.user && k.device == o.device;
    if registered.kicked.iter().any(same_device) {
        return head;
    }
    match room.user_state(&o.app, &o.user).devices(&o.app, &o.user) {
        Ok(devices) => devices
            .into_iter()
            .find(|(d, _)| *d == o.device)
            .map_or(0, |(_, s)| s.delivered.min(head)),
        // Unknown: everything may have been sent.
        Err(_) => head,
    }
}

/// Pushes growing a short vector one slot at a time: a connection's sessions and a session's
/// topics are usually one or two, and `Vec`'s first growth reserves four (three idle slots of a
/// 112-byte `Session` in every connection). Long vectors grow as usual.
pub(crate) fn push_small<T>(v: &mut Vec<T>, x: T) {
    if v.len() == v.capacity() && v.len() < 4 {
        v.reserve_exact(1);
    }
    v.push(x);
}

/// Reads what the socket has into `acc` through the thread's scratch buffer: nothing is held
/// across the wait for readability.
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, acc: &mut BytesMut) -> std::io::Result<usize> {
    poll_fn(|cx| poll_read_into(cx, stream, acc)).await
}

/// One read attempt into `acc` through the thread's scratch buffer.
fn poll_read_into<S: AsyncRead + Unpin>(
    cx: &mut std::task::Context<'_>,
    stream: &mut S,
    acc: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut rb = ReadBuf::new(&mut scratch[..]);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                acc.extend_from_slice(rb.filled());
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
}

/// An UPSTREAM_REPLY carrying an error.
struct UpstreamErr(pc::UpstreamReply);

impl UpstreamErr {
    fn into_reply(self) -> pc::UpstreamReply {
        self.0
    }
}

impl From<UpstreamErr> for Kind {
    fn from(e: UpstreamErr) -> Kind {
        Kind::UpstreamReply(e.0)
    }
}

fn upstream_error(sid: u32, rid: u64, code: ErrorCode, msg: &str) -> UpstreamErr {
    UpstreamErr(pc::UpstreamReply {
        session_id: sid,
        request_id: rid,
        payload: Bytes::new(),
        error: code as i32,
        message: msg.into(),
    })
}
