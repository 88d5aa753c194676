//! What a run prints (a table), writes (`--json`) and draws (`--report DIR`: a timeline
//! SVG with plotters).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::engine::{Lost, Outcome};
use crate::failures::{info, Rates, CAUSES};
use crate::model::Job;
use crate::SimFile;

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The table `phalanx sim run` prints. A function of the outcome alone (no wall time), so
/// the same seed prints the same bytes.
pub fn text(f: &SimFile, job: &Job, o: &Outcome) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "simulation {}: {} x {}, {} days, policy {}, seed {}",
        o.name,
        thousands(o.gpus),
        job.gpu.name,
        o.days,
        o.policy.as_str(),
        o.seed
    );
    let _ = writeln!(
        s,
        "job: {:.1}B parameters, TP {} x PP {} x DP {}, {:.1} GiB per GPU; step {:.2} s \
         (compute {:.2}, bubble {:.2}, exposed comms {:.2}); MFU {:.1}%",
        job.params / 1e9,
        job.tp,
        job.pp,
        job.dp,
        job.memory_gib_per_gpu,
        job.step.total_s,
        job.step.compute_s,
        job.step.bubble_s,
        job.step.tp_comm_s + job.step.pp_comm_s + job.step.dp_comm_exposed_s + job.step.ep_comm_s,
        job.step.mfu * 100.0
    );
    let _ = writeln!(
        s,
        "checkpoints: {} every {:.1} min (Young/Daly optimum {:.1} min), write {:.1} s; \
         {} written, {} restores",
        f.checkpoint.mode.as_str(),
        o.checkpoint_interval_min,
        o.daly_interval_min,
        o.checkpoint_write_s,
        thousands(o.checkpoints),
        thousands(o.checkpoint_restores)
    );
    let rates = Rates::new(&f.failures, f.hardware.gpus);
    let horizon_s = o.days * 86_400.0;
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<32} {:>8} {:>13} {:>8} {:>7}",
        "cause", "failures", "interruptions", "expected", "share"
    );
    let total = o.failures.max(1) as f64;
    for c in CAUSES {
        let n = o.failures_by_cause.get(&c.cause).copied().unwrap_or(0);
        let i = o.interruptions_by_cause.get(&c.cause).copied().unwrap_or(0);
        let expected = rates
            .per_cause
            .iter()
            .find(|(x, _)| *x == c.cause)
            .map_or(0.0, |(_, r)| r * horizon_s);
        if n == 0 && expected == 0.0 {
            continue;
        }
        let _ = writeln!(
            s,
            "{:<32} {:>8} {:>13} {:>8.1} {:>6.1}%",
            info(c.cause).label,
            n,
            i,
            expected,
            n as f64 / total * 100.0
        );
    }
    let _ = writeln!(
        s,
        "{:<32} {:>8} {:>13} {:>8.1}",
        "total unexpected",
        o.failures,
        o.interruptions,
        rates.total_per_s * horizon_s
    );
    let _ = writeln!(
        s,
        "{:<32} {:>8} {:>13} {:>8.1}",
        "planned",
        o.planned,
        match o.policy {
            crate::config::PolicyKind::Restart => o.planned,
            crate::config::PolicyKind::Phalanx => 0,
        },
        rates.planned_per_s * horizon_s
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "MTBF of the job: {:.2} h (one failure per {:.0} GPU-days)",
        o.mtbf_h,
        o.mtbf_h * o.gpus as f64 / 24.0
    );
    let all_gpu_h = o.gpus as f64 * horizon_s / 3600.0;
    let _ = writeln!(s, "lost GPU-hours by reason:");
    for l in Lost::ALL {
        let h = o.lost_gpu_h.get(&l).copied().unwrap_or(0.0);
        let _ = writeln!(
            s,
            "  {:<28} {:>14} ({:.2}%)",
            l.as_str(),
            thousands(h.round() as u64),
            h / all_gpu_h * 100.0
        );
    }
    let _ = writeln!(
        s,
        "effective training time {:.2}%; goodput {:.2} M tokens/s of {:.2} M at full speed",
        o.effective_training_time * 100.0,
        o.goodput_tokens_per_s / 1e6,
        job.step.tokens_per_s / 1e6
    );
    if o.policy == crate::config::PolicyKind::Phalanx {
        let _ = writeln!(
            s,
            "spares: {} at the start, {} at the lowest; {} shrinks",
            f.policy.spare_hosts, o.spares_min, o.shrinks
        );
    }
    let _ = writeln!(s, "events simulated: {}", thousands(o.events));
    s
}

/// A plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The timeline: effective training time so far and the share of replicas running, over
/// the run, with a mark per failure (red: training stopped).
pub fn timeline_svg(o: &Outcome, path: &Path) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let days = o.days.max(1e-9);
    // The effective share of each sample window (the samples hold the running total).
    let mut window = Vec::new();
    let mut prev = (0.0, 0.0);
    for (h, e, _) in &o.samples {
        let progress = e * h;
        if *h > prev.0 {
            window.push((
                h / 24.0,
                ((progress - prev.1) / (h - prev.0)).clamp(0.0, 1.0),
            ));
        }
        prev = (*h, progress);
    }
    let lo = o
        .samples
        .iter()
        .map(|(_, e, c)| e.min(*c))
        .chain(window.iter().map(|(_, w)| *w))
        .fold(1.0f64, f64::min);
    let y0 = (lo - 0.02).clamp(0.0, 0.98);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: {} policy, seed {} — effective training time {:.2}%",
                o.name,
                o.policy.as_str(),
                o.seed,
                o.effective_training_time * 100.0
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..days, y0..1.0)
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("day")
        .y_desc("share")
        .draw()
        .map_err(|e| plot_err(path, e))?;
    chart
        .draw_series(LineSeries::new(
            o.samples.iter().map(|(h, e, _)| (h / 24.0, *e)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| plot_err(path, e))?
        .label("effective training time so far")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            window,
            RGBColor(150, 150, 230).stroke_width(1),
        ))
        .map_err(|e| plot_err(path, e))?
        .label(format!(
            "effective share per {:.1}-day window",
            days / crate::engine::SAMPLES as f64
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RGBColor(150, 150, 230)));
    chart
        .draw_series(LineSeries::new(
            o.samples.iter().map(|(h, _, c)| (h / 24.0, *c)),
            GREEN.stroke_width(1),
        ))
        .map_err(|e| plot_err(path, e))?
        .label("replicas running")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
    // At most about 20,000 marks: a long run at scale keeps every tenth or so.
    let every = o.incidents.len() / 20_000 + 1;
    let marks = o.incidents.iter().step_by(every).map(|i| {
        let color = if i.interrupted { RED } else { BLACK };
        Circle::new((i.t_h / 24.0, y0 + 0.004), 2, color.filled())
    });
    chart
        .draw_series(marks)
        .map_err(|e| plot_err(path, e))?
        .label("failure (red: training stopped)")
        .legend(|(x, y)| Circle::new((x + 8, y), 3, RED.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}
