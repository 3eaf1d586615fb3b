//! Registry linearizability, per user: the sessions of one user as a sequential object, checked
//! with the WGL search of `wgl.rs`.
//!
//! The model: device → session (epoch, node), plus the highest epoch registered so far.
//!
//! | operation | from the history | effect |
//! |---|---|---|
//! | `Register(d, e)` | `connect` / `reconnect` ok with epoch e | d's session becomes e; epochs are log indexes, so registrations take effect in epoch order |
//! | `Register(d, ?)` | a registration attempt whose outcome is unknown (`info`, any attempt before a reconnect succeeded, or a connect whose SDK gave up on an attempt before WELCOME) | d's session becomes an unknown epoch above every known one (a phantom) |
//! | `Unregister(d, e)` | the client lost or closed the connection of epoch e (indeterminate: the node unregisters it later, if at all) | ends d's session if it is still e |
//! | `Unregister(d, ?)` | paired with each phantom | ends d's session if it is a phantom |
//! | `Kick(d or all)` → n | gRPC Kick | ends the sessions; n must be how many |
//! | `Status` → sessions | gRPC Status | must be exactly the sessions (a phantom takes the epoch it shows) |
//! | `NodeDown(n)` | every fault the nemesis installs, for every node (indeterminate) | ends the sessions held by n |
//!
//! Status is answered from the queried node's local state machine, so a node that lags (or sits
//! in a minority partition) can answer stale. When a user's history is not linearizable, it is
//! checked again without its Status reads: if that passes, the violation is reported as
//! `stale-status-read` (the writes are fine, a read was stale), otherwise as `not-linearizable`.

use std::collections::{BTreeMap, BTreeSet};

use super::wgl::{self, Entry, Model, Outcome};
use super::{CheckResult, Context};
use crate::history::{pairs, Op, SessionObs, Type, F};

/// One device's session as the model holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sess {
    /// `phantom`: a phantom whose epoch a Status read showed; its node still unregisters it.
    Known {
        epoch: u64,
        node: Option<u64>,
        phantom: bool,
    },
    /// Registered by an attempt whose epoch nobody saw; it is above `above`.
    Phantom { above: u64 },
}

/// The sessions of one user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Registry {
    pub sessions: BTreeMap<String, Sess>,
    pub max_epoch: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RegIn {
    Register {
        device: String,
        epoch: Option<u64>,
        node: Option<u64>,
    },
    Unregister {
        device: String,
        epoch: Option<u64>,
    },
    Kick {
        device: Option<String>,
    },
    Status,
    NodeDown {
        node: u64,
    },
}

#[derive(Debug, Clone)]
pub enum RegOut {
    Count(u64),
    Sessions(Vec<SessionObs>),
}

impl Model for Registry {
    type Input = RegIn;
    type Output = RegOut;

