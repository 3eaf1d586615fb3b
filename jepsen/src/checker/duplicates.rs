//! Duplicates: one message handed to the app twice within one dedupe scope.
//!
//! The SDK drops re-deliveries by msg id and by seq (docs/PROTOCOL.md: "clients must dedupe by
//! msg_id"), so what reaches the app is exactly once per session — and across app restarts when
//! the instances share a cursor store (the workloads give such instances one `scope`). A second
//! delivery of a msg id in one scope is a violation, whatever the server did.

use std::collections::HashMap;

use super::{CheckResult, Index};

pub fn check(idx: &Index<'_>) -> CheckResult {
    let mut r = CheckResult::new("duplicates");
    let mut first: HashMap<(u64, &str), u64> = HashMap::new();
    let mut checked = 0u64;
    for o in &idx.recvs {
        let (Some(scope), Some(msg)) = (o.value.scope.or(o.value.client), o.value.msg_id.as_deref()) else {
            continue;
        };
        checked += 1;
        if let Some(prev) = first.insert((scope, msg), o.index) {
            r.violation(
                "duplicate",
                format!(
                    "{msg} handed twice to {:?} (scope {scope})",
                    o.value.user.as_deref().unwrap_or("?")
                ),
                vec![prev, o.index],
            );
        }
    }
    r.stats = serde_json::json!({ "deliveries_checked": checked });
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::{Index, Validity};

    #[test]
    fn one_delivery_per_scope_passes_even_across_scopes() {
        let mut h = H::new();
        h.recv(1, 100, "u1", "m1", 1);
        h.recv(2, 101, "u1", "m1", 1); // another device (scope): fine
        h.recv(3, 100, "u1", "m2", 2);
        assert_eq!(check(&Index::new(&h.ops)).valid, Validity::Valid);
    }

    #[test]
    fn a_second_delivery_in_one_scope_fails() {
        let mut h = H::new();
        h.recv(1, 100, "u1", "m1", 1);
        h.recv(2, 100, "u1", "m2", 2);
        h.recv(3, 100, "u1", "m1", 1);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count, 1);
        assert_eq!(r.violations[0].ops, vec![0, 2]);
    }
}
