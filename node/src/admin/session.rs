//! Who may read the admin JSON API: a caller with `Authorization: Bearer <admin token>` (scripts,
//! curl), or a browser holding a dashboard session cookie it got by posting the admin token to the
//! login form (`POST /login`). The token never appears in a URL.
//!
//! A session cookie's value is a random 256-bit id, not the token; the server keeps only the
//! SHA-256 of each live id, with its expiry, in a bounded in-memory map ([`Sessions`]). Sessions
//! end at [`SESSION_TTL`], on `POST /logout`, and when the node restarts. The cookie is `HttpOnly`
//! (page scripts cannot read it), `SameSite=Strict` (other sites' pages cannot make the browser
//! send it) and `Secure` when the server speaks HTTPS. Its name carries the listener's port,
//! because browsers share cookies between the ports of one host (`herald dev` runs three admin
//! servers on 127.0.0.1).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tracing::info;

use super::{error, AdminState};
use crate::api::auth::{bearer, ct_eq, random_secret};

/// How long a dashboard login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Live sessions kept at most; past it the one closest to expiry is dropped.
pub const MAX_SESSIONS: usize = 1024;

/// The admin HTTP server's state: what the handlers read, and the dashboard sessions.
pub struct Http {
    /// What the handlers read (the node, readiness, archive counters).
    pub state: Arc<AdminState>,
    /// Live dashboard logins of this server.
    pub sessions: Sessions,
    /// Served over HTTPS: the session cookie is marked `Secure`.
    pub secure: bool,
    /// Name of the session cookie (`herald_admin_<port>`).
    pub cookie: String,
}

impl Http {
    pub fn new(state: Arc<AdminState>, port: u16, secure: bool) -> Http {
        Http {
            state,
            sessions: Sessions::new(SESSION_TTL, MAX_SESSIONS),
            secure,
            cookie: format!("herald_admin_{port}"),
        }
    }

    /// `Set-Cookie` for `value`, living `max_age`.
    fn set_cookie(&self, value: &str, max_age: Duration) -> String {
        format!(
            "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
            self.cookie,
            max_age.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// This server's session cookie in the request, if any.
    fn session_cookie<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(name, _)| *name == self.cookie)
            .map(|(_, value)| value)
    }
}

/// Live dashboard sessions, keyed by the SHA-256 of their id (a lookup's timing can only tell
/// something about a digest, never about an id).
pub struct Sessions {
    /// SHA-256 of each live session id -> when it expires.
    live: Mutex<HashMap<[u8; 32], Instant>>,
    /// How long a session lasts from its login.
    ttl: Duration,
    /// Most sessions kept (memory bound: a login flood cannot grow the map).
    cap: usize,
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    pub fn new(ttl: Duration, cap: usize) -> Sessions {
        Sessions {
            live: Mutex::new(HashMap::new()),
            ttl,
            cap: cap.max(1),
        }
    }

    /// Opens a session at `now`; returns its id (the cookie value).
    pub fn open(&self, now: Instant) -> String {
        let id = random_secret();
        let mut live = self.live.lock();
        if live.len() >= self.cap {
            live.retain(|_, expires| *expires > now);
        }
        if live.len() >= self.cap {
            if let Some(first) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                live.remove(&first);
            }
        }
        live.insert(key(&id), now + self.ttl);
        id
    }

    /// Whether `id` names a session that is live at `now` (an expired one is forgotten).
    pub fn check(&self, id: &str, now: Instant) -> bool {
        let k = key(id);
        let mut live = self.live.lock();
        match live.get(&k) {
            Some(expires) if *expires > now => true,
            Some(_) => {
                live.remove(&k);
                false
            }
            None => false,
        }
    }

    /// Ends session `id`.
    pub fn close(&self, id: &str) {
        self.live.lock().remove(&key(id));
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks a JSON API call when the node has an admin token: the bearer header, else the session
/// cookie. Anything in the URL is ignored.
pub fn authorize(h: &Http, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = h.state.node.config().admin_token.as_deref() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    if let Some(g) = given {
        return if ct_eq(g.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(error(StatusCode::UNAUTHORIZED, "wrong admin token"))
        };
    }
    match h.session_cookie(headers) {
        Some(id) if h.sessions.check(id, Instant::now()) => Ok(()),
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "the dashboard session ended; log in again",
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the admin token: `Authorization: Bearer <token>`, or log in on the dashboard",
        )),
    }
}

