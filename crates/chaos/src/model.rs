//! The scenario file's types: what `serde` reads from TOML and what `schemars` describes
//! in `scenarios/scenario.schema.json`. Field names carry their units (`_s`, `_steps`).
//!
//! A file is read in two stages: `serde` (unknown keys, wrong types and unknown kinds or
//! targets are errors at their line and column), then [`crate::validate`], which checks
//! what the types cannot say (a target that does not exist, a trigger after the last step,
//! contradictory expectations) and resolves each fault's trigger into a [`Trigger`].

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A chaos scenario: a cluster, a job, a timeline of faults and the outcomes expected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (letters, digits, `-`, `_`); the job is submitted under it.
    pub name: String,
    /// What the scenario proves, in one line (`phalanx scenario list` shows it).
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub cluster: ClusterSpec,
    pub job: JobSpec,
    /// The timeline of faults.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Faults drawn at random from the seed (soak runs).
    #[serde(default)]
    pub swarm: Option<SwarmSpec>,
    #[serde(default)]
    pub expect: Expect,
}

/// The local cluster the runner brings up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Raft controllers (1..=7; 3 or 5 tolerate 1 or 2 failures).
    #[serde(default = "d_controllers")]
    pub controllers: u32,
    /// Worker agents the job may use (one emulated GPU each): `w0`, `w1`, ...
    #[serde(default = "d_workers")]
    pub workers: u32,
    /// Extra workers beyond the job's maximum world size; they wait as spares (their ids
    /// follow the workers').
    #[serde(default)]
    pub spares: u32,
    /// Device of every worker, as `phalanx worker start --device` takes it.
    #[serde(default = "d_device")]
    pub device: String,
    /// Hosts to spread the processes over. With more hosts than controllers, controller
    /// `i` runs on host `i-1` and the workers round-robin on the hosts after them (so a
    /// controller's link can be cut alone); otherwise everything goes round-robin,
    /// controllers first. With 2 or more hosts, and where the runner is root, each host
    /// is a network namespace and `link-down` / `partition` cut real links.
    #[serde(default = "d_hosts")]
    pub hosts: u32,
    /// Restart a worker that exited after this many seconds (0: never), as a node
    /// supervisor would.
    #[serde(default)]
    pub worker_restart_s: f64,
}

fn d_controllers() -> u32 {
    3
}
fn d_workers() -> u32 {
    4
}
fn d_device() -> String {
    "emulated:H100-SXM-80GB".into()
}
fn d_hosts() -> u32 {
    1
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            controllers: d_controllers(),
            workers: d_workers(),
            spares: 0,
            device: d_device(),
            hosts: d_hosts(),
            worker_restart_s: 0.0,
        }
    }
}

impl ClusterSpec {
    /// Every worker process: the job's workers and the spares.
    pub fn worker_count(&self) -> u32 {
        self.workers + self.spares
    }
    pub fn worker_ids(&self) -> Vec<String> {
        (0..self.worker_count()).map(|i| format!("w{i}")).collect()
    }
    /// The host of controller `id` (1-based).
    pub fn controller_host(&self, id: u64) -> u32 {
        (id.saturating_sub(1) % self.hosts.max(1) as u64) as u32
    }
    /// The host of worker `w{i}`.
    pub fn worker_host(&self, i: u32) -> u32 {
        let hosts = self.hosts.max(1);
        if hosts > self.controllers {
            self.controllers + i % (hosts - self.controllers)
        } else {
            (self.controllers + i) % hosts
        }
    }
}

/// The model configurations: the protocol's, so a scenario names only what the data
/// plane has.
pub use phalanx_proto::ModelPreset as Model;

/// The training job submitted to the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default = "d_model")]
    pub model: Model,
    /// Optimizer steps (1..=100000).
    pub steps: u64,
    /// Sequences per step: a multiple of 2 (the micro-batch) and at least 2 per rank.
    #[serde(default = "d_global_batch")]
    pub global_batch: u32,
    /// The job's seed; `phalanx scenario run --seed N` overrides it (and seeds the swarm
    /// and `random-worker` targets).
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Checkpoint every this many steps (0: only the final step).
    #[serde(default = "d_ckpt")]
    pub checkpoint_interval_steps: u64,
    /// Smallest world the job trains with (default 1).
    #[serde(default)]
    pub world_size_min: Option<u32>,
    /// Largest world (default: `cluster.workers`).
    #[serde(default)]
    pub world_size_max: Option<u32>,
}

