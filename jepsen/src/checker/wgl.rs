//! A linearizability search in the style of Wing & Gong / Lowe and Porcupine: walk the history's
//! call and return events in time order, linearize a pending call whenever the model accepts it,
//! backtrack at a return whose call is not linearized yet, and remember every (set of
//! linearized ops, model state) already explored so each is explored once.
//!
//! Indeterminate operations (`info`: no return) may take effect at any time after their call, or
//! never: they have no return event, so the search may linearize them anywhere after their call
//! and does not have to linearize them at all. Linearizing one that leaves the state unchanged is
//! skipped (it can always be done later), which keeps many pending `info` ops cheap. Pending
//! `info` ops with equal inputs are interchangeable (neither has a return to respect, and both
//! calls are behind the search's position), so only the earliest of them is tried: this keeps
//! histories with many repeated indeterminate ops (a `NodeDown` per fault, say) from exploring
//! every subset of them.
//!
//! The model may be nondeterministic: `step` returns every state the operation can lead to.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model: Clone + Eq + Hash {
    /// Equal inputs must have equal effects (the search treats pending indeterminate ops with
    /// equal inputs as interchangeable).
    type Input: PartialEq;
    type Output;
    /// The states `input` (returning `output`, if it returned) can lead to from `self`; empty if
    /// it cannot happen here.
    fn step(&self, input: &Self::Input, output: Option<&Self::Output>) -> Vec<Self>;
}

