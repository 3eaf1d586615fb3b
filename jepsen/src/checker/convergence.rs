//! Replica convergence: after every fault is healed and the workload stopped, every node's hash
//! of its replicated state (`StateReader::state_hash`, asked for through the raft service's
//! `Probe { want_state_hash }`) is the same at the same applied index.
//!
//! The harness records a round of `hash` observations once the nodes report one applied index;
//! the last observation of each node counts. Nodes that never agreed on an index make the result
//! `unknown` (they did not quiesce), which is reported and not a pass; two nodes at one index with
//! different hashes are a violation.

use std::collections::BTreeMap;

use super::CheckResult;
use crate::history::{Op, F};

pub fn check(history: &[Op]) -> CheckResult {
    let mut r = CheckResult::new("convergence");
    let mut last: BTreeMap<u64, &Op> = BTreeMap::new();
    for o in history.iter().filter(|o| o.f == F::Hash) {
        if let Some(n) = o.node {
            last.insert(n, o);
        }
    }
    if last.is_empty() {
        r.unknown("no state hashes were recorded".into());
        return r;
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
    if by_index.len() > 1 && r.count == 0 {
        let at: Vec<String> = last
            .iter()
            .map(|(n, o)| format!("node {n} at {:?}", o.value.applied))
            .collect();
        r.unknown(format!(
            "nodes never reported one applied index: {}",
            at.join(", ")
        ));
    }
    r.stats = serde_json::json!({
        "nodes": last.len(),
        "indexes": by_index.keys().collect::<Vec<_>>(),
    });
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

    #[test]
    fn equal_hashes_at_one_index_pass() {
        let h = vec![
            hash(1, 10, 7, 0),
            hash(1, 12, 9, 1),
            hash(2, 12, 9, 2),
            hash(3, 12, 9, 3),
        ];
        assert_eq!(check(&h).valid, Validity::Valid);
    }

    #[test]
    fn different_hashes_at_one_index_fail() {
        let h = vec![hash(1, 12, 9, 0), hash(2, 12, 9, 1), hash(3, 12, 8, 2)];
        let r = check(&h);
        assert_eq!(r.valid, Validity::Invalid);
        assert!(r.violations[0].detail.contains("[3]"), "{r:?}");
    }

    #[test]
    fn no_common_index_is_unknown() {
        let h = vec![hash(1, 12, 9, 0), hash(2, 13, 9, 1)];
        assert_eq!(check(&h).valid, Validity::Unknown);
        assert_eq!(check(&[]).valid, Validity::Unknown);
    }
}
