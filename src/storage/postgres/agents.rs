//! Agents and transitions in Postgres: the SQL of the flows in
//! `storage::agents` ([`AgentTx`]), the reads, and the batch writer.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Postgres, Transaction};
use tokio::sync::watch;

use super::{PgStore, READ_ONLY, TRANSITIONS_CHANNEL, db_error};
use crate::domain::agent::AgentStatus;
use crate::domain::batch::{self, Command};
use crate::domain::dispatch::IdempotencyKey;
use crate::domain::labels::Labels;
use crate::domain::liveness::SweepQuery;
use crate::domain::quota::PoolName;
use crate::domain::transition::Claim;
use crate::domain::transition::{Agent, Transition};
use crate::error::{Error, Result};
use crate::storage::AgentQuery;
use crate::storage::agents::{
    self as flows, AGENT_COLUMNS, AgentTx, AgentTxs, CLAIM_COLUMNS, Outcomes, TRANSITION_COLUMNS,
    decoded,
};
use crate::storage::claims::{self, ClaimReads, Dialect, MatchingRow, SelectorSql};
use crate::storage::pool::{AcquireMetrics, PoolStats};
use crate::storage::quota::{self as pools, PoolCommitted, PoolReads, StoredHolds};

type AgentRow =
    flows::AgentRow<DateTime<Utc>, Json<Labels>, Json<Vec<PoolName>>, Json<StoredHolds>>;
type TransitionRow = flows::TransitionRow<DateTime<Utc>>;
type ClaimRow = flows::ClaimRow<DateTime<Utc>>;

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
    cordon_reason: Vec<Option<String>>,
    claim_id: Vec<Option<String>>,
    claim_holder: Vec<Option<String>>,
    claim_token: Vec<Option<i64>>,
    claim_request_id: Vec<Option<String>>,
    claimed_at: Vec<Option<DateTime<Utc>>>,
    lease_expires_at: Vec<Option<DateTime<Utc>>>,
    quota_pools: Vec<String>,
    pool_holds: Vec<String>,
    pool_held: Vec<bool>,
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
            c.cordon_reason.push(a.cordon_reason.clone());
            let claim = a.claim.as_ref();
            c.claim_id.push(claim.map(|c| c.claim_id.clone()));
            c.claim_holder.push(claim.map(|c| c.holder.clone()));
            c.claim_token.push(claim.map(|c| c.fencing_token));
            c.claim_request_id.push(claim.map(|c| c.request_id.clone()));
            c.claimed_at.push(claim.map(|c| c.claimed_at));
            c.lease_expires_at.push(claim.map(|c| c.lease_expires_at));
            c.quota_pools.push(
                serde_json::to_string(&a.quota_pools)
                    .map_err(|e| Error::Internal(format!("quota_pools: {e}")))?,
            );
            c.pool_holds.push(pools::holds_json(&a.pool_holds));
            c.pool_held.push(a.pool_holds.is_held());
        }
        Ok(c)
    }
}

