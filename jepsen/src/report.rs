//! `results.json` and `summary.txt` of a run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::checker::availability::windows;
use crate::checker::{Results, Validity};
use crate::history::{pairs, Op, Type, F};
use crate::runner::RunOpts;

/// Counts of client operations by kind and outcome.
pub fn op_counts(history: &[Op]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for p in pairs(history) {
        if matches!(p.invoke.f, F::Nemesis | F::Phase) {
            continue;
        }
        let f = serde_json::to_value(p.invoke.f)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let t = match p.outcome() {
            Type::Ok => "ok",
            Type::Fail => "fail",
            _ => "info",
        };
        *out.entry(f).or_default().entry(t.into()).or_default() += 1;
    }
    let recv = history.iter().filter(|o| o.f == F::Recv).count() as u64;
    out.entry("recv".into()).or_default().insert("ok".into(), recv);
    out
}

/// Writes the report files and returns the summary text.
pub fn write(out: &Path, opts: &RunOpts, history: &[Op], results: &Results) -> anyhow::Result<String> {
    let ws = windows(history);
    let fault_s: f64 = ws
        .iter()
        .map(|w| (w.end_us.saturating_sub(w.start_us)) as f64 / 1e6)
        .sum();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    for w in &ws {
        *faults.entry(w.fault.clone()).or_default() += 1;
    }
    let counts = op_counts(history);
    let client_ops: u64 = counts
        .iter()
        .filter(|(f, _)| f.as_str() != "recv")
        .flat_map(|(_, m)| m.values())
        .sum();
    let duration_s = history.last().map(|o| o.time_us as f64 / 1e6).unwrap_or(0.0);
    let doc = json!({
        "command": opts.command,
        "nodes": opts.nodes,
        "time_s": opts.time_s,
        "nemesis": opts.nemesis,
        "workloads": opts.workloads,
        "rate": opts.rate,
        "seed": opts.seed,
        "bug": opts.bug,
        "herald_bin": opts.herald_bin.display().to_string(),
        "duration_s": duration_s,
        "history_lines": history.len(),
        "client_operations": client_ops,
        "operations": counts,
        "fault_windows": ws.len(),
        "fault_seconds": fault_s,
        "faults": faults,
        "valid": results.valid,
        "checks": results.checks,
    });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&doc)?)?;

    let mut s = String::new();
    let verdict = match results.valid {
        Validity::Valid => "VALID",
        Validity::Invalid => "INVALID",
        Validity::Unknown => "UNKNOWN",
    };
    let _ = writeln!(s, "herald-jepsen run: {verdict}");
    let _ = writeln!(s, "  command:   {}", opts.command);
    let _ = writeln!(
        s,
        "  nodes {}, {} s of faults requested, nemesis {}, workloads {}, rate {}/s, seed {}{}",
        opts.nodes,
        opts.time_s,
        opts.nemesis,
        opts.workloads.join(","),
        opts.rate,
        opts.seed,
        opts.bug
            .as_ref()
            .map(|b| format!(", BUG {b}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  {duration_s:.0} s in all; {} fault windows, {fault_s:.0} s under faults: {faults:?}",
        ws.len()
    );
    let _ = writeln!(s, "  client operations: {client_ops}");
    for (f, m) in &counts {
        let _ = writeln!(s, "    {f:<12} {m:?}");
    }
    let _ = writeln!(s, "  checks:");
    for c in &results.checks {
        let v = match c.valid {
            Validity::Valid => "ok",
            Validity::Invalid => "VIOLATED",
            Validity::Unknown => "unknown",
        };
        let _ = writeln!(
            s,
            "    {:<13} {v:<9} {} violation(s)  {}",
            c.name, c.count, c.stats
        );
        for ex in c.violations.iter().take(5) {
            let _ = writeln!(
                s,
                "        - {}: {} (history lines {:?})",
                ex.kind, ex.detail, ex.ops
            );
        }
    }
    std::fs::write(out.join("summary.txt"), &s)?;
    Ok(s)
}
