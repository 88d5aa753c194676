//! `phalanx sim sweep`: one parameter over a range, every value over the same seeds
//! (common random numbers: the same failure draws), a table and an SVG curve.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::config::{CheckpointMode, PolicyKind, SimFile};
use crate::engine::{checkpoint_interval_s, run};
use crate::model::{Job, JobError};
use crate::report::PlotError;

/// The parameters a sweep can vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    CheckpointIntervalMin,
    Spares,
    Policy,
    Gpus,
}

impl Param {
    pub const NAMES: &'static str = "checkpoint_interval_min, spares, policy, gpus";
    pub fn as_str(self) -> &'static str {
        match self {
            Param::CheckpointIntervalMin => "checkpoint_interval_min",
            Param::Spares => "spares",
            Param::Policy => "policy",
            Param::Gpus => "gpus",
        }
    }
}

/// A parsed `--param NAME=VALUES`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub param: Param,
    pub values: Vec<f64>,
}

/// The points of `A..B` (12, geometric when A > 0), `A..B:N`, or `A,B,C`; for `policy`,
/// `restart,phalanx` (0 and 1).
pub fn parse_param(s: &str) -> Result<Sweep, String> {
    let (name, values) = s.split_once('=').ok_or_else(|| {
        format!("--param {s:?}: expected NAME=VALUES, e.g. checkpoint_interval_min=5..240")
    })?;
    let param = match name.trim() {
        "checkpoint_interval_min" => Param::CheckpointIntervalMin,
        "spares" => Param::Spares,
        "policy" => Param::Policy,
        "gpus" => Param::Gpus,
        other => {
            return Err(format!(
                "--param: unknown parameter {other:?} (known: {})",
                Param::NAMES
            ))
        }
    };
    let values = values.trim();
    let out: Vec<f64> = if param == Param::Policy {
        values
            .split(',')
            .map(|v| match v.trim() {
                "restart" => Ok(0.0),
                "phalanx" => Ok(1.0),
                o => Err(format!(
                    "--param policy: {o:?} (expected restart or phalanx)"
                )),
            })
            .collect::<Result<_, _>>()?
    } else if let Some((a, rest)) = values.split_once("..") {
        let (b, n) = match rest.split_once(':') {
            Some((b, n)) => (
                b,
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (2..=200).contains(n))
                    .ok_or_else(|| format!("--param {name}: points {n:?} (expected 2..=200)"))?,
            ),
            None => (rest, 12),
        };
        let num = |x: &str| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("--param {name}: {x:?} is not a non-negative number"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if b <= a {
            return Err(format!("--param {name}: empty range {a}..{b}"));
        }
        (0..n)
            .map(|i| {
                let x = i as f64 / (n - 1) as f64;
                if a > 0.0 {
                    a * (b / a).powf(x)
                } else {
                    a + (b - a) * x
                }
            })
            .collect()
    } else {
        values
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("--param {name}: {v:?} is not a non-negative number"))
            })
            .collect::<Result<_, _>>()?
    };
    if out.is_empty() || out.len() > 200 {
        return Err(format!(
            "--param {name}: 1 to 200 values, got {}",
            out.len()
        ));
    }
    let whole = matches!(param, Param::Spares | Param::Gpus);
    let out = if whole {
        let mut v: Vec<f64> = out.iter().map(|x| x.round()).collect();
        v.dedup();
        v
    } else {
        out
    };
    Ok(Sweep { param, values: out })
}

