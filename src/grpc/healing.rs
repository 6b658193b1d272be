//! `fleetcare.v1.HealingService` and `fleetcare.v1.PostHealingService`.

use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tonic::{Request, Response, Status};

use crate::domain::healing::{self, ErrorType, PlanInput, PlannerConfig, Strategy};
use crate::domain::healing_records::{
    ErrorEvent, NewErrorEvent, RecoveryAction, RecoveryOutcome, RecoveryStatus, StoredAction,
};
use crate::domain::post_healing::{
    self, ActionStatus, ActionType, Ineligible, MetricPoint, PostHealingConfig, Tier,
};
use crate::error::Error;
use crate::grpc::convert::{duration, from_duration, from_timestamp, timestamp};
use crate::grpc::validate;
use crate::proto::v1 as pb;
use crate::proto::v1::healing_service_server::HealingService;
use crate::proto::v1::post_healing_service_server::PostHealingService;
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

// Domain enums and their wire twins share spellings after the wire's prefix.

fn error_type_to_pb(t: ErrorType) -> i32 {
    pb::ErrorType::from_str_name(&format!("ERROR_TYPE_{}", t.as_str())).map_or(0, |v| v as i32)
}

fn error_type_from_pb(field: &str, value: i32) -> Result<Option<ErrorType>, Error> {
    match pb::ErrorType::try_from(value) {
        Ok(pb::ErrorType::Unspecified) => Ok(None),
        Ok(t) => Ok(t
            .as_str_name()
            .strip_prefix("ERROR_TYPE_")
            .and_then(ErrorType::parse)),
        Err(_) => Err(Error::invalid(format!(
            "{field} {value} is not an error type"
        ))),
    }
}

fn strategy_to_pb(s: Strategy) -> i32 {
    pb::RecoveryStrategy::from_str_name(&format!("RECOVERY_STRATEGY_{}", s.as_str()))
        .map_or(0, |v| v as i32)
}

fn recovery_status_to_pb(s: RecoveryStatus) -> i32 {
    pb::RecoveryStatus::from_str_name(&format!("RECOVERY_STATUS_{}", s.as_str()))
        .map_or(0, |v| v as i32)
}

fn recovery_status_from_pb(value: i32) -> Result<Option<RecoveryStatus>, Error> {
    match pb::RecoveryStatus::try_from(value) {
        Ok(pb::RecoveryStatus::Unspecified) => Ok(None),
        Ok(s) => Ok(s
            .as_str_name()
            .strip_prefix("RECOVERY_STATUS_")
            .and_then(RecoveryStatus::parse)),
        Err(_) => Err(Error::invalid(format!(
            "status {value} is not a recovery status"
        ))),
    }
}

fn action_type_to_pb(a: ActionType) -> i32 {
    match a {
        ActionType::Comment => pb::PostActionType::Comment as i32,
        ActionType::Edit => pb::PostActionType::Edit as i32,
        ActionType::Thread => pb::PostActionType::Thread as i32,
    }
}

fn action_type_from_pb(value: i32) -> Result<ActionType, Error> {
    match pb::PostActionType::try_from(value) {
        Ok(pb::PostActionType::Comment) => Ok(ActionType::Comment),
        Ok(pb::PostActionType::Edit) => Ok(ActionType::Edit),
        Ok(pb::PostActionType::Thread) => Ok(ActionType::Thread),
        Ok(pb::PostActionType::Unspecified) | Err(_) => Err(Error::invalid(
            "action_type must be POST_ACTION_TYPE_COMMENT, _EDIT or _THREAD",
        )),
    }
}

fn action_status_to_pb(s: ActionStatus) -> i32 {
    match s {
        ActionStatus::Running => pb::PostActionStatus::Running as i32,
        ActionStatus::Succeeded => pb::PostActionStatus::Succeeded as i32,
        ActionStatus::Failed => pb::PostActionStatus::Failed as i32,
    }
}

fn action_status_from_pb(value: i32) -> Result<ActionStatus, Error> {
    match pb::PostActionStatus::try_from(value) {
        Ok(pb::PostActionStatus::Running) => Ok(ActionStatus::Running),
        Ok(pb::PostActionStatus::Succeeded) => Ok(ActionStatus::Succeeded),
        Ok(pb::PostActionStatus::Failed) => Ok(ActionStatus::Failed),
        Ok(pb::PostActionStatus::Unspecified) | Err(_) => Err(Error::invalid(
            "status must be POST_ACTION_STATUS_RUNNING, _SUCCEEDED or _FAILED",
        )),
    }
}

