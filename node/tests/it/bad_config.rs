//! `herald node` refuses bad configuration with exit code 2 and a message naming the problem,
//! and a data dir it cannot trust with a non-zero exit naming the store; never a panic.

use std::path::Path;
use std::time::Duration;

use crate::harness::{free_port, herald_with, Cluster, Output, EXIT_WAIT};

/// Runs `herald node <args>`; it must exit by itself (a node that starts would run forever).
/// Plaintext cluster traffic (`--insecure-cluster`) unless the test says otherwise: these tests
/// are about other options.
async fn node(args: &[&str]) -> Output {
    let mut all = vec!["node"];
    all.extend_from_slice(args);
    if !args
        .iter()
        .any(|a| *a == "--cluster-ca" || *a == "--insecure-cluster")
    {
        all.push("--insecure-cluster");
    }
    herald_with(&all, &[], Duration::from_secs(30)).await
}

/// Exit code 2, `needle` in stderr, no panic.
#[track_caller]
fn usage_error(out: &Output, needle: &str) {
    assert_eq!(out.code, Some(2), "exit code: {out:#?}");
    assert!(
        out.stderr.contains(needle),
        "stderr must contain {needle:?}: {out:#?}"
    );
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
}

fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_options_exit_2_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    let (a1, a2, a3) = (addr(), addr(), addr());
    // a1..a3 are the cluster planes (what --peers names); g1 and g4 public gRPC ports.
    let peers = format!("1={a1},2={a2},3={a3}");
    let (g1, g4) = (addr(), addr());

    let out = node(&[
        "--id",
        "1",
        "--grpc-addr",
        &g1,
        "--cluster-addr",
        &a1,
        "--peers",
        &peers,
    ])
    .await;
    usage_error(&out, "missing --data-dir (or HERALD_DATA_DIR");

    let out = node(&[
        "--id",
        "1",
        "--data-dir",
        data,
        "--grpc-addr",
        "nonsense",
        "--cluster-addr",
        &a1,
        "--insecure-cluster",
        "--peers",
        &peers,
    ])
    .await;
    usage_error(&out, "--grpc-addr \"nonsense\" is not a host:port address");

    let out = node(&[
        "--id",
        "1",
        "--data-dir",
        data,
        "--grpc-addr",
        &g1,
        "--cluster-addr",
        &a1,
        "--peers",
        "1=nowhere",
    ])
    .await;
    usage_error(&out, "is not a host:port address");

    let a4 = addr();
    let out = node(&[
        "--id",
        "4",
        "--data-dir",
        data,
        "--grpc-addr",
        &g4,
        "--cluster-addr",
        &a4,
        "--peers",
        &peers,
    ])
    .await;
    usage_error(&out, "--id 4 is not in --peers (1,2,3)");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a dir").unwrap();
    let file = file.to_str().unwrap();
    let out = node(&[
        "--id",
        "1",
        "--data-dir",
        file,
        "--grpc-addr",
        &g1,
        "--cluster-addr",
        &a1,
        "--peers",
        &peers,
    ])
    .await;
    usage_error(&out, "exists and is not a directory");
    assert_eq!(
        std::fs::read_to_string(file).unwrap(),
        "not a dir",
        "the file must be left alone"
    );

    let toml = tmp.path().join("herald.toml");
    std::fs::write(
        &toml,
        format!(
            "id = 1\ndata_dir = {data:?}\ngrpc_addr = {a1:?}\npeers = {peers:?}\nelection_timeout = 300\n"
        ),
    )
    .unwrap();
    let out = node(&["--config", toml.to_str().unwrap()]).await;
    usage_error(&out, "unknown field `election_timeout`");
    assert!(
        out.stderr.contains("herald.toml"),
        "the message must name the file: {out:#?}"
    );

    // clap's own usage errors use the same code.
    let out = node(&["--no-such-flag"]).await;
    usage_error(&out, "--no-such-flag");

    assert!(
        !Path::new(data).exists(),
        "a refused config must not create the data dir"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_is_a_runtime_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a1 = taken.local_addr().unwrap().to_string();
    let c1 = addr();
    let data = tmp.path().join("data");
    let out = node(&[
        "--id",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--grpc-addr",
        &a1,
        "--cluster-addr",
        &c1,
        "--peers",
        &format!("1={c1}"),
    ])
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains(&format!("cannot listen for gRPC on {a1}")),
        "{out:#?}"
    );
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    drop(taken);
}

