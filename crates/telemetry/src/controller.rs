//! A controller's metrics. Almost all are read at scrape time from a [`ControllerSample`]:
//! a copy of a few numbers of the replicated state and the raft node that the raft thread
//! hands out (as it answers `/v1/status`), so the raft thread does no work for metrics
//! between scrapes. The one measured elsewhere is the API's command latency
//! ([`ControllerMetrics::proposal`]), timed on the API's own tasks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, ObservableCounter, ObservableGauge};
use opentelemetry::KeyValue;
use phalanx_proto::{JobInfo, StateSource, WorkerHealth, WorkerInfo};

use crate::catalog::{self, MetricDef};
use crate::{buckets, Role, Telemetry, TelemetryError};

/// Every worker health, in the order the `health` label lists them.
pub const HEALTHS: [WorkerHealth; 7] = WorkerHealth::ALL;

/// How a command sent to the API ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalOutcome {
    /// Committed and applied.
    Applied,
    /// Committed; the state machine refused it.
    Rejected,
    /// Not committed: not the leader, no leader, a timeout, a bad request.
    Failed,
}

impl ProposalOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalOutcome::Applied => "applied",
            ProposalOutcome::Rejected => "rejected",
            ProposalOutcome::Failed => "failed",
        }
    }
}

/// One recovery of the current job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverySample {
    pub epoch: u64,
    /// The `source` label: the kind's name, `other` when a worker that predates the kind
    /// reported words of no known kind.
    pub source: Option<StateSource>,
    pub mttr_ms: Option<u64>,
}

/// What a scrape reads of one controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerSample {
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub is_leader: bool,
    pub proposals: u64,
    pub leader_changes: u64,
    /// Workers per health, in the order of [`HEALTHS`].
    pub workers: [u64; 7],
    pub job_id: Option<String>,
    pub plan_epoch: u64,
    pub progress_step: u64,
    /// The current job's recoveries, oldest first.
    pub recoveries: Vec<RecoverySample>,
}