fn ineligible_to_pb(reason: Ineligible) -> i32 {
    match reason {
        Ineligible::InsufficientSamples => pb::IneligibleReason::InsufficientSamples as i32,
        Ineligible::DuplicateAction => pb::IneligibleReason::DuplicateAction as i32,
        Ineligible::WindowFrequencyExceeded => pb::IneligibleReason::WindowFrequencyExceeded as i32,
        Ineligible::ActionCooldownActive => pb::IneligibleReason::ActionCooldownActive as i32,
    }
}

fn event_to_pb(e: &ErrorEvent) -> pb::ErrorEvent {
    pb::ErrorEvent {
        id: e.id,
        agent_id: e.agent_id.clone(),
        message: e.message.clone(),
        context: e.context.clone().into_iter().collect(),
        error_type: error_type_to_pb(e.error_type),
        severity: e.severity,
        critical: e.critical,
        recurring: e.recurring,
        occurred_at: Some(timestamp(e.occurred_at)),
    }
}

fn action_to_pb(a: &RecoveryAction) -> pb::RecoveryAction {
    pb::RecoveryAction {
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
    }
}

fn next_token<T>(items: &mut Vec<T>, limit: i64, last: impl Fn(&T) -> String) -> String {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items
            .last()
            .map(|item| validate::encode_page_token(&last(item)))
            .unwrap_or_default()
    } else {
        String::new()
    }
}

/// Settings of the agent-healing handlers.
#[derive(Debug, Clone)]
pub struct HealingSettings {
    pub planner: PlannerConfig,
    pub recovery_lease: chrono::Duration,
}

pub struct HealingApi {
    store: Arc<dyn HealingStore>,
    settings: HealingSettings,
    rng: SharedRng,
}

impl HealingApi {
    pub fn new(store: Arc<dyn HealingStore>, settings: HealingSettings, rng: SharedRng) -> Self {
        HealingApi {
            store,
            settings,
            rng,
        }
    }
}

#[tonic::async_trait]
impl HealingService for HealingApi {
    async fn report_error(
        &self,
        request: Request<pb::ReportErrorRequest>,
    ) -> Result<Response<pb::ReportErrorResponse>, Status> {
        let pb::ReportErrorRequest {
            agent_id,
            message,
            context,
            error_type_hint,
        } = request.into_inner();
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        if message.trim().is_empty() {
            return Err(Error::invalid("message is required").into());
        }
        validate::bounded_text("message", &message, validate::MAX_MESSAGE_BYTES)?;
        let context = validate::context("context", context)?;
        let hint = error_type_from_pb("error_type_hint", error_type_hint)?;
        let error_type = healing::classify(&message, hint);
        let severity = healing::severity(error_type, &context);
        let event = self
            .store
            .record_error(NewErrorEvent {
                agent_id,
                message,
                context,
                error_type,
                severity,
            })
            .await?;
        Ok(Response::new(pb::ReportErrorResponse {
            event: Some(event_to_pb(&event)),
        }))
    }

    async fn plan_recovery(
        &self,
        request: Request<pb::PlanRecoveryRequest>,
    ) -> Result<Response<pb::PlanRecoveryResponse>, Status> {
        let pb::PlanRecoveryRequest { error_event_id } = request.into_inner();
        if error_event_id <= 0 {
            return Err(Error::invalid("error_event_id must be positive").into());
        }
        let config = self.settings.planner;
        let rng = self.rng.clone();
        let planner = Box::new(move |event: &ErrorEvent, evidence: &[healing::Evidence]| {
            let input = PlanInput {
                error_type: event.error_type,
                critical: event.critical,
                recurring: event.recurring,
                evidence,
            };
            with_rng(&rng, |rng| healing::plan(&input, &config, rng))
        });
        let action = self
            .store
            .plan_recovery(error_event_id, self.settings.recovery_lease, planner)
            .await?;
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
        let pb::ReportRecoveryOutcomeRequest {
            action_id,
            success,
            duration,
            details,
        } = request.into_inner();
        if action_id <= 0 {
            return Err(Error::invalid("action_id must be positive").into());
        }
        let duration = match duration {
            Some(d) => from_duration("duration", d)?,
            None => chrono::Duration::zero(),
        };
        validate::bounded_text("details", &details, validate::MAX_MESSAGE_BYTES)?;
        let outcome = RecoveryOutcome {
            success,
            duration,
            details,
        };
        let action = self
            .store
            .record_recovery_outcome(action_id, outcome)
            .await?;
        Ok(Response::new(pb::ReportRecoveryOutcomeResponse {
            action: Some(action_to_pb(&action)),
        }))
    }

