//! Wire and state types shared by the controller, its clients and the workers.
//!
//! serde types only: no logic, no I/O. The state machine that gives these types their
//! meaning lives in `phalanx-core`; the Raft node and the HTTP API in `phalanx-controller`.

use serde::{Deserialize, Serialize};

pub mod api;
pub mod cluster_view;
pub mod event;
pub mod fault;
pub mod trace;
pub mod vocab;

pub use api::{ErrorCode, ErrorResponse, MemberAction, MemberChange, RaftRole, StatusResponse};
pub use cluster_view::{ClusterStatus, NodeView};
pub use event::EventKind;
pub use trace::TraceParent;
pub use vocab::{DeviceKind, ModelPreset, NumericsProfile, Precision, StateSource, WorkerHealth};

/// A controller (Raft) node id. Raft reserves 0, so ids start at 1.
pub type NodeId = u64;
/// A worker's id as the operator sees it, e.g. `w0` or `gpu-3`.
pub type WorkerId = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub index: u32,
    pub memory_bytes: u64,
    /// The numerics profile the worker process applied before libtorch started.
    #[serde(default)]
    pub numerics: NumericsProfile,
    /// The GPU model an emulated device stands for (e.g. `H100-SXM-80GB`); the CUDA
    /// device's name for a real one; empty from workers that predate it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// The host CPU's vendor (`vendor_id` of /proc/cpuinfo): MKL and oneDNN take other
    /// kernels on `AuthenticAMD` than on `GenuineIntel` even when pinned to AVX2, so
    /// workers of the same numerics profile compute other bits on other vendors, and
    /// placement never mixes them in one plan. Empty when unknown, or from workers that
    /// predate it (a class of its own).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu_vendor: String,
}

impl DeviceSpec {
    /// What the operator sees: the model it emulates (`H100-SXM-80GB (emulated)`), else
    /// the kind and index.
    pub fn display(&self) -> String {
        match (self.kind, self.model.is_empty()) {
            (DeviceKind::CpuEmulated, false) => format!("{} (emulated)", self.model),
            (_, false) => format!("{} ({}:{})", self.model, self.kind, self.index),
            _ => format!("{}:{}", self.kind, self.index),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub address: String,
    pub device: DeviceSpec,
    pub health: WorkerHealth,
    /// Why the health is what it is (the last decision's reason).
    pub health_reason: String,
    /// Raft log index at which the worker registered.
    pub registered_index: u64,
}

/// A training job, as written in a job file (TOML) and replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub model: ModelPreset,
    /// The training corpus: `default`, or a file, a directory or a glob.
    pub corpus: String,
    pub steps: u64,
    pub global_batch: u32,
    pub seed: u64,
    pub checkpoint_interval_steps: u64,
    pub world_size_min: u32,
    pub world_size_max: u32,
    /// The numerics profile every rank must run under (absent in older job files: the
    /// default).
    #[serde(default)]
    pub numerics: NumericsProfile,
    /// The arithmetic of forward and backward on every rank (absent in older job files:
    /// fp32).
    #[serde(default)]
    pub precision: Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Submitted, waiting for at least `world_size_min` placeable workers.
    Waiting,
    Running,
    Completed,
    Cancelled,
    /// It cannot run: its workers failed to start it (a corpus they cannot read, a model
    /// they cannot build) on `START_ATTEMPTS_MAX` attempts; [`JobInfo::failure`] says why.
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Failed
        )
    }
}

