//! The discrete-event simulation: a heap of events in virtual time (ms), the job's
//! progress as full-speed seconds, and the policy's reaction to each failure. Memory is
//! bounded by the number of failures, never by the number of steps: a step is no event.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{CheckpointMode, PolicyKind, SimFile};
use crate::detect::DetectionTable;
use crate::failures::{info, Cause, Rates, Symptom};
use crate::model::Job;

mod policies;

/// Where lost GPU time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lost {
    /// Between a failure and its detection.
    Detection,
    /// Restarting the job, or moving to a new plan (state transfer included).
    Recovery,
    /// Work done since the state that training resumed from (redone).
    Redo,
    /// Training blocked by checkpoint writes.
    Checkpoint,
    /// Planned maintenance.
    Planned,
    /// Running on fewer replicas (elastic shrink).
    Degraded,
    /// Running at a straggler's pace.
    Straggler,
}

impl Lost {
    pub const ALL: [Lost; 7] = [
        Lost::Detection,
        Lost::Recovery,
        Lost::Redo,
        Lost::Checkpoint,
        Lost::Planned,
        Lost::Degraded,
        Lost::Straggler,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Lost::Detection => "detection",
            Lost::Recovery => "recovery/restart",
            Lost::Redo => "redone work",
            Lost::Checkpoint => "checkpoint stalls",
            Lost::Planned => "planned maintenance",
            Lost::Degraded => "shrunk (fewer replicas)",
            Lost::Straggler => "straggler slow-down",
        }
    }
}

/// One failure, for the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    pub t_h: f64,
    pub cause: Cause,
    /// Whether training stopped (every failure does under the restart policy).
    pub interrupted: bool,
    /// How it was handled.
    pub path: &'static str,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub name: String,
    pub policy: PolicyKind,
    pub seed: u64,
    pub days: f64,
    pub gpus: u64,
    pub step_s: f64,
    pub mfu: f64,
    pub checkpoint_interval_min: f64,
    pub daly_interval_min: f64,
    pub checkpoint_write_s: f64,
    pub failures: u64,
    pub interruptions: u64,
    pub failures_by_cause: BTreeMap<Cause, u64>,
    pub interruptions_by_cause: BTreeMap<Cause, u64>,
    pub planned: u64,
    pub mtbf_h: f64,
    pub lost_gpu_h: BTreeMap<Lost, f64>,
    pub effective_training_time: f64,
    pub goodput_tokens_per_s: f64,
    pub checkpoints: u64,
    pub checkpoint_restores: u64,
    pub shrinks: u64,
    pub spares_min: u64,
    pub events: u64,
    /// Progress (effective training time so far) over the run, for the timeline.
    pub samples: Vec<(f64, f64, f64)>,
    pub incidents: Vec<Incident>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Failure,
    Planned,
    CheckpointDue { token: u64 },
    SegmentEnd { token: u64 },
    CheckpointDurable { gen: u64, index: u64 },
    Repaired,
    Sample,
    End,
}

/// A stretch of time during which training runs at `rate` of its capacity (0: stopped).
#[derive(Debug, Clone, Copy)]
struct Segment {
    why: Lost,
    dur_ms: u64,
    rate: f64,
    then: Then,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    Nothing,
    /// A synchronous checkpoint is durable at the segment's end (training is stopped
    /// during it, so the progress it holds is the progress at its end).
    Durable,
    /// An asynchronous write of the progress at the segment's end starts then.
    StartWrite,
    /// Roll back to the durable checkpoint (the job died; it resumes from storage).
    Rollback,
}

pub const SAMPLES: u64 = 500;
pub const INCIDENTS_MAX: usize = 200_000;

struct Sim<'a> {
    f: &'a SimFile,
    job: &'a Job,
    rates: Rates,
    table: DetectionTable,
    policy: PolicyKind,
    now: u64,
    end: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    events: u64,
    rng_fail: ChaCha8Rng,
    rng: ChaCha8Rng,
    // Progress, in full-speed seconds, and its accounting.
    progress: f64,
    last: u64,
    lost: BTreeMap<Lost, f64>,
    // The current segment and what follows it.
    segment: Option<Segment>,
    queue: VecDeque<Segment>,
    token: u64,
    // Checkpoints.
    interval_ms: u64,
    durable: f64,
    writes: BTreeMap<u64, f64>,
    gen: u64,
    checkpoints: u64,
    restores: u64,
    ckpt_due: bool,
    ckpt_token: u64,
    ckpt_rearm: bool,
    // Capacity (Phalanx): data-parallel replicas running, and hot spares.
    active_dp: u64,
    spares: u64,
    spares_min: u64,
    shrinks: u64,
    // Counts.
    failures_by_cause: BTreeMap<Cause, u64>,
    interruptions_by_cause: BTreeMap<Cause, u64>,
    planned: u64,
    samples: Vec<(f64, f64, f64)>,
    incidents: Vec<Incident>,
}

