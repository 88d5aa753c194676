//! The two policies' reactions to a failure and to planned maintenance: (a) restart the
//! whole job from its last durable checkpoint; (b) Phalanx's spares, survivors' state,
//! shrink and grow, with the checkpoint as the last resort.

use rand::Rng;

use super::{restart_detect_s, Ev, Lost, Segment, Sim, Then};
use crate::config::PolicyKind;
use crate::detect::PHASES;
use crate::failures::{info, Cause, Loses, Symptom};

impl Sim<'_> {
    /// (a) Every failure stops the job: detection, then a restart from the last durable
    /// checkpoint.
    pub(super) fn restart_failure(&mut self, cause: Cause) {
        self.interrupted(cause, "restart from checkpoint");
        let detect = Self::s_to_ms(restart_detect_s(self.f, cause));
        let restart = Self::s_to_ms(self.f.policy.restart.restart_s) + self.write_ms();
        let down = self.segment.map(|s| s.why);
        match down {
            Some(Lost::Detection | Lost::Straggler)
                if self.queue.iter().any(|s| s.why == Lost::Recovery) =>
            {
                // Already dead and not yet restarting: this failure changes nothing.
                return;
            }
            Some(Lost::Recovery) => {
                // The restart itself is hit: it starts over.
                self.queue.clear();
                self.segment = None;
                self.token += 1;
                self.enqueue(&[Segment {
                    why: Lost::Recovery,
                    dur_ms: restart,
                    rate: 0.0,
                    then: Then::Nothing,
                }]);
                return;
            }
            _ => {}
        }
        // The job died: whatever it was doing (a checkpoint stall included) is over.
        self.queue.clear();
        self.segment = None;
        self.token += 1;
        let slow = info(cause).symptom == Symptom::Straggler;
        self.enqueue(&[
            Segment {
                why: if slow {
                    Lost::Straggler
                } else {
                    Lost::Detection
                },
                dur_ms: detect,
                rate: if slow {
                    1.0 / self.f.failures.straggler_factor
                } else {
                    0.0
                },
                then: Then::Rollback,
            },
            Segment {
                why: Lost::Recovery,
                dur_ms: restart,
                rate: 0.0,
                then: Then::Nothing,
            },
        ]);
        // A straggler's job keeps running (slowly) until it is detected; the work done
        // meanwhile survives only as far as the checkpoint.
    }

    pub(super) fn replan_ms(&self) -> u64 {
        self.f.policy.phalanx.replan_ms
    }

    pub(super) fn transfer_ms(&self) -> u64 {
        Self::s_to_ms(self.job.host_state_transfer_s)
    }

    pub(super) fn phase(&mut self) -> usize {
        self.rng.gen_range(0..PHASES as usize)
    }

    /// (b) Phalanx: detect (the controller's own duties, or the measured report path),
    /// then a spare, or a shrink; state from the survivors; the step in progress redone.
    pub(super) fn phalanx_failure(&mut self, cause: Cause) {
        let t = &self.f.policy.phalanx;
        let ci = info(cause);
        let step_ms = Self::s_to_ms(self.job.step.total_s);
        let detect_ms = match ci.symptom {
            Symptom::Crash | Symptom::Drain => t.crash_report_ms,
            Symptom::Hang => {
                let k = self.phase();
                self.table.hang_ms[k]
            }
            Symptom::CollectiveHang => t.op_timeout_ms,
            Symptom::Corruption => {
                let k = self.rng.gen_range(0..t.grad_check_interval_steps.max(1));
                k * step_ms
            }
            Symptom::Straggler => {
                let k = self.phase();
                self.table.straggler_share_ms[k]
            }
            Symptom::Storage => {
                // A failed checkpoint write is retried in the background: no stop.
                self.incident(cause, false, "checkpoint write retried");
                return;
            }
        };
        // A second failure while the first is being recovered may hit the host that
        // holds the only other copy of the failed host's state: then the checkpoint.
        let recovering = self.segment.is_some_and(|s| s.why == Lost::Recovery);
        let buddy_lost =
            recovering && ci.loses == Loses::Host && self.rng.gen_range(0..self.job.hosts) == 0;
        if buddy_lost || (self.active_dp <= 1 && self.spares == 0 && ci.loses == Loses::Host) {
            self.interrupted(cause, "state lost: restore from checkpoint");
            let restart = Self::s_to_ms(t.process_restart_s) + self.write_ms();
            self.enqueue(&[
                Segment {
                    why: Lost::Detection,
                    dur_ms: detect_ms,
                    rate: 0.0,
                    then: Then::Rollback,
                },
                Segment {
                    why: Lost::Recovery,
                    dur_ms: restart,
                    rate: 0.0,
                    then: Then::Nothing,
                },
            ]);
            return;
        }
        let mut segs = Vec::new();
        let mut path = "spare swapped in, state from peers";
        match ci.symptom {
            Symptom::Straggler => {
                // Slow until the smaller share, less slow until the swap.
                let k = self.phase();
                let swap = self.table.straggler_swap_ms[k].max(detect_ms);
                let factor = self.f.failures.straggler_factor;
                segs.push(Segment {
                    why: Lost::Straggler,
                    dur_ms: detect_ms,
                    rate: 1.0 / factor,
                    then: Then::Nothing,
                });
                segs.push(Segment {
                    why: Lost::Straggler,
                    dur_ms: swap - detect_ms,
                    rate: (2.0 / factor).min(1.0),
                    then: Then::Nothing,
                });
                path = "straggler: smaller share, then a spare";
            }
            Symptom::Corruption => {
                // Caught by the spot check before its gradient is reduced: the corrupt
                // rank is excluded, the steps since its last check are redone.
                segs.push(Segment {
                    why: Lost::Redo,
                    dur_ms: detect_ms,
                    rate: 0.0,
                    then: Then::Nothing,
                });
                path = "spot check: rank excluded, steps redone";
            }
            _ => segs.push(Segment {
                why: Lost::Detection,
                dur_ms: detect_ms,
                rate: 0.0,
                then: Then::Nothing,
            }),
        }
        let redo_ms = self.rng.gen_range(0..step_ms.max(1));
        let mut recovery_ms = self.replan_ms() + redo_ms;
        match ci.loses {
            Loses::Nothing => {
                path = "collective timed out: new epoch on the same workers";
            }
            Loses::Host | Loses::Process => {
                recovery_ms += self.transfer_ms();
                if self.spares > 0 {
                    self.spares -= 1;
                    self.spares_min = self.spares_min.min(self.spares);
                } else {
                    self.active_dp -= 1;
                    self.shrinks += 1;
                    path = "no spare: shrink by one replica, grow when repaired";
                }
                let back_s = if ci.loses == Loses::Process {
                    t.process_restart_s
                } else {
                    self.f.policy.repair_hours * 3600.0
                };
                let at = self.now.saturating_add(Self::s_to_ms(back_s));
                self.push(at, Ev::Repaired);
            }
        }
        segs.push(Segment {
            why: Lost::Recovery,
            dur_ms: recovery_ms,
            rate: 0.0,
            then: Then::Nothing,
        });
        self.interrupted(cause, path);
        self.enqueue(&segs);
    }

    pub(super) fn planned_interruption(&mut self) {
        match self.policy {
            PolicyKind::Restart => {
                // Checkpoint, stop, restart: nothing is lost but the time.
                let write = self.write_ms();
                let restart = Self::s_to_ms(self.f.policy.restart.restart_s) + write;
                self.enqueue(&[
                    Segment {
                        why: Lost::Planned,
                        dur_ms: write,
                        rate: 0.0,
                        then: Then::Durable,
                    },
                    Segment {
                        why: Lost::Planned,
                        dur_ms: restart,
                        rate: 0.0,
                        then: Then::Nothing,
                    },
                ]);
            }
            PolicyKind::Phalanx => {
                // A drain: the host leaves at a step boundary, a spare (or a shrink)
                // takes its place, and it comes back after its maintenance.
                let dur = self.replan_ms() + self.transfer_ms();
                if self.spares > 0 {
                    self.spares -= 1;
                    self.spares_min = self.spares_min.min(self.spares);
                } else if self.active_dp > 1 {
                    self.active_dp -= 1;
                    self.shrinks += 1;
                }
                let at = self
                    .now
                    .saturating_add(Self::s_to_ms(self.f.policy.repair_hours * 3600.0));
                self.push(at, Ev::Repaired);
                self.enqueue(&[Segment {
                    why: Lost::Planned,
                    dur_ms: dur,
                    rate: 0.0,
                    then: Then::Nothing,
                }]);
            }
        }
    }
}
