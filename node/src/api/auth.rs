//! Who is calling: an app (by API key) or an operator (by admin token).

use herald_raft::AppConfig;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tonic::Request;
use tracing::warn;

use super::error::ApiError;
use crate::node::Node;

/// Metadata naming the calling app.
pub const APP_METADATA: &str = "x-herald-app";
/// Metadata carrying one of the app's API keys.
pub const API_KEY_METADATA: &str = "x-herald-api-key";

/// Authenticates an app call: the app must exist and the key must be one of its API keys.
pub async fn app_caller<T>(node: &Node, req: &Request<T>) -> Result<AppConfig, ApiError> {
    let (app_id, key) = app_credentials(req)?;
    app_by_key(node, &app_id, &key).await
}

/// The app id and API key a call's metadata names (not checked yet).
pub fn app_credentials<T>(req: &Request<T>) -> Result<(String, String), ApiError> {
    let md = req.metadata();
    let app_id = md
        .get(APP_METADATA)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthenticated(format!("missing {APP_METADATA} metadata")))?;
    let key = md
        .get(API_KEY_METADATA)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthenticated(format!("missing {API_KEY_METADATA} metadata")))?;
    Ok((app_id.to_string(), key.to_string()))
}

/// The app, if it exists and `key` is one of its API keys. Before refusing, this node catches up
/// with the leader once (`Barrier::catch_up`): an app created or a key added by a call that
/// already returned is known on every node (read-your-writes).
pub async fn app_by_key(node: &Node, app_id: &str, key: &str) -> Result<AppConfig, ApiError> {
    match app_by_key_here(node, app_id, key) {
        Err(ApiError::Unauthenticated(_)) if node.room().barrier.catch_up(node.groups().meta()).await => {
            app_by_key_here(node, app_id, key)
        }
        r => r,
    }
}

/// [`app_by_key`] from this node's state machine as it is.
fn app_by_key_here(node: &Node, app_id: &str, key: &str) -> Result<AppConfig, ApiError> {
    let app = node
        .room()
        .meta()
        .app(app_id)?
        .ok_or_else(|| ApiError::Unauthenticated(format!("unknown app {app_id:?}")))?;
    if !any_ct_eq(&app.api_keys, key) {
        return Err(ApiError::Unauthenticated(format!(
            "wrong API key for app {app_id:?}"
        )));
    }
    Ok(app)
}

/// Authenticates an admin call when the node has an admin token.
pub fn admin<T>(node: &Node, req: &Request<T>) -> Result<(), ApiError> {
    let Some(token) = node.config().admin_token.as_deref() else {
        return Ok(());
    };
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| {
            ApiError::Unauthenticated("admin call needs `authorization: Bearer <admin token>`".into())
        })?;
    if ct_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated("wrong admin token".into()))
    }
}

/// The token of an `Authorization: Bearer <token>` value.
pub fn bearer(value: &str) -> Option<&str> {
    value.strip_prefix("Bearer ").map(str::trim)
}

/// Logs at start when admin calls are open (no admin token; `resolve` allows that only when every
/// listener is on loopback).
pub fn warn_if_admin_open(config: &crate::config::NodeConfig) {
    if config.admin_token.is_none() {
        warn!(
            node_id = config.id,
            "no admin token: admin calls (apps, membership, the admin http api) are open to anyone \
             who reaches this node's loopback listeners; set --admin-token or HERALD_ADMIN_TOKEN"
        );
    }
}

/// Compares two secrets in constant time (`subtle`): the time depends neither on where they differ
/// nor on their lengths, because what is compared is their SHA-256 digests (equal digests mean
/// equal inputs, short of a SHA-256 collision).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    digest_eq(a, b).into()
}

fn digest_eq(a: &[u8], b: &[u8]) -> Choice {
    Sha256::digest(a).as_slice().ct_eq(Sha256::digest(b).as_slice())
}

/// Whether `given` is one of `secrets`, comparing with every one of them (the time does not tell
/// which one matched, or how close a wrong one came).
pub fn any_ct_eq(secrets: &[String], given: &str) -> bool {
    secrets
        .iter()
        .fold(Choice::from(0), |hit, s| {
            hit | digest_eq(s.as_bytes(), given.as_bytes())
        })
        .into()
}

/// 32 random bytes as hex: secrets, API keys and tokens.
pub fn random_secret() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_compares_bytes() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"abc", b""));
        assert!(!ct_eq(b"xbc", b"abc"));
    }

    #[test]
    fn any_ct_eq_finds_a_key_anywhere_in_the_list() {
        let keys = vec!["first-key".to_string(), "second-key".to_string()];
        assert!(any_ct_eq(&keys, "first-key"));
        assert!(any_ct_eq(&keys, "second-key"));
        assert!(!any_ct_eq(&keys, "second-ke"));
        assert!(!any_ct_eq(&keys, ""));
        assert!(!any_ct_eq(&[], "first-key"));
    }

    #[test]
    fn bearer_reads_the_token_of_an_authorization_value() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("Bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn secrets_are_random_hex() {
        let a = random_secret();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_secret());
    }
}
