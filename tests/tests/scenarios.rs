//! Chaos scenarios end to end (issue 9): the library validates and lists, bad input is
//! refused with line and column before anything starts, a fast subset of the library
//! passes (real network namespaces where the test runs as root), and a scenario whose
//! expectation is too strict fails with the measured value and the replay command.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use phalanx_tests::{phalanx, run_with_timeout, stderr_of};

/// One cluster at a time from this file (the machine may have 2 cores).
static CLUSTER: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn library(name: &str) -> PathBuf {
    repo().join("scenarios").join(format!("{name}.toml"))
}

fn stdout_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_library_validates_and_lists_its_purposes() {
    let files: Vec<PathBuf> = std::fs::read_dir(repo().join("scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(files.len() >= 16, "{} scenarios", files.len());
    let mut c = phalanx();
    c.args(["scenario", "validate"]).args(&files);
    let o = run_with_timeout(c, Duration::from_secs(30));
    assert!(o.status.success(), "{}", stderr_of(&o));
    let mut c = phalanx();
    c.args(["scenario", "list"]).arg(repo().join("scenarios"));
    let o = run_with_timeout(c, Duration::from_secs(30));
    let out = stdout_of(&o);
    assert!(o.status.success());
    assert_eq!(out.lines().count(), files.len(), "{out}");
    assert!(!out.contains("INVALID"), "{out}");
    assert!(
        out.contains("controller-pause-leader") && out.contains("stale-leader"),
        "{out}"
    );
}

#[test]
fn bad_input_is_refused_with_line_and_column_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "name = \"bad\"\n[job]\nsteps = 50\n[[faults]]\nkind = \"kill\"\ntarget = \"rank:7\"\nat_step = 10\n",
    )
    .unwrap();
    let mut c = phalanx();
    c.args(["scenario", "run"])
        .arg(&f)
        .arg("--dir")
        .arg(dir.path().join("c"));
    let o = run_with_timeout(c, Duration::from_secs(30));
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(err.contains("bad.toml:6:10: error"), "{err}");
    assert!(err.contains("at most 4 ranks"), "{err}");
    assert!(!dir.path().join("c").exists(), "nothing was started");
}

fn assert_no_lab_left() {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(rest) = name.strip_prefix("phxlab-") {
            // Another test's lab may be alive; none may belong to a dead process.
            let pid = rest.split('-').next().unwrap_or("");
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "namespace {name} left behind by a dead process"
            );
        }
    }
}

/// The fast subset of `just chaos`: four library scenarios, one of them over real network
/// namespaces (or its stated fallback where the test is not root).
#[test]
fn a_fast_subset_of_the_library_passes() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let root = tempfile::tempdir().unwrap();
    let names = [
        "kill-one-rank",
        "link-down-worker-host",
        "controller-pause-leader",
        "fault-during-recovery",
    ];
    let mut c = phalanx();
    c.current_dir(repo())
        .args(["scenario", "suite", "--report-root"])
        .arg(root.path());
    for n in names {
        c.arg(library(n));
    }
    let o = run_with_timeout(c, Duration::from_secs(600));
    let out = stdout_of(&o);
    assert!(o.status.success(), "{out}\n{}", stderr_of(&o));
    for n in names {
        let row = out.lines().find(|l| l.starts_with(n)).unwrap_or_default();
        assert!(
            row.contains(" pass ") && row.contains(" yes "),
            "{n}: {row}\n{out}"
        );
        for f in [
            "report.json",
            "report.md",
            "loss.svg",
            "step_time.svg",
            "world.svg",
            "controllers.svg",
        ] {
            assert!(root.path().join(n).join(f).exists(), "{n}/{f}");
        }
    }
    let report =
        std::fs::read_to_string(root.path().join("link-down-worker-host/report.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let network = v["network"].as_str().unwrap_or_default();
    let mechanism = v["faults"][0]["mechanism"].as_str().unwrap_or_default();
    let root_user = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if root_user && Path::new("/proc/self/ns/net").exists() {
        assert!(network.starts_with("network namespaces"), "{network}");
        assert!(mechanism.starts_with("real cut"), "{mechanism}");
    } else {
        assert!(mechanism.contains("FALLBACK"), "{mechanism}");
    }
    assert_no_lab_left();
}

#[test]
fn a_too_strict_expectation_fails_with_its_measured_value_and_the_replay_command() {
    let _one = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("too-strict.toml");
    std::fs::write(
        &f,
        "# Deliberately too strict.\nname = \"too-strict\"\n[cluster]\nworkers = 3\nspares = 1\n[job]\nsteps = 80\nworld_size_min = 2\n\
         [[faults]]\nkind = \"kill\"\ntarget = \"rank:1\"\nat_step = 20\n[expect]\nmax_mttr_s = 0.001\n",
    )
    .unwrap();
    let mut c = phalanx();
    c.args(["scenario", "run"])
        .arg(&f)
        .args(["--seed", "5", "--report"])
        .arg(dir.path().join("r"))
        .arg("--dir")
        .arg(dir.path().join("c"));
    let o = run_with_timeout(c, Duration::from_secs(300));
    let (out, err) = (stdout_of(&o), stderr_of(&o));
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("expectation failed: max_mttr_s (expected <= 0.001 s, measured "),
        "{out}"
    );
    let replay = format!("phalanx scenario run {} --seed 5", f.display());
    assert!(out.contains(&format!("replay: {replay}")), "{out}");
    assert!(err.contains("FAILED (max_mttr_s)"), "{err}");
    // `phalanx report DIR` prints the same summary again.
    let mut c = phalanx();
    c.arg("report").arg(dir.path().join("r"));
    let o = run_with_timeout(c, Duration::from_secs(30));
    assert!(
        stdout_of(&o).contains("expectation failed: max_mttr_s"),
        "{}",
        stdout_of(&o)
    );
    // Nothing of the cluster is left running.
    let cluster: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("c/cluster.json")).unwrap()).unwrap();
    for p in cluster["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(cluster["workers"].as_array().unwrap())
    {
        let pid = p["pid"].as_u64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "pid {pid} still runs"
        );
    }
}
