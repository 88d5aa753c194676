//! Heartbeat leases and silence reports: the leader's failure detector. Pure: time comes in
//! as `now_ms`, and every decision carries its reason (see [`crate::policy`] for
//! placement and stragglers).

use std::collections::BTreeMap;

use phalanx_proto::{SilentPeer, TraceParent, WorkerHealth, WorkerId, WorkerInfo};

use crate::policy::Reason;

/// Lease timing of the leader's failure detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    pub suspect_after_ms: u64,
    pub fail_after_ms: u64,
    /// A new leader waits this long before judging anyone: it has heard no heartbeat yet.
    pub grace_ms: u64,
    /// A failed worker whose heartbeats came back (a hang that ended, a stall that passed)
    /// rejoins as a new worker after heartbeating this long without a gap, so a flapping
    /// one is not re-placed at every heartbeat.
    pub rejoin_after_ms: u64,
    /// A peer's report that a worker is silent is confirmed when that worker's last
    /// heartbeat is at least this old, and at least [`SILENT_CONFIRM_GAPS`] times the
    /// longest gap between its recent heartbeats (on a loaded host heartbeats arrive
    /// late, and a late one is not a stopped one): a hung or cut-off process stops
    /// heartbeating, a slow one does not. The gaps never raise it above
    /// `suspect_after_ms`.
    pub silent_confirm_ms: u64,
    /// A silence report counts for this long after it was made.
    pub report_ttl_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            suspect_after_ms: 2_000,
            fail_after_ms: 5_000,
            grace_ms: 3_000,
            rejoin_after_ms: 3_000,
            silent_confirm_ms: 500,
            report_ttl_ms: 3_000,
        }
    }
}

/// A silence report is confirmed after this many of the worker's own longest recent
/// heartbeat gaps without a heartbeat.
pub const SILENT_CONFIRM_GAPS: u64 = 3;
/// How many recent heartbeat gaps per worker are kept.
const GAPS_KEPT: usize = 16;

/// One worker's report that a peer of its plan epoch is silent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SilenceReport {
    reporter: WorkerId,
    epoch: u64,
    rank: u32,
    silent_ms: u64,
    at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    MarkSuspect,
    MarkFailed,
    MarkHealthy,
    /// A failed worker is alive after all: it joins again (placeable, like a new worker).
    Rejoin,
}

impl LeaseDecision {
    pub fn health(&self) -> WorkerHealth {
        match self {
            LeaseDecision::MarkSuspect => WorkerHealth::Suspect,
            LeaseDecision::MarkFailed => WorkerHealth::Failed,
            LeaseDecision::MarkHealthy => WorkerHealth::Healthy,
            LeaseDecision::Rejoin => WorkerHealth::Joining,
        }
    }
}

/// Heartbeat leases. Leader-local and never replicated: a new leader starts a fresh table,
/// and its grace period keeps a leader change from failing healthy workers.
#[derive(Debug, Clone)]
pub struct Leases {
    leader_since_ms: u64,
    last_heartbeat_ms: BTreeMap<WorkerId, u64>,
    /// When the current run of heartbeats without a gap of `suspect_after_ms` began.
    streak_since_ms: BTreeMap<WorkerId, u64>,
    /// When this leader first saw each currently failed worker as failed: only heartbeats
    /// after that count for a rejoin (a worker killed right after a heartbeat and failed
    /// at once by its peers' report must not look alive).
    failed_seen_ms: BTreeMap<WorkerId, u64>,
    /// Each worker's progress counter (its newest completed step) and when it last moved.
    steps: BTreeMap<WorkerId, (u64, u64)>,
    /// The newest silence report naming each worker.
    silent: BTreeMap<WorkerId, SilenceReport>,
    /// The trace of the newest silence report naming each worker, and when it came: the
    /// decision about that worker joins it. Kept apart from `silent`, which a decision
    /// consumes before the duty that proposes it asks for the trace.
    report_traces: BTreeMap<WorkerId, (TraceParent, u64)>,
    /// When each worker last reported waiting on a silent peer (it is blocked itself).
    waiting_ms: BTreeMap<WorkerId, u64>,
    /// Workers made suspect by a silence report, with the step they must move past.
    must_progress: BTreeMap<WorkerId, u64>,
    /// Each worker's recent gaps between heartbeats, in ms (gaps of a lease break left
    /// out): how late its heartbeats run on its host right now.
    gaps: BTreeMap<WorkerId, std::collections::VecDeque<u64>>,
}

