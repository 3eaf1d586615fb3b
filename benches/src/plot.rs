//! Plain SVG line charts (memory vs connections, latency CDFs, deliveries/s over time), written
//! by hand so the benchmark needs no plotting library.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Logarithmic x axis (latencies).
    pub x_log: bool,
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 460.0;
const L: f64 = 80.0;
const R: f64 = 200.0;
const T: f64 = 40.0;
const B: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(t);
        t += step;
    }
    out
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Chart<'_> {
    pub fn svg(&self) -> String {
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let fx = |x: f64| if self.x_log { x.max(1e-9).log10() } else { x };
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, f64::MIN);
        for &(x, y) in pts() {
            x0 = x0.min(fx(x));
            x1 = x1.max(fx(x));
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y1) = (0.0, 1.0, 1.0);
        }
        if self.x_log {
            x0 = x0.floor();
            x1 = x1.ceil().max(x0 + 1.0);
        } else {
            x0 = x0.min(0.0);
            if x1 <= x0 {
                x1 = x0 + 1.0;
            }
        }
        let y0 = 0.0;
        let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.05 };
        let px = |x: f64| L + (fx(x) - x0) / (x1 - x0) * (W - L - R);
        let py = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
            (W - R + L) / 2.0,
            esc(self.title)
        );
        // Axes and grid.
        let x_ticks: Vec<f64> = if self.x_log {
            (x0 as i64..=x1 as i64).map(|e| 10f64.powi(e as i32)).collect()
        } else {
            nice_ticks(x0, x1, 6)
        };
        for t in x_ticks {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - B,
                H - B + 16.0,
                label(t)
            );
        }
        for t in nice_ticks(y0, y1, 6) {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - R,
                L - 6.0,
                y + 4.0,
                label(t)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"##,
            W - L - R,
            H - T - B,
            (W - R + L) / 2.0,
            H - 18.0,
            esc(self.x_label),
            (H - B + T) / 2.0,
            (H - B + T) / 2.0,
            esc(self.y_label)
        );
        for (i, ser) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let path: Vec<String> = ser
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            if ser.points.len() <= 24 {
                for &(x, y) in &ser.points {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                        px(x),
                        py(y)
                    );
                }
            }
            let ly = T + 14.0 + i as f64 * 18.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                W - R + 12.0,
                W - R + 32.0,
                W - R + 38.0,
                ly + 4.0,
                esc(&ser.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A latency CDF series from a summary's (µs, fraction) points, in ms.
pub fn cdf_series(name: &str, cdf: &[(u64, f64)]) -> Series {
    Series {
        name: name.into(),
        points: cdf.iter().map(|&(us, q)| (us as f64 / 1000.0, q)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series() {
        let c = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            x_log: true,
            series: vec![
                Series {
                    name: "a".into(),
                    points: vec![(0.1, 0.0), (1.0, 0.5), (30.0, 1.0)],
                },
                Series {
                    name: "b<c".into(),
                    points: vec![(0.5, 0.2)],
                },
            ],
        };
        let s = c.svg();
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("b&lt;c"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    }
}
