//! The cold archive (optional, `--archive-url`): messages that left a mailbox — acked by every
//! device, expired, or trimmed by the cap — written to MySQL/MariaDB, and the `History` call that
//! reads them back.
//!
//! **Exactly one row per removed message.** The state machine appends every removed message to a
//! replicated archive outbox in the same write batch that removes it (gapless ids; bounded, the
//! oldest dropped and counted, so apply never waits for MySQL). Only the leader's archiver
//! ([`Archive::run`]) writes: it reads the outbox from its first entry, inserts the batch with
//! `INSERT IGNORE` into a table whose unique key is (app, user, seq, pushed_ms) — one message —
//! and only after MySQL confirmed the insert commits `Op::ArchiveDone { upto }`, which removes
//! those entries from the outbox. So:
//! - nothing is skipped: an entry leaves the outbox only after its row is in MySQL;
//! - nothing is written twice: a batch written again (a leader crash between the insert and
//!   `ArchiveDone`, a new leader, a stale leader still finishing a batch) hits the unique key and
//!   is ignored.
//!
//! A MySQL outage never stalls delivery: the archiver backs off and the outbox grows (bounded)
//! until MySQL is back, then drains in batches.
//!
//! Whether the outbox is filled is a replicated setting (`Op::SetArchive`): the leader makes it
//! match its own configuration (on with `--archive-url`, off without). Configure every node alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald_proto::v1 as pb;
use herald_raft::{ArchivedMessage, Op, RaftNode};
use mysql_async::prelude::*;
use mysql_async::{Opts, Params, Pool, Value};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::api::auth;
use crate::api::error::ApiError;
use crate::node::Node;

/// The table rows go to (created if missing).
pub const TABLE: &str = "herald_archive";
/// How long one MySQL call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The archiver looks at the outbox this often when it is empty.
const POLL: Duration = Duration::from_millis(250);
/// Backoff after a failed MySQL call: from the first, doubling, up to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS herald_archive (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  app_id VARBINARY(256) NOT NULL,
  user_id VARBINARY(256) NOT NULL,
  seq BIGINT UNSIGNED NOT NULL,
  msg_id BLOB NOT NULL,
  payload MEDIUMBLOB NOT NULL,
  devices TEXT NOT NULL,
  pushed_ms BIGINT UNSIGNED NOT NULL,
  expires_ms BIGINT UNSIGNED NOT NULL,
  removed_ms BIGINT UNSIGNED NOT NULL,
  outcome VARCHAR(16) NOT NULL,
  archive_id BIGINT UNSIGNED NOT NULL,
  archived_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  UNIQUE KEY message (app_id, user_id, seq, pushed_ms)
) ENGINE=InnoDB";

const COLUMNS: &str =
    "app_id, user_id, seq, msg_id, payload, devices, pushed_ms, expires_ms, removed_ms, outcome, archive_id";

/// The archiver's counters (metrics).
#[derive(Debug, Default)]
pub struct ArchiveStats {
    /// Rows sent to MySQL in successful inserts (rows MySQL ignored as duplicates included).
    pub written: AtomicU64,
    /// Rows MySQL actually inserted (the rest were duplicates of rows already there).
    pub inserted: AtomicU64,
    /// Failed MySQL calls (each retried).
    pub failures: AtomicU64,
    /// 1 when the last MySQL call succeeded.
    pub up: AtomicU64,
    /// ArchiveDone entries committed by this node.
    pub done_commits: AtomicU64,
}

/// Why a MySQL call failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("mysql: {0}")]
    Mysql(#[from] mysql_async::Error),
    #[error("mysql did not answer within {0:?}")]
    Timeout(Duration),
}

/// A connection pool to the cold archive, its settings and counters.
pub struct Archive {
    pool: Pool,
    /// Rows per INSERT.
    batch: usize,
    pub stats: Arc<ArchiveStats>,
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, mysql_async::Error>>,
) -> Result<T, ArchiveError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ArchiveError::Timeout(CALL_TIMEOUT)),
    }
}

impl Archive {
    /// A pool for `url` (validated by the config layer); connects lazily.
    pub fn new(url: &str, batch: usize) -> Result<Archive, ArchiveError> {
        let opts = Opts::from_url(url).map_err(mysql_async::Error::from)?;
        Ok(Archive {
            pool: Pool::new(opts),
            batch: batch.max(1),
            stats: Arc::new(ArchiveStats::default()),
        })
    }

