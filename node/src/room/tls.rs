//! TLS for the client listener (rustls, ring provider): load a PEM cert chain and key, or make a
//! development CA and a certificate for localhost signed by it (`herald dev`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// A rustls server config from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert)
            .with_context(|| format!("cannot open TLS certificate {}", cert.display()))?,
    ))
    .collect::<Result<_, _>>()
    .with_context(|| format!("cannot parse TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("cannot open TLS key {}", key.display()))?,
    ))
    .with_context(|| format!("cannot parse TLS key {}", key.display()))?
    .with_context(|| format!("{} holds no PEM private key", key.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS key does not match the certificate")?;
    Ok(Arc::new(config))
}

/// Paths of a development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate clients trust (`--tls-ca` in the SDK).
    pub ca: PathBuf,
    /// The server certificate chain and key for `--tls-cert` / `--tls-key`.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates (once) a development CA and a certificate for `localhost` and `127.0.0.1` in `dir`.
pub fn dev_pki(dir: &Path) -> Result<DevPki> {
    let pki = DevPki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    if pki.ca.is_file() && pki.cert.is_file() && pki.key.is_file() {
        return Ok(pki);
    }
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Herald dev CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "herald dev node");
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    std::fs::write(&pki.ca, ca.pem())?;
    std::fs::write(&pki.cert, leaf.pem())?;
    std::fs::write(&pki.key, leaf_key.serialize_pem())?;
    Ok(pki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_pki_loads_as_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dev_pki(dir.path()).unwrap();
        server_config(&pki.cert, &pki.key).unwrap();
        // A second call keeps the same files.
        let before = std::fs::read(&pki.ca).unwrap();
        dev_pki(dir.path()).unwrap();
        assert_eq!(before, std::fs::read(&pki.ca).unwrap());
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let pa = dev_pki(a.path()).unwrap();
        let pb = dev_pki(b.path()).unwrap();
        let err = server_config(&pa.cert, &pb.key).unwrap_err();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    }
}
