//! The connection task: one per [`Connection`](crate::Connection), owning the socket.
//!
//! It runs a loop of two phases. Offline, it serves the app's commands and waits until there is a
//! session to connect for and the backoff delay has passed. Online, one `select!` drives socket
//! reads, the app's commands, the heartbeat and other timers, ack wake-ups and delivery of events
//! that did not fit in a session's channel. Frames are written in between, never concurrently.
//!
//! Back-pressure: events go into each session's bounded channel. When one is full the event waits
//! in the session's `pending` queue and the task stops reading the socket until the app has taken
//! it; so nothing is dropped and memory stays bounded. TCP then pushes back on the server, which
//! ends a connection it cannot write to (SLOW_CONSUMER) and keeps stored messages for the next
//! one. While reads are paused the dead-link check is paused too (silence is expected then).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use herald_proto::client::frame::Kind;
use herald_proto::client::{
    Ack, Bye, CloseSession, ErrorCode, Frame, GapReason as WireGapReason, Hello, KickReason, Kicked,
    OpenSession, Ping, Push, RefreshToken, Subscribe, Subscribed, TopicCursor, Unsubscribe, Upstream,
};
use herald_proto::frame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, BackoffConfig};
use crate::config::{validate_topic, SessionConfig, MAX_TOPICS};
use crate::dedupe::DedupeFilter;
use crate::dispatch::{self, DispatchInfo};
use crate::error::{code_of, kick_code_of};
use crate::event::{DisconnectReason, Event, Gap, GapReason, Message, Qos};
use crate::heartbeat::{HeartbeatConfig, HeartbeatPolicy};
use crate::nodes::NodeList;
use crate::shared::SessionShared;
use crate::store::Cursors;
use crate::token::{refresh_in, TokenSource};
use crate::transport::{self, Io, TlsConfig};
use crate::{ClientError, ConnectionState};

/// A stuck write this long means the link is dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay before asking a failing token provider again.
const TOKEN_RETRY: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last cursor saves.
const SAVE_GRACE: Duration = Duration::from_secs(5);
/// Read buffer capacity kept per connection.
const READ_BUF: usize = 8 * 1024;
/// The app-wide broadcast topic: implicit in every session, resumed like a topic.
const BROADCAST: &str = "*";
/// How long after giving up on a login attempt, on top of the handshake timeout, a `REPLACED`
/// kick is still blamed on that attempt (see [`AbandonedOpens`]). The node stops waiting for a
/// registration after its write timeout (5 s by default) and answers `NOT_READY`, but the Raft
/// entry may still commit after an election or once a partition heals; 30 s covers both, and
/// later than that a `REPLACED` is taken at its word.
const OWN_LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Abandoned login attempts remembered per session; the oldest is forgotten first.
const MAX_ABANDONED: usize = 8;

/// Settings of one connection, fixed when it is built.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    /// gRPC addresses to ask Dispatch.
    pub(crate) dispatch_seeds: Vec<String>,
    /// Client addresses to use without (or before) Dispatch.
    pub(crate) static_nodes: Vec<String>,
    /// TLS, or plain TCP when `None`.
    pub(crate) tls: Option<TlsConfig>,
    /// Local backoff parameters.
    pub(crate) backoff: BackoffConfig,
    /// Set when the app chose the backoff: Dispatch's values are then ignored.
    pub(crate) backoff_pinned: bool,
    /// Heartbeat policy settings.
    pub(crate) heartbeat: HeartbeatConfig,
    /// TCP connect plus TLS handshake.
    pub(crate) connect_timeout: Duration,
    /// From connect to the first WELCOME (or ERROR).
    pub(crate) handshake_timeout: Duration,
    /// One Dispatch call.
    pub(crate) dispatch_timeout: Duration,
    /// Refresh the node list this often even when all is well.
    pub(crate) dispatch_refresh: Duration,
    /// After failures, ask Dispatch again at most this often.
    pub(crate) dispatch_min_interval: Duration,
    /// Sent in HELLO for the server's logs.
    pub(crate) client_name: String,
    /// Largest frame accepted before WELCOME announces the server's maximum.
    pub(crate) max_frame: usize,
}

