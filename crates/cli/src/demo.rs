//! `phalanx demo` (what `just run` runs): the library scenario `scenarios/demo.toml`, run
//! by the scenario runner (no fault engine of its own). A local cluster of 3 controllers
//! and 4 emulated GPUs plus a spare trains a GPT while a worker is killed, another hangs
//! and the controller leader is killed. It ends with a summary of every fault: how it was
//! detected, the time to recover, the steps redone, the effective training time, and
//! whether the final parameters are bit-identical to a fault-free `phalanx train`.
//!
//! The flags adapt the scenario (model, steps, seed, workers, the fault schedule); the
//! scenario actually run is written next to the cluster directory, so `phalanx scenario
//! run` replays it, and the runner's report (JSON, Markdown, plots) lands in the cluster
//! directory's `report/`.
use phalanx_proto::EventKind;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use phalanx_chaos::report::{FiredFault, Report};
use serde::Serialize;

use crate::util::write_json;

/// The library scenario the demo runs (compiled in, so the binary runs it from anywhere).
const DEMO_SCENARIO: &str = include_str!("../../../scenarios/demo.toml");
/// The job length the scenario's fault steps are written for.
const DEMO_STEPS: i64 = 300;
/// The job uses at most this many workers; the rest are spares.
const DEMO_WORLD_MAX: u32 = 4;

#[derive(Args, Debug)]
pub struct DemoCmd {
    /// Cluster directory (recreated).
    #[arg(long, default_value = "target/demo-cluster")]
    dir: PathBuf,
    /// Model configuration (tiny, small, base, gpt2-124m).
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Optimizer steps of the demo job.
    #[arg(long, default_value_t = 300)]
    steps: u64,
    /// Seed of the job (initial parameters and data order).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the summary as JSON here.
    #[arg(long, default_value = "target/demo-summary.json")]
    summary: PathBuf,
    /// Workers to start (the job uses at most 4; the rest are spares).
    #[arg(long, default_value_t = 5)]
    workers: u32,
    /// The fault schedule, `KIND:TARGET@STEP[:FOR]`, comma-separated (scenario fault kinds
    /// and targets, FOR in seconds with a unit: `10s`). Default: the scenario's (kill rank
    /// 1 at 1/5 of the steps, hang rank 2 for 10 s at 2/5, kill the controller leader at
    /// 3/5).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Instead of a schedule by step: kill a rank (cycling 0..3) every this many seconds.
    #[arg(long, conflicts_with = "faults")]
    fault_every_s: Option<u64>,
}

/// `KIND:TARGET@STEP[:FOR]` as a scenario `[[faults]]` table.
fn parse_fault(s: &str) -> Result<toml::Table> {
    let bad = |why: &str| {
        anyhow!(
            "bad --faults entry `{s}`: {why} (expected KIND:TARGET@STEP[:FOR], e.g. \
             kill:rank:1@60 or hang:rank:2@120:10s)"
        )
    };
    let (head, tail) = s.split_once('@').ok_or_else(|| bad("no `@STEP`"))?;
    let (kind, target) = head.split_once(':').ok_or_else(|| bad("no `:TARGET`"))?;
    let (step, for_) = match tail.split_once(':') {
        Some((st, f)) => (st, Some(f)),
        None => (tail, None),
    };
    let mut t = toml::Table::new();
    t.insert("kind".into(), kind.into());
    t.insert("target".into(), target.into());
    let step: i64 = step.parse().map_err(|_| bad("STEP is not a number"))?;
    t.insert("at_step".into(), step.into());
    if let Some(f) = for_ {
        let secs = f
            .strip_suffix('s')
            .and_then(|n| n.parse::<f64>().ok())
            .ok_or_else(|| bad("FOR must be seconds with a unit, like 10s"))?;
        t.insert("duration_s".into(), secs.into());
    }
    Ok(t)
}