/// Young/Daly's optimum checkpoint interval, s: √(2δ(M+R)) (Daly 2006, first order;
/// Young 1974 without R).
pub fn daly_interval_s(delta_s: f64, mtbf_s: f64, restart_s: f64) -> f64 {
    (2.0 * delta_s * (mtbf_s + restart_s)).sqrt()
}

/// The restart policy's time from a failure to training again, on average over causes
/// (detection, restart, checkpoint load): Daly's R.
pub fn restart_mean_s(f: &SimFile, job: &Job, rates: &Rates) -> f64 {
    if rates.total_per_s <= 0.0 {
        return 0.0;
    }
    let mut detect = 0.0;
    for (c, r) in &rates.per_cause {
        detect += r * restart_detect_s(f, *c);
    }
    detect / rates.total_per_s + f.policy.restart.restart_s + job.checkpoint_write_s
}

fn restart_detect_s(f: &SimFile, c: Cause) -> f64 {
    let t = &f.policy.restart;
    match info(c).symptom {
        Symptom::Hang | Symptom::CollectiveHang => t.hang_detect_s,
        Symptom::Straggler => t.straggler_detect_s,
        _ => t.crash_detect_s,
    }
}

/// The checkpoint interval a run uses, s: the file's, or Daly's optimum for its policy's
/// failure rate (Phalanx falls back to a checkpoint only when survivors cannot cover the
/// state, far rarer than a failure; its interval then uses the restart policy's rate).
pub fn checkpoint_interval_s(f: &SimFile, job: &Job) -> (f64, f64) {
    let rates = Rates::new(&f.failures, f.hardware.gpus);
    let delta = job.checkpoint_write_s
        * match f.checkpoint.mode {
            CheckpointMode::Sync => 1.0,
            CheckpointMode::Async => f.checkpoint.async_blocking_fraction.max(1e-6),
        };
    let daly = daly_interval_s(delta, rates.mtbf_s(), restart_mean_s(f, job, &rates));
    let daly = if daly.is_finite() {
        daly.max(6.0)
    } else {
        86_400.0
    };
    // An asynchronous write must end before the next one starts.
    let daly = match f.checkpoint.mode {
        CheckpointMode::Sync => daly,
        CheckpointMode::Async => daly.max(job.checkpoint_write_s),
    };
    let chosen = f.checkpoint.interval_min.map_or(daly, |m| m * 60.0);
    (chosen, daly)
}

