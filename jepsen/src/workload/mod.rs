//! Workloads: clients built on the SDK (`herald-client`) and gRPC callers, recording every
//! operation in the history.
//!
//! | name | what | checked by |
//! |---|---|---|
//! | `qos1` | online users, QoS-1 unicast pushes, automatic acks | lost, unexpected, duplicates, order |
//! | `offline` | users who come and go: pushes stored while they are away, drained when they return (one cursor store per device across app restarts) | the same |
//! | `registry` | connect, close, kick and status of a few devices per user | linearizable |
//! | `storm` | reconnect storms: half the devices log in again at once on another node (session migration), the old sessions must be replaced | fencing, lost, order |
//! | `topics` | topic publishes and broadcasts to subscribers | lost (per subscriber), unexpected, order |
//! | `mqtt` | online users whose device is an MQTT 5.0 persistent session (QoS 1, PUBACK), reconnecting to another node on failure | lost, unexpected, duplicates, order, fencing |
//!
//! Every client instance (one SDK `Client`) is its own process in the history; its
//! deliveries, gaps and connection events carry its id (`client`) and its dedupe `scope`.

pub mod mqtt;
pub mod offline;
pub mod qos1;
pub mod registry;
pub mod storm;
pub mod topics;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use herald_client::{BackoffConfig, Client, Event, Events, MemoryStore};
use herald_proto::v1 as pb;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::cluster::{AppCreds, Cluster};
use crate::history::{Recorder, Type, Val, F};

/// The workloads by name.
pub const ALL: [&str; 6] = ["qos1", "offline", "registry", "storm", "topics", "mqtt"];

/// How long a client waits for a gRPC reply before recording the call as indeterminate.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What every workload shares.
#[derive(Clone)]
pub struct Ctx {
    pub rec: Recorder,
    pub cluster: Arc<Cluster>,
    pub app: AppCreds,
    /// Cancelled when the workload must stop starting new operations.
    pub stop: CancellationToken,
    /// Operations per second for this workload (all its workers together).
    pub rate: f64,
    pub seed: u64,
    pub tracker: Arc<Tracker>,
}

