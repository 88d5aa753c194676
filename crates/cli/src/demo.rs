//! `phalanx demo` (what `just run` runs): a local cluster of 3 controllers and 4 emulated
//! GPUs plus a spare trains a GPT while a worker is killed, another hangs and the
//! controller leader is killed. It ends with a summary of every fault: how it was
//! detected, the time to recover, the steps redone, the effective training time, and
//! whether the final parameters are bit-identical to a fault-free `phalanx train`.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use phalanx_controller::client::Client;
use phalanx_proto::{Event, JobInfo, JobState, StatusResponse};
use serde::Serialize;

use crate::util::write_json;

#[derive(Args, Debug)]
pub struct DemoCmd {
    /// Cluster directory (recreated).
    #[arg(long, default_value = "target/demo-cluster")]
    dir: PathBuf,
    /// Model configuration.
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
    /// The fault schedule, `KIND:TARGET@STEP[:FOR]`, comma-separated (`phalanx fault
    /// inject` kinds and targets). Default: kill rank 1 at 1/5 of the steps, hang rank 2
    /// for 10 s at 2/5, kill the controller leader at 3/5.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Instead of a schedule by step: kill a rank (cycling 0..3) every this many seconds.
    #[arg(long)]
    fault_every_s: Option<u64>,
}

/// One scheduled fault.
struct Planned {
    kind: String,
    target: String,
    at: Trigger,
    for_: Option<String>,
}

enum Trigger {
    Step(u64),
    Secs(u64),
}

fn parse_fault(s: &str) -> Result<Planned> {
    let bad = || {
        anyhow!("bad --faults entry `{s}`: expected KIND:TARGET@STEP[:FOR], e.g. kill:rank:1@60 or hang:rank:2@120:10s")
    };
    let (head, tail) = s.split_once('@').ok_or_else(bad)?;
    let (kind, target) = head.split_once(':').ok_or_else(bad)?;
    let (step, for_) = match tail.split_once(':') {
        Some((st, f)) => (st, Some(f.to_string())),
        None => (tail, None),
    };
    Ok(Planned {
        kind: kind.into(),
        target: target.into(),
        at: Trigger::Step(step.parse().map_err(|_| bad())?),
        for_,
    })
}

