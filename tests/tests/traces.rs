//! Traces over OTLP across processes (issue 12): three controllers and one worker started
//! with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/HTTP receiver inside this test
//! (hyper, decoding `ExportTraceServiceRequest` with `opentelemetry-proto`), and a
//! `phalanx job submit` with the same endpoint. The CLI's `cli.command` root span, its
//! `api.call` and a controller's `api.request` share one trace id, the controller's span
//! is the `api.call`'s child, and the proposal's `raft.propose` is the request span's
//! child. With the endpoint on a closed port, or on a listener that never answers, a CLI
//! command still finishes promptly. The worker exports its checkpoint spans.
use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use phalanx_tests::cluster::job_toml;
use phalanx_tests::{phalanx, run_with_timeout, stderr_of, KillOnDrop};
use prost::Message;

/// One span as the receiver decoded it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    pid: i64,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    start_ns: u64,
    end_ns: u64,
    attributes: HashMap<String, String>,
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
                });
            }
        }
    }
    Ok(out)
}

/// An OTLP/HTTP receiver on 127.0.0.1: every `POST /v1/traces` body is decoded into the
/// shared list (an undecodable one fails the test through `errors`).
struct Receiver {
    addr: String,
    spans: Arc<Mutex<Vec<Got>>>,
    errors: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Self {
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

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// The CLI's `api.call` span of `POST /v1/command` (process `pid`), a controller's
/// `api.request` whose parent it is, and that request's `raft.propose`.
fn linked(spans: &[Got], pid: i64) -> Option<(Got, Got, Got)> {
    let call = spans.iter().find(|s| {
        s.pid == pid
            && s.service == "phalanx"
            && s.name == "api.call"
            && s.attributes.get("url.path").map(String::as_str) == Some("/v1/command")
    })?;
    let request = spans.iter().find(|s| {
        s.service == "phalanx-controller"
            && s.name == "api.request"
            && s.parent_span_id == call.span_id
            && s.attributes
                .get("http.response.status_code")
                .map(String::as_str)
                == Some("200")
    })?;
    let propose = spans
        .iter()
        .find(|s| s.name == "raft.propose" && s.parent_span_id == request.span_id)?;
    Some((call.clone(), request.clone(), propose.clone()))
}

/// Runs `phalanx cluster down --dir DIR` when dropped, passing or failing.
struct ClusterDown(std::path::PathBuf);

impl Drop for ClusterDown {
    fn drop(&mut self) {
        let mut c = phalanx();
        c.args(["cluster", "down"])
            .arg(format!("--dir={}", self.0.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // `cluster down` bounds its own waits; a panic here (mid-unwind) would abort.
        let _ = c.status();
    }
}

#[test]
fn otlp_links_cli_and_controller_spans_in_one_trace_exports_worker_checkpoints_and_survives_a_dead_endpoint(
) {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("c");
    let mut up = phalanx();
    up.args(["cluster", "up", "--controllers=3", "--workers=1"])
        .arg(format!("--dir={}", cdir.display()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("cluster-up.log")).unwrap());
    let _up = KillOnDrop(up.spawn().expect("spawn cluster up"));
    // Dropped before `_up` (declared after it): `cluster down` stops the controllers and the
    // worker, which a SIGKILL of the supervisor alone would leave running.
    let _down = ClusterDown(cdir.clone());
    let status = || {
        let mut c = phalanx();
        c.args(["status", "--json"])
            .arg(format!("--dir={}", cdir.display()));
        run_with_timeout(c, Duration::from_secs(60))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = status();
        let leader = out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|s| s["leader_id"].as_u64().unwrap_or(0) != 0)
                .unwrap_or(false);
        if leader {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no controller leader within 60 s: {}\n{}",
            stderr_of(&out),
            std::fs::read_to_string(dir.path().join("cluster-up.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The submit, traced to the receiver.
    let job = dir.path().join("job.toml");
    std::fs::write(&job, job_toml("traced", 4, 2, 1, 1)).unwrap();
    let mut submit = phalanx();
    submit
        .args(["job", "submit", job.to_str().unwrap()])
        .arg(format!("--dir={}", cdir.display()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(submit.spawn().expect("spawn job submit"));
    let pid = i64::from(child.0.id());
    let code = child
        .wait_timeout(Duration::from_secs(60))
        .expect("job submit did not finish within 60 s");
    assert!(code.success(), "job submit failed: {code}");

    // The controllers export every 500 ms; the CLI flushed at exit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (call, request, propose) = loop {
        let spans = receiver.spans();
        if let Some(found) = linked(&spans, pid) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no linked CLI -> controller spans within 30 s; received {} spans: {:#?}",
            spans.len(),
            spans
                .iter()
                .map(|s| (&s.service, s.pid, &s.name, hex(&s.parent_span_id)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        receiver.errors.lock().unwrap().is_empty(),
        "{:?}",
        receiver.errors.lock().unwrap()
    );
    assert_eq!(call.trace_id.len(), 16);
    assert!(call.trace_id.iter().any(|b| *b != 0));
    assert_eq!(request.trace_id, call.trace_id, "one trace id");
    assert_eq!(
        request.parent_span_id, call.span_id,
        "the controller span's parent is the CLI span"
    );
    assert_ne!(request.pid, call.pid, "two processes");
    assert_eq!(
        request.attributes.get("http.route").map(String::as_str),
        Some("/v1/command")
    );
    assert_eq!(
        request
            .attributes
            .get("http.request.method")
            .map(String::as_str),
        Some("POST")
    );
    let spans = receiver.spans();
    let root = spans
        .iter()
        .find(|s| s.pid == pid && s.name == "cli.command" && s.span_id == call.parent_span_id)
        .unwrap_or_else(|| panic!("the CLI's api.call has no cli.command parent: {call:?}"));
    assert_eq!(root.trace_id, call.trace_id);
    assert!(
        root.parent_span_id.iter().all(|b| *b == 0),
        "cli.command is the root: {root:?}"
    );
    assert_eq!(
        root.attributes.get("command").map(String::as_str),
        Some("job submit")
    );
    assert_eq!(propose.trace_id, call.trace_id);
    assert_eq!(propose.pid, request.pid);
    assert_eq!(
        propose.attributes.get("outcome").map(String::as_str),
        Some("applied")
    );
    assert!(call.end_ns >= call.start_ns && request.end_ns >= request.start_ns);
    // The trace as received (docs/observability.md shows one such excerpt).
    let mut trace: Vec<&Got> = spans
        .iter()
        .filter(|s| s.trace_id == call.trace_id)
        .collect();
    trace.sort_by_key(|s| s.start_ns);
    eprintln!("trace {}:", hex(&call.trace_id));
    let keys = [
        "command",
        "http.request.method",
        "url.path",
        "http.route",
        "http.response.status_code",
        "outcome",
    ];
    for s in trace {
        let shown: Vec<String> = keys
            .iter()
            .filter_map(|k| s.attributes.get(*k).map(|v| format!("{k}={v}")))
            .collect();
        eprintln!(
            "  {:<18} pid {:<6} {:<13} span {} parent {} {:>8.3} ms  {}",
            s.service,
            s.pid,
            s.name,
            hex(&s.span_id),
            hex(&s.parent_span_id),
            s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6,
            shown.join(" ")
        );
    }

    // A dead endpoint does not hold a command up: a closed port (connection refused)
    // and a listener that accepts and never answers (the export's timeout, then the
    // bounded shutdown).
    let closed = {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let silent = StdListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    for port in [closed, silent_port] {
        let mut c = phalanx();
        c.args(["status", "--json"])
            .arg(format!("--dir={}", cdir.display()))
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            );
        let t = Instant::now();
        // run_with_timeout fails the test if the command hangs past 30 s.
        let out = run_with_timeout(c, Duration::from_secs(30));
        let took = t.elapsed();
        assert!(
            out.status.success(),
            "status with a dead OTLP endpoint: {}",
            stderr_of(&out)
        );
        // The bound: one export timeout (3 s) inside a shutdown bound of 3 s, plus the
        // command itself on a loaded machine.
        assert!(
            took < Duration::from_secs(15),
            "status with OTLP endpoint port {port} took {took:?}"
        );
        eprintln!("status with a dead OTLP endpoint (port {port}): {took:?}");
    }
    drop(silent);

    // The worker (`phalanx-train worker start`, started by `cluster up` with the same
    // environment) exports too: its checkpoint writes as spans.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let spans = receiver.spans();
        let mut names: Vec<(String, String, String)> = spans
            .iter()
            .map(|s| {
                let parent = spans
                    .iter()
                    .find(|p| p.span_id == s.parent_span_id)
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                (s.service.clone(), s.name.clone(), parent)
            })
            .collect();
        names.sort();
        names.dedup();
        let has = |svc: &str, name: &str, parent: &str| {
            names
                .iter()
                .any(|(s, n, p)| s == svc && n == name && p == parent)
        };
        if has("phalanx-worker", "ckpt_write_shard", "ckpt_async_write")
            && names.iter().any(|(_, n, _)| n == "ckpt_commit_manifest")
        {
            eprintln!("(service, span, parent span) received: {names:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint spans from the worker within 120 s; received: {names:#?}\n{}",
            std::fs::read_to_string(dir.path().join("cluster-up.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
