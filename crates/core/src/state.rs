//! The replicated cluster state and its deterministic `apply`.

use std::collections::{BTreeMap, VecDeque};

use phalanx_proto::{
    CheckpointInfo, Command, ControllerMember, Envelope, Event, EventKind, JobInfo, JobState,
    NodeId, Outcome, Plan, StateSource, WorkerHealth, WorkerId, WorkerInfo,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::jobfile::validate_job;
use crate::policy::{place, PlacementDecision};

/// Bounds of the replicated state. Part of the state, so every replica bounds alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateLimits {
    pub events_max: usize,
    pub checkpoints_max: usize,
    /// Remembered request ids (for exactly-once apply of retried commands).
    pub request_ids_max: usize,
    pub workers_max: usize,
    pub annotations_max: usize,
    pub text_bytes_max: usize,
}

impl Default for StateLimits {
    fn default() -> Self {
        StateLimits {
            events_max: 1_000,
            checkpoints_max: 256,
            request_ids_max: 10_000,
            workers_max: 65_536,
            annotations_max: 10_000,
            text_bytes_max: 4_096,
        }
    }
}

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("state snapshot is not valid: {0}")]
    Decode(#[from] serde_json::Error),
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// Index at which the request id was first applied.
    pub index: u64,
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    pub members: Vec<ControllerMember>,
    pub workers: BTreeMap<WorkerId, WorkerInfo>,
    pub job: Option<JobInfo>,
    pub checkpoints: VecDeque<CheckpointInfo>,
    pub events: VecDeque<Event>,
    pub next_event_seq: u64,
    pub annotations: BTreeMap<String, String>,
    /// request id -> (index first applied, outcome)
    applied_requests: BTreeMap<String, (u64, Outcome)>,
    applied_order: VecDeque<String>,
    pub limits: StateLimits,
    /// Index of the last entry applied to this state (kept inside the snapshot).
    pub applied_index: u64,
}

/// Recoveries and checkpoint stalls kept per job.
const RECOVERIES_MAX: usize = 256;
const STALLS_MAX: usize = 64;

pub(crate) fn ok(m: impl Into<String>) -> Outcome {
    Outcome::Applied { message: m.into() }
}
pub(crate) fn no(m: impl Into<String>) -> Outcome {
    Outcome::Rejected { reason: m.into() }
}

impl ClusterState {
    pub fn new(limits: StateLimits) -> Self {
        ClusterState {
            limits,
            ..Default::default()
        }
    }

