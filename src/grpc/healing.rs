//! `fleetcare.v1.HealingService` and `fleetcare.v1.PostHealingService`.

use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tonic::{Request, Response, Status};

use crate::domain::auth::{Action, Caller};
use crate::domain::healing::{self, ErrorType, PlanInput, PlannerConfig, Strategy};
use crate::domain::healing_records::{
    ErrorEvent, ErrorReport, HealingStatistics, RecoveryAction, RecoveryOutcome, RecoveryStatus,
    StoredAction,
};
use crate::domain::post_healing::{
    self, ActionStatus, ActionType, Ineligible, MetricPoint, PostHealingConfig, Tier,
};
use crate::error::Error;
use crate::grpc::auth::{self, Guard};
use crate::grpc::convert::{duration, from_duration, from_timestamp, timestamp};
use crate::grpc::validate::{self, PageCursor, PageRequest};
use crate::proto::v1 as pb;
use crate::proto::v1::healing_service_server::HealingService;
use crate::proto::v1::post_healing_service_server::PostHealingService;
use crate::runtime::healing_policy::PolicyHandle;

mod brakes;
use crate::storage::{
    ActionOutcomeUpdate, ErrorEventQuery, HealingStore, PostHealingStore, RecoveryActionQuery,
};

/// Most metric points one EvaluatePost may carry.
pub const MAX_METRIC_POINTS: usize = 10_000;

/// The planner's and the retry jitter's randomness: seeded for reproducible runs.
pub type SharedRng = Arc<Mutex<StdRng>>;

pub fn shared_rng(seed: Option<u64>) -> SharedRng {
    let rng = match seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    Arc::new(Mutex::new(rng))
}

fn with_rng<T>(rng: &SharedRng, f: impl FnOnce(&mut StdRng) -> T) -> T {
    // A panic elsewhere cannot leave an RNG in a broken state: keep using it.
    let mut guard = rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f(&mut guard)
}

// Domain enums and their wire twins, matched exhaustively both ways: a new
// variant on either side is a compile error here until it is mapped.

fn error_type_to_pb(t: ErrorType) -> i32 {
    let wire = match t {
        ErrorType::ExecutionFailure => pb::ErrorType::ExecutionFailure,
        ErrorType::ResourceExhaustion => pb::ErrorType::ResourceExhaustion,
        ErrorType::GoalConflict => pb::ErrorType::GoalConflict,
        ErrorType::CommunicationError => pb::ErrorType::CommunicationError,
        ErrorType::PerformanceDegradation => pb::ErrorType::PerformanceDegradation,
        ErrorType::SafetyViolation => pb::ErrorType::SafetyViolation,
        ErrorType::DependencyFailure => pb::ErrorType::DependencyFailure,
        ErrorType::ConfigurationError => pb::ErrorType::ConfigurationError,
        ErrorType::LearningFailure => pb::ErrorType::LearningFailure,
        ErrorType::Unknown => pb::ErrorType::Unknown,
    };
    wire as i32
}

/// `None` for UNSPECIFIED (no filter, no hint); a value this server does not
/// know is refused, naming the field and the value.
fn error_type_from_pb(field: &str, value: i32) -> Result<Option<ErrorType>, Error> {
    let t = match pb::ErrorType::try_from(value) {
        Ok(pb::ErrorType::Unspecified) => return Ok(None),
        Ok(pb::ErrorType::ExecutionFailure) => ErrorType::ExecutionFailure,
        Ok(pb::ErrorType::ResourceExhaustion) => ErrorType::ResourceExhaustion,
        Ok(pb::ErrorType::GoalConflict) => ErrorType::GoalConflict,
        Ok(pb::ErrorType::CommunicationError) => ErrorType::CommunicationError,
        Ok(pb::ErrorType::PerformanceDegradation) => ErrorType::PerformanceDegradation,
        Ok(pb::ErrorType::SafetyViolation) => ErrorType::SafetyViolation,
        Ok(pb::ErrorType::DependencyFailure) => ErrorType::DependencyFailure,
        Ok(pb::ErrorType::ConfigurationError) => ErrorType::ConfigurationError,
        Ok(pb::ErrorType::LearningFailure) => ErrorType::LearningFailure,
        Ok(pb::ErrorType::Unknown) => ErrorType::Unknown,
        Err(_) => return Err(unknown_value(field, value, "error type")),
    };
    Ok(Some(t))
}

fn unknown_value(field: &str, value: i32, what: &str) -> Error {
    Error::invalid(format!("{field} {value} is not a known {what}"))
}

fn strategy_to_pb(s: Strategy) -> i32 {
    let wire = match s {
        Strategy::Retry => pb::RecoveryStrategy::Retry,
        Strategy::Rollback => pb::RecoveryStrategy::Rollback,
        Strategy::Reconfigure => pb::RecoveryStrategy::Reconfigure,
        Strategy::Restart => pb::RecoveryStrategy::Restart,
        Strategy::Isolate => pb::RecoveryStrategy::Isolate,
        Strategy::Escalate => pb::RecoveryStrategy::Escalate,
        Strategy::Compensate => pb::RecoveryStrategy::Compensate,
        Strategy::DegradeGracefully => pb::RecoveryStrategy::DegradeGracefully,
        Strategy::WaitAndRetry => pb::RecoveryStrategy::WaitAndRetry,
        Strategy::AlternativePath => pb::RecoveryStrategy::AlternativePath,
    };
    wire as i32
}

