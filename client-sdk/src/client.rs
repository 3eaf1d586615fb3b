//! One app's session: [`Client`] (commands) and [`Events`] (what arrives).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::backoff::BackoffConfig;
use crate::config::{AckMode, SessionConfig};
use crate::connection::{Connection, ConnectionBuilder};
use crate::heartbeat::HeartbeatConfig;
use crate::shared::SessionShared;
use crate::store::{CursorStore, Cursors, SessionKey};
use crate::task::Command;
use crate::token::TokenProvider;
use crate::transport::TlsConfig;
use crate::{ClientError, Event};

/// Most upstream requests one session keeps in flight; more wait for a slot.
const MAX_UPSTREAM_IN_FLIGHT: usize = 256;

/// One app's session on a [`Connection`]: subscribe, send upstream, ack, close.
///
/// Cheap to clone; every clone drives the same session. Events arrive on the [`Events`] stream
/// returned with it.
///
/// ```no_run
/// # async fn demo() -> Result<(), herald_client::ClientError> {
/// use futures::StreamExt;
/// use herald_client::{Client, Event};
///
/// let (client, mut events) = Client::builder("demo", "alice", "phone-1")
///     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
///     .dispatch_seeds(["127.0.0.1:7401"])
///     .connect()
///     .await?;
/// client.subscribe("news").await?;
/// while let Some(event) = events.next().await {
///     if let Event::Message(m) = event {
///         println!("{} {:?}", m.msg_id, m.payload);
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    /// The connection carrying the session.
    conn: Connection,
    /// State shared with the connection task.
    shared: Arc<SessionShared>,
    /// The session has a connection of its own (made by [`ClientBuilder`]): closing the session
    /// closes the connection too.
    own_connection: bool,
    upstream_timeout: Duration,
    request_timeout: Duration,
    /// Bounds the upstream requests in flight.
    upstream_slots: Semaphore,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.inner.shared.id)
            .field("key", &self.inner.shared.key)
            .field("own_connection", &self.inner.own_connection)
            .finish()
    }
}

impl Client {
    /// A builder for a client with a connection of its own (the single-app case). For several
    /// apps on one connection use [`Connection::builder`] and [`Connection::open`].
    pub fn builder(
        app: impl Into<String>,
        user: impl Into<String>,
        device: impl Into<String>,
    ) -> ClientBuilder {
        ClientBuilder {
            session: SessionConfig::new(app, user, device),
            connection: ConnectionBuilder::new(),
        }
    }