    fn step(&self, input: &RegIn, output: Option<&RegOut>) -> Vec<Registry> {
        match input {
            RegIn::Register {
                device,
                epoch: Some(e),
                node,
            } => {
                if *e <= self.max_epoch {
                    return vec![];
                }
                let mut s = self.clone();
                s.sessions.insert(
                    device.clone(),
                    Sess::Known {
                        epoch: *e,
                        node: *node,
                        phantom: false,
                    },
                );
                s.max_epoch = *e;
                vec![s]
            }
            RegIn::Register {
                device, epoch: None, ..
            } => {
                let mut s = self.clone();
                s.sessions.insert(
                    device.clone(),
                    Sess::Phantom {
                        above: self.max_epoch,
                    },
                );
                vec![s]
            }
            RegIn::Unregister { device, epoch } => {
                let mut s = self.clone();
                let matches = match (s.sessions.get(device), epoch) {
                    (Some(Sess::Known { epoch: have, .. }), Some(e)) => have == e,
                    (Some(Sess::Phantom { .. } | Sess::Known { phantom: true, .. }), None) => true,
                    _ => false,
                };
                if matches {
                    s.sessions.remove(device);
                }
                vec![s]
            }
            RegIn::Kick { device } => {
                let mut s = self.clone();
                let n = match device {
                    Some(d) => s.sessions.remove(d).is_some() as u64,
                    None => {
                        let n = s.sessions.len() as u64;
                        s.sessions.clear();
                        n
                    }
                };
                match output {
                    Some(RegOut::Count(c)) if *c != n => vec![],
                    _ => vec![s],
                }
            }
            RegIn::Status => {
                let Some(RegOut::Sessions(seen)) = output else {
                    return vec![self.clone()];
                };
                let devices: BTreeSet<&str> = seen.iter().map(|o| o.device.as_str()).collect();
                if devices.len() != seen.len() || devices.len() != self.sessions.len() {
                    return vec![];
                }
                let mut s = self.clone();
                for o in seen {
                    match self.sessions.get(&o.device) {
                        Some(Sess::Known { epoch, .. }) if *epoch == o.epoch => {}
                        Some(Sess::Phantom { above }) if o.epoch > *above => {
                            s.sessions.insert(
                                o.device.clone(),
                                Sess::Known {
                                    epoch: o.epoch,
                                    node: Some(o.node),
                                    phantom: true,
                                },
                            );
                        }
                        _ => return vec![],
                    }
                }
                vec![s]
            }
            RegIn::NodeDown { node } => {
                let mut base = self.clone();
                base.sessions
                    .retain(|_, v| !matches!(v, Sess::Known { node: Some(n), .. } if n == node));
                // A phantom's node is unknown: it may or may not be on `node`.
                let phantoms: Vec<String> = base
                    .sessions
                    .iter()
                    .filter(|(_, v)| matches!(v, Sess::Phantom { .. }))
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut out = vec![base];
                for p in phantoms {
                    let more: Vec<Registry> = out
                        .iter()
                        .map(|s| {
                            let mut s = s.clone();
                            s.sessions.remove(&p);
                            s
                        })
                        .collect();
                    out.extend(more);
                }
                out
            }
        }
    }
}

type RegEntry = Entry<RegIn, RegOut>;

/// How far back a fault may still take effect on a user's sessions (a node declared down a while
/// after it was killed or cut off, or announcing itself after a restart).
const FAULT_REACH_US: u64 = 90_000_000;

