//! Checkers: plain Rust over the history, one file per invariant of DESIGN.md's "What must hold".
//!
//! | file | invariant |
//! |---|---|
//! | `lost.rs` | no acknowledged QoS-1 push (or topic publish) is lost: delivered after heal and drain |
//! | `unexpected.rs` | nothing is delivered that was never pushed (or whose push definitely failed) |
//! | `duplicates.rs` | after the SDK's dedupe by msg id, each message is handed to the app once |
//! | `order.rs` | per user (and per topic) delivery follows seq, with no gap the SDK did not report |
//! | `convergence.rs` | every node's state hash is equal at one applied index after heal (a node that never answers makes it unknown) |
//! | `linearizable.rs` | the session registry is linearizable per user (WGL search in `wgl.rs`) |
//! | `fencing.rs` | a session replaced by a newer login of its device gets nothing committed after it |
//! | `raft.rs` | one leader per term; terms and applied (commit) indexes never go back |
//! | `availability.rs` | the majority side keeps serving while a minority is down or cut off |
//!
//! A checker that checked nothing (no acknowledged push for `lost`, no delivery for `order`, no
//! hash from some node for `convergence`) answers `unknown`, not `valid`.
//!
//! Every checker is unit-tested with a history that passes and one that fails: a checker that has
//! never failed proves nothing.

pub mod availability;
pub mod convergence;
pub mod duplicates;
pub mod fencing;
pub mod linearizable;
pub mod lost;
pub mod order;
pub mod raft;
pub mod unexpected;
pub mod wgl;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::history::{pairs, Op, Pair, Type, F};

/// The verdict of one checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    Valid,
    Invalid,
    /// The checker could not decide (e.g. the search budget ran out, or the nodes never
    /// quiesced for a hash comparison). Reported, and not counted as a pass.
    Unknown,
}

/// One thing that must not happen and did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: String,
    pub detail: String,
    /// History indexes of the lines that show it.
    pub ops: Vec<u64>,
}

/// What one checker found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub valid: Validity,
    /// How many violations in total (`violations` keeps the first [`MAX_EXAMPLES`]).
    pub count: u64,
    pub violations: Vec<Violation>,
    /// Checker-specific figures (how many checked, shares, ...).
    pub stats: serde_json::Value,
}

/// Examples kept per checker.
pub const MAX_EXAMPLES: usize = 20;

impl CheckResult {
    pub fn new(name: &str) -> CheckResult {
        CheckResult {
            name: name.to_string(),
            valid: Validity::Valid,
            count: 0,
            violations: Vec::new(),
            stats: serde_json::json!({}),
        }
    }

    pub fn violation(&mut self, kind: &str, detail: String, ops: Vec<u64>) {
        self.valid = Validity::Invalid;
        self.count += 1;
        if self.violations.len() < MAX_EXAMPLES {
            self.violations.push(Violation {
                kind: kind.to_string(),
                detail,
                ops,
            });
        }
    }

    /// Marks the result unknown unless it is already invalid.
    pub fn unknown(&mut self, why: String) {
        if self.valid == Validity::Valid {
            self.valid = Validity::Unknown;
        }
        self.stats["unknown"] = serde_json::Value::String(why);
    }

    /// Violations of one kind.
    pub fn count_kind(&self, kind: &str) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

/// Default search budget of the linearizability checker per user (states explored).
pub const DEFAULT_WGL_BUDGET: u64 = 2_000_000;

/// What the checkers need to know besides the history.
#[derive(Debug, Clone)]
pub struct Context {
    /// The node ids of the cluster.
    pub nodes: Vec<u64>,
    /// Lowest acceptable share of ok writes on the majority side during faults.
    pub availability_min: f64,
    /// Time after a fault starts that availability does not count (elections, node-down).
    pub grace_us: u64,
    /// Fewest writes on the majority side during faults for availability to be judged.
    pub availability_min_ops: u64,
    /// Search budget (states) of the linearizability checker per user.
    pub wgl_budget: u64,
    /// The run's shard count (`--shards`): the Raft groups whose replicas must converge.
    pub shards: u32,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            nodes: vec![1, 2, 3],
            availability_min: 0.5,
            grace_us: 6_000_000,
            availability_min_ops: 20,
            wgl_budget: DEFAULT_WGL_BUDGET,
            shards: 0,
        }
    }
}

