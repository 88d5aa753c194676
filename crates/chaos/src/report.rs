//! The report of a run: `report.json` (every expectation with its measured value, every
//! fault as fired, the time series), `report.md` (which embeds the plots) and four SVG
//! plots drawn with plotters. `phalanx report DIR` prints [`summary_text`] again from
//! `report.json`.

use phalanx_proto::RaftRole;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::check::{Measured, Verdict};

/// One poll of the job's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressSample {
    /// Seconds since the submission.
    pub t_s: f64,
    pub epoch: u64,
    pub progress_step: u64,
    /// Latest step per rank of the current plan.
    pub rank_steps: Vec<u64>,
    /// The worker holding each rank.
    pub ranks: Vec<String>,
}

/// A fault as the runner fired it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiredFault {
    /// Index in the file's `[[faults]]` (swarm faults follow).
    pub index: usize,
    pub kind: String,
    /// As written (`rank:1`, `random-worker`, ...).
    pub target: String,
    /// What it hit (`worker w2 (pid 1234)`, `host 1`, ...).
    pub resolved: String,
    pub trigger: String,
    pub t_s: f64,
    /// The job's progress when it fired.
    pub step: u64,
    pub duration_s: Option<f64>,
    /// How it was done: a signal, the worker's fault inbox, a real link cut in network
    /// namespaces, or an emulation (and why).
    pub mechanism: String,
    /// Set when the fault could not be fired.
    pub error: Option<String>,
}

/// Everything a run leaves behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub file: String,
    pub description: String,
    pub seed: u64,
    /// The one command that replays this run.
    pub replay: String,
    pub passed: bool,
    /// How the hosts were made: network namespaces, or one host on 127.0.0.1.
    pub network: String,
    pub verdicts: Vec<Verdict>,
    pub measured: Measured,
    pub faults: Vec<FiredFault>,
    pub progress: Vec<ProgressSample>,
    /// (step, loss) of rank 0, from the workers' logs.
    pub losses: Vec<(u64, f64)>,
    pub notes: Vec<String>,
    /// The runner's own error, when the run could not be carried through.
    pub error: Option<String>,
}

impl Report {
    pub fn failed(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(|v| !v.holds)
    }
}

/// The plots a report directory holds.
pub const PLOTS: [(&str, &str); 4] = [
    (
        "loss.svg",
        "Loss against step, with fault markers and recovery spans",
    ),
    ("step_time.svg", "Time per step of each rank over time"),
    ("world.svg", "World size and plan epochs over time"),
    ("controllers.svg", "Controller terms and leaders over time"),
];

