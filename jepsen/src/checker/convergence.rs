//! Replica convergence: after every fault is healed and the workload stopped, every node of the
//! run has the same hash of its replicated state (`StateReader::state_hash`: every column family
//! of the state machine — sessions, mailboxes with their seqs and msg ids, cursors, topics —
//! asked for through the raft service's `Probe { want_state_hash }`) at the same applied index.
//!
//! The harness records a round of `hash` observations once the nodes report one applied index
//! (and a failed `hash` for each node that did not answer the last round); the last observation
//! of each node counts. Every node of the run is compared: one that never reported a hash makes
//! the result `unknown` (not skipped: a replica nobody looked at may be the one that diverged),
//! as do nodes that never agreed on an index (they did not quiesce); two nodes at one index with
//! different hashes are a violation.

use std::collections::BTreeMap;

use super::CheckResult;
use crate::history::{Op, Type, F};

/// `shards`: the run's shard count; every group 0..=shards must be hashed by every node (a group
/// the history has no hash of is `unknown`, not skipped).
pub fn check(history: &[Op], nodes: &[u64], shards: u32) -> CheckResult {
    let mut r = CheckResult::new("convergence");
    // (group, node) → its last observation. Each Raft group's replicas are compared with each
    // other (a cluster with shards records one round per group; without, group 0 only).
    let mut last: BTreeMap<(u32, u64), &Op> = BTreeMap::new();
    let mut failed: BTreeMap<(u32, u64), &Op> = BTreeMap::new();
    let mut groups: std::collections::BTreeSet<u32> = (0..=shards).collect();
    for o in history.iter().filter(|o| o.f == F::Hash) {
        let Some(n) = o.node else { continue };
        let g = o.value.group.unwrap_or(0);
        groups.insert(g);
        if o.kind == Type::Ok {
            last.insert((g, n), o);
            failed.remove(&(g, n));
        } else {
            failed.insert((g, n), o);
        }
    }
    let sharded = groups.len() > 1;
    let name = |g: u32, n: u64| {
        if sharded {
            format!("node {n} in group {g}")
        } else {
            format!("node {n}")
        }
    };
    let mut silent = Vec::new();
    for &g in &groups {
        for n in nodes {
            if !last.contains_key(&(g, *n)) {
                let why = failed
                    .get(&(g, *n))
                    .and_then(|o| o.error.as_deref())
                    .unwrap_or("never asked");
                silent.push(format!("{} ({why})", name(g, *n)));
            }
        }
    }
    // group → applied index → hash → nodes.
    let mut by_index: BTreeMap<u32, BTreeMap<u64, BTreeMap<u64, Vec<u64>>>> = BTreeMap::new();
    for ((g, node), o) in &last {
        let (Some(i), Some(h)) = (o.value.applied, o.value.hash) else {
            continue;
        };
        by_index
            .entry(*g)
            .or_default()
            .entry(i)
            .or_default()
            .entry(h)
            .or_default()
            .push(*node);
    }
    for (g, indexes) in &by_index {
        for (index, hashes) in indexes {
            if hashes.len() > 1 {
                let desc: Vec<String> = hashes
                    .iter()
                    .map(|(h, nodes)| format!("{h:016x} on nodes {nodes:?}"))
                    .collect();
                let ops = last
                    .iter()
                    .filter(|((lg, _), _)| lg == g)
                    .map(|(_, o)| o.index)
                    .collect();
                let at = if sharded {
                    format!(" of group {g}")
                } else {
                    String::new()
                };
                r.violation(
                    "diverged",
                    format!(
                        "at applied index {index}{at} the replicas differ: {}",
                        desc.join("; ")
                    ),
                    ops,
                );
            }
        }
    }
    r.stats = serde_json::json!({
        "nodes": last.keys().map(|(_, n)| *n).collect::<std::collections::BTreeSet<_>>().len(),
        "of": nodes.len(),
        "groups": groups.len(),
        "indexes": by_index.iter().map(|(g, i)| (g.to_string(), i.keys().copied().collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
    });
    let split: Vec<String> = by_index
        .iter()
        .filter(|(_, i)| i.len() > 1)
        .flat_map(|(g, _)| {
            last.iter()
                .filter(move |((lg, _), _)| lg == g)
                .map(|((g, n), o)| format!("{} at {:?}", name(*g, *n), o.value.applied))
        })
        .collect();
    if !silent.is_empty() {
        r.unknown(format!("no state hash from {}", silent.join(", ")));
    } else if !split.is_empty() && r.count == 0 {
        r.unknown(format!(
            "nodes never reported one applied index: {}",
            split.join(", ")
        ));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;
    use crate::history::{Type, Val, MONITOR};

    fn hash(node: u64, applied: u64, h: u64, t: u64) -> Op {
        let mut o = Op::new(
            t,
            MONITOR,
            Type::Ok,
            F::Hash,
            Val {
                applied: Some(applied),
                hash: Some(h),
                ..Val::default()
            },
        )
        .with_node(node);
        o.index = t;
        o
    }

    fn no_hash(node: u64, t: u64) -> Op {
        let mut o = Op::new(t, MONITOR, Type::Fail, F::Hash, Val::default())
            .with_node(node)
            .with_error("probe of node 3 timed out");
        o.index = t;
        o
    }

    const NODES: [u64; 3] = [1, 2, 3];

    #[test]
    fn equal_hashes_at_one_index_pass() {
        let h = vec![
            hash(1, 10, 7, 0),
            hash(1, 12, 9, 1),
            hash(2, 12, 9, 2),
            hash(3, 12, 9, 3),
        ];
        assert_eq!(check(&h, &NODES, 0).valid, Validity::Valid);
    }

    #[test]
    fn different_hashes_at_one_index_fail() {
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1), hash(3, 12, 8, 2)];
        let r = check(&h, &NODES, 0);
        assert_eq!(r.valid, Validity::Invalid);
        assert!(r.violations[0].detail.contains("[3]"), "{r:?}");
    }

    #[test]
    fn no_common_index_is_unknown() {
        let h = vec![hash(1, 12, 9, 0), hash(2, 13, 9, 1), hash(3, 13, 9, 2)];
        assert_eq!(check(&h, &NODES, 0).valid, Validity::Unknown);
        assert_eq!(check(&[], &NODES, 0).valid, Validity::Unknown);
    }

    #[test]
    fn a_node_without_a_hash_is_unknown_not_skipped() {
        // Two nodes agree; the third never answered: not a pass.
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1), no_hash(3, 2)];
        let r = check(&h, &NODES, 0);
        assert_eq!(r.valid, Validity::Unknown, "{r:?}");
        assert!(r.stats["unknown"]
            .as_str()
            .unwrap()
            .contains("node 3 (probe of node 3 timed out)"));
        // Never asked at all: the same.
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1)];
        assert_eq!(check(&h, &NODES, 0).valid, Validity::Unknown);
        // A later answer counts.
        let h = vec![
            no_hash(3, 0),
            hash(1, 12, 9, 1),
            hash(2, 12, 9, 2),
            hash(3, 12, 9, 3),
        ];
        assert_eq!(check(&h, &NODES, 0).valid, Validity::Valid);
        // Divergence among those that answered is still a violation.
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 8, 1), no_hash(3, 2)];
        assert_eq!(check(&h, &NODES, 0).valid, Validity::Invalid);
    }

    fn in_group(mut o: Op, g: u32) -> Op {
        o.value.group = Some(g);
        o
    }

    #[test]
    fn each_groups_replicas_are_compared_with_each_other() {
        let mut h: Vec<Op> = Vec::new();
        let mut t = 0;
        for (g, applied, hashes) in [(0u32, 5u64, [1u64, 1, 1]), (1, 40, [7, 7, 7]), (2, 31, [3, 3, 3])] {
            for (node, hv) in NODES.iter().zip(hashes) {
                h.push(in_group(hash(*node, applied, hv, t), g));
                t += 1;
            }
        }
        // Different indexes in different groups are no disagreement.
        assert_eq!(check(&h, &NODES, 2).valid, Validity::Valid);
        // A run of 3 shards whose history has no hash of group 3 checked nothing there.
        let r = check(&h, &NODES, 3);
        assert_eq!(r.valid, Validity::Unknown, "{r:?}");
        assert!(
            r.stats["unknown"].as_str().unwrap().contains("node 1 in group 3"),
            "{r:?}"
        );
        // One replica of group 2 differs at the same index: a violation naming the group.
        let mut bad = h.clone();
        bad[8] = in_group(hash(3, 31, 4, 8), 2);
        let r = check(&bad, &NODES, 2);
        assert_eq!(r.valid, Validity::Invalid, "{r:?}");
        assert!(r.violations[0].detail.contains("of group 2"), "{r:?}");
        // A node that gave no hash of group 1: unknown, named with its group.
        let missing: Vec<Op> = h
            .iter()
            .filter(|o| !(o.value.group == Some(1) && o.node == Some(2)))
            .cloned()
            .collect();
        let r = check(&missing, &NODES, 2);
        assert_eq!(r.valid, Validity::Unknown, "{r:?}");
        assert!(
            r.stats["unknown"].as_str().unwrap().contains("node 2 in group 1"),
            "{r:?}"
        );
    }
}
