//! Jobs in a row on one cluster: each has its own checkpoints and its own result.
use std::time::Duration;

use phalanx_proto::JobState;
use phalanx_tests::cluster::{
    assert_recovered_from_checkpoint, job_toml_seed, reference_sha_seed, LocalCluster,
};

/// The first job's steps; the second runs longer, so that the kill after its first
/// checkpoint lands mid-run even on a loaded machine.
const STEPS: u64 = 60;
const SECOND_STEPS: u64 = 300;
const LIMIT: Duration = Duration::from_secs(240);

/// The same job file name twice (seeds 7 then 8), the second one with every worker killed
/// and restarted mid-run: before checkpoints belonged to a job, the second resumed from
/// the first one's newest checkpoint (it has the same model) and finished with its
/// parameters.
#[test]
fn two_jobs_in_a_row_are_each_bit_identical_to_their_own_reference() {
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<String> = [(STEPS, 7), (SECOND_STEPS, 8)]
        .iter()
        .map(|&(steps, seed)| reference_sha_seed(steps, seed, dir.path()))
        .collect();
    assert_ne!(refs[0], refs[1]);
    let c = LocalCluster::start(4, 2);

    c.submit(&job_toml_seed("twice", STEPS, 20, 4, 4, 7));
    let first = c.wait_done(LIMIT);
    assert_eq!(
        first.params_sha256.as_deref().unwrap(),
        refs[0],
        "{}",
        c.logs()
    );
    // The final step is always checkpointed before the job completes.
    assert!(c.committed_checkpoints().contains(&STEPS), "{first:?}");
    let first_id = first.id.clone();

    c.submit(&job_toml_seed("twice", SECOND_STEPS, 10, 4, 4, 8));
    c.wait_for(LIMIT, "the second job's first checkpoint", |c| {
        // (No answer this time, e.g. during an election: ask again.)
        let Some(job) = c.job() else { return false };
        job.id != first_id && !c.committed_checkpoints().is_empty()
    });
    c.kill_workers_at_once(&["w0", "w1", "w2", "w3"]);
    let at_kill = c.job().unwrap();
    assert!(
        at_kill.state != JobState::Completed,
        "the second job ended before the kill: {at_kill:?}"
    );
    let second = c.wait_for_job_done_other_than(&first_id, LIMIT);
    assert_eq!(
        second.params_sha256.as_deref().unwrap(),
        refs[1],
        "the second job is not its own\n{}",
        c.logs()
    );
    assert_recovered_from_checkpoint(&second);
    // The second job's model can be taken home and used.
    let model = c.dir.path().join("second.safetensors");
    c.ctl_ok(&["job", "export", "--out", model.to_str().unwrap()]);
    let mut sample = phalanx_tests::phalanx();
    sample.args(["sample", "--prompt", "The ", "--tokens", "40", "--weights"]);
    sample.arg(&model);
    let out = phalanx_tests::run_with_timeout(sample, Duration::from_secs(120));
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "sample failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each job's files in its own directory.
    let root = c.checkpoint_root();
    for id in [&first_id, &second.id] {
        assert!(root.join(id).is_dir(), "no {}", root.join(id).display());
    }
}