fn d_model() -> Model {
    Model::Tiny
}
fn d_global_batch() -> u32 {
    8
}
fn d_seed() -> u64 {
    7
}
fn d_ckpt() -> u64 {
    25
}

impl JobSpec {
    pub fn world_size_max(&self, cluster: &ClusterSpec) -> u32 {
        self.world_size_max.unwrap_or(cluster.workers)
    }
    pub fn world_size_min(&self) -> u32 {
        self.world_size_min.unwrap_or(1)
    }
}

/// What a fault does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the process (a dead GPU or host).
    Kill,
    /// SIGSTOP a worker, SIGCONT after `duration_s` (a hung GPU): heartbeats stop.
    Hang,
    /// Slow a worker's steps by `factor` for `duration_s` (a thermal straggler).
    Slow,
    /// The worker exits non-zero at its next step (a software bug).
    Crash,
    /// The device reports an uncorrectable memory error.
    Ecc,
    /// Flip a bit in one replica's parameters (silent data corruption).
    Sdc,
    /// Flip a bit in one rank's gradient before the reduction.
    SdcGrad,
    /// Checkpoint writes fail with "disk full" for `duration_s`.
    DiskFull,
    /// Flip bytes in the newest committed checkpoint.
    CorruptCheckpoint,
    /// Cut a worker off from controllers and peers for `duration_s`: a real cut of its
    /// host's links when hosts are namespaces, else emulated inside the worker.
    Partition,
    /// `threads` busy threads for `duration_s` (a noisy neighbour).
    CpuHog,
    /// SIGSTOP a controller, SIGCONT after `duration_s` (the stale-leader trap).
    ControllerPause,
    /// Cut every link of a host to the other hosts for `duration_s` (needs `hosts >= 2`).
    LinkDown,
    /// A planned drain: the worker leaves gracefully (host maintenance).
    Drain,
    /// Kill every process of the cluster, then start it all again from its directories
    /// (the job resumes from its newest checkpoint).
    ClusterRestart,
}

