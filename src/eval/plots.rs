//! Charts as hand-written standalone SVG: training curves and the forget/utility trade-off of a
//! run directory (`unlearn plot RUN_DIR`), and overlaid truth-ratio histograms of a tofu
//! evaluation (written next to its report.md).
//!
//! Every chart has a title, axes with tick labels and axis labels, and a legend. Data series are
//! `<polyline>` elements (one per series) and evaluation points `<circle>` elements (one per
//! point); axes, frames and legend swatches use `<line>`, `<rect>` and `<text>` only, so the
//! drawn data can be counted in the markup. Points that are NaN or infinite are skipped.
use crate::error::{Error, Result};
use crate::model::weights::write_atomic;
use serde_json::{Map, Value};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The tofu report's histogram, written next to report.md.
pub const TRUTH_RATIO_HIST: &str = "truth_ratio_hist.svg";
/// `unlearn plot` writes into RUN_DIR/plots.
pub const PLOTS_DIR: &str = "plots";
pub const TRAINING_SVG: &str = "training.svg";
pub const TRADEOFF_SVG: &str = "tradeoff.svg";

/// matplotlib's tab10
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Per-step keys that are not drawn as losses.
fn skipped_key(k: &str) -> bool {
    k == "step" || k == "lr" || k.starts_with("grad_")
}

/// Per-step keys drawn in the λ panel.
fn lambda_key(k: &str) -> bool {
    k.starts_with("lambda") || k == "slack"
}

/// XML text with `&`, `<`, `>` and `"` escaped.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A coordinate: two decimals, never NaN (callers map finite data only).
fn c(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "0".into()
    }
}

/// A step of 1, 2 or 5 × 10^k giving about `target` intervals over `range`.
fn nice_step(range: f64, target: usize) -> f64 {
    let raw = range / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// An axis: its range widened to whole ticks.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    /// Ticks over the finite range `lo..hi` (padded when empty); `integer` keeps ticks whole.
    fn new(lo: f64, hi: f64, integer: bool) -> Axis {
        let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() && lo <= hi {
            // room for the padding and rounding below without overflowing to inf
            (lo.clamp(-1e300, 1e300), hi.clamp(-1e300, 1e300))
        } else {
            (0.0, 1.0)
        };
        if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            lo -= pad;
            hi += pad;
        }
        let mut step = nice_step(hi - lo, 5);
        if integer {
            step = step.max(1.0).round();
        }
        let lo = (lo / step).floor() * step;
        let hi = (hi / step).ceil() * step;
        let n = ((hi - lo) / step).round() as usize;
        let ticks = (0..=n.min(50)).map(|i| lo + i as f64 * step).collect();
        Axis {
            lo,
            hi,
            ticks,
            step,
        }
    }

    fn frac(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }
}

