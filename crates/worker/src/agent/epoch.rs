//! One plan epoch on one worker: rendezvous, state agreement, the training steps with
//! their checkpoints and checks, and the end of the job.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use phalanx_collective::{BlockingGroup, Cancel, GroupConfig, SilenceWatch};
use phalanx_proto::{Assignment, Command, JobSpec, JobState};
use phalanx_train::data::Corpus;
use phalanx_train::engine::Engine;
use tracing::{info, warn};

use super::{
    corpus_spec, group_id, inject, report_silence, report_start_failure, silence_after, train_spec,
    unix_ms, AgentConfig, Progress, Shared, Slot,
};
use crate::dp::{check_replicas, validation_loss, Stepped, Stepper};
use crate::fault::{Fault, FaultKind};
use crate::job_checkpoints::{
    job_catalog, job_checkpoint_dir, report_refused, CheckpointSource, Checkpointing, Expected,
};
use crate::recovery_trace::{quiet, RecoveryTrace};
use crate::state_sync::sync_state;
use crate::WorkerError;

#[allow(clippy::too_many_arguments)]
pub(super) fn run_epoch(
    cfg: &AgentConfig,
    ring: Option<&Arc<phalanx_collective::RingCredentials>>,
    a: &Assignment,
    rank: usize,
    job: &JobSpec,
    engine_slot: &mut Option<Slot>,
    shared: &Arc<Shared>,
    progress: &mpsc::Sender<Progress>,
    last_step: &mut Option<(Instant, u64)>,
    recovery: &mut RecoveryTrace,
) -> Result<(), WorkerError> {
    let mut phases = recovery.epoch(a.trace.as_ref(), a.epoch, rank);
    let world = a.world_size as usize;
    let peers: Vec<SocketAddr> = a
        .peers
        .iter()
        .map(|p| {
            p.parse()
                .map_err(|e| WorkerError::Protocol(format!("peer address `{p}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    crate::rendezvous::validate_peers(&peers, rank, world, None)?;
    let job_id = a
        .job_id
        .clone()
        .ok_or_else(|| WorkerError::Protocol("the assignment names no job id".into()))?;
    let job_dir = job_checkpoint_dir(&cfg.checkpoint_root, &job_id)?;

    // A new job (or none yet): build its engine. Its state counts as "none" until trained.
    if engine_slot
        .as_ref()
        .map(|sl| sl.job_id != job_id || sl.job != *job)
        .unwrap_or(true)
    {
        let built = (|| -> Result<Engine, WorkerError> {
            let spec = train_spec(job)?;
            let corpus = Corpus::load(&corpus_spec(job))?;
            let (train, val) = corpus.split(spec.val_fraction, spec.model.ctx_len)?;
            Ok(Engine::new(spec, train, val, cfg.torch_device)?)
        })();
        let engine = match built {
            Ok(e) => e,
            Err(e) => {
                // The job cannot start here: the controller hears why (an event; the job
                // fails after a bounded number of such reports), not just this log.
                report_start_failure(cfg, &job_id, a.epoch, &e);
                return Err(e);
            }
        };
        *engine_slot = Some(Slot {
            job_id: job_id.clone(),
            job: job.clone(),
            engine,
            agreed: false,
            peak: None,
        });
    }
    let slot = engine_slot.as_mut().expect("engine built above");
    if rank == 0 && slot.peak.is_none() {
        // Before the rendezvous: on a machine that has not cached it, the CPU's peak is a
        // short microbenchmark on this thread.
        let precision = slot.engine.spec.precision;
        slot.peak = Some(
            phalanx_train::mfu::device_peak(&cfg.device, precision)
                .map_err(|e| warn!(error = %e, "no MFU: the device's peak is unknown"))
                .ok(),
        );
    }
    let peak = slot.peak.clone().flatten();
    let engine = &mut slot.engine;
    let listener = cfg
        .listener
        .try_clone()
        .map_err(|e| WorkerError::Rendezvous(format!("listener: {e}")))?;
    let mut gc = GroupConfig::new(rank, peers);
    gc.group_id = group_id(job, &job_id, a.epoch);
    gc.rendezvous_timeout = cfg.rendezvous_timeout;
    gc.op_timeout = cfg.op_timeout;
    gc.security = Some(crate::rendezvous::epoch_security(a, ring)?);
    // A rank waiting on a dead or hung peer leaves as soon as the controller has moved on.
    let cancel = {
        let (shared, epoch) = (shared.clone(), a.epoch);
        Cancel::new(move || {
            let newest = shared.epoch.load(Ordering::SeqCst);
            if newest > epoch {
                Some(format!("epoch {epoch} superseded by epoch {newest}"))
            } else if shared.partitioned() {
                Some("cut off by a network partition".into())
            } else {
                None
            }
        })
    };
    // A peer that makes no progress is reported at once (see crate::silence): in the
    // rendezvous and in training steps at the step-based threshold; in the state agreement
    // and the final flush, whose legitimate work (reading or writing a checkpoint) is not
    // measured by steps, only at the operation timeout.
    let silence = {
        let (client, id, sh, epoch) = (cfg.client.clone(), cfg.id.clone(), shared.clone(), a.epoch);
        SilenceWatch::new(silence_after(cfg, shared), move |p| {
            report_silence(&client, &id, &sh, epoch, p)
        })
    };
    phases.plan_received();
    let connected = BlockingGroup::connect_with(gc, listener, Some(cancel), Some(silence));
    phases.rendezvous_done(connected.is_ok());
    let mut group = connected?;
    group.set_silence_after(cfg.op_timeout);
    info!(epoch = a.epoch, rank, world, "group formed");
    crate::metrics::plan_epoch(a.epoch);

    // Only a state this worker agreed on with a group (and trained or loaded since) counts;
    // an engine that was merely built holds the seed's initial state, which counts as none,
    // so that if nobody holds state the newest checkpoint wins over step 0.
    let source = sync_state(
        engine,
        &mut group,
        slot.agreed,
        &CheckpointSource {
            dir: job_dir.clone(),
            expect: Expected {
                job_id: job_id.clone(),
                model: job.model.to_string(),
                seed: job.seed,
                numerics: job.numerics.to_string(),
            },
            catalog: &|| job_catalog(&cfg.client, &job_id),
            refused: &|step, reason| report_refused(&cfg.client, &cfg.id, &job_id, step, reason),
        },
        cfg.op_timeout,
    );
    phases.state_agreed(source.as_ref().map_err(|e| e.to_string()));
    let source = source?;
    slot.agreed = true;
    let resume_step = engine.step();
    // Where the epoch resumed is reported after its first step, by every rank that trained
    // before (it can time the interruption) or by rank 0; the first report is kept.
    let mut resume_report = (last_step.is_some() || rank == 0).then_some(source);
    let interrupted_at = *last_step;
    let epoch_began_ms = unix_ms();
    // Training from here: a peer silent for the step-based threshold is reported.
    group.set_silence_after(silence_after(cfg, shared));
    let mut stepper = Stepper::new(engine, &group, &a.micro_shares, cfg.op_timeout)?;
    stepper.grad_check_every = cfg.grad_check_interval;
    let mut writer = Checkpointing::new(job, &job_id, job_dir, world, rank, &shared.disk)?;
    // The step of the last snapshot this epoch took.
    let mut snapped: Option<u64> = None;
    let _ = progress.send(Progress::at(a.epoch, engine.step()));
    // Rank 0 reports the job's throughput and MFU with its progress.
    let mut rate = phalanx_train::mfu::StepRate::new(Duration::from_secs(1));

    while engine.step() < engine.spec.steps {
        if shared.epoch.load(Ordering::SeqCst) > a.epoch {
            return Err(WorkerError::Superseded { epoch: a.epoch });
        }
        if shared.partitioned() {
            return Err(WorkerError::Rendezvous(
                "cut off by a network partition".into(),
            ));
        }
        let pending: Vec<Fault> =
            std::mem::take(&mut *shared.faults.lock().unwrap_or_else(|p| p.into_inner()));
        for f in pending {
            if f.kind == FaultKind::SdcGrad {
                stepper.corrupt_next_checked_grad = true;
            } else {
                inject(cfg, engine, &f)?;
            }
        }
        if cfg.sdc_check_interval > 0 && engine.step() % cfg.sdc_check_interval == 0 {
            check_replicas(engine, &mut group, cfg.op_timeout)?;
        }
        let slow = *shared.slow.lock().unwrap_or_else(|p| p.into_inner());
        stepper.slow_factor = match slow {
            Some((factor, until)) if Instant::now() < until => factor,
            _ => 1.0,
        };
        let report =
            match stepper.step_or_redo(engine, &mut group, &mut || writer.snaps.release())? {
                Stepped::Done(r) => r,
                Stepped::Redo(m) => {
                    let cmd = Command::ReportGradientMismatch {
                        worker: cfg.id.clone(),
                        epoch: a.epoch,
                        step: m.step,
                        micro: m.micro as u64,
                        owner_rank: m.owner as u32,
                        verifier_rank: m.verifier as u32,
                    };
                    let id = format!("gradcheck-{}-{}-{}", job.name, a.epoch, m.step);
                    if let Err(e) = cfg.client.command_with_id(id, cmd) {
                        warn!(error = %e, "reporting the gradient mismatch failed");
                    }
                    continue;
                }
            };
        // The resume point first: its steps redone are counted against the watermark
        // before this epoch's own progress moves it.
        let resume_span = phases.first_step(report.step + 1);
        if let Some((source_kind, source)) = resume_report.take() {
            let _in_trace = resume_span.as_ref().map(|s| s.enter());
            let cmd = Command::ReportResume {
                worker: cfg.id.clone(),
                epoch: a.epoch,
                step: resume_step,
                source,
                source_kind: Some(source_kind),
                steps_redone: interrupted_at
                    .map(|(_, s)| s.saturating_sub(resume_step))
                    .unwrap_or(0),
                mttr_ms: interrupted_at.map(|(t, _)| t.elapsed().as_millis() as u64),
                at_ms: Some(epoch_began_ms),
            };
            if let Err(e) = cfg
                .client
                .command_with_id(format!("resume-{}-{}-{}", job.name, a.epoch, cfg.id), cmd)
            {
                warn!(error = %e, "reporting the resume point failed");
            }
        }
        let throughput = (rank == 0)
            .then(|| {
                let (model, tokens) = (&engine.spec.model, engine.spec.tokens_per_step());
                rate.on_step(
                    Instant::now(),
                    report.step + 1,
                    model,
                    tokens,
                    world,
                    peak.as_ref(),
                )
            })
            .flatten();
        let _ = progress.send(Progress {
            throughput,
            loss_millionths: phalanx_core::history::loss_millionths(report.loss),
            // The window's median, as the heartbeats (and the straggler policy) see it.
            compute_us: shared
                .compute
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .median()
                .map(|ms| (ms * 1e3).round() as u64),
            ..Progress::at(a.epoch, report.step + 1)
        });
        crate::metrics::step(&report, engine.spec.tokens_per_step());
        let now = Instant::now();
        *last_step = Some((now, report.step + 1));
        shared.step.store(report.step + 2, Ordering::SeqCst);
        shared.stepped(now);
        shared
            .step_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(report.step_ms);
        group.set_silence_after(silence_after(cfg, shared));
        shared
            .compute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(report.compute_ms);
        if rank == 0 {
            info!(
                epoch = a.epoch,
                step = report.step + 1,
                loss = report.loss,
                ms = report.step_ms,
                "step"
            );
        }
        if job.checkpoint_interval_steps > 0 && engine.step() % job.checkpoint_interval_steps == 0 {
            writer.snapshot(engine);
            snapped = Some(engine.step());
        }
        writer.commit_ready(engine, &mut group, a.epoch, cfg)?;
    }
    // The trained model is never lost: the final step is always checkpointed, and the
    // result (which completes the job) waits until the controller has committed it. The
    // assignment's resume step is the job's newest committed checkpoint.
    let last = engine.spec.steps;
    let final_step = (a.resume_step < last).then_some(last);
    if final_step.is_some() && snapped != Some(last) {
        writer.take_final(engine);
    }
    group.set_silence_after(cfg.op_timeout);
    writer.flush(engine, &mut group, a.epoch, cfg, final_step)?;
    let val = validation_loss(engine, &mut group, cfg.op_timeout)?;
    let sha = check_replicas(engine, &mut group, cfg.op_timeout)?;
    info!(epoch = a.epoch, rank, val_loss = val, params_sha256 = %sha, "job finished");
    if rank == 0 {
        let cmd = Command::ReportResult {
            worker: cfg.id.clone(),
            epoch: a.epoch,
            params_sha256: sha.clone(),
            finished_at_ms: Some(unix_ms()),
        };
        if let Err(e) = cfg.client.command(cmd) {
            warn!(error = %e, "reporting the result failed");
        }
    }
    let _ = progress.send(Progress::at(a.epoch, engine.step()));
    // Wait for the controller to see the end, so that we do not retrain a finished job.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let polled = quiet("assignment").in_scope(|| {
            cfg.client
                .get::<Assignment>(&format!("/v1/assignment/{}", cfg.id))
        });
        match polled {
            Ok(now) if now.job_state != Some(JobState::Running) || now.epoch != a.epoch => {
                return Ok(())
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}
