//! A stand-in for an app's backend, for tests and local development (not for production use).
//!
//! [`TestBackend`] serves `herald.callback.v1.Callback` on `127.0.0.1:0` (or a given address),
//! records every call it accepts in arrival order, answers Upstream with a configurable prefix
//! followed by the request's payload, and can be told to fail every call with a status, to hang,
//! to answer slowly, or to stop and start again on the same port (a group member dying and
//! coming back). Put [`TestBackend::endpoint`] into an app's `callbacks`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use herald_node::coordinator::test_backend::{Mode, TestBackend};
//! let backend = TestBackend::start().await?;
//! backend.set_reply_prefix("echo:");
//! let endpoint = backend.endpoint(); // "127.0.0.1:PORT", for AppConfig.callbacks
//! backend.set_mode(Mode::Fail(tonic::Code::Unavailable));
//! backend.stop().await; // connections refused from now on
//! backend.restart().await?; // same port again
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use herald_proto::callback::callback_server::{Callback, CallbackServer};
use herald_proto::callback::{
    SessionEvent, SessionEventsReply, SessionEventsRequest, UpstreamReply, UpstreamRequest,
};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

/// How the backend answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Upstream: the reply prefix followed by the payload. SessionEvents: accepted.
    Reply,
    /// Every call fails with this code (nothing is recorded).
    Fail(Code),
    /// Calls wait without answering until the mode changes or the backend stops.
    Hang,
}

/// A call the backend accepted. `seq` orders arrivals across every `TestBackend` in the process,
/// so tests can merge the records of a group's members.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival<T> {
    pub seq: u64,
    pub request: T,
}

/// Arrival order over all test backends of the process.
static ARRIVALS: AtomicU64 = AtomicU64::new(1);

/// A callback backend serving on a local port. Stops when dropped.
pub struct TestBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct Shared {
    /// A watch so that hung calls notice a mode change.
    mode: watch::Sender<Mode>,
    prefix: Mutex<Bytes>,
    /// Added before every answer.
    delay: Mutex<Duration>,
    upstreams: Mutex<Vec<Arrival<UpstreamRequest>>>,
    events: Mutex<Vec<Arrival<SessionEvent>>>,
    /// Calls received, accepted or not.
    upstream_calls: AtomicU64,
    event_calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Wakes `wait_*` on every record.
    recorded: Notify,
}