/// One operation of the history to check.
#[derive(Debug, Clone)]
pub struct Entry<I, O> {
    pub call_us: u64,
    /// `None`: indeterminate, never returned.
    pub ret_us: Option<u64>,
    pub input: I,
    pub output: Option<O>,
    /// Where it came from (a history index), for reports.
    pub id: u64,
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Linearizable,
    /// No order works. `stuck` is the id of the operation that could not be placed in the
    /// deepest attempt; `prefix` the ids linearized before it there, in order.
    Illegal {
        stuck: u64,
        prefix: Vec<u64>,
    },
    /// The search budget ran out.
    Unknown,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn unset(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn with(&self, i: usize) -> Bits {
        let mut b = self.clone();
        b.set(i);
        b
    }
}

struct Ev {
    op: usize,
    call: bool,
}

struct Frame<M> {
    call_ev: usize,
    prev: M,
    /// Other states the op could have led to, not tried yet.
    alts: Vec<M>,
}

/// Checks `entries` against the model starting at `init`, exploring at most `budget` steps.
pub fn check<M: Model>(init: M, entries: &[Entry<M::Input, M::Output>], budget: u64) -> Outcome {
    let n = entries.len();
    // Events sorted by time; at equal times calls come first (the ops are then concurrent).
    let mut evs: Vec<(u64, u8, usize, bool)> = Vec::with_capacity(2 * n);
    for (i, e) in entries.iter().enumerate() {
        evs.push((e.call_us, 0, i, true));
        if let Some(r) = e.ret_us {
            evs.push((r.max(e.call_us), 1, i, false));
        }
    }
    evs.sort();
    let events: Vec<Ev> = evs.iter().map(|&(_, _, op, call)| Ev { op, call }).collect();
    let m = events.len();
    // A doubly linked list over the events; index `m` is the head sentinel, END the end.
    const END: usize = usize::MAX;
    let head = m;
    let mut next = vec![END; m + 1];
    let mut prev = vec![head; m + 1];
    for i in 0..m {
        next[i] = if i + 1 < m { i + 1 } else { END };
        prev[i] = if i == 0 { head } else { i - 1 };
    }
    next[head] = if m > 0 { 0 } else { END };
    let mut ret_ev: Vec<Option<usize>> = vec![None; n];
    for (i, e) in events.iter().enumerate() {
        if !e.call {
            ret_ev[e.op] = Some(i);
        }
    }
    let info = |op: usize| entries[op].ret_us.is_none();

    let unlink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != END {
            prev[nx] = p;
        }
    };
    let relink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != END {
            prev[nx] = i;
        }
    };

    // Is there an `info` op with the same input among the call events before `at` in the list?
    // (Everything before the search's position is a call not linearized yet.)
    let equal_info_pending_before = |at: usize, next: &Vec<usize>| {
        let op = events[at].op;
        let mut i = next[head];
        while i != at && i != END {
            let o = events[i].op;
            if info(o) && entries[o].input == entries[op].input {
                return true;
            }
            i = next[i];
        }
        false
    };
    let mut remaining = entries.iter().filter(|e| e.ret_us.is_some()).count();
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, M)> = HashSet::new();
    let mut stack: Vec<Frame<M>> = Vec::new();
    let mut state = init;
    let mut entry = next[head];
    let mut steps = 0u64;
    let mut best: (usize, usize) = (0, usize::MAX); // (depth, stuck op)
    let mut best_prefix: Vec<usize> = Vec::new();

    loop {
        if remaining == 0 {
            return Outcome::Linearizable;
        }
        steps += 1;
        if steps > budget {
            return Outcome::Unknown;
        }
        let at_call = entry != END && events[entry].call;
        if at_call {
            let op = events[entry].op;
            if info(op) && equal_info_pending_before(entry, &next) {
                entry = next[entry];
                continue;
            }
            let mut alts: Vec<M> = state.step(&entries[op].input, entries[op].output.as_ref());
            if info(op) {
                alts.retain(|s| *s != state);
            }
            let lin2 = linearized.with(op);
            let mut chosen = None;
            while let Some(s2) = alts.pop() {
                if cache.insert((lin2.clone(), s2.clone())) {
                    chosen = Some(s2);
                    break;
                }
            }
            match chosen {
                Some(s2) => {
                    let prev_state = std::mem::replace(&mut state, s2);
                    stack.push(Frame {
                        call_ev: entry,
                        prev: prev_state,
                        alts,
                    });
                    linearized.set(op);
                    unlink(entry, &mut next, &mut prev);
                    if let Some(r) = ret_ev[op] {
                        unlink(r, &mut next, &mut prev);
                        remaining -= 1;
                    }
                    entry = next[head];
                }
                None => entry = next[entry],
            }
            continue;
        }
        // A return of an op not linearized yet (or the end): backtrack.
        if entry != END && stack.len() >= best.0 {
            best = (stack.len(), events[entry].op);
            best_prefix = stack.iter().map(|f| events[f.call_ev].op).collect();
        }
        // Backtrack one level: undo the last linearized op and try its next alternative state,
        // or move on to the entry after it.
        let Some(mut f) = stack.pop() else {
            let stuck = entries.get(best.1).map(|e| e.id).unwrap_or(0);
            return Outcome::Illegal {
                stuck,
                prefix: best_prefix.iter().map(|&o| entries[o].id).collect(),
            };
        };
        let op = events[f.call_ev].op;
        if let Some(r) = ret_ev[op] {
            relink(r, &mut next, &mut prev);
            remaining += 1;
        }
        relink(f.call_ev, &mut next, &mut prev);
        linearized.unset(op);
        state = f.prev.clone();
        let lin2 = linearized.with(op);
        let mut chosen = None;
        while let Some(s2) = f.alts.pop() {
            if cache.insert((lin2.clone(), s2.clone())) {
                chosen = Some(s2);
                break;
            }
        }
        if let Some(s2) = chosen {
            state = s2;
            linearized.set(op);
            unlink(f.call_ev, &mut next, &mut prev);
            if let Some(r) = ret_ev[op] {
                unlink(r, &mut next, &mut prev);
                remaining -= 1;
            }
            entry = next[head];
            stack.push(f);
        } else {
            entry = next[f.call_ev];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register holding one integer: write(v), read() -> v, cas(a, b).
    #[derive(Clone, PartialEq, Eq, Hash, Debug)]
    struct Reg(i64);

    #[derive(Debug, Clone, PartialEq)]
    enum In {
        Write(i64),
        Read,
        Cas(i64, i64),
    }

    impl Model for Reg {
        type Input = In;
        type Output = i64;
        fn step(&self, input: &In, output: Option<&i64>) -> Vec<Reg> {
            match input {
                In::Write(v) => vec![Reg(*v)],
                In::Read => match output {
                    Some(v) if *v != self.0 => vec![],
                    _ => vec![self.clone()],
                },
                In::Cas(a, b) => {
                    let ok = self.0 == *a;
                    match output {
                        Some(1) if !ok => vec![],
                        Some(0) if ok => vec![],
                        Some(_) => vec![if ok { Reg(*b) } else { self.clone() }],
                        // Indeterminate: either it happened or it did not.
                        None if ok => vec![Reg(*b)],
                        None => vec![],
                    }
                }
            }
        }
    }

    fn e(call: u64, ret: Option<u64>, input: In, output: Option<i64>) -> Entry<In, i64> {
        Entry {
            call_us: call,
            ret_us: ret,
            input,
            output,
            id: call,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            e(0, Some(1), In::Write(1), None),
            e(2, Some(3), In::Read, Some(1)),
            e(4, Some(5), In::Cas(1, 2), Some(1)),
            e(6, Some(7), In::Read, Some(2)),
        ];
        assert_eq!(check(Reg(0), &h, 10_000), Outcome::Linearizable);
    }

    #[test]
    fn concurrent_ops_may_reorder() {
        // The read overlaps both writes, so it may see either.
        let h = vec![
            e(0, Some(10), In::Write(1), None),
            e(1, Some(11), In::Write(2), None),
            e(2, Some(12), In::Read, Some(1)),
            e(13, Some(14), In::Read, Some(1)),
        ];
        assert_eq!(check(Reg(0), &h, 10_000), Outcome::Linearizable);
    }

    #[test]
    fn stale_read_is_not_linearizable() {
        let h = vec![
            e(0, Some(1), In::Write(1), None),
            e(2, Some(3), In::Write(2), None),
            e(4, Some(5), In::Read, Some(1)),
        ];
        match check(Reg(0), &h, 10_000) {
            Outcome::Illegal { stuck, .. } => assert_eq!(stuck, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn read_of_a_value_never_written_is_not_linearizable() {
        let h = vec![
            e(0, Some(5), In::Write(1), None),
            e(1, Some(6), In::Read, Some(3)),
        ];
        assert!(matches!(check(Reg(0), &h, 10_000), Outcome::Illegal { .. }));
    }

    #[test]
    fn indeterminate_ops_may_apply_late_or_never() {
        // A timed-out write of 7 shows up later...
        let late = vec![
            e(0, None, In::Write(7), None),
            e(5, Some(6), In::Read, Some(0)),
            e(10, Some(11), In::Read, Some(7)),
        ];
        assert_eq!(check(Reg(0), &late, 10_000), Outcome::Linearizable);
        // ...or never.
        let never = vec![e(0, None, In::Write(7), None), e(5, Some(6), In::Read, Some(0))];
        assert_eq!(check(Reg(0), &never, 10_000), Outcome::Linearizable);
        // But not before it was called.
        let early = vec![e(0, Some(1), In::Read, Some(7)), e(5, None, In::Write(7), None)];
        assert!(matches!(check(Reg(0), &early, 10_000), Outcome::Illegal { .. }));
    }

    #[test]
    fn cas_semantics_are_enforced() {
        // Two successful CAS(0 -> x) cannot both linearize.
        let h = vec![
            e(0, Some(10), In::Cas(0, 1), Some(1)),
            e(1, Some(11), In::Cas(0, 2), Some(1)),
        ];
        assert!(matches!(check(Reg(0), &h, 10_000), Outcome::Illegal { .. }));
    }

    /// 12 timed-out writes of 1 and 12 of 2, then reads that alternate: each switch needs a
    /// pending write of the other value. Without treating equal pending writes as one, the
    /// search would try every subset of them (2^24) before it could say no.
    fn alternating_reads(reads: usize) -> Vec<Entry<In, i64>> {
        let mut h: Vec<_> = (0..24)
            .map(|i| e(i, None, In::Write(1 + (i as i64 % 2)), None))
            .collect();
        for r in 0..reads as u64 {
            h.push(e(
                100 + 2 * r,
                Some(101 + 2 * r),
                In::Read,
                Some(1 + (r as i64 % 2)),
            ));
        }
        h
    }

    #[test]
    fn equal_pending_info_ops_are_tried_once() {
        assert_eq!(
            check(Reg(0), &alternating_reads(24), 100_000),
            Outcome::Linearizable
        );
        // 25 alternating reads need 13 writes of 1: there are 12.
        assert!(matches!(
            check(Reg(0), &alternating_reads(25), 100_000),
            Outcome::Illegal { .. }
        ));
    }

    #[test]
    fn the_budget_gives_unknown() {
        let h: Vec<_> = (0..40)
            .map(|i| e(i, Some(1000 + i), In::Write(i as i64), None))
            .chain([e(2000, Some(2001), In::Read, Some(-1))])
            .collect();
        assert_eq!(check(Reg(0), &h, 50), Outcome::Unknown);
    }
}
