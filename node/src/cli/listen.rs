//! `herald listen`: a client of the cluster built on the SDK (`herald-client`) that prints one JSON
//! line per event of its session on stdout.
//!
//! It finds nodes through Dispatch (`--seeds`, gRPC addresses) and/or connects to client
//! addresses directly (`--nodes`), over TCP or TLS (`--tls-ca`), with a fixed token (`--token`)
//! or tokens it mints itself from the app's secret (`--secret`; fresh ones are minted whenever
//! the SDK asks, so a long listen survives token expiry). Everything the SDK does — reconnects,
//! resume, dedupe, acks — happens as it would in an app.
//!
//! Exit codes: 0 when `--count` messages arrived, on Ctrl-C / SIGTERM, when the session was
//! kicked (the kick is printed first), or when `--timeout` passed without `--count`; 2 usage;
//! 3 when `--timeout` passed without ever connecting; 4 when the cluster refused the session
//! (bad or expired token, unknown app, permission); 6 when `--timeout` passed before `--count`
//! messages arrived; 1 anything else.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use herald_client::{
    AckMode, BoxError, ClientError, Connection, DisconnectReason, Event, FileStore, GapReason, KickReason,
    Message, Qos, SessionConfig, TlsConfig,
};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{env, CliError};
use crate::token;

/// Exit code when `--timeout` passed before `--count` messages arrived.
pub const EXIT_TIMED_OUT: u8 = 6;

/// Default gRPC seed when neither `--nodes` nor `--seeds` is given (a local `herald dev`).
const DEFAULT_SEED: &str = "127.0.0.1:7401";