    pub(crate) fn new(
        conn: Connection,
        shared: Arc<SessionShared>,
        cfg: &SessionConfig,
        own_connection: bool,
    ) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                conn,
                shared,
                own_connection,
                upstream_timeout: cfg.upstream_timeout,
                request_timeout: cfg.request_timeout,
                upstream_slots: Semaphore::new(MAX_UPSTREAM_IN_FLIGHT),
            }),
        }
    }

    /// The session's id on its connection.
    pub fn session_id(&self) -> u32 {
        self.inner.shared.id
    }

    /// The (app, user, device) of the session.
    pub fn key(&self) -> &SessionKey {
        &self.inner.shared.key
    }

    /// How many login attempts (HELLO or OPEN_SESSION) of this session were given up on
    /// without a definite answer: timed out, the link lost before an answer, or `NOT_READY`.
    /// Each may still have registered on the node it was sent to; the node unregisters such a
    /// registration once it commits (docs/PROTOCOL.md §9). For diagnostics and fault testing.
    ///
    /// ```no_run
    /// # async fn f(client: herald_client::Client) {
    /// if client.abandoned_logins() > 0 {
    ///     eprintln!("some logins of this session got no definite answer");
    /// }
    /// # }
    /// ```
    pub fn abandoned_logins(&self) -> u64 {
        self.inner
            .shared
            .abandoned_logins
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connection carrying the session.
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// Subscribes to `topic`; resolves when the server confirmed it (SUBSCRIBED), or, when
    /// offline, once the next handshake carried it. If the topic has a saved cursor, retained
    /// messages after it are replayed first; otherwise only new messages arrive. The
    /// subscription is kept across reconnects.
    ///
    /// On [`ClientError::Timeout`] the subscription stays registered and is sent with the next
    /// handshake; [`unsubscribe`](Self::unsubscribe) drops it.
    pub async fn subscribe(&self, topic: impl Into<String>) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .conn
            .send(Command::Subscribe {
                sid: self.session_id(),
                topic: topic.into(),
                reply: tx,
            })
            .await?;
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(r) => r.map_err(|_| ClientError::Closed)?,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Stops delivery of `topic` and forgets its cursor.
    ///
    /// Works offline too: the next handshake simply no longer carries the topic. (No node needs
    /// to run for this example.)
    ///
    /// ```
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), herald_client::ClientError> {
    /// use herald_client::Client;
    ///
    /// let (client, _events) = Client::builder("demo", "alice", "phone-1")
    ///     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
    ///     .nodes(["127.0.0.1:7410"])
    ///     .topics(["news", "sports"])
    ///     .connect()
    ///     .await?;
    /// client.unsubscribe("sports").await?;
    /// assert!(client.cursors().topics.get("sports").is_none());
    /// client.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn unsubscribe(&self, topic: impl Into<String>) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .conn
            .send(Command::Unsubscribe {
                sid: self.session_id(),
                topic: topic.into(),
                reply: tx,
            })
            .await?;
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Ok(r) => r.map_err(|_| ClientError::Closed)?,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Sends `payload` to the app's backend and returns its reply.
    ///
    /// Waits for a connection if there is none, all within the session's upstream timeout.
    /// Errors: [`ClientError::Upstream`] (the backend is unavailable or failed),
    /// [`ClientError::Timeout`], [`ClientError::Disconnected`] (the connection was lost after the
    /// request was sent: the backend may or may not have it), [`ClientError::TooLarge`],
    /// [`ClientError::Closed`].
    ///
    /// ```no_run
    /// # async fn demo(client: herald_client::Client) -> Result<(), herald_client::ClientError> {
    /// let reply = client.upstream(r#"{"op":"read","room":42}"#).await?;
    /// println!("backend said {}", String::from_utf8_lossy(&reply));
    /// # Ok(()) }
    /// ```
    pub async fn upstream(&self, payload: impl Into<Bytes>) -> Result<Bytes, ClientError> {
        let payload = payload.into();
        let fut = async {
            let _slot = self
                .inner
                .upstream_slots
                .acquire()
                .await
                .map_err(|_| ClientError::Closed)?;
            let (tx, rx) = oneshot::channel();
            self.inner
                .conn
                .send(Command::Upstream {
                    sid: self.session_id(),
                    payload,
                    reply: tx,
                })
                .await?;
            rx.await.map_err(|_| ClientError::Closed)?
        };
        tokio::time::timeout(self.inner.upstream_timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Acks every mailbox message up to `seq` ([`AckMode::Manual`]; cumulative, as in the
    /// protocol). Capped at the highest seq the stream has handed out, so it cannot skip messages
    /// the app never saw. For topic messages use [`Message::ack`](crate::Message::ack).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), herald_client::ClientError> {
    /// use futures::StreamExt;
    /// use herald_client::{AckMode, Client, Event};
    ///
    /// let (client, mut events) = Client::builder("demo", "alice", "phone-1")
    ///     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
    ///     .dispatch_seeds(["127.0.0.1:7401"])
    ///     .ack_mode(AckMode::Manual)
    ///     .connect()
    ///     .await?;
    /// let mut batch = Vec::new();
    /// while let Some(Event::Message(m)) = events.next().await {
    ///     batch.push(m);
    ///     if batch.len() == 100 {
    ///         // ... store the batch durably, then ack all of it at once (cumulative).
    ///         let last = batch.iter().map(|m| m.seq).max().unwrap_or(0);
    ///         client.ack(last);
    ///         batch.clear();
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn ack(&self, seq: u64) {
        self.inner.shared.ack_seq(seq);
    }

    /// The session's resume cursors as they are now (what the store would save).
    pub fn cursors(&self) -> Cursors {
        self.inner.shared.cursors()
    }

    /// The ack mode the session was opened with.
    pub fn ack_mode(&self) -> AckMode {
        self.inner.shared.ack_mode
    }

    /// Ends the session: acks what was handled, sends CLOSE_SESSION, ends the event stream and
    /// waits for the last cursor save. A client made by [`Client::builder`] also closes its
    /// connection (BYE). Idempotent.
    ///
    /// No node needs to run for this example:
    ///
    /// ```
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), herald_client::ClientError> {
    /// use futures::StreamExt;
    /// use herald_client::Client;
    ///
    /// let (client, mut events) = Client::builder("demo", "alice", "phone-1")
    ///     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
    ///     .nodes(["127.0.0.1:7410"])
    ///     .connect()
    ///     .await?;
    /// client.close().await?;
    /// // The stream ends after the events already queued.
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// client.close().await?; // idempotent
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) -> Result<(), ClientError> {
        if self.inner.own_connection {
            self.inner.conn.close().await;
        } else {
            let (tx, rx) = oneshot::channel();
            if self
                .inner
                .conn
                .send(Command::Close {
                    sid: self.session_id(),
                    reply: tx,
                })
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(self.inner.request_timeout, rx).await;
            }
        }
        if let Some(saver) = self.inner.shared.take_saver() {
            let _ = tokio::time::timeout(self.inner.request_timeout, saver).await;
        }
        Ok(())
    }
}

/// The events of one session, in order: a [`Stream`] of [`Event`].
///
/// With [`AckMode::Auto`] a message counts as handled when the stream hands it out. The stream
/// is bounded: while the app does not take events, the connection stops reading (nothing is
/// dropped). Dropping it closes the session.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    shared: Arc<SessionShared>,
    /// To tell the connection task when the stream is dropped.
    cmd: mpsc::Sender<Command>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("session_id", &self.shared.id)
            .finish()
    }
}

