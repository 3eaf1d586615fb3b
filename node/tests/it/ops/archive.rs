//! The MySQL cold archive against a real MariaDB: every message that leaves a mailbox (acked,
//! expired, trimmed) becomes exactly one row, also across a leader kill and a MySQL outage, and
//! `History` reads them back.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{anyhow, bail};
use herald_proto::v1 as pb;
use herald_proto::v1::archive_client::ArchiveClient;

use super::mariadb::MariaDb;
use super::{http_get, metric, ops_cluster};
use crate::harness::{admin_request, connect, eventually, is_transient, App, Cluster, NODE_WAIT};
use crate::raw::{Raw, Who};

/// How long the archive may take to catch up (debug builds, two cores, tests in parallel).
const ARCHIVE_WAIT: Duration = Duration::from_secs(90);

/// Waits until the archive is switched on in the replicated state: only messages removed after
/// that are archived (a node without `--archive-url` never fills the outbox).
async fn archive_enabled(admin: &[String]) {
    eventually("the archive to be enabled", ARCHIVE_WAIT, || async {
        for a in admin {
            if let Ok(m) = http_get(a, "/metrics", None).await {
                if metric(&m.body, "herald_archive_enabled") == Some(1.0) {
                    return Ok(());
                }
            }
        }
        bail!("no node reports herald_archive_enabled 1 yet")
    })
    .await
}

/// Creates an app with a small mailbox cap through the leader.
async fn app_with_cap(c: &Cluster, id: &str, mailbox_cap: u32) -> App {
    let app = eventually(&format!("app {id}"), NODE_WAIT, || async {
        let leader = c.leader().await.ok_or_else(|| anyhow!("no leader"))?;
        let mut g = connect(c.grpc_addr(leader)).await?;
        let req = pb::CreateAppRequest {
            id: id.into(),
            limits: Some(pb::AppLimits {
                mailbox_cap,
                default_ttl_ms: 3_600_000,
                max_ttl_ms: 3_600_000,
                topic_retain: 10,
                max_payload: 1024,
                max_targets: 0,
            }),
            ..Default::default()
        };
        match g.create_app(admin_request(req)).await {
            Ok(r) => {
                let a = r.into_inner().app.unwrap();
                Ok(App {
                    id: a.id,
                    secret: a.secrets[0].clone(),
                    api_key: a.api_keys[0].clone(),
                })
            }
            Err(s) if is_transient(&s) => Err(anyhow!("{s:?}")),
            Err(s) => panic!("create app: {s:?}"),
        }
    })
    .await;
    for id_ in c.live_ids() {
        eventually("every node to know the app", NODE_WAIT, || async {
            let mut g = connect(c.grpc_addr(id_)).await?;
            g.get_app(admin_request(pb::GetAppRequest { id: id.into() }))
                .await
                .map_err(|s| anyhow!("{s:?}"))?;
            Ok(())
        })
        .await;
    }
    app
}

/// A push with a TTL (0: the app's default), retried with its idempotency key until acknowledged.
async fn push(c: &Cluster, app: &App, user: &str, payload: &str, ttl_ms: u64, key: &str) {
    eventually(&format!("push {key}"), NODE_WAIT, || async {
        let ids = c.live_ids();
        let node = ids[key.len() % ids.len()];
        let mut g = connect(c.grpc_addr(node)).await?;
        let mut req = app.push_request(user, payload, key);
        req.get_mut().ttl_ms = ttl_ms;
        match g.push(req).await {
            Ok(_) => Ok(()),
            Err(s) if is_transient(&s) => Err(anyhow!("{s:?}")),
            Err(s) => panic!("push {key}: {s:?}"),
        }
    })
    .await
}