/// A tick label: as many decimals as the step needs; scientific for very large or small values.
fn tick_label(v: f64, step: f64) -> String {
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-4) {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// A plot area in the SVG and its axes.
struct Frame {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    xa: Axis,
    ya: Axis,
}

impl Frame {
    fn px(&self, v: f64) -> f64 {
        self.x + self.xa.frac(v) * self.w
    }
    fn py(&self, v: f64) -> f64 {
        self.y + self.h - self.ya.frac(v) * self.h
    }

    /// Frame, grid, ticks with labels and the axis labels.
    fn draw_axes(&self, o: &mut String, x_label: &str, y_label: &str) {
        let _ = writeln!(
            o,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333" stroke-width="1"/>"##,
            c(self.x),
            c(self.y),
            c(self.w),
            c(self.h)
        );
        for &t in &self.xa.ticks {
            let x = self.px(t);
            let _ = writeln!(
                o,
                r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#e5e5e5" stroke-width="1"/><line x1="{0}" y1="{2}" x2="{0}" y2="{3}" stroke="#333"/><text x="{0}" y="{4}" text-anchor="middle" font-size="11">{5}</text>"##,
                c(x),
                c(self.y),
                c(self.y + self.h),
                c(self.y + self.h + 5.0),
                c(self.y + self.h + 18.0),
                esc(&tick_label(t, self.xa.step))
            );
        }
        for &t in &self.ya.ticks {
            let y = self.py(t);
            let _ = writeln!(
                o,
                r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#e5e5e5" stroke-width="1"/><line x1="{3}" y1="{1}" x2="{0}" y2="{1}" stroke="#333"/><text x="{4}" y="{5}" text-anchor="end" font-size="11">{6}</text>"##,
                c(self.x),
                c(y),
                c(self.x + self.w),
                c(self.x - 5.0),
                c(self.x - 8.0),
                c(y + 4.0),
                esc(&tick_label(t, self.ya.step))
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" class="axis-label">{}</text>"#,
            c(self.x + self.w / 2.0),
            c(self.y + self.h + 38.0),
            esc(x_label)
        );
        let (lx, ly) = (self.x - 58.0, self.y + self.h / 2.0);
        let _ = writeln!(
            o,
            r#"<text x="{0}" y="{1}" text-anchor="middle" font-size="13" class="axis-label" transform="rotate(-90 {0} {1})">{2}</text>"#,
            c(lx),
            c(ly),
            esc(y_label)
        );
    }
}

/// How a legend entry's swatch looks.
enum Swatch<'a> {
    Line(&'a str),
    Block(&'a str),
}

/// A legend box at (x, y).
fn legend(o: &mut String, x: f64, y: f64, entries: &[(String, Swatch)]) {
    if entries.is_empty() {
        return;
    }
    let h = 8.0 + 18.0 * entries.len() as f64;
    let _ = writeln!(
        o,
        r##"<g class="legend"><rect x="{}" y="{}" width="170" height="{}" fill="white" stroke="#999"/>"##,
        c(x),
        c(y),
        c(h)
    );
    for (i, (name, sw)) in entries.iter().enumerate() {
        let cy = y + 13.0 + 18.0 * i as f64;
        match sw {
            Swatch::Line(col) => {
                let _ = write!(
                    o,
                    r#"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="{3}" stroke-width="2.5"/>"#,
                    c(x + 8.0),
                    c(cy),
                    c(x + 30.0),
                    col
                );
            }
            Swatch::Block(col) => {
                let _ = write!(
                    o,
                    r#"<rect x="{0}" y="{1}" width="22" height="10" fill="{2}" fill-opacity="0.6" stroke="{2}"/>"#,
                    c(x + 8.0),
                    c(cy - 5.0),
                    col
                );
            }
        }
        let short: String = if name.chars().count() > 22 {
            name.chars().take(21).collect::<String>() + "…"
        } else {
            name.clone()
        };
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-size="11">{}</text>"#,
            c(x + 36.0),
            c(cy + 4.0),
            esc(&short)
        );
    }
    let _ = writeln!(o, "</g>");
}

fn svg_open(o: &mut String, w: f64, h: f64, title: &str) {
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{0}" height="{1}" viewBox="0 0 {0} {1}" font-family="Helvetica, Arial, sans-serif">"#,
        c(w),
        c(h)
    );
    let _ = writeln!(o, "<title>{}</title>", esc(title));
    let _ = writeln!(
        o,
        r#"<rect x="0" y="0" width="{}" height="{}" fill="white"/>"#,
        c(w),
        c(h)
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        c(w / 2.0),
        esc(title)
    );
}

fn no_data(o: &mut String, f: &Frame, what: &str) {
    let _ = writeln!(
        o,
        r##"<text x="{}" y="{}" text-anchor="middle" font-size="13" fill="#888">{}</text>"##,
        c(f.x + f.w / 2.0),
        c(f.y + f.h / 2.0),
        esc(what)
    );
}

/// A named line series.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn finite_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
}

/// A panel's title and axis labels.
struct PanelText<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
}