impl Leases {
    pub fn new(now_ms: u64) -> Self {
        Leases {
            leader_since_ms: now_ms,
            last_heartbeat_ms: BTreeMap::new(),
            streak_since_ms: BTreeMap::new(),
            failed_seen_ms: BTreeMap::new(),
            steps: BTreeMap::new(),
            silent: BTreeMap::new(),
            report_traces: BTreeMap::new(),
            waiting_ms: BTreeMap::new(),
            must_progress: BTreeMap::new(),
            gaps: BTreeMap::new(),
        }
    }

    /// How long `worker`'s heartbeats must have stopped before a silence report about it
    /// is confirmed.
    pub fn silent_confirm_ms(&self, worker: &str, cfg: &LeaseConfig) -> u64 {
        let longest = self
            .gaps
            .get(worker)
            .and_then(|g| g.iter().copied().max())
            .unwrap_or(0);
        // Never above the lease's own bar: a worker quiet for `suspect_after_ms` is
        // suspected on that alone, so with a fresh report naming it silent as well, the
        // report decides (failed, with the peer's evidence) rather than a bare suspect.
        cfg.silent_confirm_ms.max(
            longest
                .saturating_mul(SILENT_CONFIRM_GAPS)
                .min(cfg.suspect_after_ms),
        )
    }

    /// A heartbeat's progress counter: the worker's newest completed step.
    pub fn progress(&mut self, worker: &str, step: u64, now_ms: u64) {
        match self.steps.get_mut(worker) {
            Some((s, _)) if *s == step => {}
            _ => {
                self.steps.insert(worker.to_string(), (step, now_ms));
            }
        }
    }

    /// `reporter` waits on the rank `report.rank` of plan epoch `report.epoch`, which is
    /// `named`, and has heard nothing from it for `report.silent_ms` (the caller resolved
    /// the rank in the current plan; reports about other epochs never get here).
    pub fn silence_report(
        &mut self,
        reporter: &str,
        named: &str,
        report: &SilentPeer,
        now_ms: u64,
    ) {
        self.waiting_ms.insert(reporter.to_string(), now_ms);
        self.silent.insert(
            named.to_string(),
            SilenceReport {
                reporter: reporter.to_string(),
                epoch: report.epoch,
                rank: report.rank,
                silent_ms: report.silent_ms,
                at_ms: now_ms,
            },
        );
        if let Some(t) = &report.trace {
            self.report_traces
                .insert(named.to_string(), (t.clone(), now_ms));
        }
    }

    /// When this leader last heard `worker`'s heartbeat (or its registration), on its
    /// clock: where the leader's own evidence about it begins.
    pub fn last_heartbeat(&self, worker: &str) -> Option<u64> {
        self.last_heartbeat_ms.get(worker).copied()
    }

    /// The trace of the newest silence report naming `worker` that still counts
    /// (`report_ttl_ms`), for the decision about it; taken, so that one detection leads
    /// to one decision in its trace.
    pub fn take_report_trace(
        &mut self,
        worker: &str,
        now_ms: u64,
        cfg: &LeaseConfig,
    ) -> Option<TraceParent> {
        let (t, at) = self.report_traces.remove(worker)?;
        (now_ms.saturating_sub(at) <= cfg.report_ttl_ms).then_some(t)
    }

