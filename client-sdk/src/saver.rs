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
        let (s, st) = (shared.clone(), store.clone());
        let saved = tokio::task::spawn_blocking(move || s.save_blocking(&*st)).await;
        let outcome: Option<Result<(), String>> = match saved {
            Ok(r) => r.map(|r| r.map_err(|e| e.to_string())),
            Err(e) => {
                // The save task itself failed: try again with the next change (or at close).
                shared.lock().dirty = true;
                Some(Err(format!("save task failed: {e}")))
            }
        };
        match outcome {
            None => {}
            Some(Ok(())) => failing = false,
            Some(Err(e)) => {
                tracing::warn!(session = shared.id, error = %e, "saving cursors failed");
                if !failing {
                    failing = true;
                    if let Some(tx) = events.upgrade() {
                        let _ = tx.try_send(Event::Error(ClientError::Store(e)));
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
