//! Cluster time: the time a leader stamps on each entry it proposes (`Request::ts_ms`), which the
//! state machine turns into log time (`max(previous log time, ts_ms)`) and judges TTLs by.
//!
//! One node's wall clock must not be able to move it. A leader whose clock runs an hour ahead
//! would otherwise stamp entries an hour ahead: log time jumps, every message whose TTL is under
//! an hour expires at once, and since log time never goes back it stays an hour ahead for the
//! whole cluster after that leader is gone. So the leader does not stamp its own clock. It stamps
//! an estimate made from every voter's clock:
//!
//! - Each member answers the peer monitor's probe (every second, on every node) with its wall
//!   clock (`ProbeReply::now_ms`). A report is the peer's clock plus the local monotonic time
//!   elapsed since it arrived (taken at the middle of the round trip); reports older than
//!   [`REPORT_FRESH`] are not used.
//! - With the leader's clock and at least two fresh reports (three clocks or more), the stamp is
//!   their lower median: one wrong clock, the leader's or a follower's, ahead or behind, never
//!   moves a median of three.
//! - With exactly two clocks, they are used only when they agree (within [`AGREE_MS`]), and the
//!   lower one is taken; two clocks that disagree cannot say which one is wrong.
//! - Otherwise (one clock, or two that disagree) the step is capped: the stamp is the last log
//!   time this node saw plus the monotonic time elapsed since it saw it, so a wrong wall clock
//!   alone moves nothing; log time runs on at the rate of real time from its last agreed value.
//! - A single-voter cluster has only its own clock, and a cluster that never stamped an entry
//!   (log time 0) has nothing to cap from: both take the local clock.
//!
//! Log time never goes backwards: the state machine keeps the maximum, whatever is stamped.
//! Architecture Invariant: nothing here reads a clock; callers pass the wall clock
//! ([`crate::raft_node::now_ms`] on a node, fixed values in tests) and the monotonic instants in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::types::NodeId;

/// A peer's clock report older than this is not used (five probe periods).
pub const REPORT_FRESH: Duration = Duration::from_secs(5);

/// Two clocks whose difference is at most this agree: the probe's round trip (at most its 500 ms
/// timeout, halved by taking the middle) plus what NTP-synchronized clocks differ by.
pub const AGREE_MS: u64 = 2_000;

/// How often a leader whose own clock disagrees with the cluster's says so in its log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What an estimate was made from (logged when the local clock disagrees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The only voter: its own clock.
    Alone,
    /// Nothing was ever stamped (log time 0): the local clock.
    Fresh,
    /// The lower median of this many clocks (3 or more, the local one included).
    Median(usize),
    /// Two clocks that agree: the lower one.
    Agreed,
    /// Too few clocks, or two that disagree: the last seen log time plus the monotonic time since.
    Capped,
}

/// One estimate of cluster time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub ms: u64,
    pub source: Source,
}

/// A peer's wall clock as it reported it, and when (this node's monotonic clock).
#[derive(Debug, Clone, Copy)]
struct Report {
    now_ms: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// The last clock report of each peer.
    reports: HashMap<NodeId, Report>,
    /// The newest log time this node has seen (applied or stamped) and when it saw it: the base
    /// of the capped step. Only moves forward: replaced when a newer value exceeds its projection.
    base: Option<(u64, Instant)>,
    /// When the disagreement warning was last logged.
    warned: Option<Instant>,
}

/// Peers' clock reports and the last seen log time of one node. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct ClusterClock {
    state: Mutex<State>,
}

impl ClusterClock {
    pub fn new() -> ClusterClock {
        ClusterClock::default()
    }

    /// Records peer `node`'s wall clock `now_ms`, read at `at` on this node's monotonic clock.
    /// A zero (a peer from before the field existed) is ignored.
    pub fn report(&self, node: NodeId, now_ms: u64, at: Instant) {
        if now_ms == 0 {
            return;
        }
        self.state.lock().reports.insert(node, Report { now_ms, at });
    }

    /// Records that log time was `log_time_ms` at `at` (this node applied up to it).
    pub fn observe_log_time(&self, log_time_ms: u64, at: Instant) {
        self.state.lock().observe(log_time_ms, at);
    }

    /// Cluster time at `at` as node `me` sees it (`local_ms` its wall clock), over `voters`, when
    /// log time is `log_time_ms`. Records nothing but the log time.
    pub fn estimate(
        &self,
        me: NodeId,
        local_ms: u64,
        at: Instant,
        voters: &[NodeId],
        log_time_ms: u64,
    ) -> Estimate {
        let mut st = self.state.lock();
        st.observe(log_time_ms, at);
        st.estimate(me, local_ms, at, voters)
    }

