//! `phalanx bench ...`: benchmarks measured side by side in one run.
use crate::bench_stats::{median, paired_mean_ci95, paired_median};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use phalanx_train::data::{default_corpus_spec, Corpus};
use phalanx_train::engine::Engine;
use phalanx_train::optim::AdamWConfig;
use phalanx_train::ModelConfig;
use serde::Serialize;
use tch::nn::OptimizerConfig;

use crate::train::write_json;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Tokens/s of `phalanx train --workers 1` against a bare tch loop (same model, batch,
    /// one thread).
    Train(BenchTrain),
    /// Checkpoint stall in the real step loop: the training thread's time blocked by an
    /// asynchronous checkpoint against a synchronous save of the same state, alternating
    /// in one run.
    Checkpoint(BenchCheckpoint),
    /// The price of the default numerics profile: tokens/s of `phalanx train --workers 1`
    /// under `x86-64-avx2` against `native`, alternating rounds of fresh processes.
    Numerics(BenchTrain),
    /// One round of the bare tch loop of `bench train`, in its own process like the
    /// Phalanx side (internal).
    #[command(hide = true)]
    BareLoop(BenchTrain),
}

#[derive(Args, Debug)]
pub struct BenchCheckpoint {
    /// Model preset (tiny, small, base, gpt2-124m).
    #[arg(long, default_value = "base")]
    model: String,
    /// Checkpoints of each kind (they alternate).
    #[arg(long, default_value_t = 5)]
    checkpoints: usize,
    /// Training steps between two checkpoints.
    #[arg(long, default_value_t = 2)]
    every: u64,
    /// Global batch (sequences per step).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Where the checkpoints go (default: a temporary folder, removed afterwards). Put it
    /// on the disk whose speed you want to measure.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Training corpus (a file, a directory or a glob; default: the default corpus).
    #[arg(long)]
    data: Option<String>,
    /// Write the result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchTrain {
    /// Model preset (tiny, small, base, gpt2-124m).
    #[arg(long, default_value = "small")]
    model: String,
    /// Optimizer steps per round and side.
    #[arg(long, default_value_t = 8)]
    steps: u64,
    /// Global batch (sequences per step).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Sequences per micro-batch, on both sides: the bare loop accumulates the gradients
    /// of `batch / micro_batch` forward/backward passes before its optimizer step, as
    /// `phalanx train` does (its default is 2).
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    /// Alternating rounds of each side; the medians are compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Training corpus (a file, a directory or a glob; default: the default corpus).
    #[arg(long)]
    data: Option<String>,
    /// Write the result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `bench train`: each round also runs `phalanx train` with the worker's metrics on
    /// (`PHALANX_METRICS_LISTEN=127.0.0.1:0`), in alternating order with the run without
    /// them, and reports on / off (see docs/observability.md).
    #[arg(long)]
    metrics_overhead: bool,
    /// `bench train`: like `--metrics-overhead`, with traces on too in the runs with
    /// metrics: `OTEL_EXPORTER_OTLP_ENDPOINT` names an OTLP/HTTP sink in this process
    /// (`otlp_sink`), so that the spans are exported over loopback for real.
    #[arg(long)]
    telemetry_overhead: bool,
}

/// Metrics on against off, side by side in one `bench train` run.
#[derive(Serialize)]
struct MetricsOverhead {
    /// Traces were on too (`--telemetry-overhead`), and what the sink received.
    traces: bool,
    otlp_requests: u64,
    otlp_bytes: u64,
    /// One recording of a step's metrics (what the training loop calls), in ns: the mean
    /// over 100,000 calls in this process.
    record_step_ns: f64,
    /// `record_step_ns` over the median step time of the runs with metrics off.
    record_share_of_step: f64,
    off_tokens_per_sec: Vec<f64>,
    on_tokens_per_sec: Vec<f64>,
    off_tokens_per_cpu_s: Vec<f64>,
    on_tokens_per_cpu_s: Vec<f64>,
    /// median(on) / median(off), tokens/s and tokens per CPU second.
    ratio_median: f64,
    cpu_ratio_median: f64,
    /// The median of each round's own on / off (the two runs are back to back).
    ratio_paired_median: f64,
    cpu_ratio_paired_median: f64,
    /// The mean of the rounds' own on / off per CPU second, and its 95% confidence
    /// interval (Student's t over the rounds): the overhead is below 1% with 95%
    /// confidence when the interval's lower end is above 0.99.
    cpu_ratio_paired_mean: f64,
    cpu_ratio_paired_ci95: [f64; 2],
}

