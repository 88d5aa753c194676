//! The simulator's speed: `sim-bench [--out FILE]` runs the 16,384-GPU x 54-day and the
//! 131,072-GPU x 365-day presets under both policies on one thread, and reports wall time,
//! events per second and peak memory (VmHWM). Part of `just bench`; see
//! docs/benchmarks.md.

use std::time::Instant;

use phalanx_sim::config::{self, CheckpointMode, PolicyKind};
use phalanx_sim::{run, Job};

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.as_slice() {
        [] => None,
        [flag, path] if flag == "--out" => Some(path.clone()),
        _ => anyhow::bail!("usage: sim-bench [--out FILE]"),
    };
    let mut rows = Vec::new();
    for (preset, budget_s) in [("llama3-405b-16k", 1.0), ("llama3-405b-131k", 10.0)] {
        for policy in [PolicyKind::Restart, PolicyKind::Phalanx] {
            let mut f = config::preset(preset)?;
            f.policy.kind = policy;
            if policy == PolicyKind::Phalanx {
                f.checkpoint.mode = CheckpointMode::Async;
            }
            let job = Job::build(&f).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t0 = Instant::now();
            let o = run(&f, &job, 1);
            let wall_s = t0.elapsed().as_secs_f64();
            let row = serde_json::json!({
                "preset": preset,
                "policy": policy.as_str(),
                "gpus": f.hardware.gpus,
                "days": f.days,
                "failures": o.failures,
                "events": o.events,
                "wall_s": wall_s,
                "budget_s": budget_s,
                "within_budget": wall_s <= budget_s,
                "events_per_s": o.events as f64 / wall_s,
                "effective_training_time": o.effective_training_time,
            });
            println!(
                "{preset:<18} {:<8} {:>7} GPUs {:>5} days: {:>6} failures, {:>9} events in {:.3} s ({:.2} M events/s; budget {budget_s} s)",
                policy.as_str(),
                f.hardware.gpus,
                f.days,
                o.failures,
                o.events,
                wall_s,
                o.events as f64 / wall_s / 1e6
            );
            rows.push(row);
        }
    }
    let peak = peak_rss_mib();
    println!(
        "peak memory (VmHWM): {}",
        peak.map_or("unknown".into(), |m| format!("{m:.1} MiB"))
    );
    if let Some(path) = out {
        let doc = serde_json::json!({ "runs": rows, "peak_rss_mib": peak, "threads": 1 });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}
