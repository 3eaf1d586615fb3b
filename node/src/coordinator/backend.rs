//! An app's backend endpoints as a consumer group: per-endpoint health (a small circuit breaker),
//! rendezvous (HRW) ordering of members for a key, and lazily connected tonic clients.
//!
//! Health is kept per endpoint, not per app: two apps naming the same backend share what is known
//! about it. A member is taken out on its first transport-level failure and comes back through a
//! single probe request once its cool-down has passed (the cool-down doubles while probes keep
//! failing, up to a cap).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_proto::callback::callback_client::CallbackClient;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{info, warn};

/// How one member is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Takes traffic.
    Healthy,
    /// Taken out until `until`; then one request may probe it.
    Down { until: Instant, cooldown: Duration },
    /// One request is probing it; everyone else skips it meanwhile.
    Probing { cooldown: Duration },
}

/// Cool-down policy shared by every member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthPolicy {
    /// First cool-down after a healthy member fails.
    pub cooldown: Duration,
    /// Longest cool-down (reached by doubling while probes fail).
    pub cooldown_max: Duration,
    /// Connect timeout of a member's channel.
    pub connect_timeout: Duration,
}

/// One backend endpoint.
pub(crate) struct Member {
    /// As configured in the app (`host:port` or a full `http://` URI).
    pub endpoint: String,
    /// HRW seed of this member, derived from `endpoint` only (the same on every node).
    seed: u64,
    health: Mutex<Health>,
    /// Lazily connected client; dropped after a failure so the next use starts a fresh connection.
    client: Mutex<Option<CallbackClient<Channel>>>,
    /// Shared with the registry: bumped on every health change so waiters re-check.
    changed: watch::Sender<u64>,
    /// Times this member was taken out (diagnostics).
    pub taken_out: AtomicU64,
    policy: HealthPolicy,
}

impl Member {
    pub fn health(&self) -> Health {
        *self.health.lock()
    }

    pub fn is_healthy(&self) -> bool {
        matches!(self.health(), Health::Healthy)
    }

    /// Claims the member for one call if it takes traffic now (healthy, or due for its probe).
    pub fn try_use(self: &Arc<Self>, now: Instant) -> Option<MemberUse> {
        let mut h = self.health.lock();
        let probe = match *h {
            Health::Healthy => false,
            Health::Down { until, cooldown } if until <= now => {
                *h = Health::Probing { cooldown };
                true
            }
            Health::Down { .. } | Health::Probing { .. } => return None,
        };
        Some(MemberUse {
            member: self.clone(),
            probe,
            settled: false,
        })
    }

    /// When this member takes traffic again, if it is waiting out a cool-down.
    pub fn available_at(&self) -> Option<Instant> {
        match self.health() {
            Health::Down { until, .. } => Some(until),
            _ => None,
        }
    }

    /// The member's client, connecting lazily on first use.
    pub fn client(&self) -> Result<CallbackClient<Channel>, Status> {
        let mut slot = self.client.lock();
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let uri = if self.endpoint.contains("://") {
            self.endpoint.clone()
        } else {
            format!("http://{}", self.endpoint)
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| Status::unavailable(format!("invalid callback endpoint {:?}: {e}", self.endpoint)))?
            .connect_timeout(self.policy.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let client = CallbackClient::new(endpoint.connect_lazy());
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Moves the health under one lock; wakes waiters when the member's availability changed.
    fn transition(&self, f: impl FnOnce(Health) -> Health) -> (Health, Health) {
        let mut h = self.health.lock();
        let old = *h;
        *h = f(old);
        let new = *h;
        drop(h);
        if old != new {
            self.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
        (old, new)
    }

    fn on_success(&self) {
        let (old, _) = self.transition(|_| Health::Healthy);
        if !matches!(old, Health::Healthy) {
            info!(endpoint = %self.endpoint, "callback backend is healthy again");
        }
    }

    fn on_failure(&self, probe: bool, reason: &str) {
        *self.client.lock() = None;
        let now = Instant::now();
        let policy = self.policy;
        let (old, new) = self.transition(|h| match h {
            Health::Healthy => Health::Down {
                until: now + policy.cooldown,
                cooldown: policy.cooldown,
            },
            Health::Probing { cooldown } if probe => {
                let cooldown = (cooldown * 2).min(policy.cooldown_max);
                Health::Down {
                    until: now + cooldown,
                    cooldown,
                }
            }
            // Already out (a call that started before it was taken out): nothing new learned.
            other => other,
        });
        if old == new {
            return;
        }
        let cooldown_ms = match new {
            Health::Down { cooldown, .. } => cooldown.as_millis() as u64,
            _ => 0,
        };
        if matches!(old, Health::Healthy) {
            self.taken_out.fetch_add(1, Ordering::Relaxed);
            warn!(endpoint = %self.endpoint, reason, cooldown_ms, "callback backend taken out");
        } else {
            info!(endpoint = %self.endpoint, reason, cooldown_ms, "callback backend probe failed");
        }
    }
}

/// A claim on a member for one call. Settle it with [`MemberUse::succeeded`] or
/// [`MemberUse::failed`]; dropped unsettled (the call was abandoned), a probe hands its turn on.
pub(crate) struct MemberUse {
    pub member: Arc<Member>,
    /// This call decides whether a taken-out member comes back.
    pub probe: bool,
    settled: bool,
}

impl MemberUse {
    /// The member answered (with a reply or with an application error): it is reachable.
    pub fn succeeded(mut self) {
        self.settled = true;
        self.member.on_success();
    }

    /// The member failed at the transport level (or said UNAVAILABLE, or hung).
    pub fn failed(mut self, reason: &str) {
        self.settled = true;
        self.member.on_failure(self.probe, reason);
    }
}

impl Drop for MemberUse {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            // Nothing was learned: let the next request probe.
            self.member.transition(|h| match h {
                Health::Probing { cooldown } => Health::Down {
                    until: Instant::now(),
                    cooldown,
                },
                other => other,
            });
        }
    }
}

/// Every backend endpoint this node has talked to, shared by upstream and state callbacks.
pub(crate) struct Backends {
    members: RwLock<HashMap<String, Arc<Member>>>,
    changed: watch::Sender<u64>,
    policy: HealthPolicy,
}

impl Backends {
    pub fn new(policy: HealthPolicy) -> Self {
        Backends {
            members: RwLock::new(HashMap::new()),
            changed: watch::channel(0).0,
            policy,
        }
    }

