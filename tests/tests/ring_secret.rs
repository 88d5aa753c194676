//! Each plan epoch's collective secret (issue 11): the controller gives it to the epoch's
//! ranks only, the ring forms and trains with it, and it shows nowhere else (status, the
//! job, events, the controllers' and workers' logs).
use std::time::{Duration, Instant};

use phalanx_controller::client::{Client, Credentials};
use phalanx_pki::{Role, TlsDir};
use phalanx_proto::Assignment;
use phalanx_tests::cluster::{job_toml, LocalCluster};

#[test]
fn the_epoch_secret_goes_to_the_ranks_only_and_shows_nowhere_else() {
    // Three workers, a job of two ranks: one worker is a spare.
    let c = LocalCluster::start(3, 0);
    c.submit(&job_toml("secret", 400, 100, 2, 2));
    // Steps only happen once the ring formed, and it forms only with the secret.
    c.wait_step(2, Duration::from_secs(180));

    let tls = TlsDir::open(&c.cluster_dir().join("tls")).unwrap();
    let status = c.status().expect("status");
    let addrs: Vec<String> = status.members.iter().map(|m| m.address.clone()).collect();
    // Each worker reads its own assignment, with its own certificate (another worker's
    // is refused: crates/controller/tests/security.rs).
    let as_worker = |w: &str| {
        Client::new(
            addrs.clone(),
            Credentials::role(&tls, &Role::Worker(w.into())).unwrap(),
        )
        .unwrap()
    };
    let client = Client::new(
        addrs.clone(),
        Credentials::role(&tls, &Role::Admin).unwrap(),
    )
    .unwrap();

    // The three assignments of one epoch (a new plan between two reads: read again).
    let deadline = Instant::now() + Duration::from_secs(60);
    let assignments = loop {
        let all: Vec<Assignment> = ["w0", "w1", "w2"]
            .iter()
            .map(|w| as_worker(w).get(&format!("/v1/assignment/{w}")).unwrap())
            .collect();
        if all.iter().all(|a| a.epoch == all[0].epoch) {
            break all;
        }
        assert!(Instant::now() < deadline, "no stable plan epoch: {all:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (ranks, spares): (Vec<&Assignment>, Vec<&Assignment>) =
        assignments.iter().partition(|a| a.rank.is_some());
    assert_eq!((ranks.len(), spares.len()), (2, 1), "{assignments:?}");
    assert!(spares[0].epoch_secret.is_none(), "a spare got the secret");
    let secret = ranks[0]
        .epoch_secret
        .clone()
        .expect("a rank without a secret")
        .0;
    assert!(
        secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "not 64 hex digits"
    );
    assert_eq!(ranks[1].epoch_secret.as_ref().map(|s| &s.0), Some(&secret));
    for a in &ranks {
        assert_eq!(a.rank_workers.len(), 2);
        assert_eq!(a.rank_workers[a.rank.unwrap() as usize], a.worker);
    }

    // The answers as text, every field of them (not only those a type knows).
    let job: serde_json::Value = client.get("/v1/job").unwrap();
    let places = [
        ("status", c.ctl_ok(&["status", "--json"])),
        ("the job", job.to_string()),
        ("events", c.ctl_ok(&["events", "--json"])),
        ("logs", c.logs()),
    ];
    for (what, text) in places {
        assert!(!text.contains(&secret), "the epoch secret shows in {what}");
    }
}