/// A QoS-1 push or a topic publish and what became of it.
#[derive(Debug, Clone)]
pub struct Sent<'a> {
    pub pair: Pair<'a>,
    pub f: F,
    pub outcome: Type,
    /// Push: the target user; publish: none.
    pub user: Option<String>,
    /// Publish and broadcast: the topic (`*` for broadcasts).
    pub topic: Option<String>,
    /// Seq assigned (mailbox seq or topic seq), when the reply said.
    pub seq: Option<u64>,
    pub log_index: Option<u64>,
    /// Push: the TTL it was sent with (`None`: the app's default, days).
    pub ttl_ms: Option<u64>,
}

/// Lookups shared by the checkers, built once per history.
pub struct Index<'a> {
    pub history: &'a [Op],
    /// msg id → what was sent with it.
    pub sent: HashMap<String, Sent<'a>>,
    /// Deliveries, in history order.
    pub recvs: Vec<&'a Op>,
    /// Time the final drain ended (end of the history if the run has no marker).
    pub drain_end_us: u64,
    /// client instance → (user, device, scope).
    pub clients: BTreeMap<u64, (String, String, u64)>,
}

impl<'a> Index<'a> {
    pub fn new(history: &'a [Op]) -> Index<'a> {
        let mut sent = HashMap::new();
        for p in pairs(history) {
            if !matches!(p.invoke.f, F::Push | F::Publish | F::Broadcast) {
                continue;
            }
            let Some(msg_id) = p.invoke.value.msg_id.clone() else {
                continue;
            };
            let done = p.done;
            let seq = done.and_then(|d| {
                if p.invoke.f == F::Push {
                    d.value.seq
                } else {
                    d.value.topic_seq
                }
            });
            let topic = match p.invoke.f {
                F::Broadcast => Some("*".to_string()),
                F::Publish => p.invoke.value.topic.clone(),
                _ => None,
            };
            sent.insert(
                msg_id,
                Sent {
                    pair: p,
                    f: p.invoke.f,
                    outcome: p.outcome(),
                    user: p.invoke.value.user.clone(),
                    topic,
                    seq: seq.filter(|s| *s > 0),
                    log_index: done.and_then(|d| d.value.log_index).filter(|i| *i > 0),
                    ttl_ms: p.invoke.value.ttl_ms.filter(|t| *t > 0),
                },
            );
        }
        let recvs: Vec<&Op> = history.iter().filter(|o| o.f == F::Recv).collect();
        let drain_end_us = history
            .iter()
            .rev()
            .find(|o| o.f == F::Phase && o.value.reason.as_deref() == Some("drain-end"))
            .or(history.last())
            .map(|o| o.time_us)
            .unwrap_or(0);
        let mut clients = BTreeMap::new();
        for o in history {
            if let (Some(c), Some(u), Some(d)) = (o.value.client, &o.value.user, &o.value.device) {
                clients
                    .entry(c)
                    .or_insert_with(|| (u.clone(), d.clone(), o.value.scope.unwrap_or(c)));
            }
        }
        Index {
            history,
            sent,
            recvs,
            drain_end_us,
            clients,
        }
    }
}

/// Every checker's result, and the verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub valid: Validity,
    pub checks: Vec<CheckResult>,
}

impl Results {
    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Total violations of a checker (0 if it did not run).
    pub fn count(&self, name: &str) -> u64 {
        self.get(name).map(|c| c.count).unwrap_or(0)
    }
}

