//! The protobuf messages as plain serializable structs, shared by the CLI
//! (`--json` writes them with serde, the tables read the same fields) and the
//! dashboard's JSON API (`http::api`). Enum values lose their proto
//! prefix (`AGENT_STATUS_IDLE` prints `IDLE`), times are RFC 3339 in UTC, and
//! unset optional fields are left out of the JSON.

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use serde::Serialize;

use crate::proto::from_timestamp;
use fleetcare_client::pb;

/// `AGENT_STATUS_IDLE` with prefix `AGENT_STATUS_` is `IDLE`; an unknown value
/// (a newer server) prints its number rather than failing.
fn enum_name(name: Option<&str>, prefix: &str, value: i32) -> String {
    match name {
        Some(name) => name.strip_prefix(prefix).unwrap_or(name).to_string(),
        None => value.to_string(),
    }
}

pub fn agent_status(value: i32) -> String {
    let name = pb::AgentStatus::try_from(value).ok();
    enum_name(name.map(|s| s.as_str_name()), "AGENT_STATUS_", value)
}

/// What a transition came from: a registration has no status before it
/// (`UNSPECIFIED` on the wire), spelled `NEW`.
pub const NEW: &str = "NEW";

fn from_status(value: i32) -> String {
    if value == pb::AgentStatus::Unspecified as i32 {
        return NEW.to_owned();
    }
    agent_status(value)
}

fn cause(value: i32) -> String {
    let name = pb::TransitionCause::try_from(value).ok();
    enum_name(name.map(|c| c.as_str_name()), "TRANSITION_CAUSE_", value)
}

/// Unspecified enum values mean "not set": left out.
fn optional_enum(value: i32, name: Option<&str>, prefix: &str) -> Option<String> {
    (value != 0).then(|| enum_name(name, prefix, value))
}

pub fn error_type(value: i32) -> String {
    let name = pb::ErrorType::try_from(value).ok();
    enum_name(name.map(|t| t.as_str_name()), "ERROR_TYPE_", value)
}

fn strategy(value: i32) -> String {
    let name = pb::RecoveryStrategy::try_from(value).ok();
    enum_name(name.map(|s| s.as_str_name()), "RECOVERY_STRATEGY_", value)
}

