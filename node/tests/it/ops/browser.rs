//! The dashboard and the browser example in a real headless browser (Debian's `chromium`)
//! against `herald dev`: the dashboard ignores a token in its URL, logs in with its form (a session
//! cookie), shows three members and a leader and looks a user up; the
//! example page connects over WebSocket, shows a push and acks it. Screenshots are kept in
//! `<cargo target dir>/herald-it/` (see [`screenshot_path`]); each test prints where.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use herald_proto::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::http_get;
use crate::harness::{connect, eventually, free_port_block, herald_with, keep_dirs, NODE_WAIT};

/// Kills the dev cluster's nodes when the test ends, however it ends.
struct DevCluster {
    dir: PathBuf,
    summary: Value,
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        for p in self.summary["pids"].as_array().cloned().unwrap_or_default() {
            if let Some(pid) = p.as_u64() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        if std::thread::panicking() {
            for i in 1..=3 {
                crate::harness::print_log_tail(
                    &format!("dev node {i}"),
                    &self.dir.join(format!("node-{i}.log")),
                    crate::harness::failure_log_lines(),
                );
            }
        }
    }
}

async fn dev_up(dir: &Path) -> DevCluster {
    let base = free_port_block(50);
    let out = herald_with(
        &[
            "dev",
            "--data-dir",
            dir.to_str().unwrap(),
            "--base-port",
            &base.to_string(),
            "--detach",
        ],
        &[],
        Duration::from_secs(120),
    )
    .await;
    let summary: Value = std::fs::read_to_string(dir.join("dev.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let dev = DevCluster {
        dir: dir.to_path_buf(),
        summary,
    };
    assert_eq!(out.code, Some(0), "herald dev failed: {out:#?}");
    assert!(out.stdout.contains("admin (HTTP):"), "{}", out.stdout);
    assert!(out.stdout.contains("client (WS):"), "{}", out.stdout);
    dev
}

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("chromium not found: the browser tests need it; install it with `apt-get install chromium` (scripts/test does)"))
}

/// Runs headless Chromium on `url`: `--dump-dom` output (the page after scripts ran for the
/// virtual time budget), and a screenshot into `shot`.
async fn browse(url: &str, shot: &Path, profile: &Path) -> String {
    let common = |extra: &[String]| {
        let mut cmd = tokio::process::Command::new(chromium());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1400",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true);
        cmd
    };
    let dom = tokio::time::timeout(Duration::from_secs(90), common(&["--dump-dom".into()]).output())
        .await
        .expect("chromium --dump-dom did not finish within 90 s")
        .expect("run chromium");
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot_arg = format!("--screenshot={}", shot.display());
    let png = tokio::time::timeout(Duration::from_secs(90), common(&[shot_arg]).output())
        .await
        .expect("chromium --screenshot did not finish within 90 s")
        .expect("run chromium");
    assert!(
        png.status.success(),
        "chromium screenshot failed: {}",
        String::from_utf8_lossy(&png.stderr)
    );
    let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "the screenshot {} is missing or empty ({size} bytes)",
        shot.display()
    );
    without_scripts(&String::from_utf8_lossy(&dom.stdout))
}

/// The DOM without its `<script>` elements: the assertions look at what the page rendered, not
/// at the templates in its source.
fn without_scripts(dom: &str) -> String {
    let mut out = String::with_capacity(dom.len());
    let mut rest = dom;
    while let Some(start) = rest.find("<script") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</script>") {
            Some(end) => rest = &rest[start + end + "</script>".len()..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// An HTTP server whose every response takes `delay`: an image from it keeps the page loading
/// (and headless Chromium's virtual clock paused) while the page's WebSocket talks in real time.
async fn hold_server(delay: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(delay).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    port
}

/// An HTTP server on 127.0.0.1 (the dashboard's site: browsers ignore ports when they compare
/// sites) whose every response is `html`.
async fn page_server(html: String) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let html = std::sync::Arc::new(html);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    html.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(html.as_bytes()).await;
            });
        }
    });
    port
}

