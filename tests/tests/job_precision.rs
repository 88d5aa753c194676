//! A job file's `precision` reaches every worker of a cluster, and the running job reports
//! its throughput and MFU in `job status`.
use std::time::Duration;

use phalanx_proto::Precision;
use phalanx_tests::cluster::{job_toml, LocalCluster};
use serde_json::Value;

const STEPS: u64 = 40;
const LIMIT: Duration = Duration::from_secs(240);

/// `phalanx train --workers 1` of the job's math in `precision`: its params_sha256.
fn reference(precision: &str, dir: &std::path::Path) -> String {
    let summary = dir.join(format!("reference-{precision}.json"));
    let mut c = phalanx_tests::phalanx();
    c.args([
        "train",
        "--plain",
        "--workers=1",
        "--model=tiny",
        "--global-batch=8",
    ])
    .args(["--seed=7", &format!("--steps={STEPS}")])
    .arg(format!("--precision={precision}"))
    .arg(format!("--summary={}", summary.display()));
    let out = phalanx_tests::run_with_timeout(c, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "reference run failed: {}",
        phalanx_tests::stderr_of(&out)
    );
    let v: Value = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
    v["params_sha256"].as_str().unwrap().to_string()
}

/// Two bf16 jobs of the same file but for their world size, one after the other on one
/// cluster: a single worker, then two. Both end with the bits of a bf16 `phalanx train`
/// (which differ from fp32's), and `job status` shows the precision, the throughput and
/// the MFU that rank 0 reported (`--json` too).
#[test]
fn a_bf16_job_has_the_same_bits_on_one_and_two_workers_and_job_status_shows_its_mfu() {
    let dir = tempfile::tempdir().unwrap();
    let bf16 = reference("bf16", dir.path());
    assert_ne!(
        bf16,
        reference("fp32", dir.path()),
        "bf16 computes other bits"
    );
    let c = LocalCluster::start(2, 0);
    let job = |world: u32| {
        format!(
            "{}precision = \"bf16\"\n",
            job_toml("half", STEPS, 0, world, world)
        )
    };

    c.submit(&job(1));
    let one = c.wait_done(LIMIT);
    assert_eq!(one.spec.precision, Precision::Bf16, "{one:?}");
    assert_eq!(
        one.params_sha256.as_deref().unwrap(),
        bf16,
        "world 1\n{}",
        c.logs()
    );
    assert_eq!(
        one.throughput.as_ref().map(|t| t.devices),
        Some(1),
        "{one:?}"
    );

    c.submit(&job(2));
    let two = c.wait_for_job_done_other_than(&one.id, LIMIT);
    assert_eq!(
        two.params_sha256.as_deref().unwrap(),
        bf16,
        "world 2\n{}",
        c.logs()
    );
    let t = two
        .throughput
        .as_ref()
        .unwrap_or_else(|| panic!("no throughput: {two:?}"));
    assert_eq!(t.devices, 2, "{two:?}");
    assert!(t.tokens_per_s > 0, "{t:?}");
    assert!(t.mfu_ppm > 0, "{t:?}");
    assert!(t.peak_mflops_per_device > 0, "{t:?}");
    assert!(t.step <= STEPS, "{t:?}");

    let human = c.ctl_ok(&["job", "status"]);
    assert!(human.contains("model: tiny (bf16)"), "{human}");
    let line = human
        .lines()
        .find(|l| l.starts_with("throughput: "))
        .unwrap_or_else(|| panic!("no throughput line: {human}"));
    assert!(
        line.contains(" tokens/s, ") && line.contains("; MFU "),
        "{line}"
    );
    assert!(line.contains(" of 2 × "), "{line}");
}
