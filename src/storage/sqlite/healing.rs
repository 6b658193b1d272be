//! Error events, recovery actions and learned patterns in the embedded store:
//! the SQL of the flows in `storage::healing` ([`HealingTx`]), and the reads.
//! Every write runs in [`SqliteStore::begin_write`] (`BEGIN IMMEDIATE`), which
//! serialises them all, so what Postgres gets from advisory and row locks
//! holds here by construction. The store's clock is read once per
//! transaction ([`SqliteStore::store_now`]), after the write lock is taken.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, Transaction};

use super::{SqliteStore, is_unique_violation, micros, sqlite_error};
use crate::domain::brakes::{Breaker, Census, Decision, Pause, Scope, Verdict};
use crate::domain::healing::Strategy;
use crate::domain::healing::{Context, ErrorType, RecurrenceWindow};
use crate::domain::healing_records::{
    ErrorEvent, LeaseFilter, NewErrorEvent, RecoveryAction, RecoveryStatus, StoredStatusFilter,
};
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::healing::{
    self as flows, ACTION_COLUMNS, BrakeCounts, BrakeLock, BrakeRow, BudgetQuery, DECISION_COLUMNS,
    EVENT_COLUMNS, EvidenceRow, Finish, HealingTx, HealingTxs, Lesson, NewRecovery, millis,
};
use crate::storage::{DecisionQuery, ErrorEventQuery, RecoveryActionQuery};

type EventRow = flows::EventRow<i64, String>;
type ActionRow = flows::ActionRow<i64, String>;
type DecisionRow = flows::DecisionRow<i64>;

/// Pushes a condition true for rows whose (status, lease) match one of the
/// domain's [`StoredStatusFilter`]s (none: no row).
fn push_status_filter(qb: &mut QueryBuilder<'_, Sqlite>, filters: &[StoredStatusFilter]) {
    if filters.is_empty() {
        qb.push("0");
        return;
    }
    qb.push("(");
    for (i, f) in filters.iter().enumerate() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push("(status = ").push_bind(f.status.as_str());
        match f.lease {
            LeaseFilter::Any => {}
            LeaseFilter::EndsAfter(t) => {
                qb.push(" AND lease_expires_at > ").push_bind(micros(t));
            }
            LeaseFilter::EndedBy(t) => {
                qb.push(" AND lease_expires_at <= ").push_bind(micros(t));
            }
        }
        qb.push(")");
    }
    qb.push(")");
}

/// A context as stored: a JSON object in TEXT.
fn context_text(context: &Context) -> Result<String> {
    serde_json::to_string(context).map_err(|e| Error::Internal(format!("context encoding: {e}")))
}

/// One transaction on the embedded store, of the healing flows and the
/// pipeline's (`pipeline.rs`). Its one writer serialises every write
/// transaction, so the locks are no-ops: nobody else can change what a write
/// transaction read until it commits.
pub(super) struct SqliteTx<'s> {
    pub(super) store: &'s SqliteStore,
    pub(super) tx: Transaction<'static, Sqlite>,
}

#[async_trait]
impl HealingTxs for SqliteStore {
    fn writes_serialised(&self) -> bool {
        true
    }

    async fn begin_write(&self) -> Result<Box<dyn HealingTx + '_>> {
        let tx = SqliteStore::begin_write(self).await?;
        Ok(Box::new(SqliteTx { store: self, tx }))
    }

    async fn begin_read(&self) -> Result<Box<dyn HealingTx + '_>> {
        let tx = self.readers().begin().await.map_err(sqlite_error)?;
        Ok(Box::new(SqliteTx { store: self, tx }))
    }

    async fn error_events(&self, query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>> {
        // Only the given filters, so SQLite's planner can pick an index for them.
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {EVENT_COLUMNS} FROM error_events WHERE 1"
        ));
        if let Some(agent_id) = &query.agent_id {
            qb.push(" AND agent_id = ").push_bind(agent_id.clone());
        }
        if let Some(error_type) = query.error_type {
            qb.push(" AND error_type = ").push_bind(error_type.as_str());
        }
        if let Some(before_id) = query.before_id {
            qb.push(" AND id < ").push_bind(before_id);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(query.limit);
        let rows: Vec<EventRow> = qb
            .build_query_as()
            .fetch_all(self.readers())
            .await
            .map_err(sqlite_error)?;
        rows.into_iter().map(ErrorEvent::try_from).collect()
    }
}

