//! A local cluster for end-to-end tests: controllers and worker agents started by
//! `phalanx cluster up` (the operator's own way to start one, with its credentials and
//! directories), all real processes on 127.0.0.1. Dropping it runs `phalanx cluster down`
//! and kills `cluster up`, whether the test passed or failed. What the cluster answers is
//! read into the `phalanx_proto` types.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use phalanx_proto::{
    CheckpointInfo, ClusterStatus, Event, JobInfo, JobState, Recovery, WorkerHealth,
};

use crate::{phalanx, run_with_timeout, KillOnDrop};

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    _up: KillOnDrop,
    /// One local cluster at a time: eight processes per cluster already keep two cores
    /// busy, and two clusters side by side starve the controllers' 100 ms election
    /// timers and the workers' step-time measurements. Declared last, so it is released
    /// after the processes are gone.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A tiny-model job: `steps` steps, global batch 8 (4 micro-batches of 2), seed 7.
pub fn job_toml(
    name: &str,
    steps: u64,
    checkpoint_interval: u64,
    world_min: u32,
    world_max: u32,
) -> String {
    job_toml_seed(name, steps, checkpoint_interval, world_min, world_max, 7)
}

/// [`job_toml`] with another seed.
pub fn job_toml_seed(
    name: &str,
    steps: u64,
    checkpoint_interval: u64,
    world_min: u32,
    world_max: u32,
    seed: u64,
) -> String {
    format!(
        "name = \"{name}\"\nmodel = \"tiny\"\ncorpus = \"default\"\nsteps = {steps}\nglobal_batch = 8\nseed = {seed}\n\
         checkpoint_interval_steps = {checkpoint_interval}\nworld_size_min = {world_min}\nworld_size_max = {world_max}\n"
    )
}

impl LocalCluster {
    /// `phalanx cluster up --controllers 3 --workers N` (fault hooks on); exited workers
    /// are restarted after `worker_restart_s` seconds when it is not 0.
    pub fn start(workers: usize, worker_restart_s: u64) -> Self {
        Self::start_with(3, workers, worker_restart_s)
    }

    /// [`Self::start`] with `controllers` controllers. Returns once a leader is known,
    /// every controller is a member and every worker has registered.
    pub fn start_with(controllers: usize, workers: usize, worker_restart_s: u64) -> Self {
        // A test that panicked poisons the lock; the next cluster does not care.
        let serial = ONE_CLUSTER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let mut up = phalanx();
        up.args(["cluster", "up"])
            .arg(format!("--controllers={controllers}"))
            .arg(format!("--workers={workers}"))
            .arg(format!("--worker-restart={worker_restart_s}s"))
            .arg(format!("--dir={}", dir.path().join("c").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("cluster-up.log")).unwrap());
        let up = KillOnDrop(up.spawn().expect("spawn cluster up"));
        let c = Self {
            dir,
            _up: up,
            _serial: serial,
        };
        c.wait_for(Duration::from_secs(30), "a controller leader", |c| {
            c.status()
                .is_some_and(|s| s.leader_id != 0 && s.members.len() == controllers)
        });
        c.wait_for(Duration::from_secs(60), "every worker to register", |c| {
            c.status().is_some_and(|s| s.workers.len() == workers)
        });
        c
    }

