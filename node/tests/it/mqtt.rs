//! The MQTT listener (`--mqtt-addr`, docs/MQTT.md) with clients nobody here wrote: Eclipse
//! Mosquitto's `mosquitto_sub` (Debian's `mosquitto-clients`, which `scripts/test` installs),
//! against a real 3-node cluster.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_proto::v1 as pb;
use parking_lot::Mutex;

use crate::harness::{connect, free_port, App, Cluster};

const INBOX: &str = "$herald/inbox";

/// A 3-node cluster whose nodes all have an MQTT listener; returns it and each node's MQTT port.
async fn cluster() -> (Cluster, Vec<u16>) {
    cluster_with(&[]).await
}

/// [`cluster`] with more `herald node` flags on every node (`--shards`).
async fn cluster_with(args: &[&str]) -> (Cluster, Vec<u16>) {
    let mut c = Cluster::new(3).node_args(args);
    let mut ports = Vec::new();
    for id in 1..=3 {
        let p = free_port();
        c.spec_mut(id)
            .extra_args
            .extend(["--mqtt-addr".into(), format!("127.0.0.1:{p}")]);
        ports.push(p);
    }
    c.start_all();
    c.wait_leader().await;
    (c, ports)
}

fn mosquitto_sub() -> Command {
    if Command::new("mosquitto_sub").arg("--help").output().is_err() {
        panic!("mosquitto_sub is missing: install Debian's mosquitto-clients (scripts/test does)");
    }
    Command::new("mosquitto_sub")
}