/// Writes a batch in one statement. First it locks, in agent-id order, every
/// row the batch expects as given in `$24`.. (none on the locking path, whose
/// transaction read them FOR UPDATE already) and checks that each still is as
/// expected (its heartbeat aside: that moves by itself, and is merged below);
/// `ok` is whether they all are, and if not nothing is written. Then, when the
/// batch has transitions (`$1` > 0), it takes the revision row (the last lock,
/// held to commit), notifies with this store's origin, and appends them; every
/// changed agent's final state is written, its relative revision (and its
/// claim's relative fencing token) shifted by the allocated base where the
/// shifts say so, and `last_heartbeat_at` never moves back; the claims made
/// are recorded with their tokens shifted; deleted agents' rows are removed;
/// the brakes' census takes the batch's changes (`$60`.., the fleet's row
/// first, so writers of the census queue on that row and cannot deadlock
/// on the label rows).
/// The revision row's update waits for `ok` (its condition), so the agent
/// rows are always locked before it. The status is compared with `IS NOT
/// DISTINCT FROM` (the column is NOT NULL: the same meaning) because that is
/// not an index condition: a generic plan made while the table had no
/// statistics (a new database, or no autovacuum yet) otherwise looked the
/// rows up through `agents_status_recovery_idx` by status, reading every
/// agent of that status per batch for the connection's life; this way the
/// primary key is the only way in (docs/benchmarks.md, Claims).
const WRITE_BATCH: &str = "WITH locked AS (
         SELECT a.agent_id FROM agents a
         JOIN unnest($24::text[], $25::text[], $26::text[], $27::timestamptz[], $28::bigint[],
                     $29::text[], $30::timestamptz[], $31::text[], $32::text[], $33::text[],
                     $42::text[], $43::bigint[], $44::timestamptz[], $55::text[], $58::text[])
              AS e(agent_id, status, labels, last_transition_at, revision,
                   exhaustion_reason, recovery_at, recovery_source, recovery_hint,
                   cordon_reason, claim_id, claim_token, lease_expires_at, quota_pools,
                   pool_holds)
           ON a.agent_id = e.agent_id
         WHERE a.status IS NOT DISTINCT FROM e.status AND a.labels = e.labels::jsonb
           AND a.quota_pools = e.quota_pools::jsonb AND a.pool_holds = e.pool_holds::jsonb
           AND a.last_transition_at = e.last_transition_at AND a.revision = e.revision
           AND a.exhaustion_reason IS NOT DISTINCT FROM e.exhaustion_reason
           AND a.recovery_at IS NOT DISTINCT FROM e.recovery_at
           AND a.recovery_source IS NOT DISTINCT FROM e.recovery_source
           AND a.recovery_hint IS NOT DISTINCT FROM e.recovery_hint
           AND a.cordon_reason IS NOT DISTINCT FROM e.cordon_reason
           AND a.claim_id IS NOT DISTINCT FROM e.claim_id
           AND a.claim_token IS NOT DISTINCT FROM e.claim_token
           AND a.lease_expires_at IS NOT DISTINCT FROM e.lease_expires_at
         ORDER BY a.agent_id
         FOR UPDATE OF a
     ),
     ok AS (
         SELECT count(*) = cardinality($24::text[]) AS ok FROM locked
     ),
     head AS (
         UPDATE revision_head SET head_revision = head_revision + $1
         WHERE singleton AND $1 > 0 AND (SELECT ok FROM ok)
         RETURNING head_revision - $1 AS base
     ),
     notified AS (
         SELECT pg_notify($2, $23) FROM head
     ),
     base AS (
         SELECT COALESCE((SELECT base FROM head), 0) AS base FROM ok WHERE ok.ok
     ),
     appended AS (
         INSERT INTO transitions (revision, agent_id, from_status, to_status, cause,
                                  occurred_at, exhaustion_reason, recovery_at, actor,
                                  quota_pool)
         SELECT base.base + t.rel, t.agent_id, t.from_status, t.to_status, t.cause,
                t.occurred_at, t.exhaustion_reason, t.recovery_at, t.actor, t.quota_pool
         FROM base, unnest($14::bigint[], $15::text[], $16::text[], $17::text[], $18::text[],
                           $19::timestamptz[], $20::text[], $21::timestamptz[], $22::text[],
                           $59::text[])
              AS t(rel, agent_id, from_status, to_status, cause, occurred_at,
                   exhaustion_reason, recovery_at, actor, quota_pool)
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
             recovery_hint = u.recovery_hint,
             cordon_reason = u.cordon_reason,
             claim_id = u.claim_id,
             claim_holder = u.claim_holder,
             claim_token = CASE WHEN u.claim_shift THEN base.base + u.claim_token
                                ELSE u.claim_token END,
             claim_request_id = u.claim_request_id,
             claimed_at = u.claimed_at,
             lease_expires_at = u.lease_expires_at,
             quota_pools = u.quota_pools::jsonb,
             pool_holds = u.pool_holds::jsonb,
             pool_held = u.pool_held
         FROM base, unnest($3::text[], $4::text[], $5::text[], $6::timestamptz[],
                           $7::timestamptz[], $8::bigint[], $9::bool[], $10::text[],
                           $11::timestamptz[], $12::text[], $13::text[], $34::text[],
                           $35::text[], $36::text[], $37::bigint[], $38::bool[], $39::text[],
                           $40::timestamptz[], $41::timestamptz[], $54::text[], $56::text[],
                           $57::bool[])
              AS u(agent_id, status, labels, last_heartbeat_at, last_transition_at,
                   revision, shift, exhaustion_reason, recovery_at, recovery_source,
                   recovery_hint, cordon_reason, claim_id, claim_holder, claim_token,
                   claim_shift, claim_request_id, claimed_at, lease_expires_at, quota_pools,
                   pool_holds, pool_held)
         WHERE agents.agent_id = u.agent_id
     ),
     recorded AS (
         INSERT INTO claims (claim_id, agent_id, holder, request_id, fencing_token,
                             slot_type, claimed_at, lease_expires_at)
         SELECT c.claim_id, c.agent_id, c.holder, c.request_id, base.base + c.rel,
                c.slot_type, c.claimed_at, c.lease_expires_at
         FROM base, unnest($45::text[], $46::text[], $47::text[], $48::text[], $49::bigint[],
                           $50::text[], $51::timestamptz[], $52::timestamptz[])
              AS c(claim_id, agent_id, holder, request_id, rel, slot_type, claimed_at,
                   lease_expires_at)
     ),
     removed AS (
         DELETE FROM agents USING base WHERE agents.agent_id = ANY($53::text[])
     ),
     counted AS (
         INSERT INTO agent_census AS c (label_key, label_value, agents, offline, exhausted)
         SELECT d.k, d.v, d.a, d.o, d.e
         FROM base, unnest($60::text[], $61::text[], $62::bigint[], $63::bigint[], $64::bigint[])
              AS d(k, v, a, o, e)
         ORDER BY d.k, d.v
         ON CONFLICT (label_key, label_value) DO UPDATE SET
             agents = c.agents + excluded.agents,
             offline = c.offline + excluded.offline,
             exhausted = c.exhausted + excluded.exhausted
     )
     SELECT ok.ok, COALESCE(base.base, 0) FROM ok
     LEFT JOIN base ON true LEFT JOIN notified ON true";