/// One panel of line series over steps, with its legend at the right.
fn line_panel(
    o: &mut String,
    (x, y, w, h): (f64, f64, f64, f64),
    series: &[Series],
    x_range: (f64, f64),
    text: &PanelText,
    first_color: usize,
) {
    let (ylo, yhi) = finite_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let f = Frame {
        x,
        y,
        w,
        h,
        xa: Axis::new(x_range.0, x_range.1, true),
        ya: Axis::new(ylo, yhi, false),
    };
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
        c(x),
        c(y - 8.0),
        esc(text.title)
    );
    f.draw_axes(o, text.x_label, text.y_label);
    let mut entries = vec![];
    for (i, s) in series.iter().enumerate() {
        let col = PALETTE[(first_color + i) % PALETTE.len()];
        let mut pts: Vec<String> = s
            .points
            .iter()
            .map(|&(a, b)| format!("{},{}", c(f.px(a)), c(f.py(b))))
            .collect();
        if pts.len() == 1 {
            // a zero-length segment with round caps shows as a dot
            pts.push(pts[0].clone());
        }
        let _ = writeln!(
            o,
            r#"<polyline class="series" fill="none" stroke="{col}" stroke-width="1.8" stroke-linejoin="round" stroke-linecap="round" points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            esc(&s.name)
        );
        entries.push((s.name.clone(), Swatch::Line(col)));
    }
    if series.is_empty() {
        no_data(o, &f, "no finite values");
    }
    legend(o, x + w + 16.0, y, &entries);
}

/// The per-step and evaluation lines of a metrics.jsonl.
#[derive(Debug, Clone, Default)]
pub struct MetricsLog {
    /// per-step lines (`{"step", "loss", …}`), in file order
    pub steps: Vec<Map<String, Value>>,
    /// evaluation lines: (step, summary)
    pub evals: Vec<(u64, Map<String, Value>)>,
    /// notes for the user (a skipped partial last line)
    pub notes: Vec<String>,
}

/// Parse one line; Python-style NaN / Infinity literals read as null.
fn parse_line(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok().or_else(|| {
        let fixed = line
            .replace("-Infinity", "null")
            .replace("Infinity", "null")
            .replace("NaN", "null");
        serde_json::from_str(&fixed).ok()
    })
}

/// Read metrics.jsonl: per-step lines and `{"step", "eval": {…}}` lines. An unparsable line is
/// an error, except a partial last line (an interrupted write), which is skipped with a note.
pub fn read_metrics(path: &Path) -> Result<MetricsLog> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let mut log = MetricsLog::default();
    for (k, &(i, line)) in lines.iter().enumerate() {
        let Some(Value::Object(obj)) = parse_line(line) else {
            if k + 1 == lines.len() {
                log.notes.push(format!(
                    "{}: skipped the unreadable last line {} (an interrupted write?)",
                    path.display(),
                    i + 1
                ));
                continue;
            }
            return Err(Error::data(
                path,
                format!("line {}: not a JSON object", i + 1),
            ));
        };
        let Some(step) = obj.get("step").and_then(Value::as_u64) else {
            return Err(Error::data(
                path,
                format!("line {}: no non-negative integer 'step'", i + 1),
            ));
        };
        match obj.get("eval") {
            Some(Value::Object(summary)) => log.evals.push((step, summary.clone())),
            Some(_) => {
                return Err(Error::data(
                    path,
                    format!("line {}: 'eval' must be an object", i + 1),
                ))
            }
            None => log.steps.push(obj),
        }
    }
    Ok(log)
}

