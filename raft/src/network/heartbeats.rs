//! Entry-less AppendEntries of all of a node's Raft groups to one peer, coalesced.
//!
//! openraft sends each group's heartbeats (AppendEntries without entries, which also carry the
//! commit index) on the group's own timer, one RPC per group and peer: S groups would make S
//! heartbeat RPCs per heartbeat interval to every peer. Here every peer has one lane: the first
//! beat queued goes out at once as a one-item `AppendEntriesBatch`; beats that arrive while a batch
//! is in flight wait and leave together in the next one (the group commit of the log, applied to
//! heartbeats). So an idle lane adds no delay, and under many groups the RPC count per peer stays
//! near one per round trip instead of one per group. Each beat gets the answer its group's handler
//! gave, so openraft sees exactly what a unary AppendEntries would have answered.
//!
//! A peer from before the batch call answers `UNIMPLEMENTED`: the lane remembers it and the
//! callers go back to unary calls for that peer ([`Beats::unsupported`]).
//!
//! Bounds: at most [`MAX_BATCH`] beats a call and [`QUEUE`] waiting (then callers send unary);
//! one call in flight per peer, which ends within [`BATCH_TIMEOUT`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::{RaftBatch, RaftBatchItem, RaftRequest};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Most beats one batch call carries.
pub(crate) const MAX_BATCH: usize = 512;
/// Beats that may wait for the call in flight.
const QUEUE: usize = 1024;
/// How long one batch call may take (openraft's own RPC floor: see `crate::runtime`).
const BATCH_TIMEOUT: Duration = crate::runtime::RPC_TIMEOUT_FLOOR;

struct Beat {
    req: RaftRequest,
    reply: oneshot::Sender<Result<Bytes, Status>>,
}

/// One peer's heartbeat lane.
pub(crate) struct Beats {
    tx: mpsc::Sender<Beat>,
    unsupported: Arc<AtomicBool>,
}

impl Beats {
    /// Starts the lane's task (it ends when the lane is dropped).
    pub(crate) fn spawn(client: RaftServiceClient<Channel>) -> Beats {
        let (tx, rx) = mpsc::channel(QUEUE);
        let unsupported = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(client, rx, unsupported.clone()));
        Beats { tx, unsupported }
    }

    /// The peer does not know the batch call: send unary calls to it.
    pub(crate) fn unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    /// Queues `req` for the next batch and waits for its answer: the AppendEntries reply payload,
    /// or the status the call (or the group's handler) failed with. `None` when the lane cannot
    /// take it (full, or its task is gone): send it unary.
    pub(crate) async fn send(&self, req: RaftRequest) -> Option<Result<Bytes, Status>> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Beat { req, reply }).ok()?;
        rx.await.ok()
    }
}

async fn run(
    mut client: RaftServiceClient<Channel>,
    mut rx: mpsc::Receiver<Beat>,
    unsupported: Arc<AtomicBool>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(beat) => batch.push(beat),
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<RaftRequest>, Vec<_>) =
            batch.into_iter().map(|b| (b.req, b.reply)).unzip();
        let n = requests.len();
        let mut call = tonic::Request::new(RaftBatch { requests });
        call.set_timeout(BATCH_TIMEOUT);
        let answers: Vec<Result<Bytes, Status>> =
            match tokio::time::timeout(BATCH_TIMEOUT, client.append_entries_batch(call)).await {
                Err(_) => vec![Err(Status::deadline_exceeded("heartbeat batch timed out")); n],
                Ok(Err(status)) => {
                    if status.code() == Code::Unimplemented {
                        unsupported.store(true, Ordering::Relaxed);
                    }
                    vec![Err(status); n]
                }
                Ok(Ok(reply)) => {
                    let items = reply.into_inner().replies;
                    if items.len() == n {
                        items.into_iter().map(item_result).collect()
                    } else {
                        let e = Status::internal(format!("{} answers to a batch of {n}", items.len()));
                        vec![Err(e); n]
                    }
                }
            };
        for (reply, answer) in replies.into_iter().zip(answers) {
            // The caller may have given up (its own timeout): nothing to do.
            let _ = reply.send(answer);
        }
    }
}

fn item_result(item: RaftBatchItem) -> Result<Bytes, Status> {
    match Code::from_i32(item.code) {
        Code::Ok => Ok(item.payload),
        code => Err(Status::new(code, item.message)),
    }
}

/// A batch item from what a group's handler answered.
pub(crate) fn item_from(result: Result<Bytes, Status>) -> RaftBatchItem {
    match result {
        Ok(payload) => RaftBatchItem {
            code: 0,
            message: String::new(),
            payload,
        },
        Err(status) => RaftBatchItem {
            code: status.code() as i32,
            message: status.message().to_string(),
            payload: Bytes::new(),
        },
    }
}
