//! Detection in virtual time on the controller's own code: `phalanx_core::LeaderDuties`,
//! the same state machine the controller's raft thread drives with its wall clock, here
//! driven by a virtual clock over a trace of inputs (registrations, heartbeats with their
//! silence reports and compute times, and the leader's 50 ms checks).

use std::collections::BTreeMap;

use phalanx_core::{DutiesConfig, LeaderDuties, LeaseConfig};
use phalanx_proto::{
    Command, HeartbeatRequest, JobState, Plan, SilentPeer, WorkerHealth, WorkerId, WorkerInfo,
};
use serde::{Deserialize, Serialize};

use crate::config::PhalanxTimings;

/// The controller checks its leases every 50 ms (`raft_loop.rs`).
pub const CHECK_MS: u64 = 50;

/// One input to the leader's duties, at a virtual time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DutyInput {
    Register { worker: WorkerId, at_ms: u64 },
    Heartbeat { hb: HeartbeatRequest, at_ms: u64 },
    Tick { at_ms: u64 },
}

impl DutyInput {
    pub fn at_ms(&self) -> u64 {
        match self {
            DutyInput::Register { at_ms, .. }
            | DutyInput::Heartbeat { at_ms, .. }
            | DutyInput::Tick { at_ms } => *at_ms,
        }
    }
}

/// A decision the duties made, with the health it sets (or `None` for a smaller share).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    pub worker: WorkerId,
    pub health: Option<WorkerHealth>,
    pub reason: String,
}

/// The world the duties judge: registered workers, and the running job's plan.
#[derive(Debug, Clone)]
pub struct World {
    pub workers: BTreeMap<WorkerId, WorkerInfo>,
    pub plan: Option<Plan>,
    pub job_state: JobState,
}

impl World {
    pub fn new(ranks: &[&str], spares: &[&str]) -> World {
        let mut workers = BTreeMap::new();
        for (i, id) in ranks.iter().chain(spares).enumerate() {
            workers.insert(
                id.to_string(),
                WorkerInfo {
                    id: id.to_string(),
                    address: String::new(),
                    device: Default::default(),
                    health: if i < ranks.len() {
                        WorkerHealth::Healthy
                    } else {
                        WorkerHealth::Spare
                    },
                    health_reason: String::new(),
                    registered_index: i as u64 + 1,
                },
            );
        }
        World {
            workers,
            plan: Some(Plan {
                trace: None,
                epoch: 1,
                ranks: ranks.iter().map(|r| r.to_string()).collect(),
                reason: "initial placement".into(),
                micro_shares: vec![],
            }),
            job_state: JobState::Running,
        }
    }

    /// What the state machine does with a committed decision, as far as the duties can
    /// see it: a worker's health, and a halved micro-batch share.
    fn apply(&mut self, d: &Decision) {
        match d.health {
            Some(h) => {
                if let Some(w) = self.workers.get_mut(&d.worker) {
                    w.health = h;
                }
            }
            None => {
                if let Some(p) = self.plan.as_mut() {
                    if p.micro_shares.is_empty() {
                        p.micro_shares = vec![2; p.ranks.len()];
                    }
                    if let Some(r) = p.ranks.iter().position(|x| *x == d.worker) {
                        p.micro_shares[r] = 1;
                    }
                }
            }
        }
    }
}

