//! Reading stored values back into domain types, for every backend: the
//! spellings are the domain's (`as_str`/`parse`), and a value no spelling
//! matches is a corrupt row, reported as an internal error naming it.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

use crate::domain::agent::{AgentStatus, ExhaustionReason, SlotType};
use crate::domain::healing::{ErrorType, Strategy};
use crate::domain::healing_records::{HealingStatistics, PatternStatistics};
use crate::domain::pipeline_runs::StartedBy;
use crate::domain::post_healing::Tier;
use crate::domain::recovery::RecoverySource;
use crate::error::{Error, Result};

pub(crate) fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("stored {what} {value:?} is not recognised"))
}

/// A time as a backend stores it (SQLite: microseconds; Postgres: timestamptz).
pub(crate) trait StoredTime {
    fn time(self) -> DateTime<Utc>;
}

/// `timestamptz`, decoded by sqlx.
impl StoredTime for DateTime<Utc> {
    fn time(self) -> DateTime<Utc> {
        self
    }
}

/// A JSON document holding a `T` as a backend stores it (SQLite: TEXT;
/// Postgres: jsonb).
pub(crate) trait StoredJson<T> {
    /// The value it holds; `what` names it in a corrupt-row error.
    fn value(self, what: &str) -> Result<T>;
}

/// JSON in TEXT.
impl<T: DeserializeOwned> StoredJson<T> for String {
    fn value(self, what: &str) -> Result<T> {
        serde_json::from_str(&self).map_err(|_| corrupt(what, &self))
    }
}

/// `jsonb`, decoded by sqlx.
impl<T> StoredJson<T> for sqlx::types::Json<T> {
    fn value(self, _what: &str) -> Result<T> {
        Ok(self.0)
    }
}

pub(crate) fn status(s: &str) -> Result<AgentStatus> {
    AgentStatus::parse(s).ok_or_else(|| corrupt("status", s))
}

/// Agents per stored status, as of `revision`.
pub(crate) fn status_counts(
    revision: i64,
    rows: Vec<(String, i64)>,
) -> Result<crate::storage::StatusCounts> {
    Ok(crate::storage::StatusCounts {
        revision,
        counts: rows
            .into_iter()
            .map(|(s, n)| Ok((status(&s)?, n)))
            .collect::<Result<_>>()?,
    })
}

pub(crate) fn slot_type(s: &str) -> Result<SlotType> {
    SlotType::parse(s).ok_or_else(|| corrupt("slot type", s))
}

pub(crate) fn exhaustion_reason(s: &str) -> Result<ExhaustionReason> {
    ExhaustionReason::parse(s).ok_or_else(|| corrupt("exhaustion reason", s))
}

/// A stored recovery source; rows from before sources were kept read DEFAULT.
pub(crate) fn recovery_source(s: Option<&str>) -> Result<RecoverySource> {
    let s = s.unwrap_or("DEFAULT");
    RecoverySource::parse(s).ok_or_else(|| corrupt("recovery source", s))
}

pub(crate) fn error_type(s: &str) -> Result<ErrorType> {
    ErrorType::parse(s).ok_or_else(|| corrupt("error type", s))
}

pub(crate) fn strategy(s: &str) -> Result<Strategy> {
    Strategy::parse(s).ok_or_else(|| corrupt("strategy", s))
}

/// What started a stored run (empty: a run recorded before it was kept).
pub(crate) fn started_by(s: &str) -> Result<StartedBy> {
    StartedBy::parse(s).ok_or_else(|| corrupt("run trigger", s))
}

pub(crate) fn tier(n: i32) -> Result<Tier> {
    match n {
        1 => Ok(Tier::Tier1),
        2 => Ok(Tier::Tier2),
        3 => Ok(Tier::Tier3),
        other => Err(corrupt("tier", &other.to_string())),
    }
}

/// One row of `healing_patterns`: error type, context signature, strategy,
/// successes, failures, total recovery milliseconds.
pub(crate) type PatternRow = (String, String, String, i64, i64, f64);

/// The statistics from the counts and rows every backend reads the same way.
pub(crate) fn healing_statistics(
    (total_errors, errors_last_hour, active_recoveries): (i64, i64, i64),
    by_type: Vec<(String, i64)>,
    patterns: Vec<PatternRow>,
) -> Result<HealingStatistics> {
    Ok(HealingStatistics {
        total_errors,
        errors_last_hour,
        active_recoveries,
        errors_by_type: by_type
            .into_iter()
            .map(|(t, n)| Ok((error_type(&t)?, n)))
            .collect::<Result<_>>()?,
        patterns: patterns
            .into_iter()
            .map(|(t, signature, s, successes, failures, total_ms)| {
                Ok(PatternStatistics {
                    error_type: error_type(&t)?,
                    context_signature: signature,
                    strategy: strategy(&s)?,
                    successes,
                    failures,
                    total_recovery_secs: total_ms / 1000.0,
                })
            })
            .collect::<Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_spellings_are_corrupt_rows_naming_the_value() {
        assert_eq!(status("BUSY").unwrap(), AgentStatus::Busy);
        let err = status("SLEEPING").unwrap_err().to_string();
        assert_eq!(err, "internal error");
        assert!(matches!(tier(4), Err(Error::Internal(m)) if m.contains("tier \"4\"")));
        assert_eq!(recovery_source(None).unwrap(), RecoverySource::Default);
    }
}
