//! The ring of a `phalanx train` group is private and checked: `worker run --peers` with
//! `--ring-secret-file` forms a group only with ranks that hold the same secret (the
//! children of `phalanx train` get a fresh one from their parent on stdin), and the
//! gradient spot checks of `--grad-check-interval` run without changing a bit.
use std::path::Path;
use std::time::Duration;

use phalanx_tests::{free_port, phalanx, run_with_timeout, stderr_of, KillOnDrop};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(300);

/// Starts ranks 0 and 1 of a `--peers` group of the tiny model, rank r reading its ring
/// secret from `secrets[r]`; returns their exit and stderr.
fn manual_pair(dir: &Path, secrets: [&str; 2]) -> Vec<(bool, String)> {
    let peers = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let file = dir.join(format!("secret-{rank}"));
            std::fs::write(&file, secrets[rank]).unwrap();
            let mut c = phalanx();
            c.args(["worker", "run", "--world=2", "--model=tiny", "--steps=3"])
                .arg(format!("--rank={rank}"))
                .arg(format!("--peers={peers}"))
                .arg(format!("--ring-secret-file={}", file.display()))
                .arg("--rendezvous-timeout-ms=4000")
                .arg(format!(
                    "--summary={}",
                    dir.join(format!("s{rank}.json")).display()
                ))
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("rank{rank}.err"))).unwrap());
            KillOnDrop(c.spawn().unwrap())
        })
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(rank, mut c)| {
            let ok = c.wait_timeout(LIMIT).expect("a rank finishes").success();
            let err = std::fs::read_to_string(dir.join(format!("rank{rank}.err"))).unwrap();
            (ok, err)
        })
        .collect()
}

#[test]
fn ranks_with_the_same_ring_secret_form_a_group_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = "1f".repeat(32);
    let b = "2e".repeat(32);
    for (ok, err) in manual_pair(dir.path(), [&a, &a]) {
        assert!(ok, "same secret: {err}");
    }
    for (ok, err) in manual_pair(dir.path(), [&a, &b]) {
        assert!(!ok, "a rank with another secret must not join");
        assert!(err.contains("rendezvous"), "{err}");
        assert!(
            !err.contains(&a) && !err.contains(&b),
            "the secret leaked: {err}"
        );
    }
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "not hex").unwrap();
    let mut c = phalanx();
    c.args(["worker", "run", "--rank=0", "--world=2", "--steps=2"])
        .arg(format!(
            "--peers=127.0.0.1:{},127.0.0.1:{}",
            free_port(),
            free_port()
        ))
        .arg(format!("--ring-secret-file={}", bad.display()));
    let out = run_with_timeout(c, LIMIT);
    assert!(!out.status.success());
    let e = stderr_of(&out);
    assert!(
        e.contains("--ring-secret-file") && e.contains("64 hex digits"),
        "{e}"
    );
}

fn train(dir: &Path, interval: u64) -> Value {
    let summary = dir.join(format!("train-{interval}.json"));
    let mut c = phalanx();
    c.args([
        "train",
        "--plain",
        "--model=tiny",
        "--steps=12",
        "--workers=2",
    ])
    .arg(format!("--grad-check-interval={interval}"))
    .arg(format!("--summary={}", summary.display()));
    let out = run_with_timeout(c, LIMIT);
    assert!(out.status.success(), "{}", stderr_of(&out));
    serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap()
}

#[test]
fn gradient_spot_checks_run_and_change_no_bits() {
    let dir = tempfile::tempdir().unwrap();
    let off = train(dir.path(), 0);
    let every = train(dir.path(), 1);
    let fourth = train(dir.path(), 4);
    assert_eq!(off["grad_checks"], 0);
    assert_eq!(every["grad_checks"], 12, "one per step: {every}");
    assert_eq!(fourth["grad_checks"], 3, "steps 0, 4 and 8: {fourth}");
    for r in [&every, &fourth] {
        assert_eq!(r["steps_redone"], 0);
        assert_eq!(r["params_sha256"], off["params_sha256"]);
    }
}