#[derive(Serialize)]
struct TrainBenchResult {
    model: String,
    steps: u64,
    batch: usize,
    micro_batch: usize,
    tokens_per_step: u64,
    bare_tch_tokens_per_sec: Vec<f64>,
    phalanx_tokens_per_sec: Vec<f64>,
    ratio_median: f64,
    /// Tokens per CPU second of each side's step loop (all its threads): steadier than
    /// tokens/s when other processes share the cores.
    bare_tch_tokens_per_cpu_s: Vec<f64>,
    phalanx_tokens_per_cpu_s: Vec<f64>,
    cpu_ratio_median: f64,
    /// The median of each round's own ratio, by tokens/s and per CPU second: a round's
    /// two runs are back to back, so they share the machine's load more than the medians
    /// of separate rounds do.
    ratio_paired_median: f64,
    cpu_ratio_paired_median: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_overhead: Option<MetricsOverhead>,
}

/// The mean cost of recording one step's metrics, in ns (100,000 calls on a provider of
/// this process's own, as a worker with `--metrics-listen` records them).
fn record_step_ns() -> Result<f64> {
    let m = phalanx_telemetry::worker::WorkerMetrics::new("bench")?;
    let n = 100_000u64;
    let t = Instant::now();
    for i in 0..n {
        m.step(&phalanx_telemetry::worker::StepSample {
            step: i + 1,
            duration: Duration::from_micros(250_000 + i % 1000),
            tokens: 2048,
            loss: 3.0 + (i % 7) as f64 * 0.01,
            grad_norm: 0.9,
        });
    }
    Ok(t.elapsed().as_secs_f64() * 1e9 / n as f64)
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train(b) => bench_train(b),
        BenchCmd::Checkpoint(b) => bench_checkpoint(b),
        BenchCmd::Numerics(b) => bench_numerics(b),
        BenchCmd::BareLoop(b) => bare_loop(b),
    }
}

fn bench_spec(b: &BenchTrain) -> Result<(phalanx_train::engine::TrainSpec, Vec<u8>, Vec<u8>)> {
    let data = b.data.clone().unwrap_or_else(default_corpus_spec);
    let corpus = Corpus::load(&data)?;
    let model = ModelConfig::named(&b.model)?;
    let spec = phalanx_train::engine::TrainSpec {
        model: model.clone(),
        seed: 1,
        steps: b.steps,
        global_batch: b.batch,
        micro_batch: b.micro_batch,
        val_fraction: 0.1,
        val_micro_batches: 1,
        optim: AdamWConfig::for_steps(b.steps),
        precision: Default::default(),
    };
    spec.validate()?;
    let (train, val) = corpus.split(spec.val_fraction, model.ctx_len)?;
    Ok((spec, train, val))
}

/// The bare loop: tch's own AdamW over the VarStore; per step the gradients of the
/// step's micro-batches (each loss scaled by 1/M) accumulate in the parameters' `.grad`,
/// then global-norm clipping and one AdamW step, as a PyTorch user writes gradient
/// accumulation. Timed like `phalanx train` times its step loop (start-up excluded).
/// Writes `{"tokens_per_sec": X}` to `--out`.
fn bare_loop(b: BenchTrain) -> Result<()> {
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let (spec, train, val) = bench_spec(&b)?;
    let tokens_per_step = spec.tokens_per_step();
    let engine = Engine::new(spec, train, val, tch::Device::Cpu)?;
    let mut opt = tch::nn::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        wd: 0.1,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&engine.model.vs, 3e-3)?;
    let micro = engine.spec.micro_batches();
    let t0 = Instant::now();
    let cpu0 = phalanx_worker::dp::process_cpu_s();
    for step in 0..b.steps {
        opt.zero_grad();
        let mut step_loss = 0.0;
        for m in 0..micro {
            let (x, y) = engine.train_batch(step, m)?;
            let loss = engine.model.loss(&x, &y)?.f_div_scalar(micro as f64)?;
            loss.f_backward()?;
            step_loss += loss.f_double_value(&[])?;
        }
        if !step_loss.is_finite() {
            bail!("the bare loop's loss is not finite at step {step}");
        }
        opt.clip_grad_norm(1.0);
        opt.step();
    }
    let tps = (tokens_per_step * b.steps) as f64 / t0.elapsed().as_secs_f64();
    let train_cpu_s = phalanx_worker::dp::process_cpu_s() - cpu0;
    let out = b.out.context("--out is required")?;
    write_json(
        &out,
        &serde_json::json!({ "tokens_per_sec": tps, "train_cpu_s": train_cpu_s }),
    )
}

