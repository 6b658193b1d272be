//! Agents and transitions in Postgres.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Transaction};
use tokio::sync::watch;

use super::{PgStore, TRANSITIONS_CHANNEL, db_error};
use crate::domain::agent::{
    self, AgentState, AgentStatus, Cause, Event, Exhaustion, ExhaustionReason, StatusChange,
};
use crate::domain::recovery::{RecoveryEstimate, RecoverySource};
use crate::domain::transition::{Agent, Labels, RevisionBounds, Transition, WatchFilter};
use crate::error::{Error, Result};
use crate::storage::{AgentQuery, AgentStore};

const AGENT_COLUMNS: &str = "agent_id, status, labels, registered_at, last_heartbeat_at, \
     last_transition_at, revision, exhaustion_reason, recovery_at, recovery_source, recovery_hint";

const TRANSITION_COLUMNS: &str = "revision, agent_id, from_status, to_status, cause, occurred_at, \
     exhaustion_reason, recovery_at";

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
}

fn corrupt(what: &str, value: &str) -> Error {
    Error::Internal(format!("stored {what} {value:?} is not recognised"))
}

fn parse_status(s: &str) -> Result<AgentStatus> {
    AgentStatus::parse(s).ok_or_else(|| corrupt("status", s))
}

fn parse_reason(s: &str) -> Result<ExhaustionReason> {
    ExhaustionReason::parse(s).ok_or_else(|| corrupt("exhaustion reason", s))
}

fn source_str(source: RecoverySource) -> &'static str {
    match source {
        RecoverySource::Explicit => "EXPLICIT",
        RecoverySource::RetryAfterHeader => "RETRY_AFTER_HEADER",
        RecoverySource::ProviderResetHeader => "PROVIDER_RESET_HEADER",
        RecoverySource::Message => "MESSAGE",
        RecoverySource::Default => "DEFAULT",
    }
}

fn parse_source(s: &str) -> Result<RecoverySource> {
    [
        RecoverySource::Explicit,
        RecoverySource::RetryAfterHeader,
        RecoverySource::ProviderResetHeader,
        RecoverySource::Message,
        RecoverySource::Default,
    ]
    .into_iter()
    .find(|source| source_str(*source) == s)
    .ok_or_else(|| corrupt("recovery source", s))
}

impl TryFrom<AgentRow> for Agent {
    type Error = Error;

    fn try_from(row: AgentRow) -> Result<Agent> {
        let exhaustion = match (row.exhaustion_reason, row.recovery_at) {
            (Some(reason), Some(recovery_at)) => Some(Exhaustion {
                reason: parse_reason(&reason)?,
                recovery: RecoveryEstimate {
                    recovery_at,
                    source: parse_source(row.recovery_source.as_deref().unwrap_or("DEFAULT"))?,
                    hint: row.recovery_hint.unwrap_or_default(),
                },
            }),
            _ => None,
        };
        Ok(Agent {
            state: AgentState {
                status: parse_status(&row.status)?,
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
            from: row.from_status.as_deref().map(parse_status).transpose()?,
            to: parse_status(&row.to_status)?,
            cause: Cause::parse(&row.cause).ok_or_else(|| corrupt("cause", &row.cause))?,
            occurred_at: row.occurred_at,
            exhaustion_reason: row
                .exhaustion_reason
                .as_deref()
                .map(parse_reason)
                .transpose()?,
            recovery_at: row.recovery_at,
        })
    }
}

/// Appends a transition with the next revision. Must be the last statement
/// before commit: the revision row stays locked until then, which is what makes
/// revisions commit in order and without gaps.
async fn append_transition(
    tx: &mut Transaction<'_, Postgres>,
    agent_id: &str,
    from: Option<AgentStatus>,
    change: StatusChange,
    state: &AgentState,
    now: DateTime<Utc>,
) -> Result<Transition> {
    // NOTIFY is delivered at commit, and only if the transaction commits.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(TRANSITIONS_CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    let exhaustion = state
        .exhaustion
        .as_ref()
        .filter(|_| change.to == AgentStatus::Exhausted);
    let row: TransitionRow = sqlx::query_as(&format!(
        "WITH next AS (
             UPDATE revision_head SET head_revision = head_revision + 1
             WHERE singleton RETURNING head_revision
         )
         INSERT INTO transitions ({TRANSITION_COLUMNS})
         SELECT head_revision, $1, $2, $3, $4, $5, $6, $7 FROM next
         RETURNING {TRANSITION_COLUMNS}"
    ))
    .bind(agent_id)
    .bind(from.map(AgentStatus::as_str))
    .bind(change.to.as_str())
    .bind(change.cause.as_str())
    .bind(now)
    .bind(exhaustion.map(|e| e.reason.as_str()))
    .bind(exhaustion.map(|e| e.recovery.recovery_at))
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)?;
    row.try_into()
}

/// Writes an agent's state machine fields back.
async fn write_state(
    tx: &mut Transaction<'_, Postgres>,
    agent_id: &str,
    state: &AgentState,
    transition: Option<&Transition>,
) -> Result<Agent> {
    let exhaustion = state.exhaustion.as_ref();
    let row: AgentRow = sqlx::query_as(&format!(
        "UPDATE agents SET
             status = $2,
             last_heartbeat_at = $3,
             exhaustion_reason = $4,
             recovery_at = $5,
             recovery_source = $6,
             recovery_hint = $7,
             last_transition_at = COALESCE($8, last_transition_at),
             revision = COALESCE($9, revision)
         WHERE agent_id = $1
         RETURNING {AGENT_COLUMNS}"
    ))
    .bind(agent_id)
    .bind(state.status.as_str())
    .bind(state.last_heartbeat_at)
    .bind(exhaustion.map(|e| e.reason.as_str()))
    .bind(exhaustion.map(|e| e.recovery.recovery_at))
    .bind(exhaustion.map(|e| source_str(e.recovery.source)))
    .bind(exhaustion.map(|e| e.recovery.hint.as_str()))
    .bind(transition.map(|t| t.occurred_at))
    .bind(transition.map(|t| t.revision))
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)?;
    row.try_into()
}

