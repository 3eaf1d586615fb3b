//! The admin HTTP server of real nodes: Prometheus metrics move with traffic, probes answer, the
//! JSON API needs the admin token and shows the cluster, apps and a user; a node that is not a
//! member yet answers `/readyz` with 503.

use std::time::Duration;

use anyhow::bail;
use herald_proto::client::frame::Kind;
use herald_proto::v1 as pb;

use super::{http_call, http_get, https_call, metric, ops_cluster};
use crate::harness::{admin_request, eventually, free_port, App, Cluster, NODE_WAIT};
use crate::raw::{Raw, Who};

/// Snapshots after this many log entries, so that the test can make a node build one.
const SNAPSHOT_EVERY: u64 = 40;

/// Node `admin`'s `/metrics` text.
async fn scrape(admin: &str) -> anyhow::Result<String> {
    let m = http_get(admin, "/metrics", None).await?;
    if m.status != 200 {
        bail!("/metrics answered {}: {}", m.status, m.body);
    }
    Ok(m.body)
}

/// Waits until node `admin`'s metric `series` satisfies `ok`; returns the whole scrape.
async fn until_metric(admin: &str, series: &str, ok: impl Fn(f64) -> bool) -> String {
    eventually(&format!("{series} on {admin}"), NODE_WAIT, || async {
        let text = scrape(admin).await?;
        match metric(&text, series) {
            Some(v) if ok(v) => Ok(text),
            other => bail!("{series} is {other:?}"),
        }
    })
    .await
}