    /// Creates the table if it is missing.
    pub async fn ensure_schema(&self) -> Result<(), ArchiveError> {
        let mut conn = timed(self.pool.get_conn()).await?;
        timed(conn.query_drop(SCHEMA)).await
    }

    /// Inserts `rows`, ignoring ones already there. Returns how many were new.
    pub async fn write(&self, rows: &[ArchivedMessage]) -> Result<u64, ArchiveError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut sql = format!("INSERT IGNORE INTO {TABLE} ({COLUMNS}) VALUES ");
        let mut params: Vec<Value> = Vec::with_capacity(rows.len() * 11);
        for (i, r) in rows.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?,?,?,?,?,?,?,?,?,?,?)");
            let m = &r.message;
            params.extend([
                Value::Bytes(r.app.as_bytes().to_vec()),
                Value::Bytes(r.user.as_bytes().to_vec()),
                Value::from(m.seq),
                Value::Bytes(m.msg_id.as_bytes().to_vec()),
                Value::Bytes(m.payload.to_vec()),
                Value::from(serde_json::to_string(&m.devices).unwrap_or_else(|_| "[]".into())),
                Value::from(m.pushed_ms),
                Value::from(m.expires_ms),
                Value::from(r.removed_ms),
                Value::from(r.outcome.as_str()),
                Value::from(r.id),
            ]);
        }
        let mut conn = timed(self.pool.get_conn()).await?;
        timed(conn.exec_drop(sql, Params::Positional(params))).await?;
        Ok(conn.affected_rows())
    }

    /// A user's archived messages with seq > `after_seq`, in seq order.
    pub async fn history(
        &self,
        app: &str,
        user: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<pb::ArchivedMessage>, ArchiveError> {
        type Row = (u64, Vec<u8>, Vec<u8>, u64, u64, u64, String, String);
        let sql = format!(
            "SELECT seq, msg_id, payload, pushed_ms, expires_ms, removed_ms, outcome, devices FROM {TABLE} \
             WHERE app_id = ? AND user_id = ? AND seq > ? ORDER BY seq, pushed_ms LIMIT ?"
        );
        let params = Params::Positional(vec![
            Value::Bytes(app.as_bytes().to_vec()),
            Value::Bytes(user.as_bytes().to_vec()),
            Value::from(after_seq),
            Value::from(limit),
        ]);
        let mut conn = timed(self.pool.get_conn()).await?;
        let rows: Vec<Row> = timed(conn.exec(sql, params)).await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, msg_id, payload, pushed_ms, expires_ms, removed_ms, outcome, devices)| {
                    pb::ArchivedMessage {
                        seq,
                        msg_id: String::from_utf8_lossy(&msg_id).into_owned(),
                        payload: payload.into(),
                        pushed_ms,
                        expires_ms,
                        removed_ms,
                        outcome,
                        devices: serde_json::from_str(&devices).unwrap_or_default(),
                    }
                },
            )
            .collect())
    }

    fn failed(&self, what: &str, e: &ArchiveError) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.stats.up.store(0, Ordering::Relaxed);
        warn!(error = %e, what, "cold archive call failed; retrying");
    }

    /// The leader's archiver: drains the replicated archive outbox into MySQL until `shutdown`
    /// (see the module docs). On a follower it only waits.
    pub async fn run(self: Arc<Self>, raft: RaftNode, shutdown: CancellationToken) {
        let mut schema_ready = false;
        let mut backoff = BACKOFF.0;
        loop {
            let wait = tokio::select! {
                _ = shutdown.cancelled() => break,
                w = self.step(&raft, &mut schema_ready) => w,
            };
            let pause = match wait {
                Step::Again => continue,
                Step::Idle => {
                    backoff = BACKOFF.0;
                    POLL
                }
                Step::Failed => {
                    let b = backoff;
                    backoff = (backoff * 2).min(BACKOFF.1);
                    b
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.pool.clone().disconnect().await.ok();
    }

    async fn step(&self, raft: &RaftNode, schema_ready: &mut bool) -> Step {
        if !raft.is_leader() {
            return Step::Idle;
        }
        let reader = raft.reader();
        let state = match reader.archive_state() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot read the archive outbox");
                return Step::Failed;
            }
        };
        if !state.enabled {
            match raft.write_one(Op::SetArchive { enabled: true }).await {
                Ok((_, index)) => {
                    info!(log_index = index, "cold archive enabled");
                    reader.wait_applied(index).await;
                    return Step::Again;
                }
                Err(e) => {
                    debug!(error = %e, "enabling the archive not committed");
                    return Step::Failed;
                }
            }
        }
        if !*schema_ready {
            match self.ensure_schema().await {
                Ok(()) => *schema_ready = true,
                Err(e) => {
                    self.failed("create table", &e);
                    return Step::Failed;
                }
            }
        }
        let rows = match reader.archive_since(state.first.saturating_sub(1), self.batch) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read the archive outbox");
                return Step::Failed;
            }
        };
        let Some(upto) = rows.last().map(|r| r.id) else {
            return Step::Idle;
        };
        match self.write(&rows).await {
            Ok(inserted) => {
                self.stats.up.store(1, Ordering::Relaxed);
                self.stats.written.fetch_add(rows.len() as u64, Ordering::Relaxed);
                self.stats.inserted.fetch_add(inserted, Ordering::Relaxed);
                debug!(rows = rows.len(), inserted, upto, "archived");
            }
            Err(e) => {
                self.failed("insert", &e);
                return Step::Failed;
            }
        }
        match raft.write_one(Op::ArchiveDone { upto }).await {
            Ok((_, index)) => {
                self.stats.done_commits.fetch_add(1, Ordering::Relaxed);
                // Read the next batch from a state without these rows.
                reader.wait_applied(index).await;
                if rows.len() >= self.batch {
                    Step::Again
                } else {
                    Step::Idle
                }
            }
            // The rows are in MySQL; the next round (here or on a new leader) writes them again
            // and MySQL ignores them.
            Err(e) => {
                debug!(error = %e, "archive done not committed");
                Step::Failed
            }
        }
    }
}

