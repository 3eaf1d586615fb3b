//! Order and gaps: within one dedupe scope, mailbox messages arrive in strictly increasing seq
//! and each topic's messages in strictly increasing topic seq; and a jump in seq is either
//! reported by the SDK as a gap (`Event::Gap`) or a violation.
//!
//! A stream's first position is its first delivery, or for a topic the seq its first SUBSCRIBED
//! named (messages after it must all arrive). Mailbox seqs are per user and gapless as assigned,
//! and the suite never pushes to single devices, so every seq is for every device.
//!
//! Instances of one device that share its durable store (the storm workload logs a device in
//! again as a new instance on the same store) resume from the store's cursor: a mailbox jump over
//! seqs that another instance of the same (user, device) had already been handed is a resume,
//! not a gap.

use std::collections::HashMap;

use super::{CheckResult, Index};
use crate::history::F;

/// A delivery stream: (scope, topic or None for the mailbox).
type Stream<'a> = (u64, Option<&'a str>);
/// (user, device, seq) → the scopes handed it, with the history index of each delivery.
type Handed<'a> = HashMap<(&'a str, &'a str, u64), Vec<(u64, u64)>>;

pub fn check(idx: &Index<'_>) -> CheckResult {
    let mut r = CheckResult::new("order");
    let mut last: HashMap<Stream<'_>, (u64, u64)> = HashMap::new();
    let mut gaps: HashMap<Stream<'_>, Vec<(u64, u64)>> = HashMap::new();
    let mut checked = 0u64;
    let mut handed: Handed<'_> = HashMap::new();
    for o in idx.history {
        if o.f != F::Recv || o.value.topic.is_some() {
            continue;
        }
        if let (Some(u), Some(d), Some(seq), Some(scope)) = (
            o.value.user.as_deref(),
            o.value.device.as_deref(),
            o.value.seq,
            o.value.scope.or(o.value.client),
        ) {
            handed.entry((u, d, seq)).or_default().push((scope, o.index));
        }
    }
    let resumed = |user: Option<&str>, device: Option<&str>, scope: u64, a: u64, b: u64, at: u64| {
        let (Some(u), Some(d)) = (user, device) else {
            return false;
        };
        (a..=b).all(|seq| {
            handed
                .get(&(u, d, seq))
                .is_some_and(|v| v.iter().any(|&(sc, i)| sc != scope && i < at))
        })
    };
    for o in idx.history {
        let Some(scope) = o.value.scope.or(o.value.client) else {
            continue;
        };
        let topic = o.value.topic.as_deref();
        match o.f {
            F::Gap => {
                if let (Some(a), Some(b)) = (o.value.from_seq, o.value.to_seq) {
                    gaps.entry((scope, topic)).or_default().push((a, b));
                }
            }
            F::Subscribed => {
                if let (Some(t), Some(seq)) = (topic, o.value.seq) {
                    last.entry((scope, Some(t))).or_insert((seq, o.index));
                }
            }
            F::Recv => {
                let seq = match topic {
                    None => o.value.seq,
                    Some(_) => o.value.topic_seq,
                };
                let Some(seq) = seq.filter(|s| *s > 0) else {
                    continue;
                };
                checked += 1;
                let key = (scope, topic);
                if let Some(&(prev, prev_op)) = last.get(&key) {
                    if seq <= prev {
                        r.violation(
                            "out-of-order",
                            format!(
                                "{} seq {seq} after {prev} in scope {scope} ({})",
                                stream_name(topic),
                                o.value.msg_id.as_deref().unwrap_or("?")
                            ),
                            vec![prev_op, o.index],
                        );
                        continue;
                    }
                    if seq > prev + 1 {
                        let reported = gaps.get(&key).is_some_and(|g| covers(g, prev + 1, seq - 1));
                        let resume = topic.is_none()
                            && resumed(
                                o.value.user.as_deref(),
                                o.value.device.as_deref(),
                                scope,
                                prev + 1,
                                seq - 1,
                                o.index,
                            );
                        if !reported && !resume {
                            r.violation(
                                "gap",
                                format!(
                                    "{} of scope {scope} jumped from seq {prev} to {seq} without a GAP",
                                    stream_name(topic)
                                ),
                                vec![prev_op, o.index],
                            );
                        }
                    }
                }
                last.insert(key, (seq, o.index));
            }
            _ => {}
        }
    }
    if checked == 0 {
        r.unknown("no delivery to check".into());
    }
    r.stats["deliveries_checked"] = checked.into();
    r
}

