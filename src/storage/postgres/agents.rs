//! Agents and transitions in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{ConnectOptions, FromRow};
use tokio::sync::watch;

use super::{PgStore, TRANSITIONS_CHANNEL, db_error};
use crate::domain::agent::{AgentState, AgentStatus, Cause, Exhaustion};
use crate::domain::batch::{self, Applied, Command, Refusal};
use crate::domain::liveness::SweepQuery;
use crate::domain::recovery::RecoveryEstimate;
use crate::domain::transition::{Agent, Labels, RevisionBounds, Transition, WatchFilter};
use crate::error::{Error, Result};
use crate::storage::decode;
use crate::storage::{AgentQuery, AgentStore, StatusCounts};

const AGENT_COLUMNS: &str = "agent_id, status, labels, registered_at, last_heartbeat_at, \
     last_transition_at, revision, exhaustion_reason, recovery_at, recovery_source, recovery_hint";

const TRANSITION_COLUMNS: &str = "revision, agent_id, from_status, to_status, cause, occurred_at, \
     exhaustion_reason, recovery_at, actor";

#[derive(FromRow)]
struct AgentRow {
    agent_id: String,
    status: String,
    labels: Json<Labels>,
    registered_at: DateTime<Utc>,
    last_heartbeat_at: DateTime<Utc>,
    last_transition_at: DateTime<Utc>,
    revision: i64,
    exhaustion_reason: Option<String>,
    recovery_at: Option<DateTime<Utc>>,
    recovery_source: Option<String>,
    recovery_hint: Option<String>,
}

#[derive(FromRow)]
struct TransitionRow {
    revision: i64,
    agent_id: String,
    from_status: Option<String>,
    to_status: String,
    cause: String,
    occurred_at: DateTime<Utc>,
    exhaustion_reason: Option<String>,
    recovery_at: Option<DateTime<Utc>>,
    actor: String,
}

impl TryFrom<AgentRow> for Agent {
    type Error = Error;

    fn try_from(row: AgentRow) -> Result<Agent> {
        let exhaustion = match (row.exhaustion_reason, row.recovery_at) {
            (Some(reason), Some(recovery_at)) => Some(Exhaustion {
                reason: decode::exhaustion_reason(&reason)?,
                recovery: RecoveryEstimate {
                    recovery_at,
                    source: decode::recovery_source(row.recovery_source.as_deref())?,
                    hint: row.recovery_hint.unwrap_or_default(),
                },
            }),
            _ => None,
        };
        Ok(Agent {
            state: AgentState {
                status: decode::status(&row.status)?,
                last_heartbeat_at: row.last_heartbeat_at,
                exhaustion,
            },
            agent_id: row.agent_id,
            labels: row.labels.0,
            registered_at: row.registered_at,
            last_transition_at: row.last_transition_at,
            revision: row.revision,
        })
    }
}

impl TryFrom<TransitionRow> for Transition {
    type Error = Error;

    fn try_from(row: TransitionRow) -> Result<Transition> {
        Ok(Transition {
            revision: row.revision,
            agent_id: row.agent_id,
            from: row.from_status.as_deref().map(decode::status).transpose()?,
            to: decode::status(&row.to_status)?,
            cause: Cause::parse(&row.cause).ok_or_else(|| decode::corrupt("cause", &row.cause))?,
            occurred_at: row.occurred_at,
            exhaustion_reason: row
                .exhaustion_reason
                .as_deref()
                .map(decode::exhaustion_reason)
                .transpose()?,
            recovery_at: row.recovery_at,
            actor: row.actor,
        })
    }
}

/// How often a batch is retried when the database refuses it as a whole for a
/// reason that a retry resolves (two replicas registering one new agent at once,
/// a serialization failure, a deadlock).
const BATCH_ATTEMPTS: usize = 5;

/// Whether a failed batch may simply be run again.
fn retryable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // unique violation (a concurrent registration), serialization
            // failure, deadlock
            Some("23505" | "40001" | "40P01")
        ),
        _ => false,
    }
}

