//! The load generator: `herald-bench gen`, a subprocess the benchmarks start (several, so each
//! stays far under the 20,000-file limit). It reads commands from stdin as JSON lines and answers
//! on stdout, one JSON line per reply, tagged with the command's id.
//!
//! One thread per generator (a current-thread runtime): state is plain `Rc`/`Cell`, and a
//! benchmark that wants more CPU for its clients starts more generators.
//!
//! The same connection code serves the parent process (a publisher's echo subscriber).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use herald_proto::client::{self as pc, frame::Kind, Frame, OpenSession, TopicCursor};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::stats::{self, Buckets};
use crate::sys::unix_nanos;
use crate::token;
use crate::wire::{self, NatsIn};

/// The protocol a generator connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proto {
    Herald,
    HeraldTls,
    Mqtt,
    Nats,
}

/// An app a Herald connection opens a session of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppCred {
    pub app: String,
    pub secret: String,
}

/// How to open connections. Connection `i` (a global index over all generators) goes to
/// `addrs[i % addrs.len()]` from source address `src_ips[(i / per_ip) % src_ips.len()]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnSpec {
    pub proto: Proto,
    pub addrs: Vec<String>,
    pub src_ips: Vec<String>,
    pub per_ip: usize,
    /// Herald: one session per app on each connection (HELLO, then OPEN_SESSION).
    pub apps: Vec<AppCred>,
    /// Herald user (and MQTT client id) = prefix + connection index.
    pub user_prefix: String,
    /// Herald topic / MQTT topic / NATS subject to subscribe to (none: only the mailbox).
    pub topic: Option<String>,
    /// MQTT and NATS credentials.
    pub user: String,
    pub pass: String,
    /// PEM of the CA a TLS connection trusts.
    pub tls_ca_pem: Option<String>,
    /// Herald: ACK mailbox pushes (cumulatively, once per read).
    pub ack: bool,
}

impl ConnSpec {
    pub fn herald(addrs: Vec<String>, apps: Vec<AppCred>, prefix: &str) -> ConnSpec {
        ConnSpec {
            proto: Proto::Herald,
            addrs,
            src_ips: src_ips(1, 32),
            per_ip: 1000,
            apps,
            user_prefix: prefix.into(),
            topic: None,
            user: String::new(),
            pass: String::new(),
            tls_ca_pem: None,
            ack: true,
        }
    }

    pub fn peer(proto: Proto, addr: String, user: &str, pass: &str, prefix: &str) -> ConnSpec {
        ConnSpec {
            proto,
            addrs: vec![addr],
            src_ips: src_ips(1, 32),
            per_ip: 1000,
            apps: Vec::new(),
            user_prefix: prefix.into(),
            topic: None,
            user: user.into(),
            pass: pass.into(),
            tls_ca_pem: None,
            ack: false,
        }
    }
}

/// `n` loopback source addresses 127.0.<block>.1.. (distinct source IPs spread ephemeral ports
/// and per-IP limits).
pub fn src_ips(block: u8, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("127.{block}.{}.{}", i / 250, i % 250 + 1))
        .collect()
}

