//! End-to-end tests of trained models as files: `phalanx train --save`, `phalanx sample`
//! and `phalanx job export`.
use std::path::Path;
use std::time::Duration;

use phalanx_proto::{CheckpointInfo, JobState};
use phalanx_tests::cluster::{job_toml, LocalCluster};
use phalanx_tests::{phalanx, run_with_timeout, stderr_of};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `phalanx train --model tiny --seed 7 --steps STEPS --workers N` with a summary;
/// `extra` adds flags.
fn train(dir: &Path, workers: usize, steps: u64, extra: &[&str]) -> Value {
    let summary = dir.join(format!("summary-{workers}-{steps}.json"));
    let mut c = phalanx();
    c.args(["train", "--plain", "--model=tiny", "--seed=7"])
        .arg(format!("--steps={steps}"))
        .arg(format!("--workers={workers}"))
        .arg(format!("--summary={}", summary.display()))
        .args(extra);
    let out = run_with_timeout(c, LIMIT);
    assert!(out.status.success(), "train failed:\n{}", stderr_of(&out));
    serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap()
}

fn sample(weights: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = phalanx();
    c.args(["sample", "--prompt=#include <torch/"])
        .arg(format!("--weights={}", weights.display()))
        .args(extra);
    run_with_timeout(c, Duration::from_secs(120))
}

fn sample_ok(weights: &Path, extra: &[&str]) -> String {
    let out = sample(weights, extra);
    assert!(
        out.status.success(),
        "sample {extra:?} failed:\n{}",
        stderr_of(&out)
    );
    stdout_of(&out)
}

/// The safetensors header (JSON) of a file.
fn header(path: &Path) -> Value {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&b[8..8 + n]).unwrap()
}

#[test]
fn train_save_writes_safetensors_that_sample_reads_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tiny.safetensors");
    let s = train(dir.path(), 2, 30, &[&format!("--save={}", f.display())]);
    let h = header(&f);
    let md = &h["__metadata__"];
    assert_eq!(md["model"], "tiny");
    assert_eq!(md["seed"], "7");
    assert_eq!(md["steps"], "30");
    assert_eq!(md["numerics"], "x86-64-avx2");
    assert_eq!(md["params_sha256"], s["params_sha256"]);
    assert_eq!(s["numerics"], "x86-64-avx2");
    assert_eq!(h["wte.weight"]["dtype"], "F32");
    assert_eq!(h["wte.weight"]["shape"], serde_json::json!([256, 64]));
    assert_eq!(
        h["h01.attn.c_attn.weight"]["shape"],
        serde_json::json!([192, 64])
    );

    let greedy = sample_ok(&f, &["--tokens=40"]);
    assert_eq!(greedy, sample_ok(&f, &["--tokens=40", "--seed=5"]));
    assert!(greedy.len() >= 30, "{greedy:?}");
    let hot = |seed: &str| sample_ok(&f, &["--tokens=40", "--temperature=1.0", seed]);
    let a = hot("--seed=1");
    assert_eq!(a, hot("--seed=1"));
    assert_ne!(a, hot("--seed=2"));
    // Under a hostile inherited environment the profile still gives the same text.
    let mut c = phalanx();
    c.args(["sample", "--prompt=#include <torch/", "--tokens=40"])
        .arg(format!("--weights={}", f.display()))
        .env("ATEN_CPU_CAPABILITY", "default");
    let out = run_with_timeout(c, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), greedy);
}