/// The agent columns of a bulk write, one array per column.
#[derive(Default)]
struct AgentColumns {
    agent_id: Vec<String>,
    status: Vec<&'static str>,
    labels: Vec<String>,
    last_heartbeat_at: Vec<DateTime<Utc>>,
    last_transition_at: Vec<DateTime<Utc>>,
    revision: Vec<i64>,
    exhaustion_reason: Vec<Option<&'static str>>,
    recovery_at: Vec<Option<DateTime<Utc>>>,
    recovery_source: Vec<Option<&'static str>>,
    recovery_hint: Vec<Option<String>>,
}

impl AgentColumns {
    fn of(agents: &[Agent]) -> Result<Self> {
        let mut c = AgentColumns::default();
        for a in agents {
            let ex = a.state.exhaustion.as_ref();
            c.agent_id.push(a.agent_id.clone());
            c.status.push(a.state.status.as_str());
            c.labels.push(
                serde_json::to_string(&a.labels)
                    .map_err(|e| Error::Internal(format!("labels: {e}")))?,
            );
            c.last_heartbeat_at.push(a.state.last_heartbeat_at);
            c.last_transition_at.push(a.last_transition_at);
            c.revision.push(a.revision);
            c.exhaustion_reason.push(ex.map(|e| e.reason.as_str()));
            c.recovery_at.push(ex.map(|e| e.recovery.recovery_at));
            c.recovery_source
                .push(ex.map(|e| e.recovery.source.as_str()));
            c.recovery_hint.push(ex.map(|e| e.recovery.hint.clone()));
        }
        Ok(c)
    }
}

/// Writes a batch in one statement. When the batch has transitions (`$1` > 0)
/// it takes the revision row (the last lock of the transaction, held to commit),
/// notifies, and appends them; every changed agent's final state is written,
/// its relative revision shifted by the allocated base where `shift` says so.
/// The agent rows are locked already (read FOR UPDATE, or inserted, by this
/// transaction), and `last_heartbeat_at` never moves back.
const WRITE_BATCH: &str = "WITH head AS (
         UPDATE revision_head SET head_revision = head_revision + $1
         WHERE singleton AND $1 > 0
         RETURNING head_revision - $1 AS base
     ),
     notified AS (
         SELECT pg_notify($2, '') FROM head
     ),
     base AS (
         SELECT COALESCE((SELECT base FROM head), 0) AS base
     ),
     appended AS (
         INSERT INTO transitions (revision, agent_id, from_status, to_status, cause,
                                  occurred_at, exhaustion_reason, recovery_at, actor)
         SELECT base.base + t.rel, t.agent_id, t.from_status, t.to_status, t.cause,
                t.occurred_at, t.exhaustion_reason, t.recovery_at, t.actor
         FROM base, unnest($14::bigint[], $15::text[], $16::text[], $17::text[], $18::text[],
                           $19::timestamptz[], $20::text[], $21::timestamptz[], $22::text[])
              AS t(rel, agent_id, from_status, to_status, cause, occurred_at,
                   exhaustion_reason, recovery_at, actor)
     ),
     written AS (
         UPDATE agents SET
             status = u.status,
             labels = u.labels::jsonb,
             last_heartbeat_at = GREATEST(agents.last_heartbeat_at, u.last_heartbeat_at),
             last_transition_at = u.last_transition_at,
             revision = CASE WHEN u.shift THEN base.base + u.revision ELSE u.revision END,
             exhaustion_reason = u.exhaustion_reason,
             recovery_at = u.recovery_at,
             recovery_source = u.recovery_source,
             recovery_hint = u.recovery_hint
         FROM base, unnest($3::text[], $4::text[], $5::text[], $6::timestamptz[],
                           $7::timestamptz[], $8::bigint[], $9::bool[], $10::text[],
                           $11::timestamptz[], $12::text[], $13::text[])
              AS u(agent_id, status, labels, last_heartbeat_at, last_transition_at,
                   revision, shift, exhaustion_reason, recovery_at, recovery_source,
                   recovery_hint)
         WHERE agents.agent_id = u.agent_id
     )
     SELECT base.base FROM base LEFT JOIN notified ON true";