/// One placement: rank `i` runs on `ranks[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub epoch: u64,
    pub ranks: Vec<WorkerId>,
    pub reason: String,
    /// Relative share of the step's micro-batches per rank; empty means equal shares. A
    /// straggler gets a smaller one before it is swapped out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub micro_shares: Vec<u32>,
    /// The trace context of the command that made this plan (its `raft.propose` span):
    /// the workers' recovery spans are its children, so one recovery is one trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Unique among the cluster's jobs: the name and the log index of its submission. The
    /// job's checkpoints live under `<checkpoint root>/<id>/`.
    #[serde(default)]
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub plan: Option<Plan>,
    /// Highest step every rank of the current plan has reported done.
    pub progress_step: u64,
    /// Latest step reported per rank of the current plan.
    pub rank_steps: Vec<u64>,
    /// SHA-256 of the final parameters (name-sorted LE f32 bytes), once the job finished.
    #[serde(default)]
    pub params_sha256: Option<String>,
    /// Every recovery of this job: one per plan epoch after the first (newest last, bounded).
    #[serde(default)]
    pub recoveries: Vec<Recovery>,
    /// How long training was blocked by each recent checkpoint snapshot, in µs (bounded).
    #[serde(default)]
    pub checkpoint_stall_us: Vec<u64>,
    /// Wall clock (ms since the Unix epoch, from the workers) when training began and ended.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// Why the job failed (state `failed`): the last start failure a worker reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Start failures reported by its workers since its last progress (the job fails at
    /// `START_ATTEMPTS_MAX` reports from as many distinct workers as it can have, up to
    /// that number).
    #[serde(default)]
    pub start_failures: u32,
    /// The workers those reports came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start_failed_workers: Vec<WorkerId>,
    /// The loss curve and each rank's compute time, for the dashboard (bounded).
    #[serde(default)]
    pub history: JobHistory,
    /// The newest throughput and model FLOPs utilisation rank 0 reported with its
    /// progress (absent until the job has run a few steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Throughput>,
}

/// A job's training throughput over the reporting rank's recent steps, and the model
/// FLOPs utilisation (MFU) it stands for. Integers, so that the replicated state compares
/// and round-trips through JSON exactly; see docs/training.md for the FLOPs formula.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throughput {
    /// The last step of the measurement (steps done).
    pub step: u64,
    /// Steps measured: the wall time between that many consecutive step completions.
    pub steps: u32,
    /// Tokens per second of the whole job (every rank's micro-batches together).
    pub tokens_per_s: u64,
    /// Training FLOPs per token of the model (forward and backward: 6N plus attention).
    pub flops_per_token: u64,
    /// Model FLOPs per second the job achieved, in MFLOP/s.
    pub achieved_mflops: u64,
    /// Devices (ranks) of the plan.
    pub devices: u32,
    /// One device's peak, in MFLOP/s, and where that figure comes from.
    pub peak_mflops_per_device: u64,
    pub peak_source: String,
    /// achieved / (devices × peak), in millionths.
    pub mfu_ppm: u64,
}

impl Throughput {
    /// The longest `peak_source` a report may carry.
    pub const SOURCE_BYTES_MAX: usize = 256;

    /// MFU as a fraction.
    pub fn mfu(&self) -> f64 {
        self.mfu_ppm as f64 / 1e6
    }
}

/// A job's recent course as its ranks report it with their progress: the newest compute
/// time of each rank and a thinned history of (step, loss, compute time per rank). Kept
/// for the dashboard; bounded by `phalanx_core::history::SAMPLES_MAX` samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JobHistory {
    /// The plan epoch `rank_compute_us` belongs to.
    pub epoch: u64,
    /// The newest compute time per micro-batch (forward + backward) of each rank of that
    /// epoch's plan, in µs; 0 until the rank reported one.
    pub rank_compute_us: Vec<u64>,
    /// One sample every `stride` steps, oldest first; when full, every other one is
    /// dropped and the stride doubles, so the curve always spans the whole run.
    pub samples: Vec<StepSample>,
    pub stride: u64,
}

/// One recorded step of [`JobHistory`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSample {
    pub step: u64,
    pub epoch: u64,
    /// The step's training loss (the same on every rank) in millionths: fixed point, so
    /// the replicated state compares and round-trips through JSON exactly.
    pub loss_millionths: u64,
    /// Each rank's newest compute time per micro-batch at that step, in µs (0: unknown).
    pub compute_us: Vec<u64>,
}

/// How the job came back after an interruption (measured by the first rank that resumed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub epoch: u64,
    /// Where the state came from, in words (`peers in memory (ranks [0, 2] at step 35)`,
    /// `checkpoint step 40`, `the seed's initial state`).
    pub source: String,
    /// The kind of [`Recovery::source`]. None only when a worker that predates the field
    /// reported a text of no known kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_kind: Option<StateSource>,
    pub resumed_at_step: u64,
    /// Steps trained again: the newest step the reporting rank had completed before the
    /// interruption minus the resume step.
    pub steps_redone: u64,
    /// From the reporting rank's last completed step before the interruption to its first
    /// step after it: an upper bound of the time from fault to the next committed step.
    pub mttr_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointShard {
    pub rank: u32,
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The id of the job that wrote it ([`JobInfo::id`]).
    #[serde(default)]
    pub job: String,
    pub step: u64,
    pub epoch: u64,
    pub shards: Vec<CheckpointShard>,
    pub durable: bool,
}

