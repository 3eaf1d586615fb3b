//! Session tokens: a fixed string, or a provider the SDK asks again when the token expires.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The error type a [`TokenProvider`] returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A boxed future returned by [`TokenProvider::token`].
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send + 'static>>;

/// Fetches a session token (an HS256 JWT minted by the app's backend, see PROTOCOL.md section 7).
///
/// The SDK calls it when the session is opened, shortly before the current token's `exp`
/// (the fresh token is sent with REFRESH_TOKEN, without reconnecting), once after the server
/// refused a token (`BAD_TOKEN`, `TOKEN_EXPIRED`), and when the server ended the session because
/// its token expired (KICKED `TOKEN_EXPIRED`; the session is then opened again with the new
/// token and resumes where it was). If that call returns the same token again, the
/// session ends with [`ClientError::Auth`](crate::ClientError::Auth) instead of retrying forever.
///
/// Any `Fn() -> impl Future<Output = Result<String, BoxError>>` closure is a provider:
///
/// ```
/// use herald_client::{BoxError, SessionConfig};
///
/// async fn fetch_token_from_my_backend() -> Result<String, BoxError> {
///     Ok("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...".to_string())
/// }
///
/// let session = SessionConfig::new("demo", "alice", "phone-1")
///     .token_provider(|| fetch_token_from_my_backend());
/// ```
pub trait TokenProvider: Send + Sync + 'static {
    /// A currently valid token for the session.
    fn token(&self) -> TokenFuture;
}

impl<F, Fut> TokenProvider for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
{
    fn token(&self) -> TokenFuture {
        Box::pin(self())
    }
}

/// Where a session's token comes from.
#[derive(Clone)]
pub(crate) enum TokenSource {
    /// A fixed token; when it expires the session ends with an auth error.
    Static(String),
    /// Asked again when needed.
    Provider(Arc<dyn TokenProvider>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Tokens are credentials: never in logs.
            TokenSource::Static(_) => f.write_str("Static(..)"),
            TokenSource::Provider(_) => f.write_str("Provider(..)"),
        }
    }
}

impl TokenSource {
    pub(crate) async fn fetch(&self) -> Result<String, crate::ClientError> {
        match self {
            TokenSource::Static(t) => Ok(t.clone()),
            TokenSource::Provider(p) => p
                .token()
                .await
                .map_err(|e| crate::ClientError::Token(e.to_string())),
        }
    }

    pub(crate) fn can_refresh(&self) -> bool {
        matches!(self, TokenSource::Provider(_))
    }
}

/// `iat` and `exp` claims of a JWT, read without checking the signature (the client cannot check
/// it and only uses them to schedule a refresh).
pub(crate) fn jwt_times(token: &str) -> Option<(Option<u64>, u64)> {
    let claims = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v.get("exp")?.as_u64()?;
    Some((v.get("iat").and_then(|i| i.as_u64()), exp))
}

/// How long from `now` until the token should be refreshed: a tenth of its lifetime (at least
/// 30 s, at most 5 min, and never more than half the lifetime, so short-lived tokens are
/// refreshed too) before it expires. `None` if the token carries no readable `exp`, or the
/// refresh moment already passed (the server then ends the session with `TOKEN_EXPIRED` at
/// expiry and the SDK reopens it with a fresh token).
pub(crate) fn refresh_in(token: &str, now: SystemTime) -> Option<Duration> {
    let (iat, exp) = jwt_times(token)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let lifetime = iat.map(|i| exp.saturating_sub(i)).unwrap_or(600);
    let margin = (lifetime / 10).clamp(30, 300).min(lifetime / 2);
    let at = exp.saturating_sub(margin);
    (at > now).then(|| Duration::from_secs(at - now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn reads_iat_and_exp() {
        let t = jwt(r#"{"app":"demo","sub":"alice","iat":1000,"exp":4600}"#);
        assert_eq!(jwt_times(&t), Some((Some(1000), 4600)));
        assert_eq!(jwt_times("not a jwt"), None);
        assert_eq!(jwt_times(&jwt(r#"{"sub":"x"}"#)), None);
    }

    #[test]
    fn refresh_is_scheduled_a_tenth_of_the_lifetime_before_expiry() {
        let t = jwt(r#"{"iat":1000,"exp":4600}"#); // 1 h lifetime: 6 min margin, capped at 5
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(refresh_in(&t, now), Some(Duration::from_secs(3600 - 300)));
        let short = jwt(r#"{"iat":1000,"exp":1100}"#); // 100 s: margin at least 30 s
        assert_eq!(refresh_in(&short, now), Some(Duration::from_secs(70)));
        let late = UNIX_EPOCH + Duration::from_secs(1080);
        assert_eq!(refresh_in(&short, late), None, "already inside the margin");
        let tiny = jwt(r#"{"iat":1000,"exp":1010}"#); // 10 s: refreshed at half its life
        assert_eq!(refresh_in(&tiny, now), Some(Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn closures_are_providers() {
        let p: Arc<dyn TokenProvider> = Arc::new(|| async { Ok::<_, BoxError>("t1".to_string()) });
        let src = TokenSource::Provider(p);
        assert_eq!(src.fetch().await.unwrap(), "t1");
        assert!(src.can_refresh());
        assert_eq!(format!("{src:?}"), "Provider(..)");
        assert_eq!(
            format!("{:?}", TokenSource::Static("secret".into())),
            "Static(..)"
        );
    }
}
