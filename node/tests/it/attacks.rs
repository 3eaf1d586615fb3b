//! The attacks docs/SECURITY.md lists ("Attacks the tests try") that no other module tries: tokens
//! of another app, future-dated and replayed tokens, admin gRPC calls without the admin token,
//! garbage and oversized input on the TLS, WebSocket, public gRPC, admin HTTP and cluster
//! listeners, and node-to-node calls from hosts without this cluster's certificate. Each case
//! asserts its specific refusal and that the node still serves a well-behaved client afterwards.

use std::sync::Arc;
use std::time::Duration;

use herald_node::room::ws::WsStream;
use herald_node::token;
use herald_proto::client::{self as pc, frame::Kind, ErrorCode};
use herald_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

use crate::harness::{admin_request, free_port, App, Cluster};
use crate::raw::{error_code, Raw, Who};

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `user` of app `app` signed with `secret`, issued at `iat`, valid `ttl` seconds.
pub(crate) fn minted(app: &str, secret: &str, user: &str, dev: Option<&str>, iat: u64, ttl: u64) -> String {
    token::mint(
        &token::Claims {
            app: app.into(),
            sub: user.into(),
            dev: dev.map(str::to_string),
            iat,
            exp: iat + ttl,
        },
        secret,
    )
}

pub(crate) fn who(app: &App, user: &str, device: &str, token: String) -> Who {
    Who {
        app: app.id.clone(),
        user: user.into(),
        device: device.into(),
        platform: "ios".into(),
        token,
    }
}

/// A HELLO for `w` on a new connection to `addr`: the WELCOME, or the ERROR's code (and then the
/// connection must be closed).
pub(crate) async fn hello(addr: &str, w: &Who) -> Result<pc::Welcome, (ErrorCode, String)> {
    let mut r = Raw::connect(addr).await.unwrap();
    r.send(Kind::Hello(pc::Hello {
        version: 1,
        session: Some(w.open(1, 0)),
        ..Default::default()
    }))
    .await
    .unwrap();
    match r.recv().await.unwrap() {
        Kind::Welcome(w) => Ok(w),
        Kind::Error(e) => {
            assert!(
                r.closed_within(Duration::from_secs(5)).await,
                "a refused HELLO closes the connection"
            );
            Err((e.code(), e.message))
        }
        other => panic!("expected WELCOME or ERROR, got {other:?}"),
    }
}