/// Run one simulation.
pub fn run(f: &SimFile, job: &Job, seed: u64) -> Outcome {
    let rates = Rates::new(&f.failures, f.hardware.gpus);
    let table = DetectionTable::build(&f.policy.phalanx, f.failures.straggler_factor);
    let (interval_s, daly_s) = checkpoint_interval_s(f, job);
    let end = (f.days * 86_400_000.0) as u64;
    let mut rng_fail = ChaCha8Rng::seed_from_u64(seed);
    rng_fail.set_stream(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    let mut s = Sim {
        f,
        job,
        rates,
        table,
        policy: f.policy.kind,
        now: 0,
        end,
        heap: BinaryHeap::new(),
        seq: 0,
        events: 0,
        rng_fail,
        rng,
        progress: 0.0,
        last: 0,
        lost: Lost::ALL.iter().map(|l| (*l, 0.0)).collect(),
        segment: None,
        queue: VecDeque::new(),
        token: 0,
        interval_ms: ((interval_s * 1000.0) as u64).max(1),
        durable: 0.0,
        writes: BTreeMap::new(),
        gen: 0,
        checkpoints: 0,
        restores: 0,
        ckpt_due: false,
        ckpt_token: 0,
        ckpt_rearm: false,
        active_dp: job.dp,
        spares: f.policy.spare_hosts,
        spares_min: f.policy.spare_hosts,
        shrinks: 0,
        failures_by_cause: BTreeMap::new(),
        interruptions_by_cause: BTreeMap::new(),
        planned: 0,
        samples: Vec::new(),
        incidents: Vec::new(),
    };
    s.schedule_failure();
    s.schedule_planned();
    s.arm_checkpoint();
    for k in 1..=SAMPLES {
        s.push(end * k / SAMPLES, Ev::Sample);
    }
    s.push(end, Ev::End);
    while let Some(Reverse((t, _, ev))) = s.heap.pop() {
        s.events += 1;
        s.advance(t);
        if ev == Ev::End {
            break;
        }
        s.handle(ev);
    }
    s.outcome(seed, interval_s, daly_s)
}

impl Sim<'_> {
    fn push(&mut self, at: u64, ev: Ev) {
        if at <= self.end {
            self.seq += 1;
            self.heap.push(Reverse((at, self.seq, ev)));
        }
    }

    fn exp_ms(rng: &mut ChaCha8Rng, rate_per_s: f64) -> Option<u64> {
        if rate_per_s <= 0.0 {
            return None;
        }
        let u: f64 = rng.gen::<f64>();
        Some(((-(1.0 - u).ln() / rate_per_s) * 1000.0).ceil() as u64)
    }

    fn schedule_failure(&mut self) {
        if let Some(dt) = Self::exp_ms(&mut self.rng_fail, self.rates.total_per_s) {
            let at = self.now.saturating_add(dt);
            self.push(at, Ev::Failure);
        }
    }

    fn schedule_planned(&mut self) {
        if let Some(dt) = Self::exp_ms(&mut self.rng_fail, self.rates.planned_per_s) {
            let at = self.now.saturating_add(dt);
            self.push(at, Ev::Planned);
        }
    }

    fn capacity(&self) -> f64 {
        self.active_dp as f64 / self.job.dp as f64
    }

    /// Account the time since the last event: progress at the current rate, and the
    /// rest of the GPU time to its reason.
    fn advance(&mut self, t: u64) {
        let t = t.min(self.end);
        if t <= self.last {
            return;
        }
        let dt = (t - self.last) as f64 / 1000.0;
        let cap = self.capacity();
        let (rate, why) = match &self.segment {
            Some(seg) => (seg.rate, seg.why),
            None => (1.0, Lost::Detection),
        };
        self.progress += dt * cap * rate;
        let gpu_h = self.job.gpus as f64 * dt / 3600.0;
        *self.lost.entry(Lost::Degraded).or_default() += gpu_h * (1.0 - cap);
        if rate < 1.0 {
            *self.lost.entry(why).or_default() += gpu_h * cap * (1.0 - rate);
        }
        self.now = t;
        self.last = t;
    }

    /// Queue stretches of slowed or stopped training behind the current one.
    fn enqueue(&mut self, segs: &[Segment]) {
        self.queue.extend(segs.iter().copied());
        if self.segment.is_none() {
            self.next_segment();
        }
    }

    fn next_segment(&mut self) {
        self.segment = self.queue.pop_front();
        if let Some(seg) = self.segment {
            self.token += 1;
            let (at, token) = (self.now.saturating_add(seg.dur_ms), self.token);
            self.push(at, Ev::SegmentEnd { token });
        } else if self.ckpt_rearm {
            self.ckpt_rearm = false;
            self.arm_checkpoint();
        } else if self.ckpt_due {
            self.ckpt_due = false;
            self.start_checkpoint();
        }
    }

    fn end_segment(&mut self) {
        if let Some(seg) = self.segment.take() {
            match seg.then {
                Then::Nothing => {}
                Then::Durable => {
                    self.durable = self.durable.max(self.progress);
                    self.checkpoints += 1;
                    if seg.why == Lost::Checkpoint {
                        self.arm_checkpoint();
                    }
                }
                Then::StartWrite => {
                    self.arm_checkpoint();
                    self.writes.insert(self.gen, self.progress);
                    let (at, gen, index) = (
                        self.now.saturating_add(self.write_ms()),
                        self.gen,
                        self.checkpoints,
                    );
                    self.push(at, Ev::CheckpointDurable { gen, index });
                }
                Then::Rollback => self.rollback(),
            }
        }
        self.next_segment();
    }

    /// The next checkpoint is due an interval of running from now (Daly's τ is time
    /// computed between checkpoints).
    fn arm_checkpoint(&mut self) {
        self.ckpt_token += 1;
        let (at, token) = (self.now.saturating_add(self.interval_ms), self.ckpt_token);
        self.push(at, Ev::CheckpointDue { token });
    }

    fn write_ms(&self) -> u64 {
        (self.job.checkpoint_write_s * 1000.0).ceil() as u64
    }

    /// Training resumes from the durable checkpoint: the work since is redone.
    fn rollback(&mut self) {
        let redo = (self.progress - self.durable).max(0.0);
        self.progress = self.durable;
        *self.lost.entry(Lost::Redo).or_default() += redo * self.job.gpus as f64 / 3600.0;
        self.restores += 1;
        // A write in flight dies with the job.
        self.gen += 1;
        self.writes.clear();
        // Checkpoints start again an interval after training resumes.
        self.ckpt_token += 1;
        self.ckpt_due = false;
        self.ckpt_rearm = true;
    }

    fn start_checkpoint(&mut self) {
        let write = self.write_ms();
        match self.f.checkpoint.mode {
            CheckpointMode::Sync => {
                self.enqueue(&[Segment {
                    why: Lost::Checkpoint,
                    dur_ms: write,
                    rate: 0.0,
                    then: Then::Durable,
                }]);
            }
            CheckpointMode::Async => {
                if !self.writes.is_empty() {
                    // The previous write is still going: this one is skipped.
                    self.arm_checkpoint();
                    return;
                }
                let stall = (write as f64 * self.f.checkpoint.async_blocking_fraction) as u64;
                self.enqueue(&[Segment {
                    why: Lost::Checkpoint,
                    dur_ms: stall,
                    rate: 0.0,
                    then: Then::StartWrite,
                }]);
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::End => {}
            Ev::Sample => {
                let t = self.now as f64 / 1000.0;
                let ett = if t > 0.0 { self.progress / t } else { 1.0 };
                self.samples.push((t / 3600.0, ett, self.capacity()));
            }
            Ev::SegmentEnd { token } => {
                if token == self.token {
                    self.end_segment();
                }
            }
            Ev::CheckpointDue { token } => {
                if token != self.ckpt_token {
                    return;
                }
                if self.segment.is_some() {
                    self.ckpt_due = true;
                } else {
                    self.start_checkpoint();
                }
            }
            Ev::CheckpointDurable { gen, .. } => {
                if gen == self.gen {
                    if let Some(p) = self.writes.remove(&gen) {
                        self.durable = self.durable.max(p);
                        self.checkpoints += 1;
                    }
                }
            }
            Ev::Repaired => {
                if self.active_dp < self.job.dp {
                    // The repaired host completes a replica again: grow.
                    self.active_dp += 1;
                    let dur = self.replan_ms() + self.transfer_ms();
                    self.enqueue(&[Segment {
                        why: Lost::Recovery,
                        dur_ms: dur,
                        rate: 0.0,
                        then: Then::Nothing,
                    }]);
                } else {
                    self.spares += 1;
                }
            }
            Ev::Planned => {
                self.planned += 1;
                self.schedule_planned();
                self.planned_interruption();
            }
            Ev::Failure => {
                self.schedule_failure();
                let u: f64 = self.rng_fail.gen();
                let cause = self.rates.pick(u);
                *self.failures_by_cause.entry(cause).or_default() += 1;
                match self.policy {
                    PolicyKind::Restart => self.restart_failure(cause),
                    PolicyKind::Phalanx => self.phalanx_failure(cause),
                }
            }
        }
    }

    fn interrupted(&mut self, cause: Cause, path: &'static str) {
        *self.interruptions_by_cause.entry(cause).or_default() += 1;
        self.incident(cause, true, path);
    }

    fn incident(&mut self, cause: Cause, interrupted: bool, path: &'static str) {
        if self.incidents.len() < INCIDENTS_MAX {
            self.incidents.push(Incident {
                t_h: self.now as f64 / 3_600_000.0,
                cause,
                interrupted,
                path,
            });
        }
    }

    fn s_to_ms(s: f64) -> u64 {
        (s * 1000.0).ceil() as u64
    }

    fn outcome(self, seed: u64, interval_s: f64, daly_s: f64) -> Outcome {
        let horizon_s = self.end as f64 / 1000.0;
        let failures: u64 = self.failures_by_cause.values().sum();
        let interruptions: u64 = self.interruptions_by_cause.values().sum();
        let ett = if horizon_s > 0.0 {
            (self.progress / horizon_s).clamp(0.0, 1.0)
        } else {
            0.0
        };
        Outcome {
            name: self.f.name.clone(),
            policy: self.policy,
            seed,
            days: self.f.days,
            gpus: self.job.gpus,
            step_s: self.job.step.total_s,
            mfu: self.job.step.mfu,
            checkpoint_interval_min: interval_s / 60.0,
            daly_interval_min: daly_s / 60.0,
            checkpoint_write_s: self.job.checkpoint_write_s,
            failures,
            interruptions,
            failures_by_cause: self.failures_by_cause,
            interruptions_by_cause: self.interruptions_by_cause,
            planned: self.planned,
            mtbf_h: if failures > 0 {
                horizon_s / 3600.0 / failures as f64
            } else {
                f64::INFINITY
            },
            lost_gpu_h: self.lost,
            effective_training_time: ett,
            goodput_tokens_per_s: ett * self.job.step.tokens_per_s,
            checkpoints: self.checkpoints,
            checkpoint_restores: self.restores,
            shrinks: self.shrinks,
            spares_min: self.spares_min,
            events: self.events,
            samples: self.samples,
            incidents: self.incidents,
        }
    }
}