/// What the app asks of the connection task.
pub(crate) enum Command {
    Open {
        session: Box<OpenRequest>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Close {
        sid: u32,
        reply: oneshot::Sender<()>,
    },
    /// The app dropped a session's event stream.
    Dropped {
        sid: u32,
    },
    Subscribe {
        sid: u32,
        topic: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Unsubscribe {
        sid: u32,
        topic: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Upstream {
        sid: u32,
        payload: Bytes,
        reply: oneshot::Sender<Result<Bytes, ClientError>>,
    },
    SetNetwork(String),
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A session being added to the connection.
pub(crate) struct OpenRequest {
    pub(crate) cfg: SessionConfig,
    pub(crate) token: String,
    pub(crate) shared: Arc<SessionShared>,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) restored: Cursors,
}

/// Results of work the task handed to helper tasks.
enum Internal {
    Token {
        sid: u32,
        why: TokenWhy,
        result: Result<String, ClientError>,
    },
    Dispatch(Result<DispatchInfo, ClientError>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenWhy {
    /// The current one expires soon: send REFRESH_TOKEN.
    Refresh,
    /// The server refused the current one: open again with a new one.
    Rejected { code: ErrorCode },
}

/// Where a session stands on the current link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessState {
    /// Not open on any link; opened at the next chance.
    Idle,
    /// HELLO or OPEN_SESSION sent, WELCOME awaited.
    Opening,
    /// WELCOME received.
    Live,
    /// Over: only its last events remain to be delivered.
    Finished,
}

struct PendingUpstream {
    /// Kept until sent (a request made while offline is sent after the reconnect).
    payload: Bytes,
    /// The caller, waiting for the reply.
    reply: oneshot::Sender<Result<Bytes, ClientError>>,
    /// Written on the current link (a lost link fails it: the outcome is unknown).
    sent: bool,
}

struct PendingSub {
    /// The topic subscribed to.
    topic: String,
    /// The caller, waiting for the answer; `None` once it gave up on it (an unsubscribe
    /// overtook the subscribe), while the server's answer is still due.
    reply: Option<oneshot::Sender<Result<(), ClientError>>>,
    /// How the request travels on the current link.
    state: SubState,
}

/// Where a subscribe request stands. SUBSCRIBED carries no request id: the server answers the
/// topics of a handshake first, in order, then SUBSCRIBEs in the order they were sent, so an
/// answer belongs to the oldest request still waiting in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// Not on this link yet: rides in the next handshake, or is sent after the WELCOME of the one
    /// in flight.
    Queued,
    /// Carried by the handshake of this link; answered by its SUBSCRIBED.
    InHandshake,
    /// SUBSCRIBE written on this link.
    Sent,
}

/// Login attempts (HELLO or OPEN_SESSION) of one session that the SDK gave up on without a
/// definite answer, oldest first: no answer before the handshake timeout, the link lost before
/// WELCOME or ERROR, or ERROR `NOT_READY` (the node could not tell whether the registration would
/// commit).
///
/// Such a registration may still commit after the SDK opened the session elsewhere, and since
/// epochs are allocated at commit it then carries the higher epoch and kicks the live session
/// with `REPLACED`, "a newer login" that is the client itself. Each remembered attempt excuses
/// one `REPLACED` that arrives within the handshake timeout plus [`OWN_LOGIN_GRACE`] after the
/// SDK gave up on it: the session is opened again instead of ended. The bound matters because
/// the SDK cannot tell its own late registration from a genuinely different login with the same
/// device id (KICKED names neither an epoch nor a connection); such a login loses at most one
/// round per abandoned attempt.
#[derive(Debug, Default)]
pub(crate) struct AbandonedOpens {
    /// When each attempt was given up on, and the node address it was sent to (for logs).
    list: VecDeque<(Instant, String)>,
}

impl AbandonedOpens {
    /// Remembers an attempt given up on at `at` (bounded: the oldest is forgotten first).
    pub(crate) fn record(&mut self, at: Instant, addr: &str) {
        if self.list.len() >= MAX_ABANDONED {
            self.list.pop_front();
        }
        self.list.push_back((at, addr.to_owned()));
    }

    /// Consumes the oldest attempt given up on at most `window` before `now`, forgetting older
    /// ones; `None` when there is none.
    pub(crate) fn take(&mut self, now: Instant, window: Duration) -> Option<(Instant, String)> {
        while let Some((at, addr)) = self.list.pop_front() {
            if now.saturating_duration_since(at) <= window {
                return Some((at, addr));
            }
        }
        None
    }

    /// How many are remembered.
    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.list.len()
    }
}

/// The task's view of one session.
struct Session {
    /// State shared with the app side.
    shared: Arc<SessionShared>,
    /// The app's settings.
    cfg: SessionConfig,
    /// Where tokens come from.
    token_source: TokenSource,
    /// The token sent in the next HELLO/OPEN_SESSION.
    token: String,
    /// A token request is in flight.
    token_fetching: bool,
    /// Already asked the provider once after a refusal (reset by a WELCOME).
    auth_retried: bool,
    /// When to ask the provider for a fresh token (proactive refresh, or a retry).
    token_due: Option<(Instant, TokenWhy)>,
    /// Where the session stands on the current link.
    state: SessState,
    /// Sender of the app's event stream.
    events: mpsc::Sender<Event>,
    /// Events waiting for room in the channel; the socket is not read while any wait.
    pending: VecDeque<Event>,
    /// Duplicate filter.
    filter: DedupeFilter,
    /// Subscribed topics (besides `*`).
    topics: BTreeSet<String>,
    /// The topics the last HELLO or OPEN_SESSION carried, to reconcile changes made while the
    /// session was opening.
    handshake_topics: BTreeSet<String>,
    /// Topics of the handshake whose SUBSCRIBED has not arrived yet, in the order sent (the
    /// server answers them in that order, before any SUBSCRIBE).
    handshake_answers: VecDeque<String>,
    /// Highest ack the server has from us.
    ack_sent: u64,
    /// Upstream requests by request id (bounded by the client's in-flight slots).
    upstreams: HashMap<u64, PendingUpstream>,
    /// Next request id; ids are unique within the session.
    next_request: u64,
    /// Subscribes awaiting confirmation, oldest first.
    subs: VecDeque<PendingSub>,
    /// Login attempts given up on without a definite answer: they may still replace the session.
    abandoned: AbandonedOpens,
    /// Not opened before this: the jittered delay after a `REPLACED` blamed on an abandoned
    /// attempt, so that clients kicked together (a healed partition) do not return together.
    reopen_at: Option<Instant>,
}

impl Session {
    fn emit(&mut self, ev: Event) {
        if self.pending.is_empty() {
            match self.events.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => self.pending.push_back(ev),
                // The app dropped the stream; the Dropped command closes the session.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        } else {
            self.pending.push_back(ev);
        }
    }

    fn is_active(&self) -> bool {
        self.state != SessState::Finished
    }

    /// Can be put in a handshake now.
    fn can_open(&self) -> bool {
        self.state == SessState::Idle
            && !self.token_fetching
            && self.reopen_at.is_none_or(|t| t <= Instant::now())
    }

    /// The HELLO or OPEN_SESSION in flight gets no definite answer: its registration may still
    /// commit (see [`AbandonedOpens`]).
    fn abandon_open(&mut self, addr: &str, why: &str) {
        tracing::debug!(session = self.shared.id, %addr, why, "login attempt abandoned; it may still register");
        self.abandoned.record(Instant::now(), addr);
        self.shared
            .abandoned_logins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn fail_all(&mut self, err: &ClientError) {
        for (_, u) in self.upstreams.drain() {
            let _ = u.reply.send(Err(err.clone()));
        }
        for s in self.subs.drain(..) {
            if let Some(r) = s.reply {
                let _ = r.send(Err(err.clone()));
            }
        }
    }

    /// The session is no longer open on the link (lost, or ended by the server in a way the SDK
    /// recovers from): it is opened again at the next chance, with its current cursors. Upstream
    /// requests written on the link fail (their outcome is unknown); subscribes are kept for the
    /// next handshake.
    fn went_offline(&mut self, reason: DisconnectReason) {
        if self.state == SessState::Live {
            self.emit(Event::Disconnected { reason });
        }
        self.state = SessState::Idle;
        fail_sent(self, ClientError::Disconnected);
        self.subs.retain_mut(|p| {
            p.state = SubState::Queued;
            p.reply.is_some()
        });
        self.handshake_answers.clear();
    }

    /// SUBSCRIBED: the answer to a topic of the handshake or to the oldest SUBSCRIBE sent.
    fn on_subscribed(&mut self, sub: Subscribed) {
        let sid = self.shared.id;
        let pending = if self.handshake_answers.front() == Some(&sub.topic) {
            self.handshake_answers.pop_front();
            self.subs
                .iter()
                .position(|p| p.state == SubState::InHandshake && p.topic == sub.topic)
        } else {
            match self.subs.iter().position(|p| p.state == SubState::Sent) {
                Some(i) if self.subs[i].topic == sub.topic => Some(i),
                oldest => {
                    tracing::warn!(
                        session = sid,
                        topic = %sub.topic,
                        expected = ?oldest.map(|i| self.subs[i].topic.clone()),
                        "SUBSCRIBED does not answer the oldest request; matching by topic"
                    );
                    self.subs
                        .iter()
                        .position(|p| p.state == SubState::Sent && p.topic == sub.topic)
                }
            }
        };
        let reply = pending.and_then(|i| self.subs.remove(i)).and_then(|p| p.reply);
        let code = code_of(sub.error);
        let explicit = self.topics.contains(&sub.topic);
        if code == ErrorCode::Unspecified {
            if let Some(r) = reply {
                let _ = r.send(Ok(()));
            }
            // Unsubscribed while the answer was on its way: nothing to record.
            if !explicit && sub.topic != BROADCAST {
                return;
            }
            self.shared.init_topic(&sub.topic, sub.seq);
            // The implicit broadcast topic is confirmed silently (its cursor is the SDK's business).
            if explicit {
                self.emit(Event::Subscribed {
                    topic: sub.topic,
                    seq: sub.seq,
                });
            }
            return;
        }
        let message = if sub.message.is_empty() {
            format!("subscription to {:?} refused", sub.topic)
        } else {
            sub.message
        };
        tracing::info!(session = sid, topic = %sub.topic, ?code, %message, "subscription refused");
        let err = ClientError::Refused { code, message };
        if let Some(r) = reply {
            let _ = r.send(Err(err.clone()));
        }
        if explicit {
            self.topics.remove(&sub.topic);
            self.filter.forget_topic(&sub.topic);
            self.shared.forget_topic(&sub.topic);
            self.emit(Event::SubscribeFailed {
                topic: sub.topic,
                error: err,
            });
        } else if sub.topic == BROADCAST {
            // Broadcasts still arrive live; only their resume cursor was refused.
            self.shared.forget_topic(BROADCAST);
            self.emit(Event::Error(err));
        }
    }

    /// The session is over: deliver `last` (if any) and end the stream after it.
    fn finish(&mut self, last: Option<Event>, err: ClientError) {
        self.fail_all(&err);
        if let Some(ev) = last {
            self.emit(ev);
        }
        self.state = SessState::Finished;
        self.token_due = None;
        self.shared.close();
    }

    /// The HELLO/OPEN_SESSION payload; records which topics it carries.
    fn open_frame(&mut self) -> OpenSession {
        self.reopen_at = None;
        self.handshake_topics = self.topics.clone();
        let mut topics: Vec<TopicCursor> = self
            .topics
            .iter()
            .map(|t| TopicCursor {
                topic: t.clone(),
                last_seq: self.shared.topic_cursor(t),
            })
            .collect();
        // Broadcasts resume like a topic: from the last one handled, or, before any, from the seq
        // the server's SUBSCRIBED reports when the session first opens.
        if !self.topics.contains(BROADCAST) {
            topics.push(TopicCursor {
                topic: BROADCAST.into(),
                last_seq: self.shared.topic_cursor(BROADCAST),
            });
        }
        self.handshake_answers = topics.iter().map(|t| t.topic.clone()).collect();
        OpenSession {
            session_id: self.shared.id,
            app: self.cfg.app.clone(),
            user: self.cfg.user.clone(),
            device: self.cfg.device.clone(),
            platform: self.cfg.platform.clone(),
            token: self.token.clone(),
            last_acked_seq: self.shared.acked_seq(),
            topics,
            keep: None,
        }
    }

    fn schedule_refresh(&mut self) {
        self.token_due = None;
        if self.token_source.can_refresh() {
            if let Some(d) = refresh_in(&self.token, SystemTime::now()) {
                self.token_due = Some((Instant::now() + d, TokenWhy::Refresh));
            }
        }
    }
}

/// One connected socket and its per-link state.
struct Link {
    /// The socket (TCP or TLS).
    io: Box<dyn Io>,
    /// The node's client address, for logs and events.
    addr: String,
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    /// Frames encoded and not yet written; written between select rounds.
    wbuf: BytesMut,
    /// Largest frame we accept (the server's max once WELCOME says it).
    max_in: usize,
    /// Largest frame the server accepts.
    max_out: usize,
    /// The session sent in HELLO; its WELCOME completes the handshake.
    hello_sid: u32,
    /// The handshake completed (at this instant; the uptime resets the backoff).
    welcomed_at: Option<Instant>,
    /// No WELCOME or ERROR by then: give up on this node.
    handshake_deadline: Instant,
    /// Last bytes received: the dead-link check.
    last_rx: Instant,
    /// Last bytes written: with `last_rx`, how long the path was idle before a PING.
    last_tx: Instant,
    /// When the next PING is due.
    next_ping: Instant,
    /// The interval announced in the last PING (or taken from WELCOME).
    announced: Duration,
    /// Id of the last PING sent.
    ping_id: u64,
    /// The unanswered PING: id, when, and the silence before it.
    ping: Option<(u64, Instant, Duration)>,
}

impl Link {
    fn push(&mut self, kind: Kind) {
        frame::encode(&Frame { kind: Some(kind) }, &mut self.wbuf);
    }

    async fn flush(&mut self) -> Result<(), DisconnectReason> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                self.last_tx = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => Err(DisconnectReason::Io(e.to_string())),
            Err(_) => Err(DisconnectReason::Io("write timed out".into())),
        }
    }

    fn welcomed(&self) -> bool {
        self.welcomed_at.is_some()
    }
}

/// How a link ended.
enum LinkEnd {
    /// The app closed the connection.
    Shutdown,
    /// Lost; reconnect.
    Lost(DisconnectReason),
    /// No session left on it; nothing to reconnect for.
    Idle,
    /// Nothing will work with this server (unsupported version): end every session.
    Fatal(ClientError),
}

enum Flow {
    Continue,
    End(LinkEnd),
}

pub(crate) struct Task {
    /// Fixed settings, shared with helper tasks (Dispatch calls).
    cfg: Arc<ConnConfig>,
    /// The app's requests (bounded: a flood of calls waits instead of growing memory).
    cmd_rx: mpsc::Receiver<Command>,
    /// Helper tasks (token provider, Dispatch) report here, so the loop never awaits them.
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    /// Woken by the app side when there are acks to send.
    ack_wake: Arc<Notify>,
    /// Sessions by id, in id order: the oldest active one rides in HELLO.
    sessions: BTreeMap<u32, Session>,
    /// Which node to try next.
    nodes: NodeList,
    /// Delay before the next attempt.
    backoff: Backoff,
    /// Heartbeat interval (fixed or adaptive); outlives links so learning survives reconnects.
    heartbeat: HeartbeatPolicy,
    /// Jitter and seed-order randomness; per connection, no global state.
    rng: StdRng,
    /// Do not connect before this (backoff after a failure).
    retry_at: Option<Instant>,
    /// Failures since the last Dispatch answer: a failing list is refreshed before retrying.
    failures_since_dispatch: u32,
    /// When Dispatch last answered or failed (paces refreshes).
    last_dispatch: Option<Instant>,
    /// A background Dispatch call is running.
    dispatch_in_flight: bool,
    /// Set by close or when every handle is gone; every loop selects on it.
    shutdown: CancellationToken,
    /// Callers of `Connection::close` waiting for the end.
    shutdown_replies: Vec<oneshot::Sender<()>>,
    /// Published state for `Connection::state`.
    state: watch::Sender<ConnectionState>,
}

impl Task {
    pub(crate) fn new(
        cfg: ConnConfig,
        cmd_rx: mpsc::Receiver<Command>,
        ack_wake: Arc<Notify>,
        state: watch::Sender<ConnectionState>,
    ) -> Self {
        let mut rng = StdRng::from_entropy();
        let start = rng.gen::<u32>() as usize;
        let (internal_tx, internal_rx) = mpsc::channel(16);
        Task {
            nodes: NodeList::new(cfg.static_nodes.clone(), start),
            backoff: Backoff::new(cfg.backoff),
            heartbeat: HeartbeatPolicy::new(cfg.heartbeat),
            cfg: Arc::new(cfg),
            cmd_rx,
            internal_tx,
            internal_rx,
            ack_wake,
            sessions: BTreeMap::new(),
            rng,
            retry_at: None,
            failures_since_dispatch: 0,
            last_dispatch: None,
            dispatch_in_flight: false,
            shutdown: CancellationToken::new(),
            shutdown_replies: Vec::new(),
            state,
        }
    }