/// The simulator's driver of the leader's duties: feeds `inputs` (sorted by time) to a
/// `LeaderDuties` that became leader at `leader_since_ms`, in the order the controller's
/// raft thread does (queued inputs, then the periodic check), and applies each decision
/// to `world` before the next input (a commit that takes no virtual time).
pub fn replay(
    inputs: &[DutyInput],
    world: &mut World,
    leader_since_ms: u64,
    cfg: &DutiesConfig,
) -> Vec<Decision> {
    let mut duties = LeaderDuties::new(leader_since_ms);
    let mut out = Vec::new();
    for input in inputs {
        match input {
            DutyInput::Register { worker, at_ms } => duties.on_register(worker, *at_ms, cfg),
            DutyInput::Heartbeat { hb, at_ms } => {
                duties.on_heartbeat(hb, world.plan.as_ref(), *at_ms, cfg)
            }
            DutyInput::Tick { at_ms } => {
                let running = world
                    .plan
                    .as_ref()
                    .filter(|_| world.job_state == JobState::Running);
                for duty in duties.on_tick(*at_ms, &world.workers, running, cfg) {
                    let d = Decision {
                        at_ms: *at_ms,
                        worker: duty.worker.clone(),
                        health: match &duty.command {
                            Command::SetWorkerHealth { health, .. } => Some(*health),
                            _ => None,
                        },
                        reason: duty.reason().to_string(),
                    };
                    world.apply(&d);
                    out.push(d);
                }
            }
        }
    }
    out
}

/// The duties' configuration from the calibrated timings.
pub fn duties_config(t: &PhalanxTimings) -> DutiesConfig {
    DutiesConfig {
        lease: LeaseConfig {
            suspect_after_ms: t.suspect_after_ms,
            fail_after_ms: t.fail_after_ms,
            silent_confirm_ms: t.silent_confirm_ms,
            ..LeaseConfig::default()
        },
        ..DutiesConfig::default()
    }
}

/// What goes wrong in an episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The victim stops (no heartbeats); its right neighbour reports it silent.
    Hang,
    /// The victim computes `factor` times slower.
    Straggler { factor_x100: u64 },
}

const RANKS: [&str; 4] = ["w0", "w1", "w2", "w3"];
const VICTIM: &str = "w1";
/// The fault lands after the new leader's grace period and a few heartbeats.
const FAULT_AT_MS: u64 = 5_000;
const COMPUTE_MS: f64 = 100.0;

/// The inputs of one episode: four ranks and a spare heartbeat every `heartbeat_ms`
/// (rank i offset by `phase_ms` + i/5 of a period); at `FAULT_AT_MS` the fault starts;
/// the leader checks every 50 ms; `horizon_ms` after the fault it ends.
pub fn episode_inputs(
    fault: Fault,
    t: &PhalanxTimings,
    phase_ms: u64,
    horizon_ms: u64,
) -> Vec<DutyInput> {
    let hb = t.heartbeat_ms.max(1);
    let end = FAULT_AT_MS + horizon_ms;
    let mut inputs = Vec::new();
    let all: Vec<&str> = RANKS.iter().copied().chain(["s0"]).collect();
    for (i, w) in all.iter().enumerate() {
        inputs.push(DutyInput::Register {
            worker: w.to_string(),
            at_ms: 0,
        });
        let mut at = (phase_ms + i as u64 * hb / 5) % hb;
        while at <= end {
            let faulted = at >= FAULT_AT_MS;
            let stopped = matches!(fault, Fault::Hang) && *w == VICTIM && faulted;
            if !stopped {
                let progressing = !(faulted && matches!(fault, Fault::Hang));
                let step = if progressing {
                    at / 1_000
                } else {
                    FAULT_AT_MS / 1_000
                };
                let compute_ms = match fault {
                    Fault::Straggler { factor_x100 } if *w == VICTIM && faulted => {
                        COMPUTE_MS * factor_x100 as f64 / 100.0
                    }
                    _ => COMPUTE_MS,
                };
                let silent_for = at.saturating_sub(FAULT_AT_MS);
                let silent_peer = (matches!(fault, Fault::Hang)
                    && *w == "w2"
                    && faulted
                    && silent_for >= t.silence_report_ms)
                    .then_some(SilentPeer {
                        epoch: 1,
                        rank: 1,
                        silent_ms: silent_for,
                        trace: None,
                    });
                inputs.push(DutyInput::Heartbeat {
                    hb: HeartbeatRequest {
                        worker: w.to_string(),
                        compute_ms: (*w != "s0").then_some(compute_ms),
                        step: (*w != "s0").then_some(step),
                        silent_peer,
                    },
                    at_ms: at,
                });
            }
            at += hb;
        }
    }
    let mut at = 0;
    while at <= end {
        inputs.push(DutyInput::Tick { at_ms: at });
        at += CHECK_MS;
    }
    // Ties: heartbeats before the check at the same instant (queued inputs first).
    inputs.sort_by_key(|i| (i.at_ms(), matches!(i, DutyInput::Tick { .. })));
    inputs
}

