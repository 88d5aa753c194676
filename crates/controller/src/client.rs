//! A small blocking client of the controller API, for the CLI, workers and tests.
//!
//! It knows every controller address, follows `not_leader` redirects, and retries on
//! another node when one is down, until its deadline. Commands carry a request id that
//! stays the same across retries, so a retried command applies once.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phalanx_proto::{Command, CommandResponse, Envelope, ErrorResponse, StatusResponse};
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::wire;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("unauthorized (401) from {addr}: {message}")]
    Unauthorized { addr: String, message: String },
    #[error("{addr} answered {status} {error}: {message}")]
    Api {
        addr: String,
        status: u16,
        error: String,
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
    token: String,
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

/// One HTTP exchange with one address.
pub fn http_once(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), std::io::Error> {
    let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad address {addr}"),
        )
    })?;
    let mut s = TcpStream::connect_timeout(&sa, timeout.min(Duration::from_secs(1)))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let _ = s.set_nodelay(true);
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req)?;
    let mut buf = Vec::new();
    let start = Instant::now();
    let mut chunk = [0u8; 16384];
    loop {
        if let Ok(Some(r)) = wire::parse_response(&buf, 64 << 20) {
            return Ok(r);
        }
        if start.elapsed() > timeout {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "response timed out",
            ));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return match wire::parse_response(&buf, 64 << 20) {
                Ok(Some(r)) => Ok(r),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed mid-response",
                )),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Client {
    pub fn new(addrs: Vec<String>, token: String) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        Ok(Client {
            addrs,
            token,
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
        let start = Instant::now();
        let mut last = String::from("none");
        let mut i = self.preferred.load(Ordering::Relaxed);
        let mut redirect: Option<String> = None;
        let mut attempt = 0u32;
        let mut answered = false;
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
            let result = http_once(
                &addr,
                method,
                path,
                &self.token,
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
                            error: "unknown".into(),
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
                            std::thread::sleep(Duration::from_millis(30));
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
                        std::thread::sleep(Duration::from_millis(30));
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
                request_id,
                command,
            },
        )
    }

    /// The status of every controller that answers (no retries), in address order.
    pub fn status_all(&self) -> Vec<(String, Result<StatusResponse, String>)> {
        self.addrs
            .iter()
            .map(|a| {
                let r = http_once(
                    a,
                    "GET",
                    "/v1/status",
                    &self.token,
                    None,
                    Duration::from_millis(800),
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
