//! `offline`: users who are mostly away. Each device is offline for 1–6 s, then an app instance
//! starts, stays 1–4 s (receiving what was stored meanwhile) and closes cleanly; the next
//! instance of the device resumes from the same cursor store, as an app restart does, so the
//! instances of a device share one dedupe scope. Pushers keep sending throughout, each push with
//! a TTL of 3–10 minutes (real time): no absence is that long, so a message that expires in a run
//! expired early, which the lost checker reports (`expired-early`). For the drain every device
//! comes online and stays.

use std::sync::Arc;
use std::time::Duration;

use herald_client::MemoryStore;
use rand::Rng;

use super::{push_with_ttl, Ctx, Device, DeviceSpec};

struct Slot {
    user: String,
    store: Arc<MemoryStore>,
    scope: u64,
}

pub struct Offline {
    slots: Vec<Arc<Slot>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    online: Vec<Device>,
}

fn spec(ctx: &Ctx, s: &Slot, rng: &mut rand::rngs::StdRng) -> DeviceSpec {
    DeviceSpec {
        user: s.user.clone(),
        device: "d0".into(),
        scope: Some(s.scope),
        store: Some(s.store.clone()),
        topics: vec![],
        nodes: ctx.shuffled_client_addrs(rng),
        track_mailbox: true,
    }
}

impl Offline {
    pub fn start(ctx: &Ctx, users: usize, workers: usize) -> Offline {
        let slots: Vec<Arc<Slot>> = (0..users)
            .map(|u| {
                Arc::new(Slot {
                    user: format!("o-u{u}"),
                    store: Arc::new(MemoryStore::new()),
                    scope: ctx.rec.new_process(),
                })
            })
            .collect();
        let mut loops = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            let ctx = ctx.clone();
            let slot = slot.clone();
            loops.push(tokio::spawn(async move {
                let mut rng = ctx.rng("offline-device", i as u64);
                loop {
                    let away = Duration::from_millis(rng.gen_range(1000..6000));
                    tokio::select! {
                        _ = ctx.stop.cancelled() => return,
                        _ = tokio::time::sleep(away) => {}
                    }
                    let Ok(d) = Device::open(&ctx, spec(&ctx, &slot, &mut rng)).await else {
                        continue;
                    };
                    let stay = Duration::from_millis(rng.gen_range(1000..4000));
                    tokio::select! {
                        _ = ctx.stop.cancelled() => {}
                        _ = tokio::time::sleep(stay) => {}
                    }
                    d.close(&ctx).await;
                    if ctx.stop.is_cancelled() {
                        return;
                    }
                }
            }));
        }
        let mut handles = Vec::new();
        for w in 0..workers {
            let ctx = ctx.clone();
            let process = ctx.rec.new_process();
            handles.push(tokio::spawn(async move {
                let mut rng = ctx.rng("offline-push", w as u64);
                let mut n = 0u64;
                while ctx.pace(&mut rng, workers).await {
                    let user = format!("o-u{}", rng.gen_range(0..users));
                    let node = ctx.random_node(&mut rng);
                    n += 1;
                    // TTLs of minutes: longer than any absence here, so an EXPIRED gap can only
                    // come from log time running ahead of real time (the lost checker judges it).
                    let ttl_ms = rng.gen_range(3..=10u64) * 60_000;
                    push_with_ttl(&ctx, process, n, node, &user, ttl_ms).await;
                }
            }));
        }
        Offline {
            slots,
            loops,
            workers: handles,
            online: Vec::new(),
        }
    }

    pub async fn stopped(&mut self) {
        for h in self.workers.drain(..).chain(self.loops.drain(..)) {
            let _ = h.await;
        }
    }

    /// Brings every device online for the drain.
    pub async fn drain_online(&mut self, ctx: &Ctx) {
        let mut rng = ctx.rng("offline-drain", 0);
        for s in &self.slots {
            if let Ok(d) = Device::open(ctx, spec(ctx, s, &mut rng)).await {
                self.online.push(d);
            }
        }
    }

    pub async fn close(self, ctx: &Ctx) {
        for d in self.online {
            d.close(ctx).await;
        }
    }
}