/// Runs a child process to completion (30 minutes at most) and reads `tokens_per_sec`
/// from the JSON file it wrote.
fn child_tokens_per_sec(cmd: Command, what: &str, json: &std::path::Path) -> Result<f64> {
    Ok(child_rates(cmd, what, json)?.0)
}

/// [`child_tokens_per_sec`], with the step loop's CPU seconds (`train_cpu_s`).
fn child_rates(mut cmd: Command, what: &str, json: &std::path::Path) -> Result<(f64, f64)> {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let st = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{what} did not finish within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !st.success() {
        bail!("{what} failed with {st}");
    }
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(json)?)
        .with_context(|| format!("reading the JSON of {what}"))?;
    let tps = s["tokens_per_sec"]
        .as_f64()
        .with_context(|| format!("{what} wrote no tokens_per_sec"))?;
    let cpu = s["train_cpu_s"]
        .as_f64()
        .with_context(|| format!("{what} wrote no train_cpu_s"))?;
    Ok((tps, cpu))
}

/// Alternating rounds of the bare loop and `phalanx train --workers 1`, each in a fresh
/// process, so that neither side gets a warm process the other lacks.
fn bench_train(b: BenchTrain) -> Result<()> {
    if b.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let (spec, _, _) = bench_spec(&b)?;
    let tokens_per_step = spec.tokens_per_step();
    let data = b.data.clone().unwrap_or_else(default_corpus_spec);
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("phalanx-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    let (mut bare_cpu, mut ours_cpu) = (Vec::new(), Vec::new());
    let (mut on, mut on_cpu) = (Vec::new(), Vec::new());
    let tokens = (tokens_per_step * b.steps) as f64;
    // The "on" side: metrics, and with --telemetry-overhead traces to a sink here too.
    let overhead = b.metrics_overhead || b.telemetry_overhead;
    let sink = if b.telemetry_overhead {
        Some(crate::otlp_sink::start().context("starting the OTLP sink")?)
    } else {
        None
    };
    for round in 0..b.rounds {
        let common = |c: &mut Command| {
            c.arg(format!("--model={}", b.model))
                .arg(format!("--steps={}", b.steps))
                .arg(format!("--data={data}"));
        };
        let bare_json = dir.join(format!("bare-{round}.json"));
        let mut c = Command::new(&exe);
        c.args(["bench", "bare-loop"])
            .arg(format!("--batch={}", b.batch))
            .arg(format!("--micro-batch={}", b.micro_batch))
            .arg(format!("--out={}", bare_json.display()));
        common(&mut c);
        // The same kernels as `phalanx train`'s worker (the default numerics profile).
        phalanx_worker::numerics::apply(phalanx_proto::NumericsProfile::default(), &mut c);
        let (bare_tps, cpu) = child_rates(c, "the bare tch loop", &bare_json)?;
        bare.push(bare_tps);
        bare_cpu.push(tokens / cpu);

        let train = |metrics: bool| {
            let summary = dir.join(format!("train-{round}-{metrics}.json"));
            let mut c = Command::new(&exe);
            c.args(["train", "--workers=1", "--plain", "--seed=1"])
                .arg(format!("--global-batch={}", b.batch))
                .arg(format!("--micro-batch={}", b.micro_batch))
                .arg("--val-batches=1")
                .arg(format!("--summary={}", summary.display()))
                .env_remove("PHALANX_METRICS_LISTEN")
                .env_remove(phalanx_telemetry::traces::ENDPOINT_ENV);
            if metrics {
                c.env("PHALANX_METRICS_LISTEN", "127.0.0.1:0");
                if let Some(s) = &sink {
                    c.env(phalanx_telemetry::traces::ENDPOINT_ENV, &s.endpoint);
                }
            }
            common(&mut c);
            child_rates(c, "phalanx train", &summary)
        };
        // With --metrics-overhead, the run with metrics goes first in odd rounds.
        let on_first = overhead && round % 2 == 1;
        if on_first {
            let (tps, cpu) = train(true)?;
            on.push(tps);
            on_cpu.push(tokens / cpu);
        }
        let (tps, cpu) = train(false)?;
        ours.push(tps);
        ours_cpu.push(tokens / cpu);
        if overhead && !on_first {
            let (tps, cpu) = train(true)?;
            on.push(tps);
            on_cpu.push(tokens / cpu);
        }
        let metrics_part = match (on.last(), on_cpu.last()) {
            (Some(t), Some(c)) if overhead => {
                let what = if sink.is_some() {
                    "metrics and traces"
                } else {
                    "metrics"
                };
                format!(", with {what} {t:.0} tokens/s ({c:.0} per CPU s)")
            }
            _ => String::new(),
        };
        println!(
            "round {round}: bare tch {bare_tps:.0} tokens/s ({:.0} per CPU s), phalanx --workers 1 {tps:.0} tokens/s ({:.0} per CPU s){metrics_part}, load average {}",
            bare_cpu[round], ours_cpu[round], load_average()
        );
    }
    let metrics_overhead = if overhead {
        let ns = record_step_ns()?;
        let step_s = tokens_per_step as f64 / median(&ours);
        let (otlp_requests, otlp_bytes) = sink
            .as_ref()
            .map(|s| {
                use std::sync::atomic::Ordering::Relaxed;
                (
                    s.counts.requests.load(Relaxed),
                    s.counts.bytes.load(Relaxed),
                )
            })
            .unwrap_or((0, 0));
        let m = MetricsOverhead {
            traces: sink.is_some(),
            otlp_requests,
            otlp_bytes,
            record_step_ns: ns,
            record_share_of_step: ns * 1e-9 / step_s,
            ratio_median: median(&on) / median(&ours),
            cpu_ratio_median: median(&on_cpu) / median(&ours_cpu),
            ratio_paired_median: paired_median(&on, &ours),
            cpu_ratio_paired_median: paired_median(&on_cpu, &ours_cpu),
            cpu_ratio_paired_mean: paired_mean_ci95(&on_cpu, &ours_cpu).0,
            cpu_ratio_paired_ci95: paired_mean_ci95(&on_cpu, &ours_cpu).1,
            off_tokens_per_sec: ours.clone(),
            on_tokens_per_sec: on,
            off_tokens_per_cpu_s: ours_cpu.clone(),
            on_tokens_per_cpu_s: on_cpu,
        };
        let what = if m.traces {
            format!(
                "metrics and traces on / off (phalanx train --workers 1, PHALANX_METRICS_LISTEN=127.0.0.1:0, OTEL_EXPORTER_OTLP_ENDPOINT to a sink that received {} requests, {} bytes)",
                m.otlp_requests, m.otlp_bytes
            )
        } else {
            "metrics on / off (phalanx train --workers 1, PHALANX_METRICS_LISTEN=127.0.0.1:0)"
                .to_string()
        };
        println!(
            "{what}: tokens/s {:.4}, tokens per CPU second {:.4}; paired by round: {:.4} and {:.4}; per CPU second, the rounds' mean {:.4}, 95% interval [{:.4}, {:.4}] over {} rounds; recording one step's metrics: {:.0} ns = {:.5}% of a {:.1} ms step (goal: overhead < 1%)",
            m.ratio_median,
            m.cpu_ratio_median,
            m.ratio_paired_median,
            m.cpu_ratio_paired_median,
            m.cpu_ratio_paired_mean,
            m.cpu_ratio_paired_ci95[0],
            m.cpu_ratio_paired_ci95[1],
            b.rounds,
            m.record_step_ns,
            m.record_share_of_step * 100.0,
            step_s * 1e3
        );
        Some(m)
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);
    let r = TrainBenchResult {
        model: b.model,
        steps: b.steps,
        batch: b.batch,
        micro_batch: b.micro_batch,
        tokens_per_step,
        ratio_median: median(&ours) / median(&bare),
        cpu_ratio_median: median(&ours_cpu) / median(&bare_cpu),
        ratio_paired_median: paired_median(&ours, &bare),
        cpu_ratio_paired_median: paired_median(&ours_cpu, &bare_cpu),
        bare_tch_tokens_per_sec: bare,
        phalanx_tokens_per_sec: ours,
        bare_tch_tokens_per_cpu_s: bare_cpu,
        phalanx_tokens_per_cpu_s: ours_cpu,
        metrics_overhead,
    };
    println!(
        "(a) phalanx train --workers 1 / bare tch loop ({} micro-batches of {}), tokens/s: {:.3}, tokens per CPU second: {:.3}; paired by round: {:.3} and {:.3} (goal >= 0.98); load average {}",
        b.batch / b.micro_batch.max(1),
        b.micro_batch,
        r.ratio_median,
        r.cpu_ratio_median,
        r.ratio_paired_median,
        r.cpu_ratio_paired_median,
        load_average()
    );
    if let Some(p) = &b.out {
        write_json(p, &r)?;
    }
    Ok(())
}

#[derive(Serialize)]
struct NumericsBenchResult {
    model: String,
    steps: u64,
    batch: usize,
    cpu: String,
    x86_64_avx2_tokens_per_sec: Vec<f64>,
    native_tokens_per_sec: Vec<f64>,
    /// median(x86-64-avx2) / median(native): the share of native speed the portable
    /// profile keeps.
    ratio_median: f64,
    /// CPU seconds (user + system) of each whole `phalanx train` run, its worker
    /// included: less sensitive than tokens/s to other processes on a shared machine.
    x86_64_avx2_cpu_s: Vec<f64>,
    native_cpu_s: Vec<f64>,
    /// median(native CPU s) / median(x86-64-avx2 CPU s): the same share by CPU time
    /// (start-up included in both).
    cpu_ratio_median: f64,
    x86_64_avx2_params_sha256: String,
    native_params_sha256: String,
}

/// `phalanx train --workers 1` under each profile, alternating, each round of each side a
/// fresh process (the profile is an environment fixed at process start).
fn bench_numerics(b: BenchTrain) -> Result<()> {
    if b.metrics_overhead {
        bail!("--metrics-overhead is a flag of `bench train`, not of `bench numerics`");
    }
    if b.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let data = b.data.clone().unwrap_or_else(default_corpus_spec);
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("phalanx-bench-numerics-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut pinned, mut native) = (Vec::new(), Vec::new());
    let (mut pinned_cpu, mut native_cpu) = (Vec::new(), Vec::new());
    let mut sha = [String::new(), String::new()];
    for round in 0..b.rounds {
        for (i, profile) in ["x86-64-avx2", "native"].into_iter().enumerate() {
            let summary = dir.join(format!("{profile}-{round}.json"));
            let mut c = Command::new(&exe);
            c.args(["train", "--workers=1", "--plain", "--seed=1"])
                .arg(format!("--numerics={profile}"))
                .arg(format!("--model={}", b.model))
                .arg(format!("--steps={}", b.steps))
                .arg(format!("--data={data}"))
                .arg(format!("--global-batch={}", b.batch))
                .arg(format!("--micro-batch={}", b.micro_batch))
                .arg("--val-batches=1")
                .arg(format!("--summary={}", summary.display()));
            let cpu0 = children_cpu_s();
            let tps =
                child_tokens_per_sec(c, &format!("phalanx train --numerics {profile}"), &summary)?;
            let cpu = children_cpu_s() - cpu0;
            let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
            sha[i] = s["params_sha256"].as_str().unwrap_or_default().to_string();
            if i == 0 {
                pinned.push(tps);
                pinned_cpu.push(cpu);
            } else {
                native.push(tps);
                native_cpu.push(cpu);
            }
        }
        println!(
            "round {round}: x86-64-avx2 {:.0} tokens/s {:.2} CPU s, native {:.0} tokens/s {:.2} CPU s",
            pinned[round], pinned_cpu[round], native[round], native_cpu[round]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let cpu = phalanx_train::mfu::cpu_model_name().unwrap_or_else(|| "unknown".into());
    let [pinned_sha, native_sha] = sha;
    let r = NumericsBenchResult {
        model: b.model,
        steps: b.steps,
        batch: b.batch,
        cpu,
        ratio_median: median(&pinned) / median(&native),
        cpu_ratio_median: median(&native_cpu) / median(&pinned_cpu),
        x86_64_avx2_cpu_s: pinned_cpu,
        native_cpu_s: native_cpu,
        x86_64_avx2_tokens_per_sec: pinned,
        native_tokens_per_sec: native,
        x86_64_avx2_params_sha256: pinned_sha,
        native_params_sha256: native_sha,
    };
    println!(
        "(5) tokens/s under x86-64-avx2 / native: {:.3} (by CPU time: {:.3}) on {} (params_sha256 {} under the profile, {} native)",
        r.ratio_median,
        r.cpu_ratio_median,
        r.cpu,
        &r.x86_64_avx2_params_sha256[..r.x86_64_avx2_params_sha256.len().min(8)],
        &r.native_params_sha256[..r.native_params_sha256.len().min(8)]
    );
    if let Some(p) = &b.out {
        write_json(p, &r)?;
    }
    Ok(())
}

/// User + system CPU seconds of every child process reaped so far (and of their reaped
/// descendants).
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return f64::NAN;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

#[derive(Serialize)]
struct CheckpointBenchResult {
    model: String,
    params: usize,
    snapshot_bytes: usize,
    every_steps: u64,
    step_ms_median: f64,
    sync_save_ms: Vec<f64>,
    async_stall_ms: Vec<f64>,
    async_durable: usize,
    sync_save_ms_median: f64,
    async_stall_ms_median: f64,
    stall_ratio_median: f64,
    goal_stall_ratio: f64,
}

/// The worker's own step loop and snapshot hand-over ([`Snapshots`]) on one rank, with a
/// synchronous save of the same state (shard written and fsynced, manifest committed)
/// every other checkpoint.
fn bench_checkpoint(b: BenchCheckpoint) -> Result<()> {
    use phalanx_checkpoint::{
        commit_manifest, write_shard, AsyncCheckpointer, CheckpointEvent, CheckpointerConfig,
        ManifestSpec, RankState,
    };
    use phalanx_collective::{BlockingGroup, GroupConfig};
    use phalanx_worker::dp::Stepper;
    use phalanx_worker::snapshot::Snapshots;

    if b.checkpoints == 0 || b.every == 0 {
        bail!("--checkpoints and --every must be at least 1");
    }
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let data = b.data.clone().unwrap_or_else(default_corpus_spec);
    let corpus = Corpus::load(&data)?;
    let model = ModelConfig::named(&b.model)?;
    let steps = b.every * 2 * b.checkpoints as u64 + 1;
    let spec = phalanx_train::engine::TrainSpec {
        model: model.clone(),
        seed: 1,
        steps,
        global_batch: b.batch,
        micro_batch: b.batch,
        val_fraction: 0.1,
        val_micro_batches: 1,
        optim: AdamWConfig::for_steps(steps),
        precision: Default::default(),
    };
    let (train, val) = corpus.split(spec.val_fraction, model.ctx_len)?;
    let mut engine = Engine::new(spec, train, val, tch::Device::Cpu)?;
    engine.zero_shards(1, 0)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let op_timeout = Duration::from_secs(60);
    let mut group = BlockingGroup::connect(GroupConfig::new(0, vec![addr]), listener)?;
    let mut stepper = Stepper::new(&engine, &group, &[], op_timeout)?;

    let _tmp;
    let root = match &b.dir {
        Some(d) => d.clone(),
        None => {
            let t = tempfile::Builder::new().prefix("ckpt-stall-").tempdir()?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    let mut cfg = CheckpointerConfig::new(root.join("async"), 1, 0);
    cfg.auto_commit = true;
    cfg.retain_count = 1;
    let (writer, events) = AsyncCheckpointer::spawn(cfg)?;
    let mut snaps = Snapshots::new(writer, 1);
    let sync_root = root.join("sync");
    let params = engine.params.len();
    let snapshot_bytes = 12 * params;
    println!(
        "bench checkpoint: model {} ({params} params, {:.1} MB per checkpoint), a checkpoint every {} steps, {} of each kind, dir {}",
        b.model,
        snapshot_bytes as f64 / 1e6,
        b.every,
        b.checkpoints,
        root.display()
    );

    let (mut sync_ms, mut async_steps, mut step_ms) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..2 * b.checkpoints {
        for _ in 0..b.every {
            let r = stepper.step_with(&mut engine, &mut group, &mut || snaps.release())?;
            step_ms.push(r.step_ms);
        }
        let step = engine.step();
        if k % 2 == 0 {
            snaps.take(&engine);
            async_steps.push(step);
        } else {
            let t = Instant::now();
            let state = RankState {
                step,
                seed: 1,
                params: &engine.params,
                range: engine.opt.range.clone(),
                m: &engine.opt.m,
                v: &engine.opt.v,
                opt_step: engine.opt.step,
                extra: &[],
            };
            let rec = write_shard(&sync_root, 1, 0, &state, None)?;
            let manifest = ManifestSpec {
                step,
                world: 1,
                param_count: params,
                seed: 1,
                layout: vec![],
                params_sha256: None,
                ..Default::default()
            };
            commit_manifest(&sync_root, &manifest, vec![rec])?;
            sync_ms.push(t.elapsed().as_secs_f64() * 1e3);
            phalanx_checkpoint::apply_retention(&sync_root, 1)?;
        }
    }
    // One more step: the last asynchronous snapshot's release wait belongs to it.
    stepper.step_with(&mut engine, &mut group, &mut || snaps.release())?;
    if !snaps.writer().wait_idle(Duration::from_secs(300)) {
        bail!("the asynchronous checkpoints were not durable within 300 s");
    }
    let durable = events
        .try_iter()
        .filter(|e| matches!(e, CheckpointEvent::Durable { .. }))
        .count();
    if durable != async_steps.len() {
        bail!(
            "{durable} of {} asynchronous checkpoints became durable",
            async_steps.len()
        );
    }
    let async_ms: Vec<f64> = async_steps
        .iter()
        .map(|s| {
            snaps
                .take_stall(*s)
                .map(|d| d.as_secs_f64() * 1e3)
                .context("no stall recorded")
        })
        .collect::<Result<_>>()?;
    for (i, (a, s)) in async_ms.iter().zip(&sync_ms).enumerate() {
        println!("  checkpoint pair {i}: async stall {a:.3} ms | synchronous save {s:.1} ms");
    }
    let (sync_med, async_med) = (median(&sync_ms), median(&async_ms));
    let ratio = async_med / sync_med;
    let step_med = median(&step_ms);
    println!(
        "median step {step_med:.1} ms; synchronous save {sync_med:.1} ms; async stall {async_med:.3} ms; stall/sync {ratio:.4} (goal <= 0.02; PyTorch DCP 0.042, ByteCheckpoint ~0.018): {}",
        if ratio <= 0.02 { "meets it" } else { "does NOT meet it" }
    );
    if let Some(out) = &b.out {
        write_json(
            out,
            &CheckpointBenchResult {
                model: b.model.clone(),
                params,
                snapshot_bytes,
                every_steps: b.every,
                step_ms_median: step_med,
                sync_save_ms: sync_ms.clone(),
                async_stall_ms: async_ms.clone(),
                async_durable: durable,
                sync_save_ms_median: sync_med,
                async_stall_ms_median: async_med,
                stall_ratio_median: ratio,
                goal_stall_ratio: 0.02,
            },
        )?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