impl Ctx {
    /// A deterministic generator for worker `n` of workload `name`.
    pub fn rng(&self, name: &str, n: u64) -> StdRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        StdRng::seed_from_u64(self.seed ^ h ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Sleeps an exponentially distributed time for one of `workers` workers sharing the rate;
    /// false when the workload was stopped meanwhile.
    pub async fn pace(&self, rng: &mut StdRng, workers: usize) -> bool {
        let per_worker = (self.rate / workers.max(1) as f64).max(0.01);
        let u: f64 = rng.gen_range(1e-6..1.0);
        let wait = Duration::from_secs_f64((-u.ln() / per_worker).min(30.0));
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    pub fn random_node(&self, rng: &mut StdRng) -> u64 {
        let ids = &self.cluster.ids;
        ids[rng.gen_range(0..ids.len())]
    }

    /// The client addresses in a random order.
    pub fn shuffled_client_addrs(&self, rng: &mut StdRng) -> Vec<String> {
        use rand::seq::SliceRandom;
        let mut a = self.cluster.client_addrs();
        a.shuffle(rng);
        a
    }
}

/// Outcome class of a failed gRPC call: `fail` only when the server says nothing happened.
pub fn classify(s: &Status) -> Type {
    match s.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::ResourceExhausted => Type::Fail,
        // The server's own UNAVAILABLE means the write was never handed to a leader. A transport
        // error is also UNAVAILABLE, but then the request may have been sent: indeterminate.
        Code::Unavailable
            if s.message().starts_with("no leader available")
                || s.message().starts_with("node is shutting down") =>
        {
            Type::Fail
        }
        _ => Type::Info,
    }
}

fn status_text(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// What the drain waits for: acknowledged messages not delivered yet.
#[derive(Default)]
pub struct Tracker {
    state: Mutex<TrackState>,
    /// Time (µs, history clock) of the last delivery.
    pub last_recv_us: AtomicU64,
}

#[derive(Default)]
struct TrackState {
    /// key (user, or `scope:<id>` for topic subscribers) → msg ids still expected.
    outstanding: HashMap<String, HashSet<String>>,
    received: HashMap<String, HashSet<String>>,
    /// scope → topic → seq its subscription started at.
    subs: HashMap<u64, HashMap<String, u64>>,
}

impl Tracker {
    pub fn expect(&self, key: &str, msg: &str) {
        let mut st = self.state.lock();
        if st.received.get(key).is_some_and(|r| r.contains(msg)) {
            return;
        }
        st.outstanding
            .entry(key.to_string())
            .or_default()
            .insert(msg.to_string());
    }

    pub fn received(&self, key: &str, msg: &str, now_us: u64) {
        let mut st = self.state.lock();
        st.received
            .entry(key.to_string())
            .or_default()
            .insert(msg.to_string());
        if let Some(o) = st.outstanding.get_mut(key) {
            o.remove(msg);
        }
        self.last_recv_us.store(now_us, Ordering::Relaxed);
    }

    pub fn subscribed(&self, scope: u64, topic: &str, seq: u64) {
        self.state
            .lock()
            .subs
            .entry(scope)
            .or_default()
            .entry(topic.to_string())
            .or_insert(seq);
    }

    /// A publish acknowledged with `seq`: every subscriber whose subscription covers it must get it.
    pub fn published(&self, topic: &str, seq: u64, msg: &str) {
        let scopes: Vec<u64> = self
            .state
            .lock()
            .subs
            .iter()
            .filter(|(_, t)| t.get(topic).is_some_and(|start| *start < seq))
            .map(|(s, _)| *s)
            .collect();
        for s in scopes {
            self.expect(&format!("scope:{s}"), msg);
        }
    }

    /// Stops waiting for a key (its receiver is gone for good).
    pub fn forget(&self, key: &str) {
        self.state.lock().outstanding.remove(key);
    }

    /// How many messages are still expected, and a sample.
    pub fn outstanding(&self) -> (usize, Vec<String>) {
        let st = self.state.lock();
        let n = st.outstanding.values().map(|s| s.len()).sum();
        let sample = st
            .outstanding
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .take(5)
            .map(|(k, s)| format!("{k}: {} (e.g. {:?})", s.len(), s.iter().next()))
            .collect();
        (n, sample)
    }
}

/// One QoS-1 push of a fresh msg id to `user` through `node`, recorded.
pub async fn push(ctx: &Ctx, process: u64, n: u64, node: u64, user: &str) {
    push_with_ttl(ctx, process, n, node, user, 0).await
}

/// [`push`] with a TTL (`0`: the app's default).
pub async fn push_with_ttl(ctx: &Ctx, process: u64, n: u64, node: u64, user: &str, ttl_ms: u64) {
    let msg_id = format!("m{process}-{n}");
    let v = Val {
        user: Some(user.to_string()),
        msg_id: Some(msg_id.clone()),
        ttl_ms: Some(ttl_ms).filter(|t| *t > 0),
        ..Val::default()
    };
    ctx.rec.invoke(process, F::Push, Some(node), v.clone());
    let req = pb::PushRequest {
        app: ctx.app.id.clone(),
        targets: vec![pb::Target {
            user: user.to_string(),
            devices: vec![],
        }],
        payload: msg_id.clone().into_bytes().into(),
        qos: pb::Qos::AtLeastOnce as i32,
        ttl_ms,
        idempotency_key: msg_id.clone(),
        msg_id: msg_id.clone(),
    };
    // Every other push goes through a PushStream (opened for it), so the streaming path sees
    // the same faults as the unary one.
    let streamed = n % 2 == 0;
    let call = async {
        let mut c = ctx
            .cluster
            .herald(node, false)
            .map_err(|e| Status::unknown(e.to_string()))?;
        if !streamed {
            return c
                .push(ctx.app.request(req, CALL_TIMEOUT))
                .await
                .map(|r| r.into_inner());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(req).await;
        drop(tx);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut replies = c
            .push_stream(ctx.app.request(outbound, CALL_TIMEOUT))
            .await?
            .into_inner();
        match replies.message().await? {
            Some(r) if r.code == 0 => r
                .reply
                .ok_or_else(|| Status::internal("push stream answer without a reply")),
            Some(r) => Err(Status::new(tonic::Code::from(r.code), r.message)),
            // The stream ended before the answer: the push's outcome is unknown.
            None => Err(Status::unavailable("push stream ended before the answer")),
        }
    };
    let r = tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(2), call).await;
    match r {
        Ok(Ok(reply)) => {
            let seq = reply.seqs.iter().find(|s| s.user == user).map(|s| s.seq);
            ctx.rec.ok(
                process,
                F::Push,
                Some(node),
                Val {
                    seq,
                    log_index: Some(reply.log_index),
                    ..v
                },
            );
            ctx.tracker.expect(user, &msg_id);
        }
        Ok(Err(s)) => {
            let kind = classify(&s);
            ctx.rec
                .record(process, kind, F::Push, Some(node), v, Some(status_text(&s)));
        }
        Err(_) => {
            ctx.rec
                .info(process, F::Push, Some(node), v, "client timeout".into());
        }
    }
}

/// One topic publish (or broadcast when `topic` is `*`), recorded.
pub async fn publish(ctx: &Ctx, process: u64, n: u64, node: u64, topic: &str) {
    let msg_id = format!("p{process}-{n}");
    let broadcast = topic == "*";
    let f = if broadcast { F::Broadcast } else { F::Publish };
    let v = Val {
        topic: Some(topic.to_string()),
        msg_id: Some(msg_id.clone()),
        ..Val::default()
    };
    ctx.rec.invoke(process, f, Some(node), v.clone());
    let call = async {
        let mut c = ctx
            .cluster
            .herald(node, false)
            .map_err(|e| Status::unknown(e.to_string()))?;
        if broadcast {
            c.broadcast(ctx.app.request(
                pb::BroadcastRequest {
                    app: ctx.app.id.clone(),
                    payload: msg_id.clone().into_bytes().into(),
                    msg_id: msg_id.clone(),
                    idempotency_key: msg_id.clone(),
                },
                CALL_TIMEOUT,
            ))
            .await
        } else {
            c.publish_topic(ctx.app.request(
                pb::PublishRequest {
                    app: ctx.app.id.clone(),
                    topic: topic.to_string(),
                    payload: msg_id.clone().into_bytes().into(),
                    msg_id: msg_id.clone(),
                    idempotency_key: msg_id.clone(),
                },
                CALL_TIMEOUT,
            ))
            .await
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(2), call).await {
        Ok(Ok(reply)) => {
            let reply = reply.into_inner();
            ctx.rec.ok(
                process,
                f,
                Some(node),
                Val {
                    topic_seq: Some(reply.seq),
                    log_index: Some(reply.log_index),
                    ..v
                },
            );
            ctx.tracker.published(topic, reply.seq, &msg_id);
        }
        Ok(Err(s)) => {
            let kind = classify(&s);
            ctx.rec
                .record(process, kind, f, Some(node), v, Some(status_text(&s)));
        }
        Err(_) => {
            ctx.rec.info(process, f, Some(node), v, "client timeout".into());
        }
    }
}

/// How a device's SDK client is set up.
#[derive(Clone)]
pub struct DeviceSpec {
    pub user: String,
    pub device: String,
    /// Dedupe scope (shared by instances that share `store`, one after another).
    pub scope: Option<u64>,
    pub store: Option<Arc<MemoryStore>>,
    pub topics: Vec<String>,
    /// Client addresses to try (in this order of preference; the SDK starts at a random one).
    pub nodes: Vec<String>,
    /// The tracker key its mailbox deliveries count for (the user), if tracked.
    pub track_mailbox: bool,
}

/// A running SDK client instance and its event recorder.
pub struct Device {
    pub client: Client,
    /// This instance's process id (= its `client` id in the history).
    pub pid: u64,
    pub scope: u64,
    pub user: String,
    pub device: String,
    /// Its current session epoch (0 before WELCOME).
    pub epoch: Arc<AtomicU64>,
    /// The node it is connected to (0 when not connected).
    pub node: Arc<AtomicU64>,
    /// Set when its session ended (kicked, closed, refused).
    pub ended: Arc<AtomicBool>,
    events: Option<tokio::task::JoinHandle<()>>,
}

impl Device {
    /// Opens a client instance and starts recording its events. The `connect` operation is
    /// invoked now and completes with WELCOME.
    pub async fn open(ctx: &Ctx, spec: DeviceSpec) -> anyhow::Result<Device> {
        let pid = ctx.rec.new_process();
        let scope = spec.scope.unwrap_or(pid);
        let base = Val {
            user: Some(spec.user.clone()),
            device: Some(spec.device.clone()),
            client: Some(pid),
            scope: Some(scope),
            ..Val::default()
        };
        ctx.rec.invoke(pid, F::Connect, None, base.clone());
        let mut b = Client::builder(ctx.app.id.clone(), spec.user.clone(), spec.device.clone())
            .token(ctx.app.token(&spec.user))
            .nodes(spec.nodes.clone())
            .backoff(BackoffConfig {
                initial: Duration::from_millis(300),
                max: Duration::from_secs(2),
                reset_after: Duration::from_secs(10),
            })
            .connection(|c| {
                c.connect_timeout(Duration::from_secs(2))
                    .handshake_timeout(Duration::from_secs(8))
            })
            .session(|s| s.request_timeout(Duration::from_secs(5)));
        if !spec.topics.is_empty() {
            b = b.topics(spec.topics.clone());
        }
        if let Some(store) = spec.store.clone() {
            b = b.store(store);
        }
        let (client, events) = match b.connect().await {
            Ok(pair) => pair,
            Err(e) => {
                ctx.rec.fail(pid, F::Connect, None, base, e.to_string());
                return Err(e.into());
            }
        };
        let epoch = Arc::new(AtomicU64::new(0));
        let node = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(record_events(
            ctx.clone(),
            client.clone(),
            events,
            pid,
            base,
            spec.track_mailbox,
            epoch.clone(),
            node.clone(),
            ended.clone(),
        ));
        Ok(Device {
            client,
            pid,
            scope,
            user: spec.user,
            device: spec.device,
            epoch,
            node,
            ended,
            events: Some(task),
        })
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Closes the instance (recorded as `close`: the node unregisters the session afterwards)
    /// and waits for its event recorder to finish.
    pub async fn close(mut self, ctx: &Ctx) {
        let v = Val {
            user: Some(self.user.clone()),
            device: Some(self.device.clone()),
            client: Some(self.pid),
            scope: Some(self.scope),
            epoch: Some(self.epoch.load(Ordering::Relaxed)).filter(|e| *e > 0),
            ..Val::default()
        };
        let node = Some(self.node.load(Ordering::Relaxed)).filter(|n| *n > 0);
        ctx.rec.invoke(self.pid, F::Close, node, v.clone());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.close()).await;
        if let Some(t) = self.events.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        ctx.rec.ok(self.pid, F::Close, node, v);
    }
}

/// Records one instance's events until its stream ends.
#[allow(clippy::too_many_arguments)]
async fn record_events(
    ctx: Ctx,
    client: Client,
    mut events: Events,
    pid: u64,
    base: Val,
    track_mailbox: bool,
    epoch: Arc<AtomicU64>,
    node: Arc<AtomicU64>,
    ended: Arc<AtomicBool>,
) {
    // The registration window open now: Connect (first) or Reconnect (after a loss).
    let mut window: Option<F> = Some(F::Connect);
    let user = base.user.clone().unwrap_or_default();
    let scope = base.scope.unwrap_or(pid);
    let mut closed_seen = false;
    let mut abandoned_before = 0u64;
    while let Some(ev) = events.next().await {
        let at_node = Some(node.load(Ordering::Relaxed)).filter(|n| *n > 0);
        match ev {
            Event::Connected {
                node_id, epoch: e, ..
            } => {
                epoch.store(e, Ordering::Relaxed);
                node.store(node_id, Ordering::Relaxed);
                let f = window.take().unwrap_or_else(|| {
                    ctx.rec.invoke(pid, F::Reconnect, None, base.clone());
                    F::Reconnect
                });
                let abandoned = client.abandoned_logins();
                let since = abandoned.saturating_sub(abandoned_before);
                abandoned_before = abandoned;
                ctx.rec.ok(
                    pid,
                    f,
                    Some(node_id),
                    Val {
                        epoch: Some(e),
                        abandoned: Some(since).filter(|n| *n > 0),
                        ..base.clone()
                    },
                );
            }
            Event::Disconnected { reason } => {
                let e = epoch.swap(0, Ordering::Relaxed);
                node.store(0, Ordering::Relaxed);
                ctx.rec.record(
                    pid,
                    Type::Ok,
                    F::Disconnected,
                    at_node,
                    Val {
                        epoch: Some(e).filter(|e| *e > 0),
                        reason: Some(reason.to_string()),
                        ..base.clone()
                    },
                    None,
                );
                if window.is_none() {
                    ctx.rec.invoke(pid, F::Reconnect, None, base.clone());
                    window = Some(F::Reconnect);
                }
            }
            Event::Message(m) => {
                let topic = m.topic.clone();
                let error = (m.payload.as_ref() != m.msg_id.as_bytes()).then(|| {
                    format!(
                        "payload {:?} differs from the msg id",
                        String::from_utf8_lossy(&m.payload)
                    )
                });
                ctx.rec.record(
                    pid,
                    Type::Ok,
                    F::Recv,
                    at_node,
                    Val {
                        msg_id: Some(m.msg_id.clone()),
                        seq: Some(m.seq).filter(|s| *s > 0),
                        topic: topic.clone(),
                        topic_seq: topic.as_ref().map(|_| m.topic_seq),
                        epoch: Some(epoch.load(Ordering::Relaxed)).filter(|e| *e > 0),
                        ..base.clone()
                    },
                    error,
                );
                let now = ctx.rec.now_us();
                match topic {
                    None if track_mailbox => ctx.tracker.received(&user, &m.msg_id, now),
                    None => ctx.tracker.last_recv_us.store(now, Ordering::Relaxed),
                    Some(_) => ctx.tracker.received(&format!("scope:{scope}"), &m.msg_id, now),
                }
            }
            Event::Gap(g) => {
                ctx.rec.ok(
                    pid,
                    F::Gap,
                    at_node,
                    Val {
                        topic: g.topic.clone(),
                        from_seq: Some(g.from_seq),
                        to_seq: Some(g.to_seq),
                        reason: Some(format!("{:?}", g.reason)),
                        ..base.clone()
                    },
                );
            }
            Event::Subscribed { topic, seq } => {
                ctx.tracker.subscribed(scope, &topic, seq);
                ctx.rec.ok(
                    pid,
                    F::Subscribed,
                    at_node,
                    Val {
                        topic: Some(topic),
                        seq: Some(seq),
                        ..base.clone()
                    },
                );
            }
            ev @ Event::Kicked { .. } => {
                ended.store(true, Ordering::Relaxed);
                closed_seen = true;
                ctx.rec.ok(
                    pid,
                    F::Kicked,
                    at_node,
                    Val {
                        epoch: Some(epoch.load(Ordering::Relaxed)).filter(|e| *e > 0),
                        reason: Some(format!("{ev:?}")),
                        ..base.clone()
                    },
                );
            }
            Event::Closed(e) => {
                ended.store(true, Ordering::Relaxed);
                closed_seen = true;
                ctx.rec.ok(
                    pid,
                    F::Closed,
                    at_node,
                    Val {
                        reason: Some(e.to_string()),
                        ..base.clone()
                    },
                );
            }
            _ => {}
        }
    }
    ended.store(true, Ordering::Relaxed);
    if let Some(f) = window.take() {
        ctx.rec.info(
            pid,
            f,
            None,
            base.clone(),
            "the session ended before it was registered".into(),
        );
    }
    if !closed_seen {
        ctx.rec.ok(
            pid,
            F::Closed,
            None,
            Val {
                reason: Some("event stream ended".into()),
                ..base
            },
        );
    }
}
