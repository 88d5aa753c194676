//! A worker's metrics: recorded by its training loop after each step and checkpoint,
//! read by `/metrics` (see [`crate::server`]).
//!
//! They exist only in a worker started with `--metrics-listen`: [`install`] sets the
//! process's one [`WorkerMetrics`], and [`get`] is `None` everywhere else, so the call
//! sites cost one atomic load when metrics are off.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, Histogram};

use crate::catalog::{self, MetricDef};
use crate::{buckets, Role, Telemetry, TelemetryError};

/// One completed training step, as the rank measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSample {
    /// The job's step just completed, 1-based.
    pub step: u64,
    /// This rank's wall time for the step.
    pub duration: Duration,
    /// Tokens of the step's global batch (every rank's micro-batches).
    pub tokens: u64,
    pub loss: f64,
    /// The reduced gradient's global L2 norm before clipping.
    pub grad_norm: f64,
}

pub struct WorkerMetrics {
    telemetry: Telemetry,
    steps: Counter<u64>,
    step: Gauge<u64>,
    step_duration: Histogram<f64>,
    tokens_rate: Gauge<f64>,
    loss: Gauge<f64>,
    grad_norm: Gauge<f64>,
    plan_epoch: Gauge<u64>,
    stall: Histogram<f64>,
    write: Histogram<f64>,
}

fn hist(t: &Telemetry, d: &MetricDef, bounds: &[f64]) -> Histogram<f64> {
    t.meter()
        .f64_histogram(d.otel_name)
        .with_unit(d.otel_unit)
        .with_description(d.help)
        .with_boundaries(bounds.to_vec())
        .build()
}

fn gauge_f64(t: &Telemetry, d: &MetricDef) -> Gauge<f64> {
    t.meter()
        .f64_gauge(d.otel_name)
        .with_unit(d.otel_unit)
        .with_description(d.help)
        .build()
}

fn gauge_u64(t: &Telemetry, d: &MetricDef) -> Gauge<u64> {
    t.meter()
        .u64_gauge(d.otel_name)
        .with_unit(d.otel_unit)
        .with_description(d.help)
        .build()
}

impl WorkerMetrics {
    /// The instruments of worker `instance` (its id, or `rank-R` for `worker run`).
    pub fn new(instance: &str) -> Result<Self, TelemetryError> {
        let t = Telemetry::new(Role::Worker, instance)?;
        let d = &catalog::TRAIN_STEPS;
        let steps = t
            .meter()
            .u64_counter(d.otel_name)
            .with_unit(d.otel_unit)
            .with_description(d.help)
            .build();
        Ok(WorkerMetrics {
            steps,
            step: gauge_u64(&t, &catalog::TRAIN_STEP),
            step_duration: hist(&t, &catalog::TRAIN_STEP_DURATION, buckets::STEP_S),
            tokens_rate: gauge_f64(&t, &catalog::TRAIN_TOKENS_RATE),
            loss: gauge_f64(&t, &catalog::TRAIN_LOSS),
            grad_norm: gauge_f64(&t, &catalog::TRAIN_GRAD_NORM),
            plan_epoch: gauge_u64(&t, &catalog::TRAIN_PLAN_EPOCH),
            stall: hist(&t, &catalog::CHECKPOINT_STALL, buckets::STALL_S),
            write: hist(&t, &catalog::CHECKPOINT_WRITE, buckets::WRITE_S),
            telemetry: t,
        })
    }

    /// A step this rank completed.
    pub fn step(&self, s: &StepSample) {
        let secs = s.duration.as_secs_f64();
        self.steps.add(1, &[]);
        self.step.record(s.step, &[]);
        self.step_duration.record(secs, &[]);
        if secs > 0.0 {
            self.tokens_rate.record(s.tokens as f64 / secs, &[]);
        }
        self.loss.record(s.loss, &[]);
        self.grad_norm.record(s.grad_norm, &[]);
    }

    /// The plan epoch this worker now trains in.
    pub fn plan_epoch(&self, epoch: u64) {
        self.plan_epoch.record(epoch, &[]);
    }

    /// Training time one checkpoint's snapshot blocked.
    pub fn checkpoint_stall(&self, d: Duration) {
        self.stall.record(d.as_secs_f64(), &[]);
    }

    /// Time this rank's shard of a checkpoint took to become durable.
    pub fn checkpoint_write(&self, d: Duration) {
        self.write.record(d.as_secs_f64(), &[]);
    }

    pub fn render(&self) -> Result<String, TelemetryError> {
        self.telemetry.render()
    }
}

static WORKER: OnceLock<WorkerMetrics> = OnceLock::new();

/// Makes `m` this process's worker metrics; a second call keeps the first.
pub fn install(m: WorkerMetrics) -> &'static WorkerMetrics {
    WORKER.get_or_init(|| m)
}

/// This process's worker metrics, if `--metrics-listen` turned them on.
pub fn get() -> Option<&'static WorkerMetrics> {
    WORKER.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> f64 {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    }

    #[test]
    fn a_step_sets_the_step_loss_norm_and_rate_and_counts_once() {
        let m = WorkerMetrics::new("w-test").unwrap();
        m.plan_epoch(3);
        for step in 1..=4 {
            m.step(&StepSample {
                step,
                duration: Duration::from_millis(250),
                tokens: 1024,
                loss: 5.0 - step as f64,
                grad_norm: 0.5,
            });
        }
        let text = m.render().unwrap();
        assert_eq!(value(&text, "phalanx_train_steps_total"), 4.0);
        assert_eq!(value(&text, "phalanx_train_step"), 4.0);
        assert_eq!(value(&text, "phalanx_train_loss"), 1.0);
        assert_eq!(value(&text, "phalanx_train_gradient_norm"), 0.5);
        assert_eq!(value(&text, "phalanx_train_tokens_per_second"), 4096.0);
        assert_eq!(value(&text, "phalanx_train_plan_epoch"), 3.0);
        assert!(
            text.contains("phalanx_train_step_duration_seconds_count 4"),
            "{text}"
        );
        assert!(
            text.contains("phalanx_train_step_duration_seconds_sum 1"),
            "{text}"
        );
    }
}
