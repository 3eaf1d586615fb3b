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

mod mailbox;
mod register;
mod topics;
mod upstream;

use register::{register, Opened};

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
