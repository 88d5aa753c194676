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

/// The trace context of a decision of the leader's duties (a lease or straggler
/// decision), recorded when it is made; a plan the decision makes carries it to the
/// workers. On the leader's own evidence (a lease that ran out, a straggler) it is the
/// root of its trace, `recovery.detection`: the controller detected the fault, from
/// `since` (the worker's last heartbeat, when there is one) to the decision. Confirming a
/// worker's report (`evidence`, the trace of the worker's detection of a silent peer), it
/// is `recovery.decision`, the child of that report. `None` without a trace pipeline.
pub(super) fn duty_trace(
    kind: &str,
    worker: &str,
    reason: &str,
    evidence: Option<&phalanx_proto::TraceParent>,
    since: Option<std::time::SystemTime>,
) -> Option<phalanx_proto::TraceParent> {
    use phalanx_telemetry::traces::{record_span, KeyValue};
    let now = std::time::SystemTime::now();
    let mut attrs = vec![
        KeyValue::new("duty", kind.to_string()),
        KeyValue::new("worker", worker.to_string()),
        KeyValue::new("reason", reason.to_string()),
    ];
    match evidence {
        Some(report) => record_span("recovery.decision", Some(report), now, now, attrs),
        None => {
            attrs.push(KeyValue::new("detected_by", "controller"));
            record_span("recovery.detection", None, since.unwrap_or(now), now, attrs)
        }
    }
}

/// The span's context for the proposal's envelope (none without a trace pipeline).
pub(super) fn traceparent(span: &tracing::Span) -> Option<phalanx_proto::TraceParent> {
    phalanx_telemetry::traces::traceparent(span)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use opentelemetry_sdk::trace::{InMemorySpanExporter, SimpleSpanProcessor};
    use phalanx_proto::TraceParent;
    use phalanx_telemetry::traces::Traces;

    use super::duty_trace;

    /// A lease decision on the leader's own evidence is the root `recovery.detection`,
    /// from the worker's last heartbeat to the decision; one that confirms a worker's
    /// report is `recovery.decision`, the report's child.
    #[test]
    fn a_duty_is_a_detection_from_the_last_heartbeat_or_the_reports_decision() {
        let exporter = InMemorySpanExporter::default();
        let traces = Traces::with_processor(
            "test",
            SimpleSpanProcessor::new(exporter.clone()),
            "memory".into(),
        );
        traces.set_global();
        let since = SystemTime::now() - Duration::from_millis(5_000);
        let root = duty_trace("lease", "w1", "no heartbeat for 5000 ms", None, Some(since))
            .expect("recorded");
        let report =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let child = duty_trace(
            "lease",
            "w2",
            "w0 reported rank 2 silent",
            Some(&report),
            None,
        )
        .expect("recorded");
        assert_eq!(child.trace_id(), report.trace_id());
        assert_ne!(root.trace_id(), report.trace_id());
        let spans = exporter.get_finished_spans().unwrap();
        let detection = spans
            .iter()
            .find(|s| s.name == "recovery.detection")
            .unwrap();
        assert_eq!(detection.start_time, since);
        assert!(detection.end_time >= since + Duration::from_millis(5_000));
        assert_eq!(
            detection.span_context.trace_id().to_string(),
            root.trace_id()
        );
        let attr = |s: &opentelemetry_sdk::trace::SpanData, k: &str| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(
            attr(detection, "detected_by").as_deref(),
            Some("controller")
        );
        assert_eq!(attr(detection, "worker").as_deref(), Some("w1"));
        let decision = spans
            .iter()
            .find(|s| s.name == "recovery.decision")
            .unwrap();
        assert_eq!(decision.parent_span_id.to_string(), "b7ad6b7169203331");
        assert_eq!(attr(decision, "detected_by"), None);
    }
}