/// One decision of the controller, with its reason, in the bounded event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Raft log index of the command that produced it.
    pub index: u64,
    pub kind: EventKind,
    pub subject: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerMember {
    pub id: NodeId,
    pub address: String,
}

/// A replicated command. Every change of the cluster state is one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    RegisterWorker {
        id: WorkerId,
        address: String,
        device: DeviceSpec,
    },
    /// Decided by the leader's failure policy or by an operator.
    SetWorkerHealth {
        id: WorkerId,
        health: WorkerHealth,
        reason: String,
        /// When set, the decision is about the worker registered at this address; a report
        /// about an earlier incarnation (restarted since, at a new address) is refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    DrainWorker {
        id: WorkerId,
        reason: String,
    },
    /// The operator takes back a drain: the worker may be placed again.
    UndrainWorker {
        id: WorkerId,
        reason: String,
    },
    /// The operator brings a quarantined worker back (its fault was repaired); the reason
    /// lands in the event log.
    RestoreWorker {
        id: WorkerId,
        reason: String,
    },
    SubmitJob {
        spec: JobSpec,
    },
    CancelJob {
        reason: String,
    },
    ReportProgress {
        worker: WorkerId,
        epoch: u64,
        step: u64,
        /// The step's loss in millionths (see [`StepSample`]); absent from older workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss_millionths: Option<u64>,
        /// The rank's recent compute time per micro-batch, in µs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compute_us: Option<u64>,
        /// Rank 0's recent throughput and MFU (at most about once a second).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        throughput: Option<Throughput>,
    },
    /// Rank 0 of a new epoch tells where the group's state came from.
    ReportResume {
        worker: WorkerId,
        epoch: u64,
        step: u64,
        /// Where the state came from, in words.
        source: String,
        /// Its kind; absent from workers that predate it (then read from the words).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_kind: Option<StateSource>,
        #[serde(default)]
        steps_redone: u64,
        #[serde(default)]
        mttr_ms: Option<u64>,
        /// The reporting worker's wall clock (ms since the Unix epoch) when the epoch began.
        #[serde(default)]
        at_ms: Option<u64>,
    },
    /// The leader's straggler policy halves a slow rank's share of the micro-batches: a
    /// new plan epoch with the same ranks.
    ReduceShare {
        worker: WorkerId,
        epoch: u64,
        reason: String,
    },
    /// A rank's group of this epoch failed to form or broke again and again with no step
    /// committed in between: the leader re-issues the plan as a new epoch (a new group id,
    /// so every connection of the old attempts is refused), naming the reporter's last
    /// error and the peer it blames.
    ReportEpochStuck {
        worker: WorkerId,
        epoch: u64,
        attempts: u32,
        /// The rank the reporter's last error names, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blamed_rank: Option<u32>,
        reason: String,
    },
    /// A worker could not start its rank of the job (the corpus cannot be read, the
    /// model cannot be built): recorded as an event; the job fails after a bounded number.
    ReportStartFailure {
        worker: WorkerId,
        /// The job's id ([`JobInfo::id`]): a report about an earlier job is refused.
        job: String,
        epoch: u64,
        reason: String,
    },
    /// An operator (or a chaos scenario) injected a fault; recorded for the event log.
    RecordFault {
        target: String,
        kind: String,
    },
    /// A worker detected silent data corruption that it handled itself (a gradient check
    /// failed and the step was redone); recorded for the event log.
    ReportGradientMismatch {
        worker: WorkerId,
        epoch: u64,
        step: u64,
        micro: u64,
        owner_rank: u32,
        verifier_rank: u32,
    },
    /// Rank 0's final result: the parameters' SHA-256 after the last step.
    ReportResult {
        worker: WorkerId,
        epoch: u64,
        params_sha256: String,
        /// The reporting worker's wall clock (ms since the Unix epoch) at the end.
        #[serde(default)]
        finished_at_ms: Option<u64>,
    },
    /// Rank 0 committed a checkpoint's manifest: from now on it exists. Fenced by the job
    /// id and the plan epoch; the job's entries beyond the newest `retain` leave the
    /// catalog (and the workers delete their files).
    RecordCheckpoint {
        #[serde(default)]
        job: String,
        step: u64,
        epoch: u64,
        shards: Vec<CheckpointShard>,
        durable: bool,
        /// How long the reporting rank's training loop was blocked by the snapshot, in µs.
        #[serde(default)]
        stall_us: Option<u64>,
        /// Keep this many of the job's newest checkpoints in the catalog (0: only the
        /// catalog's own bound).
        #[serde(default)]
        retain: u32,
    },
    /// A worker found a checkpoint of the catalog that it must not load (it belongs to
    /// another job or model, or its bytes are corrupt); recorded for the event log.
    ReportCheckpointRefused {
        worker: WorkerId,
        job: String,
        step: u64,
        reason: String,
    },
    /// A free-form key/value annotation of the cluster (also the register that the
    /// linearizability test reads and writes).
    SetAnnotation {
        key: String,
        value: String,
    },
    /// A no-op that orders a read after every write committed before it.
    ReadBarrier,
}

