//! Writes a session's cursors through its [`CursorStore`] after they change.
//!
//! One saver task per session with a store. Saves are coalesced (a change during a save leads to
//! one more save, not one per change), spaced by the session's persist interval, and run on the
//! blocking pool. When the session closes, the saver writes once more and ends.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::event::Event;
use crate::shared::SessionShared;
use crate::store::CursorStore;
use crate::ClientError;

pub(crate) async fn run(
    shared: Arc<SessionShared>,
    store: Arc<dyn CursorStore>,
    interval: Duration,
    events: mpsc::WeakSender<Event>,
) {
    // Report only the first failure of a streak, not one per attempt.
    let mut failing = false;
    loop {
        shared.save_wake.notified().await;
        let closing = shared.is_closed();
        if let Some(cursors) = shared.snapshot_for_save() {
            let (store, key) = (store.clone(), shared.key.clone());
            let saved = tokio::task::spawn_blocking(move || store.save(&key, &cursors)).await;
            let err = match saved {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("save task failed: {e}")),
            };
            match err {
                None => failing = false,
                Some(e) => {
                    tracing::warn!(session = shared.id, error = %e, "saving cursors failed");
                    // Try again with the next change (or at close).
                    shared.lock().dirty = true;
                    if !failing {
                        failing = true;
                        if let Some(tx) = events.upgrade() {
                            let _ = tx.try_send(Event::Error(ClientError::Store(e)));
                        }
                    }
                }
            }
        }
        if closing {
            break;
        }
        tokio::time::sleep(interval).await;
    }
}
