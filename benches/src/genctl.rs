//! The parent's side of the load generators: start `herald-bench gen` subprocesses, send them
//! commands, gather their answers and show progress.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

use crate::gen::{Cmd, ConnSpec, Envelope, GenStats, Reply, StormReport, StormSpec};
use crate::stats;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// One generator process.
pub struct Gen {
    pub pid: u32,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    next: AtomicU64,
    /// Progress reported by the command running now.
    progress: Arc<AtomicU64>,
    _child: Child,
}

impl Gen {
    pub async fn spawn() -> Result<Gen> {
        let me = std::env::current_exe()?;
        let mut child = Command::new(me)
            .arg("gen")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a generator process")?;
        let pid = child.id().context("generator has no pid")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let pending: Pending = Arc::default();
        let progress = Arc::new(AtomicU64::new(0));
        {
            let (pending, progress) = (pending.clone(), progress.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(env) = serde_json::from_str::<Envelope<Reply>>(&line) else {
                        eprintln!("generator said: {line}");
                        continue;
                    };
                    if let Reply::Progress { n } = env.body {
                        progress.store(n, Ordering::Relaxed);
                        continue;
                    }
                    if let Some(tx) = pending.lock().expect("not poisoned").remove(&env.id) {
                        let _ = tx.send(env.body);
                    }
                }
                // The process is gone: fail whatever waits.
                pending.lock().expect("not poisoned").clear();
            });
        }
        Ok(Gen {
            pid,
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            next: AtomicU64::new(1),
            progress,
            _child: child,
        })
    }

    pub async fn call(&self, cmd: Cmd) -> Result<Reply> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("not poisoned").insert(id, tx);
        let mut line = serde_json::to_vec(&Envelope { id, body: cmd })?;
        line.push(b'\n');
        {
            let mut w = self.stdin.lock().await;
            w.write_all(&line).await?;
            w.flush().await?;
        }
        match rx.await {
            Ok(Reply::Error(e)) => bail!("generator {}: {e}", self.pid),
            Ok(r) => Ok(r),
            Err(_) => bail!("generator {} exited", self.pid),
        }
    }

    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }
}

/// Several generators used as one.
pub struct Gens {
    pub gens: Vec<Arc<Gen>>,
    /// Connections opened so far (the next global connection index).
    pub opened: usize,
}

/// Totals of an `open` over all generators.
#[derive(Debug, Default)]
pub struct Opened {
    pub held: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

pub fn bar(len: u64, msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.into());
    pb
}

/// A bar that counts seconds of a timed phase.
pub fn timer(seconds: f64, msg: impl Into<String>) -> ProgressBar {
    let pb = bar(seconds.ceil() as u64, msg);
    pb.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:40}] {pos}/{len} s")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

impl Gens {
    pub async fn spawn(n: usize) -> Result<Gens> {
        let mut gens = Vec::new();
        for _ in 0..n.max(1) {
            gens.push(Arc::new(Gen::spawn().await?));
        }
        Ok(Gens { gens, opened: 0 })
    }