/// SDK clients for the reconnect storm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormSpec {
    /// Client addresses of the nodes; every client gets all of them (rotated so half try the
    /// second node first after a failure and half the third).
    pub nodes: Vec<String>,
    /// Node id every client must start on (clients that land elsewhere reconnect).
    pub start_node: u64,
    pub app: AppCred,
    pub user_prefix: String,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Cmd {
    /// Open `count` connections with indexes `from..from+count`, `concurrency` handshakes at a
    /// time; keep them open and count what they receive.
    Open {
        spec: ConnSpec,
        from: usize,
        count: usize,
        concurrency: usize,
    },
    /// Counters (cumulative) and the latency histogram; `reset` starts a new histogram.
    Stats { reset: bool },
    /// Connect, authenticate, say BYE, close; again, on `workers` loops for `seconds`.
    Churn {
        spec: ConnSpec,
        from: usize,
        workers: usize,
        seconds: f64,
    },
    /// Start SDK clients `from..from+count` and wait until all are connected to the start node.
    Storm {
        spec: StormSpec,
        from: usize,
        count: usize,
    },
    /// What the SDK clients saw since they started.
    StormReport,
    /// How many SDK clients had a `Connected` event at or after `since_ns` (unix ns).
    StormConnected { since_ns: u64 },
    /// Close every connection.
    CloseAll,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenStats {
    /// Connections open and authenticated now.
    pub held: u64,
    /// Messages received (PUSH / PUBLISH / MSG).
    pub deliveries: u64,
    /// Connections that ended since they were opened.
    pub ended: u64,
    /// Publish → receive latency of the deliveries that carried a timestamp (µs).
    pub hist: Buckets,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormReport {
    pub clients: u64,
    /// Per client: unix ns of every `Connected` event.
    pub connected_ns: Vec<Vec<u64>>,
    /// Per client: node ids of those events.
    pub connected_node: Vec<Vec<u64>>,
    /// Ids of the benchmark messages the app was handed (all clients, concatenated).
    pub received: Vec<u64>,
    /// Messages the app was handed twice.
    pub app_duplicates: u64,
    pub gaps: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Work done so far by a long command (connections opened, clients started).
    Progress {
        n: u64,
    },
    Opened {
        held: u64,
        failed: u64,
        first_error: Option<String>,
    },
    Stats(GenStats),
    Churned {
        connects: u64,
        failed: u64,
        hist: Buckets,
        first_error: Option<String>,
    },
    StormStarted {
        started: u64,
        failed: u64,
        retries: u64,
        first_error: Option<String>,
    },
    Storm(StormReport),
    Count(u64),
    Closed,
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: u64,
    pub body: T,
}

// ---------------------------------------------------------------------------------------------
// connections

/// A connected stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}
pub type Stream = Box<dyn Io + Send>;

/// TLS client config trusting `ca_pem`.
pub fn tls_connector(ca_pem: &str) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::io::BufReader::new(ca_pem.as_bytes())) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens connection `idx` of `spec`: TCP (from its source address), TLS if asked, then the
/// protocol's authentication and subscription. Returns when the server confirmed both.
pub async fn open(spec: &ConnSpec, idx: usize, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Stream> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, open_inner(spec, idx, tls))
        .await
        .map_err(|_| anyhow!("handshake timed out"))?
}

