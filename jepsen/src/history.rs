//! The history: every operation of a run, one JSON object per line (`history.jsonl`).
//!
//! Outcome classes (as in openraft's jepsen/ and Jepsen itself):
//!
//! | `type` | meaning |
//! |---|---|
//! | `invoke` | a client (or the nemesis) starts an operation |
//! | `ok` | it completed and took effect; `value` holds what it returned |
//! | `fail` | it definitely did not take effect (the server refused it before doing anything) |
//! | `info` | indeterminate: timed out, the connection broke, or the server said "outcome unknown". It may or may not take effect, at any time after its invocation. Never counted as a failure or as a loss |
//!
//! A process performs one operation at a time, so an `invoke` is completed by the next `ok`,
//! `fail` or `info` of the same process and `f`. Observations that no client asked for — a
//! delivered message (`recv`), a gap, a connection event, a Raft probe, a state hash — are single
//! `ok` lines without an `invoke`.
//!
//! Times are microseconds since the run started, from one monotonic clock of the harness; an
//! operation happened somewhere between its `invoke` and its completion.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Process id of the nemesis.
pub const NEMESIS: u64 = 0;
/// Process id of the Raft probe monitor and final state-hash reads.
pub const MONITOR: u64 = 1;
/// Process id of harness phase markers (workload start, heal, drain, end).
pub const HARNESS: u64 = 2;
/// The first id handed to client processes.
pub const FIRST_CLIENT: u64 = 10;

/// The outcome class of a history line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum F {
    /// QoS-1 push to one user (gRPC Push); value: user, msg_id, key; ok: seq, log_index.
    Push,
    /// Topic publish (gRPC PublishTopic); value: topic, msg_id; ok: topic_seq, log_index.
    Publish,
    /// Broadcast to the app's `*` topic; like `publish`.
    Broadcast,
    /// Observation: a message handed to the app by an SDK session.
    Recv,
    /// Observation: the SDK reported messages that will never arrive.
    Gap,
    /// Observation: an SDK session's subscription took effect (SUBSCRIBED); value: topic, seq.
    Subscribed,
    /// A client instance opening its session; ok: epoch (WELCOME) and node.
    Connect,
    /// The SDK re-registering a session after its connection was lost; ok: epoch and node.
    Reconnect,
    /// Observation: an SDK session's connection was lost (value: the epoch it had).
    Disconnected,
    /// Observation: an SDK session was ended by the server (KICKED).
    Kicked,
    /// Observation: an SDK session ended for good (Closed event or stream end).
    Closed,
    /// The app closing a client instance (CLOSE/BYE); the node unregisters it afterwards.
    Close,
    /// gRPC Kick; ok: count of sessions ended.
    Kick,
    /// gRPC Status; ok: sessions.
    Status,
    /// Observation: a node's Raft probe (term, leader, state, last log, applied).
    Probe,
    /// Observation: a node's replicated-state hash at an applied index (after heal).
    Hash,
    /// A fault installed (invoke/info pairs with `fault` and `nodes`) or healed (`fault` = heal).
    Nemesis,
    /// Harness phase marker (`reason` = the phase).
    Phase,
}

/// A session as `Status` reported it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionObs {
    pub device: String,
    pub epoch: u64,
    pub node: u64,
}

/// The value of an operation: whichever of these fields it needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Val {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The SDK session instance (one `Client`): deliveries, epochs and dedupe belong to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<u64>,
    /// Dedupe scope: instances that share one cursor store one after another (an app restart)
    /// share a scope; the SDK promises exactly-once within a scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_index: Option<u64>,
    /// Push: the `ttl_ms` it was sent with (absent: the app's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Connect / reconnect ok: login attempts the SDK gave up on since the previous one (each
    /// may still have registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<SessionObs>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Nemesis: the fault's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// Nemesis: the nodes it acts on. Partitions: the nodes that can reach a quorum (majority
    /// side) are in `majority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_log: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<u64>,
    /// Node incarnation: bumped by the harness whenever a node's data dir is wiped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The Raft group of a `hash` observation (absent: group 0, the only one without shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub index: u64,
    pub time_us: u64,
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: Type,
    pub f: F,
    /// The node the operation went through (gRPC target, or the node a session is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    #[serde(default)]
    pub value: Val,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// A line for tests and for callers that fill the fields themselves.
    pub fn new(time_us: u64, process: u64, kind: Type, f: F, value: Val) -> Op {
        Op {
            index: 0,
            time_us,
            process,
            kind,
            f,
            node: None,
            value,
            error: None,
        }
    }

    pub fn with_node(mut self, node: u64) -> Op {
        self.node = Some(node);
        self
    }

    pub fn with_error(mut self, e: impl Into<String>) -> Op {
        self.error = Some(e.into());
        self
    }
}

/// Records the history of a run: in memory for the checkers and line by line to a file, so an
/// interrupted run still leaves what happened.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    start: Instant,
    next_process: AtomicU64,
    state: Mutex<RecState>,
}

struct RecState {
    ops: Vec<Op>,
    out: Option<BufWriter<File>>,
}

impl Recorder {
    /// A recorder writing to `path` (created or truncated); `None` keeps the history in memory.
    pub fn new(path: Option<&Path>) -> anyhow::Result<Recorder> {
        let out = match path {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        Ok(Recorder {
            inner: Arc::new(RecorderInner {
                start: Instant::now(),
                next_process: AtomicU64::new(FIRST_CLIENT),
                state: Mutex::new(RecState { ops: Vec::new(), out }),
            }),
        })
    }

    /// Microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        self.inner.start.elapsed().as_micros() as u64
    }

