//! The HTTP/JSON API on axum: authentication (before any body is read), the route table's
//! roles, the handlers, and the answers of the raft loop mapped to status codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query as UrlQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use phalanx_proto::{
    Assignment, Command, ControllerMember, Envelope, ErrorCode, ErrorResponse, HeartbeatRequest,
    MemberChange, NodeId, RaftRole, StatusResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{warn, Instrument};

use super::raft_loop::Input;
use super::routes;
use super::security::Principal;
use super::ConnCtx;
use crate::node::Replica;

/// What the listener knows of a connection before any request: the peer's address and
/// the role its verified client certificate names, if it presented one.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    pub cert: Option<Principal>,
}

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
    /// No credential, or one this cluster does not know.
    Unauthorized(String),
    /// A known credential whose role may not do this.
    Forbidden(String),
    /// The request (its body) did not arrive in time.
    RequestTimeout(String),
    Internal(String),
}

impl ApiError {
    pub(crate) fn status_and_body(&self) -> (u16, ErrorResponse) {
        let e = |error: ErrorCode, message: String| ErrorResponse {
            error,
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
                    error: ErrorCode::NotLeader,
                    message: format!("this node is not the leader; the leader is node {leader_id}"),
                    leader_id: Some(*leader_id),
                    leader_address: leader_address.clone(),
                },
            ),
            ApiError::NoLeader => (
                503,
                e(
                    ErrorCode::NoLeader,
                    "no leader is known right now; retry".into(),
                ),
            ),
            ApiError::Timeout => (
                504,
                e(
                    ErrorCode::Timeout,
                    "the request did not commit in time; retry with the same request id".into(),
                ),
            ),
            ApiError::BadRequest(m) => (400, e(ErrorCode::BadRequest, m.clone())),
            ApiError::NotFound(m) => (404, e(ErrorCode::NotFound, m.clone())),
            ApiError::Conflict(m) => (409, e(ErrorCode::Refused, m.clone())),
            ApiError::Unauthorized(m) => (401, e(ErrorCode::Unauthorized, m.clone())),
            ApiError::Forbidden(m) => (403, e(ErrorCode::Forbidden, m.clone())),
            ApiError::RequestTimeout(m) => (408, e(ErrorCode::RequestTimeout, m.clone())),
            ApiError::Internal(m) => (500, e(ErrorCode::Internal, m.clone())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.status_and_body();
        json_response(status, &body)
    }
}

fn json_response(status: u16, body: &impl Serialize) -> Response {
    let body = serde_json::to_vec_pretty(body).unwrap_or_default();
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

pub(crate) type ApiResult = Result<serde_json::Value, ApiError>;
pub(crate) type Reply = oneshot::Sender<ApiResult>;
pub(crate) type Query = Box<dyn FnOnce(&Replica) -> ApiResult + Send>;

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
        role: r.role(),
        leader_id: r.leader_id(),
        term: r.term(),
        commit_index: r.commit_index(),
        applied_index: r.applied_index(),
        members,
        workers: r.state.workers.values().cloned().collect(),
        job: r.state.job.clone(),
        checkpoints: r.state.checkpoints.len(),
        events: r.state.events.len(),
        matched: if r.role() == RaftRole::Leader {
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
        trace: plan.and_then(|p| p.trace.clone()),
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

/// The API's router for one connection's requests.
pub(crate) fn router(ctx: Arc<ConnCtx>) -> Router {
    let body_max = ctx.cfg.http.body_bytes_max;
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/metrics", get(metrics))
        .route("/v1/workers", get(workers))
        .route("/v1/job", get(job))
        .route("/v1/checkpoints", get(checkpoints))
        .route("/v1/events", get(events))
        .route("/v1/annotations/{key}", get(annotation))
        .route("/v1/assignment/{worker}", get(assignment_of))
        .route("/v1/command", post(command))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/members", post(members))
        .route("/metrics", get(prometheus))
        .route("/ui", get(ui))
        .route("/ui/", get(ui))
        .route("/ui/{*file}", get(ui))
        // Runs once a route matched, before its handler extracts (reads) the body.
        .route_layer(middleware::from_fn_with_state(ctx.clone(), authorize))
        // Outside the credentials check: the request's span covers it (issue 12).
        .route_layer(middleware::from_fn(super::trace::traced))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_max))
        .layer(middleware::from_fn_with_state(ctx.clone(), bounded))
        .with_state(ctx)
}

