//! Pure policies. Each returns a decision with the reason that lands in the event log.

use std::collections::BTreeMap;

use phalanx_proto::{JobSpec, Plan, WorkerHealth, WorkerId, WorkerInfo};

/// Why a policy decided what it decided.
pub type Reason = String;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementDecision {
    /// The current plan stands.
    Keep,
    /// Replace the plan: rank `i` runs on `ranks[i]`.
    NewPlan { ranks: Vec<WorkerId> },
    /// Too few placeable workers: run nothing until more arrive.
    Wait,
}

/// Decide the placement of a job on the placeable workers.
///
/// Ranks go to placeable workers in id order, so the same state always gives the same
/// plan. Surviving workers keep their relative order, which keeps re-sharding small.
///
/// `waiting`: the job stopped for want of workers, so `current` is no longer running; a
/// placement then always makes a new plan, even on exactly the old plan's workers (their
/// group broke up when the job stopped, and they wait for a new epoch).
///
/// Only workers of the job's numerics profile ([`JobSpec::numerics`], reported by each
/// worker in its [`phalanx_proto::DeviceSpec`]) get a rank, and only workers of one CPU
/// vendor ([`plan_vendor`]), so every rank of a plan computes the same bits; the reason
/// names the workers left out for their profile or vendor.
pub fn place(
    spec: &JobSpec,
    current: Option<&Plan>,
    waiting: bool,
    workers: &BTreeMap<WorkerId, WorkerInfo>,
) -> (PlacementDecision, Reason) {
    let profile = |w: &WorkerInfo| w.device.numerics == spec.numerics;
    let vendor = plan_vendor(spec, current, workers);
    let class = |w: &WorkerInfo| {
        profile(w)
            && vendor
                .as_ref()
                .is_none_or(|(v, _)| w.device.cpu_vendor == *v)
    };
    let fits = |w: &WorkerInfo| w.health.placeable() && class(w);
    // A suspect keeps the rank it holds: suspicion asks for proof (heartbeats, progress),
    // and only a failure, a drain or a quarantine takes a rank away, so one slow or
    // briefly silent rank is not evicted. It gets no new rank while suspect.
    let in_plan = |w: &WorkerInfo| current.is_some_and(|p| p.ranks.contains(&w.id));
    let holds =
        |w: &WorkerInfo| fits(w) || (w.health == WorkerHealth::Suspect && class(w) && in_plan(w));
    let placeable: Vec<&WorkerId> = workers
        .values()
        .filter(|w| holds(w))
        .map(|w| &w.id)
        .collect();
    let other_profile: Vec<String> = workers
        .values()
        .filter(|w| w.health.placeable() && !profile(w))
        .map(|w| format!("{} ({})", w.id, w.device.numerics))
        .collect();
    let other_vendor: Vec<String> = workers
        .values()
        .filter(|w| w.health.placeable() && profile(w) && !class(w))
        .map(|w| format!("{} ({})", w.id, vendor_name(&w.device.cpu_vendor)))
        .collect();
    let mut left_out = String::new();
    if !other_profile.is_empty() {
        left_out += &format!(
            "; left out for their numerics profile (the job needs {}): {}",
            spec.numerics,
            other_profile.join(", ")
        );
    }
    if let Some((v, why)) = vendor.as_ref().filter(|_| !other_vendor.is_empty()) {
        left_out += &format!(
            "; left out for their CPU vendor (the plan computes on {}, {why}): {}",
            vendor_name(v),
            other_vendor.join(", ")
        );
    }
    let min = spec.world_size_min as usize;
    let max = spec.world_size_max as usize;
    if placeable.len() < min {
        return (
            PlacementDecision::Wait,
            format!(
                "{} placeable workers, job needs at least {min}{left_out}",
                placeable.len()
            ),
        );
    }
    if let Some(plan) = current.filter(|_| !waiting) {
        let all_alive = plan
            .ranks
            .iter()
            .all(|id| workers.get(id).map(holds).unwrap_or(false));
        let can_grow = plan.ranks.len() < max && placeable.len() > plan.ranks.len();
        if all_alive && !can_grow {
            return (
                PlacementDecision::Keep,
                "every rank's worker is placeable".into(),
            );
        }
    }
    let mut ranks: Vec<WorkerId> = Vec::with_capacity(max);
    // Keep the survivors of the current plan first, in their rank order.
    if let Some(plan) = current {
        for id in &plan.ranks {
            if ranks.len() < max && placeable.contains(&id) {
                ranks.push(id.clone());
            }
        }
    }
    for id in placeable {
        if ranks.len() >= max {
            break;
        }
        if !ranks.contains(id) {
            ranks.push(id.clone());
        }
    }
    let reason = match current {
        None => format!("initial placement on {} workers", ranks.len()),
        Some(_) if waiting => format!("resume on {} workers after waiting", ranks.len()),
        Some(p) => format!("re-shard from {} to {} ranks", p.ranks.len(), ranks.len()),
    } + &left_out;
    (PlacementDecision::NewPlan { ranks }, reason)
}

