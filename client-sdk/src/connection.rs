//! A connection to the cluster, shared by one or more sessions: [`Connection`].

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::backoff::BackoffConfig;
use crate::client::{Client, Events};
use crate::config::SessionConfig;
use crate::heartbeat::HeartbeatConfig;
use crate::shared::SessionShared;
use crate::store::Cursors;
use crate::task::{Command, ConnConfig, OpenRequest, Task};
use crate::transport::TlsConfig;
use crate::{saver, ClientError, Event};

/// Where a [`Connection`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// No session needs a connection (none opened yet, or all ended).
    Idle,
    /// Connecting (TCP, TLS, handshake) to `addr`.
    Connecting {
        /// The node's client address.
        addr: String,
    },
    /// The handshake completed.
    Connected {
        /// The node's client address.
        addr: String,
        /// The node's id.
        node_id: u64,
    },
    /// Waiting before the next attempt (backoff with jitter).
    Backoff {
        /// The delay chosen.
        retry_in: Duration,
    },
    /// Closed by [`Connection::close`] or because every handle was dropped.
    Closed,
}

/// Settings of a [`Connection`]; made by [`Connection::builder`].
///
/// At least one of [`dispatch_seeds`](Self::dispatch_seeds) and [`nodes`](Self::nodes) is
/// required. No node needs to run for this example (nothing connects before the first session,
/// and then in the background):
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> Result<(), herald_client::ClientError> {
/// use std::time::Duration;
/// use herald_client::{Connection, ConnectionState, SessionConfig};
///
/// let conn = Connection::builder()
///     .dispatch_seeds(["127.0.0.1:7401"])
///     .nodes(["127.0.0.1:7410"]) // used until Dispatch answers
///     .connect_timeout(Duration::from_secs(3))
///     .dispatch_refresh(Duration::from_secs(60))
///     .build()?;
/// assert_eq!(conn.state(), ConnectionState::Idle);
/// let (_chat, _events) = conn
///     .open(SessionConfig::new("chat", "alice", "phone-1").token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9..."))
///     .await?;
/// conn.close().await;
/// assert_eq!(conn.state(), ConnectionState::Closed);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectionBuilder {
    cfg: ConnConfig,
}

impl Default for ConnectionBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectionBuilder {
    /// A builder with the defaults: plain TCP, backoff from Dispatch (fallback
    /// [`BackoffConfig::default`]), fixed heartbeat, 5 s connect timeout, 10 s handshake timeout,
    /// node list refreshed every 5 minutes.
    pub fn new() -> Self {
        ConnectionBuilder {
            cfg: ConnConfig {
                dispatch_seeds: Vec::new(),
                static_nodes: Vec::new(),
                tls: None,
                backoff: BackoffConfig::default(),
                backoff_pinned: false,
                heartbeat: HeartbeatConfig::default(),
                connect_timeout: Duration::from_secs(5),
                handshake_timeout: Duration::from_secs(10),
                dispatch_timeout: Duration::from_secs(3),
                dispatch_refresh: Duration::from_secs(300),
                dispatch_min_interval: Duration::from_secs(10),
                client_name: concat!("herald-client-rust/", env!("CARGO_PKG_VERSION")).to_string(),
                max_frame: herald_proto::frame::DEFAULT_MAX_FRAME,
            },
        }
    }

    /// gRPC addresses (`host:port` or `http://host:port`) of nodes to ask for the node list
    /// (`herald.v1.Herald/Dispatch`). Any reachable one will do; they are tried in a random
    /// order.
    pub fn dispatch_seeds<I, S>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cfg.dispatch_seeds = seeds.into_iter().map(Into::into).collect();
        self
    }

    /// Client addresses (`host:port`) to connect to without asking Dispatch, or until it
    /// answers. Tried in rotation from a random start.
    pub fn nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cfg.static_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// Connects with TLS (the node addresses must then be TLS client addresses; Dispatch is
    /// asked for the `tls` transport).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.cfg.tls = Some(tls);
        self
    }

    /// Fixes the reconnect backoff (the cluster's Dispatch values are then ignored).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.cfg.backoff = backoff;
        self.cfg.backoff_pinned = true;
        self
    }

    /// Heartbeat settings (adaptive heartbeat is off by default).
    pub fn heartbeat(mut self, heartbeat: HeartbeatConfig) -> Self {
        self.cfg.heartbeat = heartbeat;
        self
    }

    /// Limit for TCP connect plus TLS handshake (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.connect_timeout = timeout;
        self
    }

    /// Limit from connect to the server's answer to HELLO (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.handshake_timeout = timeout;
        self
    }

    /// Limit for one Dispatch call (default 3 s).
    pub fn dispatch_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.dispatch_timeout = timeout;
        self
    }

    /// How often the node list is refreshed while all is well (default 5 minutes). After
    /// failures it is refreshed before reconnecting, at most every 10 s.
    pub fn dispatch_refresh(mut self, every: Duration) -> Self {
        self.cfg.dispatch_refresh = every;
        self
    }

    /// Names the client in HELLO, for the server's logs (default `herald-client-rust/<version>`).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.cfg.client_name = name.into();
        self
    }

    /// Starts the connection task. Nothing is connected until the first session is opened.
    ///
    /// Must be called within a tokio runtime.
    pub fn build(self) -> Result<Connection, ClientError> {
        let cfg = self.cfg;
        if cfg.dispatch_seeds.is_empty() && cfg.static_nodes.is_empty() {
            return Err(ClientError::Config("no dispatch seeds and no nodes".into()));
        }
        if let Some(s) = cfg
            .static_nodes
            .iter()
            .chain(&cfg.dispatch_seeds)
            .find(|s| s.is_empty())
        {
            return Err(ClientError::Config(format!("empty node address {s:?}")));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::Config(
                "Connection::build must be called within a tokio runtime".into(),
            ));
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let ack_wake = Arc::new(Notify::new());
        let (state_tx, state_rx) = watch::channel(ConnectionState::Idle);
        let task = Task::new(cfg, cmd_rx, ack_wake.clone(), state_tx);
        tokio::spawn(task.run());
        Ok(Connection {
            inner: Arc::new(ConnInner {
                cmd: cmd_tx,
                next_sid: AtomicU32::new(1),
                ack_wake,
                state: state_rx,
            }),
        })
    }
}

