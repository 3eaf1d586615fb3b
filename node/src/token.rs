//! Client tokens: JWT with HS256 (HMAC-SHA256), signed with one of the app's secrets.
//!
//! Claims: `app` (app id), `sub` (user), optional `dev` (device; when present the token only opens
//! sessions for that device), `iat` and `exp` (unix seconds).
//!
//! A token is a bearer credential: anyone holding it can use it until `exp` (no nonce, no
//! one-time use). Transport encryption keeps it from being captured; `dev` limits what a captured
//! token opens to that one device's session; a short `exp` with REFRESH_TOKEN limits how long.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// How far a token's `iat` may be ahead of this node's clock before the token is refused as
/// future-dated: the clock skew tolerated between the app's backend that mints tokens and the
/// nodes (5 minutes, Kerberos's default). Nodes judge it by cluster time (`Room::token_now_s`), so
/// one node's wrong clock does not refuse tokens the others accept.
pub const MAX_IAT_SKEW_S: u64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub app: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    pub iat: u64,
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a JWT (header.claims.signature)")]
    Malformed,
    #[error("token algorithm is not HS256")]
    Algorithm,
    #[error("token signature does not match any of the app's secrets")]
    Signature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token issued in the future at {iat} (now {now}, more than {MAX_IAT_SKEW_S} s ahead)")]
    IssuedInFuture { iat: u64, now: u64 },
    #[error("token is for app {token:?}, not {expected:?}")]
    WrongApp { token: String, expected: String },
    #[error("token is for user {token:?}, not {expected:?}")]
    WrongUser { token: String, expected: String },
    #[error("token is for device {token:?}, not {expected:?}")]
    WrongDevice { token: String, expected: String },
}

/// Signs `claims` with `secret`.
pub fn mint(claims: &Claims, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(HEADER);
    // Serializing a struct of strings and integers cannot fail.
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signing_input = format!("{header}.{body}");
    let sig = URL_SAFE_NO_PAD.encode(sign(signing_input.as_bytes(), secret));
    format!("{signing_input}.{sig}")
}

fn sign(input: &[u8], secret: &str) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac takes any key length");
    mac.update(input);
    mac.finalize().into_bytes().to_vec()
}

/// Reads the claims without checking the signature (to find which app's secrets to check with).
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| TokenError::Malformed)?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err(TokenError::Algorithm);
    }
    let claims = URL_SAFE_NO_PAD.decode(c).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&claims).map_err(|_| TokenError::Malformed)
}