/// Series of the numeric keys of the per-step lines, in order of first appearance, split into
/// (losses, λ panel).
fn step_series(log: &MetricsLog) -> (Vec<Series>, Vec<Series>) {
    let mut names: Vec<String> = vec![];
    for line in &log.steps {
        for (k, v) in line {
            if v.is_number() && !skipped_key(k) && !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let (mut losses, mut lambdas) = (vec![], vec![]);
    for name in names {
        let points: Vec<(f64, f64)> = log
            .steps
            .iter()
            .filter_map(|l| {
                let s = l.get("step").and_then(Value::as_f64)?;
                let v = l.get(&name).and_then(Value::as_f64)?;
                v.is_finite().then_some((s, v))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let s = Series {
            name: name.clone(),
            points,
        };
        if lambda_key(&name) {
            lambdas.push(s);
        } else {
            losses.push(s);
        }
    }
    (losses, lambdas)
}

/// Training curves of a parsed metrics log: the losses (every numeric per-step key but `step`,
/// `lr`, `grad_*` and the λ keys) over steps, and λ (`lambda*`, `slack`) in a second panel when
/// present. Errors when there is no per-step line.
pub fn training_svg(log: &MetricsLog, title: &str) -> Result<String> {
    if log.steps.is_empty() {
        return Err(Error::InvalidArgument(
            "metrics.jsonl has no per-step lines to draw".into(),
        ));
    }
    let (losses, lambdas) = step_series(log);
    let (slo, shi) = finite_range(
        log.steps
            .iter()
            .filter_map(|l| l.get("step").and_then(Value::as_f64)),
    );
    let w = 960.0;
    let (x, pw, ph) = (80.0, 640.0, 320.0);
    let h = if lambdas.is_empty() { 440.0 } else { 680.0 };
    let mut o = String::new();
    svg_open(&mut o, w, h, title);
    line_panel(
        &mut o,
        (x, 60.0, pw, ph),
        &losses,
        (slo, shi),
        &PanelText {
            title: "losses",
            x_label: "step",
            y_label: "loss / NLL",
        },
        0,
    );
    if !lambdas.is_empty() {
        line_panel(
            &mut o,
            (x, 490.0, pw, 140.0),
            &lambdas,
            (slo, shi),
            &PanelText {
                title: "λ (constraint multiplier)",
                x_label: "step",
                y_label: "λ",
            },
            losses.len(),
        );
    }
    o.push_str("</svg>\n");
    Ok(o)
}

/// Training curves of a metrics.jsonl (see [`training_svg`]).
pub fn training_curves_svg(metrics_jsonl: &Path) -> Result<String> {
    let log = read_metrics(metrics_jsonl)?;
    let run = metrics_jsonl
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let title = if run.is_empty() {
        "Training curves".to_string()
    } else {
        format!("Training curves: {run}")
    };
    training_svg(&log, &title)
}

/// Linear interpolation between two #rrggbb colours.
fn mix(a: (u8, u8, u8), b: (u8, u8, u8), t: f64) -> String {
    let m = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
}

/// Forget metric (x) against utility (y), one circle per evaluation point labelled with its
/// step, joined in step order by one polyline (when there are two points or more). `labels` are
/// the (x, y) axis labels, e.g. ("forget metric: forget_quality", "utility: model_utility").
/// Points with a NaN or infinite coordinate are skipped.
pub fn tradeoff_svg(points: &[(u64, f64, f64)], labels: (&str, &str)) -> String {
    let mut pts: Vec<(u64, f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.1.is_finite() && p.2.is_finite())
        .collect();
    pts.sort_by_key(|p| p.0);
    // a margin so that points at the extremes stay off the frame
    let pad = |(lo, hi): (f64, f64)| {
        let m = (hi - lo) * 0.05;
        (lo - m, hi + m)
    };
    let (xlo, xhi) = pad(finite_range(pts.iter().map(|p| p.1)));
    let (ylo, yhi) = pad(finite_range(pts.iter().map(|p| p.2)));
    let (w, h) = (900.0, 560.0);
    let f = Frame {
        x: 90.0,
        y: 60.0,
        w: 600.0,
        h: 420.0,
        xa: Axis::new(xlo, xhi, false),
        ya: Axis::new(ylo, yhi, false),
    };
    let mut o = String::new();
    svg_open(&mut o, w, h, "Forget metric vs utility per evaluation");
    f.draw_axes(&mut o, labels.0, labels.1);
    let (start, end) = ((31u8, 119u8, 180u8), (214u8, 39u8, 40u8));
    if pts.len() >= 2 {
        let line: Vec<String> = pts
            .iter()
            .map(|p| format!("{},{}", c(f.px(p.1)), c(f.py(p.2))))
            .collect();
        let _ = writeln!(
            o,
            r##"<polyline class="trajectory" fill="none" stroke="#aaaaaa" stroke-width="1.2" stroke-dasharray="4 3" points="{}"/>"##,
            line.join(" ")
        );
    }
    let every = pts.len().div_ceil(20).max(1);
    for (i, p) in pts.iter().enumerate() {
        let t = if pts.len() > 1 {
            i as f64 / (pts.len() - 1) as f64
        } else {
            1.0
        };
        let (cx, cy) = (f.px(p.1), f.py(p.2));
        let _ = writeln!(
            o,
            r##"<circle class="point" cx="{}" cy="{}" r="5" fill="{}" stroke="#222" stroke-width="0.8"><title>step {}: {}, {}</title></circle>"##,
            c(cx),
            c(cy),
            mix(start, end, t),
            p.0,
            p.1,
            p.2
        );
        if i % every == 0 || i + 1 == pts.len() {
            // labels of points near the right edge go to their left
            let (lx, anchor) = if cx > f.x + 0.85 * f.w {
                (cx - 7.0, "end")
            } else {
                (cx + 7.0, "start")
            };
            let _ = writeln!(
                o,
                r##"<text x="{}" y="{}" font-size="10" fill="#333" text-anchor="{anchor}">step {}</text>"##,
                c(lx),
                c(cy - 7.0),
                p.0
            );
        }
    }
    if pts.is_empty() {
        no_data(&mut o, &f, "no evaluation point with finite values");
    }
    let mut entries = vec![];
    if let (Some(a), Some(b)) = (pts.first(), pts.last()) {
        entries.push((
            format!("first eval (step {})", a.0),
            Swatch::Block("#1f77b4"),
        ));
        if pts.len() > 1 {
            entries.push((
                format!("last eval (step {})", b.0),
                Swatch::Block("#d62728"),
            ));
            entries.push(("in step order".to_string(), Swatch::Line("#aaaaaa")));
        }
    }
    legend(&mut o, f.x + f.w + 16.0, f.y, &entries);
    o.push_str("</svg>\n");
    o
}

/// Overlaid histograms of the model's and the retain model's per-item values on shared bins
/// (x label "value"); see [`histogram_svg_with`].
pub fn histogram_svg(model_values: &[f64], retain_values: &[f64], title: &str) -> String {
    histogram_svg_with(
        model_values,
        retain_values,
        title,
        "value",
        ("model", "retain model"),
    )
}

/// Overlaid histograms on shared bins: each non-empty series is one translucent filled
/// `<polygon>` and one `<polyline>` outline. NaN and infinite values are skipped (the legend
/// gives each series' count of finite values).
pub fn histogram_svg_with(
    model_values: &[f64],
    retain_values: &[f64],
    title: &str,
    x_label: &str,
    names: (&str, &str),
) -> String {
    let a: Vec<f64> = model_values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let b: Vec<f64> = retain_values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = finite_range(a.iter().chain(&b).copied());
    let bins = ((a.len().max(b.len()) as f64).sqrt().ceil() as usize).clamp(5, 40);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 0.5, lo + 0.5)
    } else {
        (0.0, 1.0)
    };
    let width = (hi - lo) / bins as f64;
    let counts = |v: &[f64]| {
        let mut n = vec![0usize; bins];
        for &x in v {
            let k = (((x - lo) / width).floor() as usize).min(bins - 1);
            n[k] += 1;
        }
        n
    };
    let series: Vec<(&str, Vec<usize>, usize, &str)> =
        [(names.0, &a, "#1f77b4"), (names.1, &b, "#ff7f0e")]
            .into_iter()
            .filter(|(_, v, _)| !v.is_empty())
            .map(|(n, v, col)| (n, counts(v), v.len(), col))
            .collect();
    let top = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .max()
        .unwrap_or(1) as f64;
    let f = Frame {
        x: 80.0,
        y: 60.0,
        w: 600.0,
        h: 360.0,
        xa: Axis::new(lo, hi, false),
        ya: Axis::new(0.0, top.max(1.0), true),
    };
    let mut o = String::new();
    svg_open(&mut o, 900.0, 500.0, title);
    f.draw_axes(&mut o, x_label, "items");
    let mut entries = vec![];
    for (name, n, total, col) in &series {
        let mut pts = vec![format!("{},{}", c(f.px(lo)), c(f.py(0.0)))];
        for (k, &cnt) in n.iter().enumerate() {
            let (x0, x1) = (lo + k as f64 * width, lo + (k + 1) as f64 * width);
            pts.push(format!("{},{}", c(f.px(x0)), c(f.py(cnt as f64))));
            pts.push(format!("{},{}", c(f.px(x1)), c(f.py(cnt as f64))));
        }
        pts.push(format!("{},{}", c(f.px(hi)), c(f.py(0.0))));
        let joined = pts.join(" ");
        let _ = writeln!(
            o,
            r#"<polygon fill="{col}" fill-opacity="0.3" stroke="none" points="{joined}"/>"#
        );
        let _ = writeln!(
            o,
            r#"<polyline class="series" fill="none" stroke="{col}" stroke-width="1.8" points="{joined}"><title>{}</title></polyline>"#,
            esc(name)
        );
        entries.push((format!("{name} (n = {total})"), Swatch::Block(col)));
    }
    if series.is_empty() {
        no_data(&mut o, &f, "no finite values");
    }
    legend(&mut o, f.x + f.w + 16.0, f.y, &entries);
    o.push_str("</svg>\n");
    o
}

/// Charts of an evaluation log written next to its report.md: for a tofu suite with forget truth
/// ratios, [`TRUTH_RATIO_HIST`] (log10 of the per-item truth ratios of the model and, when a
/// retain reference was given, of the retain model).
pub fn eval_plots(log: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    if log["suite_kind"].as_str() != Some("tofu") {
        return out;
    }
    let log10 = |v: Option<f64>| v.filter(|r| *r > 0.0 && r.is_finite()).map(f64::log10);
    let model: Vec<f64> = log["splits"]["forget"]["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|it| log10(it["scores"]["truth_ratio"].as_f64()))
                .collect()
        })
        .unwrap_or_default();
    if model.is_empty() {
        return out;
    }
    let retain: Vec<f64> = log["reference"]["values"]["forget_truth_ratio"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| log10(v.as_f64())).collect())
        .unwrap_or_default();
    let svg = histogram_svg_with(
        &model,
        &retain,
        "Forget truth ratios: model vs retain model",
        "log10 truth ratio R = P(perturbed) / P(correct)",
        ("model", "retain model"),
    );
    out.push((TRUTH_RATIO_HIST.to_string(), svg));
    out
}

