//! The nemesis: faults, installed on a schedule and healed.
//!
//! | name | what it does |
//! |---|---|
//! | `kill` | SIGKILL one node (the leader half of the time: with `--shards`, the leader of a group drawn at random, a shard's or the metadata group's); restarted on its data dir at heal |
//! | `pause` | SIGSTOP one node (the leader half of the time); SIGCONT at heal |
//! | `partition-one` | iptables in the namespaces: one node hears nobody and nobody hears it |
//! | `partition-leader` | the same for the current leader |
//! | `partition-halves` | a random minority against the majority |
//! | `partition-bridge` | two halves that only one node (the bridge) hears both of |
//! | `partition-ring` | every node hears only its two neighbours in a random ring (5+ nodes) |
//! | `delay` | every node's proxy holds each chunk 30 ms + up to 40 ms |
//! | `loss` | every node's proxy stalls 5% of the chunks 400 ms (a TCP retransmission) and cuts 0.2% of the connections |
//! | `clock` | one or two nodes restart with their wall clock 2–120 s ahead or behind (`HERALD_CLOCK_OFFSET_MS`); back to 0 at heal |
//! | `damage` | one node (all members up) is killed, its raft log's newest WAL (16 KiB or more) gets 4 KiB of garbage in its middle, and it starts: it must either run or refuse to start naming `--rejoin`, and then rejoins (`--rejoin`: wipes its raft state, catches up). Cutting the WAL's end is the power nemeses' business (unsynced writes only) |
//! | `clock-hours` | one node (never more at a time) restarts with its wall clock 5 min–3 h off, ahead three times in four; then, up to three times once it caught up, the leader is killed and kept down until another node leads, until the skewed node leads (it must, to stamp entries); back to 0 at heal |
//! | `membership` | RemoveNode of a voter under load, then SIGKILL and wipe it; at heal it starts empty and is added back (AddNode) |
//! | `power-one` | power cut of one node (the leader half of the time): SIGKILL, then its powerfs disk loses every write it did not fsync (see `powerfs`); restarted 1–3 s later |
//! | `power-minority` | the same for a random minority at once |
//! | `power-all` | the same for every node at once |
//! | `partition-kill` | a partition, then SIGKILL of a node while it holds |
//! | `pause-kill` | SIGSTOP of a node, then SIGKILL of another |
//!
//! `partition` stands for every partition kind, `power` for the three power cuts, `all` for
//! everything. Without powerfs disks (`--no-powerfs`) a power cut is only the SIGKILL (the page
//! cache keeps every write), and the history says so. Outcomes follow openraft's
//! jepsen: a fault is `installed` (ok), `skipped` (ok, with that reason: no safe target) or
//! indeterminate (info). Every installed fault is healed before the next one and at the end of
//! the run, before the final reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::history::{Recorder, Val, F, NEMESIS};
use crate::proxy::Faults;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Kill,
    Pause,
    PartitionOne,
    PartitionLeader,
    PartitionHalves,
    PartitionBridge,
    PartitionRing,
    Delay,
    Loss,
    Clock,
    ClockHours,
    Membership,
    PowerOne,
    PowerMinority,
    PowerAll,
    Damage,
    PartitionKill,
    PauseKill,
}