    pub fn snapshot_bytes(&self) -> Vec<u8> {
        // A BTreeMap/VecDeque of plain data always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Outcome already recorded for a request id, if any.
    pub fn lookup_request(&self, request_id: &str) -> Option<(u64, &Outcome)> {
        self.applied_requests.get(request_id).map(|(i, o)| (*i, o))
    }

    /// Record that raft advanced to `index` without a command (empty or conf entries).
    pub fn note_index(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
    }

    /// Apply one committed command at log `index`. Deterministic: the same sequence of
    /// (index, envelope) gives the same state on every replica.
    pub fn apply(&mut self, index: u64, env: &Envelope) -> Applied {
        self.note_index(index);
        if let Some((first, outcome)) = self.applied_requests.get(&env.request_id) {
            return Applied {
                outcome: outcome.clone(),
                index: *first,
                duplicate: true,
            };
        }
        let epoch_before = self.plan_epoch();
        let outcome = self.apply_command(index, &env.command);
        // A plan this command made carries the command's trace context (issue 12): the
        // workers' recovery spans join the trace of the report or decision behind it.
        if self.plan_epoch() != epoch_before {
            if let Some(plan) = self.job.as_mut().and_then(|j| j.plan.as_mut()) {
                plan.trace = env.trace.clone();
            }
        }
        if !env.request_id.is_empty() {
            self.applied_requests
                .insert(env.request_id.clone(), (index, outcome.clone()));
            self.applied_order.push_back(env.request_id.clone());
            while self.applied_order.len() > self.limits.request_ids_max {
                if let Some(old) = self.applied_order.pop_front() {
                    self.applied_requests.remove(&old);
                }
            }
        }
        Applied {
            outcome,
            index,
            duplicate: false,
        }
    }

    /// Record a committed membership change (addresses come from the conf change context).
    pub fn set_members(
        &mut self,
        index: u64,
        voters: &[NodeId],
        addresses: &BTreeMap<NodeId, String>,
    ) {
        self.note_index(index);
        let mut members: Vec<ControllerMember> = voters
            .iter()
            .map(|id| ControllerMember {
                id: *id,
                address: addresses
                    .get(id)
                    .cloned()
                    .or_else(|| {
                        self.members
                            .iter()
                            .find(|m| m.id == *id)
                            .map(|m| m.address.clone())
                    })
                    .unwrap_or_default(),
            })
            .collect();
        members.sort_by_key(|m| m.id);
        if members != self.members {
            let ids: Vec<String> = members.iter().map(|m| m.id.to_string()).collect();
            self.members = members;
            self.event(
                index,
                EventKind::Members,
                "controllers",
                format!("voters now [{}]", ids.join(", ")),
            );
        }
    }

    pub(crate) fn event(&mut self, index: u64, kind: EventKind, subject: &str, reason: String) {
        let seq = self.next_event_seq;
        self.next_event_seq += 1;
        self.events.push_back(Event {
            seq,
            index,
            kind,
            subject: subject.into(),
            reason,
        });
        while self.events.len() > self.limits.events_max {
            self.events.pop_front();
        }
    }

    pub(crate) fn too_long_text(&self, s: &str) -> bool {
        self.too_long(s)
    }

    fn too_long(&self, s: &str) -> bool {
        s.len() > self.limits.text_bytes_max
    }

    fn apply_command(&mut self, index: u64, cmd: &Command) -> Outcome {
        match cmd {
            Command::ReadBarrier => ok("read barrier"),
            Command::ReportResume {
                worker,
                epoch,
                step,
                source,
                source_kind,
                steps_redone,
                mttr_ms,
                at_ms,
            } => {
                if self.too_long(source) {
                    return no("source must be at most text_bytes_max bytes");
                }
                let Some(j) = &mut self.job else {
                    return no("no job");
                };
                // A resume is a record of what an epoch did, not a say in what happens
                // next: a report of an epoch already superseded (its ranks resumed, then a
                // worker joined before the report was committed) is still history worth
                // keeping. Only epochs that never existed are refused.
                if j.plan.as_ref().is_none_or(|p| *epoch > p.epoch) {
                    return no(format!("epoch {epoch} is not a plan epoch of this job"));
                }
                if j.recoveries.iter().any(|r| r.epoch == *epoch) {
                    return no(format!("epoch {epoch}'s resume is already recorded"));
                }
                if j.started_at_ms.is_none() {
                    j.started_at_ms = *at_ms;
                }
                // The old plan's committed watermark bounds the redone steps from below when
                // no reporting rank remembers the steps it had done (all workers new).
                let steps_redone = (*steps_redone).max(j.progress_step.saturating_sub(*step));
                if *epoch > 1 {
                    let at = j.recoveries.partition_point(|r| r.epoch < *epoch);
                    j.recoveries.insert(
                        at,
                        phalanx_proto::Recovery {
                            epoch: *epoch,
                            source: source.clone(),
                            source_kind: source_kind.or_else(|| StateSource::of_text(source)),
                            resumed_at_step: *step,
                            steps_redone,
                            mttr_ms: *mttr_ms,
                        },
                    );
                    if j.recoveries.len() > RECOVERIES_MAX {
                        j.recoveries.remove(0);
                    }
                }
                let name = j.spec.name.clone();
                let mttr = mttr_ms
                    .map(|m| format!(", {m} ms after its last step"))
                    .unwrap_or_default();
                self.event(
                    index,
                    EventKind::Resumed,
                    &name,
                    format!("epoch {epoch} resumed at step {step} from {source}, {steps_redone} steps redone{mttr} (reported by {worker})"),
                );
                ok("resume recorded")
            }
            Command::ReduceShare {
                worker,
                epoch,
                reason,
            } => {
                if self.too_long(reason) {
                    return no("reason too long");
                }
                let Some(j) = &mut self.job else {
                    return no("no job");
                };
                let Some(plan) = j.plan.as_mut().filter(|p| p.epoch == *epoch) else {
                    return no(format!("stale epoch {epoch}"));
                };
                let Some(rank) = plan.ranks.iter().position(|w| w == worker) else {
                    return no(format!("worker {worker} has no rank in epoch {epoch}"));
                };
                let mut shares = if plan.micro_shares.len() == plan.ranks.len() {
                    plan.micro_shares.clone()
                } else {
                    vec![2; plan.ranks.len()]
                };
                if shares[rank] <= 1 {
                    return no(format!("worker {worker}'s share is already at its minimum"));
                }
                shares[rank] /= 2;
                let new_epoch = plan.epoch + 1;
                plan.epoch = new_epoch;
                plan.micro_shares = shares.clone();
                plan.reason = format!("{worker}'s micro-batch share halved");
                j.rank_steps = vec![j.progress_step; plan.ranks.len()];
                let name = j.spec.name.clone();
                self.event(index, EventKind::StragglerShare, worker, reason.clone());
                self.event(index, EventKind::Plan, &name, format!("epoch {new_epoch}: {worker}'s micro-batch share halved (shares {shares:?})"));
                ok("share reduced")
            }
            Command::ReportEpochStuck {
                worker,
                epoch,
                attempts,
                blamed_rank,
                reason,
            } => {
                if self.too_long(reason) {
                    return no("reason too long");
                }
                let Some(j) = &mut self.job else {
                    return no("no job");
                };
                if j.state != JobState::Running {
                    return no(format!("job is {:?}", j.state));
                }
                let Some(plan) = j.plan.as_mut().filter(|p| p.epoch == *epoch) else {
                    return no(format!("stale epoch {epoch}"));
                };
                if !plan.ranks.contains(worker) {
                    return no(format!("worker {worker} has no rank in epoch {epoch}"));
                }
                let blamed = match blamed_rank.and_then(|r| plan.ranks.get(r as usize)) {
                    Some(w) => format!("; it blames rank {} ({w})", blamed_rank.unwrap_or(0)),
                    None => String::new(),
                };
                self.event(
                    index,
                    EventKind::EpochStuck,
                    worker,
                    format!("epoch {epoch}: {attempts} attempts by {worker} failed with no step committed{blamed}; last error: {reason}"),
                );
                self.reissue_epoch(index, format!("epoch {epoch} did not converge"));
                ok("epoch re-issued")
            }
            Command::ReportGradientMismatch {
                worker,
                epoch,
                step,
                micro,
                owner_rank,
                verifier_rank,
            } => {
                if self.too_long(worker) {
                    return no("worker id too long");
                }
                let Some(j) = &self.job else {
                    return no("no job");
                };
                if j.plan.as_ref().is_none_or(|p| *epoch > p.epoch) {
                    return no(format!("epoch {epoch} is not a plan epoch of this job"));
                }
                let name = j.spec.name.clone();
                self.event(
                    index,
                    EventKind::GradientMismatch,
                    &name,
                    format!(
                        "epoch {epoch} step {step}: rank {owner_rank}'s gradient of micro-batch {micro} differs from rank {verifier_rank}'s recomputation; the step is redone (reported by {worker})"
                    ),
                );
                ok("gradient mismatch recorded")
            }
            Command::RecordFault { target, kind } => {
                if self.too_long(target) || self.too_long(kind) {
                    return no("fault target and kind must be at most text_bytes_max bytes");
                }
                self.event(index, EventKind::FaultInjected, target, kind.clone());
                ok("fault recorded")
            }
            Command::ReportResult {
                worker,
                epoch,
                params_sha256,
                finished_at_ms,
            } => {
                let Some(j) = &mut self.job else {
                    return no("no job");
                };
                if j.state != JobState::Running {
                    return no(format!("job is {}", j.state.as_str()));
                }
                if j.plan.as_ref().map(|p| p.epoch) != Some(*epoch) {
                    return no(format!("stale epoch {epoch}"));
                }
                if params_sha256.len() != 64
                    || !params_sha256.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return no("params_sha256 must be 64 hex digits");
                }
                // The trained model is never lost: the job completes only once its final
                // step is a committed, durable checkpoint.
                let (id, last) = (j.id.clone(), j.spec.steps);
                if !self
                    .checkpoints
                    .iter()
                    .any(|c| c.job == id && c.step == last && c.durable)
                {
                    return no(format!(
                        "the final checkpoint (step {last}) of job {id} is not committed yet"
                    ));
                }
                let j = self.job.as_mut().expect("checked above");
                j.params_sha256 = Some(params_sha256.clone());
                j.finished_at_ms = j.finished_at_ms.or(*finished_at_ms);
                j.progress_step = last;
                j.state = JobState::Completed;
                let name = j.spec.name.clone();
                self.event(
                    index,
                    EventKind::JobResult,
                    &name,
                    format!("params_sha256 {params_sha256} (reported by {worker}, epoch {epoch})"),
                );
                self.event(
                    index,
                    EventKind::JobCompleted,
                    &name,
                    format!(
                        "all ranks reached step {last}; final checkpoint step {last} committed"
                    ),
                );
                ok("result recorded")
            }
            Command::SetAnnotation { key, value } => {
                if key.is_empty() || self.too_long(key) || self.too_long(value) {
                    return no("annotation key must be 1..=text_bytes_max bytes, value at most text_bytes_max");
                }
                if !self.annotations.contains_key(key)
                    && self.annotations.len() >= self.limits.annotations_max
                {
                    return no(format!(
                        "annotations_max ({}) reached",
                        self.limits.annotations_max
                    ));
                }
                self.annotations.insert(key.clone(), value.clone());
                ok(format!("annotation {key} set"))
            }
            Command::RegisterWorker {
                id,
                address,
                device,
            } => {
                if id.is_empty() || self.too_long(id) || self.too_long(address) {
                    return no("worker id must be 1..=text_bytes_max bytes");
                }
                // A worker of the running plan that registers from a new address is a new
                // process: whatever the epoch held in its memory is gone, so the epoch
                // cannot go on; the same ranks regroup under a new epoch (and its resume,
                // from peers or a checkpoint, is recorded as a recovery).
                let restarted_in_plan = self.workers.get(id).is_some_and(|w| w.address != *address)
                    && self.job.as_ref().is_some_and(|j| {
                        j.state == JobState::Running
                            && j.plan.as_ref().is_some_and(|p| p.ranks.contains(id))
                    });
                let epoch_before = self.plan_epoch();
                let msg = match self.workers.get_mut(id) {
                    Some(w) => {
                        w.address = address.clone();
                        w.device = device.clone();
                        if matches!(w.health, WorkerHealth::Failed | WorkerHealth::Suspect) {
                            w.health = WorkerHealth::Joining;
                            w.health_reason = "re-registered".into();
                        }
                        format!("worker {id} re-registered")
                    }
                    None => {
                        if self.workers.len() >= self.limits.workers_max {
                            return no(format!(
                                "workers_max ({}) reached",
                                self.limits.workers_max
                            ));
                        }
                        self.workers.insert(
                            id.clone(),
                            WorkerInfo {
                                id: id.clone(),
                                address: address.clone(),
                                device: device.clone(),
                                health: WorkerHealth::Joining,
                                health_reason: "registered".into(),
                                registered_index: index,
                            },
                        );
                        format!("worker {id} registered")
                    }
                };
                self.event(
                    index,
                    EventKind::WorkerRegistered,
                    id,
                    format!("at {address}"),
                );
                self.replan(index);
                if restarted_in_plan && self.plan_epoch() == epoch_before {
                    self.reissue_epoch(
                        index,
                        format!("{id} restarted (now at {address}); its state is gone"),
                    );
                }
                ok(msg)
            }
            Command::SetWorkerHealth {
                id,
                health,
                reason,
                address,
            } => {
                let Some(w) = self.workers.get_mut(id) else {
                    return no(format!("unknown worker {id}"));
                };
                if let Some(a) = address.as_ref().filter(|a| **a != w.address) {
                    return no(format!(
                        "stale report about worker {id} at {a}; it is now at {}",
                        w.address
                    ));
                }
                if self.limits.text_bytes_max < reason.len() {
                    return no("reason too long");
                }
                if w.health == *health {
                    return ok(format!("worker {id} already {}", health.as_str()));
                }
                let from = w.health;
                w.health = *health;
                w.health_reason = reason.clone();
                self.event(
                    index,
                    EventKind::of_health(*health),
                    id,
                    format!("{} -> {}: {reason}", from.as_str(), health.as_str()),
                );
                self.replan(index);
                ok(format!("worker {id} {}", health.as_str()))
            }
            Command::ReportStartFailure {
                worker,
                job,
                epoch,
                reason,
            } => self.start_failure(index, worker, job, *epoch, reason),
            Command::DrainWorker { id, reason } => self.drain(index, id, reason),
            Command::UndrainWorker { id, reason } => self.undrain(index, id, reason),
            Command::RestoreWorker { id, reason } => self.restore_worker(index, id, reason),
            Command::SubmitJob { spec } => {
                if let Some(j) = &self.job {
                    if !j.state.is_terminal() {
                        return no(format!(
                            "job {} is {}; cancel it first",
                            j.spec.name,
                            j.state.as_str()
                        ));
                    }
                }
                if let Err(e) = validate_job(spec) {
                    return no(e.to_string());
                }
                self.job = Some(JobInfo {
                    id: format!("{}-{index}", spec.name),
                    spec: spec.clone(),
                    state: JobState::Waiting,
                    plan: None,
                    progress_step: 0,
                    rank_steps: Vec::new(),
                    params_sha256: None,
                    recoveries: Vec::new(),
                    checkpoint_stall_us: Vec::new(),
                    started_at_ms: None,
                    finished_at_ms: None,
                    failure: None,
                    start_failures: 0,
                    start_failed_workers: Vec::new(),
                    history: Default::default(),
                    throughput: None,
                });
                self.event(
                    index,
                    EventKind::JobSubmitted,
                    &spec.name,
                    format!("{} steps of {}", spec.steps, spec.model),
                );
                self.replan(index);
                ok(format!("job {} submitted", spec.name))
            }
            Command::CancelJob { reason } => match &mut self.job {
                Some(j) if !j.state.is_terminal() => {
                    j.state = JobState::Cancelled;
                    let name = j.spec.name.clone();
                    self.event(index, EventKind::JobCancelled, &name, reason.clone());
                    ok(format!("job {name} cancelled"))
                }
                // Cancelling again changes nothing and is not an error (like a second
                // drain): the job is where the operator wants it.
                Some(j) => ok(format!(
                    "job {} already {}; nothing to cancel",
                    j.spec.name,
                    j.state.as_str()
                )),
                None => no("no job to cancel"),
            },
            Command::ReportProgress {
                worker,
                epoch,
                step,
                loss_millionths,
                compute_us,
                throughput,
            } => {
                let Some(j) = &mut self.job else {
                    return no("no job");
                };
                if j.state != JobState::Running {
                    return no(format!("job is {}", j.state.as_str()));
                }
                let Some(plan) = &j.plan else {
                    return no("no plan");
                };
                if plan.epoch != *epoch {
                    return no(format!(
                        "stale epoch {epoch}; current epoch is {}",
                        plan.epoch
                    ));
                }
                let Some(rank) = plan.ranks.iter().position(|w| w == worker) else {
                    return no(format!("worker {worker} has no rank in epoch {epoch}"));
                };
                // A bad throughput report is dropped, never the progress it rides on.
                let mut dropped = String::new();
                if let Some(t) = throughput {
                    match crate::throughput::check(t, plan.ranks.len(), j.spec.steps) {
                        Ok(()) => j.throughput = Some(t.clone()),
                        Err(why) => dropped = format!("; throughput report dropped: {why}"),
                    }
                }
                let step = (*step).min(j.spec.steps);
                crate::history::record(
                    &mut j.history,
                    crate::history::RankReport {
                        epoch: *epoch,
                        ranks: plan.ranks.len(),
                        rank,
                        step,
                        loss_millionths: *loss_millionths,
                        compute_us: *compute_us,
                    },
                );
                j.rank_steps[rank] = j.rank_steps[rank].max(step);
                let watermark = j.rank_steps.iter().copied().min().unwrap_or(0);
                j.progress_step = j.progress_step.max(watermark);
                // It runs: earlier start failures were passing trouble.
                j.start_failures = 0;
                j.start_failed_workers.clear();
                // Reaching the last step is not the end: the job completes with its result,
                // which needs the final checkpoint committed (see ReportResult).
                ok(format!("progress {step}{dropped}"))
            }
            Command::RecordCheckpoint {
                job,
                step,
                epoch,
                shards,
                durable,
                stall_us,
                retain,
            } => {
                if shards.len() > 65_536 {
                    return no("too many shards");
                }
                if shards
                    .iter()
                    .any(|s| self.too_long(&s.path) || s.sha256.len() > 64)
                {
                    return no("a shard path or checksum is too long");
                }
                // Fenced: only the current job's current epoch may add to the catalog, so
                // a straggling rank 0 of an older plan (or job) cannot list what it wrote.
                let Some(j) = self.job.as_mut() else {
                    return no("no job");
                };
                if *job != j.id {
                    return no(format!("checkpoint of job {job:?}, the job is {:?}", j.id));
                }
                if j.state.is_terminal() {
                    return no(format!("job {} is {}", j.spec.name, j.state.as_str()));
                }
                if j.plan.as_ref().map(|p| p.epoch) != Some(*epoch) {
                    return no(format!("stale epoch {epoch}"));
                }
                if *step > j.spec.steps {
                    return no(format!(
                        "step {step} is past the job's {} steps",
                        j.spec.steps
                    ));
                }
                if let Some(us) = stall_us {
                    j.checkpoint_stall_us.push(*us);
                    if j.checkpoint_stall_us.len() > STALLS_MAX {
                        j.checkpoint_stall_us.remove(0);
                    }
                }
                if let Some(c) = self
                    .checkpoints
                    .iter_mut()
                    .find(|c| c.job == *job && c.step == *step)
                {
                    c.epoch = *epoch;
                    c.shards = shards.clone();
                    c.durable |= *durable;
                } else {
                    self.checkpoints.push_back(CheckpointInfo {
                        job: job.clone(),
                        step: *step,
                        epoch: *epoch,
                        shards: shards.clone(),
                        durable: *durable,
                    });
                }
                // Retention: the job's newest `retain` stay listed; the workers delete the
                // files of whatever the catalog no longer lists.
                if *retain > 0 {
                    let mut mine: Vec<u64> = self
                        .checkpoints
                        .iter()
                        .filter(|c| c.job == *job)
                        .map(|c| c.step)
                        .collect();
                    mine.sort_unstable();
                    let cut = mine.len().saturating_sub(*retain as usize);
                    let dropped: Vec<u64> = mine[..cut].to_vec();
                    self.checkpoints
                        .retain(|c| c.job != *job || !dropped.contains(&c.step));
                }
                while self.checkpoints.len() > self.limits.checkpoints_max {
                    self.checkpoints.pop_front();
                }
                if *durable {
                    self.event(
                        index,
                        EventKind::CheckpointDurable,
                        &format!("step {step}"),
                        format!("{} shards, epoch {epoch}, job {job}", shards.len()),
                    );
                }
                ok(format!("checkpoint at step {step} recorded"))
            }
            Command::ReportCheckpointRefused {
                worker,
                job,
                step,
                reason,
            } => {
                if self.too_long(reason) || self.too_long(job) {
                    return no("reason or job id too long");
                }
                self.event(
                    index,
                    EventKind::CheckpointRefused,
                    &format!("step {step}"),
                    format!("job {job}: {reason} (reported by {worker})"),
                );
                ok("refusal recorded")
            }
        }
    }