impl PgStore {
    /// Locks one agent, lets the state machine decide, writes the outcome. The
    /// row lock serialises concurrent calls on one agent: of two StartWork calls
    /// on an idle agent, the second sees BUSY and is refused.
    async fn apply_locked(
        &self,
        agent_id: &str,
        event: Event,
    ) -> Result<(Agent, Option<Transition>)> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let locked: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1 FOR UPDATE"
        ))
        .bind(agent_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some(row) = locked else {
            return Err(Error::agent_not_found(agent_id));
        };
        let now = db_now(&mut tx).await?;
        let current = Agent::try_from(row)?;
        let decision = agent::decide(&current.state, &current.labels, event, now)?;
        if decision.change.is_none() && decision.state == current.state {
            return Ok((current, None));
        }
        let transition = match decision.change {
            Some(change) => {
                let from = Some(change.from);
                Some(
                    append_transition(&mut tx, agent_id, from, change, &decision.state, now)
                        .await?,
                )
            }
            None => None,
        };
        let agent = write_state(&mut tx, agent_id, &decision.state, transition.as_ref()).await?;
        tx.commit().await.map_err(db_error)?;
        if transition.is_some() {
            self.announce_local_commit();
        }
        Ok((agent, transition))
    }
}

/// The database's clock: agents' clocks are never trusted.
async fn db_now(tx: &mut Transaction<'_, Postgres>) -> Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut **tx)
        .await
        .map_err(db_error)
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

    async fn register_agent(
        &self,
        agent_id: &str,
        labels: &Labels,
    ) -> Result<(Agent, bool, Option<Transition>)> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let now = db_now(&mut tx).await?;
        let (state, cause) = agent::registered(now);
        // ON CONFLICT DO NOTHING: of two concurrent first registrations, one inserts
        // and the other falls through to the existing-agent path below.
        let inserted = sqlx::query(
            "INSERT INTO agents (agent_id, status, labels, registered_at, last_heartbeat_at,
                                 last_transition_at, revision)
             VALUES ($1, $2, $3, $4, $4, $4, 0)
             ON CONFLICT (agent_id) DO NOTHING",
        )
        .bind(agent_id)
        .bind(state.status.as_str())
        .bind(Json(labels))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected()
            == 1;
        if inserted {
            let change = StatusChange {
                from: state.status,
                to: state.status,
                cause,
            };
            // A registration has no "from" status.
            let transition =
                append_transition(&mut tx, agent_id, None, change, &state, now).await?;
            let agent = write_state(&mut tx, agent_id, &state, Some(&transition)).await?;
            tx.commit().await.map_err(db_error)?;
            self.announce_local_commit();
            return Ok((agent, true, Some(transition)));
        }
        sqlx::query("UPDATE agents SET labels = $2 WHERE agent_id = $1")
            .bind(agent_id)
            .bind(Json(labels))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        let (agent, transition) = self.apply(agent_id, Event::Heartbeat).await?;
        Ok((agent, false, transition))
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

    async fn apply(&self, agent_id: &str, event: Event) -> Result<(Agent, Option<Transition>)> {
        if event == Event::Heartbeat {
            // Fast path for the most frequent call: a heartbeat of an agent that is
            // not OFFLINE changes no status, so one autocommit statement does. The
            // row lock it takes orders it against a concurrent sweep; if the agent
            // is OFFLINE (or missing), the state machine path below decides.
            let row: Option<AgentRow> = sqlx::query_as(&format!(
                "UPDATE agents SET last_heartbeat_at = now()
                 WHERE agent_id = $1 AND status <> 'OFFLINE'
                 RETURNING {AGENT_COLUMNS}"
            ))
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
            if let Some(row) = row {
                return Ok((row.try_into()?, None));
            }
        }
        self.apply_locked(agent_id, event).await
    }

    async fn sweep_candidates(
        &self,
        heartbeat_timeout: Duration,
        offline_allowed: bool,
        limit: i64,
    ) -> Result<Vec<String>> {
        // Mirrors agent::needs_sweep; decide() re-checks each under its row lock.
        let timeout_us = heartbeat_timeout.num_microseconds().unwrap_or(i64::MAX);
        sqlx::query_scalar(
            "(SELECT agent_id FROM agents
               WHERE $2 AND status <> 'OFFLINE'
                 AND last_heartbeat_at < now() - make_interval(secs => $1::float8 / 1e6)
               LIMIT $3)
             UNION
             (SELECT agent_id FROM agents
               WHERE status = 'EXHAUSTED' AND recovery_at <= now()
               LIMIT $3)",
        )
        .bind(timeout_us as f64)
        .bind(offline_allowed)
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

    async fn prune_transitions(&self, older_than: Duration) -> Result<u64> {
        let older_than_us = older_than.num_microseconds().unwrap_or(i64::MAX);
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
        let through: Option<i64> = sqlx::query_scalar(
            "SELECT max(revision) FROM transitions
             WHERE occurred_at < now() - make_interval(secs => $1::float8 / 1e6)",
        )
        .bind(older_than_us as f64)
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
