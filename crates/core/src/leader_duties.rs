//! The leader's duties as one pure state machine: heartbeat leases (suspect, failed,
//! healthy again, rejoin), straggler checks, and the suppression of a decision already
//! proposed. The controller's raft thread drives it with its wall clock; the simulator
//! (`crates/sim`) drives the same functions with virtual time. No I/O: time comes in as
//! `now_ms`, and every duty carries the command to propose with its reason.

use std::collections::BTreeMap;

use phalanx_proto::{
    Command, HeartbeatRequest, Plan, TraceParent, WorkerHealth, WorkerId, WorkerInfo,
};

use crate::leases::{LeaseConfig, Leases};
use crate::policy::{StragglerConfig, StragglerDecision, Stragglers};

/// The cadence and limits of the leader's duties.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DutiesConfig {
    pub lease: LeaseConfig,
    pub stragglers: StragglerConfig,
    /// Stragglers are judged at most this often (compute times move slowly).
    pub straggler_check_ms: u64,
    /// A health decision already proposed for a worker is not proposed again for this long
    /// (the first one is on its way through the log).
    pub repeat_suppress_ms: u64,
}

impl Default for DutiesConfig {
    fn default() -> Self {
        DutiesConfig {
            lease: LeaseConfig::default(),
            stragglers: StragglerConfig::default(),
            straggler_check_ms: 500,
            repeat_suppress_ms: 2_000,
        }
    }
}

/// Which duty produced a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DutyKind {
    Lease,
    Straggler,
}

/// A command the leader should propose, and why (the reason is inside the command).
#[derive(Debug, Clone, PartialEq)]
pub struct Duty {
    pub kind: DutyKind,
    pub worker: WorkerId,
    pub command: Command,
    /// The trace of the evidence behind the decision (a worker's detection of the silence
    /// a lease decision confirms), which the decision joins; none when the leader's own
    /// observation (a lease that ran out, a straggler) is all the evidence.
    pub trace: Option<TraceParent>,
    /// When the evidence began, on the leader's clock (`now_ms`): for a health decision,
    /// the worker's last heartbeat; the trace's detection spans from there to the
    /// decision. `None` for a straggler decision (its evidence is a window of samples).
    pub since_ms: Option<u64>,
}

impl Duty {
    /// The health this duty sets, for a health decision.
    pub fn health(&self) -> Option<WorkerHealth> {
        match &self.command {
            Command::SetWorkerHealth { health, .. } => Some(*health),
            _ => None,
        }
    }

    /// The reason carried by the command.
    pub fn reason(&self) -> &str {
        match &self.command {
            Command::SetWorkerHealth { reason, .. } | Command::ReduceShare { reason, .. } => reason,
            _ => "",
        }
    }
}

/// The leader-local state behind its duties. Never replicated: a new leader starts a fresh
/// one (`new(now_ms)`), whose lease grace period keeps it from failing healthy workers.
#[derive(Debug, Clone)]
pub struct LeaderDuties {
    leases: Leases,
    /// Health decisions proposed and when, for suppression of repeats.
    inflight: BTreeMap<WorkerId, (WorkerHealth, u64)>,
    /// Each worker's latest compute time per micro-batch, from heartbeats.
    compute_ms: BTreeMap<WorkerId, f64>,
    stragglers: Stragglers,
    straggler_checked_ms: u64,
}

impl LeaderDuties {
    /// A leader's duties from the moment it became leader.
    pub fn new(now_ms: u64) -> Self {
        LeaderDuties {
            leases: Leases::new(now_ms),
            inflight: BTreeMap::new(),
            compute_ms: BTreeMap::new(),
            stragglers: Stragglers::default(),
            straggler_checked_ms: now_ms,
        }
    }

    /// A registration starts the worker's lease.
    pub fn on_register(&mut self, worker: &str, now_ms: u64, cfg: &DutiesConfig) {
        self.leases.heartbeat(worker, now_ms, &cfg.lease);
    }

    /// A registered worker's heartbeat. `plan` is the current job's plan: a silence report
    /// names a rank of it, and one about another epoch is stale and ignored.
    pub fn on_heartbeat(
        &mut self,
        hb: &HeartbeatRequest,
        plan: Option<&Plan>,
        now_ms: u64,
        cfg: &DutiesConfig,
    ) {
        let named = hb.silent_peer.as_ref().and_then(|sp| {
            let plan = plan?;
            (plan.epoch == sp.epoch)
                .then(|| plan.ranks.get(sp.rank as usize).cloned())
                .flatten()
                .map(|w| (w, sp))
        });
        self.leases.heartbeat(&hb.worker, now_ms, &cfg.lease);
        if let Some(step) = hb.step {
            self.leases.progress(&hb.worker, step, now_ms);
        }
        if let Some((named, sp)) = &named {
            self.leases.silence_report(&hb.worker, named, sp, now_ms);
        }
        if let Some(t) = hb.compute_ms.filter(|t| t.is_finite() && *t >= 0.0) {
            self.compute_ms.insert(hb.worker.clone(), t);
        }
    }