impl PgStore {
    /// One attempt at a batch: lock, decide, allocate, write, commit.
    async fn try_commit_batch(
        &self,
        commands: &[Command],
        now: DateTime<Utc>,
    ) -> std::result::Result<Vec<Result<Applied, Refusal>>, BatchError> {
        let mut ids: Vec<&str> = commands.iter().map(Command::agent_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut slot = self.batch_conn.lock().await;
        let conn = match &mut *slot {
            Some(conn) => conn,
            empty @ None => {
                let options = self.pool.connect_options();
                let timeout = self.pool.options().get_acquire_timeout();
                let connected = tokio::time::timeout(timeout, options.connect())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                empty.insert(connected)
            }
        };
        let result = Self::batch_on(conn, commands, &ids, now, &self.changes).await;
        if let Err(BatchError::Db(e)) = &result
            && !matches!(e, sqlx::Error::Database(_))
        {
            // The connection itself failed: open a new one for the next batch.
            *slot = None;
        }
        result
    }

    async fn batch_on(
        conn: &mut sqlx::PgConnection,
        commands: &[Command],
        ids: &[&str],
        now: DateTime<Utc>,
        changes: &tokio::sync::watch::Sender<u64>,
    ) -> std::result::Result<Vec<Result<Applied, Refusal>>, BatchError> {
        let mut tx = sqlx::Connection::begin(conn).await?;
        // Agent rows first, in agent-id order (ORDER BY is applied before the row
        // locks), so that two replicas' batches cannot deadlock.
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ANY($1)
             ORDER BY agent_id FOR UPDATE"
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let existing = rows
            .into_iter()
            .map(Agent::try_from)
            .collect::<Result<Vec<_>>>()?;
        let plan = batch::plan(existing, commands, now);

        // New agents' rows next, still before the revision row. Two replicas
        // creating the same agent: the second insert waits for the first and then
        // fails with a unique violation, and the batch is run again.
        let created: Vec<&str> = plan.created_ids().collect();
        if !created.is_empty() {
            sqlx::query(
                "INSERT INTO agents (agent_id, status, registered_at, last_heartbeat_at,
                                     last_transition_at, revision)
                 SELECT id, 'IDLE', $2, $2, $2, 0 FROM unnest($1::text[]) AS id",
            )
            .bind(&created)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }

        // The revision row last, held to commit: that is what makes revisions
        // commit in order and without gaps, across replicas too. One statement
        // takes it, announces the batch (NOTIFY is delivered at commit), appends
        // the transitions and writes the agents, shifting the batch's relative
        // revisions by the base it allocated.
        let count = plan.transition_count() as i64;
        let (relative, shift) = plan.relative_writes();
        let base = if relative.changed.is_empty() {
            0
        } else {
            let c = AgentColumns::of(&relative.changed)?;
            let t = &relative.transitions;
            sqlx::query_scalar(WRITE_BATCH)
                .bind(count)
                .bind(TRANSITIONS_CHANNEL)
                .bind(&c.agent_id)
                .bind(&c.status)
                .bind(&c.labels)
                .bind(&c.last_heartbeat_at)
                .bind(&c.last_transition_at)
                .bind(&c.revision)
                .bind(&shift)
                .bind(&c.exhaustion_reason)
                .bind(&c.recovery_at)
                .bind(&c.recovery_source)
                .bind(&c.recovery_hint)
                .bind(t.iter().map(|t| t.revision).collect::<Vec<_>>())
                .bind(t.iter().map(|t| t.agent_id.as_str()).collect::<Vec<_>>())
                .bind(
                    t.iter()
                        .map(|t| t.from.map(AgentStatus::as_str))
                        .collect::<Vec<_>>(),
                )
                .bind(t.iter().map(|t| t.to.as_str()).collect::<Vec<_>>())
                .bind(t.iter().map(|t| t.cause.as_str()).collect::<Vec<_>>())
                .bind(t.iter().map(|t| t.occurred_at).collect::<Vec<_>>())
                .bind(
                    t.iter()
                        .map(|t| t.exhaustion_reason.map(|r| r.as_str()))
                        .collect::<Vec<_>>(),
                )
                .bind(t.iter().map(|t| t.recovery_at).collect::<Vec<_>>())
                .bind(t.iter().map(|t| t.actor.as_str()).collect::<Vec<_>>())
                .fetch_one(&mut *tx)
                .await?
        };
        let (writes, outcomes) = plan.finish(base);
        if writes.changed.is_empty() {
            // Nothing to write (every command refused or a no-op): release the locks.
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        if count > 0 {
            // Wakes this process's watchers at once, without waiting for NOTIFY.
            changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(outcomes)
    }
}

/// A failed attempt at a batch: a database error (maybe worth a retry) or one
/// already mapped.
enum BatchError {
    Db(sqlx::Error),
    Mapped(Error),
}

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Db(e)
    }
}

