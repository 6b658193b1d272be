//! Healing history as stored: error events, recovery actions, what was
//! learned, and post action records with their outcome; and the rules of a
//! recovery's life: its lease, when it reads as expired, one active recovery
//! per agent, which statuses accept an outcome. Times are passed in.

use chrono::{DateTime, Duration, Utc};

use crate::domain::healing::{self, Context, ErrorType, Strategy};
use crate::domain::post_healing::ActionRecord;

/// A reported error, before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewErrorEvent {
    pub agent_id: String,
    pub message: String,
    pub context: Context,
    pub error_type: ErrorType,
    pub severity: f64,
    /// Who reported it (a caller's name, "pipeline" for transcripts).
    pub actor: String,
}

/// A stored, classified error.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorEvent {
    pub id: i64,
    pub agent_id: String,
    pub message: String,
    pub context: Context,
    pub error_type: ErrorType,
    pub severity: f64,
    pub critical: bool,
    pub recurring: bool,
    pub occurred_at: DateTime<Utc>,
    /// Who reported it ("" for events stored before actors were).
    pub actor: String,
    /// The latest recovery planned for it and where that stands (as a
    /// reader sees it: an ACTIVE one past its lease is EXPIRED); `None`
    /// when none was planned, or when the read does not say.
    pub recovery: Option<(i64, RecoveryStatus)>,
}

/// Where a recovery action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryStatus {
    Active,
    Succeeded,
    Failed,
    /// Active past its lease: the agent is free to plan again.
    Expired,
}

impl RecoveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryStatus::Active => "ACTIVE",
            RecoveryStatus::Succeeded => "SUCCEEDED",
            RecoveryStatus::Failed => "FAILED",
            RecoveryStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            RecoveryStatus::Active,
            RecoveryStatus::Succeeded,
            RecoveryStatus::Failed,
            RecoveryStatus::Expired,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }
}

impl RecoveryStatus {
    /// What a reader sees at `now` of a stored status whose lease ends at
    /// `lease_expires_at`: an ACTIVE recovery whose lease ended (at or before
    /// `now`) is EXPIRED, whoever asks and whenever.
    pub fn as_of(self, lease_expires_at: DateTime<Utc>, now: DateTime<Utc>) -> RecoveryStatus {
        match self {
            RecoveryStatus::Active if lease_expired(lease_expires_at, now) => {
                RecoveryStatus::Expired
            }
            status => status,
        }
    }

    /// Whether a recovery in this (as-of) status still takes an outcome. A late
    /// outcome of an expired recovery still teaches the planner.
    pub fn accepts_outcome(self) -> bool {
        match self {
            RecoveryStatus::Active | RecoveryStatus::Expired => true,
            RecoveryStatus::Succeeded | RecoveryStatus::Failed => false,
        }
    }

    /// Which stored rows a reader at `now` sees in this status: the store finds
    /// them with these filters (one of them must match) instead of restating
    /// [`RecoveryStatus::as_of`].
    pub fn stored_as(self, now: DateTime<Utc>) -> Vec<StoredStatusFilter> {
        let any = |status| StoredStatusFilter {
            status,
            lease: LeaseFilter::Any,
        };
        match self {
            RecoveryStatus::Active => vec![StoredStatusFilter {
                status: RecoveryStatus::Active,
                lease: LeaseFilter::EndsAfter(now),
            }],
            RecoveryStatus::Expired => vec![
                any(RecoveryStatus::Expired),
                StoredStatusFilter {
                    status: RecoveryStatus::Active,
                    lease: LeaseFilter::EndedBy(now),
                },
            ],
            RecoveryStatus::Succeeded => vec![any(RecoveryStatus::Succeeded)],
            RecoveryStatus::Failed => vec![any(RecoveryStatus::Failed)],
        }
    }
}

/// A lease ends at its expiry instant: at `now == lease_expires_at` it is over.
pub fn lease_expired(lease_expires_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    lease_expires_at <= now
}

