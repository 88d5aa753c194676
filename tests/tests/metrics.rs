//! `/metrics` on a running cluster (issue 12): three controllers and two workers (one of
//! them started here with `--metrics-listen`), a job, a worker killed; the controllers' and
//! the worker's Prometheus text is parsed with `prometheus-parse` while the job runs.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use phalanx_controller::client::{http_once, Credentials};
use phalanx_pki::{TlsDir, TokenKind};
use phalanx_tests::cluster::{job_toml, LocalCluster};
use phalanx_tests::{phalanx, KillOnDrop};
use prometheus_parse::{Scrape, Value};

/// `GET /metrics` on `addr`; (status, body).
fn get(addr: &str, token: Option<&str>) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {raw:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// `GET /metrics` on controller `addr` over TLS with `creds`; (status, body).
fn ctl_get(addr: &str, creds: &Credentials) -> Result<(u16, String), String> {
    http_once(
        addr,
        "GET",
        "/metrics",
        creds,
        None,
        Duration::from_secs(10),
    )
    .map(|(code, body)| (code, String::from_utf8_lossy(&body).into_owned()))
    .map_err(|e| e.to_string())
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{text}"))
}

/// The value of a counter or gauge sample (with `label` = value when given).
fn value(s: &Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The observation count of a histogram (summed over its label sets).
fn count(s: &Scrape, name: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter_map(|x| match &x.value {
            Value::Histogram(h) => h
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .map(|b| b.count),
            _ => None,
        })
        .sum()
}

/// Scrapes until `ok` holds or `timeout` passes; the last text in the panic.
fn scrape_until(
    what: &str,
    timeout: Duration,
    mut fetch: impl FnMut() -> Result<(u16, String), String>,
    mut ok: impl FnMut(&Scrape) -> bool,
) -> Scrape {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        match fetch() {
            Ok((200, text)) => {
                let s = parse(&text);
                if ok(&s) {
                    return s;
                }
                last = text;
            }
            Ok((status, text)) => last = format!("status {status}: {text}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}; last scrape:\n{last}");
}

/// The address `--metrics-listen 127.0.0.1:0` chose, from the worker's log.
fn metrics_addr(log: &std::path::Path, timeout: Duration) -> String {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split("metrics_addr=").nth(1) {
            return rest.split_whitespace().next().unwrap_or("").to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the worker did not log its metrics address within {timeout:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn controllers_and_a_worker_serve_prometheus_text_with_live_values() {
    let c = LocalCluster::start(1, 0);
    let log = c.dir.path().join("wm.log");
    let mut w = phalanx();
    w.args(["worker", "start", "--id", "wm"])
        .arg(format!("--dir={}", c.cluster_dir().display()))
        .arg("--metrics-listen=127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let _wm = KillOnDrop(w.spawn().expect("spawn worker wm"));
    let waddr = metrics_addr(&log, Duration::from_secs(60));
    c.wait_for(Duration::from_secs(60), "wm to register", |c| {
        c.status().is_some_and(|s| s.workers.len() == 2)
    });
    // Two ranks at first; one is enough to go on after the kill. Long enough that the
    // kill comes before the end, even on a fast machine.
    c.submit(&job_toml("metrics", 3000, 10, 1, 2));
    c.wait_step(3, Duration::from_secs(120));

    // The worker: numbers only, no token.
    let fetch_w = || get(&waddr, None);
    let first = scrape_until(
        "the worker's first steps",
        Duration::from_secs(60),
        fetch_w,
        |s| value(s, "phalanx_train_steps_total", None).unwrap_or(0.0) >= 1.0,
    );
    let steps0 = value(&first, "phalanx_train_steps_total", None).unwrap();
    let loss = value(&first, "phalanx_train_loss", None).unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    let norm = value(&first, "phalanx_train_gradient_norm", None).unwrap();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
    assert!(value(&first, "phalanx_train_tokens_per_second", None).unwrap() > 0.0);
    assert!(value(&first, "phalanx_train_plan_epoch", None).unwrap() >= 1.0);
    assert!(count(&first, "phalanx_train_step_duration_seconds") >= 1.0);
    let grown = scrape_until(
        "the worker's step count to grow",
        Duration::from_secs(60),
        fetch_w,
        |s| value(s, "phalanx_train_steps_total", None).unwrap_or(0.0) > steps0,
    );
    assert!(value(&grown, "phalanx_train_step", None).unwrap() > 1.0);
    scrape_until(
        "a checkpoint's write time and stall on the worker",
        Duration::from_secs(120),
        fetch_w,
        |s| {
            count(s, "phalanx_checkpoint_write_duration_seconds") >= 1.0
                && count(s, "phalanx_checkpoint_stall_seconds") >= 1.0
        },
    );

    // The controllers: TLS, and the read-only credential is required.
    let tls = TlsDir::open(&c.cluster_dir().join("tls")).unwrap();
    let reader = Credentials::token(&tls, TokenKind::Reader).unwrap();
    let anonymous = Credentials::tls_with_token(&tls, String::new()).unwrap();
    let status = c.status().expect("status");
    let members: Vec<(u64, String)> = status
        .members
        .iter()
        .map(|m| (m.id, m.address.clone()))
        .collect();
    assert_eq!(members.len(), 3, "{status:?}");
    let (code, body) = ctl_get(&members[0].1, &anonymous).unwrap();
    assert_eq!(code, 401, "no credential: {body}");
    for (_, addr) in &members {
        let s = scrape_until(
            &format!("controller {addr}'s metrics"),
            Duration::from_secs(30),
            || ctl_get(addr, &reader),
            |s| value(s, "phalanx_raft_term", None).is_some(),
        );
        assert!(value(&s, "phalanx_raft_term", None).unwrap() >= 1.0);
        assert!(value(&s, "phalanx_raft_commit_index", None).unwrap() >= 1.0);
        assert!(value(&s, "phalanx_raft_leader_changes_total", None).unwrap() >= 1.0);
    }
    // The leader (it may have moved: whoever says so now).
    let leader = scrape_until(
        "a controller that leads, with the job's progress",
        Duration::from_secs(60),
        || {
            for (_, addr) in &members {
                if let Ok((200, text)) = ctl_get(addr, &reader) {
                    if value(&parse(&text), "phalanx_raft_is_leader", None) == Some(1.0) {
                        return Ok((200, text));
                    }
                }
            }
            Err("no controller says it leads".into())
        },
        // Both workers healthy (a loaded machine may make one suspect for a moment).
        |s| {
            value(s, "phalanx_job_progress_step", None).unwrap_or(0.0) >= 3.0
                && value(s, "phalanx_cluster_workers", Some(("health", "healthy"))) == Some(2.0)
        },
    );
    assert!(value(&leader, "phalanx_job_plan_epoch", None).unwrap() >= 1.0);
    assert_eq!(
        value(
            &leader,
            "phalanx_cluster_workers",
            Some(("health", "healthy"))
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &leader,
            "phalanx_cluster_workers",
            Some(("health", "failed"))
        ),
        Some(0.0)
    );
    assert!(value(&leader, "phalanx_raft_proposals_total", None).unwrap() >= 1.0);
    assert!(count(&leader, "phalanx_raft_proposal_duration_seconds") >= 1.0);

    // A kill: the survivor goes on alone from its own memory; the controllers count the
    // recovery and its MTTR.
    c.kill_workers_at_once(&["w0"]);
    let recovered = scrape_until(
        "a recovery counted with its MTTR",
        Duration::from_secs(120),
        || {
            for (_, addr) in &members {
                if let Ok((200, text)) = ctl_get(addr, &reader) {
                    if value(&parse(&text), "phalanx_raft_is_leader", None) == Some(1.0) {
                        return Ok((200, text));
                    }
                }
            }
            Err("no controller says it leads".into())
        },
        |s| {
            count(s, "phalanx_job_recovery_mttr_seconds") >= 1.0
                && value(s, "phalanx_cluster_workers", Some(("health", "failed"))) == Some(1.0)
        },
    );
    assert!(value(&recovered, "phalanx_job_plan_epoch", None).unwrap() >= 2.0);
    let recoveries: f64 = ["peer", "checkpoint", "initial", "other"]
        .iter()
        .filter_map(|src| {
            value(
                &recovered,
                "phalanx_job_recoveries_total",
                Some(("source", src)),
            )
        })
        .sum();
    assert!(recoveries >= 1.0, "recoveries by source");
    // The survivor trains in the new epoch.
    scrape_until(
        "the survivor in the new plan epoch",
        Duration::from_secs(60),
        fetch_w,
        |s| value(s, "phalanx_train_plan_epoch", None).unwrap_or(0.0) >= 2.0,
    );
}