/// The summary printed at the end of a run and by `phalanx report DIR`.
pub fn summary_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scenario {} (seed {}): {}",
        r.scenario,
        r.seed,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    let _ = writeln!(s, "network: {}", r.network);
    if !r.faults.is_empty() {
        let _ = writeln!(
            s,
            "{:<4} {:<18} {:<22} {:>7} {:>6}  MECHANISM",
            "#", "FAULT", "TARGET", "AT s", "STEP"
        );
        for f in &r.faults {
            let _ = writeln!(
                s,
                "{:<4} {:<18} {:<22} {:>7.1} {:>6}  {}{}",
                f.index,
                f.kind,
                truncate(&f.resolved, 22),
                f.t_s,
                f.step,
                f.mechanism,
                f.error
                    .as_ref()
                    .map(|e| format!(" (NOT FIRED: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    let m = &r.measured;
    let _ = writeln!(
        s,
        "wall {:.1} s; {} recoveries; worst MTTR {}; {} steps redone; effective training time {}",
        m.wall_s,
        m.recoveries.len(),
        m.max_mttr_s()
            .map(|x| format!("{x:.2} s"))
            .unwrap_or_else(|| "-".into()),
        m.lost_steps(),
        m.effective_training_time
            .map(|x| format!("{:.1}%", x * 100.0))
            .unwrap_or_else(|| "-".into())
    );
    if let (Some(a), Some(b)) = (&m.params_sha256, &m.reference_sha256) {
        let _ = writeln!(
            s,
            "params_sha256 {a}\nreference     {b} ({})",
            if a == b { "bit-identical" } else { "DIFFERENT" }
        );
    }
    let _ = writeln!(
        s,
        "{:<6} {:<28} {:<32} MEASURED",
        "", "EXPECTATION", "EXPECTED"
    );
    for v in &r.verdicts {
        let _ = writeln!(
            s,
            "{:<6} {:<28} {:<32} {}",
            if v.holds { "ok" } else { "FAILED" },
            v.name,
            truncate(&v.expected, 32),
            v.measured
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "runner error: {e}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    if !r.passed {
        for v in r.failed() {
            let _ = writeln!(
                s,
                "expectation failed: {} (expected {}, measured {})",
                v.name, v.expected, v.measured
            );
        }
        let _ = writeln!(s, "replay: {}", r.replay);
    }
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n.saturating_sub(1)).collect::<String>() + "…"
    }
}

/// The Markdown report (it embeds the plots by relative path).
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Scenario `{}`: {}\n",
        r.scenario,
        if r.passed { "passed" } else { "FAILED" }
    );
    if !r.description.is_empty() {
        let _ = writeln!(s, "{}\n", r.description);
    }
    let _ = writeln!(
        s,
        "- file: `{}`\n- seed: {}\n- network: {}\n- replay: `{}`\n",
        r.file, r.seed, r.network, r.replay
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "**Runner error:** {e}\n");
    }
    let _ = writeln!(
        s,
        "## Expectations\n\n| | expectation | expected | measured |\n|---|---|---|---|"
    );
    for v in &r.verdicts {
        let _ = writeln!(
            s,
            "| {} | `{}` | {} | {} |",
            if v.holds { "✅" } else { "❌" },
            v.name,
            md_cell(&v.expected),
            md_cell(&v.measured)
        );
    }
    let _ = writeln!(s, "\n## Faults\n");
    if r.faults.is_empty() {
        let _ = writeln!(s, "None.");
    } else {
        let _ = writeln!(
            s,
            "| # | kind | target | hit | trigger | at s | step | lasts s | mechanism |\n|---|---|---|---|---|---|---|---|---|"
        );
        for f in &r.faults {
            let _ = writeln!(
                s,
                "| {} | {} | `{}` | {} | {} | {:.1} | {} | {} | {}{} |",
                f.index,
                f.kind,
                f.target,
                md_cell(&f.resolved),
                md_cell(&f.trigger),
                f.t_s,
                f.step,
                f.duration_s.map(|d| format!("{d}")).unwrap_or_default(),
                md_cell(&f.mechanism),
                f.error
                    .as_ref()
                    .map(|e| format!(" — not fired: {}", md_cell(e)))
                    .unwrap_or_default()
            );
        }
    }
    let m = &r.measured;
    let _ = writeln!(s, "\n## Recoveries\n");
    if m.recoveries.is_empty() {
        let _ = writeln!(s, "None.");
    } else {
        let _ = writeln!(
            s,
            "| epoch | resumed at | redone | MTTR s | state from |\n|---|---|---|---|---|"
        );
        for rc in &m.recoveries {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                rc.epoch,
                rc.resumed_at_step,
                rc.steps_redone,
                rc.mttr_s.map(|x| format!("{x:.2}")).unwrap_or_default(),
                md_cell(&rc.source)
            );
        }
    }
    let _ = writeln!(
        s,
        "\nWall time {:.1} s, effective training time {}, final params_sha256 `{}`{}.\n",
        m.wall_s,
        m.effective_training_time
            .map(|x| format!("{:.1}%", x * 100.0))
            .unwrap_or_else(|| "not measured".into()),
        m.params_sha256.as_deref().unwrap_or("-"),
        m.reference_sha256
            .as_deref()
            .map(|x| format!(" (reference `{x}`)"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "## Plots\n");
    for (file, title) in PLOTS {
        let _ = writeln!(s, "### {title}\n\n![{title}]({file})\n");
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Write report.json, report.md and the plots into `dir` (created).
pub fn write(dir: &Path, r: &Report) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json = serde_json::to_vec_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("report.json"), json)
        .map_err(|e| format!("writing report.json: {e}"))?;
    std::fs::write(dir.join("report.md"), markdown(r))
        .map_err(|e| format!("writing report.md: {e}"))?;
    plot_loss(&dir.join(PLOTS[0].0), r)?;
    plot_step_time(&dir.join(PLOTS[1].0), r)?;
    plot_world(&dir.join(PLOTS[2].0), r)?;
    plot_controllers(&dir.join(PLOTS[3].0), r)?;
    Ok(())
}

/// Read a report back (for `phalanx report DIR`).
pub fn read(dir: &Path) -> Result<Report, String> {
    let p = dir.join("report.json");
    let text = std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("parsing {}: {e}", p.display()))
}

