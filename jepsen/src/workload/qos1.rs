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
    /// How each device was opened (to open it again).
    specs: Vec<DeviceSpec>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Qos1 {
    pub async fn start(ctx: &Ctx, users: usize, workers: usize) -> anyhow::Result<Qos1> {
        let mut rng = ctx.rng("qos1", 0);
        let mut devices = Vec::new();
        let mut specs = Vec::new();
        for u in 0..users {
            let nodes = ctx.shuffled_client_addrs(&mut rng);
            let spec = DeviceSpec {
                user: format!("q-u{u}"),
                device: "d0".into(),
                scope: None,
                store: Some(Arc::new(MemoryStore::new())),
                topics: vec![],
                nodes,
                track_mailbox: true,
            };
            devices.push(Device::open(ctx, spec.clone()).await?);
            specs.push(spec);
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
            specs,
            workers: handles,
        })
    }

    /// Waits for the pushers to finish their last operation.
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
