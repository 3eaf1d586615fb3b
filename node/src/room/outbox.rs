//! What other tasks hand a connection: frames to write, sessions whose mailbox has news, kicks, and
//! a request to close. The connection task owns the socket; everyone else only touches this.
//!
//! Memory matters here (one per connection): the queue does not allocate until used, the wake-up
//! is a doorbell (a flag and the one waiting task's waker: there is only ever one waiter, so no
//! waiter list, and the wait itself is a pointer in the connection's task), and timers are not per
//! connection (the room's sweeper reads `last_rx`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use herald_proto::client::{ErrorCode, KickReason};
use parking_lot::Mutex;

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
    /// Kicks and the close reason, boxed: `None` for nearly all of a connection's life.
    rare: Option<Box<Rare>>,
}

#[derive(Default)]
struct Rare {
    kicks: Vec<Kick>,
    /// Set once at most (the first reason wins).
    close: Option<Close>,
}

impl State {
    fn closing(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.close.is_some())
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }
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
    /// The doorbell: set by whoever gives the connection something, cleared by the connection
    /// when it looks; `waker` is the connection task's, registered before it sleeps.
    rung: AtomicBool,
    waker: AtomicWaker,
    /// Coarse clock (ms since the room started) of the last frame received; the sweeper closes
    /// connections that stay silent past `idle_limit_ms`.
    last_rx: AtomicU64,
    /// The idle limit for this connection in ms (2.5 × the client's announced heartbeat).
    idle_limit_ms: AtomicU32,
    /// Set once the first session is open; before that the auth timeout applies.
    authed: AtomicBool,
    /// Earliest token expiry of the connection's sessions (unix seconds, 0 = none; u32 lasts
    /// until 2106, later expiries count as never); the sweeper wakes the connection when it
    /// passes.
    token_deadline: AtomicU32,
    /// When the connection was accepted (same clock as `last_rx`).
    pub opened_at: u64,
    /// Frames allowed in the queue before the client counts as a slow consumer.
    limit: u32,
    /// The connection's client publishes (PUBLISH_TOPIC) waiting for their commit.
    pub publishes_in_flight: AtomicU32,
}

impl ConnShared {
    pub fn new(id: u64, peer: std::net::SocketAddr, now: u64, idle_limit_ms: u64, limit: usize) -> Self {
        ConnShared {
            id,
            peer,
            state: Mutex::new(State::default()),
            rung: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            last_rx: AtomicU64::new(now),
            idle_limit_ms: AtomicU32::new(saturate(idle_limit_ms)),
            authed: AtomicBool::new(false),
            token_deadline: AtomicU32::new(0),
            opened_at: now,
            limit: saturate(limit as u64),
            publishes_in_flight: AtomicU32::new(0),
        }
    }