    /// The decision a fresh silence report about `w` supports, if any: failed when its
    /// heartbeats have stopped too; nothing when it is itself waiting on a silent peer (a
    /// victim further along the ring); suspect when it heartbeats but its progress counter
    /// has not moved for `suspect_after_ms` (it must prove progress).
    fn judge_silence(
        &mut self,
        w: &WorkerInfo,
        heard_ms: Option<u64>,
        now_ms: u64,
        cfg: &LeaseConfig,
    ) -> Option<(LeaseDecision, Reason)> {
        let r = self
            .silent
            .get(&w.id)
            .filter(|r| now_ms.saturating_sub(r.at_ms) <= cfg.report_ttl_ms)?
            .clone();
        let evidence = format!(
            "{} reported rank {} of epoch {} silent for {} ms",
            r.reporter, r.rank, r.epoch, r.silent_ms
        );
        let quiet_ms = now_ms.saturating_sub(heard_ms.unwrap_or(self.leader_since_ms));
        let confirm_ms = self.silent_confirm_ms(&w.id, cfg);
        // Relative staleness: the reporter's own heartbeats must be current, or it is this
        // leader that has fallen behind (a slow disk, a starved thread), not the worker.
        let reporter_quiet_ms = self
            .last_heartbeat_ms
            .get(&r.reporter)
            .map_or(u64::MAX, |t| now_ms.saturating_sub(*t));
        if quiet_ms >= confirm_ms && reporter_quiet_ms < confirm_ms / 2 {
            self.silent.remove(&w.id);
            return Some((
                LeaseDecision::MarkFailed,
                format!(
                    "{evidence}, and its heartbeats stopped {quiet_ms} ms ago (confirmed after {confirm_ms} ms: silent_confirm_ms {}, or {SILENT_CONFIRM_GAPS} x its longest recent heartbeat gap)",
                    cfg.silent_confirm_ms
                ),
            ));
        }
        let waiting = self
            .waiting_ms
            .get(&w.id)
            .is_some_and(|t| now_ms.saturating_sub(*t) <= cfg.report_ttl_ms);
        if waiting || w.health == WorkerHealth::Suspect {
            return None;
        }
        let (step, since) = *self.steps.get(&w.id)?;
        let still_ms = now_ms.saturating_sub(since);
        (still_ms >= cfg.suspect_after_ms).then(|| {
            self.must_progress.insert(w.id.clone(), step);
            (
                LeaseDecision::MarkSuspect,
                format!(
                    "{evidence}; its heartbeats are fresh but its step has stayed at {step} for {still_ms} ms: it must prove progress"
                ),
            )
        })
    }

    /// A worker made suspect by a silence report: healthy again once its step moves, failed
    /// when it has not moved for `fail_after_ms` while its peers wait on it.
    fn judge_progress(
        &mut self,
        w: &WorkerInfo,
        now_ms: u64,
        cfg: &LeaseConfig,
    ) -> Option<(LeaseDecision, Reason)> {
        let owed = *self.must_progress.get(&w.id)?;
        let (step, since) = *self.steps.get(&w.id)?;
        if step > owed {
            self.must_progress.remove(&w.id);
            self.silent.remove(&w.id);
            return Some((
                LeaseDecision::MarkHealthy,
                format!("progress proved: step {owed} -> {step}"),
            ));
        }
        let still_ms = now_ms.saturating_sub(since);
        (still_ms >= cfg.fail_after_ms).then(|| {
            self.must_progress.remove(&w.id);
            (
                LeaseDecision::MarkFailed,
                format!(
                    "no progress past step {step} for {still_ms} ms while its peers wait on it (fail_after_ms {})",
                    cfg.fail_after_ms
                ),
            )
        })
    }