type PlotResult = Result<(), String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("plotting: {e:?}")
}

const W: u32 = 960;
const H: u32 = 420;
const FAULT: RGBColor = RGBColor(200, 30, 30);
const SPAN: RGBColor = RGBColor(255, 170, 0);

fn time_max(r: &Report) -> f64 {
    let t = r
        .progress
        .iter()
        .map(|p| p.t_s)
        .chain(r.faults.iter().map(|f| f.t_s + f.duration_s.unwrap_or(0.0)))
        .chain(r.measured.leaders.iter().map(|l| l.t_s))
        .fold(r.measured.wall_s, f64::max);
    if t.is_finite() && t > 0.0 {
        t * 1.02
    } else {
        1.0
    }
}

/// A message instead of a chart, when there is nothing to draw.
fn empty(path: &Path, title: &str, why: &str) -> PlotResult {
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    root.draw(&Text::new(
        format!("{title}: {why}"),
        (20, (H / 2) as i32),
        ("sans-serif", 16).into_font(),
    ))
    .map_err(err)?;
    root.present().map_err(err)
}

fn plot_loss(path: &Path, r: &Report) -> PlotResult {
    let title = "loss against step (red: faults, orange: recovery spans)";
    if r.losses.is_empty() {
        return empty(path, title, "no loss was logged");
    }
    let xmax = r.losses.iter().map(|(s, _)| *s as f64).fold(1.0, f64::max);
    let (lo, hi) = r
        .losses
        .iter()
        .map(|(_, l)| *l)
        .filter(|l| l.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), l| {
            (a.min(l), b.max(l))
        });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    } else {
        (0.0, 10.0)
    };
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..xmax, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(err)?;
    for rc in &r.measured.recoveries {
        // The steps trained again (at least one step wide, so a span shows).
        let a = rc.resumed_at_step as f64;
        let b = a + (rc.steps_redone as f64).max(1.0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, lo), (b, hi)],
                SPAN.mix(0.35).filled(),
            )))
            .map_err(err)?;
    }
    chart
        .draw_series(LineSeries::new(
            r.losses.iter().map(|(s, l)| (*s as f64, *l)),
            &BLUE,
        ))
        .map_err(err)?
        .label("loss (rank 0)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    for f in r.faults.iter().filter(|f| f.error.is_none()) {
        let x = f.step as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, lo), (x, hi)],
                FAULT.stroke_width(2),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                f.kind.clone(),
                (x, hi - (hi - lo) * (0.04 + 0.05 * (f.index % 4) as f64)),
                ("sans-serif", 12).into_font().color(&FAULT),
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Blue (fast) to red (slow), for a fraction in 0..=1.
fn heat(x: f64) -> RGBColor {
    let x = x.clamp(0.0, 1.0);
    let stops = [
        (0.0, (49.0, 54.0, 149.0)),
        (0.33, (116.0, 173.0, 209.0)),
        (0.66, (253.0, 174.0, 97.0)),
        (1.0, (215.0, 48.0, 39.0)),
    ];
    for w in stops.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if x <= b {
            let f = (x - a) / (b - a);
            let m = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
            return RGBColor(m(ca.0, cb.0), m(ca.1, cb.1), m(ca.2, cb.2));
        }
    }
    RGBColor(215, 48, 39)
}