enum Step {
    /// More may be waiting: go again at once.
    Again,
    /// Nothing to do (or not the leader): poll later.
    Idle,
    /// Something failed: back off.
    Failed,
}

/// A leader without `--archive-url` turns archiving off (see the module docs). Checks every few
/// seconds until `shutdown`.
pub async fn keep_disabled(raft: RaftNode, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !raft.is_leader() || !raft.reader().archive_state().map(|s| s.enabled).unwrap_or(false) {
            continue;
        }
        match raft.write_one(Op::SetArchive { enabled: false }).await {
            Ok((_, index)) => info!(
                log_index = index,
                "cold archive disabled (this leader has no --archive-url)"
            ),
            Err(e) => debug!(error = %e, "disabling the archive not committed"),
        }
    }
}

/// `herald.v1.Archive`: reads a user's archived messages.
pub struct ArchiveApi {
    node: Node,
    archive: Option<Arc<Archive>>,
}

impl ArchiveApi {
    pub fn server(
        node: Node,
        archive: Option<Arc<Archive>>,
    ) -> pb::archive_server::ArchiveServer<ArchiveApi> {
        pb::archive_server::ArchiveServer::new(ArchiveApi { node, archive })
    }
}

#[tonic::async_trait]
impl pb::archive_server::Archive for ArchiveApi {
    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        let app = auth::app_caller(&self.node, &request).await?;
        let r = request.into_inner();
        if r.app != app.id {
            return Err(ApiError::PermissionDenied(format!(
                "the API key is for app {:?}, the request names {:?}",
                app.id, r.app
            ))
            .into());
        }
        if r.user.is_empty() {
            return Err(ApiError::InvalidArgument("history needs a user".into()).into());
        }
        let Some(archive) = &self.archive else {
            return Err(ApiError::FailedPrecondition(
                "this node has no cold archive (start it with --archive-url)".into(),
            )
            .into());
        };
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000),
        };
        let messages = archive
            .history(&app.id, &r.user, r.after_seq, limit)
            .await
            .map_err(|e| ApiError::Unavailable {
                msg: format!("the cold archive is unavailable: {e}"),
                leader: None,
            })?;
        Ok(Response::new(pb::HistoryReply { messages }))
    }
}
