//! Every metric family Phalanx exposes. The instruments are built from these entries
//! (OpenTelemetry name, unit, description), and a test checks that the exporter writes
//! exactly the Prometheus names listed here, so the docs' table, the Grafana dashboard and
//! the code cannot drift apart.
//!
//! Names follow the OpenTelemetry conventions (dotted, lower case, the unit in `unit`),
//! which the Prometheus exporter turns into Prometheus names: dots become underscores,
//! the unit becomes a suffix (`s` -> `_seconds`, `{token}/s` -> `_per_second`; an
//! annotation in braces adds nothing), and counters end in `_total`.

/// The Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Which process exposes the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposer {
    Worker,
    Controller,
}

impl Exposer {
    pub fn as_str(self) -> &'static str {
        match self {
            Exposer::Worker => "worker",
            Exposer::Controller => "controller",
        }
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// The Prometheus family name (what `/metrics` shows and PromQL uses).
    pub name: &'static str,
    /// The OpenTelemetry instrument name.
    pub otel_name: &'static str,
    /// The OpenTelemetry unit (UCUM), empty when dimensionless.
    pub otel_unit: &'static str,
    pub kind: Kind,
    /// The labels its points carry.
    pub labels: &'static [&'static str],
    pub exposer: Exposer,
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    otel_name: &'static str,
    otel_unit: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    exposer: Exposer,
    help: &'static str,
) -> MetricDef {
    MetricDef {
        name,
        otel_name,
        otel_unit,
        kind,
        labels,
        exposer,
        help,
    }
}

use Exposer::{Controller, Worker};
use Kind::{Counter, Gauge, Histogram};

pub const TRAIN_STEPS: MetricDef = def(
    "phalanx_train_steps_total",
    "phalanx.train.steps",
    "{step}",
    Counter,
    &[],
    Worker,
    "Training steps this worker completed (committed by its whole group) since it started.",
);
pub const TRAIN_STEP: MetricDef = def(
    "phalanx_train_step",
    "phalanx.train.step",
    "",
    Gauge,
    &[],
    Worker,
    "The job's newest step this worker completed (1-based).",
);
pub const TRAIN_STEP_DURATION: MetricDef = def(
    "phalanx_train_step_duration_seconds",
    "phalanx.train.step.duration",
    "s",
    Histogram,
    &[],
    Worker,
    "Wall time of one training step on this rank (compute, reduction, update).",
);
pub const TRAIN_TOKENS_RATE: MetricDef = def(
    "phalanx_train_tokens_per_second",
    "phalanx.train.tokens",
    "{token}/s",
    Gauge,
    &[],
    Worker,
    "Tokens per second of the whole group at the last step: the global batch's tokens over this rank's step time.",
);
pub const TRAIN_LOSS: MetricDef = def(
    "phalanx_train_loss",
    "phalanx.train.loss",
    "",
    Gauge,
    &[],
    Worker,
    "Training loss (mean cross-entropy over the global batch) of the last step.",
);
pub const TRAIN_GRAD_NORM: MetricDef = def(
    "phalanx_train_gradient_norm",
    "phalanx.train.gradient.norm",
    "",
    Gauge,
    &[],
    Worker,
    "Global L2 norm of the reduced gradient of the last step, before clipping.",
);
pub const TRAIN_PLAN_EPOCH: MetricDef = def(
    "phalanx_train_plan_epoch",
    "phalanx.train.plan.epoch",
    "",
    Gauge,
    &[],
    Worker,
    "The plan epoch this worker trains in (0 outside a controller-run job).",
);
pub const CHECKPOINT_STALL: MetricDef = def(
    "phalanx_checkpoint_stall_seconds",
    "phalanx.checkpoint.stall",
    "s",
    Histogram,
    &[],
    Worker,
    "Training time blocked by one checkpoint's snapshot on this rank.",
);
pub const CHECKPOINT_WRITE: MetricDef = def(
    "phalanx_checkpoint_write_duration_seconds",
    "phalanx.checkpoint.write.duration",
    "s",
    Histogram,
    &[],
    Worker,
    "Time to make this rank's shard of one checkpoint durable (write, fsync, rename; all attempts).",
);

