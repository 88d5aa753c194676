//! `phalanx train`, `phalanx worker run` and `phalanx devices`.
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use phalanx_collective::{BlockingGroup, EpochSecret, GroupConfig, Security};
use phalanx_proto::{NumericsProfile, Precision};
use phalanx_train::data::{default_corpus_spec, Corpus};
use phalanx_train::device::{DeviceRequest, MemoryEstimate, CATALOGUE};
use phalanx_train::engine::{Engine, TrainSpec};
use phalanx_train::optim::AdamWConfig;
use phalanx_train::sampler::assign;
use phalanx_train::ModelConfig;
use phalanx_worker::dp::{self, DpOptions, RunResult};
use phalanx_worker::numerics;
use phalanx_worker::rendezvous::{self, PeerList, WorkerEvent};
use serde::Serialize;

/// The training math: every flag here is part of a run's identity.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model configuration: tiny (~0.1M params), small (~1M), base (~10M), gpt2-124m.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 30)]
    pub steps: u64,
    /// Seed of initialisation and data sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences per step, whatever the number of workers.
    #[arg(long, default_value_t = 8)]
    pub global_batch: usize,
    /// Sequences per micro-batch; global_batch / micro_batch micro-batches are shared out
    /// among the workers, so it bounds the world size.
    #[arg(long, default_value_t = 2)]
    pub micro_batch: usize,
    /// Corpus: a file, a directory or a glob. Default: the C++ headers of the pinned
    /// libtorch 2.11.0 (present after `just setup`).
    #[arg(long)]
    pub data: Option<String>,
    /// Fraction of the corpus (its tail) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Validation micro-batches evaluated at the end.
    #[arg(long, default_value_t = 8)]
    pub val_batches: usize,
    /// Peak learning rate (after warm-up; cosine decay to --lr-min).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, default_value_t = 3e-4)]
    pub lr_min: f32,
    /// Warm-up steps (default: a tenth of --steps).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    /// Device of each worker: `emulated[:MODEL]` (see `phalanx devices`) or `cuda:N`.
    #[arg(long, default_value = "emulated:H100-SXM-80GB")]
    pub device: String,
    /// Override an emulated GPU's memory capacity, in GiB; on `cuda:N`, cap each worker's
    /// use of the GPU (several workers can then share one).
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// Bound on every collective operation.
    #[arg(long, default_value_t = 30_000)]
    pub op_timeout_ms: u64,
    /// Bound on forming the group (all peers connected).
    #[arg(long, default_value_t = 60_000)]
    pub rendezvous_timeout_ms: u64,
    /// Every N steps each rank recomputes a neighbour's micro-batch and compares the
    /// gradients (0 disables; costs one micro-batch of compute per rank each time, and
    /// changes no bits). A mismatch redoes the step; a device that disagrees again with
    /// two others ends the run naming its rank.
    #[arg(long, default_value_t = 10)]
    pub grad_check_interval: u64,
    /// Numerics profile: `x86-64-avx2` pins ATen, MKL and oneDNN to their AVX2 kernels, so
    /// that machines with one vendor's x86-64 CPUs compute the same bits (AMD and Intel
    /// still differ); `native` lets them pick the fastest
    /// kernels of this CPU (see docs/training.md).
    #[arg(long, default_value = "x86-64-avx2", value_parser = crate::model::parse_numerics)]
    pub numerics: NumericsProfile,
    /// Arithmetic of forward and backward: `fp32`, or `bf16` (bfloat16 matrix products
    /// and attention, with f32 master weights, gradients and AdamW moments).
    #[arg(long, default_value = "fp32", value_parser = parse_precision)]
    pub precision: Precision,
}

/// Parses a precision name (for clap).
pub fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| {
        format!(
            "unknown precision `{s}`; expected one of {}",
            Precision::ALL.map(|p| p.as_str()).join(", ")
        )
    })
}

/// The group secret of a `--peers` ring from `path` (64 hex digits).
fn read_ring_secret(path: &std::path::Path) -> Result<EpochSecret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --ring-secret-file {}", path.display()))?;
    EpochSecret::from_hex(&text).map_err(|e| anyhow!("--ring-secret-file {}: {e}", path.display()))
}

