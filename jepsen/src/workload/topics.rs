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
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Topics {
    pub async fn start(ctx: &Ctx, users: usize, workers: usize) -> anyhow::Result<Topics> {
        let mut rng = ctx.rng("topics", 0);
        let mut devices = Vec::new();
        for u in 0..users {
            let nodes = ctx.shuffled_client_addrs(&mut rng);
            devices.push(
                Device::open(
                    ctx,
                    DeviceSpec {
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
                    },
                )
                .await?,
            );
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
            workers: handles,
        })
    }

    pub async fn stopped(&mut self) {
        for h in self.workers.drain(..) {
            let _ = h.await;
        }
    }

    pub async fn close(self, ctx: &Ctx) {
        for d in self.devices {
            d.close(ctx).await;
        }
    }
}
