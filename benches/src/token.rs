//! Client tokens as docs/PROTOCOL.md section 7 defines them (HS256 JWT), minted here so the
//! benchmark does not link the node crate.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A token for (app, user), any device, valid for a day.
pub fn mint(app: &str, user: &str, secret: &str) -> String {
    let now = crate::sys::unix_nanos() / 1_000_000_000;
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = serde_json::json!({"app": app, "sub": user, "iat": now, "exp": now + 86_400});
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{header}.{body}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes any key");
    mac.update(input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{sig}")
}
