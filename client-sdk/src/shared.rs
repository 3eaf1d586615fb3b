//! State one session shares between the app side (its `Client`, `Events` and `Message`s) and the
//! connection task: what the app has handled, which drives acks and the saved cursors.
//!
//! The lock is a plain mutex held for a few field updates and never across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::AckMode;
use crate::dedupe::RecentIds;
use crate::event::{Event, Message};
use crate::store::{CursorStore, Cursors, SessionKey, StoreError};

/// What the app has handled.
#[derive(Debug)]
pub(crate) struct Progress {
    /// Highest mailbox seq handled (acked, or to be acked): the resume cursor.
    pub(crate) acked_seq: u64,
    /// Highest mailbox seq handed to the app; manual acks are capped by it, so a mistaken
    /// `ack(seq)` cannot skip messages the app never saw.
    pub(crate) delivered_seq: u64,
    /// Highest topic seq handled per topic: the topics' resume cursors.
    pub(crate) topics: BTreeMap<String, u64>,
    /// Ids of handled messages, saved with the cursors.
    pub(crate) done_ids: RecentIds,
    /// Changed since the last save.
    pub(crate) dirty: bool,
}

/// The session's cursor store, once its saver runs.
struct StoreSlot(Mutex<Option<Arc<dyn CursorStore>>>);

impl std::fmt::Debug for StoreSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreSlot")
    }
}

/// One session's shared state.
#[derive(Debug)]
pub(crate) struct SessionShared {
    /// The session id on the connection.
    pub(crate) id: u32,
    /// (app, user, device).
    pub(crate) key: SessionKey,
    /// When messages count as handled.
    pub(crate) ack_mode: AckMode,
    /// How many of the most recent ids a snapshot carries.
    pub(crate) persisted_ids: usize,
    /// What the app has handled.
    progress: Mutex<Progress>,
    /// Wakes the connection task: acks to send.
    pub(crate) conn_wake: Arc<Notify>,
    /// Wakes the cursor saver.
    pub(crate) save_wake: Notify,
    /// Set once the session is over; acks after it are ignored.
    pub(crate) closed: AtomicBool,
    /// Login attempts given up on without a definite answer (each may still register).
    pub(crate) abandoned_logins: AtomicU64,
    /// The cursor saver task, awaited by whoever closes the session (its last save).
    saver: Mutex<Option<JoinHandle<()>>>,
    /// The session's cursor store, for saves after the saver has ended (see [`Self::save_late`]).
    store: StoreSlot,
    /// Held across snapshot and save, so saves reach the store in the order of their snapshots.
    save_lock: Mutex<()>,
}