/// A command with the client's request id: a retried request id applies once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub request_id: String,
    pub command: Command,
    /// The trace context of the proposal (set by the controller that proposes it, from
    /// its `raft.propose` span): a plan this command makes carries it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Applied {
        message: String,
    },
    /// The command was valid to replicate but the state machine refused it.
    Rejected {
        reason: String,
    },
}

impl Outcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Outcome::Applied { .. })
    }
    pub fn message(&self) -> &str {
        match self {
            Outcome::Applied { message } => message,
            Outcome::Rejected { reason } => reason,
        }
    }
}

// ---------------------------------------------------------------- HTTP API bodies

/// `POST /v1/command` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    pub outcome: Outcome,
    /// Log index at which it was (first) applied.
    pub index: u64,
    /// True when the request id had already been applied and this is the stored outcome.
    pub duplicate: bool,
}

/// `POST /v1/heartbeat` (leader-local, not replicated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub worker: WorkerId,
    /// The worker's recent compute time per micro-batch (forward + backward), in ms: the
    /// leader's straggler policy compares it across the ranks of the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<f64>,
    /// The worker's newest completed training step: its progress counter, by which a
    /// worker named silent proves that it is slow, not stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// A peer this worker has been waiting on in a collective, with no progress for
    /// longer than its silence threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_peer: Option<SilentPeer>,
}

/// A rank of a plan epoch that a worker waits on and hears nothing from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SilentPeer {
    pub epoch: u64,
    pub rank: u32,
    pub silent_ms: u64,
    /// The trace of the reporting worker's detection: the leader's decision that confirms
    /// the report (and the plan it makes) joins it, so that a recovery from a silent peer
    /// is one trace like one from a dead peer (issue 12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
}

/// `GET /v1/assignment/{worker}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub worker: WorkerId,
    /// None when the worker has no rank in the current plan.
    pub rank: Option<u32>,
    pub epoch: u64,
    pub world_size: u32,
    /// Addresses of all ranks, in rank order.
    pub peers: Vec<String>,
    pub job: Option<JobSpec>,
    /// The job's id ([`JobInfo::id`]): where its checkpoints live.
    #[serde(default)]
    pub job_id: Option<String>,
    pub job_state: Option<JobState>,
    /// Step to resume from: the job's newest durable checkpoint's step (0 if none).
    pub resume_step: u64,
    /// The plan's micro-batch shares (empty: equal).
    #[serde(default)]
    pub micro_shares: Vec<u32>,
    /// The worker at each rank of the plan, in rank order: the identity each ring
    /// neighbour's certificate must name.
    #[serde(default)]
    pub rank_workers: Vec<WorkerId>,
    /// The plan epoch's collective secret (64 hex digits): every ring hello proves it.
    /// Given only to the epoch's ranks; never in status, job, events or logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_secret: Option<SecretHex>,
    /// The plan's trace context ([`Plan::trace`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
}