fn recovery_status_to_pb(s: RecoveryStatus) -> i32 {
    let wire = match s {
        RecoveryStatus::Active => pb::RecoveryStatus::Active,
        RecoveryStatus::Succeeded => pb::RecoveryStatus::Succeeded,
        RecoveryStatus::Failed => pb::RecoveryStatus::Failed,
        RecoveryStatus::Expired => pb::RecoveryStatus::Expired,
    };
    wire as i32
}

fn recovery_status_from_pb(field: &str, value: i32) -> Result<Option<RecoveryStatus>, Error> {
    let s = match pb::RecoveryStatus::try_from(value) {
        Ok(pb::RecoveryStatus::Unspecified) => return Ok(None),
        Ok(pb::RecoveryStatus::Active) => RecoveryStatus::Active,
        Ok(pb::RecoveryStatus::Succeeded) => RecoveryStatus::Succeeded,
        Ok(pb::RecoveryStatus::Failed) => RecoveryStatus::Failed,
        Ok(pb::RecoveryStatus::Expired) => RecoveryStatus::Expired,
        Err(_) => return Err(unknown_value(field, value, "recovery status")),
    };
    Ok(Some(s))
}

fn action_type_to_pb(a: ActionType) -> i32 {
    match a {
        ActionType::Comment => pb::PostActionType::Comment as i32,
        ActionType::Edit => pb::PostActionType::Edit as i32,
        ActionType::Thread => pb::PostActionType::Thread as i32,
    }
}

fn action_type_from_pb(field: &str, value: i32) -> Result<ActionType, Error> {
    match pb::PostActionType::try_from(value) {
        Ok(pb::PostActionType::Comment) => Ok(ActionType::Comment),
        Ok(pb::PostActionType::Edit) => Ok(ActionType::Edit),
        Ok(pb::PostActionType::Thread) => Ok(ActionType::Thread),
        Ok(pb::PostActionType::Unspecified) => Err(Error::invalid(format!(
            "{field} must be POST_ACTION_TYPE_COMMENT, _EDIT or _THREAD"
        ))),
        Err(_) => Err(unknown_value(field, value, "post action type")),
    }
}

fn action_status_to_pb(s: ActionStatus) -> i32 {
    match s {
        ActionStatus::Running => pb::PostActionStatus::Running as i32,
        ActionStatus::Succeeded => pb::PostActionStatus::Succeeded as i32,
        ActionStatus::Failed => pb::PostActionStatus::Failed as i32,
    }
}

fn action_status_from_pb(field: &str, value: i32) -> Result<ActionStatus, Error> {
    match pb::PostActionStatus::try_from(value) {
        Ok(pb::PostActionStatus::Running) => Ok(ActionStatus::Running),
        Ok(pb::PostActionStatus::Succeeded) => Ok(ActionStatus::Succeeded),
        Ok(pb::PostActionStatus::Failed) => Ok(ActionStatus::Failed),
        Ok(pb::PostActionStatus::Unspecified) => Err(Error::invalid(format!(
            "{field} must be POST_ACTION_STATUS_RUNNING, _SUCCEEDED or _FAILED"
        ))),
        Err(_) => Err(unknown_value(field, value, "post action status")),
    }
}

fn ineligible_to_pb(reason: Ineligible) -> i32 {
    match reason {
        Ineligible::InsufficientSamples => pb::IneligibleReason::InsufficientSamples as i32,
        Ineligible::LowExposure => pb::IneligibleReason::LowExposure as i32,
        Ineligible::Healthy => pb::IneligibleReason::Healthy as i32,
        Ineligible::DuplicateAction => pb::IneligibleReason::DuplicateAction as i32,
        Ineligible::WindowFrequencyExceeded => pb::IneligibleReason::WindowFrequencyExceeded as i32,
        Ineligible::ActionCooldownActive => pb::IneligibleReason::ActionCooldownActive as i32,
    }
}

fn event_to_pb(e: &ErrorEvent) -> pb::ErrorEvent {
    pb::ErrorEvent {
        actor: e.actor.clone(),
        id: e.id,
        agent_id: e.agent_id.clone(),
        message: e.message.clone(),
        context: e.context.clone().into_iter().collect(),
        error_type: error_type_to_pb(e.error_type),
        severity: e.severity,
        critical: e.critical,
        recurring: e.recurring,
        occurred_at: Some(timestamp(e.occurred_at)),
        recovery_action_id: e.recovery.map_or(0, |(id, _)| id),
        recovery_status: e.recovery.map_or(0, |(_, s)| recovery_status_to_pb(s)),
    }
}

