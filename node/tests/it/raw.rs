//! A raw client of the wire protocol (docs/PROTOCOL.md) for tests that need to send exactly the
//! bytes they want: bad input, precise frame sequences. Everyday client behaviour is tested
//! through the SDK instead.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use herald_proto::client::{self as pc, frame::Kind, Frame};
use herald_proto::frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long `recv` waits for a frame.
pub const RECV_WAIT: Duration = Duration::from_secs(20);

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Raw {
    pub io: Box<dyn Io>,
    buf: BytesMut,
}

/// Everything needed to open a session.
#[derive(Clone, Debug)]
pub struct Who {
    pub app: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub token: String,
}

impl Who {
    pub fn open(&self, session_id: u32, last_acked: u64) -> pc::OpenSession {
        pc::OpenSession {
            session_id,
            app: self.app.clone(),
            user: self.user.clone(),
            device: self.device.clone(),
            platform: self.platform.clone(),
            token: self.token.clone(),
            last_acked_seq: last_acked,
            topics: vec![],
            keep: None,
        }
    }
}

impl Raw {
    pub async fn connect(addr: &str) -> Result<Raw> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Raw {
            io: Box::new(s),
            buf: BytesMut::new(),
        })
    }

    pub fn from_io(io: Box<dyn Io>) -> Raw {
        Raw {
            io,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, kind: Kind) -> Result<()> {
        let b = frame::encode_to_bytes(&Frame { kind: Some(kind) });
        self.io.write_all(&b).await?;
        // Needed by the WebSocket stream (one flush, one message); a no-op on TCP.
        self.io.flush().await?;
        Ok(())
    }

    pub async fn send_bytes(&mut self, b: &[u8]) -> Result<()> {
        self.io.write_all(b).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next frame, or an error on close / timeout.
    pub async fn recv(&mut self) -> Result<Kind> {
        self.recv_within(RECV_WAIT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> Result<Kind> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(f) =
                frame::decode(&mut self.buf, 16 << 20).map_err(|e| anyhow!("bad frame from server: {e}"))?
            {
                return f.kind.ok_or_else(|| anyhow!("empty frame"));
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.io.read(&mut chunk))
                .await
                .map_err(|_| anyhow!("no frame within {wait:?}"))??;
            if n == 0 {
                bail!("connection closed by the server");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames until `pick` accepts one (others are collected and returned too).
    pub async fn until<T>(&mut self, mut pick: impl FnMut(&Kind) -> Option<T>) -> Result<(T, Vec<Kind>)> {
        let mut seen = Vec::new();
        loop {
            let k = self
                .recv()
                .await
                .with_context(|| format!("after {} other frames: {seen:?}", seen.len()))?;
            if let Some(t) = pick(&k) {
                return Ok((t, seen));
            }
            seen.push(k);
        }
    }

    /// True when the server closed the connection (after at most `wait`), draining frames.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// HELLO with one session; returns the WELCOME.
    pub async fn hello(&mut self, who: &Who, last_acked: u64) -> Result<pc::Welcome> {
        self.send(Kind::Hello(pc::Hello {
            version: 1,
            session: Some(who.open(1, last_acked)),
            client: "it-raw".into(),
            heartbeat_ms: 0,
        }))
        .await?;
        match self.recv().await? {
            Kind::Welcome(w) => Ok(w),
            other => bail!("expected WELCOME, got {other:?}"),
        }
    }

    /// Pushes of session `sid` until `n` have arrived (other frames are ignored).
    pub async fn pushes(&mut self, n: usize) -> Result<Vec<pc::Push>> {
        let mut out = Vec::new();
        while out.len() < n {
            match self
                .recv()
                .await
                .with_context(|| format!("{} of {n} pushes received", out.len()))?
            {
                Kind::Push(p) => out.push(p),
                Kind::Ping(_) | Kind::Pong(_) | Kind::Subscribed(_) => {}
                other => bail!("unexpected frame while waiting for pushes: {other:?}"),
            }
        }
        Ok(out)
    }

    pub async fn ack(&mut self, sid: u32, seq: u64) -> Result<()> {
        self.send(Kind::Ack(pc::Ack { session_id: sid, seq })).await
    }

    /// Sends PING and waits for its PONG (skipping pushes), proving the connection is served.
    pub async fn ping(&mut self, id: u64) -> Result<()> {
        self.send(Kind::Ping(pc::Ping { id, interval_ms: 0 })).await?;
        self.until(|k| matches!(k, Kind::Pong(p) if p.id == id).then_some(()))
            .await?;
        Ok(())
    }
}

/// The ERROR code in a frame, if it is one.
pub fn error_code(k: &Kind) -> Option<pc::ErrorCode> {
    match k {
        Kind::Error(e) => Some(e.code()),
        _ => None,
    }
}
