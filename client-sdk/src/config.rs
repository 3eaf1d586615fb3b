//! What one session (one app's user and device) is: [`SessionConfig`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{CursorStore, SessionKey};
use crate::token::{TokenProvider, TokenSource};
use crate::ClientError;

/// Longest app, user, device or topic name the server accepts, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Most topics one session may subscribe to (besides the implicit `*`).
pub const MAX_TOPICS: usize = 128;

/// When a message counts as handled (acked to the server, and its cursor advanced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// When the event stream hands the message to the app (the default). Simple, and what most
    /// apps want: a message shown once is not shown again, even after a restart.
    #[default]
    Auto,
    /// When the app calls [`Message::ack`](crate::Message::ack) or
    /// [`Client::ack`](crate::Client::ack). Messages not acked before a crash are delivered
    /// again to the next run, so an app that stores messages itself acks after storing.
    Manual,
}

/// One session: an app's user on a device, with its token and resume options.
///
/// ```
/// use herald_client::{AckMode, SessionConfig};
///
/// let session = SessionConfig::new("demo", "alice", "phone-1")
///     .token("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...")
///     .platform("android")
///     .topics(["news", "room/42"])
///     .ack_mode(AckMode::Manual);
/// assert_eq!(session.key().user, "alice");
/// ```
#[derive(Clone)]
pub struct SessionConfig {
    /// App id.
    pub(crate) app: String,
    /// User id.
    pub(crate) user: String,
    /// Device id.
    pub(crate) device: String,
    /// Free text for the app's multi-device policy ("ios", "android", "web").
    pub(crate) platform: String,
    /// The token, or who to ask for one.
    pub(crate) token: Option<TokenSource>,
    /// Topics subscribed when the session opens.
    pub(crate) topics: Vec<String>,
    /// When messages count as handled.
    pub(crate) ack_mode: AckMode,
    /// Where cursors survive a restart; `None` keeps them in memory only.
    pub(crate) store: Option<Arc<dyn CursorStore>>,
    /// Capacity of the event channel.
    pub(crate) event_buffer: usize,
    /// Message ids remembered for deduplication.
    pub(crate) dedupe_window: usize,
    /// Most recent ids written to the store with the cursors.
    pub(crate) persisted_ids: usize,
    /// Minimum time between two cursor saves.
    pub(crate) persist_interval: Duration,
    /// How long `upstream` waits for the backend's reply.
    pub(crate) upstream_timeout: Duration,
    /// How long `subscribe`, `unsubscribe` and `close` wait for the server.
    pub(crate) request_timeout: Duration,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("app", &self.app)
            .field("user", &self.user)
            .field("device", &self.device)
            .field("platform", &self.platform)
            .field("token", &self.token)
            .field("topics", &self.topics)
            .field("ack_mode", &self.ack_mode)
            .field("store", &self.store.as_ref().map(|_| ".."))
            .field("event_buffer", &self.event_buffer)
            .field("dedupe_window", &self.dedupe_window)
            .field("persisted_ids", &self.persisted_ids)
            .field("persist_interval", &self.persist_interval)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl SessionConfig {
    /// A session for `user` on `device` of `app`. A token ([`token`](Self::token) or
    /// [`token_provider`](Self::token_provider)) is required before opening it.
    pub fn new(app: impl Into<String>, user: impl Into<String>, device: impl Into<String>) -> Self {
        SessionConfig {
            app: app.into(),
            user: user.into(),
            device: device.into(),
            platform: String::new(),
            token: None,
            topics: Vec::new(),
            ack_mode: AckMode::Auto,
            store: None,
            event_buffer: 256,
            dedupe_window: 4096,
            persisted_ids: 512,
            persist_interval: Duration::from_millis(100),
            upstream_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// A fixed token. When it expires the session ends with
    /// [`ClientError::Auth`]; use [`token_provider`](Self::token_provider) for long-lived sessions.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(TokenSource::Static(token.into()));
        self
    }

    /// Asks `provider` for tokens: at open, before the current one expires, and after the server
    /// refused one. See [`TokenProvider`].
    pub fn token_provider(mut self, provider: impl TokenProvider) -> Self {
        self.token = Some(TokenSource::Provider(Arc::new(provider)));
        self
    }

    /// Platform name for the app's multi-device policy ("ios", "android", "web"; default empty).
    pub fn platform(mut self, platform: impl Into<String>) -> Self {
        self.platform = platform.into();
        self
    }

    /// Topics to subscribe when the session opens (the app-wide `*` is implicit). Their resume
    /// cursors come from the store when there is one.
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// When messages count as handled (default [`AckMode::Auto`]).
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }

    /// Keeps the cursors in `store`, so an app restart resumes where it was (default: in memory
    /// only, which still resumes across reconnects). See [`FileStore`](crate::FileStore).
    pub fn store(mut self, store: impl CursorStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Capacity of the event channel (default 256). When it is full the SDK stops reading from
    /// the connection until the app catches up: nothing is dropped, and the server holds stored
    /// messages for the next connection if the app stays behind too long.
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }

    /// How many recent message ids are remembered to drop re-deliveries (default 4096).
    pub fn dedupe_window(mut self, ids: usize) -> Self {
        self.dedupe_window = ids.max(1);
        self
    }

    /// How many of the most recent ids are saved with the cursors (default 512). The ids only
    /// need to cover messages handed out whose ack may not have reached the server.
    pub fn persisted_ids(mut self, ids: usize) -> Self {
        self.persisted_ids = ids;
        self
    }

    /// Minimum time between two cursor saves (default 100 ms): a crash may re-show what was
    /// handed out in the last interval; a shorter one costs more writes.
    pub fn persist_interval(mut self, interval: Duration) -> Self {
        self.persist_interval = interval;
        self
    }

    /// How long [`Client::upstream`](crate::Client::upstream) waits for the reply, including
    /// time spent waiting for a connection (default 30 s).
    pub fn upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_timeout = timeout;
        self
    }

