//! `GET /metrics`: the controller's metrics in the Prometheus text format (see
//! docs/observability.md), for the reader and admin roles.
//!
//! A scrape asks the raft thread for a [`ControllerSample`] (a copy of a few numbers, as
//! `/v1/status` does) and renders it on the API's task; the raft thread does nothing for
//! metrics between scrapes. The API's command latency is recorded by [`proposal_done`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use phalanx_proto::{CommandResponse, Outcome};
use phalanx_telemetry::controller::{ControllerMetrics, ControllerSample, ProposalOutcome};
use serde::Deserialize;
use tracing::warn;

use super::api::{call, ApiResult};
use super::raft_loop::Input;
use super::{ConnCtx, ServerError};
use crate::node::Replica;

/// The controller's instruments (one per controller: several may share a test process).
pub(crate) fn new_metrics(node_id: u64) -> Result<Arc<ControllerMetrics>, ServerError> {
    ControllerMetrics::new(node_id)
        .map(Arc::new)
        .map_err(|e| ServerError::Config(format!("metrics: {e}")))
}

/// What a scrape reads of the replica (on the raft thread: copies only).
pub(crate) fn sample_of(r: &Replica) -> ControllerSample {
    let mut s = ControllerSample {
        term: r.term(),
        commit_index: r.commit_index(),
        applied_index: r.applied_index(),
        is_leader: r.is_leader(),
        proposals: r.counters.proposals,
        leader_changes: r.counters.leader_changes,
        ..Default::default()
    };
    s.set_state(r.state.workers.values(), r.state.job.as_ref());
    s
}

/// Answers `GET /metrics` (the route table has checked the caller's role).
pub(crate) async fn respond(ctx: &ConnCtx, timeout: Duration) -> Response {
    let slot: Arc<Mutex<Option<ControllerSample>>> = Arc::default();
    let put = slot.clone();
    let asked = call(
        ctx,
        |reply| Input::Local {
            query: Box::new(move |r| {
                *put.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample_of(r));
                Ok(serde_json::Value::Null)
            }),
            reply,
        },
        timeout,
    )
    .await;
    let sample = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (status, body) = match (asked, sample) {
        (Ok(_), Some(s)) => match ctx.metrics.render(s) {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        (Err(e), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the raft loop did not answer: {e:?}\n"),
        ),
        (Ok(_), None) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the raft loop gave no sample\n".to_string(),
        ),
    };
    if status != StatusCode::OK {
        warn!(%status, "GET /metrics failed: {}", body.trim_end());
    }
    (
        status,
        [(header::CONTENT_TYPE, phalanx_telemetry::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// Records how a `POST /v1/command` ended and how long it took.
pub(crate) fn proposal_done(ctx: &ConnCtx, took: Duration, result: &ApiResult) {
    let outcome = match result {
        Ok(v) => match CommandResponse::deserialize(v) {
            Ok(CommandResponse {
                outcome: Outcome::Applied { .. },
                ..
            }) => ProposalOutcome::Applied,
            Ok(_) => ProposalOutcome::Rejected,
            Err(_) => ProposalOutcome::Failed,
        },
        Err(_) => ProposalOutcome::Failed,
    };
    ctx.metrics.proposal(took, outcome);
}
