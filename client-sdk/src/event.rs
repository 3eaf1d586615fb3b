//! What a session's event stream yields.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::shared::SessionShared;
use crate::ClientError;

/// One item of a session's [`Events`](crate::Events) stream.
///
/// The stream ends (yields `None`) after [`Event::Kicked`] and [`Event::Closed`], and after
/// the session was closed by the app.
///
/// ```no_run
/// # async fn demo(mut events: herald_client::Events) {
/// use futures::StreamExt;
/// use herald_client::Event;
///
/// while let Some(event) = events.next().await {
///     match event {
///         Event::Message(m) => println!("{}: {:?}", m.msg_id, m.payload),
///         Event::Gap(g) => println!("lost {}..={} of {:?}: {:?}", g.from_seq, g.to_seq, g.topic, g.reason),
///         Event::Connected { node_id, .. } => println!("online via node {node_id}"),
///         Event::Disconnected { reason } => println!("offline ({reason}), reconnecting"),
///         Event::Kicked { code, reason, .. } => println!("signed out ({code:?}): {reason}"),
///         Event::Closed(e) => println!("session over: {e}"),
///         other => println!("{other:?}"),
///     }
/// }
/// // The stream ended: kicked, closed, or the app closed the session.
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The server accepted the session (WELCOME): after the first connect and after every
    /// reconnect. Missed messages follow.
    Connected {
        /// The node holding the connection.
        node_id: u64,
        /// The address connected to.
        addr: String,
        /// The session's registration epoch (increases with every registration).
        epoch: u64,
    },
    /// The connection was lost; the SDK is reconnecting and will send `Connected` again.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// A message, never one the app was already handed (deduplicated by id and seq).
    Message(Message),
    /// Messages in `[from_seq, to_seq]` can no longer be delivered: trimmed by a retention cap
    /// or expired. The SDK never hides a gap.
    Gap(Gap),
    /// A subscription took effect (an explicit subscribe, or a topic of the session's
    /// configuration, confirmed again after every reconnect); `seq` is the topic's current seq.
    Subscribed {
        /// The topic.
        topic: String,
        /// The topic's current seq; messages after it follow.
        seq: u64,
    },
    /// The server refused a subscription (for example a bad topic name, or too many topics). The
    /// topic is dropped from the session, which goes on.
    SubscribeFailed {
        /// The topic.
        topic: String,
        /// Why ([`ClientError::Refused`] with the protocol code).
        error: ClientError,
    },
    /// Something went wrong that the app should know about, but the session goes on (a failed
    /// cursor save, a token provider failure that will be retried).
    Error(ClientError),
    /// The session was ended by the server: a newer login of the device
    /// ([`KickReason::Replaced`](crate::KickReason::Replaced)), the app's device policy
    /// ([`Policy`](crate::KickReason::Policy)), the app's backend or an operator
    /// ([`Admin`](crate::KickReason::Admin)). The SDK does not reconnect it; the stream ends.
    ///
    /// One exception: a `REPLACED` that most likely comes from the SDK's own abandoned login
    /// attempt of this session is reported as [`Event::Disconnected`] with
    /// [`DisconnectReason::ReplacedByOwnAttempt`] and the session is opened again (at most once
    /// per abandoned attempt).
    ///
    /// Kicks that are not the end of the session are handled by the SDK and show up as
    /// [`Event::Disconnected`] followed by [`Event::Connected`]: `NODE_DOWN` (it moves to another
    /// node) and `TOKEN_EXPIRED` (it asks the token provider and opens the session again).
    Kicked {
        /// Why, as the protocol codes it.
        code: crate::KickReason,
        /// The server's explanation, for humans.
        reason: String,
        /// Nodes the server suggests for a new session, best first (often empty).
        redirect: Vec<String>,
    },
    /// The session ended for good because of `error` (an auth failure with no new token, an
    /// unknown app, a refused registration); the stream ends.
    Closed(ClientError),
}

/// Delivery guarantee of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    /// Delivered only if the device was online; never replayed.
    AtMostOnce,
    /// Stored through Raft before the push was answered; replayed until acked or expired.
    AtLeastOnce,
}

/// Why messages are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapReason {
    /// Dropped by the per-user mailbox cap or the topic's retention.
    Trimmed,
    /// Their time to live passed.
    Expired,
    /// The server did not say.
    Unspecified,
}

/// Messages that will never arrive (see [`Event::Gap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// `None` for the mailbox, else the topic.
    pub topic: Option<String>,
    /// First missing seq (mailbox seq, or topic seq).
    pub from_seq: u64,
    /// Last missing seq.
    pub to_seq: u64,
    /// Why.
    pub reason: GapReason,
}

