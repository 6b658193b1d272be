//! The dashboard's JSON + SSE API under `/api/v1/`, on the HTTP listener.
//!
//! Every handler calls the gRPC service implementation in-process: it builds a
//! `tonic::Request`, is let in by the gRPC server's own admission
//! (`grpc::guard::Admission::admit`: store up, a slot of the call limit, the
//! caller from `Authorization: Bearer`), puts the caller and the peer address
//! into its extensions, and calls the service trait method.
//! Validation, authorization (the same `Action` per RPC), the watch and the
//! error mapping are the gRPC ones; this module only translates: query
//! strings into request messages, responses into the shared `views`, and a
//! `Status` into an HTTP status ([`http_status`], the one mapping).
//!
//! Every call into a service is timed into `fleetcare_rpc_duration_seconds`
//! with the service and method it calls and `transport="http"` (refusals of
//! a missing token, a down store or a full server included), and takes a slot
//! of `--max-concurrent-calls` from the same [`Admission`] as gRPC calls,
//! held until the answer (a stream: until it starts, as on gRPC). The fleet's
//! counts (`fleet/counts`) are the one call without an RPC:
//! `AgentStatusApi::count_agents`, method `CountAgents`.
//!
//! State-changing endpoints are POST with `Content-Type: application/json`
//! and `X-Fleetcare-Request: 1`, refused 403 otherwise: neither a cross-site
//! form nor a "simple" cross-origin request can send that header, and no CORS
//! headers are ever sent.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, http};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tonic::Code;
use tonic_types::StatusExt;

use crate::domain::agent::AgentStatus;
use crate::domain::auth::Action;
use crate::grpc::agent_status::AgentStatusApi;
use crate::grpc::dispatch::DispatchApi;
use crate::grpc::guard::{Admission, Admitted, STORE_DOWN};
use crate::grpc::healing::HealingApi;
use crate::grpc::metrics::{HTTP, Timing};
use crate::grpc::quota::QuotaApi;
use crate::grpc::session_pipeline::SessionPipelineApi;
use crate::metrics::Metrics;
use crate::proto::v1 as pb;
use crate::proto::v1::agent_status_service_server::AgentStatusService;
use crate::proto::v1::dispatch_service_server::DispatchService;
use crate::proto::v1::healing_service_server::HealingService;
use crate::proto::v1::quota_service_server::QuotaService;
use crate::proto::v1::session_pipeline_service_server::SessionPipelineService;
use crate::proto::v1::{
    agent_status_service_server, dispatch_service_server, healing_service_server,
    quota_service_server, session_pipeline_service_server,
};
use crate::views::{
    AgentView, ClaimView, HealingDecisionView, HealingPauseView, HealingPolicyView,
    HealingStatsView, PoolDetailView, PoolView, ProcessorView, RunView, SessionStateView,
    TransitionView, UsageView,
};

/// The header a state-changing request must carry (with the value `1`).
pub const REQUEST_HEADER: &str = "x-fleetcare-request";

/// The service implementations the API calls, once the store is open.
pub struct Apis {
    pub agents: Arc<AgentStatusApi>,
    pub dispatch: Arc<DispatchApi>,
    pub healing: Arc<HealingApi>,
    pub pipeline: Arc<SessionPipelineApi>,
    pub quota: Arc<QuotaApi>,
}

/// What the API handlers share: the callers, the services (set once the
/// store is open; until then every call is UNAVAILABLE, as on gRPC), the
/// store's health (down: UNAVAILABLE at once, as the gRPC guard answers), the
/// metrics the calls are timed into and the server's call limit.
#[derive(Clone)]
pub struct Dashboard {
    admission: Admission,
    apis: Arc<OnceLock<Apis>>,
    metrics: Arc<Metrics>,
    /// Why the API is off, if it is: the HTTP listener is not on loopback
    /// and there is no auth file (the gRPC port's rule, applied here).
    off: Option<Arc<str>>,
}

/// A service method the API calls, as the metrics label it.
#[derive(Debug, Clone, Copy)]
struct Method {
    service: &'static str,
    method: &'static str,
}

impl Method {
    fn agents(action: Action) -> Method {
        Method {
            service: agent_status_service_server::SERVICE_NAME,
            method: action.rpc(),
        }
    }

    fn dispatch(action: Action) -> Method {
        Method {
            service: dispatch_service_server::SERVICE_NAME,
            method: action.rpc(),
        }
    }