/// How a CPU vendor appears in a reason (`unknown` for a worker that reports none).
fn vendor_name(v: &str) -> &str {
    if v.is_empty() {
        "unknown"
    } else {
        v
    }
}

/// The CPU vendor the job's plan computes on, and why: the numerics libraries take other
/// kernels per vendor, so a plan never mixes vendors. The current plan's vendor (its
/// ranks share one) while at least `world_size_min` placeable workers of the job's profile
/// have it; else the vendor with the most of them (ties: the first by name), which then
/// changes the job's bits from this plan on, and the reason says so. `None` when no worker
/// of the job's profile is placeable.
pub fn plan_vendor(
    spec: &JobSpec,
    current: Option<&Plan>,
    workers: &BTreeMap<WorkerId, WorkerInfo>,
) -> Option<(String, Reason)> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in workers.values() {
        if w.device.numerics == spec.numerics
            && (w.health.placeable()
                || (w.health == WorkerHealth::Suspect
                    && current.is_some_and(|p| p.ranks.contains(&w.id))))
        {
            *counts.entry(w.device.cpu_vendor.as_str()).or_default() += 1;
        }
    }
    let current_vendor = current
        .and_then(|p| {
            p.ranks
                .iter()
                .filter_map(|id| workers.get(id))
                .find(|w| w.device.numerics == spec.numerics)
        })
        .map(|w| w.device.cpu_vendor.as_str());
    let min = (spec.world_size_min as usize).max(1);
    if let Some(v) = current_vendor {
        if counts.get(v).copied().unwrap_or(0) >= min {
            return Some((v.to_string(), "the current plan's".into()));
        }
    }
    // Most workers first; among equals, the first by name (BTreeMap order, stable sort).
    let mut by_size: Vec<(&str, usize)> = counts.into_iter().collect();
    by_size.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let (v, n) = by_size.first().copied()?;
    let why = match current_vendor {
        Some(c) if c != v => format!(
            "fewer than {min} placeable workers of the current plan's {} remain, so the job's bits change from here",
            vendor_name(c)
        ),
        _ => format!("the vendor of most placeable workers, {n}"),
    };
    Some((v.to_string(), why))
}

/// Straggler detection: a rank's compute time against the median of the plan's ranks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StragglerConfig {
    /// Slow when compute time exceeds `threshold` × the median.
    pub threshold: f64,
    /// Hysteresis: the slow count resets only below `clear_below` × the median, so a rank
    /// hovering around the threshold is not flapped in and out.
    pub clear_below: f64,
    /// Consecutive slow observations before a decision, so a brief blip is no failure.
    pub consecutive: u32,
    /// Fewer ranks than this give no meaningful median.
    pub ranks_min: usize,
}

