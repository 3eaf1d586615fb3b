//! Raft probes: what every node's `RaftService/Probe` said over the run (polled by the monitor).
//!
//! - `two-leaders`: two nodes said they were leader in the same term;
//! - `term-went-back`: a node's term decreased (its vote is a synced write, so it never should);
//! - `commit-went-back`: a node's applied index — everything up to it is committed — decreased
//!   (the state machine is persisted with its applied index), or the cluster's final applied
//!   index is below one a node had already reported (a committed entry disappeared). Across a
//!   power cut of the node's own disk (`power-*` nemeses on powerfs) its applied index may go
//!   back: the state machine's writes are not fsynced by design (it is rebuilt from the Raft
//!   log, whose appends are), so the node re-applies; counted in `stats.applied_back_after_cut`,
//!   and the final check above still holds it to every index ever reported.
//!
//! - `node-crashed`: a node process exited without the harness killing it (a panic, an abort).
//! - `damage-mishandled`: after the `damage` nemesis damaged a node's raft log, the node exited
//!   without naming `--rejoin`, or could not be rejoined.
//!
//! A node whose data dir the harness wiped (membership nemesis) starts a new `generation`; its
//! term and index start again from zero legitimately.
//!
//! With shards every Raft group is judged on its own (its terms, leaders and indexes are its
//! own): probes and final hashes carry their group.

use std::collections::BTreeMap;

use super::CheckResult;
use crate::history::{Op, Type, F};

/// How far the final state hashes may stand behind the largest applied index a probe reported
/// (see the final check).
const BLANK_SLACK: u64 = 1;

/// How long after a power cut of a node its applied index may be seen to go back.
const CUT_REACH_US: u64 = 60_000_000;

pub fn check(history: &[Op]) -> CheckResult {
    let mut r = CheckResult::new("raft");
    // Keyed by group first.
    let mut leaders: BTreeMap<(u32, u64), (u64, u64)> = BTreeMap::new();
    let mut per_node: BTreeMap<(u32, u64, u64), (u64, u64, u64)> = BTreeMap::new();
    let mut max_applied: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    let mut probes = 0u64;
    // Nodes whose disk lost power, and when: a regression within CUT_REACH_US after it is
    // excused once (a probe answered just before the kill may be recorded after the cut).
    let mut cut: BTreeMap<u64, u64> = BTreeMap::new();
    let mut back_after_cut = 0u64;
    // When each group's final hash round began.
    let mut final_at: BTreeMap<u32, u64> = BTreeMap::new();
    for o in history.iter().filter(|o| o.f == F::Hash) {
        let t = final_at.entry(o.value.group.unwrap_or(0)).or_insert(o.time_us);
        *t = (*t).min(o.time_us);
    }
    // (node, group, the cut's time) whose one excused regression was used.
    let mut excused: std::collections::BTreeSet<(u64, u32, u64)> = Default::default();
    for o in history.iter().filter(|o| o.f == F::Probe || o.f == F::Nemesis) {
        if o.f == F::Nemesis {
            if o.kind == Type::Info && o.value.fault.as_deref() == Some("damage") {
                r.violation(
                    "damage-mishandled",
                    format!(
                        "a node with a damaged raft log neither ran nor refused naming the recovery: {}",
                        o.error.as_deref().unwrap_or("?")
                    ),
                    vec![o.index],
                );
            }
            if o.kind == Type::Ok && o.value.fault.as_deref().is_some_and(|f| f.starts_with("power-")) {
                cut.extend(o.value.nodes.iter().flatten().map(|n| (*n, o.time_us)));
            }
            continue;
        }
        let Some(node) = o.node else { continue };
        let cut_at = cut
            .get(&node)
            .copied()
            .filter(|t| o.time_us.saturating_sub(*t) < CUT_REACH_US);
        if o.value.state.as_deref() == Some("crashed") {
            r.violation(
                "node-crashed",
                format!(
                    "node {node} exited on its own: {}",
                    o.error.as_deref().unwrap_or("?")
                ),
                vec![o.index],
            );
            continue;
        }
        probes += 1;
        let group = o.value.group.unwrap_or(0);
        let term = o.value.term.unwrap_or(0);
        let applied = o.value.applied.unwrap_or(0);
        let gen = o.value.generation.unwrap_or(0);
        if o.value.state.as_deref() == Some("leader") {
            match leaders.get(&(group, term)) {
                Some(&(other, op)) if other != node => r.violation(
                    "two-leaders",
                    format!("nodes {other} and {node} both led term {term}{}", in_group(group)),
                    vec![op, o.index],
                ),
                _ => {
                    leaders.insert((group, term), (node, o.index));
                }
            }
        }
        if let Some(&(t0, a0, op)) = per_node.get(&(group, node, gen)) {
            if term < t0 {
                r.violation(
                    "term-went-back",
                    format!("node {node} went from term {t0} to {term}{}", in_group(group)),
                    vec![op, o.index],
                );
            }
            let excuse = cut_at.filter(|t| !excused.contains(&(node, group, *t)));
            if let (true, Some(t)) = (applied < a0, excuse) {
                back_after_cut += 1;
                excused.insert((node, group, t));
            } else if applied < a0 {
                r.violation(
                    "commit-went-back",
                    format!(
                        "node {node} went from applied index {a0} to {applied}{}",
                        in_group(group)
                    ),
                    vec![op, o.index],
                );
            }
        }
        per_node.insert((group, node, gen), (term, applied, o.index));
        // Only probes before the group's final hashes bound them (the groups are hashed one after
        // the other, and a group may take entries while another is being hashed).
        if final_at.get(&group).is_none_or(|t| o.time_us < *t) {
            let top = max_applied.entry(group).or_insert((applied, node, o.index));
            if applied > top.0 {
                *top = (applied, node, o.index);
            }
        }
    }
    // The final state must contain every index ever reported applied.
    let finals: Vec<&Op> = history.iter().filter(|o| o.f == F::Hash).collect();
    // Probes report openraft's applied index, the final hashes the state machine's stored one,
    // which stands one entry behind after a new leader's blank entry (seen in a short run: a
    // leader probed at 685 hashed at 684 with every other node): one entry of slack.
    for (group, &(seen, node, op)) in &max_applied {
        let fin = finals
            .iter()
            .filter(|o| o.value.group.unwrap_or(0) == *group)
            .filter_map(|o| o.value.applied)
            .max();
        let Some(fin) = fin else { continue };
        if fin + BLANK_SLACK < seen {
            r.violation(
                "commit-went-back",
                format!(
                    "node {node} had applied index {seen}{}, but the healed cluster ends at {fin}",
                    in_group(*group)
                ),
                vec![op],
            );
        }
    }
    r.stats = serde_json::json!({
        "probes": probes,
        "groups": max_applied.len().max(1),
        "terms_with_a_leader": leaders.len(),
        "max_applied": max_applied.get(&0).map(|m| m.0),
        "applied_back_after_cut": back_after_cut,
    });
    r
}