/// Run one episode: the decisions about the victim, in ms after the fault.
pub fn episode(fault: Fault, t: &PhalanxTimings, phase_ms: u64) -> Vec<Decision> {
    let horizon = t.fail_after_ms * 3 + t.silence_report_ms + 10_000;
    let inputs = episode_inputs(fault, t, phase_ms, horizon);
    let mut world = World::new(&RANKS, &["s0"]);
    replay(&inputs, &mut world, 0, &duties_config(t))
        .into_iter()
        .filter(|d| d.worker == VICTIM && d.at_ms >= FAULT_AT_MS)
        .map(|d| Decision {
            at_ms: d.at_ms - FAULT_AT_MS,
            ..d
        })
        .collect()
}

/// Detection times measured by running the duties, one per heartbeat phase; a failure
/// draws its phase.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionTable {
    /// From a hang to the failed decision, ms.
    pub hang_ms: Vec<u64>,
    /// From a straggler's slow-down to its smaller share, ms.
    pub straggler_share_ms: Vec<u64>,
    /// From a straggler's slow-down to its swap for a spare, ms.
    pub straggler_swap_ms: Vec<u64>,
}

pub const PHASES: u64 = 16;

impl DetectionTable {
    pub fn build(t: &PhalanxTimings, straggler_factor: f64) -> DetectionTable {
        let mut table = DetectionTable {
            hang_ms: Vec::new(),
            straggler_share_ms: Vec::new(),
            straggler_swap_ms: Vec::new(),
        };
        let hb = t.heartbeat_ms.max(1);
        let factor_x100 = (straggler_factor * 100.0).round() as u64;
        let never = t.fail_after_ms * 3 + t.silence_report_ms + 10_000;
        for k in 0..PHASES {
            let phase = k * hb / PHASES;
            let hang = episode(Fault::Hang, t, phase);
            table.hang_ms.push(
                hang.iter()
                    .find(|d| d.health == Some(WorkerHealth::Failed))
                    .map_or(never, |d| d.at_ms),
            );
            let slow = episode(Fault::Straggler { factor_x100 }, t, phase);
            let share = slow.iter().find(|d| d.health.is_none()).map(|d| d.at_ms);
            let swap = slow
                .iter()
                .find(|d| d.health == Some(WorkerHealth::Draining))
                .map(|d| d.at_ms);
            table.straggler_share_ms.push(share.unwrap_or(never));
            table.straggler_swap_ms.push(swap.unwrap_or(never));
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hang_is_failed_by_the_silence_report_within_a_second() {
        let t = PhalanxTimings::default();
        let table = DetectionTable::build(&t, 2.0);
        for ms in &table.hang_ms {
            assert!(
                (t.silence_report_ms..=1_200).contains(ms),
                "hang detected after {ms} ms: {table:?}"
            );
        }
    }

    #[test]
    fn a_straggler_gets_a_smaller_share_then_is_swapped() {
        let t = PhalanxTimings::default();
        let table = DetectionTable::build(&t, 3.0);
        for (a, b) in table
            .straggler_share_ms
            .iter()
            .zip(&table.straggler_swap_ms)
        {
            assert!((2_500..=4_000).contains(a), "{table:?}");
            assert!(b > a && *b <= 8_000, "{table:?}");
        }
        // A slow-down under the threshold (2x the median) is no straggler.
        let mild = DetectionTable::build(&t, 1.5);
        assert!(mild.straggler_share_ms.iter().all(|ms| *ms > 10_000));
    }
}
