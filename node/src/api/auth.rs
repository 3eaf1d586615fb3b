//! Who is calling: an app (by API key) or an operator (by admin token).

use herald_raft::AppConfig;
use rand::RngCore;
use tonic::Request;

use super::error::ApiError;
use crate::node::Node;

/// Metadata naming the calling app.
pub const APP_METADATA: &str = "x-herald-app";
/// Metadata carrying one of the app's API keys.
pub const API_KEY_METADATA: &str = "x-herald-api-key";

/// Authenticates an app call: the app must exist and the key must be one of its API keys.
pub fn app_caller<T>(node: &Node, req: &Request<T>) -> Result<AppConfig, ApiError> {
    let (app_id, key) = app_credentials(req)?;
    app_by_key(node, &app_id, &key)
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

/// The app, if it exists and `key` is one of its API keys.
pub fn app_by_key(node: &Node, app_id: &str, key: &str) -> Result<AppConfig, ApiError> {
    let app = node
        .raft()
        .reader()
        .app(app_id)?
        .ok_or_else(|| ApiError::Unauthenticated(format!("unknown app {app_id:?}")))?;
    if !app.api_keys.iter().any(|k| ct_eq(k.as_bytes(), key.as_bytes())) {
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
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::Unauthenticated("admin call needs `authorization: Bearer <admin token>`".into())
        })?;
    if ct_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated("wrong admin token".into()))
    }
}

/// Compares in time that does not depend on where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn secrets_are_random_hex() {
        let a = random_secret();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_secret());
    }
}