    /// The member for `endpoint`, created on first use.
    pub fn member(&self, endpoint: &str) -> Arc<Member> {
        if let Some(m) = self.members.read().get(endpoint) {
            return m.clone();
        }
        self.members
            .write()
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                Arc::new(Member {
                    endpoint: endpoint.to_string(),
                    seed: splitmix64(fnv1a(endpoint.as_bytes())),
                    health: Mutex::new(Health::Healthy),
                    client: Mutex::new(None),
                    changed: self.changed.clone(),
                    taken_out: AtomicU64::new(0),
                    policy: self.policy,
                })
            })
            .clone()
    }

    /// The members for an app's `callbacks` list (duplicates removed, order kept).
    pub fn group(&self, callbacks: &[String]) -> Vec<Arc<Member>> {
        let mut out: Vec<Arc<Member>> = Vec::with_capacity(callbacks.len());
        for c in callbacks {
            if !out.iter().any(|m| &m.endpoint == c) {
                out.push(self.member(c));
            }
        }
        out
    }

    /// Notified on every health change of any member.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Rendezvous (highest random weight) order of `members` for `key`: the first is the key's home,
/// and when it is out the key moves to the next one only (other keys stay where they are).
pub(crate) fn hrw_order<'a>(members: &'a [Arc<Member>], key: &str) -> Vec<&'a Arc<Member>> {
    let k = fnv1a(key.as_bytes());
    let mut scored: Vec<(u64, &Arc<Member>)> = members.iter().map(|m| (splitmix64(k ^ m.seed), m)).collect();
    // Ties (astronomically unlikely) fall back to the endpoint so the order is total.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.endpoint.cmp(&b.1.endpoint)));
    scored.into_iter().map(|(_, m)| m).collect()
}

/// The first member in `key`'s HRW order that takes traffic now, skipping `exclude`d endpoints.
pub(crate) fn pick(members: &[Arc<Member>], key: &str, exclude: &[String]) -> Option<MemberUse> {
    let now = Instant::now();
    hrw_order(members, key)
        .into_iter()
        .filter(|m| !exclude.contains(&m.endpoint))
        .find_map(|m| m.try_use(now))
}

/// Earliest time a member of the group comes out of its cool-down.
pub(crate) fn next_available(members: &[Arc<Member>]) -> Option<Instant> {
    members.iter().filter_map(|m| m.available_at()).min()
}

/// Whether a failed call says something about the member (transport error, UNAVAILABLE) and may be
/// retried elsewhere, as opposed to an answer from the backend's own logic.
///
/// A status tonic built locally from a transport error carries a `source`; one decoded from the
/// backend's reply does not.
pub(crate) fn is_retryable(status: &Status) -> bool {
    status.code() == Code::Unavailable || std::error::Error::source(status).is_some()
}