impl PgStore {
    /// One attempt at a batch: decided on `known` in one autocommit statement
    /// when given and the rows are still as known, else lock, decide, allocate,
    /// write, commit.
    async fn try_commit(
        &self,
        job: Job<'_>,
        known: Option<&[Agent]>,
        now: DateTime<Utc>,
    ) -> std::result::Result<(Outcomes, Option<PoolCommitted>), BatchError> {
        let commands: &[Command] = match job {
            Job::Batch(commands) => commands,
            Job::Pool(_) => &[],
        };
        let ids = batch::agent_ids(commands);
        // A connection of this attempt's own: batches in flight at once run
        // side by side, each on one (the second's statement then waits in the
        // database for the revision row, and commits right after the first).
        // An attempt dropped half way (its task cancelled) drops its
        // connection with it, so an idle one never holds a transaction.
        let idle = self.idle_batch_conns().pop();
        let mut owned = match idle {
            Some(conn) => conn,
            None => self.open_batch_conn().await?,
        };
        let conn = &mut owned;
        let origin = &*self.origin;
        let result = match (job, known) {
            (Job::Batch(_), Some(known)) => {
                match Self::batch_known(conn, commands, known, now, origin).await {
                    Ok(Some(outcomes)) => Ok((outcomes, None)),
                    // A row is not as this process knew it: read and lock them.
                    Ok(None) => {
                        tracing::debug!(size = commands.len(), "batch decided on the stored rows");
                        Self::locked_on(conn, job, &ids, now, origin).await
                    }
                    Err(e) => Err(e),
                }
            }
            _ => Self::locked_on(conn, job, &ids, now, origin).await,
        };
        match &result {
            // The connection itself failed: close it (a later batch opens another).
            Err(BatchError::Db(e)) if !matches!(e, sqlx::Error::Database(_)) => {}
            _ => self.idle_batch_conns().push(owned),
        }
        result
    }

