//! A job's checkpoints, as the worker agent writes and reads them.
//!
//! - **They belong to a job.** Each job writes under `<checkpoint root>/<job id>/`, and
//!   every manifest names the job, the model, the seed and the parameter count; a loader
//!   refuses (and reports, as a `checkpoint_refused` event) any that does not match.
//! - **They exist once the controller says so.** Rank 0 writes the manifest, then records
//!   the checkpoint through Raft (fenced by job and plan epoch). The Raft-committed
//!   catalog is the source of truth: a manifest on disk that it does not list is never
//!   loaded, and files of steps it no longer lists are deleted (retention follows the
//!   catalog, which keeps the job's newest `--checkpoint-retain`).
//! - **Every rank restores the same one.** Rank 0 picks the newest catalogued checkpoint
//!   that verifies and tells the others through the group, so no rank can pick another
//!   step because the catalog changed between two reads.
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use phalanx_checkpoint::{
    self as ckpt, AsyncCheckpointer, CheckpointEvent, CheckpointerConfig, Manifest, ShardRecord,
};
use phalanx_collective::BlockingGroup;
use phalanx_controller::client::{new_request_id, Client};
use phalanx_proto::{CheckpointInfo, Command, JobSpec, StateSource};
use phalanx_train::engine::Engine;
use phalanx_train::optim::AdamWState;

use crate::state_sync::Origin;
use tracing::{info, warn};

use crate::agent::AgentConfig;
use crate::snapshot::Snapshots;
use crate::WorkerError;

/// `<root>/<job id>`: a job's own checkpoint directory. The id is the job's name (letters,
/// digits, `-`, `_`, `.`, validated at submission) and its submission index; anything
/// else is refused rather than joined into a path.
pub fn job_checkpoint_dir(root: &Path, job_id: &str) -> Result<PathBuf, WorkerError> {
    // One rule, in phalanx-core, shared with the control-plane binary.
    phalanx_core::job_checkpoint_dir(root, job_id).map_err(WorkerError::Protocol)
}

/// What a checkpoint of this job must say about itself.
#[derive(Debug, Clone)]
pub struct Expected {
    pub job_id: String,
    pub model: String,
    pub seed: u64,
    /// The job's numerics profile: its checkpoints were computed under it.
    pub numerics: String,
}

/// Where an epoch may restore a checkpoint from.
pub struct CheckpointSource<'a> {
    /// The job's checkpoint directory.
    pub dir: PathBuf,
    pub expect: Expected,
    /// The steps of the job's durable checkpoints in the controller's catalog (asked by
    /// rank 0 only).
    pub catalog: &'a dyn Fn() -> Result<Vec<u64>, WorkerError>,
    /// Tells the controller that a catalogued checkpoint was refused, and why.
    pub refused: &'a dyn Fn(u64, &str),
}

/// Why a manifest does not belong to this job (None: it does).
pub fn manifest_mismatch(m: &Manifest, want: &Expected, param_count: usize) -> Option<String> {
    if m.job != want.job_id {
        Some(format!(
            "written by job {:?}, this is job {:?}",
            m.job, want.job_id
        ))
    } else if m.model != want.model {
        Some(format!(
            "model {:?}, the job trains {:?}",
            m.model, want.model
        ))
    } else if m.numerics != want.numerics {
        Some(format!(
            "numerics profile {:?}, the job runs under {:?}",
            m.numerics, want.numerics
        ))
    } else if m.seed != want.seed {
        Some(format!("seed {}, the job's is {}", m.seed, want.seed))
    } else if m.param_count != param_count {
        Some(format!(
            "{} parameters, the model has {param_count}",
            m.param_count
        ))
    } else {
        None
    }
}

