//! What a run measured, and every expectation checked against it: pure functions, so a
//! report can be re-checked and the rules tested without a cluster.

use phalanx_proto::EventKind;
use phalanx_proto::RaftRole;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::Expect;

/// An event of the controller's log, with the time the runner first saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeenEvent {
    pub seq: u64,
    /// Seconds since the job's submission (at the runner's poll that first saw it).
    pub t_s: f64,
    pub kind: EventKind,
    pub subject: String,
    pub reason: String,
}

/// A recovery, as the job reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryM {
    pub epoch: u64,
    pub source: String,
    pub resumed_at_step: u64,
    pub steps_redone: u64,
    pub mttr_s: Option<f64>,
}

/// A controller's view at one poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderSample {
    pub t_s: f64,
    pub node: u64,
    pub role: RaftRole,
    pub term: u64,
    /// 0 when it knows none.
    pub leader: u64,
}

/// Everything the expectations are checked against.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Measured {
    pub completed: bool,
    /// `completed`, `cancelled`, `running`, ... or `unknown`.
    pub final_state: String,
    pub progress_step: u64,
    pub params_sha256: Option<String>,
    pub reference_sha256: Option<String>,
    pub recoveries: Vec<RecoveryM>,
    pub effective_training_time: Option<f64>,
    pub events: Vec<SeenEvent>,
    pub leaders: Vec<LeaderSample>,
    /// From the submission to the job's end (or the run's end).
    pub wall_s: f64,
}

impl Measured {
    pub fn lost_steps(&self) -> u64 {
        self.recoveries.iter().map(|r| r.steps_redone).sum()
    }
    pub fn max_mttr_s(&self) -> Option<f64> {
        self.recoveries
            .iter()
            .filter_map(|r| r.mttr_s)
            .max_by(f64::total_cmp)
    }
    /// The most distinct nodes that called themselves leader in one term, and that term.
    pub fn leaders_per_term(&self) -> (usize, u64) {
        let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for s in &self.leaders {
            if s.role == RaftRole::Leader {
                by_term.entry(s.term).or_default().insert(s.node);
            }
        }
        by_term
            .iter()
            .map(|(t, l)| (l.len(), *t))
            .max()
            .unwrap_or((0, 0))
    }
}

/// Training wall time minus the recovery windows, over the training wall time.
pub fn effective_training_time(
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
    mttrs_ms: &[u64],
) -> Option<f64> {
    let (a, b) = (started_ms?, finished_ms?);
    let wall = b.checked_sub(a)? as f64;
    if wall <= 0.0 {
        return None;
    }
    let lost: f64 = mttrs_ms.iter().map(|m| *m as f64).sum();
    Some(((wall - lost) / wall).clamp(0.0, 1.0))
}

/// One expectation's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The expectation's key in the file, e.g. `max_mttr_s`.
    pub name: String,
    pub expected: String,
    pub measured: String,
    pub holds: bool,
}

fn v(name: &str, expected: String, measured: String, holds: bool) -> Verdict {
    Verdict {
        name: name.into(),
        expected,
        measured,
        holds,
    }
}