impl From<Error> for BatchError {
    fn from(e: Error) -> Self {
        BatchError::Mapped(e)
    }
}

#[async_trait]
impl AgentStore for PgStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(db_error)
    }

    async fn commit_batch(
        &self,
        commands: &[Command],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Applied, Refusal>>> {
        let mut attempt = 1;
        loop {
            match self.try_commit_batch(commands, now).await {
                Ok(outcomes) => return Ok(outcomes),
                Err(BatchError::Db(e)) if retryable(&e) && attempt < BATCH_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "batch conflicted, retrying");
                    attempt += 1;
                }
                Err(BatchError::Db(e)) => return Err(db_error(e)),
                Err(BatchError::Mapped(e)) => return Err(e),
            }
        }
    }

    async fn record_heartbeats(&self, beats: &[(String, DateTime<Utc>)]) -> Result<()> {
        let mut beats: Vec<&(String, DateTime<Utc>)> = beats.iter().collect();
        beats.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let ids: Vec<&str> = beats.iter().map(|(id, _)| id.as_str()).collect();
        let times: Vec<DateTime<Utc>> = beats.iter().map(|(_, at)| *at).collect();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Lock in agent-id order first, as every batch does: an UPDATE ... FROM
        // unnest locks in whatever order its join runs.
        sqlx::query("SELECT 1 FROM agents WHERE agent_id = ANY($1) ORDER BY agent_id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "UPDATE agents SET last_heartbeat_at = GREATEST(agents.last_heartbeat_at, u.at)
             FROM unnest($1::text[], $2::timestamptz[]) AS u(agent_id, at)
             WHERE agents.agent_id = u.agent_id",
        )
        .bind(&ids)
        .bind(&times)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    async fn get_agent(&self, agent_id: &str) -> Result<Agent> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1"
        ))
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.ok_or_else(|| Error::agent_not_found(agent_id))?
            .try_into()
    }

    async fn list_agents(&self, query: &AgentQuery) -> Result<Vec<Agent>> {
        let statuses: Vec<&str> = query.statuses.iter().map(|s| s.as_str()).collect();
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE ($1::text IS NULL OR agent_id > $1)
               AND (cardinality($2::text[]) = 0 OR status = ANY($2))
               AND labels @> $3
             ORDER BY agent_id
             LIMIT $4"
        ))
        .bind(query.after_agent_id.as_deref())
        .bind(&statuses)
        .bind(Json(&query.labels))
        .bind(query.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(Agent::try_from).collect()
    }

    async fn sweep_candidates(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>> {
        let silent: Vec<&str> = query.silent_statuses.iter().map(|s| s.as_str()).collect();
        let recovering: Vec<&str> = query
            .recovering_statuses
            .iter()
            .map(|s| s.as_str())
            .collect();
        // Indexed comparisons only; the domain chose the statuses and the bounds.
        sqlx::query_scalar(
            "(SELECT agent_id FROM agents
               WHERE status = ANY($1) AND last_heartbeat_at < $2
               ORDER BY last_heartbeat_at LIMIT $5)
             UNION
             (SELECT agent_id FROM agents
               WHERE status = ANY($3) AND recovery_at <= $4
               ORDER BY recovery_at LIMIT $5)",
        )
        .bind(&silent)
        .bind(query.silent_before)
        .bind(&recovering)
        .bind(query.recovered_by)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)
    }

    async fn transitions_after(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>> {
        let rows: Vec<TransitionRow> = sqlx::query_as(&format!(
            "SELECT {TRANSITION_COLUMNS} FROM transitions
             WHERE revision > $1 AND ($2::text IS NULL OR agent_id = $2)
             ORDER BY revision
             LIMIT $3"
        ))
        .bind(after)
        .bind(agent_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(Transition::try_from).collect()
    }

    async fn count_by_status(&self) -> Result<StatusCounts> {
        // One repeatable-read transaction, as in `snapshot`: the head and the
        // counts come from the same snapshot.
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let revision: i64 = sqlx::query_scalar("SELECT head_revision FROM revision_head")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM agents GROUP BY status")
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(StatusCounts {
            revision,
            counts: rows
                .into_iter()
                .filter_map(|(status, n)| AgentStatus::parse(&status).map(|s| (s, n)))
                .collect(),
        })
    }

    fn pool_stats(&self) -> Vec<crate::metrics::PoolStats> {
        vec![crate::metrics::PoolStats {
            pool: "postgres",
            size: self.pool.size(),
            idle: self.pool.num_idle(),
            max: self.pool.options().get_max_connections(),
        }]
    }

    fn observe_pools(
        &self,
        metrics: &dyn Fn(&'static str) -> crate::storage::pool::AcquireMetrics,
    ) {
        self.pool.observe(metrics("postgres"));
    }

    async fn revision_bounds(&self) -> Result<RevisionBounds> {
        let (pruned_through, head): (i64, i64) = sqlx::query_as(
            "SELECT r.pruned_through, h.head_revision FROM revision_retention r, revision_head h",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(RevisionBounds {
            pruned_through,
            head,
        })
    }

    async fn snapshot(&self, filter: &WatchFilter) -> Result<(i64, Vec<Agent>)> {
        // One repeatable-read transaction: the agents and the head revision are
        // read from the same snapshot, and every transition updates both together.
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let head: i64 = sqlx::query_scalar("SELECT head_revision FROM revision_head")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
        let agent_ids: Vec<&str> = filter.agent_ids.iter().map(String::as_str).collect();
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE (cardinality($1::text[]) = 0 OR agent_id = ANY($1))
               AND (cardinality($2::text[]) = 0 OR status = ANY($2))
             ORDER BY agent_id"
        ))
        .bind(&agent_ids)
        .bind(&statuses)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        let agents = rows
            .into_iter()
            .map(Agent::try_from)
            .collect::<Result<_>>()?;
        Ok((head, agents))
    }

    async fn prune_transitions(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Locks the retention row: concurrent pruners on other replicas queue here.
        let pruned_through: i64 = sqlx::query_scalar(
            "SELECT pruned_through FROM revision_retention WHERE singleton FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        // occurred_at is not strictly monotonic in revision (it is the transaction's
        // start), so prune a prefix: everything up to the newest expired revision.
        let through: Option<i64> =
            sqlx::query_scalar("SELECT max(revision) FROM transitions WHERE occurred_at < $1")
                .bind(before)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
        let Some(through) = through.filter(|t| *t > pruned_through) else {
            return Ok(0);
        };
        let deleted = sqlx::query("DELETE FROM transitions WHERE revision <= $1")
            .bind(through)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
        sqlx::query("UPDATE revision_retention SET pruned_through = $1 WHERE singleton")
            .bind(through)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(deleted)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
