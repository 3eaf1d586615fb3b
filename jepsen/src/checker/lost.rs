//! Lost: an acknowledged (`ok`) QoS-1 push that no device of its user was ever handed, after
//! every fault was healed and the clients drained; and an acknowledged topic publish or broadcast
//! that a subscriber whose subscription covered it never got.
//!
//! Not losses: indeterminate (`info`) pushes, and messages the SDK reported as a gap that a cap or
//! a TTL could have caused (counted in `stats.excused_by_gap`):
//! - `EXPIRED` only once the message's TTL had passed by the harness's clock, less
//!   [`EXPIRY_SLACK_MS`], since the invocation of its push. Earlier, the cluster's log time ran
//!   ahead of real time: `expired-early`, however the gap was reported.
//! - `TRIMMED` only when the stream got more messages than the suite's caps
//!   ([`SUITE_CAP`]): never in a run of this size, so `trimmed-under-cap`.
//! - Any other reason (`TOO_LARGE`, unknown): `gap-unexplained`; the suite's payloads are tiny.
//!
//! A push to a user none of whose devices ever connected cannot be judged
//! (`stats.unverifiable`).

use std::collections::{HashMap, HashSet};

use super::{CheckResult, Index, Sent};
use crate::history::{Type, F};

/// How early an `EXPIRED` gap may come, by the harness's clock, before it counts as early: the
/// clock nemesis skews one or two nodes by up to 120 s (which can move the median of three
/// clocks by as much), plus the harness's own timing. Hour-scale skews (one node) must not show.
pub const EXPIRY_SLACK_MS: u64 = 130_000;

/// The suite app's mailbox cap and topic retention (`Cluster::create_app`).
pub const SUITE_CAP: u64 = 1_000_000;

/// The server's default TTL (`AppLimits::default`): a push sent without one.
const DEFAULT_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// A reported gap: seqs `[from, to]`, why, and when the client was told.
#[derive(Clone, Copy)]
struct GapSeen<'a> {
    from: u64,
    to: u64,
    reason: Option<&'a str>,
    time_us: u64,
    index: u64,
}

