//! Error events, recovery actions and learned patterns in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Transaction};

use super::{PgStore, db_error};
use crate::domain::healing::{self, Context, ErrorType, Evidence};
use crate::domain::healing_records::{
    self as records, ErrorEvent, HealingStatistics, LeaseFilter, NewErrorEvent, RecoveryAction,
    RecoveryAlreadyActive, RecoveryOutcome, RecoveryStatus, StoredStatusFilter,
};
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::{ErrorEventQuery, HealingStore, Planner, RecoveryActionQuery};

const EVENT_COLUMNS: &str =
    "id, agent_id, message, context, error_type, severity, critical, recurring, occurred_at, actor";

/// The stored status; rows are read through [`ActionRow::at`], which lets the
/// domain decide what a reader sees.
const ACTION_COLUMNS: &str = "id, error_event_id, agent_id, error_type, context_signature, \
     strategy, chosen_strategy, parameters, estimated_duration_ms, success_probability, risk, \
     escalated, reason, status, created_at, lease_expires_at, completed_at, duration_ms, details, \
     actor, outcome_actor";

/// Rows whose (status, lease) match one of the domain's [`StoredStatusFilter`]s,
/// bound as three arrays from `$n`: stored status, lease ends after, lease ended by.
fn status_filter_sql(n: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM unnest(${n}::text[], ${}::timestamptz[], ${}::timestamptz[])
                     AS f(status, ends_after, ended_by)
                 WHERE recovery_actions.status = f.status
                   AND (f.ends_after IS NULL OR recovery_actions.lease_expires_at > f.ends_after)
                   AND (f.ended_by IS NULL OR recovery_actions.lease_expires_at <= f.ended_by))",
        n + 1,
        n + 2
    )
}

type FilterArrays = (
    Vec<&'static str>,
    Vec<Option<DateTime<Utc>>>,
    Vec<Option<DateTime<Utc>>>,
);

fn filter_arrays(filters: &[StoredStatusFilter]) -> FilterArrays {
    let mut arrays: FilterArrays = Default::default();
    for f in filters {
        let (after, by) = match f.lease {
            LeaseFilter::Any => (None, None),
            LeaseFilter::EndsAfter(t) => (Some(t), None),
            LeaseFilter::EndedBy(t) => (None, Some(t)),
        };
        arrays.0.push(f.status.as_str());
        arrays.1.push(after);
        arrays.2.push(by);
    }
    arrays
}

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
    actor: String,
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
    actor: String,
    outcome_actor: String,
}

impl TryFrom<EventRow> for ErrorEvent {
    type Error = Error;

    fn try_from(row: EventRow) -> Result<ErrorEvent> {
        Ok(ErrorEvent {
            id: row.id,
            error_type: decode::error_type(&row.error_type)?,
            agent_id: row.agent_id,
            message: row.message,
            context: row.context.0,
            severity: row.severity,
            critical: row.critical,
            recurring: row.recurring,
            occurred_at: row.occurred_at,
            actor: row.actor,
        })
    }
}

impl ActionRow {
    /// The action as a reader at `now` sees it.
    fn at(self, now: DateTime<Utc>) -> Result<RecoveryAction> {
        let stored = RecoveryStatus::parse(&self.status)
            .ok_or_else(|| decode::corrupt("recovery status", &self.status))?;
        let mut action = RecoveryAction::try_from(self)?;
        action.status = stored.as_of(action.lease_expires_at, now);
        Ok(action)
    }
}

/// The action as stored (use [`ActionRow::at`] for what a reader sees).
impl TryFrom<ActionRow> for RecoveryAction {
    type Error = Error;

    fn try_from(row: ActionRow) -> Result<RecoveryAction> {
        Ok(RecoveryAction {
            id: row.id,
            error_event_id: row.error_event_id,
            error_type: decode::error_type(&row.error_type)?,
            strategy: decode::strategy(&row.strategy)?,
            chosen_strategy: decode::strategy(&row.chosen_strategy)?,
            status: RecoveryStatus::parse(&row.status)
                .ok_or_else(|| decode::corrupt("recovery status", &row.status))?,
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
            actor: row.actor,
            outcome_actor: row.outcome_actor,
        })
    }
}

fn millis(d: Duration) -> i64 {
    d.num_milliseconds()
}