impl Events {
    pub(crate) fn new(
        rx: mpsc::Receiver<Event>,
        shared: Arc<SessionShared>,
        cmd: mpsc::Sender<Command>,
    ) -> Self {
        Events { rx, shared, cmd }
    }

    /// The next event, or `None` once the session has ended. Same as `StreamExt::next`.
    pub async fn recv(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await?;
        self.shared.handed_out(&ev);
        self.shared.save_late();
        Some(ev)
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                self.shared.handed_out(&ev);
                self.shared.save_late();
                Poll::Ready(Some(ev))
            }
            other => other,
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if !self.shared.is_closed() {
            // Best effort: if the command queue is full the task notices the closed channel at
            // its next send.
            let _ = self.cmd.try_send(Command::Dropped { sid: self.shared.id });
        }
    }
}

/// Builds a [`Client`] with a connection of its own; made by [`Client::builder`].
///
/// Carries a [`SessionConfig`] and a [`ConnectionBuilder`]; the common settings of both have
/// methods here, the rest are reached through [`session`](Self::session) and
/// [`connection`](Self::connection).
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    session: SessionConfig,
    connection: ConnectionBuilder,
}

impl ClientBuilder {
    /// A fixed token (see [`SessionConfig::token`]).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.session = self.session.token(token);
        self
    }

    /// A token provider (see [`SessionConfig::token_provider`]).
    pub fn token_provider(mut self, provider: impl TokenProvider) -> Self {
        self.session = self.session.token_provider(provider);
        self
    }

    /// gRPC addresses to ask Dispatch (see [`ConnectionBuilder::dispatch_seeds`]).
    pub fn dispatch_seeds<I, S>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.connection = self.connection.dispatch_seeds(seeds);
        self
    }

    /// Client addresses to connect to directly (see [`ConnectionBuilder::nodes`]).
    pub fn nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.connection = self.connection.nodes(nodes);
        self
    }

    /// Platform name (see [`SessionConfig::platform`]).
    pub fn platform(mut self, platform: impl Into<String>) -> Self {
        self.session = self.session.platform(platform);
        self
    }

    /// Topics subscribed at open (see [`SessionConfig::topics`]).
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.session = self.session.topics(topics);
        self
    }

    /// Ack mode (see [`SessionConfig::ack_mode`]).
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.session = self.session.ack_mode(mode);
        self
    }

    /// Cursor store (see [`SessionConfig::store`]).
    pub fn store(mut self, store: impl CursorStore) -> Self {
        self.session = self.session.store(store);
        self
    }

    /// TLS (see [`ConnectionBuilder::tls`]).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.connection = self.connection.tls(tls);
        self
    }

    /// Fixed backoff (see [`ConnectionBuilder::backoff`]).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.connection = self.connection.backoff(backoff);
        self
    }

    /// Heartbeat settings (see [`ConnectionBuilder::heartbeat`]).
    pub fn heartbeat(mut self, heartbeat: HeartbeatConfig) -> Self {
        self.connection = self.connection.heartbeat(heartbeat);
        self
    }

    /// Any other session setting.
    ///
    /// ```
    /// # use herald_client::Client;
    /// # use std::time::Duration;
    /// let builder = Client::builder("demo", "alice", "phone-1")
    ///     .session(|s| s.upstream_timeout(Duration::from_secs(5)).event_buffer(64));
    /// ```
    pub fn session(mut self, f: impl FnOnce(SessionConfig) -> SessionConfig) -> Self {
        self.session = f(self.session);
        self
    }

    /// Any other connection setting.
    pub fn connection(mut self, f: impl FnOnce(ConnectionBuilder) -> ConnectionBuilder) -> Self {
        self.connection = f(self.connection);
        self
    }

    /// Starts a connection of its own and opens the session on it (see [`Connection::open`]);
    /// returns at once, [`Event::Connected`] follows. Must be called within a tokio runtime.
    pub async fn connect(self) -> Result<(Client, Events), ClientError> {
        self.session.validate()?;
        let conn = self.connection.build()?;
        match conn.open_with(self.session, true).await {
            Ok(pair) => Ok(pair),
            Err(e) => {
                conn.close().await;
                Err(e)
            }
        }
    }
}
