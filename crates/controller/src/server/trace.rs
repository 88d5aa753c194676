//! Trace spans of the API (issue 12): one `api.request` span per routed request, the
//! child of the caller's span when the request carries a W3C `traceparent`, and one
//! `raft.propose` span from a command's proposal to its commit and apply as the handler
//! sees it. Without a trace pipeline (`--otlp-endpoint`) these are plain `tracing` spans
//! that nothing records.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The middleware around every routed request (credentials check included).
pub(super) async fn traced(matched: MatchedPath, req: Request, next: Next) -> Response {
    // A root unless the caller sent its context: not the child of the connection's span
    // (a keep-alive connection carries many requests, for hours).
    let span = tracing::info_span!(
        parent: None,
        "api.request",
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = matched.as_str(),
        http.response.status_code = tracing::field::Empty,
    );
    phalanx_telemetry::traces::set_parent_from_headers(&span, req.headers());
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    resp
}

/// The span of one proposal, from its submission to the raft loop until the handler has
/// its outcome (committed and applied, or an error).
pub(super) fn propose_span(request_id: &str) -> tracing::Span {
    tracing::info_span!(
        "raft.propose",
        request_id = request_id,
        outcome = tracing::field::Empty
    )
}

/// The span of a decision of the leader's duties (a lease or straggler decision), ended
/// once proposed; a plan the decision makes carries its context to the workers. On the
/// leader's own evidence (a lease that ran out, a straggler) it is the root of its trace,
/// `recovery.detection`: the controller detected the fault. Confirming a worker's report
/// (`evidence`, the trace of the worker's detection of a silent peer), it is
/// `recovery.decision`, the child of that report.
pub(super) fn duty_span(
    kind: &str,
    worker: &str,
    reason: &str,
    evidence: Option<&phalanx_proto::TraceParent>,
) -> tracing::Span {
    match evidence {
        None => tracing::info_span!(
            parent: None,
            "recovery.detection",
            detected_by = "controller",
            duty = kind,
            worker = worker,
            reason = reason,
        ),
        Some(report) => {
            let span = tracing::info_span!(
                parent: None,
                "recovery.decision",
                duty = kind,
                worker = worker,
                reason = reason,
            );
            phalanx_telemetry::traces::set_parent(&span, report);
            span
        }
    }
}

/// The span's context for the proposal's envelope (none without a trace pipeline).
pub(super) fn traceparent(span: &tracing::Span) -> Option<phalanx_proto::TraceParent> {
    phalanx_telemetry::traces::traceparent(span)
}