    /// Queues a frame. A full queue marks the connection a slow consumer (it will be closed; its
    /// stored messages wait for the next connection) and returns false.
    pub fn push(&self, frame: Outbound) -> bool {
        let mut st = self.state.lock();
        if st.closing() {
            return false;
        }
        if st.queue.len() >= self.limit as usize {
            st.rare().close = Some(Close::Error(ErrorCode::SlowConsumer, "send queue full".into()));
            drop(st);
            self.ring();
            return false;
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back(frame);
        drop(st);
        if was_empty {
            self.ring();
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
        self.ring();
    }

    pub fn kick(&self, kick: Kick) {
        self.state.lock().rare().kicks.push(kick);
        self.ring();
    }

    /// Asks the connection to close (the first reason wins).
    pub fn close(&self, why: Close) {
        let mut st = self.state.lock();
        let rare = st.rare();
        if rare.close.is_none() {
            rare.close = Some(why);
        }
        drop(st);
        self.ring();
    }

    /// Takes everything pending. Frames are limited to `max` per call so one connection's burst
    /// does not monopolize its task's write buffer.
    pub fn take(&self, max: usize) -> Work {
        // What was rung for until now is taken below; a ring from here on is for later work.
        self.rung.store(false, Ordering::Release);
        let mut st = self.state.lock();
        let n = st.queue.len().min(max);
        let frames: Vec<Outbound> = st.queue.drain(..n).collect();
        if st.queue.is_empty() && st.queue.capacity() > 64 {
            // Give back the memory of a burst.
            st.queue = VecDeque::new();
        }
        let more = !st.queue.is_empty();
        let (mut kicks, mut close) = (Vec::new(), None);
        if let Some(r) = st.rare.as_mut() {
            kicks = std::mem::take(&mut r.kicks);
            close = r.close.clone();
            if close.is_none() {
                // Only kicks: give the box back. A close reason stays (later pushes are refused).
                st.rare = None;
            }
        }
        let w = Work {
            frames,
            pokes: std::mem::take(&mut st.pokes),
            kicks,
            close,
        };
        drop(st);
        if more {
            self.ring();
        }
        w
    }

    /// Wakes the connection task; if it is busy, its next `poll_rung` is ready at once (like a
    /// stored permit).
    fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready (and cleared) once the doorbell rang since the last ready poll. Only the
    /// connection's own task polls this.
    pub fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.rung.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A ring between the check above and the registration would otherwise be missed.
        if self.rung.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    pub fn touch(&self, now: u64) {
        self.last_rx.store(now, Ordering::Relaxed);
    }

    pub fn last_rx(&self) -> u64 {
        self.last_rx.load(Ordering::Relaxed)
    }

    pub fn set_idle_limit(&self, ms: u64) {
        self.idle_limit_ms.store(saturate(ms), Ordering::Relaxed);
    }

    pub fn idle_limit(&self) -> u64 {
        self.idle_limit_ms.load(Ordering::Relaxed) as u64
    }

    pub fn set_authed(&self) {
        self.authed.store(true, Ordering::Relaxed);
    }

    pub fn authed(&self) -> bool {
        self.authed.load(Ordering::Relaxed)
    }

    pub fn set_token_deadline(&self, unix_s: u64) {
        self.token_deadline.store(saturate(unix_s), Ordering::Relaxed);
    }

    pub fn token_deadline(&self) -> u64 {
        match self.token_deadline.load(Ordering::Relaxed) {
            u32::MAX => u64::MAX,
            s => s as u64,
        }
    }

    /// Wakes the connection task without giving it anything (it re-checks its timers).
    pub fn wake(&self) {
        self.ring();
    }

    pub fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }
}

/// A u64 stored in 32 bits; values past `u32::MAX` become `u32::MAX` ("never").
fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
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
    fn kicks_are_taken_once_and_the_close_reason_stays() {
        let c = conn(8);
        c.kick(Kick {
            session_id: 1,
            epoch: 2,
            code: KickReason::TokenExpired,
            reason: "x".into(),
        });
        let w = c.take(10);
        assert_eq!(w.kicks.len(), 1);
        assert!(w.close.is_none());
        assert!(
            c.state.lock().rare.is_none(),
            "the kick's box is freed once taken"
        );
        c.close(Close::Bye("drain".into(), vec![]));
        c.close(Close::Error(ErrorCode::BadRequest, "later".into()));
        assert!(
            !c.push(Outbound::Frame(Bytes::from_static(b"a"))),
            "no pushes after close"
        );
        for _ in 0..2 {
            assert!(
                matches!(c.take(10).close, Some(Close::Bye(..))),
                "first reason, every time"
            );
        }
    }

    #[test]
    fn the_doorbell_keeps_a_ring_until_polled_or_taken() {
        let c = conn(8);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(c.poll_rung(&mut cx).is_pending());
        c.poke(1);
        assert!(c.poll_rung(&mut cx).is_ready());
        assert!(c.poll_rung(&mut cx).is_pending(), "one ring, one wake-up");
        c.poke(2);
        let _ = c.take(10);
        assert!(
            c.poll_rung(&mut cx).is_pending(),
            "take consumed what the ring was for"
        );
    }

    #[test]
    fn limits_past_32_bits_saturate() {
        let c = conn(8);
        c.set_token_deadline(u64::from(u32::MAX) + 5);
        assert_eq!(c.token_deadline(), u64::MAX);
        c.set_token_deadline(1_800_000_000);
        assert_eq!(c.token_deadline(), 1_800_000_000);
        c.set_idle_limit(45_000);
        assert_eq!(c.idle_limit(), 45_000);
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
