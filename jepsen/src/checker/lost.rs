//! Lost: an acknowledged (`ok`) QoS-1 push that no device of its user was ever handed, after
//! every fault was healed and the clients drained; and an acknowledged topic publish or broadcast
//! that a subscriber whose subscription covered it never got.
//!
//! Not losses: indeterminate (`info`) pushes, and messages the SDK reported as a gap (trimmed by
//! a cap or expired: counted in `stats.excused_by_gap`; the suite's app has caps far above what a
//! run pushes). A push to a user none of whose devices ever connected cannot be judged
//! (`stats.unverifiable`).

use std::collections::{HashMap, HashSet};

use super::{CheckResult, Index};
use crate::history::{Type, F};

pub fn check(idx: &Index<'_>) -> CheckResult {
    let mut r = CheckResult::new("lost");
    // Mailbox deliveries: (user, msg id).
    let mut got: HashSet<(&str, &str)> = HashSet::new();
    // Topic deliveries: (scope, msg id).
    let mut got_topic: HashSet<(u64, &str)> = HashSet::new();
    for o in &idx.recvs {
        let (Some(u), Some(m)) = (o.value.user.as_deref(), o.value.msg_id.as_deref()) else {
            continue;
        };
        if o.value.topic.is_some() {
            if let Some(s) = o.value.scope {
                got_topic.insert((s, m));
            }
        } else {
            got.insert((u, m));
        }
    }
    // Gaps: mailbox per user, topics per scope.
    let mut gaps: HashMap<GapScope<'_>, Vec<(u64, u64)>> = HashMap::new();
    for o in idx.history.iter().filter(|o| o.f == F::Gap) {
        let (Some(a), Some(b)) = (o.value.from_seq, o.value.to_seq) else {
            continue;
        };
        let key = match o.value.topic.as_deref() {
            None => (o.value.user.as_deref(), None, None),
            Some(t) => (None, o.value.scope, Some(t)),
        };
        gaps.entry(key).or_default().push((a, b));
    }
    let covered = |key: (Option<&str>, Option<u64>, Option<&str>), seq: Option<u64>| {
        seq.is_some_and(|s| {
            gaps.get(&key)
                .is_some_and(|v| v.iter().any(|(a, b)| *a <= s && s <= *b))
        })
    };
    let users_with_clients: HashSet<&str> = idx.clients.values().map(|(u, _, _)| u.as_str()).collect();

    let (mut checked, mut excused, mut unverifiable, mut indeterminate) = (0u64, 0u64, 0u64, 0u64);
    let mut sent: Vec<_> = idx.sent.iter().collect();
    sent.sort_by_key(|(_, s)| s.pair.invoke.index);
    for (msg, s) in &sent {
        if s.f != F::Push {
            continue;
        }
        if s.outcome != Type::Ok {
            if s.outcome == Type::Info {
                indeterminate += 1;
            }
            continue;
        }
        let Some(user) = s.user.as_deref() else { continue };
        if !users_with_clients.contains(user) {
            unverifiable += 1;
            continue;
        }
        checked += 1;
        if got.contains(&(user, msg.as_str())) {
            continue;
        }
        if covered((Some(user), None, None), s.seq) {
            excused += 1;
            continue;
        }
        let mut ops = vec![s.pair.invoke.index];
        ops.extend(s.pair.done.map(|d| d.index));
        r.violation(
            "lost-push",
            format!(
                "push {msg} to {user} was acknowledged (seq {:?}, log index {:?}) and never delivered",
                s.seq, s.log_index
            ),
            ops,
        );
    }

    // Topic subscribers: scope → topic → (coverage start seq, time of that SUBSCRIBED).
    let mut starts: HashMap<u64, HashMap<&str, (u64, u64)>> = HashMap::new();
    for o in idx.history.iter().filter(|o| o.f == F::Subscribed) {
        let (Some(scope), Some(t), Some(seq)) = (o.value.scope, o.value.topic.as_deref(), o.value.seq) else {
            continue;
        };
        starts
            .entry(scope)
            .or_default()
            .entry(t)
            .or_insert((seq, o.time_us));
    }
    // A scope is judged only if one of its clients was still open when the drain ended.
    let mut ended: HashMap<u64, u64> = HashMap::new();
    for o in idx
        .history
        .iter()
        .filter(|o| matches!(o.f, F::Closed | F::Kicked))
    {
        if let Some(c) = o.value.client {
            ended.entry(c).or_insert(o.time_us);
        }
    }
    let alive: HashSet<u64> = idx
        .clients
        .iter()
        .filter(|(c, _)| ended.get(c).is_none_or(|t| *t >= idx.drain_end_us))
        .map(|(_, (_, _, scope))| *scope)
        .collect();
    let mut topic_checked = 0u64;
    for (msg, s) in &sent {
        if !matches!(s.f, F::Publish | F::Broadcast) || s.outcome != Type::Ok {
            continue;
        }
        let Some(topic) = s.topic.as_deref() else { continue };
        let mut scopes: Vec<_> = starts.iter().collect();
        scopes.sort_by_key(|(k, _)| **k);
        for (scope, topics) in scopes {
            let Some(&(start, at)) = topics.get(topic) else {
                continue;
            };
            if !alive.contains(scope) {
                continue;
            }
            let in_coverage = match s.seq {
                Some(seq) => seq > start,
                None => s.pair.invoke.time_us > at,
            };
            if !in_coverage {
                continue;
            }
            topic_checked += 1;
            if got_topic.contains(&(*scope, msg.as_str())) {
                continue;
            }
            if covered((None, Some(*scope), Some(topic)), s.seq) {
                excused += 1;
                continue;
            }
            r.violation(
                "lost-publish",
                format!(
                    "{msg} on topic {topic} (topic seq {:?}) was acknowledged and never reached subscriber scope {scope} (subscribed at seq {start})",
                    s.seq
                ),
                vec![s.pair.invoke.index],
            );
        }
    }
    r.stats = serde_json::json!({
        "acked_pushes_checked": checked,
        "topic_deliveries_checked": topic_checked,
        "excused_by_gap": excused,
        "unverifiable": unverifiable,
        "indeterminate_pushes": indeterminate,
    });
    if checked + topic_checked == 0 {
        r.unknown("no acknowledged push or publish was checked".into());
    }
    r
}

