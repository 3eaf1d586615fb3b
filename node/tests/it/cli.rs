//! The `herald` client commands against a running cluster: output formats and exit codes
//! (0 ok, 3 unreachable, 4 refused).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::harness::{eventually, free_port, herald, herald_admin as admin, Cluster, NODE_WAIT};

fn is_secret(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() >= 16 && s.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Waits until `herald cluster status` through `addr` shows `n` voters, all reachable, and
/// exactly one of them in state "leader", the one `leader_id` names. Returns the document.
async fn status_with_voters(addr: &str, n: usize) -> Value {
    eventually(
        &format!("`herald cluster status` to show {n} healthy voters"),
        NODE_WAIT,
        || async {
            let out = admin(addr, &["cluster", "status"]).await;
            anyhow::ensure!(out.code == Some(0), "{out:?}");
            let v = out.json();
            let members = v["members"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(members.len() == n, "{} members: {v}", members.len());
            anyhow::ensure!(
                members.iter().all(|m| m["role"] == "voter"),
                "not all voters: {v}"
            );
            anyhow::ensure!(
                members.iter().all(|m| m["reachable"] == true),
                "unreachable member: {v}"
            );
            let leaders: Vec<&Value> = members.iter().filter(|m| m["state"] == "leader").collect();
            anyhow::ensure!(
                leaders.len() == 1,
                "{} members in state leader: {v}",
                leaders.len()
            );
            anyhow::ensure!(
                leaders[0]["node_id"] == v["leader_id"],
                "leader_id disagrees: {v}"
            );
            Ok(v)
        },
    )
    .await
}

/// clap checks a subcommand's definition (duplicate names, conflicting flags) only when that
/// subcommand is parsed, and only in debug builds, where a mistake is a panic (exit 101). So
/// parse every one.
#[tokio::test(flavor = "multi_thread")]
async fn every_subcommand_has_a_valid_definition() {
    let commands: &[&[&str]] = &[
        &[],
        &["node"],
        &["dev"],
        &["cluster"],
        &["cluster", "status"],
        &["cluster", "add"],
        &["cluster", "remove"],
        &["apps"],
        &["apps", "create"],
        &["apps", "list"],
        &["apps", "get"],
        &["token"],
        &["push"],
        &["broadcast"],
        &["publish"],
        &["status"],
        &["delivery"],
        &["kick"],
        &["listen"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = herald(&args).await;
        assert_eq!(out.code, Some(0), "herald {}: {out:#?}", args.join(" "));
        assert!(
            out.stdout.contains("Usage:"),
            "herald {}: {out:#?}",
            args.join(" ")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn apps_token_push_and_status_commands() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = c.ids().into_iter().find(|i| *i != leader).unwrap();
    let other = c
        .ids()
        .into_iter()
        .find(|i| *i != leader && *i != follower)
        .unwrap();
    let (via, elsewhere) = (c.grpc_addr(follower), c.grpc_addr(other));

    // apps create, through a follower (the write is forwarded to the leader).
    let created = admin(
        via,
        &[
            "apps",
            "create",
            "cliapp",
            "--name",
            "CLI app",
            "--mailbox-cap",
            "50",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(created["id"], "cliapp");
    assert_eq!(created["name"], "CLI app");
    assert_eq!(created["limits"]["mailbox_cap"], 50);
    assert!(is_secret(&created["secrets"][0]), "{created}");
    assert!(is_secret(&created["api_keys"][0]), "{created}");
    let secret = created["secrets"][0].as_str().unwrap().to_string();
    let api_key = created["api_keys"][0].as_str().unwrap().to_string();
    assert_ne!(secret, api_key);

    // Refusals: exit code 4.
    let out = admin(via, &["apps", "create", "cliapp"]).await.code(4);
    assert!(out.stderr.contains("already exists"), "{out:?}");
    let out = herald(&["apps", "list", "--server", via, "--admin-token", "wrong-token"])
        .await
        .code(4);
    assert!(out.stderr.contains("wrong admin token"), "{out:?}");
    let out = herald(&["apps", "list", "--server", via]).await.code(4);
    assert!(out.stderr.contains("admin call needs"), "{out:?}");
    let out = admin(via, &["apps", "get", "no-such-app"]).await.code(4);
    assert!(out.stderr.contains("unknown app"), "{out:?}");
    admin(via, &["apps", "create", "bad id!"]).await.code(4);

    // apps list / get on another node (it may apply the create a moment later).
    let listed = eventually(
        "`apps list` on another node to show cliapp",
        NODE_WAIT,
        || async {
            let out = admin(elsewhere, &["apps", "list"]).await;
            anyhow::ensure!(out.code == Some(0), "{out:?}");
            let apps = out.json_lines();
            apps.into_iter()
                .find(|a| a["id"] == "cliapp")
                .ok_or_else(|| anyhow::anyhow!("not listed yet: {}", out.stdout))
        },
    )
    .await;
    assert_eq!(listed, created, "list shows what create returned");
    let got = admin(elsewhere, &["apps", "get", "cliapp"]).await.ok().json();
    assert_eq!(got, created);

    // token: fetched secret (admin API) and given secret give tokens that verify.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = admin(
        via,
        &["token", "--app", "cliapp", "--user", "alice", "--ttl", "600"],
    )
    .await
    .ok();
    let token = out.stdout.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT has three parts: {token:?}");
    let claims = herald_node::token::verify(token, std::slice::from_ref(&secret), "cliapp", "alice", "", now)
        .unwrap_or_else(|e| panic!("minted token does not verify: {e}"));
    assert!(claims.exp >= now + 590 && claims.exp <= now + 610, "{claims:?}");
    let out = herald(&[
        "token", "--app", "cliapp", "--user", "bob", "--device", "d1", "--secret", &secret,
    ])
    .await
    .ok();
    let claims = herald_node::token::verify(
        out.stdout.trim(),
        std::slice::from_ref(&secret),
        "cliapp",
        "bob",
        "d1",
        now,
    )
    .expect("token with --secret verifies");
    assert_eq!(claims.dev.as_deref(), Some("d1"));

    // push: JSON with the per-user seqs; seqs continue; an idempotency key dedupes.
    let push = |extra: &'static [&'static str], key: String| {
        let via = via.to_string();
        async move {
            let mut args = vec![
                "push",
                "--server",
                &via,
                "--app",
                "cliapp",
                "--api-key",
                &key,
                "--payload",
                "hello",
            ];
            args.extend_from_slice(extra);
            herald(&args).await
        }
    };
    let r = push(&["--user", "alice", "--user", "bob"], api_key.clone())
        .await
        .ok()
        .json();
    assert_eq!(
        r["seqs"],
        serde_json::json!([{"user": "alice", "seq": 1}, {"user": "bob", "seq": 1}]),
        "{r}"
    );
    assert_eq!(r["duplicate"], false);
    assert!(r["log_index"].as_u64().unwrap() > 0, "{r}");
    assert!(!r["msg_id"].as_str().unwrap().is_empty(), "{r}");
    let r1 = push(&["--user", "alice", "--idempotency-key", "k-1"], api_key.clone())
        .await
        .ok()
        .json();
    assert_eq!(r1["seqs"], serde_json::json!([{"user": "alice", "seq": 2}]));
    let r2 = push(&["--user", "alice", "--idempotency-key", "k-1"], api_key.clone())
        .await
        .ok()
        .json();
    assert_eq!(r2["duplicate"], true, "{r2}");
    assert_eq!((&r2["msg_id"], &r2["seqs"]), (&r1["msg_id"], &r1["seqs"]));

    // A wrong API key is refused (4); a closed port is unreachable (3).
    let out = push(&["--user", "alice"], "0123456789abcdef-wrong".into())
        .await
        .code(4);
    assert!(out.stderr.contains("wrong API key"), "{out:?}");
    let closed = format!("127.0.0.1:{}", free_port());
    let out = herald(&[
        "push",
        "--server",
        &closed,
        "--app",
        "cliapp",
        "--api-key",
        &api_key,
        "--user",
        "alice",
        "--payload",
        "x",
    ])
    .await
    .code(3);
    assert!(out.stderr.contains("cannot reach"), "{out:?}");
    admin(&closed, &["cluster", "status"]).await.code(3);
    // Usage errors: 2.
    herald(&[
        "push",
        "--server",
        via,
        "--app",
        "cliapp",
        "--user",
        "alice",
        "--payload",
        "x",
    ])
    .await
    .code(2);

    // cluster status: three voters, one leader.
    let v = status_with_voters(elsewhere, 3).await;
    let ids: BTreeSet<u64> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    for m in v["members"].as_array().unwrap() {
        let id = m["node_id"].as_u64().unwrap();
        assert_eq!(m["grpc_addr"], c.grpc_addr(id), "{v}");
        assert_eq!(m["cluster_addr"], c.cluster_addr(id), "{v}");
        assert_eq!(m["client_addr"], c.client_addr(id), "{v}");
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_add_and_remove_through_a_follower() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = c.ids().into_iter().find(|i| *i != leader).unwrap();
    let via = c.grpc_addr(follower).to_string();

    let new = c.start_extra_node();
    assert_eq!(new, 4);
    let new_addr = c.cluster_addr(new).to_string();
    // The new node waits to be added (it is not the lowest id, so it never bootstraps).
    eventually("node 4 to answer", NODE_WAIT, || c.status(new)).await;

    let r = admin(
        &via,
        &["cluster", "add", "--id", "4", "--cluster-addr", &new_addr],
    )
    .await
    .ok()
    .json();
    assert_eq!(r["voters"], serde_json::json!([1, 2, 3, 4]), "{r}");
    assert_eq!(r["learners"], serde_json::json!([]), "{r}");
    let v = status_with_voters(&via, 4).await;
    assert!(v["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["node_id"] == 4 && m["cluster_addr"] == new_addr.as_str()));
    // The new node has the state too.
    c.wait_caught_up(new).await;

    let r = admin(&via, &["cluster", "remove", "--id", "4"]).await.ok().json();
    assert_eq!(r["voters"], serde_json::json!([1, 2, 3]), "{r}");
    assert_eq!(r["learners"], serde_json::json!([]), "{r}");
    status_with_voters(&via, 3).await;
    // Removing it again is refused.
    let out = admin(&via, &["cluster", "remove", "--id", "4"]).await.code(4);
    assert!(out.stderr.contains("not a member"), "{out:?}");
    c.kill9(new);
    // The three keep working.
    let app = c.create_app("after-remove").await;
    let r = app.push_acked(&via, "alice", "hi", "after-remove-1").await;
    assert_eq!(r.seqs[0].seq, 1);
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_the_leader_hands_over_without_a_panic() {
    let mut c = Cluster::start(4).await;
    let leader = c.wait_leader().await;
    let follower = c.ids().into_iter().find(|i| *i != leader).unwrap();
    let via = c.grpc_addr(follower).to_string();
    let app = c.create_app("leader-removed").await;
    app.push_acked(&via, "alice", "before", "lr-1").await;

    // Asked through a follower: forwarded to the leader, which removes itself in one change.
    let r = admin(&via, &["cluster", "remove", "--id", &leader.to_string()])
        .await
        .ok()
        .json();
    let mut voters: Vec<u64> = c.ids().into_iter().filter(|i| *i != leader).collect();
    voters.sort();
    assert_eq!(r["voters"], serde_json::json!(voters), "{r}");
    assert_eq!(r["learners"], serde_json::json!([]), "{r}");
    let v = status_with_voters(&via, 3).await;
    assert!(
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["node_id"] != leader),
        "{v}"
    );
    // The removed leader's core handed over instead of panicking.
    c.assert_no_panics();
    c.kill9(leader);
    let r = app.push_acked(&via, "alice", "after", "lr-2").await;
    assert_eq!(r.seqs[0].seq, 2);
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_verify_compares_every_replica_and_says_unknown_without_one() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("verify").await;
    for i in 0..20 {
        app.push_acked(
            c.grpc_addr(1 + i % 3),
            &format!("u{}", i % 4),
            "m",
            &format!("k{i}"),
        )
        .await;
    }
    let via = c.grpc_addr(2).to_string();
    let out = admin(&via, &["cluster", "verify"]).await.ok();
    let v = out.json();
    assert_eq!(v["verdict"], "consistent", "{v}");
    let replicas = v["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{v}");
    let index = &replicas[0]["applied_index"];
    assert!(index.as_u64().unwrap() > 20, "{v}");
    for r in replicas {
        assert_eq!(&r["applied_index"], index, "{v}");
        assert_eq!(r["digest"], replicas[0]["digest"], "{v}");
        assert!(r["digest"].as_str().unwrap().len() == 16, "{v}");
    }
    // Without the admin token: refused.
    let out = herald(&["cluster", "verify", "--server", &via]).await;
    assert_eq!(out.code, Some(4), "{out:#?}");
    // A member that does not answer makes it unknown (exit 3), never consistent.
    c.kill9(3);
    let out = admin(&via, &["cluster", "verify", "--wait-ms", "1500"])
        .await
        .code(3);
    let v = out.json();
    assert_eq!(v["verdict"], "unknown", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("node 3"), "{v}");
    c.assert_no_panics();
}