    fn quota(action: Action) -> Method {
        Method {
            service: quota_service_server::SERVICE_NAME,
            method: action.rpc(),
        }
    }

    fn healing(action: Action) -> Method {
        Method {
            service: healing_service_server::SERVICE_NAME,
            method: action.rpc(),
        }
    }

    fn pipeline(action: Action) -> Method {
        Method {
            service: session_pipeline_service_server::SERVICE_NAME,
            method: action.rpc(),
        }
    }

    /// The counts, read through `AgentStatusApi::count_agents` (no RPC).
    const COUNT_AGENTS: Method = Method {
        service: agent_status_service_server::SERVICE_NAME,
        method: "CountAgents",
    };
}

/// One call into a service under way: its timing and its slot of the call
/// limit. Dropped unanswered (the client went away), it counts `CANCELLED`.
struct Call {
    timing: Timing,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Call {
    /// The call's answer, recorded with its code.
    fn answer<R>(mut self, result: Result<R, tonic::Status>) -> Result<R, ApiError> {
        match result {
            Ok(answer) => {
                self.timing.record("OK");
                Ok(answer)
            }
            Err(status) => {
                self.timing.record_status(&status);
                Err(status.into())
            }
        }
    }

    /// A stream that started: its slot is given back and its timing goes on
    /// until the stream ends (a refusal is recorded now).
    fn stream<R>(mut self, result: Result<R, tonic::Status>) -> Result<(R, Timing), ApiError> {
        match result {
            Ok(stream) => Ok((stream, self.timing)),
            Err(status) => {
                self.timing.record_status(&status);
                Err(status.into())
            }
        }
    }
}

impl Dashboard {
    pub fn new(admission: Admission, metrics: Arc<Metrics>) -> Dashboard {
        Dashboard {
            admission,
            apis: Arc::default(),
            metrics,
            off: None,
        }
    }

    /// Refuses every API call with `why` (the page itself is still served).
    pub fn turned_off(mut self, why: String) -> Dashboard {
        self.off = Some(why.into());
        self
    }

    /// Lets calls through to these services from now on (once).
    pub fn open(&self, apis: Apis) {
        let _ = self.apis.set(apis);
    }

    /// The services, a request carrying `message`, its caller and its peer,
    /// and the call's timing and slot; or the refusal the gRPC server would
    /// have answered, in the order it would (store down, server busy, no
    /// valid token), counted as the gRPC metrics layer counts it.
    fn request<T>(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        method: Method,
        message: T,
    ) -> Result<(&Apis, tonic::Request<T>, Call), ApiError> {
        if let Some(why) = &self.off {
            return Err(ApiError::http(StatusCode::FORBIDDEN, "API_OFF", why));
        }
        let mut timing = Timing::start(
            self.metrics.clone(),
            method.service.to_owned(),
            method.method.to_owned(),
            HTTP,
        );
        let refused = |timing: &mut Timing, status: tonic::Status| {
            timing.record_status(&status);
            ApiError::from(status)
        };
        // Before the store is first open, as the gRPC server's gates answer.
        let Some(apis) = self.apis.get() else {
            return Err(refused(&mut timing, tonic::Status::unavailable(STORE_DOWN)));
        };
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let Admitted { caller, slot } = self
            .admission
            .admit(authorization, Some(peer))
            .map_err(|status| refused(&mut timing, status))?;
        let call = Call {
            timing,
            _slot: slot,
        };
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(caller);
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(peer),
            });
        Ok((apis, request, call))
    }
}

/// The routes, relative to `/api/v1`.
pub fn routes() -> Router<Dashboard> {
    Router::new()
        .route("/agents", get(list_agents))
        .route("/fleet/counts", get(fleet_counts))
        .route("/agents/{agent_id}", get(get_agent))
        .route("/agents/{agent_id}/cordon", post(cordon_agent))
        .route("/agents/{agent_id}/uncordon", post(uncordon_agent))
        .route("/claims", get(list_claims))
        .route("/pools", get(list_pools))
        .route("/pool", get(get_pool))
        .route("/pools/park", post(park_pool))
        .route("/pools/release", post(release_pool))
        .route("/transitions", get(list_transitions))
        .route("/transitions/stream", get(watch_transitions))
        .route("/healing", get(healing_statistics))
        .route("/healing/policy", get(healing_policy))
        .route("/healing/decisions", get(healing_decisions))
        .route("/healing/pause", post(pause_healing))
        .route("/healing/resume", post(resume_healing))
        .route("/usage", get(usage))
        .route("/processors", get(processors))
        .route("/runs", get(runs))
        .route("/sessions", get(session_states))
        .route("/sessions/retry", post(retry_session))
        .fallback(|| async {
            ApiError::http(StatusCode::NOT_FOUND, "NOT_FOUND", "no such API endpoint")
        })
}