/// The agent's action stored as ACTIVE (at most one: the partial unique index),
/// locked, as stored: [`records::admit_plan`] decides whether it still holds.
async fn stored_active_action(
    tx: &mut Transaction<'_, Postgres>,
    agent_id: &str,
) -> Result<Option<RecoveryAction>> {
    let row: Option<ActionRow> = sqlx::query_as(&format!(
        "SELECT {ACTION_COLUMNS} FROM recovery_actions
         WHERE agent_id = $1 AND status = $2 FOR UPDATE"
    ))
    .bind(agent_id)
    .bind(RecoveryStatus::Active.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db_error)?;
    row.map(RecoveryAction::try_from).transpose()
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
        let now = self.now_in(&mut tx).await?;
        let window = healing::recurrence_window(now);
        let earlier: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM error_events
             WHERE agent_id = $1 AND error_type = $2 AND occurred_at > $3 AND occurred_at <= $4",
        )
        .bind(&event.agent_id)
        .bind(event.error_type.as_str())
        .bind(window.after)
        .bind(window.until)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let row: EventRow = sqlx::query_as(&format!(
            "INSERT INTO error_events
                 (agent_id, message, context, error_type, severity, critical, recurring, occurred_at,
                  actor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING {EVENT_COLUMNS}"
        ))
        .bind(&event.agent_id)
        .bind(&event.message)
        .bind(Json(&event.context))
        .bind(event.error_type.as_str())
        .bind(event.severity)
        .bind(healing::is_critical(event.severity))
        .bind(healing::recurring_given(earlier))
        .bind(now)
        .bind(&event.actor)
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
        actor: &str,
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
        let now = self.now_in(&mut tx).await?;
        let stored_active = stored_active_action(&mut tx, &event.agent_id).await?;
        // Free the agent from a recovery whose lease ran out without an outcome.
        if let Some(lapsed) = records::admit_plan(stored_active.as_ref(), now)? {
            sqlx::query("UPDATE recovery_actions SET status = $2 WHERE id = $1")
                .bind(lapsed)
                .bind(RecoveryStatus::Expired.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
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
                    strategy: decode::strategy(&strategy)?,
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
                  status, created_at, lease_expires_at, actor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
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
        .bind(RecoveryStatus::Active.as_str())
        .bind(now)
        .bind(records::lease_expires_at(now, lease))
        .bind(actor)
        .fetch_one(&mut *tx)
        .await;
        match inserted {
            Ok(row) => {
                tx.commit().await.map_err(db_error)?;
                row.at(now)
            }
            // A concurrent plan for the same agent committed first: the unique
            // index of one ACTIVE per agent refused this one.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                drop(tx);
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                let now = self.now_in(&mut tx).await?;
                let winner = stored_active_action(&mut tx, &event.agent_id).await?;
                match winner {
                    Some(active) if records::admit_plan(Some(&active), now).is_err() => {
                        Err(RecoveryAlreadyActive::of(&active).into())
                    }
                    _ => Err(Error::Conflict(format!(
                        "a concurrent recovery plan for agent {:?} won and is already over",
                        event.agent_id
                    ))),
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
        let now = self.now_in(&mut tx).await?;
        let current = sqlx::query_as::<_, ActionRow>(&format!(
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
        .at(now)?;
        let status = records::accept_outcome(&current, &outcome)?;
        let row: ActionRow = sqlx::query_as(&format!(
            "UPDATE recovery_actions
             SET status = $2, completed_at = $5, duration_ms = $3, details = $4,
                 outcome_actor = $6
             WHERE id = $1
             RETURNING {ACTION_COLUMNS}"
        ))
        .bind(action_id)
        .bind(status.as_str())
        .bind(millis(outcome.duration))
        .bind(&outcome.details)
        .bind(now)
        .bind(&outcome.actor)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        // Learn for the strategy that was actually carried out.
        sqlx::query(
            "INSERT INTO healing_patterns
                 (error_type, context_signature, strategy, successes, failures, total_recovery_ms, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (error_type, context_signature, strategy) DO UPDATE SET
                 successes = healing_patterns.successes + EXCLUDED.successes,
                 failures = healing_patterns.failures + EXCLUDED.failures,
                 total_recovery_ms = healing_patterns.total_recovery_ms + EXCLUDED.total_recovery_ms,
                 updated_at = EXCLUDED.updated_at",
        )
        .bind(current.error_type.as_str())
        .bind(&current.context_signature)
        .bind(current.strategy.as_str())
        .bind(i64::from(outcome.success))
        .bind(i64::from(!outcome.success))
        .bind(millis(outcome.duration) as f64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        row.at(now)
    }

    async fn healing_statistics(&self) -> Result<HealingStatistics> {
        // One transaction: every figure as of one `now`.
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = self.now_in(&mut tx).await?;
        let (statuses, ends_after, ended_by) =
            filter_arrays(&RecoveryStatus::Active.stored_as(now));
        let (total_errors, errors_last_hour, active_recoveries): (i64, i64, i64) =
            sqlx::query_as(&format!(
                "SELECT
                     (SELECT count(*) FROM error_events),
                     (SELECT count(*) FROM error_events WHERE occurred_at > $1),
                     (SELECT count(*) FROM recovery_actions WHERE {})",
                status_filter_sql(2)
            ))
            .bind(records::statistics_recent_since(now))
            .bind(statuses)
            .bind(ends_after)
            .bind(ended_by)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
        let by_type: Vec<(String, i64)> = sqlx::query_as(
            "SELECT error_type, count(*) FROM error_events GROUP BY error_type ORDER BY error_type",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let patterns: Vec<decode::PatternRow> = sqlx::query_as(
            "SELECT error_type, context_signature, strategy, successes, failures, total_recovery_ms
             FROM healing_patterns ORDER BY error_type, context_signature, strategy",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        decode::healing_statistics(
            (total_errors, errors_last_hour, active_recoveries),
            by_type,
            patterns,
        )
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
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = self.now_in(&mut tx).await?;
        let (statuses, ends_after, ended_by) = match query.status {
            Some(status) => {
                let (s, a, b) = filter_arrays(&status.stored_as(now));
                (Some(s), Some(a), Some(b))
            }
            None => (None, None, None),
        };
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions
             WHERE ($1::text IS NULL OR agent_id = $1)
               AND ($2::text IS NULL OR error_type = $2)
               AND ($3::bigint IS NULL OR id < $3)
               AND ($5::text[] IS NULL OR {})
             ORDER BY id DESC
             LIMIT $4",
            status_filter_sql(5)
        ))
        .bind(query.agent_id.as_deref())
        .bind(query.error_type.map(ErrorType::as_str))
        .bind(query.before_id)
        .bind(query.limit)
        .bind(statuses)
        .bind(ends_after)
        .bind(ended_by)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        rows.into_iter().map(|row| row.at(now)).collect()
    }
}