/// Why the connection was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The server closed the socket.
    ClosedByServer,
    /// A read or write failed.
    Io(String),
    /// No PONG (or anything) arrived in time: the link is dead.
    HeartbeatTimeout,
    /// The server is going away (BYE: `draining`, `shutdown`); the SDK tries its redirects first.
    Bye {
        /// The reason the server gave.
        reason: String,
        /// Where it suggested to go, best first.
        redirect: Vec<String>,
    },
    /// The server ended the connection with a connection-level ERROR.
    ServerError {
        /// The protocol error code.
        code: crate::ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The cluster declared the node lost (KICKED `NODE_DOWN`); the SDK moves elsewhere.
    NodeDown,
    /// The session's token expired on the server (KICKED `TOKEN_EXPIRED`): the SDK asks the token
    /// provider for a fresh one and opens the session again, resuming from its cursors.
    TokenExpired,
    /// The node cannot reach the cluster's leader (NOT_READY); the SDK moves elsewhere.
    NotReady,
    /// The server sent something that is not valid protocol.
    Protocol(String),
    /// The session was kicked with `REPLACED`, but very likely by this SDK's own earlier login of
    /// the session that it had given up on: a HELLO or OPEN_SESSION left unanswered (handshake
    /// timeout, link lost before WELCOME or ERROR) or answered with `NOT_READY` (the node could not
    /// say whether the registration would commit). Such a registration can still commit after the
    /// SDK opened the session elsewhere, and with a higher epoch, since epochs are allocated at
    /// commit. The SDK opens the session again after a jittered backoff delay and resumes from
    /// its cursors.
    ///
    /// Bounded: each abandoned attempt excuses at most one `REPLACED`, and only within the
    /// handshake timeout plus 30 s after the SDK gave up on it; any other `REPLACED` ends the
    /// session with [`Event::Kicked`]. So a genuinely different login with the same device id
    /// costs at most one extra round of replacing per abandoned attempt.
    ReplacedByOwnAttempt,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ClosedByServer => f.write_str("closed by server"),
            DisconnectReason::Io(e) => write!(f, "i/o error: {e}"),
            DisconnectReason::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            DisconnectReason::Bye { reason, .. } => write!(f, "server said bye: {reason}"),
            DisconnectReason::ServerError { code, message } => write!(f, "server error {code:?}: {message}"),
            DisconnectReason::NodeDown => f.write_str("node declared down"),
            DisconnectReason::TokenExpired => f.write_str("token expired"),
            DisconnectReason::NotReady => f.write_str("node not ready"),
            DisconnectReason::Protocol(e) => write!(f, "protocol violation: {e}"),
            DisconnectReason::ReplacedByOwnAttempt => {
                f.write_str("replaced by an abandoned login attempt of this client")
            }
        }
    }
}

/// A message pushed to this session.
///
/// In [`AckMode::Manual`](crate::AckMode::Manual), call [`Message::ack`] once it is handled;
/// in the default automatic mode it counts as handled when the stream hands it out.
#[derive(Clone)]
pub struct Message {
    /// Identifies the message across re-deliveries.
    pub msg_id: String,
    /// Mailbox seq (gapless per user, increasing); 0 for topic messages and online-only direct
    /// messages.
    pub seq: u64,
    /// `None` for messages to the user (the mailbox), else the topic (`*` is the app-wide
    /// broadcast).
    pub topic: Option<String>,
    /// The topic's seq (0 for mailbox messages).
    pub topic_seq: u64,
    /// What the app's backend sent.
    pub payload: Bytes,
    /// Delivery guarantee.
    pub qos: Qos,
    /// When the cluster accepted the message (unix ms, by the cluster's log time).
    pub pushed_at_ms: u64,
    /// The session, for [`Message::ack`].
    pub(crate) session: Arc<SessionShared>,
}

impl Message {
    /// Marks the message handled (manual-ack mode): for a mailbox message this acks every
    /// mailbox message up to its seq (acks are cumulative in the protocol), for a topic message
    /// it advances the topic's resume cursor. A no-op in automatic mode and after close.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), herald_client::ClientError> {
    /// use futures::StreamExt;
    /// use herald_client::{AckMode, Client, Event};
    ///
    /// let (_client, mut events) = Client::builder("demo", "alice", "phone-1")
    ///     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
    ///     .dispatch_seeds(["127.0.0.1:7401"])
    ///     .ack_mode(AckMode::Manual)
    ///     .connect()
    ///     .await?;
    /// while let Some(event) = events.next().await {
    ///     if let Event::Message(m) = event {
    ///         // ... handle it (store it, show it), and only then:
    ///         m.ack();
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn ack(&self) {
        self.session.ack_message(self);
    }

    /// Whether this is a broadcast to every user of the app (the `*` topic).
    pub fn is_broadcast(&self) -> bool {
        self.topic.as_deref() == Some("*")
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("msg_id", &self.msg_id)
            .field("seq", &self.seq)
            .field("topic", &self.topic)
            .field("topic_seq", &self.topic_seq)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("pushed_at_ms", &self.pushed_at_ms)
            .finish()
    }
}
