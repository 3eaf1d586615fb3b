//! The mobile case on real node processes: several apps sharing one connection (closing, refusing
//! and replacing one session leaves the others), the adaptive heartbeat settling under a NAT's
//! idle cutoff, and the app backends' consumer group losing a member while clients send upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use herald_client::{Connection, HeartbeatConfig, SessionConfig};
use herald_node::coordinator::test_backend::TestBackend;
use herald_proto::client::{self as pc, frame::Kind, ErrorCode, KickReason};
use herald_proto::v1 as pb;

use crate::harness::{admin_request, connect, eventually, App, Cluster, NODE_WAIT};
use crate::ops::{http_get, metric, ops_cluster};
use crate::proxy::Proxy;
use crate::raw::{Raw, Who};
use crate::sdk::{assert_exactly_once, client_addrs, quick_backoff, token, Inbox, CLIENT_WAIT};

fn session(app: &App, user: &str) -> SessionConfig {
    SessionConfig::new(&app.id, user, "phone").token(token(app, user, 3600))
}

/// `user`'s phone in `app`, with a token of `app` for the user.
fn who(app: &App, user: &str) -> Who {
    Who {
        app: app.id.clone(),
        user: user.into(),
        device: "phone".into(),
        platform: "ios".into(),
        token: app.token(user, None),
    }
}

/// Sends OPEN_SESSION `sid` for `who` and returns the answer for that session: WELCOME or the
/// ERROR code (frames for other sessions are skipped).
async fn open_session(raw: &mut Raw, who: &Who, sid: u32) -> Result<pc::Welcome, ErrorCode> {
    raw.send(Kind::OpenSession(who.open(sid, 0))).await.unwrap();
    let (answer, _) = raw
        .until(|k| match k {
            Kind::Welcome(w) if w.session_id == sid => Some(Ok(w.clone())),
            Kind::Error(e) if e.session_id == sid => Some(Err(e.code())),
            _ => None,
        })
        .await
        .unwrap();
    answer
}

/// The next PUSH on `raw`; panics if a frame other than PUSH, PING, PONG or SUBSCRIBED comes first.
async fn next_push(raw: &mut Raw) -> pc::Push {
    raw.pushes(1).await.unwrap().remove(0)
}

