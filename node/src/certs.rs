//! `herald certs`: the cluster's CA and its node certificates (rcgen).
//!
//! Layout of a certificate directory:
//! - `ca.pem`, `ca.key`: the cluster CA (self-signed, ECDSA P-256). `ca.key` is written 0600 and
//!   is needed only to issue node certificates: keep it off the nodes.
//! - `node-<id>.pem`, `node-<id>.key`: node `id`'s certificate (signed by the CA, valid for client
//!   and server authentication, naming `herald-node-<id>` plus any extra host names and IPs) and
//!   its key (0600).
//!
//! A node is started with `--cluster-ca ca.pem --cluster-cert node-<id>.pem --cluster-key
//! node-<id>.key`. Rotation (docs/SECURITY.md): `herald certs ca` in a new directory, a bundle of
//! both CA files as every node's `--cluster-ca`, new node certificates from the new CA, then the
//! old CA dropped from the bundle — one rolling restart per step.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
pub use herald_raft::network::node_name;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// How long a certificate made here is valid.
const CA_DAYS: i64 = 3650;
const NODE_DAYS: i64 = 825;

/// The CA's two files in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Node `id`'s two files in `dir`.
pub fn node_paths(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{id}.pem")),
        dir.join(format!("node-{id}.key")),
    )
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, so a peer whose clock is a little behind accepts it at once.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Writes `contents` to `path` (refusing to overwrite), private keys readable by the owner only.
fn write_new(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| {
        if path.exists() {
            format!("{} exists; not overwriting it (remove it first)", path.display())
        } else {
            format!("cannot create {}", path.display())
        }
    })?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Creates a new cluster CA in `dir` (`ca.pem`, `ca.key`); refuses if one is there.
pub fn create_ca(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_path, key_path) = ca_paths(dir);
    if cert_path.exists() || key_path.exists() {
        bail!("{} already holds a CA (ca.pem / ca.key)", dir.display());
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// Issues node `id`'s certificate from the CA in `dir`, naming `herald-node-<id>` and `hosts`
/// (DNS names or IP addresses), into `dir`. Refuses to overwrite.
pub fn create_node(dir: &Path, id: u64, hosts: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    if id == 0 {
        bail!("node id 0 is reserved");
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    let ca_key_pem = std::fs::read_to_string(&ca_key).with_context(|| {
        format!(
            "cannot read the CA key {} (create a CA with `herald certs ca`)",
            ca_key.display()
        )
    })?;
    let ca_cert_pem =
        std::fs::read_to_string(&ca_cert).with_context(|| format!("cannot read {}", ca_cert.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("the CA key is not a PEM private key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).context("the CA certificate cannot be used")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, node_name(id));
    params
        .subject_alt_names
        .push(SanType::DnsName(node_name(id).try_into()?));
    for h in hosts {
        let san = match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                h.clone()
                    .try_into()
                    .with_context(|| format!("{h:?} is not a DNS name or IP address"))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, NODE_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = node_paths(dir, id);
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

/// A CA and certificates for nodes `ids` in `dir`, made once: files already there are kept.
pub fn ensure_cluster(dir: &Path, ids: impl IntoIterator<Item = u64>) -> anyhow::Result<()> {
    if !ca_paths(dir).0.exists() {
        create_ca(dir, "Herald cluster CA")?;
    }
    for id in ids {
        if !node_paths(dir, id).0.exists() {
            create_node(dir, id, &["localhost".into(), "127.0.0.1".into()])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_raft::network::ClusterTls;

    #[test]
    fn node_certificates_load_and_name_their_node() {
        let dir = tempfile::tempdir().unwrap();
        ensure_cluster(dir.path(), [1, 2]).unwrap();
        let (ca, _) = ca_paths(dir.path());
        let (cert, key) = node_paths(dir.path(), 2);
        ClusterTls::load(2, &ca, &cert, &key).unwrap();
        // Node 2's certificate does not name node 1.
        let e = ClusterTls::load(1, &ca, &cert, &key).unwrap_err();
        assert!(e.to_string().contains("herald-node-1"), "{e}");
        // The key is private.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "a").unwrap();
        assert!(create_ca(dir.path(), "b")
            .unwrap_err()
            .to_string()
            .contains("already holds a CA"));
        create_node(dir.path(), 1, &[]).unwrap();
        let e = create_node(dir.path(), 1, &[]).unwrap_err();
        assert!(format!("{e:#}").contains("not overwriting"), "{e:#}");
        assert!(create_node(dir.path(), 0, &[]).is_err());
        let empty = tempfile::tempdir().unwrap();
        let e = create_node(empty.path(), 1, &[]).unwrap_err();
        assert!(format!("{e:#}").contains("herald certs ca"), "{e:#}");
    }
}