impl DemoCmd {
    /// The scenario file this run executes: the library's, adapted by the flags. Its
    /// validation (with line and column) is the scenario parser's.
    fn scenario_text(&self) -> Result<String> {
        let mut doc: toml::Table = DEMO_SCENARIO
            .parse()
            .context("the built-in demo scenario")?;
        let section = |doc: &mut toml::Table, name: &str| -> Result<toml::Table> {
            doc.get(name)
                .and_then(|v| v.as_table())
                .cloned()
                .ok_or_else(|| anyhow!("the built-in demo scenario has no [{name}]"))
        };
        let mut job = section(&mut doc, "job")?;
        let steps = i64::try_from(self.steps).map_err(|_| anyhow!("--steps is too large"))?;
        job.insert("model".into(), self.model.as_str().into());
        job.insert("steps".into(), steps.into());
        let seed = i64::try_from(self.seed).map_err(|_| anyhow!("--seed is too large"))?;
        job.insert("seed".into(), seed.into());
        doc.insert("job".into(), job.into());

        let mut cluster = section(&mut doc, "cluster")?;
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        let workers = self.workers.min(DEMO_WORLD_MAX);
        cluster.insert("workers".into(), i64::from(workers).into());
        cluster.insert("spares".into(), i64::from(self.workers - workers).into());
        doc.insert("cluster".into(), cluster.into());

        let faults: Vec<toml::Value> = if let Some(every) = self.fault_every_s {
            if every == 0 {
                bail!("--fault-every-s must be positive");
            }
            (1..=64i64)
                .map(|i| {
                    let mut t = toml::Table::new();
                    t.insert("kind".into(), "kill".into());
                    t.insert("target".into(), format!("rank:{}", i % 4).into());
                    t.insert("at_s".into(), ((every as f64) * i as f64).into());
                    t.into()
                })
                .collect()
        } else if !self.faults.is_empty() {
            self.faults
                .iter()
                .map(|f| parse_fault(f).map(Into::into))
                .collect::<Result<_>>()?
        } else {
            // The scenario's own schedule, at the same fractions of the job's length.
            let mut own: Vec<toml::Value> = doc
                .get("faults")
                .and_then(|f| f.as_array())
                .cloned()
                .unwrap_or_default();
            for f in own.iter_mut().filter_map(|f| f.as_table_mut()) {
                if let Some(at) = f.get("at_step").and_then(|v| v.as_integer()) {
                    let scaled = at
                        .checked_mul(steps)
                        .ok_or_else(|| anyhow!("--steps {steps} is too large"))?
                        / DEMO_STEPS;
                    f.insert("at_step".into(), scaled.into());
                }
            }
            own
        };
        doc.insert("faults".into(), faults.into());
        if self.fault_every_s.is_some() || self.steps as i64 > DEMO_STEPS {
            // Long runs: the wall-time bound of the 300-step demo does not apply.
            if let Some(expect) = doc.get_mut("expect").and_then(|e| e.as_table_mut()) {
                expect.remove("max_wall_s");
            }
        }
        let header: String = DEMO_SCENARIO
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(format!(
            "{header}# Written by `phalanx demo`, from scenarios/demo.toml and its flags.\n{}",
            toml::to_string(&doc)?
        ))
    }
}

#[derive(Serialize, Clone)]
struct FaultReport {
    fault: String,
    target: String,
    at_step: u64,
    detected_by: String,
    detect_s: f64,
    /// From the fault to the first step committed after it.
    mttr_s: f64,
    /// Steps trained again because the fault interrupted them.
    steps_redone: u64,
}

#[derive(Serialize)]
struct DemoSummary {
    model: String,
    steps: u64,
    seed: u64,
    faults: Vec<FaultReport>,
    wall_s: f64,
    effective_training_time: f64,
    final_epoch: u64,
    /// Mean wall time per step before the first fault.
    step_ms_before_faults: f64,
    params_sha256: String,
    reference_params_sha256: String,
    bit_identical: bool,
}

/// Event kinds that are a decision about a failure.
fn is_detection(kind: EventKind) -> bool {
    use phalanx_proto::EventKind as K;
    matches!(
        kind,
        K::WorkerFailed
            | K::WorkerSuspect
            | K::WorkerQuarantined
            | K::WorkerDraining
            | K::EpochStuck
            | K::Plan
    )
}

/// The largest `field` of the runner's progress samples taken up to `t_s`.
fn max_until(
    r: &Report,
    t_s: f64,
    field: impl Fn(&phalanx_chaos::report::ProgressSample) -> u64,
) -> Option<u64> {
    r.progress.iter().filter(|p| p.t_s <= t_s).map(field).max()
}

