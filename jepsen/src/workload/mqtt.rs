//! `mqtt`: online users whose one device is an MQTT 5.0 client with a persistent session
//! (Herald's `--mqtt-addr`, docs/MQTT.md), receiving QoS-1 unicast pushes on `$herald/inbox` and
//! PUBACKing them. When its connection breaks (a killed, paused, cut-off or skewed node) it
//! reconnects to another node after a short backoff, as an MQTT app with a node list would.
//!
//! The client is written here on the herald-mqtt codec, not the SDK: every delivery is recorded
//! as `recv` with the mailbox seq and msg id the node puts in its 5.0 user properties
//! (`herald-seq`, `herald-msg-id`), and every connection as `connect`/`reconnect` with the
//! CONNACK's `herald-epoch`, so the lost, unexpected, duplicates, order and fencing checkers judge
//! it like an SDK client. QoS 1 may deliver again what was sent before a connection broke (MQTT
//! allows it, and DUP is not set): the client drops a seq it already handed to the app, as an
//! app that dedupes by `herald-seq` does.

use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_mqtt::{Ack, Connect, Packet, Properties, QoS, ReasonCode, Subscribe, Subscription, Version};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{push, Ctx};
use crate::history::{Type, Val, F};

pub struct Mqtt {
    devices: Vec<(tokio::task::JoinHandle<()>, Arc<AtomicBool>)>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Mqtt {
    pub fn start(ctx: &Ctx, users: usize, workers: usize) -> Mqtt {
        let mut devices = Vec::new();
        for u in 0..users {
            let done = Arc::new(AtomicBool::new(false));
            let ctx2 = ctx.clone();
            let d = done.clone();
            devices.push((tokio::spawn(device(ctx2, format!("mq-u{u}"), u as u64, d)), done));
        }
        let mut handles = Vec::new();
        for w in 0..workers {
            let ctx = ctx.clone();
            let process = ctx.rec.new_process();
            handles.push(tokio::spawn(async move {
                let mut rng = ctx.rng("mqtt-push", w as u64);
                let mut n = 0u64;
                while ctx.pace(&mut rng, workers).await {
                    let user = format!("mq-u{}", rng.gen_range(0..users));
                    let node = ctx.random_node(&mut rng);
                    n += 1;
                    push(&ctx, process, n, node, &user).await;
                }
            }));
        }
        Mqtt {
            devices,
            workers: handles,
        }
    }

    pub async fn stopped(&mut self) {
        for h in self.workers.drain(..) {
            let _ = h.await;
        }
    }

    /// Ends every device (a normal DISCONNECT) after the drain.
    pub async fn close(self) {
        for (_, done) in &self.devices {
            done.store(true, Ordering::Relaxed);
        }
        for (h, _) in self.devices {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

/// One device: connect, receive, reconnect elsewhere, until `done`.
async fn device(ctx: Ctx, user: String, n: u64, done: Arc<AtomicBool>) {
    let pid = ctx.rec.new_process();
    let base = Val {
        user: Some(user.clone()),
        device: Some("d0".into()),
        client: Some(pid),
        scope: Some(pid),
        ..Val::default()
    };
    let mut rng = ctx.rng("mqtt-device", n);
    let mut last_seq = 0u64;
    let mut f = F::Connect;
    let mut node = ctx.random_node(&mut rng);
    ctx.rec.invoke(pid, f, None, base.clone());
    while !done.load(Ordering::Relaxed) {
        let addr = ctx.cluster.mqtt_addr(node);
        match session(&ctx, &base, pid, &addr, node, &mut last_seq, &done, f).await {
            Ok(()) => break,
            Err(Outcome::NotConnected(e)) => {
                // Still the same connect attempt: try the next node.
                tracing::debug!(%user, node, error = %e, "mqtt connect failed");
            }
            Err(Outcome::Lost(reason, epoch)) => {
                ctx.rec.record(
                    pid,
                    Type::Ok,
                    F::Disconnected,
                    Some(node),
                    Val {
                        epoch: Some(epoch).filter(|e| *e > 0),
                        reason: Some(reason),
                        ..base.clone()
                    },
                    None,
                );
                f = F::Reconnect;
                ctx.rec.invoke(pid, f, None, base.clone());
            }
        }
        node = ctx
            .cluster
            .ids
            .iter()
            .copied()
            .filter(|id| *id != node)
            .nth(rng.gen_range(0..ctx.cluster.ids.len().saturating_sub(1).max(1)))
            .unwrap_or(node);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..600))).await;
    }
    ctx.rec.ok(
        pid,
        F::Closed,
        None,
        Val {
            reason: Some("closed by the workload".into()),
            ..base
        },
    );
}

enum Outcome {
    /// No CONNACK: the connect attempt goes on elsewhere.
    NotConnected(String),
    /// A connection that had its CONNACK ended (reason, its epoch).
    Lost(String, u64),
}

#[allow(clippy::too_many_arguments)]
async fn session(
    ctx: &Ctx,
    base: &Val,
    pid: u64,
    addr: &str,
    node: u64,
    last_seq: &mut u64,
    done: &AtomicBool,
    f: F,
) -> Result<(), Outcome> {
    let v = Version::V5;
    let nc = |e: String| Outcome::NotConnected(e);
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| nc("connect timed out".into()))?
        .map_err(|e| nc(e.to_string()))?;
    let user = base.user.clone().unwrap_or_default();
    let connect = Connect {
        version: v,
        clean_start: false,
        keep_alive: 10,
        properties: Properties::default(),
        client_id: "d0".into(),
        will: None,
        user_name: Some(ctx.app.id.clone()),
        password: Some(Bytes::from(ctx.app.token(&user))),
    };
    let sub = Subscribe {
        packet_id: NonZeroU16::MIN,
        properties: Properties::default(),
        subscriptions: vec![Subscription {
            filter: "$herald/inbox".into(),
            options: herald_mqtt::SubscriptionOptions::new(QoS::AtLeastOnce),
        }],
    };
    let mut out = BytesMut::new();
    herald_mqtt::encode(&Packet::Connect(connect), v, &mut out).map_err(|e| nc(e.to_string()))?;
    herald_mqtt::encode(&Packet::Subscribe(sub), v, &mut out).map_err(|e| nc(e.to_string()))?;
    s.write_all(&out).await.map_err(|e| nc(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut epoch = 0u64;
    let mut last_rx = tokio::time::Instant::now();
    let mut pinged = false;
    loop {
        if done.load(Ordering::Relaxed) && epoch > 0 {
            let mut out = BytesMut::new();
            let d = herald_mqtt::Disconnect {
                reason: ReasonCode::NORMAL_DISCONNECTION,
                properties: Properties::default(),
            };
            let _ = herald_mqtt::encode(&Packet::Disconnect(d), v, &mut out);
            let _ = s.write_all(&out).await;
            ctx.rec.ok(
                pid,
                F::Close,
                Some(node),
                Val {
                    epoch: Some(epoch),
                    ..base.clone()
                },
            );
            return Ok(());
        }
        // Read what arrived, waking every 500 ms to check `done` and the keep alive.
        let read = tokio::time::timeout(Duration::from_millis(500), s.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                let why = "connection closed".to_string();
                return Err(if epoch > 0 {
                    Outcome::Lost(why, epoch)
                } else {
                    nc(why)
                });
            }
            Ok(Ok(_)) => {
                last_rx = tokio::time::Instant::now();
                pinged = false;
            }
            Err(_) => {
                let idle = last_rx.elapsed();
                if idle > Duration::from_secs(15) {
                    let why = "no answer to PINGREQ".to_string();
                    return Err(if epoch > 0 {
                        Outcome::Lost(why, epoch)
                    } else {
                        nc(why)
                    });
                }
                if idle > Duration::from_secs(5) && !pinged {
                    let mut out = BytesMut::new();
                    let _ = herald_mqtt::encode(&Packet::PingReq, v, &mut out);
                    let _ = s.write_all(&out).await;
                    pinged = true;
                }
                continue;
            }
        }
        let mut out = BytesMut::new();
        loop {
            let p = match herald_mqtt::decode(&mut buf, Some(v), 1 << 20) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    let why = format!("bad packet from the node: {e}");
                    return Err(if epoch > 0 {
                        Outcome::Lost(why, epoch)
                    } else {
                        nc(why)
                    });
                }
            };
            match p {
                Packet::ConnAck(a) if a.reason == ReasonCode::SUCCESS => {
                    epoch = prop(&a.properties, "herald-epoch").unwrap_or(0);
                    ctx.rec.ok(
                        pid,
                        f,
                        Some(node),
                        Val {
                            epoch: Some(epoch),
                            ..base.clone()
                        },
                    );
                }
                Packet::ConnAck(a) => return Err(nc(format!("CONNACK {}", a.reason.name()))),
                Packet::Publish(p) => {
                    let seq = prop(&p.properties, "herald-seq").unwrap_or(0);
                    let msg_id = p
                        .properties
                        .user_properties
                        .iter()
                        .find(|(k, _)| k == "herald-msg-id")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    if seq > *last_seq {
                        *last_seq = seq;
                        let error = (p.payload.as_ref() != msg_id.as_bytes()).then(|| {
                            format!(
                                "payload {:?} differs from the msg id",
                                String::from_utf8_lossy(&p.payload)
                            )
                        });
                        ctx.rec.record(
                            pid,
                            Type::Ok,
                            F::Recv,
                            Some(node),
                            Val {
                                msg_id: Some(msg_id.clone()),
                                seq: Some(seq),
                                epoch: Some(epoch).filter(|e| *e > 0),
                                ..base.clone()
                            },
                            error,
                        );
                        ctx.tracker.received(&user, &msg_id, ctx.rec.now_us());
                    }
                    if let Some(packet_id) = p.packet_id {
                        let ack = Ack {
                            packet_id,
                            reason: ReasonCode::SUCCESS,
                            properties: Properties::default(),
                        };
                        let _ = herald_mqtt::encode(&Packet::PubAck(ack), v, &mut out);
                    }
                }
                Packet::Disconnect(d) => {
                    let why = format!("DISCONNECT {}", d.reason.name());
                    return Err(if epoch > 0 {
                        Outcome::Lost(why, epoch)
                    } else {
                        nc(why)
                    });
                }
                _ => {}
            }
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            let why = "write failed".to_string();
            return Err(if epoch > 0 {
                Outcome::Lost(why, epoch)
            } else {
                nc(why)
            });
        }
    }
}

/// A numeric user property.
fn prop(p: &Properties, name: &str) -> Option<u64> {
    p.user_properties
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
}
