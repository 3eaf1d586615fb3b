//! What other tasks hand a connection: frames to write, sessions whose mailbox has news, kicks, and
//! a request to close. The connection task owns the socket; everyone else only touches this.
//!
//! Memory matters here (one per connection): the queue does not allocate until used, the wake-up
//! is one `Notify`, and timers are not per connection (the room's sweeper reads `last_rx`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use herald_proto::client::{ErrorCode, KickReason};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A complete frame (length prefix included).
    Frame(Bytes),
    /// A frame built from a per-session head (length prefix + the session's own fields) and a body
    /// shared by every receiver of a topic message: one `Bytes` for all subscribers.
    Shared {
        head: [u8; 16],
        head_len: u8,
        body: Bytes,
    },
}

impl Outbound {
    pub fn len(&self) -> usize {
        match self {
            Outbound::Frame(b) => b.len(),
            Outbound::Shared { head_len, body, .. } => *head_len as usize + body.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write_into(&self, dst: &mut Vec<u8>) {
        match self {
            Outbound::Frame(b) => dst.extend_from_slice(b),
            Outbound::Shared { head, head_len, body } => {
                dst.extend_from_slice(&head[..*head_len as usize]);
                dst.extend_from_slice(body);
            }
        }
    }
}

/// Why the node ends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// Send ERROR with this code, then close.
    Error(ErrorCode, String),
    /// Send BYE with redirects (drain, shutdown), then close.
    Bye(String, Vec<String>),
}

/// A session on this connection must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kick {
    pub session_id: u32,
    /// Only the session registered with this epoch ends (fencing); 0 = whatever epoch it has.
    pub epoch: u64,
    pub code: KickReason,
    pub reason: String,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Outbound>,
    /// Sessions whose mailbox got new messages since the connection last looked.
    pokes: Vec<u32>,
    kicks: Vec<Kick>,
    /// Boxed: set once at most, and `None` for nearly all of a connection's life.
    close: Option<Box<Close>>,
}

/// Work taken by the connection task in one go.
#[derive(Default)]
pub struct Work {
    pub frames: Vec<Outbound>,
    pub pokes: Vec<u32>,
    pub kicks: Vec<Kick>,
    pub close: Option<Close>,
}

/// The shared half of a connection.
pub struct ConnShared {
    /// Unique on this node for the life of the process.
    pub id: u64,
    /// Peer address, for logs.
    pub peer: std::net::SocketAddr,
    state: Mutex<State>,
    notify: Notify,
    /// Coarse clock (ms since the room started) of the last frame received; the sweeper closes
    /// connections that stay silent past `idle_limit_ms`.
    last_rx: AtomicU64,
    /// The idle limit for this connection (2.5 × the client's announced heartbeat).
    idle_limit_ms: AtomicU64,
    /// Set once the first session is open; before that the auth timeout applies.
    authed: AtomicBool,
    /// Earliest token expiry of the connection's sessions (unix seconds, 0 = none); the sweeper
    /// wakes the connection when it passes.
    token_deadline: AtomicU64,
    /// When the connection was accepted (same clock as `last_rx`).
    pub opened_at: u64,
    /// Frames allowed in the queue before the client counts as a slow consumer.
    limit: usize,
}

impl ConnShared {
    pub fn new(id: u64, peer: std::net::SocketAddr, now: u64, idle_limit_ms: u64, limit: usize) -> Self {
        ConnShared {
            id,
            peer,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            last_rx: AtomicU64::new(now),
            idle_limit_ms: AtomicU64::new(idle_limit_ms),
            authed: AtomicBool::new(false),
            token_deadline: AtomicU64::new(0),
            opened_at: now,
            limit,
        }
    }