/// Rank 0's choice: the newest catalogued checkpoint that belongs to the job and verifies.
fn choose(src: &CheckpointSource<'_>, param_count: usize) -> Result<Option<u64>, WorkerError> {
    let mut steps = (src.catalog)()?;
    steps.sort_unstable_by(|a, b| b.cmp(a));
    for step in steps {
        let problem = match ckpt::read_manifest(&src.dir, step) {
            Err(e) => Some(format!("manifest unreadable: {e}")),
            Ok(m) => manifest_mismatch(&m, &src.expect, param_count).or_else(|| {
                let report = ckpt::verify(&src.dir, step);
                (!report.is_valid()).then(|| {
                    let problems: Vec<String> =
                        report.problems.iter().map(|p| p.to_string()).collect();
                    format!("corrupt: {}", problems.join("; "))
                })
            }),
        };
        match problem {
            None => return Ok(Some(step)),
            Some(reason) => {
                warn!(step, %reason, "refusing a catalogued checkpoint");
                (src.refused)(step, &reason);
            }
        }
    }
    Ok(None)
}

/// Nobody can serve the state: every rank restores the checkpoint rank 0 chose (the
/// newest catalogued one that verifies), or the seed's initial state when there is none.
pub fn load_from_checkpoint(
    engine: &mut Engine,
    group: &mut BlockingGroup,
    src: &CheckpointSource<'_>,
    timeout: Duration,
) -> Result<Origin, WorkerError> {
    let (world, rank) = (group.world(), group.rank());
    let mine = if rank == 0 {
        match choose(src, engine.params.len())? {
            Some(step) => [&[1u8][..], &step.to_le_bytes()].concat(),
            None => vec![0u8],
        }
    } else {
        Vec::new()
    };
    let all = group.all_gather_within(&mine, timeout)?;
    let chosen = match all[0].as_slice() {
        [0] => None,
        [1, rest @ ..] if rest.len() == 8 => {
            Some(u64::from_le_bytes(rest.try_into().expect("8 bytes")))
        }
        other => {
            return Err(WorkerError::Protocol(format!(
                "rank 0's checkpoint choice of {} bytes",
                other.len()
            )))
        }
    };
    let (own, buddy) = engine.shard_ranges(world, rank);
    let Some(step) = chosen else {
        engine.reset_to_initial()?;
        engine.zero_shards(world, rank)?;
        return Ok((StateSource::Initial, "the seed's initial state".into()));
    };
    let ck = |e: ckpt::CheckpointError| WorkerError::Checkpoint(e.to_string());
    let load = |range: Range<usize>| ckpt::load_range(&src.dir, step, range).map_err(ck);
    let st = load(own)?;
    let b = buddy.map(load).transpose()?;
    let own_shard = AdamWState {
        range: st.range.clone(),
        m: st.m.into(),
        v: st.v.into(),
        step: st.opt_step,
    };
    engine.load_params(st.opt_step, st.params)?;
    let buddy_shard = b.map(|l| AdamWState {
        range: l.range,
        m: l.m.into(),
        v: l.v.into(),
        step: l.opt_step,
    });
    engine.set_shards(own_shard, buddy_shard)?;
    info!(
        step,
        "state loaded from checkpoint (no survivor could serve it)"
    );
    Ok((StateSource::Checkpoint, format!("checkpoint step {step}")))
}

/// The controller's catalog entries of `job_id` that are durable, as steps.
pub fn job_catalog(client: &Client, job_id: &str) -> Result<Vec<u64>, WorkerError> {
    let all: Vec<CheckpointInfo> = client
        .get("/v1/checkpoints")
        .map_err(|e| WorkerError::Controller(e.to_string()))?;
    Ok(catalogued_steps(&all, job_id))
}

fn catalogued_steps(all: &[CheckpointInfo], job_id: &str) -> Vec<u64> {
    all.iter()
        .filter(|c| c.durable && c.job == job_id)
        .map(|c| c.step)
        .collect()
}

