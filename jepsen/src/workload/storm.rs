//! `storm`: reconnect storms and session migration.
//!
//! `users` devices are online. Every 3–7 s half of them log in again at the same moment through
//! another node (a new app instance with the same cursor store: the phone moved networks); the
//! cluster must end every old session (KICKED `replaced`) and deliver to the new one only. Old
//! instances that were not ended after 5 s are closed by the workload. Pushers keep sending to
//! these users throughout; the fencing checker looks for a delivery to a replaced session.

use std::sync::Arc;
use std::time::Duration;

use herald_client::MemoryStore;
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::time::Instant;

use super::{push, Ctx, Device, DeviceSpec};

struct Slot {
    user: String,
    store: Arc<MemoryStore>,
}

type Retiring = Arc<Mutex<Vec<(Instant, Device)>>>;

pub struct Storm {
    slots: Arc<Vec<Slot>>,
    current: Arc<Mutex<Vec<Option<Device>>>>,
    retiring: Retiring,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn spec(ctx: &Ctx, s: &Slot, avoid: Option<String>, rng: &mut rand::rngs::StdRng) -> DeviceSpec {
    let mut nodes: Vec<String> = ctx
        .cluster
        .client_addrs()
        .into_iter()
        .filter(|a| Some(a) != avoid.as_ref())
        .collect();
    nodes.shuffle(rng);
    DeviceSpec {
        user: s.user.clone(),
        device: "d0".into(),
        scope: None,
        store: Some(s.store.clone()),
        topics: vec![],
        nodes,
        track_mailbox: true,
    }
}

impl Storm {
    pub async fn start(ctx: &Ctx, users: usize, workers: usize) -> anyhow::Result<Storm> {
        let slots: Arc<Vec<Slot>> = Arc::new(
            (0..users)
                .map(|u| Slot {
                    user: format!("s-u{u}"),
                    store: Arc::new(MemoryStore::new()),
                })
                .collect(),
        );
        let mut rng = ctx.rng("storm", 0);
        let mut current = Vec::new();
        for s in slots.iter() {
            current.push(Some(Device::open(ctx, spec(ctx, s, None, &mut rng)).await?));
        }
        let current = Arc::new(Mutex::new(current));
        let retiring: Retiring = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        {
            let (ctx, slots, current, retiring) =
                (ctx.clone(), slots.clone(), current.clone(), retiring.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = ctx.rng("storm-loop", 0);
                loop {
                    let wait = Duration::from_millis(rng.gen_range(3000..7000));
                    tokio::select! {
                        _ = ctx.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    // Close old instances whose time is up.
                    let due: Vec<Device> = {
                        let mut r = retiring.lock();
                        let now = Instant::now();
                        let (due, keep): (Vec<_>, Vec<_>) = r.drain(..).partition(|(t, _)| *t <= now);
                        *r = keep;
                        due.into_iter().map(|(_, d)| d).collect()
                    };
                    for d in due {
                        d.close(&ctx).await;
                    }
                    // The storm: half of the devices log in again at once, elsewhere.
                    let mut idx: Vec<usize> = (0..slots.len()).collect();
                    idx.shuffle(&mut rng);
                    idx.truncate(slots.len().div_ceil(2));
                    let mut opens = Vec::new();
                    for i in idx {
                        let node = current.lock()[i]
                            .as_ref()
                            .map(|d| d.node.load(std::sync::atomic::Ordering::Relaxed))
                            .filter(|n| *n > 0);
                        let avoid = node.map(|n| ctx.cluster.client_addr(n));
                        let sp = spec(&ctx, &slots[i], avoid, &mut rng);
                        let ctx = ctx.clone();
                        opens.push(async move { (i, Device::open(&ctx, sp).await) });
                    }
                    for (i, d) in futures::future::join_all(opens).await {
                        let Ok(d) = d else { continue };
                        let old = current.lock()[i].replace(d);
                        if let Some(old) = old {
                            retiring
                                .lock()
                                .push((Instant::now() + Duration::from_secs(5), old));
                        }
                    }
                }
            }));
        }
        for w in 0..workers {
            let ctx = ctx.clone();
            let process = ctx.rec.new_process();
            tasks.push(tokio::spawn(async move {
                let mut rng = ctx.rng("storm-push", w as u64);
                let mut n = 0u64;
                while ctx.pace(&mut rng, workers).await {
                    let user = format!("s-u{}", rng.gen_range(0..users));
                    let node = ctx.random_node(&mut rng);
                    n += 1;
                    push(&ctx, process, n, node, &user).await;
                }
            }));
        }
        Ok(Storm {
            slots,
            current,
            retiring,
            tasks,
        })
    }

    pub async fn stopped(&mut self, ctx: &Ctx) {
        for h in self.tasks.drain(..) {
            let _ = h.await;
        }
        let old: Vec<Device> = self.retiring.lock().drain(..).map(|(_, d)| d).collect();
        for d in old {
            d.close(ctx).await;
        }
    }

    /// Drain: every user logs in once more on a fresh device instance (same store, so it resumes
    /// from its last acked seq). A device whose reconnect was cut short by the stop would
    /// otherwise leave its user's last pushes unread, and they would look lost.
    pub async fn drain_online(&mut self, ctx: &Ctx) {
        let mut rng = ctx.rng("storm-drain", 0);
        for (i, slot) in self.slots.iter().enumerate() {
            let Ok(d) = Device::open(ctx, spec(ctx, slot, None, &mut rng)).await else {
                continue;
            };
            let old = self.current.lock()[i].replace(d);
            if let Some(old) = old {
                old.close(ctx).await;
            }
        }
    }

    pub async fn close(self, ctx: &Ctx) {
        let devices: Vec<Device> = self.current.lock().drain(..).flatten().collect();
        for d in devices {
            d.close(ctx).await;
        }
    }
}
