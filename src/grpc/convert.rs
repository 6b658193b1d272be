//! Conversions between the domain and the wire.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::domain::agent::{AgentStatus, Cause, ExhaustionReason, SlotType};
use crate::domain::quota::Window;
use crate::domain::recovery::RecoverySource;
use crate::domain::transition::{Agent, Claim, Transition};
use crate::error::{Error, Result};
use crate::proto::v1 as pb;

pub use crate::proto::timestamp;

/// Decodes a client's timestamp, limited to years 1 to 9999 (RFC 3339, and what
/// every client library can represent; see [`crate::proto::from_timestamp`]).
pub fn from_timestamp(field: &str, ts: Timestamp) -> Result<DateTime<Utc>> {
    crate::proto::from_timestamp(ts).ok_or_else(|| {
        Error::invalid(format!(
            "{field} is not a valid timestamp between years 1 and 9999"
        ))
    })
}

pub fn duration(d: chrono::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

/// Decodes a client's duration: not negative, at most 10 years.
pub fn from_duration(field: &str, d: prost_types::Duration) -> Result<chrono::Duration> {
    const MAX_SECONDS: i64 = 10 * 366 * 24 * 3600;
    let valid = (0..=MAX_SECONDS).contains(&d.seconds) && (0..1_000_000_000).contains(&d.nanos);
    if !valid {
        return Err(Error::invalid(format!(
            "{field} must be between 0 and 10 years"
        )));
    }
    Ok(chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(i64::from(d.nanos)))
}

pub fn status_to_pb(status: AgentStatus) -> pb::AgentStatus {
    match status {
        AgentStatus::Idle => pb::AgentStatus::Idle,
        AgentStatus::Busy => pb::AgentStatus::Busy,
        AgentStatus::OnCall => pb::AgentStatus::OnCall,
        AgentStatus::Offline => pb::AgentStatus::Offline,
        AgentStatus::Exhausted => pb::AgentStatus::Exhausted,
    }
}

pub fn status_from_pb(field: &str, value: i32) -> Result<AgentStatus> {
    match pb::AgentStatus::try_from(value) {
        Ok(pb::AgentStatus::Idle) => Ok(AgentStatus::Idle),
        Ok(pb::AgentStatus::Busy) => Ok(AgentStatus::Busy),
        Ok(pb::AgentStatus::OnCall) => Ok(AgentStatus::OnCall),
        Ok(pb::AgentStatus::Offline) => Ok(AgentStatus::Offline),
        Ok(pb::AgentStatus::Exhausted) => Ok(AgentStatus::Exhausted),
        Ok(pb::AgentStatus::Unspecified) | Err(_) => Err(Error::invalid(format!(
            "{field} has an unknown status {value}"
        ))),
    }
}

pub fn slot_from_pb(value: i32) -> Result<SlotType> {
    match pb::SlotType::try_from(value) {
        Ok(pb::SlotType::Work) => Ok(SlotType::Work),
        Ok(pb::SlotType::OnCall) => Ok(SlotType::OnCall),
        Ok(pb::SlotType::Unspecified) | Err(_) => Err(Error::invalid(
            "slot_type must be SLOT_TYPE_WORK or SLOT_TYPE_ON_CALL",
        )),
    }
}

pub fn reason_from_pb(value: i32) -> Result<ExhaustionReason> {
    match pb::ExhaustionReason::try_from(value) {
        Ok(pb::ExhaustionReason::RateLimit) => Ok(ExhaustionReason::RateLimit),
        Ok(pb::ExhaustionReason::Billing) => Ok(ExhaustionReason::Billing),
        Ok(pb::ExhaustionReason::Unspecified) | Err(_) => Err(Error::invalid(
            "reason must be EXHAUSTION_REASON_RATE_LIMIT or EXHAUSTION_REASON_BILLING",
        )),
    }
}

/// A window the caller states in `field`: `None` for UNSPECIFIED (infer
/// it); a value the proto does not define is refused naming the field.
pub fn window_from_pb(field: &str, value: i32) -> Result<Option<Window>> {
    let window = match pb::QuotaWindow::try_from(value) {
        Ok(pb::QuotaWindow::Unspecified) => return Ok(None),
        Ok(pb::QuotaWindow::FiveHour) => Window::FiveHour,
        Ok(pb::QuotaWindow::Weekly) => Window::Weekly,
        Ok(pb::QuotaWindow::Requests) => Window::Requests,
        Ok(pb::QuotaWindow::Tokens) => Window::Tokens,
        Ok(pb::QuotaWindow::Billing) => Window::Billing,
        Ok(pb::QuotaWindow::Other) => Window::Other,
        Err(_) => {
            return Err(Error::invalid(format!(
                "{field} {value} is not a QuotaWindow"
            )));
        }
    };
    Ok(Some(window))
}

pub fn window_to_pb(window: Window) -> pb::QuotaWindow {
    match window {
        Window::FiveHour => pb::QuotaWindow::FiveHour,
        Window::Weekly => pb::QuotaWindow::Weekly,
        Window::Requests => pb::QuotaWindow::Requests,
        Window::Tokens => pb::QuotaWindow::Tokens,
        Window::Billing => pb::QuotaWindow::Billing,
        Window::Other => pb::QuotaWindow::Other,
    }
}

pub fn reason_to_pb(reason: ExhaustionReason) -> pb::ExhaustionReason {
    match reason {
        ExhaustionReason::RateLimit => pb::ExhaustionReason::RateLimit,
        ExhaustionReason::Billing => pb::ExhaustionReason::Billing,
    }
}

pub fn source_to_pb(source: RecoverySource) -> pb::RecoverySource {
    match source {
        RecoverySource::Explicit => pb::RecoverySource::Explicit,
        RecoverySource::RetryAfterHeader => pb::RecoverySource::RetryAfterHeader,
        RecoverySource::ProviderResetHeader => pb::RecoverySource::ProviderResetHeader,
        RecoverySource::Message => pb::RecoverySource::Message,
        RecoverySource::Default => pb::RecoverySource::Default,
    }
}

fn cause_to_pb(cause: Cause) -> pb::TransitionCause {
    match cause {
        Cause::Registered => pb::TransitionCause::Registered,
        Cause::WorkStarted => pb::TransitionCause::WorkStarted,
        Cause::WorkFinished => pb::TransitionCause::WorkFinished,
        Cause::HeartbeatResumed => pb::TransitionCause::HeartbeatResumed,
        Cause::HeartbeatTimeout => pb::TransitionCause::HeartbeatTimeout,
        Cause::Exhausted => pb::TransitionCause::Exhausted,
        Cause::Recovered => pb::TransitionCause::Recovered,
        Cause::MarkedOffline => pb::TransitionCause::MarkedOffline,
        Cause::Resumed => pb::TransitionCause::Resumed,
        Cause::Cordoned => pb::TransitionCause::Cordoned,
        Cause::Uncordoned => pb::TransitionCause::Uncordoned,
        Cause::Claimed => pb::TransitionCause::Claimed,
        Cause::ClaimReleased => pb::TransitionCause::ClaimReleased,
        Cause::ClaimExpired => pb::TransitionCause::ClaimExpired,
        Cause::Deleted => pb::TransitionCause::Deleted,
        Cause::Expired => pb::TransitionCause::Expired,
        Cause::PoolExhausted => pb::TransitionCause::PoolExhausted,
        Cause::PoolReleased => pb::TransitionCause::PoolReleased,
    }
}

impl From<&Agent> for pb::Agent {
    fn from(agent: &Agent) -> pb::Agent {
        let exhaustion = agent.state.exhaustion.as_ref();
        pb::Agent {
            agent_id: agent.agent_id.clone(),
            status: status_to_pb(agent.state.status) as i32,
            labels: agent.labels.clone().into_iter().collect(),
            registered_at: Some(timestamp(agent.registered_at)),
            last_heartbeat_at: Some(timestamp(agent.state.last_heartbeat_at)),
            last_transition_at: Some(timestamp(agent.last_transition_at)),
            revision: agent.revision,
            exhaustion_reason: exhaustion.map_or(0, |e| reason_to_pb(e.reason) as i32),
            recovery_at: exhaustion.map(|e| timestamp(e.recovery.recovery_at)),
            recovery_source: exhaustion.map_or(0, |e| source_to_pb(e.recovery.source) as i32),
            recovery_hint: exhaustion
                .map(|e| e.recovery.hint.clone())
                .unwrap_or_default(),
            schedulable: agent.cordon_reason.is_none(),
            cordon_reason: agent.cordon_reason.clone().unwrap_or_default(),
            claim: agent.claim.as_ref().map(Into::into),
            quota_pools: agent
                .quota_pools
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            held_by_pools: agent
                .pool_holds
                .holding()
                .map(|p| p.as_str().to_owned())
                .collect(),
        }
    }
}

pub fn slot_to_pb(slot: SlotType) -> pb::SlotType {
    match slot {
        SlotType::Work => pb::SlotType::Work,
        SlotType::OnCall => pb::SlotType::OnCall,
    }
}

impl From<&Claim> for pb::Claim {
    fn from(claim: &Claim) -> pb::Claim {
        pb::Claim {
            claim_id: claim.claim_id.clone(),
            agent_id: claim.agent_id.clone(),
            fencing_token: claim.fencing_token,
            slot_type: slot_to_pb(claim.slot_type) as i32,
            holder: claim.holder.clone(),
            claimed_at: Some(timestamp(claim.claimed_at)),
            lease_expires_at: Some(timestamp(claim.lease_expires_at)),
            request_id: claim.request_id.clone(),
        }
    }
}

impl From<&Transition> for pb::Transition {
    fn from(t: &Transition) -> pb::Transition {
        pb::Transition {
            revision: t.revision,
            agent_id: t.agent_id.clone(),
            from_status: t.from.map_or(0, |s| status_to_pb(s) as i32),
            to_status: status_to_pb(t.to) as i32,
            cause: cause_to_pb(t.cause) as i32,
            occurred_at: Some(timestamp(t.occurred_at)),
            exhaustion_reason: t.exhaustion_reason.map_or(0, |r| reason_to_pb(r) as i32),
            recovery_at: t.recovery_at.map(timestamp),
            actor: t.actor.clone(),
            quota_pool: t
                .quota_pool
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_out_of_range_ones_are_rejected() {
        let at = DateTime::parse_from_rfc3339("2026-04-01T10:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(from_timestamp("t", timestamp(at)).unwrap(), at);
        for bad in [
            Timestamp {
                seconds: 0,
                nanos: -1,
            },
            Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            },
            Timestamp {
                seconds: 253_402_300_800,
                nanos: 0,
            }, // year 10000
            Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
        ] {
            let err = from_timestamp("recovery_at", bad).unwrap_err().to_string();
            assert!(err.contains("recovery_at"), "{err}");
        }
    }
}