    /// A returned duty could not be proposed (raft-rs dropped it, say during a leader
    /// transfer): it is not in flight, so the next check decides it again instead of
    /// suppressing it for `repeat_suppress_ms`.
    pub fn not_proposed(&mut self, duty: &Duty) {
        if duty.kind == DutyKind::Lease {
            self.inflight.remove(&duty.worker);
        }
    }

    /// The periodic check: lease decisions for workers whose recorded health disagrees
    /// with their lease (a decision proposed less than `repeat_suppress_ms` ago is not
    /// repeated), then, every `straggler_check_ms`, the stragglers of `running_plan` (the
    /// plan of a running job). The caller proposes every returned command.
    pub fn on_tick(
        &mut self,
        now_ms: u64,
        workers: &BTreeMap<WorkerId, WorkerInfo>,
        running_plan: Option<&Plan>,
        cfg: &DutiesConfig,
    ) -> Vec<Duty> {
        let mut out = Vec::new();
        for (worker, decision, reason) in self.leases.decide(now_ms, workers, &cfg.lease) {
            let health = decision.health();
            if let Some((h, at)) = self.inflight.get(&worker) {
                if *h == health && now_ms.saturating_sub(*at) < cfg.repeat_suppress_ms {
                    continue;
                }
            }
            self.inflight.insert(worker.clone(), (health, now_ms));
            out.push(Duty {
                kind: DutyKind::Lease,
                trace: self.leases.take_report_trace(&worker, now_ms, &cfg.lease),
                since_ms: self.leases.last_heartbeat(&worker),
                worker: worker.clone(),
                command: Command::SetWorkerHealth {
                    id: worker,
                    health,
                    reason,
                    address: None,
                },
            });
        }
        if now_ms.saturating_sub(self.straggler_checked_ms) < cfg.straggler_check_ms {
            return out;
        }
        self.straggler_checked_ms = now_ms;
        let Some(plan) = running_plan else {
            return out;
        };
        let decisions = self
            .stragglers
            .observe(plan, &self.compute_ms, workers, &cfg.stragglers);
        for (worker, decision, reason) in decisions {
            let command = match decision {
                StragglerDecision::ReduceShare => Command::ReduceShare {
                    worker: worker.clone(),
                    epoch: plan.epoch,
                    reason,
                },
                StragglerDecision::SwapForSpare => Command::SetWorkerHealth {
                    id: worker.clone(),
                    health: WorkerHealth::Draining,
                    reason,
                    address: None,
                },
            };
            // A fresh sample is needed before the same rank is judged again.
            self.compute_ms.remove(&worker);
            out.push(Duty {
                kind: DutyKind::Straggler,
                worker,
                command,
                trace: None,
                since_ms: None,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_proto::SilentPeer;

    fn workers(ids: &[&str]) -> BTreeMap<WorkerId, WorkerInfo> {
        ids.iter()
            .map(|id| {
                let w = WorkerInfo {
                    id: id.to_string(),
                    address: String::new(),
                    device: Default::default(),
                    health: WorkerHealth::Healthy,
                    health_reason: String::new(),
                    registered_index: 1,
                };
                (id.to_string(), w)
            })
            .collect()
    }

    fn hb(w: &str) -> HeartbeatRequest {
        HeartbeatRequest {
            worker: w.into(),
            compute_ms: None,
            step: None,
            silent_peer: None,
        }
    }

    #[test]
    fn a_worker_that_stops_heartbeating_is_suspected_then_failed_once_each() {
        let cfg = DutiesConfig::default();
        let mut ws = workers(&["a", "b", "c"]);
        let mut d = LeaderDuties::new(0);
        let mut seen = Vec::new();
        // Decisions take 300 ms to commit and apply: the ticks in between must not
        // propose them again.
        let mut committing: Vec<(u64, WorkerId, WorkerHealth)> = Vec::new();
        for t in (0..12_000u64).step_by(50) {
            committing.retain(|(at, w, h)| {
                if *at <= t {
                    ws.get_mut(w).unwrap().health = *h;
                }
                *at > t
            });
            if t % 100 == 0 {
                for w in ["a", "b", "c"] {
                    if w != "b" || t < 4_000 {
                        d.on_heartbeat(&hb(w), None, t, &cfg);
                    }
                }
            }
            for duty in d.on_tick(t, &ws, None, &cfg) {
                let h = duty.health().unwrap();
                committing.push((t + 300, duty.worker.clone(), h));
                seen.push((t, duty.worker.clone(), h));
            }
        }
        let kinds: Vec<_> = seen.iter().map(|(_, w, h)| (w.as_str(), *h)).collect();
        assert_eq!(
            kinds,
            vec![("b", WorkerHealth::Suspect), ("b", WorkerHealth::Failed)],
            "{seen:?}"
        );
        let (t_suspect, t_failed) = (seen[0].0, seen[1].0);
        assert!((5_900..=6_000).contains(&t_suspect), "{seen:?}");
        assert!((8_900..=9_000).contains(&t_failed), "{seen:?}");
    }

    #[test]
    fn a_silence_report_about_another_epoch_is_ignored() {
        let cfg = DutiesConfig {
            lease: LeaseConfig {
                grace_ms: 0,
                ..LeaseConfig::default()
            },
            ..DutiesConfig::default()
        };
        let ws = workers(&["a", "b"]);
        let plan = Plan {
            trace: None,
            epoch: 3,
            ranks: vec!["a".into(), "b".into()],
            reason: String::new(),
            micro_shares: vec![],
        };
        let mut d = LeaderDuties::new(0);
        let mut report = hb("a");
        report.silent_peer = Some(SilentPeer {
            epoch: 2,
            rank: 1,
            silent_ms: 900,
            trace: None,
        });
        d.on_heartbeat(&hb("b"), Some(&plan), 0, &cfg);
        d.on_heartbeat(&report, Some(&plan), 1_000, &cfg);
        assert!(d.on_tick(1_000, &ws, Some(&plan), &cfg).is_empty());
        report.silent_peer = Some(SilentPeer {
            epoch: 3,
            rank: 1,
            silent_ms: 900,
            trace: None,
        });
        d.on_heartbeat(&report, Some(&plan), 1_050, &cfg);
        let duties = d.on_tick(1_050, &ws, Some(&plan), &cfg);
        assert_eq!(duties.len(), 1, "{duties:?}");
        assert_eq!(duties[0].health(), Some(WorkerHealth::Failed));
        assert!(duties[0].reason().contains("reported rank 1 of epoch 3"));
        assert_eq!(duties[0].trace, None, "the report had no trace");
    }

    /// The decision that confirms a silence report joins the reporter's trace (one
    /// recovery, one trace); a decision on the leader's own evidence (a lease that ran
    /// out) starts its own.
    #[test]
    fn a_confirmed_silence_report_carries_the_reporters_trace_into_the_decision() {
        let cfg = DutiesConfig {
            lease: LeaseConfig {
                grace_ms: 0,
                ..LeaseConfig::default()
            },
            ..DutiesConfig::default()
        };
        let ws = workers(&["a", "b", "c"]);
        let plan = Plan {
            trace: None,
            epoch: 1,
            ranks: vec!["a".into(), "b".into(), "c".into()],
            reason: String::new(),
            micro_shares: vec![],
        };
        let tp =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let mut d = LeaderDuties::new(0);
        for w in ["a", "b", "c"] {
            d.on_heartbeat(&hb(w), Some(&plan), 0, &cfg);
        }
        // b stops at 0; a reports it silent at 400 with its detection's trace; c keeps
        // heartbeating until it too stops, at 1_000, with nobody reporting it.
        let mut report = hb("a");
        report.silent_peer = Some(SilentPeer {
            epoch: 1,
            rank: 1,
            silent_ms: 400,
            trace: Some(tp.clone()),
        });
        d.on_heartbeat(&report, Some(&plan), 400, &cfg);
        d.on_heartbeat(&hb("c"), Some(&plan), 500, &cfg);
        assert!(d.on_tick(450, &ws, Some(&plan), &cfg).is_empty());
        let mut decided = Vec::new();
        for t in (500..=7_000).step_by(50) {
            if t % 100 == 0 && t < 5_500 {
                d.on_heartbeat(&hb("a"), Some(&plan), t, &cfg);
            }
            if t <= 1_000 && t % 100 == 0 {
                d.on_heartbeat(&hb("c"), Some(&plan), t, &cfg);
            }
            decided.extend(
                d.on_tick(t, &ws, Some(&plan), &cfg)
                    .into_iter()
                    .map(|x| (t, x)),
            );
        }
        let b = decided
            .iter()
            .find(|(_, x)| x.worker == "b")
            .expect("b failed");
        assert_eq!(b.1.health(), Some(WorkerHealth::Failed), "{decided:?}");
        assert!(b.0 <= 600, "confirmed once 500 ms quiet: {decided:?}");
        assert_eq!(
            b.1.trace.as_ref(),
            Some(&tp),
            "b's decision joins a's trace"
        );
        let c = decided
            .iter()
            .find(|(_, x)| x.worker == "c")
            .expect("c's lease ran out");
        assert_eq!(c.1.trace, None, "c's decision is the leader's own: {c:?}");
        assert_eq!(
            c.1.since_ms,
            Some(1_000),
            "its evidence began at c's last heartbeat: {c:?}"
        );
        assert!(
            decided.iter().filter(|(_, x)| x.trace.is_some()).count() == 1,
            "one detection, one decision in its trace: {decided:?}"
        );
    }
}