pub fn report_refused(client: &Client, me: &str, job_id: &str, step: u64, reason: &str) {
    let cmd = Command::ReportCheckpointRefused {
        worker: me.to_string(),
        job: job_id.to_string(),
        step,
        reason: reason.chars().take(400).collect(),
    };
    if let Err(e) = client.command_with_id(new_request_id(&format!("refused-{me}-{step}")), cmd) {
        warn!(error = %e, "reporting a refused checkpoint failed");
    }
}

/// Steps on disk that retention deletes: older than the newest catalogued one and no
/// longer (or never) in the catalog. Newer ones may still be in flight.
pub fn unlisted_steps(on_disk: &[u64], listed: &[u64]) -> Vec<u64> {
    let Some(newest) = listed.iter().copied().max() else {
        return Vec::new();
    };
    on_disk
        .iter()
        .copied()
        .filter(|s| *s < newest && !listed.contains(s))
        .collect()
}

/// The rank's asynchronous checkpointing for one epoch. Rank 0 commits a checkpoint's
/// manifest once every rank's shard is durable (learned through a small all-gather at a
/// step boundary) and records it in the controller through Raft.
pub struct Checkpointing {
    pub snaps: Snapshots,
    events: mpsc::Receiver<CheckpointEvent>,
    /// This rank's shards that became durable since the last exchange.
    durable: Vec<ShardRecord>,
    /// The job's checkpoint directory.
    root: PathBuf,
    job_id: String,
    model: String,
    numerics: String,
    world: usize,
    seed: u64,
    /// Steps rank 0 recorded in the catalog this epoch.
    recorded: Vec<u64>,
    /// Rank 0: the durable shard records received per step, until every rank's is in.
    /// Ranks finish their writes at different steps (one behind on a loaded machine), so
    /// a step's records can arrive over several exchanges.
    pending: ShardSets,
    /// Each checkpoint as one trace.
    traces: crate::checkpoint_trace::CheckpointTraces,
}

impl Checkpointing {
    pub fn new(
        job: &JobSpec,
        job_id: &str,
        root: PathBuf,
        world: usize,
        rank: usize,
        disk: &ckpt::FaultInjector,
    ) -> Result<Self, WorkerError> {
        let mut c = CheckpointerConfig::new(root.clone(), world, rank);
        c.fault = Some(disk.clone());
        let (writer, events) =
            AsyncCheckpointer::spawn(c).map_err(|e| WorkerError::Checkpoint(e.to_string()))?;
        Ok(Self {
            snaps: Snapshots::new(writer, job.seed),
            events,
            durable: Vec::new(),
            root,
            job_id: job_id.to_string(),
            model: job.model.to_string(),
            numerics: job.numerics.to_string(),
            world,
            seed: job.seed,
            recorded: Vec::new(),
            pending: ShardSets::default(),
            traces: crate::checkpoint_trace::CheckpointTraces::new(rank),
        })
    }

    /// Takes the snapshot of the engine's current step (see [`Snapshots::take`]).
    pub fn snapshot(&mut self, engine: &Engine) {
        let start = std::time::SystemTime::now();
        self.snaps.take(engine);
        self.traces
            .snapshot(engine.step(), start, std::time::SystemTime::now());
    }

    /// The final step's snapshot: waits (bounded) for earlier snapshots so that the writer
    /// does not refuse it as busy.
    pub fn take_final(&mut self, engine: &Engine) {
        if !self.snaps.writer().wait_idle(Duration::from_secs(30)) {
            warn!("checkpoint writes still pending after 30 s");
        }
        self.snapshot(engine);
    }

