//! A blocking client of the controller API, for the CLI, workers and tests, on ureq
//! (keep-alive connections, rustls).
//!
//! It knows every controller address, follows `not_leader` redirects, and retries on
//! another node when one is down, with jittered exponential backoff, until its deadline.
//! Commands carry a request id that stays the same across retries, so a retried command
//! applies once.

use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phalanx_pki::{Identity, PkiError, Role, TlsDir, TokenKind, ALPN_HTTP1};
use phalanx_proto::{Command, CommandResponse, Envelope, ErrorCode, ErrorResponse, StatusResponse};
use serde::de::DeserializeOwned;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("unauthorized (401) from {addr}: {message}")]
    Unauthorized { addr: String, message: String },
    #[error("forbidden (403) by {addr}: {message}")]
    Forbidden { addr: String, message: String },
    #[error("{addr} answered {status} {error}: {message}")]
    Api {
        addr: String,
        status: u16,
        error: ErrorCode,
        message: String,
    },
    #[error("no controller answered within {deadline_ms} ms (tried {addrs}); last error: {last}")]
    Unavailable {
        deadline_ms: u64,
        addrs: String,
        last: String,
    },
    #[error("bad response from {addr}: {message}")]
    BadResponse { addr: String, message: String },
    #[error("no controller addresses given")]
    NoAddresses,
}

pub struct Client {
    addrs: Vec<String>,
    creds: Credentials,
    agent: ureq::Agent,
    /// Bound of one HTTP exchange.
    pub request_timeout: Duration,
    /// Bound of a call with all its retries.
    pub deadline: Duration,
    /// When set, a call gives up after this long if no controller has answered at all
    /// (every connection refused or timed out): an unreachable cluster is reported
    /// quickly, while a reachable one that is electing a leader still gets `deadline`.
    pub unreachable_after: Option<Duration>,
    preferred: AtomicUsize,
}

static REQ_SEQ: AtomicU64 = AtomicU64::new(0);

