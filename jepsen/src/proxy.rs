//! Packet delay and loss without `tc netem`: a user-space TCP proxy in front of every node.
//!
//! Each node listens for gRPC (API and Raft) on `ip:7401` but advertises `ip:7402`, where a proxy
//! process (`herald-jepsen proxy`, started inside the node's namespace) accepts and forwards to
//! `ip:7401`. Every connection to a node — from peers and from the harness's gRPC clients — passes
//! through that node's proxy, both directions. Because the proxy runs in the node's namespace and
//! sees the peers' own addresses, the partition rules (iptables) still apply to it.
//!
//! Faults, per chunk of bytes read (in both directions of a connection):
//! - **delay**: held `delay_ms` plus a uniform `[0, jitter_ms]` before it is written on;
//! - **loss**: with probability `loss` held another `stall_ms` — what a lost segment costs TCP
//!   (a retransmission timeout), since a byte stream cannot lose bytes;
//! - **reset**: with probability `reset` the connection is cut (both sides closed), as when a
//!   middlebox drops the flow.
//!
//! Chunks keep their order (a chunk is never released before the one read before it), so the
//! stream stays a valid TCP stream: latency and stalls, not reordering.
//!
//! The harness controls a proxy through its stdin, one command per line: `set <delay_ms>
//! <jitter_ms> <loss> <stall_ms> <reset>` or `clear`. The proxy exits when its stdin closes,
//! so it never outlives the harness.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::RwLock;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    pub loss: f64,
    pub stall_ms: u64,
    pub reset: f64,
}

impl Faults {
    pub fn to_line(self) -> String {
        format!(
            "set {} {} {} {} {}",
            self.delay_ms, self.jitter_ms, self.loss, self.stall_ms, self.reset
        )
    }

    pub fn parse(line: &str) -> Option<Faults> {
        let mut it = line.split_whitespace();
        match it.next()? {
            "clear" => Some(Faults::default()),
            "set" => {
                let mut n = || it.next().map(str::to_string);
                Some(Faults {
                    delay_ms: n()?.parse().ok()?,
                    jitter_ms: n()?.parse().ok()?,
                    loss: n()?.parse().ok()?,
                    stall_ms: n()?.parse().ok()?,
                    reset: n()?.parse().ok()?,
                })
            }
            _ => None,
        }
    }

    /// How long to hold one chunk; `None`: cut the connection.
    fn hold(&self, rng: &mut impl Rng) -> Option<Duration> {
        if self.reset > 0.0 && rng.gen_bool(self.reset.min(1.0)) {
            return None;
        }
        let mut ms = self.delay_ms;
        if self.jitter_ms > 0 {
            ms += rng.gen_range(0..=self.jitter_ms);
        }
        if self.loss > 0.0 && rng.gen_bool(self.loss.min(1.0)) {
            ms += self.stall_ms;
        }
        Some(Duration::from_millis(ms))
    }
}

/// Runs a proxy (the `proxy` subcommand) until its stdin closes.
pub async fn serve(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let faults = Arc::new(RwLock::new(Faults::default()));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("proxy cannot listen on {listen}"))?;
    let f = faults.clone();
    let control = async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(new) = Faults::parse(&line) {
                *f.write() = new;
            }
        }
    };
    let accept = async {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let faults = faults.clone();
            tokio::spawn(async move {
                let _ = forward(client, to, faults).await;
            });
        }
    };
    tokio::select! {
        _ = control => {}
        _ = accept => {}
    }
    Ok(())
}

async fn forward(client: TcpStream, to: SocketAddr, faults: Arc<RwLock<Faults>>) -> anyhow::Result<()> {
    let upstream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(to)).await??;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    // Either direction ending (EOF, error or a reset fault) ends the connection.
    tokio::select! {
        _ = pump(cr, uw, faults.clone()) => {}
        _ = pump(ur, cw, faults) => {}
    }
    Ok(())
}

/// Copies one direction, holding each chunk as the faults say, in order.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<RwLock<Faults>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut last = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let f = *faults.read();
            let hold = {
                let mut rng = rand::thread_rng();
                f.hold(&mut rng)
            };
            let Some(hold) = hold else { return };
            let at = (Instant::now() + hold).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    // The reader ending drops `tx`; the writer then flushes what is queued and stops. A reset
    // fault ends the reader; ending the select drops the queued bytes too.
    tokio::join!(reader, writer);
}

/// The harness's handle on one proxy process.
pub struct Proxy {
    child: Child,
    stdin: Option<ChildStdin>,
    pub current: Faults,
}

impl Proxy {
    /// Starts `exe proxy --listen .. --to ..` inside namespace `ns`.
    pub fn start(
        exe: &Path,
        ns: &str,
        listen: SocketAddr,
        to: SocketAddr,
        log: &Path,
    ) -> anyhow::Result<Proxy> {
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(["proxy", "--listen", &listen.to_string(), "--to", &to.to_string()])
            .stdin(Stdio::piped())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("cannot start the proxy")?;
        let stdin = child.stdin.take();
        Ok(Proxy {
            child,
            stdin,
            current: Faults::default(),
        })
    }

    pub fn set(&mut self, f: Faults) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("proxy stopped")?;
        writeln!(stdin, "{}", f.to_line())?;
        stdin.flush()?;
        self.current = f;
        Ok(())
    }

    pub fn stop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let f = Faults {
            delay_ms: 40,
            jitter_ms: 20,
            loss: 0.05,
            stall_ms: 300,
            reset: 0.001,
        };
        assert_eq!(Faults::parse(&f.to_line()), Some(f));
        assert_eq!(Faults::parse("clear"), Some(Faults::default()));
        assert_eq!(Faults::parse("bogus"), None);
    }

    #[tokio::test]
    async fn delays_bytes_in_order() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 64];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = front.local_addr().unwrap();
        let faults = Arc::new(RwLock::new(Faults {
            delay_ms: 50,
            ..Faults::default()
        }));
        let f2 = faults.clone();
        tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let _ = forward(c, to, f2).await;
        });
        let mut c = TcpStream::connect(listen).await.unwrap();
        let t = std::time::Instant::now();
        c.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 3];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc");
        // Delayed on the way in and on the way back.
        assert!(t.elapsed() >= Duration::from_millis(100), "{:?}", t.elapsed());
    }
}