/// Where a gap was reported: (user, session, topic).
type GapScope<'a> = (Option<&'a str>, Option<u64>, Option<&'a str>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::{Index, Validity};
    use crate::history::{Type, Val, F};

    #[test]
    fn every_acked_push_delivered_passes() {
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.pushed(10, 10, "u1", "m1", 1, 7);
        h.pushed(12, 10, "u1", "m2", 2, 8);
        h.recv(20, 100, "u1", "m1", 1);
        h.recv(21, 100, "u1", "m2", 2);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
    }

    #[test]
    fn nothing_checked_is_unknown_not_valid() {
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.push(10, 10, "u1", "m1");
        h.push_done(11, 10, Type::Info, "u1", "m1");
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Unknown, "{r:?}");
        assert_eq!(check(&Index::new(&Vec::new())).valid, Validity::Unknown);
    }

    #[test]
    fn an_acked_push_never_delivered_is_lost() {
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.pushed(10, 10, "u1", "m1", 1, 7);
        h.pushed(12, 10, "u1", "m2", 2, 8);
        h.recv(20, 100, "u1", "m1", 1);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count, 1);
        assert!(r.violations[0].detail.contains("m2"), "{r:?}");
    }

    #[test]
    fn indeterminate_pushes_are_not_losses_and_gaps_excuse() {
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.push(10, 10, "u1", "m1");
        h.push_done(11, 10, Type::Info, "u1", "m1");
        h.push(12, 11, "u1", "m2");
        h.push_done(13, 11, Type::Fail, "u1", "m2");
        h.pushed(14, 12, "u1", "m3", 3, 9);
        h.at(
            20,
            100,
            Type::Ok,
            F::Gap,
            Val {
                user: Some("u1".into()),
                client: Some(100),
                from_seq: Some(1),
                to_seq: Some(3),
                ..Val::default()
            },
        );
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
        assert_eq!(r.stats["excused_by_gap"], 1);
        assert_eq!(r.stats["indeterminate_pushes"], 1);
    }

    #[test]
    fn topic_publishes_must_reach_covering_subscribers() {
        let mut h = H::new();
        h.connected(0, 100, "sub100", "d", 5, 1);
        h.at(
            1,
            100,
            Type::Ok,
            F::Subscribed,
            Val {
                client: Some(100),
                scope: Some(100),
                topic: Some("t".into()),
                seq: Some(4),
                ..Val::default()
            },
        );
        for (i, m) in ["p5", "p6"].iter().enumerate() {
            let v = Val {
                topic: Some("t".into()),
                msg_id: Some(m.to_string()),
                ..Val::default()
            };
            h.at(10 + i as u64 * 2, 10, Type::Invoke, F::Publish, v.clone());
            h.at(
                11 + i as u64 * 2,
                10,
                Type::Ok,
                F::Publish,
                Val {
                    topic_seq: Some(5 + i as u64),
                    ..v
                },
            );
        }
        // Published before the subscription: not covered.
        let v = Val {
            topic: Some("t".into()),
            msg_id: Some("p4".into()),
            ..Val::default()
        };
        h.at(20, 11, Type::Invoke, F::Publish, v.clone());
        h.at(
            21,
            11,
            Type::Ok,
            F::Publish,
            Val {
                topic_seq: Some(4),
                ..v
            },
        );
        h.topic_recv(30, 100, "t", "p5", 5);
        let mut ok = H::new();
        ok.ops = h.ops.clone();
        ok.topic_recv(31, 100, "t", "p6", 6);
        assert_eq!(check(&Index::new(&ok.ops)).valid, Validity::Valid);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count, 1);
        assert!(r.violations[0].detail.contains("p6"));
    }
}
