//! The admin HTTP server of real nodes: Prometheus metrics move with traffic, probes answer, the
//! JSON API needs the admin token and shows the cluster, apps and a user.

use anyhow::bail;

use super::{http_get, metric, ops_cluster};
use crate::harness::{eventually, NODE_WAIT};
use crate::raw::{Raw, Who};

#[tokio::test(flavor = "multi_thread")]
async fn metrics_probes_and_the_admin_api() {
    let (c, admin, _ws) = ops_cluster(3, &[]).await;
    let app = c.create_app("ops").await;
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
    assert!(v("herald_deliveries_total") >= 1.0);
    assert!(v("herald_acks_total") >= 1.0);
    assert!(v("herald_connects_total") >= 1.0);
    assert!(v("herald_delivery_latency_seconds_count") >= 1.0);
    assert!(v("herald_delivery_latency_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert_eq!(v("herald_messages_stored_total{app=\"ops\"}"), 1.0);
    assert!(v("herald_raft_term") >= 1.0);
    assert!(v("herald_raft_leader_id") >= 1.0);
    assert!(v("herald_raft_apply_index") >= 1.0);
    assert!(v("herald_raft_commit_index") >= v("herald_raft_apply_index") - 1000.0);
    assert_eq!(v("herald_ready"), 1.0);
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
    let by_query = http_get(&admin[0], &format!("/api/apps?token={token}"), None)
        .await
        .unwrap();
    assert_eq!(by_query.status, 200, "{by_query:?}");
    assert_eq!(by_query.json()["apps"][0]["id"], "ops");
    assert_eq!(by_query.json()["apps"][0]["sessions_on_this_node"], 1);
    assert_eq!(by_query.json()["apps"][0]["counters"]["acked"], 1);

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

    drop(raw);
    c.assert_no_panics();
}
