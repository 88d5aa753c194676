//! The HTTP/JSON API: routing, authentication, and the answers of the raft loop mapped to
//! status codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use phalanx_proto::{
    Assignment, Command, ControllerMember, Envelope, ErrorResponse, HeartbeatRequest, MemberChange,
    NodeId, StatusResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::warn;

use super::raft_loop::Input;
use super::{token_eq, ConnCtx};
use crate::node::Replica;
use crate::wire;

/// An API failure, mapped to an HTTP status.
#[derive(Debug, Clone)]
pub enum ApiError {
    NotLeader {
        leader_id: NodeId,
        leader_address: Option<String>,
    },
    NoLeader,
    Timeout,
    BadRequest(String),
    NotFound(String),
    /// Refused because of the cluster's state (a membership change that would leave no
    /// voter, or one while another is in progress).
    Conflict(String),
    Internal(String),
}

impl ApiError {
    fn status_and_body(&self) -> (u16, ErrorResponse) {
        let e = |error: &str, message: String| ErrorResponse {
            error: error.into(),
            message,
            leader_id: None,
            leader_address: None,
        };
        match self {
            ApiError::NotLeader {
                leader_id,
                leader_address,
            } => (
                421,
                ErrorResponse {
                    error: "not_leader".into(),
                    message: format!("this node is not the leader; the leader is node {leader_id}"),
                    leader_id: Some(*leader_id),
                    leader_address: leader_address.clone(),
                },
            ),
            ApiError::NoLeader => (
                503,
                e("no_leader", "no leader is known right now; retry".into()),
            ),
            ApiError::Timeout => (
                504,
                e(
                    "timeout",
                    "the request did not commit in time; retry with the same request id".into(),
                ),
            ),
            ApiError::BadRequest(m) => (400, e("bad_request", m.clone())),
            ApiError::NotFound(m) => (404, e("not_found", m.clone())),
            ApiError::Conflict(m) => (409, e("refused", m.clone())),
            ApiError::Internal(m) => (500, e("internal", m.clone())),
        }
    }
}

pub(crate) type ApiResult = Result<serde_json::Value, ApiError>;
pub(crate) type Reply = oneshot::Sender<ApiResult>;
pub(crate) type Query = Box<dyn FnOnce(&Replica) -> ApiResult + Send>;

async fn write_json(stream: &mut TcpStream, status: u16, body: &impl Serialize) {
    let body = serde_json::to_vec_pretty(body).unwrap_or_default();
    let resp = wire::encode_response(status, &body);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&resp)).await;
    let _ = stream.shutdown().await;
}

pub(crate) async fn handle_http(stream: &mut TcpStream, peer: SocketAddr, ctx: Arc<ConnCtx>) {
    let limits = ctx.cfg.http;
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let req = loop {
        match wire::parse_request(&buf, limits) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(e) => {
                let status = match e {
                    wire::HttpError::BodyTooLarge { .. } | wire::HttpError::HeadersTooLarge(_) => {
                        413
                    }
                    _ => 400,
                };
                warn!(%peer, %e, "bad HTTP request");
                let body = ErrorResponse {
                    error: "bad_request".into(),
                    message: e.to_string(),
                    leader_id: None,
                    leader_address: None,
                };
                write_json(stream, status, &body).await;
                return;
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                let body = ErrorResponse {
                    error: "timeout".into(),
                    message: "request not received in time".into(),
                    leader_id: None,
                    leader_address: None,
                };
                write_json(stream, 408, &body).await;
                return;
            }
        }
    };
    // A bearer token; else, for the dashboard, `/ui/?token=T` or the cookie that answer set
    // (a cookie authorizes reads only: it travels with whatever the browser sends).
    let ui = phalanx_dashboard::is_ui_path(&req.path);
    let query_token = ui
        .then(|| req.query_param("token"))
        .flatten()
        .and_then(phalanx_dashboard::token_from_query);
    let cookie_token = (req.method == "GET")
        .then(|| req.header("cookie"))
        .flatten()
        .and_then(phalanx_dashboard::token_from_cookie);
    let presented = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string)
        .or(query_token.clone())
        .or(cookie_token)
        .unwrap_or_default();
    if !token_eq(&presented, &ctx.token) {
        warn!(%peer, method = %req.method, path = %req.path, "API call rejected: missing or wrong cluster token");
        let body = ErrorResponse {
            error: "unauthorized".into(),
            message: if ui {
                phalanx_dashboard::UNAUTHORIZED.into()
            } else {
                "missing or wrong cluster token: send `Authorization: Bearer <token>` with the token from the cluster's token file".into()
            },
            leader_id: None,
            leader_address: None,
        };
        write_json(stream, 401, &body).await;
        return;
    }
    if ui {
        write_ui(
            stream,
            &req,
            query_token.is_some().then_some(ctx.token.as_str()),
        )
        .await;
        return;
    }
    let timeout = Duration::from_millis(ctx.cfg.request_timeout_ms + 500);
    // Prometheus text, not JSON: answered by server/metrics.rs.
    if req.method == "GET" && req.path.trim_end_matches('/') == "/metrics" {
        return super::metrics::respond(stream, &ctx, timeout).await;
    }
    let result = route(&req, &ctx, timeout).await;
    match result {
        Ok(v) => write_json(stream, 200, &v).await,
        Err(e) => {
            let (status, body) = e.status_and_body();
            write_json(stream, status, &body).await;
        }
    }
}

