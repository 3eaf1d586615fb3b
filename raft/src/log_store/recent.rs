//! The newest entries of one group's log, in memory (see [`Recent`]).

use std::collections::VecDeque;

use crate::types::typ::Entry;

/// Bounds of [`Recent`]: entries, and their encoded bytes. Small on purpose: only entries that are
/// about to be replicated or applied need to be there (at 256 writers an entry holds ~128 pushes,
/// ~40 KB), and an idle node should not hold much.
pub(super) const RECENT_MAX_ENTRIES: usize = 256;
pub(super) const RECENT_MAX_BYTES: usize = 1 << 20;

/// The log's newest entries, in memory. Invariant: it holds entries with contiguous indexes, and
/// each equals the DB's entry at its index, so a range that lies inside it reads the same as from
/// RocksDB. Every append, truncate and purge updates it under its lock together with the DB write
/// (normally it then ends at the log's last entry); when a write fails it keeps at most a subset
/// of what the DB holds, and reads outside it go to the DB.
#[derive(Default)]
pub(super) struct Recent {
    /// (entry, its encoded size), oldest first.
    pub(super) entries: VecDeque<(Entry, usize)>,
    pub(super) bytes: usize,
}

impl Recent {
    pub(super) fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    pub(super) fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Drops entries with index >= `index`.
    pub(super) fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries with index <= `index`.
    pub(super) fn purge_upto(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// Records an appended entry (the new last entry of the log).
    pub(super) fn push(&mut self, entry: Entry, size: usize) {
        let index = entry.log_id.index;
        // An append at or below the tail replaces what follows (the DB write did the same); one
        // past a gap starts over, so the kept entries stay contiguous.
        self.truncate_from(index);
        if self.last_index().is_some_and(|last| last + 1 != index) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_MAX_ENTRIES
            || (self.bytes > RECENT_MAX_BYTES && self.entries.len() > 1)
        {
            self.pop_oldest();
        }
    }

    /// The entries with `start <= index < end` when all of them are here; `None` otherwise.
    pub(super) fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        if start < first || end > last + 1 {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use openraft::LogId;

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn ids(v: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| {
            v.iter()
                .map(|e| (e.log_id.index, e.log_id.leader_id.term))
                .collect()
        })
    }

    #[test]
    fn serves_only_ranges_it_holds_in_full() {
        let mut r = Recent::default();
        assert_eq!(ids(r.get(0, 1)), None);
        for i in 5..10 {
            r.push(entry(i, 1), 10);
        }
        assert_eq!(ids(r.get(5, 10)).map(|v| v.len()), Some(5));
        assert_eq!(ids(r.get(7, 9)), Some(vec![(7, 1), (8, 1)]));
        assert_eq!(ids(r.get(4, 6)), None, "starts before the first held");
        assert_eq!(ids(r.get(8, 11)), None, "ends past the last held");
        assert_eq!(ids(r.get(7, 7)), Some(vec![]));
    }

    #[test]
    fn follows_truncate_purge_overwrite_and_gaps() {
        let mut r = Recent::default();
        for i in 1..=6 {
            r.push(entry(i, 1), 10);
        }
        // A follower's conflicting suffix: overwritten from 4 by a new term.
        r.push(entry(4, 2), 10);
        assert_eq!(ids(r.get(1, 5)), Some(vec![(1, 1), (2, 1), (3, 1), (4, 2)]));
        assert_eq!(ids(r.get(4, 6)), None, "5 and 6 of the old term are gone");
        r.truncate_from(3);
        assert_eq!(r.last_index(), Some(2));
        assert_eq!(r.bytes, 20);
        r.purge_upto(1);
        assert_eq!(r.first_index(), Some(2));
        // An append past a gap (after an installed snapshot) starts over.
        r.push(entry(100, 3), 10);
        assert_eq!(r.first_index(), Some(100));
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.bytes, 10);
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut r = Recent::default();
        for i in 0..(RECENT_MAX_ENTRIES as u64 + 50) {
            r.push(entry(i, 1), 8);
        }
        assert_eq!(r.entries.len(), RECENT_MAX_ENTRIES);
        assert_eq!(r.last_index(), Some(RECENT_MAX_ENTRIES as u64 + 49));
        let big = RECENT_MAX_BYTES / 3;
        for i in 0..5u64 {
            r.push(entry(RECENT_MAX_ENTRIES as u64 + 50 + i, 1), big);
        }
        assert!(r.bytes <= RECENT_MAX_BYTES, "{} bytes held", r.bytes);
        assert_eq!(r.bytes, r.entries.iter().map(|(_, s)| s).sum::<usize>());
        // One entry larger than the bound is still kept (the newest is always there).
        r.push(entry(RECENT_MAX_ENTRIES as u64 + 55, 1), RECENT_MAX_BYTES * 2);
        assert_eq!(r.entries.len(), 1);
    }
}