/// The one mapping from a gRPC code to an HTTP status.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A gRPC code as the API's JSON names it (`INVALID_ARGUMENT`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The JSON body of every refusal: the gRPC code, the message, and the
/// stable `reason` of the status's `ErrorInfo` (what clients branch on).
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    pub reason: String,
}

impl From<&tonic::Status> for ErrorBody {
    fn from(status: &tonic::Status) -> ErrorBody {
        ErrorBody {
            code: code_name(status.code()),
            message: status.message().to_owned(),
            reason: status
                .get_details_error_info()
                .map(|info| info.reason)
                .unwrap_or_default(),
        }
    }
}

/// A refusal, answered with [`http_status`] and an [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn http(status: StatusCode, reason: &str, message: &str) -> ApiError {
        let code = match status {
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            _ => Code::InvalidArgument,
        };
        ApiError {
            status,
            body: ErrorBody {
                code: code_name(code),
                message: message.to_owned(),
                reason: reason.to_owned(),
            },
        }
    }

    /// A malformed query or body: what the gRPC decoding would call INVALID_ARGUMENT.
    fn invalid(message: impl std::fmt::Display) -> ApiError {
        ApiError::from(tonic::Status::from(crate::error::Error::InvalidArgument(
            message.to_string(),
        )))
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> ApiError {
        ApiError {
            status: http_status(status.code()),
            body: ErrorBody::from(&status),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, json(&self.body)).into_response()
    }
}

/// A JSON response body (the views serialize infallibly).
fn json<T: Serialize>(value: &T) -> impl IntoResponse + use<T> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

/// The query string as key/value pairs (repeated keys kept in order).
fn query(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::invalid(format!("malformed query string: {e}")))
}

