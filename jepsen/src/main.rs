//! `herald-jepsen`: run Herald's fault suite. See jepsen/README.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use herald_jepsen::cluster::NodeOpts;
use herald_jepsen::nemesis::{Fault, Timing};
use herald_jepsen::runner::{self, RunOpts};
use herald_jepsen::{bugbuild, checker, history, net, powerfs, proxy, workload};

#[derive(Parser)]
#[command(
    name = "herald-jepsen",
    about = "Herald's fault suite: real nodes in network namespaces, nemeses, SDK clients, histories, checkers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Re-run the checkers on a run's history (DIR/history.jsonl); rewrites nothing.
    Check {
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Search budget (states explored) of the linearizability checker per user.
        #[arg(long, default_value_t = checker::DEFAULT_WGL_BUDGET)]
        wgl_budget: u64,
    },
    /// Remove namespaces and interfaces left by crashed runs.
    Cleanup,
    /// (internal) a node's powerfs disk: a FUSE passthrough of BACKING at MOUNT that loses
    /// unsynced writes on `cut` (control socket); unmounts when stdin closes.
    #[command(hide = true)]
    Powerfs {
        #[arg(long)]
        backing: PathBuf,
        #[arg(long)]
        mount: PathBuf,
        #[arg(long)]
        control: PathBuf,
    },
    /// (internal) the delay/loss proxy the harness starts in each node's namespace.
    #[command(hide = true)]
    Proxy {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        to: std::net::SocketAddr,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Nodes in the cluster (3 or 5).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Seconds of workload under faults (per run).
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Faults, comma separated: kill, pause, partition (all kinds), partition-one,
    /// partition-leader, partition-halves, partition-bridge, partition-ring, delay, loss, clock,
    /// clock-hours, membership, power (all three kinds), power-one, power-minority, power-all,
    /// damage, partition-kill, pause-kill, all, none.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Workloads, comma separated: qos1, offline, registry, storm, topics, mqtt, all.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Client operations per second, all workloads together.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Seed for every random choice of the harness (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Output dir of the run (default ~/.cache/herald/jepsen/<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run against a build with this injected bug: ack-before-commit, skip-fsync, stale-registry,
    /// leader-clock.
    #[arg(long)]
    bug: Option<String>,
    /// The herald binary (default: `herald` next to this executable).
    #[arg(long)]
    herald_bin: Option<PathBuf>,
    /// CI mode: a fixed set of short runs (about 3 minutes in all).
    #[arg(long)]
    short: bool,
    /// The long matrix (one run per nemesis group and workload, --time seconds each).
    #[arg(long)]
    long: bool,
    /// Build each bugged binary and show that the suite catches it.
    #[arg(long)]
    bugs: bool,
    /// Longest drain after heal, in seconds.
    #[arg(long, default_value_t = 120)]
    drain: u64,
    /// Minimum share of ok writes on the majority side during faults.
    #[arg(long, default_value_t = 0.5)]
    availability_min: f64,
    /// Search budget (states explored) of the linearizability checker per user; a user whose
    /// search runs out is reported unknown, not valid.
    #[arg(long, default_value_t = checker::DEFAULT_WGL_BUDGET)]
    wgl_budget: u64,
    /// Healthy time between faults, ms (min-max).
    #[arg(long, default_value = "4000-8000")]
    quiet_ms: String,
    /// How long a fault holds, ms (min-max).
    #[arg(long, default_value = "6000-12000")]
    hold_ms: String,
    /// The first fault of the run (one of the --nemesis names), whatever the draw.
    #[arg(long)]
    first_fault: Option<String>,
    /// Data dirs on plain directories instead of powerfs disks: a power cut is then only a
    /// SIGKILL, which loses nothing the kernel has (needs no FUSE).
    #[arg(long)]
    no_powerfs: bool,
    /// ID=MS: every fsync on node ID's powerfs disk takes MS milliseconds (a slow disk: a wider
    /// window in which what it wrote is readable, and replicated, and not yet durable).
    #[arg(long)]
    slow_disk: Option<String>,
    /// Shard groups of the cluster (`herald node --shards`; 0: one Raft group). The checkers
    /// judge per user and per topic, so they hold across shards as they do in one group.
    #[arg(long, default_value_t = 0)]
    shards: u32,
}

fn range(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s.split_once('-').context("expected MIN-MAX")?;
    let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
    if a > b {
        bail!("MIN above MAX in {s:?}");
    }
    Ok((a, b))
}

fn single_fault(name: &str, nodes: u64) -> anyhow::Result<Fault> {
    match Fault::parse_list(name, nodes)?.as_slice() {
        [f] => Ok(*f),
        _ => bail!("--first-fault takes one fault, not {name:?}"),
    }
}

fn default_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("herald");
    if !bin.exists() {
        bail!(
            "no herald binary at {} (build it with `cargo build -p herald-node --bin herald`, or pass --herald-bin)",
            bin.display()
        );
    }
    Ok(bin)
}

fn out_base() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    home.join(".cache/herald/jepsen")
        .join(format!("{stamp}-{}", std::process::id()))
}