    /// A job committed, retried (on the locked path) while the database
    /// refuses it for a reason a retry resolves.
    async fn commit_job(
        &self,
        job: Job<'_>,
        mut known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<(Outcomes, Option<PoolCommitted>)> {
        let mut attempt = 1;
        loop {
            match self.try_commit(job, known.as_deref(), now).await {
                Ok(done) => return Ok(done),
                Err(BatchError::Db(e)) if retryable(&e) && attempt < BATCH_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "batch conflicted, retrying");
                    // A conflict means another writer: read the rows this time.
                    known = None;
                    attempt += 1;
                }
                Err(BatchError::Db(e)) => return Err(db_error(e)),
                Err(BatchError::Mapped(e)) => return Err(e),
            }
        }
    }

    fn idle_batch_conns(&self) -> std::sync::MutexGuard<'_, Vec<sqlx::PgConnection>> {
        self.batch_conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection for the committer, outside the pool.
    async fn open_batch_conn(&self) -> std::result::Result<sqlx::PgConnection, BatchError> {
        let options = self.pool.connect_options();
        let timeout = self.pool.options().get_acquire_timeout();
        let mut connected = tokio::time::timeout(timeout, options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        // The batch statements only look rows up by key. Plan them once
        // per connection, not at every execution (planning cost more
        // than executing), and never with a sequential scan: a plan
        // made while the tables were small (a new database) would
        // otherwise scan every agent of every batch from then on.
        for set in [
            "SET plan_cache_mode = force_generic_plan",
            "SET enable_seqscan = off",
        ] {
            sqlx::query(set).execute(&mut connected).await?;
        }
        Ok(connected)
    }

    /// The batch decided on `known` (every agent it names), written in one
    /// autocommit statement (one round trip) if every row is still as known.
    /// `known` also holds the claimable agents its claims were offered from
    /// memory (checked like the rest). `None`: nothing was written, because a
    /// row differs, because the plan writes nothing (its refusals are then
    /// confirmed on the locked rows), or because a claim found no agent among
    /// those offered (the stored rows decide).
    async fn batch_known(
        conn: &mut sqlx::PgConnection,
        commands: &[Command],
        known: &[Agent],
        now: DateTime<Utc>,
        origin: &str,
    ) -> std::result::Result<Option<Outcomes>, BatchError> {
        // A batch touching a quota pool is decided on the locked rows: its
        // pools' states and members are read with them.
        // (Claims' candidates do not count: a claim takes an IDLE agent,
        // and no pool parks an IDLE one without parking it.)
        // (`agent_ids` is sorted: a lookup per known row, not a scan.)
        let named = batch::agent_ids(commands);
        let pooled = known.iter().any(|a| {
            named.binary_search(&a.agent_id.as_str()).is_ok()
                && (!a.quota_pools.is_empty() || !a.pool_holds.pools.is_empty())
        }) || commands.iter().any(|c| match c {
            Command::ReportExhausted { quota_pool, .. } => quota_pool.is_some(),
            Command::Register { quota_pools, .. } => !quota_pools.is_empty(),
            _ => false,
        });
        if pooled {
            return Ok(None);
        }
        let plan = batch::plan(known.to_vec(), commands, now);
        if plan.created_ids().next().is_some() || plan.claim_unserved() {
            return Ok(None);
        }
        let (relative, shift) = plan.relative_writes();
        if relative.changed.is_empty() && relative.deleted.is_empty() {
            return Ok(None);
        }
        let count = plan.transition_count() as i64;
        let (ok, base) = write_batch(conn, count, &relative, &shift, known, origin).await?;
        if !ok {
            return Ok(None);
        }
        Ok(Some(plan.finish(base).1))
    }

    /// A batch (or a pool command) decided on locked rows: agent rows first,
    /// in agent-id order, then for claims the claimable rows no one else
    /// holds, then the quota pools its agents are in (in name order) and
    /// the members of a pool it may park (in agent-id order; two batches
    /// locking members of one pool in another order deadlock, and are
    /// retried). A pool command locks its pool and, for a park, its members.
    async fn locked_on(
        conn: &mut sqlx::PgConnection,
        job: Job<'_>,
        ids: &[&str],
        now: DateTime<Utc>,
        origin: &str,
    ) -> std::result::Result<(Outcomes, Option<PoolCommitted>), BatchError> {
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
        let rows: Vec<Agent> = decoded(rows)?;
        let (plan, pool_before, parked) = match job {
            Job::Batch(commands) => {
                // Then, for claims, the claimable rows no one else holds (SKIP
                // LOCKED never waits, so no order among them is needed) and the
                // claims made before under the batch's idempotency keys.
                let rows_for_claims = claims::claim_rows(
                    &mut PgClaimReads(&mut tx),
                    commands,
                    Dialect::Postgres,
                    claims::Candidates::Selected,
                )
                .await
                .map_err(BatchError::Mapped)?;
                let pool_rows = pools::pool_rows(&mut PgPoolReads(&mut tx), commands, &rows)
                    .await
                    .map_err(BatchError::Mapped)?;
                let plan = batch::plan_full(rows, rows_for_claims, pool_rows, commands, now);
                (plan, None, None)
            }
            Job::Pool(command) => {
                let pool_rows = pools::pool_command_rows(&mut PgPoolReads(&mut tx), command)
                    .await
                    .map_err(BatchError::Mapped)?;
                let before = pool_rows.states.get(command.pool()).cloned();
                let (plan, parked) = batch::plan_pool(pool_rows, command, now)
                    .map_err(|r| BatchError::Mapped(r.into()))?;
                (plan, Some(before), parked)
            }
        };

        // New agents' rows next, still before the revision row. Two replicas
        // creating the same agent: the second insert waits for the first and then
        // fails with a unique violation, and the batch is run again.
        let created: Vec<&str> = plan.created_ids().collect();
        if !created.is_empty() {
            sqlx::query(
                "INSERT INTO agents (agent_id, status, registered_at, last_heartbeat_at,
                                     last_transition_at, revision)
                 SELECT id, $3, $2, $2, $2, 0 FROM unnest($1::text[]) AS id",
            )
            .bind(&created)
            .bind(now)
            // A new agent's status is the domain's (the write below sets the
            // planned state; the row only has to exist and be valid first).
            .bind(crate::domain::agent::registered(now).0.status.as_str())
            .execute(&mut *tx)
            .await?;
        }

        // The revision row last, held to commit: that is what makes revisions
        // commit in order and without gaps, across replicas too. One statement
        // takes it, announces the batch (NOTIFY is delivered at commit), appends
        // the transitions and writes the agents, shifting the batch's relative
        // revisions by the base it allocated. The rows are locked and read
        // already: nothing to check.
        let count = plan.transition_count() as i64;
        let (relative, shift) = plan.relative_writes();
        write_pools(&mut tx, &relative.pools, now).await?;
        let base = if relative.changed.is_empty() && relative.deleted.is_empty() {
            0
        } else {
            write_batch(&mut tx, count, &relative, &shift, &[], origin)
                .await?
                .1
        };
        let (writes, outcomes) = plan.finish(base);
        if writes.changed.is_empty() && writes.deleted.is_empty() && writes.pools.is_empty() {
            // Nothing to write (every command refused or a no-op): release the locks.
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        let committed = pool_before.map(|before| {
            pools::committed(job.pool().expect("a pool job"), before, parked, writes)
        });
        // This process's watchers learn of the batch from the committer, which
        // hands its transitions to the fan-out (the NOTIFY is for other replicas).
        Ok((outcomes, committed))
    }
}