/// The replicated counters of `app` as the node at `admin` reports them.
async fn counters(admin: &str, app: &str) -> anyhow::Result<serde_json::Value> {
    let apps = http_get(admin, "/api/apps", Some(crate::harness::ADMIN_TOKEN))
        .await?
        .json();
    apps["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == app).cloned())
        .map(|a| a["counters"].clone())
        .ok_or_else(|| anyhow!("no app {app} in {apps}"))
}

/// Waits until the archive holds exactly one row per message the app's counters say was removed,
/// at least `at_least` of them, and the replicated archive outbox is empty; returns the rows.
async fn wait_archived(
    db: &MariaDb,
    admin: &[String],
    app: &str,
    at_least: u64,
) -> Vec<(String, String, u64, String, String)> {
    eventually(
        "the archive to hold every removed message",
        ARCHIVE_WAIT,
        || async {
            let mut counters_now = None;
            for a in admin {
                if let Ok(cn) = counters(a, app).await {
                    counters_now = Some(cn);
                    break;
                }
            }
            let cn = counters_now.ok_or_else(|| anyhow!("no node answered"))?;
            let removed = cn["acked"].as_u64().unwrap()
                + cn["expired"].as_u64().unwrap()
                + cn["trimmed"].as_u64().unwrap();
            let rows: Vec<_> = db.rows().await.into_iter().filter(|r| r.0 == app).collect();
            let mut pending = None;
            for a in admin {
                if let Ok(m) = http_get(a, "/metrics", None).await {
                    pending = metric(&m.body, "herald_archive_pending");
                    break;
                }
            }
            if rows.len() as u64 == removed && removed >= at_least.max(1) && pending == Some(0.0) {
                Ok(rows)
            } else {
                bail!(
                    "{} rows, {removed} removed ({cn}), outbox pending {pending:?}",
                    rows.len()
                )
            }
        },
    )
    .await
}

fn assert_unique(rows: &[(String, String, u64, String, String)]) {
    let keys: BTreeSet<(&str, &str, u64)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str(), r.2)).collect();
    assert_eq!(keys.len(), rows.len(), "a message was archived twice: {rows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_expired_and_trimmed_messages_are_archived_once_each() {
    let db = MariaDb::start().await;
    let url = db.url();
    let (c, admin, _ws) = ops_cluster(3, &["--archive-url", &url, "--archive-batch", "3"]).await;
    archive_enabled(&admin).await;
    let app = app_with_cap(&c, "arch", 3).await;

    // acker: two messages delivered and acked.
    push(&c, &app, "acker", "a-1", 0, "k-a1").await;
    push(&c, &app, "acker", "a-2", 0, "k-a2").await;
    let mut raw = Raw::connect(c.client_addr(1)).await.unwrap();
    let who = Who {
        app: app.id.clone(),
        user: "acker".into(),
        device: "phone".into(),
        platform: "ios".into(),
        token: app.token("acker", None),
    };
    raw.hello(&who, 0).await.unwrap();
    let got = raw.pushes(2).await.unwrap();
    raw.ack(1, got[1].seq).await.unwrap();
    // expirer: one message with a 1 s TTL, never fetched.
    push(&c, &app, "expirer", "e-1", 1_000, "k-e1").await;
    // trimmer: five messages into a mailbox of three: seq 1 and 2 are trimmed.
    for i in 1..=5 {
        push(&c, &app, "trimmer", &format!("t-{i}"), 0, &format!("k-t{i}")).await;
    }

    let rows = wait_archived(&db, &admin, "arch", 5).await;
    assert_unique(&rows);
    let outcome = |user: &str| -> Vec<(u64, String, String)> {
        rows.iter()
            .filter(|r| r.1 == user)
            .map(|r| (r.2, r.3.clone(), r.4.clone()))
            .collect()
    };
    assert_eq!(
        outcome("acker"),
        vec![
            (1, "acked".into(), "a-1".into()),
            (2, "acked".into(), "a-2".into())
        ]
    );
    assert_eq!(outcome("expirer"), vec![(1, "expired".into(), "e-1".into())]);
    assert_eq!(
        outcome("trimmer"),
        vec![
            (1, "trimmed".into(), "t-1".into()),
            (2, "trimmed".into(), "t-2".into())
        ]
    );

    // History through any node's gRPC.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", c.grpc_addr(3)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut hist = ArchiveClient::new(ch);
    let h = hist
        .history(app.request(pb::HistoryRequest {
            app: "arch".into(),
            user: "trimmer".into(),
            after_seq: 0,
            limit: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<(u64, &str, &[u8])> = h
        .messages
        .iter()
        .map(|m| (m.seq, m.outcome.as_str(), &m.payload[..]))
        .collect();
    assert_eq!(
        seen,
        vec![(1, "trimmed", &b"t-1"[..]), (2, "trimmed", &b"t-2"[..])]
    );
    let after = hist
        .history(app.request(pb::HistoryRequest {
            app: "arch".into(),
            user: "acker".into(),
            after_seq: 1,
            limit: 10,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.messages.len(), 1);
    assert!(!after.messages[0].msg_id.is_empty());
    assert!(after.messages[0].removed_ms >= after.messages[0].pushed_ms);
    // Another app's key cannot read this app's history.
    let denied = hist
        .history(app.request(pb::HistoryRequest {
            app: "other".into(),
            user: "acker".into(),
            after_seq: 0,
            limit: 10,
        }))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_kill_in_the_middle_neither_duplicates_nor_skips_rows() {
    let db = MariaDb::start().await;
    let url = db.url();
    // Small batches: many ArchiveDone rounds, so the kill lands between an insert and its done.
    let (mut c, admin, _ws) = ops_cluster(3, &["--archive-url", &url, "--archive-batch", "4"]).await;
    archive_enabled(&admin).await;
    let app = app_with_cap(&c, "churn", 1).await;
    // Every push after the first trims the one before.
    for i in 0..60 {
        push(
            &c,
            &app,
            &format!("u{}", i % 3),
            &format!("m-{i}"),
            0,
            &format!("c-{i}"),
        )
        .await;
    }
    let leader = c.wait_leader().await;
    c.kill9(leader);
    for i in 60..120 {
        push(
            &c,
            &app,
            &format!("u{}", i % 3),
            &format!("m-{i}"),
            0,
            &format!("c-{i}"),
        )
        .await;
    }
    c.restart(leader);
    c.wait_caught_up(leader).await;
    let live: Vec<String> = admin.clone();
    let rows = wait_archived(&db, &live, "churn", 117).await;
    assert_unique(&rows);
    // 120 pushes to 3 users with a cap of 1: all but the last of each user were trimmed.
    assert_eq!(rows.len(), 117, "{rows:?}");
    assert!(rows.iter().all(|r| r.3 == "trimmed"));
    for u in 0..3 {
        let seqs: Vec<u64> = rows
            .iter()
            .filter(|r| r.1 == format!("u{u}"))
            .map(|r| r.2)
            .collect();
        assert_eq!(
            seqs,
            (1..=39).collect::<Vec<_>>(),
            "user u{u}: a gap or a duplicate"
        );
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_goes_on_while_mysql_is_down_and_the_archive_catches_up() {
    let mut db = MariaDb::start().await;
    let url = db.url();
    let (c, admin, _ws) = ops_cluster(3, &["--archive-url", &url, "--archive-batch", "5"]).await;
    archive_enabled(&admin).await;
    let app = app_with_cap(&c, "outage", 100).await;
    let mut raw = Raw::connect(c.client_addr(2)).await.unwrap();
    let who = Who {
        app: app.id.clone(),
        user: "carol".into(),
        device: "tablet".into(),
        platform: "android".into(),
        token: app.token("carol", None),
    };
    raw.hello(&who, 0).await.unwrap();
    push(&c, &app, "carol", "before", 0, "o-0").await;
    let p = raw.pushes(1).await.unwrap().remove(0);
    raw.ack(1, p.seq).await.unwrap();
    wait_archived(&db, &admin, "outage", 1).await;

    // MySQL goes away: pushes are still stored, delivered and acked.
    db.kill();
    for i in 1..=10 {
        push(&c, &app, "carol", &format!("during-{i}"), 0, &format!("o-{i}")).await;
        let p = raw.pushes(1).await.unwrap().remove(0);
        assert_eq!(&p.payload[..], format!("during-{i}").as_bytes());
        raw.ack(1, p.seq).await.unwrap();
    }
    // The acks commit and the removed messages wait in the replicated outbox.
    eventually("the outbox to hold the ten acked messages", NODE_WAIT, || async {
        let cn = counters(&admin[0], "outage").await?;
        let m = http_get(&admin[0], "/metrics", None).await?.body;
        let pending = metric(&m, "herald_archive_pending").unwrap_or(0.0);
        if cn["acked"] == 11 && pending >= 10.0 {
            Ok(())
        } else {
            bail!("{cn} pending {pending}")
        }
    })
    .await;
    // MySQL is back: the archive catches up, once each.
    db.run().await;
    let rows = wait_archived(&db, &admin, "outage", 11).await;
    assert_unique(&rows);
    assert_eq!(rows.len(), 11);
    assert!(rows.iter().all(|r| r.3 == "acked"));
    c.assert_no_panics();
}