fn action_to_pb(a: &RecoveryAction) -> pb::RecoveryAction {
    pb::RecoveryAction {
        actor: a.actor.clone(),
        outcome_actor: a.outcome_actor.clone(),
        id: a.id,
        error_event_id: a.error_event_id,
        agent_id: a.agent_id.clone(),
        error_type: error_type_to_pb(a.error_type),
        strategy: strategy_to_pb(a.strategy),
        chosen_strategy: strategy_to_pb(a.chosen_strategy),
        parameters: a.parameters.clone().into_iter().collect(),
        estimated_duration: Some(duration(a.estimated_duration)),
        success_probability: a.success_probability,
        risk_score: a.risk,
        escalated: a.escalated,
        reason: a.reason.clone(),
        status: recovery_status_to_pb(a.status),
        created_at: Some(timestamp(a.created_at)),
        lease_expires_at: Some(timestamp(a.lease_expires_at)),
        completed_at: a.completed_at.map(timestamp),
        duration: a.duration.map(duration),
        details: a.details.clone().unwrap_or_default(),
        context_signature: a.context_signature.clone(),
    }
}

fn post_action_to_pb(stored: &StoredAction) -> pb::PostAction {
    let r = &stored.record;
    pb::PostAction {
        idempotency_key: r.idempotency_key.clone(),
        post_id: r.post_id.clone(),
        action_type: action_type_to_pb(r.action),
        tier: r.tier.number(),
        status: action_status_to_pb(r.status),
        outcome_json: stored
            .outcome
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        error_code: r.error_code.clone().unwrap_or_default(),
        attempts: r.attempts,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        lease_expires_at: r.lease_expires_at.map(timestamp),
        actor: stored.actor.clone(),
        outcome_actor: stored.outcome_actor.clone(),
    }
}

/// Settings of the agent-healing handlers.
#[derive(Clone)]
pub struct HealingSettings {
    pub planner: PlannerConfig,
    pub recovery_lease: chrono::Duration,
    /// The remediation policy, as last (re)loaded.
    pub policy: Arc<PolicyHandle>,
}

pub struct HealingApi {
    store: Arc<dyn HealingStore>,
    settings: HealingSettings,
    rng: SharedRng,
    guard: Guard,
    metrics: Arc<crate::metrics::Metrics>,
}

