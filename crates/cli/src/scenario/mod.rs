//! `phalanx scenario run | validate | list` and `phalanx report`: chaos scenario files
//! (the format, validation and reports are in `phalanx-chaos`; see docs/scenarios.md).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};

mod procs;
mod run;

#[derive(Subcommand, Debug)]
pub enum ScenarioCmd {
    /// Run a scenario: bring up its cluster, run its job, fire its faults, check its
    /// expectations, write its report, tear everything down. Exits 0 only when every
    /// expectation holds.
    Run(RunCmd),
    /// Check scenario files without running them (errors with line and column).
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The scenarios of a directory, each with its purpose (its opening comment).
    List {
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
    },
    /// Print the JSON Schema of scenario files.
    Schema,
}

#[derive(Args, Debug)]
pub struct RunCmd {
    pub file: PathBuf,
    /// The job's seed (and the swarm's and random targets'); default: the file's.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write report.json, report.md and the plots here (default: DIR/report).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The cluster's directory (default: target/scenarios/NAME; recreated).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up on the job after this many seconds (default: 1.5 x expect.max_wall_s +
    /// 60, or 1200).
    #[arg(long)]
    pub timeout_s: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ReportCmd {
    /// A report directory written by `phalanx scenario run`.
    pub dir: PathBuf,
}

fn load(file: &Path) -> Result<phalanx_chaos::Validated> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow!("reading {}: {e}", file.display()))?;
    phalanx_chaos::parse(&file.display().to_string(), &text).map_err(|e| anyhow!("{e}"))
}

pub fn run(cmd: ScenarioCmd) -> Result<()> {
    match cmd {
        ScenarioCmd::Run(c) => run_one(c),
        ScenarioCmd::Validate { files } => {
            let mut bad = 0;
            for f in &files {
                match load(f) {
                    Ok(v) => println!(
                        "ok {}: {} faults{}",
                        f.display(),
                        v.faults.len(),
                        if v.scenario.swarm.is_some() {
                            " + a swarm"
                        } else {
                            ""
                        }
                    ),
                    Err(e) => {
                        eprintln!("{e}");
                        bad += 1;
                    }
                }
            }
            if bad > 0 {
                bail!("{bad} of {} files are invalid", files.len());
            }
            Ok(())
        }
        ScenarioCmd::List { dir } => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| anyhow!("reading {}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let name = f.file_stem().unwrap_or_default().to_string_lossy();
                let valid = if phalanx_chaos::parse("", &text).is_ok() {
                    ""
                } else {
                    " (INVALID)"
                };
                println!("{name:<34} {}{valid}", phalanx_chaos::purpose(&text));
            }
            Ok(())
        }
        ScenarioCmd::Schema => {
            print!("{}", phalanx_chaos::schema_json());
            Ok(())
        }
    }
}

fn run_one(c: RunCmd) -> Result<()> {
    let v = load(&c.file)?;
    let opts = run::RunOptions {
        file: c.file.clone(),
        seed: c.seed,
        report: c.report.clone(),
        dir: c.dir.clone(),
        timeout_s: c.timeout_s,
    };
    let report = run::run(&opts, &v)?;
    let dir = c.report.clone().unwrap_or_else(|| {
        c.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/scenarios").join(&v.scenario.name))
            .join("report")
    });
    if let Err(e) = phalanx_chaos::report::write(&dir, &report) {
        eprintln!("warning: writing the report: {e}");
    }
    println!();
    print!("{}", phalanx_chaos::report::summary_text(&report));
    println!("report: {}", dir.join("report.md").display());
    if report.passed {
        Ok(())
    } else {
        let failed: Vec<String> = report.failed().map(|v| v.name.clone()).collect();
        bail!(
            "scenario {} FAILED ({}); replay: {}",
            report.scenario,
            if failed.is_empty() {
                report
                    .error
                    .clone()
                    .unwrap_or_else(|| "a fault could not be fired".into())
            } else {
                failed.join(", ")
            },
            report.replay
        )
    }
}

/// `phalanx report DIR`.
pub fn report(c: ReportCmd) -> Result<()> {
    let r = phalanx_chaos::report::read(&c.dir).map_err(|e| anyhow!(e))?;
    print!("{}", phalanx_chaos::report::summary_text(&r));
    Ok(())
}