impl TrainArgs {
    pub fn spec(&self) -> Result<TrainSpec> {
        let model = ModelConfig::named(&self.model)?;
        let mut optim = AdamWConfig::for_steps(self.steps);
        optim.lr_max = self.lr;
        optim.lr_min = self.lr_min;
        if let Some(w) = self.warmup_steps {
            optim.warmup_steps = w;
        }
        optim.weight_decay = self.weight_decay;
        optim.grad_clip_norm = self.grad_clip;
        let spec = TrainSpec {
            model,
            seed: self.seed,
            steps: self.steps,
            global_batch: self.global_batch,
            micro_batch: self.micro_batch,
            val_fraction: self.val_fraction,
            val_micro_batches: self.val_batches.max(1),
            optim,
            precision: self.precision,
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn corpus_spec(&self) -> String {
        self.data.clone().unwrap_or_else(default_corpus_spec)
    }

    pub fn device(&self) -> Result<DeviceRequest> {
        Ok(DeviceRequest::parse(&self.device, self.memory_gib)?)
    }

    /// The flags that reproduce this training math in a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--model={}", self.model),
            format!("--steps={}", self.steps),
            format!("--seed={}", self.seed),
            format!("--global-batch={}", self.global_batch),
            format!("--micro-batch={}", self.micro_batch),
            format!("--data={}", self.corpus_spec()),
            format!("--val-fraction={}", self.val_fraction),
            format!("--val-batches={}", self.val_batches),
            format!("--lr={}", self.lr),
            format!("--lr-min={}", self.lr_min),
            format!("--weight-decay={}", self.weight_decay),
            format!("--grad-clip={}", self.grad_clip),
            format!("--device={}", self.device),
            format!("--op-timeout-ms={}", self.op_timeout_ms),
            format!("--rendezvous-timeout-ms={}", self.rendezvous_timeout_ms),
            format!("--grad-check-interval={}", self.grad_check_interval),
            format!("--numerics={}", self.numerics),
            format!("--precision={}", self.precision),
        ];
        if let Some(w) = self.warmup_steps {
            a.push(format!("--warmup-steps={w}"));
        }
        if let Some(m) = self.memory_gib {
            a.push(format!("--memory-gib={m}"));
        }
        a
    }
}

#[derive(Args, Debug)]
pub struct TrainCmd {
    /// Number of worker processes (one emulated GPU each).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Write a JSON summary here (losses, tokens/s, params_sha256, ...).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Print one plain line per step instead of a progress bar.
    #[arg(long)]
    pub plain: bool,
    /// Write the trained parameters here as safetensors (see `phalanx sample`).
    #[arg(long)]
    pub save: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args, Debug)]