impl Default for StragglerConfig {
    fn default() -> Self {
        StragglerConfig {
            threshold: 2.0,
            clear_below: 1.3,
            consecutive: 6,
            ranks_min: 3,
        }
    }
}

/// What to do about a straggler: first give it fewer micro-batches; if it stays slow and a
/// spare exists, swap it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StragglerDecision {
    ReduceShare,
    SwapForSpare,
}

/// Leader-local straggler state (like leases, never replicated).
#[derive(Debug, Clone, Default)]
pub struct Stragglers {
    slow_count: BTreeMap<WorkerId, u32>,
}

impl Stragglers {
    /// One observation of the plan's ranks' compute times (per micro-batch, so a smaller
    /// share does not hide a slow device). A rank slow for `consecutive` checks first gets
    /// a smaller share; slow again with its share already reduced, it is swapped for a
    /// spare if one exists (otherwise kept: the job is better off slow than smaller).
    pub fn observe(
        &mut self,
        plan: &Plan,
        compute_ms: &BTreeMap<WorkerId, f64>,
        workers: &BTreeMap<WorkerId, WorkerInfo>,
        cfg: &StragglerConfig,
    ) -> Vec<(WorkerId, StragglerDecision, Reason)> {
        let mut samples: Vec<(usize, &WorkerId, f64)> = plan
            .ranks
            .iter()
            .enumerate()
            .filter_map(|(r, id)| compute_ms.get(id).map(|&t| (r, id, t)))
            .filter(|(_, _, t)| t.is_finite() && *t > 0.0)
            .collect();
        self.slow_count.retain(|id, _| plan.ranks.contains(id));
        if samples.len() < cfg.ranks_min {
            return Vec::new();
        }
        let mut sorted: Vec<f64> = samples.iter().map(|(_, _, t)| *t).collect();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted[sorted.len() / 2];
        let mut spares = workers
            .values()
            .filter(|w| w.health == WorkerHealth::Spare)
            .count();
        let mut out = Vec::new();
        samples.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (rank, id, t) in samples {
            let ratio = t / median;
            let count = self.slow_count.entry(id.clone()).or_insert(0);
            if ratio > cfg.threshold {
                *count += 1;
            } else if ratio < cfg.clear_below {
                *count = 0;
            }
            if *count < cfg.consecutive || !out.is_empty() {
                continue;
            }
            let reduced = plan.micro_shares.get(rank).is_some_and(|&s| s <= 1);
            let what = format!(
                "straggler: compute {t:.1} ms per micro-batch, {ratio:.1}x the median {median:.1} ms, \
                 for {count} consecutive checks (threshold {}x)",
                cfg.threshold
            );
            if !reduced {
                out.push((
                    id.clone(),
                    StragglerDecision::ReduceShare,
                    format!("{what}; its micro-batch share is halved"),
                ));
                *count = 0;
            } else if spares > 0 {
                spares -= 1;
                out.push((
                    id.clone(),
                    StragglerDecision::SwapForSpare,
                    format!("{what}, still with a halved share; swapped for a spare"),
                ));
                *count = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn straggler_world(health_of_spare: WorkerHealth) -> (Plan, BTreeMap<WorkerId, WorkerInfo>) {
        let mk = |id: &str, health| WorkerInfo {
            id: id.into(),
            address: String::new(),
            device: Default::default(),
            health,
            health_reason: String::new(),
            registered_index: 0,
        };
        let plan = Plan {
            trace: None,
            epoch: 1,
            ranks: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            reason: String::new(),
            micro_shares: Vec::new(),
        };
        let mut w = BTreeMap::new();
        for id in ["a", "b", "c", "d"] {
            w.insert(id.to_string(), mk(id, WorkerHealth::Healthy));
        }
        w.insert("e".to_string(), mk("e", health_of_spare));
        (plan, w)
    }

    #[test]
    fn a_persistent_straggler_is_swapped_but_a_blip_is_not() {
        let (plan, workers) = straggler_world(WorkerHealth::Spare);
        let cfg = StragglerConfig {
            consecutive: 3,
            ..Default::default()
        };
        let mut s = Stragglers::default();
        let times = |slow: f64| -> BTreeMap<WorkerId, f64> {
            [("a", 10.0), ("b", 11.0), ("c", 10.5), ("d", slow)]
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect()
        };
        // A blip: two slow checks, then back to normal; no decision.
        assert!(s.observe(&plan, &times(40.0), &workers, &cfg).is_empty());
        assert!(s.observe(&plan, &times(40.0), &workers, &cfg).is_empty());
        assert!(s.observe(&plan, &times(10.0), &workers, &cfg).is_empty());
        // Hovering between clear_below and threshold holds the count.
        assert!(s.observe(&plan, &times(40.0), &workers, &cfg).is_empty());
        assert!(s.observe(&plan, &times(17.0), &workers, &cfg).is_empty());
        assert!(s.observe(&plan, &times(40.0), &workers, &cfg).is_empty());
        let d = s.observe(&plan, &times(40.0), &workers, &cfg);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].0.as_str(), &d[0].1),
            ("d", &StragglerDecision::ReduceShare)
        );
        assert!(d[0].2.contains("3.6x the median 11.0 ms"), "{}", d[0].2);
        // Still slow with its share halved: swapped for the spare.
        let reduced = Plan {
            micro_shares: vec![2, 2, 2, 1],
            ..plan.clone()
        };
        for _ in 0..2 {
            assert!(s.observe(&reduced, &times(40.0), &workers, &cfg).is_empty());
        }
        let d = s.observe(&reduced, &times(40.0), &workers, &cfg);
        assert_eq!(d[0].1, StragglerDecision::SwapForSpare);
    }

