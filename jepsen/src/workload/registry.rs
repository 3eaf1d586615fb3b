//! `registry`: operations on the session registry, for the linearizability checker.
//!
//! Each worker owns one user at a time with two devices and, at its share of the rate, connects
//! a device (an SDK client: the `connect` operation completes with WELCOME's epoch), closes one,
//! kicks one or all of them (gRPC Kick, which returns how many sessions it ended) or reads the
//! user's sessions (gRPC Status). Every 20 s or 40 operations the worker moves on to a fresh
//! user, which keeps each user's history short enough for an exhaustive search.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use herald_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::Rng;

use super::{classify, Ctx, Device, DeviceSpec, CALL_TIMEOUT};
use crate::history::{SessionObs, Val, F};

const DEVICES: [&str; 2] = ["d0", "d1"];
const ROTATE_AFTER: Duration = Duration::from_secs(20);
const ROTATE_OPS: u32 = 40;

pub struct Registry {
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Registry {
    pub fn start(ctx: &Ctx, workers: usize) -> Registry {
        let mut handles = Vec::new();
        for w in 0..workers {
            let ctx = ctx.clone();
            handles.push(tokio::spawn(async move { worker(ctx, w, workers).await }));
        }
        Registry { workers: handles }
    }

    /// Waits until every worker stopped and closed its clients.
    pub async fn stopped(&mut self) {
        for h in self.workers.drain(..) {
            let _ = h.await;
        }
    }
}

async fn worker(ctx: Ctx, w: usize, workers: usize) {
    let process = ctx.rec.new_process();
    let mut rng = ctx.rng("registry", w as u64);
    let mut gen = 0u32;
    let mut user = format!("r-w{w}-g{gen}");
    let mut since = Instant::now();
    let mut ops = 0u32;
    let mut open: BTreeMap<&'static str, Device> = BTreeMap::new();
    while ctx.pace(&mut rng, workers).await {
        open.retain(|_, d| !d.is_ended());
        if since.elapsed() > ROTATE_AFTER || ops >= ROTATE_OPS {
            for (_, d) in std::mem::take(&mut open) {
                d.close(&ctx).await;
            }
            gen += 1;
            user = format!("r-w{w}-g{gen}");
            since = Instant::now();
            ops = 0;
        }
        ops += 1;
        let roll = rng.gen_range(0..100);
        let free: Vec<&'static str> = DEVICES
            .iter()
            .copied()
            .filter(|d| !open.contains_key(d))
            .collect();
        let busy: Vec<&'static str> = open.keys().copied().collect();
        if roll < 25 && !free.is_empty() {
            let device = free[rng.gen_range(0..free.len())];
            let nodes = ctx.shuffled_client_addrs(&mut rng);
            if let Ok(d) = Device::open(
                &ctx,
                DeviceSpec {
                    user: user.clone(),
                    device: device.into(),
                    scope: None,
                    store: None,
                    topics: vec![],
                    nodes,
                    track_mailbox: false,
                },
            )
            .await
            {
                open.insert(device, d);
            }
        } else if roll < 40 && !busy.is_empty() {
            let device = busy[rng.gen_range(0..busy.len())];
            if let Some(d) = open.remove(device) {
                d.close(&ctx).await;
            }
        } else if roll < 60 {
            let device = (rng.gen_range(0..5) > 0).then(|| DEVICES[rng.gen_range(0..DEVICES.len())]);
            kick(&ctx, process, &mut rng, &user, device).await;
        } else {
            status(&ctx, process, &mut rng, &user).await;
        }
    }
    for (_, d) in open {
        d.close(&ctx).await;
    }
}

async fn kick(ctx: &Ctx, process: u64, rng: &mut StdRng, user: &str, device: Option<&str>) {
    let node = ctx.random_node(rng);
    let v = Val {
        user: Some(user.into()),
        device: device.map(str::to_string),
        ..Val::default()
    };
    ctx.rec.invoke(process, F::Kick, Some(node), v.clone());
    let req = pb::KickRequest {
        app: ctx.app.id.clone(),
        user: user.into(),
        device: device.unwrap_or_default().into(),
        reason: "jepsen".into(),
    };
    let call = async {
        let mut c = ctx
            .cluster
            .herald(node, false)
            .map_err(|e| tonic::Status::unknown(e.to_string()))?;
        c.kick(ctx.app.request(req, CALL_TIMEOUT)).await
    };
    match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(2), call).await {
        Ok(Ok(r)) => {
            ctx.rec.ok(
                process,
                F::Kick,
                Some(node),
                Val {
                    count: Some(u64::from(r.into_inner().kicked)),
                    ..v
                },
            );
        }
        Ok(Err(s)) => {
            ctx.rec.record(
                process,
                classify(&s),
                F::Kick,
                Some(node),
                v,
                Some(format!("{:?}: {}", s.code(), s.message())),
            );
        }
        Err(_) => {
            ctx.rec
                .info(process, F::Kick, Some(node), v, "client timeout".into());
        }
    }
}

async fn status(ctx: &Ctx, process: u64, rng: &mut StdRng, user: &str) {
    let node = ctx.random_node(rng);
    let v = Val {
        user: Some(user.into()),
        ..Val::default()
    };
    ctx.rec.invoke(process, F::Status, Some(node), v.clone());
    let req = pb::StatusRequest {
        app: ctx.app.id.clone(),
        user: user.into(),
    };
    let call = async {
        let mut c = ctx
            .cluster
            .herald(node, false)
            .map_err(|e| tonic::Status::unknown(e.to_string()))?;
        c.status(ctx.app.request(req, Duration::from_secs(5))).await
    };
    match tokio::time::timeout(Duration::from_secs(7), call).await {
        Ok(Ok(r)) => {
            let mut sessions: Vec<SessionObs> = r
                .into_inner()
                .sessions
                .into_iter()
                .map(|s| SessionObs {
                    device: s.device,
                    epoch: s.epoch,
                    node: s.node_id,
                })
                .collect();
            sessions.sort();
            ctx.rec.ok(
                process,
                F::Status,
                Some(node),
                Val {
                    sessions: Some(sessions),
                    ..v
                },
            );
        }
        Ok(Err(s)) => {
            ctx.rec.info(
                process,
                F::Status,
                Some(node),
                v,
                format!("{:?}: {}", s.code(), s.message()),
            );
        }
        Err(_) => {
            ctx.rec
                .info(process, F::Status, Some(node), v, "client timeout".into());
        }
    }
}