    /// Waits (bounded) for this rank's queued snapshots, then commits what is complete.
    /// With `final_step`, every rank then learns from rank 0 whether that step is in the
    /// catalog, and the epoch fails (to be retried) when it is not.
    pub fn flush(
        &mut self,
        engine: &Engine,
        group: &mut BlockingGroup,
        epoch: u64,
        cfg: &AgentConfig,
        final_step: Option<u64>,
    ) -> Result<(), WorkerError> {
        if !self.snaps.writer().wait_idle(Duration::from_secs(30)) {
            warn!("checkpoint writes still pending after 30 s");
        }
        self.commit_ready(engine, group, epoch, cfg)?;
        if !self.pending.0.is_empty() {
            let steps: Vec<&u64> = self.pending.0.keys().collect();
            warn!(
                ?steps,
                "checkpoint shard sets still incomplete at the epoch's end; not committed"
            );
        }
        let Some(last) = final_step else {
            return Ok(());
        };
        let mine = [u8::from(group.rank() == 0 && self.recorded.contains(&last))];
        let all = group.all_gather_within(&mine, cfg.op_timeout)?;
        if all[0].first() != Some(&1) {
            return Err(WorkerError::Checkpoint(format!(
                "the final checkpoint (step {last}) was not committed by the controller"
            )));
        }
        Ok(())
    }

