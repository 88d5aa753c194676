//! Traces (issue 12): `tracing` spans to OpenTelemetry through `tracing-opentelemetry`,
//! exported over OTLP/HTTP-protobuf when an endpoint is given (`--otlp-endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), and nowhere otherwise: without an endpoint no layer
//! is installed, so a span costs what it cost before.
//!
//! A dead endpoint never holds a process up: every export is bounded by
//! [`EXPORT_TIMEOUT`], spans go through the SDK's batch processor (its own thread, a
//! bounded queue that drops when full), and [`Traces::shutdown`] runs on a thread of its
//! own under a bound the caller gives.
//!
//! Trace context crosses processes as a W3C `traceparent` header
//! ([`TraceContextPropagator`]): [`inject`] writes the context of a span into a request's
//! headers, [`set_parent_from_headers`] makes a span the child of the one that sent them.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, TraceContextExt, TraceFlags, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::Context;
pub use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use opentelemetry_sdk::Resource;
use phalanx_proto::TraceParent;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

use crate::TelemetryError;

/// The environment variable OpenTelemetry's exporters read for their endpoint.
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The longest one export (one HTTP request to the collector) may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// How often the batch processor sends what it holds (the SDK's default is 5 s; a
/// short-lived CLI command flushes at exit anyway).
pub const SCHEDULED_DELAY: Duration = Duration::from_millis(500);

/// Which spans are exported (an `EnvFilter`, apart from the log filter): the Phalanx
/// crates' info spans, less the per-connection `api` span (a keep-alive connection lives
/// for hours) and the raft loop's `ready_loop` (many per second).
pub const EXPORT_FILTER: &str =
    "off,phalanx=info,phalanx_controller::server::listen=off,phalanx_controller::server::raft_loop=off";

/// The HTTP header that carries a span's context to another process.
pub const TRACEPARENT: &str = "traceparent";

/// An installed trace pipeline: hand [`Traces::layer`] to the subscriber, and call
/// [`Traces::shutdown`] before the process exits so that the last spans leave.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    endpoint: String,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Checks an OTLP endpoint (the collector's base address, `http://HOST:PORT`, to which
/// `/v1/traces` is appended) and returns the traces URL.
pub fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let e = endpoint.trim();
    let rest = if let Some(r) = e.strip_prefix("http://") {
        r
    } else if e.starts_with("https://") {
        return Err(TelemetryError::Traces(format!(
            "OTLP endpoint {e:?}: https is not supported (the exporter speaks plain \
             HTTP; run a local collector)"
        )));
    } else {
        return Err(TelemetryError::Traces(format!(
            "OTLP endpoint {e:?}: expected http://HOST:PORT"
        )));
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return Err(TelemetryError::Traces(format!(
            "OTLP endpoint {e:?}: no host after http://"
        )));
    }
    let base = e.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        Ok(base.to_string())
    } else {
        Ok(format!("{base}/v1/traces"))
    }
}

impl Traces {
    /// The pipeline for `endpoint`, or `None` when there is none (absent or empty).
    /// `service` is the `service.name` of every span this process exports.
    pub fn from_endpoint(
        service: &str,
        endpoint: Option<&str>,
    ) -> Result<Option<Traces>, TelemetryError> {
        let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) else {
            return Ok(None);
        };
        let url = traces_url(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Traces(format!("OTLP exporter for {url}: {e}")))?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(SCHEDULED_DELAY)
                    .build(),
            )
            .build();
        let traces = Self::with_processor(service, batch, url);
        traces.set_global();
        Ok(Some(traces))
    }

    /// Makes this pipeline the one [`record_span`] uses (the process's; `from_endpoint`
    /// does it).
    pub fn set_global(&self) {
        *GLOBAL.write().unwrap_or_else(|p| p.into_inner()) = Some(self.tracer.clone());
    }

    /// A pipeline around any span processor (the tests give one with an in-memory
    /// exporter).
    pub fn with_processor(
        service: &str,
        processor: impl opentelemetry_sdk::trace::SpanProcessor + 'static,
        endpoint: String,
    ) -> Traces {
        let resource = Resource::builder()
            .with_service_name(service.to_string())
            .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("phalanx");
        Traces {
            provider,
            tracer,
            endpoint,
        }
    }

    /// Where the spans go.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_threads(false)
    }

    /// Sends what is left and stops, on a thread of its own, waiting at most `bound`
    /// (then the process goes on without it). True when it finished in time and well.
    pub fn shutdown(self, bound: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let provider = self.provider;
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let _ = tx.send(provider.shutdown_with_timeout(bound).is_ok());
            });
        if spawned.is_err() {
            return false;
        }
        rx.recv_timeout(bound + Duration::from_millis(100))
            .unwrap_or(false)
    }
}