/// Checks the signature against any of `secrets`, the expiry and the issue time against `now` (unix
/// seconds; `iat` at most [`MAX_IAT_SKEW_S`] ahead), and that the token names this app, user and
/// (if it names one) device.
pub fn verify(
    token: &str,
    secrets: &[String],
    app: &str,
    user: &str,
    device: &str,
    now: u64,
) -> Result<Claims, TokenError> {
    let claims = peek(token)?;
    let (signing_input, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| TokenError::Malformed)?;
    // `verify_slice` compares in constant time; every secret is tried (no early exit), so the time
    // does not tell which secret signed the token.
    let ok = secrets.iter().fold(false, |ok, s| {
        let mut mac = HmacSha256::new_from_slice(s.as_bytes()).expect("hmac takes any key length");
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&sig).is_ok() | ok
    });
    if !ok {
        return Err(TokenError::Signature);
    }
    if claims.exp <= now {
        return Err(TokenError::Expired { exp: claims.exp, now });
    }
    if claims.iat > now.saturating_add(MAX_IAT_SKEW_S) {
        return Err(TokenError::IssuedInFuture { iat: claims.iat, now });
    }
    if claims.app != app {
        return Err(TokenError::WrongApp {
            token: claims.app,
            expected: app.into(),
        });
    }
    if claims.sub != user {
        return Err(TokenError::WrongUser {
            token: claims.sub,
            expected: user.into(),
        });
    }
    if let Some(d) = &claims.dev {
        if d != device {
            return Err(TokenError::WrongDevice {
                token: d.clone(),
                expected: device.into(),
            });
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            app: "demo".into(),
            sub: "alice".into(),
            dev: Some("phone".into()),
            iat: 100,
            exp,
        }
    }

    #[test]
    fn a_minted_token_verifies() {
        let t = mint(&claims(2000), "s3cret-s3cret-s3cret");
        let c = verify(
            &t,
            &["other".into(), "s3cret-s3cret-s3cret".into()],
            "demo",
            "alice",
            "phone",
            1000,
        )
        .unwrap();
        assert_eq!(c, claims(2000));
    }

    #[test]
    fn every_mismatch_is_refused() {
        let secret = vec!["s3cret-s3cret-s3cret".to_string()];
        let t = mint(&claims(2000), &secret[0]);
        assert_eq!(
            verify(&t, &["nope".into()], "demo", "alice", "phone", 1000),
            Err(TokenError::Signature)
        );
        assert!(matches!(
            verify(&t, &secret, "demo", "alice", "phone", 2000),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verify(&t, &secret, "other", "alice", "phone", 1000),
            Err(TokenError::WrongApp { .. })
        ));
        assert!(matches!(
            verify(&t, &secret, "demo", "bob", "phone", 1000),
            Err(TokenError::WrongUser { .. })
        ));
        assert!(matches!(
            verify(&t, &secret, "demo", "alice", "tablet", 1000),
            Err(TokenError::WrongDevice { .. })
        ));
        assert_eq!(
            verify("garbage", &secret, "demo", "alice", "phone", 1000),
            Err(TokenError::Malformed)
        );
        // A tampered claim breaks the signature.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                sub: "mallory".into(),
                ..claims(2000)
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert_eq!(
            verify(&parts.join("."), &secret, "demo", "mallory", "phone", 1000),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn a_future_dated_token_is_refused_beyond_the_skew() {
        let secret = vec!["s3cret-s3cret-s3cret".to_string()];
        let at = |iat: u64| {
            mint(
                &Claims {
                    iat,
                    exp: iat + 3600,
                    ..claims(0)
                },
                &secret[0],
            )
        };
        let now = 1_000_000;
        // Issued now, a little ahead (clock skew) and exactly at the limit: accepted.
        for iat in [now, now + 30, now + MAX_IAT_SKEW_S] {
            verify(&at(iat), &secret, "demo", "alice", "phone", now)
                .unwrap_or_else(|e| panic!("iat now + {}: {e}", iat - now));
        }
        assert_eq!(
            verify(
                &at(now + MAX_IAT_SKEW_S + 1),
                &secret,
                "demo",
                "alice",
                "phone",
                now
            ),
            Err(TokenError::IssuedInFuture {
                iat: now + MAX_IAT_SKEW_S + 1,
                now
            })
        );
        assert!(matches!(
            verify(&at(now + 86_400), &secret, "demo", "alice", "phone", now),
            Err(TokenError::IssuedInFuture { .. })
        ));
        // A forged future-dated token still fails on its signature first.
        assert_eq!(
            verify(
                &at(now + 86_400),
                &["other".into()],
                "demo",
                "alice",
                "phone",
                now
            ),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn a_replayed_token_opens_only_what_it_names_until_it_expires() {
        let secret = vec!["s3cret-s3cret-s3cret".to_string()];
        let t = mint(&claims(2000), &secret[0]);
        // A bearer token: the same token verifies again and again before `exp`…
        for now in [1000, 1500, 1999] {
            assert!(verify(&t, &secret, "demo", "alice", "phone", now).is_ok());
        }
        // …never after it, and never for another device than its `dev`.
        assert!(matches!(
            verify(&t, &secret, "demo", "alice", "phone", 2000),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verify(&t, &secret, "demo", "alice", "laptop", 1000),
            Err(TokenError::WrongDevice { .. })
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(2000)).unwrap());
        assert_eq!(peek(&format!("{h}.{c}.")), Err(TokenError::Algorithm));
    }
}