    #[test]
    fn without_a_spare_a_straggler_keeps_its_reduced_share() {
        let (plan, workers) = straggler_world(WorkerHealth::Failed);
        let cfg = StragglerConfig {
            consecutive: 1,
            ..Default::default()
        };
        let mut s = Stragglers::default();
        let times: BTreeMap<WorkerId, f64> = [("a", 10.0), ("b", 10.0), ("c", 10.0), ("d", 50.0)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert_eq!(
            s.observe(&plan, &times, &workers, &cfg)[0].1,
            StragglerDecision::ReduceShare
        );
        let reduced = Plan {
            micro_shares: vec![2, 2, 2, 1],
            ..plan
        };
        assert!(s.observe(&reduced, &times, &workers, &cfg).is_empty());
    }
    use phalanx_proto::DeviceSpec;

    fn worker(id: &str, health: WorkerHealth) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: format!("127.0.0.1:1{}", id.len()),
            device: DeviceSpec::default(),
            health,
            health_reason: String::new(),
            registered_index: 1,
        }
    }

    fn spec(min: u32, max: u32) -> JobSpec {
        JobSpec {
            name: "j".into(),
            model: phalanx_proto::ModelPreset::Tiny,
            corpus: "c".into(),
            steps: 10,
            global_batch: 8,
            seed: 1,
            checkpoint_interval_steps: 5,
            world_size_min: min,
            world_size_max: max,
            numerics: Default::default(),
            precision: Default::default(),
        }
    }

    fn workers(ws: &[(&str, WorkerHealth)]) -> BTreeMap<WorkerId, WorkerInfo> {
        ws.iter()
            .map(|(id, h)| (id.to_string(), worker(id, *h)))
            .collect()
    }

    #[test]
    fn a_suspect_keeps_its_rank_but_gets_no_new_one() {
        let plan = Plan {
            trace: None,
            epoch: 3,
            ranks: vec!["a".into(), "b".into()],
            reason: String::new(),
            micro_shares: vec![],
        };
        let ws = workers(&[
            ("a", WorkerHealth::Healthy),
            ("b", WorkerHealth::Suspect),
            ("s", WorkerHealth::Spare),
        ]);
        // Suspicion alone evicts nobody: the plan stands (before, b was swapped for s).
        assert_eq!(
            place(&spec(2, 2), Some(&plan), false, &ws).0,
            PlacementDecision::Keep
        );
        // A suspect outside the plan is not placed.
        let ws = workers(&[
            ("a", WorkerHealth::Healthy),
            ("c", WorkerHealth::Suspect),
            ("s", WorkerHealth::Spare),
        ]);
        let plan1 = Plan {
            ranks: vec!["a".into()],
            ..plan
        };
        match place(&spec(1, 3), Some(&plan1), false, &ws).0 {
            PlacementDecision::NewPlan { ranks } => assert_eq!(ranks, vec!["a", "s"]),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn placement_waits_below_minimum_and_keeps_survivor_order() {
        let ws = workers(&[("a", WorkerHealth::Joining)]);
        assert_eq!(
            place(&spec(2, 4), None, false, &ws).0,
            PlacementDecision::Wait
        );
        let ws = workers(&[
            ("a", WorkerHealth::Healthy),
            ("b", WorkerHealth::Failed),
            ("c", WorkerHealth::Healthy),
            ("d", WorkerHealth::Spare),
        ]);
        let plan = Plan {
            trace: None,
            epoch: 1,
            ranks: vec!["c".into(), "b".into(), "a".into()],
            reason: String::new(),
            micro_shares: Vec::new(),
        };
        let (d, reason) = place(&spec(2, 3), Some(&plan), false, &ws);
        assert_eq!(
            d,
            PlacementDecision::NewPlan {
                ranks: vec!["c".into(), "a".into(), "d".into()]
            }
        );
        assert!(reason.contains("re-shard"), "{reason}");
    }

    #[test]
    fn placement_gives_ranks_only_to_workers_of_the_jobs_numerics_profile() {
        use phalanx_proto::NumericsProfile;
        let mut ws = workers(&[
            ("a", WorkerHealth::Joining),
            ("b", WorkerHealth::Joining),
            ("c", WorkerHealth::Joining),
        ]);
        ws.get_mut("b").unwrap().device.numerics = NumericsProfile::Native;
        let (d, reason) = place(&spec(1, 3), None, false, &ws);
        assert_eq!(
            d,
            PlacementDecision::NewPlan {
                ranks: vec!["a".into(), "c".into()]
            }
        );
        assert!(
            reason.contains("b (native)") && reason.contains("x86-64-avx2"),
            "{reason}"
        );
        // Too few workers of the job's profile: wait, and say why.
        let (d, reason) = place(&spec(3, 3), None, false, &ws);
        assert_eq!(d, PlacementDecision::Wait);
        assert!(
            reason.contains("2 placeable") && reason.contains("b (native)"),
            "{reason}"
        );
        // A native job runs on the native worker only.
        let native = JobSpec {
            numerics: NumericsProfile::Native,
            ..spec(1, 3)
        };
        let (d, _) = place(&native, None, false, &ws);
        assert_eq!(
            d,
            PlacementDecision::NewPlan {
                ranks: vec!["b".into()]
            }
        );
        // A plan rank whose worker is of another profile is replaced.
        let plan = Plan {
            trace: None,
            epoch: 1,
            ranks: vec!["a".into(), "b".into()],
            reason: String::new(),
            micro_shares: Vec::new(),
        };
        let (d, _) = place(&spec(1, 2), Some(&plan), false, &ws);
        assert_eq!(
            d,
            PlacementDecision::NewPlan {
                ranks: vec!["a".into(), "c".into()]
            }
        );
    }

    /// MKL and oneDNN compute other bits on another CPU vendor: a plan never mixes
    /// vendors. It takes the vendor of most workers, keeps its vendor while enough of
    /// its workers remain, and switches (saying the bits change) only when they do not.
    #[test]
    fn placement_never_mixes_cpu_vendors_in_one_plan() {
        let mut ws = workers(&[
            ("a", WorkerHealth::Joining),
            ("b", WorkerHealth::Joining),
            ("c", WorkerHealth::Joining),
            ("d", WorkerHealth::Joining),
            ("e", WorkerHealth::Joining),
        ]);
        for (id, v) in [
            ("a", "AuthenticAMD"),
            ("b", "GenuineIntel"),
            ("c", "AuthenticAMD"),
            ("d", "GenuineIntel"),
            ("e", "GenuineIntel"),
        ] {
            ws.get_mut(id).unwrap().device.cpu_vendor = v.into();
        }
        let ranks = |d: PlacementDecision| match d {
            PlacementDecision::NewPlan { ranks } => ranks,
            other => panic!("{other:?}"),
        };
        // The vendor of most workers: three Intel against two AMD.
        let (d, reason) = place(&spec(2, 8), None, false, &ws);
        assert_eq!(ranks(d), ["b", "d", "e"]);
        assert!(
            reason.contains("left out for their CPU vendor (the plan computes on GenuineIntel")
                && reason.contains("a (AuthenticAMD), c (AuthenticAMD)"),
            "{reason}"
        );
        // A plan on the AMD pair keeps its vendor: Intel workers do not join it.
        let plan = Plan {
            trace: None,
            epoch: 1,
            ranks: vec!["a".into(), "c".into()],
            reason: String::new(),
            micro_shares: Vec::new(),
        };
        let (d, reason) = place(&spec(2, 8), Some(&plan), false, &ws);
        assert_eq!(d, PlacementDecision::Keep, "{reason}");
        assert_eq!(
            plan_vendor(&spec(2, 8), Some(&plan), &ws),
            Some(("AuthenticAMD".into(), "the current plan's".into()))
        );
        // One AMD worker fails: fewer than the minimum of 2 remain on AMD, so the job
        // moves to Intel, and the reason says its bits change.
        ws.get_mut("c").unwrap().health = WorkerHealth::Failed;
        let (d, reason) = place(&spec(2, 8), Some(&plan), false, &ws);
        assert_eq!(ranks(d), ["b", "d", "e"]);
        assert!(
            reason.contains(
                "fewer than 2 placeable workers of the current plan's AuthenticAMD remain"
            ) && reason.contains("a (AuthenticAMD)"),
            "{reason}"
        );
        // With a minimum of 1 the lone AMD worker carries on.
        let (d, _) = place(&spec(1, 8), Some(&plan), false, &ws);
        assert_eq!(ranks(d), ["a"]);
        // A worker that reports no vendor (it predates the field) is a class of its own.
        ws.get_mut("b").unwrap().device.cpu_vendor = String::new();
        let (d, reason) = place(&spec(1, 8), None, false, &ws);
        assert_eq!(ranks(d), ["d", "e"]);
        assert!(reason.contains("b (unknown)"), "{reason}");
        // Every worker of one vendor: nothing is left out, nothing said.
        let same = workers(&[("x", WorkerHealth::Joining), ("y", WorkerHealth::Joining)]);
        let (_, reason) = place(&spec(1, 8), None, false, &same);
        assert!(!reason.contains("vendor"), "{reason}");
    }
    #[test]
    fn a_waiting_job_gets_a_new_plan_even_on_its_old_workers() {
        let ws = workers(&[("a", WorkerHealth::Healthy), ("b", WorkerHealth::Joining)]);
        let plan = Plan {
            trace: None,
            epoch: 3,
            ranks: vec!["a".into(), "b".into()],
            reason: String::new(),
            micro_shares: Vec::new(),
        };
        assert_eq!(
            place(&spec(2, 2), Some(&plan), false, &ws).0,
            PlacementDecision::Keep
        );
        let (d, reason) = place(&spec(2, 2), Some(&plan), true, &ws);
        assert_eq!(
            d,
            PlacementDecision::NewPlan {
                ranks: vec!["a".into(), "b".into()]
            }
        );
        assert!(reason.contains("after waiting"), "{reason}");
    }
}