async fn tcp(spec: &ConnSpec, idx: usize) -> Result<tokio::net::TcpStream> {
    let addr: SocketAddr = spec.addrs[idx % spec.addrs.len()].parse()?;
    let sock = TcpSocket::new_v4()?;
    if !spec.src_ips.is_empty() {
        let ip = &spec.src_ips[(idx / spec.per_ip.max(1)) % spec.src_ips.len()];
        sock.bind(SocketAddr::new(ip.parse()?, 0))?;
    }
    let s = sock
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn open_inner(spec: &ConnSpec, idx: usize, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Stream> {
    let s = tcp(spec, idx).await?;
    let mut s: Stream = match (spec.proto, tls) {
        (Proto::HeraldTls, Some(t)) => {
            let name = rustls::pki_types::ServerName::IpAddress(s.peer_addr()?.ip().into());
            Box::new(t.connect(name, s).await.context("tls handshake")?)
        }
        (Proto::HeraldTls, None) => bail!("TLS without a CA"),
        _ => Box::new(s),
    };
    match spec.proto {
        Proto::Herald | Proto::HeraldTls => herald_handshake(&mut s, spec, idx).await?,
        Proto::Mqtt => mqtt_handshake(&mut s, spec, idx).await?,
        Proto::Nats => nats_handshake(&mut s, spec).await?,
    }
    Ok(s)
}

pub fn herald_user(spec: &ConnSpec, idx: usize) -> String {
    format!("{}{idx}", spec.user_prefix)
}

fn frame(kind: Kind) -> bytes::Bytes {
    herald_proto::frame::encode_to_bytes(&Frame { kind: Some(kind) })
}

async fn herald_handshake(s: &mut Stream, spec: &ConnSpec, idx: usize) -> Result<()> {
    let user = herald_user(spec, idx);
    let mut out = Vec::new();
    let topics: Vec<TopicCursor> = spec
        .topic
        .iter()
        .map(|t| TopicCursor {
            topic: t.clone(),
            last_seq: None,
        })
        .collect();
    for (k, a) in spec.apps.iter().enumerate() {
        let session = OpenSession {
            session_id: k as u32 + 1,
            app: a.app.clone(),
            user: user.clone(),
            device: "d".into(),
            platform: "bench".into(),
            token: token::mint(&a.app, &user, &a.secret),
            last_acked_seq: 0,
            topics: topics.clone(),
            keep: None,
        };
        let f = if k == 0 {
            Kind::Hello(pc::Hello {
                version: herald_proto::PROTOCOL_VERSION,
                session: Some(session),
                client: "herald-bench".into(),
                // The longest interval the node allows: idle connections send nothing.
                heartbeat_ms: 600_000,
            })
        } else {
            Kind::OpenSession(session)
        };
        out.extend_from_slice(&frame(f));
    }
    s.write_all(&out).await?;
    let mut welcomes = 0;
    let mut subscribed = 0;
    let want_sub = spec.apps.len() * topics.len();
    let mut buf = BytesMut::with_capacity(1024);
    while welcomes < spec.apps.len() || subscribed < want_sub {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed during handshake");
        }
        while let Some(f) = wire::herald_next_frame(&mut buf, 1 << 20).map_err(|e| anyhow!(e))? {
            let h = wire::herald_parse(&f).context("bad frame")?;
            match h.kind {
                wire::K_WELCOME => welcomes += 1,
                wire::K_SUBSCRIBED if h.code == 0 => subscribed += 1,
                wire::K_SUBSCRIBED => bail!("subscribe refused ({})", h.code),
                wire::K_ERROR => {
                    let e = herald_proto::frame::decode_body(f.freeze()).ok();
                    bail!("herald refused: {:?}", e.and_then(|f| f.kind));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn mqtt_handshake(s: &mut Stream, spec: &ConnSpec, idx: usize) -> Result<()> {
    let client_id = format!("{}{idx}", spec.user_prefix);
    let mut out = match spec.apps.first() {
        // Herald's MQTT listener: user name = app, password = a token of user `client_id`.
        Some(a) => wire::mqtt_connect(&client_id, &a.app, &token::mint(&a.app, &client_id, &a.secret)),
        None => wire::mqtt_connect(&client_id, &spec.user, &spec.pass),
    };
    if let Some(t) = &spec.topic {
        out.extend_from_slice(&wire::mqtt_subscribe(1, t));
    }
    s.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64);
    let mut connack = false;
    let mut suback = spec.topic.is_none();
    while !(connack && suback) {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("mqtt closed during handshake");
        }
        while let Some((t, body)) = wire::mqtt_next(&mut buf) {
            match t & 0xf0 {
                0x20 => {
                    if body.get(1) != Some(&0) {
                        bail!("mqtt CONNACK refused: {:?}", &body[..]);
                    }
                    connack = true;
                }
                0x90 => {
                    if body.get(2).is_some_and(|c| *c >= 0x80) {
                        bail!("mqtt SUBACK refused");
                    }
                    suback = true;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn nats_handshake(s: &mut Stream, spec: &ConnSpec) -> Result<()> {
    let mut out = wire::nats_connect(&spec.user, &spec.pass, "herald-bench");
    if let Some(t) = &spec.topic {
        out.extend_from_slice(format!("SUB {t} 1\r\n").as_bytes());
    }
    out.extend_from_slice(b"PING\r\n");
    s.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("nats closed during handshake");
        }
        while let Some(m) = wire::nats_next(&mut buf).map_err(|e| anyhow!(e))? {
            match m {
                NatsIn::Pong => return Ok(()),
                NatsIn::Err(e) => bail!("nats refused: {e}"),
                NatsIn::Ping => s.write_all(b"PONG\r\n").await?,
                _ => {}
            }
        }
    }
}

/// Reads deliveries until the connection ends; calls `on_msg(payload, now_ns)` for each. Answers
/// NATS PINGs and acks Herald mailbox pushes when `ack`.
pub async fn recv_loop(
    mut s: Stream,
    proto: Proto,
    ack: bool,
    mut on_msg: impl FnMut(&[u8], u64),
) -> Result<()> {
    let mut buf = BytesMut::new();
    let mut out: Vec<u8> = Vec::new();
    let mut acks: Vec<(u32, u64)> = Vec::new();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed by the server");
        }
        let now = unix_nanos();
        match proto {
            Proto::Herald | Proto::HeraldTls => {
                while let Some(f) = wire::herald_next_frame(&mut buf, 1 << 20).map_err(|e| anyhow!(e))? {
                    let h = wire::herald_parse(&f).context("bad frame")?;
                    match h.kind {
                        wire::K_PUSH => {
                            on_msg(h.payload, now);
                            if ack && h.seq > 0 {
                                match acks.iter_mut().find(|a| a.0 == h.session_id) {
                                    Some(a) => a.1 = a.1.max(h.seq),
                                    None => acks.push((h.session_id, h.seq)),
                                }
                            }
                        }
                        wire::K_KICKED | wire::K_BYE | wire::K_ERROR => {
                            bail!("ended by the server (frame kind {}, code {})", h.kind, h.code)
                        }
                        _ => {}
                    }
                }
                for (sid, seq) in acks.drain(..) {
                    out.extend_from_slice(&frame(Kind::Ack(pc::Ack { session_id: sid, seq })));
                }
            }
            Proto::Mqtt => {
                while let Some((t, body)) = wire::mqtt_next(&mut buf) {
                    if t & 0xf0 == 0x30 {
                        if let Some(p) = wire::mqtt_publish_payload(t, &body) {
                            on_msg(p, now);
                        }
                    }
                }
            }
            Proto::Nats => {
                while let Some(m) = wire::nats_next(&mut buf).map_err(|e| anyhow!(e))? {
                    match m {
                        NatsIn::Msg { payload, .. } => on_msg(&payload, now),
                        NatsIn::Ping => out.extend_from_slice(b"PONG\r\n"),
                        NatsIn::Err(e) => bail!("nats: {e}"),
                        _ => {}
                    }
                }
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if buf.is_empty() && buf.capacity() > 64 * 1024 {
            buf = BytesMut::new();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the generator process

#[derive(Default)]
struct State {
    held: Cell<u64>,
    deliveries: Cell<u64>,
    ended: Cell<u64>,
    hist: RefCell<Option<Histogram<u64>>>,
    first_error: RefCell<Option<String>>,
    tasks: RefCell<Vec<tokio::task::JoinHandle<()>>>,
    storm: RefCell<Vec<Rc<StormClient>>>,
    storm_clients: RefCell<Vec<herald_client::Client>>,
}

impl State {
    fn error(&self, e: impl std::fmt::Display) {
        let mut f = self.first_error.borrow_mut();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }

    fn record(&self, payload: &[u8], now: u64) {
        self.deliveries.set(self.deliveries.get() + 1);
        if let Some((sent, _)) = wire::stamp(payload) {
            let mut h = self.hist.borrow_mut();
            let h = h.get_or_insert_with(stats::new_histogram);
            stats::record(h, now.saturating_sub(sent) / 1000);
        }
    }
}

/// What one SDK client of the storm saw.
#[derive(Default)]
struct StormClient {
    connected_ns: RefCell<Vec<u64>>,
    connected_node: RefCell<Vec<u64>>,
    received: RefCell<Vec<u64>>,
    seen: RefCell<HashSet<u64>>,
    dups: Cell<u64>,
    gaps: Cell<u64>,
}

/// Stdout, one writer at a time: a reply line is written whole before the next starts.
type Out = Rc<tokio::sync::Mutex<tokio::io::Stdout>>;

async fn reply(out: &Out, id: u64, body: Reply) {
    let mut line = serde_json::to_vec(&Envelope { id, body }).expect("replies serialize");
    line.push(b'\n');
    let mut o = out.lock().await;
    let _ = o.write_all(&line).await;
    let _ = o.flush().await;
}

/// `herald-bench gen`: serves commands until stdin closes.
pub fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let st = Rc::new(State::default());
        let out: Out = Rc::new(tokio::sync::Mutex::new(tokio::io::stdout()));
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await? {
            let env: Envelope<Cmd> = serde_json::from_str(&line).context("bad command")?;
            let (st, out) = (st.clone(), out.clone());
            tokio::task::spawn_local(async move {
                let id = env.id;
                let r = match run_cmd(&st, &out, id, env.body).await {
                    Ok(r) => r,
                    Err(e) => Reply::Error(format!("{e:#}")),
                };
                reply(&out, id, r).await;
            });
        }
        Ok(())
    })
}

async fn run_cmd(st: &Rc<State>, out: &Out, id: u64, cmd: Cmd) -> Result<Reply> {
    match cmd {
        Cmd::Open {
            spec,
            from,
            count,
            concurrency,
        } => open_many(st, out, id, spec, from, count, concurrency).await,
        Cmd::Stats { reset } => {
            let hist = {
                let mut h = st.hist.borrow_mut();
                let b = h.as_ref().map(stats::to_buckets).unwrap_or_default();
                if reset {
                    *h = None;
                }
                b
            };
            let s = GenStats {
                held: st.held.get(),
                deliveries: st.deliveries.get(),
                ended: st.ended.get(),
                hist,
                first_error: st.first_error.borrow().clone(),
            };
            Ok(Reply::Stats(s))
        }
        Cmd::Churn {
            spec,
            from,
            workers,
            seconds,
        } => churn(spec, from, workers, seconds).await,
        Cmd::Storm { spec, from, count } => storm_start(st, out, id, spec, from, count).await,
        Cmd::StormReport => Ok(Reply::Storm(storm_report(st))),
        Cmd::StormConnected { since_ns } => Ok(Reply::Count(
            st.storm
                .borrow()
                .iter()
                .filter(|c| c.connected_ns.borrow().iter().any(|t| *t >= since_ns))
                .count() as u64,
        )),
        Cmd::CloseAll => {
            for t in st.tasks.borrow_mut().drain(..) {
                t.abort();
            }
            let clients: Vec<_> = st.storm_clients.borrow_mut().drain(..).collect();
            for c in clients {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.close()).await;
            }
            st.held.set(0);
            Ok(Reply::Closed)
        }
    }
}

async fn open_many(
    st: &Rc<State>,
    out: &Out,
    id: u64,
    spec: ConnSpec,
    from: usize,
    count: usize,
    concurrency: usize,
) -> Result<Reply> {
    let tls = match &spec.tls_ca_pem {
        Some(pem) => Some(tls_connector(pem)?),
        None => None,
    };
    let spec = Rc::new(spec);
    let next = Rc::new(Cell::new(from));
    let failed = Rc::new(Cell::new(0u64));
    let opened = Rc::new(Cell::new(0u64));
    let end = from + count;
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (st, spec, next, failed, opened, tls) = (
            st.clone(),
            spec.clone(),
            next.clone(),
            failed.clone(),
            opened.clone(),
            tls.clone(),
        );
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= end {
                    break;
                }
                next.set(i + 1);
                // A refused or timed-out attempt is retried a few times (a SYN lost to a full
                // backlog, a node still electing) before it counts as failed.
                let mut ok = None;
                for attempt in 0..3 {
                    match open(&spec, i, tls.as_ref()).await {
                        Ok(s) => {
                            ok = Some(s);
                            break;
                        }
                        Err(e) => {
                            st.error(format!("connection {i}: {e:#}"));
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                    }
                }
                let Some(s) = ok else {
                    failed.set(failed.get() + 1);
                    continue;
                };
                opened.set(opened.get() + 1);
                st.held.set(st.held.get() + 1);
                let st2 = st.clone();
                let (proto, ack) = (spec.proto, spec.ack);
                let h = tokio::task::spawn_local(async move {
                    let st3 = st2.clone();
                    let r = recv_loop(s, proto, ack, move |p, now| st3.record(p, now)).await;
                    st2.held.set(st2.held.get() - 1);
                    st2.ended.set(st2.ended.get() + 1);
                    if let Err(e) = r {
                        st2.error(format!("connection ended: {e:#}"));
                    }
                });
                st.tasks.borrow_mut().push(h);
            }
        }));
    }
    let progress = {
        let (out, opened, failed) = (out.clone(), opened.clone(), failed.clone());
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                reply(
                    &out,
                    id,
                    Reply::Progress {
                        n: opened.get() + failed.get(),
                    },
                )
                .await;
            }
        })
    };
    for w in workers {
        let _ = w.await;
    }
    progress.abort();
    Ok(Reply::Opened {
        held: opened.get(),
        failed: failed.get(),
        first_error: st.first_error.borrow().clone(),
    })
}