/// Detection and recovery of one fired fault, from what the runner recorded.
///
/// A worker fault's recovery is the first one of a later plan epoch than the one the
/// fault hit; its MTTR is the one the job reports (from the interrupted rank's last step
/// before the fault to its first step after it, measured by the workers), and its
/// detection the first failure decision the runner saw after the fault (to its 200 ms
/// poll). A controller fault needs no new plan: it is detected by the election (a leader
/// other than the one before it, in the runner's 250 ms samples of every controller), and
/// recovered when the job's progress moves past where it stood at the election.
fn fault_report(r: &Report, f: &FiredFault, until_s: f64) -> FaultReport {
    let m = &r.measured;
    let mut out = FaultReport {
        fault: f.kind.clone(),
        target: f.target.clone(),
        at_step: f.step,
        detected_by: String::new(),
        detect_s: f64::NAN,
        mttr_s: f64::NAN,
        steps_redone: 0,
    };
    if f.target.starts_with("controller") {
        let before = m
            .leaders
            .iter()
            .filter(|l| l.t_s <= f.t_s && l.leader != 0)
            .map(|l| l.leader)
            .next_back()
            .unwrap_or(0);
        if let Some(l) = m
            .leaders
            .iter()
            .find(|l| l.t_s > f.t_s && l.leader != 0 && l.leader != before && l.node == l.leader)
        {
            out.detected_by = format!("Raft election: node {} leads term {}", l.leader, l.term);
            out.detect_s = l.t_s - f.t_s;
            let at_election = max_until(r, l.t_s, |p| p.progress_step).unwrap_or(f.step);
            if let Some(p) = r
                .progress
                .iter()
                .find(|p| p.t_s > l.t_s && p.progress_step > at_election)
            {
                out.mttr_s = p.t_s - f.t_s;
            }
        }
        return out;
    }
    if let Some(e) = m
        .events
        .iter()
        .find(|e| e.t_s >= f.t_s && e.t_s < until_s && is_detection(e.kind))
    {
        out.detected_by = format!("{}: {}", e.kind, e.reason);
        out.detect_s = e.t_s - f.t_s;
    }
    let epoch_at_fault = max_until(r, f.t_s, |p| p.epoch).unwrap_or(0);
    // The recovery must come from a plan made before the next fault fired, or it is that
    // fault's (a fault that caused no new plan in its window gets none).
    let epoch_by_next = if until_s.is_finite() {
        max_until(r, until_s, |p| p.epoch).unwrap_or(u64::MAX)
    } else {
        u64::MAX
    };
    if let Some(rec) = m
        .recoveries
        .iter()
        .find(|rec| rec.epoch > epoch_at_fault && rec.epoch <= epoch_by_next)
    {
        out.mttr_s = rec.mttr_s.unwrap_or(f64::NAN);
        out.steps_redone = rec.steps_redone;
    }
    out
}

pub fn run(cmd: DemoCmd) -> Result<()> {
    let text = cmd.scenario_text()?;
    // The old demo recreated its directory; the runner refuses a directory it did not make.
    if cmd.dir.exists() && !cmd.dir.join(".phalanx-scenario").exists() {
        std::fs::remove_dir_all(&cmd.dir)
            .with_context(|| format!("recreating {}", cmd.dir.display()))?;
    }
    let file = cmd.dir.with_extension("scenario.toml");
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let v = phalanx_chaos::parse(&file.display().to_string(), &text)
        .map_err(|e| anyhow!("the demo's flags make an invalid scenario:\n{e}"))?;
    let report_dir = cmd.dir.join("report");
    let opts = crate::scenario::RunOptions {
        file: file.clone(),
        seed: Some(cmd.seed),
        report: Some(report_dir.clone()),
        dir: Some(cmd.dir.clone()),
        timeout_s: None,
    };
    let report = crate::scenario::run_and_write(&opts, &v, &report_dir)?;

    let m = &report.measured;
    let fired: Vec<&FiredFault> = report.faults.iter().filter(|f| f.error.is_none()).collect();
    let faults: Vec<FaultReport> = fired
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let until = fired.get(i + 1).map(|n| n.t_s).unwrap_or(f64::INFINITY);
            fault_report(&report, f, until)
        })
        .collect();
    let first_fault_s = report.faults.first().map(|f| f.t_s);
    let step_ms_before_faults = first_fault_s
        .and_then(|t| {
            report
                .progress
                .iter()
                .rfind(|p| p.t_s <= t && p.progress_step > 0)
                .map(|p| p.t_s * 1e3 / p.progress_step as f64)
        })
        .unwrap_or(f64::NAN);
    let sha = m.params_sha256.clone().unwrap_or_default();
    let reference = m.reference_sha256.clone().unwrap_or_default();
    let summary = DemoSummary {
        model: cmd.model.clone(),
        steps: cmd.steps,
        seed: cmd.seed,
        faults,
        wall_s: m.wall_s,
        effective_training_time: m.effective_training_time.unwrap_or(f64::NAN),
        final_epoch: report.progress.last().map(|p| p.epoch).unwrap_or(0),
        step_ms_before_faults,
        bit_identical: !sha.is_empty() && sha == reference,
        params_sha256: sha,
        reference_params_sha256: reference,
    };
    print_summary(&summary);
    if let Some(parent) = cmd.summary.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_json(&cmd.summary, &summary)?;
    println!("summary written to {}", cmd.summary.display());
    println!(
        "scenario {} (replay: {}); report {}",
        file.display(),
        report.replay,
        report_dir.join("report.md").display()
    );
    if !summary.bit_identical {
        bail!(
            "the final parameters differ from the fault-free run (seed {}; rerun: phalanx demo --seed {})",
            cmd.seed,
            cmd.seed
        );
    }
    if !report.passed {
        let failed: Vec<String> = report
            .failed()
            .map(|v| format!("{} (measured {})", v.name, v.measured))
            .collect();
        bail!(
            "the demo scenario failed: {}",
            if failed.is_empty() {
                report
                    .error
                    .clone()
                    .unwrap_or_else(|| "a fault could not be fired".into())
            } else {
                failed.join(", ")
            }
        );
    }
    Ok(())
}