/// Builds each registry user's operations from the history. Only users with Kick or Status
/// operations are returned (for others there is nothing to check).
pub fn user_entries(history: &[Op], nodes: &[u64]) -> BTreeMap<String, Vec<RegEntry>> {
    let mut out: BTreeMap<String, Vec<RegEntry>> = BTreeMap::new();
    let mut checked_users: BTreeSet<String> = BTreeSet::new();
    let mut faults: Vec<u64> = Vec::new();
    for p in pairs(history) {
        let inv = p.invoke;
        if inv.f == F::Nemesis {
            if inv.value.fault.as_deref() != Some("heal") {
                faults.push(inv.time_us);
            }
            continue;
        }
        let (Some(user), device) = (inv.value.user.clone(), inv.value.device.clone()) else {
            continue;
        };
        let ret = p.done.map(|d| d.time_us);
        let v = out.entry(user.clone()).or_default();
        let mut add = |input: RegIn, ret: Option<u64>, output: Option<RegOut>| {
            v.push(Entry {
                call_us: inv.time_us,
                ret_us: ret,
                input,
                output,
                id: inv.index,
            })
        };
        match (inv.f, p.outcome()) {
            (F::Connect | F::Reconnect, kind) => {
                let Some(device) = device else { continue };
                // A login the SDK gave up on (timeout, NOT_READY, link lost) may still commit,
                // after the WELCOME of a later attempt: its node unregisters it once it commits.
                let abandoned = p.done.and_then(|d| d.value.abandoned).unwrap_or(0) > 0;
                let phantom = inv.f == F::Reconnect || kind != Type::Ok || abandoned;
                if kind == Type::Ok {
                    let d = p.done.expect("ok has a completion");
                    add(
                        RegIn::Register {
                            device: device.clone(),
                            epoch: d.value.epoch,
                            node: d.node,
                        },
                        ret,
                        None,
                    );
                }
                if phantom {
                    add(
                        RegIn::Register {
                            device: device.clone(),
                            epoch: None,
                            node: None,
                        },
                        None,
                        None,
                    );
                    add(RegIn::Unregister { device, epoch: None }, None, None);
                }
            }
            (F::Close, _) => {
                if let (Some(device), Some(e)) = (device, inv.value.epoch) {
                    add(
                        RegIn::Unregister {
                            device,
                            epoch: Some(e),
                        },
                        None,
                        None,
                    );
                }
            }
            (F::Kick, Type::Ok) => {
                checked_users.insert(user);
                let n = p.done.and_then(|d| d.value.count).unwrap_or(0);
                add(RegIn::Kick { device }, ret, Some(RegOut::Count(n)));
            }
            (F::Kick, Type::Info) => add(RegIn::Kick { device }, None, None),
            (F::Status, Type::Ok) => {
                checked_users.insert(user);
                let mut s = p.done.and_then(|d| d.value.sessions.clone()).unwrap_or_default();
                s.sort();
                add(RegIn::Status, ret, Some(RegOut::Sessions(s)));
            }
            _ => {}
        }
    }
    // Lost connections: the session of that epoch is unregistered later (or its node goes down).
    for o in history.iter().filter(|o| o.f == F::Disconnected) {
        let (Some(user), Some(device), Some(e)) = (&o.value.user, &o.value.device, o.value.epoch) else {
            continue;
        };
        if let Some(v) = out.get_mut(user) {
            v.push(Entry {
                call_us: o.time_us,
                ret_us: None,
                input: RegIn::Unregister {
                    device: device.clone(),
                    epoch: Some(e),
                },
                output: None,
                id: o.index,
            });
        }
    }
    out.retain(|u, _| checked_users.contains(u));
    for v in out.values_mut() {
        let first = v.iter().map(|e| e.call_us).min().unwrap_or(0);
        let last = v.iter().map(|e| e.ret_us.unwrap_or(e.call_us)).max().unwrap_or(0);
        for &t in faults
            .iter()
            .filter(|&&t| t + FAULT_REACH_US >= first && t <= last)
        {
            for &n in nodes {
                v.push(Entry {
                    call_us: t,
                    ret_us: None,
                    input: RegIn::NodeDown { node: n },
                    output: None,
                    id: 0,
                });
            }
        }
    }
    out
}

/// The history indexes of the Status reads whose removal alone makes `entries` linearizable.
fn stale_reads(entries: &[RegEntry], budget: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if !matches!(e.input, RegIn::Status) {
            continue;
        }
        let without: Vec<RegEntry> = entries
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, e)| e.clone())
            .collect();
        if matches!(
            wgl::check(Registry::default(), &without, budget),
            Outcome::Linearizable
        ) {
            out.push(e.id);
        }
    }
    out
}