impl FaultKind {
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Kill,
        FaultKind::Hang,
        FaultKind::Slow,
        FaultKind::Crash,
        FaultKind::Ecc,
        FaultKind::Sdc,
        FaultKind::SdcGrad,
        FaultKind::DiskFull,
        FaultKind::CorruptCheckpoint,
        FaultKind::Partition,
        FaultKind::CpuHog,
        FaultKind::ControllerPause,
        FaultKind::LinkDown,
        FaultKind::Drain,
        FaultKind::ClusterRestart,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Hang => "hang",
            FaultKind::Slow => "slow",
            FaultKind::Crash => "crash",
            FaultKind::Ecc => "ecc",
            FaultKind::Sdc => "sdc",
            FaultKind::SdcGrad => "sdc-grad",
            FaultKind::DiskFull => "disk-full",
            FaultKind::CorruptCheckpoint => "corrupt-checkpoint",
            FaultKind::Partition => "partition",
            FaultKind::CpuHog => "cpu-hog",
            FaultKind::ControllerPause => "controller-pause",
            FaultKind::LinkDown => "link-down",
            FaultKind::Drain => "drain",
            FaultKind::ClusterRestart => "cluster-restart",
        }
    }

    /// Kinds that last `duration_s` (required for them, refused for the others).
    pub fn has_duration(self) -> bool {
        matches!(
            self,
            FaultKind::Hang
                | FaultKind::Slow
                | FaultKind::DiskFull
                | FaultKind::Partition
                | FaultKind::CpuHog
                | FaultKind::ControllerPause
                | FaultKind::LinkDown
        )
    }

    /// Which targets the kind accepts, in words (for errors).
    pub fn targets_expected(self) -> &'static str {
        match self {
            FaultKind::Kill => "rank:R, worker:ID, random-worker, controller:leader or controller:ID",
            FaultKind::ControllerPause => "controller:leader or controller:ID",
            FaultKind::CpuHog | FaultKind::LinkDown => {
                "host:H, or a process (rank:R, worker:ID, random-worker, controller:...) whose host is meant"
            }
            FaultKind::CorruptCheckpoint | FaultKind::ClusterRestart => "no target (leave it out)",
            _ => "rank:R, worker:ID or random-worker",
        }
    }

    /// Whether `t` is a target this kind accepts.
    pub fn accepts(self, t: &Target) -> bool {
        let worker = matches!(
            t,
            Target::Rank(_) | Target::Worker(_) | Target::RandomWorker
        );
        let controller = matches!(t, Target::ControllerLeader | Target::Controller(_));
        match self {
            FaultKind::Kill => worker || controller,
            FaultKind::ControllerPause => controller,
            FaultKind::CpuHog | FaultKind::LinkDown => {
                worker || controller || matches!(t, Target::Host(_))
            }
            FaultKind::CorruptCheckpoint | FaultKind::ClusterRestart => false,
            _ => worker,
        }
    }

    /// Kinds that take no target.
    pub fn targetless(self) -> bool {
        matches!(
            self,
            FaultKind::CorruptCheckpoint | FaultKind::ClusterRestart
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whom a fault hits. Written as a string: `rank:R`, `worker:ID`, `controller:leader`,
/// `controller:ID`, `host:H` or `random-worker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    /// Whoever holds rank R in the plan when the fault fires.
    Rank(u32),
    Worker(String),
    ControllerLeader,
    /// Controller node id (1-based).
    Controller(u64),
    /// Host index (0-based).
    Host(u32),
    /// A worker of the current plan, drawn from the seed.
    RandomWorker,
}

pub const TARGET_FORMS: &str =
    "rank:R, worker:ID, controller:leader, controller:ID, host:H or random-worker";

impl TryFrom<String> for Target {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |what: &str| format!("target `{s}`: {what} (expected {TARGET_FORMS})");
        if s == "random-worker" {
            return Ok(Target::RandomWorker);
        }
        let Some((k, v)) = s.split_once(':') else {
            return Err(bad("unknown form"));
        };
        match k {
            "rank" => v
                .parse()
                .map(Target::Rank)
                .map_err(|_| bad("the rank must be a number")),
            "worker" if !v.is_empty() => Ok(Target::Worker(v.to_string())),
            "controller" if v == "leader" => Ok(Target::ControllerLeader),
            "controller" => v
                .parse()
                .map(Target::Controller)
                .map_err(|_| bad("the controller must be `leader` or a node id")),
            "host" => v
                .parse()
                .map(Target::Host)
                .map_err(|_| bad("the host must be a number")),
            _ => Err(bad("unknown form")),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Rank(r) => write!(f, "rank:{r}"),
            Target::Worker(w) => write!(f, "worker:{w}"),
            Target::ControllerLeader => f.write_str("controller:leader"),
            Target::Controller(c) => write!(f, "controller:{c}"),
            Target::Host(h) => write!(f, "host:{h}"),
            Target::RandomWorker => f.write_str("random-worker"),
        }
    }
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.to_string()
    }
}

impl JsonSchema for Target {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Target".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Whom the fault hits: rank:R (whoever holds rank R when it fires), worker:ID, controller:leader, controller:ID, host:H or random-worker.",
            "pattern": "^(rank:[0-9]+|worker:.+|controller:(leader|[0-9]+)|host:[0-9]+|random-worker)$"
        })
    }
}

/// Kinds of controller event a trigger or an expectation can name (`phalanx events`):
/// the controller's own enum, so a scenario file spells them as `phalanx events` prints
/// them (kebab-case; the snake_case of earlier files is still read).
pub use phalanx_proto::EventKind;

/// An event that a trigger waits for, or that an expectation requires or forbids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    pub kind: EventKind,
    /// A substring of the event's subject or reason (e.g. `rank 2`, `w1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
}

impl EventMatch {
    pub fn matches(&self, kind: EventKind, subject: &str, reason: &str) -> bool {
        kind == self.kind
            && self
                .contains
                .as_deref()
                .is_none_or(|c| subject.contains(c) || reason.contains(c))
    }
}

impl fmt::Display for EventMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.contains {
            Some(c) => write!(f, "{} containing {c:?}", self.kind.as_str()),
            None => f.write_str(self.kind.as_str()),
        }
    }
}