impl DemoCmd {
    fn schedule(&self) -> Result<Vec<Planned>> {
        if let Some(every) = self.fault_every_s {
            if every == 0 {
                bail!("--fault-every-s must be positive");
            }
            return Ok((1..=64)
                .map(|i| Planned {
                    kind: "kill".into(),
                    target: format!("rank:{}", i % 4),
                    at: Trigger::Secs(every * i),
                    for_: None,
                })
                .collect());
        }
        if !self.faults.is_empty() {
            return self.faults.iter().map(|f| parse_fault(f)).collect();
        }
        let n = self.steps;
        Ok(vec![
            Planned {
                kind: "kill".into(),
                target: "rank:1".into(),
                at: Trigger::Step(n / 5),
                for_: None,
            },
            Planned {
                kind: "hang".into(),
                target: "rank:2".into(),
                at: Trigger::Step(n * 2 / 5),
                for_: Some("10s".into()),
            },
            Planned {
                kind: "kill".into(),
                target: "controller:leader".into(),
                at: Trigger::Step(n * 3 / 5),
                for_: None,
            },
        ])
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

struct Cluster {
    up: Child,
    dir: PathBuf,
    exe: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.exe)
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status();
        let _ = self.up.kill();
        let _ = self.up.wait();
    }
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job(c: &Client) -> Option<JobInfo> {
    c.get::<Option<JobInfo>>("/v1/job").ok().flatten()
}

fn events(c: &Client) -> Vec<Event> {
    c.get("/v1/events?limit=500").unwrap_or_default()
}

pub fn run(cmd: DemoCmd) -> Result<()> {
    let exe = std::env::current_exe()?;
    let _ = std::fs::remove_dir_all(&cmd.dir);
    std::fs::create_dir_all(&cmd.dir)?;
    let dir = cmd.dir.canonicalize()?;
    let schedule = cmd.schedule()?;
    println!(
        "== starting a local cluster in {}: 3 controllers, {} emulated GPUs ({} spare)",
        dir.display(),
        cmd.workers,
        cmd.workers.saturating_sub(4)
    );
    let up = Command::new(&exe)
        .args(["cluster", "up", "--controllers=3", "--worker-restart-s=5"])
        .arg(format!("--workers={}", cmd.workers))
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("up.log"))?)
        .spawn()?;
    let cluster = Cluster {
        up,
        dir: dir.clone(),
        exe: exe.clone(),
    };
    let client = wait("the cluster file", Duration::from_secs(30), || {
        client_for(&dir).ok()
    })?;
    wait(
        "a leader and every worker registered",
        Duration::from_secs(60),
        || {
            let st: StatusResponse = client.get("/v1/status").ok()?;
            (st.leader_id != 0 && st.workers.len() == cmd.workers as usize).then_some(())
        },
    )?;

    // The fault-free reference, computed alongside by `phalanx train`.
    let ref_summary = dir.join("reference.json");
    let mut reference = Command::new(&exe)
        .args(["train", "--plain", "--workers=1", "--global-batch=8"])
        .arg(format!("--model={}", cmd.model))
        .arg(format!("--steps={}", cmd.steps))
        .arg(format!("--seed={}", cmd.seed))
        .arg(format!("--summary={}", ref_summary.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;

    let job_file = dir.join("job.toml");
    std::fs::write(
        &job_file,
        format!(
            "name = \"demo\"\nmodel = \"{}\"\ncorpus = \"default\"\nsteps = {}\nglobal_batch = 8\nseed = {}\n\
             checkpoint_interval_steps = 25\nworld_size_min = 3\nworld_size_max = 4\n",
            cmd.model, cmd.steps, cmd.seed
        ),
    )?;
    let spec = phalanx_core::parse_job_toml(&std::fs::read_to_string(&job_file)?)
        .map_err(|e| anyhow!("{e}"))?;
    client.command(phalanx_proto::Command::SubmitJob { spec })?;
    println!(
        "== job submitted: {} model, {} steps, global batch 8, seed {}",
        cmd.model, cmd.steps, cmd.seed
    );
    let started = Instant::now();

    let mut reports = Vec::new();
    // Mean time per step before the first fault (includes the job's start-up).
    let mut step_ms: Option<f64> = None;
    for Planned {
        kind,
        target,
        at,
        for_,
    } in &schedule
    {
        let (kind, target) = (kind.as_str(), target.as_str());
        let extra: Vec<String> = for_
            .iter()
            .flat_map(|f| ["--for".to_string(), f.clone()])
            .collect();
        let reached = wait("the next fault's trigger", Duration::from_secs(900), || {
            let j = job(&client)?;
            if j.state == JobState::Completed {
                return Some(false);
            }
            match at {
                Trigger::Step(s) => (j.progress_step >= *s).then_some(true),
                Trigger::Secs(s) => (started.elapsed() >= Duration::from_secs(*s)).then_some(true),
            }
        })?;
        if !reached {
            break;
        }
        let before = job(&client).ok_or_else(|| anyhow!("the job vanished"))?;
        if step_ms.is_none() && before.progress_step > 0 {
            step_ms = Some(started.elapsed().as_secs_f64() * 1e3 / before.progress_step as f64);
        }
        let seen_events = events(&client).last().map(|e| e.seq).unwrap_or(0);
        let high = before.rank_steps.iter().copied().max().unwrap_or(0);
        let old_leader = client
            .get::<StatusResponse>("/v1/status")
            .map(|s| s.leader_id)
            .unwrap_or(0);
        let t0 = Instant::now();
        let out = Command::new(&exe)
            .args(["fault", "inject", "--kind", kind, "--target", target])
            .args(&extra)
            .arg("--dir")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "fault inject failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let injected = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("-- step {}: {injected}", before.progress_step);
        // Time the recovery from the moment the fault took effect, which the command
        // reports (its own start-up is not part of the recovery).
        let t0 = injected_at(&injected).unwrap_or(t0);
        // Detection: the first failure decision about a worker, or the first plan, after
        // the fault (a worker registering or rejoining after an earlier fault is not one);
        // a controller leader change is detected by the election.
        let mut detected: Option<(String, f64, u64)> = None;
        wait("recovery", Duration::from_secs(120), || {
            let j = job(&client)?;
            let Some((_, _, high_at_detection)) = &detected else {
                let by = if target.starts_with("controller") {
                    let st: StatusResponse = client.get("/v1/status").ok()?;
                    (st.leader_id != 0 && st.leader_id != old_leader).then(|| {
                        format!(
                            "Raft election: node {} leads term {}",
                            st.leader_id, st.term
                        )
                    })
                } else {
                    events(&client)
                        .into_iter()
                        .find(|e| {
                            e.seq > seen_events
                                && matches!(
                                    e.kind.as_str(),
                                    "worker_failed"
                                        | "worker_suspect"
                                        | "worker_quarantined"
                                        | "worker_draining"
                                        | "epoch_stuck"
                                        | "plan"
                                )
                        })
                        .map(|e| format!("{}: {}", e.kind, e.reason))
                };
                let high_now = j.rank_steps.iter().copied().max().unwrap_or(0).max(high);
                detected = by.map(|b| (b, t0.elapsed().as_secs_f64(), high_now));
                return None;
            };
            (j.progress_step > *high_at_detection || j.state == JobState::Completed).then_some(())
        })?;
        let mttr = t0.elapsed().as_secs_f64();
        let (detected_by, detect_s, high_at_detection) = detected.unwrap_or_default();
        // Steps redone: the newest step reached before the fault minus where the next epoch
        // resumed (from the `resumed` event of rank 0).
        let resumed = events(&client)
            .into_iter()
            .filter(|e| e.seq > seen_events && e.kind == "resumed")
            .filter_map(|e| {
                e.reason
                    .split("at step ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .min();
        let rep = FaultReport {
            fault: kind.to_string(),
            target: target.to_string(),
            at_step: before.progress_step,
            detected_by,
            detect_s,
            mttr_s: mttr,
            steps_redone: resumed
                .map(|r| high_at_detection.saturating_sub(r))
                .unwrap_or(0),
        };
        println!(
            "   detected in {:.2} s by {}; training again after {mttr:.2} s",
            rep.detect_s, rep.detected_by
        );
        reports.push(rep);
    }
    let done = wait("the job to complete", Duration::from_secs(900), || {
        job(&client).filter(|j| j.state == JobState::Completed && j.params_sha256.is_some())
    })?;
    let wall = started.elapsed().as_secs_f64();
    let st = wait_child(&mut reference, Duration::from_secs(900))?;
    if !st.success() {
        bail!("the reference `phalanx train` failed ({st})");
    }
    let rv: serde_json::Value = serde_json::from_slice(&std::fs::read(&ref_summary)?)
        .context("reading the reference summary")?;
    let reference_sha = rv["params_sha256"].as_str().unwrap_or_default().to_string();
    let sha = done.params_sha256.clone().unwrap_or_default();
    let lost: f64 = reports.iter().map(|r| r.mttr_s).sum();
    let summary = DemoSummary {
        model: cmd.model.clone(),
        steps: cmd.steps,
        seed: cmd.seed,
        faults: reports.clone(),
        wall_s: wall,
        effective_training_time: ((wall - lost) / wall).max(0.0),
        final_epoch: done.plan.as_ref().map(|p| p.epoch).unwrap_or(0),
        step_ms_before_faults: step_ms.unwrap_or(f64::NAN),
        bit_identical: sha == reference_sha,
        params_sha256: sha,
        reference_params_sha256: reference_sha,
    };
    print_summary(&summary);
    write_json(&cmd.summary, &summary)?;
    println!("summary written to {}", cmd.summary.display());
    drop(cluster);
    if !summary.bit_identical {
        bail!("the final parameters differ from the fault-free run (seed {}; rerun: phalanx demo --seed {})", cmd.seed, cmd.seed);
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

fn client_for(dir: &Path) -> Result<Client> {
    let cf = crate::ctl::read_cluster(dir)?;
    let token = std::fs::read_to_string(&cf.token_file)?.trim().to_string();
    Ok(Client::new(cf.controller_addresses(), token)?)
}

fn wait_child(c: &mut Child, t: Duration) -> Result<std::process::ExitStatus> {
    wait("the reference run", t, || c.try_wait().ok().flatten())
}

/// The instant a `fault inject` output line says the fault took effect
/// (`... at unix_ms N`), on this process's monotonic clock.
fn injected_at(line: &str) -> Option<Instant> {
    let ms: u128 = line.rsplit("at unix_ms ").next()?.trim().parse().ok()?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis();
    let ago = Duration::from_millis(now_ms.saturating_sub(ms) as u64);
    Instant::now().checked_sub(ago)
}