pub fn check(history: &[Op], ctx: &Context) -> CheckResult {
    let mut r = CheckResult::new("linearizable");
    let users = user_entries(history, &ctx.nodes);
    let (mut ok, mut stale, mut bad, mut unknown) = (0u64, 0u64, 0u64, 0u64);
    let mut ops = 0usize;
    let mut unknown_users: Vec<String> = Vec::new();
    for (user, entries) in &users {
        ops += entries.len();
        match wgl::check(Registry::default(), entries, ctx.wgl_budget) {
            Outcome::Linearizable => ok += 1,
            Outcome::Unknown => {
                unknown += 1;
                unknown_users.push(format!("{user} ({} ops)", entries.len()));
            }
            Outcome::Illegal { stuck, prefix } => {
                let writes: Vec<RegEntry> = entries
                    .iter()
                    .filter(|e| !matches!(e.input, RegIn::Status))
                    .cloned()
                    .collect();
                let tail: Vec<u64> = prefix.iter().rev().take(6).rev().copied().collect();
                match wgl::check(Registry::default(), &writes, ctx.wgl_budget) {
                    Outcome::Linearizable => {
                        stale += 1;
                        // Name the reads: each Status whose removal alone makes the history
                        // linearizable (the search may get stuck on a later write instead).
                        let culprits = stale_reads(entries, ctx.wgl_budget);
                        let lines = if culprits.is_empty() {
                            vec![stuck]
                        } else {
                            culprits.clone()
                        };
                        r.violation(
                            "stale-status-read",
                            format!(
                                "user {user}: Status read(s) at history index {culprits:?} fit no \
                                 linearization; without Status reads the history is linearizable \
                                 (the search got stuck at index {stuck}; last ops placed: {tail:?})"
                            ),
                            lines,
                        );
                    }
                    Outcome::Unknown => {
                        unknown += 1;
                        unknown_users.push(format!("{user} ({} ops, writes only)", writes.len()));
                    }
                    Outcome::Illegal { stuck: s2, .. } => {
                        bad += 1;
                        r.violation(
                            "not-linearizable",
                            format!(
                                "user {user}: op at history index {s2} fits no linearization of the registry \
                                 writes (last ops placed: {tail:?})"
                            ),
                            vec![s2],
                        );
                    }
                }
            }
        }
    }
    if unknown > 0 {
        r.unknown(format!(
            "{unknown} user histories exceeded the search budget of {} states each (--wgl-budget)",
            ctx.wgl_budget
        ));
    }
    r.stats = serde_json::json!({
        "users": users.len(),
        "operations": ops,
        "linearizable": ok,
        "stale_status_reads": stale,
        "not_linearizable": bad,
        "unknown": unknown,
        "unknown_users": unknown_users,
        "wgl_budget": ctx.wgl_budget,
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::Validity;
    use crate::history::Val;

    fn uv(device: &str) -> Val {
        Val {
            user: Some("u".into()),
            device: Some(device.into()),
            client: Some(100),
            ..Val::default()
        }
    }

    fn kick(h: &mut H, t: u64, device: &str, count: u64) {
        h.at(t, 20, Type::Invoke, F::Kick, uv(device));
        h.at(
            t + 1,
            20,
            Type::Ok,
            F::Kick,
            Val {
                count: Some(count),
                ..uv(device)
            },
        );
    }

    fn status(h: &mut H, t: u64, sessions: Vec<SessionObs>) {
        let v = Val {
            user: Some("u".into()),
            ..Val::default()
        };
        h.at(t, 21, Type::Invoke, F::Status, v.clone());
        h.at(
            t + 1,
            21,
            Type::Ok,
            F::Status,
            Val {
                sessions: Some(sessions),
                ..v
            },
        );
    }

    fn connect(h: &mut H, t: u64, p: u64, device: &str, epoch: u64, node: u64) {
        h.at(t, p, Type::Invoke, F::Connect, uv(device));
        let i = h.at(
            t + 1,
            p,
            Type::Ok,
            F::Connect,
            Val {
                epoch: Some(epoch),
                ..uv(device)
            },
        );
        h.ops[i as usize].node = Some(node);
    }

    #[test]
    fn register_kick_status_in_order_is_linearizable() {
        let mut h = H::new();
        connect(&mut h, 0, 30, "a", 5, 1);
        connect(&mut h, 10, 31, "b", 9, 2);
        status(
            &mut h,
            20,
            vec![H::status_obs("a", 5, 1), H::status_obs("b", 9, 2)],
        );
        kick(&mut h, 30, "a", 1);
        status(&mut h, 40, vec![H::status_obs("b", 9, 2)]);
        kick(&mut h, 50, "a", 0);
        let r = check(&h.ops, &Context::default());
        assert_eq!(r.valid, Validity::Valid, "{r:#?}");
        assert_eq!(r.stats["users"], 1);
    }

    #[test]
    fn a_kick_that_counts_a_kicked_session_again_is_not_linearizable() {
        let mut h = H::new();
        connect(&mut h, 0, 30, "a", 5, 1);
        kick(&mut h, 30, "a", 1);
        kick(&mut h, 50, "a", 1);
        let r = check(&h.ops, &Context::default());
        assert_eq!(r.valid, Validity::Invalid, "{r:#?}");
        assert_eq!(r.count_kind("not-linearizable"), 1);
    }

    #[test]
    fn a_status_missing_a_registered_session_is_a_stale_read() {
        let mut h = H::new();
        connect(&mut h, 0, 30, "a", 5, 1);
        status(&mut h, 20, vec![]);
        let r = check(&h.ops, &Context::default());
        assert_eq!(r.count_kind("stale-status-read"), 1, "{r:#?}");
    }

    /// The first long run's finding: a device connects (its SDK gave up on an earlier attempt),
    /// closes; a Status shows no session; a later Kick ends one: the abandoned attempt's
    /// registration committed in between. Allowed only when the connect says an attempt was
    /// abandoned; the report names the Status read, not the op the search got stuck on.
    #[test]
    fn a_late_registration_of_an_abandoned_attempt_is_allowed_only_when_recorded() {
        for abandoned in [None, Some(1)] {
            let mut h = H::new();
            h.at(0, 30, Type::Invoke, F::Connect, uv("a"));
            let i = h.at(
                1,
                30,
                Type::Ok,
                F::Connect,
                Val {
                    epoch: Some(5),
                    abandoned,
                    ..uv("a")
                },
            );
            h.ops[i as usize].node = Some(1);
            let close = Val {
                epoch: Some(5),
                ..uv("a")
            };
            h.at(10, 30, Type::Invoke, F::Close, close.clone());
            h.at(11, 30, Type::Ok, F::Close, close);
            status(&mut h, 20, vec![]);
            let read = h.ops.len() as u64 - 2;
            kick(&mut h, 40, "a", 1);
            let r = check(&h.ops, &Context::default());
            if abandoned.is_some() {
                assert_eq!(r.valid, Validity::Valid, "{r:#?}");
            } else {
                assert_eq!(r.count_kind("stale-status-read"), 1, "{r:#?}");
                let named: Vec<u64> = r.violations.iter().flat_map(|v| v.ops.clone()).collect();
                assert!(named.contains(&read), "{named:?} should name {read}: {r:#?}");
            }
        }
    }

    #[test]
    fn an_older_epoch_after_a_newer_registration_is_not_linearizable() {
        let mut h = H::new();
        connect(&mut h, 0, 30, "a", 5, 1);
        connect(&mut h, 10, 31, "a", 9, 2);
        status(&mut h, 20, vec![H::status_obs("a", 5, 1)]);
        let r = check(&h.ops, &Context::default());
        assert_eq!(r.valid, Validity::Invalid, "{r:#?}");
        // Registrations must also take effect in epoch order.
        let mut h = H::new();
        connect(&mut h, 0, 30, "a", 9, 1);
        connect(&mut h, 10, 31, "b", 5, 2);
        kick(&mut h, 30, "a", 1);
        let r = check(&h.ops, &Context::default());
        assert_eq!(r.count_kind("not-linearizable"), 1, "{r:#?}");
    }

    #[test]
    fn lost_connections_phantoms_and_node_down_are_allowed() {
        let mut h = H::new();
        connect(&mut h, 0, 30, "a", 5, 1);
        // The connection drops; the SDK reconnects (an attempt may have registered and failed).
        h.at(
            10,
            30,
            Type::Ok,
            F::Disconnected,
            Val {
                epoch: Some(5),
                ..uv("a")
            },
        );
        h.at(11, 32, Type::Invoke, F::Reconnect, uv("a"));
        // While it reconnects a status sees an epoch nobody was told about: a phantom.
        status(&mut h, 12, vec![H::status_obs("a", 7, 3)]);
        let i = h.at(
            20,
            32,
            Type::Ok,
            F::Reconnect,
            Val {
                epoch: Some(8),
                ..uv("a")
            },
        );
        h.ops[i as usize].node = Some(2);
        status(&mut h, 25, vec![H::status_obs("a", 8, 2)]);
        // Node 2 is killed: its sessions may end at any time after.
        let f = Val {
            fault: Some("kill".into()),
            nodes: Some(vec![2]),
            ..Val::default()
        };
        h.at(30, crate::history::NEMESIS, Type::Invoke, F::Nemesis, f.clone());
        h.at(30, crate::history::NEMESIS, Type::Ok, F::Nemesis, f);
        status(&mut h, 40, vec![]);
        kick(&mut h, 50, "a", 0);
        let r = check(&h.ops, &Context::default());
        assert_eq!(r.valid, Validity::Valid, "{r:#?}");
    }
}
