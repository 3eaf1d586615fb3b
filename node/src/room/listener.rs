//! Accept loops for the client listeners (plain TCP, TLS and WebSocket), with the connection cap
//! and a per-source-IP accept rate limit applied before any per-connection state exists.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_proto::client::{frame::Kind, ErrorCode, Frame};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::tls_stream::LeanTls;
use super::{conn, ws, Room};
use crate::admin::metrics::Transport;

/// What a listener does with an accepted socket before the client protocol starts.
#[derive(Clone)]
pub enum Wrap {
    /// Frames right away.
    Plain,
    /// A TLS handshake first (rustls's unbuffered API: an idle connection holds no buffer).
    Tls(Arc<rustls::ServerConfig>),
    /// A WebSocket handshake first (HTTP upgrade on any path); frames travel in binary messages.
    Ws,
}

impl Wrap {
    fn transport(&self) -> Transport {
        match self {
            Wrap::Plain => Transport::Tcp,
            Wrap::Tls(_) => Transport::Tls,
            Wrap::Ws => Transport::Ws,
        }
    }
}

/// Binds a listener with a deep accept backlog (a burst of connects must not overflow it).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

/// Token buckets per source IP: `rate` new connections per second, bursts up to `rate`.
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: u32) -> Self {
        RateLimiter {
            rate: rate as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip`; false when it has none left.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock();
        if b.len() > 100_000 {
            // Forget buckets that have refilled: they behave like new ones.
            let rate = self.rate;
            b.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < rate);
        }
        let (tokens, at) = b.entry(ip).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What both accept loops share.
pub struct Acceptor {
    pub room: Arc<Room>,
    pub permits: Arc<Semaphore>,
    pub limiter: RateLimiter,
    pub tracker: TaskTracker,
    /// Refusals in progress (each writes one ERROR, after a TLS or WebSocket handshake where
    /// needed). Bounded, so a flood of refused connections costs at most this many tasks; beyond
    /// it a refused connection is closed without a word.
    refusals: Arc<Semaphore>,
}

/// Refused connections answered at once (see [`Acceptor::refusals`]).
const MAX_REFUSALS: usize = 64;

impl Acceptor {
    pub fn new(room: Arc<Room>, tracker: TaskTracker) -> Arc<Acceptor> {
        let permits = Arc::new(Semaphore::new(room.config.max_connections));
        let limiter = RateLimiter::new(room.config.accept_rate_per_ip);
        Arc::new(Acceptor {
            room,
            permits,
            limiter,
            tracker,
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
        })
    }

    /// Accepts until `shutdown`; `tls` wraps each connection in a TLS handshake first.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) {
        let wrap = match tls {
            Some(t) => Wrap::Tls(t),
            None => Wrap::Plain,
        };
        self.run_wrapped(listener, wrap, shutdown).await
    }

    /// Accepts until `shutdown`, doing `wrap`'s handshake before the client protocol.
    pub async fn run_wrapped(
        self: Arc<Self>,
        listener: TcpListener,
        wrap: Wrap,
        shutdown: CancellationToken,
    ) {
        let kind = wrap.transport().name();
        if let Ok(a) = listener.local_addr() {
            info!(addr = %a, transport = kind, "client listener up");
        }
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors or similar: do not spin.
                        warn!(error = %e, transport = kind, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if !self.room.accepting() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            if !self.limiter.allow(peer.ip()) {
                self.room.stats.rejected_rate.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "accept rate limit");
                self.refuse(
                    stream,
                    wrap.clone(),
                    ErrorCode::RateLimited,
                    "too many new connections from this address",
                );
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.room.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
                self.refuse(
                    stream,
                    wrap.clone(),
                    ErrorCode::ServerBusy,
                    "connection limit reached; try another node",
                );
                continue;
            };
            let room = self.room.clone();
            let wrap = wrap.clone();
            let handshake_timeout = room.config.auth_timeout;
            self.tracker.spawn(async move {
                let transport = wrap.transport();
                match wrap {
                    Wrap::Plain => {
                        let shared = room.add_conn(peer, transport);
                        conn::serve(room.clone(), shared, stream).await;
                        room.stats.ops.conn_closed(transport);
                    }
                    Wrap::Tls(config) => {
                        // The task is as large as its largest state, for its whole life. The
                        // handshakes and the streams they yield are boxed in statements of their
                        // own, so neither sits inline in every connection's task.
                        let handshake = Box::pin(tokio::time::timeout(
                            handshake_timeout,
                            LeanTls::accept(stream, config),
                        ));
                        let accepted = handshake.await.map(|r| r.map(Box::new));
                        match accepted {
                            Ok(Ok(s)) => {
                                let shared = room.add_conn(peer, transport);
                                conn::serve(room.clone(), shared, s).await;
                                room.stats.ops.conn_closed(transport);
                            }
                            Ok(Err(e)) => debug!(%peer, error = %e, "tls handshake failed"),
                            Err(_) => debug!(%peer, "tls handshake timed out"),
                        }
                    }
                    Wrap::Ws => {
                        let handshake = Box::pin(tokio::time::timeout(
                            handshake_timeout,
                            tokio_tungstenite::accept_async_with_config(stream, Some(ws::config())),
                        ));
                        let accepted = handshake.await.map(|r| r.map(|s| Box::new(ws::WsStream::new(s))));
                        match accepted {
                            Ok(Ok(s)) => {
                                let shared = room.add_conn(peer, transport);
                                conn::serve(room.clone(), shared, s).await;
                                room.stats.ops.conn_closed(transport);
                            }
                            Ok(Err(e)) => debug!(%peer, error = %e, "websocket handshake failed"),
                            Err(_) => debug!(%peer, "websocket handshake timed out"),
                        }
                    }
                }
                drop(permit);
            });
        }
    }

    /// Tells a refused client why (best effort, bounded) and closes.
    fn refuse(&self, stream: TcpStream, wrap: Wrap, code: ErrorCode, msg: &'static str) {
        let frame = herald_proto::frame::encode_to_bytes(&Frame {
            kind: Some(Kind::Error(herald_proto::client::Error {
                session_id: 0,
                code: code as i32,
                message: msg.into(),
            })),
        });
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            debug!(?code, "too many refusals in progress; closing without an answer");
            return;
        };
        self.tracker.spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(Duration::from_secs(2), async move {
                match wrap {
                    Wrap::Plain => {
                        let mut s = stream;
                        let _ = s.write_all(&frame).await;
                        let _ = s.shutdown().await;
                    }
                    Wrap::Tls(config) => {
                        if let Ok(mut s) = LeanTls::accept(stream, config).await {
                            let _ = s.write_all(&frame).await;
                            let _ = s.shutdown().await;
                        }
                    }
                    Wrap::Ws => {
                        if let Ok(s) =
                            tokio_tungstenite::accept_async_with_config(stream, Some(ws::config())).await
                        {
                            let mut s = ws::WsStream::new(s);
                            let _ = s.write_all(&frame).await;
                            let _ = s.shutdown().await;
                        }
                    }
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_allows_a_burst_then_refuses() {
        let l = RateLimiter::new(3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.allow(ip));
        assert!(l.allow(ip));
        assert!(l.allow(ip));
        assert!(!l.allow(ip));
        // Another address has its own bucket.
        assert!(l.allow("10.0.0.2".parse().unwrap()));
    }
}