/// " in group G" for a shard group, nothing for group 0.
fn in_group(group: u32) -> String {
    match group {
        0 => String::new(),
        g => format!(" in group {g}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;
    use crate::history::{Type, Val, MONITOR};

    fn probe(i: u64, node: u64, term: u64, state: &str, applied: u64, gen: u64) -> Op {
        let mut o = Op::new(
            i,
            MONITOR,
            Type::Ok,
            F::Probe,
            Val {
                term: Some(term),
                state: Some(state.into()),
                applied: Some(applied),
                generation: Some(gen),
                ..Val::default()
            },
        )
        .with_node(node);
        o.index = i;
        o
    }

    fn in_group(mut o: Op, g: u32) -> Op {
        o.value.group = Some(g);
        o
    }

    #[test]
    fn each_group_has_its_own_terms_leaders_and_indexes() {
        // Different leaders of term 3 in different groups, and a group whose index is below
        // another's: all fine.
        let ok = vec![
            in_group(probe(0, 1, 3, "leader", 90, 0), 0),
            in_group(probe(1, 2, 3, "leader", 12, 0), 1),
            in_group(probe(2, 1, 3, "follower", 12, 0), 1),
            in_group(probe(3, 1, 3, "leader", 90, 0), 0),
        ];
        let r = check(&ok);
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
        // Two leaders of one term in one group, and an index going back within a group.
        let bad = vec![
            in_group(probe(0, 1, 3, "leader", 12, 0), 2),
            in_group(probe(1, 2, 3, "leader", 12, 0), 2),
            in_group(probe(2, 3, 3, "follower", 12, 0), 2),
            in_group(probe(3, 3, 3, "follower", 10, 0), 2),
        ];
        let r = check(&bad);
        assert_eq!(r.count_kind("two-leaders"), 1, "{r:#?}");
        assert_eq!(r.count_kind("commit-went-back"), 1, "{r:#?}");
        assert!(
            r.violations.iter().all(|v| v.detail.contains("in group 2")),
            "{r:#?}"
        );
    }

    #[test]
    fn a_normal_run_passes() {
        let h = vec![
            probe(0, 1, 1, "leader", 5, 0),
            probe(1, 2, 1, "follower", 4, 0),
            probe(2, 2, 2, "leader", 6, 0),
            probe(3, 1, 2, "follower", 6, 0),
            // Wiped and re-added: a new generation starts from zero.
            probe(4, 3, 0, "learner", 0, 1),
        ];
        let r = check(&h);
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
    }

    #[test]
    fn two_leaders_in_a_term_and_regressions_fail() {
        let h = vec![
            probe(0, 1, 3, "leader", 9, 0),
            probe(1, 2, 3, "leader", 9, 0),
            probe(2, 1, 2, "follower", 7, 0),
            probe(3, 3, 0, "crashed", 0, 0),
        ];
        let r = check(&h);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count_kind("two-leaders"), 1, "{r:#?}");
        assert_eq!(r.count_kind("term-went-back"), 1, "{r:#?}");
        assert_eq!(r.count_kind("commit-went-back"), 1, "{r:#?}");
        assert_eq!(r.count_kind("node-crashed"), 1, "{r:#?}");
    }

    #[test]
    fn a_damaged_log_the_node_did_not_handle_is_a_violation() {
        let damage = |i: u64, kind: Type| {
            let mut o = Op::new(
                i,
                crate::history::NEMESIS,
                kind,
                F::Nemesis,
                Val {
                    fault: Some("damage".into()),
                    nodes: Some(vec![2]),
                    ..Val::default()
                },
            );
            o.index = i;
            if kind == Type::Info {
                o.error = Some("exited (exit status: 1) without naming --rejoin".into());
            }
            o
        };
        let ok = vec![probe(0, 1, 3, "leader", 9, 0), damage(1, Type::Ok)];
        assert_eq!(check(&ok).count_kind("damage-mishandled"), 0);
        let bad = vec![probe(0, 1, 3, "leader", 9, 0), damage(1, Type::Info)];
        let r = check(&bad);
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count_kind("damage-mishandled"), 1, "{r:#?}");
    }

    #[test]
    fn applied_may_go_back_across_a_power_cut_of_that_node_only() {
        let power = |i: u64, nodes: Vec<u64>| {
            let mut o = Op::new(
                i,
                crate::history::NEMESIS,
                Type::Ok,
                F::Nemesis,
                Val {
                    fault: Some("power-one".into()),
                    nodes: Some(nodes),
                    ..Val::default()
                },
            );
            o.index = i;
            o
        };
        let h = vec![
            probe(0, 1, 3, "leader", 9, 0),
            probe(1, 2, 3, "follower", 9, 0),
            power(2, vec![2]),
            probe(3, 2, 3, "follower", 7, 0),
            probe(4, 1, 3, "leader", 8, 0),
        ];
        let r = check(&h);
        assert_eq!(r.count_kind("commit-went-back"), 1, "node 1 had no cut: {r:#?}");
        assert_eq!(r.stats["applied_back_after_cut"], 1);
        assert!(r.violations[0].detail.contains("node 1"), "{r:#?}");
    }

    #[test]
    fn a_final_hash_one_blank_entry_behind_the_probes_is_fine() {
        let mut fin = Op::new(
            9,
            MONITOR,
            Type::Ok,
            F::Hash,
            Val {
                applied: Some(9),
                hash: Some(1),
                ..Val::default()
            },
        )
        .with_node(1);
        fin.index = 9;
        let h = vec![probe(0, 1, 3, "leader", 10, 0), fin];
        assert_eq!(check(&h).count_kind("commit-went-back"), 0);
    }

    #[test]
    fn a_final_state_behind_a_reported_commit_fails() {
        let mut fin = Op::new(
            9,
            MONITOR,
            Type::Ok,
            F::Hash,
            Val {
                applied: Some(8),
                hash: Some(1),
                ..Val::default()
            },
        )
        .with_node(1);
        fin.index = 9;
        let h = vec![probe(0, 1, 3, "leader", 10, 0), fin];
        assert_eq!(check(&h).count_kind("commit-went-back"), 1);
    }
}
