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

pub fn check(history: &[Op], nodes: &[u64]) -> CheckResult {
    let mut r = CheckResult::new("convergence");
    let mut last: BTreeMap<u64, &Op> = BTreeMap::new();
    let mut failed: BTreeMap<u64, &Op> = BTreeMap::new();
    for o in history.iter().filter(|o| o.f == F::Hash) {
        let Some(n) = o.node else { continue };
        if o.kind == Type::Ok {
            last.insert(n, o);
            failed.remove(&n);
        } else {
            failed.insert(n, o);
        }
    }
    let mut silent = Vec::new();
    for n in nodes {
        if !last.contains_key(n) {
            let why = failed
                .get(n)
                .and_then(|o| o.error.as_deref())
                .unwrap_or("never asked");
            silent.push(format!("node {n} ({why})"));
        }
    }
    let mut by_index: BTreeMap<u64, BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
    for (node, o) in &last {
        let (Some(i), Some(h)) = (o.value.applied, o.value.hash) else {
            continue;
        };
        by_index.entry(i).or_default().entry(h).or_default().push(*node);
    }
    for (index, hashes) in &by_index {
        if hashes.len() > 1 {
            let desc: Vec<String> = hashes
                .iter()
                .map(|(h, nodes)| format!("{h:016x} on nodes {nodes:?}"))
                .collect();
            let ops = last.values().map(|o| o.index).collect();
            r.violation(
                "diverged",
                format!(
                    "at applied index {index} the replicas differ: {}",
                    desc.join("; ")
                ),
                ops,
            );
        }
    }
    r.stats = serde_json::json!({
        "nodes": last.len(),
        "of": nodes.len(),
        "indexes": by_index.keys().collect::<Vec<_>>(),
    });
    if !silent.is_empty() {
        r.unknown(format!("no state hash from {}", silent.join(", ")));
    } else if by_index.len() > 1 && r.count == 0 {
        let at: Vec<String> = last
            .iter()
            .map(|(n, o)| format!("node {n} at {:?}", o.value.applied))
            .collect();
        r.unknown(format!(
            "nodes never reported one applied index: {}",
            at.join(", ")
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
        assert_eq!(check(&h, &NODES).valid, Validity::Valid);
    }

    #[test]
    fn different_hashes_at_one_index_fail() {
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1), hash(3, 12, 8, 2)];
        let r = check(&h, &NODES);
        assert_eq!(r.valid, Validity::Invalid);
        assert!(r.violations[0].detail.contains("[3]"), "{r:?}");
    }

    #[test]
    fn no_common_index_is_unknown() {
        let h = vec![hash(1, 12, 9, 0), hash(2, 13, 9, 1), hash(3, 13, 9, 2)];
        assert_eq!(check(&h, &NODES).valid, Validity::Unknown);
        assert_eq!(check(&[], &NODES).valid, Validity::Unknown);
    }

    #[test]
    fn a_node_without_a_hash_is_unknown_not_skipped() {
        // Two nodes agree; the third never answered: not a pass.
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1), no_hash(3, 2)];
        let r = check(&h, &NODES);
        assert_eq!(r.valid, Validity::Unknown, "{r:?}");
        assert!(r.stats["unknown"]
            .as_str()
            .unwrap()
            .contains("node 3 (probe of node 3 timed out)"));
        // Never asked at all: the same.
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1)];
        assert_eq!(check(&h, &NODES).valid, Validity::Unknown);
        // A later answer counts.
        let h = vec![
            no_hash(3, 0),
            hash(1, 12, 9, 1),
            hash(2, 12, 9, 2),
            hash(3, 12, 9, 3),
        ];
        assert_eq!(check(&h, &NODES).valid, Validity::Valid);
        // Divergence among those that answered is still a violation.
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 8, 1), no_hash(3, 2)];
        assert_eq!(check(&h, &NODES).valid, Validity::Invalid);
    }
}