    /// Opens `count` more connections of `spec`, split evenly over the generators, each running
    /// `concurrency` handshakes at a time.
    pub async fn open(
        &mut self,
        spec: &ConnSpec,
        count: usize,
        concurrency: usize,
        msg: &str,
    ) -> Result<Opened> {
        let n = self.gens.len();
        let pb = bar(count as u64, msg.to_string());
        let mut calls = Vec::new();
        let mut from = self.opened;
        for (k, g) in self.gens.iter().enumerate() {
            let c = count / n + usize::from(k < count % n);
            let g = g.clone();
            let cmd = Cmd::Open {
                spec: spec.clone(),
                from,
                count: c,
                concurrency,
            };
            from += c;
            calls.push(tokio::spawn(async move { g.call(cmd).await }));
        }
        self.opened = from;
        let mut total = Opened::default();
        let all = futures::future::join_all(calls);
        tokio::pin!(all);
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    pb.set_position(self.gens.iter().map(|g| g.progress()).sum());
                }
            }
        };
        pb.finish_and_clear();
        for r in results {
            match r?? {
                Reply::Opened {
                    held,
                    failed,
                    first_error,
                } => {
                    total.held += held;
                    total.failed += failed;
                    if total.first_error.is_none() {
                        total.first_error = first_error;
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Ok(total)
    }

    /// Every generator's counters, summed; latency histograms merged.
    pub async fn stats(&self, reset: bool) -> Result<(GenStats, Histogram<u64>)> {
        let calls = self.gens.iter().map(|g| g.call(Cmd::Stats { reset }));
        let mut sum = GenStats::default();
        let mut h = stats::new_histogram();
        for r in futures::future::join_all(calls).await {
            match r? {
                Reply::Stats(s) => {
                    sum.held += s.held;
                    sum.deliveries += s.deliveries;
                    sum.ended += s.ended;
                    stats::add_buckets(&mut h, &s.hist);
                    if sum.first_error.is_none() {
                        sum.first_error = s.first_error;
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Ok((sum, h))
    }

    /// Runs the churn loop on every generator; returns (connects, failed, latency, first error).
    pub async fn churn(
        &self,
        spec: &ConnSpec,
        workers: usize,
        seconds: f64,
    ) -> Result<(u64, u64, Histogram<u64>, Option<String>)> {
        let n = self.gens.len();
        let mut calls = Vec::new();
        let mut from = 0;
        for (k, g) in self.gens.iter().enumerate() {
            let w = workers / n + usize::from(k < workers % n);
            calls.push(g.call(Cmd::Churn {
                spec: spec.clone(),
                from,
                workers: w,
                seconds,
            }));
            from += w;
        }
        let pb = timer(seconds, "connect churn");
        let all = futures::future::join_all(calls);
        tokio::pin!(all);
        let t0 = std::time::Instant::now();
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                _ = tokio::time::sleep(Duration::from_millis(250)) => pb.set_position(t0.elapsed().as_secs()),
            }
        };
        pb.finish_and_clear();
        let (mut c, mut f, mut h, mut err) = (0, 0, stats::new_histogram(), None);
        for r in results {
            match r? {
                Reply::Churned {
                    connects,
                    failed,
                    hist,
                    first_error,
                } => {
                    c += connects;
                    f += failed;
                    stats::add_buckets(&mut h, &hist);
                    if err.is_none() {
                        err = first_error;
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Ok((c, f, h, err))
    }

    /// Starts `count` SDK clients split over the generators.
    pub async fn storm_start(
        &self,
        spec: &StormSpec,
        count: usize,
    ) -> Result<(u64, u64, u64, Option<String>)> {
        let n = self.gens.len();
        let pb = bar(count as u64, "sdk clients on the node");
        let mut calls = Vec::new();
        let mut from = 0;
        for (k, g) in self.gens.iter().enumerate() {
            let c = count / n + usize::from(k < count % n);
            let g = g.clone();
            let cmd = Cmd::Storm {
                spec: spec.clone(),
                from,
                count: c,
            };
            from += c;
            calls.push(tokio::spawn(async move { g.call(cmd).await }));
        }
        let all = futures::future::join_all(calls);
        tokio::pin!(all);
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    pb.set_position(self.gens.iter().map(|g| g.progress()).sum());
                }
            }
        };
        pb.finish_and_clear();
        let (mut s, mut f, mut rt, mut err) = (0, 0, 0, None);
        for r in results {
            match r?? {
                Reply::StormStarted {
                    started,
                    failed,
                    retries,
                    first_error,
                } => {
                    s += started;
                    f += failed;
                    rt += retries;
                    if err.is_none() {
                        err = first_error;
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Ok((s, f, rt, err))
    }

    pub async fn storm_report(&self) -> Result<StormReport> {
        let mut all = StormReport::default();
        for r in futures::future::join_all(self.gens.iter().map(|g| g.call(Cmd::StormReport))).await {
            match r? {
                Reply::Storm(s) => {
                    all.clients += s.clients;
                    all.connected_ns.extend(s.connected_ns);
                    all.connected_node.extend(s.connected_node);
                    all.received.extend(s.received);
                    all.app_duplicates += s.app_duplicates;
                    all.gaps += s.gaps;
                    if all.first_error.is_none() {
                        all.first_error = s.first_error;
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Ok(all)
    }

    /// SDK clients connected (again) since `since_ns`.
    pub async fn storm_connected(&self, since_ns: u64) -> Result<u64> {
        let mut n = 0;
        for r in futures::future::join_all(self.gens.iter().map(|g| g.call(Cmd::StormConnected { since_ns })))
            .await
        {
            match r? {
                Reply::Count(c) => n += c,
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Ok(n)
    }

    pub async fn close_all(&self) {
        let _ = futures::future::join_all(self.gens.iter().map(|g| g.call(Cmd::CloseAll))).await;
    }
}