#[derive(Debug, Clone, clap::Args)]
pub struct ListenCmd {
    /// App id.
    #[arg(long, env = env::APP)]
    pub app: String,
    /// User id.
    #[arg(long)]
    pub user: String,
    /// Device id (one session per device: another login of it replaces this one).
    #[arg(long, default_value = "herald-cli")]
    pub device: String,
    /// Platform name, for the app's device policy.
    #[arg(long, default_value = "cli")]
    pub platform: String,
    /// A client token (HS256 JWT, see `herald token`). Wins over --secret.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The app's secret: mint tokens for --user/--device locally, a fresh one whenever the
    /// session needs one.
    #[arg(long, env = "HERALD_APP_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Lifetime in seconds of tokens minted with --secret.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl: u64,
    /// Client addresses (host:port) to connect to directly; comma-separated or repeated.
    #[arg(long = "nodes", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// gRPC addresses (host:port) to ask for the node list (Dispatch); comma-separated or
    /// repeated. Default 127.0.0.1:7401 when neither --nodes nor --seeds is given.
    #[arg(long = "seeds", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Connect with TLS, trusting the CA certificate(s) in this PEM file (e.g. herald-dev's
    /// ca.pem). --nodes must then be TLS client addresses; Dispatch is asked for those.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Name to verify the node certificates against (default: the host of the address).
    #[arg(long, requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// Subscribe to this topic (repeatable). Broadcasts arrive without subscribing.
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Ack each message only after its line was written (default: when received).
    #[arg(long, conflicts_with = "no_ack")]
    pub manual_ack: bool,
    /// Never ack: the messages stay stored and are delivered again to the next session.
    #[arg(long)]
    pub no_ack: bool,
    /// Exit (0) once this many messages arrived.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds (decimals allowed). With --count, not reaching it exits 6.
    #[arg(long, value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Keep resume cursors in this directory, so the next run resumes where this one stopped.
    #[arg(long)]
    pub store: Option<PathBuf>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A refused or failed session as a command failure.
fn client_error(e: &ClientError) -> CliError {
    let code = match e {
        ClientError::Config(_) => 2,
        ClientError::Auth { .. } | ClientError::Refused { .. } => 4,
        ClientError::Dispatch(_) => 3,
        _ => 1,
    };
    CliError {
        code,
        message: e.to_string(),
    }
}

pub async fn run(cmd: ListenCmd) -> Result<(), CliError> {
    let ack_mode = if cmd.manual_ack || cmd.no_ack {
        AckMode::Manual
    } else {
        AckMode::Auto
    };
    let mut session = SessionConfig::new(&cmd.app, &cmd.user, &cmd.device)
        .platform(&cmd.platform)
        .topics(cmd.topics.iter().cloned())
        .ack_mode(ack_mode);
    session = match (&cmd.token, &cmd.secret) {
        (Some(t), _) => session.token(t),
        (None, Some(secret)) => {
            let (app, user, device, secret, ttl) = (
                cmd.app.clone(),
                cmd.user.clone(),
                cmd.device.clone(),
                secret.clone(),
                cmd.token_ttl.max(1),
            );
            session.token_provider(move || {
                let now = herald_raft::raft_node::now_ms() / 1000;
                let claims = token::Claims {
                    app: app.clone(),
                    sub: user.clone(),
                    dev: Some(device.clone()),
                    iat: now,
                    exp: now + ttl,
                };
                let minted = token::mint(&claims, &secret);
                async move { Ok::<_, BoxError>(minted) }
            })
        }
        (None, None) => {
            return Err(CliError::usage(
                "listen needs --token (or HERALD_TOKEN) or --secret (or HERALD_APP_SECRET)",
            ))
        }
    };
    if let Some(dir) = &cmd.store {
        let store =
            FileStore::new(dir).map_err(|e| CliError::usage(format!("--store {}: {e}", dir.display())))?;
        session = session.store(store);
    }
    let mut builder = Connection::builder();
    let seeds = if cmd.seeds.is_empty() && cmd.nodes.is_empty() {
        vec![DEFAULT_SEED.to_string()]
    } else {
        cmd.seeds.clone()
    };
    if !seeds.is_empty() {
        builder = builder.dispatch_seeds(seeds);
    }
    if !cmd.nodes.is_empty() {
        builder = builder.nodes(cmd.nodes.iter().cloned());
    }
    if let Some(ca) = &cmd.tls_ca {
        let mut tls = TlsConfig::from_ca_pem_file(ca).map_err(|e| CliError::usage(e.to_string()))?;
        if let Some(name) = &cmd.tls_server_name {
            tls = tls.server_name(name);
        }
        builder = builder.tls(tls);
    }
    let conn = builder.build().map_err(|e| client_error(&e))?;
    let (_client, mut events) = match conn.open(session).await {
        Ok(pair) => pair,
        Err(e) => {
            conn.close().await;
            return Err(client_error(&e));
        }
    };
    let outcome = listen(&cmd, &mut events).await;
    // Acks what was handled, says BYE, waits for the last cursor save.
    conn.close().await;
    outcome
}

async fn listen(cmd: &ListenCmd, events: &mut herald_client::Events) -> Result<(), CliError> {
    let deadline = cmd.timeout.map(|t| Instant::now() + t);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::other(format!("cannot listen for SIGTERM: {e}")))?;
    let mut received = 0u64;
    let mut connected = false;
    if cmd.count == Some(0) {
        return Ok(());
    }
    let stdout = std::io::stdout();
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = sleep_until(deadline) => {
                return match (connected, cmd.count) {
                    (false, _) => Err(CliError {
                        code: 3,
                        message: format!("no node accepted the session within {:?}", cmd.timeout.unwrap_or_default()),
                    }),
                    (true, Some(n)) => Err(CliError {
                        code: EXIT_TIMED_OUT,
                        message: format!("timed out with {received} of {n} messages"),
                    }),
                    (true, None) => Ok(()),
                };
            }
        };
        // The stream ended without a terminal event (the connection was closed).
        let Some(ev) = ev else { return Ok(()) };
        let line = event_json(&ev);
        {
            let mut out = stdout.lock();
            // A closed stdout (the reader went away) ends the listen like Ctrl-C.
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
        }
        match ev {
            Event::Message(m) => {
                if cmd.manual_ack {
                    m.ack();
                }
                received += 1;
                if cmd.count.is_some_and(|n| received >= n) {
                    return Ok(());
                }
            }
            Event::Connected { .. } => connected = true,
            Event::Kicked { .. } => return Ok(()),
            Event::Closed(e) => return Err(client_error(&e)),
            _ => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One event as a JSON object with an `event` field naming its kind.
pub fn event_json(ev: &Event) -> Value {
    match ev {
        Event::Connected { node_id, addr, epoch } => {
            json!({"event": "connected", "node_id": node_id, "addr": addr, "epoch": epoch})
        }
        Event::Disconnected { reason } => json!({
            "event": "disconnected",
            "reason": disconnect_kind(reason),
            "detail": reason.to_string(),
        }),
        Event::Message(m) => message_json(m),
        Event::Gap(g) => json!({
            "event": "gap",
            "topic": g.topic,
            "from_seq": g.from_seq,
            "to_seq": g.to_seq,
            "reason": match g.reason {
                GapReason::Trimmed => "trimmed",
                GapReason::Expired => "expired",
                GapReason::Unspecified => "unspecified",
            },
        }),
        Event::Subscribed { topic, seq } => json!({"event": "subscribed", "topic": topic, "seq": seq}),
        Event::SubscribeFailed { topic, error } => json!({
            "event": "subscribe_failed",
            "topic": topic,
            "code": error.code().map(|c| c.as_str_name()),
            "error": error.to_string(),
        }),
        Event::Error(e) => json!({"event": "error", "error": e.to_string()}),
        Event::Kicked {
            code,
            reason,
            redirect,
        } => json!({
            "event": "kicked",
            "code": kick_code(*code),
            "reason": reason,
            "redirect": redirect,
        }),
        Event::Closed(e) => json!({
            "event": "closed",
            "code": e.code().map(|c| c.as_str_name()),
            "error": e.to_string(),
        }),
        other => json!({"event": "other", "detail": format!("{other:?}")}),
    }
}

fn message_json(m: &Message) -> Value {
    let mut v = json!({
        "event": "message",
        "msg_id": m.msg_id,
        "seq": m.seq,
        "topic": m.topic,
        "topic_seq": m.topic_seq,
        "qos": if m.qos == Qos::AtLeastOnce { 1 } else { 0 },
        "pushed_at_ms": m.pushed_at_ms,
    });
    match std::str::from_utf8(&m.payload) {
        Ok(text) => v["payload"] = json!(text),
        Err(_) => v["payload_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
    }
    v
}

fn kick_code(code: KickReason) -> &'static str {
    match code {
        KickReason::Replaced => "replaced",
        KickReason::Policy => "policy",
        KickReason::Admin => "admin",
        KickReason::NodeDown => "node_down",
        KickReason::TokenExpired => "token_expired",
        KickReason::Unspecified => "unspecified",
    }
}

fn disconnect_kind(r: &DisconnectReason) -> &'static str {
    match r {
        DisconnectReason::ClosedByServer => "closed_by_server",
        DisconnectReason::Io(_) => "io",
        DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
        DisconnectReason::Bye { .. } => "bye",
        DisconnectReason::ServerError { .. } => "server_error",
        DisconnectReason::NodeDown => "node_down",
        DisconnectReason::NotReady => "not_ready",
        DisconnectReason::TokenExpired => "token_expired",
        DisconnectReason::Protocol(_) => "protocol",
        DisconnectReason::ReplacedByOwnAttempt => "replaced_by_own_attempt",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use herald_client::ErrorCode;

    use super::*;

    #[test]
    fn seconds_parse_with_decimals_and_refuse_garbage() {
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_secs("30").unwrap(), Duration::from_secs(30));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
    }

    #[test]
    fn events_render_as_tagged_json() {
        let v = event_json(&Event::Kicked {
            code: KickReason::Admin,
            reason: "bye".into(),
            redirect: vec![],
        });
        assert_eq!(
            v,
            json!({"event": "kicked", "code": "admin", "reason": "bye", "redirect": []})
        );
        let v = event_json(&Event::Closed(ClientError::Auth {
            code: ErrorCode::BadToken,
            message: "no".into(),
        }));
        assert_eq!(v["event"], "closed");
        assert_eq!(v["code"], "BAD_TOKEN");
        assert_eq!(
            client_error(&ClientError::Auth {
                code: ErrorCode::BadToken,
                message: "no".into(),
            })
            .code,
            4
        );
    }
}