pub struct WorkerRunCmd {
    /// This worker's rank, 0-based.
    #[arg(long)]
    pub rank: usize,
    /// Number of workers in the group.
    #[arg(long)]
    pub world: usize,
    /// Every rank's address, comma-separated, in rank order (ours included).
    #[arg(long, value_delimiter = ',', conflicts_with = "stdio_rendezvous")]
    pub peers: Vec<SocketAddr>,
    /// Address to listen on; default: our entry of --peers, or 127.0.0.1:0 with --stdio-rendezvous.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Announce our address on stdout and read the peer list and the group's secret from
    /// stdin (used by `phalanx train`).
    #[arg(long)]
    pub stdio_rendezvous: bool,
    /// With --peers: a file holding the group's secret (64 hex digits, e.g. from
    /// `openssl rand -hex 32`), the same for every rank; every ring connection proves it.
    /// Without it a --peers ring accepts any connection that speaks its protocol.
    #[arg(long, conflicts_with = "stdio_rendezvous")]
    pub ring_secret_file: Option<PathBuf>,
    /// Rank 0 writes the run summary here.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Rank 0 writes the trained parameters here as safetensors.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Serve this worker's metrics at http://ADDR/metrics in the Prometheus text format
    /// (plain HTTP, numbers only, for a scrape on a trusted network; port 0 picks one, the
    /// log names it). Off without it. See docs/observability.md.
    #[arg(long, env = "PHALANX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Args, Debug)]
pub struct DevicesCmd {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also probe for CUDA devices (loads libtorch_cuda.so if present).
    #[arg(long)]
    pub cuda: bool,
}

#[derive(Serialize)]
struct CorpusInfo {
    spec: String,
    files: usize,
    bytes: usize,
    sha256: String,
}

/// What `--summary` holds.
#[derive(Serialize)]
struct TrainSummary {
    steps: u64,
    workers: usize,
    model: String,
    param_count: usize,
    seed: u64,
    global_batch: usize,
    micro_batch: usize,
    device: String,
    /// The numerics profile every worker ran under.
    numerics: NumericsProfile,
    precision: Precision,
    corpus: CorpusInfo,
    initial_loss: f64,
    final_loss: f64,
    val_loss: f64,
    tokens_per_sec: f64,
    train_s: f64,
    /// CPU seconds rank 0's process spent in the step loop.
    train_cpu_s: f64,
    wall_s: f64,
    params_sha256: String,
    /// Gradient spot checks rank 0 ran (`--grad-check-interval`; none with one worker),
    /// and steps redone because one failed.
    grad_checks: u64,
    steps_redone: u64,
    /// Model FLOPs per token, achieved TFLOP/s and MFU against the device's peak.
    mfu: Option<phalanx_train::mfu::Mfu>,
    /// Where rank 0's step time goes (medians over the steps).
    step_profile_ms: StepMedians,
    losses: Vec<f64>,
    reproduce: String,
}

/// Rank 0's step reports, for the time profile of a step.
#[derive(Default)]
struct StepProfile {
    steps: Vec<dp::StepReport>,
}

/// Median milliseconds of each part of rank 0's step.
#[derive(Serialize, Clone, Copy, Debug)]
struct StepMedians {
    step: f64,
    /// Forward and backward of one micro-batch (the gradient hand-over included).
    compute_per_micro_batch: f64,
    spot_check: f64,
    reduce: f64,
    update: f64,
    /// The gradients' copy from a CUDA device to the host (0 on CPU).
    grad_copy: f64,
}

impl StepProfile {
    fn push(&mut self, s: &dp::StepReport) {
        self.steps.push(s.clone());
    }

