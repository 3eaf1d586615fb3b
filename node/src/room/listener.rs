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
use super::{conn, mqtt, ws, Room};
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
    /// MQTT packets, translated to and from the client protocol (`mqtt::MqttStream`).
    Mqtt,
    /// A TLS handshake, then MQTT.
    MqttTls(Arc<rustls::ServerConfig>),
}

impl Wrap {
    fn transport(&self) -> Transport {
        match self {
            Wrap::Plain => Transport::Tcp,
            Wrap::Tls(_) => Transport::Tls,
            Wrap::Ws => Transport::Ws,
            Wrap::Mqtt | Wrap::MqttTls(_) => Transport::Mqtt,
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
            // Each kind of connection is its own task type, so a plain connection's task is
            // only as large as the plain serving state (the size test below bounds it).
            let room = self.room.clone();
            match &wrap {
                Wrap::Plain => {
                    self.tracker
                        .spawn(conn::serve(room, peer, Transport::Tcp, stream, Some(permit)));
                }
                Wrap::Tls(config) => {
                    self.tracker
                        .spawn(serve_tls(room, config.clone(), stream, peer, permit, false));
                }
                Wrap::Ws => {
                    self.tracker.spawn(serve_ws(room, stream, peer, permit));
                }
                Wrap::Mqtt => {
                    let s = mqtt::MqttStream::new(stream, mqtt_limits(&room)).with_room(room.clone());
                    self.tracker
                        .spawn(conn::serve(room, peer, Transport::Mqtt, s, Some(permit)));
                }
                Wrap::MqttTls(config) => {
                    self.tracker
                        .spawn(serve_tls(room, config.clone(), stream, peer, permit, true));
                }
            }
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
        let ws_config = ws::config(self.room.config.max_frame);
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
                    // The MQTT version is not known before CONNECT: just close.
                    Wrap::Mqtt | Wrap::MqttTls(_) => drop(stream),
                    Wrap::Ws => {
                        if let Ok(s) =
                            tokio_tungstenite::accept_async_with_config(stream, Some(ws_config)).await
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

/// The MQTT side's limits from the node's configuration: a packet may be as large as a frame.
fn mqtt_limits(room: &Room) -> mqtt::Limits {
    let c = &room.config;
    mqtt::Limits {
        max_packet: c.max_frame,
        max_frame: c.max_frame,
        heartbeat_min_ms: c.heartbeat_min.as_millis() as u64,
        heartbeat_max_ms: c.heartbeat_max.as_millis() as u64,
    }
}

/// A TLS connection: the handshake, then the client protocol, or MQTT when `mqtt`.
async fn serve_tls(
    room: Arc<Room>,
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    mqtt: bool,
) {
    // The handshake and the stream it yields are boxed: the stream is as large as rustls's
    // connection state, which must not sit inline in the task's serving state.
    let handshake = Box::pin(tokio::time::timeout(
        room.config.auth_timeout,
        LeanTls::accept(stream, config),
    ));
    match handshake.await.map(|r| r.map(Box::new)) {
        Ok(Ok(s)) if mqtt => {
            let s = Box::new(mqtt::MqttStream::new(s, mqtt_limits(&room)).with_room(room.clone()));
            conn::serve(room, peer, Transport::Mqtt, s, Some(permit)).await
        }
        Ok(Ok(s)) => conn::serve(room, peer, Transport::Tls, s, Some(permit)).await,
        Ok(Err(e)) => debug!(%peer, mqtt, error = %e, "tls handshake failed"),
        Err(_) => debug!(%peer, mqtt, "tls handshake timed out"),
    }
}

/// A WebSocket connection: the HTTP upgrade, then the client protocol in binary messages; on
/// the path `/mqtt`, MQTT (MQTT 5.0 §6: the `mqtt` subprotocol, packets in binary messages).
async fn serve_ws(
    room: Arc<Room>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let mut is_mqtt = false;
    let pick = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == "/mqtt" {
            is_mqtt = true;
            let offered = req
                .headers()
                .get_all("sec-websocket-protocol")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
            if offered {
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    "mqtt".parse().expect("static header value"),
                );
            }
        }
        Ok(resp)
    };
    let handshake = Box::pin(tokio::time::timeout(
        room.config.auth_timeout,
        tokio_tungstenite::accept_hdr_async_with_config(
            stream,
            pick,
            Some(ws::config(room.config.max_frame)),
        ),
    ));
    match handshake.await {
        Ok(Ok(s)) if is_mqtt => {
            let s = Box::new(
                mqtt::MqttStream::new(ws::WsStream::new(s), mqtt_limits(&room)).with_room(room.clone()),
            );
            conn::serve(room, peer, Transport::Mqtt, s, Some(permit)).await
        }
        Ok(Ok(s)) => {
            let s = Box::new(ws::WsStream::new(s));
            conn::serve(room, peer, Transport::Ws, s, Some(permit)).await
        }
        Ok(Err(e)) => debug!(%peer, error = %e, "websocket handshake failed"),
        Err(_) => debug!(%peer, "websocket handshake timed out"),
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

#[cfg(test)]
mod task_size {
    use super::*;

    /// Size of the future `f` would return, without calling it.
    fn returned<A, R>(_f: impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A connection's task is as large as its largest state for its whole life, and tokio puts
    /// it in a 128-byte-aligned cell with ~110 bytes of its own: a plain connection's future
    /// at most 400 bytes keeps the cell at 512 (it was 800 bytes, a 1,024-byte cell, before the
    /// closing path, the TLS and WebSocket paths and the arguments moved out of it).
    #[test]
    fn an_idle_plain_connection_task_stays_small() {
        let plain = returned(|(r, p, s): (Arc<Room>, SocketAddr, TcpStream)| {
            conn::serve(r, p, Transport::Tcp, s, None)
        });
        let tls = returned(
            |(r, c, s, p, pm): (
                Arc<Room>,
                Arc<rustls::ServerConfig>,
                TcpStream,
                SocketAddr,
                tokio::sync::OwnedSemaphorePermit,
            )| serve_tls(r, c, s, p, pm, false),
        );
        eprintln!("plain connection future {plain} bytes, tls {tls} bytes");
        assert!(plain <= 400, "plain connection future grew to {plain} bytes");
        assert!(tls <= 640, "tls connection future grew to {tls} bytes");
    }
}
