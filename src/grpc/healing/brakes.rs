//! The remediation brakes on the wire: the policy and where its brakes stand
//! (`GetHealingPolicy`), pauses, and the decisions `ListHealingDecisions`
//! pages through.

use crate::domain::brakes::{
    BrakeStatus, Breaker, Census, Decision, HealingPolicy, Numbers, Pause, Scope, ScopeRefused,
    Share, Verdict,
};
use crate::error::Error;
use crate::grpc::convert::{duration, timestamp};
use crate::grpc::validate::PageRequest;
use crate::proto::v1 as pb;
use crate::storage::DecisionQuery;

use super::{Listing, error_type_to_pb, optional_agent, strategy_to_pb, unknown_value};

pub(super) fn policy_to_pb(p: &HealingPolicy) -> pb::HealingPolicy {
    pb::HealingPolicy {
        max_unhealthy_percent: p.max_unhealthy_percent,
        min_unhealthy: p.min_unhealthy,
        group_by: p.group_by.clone().unwrap_or_default(),
        max_plans_per_minute: p.max_plans_per_minute,
        max_group_plans_per_minute: p.max_group_plans_per_minute,
        retry_budget: p.retry_budget,
        retry_window: Some(duration(p.retry_window)),
        min_healthy_period: Some(duration(p.min_healthy_period)),
        breaker_failures: p.breaker_failures,
        breaker_cooldown: Some(duration(p.breaker_cooldown)),
        dry_run: p.dry_run,
        brakes: p.brakes,
    }
}

fn group_of(scope: &Scope) -> String {
    match scope {
        Scope::Fleet => String::new(),
        Scope::Group(g) => g.clone(),
    }
}

pub(super) fn pause_to_pb(p: &Pause) -> pb::HealingPause {
    pb::HealingPause {
        group: group_of(&p.scope),
        reason: p.reason.clone(),
        paused_by: p.by.clone(),
        paused_at: Some(timestamp(p.at)),
    }
}

fn share_to_pb(group: String, census: Census, allowed: u32) -> pb::HealingShare {
    pb::HealingShare {
        group,
        counted: census.counted,
        unhealthy: census.unhealthy,
        allowed,
    }
}

pub(super) fn status_to_pb(status: &BrakeStatus) -> pb::GetHealingPolicyResponse {
    let policy = &status.policy;
    pb::GetHealingPolicyResponse {
        policy: Some(policy_to_pb(policy)),
        pauses: status.pauses.iter().map(pause_to_pb).collect(),
        open_breakers: status
            .breakers
            .iter()
            .map(|(error_type, strategy, breaker)| {
                let (state, since) = match *breaker {
                    Breaker::Open { since } => (pb::BreakerState::Open, Some(since)),
                    Breaker::HalfOpen { trial_at } => (pb::BreakerState::HalfOpen, Some(trial_at)),
                    Breaker::Closed { .. } => (pb::BreakerState::Closed, None),
                };
                pb::HealingBreaker {
                    error_type: error_type_to_pb(*error_type),
                    strategy: strategy_to_pb(*strategy),
                    state: state as i32,
                    since: since.map(timestamp),
                    retry_at: since.map(|s| timestamp(s + policy.breaker_cooldown)),
                }
            })
            .collect(),
        shares: status
            .shares
            .iter()
            .map(
                |Share {
                     scope,
                     census,
                     allowed,
                 }| share_to_pb(group_of(scope), *census, *allowed),
            )
            .collect(),
        spent_budgets: status
            .spent
            .iter()
            .map(|(agent_id, plans)| pb::SpentBudget {
                agent_id: agent_id.clone(),
                plans: *plans,
            })
            .collect(),
        as_of: Some(timestamp(status.at)),
    }
}

fn verdict_to_pb(v: Verdict) -> pb::HealingVerdict {
    match v {
        Verdict::Planned => pb::HealingVerdict::Planned,
        Verdict::DryRun => pb::HealingVerdict::DryRun,
        Verdict::Braked => pb::HealingVerdict::Braked,
    }
}

fn verdict_from_pb(field: &str, value: i32) -> Result<Option<Verdict>, Error> {
    match pb::HealingVerdict::try_from(value) {
        Ok(pb::HealingVerdict::Unspecified) => Ok(None),
        Ok(pb::HealingVerdict::Planned) => Ok(Some(Verdict::Planned)),
        Ok(pb::HealingVerdict::DryRun) => Ok(Some(Verdict::DryRun)),
        Ok(pb::HealingVerdict::Braked) => Ok(Some(Verdict::Braked)),
        Err(_) => Err(unknown_value(field, value, "healing verdict")),
    }
}

pub(super) fn decision_to_pb(d: &Decision, policy: &HealingPolicy) -> pb::HealingDecision {
    let Numbers {
        fleet,
        group,
        group_census,
        fleet_plans_last_minute,
        group_plans_last_minute,
        agent_plans_in_window,
    } = &d.numbers;
    let allowed = |c: Census| crate::domain::brakes::allowed_unhealthy(policy, c.counted);
    pb::HealingDecision {
        id: d.id,
        error_event_id: d.error_event_id,
        agent_id: d.agent_id.clone(),
        decided_at: Some(timestamp(d.decided_at)),
        verdict: verdict_to_pb(d.verdict) as i32,
        reason: d.reason.clone().unwrap_or_default(),
        message: d.message.clone(),
        strategy: d.strategy.map(strategy_to_pb).unwrap_or_default(),
        recovery_action_id: d.recovery_action_id.unwrap_or_default(),
        // Counted only when the cheaper brakes passed (the agent itself
        // makes a counted fleet at least one).
        fleet: (fleet.counted > 0).then(|| share_to_pb(String::new(), *fleet, allowed(*fleet))),
        group: group
            .as_ref()
            .filter(|_| group_census.counted > 0)
            .map(|g| share_to_pb(g.clone(), *group_census, allowed(*group_census))),
        fleet_plans_last_minute: *fleet_plans_last_minute,
        group_plans_last_minute: *group_plans_last_minute,
        agent_plans_in_window: *agent_plans_in_window,
        actor: d.actor.clone(),
    }
}

impl TryFrom<pb::ListHealingDecisionsRequest> for Listing<DecisionQuery, i64> {
    type Error = Error;

    fn try_from(request: pb::ListHealingDecisionsRequest) -> Result<Self, Error> {
        let pb::ListHealingDecisionsRequest {
            agent_id,
            error_event_id,
            verdict,
            page_size,
            page_token,
        } = request;
        let page = PageRequest::decode(page_size, &page_token)?;
        if error_event_id < 0 {
            return Err(Error::invalid(format!(
                "error_event_id must not be negative, got {error_event_id}"
            )));
        }
        let query = DecisionQuery {
            agent_id: optional_agent(&agent_id)?,
            error_event_id: (error_event_id > 0).then_some(error_event_id),
            verdict: verdict_from_pb("verdict", verdict)?,
            before_id: page.after,
            limit: page.fetch_limit(),
        };
        Ok(Listing { query, page })
    }
}

/// The scope a pause or resume names, under `policy`.
pub(super) fn scope(group: &str, policy: &HealingPolicy) -> Result<Scope, Error> {
    Scope::named(group, policy).map_err(|refused| match refused {
        ScopeRefused::Invalid(m) => Error::InvalidArgument(m),
        ScopeRefused::NoGroups(m) => Error::FailedPrecondition(m),
    })
}