/// Per (time bucket, rank): milliseconds per step (`None`: no progress, a stall).
pub fn step_time_grid(r: &Report, buckets: usize) -> (f64, Vec<Vec<Option<f64>>>) {
    let ranks = r
        .progress
        .iter()
        .map(|p| p.rank_steps.len())
        .max()
        .unwrap_or(0);
    let end = r.progress.last().map(|p| p.t_s).unwrap_or(0.0);
    let start = r
        .progress
        .iter()
        .find(|p| p.rank_steps.iter().any(|s| *s > 0))
        .map(|p| p.t_s)
        .unwrap_or(0.0);
    let buckets = buckets.max(1);
    let width = ((end - start) / buckets as f64).max(1e-3);
    // Rank r's step at time t, linear between the polls around t (the polls are further
    // apart than a bucket may be wide).
    let steps_at = |rank: usize, t: f64| -> f64 {
        let after = r.progress.iter().position(|p| p.t_s >= t);
        let at = |p: &ProgressSample| p.rank_steps.get(rank).copied().unwrap_or(0) as f64;
        match after {
            Some(0) => at(&r.progress[0]),
            Some(i) => {
                let (a, b) = (&r.progress[i - 1], &r.progress[i]);
                let f = if b.t_s > a.t_s {
                    (t - a.t_s) / (b.t_s - a.t_s)
                } else {
                    1.0
                };
                at(a) + (at(b) - at(a)) * f
            }
            None => r.progress.last().map(at).unwrap_or(0.0),
        }
    };
    let mut grid = vec![vec![None; ranks]; buckets];
    for (b, row) in grid.iter_mut().enumerate() {
        let (t0, t1) = (start + b as f64 * width, start + (b + 1) as f64 * width);
        for (rank, cell) in row.iter_mut().enumerate() {
            let done = steps_at(rank, t1) - steps_at(rank, t0);
            // Less than a tenth of a step in the bucket: a stall.
            if done > 0.1 {
                *cell = Some(width * 1e3 / done);
            }
        }
    }
    (width, grid)
}