    /// Publishes a state change (only a real change wakes watchers).
    fn set_state(&self, state: ConnectionState) {
        self.state.send_if_modified(|s| {
            if *s == state {
                false
            } else {
                *s = state;
                true
            }
        });
    }

    pub(crate) async fn run(mut self) {
        loop {
            if !self.wait_offline().await {
                break;
            }
            if self.dispatch_due() {
                self.refresh_nodes_inline().await;
                if self.shutdown.is_cancelled() {
                    break;
                }
            }
            let Some(addr) = self.nodes.next() else {
                tracing::warn!("no node to connect to");
                self.failed();
                continue;
            };
            self.set_state(ConnectionState::Connecting { addr: addr.clone() });
            tracing::debug!(%addr, "connecting");
            let connected = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = transport::connect(&addr, self.cfg.tls.as_ref(), self.cfg.connect_timeout) => r,
            };
            let io = match connected {
                Ok(io) => io,
                Err(e) => {
                    tracing::info!(%addr, error = %e, "connect failed");
                    self.failed();
                    continue;
                }
            };
            let now = Instant::now();
            let mut link = Link {
                io,
                addr,
                rbuf: BytesMut::with_capacity(READ_BUF),
                wbuf: BytesMut::new(),
                max_in: self.cfg.max_frame,
                max_out: self.cfg.max_frame,
                hello_sid: 0,
                welcomed_at: None,
                handshake_deadline: now + self.cfg.handshake_timeout,
                last_rx: now,
                last_tx: now,
                next_ping: now,
                announced: self.heartbeat.interval(),
                ping_id: 0,
                ping: None,
            };
            let end = self.run_link(&mut link).await;
            if !self.link_ended(link, end).await {
                break;
            }
        }
        self.finish().await;
    }

    // ---- offline ----------------------------------------------------------------------------