fn values<'a>(pairs: &'a [(String, String)], key: &'a str) -> impl Iterator<Item = &'a str> {
    pairs
        .iter()
        .filter(move |(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn value<'a>(pairs: &'a [(String, String)], key: &'a str) -> Option<&'a str> {
    values(pairs, key).last().filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(
    pairs: &[(String, String)],
    key: &str,
) -> Result<Option<T>, ApiError> {
    value(pairs, key)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::invalid(format!("{key}: not a number: {v}")))
        })
        .transpose()
}

/// `IDLE` or `AGENT_STATUS_IDLE` (any case).
fn agent_status(value: &str) -> Result<i32, ApiError> {
    let upper = value.to_ascii_uppercase();
    let name = if upper.starts_with("AGENT_STATUS_") {
        upper
    } else {
        format!("AGENT_STATUS_{upper}")
    };
    pb::AgentStatus::from_str_name(&name)
        .filter(|s| *s != pb::AgentStatus::Unspecified)
        .map(|s| s as i32)
        .ok_or_else(|| ApiError::invalid(format!("status: unknown agent status {value}")))
}

fn timestamp(key: &str, value: &str) -> Result<prost_types::Timestamp, ApiError> {
    let at = chrono::DateTime::parse_from_rfc3339(value)
        .map_err(|_| ApiError::invalid(format!("{key}: not an RFC 3339 time: {value}")))?;
    Ok(crate::proto::timestamp(at.with_timezone(&chrono::Utc)))
}

/// The page size of `agents` without `page_size`.
pub const AGENTS_PAGE_SIZE: i32 = 200;

/// One page of `ListAgents`, filtered by the server: `status=IDLE`
/// (repeated), `label=key=value` (repeated, every one must match),
/// `page_size` (default [`AGENTS_PAGE_SIZE`], at most 1000 as `ListAgents`
/// clamps it) and `page_token` (the previous page's `next_page_token`).
async fn list_agents(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let statuses = values(&pairs, "status")
        .filter(|s| !s.is_empty())
        .map(agent_status)
        .collect::<Result<Vec<_>, _>>()?;
    let mut labels = std::collections::HashMap::new();
    for label in values(&pairs, "label").filter(|l| !l.is_empty()) {
        let (key, value) = label
            .split_once('=')
            .ok_or_else(|| ApiError::invalid(format!("label: expected key=value, got {label}")))?;
        labels.insert(key.to_owned(), value.to_owned());
    }
    let message = pb::ListAgentsRequest {
        page_size: match number(&pairs, "page_size")? {
            None | Some(0) => AGENTS_PAGE_SIZE,
            Some(n) => n,
        },
        page_token: value(&pairs, "page_token").unwrap_or_default().to_owned(),
        statuses,
        labels,
    };
    let (apis, request, call) =
        dashboard.request(&headers, peer, Method::agents(Action::ListAgents), message)?;
    let page = call
        .answer(apis.agents.list_agents(request).await)?
        .into_inner();
    let agents: Vec<AgentView> = page.agents.iter().map(AgentView::from).collect();
    Ok(json(&serde_json::json!({
        "agents": agents,
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

/// How many agents are in each status (every status, 0 included), their
/// total, and the revision they were counted at: a transition with a larger
/// revision is not in them yet (the page adds it from the stream).
async fn fleet_counts(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (apis, request, call) = dashboard.request(&headers, peer, Method::COUNT_AGENTS, ())?;
    let counts = call.answer(apis.agents.count_agents(request).await)?;
    let by_status: serde_json::Map<String, serde_json::Value> = AgentStatus::ALL
        .iter()
        .map(|&status| (status.as_str().to_owned(), counts.of(status).into()))
        .collect();
    Ok(json(&serde_json::json!({
        "revision": counts.revision,
        "total": counts.total(),
        "counts": by_status,
    }))
    .into_response())
}

async fn get_agent(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
) -> Result<Response, ApiError> {
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::agents(Action::GetAgent),
        pb::GetAgentRequest { agent_id },
    )?;
    let agent = call
        .answer(apis.agents.get_agent(request).await)?
        .into_inner()
        .agent;
    Ok(json(&agent.as_ref().map(AgentView::from)).into_response())
}

/// What `cordon` and `uncordon` answer: the agent as the call left it and
/// the transition it made (left out when the agent was as asked already).
#[derive(Serialize)]
struct CordonView {
    agent: Option<AgentView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transition: Option<TransitionView>,
}

impl CordonView {
    fn new(agent: Option<&pb::Agent>, transition: Option<&pb::Transition>) -> CordonView {
        CordonView {
            agent: agent.map(AgentView::from),
            transition: transition.map(TransitionView::from),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CordonBody {
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UncordonBody {}

/// A state-changing request's JSON body; an empty one is `{}`.
fn body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

/// `CordonAgent`, from `{"reason": ...}` (the reason may be left out).
async fn cordon_agent(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let CordonBody { reason } = body(&raw)?;
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::dispatch(Action::CordonAgent),
        pb::CordonAgentRequest { agent_id, reason },
    )?;
    let response = call
        .answer(apis.dispatch.cordon_agent(request).await)?
        .into_inner();
    let view = CordonView::new(response.agent.as_ref(), response.transition.as_ref());
    Ok(json(&view).into_response())
}

/// `UncordonAgent` (an empty body, or `{}`).
async fn uncordon_agent(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(agent_id): Path<String>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let UncordonBody {} = body(&raw)?;
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::dispatch(Action::UncordonAgent),
        pb::UncordonAgentRequest { agent_id },
    )?;
    let response = call
        .answer(apis.dispatch.uncordon_agent(request).await)?
        .into_inner();
    let view = CordonView::new(response.agent.as_ref(), response.transition.as_ref());
    Ok(json(&view).into_response())
}

/// One page of `ListClaims`, ordered by agent id: `holder`, `page_size`
/// (`ListClaims`' default 100, at most 1000), `page_token`.
async fn list_claims(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let message = pb::ListClaimsRequest {
        page_size: number(&pairs, "page_size")?.unwrap_or(0),
        page_token: value(&pairs, "page_token").unwrap_or_default().to_owned(),
        holder: value(&pairs, "holder").unwrap_or_default().to_owned(),
    };
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::dispatch(Action::ListClaims),
        message,
    )?;
    let page = call
        .answer(apis.dispatch.list_claims(request).await)?
        .into_inner();
    let claims: Vec<ClaimView> = page.claims.iter().map(ClaimView::from).collect();
    Ok(json(&serde_json::json!({
        "claims": claims,
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

/// `ListQuotaPools` (`parked=1`: only PARKED or RELEASING ones).
async fn list_pools(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let parked_only = matches!(value(&pairs, "parked"), Some("1" | "true"));
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::quota(Action::ListQuotaPools),
        pb::ListQuotaPoolsRequest { parked_only },
    )?;
    let answer = call
        .answer(apis.quota.list_quota_pools(request).await)?
        .into_inner();
    let pools: Vec<PoolView> = answer.pools.iter().map(PoolView::from).collect();
    Ok(json(&serde_json::json!({ "pools": pools })).into_response())
}

/// `GetQuotaPool` (`name`: the pool; names hold `/`, so not a path segment).
async fn get_pool(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let pool = value(&pairs, "name")
        .ok_or_else(|| ApiError::invalid("name: the pool is required"))?
        .to_owned();
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::quota(Action::GetQuotaPool),
        pb::GetQuotaPoolRequest { pool },
    )?;
    let answer = call
        .answer(apis.quota.get_quota_pool(request).await)?
        .into_inner();
    Ok(json(&PoolDetailView::from(&answer)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParkBody {
    pool: String,
    /// RFC 3339.
    until: String,
    /// `five-hour`, `weekly`, ... (default: other).
    #[serde(default)]
    window: Option<String>,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    pool: String,
    #[serde(default)]
    reason: String,
}

/// A window by its name without the prefix (`five-hour`, `WEEKLY`).
fn window(value: Option<&str>) -> Result<i32, ApiError> {
    let Some(value) = value else {
        return Ok(pb::QuotaWindow::Other as i32);
    };
    crate::views::quota_window_named(value)
        .map(|w| w as i32)
        .ok_or_else(|| ApiError::invalid(format!("window: unknown quota window {value}")))
}

/// `ParkPool`, from `{"pool", "until", "window", "reason"}`.
async fn park_pool(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let ParkBody {
        pool,
        until,
        window: named,
        reason,
    } = body(&raw)?;
    let message = pb::ParkPoolRequest {
        pool,
        until: Some(timestamp("until", &until)?),
        window: window(named.as_deref())?,
        reason,
    };
    let (apis, request, call) =
        dashboard.request(&headers, peer, Method::quota(Action::ParkPool), message)?;
    let answer = call
        .answer(apis.quota.park_pool(request).await)?
        .into_inner();
    Ok(json(&serde_json::json!({
        "pool": PoolView::from(&answer.pool.unwrap_or_default()),
        "members_parked": answer.members_parked,
    }))
    .into_response())
}

/// `ReleasePool`, from `{"pool", "reason"}`.
async fn release_pool(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let ReleaseBody { pool, reason } = body(&raw)?;
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::quota(Action::ReleasePool),
        pb::ReleasePoolRequest { pool, reason },
    )?;
    let answer = call
        .answer(apis.quota.release_pool(request).await)?
        .into_inner();
    Ok(json(&PoolView::from(&answer.pool.unwrap_or_default())).into_response())
}

/// One page of `ListTransitions` (`agent`, `after`, `page_size`, `page_token`).
async fn list_transitions(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let message = pb::ListTransitionsRequest {
        agent_id: value(&pairs, "agent").unwrap_or_default().to_owned(),
        after_revision: number(&pairs, "after")?.unwrap_or(0),
        page_size: number(&pairs, "page_size")?.unwrap_or(0),
        page_token: value(&pairs, "page_token").unwrap_or_default().to_owned(),
    };
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::agents(Action::ListTransitions),
        message,
    )?;
    let page = call
        .answer(apis.agents.list_transitions(request).await)?
        .into_inner();
    let transitions: Vec<TransitionView> =
        page.transitions.iter().map(TransitionView::from).collect();
    Ok(json(&serde_json::json!({
        "transitions": transitions,
        "next_page_token": page.next_page_token,
        "oldest_revision": page.oldest_revision,
        "head_revision": page.head_revision,
    }))
    .into_response())
}

/// `WatchTransitions` as server-sent events. Query: `after` (a revision),
/// `snapshot=1` (the agents first), `agent` and `status` (repeated filters).
/// A `Last-Event-ID` header resumes after that revision (without a snapshot),
/// as an `EventSource` reconnect does.
///
/// Events: `agent` (a snapshot agent), `snapshot` (its end, `id:` R),
/// `transition` (`id:` its revision), `progress` (`id:` the revision reached),
/// and `error` (`{code, message, reason}`, then the stream ends: an
/// `OUT_OF_RANGE` one means the revision was pruned, so reload a snapshot).
async fn watch_transitions(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID: not a revision"))
        })
        .transpose()?;
    let snapshot = matches!(value(&pairs, "snapshot"), Some("1" | "true"));
    let message = pb::WatchTransitionsRequest {
        since_revision: match last_event_id {
            Some(revision) => revision,
            None => number(&pairs, "after")?.unwrap_or(0),
        },
        agent_ids: values(&pairs, "agent")
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        statuses: values(&pairs, "status")
            .filter(|s| !s.is_empty())
            .map(agent_status)
            .collect::<Result<Vec<_>, _>>()?,
        include_snapshot: snapshot && last_event_id.is_none(),
    };
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::agents(Action::WatchTransitions),
        message,
    )?;
    let (stream, timing) = call.stream(apis.agents.watch_transitions(request).await)?;
    Ok(Sse::new(sse_events(stream.into_inner(), timing))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The watch's messages as SSE events; an error is the last event. The
/// call's timing ends with the stream: OK at its end, the error's code, or
/// CANCELLED when the client goes away (the stream is dropped).
fn sse_events<S>(
    stream: S,
    timing: Timing,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>>
where
    S: Stream<Item = Result<pb::WatchTransitionsResponse, tonic::Status>> + Send + Unpin,
{
    use pb::watch_transitions_response::Event as E;
    futures::stream::unfold(Some((stream, timing)), |state| async move {
        let (mut stream, mut timing) = state?;
        loop {
            let event = match stream.next().await {
                None => {
                    timing.record("OK");
                    return None;
                }
                Some(Ok(pb::WatchTransitionsResponse { event: None })) => continue,
                Some(Ok(pb::WatchTransitionsResponse { event: Some(event) })) => event,
                Some(Err(status)) => {
                    timing.record_status(&status);
                    let event = sse("error", &ErrorBody::from(&status));
                    return Some((Ok(event), None));
                }
            };
            let event = match event {
                E::SnapshotAgent(agent) => sse("agent", &AgentView::from(&agent)),
                E::SnapshotComplete(done) => sse(
                    "snapshot",
                    &serde_json::json!({"revision": done.revision, "agent_count": done.agent_count}),
                )
                .id(done.revision.to_string()),
                E::Transition(t) => {
                    sse("transition", &TransitionView::from(&t)).id(t.revision.to_string())
                }
                E::Progress(p) => sse("progress", &serde_json::json!({"revision": p.revision}))
                    .id(p.revision.to_string()),
            };
            return Some((Ok(event), Some((stream, timing))));
        }
    })
}

fn sse<T: Serialize>(kind: &str, data: &T) -> Event {
    Event::default()
        .event(kind)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "null".into()))
}

async fn healing_statistics(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::healing(Action::GetHealingStatistics),
        pb::GetHealingStatisticsRequest {},
    )?;
    let stats = call
        .answer(apis.healing.get_healing_statistics(request).await)?
        .into_inner();
    Ok(json(&HealingStatsView::from(&stats)).into_response())
}

/// `GetHealingPolicy`: the policy, the pauses, the open breakers, each
/// group's unhealthy share (the fleet's first) and the spent budgets.
async fn healing_policy(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::healing(Action::GetHealingPolicy),
        pb::GetHealingPolicyRequest {},
    )?;
    let answer = call
        .answer(apis.healing.get_healing_policy(request).await)?
        .into_inner();
    Ok(json(&HealingPolicyView::from(&answer)).into_response())
}

/// `PLANNED`, `dry_run` or `HEALING_VERDICT_BRAKED` (any case).
fn healing_verdict(value: &str) -> Result<i32, ApiError> {
    let upper = value.to_ascii_uppercase();
    let name = if upper.starts_with("HEALING_VERDICT_") {
        upper
    } else {
        format!("HEALING_VERDICT_{upper}")
    };
    pb::HealingVerdict::from_str_name(&name)
        .filter(|v| *v != pb::HealingVerdict::Unspecified)
        .map(|v| v as i32)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "verdict: expected planned, dry_run or braked, got {value}"
            ))
        })
}

/// One page of `ListHealingDecisions`, newest first: `agent_id`,
/// `error_event_id`, `verdict` (`planned`, `dry_run`, `braked`), `limit`
/// (`ListHealingDecisions`' default 100, at most 1000), `page_token`.
async fn healing_decisions(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let message = pb::ListHealingDecisionsRequest {
        agent_id: value(&pairs, "agent_id").unwrap_or_default().to_owned(),
        error_event_id: number(&pairs, "error_event_id")?.unwrap_or(0),
        verdict: value(&pairs, "verdict")
            .map(healing_verdict)
            .transpose()?
            .unwrap_or(0),
        page_size: number(&pairs, "limit")?.unwrap_or(0),
        page_token: value(&pairs, "page_token").unwrap_or_default().to_owned(),
    };
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::healing(Action::ListHealingDecisions),
        message,
    )?;
    let page = call
        .answer(apis.healing.list_healing_decisions(request).await)?
        .into_inner();
    let decisions: Vec<HealingDecisionView> = page
        .decisions
        .iter()
        .map(HealingDecisionView::from)
        .collect();
    Ok(json(&serde_json::json!({
        "decisions": decisions,
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseHealingBody {
    /// The group ("" or left out: the whole fleet).
    #[serde(default)]
    group: String,
    /// Required (`PauseHealing` refuses a blank one).
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeHealingBody {
    #[serde(default)]
    group: String,
}

/// `PauseHealing`, from `{"group", "reason"}`: answers the pause in force.
async fn pause_healing(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let PauseHealingBody { group, reason } = body(&raw)?;
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::healing(Action::PauseHealing),
        pb::PauseHealingRequest { group, reason },
    )?;
    let answer = call
        .answer(apis.healing.pause_healing(request).await)?
        .into_inner();
    Ok(json(&HealingPauseView::from(&answer.pause.unwrap_or_default())).into_response())
}

/// `ResumeHealing`, from `{"group"}` (an empty body: the whole fleet):
/// answers `{"resumed": false}` when the scope was not paused.
async fn resume_healing(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let ResumeHealingBody { group } = body(&raw)?;
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::healing(Action::ResumeHealing),
        pb::ResumeHealingRequest { group },
    )?;
    let answer = call
        .answer(apis.healing.resume_healing(request).await)?
        .into_inner();
    Ok(json(&serde_json::json!({ "resumed": answer.resumed })).into_response())
}

/// `GetUsage`: `group_by` (`day`, `session`, `model`, `user`), `since` and
/// `until` (RFC 3339), `user`.
async fn usage(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let group_by = match value(&pairs, "group_by").unwrap_or("day") {
        "day" => pb::UsageGrouping::Day,
        "session" => pb::UsageGrouping::Session,
        "model" => pb::UsageGrouping::Model,
        "user" => pb::UsageGrouping::User,
        other => {
            return Err(ApiError::invalid(format!(
                "group_by: expected day, session, model or user, got {other}"
            )));
        }
    };
    let message = pb::GetUsageRequest {
        group_by: group_by as i32,
        since: value(&pairs, "since")
            .map(|v| timestamp("since", v))
            .transpose()?,
        until: value(&pairs, "until")
            .map(|v| timestamp("until", v))
            .transpose()?,
        user: value(&pairs, "user").unwrap_or_default().to_owned(),
    };
    let (apis, request, call) =
        dashboard.request(&headers, peer, Method::pipeline(Action::GetUsage), message)?;
    let response = call
        .answer(apis.pipeline.get_usage(request).await)?
        .into_inner();
    Ok(json(&UsageView::new(group_by, &response)).into_response())
}

async fn processors(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::pipeline(Action::ListProcessors),
        pb::ListProcessorsRequest {},
    )?;
    let response = call
        .answer(apis.pipeline.list_processors(request).await)?
        .into_inner();
    let processors: Vec<ProcessorView> = response
        .processors
        .iter()
        .map(ProcessorView::from)
        .collect();
    Ok(json(&serde_json::json!({ "processors": processors })).into_response())
}

/// One page of `ListRuns`, newest first: `processor`, `page_size`, `page_token`.
async fn runs(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let message = pb::ListRunsRequest {
        processor: value(&pairs, "processor").unwrap_or_default().to_owned(),
        page_size: number(&pairs, "page_size")?.unwrap_or(0),
        page_token: value(&pairs, "page_token").unwrap_or_default().to_owned(),
    };
    let (apis, request, call) =
        dashboard.request(&headers, peer, Method::pipeline(Action::ListRuns), message)?;
    let page = call
        .answer(apis.pipeline.list_runs(request).await)?
        .into_inner();
    let runs: Vec<RunView> = page.runs.iter().map(RunView::from).collect();
    Ok(json(&serde_json::json!({
        "runs": runs,
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

/// One page of `ListSessionStates`: `processor`, `status` (`processed`,
/// `failed`, `dead`), `user`, `page_size`, `page_token`.
async fn session_states(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query(raw)?;
    let status = match value(&pairs, "status") {
        None => pb::SessionStatus::Unspecified,
        Some(v) => {
            pb::SessionStatus::from_str_name(&format!("SESSION_STATUS_{}", v.to_ascii_uppercase()))
                .filter(|s| *s != pb::SessionStatus::Unspecified)
                .ok_or_else(|| ApiError::invalid(format!("status: unknown session status {v}")))?
        }
    };
    let message = pb::ListSessionStatesRequest {
        processor: value(&pairs, "processor").unwrap_or_default().to_owned(),
        status: status as i32,
        user: value(&pairs, "user").unwrap_or_default().to_owned(),
        page_size: number(&pairs, "page_size")?.unwrap_or(0),
        page_token: value(&pairs, "page_token").unwrap_or_default().to_owned(),
    };
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::pipeline(Action::ListSessionStates),
        message,
    )?;
    let page = call
        .answer(apis.pipeline.list_session_states(request).await)?
        .into_inner();
    let states: Vec<SessionStateView> = page.states.iter().map(SessionStateView::from).collect();
    Ok(json(&serde_json::json!({
        "states": states,
        "next_page_token": page.next_page_token,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    processor: String,
    session: String,
}

/// `RetrySession`, from `{"processor": ..., "session": ...}`.
async fn retry_session(
    State(dashboard): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state_changing(&headers)?;
    let RetryBody { processor, session } = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))?;
    let (apis, request, call) = dashboard.request(
        &headers,
        peer,
        Method::pipeline(Action::RetrySession),
        pb::RetrySessionRequest { processor, session },
    )?;
    let state = call
        .answer(apis.pipeline.retry_session(request).await)?
        .into_inner()
        .state;
    Ok(json(&state.as_ref().map(SessionStateView::from)).into_response())
}

/// A state-changing request must be JSON and carry [`REQUEST_HEADER`]: a
/// cross-site form or simple request can do neither.
fn state_changing(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let marked = headers
        .get(REQUEST_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    if json && marked {
        return Ok(());
    }
    Err(ApiError::http(
        http::StatusCode::FORBIDDEN,
        "REQUEST_HEADER_REQUIRED",
        "a state-changing request must be Content-Type: application/json with X-Fleetcare-Request: 1",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::CONFLICT);
        assert_eq!(http_status(Code::Aborted), StatusCode::CONFLICT);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(Code::Internal),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn a_state_changing_request_needs_json_and_the_custom_header() {
        let mut headers = HeaderMap::new();
        assert!(state_changing(&headers).is_err());
        headers.insert(REQUEST_HEADER, HeaderValue::from_static("1"));
        assert!(state_changing(&headers).is_err(), "not JSON");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(state_changing(&headers).is_ok());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(state_changing(&headers).is_err(), "a simple request's type");
    }

    #[test]
    fn statuses_are_read_with_or_without_their_prefix() {
        assert_eq!(agent_status("idle").unwrap(), pb::AgentStatus::Idle as i32);
        assert_eq!(
            agent_status("AGENT_STATUS_ON_CALL").unwrap(),
            pb::AgentStatus::OnCall as i32
        );
        assert!(agent_status("unspecified").is_err());
        assert!(agent_status("bogus").is_err());
    }

    #[test]
    fn verdicts_are_read_with_or_without_their_prefix() {
        assert_eq!(
            healing_verdict("braked").unwrap(),
            pb::HealingVerdict::Braked as i32
        );
        assert_eq!(
            healing_verdict("HEALING_VERDICT_DRY_RUN").unwrap(),
            pb::HealingVerdict::DryRun as i32
        );
        assert!(healing_verdict("unspecified").is_err());
        assert!(healing_verdict("stopped").is_err());
    }
}