async fn churn(spec: ConnSpec, from: usize, workers: usize, seconds: f64) -> Result<Reply> {
    let spec = Rc::new(spec);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let connects = Rc::new(Cell::new(0u64));
    let failed = Rc::new(Cell::new(0u64));
    let hist = Rc::new(RefCell::new(stats::new_histogram()));
    let first_error: Rc<RefCell<Option<String>>> = Rc::default();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (spec, connects, failed, hist, first_error) = (
            spec.clone(),
            connects.clone(),
            failed.clone(),
            hist.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match open(&spec, from + w, None).await {
                    Ok(mut s) => {
                        stats::record(&mut hist.borrow_mut(), t0.elapsed().as_micros() as u64);
                        connects.set(connects.get() + 1);
                        // A clean goodbye in each protocol (NATS has none: the client closes).
                        let bye = match spec.proto {
                            Proto::Herald | Proto::HeraldTls => frame(Kind::Bye(pc::Bye::default())),
                            Proto::Mqtt => bytes::Bytes::from_static(&[0xE0, 0x00]),
                            Proto::Nats => bytes::Bytes::new(),
                        };
                        let _ = s.write_all(&bye).await;
                        let _ = s.shutdown().await;
                    }
                    Err(e) => {
                        failed.set(failed.get() + 1);
                        if first_error.borrow().is_none() {
                            *first_error.borrow_mut() = Some(format!("{e:#}"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let hist = stats::to_buckets(&hist.borrow());
    let first_error = first_error.borrow().clone();
    Ok(Reply::Churned {
        connects: connects.get(),
        failed: failed.get(),
        hist,
        first_error,
    })
}

async fn storm_start(
    st: &Rc<State>,
    out: &Out,
    id: u64,
    spec: StormSpec,
    from: usize,
    count: usize,
) -> Result<Reply> {
    let spec = Rc::new(spec);
    let next = Rc::new(Cell::new(from));
    let started = Rc::new(Cell::new(0u64));
    let failed = Rc::new(Cell::new(0u64));
    let retries = Rc::new(Cell::new(0u64));
    let end = from + count;
    let mut workers = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let (st, spec, next, started, failed, retries) = (
            st.clone(),
            spec.clone(),
            next.clone(),
            started.clone(),
            failed.clone(),
            retries.clone(),
        );
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= end {
                    break;
                }
                next.set(i + 1);
                match storm_client(&st, &spec, i, &retries).await {
                    Ok(()) => started.set(started.get() + 1),
                    Err(e) => {
                        st.error(format!("client {i}: {e:#}"));
                        failed.set(failed.get() + 1);
                    }
                }
            }
        }));
    }
    let progress = {
        let (out, started) = (out.clone(), started.clone());
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                reply(&out, id, Reply::Progress { n: started.get() }).await;
            }
        })
    };
    for w in workers {
        let _ = w.await;
    }
    progress.abort();
    Ok(Reply::StormStarted {
        started: started.get(),
        failed: failed.get(),
        retries: retries.get(),
        first_error: st.first_error.borrow().clone(),
    })
}