    /// The time to stamp on an entry this node proposes now: [`ClusterClock::estimate`], which
    /// then counts as seen log time (the next capped step starts from it). Returns the estimate
    /// and, at most once per minute, whether the local clock disagrees with it (for a warning).
    pub fn stamp(
        &self,
        me: NodeId,
        local_ms: u64,
        at: Instant,
        voters: &[NodeId],
        log_time_ms: u64,
    ) -> (Estimate, bool) {
        let mut st = self.state.lock();
        st.observe(log_time_ms, at);
        let e = st.estimate(me, local_ms, at, voters);
        st.observe(e.ms, at);
        let off = local_ms.abs_diff(e.ms) > AGREE_MS;
        let warn = off
            && st
                .warned
                .is_none_or(|w| at.saturating_duration_since(w) >= WARN_EVERY);
        if warn {
            st.warned = Some(at);
        }
        (e, warn)
    }
}

impl State {
    /// Where the base says log time is at `at`.
    fn projection(&self, at: Instant) -> Option<u64> {
        self.base
            .map(|(ms, seen)| ms.saturating_add(millis(at.saturating_duration_since(seen))))
    }

    fn observe(&mut self, log_time_ms: u64, at: Instant) {
        if log_time_ms == 0 {
            return;
        }
        if self.projection(at).is_none_or(|p| log_time_ms > p) {
            self.base = Some((log_time_ms, at));
        }
    }

