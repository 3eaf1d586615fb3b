//! `topics`: topic publishes and broadcasts.
//!
//! `users` subscribers stay online subscribed to `t0`, `t1` and the broadcast topic `*` (listed
//! explicitly so the SDK reports where each subscription starts). Publishers send to `t0`/`t1`
//! (PublishTopic) and to everyone (Broadcast) through random nodes. Every acknowledged publish
//! after a subscriber's subscription started must reach it, once, in topic-seq order.

use std::sync::Arc;

use herald_client::MemoryStore;
use rand::Rng;

use super::{publish, Ctx, Device, DeviceSpec};

pub const TOPICS: [&str; 2] = ["t0", "t1"];

pub struct Topics {
    devices: Vec<Device>,
    /// How each device was opened (to open it again).
    specs: Vec<DeviceSpec>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Topics {
    pub async fn start(ctx: &Ctx, users: usize, workers: usize) -> anyhow::Result<Topics> {
        let mut rng = ctx.rng("topics", 0);
        let mut devices = Vec::new();
        let mut specs = Vec::new();
        for u in 0..users {
            let nodes = ctx.shuffled_client_addrs(&mut rng);
            let spec = DeviceSpec {
                user: format!("t-u{u}"),
                device: "d0".into(),
                scope: None,
                store: Some(Arc::new(MemoryStore::new())),
                topics: TOPICS
                    .iter()
                    .map(|t| t.to_string())
                    .chain(["*".to_string()])
                    .collect(),
                nodes,
                track_mailbox: false,
            };
            devices.push(Device::open(ctx, spec.clone()).await?);
            specs.push(spec);
        }
        let mut handles = Vec::new();
        for w in 0..workers {
            let ctx = ctx.clone();
            let process = ctx.rec.new_process();
            handles.push(tokio::spawn(async move {
                let mut rng = ctx.rng("topics-publish", w as u64);
                let mut n = 0u64;
                while ctx.pace(&mut rng, workers).await {
                    let roll = rng.gen_range(0..10);
                    let topic = if roll == 0 { "*" } else { TOPICS[roll % 2] };
                    let node = ctx.random_node(&mut rng);
                    n += 1;
                    publish(&ctx, process, n, node, topic).await;
                }
            }));
        }
        Ok(Topics {
            devices,
            specs,
            workers: handles,
        })
    }

    pub async fn stopped(&mut self) {
        for h in self.workers.drain(..) {
            let _ = h.await;
        }
    }

    /// Opens again, for the drain, every device whose session ended for good during the run (the
    /// SDK gives up on a refused token, as an app would until it fetched a new one): what its
    /// user was sent must still arrive, or the lost checker names it.
    pub async fn drain_online(&mut self, ctx: &Ctx) {
        for (d, spec) in self.devices.iter_mut().zip(&self.specs) {
            if d.is_ended() {
                // The same store, so the same dedupe scope: it resumes where the old one ended.
                let spec = DeviceSpec {
                    scope: Some(d.scope),
                    ..spec.clone()
                };
                if let Ok(again) = Device::open(ctx, spec).await {
                    let old = std::mem::replace(d, again);
                    old.close(ctx).await;
                }
            }
        }
    }

    pub async fn close(self, ctx: &Ctx) {
        for d in self.devices {
            d.close(ctx).await;
        }
    }
}