/// A request id unique across processes: wall time, pid and a counter.
pub fn new_request_id(prefix: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{t:x}-{}",
        std::process::id(),
        REQ_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// How a client proves who it is: TLS with the cluster CA (and a client certificate of
/// its role, or a bearer token), or `--insecure`'s plain HTTP with the shared token.
#[derive(Clone)]
pub struct Credentials {
    tls: Option<Arc<rustls::ClientConfig>>,
    bearer: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Credentials {
    /// Plain HTTP with the shared token (`--insecure` clusters).
    pub fn insecure(token: impl Into<String>) -> Self {
        Credentials {
            tls: None,
            bearer: Some(token.into()),
        }
    }

    /// TLS with `identity`'s client certificate.
    pub fn identity(dir: &TlsDir, identity: &Identity) -> Result<Self, PkiError> {
        Ok(Credentials {
            tls: Some(dir.client_config(Some(identity), &[ALPN_HTTP1])?),
            bearer: None,
        })
    }

    /// TLS with the client certificate of `role` from `dir`.
    pub fn role(dir: &TlsDir, role: &Role) -> Result<Self, PkiError> {
        Credentials::identity(dir, &dir.identity(role)?)
    }

    /// TLS without a client certificate, with an operator token from `dir`.
    pub fn token(dir: &TlsDir, kind: TokenKind) -> Result<Self, PkiError> {
        Ok(Credentials {
            tls: Some(dir.client_config(None, &[ALPN_HTTP1])?),
            bearer: Some(dir.token(kind)?),
        })
    }

    /// TLS without a client certificate, with a bearer `token`.
    pub fn tls_with_token(dir: &TlsDir, token: String) -> Result<Self, PkiError> {
        Ok(Credentials {
            tls: Some(dir.client_config(None, &[ALPN_HTTP1])?),
            bearer: Some(token),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// A keep-alive agent for these credentials.
    fn agent(&self) -> ureq::Agent {
        let mut b = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .max_idle_connections_per_host(4)
            .redirects(0)
            .user_agent(concat!("phalanx/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &self.tls {
            b = b.tls_config(t.clone());
        }
        b.build()
    }
}

/// Largest response body a client reads.
const RESPONSE_BYTES_MAX: u64 = 64 << 20;

/// One HTTP exchange with one address, on `agent`'s pooled connections. `Ok` for every
/// HTTP answer (any status), `Err` when none came.
fn exchange(
    agent: &ureq::Agent,
    creds: &Credentials,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), std::io::Error> {
    let url = format!("{}://{addr}{path}", creds.scheme());
    let mut req = agent
        .request(method, &url)
        .timeout(timeout)
        .set("Content-Type", "application/json");
    if let Some(t) = &creds.bearer {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    // The caller's span goes along as a W3C `traceparent` (nothing without a trace
    // pipeline): the controller's request span becomes its child.
    for (k, v) in phalanx_telemetry::traces::inject(&tracing::Span::current()) {
        req = req.set(&k, &v);
    }
    let r = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(ureq::Error::Transport(t)) => {
            return Err(std::io::Error::other(format!("{addr}: {t}")));
        }
    };
    let status = resp.status();
    let mut buf = Vec::new();
    resp.into_reader()
        .take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut buf)?;
    Ok((status, buf))
}

/// One HTTP exchange with one address, on a fresh connection.
pub fn http_once(
    addr: &str,
    method: &str,
    path: &str,
    creds: &Credentials,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), std::io::Error> {
    exchange(&creds.agent(), creds, addr, method, path, body, timeout)
}

/// Jittered exponential backoff between retries (20 ms doubling to 500 ms).
fn backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Client {
    pub fn new(addrs: Vec<String>, creds: Credentials) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        Ok(Client {
            addrs,
            agent: creds.agent(),
            creds,
            request_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
            unreachable_after: None,
            preferred: AtomicUsize::new(0),
        })
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Call the API, retrying across nodes until the deadline.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        // One span for the call, its retries included; each attempt carries its context.
        let span = tracing::info_span!("api.call", http.request.method = method, url.path = path);
        let _entered = span.enter();
        let start = Instant::now();
        let mut last = String::from("none");
        let mut i = self.preferred.load(Ordering::Relaxed);
        let mut redirect: Option<String> = None;
        let mut attempt = 0u32;
        let mut answered = false;
        let mut pause = backoff();
        // Until some node answers, the shorter bound applies.
        let bound = |answered: bool| match self.unreachable_after {
            Some(d) if !answered => d.min(self.deadline),
            _ => self.deadline,
        };
        while start.elapsed() < bound(answered) {
            attempt += 1;
            let addr = redirect
                .take()
                .unwrap_or_else(|| self.addrs[i % self.addrs.len()].clone());
            // A node that accepts the connection gets the full request timeout (a write
            // may wait on a slow disk); only the connection attempts are bounded by
            // `unreachable_after` (connect_timeout is at most 1 s in `http_once`).
            let remaining = self.deadline.saturating_sub(start.elapsed());
            let result = exchange(
                &self.agent,
                &self.creds,
                &addr,
                method,
                path,
                body,
                self.request_timeout
                    .min(remaining.max(Duration::from_millis(100))),
            );
            answered |= result.is_ok();
            match result {
                Ok((status, bytes)) if (200..300).contains(&status) => {
                    if let Some(pos) = self.addrs.iter().position(|a| *a == addr) {
                        self.preferred.store(pos, Ordering::Relaxed);
                    }
                    return Ok(bytes);
                }
                Ok((status, bytes)) => {
                    let err: ErrorResponse =
                        serde_json::from_slice(&bytes).unwrap_or(ErrorResponse {
                            error: ErrorCode::Unknown,
                            message: String::from_utf8_lossy(&bytes).into_owned(),
                            leader_id: None,
                            leader_address: None,
                        });
                    match status {
                        401 => {
                            return Err(ClientError::Unauthorized {
                                addr,
                                message: err.message,
                            })
                        }
                        403 => {
                            return Err(ClientError::Forbidden {
                                addr,
                                message: err.message,
                            })
                        }
                        421 => {
                            last = format!("{addr}: not leader");
                            if let Some(a) = err.leader_address.filter(|a| !a.is_empty()) {
                                redirect = Some(a);
                                continue;
                            }
                            i += 1;
                        }
                        503 | 504 => {
                            last = format!("{addr}: {} ({})", err.error, err.message);
                            self.pause(&mut pause, start, bound(answered));
                            if attempt % 2 == 0 {
                                i += 1;
                            }
                        }
                        _ => {
                            return Err(ClientError::Api {
                                addr,
                                status,
                                error: err.error,
                                message: err.message,
                            });
                        }
                    }
                }
                Err(e) => {
                    last = format!("{addr}: {e}");
                    i += 1;
                    if attempt as usize % self.addrs.len() == 0 {
                        self.pause(&mut pause, start, bound(answered));
                    }
                }
            }
        }
        Err(ClientError::Unavailable {
            deadline_ms: bound(answered).as_millis() as u64,
            addrs: self.addrs.join(","),
            last,
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.call("GET", path, None)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
            addr: "controller".into(),
            message: e.to_string(),
        })
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        let bytes = self.call("POST", path, Some(&body))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
            addr: "controller".into(),
            message: e.to_string(),
        })
    }

    /// Submit a command with a fresh request id (kept across retries).
    pub fn command(&self, command: Command) -> Result<CommandResponse, ClientError> {
        self.command_with_id(new_request_id("cli"), command)
    }

    pub fn command_with_id(
        &self,
        request_id: String,
        command: Command,
    ) -> Result<CommandResponse, ClientError> {
        self.post(
            "/v1/command",
            &Envelope {
                trace: None,
                request_id,
                command,
            },
        )
    }

    /// Sleeps the backoff's next pause, never past the call's bound.
    fn pause(&self, p: &mut impl Iterator<Item = Duration>, start: Instant, bound: Duration) {
        let left = bound.saturating_sub(start.elapsed());
        std::thread::sleep(p.next().unwrap_or(Duration::from_millis(500)).min(left));
    }

    /// The status of every controller that answers (no retries), in address order.
    pub fn status_all(&self) -> Vec<(String, Result<StatusResponse, String>)> {
        self.status_all_within(Duration::from_millis(800))
    }

    /// As [`Client::status_all`], each exchange bounded by `timeout`.
    pub fn status_all_within(
        &self,
        timeout: Duration,
    ) -> Vec<(String, Result<StatusResponse, String>)> {
        self.addrs
            .iter()
            .map(|a| {
                let r = exchange(
                    &self.agent,
                    &self.creds,
                    a,
                    "GET",
                    "/v1/status",
                    None,
                    timeout,
                )
                .map_err(|e| e.to_string())
                .and_then(|(status, body)| {
                    if status == 200 {
                        serde_json::from_slice::<StatusResponse>(&body).map_err(|e| e.to_string())
                    } else {
                        let e: Option<ErrorResponse> = serde_json::from_slice(&body).ok();
                        Err(format!(
                            "{status} {}",
                            e.map(|e| e.message).unwrap_or_default()
                        ))
                    }
                });
                (a.clone(), r)
            })
            .collect()
    }
}
