//! The operator's CLI (issue 14), tried as a new operator would: `phalanx` links no
//! libtorch, a rejected or mistaken command says so with the documented exit code, the
//! operator's verbs can be undone, a job that cannot run ends `failed` with the reason,
//! and an unreachable cluster is reported quickly.
use std::process::Command;
use std::time::{Duration, Instant};

use phalanx_proto::{JobState, WorkerHealth};
use phalanx_tests::cluster::LocalCluster;
use phalanx_tests::{free_port, phalanx, phalanx_bin, run_with_timeout, stderr_of};

fn ldd(bin: &std::path::Path) -> Option<String> {
    let out = Command::new("ldd").arg(bin).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn phalanx_links_no_libtorch_and_phalanx_train_does() {
    let bin = phalanx_bin();
    let Some(libs) = ldd(&bin) else {
        eprintln!("skipped: no ldd on this machine");
        return;
    };
    assert!(
        !libs.contains("torch") && !libs.contains("libc10"),
        "{} links libtorch:\n{libs}",
        bin.display()
    );
    let train = bin.with_file_name("phalanx-train");
    let train_libs = ldd(&train).expect("ldd phalanx-train");
    assert!(
        train_libs.contains("libtorch_cpu"),
        "phalanx-train should link libtorch:\n{train_libs}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_same_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let mut c = phalanx();
        c.args(["completions", shell]);
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(out.status.success(), "{}", stderr_of(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("undrain"),
            "{shell} completions lack `undrain`"
        );
    }
    let mut c = phalanx();
    c.arg("man");
    let out = run_with_timeout(c, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let roff = String::from_utf8_lossy(&out.stdout);
    assert!(roff.contains(".TH") && roff.contains("phalanx"), "{roff}");
    // The bash script (over 64 KiB, more than a pipe holds) into `head -1`: the writer
    // meets a closed pipe and ends quietly, with no panic on stderr.
    let sh = format!("'{}' completions bash | head -1", phalanx_bin().display());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &sh]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(out.stderr.is_empty(), "{}", stderr_of(&out));
}

#[test]
fn an_unreachable_cluster_is_reported_within_2_s_with_exit_code_3() {
    let addr = format!("127.0.0.1:{}", free_port());
    let creds = tempfile::tempdir().unwrap();
    let tls = phalanx_pki::TlsDir::create(creds.path()).unwrap();
    tls.issue(&phalanx_pki::Role::Admin, &[]).unwrap();
    for args in [
        vec!["status"],
        vec!["job", "status"],
        vec!["worker", "drain", "w0"],
    ] {
        let mut c = phalanx();
        c.args(&args)
            .args(["--controllers", &addr])
            .arg("--tls-dir")
            .arg(creds.path());
        let t0 = Instant::now();
        let out = run_with_timeout(c, Duration::from_secs(30));
        let took = t0.elapsed();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr_of(&out));
        assert!(
            took < Duration::from_secs(2),
            "{args:?} took {took:?} to report an unreachable cluster"
        );
        let err = stderr_of(&out);
        assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
        assert!(out.stdout.is_empty(), "nothing on stdout");
    }
}

/// `phalanx ARGS --dir D`: (exit code, stdout, stderr).
fn ctl(c: &LocalCluster, args: &[&str]) -> (Option<i32>, String, String) {
    let out = c.ctl(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr_of(&out),
    )
}

fn health(c: &LocalCluster, id: &str) -> WorkerHealth {
    c.health(id)
        .unwrap_or_else(|| panic!("no worker {id} in status"))
}

#[test]
fn operator_verbs_are_honest_reversible_and_end_quietly_on_a_closed_pipe() {
    let c = LocalCluster::start(1, 0);

    // A lasting fault needs --for or --until-healed, and a duration needs a unit.
    let (code, out, err) = ctl(
        &c,
        &["fault", "inject", "--kind", "hang", "--target", "worker:w0"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty() && err.contains("--until-healed"), "{err}");
    let (code, _, err) = ctl(
        &c,
        &[
            "fault",
            "inject",
            "--kind",
            "hang",
            "--target",
            "worker:w0",
            "--for",
            "5",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no unit"), "{err}");

    // Drain, drain again (the same outcome), undrain.
    for _ in 0..2 {
        let (code, out, err) = ctl(&c, &["worker", "drain", "w0"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("draining"), "{out}");
    }
    assert_eq!(health(&c, "w0"), WorkerHealth::Draining);
    let (code, out, err) = ctl(
        &c,
        &["worker", "undrain", "w0", "--reason", "maintenance done"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("undrained"), "{out}");
    assert_ne!(health(&c, "w0"), WorkerHealth::Draining);
    let ev = c.events();
    assert!(
        ev.iter().any(
            |e| e.reason.contains("maintenance done") || e.subject.contains("maintenance done")
        ),
        "{ev:#?}"
    );
    // A rejected command: one error line on stderr, nothing on stdout, exit 1.
    let (code, out, err) = ctl(&c, &["worker", "undrain", "nobody"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unknown worker nobody"), "{err}");

    // A hang until healed, and its undo; a disk-full until healed, and its undo.
    let pid = c.pids(&["w0"])[0];
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('T')
            })
            .unwrap_or(false)
    };
    let (code, out, err) = ctl(
        &c,
        &[
            "fault",
            "inject",
            "--kind",
            "hang",
            "--target",
            "worker:w0",
            "--until-healed",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hang until healed"), "{out}");
    assert!(stopped(), "the hang stopped worker w0 (pid {pid})");
    let (code, _, err) = ctl(&c, &["fault", "heal", "--target", "worker:w0"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!stopped(), "fault heal resumed worker w0");
    let (code, _, err) = ctl(
        &c,
        &[
            "fault",
            "inject",
            "--kind",
            "disk-full",
            "--target",
            "worker:w0",
            "--until-healed",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = ctl(&c, &["fault", "heal", "--target", "worker:w0"]);
    assert_eq!(code, Some(0), "{err}");
    c.wait_for(Duration::from_secs(30), "w0 to log that it healed", |c| {
        std::fs::read_to_string(c.cluster_dir().join("w0.log"))
            .unwrap_or_default()
            .contains("healed: slow, disk-full and partition lifted")
    });

    // A corpus that does not exist is refused at submission...
    let job = c.dir.path().join("bad.toml");
    std::fs::write(
        &job,
        phalanx_tests::cluster::job_toml("bad", 10, 0, 1, 1).replace(
            "corpus = \"default\"",
            "corpus = \"/nonexistent/phalanx-corpus/*.txt\"",
        ),
    )
    .unwrap();
    let (code, _, err) = ctl(&c, &["job", "submit", job.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no file matches"), "{err}");
    // ...and, unchecked, the workers' start failures end the job `failed` with the reason.
    let (code, _, err) = ctl(
        &c,
        &["job", "submit", "--no-corpus-check", job.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{err}");
    c.wait_for(Duration::from_secs(60), "the job to fail", |c| {
        c.job().is_some_and(|j| j.state == JobState::Failed)
    });
    let j = c.job().unwrap();
    assert!(
        j.failure
            .as_deref()
            .is_some_and(|f| f.contains("/nonexistent/phalanx-corpus")),
        "{j:?}"
    );
    let (_, out, _) = ctl(&c, &["job", "status"]);
    assert!(
        out.contains("state: failed") && out.contains("failed: worker w0"),
        "{out}"
    );

    // Cancelling twice behaves the same both times.
    for _ in 0..2 {
        let (code, _, err) = ctl(&c, &["job", "cancel"]);
        assert_eq!(code, Some(0), "{err}");
    }

    // `| head -1` ends quietly: one line, no panic, no error.
    let sh = format!(
        "'{}' job status --dir '{}' | head -1",
        phalanx_bin().display(),
        c.cluster_dir().display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &sh]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(out.stderr.is_empty(), "{}", stderr_of(&out));
}

/// A slowdown factor out of range (or not a number) is refused before anything is
/// written to a worker's inbox, and the flag is named; so is a duration over a day.
#[test]
fn a_fault_out_of_range_is_refused_with_the_flag_named() {
    for (args, want) in [
        (
            vec!["--factor", "1e300", "--for", "5s"],
            "--factor: factor = 1e300",
        ),
        (
            vec!["--factor", "NaN", "--for", "5s"],
            "--factor: factor = NaN",
        ),
        (
            vec!["--factor", "1", "--for", "5s"],
            "--factor: factor = 1.0",
        ),
        (vec!["--for", "1441m"], "--for"),
    ] {
        let mut c = phalanx();
        c.args(["fault", "inject", "--kind", "slow", "--target", "worker:w0"])
            .args(&args);
        let out = run_with_timeout(c, Duration::from_secs(30));
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
