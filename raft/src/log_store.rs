//! The Raft log on RocksDB. STUB: the storage work replaces this file.

use std::path::Path;

use crate::error::StoreError;

/// Raft log and vote store.
#[derive(Clone)]
pub struct LogStore {
    _p: (),
}

impl LogStore {
    pub fn open(_dir: &Path) -> Result<Self, StoreError> {
        unimplemented!()
    }
}
