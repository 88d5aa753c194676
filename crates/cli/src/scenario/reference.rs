//! What a scenario run learns outside its cluster: the fault-free reference run (whose
//! `params_sha256` the faulted run must match, cached per job), the loss curve read back
//! from the workers' logs, and a child process run to completion within a bound.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use phalanx_chaos::Validated;

use super::procs::{Procs, Role};
use super::run::STOP;

/// Run a child to completion with a bound; its stdout on success.
pub(super) fn run_bounded(mut c: std::process::Command, timeout: Duration) -> Result<String> {
    let out = tempfile::NamedTempFile::new()?;
    let err = tempfile::NamedTempFile::new()?;
    // A process group of its own, killed whole: `phalanx train` (the reference) has
    // children of its own.
    // SAFETY: prctl and setpgid are async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = c
        .stdin(std::process::Stdio::null())
        .stdout(out.reopen()?)
        .stderr(err.reopen()?)
        .spawn()?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > timeout || STOP.load(Ordering::SeqCst) {
            // SAFETY: kill(2) of the child's own process group.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            if STOP.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            bail!("timed out after {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(out.path()).unwrap_or_default();
    if !status.success() {
        let stderr = std::fs::read_to_string(err.path()).unwrap_or_default();
        bail!("{status}: {}", stderr.trim());
    }
    Ok(stdout.trim().to_string())
}

/// The fault-free reference's `params_sha256`, cached by its inputs and the binary.
pub(super) fn reference_sha(exe: &Path, cache: &Path, v: &Validated, seed: u64) -> Result<String> {
    let j = &v.scenario.job;
    let meta = std::fs::metadata(exe)?;
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let key = format!(
        "ref-{}-{}steps-gb{}-seed{}-bin{}-{}.json",
        j.model.as_str(),
        j.steps,
        j.global_batch,
        seed,
        meta.len(),
        stamp
    );
    std::fs::create_dir_all(cache)?;
    let path = cache.join(key);
    let read = |p: &Path| -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        v["params_sha256"].as_str().map(str::to_string)
    };
    if let Some(sha) = read(&path) {
        println!("== reference: cached in {}", path.display());
        return Ok(sha);
    }
    println!(
        "== reference: phalanx train (no faults) of {} steps, seed {seed}",
        j.steps
    );
    let tmp = path.with_extension("tmp");
    let mut c = std::process::Command::new(exe);
    c.args(["train", "--plain", "--workers=1"])
        .arg(format!("--global-batch={}", j.global_batch))
        .arg(format!("--model={}", j.model.as_str()))
        .arg(format!("--steps={}", j.steps))
        .arg(format!("--seed={seed}"))
        .arg("--summary")
        .arg(&tmp);
    run_bounded(c, Duration::from_secs(1800)).context("the reference run")?;
    std::fs::rename(&tmp, &path)?;
    read(&path).ok_or_else(|| anyhow!("the reference summary has no params_sha256"))
}

/// Rank 0's (step, loss) from the workers' JSON logs; a step redone gives the same loss.
pub(super) fn losses(procs: &Procs) -> Vec<(u64, f64)> {
    let mut by_step = BTreeMap::new();
    for p in &procs.procs {
        if !matches!(p.role, Role::Worker(_)) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p.log) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] != "step" {
                continue;
            }
            if let (Some(s), Some(l)) = (f["step"].as_u64(), f["loss"].as_f64()) {
                by_step.insert(s, l);
            }
        }
    }
    by_step.into_iter().collect()
}