/// When a recovery planned at `now` with `lease` stops blocking its agent
/// (saturating at the latest representable instant).
pub fn lease_expires_at(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now.checked_add_signed(lease)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// One stored shape of a reader's status: a stored status, and where its lease
/// must end relative to the reader's `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredStatusFilter {
    pub status: RecoveryStatus,
    pub lease: LeaseFilter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseFilter {
    Any,
    /// `lease_expires_at > t`.
    EndsAfter(DateTime<Utc>),
    /// `lease_expires_at <= t`.
    EndedBy(DateTime<Utc>),
}

impl StoredStatusFilter {
    /// Whether a stored row matches (what the store's query computes).
    pub fn matches(&self, status: RecoveryStatus, lease_expires_at: DateTime<Utc>) -> bool {
        self.status == status
            && match self.lease {
                LeaseFilter::Any => true,
                LeaseFilter::EndsAfter(t) => lease_expires_at > t,
                LeaseFilter::EndedBy(t) => lease_expires_at <= t,
            }
    }
}

/// A second plan for an agent whose recovery is still within its lease.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "agent {agent_id:?} already has an active recovery: action {action_id} ({}), planned at {}, lease until {}",
    strategy.as_str(),
    planned_at.to_rfc3339(),
    lease_expires_at.to_rfc3339()
)]
pub struct RecoveryAlreadyActive {
    pub agent_id: String,
    pub action_id: i64,
    pub strategy: Strategy,
    pub planned_at: DateTime<Utc>,
    pub lease_expires_at: DateTime<Utc>,
}

impl RecoveryAlreadyActive {
    pub fn of(action: &RecoveryAction) -> Self {
        RecoveryAlreadyActive {
            agent_id: action.agent_id.clone(),
            action_id: action.id,
            strategy: action.strategy,
            planned_at: action.created_at,
            lease_expires_at: action.lease_expires_at,
        }
    }
}

/// Whether an agent may get a new recovery, given the recovery the store holds
/// as ACTIVE for it (read as of the plan's `now`, see [`RecoveryStatus::as_of`]).
/// Returns the id of a lapsed recovery the store must mark EXPIRED before
/// planning, or the refusal naming the recovery still within its lease.
pub fn admit_plan(
    stored_active: Option<&RecoveryAction>,
    now: DateTime<Utc>,
) -> Result<Option<i64>, RecoveryAlreadyActive> {
    let Some(action) = stored_active else {
        return Ok(None);
    };
    match action.status.as_of(action.lease_expires_at, now) {
        RecoveryStatus::Active => Err(RecoveryAlreadyActive::of(action)),
        RecoveryStatus::Expired => Ok(Some(action.id)),
        RecoveryStatus::Succeeded | RecoveryStatus::Failed => Ok(None),
    }
}

/// A second outcome for a recovery that already has one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("recovery action {action_id} already has an outcome ({})", status.as_str())]
pub struct OutcomeAlreadyRecorded {
    pub action_id: i64,
    pub status: RecoveryStatus,
}

/// The status a recovery ends in with `outcome`, if its (as-of) status still
/// takes one.
pub fn accept_outcome(
    action: &RecoveryAction,
    outcome: &RecoveryOutcome,
) -> Result<RecoveryStatus, OutcomeAlreadyRecorded> {
    if !action.status.accepts_outcome() {
        return Err(OutcomeAlreadyRecorded {
            action_id: action.id,
            status: action.status,
        });
    }
    Ok(if outcome.success {
        RecoveryStatus::Succeeded
    } else {
        RecoveryStatus::Failed
    })
}

/// A reported error, decoded: classification and scoring happen in
/// [`ErrorReport::classify`].
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReport {
    pub agent_id: String,
    pub message: String,
    pub context: Context,
    pub hint: Option<ErrorType>,
}

impl ErrorReport {
    /// Classifies and scores the report of `actor`.
    pub fn classify(self, actor: &str) -> NewErrorEvent {
        let error_type = healing::classify(&self.message, self.hint);
        let severity = healing::severity(error_type, &self.context);
        NewErrorEvent {
            agent_id: self.agent_id,
            message: self.message,
            context: self.context,
            error_type,
            severity,
            actor: actor.to_owned(),
        }
    }
}

/// "Last hour" in the healing statistics: a reporting window of its own (the
/// wire calls it `errors_last_hour`), not the recurrence window.
pub const STATISTICS_RECENT: Duration = Duration::hours(1);