/// The trace context of `span` as headers (`traceparent`, and `tracestate` when there is
/// one); empty when no trace pipeline is installed or the span is disabled.
pub fn inject(span: &tracing::Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    headers
}

/// The tracer of the process's pipeline, for spans recorded after the fact.
static GLOBAL: RwLock<Option<SdkTracer>> = RwLock::new(None);

/// The trace context of `span` as a checked `traceparent`; `None` without a pipeline.
pub fn traceparent(span: &tracing::Span) -> Option<TraceParent> {
    inject(span)
        .get(TRACEPARENT)
        .and_then(|t| TraceParent::parse(t).ok())
}

fn context_of(tp: &TraceParent) -> Context {
    let mut h = HashMap::new();
    h.insert(TRACEPARENT.to_string(), tp.as_str().to_string());
    TraceContextPropagator::new().extract(&h)
}

/// Makes `span` (not yet entered) the child of the span `tp` names, in another process.
pub fn set_parent(span: &tracing::Span, tp: &TraceParent) {
    // Fails only when the span is disabled or no pipeline is installed.
    let _ = span.set_parent(context_of(tp));
}

/// Makes `span` (not yet entered) and everything under it unsampled: neither exported
/// here nor, through the `traceparent` its API calls send (flags `00`), by the
/// controller. For the periodic calls (heartbeats, assignment polls, progress reports),
/// which would otherwise each be a trace of their own, several a second per worker.
pub fn set_unsampled(span: &tracing::Span) {
    let ids = RandomIdGenerator::default();
    let sc = SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::default(),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(sc));
}

/// Records a span that has already happened, from `start` to `end` (wall clock, which is
/// what OTLP carries), as the child of `parent` or as a root; returns its context for
/// children. `None` without a pipeline (then nothing is recorded).
pub fn record_span(
    name: &'static str,
    parent: Option<&TraceParent>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<TraceParent> {
    record_linked_span(name, parent, &[], start, end, attributes)
}

/// [`record_span`] with span links: `links` name spans of other traces that this one
/// follows from (a worker's own detection of a fault whose recovery another worker's
/// report started, say). A link whose span is the parent's trace's is kept all the same.
pub fn record_linked_span(
    name: &'static str,
    parent: Option<&TraceParent>,
    links: &[TraceParent],
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<TraceParent> {
    let tracer = GLOBAL.read().unwrap_or_else(|p| p.into_inner()).clone()?;
    let cx = parent.map(context_of).unwrap_or_default();
    let links: Vec<Link> = links
        .iter()
        .map(|l| Link::with_context(context_of(l).span().span_context().clone()))
        .collect();
    let builder = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .with_links(links);
    let mut span = tracer.build_with_context(builder, &cx);
    let sc = span.span_context().clone();
    span.end_with_timestamp(end.max(start));
    traceparent_of(&sc)
}

/// A span started at a given time and ended later ([`start_span`]): its context is known
/// while it runs, so that children recorded meanwhile can name it.
pub struct OpenSpan {
    span: opentelemetry_sdk::trace::Span,
    traceparent: TraceParent,
}

impl std::fmt::Debug for OpenSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSpan")
            .field("traceparent", &self.traceparent)
            .finish()
    }
}

impl OpenSpan {
    pub fn traceparent(&self) -> &TraceParent {
        &self.traceparent
    }

    /// Ends it now, with `attributes` added.
    pub fn end(mut self, attributes: Vec<KeyValue>) {
        self.span.set_attributes(attributes);
        self.span.end();
    }
}

