//! Error events, recovery actions and learned patterns in Postgres: the SQL
//! of the flows in `storage::healing` ([`HealingTx`]), and the reads. Writes
//! lock what they read (an advisory lock per agent's reports, `FOR UPDATE` on
//! actions), so concurrent replicas serialise where they must.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use super::{PgStore, db_error};
use crate::domain::brakes::{Breaker, Census, Decision, Pause, Scope, Verdict};
use crate::domain::healing::Strategy;
use crate::domain::healing::{Context, ErrorType, RecurrenceWindow};
use crate::domain::healing_records::{
    ErrorEvent, LeaseFilter, NewErrorEvent, RecoveryAction, RecoveryStatus, StoredStatusFilter,
};
use crate::error::Result;
use crate::storage::decode;
use crate::storage::healing::{
    self as flows, ACTION_COLUMNS, BrakeCounts, BrakeLock, BrakeRow, BudgetQuery, DECISION_COLUMNS,
    EVENT_COLUMNS, EvidenceRow, Finish, HealingTx, HealingTxs, Lesson, NewRecovery, millis,
};
use crate::storage::{DecisionQuery, ErrorEventQuery, RecoveryActionQuery};

type EventRow = flows::EventRow<DateTime<Utc>, Json<Context>>;
type ActionRow = flows::ActionRow<DateTime<Utc>, Json<Context>>;
type DecisionRow = flows::DecisionRow<DateTime<Utc>>;

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

/// One transaction on Postgres, of the healing flows and the pipeline's
/// (`pipeline.rs`).
pub(super) struct PgTx<'s> {
    pub(super) store: &'s PgStore,
    pub(super) tx: Transaction<'static, Postgres>,
}

#[async_trait]
impl HealingTxs for PgStore {
    fn writes_serialised(&self) -> bool {
        false
    }