/// Check every expectation of `e` against `m`, in the file's order.
pub fn check(e: &Expect, m: &Measured) -> Vec<Verdict> {
    let mut out = Vec::new();
    out.push(v(
        "completes",
        e.completes.to_string(),
        format!(
            "{} (state {}, step {})",
            m.completed, m.final_state, m.progress_step
        ),
        m.completed == e.completes,
    ));
    if e.bit_exact_with_reference {
        let (sha, rf) = (m.params_sha256.as_deref(), m.reference_sha256.as_deref());
        out.push(v(
            "bit_exact_with_reference",
            format!("params_sha256 = reference {}", rf.unwrap_or("(none)")),
            sha.unwrap_or("(none)").to_string(),
            sha.is_some() && sha == rf,
        ));
    }
    if let Some(max) = e.max_lost_steps {
        let lost = m.lost_steps();
        out.push(v(
            "max_lost_steps",
            format!("<= {max}"),
            format!("{lost} steps redone"),
            lost <= max,
        ));
    }
    if let Some(max) = e.max_mttr_s {
        let mttr = m.max_mttr_s();
        out.push(v(
            "max_mttr_s",
            format!("<= {max} s"),
            match mttr {
                Some(x) => format!("{x:.3} s (worst of {} recoveries)", m.recoveries.len()),
                None => "no recovery measured".into(),
            },
            mttr.is_none_or(|x| x <= max),
        ));
    }
    if let Some(min) = e.min_effective_training_time {
        let eff = m.effective_training_time;
        out.push(v(
            "min_effective_training_time",
            format!(">= {:.1}%", min * 100.0),
            eff.map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "not measured".into()),
            eff.is_some_and(|x| x >= min),
        ));
    }
    if let Some(max) = e.max_leaders_per_term {
        let (n, term) = m.leaders_per_term();
        out.push(v(
            "max_leaders_per_term",
            format!("<= {max}"),
            format!(
                "{n} in term {term} ({} samples of {} terms)",
                m.leaders.len(),
                m.leaders
                    .iter()
                    .map(|l| l.term)
                    .collect::<BTreeSet<_>>()
                    .len()
            ),
            n as u32 <= max,
        ));
    }
    if let Some(min) = e.min_recoveries {
        let n = m.recoveries.len();
        out.push(v(
            "min_recoveries",
            format!(">= {min}"),
            format!("{n}"),
            n >= min as usize,
        ));
    }
    for r in &e.required_events {
        let hit = m
            .events
            .iter()
            .find(|ev| r.matches(ev.kind, &ev.subject, &ev.reason));
        out.push(v(
            "required_events",
            format!("an event {r}"),
            match hit {
                Some(ev) => format!(
                    "#{} at {:.1} s: {} {}: {}",
                    ev.seq, ev.t_s, ev.kind, ev.subject, ev.reason
                ),
                None => format!("none among {} events", m.events.len()),
            },
            hit.is_some(),
        ));
    }
    for f in &e.forbidden_events {
        let hit = m
            .events
            .iter()
            .find(|ev| f.matches(ev.kind, &ev.subject, &ev.reason));
        out.push(v(
            "forbidden_events",
            format!("no event {f}"),
            match hit {
                Some(ev) => format!(
                    "#{} at {:.1} s: {} {}: {}",
                    ev.seq, ev.t_s, ev.kind, ev.subject, ev.reason
                ),
                None => "none".into(),
            },
            hit.is_none(),
        ));
    }
    if let Some(max) = e.max_wall_s {
        out.push(v(
            "max_wall_s",
            format!("<= {max} s"),
            format!("{:.1} s", m.wall_s),
            m.wall_s <= max,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventKind, EventMatch};

    fn measured() -> Measured {
        Measured {
            completed: true,
            final_state: "completed".into(),
            progress_step: 100,
            params_sha256: Some("ab".into()),
            reference_sha256: Some("ab".into()),
            recoveries: vec![
                RecoveryM {
                    epoch: 2,
                    source: "peers".into(),
                    resumed_at_step: 40,
                    steps_redone: 1,
                    mttr_s: Some(0.5),
                },
                RecoveryM {
                    epoch: 3,
                    source: "checkpoint".into(),
                    resumed_at_step: 50,
                    steps_redone: 9,
                    mttr_s: Some(2.5),
                },
            ],
            effective_training_time: Some(0.9),
            events: vec![SeenEvent {
                seq: 7,
                t_s: 3.0,
                kind: EventKind::StragglerShare,
                subject: "w2".into(),
                reason: "rank 2 is slow".into(),
            }],
            leaders: vec![
                LeaderSample {
                    t_s: 0.0,
                    node: 1,
                    role: RaftRole::Leader,
                    term: 2,
                    leader: 1,
                },
                LeaderSample {
                    t_s: 0.1,
                    node: 2,
                    role: RaftRole::Follower,
                    term: 2,
                    leader: 1,
                },
            ],
            wall_s: 30.0,
        }
    }

    #[test]
    fn every_expectation_holds_on_a_good_run() {
        let e = Expect {
            bit_exact_with_reference: true,
            max_lost_steps: Some(10),
            max_mttr_s: Some(3.0),
            min_effective_training_time: Some(0.85),
            max_leaders_per_term: Some(1),
            min_recoveries: Some(2),
            required_events: vec![EventMatch {
                kind: EventKind::StragglerShare,
                contains: Some("rank 2".into()),
            }],
            forbidden_events: vec![EventMatch {
                kind: EventKind::WorkerQuarantined,
                contains: None,
            }],
            max_wall_s: Some(60.0),
            ..Expect::default()
        };
        let verdicts = check(&e, &measured());
        assert_eq!(verdicts.len(), 10);
        assert!(verdicts.iter().all(|v| v.holds), "{verdicts:#?}");
    }

    #[test]
    fn each_broken_expectation_names_its_measured_value() {
        let mut m = measured();
        m.params_sha256 = Some("cd".into());
        m.leaders.push(LeaderSample {
            t_s: 0.2,
            node: 3,
            role: RaftRole::Leader,
            term: 2,
            leader: 3,
        });
        let e = Expect {
            bit_exact_with_reference: true,
            max_lost_steps: Some(5),
            max_mttr_s: Some(0.001),
            min_effective_training_time: Some(0.95),
            max_leaders_per_term: Some(1),
            required_events: vec![EventMatch {
                kind: EventKind::StragglerShare,
                contains: Some("rank 3".into()),
            }],
            forbidden_events: vec![EventMatch {
                kind: EventKind::StragglerShare,
                contains: None,
            }],
            max_wall_s: Some(10.0),
            ..Expect::default()
        };
        let failed: Vec<(String, String)> = check(&e, &m)
            .into_iter()
            .filter(|v| !v.holds)
            .map(|v| (v.name, v.measured))
            .collect();
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bit_exact_with_reference",
                "max_lost_steps",
                "max_mttr_s",
                "min_effective_training_time",
                "max_leaders_per_term",
                "required_events",
                "forbidden_events",
                "max_wall_s"
            ]
        );
        assert_eq!(failed[1].1, "10 steps redone");
        assert!(failed[2].1.starts_with("2.500 s"), "{}", failed[2].1);
        assert!(failed[4].1.starts_with("2 in term 2"), "{}", failed[4].1);
    }

    #[test]
    fn effective_time_subtracts_the_recovery_windows() {
        assert_eq!(
            effective_training_time(Some(1000), Some(11_000), &[500, 500]),
            Some(0.9)
        );
        assert_eq!(effective_training_time(None, Some(1), &[]), None);
        assert_eq!(effective_training_time(Some(5), Some(5), &[]), None);
        assert_eq!(effective_training_time(Some(0), Some(10), &[50]), Some(0.0));
    }
}
