//! `phalanx scenario run | validate | list` and `phalanx report`: chaos scenario files
//! (the format, validation and reports are in `phalanx-chaos`; see docs/scenarios.md).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};

mod procs;
mod reference;
mod run;

pub use run::RunOptions;

#[derive(Subcommand, Debug)]
pub enum ScenarioCmd {
    /// Run a scenario: bring up its cluster, run its job, fire its faults, check its
    /// expectations, write its report, tear everything down. Exits 0 only when every
    /// expectation holds.
    Run(RunCmd),
    /// Check scenario files without running them (errors with line and column).
    Validate {
        /// Scenario files (TOML) to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The scenarios of a directory, each with its purpose (its opening comment).
    List {
        /// The directory of scenario files.
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
    },
    /// Print the JSON Schema of scenario files.
    Schema,
    /// Run several scenarios (default: the library, soaks excluded), each in a process of
    /// its own, and print one row per run: verdict, MTTR, lost steps, effective training
    /// time, bit-exact. Exits non-zero when any run failed.
    Suite(SuiteCmd),
}

#[derive(Args, Debug)]
pub struct SuiteCmd {
    /// Scenario files (default: every scenarios/*.toml whose name does not start with
    /// `soak-`).
    pub files: Vec<PathBuf>,
    /// Seeds to run each file with, comma-separated (default: each file's own).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Reports go to ROOT/NAME[-sSEED]/, cluster directories to ROOT/clusters/.
    #[arg(long, default_value = "target/chaos")]
    pub report_root: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunCmd {
    /// The scenario file (TOML) to run.
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
    /// Draw report.md and the plots again from report.json.
    #[arg(long)]
    pub redraw: bool,
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
                let purpose = phalanx_chaos::purpose(&text);
                // One line: the first sentence.
                let first = match purpose
                    .find(": ")
                    .into_iter()
                    .chain(purpose.find(". "))
                    .min()
                {
                    Some(i) => &purpose[..i],
                    None => purpose.as_str(),
                };
                println!("{name:<34} {first}{valid}");
            }
            Ok(())
        }
        ScenarioCmd::Suite(c) => suite(c),
        ScenarioCmd::Schema => {
            print!("{}", phalanx_chaos::schema_json());
            Ok(())
        }
    }
}

/// Run a validated scenario and write its report directory (a failure to write it is a
/// warning: the verdict stands).
pub fn run_and_write(
    opts: &RunOptions,
    v: &phalanx_chaos::Validated,
    report_dir: &Path,
) -> Result<phalanx_chaos::report::Report> {
    let report = run::run(opts, v)?;
    if let Err(e) = phalanx_chaos::report::write(report_dir, &report) {
        eprintln!("warning: writing the report: {e}");
    }
    Ok(report)
}

fn run_one(c: RunCmd) -> Result<()> {
    let v = load(&c.file)?;
    let opts = RunOptions {
        file: c.file.clone(),
        seed: c.seed,
        report: c.report.clone(),
        dir: c.dir.clone(),
        timeout_s: c.timeout_s,
    };
    let dir = c.report.clone().unwrap_or_else(|| {
        c.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/scenarios").join(&v.scenario.name))
            .join("report")
    });
    let report = run_and_write(&opts, &v, &dir)?;
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

fn suite(c: SuiteCmd) -> Result<()> {
    let mut files = c.files.clone();
    if files.is_empty() {
        files = std::fs::read_dir("scenarios")
            .map_err(|e| {
                anyhow!("reading scenarios/: {e} (run from the repository root, or name files)")
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("soak-"))
            })
            .collect();
        files.sort();
    }
    for f in &files {
        load(f)?;
    }
    let seeds: Vec<Option<u64>> = if c.seeds.is_empty() {
        vec![None]
    } else {
        c.seeds.iter().copied().map(Some).collect()
    };
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(&c.report_root)?;
    let header = format!(
        "{:<34} {:>5} {:<7} {:>8} {:>5} {:>7} {:<9} {:>7}",
        "SCENARIO", "SEED", "VERDICT", "MTTR s", "LOST", "EFF", "BIT-EXACT", "WALL s"
    );
    println!("{header}");
    let mut rows = vec![header];
    let mut failed = Vec::new();
    for f in &files {
        let name = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        for seed in &seeds {
            let tag = match seed {
                Some(s) => format!("{name}-s{s}"),
                None => name.clone(),
            };
            let report_dir = c.report_root.join(&tag);
            let _ = std::fs::remove_dir_all(&report_dir);
            std::fs::create_dir_all(&report_dir)?;
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["scenario", "run"])
                .arg(f)
                .arg("--report")
                .arg(&report_dir)
                .arg("--dir")
                .arg(c.report_root.join("clusters").join(&tag))
                .stdout(std::fs::File::create(report_dir.join("run.log"))?)
                .stderr(std::fs::File::create(report_dir.join("run.stderr"))?);
            if let Some(s) = seed {
                cmd.arg("--seed").arg(s.to_string());
            }
            let status = cmd.status()?;
            let row = match phalanx_chaos::report::read(&report_dir) {
                Ok(r) => {
                    let m = &r.measured;
                    let bit = match (&m.params_sha256, &m.reference_sha256) {
                        (Some(a), Some(b)) => {
                            if a == b {
                                "yes"
                            } else {
                                "NO"
                            }
                        }
                        _ => "-",
                    };
                    format!(
                        "{:<34} {:>5} {:<7} {:>8} {:>5} {:>7} {:<9} {:>7.1}",
                        name,
                        r.seed,
                        if r.passed && status.success() {
                            "pass"
                        } else {
                            "FAIL"
                        },
                        m.max_mttr_s()
                            .map(|x| format!("{x:.2}"))
                            .unwrap_or_else(|| "-".into()),
                        m.lost_steps(),
                        m.effective_training_time
                            .map(|x| format!("{:.1}%", x * 100.0))
                            .unwrap_or_else(|| "-".into()),
                        bit,
                        m.wall_s
                    )
                }
                Err(e) => format!(
                    "{name:<34} {:>5} FAIL    (no report: {e})",
                    seed.map(|s| s.to_string()).unwrap_or_default()
                ),
            };
            if !status.success() {
                failed.push(format!(
                    "{tag} (see {})",
                    report_dir.join("run.log").display()
                ));
            }
            println!("{row}");
            rows.push(row);
        }
    }
    std::fs::write(c.report_root.join("table.txt"), rows.join("\n") + "\n")?;
    if !failed.is_empty() {
        bail!("{} runs failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// `phalanx report DIR`.
pub fn report(c: ReportCmd) -> Result<()> {
    let r = phalanx_chaos::report::read(&c.dir).map_err(|e| anyhow!(e))?;
    if c.redraw {
        phalanx_chaos::report::write(&c.dir, &r).map_err(|e| anyhow!(e))?;
    }
    print!("{}", phalanx_chaos::report::summary_text(&r));
    Ok(())
}
