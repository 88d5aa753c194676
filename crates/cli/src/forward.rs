//! The training verbs live in a second binary, `phalanx-train`, next to `phalanx`: it is
//! the one that links libtorch. `phalanx train ...` (and `worker start|run`, `sample`,
//! `devices`, `bench`, `job export`) replaces itself with it, same arguments, same pid,
//! so scripts, supervisors and tests see one command.
use std::path::PathBuf;

use anyhow::{anyhow, Result};

/// The file name of the training binary.
pub const TRAINING_BINARY: &str = "phalanx-train";

/// `phalanx-train` in the directory of the running executable.
pub fn training_binary() -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(|e| anyhow!("locating this executable: {e}"))?;
    let dir = me
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", me.display()))?;
    let p = dir.join(TRAINING_BINARY);
    if !p.is_file() {
        return Err(anyhow!(
            "this verb runs {}, which is missing (build it with `cargo build --release -p phalanx-cli` or `just build`; it is installed next to `phalanx`)",
            p.display()
        ));
    }
    Ok(p)
}

/// Replaces this process with `phalanx-train` and this process's arguments. Returns only
/// on failure.
pub fn exec_training_binary() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let bin = training_binary()?;
    let err = std::process::Command::new(&bin)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(anyhow!("executing {}: {err}", bin.display()))
}
