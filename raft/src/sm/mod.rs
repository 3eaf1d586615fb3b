//! The state machine on RocksDB. STUB: the storage work replaces this file.

use std::path::Path;
use std::sync::Arc;

use crate::error::StoreError;
use crate::types::*;

/// The replicated state machine (its own RocksDB under `<data>/sm`).
pub struct StateMachine {
    _p: (),
}

impl StateMachine {
    /// Opens or creates the state machine under `dir`.
    pub fn open(_dir: &Path, _observer: Arc<dyn ApplyObserver>) -> Result<Self, StoreError> {
        unimplemented!()
    }

    /// A cheap, cloneable read handle.
    pub fn reader(&self) -> StateReader {
        unimplemented!()
    }
}

/// Read handle for the node: cheap to clone, never blocks the apply loop for long.
#[derive(Clone)]
pub struct StateReader {
    _p: (),
}

impl StateReader {
    pub fn applied_index(&self) -> u64 {
        unimplemented!()
    }
    pub async fn wait_applied(&self, _index: u64) {
        unimplemented!()
    }
    pub fn log_time_ms(&self) -> u64 {
        unimplemented!()
    }
    pub fn app(&self, _id: &str) -> Result<Option<AppConfig>, StoreError> {
        unimplemented!()
    }
    pub fn apps(&self) -> Result<Vec<AppConfig>, StoreError> {
        unimplemented!()
    }
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        unimplemented!()
    }
    pub fn next_expiry_ms(&self) -> Result<Option<u64>, StoreError> {
        unimplemented!()
    }
}