/// Answers 408 when the handler (reading the body included) takes longer than
/// `request_max_ms`.
async fn bounded(State(ctx): State<Arc<ConnCtx>>, req: Request, next: Next) -> Response {
    let limit = Duration::from_millis(ctx.cfg.http.request_max_ms);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::RequestTimeout(format!(
            "the request was not complete within {} ms (request_max_ms)",
            limit.as_millis()
        ))
        .into_response(),
    }
}

/// The caller of a request: a bearer token (header, or the dashboard's cookie) if one is
/// presented, else the role of the connection's client certificate.
fn principal(
    ctx: &ConnCtx,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    conn: &ConnInfo,
) -> Result<Principal, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    // The dashboard: `/ui/?token=T`, or the cookie that answer set. A cookie travels with
    // whatever the browser sends, so it authorizes reads (GET) only.
    let query = || ui_query_token(uri);
    let cookie = || {
        (method == Method::GET)
            .then(|| {
                headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(phalanx_dashboard::token_from_cookie)
            })
            .flatten()
    };
    if let Some(t) = bearer.or_else(query).or_else(cookie) {
        return ctx.cfg.security.token_principal(t.trim()).ok_or_else(|| {
            ApiError::Unauthorized(
                "the token is not one of this cluster's (admin.token, reader.token)".into(),
            )
        });
    }
    conn.cert.clone().ok_or_else(|| {
        ApiError::Unauthorized(if phalanx_dashboard::is_ui_path(uri.path()) {
            phalanx_dashboard::UNAUTHORIZED.into()
        } else if ctx.cfg.security.is_tls() {
            "no credential: present a client certificate of this cluster or \
             `Authorization: Bearer <admin or reader token>`"
                .into()
        } else {
            "missing cluster token: send `Authorization: Bearer <token>` with the token \
             from the cluster's token file"
                .into()
        })
    })
}

async fn authorize(
    State(ctx): State<Arc<ConnCtx>>,
    Extension(conn): Extension<ConnInfo>,
    matched: MatchedPath,
    mut req: Request,
    next: Next,
) -> Response {
    let p = match principal(&ctx, req.method(), req.uri(), req.headers(), &conn) {
        Ok(p) => p,
        Err(e) => {
            warn!(peer = %conn.peer, method = %req.method(), path = %req.uri().path(), "API call rejected: no valid credential");
            return e.into_response();
        }
    };
    let spec = routes::spec(req.method().as_str(), matched.as_str());
    let allowed = match spec {
        Some(r) => routes::check(&p, r),
        None => Err(format!(
            "{} {} is in no route table",
            req.method(),
            matched.as_str()
        )),
    };
    if let Err(m) = allowed {
        warn!(peer = %conn.peer, principal = %p, method = %req.method(), path = %req.uri().path(), "API call forbidden");
        return ApiError::Forbidden(m).into_response();
    }
    // A body announced larger than the limit is refused before any of it is read.
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max = ctx.cfg.http.body_bytes_max;
    if announced.is_some_and(|n| n > max as u64) {
        return json_response(
            413,
            &ErrorResponse {
                error: ErrorCode::PayloadTooLarge,
                message: format!("the request body may be at most {max} bytes"),
                leader_id: None,
                leader_address: None,
            },
        );
    }
    req.extensions_mut().insert(p);
    next.run(req).await
}

