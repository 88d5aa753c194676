//! Trained models as files: `phalanx sample`, and the safetensors writing shared by
//! `phalanx train --save` and `phalanx job export`.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use phalanx_proto::NumericsProfile;
use phalanx_train::data::tokenizer;
use phalanx_train::export::from_safetensors;
use phalanx_train::generate::{generate, GenerateOptions};
use phalanx_train::model::Gpt;
use phalanx_worker::numerics;

/// Parses a numerics profile name (for clap).
// One parser for both binaries.
pub use phalanx_cli::util::parse_numerics;

#[derive(Args, Debug)]
pub struct SampleCmd {
    /// A safetensors file written by `phalanx train --save` or `phalanx job export`.
    #[arg(long)]
    pub weights: PathBuf,
    /// Text to continue (byte-level tokens: any UTF-8 works).
    #[arg(long)]
    pub prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// 0: greedy (the most likely byte each time). Otherwise sample from
    /// softmax(logits / temperature) with --seed.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampling stream: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Numerics profile to compute under (default: the one recorded in the file, else
    /// x86-64-avx2).
    #[arg(long, value_parser = parse_numerics)]
    pub numerics: Option<NumericsProfile>,
    /// Print the prompt before the continuation.
    #[arg(long)]
    pub echo: bool,
}

/// Reads a file, bounded: a weights file larger than this is refused before reading.
const WEIGHTS_MAX_BYTES: u64 = 4 << 30;

pub fn sample(cmd: SampleCmd) -> Result<()> {
    let len = std::fs::metadata(&cmd.weights)
        .with_context(|| format!("reading {}", cmd.weights.display()))?
        .len();
    if len > WEIGHTS_MAX_BYTES {
        bail!(
            "{} is {len} bytes, larger than any phalanx model ({WEIGHTS_MAX_BYTES} bytes at most)",
            cmd.weights.display()
        );
    }
    let bytes = std::fs::read(&cmd.weights)
        .with_context(|| format!("reading {}", cmd.weights.display()))?;
    let w = from_safetensors(&bytes).map_err(|e| anyhow!("{}: {e}", cmd.weights.display()))?;
    drop(bytes);
    let opts = GenerateOptions {
        tokens: cmd.tokens,
        temperature: cmd.temperature,
        seed: cmd.seed,
    };
    opts.validate()?;
    if cmd.prompt.is_empty() {
        bail!("--prompt is empty: give at least one character to continue");
    }
    // Before the first torch call: the numerics the model was trained under.
    let profile = cmd
        .numerics
        .or_else(|| NumericsProfile::parse(&w.meta.numerics))
        .unwrap_or_default();
    numerics::ensure(profile)?;
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let model = Gpt::new(&w.cfg, w.meta.seed, tch::Device::Cpu)?;
    model.write_params(&w.params)?;
    let out = generate(&model, &tokenizer::encode(&cmd.prompt), &opts)?;
    let text = tokenizer::decode(&out).map_err(|t| anyhow!("generated token {t} is not a byte"))?;
    let mut stdout = std::io::stdout().lock();
    if cmd.echo {
        write!(stdout, "{}", cmd.prompt)?;
    }
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, then renamed.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!("writing {}: {e}", path.display()));
    }
    Ok(())
}

/// Refuses an output path whose directory does not exist, before any work is done.
pub fn check_output_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{} is a directory; name a file", path.display());
    }
    if path.file_name().is_none() {
        bail!("{} names no file", path.display());
    }
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() && !d.is_dir() => {
            bail!("directory {} does not exist", d.display())
        }
        _ => Ok(()),
    }
}