/// A secret as hex digits. Serialized as the plain string; its `Debug` never shows it,
/// so a logged message that holds one does not leak it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretHex(pub String);

impl std::fmt::Debug for SecretHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHex(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enums keep the wire spellings the strings had, and each `as_str` is its serde
    /// name; an unknown error code from a newer controller still parses.
    #[test]
    fn enum_fields_keep_their_wire_spellings() {
        fn wire<T: Serialize>(v: T) -> String {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        }
        for r in [
            RaftRole::Leader,
            RaftRole::Follower,
            RaftRole::Candidate,
            RaftRole::PreCandidate,
        ] {
            assert_eq!(wire(r), r.as_str());
        }
        assert_eq!(wire(RaftRole::PreCandidate), "pre_candidate");
        for h in WorkerHealth::ALL {
            assert_eq!(wire(h), h.as_str());
        }
        for p in Precision::ALL {
            assert_eq!(wire(p), p.as_str());
        }
        for p in NumericsProfile::ALL {
            assert_eq!(wire(p), p.as_str());
        }
        for m in ModelPreset::ALL {
            assert_eq!(wire(m), m.as_str());
            assert_eq!(ModelPreset::parse(m.as_str()), Some(m));
        }
        for k in [DeviceKind::CpuEmulated, DeviceKind::Cuda] {
            assert_eq!(wire(k), k.as_str());
        }
        assert_eq!(wire(DeviceKind::CpuEmulated), "cpu-emulated");
        for a in [MemberAction::Add, MemberAction::Remove] {
            assert_eq!(wire(a), a.as_str());
        }
        for e in [
            ErrorCode::NotLeader,
            ErrorCode::NoLeader,
            ErrorCode::Timeout,
            ErrorCode::BadRequest,
            ErrorCode::NotFound,
            ErrorCode::Refused,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::RequestTimeout,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Internal,
            ErrorCode::Unknown,
        ] {
            assert_eq!(wire(e), e.as_str());
        }
        let newer: ErrorResponse =
            serde_json::from_str(r#"{"error": "quota_exceeded", "message": "m"}"#).unwrap();
        assert_eq!(newer.error, ErrorCode::Unknown);
        let bad = serde_json::from_str::<StatusResponse>(r#"{"node_id": 1, "role": "king"}"#);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown variant `king`"));
    }

    /// The words of workers that predate `source_kind`, as they wrote them; before, the
    /// seed's initial state was counted as `other`.
    #[test]
    fn state_sources_of_older_workers_words() {
        for (words, kind) in [
            (
                "peers in memory (ranks [0, 2, 3] at step 35)",
                Some(StateSource::Peer),
            ),
            ("peer rank 3", Some(StateSource::Peer)),
            ("checkpoint step 40", Some(StateSource::Checkpoint)),
            ("the seed's initial state", Some(StateSource::Initial)),
            ("initial state", Some(StateSource::Initial)),
            ("tape", None),
        ] {
            assert_eq!(StateSource::of_text(words), kind, "{words}");
        }
        for k in [
            StateSource::Peer,
            StateSource::Checkpoint,
            StateSource::Initial,
        ] {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
    }

    #[test]
    fn command_json_is_tagged() {
        let c = Command::DrainWorker {
            id: "w1".into(),
            reason: "maint".into(),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"type\":\"drain_worker\""), "{s}");
        let back: Command = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn numerics_profile_is_an_enum_with_a_default_for_old_messages() {
        let d: DeviceSpec =
            serde_json::from_str(r#"{"kind":"cpu-emulated","index":0,"memory_bytes":1}"#).unwrap();
        assert_eq!(d.numerics, NumericsProfile::X86_64Avx2);
        let d = DeviceSpec {
            numerics: NumericsProfile::Native,
            ..d
        };
        let s = serde_json::to_string(&d).unwrap();
        assert!(s.contains(r#""numerics":"native""#), "{s}");
        assert_eq!(serde_json::from_str::<DeviceSpec>(&s).unwrap(), d);
        for p in NumericsProfile::ALL {
            assert_eq!(NumericsProfile::parse(p.as_str()), Some(p));
        }
        assert_eq!(NumericsProfile::parse("avx512"), None);
        assert!(serde_json::from_str::<NumericsProfile>(r#""avx512""#).is_err());
    }
}