    /// `phalanx fault inject --target TARGET --kind KIND [extra...]`.
    pub fn inject(&self, target: &str, kind: &str, extra: &[&str]) {
        let mut args = vec!["fault", "inject", "--kind", kind];
        if !target.is_empty() {
            args.extend(["--target", target]);
        }
        args.extend(extra);
        self.ctl_ok(&args);
    }

    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.path().join("c")
    }

    /// `phalanx ARGS --dir <cluster dir>`, within 60 s.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut c = phalanx();
        c.args(args)
            .arg(format!("--dir={}", self.cluster_dir().display()));
        run_with_timeout(c, Duration::from_secs(60))
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "phalanx {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `phalanx status --json`; `None` when it fails.
    pub fn status(&self) -> Option<ClusterStatus> {
        let out = self.ctl(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    pub fn submit(&self, toml: &str) {
        let f = self.dir.path().join("job.toml");
        std::fs::write(&f, toml).unwrap();
        self.ctl_ok(&["job", "submit", f.to_str().unwrap()]);
    }

    /// The cluster's job, if it has one.
    pub fn job(&self) -> Option<JobInfo> {
        self.status().and_then(|s| s.job)
    }

    pub fn wait_for(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if f(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\n{}",
            self.logs()
        );
    }

    pub fn wait_step(&self, step: u64, timeout: Duration) {
        self.wait_for(
            timeout,
            &format!("job progress to reach step {step}"),
            |c| c.job().is_some_and(|j| j.progress_step >= step),
        );
    }

    /// Waits for the job to complete with a result; returns the job.
    pub fn wait_done(&self, timeout: Duration) -> JobInfo {
        self.wait_job_done(timeout, "the job to complete", |_| true)
    }

    /// [`Self::wait_done`] for a job whose id is not `old_id` (the next job).
    pub fn wait_for_job_done_other_than(&self, old_id: &str, timeout: Duration) -> JobInfo {
        self.wait_job_done(timeout, "the next job to complete", |j| j.id != old_id)
    }

    fn wait_job_done(
        &self,
        timeout: Duration,
        what: &str,
        which: impl Fn(&JobInfo) -> bool,
    ) -> JobInfo {
        let mut last = None;
        self.wait_for(timeout, what, |c| {
            last = c.job().filter(|j| {
                which(j) && j.state == JobState::Completed && j.params_sha256.is_some()
            });
            last.is_some()
        });
        last.expect("the job the wait ended on")
    }

    /// Worker `id`'s health, if the cluster knows the worker.
    pub fn health(&self, id: &str) -> Option<WorkerHealth> {
        self.status()?
            .workers
            .into_iter()
            .find(|w| w.id == id)
            .map(|w| w.health)
    }

    /// `phalanx events --json`.
    pub fn events(&self) -> Vec<Event> {
        // The whole history (the controller keeps the last 1,000), not the CLI's last 50.
        serde_json::from_str(&self.ctl_ok(&["events", "--json", "--limit=1000"])).unwrap()
    }

    /// Every worker's and controller's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let dirs = [self.dir.path().to_path_buf(), self.cluster_dir()];
        for e in dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        {
            let p = e.path();
            if p.extension().map(|x| x == "log").unwrap_or(false) {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                s += &format!(
                    "--- {} (last lines)\n{}\n",
                    p.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        s
    }

    /// The pid `cluster.json` records for each of `ids` (a worker's or a controller's,
    /// `w0` or `1`).
    pub fn pids(&self, ids: &[&str]) -> Vec<u32> {
        let text = std::fs::read_to_string(self.cluster_dir().join("cluster.json")).unwrap();
        let file: ClusterFile = serde_json::from_str(&text).unwrap();
        ids.iter()
            .map(|id| {
                file.workers
                    .iter()
                    .find(|w| w.id == *id)
                    .map(|w| w.pid)
                    .or_else(|| {
                        file.controllers
                            .iter()
                            .find(|c| c.id.to_string() == *id)
                            .map(|c| c.pid)
                    })
                    .unwrap_or_else(|| panic!("no process {id} in cluster.json"))
            })
            .collect()
    }

    /// SIGKILLs the given workers in one `kill` call (at once, not one CLI call each).
    pub fn kill_workers_at_once(&self, ids: &[&str]) {
        let pids: Vec<String> = self.pids(ids).iter().map(|p| p.to_string()).collect();
        let st = std::process::Command::new("kill")
            .arg("-9")
            .args(&pids)
            .status()
            .unwrap();
        assert!(st.success(), "kill -9 {pids:?}");
    }

    /// The steps of the current job's durable checkpoints in the controller's catalog.
    pub fn committed_checkpoints(&self) -> Vec<u64> {
        let Some(id) = self.job().map(|j| j.id) else {
            return Vec::new();
        };
        let out = self.ctl(&["checkpoint", "list", "--json"]);
        let cps: Vec<CheckpointInfo> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        cps.into_iter()
            .filter(|c| c.job == id && c.durable)
            .map(|c| c.step)
            .collect()
    }

    /// `phalanx cluster down` now (the harness runs it again when dropped).
    pub fn down(&self) -> std::process::Output {
        let mut c = phalanx();
        c.args(["cluster", "down"])
            .arg(format!("--dir={}", self.cluster_dir().display()));
        run_with_timeout(c, Duration::from_secs(30))
    }

    /// Whether `cluster up` exited within `timeout`.
    pub fn wait_up_exited(&mut self, timeout: Duration) -> bool {
        self._up.wait_timeout(timeout).is_some()
    }

    pub fn checkpoint_root(&self) -> PathBuf {
        self.cluster_dir().join("checkpoints")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Bounded: a wedged `cluster down` must not hang the test; `_up` is killed after.
        let mut c = phalanx();
        c.args(["cluster", "down"])
            .arg(format!("--dir={}", self.cluster_dir().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(child) = c.spawn() {
            let _ = KillOnDrop(child).wait_timeout(Duration::from_secs(30));
        }
    }
}

/// The parts of `cluster.json` (written by `cluster up`) that tests read.
#[derive(serde::Deserialize)]
struct ClusterFile {
    controllers: Vec<ProcEntry<u64>>,
    workers: Vec<ProcEntry<String>>,
}

#[derive(serde::Deserialize)]
struct ProcEntry<Id> {
    id: Id,
    pid: u32,
}

/// Asserts that one of the job's recoveries restored a checkpoint.
pub fn assert_recovered_from_checkpoint(job: &JobInfo) {
    let recs: &[Recovery] = &job.recoveries;
    assert!(
        recs.iter().any(|r| r.source.starts_with("checkpoint step")),
        "no recovery from a checkpoint: {recs:?}"
    );
}

/// `phalanx train` of the same math as [`job_toml`], the fault-free reference.
pub fn reference_sha(steps: u64, dir: &Path) -> String {
    reference_sha_seed(steps, 7, dir)
}

/// [`reference_sha`] of [`job_toml_seed`].
pub fn reference_sha_seed(steps: u64, seed: u64, dir: &Path) -> String {
    let summary = dir.join(format!("reference-{steps}-{seed}.json"));
    let mut c = phalanx();
    c.args([
        "train",
        "--plain",
        "--workers=2",
        "--model=tiny",
        "--global-batch=8",
    ])
    .arg(format!("--seed={seed}"))
    .arg(format!("--steps={steps}"))
    .arg(format!("--summary={}", summary.display()));
    let out = run_with_timeout(c, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
    v["params_sha256"].as_str().unwrap().to_string()
}
