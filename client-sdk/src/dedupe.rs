//! Exactly-once to the application: which PUSH frames are duplicates.
//!
//! The server delivers at least once: a QoS1 message is replayed after a reconnect until its ack
//! is committed, and an ack can be lost with the connection. The SDK drops a message when
//!
//! - its `msg_id` is among the last N ids accepted (the window), or
//! - it is a mailbox message with `seq` at or below the highest mailbox seq accepted or acked
//!   (mailbox seqs reach a device in increasing order, so anything at or below the mark was
//!   already handled), or
//! - it is a topic message with `topic_seq` at or below that topic's mark.
//!
//! The window also protects messages without a seq (QoS0 direct messages), and survives an app
//! restart through the cursor store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use herald_proto::client::Push;

/// A bounded set of recent message ids: inserting past the capacity forgets the oldest.
#[derive(Debug, Clone)]
pub(crate) struct RecentIds {
    /// Maximum number of ids kept.
    cap: usize,
    /// Ids in insertion order, oldest first, for eviction.
    order: VecDeque<Arc<str>>,
    /// The same ids, for lookup.
    set: HashSet<Arc<str>>,
}

impl RecentIds {
    pub(crate) fn new(cap: usize) -> Self {
        RecentIds {
            cap: cap.max(1),
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Adds `id`; returns false if it was already present (then nothing changes).
    pub(crate) fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(id.clone());
        self.set.insert(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// The most recent `n` ids, oldest first.
    pub(crate) fn newest(&self, n: usize) -> Vec<String> {
        let skip = self.order.len().saturating_sub(n);
        self.order.iter().skip(skip).map(|s| s.to_string()).collect()
    }
}

/// The duplicate filter of one session (see the module docs for the rules).
#[derive(Debug, Clone)]
pub(crate) struct DedupeFilter {
    /// Recently accepted message ids.
    ids: RecentIds,
    /// Highest mailbox seq accepted (or acked, or covered by a gap).
    mailbox_mark: u64,
    /// Highest topic seq accepted per topic.
    topic_marks: HashMap<String, u64>,
}

impl DedupeFilter {
    pub(crate) fn new(window: usize) -> Self {
        DedupeFilter {
            ids: RecentIds::new(window),
            mailbox_mark: 0,
            topic_marks: HashMap::new(),
        }
    }

    /// Whether `push` is new; if so it is recorded, so the same message is refused next time.
    pub(crate) fn accept(&mut self, push: &Push) -> bool {
        if !push.msg_id.is_empty() && self.ids.contains(&push.msg_id) {
            return false;
        }
        if push.topic.is_empty() {
            if push.seq > 0 && push.seq <= self.mailbox_mark {
                return false;
            }
        } else if push.topic_seq > 0 && push.topic_seq <= self.topic_mark(&push.topic) {
            return false;
        }
        if !push.msg_id.is_empty() {
            self.ids.insert(&push.msg_id);
        }
        if push.topic.is_empty() {
            self.mailbox_mark = self.mailbox_mark.max(push.seq);
        } else if push.topic_seq > 0 {
            self.raise_topic(&push.topic, push.topic_seq);
        }
        true
    }

    /// Records an id as seen without a message (ids restored from the cursor store).
    pub(crate) fn remember_id(&mut self, id: &str) {
        self.ids.insert(id);
    }

    /// Everything at or below `seq` in the mailbox is handled (acked, or lost in a gap).
    pub(crate) fn raise_mailbox(&mut self, seq: u64) {
        self.mailbox_mark = self.mailbox_mark.max(seq);
    }

    #[cfg(test)]
    pub(crate) fn mailbox_mark(&self) -> u64 {
        self.mailbox_mark
    }

    /// Everything at or below `seq` in `topic` is handled.
    pub(crate) fn raise_topic(&mut self, topic: &str, seq: u64) {
        match self.topic_marks.get_mut(topic) {
            Some(m) => *m = (*m).max(seq),
            None => {
                self.topic_marks.insert(topic.to_string(), seq);
            }
        }
    }

    pub(crate) fn topic_mark(&self, topic: &str) -> u64 {
        self.topic_marks.get(topic).copied().unwrap_or(0)
    }

    /// Forgets a topic's mark (after unsubscribing; a later subscribe starts from the server's seq).
    pub(crate) fn forget_topic(&mut self, topic: &str) {
        self.topic_marks.remove(topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(id: &str, seq: u64) -> Push {
        Push {
            msg_id: id.into(),
            seq,
            ..Default::default()
        }
    }

    fn topic(id: &str, t: &str, seq: u64) -> Push {
        Push {
            msg_id: id.into(),
            topic: t.into(),
            topic_seq: seq,
            ..Default::default()
        }
    }

    #[test]
    fn recent_ids_evicts_the_oldest() {
        let mut r = RecentIds::new(3);
        for id in ["a", "b", "c", "d"] {
            assert!(r.insert(id));
        }
        assert!(!r.contains("a"));
        assert!(r.contains("b") && r.contains("d"));
        assert!(!r.insert("d"));
        assert_eq!(r.len(), 3);
        assert_eq!(r.newest(2), vec!["c".to_string(), "d".to_string()]);
        assert_eq!(r.newest(10).len(), 3);
    }

    #[test]
    fn same_id_is_refused_even_with_another_seq() {
        let mut f = DedupeFilter::new(16);
        assert!(f.accept(&mailbox("m1", 1)));
        assert!(!f.accept(&mailbox("m1", 1)));
        // Direct QoS0 messages have no seq: only the id protects them.
        assert!(f.accept(&mailbox("q0", 0)));
        assert!(!f.accept(&mailbox("q0", 0)));
        assert!(f.accept(&mailbox("q1", 0)));
    }

    #[test]
    fn mailbox_seq_at_or_below_the_mark_is_a_duplicate_even_after_the_window_forgot_it() {
        let mut f = DedupeFilter::new(2);
        for s in 1..=10 {
            assert!(f.accept(&mailbox(&format!("m{s}"), s)));
        }
        // m3 left the 2-id window long ago; its seq still marks it.
        assert!(!f.accept(&mailbox("m3", 3)));
        // A jump (a message for other devices of the user was skipped) is not a loss.
        assert!(f.accept(&mailbox("m15", 15)));
        assert!(!f.accept(&mailbox("m12", 12)));
    }

    #[test]
    fn restored_cursor_and_ids_filter_a_replay() {
        let mut f = DedupeFilter::new(16);
        f.raise_mailbox(5);
        f.remember_id("m6");
        assert!(!f.accept(&mailbox("m5", 5)));
        assert!(
            !f.accept(&mailbox("m6", 6)),
            "shown before the restart, not yet acked"
        );
        assert!(f.accept(&mailbox("m7", 7)));
    }

    #[test]
    fn topics_are_marked_independently() {
        let mut f = DedupeFilter::new(16);
        assert!(f.accept(&topic("t1", "news", 1)));
        assert!(f.accept(&topic("s1", "sport", 1)));
        assert!(!f.accept(&topic("t1b", "news", 1)));
        assert!(f.accept(&topic("t2", "news", 2)));
        f.raise_topic("sport", 9);
        assert!(!f.accept(&topic("s5", "sport", 5)));
        assert_eq!(f.topic_mark("news"), 2);
        f.forget_topic("news");
        assert_eq!(f.topic_mark("news"), 0);
        // Mailbox and topic marks do not interfere.
        assert!(f.accept(&mailbox("m1", 1)));
        assert_eq!(f.mailbox_mark(), 1);
    }
}