    /// The instant the run started (time 0 of the history).
    pub fn start(&self) -> Instant {
        self.inner.start
    }

    /// A fresh client process id.
    pub fn new_process(&self) -> u64 {
        self.inner.next_process.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends one line, stamped now; returns it.
    pub fn record(
        &self,
        process: u64,
        kind: Type,
        f: F,
        node: Option<u64>,
        value: Val,
        error: Option<String>,
    ) -> Op {
        let mut st = self.inner.state.lock();
        // Stamp under the lock so times never go backwards along the file.
        let op = Op {
            index: st.ops.len() as u64,
            time_us: self.now_us(),
            process,
            kind,
            f,
            node,
            value,
            error,
        };
        if let Some(out) = st.out.as_mut() {
            if let Ok(line) = serde_json::to_string(&op) {
                let _ = writeln!(out, "{line}");
            }
        }
        st.ops.push(op.clone());
        op
    }

    pub fn invoke(&self, process: u64, f: F, node: Option<u64>, value: Val) -> Op {
        self.record(process, Type::Invoke, f, node, value, None)
    }

    pub fn ok(&self, process: u64, f: F, node: Option<u64>, value: Val) -> Op {
        self.record(process, Type::Ok, f, node, value, None)
    }

    pub fn fail(&self, process: u64, f: F, node: Option<u64>, value: Val, error: String) -> Op {
        self.record(process, Type::Fail, f, node, value, Some(error))
    }

    pub fn info(&self, process: u64, f: F, node: Option<u64>, value: Val, error: String) -> Op {
        self.record(process, Type::Info, f, node, value, Some(error))
    }

    /// Marks a harness phase.
    pub fn phase(&self, name: &str) {
        self.ok(
            HARNESS,
            F::Phase,
            None,
            Val {
                reason: Some(name.to_string()),
                ..Val::default()
            },
        );
    }

    pub fn flush(&self) {
        if let Some(out) = self.inner.state.lock().out.as_mut() {
            let _ = out.flush();
        }
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Vec<Op> {
        self.inner.state.lock().ops.clone()
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.inner.state.lock().ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a `history.jsonl`.
pub fn load(path: &Path) -> anyhow::Result<Vec<Op>> {
    let f = BufReader::new(File::open(path)?);
    let mut out = Vec::new();
    for (i, line) in f.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op: Op =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        out.push(op);
    }
    Ok(out)
}

/// An operation with its invocation and completion (None: the history ended first, which counts
/// as indeterminate).
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    pub invoke: &'a Op,
    pub done: Option<&'a Op>,
}

impl Pair<'_> {
    /// The completion's type; a missing completion is `Info`.
    pub fn outcome(&self) -> Type {
        self.done.map(|d| d.kind).unwrap_or(Type::Info)
    }

    pub fn end_us(&self) -> Option<u64> {
        self.done.map(|d| d.time_us)
    }
}

/// Pairs every `invoke` with its completion (the next completion of the same process and `f`).
/// Returns the pairs in invocation order; completions without an invoke are observations and
/// are not returned (see [`observations`]).
pub fn pairs(history: &[Op]) -> Vec<Pair<'_>> {
    let mut pending: HashMap<(u64, F), usize> = HashMap::new();
    let mut out: Vec<Pair<'_>> = Vec::new();
    for op in history {
        match op.kind {
            Type::Invoke => {
                pending.insert((op.process, op.f), out.len());
                out.push(Pair {
                    invoke: op,
                    done: None,
                });
            }
            _ => {
                if let Some(i) = pending.remove(&(op.process, op.f)) {
                    out[i].done = Some(op);
                }
            }
        }
    }
    out
}

/// Completions without an invoke: observations (deliveries, gaps, probes, ...).
pub fn observations(history: &[Op]) -> Vec<&Op> {
    let mut pending: HashMap<(u64, F), ()> = HashMap::new();
    let mut out = Vec::new();
    for op in history {
        match op.kind {
            Type::Invoke => {
                pending.insert((op.process, op.f), ());
            }
            _ => {
                if pending.remove(&(op.process, op.f)).is_none() {
                    out.push(op);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_pair() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let r = Recorder::new(Some(&path)).unwrap();
        let p = r.new_process();
        let v = Val {
            user: Some("u1".into()),
            msg_id: Some("m1".into()),
            ..Val::default()
        };
        r.invoke(p, F::Push, Some(2), v.clone());
        r.ok(
            MONITOR,
            F::Probe,
            Some(1),
            Val {
                term: Some(3),
                ..Val::default()
            },
        );
        r.ok(
            p,
            F::Push,
            Some(2),
            Val {
                seq: Some(1),
                ..v.clone()
            },
        );
        r.flush();
        let h = load(&path).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h, r.snapshot());
        let ps = pairs(&h);
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].outcome(), Type::Ok);
        assert_eq!(ps[0].done.unwrap().value.seq, Some(1));
        let obs = observations(&h);
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0].f, F::Probe);
        // The wire form is the documented one.
        let line = serde_json::to_string(&h[0]).unwrap();
        assert!(line.contains("\"type\":\"invoke\""), "{line}");
        assert!(line.contains("\"f\":\"push\""), "{line}");
        assert!(!line.contains("null"), "{line}");
    }

    #[test]
    fn an_invoke_without_completion_is_indeterminate() {
        let h = vec![Op::new(1, 10, Type::Invoke, F::Kick, Val::default())];
        let ps = pairs(&h);
        assert_eq!(ps[0].outcome(), Type::Info);
    }
}
