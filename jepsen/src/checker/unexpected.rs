//! Unexpected: a delivery that no push explains.
//!
//! - `never-pushed`: the msg id was never sent by any client of the run;
//! - `failed-push-delivered`: the push (or publish) definitely failed (`fail`), yet it arrived;
//! - `wrong-user` / `wrong-topic`: it reached a user or topic it was not sent to;
//! - `wrong-seq`: it arrived with a seq other than the one the acknowledgement assigned;
//! - `corrupt`: the receiving client saw a payload other than what was sent (recorded by the
//!   workload as the delivery's `error`).

use super::{CheckResult, Index};
use crate::history::{Type, F};

pub fn check(idx: &Index<'_>) -> CheckResult {
    let mut r = CheckResult::new("unexpected");
    let mut checked = 0u64;
    for o in &idx.recvs {
        checked += 1;
        let Some(msg) = o.value.msg_id.as_deref() else {
            r.violation(
                "never-pushed",
                "a delivery without a msg id".into(),
                vec![o.index],
            );
            continue;
        };
        if let Some(e) = &o.error {
            r.violation("corrupt", format!("{msg}: {e}"), vec![o.index]);
        }
        let Some(s) = idx.sent.get(msg) else {
            r.violation(
                "never-pushed",
                format!(
                    "{msg} delivered to {:?} but never pushed",
                    o.value.user.as_deref().unwrap_or("?")
                ),
                vec![o.index],
            );
            continue;
        };
        let mut ops = vec![o.index, s.pair.invoke.index];
        ops.extend(s.pair.done.map(|d| d.index));
        if s.outcome == Type::Fail {
            r.violation(
                "failed-push-delivered",
                format!(
                    "{msg} was delivered although its {:?} failed: {}",
                    s.f,
                    s.pair.done.and_then(|d| d.error.clone()).unwrap_or_default()
                ),
                ops.clone(),
            );
        }
        match (s.f, o.value.topic.as_deref()) {
            (F::Push, None) => {
                if s.user.as_deref() != o.value.user.as_deref() {
                    r.violation(
                        "wrong-user",
                        format!("{msg} for {:?} delivered to {:?}", s.user, o.value.user),
                        ops.clone(),
                    );
                }
                if let (Some(want), Some(got)) = (s.seq, o.value.seq) {
                    if want != got {
                        r.violation(
                            "wrong-seq",
                            format!("{msg} was acknowledged with seq {want} and delivered with seq {got}"),
                            ops,
                        );
                    }
                }
            }
            (F::Publish | F::Broadcast, Some(t)) => {
                if s.topic.as_deref() != Some(t) {
                    r.violation(
                        "wrong-topic",
                        format!("{msg} for topic {:?} delivered on {t:?}", s.topic),
                        ops.clone(),
                    );
                }
                if let (Some(want), Some(got)) = (s.seq, o.value.topic_seq) {
                    if want != got {
                        r.violation(
                            "wrong-seq",
                            format!("{msg} was acknowledged with topic seq {want} and delivered with {got}"),
                            ops,
                        );
                    }
                }
            }
            (sent_as, got_on) => r.violation(
                "wrong-topic",
                format!("{msg} sent as {sent_as:?} arrived on topic {got_on:?}"),
                ops,
            ),
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
    fn deliveries_of_sent_messages_pass() {
        let mut h = H::new();
        h.pushed(0, 10, "u1", "m1", 1, 5);
        h.push(2, 11, "u1", "m2");
        h.push_done(3, 11, Type::Info, "u1", "m2");
        h.recv(5, 100, "u1", "m1", 1);
        h.recv(6, 100, "u1", "m2", 2);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
    }

    #[test]
    fn unknown_failed_misrouted_and_renumbered_deliveries_fail() {
        let mut h = H::new();
        h.pushed(0, 10, "u1", "m1", 1, 5);
        h.push(2, 11, "u1", "m2");
        h.push_done(3, 11, Type::Fail, "u1", "m2");
        h.recv(5, 100, "u1", "ghost", 9);
        h.recv(6, 100, "u1", "m2", 2);
        h.recv(7, 101, "u2", "m1", 1);
        h.recv(8, 100, "u1", "m1", 3);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid);
        for kind in ["never-pushed", "failed-push-delivered", "wrong-user", "wrong-seq"] {
            assert_eq!(r.count_kind(kind), 1, "{kind}: {r:#?}");
        }
    }
}
