//! Availability: "a majority keeps serving with a minority down". During every fault window, the
//! writes (push, publish, broadcast, kick) sent through nodes on the majority side — the nodes
//! the nemesis recorded as able to reach a quorum — must mostly succeed.
//!
//! The first `grace` of each window does not count (a new leader must be elected and a lost
//! node declared down first). The result is the share of `ok` among those writes; below
//! `Context::availability_min` (with at least `availability_min_ops` writes) it is a violation.
//! Writes on the minority side are reported for information: they are expected to fail or time
//! out.

use super::{CheckResult, Context};
use crate::history::{pairs, Op, Type, F};

/// A period during which a fault was installed, with the majority side.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub start_us: u64,
    pub end_us: u64,
    pub fault: String,
    /// Nodes on the majority side (empty: no quorum anywhere).
    pub majority: Vec<u64>,
}

/// Fault windows from the nemesis lines: a window runs from an installed fault to the next heal;
/// a fault installed inside a window (a mix) starts a new window with its own majority side.
pub fn windows(history: &[Op]) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::new();
    let mut open: Option<Window> = None;
    for p in pairs(history).into_iter().filter(|p| p.invoke.f == F::Nemesis) {
        let Some(done) = p.done else { continue };
        let fault = p.invoke.value.fault.clone().unwrap_or_default();
        if fault == "heal" {
            if let Some(mut w) = open.take() {
                w.end_us = done.time_us;
                out.push(w);
            }
            continue;
        }
        if done.kind != Type::Ok || done.value.reason.as_deref() == Some("skipped") {
            // Indeterminate or skipped: the window (if any) goes on unchanged.
            if done.kind == Type::Info && open.is_none() {
                open = Some(Window {
                    start_us: done.time_us,
                    end_us: u64::MAX,
                    fault,
                    majority: done.value.majority.clone().unwrap_or_default(),
                });
            }
            continue;
        }
        if let Some(mut w) = open.take() {
            w.end_us = done.time_us;
            out.push(w);
        }
        open = Some(Window {
            start_us: done.time_us,
            end_us: u64::MAX,
            fault,
            majority: done.value.majority.clone().unwrap_or_default(),
        });
    }
    if let Some(mut w) = open {
        w.end_us = history.last().map(|o| o.time_us).unwrap_or(w.start_us);
        out.push(w);
    }
    out
}

pub fn check(history: &[Op], ctx: &Context) -> CheckResult {
    let mut r = CheckResult::new("availability");
    let ws = windows(history);
    // The grace applies from the first window of a run of back-to-back windows (a mix).
    let mut starts: Vec<u64> = Vec::with_capacity(ws.len());
    for (i, w) in ws.iter().enumerate() {
        if i > 0 && ws[i - 1].end_us == w.start_us {
            starts.push(starts[i - 1]);
        } else {
            starts.push(w.start_us);
        }
    }
    let (mut maj_ok, mut maj_all, mut min_ok, mut min_all, mut all_ok, mut all) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for p in pairs(history) {
        if !matches!(p.invoke.f, F::Push | F::Publish | F::Broadcast | F::Kick) {
            continue;
        }
        let ok = p.outcome() == Type::Ok;
        all += 1;
        all_ok += ok as u64;
        let t = p.invoke.time_us;
        let Some((i, w)) = ws
            .iter()
            .enumerate()
            .find(|(_, w)| w.start_us <= t && t < w.end_us)
        else {
            continue;
        };
        let Some(node) = p.invoke.node else { continue };
        if w.majority.contains(&node) {
            if t >= starts[i] + ctx.grace_us {
                maj_all += 1;
                maj_ok += ok as u64;
            }
        } else {
            min_all += 1;
            min_ok += ok as u64;
        }
    }
    let share = |ok: u64, n: u64| if n == 0 { None } else { Some(ok as f64 / n as f64) };
    let maj = share(maj_ok, maj_all);
    r.stats = serde_json::json!({
        "fault_windows": ws.len(),
        "fault_seconds": ws.iter().map(|w| (w.end_us.saturating_sub(w.start_us)) as f64 / 1e6).sum::<f64>(),
        "majority_side_writes": maj_all,
        "majority_side_ok_share": maj,
        "minority_side_writes": min_all,
        "minority_side_ok_share": share(min_ok, min_all),
        "all_writes": all,
        "all_ok_share": share(all_ok, all),
    });
    if let Some(s) = maj {
        if maj_all >= ctx.availability_min_ops && s < ctx.availability_min {
            r.violation(
                "unavailable",
                format!(
                    "only {maj_ok} of {maj_all} writes ({:.1}%) on the majority side succeeded during faults (minimum {:.0}%)",
                    s * 100.0,
                    ctx.availability_min * 100.0
                ),
                vec![],
            );
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::Validity;
    use crate::history::{Val, NEMESIS};

    fn fault(h: &mut H, t: u64, name: &str, majority: &[u64]) {
        let v = Val {
            fault: Some(name.into()),
            ..Val::default()
        };
        h.at(t, NEMESIS, Type::Invoke, F::Nemesis, v.clone());
        h.at(
            t,
            NEMESIS,
            Type::Ok,
            F::Nemesis,
            Val {
                majority: Some(majority.to_vec()),
                reason: Some("installed".into()),
                ..v
            },
        );
    }

    fn writes(h: &mut H, from: u64, n: u64, node: u64, kind: Type) {
        for i in 0..n {
            let t = from + i * 10;
            let a = h.at(t, 10, Type::Invoke, F::Push, Val::default());
            h.ops[a as usize].node = Some(node);
            h.at(t + 5, 10, kind, F::Push, Val::default());
        }
    }

    fn ctx() -> Context {
        Context {
            grace_us: 1_000_000,
            availability_min_ops: 5,
            ..Context::default()
        }
    }

    #[test]
    fn windows_follow_the_nemesis() {
        let mut h = H::new();
        fault(&mut h, 1000, "partition-one", &[1, 2]);
        fault(&mut h, 2000, "kill", &[1, 2]);
        fault(&mut h, 3000, "heal", &[]);
        let ws = windows(&h.ops);
        assert_eq!(ws.len(), 2);
        assert_eq!(ws[0].majority, vec![1, 2]);
        assert_eq!(ws[0].end_us, ws[1].start_us);
        assert!((3_000_000..3_000_010).contains(&ws[1].end_us));
    }

    #[test]
    fn a_serving_majority_passes() {
        let mut h = H::new();
        fault(&mut h, 1000, "partition-one", &[1, 2]);
        writes(&mut h, 1100, 5, 3, Type::Info); // minority side, in the grace anyway
        writes(&mut h, 2100, 20, 1, Type::Ok);
        writes(&mut h, 2105, 20, 3, Type::Info);
        fault(&mut h, 3000, "heal", &[]);
        let r = check(&h.ops, &ctx());
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
        assert_eq!(r.stats["majority_side_ok_share"], 1.0);
    }

    #[test]
    fn a_majority_that_stops_serving_fails() {
        let mut h = H::new();
        fault(&mut h, 1000, "partition-one", &[1, 2]);
        writes(&mut h, 2100, 20, 2, Type::Info);
        fault(&mut h, 3000, "heal", &[]);
        let r = check(&h.ops, &ctx());
        assert_eq!(r.valid, Validity::Invalid, "{r:?}");
    }
}
