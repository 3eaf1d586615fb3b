//! Reconnect delays: exponential backoff with full jitter.
//!
//! After the n-th consecutive failure (n from 0) the client sleeps a uniformly random time in
//! `[0, min(max, initial × 2^n)]` ("full jitter"). The randomness is the point: when a node dies,
//! every client it held disconnects at the same instant, and without jitter they would all come
//! back at the same instant too, again and again. Full jitter spreads them over the whole window.

use std::time::Duration;

use rand::Rng;

/// Reconnect backoff parameters.
///
/// Unless set explicitly on the [`ConnectionBuilder`](crate::ConnectionBuilder), the values
/// come from the cluster's Dispatch answer, with [`BackoffConfig::default`] as the fallback.
///
/// ```
/// use std::time::Duration;
/// use herald_client::{BackoffConfig, Client};
///
/// // Retry within 1 s at first, never wait more than 20 s, start over after 30 s connected.
/// let backoff = BackoffConfig {
///     initial: Duration::from_secs(1),
///     max: Duration::from_secs(20),
///     reset_after: Duration::from_secs(30),
/// };
/// let builder = Client::builder("demo", "alice", "phone-1").backoff(backoff);
/// assert_eq!(BackoffConfig::default().initial, Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
    /// A connection that stayed up this long resets the failure count, so the next drop is
    /// retried quickly again.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    /// 500 ms initial, 60 s max, reset after 60 s up.
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Failure counter that turns into delays.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// Current parameters; replaced when Dispatch announces new ones.
    cfg: BackoffConfig,
    /// Consecutive failures since the last reset.
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(cfg: BackoffConfig) -> Self {
        Backoff { cfg, attempt: 0 }
    }

    pub(crate) fn set_config(&mut self, cfg: BackoffConfig) {
        self.cfg = cfg;
    }

    pub(crate) fn config(&self) -> BackoffConfig {
        self.cfg
    }

    /// Consecutive failures counted so far.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The cap of the window for the current attempt: `min(max, initial × 2^attempt)`.
    pub(crate) fn ceiling(&self) -> Duration {
        // 2^31 × any sane initial is far over any max; the shift saturates instead of overflowing.
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.cfg.initial.saturating_mul(factor).min(self.cfg.max)
    }

    /// The delay before the next attempt, and counts the failure.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let delay = self.jittered(rng);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// A delay drawn from the current window without counting a failure: for reopening one
    /// session while the connection itself is fine.
    pub(crate) fn jittered(&self, rng: &mut impl Rng) -> Duration {
        let cap = self.ceiling();
        if cap.is_zero() {
            return Duration::ZERO;
        }
        let ms = cap.as_millis().min(u64::MAX as u128) as u64;
        Duration::from_millis(rng.gen_range(0..=ms))
    }

    /// Called when a connection ends: a long-lived one resets the failure count.
    pub(crate) fn connection_ended(&mut self, uptime: Duration) {
        if uptime >= self.cfg.reset_after {
            self.attempt = 0;
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(initial_ms: u64, max_ms: u64) -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            reset_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(cfg(100, 1_000));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1_000, 1_000, 1_000, 1_000]);
    }

    #[test]
    fn delays_stay_within_the_window() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(cfg(50, 2_000));
        for _ in 0..200 {
            let cap = b.ceiling();
            let d = b.next_delay(&mut rng);
            assert!(d <= cap, "{d:?} > {cap:?}");
        }
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(cfg(1_000, 30_000));
        b.attempt = u32::MAX - 1;
        assert_eq!(b.ceiling(), Duration::from_millis(30_000));
        let mut rng = StdRng::seed_from_u64(3);
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(30_000));
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(30_000));
    }

    /// Full jitter, not "equal jitter" or a fixed delay: many clients failing at the same moment
    /// spread over the whole window, so the low end (near 0) and the high end are both used and
    /// no single slot holds a crowd.
    #[test]
    fn full_jitter_spreads_a_crowd_of_clients() {
        let mut rng = StdRng::seed_from_u64(42);
        let clients = 10_000;
        let mut buckets = [0u32; 10];
        for _ in 0..clients {
            let mut b = Backoff::new(cfg(1_000, 60_000));
            b.attempt = 3; // window 0..=8 s
            let d = b.next_delay(&mut rng).as_millis() as usize;
            buckets[(d * 10 / 8_001).min(9)] += 1;
        }
        // Each tenth of the window holds roughly a tenth of the crowd.
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (800..1_200).contains(n),
                "bucket {i} holds {n} of {clients}: {buckets:?}"
            );
        }
    }

    #[test]
    fn long_connection_resets_the_count_short_one_does_not() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut b = Backoff::new(cfg(100, 10_000));
        b.next_delay(&mut rng);
        b.next_delay(&mut rng);
        b.connection_ended(Duration::from_secs(1));
        assert_eq!(b.attempt(), 2);
        b.connection_ended(Duration::from_secs(10));
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn zero_window_gives_zero_delay() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut b = Backoff::new(cfg(0, 0));
        assert_eq!(b.next_delay(&mut rng), Duration::ZERO);
    }
}