/// `GET /ui/...`: the dashboard's embedded files (`phalanx_dashboard`), with the cookie
/// that keeps the token when it came in the query.
async fn write_ui(stream: &mut TcpStream, req: &wire::Request, token_to_keep: Option<&str>) {
    let asset = (req.method == "GET")
        .then(|| phalanx_dashboard::asset(&req.path))
        .flatten();
    let Some(asset) = asset else {
        let body = ErrorResponse {
            error: "not_found".into(),
            message: format!("no route {} {}", req.method, req.path),
            leader_id: None,
            leader_address: None,
        };
        write_json(stream, 404, &body).await;
        return;
    };
    let mut resp = "HTTP/1.1 200 OK\r\n".to_string();
    for (k, v) in phalanx_dashboard::headers(&asset, token_to_keep) {
        resp += &format!("{k}: {v}\r\n");
    }
    resp += &format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        asset.body.len()
    );
    let mut bytes = resp.into_bytes();
    bytes.extend_from_slice(asset.body);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&bytes)).await;
    let _ = stream.shutdown().await;
}

pub(super) async fn call(
    ctx: &ConnCtx,
    make: impl FnOnce(Reply) -> Input,
    timeout: Duration,
) -> ApiResult {
    let (tx, rx) = oneshot::channel();
    ctx.inputs
        .send(make(tx))
        .map_err(|_| ApiError::Internal("raft loop stopped".into()))?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::Internal("raft loop dropped the request".into())),
        Err(_) => Err(ApiError::Timeout),
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(req: &wire::Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> ApiResult {
    serde_json::to_value(v).map_err(|e| ApiError::Internal(e.to_string()))
}

pub fn status_of(r: &Replica) -> StatusResponse {
    let members = r
        .voters()
        .into_iter()
        .map(|id| ControllerMember {
            id,
            address: r.addresses.get(&id).cloned().unwrap_or_default(),
        })
        .collect();
    StatusResponse {
        node_id: r.id(),
        role: r.role().into(),
        leader_id: r.leader_id(),
        term: r.term(),
        commit_index: r.commit_index(),
        applied_index: r.applied_index(),
        members,
        workers: r.state.workers.values().cloned().collect(),
        job: r.state.job.clone(),
        checkpoints: r.state.checkpoints.len(),
        events: r.state.events.len(),
        matched: if r.role() == "leader" {
            r.raw
                .raft
                .prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            Default::default()
        },
    }
}

/// The key from which each plan epoch's collective secret is derived.
// issue 11: the lead replaces this key with TlsDir::epoch_key()
pub(crate) fn epoch_secret_key(cluster_token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(cluster_token.as_bytes()).into()
}

/// `GET /v1/assignment/{worker}`. The plan epoch's collective secret goes only to a
/// worker that holds a rank in it.
fn assignment(r: &Replica, worker: &str, epoch_key: &[u8; 32]) -> ApiResult {
    let s = &r.state;
    let Some(_w) = s.workers.get(worker) else {
        return Err(ApiError::NotFound(format!(
            "worker {worker} is not registered"
        )));
    };
    let job = s.job.as_ref();
    let plan = job.and_then(|j| {
        if j.state.is_terminal() {
            None
        } else {
            j.plan.as_ref()
        }
    });
    let rank = plan
        .and_then(|p| p.ranks.iter().position(|id| id == worker))
        .map(|i| i as u32);
    let peers = plan
        .map(|p| {
            p.ranks
                .iter()
                .map(|id| {
                    s.workers
                        .get(id)
                        .map(|w| w.address.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let resume_step = s
        .checkpoints
        .iter()
        .filter(|c| c.durable && Some(&c.job) == job.map(|j| &j.id))
        .map(|c| c.step)
        .max()
        .unwrap_or(0);
    to_json(&Assignment {
        worker: worker.to_string(),
        rank,
        epoch: plan.map(|p| p.epoch).unwrap_or(0),
        world_size: plan.map(|p| p.ranks.len() as u32).unwrap_or(0),
        peers,
        job: job.map(|j| j.spec.clone()),
        job_id: job.map(|j| j.id.clone()),
        job_state: job.map(|j| j.state),
        resume_step,
        micro_shares: plan.map(|p| p.micro_shares.clone()).unwrap_or_default(),
        rank_workers: plan.map(|p| p.ranks.clone()).unwrap_or_default(),
        epoch_secret: match (rank, job, plan) {
            (Some(_), Some(j), Some(p)) => Some(phalanx_proto::SecretHex(hex::encode(
                phalanx_pki::epoch_secret(epoch_key, &j.id, p.epoch),
            ))),
            _ => None,
        },
    })
}

async fn route(req: &wire::Request, ctx: &ConnCtx, timeout: Duration) -> ApiResult {
    let path = req.path.trim_end_matches('/');
    let read = |f: Query| call(ctx, move |reply| Input::Read { query: f, reply }, timeout);
    match (req.method.as_str(), path) {
        ("GET", "/v1/status") => {
            call(
                ctx,
                |reply| Input::Local {
                    query: Box::new(|r| to_json(&status_of(r))),
                    reply,
                },
                timeout,
            )
            .await
        }
        ("GET", "/v1/metrics") => {
            call(
                ctx,
                |reply| Input::Local {
                    query: Box::new(|r| {
                        let mut v = to_json(&r.counters)?;
                        v["storage_syncs"] = r.raw.store().syncs.into();
                        Ok(v)
                    }),
                    reply,
                },
                timeout,
            )
            .await
        }
        ("POST", "/v1/command") => {
            let env: Envelope = parse_body(req)?;
            if env.request_id.is_empty() || env.request_id.len() > 128 {
                return Err(ApiError::BadRequest(
                    "request_id: expected 1..=128 bytes".into(),
                ));
            }
            if let Command::SubmitJob { spec } = &env.command {
                phalanx_core::validate_job(spec)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                // Replicated text stays small: the job (with its corpus path) lives in
                // every snapshot.
                if spec.corpus.len() > 4096 || spec.name.len() > 4096 {
                    return Err(ApiError::BadRequest(
                        "job: name and corpus must be at most 4096 bytes".into(),
                    ));
                }
            }
            let started = std::time::Instant::now();
            let result = call(ctx, |reply| Input::Propose { env, reply }, timeout).await;
            super::metrics::proposal_done(ctx, started.elapsed(), &result);
            result
        }
        ("POST", "/v1/heartbeat") => {
            let hb: HeartbeatRequest = parse_body(req)?;
            call(ctx, |reply| Input::Heartbeat { hb, reply }, timeout).await
        }
        ("POST", "/v1/members") => {
            let change: MemberChange = parse_body(req)?;
            call(ctx, |reply| Input::Member { change, reply }, timeout).await
        }
        ("GET", "/v1/workers") => {
            read(Box::new(|r| {
                to_json(&r.state.workers.values().collect::<Vec<_>>())
            }))
            .await
        }
        ("GET", "/v1/job") => read(Box::new(|r| to_json(&r.state.job))).await,
        ("GET", "/v1/checkpoints") => read(Box::new(|r| to_json(&r.state.checkpoints))).await,
        ("GET", "/v1/events") => {
            let limit: usize = req
                .query_param("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(100)
                .min(10_000);
            read(Box::new(move |r| {
                let n = r.state.events.len();
                to_json(
                    &r.state
                        .events
                        .iter()
                        .skip(n.saturating_sub(limit))
                        .collect::<Vec<_>>(),
                )
            }))
            .await
        }
        ("GET", p) if p.starts_with("/v1/annotations/") => {
            let key = p["/v1/annotations/".len()..].to_string();
            read(Box::new(move |r| {
                Ok(serde_json::json!({"key": key, "value": r.state.annotations.get(&key)}))
            }))
            .await
        }
        ("GET", p) if p.starts_with("/v1/assignment/") => {
            let worker = p["/v1/assignment/".len()..].to_string();
            let key = epoch_secret_key(&ctx.token);
            read(Box::new(move |r| assignment(r, &worker, &key))).await
        }
        (_, p) if p.starts_with("/v1/") => Err(ApiError::NotFound(format!(
            "no route {} {}",
            req.method, req.path
        ))),
        _ => Err(ApiError::NotFound(format!(
            "no route {} {}",
            req.method, req.path
        ))),
    }
}