/// One fault of the timeline: a kind, a target, exactly one trigger (`at_step`, `at_s`,
/// `after_event`, or `every_s` with `count`) and the kind's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// Required except for `corrupt-checkpoint` and `cluster-restart`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// Fire once the job's progress reaches this step (below `job.steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_step: Option<u64>,
    /// Fire this many seconds after the job's submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_s: Option<f64>,
    /// Fire at the first matching event after the previous fault of the file fired (or
    /// after the submission, for the first): e.g. the next `plan`, to land during a
    /// recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_event: Option<EventMatch>,
    /// Fire every this many seconds after the submission, `count` times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_s: Option<f64>,
    /// How many times an `every_s` fault fires (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Wait this long after the trigger before firing (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_s: Option<f64>,
    /// How long the fault lasts (hang, slow, disk-full, partition, cpu-hog,
    /// controller-pause, link-down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Slow-down factor of `slow` (> 1; default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// Busy threads of `cpu-hog` (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
}

/// A fault's trigger, resolved from the file's fields by [`crate::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    AtStep(u64),
    AtS(f64),
    AfterEvent(EventMatch),
    EveryS { every_s: f64, count: u32 },
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::AtStep(s) => write!(f, "at step {s}"),
            Trigger::AtS(s) => write!(f, "at {s} s"),
            Trigger::AfterEvent(e) => write!(f, "after the next {e}"),
            Trigger::EveryS { every_s, count } => write!(f, "every {every_s} s, {count} times"),
        }
    }
}

/// A validated fault: what the runner executes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// Index in the file's `[[faults]]` (swarm faults follow them).
    pub index: usize,
    pub kind: FaultKind,
    pub target: Option<Target>,
    pub trigger: Trigger,
    pub delay_s: f64,
    pub duration_s: Option<f64>,
    pub factor: f64,
    pub threads: u32,
}

/// Faults drawn at random from the seed: a Poisson process per kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwarmSpec {
    /// Mean faults per minute, per kind (kinds with a target take `random-worker`, or a
    /// random controller for `controller-pause`).
    pub rates_per_min: BTreeMap<FaultKind, f64>,
    /// No swarm fault before this many seconds after the submission.
    #[serde(default = "d_swarm_start")]
    pub start_s: f64,
    /// No swarm fault after this many seconds (default: none past the job's end).
    #[serde(default)]
    pub stop_s: Option<f64>,
    /// Duration of the kinds that last (default 5 s).
    #[serde(default = "d_swarm_duration")]
    pub duration_s: f64,
    /// At least this long between two swarm faults (default 10 s).
    #[serde(default = "d_swarm_gap")]
    pub min_gap_s: f64,
}

fn d_swarm_start() -> f64 {
    10.0
}
fn d_swarm_duration() -> f64 {
    5.0
}
fn d_swarm_gap() -> f64 {
    10.0
}

/// The outcomes the scenario expects. Every field is checked against what the run
/// measured; the run passes only when all hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The job completes (default true).
    #[serde(default = "d_true")]
    pub completes: bool,
    /// The final parameters equal a fault-free `phalanx train` of the same job, bit for
    /// bit (the runner runs it, or reuses one cached by its inputs).
    #[serde(default)]
    pub bit_exact_with_reference: bool,
    /// At most this many steps trained again over all recoveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lost_steps: Option<u64>,
    /// No recovery takes longer than this (seconds, from the last step before the
    /// interruption to the first after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mttr_s: Option<f64>,
    /// Training wall time minus the recovery windows over the training wall time (0..=1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_effective_training_time: Option<f64>,
    /// At most this many distinct leaders seen in any one Raft term (1: no split brain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_leaders_per_term: Option<u32>,
    /// At least this many recoveries (plan epochs after the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_recoveries: Option<u32>,
    /// Events that must appear in the event log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_events: Vec<EventMatch>,
    /// Events that must not appear.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_events: Vec<EventMatch>,
    /// The whole run (from the submission to the job's end) takes at most this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wall_s: Option<f64>,
}

fn d_true() -> bool {
    true
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            completes: true,
            bit_exact_with_reference: false,
            max_lost_steps: None,
            max_mttr_s: None,
            min_effective_training_time: None,
            max_leaders_per_term: None,
            min_recoveries: None,
            required_events: Vec::new(),
            forbidden_events: Vec::new(),
            max_wall_s: None,
        }
    }
}