/// A status as one line: its message, then the transport error chain behind it, if any
/// ("tcp connect error: Connection refused (os error 111)").
pub(crate) fn describe(status: &Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

/// FNV-1a 64: stable across builds and platforms (std's hasher is not), so every node computes
/// the same HRW order.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// splitmix64 finalizer: spreads FNV's weak low bits over the whole word.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Exponential backoff with equal jitter: each delay is drawn from `[d/2, d]`, `d` doubling from
/// `base` up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            next: base,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Backends {
        Backends::new(HealthPolicy {
            cooldown: Duration::from_millis(50),
            cooldown_max: Duration::from_millis(200),
            connect_timeout: Duration::from_millis(100),
        })
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7000")).collect()
    }

    #[test]
    fn hrw_spreads_keys_and_moves_only_the_lost_members_keys() {
        let b = backends();
        let group = b.group(&names(3));
        let home = |members: &[Arc<Member>], key: &str| hrw_order(members, key)[0].endpoint.clone();
        let mut count: HashMap<String, usize> = HashMap::new();
        let mut before = HashMap::new();
        for u in 0..3000 {
            let key = format!("user-{u}");
            let h = home(&group, &key);
            *count.entry(h.clone()).or_default() += 1;
            before.insert(key, h);
        }
        for (ep, n) in &count {
            assert!((800..1200).contains(n), "{ep} got {n} of 3000 keys: {count:?}");
        }
        // Drop member 1: only its keys move, each to its own second choice.
        let survivors: Vec<Arc<Member>> = group
            .iter()
            .filter(|m| m.endpoint != names(3)[1])
            .cloned()
            .collect();
        for (key, h) in &before {
            let now = home(&survivors, key);
            if *h != names(3)[1] {
                assert_eq!(&now, h, "{key} moved although its member stayed");
            } else {
                assert_eq!(
                    now,
                    hrw_order(&group, key)[1].endpoint,
                    "{key} went past its second choice"
                );
            }
        }
    }

    #[test]
    fn hrw_is_independent_of_list_order() {
        let b = backends();
        let mut n = names(4);
        let g1 = b.group(&n);
        n.reverse();
        let g2 = b.group(&n);
        for u in 0..200 {
            let key = format!("u{u}");
            let o1: Vec<_> = hrw_order(&g1, &key).iter().map(|m| m.endpoint.clone()).collect();
            let o2: Vec<_> = hrw_order(&g2, &key).iter().map(|m| m.endpoint.clone()).collect();
            assert_eq!(o1, o2);
        }
    }

    #[test]
    fn failed_member_cools_down_then_admits_one_probe() {
        let b = backends();
        let group = b.group(&names(2));
        let key = "alice";
        let first = hrw_order(&group, key)[0].clone();
        let u = pick(&group, key, &[]).expect("a member");
        assert_eq!(u.member.endpoint, first.endpoint);
        assert!(!u.probe);
        u.failed("refused");
        assert!(matches!(first.health(), Health::Down { .. }));
        assert_eq!(first.taken_out.load(Ordering::Relaxed), 1);
        // While it cools down the key goes to its second choice.
        let u = pick(&group, key, &[]).expect("a member");
        assert_ne!(u.member.endpoint, first.endpoint);
        u.succeeded();
        std::thread::sleep(Duration::from_millis(60));
        // Due: exactly one probe goes through; a second caller skips it.
        let probe = pick(&group, key, &[]).expect("a member");
        assert_eq!(probe.member.endpoint, first.endpoint);
        assert!(probe.probe);
        let other = pick(&group, key, &[]).expect("a member");
        assert_ne!(other.member.endpoint, first.endpoint);
        drop(other);
        // A failed probe doubles the cool-down.
        probe.failed("refused again");
        match first.health() {
            Health::Down { cooldown, .. } => assert_eq!(cooldown, Duration::from_millis(100)),
            h => panic!("unexpected {h:?}"),
        }
        std::thread::sleep(Duration::from_millis(110));
        let probe = pick(&group, key, &[]).expect("a member");
        assert!(probe.probe);
        // An abandoned probe hands its turn to the next caller.
        drop(probe);
        let probe = pick(&group, key, &[]).expect("a member");
        assert!(probe.probe);
        probe.succeeded();
        assert!(first.is_healthy());
        let u = pick(&group, key, &[]).expect("a member");
        assert_eq!(u.member.endpoint, first.endpoint);
        assert!(!u.probe);
    }

    #[test]
    fn no_member_when_all_are_out() {
        let b = backends();
        let group = b.group(&names(2));
        for _ in 0..2 {
            pick(&group, "k", &[]).expect("a member").failed("down");
        }
        assert!(pick(&group, "k", &[]).is_none());
        let at = next_available(&group).expect("a cool-down");
        assert!(at > Instant::now());
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let bounds = [(50, 100), (100, 200), (200, 400), (200, 400), (200, 400)];
        for (d, (lo, hi)) in d.iter().zip(bounds) {
            assert!(
                *d >= Duration::from_millis(lo) && *d <= Duration::from_millis(hi),
                "{d:?} not in [{lo}, {hi}] ms"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable(&Status::unavailable("down")));
        assert!(!is_retryable(&Status::invalid_argument("bad")));
        assert!(!is_retryable(&Status::internal("bug")));
        let transport = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(is_retryable(&transport), "{transport:?}");
    }
}
