//! Time that cannot run away (issue 26, case 3): a node whose wall clock runs an hour ahead
//! (`HERALD_CLOCK_OFFSET_MS`) leads, and neither expires an acked message before its TTL nor moves
//! log time ahead of real time, while it leads or after leadership moves away and back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use herald_proto::v1 as pb;

use crate::harness::{connect, eventually, free_port, is_transient, App, Cluster};
use crate::ops::http_get;

/// The skewed node and its offset.
const SKEWED: u64 = 1;
const HOUR_MS: u64 = 3_600_000;
/// How far log time may be from real time right after an entry: probe round trips and the
/// ordinary difference between the test's clock and the nodes' (the same host).
const SLACK_MS: u64 = 5_000;
/// The TTL of the held message: minutes, far under the skew.
const TTL_MS: u64 = 5 * 60_000;

fn real_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Node `id`'s log time, from its admin `/api/cluster`.
async fn log_time(c: &Cluster, admin: &[String], id: u64) -> anyhow::Result<u64> {
    let r = http_get(&admin[id as usize - 1], "/api/cluster", Some(c.admin_token())).await?;
    if r.status != 200 {
        bail!("node {id} /api/cluster: {} {}", r.status, r.body);
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).context("/api/cluster json")?;
    v["log_time_ms"]
        .as_u64()
        .ok_or_else(|| anyhow!("no log_time_ms in {}", r.body))
}

/// Pushes `payload` to offline `user` through node `id` with a TTL of [`TTL_MS`]; returns the
/// msg id and the real time just before the push.
async fn push_ttl(c: &Cluster, app: &App, id: u64, user: &str, key: &str) -> (String, u64) {
    let before = real_ms();
    let reply = eventually(
        &format!("push {key} acknowledged"),
        Duration::from_secs(30),
        || async {
            let mut req = app.push_request(user, key, key);
            req.get_mut().ttl_ms = TTL_MS;
            match connect(c.grpc_addr(id)).await?.push(req).await {
                Ok(r) => Ok(r.into_inner()),
                Err(s) if is_transient(&s) => Err(anyhow!("{:?}: {}", s.code(), s.message())),
                Err(s) => panic!("push {key} refused: {s:?}"),
            }
        },
    )
    .await;
    (reply.msg_id, before)
}

/// Asserts node `id`'s log time is within [`SLACK_MS`] of the real time window `[from, to]`.
async fn assert_log_time_sane(c: &Cluster, admin: &[String], id: u64, from: u64, what: &str) {
    let t = log_time(c, admin, id).await.expect("log time");
    let to = real_ms();
    assert!(
        t + SLACK_MS >= from && t <= to + SLACK_MS,
        "{what}: node {id}'s log time {t} is {} s off real time [{from}, {to}] (node {SKEWED} runs {} s ahead)",
        (t as i64 - to as i64) / 1000,
        HOUR_MS / 1000,
    );
}

/// Whether message `msg_id` is still held for `user`, by node `id`'s DeliveryStatus.
async fn held(c: &Cluster, app: &App, id: u64, msg_id: &str) -> anyhow::Result<bool> {
    let d = connect(c.grpc_addr(id))
        .await?
        .delivery_status(app.request(pb::DeliveryStatusRequest {
            app: app.id.clone(),
            msg_id: msg_id.into(),
        }))
        .await?
        .into_inner();
    Ok(d.users.first().is_some_and(|u| u.stored))
}

