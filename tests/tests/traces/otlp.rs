//! The OTLP/HTTP receiver of the trace tests: decodes `ExportTraceServiceRequest` bodies
//! with `opentelemetry-proto` into [`Got`] spans.
use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

/// One span as the receiver decoded it.
#[derive(Clone, Debug)]
pub struct Got {
    pub service: String,
    pub pid: i64,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: HashMap<String, String>,
    /// The spans of other traces this one links to: (trace id, span id).
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter().map(|k| (k.key.clone(), text(&k.value))).collect()
}

/// The spans of one OTLP/HTTP-protobuf request body.
fn decode(body: &[u8]) -> Result<Vec<Got>, prost::DecodeError> {
    let req = ExportTraceServiceRequest::decode(body)?;
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    service: res.get("service.name").cloned().unwrap_or_default(),
                    pid: res
                        .get("process.pid")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(-1),
                    name: s.name.clone(),
                    trace_id: s.trace_id.clone(),
                    span_id: s.span_id.clone(),
                    parent_span_id: s.parent_span_id.clone(),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attributes: attrs(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| (l.trace_id.clone(), l.span_id.clone()))
                        .collect(),
                });
            }
        }
    }
    Ok(out)
}

/// An OTLP/HTTP receiver on 127.0.0.1: every `POST /v1/traces` body is decoded into the
/// shared list (an undecodable one fails the test through `errors`).
pub struct Receiver {
    pub addr: String,
    pub spans: Arc<Mutex<Vec<Got>>>,
    pub errors: Arc<Mutex<Vec<String>>>,
    pub _rt: tokio::runtime::Runtime,
}

impl Receiver {
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = StdListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap().to_string();
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s2, e2) = (spans.clone(), errors.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (spans, errors) = (s2.clone(), e2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (spans, errors) = (spans.clone(), errors.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await?.to_bytes();
                            let status = if path != "/v1/traces" {
                                errors.lock().unwrap().push(format!("POST {path}"));
                                404
                            } else {
                                match decode(&body) {
                                    Ok(got) => {
                                        spans.lock().unwrap().extend(got);
                                        200
                                    }
                                    Err(e) => {
                                        errors.lock().unwrap().push(e.to_string());
                                        400
                                    }
                                }
                            };
                            Ok::<_, hyper::Error>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                                    .unwrap_or_default(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            spans,
            errors,
            _rt: rt,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}