/// What a gap covering an acknowledged message says about it.
enum Excuse {
    /// No gap covers it.
    None,
    /// A cap or the TTL could have caused the gap.
    Excused,
    /// A gap covers it that nothing the suite does could have caused: (kind, detail, gap op).
    Bad(&'static str, String, u64),
}

/// Judges the gaps covering `seq` of a stream for the message `s` (`count`: messages the stream
/// was sent).
fn excuse(gaps: Option<&Vec<GapSeen<'_>>>, s: &Sent<'_>, msg: &str, count: u64) -> Excuse {
    let Some(seq) = s.seq else { return Excuse::None };
    let Some(g) = gaps.and_then(|v| v.iter().find(|g| g.from <= seq && seq <= g.to)) else {
        return Excuse::None;
    };
    match g.reason {
        Some("Expired") => {
            let ttl = s.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
            let sent_us = s.pair.invoke.time_us;
            let earliest_us = sent_us
                .saturating_add(ttl.saturating_mul(1000))
                .saturating_sub(EXPIRY_SLACK_MS * 1000);
            if g.time_us >= earliest_us {
                Excuse::Excused
            } else {
                Excuse::Bad(
                    "expired-early",
                    format!(
                        "{msg} (seq {seq}) was reported EXPIRED {:.1} s after it was sent with a TTL of {} s",
                        g.time_us.saturating_sub(sent_us) as f64 / 1e6,
                        ttl / 1000
                    ),
                    g.index,
                )
            }
        }
        Some("Trimmed") if count > SUITE_CAP => Excuse::Excused,
        Some("Trimmed") => Excuse::Bad(
            "trimmed-under-cap",
            format!("{msg} (seq {seq}) was reported TRIMMED, but its stream got {count} messages, under the cap of {SUITE_CAP}"),
            g.index,
        ),
        other => Excuse::Bad(
            "gap-unexplained",
            format!("{msg} (seq {seq}) fell in a gap of reason {other:?}, which nothing in the suite causes"),
            g.index,
        ),
    }
}

/// Applies what a covering gap says about `s`: true when it settled the message (excused, or a
/// violation recorded), false when no gap covers it.
fn settle(r: &mut CheckResult, excused: &mut u64, e: Excuse, s: &Sent<'_>) -> bool {
    match e {
        Excuse::None => false,
        Excuse::Excused => {
            *excused += 1;
            true
        }
        Excuse::Bad(kind, detail, gap) => {
            r.violation(kind, detail, vec![s.pair.invoke.index, gap]);
            true
        }
    }
}

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
    let mut gaps: HashMap<GapScope<'_>, Vec<GapSeen<'_>>> = HashMap::new();
    for o in idx.history.iter().filter(|o| o.f == F::Gap) {
        let (Some(a), Some(b)) = (o.value.from_seq, o.value.to_seq) else {
            continue;
        };
        let key = match o.value.topic.as_deref() {
            None => (o.value.user.as_deref(), None, None),
            Some(t) => (None, o.value.scope, Some(t)),
        };
        gaps.entry(key).or_default().push(GapSeen {
            from: a,
            to: b,
            reason: o.value.reason.as_deref(),
            time_us: o.time_us,
            index: o.index,
        });
    }
    // Messages sent per stream (any outcome): what a cap would be measured against.
    let mut per_user: HashMap<&str, u64> = HashMap::new();
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    for s in idx.sent.values() {
        match (s.f, s.user.as_deref(), s.topic.as_deref()) {
            (F::Push, Some(u), _) => *per_user.entry(u).or_default() += 1,
            (F::Publish | F::Broadcast, _, Some(t)) => *per_topic.entry(t).or_default() += 1,
            _ => {}
        }
    }
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
        let count = per_user.get(user).copied().unwrap_or(0);
        let e = excuse(gaps.get(&(Some(user), None, None)), s, msg, count);
        if settle(&mut r, &mut excused, e, s) {
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
            let count = per_topic.get(topic).copied().unwrap_or(0);
            let e = excuse(gaps.get(&(None, Some(*scope), Some(topic))), s, msg, count);
            if settle(&mut r, &mut excused, e, s) {
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
                reason: Some("Expired".into()),
                ..Val::default()
            },
        );
        // m3 was sent at 14 ms with a TTL of 60 s; reported expired at 200 s: excused.
        let mut late = h.clone();
        late.ops
            .iter_mut()
            .filter(|o| o.f == F::Push)
            .for_each(|o| o.value.ttl_ms = Some(60_000));
        late.ops.last_mut().unwrap().time_us = 200_000_000;
        let r = check(&Index::new(&late.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
        assert_eq!(r.stats["excused_by_gap"], 1);
        assert_eq!(r.stats["indeterminate_pushes"], 1);
        // With the default TTL (days), EXPIRED 20 ms after the push is early.
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid, "{r:?}");
        assert_eq!(r.violations[0].kind, "expired-early", "{r:?}");
    }

    #[test]
    fn an_expiry_or_a_trim_nothing_could_cause_is_a_violation() {
        let gap = |reason: &str, at_ms: u64| {
            let mut h = H::new();
            h.connected(0, 100, "u1", "d", 5, 1);
            h.pushed(10, 10, "u1", "m1", 1, 7);
            for o in h.ops.iter_mut().filter(|o| o.f == F::Push) {
                o.value.ttl_ms = Some(600_000);
            }
            h.at(
                at_ms,
                100,
                Type::Ok,
                F::Gap,
                Val {
                    user: Some("u1".into()),
                    client: Some(100),
                    from_seq: Some(1),
                    to_seq: Some(1),
                    reason: Some(reason.into()),
                    ..Val::default()
                },
            );
            check(&Index::new(&h.ops))
        };
        // A 10-minute TTL reported expired 20 s later (a leader an hour ahead did this).
        let r = gap("Expired", 20_000);
        assert_eq!(r.valid, Validity::Invalid, "{r:?}");
        assert_eq!(r.violations[0].kind, "expired-early");
        assert!(r.violations[0].detail.contains("TTL of 600 s"), "{r:?}");
        // Within the slack of the TTL: excused.
        let r = gap("Expired", 600_000 - EXPIRY_SLACK_MS + 1_000);
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
        // One message cannot overflow a cap of a million.
        assert_eq!(gap("Trimmed", 30_000).violations[0].kind, "trimmed-under-cap");
        assert_eq!(gap("Unspecified", 30_000).violations[0].kind, "gap-unexplained");
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