fn workloads(s: &str) -> Vec<String> {
    if s == "all" {
        return workload::ALL.iter().map(|w| w.to_string()).collect();
    }
    s.split(',')
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

fn opts(a: &RunArgs, out: PathBuf, bin: PathBuf, command: String) -> anyhow::Result<RunOpts> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    Ok(RunOpts {
        nodes: a.nodes,
        time_s: a.time,
        nemesis: a.nemesis.clone(),
        workloads: workloads(&a.workload),
        rate: a.rate,
        seed,
        out,
        herald_bin: bin,
        bug: a.bug.clone(),
        timing: Timing {
            quiet_ms: range(&a.quiet_ms)?,
            hold_ms: range(&a.hold_ms)?,
            first: match &a.first_fault {
                Some(f) => Some(single_fault(f, a.nodes)?),
                None => None,
            },
        },
        drain_s: a.drain,
        availability_min: a.availability_min,
        wgl_budget: a.wgl_budget,
        slow_disk: match &a.slow_disk {
            Some(s) => {
                let (id, ms) = s.split_once('=').context("--slow-disk takes ID=MS")?;
                Some((id.trim().parse()?, ms.trim().parse()?))
            }
            None => None,
        },
        node_opts: NodeOpts {
            powerfs: !a.no_powerfs,
            shards: a.shards,
            ..NodeOpts::default()
        },
        command,
    })
}

/// One planned run of a suite.
struct Plan {
    name: String,
    args: RunArgs,
    /// The checker that must report a violation (bug demos), if any.
    expect: Option<Vec<&'static str>>,
}

fn plan_args(base: &RunArgs, nemesis: &str, workload: &str, time: u64) -> RunArgs {
    RunArgs {
        nemesis: nemesis.into(),
        workload: workload.into(),
        time,
        ..base.clone()
    }
}

fn short_plan(base: &RunArgs) -> Vec<Plan> {
    let fast = |mut a: RunArgs| {
        a.quiet_ms = "2000-4000".into();
        a.hold_ms = "5000-8000".into();
        a.drain = 60;
        a
    };
    vec![
        Plan {
            name: "crash-partition".into(),
            // Starts with a power cut of every node (powerfs: unsynced writes are lost).
            args: RunArgs {
                first_fault: Some("power-all".into()),
                ..fast(plan_args(
                    base,
                    "kill,pause,partition,power,damage",
                    "qos1,registry,storm",
                    45,
                ))
            },
            expect: None,
        },
        Plan {
            name: "net-clock-membership".into(),
            // Starts with one node's clock off by minutes to hours (TTLs of minutes in `offline`).
            args: RunArgs {
                first_fault: Some("clock-hours".into()),
                ..fast(plan_args(
                    base,
                    "delay,loss,clock,clock-hours,membership,partition-kill",
                    "offline,topics",
                    40,
                ))
            },
            expect: None,
        },
        Plan {
            name: "shards".into(),
            // Four shards: pushes, registrations and topics spread over four groups and their
            // leaders; kills and partitions move those leaders (and the balancer moves them back).
            args: RunArgs {
                shards: 4,
                ..fast(plan_args(
                    base,
                    "kill,partition,power-one",
                    "qos1,registry,topics",
                    40,
                ))
            },
            expect: None,
        },
    ]
}

fn long_plan(base: &RunArgs) -> Vec<Plan> {
    let t = base.time;
    [
        ("kill,pause,power,damage", "qos1,offline,topics"),
        ("partition", "qos1,registry,storm"),
        ("delay,loss,clock,clock-hours", "all"),
        ("membership,partition-kill,pause-kill", "all"),
        ("all", "all"),
    ]
    .iter()
    .map(|(n, w)| Plan {
        name: format!("{}--{}", n.replace(',', "+"), w.replace(',', "+")),
        args: plan_args(base, n, w, t),
        expect: None,
    })
    .collect()
}

fn bug_plan(base: &RunArgs) -> Vec<Plan> {
    let mut plans = Vec::new();
    let mut a = plan_args(
        base,
        "partition-one,partition-leader,partition-halves",
        "qos1",
        60,
    );
    a.bug = Some("ack-before-commit".into());
    a.hold_ms = "8000-12000".into();
    a.quiet_ms = "2000-4000".into();
    plans.push(Plan {
        name: "bug-ack-before-commit".into(),
        args: a,
        expect: Some(vec!["lost"]),
    });
    let mut a = plan_args(base, "power-all", "qos1", 90);
    a.bug = Some("skip-fsync".into());
    a.quiet_ms = "3000-6000".into();
    a.rate = a.rate.max(60.0);
    plans.push(Plan {
        name: "bug-skip-fsync".into(),
        args: a,
        expect: Some(vec!["lost", "convergence", "raft", "order", "unexpected"]),
    });
    // Long enough for the first TTLs (3 min) to come due: the sweep that expires them then runs
    // on a log time hours ahead and takes every undelivered message with it.
    let mut a = plan_args(base, "clock-hours,partition-leader", "offline", 240);
    a.bug = Some("leader-clock".into());
    a.first_fault = Some("clock-hours".into());
    plans.push(Plan {
        name: "bug-leader-clock".into(),
        args: a,
        expect: Some(vec!["lost"]),
    });
    let mut a = plan_args(base, "none", "storm", 40);
    a.bug = Some("stale-registry".into());
    plans.push(Plan {
        name: "bug-stale-registry".into(),
        args: a,
        expect: Some(vec!["fencing"]),
    });
    plans
}

