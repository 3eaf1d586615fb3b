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
    /// Every header, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` with an optional bearer token (a minimal HTTP/1.1 client: the tests need
/// nothing more and it keeps the dependency list short).
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> Result<HttpReply> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_call(addr, "GET", path, &headers, "").await
}

/// `method path` on `addr` with `headers` and `body` over plain TCP.
pub async fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpReply> {
    let call = async {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        exchange(s, &request(addr, method, path, headers, body)).await
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow!("{method} {path} on {addr} timed out"))?
}

/// `method path` on `addr` over TLS, trusting only the CA certificate in PEM file `ca` and
/// checking the server's certificate for `localhost`.
pub async fn https_call(
    addr: &str,
    ca: &std::path::Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpReply> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let call = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .context("tls handshake")?;
        exchange(tls, &request(addr, method, path, headers, body)).await
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| anyhow!("{method} {path} on {addr} over TLS timed out"))?
}

fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req
}

async fn exchange<S>(mut s: S, req: &str) -> Result<HttpReply>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify after the response; what was read counts.
    if let Err(e) = s.read_to_end(&mut raw).await {
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    parse_http(&raw)
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
    let mut headers = Vec::new();
    for l in lines {
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
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
        headers,
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