/// The report.md section linking the charts of [`eval_plots`] (empty when there are none).
pub fn report_section(plots: &[(String, String)]) -> String {
    let mut r = String::new();
    for (name, _) in plots {
        if name == TRUTH_RATIO_HIST {
            let _ = writeln!(
                r,
                "\n## Forget truth ratios\n\n![Histogram of the forget truth ratios, model vs retain model]({name})"
            );
        } else {
            let _ = writeln!(r, "\n![{name}]({name})");
        }
    }
    r
}

/// The first key of `names`, else the first key starting with `prefix`, that has a finite
/// number in some evaluation.
fn pick_key(evals: &[(u64, Map<String, Value>)], names: &[&str], prefix: &str) -> Option<String> {
    let finite = |k: &str| {
        evals
            .iter()
            .any(|(_, s)| s.get(k).and_then(Value::as_f64).is_some_and(f64::is_finite))
    };
    if let Some(k) = names.iter().find(|k| finite(k)) {
        return Some(k.to_string());
    }
    evals
        .iter()
        .flat_map(|(_, s)| s.keys())
        .find(|k| k.starts_with(prefix) && finite(k))
        .cloned()
}

/// The (forget metric, utility metric) of a run's evaluations: `forget_quality` if present,
/// else `forget_nll`, else the first `forget_*` key; `model_utility` if present, else
/// `retain_nll`, else the first `retain_*` key.
pub fn tradeoff_keys(evals: &[(u64, Map<String, Value>)]) -> Option<(String, String)> {
    let forget = pick_key(evals, &["forget_quality", "forget_nll"], "forget_")?;
    let utility = pick_key(evals, &["model_utility", "retain_nll"], "retain_")?;
    Some((forget, utility))
}