/// What a locked attempt decides: a batch of agent commands, or one pool command.
#[derive(Clone, Copy)]
enum Job<'a> {
    Batch(&'a [Command]),
    Pool(&'a batch::PoolCommand),
}

impl Job<'_> {
    fn pool(&self) -> Option<&PoolName> {
        match self {
            Job::Batch(_) => None,
            Job::Pool(command) => Some(command.pool()),
        }
    }
}

/// Writes the pools a batch changed (their rows are locked, or new).
async fn write_pools(
    conn: &mut sqlx::PgConnection,
    changed: &[(PoolName, crate::domain::quota::PoolState)],
    now: DateTime<Utc>,
) -> std::result::Result<(), BatchError> {
    if changed.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
    let states: Vec<String> = changed.iter().map(|(_, s)| pools::pool_json(s)).collect();
    sqlx::query(
        "INSERT INTO quota_pools (name, state, updated_at)
         SELECT n, s::jsonb, $3 FROM unnest($1::text[], $2::text[]) AS p(n, s)
         ON CONFLICT (name) DO UPDATE SET state = excluded.state,
                                          updated_at = excluded.updated_at",
    )
    .bind(&names)
    .bind(&states)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// The pool reads of a batch, on its transaction.
struct PgPoolReads<'t, 'c>(&'t mut Transaction<'c, Postgres>);

#[async_trait]
impl PoolReads for PgPoolReads<'_, '_> {
    async fn pool_states(
        &mut self,
        names: &[&str],
        create: &[&str],
    ) -> Result<Vec<(String, String)>> {
        if !create.is_empty() {
            // A pool about to be parked gets its row first, so that two
            // batches parking it at once queue on the row's lock below.
            sqlx::query(
                "INSERT INTO quota_pools (name, state, updated_at)
                 SELECT n, '{\"windows\":{}}', now() FROM unnest($1::text[]) AS n
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(create)
            .execute(&mut **self.0)
            .await
            .map_err(db_error)?;
        }
        sqlx::query_as(
            "SELECT name, state::text FROM quota_pools WHERE name = ANY($1)
             ORDER BY name FOR UPDATE",
        )
        .bind(names)
        .fetch_all(&mut **self.0)
        .await
        .map_err(db_error)
    }

    async fn members(&mut self, pool: &str, except: &[&str]) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE (quota_pools @> jsonb_build_array($1::text) OR (pool_holds -> 'pools') ? $1)
               AND agent_id <> ALL($2)
             ORDER BY agent_id FOR UPDATE"
        ))
        .bind(pool)
        .bind(except)
        .fetch_all(&mut **self.0)
        .await
        .map_err(db_error)?;
        decoded(rows)
    }
}