/// One connection to the cluster, carrying the sessions of one or more apps.
///
/// Cloning gives another handle to the same connection. The connection task runs until
/// [`close`](Self::close) or until every handle, [`Client`] and [`Events`] of it is dropped.
///
/// Several apps on one device share one connection (one socket, one heartbeat):
///
/// ```no_run
/// # async fn demo() -> Result<(), herald_client::ClientError> {
/// use herald_client::{Connection, SessionConfig};
///
/// let conn = Connection::builder().dispatch_seeds(["10.0.0.1:7401", "10.0.0.2:7401"]).build()?;
/// let (chat, mut chat_events) = conn.open(SessionConfig::new("chat", "alice", "phone-1").token("…")).await?;
/// let (news, mut news_events) = conn.open(SessionConfig::new("news", "alice", "phone-1").token("…")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    /// Commands to the connection task (bounded: callers wait when it is busy).
    cmd: mpsc::Sender<Command>,
    /// Next session id; ids are never reused on a connection.
    next_sid: AtomicU32,
    /// Shared with sessions: wakes the task when acks are due.
    ack_wake: Arc<Notify>,
    /// The task's view of the link.
    state: watch::Receiver<ConnectionState>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Connection {
    /// A builder for a connection.
    pub fn builder() -> ConnectionBuilder {
        ConnectionBuilder::new()
    }

    /// Opens a session on this connection and returns its handle and event stream.
    ///
    /// Asks the token provider (if any) for a token and loads saved cursors (if a store is
    /// set), then returns at once: the server's acceptance arrives as [`Event::Connected`], a
    /// refusal as [`Event::Closed`]. The session lives until [`Client::close`], until the
    /// [`Events`] stream is dropped, or until a terminal event.
    pub async fn open(&self, session: SessionConfig) -> Result<(Client, Events), ClientError> {
        self.open_with(session, false).await
    }

    pub(crate) async fn open_with(
        &self,
        session: SessionConfig,
        own_connection: bool,
    ) -> Result<(Client, Events), ClientError> {
        session.validate()?;
        let token_source = session.token.clone().expect("validated");
        let token = token_source.fetch().await?;
        let key = session.key();
        let mut load_error = None;
        let restored = match &session.store {
            None => Cursors::default(),
            Some(store) => {
                let (store, k) = (store.clone(), key.clone());
                match tokio::task::spawn_blocking(move || store.load(&k)).await {
                    Ok(Ok(c)) => c.unwrap_or_default(),
                    Ok(Err(e)) => {
                        tracing::warn!(app = %key.app, user = %key.user, error = %e, "loading cursors failed, starting without");
                        load_error = Some(ClientError::Store(e.to_string()));
                        Cursors::default()
                    }
                    Err(e) => return Err(ClientError::Store(e.to_string())),
                }
            }
        };
        let sid = self.inner.next_sid.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(SessionShared::new(
            sid,
            key,
            session.ack_mode,
            session.persisted_ids,
            session.dedupe_window,
            &restored,
            self.inner.ack_wake.clone(),
        ));
        let (tx, rx) = mpsc::channel(session.event_buffer);
        if let Some(e) = load_error {
            let _ = tx.try_send(Event::Error(e));
        }
        if let Some(store) = &session.store {
            let h = tokio::spawn(saver::run(
                shared.clone(),
                store.clone(),
                session.persist_interval,
                tx.downgrade(),
            ));
            shared.set_saver(h, store.clone());
        }
        let client = Client::new(self.clone(), shared.clone(), &session, own_connection);
        let events = Events::new(rx, shared.clone(), self.inner.cmd.clone());
        let (reply_tx, reply_rx) = oneshot::channel();
        let req = OpenRequest {
            cfg: session,
            token,
            shared: shared.clone(),
            events: tx,
            restored,
        };
        let opened = async {
            self.send(Command::Open {
                session: Box::new(req),
                reply: reply_tx,
            })
            .await?;
            reply_rx.await.map_err(|_| ClientError::Closed)?
        };
        if let Err(e) = opened.await {
            // The connection is closing: end the saver that was started for the session.
            shared.close();
            return Err(e);
        }
        Ok((client, events))
    }

    /// Tells the connection the device changed networks (`"wifi"`, `"cellular"`, an SSID, …).
    /// With the adaptive heartbeat, each network keeps its own learned interval. Best effort:
    /// dropped if the connection's command queue is full or it is closed.
    pub fn set_network(&self, name: impl Into<String>) {
        let _ = self.inner.cmd.try_send(Command::SetNetwork(name.into()));
    }

    /// Where the connection stands now.
    pub fn state(&self) -> ConnectionState {
        self.inner.state.borrow().clone()
    }

    /// A receiver that sees every state change (for status displays and tests).
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Acks what was handled, sends BYE, closes the socket, ends every session's event stream
    /// and waits (up to 5 s) for the sessions' last cursor saves. Idempotent.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Command::Shutdown { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) async fn send(&self, cmd: Command) -> Result<(), ClientError> {
        self.inner.cmd.send(cmd).await.map_err(|_| ClientError::Closed)
    }
}
