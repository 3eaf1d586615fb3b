//! `herald listen` (an SDK client printing JSON lines) and the app commands `push --qos`,
//! `publish`, `broadcast`, `status`, `delivery` and `kick` against a running cluster: their JSON
//! output and their exit codes (0 ok, 2 usage, 3 unreachable, 4 refused, 5 outcome unknown, 6 listen
//! timed out), and the exit code table in `herald --help`.

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::harness::{eventually, free_port, herald, herald_spawn, App, Cluster, CLI_WAIT, NODE_WAIT};
use crate::sdk::{seeds, CLIENT_WAIT};

/// A running `herald listen`.
struct Listener {
    child: Child,
    /// Its stdout, line by line (each must be JSON).
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far.
    seen: Vec<Value>,
}

impl Listener {
    fn start(args: &[&str]) -> Listener {
        let mut all = vec!["listen"];
        all.extend_from_slice(args);
        let mut child = herald_spawn(&all);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Listener {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `pick`; panics after [`CLIENT_WAIT`] or at the end.
    async fn until(&mut self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + CLIENT_WAIT;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => l,
                other => panic!(
                    "no line with {what} ({}); lines so far: {:#?}",
                    if other.is_err() {
                        "timed out"
                    } else {
                        "stdout closed"
                    },
                    self.seen
                ),
            };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("listen printed a non-JSON line ({e}): {line:?}"));
            self.seen.push(v.clone());
            if pick(&v) {
                return v;
            }
        }
    }

    /// Waits for the exit; returns the code, every stdout line and stderr.
    async fn exit(mut self) -> (Option<i32>, Vec<Value>, String) {
        let status = tokio::time::timeout(CLI_WAIT, self.child.wait())
            .await
            .expect("listen did not exit")
            .unwrap();
        while let Some(l) = self.lines.recv().await {
            let v: Value = serde_json::from_str(&l)
                .unwrap_or_else(|e| panic!("listen printed a non-JSON line ({e}): {l:?}"));
            self.seen.push(v);
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr).await;
        }
        (status.code(), self.seen, stderr)
    }
}

fn is_event(v: &Value, kind: &str) -> bool {
    v["event"] == kind
}

fn messages(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|v| is_event(v, "message")).collect()
}

