//! The archive outbox (SetArchive, ArchiveDone): while archiving is on, every message removed from
//! a mailbox (acked, trimmed or expired) is appended with a gapless id for the cold-archive writer.

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

/// The archive outbox holds at most this many removed messages; past it the oldest is dropped
/// (counted in [`ArchiveState::dropped`]), so a cold archive that is down never blocks apply.
const ARCHIVE_CAP: u64 = 100_000;

impl Applier<'_> {
    fn archive_state(&mut self) -> Result<ArchiveState, StoreError> {
        if let Some(st) = self.archive {
            return Ok(st);
        }
        let st = self.txn.get(Cf::Meta, keys::META_ARCHIVE)?.unwrap_or_default();
        self.archive = Some(st);
        Ok(st)
    }

    fn set_archive_state(&mut self, st: ArchiveState) {
        self.archive = Some(st);
        self.archive_dirty = true;
    }

    /// Appends a message just removed from a mailbox to the archive outbox, if archiving is on.
    /// Bounded: past [`ARCHIVE_CAP`] the oldest entry is dropped and counted.
    pub(super) fn archive_removed(
        &mut self,
        app: &str,
        user: &str,
        msg: &StoredMessage,
        outcome: ArchiveOutcome,
    ) -> Result<(), StoreError> {
        let mut st = self.archive_state()?;
        if !st.enabled {
            return Ok(());
        }
        let id = st.next_id;
        st.next_id += 1;
        let entry = ArchivedMessage {
            id,
            app: app.to_string(),
            user: user.to_string(),
            message: msg.clone(),
            removed_ms: self.now(),
            outcome,
        };
        self.txn.put(Cf::Archive, keys::archive(id), &entry)?;
        if st.next_id - st.first > ARCHIVE_CAP {
            self.txn.delete(Cf::Archive, keys::archive(st.first));
            st.first += 1;
            st.dropped += 1;
        }
        self.set_archive_state(st);
        Ok(())
    }

    pub(super) fn set_archive(&mut self, enabled: bool) -> Result<OpResult, StoreError> {
        let mut st = self.archive_state()?;
        st.enabled = enabled;
        self.set_archive_state(st);
        Ok(OpResult::Done)
    }

    pub(super) fn archive_done(&mut self, upto: u64) -> Result<OpResult, StoreError> {
        let mut st = self.archive_state()?;
        let end = upto.saturating_add(1).min(st.next_id);
        if st.first >= end {
            return Ok(OpResult::Done);
        }
        while st.first < end {
            self.txn.delete(Cf::Archive, keys::archive(st.first));
            st.first += 1;
        }
        self.set_archive_state(st);
        Ok(OpResult::Done)
    }
}