    /// Drains writer events; when some rank has a durable shard, ranks exchange their
    /// newest durable shard records and rank 0 commits every step all ranks hold.
    pub fn commit_ready(
        &mut self,
        engine: &Engine,
        group: &mut BlockingGroup,
        epoch: u64,
        cfg: &AgentConfig,
    ) -> Result<(), WorkerError> {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                CheckpointEvent::Durable {
                    step,
                    shard,
                    write_ms,
                    times,
                    ..
                } => {
                    crate::metrics::checkpoint_durable(write_ms, self.snaps.stall(step));
                    self.traces.durable(step, write_ms, times);
                    self.durable.push(shard)
                }
                CheckpointEvent::Failed {
                    step,
                    error,
                    attempt,
                    ..
                } => warn!(step, attempt, %error, "checkpoint write failed"),
                CheckpointEvent::GaveUp { step, error, .. } => {
                    warn!(step, %error, "checkpoint given up")
                }
                _ => {}
            }
        }
        let mine = std::mem::take(&mut self.durable);
        let any_local = u8::from(!mine.is_empty());
        let flags = group.all_gather_within(&[any_local], cfg.op_timeout)?;
        if flags.iter().all(|f| f.first() == Some(&0)) {
            return Ok(());
        }
        let exchange = crate::checkpoint_trace::Exchange {
            shards: mine,
            traces: self.traces.roots(),
        };
        let body =
            serde_json::to_vec(&exchange).map_err(|e| WorkerError::Protocol(e.to_string()))?;
        let all = group.all_gather_within(&body, cfg.op_timeout)?;
        let parts = all
            .iter()
            .map(|part| {
                serde_json::from_slice::<crate::checkpoint_trace::Exchange>(part)
                    .map_err(|e| WorkerError::Protocol(format!("shard records: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if group.rank() != 0 {
            if let Some(rank0) = parts.first() {
                self.traces.adopt(&rank0.traces);
            }
            return Ok(());
        }
        for part in parts {
            self.pending.add(part.shards);
        }
        for (step, shards) in self.pending.complete(self.world) {
            let span = self.traces.commit_span(step);
            let outcome = span.in_scope(|| self.commit_one(engine, step, shards, epoch, cfg));
            let recorded = self.recorded.contains(&step);
            self.traces.committed(
                step,
                if recorded {
                    "committed"
                } else {
                    "not committed"
                },
            );
            outcome?;
        }
        Ok(())
    }

    /// Rank 0: writes the manifest of `step`, records it in the catalog, and deletes what
    /// the catalog no longer lists.
    fn commit_one(
        &mut self,
        engine: &Engine,
        step: u64,
        shards: Vec<ShardRecord>,
        epoch: u64,
        cfg: &AgentConfig,
    ) -> Result<(), WorkerError> {
        let spec = ckpt::ManifestSpec {
            job: self.job_id.clone(),
            model: self.model.clone(),
            numerics: self.numerics.clone(),
            step,
            world: self.world,
            param_count: engine.params.len(),
            seed: self.seed,
            layout: Vec::new(),
            params_sha256: None,
        };
        let manifest = ckpt::commit_manifest(&self.root, &spec, shards)
            .map_err(|e| WorkerError::Checkpoint(e.to_string()))?;
        let recorded = manifest
            .shards
            .iter()
            .map(|s| phalanx_proto::CheckpointShard {
                rank: s.rank as u32,
                path: format!("{}/{}/{}", self.job_id, ckpt::step_dir_name(step), s.file),
                bytes: s.bytes,
                sha256: s.sha256.clone(),
            })
            .collect();
        let stall_us = self.snaps.take_stall(step).map(|d| d.as_micros() as u64);
        let cmd = Command::RecordCheckpoint {
            job: self.job_id.clone(),
            step,
            epoch,
            shards: recorded,
            durable: true,
            stall_us,
            retain: cfg.checkpoint_retain.min(u32::MAX as usize) as u32,
        };
        let id = new_request_id(&format!("ckpt-{}-{step}-{epoch}", self.job_id));
        match cfg.client.command_with_id(id, cmd) {
            Ok(out) if out.outcome.is_applied() => {
                self.recorded.push(step);
                info!(step, "checkpoint committed");
            }
            // Not in the catalog, so it does not exist: never loaded, deleted by retention.
            Ok(out) => {
                warn!(step, reason = %out.outcome.message(), "the controller refused the checkpoint")
            }
            Err(e) => warn!(step, error = %e, "recording the checkpoint in the controller failed"),
        }
        self.prune(cfg);
        Ok(())
    }

    /// Retention follows the catalog: the files of steps it no longer lists go.
    fn prune(&self, cfg: &AgentConfig) {
        let listed = match job_catalog(&cfg.client, &self.job_id) {
            Ok(l) => l,
            Err(e) => return warn!(error = %e, "reading the catalog for retention failed"),
        };
        let on_disk: Vec<u64> = match ckpt::scan(&self.root) {
            Ok(entries) => entries.iter().map(|e| e.step).collect(),
            Err(e) => return warn!(error = %e, "scanning the checkpoint directory failed"),
        };
        for step in unlisted_steps(&on_disk, &listed) {
            let dir = ckpt::step_dir(&self.root, step);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => info!(step, "checkpoint deleted (no longer in the catalog)"),
                Err(e) => warn!(step, error = %e, "deleting an uncatalogued checkpoint failed"),
            }
        }
    }
}

/// Rank 0's durable shard records per step, gathered over the exchanges of an epoch.
#[derive(Debug, Default)]
struct ShardSets(std::collections::BTreeMap<u64, Vec<ShardRecord>>);

impl ShardSets {
    /// Adds records; a rank's newer record of a step replaces its older one.
    fn add(&mut self, records: Vec<ShardRecord>) {
        for r in records {
            let set = self.0.entry(r.step).or_default();
            set.retain(|x| x.rank != r.rank);
            set.push(r);
        }
    }

    /// Takes the steps every one of `world` ranks has a record of, oldest first. An
    /// incomplete step older than a complete one is dropped with a warning: its missing
    /// shard's write failed or was given up, and a newer checkpoint supersedes it.
    fn complete(&mut self, world: usize) -> Vec<(u64, Vec<ShardRecord>)> {
        let done: Vec<u64> = self
            .0
            .iter()
            .filter(|(_, set)| set.len() == world)
            .map(|(s, _)| *s)
            .collect();
        if let Some(&newest) = done.last() {
            for (step, set) in self.0.range(..newest) {
                if set.len() != world {
                    warn!(
                        step,
                        have = set.len(),
                        world,
                        "incomplete checkpoint shard set superseded by step {newest}; not committed"
                    );
                }
            }
            self.0.retain(|s, set| *s > newest || set.len() == world);
        }
        done.into_iter()
            .map(|s| (s, self.0.remove(&s).expect("listed above")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(job: &str, model: &str, seed: u64, params: usize) -> Manifest {
        Manifest {
            format_version: 1,
            job: job.into(),
            model: model.into(),
            numerics: "x86-64-avx2".into(),
            step: 20,
            world: 1,
            param_count: params,
            seed,
            layout: vec![],
            params_sha256: None,
            shards: vec![],
        }
    }

    #[test]
    fn a_manifest_of_another_job_model_seed_or_size_is_refused() {
        let want = Expected {
            job_id: "a-5".into(),
            model: "tiny".into(),
            seed: 7,
            numerics: "x86-64-avx2".into(),
        };
        assert_eq!(
            manifest_mismatch(&manifest("a-5", "tiny", 7, 100), &want, 100),
            None
        );
        let mut native = manifest("a-5", "tiny", 7, 100);
        native.numerics = "native".into();
        assert!(manifest_mismatch(&native, &want, 100)
            .unwrap()
            .contains("numerics"));
        for (m, what) in [
            (manifest("a-3", "tiny", 7, 100), "written by job"),
            (manifest("", "tiny", 7, 100), "written by job"),
            (manifest("a-5", "small", 7, 100), "model"),
            (manifest("a-5", "tiny", 8, 100), "seed"),
            (manifest("a-5", "tiny", 7, 99), "parameters"),
        ] {
            let why = manifest_mismatch(&m, &want, 100).expect(what);
            assert!(why.contains(what), "{why}");
        }
    }

    fn rec(step: u64, rank: usize) -> ShardRecord {
        ShardRecord {
            file: format!("shard-{rank}-of-3.bin"),
            rank,
            world: 3,
            step,
            range: 0..1,
            bytes: 1,
            sha256: String::new(),
            params_section_sha256: String::new(),
        }
    }

    #[test]
    fn a_step_whose_shards_arrive_over_several_exchanges_is_committed() {
        let mut sets = ShardSets::default();
        // Rank 2's write of step 40 finishes a step later than the others'.
        sets.add(vec![rec(40, 0), rec(40, 1)]);
        assert!(sets.complete(3).is_empty());
        sets.add(vec![rec(40, 2)]);
        let done = sets.complete(3);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].0, done[0].1.len()), (40, 3));
        // A rank's record sent twice counts once.
        sets.add(vec![rec(60, 0), rec(60, 0), rec(60, 1)]);
        assert!(sets.complete(3).is_empty());
        // Step 60 never completes (rank 2 gave up); step 80 does and supersedes it.
        sets.add(vec![rec(80, 0), rec(80, 1), rec(80, 2), rec(100, 1)]);
        let done: Vec<u64> = sets.complete(3).into_iter().map(|d| d.0).collect();
        assert_eq!(done, vec![80]);
        assert_eq!(sets.0.keys().copied().collect::<Vec<_>>(), vec![100]);
    }

    #[test]
    fn only_durable_entries_of_the_job_count_and_retention_spares_newer_steps() {
        let info = |job: &str, step, durable| CheckpointInfo {
            job: job.into(),
            step,
            epoch: 1,
            shards: vec![],
            durable,
        };
        let all = [
            info("a-1", 20, true),
            info("b-9", 40, true),
            info("a-1", 30, false),
            info("a-1", 40, true),
        ];
        assert_eq!(catalogued_steps(&all, "a-1"), vec![20, 40]);
        // 10 was dropped from the catalog, 25 was never recorded, 60 is in flight.
        assert_eq!(
            unlisted_steps(&[10, 20, 25, 40, 60], &[20, 40]),
            vec![10, 25]
        );
        assert!(unlisted_steps(&[10, 20], &[]).is_empty());
    }

    #[test]
    fn job_ids_that_are_not_plain_names_are_refused_as_directories() {
        let root = Path::new("/ck");
        assert_eq!(
            job_checkpoint_dir(root, "run.1-12").unwrap(),
            root.join("run.1-12")
        );
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(job_checkpoint_dir(root, bad).is_err(), "{bad:?}");
        }
    }
}