/// Waits until the cluster, asked through node `via`, has no session of `user` in `app`.
async fn wait_offline(c: &Cluster, via: u64, app: &App, user: &str) {
    eventually(&format!("{user} offline in {}", app.id), NODE_WAIT, || async {
        let st = connect(c.grpc_addr(via))
            .await?
            .status(app.request(pb::StatusRequest {
                app: app.id.clone(),
                user: user.into(),
            }))
            .await?
            .into_inner();
        if st.online || !st.sessions.is_empty() {
            bail!("{st:?}")
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_one_session_of_a_shared_connection_leaves_the_other_receiving() {
    let c = Cluster::start(3).await;
    let chat = c.create_app("m-close-chat").await;
    let news = c.create_app("m-close-news").await;
    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    raw.hello(&who(&chat, "alice"), 0).await.unwrap();
    open_session(&mut raw, &who(&news, "alice"), 2).await.unwrap();

    chat.push_acked(c.grpc_addr(1), "alice", "chat-1", "c1").await;
    let p = next_push(&mut raw).await;
    assert_eq!((p.session_id, &p.payload[..]), (1, &b"chat-1"[..]));
    news.push_acked(c.grpc_addr(3), "alice", "news-1", "n1").await;
    let p = next_push(&mut raw).await;
    assert_eq!((p.session_id, &p.payload[..]), (2, &b"news-1"[..]));

    // CLOSE_SESSION 1: answered SESSION_CLOSED 1, and the connection stays.
    raw.send(Kind::CloseSession(pc::CloseSession {
        session_id: 1,
        expiry_s: None,
    }))
    .await
    .unwrap();
    let (closed, others) = raw
        .until(|k| match k {
            Kind::SessionClosed(s) => Some(s.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(closed.session_id, 1, "{closed:?}");
    assert!(
        others
            .iter()
            .all(|k| !matches!(k, Kind::Kicked(_) | Kind::Error(_) | Kind::Bye(_))),
        "{others:?}"
    );
    wait_offline(&c, 1, &chat, "alice").await;

    // The chat app's next message waits in the mailbox; the news session still gets its own.
    chat.push_acked(c.grpc_addr(1), "alice", "chat-2", "c2").await;
    news.push_acked(c.grpc_addr(3), "alice", "news-2", "n2").await;
    let p = next_push(&mut raw).await;
    assert_eq!((p.session_id, &p.payload[..], p.seq), (2, &b"news-2"[..], 2));
    raw.ack(2, 2).await.unwrap();
    raw.ping(7).await.unwrap();
    assert!(
        raw.recv_within(Duration::from_millis(500)).await.is_err(),
        "nothing more arrives for the closed session"
    );
    let st = connect(c.grpc_addr(2))
        .await
        .unwrap()
        .status(chat.request(pb::StatusRequest {
            app: chat.id.clone(),
            user: "alice".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.pending, 2, "chat-1 was never acked, chat-2 waits: {st:?}");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_of_one_app_opens_no_session_of_another_and_the_others_go_on() {
    let c = Cluster::start(3).await;
    let chat = c.create_app("m-iso-chat").await;
    let news = c.create_app("m-iso-news").await;
    // An app that happens to share chat's signing secret: the signature checks out, so only the
    // token's app claim can refuse it.
    let leader = c.wait_leader().await;
    let twin = c
        .client(leader)
        .await
        .create_app(admin_request(pb::CreateAppRequest {
            id: "m-iso-twin".into(),
            secret: chat.secret.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    c.wait_caught_up(2).await;

    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    raw.hello(&who(&chat, "alice"), 0).await.unwrap();
    let chat_token = who(&chat, "alice").token;
    let forged = |app: &str| Who {
        app: app.into(),
        token: chat_token.clone(),
        ..who(&chat, "alice")
    };
    assert_eq!(
        open_session(&mut raw, &forged(&news.id), 2).await.unwrap_err(),
        ErrorCode::BadToken,
        "chat's token is not signed by news' secret"
    );
    assert_eq!(
        open_session(&mut raw, &forged(&twin.id), 3).await.unwrap_err(),
        ErrorCode::PermissionDenied,
        "chat's token names app chat"
    );
    for (app, api_key) in [(&news.id, &news.api_key), (&twin.id, &twin.api_keys[0])] {
        let other = App {
            id: app.clone(),
            secret: String::new(),
            api_key: api_key.clone(),
        };
        wait_offline(&c, 2, &other, "alice").await;
    }

    // The chat session was not disturbed, and a refused id is free for a proper open.
    chat.push_acked(c.grpc_addr(1), "alice", "chat-1", "c1").await;
    let p = next_push(&mut raw).await;
    assert_eq!((p.session_id, &p.payload[..]), (1, &b"chat-1"[..]));
    open_session(&mut raw, &who(&news, "alice"), 2).await.unwrap();
    news.push_acked(c.grpc_addr(3), "alice", "news-1", "n1").await;
    let p = next_push(&mut raw).await;
    assert_eq!((p.session_id, &p.payload[..]), (2, &b"news-1"[..]));
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_login_elsewhere_replaces_only_its_own_session_of_a_shared_connection() {
    let c = Cluster::start(3).await;
    let chat = c.create_app("m-fence-chat").await;
    let news = c.create_app("m-fence-news").await;
    let mut shared = Raw::connect(c.client_addr(1)).await.unwrap();
    let old = shared.hello(&who(&chat, "alice"), 0).await.unwrap();
    open_session(&mut shared, &who(&news, "alice"), 2).await.unwrap();

    // The same (app, user, device) logs in on another node: only chat's session 1 is replaced.
    let mut elsewhere = Raw::connect(c.client_addr(3)).await.unwrap();
    let new = elsewhere.hello(&who(&chat, "alice"), 0).await.unwrap();
    assert!(new.epoch > old.epoch, "{old:?} {new:?}");
    let (kicked, others) = shared
        .until(|k| match k {
            Kind::Kicked(k) => Some(k.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(
        (kicked.session_id, kicked.code()),
        (1, KickReason::Replaced),
        "{kicked:?}"
    );
    assert!(
        others.iter().all(|k| !matches!(k, Kind::Bye(_) | Kind::Error(_))),
        "{others:?}"
    );

    // News keeps arriving on the shared connection; chat goes to the newer login only.
    news.push_acked(c.grpc_addr(2), "alice", "news-1", "n1").await;
    let p = next_push(&mut shared).await;
    assert_eq!((p.session_id, &p.payload[..]), (2, &b"news-1"[..]));
    chat.push_acked(c.grpc_addr(2), "alice", "chat-1", "c1").await;
    let p = next_push(&mut elsewhere).await;
    assert_eq!((p.session_id, &p.payload[..]), (1, &b"chat-1"[..]));
    shared.ping(9).await.unwrap();
    assert!(
        shared.recv_within(Duration::from_millis(500)).await.is_err(),
        "the replaced session gets nothing more"
    );
    // Chat's registry holds the newer login only, on node 3.
    let st = connect(c.grpc_addr(1))
        .await
        .unwrap()
        .status(chat.request(pb::StatusRequest {
            app: chat.id.clone(),
            user: "alice".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.sessions.len(), 1, "{st:?}");
    assert_eq!(
        (st.sessions[0].node_id, st.sessions[0].epoch),
        (3, new.epoch),
        "{st:?}"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_apps_on_one_connection_get_their_own_pushes_and_a_kick_ends_only_one() {
    let c = Cluster::start(3).await;
    let chat = c.create_app("m-chat").await;
    let news = c.create_app("m-news").await;
    // Through a proxy, so the test sees how many TCP connections the phone opens.
    let proxy = Proxy::start(c.client_addr(2), None).await;
    let conn = Connection::builder()
        .nodes([proxy.addr().to_string()])
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let (_chat_client, ev) = conn.open(session(&chat, "alice")).await.unwrap();
    let mut chat_in = Inbox::new(ev);
    let (_news_client, ev) = conn.open(session(&news, "alice")).await.unwrap();
    let mut news_in = Inbox::new(ev);
    chat_in.connected(CLIENT_WAIT).await;
    news_in.connected(CLIENT_WAIT).await;
    assert_eq!(proxy.flows(), 1, "both sessions ride one connection");

    // The same user id in two apps: each app's pushes reach its own session only.
    let (mut to_chat, mut to_news) = (Vec::new(), Vec::new());
    for i in 0..3 {
        to_chat.push(
            chat.push_acked(c.grpc_addr(1), "alice", &format!("chat-{i}"), &format!("c{i}"))
                .await,
        );
        to_news.push(
            news.push_acked(c.grpc_addr(3), "alice", &format!("news-{i}"), &format!("n{i}"))
                .await,
        );
    }
    chat_in.messages(3, CLIENT_WAIT).await;
    news_in.messages(3, CLIENT_WAIT).await;
    assert_eq!(chat_in.payloads(), vec!["chat-0", "chat-1", "chat-2"]);
    assert_eq!(news_in.payloads(), vec!["news-0", "news-1", "news-2"]);

    // The chat app's backend kicks alice: the chat session ends, the news session goes on over
    // the same connection.
    let kicked = crate::harness::connect(c.grpc_addr(1))
        .await
        .unwrap()
        .kick(chat.request(pb::KickRequest {
            app: chat.id.clone(),
            user: "alice".into(),
            device: String::new(),
            reason: "logged out".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.kicked, 1);
    chat_in
        .until("the chat session to be kicked", CLIENT_WAIT, |i| i.ended)
        .await;
    assert!(
        chat_in
            .log
            .iter()
            .any(|l| l.contains("Kicked") && l.contains("Admin")),
        "{}",
        chat_in.tail(5)
    );
    for i in 3..5 {
        to_news.push(
            news.push_acked(c.grpc_addr(2), "alice", &format!("news-{i}"), &format!("n{i}"))
                .await,
        );
    }
    news_in.messages(5, CLIENT_WAIT).await;
    news_in.quiet_for(Duration::from_millis(300)).await;
    assert_exactly_once(&news_in, &to_news, "alice");
    assert!(news_in.disconnected.is_empty(), "{}", news_in.tail(10));
    assert_eq!(proxy.flows(), 1, "no reconnect");
    assert_exactly_once(&chat_in, &to_chat, "alice");
}

/// The proxy forgets a flow idle for 5.5 s. The node suggests a 1 s heartbeat and lets clients
/// go up to 20 s; the adaptive heartbeat doubles while pings are answered (1, 2, 4 s), loses the
/// 8 s probe to the cutoff, reconnects, bisects towards the failure (6 s fails too) and settles
/// at 5 s, just under the cutoff, where the connection then stays up.
#[tokio::test(flavor = "multi_thread")]
async fn the_adaptive_heartbeat_settles_just_under_the_path_idle_cutoff() {
    let cutoff = Duration::from_millis(5_500);
    let c = Cluster::new(3).node_args(&[
        "--client-heartbeat-ms",
        "1000",
        "--client-heartbeat-min-ms",
        "500",
        "--client-heartbeat-max-ms",
        "20000",
    ]);
    let mut c = c;
    c.start_all();
    c.wait_leader().await;
    let app = c.create_app("m-heartbeat").await;
    let proxy = Proxy::start(c.client_addr(1), Some(cutoff)).await;
    let conn = Connection::builder()
        .nodes([proxy.addr().to_string()])
        .backoff(quick_backoff())
        .heartbeat(HeartbeatConfig {
            adaptive: true,
            // One answered ping per step and a quick verdict on a lost one keep the search short.
            confirmations: 1,
            pong_timeout: Duration::from_secs(1),
            ..HeartbeatConfig::default()
        })
        .build()
        .unwrap();
    let (_client, ev) = conn.open(session(&app, "alice")).await.unwrap();
    let mut inbox = Inbox::new(ev);
    inbox.connected(CLIENT_WAIT).await;
    // Settled: the last flow carried two pings sent after 4.5 s or more of silence.
    // A PING the proxy forwarded after a long silence proves the flow survived that silence
    // (pings of a forgotten flow are dropped unseen).
    let settled = |p: &Proxy| {
        let flow = p.flows();
        p.pings()
            .iter()
            .filter(|s| s.flow == flow && s.idle >= Duration::from_millis(4_500))
            .count()
            >= 2
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    while !settled(&proxy) {
        assert!(
            std::time::Instant::now() < deadline,
            "no settled heartbeat after 100 s; flows {}, cut {}, pings {:?}",
            proxy.flows(),
            proxy.cut(),
            proxy.pings()
        );
        // Keep the events moving (reconnects show up as Disconnected / Connected).
        let _ = inbox.next(Duration::from_millis(200)).await;
    }
    let pings = proxy.pings();
    let flow = proxy.flows();
    let last: Vec<u32> = pings
        .iter()
        .filter(|s| s.flow == flow)
        .map(|s| s.interval_ms)
        .collect();
    let settled_at = *last.last().unwrap();
    assert!(
        settled_at < cutoff.as_millis() as u32 && settled_at >= 4_500,
        "settled at {settled_at} ms; pings of the last flow {last:?}"
    );
    assert!(proxy.cut() >= 1, "the search hit the cutoff at least once");
    // Probes past the cutoff were seen (and failed), so the search really looked above it.
    assert!(
        pings.iter().any(|s| s.interval_ms as u128 > cutoff.as_millis()),
        "{pings:?}"
    );
    // A message still arrives on the settled connection.
    let r = vec![app.push_acked(c.grpc_addr(2), "alice", "still here", "k1").await];
    inbox.messages(1, CLIENT_WAIT).await;
    assert_exactly_once(&inbox, &r, "alice");
    assert_eq!(proxy.flows(), flow, "no reconnect once settled");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_backend_group_member_hands_its_users_to_the_others_without_loss_or_reordering() {
    const USERS: usize = 6;
    const PER_USER: u64 = 30;
    let backends = [
        TestBackend::start().await.unwrap(),
        TestBackend::start().await.unwrap(),
        TestBackend::start().await.unwrap(),
    ];
    let (c, admin_http, _ws) = ops_cluster(3, &[]).await;
    let app = c.create_app("m-group").await;
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(admin_request(pb::GetAppRequest { id: app.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.callbacks = backends.iter().map(TestBackend::endpoint).collect();
    admin
        .update_app(admin_request(pb::UpdateAppRequest { app: Some(cfg) }))
        .await
        .unwrap();
    for id in c.ids() {
        c.wait_caught_up(id).await;
    }
    // One phone per user, spread over the nodes.
    let mut clients = Vec::new();
    let addrs = client_addrs(&c);
    for u in 0..USERS {
        let (client, ev) = herald_client::Client::builder(&app.id, format!("user-{u}"), "phone")
            .token(token(&app, &format!("user-{u}"), 3600))
            .nodes([addrs[u % addrs.len()].clone()])
            .backoff(quick_backoff())
            .connect()
            .await
            .unwrap();
        let mut inbox = Inbox::new(ev);
        inbox.connected(CLIENT_WAIT).await;
        clients.push((client, inbox));
    }
    // Every user sends its requests with a few in flight; the SDK numbers them in send order.
    let mut senders = Vec::new();
    for (u, (client, _)) in clients.iter().enumerate() {
        let client = client.clone();
        senders.push(tokio::spawn(async move {
            let replies: Vec<_> = futures::stream::iter(0..PER_USER)
                .map(|i| {
                    let client = client.clone();
                    async move {
                        // Pace the stream so that the member dies in the middle of it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        (i, client.upstream(format!("user-{u}:{i}")).await)
                    }
                })
                .buffered(4)
                .collect()
                .await;
            replies
        }));
    }
    // Once every member has taken some traffic, the busiest one dies.
    let busiest = loop {
        let counts: Vec<usize> = backends.iter().map(|b| b.upstreams().len()).collect();
        if counts.iter().sum::<usize>() >= USERS * PER_USER as usize / 3 {
            break counts
                .iter()
                .enumerate()
                .max_by_key(|(_, n)| **n)
                .map(|(i, _)| i)
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    backends[busiest].stop().await;
    let before_stop = backends[busiest].upstreams().len();
    let survivors_at_stop: usize = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != busiest)
        .map(|(_, b)| b.upstreams().len())
        .sum();

    for (u, s) in senders.into_iter().enumerate() {
        let replies = tokio::time::timeout(CLIENT_WAIT, s)
            .await
            .expect("every request answered in time")
            .unwrap();
        for (i, r) in replies {
            let payload = r.unwrap_or_else(|e| panic!("user-{u} request {i}: {e}"));
            assert_eq!(payload, format!("user-{u}:{i}").as_bytes(), "the backend echoes");
        }
    }
    // Merge what the members received, in arrival order.
    let mut arrivals: Vec<_> = backends.iter().flat_map(|b| b.upstreams()).collect();
    arrivals.sort_by_key(|a| a.seq);
    let mut per_user: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for a in &arrivals {
        per_user
            .entry(a.request.user.clone())
            .or_default()
            .push(a.request.request_id);
    }
    assert_eq!(per_user.len(), USERS);
    for (user, ids) in &per_user {
        // A request whose answer was lost with the member may arrive twice (at least once);
        // the first arrivals are every request, in the order the client sent them.
        let mut seen = BTreeSet::new();
        let first: Vec<u64> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(first, sorted, "{user}: requests reordered: {ids:?}");
        assert_eq!(
            first.len() as u64,
            PER_USER,
            "{user}: a request was lost: {ids:?}"
        );
    }
    assert_eq!(
        backends[busiest].upstreams().len(),
        before_stop,
        "the dead member got nothing more"
    );
    // The dead member's share moved: the survivors took what was left, its users included.
    let survivors: usize = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != busiest)
        .map(|(_, b)| b.upstreams().len())
        .sum();
    assert!(
        survivors + before_stop >= USERS * PER_USER as usize && survivors > survivors_at_stop,
        "survivors {survivors_at_stop} -> {survivors}, dead member {before_stop}"
    );
    let dead_users: BTreeSet<String> = backends[busiest]
        .upstreams()
        .iter()
        .map(|a| a.request.user.clone())
        .collect();
    for user in &dead_users {
        let last_on_dead = backends[busiest]
            .upstreams()
            .iter()
            .filter(|a| a.request.user == *user)
            .map(|a| a.seq)
            .max()
            .unwrap();
        let moved = arrivals
            .iter()
            .any(|a| a.request.user == *user && a.seq > last_on_dead);
        let done = per_user[user].len() as u64 >= PER_USER
            && backends[busiest]
                .upstreams()
                .iter()
                .filter(|a| a.request.user == *user)
                .count() as u64
                == PER_USER;
        assert!(moved || done, "{user}'s requests moved to another member");
    }

    // /metrics: every node that called the group lists its three members; the dead one is
    // out on at least one node (it stays out: its probes fail), no node has more than it out,
    // and nothing is queued once every request was answered.
    let groups = eventually("the dead member to show as unhealthy", NODE_WAIT, || async {
        let mut seen = Vec::new();
        for a in &admin_http {
            let m = http_get(a, "/metrics", None).await?.body;
            let g = |f: &str| metric(&m, &format!("{f}{{app=\"m-group\"}}"));
            seen.push((
                g("herald_callback_group_members"),
                g("herald_callback_group_unhealthy"),
                g("herald_callback_group_queue_depth"),
            ));
        }
        let unhealthy: f64 = seen.iter().filter_map(|s| s.1).sum();
        if unhealthy >= 1.0 {
            Ok(seen)
        } else {
            bail!("{seen:?}")
        }
    })
    .await;
    for (members, unhealthy, depth) in &groups {
        if members.is_some() {
            assert_eq!(*members, Some(3.0), "{groups:?}");
            assert!(
                unhealthy.unwrap() <= 1.0,
                "only the dead member is out: {groups:?}"
            );
            assert_eq!(*depth, Some(0.0), "{groups:?}");
        }
    }
    assert!(
        groups.iter().all(|g| g.0.is_some()),
        "every node took upstream: {groups:?}"
    );
}
