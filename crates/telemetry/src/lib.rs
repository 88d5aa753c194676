//! Phalanx's metrics: instruments of the OpenTelemetry metrics API, read by the
//! `opentelemetry-prometheus` exporter and written in the Prometheus text format at
//! `/metrics` (see docs/observability.md).
//!
//! - [`catalog`]: every metric family a Phalanx process exposes (name, type, unit, labels,
//!   meaning). The docs' table and the Grafana dashboard are checked against it.
//! - [`worker`]: a worker's training metrics (step time, tokens/s, loss, gradient norm,
//!   checkpoint stall and write time), recorded by the training loop.
//! - [`controller`]: a controller's metrics, computed when scraped from a sample of the
//!   replicated state and the raft counters (nothing runs on the raft thread for them
//!   but the copy of a few numbers).
//! - [`traces`]: `tracing` spans to OpenTelemetry, exported over OTLP/HTTP when an
//!   endpoint is set, and the W3C `traceparent` across processes.
//! - [`server`]: the workers' small `/metrics` HTTP server (bounded: a connection cap,
//!   read and write deadlines).
//!
//! Nothing here reads a clock for a decision or touches the training math: the callers
//! pass durations and values they measured.

pub mod catalog;
pub mod controller;
pub mod server;
pub mod traces;
pub mod worker;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, TextEncoder};
use thiserror::Error;

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The instrumentation scope of every Phalanx instrument.
pub const SCOPE: &str = "phalanx";

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("the Prometheus exporter: {0}")]
    Exporter(String),
    #[error("encoding the Prometheus text: {0}")]
    Encode(String),
    #[error("metrics server: {0}")]
    Server(String),
    #[error("traces: {0}")]
    Traces(String),
}

/// Which kind of process the metrics describe (the `service.name` of the resource, which
/// the exporter writes into `target_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Controller,
    Worker,
}

impl Role {
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Controller => "phalanx-controller",
            Role::Worker => "phalanx-worker",
        }
    }
}

/// One process's meter provider and the Prometheus registry its exporter fills.
pub struct Telemetry {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    meter: Meter,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// A meter provider whose only reader is a Prometheus exporter into a registry of its
    /// own (so that several in one process, as in tests, do not mix). `instance` (a worker
    /// or node id) becomes `service.instance.id`.
    pub fn new(role: Role, instance: &str) -> Result<Self, TelemetryError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // Only our own labels on the points; the scope is always "phalanx".
            .scope_info_enabled(false)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let resource = Resource::builder_empty()
            .with_service_name(role.service_name())
            .with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                instance.to_string(),
            ))
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(resource)
            .build();
        let meter = provider.meter(SCOPE);
        Ok(Telemetry {
            provider,
            registry,
            meter,
        })
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Everything recorded so far, in the Prometheus text format (the exporter collects
    /// the SDK's cumulative data on each call; observable instruments' callbacks run
    /// here, on the caller's thread).
    pub fn render(&self) -> Result<String, TelemetryError> {
        let families = self.registry.gather();
        let mut buf = Vec::with_capacity(8 << 10);
        TextEncoder::new()
            .encode(&families, &mut buf)
            .map_err(|e| TelemetryError::Encode(e.to_string()))?;
        String::from_utf8(buf).map_err(|e| TelemetryError::Encode(e.to_string()))
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // A manual reader has nothing to flush; shutdown only stops the pipeline.
        let _ = self.provider.shutdown();
    }
}

/// Histogram bucket bounds, in seconds, of the durations Phalanx records.
pub mod buckets {
    /// One training step: 5 ms (tiny model on a fast device) to a minute.
    pub const STEP_S: &[f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    /// Training time blocked by a checkpoint snapshot: 50 µs to 5 s.
    pub const STALL_S: &[f64] = &[
        0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
    ];
    /// Writing one checkpoint shard (all attempts): 10 ms to 5 minutes.
    pub const WRITE_S: &[f64] = &[
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ];
    /// Time to recover from a fault: 250 ms to 10 minutes.
    pub const MTTR_S: &[f64] = &[
        0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];
    /// One API command from its arrival to its commit (or refusal): 1 ms to 10 s.
    pub const PROPOSAL_S: &[f64] = &[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use crate::catalog::{self, Exposer};
    use crate::controller::RecoverySample;
    use crate::controller::{ControllerMetrics, ControllerSample, ProposalOutcome};
    use crate::worker::{StepSample, WorkerMetrics};
    use phalanx_proto::StateSource;

    /// The families a rendered text holds, by their `# TYPE` lines (checked against the
    /// samples' names by the parser).
    fn families(text: &str) -> BTreeSet<String> {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("valid Prometheus text");
        let mut out = BTreeSet::new();
        for s in &scrape.samples {
            if s.metric == "target_info" {
                continue;
            }
            let fam = catalog::family_of(&s.metric)
                .unwrap_or_else(|| panic!("{} is not in the catalog", s.metric));
            out.insert(fam.name.to_string());
        }
        out
    }

    #[test]
    fn the_exporter_writes_exactly_the_catalogs_names() {
        let w = WorkerMetrics::new("w0").unwrap();
        w.step(&StepSample {
            step: 1,
            duration: Duration::from_millis(100),
            tokens: 512,
            loss: 5.5,
            grad_norm: 1.25,
        });
        w.plan_epoch(1);
        w.checkpoint_stall(Duration::from_micros(300));
        w.checkpoint_write(Duration::from_millis(40));
        let want: BTreeSet<String> = catalog::of(Exposer::Worker)
            .map(|m| m.name.to_string())
            .collect();
        assert_eq!(families(&w.render().unwrap()), want);

        let c = ControllerMetrics::new(1).unwrap();
        c.proposal(Duration::from_millis(3), ProposalOutcome::Applied);
        let text = c
            .render(ControllerSample {
                term: 2,
                job_id: Some("j".into()),
                recoveries: vec![RecoverySample {
                    epoch: 2,
                    source: Some(StateSource::Peer),
                    mttr_ms: Some(800),
                }],
                ..Default::default()
            })
            .unwrap();
        let want: BTreeSet<String> = catalog::of(Exposer::Controller)
            .map(|m| m.name.to_string())
            .collect();
        assert_eq!(families(&text), want);
        assert!(
            text.contains("service_name=\"phalanx-controller\""),
            "target_info names the service: {text}"
        );
    }
}
