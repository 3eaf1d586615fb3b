//! Operations: the admin HTTP server (metrics, probes, JSON API, dashboard), the WebSocket
//! transport, the MySQL cold archive, and the dashboard and browser example in headless Chromium.
//!
//! The archive tests start a private MariaDB server (Debian's `mariadb-server`) and the browser
//! tests run Debian's `chromium`; `scripts/test` installs both (see scripts/setup). Without them
//! these tests fail with a message naming the package to install.

mod admin;
mod archive;
mod browser;
mod mariadb;
mod websocket;

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{free_port, Cluster};

/// A cluster of `n` nodes, each with `--admin-addr` and `--ws-addr` on ports of its own, plus
/// `extra` flags for every node. Returns it with the admin and WebSocket addresses by node id.
pub async fn ops_cluster(n: u64, extra: &[&str]) -> (Cluster, Vec<String>, Vec<String>) {
    let mut c = Cluster::new(n).node_args(extra);
    let mut admin = Vec::new();
    let mut ws = Vec::new();
    for id in 1..=n {
        let a = format!("127.0.0.1:{}", free_port());
        let w = format!("127.0.0.1:{}", free_port());
        let spec = c.spec_mut(id);
        spec.extra_args
            .extend(["--admin-addr".into(), a.clone(), "--ws-addr".into(), w.clone()]);
        admin.push(a);
        ws.push(w);
    }
    c.start_all();
    c.wait_leader().await;
    (c, admin, ws)
}

/// A plain HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` on `addr` with an optional bearer token (a minimal HTTP/1.1 client: the tests need
/// nothing more and it keeps the dependency list short).
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> Result<HttpReply> {
    let call = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse_http(&raw)
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow!("GET {path} on {addr} timed out"))?
}

fn parse_http(raw: &[u8]) -> Result<HttpReply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header in {text:?}"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let mut content_type = String::new();
    let mut chunked = false;
    for l in lines {
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-type:") {
            content_type = v.trim().to_string();
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok(HttpReply {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or_else(|| anyhow!("bad chunk"))?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        if rest.len() < n {
            bail!("short chunk");
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
}

/// The value of the unlabeled or labeled sample `series` (e.g. `herald_connections{transport="ws"}`)
/// in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
