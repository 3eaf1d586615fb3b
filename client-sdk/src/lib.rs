//! herald-client: the SDK an app embeds to receive Herald pushes.
//!
//! It speaks the client protocol of `docs/PROTOCOL.md` (length-prefixed protobuf frames over TCP
//! or TLS) and takes care of everything around it: finding a node (gRPC Dispatch), connecting,
//! authenticating with a token (asking a provider again when it expires), heartbeats and
//! dead-link detection, reconnecting with exponential backoff and full jitter, resuming with
//! cursors, deduplicating re-deliveries, acking, upstream requests, and several apps sharing one
//! connection.
//!
//! API Boundary: this crate is what app developers program against. Architecture Invariant: it
//! depends on `herald-proto` only and knows nothing about Raft, RocksDB or the node's internals.
//!
//! # One app
//!
//! ```no_run
//! use futures::StreamExt;
//! use herald_client::{Client, Event};
//!
//! # async fn demo() -> Result<(), herald_client::ClientError> {
//! let (client, mut events) = Client::builder("demo", "alice", "phone-1")
//!     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
//!     .dispatch_seeds(["10.0.0.1:7401", "10.0.0.2:7401"])
//!     .topics(["news"])
//!     .connect()
//!     .await?;
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Message(m) => println!("message {} seq {}: {:?}", m.msg_id, m.seq, m.payload),
//!         Event::Gap(g) => println!("missed {}..={} ({:?})", g.from_seq, g.to_seq, g.reason),
//!         Event::Connected { node_id, .. } => println!("connected to node {node_id}"),
//!         Event::Disconnected { reason } => println!("reconnecting: {reason}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! let reply = client.upstream("hello backend").await?;
//! client.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Several apps, one connection
//!
//! A phone runs one connection for all its apps (one socket, one heartbeat, one radio wake-up).
//! Build a [`Connection`] and [`open`](Connection::open) a session per app; each gets its own
//! [`Client`] and [`Events`], with its own token, cursors and ack mode. After a reconnect every
//! session is opened again (the first in HELLO, the others with OPEN_SESSION) with its current
//! cursors. See `examples/multi_app.rs`.
//!
//! # Delivery guarantees
//!
//! - **Exactly once to the app for QoS1 messages**, across reconnects and node failures: the SDK
//!   sends its cursors (last acked mailbox seq, last seq per topic) in every handshake so the
//!   server replays what follows, and it drops re-deliveries by message id (a window of recent
//!   ids) and by seq (a mailbox message at or below the highest one seen is a duplicate).
//!   Online-only (QoS 0) messages carry no seq and are deduplicated by id only.
//! - **Gaps are surfaced, never hidden**: when the server can no longer replay something (trimmed
//!   by a cap, or expired) the stream yields [`Event::Gap`] before the next message.
//! - **Acks**: in [`AckMode::Auto`] (default) a message counts as handled when the stream hands
//!   it to the app; in [`AckMode::Manual`] when the app calls [`Message::ack`] or
//!   [`Client::ack`]. Acks are cumulative and coalesced into few ACK frames.
//! - **Across app restarts** with a [`CursorStore`] (e.g. [`FileStore`]): cursors and the recent
//!   id window are saved after they change (write-behind, spaced by
//!   [`SessionConfig::persist_interval`]) and once more at close. A crash may re-show messages
//!   handed out during the last interval; it never loses one. Why a crash-safe file and not
//!   sled: see the [`store`] module.
//! - **Back-pressure, not loss**: each session's event channel is bounded. When the app stops
//!   taking events the connection stops reading, the server eventually drops the connection as a
//!   slow consumer, and stored messages wait for the next one. On a shared connection one app
//!   that stops reading holds up the others: every app must drain its stream.
//!
//! # Connection life
//!
//! - Nodes: the connection asks any Dispatch seed for the ordered node list for the first
//!   session's (app, user), refreshes it every few minutes and after failures, and falls back
//!   to the static [`ConnectionBuilder::nodes`] list when no seed answers.
//! - Reconnects sleep `uniform(0, min(max, initial × 2^n))` (full jitter; parameters from
//!   Dispatch unless pinned), rotate through the node list, try a BYE's redirects first, and
//!   reset after a connection stayed up for a while. Even the first retry is jittered, so a node
//!   failure never makes its clients return in one synchronized wave.
//! - Heartbeat at the server's interval (WELCOME); a link from which nothing arrived for two
//!   intervals is dead. The optional adaptive heartbeat ([`HeartbeatConfig::adaptive`]) looks for
//!   the longest interval the network's NAT keeps alive, per network.
//! - Tokens: a fixed one, or a [`TokenProvider`] asked again before the token expires (sent with
//!   REFRESH_TOKEN) and once after the server refuses one; a refusal with no new token ends the
//!   session with [`Event::Closed`]\([`ClientError::Auth`]\).
//! - Kicks are told apart by their [`KickReason`] code, never by their text: `REPLACED` (a newer
//!   login of the device), `POLICY` (the app's device limits) and `ADMIN` (the app's backend or
//!   an operator) end the session with [`Event::Kicked`] and are not retried; `NODE_DOWN` moves
//!   the connection to another node and resumes; `TOKEN_EXPIRED` asks the token provider for a
//!   fresh token and opens the session again (a fixed token ends it with
//!   [`Event::Closed`]\([`ClientError::Auth`]\)).
//! - Self-replacement: a login attempt the SDK gave up on (no WELCOME before the handshake
//!   timeout, the link lost before the answer, or `NOT_READY`, whose registration outcome is
//!   unknown) may still be registered later, with a higher epoch, and kick the session the SDK
//!   opened meanwhile with `REPLACED`. The SDK remembers such attempts per session; a `REPLACED`
//!   arriving within the handshake timeout + 30 s after one is not final: it yields
//!   [`Event::Disconnected`] with [`DisconnectReason::ReplacedByOwnAttempt`] and the session is
//!   opened again after a jittered backoff delay, resuming from its cursors. Each abandoned
//!   attempt excuses one `REPLACED` only, so a genuinely different login with the same device id
//!   wins after at most one extra round per attempt.
//! - Subscriptions: the server answers each one, in order, including the topics given at open
//!   (again after every reconnect). A refused one yields [`Event::SubscribeFailed`] (and an error
//!   from [`Client::subscribe`]); the session goes on.
//! - Broadcasts (the `*` topic) resume across reconnects like topics: the session's first open
//!   learns the broadcast seq, and every handshake carries the cursor.
//!
//! # Logging
//!
//! Through `tracing`, lowercase messages with structured fields; tokens are never logged.
//!
//! # Testing against the SDK
//!
//! Nothing is global: every [`Connection`] owns its task, timers, random generator and state, so
//! a test can run many clients in one process against nodes on `127.0.0.1:0`.

// API Boundary: every public item is documented.
#![warn(missing_docs)]

pub mod store;

mod backoff;
mod client;
mod config;
mod connection;
mod dedupe;
mod dispatch;
mod error;
mod event;
mod heartbeat;
mod nodes;
mod saver;
mod shared;
mod task;
mod token;
mod transport;

#[cfg(test)]
mod tests;

pub use backoff::BackoffConfig;
pub use client::{Client, ClientBuilder, Events};
pub use config::{AckMode, SessionConfig, MAX_NAME_LEN, MAX_TOPICS};
pub use connection::{Connection, ConnectionBuilder, ConnectionState};
pub use error::{ClientError, ErrorCode, KickReason};
pub use event::{DisconnectReason, Event, Gap, GapReason, Message, Qos};
pub use heartbeat::HeartbeatConfig;
pub use store::{CursorStore, Cursors, FileStore, MemoryStore, SessionKey, StoreError};
pub use token::{BoxError, TokenFuture, TokenProvider};
pub use transport::TlsConfig;

/// The rustls version this crate uses, for building a [`TlsConfig`] from a root store or a
/// complete client configuration.
pub use rustls;
