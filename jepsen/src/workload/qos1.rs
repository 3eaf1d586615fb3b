//! `qos1`: online users receive QoS-1 unicast pushes and ack them (the SDK's automatic acks).
//!
//! `users` users keep one device online for the whole run (the SDK reconnects it through every
//! fault); `workers` pushers send to random users through random nodes.

use std::sync::Arc;

use herald_client::MemoryStore;
use rand::Rng;

use super::{push, Ctx, Device, DeviceSpec};

pub struct Qos1 {
    devices: Vec<Device>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Qos1 {
    pub async fn start(ctx: &Ctx, users: usize, workers: usize) -> anyhow::Result<Qos1> {
        let mut rng = ctx.rng("qos1", 0);
        let mut devices = Vec::new();
        for u in 0..users {
            let nodes = ctx.shuffled_client_addrs(&mut rng);
            devices.push(
                Device::open(
                    ctx,
                    DeviceSpec {
                        user: format!("q-u{u}"),
                        device: "d0".into(),
                        scope: None,
                        store: Some(Arc::new(MemoryStore::new())),
                        topics: vec![],
                        nodes,
                        track_mailbox: true,
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
                let mut rng = ctx.rng("qos1-push", w as u64);
                let mut n = 0u64;
                while ctx.pace(&mut rng, workers).await {
                    let user = format!("q-u{}", rng.gen_range(0..users));
                    let node = ctx.random_node(&mut rng);
                    n += 1;
                    push(&ctx, process, n, node, &user).await;
                }
            }));
        }
        Ok(Qos1 {
            devices,
            workers: handles,
        })
    }

    /// Waits for the pushers to finish their last operation.
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
