//! The agent-status part of the embedded store: the SQL of the flows in
//! `storage::agents` ([`AgentTx`]), the reads, and the batch writer.
//!
//! Structurally the in-memory double with a file under it: a batch loads the
//! agents it names inside one `BEGIN IMMEDIATE` transaction on the single
//! writer, [`batch::plan`] decides, the batch's revisions are allocated from
//! `revision_head` in the same transaction (one writer: allocation and commit
//! are serial, so revisions commit in order and without gaps), and the
//! transitions and agent rows are written in one statement each.
//!
//! Bulk statements take their rows as one JSON array bound as text and read it
//! with `json_each`, as the Postgres store reads its arrays with `unnest`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{QueryBuilder, Sqlite, Transaction};
use tokio::sync::watch;

use super::{SqliteStore, micros, sqlite_error};
use crate::domain::agent::AgentStatus;
use crate::domain::batch::{self, Command};
use crate::domain::dispatch::IdempotencyKey;
use crate::domain::liveness::SweepQuery;
use crate::domain::transition::Claim;
use crate::domain::transition::{Agent, Transition};
use crate::error::{Error, Result};
use crate::storage::AgentQuery;
use crate::storage::agents::{
    self as flows, AGENT_COLUMNS, AgentTx, AgentTxs, CLAIM_COLUMNS, Outcomes, TRANSITION_COLUMNS,
    decoded,
};
use crate::storage::claims::{self, ClaimReads, Dialect, MatchingRow, SelectorSql};
use crate::storage::decode::StoredTime;
use crate::storage::pool::{AcquireMetrics, PoolStats};
use crate::storage::quota::{self as pools, PoolCommitted, PoolReads};

type AgentRow = flows::AgentRow<i64, String, String, String>;
type TransitionRow = flows::TransitionRow<i64>;
type ClaimRow = flows::ClaimRow<i64>;

/// Names as a JSON array, for `IN (SELECT value FROM json_each(?))`.
fn json_list(names: &[&str]) -> String {
    json!(names).to_string()
}