pub const RAFT_TERM: MetricDef = def(
    "phalanx_raft_term",
    "phalanx.raft.term",
    "",
    Gauge,
    &[],
    Controller,
    "This controller's current Raft term.",
);
pub const RAFT_COMMIT_INDEX: MetricDef = def(
    "phalanx_raft_commit_index",
    "phalanx.raft.commit_index",
    "",
    Gauge,
    &[],
    Controller,
    "Highest Raft log index this controller knows to be committed.",
);
pub const RAFT_APPLIED_INDEX: MetricDef = def(
    "phalanx_raft_applied_index",
    "phalanx.raft.applied_index",
    "",
    Gauge,
    &[],
    Controller,
    "Highest Raft log index applied to this controller's state machine.",
);
pub const RAFT_IS_LEADER: MetricDef = def(
    "phalanx_raft_is_leader",
    "phalanx.raft.is_leader",
    "",
    Gauge,
    &[],
    Controller,
    "1 while this controller is the Raft leader, else 0.",
);
pub const RAFT_PROPOSALS: MetricDef = def(
    "phalanx_raft_proposals_total",
    "phalanx.raft.proposals",
    "{proposal}",
    Counter,
    &[],
    Controller,
    "Entries this controller proposed to Raft (commands and membership changes) since it started.",
);
pub const RAFT_LEADER_CHANGES: MetricDef = def(
    "phalanx_raft_leader_changes_total",
    "phalanx.raft.leader_changes",
    "{change}",
    Counter,
    &[],
    Controller,
    "Times this controller saw the Raft leader change (to a known leader) since it started.",
);
pub const PROPOSAL_DURATION: MetricDef = def(
    "phalanx_raft_proposal_duration_seconds",
    "phalanx.raft.proposal.duration",
    "s",
    Histogram,
    &["outcome"],
    Controller,
    "A command sent to this controller's API, from its arrival to its answer: committed and applied, rejected by the state machine, or failed (not the leader, timeout).",
);
pub const WORKERS: MetricDef = def(
    "phalanx_cluster_workers",
    "phalanx.cluster.workers",
    "{worker}",
    Gauge,
    &["health"],
    Controller,
    "Registered workers by health, as the replicated state records them.",
);
pub const JOB_PLAN_EPOCH: MetricDef = def(
    "phalanx_job_plan_epoch",
    "phalanx.job.plan.epoch",
    "",
    Gauge,
    &[],
    Controller,
    "The current job's plan epoch (0 when there is no job or plan).",
);
pub const JOB_PROGRESS_STEP: MetricDef = def(
    "phalanx_job_progress_step",
    "phalanx.job.progress.step",
    "",
    Gauge,
    &[],
    Controller,
    "Highest step every rank of the current plan has reported done.",
);
pub const JOB_RECOVERIES: MetricDef = def(
    "phalanx_job_recoveries_total",
    "phalanx.job.recoveries",
    "{recovery}",
    Counter,
    &["source"],
    Controller,
    "Recoveries of the job (one per plan epoch after the first) by where the state came from: peer (survivors' memory), checkpoint or initial.",
);
pub const JOB_MTTR: MetricDef = def(
    "phalanx_job_recovery_mttr_seconds",
    "phalanx.job.recovery.mttr",
    "s",
    Histogram,
    &["source"],
    Controller,
    "Time to recover, per recovery: from the reporting rank's last step before the fault to its first step after it.",
);

/// Every family, workers' first.
pub const METRICS: &[MetricDef] = &[
    TRAIN_STEPS,
    TRAIN_STEP,
    TRAIN_STEP_DURATION,
    TRAIN_TOKENS_RATE,
    TRAIN_LOSS,
    TRAIN_GRAD_NORM,
    TRAIN_PLAN_EPOCH,
    CHECKPOINT_STALL,
    CHECKPOINT_WRITE,
    RAFT_TERM,
    RAFT_COMMIT_INDEX,
    RAFT_APPLIED_INDEX,
    RAFT_IS_LEADER,
    RAFT_PROPOSALS,
    RAFT_LEADER_CHANGES,
    PROPOSAL_DURATION,
    WORKERS,
    JOB_PLAN_EPOCH,
    JOB_PROGRESS_STEP,
    JOB_RECOVERIES,
    JOB_MTTR,
];

/// The family a sample name belongs to: a histogram's `_bucket`, `_sum` and `_count`
/// series are its family's.
pub fn family_of(sample: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|m| {
        sample == m.name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| sample.strip_suffix(s) == Some(m.name)))
    })
}

/// The families of one kind of process.
pub fn of(exposer: Exposer) -> impl Iterator<Item = &'static MetricDef> {
    METRICS.iter().filter(move |m| m.exposer == exposer)
}

/// The Markdown table of docs/observability.md (a test keeps the docs equal to it).
pub fn markdown_table() -> String {
    let mut s = String::from(
        "| name | type | unit | labels | exposed by | meaning |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for m in METRICS {
        let unit = match m.otel_unit {
            "" => "-".to_string(),
            u => format!("`{u}`"),
        };
        let labels = if m.labels.is_empty() {
            "-".to_string()
        } else {
            m.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            unit,
            labels,
            m.exposer.as_str(),
            m.help
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_prometheus_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for m in METRICS {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("phalanx_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            if m.otel_unit == "s" {
                assert!(m.name.ends_with("_seconds"), "{}", m.name);
            }
            assert_eq!(
                m.otel_name.replace('.', "_"),
                m.name
                    .trim_end_matches("_total")
                    .trim_end_matches("_seconds")
                    .trim_end_matches("_per_second"),
                "{}: the Prometheus name is the OpenTelemetry name with its unit",
                m.name
            );
        }
    }

    #[test]
    fn a_histogram_series_belongs_to_its_family() {
        assert_eq!(
            family_of("phalanx_job_recovery_mttr_seconds_bucket").map(|m| m.name),
            Some("phalanx_job_recovery_mttr_seconds")
        );
        assert_eq!(
            family_of("phalanx_raft_term").map(|m| m.name),
            Some("phalanx_raft_term")
        );
        assert!(family_of("phalanx_raft_term_bucket").is_none());
        assert!(family_of("phalanx_nothing").is_none());
    }
}