/// Errors that occurred after this instant count as "last hour" at `now`.
pub fn statistics_recent_since(now: DateTime<Utc>) -> DateTime<Utc> {
    now.checked_sub_signed(STATISTICS_RECENT)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A planned recovery and, once reported, its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryAction {
    pub id: i64,
    pub error_event_id: i64,
    pub agent_id: String,
    pub error_type: ErrorType,
    pub context_signature: String,
    pub strategy: Strategy,
    pub chosen_strategy: Strategy,
    pub parameters: Context,
    pub estimated_duration: Duration,
    pub success_probability: f64,
    pub risk: f64,
    pub escalated: bool,
    pub reason: String,
    pub status: RecoveryStatus,
    pub created_at: DateTime<Utc>,
    pub lease_expires_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub duration: Option<Duration>,
    pub details: Option<String>,
    /// Who planned it ("" for actions stored before actors were).
    pub actor: String,
    /// Who reported the outcome ("" while there is none).
    pub outcome_actor: String,
}

/// What an agent reports at the end of a recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryOutcome {
    pub success: bool,
    pub duration: Duration,
    pub details: String,
    /// Who reported it.
    pub actor: String,
}

/// What was learned for one strategy on one kind of error.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternStatistics {
    pub error_type: ErrorType,
    pub context_signature: String,
    pub strategy: Strategy,
    pub successes: i64,
    pub failures: i64,
    pub total_recovery_secs: f64,
}

impl PatternStatistics {
    pub fn uses(&self) -> i64 {
        self.successes + self.failures
    }

    pub fn success_rate(&self) -> f64 {
        match self.uses() {
            0 => 0.0,
            n => self.successes as f64 / n as f64,
        }
    }

