//! `phalanx bench ...`: benchmarks measured side by side in one run.
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
}

#[derive(Args, Debug)]
pub struct BenchTrain {
    #[arg(long, default_value = "small")]
    model: String,
    #[arg(long, default_value_t = 8)]
    steps: u64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Alternating rounds of each side; the medians are compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long)]
    data: Option<String>,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct TrainBenchResult {
    model: String,
    steps: u64,
    batch: usize,
    tokens_per_step: u64,
    bare_tch_tokens_per_sec: Vec<f64>,
    phalanx_tokens_per_sec: Vec<f64>,
    ratio_median: f64,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Train(b) => bench_train(b),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn bench_train(b: BenchTrain) -> Result<()> {
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let data = b.data.clone().unwrap_or_else(default_corpus_spec);
    let corpus = Corpus::load(&data)?;
    let model = ModelConfig::named(&b.model)?;
    let spec = phalanx_train::engine::TrainSpec {
        model: model.clone(),
        seed: 1,
        steps: b.steps,
        global_batch: b.batch,
        micro_batch: b.batch,
        val_fraction: 0.1,
        val_micro_batches: 1,
        optim: AdamWConfig::for_steps(b.steps),
    };
    let (train, val) = corpus.split(spec.val_fraction, model.ctx_len)?;
    let tokens_per_step = spec.tokens_per_step();
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("phalanx-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for round in 0..b.rounds {
        // The bare loop: tch's own AdamW over the VarStore, one forward/backward per step.
        let engine = Engine::new(spec.clone(), train.clone(), val.clone(), tch::Device::Cpu)?;
        let mut opt = tch::nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&engine.model.vs, 3e-3)?;
        let t0 = Instant::now();
        for step in 0..b.steps {
            let (x, y) = engine.train_batch(step, 0)?;
            let loss = engine.model.loss(&x, &y)?;
            opt.backward_step_clip_norm(&loss, 1.0);
        }
        let bare_tps = (tokens_per_step * b.steps) as f64 / t0.elapsed().as_secs_f64();
        bare.push(bare_tps);

        let summary = dir.join(format!("train-{round}.json"));
        let mut child = Command::new(&exe)
            .args(["train", "--workers=1", "--plain", "--seed=1"])
            .arg(format!("--model={}", b.model))
            .arg(format!("--steps={}", b.steps))
            .arg(format!("--global-batch={}", b.batch))
            .arg(format!("--micro-batch={}", b.batch))
            .arg("--val-batches=1")
            .arg(format!("--data={data}"))
            .arg(format!("--summary={}", summary.display()))
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let st = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("phalanx train did not finish within 30 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !st.success() {
            bail!("phalanx train failed with {st}");
        }
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)
            .context("reading the train summary")?;
        let tps = s["tokens_per_sec"]
            .as_f64()
            .context("summary has no tokens_per_sec")?;
        ours.push(tps);
        println!(
            "round {round}: bare tch {bare_tps:.0} tokens/s, phalanx --workers 1 {tps:.0} tokens/s"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let r = TrainBenchResult {
        model: b.model,
        steps: b.steps,
        batch: b.batch,
        tokens_per_step,
        ratio_median: median(&ours) / median(&bare),
        bare_tch_tokens_per_sec: bare,
        phalanx_tokens_per_sec: ours,
    };
    println!(
        "(a) phalanx train --workers 1 / bare tch loop, tokens/s: {:.3} (goal >= 0.98)",
        r.ratio_median
    );
    if let Some(p) = &b.out {
        write_json(p, &r)?;
    }
    Ok(())
}