async fn not_found(
    State(ctx): State<Arc<ConnCtx>>,
    Extension(conn): Extension<ConnInfo>,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> ApiError {
    match principal(&ctx, &method, &uri, &headers, &conn) {
        Err(e) => e,
        Ok(_) => ApiError::NotFound(format!("no route {method} {}", uri.path())),
    }
}

fn timeout(ctx: &ConnCtx) -> Duration {
    Duration::from_millis(ctx.cfg.request_timeout_ms + 500)
}

fn reply(r: ApiResult) -> Response {
    match r {
        Ok(v) => json_response(200, &v),
        Err(e) => e.into_response(),
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

async fn read(ctx: &ConnCtx, f: Query) -> ApiResult {
    call(
        ctx,
        move |reply| Input::Read { query: f, reply },
        timeout(ctx),
    )
    .await
}

async fn local(ctx: &ConnCtx, f: Query) -> ApiResult {
    call(
        ctx,
        move |reply| Input::Local { query: f, reply },
        timeout(ctx),
    )
    .await
}

async fn status(State(ctx): State<Arc<ConnCtx>>) -> Response {
    reply(local(&ctx, Box::new(|r| to_json(&status_of(r)))).await)
}

async fn metrics(State(ctx): State<Arc<ConnCtx>>) -> Response {
    reply(
        local(
            &ctx,
            Box::new(|r| {
                let mut v = to_json(&r.counters)?;
                v["storage_syncs"] = r.raw.store().syncs.into();
                Ok(v)
            }),
        )
        .await,
    )
}

async fn workers(State(ctx): State<Arc<ConnCtx>>) -> Response {
    reply(
        read(
            &ctx,
            Box::new(|r| to_json(&r.state.workers.values().collect::<Vec<_>>())),
        )
        .await,
    )
}

async fn job(State(ctx): State<Arc<ConnCtx>>) -> Response {
    reply(read(&ctx, Box::new(|r| to_json(&r.state.job))).await)
}

async fn checkpoints(State(ctx): State<Arc<ConnCtx>>) -> Response {
    reply(read(&ctx, Box::new(|r| to_json(&r.state.checkpoints))).await)
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(State(ctx): State<Arc<ConnCtx>>, UrlQuery(q): UrlQuery<EventsQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(10_000);
    reply(
        read(
            &ctx,
            Box::new(move |r| {
                let n = r.state.events.len();
                to_json(
                    &r.state
                        .events
                        .iter()
                        .skip(n.saturating_sub(limit))
                        .collect::<Vec<_>>(),
                )
            }),
        )
        .await,
    )
}

async fn annotation(State(ctx): State<Arc<ConnCtx>>, Path(key): Path<String>) -> Response {
    reply(
        read(
            &ctx,
            Box::new(move |r| {
                Ok(serde_json::json!({"key": key, "value": r.state.annotations.get(&key)}))
            }),
        )
        .await,
    )
}

/// A worker speaks only for itself.
fn same_worker(p: &Principal, worker: &str, what: &str) -> Result<(), ApiError> {
    match p {
        Principal::Worker(me) if me != worker => Err(ApiError::Forbidden(format!(
            "worker {me} may not {what} of worker {worker}"
        ))),
        _ => Ok(()),
    }
}

async fn assignment_of(
    State(ctx): State<Arc<ConnCtx>>,
    Extension(p): Extension<Principal>,
    Path(worker): Path<String>,
) -> Response {
    if let Err(e) = same_worker(&p, &worker, "read the assignment") {
        return e.into_response();
    }
    let key = ctx.cfg.security.epoch_key();
    reply(read(&ctx, Box::new(move |r| assignment(r, &worker, &key))).await)
}

async fn command(
    State(ctx): State<Arc<ConnCtx>>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Response {
    reply(command_inner(&ctx, &p, &body).await)
}

async fn command_inner(ctx: &ConnCtx, p: &Principal, body: &[u8]) -> ApiResult {
    let env: Envelope = parse_body(body)?;
    if env.request_id.is_empty() || env.request_id.len() > 128 {
        return Err(ApiError::BadRequest(
            "request_id: expected 1..=128 bytes".into(),
        ));
    }
    if let Command::SubmitJob { spec } = &env.command {
        phalanx_core::validate_job(spec).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Replicated text stays small: the job (with its corpus path) lives in every
        // snapshot.
        if spec.corpus.len() > 4096 || spec.name.len() > 4096 {
            return Err(ApiError::BadRequest(
                "job: name and corpus must be at most 4096 bytes".into(),
            ));
        }
    }
    if let Principal::Worker(_) = p {
        // What a worker may report depends on the current plan: read it here (a plan
        // that changes in between only fences the command further when it applies).
        let ranks = local(
            ctx,
            Box::new(|r| to_json(&phalanx_core::authz::plan_ranks(&r.state))),
        )
        .await?;
        let ranks: Vec<String> = serde_json::from_value(ranks).unwrap_or_default();
        phalanx_core::authz::authorize_command(p.caller(), &env.command, &ranks)
            .map_err(ApiError::Forbidden)?;
    } else {
        phalanx_core::authz::authorize_command(p.caller(), &env.command, &[])
            .map_err(ApiError::Forbidden)?;
    }
    let started = std::time::Instant::now();
    let span = super::trace::propose_span(&env.request_id);
    // The proposal's trace context travels with the command: a plan it makes carries it.
    let env = Envelope {
        trace: super::trace::traceparent(&span),
        ..env
    };
    let result = call(ctx, |reply| Input::Propose { env, reply }, timeout(ctx))
        .instrument(span.clone())
        .await;
    span.record("outcome", if result.is_ok() { "applied" } else { "error" });
    super::metrics::proposal_done(ctx, started.elapsed(), &result);
    result
}

async fn heartbeat(
    State(ctx): State<Arc<ConnCtx>>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Response {
    let r = async {
        let hb: HeartbeatRequest = parse_body(&body)?;
        same_worker(&p, &hb.worker, "send the heartbeat")?;
        call(&ctx, |reply| Input::Heartbeat { hb, reply }, timeout(&ctx)).await
    };
    reply(r.await)
}

async fn members(
    State(ctx): State<Arc<ConnCtx>>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Response {
    let r = async {
        let change: MemberChange = parse_body(&body)?;
        if let Principal::Controller(me) = p {
            if change.id != me {
                return Err(ApiError::Forbidden(format!(
                    "controller {me} may change only its own membership, not controller {}",
                    change.id
                )));
            }
        }
        call(&ctx, |reply| Input::Member { change, reply }, timeout(&ctx)).await
    };
    reply(r.await)
}

/// The token of a dashboard address's query (`/ui/?token=T`), if any.
fn ui_query_token(uri: &axum::http::Uri) -> Option<String> {
    if !phalanx_dashboard::is_ui_path(uri.path()) {
        return None;
    }
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .and_then(phalanx_dashboard::token_from_query)
}

/// `GET /metrics`: Prometheus text (server/metrics.rs).
async fn prometheus(State(ctx): State<Arc<ConnCtx>>) -> Response {
    super::metrics::respond(&ctx, timeout(&ctx)).await
}

/// `GET /ui/...`: the dashboard's embedded files, with the cookie that keeps the token
/// when it came in the query.
async fn ui(uri: axum::http::Uri) -> Response {
    let Some(asset) = phalanx_dashboard::asset(uri.path()) else {
        return ApiError::NotFound(format!("no dashboard file {}", uri.path())).into_response();
    };
    let keep = ui_query_token(&uri);
    let mut resp = asset.body.into_response();
    for (k, v) in phalanx_dashboard::headers(&asset, keep.as_deref()) {
        if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}