    async fn get_healing_statistics(
        &self,
        _request: Request<pb::GetHealingStatisticsRequest>,
    ) -> Result<Response<pb::GetHealingStatisticsResponse>, Status> {
        let stats = self.store.healing_statistics().await?;
        Ok(Response::new(pb::GetHealingStatisticsResponse {
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
        }))
    }

    async fn list_error_events(
        &self,
        request: Request<pb::ListErrorEventsRequest>,
    ) -> Result<Response<pb::ListErrorEventsResponse>, Status> {
        let pb::ListErrorEventsRequest {
            agent_id,
            error_type,
            page_size,
            page_token,
        } = request.into_inner();
        let limit = validate::page_size(page_size)?;
        let query = ErrorEventQuery {
            agent_id: optional_agent(&agent_id)?,
            error_type: error_type_from_pb("error_type", error_type)?,
            before_id: validate::decode_id_token(&page_token)?,
            limit: limit + 1,
        };
        let mut events = self.store.list_error_events(&query).await?;
        let next_page_token = next_token(&mut events, limit, |e| e.id.to_string());
        Ok(Response::new(pb::ListErrorEventsResponse {
            events: events.iter().map(event_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn list_recovery_actions(
        &self,
        request: Request<pb::ListRecoveryActionsRequest>,
    ) -> Result<Response<pb::ListRecoveryActionsResponse>, Status> {
        let pb::ListRecoveryActionsRequest {
            agent_id,
            error_type,
            status,
            page_size,
            page_token,
        } = request.into_inner();
        let limit = validate::page_size(page_size)?;
        let query = RecoveryActionQuery {
            agent_id: optional_agent(&agent_id)?,
            error_type: error_type_from_pb("error_type", error_type)?,
            status: recovery_status_from_pb(status)?,
            before_id: validate::decode_id_token(&page_token)?,
            limit: limit + 1,
        };
        let mut actions = self.store.list_recovery_actions(&query).await?;
        let next_page_token = next_token(&mut actions, limit, |a| a.id.to_string());
        Ok(Response::new(pb::ListRecoveryActionsResponse {
            actions: actions.iter().map(action_to_pb).collect(),
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
}

impl PostHealingApi {
    pub fn new(
        store: Arc<dyn PostHealingStore>,
        config: PostHealingConfig,
        rng: SharedRng,
    ) -> Self {
        PostHealingApi { store, config, rng }
    }
}

/// `sheal_` followed by 32 lowercase hex characters.
fn idempotency_key(key: &str) -> Result<String, Error> {
    let ok = key.strip_prefix("sheal_").is_some_and(|hex| {
        hex.len() == 32 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
    });
    if ok {
        Ok(key.to_owned())
    } else {
        Err(Error::invalid(
            "idempotency_key must be \"sheal_\" followed by 32 lowercase hex characters",
        ))
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

/// The seed's fixed tier of each action.
fn tier_of(action: ActionType) -> Tier {
    match action {
        ActionType::Comment => Tier::Tier1,
        ActionType::Edit => Tier::Tier2,
        ActionType::Thread => Tier::Tier3,
    }
}

#[tonic::async_trait]
impl PostHealingService for PostHealingApi {
    async fn evaluate_post(
        &self,
        request: Request<pb::EvaluatePostRequest>,
    ) -> Result<Response<pb::EvaluatePostResponse>, Status> {
        let pb::EvaluatePostRequest {
            post_id,
            points,
            now,
            claim,
        } = request.into_inner();
        let post_id = validate::post_id("post_id", &post_id)?;
        let points = metric_points(points)?;
        let now = now.map(|ts| from_timestamp("now", ts)).transpose()?;
        let lease = claim.then_some(self.config.claim_lease);
        let config = self.config;
        let id = post_id.clone();
        let evaluate = Box::new(move |now, history: &[post_healing::ActionRecord]| {
            post_healing::evaluate(&id, &points, history, now, &config)
        });
        let verdict = self
            .store
            .evaluate_post(&post_id, now, lease, evaluate)
            .await?;
        let evaluation = verdict.evaluation;
        let stagnation = evaluation.stagnation.as_ref();
        if let Some(claimed) = &verdict.claimed {
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
            tier: stagnation.map_or(0, |s| s.tier.number()),
            action_type: stagnation.map_or(0, |s| action_type_to_pb(s.action)),
            idempotency_key: evaluation.idempotency_key.clone().unwrap_or_default(),
            claimed: verdict.claimed.is_some(),
            action: verdict.claimed.as_ref().map(post_action_to_pb),
        }))
    }

    async fn record_action_outcome(
        &self,
        request: Request<pb::RecordActionOutcomeRequest>,
    ) -> Result<Response<pb::RecordActionOutcomeResponse>, Status> {
        let pb::RecordActionOutcomeRequest {
            idempotency_key: key,
            status,
            outcome_json,
            error_code,
            post_id,
            action_type,
            tier,
        } = request.into_inner();
        let key = idempotency_key(&key)?;
        let status = action_status_from_pb(status)?;
        validate::bounded_text("outcome_json", &outcome_json, validate::MAX_MESSAGE_BYTES)?;
        let outcome = match outcome_json.trim() {
            "" => None,
            text => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value @ serde_json::Value::Object(_)) => Some(value),
                Ok(_) => return Err(Error::invalid("outcome_json must be a JSON object").into()),
                Err(e) => {
                    return Err(Error::invalid(format!("outcome_json is not JSON: {e}")).into());
                }
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
                )
                .into());
            }
        };
        let new_record = match post_id.as_str() {
            "" => None,
            id => {
                let post_id = validate::post_id("post_id", id)?;
                let action = action_type_from_pb(action_type)?;
                let expected = tier_of(action);
                if tier != expected.number() {
                    return Err(Error::invalid(format!(
                        "tier {tier} does not match action_type {} (tier {})",
                        action.as_str(),
                        expected.number()
                    ))
                    .into());
                }
                Some((post_id, action, expected))
            }
        };
        let (action, created) = self
            .store
            .record_action_outcome(ActionOutcomeUpdate {
                idempotency_key: key,
                status,
                outcome,
                error_code,
                new_record,
            })
            .await?;
        Ok(Response::new(pb::RecordActionOutcomeResponse {
            action: Some(post_action_to_pb(&action)),
            created,
        }))
    }

    async fn should_retry(
        &self,
        request: Request<pb::ShouldRetryRequest>,
    ) -> Result<Response<pb::ShouldRetryResponse>, Status> {
        let pb::ShouldRetryRequest {
            idempotency_key: key,
        } = request.into_inner();
        let key = idempotency_key(&key)?;
        let (stored, now) = self.store.get_action(&key).await?;
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
        let pb::ListActionsRequest {
            post_id,
            page_size,
            page_token,
        } = request.into_inner();
        let post_id = validate::post_id("post_id", &post_id)?;
        let limit = validate::page_size(page_size)?;
        let before = match validate::decode_page_token(&page_token)? {
            None => None,
            Some(token) => {
                let bad = || Error::invalid("page_token is not one this server issued");
                let (micros, key) = token.split_once('/').ok_or_else(bad)?;
                let micros: i64 = micros.parse().map_err(|_| bad())?;
                let at = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
                Some((at, idempotency_key(key)?))
            }
        };
        let mut actions = self.store.list_actions(&post_id, before, limit + 1).await?;
        let next_page_token = next_token(&mut actions, limit, |a| {
            format!(
                "{}/{}",
                a.record.created_at.timestamp_micros(),
                a.record.idempotency_key
            )
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
                recovery_status_from_pb(recovery_status_to_pb(s)).unwrap(),
                Some(s)
            );
        }
        assert!(error_type_from_pb("t", 99).is_err());
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let key = post_healing::idempotency_key("p1", ActionType::Thread, Tier::Tier3);
        assert_eq!(idempotency_key(&key).unwrap(), key);
        for bad in [
            "",
            "sheal_",
            "sheal_XYZ",
            "other_0123456789abcdef0123456789abcdef",
        ] {
            assert!(idempotency_key(bad).is_err(), "{bad}");
        }
    }
}
