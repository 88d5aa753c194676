//! End-to-end tests of the data plane: `phalanx train` with real worker processes.
use std::time::Duration;

use phalanx_tests::{free_port, phalanx, run_with_timeout, stderr_of, KillOnDrop};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

/// `phalanx train --model tiny --seed 7` (unless `extra` sets them) for 30 steps.
fn train(workers: usize, extra: &[&str], dir: &std::path::Path) -> Value {
    let summary = dir.join(format!(
        "summary-{workers}-{}.json",
        extra.join("_").replace(['-', '='], "")
    ));
    let mut c = phalanx();
    c.args(["train", "--plain", "--model=tiny"])
        .args((!extra.iter().any(|a| a.starts_with("--steps"))).then_some("--steps=30"))
        .args((!extra.iter().any(|a| a.starts_with("--seed"))).then_some("--seed=7"))
        .arg(format!("--workers={workers}"))
        .arg(format!("--summary={}", summary.display()))
        .args(extra);
    let out = run_with_timeout(c, LIMIT);
    assert!(
        out.status.success(),
        "train --workers {workers} failed:\n{}",
        stderr_of(&out)
    );
    serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap()
}

#[test]
fn parameters_are_bit_identical_for_one_to_four_workers() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<Value> = (1..=4).map(|n| train(n, &[], dir.path())).collect();
    let sha0 = runs[0]["params_sha256"].as_str().unwrap();
    assert_eq!(sha0.len(), 64);
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["workers"], i + 1);
        assert_eq!(r["steps"], 30);
        assert_eq!(
            r["params_sha256"].as_str().unwrap(),
            sha0,
            "workers={} differs",
            i + 1
        );
        // Losses are reduced in micro-batch order, so they agree to the bit too.
        assert_eq!(r["losses"], runs[0]["losses"]);
        assert_eq!(r["val_loss"], runs[0]["val_loss"]);
        assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0);
    }
}

/// bf16 compute keeps the determinism of fp32 (every rank computes a micro-batch with the
/// same kernels, and the reduction is order-free) and stays close to fp32's loss curve.
///
/// The tolerance: bf16 keeps 8 significant bits, so every operand of a matrix product is
/// rounded by at most 2^-9 (0.2%) relative; the products accumulate in f32 and the loss
/// is computed from f32 logits, so one step's loss moves by a few 0.2% of the logits'
/// spread, ~0.01 nats at a loss of 3-5, and AdamW's normalised updates keep the two
/// trajectories from drifting apart over 30 steps (observed: at most 0.0009 nats). 0.02
/// nats per step and on the validation loss is well above that and far below what a
/// broken bf16 path (no gradient through a cast, bf16 master weights) gives: differences
/// of 0.1 to 2 nats.
#[test]
fn bf16_is_bit_identical_for_one_to_four_workers_and_tracks_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<Value> = (1..=4)
        .map(|n| train(n, &["--precision=bf16"], dir.path()))
        .collect();
    let sha0 = runs[0]["params_sha256"].as_str().unwrap();
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["precision"], "bf16");
        assert_eq!(
            r["params_sha256"].as_str().unwrap(),
            sha0,
            "bf16, workers={} differs",
            i + 1
        );
        assert_eq!(r["losses"], runs[0]["losses"]);
    }
    let fp32 = train(1, &[], dir.path());
    assert_eq!(fp32["precision"], "fp32");
    assert_ne!(
        fp32["params_sha256"], runs[0]["params_sha256"],
        "bf16 computes other bits"
    );
    let (b, f) = (
        runs[0]["losses"].as_array().unwrap(),
        fp32["losses"].as_array().unwrap(),
    );
    assert_eq!(b.len(), 30);
    for (step, (b, f)) in b.iter().zip(f).enumerate() {
        let d = (b.as_f64().unwrap() - f.as_f64().unwrap()).abs();
        assert!(d < 0.02, "step {step}: bf16 {b} vs fp32 {f}");
    }
    let d = (runs[0]["val_loss"].as_f64().unwrap() - fp32["val_loss"].as_f64().unwrap()).abs();
    assert!(d < 0.02, "validation loss differs by {d}");
}

