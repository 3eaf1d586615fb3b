//! Counters the admin server exports that the room and API do not keep already, and the
//! Prometheus text exposition of everything a node knows about itself.
//!
//! Hot-path cost: an observation is a handful of relaxed atomic adds (a histogram with fixed
//! buckets, gauges per transport); nothing here takes a lock per delivery. The rate ring is
//! written by one sampler task every [`SAMPLE_EVERY`] and read by the admin API.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_proto::peer::RateSample;
use parking_lot::Mutex;

/// Upper bounds (ms, inclusive) of the delivery latency buckets; one more bucket is +Inf.
pub const LATENCY_BUCKETS_MS: [u64; 16] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
];

/// A Prometheus histogram over fixed buckets of atomics.
pub struct Histogram {
    /// Per-bucket counts (not cumulative), the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records `n` observations of `ms`.
    pub fn observe_n(&self, ms: u64, n: u64) {
        if n == 0 {
            return;
        }
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms.saturating_mul(n), Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one delivery of a message pushed at log time `pushed_ms` (unix ms), now.
    pub fn observe_since(&self, pushed_ms: u64, now_ms: u64) {
        self.observe_n(now_ms.saturating_sub(pushed_ms), 1);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Cumulative counts per bucket bound (`None` = +Inf), the sum in seconds and the count.
    pub fn snapshot(&self) -> (Vec<(Option<u64>, u64)>, f64, u64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            out.push((LATENCY_BUCKETS_MS.get(i).copied(), acc));
        }
        let sum = self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        (out, sum, acc)
    }
}

/// How a client connection reached the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    Ws,
    /// MQTT 3.1.1 / 5.0 over plain TCP (`room::mqtt`).
    Mqtt,
}

impl Transport {
    pub const ALL: [Transport; 4] = [Transport::Tcp, Transport::Tls, Transport::Ws, Transport::Mqtt];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// Samples of the node's load kept for the dashboard: every [`SAMPLE_EVERY`], [`SAMPLES`] deep.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const SAMPLES: usize = 120;

/// Operational counters beside [`RoomStats`](crate::room::RoomStats)' own (a field of it, so
/// every part of the node reaches them through the room).
#[derive(Default)]
pub struct OpsStats {
    /// Push accepted (its log time) → handed to the connection's socket write.
    pub delivery_latency: Histogram,
    /// Gauges: open client connections per transport (tcp, tls, ws, mqtt).
    connections: [AtomicU64; 4],
    /// Pushes accepted by this node's API, QoS 0 and QoS 1 (one per request).
    pub pushes_qos0: AtomicU64,
    pub pushes_qos1: AtomicU64,
    /// Broadcasts and topic publishes accepted by this node's API.
    pub publishes: AtomicU64,
    /// Recent load samples, oldest first.
    rates: Mutex<VecDeque<RateSample>>,
    /// Transport of every open connection by connection id, for the per-app connection gauge
    /// (written on connect and disconnect only, read by scrapes).
    transports: Mutex<HashMap<u64, Transport>>,
}

impl OpsStats {
    /// Called by `Room::add_conn` for every new connection.
    pub fn conn_opened(&self, conn: u64, t: Transport) {
        self.connections[t as usize].fetch_add(1, Ordering::Relaxed);
        self.transports.lock().insert(conn, t);
    }

    pub fn conn_closed(&self, t: Transport) {
        self.connections[t as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// Called by `Room::remove_conn`.
    pub fn conn_removed(&self, conn: u64) {
        self.transports.lock().remove(&conn);
    }

    /// The transport of open connection `conn`; `None` once it is closed.
    pub fn transport_of(&self, conn: u64) -> Option<Transport> {
        self.transports.lock().get(&conn).copied()
    }

    pub fn connections(&self, t: Transport) -> u64 {
        self.connections[t as usize].load(Ordering::Relaxed)
    }

    pub fn pushes(&self) -> u64 {
        self.pushes_qos0.load(Ordering::Relaxed)
            + self.pushes_qos1.load(Ordering::Relaxed)
            + self.publishes.load(Ordering::Relaxed)
    }

    pub fn record_sample(&self, s: RateSample) {
        let mut r = self.rates.lock();
        if r.len() >= SAMPLES {
            r.pop_front();
        }
        r.push_back(s);
    }

    pub fn samples(&self) -> Vec<RateSample> {
        self.rates.lock().iter().cloned().collect()
    }
}

/// Builds Prometheus text exposition (format 0.0.4), one metric family at a time.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// A metric family with one unlabeled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        let _ = writeln!(self.out, "{name} {}", fmt_value(value));
    }

