//! Error events, recovery actions and learned patterns in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Transaction};

use super::{PgStore, db_error};
use crate::domain::healing::{self, Context, ErrorType, Evidence, Strategy};
use crate::domain::healing_records::{
    ErrorEvent, HealingStatistics, NewErrorEvent, PatternStatistics, RecoveryAction,
    RecoveryOutcome, RecoveryStatus,
};
use crate::error::{Error, Result};
use crate::storage::{ErrorEventQuery, HealingStore, Planner, RecoveryActionQuery};

/// The window in which repeated errors make an event "recurring".
const RECURRENCE_WINDOW_SECS: f64 = 3600.0;

const EVENT_COLUMNS: &str =
    "id, agent_id, message, context, error_type, severity, critical, recurring, occurred_at";

/// An ACTIVE action past its lease reads as EXPIRED, whoever asks and whenever.
const ACTION_COLUMNS: &str = "id, error_event_id, agent_id, error_type, context_signature, \
     strategy, chosen_strategy, parameters, estimated_duration_ms, success_probability, risk, \
     escalated, reason, \
     CASE WHEN status = 'ACTIVE' AND lease_expires_at <= now() THEN 'EXPIRED' ELSE status END \
         AS status, \
     created_at, lease_expires_at, completed_at, duration_ms, details";

#[derive(FromRow)]
struct EventRow {
    id: i64,
    agent_id: String,
    message: String,
    context: Json<Context>,
    error_type: String,
    severity: f64,
    critical: bool,
    recurring: bool,
    occurred_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct ActionRow {
    id: i64,
    error_event_id: i64,
    agent_id: String,
    error_type: String,
    context_signature: String,
    strategy: String,
    chosen_strategy: String,
    parameters: Json<Context>,
    estimated_duration_ms: i64,
    success_probability: f64,
    risk: f64,
    escalated: bool,
    reason: String,
    status: String,
    created_at: DateTime<Utc>,
    lease_expires_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    duration_ms: Option<i64>,
    details: Option<String>,
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("stored {what} {value:?} is not recognised"))
}

fn parse_type(s: &str) -> Result<ErrorType> {
    ErrorType::parse(s).ok_or_else(|| corrupt("error type", s))
}

fn parse_strategy(s: &str) -> Result<Strategy> {
    Strategy::parse(s).ok_or_else(|| corrupt("strategy", s))
}

impl TryFrom<EventRow> for ErrorEvent {
    type Error = Error;

    fn try_from(row: EventRow) -> Result<ErrorEvent> {
        Ok(ErrorEvent {
            id: row.id,
            error_type: parse_type(&row.error_type)?,
            agent_id: row.agent_id,
            message: row.message,
            context: row.context.0,
            severity: row.severity,
            critical: row.critical,
            recurring: row.recurring,
            occurred_at: row.occurred_at,
        })
    }
}

impl TryFrom<ActionRow> for RecoveryAction {
    type Error = Error;

    fn try_from(row: ActionRow) -> Result<RecoveryAction> {
        Ok(RecoveryAction {
            id: row.id,
            error_event_id: row.error_event_id,
            error_type: parse_type(&row.error_type)?,
            strategy: parse_strategy(&row.strategy)?,
            chosen_strategy: parse_strategy(&row.chosen_strategy)?,
            status: RecoveryStatus::parse(&row.status)
                .ok_or_else(|| corrupt("recovery status", &row.status))?,
            agent_id: row.agent_id,
            context_signature: row.context_signature,
            parameters: row.parameters.0,
            estimated_duration: Duration::milliseconds(row.estimated_duration_ms),
            success_probability: row.success_probability,
            risk: row.risk,
            escalated: row.escalated,
            reason: row.reason,
            created_at: row.created_at,
            lease_expires_at: row.lease_expires_at,
            completed_at: row.completed_at,
            duration: row.duration_ms.map(Duration::milliseconds),
            details: row.details,
        })
    }
}

fn millis(d: Duration) -> i64 {
    d.num_milliseconds()
}

async fn active_action(
    tx: &mut Transaction<'_, Postgres>,
    agent_id: &str,
) -> Result<Option<RecoveryAction>> {
    let row: Option<ActionRow> = sqlx::query_as(&format!(
        "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE agent_id = $1 AND status = 'ACTIVE'"
    ))
    .bind(agent_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_error)?;
    row.map(RecoveryAction::try_from).transpose()
}

fn already_active(action: &RecoveryAction) -> Error {
    Error::FailedPrecondition(format!(
        "agent {:?} already has an active recovery: action {} ({}), planned at {}, lease until {}",
        action.agent_id,
        action.id,
        action.strategy.as_str(),
        action.created_at.to_rfc3339(),
        action.lease_expires_at.to_rfc3339(),
    ))
}