impl HealingApi {
    pub fn new(
        store: Arc<dyn HealingStore>,
        settings: HealingSettings,
        rng: SharedRng,
        guard: Guard,
    ) -> Self {
        HealingApi {
            store,
            settings,
            rng,
            guard,
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// Records plans and outcomes into these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// A call on one agent's event or action, found by `agent_of` (only looked
    /// up for callers limited to a scope of agents).
    async fn check_owner(
        &self,
        caller: &Caller,
        action: Action,
        agent_of: impl std::future::Future<Output = Result<String, Error>>,
    ) -> Result<(), Error> {
        if !caller.is_scoped() {
            return self.guard.check(caller, action, None);
        }
        let agent_id = agent_of.await?;
        self.guard.check_agent(caller, action, &agent_id).await
    }

    /// The agent of an error event.
    async fn event_agent(&self, error_event_id: i64) -> Result<String, Error> {
        let query = ErrorEventQuery {
            before_id: error_event_id.checked_add(1),
            limit: 1,
            ..ErrorEventQuery::default()
        };
        self.store
            .list_error_events(&query)
            .await?
            .into_iter()
            .find(|e| e.id == error_event_id)
            .map(|e| e.agent_id)
            .ok_or_else(|| Error::NotFound {
                kind: "error event",
                id: error_event_id.to_string(),
            })
    }

    /// The agent of a recovery action.
    async fn action_agent(&self, action_id: i64) -> Result<String, Error> {
        let query = RecoveryActionQuery {
            before_id: action_id.checked_add(1),
            limit: 1,
            ..RecoveryActionQuery::default()
        };
        self.store
            .list_recovery_actions(&query)
            .await?
            .into_iter()
            .find(|a| a.id == action_id)
            .map(|a| a.agent_id)
            .ok_or_else(|| Error::NotFound {
                kind: "recovery action",
                id: action_id.to_string(),
            })
    }

    /// A listing, filtered to one agent or not.
    async fn check_listing(
        &self,
        caller: &Caller,
        action: Action,
        agent_id: Option<&str>,
    ) -> Result<(), Error> {
        match agent_id {
            Some(id) => self.guard.check_agent(caller, action, id).await,
            None => self.guard.check(caller, action, None),
        }
    }
}

// Decoding: one `TryFrom` per request message, destructuring every field, so a
// new proto field is a compile error here until it is handled.

impl TryFrom<pb::ReportErrorRequest> for ErrorReport {
    type Error = Error;

    fn try_from(request: pb::ReportErrorRequest) -> Result<Self, Error> {
        let pb::ReportErrorRequest {
            agent_id,
            message,
            context,
            error_type_hint,
        } = request;
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        if message.trim().is_empty() {
            return Err(Error::invalid("message is required"));
        }
        validate::bounded_text("message", &message, validate::MAX_MESSAGE_BYTES)?;
        Ok(ErrorReport {
            agent_id,
            message,
            context: validate::context("context", context)?,
            hint: error_type_from_pb("error_type_hint", error_type_hint)?,
        })
    }
}

/// A PlanRecovery request, decoded.
struct PlanFor {
    error_event_id: i64,
}

impl TryFrom<pb::PlanRecoveryRequest> for PlanFor {
    type Error = Error;

    fn try_from(request: pb::PlanRecoveryRequest) -> Result<Self, Error> {
        let pb::PlanRecoveryRequest { error_event_id } = request;
        if error_event_id <= 0 {
            return Err(Error::invalid("error_event_id must be positive"));
        }
        Ok(PlanFor { error_event_id })
    }
}

/// A ReportRecoveryOutcome request, decoded.
struct OutcomeReport {
    action_id: i64,
    outcome: RecoveryOutcome,
}

impl TryFrom<pb::ReportRecoveryOutcomeRequest> for OutcomeReport {
    type Error = Error;

    fn try_from(request: pb::ReportRecoveryOutcomeRequest) -> Result<Self, Error> {
        let pb::ReportRecoveryOutcomeRequest {
            action_id,
            success,
            duration,
            details,
        } = request;
        if action_id <= 0 {
            return Err(Error::invalid("action_id must be positive"));
        }
        let duration = match duration {
            Some(d) => from_duration("duration", d)?,
            None => chrono::Duration::zero(),
        };
        validate::bounded_text("details", &details, validate::MAX_MESSAGE_BYTES)?;
        Ok(OutcomeReport {
            action_id,
            outcome: RecoveryOutcome {
                success,
                duration,
                details,
                // The handler's caller (see `report_recovery_outcome`).
                actor: String::new(),
            },
        })
    }
}

/// A list request, decoded: the store's query and the page asked for.
struct Listing<Q, C> {
    query: Q,
    page: PageRequest<C>,
}

impl TryFrom<pb::ListErrorEventsRequest> for Listing<ErrorEventQuery, i64> {
    type Error = Error;

    fn try_from(request: pb::ListErrorEventsRequest) -> Result<Self, Error> {
        let pb::ListErrorEventsRequest {
            agent_id,
            error_type,
            page_size,
            page_token,
        } = request;
        let page = PageRequest::decode(page_size, &page_token)?;
        let query = ErrorEventQuery {
            agent_id: optional_agent(&agent_id)?,
            error_type: error_type_from_pb("error_type", error_type)?,
            before_id: page.after,
            limit: page.fetch_limit(),
        };
        Ok(Listing { query, page })
    }
}

impl TryFrom<pb::ListRecoveryActionsRequest> for Listing<RecoveryActionQuery, i64> {
    type Error = Error;

    fn try_from(request: pb::ListRecoveryActionsRequest) -> Result<Self, Error> {
        let pb::ListRecoveryActionsRequest {
            agent_id,
            error_type,
            status,
            page_size,
            page_token,
            error_event_id,
        } = request;
        let page = PageRequest::decode(page_size, &page_token)?;
        if error_event_id < 0 {
            return Err(Error::invalid(format!(
                "error_event_id must not be negative, got {error_event_id}"
            )));
        }
        let query = RecoveryActionQuery {
            agent_id: optional_agent(&agent_id)?,
            error_event_id: (error_event_id > 0).then_some(error_event_id),
            error_type: error_type_from_pb("error_type", error_type)?,
            status: recovery_status_from_pb("status", status)?,
            before_id: page.after,
            limit: page.fetch_limit(),
        };
        Ok(Listing { query, page })
    }
}

fn statistics_to_pb(stats: &HealingStatistics) -> pb::GetHealingStatisticsResponse {
    pb::GetHealingStatisticsResponse {
        total_errors: stats.total_errors,
        errors_last_hour: stats.errors_last_hour,
        errors_by_type: stats
            .errors_by_type
            .iter()
            .map(|(t, count)| pb::ErrorTypeCount {
                error_type: error_type_to_pb(*t),
                count: *count,
            })
            .collect(),
        active_recoveries: stats.active_recoveries,
        patterns: stats
            .patterns
            .iter()
            .map(|p| pb::PatternStatistics {
                error_type: error_type_to_pb(p.error_type),
                context_signature: p.context_signature.clone(),
                strategy: strategy_to_pb(p.strategy),
                successes: p.successes,
                failures: p.failures,
                success_rate: p.success_rate(),
                mean_recovery_time: Some(duration(chrono::Duration::milliseconds(
                    (p.mean_recovery_secs() * 1000.0) as i64,
                ))),
                use_count: p.uses(),
            })
            .collect(),
        overall_success_rate: stats.overall_success_rate(),
    }
}

#[tonic::async_trait]
impl HealingService for HealingApi {
    async fn report_error(
        &self,
        request: Request<pb::ReportErrorRequest>,
    ) -> Result<Response<pb::ReportErrorResponse>, Status> {
        let caller = auth::caller(&request)?;
        let report = ErrorReport::try_from(request.into_inner())?;
        self.guard
            .check_agent(&caller, Action::ReportError, &report.agent_id)
            .await?;
        let event = self
            .store
            .record_error(report.classify(&caller.name))
            .await?;
        Ok(Response::new(pb::ReportErrorResponse {
            event: Some(event_to_pb(&event)),
        }))
    }

    async fn plan_recovery(
        &self,
        request: Request<pb::PlanRecoveryRequest>,
    ) -> Result<Response<pb::PlanRecoveryResponse>, Status> {
        let caller = auth::caller(&request)?;
        let PlanFor { error_event_id } = request.into_inner().try_into()?;
        self.check_owner(
            &caller,
            Action::PlanRecovery,
            self.event_agent(error_event_id),
        )
        .await?;
        let config = self.settings.planner;
        let rng = self.rng.clone();
        let planner = Box::new(
            move |event: &ErrorEvent, evidence: &[healing::Evidence], closed_off: &[Strategy]| {
                let input = PlanInput {
                    error_type: event.error_type,
                    critical: event.critical,
                    recurring: event.recurring,
                    evidence,
                };
                with_rng(&rng, |rng| {
                    healing::plan_around(&input, &config, rng, closed_off)
                })
            },
        );
        let policy = self.settings.policy.current();
        let planned = self
            .store
            .plan_recovery(
                error_event_id,
                self.settings.recovery_lease,
                &caller.name,
                &policy,
                planner,
            )
            .await;
        let (verdict, reason) = match &planned {
            Ok(_) => (crate::domain::brakes::Verdict::Planned.as_str(), ""),
            Err(Error::NotPlanned(not)) => (not.verdict.as_str(), not.reason),
            Err(_) => ("", ""),
        };
        if !verdict.is_empty() {
            self.metrics
                .healing_decisions
                .get_or_create(&crate::metrics::DecisionLabels { verdict, reason })
                .inc();
        }
        if let Err(Error::NotPlanned(not)) = &planned {
            tracing::info!(agent_id = %not.agent_id, reason = not.reason, decision_id = not.decision_id, "recovery not planned");
        }
        let action = planned?;
        self.metrics
            .healing_plans
            .get_or_create(&crate::metrics::StrategyLabel {
                strategy: action.strategy.as_str(),
            })
            .inc();
        tracing::info!(
            agent_id = %action.agent_id,
            action_id = action.id,
            strategy = action.strategy.as_str(),
            escalated = action.escalated,
            "recovery planned"
        );
        Ok(Response::new(pb::PlanRecoveryResponse {
            action: Some(action_to_pb(&action)),
        }))
    }

    async fn report_recovery_outcome(
        &self,
        request: Request<pb::ReportRecoveryOutcomeRequest>,
    ) -> Result<Response<pb::ReportRecoveryOutcomeResponse>, Status> {
        let caller = auth::caller(&request)?;
        let OutcomeReport {
            action_id,
            mut outcome,
        } = request.into_inner().try_into()?;
        self.check_owner(
            &caller,
            Action::ReportRecoveryOutcome,
            self.action_agent(action_id),
        )
        .await?;
        outcome.actor.clone_from(&caller.name);
        let policy = self.settings.policy.current();
        let action = self
            .store
            .record_recovery_outcome(action_id, outcome, &policy)
            .await?;
        self.metrics
            .healing_outcomes
            .get_or_create(&crate::metrics::ResultLabel {
                result: action.status.as_str(),
            })
            .inc();
        Ok(Response::new(pb::ReportRecoveryOutcomeResponse {
            action: Some(action_to_pb(&action)),
        }))
    }

    async fn get_healing_statistics(
        &self,
        request: Request<pb::GetHealingStatisticsRequest>,
    ) -> Result<Response<pb::GetHealingStatisticsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::GetHealingStatisticsRequest {} = request.into_inner();
        self.guard
            .check(&caller, Action::GetHealingStatistics, None)?;
        let stats = self.store.healing_statistics().await?;
        Ok(Response::new(statistics_to_pb(&stats)))
    }

    async fn list_error_events(
        &self,
        request: Request<pb::ListErrorEventsRequest>,
    ) -> Result<Response<pb::ListErrorEventsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let Listing { query, page } = request.into_inner().try_into()?;
        self.check_listing(&caller, Action::ListErrorEvents, query.agent_id.as_deref())
            .await?;
        let mut events = self.store.list_error_events(&query).await?;
        let next_page_token = page.finish(&mut events, |e| e.id);
        Ok(Response::new(pb::ListErrorEventsResponse {
            events: events.iter().map(event_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn list_recovery_actions(
        &self,
        request: Request<pb::ListRecoveryActionsRequest>,
    ) -> Result<Response<pb::ListRecoveryActionsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let Listing { query, page } = request.into_inner().try_into()?;
        self.check_listing(
            &caller,
            Action::ListRecoveryActions,
            query.agent_id.as_deref(),
        )
        .await?;
        let mut actions = self.store.list_recovery_actions(&query).await?;
        let next_page_token = page.finish(&mut actions, |a| a.id);
        Ok(Response::new(pb::ListRecoveryActionsResponse {
            actions: actions.iter().map(action_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn get_healing_policy(
        &self,
        request: Request<pb::GetHealingPolicyRequest>,
    ) -> Result<Response<pb::GetHealingPolicyResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::GetHealingPolicyRequest {} = request.into_inner();
        self.guard.check(&caller, Action::GetHealingPolicy, None)?;
        let policy = self.settings.policy.current();
        let status = self.store.healing_brakes(&policy).await?;
        Ok(Response::new(brakes::status_to_pb(&status)))
    }

    async fn pause_healing(
        &self,
        request: Request<pb::PauseHealingRequest>,
    ) -> Result<Response<pb::PauseHealingResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::PauseHealingRequest { group, reason } = request.into_inner();
        self.guard.check(&caller, Action::PauseHealing, None)?;
        let scope = brakes::scope(&group, &self.settings.policy.current())?;
        let pause = self
            .store
            .pause_healing(scope, &reason, &caller.name)
            .await?;
        tracing::warn!(scope = %pause.scope, by = %pause.by, reason = %pause.reason, "healing paused");
        Ok(Response::new(pb::PauseHealingResponse {
            pause: Some(brakes::pause_to_pb(&pause)),
        }))
    }

    async fn resume_healing(
        &self,
        request: Request<pb::ResumeHealingRequest>,
    ) -> Result<Response<pb::ResumeHealingResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::ResumeHealingRequest { group } = request.into_inner();
        self.guard.check(&caller, Action::ResumeHealing, None)?;
        // A group's pause can be lifted even after group_by was removed.
        let scope = match group.trim() {
            "" => crate::domain::brakes::Scope::Fleet,
            g => crate::domain::brakes::Scope::Group(g.to_owned()),
        };
        let resumed = self.store.resume_healing(&scope).await?;
        tracing::info!(scope = %scope, by = %caller.name, resumed, "healing resumed");
        Ok(Response::new(pb::ResumeHealingResponse { resumed }))
    }

    async fn list_healing_decisions(
        &self,
        request: Request<pb::ListHealingDecisionsRequest>,
    ) -> Result<Response<pb::ListHealingDecisionsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let Listing { query, page } = request.into_inner().try_into()?;
        self.check_listing(
            &caller,
            Action::ListHealingDecisions,
            query.agent_id.as_deref(),
        )
        .await?;
        let mut decisions = self.store.list_healing_decisions(&query).await?;
        let next_page_token = page.finish(&mut decisions, |d| d.id);
        let policy = self.settings.policy.current();
        Ok(Response::new(pb::ListHealingDecisionsResponse {
            decisions: decisions
                .iter()
                .map(|d| brakes::decision_to_pb(d, &policy))
                .collect(),
            next_page_token,
        }))
    }
}

fn optional_agent(agent_id: &str) -> Result<Option<String>, Error> {
    match agent_id {
        "" => Ok(None),
        id => validate::agent_id("agent_id", id).map(Some),
    }
}

pub struct PostHealingApi {
    store: Arc<dyn PostHealingStore>,
    config: PostHealingConfig,
    rng: SharedRng,
    guard: Guard,
    metrics: Arc<crate::metrics::Metrics>,
}

impl PostHealingApi {
    pub fn new(
        store: Arc<dyn PostHealingStore>,
        config: PostHealingConfig,
        rng: SharedRng,
        guard: Guard,
    ) -> Self {
        PostHealingApi {
            store,
            config,
            rng,
            guard,
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// Records post actions into these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn count_action(&self, status: crate::domain::post_healing::ActionStatus) {
        self.metrics
            .post_actions
            .get_or_create(&crate::metrics::StatusLabel {
                status: status.as_str(),
            })
            .inc();
    }
}

/// A window key (`shealw_<window>_` and 32 lowercase hex characters) or a
/// seed key (`sheal_` and 32 lowercase hex characters).
fn idempotency_key(key: &str) -> Result<String, Error> {
    match post_healing::key_form(key) {
        Some(_) => Ok(key.to_owned()),
        None => Err(Error::invalid(
            "idempotency_key must be \"shealw_<window>_\" followed by 32 lowercase hex \
             characters (or a seed key: \"sheal_\" followed by 32 lowercase hex characters)",
        )),
    }
}

fn metric_points(points: Vec<pb::MetricPoint>) -> Result<Vec<MetricPoint>, Error> {
    if points.len() > MAX_METRIC_POINTS {
        return Err(Error::invalid(format!(
            "points has {} entries, at most {MAX_METRIC_POINTS} allowed",
            points.len()
        )));
    }
    points
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            if p.impressions < 0 || p.engagements < 0 {
                return Err(Error::invalid(format!(
                    "points[{i}] has a negative count (impressions {}, engagements {})",
                    p.impressions, p.engagements
                )));
            }
            let at = p
                .observed_at
                .ok_or_else(|| Error::invalid(format!("points[{i}].observed_at is required")))?;
            Ok(MetricPoint {
                at: from_timestamp(&format!("points[{i}].observed_at"), at)?,
                impressions: p.impressions,
                engagements: p.engagements,
            })
        })
        .collect()
}

/// An EvaluatePost request, decoded.
struct PostEvaluation {
    post_id: String,
    points: Vec<MetricPoint>,
    now: Option<chrono::DateTime<chrono::Utc>>,
    claim: bool,
}

impl TryFrom<pb::EvaluatePostRequest> for PostEvaluation {
    type Error = Error;

    fn try_from(request: pb::EvaluatePostRequest) -> Result<Self, Error> {
        let pb::EvaluatePostRequest {
            post_id,
            points,
            now,
            claim,
        } = request;
        // The caller's clock never reaches stored state: a claim is decided at
        // the store's time, and `now` is only for a dry run, which writes nothing.
        if claim && now.is_some() {
            return Err(Error::invalid(
                "now is only allowed without claim (a dry run); a claim is decided at the server's time",
            ));
        }
        Ok(PostEvaluation {
            post_id: validate::post_id("post_id", &post_id)?,
            points: metric_points(points)?,
            now: now.map(|ts| from_timestamp("now", ts)).transpose()?,
            claim,
        })
    }
}

impl TryFrom<pb::RecordActionOutcomeRequest> for ActionOutcomeUpdate {
    type Error = Error;

    fn try_from(request: pb::RecordActionOutcomeRequest) -> Result<Self, Error> {
        let pb::RecordActionOutcomeRequest {
            idempotency_key: key,
            status,
            outcome_json,
            error_code,
            post_id,
            action_type,
            tier,
        } = request;
        let idempotency_key = idempotency_key(&key)?;
        let status = action_status_from_pb("status", status)?;
        validate::bounded_text("outcome_json", &outcome_json, validate::MAX_MESSAGE_BYTES)?;
        let outcome = match outcome_json.trim() {
            "" => None,
            text => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value @ serde_json::Value::Object(_)) => Some(value),
                Ok(_) => return Err(Error::invalid("outcome_json must be a JSON object")),
                Err(e) => return Err(Error::invalid(format!("outcome_json is not JSON: {e}"))),
            },
        };
        let error_code = match error_code.as_str() {
            "" => None,
            code if code.len() <= 64
                && code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                Some(code.to_owned())
            }
            _ => {
                return Err(Error::invalid(
                    "error_code must be up to 64 characters of letters, digits and _ - .",
                ));
            }
        };
        let new_record = match post_id.as_str() {
            "" => None,
            id => {
                let post_id = validate::post_id("post_id", id)?;
                let action = action_type_from_pb("action_type", action_type)?;
                let expected = Tier::of(action);
                if tier != expected.number() {
                    return Err(Error::invalid(format!(
                        "tier {tier} does not match action_type {} (tier {})",
                        action.as_str(),
                        expected.number()
                    )));
                }
                Some((post_id, action, expected))
            }
        };
        Ok(ActionOutcomeUpdate {
            idempotency_key,
            status,
            outcome,
            error_code,
            new_record,
            // The handler fills in the post window and the authenticated caller.
            key_window: chrono::Duration::zero(),
            actor: String::new(),
        })
    }
}

/// A ShouldRetry request, decoded: the key of the record to judge.
struct RetryQuestion {
    idempotency_key: String,
}

impl TryFrom<pb::ShouldRetryRequest> for RetryQuestion {
    type Error = Error;