fn plot_step_time(path: &Path, r: &Report) -> PlotResult {
    let title = "time per step by rank (blue fast, red slow, black: no step)";
    let buckets = 60;
    let (width, grid) = step_time_grid(r, buckets);
    let ranks = grid.first().map(|row| row.len()).unwrap_or(0);
    if ranks == 0 {
        return empty(path, title, "no progress was recorded");
    }
    let start = r
        .progress
        .iter()
        .find(|p| p.rank_steps.iter().any(|s| *s > 0))
        .map(|p| p.t_s)
        .unwrap_or(0.0);
    let vals: Vec<f64> = grid.iter().flatten().flatten().copied().collect();
    let (lo, hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    let (llo, lhi) = (lo.max(1e-3).ln(), hi.max(1e-3).ln());
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{title}; {:.0}..{:.0} ms/step",
                if lo.is_finite() { lo } else { 0.0 },
                if hi.is_finite() { hi } else { 0.0 }
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(start..start + width * buckets as f64, 0f64..ranks as f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("seconds since submission")
        .y_desc("rank")
        .y_labels(ranks.min(16) + 1)
        .y_label_formatter(&|y| format!("{:.0}", y.floor()))
        .draw()
        .map_err(err)?;
    let cells = grid.iter().enumerate().flat_map(|(b, row)| {
        row.iter().enumerate().map(move |(rank, cell)| {
            let x0 = start + b as f64 * width;
            let color = match cell {
                Some(ms) if lhi > llo => heat((ms.max(1e-3).ln() - llo) / (lhi - llo)),
                Some(_) => heat(0.0),
                None => RGBColor(20, 20, 20),
            };
            Rectangle::new(
                [(x0, rank as f64), (x0 + width, rank as f64 + 0.95)],
                color.filled(),
            )
        })
    });
    chart.draw_series(cells).map_err(err)?;
    for f in r.faults.iter().filter(|f| f.error.is_none()) {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(f.t_s, 0.0), (f.t_s, ranks as f64)],
                WHITE.stroke_width(2),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

fn plot_world(path: &Path, r: &Report) -> PlotResult {
    let title = "world size (ranks in the plan) and plan epochs";
    if r.progress.is_empty() {
        return empty(path, title, "no progress was recorded");
    }
    let tmax = time_max(r);
    let ymax = r
        .progress
        .iter()
        .map(|p| p.ranks.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        + 1.0;
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since submission")
        .y_desc("ranks")
        .draw()
        .map_err(err)?;
    let mut pts = Vec::new();
    let mut last: Option<(f64, usize)> = None;
    for p in &r.progress {
        let n = p.ranks.len();
        if let Some((_, prev)) = last {
            if prev != n {
                pts.push((p.t_s, prev as f64));
            }
        }
        pts.push((p.t_s, n as f64));
        last = Some((p.t_s, n));
    }
    chart
        .draw_series(LineSeries::new(pts, BLUE.stroke_width(2)))
        .map_err(err)?
        .label("world size")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let mut epoch = 0;
    for p in &r.progress {
        if p.epoch != epoch {
            epoch = p.epoch;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(p.t_s, 0.0), (p.t_s, ymax)],
                    RGBColor(120, 120, 120),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("e{epoch}"),
                    (p.t_s, ymax - 0.3),
                    ("sans-serif", 12).into_font(),
                )))
                .map_err(err)?;
        }
    }
    for f in r.faults.iter().filter(|f| f.error.is_none()) {
        let end = f.t_s + f.duration_s.unwrap_or(0.0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(f.t_s, 0.0), (end.max(f.t_s + tmax * 0.003), 0.35)],
                FAULT.filled(),
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn plot_controllers(path: &Path, r: &Report) -> PlotResult {
    let title = "controller terms (lines) and leaders (filled dots)";
    let l = &r.measured.leaders;
    if l.is_empty() {
        return empty(path, title, "no controller status was recorded");
    }
    let tmax = time_max(r);
    let tmin_term = l.iter().map(|s| s.term).min().unwrap_or(0) as f64;
    let tmax_term = l.iter().map(|s| s.term).max().unwrap_or(1) as f64;
    let nodes: std::collections::BTreeSet<u64> = l.iter().map(|s| s.node).collect();
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..tmax, (tmin_term - 0.5)..(tmax_term + 1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since submission")
        .y_desc("term")
        .draw()
        .map_err(err)?;
    for (i, node) in nodes.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // Each node's term, nudged apart so the lines do not hide each other.
        let dy = (i as f64 - nodes.len() as f64 / 2.0) * 0.06;
        let mine: Vec<_> = l.iter().filter(|s| s.node == *node).collect();
        chart
            .draw_series(LineSeries::new(
                mine.iter().map(|s| (s.t_s, s.term as f64 + dy)),
                color,
            ))
            .map_err(err)?
            .label(format!("node {node}"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        chart
            .draw_series(
                mine.iter()
                    .filter(|s| s.role == RaftRole::Leader)
                    .map(|s| Circle::new((s.t_s, s.term as f64 + dy), 3, color.filled())),
            )
            .map_err(err)?;
    }
    for f in r.faults.iter().filter(|f| f.error.is_none()) {
        let end = f.t_s + f.duration_s.unwrap_or(0.0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (f.t_s, tmin_term - 0.5),
                    (end.max(f.t_s + tmax * 0.003), tmin_term - 0.3),
                ],
                FAULT.filled(),
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