/// `f` with the parameter set to `v`.
pub fn apply(f: &SimFile, p: Param, v: f64) -> Result<SimFile, String> {
    let mut g = f.clone();
    match p {
        Param::CheckpointIntervalMin => {
            if !(0.1..=525_600.0).contains(&v) {
                return Err(format!(
                    "checkpoint_interval_min {v}: expected 0.1 to 525600 minutes"
                ));
            }
            g.checkpoint.interval_min = Some(v);
        }
        Param::Spares => g.policy.spare_hosts = v as u64,
        Param::Policy => {
            // Phalanx's policy is its whole design: spares from the file, and
            // asynchronous checkpoints as the last resort.
            if v >= 0.5 {
                g.policy.kind = PolicyKind::Phalanx;
                g.checkpoint.mode = CheckpointMode::Async;
            } else {
                g.policy.kind = PolicyKind::Restart;
            }
        }
        Param::Gpus => {
            let gpus = v as u64;
            let mp = g.layout.tp * g.layout.pp;
            if gpus == 0 || gpus % mp != 0 {
                return Err(format!("gpus {gpus}: must be a multiple of tp x pp = {mp}"));
            }
            let dp = gpus / mp;
            // The same batch per replica: the global batch scales with dp.
            let job = Job::build(f).map_err(|e| e.to_string())?;
            let per_replica = job.shape.global_batch / job.dp;
            g.model.global_batch = Some(per_replica * dp);
            g.layout.dp = dp;
            g.hardware.gpus = gpus;
        }
    }
    Ok(g)
}

/// One value's results over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub value: f64,
    pub label: String,
    pub effective_mean: f64,
    pub effective_sd: f64,
    pub interruptions_mean: f64,
    pub lost_gpu_h_mean: f64,
    pub checkpoint_interval_min: f64,
    pub daly_interval_min: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub name: String,
    pub param: Param,
    pub seeds: Vec<u64>,
    pub points: Vec<Point>,
    /// The Young/Daly optimum of the base file, min.
    pub daly_interval_min: f64,
    pub events: u64,
}

/// Run every value over `seeds`.
pub fn sweep(f: &SimFile, s: &Sweep, seeds: &[u64]) -> Result<SweepResult, String> {
    let base = Job::build(f).map_err(|e: JobError| e.to_string())?;
    let (_, daly_s) = checkpoint_interval_s(f, &base);
    let mut points = Vec::new();
    let mut events = 0;
    for &v in &s.values {
        let g = apply(f, s.param, v)?;
        g.validate("sweep").map_err(|e| e.to_string())?;
        let job = Job::build(&g).map_err(|e| format!("{}={v}: {e}", s.param.as_str()))?;
        let mut ett = Vec::new();
        let mut intr = 0.0;
        let mut lost = 0.0;
        let mut interval = 0.0;
        let mut daly = 0.0;
        for &seed in seeds {
            let o = run(&g, &job, seed);
            events += o.events;
            ett.push(o.effective_training_time);
            intr += o.interruptions as f64;
            lost += o.lost_gpu_h.values().sum::<f64>();
            interval = o.checkpoint_interval_min;
            daly = o.daly_interval_min;
        }
        let n = seeds.len() as f64;
        let mean = ett.iter().sum::<f64>() / n;
        let sd = (ett.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        points.push(Point {
            value: v,
            label: match s.param {
                Param::Policy => g.policy.kind.as_str().to_string(),
                Param::CheckpointIntervalMin => format!("{v:.1}"),
                _ => format!("{v:.0}"),
            },
            effective_mean: mean,
            effective_sd: sd,
            interruptions_mean: intr / n,
            lost_gpu_h_mean: lost / n,
            checkpoint_interval_min: interval,
            daly_interval_min: daly,
        });
    }
    Ok(SweepResult {
        name: f.name.clone(),
        param: s.param,
        seeds: seeds.to_vec(),
        points,
        daly_interval_min: daly_s / 60.0,
        events,
    })
}

/// The value with the highest mean effective training time, refined by a parabola
/// through it and its neighbours (in log space for a geometric grid).
pub fn best(r: &SweepResult) -> Option<f64> {
    let p = &r.points;
    let (i, _) = p
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.effective_mean.total_cmp(&b.1.effective_mean))?;
    if i == 0 || i + 1 >= p.len() || p.iter().any(|x| x.value <= 0.0) {
        return Some(p[i].value);
    }
    let (x0, x1, x2) = (p[i - 1].value.ln(), p[i].value.ln(), p[i + 1].value.ln());
    let (y0, y1, y2) = (
        p[i - 1].effective_mean,
        p[i].effective_mean,
        p[i + 1].effective_mean,
    );
    let d = (x0 - x1) * (x0 - x2) * (x1 - x2);
    let a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d;
    let b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d;
    if a >= 0.0 || !a.is_finite() {
        return Some(p[i].value);
    }
    Some((-b / (2.0 * a)).clamp(x0, x2).exp())
}

