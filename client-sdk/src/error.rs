//! The errors the SDK reports to the application.

use std::sync::Arc;

pub use herald_proto::client::{ErrorCode, KickReason};

/// Everything a call on a [`Client`](crate::Client) or [`Connection`](crate::Connection) can fail
/// with, and what an [`Event::Error`](crate::Event::Error) or
/// [`Event::Closed`](crate::Event::Closed) carries.
///
/// Variants are split by what the application can do about them: [`is_retryable`] tells
/// whether trying the same thing again later may succeed.
///
/// [`is_retryable`]: ClientError::is_retryable
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration is unusable (empty app, no nodes, bad CA file, …).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server refused the session's token (`BAD_TOKEN`, `TOKEN_EXPIRED`) and the token
    /// provider had no new one. The session is over; open it again with a fresh token.
    #[error("authentication failed ({code:?}): {message}")]
    Auth {
        /// `BAD_TOKEN` or `TOKEN_EXPIRED`.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server refused the session for a reason a retry does not fix: `UNKNOWN_APP`,
    /// `PERMISSION_DENIED`, `SESSION_EXISTS`, `TOO_MANY_SESSIONS`, `UNSUPPORTED_VERSION`,
    /// `BAD_REQUEST`.
    #[error("refused by the server ({code:?}): {message}")]
    Refused {
        /// The protocol error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The session was ended by the server and is not reconnected: a newer login of the same
    /// device ([`KickReason::Replaced`]), the app's device policy ([`KickReason::Policy`]), the
    /// app's backend or an operator ([`KickReason::Admin`]). (A `REPLACED` blamed on the SDK's
    /// own abandoned login attempt is not final: see
    /// [`DisconnectReason::ReplacedByOwnAttempt`](crate::DisconnectReason::ReplacedByOwnAttempt).)
    #[error("session kicked ({code:?}): {reason}")]
    Kicked {
        /// Why, as the protocol codes it; branch on this.
        code: KickReason,
        /// The server's explanation, for humans.
        reason: String,
    },
    /// The session or connection is closed (by [`Client::close`](crate::Client::close), by
    /// [`Connection::close`](crate::Connection::close), or after a terminal event).
    #[error("closed")]
    Closed,
    /// No answer within the configured time.
    #[error("timed out")]
    Timeout,
    /// The backend did not process an upstream request: `UPSTREAM_UNAVAILABLE` (retry later) or
    /// `UPSTREAM_FAILED` (the backend answered with an error).
    #[error("upstream failed ({code:?}): {message}")]
    Upstream {
        /// `UPSTREAM_UNAVAILABLE` or `UPSTREAM_FAILED`.
        code: ErrorCode,
        /// The server's or backend's explanation.
        message: String,
    },
    /// The connection was lost after a request was sent and before its answer arrived: the
    /// server may or may not have acted on it.
    #[error("connection lost before the reply; the outcome is unknown")]
    Disconnected,
    /// A request is larger than the server's maximum frame size.
    #[error("frame of {len} bytes exceeds the server's maximum of {max}")]
    TooLarge {
        /// Encoded size of the frame.
        len: usize,
        /// The server's maximum (from WELCOME).
        max: usize,
    },
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(Arc<std::io::Error>),
    /// The TLS handshake or configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The server sent something the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No seed answered Dispatch.
    #[error("dispatch failed: {0}")]
    Dispatch(String),
    /// The cursor store failed to load or save.
    #[error("cursor store: {0}")]
    Store(String),
    /// The token provider failed.
    #[error("token provider failed: {0}")]
    Token(String),
}

impl ClientError {
    /// Whether doing the same thing again later may succeed (network trouble, timeouts, a busy
    /// backend) as opposed to needing a change first (configuration, credentials, a kick).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Timeout
            | ClientError::Disconnected
            | ClientError::Io(_)
            | ClientError::Dispatch(_)
            | ClientError::Store(_)
            | ClientError::Token(_) => true,
            ClientError::Upstream { code, .. } => *code == ErrorCode::UpstreamUnavailable,
            ClientError::Config(_)
            | ClientError::Auth { .. }
            | ClientError::Refused { .. }
            | ClientError::Kicked { .. }
            | ClientError::Closed
            | ClientError::TooLarge { .. }
            | ClientError::Tls(_)
            | ClientError::Protocol(_) => false,
        }
    }

    /// The protocol error code behind this error, if the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Auth { code, .. }
            | ClientError::Refused { code, .. }
            | ClientError::Upstream { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(Arc::new(e))
    }
}

/// Decodes a wire error code, mapping values this SDK does not know to `Unspecified`.
pub(crate) fn code_of(raw: i32) -> ErrorCode {
    ErrorCode::try_from(raw).unwrap_or(ErrorCode::Unspecified)
}

/// Decodes a wire kick code, mapping values this SDK does not know to `Unspecified`.
pub(crate) fn kick_code_of(raw: i32) -> KickReason {
    KickReason::try_from(raw).unwrap_or(KickReason::Unspecified)
}