/// Where to go after logging in: a path on this server, else `/`.
fn local_path(next: Option<String>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/".into(),
    }
}

fn see_other(to: &str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    let headers = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(to) {
        headers.insert(header::LOCATION, v);
    }
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /login` (form fields `token` and `next`): a right token opens a session and sets its
/// cookie; either way the browser is sent back to the dashboard (`/?login=failed` on a wrong one).
pub async fn login(State(h): State<Arc<Http>>, body: Bytes) -> Response {
    let mut token = None;
    let mut next = None;
    for (k, v) in form_urlencoded::parse(&body) {
        match &*k {
            "token" => token = Some(v.trim().to_string()),
            "next" => next = Some(v.into_owned()),
            _ => {}
        }
    }
    let next = local_path(next);
    let Some(want) = h.state.node.config().admin_token.as_deref() else {
        // Admin calls are open: nothing to log in to.
        return see_other(&next, None);
    };
    match token {
        Some(t) if ct_eq(t.as_bytes(), want.as_bytes()) => {
            let id = h.sessions.open(Instant::now());
            info!(sessions = h.sessions.len(), "admin dashboard login");
            see_other(&next, Some(h.set_cookie(&id, SESSION_TTL)))
        }
        _ => {
            info!("admin dashboard login refused: wrong admin token");
            see_other("/?login=failed", None)
        }
    }
}

/// `POST /logout`: ends the session and clears the cookie.
pub async fn logout(State(h): State<Arc<Http>>, headers: HeaderMap) -> Response {
    if let Some(id) = h.session_cookie(&headers) {
        h.sessions.close(id);
    }
    see_other("/", Some(h.set_cookie("", Duration::ZERO)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_until_it_expires_or_closes() {
        let s = Sessions::new(Duration::from_secs(60), 8);
        let t0 = Instant::now();
        let id = s.open(t0);
        assert_eq!(id.len(), 64, "256 random bits as hex");
        assert!(s.check(&id, t0 + Duration::from_secs(59)));
        assert!(!s.check("not-a-session", t0));
        assert!(!s.check(&id[..63], t0));
        assert!(!s.check(&id, t0 + Duration::from_secs(60)), "expired");
        assert!(s.is_empty(), "an expired session is forgotten");
        let id = s.open(t0);
        s.close(&id);
        assert!(!s.check(&id, t0));
        // The map holds digests, never the ids themselves.
        let id = s.open(t0);
        assert!(!s.live.lock().keys().any(|k| k.as_slice() == id.as_bytes()));
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let s = Sessions::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let ids: Vec<String> = (0..4).map(|i| s.open(t0 + Duration::from_secs(i))).collect();
        assert_eq!(s.len(), 3);
        let now = t0 + Duration::from_secs(4);
        assert!(!s.check(&ids[0], now), "the oldest was dropped");
        assert!(ids[1..].iter().all(|id| s.check(id, now)));
        // Expired ones make room before any live one is dropped.
        let later = t0 + Duration::from_secs(62);
        let fresh = s.open(later);
        assert_eq!(s.len(), 2, "two expired sessions purged: {}", s.len());
        assert!(s.check(&ids[3], later) && s.check(&fresh, later));
    }

    #[test]
    fn login_only_redirects_to_a_local_path() {
        assert_eq!(local_path(Some("/?app=a&user=b".into())), "/?app=a&user=b");
        assert_eq!(local_path(Some("//evil.example/".into())), "/");
        assert_eq!(local_path(Some("https://evil.example/".into())), "/");
        assert_eq!(local_path(Some("/\\evil.example".into())), "/");
        assert_eq!(local_path(None), "/");
    }
}