/// Starts a span at `start` (wall clock), the child of `parent` or a root; `None`
/// without a pipeline. Ended by [`OpenSpan::end`] (or when dropped).
pub fn start_span(
    name: &'static str,
    parent: Option<&TraceParent>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<OpenSpan> {
    let tracer = GLOBAL.read().unwrap_or_else(|p| p.into_inner()).clone()?;
    let cx = parent.map(context_of).unwrap_or_default();
    let builder = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes);
    let span = tracer.build_with_context(builder, &cx);
    let traceparent = traceparent_of(span.span_context())?;
    Some(OpenSpan { span, traceparent })
}

fn traceparent_of(sc: &SpanContext) -> Option<TraceParent> {
    if !sc.is_valid() {
        return None;
    }
    let mut h: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new()
        .inject_context(&Context::new().with_remote_span_context(sc.clone()), &mut h);
    h.get(TRACEPARENT).and_then(|t| TraceParent::parse(t).ok())
}

struct HeaderExtractor<'a>(&'a hyper::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` the child of the span whose context `headers` carry (a `traceparent`
/// from another process). Without one the span keeps the parent it was created with; one
/// the propagator cannot parse is ignored the same way.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &hyper::HeaderMap) {
    if headers.get(TRACEPARENT).is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only when the span is disabled or no OpenTelemetry layer is installed: then
    // there is nothing to link.
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SimpleSpanProcessor};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        let e = traces_url("https://c:4318").unwrap_err().to_string();
        assert!(e.contains("https is not supported"), "{e}");
        let e = traces_url("c:4318").unwrap_err().to_string();
        assert!(e.contains("expected http://HOST:PORT"), "{e}");
        let e = traces_url("http:///v1").unwrap_err().to_string();
        assert!(e.contains("no host"), "{e}");
        assert!(Traces::from_endpoint("t", None).unwrap().is_none());
        assert!(Traces::from_endpoint("t", Some(" ")).unwrap().is_none());
    }

    /// Two processes in one: the "client" span's context goes out as headers, the
    /// "server" span takes them as its parent; the exported spans share the trace id and
    /// the server's parent is the client span.
    #[test]
    fn a_traceparent_round_trip_makes_the_server_span_a_child_of_the_client_span() {
        let exporter = InMemorySpanExporter::default();
        let traces = Traces::with_processor(
            "test",
            SimpleSpanProcessor::new(exporter.clone()),
            "memory".into(),
        );
        let subscriber = tracing_subscriber::registry().with(traces.layer());
        let mut headers = hyper::HeaderMap::new();
        tracing::subscriber::with_default(subscriber, || {
            let client = tracing::info_span!("api.call");
            let sent = inject(&client);
            assert!(sent.contains_key(TRACEPARENT), "{sent:?}");
            for (k, v) in sent {
                headers.insert(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            drop(client);
            // No ambient span here: the parent can only come from the headers.
            let server = tracing::info_span!(parent: None, "api.request");
            set_parent_from_headers(&server, &headers);
            server.in_scope(|| {
                let _inner = tracing::info_span!("raft.propose").entered();
            });
        });
        let spans = exporter.get_finished_spans().unwrap();
        let by = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
        };
        let (client, server, propose) = (by("api.call"), by("api.request"), by("raft.propose"));
        assert_ne!(client.span_context.trace_id(), TraceId::INVALID);
        assert_eq!(
            server.span_context.trace_id(),
            client.span_context.trace_id()
        );
        assert_eq!(server.parent_span_id, client.span_context.span_id());
        assert_eq!(
            propose.span_context.trace_id(),
            client.span_context.trace_id()
        );
        assert_eq!(propose.parent_span_id, server.span_context.span_id());
        assert_eq!(client.parent_span_id, SpanId::INVALID);
        let tp = headers.get(TRACEPARENT).unwrap().to_str().unwrap();
        assert!(
            tp.contains(&client.span_context.trace_id().to_string()),
            "{tp}"
        );
    }

    /// A span recorded after the fact is the child of a `traceparent` and keeps its times;
    /// an unsampled span and its children are not exported, and what they inject says so.
    /// The tests that install the process's pipeline ([`GLOBAL`]), one at a time.
    static GLOBAL_USERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn recorded_spans_join_a_traceparent_and_unsampled_ones_are_not_exported() {
        let _one = GLOBAL_USERS.lock().unwrap_or_else(|p| p.into_inner());
        let exporter = InMemorySpanExporter::default();
        let traces = Traces::with_processor(
            "test",
            SimpleSpanProcessor::new(exporter.clone()),
            "memory".into(),
        );
        traces.set_global();
        let subscriber = tracing_subscriber::registry().with(traces.layer());
        let parent =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_millis(250);
        let child =
            record_span("recovery.plan", Some(&parent), start, end, vec![]).expect("recorded");
        assert_eq!(child.trace_id(), parent.trace_id());
        let open = start_span("checkpoint", None, start, vec![]).expect("started");
        let root_tp = open.traceparent().clone();
        record_span("checkpoint.write", Some(&root_tp), start, end, vec![]);
        open.end(vec![KeyValue::new("outcome", "committed")]);
        // A span of one trace that follows from a span of another: a link.
        let elsewhere =
            TraceParent::parse("00-11111111111111111111111111111111-2222222222222222-01").unwrap();
        record_linked_span("linked", Some(&parent), &[elsewhere], start, end, vec![]);
        let mut sent = HashMap::new();
        tracing::subscriber::with_default(subscriber, || {
            let quiet = tracing::info_span!("worker.poll");
            set_unsampled(&quiet);
            quiet.in_scope(|| {
                let call = tracing::info_span!("api.call");
                sent = inject(&call);
            });
        });
        let spans = exporter.get_finished_spans().unwrap();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert!(
            !names.contains(&"worker.poll") && !names.contains(&"api.call"),
            "{names:?}"
        );
        let plan = spans.iter().find(|s| s.name == "recovery.plan").unwrap();
        assert_eq!(plan.span_context.trace_id().to_string(), parent.trace_id());
        assert_eq!(plan.parent_span_id.to_string(), "b7ad6b7169203331");
        assert_eq!(plan.start_time, start);
        assert_eq!(plan.end_time, end);
        let root = spans.iter().find(|s| s.name == "checkpoint").unwrap();
        let write = spans.iter().find(|s| s.name == "checkpoint.write").unwrap();
        assert_eq!(write.parent_span_id, root.span_context.span_id());
        assert_eq!(root.start_time, start);
        let linked = spans.iter().find(|s| s.name == "linked").unwrap();
        assert_eq!(
            linked.span_context.trace_id().to_string(),
            parent.trace_id()
        );
        let links: Vec<String> = linked
            .links
            .iter()
            .map(|l| format!("{}-{}", l.span_context.trace_id(), l.span_context.span_id()))
            .collect();
        assert_eq!(
            links,
            ["11111111111111111111111111111111-2222222222222222"],
            "the link names the other trace's span"
        );
        let tp = TraceParent::parse(&sent[TRACEPARENT]).unwrap();
        assert!(!tp.sampled(), "an unsampled call says so: {tp}");
        *GLOBAL.write().unwrap() = None;
    }

    #[test]
    fn without_a_pipeline_nothing_is_injected_and_a_header_is_ignored() {
        let span = tracing::info_span!("alone");
        assert!(inject(&span).is_empty());
        let mut h = hyper::HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        set_parent_from_headers(&span, &h);
    }

    #[test]
    fn a_closed_port_does_not_hold_up_shutdown() {
        let _one = GLOBAL_USERS.lock().unwrap_or_else(|p| p.into_inner());
        // Port 9 (discard) on localhost is closed in the test environments we run in;
        // whatever answers, shutdown stays within its bound.
        let traces = Traces::from_endpoint("test", Some("http://127.0.0.1:9"))
            .unwrap()
            .unwrap();
        let subscriber = tracing_subscriber::registry().with(traces.layer());
        tracing::subscriber::with_default(subscriber, || {
            let _s = tracing::info_span!("lost").entered();
        });
        let t = std::time::Instant::now();
        traces.shutdown(Duration::from_secs(2));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
