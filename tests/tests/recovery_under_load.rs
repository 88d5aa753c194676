//! Recovery converges on a loaded machine: two busy threads compete with the cluster's
//! eight or nine processes for the cores while workers are killed, hung, killed several
//! at once, or all killed and restarted. Each job must complete, bit-identical to its own
//! fault-free reference, within a bound: before the rendezvous was fixed, the ranks of one
//! epoch formed and broke their group every 2–3 s for minutes in these cases.
//!
//! `just test` runs each case with one seed; `just chaos-soak` sets
//! `PHALANX_SOAK_SEEDS=7,8,9,10,11` to repeat them over several.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use phalanx_proto::{EventKind, JobInfo, JobState};
use phalanx_tests::cluster::{
    assert_recovered_from_checkpoint, job_toml_seed, reference_sha_seed, LocalCluster,
};
use phalanx_tests::BusyThreads;

const STEPS: u64 = 200;
const LIMIT: Duration = Duration::from_secs(300);

fn seeds() -> Vec<u64> {
    match std::env::var("PHALANX_SOAK_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("PHALANX_SOAK_SEEDS: `{x}` is not a seed"))
            })
            .collect(),
        Err(_) => vec![7],
    }
}

fn reference(seed: u64) -> String {
    static R: Mutex<Option<HashMap<u64, String>>> = Mutex::new(None);
    let mut r = R.lock().unwrap_or_else(|p| p.into_inner());
    r.get_or_insert_with(HashMap::new)
        .entry(seed)
        .or_insert_with(|| reference_sha_seed(STEPS, seed, tempfile::tempdir().unwrap().path()))
        .clone()
}

/// Runs a job of `seed` on a cluster of `workers` (restarted after `restart_s` when not 0)
/// with two busy threads beside it; `faults` acts once the job is past step 30.
fn under_load(
    name: &str,
    seed: u64,
    workers: usize,
    restart_s: u64,
    world_min: u32,
    faults: impl FnOnce(&LocalCluster),
) -> (LocalCluster, JobInfo) {
    let want = reference(seed);
    let c = LocalCluster::start(workers, restart_s);
    let busy = BusyThreads::start(2);
    c.submit(&job_toml_seed(
        &format!("{name}-{seed}"),
        STEPS,
        20,
        world_min,
        4,
        seed,
    ));
    c.wait_step(30, LIMIT);
    faults(&c);
    let job = c.wait_done(LIMIT);
    drop(busy);
    assert_eq!(
        job.params_sha256.as_deref().unwrap(),
        want,
        "{name} seed {seed}: not bit-identical to its reference\n{}",
        c.logs()
    );
    (c, job)
}

fn waits_for_a_checkpoint(c: &LocalCluster) {
    c.wait_for(LIMIT, "a committed checkpoint", |c| {
        !c.committed_checkpoints().is_empty()
    });
}

/// No faults, two busy threads: not one suspect or failed decision (a silence report
/// needs the named worker's heartbeats to have stopped, or its step to stand still, before
/// anything is decided). `just soak-recovery` runs it for 20 minutes
/// (`PHALANX_SOAK_NO_FAULT_S=1200`: a job too long to finish, judged after that long;
/// `PHALANX_SOAK_NO_FAULT_STEPS` sets a step count instead).
#[test]
fn no_faults_under_cpu_contention_mean_no_suspect_or_failed_decisions() {
    let secs: Option<u64> = std::env::var("PHALANX_SOAK_NO_FAULT_S")
        .ok()
        .and_then(|s| s.parse().ok());
    let steps: u64 = match secs {
        Some(_) => 10_000_000,
        None => std::env::var("PHALANX_SOAK_NO_FAULT_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(STEPS),
    };
    let c = LocalCluster::start(5, 0);
    let busy = BusyThreads::start(2);
    c.submit(&job_toml_seed("no-faults", steps, 50, 3, 4, 7));
    let t0 = std::time::Instant::now();
    match secs {
        Some(s) => {
            let until = Duration::from_secs(s);
            c.wait_for(until + LIMIT, "the soak's length to pass", |c| {
                t0.elapsed() >= until && c.job().is_some()
            });
        }
        None => {
            c.wait_done(LIMIT.max(Duration::from_secs(steps / 5)));
        }
    }
    drop(busy);
    let job = c.job().unwrap();
    let events = c.events();
    let line = |e: &phalanx_proto::Event| format!("{} {} {}", e.kind, e.subject, e.reason);
    let of_kind = |e: &&phalanx_proto::Event, kinds: &[EventKind]| kinds.contains(&e.kind);
    let spurious: Vec<String> = events
        .iter()
        .filter(|e| of_kind(e, &[EventKind::WorkerSuspect, EventKind::WorkerFailed]))
        .map(line)
        .collect();
    let replans: Vec<String> = events
        .iter()
        .filter(|e| of_kind(e, &[EventKind::Plan]))
        .map(line)
        .collect();
    eprintln!(
        "no-fault soak: {:.0} s beside 2 busy threads, step {} of the job, plan epoch {}, {} events, {} suspect or failed decisions; plans: {replans:#?}",
        t0.elapsed().as_secs_f64(),
        job.progress_step,
        job.plan.as_ref().map_or(0, |p| p.epoch),
        events.len(),
        spurious.len()
    );
    assert!(spurious.is_empty(), "{spurious:#?}\n{}", c.logs());
    if secs.is_none() {
        assert_eq!(job.state, JobState::Completed, "{job:?}");
    }
}

#[test]
fn a_kill_then_a_hang_under_cpu_contention_converge() {
    for seed in seeds() {
        let (_c, job) = under_load("kill-hang", seed, 5, 0, 3, |c| {
            c.inject("rank:1", "kill", &[]);
            c.wait_step(80, LIMIT);
            c.inject("rank:2", "hang", &["--for", "8s"]);
        });
        assert!(job.recoveries.len() >= 2, "{job:?}");
    }
}

#[test]
fn three_ranks_killed_at_once_under_cpu_contention_converge() {
    for seed in seeds() {
        // Four ranks and two spares; three ranks die in one instant, so the lone survivor's
        // shards cannot cover the model and the new group restores a checkpoint.
        let (_c, job) = under_load("three-killed", seed, 6, 0, 3, |c| {
            waits_for_a_checkpoint(c);
            let ranks: Vec<String> = c.job().unwrap().plan.unwrap().ranks;
            let victims: Vec<&str> = ranks[1..].iter().map(String::as_str).collect();
            c.kill_workers_at_once(&victims);
        });
        assert_recovered_from_checkpoint(&job);
    }
}

#[test]
fn every_worker_killed_and_restarted_under_cpu_contention_converges() {
    for seed in seeds() {
        let (_c, job) = under_load("all-killed", seed, 4, 2, 4, |c| {
            waits_for_a_checkpoint(c);
            c.kill_workers_at_once(&["w0", "w1", "w2", "w3"]);
        });
        assert_recovered_from_checkpoint(&job);
    }
}
