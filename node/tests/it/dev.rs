//! `herald dev --detach`: a local 3-node cluster that starts, prints its summary, serves pushes,
//! stops on SIGTERM and, started again on the same dir, reuses its data.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::{failure_log_lines, free_port_block, herald, herald_with, print_log_tail};

/// Kills what `herald dev --detach` left running under `dir` when the test ends, however it
/// ends: the pids in `dev.json`, and any process whose command line names `dir` (in case `dev`
/// died before writing `dev.json`). Prints the node logs if the test failed.
struct DevGuard {
    dir: PathBuf,
}

impl Drop for DevGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=3 {
                print_log_tail(
                    &format!("dev node {i}"),
                    &self.dir.join(format!("node-{i}.log")),
                    failure_log_lines(),
                );
            }
        }
        for pid in processes_naming(&self.dir) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Processes (other than this one) whose command line mentions `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// True once `pid` is gone (or a zombie nobody reaped yet: it has exited).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
    }
}

/// SIGTERM to `pids`; each must be gone within 15 s.
async fn stop(pids: &[u32]) {
    for pid in pids {
        kill(Pid::from_raw(*pid as i32), Signal::SIGTERM).unwrap_or_else(|e| panic!("SIGTERM to {pid}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pids.iter().all(|p| exited(*p)) {
        assert!(
            Instant::now() < deadline,
            "dev nodes {pids:?} still running 15 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `herald dev --detach` on `dir`; checks the printed summary against `dev.json`.
async fn dev_up(dir: &Path, base: u16) -> Value {
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
    assert_eq!(out.code, Some(0), "herald dev failed: {out:#?}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).expect("dev.json"))
            .expect("dev.json is JSON");
    let grpc: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let client: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:{}", base + 10 + i)).collect();
    assert_eq!(summary["grpc"], serde_json::json!(grpc), "{summary}");
    assert_eq!(summary["client"], serde_json::json!(client), "{summary}");
    if let Some(tls) = summary.get("tls") {
        let expected: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:{}", base + 20 + i)).collect();
        assert_eq!(tls, &serde_json::json!(expected), "{summary}");
    }
    assert_eq!(summary["app"], "demo");
    assert_eq!(summary["pids"].as_array().map(Vec::len), Some(3), "{summary}");
    let s = |k: &str| summary[k].as_str().unwrap_or_default().to_string();
    let stdout = &out.stdout;
    assert!(stdout.contains("herald dev cluster is up (3 nodes"), "{stdout}");
    assert!(
        stdout.contains(&format!("gRPC API:     {}", grpc.join(" "))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("client (TCP): {}", client.join(" "))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("admin token:  {}", s("admin_token"))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("(api key {})", s("api_key"))),
        "{stdout}"
    );
    assert!(stdout.contains(&s("demo_token")), "{stdout}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    herald_node::token::verify(&s("demo_token"), &[s("app_secret")], "demo", "alice", "", now)
        .unwrap_or_else(|e| panic!("the demo token does not verify: {e}"));
    summary
}

fn pids(summary: &Value) -> Vec<u32> {
    summary["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect()
}

/// `herald push` as printed in the summary; returns alice's seq.
async fn push(summary: &Value, via: usize) -> u64 {
    let server = summary["grpc"][via].as_str().unwrap();
    let key = summary["api_key"].as_str().unwrap();
    let out = herald(&[
        "push",
        "--server",
        server,
        "--app",
        "demo",
        "--api-key",
        key,
        "--user",
        "alice",
        "--payload",
        "hello",
    ])
    .await
    .ok();
    let r = out.json();
    assert_eq!(r["seqs"][0]["user"], "alice", "{r}");
    r["seqs"][0]["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_detach_starts_serves_stops_and_reuses_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("herald-dev");
    let _guard = DevGuard { dir: dir.clone() };
    // dev uses base+1..=3 (gRPC), base+11..=13 (TCP clients) and base+21..=23 (TLS clients).
    // ... plus base+31..=33 (admin HTTP) and base+41..=43 (WebSocket clients).
    let base = free_port_block(50);

    let first = dev_up(&dir, base).await;
    assert_eq!(push(&first, 0).await, 1);
    assert_eq!(push(&first, 2).await, 2);
    stop(&pids(&first)).await;
    for i in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("node-{i}.log"))).unwrap();
        assert!(
            log.contains("node stopped"),
            "node {i} did not stop cleanly: {log}"
        );
        assert!(!log.contains("panicked"), "node {i}: {log}");
    }

    let second = dev_up(&dir, base).await;
    assert_eq!(second["api_key"], first["api_key"], "a second run reuses the app");
    assert_eq!(second["admin_token"], first["admin_token"]);
    assert_ne!(pids(&second), pids(&first));
    assert_eq!(push(&second, 1).await, 3, "alice's mailbox survived the restart");
    stop(&pids(&second)).await;
}
