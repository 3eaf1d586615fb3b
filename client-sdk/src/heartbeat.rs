//! Heartbeat interval: fixed (the server's), or adaptive within the server's range.
//!
//! A mobile radio wakes for every ping, so fewer pings save battery; but a NAT or carrier
//! middlebox silently forgets an idle mapping after some unknown time, and a ping sent after that
//! never arrives. The adaptive policy searches for the longest interval the current network path
//! keeps alive:
//!
//! - start from the server's interval (or what was learned earlier on the same network);
//! - after [`HeartbeatConfig::confirmations`] pings sent after a full idle interval were answered,
//!   that interval is confirmed good and the next one is probed: double it, capped by the
//!   server's maximum and kept below the shortest interval that failed on this network
//!   (bisecting between the last good and the failed one);
//! - when a ping goes unanswered, fall back at once to the last good interval, remember the
//!   failed one as a ceiling, and if the good interval itself failed, halve it (down to the
//!   server's minimum).
//!
//! What was learned is kept per network name (the app tells the SDK when the network changes,
//! see [`Connection::set_network`](crate::Connection::set_network)) for the life of the
//! connection object, across reconnects.

use std::collections::HashMap;
use std::time::Duration;

/// Heartbeat settings.
///
/// ```
/// use std::time::Duration;
/// use herald_client::{Client, HeartbeatConfig};
///
/// // A phone: find the longest interval the network keeps alive, notice a failed probe in 5 s.
/// let heartbeat = HeartbeatConfig {
///     adaptive: true,
///     pong_timeout: Duration::from_secs(5),
///     ..HeartbeatConfig::default()
/// };
/// let builder = Client::builder("demo", "alice", "phone-1").heartbeat(heartbeat);
/// assert!(!HeartbeatConfig::default().adaptive);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Search for the longest interval the network keeps alive (see the module docs). Off by
    /// default: the client pings at the server's interval.
    pub adaptive: bool,
    /// Answered pings needed at an interval before a longer one is tried (adaptive only).
    pub confirmations: u32,
    /// Adaptive mode: a ping not answered within this time (capped by the interval) counts as
    /// missed, so a failed probe is noticed fast; the link is then treated as dead, reconnected
    /// and the interval falls back. In both modes a link from which nothing arrived for two
    /// intervals is dead.
    pub pong_timeout: Duration,
    /// The interval used until the server's WELCOME announces one.
    pub fallback_interval: Duration,
}

impl Default for HeartbeatConfig {
    /// Fixed interval (not adaptive), 2 confirmations, 10 s pong timeout, 30 s fallback interval.
    fn default() -> Self {
        HeartbeatConfig {
            adaptive: false,
            confirmations: 2,
            pong_timeout: Duration::from_secs(10),
            fallback_interval: Duration::from_secs(30),
        }
    }
}

/// What is known about one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NetState {
    /// The interval in use (the one being probed when above `good`).
    current: Duration,
    /// The longest interval confirmed to work.
    good: Duration,
    /// The shortest interval that failed, if any.
    ceiling: Option<Duration>,
    /// Answered full-interval pings at `current` since it was chosen.
    successes: u32,
}

/// The heartbeat interval policy of one connection.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatPolicy {
    /// Settings from the application.
    cfg: HeartbeatConfig,
    /// The server's interval, and the range a client may adapt within.
    base: Duration,
    min: Duration,
    max: Duration,
    /// Name of the network the device is on now.
    network: String,
    /// What was learned per network.
    learned: HashMap<String, NetState>,
}

/// Name of the network until the application names one.
pub(crate) const DEFAULT_NETWORK: &str = "default";

impl HeartbeatPolicy {
    pub(crate) fn new(cfg: HeartbeatConfig) -> Self {
        let base = cfg.fallback_interval.max(Duration::from_millis(1));
        HeartbeatPolicy {
            cfg,
            base,
            min: base,
            max: base,
            network: DEFAULT_NETWORK.to_string(),
            learned: HashMap::new(),
        }
    }

    /// Installs the server's interval and range (from WELCOME; zero means "not given").
    pub(crate) fn set_server(&mut self, base: Duration, min: Duration, max: Duration) {
        let base = if base.is_zero() {
            self.cfg.fallback_interval
        } else {
            base
        };
        let base = base.max(Duration::from_millis(1));
        let min = if min.is_zero() { base } else { min.min(base) };
        let max = if max.is_zero() { base } else { max.max(base) };
        self.base = base;
        self.min = min;
        self.max = max;
        for s in self.learned.values_mut() {
            s.current = s.current.clamp(min, max);
            s.good = s.good.clamp(min, max);
        }
    }

    /// The device moved to another network (Wi-Fi, cellular, …): use what was learned there.
    pub(crate) fn set_network(&mut self, name: &str) {
        self.network = name.to_string();
    }

    fn state(&self) -> NetState {
        self.learned.get(&self.network).copied().unwrap_or(NetState {
            current: self.base,
            good: self.base,
            ceiling: None,
            successes: 0,
        })
    }

    /// The interval to announce in the next PING and to wait before the one after.
    pub(crate) fn interval(&self) -> Duration {
        if !self.cfg.adaptive {
            return self.base;
        }
        self.state().current
    }

    /// How long to wait for the PONG of a PING sent now.
    pub(crate) fn pong_timeout(&self) -> Duration {
        self.cfg
            .pong_timeout
            .min(self.interval())
            .max(Duration::from_millis(1))
    }