    async fn begin_write(&self) -> Result<Box<dyn HealingTx + '_>> {
        let tx = self.pool.begin().await.map_err(db_error)?;
        Ok(Box::new(PgTx { store: self, tx }))
    }

    async fn begin_read(&self) -> Result<Box<dyn HealingTx + '_>> {
        HealingTxs::begin_write(self).await
    }

    async fn error_events(&self, query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>> {
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
}

#[async_trait]
impl HealingTx for PgTx<'_> {
    async fn now(&mut self) -> Result<DateTime<Utc>> {
        self.store.now_in(&mut self.tx).await
    }

    async fn lock_agent_errors(&mut self, agent_id: &str) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('fleetcare.errors:' || $1, 0))")
            .bind(agent_id)
            .execute(&mut *self.tx)
            .await
            .map_err(db_error)?;
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
             WHERE agent_id = $1 AND error_type = $2 AND occurred_at > $3 AND occurred_at <= $4",
        )
        .bind(agent_id)
        .bind(error_type.as_str())
        .bind(window.after)
        .bind(window.until)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING {EVENT_COLUMNS}"
        ))
        .bind(&event.agent_id)
        .bind(&event.message)
        .bind(Json(&event.context))
        .bind(event.error_type.as_str())
        .bind(event.severity)
        .bind(critical)
        .bind(recurring)
        .bind(at)
        .bind(&event.actor)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)?
        .try_into()
    }

    async fn error_event(&mut self, id: i64) -> Result<Option<ErrorEvent>> {
        sqlx::query_as::<_, EventRow>(&format!(
            "SELECT {EVENT_COLUMNS} FROM error_events WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_error)?
        .map(ErrorEvent::try_from)
        .transpose()
    }

    async fn lock_active_recovery(&mut self, agent_id: &str) -> Result<Option<RecoveryAction>> {
        sqlx::query_as::<_, ActionRow>(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions
             WHERE agent_id = $1 AND status = $2 FOR UPDATE"
        ))
        .bind(agent_id)
        .bind(RecoveryStatus::Active.as_str())
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_error)?
        .map(RecoveryAction::try_from)
        .transpose()
    }

    async fn lock_recovery(&mut self, id: i64) -> Result<Option<RecoveryAction>> {
        sqlx::query_as::<_, ActionRow>(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await
        .map_err(db_error)?
        .map(RecoveryAction::try_from)
        .transpose()
    }

    async fn set_recovery_status(&mut self, id: i64, status: RecoveryStatus) -> Result<()> {
        sqlx::query("UPDATE recovery_actions SET status = $2 WHERE id = $1")
            .bind(id)
            .bind(status.as_str())
            .execute(&mut *self.tx)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn evidence(
        &mut self,
        error_type: ErrorType,
        context_signature: &str,
    ) -> Result<Vec<EvidenceRow>> {
        sqlx::query_as(
            "SELECT strategy, successes, failures, total_recovery_ms FROM healing_patterns
             WHERE error_type = $1 AND context_signature = $2",
        )
        .bind(error_type.as_str())
        .bind(context_signature)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn insert_recovery(&mut self, new: &NewRecovery<'_>) -> Result<Option<RecoveryAction>> {
        let (event, plan) = (new.event, new.plan);
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
        .bind(new.context_signature)
        .bind(plan.strategy.as_str())
        .bind(plan.chosen.as_str())
        .bind(Json(&plan.parameters))
        .bind(millis(plan.estimated_duration))
        .bind(plan.success_probability)
        .bind(plan.risk)
        .bind(plan.escalated)
        .bind(&plan.reason)
        .bind(RecoveryStatus::Active.as_str())
        .bind(new.created_at)
        .bind(new.lease_expires_at)
        .bind(new.actor)
        .fetch_one(&mut *self.tx)
        .await;
        match inserted {
            Ok(row) => Ok(Some(row.try_into()?)),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Ok(None),
            Err(e) => Err(db_error(e)),
        }
    }

    async fn finish_recovery(&mut self, id: i64, finish: &Finish<'_>) -> Result<RecoveryAction> {
        sqlx::query_as::<_, ActionRow>(&format!(
            "UPDATE recovery_actions
             SET status = $2, completed_at = $5, duration_ms = $3, details = $4,
                 outcome_actor = $6
             WHERE id = $1
             RETURNING {ACTION_COLUMNS}"
        ))
        .bind(id)
        .bind(finish.status.as_str())
        .bind(finish.duration_ms)
        .bind(finish.details)
        .bind(finish.completed_at)
        .bind(finish.actor)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)?
        .try_into()
    }

    async fn learn(&mut self, lesson: &Lesson<'_>) -> Result<()> {
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
        .bind(lesson.error_type.as_str())
        .bind(lesson.context_signature)
        .bind(lesson.strategy.as_str())
        .bind(lesson.successes)
        .bind(lesson.failures)
        .bind(lesson.recovery_ms)
        .bind(lesson.at)
        .execute(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn statistics_counts(
        &mut self,
        recent_since: DateTime<Utc>,
        filters: &[StoredStatusFilter],
    ) -> Result<(i64, i64, i64)> {
        let (statuses, ends_after, ended_by) = filter_arrays(filters);
        sqlx::query_as(&format!(
            "SELECT
                 (SELECT count(*) FROM error_events),
                 (SELECT count(*) FROM error_events WHERE occurred_at > $1),
                 (SELECT count(*) FROM recovery_actions WHERE {})",
            status_filter_sql(2)
        ))
        .bind(recent_since)
        .bind(statuses)
        .bind(ends_after)
        .bind(ended_by)
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn errors_by_type(&mut self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as(
            "SELECT error_type, count(*) FROM error_events GROUP BY error_type ORDER BY error_type",
        )
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn patterns(&mut self) -> Result<Vec<decode::PatternRow>> {
        sqlx::query_as(
            "SELECT error_type, context_signature, strategy, successes, failures, total_recovery_ms
             FROM healing_patterns ORDER BY error_type, context_signature, strategy",
        )
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)
    }

    async fn recovery_actions(
        &mut self,
        query: &RecoveryActionQuery,
        status: Option<&[StoredStatusFilter]>,
    ) -> Result<Vec<RecoveryAction>> {
        let (statuses, ends_after, ended_by) = match status {
            Some(filters) => {
                let (s, a, b) = filter_arrays(filters);
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
               AND ($8::bigint IS NULL OR error_event_id = $8)
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
        .bind(query.error_event_id)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RecoveryAction::try_from).collect()
    }

    async fn actions_of_events(&mut self, event_ids: &[i64]) -> Result<Vec<RecoveryAction>> {
        let rows: Vec<ActionRow> = sqlx::query_as(&format!(
            "SELECT {ACTION_COLUMNS} FROM recovery_actions WHERE error_event_id = ANY($1)"
        ))
        .bind(event_ids)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(RecoveryAction::try_from).collect()
    }

    async fn delete_actions_before(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query(
            "DELETE FROM recovery_actions
             WHERE created_at < $1 AND (status <> 'ACTIVE' OR lease_expires_at < $1)",
        )
        .bind(before)
        .execute(&mut *self.tx)
        .await
        .map(|r| r.rows_affected())
        .map_err(db_error)
    }

    async fn delete_events_before(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query(
            "DELETE FROM error_events e
             WHERE e.occurred_at < $1
               AND NOT EXISTS (SELECT 1 FROM recovery_actions r WHERE r.error_event_id = e.id)",
        )
        .bind(before)
        .execute(&mut *self.tx)
        .await
        .map(|r| r.rows_affected())
        .map_err(db_error)
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
        // `agents`); what is counted here is the active recoveries (each
        // one's agent looked up by key: LIMIT keeps the lookup from being
        // turned into a scan of the agents), the last minute's plans and
        // the agent's own.
        let row: BrakeRow<DateTime<Utc>> = sqlx::query_as(
            "WITH active AS (
                 SELECT a.status, a.grp
                 FROM recovery_actions r
                 LEFT JOIN LATERAL (
                     SELECT status, labels ->> $4 AS grp FROM agents
                     WHERE agents.agent_id = r.agent_id LIMIT 1) a ON true
                 WHERE r.status = 'ACTIVE' AND r.lease_expires_at > $1),
             fleet AS (
                 SELECT agents - exhausted AS counted, offline FROM agent_census
                 WHERE label_key = '' AND label_value = ''),
             grp AS (
                 SELECT agents - exhausted AS counted, offline FROM agent_census
                 WHERE label_key = $4 AND label_value = $3),
             success AS (
                 SELECT max(completed_at) AS at FROM recovery_actions
                 WHERE agent_id = $5 AND status = 'SUCCEEDED')
             SELECT coalesce((SELECT counted FROM fleet), 0)
                        + (SELECT count(*) FROM active WHERE status IS NULL),
                    coalesce((SELECT offline FROM fleet), 0)
                        + (SELECT count(*) FROM active
                           WHERE status IS NULL OR status NOT IN ('OFFLINE', 'EXHAUSTED')),
                    coalesce((SELECT counted FROM grp), 0),
                    coalesce((SELECT offline FROM grp), 0)
                        + (SELECT count(*) FROM active
                           WHERE grp = $3 AND status NOT IN ('OFFLINE', 'EXHAUSTED')),
                    (SELECT count(*) FROM recovery_actions WHERE created_at > $2),
                    (SELECT count(*) FROM healing_decisions
                     WHERE verdict = 'PLANNED' AND group_name = $3 AND decided_at > $2),
                    (SELECT at FROM success),
                    (SELECT count(*) FROM error_events e, success s
                     WHERE e.agent_id = $5 AND e.occurred_at > s.at AND e.id <> $6),
                    (SELECT count(*) FROM recovery_actions r
                     WHERE r.agent_id = $5 AND r.created_at > $7),
                    (SELECT count(*) FROM recovery_actions r, success s
                     WHERE r.agent_id = $5 AND r.created_at > s.at)",
        )
        .bind(now)
        .bind(rate_since)
        .bind(value)
        .bind(key)
        .bind(budget.map(|b| b.agent_id))
        .bind(budget.map_or(0, |b| b.except))
        .bind(budget.map(|b| b.window_start))
        .fetch_one(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(flows::brake_counts(row))
    }

    async fn brake_agent(
        &mut self,
        agent_id: &str,
        group_by: Option<&str>,
        lock: BrakeLock,
    ) -> Result<Option<(String, Option<String>)>> {
        // Every slot's holder shares the brakes' lock; alone takes it
        // exclusively, so it waits for them all and they for it. The counts
        // that follow run on their prepared (generic) plan for the rest of
        // the transaction: planning them anew for each call's parameters
        // cost more than running them. The lock's CTE is materialised and
        // its value read, so it is taken whatever the agent.
        const READ: &str = "SELECT a.status, a.labels ->> $2 FROM locked
                            LEFT JOIN agents a ON a.agent_id = $1";
        let (sql, slot) = match lock {
            BrakeLock::None => (
                format!("WITH locked AS (SELECT 1) {READ}"),
                None,
            ),
            BrakeLock::Slot(slot) => (
                format!(
                    "WITH locked AS MATERIALIZED (
                         SELECT pg_advisory_xact_lock_shared(hashtextextended('fleetcare.healing_brakes', 0)),
                                pg_advisory_xact_lock(hashtextextended('fleetcare.healing_brakes', $3)),
                                set_config('plan_cache_mode', 'force_generic_plan', true) AS mode)
                     {READ} WHERE locked.mode IS NOT NULL"
                ),
                Some(i64::from(slot) + 1),
            ),
            BrakeLock::All => (
                format!(
                    "WITH locked AS MATERIALIZED (
                         SELECT pg_advisory_xact_lock(hashtextextended('fleetcare.healing_brakes', 0)),
                                set_config('plan_cache_mode', 'force_generic_plan', true) AS mode)
                     {READ} WHERE locked.mode IS NOT NULL"
                ),
                None,
            ),
        };
        let mut query = sqlx::query_as::<_, (Option<String>, Option<String>)>(&sql)
            .bind(agent_id)
            .bind(group_by);
        if let Some(slot) = slot {
            query = query.bind(slot);
        }
        let (status, group) = query.fetch_one(&mut *self.tx).await.map_err(db_error)?;
        Ok(status.map(|status| (status, group)))
    }

    async fn group_censuses(
        &mut self,
        now: DateTime<Utc>,
        group_by: &str,
    ) -> Result<Vec<(String, Census)>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "WITH active AS (
                 SELECT a.grp, count(*) AS n
                 FROM recovery_actions r
                 JOIN LATERAL (
                     SELECT labels ->> $2 AS grp FROM agents
                     WHERE agents.agent_id = r.agent_id
                       AND status NOT IN ('OFFLINE', 'EXHAUSTED') LIMIT 1) a ON true
                 WHERE r.status = 'ACTIVE' AND r.lease_expires_at > $1
                 GROUP BY a.grp)
             SELECT c.label_value, c.agents - c.exhausted,
                    c.offline + coalesce(active.n, 0)
             FROM agent_census c LEFT JOIN active ON active.grp = c.label_value
             WHERE c.label_key = $2 AND c.agents > c.exhausted
             ORDER BY 1",
        )
        .bind(now)
        .bind(group_by)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)?;
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
            "SELECT agent_id, count(*) FROM recovery_actions WHERE created_at > $1
             GROUP BY agent_id HAVING count(*) >= $2 ORDER BY agent_id",
        )
        .bind(since)
        .bind(i64::from(at_least))
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|(a, n)| (a, flows::count(n)))
            .collect())
    }

    async fn pauses(&mut self) -> Result<Vec<Pause>> {
        let rows: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT scope, reason, paused_by, paused_at FROM healing_pauses ORDER BY scope",
        )
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(flows::pause_row).collect()
    }

    async fn put_pause(&mut self, pause: &Pause) -> Result<()> {
        sqlx::query(
            "INSERT INTO healing_pauses (scope, reason, paused_by, paused_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (scope) DO UPDATE
             SET reason = excluded.reason, paused_by = excluded.paused_by,
                 paused_at = excluded.paused_at",
        )
        .bind(pause.scope.stored())
        .bind(&pause.reason)
        .bind(&pause.by)
        .bind(pause.at)
        .execute(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn delete_pause(&mut self, scope: &Scope) -> Result<bool> {
        sqlx::query("DELETE FROM healing_pauses WHERE scope = $1")
            .bind(scope.stored())
            .execute(&mut *self.tx)
            .await
            .map(|r| r.rows_affected() > 0)
            .map_err(db_error)
    }

    async fn breakers(
        &mut self,
        error_type: Option<ErrorType>,
        lock: bool,
    ) -> Result<Vec<(ErrorType, Strategy, Breaker)>> {
        let rows: Vec<(String, String, String, i64, Option<DateTime<Utc>>)> =
            sqlx::query_as(&format!(
                "SELECT error_type, strategy, state, failures, since FROM healing_breakers
                 WHERE ($1::text IS NULL OR error_type = $1)
                 ORDER BY error_type, strategy{}",
                if lock { " FOR UPDATE" } else { "" }
            ))
            .bind(error_type.map(ErrorType::as_str))
            .fetch_all(&mut *self.tx)
            .await
            .map_err(db_error)?;
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
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (error_type, strategy) DO UPDATE
             SET state = excluded.state, failures = excluded.failures, since = excluded.since,
                 updated_at = excluded.updated_at",
        )
        .bind(error_type.as_str())
        .bind(strategy.as_str())
        .bind(state)
        .bind(i64::from(failures))
        .bind(since)
        .bind(at)
        .execute(&mut *self.tx)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn insert_decision(&mut self, d: &Decision) -> Result<i64> {
        let n = &d.numbers;
        sqlx::query_scalar(
            "INSERT INTO healing_decisions (error_event_id, agent_id, decided_at, verdict, reason,
                 message, strategy, recovery_action_id, fleet_counted, fleet_unhealthy, group_name,
                 group_counted, group_unhealthy, fleet_plans_last_minute, group_plans_last_minute,
                 agent_plans_in_window, actor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             RETURNING id",
        )
        .bind(d.error_event_id)
        .bind(&d.agent_id)
        .bind(d.decided_at)
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
        .map_err(db_error)
    }

    async fn decisions(&mut self, query: &DecisionQuery) -> Result<Vec<Decision>> {
        let rows: Vec<DecisionRow> = sqlx::query_as(&format!(
            "SELECT {DECISION_COLUMNS} FROM healing_decisions
             WHERE ($1::text IS NULL OR agent_id = $1)
               AND ($2::bigint IS NULL OR error_event_id = $2)
               AND ($3::text IS NULL OR verdict = $3)
               AND ($4::bigint IS NULL OR id < $4)
             ORDER BY id DESC
             LIMIT $5"
        ))
        .bind(query.agent_id.as_deref())
        .bind(query.error_event_id)
        .bind(query.verdict.map(Verdict::as_str))
        .bind(query.before_id)
        .bind(query.limit)
        .fetch_all(&mut *self.tx)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(Decision::try_from).collect()
    }

    async fn delete_decisions_before(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query("DELETE FROM healing_decisions WHERE decided_at < $1")
            .bind(before)
            .execute(&mut *self.tx)
            .await
            .map(|r| r.rows_affected())
            .map_err(db_error)
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.tx.commit().await.map_err(db_error)
    }
}
