//! Mutual TLS on the cluster plane: who a node is, and which peers it lets in.
//!
//! Every node holds a certificate signed by the cluster's CA whose subject alternative names
//! include [`node_name`] of its Raft id (`herald-node-<id>`), plus the key for it. On every
//! cluster connection:
//! - the client checks that the server's certificate chains to the CA bundle and names the node id
//!   it meant to call (the TLS server name is `herald-node-<target>`, whatever address it dialled);
//! - the server requires a client certificate that chains to the CA bundle (the handshake fails
//!   otherwise), and then [`PeerGuard`] refuses every request whose certificate does not name a
//!   node the server accepts: a member of the newest membership it knows (voters and learners, so
//!   a node being added is accepted as soon as it is a learner), or, while it has no membership
//!   yet (a fresh node), one of its configured `--peers`.
//!
//! The CA file may hold several certificates: during a rotation the new CA is trusted beside the
//! old one (docs/SECURITY.md "Rotating the cluster CA").

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use tracing::warn;

use crate::types::NodeId;

/// The name a node's certificate must carry (as a DNS subject alternative name) for Raft id `id`.
pub fn node_name(id: NodeId) -> String {
    format!("herald-node-{id}")
}

/// Why the cluster's certificate files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} is not a PEM private key: {reason}")]
    BadKey { path: String, reason: String },
    #[error("{path}: certificate does not name {name} (make it with `herald certs node --id {id}`)")]
    WrongName { path: String, name: String, id: NodeId },
    #[error("{path}: {reason}")]
    BadCertificate { path: String, reason: String },
}

/// A node's cluster identity and the CAs it trusts, loaded from PEM files. Cheap to clone.
#[derive(Clone)]
pub struct ClusterTls {
    inner: Arc<TlsInner>,
}

struct TlsInner {
    /// PEM bundle of trusted CA certificates (one or more).
    ca_pem: Vec<u8>,
    /// PEM of this node's certificate (chain).
    cert_pem: Vec<u8>,
    /// PEM of this node's private key.
    key_pem: Vec<u8>,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterTls").finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFilesError> {
    std::fs::read(path).map_err(|error| TlsFilesError::Read {
        path: path.display().to_string(),
        error,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsFilesError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsFilesError::BadCertificate {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsFilesError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

impl ClusterTls {
    /// Loads and checks the files: the CA bundle and the certificate parse, the key is a PEM key,
    /// and the certificate names node `id`.
    pub fn load(id: NodeId, ca: &Path, cert: &Path, key: &Path) -> Result<ClusterTls, TlsFilesError> {
        let ca_pem = read(ca)?;
        certs(ca, &ca_pem)?;
        let cert_pem = read(cert)?;
        let chain = certs(cert, &cert_pem)?;
        let key_pem = read(key)?;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsFilesError::BadKey {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        if names_node(&chain[0], id) != Ok(true) {
            return Err(TlsFilesError::WrongName {
                path: cert.display().to_string(),
                name: node_name(id),
                id,
            });
        }
        Ok(ClusterTls {
            inner: Arc::new(TlsInner {
                ca_pem,
                cert_pem,
                key_pem,
            }),
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.inner.cert_pem, &self.inner.key_pem)
    }

    /// The client side of a connection to node `target`: present our certificate, trust only the
    /// CA bundle, and require the server to be `target`.
    pub fn client_config(&self, target: NodeId) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.inner.ca_pem))
            .identity(self.identity())
            .domain_name(node_name(target))
    }

    /// The server side: present our certificate, require a client certificate under the CA
    /// bundle. Which node it names is checked per request by [`PeerGuard`].
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.inner.ca_pem))
    }
}

/// Whether `cert` carries [`node_name`]`(id)`. An unparsable certificate is an error.
pub fn names_node(cert: &CertificateDer<'_>, id: NodeId) -> Result<bool, String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(node_name(id)).map_err(|e| e.to_string())?;
    Ok(ee.verify_is_valid_for_subject_name(&name).is_ok())
}

/// The node ids a server accepts requests from right now.
pub trait AllowedPeers: Send + Sync + 'static {
    fn allowed(&self) -> Vec<NodeId>;
}

/// The node a cluster request came from, as its certificate names it (set by [`PeerGuard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerNode(pub NodeId);

/// Refuses cluster requests from anyone but an accepted node (a tonic interceptor for the whole
/// cluster server). Without TLS (`--insecure-cluster`) it lets everything through: there is no
/// identity to check.
#[derive(Clone)]
pub struct PeerGuard {
    allowed: Option<Arc<dyn AllowedPeers>>,
    /// Leaf certificate (DER) → the node id it was last found to name. Whether a certificate
    /// names an id never changes, so a hit whose id is still accepted skips parsing the
    /// certificate again (every AppendEntries would parse it once per member otherwise); the
    /// membership check itself runs on every request.
    named: Arc<Mutex<HashMap<Vec<u8>, NodeId>>>,
}

/// Certificates remembered by a guard; past it the cache starts over (a node has a handful of
/// peers, each with one or two certificates during a rotation).
const NAMED_CACHE: usize = 64;

impl PeerGuard {
    /// A guard that checks certificates against `allowed`.
    pub fn new(allowed: Arc<dyn AllowedPeers>) -> Self {
        PeerGuard {
            allowed: Some(allowed),
            named: Default::default(),
        }
    }

    /// No checks: plaintext cluster traffic.
    pub fn insecure() -> Self {
        PeerGuard {
            allowed: None,
            named: Default::default(),
        }
    }

    /// Checks one request: `Ok` with the peer's id stored in the request's extensions, or
    /// `UNAUTHENTICATED` (no certificate) / `PERMISSION_DENIED` (a certificate of no accepted node).
    pub fn check(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(allowed) = &self.allowed else {
            return Ok(req);
        };
        let remote = req.remote_addr();
        let Some(chain) = req.peer_certs() else {
            warn!(?remote, "cluster request without a client certificate refused");
            return Err(Status::unauthenticated(
                "the cluster port requires a node certificate of this cluster",
            ));
        };
        let Some(leaf) = chain.first() else {
            return Err(Status::unauthenticated("empty client certificate chain"));
        };
        let ids = allowed.allowed();
        let cached = self.named.lock().get(leaf.as_ref()).copied();
        let hit = cached.filter(|id| ids.contains(id));
        let found = hit.or_else(|| ids.iter().copied().find(|&id| names_node(leaf, id) == Ok(true)));
        if let Some(id) = found {
            if hit.is_none() {
                let mut named = self.named.lock();
                if named.len() >= NAMED_CACHE {
                    named.clear();
                }
                named.insert(leaf.as_ref().to_vec(), id);
            }
            req.extensions_mut().insert(PeerNode(id));
            return Ok(req);
        }
        warn!(?remote, accepted = ?ids, "cluster request from a certificate that names no accepted node refused");
        Err(Status::permission_denied(
            "this certificate names no current member of the cluster",
        ))
    }
}

impl tonic::service::Interceptor for PeerGuard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req)
    }
}
