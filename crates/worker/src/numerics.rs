//! Numerics profiles: which CPU kernels libtorch's libraries may pick, so that workers on
//! different x86-64 machines compute the same bits.
//!
//! The bits of a training step depend on the kernels ATen, MKL and oneDNN choose for the
//! CPU (AVX2 or AVX-512 paths sum in different orders). Each library reads its choice
//! from the environment once, when it initialises, so a profile is an environment:
//!
//! | variable              | `x86-64-avx2` | `native` |
//! |-----------------------|---------------|----------|
//! | `ATEN_CPU_CAPABILITY` | `avx2`        | unset    |
//! | `MKL_CBWR`            | `AVX2`        | unset    |
//! | `ONEDNN_MAX_CPU_ISA`  | `AVX2`        | unset    |
//! | `DNNL_MAX_CPU_ISA`    | `AVX2`        | unset    |
//!
//! Measured with libtorch 2.11 on an AMD EPYC with AVX-512 (docs/training.md): ATen's
//! capability and oneDNN's ISA each change the bits; `MKL_CBWR=AVX2` changes nothing
//! there (MKL already takes its AVX2 path on AMD) and is what makes an Intel CPU with
//! AVX-512 take the same path. `DNNL_MAX_CPU_ISA` is oneDNN's older name for the same
//! setting.
//!
//! A parent process sets the profile on its children's environment ([`apply`]); a worker
//! process also checks its own environment before any torch call and, when it differs,
//! re-executes itself with the profile's environment ([`ensure`]), so that a hand-started
//! worker with, say, `ATEN_CPU_CAPABILITY=avx512` in its environment still computes the
//! profile's bits.
use std::ffi::OsString;

use phalanx_proto::NumericsProfile;

use crate::WorkerError;

/// The variables a profile pins (or, for `native`, removes).
pub const VARS: [&str; 4] = [
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
];

/// Set on the re-executed process: the profile has been applied once already.
pub const REEXEC_GUARD: &str = "PHALANX_NUMERICS_APPLIED";

/// The environment of `profile`: each variable of [`VARS`] with its value, or `None` for
/// unset.
pub fn environment(profile: NumericsProfile) -> [(&'static str, Option<&'static str>); 4] {
    // One table, in phalanx-proto, shared with the control-plane binary.
    profile.environment()
}

/// A variable whose value differs from the profile's: (name, have, want).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub var: &'static str,
    pub have: Option<String>,
    pub want: Option<&'static str>,
}

/// The variables of `env` (a lookup) that differ from `profile`'s environment.
pub fn mismatches(profile: NumericsProfile, env: impl Fn(&str) -> Option<String>) -> Vec<Mismatch> {
    environment(profile)
        .into_iter()
        .filter_map(|(var, want)| {
            let have = env(var);
            (have.as_deref() != want).then_some(Mismatch { var, have, want })
        })
        .collect()
}

fn describe(m: &[Mismatch]) -> String {
    m.iter()
        .map(|m| {
            format!(
                "{}: {} -> {}",
                m.var,
                m.have.as_deref().unwrap_or("unset"),
                m.want.unwrap_or("unset")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Puts `profile`'s environment on a child process about to be spawned.
pub fn apply(profile: NumericsProfile, cmd: &mut std::process::Command) {
    for (var, want) in environment(profile) {
        match want {
            Some(v) => cmd.env(var, v),
            None => cmd.env_remove(var),
        };
    }
}

/// Makes this process run under `profile`. Call it first thing, before any torch call:
/// when the environment already matches it returns at once; otherwise it re-executes the
/// current binary with the same arguments and the profile's environment (the process
/// keeps its pid and its open stdin/stdout/stderr) and does not return. Errors if the
/// re-execution fails, or if the environment still differs after one.
pub fn ensure(profile: NumericsProfile) -> Result<(), WorkerError> {
    let m = mismatches(profile, |v| std::env::var(v).ok());
    if m.is_empty() {
        return Ok(());
    }
    if std::env::var_os(REEXEC_GUARD).is_some() {
        return Err(WorkerError::Protocol(format!(
            "numerics profile {profile}: the environment still differs after re-executing ({})",
            describe(&m)
        )));
    }
    let exe = std::env::current_exe()
        .map_err(|e| WorkerError::Protocol(format!("locating our own binary: {e}")))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // Overriding a value someone set is worth telling; filling in unset ones is routine.
    if m.iter().any(|m| m.have.is_some()) {
        tracing::info!(%profile, changes = %describe(&m), "re-executing under the numerics profile");
    } else {
        tracing::debug!(%profile, changes = %describe(&m), "re-executing under the numerics profile");
    }
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(args).env(REEXEC_GUARD, profile.as_str());
    apply(profile, &mut cmd);
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(WorkerError::Protocol(format!(
        "numerics profile {profile}: re-executing {} failed: {err}",
        exe.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_default_profile_pins_aten_mkl_and_onednn_to_avx2() {
        let p = NumericsProfile::X86_64Avx2;
        let all = mismatches(p, lookup(&[]));
        assert_eq!(all.len(), 4);
        let pinned = lookup(&[
            ("ATEN_CPU_CAPABILITY", "avx2"),
            ("MKL_CBWR", "AVX2"),
            ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ("DNNL_MAX_CPU_ISA", "AVX2"),
        ]);
        assert!(mismatches(p, &pinned).is_empty());
        let m = mismatches(
            p,
            lookup(&[
                ("ATEN_CPU_CAPABILITY", "avx512"),
                ("MKL_CBWR", "AVX2"),
                ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                ("DNNL_MAX_CPU_ISA", "AVX2"),
            ]),
        );
        assert_eq!(
            m,
            vec![Mismatch {
                var: "ATEN_CPU_CAPABILITY",
                have: Some("avx512".into()),
                want: Some("avx2")
            }]
        );
        assert_eq!(describe(&m), "ATEN_CPU_CAPABILITY: avx512 -> avx2");
        // Native removes the pins.
        assert!(mismatches(NumericsProfile::Native, lookup(&[])).is_empty());
        assert_eq!(mismatches(NumericsProfile::Native, &pinned).len(), 4);
    }

    #[test]
    fn apply_sets_and_removes_the_variables_on_a_child() {
        let mut c = std::process::Command::new("true");
        c.env("ATEN_CPU_CAPABILITY", "avx512");
        apply(NumericsProfile::X86_64Avx2, &mut c);
        let envs: HashMap<_, _> = c
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert_eq!(envs["ATEN_CPU_CAPABILITY"].as_deref(), Some("avx2"));
        assert_eq!(envs["MKL_CBWR"].as_deref(), Some("AVX2"));
        let mut c = std::process::Command::new("true");
        apply(NumericsProfile::Native, &mut c);
        assert!(c.get_envs().all(|(_, v)| v.is_none()));
        assert_eq!(c.get_envs().count(), 4);
    }
}