    pub fn heartbeat(&mut self, worker: &str, now_ms: u64, cfg: &LeaseConfig) {
        let previous = self.last_heartbeat_ms.insert(worker.to_string(), now_ms);
        let gap = previous.is_none_or(|p| now_ms.saturating_sub(p) >= cfg.suspect_after_ms);
        if gap {
            self.streak_since_ms.insert(worker.to_string(), now_ms);
        } else if let Some(p) = previous {
            let g = self.gaps.entry(worker.to_string()).or_default();
            if g.len() == GAPS_KEPT {
                g.pop_front();
            }
            g.push_back(now_ms.saturating_sub(p));
        }
    }

    /// Decisions for workers whose recorded health disagrees with their lease.
    pub fn decide(
        &mut self,
        now_ms: u64,
        workers: &BTreeMap<WorkerId, WorkerInfo>,
        cfg: &LeaseConfig,
    ) -> Vec<(WorkerId, LeaseDecision, Reason)> {
        self.failed_seen_ms.retain(|id, _| {
            workers
                .get(id)
                .is_some_and(|w| w.health == WorkerHealth::Failed)
        });
        for w in workers
            .values()
            .filter(|w| w.health == WorkerHealth::Failed)
        {
            self.failed_seen_ms.entry(w.id.clone()).or_insert(now_ms);
        }
        let mut out = Vec::new();
        let grace_end = self.leader_since_ms.saturating_add(cfg.grace_ms);
        for w in workers.values() {
            if w.health == WorkerHealth::Failed {
                if let Some(reason) = self.rejoins(&w.id, now_ms, cfg) {
                    out.push((w.id.clone(), LeaseDecision::Rejoin, reason));
                }
                continue;
            }
            let judged = matches!(
                w.health,
                WorkerHealth::Joining
                    | WorkerHealth::Healthy
                    | WorkerHealth::Suspect
                    | WorkerHealth::Spare
            );
            if !judged {
                continue;
            }
            let heard = self.last_heartbeat_ms.get(&w.id).copied();
            // A debt of progress (a silence report made the worker suspect) lasts until the
            // worker proves progress or is failed. A healthy worker that owes it is one
            // whose suspect decision is still on its way through the log: its recorded
            // health does not clear the debt, or the suspect decision, once applied, would
            // be undone at once by fresh heartbeats ("heartbeats resumed"), and the next
            // report would make it suspect again, over and over.
            let owes = match (self.must_progress.get(&w.id), self.steps.get(&w.id)) {
                (Some(owed), Some((step, _))) => step <= owed,
                (owed, _) => owed.is_some(),
            };
            let debt_stands =
                owes && matches!(w.health, WorkerHealth::Suspect | WorkerHealth::Healthy);
            if !debt_stands && w.health != WorkerHealth::Suspect {
                self.must_progress.remove(&w.id);
            }
            if self.must_progress.contains_key(&w.id) {
                if let Some((d, reason)) = self.judge_progress(w, now_ms, cfg) {
                    out.push((w.id.clone(), d, reason));
                    continue;
                }
                // A suspect that owes progress is not cleared by fresh heartbeats alone.
                if heard.is_some_and(|h| now_ms.saturating_sub(h) < cfg.suspect_after_ms) {
                    continue;
                }
            }
            let unjudged = heard.is_none() && now_ms < grace_end;
            if let Some((d, reason)) = (!unjudged)
                .then(|| self.judge_silence(w, heard, now_ms, cfg))
                .flatten()
            {
                out.push((w.id.clone(), d, reason));
                continue;
            }
            let since = heard.unwrap_or(0).max(grace_end);
            let silent_ms = now_ms.saturating_sub(since);
            if now_ms < grace_end && heard.is_none() {
                continue;
            }
            if silent_ms >= cfg.fail_after_ms {
                out.push((
                    w.id.clone(),
                    LeaseDecision::MarkFailed,
                    format!(
                        "no heartbeat for {silent_ms} ms (fail_after_ms {})",
                        cfg.fail_after_ms
                    ),
                ));
            } else if silent_ms >= cfg.suspect_after_ms {
                if w.health != WorkerHealth::Suspect {
                    out.push((
                        w.id.clone(),
                        LeaseDecision::MarkSuspect,
                        format!(
                            "no heartbeat for {silent_ms} ms (suspect_after_ms {})",
                            cfg.suspect_after_ms
                        ),
                    ));
                }
            } else if w.health == WorkerHealth::Suspect && heard.is_some() {
                out.push((
                    w.id.clone(),
                    LeaseDecision::MarkHealthy,
                    "heartbeats resumed".into(),
                ));
            }
        }
        out
    }