/// The agents of a batch as one JSON array, one object per row.
fn agents_json(agents: &[Agent]) -> Result<String> {
    let rows = agents
        .iter()
        .map(|a| {
            let ex = a.state.exhaustion.as_ref();
            Ok(json!({
                "agent_id": a.agent_id,
                "status": a.state.status.as_str(),
                "labels": serde_json::to_string(&a.labels)
                    .map_err(|e| Error::Internal(format!("labels: {e}")))?,
                "registered_at": micros(a.registered_at),
                "last_heartbeat_at": micros(a.state.last_heartbeat_at),
                "last_transition_at": micros(a.last_transition_at),
                "revision": a.revision,
                "exhaustion_reason": ex.map(|e| e.reason.as_str()),
                "recovery_at": ex.map(|e| micros(e.recovery.recovery_at)),
                "recovery_source": ex.map(|e| e.recovery.source.as_str()),
                "recovery_hint": ex.map(|e| e.recovery.hint.as_str()),
                "cordon_reason": a.cordon_reason,
                "claim_id": a.claim.as_ref().map(|c| &c.claim_id),
                "claim_holder": a.claim.as_ref().map(|c| &c.holder),
                "claim_token": a.claim.as_ref().map(|c| c.fencing_token),
                "claim_request_id": a.claim.as_ref().map(|c| &c.request_id),
                "claimed_at": a.claim.as_ref().map(|c| micros(c.claimed_at)),
                "lease_expires_at": a.claim.as_ref().map(|c| micros(c.lease_expires_at)),
                "quota_pools": serde_json::to_string(&a.quota_pools)
                    .map_err(|e| Error::Internal(format!("quota_pools: {e}")))?,
                "pool_holds": pools::holds_json(&a.pool_holds),
                "pool_held": a.pool_holds.is_held(),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::Value::Array(rows).to_string())
}

/// The transitions of a batch as one JSON array, one object per row.
fn transitions_json(transitions: &[Transition]) -> String {
    let rows: Vec<serde_json::Value> = transitions
        .iter()
        .map(|t| {
            json!({
                "revision": t.revision,
                "agent_id": t.agent_id,
                "from_status": t.from.map(AgentStatus::as_str),
                "to_status": t.to.as_str(),
                "cause": t.cause.as_str(),
                "occurred_at": micros(t.occurred_at),
                "exhaustion_reason": t.exhaustion_reason.map(|r| r.as_str()),
                "recovery_at": t.recovery_at.map(micros),
                "actor": t.actor,
                "quota_pool": t.quota_pool.as_ref().map(|p| p.as_str()),
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// The claims of a batch as one JSON array, one object per row.
fn claims_json(claims: &[Claim]) -> String {
    let rows: Vec<serde_json::Value> = claims
        .iter()
        .map(|c| {
            json!({
                "claim_id": c.claim_id,
                "agent_id": c.agent_id,
                "holder": c.holder,
                "request_id": c.request_id,
                "fencing_token": c.fencing_token,
                "slot_type": c.slot_type.as_str(),
                "claimed_at": micros(c.claimed_at),
                "lease_expires_at": micros(c.lease_expires_at),
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// Records the claims a batch made (tokens final).
const INSERT_CLAIMS: &str = "INSERT INTO claims (claim_id, agent_id, holder, request_id, \
         fencing_token, slot_type, claimed_at, lease_expires_at)
     SELECT value ->> 'claim_id', value ->> 'agent_id', value ->> 'holder',
            value ->> 'request_id', value ->> 'fencing_token', value ->> 'slot_type',
            value ->> 'claimed_at', value ->> 'lease_expires_at'
     FROM json_each(?1)";

/// Appends a batch's transitions (revisions final).
const INSERT_TRANSITIONS: &str = "INSERT INTO transitions (revision, agent_id, from_status, \
         to_status, cause, occurred_at, exhaustion_reason, recovery_at, actor, quota_pool)
     SELECT value ->> 'revision', value ->> 'agent_id', value ->> 'from_status',
            value ->> 'to_status', value ->> 'cause', value ->> 'occurred_at',
            value ->> 'exhaustion_reason', value ->> 'recovery_at', value ->> 'actor',
            value ->> 'quota_pool'
     FROM json_each(?1)";

/// Adds a batch's changes to the brakes' census (`agent_census`).
const UPDATE_CENSUS: &str = "INSERT INTO agent_census (label_key, label_value, agents, offline, \
         exhausted)
     SELECT value ->> 'key', value ->> 'value', value ->> 'agents', value ->> 'offline',
            value ->> 'exhausted'
     FROM json_each(?1) WHERE true
     ON CONFLICT (label_key, label_value) DO UPDATE SET
         agents = agents + excluded.agents,
         offline = offline + excluded.offline,
         exhausted = exhausted + excluded.exhausted";

fn census_json(census: &[crate::domain::brakes::CensusChange]) -> String {
    let rows: Vec<serde_json::Value> = census
        .iter()
        .map(|c| {
            json!({"key": c.key, "value": c.value, "agents": c.agents,
                   "offline": c.offline, "exhausted": c.exhausted})
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// Writes every changed agent's final state, inserting new ones. The
/// registration time is never rewritten, and `last_heartbeat_at` never moves
/// back. (`WHERE true` is SQLite's way of telling an upsert's ON CONFLICT
/// from a join's ON.)
const UPSERT_AGENTS: &str = "INSERT INTO agents (agent_id, status, labels, registered_at, \
         last_heartbeat_at, last_transition_at, revision, exhaustion_reason, recovery_at, \
         recovery_source, recovery_hint, cordon_reason, claim_id, claim_holder, claim_token, \
         claim_request_id, claimed_at, lease_expires_at, quota_pools, pool_holds, pool_held)
     SELECT value ->> 'agent_id', value ->> 'status', value ->> 'labels',
            value ->> 'registered_at', value ->> 'last_heartbeat_at',
            value ->> 'last_transition_at', value ->> 'revision',
            value ->> 'exhaustion_reason', value ->> 'recovery_at',
            value ->> 'recovery_source', value ->> 'recovery_hint', value ->> 'cordon_reason',
            value ->> 'claim_id', value ->> 'claim_holder', value ->> 'claim_token',
            value ->> 'claim_request_id', value ->> 'claimed_at', value ->> 'lease_expires_at',
            value ->> 'quota_pools', value ->> 'pool_holds', value ->> 'pool_held'
     FROM json_each(?1) WHERE true
     ON CONFLICT (agent_id) DO UPDATE SET
         status = excluded.status,
         labels = excluded.labels,
         last_heartbeat_at = MAX(agents.last_heartbeat_at, excluded.last_heartbeat_at),
         last_transition_at = excluded.last_transition_at,
         revision = excluded.revision,
         exhaustion_reason = excluded.exhaustion_reason,
         recovery_at = excluded.recovery_at,
         recovery_source = excluded.recovery_source,
         recovery_hint = excluded.recovery_hint,
         cordon_reason = excluded.cordon_reason,
         claim_id = excluded.claim_id,
         claim_holder = excluded.claim_holder,
         claim_token = excluded.claim_token,
         claim_request_id = excluded.claim_request_id,
         claimed_at = excluded.claimed_at,
         lease_expires_at = excluded.lease_expires_at,
         quota_pools = excluded.quota_pools,
         pool_holds = excluded.pool_holds,
         pool_held = excluded.pool_held";

/// What one write transaction decides: a batch of agent commands, or one
/// pool command.
#[derive(Clone, Copy)]
enum Job<'a> {
    Batch(&'a [Command]),
    Pool(&'a batch::PoolCommand),
}

impl SqliteStore {
    /// A batch (or a pool command) on the one writer: the agents it names
    /// (and the candidates offered its claims), its claims' rows, its pools
    /// and the members of a pool it may park, read in the transaction,
    /// decided, written, committed.
    async fn write_job(
        &self,
        job: Job<'_>,
        known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<(Outcomes, Option<PoolCommitted>)> {
        let commands: &[Command] = match job {
            Job::Batch(commands) => commands,
            Job::Pool(_) => &[],
        };
        let mut ids = batch::agent_ids(commands);
        // The candidates the server offered its claims from memory (the
        // known agents the batch does not name): read here by key, in the
        // transaction, and decided on as stored, instead of a selection
        // read; a claim they cannot serve is decided again on one.
        let offered: Vec<&str> = match &known {
            Some(known) if batch::claim_requests(commands).next().is_some() => known
                .iter()
                .map(|a| a.agent_id.as_str())
                .filter(|id| !ids.contains(id))
                .collect(),
            _ => Vec::new(),
        };
        ids.extend(&offered);
        // The write lock from here to commit: nobody else writes meanwhile.
        let mut tx = SqliteStore::begin_write(self).await?;
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE agent_id IN (SELECT value FROM json_each(?1))
             ORDER BY agent_id"
        ))
        .bind(json_list(&ids))
        .fetch_all(&mut *tx)
        .await
        .map_err(sqlite_error)?;
        let rows = decoded(rows)?;
        let (plan, pool_before, parked) = match job {
            Job::Batch(commands) => {
                let pool_rows =
                    pools::pool_rows(&mut SqlitePoolReads(&mut tx), commands, &rows).await?;
                let mut candidates = if offered.is_empty() {
                    claims::Candidates::Selected
                } else {
                    claims::Candidates::Offered
                };
                let plan = loop {
                    let rows_for_claims = claims::claim_rows(
                        &mut SqliteClaimReads(&mut tx),
                        commands,
                        Dialect::Sqlite,
                        candidates,
                    )
                    .await?;
                    let plan = batch::plan_full(
                        rows.clone(),
                        rows_for_claims,
                        pool_rows.clone(),
                        commands,
                        now,
                    );
                    if candidates == claims::Candidates::Offered && plan.claim_unserved() {
                        candidates = claims::Candidates::Selected;
                        continue;
                    }
                    break plan;
                };
                (plan, None, None)
            }
            Job::Pool(command) => {
                let pool_rows =
                    pools::pool_command_rows(&mut SqlitePoolReads(&mut tx), command).await?;
                let before = pool_rows.states.get(command.pool()).cloned();
                let (plan, parked) = batch::plan_pool(pool_rows, command, now)?;
                (plan, Some(before), parked)
            }
        };

        let count = plan.transition_count() as i64;
        let base: i64 = if count > 0 {
            sqlx::query_scalar(
                "UPDATE revision_head SET head_revision = head_revision + ?1
                 WHERE singleton = 1
                 RETURNING head_revision - ?1",
            )
            .bind(count)
            .fetch_one(&mut *tx)
            .await
            .map_err(sqlite_error)?
        } else {
            0
        };
        let (writes, outcomes) = plan.finish(base);
        let nothing = writes.changed.is_empty()
            && writes.transitions.is_empty()
            && writes.deleted.is_empty()
            && writes.pools.is_empty();
        if nothing {
            // Every command refused or a no-op: nothing to write; free the writer.
            tx.rollback().await.map_err(sqlite_error)?;
        } else {
            if !writes.transitions.is_empty() {
                sqlx::query(INSERT_TRANSITIONS)
                    .bind(transitions_json(&writes.transitions))
                    .execute(&mut *tx)
                    .await
                    .map_err(sqlite_error)?;
            }
            if !writes.changed.is_empty() {
                sqlx::query(UPSERT_AGENTS)
                    .bind(agents_json(&writes.changed)?)
                    .execute(&mut *tx)
                    .await
                    .map_err(sqlite_error)?;
            }
            if !writes.claims.is_empty() {
                sqlx::query(INSERT_CLAIMS)
                    .bind(claims_json(&writes.claims))
                    .execute(&mut *tx)
                    .await
                    .map_err(sqlite_error)?;
            }
            if !writes.deleted.is_empty() {
                let deleted: Vec<&str> = writes.deleted.iter().map(String::as_str).collect();
                sqlx::query(
                    "DELETE FROM agents WHERE agent_id IN (SELECT value FROM json_each(?1))",
                )
                .bind(json_list(&deleted))
                .execute(&mut *tx)
                .await
                .map_err(sqlite_error)?;
            }
            if !writes.census.is_empty() {
                sqlx::query(UPDATE_CENSUS)
                    .bind(census_json(&writes.census))
                    .execute(&mut *tx)
                    .await
                    .map_err(sqlite_error)?;
            }
            if !writes.pools.is_empty() {
                let rows: Vec<serde_json::Value> = writes
                    .pools
                    .iter()
                    .map(|(name, state)| json!({"name": name.as_str(), "state": pools::pool_json(state)}))
                    .collect();
                sqlx::query(
                    "INSERT INTO quota_pools (name, state, updated_at)
                     SELECT value ->> 'name', value ->> 'state', ?2 FROM json_each(?1) WHERE true
                     ON CONFLICT (name) DO UPDATE SET state = excluded.state,
                                                      updated_at = excluded.updated_at",
                )
                .bind(serde_json::Value::Array(rows).to_string())
                .bind(micros(now))
                .execute(&mut *tx)
                .await
                .map_err(sqlite_error)?;
            }
            tx.commit().await.map_err(sqlite_error)?;
            if count > 0 {
                self.tick_changes();
            }
        }
        let committed = match (job, pool_before) {
            (Job::Pool(command), Some(before)) => {
                Some(pools::committed(command.pool(), before, parked, writes))
            }
            _ => None,
        };
        Ok((outcomes, committed))
    }
}

/// The pool reads of a batch, on the one writer's transaction.
struct SqlitePoolReads<'t, 'c>(&'t mut Transaction<'c, Sqlite>);

#[async_trait]
impl PoolReads for SqlitePoolReads<'_, '_> {
    async fn pool_states(
        &mut self,
        names: &[&str],
        _create: &[&str],
    ) -> Result<Vec<(String, String)>> {
        // One writer: nobody parks a pool meanwhile, no row is needed first.
        sqlx::query_as(
            "SELECT name, state FROM quota_pools
             WHERE name IN (SELECT value FROM json_each(?1)) ORDER BY name",
        )
        .bind(json_list(names))
        .fetch_all(&mut **self.0)
        .await
        .map_err(sqlite_error)
    }

    async fn members(&mut self, pool: &str, except: &[&str]) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE (EXISTS (SELECT 1 FROM json_each(agents.quota_pools) WHERE value = ?1)
                    OR json_type(pool_holds, '$.pools.\"' || ?1 || '\"') IS NOT NULL)
               AND agent_id NOT IN (SELECT value FROM json_each(?2))
             ORDER BY agent_id"
        ))
        .bind(pool)
        .bind(json_list(except))
        .fetch_all(&mut **self.0)
        .await
        .map_err(sqlite_error)?;
        decoded(rows)
    }
}

/// The claim reads of a batch, on its transaction (the one writer's: what
/// it reads nobody else changes until it commits).
struct SqliteClaimReads<'t, 'c>(&'t mut Transaction<'c, Sqlite>);

#[async_trait]
impl ClaimReads for SqliteClaimReads<'_, '_> {
    async fn claimable(&mut self, selector: &SelectorSql, limit: i64) -> Result<Vec<Agent>> {
        let sql = claims::claimable_sql(AGENT_COLUMNS, selector, Dialect::Sqlite);
        let mut query = sqlx::query_as::<_, AgentRow>(&sql);
        for bind in &selector.binds {
            query = query.bind(bind);
        }
        let rows = query
            .bind(limit)
            .fetch_all(&mut **self.0)
            .await
            .map_err(sqlite_error)?;
        decoded(rows)
    }

    async fn claims_made(
        &mut self,
        keys: &[IdempotencyKey],
    ) -> Result<Vec<(Claim, Option<Agent>)>> {
        let pairs = json!(
            keys.iter()
                .map(|k| json!([k.holder, k.request_id]))
                .collect::<Vec<_>>()
        )
        .to_string();
        let rows: Vec<ClaimRow> = sqlx::query_as(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claims
             WHERE request_id <> ''
               AND (holder, request_id) IN
                   (SELECT value ->> 0, value ->> 1 FROM json_each(?1))"
        ))
        .bind(pairs)
        .fetch_all(&mut **self.0)
        .await
        .map_err(sqlite_error)?;
        let made: Vec<Claim> = decoded(rows)?;
        let ids: Vec<&str> = made.iter().map(|c| c.agent_id.as_str()).collect();
        let agents: Vec<Agent> = decoded(
            sqlx::query_as::<_, AgentRow>(&format!(
                "SELECT {AGENT_COLUMNS} FROM agents
                 WHERE agent_id IN (SELECT value FROM json_each(?1))"
            ))
            .bind(json_list(&ids))
            .fetch_all(&mut **self.0)
            .await
            .map_err(sqlite_error)?,
        )?;
        Ok(flows::with_agents(made, agents))
    }
}

/// One transaction on the embedded store. Its one writer serialises every
/// write transaction, so the lock is a plain read: nobody else can change
/// what a write transaction read until it commits.
struct SqliteAgentTx(Transaction<'static, Sqlite>);

#[async_trait]
impl AgentTx for SqliteAgentTx {
    async fn head(&mut self) -> Result<i64> {
        sqlx::query_scalar("SELECT head_revision FROM revision_head")
            .fetch_one(&mut *self.0)
            .await
            .map_err(sqlite_error)
    }

    async fn status_counts(&mut self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as("SELECT status, count(*) FROM agents GROUP BY status")
            .fetch_all(&mut *self.0)
            .await
            .map_err(sqlite_error)
    }

    async fn agents(&mut self, agent_ids: &[&str], statuses: &[&str]) -> Result<Vec<Agent>> {
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE true"));
        if !agent_ids.is_empty() {
            sql.push(" AND agent_id IN (SELECT value FROM json_each(")
                .push_bind(json_list(agent_ids))
                .push("))");
        }
        if !statuses.is_empty() {
            sql.push(" AND status IN (SELECT value FROM json_each(")
                .push_bind(json_list(statuses))
                .push("))");
        }
        sql.push(" ORDER BY agent_id");
        let rows: Vec<AgentRow> = sql
            .build_query_as()
            .fetch_all(&mut *self.0)
            .await
            .map_err(sqlite_error)?;
        decoded(rows)
    }

    async fn write_heartbeats(&mut self, beats: &[(&str, DateTime<Utc>)]) -> Result<()> {
        let rows: Vec<serde_json::Value> = beats
            .iter()
            .map(|(id, at)| json!([id, micros(*at)]))
            .collect();
        sqlx::query(
            "UPDATE agents SET last_heartbeat_at = MAX(agents.last_heartbeat_at, u.at)
             FROM (SELECT value ->> 0 AS agent_id, value ->> 1 AS at FROM json_each(?1)) AS u
             WHERE agents.agent_id = u.agent_id",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(&mut *self.0)
        .await
        .map(|_| ())
        .map_err(sqlite_error)
    }

    async fn lock_pruned_through(&mut self) -> Result<i64> {
        sqlx::query_scalar("SELECT pruned_through FROM revision_retention WHERE singleton = 1")
            .fetch_one(&mut *self.0)
            .await
            .map_err(sqlite_error)
    }

    async fn newest_before(&mut self, before: DateTime<Utc>) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT max(revision) FROM transitions WHERE occurred_at < ?1")
            .bind(micros(before))
            .fetch_one(&mut *self.0)
            .await
            .map_err(sqlite_error)
    }

    async fn prune_through(&mut self, through: i64) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM transitions WHERE revision <= ?1")
            .bind(through)
            .execute(&mut *self.0)
            .await
            .map_err(sqlite_error)?;
        sqlx::query("UPDATE revision_retention SET pruned_through = ?1 WHERE singleton = 1")
            .bind(through)
            .execute(&mut *self.0)
            .await
            .map_err(sqlite_error)?;
        Ok(deleted.rows_affected())
    }

    async fn prune_claims(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query(
            "DELETE FROM claims WHERE claimed_at < ?1
               AND NOT EXISTS (SELECT 1 FROM agents a WHERE a.claim_id = claims.claim_id)",
        )
        .bind(micros(before))
        .execute(&mut *self.0)
        .await
        .map(|done| done.rows_affected())
        .map_err(sqlite_error)
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.0.commit().await.map_err(sqlite_error)
    }
}

#[async_trait]
impl AgentTxs for SqliteStore {
    async fn begin_write(&self) -> Result<Box<dyn AgentTx + '_>> {
        Ok(Box::new(SqliteAgentTx(
            SqliteStore::begin_write(self).await?,
        )))
    }

    /// A read transaction: its statements read the WAL snapshot its first
    /// one takes.
    async fn begin_snapshot(&self) -> Result<Box<dyn AgentTx + '_>> {
        let tx = self.readers().begin().await.map_err(sqlite_error)?;
        Ok(Box::new(SqliteAgentTx(tx)))
    }

    async fn probe(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(self.readers())
            .await
            .map(|_| ())
            .map_err(sqlite_error)
    }

    async fn write_batch(
        &self,
        commands: &[Command],
        known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<Outcomes> {
        let (outcomes, _) = self.write_job(Job::Batch(commands), known, now).await?;
        Ok(outcomes)
    }

    async fn write_pool(
        &self,
        command: &batch::PoolCommand,
        now: DateTime<Utc>,
    ) -> Result<PoolCommitted> {
        match self.write_job(Job::Pool(command), None, now).await? {
            (_, Some(committed)) => Ok(committed),
            (_, None) => Err(Error::Internal("pool command answered nothing".into())),
        }
    }

    async fn pool_rows_all(&self) -> Result<Vec<(String, String)>> {
        sqlx::query_as("SELECT name, state FROM quota_pools ORDER BY name")
            .fetch_all(self.readers())
            .await
            .map_err(sqlite_error)
    }

    async fn pool_counts(&self) -> Result<Vec<(String, String, i64, i64)>> {
        // Pool names never hold a double quote: a quoted JSON path key is safe.
        sqlx::query_as(
            "SELECT p.value, a.status, count(*),
                    sum(json_type(a.pool_holds, '$.pools.\"' || p.value || '\"') IS NOT NULL
                        AND json_type(a.pool_holds,
                                      '$.pools.\"' || p.value || '\".released_at') IS NULL)
             FROM agents a, json_each(a.quota_pools) AS p
             GROUP BY p.value, a.status ORDER BY p.value, a.status",
        )
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)
    }

    async fn pool_agents_of(&self, pool: &str) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE EXISTS (SELECT 1 FROM json_each(agents.quota_pools) WHERE value = ?1)
                OR json_type(pool_holds, '$.pools.\"' || ?1 || '\"') IS NOT NULL
             ORDER BY agent_id"
        ))
        .bind(pool)
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)?;
        decoded(rows)
    }

    async fn agent(&self, agent_id: &str) -> Result<Option<Agent>> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?1"
        ))
        .bind(agent_id)
        .fetch_optional(self.readers())
        .await
        .map_err(sqlite_error)?;
        row.map(Agent::try_from).transpose()
    }

    async fn agents_page(
        &self,
        query: &AgentQuery,
        statuses: &[&str],
        limit: i64,
    ) -> Result<Vec<Agent>> {
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE true"));
        if let Some(after) = &query.after_agent_id {
            sql.push(" AND agent_id > ").push_bind(after);
        }
        if !statuses.is_empty() {
            // One parameter each: with one status, the (status, agent_id) index
            // gives the page in order without a sort.
            sql.push(" AND status IN (");
            let mut list = sql.separated(", ");
            for status in statuses {
                list.push_bind(*status);
            }
            sql.push(")");
        }
        for (key, value) in &query.labels {
            sql.push(" AND EXISTS (SELECT 1 FROM json_each(agents.labels) WHERE key = ")
                .push_bind(key)
                .push(" AND value = ")
                .push_bind(value)
                .push(")");
        }
        sql.push(" ORDER BY agent_id LIMIT ").push_bind(limit);
        let rows: Vec<AgentRow> = sql
            .build_query_as()
            .fetch_all(self.readers())
            .await
            .map_err(sqlite_error)?;
        decoded(rows)
    }

    async fn sweep(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>> {
        // Indexed comparisons only; the domain chose the statuses and the bounds.
        // (last_heartbeat_at is not indexed, as in Postgres: the heartbeat flush
        // rewrites it for every live agent.)
        sqlx::query_scalar(
            "SELECT agent_id FROM (
                 SELECT agent_id FROM agents
                 WHERE status IN (SELECT value FROM json_each(?1)) AND last_heartbeat_at < ?2
                 ORDER BY last_heartbeat_at LIMIT ?5)
             UNION
             SELECT agent_id FROM (
                 SELECT agent_id FROM agents
                 WHERE status IN (SELECT value FROM json_each(?3)) AND recovery_at <= ?4
                   AND NOT pool_held
                 ORDER BY recovery_at LIMIT ?5)
             UNION
             SELECT agent_id FROM (
                 SELECT agent_id FROM agents
                 WHERE lease_expires_at <= ?6
                 ORDER BY lease_expires_at LIMIT ?5)
             UNION
             SELECT agent_id FROM (
                 SELECT agent_id FROM agents
                 WHERE status = 'OFFLINE' AND last_transition_at < ?7
                 ORDER BY last_transition_at LIMIT ?5)",
        )
        .bind(json_list(&flows::names(&query.silent_statuses)))
        .bind(micros(query.silent_before))
        .bind(json_list(&flows::names(&query.recovering_statuses)))
        .bind(micros(query.recovered_by))
        .bind(limit)
        .bind(micros(query.leases_expired_by))
        .bind(query.offline_before.map(micros))
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)
    }

    async fn claim(&self, claim_id: &str) -> Result<Option<Claim>> {
        let row: Option<ClaimRow> = sqlx::query_as(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claims WHERE claim_id = ?1"
        ))
        .bind(claim_id)
        .fetch_optional(self.readers())
        .await
        .map_err(sqlite_error)?;
        row.map(Claim::try_from).transpose()
    }

    async fn claimed_page(
        &self,
        after: Option<&str>,
        holder: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE claim_id IS NOT NULL
               AND (?1 IS NULL OR agent_id > ?1)
               AND (?2 IS NULL OR claim_holder = ?2)
             ORDER BY agent_id
             LIMIT ?3"
        ))
        .bind(after)
        .bind(holder)
        .bind(limit)
        .fetch_all(self.readers())
        .await
        .map_err(sqlite_error)?;
        decoded(rows)
    }

    async fn matching(&self, selector: &SelectorSql) -> Result<Vec<MatchingRow>> {
        let sql = claims::matching_sql(selector);
        let mut query = sqlx::query_as::<_, (String, bool, i64, Option<i64>)>(&sql);
        for bind in &selector.binds {
            query = query.bind(bind);
        }
        let rows = query
            .fetch_all(self.readers())
            .await
            .map_err(sqlite_error)?;
        Ok(rows
            .into_iter()
            .map(|(status, cordoned, n, at)| (status, cordoned, n, at.map(StoredTime::time)))
            .collect())
    }

    async fn transitions(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>> {
        let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE revision > "
        ));
        sql.push_bind(after);
        if let Some(agent_id) = agent_id {
            sql.push(" AND agent_id = ").push_bind(agent_id);
        }
        sql.push(" ORDER BY revision LIMIT ").push_bind(limit);
        let rows: Vec<TransitionRow> = sql
            .build_query_as()
            .fetch_all(self.readers())
            .await
            .map_err(sqlite_error)?;
        decoded(rows)
    }

    async fn bounds(&self) -> Result<(i64, i64)> {
        sqlx::query_as(
            "SELECT r.pruned_through, h.head_revision FROM revision_retention r, revision_head h",
        )
        .fetch_one(self.readers())
        .await
        .map_err(sqlite_error)
    }

    fn change_feed(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn pools(&self) -> Vec<PoolStats> {
        vec![
            self.writer.stats("sqlite_writer"),
            self.readers().stats("sqlite_readers"),
        ]
    }

    fn observe(&self, metrics: &dyn Fn(&'static str) -> AcquireMetrics) {
        self.writer.observe(metrics("sqlite_writer"));
        self.readers().observe(metrics("sqlite_readers"));
    }

    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{Event, ExhaustionReason, ExhaustionReport, SlotType};
    use crate::domain::batch::{Applied, Refusal};
    use crate::domain::labels::Labels;
    use crate::domain::liveness::sweep_query;
    use crate::domain::recovery::RecoverySource;
    use crate::domain::transition::{RevisionBounds, WatchFilter};
    use crate::storage::sqlite::truncate;
    use crate::storage::{AgentStore, StatusCounts, StoreLocation, StoreOptions};
    use chrono::{Duration, TimeZone};

    struct TestStore {
        store: SqliteStore,
        dir: std::path::PathBuf,
    }

    impl Drop for TestStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn store() -> TestStore {
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-sqlite-agents-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let path = dir.join("fleetcare.db");
        let args = StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()));
        let store = SqliteStore::open(&path, &args).await.expect("store opens");
        TestStore { store, dir }
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn register(id: &str, labels: &[(&str, &str)]) -> Command {
        Command::Register {
            quota_pools: Vec::new(),
            agent_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            actor: "test".into(),
        }
    }

    fn apply(id: &str, event: Event) -> Command {
        Command::Apply {
            agent_id: id.into(),
            event,
            fencing_token: None,
            actor: "test".into(),
        }
    }

    fn exhausted(recovery_at: DateTime<Utc>) -> Event {
        Event::ReportExhausted(ExhaustionReport {
            reason: ExhaustionReason::RateLimit,
            explicit_recovery_at: Some(recovery_at),
            headers: vec![],
            message: String::new(),
            time_zone: None,
            default_recovery: Duration::hours(1),
            default_billing_recovery: Duration::hours(5),
        })
    }

    async fn commit(s: &SqliteStore, commands: &[Command], now: DateTime<Utc>) -> Vec<Applied> {
        s.commit_batch(commands, now)
            .await
            .expect("batch commits")
            .into_iter()
            .map(|o| o.expect("command applied"))
            .collect()
    }

    #[tokio::test]
    async fn batches_get_consecutive_revisions_in_command_order_and_read_back_as_answered() {
        let t = store().await;
        let s = &t.store;
        let mut changes = s.changes();
        let first = commit(
            s,
            &[register("b", &[("team", "infra")]), register("a", &[])],
            t0(),
        )
        .await;
        assert_eq!(
            first
                .iter()
                .map(|a| (a.agent.agent_id.as_str(), a.agent.revision, a.created))
                .collect::<Vec<_>>(),
            [("b", 1, true), ("a", 2, true)]
        );
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();

        // Nanoseconds in the server's clock: the answer is at the store's precision.
        let now = t0() + Duration::nanoseconds(1_234_567);
        let second = commit(
            s,
            &[
                apply("a", Event::StartWork(SlotType::Work)),
                apply("b", Event::StartWork(SlotType::OnCall)),
                apply("a", Event::FinishWork),
            ],
            now,
        )
        .await;
        let revisions: Vec<i64> = second
            .iter()
            .map(|a| a.transition.as_ref().unwrap().revision)
            .collect();
        assert_eq!(revisions, [3, 4, 5]);
        assert_eq!(second[0].agent.state.status, AgentStatus::Busy);
        assert_eq!(second[0].agent.revision, 3);
        assert_eq!(second[2].agent.last_transition_at, truncate(now));

        for applied in [&second[1], &second[2]] {
            let read = s.get_agent(&applied.agent.agent_id).await.unwrap();
            assert_eq!(read, applied.agent);
        }
        let history = s.transitions_after(0, None, 100).await.unwrap();
        assert_eq!(
            history.iter().map(|t| t.revision).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(history[2], *second[0].transition.as_ref().unwrap());
        let of_a = s.transitions_after(2, Some("a"), 100).await.unwrap();
        assert_eq!(of_a.iter().map(|t| t.revision).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(s.transitions_after(0, None, 2).await.unwrap().len(), 2);
        assert_eq!(
            s.revision_bounds().await.unwrap(),
            RevisionBounds {
                pruned_through: 0,
                head: 5
            }
        );
        assert_eq!(s.get_agent("b").await.unwrap().registered_at, t0());
        assert!(matches!(
            s.get_agent("ghost").await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn a_refused_command_refuses_only_itself_and_a_batch_of_refusals_writes_nothing() {
        let t = store().await;
        let s = &t.store;
        commit(s, &[register("a", &[])], t0()).await;
        let mut changes = s.changes();
        let outcomes = s
            .commit_batch(
                &[
                    apply("a", Event::StartWork(SlotType::Work)),
                    apply("a", Event::StartWork(SlotType::Work)),
                    apply("ghost", Event::FinishWork),
                ],
                t0(),
            )
            .await
            .unwrap();
        assert_eq!(outcomes[0].as_ref().unwrap().agent.revision, 2);
        assert!(matches!(outcomes[1], Err(Refusal::Transition(_))));
        assert_eq!(outcomes[2], Err(Refusal::UnknownAgent("ghost".into())));
        changes.mark_unchanged();

        let outcomes = s
            .commit_batch(&[apply("ghost", Event::Heartbeat)], t0())
            .await
            .unwrap();
        assert!(outcomes[0].is_err());
        assert!(!changes.has_changed().unwrap());
        assert_eq!(s.revision_bounds().await.unwrap().head, 2);
        assert_eq!(s.transitions_after(0, None, 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_repeated_registration_replaces_labels_without_a_transition() {
        let t = store().await;
        let s = &t.store;
        commit(s, &[register("a", &[("team", "infra")])], t0()).await;
        let later = t0() + Duration::seconds(5);
        let again = commit(s, &[register("a", &[("team", "ops")])], later).await;
        assert!(!again[0].created && again[0].transition.is_none());
        let read = s.get_agent("a").await.unwrap();
        assert_eq!(read.labels.get("team").map(String::as_str), Some("ops"));
        assert_eq!(read.registered_at, t0());
        assert_eq!(read.state.last_heartbeat_at, later);
        assert_eq!(read.revision, 1);
        assert_eq!(s.revision_bounds().await.unwrap().head, 1);
    }

    #[tokio::test]
    async fn exhaustion_round_trips() {
        let t = store().await;
        let s = &t.store;
        commit(s, &[register("a", &[])], t0()).await;
        let recovery_at = t0() + Duration::minutes(30);
        let applied = commit(s, &[apply("a", exhausted(recovery_at))], t0()).await;
        let read = s.get_agent("a").await.unwrap();
        assert_eq!(read, applied[0].agent);
        assert_eq!(read.state.status, AgentStatus::Exhausted);
        let ex = read.state.exhaustion.expect("exhaustion kept");
        assert_eq!(ex.reason, ExhaustionReason::RateLimit);
        assert_eq!(ex.recovery.recovery_at, recovery_at);
        assert_eq!(ex.recovery.source, RecoverySource::Explicit);
        let t = &s.transitions_after(1, None, 10).await.unwrap()[0];
        assert_eq!(t.exhaustion_reason, Some(ExhaustionReason::RateLimit));
        assert_eq!(t.recovery_at, Some(recovery_at));
    }

    #[tokio::test]
    async fn heartbeats_move_forward_only_leave_status_alone_and_ignore_unknown_agents() {
        let t = store().await;
        let s = &t.store;
        commit(s, &[register("a", &[]), register("b", &[])], t0()).await;
        commit(s, &[apply("b", Event::MarkOffline)], t0()).await;
        let later = t0() + Duration::seconds(10);
        s.record_heartbeats(&[
            ("a".into(), later),
            ("a".into(), t0() + Duration::seconds(3)),
            ("b".into(), later),
            ("ghost".into(), later),
        ])
        .await
        .unwrap();
        let a = s.get_agent("a").await.unwrap();
        assert_eq!(a.state.last_heartbeat_at, later);
        s.record_heartbeats(&[("a".into(), t0())]).await.unwrap();
        assert_eq!(
            s.get_agent("a").await.unwrap().state.last_heartbeat_at,
            later
        );
        let b = s.get_agent("b").await.unwrap();
        assert_eq!(b.state.status, AgentStatus::Offline);
        assert_eq!(b.state.last_heartbeat_at, later);
        assert!(matches!(
            s.get_agent("ghost").await,
            Err(Error::NotFound { .. })
        ));
        s.record_heartbeats(&[]).await.unwrap();
        // A batch deciding at an older clock reading does not move it back either.
        commit(s, &[apply("a", Event::Heartbeat)], t0()).await;
        assert_eq!(
            s.get_agent("a").await.unwrap().state.last_heartbeat_at,
            later
        );
    }

    #[tokio::test]
    async fn list_filters_by_labels_and_status_and_pages_by_agent_id() {
        let t = store().await;
        let s = &t.store;
        let odd_key = "a.b \"c\"";
        commit(
            s,
            &[
                register("a1", &[("team", "infra"), ("zone", "eu")]),
                register("a2", &[("team", "ops")]),
                register("a3", &[("team", "infra")]),
                register("a4", &[("team", "infra"), ("zone", "eu"), (odd_key, "1")]),
                register("a5", &[("team", "infra"), ("zone", "eu")]),
            ],
            t0(),
        )
        .await;
        commit(s, &[apply("a5", Event::StartWork(SlotType::Work))], t0()).await;
        let ids = |agents: Vec<Agent>| {
            agents
                .into_iter()
                .map(|a| a.agent_id)
                .collect::<Vec<String>>()
        };
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut query = AgentQuery {
            labels: labels(&[("team", "infra"), ("zone", "eu")]),
            limit: 2,
            ..Default::default()
        };
        assert_eq!(ids(s.list_agents(&query).await.unwrap()), ["a1", "a4"]);
        query.after_agent_id = Some("a4".into());
        assert_eq!(ids(s.list_agents(&query).await.unwrap()), ["a5"]);
        query.after_agent_id = None;
        query.statuses = vec![AgentStatus::Idle];
        query.limit = 10;
        assert_eq!(ids(s.list_agents(&query).await.unwrap()), ["a1", "a4"]);
        query.statuses = vec![AgentStatus::Busy, AgentStatus::OnCall];
        assert_eq!(ids(s.list_agents(&query).await.unwrap()), ["a5"]);
        let all = AgentQuery {
            limit: 10,
            ..Default::default()
        };
        assert_eq!(
            ids(s.list_agents(&all).await.unwrap()),
            ["a1", "a2", "a3", "a4", "a5"]
        );
        let odd = AgentQuery {
            labels: labels(&[(odd_key, "1")]),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(ids(s.list_agents(&odd).await.unwrap()), ["a4"]);
        let none = AgentQuery {
            labels: labels(&[("team", "infra\"")]),
            limit: 10,
            ..Default::default()
        };
        assert!(s.list_agents(&none).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn snapshot_reads_the_head_with_the_matching_agents() {
        let t = store().await;
        let s = &t.store;
        commit(
            s,
            &[register("a", &[]), register("b", &[]), register("c", &[])],
            t0(),
        )
        .await;
        commit(s, &[apply("b", Event::StartWork(SlotType::Work))], t0()).await;
        let (head, agents) = s.snapshot(&WatchFilter::default()).await.unwrap();
        assert_eq!(head, 4);
        assert_eq!(agents.len(), 3);
        let filter = WatchFilter {
            agent_ids: ["a".to_string(), "b".to_string()].into(),
            statuses: [AgentStatus::Busy].into(),
        };
        let (head, agents) = s.snapshot(&filter).await.unwrap();
        assert_eq!(head, 4);
        assert_eq!(
            agents
                .iter()
                .map(|a| a.agent_id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[tokio::test]
    async fn counts_by_status_carry_the_revision_they_were_read_at() {
        let t = store().await;
        let s = &t.store;
        assert_eq!(s.count_by_status().await.unwrap(), StatusCounts::default());
        commit(s, &[register("a", &[]), register("b", &[])], t0()).await;
        commit(s, &[apply("b", Event::StartWork(SlotType::Work))], t0()).await;
        let counts = s.count_by_status().await.unwrap();
        assert_eq!(counts.revision, 3);
        assert_eq!(counts.of(AgentStatus::Idle), 1);
        assert_eq!(counts.of(AgentStatus::Busy), 1);
        assert_eq!(counts.of(AgentStatus::Offline), 0);
        assert_eq!(counts.total(), 2);
    }

    #[tokio::test]
    async fn pruning_removes_a_prefix_and_keeps_the_head() {
        let t = store().await;
        let s = &t.store;
        commit(s, &[register("a", &[])], t0()).await;
        commit(
            s,
            &[apply("a", Event::StartWork(SlotType::Work))],
            t0() + Duration::minutes(10),
        )
        .await;
        // Revision 3 occurred before revision 2's time: pruning by time still
        // removes a prefix, through the newest expired revision.
        commit(s, &[apply("a", Event::FinishWork)], t0()).await;
        commit(
            s,
            &[apply("a", Event::StartWork(SlotType::Work))],
            t0() + Duration::minutes(20),
        )
        .await;
        assert_eq!(
            s.prune_transitions(t0() + Duration::minutes(1))
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            s.revision_bounds().await.unwrap(),
            RevisionBounds {
                pruned_through: 3,
                head: 4
            }
        );
        assert_eq!(
            s.prune_transitions(t0() + Duration::minutes(1))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            s.prune_transitions(t0() + Duration::hours(1))
                .await
                .unwrap(),
            1
        );
        let bounds = s.revision_bounds().await.unwrap();
        assert_eq!((bounds.pruned_through, bounds.head), (4, 4));
        assert!(s.transitions_after(0, None, 10).await.unwrap().is_empty());
        // The next revision continues from the head, not from the (empty) history.
        let next = commit(s, &[apply("a", Event::FinishWork)], t0()).await;
        assert_eq!(next[0].agent.revision, 5);
    }

    #[tokio::test]
    async fn sweep_candidates_are_the_silent_and_the_recovered() {
        let t = store().await;
        let s = &t.store;
        commit(
            s,
            &[
                register("silent", &[]),
                register("live", &[]),
                register("offline", &[]),
                register("recovered", &[]),
                register("parked", &[]),
            ],
            t0(),
        )
        .await;
        commit(
            s,
            &[
                apply("offline", Event::MarkOffline),
                apply("recovered", exhausted(t0() + Duration::minutes(1))),
                apply("parked", exhausted(t0() + Duration::hours(2))),
            ],
            t0(),
        )
        .await;
        let now = t0() + Duration::minutes(5);
        s.record_heartbeats(&[
            ("live".into(), now),
            ("recovered".into(), now),
            ("parked".into(), now),
        ])
        .await
        .unwrap();
        let query = sweep_query(now, Duration::minutes(1), true);
        let mut found = s.sweep_candidates(&query, 10).await.unwrap();
        found.sort();
        assert_eq!(found, ["recovered", "silent"]);
        // The store selects what the domain's own predicate selects.
        for agent in s
            .list_agents(&AgentQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
        {
            assert_eq!(
                query.selects(&agent.state),
                found.contains(&agent.agent_id),
                "{}",
                agent.agent_id
            );
        }
        // During the start-up grace nobody is silent.
        let grace = sweep_query(now, Duration::minutes(1), false);
        assert_eq!(s.sweep_candidates(&grace, 10).await.unwrap(), ["recovered"]);
        assert!(s.sweep_candidates(&query, 0).await.unwrap().is_empty());
    }

    /// The query plan of `sql` (with `param` bound to its first parameter).
    async fn plan_of(s: &SqliteStore, sql: &str, param: &str) -> String {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .bind(param)
                .fetch_all(s.readers())
                .await
                .unwrap();
        rows.into_iter()
            .map(|(.., detail)| detail)
            .collect::<Vec<_>>()
            .join("; ")
    }

    #[tokio::test]
    async fn batches_and_heartbeats_find_agents_by_primary_key() {
        let t = store().await;
        let s = &t.store;
        let load = plan_of(
            s,
            &format!(
                "SELECT {AGENT_COLUMNS} FROM agents
                 WHERE agent_id IN (SELECT value FROM json_each(?1)) ORDER BY agent_id"
            ),
            "[\"a\"]",
        )
        .await;
        assert!(!load.contains("SCAN agents"), "{load}");
        let beat = plan_of(
            s,
            "UPDATE agents SET last_heartbeat_at = MAX(agents.last_heartbeat_at, u.at)
             FROM (SELECT value ->> 0 AS agent_id, value ->> 1 AS at FROM json_each(?1)) AS u
             WHERE agents.agent_id = u.agent_id",
            "[[\"a\", 1]]",
        )
        .await;
        assert!(!beat.contains("SCAN agents"), "{beat}");
    }
}