/// Moves leadership to node `want` by killing (and restarting) whichever other node leads.
async fn make_leader(c: &mut Cluster, want: u64) {
    for _ in 0..12 {
        let l = c.wait_leader().await;
        if l == want {
            return;
        }
        c.kill9(l);
        c.wait_leader().await;
        c.restart(l);
        c.wait_ready(l).await;
    }
    panic!("node {want} never became the leader");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_an_hour_ahead_neither_expires_acked_messages_nor_moves_log_time() {
    let mut c = Cluster::new(3);
    let mut admin = Vec::new();
    for id in 1..=3 {
        let a = format!("127.0.0.1:{}", free_port());
        c.spec_mut(id)
            .extra_args
            .extend(["--admin-addr".into(), a.clone()]);
        admin.push(a);
    }
    c.spec_mut(SKEWED)
        .env
        .push(("HERALD_CLOCK_OFFSET_MS".into(), HOUR_MS.to_string()));
    c.start_all();
    make_leader(&mut c, SKEWED).await;

    // The skewed node leads: what it commits carries cluster time, not its own.
    let from = real_ms();
    let app = c.create_app("clock").await;
    let (msg, pushed) = push_ttl(&c, &app, SKEWED, "bob", "m1").await;
    assert_log_time_sane(
        &c,
        &admin,
        SKEWED,
        from,
        "after the first push under the skewed leader",
    )
    .await;
    // Tens of seconds under the skewed leader (its expiry timer runs every 500 ms): still held.
    for i in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            held(&c, &app, SKEWED, &msg).await.expect("delivery status"),
            "message {msg} (TTL {} s) gone {} s after its push, after {i} s under the skewed leader",
            TTL_MS / 1000,
            (real_ms() - pushed) / 1000
        );
    }
    assert_eq!(c.wait_leader().await, SKEWED, "the skewed node still leads");
    let from = real_ms();
    push_ttl(&c, &app, SKEWED, "carol", "m2").await;
    assert_log_time_sane(&c, &admin, SKEWED, from, "after 20 s under the skewed leader").await;

    // Leadership moves away: log time is still real time on the new leader.
    c.kill9(SKEWED);
    let other = c.wait_leader().await;
    let from = real_ms();
    push_ttl(&c, &app, other, "carol", "m3").await;
    assert_log_time_sane(&c, &admin, other, from, "after leadership moved away").await;
    assert!(held(&c, &app, other, &msg).await.unwrap(), "{msg} held");

    // And back to the skewed node.
    c.restart(SKEWED);
    c.wait_ready(SKEWED).await;
    make_leader(&mut c, SKEWED).await;
    let from = real_ms();
    push_ttl(&c, &app, SKEWED, "carol", "m4").await;
    assert_log_time_sane(&c, &admin, SKEWED, from, "after leadership moved back").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in c.live_ids() {
        assert!(held(&c, &app, id, &msg).await.unwrap(), "{msg} held on node {id}");
    }
    c.assert_no_panics();
}

/// Tokens are judged by cluster time (the two-hour fault run's finding): a node whose clock runs
/// two hours behind refused every fresh token as "issued in the future", and the SDK, taking that
/// as final, gave up on the device for the rest of the run. It also accepted tokens that had
/// expired by every other clock.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_hours_behind_judges_tokens_by_cluster_time() {
    use crate::attacks::{hello, minted, who};
    use herald_proto::client::ErrorCode;

    let mut c = Cluster::new(3);
    c.spec_mut(SKEWED)
        .env
        .push(("HERALD_CLOCK_OFFSET_MS".into(), format!("-{}", 2 * HOUR_MS)));
    c.start_all();
    for id in 1..=3 {
        c.wait_ready(id).await;
    }
    let app = c.create_app("tokens").await;
    let addr = c.client_addr(SKEWED).to_string();
    let now = real_ms() / 1000;
    // The peer monitor hears the other clocks within a second or two of start.
    let fresh = minted(&app.id, &app.secret, "alice", None, now, 3600);
    eventually(
        "a fresh token accepted by the node whose clock is two hours behind",
        Duration::from_secs(20),
        || {
            let (addr, w) = (addr.clone(), who(&app, "alice", "phone", fresh.clone()));
            async move { hello(&addr, &w).await.map(|_| ()).map_err(|e| anyhow!("{e:?}")) }
        },
    )
    .await;
    // Expired ten minutes ago by real time (and so by cluster time), but valid for another
    // hour and fifty minutes by the skewed node's own clock.
    let expired = minted(&app.id, &app.secret, "alice", None, now - 1200, 600);
    let (code, message) = hello(&addr, &who(&app, "alice", "tablet", expired))
        .await
        .expect_err("an expired token is refused");
    assert_eq!(code, ErrorCode::TokenExpired, "{message}");
    c.assert_no_panics();
}