/// Runs an app command (`push`, `publish`, ...) as `app` through `server`.
async fn app_cmd(server: &str, app: &App, args: &[&str]) -> crate::harness::Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--server", server, "--app", &app.id, "--api-key", &app.api_key]);
    herald(&all).await
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_prints_every_kind_of_message_as_json_lines_and_exits_at_the_count() {
    let c = Cluster::start(3).await;
    let app = c.create_app("cli-listen").await;
    let seed_list = seeds(&c).join(",");
    let via = c.grpc_addr(2).to_string();
    let mut listen = Listener::start(&[
        "--app",
        &app.id,
        "--user",
        "alice",
        "--secret",
        &app.secret,
        "--seeds",
        &seed_list,
        "--topic",
        "news",
        "--count",
        "5",
        "--timeout",
        "90",
    ]);
    let connected = listen.until("connected", |v| is_event(v, "connected")).await;
    assert!(connected["node_id"].as_u64().unwrap() >= 1, "{connected}");
    let sub = listen
        .until("subscribed news", |v| is_event(v, "subscribed"))
        .await;
    assert_eq!(
        (&sub["topic"], &sub["seq"]),
        (&Value::from("news"), &Value::from(0))
    );

    // push (QoS 1), push --qos 0 (online only), publish, broadcast, push again.
    let p1 = app_cmd(&via, &app, &["push", "--user", "alice", "--payload", "p1"])
        .await
        .ok()
        .json();
    assert_eq!(p1["qos"], 1, "{p1}");
    assert_eq!(p1["seqs"], serde_json::json!([{"user": "alice", "seq": 1}]));
    let q0 = app_cmd(
        &via,
        &app,
        &["push", "--user", "alice", "--payload", "q0", "--qos", "0"],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        (&q0["qos"], &q0["delivered"], &q0["dropped"]),
        (&0.into(), &1.into(), &0.into()),
        "{q0}"
    );
    let t1 = app_cmd(&via, &app, &["publish", "--topic", "news", "--payload", "t1"])
        .await
        .ok()
        .json();
    assert_eq!(
        (&t1["topic"], &t1["seq"], &t1["duplicate"]),
        (&"news".into(), &1.into(), &false.into()),
        "{t1}"
    );
    assert!(t1["log_index"].as_u64().unwrap() > 0);
    let b1 = app_cmd(
        &via,
        &app,
        &["broadcast", "--payload", "b1", "--idempotency-key", "b-1"],
    )
    .await
    .ok()
    .json();
    assert_eq!((&b1["topic"], &b1["seq"]), (&"*".into(), &1.into()), "{b1}");
    let again = app_cmd(
        &via,
        &app,
        &["broadcast", "--payload", "b1", "--idempotency-key", "b-1"],
    )
    .await
    .ok()
    .json();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["msg_id"], b1["msg_id"]);
    let p2 = app_cmd(&via, &app, &["push", "--user", "alice", "--payload", "p2"])
        .await
        .ok()
        .json();

    let (code, lines, stderr) = listen.exit().await;
    assert_eq!(code, Some(0), "{stderr}\n{lines:#?}");
    let got = messages(&lines);
    assert_eq!(got.len(), 5, "{lines:#?}");
    let by_payload = |p: &str| {
        *got.iter()
            .find(|m| m["payload"] == p)
            .unwrap_or_else(|| panic!("no message {p}: {lines:#?}"))
    };
    let m = by_payload("p1");
    assert_eq!(
        (&m["msg_id"], &m["seq"], &m["qos"], &m["topic"]),
        (&p1["msg_id"], &1.into(), &1.into(), &Value::Null)
    );
    let m = by_payload("p2");
    assert_eq!((&m["msg_id"], &m["seq"]), (&p2["msg_id"], &2.into()));
    let m = by_payload("q0");
    assert_eq!(
        (&m["msg_id"], &m["seq"], &m["qos"]),
        (&q0["msg_id"], &0.into(), &0.into())
    );
    let m = by_payload("t1");
    assert_eq!(
        (&m["topic"], &m["topic_seq"], &m["seq"]),
        (&"news".into(), &1.into(), &0.into())
    );
    let m = by_payload("b1");
    assert_eq!(
        (&m["topic"], &m["topic_seq"], &m["msg_id"]),
        (&"*".into(), &1.into(), &b1["msg_id"])
    );
    let seqs: Vec<u64> = got
        .iter()
        .filter_map(|m| m["seq"].as_u64())
        .filter(|s| *s > 0)
        .collect();
    assert_eq!(seqs, vec![1, 2], "mailbox messages in seq order");

    // The listener acked what it printed and went away.
    let status = eventually(
        "status to show the device offline with its acks",
        NODE_WAIT,
        || async {
            let out = app_cmd(&via, &app, &["status", "--user", "alice"]).await;
            anyhow::ensure!(out.code == Some(0), "{out:?}");
            let v = out.json();
            anyhow::ensure!(v["online"] == false && v["devices"][0]["acked"] == 2, "{v}");
            Ok(v)
        },
    )
    .await;
    assert_eq!(status["user"], "alice");
    assert_eq!(status["devices"][0]["device"], "herald-cli", "{status}");
    assert_eq!(status["next_seq"], 3, "{status}");

    // delivery: stored for a device that is away, delivered once a listener took it without
    // acking, gone (not found: exit 4) once acked.
    let p3 = app_cmd(&via, &app, &["push", "--user", "alice", "--payload", "p3"])
        .await
        .ok()
        .json();
    let id = p3["msg_id"].as_str().unwrap().to_string();
    let d = app_cmd(&via, &app, &["delivery", "--msg-id", &id])
        .await
        .ok()
        .json();
    assert_eq!(d["msg_id"], id.as_str());
    assert_eq!(d["users"][0]["user"], "alice", "{d}");
    assert_eq!(
        (&d["users"][0]["seq"], &d["users"][0]["stored"]),
        (&3.into(), &true.into()),
        "{d}"
    );
    assert_eq!(
        d["users"][0]["devices"],
        serde_json::json!([{"device": "herald-cli", "state": "stored"}])
    );
    let listen = Listener::start(&[
        "--app",
        &app.id,
        "--user",
        "alice",
        "--secret",
        &app.secret,
        "--seeds",
        &seed_list,
        "--no-ack",
        "--count",
        "1",
        "--timeout",
        "60",
    ]);
    let (code, lines, stderr) = listen.exit().await;
    assert_eq!(code, Some(0), "{stderr}\n{lines:#?}");
    assert_eq!(messages(&lines)[0]["payload"], "p3");
    eventually("delivery to say delivered", NODE_WAIT, || async {
        let v = app_cmd(&via, &app, &["delivery", "--msg-id", &id])
            .await
            .ok()
            .json();
        anyhow::ensure!(v["users"][0]["devices"][0]["state"] == "delivered", "{v}");
        Ok(())
    })
    .await;
    // Not acked: the next listener gets it again, and acks it.
    let listen = Listener::start(&[
        "--app",
        &app.id,
        "--user",
        "alice",
        "--secret",
        &app.secret,
        "--seeds",
        &seed_list,
        "--manual-ack",
        "--count",
        "1",
        "--timeout",
        "60",
    ]);
    let (code, lines, stderr) = listen.exit().await;
    assert_eq!(code, Some(0), "{stderr}\n{lines:#?}");
    assert_eq!(messages(&lines)[0]["msg_id"], id.as_str());
    // Acked by its only device: it leaves the mailbox, and `delivery` still says what happened.
    eventually("the acked message to leave the mailbox", NODE_WAIT, || async {
        let v = app_cmd(&via, &app, &["delivery", "--msg-id", &id])
            .await
            .ok()
            .json();
        anyhow::ensure!(v["users"][0]["stored"] == false, "{v}");
        anyhow::ensure!(v["users"][0]["devices"][0]["state"] == "acked", "{v}");
        Ok(())
    })
    .await;
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_and_app_command_exit_codes_and_kick() {
    let mut c = Cluster::start(3).await;
    let app = c.create_app("cli-codes").await;
    let other = c.create_app("cli-other").await;
    let seed_list = seeds(&c).join(",");
    let via = c.grpc_addr(1).to_string();
    let nodes = c.client_addr(3).to_string();

    // kick: a running listener is ended (it prints the kick and exits 0).
    let mut listen = Listener::start(&[
        "--app",
        &app.id,
        "--user",
        "bob",
        "--secret",
        &app.secret,
        "--nodes",
        &nodes,
        "--timeout",
        "90",
    ]);
    listen.until("connected", |v| is_event(v, "connected")).await;
    let online = app_cmd(&via, &app, &["status", "--user", "bob"])
        .await
        .ok()
        .json();
    assert_eq!(online["online"], true, "{online}");
    assert_eq!(online["sessions"][0]["device"], "herald-cli", "{online}");
    assert_eq!(online["sessions"][0]["node_id"], 3, "{online}");
    assert_eq!(online["sessions"][0]["platform"], "cli", "{online}");
    let k = app_cmd(&via, &app, &["kick", "--user", "bob", "--reason", "maintenance"])
        .await
        .ok()
        .json();
    assert_eq!(k, serde_json::json!({"user": "bob", "device": null, "kicked": 1}));
    let (code, lines, stderr) = listen.exit().await;
    assert_eq!(code, Some(0), "{stderr}\n{lines:#?}");
    let kicked = lines
        .iter()
        .find(|v| is_event(v, "kicked"))
        .expect("a kicked line");
    assert_eq!(
        (&kicked["code"], &kicked["reason"]),
        (&"admin".into(), &"maintenance".into()),
        "{kicked}"
    );
    let k = app_cmd(&via, &app, &["kick", "--user", "bob", "--device", "none"])
        .await
        .ok()
        .json();
    assert_eq!(k["kicked"], 0, "{k}");

    // listen: a token signed with another app's secret is refused (4, with the reason).
    let out = herald(&[
        "listen",
        "--app",
        &app.id,
        "--user",
        "bob",
        "--secret",
        &other.secret,
        "--nodes",
        &nodes,
        "--timeout",
        "60",
    ])
    .await
    .code(4);
    assert!(out.stderr.contains("authentication failed"), "{out:?}");
    let closed = out.json_lines();
    assert!(
        closed
            .iter()
            .any(|v| is_event(v, "closed") && v["code"] == "BAD_TOKEN"),
        "{out:?}"
    );
    // No way to get a token: usage (2).
    let out = herald(&["listen", "--app", &app.id, "--user", "bob", "--nodes", &nodes])
        .await
        .code(2);
    assert!(out.stderr.contains("--token"), "{out:?}");
    // Nothing listening there: 3 once --timeout passed.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = herald(&[
        "listen",
        "--app",
        &app.id,
        "--user",
        "bob",
        "--secret",
        &app.secret,
        "--nodes",
        &dead,
        "--timeout",
        "2",
    ])
    .await
    .code(3);
    assert!(out.stderr.contains("no node accepted"), "{out:?}");
    // Connected, but the count was not reached in time: 6.
    let out = herald(&[
        "listen",
        "--app",
        &app.id,
        "--user",
        "bob",
        "--secret",
        &app.secret,
        "--seeds",
        &seed_list,
        "--count",
        "3",
        "--timeout",
        "3",
    ])
    .await
    .code(6);
    assert!(out.stderr.contains("0 of 3"), "{out:?}");
    assert!(
        out.json_lines().iter().any(|v| is_event(v, "connected")),
        "{out:?}"
    );

    // App commands: refused (4), usage (2), unreachable (3).
    let out = herald(&[
        "publish",
        "--topic",
        "t",
        "--payload",
        "x",
        "--server",
        &via,
        "--app",
        &app.id,
        "--api-key",
        &other.api_key,
    ])
    .await
    .code(4);
    assert!(out.stderr.contains("API key"), "{out:?}");
    app_cmd(&via, &app, &["publish", "--topic", "", "--payload", "x"])
        .await
        .code(2);
    app_cmd(&via, &app, &["kick", "--payload", "x"]).await.code(2);
    app_cmd(
        &via,
        &app,
        &["push", "--user", "a", "--payload", "x", "--qos", "2"],
    )
    .await
    .code(2);
    let out = app_cmd(&via, &app, &["delivery", "--msg-id", "no-such-message"])
        .await
        .code(4);
    assert!(out.stderr.contains("unknown"), "{out:?}");
    let out = app_cmd(&dead, &app, &["broadcast", "--payload", "x"])
        .await
        .code(3);
    assert!(out.stderr.contains("cannot reach"), "{out:?}");
    app_cmd(&dead, &app, &["status", "--user", "bob"]).await.code(3);
    // A user nobody pushed to: offline, nothing pending.
    let s = app_cmd(&via, &app, &["status", "--user", "nobody"])
        .await
        .ok()
        .json();
    assert_eq!((&s["online"], &s["pending"]), (&false.into(), &0.into()), "{s}");
    // QoS 0 to an offline user: dropped and counted.
    let q = app_cmd(
        &via,
        &app,
        &["push", "--user", "nobody", "--payload", "x", "--qos", "0"],
    )
    .await
    .ok()
    .json();
    assert_eq!((&q["delivered"], &q["dropped"]), (&0.into(), &1.into()), "{q}");
    // token --json.
    let t = herald(&[
        "token",
        "--app",
        &app.id,
        "--user",
        "bob",
        "--secret",
        &app.secret,
        "--json",
    ])
    .await
    .ok()
    .json();
    assert_eq!(
        (&t["app"], &t["user"], &t["device"]),
        (&app.id.as_str().into(), &"bob".into(), &Value::Null)
    );
    assert_eq!(t["token"].as_str().unwrap().split('.').count(), 3, "{t}");

    // The exit codes are listed in the help.
    let help = herald(&["--help"]).await.ok();
    for line in ["Exit codes:", "  5  outcome unknown", "  6  listen --count"] {
        assert!(help.stdout.contains(line), "{line:?} in:\n{}", help.stdout);
    }

    // Outcome unknown (5): the leader alone cannot commit; its write times out (after the node's
    // 5 s write timeout) and may still commit later, so the push is neither done nor refused.
    let leader = c.wait_leader().await;
    for id in c.ids().into_iter().filter(|id| *id != leader) {
        c.kill9(id);
    }
    let out = app_cmd(
        c.grpc_addr(leader),
        &app,
        &[
            "push",
            "--user",
            "bob",
            "--payload",
            "lost?",
            "--idempotency-key",
            "k5",
        ],
    )
    .await
    .code(5);
    assert!(out.stderr.contains("idempotency key"), "{out:?}");
}