/// Starts SDK client `i` and waits until it is connected to the start node; then a task records
/// everything its event stream yields.
async fn storm_client(st: &Rc<State>, spec: &StormSpec, i: usize, retries: &Cell<u64>) -> Result<()> {
    let user = format!("{}{i}", spec.user_prefix);
    let tok = token::mint(&spec.app.app, &user, &spec.app.secret);
    // The start node first, then the other two in an order that alternates between clients.
    let mut nodes = spec.nodes.clone();
    if i % 2 == 1 && nodes.len() == 3 {
        nodes.swap(1, 2);
    }
    for _ in 0..30 {
        let (client, mut events) = herald_client::Client::builder(&spec.app.app, &user, "phone")
            .token(tok.clone())
            .nodes(nodes.clone())
            .connect()
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let first = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match events.recv().await {
                    Some(herald_client::Event::Connected { node_id, .. }) => return Ok(node_id),
                    Some(herald_client::Event::Closed(e)) => return Err(anyhow!("closed: {e}")),
                    Some(_) => continue,
                    None => return Err(anyhow!("event stream ended")),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no WELCOME within 30 s"))??;
        if first != spec.start_node {
            retries.set(retries.get() + 1);
            let _ = client.close().await;
            continue;
        }
        let c = Rc::new(StormClient::default());
        c.connected_ns.borrow_mut().push(unix_nanos());
        c.connected_node.borrow_mut().push(first);
        st.storm.borrow_mut().push(c.clone());
        st.storm_clients.borrow_mut().push(client);
        let h = tokio::task::spawn_local(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    herald_client::Event::Connected { node_id, .. } => {
                        c.connected_ns.borrow_mut().push(unix_nanos());
                        c.connected_node.borrow_mut().push(node_id);
                    }
                    herald_client::Event::Message(m) => {
                        if let Some((_, mid)) = wire::stamp(&m.payload) {
                            if c.seen.borrow_mut().insert(mid) {
                                c.received.borrow_mut().push(mid);
                            } else {
                                c.dups.set(c.dups.get() + 1);
                            }
                        }
                    }
                    herald_client::Event::Gap(_) => c.gaps.set(c.gaps.get() + 1),
                    _ => {}
                }
            }
        });
        st.tasks.borrow_mut().push(h);
        return Ok(());
    }
    bail!("never landed on node {}", spec.start_node)
}

fn storm_report(st: &Rc<State>) -> StormReport {
    let clients = st.storm.borrow();
    let mut r = StormReport {
        clients: clients.len() as u64,
        first_error: st.first_error.borrow().clone(),
        ..Default::default()
    };
    for c in clients.iter() {
        r.connected_ns.push(c.connected_ns.borrow().clone());
        r.connected_node.push(c.connected_node.borrow().clone());
        r.received.extend(c.received.borrow().iter().copied());
        r.app_duplicates += c.dups.get();
        r.gaps += c.gaps.get();
    }
    r
}