impl SessionShared {
    pub(crate) fn new(
        id: u32,
        key: SessionKey,
        ack_mode: AckMode,
        persisted_ids: usize,
        window: usize,
        restored: &Cursors,
        conn_wake: Arc<Notify>,
    ) -> Self {
        let mut done_ids = RecentIds::new(window);
        for id in &restored.recent_ids {
            done_ids.insert(id);
        }
        SessionShared {
            id,
            key,
            ack_mode,
            persisted_ids,
            progress: Mutex::new(Progress {
                acked_seq: restored.last_acked_seq,
                delivered_seq: restored.last_acked_seq,
                topics: restored.topics.clone(),
                done_ids,
                dirty: false,
            }),
            conn_wake,
            save_wake: Notify::new(),
            closed: AtomicBool::new(false),
            abandoned_logins: AtomicU64::new(0),
            saver: Mutex::new(None),
            store: StoreSlot(Mutex::new(None)),
            save_lock: Mutex::new(()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Progress> {
        // A panic while holding this lock leaves plain counters behind: still usable.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self, p: &mut Progress, ack: bool) {
        p.dirty = true;
        self.save_wake.notify_one();
        if ack {
            self.conn_wake.notify_one();
        }
    }

    /// The event stream is handing `ev` to the app.
    pub(crate) fn handed_out(&self, ev: &Event) {
        let mut p = self.lock();
        match ev {
            Event::Message(m) => {
                if m.topic.is_none() {
                    p.delivered_seq = p.delivered_seq.max(m.seq);
                }
                if self.ack_mode == AckMode::Auto {
                    let ack = self.mark_handled(&mut p, m);
                    self.changed(&mut p, ack);
                }
            }
            Event::Gap(g) => match &g.topic {
                None => {
                    p.delivered_seq = p.delivered_seq.max(g.to_seq);
                    if self.ack_mode == AckMode::Auto && g.to_seq > p.acked_seq {
                        p.acked_seq = g.to_seq;
                        self.changed(&mut p, true);
                    }
                }
                Some(t) => {
                    if self.ack_mode == AckMode::Auto {
                        let c = p.topics.entry(t.clone()).or_insert(0);
                        *c = (*c).max(g.to_seq);
                        self.changed(&mut p, false);
                    }
                }
            },
            _ => {}
        }
    }

    /// Records `m` as handled; returns whether the mailbox ack cursor moved.
    fn mark_handled(&self, p: &mut Progress, m: &Message) -> bool {
        if !m.msg_id.is_empty() {
            p.done_ids.insert(&m.msg_id);
        }
        match &m.topic {
            None if m.seq > p.acked_seq => {
                p.acked_seq = m.seq;
                true
            }
            None => false,
            Some(t) => {
                if m.topic_seq > 0 {
                    let c = p.topics.entry(t.clone()).or_insert(0);
                    *c = (*c).max(m.topic_seq);
                }
                false
            }
        }
    }

    /// Manual ack of one message.
    pub(crate) fn ack_message(&self, m: &Message) {
        if self.ack_mode != AckMode::Manual || self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut p = self.lock();
        let ack = self.mark_handled(&mut p, m);
        self.changed(&mut p, ack);
    }

    /// Manual cumulative mailbox ack, capped at what the app was handed.
    pub(crate) fn ack_seq(&self, seq: u64) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut p = self.lock();
        let seq = seq.min(p.delivered_seq);
        if seq > p.acked_seq {
            p.acked_seq = seq;
            self.changed(&mut p, true);
        }
    }

    /// The cursors to save (and clears the dirty flag).
    pub(crate) fn snapshot_for_save(&self) -> Option<Cursors> {
        let mut p = self.lock();
        if !p.dirty {
            return None;
        }
        p.dirty = false;
        Some(self.cursors_locked(&p))
    }

    pub(crate) fn cursors(&self) -> Cursors {
        let p = self.lock();
        self.cursors_locked(&p)
    }

    fn cursors_locked(&self, p: &Progress) -> Cursors {
        Cursors {
            last_acked_seq: p.acked_seq,
            topics: p.topics.clone(),
            recent_ids: p.done_ids.newest(self.persisted_ids),
        }
    }

    /// The server's ack cursor (from WELCOME) is ahead of ours: adopt it.
    pub(crate) fn adopt_server_ack(&self, seq: u64) {
        let mut p = self.lock();
        p.delivered_seq = p.delivered_seq.max(seq);
        if seq > p.acked_seq {
            p.acked_seq = seq;
            self.changed(&mut p, false);
        }
    }

    /// A topic without a cursor gets the server's current seq, so a later resume replays what
    /// follows it.
    pub(crate) fn init_topic(&self, topic: &str, seq: u64) {
        let mut p = self.lock();
        if !p.topics.contains_key(topic) {
            p.topics.insert(topic.to_string(), seq);
            self.changed(&mut p, false);
        }
    }

    pub(crate) fn forget_topic(&self, topic: &str) {
        let mut p = self.lock();
        if p.topics.remove(topic).is_some() {
            self.changed(&mut p, false);
        }
    }

    pub(crate) fn topic_cursor(&self, topic: &str) -> Option<u64> {
        self.lock().topics.get(topic).copied()
    }

    pub(crate) fn acked_seq(&self) -> u64 {
        self.lock().acked_seq
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.save_wake.notify_one();
    }

    pub(crate) fn set_saver(&self, h: JoinHandle<()>, store: Arc<dyn CursorStore>) {
        *self.saver.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        *self.store.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    /// Saves the cursors if they changed since the last save (blocking: call it on the blocking
    /// pool). `None` when there was nothing to save; a failed save leaves them dirty.
    pub(crate) fn save_blocking(&self, store: &dyn CursorStore) -> Option<Result<(), StoreError>> {
        let _order = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cursors = self.snapshot_for_save()?;
        let saved = store.save(&self.key, &cursors);
        if saved.is_err() {
            self.lock().dirty = true;
        }
        Some(saved)
    }

    /// After the session is over, the app still takes the events queued before it ended, and in
    /// auto-ack mode that moves the cursors; the saver has made its last save by then, so each
    /// such change is saved here (on the blocking pool, in order). Without it, the next run on
    /// the same store would show those messages again.
    pub(crate) fn save_late(self: &Arc<Self>) {
        if !self.is_closed() || !self.lock().dirty {
            return;
        }
        let Some(store) = self.store.0.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(session = self.id, "no runtime to save cursors after close");
            return;
        };
        let shared = self.clone();
        rt.spawn_blocking(move || {
            if let Some(Err(e)) = shared.save_blocking(&*store) {
                tracing::warn!(session = shared.id, error = %e, "saving cursors after close failed");
            }
        });
    }

    pub(crate) fn take_saver(&self) -> Option<JoinHandle<()>> {
        self.saver.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
