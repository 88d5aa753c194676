//! End-to-end tests of the numerics profile: workers whose environments ask for other CPU
//! kernels still compute the profile's bits.
//!
//! On one machine, "another CPU" is emulated by the variables a CPU's libraries would
//! pick differently by themselves: `ATEN_CPU_CAPABILITY=default` (no vector kernels) or
//! `avx512`, and oneDNN's ISA. Each changes `params_sha256` when honoured (see
//! docs/training.md), so a run that matches the reference has ignored them.
use std::path::Path;
use std::time::Duration;

use phalanx_tests::{free_port, phalanx, run_with_timeout, stderr_of, KillOnDrop};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

fn train(dir: &Path, tag: &str, workers: usize, extra: &[&str], env: &[(&str, &str)]) -> Value {
    let summary = dir.join(format!("summary-{tag}.json"));
    let mut c = phalanx();
    c.args(["train", "--plain", "--model=tiny", "--seed=7", "--steps=30"])
        .arg(format!("--workers={workers}"))
        .arg(format!("--summary={}", summary.display()))
        .args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run_with_timeout(c, LIMIT);
    assert!(
        out.status.success(),
        "train {tag} failed:\n{}",
        stderr_of(&out)
    );
    serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap()
}

/// The environment a profile pins, removed so that a test starts from a clean slate.
const PINNED: [&str; 4] = [
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
];

#[test]
fn an_inherited_cpu_capability_does_not_change_the_bits() {
    let dir = tempfile::tempdir().unwrap();
    let reference = train(dir.path(), "ref", 1, &[], &[]);
    assert_eq!(reference["numerics"], "x86-64-avx2");
    let hostile = train(
        dir.path(),
        "hostile",
        2,
        &[],
        &[
            ("ATEN_CPU_CAPABILITY", "default"),
            ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE"),
            ("MKL_CBWR", "COMPATIBLE"),
        ],
    );
    assert_eq!(hostile["params_sha256"], reference["params_sha256"]);
    assert_eq!(hostile["losses"], reference["losses"]);
}

#[test]
fn hand_started_workers_with_different_capabilities_reproduce_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let reference = train(dir.path(), "ref", 1, &[], &[]);
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let summary = dir.path().join("manual.json");
    // Rank 0 as on a machine whose ATen picks AVX-512, rank 1 as on one with no vector
    // kernels at all.
    let envs: [&[(&str, &str)]; 2] = [
        &[("ATEN_CPU_CAPABILITY", "avx512")],
        &[
            ("ATEN_CPU_CAPABILITY", "default"),
            ("DNNL_MAX_CPU_ISA", "AVX512_CORE"),
        ],
    ];
    let spawn = |rank: usize| {
        let mut c = phalanx();
        c.args([
            "worker",
            "run",
            "--world=2",
            "--model=tiny",
            "--steps=30",
            "--seed=7",
        ])
        .arg(format!("--rank={rank}"))
        .arg(format!("--peers={peers}"))
        .arg(format!("--summary={}", summary.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        for v in PINNED {
            c.env_remove(v);
        }
        for (k, v) in envs[rank] {
            c.env(k, v);
        }
        KillOnDrop(c.spawn().unwrap())
    };
    let (mut w0, mut w1) = (spawn(0), spawn(1));
    assert!(w0.wait_timeout(LIMIT).expect("rank 0 finishes").success());
    assert!(w1.wait_timeout(LIMIT).expect("rank 1 finishes").success());
    let s: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["params_sha256"], reference["params_sha256"]);
}

fn cpu_has_avx512() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" avx512f"))
}

#[test]
fn native_is_recorded_and_on_avx512_computes_other_bits() {
    let dir = tempfile::tempdir().unwrap();
    let pinned = train(dir.path(), "pinned", 1, &[], &[]);
    let native = train(dir.path(), "native", 2, &["--numerics=native"], &[]);
    assert_eq!(native["numerics"], "native");
    assert!(native["reproduce"]
        .as_str()
        .unwrap()
        .contains("--numerics=native"));
    if cpu_has_avx512() {
        // The profile is what keeps AVX-512 kernels out: without it the bits differ.
        assert_ne!(native["params_sha256"], pinned["params_sha256"]);
    }
    // Native is still deterministic on one machine, whatever the world size.
    let native1 = train(dir.path(), "native1", 1, &["--numerics=native"], &[]);
    assert_eq!(native1["params_sha256"], native["params_sha256"]);
    let mut c = phalanx();
    c.args(["train", "--steps=1", "--numerics=avx512"]);
    let out = run_with_timeout(c, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("unknown numerics profile `avx512`"));
}