    /// Serves the app while not connected. Returns true when it is time to connect, false on
    /// shutdown.
    async fn wait_offline(&mut self) -> bool {
        loop {
            self.reap_finished();
            if self.shutdown.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            let connectable = self.sessions.values().any(Session::can_open);
            let ready = connectable && !self.backpressured() && self.retry_at.is_none_or(|t| t <= now);
            if ready {
                self.retry_at = None;
                return true;
            }
            if !connectable {
                match self.next_reopen(now) {
                    Some(t) => self.set_state(ConnectionState::Backoff { retry_in: t - now }),
                    None => self.set_state(ConnectionState::Idle),
                }
            }
            let flush = self.first_pending();
            let wake = self.offline_wake();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(c) => self.on_command(c, None),
                    None => self.shutdown.cancel(),
                },
                Some(m) = self.internal_rx.recv() => self.on_internal(m, None),
                p = reserve(flush.clone()), if flush.is_some() => self.deliver_pending(p),
                _ = tokio::time::sleep_until(wake) => self.on_token_timers(),
                _ = self.ack_wake.notified() => {}
            }
        }
    }

    fn offline_wake(&self) -> Instant {
        let now = Instant::now();
        // A passed retry time only matters once a session can open; do not spin on it.
        let mut wake = match self.retry_at {
            Some(t) if t > now => t,
            _ => now + Duration::from_secs(3600),
        };
        for s in self.sessions.values() {
            if let Some((t, _)) = s.token_due {
                wake = wake.min(t);
            }
        }
        if let Some(t) = self.next_reopen(now) {
            wake = wake.min(t);
        }
        wake
    }

    /// The earliest future time a session waits for before it may open again (see
    /// `Session::reopen_at`).
    fn next_reopen(&self, now: Instant) -> Option<Instant> {
        self.sessions
            .values()
            .filter(|s| s.state == SessState::Idle)
            .filter_map(|s| s.reopen_at)
            .filter(|t| *t > now)
            .min()
    }

    /// Counts a failed attempt and schedules the next one.
    fn failed(&mut self) {
        self.failures_since_dispatch += 1;
        let delay = self.backoff.next_delay(&mut self.rng);
        tracing::debug!(
            delay_ms = delay.as_millis() as u64,
            attempt = self.backoff.attempt(),
            "reconnect scheduled"
        );
        self.retry_at = Some(Instant::now() + delay);
        self.set_state(ConnectionState::Backoff { retry_in: delay });
    }

    fn dispatch_due(&self) -> bool {
        if self.cfg.dispatch_seeds.is_empty() || self.dispatch_in_flight {
            return false;
        }
        match self.last_dispatch {
            None => true,
            Some(t) => {
                let age = t.elapsed();
                age >= self.cfg.dispatch_refresh
                    || (self.failures_since_dispatch > 0 && age >= self.cfg.dispatch_min_interval)
                    || self.nodes.is_empty()
            }
        }
    }

    /// While connected the node list is refreshed every `dispatch_refresh`.
    fn next_periodic_dispatch(&self) -> Option<Instant> {
        if self.cfg.dispatch_seeds.is_empty() || self.dispatch_in_flight {
            return None;
        }
        Some(
            self.last_dispatch
                .map_or_else(Instant::now, |t| t + self.cfg.dispatch_refresh),
        )
    }

    fn periodic_dispatch_due(&self) -> bool {
        self.next_periodic_dispatch().is_some_and(|t| t <= Instant::now())
    }

    /// Which app and user to ask Dispatch for: the oldest active session's.
    fn dispatch_subject(&self) -> Option<(String, String)> {
        self.sessions
            .values()
            .find(|s| s.is_active())
            .map(|s| (s.cfg.app.clone(), s.cfg.user.clone()))
    }

    fn transport_name(&self) -> &'static str {
        if self.cfg.tls.is_some() {
            "tls"
        } else {
            "tcp"
        }
    }

    async fn refresh_nodes_inline(&mut self) {
        let Some((app, user)) = self.dispatch_subject() else {
            return;
        };
        let start = self.rng.gen::<u32>() as usize;
        let cfg = self.cfg.clone();
        let transport = self.transport_name();
        let result = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            r = dispatch::dispatch(&cfg.dispatch_seeds, start, &app, &user, transport, cfg.dispatch_timeout) => r,
        };
        self.dispatch_done(result);
    }

    fn spawn_dispatch(&mut self) {
        let Some((app, user)) = self.dispatch_subject() else {
            return;
        };
        self.dispatch_in_flight = true;
        let start = self.rng.gen::<u32>() as usize;
        let cfg = self.cfg.clone();
        let transport = self.transport_name();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let r = dispatch::dispatch(
                &cfg.dispatch_seeds,
                start,
                &app,
                &user,
                transport,
                cfg.dispatch_timeout,
            )
            .await;
            let _ = tx.send(Internal::Dispatch(r)).await;
        });
    }

    fn dispatch_done(&mut self, result: Result<DispatchInfo, ClientError>) {
        self.dispatch_in_flight = false;
        self.last_dispatch = Some(Instant::now());
        match result {
            Ok(info) => {
                tracing::debug!(nodes = ?info.nodes, "dispatch answered");
                self.failures_since_dispatch = 0;
                if !self.cfg.backoff_pinned {
                    let cfg = info.apply_backoff(self.backoff.config());
                    self.backoff.set_config(cfg);
                }
                self.nodes.set_dispatched(info.nodes);
            }
            Err(e) => {
                tracing::info!(error = %e, nodes = ?self.nodes.snapshot(), "no dispatch answer, keeping the node list");
            }
        }
    }

    // ---- online -----------------------------------------------------------------------------

    async fn run_link(&mut self, link: &mut Link) -> LinkEnd {
        // Handshake: the oldest session that can open rides in HELLO.
        let Some(sid) = self.sessions.values().find(|s| s.can_open()).map(|s| s.shared.id) else {
            return LinkEnd::Idle;
        };
        let (session, interval) = {
            let s = self.sessions.get_mut(&sid).expect("just found");
            s.state = SessState::Opening;
            (s.open_frame(), self.heartbeat.interval())
        };
        link.hello_sid = sid;
        link.push(Kind::Hello(Hello {
            version: herald_proto::PROTOCOL_VERSION,
            session: Some(session),
            client: self.cfg.client_name.clone(),
            heartbeat_ms: if self.cfg.heartbeat.adaptive {
                millis(interval)
            } else {
                0
            },
        }));
        loop {
            // Frames already buffered first, unless the app is behind.
            while !self.backpressured() {
                match frame::decode(&mut link.rbuf, link.max_in) {
                    Ok(Some(f)) => {
                        if let Flow::End(end) = self.on_frame(link, f) {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return LinkEnd::Lost(DisconnectReason::Protocol(e.to_string())),
                }
            }
            if let Err(reason) = link.flush().await {
                return LinkEnd::Lost(reason);
            }
            self.reap_finished();
            if link.rbuf.capacity() - link.rbuf.len() < 1024 {
                link.rbuf.reserve(READ_BUF);
            }
            // No session open or opening here (all ended, or waiting for a fresh token): the server
            // closes such a connection; leave first, and come back when a session can open.
            if !self
                .sessions
                .values()
                .any(|s| matches!(s.state, SessState::Live | SessState::Opening))
                && !self.backpressured()
            {
                return LinkEnd::Idle;
            }
            let paused = self.backpressured();
            let flush = self.first_pending();
            let wake = self.online_wake(link, paused);
            let flow = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Flow::End(LinkEnd::Shutdown),
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(c) => {
                        self.on_command(c, Some(link));
                        Flow::Continue
                    }
                    None => {
                        self.shutdown.cancel();
                        Flow::End(LinkEnd::Shutdown)
                    }
                },
                Some(m) = self.internal_rx.recv() => {
                    self.on_internal(m, Some(link));
                    Flow::Continue
                },
                _ = self.ack_wake.notified() => {
                    self.send_acks(link);
                    Flow::Continue
                },
                p = reserve(flush.clone()), if flush.is_some() => {
                    self.deliver_pending(p);
                    Flow::Continue
                },
                r = link.io.read_buf(&mut link.rbuf), if !paused => match r {
                    Ok(0) => Flow::End(LinkEnd::Lost(DisconnectReason::ClosedByServer)),
                    Ok(_) => {
                        link.last_rx = Instant::now();
                        Flow::Continue
                    }
                    Err(e) => Flow::End(LinkEnd::Lost(DisconnectReason::Io(e.to_string()))),
                },
                _ = tokio::time::sleep_until(wake) => self.on_link_timer(link, paused),
            };
            if let Flow::End(end) = flow {
                return end;
            }
        }
    }

    fn online_wake(&self, link: &Link, paused: bool) -> Instant {
        let mut wake = if link.welcomed() {
            let mut w = link.next_ping;
            if !paused {
                w = w.min(link.last_rx + link.announced * 2);
                if let (true, Some((_, sent, _))) = (self.cfg.heartbeat.adaptive, link.ping) {
                    w = w.min(sent + self.heartbeat.pong_timeout());
                }
            }
            if let Some(t) = self.next_periodic_dispatch() {
                w = w.min(t);
            }
            w
        } else {
            link.handshake_deadline
        };
        for s in self.sessions.values() {
            if let Some((t, _)) = s.token_due {
                wake = wake.min(t);
            }
        }
        if let Some(t) = self.next_reopen(Instant::now()) {
            wake = wake.min(t);
        }
        wake
    }

    fn on_link_timer(&mut self, link: &mut Link, paused: bool) -> Flow {
        let now = Instant::now();
        if !link.welcomed() {
            if now >= link.handshake_deadline {
                return Flow::End(LinkEnd::Lost(DisconnectReason::Io("handshake timed out".into())));
            }
        } else {
            if !paused {
                if let (true, Some((id, sent, _))) = (self.cfg.heartbeat.adaptive, link.ping) {
                    if now >= sent + self.heartbeat.pong_timeout() {
                        tracing::info!(addr = %link.addr, ping = id, interval_ms = millis(link.announced), "ping unanswered");
                        self.heartbeat.on_missed();
                        return Flow::End(LinkEnd::Lost(DisconnectReason::HeartbeatTimeout));
                    }
                }
                if now >= link.last_rx + link.announced * 2 {
                    tracing::info!(addr = %link.addr, interval_ms = millis(link.announced), "link silent for two intervals");
                    self.heartbeat.on_missed();
                    return Flow::End(LinkEnd::Lost(DisconnectReason::HeartbeatTimeout));
                }
            }
            if now >= link.next_ping {
                self.send_ping(link, now);
            }
            if self.periodic_dispatch_due() {
                self.spawn_dispatch();
            }
            if self
                .sessions
                .values()
                .any(|s| s.reopen_at.is_some() && s.can_open())
            {
                self.open_waiting(link);
            }
        }
        self.on_token_timers();
        Flow::Continue
    }

    fn send_ping(&mut self, link: &mut Link, now: Instant) {
        let interval = self.heartbeat.interval();
        let idle = now.saturating_duration_since(link.last_rx.max(link.last_tx));
        link.ping_id += 1;
        link.push(Kind::Ping(Ping {
            id: link.ping_id,
            interval_ms: millis(interval),
        }));
        link.ping = Some((link.ping_id, now, idle));
        link.announced = interval;
        link.next_ping = now + interval;
        // A good moment to forget upstream requests whose caller gave up.
        for s in self.sessions.values_mut() {
            s.upstreams.retain(|_, u| !u.reply.is_closed());
        }
    }

    fn on_token_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<(u32, TokenWhy)> = self
            .sessions
            .values()
            .filter_map(|s| {
                s.token_due
                    .filter(|(t, _)| *t <= now)
                    .map(|(_, why)| (s.shared.id, why))
            })
            .collect();
        for (sid, why) in due {
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.token_due = None;
                self.fetch_token(sid, why);
            }
        }
    }

    fn fetch_token(&mut self, sid: u32, why: TokenWhy) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if s.token_fetching {
            return;
        }
        s.token_fetching = true;
        let source = s.token_source.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = source.fetch().await;
            let _ = tx.send(Internal::Token { sid, why, result }).await;
        });
    }

    // ---- frames from the server -------------------------------------------------------------

    fn on_frame(&mut self, link: &mut Link, f: Frame) -> Flow {
        let Some(kind) = f.kind else {
            return Flow::End(LinkEnd::Lost(DisconnectReason::Protocol(
                "frame without kind".into(),
            )));
        };
        match kind {
            Kind::Welcome(w) => self.on_welcome(link, w),
            Kind::Pong(p) => {
                if let Some((id, _, idle)) = link.ping {
                    if id == p.id {
                        self.heartbeat.on_answered(idle);
                        link.ping = None;
                    }
                }
                Flow::Continue
            }
            Kind::Push(p) => {
                self.on_push(p);
                Flow::Continue
            }
            Kind::Gap(g) => {
                if let Some(s) = self.live_session(g.session_id) {
                    let topic = (!g.topic.is_empty()).then(|| g.topic.clone());
                    match &topic {
                        None => s.filter.raise_mailbox(g.to_seq),
                        Some(t) => s.filter.raise_topic(t, g.to_seq),
                    }
                    let reason = match WireGapReason::try_from(g.reason) {
                        Ok(WireGapReason::Trimmed) => GapReason::Trimmed,
                        Ok(WireGapReason::Expired) => GapReason::Expired,
                        _ => GapReason::Unspecified,
                    };
                    tracing::info!(session = g.session_id, topic = %g.topic, from = g.from_seq, to = g.to_seq, ?reason, "gap");
                    s.emit(Event::Gap(Gap {
                        topic,
                        from_seq: g.from_seq,
                        to_seq: g.to_seq,
                        reason,
                    }));
                }
                Flow::Continue
            }
            Kind::Subscribed(sub) => {
                if let Some(s) = self.live_session(sub.session_id) {
                    s.on_subscribed(sub);
                }
                Flow::Continue
            }
            Kind::UpstreamReply(r) => {
                if let Some(s) = self.sessions.get_mut(&r.session_id) {
                    if let Some(u) = s.upstreams.remove(&r.request_id) {
                        let code = code_of(r.error);
                        let result = if code == ErrorCode::Unspecified {
                            Ok(r.payload)
                        } else {
                            Err(ClientError::Upstream {
                                code,
                                message: r.message,
                            })
                        };
                        let _ = u.reply.send(result);
                    }
                }
                Flow::Continue
            }
            Kind::Kicked(k) => self.on_kicked(k),
            Kind::SessionClosed(c) => {
                // Sessions we close are gone from the map already; one still here was ended by
                // the server on its own.
                if let Some(s) = self.sessions.get_mut(&c.session_id) {
                    if s.is_active() {
                        let reason = if c.reason.is_empty() {
                            "closed by server".to_string()
                        } else {
                            c.reason
                        };
                        let err = ClientError::Kicked {
                            code: KickReason::Unspecified,
                            reason: reason.clone(),
                        };
                        s.finish(
                            Some(Event::Kicked {
                                code: KickReason::Unspecified,
                                reason,
                                redirect: Vec::new(),
                            }),
                            err,
                        );
                    }
                }
                Flow::Continue
            }
            Kind::Bye(b) => {
                tracing::info!(addr = %link.addr, reason = %b.reason, redirect = ?b.redirect, "server said bye");
                self.nodes.redirect(b.redirect.clone());
                Flow::End(LinkEnd::Lost(DisconnectReason::Bye {
                    reason: b.reason,
                    redirect: b.redirect,
                }))
            }
            Kind::Error(e) => self.on_error(link, e.session_id, code_of(e.code), e.message),
            other => Flow::End(LinkEnd::Lost(DisconnectReason::Protocol(format!(
                "unexpected frame from server: {}",
                kind_name(&other)
            )))),
        }
    }

    /// KICKED: branch on the code. `NODE_DOWN` moves the connection, `TOKEN_EXPIRED` reopens the
    /// session with a fresh token, every other code ends the session.
    fn on_kicked(&mut self, k: Kicked) -> Flow {
        let code = kick_code_of(k.code);
        let sid = k.session_id;
        if code == KickReason::NodeDown {
            tracing::info!(session = sid, redirect = ?k.redirect, "node declared down; moving");
            self.nodes.redirect(k.redirect);
            return Flow::End(LinkEnd::Lost(DisconnectReason::NodeDown));
        }
        let Some(s) = self.sessions.get_mut(&sid).filter(|s| s.is_active()) else {
            return Flow::Continue;
        };
        if code == KickReason::TokenExpired && s.token_source.can_refresh() {
            tracing::info!(
                session = sid,
                "token expired on the server; reopening with a fresh one"
            );
            s.went_offline(DisconnectReason::TokenExpired);
            s.token_due = None;
            // A fresh token that is refused again ends the session.
            s.auth_retried = true;
            self.fetch_token(
                sid,
                TokenWhy::Rejected {
                    code: ErrorCode::TokenExpired,
                },
            );
            return Flow::Continue;
        }
        if code == KickReason::TokenExpired {
            tracing::info!(session = sid, "fixed token expired; session over");
            let err = ClientError::Auth {
                code: ErrorCode::TokenExpired,
                message: k.reason,
            };
            s.finish(Some(Event::Closed(err.clone())), err);
            return Flow::Continue;
        }
        if code == KickReason::Replaced {
            let window = self.cfg.handshake_timeout + OWN_LOGIN_GRACE;
            let now = Instant::now();
            if let Some((at, addr)) = s.abandoned.take(now, window) {
                // Most likely our own registration committing late: open the session again,
                // after a jittered delay like any reconnect. Consumed: once per attempt.
                // At least 1 ms: a time in the future is what wakes the loop to reopen it.
                let delay = self.backoff.jittered(&mut self.rng).max(Duration::from_millis(1));
                tracing::info!(
                    session = sid,
                    reason = %k.reason,
                    abandoned_on = %addr,
                    abandoned_ms_ago = now.saturating_duration_since(at).as_millis() as u64,
                    delay_ms = delay.as_millis() as u64,
                    "replaced, most likely by an abandoned login attempt of this client; reopening"
                );
                s.went_offline(DisconnectReason::ReplacedByOwnAttempt);
                s.reopen_at = Some(now + delay);
                return Flow::Continue;
            }
        }
        tracing::info!(session = sid, ?code, reason = %k.reason, "session kicked");
        let err = ClientError::Kicked {
            code,
            reason: k.reason.clone(),
        };
        s.finish(
            Some(Event::Kicked {
                code,
                reason: k.reason,
                redirect: k.redirect,
            }),
            err,
        );
        Flow::Continue
    }

    fn live_session(&mut self, sid: u32) -> Option<&mut Session> {
        self.sessions.get_mut(&sid).filter(|s| s.state == SessState::Live)
    }

    fn on_welcome(&mut self, link: &mut Link, w: herald_proto::client::Welcome) -> Flow {
        let now = Instant::now();
        let sid = w.session_id;
        if sid == link.hello_sid && !link.welcomed() {
            link.welcomed_at = Some(now);
            self.heartbeat
                .set_server(ms(w.heartbeat_ms), ms(w.heartbeat_min_ms), ms(w.heartbeat_max_ms));
            link.announced = self.heartbeat.interval();
            link.next_ping = now + link.announced;
            if w.max_frame > 0 {
                link.max_in = w.max_frame as usize;
                link.max_out = w.max_frame as usize;
            }
            tracing::info!(addr = %link.addr, node_id = w.node_id, heartbeat_ms = millis(link.announced), "connected");
            self.set_state(ConnectionState::Connected {
                addr: link.addr.clone(),
                node_id: w.node_id,
            });
        }
        let opening = self.sessions.get(&sid).map(|s| s.state == SessState::Opening);
        if opening != Some(true) {
            if opening.is_none() {
                // Closed by the app while it was opening: the server has it now, we do not.
                link.push(Kind::CloseSession(CloseSession {
                    session_id: sid,
                    expiry_s: None,
                }));
            }
            if sid == link.hello_sid {
                self.open_waiting(link);
            }
            return Flow::Continue;
        }
        let s = self.sessions.get_mut(&sid).expect("checked above");
        s.state = SessState::Live;
        s.auth_retried = false;
        s.shared.adopt_server_ack(w.acked_seq);
        s.filter.raise_mailbox(w.acked_seq.max(s.shared.acked_seq()));
        let local = s.shared.acked_seq();
        if local > w.acked_seq {
            link.push(Kind::Ack(Ack {
                session_id: sid,
                seq: local,
            }));
        }
        s.ack_sent = local.max(w.acked_seq);
        // Subscriptions made while offline rode in the handshake (its SUBSCRIBEDs answer them);
        // ones made while it was in flight go now, and so do unsubscribes of topics it carried.
        for p in s.subs.iter_mut().filter(|p| p.state == SubState::Queued) {
            if s.handshake_topics.contains(&p.topic) {
                p.state = SubState::InHandshake;
            } else {
                link.push(Kind::Subscribe(Subscribe {
                    session_id: sid,
                    topic: p.topic.clone(),
                    last_seq: s.shared.topic_cursor(&p.topic),
                    options: 0,
                }));
                p.state = SubState::Sent;
            }
        }
        for t in s.handshake_topics.difference(&s.topics) {
            link.push(Kind::Unsubscribe(Unsubscribe {
                session_id: sid,
                topic: t.clone(),
            }));
        }
        for (id, u) in s.upstreams.iter_mut().filter(|(_, u)| !u.sent) {
            link.push(Kind::Upstream(Upstream {
                session_id: sid,
                request_id: *id,
                payload: u.payload.clone(),
            }));
            u.sent = true;
        }
        s.schedule_refresh();
        tracing::debug!(
            session = sid,
            epoch = w.epoch,
            acked_seq = w.acked_seq,
            "session live"
        );
        s.emit(Event::Connected {
            node_id: w.node_id,
            addr: link.addr.clone(),
            epoch: w.epoch,
        });
        if sid == link.hello_sid {
            // The handshake is done: open every other session that is waiting.
            self.open_waiting(link);
        }
        Flow::Continue
    }

    /// Sends OPEN_SESSION for every session that can open (the handshake must be done).
    fn open_waiting(&mut self, link: &mut Link) {
        if !link.welcomed() {
            return;
        }
        for s in self.sessions.values_mut().filter(|s| s.can_open()) {
            s.state = SessState::Opening;
            link.push(Kind::OpenSession(s.open_frame()));
        }
    }

    fn on_push(&mut self, p: Push) {
        let Some(s) = self.sessions.get_mut(&p.session_id) else {
            tracing::debug!(session = p.session_id, "push for an unknown session");
            return;
        };
        if !s.is_active() {
            return;
        }
        if !s.filter.accept(&p) {
            tracing::trace!(session = p.session_id, msg_id = %p.msg_id, seq = p.seq, "duplicate dropped");
            return;
        }
        let qos = if p.qos == herald_proto::client::Qos::AtLeastOnce as i32 {
            Qos::AtLeastOnce
        } else {
            Qos::AtMostOnce
        };
        s.emit(Event::Message(Message {
            msg_id: p.msg_id,
            seq: p.seq,
            topic: (!p.topic.is_empty()).then_some(p.topic),
            topic_seq: p.topic_seq,
            payload: p.payload,
            qos,
            pushed_at_ms: p.pushed_at_ms,
            session: s.shared.clone(),
        }));
    }

    fn on_error(&mut self, link: &mut Link, sid: u32, code: ErrorCode, message: String) -> Flow {
        if sid == 0 {
            tracing::warn!(addr = %link.addr, ?code, %message, "connection refused by server");
            if code == ErrorCode::UnsupportedVersion {
                return Flow::End(LinkEnd::Fatal(ClientError::Refused { code, message }));
            }
            return Flow::End(LinkEnd::Lost(DisconnectReason::ServerError { code, message }));
        }
        let is_hello = sid == link.hello_sid && !link.welcomed();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Flow::Continue;
        };
        if !s.is_active() {
            return Flow::Continue;
        }
        tracing::info!(session = sid, ?code, %message, "session error");
        // An ERROR naming a session means the session is not open (it failed to open, or a
        // refused token refresh closed it); the connection and its other sessions go on.
        let was_live = s.state == SessState::Live;
        match code {
            ErrorCode::BadToken | ErrorCode::TokenExpired => {
                s.went_offline(DisconnectReason::ServerError {
                    code,
                    message: message.clone(),
                });
                if s.token_source.can_refresh() && !s.auth_retried {
                    s.auth_retried = true;
                    self.fetch_token(sid, TokenWhy::Rejected { code });
                } else {
                    s.finish(
                        Some(Event::Closed(ClientError::Auth {
                            code,
                            message: message.clone(),
                        })),
                        ClientError::Auth { code, message },
                    );
                }
            }
            ErrorCode::NotReady => {
                // This node cannot reach the leader: move every session elsewhere. The node may
                // have proposed the registration already and it may still commit.
                if s.state == SessState::Opening {
                    s.abandon_open(&link.addr, "not ready");
                }
                s.state = SessState::Idle;
                return Flow::End(LinkEnd::Lost(DisconnectReason::NotReady));
            }
            ErrorCode::UnknownSession if was_live => {
                // The server lost track of the session: open it again.
                s.went_offline(DisconnectReason::ServerError { code, message });
                self.open_waiting(link);
            }
            _ => {
                let err = ClientError::Refused { code, message };
                s.finish(Some(Event::Closed(err.clone())), err);
            }
        }
        if is_hello {
            // The server closes a connection whose HELLO session failed; do not wait for it.
            return Flow::End(LinkEnd::Lost(DisconnectReason::ServerError {
                code,
                message: "handshake refused".into(),
            }));
        }
        Flow::Continue
    }

    fn send_acks(&mut self, link: &mut Link) {
        for s in self.sessions.values_mut().filter(|s| s.state == SessState::Live) {
            let want = s.shared.acked_seq();
            if want > s.ack_sent {
                link.push(Kind::Ack(Ack {
                    session_id: s.shared.id,
                    seq: want,
                }));
                s.ack_sent = want;
            }
        }
    }

    // ---- the app's commands -----------------------------------------------------------------

    fn on_command(&mut self, cmd: Command, mut link: Option<&mut Link>) {
        match cmd {
            Command::Open { session, reply } => {
                let OpenRequest {
                    cfg,
                    token,
                    shared,
                    events,
                    restored,
                } = *session;
                let sid = shared.id;
                let mut filter = DedupeFilter::new(cfg.dedupe_window);
                filter.raise_mailbox(restored.last_acked_seq);
                for (t, seq) in &restored.topics {
                    filter.raise_topic(t, *seq);
                }
                for id in &restored.recent_ids {
                    filter.remember_id(id);
                }
                let mut s = Session {
                    token_source: cfg.token.clone().expect("validated before open"),
                    topics: cfg.topics.iter().cloned().collect(),
                    handshake_topics: BTreeSet::new(),
                    handshake_answers: VecDeque::new(),
                    shared,
                    cfg,
                    token,
                    token_fetching: false,
                    auth_retried: false,
                    token_due: None,
                    state: SessState::Idle,
                    events,
                    pending: VecDeque::new(),
                    filter,
                    ack_sent: 0,
                    upstreams: HashMap::new(),
                    next_request: 1,
                    subs: VecDeque::new(),
                    abandoned: AbandonedOpens::default(),
                    reopen_at: None,
                };
                s.schedule_refresh();
                tracing::debug!(session = sid, app = %s.cfg.app, user = %s.cfg.user, device = %s.cfg.device, "session added");
                self.sessions.insert(sid, s);
                if let Some(l) = link.as_deref_mut() {
                    self.open_waiting(l);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Close { sid, reply } => {
                self.close_session(sid, link);
                let _ = reply.send(());
            }
            Command::Dropped { sid } => self.close_session(sid, link),
            Command::Subscribe { sid, topic, reply } => {
                let Some(s) = self.sessions.get_mut(&sid).filter(|s| s.is_active()) else {
                    let _ = reply.send(Err(ClientError::Closed));
                    return;
                };
                if let Err(e) = validate_topic(&topic) {
                    let _ = reply.send(Err(e));
                    return;
                }
                if s.topics.contains(&topic) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                if s.topics.len() >= MAX_TOPICS {
                    let _ = reply.send(Err(ClientError::Config(format!("more than {MAX_TOPICS} topics"))));
                    return;
                }
                s.topics.insert(topic.clone());
                let state = match link {
                    Some(l) if s.state == SessState::Live => {
                        let last_seq = s.shared.topic_cursor(&topic);
                        l.push(Kind::Subscribe(Subscribe {
                            session_id: sid,
                            topic: topic.clone(),
                            last_seq,
                            options: 0,
                        }));
                        SubState::Sent
                    }
                    _ => SubState::Queued,
                };
                s.subs.push_back(PendingSub {
                    topic,
                    reply: Some(reply),
                    state,
                });
            }
            Command::Unsubscribe { sid, topic, reply } => {
                let Some(s) = self.sessions.get_mut(&sid).filter(|s| s.is_active()) else {
                    let _ = reply.send(Err(ClientError::Closed));
                    return;
                };
                if s.topics.remove(&topic) {
                    s.filter.forget_topic(&topic);
                    s.shared.forget_topic(&topic);
                    // A subscribe still waiting is overtaken: its caller gets `Closed`; one the
                    // server will answer stays in line (without a caller) to keep the order.
                    s.subs.retain_mut(|p| {
                        if p.topic != topic {
                            return true;
                        }
                        tracing::debug!(session = sid, topic = %p.topic, "subscribe overtaken by unsubscribe");
                        p.reply = None;
                        p.state != SubState::Queued
                    });
                    if let (Some(l), SessState::Live) = (link, s.state) {
                        l.push(Kind::Unsubscribe(Unsubscribe {
                            session_id: sid,
                            topic,
                        }));
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Command::Upstream { sid, payload, reply } => {
                let Some(s) = self.sessions.get_mut(&sid).filter(|s| s.is_active()) else {
                    let _ = reply.send(Err(ClientError::Closed));
                    return;
                };
                let request_id = s.next_request;
                s.next_request += 1;
                let frame = Frame {
                    kind: Some(Kind::Upstream(Upstream {
                        session_id: sid,
                        request_id,
                        payload: payload.clone(),
                    })),
                };
                let len = prost::Message::encoded_len(&frame);
                let max = link.as_ref().map_or(self.cfg.max_frame, |l| l.max_out);
                if len > max {
                    let _ = reply.send(Err(ClientError::TooLarge { len, max }));
                    return;
                }
                let sent = match link {
                    Some(l) if s.state == SessState::Live => {
                        frame::encode(&frame, &mut l.wbuf);
                        true
                    }
                    _ => false,
                };
                s.upstreams
                    .insert(request_id, PendingUpstream { payload, reply, sent });
            }
            Command::SetNetwork(name) => {
                tracing::debug!(network = %name, "network changed");
                self.heartbeat.set_network(&name);
            }
            Command::Shutdown { reply } => {
                self.shutdown_replies.push(reply);
                self.shutdown.cancel();
            }
        }
    }

    fn close_session(&mut self, sid: u32, link: Option<&mut Link>) {
        let Some(mut s) = self.sessions.remove(&sid) else {
            return;
        };
        if let (Some(l), SessState::Live) = (link, s.state) {
            let want = s.shared.acked_seq();
            if want > s.ack_sent {
                l.push(Kind::Ack(Ack {
                    session_id: sid,
                    seq: want,
                }));
            }
            l.push(Kind::CloseSession(CloseSession {
                session_id: sid,
                expiry_s: None,
            }));
        }
        s.fail_all(&ClientError::Closed);
        s.shared.close();
        tracing::debug!(session = sid, "session closed");
        // Dropping `s` drops the event sender: the app's stream ends after what it holds.
    }

    fn on_internal(&mut self, m: Internal, link: Option<&mut Link>) {
        match m {
            Internal::Dispatch(r) => self.dispatch_done(r),
            Internal::Token { sid, why, result } => {
                let Some(s) = self.sessions.get_mut(&sid) else {
                    return;
                };
                s.token_fetching = false;
                if !s.is_active() {
                    return;
                }
                match (why, result) {
                    (TokenWhy::Refresh, Ok(token)) => {
                        if token != s.token {
                            s.token = token;
                            if let (Some(l), SessState::Live) = (link, s.state) {
                                l.push(Kind::RefreshToken(RefreshToken {
                                    session_id: sid,
                                    token: s.token.clone(),
                                }));
                            }
                        }
                        s.schedule_refresh();
                    }
                    (TokenWhy::Rejected { code }, Ok(token)) => {
                        if token == s.token {
                            let err = ClientError::Auth {
                                code,
                                message: "the token provider returned the refused token again".into(),
                            };
                            s.finish(Some(Event::Closed(err.clone())), err);
                        } else {
                            s.token = token;
                            s.schedule_refresh();
                            if let Some(l) = link {
                                self.open_waiting(l);
                            }
                        }
                    }
                    (why, Err(e)) => {
                        tracing::warn!(session = sid, error = %e, "token provider failed");
                        s.emit(Event::Error(e));
                        s.token_due = Some((Instant::now() + TOKEN_RETRY, why));
                    }
                }
            }
        }
    }

    // ---- event delivery ---------------------------------------------------------------------

    fn backpressured(&self) -> bool {
        self.sessions.values().any(|s| !s.pending.is_empty())
    }

    fn first_pending(&self) -> Option<(u32, mpsc::Sender<Event>)> {
        self.sessions
            .values()
            .find(|s| !s.pending.is_empty())
            .map(|s| (s.shared.id, s.events.clone()))
    }

    fn deliver_pending(&mut self, permit: (u32, Option<mpsc::OwnedPermit<Event>>)) {
        let (sid, permit) = permit;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        match permit {
            Some(p) => {
                if let Some(ev) = s.pending.pop_front() {
                    p.send(ev);
                }
            }
            // The app dropped the stream: nothing more can be delivered.
            None => s.pending.clear(),
        }
        self.reap_finished();
    }

    /// Removes finished sessions whose last events were delivered (ending their streams).
    fn reap_finished(&mut self) {
        self.sessions
            .retain(|_, s| s.is_active() || !s.pending.is_empty());
    }

    // ---- after a link -----------------------------------------------------------------------

    /// Cleans up after a link. Returns false when the task should stop.
    async fn link_ended(&mut self, mut link: Link, end: LinkEnd) -> bool {
        let uptime = link.welcomed_at.map(|t| t.elapsed());
        self.reap_finished();
        match end {
            LinkEnd::Shutdown => {
                self.send_acks(&mut link);
                link.push(Kind::Bye(Bye {
                    reason: "client closing".into(),
                    redirect: Vec::new(),
                }));
                let _ = link.flush().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), link.io.shutdown()).await;
                tracing::info!(addr = %link.addr, "connection closed");
                false
            }
            LinkEnd::Idle => {
                self.send_acks(&mut link);
                link.push(Kind::Bye(Bye {
                    reason: "no sessions".into(),
                    redirect: Vec::new(),
                }));
                let _ = link.flush().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), link.io.shutdown()).await;
                tracing::debug!(addr = %link.addr, "connection idle, closed");
                for s in self.sessions.values_mut().filter(|s| s.is_active()) {
                    s.went_offline(DisconnectReason::ClosedByServer);
                }
                self.backoff.reset();
                true
            }
            LinkEnd::Fatal(err) => {
                for s in self.sessions.values_mut().filter(|s| s.is_active()) {
                    s.finish(Some(Event::Closed(err.clone())), err.clone());
                }
                self.reap_finished();
                true
            }
            LinkEnd::Lost(reason) => {
                tracing::info!(addr = %link.addr, %reason, uptime_ms = uptime.map(|u| u.as_millis() as u64), "disconnected");
                for s in self.sessions.values_mut().filter(|s| s.is_active()) {
                    if s.state == SessState::Opening {
                        s.abandon_open(&link.addr, "no answer on this link");
                    }
                    s.went_offline(reason.clone());
                }
                if let Some(u) = uptime {
                    self.backoff.connection_ended(u);
                }
                self.failed();
                true
            }
        }
    }

    /// Ends every session and answers the close requests.
    async fn finish(&mut self) {
        self.set_state(ConnectionState::Closed);
        let mut savers: Vec<JoinHandle<()>> = Vec::new();
        for (_, mut s) in std::mem::take(&mut self.sessions) {
            s.fail_all(&ClientError::Closed);
            s.shared.close();
            if let Some(h) = s.shared.take_saver() {
                savers.push(h);
            }
        }
        let _ = tokio::time::timeout(SAVE_GRACE, futures::future::join_all(savers)).await;
        // Later commands get a closed channel; answer those already queued.
        self.cmd_rx.close();
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match cmd {
                Command::Open { reply, .. } => {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                Command::Shutdown { reply } => self.shutdown_replies.push(reply),
                Command::Close { reply, .. } => {
                    let _ = reply.send(());
                }
                _ => {}
            }
        }
        for r in self.shutdown_replies.drain(..) {
            let _ = r.send(());
        }
    }
}