#[async_trait]
impl HealingTx for SqliteTx<'_> {
    async fn now(&mut self) -> Result<DateTime<Utc>> {
        Ok(self.store.store_now())
    }

    async fn lock_agent_errors(&mut self, _agent_id: &str) -> Result<()> {
        Ok(())
    }

    async fn count_errors(
        &mut self,
        agent_id: &str,
        error_type: ErrorType,
        window: RecurrenceWindow,
    ) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM error_events
             WHERE agent_id = ?1 AND error_type = ?2 AND occurred_at > ?3 AND occurred_at <= ?4",
        )
        .bind(agent_id)
        .bind(error_type.as_str())
        .bind(micros(window.after))
        .bind(micros(window.until))
        .fetch_one(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn insert_error(
        &mut self,
        event: &NewErrorEvent,
        critical: bool,
        recurring: bool,
        at: DateTime<Utc>,
    ) -> Result<ErrorEvent> {
        sqlx::query_as::<_, EventRow>(&format!(
            "INSERT INTO error_events
                 (agent_id, message, context, error_type, severity, critical, recurring, occurred_at,
                  actor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             RETURNING {EVENT_COLUMNS}"
        ))
        .bind(&event.agent_id)
        .bind(&event.message)
        .bind(context_text(&event.context)?)
        .bind(event.error_type.as_str())
        .bind(event.severity)
        .bind(critical)
        .bind(recurring)
        .bind(micros(at))
        .bind(&event.actor)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(sqlite_error)?
        .try_into()
    }

    async fn error_event(&mut self, id: i64) -> Result<Option<ErrorEvent>> {
        sqlx::query_as::<_, EventRow>(&format!(
            "SELECT {EVENT_COLUMNS} FROM error_events WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(sqlite_error)?
        .map(ErrorEvent::try_from)
        .transpose()
    }

    async fn lock_active_recovery(&mut self, agent_id: &str) -> Result<Option<RecoveryAction>> {
        sqlx::query_as::<_, ActionRow>(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE agent_id = ?1 AND status = ?2"
        ))
        .bind(agent_id)
        .bind(RecoveryStatus::Active.as_str())
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(sqlite_error)?
        .map(RecoveryAction::try_from)
        .transpose()
    }

    async fn lock_recovery(&mut self, id: i64) -> Result<Option<RecoveryAction>> {
        sqlx::query_as::<_, ActionRow>(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(sqlite_error)?
        .map(RecoveryAction::try_from)
        .transpose()
    }

    async fn set_recovery_status(&mut self, id: i64, status: RecoveryStatus) -> Result<()> {
        sqlx::query("UPDATE recovery_actions SET status = ?2 WHERE id = ?1")
            .bind(id)
            .bind(status.as_str())
            .execute(&mut *self.tx)
            .await
            .map_err(sqlite_error)?;
        Ok(())
    }

    async fn evidence(
        &mut self,
        error_type: ErrorType,
        context_signature: &str,
    ) -> Result<Vec<EvidenceRow>> {
        sqlx::query_as(
            "SELECT strategy, successes, failures, total_recovery_ms FROM healing_patterns
             WHERE error_type = ?1 AND context_signature = ?2",
        )
        .bind(error_type.as_str())
        .bind(context_signature)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn insert_recovery(&mut self, new: &NewRecovery<'_>) -> Result<Option<RecoveryAction>> {
        let (event, plan) = (new.event, new.plan);
        let inserted = sqlx::query_as::<_, ActionRow>(&format!(
            "INSERT INTO recovery_actions
                 (error_event_id, agent_id, error_type, context_signature, strategy, chosen_strategy,
                  parameters, estimated_duration_ms, success_probability, risk, escalated, reason,
                  status, created_at, lease_expires_at, actor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             RETURNING {ACTION_COLUMNS}"
        ))
        .bind(event.id)
        .bind(&event.agent_id)
        .bind(event.error_type.as_str())
        .bind(new.context_signature)
        .bind(plan.strategy.as_str())
        .bind(plan.chosen.as_str())
        .bind(context_text(&plan.parameters)?)
        .bind(millis(plan.estimated_duration))
        .bind(plan.success_probability)
        .bind(plan.risk)
        .bind(plan.escalated)
        .bind(&plan.reason)
        .bind(RecoveryStatus::Active.as_str())
        .bind(micros(new.created_at))
        .bind(micros(new.lease_expires_at))
        .bind(new.actor)
        .fetch_one(&mut *self.tx)
        .await;
        match inserted {
            Ok(row) => Ok(Some(row.try_into()?)),
            Err(e) if is_unique_violation(&e) => Ok(None),
            Err(e) => Err(sqlite_error(e)),
        }
    }

    async fn finish_recovery(&mut self, id: i64, finish: &Finish<'_>) -> Result<RecoveryAction> {
        sqlx::query_as::<_, ActionRow>(&format!(
            "UPDATE recovery_actions
             SET status = ?2, completed_at = ?5, duration_ms = ?3, details = ?4,
                 outcome_actor = ?6
             WHERE id = ?1
             RETURNING {ACTION_COLUMNS}"
        ))
        .bind(id)
        .bind(finish.status.as_str())
        .bind(finish.duration_ms)
        .bind(finish.details)
        .bind(micros(finish.completed_at))
        .bind(finish.actor)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(sqlite_error)?
        .try_into()
    }

    async fn learn(&mut self, lesson: &Lesson<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO healing_patterns
                 (error_type, context_signature, strategy, successes, failures, total_recovery_ms, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (error_type, context_signature, strategy) DO UPDATE SET
                 successes = healing_patterns.successes + excluded.successes,
                 failures = healing_patterns.failures + excluded.failures,
                 total_recovery_ms = healing_patterns.total_recovery_ms + excluded.total_recovery_ms,
                 updated_at = excluded.updated_at",
        )
        .bind(lesson.error_type.as_str())
        .bind(lesson.context_signature)
        .bind(lesson.strategy.as_str())
        .bind(lesson.successes)
        .bind(lesson.failures)
        .bind(lesson.recovery_ms)
        .bind(micros(lesson.at))
        .execute(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(())
    }

    async fn statistics_counts(
        &mut self,
        recent_since: DateTime<Utc>,
        filters: &[StoredStatusFilter],
    ) -> Result<(i64, i64, i64)> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT
                 (SELECT count(*) FROM error_events),
                 (SELECT count(*) FROM error_events WHERE occurred_at > ",
        );
        qb.push_bind(micros(recent_since));
        qb.push("), (SELECT count(*) FROM recovery_actions WHERE ");
        push_status_filter(&mut qb, filters);
        qb.push(")");
        qb.build_query_as()
            .fetch_one(&mut *self.tx)
            .await
            .map_err(sqlite_error)
    }

    async fn errors_by_type(&mut self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as(
            "SELECT error_type, count(*) FROM error_events GROUP BY error_type ORDER BY error_type",
        )
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn patterns(&mut self) -> Result<Vec<decode::PatternRow>> {
        sqlx::query_as(
            "SELECT error_type, context_signature, strategy, successes, failures, total_recovery_ms
             FROM healing_patterns ORDER BY error_type, context_signature, strategy",
        )
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn recovery_actions(
        &mut self,
        query: &RecoveryActionQuery,
        status: Option<&[StoredStatusFilter]>,
    ) -> Result<Vec<RecoveryAction>> {
        // Only the given filters, so SQLite's planner can pick an index for them.
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE 1"
        ));
        if let Some(agent_id) = &query.agent_id {
            qb.push(" AND agent_id = ").push_bind(agent_id.clone());
        }
        if let Some(error_type) = query.error_type {
            qb.push(" AND error_type = ").push_bind(error_type.as_str());
        }
        if let Some(before_id) = query.before_id {
            qb.push(" AND id < ").push_bind(before_id);
        }
        if let Some(event) = query.error_event_id {
            qb.push(" AND error_event_id = ").push_bind(event);
        }
        if let Some(filters) = status {
            qb.push(" AND ");
            push_status_filter(&mut qb, filters);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(query.limit);
        let rows: Vec<ActionRow> = qb
            .build_query_as()
            .fetch_all(&mut *self.tx)
            .await
            .map_err(sqlite_error)?;
        rows.into_iter().map(RecoveryAction::try_from).collect()
    }

    async fn actions_of_events(&mut self, event_ids: &[i64]) -> Result<Vec<RecoveryAction>> {
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions
             WHERE error_event_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(serde_json::to_string(event_ids).map_err(|e| Error::Internal(e.to_string()))?)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(RecoveryAction::try_from).collect()
    }

    async fn delete_actions_before(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query(
            "DELETE FROM recovery_actions
             WHERE created_at < ?1 AND (status <> 'ACTIVE' OR lease_expires_at < ?1)",
        )
        .bind(micros(before))
        .execute(&mut *self.tx)
        .await
        .map(|r| r.rows_affected())
        .map_err(sqlite_error)
    }

    async fn delete_events_before(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query(
            "DELETE FROM error_events
             WHERE occurred_at < ?1
               AND NOT EXISTS (SELECT 1 FROM recovery_actions r
                               WHERE r.error_event_id = error_events.id)",
        )
        .bind(micros(before))
        .execute(&mut *self.tx)
        .await
        .map(|r| r.rows_affected())
        .map_err(sqlite_error)
    }

    async fn brake_counts(
        &mut self,
        now: DateTime<Utc>,
        rate_since: DateTime<Utc>,
        group: Option<(&str, &str)>,
        budget: Option<BudgetQuery<'_>>,
    ) -> Result<BrakeCounts> {
        let (key, value) = group.unzip();
        // The agents' counts are kept (`agent_census`, by triggers on
        // `agents`); counted here: the active recoveries (each one's agent
        // looked up by key), the last minute's plans and the agent's own.
        let row: BrakeRow<i64> = sqlx::query_as(&format!(
            "WITH active AS (
                 SELECT a.status, {} AS grp
                 FROM recovery_actions r LEFT JOIN agents a ON a.agent_id = r.agent_id
                 WHERE r.status = 'ACTIVE' AND r.lease_expires_at > ?1),
             fleet AS (
                 SELECT agents - exhausted AS counted, offline FROM agent_census
                 WHERE label_key = '' AND label_value = ''),
             grp AS (
                 SELECT agents - exhausted AS counted, offline FROM agent_census
                 WHERE label_key = ?3 AND label_value = ?4),
             success AS (
                 SELECT max(completed_at) AS at FROM recovery_actions
                 WHERE agent_id = ?5 AND status = 'SUCCEEDED')
             SELECT coalesce((SELECT counted FROM fleet), 0)
                        + (SELECT count(*) FROM active WHERE status IS NULL),
                    coalesce((SELECT offline FROM fleet), 0)
                        + (SELECT count(*) FROM active
                           WHERE status IS NULL OR status NOT IN ('OFFLINE', 'EXHAUSTED')),
                    coalesce((SELECT counted FROM grp), 0),
                    coalesce((SELECT offline FROM grp), 0)
                        + (SELECT count(*) FROM active
                           WHERE grp = ?4 AND status NOT IN ('OFFLINE', 'EXHAUSTED')),
                    (SELECT count(*) FROM recovery_actions WHERE created_at > ?2),
                    (SELECT count(*) FROM healing_decisions
                     WHERE verdict = 'PLANNED' AND group_name = ?4 AND decided_at > ?2),
                    (SELECT at FROM success),
                    (SELECT count(*) FROM error_events e, success s
                     WHERE e.agent_id = ?5 AND e.occurred_at > s.at AND e.id <> ?6),
                    (SELECT count(*) FROM recovery_actions r
                     WHERE r.agent_id = ?5 AND r.created_at > ?7),
                    (SELECT count(*) FROM recovery_actions r, success s
                     WHERE r.agent_id = ?5 AND r.created_at > s.at)",
            label_of("a.labels", "?3")
        ))
        .bind(micros(now))
        .bind(micros(rate_since))
        .bind(key)
        .bind(value)
        .bind(budget.map(|b| b.agent_id))
        .bind(budget.map_or(0, |b| b.except))
        .bind(budget.map(|b| micros(b.window_start)))
        .fetch_one(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(flows::brake_counts(row))
    }

    async fn brake_agent(
        &mut self,
        agent_id: &str,
        group_by: Option<&str>,
        _lock: BrakeLock,
    ) -> Result<Option<(String, Option<String>)>> {
        sqlx::query_as(&format!(
            "SELECT status, {} FROM agents WHERE agent_id = ?1",
            label_of("labels", "?2")
        ))
        .bind(agent_id)
        .bind(group_by)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn group_censuses(
        &mut self,
        now: DateTime<Utc>,
        group_by: &str,
    ) -> Result<Vec<(String, Census)>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
            "WITH active AS (
                 SELECT {} AS grp, count(*) AS n
                 FROM recovery_actions r JOIN agents a ON a.agent_id = r.agent_id
                 WHERE r.status = 'ACTIVE' AND r.lease_expires_at > ?1
                   AND a.status NOT IN ('OFFLINE', 'EXHAUSTED')
                 GROUP BY 1)
             SELECT c.label_value, c.agents - c.exhausted, c.offline + coalesce(active.n, 0)
             FROM agent_census c LEFT JOIN active ON active.grp = c.label_value
             WHERE c.label_key = ?2 AND c.agents > c.exhausted
             ORDER BY 1",
            label_of("a.labels", "?2")
        ))
        .bind(micros(now))
        .bind(group_by)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(rows
            .into_iter()
            .map(|(group, counted, unhealthy)| (group, flows::census(counted, unhealthy)))
            .collect())
    }

    async fn busiest_agents(
        &mut self,
        since: DateTime<Utc>,
        at_least: u32,
    ) -> Result<Vec<(String, u32)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, count(*) FROM recovery_actions WHERE created_at > ?1
             GROUP BY agent_id HAVING count(*) >= ?2 ORDER BY agent_id",
        )
        .bind(micros(since))
        .bind(i64::from(at_least))
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(rows
            .into_iter()
            .map(|(a, n)| (a, flows::count(n)))
            .collect())
    }

    async fn pauses(&mut self) -> Result<Vec<Pause>> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT scope, reason, paused_by, paused_at FROM healing_pauses ORDER BY scope",
        )
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(flows::pause_row).collect()
    }

    async fn put_pause(&mut self, pause: &Pause) -> Result<()> {
        sqlx::query(
            "INSERT INTO healing_pauses (scope, reason, paused_by, paused_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (scope) DO UPDATE
             SET reason = excluded.reason, paused_by = excluded.paused_by,
                 paused_at = excluded.paused_at",
        )
        .bind(pause.scope.stored())
        .bind(&pause.reason)
        .bind(&pause.by)
        .bind(micros(pause.at))
        .execute(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(())
    }

    async fn delete_pause(&mut self, scope: &Scope) -> Result<bool> {
        sqlx::query("DELETE FROM healing_pauses WHERE scope = ?1")
            .bind(scope.stored())
            .execute(&mut *self.tx)
            .await
            .map(|r| r.rows_affected() > 0)
            .map_err(sqlite_error)
    }

    async fn breakers(
        &mut self,
        error_type: Option<ErrorType>,
        _lock: bool,
    ) -> Result<Vec<(ErrorType, Strategy, Breaker)>> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT error_type, strategy, state, failures, since FROM healing_breakers
             WHERE (?1 IS NULL OR error_type = ?1)
             ORDER BY error_type, strategy",
        )
        .bind(error_type.map(ErrorType::as_str))
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(flows::breaker_row).collect()
    }

    async fn put_breaker(
        &mut self,
        error_type: ErrorType,
        strategy: Strategy,
        breaker: &Breaker,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let (state, failures, since) = breaker.parts();
        sqlx::query(
            "INSERT INTO healing_breakers (error_type, strategy, state, failures, since, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (error_type, strategy) DO UPDATE
             SET state = excluded.state, failures = excluded.failures, since = excluded.since,
                 updated_at = excluded.updated_at",
        )
        .bind(error_type.as_str())
        .bind(strategy.as_str())
        .bind(state)
        .bind(i64::from(failures))
        .bind(since.map(micros))
        .bind(micros(at))
        .execute(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        Ok(())
    }

    async fn insert_decision(&mut self, d: &Decision) -> Result<i64> {
        let n = &d.numbers;
        sqlx::query_scalar(
            "INSERT INTO healing_decisions (error_event_id, agent_id, decided_at, verdict, reason,
                 message, strategy, recovery_action_id, fleet_counted, fleet_unhealthy, group_name,
                 group_counted, group_unhealthy, fleet_plans_last_minute, group_plans_last_minute,
                 agent_plans_in_window, actor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
             RETURNING id",
        )
        .bind(d.error_event_id)
        .bind(&d.agent_id)
        .bind(micros(d.decided_at))
        .bind(d.verdict.as_str())
        .bind(d.reason.as_deref())
        .bind(&d.message)
        .bind(d.strategy.map(Strategy::as_str))
        .bind(d.recovery_action_id)
        .bind(i64::from(n.fleet.counted))
        .bind(i64::from(n.fleet.unhealthy))
        .bind(n.group.as_deref())
        .bind(i64::from(n.group_census.counted))
        .bind(i64::from(n.group_census.unhealthy))
        .bind(i64::from(n.fleet_plans_last_minute))
        .bind(i64::from(n.group_plans_last_minute))
        .bind(i64::from(n.agent_plans_in_window))
        .bind(&d.actor)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(sqlite_error)
    }

    async fn decisions(&mut self, query: &DecisionQuery) -> Result<Vec<Decision>> {
        let rows: Vec<DecisionRow> = sqlx::query_as(&format!(
            "SELECT {DECISION_COLUMNS} FROM healing_decisions
             WHERE (?1 IS NULL OR agent_id = ?1)
               AND (?2 IS NULL OR error_event_id = ?2)
               AND (?3 IS NULL OR verdict = ?3)
               AND (?4 IS NULL OR id < ?4)
             ORDER BY id DESC
             LIMIT ?5"
        ))
        .bind(query.agent_id.as_deref())
        .bind(query.error_event_id)
        .bind(query.verdict.map(Verdict::as_str))
        .bind(query.before_id)
        .bind(query.limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(sqlite_error)?;
        rows.into_iter().map(Decision::try_from).collect()
    }

    async fn delete_decisions_before(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query("DELETE FROM healing_decisions WHERE decided_at < ?1")
            .bind(micros(before))
            .execute(&mut *self.tx)
            .await
            .map(|r| r.rows_affected())
            .map_err(sqlite_error)
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit().await.map_err(sqlite_error)
    }
}

/// The value of the label whose key is bound at `key` in the JSON `labels`
/// (label keys hold no quote, so the quoted path is exact: a key with dots
/// is one key, not a nested path).
fn label_of(labels: &str, key: &str) -> String {
    format!("json_extract({labels}, '$.\"' || {key} || '\"')")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::brakes::HealingPolicy;
    use crate::domain::healing::{Evidence, Plan, Strategy};
    use crate::domain::healing_records::RecoveryOutcome;
    use crate::storage::{HealingStore, Planner, StoreLocation, StoreOptions};
    use chrono::Duration;

    struct TempStore {
        store: SqliteStore,
        dir: std::path::PathBuf,
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn temp_store() -> TempStore {
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-healing-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let path = dir.join("fleetcare.db");
        let args = StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()));
        let store = SqliteStore::open(&path, &args).await.expect("store opens");
        TempStore { store, dir }
    }

    fn error(agent_id: &str) -> NewErrorEvent {
        NewErrorEvent {
            agent_id: agent_id.into(),
            message: "tool call failed".into(),
            context: Context::from([("tool".to_owned(), "bash".to_owned())]),
            error_type: ErrorType::ExecutionFailure,
            severity: 0.5,
            actor: "reporter".into(),
        }
    }

    fn planner(strategy: Strategy) -> Planner<'static> {
        Box::new(
            move |_event: &ErrorEvent, _evidence: &[Evidence], _closed_off: &[Strategy]| Plan {
                strategy,
                chosen: strategy,
                parameters: Context::from([("attempt".to_owned(), "1".to_owned())]),
                estimated_duration: Duration::seconds(30),
                success_probability: 0.7,
                risk: 0.1,
                escalated: false,
                reason: "heuristic".into(),
            },
        )
    }

    #[tokio::test]
    async fn the_third_error_within_the_window_is_recurring() {
        let t = temp_store().await;
        let first = t.store.record_error(error("a")).await.unwrap();
        assert!(!first.recurring);
        assert_eq!(first.context.get("tool").map(String::as_str), Some("bash"));
        assert!(!t.store.record_error(error("a")).await.unwrap().recurring);
        // Another agent's errors do not count.
        assert!(!t.store.record_error(error("b")).await.unwrap().recurring);
        assert!(t.store.record_error(error("a")).await.unwrap().recurring);
        let listed = t
            .store
            .list_error_events(&ErrorEventQuery {
                agent_id: Some("a".into()),
                limit: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].id > listed[1].id);
        // Stored at the store's precision.
        assert_eq!(listed[0].occurred_at.timestamp_subsec_nanos() % 1000, 0);
    }

    #[tokio::test]
    async fn a_second_plan_while_one_is_active_is_refused_naming_it() {
        let t = temp_store().await;
        let event = t.store.record_error(error("a")).await.unwrap();
        let active = t
            .store
            .plan_recovery(
                event.id,
                Duration::minutes(5),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Retry),
            )
            .await
            .unwrap();
        assert_eq!(active.status, RecoveryStatus::Active);
        match t
            .store
            .plan_recovery(
                event.id,
                Duration::minutes(5),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Restart),
            )
            .await
        {
            Err(Error::RecoveryAlreadyActive(refused)) => {
                assert_eq!(refused.action_id, active.id);
                assert_eq!(refused.strategy, Strategy::Retry);
            }
            other => panic!("expected RecoveryAlreadyActive, got {other:?}"),
        }
        // Another agent is not blocked.
        let other = t.store.record_error(error("b")).await.unwrap();
        t.store
            .plan_recovery(
                other.id,
                Duration::minutes(5),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Retry),
            )
            .await
            .unwrap();
        let stats = t.store.healing_statistics().await.unwrap();
        assert_eq!(stats.active_recoveries, 2);
        assert_eq!(stats.total_errors, 2);
        assert_eq!(stats.errors_last_hour, 2);
    }

    #[tokio::test]
    async fn an_expired_recovery_is_freed_before_the_next_plan() {
        let t = temp_store().await;
        let event = t.store.record_error(error("a")).await.unwrap();
        let lapsed = t
            .store
            .plan_recovery(
                event.id,
                Duration::zero(),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Retry),
            )
            .await
            .unwrap();
        // A zero lease is over at once: readers see it expired.
        assert_eq!(lapsed.status, RecoveryStatus::Expired);
        let next = t
            .store
            .plan_recovery(
                event.id,
                Duration::minutes(5),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Restart),
            )
            .await
            .unwrap();
        assert_eq!(next.status, RecoveryStatus::Active);
        let query = |status| RecoveryActionQuery {
            agent_id: Some("a".into()),
            status: Some(status),
            limit: 10,
            ..Default::default()
        };
        let expired = t
            .store
            .list_recovery_actions(&query(RecoveryStatus::Expired))
            .await
            .unwrap();
        assert_eq!(
            expired.iter().map(|a| a.id).collect::<Vec<_>>(),
            [lapsed.id]
        );
        let active = t
            .store
            .list_recovery_actions(&query(RecoveryStatus::Active))
            .await
            .unwrap();
        assert_eq!(active.iter().map(|a| a.id).collect::<Vec<_>>(), [next.id]);
        assert_eq!(
            active[0].parameters.get("attempt").map(String::as_str),
            Some("1")
        );
        let stored: String =
            sqlx::query_scalar("SELECT status FROM recovery_actions WHERE id = ?1")
                .bind(lapsed.id)
                .fetch_one(t.store.readers())
                .await
                .unwrap();
        assert_eq!(stored, "EXPIRED");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_plans_for_one_agent_yield_exactly_one() {
        let t = temp_store().await;
        let event = t.store.record_error(error("a")).await.unwrap();
        let plans = (0..8).map(|_| {
            let store = t.store.clone();
            tokio::spawn(async move {
                store
                    .plan_recovery(
                        event.id,
                        Duration::minutes(5),
                        "tester",
                        &HealingPolicy::unbraked(),
                        planner(Strategy::Retry),
                    )
                    .await
            })
        });
        let mut won = 0;
        for plan in plans.collect::<Vec<_>>() {
            match plan.await.unwrap() {
                Ok(_) => won += 1,
                Err(Error::RecoveryAlreadyActive(_)) => {}
                Err(other) => panic!("unexpected {other}"),
            }
        }
        assert_eq!(won, 1);
    }

    #[tokio::test]
    async fn an_outcome_ends_the_recovery_and_teaches_once() {
        let t = temp_store().await;
        let event = t.store.record_error(error("a")).await.unwrap();
        let action = t
            .store
            .plan_recovery(
                event.id,
                Duration::minutes(5),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Retry),
            )
            .await
            .unwrap();
        let outcome = RecoveryOutcome {
            success: true,
            duration: Duration::seconds(12),
            details: "ok".into(),
            actor: "tester".into(),
        };
        let done = t
            .store
            .record_recovery_outcome(action.id, outcome.clone(), &HealingPolicy::unbraked())
            .await
            .unwrap();
        assert_eq!(done.status, RecoveryStatus::Succeeded);
        assert_eq!(done.duration, Some(Duration::seconds(12)));
        assert_eq!(done.details.as_deref(), Some("ok"));
        assert!(done.completed_at.is_some());
        match t
            .store
            .record_recovery_outcome(action.id, outcome, &HealingPolicy::unbraked())
            .await
        {
            Err(Error::OutcomeAlreadyRecorded(refused)) => {
                assert_eq!(refused.status, RecoveryStatus::Succeeded)
            }
            other => panic!("expected OutcomeAlreadyRecorded, got {other:?}"),
        }
        assert!(matches!(
            t.store
                .record_recovery_outcome(
                    action.id + 100,
                    RecoveryOutcome {
                        success: false,
                        duration: Duration::zero(),
                        details: String::new(),
                        actor: "tester".into(),
                    },
                    &HealingPolicy::unbraked(),
                )
                .await,
            Err(Error::NotFound { .. })
        ));
        // A late (failed) outcome of an expired recovery still teaches.
        let lapsed = t
            .store
            .plan_recovery(
                event.id,
                Duration::zero(),
                "tester",
                &HealingPolicy::unbraked(),
                planner(Strategy::Retry),
            )
            .await
            .unwrap();
        let failed = t
            .store
            .record_recovery_outcome(
                lapsed.id,
                RecoveryOutcome {
                    success: false,
                    duration: Duration::seconds(8),
                    details: String::new(),
                    actor: "tester".into(),
                },
                &HealingPolicy::unbraked(),
            )
            .await
            .unwrap();
        assert_eq!(failed.status, RecoveryStatus::Failed);
        let stats = t.store.healing_statistics().await.unwrap();
        assert_eq!(stats.active_recoveries, 0);
        assert_eq!(stats.patterns.len(), 1);
        let p = &stats.patterns[0];
        assert_eq!(
            (p.strategy, p.successes, p.failures),
            (Strategy::Retry, 1, 1)
        );
        assert!((p.total_recovery_secs - 20.0).abs() < 1e-9);
        assert_eq!(stats.errors_by_type, [(ErrorType::ExecutionFailure, 1)]);
    }
}
