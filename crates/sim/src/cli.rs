//! `phalanx sim ...`: the arguments (clap) and what each verb does. The `phalanx` binary
//! only forwards to [`run`], so the simulator needs no libtorch.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};

use crate::config::{self, SimFile};
use crate::model::Job;
use crate::{calibrate, engine, report, sweep};

/// Simulate a large training job in virtual time (16k-131k GPUs, failures, recovery
/// policies, checkpoints) on the controller's own policy code.
#[derive(Debug, Args)]
pub struct SimCommand {
    #[command(subcommand)]
    pub verb: SimVerb,
}

#[derive(Debug, Subcommand)]
pub enum SimVerb {
    /// One run: interruptions by cause, MTBF, lost GPU-hours, effective training time.
    Run(RunArgs),
    /// One parameter over a range: a table and an SVG curve.
    Sweep(SweepArgs),
    /// Phalanx's detection and recovery times from real runs' JSON (a demo summary,
    /// `job status --json`, a scenario report.json): prints a [policy.phalanx] section.
    Calibrate(CalibrateArgs),
    /// Print the JSON Schema of simulation files.
    Schema,
    /// List the presets.
    Presets,
}

#[derive(Debug, Args)]
pub struct Source {
    /// A simulation file (TOML; see `phalanx sim schema`).
    #[arg(required_unless_present = "preset", conflicts_with = "preset")]
    pub file: Option<PathBuf>,
    /// A built-in configuration (`phalanx sim presets`).
    #[arg(long)]
    pub preset: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: Source,
    /// Seed of the failure draws (default: the file's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Days to simulate (default: the file's).
    #[arg(long)]
    pub days: Option<f64>,
    /// Print the outcome as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write outcome.json and timeline.svg into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub source: Source,
    /// NAME=VALUES: checkpoint_interval_min=5..240 (12 points; A..B:N for N),
    /// spares=0,8,16, policy=restart,phalanx, gpus=16384,131072.
    #[arg(long)]
    pub param: String,
    /// Seeds per value (1..=N); every value runs on the same ones.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Days to simulate (default: the file's).
    #[arg(long)]
    pub days: Option<f64>,
    /// Print the results as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write sweep.json and sweep.svg into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// JSON files from real runs.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Write the section to this file instead of printing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn load(src: &Source, days: Option<f64>) -> anyhow::Result<SimFile> {
    let mut f = match (&src.file, &src.preset) {
        (_, Some(p)) => config::preset(p)?,
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            config::parse(&text, &path.display().to_string())?
        }
        (None, None) => bail!("give a simulation file or --preset NAME"),
    };
    if let Some(d) = days {
        f.days = d;
        f.validate("--days")?;
    }
    Ok(f)
}

fn build(f: &SimFile) -> anyhow::Result<Job> {
    Job::build(f).map_err(|e| anyhow!("{}: {e}", f.name))
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Run a `phalanx sim` verb.
pub fn run(cmd: SimCommand) -> anyhow::Result<()> {
    match cmd.verb {
        SimVerb::Run(a) => {
            let f = load(&a.source, a.days)?;
            let job = build(&f)?;
            let seed = a.seed.unwrap_or(f.seed);
            let o = engine::run(&f, &job, seed);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&o)?);
            } else {
                print!("{}", report::text(&f, &job, &o));
            }
            if let Some(dir) = &a.report {
                mkdir(dir)?;
                let json = dir.join("outcome.json");
                std::fs::write(&json, serde_json::to_string_pretty(&o)?)
                    .with_context(|| format!("writing {}", json.display()))?;
                report::timeline_svg(&o, &dir.join("timeline.svg"))?;
                eprintln!(
                    "report: {}, {}",
                    json.display(),
                    dir.join("timeline.svg").display()
                );
            }
            Ok(())
        }
        SimVerb::Sweep(a) => {
            let f = load(&a.source, a.days)?;
            let s = sweep::parse_param(&a.param).map_err(|e| anyhow!(e))?;
            if a.seeds == 0 || a.seeds > 1_000 {
                bail!("--seeds {}: expected 1..=1000", a.seeds);
            }
            let seeds: Vec<u64> = (1..=a.seeds).collect();
            let r = sweep::sweep(&f, &s, &seeds).map_err(|e| anyhow!("{}: {e}", f.name))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", sweep::text(&r));
            }
            if let Some(dir) = &a.report {
                mkdir(dir)?;
                let json = dir.join("sweep.json");
                std::fs::write(&json, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("writing {}", json.display()))?;
                sweep::svg(&r, &dir.join("sweep.svg"))?;
                eprintln!(
                    "report: {}, {}",
                    json.display(),
                    dir.join("sweep.svg").display()
                );
            }
            Ok(())
        }
        SimVerb::Calibrate(a) => {
            let mut s = calibrate::Samples::default();
            for p in &a.files {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                calibrate::read(&p.display().to_string(), &text, &mut s).map_err(|e| anyhow!(e))?;
            }
            let t = calibrate::timings(&s);
            let section = calibrate::toml_section(&s, &t);
            match &a.out {
                Some(out) => std::fs::write(out, &section)
                    .with_context(|| format!("writing {}", out.display()))?,
                None => print!("{section}"),
            }
            Ok(())
        }
        SimVerb::Schema => {
            print!("{}", config::schema_json());
            Ok(())
        }
        SimVerb::Presets => {
            for (name, text) in config::PRESETS {
                let f = config::parse(text, name)?;
                println!(
                    "{name:<20} {} GPUs, {} days, policy {}",
                    f.hardware.gpus,
                    f.days,
                    f.policy.kind.as_str()
                );
            }
            Ok(())
        }
    }
}