/// Fails the upstream requests written on the lost link; unsent ones wait for the next.
fn fail_sent(s: &mut Session, err: ClientError) {
    let sent: Vec<u64> = s
        .upstreams
        .iter()
        .filter(|(_, u)| u.sent)
        .map(|(id, _)| *id)
        .collect();
    for id in sent {
        if let Some(u) = s.upstreams.remove(&id) {
            let _ = u.reply.send(Err(err.clone()));
        }
    }
}

/// Waits for room in a session's channel.
async fn reserve(target: Option<(u32, mpsc::Sender<Event>)>) -> (u32, Option<mpsc::OwnedPermit<Event>>) {
    match target {
        Some((sid, tx)) => (sid, tx.reserve_owned().await.ok()),
        None => std::future::pending().await,
    }
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(v.into())
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Hello(_) => "HELLO",
        Kind::Welcome(_) => "WELCOME",
        Kind::Ping(_) => "PING",
        Kind::Pong(_) => "PONG",
        Kind::Push(_) => "PUSH",
        Kind::Ack(_) => "ACK",
        Kind::Upstream(_) => "UPSTREAM",
        Kind::UpstreamReply(_) => "UPSTREAM_REPLY",
        Kind::Subscribe(_) => "SUBSCRIBE",
        Kind::Unsubscribe(_) => "UNSUBSCRIBE",
        Kind::Subscribed(_) => "SUBSCRIBED",
        Kind::Gap(_) => "GAP",
        Kind::Kicked(_) => "KICKED",
        Kind::Bye(_) => "BYE",
        Kind::Error(_) => "ERROR",
        Kind::OpenSession(_) => "OPEN_SESSION",
        Kind::CloseSession(_) => "CLOSE_SESSION",
        Kind::SessionClosed(_) => "SESSION_CLOSED",
        Kind::RefreshToken(_) => "REFRESH_TOKEN",
        Kind::PublishTopic(_) => "PUBLISH_TOPIC",
        Kind::TopicPublished(_) => "TOPIC_PUBLISHED",
        Kind::GetRetained(_) => "GET_RETAINED",
    }
}