pub fn text(r: &SweepResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sweep {} over {} (seeds {:?})",
        r.name,
        r.param.as_str(),
        r.seeds
    );
    let _ = writeln!(
        s,
        "{:>24} {:>10} {:>8} {:>14} {:>16}",
        r.param.as_str(),
        "effective",
        "± sd",
        "interruptions",
        "lost GPU-hours"
    );
    for p in &r.points {
        let _ = writeln!(
            s,
            "{:>24} {:>9.2}% {:>7.2}% {:>14.1} {:>16.0}",
            p.label,
            p.effective_mean * 100.0,
            p.effective_sd * 100.0,
            p.interruptions_mean,
            p.lost_gpu_h_mean
        );
    }
    if r.param == Param::CheckpointIntervalMin {
        if let Some(b) = best(r) {
            let _ = writeln!(
                s,
                "simulated optimum {b:.1} min; Young/Daly sqrt(2 delta (M + R)) {:.1} min ({:+.1}%)",
                r.daly_interval_min,
                (b / r.daly_interval_min - 1.0) * 100.0
            );
        }
    }
    if r.param == Param::Policy && r.points.len() == 2 {
        let d = (r.points[1].effective_mean - r.points[0].effective_mean) * 100.0;
        let _ = writeln!(
            s,
            "{} minus {}: {d:+.2} points of effective training time",
            r.points[1].label, r.points[0].label
        );
    }
    let _ = writeln!(s, "events simulated: {}", r.events);
    s
}

/// The curve, with the Young/Daly optimum marked on a checkpoint-interval sweep.
pub fn svg(r: &SweepResult, path: &Path) -> Result<(), PlotError> {
    let e = |m: String| PlotError {
        path: path.display().to_string(),
        message: m,
    };
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let xs: Vec<f64> = (0..r.points.len()).map(|i| i as f64).collect();
    let use_index = r.param == Param::Policy;
    let xv = |i: usize| if use_index { xs[i] } else { r.points[i].value };
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    for i in 0..r.points.len() {
        x0 = x0.min(xv(i));
        x1 = x1.max(xv(i));
    }
    if r.param == Param::CheckpointIntervalMin {
        x0 = x0.min(r.daly_interval_min);
        x1 = x1.max(r.daly_interval_min);
    }
    let pad = ((x1 - x0) * 0.05).max(0.5);
    let (lo, hi) = r.points.iter().fold((1.0f64, 0.0f64), |(l, h), p| {
        (
            l.min(p.effective_mean - p.effective_sd),
            h.max(p.effective_mean + p.effective_sd),
        )
    });
    let ypad = ((hi - lo) * 0.1).max(0.002);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: effective training time against {}",
                r.name,
                r.param.as_str()
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), (lo - ypad)..(hi + ypad).min(1.0))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(r.param.as_str())
        .y_desc("effective training time")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            (0..r.points.len()).map(|i| (xv(i), r.points[i].effective_mean)),
            BLUE.stroke_width(2),
        ))
        .map_err(|x| e(x.to_string()))?
        .label("mean over seeds")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(
            (0..r.points.len())
                .map(|i| Circle::new((xv(i), r.points[i].effective_mean), 3, BLUE.filled())),
        )
        .map_err(|x| e(x.to_string()))?;
    if r.param == Param::CheckpointIntervalMin {
        let d = r.daly_interval_min;
        chart
            .draw_series(LineSeries::new(
                vec![(d, lo - ypad), (d, (hi + ypad).min(1.0))],
                RED.stroke_width(1),
            ))
            .map_err(|x| e(x.to_string()))?
            .label(format!("Young/Daly optimum {d:.1} min"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}
