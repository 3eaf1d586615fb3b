//! A private MariaDB server for the archive tests: its own data dir under a temp dir, its own
//! loopback port, no grant tables (any user connects), killed when the test ends.
//!
//! Needs Debian's `mariadb-server` (`mariadb-install-db` and `mariadbd`); `scripts/test` installs it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tempfile::TempDir;

use crate::harness::free_port;

pub struct MariaDb {
    dir: TempDir,
    pub port: u16,
    child: Option<Child>,
}

/// The first of `names` found in PATH, /usr/sbin or /usr/bin.
fn find(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

impl MariaDb {
    /// Initializes a data dir and starts the server; waits until it answers.
    pub async fn start() -> MariaDb {
        let install = find(&["mariadb-install-db", "mysql_install_db"]).unwrap_or_else(|| {
            panic!("mariadb-install-db not found: the archive tests need a MariaDB server; install it with `apt-get install mariadb-server` (scripts/test does)")
        });
        let dir = tempfile::Builder::new()
            .prefix("herald-mdb-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let mut cmd = Command::new(&install);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if is_root() {
            cmd.arg("--user=root");
        }
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = MariaDb {
            dir,
            port: free_port(),
            child: None,
        };
        db.run().await;
        db.exec("CREATE DATABASE IF NOT EXISTS herald").await;
        db
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server on the existing data dir and port; waits until it answers.
    pub async fn run(&mut self) {
        assert!(self.child.is_none(), "mariadb already runs");
        let server = find(&["mariadbd", "mysqld"]).unwrap_or_else(|| {
            panic!("mariadbd not found: install it with `apt-get install mariadb-server` (scripts/test does)")
        });
        let data = self.data();
        let mut cmd = Command::new(server);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!(
                "--socket={}",
                self.dir.path().join("mysqld.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mysqld.pid").display()
            ))
            .arg(format!(
                "--log-error={}",
                self.dir.path().join("error.log").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-grant-tables")
            .arg("--skip-log-bin")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--innodb-log-file-size=16M")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.arg("--user=root");
        }
        self.child = Some(cmd.spawn().expect("start mariadbd"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.ping().await {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("mariadbd exited with {status}: {}", self.error_log());
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not answer within 60 s: {}",
                self.error_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL (the server goes away at once, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/herald", self.port)
    }

    fn server_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    async fn ping(&self) -> bool {
        let Ok(opts) = mysql_async::Opts::from_url(&self.server_url()) else {
            return false;
        };
        let try_it = async {
            let mut c = mysql_async::Conn::new(opts).await?;
            c.query_drop("SELECT 1").await?;
            c.disconnect().await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), try_it).await,
            Ok(Ok(()))
        )
    }

    /// Runs one statement (on the server, no database selected).
    pub async fn exec(&self, sql: &str) {
        let mut c = mysql_async::Conn::new(mysql_async::Opts::from_url(&self.server_url()).unwrap())
            .await
            .expect("connect to mariadb");
        c.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = c.disconnect().await;
    }

    /// Rows of the archive table as (app, user, seq, outcome, payload), by (app, user, seq).
    pub async fn rows(&self) -> Vec<(String, String, u64, String, String)> {
        let mut c = mysql_async::Conn::new(mysql_async::Opts::from_url(&self.url()).unwrap())
            .await
            .expect("connect to mariadb");
        let exists: Option<u64> = c
            .query_first("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema='herald' AND table_name='herald_archive'")
            .await
            .unwrap();
        if exists.unwrap_or(0) == 0 {
            return Vec::new();
        }
        let rows: Vec<RawRow> = c
            .query("SELECT app_id, user_id, seq, outcome, payload FROM herald_archive ORDER BY app_id, user_id, seq")
            .await
            .unwrap();
        let _ = c.disconnect().await;
        rows.into_iter()
            .map(|(a, u, s, o, p)| {
                (
                    String::from_utf8_lossy(&a).into_owned(),
                    String::from_utf8_lossy(&u).into_owned(),
                    s,
                    o,
                    String::from_utf8_lossy(&p).into_owned(),
                )
            })
            .collect()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `herald_archive` row as MySQL returns it: (app, user, seq, outcome, payload).
type RawRow = (Vec<u8>, Vec<u8>, u64, String, Vec<u8>);
