//! SVG plots of a run: write latency over time and throughput over time, with the fault windows
//! shaded. Plain SVG written by hand, so the suite needs no plotting library.

use std::fmt::Write as _;
use std::path::Path;

use crate::checker::availability::{windows, Window};
use crate::history::{pairs, Op, Type, F};

const W: f64 = 1000.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

/// One completed write: (start s, latency ms, outcome).
fn writes(history: &[Op]) -> Vec<(f64, f64, Type)> {
    pairs(history)
        .into_iter()
        .filter(|p| {
            matches!(
                p.invoke.f,
                F::Push | F::Publish | F::Broadcast | F::Kick | F::Status
            )
        })
        .filter_map(|p| {
            let end = p.end_us()?;
            Some((
                p.invoke.time_us as f64 / 1e6,
                (end.saturating_sub(p.invoke.time_us)) as f64 / 1e3,
                p.outcome(),
            ))
        })
        .collect()
}

fn color(t: Type) -> &'static str {
    match t {
        Type::Ok => "#2b8a3e",
        Type::Fail => "#c92a2a",
        _ => "#e67700",
    }
}

struct Frame {
    t_max: f64,
    y_max: f64,
    log: bool,
}

impl Frame {
    fn x(&self, t: f64) -> f64 {
        LEFT + (t / self.t_max.max(1e-9)) * (W - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        let frac = if self.log {
            (v.max(0.1).log10() + 1.0) / (self.y_max.max(1.0).log10() + 1.0)
        } else {
            v / self.y_max.max(1e-9)
        };
        H - BOTTOM - frac.clamp(0.0, 1.0) * (H - TOP - BOTTOM)
    }
}

fn header(s: &mut String, title: &str) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="18" font-size="13">{title}</text>"#);
}

fn shade(s: &mut String, f: &Frame, ws: &[Window]) {
    for w in ws {
        let x0 = f.x(w.start_us as f64 / 1e6);
        let x1 = f.x((w.end_us as f64 / 1e6).min(f.t_max));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="#adb5bd" fill-opacity="0.35"><title>{}</title></rect>"##,
            (x1 - x0).max(0.5),
            H - TOP - BOTTOM,
            w.fault
        );
        let _ = writeln!(
            s,
            r##"<text x="{x0:.1}" y="{}" font-size="9" fill="#495057">{}</text>"##,
            TOP - 2.0,
            w.fault
        );
    }
}

fn axes(s: &mut String, f: &Frame, y_label: &str, ticks: &[f64]) {
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM
    );
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="black"/>"#,
        H - BOTTOM
    );
    let step = nice_step(f.t_max / 10.0);
    let mut t = 0.0;
    while t <= f.t_max + 1e-9 {
        let x = f.x(t);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{t:.0}</text>"#,
            H - BOTTOM,
            H - BOTTOM + 4.0,
            H - BOTTOM + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 6.0
    );
    for &v in ticks {
        let y = f.y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#dee2e6"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{y_label}</text>"#,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0
    );
}

fn nice_step(raw: f64) -> f64 {
    for s in [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0] {
        if s >= raw {
            return s;
        }
    }
    3600.0
}

fn legend(s: &mut String, items: &[(&str, &str)]) {
    let mut x = W - RIGHT - 90.0 * items.len() as f64;
    for (name, c) in items {
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="8" width="10" height="10" fill="{c}"/><text x="{:.1}" y="17">{name}</text>"#,
            x + 14.0
        );
        x += 90.0;
    }
}

/// The latency plot: every write's latency (log scale) at its start time.
pub fn latency_svg(history: &[Op]) -> String {
    let pts = writes(history);
    let ws = windows(history);
    let t_max = history.last().map(|o| o.time_us as f64 / 1e6).unwrap_or(1.0);
    let y_max = pts.iter().map(|p| p.1).fold(10.0, f64::max);
    let f = Frame {
        t_max,
        y_max,
        log: true,
    };
    let mut s = String::new();
    header(
        &mut s,
        "latency of client operations (ms, log scale); faults shaded",
    );
    shade(&mut s, &f, &ws);
    let ticks: Vec<f64> = [1.0, 10.0, 100.0, 1000.0, 10000.0]
        .into_iter()
        .filter(|v| *v <= y_max * 1.01)
        .collect();
    axes(&mut s, &f, "latency (ms)", &ticks);
    for (t, ms, kind) in &pts {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}" fill-opacity="0.6"/>"#,
            f.x(*t),
            f.y(*ms),
            color(*kind)
        );
    }
    legend(
        &mut s,
        &[
            ("ok", color(Type::Ok)),
            ("info", color(Type::Info)),
            ("fail", color(Type::Fail)),
        ],
    );
    s.push_str("</svg>\n");
    s
}

/// The throughput plot: completed writes per second by outcome, and deliveries per second.
pub fn throughput_svg(history: &[Op]) -> String {
    let pts = writes(history);
    let ws = windows(history);
    let t_max = history.last().map(|o| o.time_us as f64 / 1e6).unwrap_or(1.0);
    let secs = t_max.ceil() as usize + 1;
    let mut series: Vec<(&str, &str, Vec<f64>)> = vec![
        ("ok", color(Type::Ok), vec![0.0; secs]),
        ("info", color(Type::Info), vec![0.0; secs]),
        ("fail", color(Type::Fail), vec![0.0; secs]),
        ("delivered", "#1c7ed6", vec![0.0; secs]),
    ];
    for (t, ms, kind) in &pts {
        let done = ((t + ms / 1e3) as usize).min(secs - 1);
        let i = match kind {
            Type::Ok => 0,
            Type::Fail => 2,
            _ => 1,
        };
        series[i].2[done] += 1.0;
    }
    for o in history.iter().filter(|o| o.f == F::Recv) {
        let i = ((o.time_us / 1_000_000) as usize).min(secs - 1);
        series[3].2[i] += 1.0;
    }
    let y_max = series
        .iter()
        .flat_map(|s| s.2.iter())
        .fold(1.0f64, |a, b| a.max(*b));
    let f = Frame {
        t_max,
        y_max: y_max * 1.1,
        log: false,
    };
    let mut s = String::new();
    header(
        &mut s,
        "throughput (operations completed per second); faults shaded",
    );
    shade(&mut s, &f, &ws);
    let step = nice_step(y_max / 5.0);
    let ticks: Vec<f64> = (0..=6)
        .map(|i| i as f64 * step)
        .filter(|v| *v <= y_max * 1.1)
        .collect();
    axes(&mut s, &f, "operations / s", &ticks);
    for (_, c, v) in &series {
        let mut d = String::new();
        for (i, y) in v.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                f.x(i as f64),
                f.y(*y)
            );
        }
        let _ = writeln!(
            s,
            r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="1.2"/>"#
        );
    }
    let items: Vec<(&str, &str)> = series.iter().map(|(n, c, _)| (*n, *c)).collect();
    legend(&mut s, &items);
    s.push_str("</svg>\n");
    s
}

pub fn write(out: &Path, history: &[Op]) -> anyhow::Result<()> {
    std::fs::write(out.join("latency.svg"), latency_svg(history))?;
    std::fs::write(out.join("throughput.svg"), throughput_svg(history))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;

    #[test]
    fn plots_are_svg_with_points_and_shading() {
        let mut h = H::new();
        h.pushed(0, 10, "u", "m1", 1, 1);
        h.pushed(1500, 10, "u", "m2", 2, 2);
        let s = latency_svg(&h.ops);
        assert!(s.starts_with("<svg"));
        assert!(s.contains("<circle"));
        let t = throughput_svg(&h.ops);
        assert!(t.contains("<path"));
    }
}