fn print_summary(s: &DemoSummary) {
    println!();
    println!("== summary");
    println!(
        "{:<6} {:<20} {:>7} {:>9} {:>8} {:>7}  DETECTED BY",
        "FAULT", "TARGET", "AT STEP", "DETECT s", "MTTR s", "REDONE"
    );
    for f in &s.faults {
        println!(
            "{:<6} {:<20} {:>7} {:>9.2} {:>8.2} {:>7}  {}",
            f.fault, f.target, f.at_step, f.detect_s, f.mttr_s, f.steps_redone, f.detected_by
        );
    }
    println!(
        "wall time {:.1} s; effective training time {:.1}% (wall time minus recovery windows)",
        s.wall_s,
        s.effective_training_time * 100.0
    );
    println!(
        "final plan epoch {}; {:.1} ms per step before the first fault",
        s.final_epoch, s.step_ms_before_faults
    );
    println!("params_sha256 {}", s.params_sha256);
    println!(
        "reference     {} (phalanx train, no faults)",
        s.reference_params_sha256
    );
    println!(
        "bit-identical to the fault-free run: {}",
        if s.bit_identical { "yes" } else { "NO" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoCmd,
    }

    fn scenario(args: &[&str]) -> Result<phalanx_chaos::Validated> {
        let cmd = Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))?.demo;
        let text = cmd.scenario_text()?;
        phalanx_chaos::parse("demo", &text).map_err(|e| anyhow!("{e}"))
    }

    #[test]
    fn the_default_demo_is_the_library_scenario() {
        let v = scenario(&[]).unwrap();
        let lib = phalanx_chaos::parse("scenarios/demo.toml", DEMO_SCENARIO).unwrap();
        assert_eq!(v.faults, lib.faults);
        assert_eq!(v.scenario.job, lib.scenario.job);
        assert_eq!(v.scenario.cluster, lib.scenario.cluster);
        assert_eq!(v.scenario.expect, lib.scenario.expect);
    }

    #[test]
    fn flags_adapt_the_scenario() {
        let v = scenario(&["--steps", "200", "--workers", "4", "--model", "small"]).unwrap();
        let steps: Vec<String> = v.faults.iter().map(|f| f.trigger.to_string()).collect();
        assert_eq!(steps, ["at step 40", "at step 80", "at step 120"]);
        assert_eq!(
            (v.scenario.cluster.workers, v.scenario.cluster.spares),
            (4, 0)
        );
        assert_eq!(v.scenario.job.model.as_str(), "small");

        let v = scenario(&["--faults", "hang:rank:1@60:5s,partition:rank:2@90:4s"]).unwrap();
        assert_eq!(v.faults.len(), 2);
        assert_eq!(v.faults[0].duration_s, Some(5.0));
        assert_eq!(v.faults[1].kind.as_str(), "partition");

        let v = scenario(&["--fault-every-s", "60", "--steps", "1500"]).unwrap();
        assert_eq!(v.faults.len(), 64);
        assert_eq!(v.scenario.expect.max_wall_s, None);
    }

    #[test]
    fn bad_flags_name_what_is_wrong() {
        let e = scenario(&["--faults", "kill:rank:1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `@STEP`"), "{e}");
        let e = scenario(&["--faults", "hang:rank:1@60:5"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("seconds with a unit"), "{e}");
        let e = scenario(&["--faults", "explode:rank:1@60"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("explode"), "{e}");
        let e = scenario(&["--model", "huge"]).unwrap_err().to_string();
        assert!(e.contains("huge"), "{e}");
        let e = scenario(&["--faults", "kill:rank:1@999"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("999"), "{e}");
    }
}
