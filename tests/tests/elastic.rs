//! Fault-tolerant elastic training, end to end: 3 controllers, 4 workers and a spare, the
//! tiny model. Every scenario checks that the job completes with parameters bit-identical
//! to the fault-free `phalanx train` run.
use std::time::Duration;

use phalanx_tests::cluster::{job_toml, reference_sha, LocalCluster};

const STEPS: u64 = 150;
const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn killing_a_worker_swaps_in_the_spare_and_training_ends_bit_identical() {
    let c = LocalCluster::start(5);
    let reference = reference_sha(STEPS, c.dir.path());
    c.submit(&job_toml("kill", STEPS, 25, 3, 4));
    c.wait_step(30, LIMIT);
    c.signal("w1", "KILL");
    let job = c.wait_done(LIMIT);
    assert_eq!(job["params_sha256"].as_str().unwrap(), reference, "{}", c.logs());
    let plan = &job["plan"];
    assert!(plan["epoch"].as_u64().unwrap() >= 2, "{plan}");
    let ranks: Vec<&str> = plan["ranks"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(!ranks.contains(&"w1") && ranks.contains(&"w4") && ranks.len() == 4, "{ranks:?}");
}

#[test]
fn without_a_spare_the_world_shrinks_then_grows_back() {
    let mut c = LocalCluster::start(4);
    let reference = reference_sha(STEPS, c.dir.path());
    c.submit(&job_toml("shrink", STEPS, 25, 2, 4));
    c.wait_step(30, LIMIT);
    c.signal("w2", "KILL");
    c.wait_for(LIMIT, "a plan of 3 ranks", |c| {
        c.job().map(|j| j["plan"]["ranks"].as_array().map(|r| r.len()) == Some(3)).unwrap_or(false)
    });
    let at = c.job().unwrap()["progress_step"].as_u64().unwrap();
    c.wait_step(at + 10, LIMIT);
    c.start_worker("w5");
    c.wait_for(LIMIT, "a plan of 4 ranks again", |c| {
        c.job().map(|j| j["plan"]["ranks"].as_array().map(|r| r.len()) == Some(4) || j["state"] == "completed").unwrap_or(false)
    });
    let job = c.wait_done(LIMIT);
    assert_eq!(job["params_sha256"].as_str().unwrap(), reference, "{}", c.logs());
}