/// Runs every checker.
pub fn check_all(history: &[Op], ctx: &Context) -> Results {
    let idx = Index::new(history);
    let checks = vec![
        lost::check(&idx),
        unexpected::check(&idx),
        duplicates::check(&idx),
        order::check(&idx),
        convergence::check(history, &ctx.nodes, ctx.shards),
        linearizable::check(history, ctx),
        fencing::check(&idx),
        raft::check(history),
        availability::check(history, ctx),
    ];
    let valid = if checks.iter().any(|c| c.valid == Validity::Invalid) {
        Validity::Invalid
    } else if checks.iter().any(|c| c.valid == Validity::Unknown) {
        Validity::Unknown
    } else {
        Validity::Valid
    };
    Results { valid, checks }
}

#[cfg(test)]
pub(crate) mod testkit {
    //! Builders for hand-written histories.

    use crate::history::{Op, SessionObs, Type, Val, F};

    /// Builds a history with increasing times and indexes.
    #[derive(Default, Clone)]
    pub struct H {
        pub ops: Vec<Op>,
        t: u64,
    }

    impl H {
        pub fn new() -> H {
            H::default()
        }

        /// Appends a line at time `t` (ms); returns its index.
        pub fn at(&mut self, t_ms: u64, process: u64, kind: Type, f: F, value: Val) -> u64 {
            self.t = self.t.max(t_ms * 1000);
            let mut op = Op::new(self.t, process, kind, f, value);
            op.index = self.ops.len() as u64;
            self.ops.push(op);
            self.t += 1;
            self.ops.len() as u64 - 1
        }

        pub fn push(&mut self, t: u64, p: u64, user: &str, msg: &str) {
            self.at(t, p, Type::Invoke, F::Push, push_val(user, msg));
        }

        pub fn push_ok(&mut self, t: u64, p: u64, user: &str, msg: &str, seq: u64, index: u64) {
            let mut v = push_val(user, msg);
            v.seq = Some(seq);
            v.log_index = Some(index);
            self.at(t, p, Type::Ok, F::Push, v);
        }

        pub fn push_done(&mut self, t: u64, p: u64, kind: Type, user: &str, msg: &str) {
            self.at(t, p, kind, F::Push, push_val(user, msg));
        }

        /// A full acknowledged push: invoke at t, ok at t+1.
        pub fn pushed(&mut self, t: u64, p: u64, user: &str, msg: &str, seq: u64, index: u64) {
            self.push(t, p, user, msg);
            self.push_ok(t + 1, p, user, msg, seq, index);
        }

        pub fn recv(&mut self, t: u64, client: u64, user: &str, msg: &str, seq: u64) -> u64 {
            self.at(
                t,
                client,
                Type::Ok,
                F::Recv,
                Val {
                    user: Some(user.into()),
                    device: Some("d".into()),
                    client: Some(client),
                    scope: Some(client),
                    msg_id: Some(msg.into()),
                    seq: Some(seq),
                    ..Val::default()
                },
            )
        }

        pub fn topic_recv(&mut self, t: u64, client: u64, topic: &str, msg: &str, seq: u64) -> u64 {
            self.at(
                t,
                client,
                Type::Ok,
                F::Recv,
                Val {
                    user: Some(format!("sub{client}")),
                    device: Some("d".into()),
                    client: Some(client),
                    scope: Some(client),
                    msg_id: Some(msg.into()),
                    topic: Some(topic.into()),
                    topic_seq: Some(seq),
                    ..Val::default()
                },
            )
        }

        pub fn connected(&mut self, t: u64, client: u64, user: &str, device: &str, epoch: u64, node: u64) {
            let v = Val {
                user: Some(user.into()),
                device: Some(device.into()),
                client: Some(client),
                scope: Some(client),
                ..Val::default()
            };
            self.at(t, client, Type::Invoke, F::Connect, v.clone());
            let mut done = v;
            done.epoch = Some(epoch);
            let i = self.at(t + 1, client, Type::Ok, F::Connect, done);
            self.ops[i as usize].node = Some(node);
        }

        pub fn status_obs(device: &str, epoch: u64, node: u64) -> SessionObs {
            SessionObs {
                device: device.into(),
                epoch,
                node,
            }
        }
    }

    pub fn push_val(user: &str, msg: &str) -> Val {
        Val {
            user: Some(user.into()),
            msg_id: Some(msg.into()),
            ..Val::default()
        }
    }
}