    /// Re-run the placement policy after anything that can change it.
    fn plan_epoch(&self) -> Option<u64> {
        self.job.as_ref()?.plan.as_ref().map(|p| p.epoch)
    }

    /// The running plan again under a new epoch (and so a new group id): the same ranks
    /// regroup, each resuming from peers or a checkpoint. `why` goes in the plan's reason.
    pub(crate) fn reissue_epoch(&mut self, index: u64, why: String) {
        let Some(j) = self.job.as_mut() else { return };
        let Some(plan) = j.plan.as_mut() else { return };
        plan.epoch += 1;
        plan.reason = why.clone();
        let (epoch, ranks) = (plan.epoch, plan.ranks.join(", "));
        j.rank_steps = vec![j.progress_step; plan.ranks.len()];
        let name = j.spec.name.clone();
        self.event(
            index,
            EventKind::Plan,
            &name,
            format!("epoch {epoch}: {why}; the same ranks regroup under a new group id [{ranks}]"),
        );
    }

    pub(crate) fn replan(&mut self, index: u64) {
        let Some(job) = &self.job else { return };
        if job.state.is_terminal() {
            return;
        }
        let waiting = job.state == JobState::Waiting;
        let (decision, reason) = place(&job.spec, job.plan.as_ref(), waiting, &self.workers);
        let name = job.spec.name.clone();
        let numerics = job.spec.numerics;
        match decision {
            PlacementDecision::Keep => {}
            PlacementDecision::Wait => {
                let j = self.job.as_mut().expect("checked above");
                if j.state != JobState::Waiting {
                    j.state = JobState::Waiting;
                    self.event(index, EventKind::JobWaiting, &name, reason);
                }
            }
            PlacementDecision::NewPlan { ranks } => {
                let j = self.job.as_mut().expect("checked above");
                let epoch = j.plan.as_ref().map(|p| p.epoch + 1).unwrap_or(1);
                j.rank_steps = vec![j.progress_step; ranks.len()];
                j.plan = Some(Plan {
                    trace: None,
                    epoch,
                    ranks: ranks.clone(),
                    reason: reason.clone(),
                    micro_shares: Vec::new(),
                });
                j.state = JobState::Running;
                for w in self.workers.values_mut() {
                    if ranks.contains(&w.id) {
                        if w.health != WorkerHealth::Healthy {
                            w.health = WorkerHealth::Healthy;
                            w.health_reason = format!("rank in epoch {epoch}");
                        }
                    } else if matches!(w.health, WorkerHealth::Joining | WorkerHealth::Healthy) {
                        w.health = WorkerHealth::Spare;
                        // numerics (issue 7 item 5): say why a worker of another profile waits.
                        w.health_reason = if w.device.numerics != numerics {
                            format!(
                                "numerics profile {}, the job needs {numerics}",
                                w.device.numerics
                            )
                        } else {
                            format!("not needed by epoch {epoch}")
                        };
                    }
                }
                self.event(
                    index,
                    EventKind::Plan,
                    &name,
                    format!("epoch {epoch}: {reason} [{}]", ranks.join(", ")),
                );
            }
        }
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