    /// How long subscribe, unsubscribe and close wait for the server (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The (app, user, device) this session is for.
    pub fn key(&self) -> SessionKey {
        SessionKey {
            app: self.app.clone(),
            user: self.user.clone(),
            device: self.device.clone(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        for (what, v) in [("app", &self.app), ("user", &self.user), ("device", &self.device)] {
            if v.is_empty() {
                return Err(ClientError::Config(format!("{what} is empty")));
            }
            if v.len() > MAX_NAME_LEN {
                return Err(ClientError::Config(format!(
                    "{what} is longer than {MAX_NAME_LEN} bytes"
                )));
            }
        }
        if self.token.is_none() {
            return Err(ClientError::Config("no token or token provider".into()));
        }
        if self.topics.len() > MAX_TOPICS {
            return Err(ClientError::Config(format!("more than {MAX_TOPICS} topics")));
        }
        for t in &self.topics {
            validate_topic(t)?;
        }
        Ok(())
    }
}

pub(crate) fn validate_topic(topic: &str) -> Result<(), ClientError> {
    if topic.is_empty() {
        return Err(ClientError::Config("topic is empty".into()));
    }
    if topic.len() > MAX_NAME_LEN {
        return Err(ClientError::Config(format!(
            "topic is longer than {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let ok = SessionConfig::new("a", "u", "d").token("t");
        assert!(ok.validate().is_ok());
        let e = SessionConfig::new("a", "", "d")
            .token("t")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("user is empty"), "{e}");
        let e = SessionConfig::new("a", "u", "d").validate().unwrap_err();
        assert!(e.to_string().contains("token"), "{e}");
        let e = SessionConfig::new("a", "u", "x".repeat(257))
            .token("t")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
        let e = SessionConfig::new("a", "u", "d")
            .token("t")
            .topics([""])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("topic"), "{e}");
        let many = (0..=MAX_TOPICS).map(|i| format!("t{i}"));
        assert!(SessionConfig::new("a", "u", "d")
            .token("t")
            .topics(many)
            .validate()
            .is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let s = SessionConfig::new("a", "u", "d").token("very-secret");
        assert!(!format!("{s:?}").contains("very-secret"));
    }
}