/// A push to the well-behaved client arrives: the node still serves others.
async fn check_good(c: &Cluster, app: &App, good: &mut Raw, n: &mut u32) {
    *n += 1;
    let key = format!("good-{n}");
    app.push_acked(c.grpc_addr(1), "good", &key, &key).await;
    let p = good.pushes(1).await.unwrap();
    assert_eq!(&p[0].payload[..], key.as_bytes(), "the good client's push");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_tokens_of_another_app_future_dated_or_replayed_open_nothing_they_do_not_name() {
    let c = Cluster::start(1).await;
    let a = c.create_app("atk-a").await;
    let b = c.create_app("atk-b").await;
    let addr = c.client_addr(1).to_string();
    let mut good = Raw::connect(&addr).await.unwrap();
    good.hello(&who(&a, "good", "phone", a.token("good", None)), 0)
        .await
        .unwrap();
    let mut n = 0;
    let now = now_s();

    // App A's API key presented as app B's: refused before anything of B is looked at.
    let mut grpc = c.client(1).await;
    let as_b = [
        ("x-herald-app", b.id.clone()),
        ("x-herald-api-key", a.api_key.clone()),
    ];
    let mut push = b.push_request("alice", "forged", "");
    *push.metadata_mut() = with_md(&as_b, ()).metadata().clone();
    let e = grpc.push(push).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "push: {e}");
    let e = grpc
        .status(with_md(
            &as_b,
            pb::StatusRequest {
                app: b.id.clone(),
                user: "alice".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "status: {e}");

    // A token signed with app A's secret that names app B, presented for app B: B's secrets do
    // not sign it.
    let forged = minted(&b.id, &a.secret, "alice", None, now, 3600);
    assert_eq!(
        hello(&addr, &who(&b, "alice", "phone", forged))
            .await
            .unwrap_err()
            .0,
        ErrorCode::BadToken
    );
    // App A's valid token presented in a HELLO for app B.
    assert_eq!(
        hello(&addr, &who(&b, "alice", "phone", a.token("alice", None)))
            .await
            .unwrap_err()
            .0,
        ErrorCode::BadToken
    );
    check_good(&c, &a, &mut good, &mut n).await;

    // Future-dated: `iat` an hour ahead of the node's clock is refused; within the tolerated skew
    // it is accepted.
    let future = minted(&a.id, &a.secret, "alice", None, now + 3600, 3600);
    let (code, message) = hello(&addr, &who(&a, "alice", "phone", future.clone()))
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::BadToken, "{message}");
    assert!(message.contains("future"), "{message}");
    let skewed = minted(&a.id, &a.secret, "alice", None, now + 60, 3600);
    hello(&addr, &who(&a, "alice", "skewed", skewed))
        .await
        .expect("iat 60 s ahead is within the skew");
    // REFRESH_TOKEN with a future-dated token: refused, and that session is closed.
    let mut r = Raw::connect(&addr).await.unwrap();
    r.hello(&who(&a, "alice", "refresh", a.token("alice", None)), 0)
        .await
        .unwrap();
    r.send(Kind::RefreshToken(pc::RefreshToken {
        session_id: 1,
        token: future,
    }))
    .await
    .unwrap();
    let k = r.recv().await.unwrap();
    assert_eq!(error_code(&k), Some(ErrorCode::BadToken), "{k:?}");
    check_good(&c, &a, &mut good, &mut n).await;

    // Replay. A token is a bearer credential until `exp`: the same device-bound token opens its
    // device's session again (newest wins), but never another device's…
    let bound = minted(&a.id, &a.secret, "alice", Some("phone"), now, 3600);
    for _ in 0..2 {
        hello(&addr, &who(&a, "alice", "phone", bound.clone()))
            .await
            .expect("the device's own token, again");
    }
    assert_eq!(
        hello(&addr, &who(&a, "alice", "laptop", bound))
            .await
            .unwrap_err()
            .0,
        ErrorCode::PermissionDenied,
        "a token bound to the phone opens no other device"
    );
    // …and a captured token that expired is refused.
    let expired = minted(&a.id, &a.secret, "alice", Some("phone"), now - 7200, 3600);
    assert_eq!(
        hello(&addr, &who(&a, "alice", "phone", expired))
            .await
            .unwrap_err()
            .0,
        ErrorCode::TokenExpired
    );
    check_good(&c, &a, &mut good, &mut n).await;
    c.assert_no_panics();
}

/// `msg` with the metadata `md`.
fn with_md<T>(md: &[(&'static str, String)], msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    for (k, v) in md {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r
}

/// Every admin call, with the given metadata; returns each one's status code.
async fn admin_calls(c: &Cluster, app: &App, md: &[(&'static str, String)]) -> Vec<(&'static str, Code)> {
    let mut g = c.client(1).await;
    let code = |r: Result<Code, tonic::Status>| r.unwrap_or_else(|s| s.code());
    let evil = || pb::App {
        id: "evil".into(),
        ..Default::default()
    };
    vec![
        (
            "CreateApp",
            code(
                g.create_app(with_md(
                    md,
                    pb::CreateAppRequest {
                        id: "evil".into(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "UpdateApp",
            code(
                g.update_app(with_md(
                    md,
                    pb::UpdateAppRequest {
                        app: Some(pb::App {
                            id: app.id.clone(),
                            ..evil()
                        }),
                    },
                ))
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "GetApp",
            code(
                g.get_app(with_md(md, pb::GetAppRequest { id: app.id.clone() }))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "ListApps",
            code(
                g.list_apps(with_md(md, pb::ListAppsRequest {}))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "DeleteApp",
            code(
                g.delete_app(with_md(md, pb::DeleteAppRequest { id: app.id.clone() }))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "AddNode",
            code(
                g.add_node(with_md(
                    md,
                    pb::AddNodeRequest {
                        node_id: 9,
                        cluster_addr: format!("127.0.0.1:{}", free_port()),
                        learner_only: true,
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| Code::Ok),
            ),
        ),
        (
            "VerifyReplicas",
            code(
                g.verify_replicas(with_md(md, pb::VerifyReplicasRequest { timeout_ms: 100 }))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
        (
            "RemoveNode",
            code(
                g.remove_node(with_md(md, pb::RemoveNodeRequest { node_id: 1 }))
                    .await
                    .map(|_| Code::Ok),
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_grpc_calls_without_the_admin_token_are_unauthenticated() {
    let c = Cluster::start(1).await;
    let app = c.create_app("atk-admin").await;
    let attempts: Vec<(&str, Vec<(&'static str, String)>)> = vec![
        ("no metadata", vec![]),
        (
            "a wrong token",
            vec![("authorization", "Bearer wrong-token-wrong-token".into())],
        ),
        (
            "the token without Bearer",
            vec![("authorization", c.admin_token().to_string())],
        ),
        (
            "the token as an API key",
            vec![
                ("x-herald-app", app.id.clone()),
                ("x-herald-api-key", c.admin_token().to_string()),
            ],
        ),
        (
            "an app's API key",
            vec![
                ("x-herald-app", app.id.clone()),
                ("x-herald-api-key", app.api_key.clone()),
            ],
        ),
    ];
    for (what, md) in &attempts {
        let answers = admin_calls(&c, &app, md).await;
        assert_eq!(answers.len(), 8);
        for (call, code) in &answers {
            assert_eq!(*code, Code::Unauthenticated, "{call} with {what}: {answers:?}");
        }
    }
    // Nothing changed: the app is still there with its key, no app "evil", one voter, no learner.
    let mut g = c.client(1).await;
    let apps = g
        .list_apps(admin_request(pb::ListAppsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .apps;
    let ids: Vec<&str> = apps.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, [app.id.as_str()]);
    assert_eq!(apps[0].api_keys, std::slice::from_ref(&app.api_key));
    let st = c.status(1).await.unwrap();
    let members: Vec<(u64, &str)> = st.members.iter().map(|m| (m.node_id, m.role.as_str())).collect();
    assert_eq!(members, [(1, "voter")], "{st:?}");
    app.push_acked(c.grpc_addr(1), "u", "still served", "k1").await;
    c.assert_no_panics();
}

/// Writes `bytes` to `addr` (in a task of its own, ignoring write errors: the server may close
/// before reading it all), reads until the server closes and returns what it answered. Panics if
/// the connection is still open after 10 s.
async fn send_and_wait_close(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let bytes = bytes.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let answer = read_to_close(&mut rd, addr).await;
    writer.abort();
    answer
}

async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => got.extend_from_slice(&chunk[..k]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("{what} kept the connection open"));
    got
}

/// A status line `HTTP/1.1 <code>` at the start of `answer`.
fn http_status(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    rest.get(..3)?.parse().ok()
}

/// Bytes that are no protocol at all.
const GARBAGE: &[u8] = b"\x00\xff\xfe\x01GARBAGE\r\n\x7f\x80 not a protocol \x00\r\n\r\n";

fn tls_connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_oversized_input_on_every_listener_closes_only_that_connection() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = herald_node::room::tls::dev_pki(pki_dir.path()).unwrap();
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let ws_addr = format!("127.0.0.1:{}", free_port());
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::new(1);
    c.spec_mut(1).extra_args.extend([
        "--tls-addr".into(),
        tls_addr.clone(),
        "--tls-cert".into(),
        pki.cert.display().to_string(),
        "--tls-key".into(),
        pki.key.display().to_string(),
        "--ws-addr".into(),
        ws_addr.clone(),
        "--admin-addr".into(),
        admin_addr.clone(),
    ]);
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("atk-input").await;
    let mut good = Raw::connect(c.client_addr(1)).await.unwrap();
    good.hello(&who(&app, "good", "phone", app.token("good", None)), 0)
        .await
        .unwrap();
    let mut n = 0;

    // Client TLS: bytes that are not a TLS ClientHello, and a TLS record header announcing a
    // record far over the TLS maximum (16 KiB + overhead): the connection is closed, no client
    // protocol answer.
    let hello_in_clear = herald_proto::frame::encode_to_bytes(&pc::Frame {
        kind: Some(Kind::Hello(pc::Hello {
            version: 1,
            ..Default::default()
        })),
    });
    for bytes in [
        GARBAGE,
        &hello_in_clear[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let answer = send_and_wait_close(&tls_addr, bytes).await;
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "nothing but a TLS alert: {answer:?}"
        );
    }
    check_good(&c, &app, &mut good, &mut n).await;
    let tcp = TcpStream::connect(&tls_addr).await.unwrap();
    let tls = tls_connector(&pki.ca)
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("a good TLS client after the garbage");
    let mut r = Raw::from_io(Box::new(tls));
    r.hello(&who(&app, "tls-user", "phone", app.token("tls-user", None)), 0)
        .await
        .expect("the TLS listener still serves");

    // WebSocket: garbage instead of the HTTP upgrade, and an upgrade request with a header over
    // the handshake limit (64 KiB): closed without an upgrade.
    let answer = send_and_wait_close(&ws_addr, GARBAGE).await;
    assert_ne!(http_status(&answer), Some(101), "{answer:?}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Big: {}\r\n\r\n",
        "a".repeat(256 * 1024)
    );
    let answer = send_and_wait_close(&ws_addr, huge.as_bytes()).await;
    assert_ne!(http_status(&answer), Some(101), "{answer:?}");
    check_good(&c, &app, &mut good, &mut n).await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{ws_addr}/"))
        .await
        .expect("a good WebSocket client after the garbage");
    let mut r = Raw::from_io(Box::new(WsStream::new(ws)));
    r.hello(&who(&app, "ws-user", "browser", app.token("ws-user", None)), 0)
        .await
        .expect("the WebSocket listener still serves");

    // Public gRPC: garbage instead of the HTTP/2 preface is closed; a request over the 4 MiB
    // message limit is refused with OUT_OF_RANGE; the same channel then serves a good call.
    let answer = send_and_wait_close(c.grpc_addr(1), GARBAGE).await;
    assert_ne!(http_status(&answer), Some(200), "{answer:?}");
    let mut grpc = c.client(1).await;
    let big = "x".repeat(5 << 20);
    let e = grpc
        .push(app.push_request("good", &big, ""))
        .await
        .expect_err("a 5 MiB request");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    grpc.push(app.push_request("good", "after-big", ""))
        .await
        .expect("the channel still serves");
    assert_eq!(&good.pushes(1).await.unwrap()[0].payload[..], b"after-big");
    check_good(&c, &app, &mut good, &mut n).await;

    // Admin HTTP: garbage gets 400, a request head over the server's buffer gets 431, a body over
    // 2 MiB to the login form gets 413; each connection is closed.
    let answer = send_and_wait_close(&admin_addr, GARBAGE).await;
    assert_eq!(
        http_status(&answer),
        Some(400),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let huge = format!(
        "GET /api/apps HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let answer = send_and_wait_close(&admin_addr, huge.as_bytes()).await;
    // 431, or a reset before the answer is read (the server closes with the rest unread).
    assert!(
        answer.is_empty() || http_status(&answer) == Some(431),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut body = format!(
        "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\ntoken=",
        3 << 20
    );
    body.push_str(&"a".repeat((3 << 20) - 6));
    let answer = send_and_wait_close(&admin_addr, body.as_bytes()).await;
    assert!(
        answer.is_empty() || http_status(&answer) == Some(413),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let ok = crate::ops::http_get(&admin_addr, "/api/apps", Some(c.admin_token()))
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    check_good(&c, &app, &mut good, &mut n).await;

    // Cluster port: garbage, a plaintext HTTP/2 preface and a non-TLS "ClientHello" are closed
    // without an answer other than a TLS alert; a member's call still gets through.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for bytes in [
        GARBAGE,
        &preface[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5][..],
    ] {
        let answer = send_and_wait_close(c.cluster_addr(1), bytes).await;
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "nothing but a TLS alert: {answer:?}"
        );
    }
    let ch = c.cluster_channel(1).await.expect("a member connects");
    let probe = herald_proto::raft::raft_service_client::RaftServiceClient::new(ch)
        .probe(herald_proto::raft::ProbeRequest {
            from: 1,
            target: 1,
            ..Default::default()
        })
        .await
        .expect("a member's probe is answered");
    assert_eq!(probe.into_inner().node_id, 1);
    check_good(&c, &app, &mut good, &mut n).await;
    c.assert_no_panics();
}

/// Codes a call gets when it never reached a service: the TLS handshake refused the connection.
fn refused_by_the_handshake(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_node_to_node_calls_without_this_clusters_certificate_never_reach_a_service() {
    let c = Cluster::start(1).await;
    let app = c.create_app("atk-forge").await;
    let mut good = Raw::connect(c.client_addr(1)).await.unwrap();
    good.hello(&who(&app, "good", "phone", app.token("good", None)), 0)
        .await
        .unwrap();
    let mut n = 0;
    let addr = c.cluster_addr(1).to_string();
    let ca = c.certs_dir().join("ca.pem");
    let other = c.dir().join("other-certs");
    herald_node::certs::ensure_cluster(&other, [1]).unwrap();
    let (oc, ok) = herald_node::certs::node_paths(&other, 1);
    // Another cluster's certificate for node 1 (the very id of this node) and no certificate at
    // all: the handshake refuses both, so no call reaches Raft, forwarding or peer delivery — not
    // even to be refused by the membership guard (PERMISSION_DENIED) or a decoder.
    for (what, identity) in [
        ("no client certificate", None),
        (
            "another cluster's certificate",
            Some((oc.as_path(), ok.as_path())),
        ),
    ] {
        match crate::planes::tls(&addr, 1, &ca, identity).await {
            Err(_) => {}
            Ok(ch) => {
                let answers = crate::planes::internal_rpcs(&ch).await;
                assert_eq!(answers.len(), 9);
                for (rpc, code) in &answers {
                    assert!(
                        refused_by_the_handshake(*code),
                        "forged {rpc} with {what}: {answers:?}"
                    );
                }
            }
        }
        check_good(&c, &app, &mut good, &mut n).await;
    }
    c.assert_no_panics();
}