impl ControllerSample {
    /// The replicated part: workers by health and the current job.
    pub fn set_state<'a>(
        &mut self,
        workers: impl IntoIterator<Item = &'a WorkerInfo>,
        job: Option<&JobInfo>,
    ) {
        self.workers = [0; 7];
        for w in workers {
            if let Some(i) = HEALTHS.iter().position(|h| *h == w.health) {
                self.workers[i] += 1;
            }
        }
        self.job_id = job.map(|j| j.id.clone());
        self.plan_epoch = job.and_then(|j| j.plan.as_ref()).map_or(0, |p| p.epoch);
        self.progress_step = job.map_or(0, |j| j.progress_step);
        self.recoveries = job
            .map(|j| {
                j.recoveries
                    .iter()
                    .map(|r| RecoverySample {
                        epoch: r.epoch,
                        source: r.source_kind,
                        mttr_ms: r.mttr_ms,
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
}

/// The recoveries already counted: those of `job` up to `epoch`.
#[derive(Debug, Default)]
struct Counted {
    job: Option<String>,
    epoch: u64,
}

pub struct ControllerMetrics {
    telemetry: Telemetry,
    sample: Arc<Mutex<ControllerSample>>,
    counted: Mutex<Counted>,
    recoveries: Counter<u64>,
    mttr: Histogram<f64>,
    proposal: Histogram<f64>,
    // Kept so that their callbacks stay registered for the provider's life.
    _gauges: Vec<ObservableGauge<u64>>,
    _counters: Vec<ObservableCounter<u64>>,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

type Read = fn(&ControllerSample) -> u64;

impl ControllerMetrics {
    /// The instruments of controller `node_id`.
    pub fn new(node_id: u64) -> Result<Self, TelemetryError> {
        let t = Telemetry::new(Role::Controller, &node_id.to_string())?;
        let sample = Arc::new(Mutex::new(ControllerSample::default()));
        let read = |s: &Arc<Mutex<ControllerSample>>, f: Read| {
            let s = s.clone();
            move || f(&s.lock().unwrap_or_else(|p| p.into_inner()))
        };
        let gauge = |d: &MetricDef, f: Read| {
            let get = read(&sample, f);
            t.meter()
                .u64_observable_gauge(d.otel_name)
                .with_unit(d.otel_unit)
                .with_description(d.help)
                .with_callback(move |o| o.observe(get(), &[]))
                .build()
        };
        let mut gauges = vec![
            gauge(&catalog::RAFT_TERM, |s| s.term),
            gauge(&catalog::RAFT_COMMIT_INDEX, |s| s.commit_index),
            gauge(&catalog::RAFT_APPLIED_INDEX, |s| s.applied_index),
            gauge(&catalog::RAFT_IS_LEADER, |s| u64::from(s.is_leader)),
            gauge(&catalog::JOB_PLAN_EPOCH, |s| s.plan_epoch),
            gauge(&catalog::JOB_PROGRESS_STEP, |s| s.progress_step),
        ];
        let workers = {
            let s = sample.clone();
            let d = &catalog::WORKERS;
            t.meter()
                .u64_observable_gauge(d.otel_name)
                .with_unit(d.otel_unit)
                .with_description(d.help)
                .with_callback(move |o| {
                    let counts = s.lock().unwrap_or_else(|p| p.into_inner()).workers;
                    for (h, n) in HEALTHS.iter().zip(counts) {
                        o.observe(n, &[KeyValue::new("health", h.as_str())]);
                    }
                })
                .build()
        };
        gauges.push(workers);
        let counter = |d: &MetricDef, f: Read| {
            let get = read(&sample, f);
            t.meter()
                .u64_observable_counter(d.otel_name)
                .with_unit(d.otel_unit)
                .with_description(d.help)
                .with_callback(move |o| o.observe(get(), &[]))
                .build()
        };
        let counters = vec![
            counter(&catalog::RAFT_PROPOSALS, |s| s.proposals),
            counter(&catalog::RAFT_LEADER_CHANGES, |s| s.leader_changes),
        ];
        let d = &catalog::JOB_RECOVERIES;
        let recoveries = t
            .meter()
            .u64_counter(d.otel_name)
            .with_unit(d.otel_unit)
            .with_description(d.help)
            .build();
        let hist = |d: &MetricDef, bounds: &[f64]| {
            t.meter()
                .f64_histogram(d.otel_name)
                .with_unit(d.otel_unit)
                .with_description(d.help)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        let mttr = hist(&catalog::JOB_MTTR, buckets::MTTR_S);
        let proposal = hist(&catalog::PROPOSAL_DURATION, buckets::PROPOSAL_S);
        Ok(ControllerMetrics {
            sample,
            counted: Mutex::new(Counted::default()),
            recoveries,
            mttr,
            proposal,
            _gauges: gauges,
            _counters: counters,
            telemetry: t,
        })
    }

    /// A command the API answered after `took`.
    pub fn proposal(&self, took: Duration, outcome: ProposalOutcome) {
        self.proposal.record(
            took.as_secs_f64(),
            &[KeyValue::new("outcome", outcome.as_str())],
        );
    }

    /// Takes `sample` as the controller's state now: the recoveries not seen before are
    /// counted (and their MTTR recorded), then everything is rendered in the Prometheus
    /// text format.
    pub fn render(&self, sample: ControllerSample) -> Result<String, TelemetryError> {
        {
            let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
            if counted.job != sample.job_id {
                *counted = Counted {
                    job: sample.job_id.clone(),
                    epoch: 0,
                };
            }
            for r in sample.recoveries.iter().filter(|r| r.epoch > counted.epoch) {
                let source = [KeyValue::new(
                    "source",
                    r.source.map_or("other", StateSource::as_str),
                )];
                self.recoveries.add(1, &source);
                if let Some(ms) = r.mttr_ms {
                    self.mttr.record(ms as f64 / 1000.0, &source);
                }
            }
            counted.epoch = sample
                .recoveries
                .iter()
                .map(|r| r.epoch)
                .max()
                .unwrap_or(0)
                .max(counted.epoch);
        }
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = sample;
        self.telemetry.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("valid Prometheus text")
    }

    fn value(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
        let found = s
            .samples
            .iter()
            .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} {label:?} missing"));
        match found.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    }

    fn sample(recoveries: &[(u64, &str, Option<u64>)]) -> ControllerSample {
        ControllerSample {
            term: 4,
            commit_index: 120,
            applied_index: 119,
            is_leader: true,
            proposals: 77,
            leader_changes: 2,
            workers: [0, 3, 0, 1, 0, 0, 1],
            job_id: Some("j-1".into()),
            plan_epoch: 1 + recoveries.len() as u64,
            progress_step: 42,
            recoveries: recoveries
                .iter()
                .map(|(epoch, src, mttr_ms)| RecoverySample {
                    epoch: *epoch,
                    source: StateSource::of_text(src),
                    mttr_ms: *mttr_ms,
                })
                .collect(),
        }
    }

    #[test]
    fn a_scrape_shows_the_sample_and_counts_each_recovery_once() {
        let m = ControllerMetrics::new(1).unwrap();
        m.proposal(Duration::from_millis(12), ProposalOutcome::Applied);
        let s = scrape(&m.render(sample(&[(2, "peer rank 1", Some(1500))])).unwrap());
        assert_eq!(value(&s, "phalanx_raft_term", None), 4.0);
        assert_eq!(value(&s, "phalanx_raft_commit_index", None), 120.0);
        assert_eq!(value(&s, "phalanx_raft_is_leader", None), 1.0);
        assert_eq!(value(&s, "phalanx_raft_proposals_total", None), 77.0);
        assert_eq!(value(&s, "phalanx_raft_leader_changes_total", None), 2.0);
        assert_eq!(
            value(&s, "phalanx_cluster_workers", Some(("health", "healthy"))),
            3.0
        );
        assert_eq!(
            value(&s, "phalanx_cluster_workers", Some(("health", "failed"))),
            1.0
        );
        assert_eq!(
            value(&s, "phalanx_cluster_workers", Some(("health", "suspect"))),
            0.0
        );
        assert_eq!(value(&s, "phalanx_job_plan_epoch", None), 2.0);
        assert_eq!(
            value(&s, "phalanx_job_recoveries_total", Some(("source", "peer"))),
            1.0
        );
        // The same recovery again and a new one from a checkpoint: one more, not two.
        let s = scrape(
            &m.render(sample(&[
                (2, "peer rank 1", Some(1500)),
                (3, "checkpoint step 40", Some(4000)),
            ]))
            .unwrap(),
        );
        assert_eq!(
            value(&s, "phalanx_job_recoveries_total", Some(("source", "peer"))),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "phalanx_job_recoveries_total",
                Some(("source", "checkpoint"))
            ),
            1.0
        );
        let mttr = s
            .samples
            .iter()
            .filter(|x| x.metric == "phalanx_job_recovery_mttr_seconds")
            .map(|x| match &x.value {
                prometheus_parse::Value::Histogram(h) => {
                    (x.labels.get("source").unwrap_or("").to_string(), h.clone())
                }
                other => panic!("mttr is a histogram, not {other:?}"),
            })
            .collect::<Vec<_>>();
        assert_eq!(mttr.len(), 2, "{mttr:?}");
        for (source, buckets) in &mttr {
            let le = if source == "peer" { 2.0 } else { 5.0 };
            let below = buckets
                .iter()
                .find(|b| b.less_than == le)
                .expect("bucket")
                .count;
            assert_eq!(below, 1.0, "{source}: {buckets:?}");
        }
        let proposals = s
            .samples
            .iter()
            .find(|x| {
                x.metric == "phalanx_raft_proposal_duration_seconds"
                    && x.labels.get("outcome") == Some("applied")
            })
            .expect("proposal latency");
        assert!(matches!(
            proposals.value,
            prometheus_parse::Value::Histogram(_)
        ));
    }

    #[test]
    fn a_new_job_counts_its_recoveries_from_its_first_epoch() {
        let m = ControllerMetrics::new(2).unwrap();
        m.render(sample(&[(5, "peer rank 0", Some(900))])).unwrap();
        let mut next = sample(&[(2, "peer rank 0", Some(900))]);
        next.job_id = Some("j-2".into());
        let s = scrape(&m.render(next).unwrap());
        assert_eq!(
            value(&s, "phalanx_job_recoveries_total", Some(("source", "peer"))),
            2.0
        );
    }
}
