//! A user-space TCP proxy between SDK clients and a node, standing in for the network path of a
//! phone: it counts the flows (TCP connections) it carries and, like a carrier NAT, can forget a
//! flow that stayed idle for too long.
//!
//! A forgotten flow is not closed politely: the proxy closes its side towards the node and from
//! then on silently drops whatever the client sends, as a NAT that lost its mapping does. The
//! client only notices because its pings go unanswered. The proxy also reads the client's
//! frames (plain TCP only) to record the PINGs and the heartbeat interval each one announces.

#![allow(dead_code)] // Shared by test modules; not every helper is used by each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use herald_proto::client::frame::Kind;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// One PING a client sent through the proxy.
#[derive(Debug, Clone, Copy)]
pub struct PingSeen {
    /// Which flow (1 = the first accepted).
    pub flow: u64,
    /// When it went through.
    pub at: Instant,
    /// The interval the client announced with it.
    pub interval_ms: u32,
    /// How long the flow had been idle (no byte either way) before it.
    pub idle: Duration,
}

#[derive(Default)]
struct Shared {
    flows: AtomicU64,
    cut: AtomicU64,
    pings: Mutex<Vec<PingSeen>>,
}

/// A proxy listening on a loopback port; stops when dropped.
pub struct Proxy {
    addr: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Proxy {
    /// Forwards every connection to `target`; with `idle_cutoff`, forgets flows idle that long.
    pub async fn start(target: &str, idle_cutoff: Option<Duration>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let (target, s, st) = (target.to_string(), shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                };
                let flow = s.flows.fetch_add(1, Ordering::Relaxed) + 1;
                let (target, s, st) = (target.clone(), s.clone(), st.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = carry(flow, client, &target, idle_cutoff, &s) => {}
                    }
                });
            }
        });
        Proxy { addr, shared, stop }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Flows (client connections) accepted so far.
    pub fn flows(&self) -> u64 {
        self.shared.flows.load(Ordering::Relaxed)
    }

    /// Flows forgotten for idleness so far.
    pub fn cut(&self) -> u64 {
        self.shared.cut.load(Ordering::Relaxed)
    }

    /// Every PING seen so far, in order.
    pub fn pings(&self) -> Vec<PingSeen> {
        self.shared.pings.lock().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Carries one flow until either side closes it (or it is forgotten and the client gives up).
async fn carry(flow: u64, mut client: TcpStream, target: &str, cutoff: Option<Duration>, s: &Shared) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cbuf, mut sbuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let mut frames = BytesMut::new();
    let mut last = Instant::now();
    loop {
        let idle_until = cutoff.map(|c| tokio::time::Instant::from_std(last + c));
        tokio::select! {
            r = client.read(&mut cbuf) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                sniff(flow, &cbuf[..n], &mut frames, last, s);
                if server.write_all(&cbuf[..n]).await.is_err() {
                    return;
                }
                last = Instant::now();
            }
            r = server.read(&mut sbuf) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if client.write_all(&sbuf[..n]).await.is_err() {
                    return;
                }
                last = Instant::now();
            }
            _ = sleep_until(idle_until) => break,
        }
    }
    // Forgotten: the node's side goes away, the client's packets vanish.
    s.cut.fetch_add(1, Ordering::Relaxed);
    drop(server);
    loop {
        match client.read(&mut cbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Records the PINGs among the client's frames.
fn sniff(flow: u64, bytes: &[u8], frames: &mut BytesMut, last: Instant, s: &Shared) {
    frames.extend_from_slice(bytes);
    let now = Instant::now();
    while let Ok(Some(f)) = herald_proto::frame::decode(frames, herald_proto::frame::DEFAULT_MAX_FRAME) {
        if let Some(Kind::Ping(p)) = f.kind {
            s.pings.lock().push(PingSeen {
                flow,
                at: now,
                interval_ms: p.interval_ms,
                idle: now.saturating_duration_since(last),
            });
        }
    }
}