impl Fault {
    pub const ALL: [Fault; 18] = [
        Fault::Kill,
        Fault::Pause,
        Fault::PartitionOne,
        Fault::PartitionLeader,
        Fault::PartitionHalves,
        Fault::PartitionBridge,
        Fault::PartitionRing,
        Fault::Delay,
        Fault::Loss,
        Fault::Clock,
        Fault::ClockHours,
        Fault::Membership,
        Fault::PowerOne,
        Fault::PowerMinority,
        Fault::PowerAll,
        Fault::Damage,
        Fault::PartitionKill,
        Fault::PauseKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::PartitionOne => "partition-one",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionHalves => "partition-halves",
            Fault::PartitionBridge => "partition-bridge",
            Fault::PartitionRing => "partition-ring",
            Fault::Delay => "delay",
            Fault::Loss => "loss",
            Fault::Clock => "clock",
            Fault::ClockHours => "clock-hours",
            Fault::Membership => "membership",
            Fault::PowerOne => "power-one",
            Fault::PowerMinority => "power-minority",
            Fault::PowerAll => "power-all",
            Fault::Damage => "damage",
            Fault::PartitionKill => "partition-kill",
            Fault::PauseKill => "pause-kill",
        }
    }

    fn is_partition(self) -> bool {
        matches!(
            self,
            Fault::PartitionOne
                | Fault::PartitionLeader
                | Fault::PartitionHalves
                | Fault::PartitionBridge
                | Fault::PartitionRing
        )
    }

    fn is_power(self) -> bool {
        matches!(self, Fault::PowerOne | Fault::PowerMinority | Fault::PowerAll)
    }

    /// Parses a comma-separated list (`none` for no faults).
    pub fn parse_list(s: &str, nodes: u64) -> anyhow::Result<Vec<Fault>> {
        let mut out = BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => {}
                "all" => out.extend(Fault::ALL),
                "partition" => out.extend(Fault::ALL.into_iter().filter(|f| f.is_partition())),
                "power" => out.extend(Fault::ALL.into_iter().filter(|f| f.is_power())),
                name => {
                    let f = Fault::ALL
                        .into_iter()
                        .find(|f| f.name() == name)
                        .ok_or_else(|| anyhow::anyhow!("unknown nemesis {name:?}"))?;
                    out.insert(f);
                }
            }
        }
        if nodes < 5 {
            // A ring of 3 is no partition at all.
            out.remove(&Fault::PartitionRing);
        }
        Ok(out.into_iter().collect())
    }
}

/// How often and how long.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Healthy time between faults (ms, uniform in the range).
    pub quiet_ms: (u64, u64),
    /// How long a fault holds (ms).
    pub hold_ms: (u64, u64),
    /// The first fault of the run, whatever the draw (the short mode's power cut).
    pub first: Option<Fault>,
}

#[derive(Debug, Default)]
struct State {
    killed: BTreeSet<u64>,
    paused: BTreeSet<u64>,
    grudge: BTreeMap<u64, BTreeSet<u64>>,
    skewed: BTreeSet<u64>,
    /// One of `skewed` is off by minutes to hours (at most one at a time).
    skewed_hours: bool,
    removed: BTreeSet<u64>,
    proxies: bool,
}

pub struct Nemesis {
    cluster: Arc<Cluster>,
    rec: Recorder,
    faults: Vec<Fault>,
    timing: Timing,
    rng: StdRng,
    st: State,
}