    pub fn mean_recovery_secs(&self) -> f64 {
        match self.uses() {
            0 => 0.0,
            n => self.total_recovery_secs / n as f64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealingStatistics {
    pub total_errors: i64,
    pub errors_last_hour: i64,
    pub errors_by_type: Vec<(ErrorType, i64)>,
    pub active_recoveries: i64,
    pub patterns: Vec<PatternStatistics>,
}

impl HealingStatistics {
    /// Success rate over every pattern, weighted by how often each was used.
    pub fn overall_success_rate(&self) -> f64 {
        let uses: i64 = self.patterns.iter().map(PatternStatistics::uses).sum();
        let successes: i64 = self.patterns.iter().map(|p| p.successes).sum();
        if uses == 0 {
            0.0
        } else {
            successes as f64 / uses as f64
        }
    }
}

/// A post action record with its last reported outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAction {
    pub record: ActionRecord,
    pub outcome: Option<serde_json::Value>,
    /// Who claimed (or first reported) the action.
    pub actor: String,
    /// Who reported its last outcome ("" before any).
    pub outcome_actor: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(strategy: Strategy, successes: i64, failures: i64) -> PatternStatistics {
        PatternStatistics {
            error_type: ErrorType::ExecutionFailure,
            context_signature: String::new(),
            strategy,
            successes,
            failures,
            total_recovery_secs: 10.0 * (successes + failures) as f64,
        }
    }

    #[test]
    fn overall_success_rate_is_weighted_by_use() {
        let stats = HealingStatistics {
            patterns: vec![
                pattern(Strategy::Retry, 9, 1),
                pattern(Strategy::Restart, 0, 30),
            ],
            ..Default::default()
        };
        // Unweighted mean of 0.9 and 0.0 would be 0.45; by use it is 9 / 40.
        assert!((stats.overall_success_rate() - 9.0 / 40.0).abs() < 1e-12);
        assert_eq!(HealingStatistics::default().overall_success_rate(), 0.0);
        assert!((stats.patterns[0].mean_recovery_secs() - 10.0).abs() < 1e-12);
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    const ALL_STATUSES: [RecoveryStatus; 4] = [
        RecoveryStatus::Active,
        RecoveryStatus::Succeeded,
        RecoveryStatus::Failed,
        RecoveryStatus::Expired,
    ];

    fn action(status: RecoveryStatus, lease_ends: DateTime<Utc>) -> RecoveryAction {
        RecoveryAction {
            id: 7,
            error_event_id: 1,
            agent_id: "a".into(),
            error_type: ErrorType::ExecutionFailure,
            context_signature: String::new(),
            strategy: Strategy::Retry,
            chosen_strategy: Strategy::Retry,
            parameters: Context::new(),
            estimated_duration: Duration::seconds(30),
            success_probability: 0.7,
            risk: 0.1,
            escalated: false,
            reason: "heuristic".into(),
            status,
            created_at: at(0),
            lease_expires_at: lease_ends,
            completed_at: None,
            duration: None,
            details: None,
            actor: "planner".into(),
            outcome_actor: String::new(),
        }
    }

    #[test]
    fn a_lease_is_over_exactly_at_its_end() {
        let end = at(300);
        let just_before = end - Duration::microseconds(1);
        assert_eq!(
            RecoveryStatus::Active.as_of(end, just_before),
            RecoveryStatus::Active
        );
        assert_eq!(
            RecoveryStatus::Active.as_of(end, end),
            RecoveryStatus::Expired
        );
        assert!(!lease_expired(end, just_before));
        assert!(lease_expired(end, end));
        // Only ACTIVE expires: an outcome stays what it was.
        for s in [RecoveryStatus::Succeeded, RecoveryStatus::Failed] {
            assert_eq!(s.as_of(end, at(10_000)), s);
        }
        assert_eq!(lease_expires_at(at(0), Duration::seconds(300)), end);
        assert_eq!(
            lease_expires_at(DateTime::<Utc>::MAX_UTC, Duration::seconds(1)),
            DateTime::<Utc>::MAX_UTC
        );
    }

    #[test]
    fn one_active_recovery_until_its_lease_ends() {
        let end = at(300);
        assert_eq!(admit_plan(None, at(1)), Ok(None));
        let active = action(RecoveryStatus::Active, end);
        let refused = admit_plan(Some(&active), end - Duration::microseconds(1)).unwrap_err();
        assert_eq!(refused.action_id, 7);
        assert!(
            refused.to_string().contains("action 7 (RETRY)"),
            "{refused}"
        );
        // At the lease's end the agent is free; the lapsed one must be expired first.
        assert_eq!(admit_plan(Some(&active), end), Ok(Some(7)));
        assert_eq!(
            admit_plan(Some(&action(RecoveryStatus::Succeeded, end)), at(1)),
            Ok(None)
        );
    }

    #[test]
    fn outcomes_are_accepted_while_active_or_expired_only() {
        let outcome = |success| RecoveryOutcome {
            success,
            duration: Duration::seconds(5),
            details: String::new(),
            actor: "reporter".into(),
        };
        for status in ALL_STATUSES {
            let a = action(status, at(300));
            let accepted = accept_outcome(&a, &outcome(true));
            match status {
                RecoveryStatus::Active | RecoveryStatus::Expired => {
                    assert_eq!(accepted, Ok(RecoveryStatus::Succeeded), "{status:?}");
                    assert_eq!(
                        accept_outcome(&a, &outcome(false)),
                        Ok(RecoveryStatus::Failed)
                    );
                }
                RecoveryStatus::Succeeded | RecoveryStatus::Failed => {
                    let refused = accepted.unwrap_err();
                    assert_eq!(refused.status, status);
                    assert_eq!(
                        refused.to_string(),
                        format!(
                            "recovery action 7 already has an outcome ({})",
                            status.as_str()
                        )
                    );
                }
            }
        }
    }

    /// The store finds rows of a status with `stored_as`; a reader sees rows
    /// through `as_of`. The two must agree for every stored row and instant.
    #[test]
    fn stored_filters_agree_with_what_readers_see() {
        let now = at(300);
        let leases = [
            at(0),
            now - Duration::microseconds(1),
            now,
            now + Duration::microseconds(1),
            at(900),
        ];
        for wanted in ALL_STATUSES {
            let filters = wanted.stored_as(now);
            for stored in ALL_STATUSES {
                for lease in leases {
                    let seen = stored.as_of(lease, now);
                    let found = filters.iter().any(|f| f.matches(stored, lease));
                    assert_eq!(found, seen == wanted, "{wanted:?} {stored:?} {lease}");
                }
            }
        }
    }

    #[test]
    fn statistics_last_hour_starts_an_hour_before_now() {
        assert_eq!(statistics_recent_since(at(3600)), at(0));
    }

    #[test]
    fn recovery_statuses_round_trip() {
        for s in ["ACTIVE", "SUCCEEDED", "FAILED", "EXPIRED"] {
            assert_eq!(RecoveryStatus::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(RecoveryStatus::parse("active"), None);
    }
}