/// Where a screenshot named `name` is kept after the test: `$CARGO_TARGET_DIR/herald-it/` when
/// that is set, else `herald-it/` in the target dir holding the `herald` binary under test.
fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // .../target/<profile>/herald -> .../target
            Path::new(env!("CARGO_BIN_EXE_herald"))
                .parent()?
                .parent()
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(std::env::temp_dir);
    let dir = target.join("herald-it");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(name);
    // A screenshot from an earlier run must not pass the size check for this one.
    let _ = std::fs::remove_file(&path);
    path
}

fn tmp() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("herald-browser-")
        .tempdir()
        .unwrap();
    if keep_dirs() {
        eprintln!("browser test dir: {}", t.path().display());
    }
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_cluster_and_looks_up_a_user() {
    let t = tmp();
    let dir = t.path().join("herald-dev");
    let dev = dev_up(&dir).await;
    let s = &dev.summary;
    let token = s["admin_token"].as_str().unwrap().to_string();
    let admin = s["admin"][0].as_str().unwrap().to_string();
    let grpc = s["grpc"][0].as_str().unwrap().to_string();
    // Something to find: a message waiting for alice.
    let mut g = connect(&grpc).await.unwrap();
    let mut req = tonic::Request::new(pb::PushRequest {
        app: "demo".into(),
        targets: vec![pb::Target {
            user: "alice".into(),
            devices: vec![],
        }],
        payload: b"hello from the dashboard test".to_vec().into(),
        qos: pb::Qos::AtLeastOnce as i32,
        ..Default::default()
    });
    req.metadata_mut().insert("x-herald-app", "demo".parse().unwrap());
    req.metadata_mut().insert(
        "x-herald-api-key",
        s["api_key"].as_str().unwrap().parse().unwrap(),
    );
    g.push(req).await.unwrap();

    // A token in the URL opens nothing: the page shows its login form and no data.
    let url = format!("http://{admin}/?token={token}&app=demo&user=alice");
    let shot = screenshot_path("dashboard-login.png");
    let dom = browse(&url, &shot, &t.path().join("profile-url-token")).await;
    assert!(
        dom.contains("id=\"auth\" style=\"display: block;\""),
        "the login form is not shown: {dom}"
    );
    assert!(dom.contains("data-loaded=\"false\""), "{dom}");
    assert_eq!(dom.matches("class=\"member\"").count(), 0, "{dom}");

    // Logging in as a person does: the dashboard's own form, posted (here by a page that fills it
    // in and submits it), then the dashboard again with its session cookie. `next` brings back
    // `app` and `user`, which make the page fill its lookup form and press its button.
    let page = http_get(&admin, "/", None).await.unwrap().body;
    assert!(page.contains("<form id=\"auth-form\" method=\"post\" action=\"/login\">"));
    let login = format!(
        "<!doctype html><html><body><form method=\"post\" action=\"http://{admin}/login\">\
         <input name=\"token\" value=\"{token}\"><input name=\"next\" value=\"/?app=demo&amp;user=alice\">\
         </form><script>document.forms[0].submit();</script></body></html>"
    );
    let url = format!("http://127.0.0.1:{}/login.html", page_server(login).await);
    let shot = screenshot_path("dashboard.png");
    let dom = eventually("the dashboard to render the cluster", NODE_WAIT, || async {
        let dom = browse(&url, &shot, &t.path().join("profile")).await;
        if dom.contains("data-loaded=\"true\"") && dom.contains("id=\"user-status\"") {
            Ok(dom)
        } else {
            bail!("not rendered yet")
        }
    })
    .await;
    assert!(dom.contains(">3 members<"), "{dom}");
    assert_eq!(dom.matches("class=\"member\"").count(), 3, "{dom}");
    // The Raft groups table: herald dev runs one group (no --shards), with its leader.
    assert!(dom.contains(">one group<"), "{dom}");
    assert_eq!(dom.matches("class=\"group\"").count(), 1, "{dom}");
    assert!(
        !dom.contains("data-leader=\"0\""),
        "the group has a leader: {dom}"
    );
    assert!(dom.contains("leader: node "), "{dom}");
    assert_eq!(
        dom.matches("leader-badge").count(),
        1,
        "exactly one leader: {dom}"
    );
    assert_eq!(
        dom.matches("class=\"chart\"").count(),
        3,
        "a chart per node: {dom}"
    );
    assert!(dom.contains("data-app=\"demo\""), "{dom}");
    // The lookup went through the form's submit handler, which read the filled-in inputs.
    assert!(
        dom.contains("id=\"lookup-form\" data-submitted=\"demo/alice\""),
        "the lookup form was not submitted: {dom}"
    );
    assert!(dom.contains("alice in demo is"), "{dom}");
    assert!(
        dom.contains("hello from the dashboard test"),
        "the pending message: {dom}"
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_browser_example_connects_shows_a_push_and_acks_it() {
    let t = tmp();
    let dir = t.path().join("herald-dev");
    let dev = dev_up(&dir).await;
    let s = &dev.summary;
    let ws = s["ws"][1].as_str().unwrap().to_string();
    let grpc = s["grpc"][0].as_str().unwrap().to_string();
    let token = s["demo_token"].as_str().unwrap().to_string();
    let api_key = s["api_key"].as_str().unwrap().to_string();
    fn with_key<T>(msg: T, api_key: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("x-herald-app", "demo".parse().unwrap());
        r.metadata_mut()
            .insert("x-herald-api-key", api_key.parse().unwrap());
        r
    }
    let request = |msg| with_key(msg, &api_key);
    let status_request = |msg| with_key(msg, &api_key);
    let mut g = connect(&grpc).await.unwrap();
    g.push(request(pb::PushRequest {
        app: "demo".into(),
        targets: vec![pb::Target {
            user: "alice".into(),
            devices: vec![],
        }],
        payload: "hello, browser ✓".as_bytes().to_vec().into(),
        qos: pb::Qos::AtLeastOnce as i32,
        ..Default::default()
    }))
    .await
    .unwrap();

    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/browser/index.html");
    let page = page.canonicalize().expect("examples/browser/index.html");
    // A copy of the page that also loads a slow image, so the DOM is dumped after the page had a
    // few real seconds to connect, get the push and ack it.
    let hold = hold_server(Duration::from_secs(4)).await;
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("</body>"));
    let html = html.replacen(
        "</body>",
        &format!("<img src=\"http://127.0.0.1:{hold}/hold\" alt=\"\" style=\"display:none\">\n</body>"),
        1,
    );
    let page = t.path().join("index.html");
    std::fs::write(&page, html).unwrap();
    let url = format!(
        "file://{}?ws=ws://{ws}&app=demo&user=alice&device=browser-example&token={token}",
        page.display()
    );
    let shot = screenshot_path("browser-example.png");
    let dom = browse(&url, &shot, &t.path().join("profile")).await;
    assert!(dom.contains("connected as alice on node 2"), "{dom}");
    assert!(dom.contains("hello, browser ✓"), "{dom}");
    assert!(dom.contains("data-seq=\"1\""), "{dom}");
    assert!(dom.contains("acked up to seq 1"), "{dom}");

    // The ack reached the cluster: the example's device acked seq 1 and the mailbox is empty.
    eventually("the browser's ack to commit", NODE_WAIT, || async {
        let mut g = connect(&grpc).await?;
        let st = g
            .status(status_request(pb::StatusRequest {
                app: "demo".into(),
                user: "alice".into(),
            }))
            .await?
            .into_inner();
        if st.pending == 0
            && st
                .devices
                .iter()
                .any(|d| d.device == "browser-example" && d.acked >= 1)
        {
            Ok(())
        } else {
            bail!("{st:?}")
        }
    })
    .await;
    eprintln!("browser example screenshot: {}", shot.display());
}