fn stream_name(topic: Option<&str>) -> String {
    match topic {
        None => "mailbox".into(),
        Some(t) => format!("topic {t}"),
    }
}

/// Whether the reported gaps cover every seq in `[a, b]`.
fn covers(gaps: &[(u64, u64)], a: u64, b: u64) -> bool {
    let mut sorted: Vec<(u64, u64)> = gaps.to_vec();
    sorted.sort();
    let mut next = a;
    for (x, y) in sorted {
        if x <= next && y >= next {
            next = y.saturating_add(1);
        }
        if next > b {
            return true;
        }
    }
    next > b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::{Index, Validity};
    use crate::history::{Type, Val};

    #[test]
    fn increasing_gapless_streams_pass() {
        let mut h = H::new();
        h.recv(1, 100, "u1", "m3", 3);
        h.recv(2, 100, "u1", "m4", 4);
        h.recv(3, 101, "u2", "x1", 1);
        h.recv(4, 100, "u1", "m5", 5);
        // A reported gap excuses the jump.
        h.at(
            5,
            100,
            Type::Ok,
            F::Gap,
            Val {
                client: Some(100),
                scope: Some(100),
                from_seq: Some(6),
                to_seq: Some(7),
                ..Val::default()
            },
        );
        h.recv(6, 100, "u1", "m8", 8);
        h.topic_recv(7, 100, "t", "t1", 1);
        h.topic_recv(8, 100, "t", "t2", 2);
        assert_eq!(check(&Index::new(&h.ops)).valid, Validity::Valid);
    }

    #[test]
    fn nothing_checked_is_unknown_not_valid() {
        let r = check(&Index::new(&Vec::new()));
        assert_eq!(r.valid, Validity::Unknown, "{r:?}");
        assert_eq!(r.stats["deliveries_checked"], 0);
    }

    #[test]
    fn reordering_and_silent_gaps_fail() {
        let mut h = H::new();
        h.recv(1, 100, "u1", "m3", 3);
        h.recv(2, 100, "u1", "m2", 2);
        h.recv(3, 100, "u1", "m6", 6);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count_kind("out-of-order"), 1, "{r:#?}");
        assert_eq!(r.count_kind("gap"), 1, "{r:#?}");
    }

    #[test]
    fn resuming_from_a_store_another_instance_advanced_passes() {
        let mut h = H::new();
        // Instances 100 and 101 of u1/d share a store: 101 was handed 4 and 5, then 100 resumes.
        h.recv(1, 100, "u1", "m3", 3);
        h.recv(2, 101, "u1", "m4", 4);
        h.recv(3, 101, "u1", "m5", 5);
        h.recv(4, 100, "u1", "m6", 6);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:#?}");
        // A seq no instance was handed before the jump is still a silent gap.
        h.recv(5, 100, "u1", "m8", 8);
        h.recv(6, 101, "u1", "m7", 7);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.count_kind("gap"), 1, "{r:#?}");
    }

    #[test]
    fn a_topic_stream_starts_at_its_subscription() {
        let mut h = H::new();
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
        h.topic_recv(2, 100, "t", "t6", 6);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.count_kind("gap"), 1, "{r:#?}");
    }

    #[test]
    fn gap_cover() {
        assert!(covers(&[(3, 4), (5, 9)], 3, 9));
        assert!(covers(&[(1, 10)], 3, 9));
        assert!(!covers(&[(3, 4), (6, 9)], 3, 9));
        assert!(!covers(&[], 3, 3));
    }
}