/// Sets `app`'s per-user mailbox cap.
async fn set_mailbox_cap(c: &Cluster, app: &App, cap: u32) {
    let mut g = c.client(1).await;
    let mut cfg = g
        .get_app(admin_request(pb::GetAppRequest { id: app.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.limits.as_mut().unwrap().mailbox_cap = cap;
    g.update_app(admin_request(pb::UpdateAppRequest { app: Some(cfg) }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_probes_and_the_admin_api() {
    let (c, admin, _ws) = ops_cluster(3, &["--snapshot-every", &SNAPSHOT_EVERY.to_string()]).await;
    let app = c.create_app("ops").await;
    let other = c.create_app("ops2").await;
    let token = c.admin_token().to_string();

    // Probes: every node becomes ready.
    for a in &admin {
        let h = http_get(a, "/healthz", None).await.unwrap();
        assert_eq!(h.status, 200, "{h:?}");
        eventually(&format!("{a} ready"), NODE_WAIT, || async {
            let r = http_get(a, "/readyz", None).await?;
            if r.status == 200 && r.json()["ready"] == true {
                Ok(())
            } else {
                bail!("{r:?}")
            }
        })
        .await;
    }

    // A client on node 1 gets a pushed message and acks it: counters and the latency histogram move.
    let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
    let who = Who {
        app: app.id.clone(),
        user: "alice".into(),
        device: "phone".into(),
        platform: "ios".into(),
        token: app.token("alice", None),
    };
    raw.hello(&who, 0).await.unwrap();
    // A second app's session on the same connection.
    let who2 = Who {
        app: other.id.clone(),
        token: other.token("alice", None),
        ..who.clone()
    };
    raw.send(Kind::OpenSession(who2.open(2, 0))).await.unwrap();
    let (welcome, _) = raw
        .until(|k| match k {
            Kind::Welcome(w) if w.session_id == 2 => Some(w.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(welcome.node_id, 1);
    let mut grpc = c.client(2).await;
    grpc.push(app.push_request("alice", "metrics-hello", "k1"))
        .await
        .unwrap();
    let push = raw.pushes(1).await.unwrap().remove(0);
    assert_eq!(&push.payload[..], b"metrics-hello");
    raw.ack(1, push.seq).await.unwrap();

    let text = eventually(
        "node 1 metrics to show the delivery and the ack",
        NODE_WAIT,
        || async {
            let m = http_get(&admin[0], "/metrics", None).await?;
            if !m.content_type.starts_with("text/plain") {
                bail!("content type {:?}", m.content_type);
            }
            let acked = metric(&m.body, "herald_messages_acked_total{app=\"ops\"}").unwrap_or(0.0);
            if acked < 1.0 {
                bail!("not acked yet")
            }
            Ok(m.body)
        },
    )
    .await;
    let v = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} missing from:\n{text}"));
    assert_eq!(v("herald_connections{transport=\"tcp\"}"), 1.0);
    assert_eq!(v("herald_connections{transport=\"ws\"}"), 0.0);
    assert_eq!(v("herald_sessions{app=\"ops\"}"), 1.0);
    assert_eq!(v("herald_sessions{app=\"ops2\"}"), 1.0);
    // One TCP connection carrying a session of each app counts once under each app.
    assert_eq!(v("herald_app_connections{app=\"ops\",transport=\"tcp\"}"), 1.0);
    assert_eq!(v("herald_app_connections{app=\"ops2\",transport=\"tcp\"}"), 1.0);
    assert!(!text.contains("transport=\"unknown\""), "{text}");
    assert!(!text.contains("herald_app_connections{app=\"ops\",transport=\"ws\"}"));
    assert!(v("herald_deliveries_total") >= 1.0);
    assert!(v("herald_acks_total") >= 1.0);
    assert!(v("herald_connects_total") >= 1.0);
    assert!(v("herald_delivery_latency_seconds_count") >= 1.0);
    assert!(v("herald_delivery_latency_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert_eq!(v("herald_messages_stored_total{app=\"ops\"}"), 1.0);
    assert!(v("herald_raft_term") >= 1.0);
    assert!(v("herald_raft_leader_id") >= 1.0);
    assert!(v("herald_raft_apply_index") >= 1.0);
    assert!(v("herald_raft_last_log_index") >= v("herald_raft_apply_index"));
    assert!(v("herald_raft_apply_lag") < herald_node::admin::READY_MAX_LAG as f64);
    assert_eq!(v("herald_ready"), 1.0);
    // No app has callbacks: nothing queued, no groups.
    assert_eq!(v("herald_callback_queue_depth"), 0.0);
    assert!(!text.contains("herald_callback_group_members{"), "{text}");
    for family in [
        "herald_raft_apply_lag",
        "herald_raft_snapshots_built_total",
        "herald_raft_snapshot_build_seconds_total",
        "herald_callback_queue_depth",
        "herald_archive_enabled",
        "herald_archive_pending",
    ] {
        v(family);
    }
    assert!(text.contains("herald_rejected_total{reason=\"auth\"}"), "{text}");
    assert!(
        text.contains("herald_callback_failures_total{kind=\"upstream_failed\"}"),
        "{text}"
    );
    // Node 2 took the push through its API.
    let m2 = http_get(&admin[1], "/metrics", None).await.unwrap().body;
    assert_eq!(metric(&m2, "herald_pushes_total{qos=\"1\"}"), Some(1.0), "{m2}");

    // The JSON API needs the admin token.
    let denied = http_get(&admin[0], "/api/cluster", None).await.unwrap();
    assert_eq!(denied.status, 401, "{denied:?}");
    let wrong = http_get(&admin[0], "/api/cluster", Some("nope")).await.unwrap();
    assert_eq!(wrong.status, 401);
    let apps = http_get(&admin[0], "/api/apps", Some(&token)).await.unwrap();
    assert_eq!(apps.status, 200, "{apps:?}");
    assert_eq!(apps.json()["apps"][0]["id"], "ops");
    assert_eq!(apps.json()["apps"][0]["sessions_on_this_node"], 1);
    assert_eq!(apps.json()["apps"][0]["counters"]["acked"], 1);

    let cluster = http_get(&admin[2], "/api/cluster", Some(&token))
        .await
        .unwrap()
        .json();
    assert_eq!(cluster["members"].as_array().unwrap().len(), 3, "{cluster}");
    let leader = cluster["leader_id"].as_u64().expect("a leader");
    let leaders: Vec<_> = cluster["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["leader"] == true)
        .map(|m| m["node_id"].as_u64().unwrap())
        .collect();
    assert_eq!(leaders, vec![leader]);

    let user = http_get(&admin[1], "/api/user?app=ops&user=alice", Some(&token))
        .await
        .unwrap()
        .json();
    assert_eq!(user["online"], true, "{user}");
    assert_eq!(user["sessions"][0]["device"], "phone");
    assert_eq!(user["sessions"][0]["node_id"], 1);
    assert_eq!(user["mailbox"]["next_seq"], 2);
    let missing = http_get(&admin[1], "/api/user?app=nope&user=alice", Some(&token))
        .await
        .unwrap();
    assert_eq!(missing.status, 404);

    // Rates: every member answers with its samples (the sampler runs every 5 s).
    let rates = eventually("rates from every node", NODE_WAIT, || async {
        let r = http_get(&admin[0], "/api/rates", Some(&token)).await?.json();
        let nodes = r["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.len() == 3
            && nodes
                .iter()
                .all(|n| n["reachable"] == true && !n["samples"].as_array().unwrap().is_empty())
        {
            Ok(r)
        } else {
            bail!("{r}")
        }
    })
    .await;
    assert!(rates["interval_ms"].as_u64().unwrap() > 0);

    // The dashboard page is served from the binary.
    let page = http_get(&admin[0], "/", None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"), "{page:?}");
    assert!(page.body.contains("User lookup") && page.body.contains("/api/cluster"));

    // A client leaves: node 1 counts the disconnect and the connection gauges drop.
    let disconnects = v("herald_disconnects_total");
    drop(raw);
    let text = eventually("node 1 to count the disconnect", NODE_WAIT, || async {
        let text = scrape(&admin[0]).await?;
        if metric(&text, "herald_disconnects_total") > Some(disconnects)
            && !text.contains("herald_app_connections{app=")
            && metric(&text, "herald_connections{transport=\"tcp\"}") == Some(0.0)
        {
            Ok(text)
        } else {
            bail!("{text}")
        }
    })
    .await;
    assert_eq!(metric(&text, "herald_disconnects_total"), Some(disconnects + 1.0));

    // The per-user cap trims: three messages for an offline user under a cap of two.
    set_mailbox_cap(&c, &app, 2).await;
    for i in 0..3 {
        app.push_acked(c.grpc_addr(2), "bob", &format!("capped-{i}"), &format!("cap{i}"))
            .await;
    }
    let text = until_metric(&admin[0], "herald_messages_trimmed_total{app=\"ops\"}", |t| {
        t >= 1.0
    })
    .await;
    assert_eq!(
        metric(&text, "herald_messages_trimmed_total{app=\"ops\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "herald_messages_expired_total{app=\"ops\"}"),
        Some(0.0)
    );

    // A message with a short TTL expires (the leader sweeps every 500 ms); every replica counts it.
    let mut req = app.push_request("carol", "short-lived", "ttl1");
    req.get_mut().ttl_ms = 300;
    grpc.push(req).await.unwrap();
    for a in &admin {
        until_metric(a, "herald_messages_expired_total{app=\"ops\"}", |e| e == 1.0).await;
    }

    // Enough log entries make node 1 build a snapshot: the count, the covered index and the
    // build time move (the time in whole milliseconds, so a quick build may add 0).
    let before = scrape(&admin[0]).await.unwrap();
    let b = |s: &str| metric(&before, s).unwrap_or_else(|| panic!("{s} missing from:\n{before}"));
    for i in 0..SNAPSHOT_EVERY + 5 {
        app.push_acked(c.grpc_addr(1), &format!("snap-{i}"), "x", &format!("snap{i}"))
            .await;
    }
    let built = b("herald_raft_snapshots_built_total");
    let text = until_metric(&admin[0], "herald_raft_snapshots_built_total", |n| n > built).await;
    let v = |s: &str| metric(&text, s).unwrap_or_else(|| panic!("{s} missing from:\n{text}"));
    assert!(
        v("herald_raft_snapshot_index") >= b("herald_raft_snapshot_index") + SNAPSHOT_EVERY as f64,
        "{text}"
    );
    assert!(v("herald_raft_snapshot_build_seconds_total") >= b("herald_raft_snapshot_build_seconds_total"));
    assert!(v("herald_raft_snapshot_build_seconds_total") >= v("herald_raft_snapshot_build_seconds_last"));
    assert!(v("herald_raft_snapshot_build_seconds_last") < 60.0, "{text}");

    // Quiet again: every node has applied exactly what the leader committed, with no lag.
    eventually("every node at the leader's commit index", NODE_WAIT, || async {
        let mut scrapes = Vec::new();
        for a in &admin {
            scrapes.push(scrape(a).await?);
        }
        let get = |t: &str, s: &str| metric(t, s).ok_or_else(|| anyhow::anyhow!("{s} missing"));
        let leaders: Vec<&String> = scrapes
            .iter()
            .filter(|t| metric(t, "herald_raft_is_leader") == Some(1.0))
            .collect();
        let [leader] = leaders[..] else {
            bail!("{} nodes say they lead", leaders.len())
        };
        let commit = get(leader, "herald_raft_commit_index")?;
        for (i, t) in scrapes.iter().enumerate() {
            let seen = (
                get(t, "herald_raft_commit_index")?,
                get(t, "herald_raft_apply_index")?,
                get(t, "herald_raft_last_log_index")?,
                get(t, "herald_raft_apply_lag")?,
                get(t, "herald_callback_queue_depth")?,
            );
            if seen != (commit, commit, commit, 0.0, 0.0) {
                bail!(
                    "node {}: (commit, apply, last, lag, queue) {seen:?}, leader commit {commit}",
                    i + 1
                );
            }
        }
        Ok(())
    })
    .await;
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_on_a_node_that_is_not_a_member_yet() {
    let (mut c, _admin, _ws) = ops_cluster(3, &[]).await;
    // A fourth node with an admin port, started before anyone adds it to the cluster.
    let new = c.start_extra_node();
    c.kill9(new);
    let admin = format!("127.0.0.1:{}", free_port());
    c.spec_mut(new)
        .extra_args
        .extend(["--admin-addr".into(), admin.clone()]);
    c.restart(new);
    let r = eventually("node 4's /readyz to answer", NODE_WAIT, || {
        http_get(&admin, "/readyz", None)
    })
    .await;
    assert_eq!(r.status, 503, "{r:?}");
    let body = r.json();
    assert_eq!(body["ready"], false, "{body}");
    let reasons: Vec<&str> = body["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    assert!(reasons.contains(&"not a member of the cluster"), "{body}");
    // Alive all the same, and the metric agrees with the probe.
    assert_eq!(http_get(&admin, "/healthz", None).await.unwrap().status, 200);
    let m = scrape(&admin).await.unwrap();
    assert_eq!(metric(&m, "herald_ready"), Some(0.0), "{m}");
    // Still not ready a while later: nothing makes a non-member ready by itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(http_get(&admin, "/readyz", None).await.unwrap().status, 503);

    // Added as a learner, it catches up, announces itself and becomes ready.
    let leader = c.wait_leader().await;
    c.client(leader)
        .await
        .add_node(admin_request(pb::AddNodeRequest {
            node_id: new,
            cluster_addr: c.cluster_addr(new).to_string(),
            learner_only: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    eventually("node 4 to be ready once added", NODE_WAIT, || async {
        let r = http_get(&admin, "/readyz", None).await?;
        if r.status == 200 && r.json()["ready"] == true {
            Ok(())
        } else {
            bail!("{r:?}")
        }
    })
    .await;
    c.assert_no_panics();
}

/// The cookie `name=value` a `Set-Cookie` header sets, and its attributes.
fn set_cookie(r: &super::HttpReply) -> (String, String) {
    let v = r
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie: {r:?}"));
    let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
    (pair.trim().to_string(), attrs.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_takes_a_bearer_token_or_a_dashboard_session_never_a_url_token() {
    let (c, admin, _ws) = ops_cluster(1, &[]).await;
    let a = &admin[0];
    let token = c.admin_token().to_string();

    // The token in the URL authenticates nothing, on every JSON endpoint.
    for path in [
        "/api/cluster",
        "/api/apps",
        "/api/rates",
        "/api/user?app=x&user=y",
    ] {
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = http_get(a, &format!("{path}{sep}token={token}"), None)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert!(
            !r.body.contains("?token="),
            "the error must not suggest a URL token: {r:?}"
        );
    }
    // The bearer header does.
    assert_eq!(
        http_get(a, "/api/cluster", Some(&token)).await.unwrap().status,
        200
    );
    assert_eq!(
        http_get(a, "/api/cluster", Some("wrong")).await.unwrap().status,
        401
    );

    let form = "application/x-www-form-urlencoded";
    // A wrong token: back to the login form, no cookie.
    let r = http_call(
        a,
        "POST",
        "/login",
        &[("Content-Type", form)],
        "token=wrong&next=%2F",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/?login=failed"));
    assert!(r.header("set-cookie").is_none(), "{r:?}");

    // The right one: a session cookie that is not the token, HttpOnly and SameSite=Strict (not
    // Secure over plain HTTP), and a redirect to the page it came from, never off the server.
    let body = format!("token={token}&next=%2F%3Fapp%3Ddemo%26user%3Dalice");
    let r = http_call(a, "POST", "/login", &[("Content-Type", form)], &body)
        .await
        .unwrap();
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/?app=demo&user=alice"));
    let (cookie, attrs) = set_cookie(&r);
    let port = a.rsplit(':').next().unwrap();
    assert!(cookie.starts_with(&format!("herald_admin_{port}=")), "{cookie}");
    assert!(!cookie.contains(&token), "the cookie holds the token: {cookie}");
    assert!(
        attrs.contains("HttpOnly") && attrs.contains("SameSite=Strict"),
        "{attrs}"
    );
    assert!(!attrs.contains("Secure"), "{attrs}");
    let with_cookie = [("Cookie", cookie.as_str())];
    let apps = http_call(a, "GET", "/api/apps", &with_cookie, "").await.unwrap();
    assert_eq!(apps.status, 200, "{apps:?}");
    let off_site = http_call(
        a,
        "POST",
        "/login",
        &[("Content-Type", form)],
        &format!("token={token}&next=%2F%2Fevil.example%2F"),
    )
    .await
    .unwrap();
    assert_eq!(off_site.header("location"), Some("/"), "{off_site:?}");

    // A made-up session id is refused; so is the token itself as a cookie.
    let forged = format!("herald_admin_{port}={}", "ab".repeat(32));
    let raw_token = format!("herald_admin_{port}={token}");
    for bad in [forged.as_str(), raw_token.as_str()] {
        let r = http_call(a, "GET", "/api/apps", &[("Cookie", bad)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{bad}: {r:?}");
    }

    // Logging out ends the session and clears the cookie.
    let out = http_call(a, "POST", "/logout", &with_cookie, "").await.unwrap();
    assert_eq!(out.status, 303, "{out:?}");
    let (cleared, attrs) = set_cookie(&out);
    assert_eq!(cleared, format!("herald_admin_{port}="));
    assert!(attrs.contains("Max-Age=0"), "{attrs}");
    let r = http_call(a, "GET", "/api/apps", &with_cookie, "").await.unwrap();
    assert_eq!(r.status, 401, "{r:?}");

    // The page: no token handling in URLs or storage, a login form that posts, not framable.
    let page = http_get(a, "/", None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("params.get(\"token\")"), "{}", page.body);
    assert!(page.body.contains("action=\"/login\""));
    assert_eq!(page.header("x-frame-options"), Some("DENY"), "{page:?}");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_server_speaks_https_with_admin_tls_and_refuses_plain_http() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = herald_node::room::tls::dev_pki(pki_dir.path()).unwrap();
    let (cert, key) = (pki.cert.display().to_string(), pki.key.display().to_string());
    // `--admin-tls` takes the client TLS listener's certificate.
    let (c, admin, _ws) = ops_cluster(1, &["--admin-tls", "--tls-cert", &cert, "--tls-key", &key]).await;
    let a = &admin[0];
    let ready = eventually("/readyz over HTTPS", NODE_WAIT, || async {
        let r = https_call(a, &pki.ca, "GET", "/readyz", &[], "").await?;
        if r.status == 200 {
            Ok(r)
        } else {
            bail!("{r:?}")
        }
    })
    .await;
    assert_eq!(ready.json()["ready"], true);
    // The JSON API still needs the token, over HTTPS too.
    let r = https_call(a, &pki.ca, "GET", "/api/cluster", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    let auth = format!("Bearer {}", c.admin_token());
    let r = https_call(
        a,
        &pki.ca,
        "GET",
        "/api/cluster",
        &[("Authorization", auth.as_str())],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // The session cookie is Secure over HTTPS.
    let r = https_call(
        a,
        &pki.ca,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("token={}", c.admin_token()),
    )
    .await
    .unwrap();
    let (_, attrs) = set_cookie(&r);
    assert!(attrs.contains("; Secure"), "{attrs}");

    // Plain HTTP gets no HTTP answer (the handshake fails and the connection closes).
    let plain = http_get(a, "/readyz", None).await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that does not trust the CA fails the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_pki = herald_node::room::tls::dev_pki(other.path()).unwrap();
    let r = https_call(a, &other_pki.ca, "GET", "/readyz", &[], "").await;
    assert!(r.is_err(), "{r:?}");
    // Still serving after the bad clients.
    let r = https_call(a, &pki.ca, "GET", "/healthz", &[], "").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    c.assert_no_panics();
}