/// A running `mosquitto_sub -d -v` and what it printed (stdout and stderr, in one list of lines).
struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sub {
    fn spawn(args: &[&str]) -> Sub {
        mosquitto_sub(); // present, or a clear panic
                         // Line-buffered: mosquitto_sub's stdio would hold its lines back in a pipe.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "-eL", "mosquitto_sub"])
            .args(args)
            .args(["-d", "-v"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().push(l);
                }
            });
        }
        Sub { child, lines }
    }

    fn text(&self) -> String {
        self.lines.lock().join("\n")
    }

    /// Waits until a line contains `what`.
    async fn wait_for(&self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.lines.lock().iter().any(|l| l.contains(what)) {
            assert!(
                Instant::now() < deadline,
                "mosquitto_sub never printed {what:?}; it printed:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The inbox messages received, in order: (payload, the DUP flag of its PUBLISH).
    fn inbox(&self) -> Vec<(String, bool)> {
        let lines = self.lines.lock();
        let dups: Vec<bool> = lines
            .iter()
            .filter(|l| l.contains("received PUBLISH"))
            .map(|l| l.contains("(d1,"))
            .collect();
        let payloads: Vec<String> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{INBOX} ")))
            .map(str::to_string)
            .collect();
        payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p, dups.get(i).copied().unwrap_or(false)))
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_sub` for `user`'s device `client_id`, persistent session, QoS 1, on `port`.
fn inbox_sub(app: &App, user: &str, client_id: &str, port: u16, version: &str) -> Sub {
    let token = app.token(user, None);
    Sub::spawn(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-V",
        version,
        "-q",
        "1",
        "-c",
        "-i",
        client_id,
        "-u",
        &app.id,
        "-P",
        &token,
        "-t",
        INBOX,
    ])
}

/// A persistent MQTT session's inbox survives the loss of the node the client was on: what was
/// acknowledged (PUBACK) is not sent again, and what was pushed while the client was away arrives
/// after it reconnects to another node, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_persistent_mqtt_session_survives_kill_9_of_its_node() {
    let (mut c, ports) = cluster().await;
    let app = c.create_app("mqtt").await;
    let leader = c.wait_leader().await;
    let on = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != on).unwrap();

    for (version, user) in [("mqttv5", "bob"), ("mqttv311", "carol")] {
        let sub = inbox_sub(
            &app,
            user,
            &format!("{user}-phone"),
            ports[on as usize - 1],
            version,
        );
        sub.wait_for("received SUBACK", Duration::from_secs(20)).await;
        for m in ["m1", "m2"] {
            app.push_acked(c.grpc_addr(leader), user, m, &format!("{user}-{m}"))
                .await;
        }
        sub.wait_for(&format!("{INBOX} m2"), Duration::from_secs(20))
            .await;
        assert_eq!(
            sub.inbox(),
            vec![("m1".into(), false), ("m2".into(), false)],
            "{version}: {}",
            sub.text()
        );
        // The PUBACKs become the device's ack cursor (a Raft write).
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(sub);
        // The node sees the connection end and commits it (with its delivery cursor): the
        // messages pushed after that were never sent to the device, so they come with DUP 0.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for m in ["m3", "m4"] {
            app.push_acked(c.grpc_addr(leader), user, m, &format!("{user}-{m}"))
                .await;
        }
        let again = inbox_sub(
            &app,
            user,
            &format!("{user}-phone"),
            ports[other as usize - 1],
            version,
        );
        again
            .wait_for(&format!("{INBOX} m4"), Duration::from_secs(20))
            .await;
        assert_eq!(
            again.inbox(),
            vec![("m3".into(), false), ("m4".into(), false)],
            "{version}: {}",
            again.text()
        );
    }

    // Now kill -9 the node a connected persistent session is on, with a message in its inbox.
    let user = "dave";
    let sub = inbox_sub(&app, user, "dave-phone", ports[on as usize - 1], "mqttv5");
    sub.wait_for("received SUBACK", Duration::from_secs(20)).await;
    app.push_acked(c.grpc_addr(leader), user, "d1", "dave-d1").await;
    sub.wait_for(&format!("{INBOX} d1"), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill9(on);
    drop(sub);
    app.push_acked(c.grpc_addr(leader), user, "d2", "dave-d2").await;
    let again = inbox_sub(&app, user, "dave-phone", ports[other as usize - 1], "mqttv5");
    again
        .wait_for(&format!("{INBOX} d2"), Duration::from_secs(30))
        .await;
    // The login took over a session still registered on the killed node (not declared down
    // yet), which may have sent anything stored before it: d2 comes with DUP 1 (docs/MQTT.md).
    assert_eq!(again.inbox(), vec![("d2".into(), true)], "{}", again.text());

    // Herald topics: SUBSCRIBE over MQTT to a name and to filters with `+` and `#`, publish
    // through another node's gRPC API.
    let news = Sub::spawn(&[
        "-h",
        "127.0.0.1",
        "-p",
        &ports[other as usize - 1].to_string(),
        "-V",
        "mqttv5",
        "-i",
        "erin-phone",
        "-u",
        &app.id,
        "-P",
        &app.token("erin", None),
        "-t",
        "news",
        "-t",
        "sport/+",
        "-t",
        "weather/#",
    ]);
    news.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let mut grpc = connect(c.grpc_addr(leader)).await.unwrap();
    for (topic, payload) in [
        ("other", "not-subscribed"),
        ("sport/football/live", "too-deep"),
        ("news", "extra"),
        ("sport/football", "goal"),
        ("weather/eu/paris", "rain"),
    ] {
        grpc.publish_topic(app.request(pb::PublishRequest {
            app: app.id.clone(),
            topic: topic.into(),
            payload: payload.as_bytes().to_vec().into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    news.wait_for("weather/eu/paris rain", Duration::from_secs(20))
        .await;
    let got: Vec<String> = news
        .lines
        .lock()
        .iter()
        .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed"))
        .cloned()
        .collect();
    assert_eq!(
        got,
        vec!["news extra", "sport/football goal", "weather/eu/paris rain"],
        "{}",
        news.text()
    );
    c.assert_no_panics();
}

/// Bad credentials get the CONNACK code of each version, and the connection is closed.
#[tokio::test(flavor = "multi_thread")]
async fn bad_mqtt_credentials_get_the_connack_code_of_each_version() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttauth").await;
    let port = ports[0].to_string();
    let run = |version: &str, user: &str, password: &str| {
        let out = mosquitto_sub()
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-i", "x-phone"])
            .args(["-u", user, "-P", password, "-t", INBOX, "-d", "-W", "10"])
            .output()
            .expect("mosquitto_sub runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let good = app.token("frank", None);
    let other_device = app.token("frank", Some("tablet"));
    for (what, user, password, v311, v5) in [
        ("not a token", app.id.as_str(), "not-a-token", 4, 134),
        ("a token of another app", "no-such-app", good.as_str(), 4, 134),
        (
            "a token bound to another device",
            app.id.as_str(),
            other_device.as_str(),
            5,
            135,
        ),
    ] {
        let (ok, out) = run("mqttv311", user, password);
        assert!(!ok, "3.1.1, {what}: mosquitto_sub succeeded:\n{out}");
        assert!(out.contains(&format!("CONNACK ({v311})")), "3.1.1, {what}: {out}");
        let (ok, out) = run("mqttv5", user, password);
        assert!(!ok, "5.0, {what}: mosquitto_sub succeeded:\n{out}");
        assert!(out.contains(&format!("CONNACK ({v5})")), "5.0, {what}: {out}");
    }
    c.assert_no_panics();
}

/// `--mqtt-tls-addr`: MQTT over TLS with the node's client certificate (here the dev CA's),
/// verified by mosquitto_sub against the CA.
#[tokio::test(flavor = "multi_thread")]
async fn mqtt_over_tls_delivers_the_inbox() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = herald_node::room::tls::dev_pki(pki_dir.path()).unwrap();
    let mut c = Cluster::new(3);
    let mut ports = Vec::new();
    for id in 1..=3 {
        let p = free_port();
        c.spec_mut(id).extra_args.extend([
            "--mqtt-tls-addr".into(),
            format!("127.0.0.1:{p}"),
            "--tls-cert".into(),
            pki.cert.display().to_string(),
            "--tls-key".into(),
            pki.key.display().to_string(),
        ]);
        ports.push(p);
    }
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("mqtts").await;
    let sub = Sub::spawn(&[
        "-h",
        "localhost",
        "-p",
        &ports[0].to_string(),
        "--cafile",
        &pki.ca.display().to_string(),
        "-V",
        "mqttv311",
        "-q",
        "1",
        "-c",
        "-i",
        "gina-phone",
        "-u",
        &app.id,
        "-P",
        &app.token("gina", None),
        "-t",
        INBOX,
    ]);
    sub.wait_for("received SUBACK", Duration::from_secs(20)).await;
    app.push_acked(c.grpc_addr(leader), "gina", "secret", "gina-1")
        .await;
    sub.wait_for(&format!("{INBOX} secret"), Duration::from_secs(20))
        .await;
    c.assert_no_panics();
}

/// Eclipse Paho (paho-mqtt from PyPI; `scripts/test` installs it) over TCP with MQTT 5.0, then
/// over WebSocket (`/mqtt` on the WS listener, subprotocol `mqtt`) with 3.1.1 on another node:
/// the inbox queued while the device was offline arrives, and what Paho PUBACKed is not sent
/// again on the next connection.
#[tokio::test(flavor = "multi_thread")]
async fn paho_over_tcp_and_websocket_resumes_the_inbox() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/paho_inbox.py");
    let probe = Command::new("python3").args(["-c", "import paho.mqtt"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python3 with paho-mqtt is missing: `python3 -m pip install paho-mqtt` (scripts/test does)"
    );
    let mut c = Cluster::new(3);
    let (mut mqtt_ports, mut ws_ports) = (Vec::new(), Vec::new());
    for id in 1..=3 {
        let (m, w) = (free_port(), free_port());
        c.spec_mut(id).extra_args.extend([
            "--mqtt-addr".into(),
            format!("127.0.0.1:{m}"),
            "--ws-addr".into(),
            format!("127.0.0.1:{w}"),
        ]);
        mqtt_ports.push(m);
        ws_ports.push(w);
    }
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("paho").await;
    let token = app.token("hank", None);
    let paho = |transport: &str, version: &str, port: u16, count: u32| {
        let out = Command::new("python3")
            .arg(&script)
            .args(["--transport", transport, "--version", version])
            .args(["--port", &port.to_string(), "--count", &count.to_string()])
            .args(["--app", &app.id, "--token", &token, "--client-id", "hank-phone"])
            .output()
            .expect("python3 runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let msgs: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("msg "))
            .map(str::to_string)
            .collect();
        (out.status.success(), msgs, text)
    };
    for m in ["h1", "h2"] {
        app.push_acked(c.grpc_addr(leader), "hank", m, &format!("hank-{m}"))
            .await;
    }
    let (ok, msgs, text) = paho("tcp", "5", mqtt_ports[0], 2);
    assert!(ok, "paho over TCP: {text}");
    assert_eq!(msgs, vec!["0 h1", "0 h2"], "{text}");
    // 5.0: the mailbox seq travels as a user property.
    let seqs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("prop herald-seq="))
        .collect();
    assert_eq!(seqs, vec!["1", "2"], "{text}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.push_acked(c.grpc_addr(leader), "hank", "h3", "hank-h3").await;
    let (ok, msgs, text) = paho("websockets", "3", ws_ports[1], 1);
    assert!(ok, "paho over WebSocket: {text}");
    assert_eq!(msgs, vec!["0 h3"], "{text}");
    c.assert_no_panics();
}

/// mqtt.js (npm `mqtt` 5.16; `scripts/test` installs it in node/tests/clients) with MQTT 5.0 over
/// TCP, then 3.1.1 over WebSocket on another node, the way a browser connects.
#[tokio::test(flavor = "multi_thread")]
async fn mqtt_js_over_tcp_and_websocket_resumes_the_inbox() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    assert!(
        dir.join("node_modules/mqtt").is_dir(),
        "mqtt.js is missing: run `npm install` in {} (scripts/test does)",
        dir.display()
    );
    let mut c = Cluster::new(3);
    let (mut mqtt_ports, mut ws_ports) = (Vec::new(), Vec::new());
    for id in 1..=3 {
        let (m, w) = (free_port(), free_port());
        c.spec_mut(id).extra_args.extend([
            "--mqtt-addr".into(),
            format!("127.0.0.1:{m}"),
            "--ws-addr".into(),
            format!("127.0.0.1:{w}"),
        ]);
        mqtt_ports.push(m);
        ws_ports.push(w);
    }
    c.start_all();
    let leader = c.wait_leader().await;
    let app = c.create_app("mqttjs").await;
    let token = app.token("ivy", None);
    let js = |url: &str, count: u32, version: u32| {
        let out = Command::new("node")
            .current_dir(&dir)
            .arg("mqttjs_inbox.mjs")
            .args([
                url,
                &app.id,
                &token,
                "ivy-browser",
                &count.to_string(),
                &version.to_string(),
            ])
            .output()
            .expect("node runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let msgs: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("msg "))
            .map(str::to_string)
            .collect();
        (out.status.success(), msgs, text)
    };
    for m in ["i1", "i2"] {
        app.push_acked(c.grpc_addr(leader), "ivy", m, &format!("ivy-{m}"))
            .await;
    }
    let (ok, msgs, text) = js(&format!("mqtt://127.0.0.1:{}", mqtt_ports[0]), 2, 5);
    assert!(ok, "mqtt.js over TCP: {text}");
    assert_eq!(msgs, vec!["0 i1", "0 i2"], "{text}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.push_acked(c.grpc_addr(leader), "ivy", "i3", "ivy-i3").await;
    let (ok, msgs, text) = js(&format!("ws://127.0.0.1:{}/mqtt", ws_ports[2]), 1, 4);
    assert!(ok, "mqtt.js over WebSocket: {text}");
    assert_eq!(msgs, vec!["0 i3"], "{text}");
    c.assert_no_panics();
}

/// A PUBLISH to `$herald/upstream` reaches the app's backend like the native UPSTREAM (5.0: the
/// PUBACK comes once the backend answered); a second connection with the same client id takes
/// the session over and the first is told so (5.0: DISCONNECT 0x8E).
#[tokio::test(flavor = "multi_thread")]
async fn mqtt_upstream_reaches_the_backend_and_a_second_login_takes_over() {
    use herald_node::coordinator::test_backend::TestBackend;
    let backend = TestBackend::start().await.unwrap();
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttup").await;
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(crate::harness::admin_request(pb::GetAppRequest {
            id: app.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.callbacks = vec![backend.endpoint()];
    admin
        .update_app(crate::harness::admin_request(pb::UpdateAppRequest {
            app: Some(cfg),
        }))
        .await
        .unwrap();
    for id in 1..=3 {
        c.wait_caught_up(id).await;
    }
    let token = app.token("kim", None);
    let port = ports[1].to_string();
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-i",
            "kim-phone",
        ])
        .args([
            "-u",
            &app.id,
            "-P",
            &token,
            "-t",
            "$herald/upstream",
            "-m",
            "hello backend",
            "-d",
        ])
        .output()
        .expect("mosquitto_pub runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("received PUBACK"), "{text}");
    let got: Vec<Vec<u8>> = backend
        .upstreams()
        .iter()
        .map(|a| a.request.payload.to_vec())
        .collect();
    assert_eq!(got, vec![b"hello backend".to_vec()], "{text}");

    let first = inbox_sub(&app, "kim", "kim-phone", ports[0], "mqttv5");
    first.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let second = inbox_sub(&app, "kim", "kim-phone", ports[2], "mqttv5");
    second.wait_for("received SUBACK", Duration::from_secs(20)).await;
    // 0x8E = 142, Session taken over.
    first
        .wait_for("Received DISCONNECT (142)", Duration::from_secs(20))
        .await;
    c.assert_no_panics();
}

/// Clients publish to the topics their app allows (`client_publish`), to every subscriber on
/// every node; elsewhere a 5.0 client gets PUBACK 0x87. A client that dies (kill -9) has its
/// will published; one that disconnects normally does not.
#[tokio::test(flavor = "multi_thread")]
async fn clients_publish_where_the_app_allows_and_wills_are_published_on_abnormal_ends() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttpub").await;
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(crate::harness::admin_request(pb::GetAppRequest {
            id: app.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.client_publish = vec!["chat/+".into()];
    admin
        .update_app(crate::harness::admin_request(pb::UpdateAppRequest {
            app: Some(cfg),
        }))
        .await
        .unwrap();
    for id in 1..=3 {
        c.wait_caught_up(id).await;
    }
    let sub_args = |port: u16, id: &str, token: &str| {
        vec![
            "-h".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-V".into(),
            "mqttv5".into(),
            "-i".into(),
            id.into(),
            "-u".into(),
            app.id.clone(),
            "-P".into(),
            token.into(),
            "-t".into(),
            "chat/#".into(),
        ]
    };
    let lisa = app.token("lisa", None);
    let args = sub_args(ports[0], "lisa-phone", &lisa);
    let listener = Sub::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    listener
        .wait_for("received SUBACK", Duration::from_secs(20))
        .await;

    let publish = |port: u16, topic: &str, msg: &str| {
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-V",
                "mqttv5",
                "-q",
                "1",
            ])
            .args(["-i", "mo-phone", "-u", &app.id, "-P", &app.token("mo", None)])
            .args(["-t", topic, "-m", msg, "-d"])
            .output()
            .expect("mosquitto_pub runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = publish(ports[2], "chat/lobby", "hi all");
    assert!(
        out.contains("received PUBACK") && !out.contains("rc:135"),
        "{out}"
    );
    listener
        .wait_for("chat/lobby hi all", Duration::from_secs(20))
        .await;
    let out = publish(ports[2], "news/lobby", "not allowed");
    assert!(out.contains("135") || out.contains("Not authorized"), "{out}");
    // 3.1.1 QoS 2: taken exactly once (PUBREC, PUBREL, PUBCOMP).
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &ports[0].to_string(),
            "-V",
            "mqttv311",
            "-q",
            "2",
        ])
        .args(["-i", "mo-tablet", "-u", &app.id, "-P", &app.token("mo", None)])
        .args(["-t", "chat/lobby", "-m", "exactly once", "-d"])
        .output()
        .expect("mosquitto_pub runs");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.contains("received PUBREC") && out.contains("received PUBCOMP"),
        "{out}"
    );
    listener
        .wait_for("chat/lobby exactly once", Duration::from_secs(20))
        .await;

    // A client with a will, killed: the will arrives; one that disconnects normally: nothing.
    let nick = app.token("nick", None);
    let mut args = sub_args(ports[1], "nick-phone", &nick);
    args.extend(["--will-topic", "chat/lobby", "--will-payload", "nick is gone"].map(String::from));
    let dying = Sub::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    dying.wait_for("received SUBACK", Duration::from_secs(20)).await;
    drop(dying); // SIGKILL: the TCP connection just ends
    listener
        .wait_for("chat/lobby nick is gone", Duration::from_secs(20))
        .await;
    let olga = app.token("olga", None);
    // -C 1: it leaves with a normal DISCONNECT after one message. (-W's timeout would send 5.0's
    // "disconnect with will message", 0x04, which publishes the will on purpose.)
    let mut args = sub_args(ports[1], "olga-phone", &olga);
    args.extend(
        [
            "-C",
            "1",
            "--will-topic",
            "chat/lobby",
            "--will-payload",
            "olga is gone",
        ]
        .map(String::from),
    );
    let leaving = Sub::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    leaving.wait_for("received SUBACK", Duration::from_secs(20)).await;
    publish(ports[2], "chat/lobby", "bye olga");
    leaving
        .wait_for("chat/lobby bye olga", Duration::from_secs(20))
        .await;
    leaving
        .wait_for("sending DISCONNECT", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !listener.text().contains("olga is gone"),
        "a normal DISCONNECT published the will: {}",
        listener.text()
    );
    let once = listener
        .lines
        .lock()
        .iter()
        .filter(|l| *l == "chat/lobby exactly once")
        .count();
    assert_eq!(once, 1, "{}", listener.text());
    c.assert_no_panics();
}

/// Keep alive is enforced: a client that stops talking (SIGSTOP) is disconnected after 1.5 × its
/// keep alive (clamped into the node's heartbeat bounds), and its will is published.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_is_dropped_after_its_keep_alive_and_its_will_published() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttka").await;
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(crate::harness::admin_request(pb::GetAppRequest {
            id: app.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.client_publish = vec!["status/+".into()];
    admin
        .update_app(crate::harness::admin_request(pb::UpdateAppRequest {
            app: Some(cfg),
        }))
        .await
        .unwrap();
    for id in 1..=3 {
        c.wait_caught_up(id).await;
    }
    let watcher_token = app.token("pat", None);
    let watcher = Sub::spawn(&[
        "-h",
        "127.0.0.1",
        "-p",
        &ports[0].to_string(),
        "-V",
        "mqttv5",
        "-i",
        "pat-phone",
        "-u",
        &app.id,
        "-P",
        &watcher_token,
        "-t",
        "status/+",
    ]);
    watcher.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let quiet_token = app.token("quin", None);
    let quiet = Sub::spawn(&[
        "-h",
        "127.0.0.1",
        "-p",
        &ports[1].to_string(),
        "-V",
        "mqttv5",
        "-i",
        "quin-phone",
        "-u",
        &app.id,
        "-P",
        &quiet_token,
        "-t",
        "status/+",
        "-k",
        "5",
        "--will-topic",
        "status/quin",
        "--will-payload",
        "offline",
    ]);
    quiet.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let stopped = Instant::now();
    let pid = quiet.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    watcher
        .wait_for("status/quin offline", Duration::from_secs(60))
        .await;
    let took = stopped.elapsed();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    // Keep alive 5 s: the node's idle limit is 2.5 heartbeats of 3 s (or of its minimum).
    assert!(
        took >= Duration::from_secs(5),
        "dropped after {took:?}, before its keep alive"
    );
    c.assert_no_panics();
}

/// Lets the app's clients publish to `filters` (`client_publish`) and waits until every node
/// applied it.
async fn allow_client_publish(c: &Cluster, app: &App, filters: &[&str]) {
    let mut admin = c.client(1).await;
    let mut cfg = admin
        .get_app(crate::harness::admin_request(pb::GetAppRequest {
            id: app.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .app
        .unwrap();
    cfg.client_publish = filters.iter().map(|f| f.to_string()).collect();
    admin
        .update_app(crate::harness::admin_request(pb::UpdateAppRequest {
            app: Some(cfg),
        }))
        .await
        .unwrap();
    for id in 1..=3 {
        c.wait_caught_up(id).await;
    }
}

/// The directory of the Node.js clients, with mqtt.js installed.
fn js_clients() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    assert!(
        dir.join("node_modules/mqtt").is_dir(),
        "mqtt.js is missing: run `npm install` in {} (scripts/test does)",
        dir.display()
    );
    dir
}

/// Runs `python3 <script> <args>` from tests/clients (Paho installed); its success and output.
fn paho(script: &str, args: &[&str]) -> (bool, String) {
    let probe = Command::new("python3").args(["-c", "import paho.mqtt"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python3 with paho-mqtt is missing: `python3 -m pip install paho-mqtt` (scripts/test does)"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The lines of `text` that start with `prefix`, without it.
fn lines_after<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter_map(|l| l.strip_prefix(prefix)).collect()
}

/// MQTT 5.0 topic aliases both ways, with mqtt.js: the CONNACK offers a Topic Alias Maximum,
/// mqtt.js publishes its first message with the topic and an alias and the next ones with the
/// alias alone, and the node, told by mqtt.js's CONNECT that it may, sends the topic once and then
/// only the alias. Paho sends the aliases the node must refuse: one never set (DISCONNECT 0x82)
/// and one above the maximum (0x94).
#[tokio::test(flavor = "multi_thread")]
async fn topic_aliases_work_both_ways_and_bad_ones_end_the_connection() {
    let dir = js_clients();
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttalias").await;
    allow_client_publish(&c, &app, &["chat/+"]).await;
    let token = app.token("rae", None);
    let out = Command::new("node")
        .current_dir(&dir)
        .arg("mqttjs_alias.mjs")
        .args([
            &format!("mqtt://127.0.0.1:{}", ports[0]),
            &app.id,
            &token,
            "rae-browser",
            "chat/alias",
            "3",
        ])
        .output()
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(lines_after(&text, "connack "), vec!["0 alias-max 32"], "{text}");
    let sent = lines_after(&text, "send ");
    assert_eq!(sent.len(), 3, "{text}");
    let alias = sent[0]
        .strip_prefix("\"chat/alias\" alias ")
        .unwrap_or_else(|| panic!("first publish without topic and alias: {text}"));
    assert_ne!(alias, "-", "{text}");
    for s in &sent[1..] {
        assert_eq!(*s, format!("\"\" alias {alias}"), "{text}");
    }
    assert_eq!(lines_after(&text, "puback "), vec!["0", "0", "0"], "{text}");
    // A topic message has no expiry in Herald (a topic keeps its last messages by count).
    assert!(
        lines_after(&text, "recv ")
            .iter()
            .all(|l| l.ends_with("expiry -")),
        "{text}"
    );
    let recv: Vec<String> = lines_after(&text, "recv ")
        .into_iter()
        .map(|l| l.split(" dup ").next().unwrap().to_string())
        .collect();
    assert_eq!(
        recv,
        vec!["\"chat/alias\" alias 1", "\"\" alias 1", "\"\" alias 1"],
        "{text}"
    );
    assert_eq!(
        lines_after(&text, "msg "),
        vec!["chat/alias m1", "chat/alias m2", "chat/alias m3"],
        "{text}"
    );

    let port = ports[1].to_string();
    let token = app.token("sam", None);
    let base = ["--port", &port, "--app", &app.id, "--token", &token];
    let (ok, text) = paho(
        "paho_alias.py",
        &[&base[..], &["--client-id", "sam-phone", "--case", "unknown"]].concat(),
    );
    assert!(ok, "{text}");
    assert_eq!(lines_after(&text, "disconnect "), vec!["130"], "{text}");
    let (ok, text) = paho(
        "paho_alias.py",
        &[
            &base[..],
            &["--client-id", "sam-tablet", "--case", "above", "--alias", "33"],
        ]
        .concat(),
    );
    assert!(ok, "{text}");
    assert_eq!(lines_after(&text, "connack "), vec!["0 alias-max 32"], "{text}");
    assert_eq!(lines_after(&text, "disconnect "), vec!["148"], "{text}");
    c.assert_no_panics();
}

/// MQTT 5.0 message expiry, with Paho: an inbox message's PUBLISH carries the part of its TTL
/// that is left as its Message Expiry Interval (a push's own TTL, or the app's default).
#[tokio::test(flavor = "multi_thread")]
async fn an_inbox_message_carries_the_rest_of_its_ttl_as_message_expiry() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttexp").await;
    let leader = c.wait_leader().await;
    let mut grpc = connect(c.grpc_addr(leader)).await.unwrap();
    for (payload, ttl_ms) in [("short", 90_000), ("default", 0)] {
        let mut req = app.push_request("uma", payload, &format!("uma-{payload}"));
        req.get_mut().ttl_ms = ttl_ms;
        grpc.push(req).await.unwrap();
    }
    let port = ports[2].to_string();
    let token = app.token("uma", None);
    let args = ["--port", &port, "--app", &app.id, "--token", &token];
    let (ok, text) = paho(
        "paho_inbox.py",
        &[&args[..], &["--client-id", "uma-phone", "--count", "2"]].concat(),
    );
    assert!(ok, "{text}");
    assert_eq!(lines_after(&text, "msg "), vec!["0 short", "0 default"], "{text}");
    let expiry: Vec<u64> = lines_after(&text, "expiry ")
        .iter()
        .map(|e| e.parse().unwrap())
        .collect();
    assert_eq!(expiry.len(), 2, "{text}");
    // Seconds left, rounded up; the test's own seconds pass meanwhile.
    assert!((60..=90).contains(&expiry[0]), "{text}");
    // The app's default TTL (days), less the seconds since the push.
    assert!(expiry[1] > 24 * 3600, "{text}");
    c.assert_no_panics();
}

/// The DUP flag, with mosquitto_sub (3.1.1 and 5.0): a message the node wrote to a client that
/// never PUBACKed it (stopped, then killed) comes again on the next connection, to another node,
/// with DUP 1; one pushed while the client was away, and one pushed after it came back, with
/// DUP 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_sent_to_an_earlier_connection_comes_again_with_dup() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttdup").await;
    let leader = c.wait_leader().await;
    for (version, user) in [("mqttv5", "vic"), ("mqttv311", "wes")] {
        let device = format!("{user}-phone");
        let push = |m: &'static str| {
            let key = format!("{user}-{m}");
            let app = &app;
            let addr = c.grpc_addr(leader);
            async move { app.push_acked(addr, user, m, &key).await }
        };
        let sub = inbox_sub(&app, user, &device, ports[0], version);
        sub.wait_for("received SUBACK", Duration::from_secs(20)).await;
        push("acked").await;
        sub.wait_for(&format!("{INBOX} acked"), Duration::from_secs(20))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Stopped: the node writes the next message to its socket and gets no PUBACK.
        let pid = sub.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
        push("unacked").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(sub); // SIGKILL
        tokio::time::sleep(Duration::from_millis(500)).await;
        push("while-away").await;
        let again = inbox_sub(&app, user, &device, ports[1], version);
        again
            .wait_for(&format!("{INBOX} while-away"), Duration::from_secs(20))
            .await;
        push("after").await;
        again
            .wait_for(&format!("{INBOX} after"), Duration::from_secs(20))
            .await;
        assert_eq!(
            again.inbox(),
            vec![
                ("unacked".into(), true),
                ("while-away".into(), false),
                ("after".into(), false)
            ],
            "{version}: {}",
            again.text()
        );
    }
    c.assert_no_panics();
}

/// MQTT 5.0 Will Delay Interval, with mosquitto_sub: a killed client that logs in again (to
/// another node) within its will's delay has no will published; killed for good, its will comes
/// after the delay. A will whose session ends with the connection (Session Expiry 0) goes out at
/// once whatever its delay.
#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_will_waits_and_is_dropped_when_the_client_comes_back() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttwill").await;
    allow_client_publish(&c, &app, &["status/+"]).await;
    let watcher_token = app.token("yara", None);
    let watcher = Sub::spawn(&[
        "-h",
        "127.0.0.1",
        "-p",
        &ports[0].to_string(),
        "-V",
        "mqttv5",
        "-i",
        "yara-phone",
        "-u",
        &app.id,
        "-P",
        &watcher_token,
        "-t",
        "status/+",
    ]);
    watcher.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let token = app.token("zed", None);
    let client = |port: u16, session: &[&str]| {
        let mut args: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-i",
            "zed-phone",
            "-u",
            &app.id,
            "-P",
            &token,
            "-t",
            "status/none",
            "--will-topic",
            "status/zed",
            "--will-payload",
            "zed is gone",
            "-D",
            "will",
            "will-delay-interval",
            "4",
        ]
        .map(String::from)
        .to_vec();
        args.extend(session.iter().map(|s| s.to_string()));
        Sub::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let persistent = ["-c", "-x", "60"];

    let first = client(ports[1], &persistent);
    first.wait_for("received SUBACK", Duration::from_secs(20)).await;
    drop(first); // SIGKILL
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = client(ports[2], &persistent);
    back.wait_for("received SUBACK", Duration::from_secs(20)).await;
    // The first connection's delay runs out while the client is back: no will.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(killed.elapsed())).await;
    assert!(
        !watcher.text().contains("zed is gone"),
        "a will was published though the client came back: {}",
        watcher.text()
    );
    drop(back);
    let killed = Instant::now();
    watcher
        .wait_for("status/zed zed is gone", Duration::from_secs(20))
        .await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(3_500),
        "the will came after {took:?}"
    );
    let wills = watcher
        .lines
        .lock()
        .iter()
        .filter(|l| l.as_str() == "status/zed zed is gone")
        .count();
    assert_eq!(wills, 1, "{}", watcher.text());

    // Session Expiry 0: the session ends with the connection, and the will goes out then.
    let short = client(ports[1], &[]);
    short.wait_for("received SUBACK", Duration::from_secs(20)).await;
    drop(short);
    let killed = Instant::now();
    eventually_count(&watcher, "status/zed zed is gone", 2).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "the will came after {took:?}");
    c.assert_no_panics();
}

/// Waits (20 s at most) until `sub` printed the line `line` `n` times.
async fn eventually_count(sub: &Sub, line: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = sub.lines.lock().iter().filter(|l| l.as_str() == line).count();
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{line:?} printed {got} times, not {n}:\n{}",
            sub.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// MQTT 5.0 Maximum Packet Size, with mosquitto_sub: an inbox message larger than the client
/// accepts is not sent and counts as delivered [MQTT-3.1.2-25]; the messages around it arrive,
/// and a later connection of the device does not get it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_clients_maximum_packet_size_is_discarded_as_if_sent() {
    let (c, ports) = cluster().await;
    let app = c.create_app("mqttmax").await;
    let leader = c.wait_leader().await;
    let addr = c.grpc_addr(leader);
    let (user, device) = ("max", "max-phone");
    let limited = |port: u16| {
        let token = app.token(user, None);
        Sub::spawn(&[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-c",
            "-x",
            "3600",
            "-i",
            device,
            "-u",
            &app.id,
            "-P",
            &token,
            "-D",
            "connect",
            "maximum-packet-size",
            "400",
            "-t",
            INBOX,
        ])
    };
    let sub = limited(ports[0]);
    sub.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let big = "x".repeat(600);
    app.push_acked(addr, user, "small-1", "max-1").await;
    app.push_acked(addr, user, &big, "max-big").await;
    app.push_acked(addr, user, "small-2", "max-2").await;
    sub.wait_for(&format!("{INBOX} small-2"), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<String> = sub.inbox().into_iter().map(|(p, _)| p).collect();
    assert_eq!(got, vec!["small-1", "small-2"], "{}", sub.text());
    drop(sub);
    // The device again, on another node: the big message was delivered as far as Herald knows.
    let again = limited(ports[1]);
    again.wait_for("received SUBACK", Duration::from_secs(20)).await;
    app.push_acked(addr, user, "small-3", "max-3").await;
    again
        .wait_for(&format!("{INBOX} small-3"), Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got: Vec<String> = again.inbox().into_iter().map(|(p, _)| p).collect();
    assert_eq!(got, vec!["small-3"], "{}", again.text());
    c.assert_no_panics();
}

/// Runs `mosquitto_pub` with `args` (and `-d`); its output.
fn mosquitto_pub(args: &[&str]) -> String {
    let out = Command::new("mosquitto_pub")
        .args(args)
        .arg("-d")
        .output()
        .expect("mosquitto_pub runs (Debian's mosquitto-clients)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `(d.., q.., r.., m.., 'topic', ...)` line mosquitto_sub -d printed for each PUBLISH it
/// received on `topic`: whether its RETAIN flag was set, in order.
fn retain_flags(sub: &Sub, topic: &str) -> Vec<bool> {
    let needle = format!("'{topic}',");
    sub.lines
        .lock()
        .iter()
        .filter(|l| l.contains("received PUBLISH") && l.contains(&needle))
        .map(|l| l.contains(", r1,"))
        .collect()
}

/// Retained messages (MQTT's retain flag), replicated: a retained PUBLISH through node 1 (5.0 and
/// 3.1.1 `mosquitto_pub -r`) is what a SUBSCRIBE through node 3 gets first, with RETAIN 1, for a
/// name and for `+` / `#` filters; live messages come with RETAIN 0; an empty retained PUBLISH
/// clears it; a retained message with a Message Expiry Interval is gone once it passed; a will
/// with the retain flag becomes the retained message. Paho checks 5.0's Retain Handling 0/1/2 and
/// Retain As Published.
#[tokio::test(flavor = "multi_thread")]
async fn retained_messages_are_replicated_replaced_cleared_and_expire() {
    retained_messages(cluster().await).await
}

/// The same with 4 shards: the topics' retained messages live in their topics' shards, and a
/// filter's SUBSCRIBE collects them from every shard.
#[tokio::test(flavor = "multi_thread")]
async fn retained_messages_across_shards() {
    retained_messages(cluster_with(&["--shards", "4"]).await).await
}

async fn retained_messages((c, ports): (Cluster, Vec<u16>)) {
    let app = c.create_app("mqttret").await;
    allow_client_publish(&c, &app, &["status/#", "rh/+"]).await;
    let pub_token = app.token("pat", None);
    let port = |i: usize| ports[i].to_string();
    let publish = |port: &str, version: &str, extra: &[&str]| {
        let mut args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            version,
            "-q",
            "1",
            "-i",
            "pat-phone",
            "-u",
            &app.id,
            "-P",
            &pub_token,
        ];
        args.extend_from_slice(extra);
        let out = mosquitto_pub(&args);
        assert!(
            out.contains("received PUBACK") && !out.contains("RC:135"),
            "{out}"
        );
    };
    let p1 = port(0);
    publish(&p1, "mqttv5", &["-r", "-t", "status/door", "-m", "open"]);
    publish(&p1, "mqttv311", &["-r", "-t", "status/window", "-m", "closed"]);
    publish(&p1, "mqttv5", &["-r", "-t", "status/porch/light", "-m", "on"]);
    // Not retained: it is not offered to later subscribers.
    publish(&p1, "mqttv5", &["-t", "status/gate", "-m", "passing"]);
    // Replaced: the newest retained message of a topic is the one kept.
    publish(&p1, "mqttv5", &["-r", "-t", "status/porch/light", "-m", "off"]);

    let subscriber = |port: &str, version: &str, id: &str, filter: &str| {
        Sub::spawn(&[
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            version,
            "-i",
            id,
            "-u",
            &app.id,
            "-P",
            &app.token(id, None),
            "-t",
            filter,
        ])
    };
    let p3 = port(2);
    let exact = subscriber(&p3, "mqttv5", "quinn", "status/door");
    let plus = subscriber(&p3, "mqttv311", "ruth", "status/+");
    let hash = subscriber(&p3, "mqttv5", "sam", "status/#");
    exact.wait_for("status/door open", Duration::from_secs(20)).await;
    plus.wait_for("status/window closed", Duration::from_secs(20))
        .await;
    hash.wait_for("status/porch/light off", Duration::from_secs(20))
        .await;
    plus.wait_for("status/door open", Duration::from_secs(20)).await;
    hash.wait_for("status/window closed", Duration::from_secs(20))
        .await;
    hash.wait_for("status/door open", Duration::from_secs(20)).await;
    assert_eq!(
        retain_flags(&exact, "status/door"),
        vec![true],
        "{}",
        exact.text()
    );
    assert_eq!(
        retain_flags(&plus, "status/window"),
        vec![true],
        "{}",
        plus.text()
    );
    // `+` is one level: the porch light is not one of its topics.
    assert!(!plus.text().contains("status/porch/light"), "{}", plus.text());
    assert!(!hash.text().contains("passing"), "{}", hash.text());
    assert!(!hash.text().contains("status/porch/light on"), "{}", hash.text());
    // The SUBACK comes before the retained messages.
    let text = exact.text();
    let suback = text.find("received SUBACK").expect("suback");
    let first = text.find("received PUBLISH").expect("publish");
    assert!(suback < first, "{text}");

    // Live: RETAIN 0 (no Retain As Published), whether the publisher retained it or not.
    publish(&p1, "mqttv5", &["-r", "-t", "status/door", "-m", "shut"]);
    exact.wait_for("status/door shut", Duration::from_secs(20)).await;
    assert_eq!(
        retain_flags(&exact, "status/door"),
        vec![true, false],
        "{}",
        exact.text()
    );

    // An empty retained PUBLISH clears the window's; an expiring one is gone after its interval.
    publish(&p1, "mqttv5", &["-r", "-n", "-t", "status/window"]);
    publish(
        &p1,
        "mqttv5",
        &[
            "-r",
            "-t",
            "status/temp",
            "-m",
            "21C",
            "-D",
            "publish",
            "message-expiry-interval",
            "2",
        ],
    );
    let early = subscriber(&port(1), "mqttv5", "tess", "status/+");
    early.wait_for("status/temp 21C", Duration::from_secs(20)).await;
    early.wait_for("status/door shut", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late = subscriber(&port(1), "mqttv311", "uma", "status/+");
    late.wait_for("status/door shut", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!late.text().contains("status/temp"), "expired: {}", late.text());
    assert!(
        !late.text().contains("status/window closed"),
        "cleared: {}",
        late.text()
    );

    // A will with the retain flag becomes the topic's retained message.
    let mut args: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &port(1),
        "-V",
        "mqttv5",
        "-i",
        "vic-phone",
        "-u",
        &app.id,
        "-P",
        &app.token("vic", None),
        "-t",
        "status/vic",
        "--will-topic",
        "status/vic",
        "--will-payload",
        "vic is offline",
        "--will-retain",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["-q".into(), "1".into()]);
    let vic = Sub::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    vic.wait_for("received SUBACK", Duration::from_secs(20)).await;
    drop(vic); // killed: the will goes out
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = subscriber(&p3, "mqttv311", "walt", "status/vic");
    after
        .wait_for("status/vic vic is offline", Duration::from_secs(20))
        .await;
    assert_eq!(retain_flags(&after, "status/vic"), vec![true], "{}", after.text());

    // 5.0's Retain Handling and Retain As Published, with Paho.
    let (ok, out) = paho(
        "paho_retain.py",
        &[
            "--port",
            &port(1),
            "--app",
            &app.id,
            "--token",
            &app.token("xena", None),
            "--client-id",
            "xena-phone",
            "--topic",
            "rh/one",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        lines_after(&out, "connack "),
        vec!["0 retain-available 1"],
        "{out}"
    );
    assert_eq!(
        lines_after(&out, "msg "),
        vec![
            "rh1-new kept retain=1",
            "rh0 kept retain=1",
            "rap1 live1 retain=1",
            "rap0 live2 retain=0",
        ],
        "{out}"
    );
    c.assert_no_panics();
}

/// Persistent sessions keep their subscriptions in the replicated store: a 5.0 session (Clean
/// Start 0, Session Expiry 600) subscribed on a node that is then killed with kill -9 comes back
/// on another node with Session Present 1 and gets the topic's messages without subscribing
/// again (Paho); Clean Start 1 drops them; they are gone once the Session Expiry Interval passed
/// after the session ended; a 3.1.1 Clean Session 0 session (mosquitto_sub -c) keeps them too.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_sessions_subscriptions_survive_kill_9_and_expire() {
    kept_sessions(cluster().await).await
}

/// The same with 4 shards: the kept session lives in its user's shard.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_session_survives_kill_9_in_a_sharded_cluster() {
    kept_sessions(cluster_with(&["--shards", "4"]).await).await
}

async fn kept_sessions((mut c, ports): (Cluster, Vec<u16>)) {
    let app = c.create_app("mqttkeep").await;
    allow_client_publish(&c, &app, &["news/+"]).await;
    let leader = c.wait_leader().await;
    let on = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != on).unwrap();
    let port = |id: u64| ports[id as usize - 1].to_string();
    let token = app.token("frank", None);
    let sub = Sub::spawn(&[
        "-h",
        "127.0.0.1",
        "-p",
        &port(on),
        "-V",
        "mqttv5",
        "-c",
        "-x",
        "600",
        "-q",
        "1",
        "-i",
        "frank-phone",
        "-u",
        &app.id,
        "-P",
        &token,
        "-t",
        "news/+",
    ]);
    sub.wait_for("received SUBACK", Duration::from_secs(20)).await;
    let mut grpc = connect(c.grpc_addr(leader)).await.unwrap();
    grpc.publish_topic(app.request(pb::PublishRequest {
        app: app.id.clone(),
        topic: "news/a".into(),
        payload: b"one".to_vec().into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    sub.wait_for("news/a one", Duration::from_secs(20)).await;
    c.kill9(on);
    drop(sub);

    let session = |port: &str, clean: &str, expiry: &str, extra: &[&str]| {
        let mut args = vec![
            "--port",
            port,
            "--app",
            &app.id,
            "--token",
            &token,
            "--client-id",
            "frank-phone",
            "--clean",
            clean,
            "--expiry",
            expiry,
        ];
        args.extend_from_slice(extra);
        let (ok, out) = paho("paho_session.py", &args);
        assert!(ok, "{out}");
        out
    };
    let p = port(other);
    // Another node, no SUBSCRIBE: the kept subscription delivers.
    let out = session(&p, "0", "600", &["--publish-topic", "news/b", "--payload", "two"]);
    assert_eq!(
        lines_after(&out, "connack "),
        vec!["session-present=True"],
        "{out}"
    );
    assert_eq!(lines_after(&out, "msg "), vec!["news/b two"], "{out}");
    // Clean Start 1 (Session Expiry 0) drops the session; the next one starts without it.
    let out = session(&p, "1", "0", &["--publish-topic", "news/c", "--payload", "three"]);
    assert_eq!(
        lines_after(&out, "connack "),
        vec!["session-present=False"],
        "{out}"
    );
    assert!(lines_after(&out, "msg ").is_empty(), "{out}");
    let out = session(&p, "0", "3", &["--subscribe", "news/+"]);
    assert_eq!(
        lines_after(&out, "connack "),
        vec!["session-present=False"],
        "{out}"
    );
    // Back within the 3 s after the session ended: kept.
    let out = session(&p, "0", "3", &["--publish-topic", "news/d", "--payload", "four"]);
    assert_eq!(
        lines_after(&out, "connack "),
        vec!["session-present=True"],
        "{out}"
    );
    assert_eq!(lines_after(&out, "msg "), vec!["news/d four"], "{out}");
    // Back after them: expired.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let out = session(&p, "0", "3", &["--publish-topic", "news/e", "--payload", "five"]);
    assert_eq!(
        lines_after(&out, "connack "),
        vec!["session-present=False"],
        "{out}"
    );
    assert!(lines_after(&out, "msg ").is_empty(), "{out}");

    // 3.1.1, Clean Session 0 with mosquitto_sub: subscribed once, back later with only the inbox
    // filter, it still gets the topic.
    let gina = app.token("gina", None);
    let v311 = |port: &str, filter: &str| {
        Sub::spawn(&[
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            "mqttv311",
            "-c",
            "-q",
            "1",
            "-i",
            "gina-phone",
            "-u",
            &app.id,
            "-P",
            &gina,
            "-t",
            filter,
        ])
    };
    let first = v311(&port(leader), "news/+");
    first.wait_for("received SUBACK", Duration::from_secs(20)).await;
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = v311(&p, INBOX);
    back.wait_for("received SUBACK", Duration::from_secs(20)).await;
    grpc.publish_topic(app.request(pb::PublishRequest {
        app: app.id.clone(),
        topic: "news/f".into(),
        payload: b"six".to_vec().into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    back.wait_for("news/f six", Duration::from_secs(20)).await;
    c.assert_no_panics();
}