/// Runs [`WRITE_BATCH`]: whether the `expected` rows were as expected (and so
/// the batch written), and the base its revisions were shifted by.
async fn write_batch(
    conn: &mut sqlx::PgConnection,
    count: i64,
    relative: &batch::Writes,
    shift: &batch::Shifts,
    expected: &[Agent],
    origin: &str,
) -> std::result::Result<(bool, i64), BatchError> {
    let claims = &relative.claims;
    let census = &relative.census;
    let c = AgentColumns::of(&relative.changed)?;
    let e = AgentColumns::of(expected)?;
    let t = &relative.transitions;
    let written = sqlx::query_as(WRITE_BATCH)
        .bind(count)
        .bind(TRANSITIONS_CHANNEL)
        .bind(&c.agent_id)
        .bind(&c.status)
        .bind(&c.labels)
        .bind(&c.last_heartbeat_at)
        .bind(&c.last_transition_at)
        .bind(&c.revision)
        .bind(&shift.revision)
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
        .bind(origin)
        .bind(&e.agent_id)
        .bind(&e.status)
        .bind(&e.labels)
        .bind(&e.last_transition_at)
        .bind(&e.revision)
        .bind(&e.exhaustion_reason)
        .bind(&e.recovery_at)
        .bind(&e.recovery_source)
        .bind(&e.recovery_hint)
        .bind(&e.cordon_reason)
        .bind(&c.cordon_reason)
        .bind(&c.claim_id)
        .bind(&c.claim_holder)
        .bind(&c.claim_token)
        .bind(&shift.claim)
        .bind(&c.claim_request_id)
        .bind(&c.claimed_at)
        .bind(&c.lease_expires_at)
        .bind(&e.claim_id)
        .bind(&e.claim_token)
        .bind(&e.lease_expires_at)
        .bind(
            claims
                .iter()
                .map(|c| c.claim_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            claims
                .iter()
                .map(|c| c.agent_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(claims.iter().map(|c| c.holder.as_str()).collect::<Vec<_>>())
        .bind(
            claims
                .iter()
                .map(|c| c.request_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(claims.iter().map(|c| c.fencing_token).collect::<Vec<_>>())
        .bind(
            claims
                .iter()
                .map(|c| c.slot_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(claims.iter().map(|c| c.claimed_at).collect::<Vec<_>>())
        .bind(
            claims
                .iter()
                .map(|c| c.lease_expires_at)
                .collect::<Vec<_>>(),
        )
        .bind(&relative.deleted)
        .bind(&c.quota_pools)
        .bind(&e.quota_pools)
        .bind(&c.pool_holds)
        .bind(&c.pool_held)
        .bind(&e.pool_holds)
        .bind(
            t.iter()
                .map(|t| t.quota_pool.as_ref().map(PoolName::as_str))
                .collect::<Vec<_>>(),
        )
        .bind(census.iter().map(|c| c.key.as_str()).collect::<Vec<_>>())
        .bind(census.iter().map(|c| c.value.as_str()).collect::<Vec<_>>())
        .bind(census.iter().map(|c| c.agents).collect::<Vec<_>>())
        .bind(census.iter().map(|c| c.offline).collect::<Vec<_>>())
        .bind(census.iter().map(|c| c.exhausted).collect::<Vec<_>>())
        .fetch_one(conn)
        .await?;
    Ok(written)
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

/// The claim reads of a batch, on its transaction.
struct PgClaimReads<'t, 'c>(&'t mut Transaction<'c, Postgres>);

#[async_trait]
impl ClaimReads for PgClaimReads<'_, '_> {
    async fn claimable(&mut self, selector: &SelectorSql, limit: i64) -> Result<Vec<Agent>> {
        let sql = claims::claimable_sql(AGENT_COLUMNS, selector, Dialect::Postgres);
        let mut query = sqlx::query_as::<_, AgentRow>(&sql);
        for bind in &selector.binds {
            query = query.bind(bind);
        }
        let rows = query
            .bind(limit)
            .fetch_all(&mut **self.0)
            .await
            .map_err(db_error)?;
        decoded(rows)
    }

    async fn claims_made(
        &mut self,
        keys: &[IdempotencyKey],
    ) -> Result<Vec<(Claim, Option<Agent>)>> {
        let holders: Vec<&str> = keys.iter().map(|k| k.holder.as_str()).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.request_id.as_str()).collect();
        let rows: Vec<ClaimRow> = sqlx::query_as(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claims
             WHERE (holder, request_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
               AND request_id <> ''"
        ))
        .bind(&holders)
        .bind(&ids)
        .fetch_all(&mut **self.0)
        .await
        .map_err(db_error)?;
        let made: Vec<Claim> = decoded(rows)?;
        let agent_ids: Vec<&str> = made.iter().map(|c| c.agent_id.as_str()).collect();
        let agents: Vec<Agent> = decoded(
            sqlx::query_as::<_, AgentRow>(&format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ANY($1)"
            ))
            .bind(&agent_ids)
            .fetch_all(&mut **self.0)
            .await
            .map_err(db_error)?,
        )?;
        Ok(flows::with_agents(made, agents))
    }
}

/// One transaction on Postgres.
struct PgAgentTx(Transaction<'static, Postgres>);

#[async_trait]
impl AgentTx for PgAgentTx {
    async fn head(&mut self) -> Result<i64> {
        sqlx::query_scalar("SELECT head_revision FROM revision_head")
            .fetch_one(&mut *self.0)
            .await
            .map_err(db_error)
    }

    async fn status_counts(&mut self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as("SELECT status, count(*) FROM agents GROUP BY status")
            .fetch_all(&mut *self.0)
            .await
            .map_err(db_error)
    }

    async fn agents(&mut self, agent_ids: &[&str], statuses: &[&str]) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE (cardinality($1::text[]) = 0 OR agent_id = ANY($1))
               AND (cardinality($2::text[]) = 0 OR status = ANY($2))
             ORDER BY agent_id"
        ))
        .bind(agent_ids)
        .bind(statuses)
        .fetch_all(&mut *self.0)
        .await
        .map_err(db_error)?;
        decoded(rows)
    }

    async fn write_heartbeats(&mut self, beats: &[(&str, DateTime<Utc>)]) -> Result<()> {
        let ids: Vec<&str> = beats.iter().map(|(id, _)| *id).collect();
        let times: Vec<DateTime<Utc>> = beats.iter().map(|(_, at)| *at).collect();
        // Lock in agent-id order first, as every batch does: an UPDATE ... FROM
        // unnest locks in whatever order its join runs.
        sqlx::query("SELECT 1 FROM agents WHERE agent_id = ANY($1) ORDER BY agent_id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *self.0)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "UPDATE agents SET last_heartbeat_at = GREATEST(agents.last_heartbeat_at, u.at)
             FROM unnest($1::text[], $2::timestamptz[]) AS u(agent_id, at)
             WHERE agents.agent_id = u.agent_id",
        )
        .bind(&ids)
        .bind(&times)
        .execute(&mut *self.0)
        .await
        .map(|_| ())
        .map_err(db_error)
    }

    async fn lock_pruned_through(&mut self) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT pruned_through FROM revision_retention WHERE singleton FOR UPDATE",
        )
        .fetch_one(&mut *self.0)
        .await
        .map_err(db_error)
    }

    async fn newest_before(&mut self, before: DateTime<Utc>) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT max(revision) FROM transitions WHERE occurred_at < $1")
            .bind(before)
            .fetch_one(&mut *self.0)
            .await
            .map_err(db_error)
    }

    async fn prune_through(&mut self, through: i64) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM transitions WHERE revision <= $1")
            .bind(through)
            .execute(&mut *self.0)
            .await
            .map_err(db_error)?;
        sqlx::query("UPDATE revision_retention SET pruned_through = $1 WHERE singleton")
            .bind(through)
            .execute(&mut *self.0)
            .await
            .map_err(db_error)?;
        Ok(deleted.rows_affected())
    }

    async fn prune_claims(&mut self, before: DateTime<Utc>) -> Result<u64> {
        sqlx::query(
            "DELETE FROM claims c WHERE c.claimed_at < $1
               AND NOT EXISTS (SELECT 1 FROM agents a WHERE a.claim_id = c.claim_id)",
        )
        .bind(before)
        .execute(&mut *self.0)
        .await
        .map(|done| done.rows_affected())
        .map_err(db_error)
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.0.commit().await.map_err(db_error)
    }
}