    fn medians(&self) -> StepMedians {
        let med = |f: fn(&dp::StepReport) -> f64| {
            let mut v: Vec<f64> = self.steps.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        StepMedians {
            step: med(|s| s.step_ms),
            compute_per_micro_batch: med(|s| s.compute_ms),
            spot_check: med(|s| s.check_ms),
            reduce: med(|s| s.reduce_ms),
            update: med(|s| s.update_ms),
            grad_copy: med(|s| s.grad_copy_ms),
        }
    }
}

impl StepMedians {
    fn describe(&self) -> String {
        format!(
            "step (rank 0, medians): {:.1} ms = forward+backward {:.1} ms per micro-batch, gradient copy to host {:.1} ms, spot check {:.1} ms, reduce {:.1} ms, update {:.1} ms",
            self.step, self.compute_per_micro_batch, self.grad_copy, self.spot_check, self.reduce, self.update
        )
    }
}

/// Checks everything that can be checked before any process starts: the spec, the corpus
/// and whether the model fits the device.
fn preflight(args: &TrainArgs, workers: usize) -> Result<(TrainSpec, Corpus, DeviceRequest)> {
    let spec = args.spec()?;
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let m = spec.micro_batches();
    if workers > m {
        bail!(
            "--workers {workers} exceeds the {m} micro-batches per step (global batch {} / micro-batch {}); \
             every worker needs at least one",
            spec.global_batch,
            spec.micro_batch
        );
    }
    let device = args.device()?;
    let corpus = Corpus::load(&args.corpus_spec()).with_context(|| {
        if args.data.is_none() {
            "the default corpus comes with libtorch: run `just setup`".to_string()
        } else {
            "check --data".to_string()
        }
    })?;
    corpus.split(spec.val_fraction, spec.model.ctx_len)?;
    let local = assign(m, workers, 0).len();
    device.check_fits(&MemoryEstimate::new(&spec.model, spec.micro_batch, local))?;
    Ok((spec, corpus, device))
}

pub fn train(cmd: TrainCmd, json_logs: bool) -> Result<()> {
    let wall = Instant::now();
    let (spec, corpus, device) = preflight(&cmd.train, cmd.workers)?;
    if let Some(p) = &cmd.save {
        crate::model::check_output_path(p)?;
    }
    let n = cmd.workers;
    tracing::info!(workers = n, model = %spec.model.name, params = spec.model.param_count(), device = %device.describe(), corpus = %corpus.spec, "starting training");

    let exe = std::env::current_exe().context("locating the phalanx binary")?;
    let mut group = LocalGroup::spawn(&exe, n, &cmd.train, cmd.save.as_deref(), json_logs)?;
    let interactive = std::io::stderr().is_terminal() && !cmd.plain;
    let bar = interactive.then(|| {
        let b = indicatif::ProgressBar::new(spec.steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  {msg}  [{elapsed_precise}<{eta_precise}]",
            )
            .expect("static template"),
        );
        b
    });
    let step_budget = Duration::from_millis(cmd.train.op_timeout_ms * 4 + 120_000);
    let mut profile = StepProfile::default();
    let result = group.drive(step_budget, |ev| {
        if let WorkerEvent::Step(s) = ev {
            profile.push(s);
            let msg = format!(
                "loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} ms/step",
                s.loss, s.lr, s.grad_norm, s.step_ms
            );
            match &bar {
                Some(b) => {
                    b.set_position(s.step + 1);
                    b.set_message(msg);
                }
                None => println!("step {:>5}/{}  {msg}", s.step + 1, spec.steps),
            }
        }
    });
    if let Some(b) = &bar {
        b.finish();
    }
    let result = result?;
    println!(
        "done: {} steps on {} worker(s)  loss {:.4} -> {:.4}  val {:.4}  {:.0} tokens/s  params_sha256 {}",
        result.steps, result.workers, result.initial_loss, result.final_loss, result.val_loss, result.tokens_per_sec, result.params_sha256
    );
    if result.grad_checks > 0 {
        println!(
            "gradient spot checks: {} on rank 0, {} step(s) redone",
            result.grad_checks, result.steps_redone
        );
    }
    let profile = profile.medians();
    println!("{}", profile.describe());
    if let Some(m) = &result.mfu {
        println!("{}", m.describe());
    }
    if let Some(p) = &cmd.save {
        println!(
            "saved {} (safetensors, numerics {})",
            p.display(),
            cmd.train.numerics
        );
    }
    if let Some(path) = &cmd.summary {
        let s = TrainSummary {
            steps: result.steps,
            workers: result.workers,
            model: spec.model.name.clone(),
            param_count: result.param_count,
            seed: spec.seed,
            global_batch: spec.global_batch,
            micro_batch: spec.micro_batch,
            device: device.describe(),
            numerics: cmd.train.numerics,
            precision: spec.precision,
            corpus: CorpusInfo {
                spec: corpus.spec.clone(),
                files: corpus.files.len(),
                bytes: corpus.bytes.len(),
                sha256: corpus.sha256.clone(),
            },
            initial_loss: result.initial_loss,
            final_loss: result.final_loss,
            val_loss: result.val_loss,
            tokens_per_sec: result.tokens_per_sec,
            train_s: result.train_s,
            train_cpu_s: result.train_cpu_s,
            wall_s: wall.elapsed().as_secs_f64(),
            params_sha256: result.params_sha256.clone(),
            grad_checks: result.grad_checks,
            steps_redone: result.steps_redone,
            mfu: result.mfu.clone(),
            step_profile_ms: profile,
            losses: result.losses.clone(),
            reproduce: format!(
                "phalanx train --workers {n} {}",
                cmd.train.to_args().join(" ")
            ),
        };
        write_json(path, &s)?;
    }
    Ok(())
}

pub fn write_json<T: Serialize>(path: &std::path::Path, v: &T) -> Result<()> {
    let body = serde_json::to_string_pretty(v)?;
    std::fs::write(path, body + "\n").with_context(|| format!("writing {}", path.display()))
}

/// N child worker processes and the threads that read their output.
struct LocalGroup {
    children: Vec<Child>,
    rx: mpsc::Receiver<(usize, Line)>,
    stderr_tail: Vec<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

enum Line {
    Event(WorkerEvent),
    Closed,
}

impl LocalGroup {
    fn spawn(
        exe: &std::path::Path,
        n: usize,
        args: &TrainArgs,
        save: Option<&std::path::Path>,
        json_logs: bool,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stderr_tail = Vec::new();
        for rank in 0..n {
            let mut cmd = Command::new(exe);
            if json_logs {
                cmd.arg("--log-format=json");
            }
            cmd.args(["worker", "run", "--stdio-rendezvous"])
                .arg(format!("--rank={rank}"))
                .arg(format!("--world={n}"))
                .args(args.to_args());
            if let (0, Some(p)) = (rank, save) {
                cmd.arg("--save").arg(p);
            }
            // The profile's environment, whatever this process inherited; the child
            // checks it again before its first torch call.
            numerics::apply(args.numerics, &mut cmd);
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    kill_all(&mut children);
                    return Err(anyhow!("spawning worker {rank} ({}): {e}", exe.display()));
                }
            };
            let out = child.stdout.take().expect("piped stdout");
            let tx2 = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<WorkerEvent>(&line) {
                        Ok(ev) => {
                            if tx2.send((rank, Line::Event(ev))).is_err() {
                                return;
                            }
                        }
                        Err(_) => eprintln!("[worker {rank}] {line}"),
                    }
                }
                let _ = tx2.send((rank, Line::Closed));
            });
            let err = child.stderr.take().expect("piped stderr");
            let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let tail2 = tail.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let mut t = tail2.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() >= 40 {
                        t.remove(0);
                    }
                    t.push(line);
                }
            });
            stderr_tail.push(tail);
            children.push(child);
        }
        let mut g = Self {
            children,
            rx,
            stderr_tail,
        };
        g.rendezvous(Duration::from_millis(args.rendezvous_timeout_ms))?;
        Ok(g)
    }

    fn rendezvous(&mut self, timeout: Duration) -> Result<()> {
        let n = self.children.len();
        let mut addrs: Vec<Option<SocketAddr>> = vec![None; n];
        let deadline = Instant::now() + timeout;
        while addrs.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((rank, Line::Event(WorkerEvent::Listening { addr, .. }))) => {
                    addrs[rank] = Some(addr)
                }
                Ok((rank, Line::Event(WorkerEvent::Error { message, .. }))) => {
                    return Err(self.fail(rank, &message))
                }
                Ok((rank, Line::Closed)) => {
                    return Err(self.fail(rank, "exited before announcing its address"))
                }
                Ok(_) => {}
                Err(_) => {
                    let missing: Vec<usize> = (0..n).filter(|&r| addrs[r].is_none()).collect();
                    return Err(self.fail(
                        missing[0],
                        &format!(
                            "workers {missing:?} did not announce an address within {} ms",
                            timeout.as_millis()
                        ),
                    ));
                }
            }
        }
        let list = PeerList {
            peers: addrs
                .into_iter()
                .map(|a| a.expect("all announced"))
                .collect(),
            secret: EpochSecret::random().to_hex(),
        };
        let line = serde_json::to_string(&list)? + "\n";
        for (rank, c) in self.children.iter_mut().enumerate() {
            let stdin = c
                .stdin
                .as_mut()
                .ok_or_else(|| anyhow!("worker {rank} has no stdin"))?;
            stdin
                .write_all(line.as_bytes())
                .and_then(|_| stdin.flush())
                .with_context(|| format!("sending peers to worker {rank}"))?;
        }
        Ok(())
    }

    /// Waits for rank 0's result, passing events on; `idle` bounds the gap between events.
    fn drive(
        &mut self,
        idle: Duration,
        mut on_event: impl FnMut(&WorkerEvent),
    ) -> Result<RunResult> {
        let n = self.children.len();
        let mut done: Vec<Option<RunResult>> = vec![None; n];
        while done.iter().any(Option::is_none) {
            match self.rx.recv_timeout(idle) {
                Ok((rank, Line::Event(WorkerEvent::Done { result, .. }))) => {
                    done[rank] = Some(*result)
                }
                Ok((rank, Line::Event(WorkerEvent::Error { message, .. }))) => {
                    return Err(self.fail(rank, &message))
                }
                Ok((rank, Line::Closed)) if done[rank].is_none() => {
                    return Err(self.fail(rank, "exited without a result"))
                }
                Ok((_, Line::Event(ev))) => on_event(&ev),
                Ok(_) => {}
                Err(_) => {
                    return Err(self.fail(
                        0,
                        &format!("no progress from any worker for {} s", idle.as_secs()),
                    ))
                }
            }
        }
        for (rank, c) in self.children.iter_mut().enumerate() {
            let st = wait_timeout(c, Duration::from_secs(30))
                .with_context(|| format!("waiting for worker {rank} to exit"))?;
            if !st.success() {
                bail!("worker {rank} exited with {st} after reporting its result");
            }
        }
        Ok(done.swap_remove(0).expect("rank 0 done"))
    }

    /// Kills every worker and builds an error naming `rank` with its last stderr lines.
    fn fail(&mut self, rank: usize, why: &str) -> anyhow::Error {
        kill_all(&mut self.children);
        std::thread::sleep(Duration::from_millis(100));
        let tail = self.stderr_tail[rank]
            .lock()
            .map(|t| t.join("\n"))
            .unwrap_or_default();
        if tail.is_empty() {
            anyhow!("worker {rank}: {why}")
        } else {
            anyhow!("worker {rank}: {why}\n--- last stderr lines of worker {rank} ---\n{tail}")
        }
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        kill_all(&mut self.children);
    }
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_timeout(c: &mut Child, t: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = c.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            bail!("did not exit within {} s", t.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--metrics-listen`: turns this worker's metrics on and serves them until the returned
/// server is dropped (`None`: metrics stay off).
pub fn serve_metrics(
    addr: Option<SocketAddr>,
    instance: &str,
) -> Result<Option<phalanx_telemetry::server::MetricsServer>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let server = phalanx_telemetry::server::serve_worker(addr, instance)
        .with_context(|| "--metrics-listen")?;
    tracing::info!(metrics_addr = %server.local_addr(), "serving /metrics");
    Ok(Some(server))
}

pub fn worker_run(cmd: WorkerRunCmd) -> Result<()> {
    // First of all, before libtorch does any work: the numerics profile's environment
    // (this re-executes the process when its environment differs).
    let rank = cmd.rank;
    let res = numerics::ensure(cmd.train.numerics)
        .map_err(anyhow::Error::from)
        .and_then(|()| worker_inner(&cmd));
    if let Err(e) = &res {
        if cmd.stdio_rendezvous {
            rendezvous::emit(&WorkerEvent::Error {
                rank,
                message: format!("{e:#}"),
            });
        }
    }
    res
}

fn worker_inner(cmd: &WorkerRunCmd) -> Result<()> {
    let (rank, world) = (cmd.rank, cmd.world);
    if world == 0 || rank >= world {
        bail!("--rank {rank} must be below --world {world}");
    }
    let (spec, corpus, device) = preflight(&cmd.train, world)?;
    let local = assign(spec.micro_batches(), world, rank).len();
    device.check_fits(&MemoryEstimate::new(&spec.model, spec.micro_batch, local))?;
    // Before the first torch call: thread count, or the CUDA library (and a memory cap,
    // so that several workers can share one GPU).
    if let (DeviceRequest::Cuda(n), Some(gib)) = (&device, cmd.train.memory_gib) {
        phalanx_train::device::cap_cuda_memory(*n, gib)?;
    }
    let tdev = device.activate()?;
    let (train, val) = corpus.split(spec.val_fraction, spec.model.ctx_len)?;
    let mut engine = Engine::new(spec, train, val, tdev)?;

    let listen = match (cmd.listen, cmd.stdio_rendezvous) {
        (Some(a), _) => a,
        (None, true) => "127.0.0.1:0".parse().expect("literal address"),
        (None, false) => *cmd
            .peers
            .get(rank)
            .ok_or_else(|| anyhow!("--peers has no entry for rank {rank}"))?,
    };
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let rdv_timeout = Duration::from_millis(cmd.train.rendezvous_timeout_ms);
    let (peers, secret) = if cmd.stdio_rendezvous {
        let (peers, secret) = rendezvous::stdio_peers(rank, world, addr, rdv_timeout)?;
        (peers, Some(secret))
    } else {
        rendezvous::validate_peers(&cmd.peers, rank, world, None)?;
        let secret = match &cmd.ring_secret_file {
            Some(p) => Some(read_ring_secret(p)?),
            None => None,
        };
        (cmd.peers.clone(), secret)
    };
    let op_timeout = Duration::from_millis(cmd.train.op_timeout_ms);
    let mut cfg = GroupConfig::new(rank, peers);
    cfg.rendezvous_timeout = rdv_timeout;
    cfg.op_timeout = op_timeout;
    cfg.security = secret.map(|secret| Security { secret, tls: None });
    let mut group = BlockingGroup::connect(cfg, listener)?;
    tracing::info!(rank, world, %addr, "group formed");

    let _metrics = serve_metrics(cmd.metrics_listen, &format!("rank-{rank}"))?;
    let tokens_per_step = engine.spec.tokens_per_step();
    let report = cmd.stdio_rendezvous && rank == 0;
    let mut result = dp::train(
        &mut engine,
        &mut group,
        &DpOptions {
            op_timeout,
            grad_check_every: cmd.train.grad_check_interval,
        },
        &mut |s| {
            phalanx_worker::metrics::step(s, tokens_per_step);
            if report {
                rendezvous::emit(&WorkerEvent::Step(s.clone()));
            } else if rank == 0 {
                println!(
                    "step {:>5}  loss {:.4}  lr {:.2e}  {:.0} ms",
                    s.step + 1,
                    s.loss,
                    s.lr,
                    s.step_ms
                );
            }
        },
    )?;
    if rank == 0 {
        // After the timed loop: the peak may take a microbenchmark (cached afterwards).
        match phalanx_train::mfu::device_peak(&device, engine.spec.precision) {
            Ok(peak) => {
                result.mfu = Some(phalanx_train::mfu::Mfu::new(
                    &engine.spec.model,
                    result.tokens_per_sec,
                    world,
                    &peak,
                ))
            }
            Err(e) => tracing::warn!(error = %e, "no MFU: the device's peak is unknown"),
        }
    }
    if let (0, Some(path)) = (rank, &cmd.save) {
        let meta = phalanx_train::export::ExportMeta {
            model: engine.spec.model.name.clone(),
            seed: engine.spec.seed,
            steps: engine.step(),
            params_sha256: engine.params_sha256(),
            numerics: cmd.train.numerics.to_string(),
        };
        let bytes =
            phalanx_train::export::to_safetensors(&engine.spec.model, &engine.params, &meta)?;
        crate::model::write_file_atomic(path, &bytes)?;
    }
    if cmd.stdio_rendezvous {
        rendezvous::emit(&WorkerEvent::Done {
            rank,
            result: Box::new(result.clone()),
        });
    }
    if let (0, Some(path)) = (rank, &cmd.summary) {
        write_json(path, &result)?;
    }
    Ok(())
}

pub fn devices(cmd: DevicesCmd) -> Result<()> {
    let cuda = if cmd.cuda {
        match phalanx_train::device::load_cuda() {
            Ok(lib) => Ok((lib, tch::Cuda::device_count())),
            Err(e) => Err(e.to_string()),
        }
    } else {
        Err("not probed (pass --cuda)".to_string())
    };
    if cmd.json {
        let v = serde_json::json!({
            "emulated": CATALOGUE,
            "cuda": match &cuda { Ok((lib, n)) => serde_json::json!({"library": lib, "devices": n}), Err(e) => serde_json::json!({"error": e}) },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>12} {:>9} {:>10} {:>16}",
        "EMULATED MODEL", "BF16 TFLOP/s", "HBM GiB", "HBM TB/s", "INTERCONNECT GB/s"
    );
    for s in CATALOGUE {
        println!(
            "{:<16} {:>12.0} {:>9.0} {:>10.2} {:>16.0}",
            s.name, s.bf16_tflops, s.hbm_gib, s.hbm_tb_per_s, s.interconnect_gb_per_s
        );
    }
    println!();
    match cuda {
        Ok((lib, n)) => println!("CUDA: {n} device(s) via {lib}; use --device cuda:N"),
        Err(e) => println!("CUDA: {e}"),
    }
    Ok(())
}