#[async_trait]
impl HealingStore for PgStore {
    async fn record_error(&self, event: NewErrorEvent) -> Result<ErrorEvent> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Serialise one agent's reports so that concurrent ones count each other.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('fleetcare.errors:' || $1, 0))")
            .bind(&event.agent_id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let earlier: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM error_events
             WHERE agent_id = $1 AND error_type = $2
               AND occurred_at > now() - make_interval(secs => $3)",
        )
        .bind(&event.agent_id)
        .bind(event.error_type.as_str())
        .bind(RECURRENCE_WINDOW_SECS)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let row: EventRow = sqlx::query_as(&format!(
            "INSERT INTO error_events
                 (agent_id, message, context, error_type, severity, critical, recurring, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now())
             RETURNING {EVENT_COLUMNS}"
        ))
        .bind(&event.agent_id)
        .bind(&event.message)
        .bind(Json(&event.context))
        .bind(event.error_type.as_str())
        .bind(event.severity)
        .bind(healing::is_critical(event.severity))
        .bind(healing::is_recurring(earlier + 1))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        row.try_into()
    }

    async fn plan_recovery(
        &self,
        error_event_id: i64,
        lease: Duration,
        planner: Planner<'_>,
    ) -> Result<RecoveryAction> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let event: ErrorEvent = sqlx::query_as::<_, EventRow>(&format!(
            "SELECT {EVENT_COLUMNS} FROM error_events WHERE id = $1"
        ))
        .bind(error_event_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::NotFound {
            kind: "error event",
            id: error_event_id.to_string(),
        })?
        .try_into()?;
        // Free the agent from a recovery whose lease ran out without an outcome.
        sqlx::query(
            "UPDATE recovery_actions SET status = 'EXPIRED'
             WHERE agent_id = $1 AND status = 'ACTIVE' AND lease_expires_at <= now()",
        )
        .bind(&event.agent_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some(active) = active_action(&mut tx, &event.agent_id).await? {
            return Err(already_active(&active));
        }
        let signature = healing::context_signature(&event.context);
        let evidence: Vec<(String, i64, i64, f64)> = sqlx::query_as(
            "SELECT strategy, successes, failures, total_recovery_ms FROM healing_patterns
             WHERE error_type = $1 AND context_signature = $2",
        )
        .bind(event.error_type.as_str())
        .bind(&signature)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let evidence = evidence
            .into_iter()
            .map(|(strategy, successes, failures, total_ms)| {
                Ok(Evidence {
                    strategy: parse_strategy(&strategy)?,
                    successes,
                    failures,
                    total_recovery_secs: total_ms / 1000.0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = planner(&event, &evidence);
        let inserted = sqlx::query_as::<_, ActionRow>(&format!(
            "INSERT INTO recovery_actions
                 (error_event_id, agent_id, error_type, context_signature, strategy, chosen_strategy,
                  parameters, estimated_duration_ms, success_probability, risk, escalated, reason,
                  status, created_at, lease_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'ACTIVE', now(),
                     now() + make_interval(secs => $13::float8 / 1000))
             RETURNING {ACTION_COLUMNS}"
        ))
        .bind(event.id)
        .bind(&event.agent_id)
        .bind(event.error_type.as_str())
        .bind(&signature)
        .bind(plan.strategy.as_str())
        .bind(plan.chosen.as_str())
        .bind(Json(&plan.parameters))
        .bind(millis(plan.estimated_duration))
        .bind(plan.success_probability)
        .bind(plan.risk)
        .bind(plan.escalated)
        .bind(&plan.reason)
        .bind(millis(lease) as f64)
        .fetch_one(&mut *tx)
        .await;
        match inserted {
            Ok(row) => {
                tx.commit().await.map_err(db_error)?;
                row.try_into()
            }
            // A concurrent plan for the same agent committed first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                drop(tx);
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                match active_action(&mut tx, &event.agent_id).await? {
                    Some(active) => Err(already_active(&active)),
                    None => Err(Error::Aborted(
                        "a concurrent recovery plan for this agent conflicted, retry".into(),
                    )),
                }
            }
            Err(e) => Err(db_error(e)),
        }
    }

    async fn record_recovery_outcome(
        &self,
        action_id: i64,
        outcome: RecoveryOutcome,
    ) -> Result<RecoveryAction> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let current: RecoveryAction = sqlx::query_as::<_, ActionRow>(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE id = $1 FOR UPDATE"
        ))
        .bind(action_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?
        .ok_or_else(|| Error::NotFound {
            kind: "recovery action",
            id: action_id.to_string(),
        })?
        .try_into()?;
        match current.status {
            // A late outcome of an expired recovery still teaches the planner.
            RecoveryStatus::Active | RecoveryStatus::Expired => {}
            RecoveryStatus::Succeeded | RecoveryStatus::Failed => {
                return Err(Error::FailedPrecondition(format!(
                    "recovery action {action_id} already has an outcome ({})",
                    current.status.as_str()
                )));
            }
        }
        let status = if outcome.success {
            RecoveryStatus::Succeeded
        } else {
            RecoveryStatus::Failed
        };
        let row: ActionRow = sqlx::query_as(&format!(
            "UPDATE recovery_actions
             SET status = $2, completed_at = now(), duration_ms = $3, details = $4
             WHERE id = $1
             RETURNING {ACTION_COLUMNS}"
        ))
        .bind(action_id)
        .bind(status.as_str())
        .bind(millis(outcome.duration))
        .bind(&outcome.details)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        // Learn for the strategy that was actually carried out.
        sqlx::query(
            "INSERT INTO healing_patterns
                 (error_type, context_signature, strategy, successes, failures, total_recovery_ms, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, now())
             ON CONFLICT (error_type, context_signature, strategy) DO UPDATE SET
                 successes = healing_patterns.successes + EXCLUDED.successes,
                 failures = healing_patterns.failures + EXCLUDED.failures,
                 total_recovery_ms = healing_patterns.total_recovery_ms + EXCLUDED.total_recovery_ms,
                 updated_at = now()",
        )
        .bind(current.error_type.as_str())
        .bind(&current.context_signature)
        .bind(current.strategy.as_str())
        .bind(i64::from(outcome.success))
        .bind(i64::from(!outcome.success))
        .bind(millis(outcome.duration) as f64)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        row.try_into()
    }

    async fn healing_statistics(&self) -> Result<HealingStatistics> {
        let (total_errors, errors_last_hour, active_recoveries): (i64, i64, i64) = sqlx::query_as(
            "SELECT
                 (SELECT count(*) FROM error_events),
                 (SELECT count(*) FROM error_events WHERE occurred_at > now() - interval '1 hour'),
                 (SELECT count(*) FROM recovery_actions
                   WHERE status = 'ACTIVE' AND lease_expires_at > now())",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        let by_type: Vec<(String, i64)> = sqlx::query_as(
            "SELECT error_type, count(*) FROM error_events GROUP BY error_type ORDER BY error_type",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let patterns: Vec<(String, String, String, i64, i64, f64)> = sqlx::query_as(
            "SELECT error_type, context_signature, strategy, successes, failures, total_recovery_ms
             FROM healing_patterns ORDER BY error_type, context_signature, strategy",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(HealingStatistics {
            total_errors,
            errors_last_hour,
            active_recoveries,
            errors_by_type: by_type
                .into_iter()
                .map(|(t, n)| Ok((parse_type(&t)?, n)))
                .collect::<Result<_>>()?,
            patterns: patterns
                .into_iter()
                .map(|(t, signature, strategy, successes, failures, total_ms)| {
                    Ok(PatternStatistics {
                        error_type: parse_type(&t)?,
                        context_signature: signature,
                        strategy: parse_strategy(&strategy)?,
                        successes,
                        failures,
                        total_recovery_secs: total_ms / 1000.0,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    async fn list_error_events(&self, query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM error_events
             WHERE ($1::text IS NULL OR agent_id = $1)
               AND ($2::text IS NULL OR error_type = $2)
               AND ($3::bigint IS NULL OR id < $3)
             ORDER BY id DESC
             LIMIT $4"
        ))
        .bind(query.agent_id.as_deref())
        .bind(query.error_type.map(ErrorType::as_str))
        .bind(query.before_id)
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(ErrorEvent::try_from).collect()
    }

    async fn list_recovery_actions(
        &self,
        query: &RecoveryActionQuery,
    ) -> Result<Vec<RecoveryAction>> {
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT * FROM (SELECT {ACTION_COLUMNS} FROM recovery_actions
                            WHERE ($1::text IS NULL OR agent_id = $1)
                              AND ($2::text IS NULL OR error_type = $2)
                              AND ($4::bigint IS NULL OR id < $4)) a
             WHERE ($3::text IS NULL OR a.status = $3)
             ORDER BY id DESC
             LIMIT $5"
        ))
        .bind(query.agent_id.as_deref())
        .bind(query.error_type.map(ErrorType::as_str))
        .bind(query.status.map(RecoveryStatus::as_str))
        .bind(query.before_id)
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RecoveryAction::try_from).collect()
    }
}