#[test]
fn loss_falls_on_the_default_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let r = train(2, &["--steps=60"], dir.path());
    let (first, last, val) = (
        r["initial_loss"].as_f64().unwrap(),
        r["final_loss"].as_f64().unwrap(),
        r["val_loss"].as_f64().unwrap(),
    );
    // A uniform guess over 256 bytes costs ln 256 ≈ 5.55 nats.
    assert!((first - 256f64.ln()).abs() < 0.3, "initial loss {first}");
    assert!(
        last < first - 1.5,
        "loss did not fall enough: {first} -> {last}"
    );
    assert!(
        val < first - 1.0,
        "validation loss {val} vs initial {first}"
    );
    assert!(
        r["corpus"]["spec"].as_str().unwrap().contains("torch"),
        "{}",
        r["corpus"]
    );
    assert_eq!(r["corpus"]["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn a_different_seed_gives_different_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let a = train(1, &["--steps=3"], dir.path());
    let b = train(1, &["--steps=3", "--seed=8"], dir.path());
    assert_ne!(a["params_sha256"], b["params_sha256"]);
}

#[test]
fn explicitly_started_workers_match_phalanx_train() {
    let dir = tempfile::tempdir().unwrap();
    let reference = train(2, &["--steps=5"], dir.path());
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let summary = dir.path().join("manual.json");
    let spawn = |rank: usize| {
        let mut c = phalanx();
        c.args([
            "worker",
            "run",
            "--world=2",
            "--model=tiny",
            "--steps=5",
            "--seed=7",
        ])
        .arg(format!("--rank={rank}"))
        .arg(format!("--peers={peers}"))
        .arg(format!("--summary={}", summary.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        KillOnDrop(c.spawn().unwrap())
    };
    let (mut w0, mut w1) = (spawn(0), spawn(1));
    assert!(w0.wait_timeout(LIMIT).expect("rank 0 finishes").success());
    assert!(w1.wait_timeout(LIMIT).expect("rank 1 finishes").success());
    let s: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["params_sha256"], reference["params_sha256"]);
}

fn train_fails(args: &[&str]) -> String {
    let mut c = phalanx();
    c.args(["train", "--plain", "--steps=2"]).args(args);
    let out = run_with_timeout(c, LIMIT);
    assert!(!out.status.success(), "expected failure for {args:?}");
    stderr_of(&out)
}

#[test]
fn a_missing_corpus_is_a_clear_error() {
    let e = train_fails(&["--data=/nonexistent/corpus.txt"]);
    assert!(
        e.contains("/nonexistent/corpus.txt") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn an_empty_corpus_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.txt");
    std::fs::write(&f, "").unwrap();
    let e = train_fails(&[&format!("--data={}", f.display())]);
    assert!(e.contains("empty"), "{e}");
    std::fs::write(&f, "too short").unwrap();
    let e = train_fails(&[&format!("--data={}", f.display())]);
    assert!(e.contains("too small"), "{e}");
}

#[test]
fn a_model_that_does_not_fit_the_emulated_gpu_is_refused() {
    let e = train_fails(&[
        "--model=base",
        "--device=emulated:A100-80GB",
        "--memory-gib=0.05",
    ]);
    assert!(
        e.contains("out of device memory") && e.contains("A100-80GB"),
        "{e}"
    );
    assert!(
        e.contains("need") && e.contains("the device has 53687091 bytes"),
        "{e}"
    );
}

#[test]
fn bad_flags_name_what_is_wrong() {
    assert!(train_fails(&["--model=huge"]).contains("unknown model `huge`"));
    assert!(train_fails(&["--device=tpu:0"]).contains("bad device `tpu:0`"));
    let e = train_fails(&["--workers=5"]);
    assert!(e.contains("--workers 5 exceeds the 4 micro-batches"), "{e}");
    let e = train_fails(&["--global-batch=6", "--micro-batch=4"]);
    assert!(
        e.contains("global_batch 6 must be a positive multiple of micro_batch 4"),
        "{e}"
    );
}

#[test]
fn unreachable_peers_fail_within_the_rendezvous_timeout() {
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let mut c = phalanx();
    c.args([
        "worker",
        "run",
        "--rank=0",
        "--world=2",
        "--steps=2",
        "--rendezvous-timeout-ms=1500",
    ])
    .arg(format!("--peers={peers}"));
    let t0 = std::time::Instant::now();
    let out = run_with_timeout(c, Duration::from_secs(60));
    let took = t0.elapsed();
    assert!(!out.status.success());
    let e = stderr_of(&out);
    assert!(
        e.contains("rank 1") || e.contains(peers.split(',').nth(1).unwrap()),
        "{e}"
    );
    // Start-up (loading the corpus, building the model) plus the 1.5 s bound.
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn help_is_useful_on_every_command() {
    for args in [
        &["--help"][..],
        &["train", "--help"],
        &["worker", "run", "--help"],
        &["devices", "--help"],
        &["bench", "train", "--help"],
    ] {
        let mut c = phalanx();
        c.args(args);
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn devices_lists_the_catalogue() {
    let mut c = phalanx();
    c.args(["devices", "--json"]);
    let out = run_with_timeout(c, Duration::from_secs(30));
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["emulated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for n in ["H100-SXM-80GB", "H200-141GB", "A100-80GB"] {
        assert!(names.contains(&n), "{names:?}");
    }
}

#[test]
fn cuda_without_its_library_is_a_clear_error_not_a_crash() {
    let mut c = phalanx();
    c.args(["train", "--plain", "--steps=1", "--device=cuda:0"])
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .env("PATH", "/nonexistent"); // no python3: no PyTorch to borrow the library from
    let out = run_with_timeout(c, LIMIT);
    let e = stderr_of(&out);
    if out.status.success() {
        // A GPU machine with PyTorch's libtorch_cuda.so on the default search path.
        return;
    }
    assert!(
        e.contains("CUDA") && (e.contains("libtorch_cuda.so") || e.contains("device")),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn a_missing_libtorch_points_at_just_setup() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup_libtorch.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("--check")
        .env("PHALANX_LIBTORCH_DIR", "/nonexistent/libtorch")
        .output()
        .expect("python3");
    assert!(!out.status.success());
    let e = stderr_of(&out);
    assert!(
        e.contains("just setup") && e.contains("/nonexistent/libtorch"),
        "{e}"
    );
}