/// Starts a one-node cluster on a fresh data dir, lets it commit, stops it cleanly.
async fn one_node_data_dir() -> Cluster {
    let mut c = Cluster::start(1).await;
    c.wait_log(1, "node announced", 1).await; // something committed and applied
    let (status, _) = c.stop(1).await;
    assert!(status.success(), "clean stop: {status}");
    c
}

/// Restarts node 1 of `c` on its (damaged) data dir; it must fail with exit code 1, stderr
/// naming the store and every `needle`, and no panic. Returns its log.
async fn start_fails(c: &mut Cluster, needles: &[&str]) -> String {
    let before = c.log_text(1).len();
    c.restart(1);
    let status = c.wait_exit(1, EXIT_WAIT).await;
    let log = c.log_text(1)[before..].to_string();
    assert_eq!(
        status.code(),
        Some(1),
        "a bad store is a runtime error (1), not a panic (101): {log}"
    );
    let error = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line on stderr: {log}"));
    for n in needles {
        assert!(error.contains(n), "{error:?} must contain {n:?}");
    }
    assert!(!log.contains("panicked"), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_raft_log_stops_the_node_with_an_error() {
    let mut c = one_node_data_dir().await;
    let current = c.data_dir(1).join("raft-log").join("CURRENT");
    assert!(
        current.is_file(),
        "{} missing: the store layout changed",
        current.display()
    );
    std::fs::write(&current, b"\x00garbage\xff\n").unwrap();
    start_fails(&mut c, &["cannot start raft", "raft-log", "Corruption"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_state_machine_stops_the_node_with_an_error() {
    let mut c = one_node_data_dir().await;
    let current = c.data_dir(1).join("sm").join("CURRENT");
    assert!(
        current.is_file(),
        "{} missing: the store layout changed",
        current.display()
    );
    std::fs::write(&current, b"garbage\n").unwrap();
    start_fails(&mut c, &["cannot start raft", "corrupt data in", "CURRENT"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_reachable_from_other_machines_needs_an_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data = data.to_str().unwrap();
    let port = free_port();
    let advertised = format!("127.0.0.1:{port}");
    let all_interfaces = format!("0.0.0.0:{port}");
    let cluster = addr();
    let peers = format!("1={cluster}");
    let public_grpc = [
        "--id",
        "1",
        "--data-dir",
        data,
        "--grpc-addr",
        &all_interfaces,
        "--advertise-grpc-addr",
        &advertised,
        "--cluster-addr",
        &cluster,
        "--insecure-cluster",
        "--peers",
        &peers,
    ];
    let out = node(&public_grpc).await;
    usage_error(&out, "--grpc-addr 0.0.0.0:");
    usage_error(&out, "--admin-token (or HERALD_ADMIN_TOKEN");
    // The admin HTTP server counts like any listener.
    let a1 = addr();
    let admin = format!("0.0.0.0:{}", free_port());
    let out = node(&[
        "--id",
        "1",
        "--data-dir",
        data,
        "--grpc-addr",
        &a1,
        "--cluster-addr",
        &cluster,
        "--peers",
        &peers,
        "--admin-addr",
        &admin,
    ])
    .await;
    usage_error(&out, &format!("--admin-addr {admin}"));
    // An empty token is no token.
    let out = herald_with(
        &[&["node"][..], &public_grpc[..]].concat(),
        &[("HERALD_ADMIN_TOKEN", "")],
        Duration::from_secs(30),
    )
    .await;
    usage_error(&out, "--admin-token");
    assert!(!Path::new(data).exists(), "nothing created");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loopback_node_without_an_admin_token_starts_and_warns() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let (a1, c1) = (addr(), addr());
    let mut cmd = tokio::process::Command::new(crate::harness::herald_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HERALD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .args([
            "node",
            "--id",
            "1",
            "--grpc-addr",
            &a1,
            "--cluster-addr",
            &c1,
            "--insecure-cluster",
            "--peers",
            &format!("1={c1}"),
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("run herald");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for r in [
        Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    let mut seen = Vec::new();
    let warned = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = rx.recv().await {
            let hit = l.contains("WARN") && l.contains("no admin token");
            seen.push(l);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert_eq!(
        warned,
        Ok(true),
        "no warning about the open admin calls in: {seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.contains("HERALD_ADMIN_TOKEN")),
        "the warning names the variable: {seen:#?}"
    );
}