async fn run_plans(plans: Vec<Plan>, base_out: PathBuf, herald_bin: Option<PathBuf>) -> anyhow::Result<bool> {
    let mut all_ok = true;
    let mut lines = Vec::new();
    for p in plans {
        let bin = match (&p.args.bug, &herald_bin) {
            (Some(bug), _) => bugbuild::build(bug)?,
            (None, Some(b)) => b.clone(),
            (None, None) => default_bin()?,
        };
        let out = base_out.join(&p.name);
        let command = format!(
            "herald-jepsen --nodes {} --time {} --nemesis {} --workload {} --rate {}{} --quiet-ms {} --hold-ms {}",
            p.args.nodes,
            p.args.time,
            p.args.nemesis,
            p.args.workload,
            p.args.rate,
            p.args.bug.as_ref().map(|b| format!(" --bug {b}")).unwrap_or_default(),
            p.args.quiet_ms,
            p.args.hold_ms
        ) + &p
            .args
            .first_fault
            .as_ref()
            .map(|f| format!(" --first-fault {f}"))
            .unwrap_or_default()
            + if p.args.no_powerfs { " --no-powerfs" } else { "" }
            + &p.args
                .slow_disk
                .as_ref()
                .map(|s| format!(" --slow-disk {s}"))
                .unwrap_or_default()
            + &match p.args.shards {
                0 => String::new(),
                s => format!(" --shards {s}"),
            };
        let o = opts(&p.args, out.clone(), bin, command)?;
        eprintln!(
            "herald-jepsen: run {} (seed {}) -> {}",
            p.name,
            o.seed,
            out.display()
        );
        let r = runner::run(o).await?;
        println!("{}", r.summary);
        let ok = match &p.expect {
            None => r.exit_code() == 0,
            Some(checkers) => checkers.iter().any(|c| r.results.count(c) > 0),
        };
        let caught: Vec<String> = r
            .results
            .checks
            .iter()
            .filter(|c| c.count > 0)
            .map(|c| format!("{}={}", c.name, c.count))
            .collect();
        lines.push(format!(
            "{:<28} {:<8} {}",
            p.name,
            if ok { "PASS" } else { "FAIL" },
            if p.expect.is_some() {
                format!("violations reported: {}", caught.join(" "))
            } else {
                format!("{:?}", r.results.valid)
            }
        ));
        all_ok &= ok;
    }
    println!("herald-jepsen suite ({}):", base_out.display());
    for l in lines {
        println!("  {l}");
    }
    Ok(all_ok)
}

async fn main_inner() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Proxy { listen, to }) => {
            proxy::serve(listen, to).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Powerfs {
            backing,
            mount,
            control,
        }) => {
            powerfs::serve(&backing, &mount, &control)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Cleanup) => {
            for r in powerfs::cleanup_stale().into_iter().chain(net::cleanup_stale()) {
                println!("removed {r}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Cmd::Check {
            dir,
            nodes,
            wgl_budget,
        }) => {
            let h = history::load(&dir.join("history.jsonl"))?;
            let ctx = checker::Context {
                nodes: (1..=nodes).collect(),
                wgl_budget,
                ..checker::Context::default()
            };
            let r = checker::check_all(&h, &ctx);
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(match r.valid {
                checker::Validity::Valid => ExitCode::SUCCESS,
                checker::Validity::Invalid => ExitCode::from(1),
                checker::Validity::Unknown => ExitCode::from(3),
            });
        }
        None => {}
    }
    let a = cli.run;
    if a.nodes < 3 {
        bail!("--nodes must be at least 3");
    }
    let base_out = a.out.clone().unwrap_or_else(out_base);
    if a.short || a.long || a.bugs {
        let plans = if a.short {
            short_plan(&a)
        } else if a.long {
            long_plan(&a)
        } else {
            bug_plan(&a)
        };
        let ok = run_plans(plans, base_out, a.herald_bin.clone()).await?;
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let bin = match (&a.bug, &a.herald_bin) {
        (Some(bug), _) => bugbuild::build(bug)?,
        (None, Some(b)) => b.clone(),
        (None, None) => default_bin()?,
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let o = opts(&a, base_out, bin, command)?;
    eprintln!("herald-jepsen: seed {} -> {}", o.seed, o.out.display());
    let r = runner::run(o).await?;
    println!("{}", r.summary);
    println!("report: {}", r.out.display());
    Ok(ExitCode::from(r.exit_code() as u8))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_JEPSEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(main_inner()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald-jepsen: {e:#}");
            ExitCode::from(2)
        }
    }
}