    /// A PING sent after `idle` without any traffic was answered.
    pub(crate) fn on_answered(&mut self, idle: Duration) {
        if !self.cfg.adaptive {
            return;
        }
        let mut s = self.state();
        // Only a ping after a full idle interval proves the path keeps that much silence.
        if idle.as_millis() * 10 < s.current.as_millis() * 9 {
            return;
        }
        s.successes += 1;
        if s.successes >= self.cfg.confirmations.max(1) {
            s.good = s.good.max(s.current);
            s.current = self.probe_after(&s);
            s.successes = 0;
        }
        self.learned.insert(self.network.clone(), s);
    }

    /// A PING went unanswered: fall back to the last good interval at once.
    pub(crate) fn on_missed(&mut self) {
        if !self.cfg.adaptive {
            return;
        }
        let mut s = self.state();
        let failed = s.current;
        s.ceiling = Some(s.ceiling.map_or(failed, |c| c.min(failed)));
        if failed <= s.good {
            // The confirmed interval itself failed: the path got stricter.
            s.good = (s.good / 2).max(self.min);
        }
        s.current = s.good;
        s.successes = 0;
        self.learned.insert(self.network.clone(), s);
    }

    /// The next interval to try above a confirmed one.
    fn probe_after(&self, s: &NetState) -> Duration {
        let mut next = (s.good * 2).min(self.max);
        if let Some(c) = s.ceiling {
            if next >= c {
                next = s.good + (c.saturating_sub(s.good)) / 2;
            }
        }
        // Converged when the step is small: stay on the good interval.
        let step = next.saturating_sub(s.good);
        if step < s.good / 8 {
            return s.good;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn adaptive() -> HeartbeatPolicy {
        let mut p = HeartbeatPolicy::new(HeartbeatConfig {
            adaptive: true,
            confirmations: 2,
            ..HeartbeatConfig::default()
        });
        p.set_server(S(30), S(15), S(600));
        p
    }

    /// Feeds answered pings until the interval changes; returns the new interval.
    fn confirm(p: &mut HeartbeatPolicy) -> Duration {
        let before = p.interval();
        for _ in 0..2 {
            p.on_answered(before);
        }
        p.interval()
    }

    #[test]
    fn fixed_mode_uses_the_server_interval_and_ignores_feedback() {
        let mut p = HeartbeatPolicy::new(HeartbeatConfig::default());
        assert_eq!(p.interval(), S(30), "fallback before WELCOME");
        p.set_server(S(20), S(10), S(300));
        assert_eq!(p.interval(), S(20));
        p.on_answered(S(20));
        p.on_answered(S(20));
        p.on_answered(S(20));
        p.on_missed();
        assert_eq!(p.interval(), S(20));
    }

    #[test]
    fn doubles_while_pings_succeed_up_to_the_server_max() {
        let mut p = adaptive();
        assert_eq!(p.interval(), S(30));
        assert_eq!(confirm(&mut p), S(60));
        assert_eq!(confirm(&mut p), S(120));
        assert_eq!(confirm(&mut p), S(240));
        assert_eq!(confirm(&mut p), S(480));
        assert_eq!(confirm(&mut p), S(600));
        assert_eq!(confirm(&mut p), S(600));
    }

    #[test]
    fn a_ping_after_a_short_idle_proves_nothing() {
        let mut p = adaptive();
        for _ in 0..10 {
            p.on_answered(S(5));
        }
        assert_eq!(p.interval(), S(30));
    }

    #[test]
    fn a_miss_falls_back_at_once_and_bisects_below_the_failed_interval() {
        let mut p = adaptive();
        assert_eq!(confirm(&mut p), S(60));
        assert_eq!(confirm(&mut p), S(120));
        // The NAT forgets after ~100 s: the 120 s probe fails.
        p.on_missed();
        assert_eq!(p.interval(), S(60), "back to the last good interval immediately");
        // Next probe goes halfway towards the failed interval, not back to 120.
        assert_eq!(confirm(&mut p), S(90));
        assert_eq!(confirm(&mut p), S(105));
        p.on_missed();
        assert_eq!(p.interval(), S(90));
        // 90..105: the next step would be under an eighth of 90 s: converged on 90.
        assert_eq!(confirm(&mut p), S(90));
        assert_eq!(confirm(&mut p), S(90));
    }

    #[test]
    fn a_miss_at_the_confirmed_interval_halves_it_down_to_the_minimum() {
        let mut p = adaptive();
        p.on_missed();
        assert_eq!(p.interval(), S(15));
        p.on_missed();
        assert_eq!(p.interval(), S(15), "never below the server's minimum");
    }

    #[test]
    fn learning_is_kept_per_network() {
        let mut p = adaptive();
        assert_eq!(confirm(&mut p), S(60));
        assert_eq!(confirm(&mut p), S(120));
        p.set_network("cellular");
        assert_eq!(
            p.interval(),
            S(30),
            "a new network starts from the server's interval"
        );
        p.on_missed();
        assert_eq!(p.interval(), S(15));
        p.set_network(DEFAULT_NETWORK);
        assert_eq!(p.interval(), S(120));
    }

    #[test]
    fn pong_timeout_is_capped_by_the_interval() {
        let mut p = adaptive();
        p.set_server(Duration::from_millis(200), Duration::from_millis(100), S(1));
        assert_eq!(p.pong_timeout(), Duration::from_millis(200));
        p.set_server(S(30), S(15), S(600));
        assert_eq!(p.pong_timeout(), S(10));
    }

    #[test]
    fn missing_range_means_no_adaptation() {
        let mut p = adaptive();
        p.set_server(S(30), Duration::ZERO, Duration::ZERO);
        assert_eq!(confirm(&mut p), S(30));
    }
}