/// What `unlearn plot` wrote.
#[derive(Debug, Clone, Default)]
pub struct RunPlots {
    pub written: Vec<PathBuf>,
    pub notes: Vec<String>,
}

/// Read RUN_DIR/metrics.jsonl; write RUN_DIR/plots/training.svg and, when it has evaluation
/// lines with a forget and a utility metric, RUN_DIR/plots/tradeoff.svg (each atomically).
pub fn plot_run(run_dir: &Path) -> Result<RunPlots> {
    let metrics = run_dir.join("metrics.jsonl");
    if !metrics.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{}: no metrics.jsonl; give the output directory of `unlearn run`",
            run_dir.display()
        )));
    }
    let log = read_metrics(&metrics)?;
    let mut out = RunPlots {
        notes: log.notes.clone(),
        ..Default::default()
    };
    let dir = run_dir.join(PLOTS_DIR);
    // created with the first chart: a run with nothing to plot gets no empty plots/
    let write = |name: &str, svg: &str| -> Result<PathBuf> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let p = dir.join(name);
        write_atomic(&p, svg.as_bytes())?;
        Ok(p)
    };
    let name = run_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| run_dir.display().to_string());
    if log.steps.is_empty() {
        out.notes
            .push("no per-step lines in metrics.jsonl: no training curves".into());
    } else {
        let svg = training_svg(&log, &format!("Training curves: {name}"))?;
        out.written.push(write(TRAINING_SVG, &svg)?);
    }
    if !log.evals.is_empty() {
        match tradeoff_keys(&log.evals) {
            Some((fk, uk)) => {
                let points: Vec<(u64, f64, f64)> = log
                    .evals
                    .iter()
                    .filter_map(|(s, m)| {
                        Some((*s, m.get(&fk)?.as_f64()?, m.get(&uk)?.as_f64()?))
                    })
                    .collect();
                let svg = tradeoff_svg(
                    &points,
                    (&format!("forget metric: {fk}"), &format!("utility: {uk}")),
                );
                out.written.push(write(TRADEOFF_SVG, &svg)?);
            }
            None => out.notes.push(
                "no trade-off chart: the evaluation lines lack a forget_* or a model_utility/retain_* metric".into(),
            ),
        }
    }
    if out.written.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: nothing to plot (no per-step or evaluation lines)",
            metrics.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_near_the_largest_float_stay_finite() {
        for (lo, hi) in [(0.0, 1e308), (1e308, 1e308), (-1.7e308, 1.7e308)] {
            let a = Axis::new(lo, hi, false);
            assert!(
                a.lo.is_finite() && a.hi.is_finite() && a.step.is_finite(),
                "{lo} {hi}"
            );
            assert!(
                a.ticks.iter().all(|t| t.is_finite()),
                "{lo} {hi}: {:?}",
                a.ticks
            );
        }
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let a = Axis::new(0.13, 2.9, false);
        assert!(a.lo <= 0.13 && a.hi >= 2.9, "{a:?}");
        assert_eq!(a.step, 0.5);
        let a = Axis::new(1.0, 3.0, true);
        assert!(a.step >= 1.0 && a.ticks.iter().all(|t| t.fract() == 0.0));
        let a = Axis::new(5.0, 5.0, false);
        assert!(a.lo < 5.0 && a.hi > 5.0);
        let a = Axis::new(f64::NAN, 1.0, false);
        assert!(a.ticks.iter().all(|t| t.is_finite()));
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(-1e-17, 0.1), "0.0");
        assert_eq!(tick_label(200.0, 100.0), "200");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