    /// A metric family with one sample per label value.
    pub fn labeled<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        self.family(name, kind, help);
        for (v, x) in samples {
            let _ = writeln!(self.out, "{name}{{{label}=\"{}\"}} {}", escape(v), fmt_value(x));
        }
    }

    /// A metric family with one sample per combination of label values (`labels` names them, each
    /// sample gives one value per name, in order).
    pub fn multi_labeled<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        labels: &[&str],
        samples: impl IntoIterator<Item = (Vec<&'a str>, f64)>,
    ) {
        self.family(name, kind, help);
        for (values, x) in samples {
            let pairs: Vec<String> = labels
                .iter()
                .zip(values)
                .map(|(l, v)| format!("{l}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(self.out, "{name}{{{}}} {}", pairs.join(","), fmt_value(x));
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let (buckets, sum, count) = h.snapshot();
        for (le, c) in buckets {
            let le = match le {
                Some(ms) => fmt_value(ms as f64 / 1000.0),
                None => "+Inf".into(),
            };
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(self.out, "{name}_sum {}", fmt_value(sum));
        let _ = writeln!(self.out, "{name}_count {count}");
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_n(0, 1);
        h.observe_n(3, 2);
        h.observe_n(1_000_000, 1);
        let (b, sum, count) = h.snapshot();
        assert_eq!(count, 4);
        assert_eq!(b[0], (Some(1), 1));
        assert_eq!(b[2], (Some(5), 3));
        assert_eq!(*b.last().unwrap(), (None, 4));
        assert!((sum - 1000.006).abs() < 1e-9);
    }

    #[test]
    fn exposition_is_prometheus_text() {
        let mut e = Exposition::default();
        e.single("herald_x_total", "counter", "An x.", 3.0);
        e.labeled("herald_y", "gauge", "A y.", "app", [("a\"b", 1.5)]);
        let h = Histogram::default();
        h.observe_n(7, 1);
        e.histogram("herald_lat_seconds", "Latency.", &h);
        let text = e.finish();
        assert!(
            text.contains("# TYPE herald_x_total counter\nherald_x_total 3\n"),
            "{text}"
        );
        assert!(text.contains("herald_y{app=\"a\\\"b\"} 1.5\n"), "{text}");
        assert!(
            text.contains("herald_lat_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("herald_lat_seconds_bucket{le=\"0.005\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("herald_lat_seconds_count 1\n"), "{text}");
    }

    #[test]
    fn multi_labeled_samples_name_every_label() {
        let mut e = Exposition::default();
        e.multi_labeled(
            "herald_z",
            "gauge",
            "A z.",
            &["app", "transport"],
            [(vec!["chat", "ws"], 2.0), (vec!["n\"ews", "tcp"], 1.0)],
        );
        let text = e.finish();
        assert!(
            text.contains("herald_z{app=\"chat\",transport=\"ws\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("herald_z{app=\"n\\\"ews\",transport=\"tcp\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn a_connection_keeps_its_transport_until_it_is_removed() {
        let s = OpsStats::default();
        s.conn_opened(7, Transport::Ws);
        s.conn_opened(8, Transport::Tcp);
        assert_eq!(s.transport_of(7), Some(Transport::Ws));
        assert_eq!(s.transport_of(8), Some(Transport::Tcp));
        assert_eq!(s.connections(Transport::Ws), 1);
        s.conn_removed(7);
        assert_eq!(s.transport_of(7), None);
        assert_eq!(s.transport_of(9), None);
    }

    #[test]
    fn the_rate_ring_is_bounded() {
        let s = OpsStats::default();
        for i in 0..(SAMPLES as u64 + 5) {
            s.record_sample(RateSample {
                at_ms: i,
                ..Default::default()
            });
        }
        let v = s.samples();
        assert_eq!(v.len(), SAMPLES);
        assert_eq!(v[0].at_ms, 5);
    }
}
