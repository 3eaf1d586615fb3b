//! Apps (PutApp, DeleteApp) and the app lookup every other op starts with.

use super::Applier;
use crate::error::StoreError;
use crate::sm::keys::{self, Cf};
use crate::types::*;

impl Applier<'_> {
    pub(super) fn app(&self, app: &str) -> Result<Option<AppConfig>, StoreError> {
        let key = keys::app(app);
        match self.txn.get_raw(Cf::Apps, &key)? {
            Some(bytes) => crate::sm::app_record::decode_app(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    pub(super) fn put_app(&mut self, cfg: &AppConfig) -> Result<OpResult, StoreError> {
        if cfg.id.is_empty() {
            return Ok(OpResult::Rejected(Rejection::Invalid("empty app id".into())));
        }
        let mut cfg = cfg.clone();
        cfg.created_ms = match self.app(&cfg.id)? {
            Some(old) => old.created_ms,
            None => self.now(),
        };
        self.txn.put_raw(
            Cf::Apps,
            keys::app(&cfg.id),
            crate::sm::app_record::encode_app(&cfg)?,
        );
        self.events.push(ApplyEvent::AppChanged { app: cfg.id });
        Ok(OpResult::Done)
    }

    /// Removes the app and everything keyed by it. Its sessions' node-index entries are deleted one
    /// by one (that index is keyed by node). Its expiry-index entries stay behind as orphans that
    /// Expire skips and deletes; its outbox events stay until EventsDone.
    pub(super) fn delete_app(&mut self, app: &str) -> Result<OpResult, StoreError> {
        if self.app(app)?.is_none() {
            return Ok(super::reject_unknown(app));
        }
        let sessions: Vec<Session> = self.txn.values_prefix(Cf::Sessions, keys::app(app), usize::MAX)?;
        for s in &sessions {
            self.txn.delete(
                Cf::NodeSessions,
                keys::node_session(s.node, &s.app, &s.user, &s.device),
            );
        }
        for cf in Cf::APP_KEYED {
            self.txn.delete_prefix(cf, keys::app(app));
        }
        self.events.push(ApplyEvent::AppChanged { app: app.to_string() });
        Ok(OpResult::Done)
    }
}