/// A time the server sent, or `None` when unset or not a valid timestamp.
pub fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let at = from_timestamp(*ts?)?;
    Some(at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn seconds(d: Option<&prost_types::Duration>) -> Option<f64> {
    d.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    pub agent_id: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub revision: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exhaustion_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_hint: Option<String>,
    /// False while cordoned (never claimed; status and work kept).
    pub schedulable: bool,
    /// The cordon's reason (maybe empty) while cordoned; absent while schedulable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cordon_reason: Option<String>,
    /// The agent's active claim; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimView>,
    /// The quota pools it shares limits with; absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quota_pools: Vec<String>,
    /// The quota pools holding it parked; absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_by_pools: Vec<String>,
}

impl From<&pb::Agent> for AgentView {
    fn from(a: &pb::Agent) -> AgentView {
        AgentView {
            agent_id: a.agent_id.clone(),
            status: agent_status(a.status),
            labels: a
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            revision: a.revision,
            registered_at: time(a.registered_at.as_ref()),
            last_heartbeat_at: time(a.last_heartbeat_at.as_ref()),
            last_transition_at: time(a.last_transition_at.as_ref()),
            exhaustion_reason: optional_enum(
                a.exhaustion_reason,
                pb::ExhaustionReason::try_from(a.exhaustion_reason)
                    .ok()
                    .map(|r| r.as_str_name()),
                "EXHAUSTION_REASON_",
            ),
            recovery_at: time(a.recovery_at.as_ref()),
            recovery_source: optional_enum(
                a.recovery_source,
                pb::RecoverySource::try_from(a.recovery_source)
                    .ok()
                    .map(|s| s.as_str_name()),
                "RECOVERY_SOURCE_",
            ),
            recovery_hint: (!a.recovery_hint.is_empty()).then(|| a.recovery_hint.clone()),
            schedulable: a.schedulable,
            cordon_reason: (!a.schedulable).then(|| a.cordon_reason.clone()),
            claim: a.claim.as_ref().map(ClaimView::from),
            quota_pools: a.quota_pools.clone(),
            held_by_pools: a.held_by_pools.clone(),
        }
    }
}

fn slot_type(value: i32) -> String {
    let name = pb::SlotType::try_from(value).ok();
    enum_name(name.map(|s| s.as_str_name()), "SLOT_TYPE_", value)
}

/// One active claim (`ListClaims`, and an agent's `claim`).
#[derive(Debug, Serialize)]
pub struct ClaimView {
    pub claim_id: String,
    pub agent_id: String,
    pub fencing_token: i64,
    /// `WORK` (the agent is BUSY) or `ON_CALL`.
    pub slot_type: String,
    /// The caller that made the claim.
    pub holder: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<String>,
    /// The idempotency key the claim was made with; absent when none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}

impl From<&pb::Claim> for ClaimView {
    fn from(c: &pb::Claim) -> ClaimView {
        ClaimView {
            claim_id: c.claim_id.clone(),
            agent_id: c.agent_id.clone(),
            fencing_token: c.fencing_token,
            slot_type: slot_type(c.slot_type),
            holder: c.holder.clone(),
            claimed_at: time(c.claimed_at.as_ref()),
            lease_expires_at: time(c.lease_expires_at.as_ref()),
            request_id: c.request_id.clone(),
        }
    }
}

/// What `explain-limit` prints: what the server would infer from a report.
#[derive(Debug, Serialize)]
pub struct RecoveryExplanationView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_at: Option<String>,
    /// Seconds from the server's `now` to `recovery_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_in_seconds: Option<i64>,
    pub recovery_source: String,
    pub recovery_hint: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<String>,
    /// The quota window the report is for (`FIVE_HOUR`, ...), and what said so.
    pub window: String,
    pub window_evidence: String,
}

impl From<&pb::ExplainRecoveryResponse> for RecoveryExplanationView {
    fn from(r: &pb::ExplainRecoveryResponse) -> RecoveryExplanationView {
        let at = |ts: Option<&prost_types::Timestamp>| from_timestamp(*ts?);
        let recovery_in_seconds = match (at(r.recovery_at.as_ref()), at(r.now.as_ref())) {
            (Some(recovery), Some(now)) => Some((recovery - now).num_seconds()),
            _ => None,
        };
        RecoveryExplanationView {
            recovery_at: time(r.recovery_at.as_ref()),
            recovery_in_seconds,
            recovery_source: enum_name(
                pb::RecoverySource::try_from(r.recovery_source)
                    .ok()
                    .map(|s| s.as_str_name()),
                "RECOVERY_SOURCE_",
                r.recovery_source,
            ),
            recovery_hint: r.recovery_hint.clone(),
            reason: enum_name(
                pb::ExhaustionReason::try_from(r.reason)
                    .ok()
                    .map(|s| s.as_str_name()),
                "EXHAUSTION_REASON_",
                r.reason,
            ),
            now: time(r.now.as_ref()),
            window: enum_name(
                pb::QuotaWindow::try_from(r.window)
                    .ok()
                    .map(|w| w.as_str_name()),
                "QUOTA_WINDOW_",
                r.window,
            ),
            window_evidence: r.window_evidence.clone(),
        }
    }
}

/// A `QuotaWindow` by its name without the prefix, in any case, `-` for
/// `_` (`five-hour`, `WEEKLY`); `None` for any other (unspecified too).
pub fn quota_window_named(name: &str) -> Option<pb::QuotaWindow> {
    let name = format!("QUOTA_WINDOW_{}", name.to_uppercase().replace('-', "_"));
    pb::QuotaWindow::from_str_name(&name).filter(|w| *w != pb::QuotaWindow::Unspecified)
}

pub fn quota_window(value: i32) -> String {
    let name = pb::QuotaWindow::try_from(value).ok();
    enum_name(name.map(|w| w.as_str_name()), "QUOTA_WINDOW_", value)
}

/// One window of a pool (`QuotaPoolWindow`).
#[derive(Debug, Serialize)]
pub struct PoolWindowView {
    pub window: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub in_force: bool,
    pub source: String,
    pub hint: String,
    pub reported_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<String>,
}

/// One quota pool (`QuotaPool`).
#[derive(Debug, Serialize)]
pub struct PoolView {
    pub name: String,
    /// `OPEN`, `PARKED` or `RELEASING`.
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_until: Option<String>,
    pub windows: Vec<PoolWindowView>,
    /// Members by status.
    pub members: BTreeMap<String, i64>,
    /// Members the pool holds (parked, not yet released).
    pub held: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub canary_agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_released_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_release_at: Option<String>,
}

impl From<&pb::QuotaPool> for PoolView {
    fn from(p: &pb::QuotaPool) -> PoolView {
        let phase = pb::QuotaPoolPhase::try_from(p.phase).ok();
        PoolView {
            name: p.name.clone(),
            phase: enum_name(phase.map(|s| s.as_str_name()), "QUOTA_POOL_PHASE_", p.phase),
            parked_until: time(p.parked_until.as_ref()),
            windows: p
                .windows
                .iter()
                .map(|w| PoolWindowView {
                    window: quota_window(w.window),
                    until: time(w.until.as_ref()),
                    in_force: w.in_force,
                    source: w.source.clone(),
                    hint: w.hint.clone(),
                    reported_by: w.reported_by.clone(),
                    reported_at: time(w.reported_at.as_ref()),
                })
                .collect(),
            members: p
                .members
                .iter()
                .map(|m| (agent_status(m.status), m.count))
                .collect(),
            held: p.held,
            canary_agent_id: p.canary_agent_id.clone(),
            canary_released_at: time(p.canary_released_at.as_ref()),
            canary_completed_at: time(p.canary_completed_at.as_ref()),
            next_release_at: time(p.next_release_at.as_ref()),
        }
    }
}

/// One member's place in a pool's release (`QuotaPoolRelease`).
#[derive(Debug, Serialize)]
pub struct PoolReleaseView {
    pub agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_at: Option<String>,
    pub released: bool,
}

/// `GetQuotaPool`'s answer.
#[derive(Debug, Serialize)]
pub struct PoolDetailView {
    #[serde(flatten)]
    pub pool: PoolView,
    pub held_agent_ids: Vec<String>,
    pub releases: Vec<PoolReleaseView>,
}

impl From<&pb::GetQuotaPoolResponse> for PoolDetailView {
    fn from(r: &pb::GetQuotaPoolResponse) -> PoolDetailView {
        PoolDetailView {
            pool: PoolView::from(&r.pool.clone().unwrap_or_default()),
            held_agent_ids: r.held_agent_ids.clone(),
            releases: r
                .releases
                .iter()
                .map(|x| PoolReleaseView {
                    agent_id: x.agent_id.clone(),
                    release_at: time(x.release_at.as_ref()),
                    released: x.released,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TransitionView {
    pub revision: i64,
    pub agent_id: String,
    pub from: String,
    pub to: String,
    pub cause: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_at: Option<String>,
    /// Who made the change (empty for records from before actors were kept).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub actor: String,
    /// The quota pool the transition is for; absent for others.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub quota_pool: String,
}

impl From<&pb::Transition> for TransitionView {
    fn from(t: &pb::Transition) -> TransitionView {
        TransitionView {
            revision: t.revision,
            agent_id: t.agent_id.clone(),
            from: from_status(t.from_status),
            to: agent_status(t.to_status),
            cause: cause(t.cause),
            occurred_at: time(t.occurred_at.as_ref()),
            recovery_at: time(t.recovery_at.as_ref()),
            actor: t.actor.clone(),
            quota_pool: t.quota_pool.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorCountView {
    pub error_type: String,
    pub count: i64,
}

#[derive(Debug, Serialize)]
pub struct PatternView {
    pub error_type: String,
    pub context_signature: String,
    pub strategy: String,
    pub successes: i64,
    pub failures: i64,
    pub success_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_recovery_seconds: Option<f64>,
    pub use_count: i64,
}

#[derive(Debug, Serialize)]
pub struct HealingStatsView {
    pub total_errors: i64,
    pub errors_last_hour: i64,
    pub active_recoveries: i64,
    pub overall_success_rate: f64,
    pub errors_by_type: Vec<ErrorCountView>,
    pub patterns: Vec<PatternView>,
}

impl From<&pb::GetHealingStatisticsResponse> for HealingStatsView {
    fn from(s: &pb::GetHealingStatisticsResponse) -> HealingStatsView {
        HealingStatsView {
            total_errors: s.total_errors,
            errors_last_hour: s.errors_last_hour,
            active_recoveries: s.active_recoveries,
            overall_success_rate: s.overall_success_rate,
            errors_by_type: s
                .errors_by_type
                .iter()
                .map(|c| ErrorCountView {
                    error_type: error_type(c.error_type),
                    count: c.count,
                })
                .collect(),
            patterns: s
                .patterns
                .iter()
                .map(|p| PatternView {
                    error_type: error_type(p.error_type),
                    context_signature: p.context_signature.clone(),
                    strategy: strategy(p.strategy),
                    successes: p.successes,
                    failures: p.failures,
                    success_rate: p.success_rate,
                    mean_recovery_seconds: seconds(p.mean_recovery_time.as_ref()),
                    use_count: p.use_count,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SessionErrorView {
    pub session: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct RunStatsView {
    pub scanned: i64,
    pub processed: i64,
    pub skipped: i64,
    pub failed: i64,
    pub dead: i64,
    pub items_extracted: i64,
    pub lines_skipped: i64,
    pub files_hashed: i64,
    pub bytes_hashed: i64,
    pub errors: Vec<SessionErrorView>,
    pub skipped_entries: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl From<&pb::RunStats> for RunStatsView {
    fn from(s: &pb::RunStats) -> RunStatsView {
        RunStatsView {
            scanned: s.scanned,
            processed: s.processed,
            skipped: s.skipped,
            failed: s.failed,
            dead: s.dead,
            items_extracted: s.items_extracted,
            lines_skipped: s.lines_skipped,
            files_hashed: s.files_hashed,
            bytes_hashed: s.bytes_hashed,
            errors: s
                .errors
                .iter()
                .map(|e| SessionErrorView {
                    session: e.session.clone(),
                    error: e.error.clone(),
                })
                .collect(),
            skipped_entries: s.skipped_entries.clone(),
            root_error: (!s.root_error.is_empty()).then(|| s.root_error.clone()),
            started_at: time(s.started_at.as_ref()),
            finished_at: time(s.finished_at.as_ref()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProcessorView {
    pub name: String,
    pub version: i32,
    /// Seconds between scheduled runs; 0 means only on demand.
    pub interval_seconds: f64,
    pub running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunStatsView>,
}

impl From<&pb::ProcessorInfo> for ProcessorView {
    fn from(p: &pb::ProcessorInfo) -> ProcessorView {
        ProcessorView {
            name: p.name.clone(),
            version: p.version,
            interval_seconds: seconds(p.interval.as_ref()).unwrap_or(0.0),
            running: p.running,
            last_run_at: time(p.last_run_at.as_ref()),
            last_run: p.last_run.as_ref().map(RunStatsView::from),
        }
    }
}

fn run_trigger(value: i32) -> String {
    let name = pb::RunTrigger::try_from(value).ok();
    enum_name(name.map(|t| t.as_str_name()), "RUN_TRIGGER_", value)
}

/// One recorded processor run (`ListRuns`).
#[derive(Debug, Serialize)]
pub struct RunView {
    pub id: i64,
    pub processor: String,
    /// `SCHEDULER`, `CALL`, or `UNSPECIFIED` (recorded before triggers were kept).
    pub trigger: String,
    /// Who started it: the caller's name, `scheduler`, or empty when unknown.
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Milliseconds from start to finish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    pub stats: RunStatsView,
}

impl From<&pb::PipelineRun> for RunView {
    fn from(r: &pb::PipelineRun) -> RunView {
        let at = |ts: Option<&prost_types::Timestamp>| from_timestamp(*ts?);
        let duration_ms = match (at(r.started_at.as_ref()), at(r.finished_at.as_ref())) {
            (Some(start), Some(end)) => Some((end - start).num_milliseconds()),
            _ => None,
        };
        RunView {
            id: r.id,
            processor: r.processor.clone(),
            trigger: run_trigger(r.trigger),
            actor: r.actor.clone(),
            started_at: time(r.started_at.as_ref()),
            finished_at: time(r.finished_at.as_ref()),
            duration_ms,
            stats: RunStatsView::from(&r.stats.clone().unwrap_or_default()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UsageRowView {
    pub key: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_creation_tokens: i64,
    pub cache_read_tokens: i64,
    pub total_tokens: i64,
    pub messages: i64,
    pub models: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
}

impl From<&pb::UsageRow> for UsageRowView {
    fn from(r: &pb::UsageRow) -> UsageRowView {
        UsageRowView {
            key: r.key.clone(),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_creation_tokens: r.cache_creation_tokens,
            cache_read_tokens: r.cache_read_tokens,
            total_tokens: r.total_tokens,
            messages: r.messages,
            models: r.models.clone(),
            first_at: time(r.first_at.as_ref()),
            last_at: time(r.last_at.as_ref()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct UsageView {
    pub group_by: String,
    pub rows: Vec<UsageRowView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub totals: Option<UsageRowView>,
}

fn session_status(value: i32) -> String {
    let name = pb::SessionStatus::try_from(value).ok();
    enum_name(name.map(|s| s.as_str_name()), "SESSION_STATUS_", value)
}

/// One session's state in one processor (`ListSessionStates`, `RetrySession`).
#[derive(Debug, Serialize)]
pub struct SessionStateView {
    pub processor: String,
    pub session: String,
    pub user: String,
    pub status: String,
    pub attempts: i32,
    pub items_count: i64,
    pub size: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

impl From<&pb::SessionState> for SessionStateView {
    fn from(s: &pb::SessionState) -> SessionStateView {
        SessionStateView {
            processor: s.processor.clone(),
            session: s.session.clone(),
            user: s.user.clone(),
            status: session_status(s.status),
            attempts: s.attempts,
            items_count: s.items_count,
            size: s.size,
            last_error: s.last_error.clone(),
            processed_at: time(s.processed_at.as_ref()),
            next_attempt_at: time(s.next_attempt_at.as_ref()),
        }
    }
}

impl UsageView {
    /// A `GetUsage` answer grouped by `group_by`.
    pub fn new(group_by: pb::UsageGrouping, response: &pb::GetUsageResponse) -> UsageView {
        UsageView {
            group_by: group_by
                .as_str_name()
                .trim_start_matches("USAGE_GROUPING_")
                .to_lowercase(),
            rows: response.rows.iter().map(UsageRowView::from).collect(),
            totals: response.totals.as_ref().map(UsageRowView::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_values_print_without_their_prefix_and_unknown_ones_as_numbers() {
        assert_eq!(agent_status(pb::AgentStatus::OnCall as i32), "ON_CALL");
        assert_eq!(agent_status(99), "99");
        assert_eq!(
            cause(pb::TransitionCause::HeartbeatTimeout as i32),
            "HEARTBEAT_TIMEOUT"
        );
        assert_eq!(optional_enum(0, Some("X"), ""), None);
    }

    #[test]
    fn a_registration_comes_from_new_not_unspecified() {
        let registered = TransitionView::from(&pb::Transition {
            revision: 1,
            agent_id: "a-1".into(),
            from_status: pb::AgentStatus::Unspecified as i32,
            to_status: pb::AgentStatus::Idle as i32,
            cause: pb::TransitionCause::Registered as i32,
            ..Default::default()
        });
        assert_eq!(
            (registered.from.as_str(), registered.to.as_str()),
            ("NEW", "IDLE")
        );
        let started = TransitionView::from(&pb::Transition {
            from_status: pb::AgentStatus::Idle as i32,
            to_status: pb::AgentStatus::Busy as i32,
            ..Default::default()
        });
        assert_eq!(started.from, "IDLE");
    }

    #[test]
    fn times_print_as_utc_rfc3339_and_invalid_ones_are_left_out() {
        let ts = prost_types::Timestamp {
            seconds: 1_775_037_600,
            nanos: 5_000_000,
        };
        assert_eq!(time(Some(&ts)).unwrap(), "2026-04-01T10:00:00.005Z");
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(time(Some(&bad)), None);
    }

    #[test]
    fn agent_json_leaves_out_unset_recovery_and_cordon_fields() {
        let agent = pb::Agent {
            agent_id: "a-1".into(),
            status: pb::AgentStatus::Idle as i32,
            revision: 7,
            schedulable: true,
            ..Default::default()
        };
        let json = serde_json::to_value(AgentView::from(&agent)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "agent_id": "a-1", "status": "IDLE", "labels": {}, "revision": 7,
                "schedulable": true,
            })
        );
        // Cordoned: the reason shows, empty or not.
        let cordoned = pb::Agent {
            schedulable: false,
            ..agent
        };
        let json = serde_json::to_value(AgentView::from(&cordoned)).unwrap();
        assert_eq!(json["schedulable"], false);
        assert_eq!(json["cordon_reason"], "");
    }

    #[test]
    fn an_agents_claim_shows_with_its_holder_lease_and_slot() {
        let agent = pb::Agent {
            agent_id: "a-1".into(),
            status: pb::AgentStatus::OnCall as i32,
            schedulable: true,
            claim: Some(pb::Claim {
                claim_id: "c-1".into(),
                agent_id: "a-1".into(),
                fencing_token: 42,
                slot_type: pb::SlotType::OnCall as i32,
                holder: "sched-a".into(),
                claimed_at: Some(prost_types::Timestamp {
                    seconds: 1_775_037_600,
                    nanos: 0,
                }),
                lease_expires_at: Some(prost_types::Timestamp {
                    seconds: 1_775_037_660,
                    nanos: 0,
                }),
                request_id: String::new(),
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(AgentView::from(&agent)).unwrap();
        assert_eq!(
            json["claim"],
            serde_json::json!({
                "claim_id": "c-1", "agent_id": "a-1", "fencing_token": 42,
                "slot_type": "ON_CALL", "holder": "sched-a",
                "claimed_at": "2026-04-01T10:00:00.000Z",
                "lease_expires_at": "2026-04-01T10:01:00.000Z",
            })
        );
    }
}

/// The remediation policy and where its brakes stand (`GetHealingPolicy`).
#[derive(Debug, Serialize)]
pub struct HealingPolicyView {
    pub policy: HealingPolicySettingsView,
    pub pauses: Vec<HealingPauseView>,
    pub open_breakers: Vec<BreakerView>,
    /// The fleet's share first (group ""), then each group's.
    pub shares: Vec<ShareView>,
    pub spent_budgets: Vec<SpentBudgetView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HealingPolicySettingsView {
    pub max_unhealthy_percent: u32,
    pub min_unhealthy: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group_by: String,
    pub max_plans_per_minute: u32,
    pub max_group_plans_per_minute: u32,
    pub retry_budget: u32,
    pub retry_window_seconds: Option<f64>,
    pub min_healthy_period_seconds: Option<f64>,
    pub breaker_failures: u32,
    pub breaker_cooldown_seconds: Option<f64>,
    pub dry_run: bool,
    pub brakes: bool,
}

#[derive(Debug, Serialize)]
pub struct HealingPauseView {
    /// The paused group ("" for the fleet).
    pub group: String,
    pub reason: String,
    pub paused_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<String>,
}

impl From<&pb::HealingPause> for HealingPauseView {
    fn from(p: &pb::HealingPause) -> HealingPauseView {
        HealingPauseView {
            group: p.group.clone(),
            reason: p.reason.clone(),
            paused_by: p.paused_by.clone(),
            paused_at: time(p.paused_at.as_ref()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BreakerView {
    pub error_type: String,
    pub strategy: String,
    /// `OPEN` or `HALF_OPEN`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ShareView {
    /// The group ("" for the fleet).
    pub group: String,
    pub counted: u32,
    pub unhealthy: u32,
    pub allowed: u32,
}

impl From<&pb::HealingShare> for ShareView {
    fn from(s: &pb::HealingShare) -> ShareView {
        ShareView {
            group: s.group.clone(),
            counted: s.counted,
            unhealthy: s.unhealthy,
            allowed: s.allowed,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SpentBudgetView {
    pub agent_id: String,
    pub plans: u32,
}

impl From<&pb::GetHealingPolicyResponse> for HealingPolicyView {
    fn from(r: &pb::GetHealingPolicyResponse) -> HealingPolicyView {
        let p = r.policy.clone().unwrap_or_default();
        HealingPolicyView {
            policy: HealingPolicySettingsView {
                max_unhealthy_percent: p.max_unhealthy_percent,
                min_unhealthy: p.min_unhealthy,
                group_by: p.group_by,
                max_plans_per_minute: p.max_plans_per_minute,
                max_group_plans_per_minute: p.max_group_plans_per_minute,
                retry_budget: p.retry_budget,
                retry_window_seconds: seconds(p.retry_window.as_ref()),
                min_healthy_period_seconds: seconds(p.min_healthy_period.as_ref()),
                breaker_failures: p.breaker_failures,
                breaker_cooldown_seconds: seconds(p.breaker_cooldown.as_ref()),
                dry_run: p.dry_run,
                brakes: p.brakes,
            },
            pauses: r.pauses.iter().map(HealingPauseView::from).collect(),
            open_breakers: r
                .open_breakers
                .iter()
                .map(|b| BreakerView {
                    error_type: error_type(b.error_type),
                    strategy: strategy(b.strategy),
                    state: enum_name(
                        pb::BreakerState::try_from(b.state)
                            .ok()
                            .map(|s| s.as_str_name()),
                        "BREAKER_STATE_",
                        b.state,
                    ),
                    since: time(b.since.as_ref()),
                    retry_at: time(b.retry_at.as_ref()),
                })
                .collect(),
            shares: r.shares.iter().map(ShareView::from).collect(),
            spent_budgets: r
                .spent_budgets
                .iter()
                .map(|s| SpentBudgetView {
                    agent_id: s.agent_id.clone(),
                    plans: s.plans,
                })
                .collect(),
            as_of: time(r.as_of.as_ref()),
        }
    }
}

/// One decision on a PlanRecovery (`ListHealingDecisions`).
#[derive(Debug, Serialize)]
pub struct HealingDecisionView {
    pub id: i64,
    pub error_event_id: i64,
    pub agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// `PLANNED`, `DRY_RUN` or `BRAKED`.
    pub verdict: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_action_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<ShareView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<ShareView>,
    pub fleet_plans_last_minute: u32,
    pub group_plans_last_minute: u32,
    pub agent_plans_in_window: u32,
    pub actor: String,
}

impl From<&pb::HealingDecision> for HealingDecisionView {
    fn from(d: &pb::HealingDecision) -> HealingDecisionView {
        HealingDecisionView {
            id: d.id,
            error_event_id: d.error_event_id,
            agent_id: d.agent_id.clone(),
            decided_at: time(d.decided_at.as_ref()),
            verdict: enum_name(
                pb::HealingVerdict::try_from(d.verdict)
                    .ok()
                    .map(|v| v.as_str_name()),
                "HEALING_VERDICT_",
                d.verdict,
            ),
            reason: d.reason.clone(),
            message: d.message.clone(),
            strategy: optional_enum(
                d.strategy,
                pb::RecoveryStrategy::try_from(d.strategy)
                    .ok()
                    .map(|s| s.as_str_name()),
                "RECOVERY_STRATEGY_",
            ),
            recovery_action_id: (d.recovery_action_id > 0).then_some(d.recovery_action_id),
            fleet: d.fleet.as_ref().map(ShareView::from),
            group: d.group.as_ref().map(ShareView::from),
            fleet_plans_last_minute: d.fleet_plans_last_minute,
            group_plans_last_minute: d.group_plans_last_minute,
            agent_plans_in_window: d.agent_plans_in_window,
            actor: d.actor.clone(),
        }
    }
}