impl Nemesis {
    pub fn new(
        cluster: Arc<Cluster>,
        rec: Recorder,
        faults: Vec<Fault>,
        timing: Timing,
        seed: u64,
    ) -> Nemesis {
        Nemesis {
            cluster,
            rec,
            faults,
            timing,
            rng: StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321),
            st: State::default(),
        }
    }

    /// Installs and heals faults until `until` (or `stop`); everything is healed on return.
    pub async fn run(&mut self, until: Instant, stop: CancellationToken) {
        if self.faults.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            return;
        }
        loop {
            let quiet = self
                .rng
                .gen_range(self.timing.quiet_ms.0..=self.timing.quiet_ms.1);
            if !sleep_until_or(Instant::now() + Duration::from_millis(quiet), until, &stop).await {
                break;
            }
            let f = match self.timing.first.take() {
                Some(f) => f,
                None => *self.faults.choose(&mut self.rng).expect("faults not empty"),
            };
            let hold =
                Duration::from_millis(self.rng.gen_range(self.timing.hold_ms.0..=self.timing.hold_ms.1));
            self.fault(f, hold, until, &stop).await;
            self.heal().await;
            if Instant::now() >= until || stop.is_cancelled() {
                break;
            }
        }
        self.heal().await;
    }

    async fn fault(&mut self, f: Fault, hold: Duration, until: Instant, stop: &CancellationToken) {
        match f {
            Fault::PartitionKill => {
                let p = *[
                    Fault::PartitionOne,
                    Fault::PartitionHalves,
                    Fault::PartitionLeader,
                ]
                .choose(&mut self.rng)
                .expect("non-empty");
                self.install(p).await;
                sleep_until_or(Instant::now() + hold / 2, until, stop).await;
                self.install(Fault::Kill).await;
                sleep_until_or(Instant::now() + hold / 2, until, stop).await;
            }
            Fault::PauseKill => {
                self.install(Fault::Pause).await;
                sleep_until_or(Instant::now() + hold / 2, until, stop).await;
                self.install(Fault::Kill).await;
                sleep_until_or(Instant::now() + hold / 2, until, stop).await;
            }
            _ if f.is_power() => {
                self.install(f).await;
                let off = Duration::from_millis(self.rng.gen_range(1000..3000));
                tokio::time::sleep(off).await;
            }
            _ => {
                self.install(f).await;
                sleep_until_or(Instant::now() + hold, until, stop).await;
            }
        }
    }

    /// Nodes not killed, paused or removed.
    fn live(&self) -> Vec<u64> {
        self.cluster
            .ids
            .iter()
            .copied()
            .filter(|id| {
                !self.st.killed.contains(id) && !self.st.paused.contains(id) && !self.st.removed.contains(id)
            })
            .collect()
    }

    /// Live voters that can reach a quorum of the voters directly.
    fn majority(&self) -> Vec<u64> {
        let voters: Vec<u64> = self
            .cluster
            .ids
            .iter()
            .copied()
            .filter(|id| !self.st.removed.contains(id))
            .collect();
        let live = self.live();
        let cut = |a: u64, b: u64| {
            self.st.grudge.get(&a).is_some_and(|g| g.contains(&b))
                || self.st.grudge.get(&b).is_some_and(|g| g.contains(&a))
        };
        live.iter()
            .copied()
            .filter(|&x| {
                let reach = 1 + live.iter().filter(|&&y| y != x && !cut(x, y)).count();
                reach * 2 > voters.len()
            })
            .collect()
    }

    async fn target(&mut self, prefer_leader: bool) -> Option<u64> {
        let live = self.live();
        if prefer_leader && self.rng.gen_bool(0.5) {
            // With shards: the leader of one group, drawn (a shard's leader, or the metadata
            // group's).
            let group = self.rng.gen_range(0..=self.cluster.shards());
            if let Some(l) = self.cluster.group_leader(group).await {
                if live.contains(&l) {
                    return Some(l);
                }
            }
        }
        live.choose(&mut self.rng).copied()
    }

    fn record_invoke(&self, f: &str, nodes: &[u64]) -> Val {
        let v = Val {
            fault: Some(f.to_string()),
            nodes: Some(nodes.to_vec()),
            ..Val::default()
        };
        self.rec.invoke(NEMESIS, F::Nemesis, None, v.clone());
        v
    }

    /// Up to three times: once node `x` has caught up with the leader, kill the leader and keep it
    /// down until another node leads (an election between `x` and the third node, whose logs
    /// are then equally long), then start it again. A restarted leader would stand again at once
    /// and usually win. Returns what happened, for the history; the kills are faults like `kill`.
    async fn make_lead(c: &Cluster, x: u64) -> String {
        for attempt in 1..=3 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            let leader = loop {
                let leader = c.leader().await;
                if leader == Some(x) {
                    return format!("installed; node {x} leads (attempt {attempt})");
                }
                let caught_up = match leader {
                    Some(l) => {
                        let (px, pl) = tokio::join!(
                            c.probe(x, false, Duration::from_millis(400)),
                            c.probe(l, false, Duration::from_millis(400))
                        );
                        matches!((px, pl), (Ok(px), Ok(pl)) if px.applied_index + 5 >= pl.applied_index)
                    }
                    None => false,
                };
                if caught_up || tokio::time::Instant::now() >= deadline {
                    break leader;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            let Some(l) = leader else {
                return format!("installed; no leader to step aside for node {x}");
            };
            c.kill9(l);
            let elected = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < elected {
                if c.leader().await.is_some_and(|n| n != l) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = c.start(l);
        }
        let now = c.leader().await;
        if now == Some(x) {
            format!("installed; node {x} leads (after 3 elections)")
        } else {
            format!("installed; node {x} did not get to lead (leader {now:?})")
        }
    }

    fn record_done(&self, v: Val, outcome: Result<&str, String>) {
        match outcome {
            Ok(reason) => {
                self.rec.ok(
                    NEMESIS,
                    F::Nemesis,
                    None,
                    Val {
                        reason: Some(reason.to_string()),
                        majority: Some(self.majority()),
                        ..v
                    },
                );
            }
            Err(e) => {
                self.rec.info(
                    NEMESIS,
                    F::Nemesis,
                    None,
                    Val {
                        majority: Some(self.majority()),
                        ..v
                    },
                    e,
                );
            }
        }
    }

    fn partition_grudge(&mut self, f: Fault, leader: Option<u64>) -> Option<(Grudge, Vec<u64>)> {
        let mut ids = self.live();
        if ids.len() < 2 {
            return None;
        }
        ids.shuffle(&mut self.rng);
        let all: Vec<u64> = self.cluster.ids.clone();
        let mut g: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut cut = |a: u64, b: u64| {
            g.entry(a).or_default().insert(b);
            g.entry(b).or_default().insert(a);
        };
        let isolated: Vec<u64> = match f {
            Fault::PartitionOne | Fault::PartitionLeader => {
                let x = if f == Fault::PartitionLeader {
                    leader?
                } else {
                    ids[0]
                };
                for &o in all.iter().filter(|&&o| o != x) {
                    cut(x, o);
                }
                vec![x]
            }
            Fault::PartitionHalves => {
                let mut shuffled = all.clone();
                shuffled.shuffle(&mut self.rng);
                let k = (all.len() - 1) / 2;
                let (minority, majority) = shuffled.split_at(k.max(1));
                for &a in minority {
                    for &b in majority {
                        cut(a, b);
                    }
                }
                minority.to_vec()
            }
            Fault::PartitionBridge => {
                let mut shuffled = all.clone();
                shuffled.shuffle(&mut self.rng);
                let mid = shuffled.len() / 2;
                let bridge = shuffled[mid];
                let (left, right) = (shuffled[..mid].to_vec(), shuffled[mid + 1..].to_vec());
                for &a in &left {
                    for &b in &right {
                        cut(a, b);
                    }
                }
                vec![bridge]
            }
            Fault::PartitionRing => {
                let mut ring = all.clone();
                ring.shuffle(&mut self.rng);
                let n = ring.len();
                for i in 0..n {
                    for j in i + 1..n {
                        let d = (j - i).min(n - (j - i));
                        if d > 1 {
                            cut(ring[i], ring[j]);
                        }
                    }
                }
                vec![]
            }
            _ => return None,
        };
        Some((g, isolated))
    }

    /// Installs one (simple) fault and records it.
    async fn install(&mut self, f: Fault) {
        let c = self.cluster.clone();
        match f {
            Fault::Kill => {
                let Some(x) = self.target(true).await else {
                    return self.skip(f, "no live node");
                };
                let v = self.record_invoke(f.name(), &[x]);
                c.kill9(x);
                self.st.killed.insert(x);
                self.record_done(v, Ok("installed"));
            }
            Fault::Pause => {
                let Some(x) = self.target(true).await else {
                    return self.skip(f, "no live node");
                };
                let v = self.record_invoke(f.name(), &[x]);
                let r = c.pause(x);
                if r.is_ok() {
                    self.st.paused.insert(x);
                }
                self.record_done(v, r.map(|_| "installed").map_err(|e| e.to_string()));
            }
            _ if f.is_partition() => {
                let leader = if f == Fault::PartitionLeader {
                    c.leader().await
                } else {
                    None
                };
                let Some((g, isolated)) = self.partition_grudge(f, leader) else {
                    return self.skip(f, "no leader or too few live nodes");
                };
                let v = self.record_invoke(f.name(), &isolated);
                let r = c.net.lock().partition(&g);
                self.st.grudge = g;
                self.record_done(v, r.map(|_| "installed").map_err(|e| e.to_string()));
            }
            Fault::Delay | Fault::Loss => {
                let faults = if f == Fault::Delay {
                    Faults {
                        delay_ms: 30,
                        jitter_ms: 40,
                        ..Faults::default()
                    }
                } else {
                    Faults {
                        loss: 0.05,
                        stall_ms: 400,
                        reset: 0.002,
                        ..Faults::default()
                    }
                };
                let v = self.record_invoke(f.name(), &c.ids);
                let r = c.set_proxy_faults(faults);
                self.st.proxies = true;
                self.record_done(v, r.map(|_| "installed").map_err(|e| e.to_string()));
            }
            Fault::Clock | Fault::ClockHours => {
                // `clock-hours`: one node (a minority) by minutes to hours, mostly ahead (an
                // ahead clock is the one that could expire messages early); `clock`: one or two
                // nodes by seconds to two minutes either way. At most one node is off by hours at
                // a time: a majority of wrong clocks is outside what the cluster clock defends.
                let hours = f == Fault::ClockHours;
                if hours && self.st.skewed_hours {
                    return self.skip(f, "a node's clock is already off by hours");
                }
                // `clock-hours` then tries to make the skewed node lead (it must, to stamp
                // entries): see `make_lead`. The node is never the leader when chosen.
                let unseat = if hours { c.leader().await } else { None };
                let mut live: Vec<u64> = self.live().into_iter().filter(|x| Some(*x) != unseat).collect();
                live.shuffle(&mut self.rng);
                let k = if hours { 1 } else { self.rng.gen_range(1..=2usize) }.min(live.len());
                let chosen: Vec<u64> = live[..k].to_vec();
                if chosen.is_empty() {
                    return self.skip(f, "no live node");
                }
                let v = self.record_invoke(f.name(), &chosen);
                for &x in &chosen {
                    let ms = if hours {
                        self.st.skewed_hours = true;
                        self.rng.gen_range(300_000..3 * 3_600_000i64)
                            * if self.rng.gen_bool(0.75) { 1 } else { -1 }
                    } else {
                        self.rng.gen_range(2_000..120_000i64) * if self.rng.gen_bool(0.5) { 1 } else { -1 }
                    };
                    c.set_clock_offset(x, ms);
                    c.kill9(x);
                    let _ = c.start(x);
                    self.st.skewed.insert(x);
                }
                let outcome = match (hours, chosen.first()) {
                    (true, Some(&x)) => Self::make_lead(&c, x).await,
                    _ => "installed".to_string(),
                };
                self.record_done(v, Ok(outcome.as_str()));
            }
            Fault::Damage => {
                // Only with every member up: a node rejoins from the others (one at a time).
                if !self.st.removed.is_empty() || self.live().len() < c.ids.len() {
                    return self.skip(f, "a member is down or removed");
                }
                let Some(&x) = self.live().choose(&mut self.rng) else {
                    return self.skip(f, "no live node");
                };
                // Garbage in the middle only: a cut end is what a power cut does to unsynced
                // writes (the power nemeses), and cutting synced, acknowledged entries off one
                // node is a loss the cluster cannot see yet (RESULTS.md, 2026-12-07 evening).
                let garbage = true;
                let cut_kib = self.rng.gen_range(4..=64u64);
                let v = self.record_invoke(f.name(), &[x]);
                c.kill9(x);
                let what = match c.damage_log(x, garbage, cut_kib) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = c.start(x);
                        let skipped = format!("not damaged: {e:#}");
                        return self.record_done(v, Ok(skipped.as_str()));
                    }
                };
                // Started as is, the node either runs (nothing it could detect was lost) or
                // refuses to start naming `--rejoin`; then it rejoins.
                c.set_watched(x, true);
                let outcome = match c.start(x) {
                    Err(e) => Err(format!("{what}; start: {e:#}")),
                    Ok(()) => {
                        let mut exited = None;
                        for _ in 0..20 {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            exited = c.try_exit(x);
                            if exited.is_some() {
                                break;
                            }
                        }
                        match exited {
                            None => Ok(format!("{what}: started with it")),
                            Some(st) => {
                                let log = std::fs::read(c.log_path(x)).unwrap_or_default();
                                let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(4000)..]);
                                let named = tail.contains("--rejoin");
                                c.rejoin_next(x);
                                let started = c.start(x);
                                match (st.success(), named, started) {
                                    (false, true, Ok(())) => Ok(format!(
                                        "{what}: refused to start ({st}) naming --rejoin; rejoined"
                                    )),
                                    (_, _, Err(e)) => {
                                        Err(format!("{what}: exited ({st}); rejoin start: {e:#}"))
                                    }
                                    _ => Err(format!("{what}: exited ({st}) without naming --rejoin")),
                                }
                            }
                        }
                    }
                };
                c.set_watched(x, false);
                self.record_done(v, outcome.as_deref().map_err(|e| e.clone()));
            }
            Fault::Membership => {
                if !self.st.removed.is_empty() || self.live().len() < c.ids.len() {
                    return self.skip(f, "a member is already down or removed");
                }
                let Some(&x) = self.live().choose(&mut self.rng) else {
                    return self.skip(f, "no live node");
                };
                let v = self.record_invoke(f.name(), &[x]);
                let r = tokio::time::timeout(Duration::from_secs(35), c.remove_node(x)).await;
                match r {
                    Ok(Ok(_)) => {
                        c.kill9(x);
                        let _ = c.wipe(x);
                        self.st.removed.insert(x);
                        self.record_done(v, Ok("installed"));
                    }
                    Ok(Err(e)) => {
                        // The removal may or may not have happened: take the node out anyway
                        // so that heal adds it back in a known way.
                        c.kill9(x);
                        let _ = c.wipe(x);
                        self.st.removed.insert(x);
                        self.record_done(v, Err(format!("RemoveNode: {e:#}")));
                    }
                    Err(_) => {
                        c.kill9(x);
                        let _ = c.wipe(x);
                        self.st.removed.insert(x);
                        self.record_done(v, Err("RemoveNode timed out".into()));
                    }
                }
            }
            _ if f.is_power() => {
                let mut up: Vec<u64> = c
                    .ids
                    .iter()
                    .copied()
                    .filter(|id| !self.st.removed.contains(id) && c.is_running(*id))
                    .collect();
                let targets: Vec<u64> = match f {
                    Fault::PowerOne => match self.target(true).await {
                        Some(x) => vec![x],
                        None => return self.skip(f, "no live node"),
                    },
                    Fault::PowerMinority => {
                        up.shuffle(&mut self.rng);
                        up.truncate(((c.ids.len() - 1) / 2).max(1));
                        up
                    }
                    _ => up,
                };
                if targets.is_empty() {
                    return self.skip(f, "no running node");
                }
                let mut v = self.record_invoke(f.name(), &targets);
                if f == Fault::PowerAll {
                    c.kill9_all();
                } else {
                    for &x in &targets {
                        c.kill9(x);
                    }
                }
                self.st.killed.extend(targets.iter().copied());
                // The nodes are dead (reaped): nothing writes to their disks while they lose
                // what was not synced.
                let mut lost = Vec::new();
                let mut errors = Vec::new();
                for &x in &targets {
                    match &c.disks {
                        Some(d) => match tokio::task::block_in_place(|| d.cut(x)) {
                            Ok(s) => lost.push(format!("node {x}: {s}")),
                            Err(e) => errors.push(format!("cut of node {x}: {e:#}")),
                        },
                        None => lost.push(format!("node {x}: killed only (no powerfs disk)")),
                    }
                }
                v.state = Some(lost.join("; "));
                let outcome = if errors.is_empty() {
                    Ok("installed")
                } else {
                    Err(errors.join("; "))
                };
                self.record_done(v, outcome);
            }
            Fault::PartitionKill | Fault::PauseKill => unreachable!("mixes are composed in fault()"),
            _ => self.skip(f, "unsupported"),
        }
    }

    fn skip(&self, f: Fault, why: &str) {
        let v = self.record_invoke(f.name(), &[]);
        self.rec.ok(
            NEMESIS,
            F::Nemesis,
            None,
            Val {
                reason: Some("skipped".into()),
                state: Some(why.to_string()),
                majority: Some(self.majority()),
                ..v
            },
        );
    }

    /// Heals everything that is installed, and records it.
    pub async fn heal(&mut self) {
        let st = &mut self.st;
        if st.killed.is_empty()
            && st.paused.is_empty()
            && st.grudge.is_empty()
            && st.skewed.is_empty()
            && st.removed.is_empty()
            && !st.proxies
        {
            return;
        }
        let c = self.cluster.clone();
        let v = self.record_invoke("heal", &[]);
        let mut errors = Vec::new();
        if let Err(e) = c.net.lock().heal() {
            errors.push(format!("partition: {e:#}"));
        }
        self.st.grudge.clear();
        if self.st.proxies {
            if let Err(e) = c.set_proxy_faults(Faults::default()) {
                errors.push(format!("proxies: {e:#}"));
            }
            self.st.proxies = false;
        }
        for x in std::mem::take(&mut self.st.paused) {
            if let Err(e) = c.resume(x) {
                if c.is_running(x) {
                    errors.push(format!("resume {x}: {e:#}"));
                }
            }
        }
        self.st.skewed_hours = false;
        for x in std::mem::take(&mut self.st.skewed) {
            c.set_clock_offset(x, 0);
            if c.is_running(x) {
                c.kill9(x);
                if let Err(e) = c.start(x) {
                    errors.push(format!("restart {x}: {e:#}"));
                }
            }
        }
        for x in std::mem::take(&mut self.st.killed) {
            if self.st.removed.contains(&x) {
                continue;
            }
            if let Err(e) = c.start(x) {
                errors.push(format!("start {x}: {e:#}"));
            }
        }
        for x in std::mem::take(&mut self.st.removed) {
            if let Err(e) = c.start(x) {
                errors.push(format!("start {x}: {e:#}"));
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match c.members().await {
                    Ok((voters, _)) if voters.contains(&x) => break,
                    _ => {}
                }
                match tokio::time::timeout(Duration::from_secs(75), c.add_node(x)).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) if Instant::now() >= deadline => {
                        errors.push(format!("add {x}: {e:#}"));
                        break;
                    }
                    Err(_) if Instant::now() >= deadline => {
                        errors.push(format!("add {x}: timed out"));
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        let outcome = if errors.is_empty() {
            Ok("healed")
        } else {
            Err(errors.join("; "))
        };
        self.record_done(v, outcome);
    }
}

/// Sleeps until `t` (capped at `until`); false if `until` passed or `stop` fired.
async fn sleep_until_or(t: Instant, until: Instant, stop: &CancellationToken) -> bool {
    let t = t.min(until);
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep_until(t) => Instant::now() < until,
    }
}

/// Who cannot reach whom: node → the nodes it is cut from.
type Grudge = BTreeMap<u64, BTreeSet<u64>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        let all = Fault::parse_list("all", 5).unwrap();
        assert_eq!(all.len(), Fault::ALL.len());
        let p = Fault::parse_list("partition", 3).unwrap();
        assert!(p.iter().all(|f| f.is_partition()));
        assert!(!p.contains(&Fault::PartitionRing), "no ring of three");
        assert_eq!(
            Fault::parse_list("kill,pause-kill", 3).unwrap(),
            vec![Fault::Kill, Fault::PauseKill]
        );
        assert_eq!(
            Fault::parse_list("power", 3).unwrap(),
            vec![Fault::PowerOne, Fault::PowerMinority, Fault::PowerAll]
        );
        assert!(Fault::parse_list("none", 3).unwrap().is_empty());
        assert!(Fault::parse_list("bogus", 3).is_err());
    }
}