    /// Queues a frame. A full queue marks the connection a slow consumer (it will be closed; its
    /// stored messages wait for the next connection) and returns false.
    pub fn push(&self, frame: Outbound) -> bool {
        let mut st = self.state.lock();
        if st.close.is_some() {
            return false;
        }
        if st.queue.len() >= self.limit {
            st.close = Some(Box::new(Close::Error(
                ErrorCode::SlowConsumer,
                "send queue full".into(),
            )));
            drop(st);
            self.notify.notify_one();
            return false;
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back(frame);
        drop(st);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Tells the connection that `session_id`'s mailbox has new messages.
    pub fn poke(&self, session_id: u32) {
        let mut st = self.state.lock();
        if !st.pokes.contains(&session_id) {
            st.pokes.push(session_id);
        }
        drop(st);
        self.notify.notify_one();
    }

    pub fn kick(&self, kick: Kick) {
        self.state.lock().kicks.push(kick);
        self.notify.notify_one();
    }

    /// Asks the connection to close (the first reason wins).
    pub fn close(&self, why: Close) {
        let mut st = self.state.lock();
        if st.close.is_none() {
            st.close = Some(Box::new(why));
        }
        drop(st);
        self.notify.notify_one();
    }

    /// Takes everything pending. Frames are limited to `max` per call so one connection's burst
    /// does not monopolize its task's write buffer.
    pub fn take(&self, max: usize) -> Work {
        let mut st = self.state.lock();
        let n = st.queue.len().min(max);
        let frames: Vec<Outbound> = st.queue.drain(..n).collect();
        if st.queue.is_empty() && st.queue.capacity() > 64 {
            // Give back the memory of a burst.
            st.queue = VecDeque::new();
        }
        let more = !st.queue.is_empty();
        let w = Work {
            frames,
            pokes: std::mem::take(&mut st.pokes),
            kicks: std::mem::take(&mut st.kicks),
            close: st.close.as_deref().cloned(),
        };
        drop(st);
        if more {
            self.notify.notify_one();
        }
        w
    }

    pub async fn notified(&self) {
        self.notify.notified().await
    }

    pub fn touch(&self, now: u64) {
        self.last_rx.store(now, Ordering::Relaxed);
    }

    pub fn last_rx(&self) -> u64 {
        self.last_rx.load(Ordering::Relaxed)
    }

    pub fn set_idle_limit(&self, ms: u64) {
        self.idle_limit_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_limit(&self) -> u64 {
        self.idle_limit_ms.load(Ordering::Relaxed)
    }

    pub fn set_authed(&self) {
        self.authed.store(true, Ordering::Relaxed);
    }

    pub fn authed(&self) -> bool {
        self.authed.load(Ordering::Relaxed)
    }

    pub fn set_token_deadline(&self, unix_s: u64) {
        self.token_deadline.store(unix_s, Ordering::Relaxed);
    }

    pub fn token_deadline(&self) -> u64 {
        self.token_deadline.load(Ordering::Relaxed)
    }

    /// Wakes the connection task without giving it anything (it re-checks its timers).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    pub fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(limit: usize) -> ConnShared {
        ConnShared::new(1, "127.0.0.1:1".parse().unwrap(), 0, 1000, limit)
    }

    #[test]
    fn a_full_queue_closes_as_slow_consumer() {
        let c = conn(2);
        assert!(c.push(Outbound::Frame(Bytes::from_static(b"a"))));
        assert!(c.push(Outbound::Frame(Bytes::from_static(b"b"))));
        assert!(!c.push(Outbound::Frame(Bytes::from_static(b"c"))));
        let w = c.take(10);
        assert_eq!(w.frames.len(), 2);
        assert!(matches!(w.close, Some(Close::Error(ErrorCode::SlowConsumer, _))));
    }

    #[test]
    fn pokes_are_deduplicated_and_taken_once() {
        let c = conn(8);
        c.poke(3);
        c.poke(3);
        c.poke(4);
        assert_eq!(c.take(10).pokes, vec![3, 4]);
        assert!(c.take(10).pokes.is_empty());
    }

    #[test]
    fn shared_frames_write_head_then_body() {
        let mut head = [0u8; 16];
        head[..3].copy_from_slice(b"abc");
        let o = Outbound::Shared {
            head,
            head_len: 3,
            body: Bytes::from_static(b"defg"),
        };
        let mut v = Vec::new();
        o.write_into(&mut v);
        assert_eq!(v, b"abcdefg");
        assert_eq!(o.len(), 7);
    }
}