#[test]
fn sample_refuses_bad_files_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let e = stderr_of(&sample(&missing, &[]));
    assert!(e.contains("nope.safetensors"), "{e}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let out = sample(&junk, &[]);
    assert!(!out.status.success());
    let e = stderr_of(&out);
    assert!(e.contains("not a valid safetensors file"), "{e}");
    assert!(!e.contains("panicked"), "{e}");

    // A real file with one tensor's shape changed in the header (same byte count).
    let f = dir.path().join("tiny.safetensors");
    train(dir.path(), 1, 2, &[&format!("--save={}", f.display())]);
    let b = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let text = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let i = text.find("\"wpe.weight\"").unwrap();
    let j = i + text[i..].find("[64,64]").unwrap();
    let bad_text = format!("{}[32,128]{}", &text[..j], &text[j + 7..]);
    let mut bad = (bad_text.len() as u64).to_le_bytes().to_vec();
    bad.extend_from_slice(bad_text.as_bytes());
    bad.extend_from_slice(&b[8 + n..]);
    let g = dir.path().join("reshaped.safetensors");
    std::fs::write(&g, bad).unwrap();
    let e = stderr_of(&sample(&g, &[]));
    assert!(
        e.contains("`wpe.weight` has shape [32, 128]") && e.contains("[64, 64]"),
        "{e}"
    );
    let e = stderr_of(&sample(&f, &["--temperature=-1"]));
    assert!(e.contains("temperature"), "{e}");
    let e = stderr_of(&sample(&f, &["--numerics=avx512"]));
    assert!(e.contains("unknown numerics profile `avx512`"), "{e}");
}

#[test]
fn save_into_a_missing_directory_is_refused_before_training() {
    let mut c = phalanx();
    c.args([
        "train",
        "--plain",
        "--steps=2",
        "--save=/nonexistent/dir/m.safetensors",
    ]);
    let t0 = std::time::Instant::now();
    let out = run_with_timeout(c, LIMIT);
    assert!(!out.status.success());
    let e = stderr_of(&out);
    assert!(
        e.contains("/nonexistent/dir") && e.contains("does not exist"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn job_export_writes_the_jobs_final_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("reference.safetensors");
    let reference = train(dir.path(), 1, 20, &[&format!("--save={}", saved.display())]);
    let c = LocalCluster::start(2, 0);
    c.submit(&job_toml("export-me", 20, 10, 1, 2));
    c.wait_for(Duration::from_secs(240), "the job to complete", |c| {
        c.job().is_some_and(|j| j.state == JobState::Completed)
    });
    // The final step's checkpoint is committed by the time the job completes (or soon
    // after, while it is recorded).
    c.wait_for(
        Duration::from_secs(30),
        "a durable checkpoint of step 20",
        |c| {
            let out = c.ctl_ok(&["checkpoint", "list", "--json"]);
            let cps: Vec<CheckpointInfo> = serde_json::from_str(&out).unwrap_or_default();
            cps.iter().any(|e| e.step == 20 && e.durable)
        },
    );
    let out = dir.path().join("job.safetensors");
    let text = c.ctl_ok(&[
        "job",
        "export",
        "--json",
        &format!("--out={}", out.display()),
    ]);
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["job"], "export-me");
    assert_eq!(e["step"], 20);
    assert_eq!(e["params_sha256"], reference["params_sha256"]);
    assert_eq!(e["job_params_sha256"], reference["params_sha256"]);
    let md = &header(&out)["__metadata__"];
    assert_eq!(md["params_sha256"], reference["params_sha256"]);
    assert_eq!(md["numerics"], "x86-64-avx2");
    assert_eq!(md["steps"], "20");
    // The exported model is the trained model: it writes the same text.
    let args = ["--tokens=40", "--temperature=1", "--seed=3"];
    let text = sample_ok(&out, &args);
    assert_eq!(text, sample_ok(&saved, &args));
    assert!(text.len() > 30, "{text:?}");
    // A step that has no durable checkpoint is named.
    let mut x = phalanx();
    x.args(["job", "export", "--step=7"])
        .arg(format!(
            "--out={}",
            dir.path().join("x.safetensors").display()
        ))
        .arg(format!("--dir={}", c.cluster_dir().display()));
    let o = run_with_timeout(x, Duration::from_secs(60));
    assert!(!o.status.success());
    let err = stderr_of(&o);
    assert!(
        err.contains("no durable checkpoint at step 7") && err.contains("20"),
        "{err}"
    );
}