    /// Why a failed worker rejoins: it is heartbeating now, and has been, without a gap
    /// and since it was failed, for `rejoin_after_ms`.
    fn rejoins(&self, id: &str, now_ms: u64, cfg: &LeaseConfig) -> Option<Reason> {
        let heard = *self.last_heartbeat_ms.get(id)?;
        let failed = *self.failed_seen_ms.get(id)?;
        if heard <= failed {
            return None;
        }
        let since = (*self.streak_since_ms.get(id)?).max(failed);
        let steady_ms = now_ms.saturating_sub(since);
        (now_ms.saturating_sub(heard) < cfg.suspect_after_ms && steady_ms >= cfg.rejoin_after_ms)
            .then(|| {
                format!(
                    "heartbeats came back after it was failed, steady for {steady_ms} ms (rejoin_after_ms {})",
                    cfg.rejoin_after_ms
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(epoch: u64, rank: u32, silent_ms: u64) -> SilentPeer {
        SilentPeer {
            epoch,
            rank,
            silent_ms,
            trace: None,
        }
    }

    fn workers(ws: &[(&str, WorkerHealth)]) -> BTreeMap<WorkerId, WorkerInfo> {
        ws.iter()
            .map(|(id, h)| {
                let w = WorkerInfo {
                    id: id.to_string(),
                    address: format!("127.0.0.1:1{}", id.len()),
                    device: Default::default(),
                    health: *h,
                    health_reason: String::new(),
                    registered_index: 1,
                };
                (id.to_string(), w)
            })
            .collect()
    }

    /// Four ranks a..d in a ring; `b` hangs (its heartbeats stop) at t=1000. Its right
    /// neighbour `c` names it; `d` and `a`, further along, name their own left
    /// neighbours, which are themselves waiting.
    #[test]
    fn a_silence_report_with_stopped_heartbeats_fails_the_worker_and_spares_the_victims() {
        let cfg = LeaseConfig {
            grace_ms: 0,
            ..LeaseConfig::default()
        };
        let ws = workers(&[
            ("a", WorkerHealth::Healthy),
            ("b", WorkerHealth::Healthy),
            ("c", WorkerHealth::Healthy),
            ("d", WorkerHealth::Healthy),
        ]);
        let mut l = Leases::new(0);
        for t in (0..=1_000).step_by(100) {
            for w in ["a", "b", "c", "d"] {
                l.heartbeat(w, t, &cfg);
                l.progress(w, t / 100, t);
            }
        }
        let beat = |l: &mut Leases, t: u64| {
            for w in ["a", "c", "d"] {
                l.heartbeat(w, t, &cfg);
            }
        };
        beat(&mut l, 1_150);
        l.silence_report("c", "b", &sp(3, 1, 150), 1_150);
        l.silence_report("d", "c", &sp(3, 2, 150), 1_160);
        l.silence_report("a", "d", &sp(3, 3, 150), 1_170);
        // b's last heartbeat is 300 ms old: not yet confirmed.
        assert!(l.decide(1_300, &ws, &cfg).is_empty());
        beat(&mut l, 1_400);
        let d = l.decide(1_500, &ws, &cfg);
        assert_eq!(d.len(), 1, "{d:?}");
        let (who, decision, reason) = &d[0];
        assert_eq!((who.as_str(), decision), ("b", &LeaseDecision::MarkFailed));
        assert!(
            reason.contains("c reported rank 1 of epoch 3 silent for 150 ms")
                && reason.contains("heartbeats stopped 500 ms ago"),
            "{reason}"
        );
    }

    #[test]
    fn a_leader_behind_on_every_heartbeat_confirms_nothing() {
        let cfg = LeaseConfig {
            grace_ms: 0,
            ..LeaseConfig::default()
        };
        let ws = workers(&[("w", WorkerHealth::Healthy), ("p", WorkerHealth::Healthy)]);
        let mut l = Leases::new(0);
        for t in (0..=1_000).step_by(100) {
            l.heartbeat("w", t, &cfg);
            l.heartbeat("p", t, &cfg);
        }
        l.silence_report("p", "w", &sp(1, 0, 200), 1_000);
        // The leader's loop stalled 700 ms: both look quiet, so nothing is confirmed.
        assert!(l.decide(1_700, &ws, &cfg).is_empty());
        // Once the reporter's heartbeats are processed again, w's silence is confirmed.
        l.heartbeat("p", 1_750, &cfg);
        let d = l.decide(1_760, &ws, &cfg);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1, LeaseDecision::MarkFailed);
    }

    #[test]
    fn late_heartbeats_of_a_loaded_host_raise_the_confirmation_bar() {
        let cfg = LeaseConfig {
            grace_ms: 0,
            ..LeaseConfig::default()
        };
        let ws = workers(&[("w", WorkerHealth::Healthy)]);
        let mut l = Leases::new(0);
        // A loaded host: heartbeats every 100 ms, but one came 300 ms late.
        for t in [0, 100, 200, 500, 600, 700] {
            l.heartbeat("w", t, &cfg);
        }
        assert_eq!(l.silent_confirm_ms("w", &cfg), 900);
        l.silence_report("p", "w", &sp(1, 0, 200), 1_000);
        l.heartbeat("p", 1_150, &cfg);
        assert!(
            l.decide(1_200, &ws, &cfg).is_empty(),
            "500 ms late is not yet stopped"
        );
        l.heartbeat("p", 1_550, &cfg);
        let d = l.decide(1_600, &ws, &cfg);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].1, LeaseDecision::MarkFailed);
        assert!(d[0].2.contains("confirmed after 900 ms"), "{d:?}");
    }

    /// Gaps of 900 ms would put the bar at 2.7 s, past `suspect_after_ms` (2 s), and the
    /// lease would suspect the worker on its silence alone although a peer reported it.
    /// The bar stops at `suspect_after_ms`, so the report decides: failed, with its
    /// evidence, and no "no heartbeat" suspect first.
    #[test]
    fn the_confirmation_bar_stops_at_the_leases_own() {
        let cfg = LeaseConfig {
            grace_ms: 0,
            ..LeaseConfig::default()
        };
        let ws = workers(&[("w", WorkerHealth::Healthy), ("p", WorkerHealth::Healthy)]);
        let mut l = Leases::new(0);
        for t in [0, 900, 1_800, 2_700] {
            l.heartbeat("w", t, &cfg);
        }
        assert_eq!(l.silent_confirm_ms("w", &cfg), cfg.suspect_after_ms);
        l.silence_report("p", "w", &sp(1, 0, 300), 3_000);
        for t in (3_000..4_700).step_by(100) {
            l.heartbeat("p", t, &cfg);
            assert!(l.decide(t, &ws, &cfg).is_empty(), "at {t}");
        }
        l.heartbeat("p", 4_700, &cfg);
        let d = l.decide(4_700, &ws, &cfg);
        assert_eq!(d.len(), 1, "{d:?}");
        let (who, decision, reason) = &d[0];
        assert_eq!((who.as_str(), decision), ("w", &LeaseDecision::MarkFailed));
        assert!(
            reason.contains("p reported rank 0 of epoch 1 silent")
                && reason.contains("confirmed after 2000 ms"),
            "{reason}"
        );
    }

    /// The suspect decision takes a while through the log; meanwhile the worker is still
    /// recorded healthy, and it reports a silent peer itself (a victim further along the
    /// ring). Once the decision is applied, its fresh heartbeats must not undo it: it owes
    /// progress. Before, the debt was dropped while the decision was in flight, and the
    /// worker flapped suspect / healthy every tick, flooding the event log.
    #[test]
    fn a_suspect_decision_in_flight_keeps_the_debt_of_progress() {
        let cfg = LeaseConfig {
            grace_ms: 0,
            ..LeaseConfig::default()
        };
        let mut ws = workers(&[("p", WorkerHealth::Healthy), ("w", WorkerHealth::Healthy)]);
        let mut l = Leases::new(0);
        for t in (0..=3_000).step_by(100) {
            l.heartbeat("p", t, &cfg);
            l.heartbeat("w", t, &cfg);
            l.progress("w", 42, t);
        }
        l.silence_report("p", "w", &sp(1, 0, 0), 2_950);
        let d = l.decide(3_000, &ws, &cfg);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1, LeaseDecision::MarkSuspect);
        // Not yet applied; w reports a silent peer of its own.
        l.silence_report("w", "p", &sp(1, 0, 0), 3_020);
        l.heartbeat("w", 3_040, &cfg);
        l.heartbeat("p", 3_040, &cfg);
        assert!(l.decide(3_050, &ws, &cfg).is_empty());
        // Applied: w is suspect, and its fresh heartbeats do not clear it.
        ws.get_mut("w").unwrap().health = WorkerHealth::Suspect;
        let mut decided = Vec::new();
        for t in (3_100..=4_000).step_by(50) {
            l.heartbeat("w", t, &cfg);
            l.heartbeat("p", t, &cfg);
            l.progress("w", 42, t);
            decided.extend(l.decide(t, &ws, &cfg));
        }
        assert!(decided.is_empty(), "{decided:?}");
        // It proves progress: healthy again, once.
        l.progress("w", 43, 4_050);
        let d = l.decide(4_050, &ws, &cfg);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1, LeaseDecision::MarkHealthy);
        assert!(d[0].2.contains("progress proved"), "{d:?}");
    }

    #[test]
    fn a_slow_worker_named_silent_proves_progress_and_a_stuck_live_one_fails() {
        let cfg = LeaseConfig {
            grace_ms: 0,
            ..LeaseConfig::default()
        };
        let ws = workers(&[("s", WorkerHealth::Healthy)]);
        let mut l = Leases::new(0);
        // Named silent while its step keeps moving (a straggler): no decision at all.
        for t in (0..=6_000).step_by(100) {
            l.heartbeat("s", t, &cfg);
            l.progress("s", t / 300, t);
            if t % 500 == 0 {
                l.silence_report("p", "s", &sp(1, 0, 200), t);
            }
            assert!(l.decide(t, &ws, &cfg).is_empty(), "t={t}");
        }
        // Its compute hangs while its heartbeat thread lives (step stays at 20).
        let mut decisions = Vec::new();
        let mut ws = ws;
        for t in (6_100..=14_000).step_by(100) {
            l.heartbeat("s", t, &cfg);
            l.progress("s", 20, t);
            l.silence_report("p", "s", &sp(1, 0, 200), t);
            for (w, d, r) in l.decide(t, &ws, &cfg) {
                ws.get_mut(&w).unwrap().health = d.health();
                decisions.push((t, d, r));
            }
        }
        assert_eq!(decisions.len(), 2, "{decisions:?}");
        assert_eq!(decisions[0].1, LeaseDecision::MarkSuspect);
        assert!(
            decisions[0].2.contains("must prove progress"),
            "{decisions:?}"
        );
        assert_eq!(decisions[1].1, LeaseDecision::MarkFailed);
        assert!(
            decisions[1].2.contains("no progress past step 20"),
            "{decisions:?}"
        );
        // A suspect that moves again is healthy.
        let mut l2 = Leases::new(0);
        let mut ws2 = workers(&[("s", WorkerHealth::Healthy)]);
        for t in (0..=2_500).step_by(100) {
            l2.heartbeat("s", t, &cfg);
            l2.progress("s", 7, t);
            l2.silence_report("p", "s", &sp(1, 0, 200), t);
            for (w, d, _) in l2.decide(t, &ws2, &cfg) {
                ws2.get_mut(&w).unwrap().health = d.health();
            }
        }
        assert_eq!(ws2["s"].health, WorkerHealth::Suspect);
        l2.heartbeat("s", 2_600, &cfg);
        l2.progress("s", 8, 2_600);
        let d = l2.decide(2_600, &ws2, &cfg);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].1, LeaseDecision::MarkHealthy);
        assert!(d[0].2.contains("progress proved: step 7 -> 8"), "{d:?}");
    }

    #[test]
    fn leases_respect_grace_then_fail() {
        let cfg = LeaseConfig {
            suspect_after_ms: 100,
            fail_after_ms: 300,
            grace_ms: 500,
            rejoin_after_ms: 200,
            ..LeaseConfig::default()
        };
        let ws = workers(&[("a", WorkerHealth::Healthy), ("b", WorkerHealth::Healthy)]);
        let mut l = Leases::new(1_000);
        assert!(l.decide(1_400, &ws, &cfg).is_empty(), "grace period");
        l.heartbeat("a", 1_450, &cfg);
        assert!(l.decide(1_500, &ws, &cfg).is_empty());
        let d = l.decide(1_650, &ws, &cfg);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|(_, d, _)| *d == LeaseDecision::MarkSuspect));
        let d = l.decide(1_900, &ws, &cfg);
        assert!(
            d.iter().all(|(_, d, _)| *d == LeaseDecision::MarkFailed),
            "{d:?}"
        );
    }

    #[test]
    fn a_failed_worker_rejoins_only_after_steady_heartbeats() {
        let cfg = LeaseConfig {
            suspect_after_ms: 100,
            fail_after_ms: 300,
            grace_ms: 0,
            rejoin_after_ms: 200,
            ..LeaseConfig::default()
        };
        // Killed right after a steady run of heartbeats and failed at once by its peers:
        // the heartbeats before the failure do not count.
        let mut k = Leases::new(0);
        for t in (0..=900).step_by(50) {
            k.heartbeat("k", t, &cfg);
            assert!(k
                .decide(t, &workers(&[("k", WorkerHealth::Healthy)]), &cfg)
                .is_empty());
        }
        let dead = workers(&[("k", WorkerHealth::Failed)]);
        assert!(
            k.decide(920, &dead, &cfg).is_empty(),
            "a dead worker does not rejoin"
        );
        assert!(k.decide(1_500, &dead, &cfg).is_empty());

        // Hung, failed, then back.
        let ws = workers(&[("a", WorkerHealth::Failed)]);
        let mut l = Leases::new(0);
        assert!(l.decide(990, &ws, &cfg).is_empty(), "failed, seen at 990");
        l.heartbeat("a", 1_000, &cfg);
        assert!(
            l.decide(1_050, &ws, &cfg).is_empty(),
            "one heartbeat is no comeback"
        );
        for t in (1_050..=1_200).step_by(50) {
            l.heartbeat("a", t, &cfg);
        }
        let d = l.decide(1_210, &ws, &cfg);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].1, LeaseDecision::Rejoin);
        assert_eq!(d[0].1.health(), WorkerHealth::Joining);
        // A gap restarts the streak.
        l.heartbeat("a", 1_500, &cfg);
        assert!(l.decide(1_550, &ws, &cfg).is_empty());
        // Silent again: no rejoin on old heartbeats.
        assert!(l.decide(2_000, &ws, &cfg).is_empty());
    }
}
