//! Opening a byte stream to a node: plain TCP, or TLS over it (rustls with the ring provider).

use std::fmt;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::ClientError;

/// A connected byte stream, TCP or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TLS settings for client connections.
///
/// The trusted roots are the caller's choice: a custom CA (a `herald dev` or company CA, for
/// self-signed certificates) with [`from_ca_pem_file`](Self::from_ca_pem_file), any root store
/// (for example one filled from the `webpki-roots` or `rustls-native-certs` crates) with
/// [`from_root_store`](Self::from_root_store), or a complete rustls configuration. The server
/// name checked against the certificate is the host part of the node address unless
/// [`server_name`](Self::server_name) overrides it.
///
/// ```no_run
/// # fn main() -> Result<(), herald_client::ClientError> {
/// use herald_client::TlsConfig;
/// let tls = TlsConfig::from_ca_pem_file("herald-dev/ca.pem")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    /// The rustls client configuration (roots, versions, provider).
    config: Arc<ClientConfig>,
    /// Name to verify instead of the address's host.
    server_name: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Trusts the roots in `roots`.
    pub fn from_root_store(roots: RootCertStore) -> Result<Self, ClientError> {
        // An explicit provider: no dependence on a process-wide default being installed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConfig {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Trusts the CA certificates in a PEM file (one or more `CERTIFICATE` blocks).
    pub fn from_ca_pem_file(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Config(format!("reading CA file {}: {e}", path.display())))?;
        Self::from_ca_pem(&pem)
    }

    /// Trusts the CA certificates in PEM text.
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, ClientError> {
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut BufReader::new(pem))
            .collect::<Result<_, _>>()
            .map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Config("CA PEM holds no certificate".into()));
        }
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots
                .add(c)
                .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
        }
        Self::from_root_store(roots)
    }

    /// Uses a complete rustls configuration (client certificates, pinned versions, …).
    pub fn from_client_config(config: Arc<ClientConfig>) -> Self {
        TlsConfig {
            config,
            server_name: None,
        }
    }

    /// Verifies the certificate against `name` instead of the host of the node address (for
    /// nodes reached by IP whose certificate names a DNS name).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub(crate) fn host_of(addr: &str) -> &str {
    let host = match addr.rfind(':') {
        Some(i) if !addr[..i].contains(':') || addr[..i].ends_with(']') => &addr[..i],
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Connects to `addr` (host:port) within `timeout`, with TLS when `tls` is set.
pub(crate) async fn connect(
    addr: &str,
    tls: Option<&TlsConfig>,
    timeout: Duration,
) -> Result<Box<dyn Io>, ClientError> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        // Frames are small and latency matters more than packet count.
        tcp.set_nodelay(true)?;
        let Some(tls) = tls else {
            return Ok(Box::new(tcp) as Box<dyn Io>);
        };
        let name = tls
            .server_name
            .as_deref()
            .unwrap_or_else(|| host_of(addr))
            .to_string();
        let name = ServerName::try_from(name.clone())
            .map_err(|e| ClientError::Tls(format!("invalid server name {name:?}: {e}")))?;
        let stream = TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Box::new(stream) as Box<dyn Io>)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_handles_names_ipv4_and_ipv6() {
        assert_eq!(host_of("node1.example:7421"), "node1.example");
        assert_eq!(host_of("127.0.0.1:7421"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7421"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn ca_pem_without_certificates_is_a_config_error() {
        let e = TlsConfig::from_ca_pem(b"nothing here").unwrap_err();
        assert!(matches!(e, ClientError::Config(_)), "{e}");
        let e = TlsConfig::from_ca_pem_file("/nonexistent/ca.pem").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