    fn estimate(&self, me: NodeId, local_ms: u64, at: Instant, voters: &[NodeId]) -> Estimate {
        // BUG INJECTION (test-only cargo feature `bug-leader-clock`, for the jepsen suite): a
        // node's own wall clock is cluster time, as before this module: a leader hours ahead
        // stamps entries (and finds expiries due) hours ahead, for the whole cluster.
        if cfg!(feature = "bug-leader-clock") {
            return Estimate {
                ms: local_ms,
                source: Source::Alone,
            };
        }
        if voters.iter().all(|v| *v == me) {
            return Estimate {
                ms: local_ms,
                source: Source::Alone,
            };
        }
        let mut clocks = vec![local_ms];
        clocks.extend(
            voters
                .iter()
                .filter(|v| **v != me)
                .filter_map(|v| self.reports.get(v))
                .filter(|r| r.at <= at && at.duration_since(r.at) <= REPORT_FRESH)
                .map(|r| r.now_ms.saturating_add(millis(at.duration_since(r.at)))),
        );
        clocks.sort_unstable();
        let n = clocks.len();
        if n >= 3 {
            return Estimate {
                ms: clocks[(n - 1) / 2],
                source: Source::Median(n),
            };
        }
        if n == 2 && clocks[1] - clocks[0] <= AGREE_MS {
            return Estimate {
                ms: clocks[0],
                source: Source::Agreed,
            };
        }
        match self.projection(at) {
            Some(p) => Estimate {
                ms: p,
                source: Source::Capped,
            },
            None => Estimate {
                ms: local_ms,
                source: Source::Fresh,
            },
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;
    const T: u64 = 1_800_000_000_000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn one_skewed_clock_never_moves_the_median_of_three() {
        let t0 = Instant::now();
        for (leader, f2, f3) in [
            (T + HOUR, T, T),
            (T - HOUR, T, T),
            (T, T + HOUR, T),
            (T, T, T - HOUR),
        ] {
            let c = ClusterClock::new();
            c.report(2, f2, t0);
            c.report(3, f3, t0);
            let e = c.estimate(1, leader, t0, &[1, 2, 3], T - 10_000);
            assert_eq!(
                e,
                Estimate {
                    ms: T,
                    source: Source::Median(3)
                },
                "{leader} {f2} {f3}"
            );
        }
    }

    #[test]
    fn reports_age_by_the_monotonic_clock() {
        let t0 = Instant::now();
        let c = ClusterClock::new();
        c.report(2, T, t0);
        c.report(3, T + 500, t0);
        // Three seconds later the peers' clocks read three seconds more; the leader's is off.
        let e = c.estimate(1, T + HOUR, t0 + secs(3), &[1, 2, 3], 0);
        assert_eq!(e.ms, T + 3_500);
        assert_eq!(e.source, Source::Median(3));
    }

    #[test]
    fn stale_reports_are_left_out() {
        let t0 = Instant::now();
        let c = ClusterClock::new();
        c.observe_log_time(T, t0);
        c.report(2, T + 10, t0);
        c.report(3, T + 20, t0 + secs(6));
        // Node 2's report is 11 s old: only two clocks (leader +1h, node 3) remain and they
        // disagree, so the step is capped from the log time seen at t0.
        let at = t0 + secs(11);
        let e = c.estimate(1, T + HOUR, at, &[1, 2, 3], T);
        assert_eq!(
            e,
            Estimate {
                ms: T + 11_000,
                source: Source::Capped
            }
        );
        // Reports of non-voters do not count either.
        c.report(4, T + 11_000, at);
        assert_eq!(c.estimate(1, T + HOUR, at, &[1, 2, 3], T).source, Source::Capped);
    }

    #[test]
    fn two_clocks_are_used_only_when_they_agree() {
        let t0 = Instant::now();
        let c = ClusterClock::new();
        c.observe_log_time(T - 60_000, t0);
        let at = t0 + secs(60);
        c.report(2, T + 1_500, at);
        let e = c.estimate(1, T, at, &[1, 2, 3], T - 60_000);
        assert_eq!(
            e,
            Estimate {
                ms: T,
                source: Source::Agreed
            }
        );
        c.report(2, T - HOUR, at);
        let e = c.estimate(1, T, at, &[1, 2, 3], T - 60_000);
        assert_eq!(
            e,
            Estimate {
                ms: T,
                source: Source::Capped
            }
        );
    }

    #[test]
    fn the_capped_step_is_the_monotonic_time_since_log_time_last_advanced() {
        let t0 = Instant::now();
        let c = ClusterClock::new();
        // A lone leader (the others down) whose clock jumped an hour ahead.
        let (e, warn) = c.stamp(1, T + HOUR, t0, &[1, 2, 3], T);
        assert_eq!(
            e,
            Estimate {
                ms: T,
                source: Source::Capped
            }
        );
        assert!(warn, "a local clock an hour off is reported");
        let (e, warn) = c.stamp(1, T + HOUR + 250, t0 + Duration::from_millis(250), &[1, 2, 3], T);
        assert_eq!(e.ms, T + 250);
        assert!(!warn, "warned at most once a minute");
        // Log time applied later than it was stamped does not pull the base back: no drift.
        let (e, _) = c.stamp(1, T + HOUR + 1_000, t0 + secs(1), &[1, 2, 3], T + 250);
        assert_eq!(e.ms, T + 1_000);
        // A newer log time from another leader (ahead of the projection) becomes the base.
        c.observe_log_time(T + 5_000, t0 + secs(2));
        let (e, _) = c.stamp(1, T + HOUR, t0 + secs(3), &[1, 2, 3], T + 5_000);
        assert_eq!(e.ms, T + 6_000);
    }

    #[test]
    fn estimates_never_step_faster_than_the_monotonic_clock_without_a_majority() {
        // Whatever the lone leader's wall clock does, consecutive capped stamps differ by the
        // monotonic time between them.
        let t0 = Instant::now();
        let c = ClusterClock::new();
        let mut prev = c.stamp(1, T, t0, &[1, 2, 3], T).0.ms;
        for (i, wall) in [T + HOUR, T - HOUR, T + 24 * HOUR, 0, T].into_iter().enumerate() {
            let step = secs(1 + i as u64);
            let at = t0 + secs((1..=(1 + i as u64)).sum());
            let e = c.stamp(1, wall, at, &[1, 2, 3], T).0;
            assert_eq!(e.ms - prev, millis(step), "step {i}");
            prev = e.ms;
        }
    }

    #[test]
    fn a_single_voter_and_a_fresh_cluster_use_the_local_clock() {
        let t0 = Instant::now();
        let c = ClusterClock::new();
        assert_eq!(c.estimate(1, T, t0, &[1], T - HOUR).source, Source::Alone);
        assert_eq!(c.estimate(1, T, t0, &[1], T - HOUR).ms, T);
        let c = ClusterClock::new();
        assert_eq!(
            c.estimate(1, T, t0, &[1, 2, 3], 0),
            Estimate {
                ms: T,
                source: Source::Fresh
            }
        );
    }

    #[test]
    fn old_peers_without_a_clock_are_ignored() {
        let t0 = Instant::now();
        let c = ClusterClock::new();
        c.report(2, 0, t0);
        c.report(3, T, t0);
        assert_eq!(c.estimate(1, T + 100, t0, &[1, 2, 3], 0).source, Source::Agreed);
    }
}
