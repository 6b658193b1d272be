//! Healing history as stored: error events, recovery actions, what was
//! learned, and post action records with their outcome.

use chrono::{DateTime, Duration, Utc};

use crate::domain::healing::{Context, ErrorType, Strategy};
use crate::domain::post_healing::ActionRecord;

/// A reported error, before it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewErrorEvent {
    pub agent_id: String,
    pub message: String,
    pub context: Context,
    pub error_type: ErrorType,
    pub severity: f64,
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
}

/// What an agent reports at the end of a recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryOutcome {
    pub success: bool,
    pub duration: Duration,
    pub details: String,
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

    #[test]
    fn recovery_statuses_round_trip() {
        for s in ["ACTIVE", "SUCCEEDED", "FAILED", "EXPIRED"] {
            assert_eq!(RecoveryStatus::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(RecoveryStatus::parse("active"), None);
    }
}