/// The gRPC service of one serving run (the token ends hung calls when that run stops).
struct Service {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl TestBackend {
    /// Serves on `127.0.0.1:0` in `Mode::Reply` with an empty reply prefix.
    pub async fn start() -> std::io::Result<TestBackend> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<TestBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let backend = TestBackend {
            addr,
            shared: Arc::new(Shared {
                mode: watch::channel(Mode::Reply).0,
                prefix: Mutex::new(Bytes::new()),
                delay: Mutex::new(Duration::ZERO),
                upstreams: Mutex::new(Vec::new()),
                events: Mutex::new(Vec::new()),
                upstream_calls: AtomicU64::new(0),
                event_calls: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                max_in_flight: AtomicU64::new(0),
                recorded: Notify::new(),
            }),
            running: Mutex::new(None),
        };
        backend.serve(listener);
        Ok(backend)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port`, as an app's `callbacks` entry.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Upstream replies are this prefix followed by the request's payload.
    pub fn set_reply_prefix(&self, prefix: impl Into<Bytes>) {
        *self.shared.prefix.lock() = prefix.into();
    }

    /// Every call waits this long before it is answered.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock() = delay;
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().is_some()
    }

    /// Stops serving: open connections are closed (calls that hang end with UNAVAILABLE) and new
    /// ones are refused. Records are kept.
    pub async fn stop(&self) {
        let running = self.running.lock().take();
        if let Some(r) = running {
            r.stop.cancel();
            let abort = r.task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), r.task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serves again on the same address (after [`TestBackend::stop`]).
    pub async fn restart(&self) -> std::io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e),
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Accepted Upstream calls, in arrival order.
    pub fn upstreams(&self) -> Vec<Arrival<UpstreamRequest>> {
        self.shared.upstreams.lock().clone()
    }

    /// Session events of accepted SessionEvents calls, in arrival order (duplicates kept).
    pub fn events(&self) -> Vec<SessionEvent> {
        self.shared
            .events
            .lock()
            .iter()
            .map(|a| a.request.clone())
            .collect()
    }

    /// Upstream calls received, accepted or not.
    pub fn upstream_calls(&self) -> u64 {
        self.shared.upstream_calls.load(Ordering::Relaxed)
    }

    /// SessionEvents calls received, accepted or not.
    pub fn event_calls(&self) -> u64 {
        self.shared.event_calls.load(Ordering::Relaxed)
    }

    /// Most calls this backend was answering at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::Relaxed)
    }

    /// Forgets every record and counter.
    pub fn clear(&self) {
        self.shared.upstreams.lock().clear();
        self.shared.events.lock().clear();
        self.shared.upstream_calls.store(0, Ordering::Relaxed);
        self.shared.event_calls.store(0, Ordering::Relaxed);
        self.shared.max_in_flight.store(0, Ordering::Relaxed);
    }

    /// Waits until at least `n` Upstream calls were accepted; false on timeout.
    pub async fn wait_upstreams(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, || self.shared.upstreams.lock().len() >= n)
            .await
    }

    /// Waits until at least `n` session events were accepted; false on timeout.
    pub async fn wait_events(&self, n: usize, timeout: Duration) -> bool {
        self.wait(timeout, || self.shared.events.lock().len() >= n).await
    }

    async fn wait(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.recorded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done() {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return done(),
            }
        }
    }

    fn serve(&self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let service = CallbackServer::new(Service {
            shared: self.shared.clone(),
            stop: stop.clone(),
        });
        let signal = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
                .await;
        });
        *self.running.lock() = Some(Running { stop, task });
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(r) = self.running.lock().take() {
            r.stop.cancel();
            r.task.abort();
        }
    }
}

/// Counts a call as in flight while alive.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Service {
    /// Applies the delay and the mode: Ok when the call is to be accepted.
    async fn gate(&self) -> Result<(), Status> {
        let delay = *self.shared.delay.lock();
        if !delay.is_zero() {
            tokio::select! {
                _ = self.stop.cancelled() => return Err(Status::unavailable("test backend stopped")),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let mut mode = self.shared.mode.subscribe();
        loop {
            let current = mode.borrow_and_update().clone();
            match current {
                Mode::Reply => return Ok(()),
                Mode::Fail(code) => return Err(Status::new(code, "test backend told to fail")),
                Mode::Hang => tokio::select! {
                    _ = self.stop.cancelled() => return Err(Status::unavailable("test backend stopped")),
                    _ = mode.changed() => {}
                },
            }
        }
    }
}

#[tonic::async_trait]
impl Callback for Service {
    async fn upstream(&self, request: Request<UpstreamRequest>) -> Result<Response<UpstreamReply>, Status> {
        self.shared.upstream_calls.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight::enter(&self.shared);
        let request = request.into_inner();
        self.gate().await?;
        let prefix = self.shared.prefix.lock().clone();
        let mut reply = BytesMut::with_capacity(prefix.len() + request.payload.len());
        reply.put_slice(&prefix);
        reply.put_slice(&request.payload);
        self.shared.upstreams.lock().push(Arrival {
            seq: ARRIVALS.fetch_add(1, Ordering::Relaxed),
            request,
        });
        self.shared.recorded.notify_waiters();
        Ok(Response::new(UpstreamReply {
            payload: reply.freeze(),
        }))
    }

    async fn session_events(
        &self,
        request: Request<SessionEventsRequest>,
    ) -> Result<Response<SessionEventsReply>, Status> {
        self.shared.event_calls.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight::enter(&self.shared);
        let request = request.into_inner();
        self.gate().await?;
        {
            let mut events = self.shared.events.lock();
            for e in request.events {
                events.push(Arrival {
                    seq: ARRIVALS.fetch_add(1, Ordering::Relaxed),
                    request: e,
                });
            }
        }
        self.shared.recorded.notify_waiters();
        Ok(Response::new(SessionEventsReply {}))
    }
}