#[async_trait]
impl AgentTxs for PgStore {
    /// Locks what it reads (the retention row, agent rows in agent-id order).
    async fn begin_write(&self) -> Result<Box<dyn AgentTx + '_>> {
        let tx = self.pool.begin().await.map_err(db_error)?;
        Ok(Box::new(PgAgentTx(tx)))
    }

    async fn begin_snapshot(&self) -> Result<Box<dyn AgentTx + '_>> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        Ok(Box::new(PgAgentTx(tx)))
    }

    /// The database answers and takes writes: a standby still in recovery
    /// (a failover proxy that sent us to it too early) or a server set
    /// read-only answers reads and refuses every write, so it is down for us.
    async fn probe(&self) -> Result<()> {
        let read_only: String =
            sqlx::query_scalar("SELECT current_setting('transaction_read_only')")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
        if read_only == "on" {
            return Err(Error::Unavailable(READ_ONLY.into()));
        }
        Ok(())
    }

    async fn write_batch(
        &self,
        commands: &[Command],
        known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<Outcomes> {
        Ok(self.commit_job(Job::Batch(commands), known, now).await?.0)
    }

    async fn write_pool(
        &self,
        command: &batch::PoolCommand,
        now: DateTime<Utc>,
    ) -> Result<PoolCommitted> {
        self.commit_job(Job::Pool(command), None, now)
            .await?
            .1
            .ok_or_else(|| Error::Internal("pool command answered nothing".into()))
    }

    async fn pool_rows_all(&self) -> Result<Vec<(String, String)>> {
        sqlx::query_as("SELECT name, state::text FROM quota_pools ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)
    }

    async fn pool_counts(&self) -> Result<Vec<(String, String, i64, i64)>> {
        sqlx::query_as(
            "SELECT p.name, a.status, count(*),
                    count(*) FILTER (WHERE (a.pool_holds -> 'pools') ? p.name
                                       AND a.pool_holds -> 'pools' -> p.name
                                           -> 'released_at' IS NULL)
             FROM agents a, jsonb_array_elements_text(a.quota_pools) AS p(name)
             GROUP BY p.name, a.status ORDER BY p.name, a.status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)
    }

    async fn pool_agents_of(&self, pool: &str) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE quota_pools @> jsonb_build_array($1::text) OR (pool_holds -> 'pools') ? $1
             ORDER BY agent_id"
        ))
        .bind(pool)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        decoded(rows)
    }

    async fn agent(&self, agent_id: &str) -> Result<Option<Agent>> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1"
        ))
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(Agent::try_from).transpose()
    }

    async fn agents_page(
        &self,
        query: &AgentQuery,
        statuses: &[&str],
        limit: i64,
    ) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents
             WHERE ($1::text IS NULL OR agent_id > $1)
               AND (cardinality($2::text[]) = 0 OR status = ANY($2))
               AND labels @> $3
             ORDER BY agent_id
             LIMIT $4"
        ))
        .bind(query.after_agent_id.as_deref())
        .bind(statuses)
        .bind(Json(&query.labels))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        decoded(rows)
    }

    async fn sweep(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>> {
        // Indexed comparisons only; the domain chose the statuses and the bounds.
        sqlx::query_scalar(
            "(SELECT agent_id FROM agents
               WHERE status = ANY($1) AND last_heartbeat_at < $2
               ORDER BY last_heartbeat_at LIMIT $5)
             UNION
             (SELECT agent_id FROM agents
               WHERE status = ANY($3) AND recovery_at <= $4 AND NOT pool_held
               ORDER BY recovery_at LIMIT $5)
             UNION
             (SELECT agent_id FROM agents
               WHERE lease_expires_at <= $6
               ORDER BY lease_expires_at LIMIT $5)
             UNION
             (SELECT agent_id FROM agents
               WHERE status = 'OFFLINE' AND last_transition_at < $7
               ORDER BY last_transition_at LIMIT $5)",
        )
        .bind(flows::names(&query.silent_statuses))
        .bind(query.silent_before)
        .bind(flows::names(&query.recovering_statuses))
        .bind(query.recovered_by)
        .bind(limit)
        .bind(query.leases_expired_by)
        .bind(query.offline_before)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)
    }

    async fn claim(&self, claim_id: &str) -> Result<Option<Claim>> {
        let row: Option<ClaimRow> = sqlx::query_as(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claims WHERE claim_id = $1"
        ))
        .bind(claim_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
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
               AND ($1::text IS NULL OR agent_id > $1)
               AND ($2::text IS NULL OR claim_holder = $2)
             ORDER BY agent_id
             LIMIT $3"
        ))
        .bind(after)
        .bind(holder)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        decoded(rows)
    }

    async fn matching(&self, selector: &SelectorSql) -> Result<Vec<MatchingRow>> {
        let sql = claims::matching_sql(selector);
        let mut query = sqlx::query_as(&sql);
        for bind in &selector.binds {
            query = query.bind(bind);
        }
        query.fetch_all(&self.pool).await.map_err(db_error)
    }

    async fn transitions(
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
        decoded(rows)
    }

    async fn bounds(&self) -> Result<(i64, i64)> {
        sqlx::query_as(
            "SELECT r.pruned_through, h.head_revision FROM revision_retention r, revision_head h",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)
    }

    fn change_feed(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn pools(&self) -> Vec<PoolStats> {
        vec![self.pool.stats("postgres")]
    }

    fn observe(&self, metrics: &dyn Fn(&'static str) -> AcquireMetrics) {
        self.pool.observe(metrics("postgres"));
    }

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
}