    fn try_from(request: pb::ShouldRetryRequest) -> Result<Self, Error> {
        let pb::ShouldRetryRequest {
            idempotency_key: key,
        } = request;
        Ok(RetryQuestion {
            idempotency_key: idempotency_key(&key)?,
        })
    }
}

/// Where a page of a post's actions starts: the previous page's last
/// `(created_at, idempotency_key)`, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ActionCursor {
    created_at: chrono::DateTime<chrono::Utc>,
    idempotency_key: String,
}

impl PageCursor for ActionCursor {
    fn encode(&self) -> String {
        format!(
            "{}/{}",
            self.created_at.timestamp_micros(),
            self.idempotency_key
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let (micros, key) = text.split_once('/')?;
        Some(ActionCursor {
            created_at: chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            idempotency_key: idempotency_key(key).ok()?,
        })
    }
}

impl TryFrom<pb::ListActionsRequest> for Listing<String, ActionCursor> {
    type Error = Error;

    fn try_from(request: pb::ListActionsRequest) -> Result<Self, Error> {
        let pb::ListActionsRequest {
            post_id,
            page_size,
            page_token,
        } = request;
        Ok(Listing {
            query: validate::post_id("post_id", &post_id)?,
            page: PageRequest::decode(page_size, &page_token)?,
        })
    }
}

#[tonic::async_trait]
impl PostHealingService for PostHealingApi {
    async fn evaluate_post(
        &self,
        request: Request<pb::EvaluatePostRequest>,
    ) -> Result<Response<pb::EvaluatePostResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::EvaluatePost, None)?;
        let PostEvaluation {
            post_id,
            points,
            now,
            claim,
        } = request.into_inner().try_into()?;
        let lease = claim.then_some(self.config.claim_lease);
        let config = self.config;
        let id = post_id.clone();
        let evaluate = Box::new(move |now, history: &[post_healing::ActionRecord]| {
            post_healing::evaluate(&id, &points, history, now, &config)
        });
        let verdict = self
            .store
            .evaluate_post(&post_id, now, lease, &caller.name, evaluate)
            .await?;
        let evaluation = verdict.evaluation;
        let stagnation = evaluation.stagnation.as_ref();
        let proposed = evaluation.proposed();
        if let Some(claimed) = &verdict.claimed {
            self.count_action(claimed.record.status);
            tracing::info!(
                post_id = %post_id,
                key = %claimed.record.idempotency_key,
                action = claimed.record.action.as_str(),
                "post action claimed"
            );
        }
        Ok(Response::new(pb::EvaluatePostResponse {
            eligible: evaluation.eligible,
            ineligible_reason: evaluation.reason.map_or(0, ineligible_to_pb),
            reason: evaluation
                .reason
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default(),
            stagnation_score: stagnation.map_or(0.0, |s| s.score),
            engagement_rate: stagnation.map_or(0.0, |s| s.engagement_rate),
            tier: proposed.map_or(0, |s| s.tier.number()),
            action_type: proposed.map_or(0, |s| action_type_to_pb(s.action)),
            idempotency_key: evaluation.idempotency_key.clone().unwrap_or_default(),
            claimed: verdict.claimed.is_some(),
            action: verdict.claimed.as_ref().map(post_action_to_pb),
            sample_count: evaluation.samples as i64,
            impressions_gained: evaluation.impressions,
        }))
    }

    async fn record_action_outcome(
        &self,
        request: Request<pb::RecordActionOutcomeRequest>,
    ) -> Result<Response<pb::RecordActionOutcomeResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard
            .check(&caller, Action::RecordActionOutcome, None)?;
        let update = ActionOutcomeUpdate {
            key_window: self.config.window,
            actor: caller.name.clone(),
            ..ActionOutcomeUpdate::try_from(request.into_inner())?
        };
        let (action, created) = self.store.record_action_outcome(update).await?;
        if created || action.record.status != crate::domain::post_healing::ActionStatus::Running {
            self.count_action(action.record.status);
        }
        Ok(Response::new(pb::RecordActionOutcomeResponse {
            action: Some(post_action_to_pb(&action)),
            created,
        }))
    }

    async fn should_retry(
        &self,
        request: Request<pb::ShouldRetryRequest>,
    ) -> Result<Response<pb::ShouldRetryResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ShouldRetry, None)?;
        let RetryQuestion { idempotency_key } = request.into_inner().try_into()?;
        let (stored, now) = self.store.get_action(&idempotency_key).await?;
        let decision = with_rng(&self.rng, |rng| {
            post_healing::should_retry(&stored.record, now, &self.config, rng)
        });
        Ok(Response::new(pb::ShouldRetryResponse {
            retry: decision.retry,
            reason: decision.reason,
            not_before: decision.not_before.map(timestamp),
            attempts: stored.record.attempts,
        }))
    }

    async fn list_actions(
        &self,
        request: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ListActions, None)?;
        let Listing {
            query: post_id,
            page,
        } = request.into_inner().try_into()?;
        let before = page
            .after
            .clone()
            .map(|c| (c.created_at, c.idempotency_key));
        let mut actions = self
            .store
            .list_actions(&post_id, before, page.fetch_limit())
            .await?;
        let next_page_token = page.finish(&mut actions, |a| ActionCursor {
            created_at: a.record.created_at,
            idempotency_key: a.record.idempotency_key.clone(),
        });
        Ok(Response::new(pb::ListActionsResponse {
            actions: actions.iter().map(post_action_to_pb).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_enum_has_a_wire_twin() {
        for t in ErrorType::ALL {
            let wire = error_type_to_pb(t);
            assert_ne!(wire, 0, "{t:?}");
            assert_eq!(error_type_from_pb("t", wire).unwrap(), Some(t));
        }
        for s in Strategy::ALL {
            assert_ne!(strategy_to_pb(s), 0, "{s:?}");
        }
        for s in [
            RecoveryStatus::Active,
            RecoveryStatus::Succeeded,
            RecoveryStatus::Failed,
            RecoveryStatus::Expired,
        ] {
            assert_eq!(
                recovery_status_from_pb("status", recovery_status_to_pb(s)).unwrap(),
                Some(s)
            );
        }
        assert!(error_type_from_pb("t", 99).is_err());
        let reasons: std::collections::BTreeSet<i32> =
            Ineligible::ALL.into_iter().map(ineligible_to_pb).collect();
        assert_eq!(reasons.len(), Ineligible::ALL.len());
        assert!(!reasons.contains(&0), "0 means eligible");
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let key = post_healing::idempotency_key("p1", ActionType::Thread, Tier::Tier3);
        assert_eq!(idempotency_key(&key).unwrap(), key);
        for window in [0, 5461, -3, i64::MAX, i64::MIN] {
            let key = post_healing::window_key("p1", ActionType::Thread, Tier::Tier3, window);
            assert_eq!(idempotency_key(&key).unwrap(), key);
        }
        let hex = "0123456789abcdef0123456789abcdef";
        let windowed = ["x", "+5", "05", "-0", "5_", "99999999999999999999"]
            .map(|window| format!("shealw_{window}_{hex}"));
        let bad = [
            "",
            "sheal_",
            "sheal_XYZ",
            "other_0123456789abcdef0123456789abcdef",
            "shealw_",
            "shealw_0123456789abcdef0123456789abcdef",
            &format!("shealw_5_{}", hex.to_uppercase()),
        ];
        for bad in bad.into_iter().chain(windowed.iter().map(String::as_str)) {
            assert!(idempotency_key(bad).is_err(), "{bad}");
        }
    }
}
