//! The agent store's flows, written once for every SQL backend.
//!
//! The reads and the maintenance that are a sequence (open a transaction,
//! read, let the domain decide, write, commit) run here over an [`AgentTx`],
//! one open transaction of a backend, which only runs that backend's SQL
//! (`sqlite/agents.rs`, `postgres/agents.rs`). The rows both backends read,
//! and how they become domain values, live here too ([`AgentRow`],
//! [`TransitionRow`]); a backend says only how it stores a time and a JSON
//! document ([`StoredTime`], [`StoredJson`]).
//!
//! The write hot path, [`AgentTxs::write_batch`], stays each backend's
//! own: SQLite writes a batch as JSON arrays on its one writer, Postgres as
//! pipelined array statements on the committer's own connections, retried on
//! serialization failures. Both decide it with `domain::batch`; what is shared
//! (the lock order, the store's precision of what is answered) sends the same
//! statements. `BENCH_SECTIONS=ratios cargo bench --bench agent_status`
//! (Postgres), before / after this module, alternating on one machine:
//! transitions / 1-row autocommit UPDATEs at 64 in flight 1.47, 1.27, 1.55,
//! 1.55 / 1.54, 1.53, 1.56, 1.43; at 1 in flight on the store alone against
//! the previous design's transaction 2.35, 2.48, 2.35, 2.35 / 2.23, 2.23,
//! 2.32 (one run lost to a loaded machine): within the noise.
//!
//! What a backend's transactions guarantee (the flows rely on it):
//! - [`AgentTxs::begin_write`] serialises what must be: SQLite's one writer
//!   (`BEGIN IMMEDIATE`) serialises every write; Postgres locks what it reads
//!   (the retention row `FOR UPDATE`, agent rows in agent-id order);
//! - [`AgentTxs::begin_snapshot`] reads one snapshot: the head revision and
//!   the agents of one commit (SQLite: a WAL read transaction; Postgres:
//!   `REPEATABLE READ READ ONLY`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::FromRow;
use tokio::sync::watch;

use crate::domain::agent::{AgentState, AgentStatus, Cause, Exhaustion, SlotType};
use crate::domain::batch::PoolCommand;
use crate::domain::batch::{Applied, Command, Refusal};
use crate::domain::dispatch::{LabelSelector, NoAgentAvailable};
use crate::domain::labels::Labels;
use crate::domain::liveness::{self, SweepQuery};
use crate::domain::quota::PoolName;
use crate::domain::quota::PoolState;
use crate::domain::recovery::RecoveryEstimate;
use crate::domain::transition::{self, Agent, Claim, RevisionBounds, Transition, WatchFilter};
use crate::error::{Error, Result};
use crate::storage::PoolMembers;
use crate::storage::claims::{self, Dialect, MatchingRow, SelectorSql};
use crate::storage::clock::at_micros;
use crate::storage::decode::{self, StoredJson, StoredTime};
use crate::storage::pool::{AcquireMetrics, PoolStats};
use crate::storage::quota::{self, PoolCommitted, StoredHolds, pool_name};
use crate::storage::{AgentQuery, AgentStore, ClaimQuery, StatusCounts};

/// The columns of [`AgentRow`], in its order.
pub(crate) const AGENT_COLUMNS: &str = "agent_id, status, labels, registered_at, \
     last_heartbeat_at, last_transition_at, revision, exhaustion_reason, recovery_at, \
     recovery_source, recovery_hint, cordon_reason, claim_id, claim_holder, claim_token, \
     claim_request_id, claimed_at, lease_expires_at, quota_pools, pool_holds";

/// The columns of [`ClaimRow`], in its order.
pub(crate) const CLAIM_COLUMNS: &str = "claim_id, agent_id, holder, request_id, \
     fencing_token, slot_type, claimed_at, lease_expires_at";

/// The columns of [`TransitionRow`], in its order.
pub(crate) const TRANSITION_COLUMNS: &str = "revision, agent_id, from_status, to_status, \
     cause, occurred_at, exhaustion_reason, recovery_at, actor, quota_pool";

/// One row of `agents`, `T` and `J` the backend's time and JSON.
#[derive(FromRow)]
pub(crate) struct AgentRow<T, J, P, H> {
    agent_id: String,
    status: String,
    labels: J,
    registered_at: T,
    last_heartbeat_at: T,
    last_transition_at: T,
    revision: i64,
    exhaustion_reason: Option<String>,
    recovery_at: Option<T>,
    recovery_source: Option<String>,
    recovery_hint: Option<String>,
    cordon_reason: Option<String>,
    claim_id: Option<String>,
    claim_holder: Option<String>,
    claim_token: Option<i64>,
    claim_request_id: Option<String>,
    claimed_at: Option<T>,
    lease_expires_at: Option<T>,
    quota_pools: P,
    pool_holds: H,
}

/// One row of `claims` (every claim made), `T` the backend's time.
#[derive(FromRow)]
pub(crate) struct ClaimRow<T> {
    claim_id: String,
    agent_id: String,
    holder: String,
    request_id: String,
    fencing_token: i64,
    slot_type: String,
    claimed_at: T,
    lease_expires_at: T,
}

impl<T: StoredTime> TryFrom<ClaimRow<T>> for Claim {
    type Error = Error;

    fn try_from(row: ClaimRow<T>) -> Result<Claim> {
        Ok(Claim {
            slot_type: decode::slot_type(&row.slot_type)?,
            claim_id: row.claim_id,
            agent_id: row.agent_id,
            holder: row.holder,
            request_id: row.request_id,
            fencing_token: row.fencing_token,
            claimed_at: row.claimed_at.time(),
            lease_expires_at: row.lease_expires_at.time(),
        })
    }
}

/// One row of `transitions`, `T` the backend's time.
#[derive(FromRow)]
pub(crate) struct TransitionRow<T> {
    revision: i64,
    agent_id: String,
    from_status: Option<String>,
    to_status: String,
    cause: String,
    occurred_at: T,
    exhaustion_reason: Option<String>,
    recovery_at: Option<T>,
    actor: String,
    quota_pool: Option<String>,
}

impl<T, J, P, H> TryFrom<AgentRow<T, J, P, H>> for Agent
where
    T: StoredTime,
    J: StoredJson<Labels>,
    P: StoredJson<Vec<PoolName>>,
    H: StoredJson<StoredHolds>,
{
    type Error = Error;

    fn try_from(row: AgentRow<T, J, P, H>) -> Result<Agent> {
        let exhaustion = match (row.exhaustion_reason, row.recovery_at) {
            (Some(reason), Some(recovery_at)) => Some(Exhaustion {
                reason: decode::exhaustion_reason(&reason)?,
                recovery: RecoveryEstimate {
                    recovery_at: recovery_at.time(),
                    source: decode::recovery_source(row.recovery_source.as_deref())?,
                    hint: row.recovery_hint.unwrap_or_default(),
                },
            }),
            _ => None,
        };
        let status = decode::status(&row.status)?;
        let claim = match (
            row.claim_id,
            row.claim_token,
            row.claimed_at,
            row.lease_expires_at,
        ) {
            (Some(claim_id), Some(fencing_token), Some(claimed_at), Some(lease_expires_at)) => {
                Some(Claim {
                    claim_id,
                    agent_id: row.agent_id.clone(),
                    fencing_token,
                    // A claim lives as long as its slot: the status says which.
                    slot_type: match status {
                        AgentStatus::OnCall => SlotType::OnCall,
                        _ => SlotType::Work,
                    },
                    holder: row.claim_holder.unwrap_or_default(),
                    request_id: row.claim_request_id.unwrap_or_default(),
                    claimed_at: claimed_at.time(),
                    lease_expires_at: lease_expires_at.time(),
                })
            }
            _ => None,
        };
        Ok(Agent {
            state: AgentState {
                status,
                last_heartbeat_at: row.last_heartbeat_at.time(),
                exhaustion,
            },
            agent_id: row.agent_id,
            labels: row.labels.value("labels")?,
            registered_at: row.registered_at.time(),
            last_transition_at: row.last_transition_at.time(),
            revision: row.revision,
            cordon_reason: row.cordon_reason,
            claim,
            quota_pools: row.quota_pools.value("quota_pools")?,
            pool_holds: row.pool_holds.value("pool_holds")?.holds()?,
        })
    }
}

impl<T: StoredTime> TryFrom<TransitionRow<T>> for Transition {
    type Error = Error;

    fn try_from(row: TransitionRow<T>) -> Result<Transition> {
        Ok(Transition {
            revision: row.revision,
            agent_id: row.agent_id,
            from: row.from_status.as_deref().map(decode::status).transpose()?,
            to: decode::status(&row.to_status)?,
            cause: Cause::parse(&row.cause).ok_or_else(|| decode::corrupt("cause", &row.cause))?,
            occurred_at: row.occurred_at.time(),
            exhaustion_reason: row
                .exhaustion_reason
                .as_deref()
                .map(decode::exhaustion_reason)
                .transpose()?,
            recovery_at: row.recovery_at.map(StoredTime::time),
            actor: row.actor,
            quota_pool: row.quota_pool.map(pool_name).transpose()?,
        })
    }
}

/// Rows read, as domain values.
pub(crate) fn decoded<R, V: TryFrom<R, Error = Error>>(rows: Vec<R>) -> Result<Vec<V>> {
    rows.into_iter().map(V::try_from).collect()
}

/// Claims made before, each with its agent among `agents` (`None`: gone).
pub(crate) fn with_agents(made: Vec<Claim>, agents: Vec<Agent>) -> Vec<(Claim, Option<Agent>)> {
    made.into_iter()
        .map(|claim| {
            let agent = agents
                .iter()
                .find(|a| a.agent_id == claim.agent_id)
                .cloned();
            (claim, agent)
        })
        .collect()
}

/// Statuses as stored.
pub(crate) fn names<'a>(statuses: impl IntoIterator<Item = &'a AgentStatus>) -> Vec<&'static str> {
    statuses.into_iter().map(|s| s.as_str()).collect()
}

/// Every batch's outcomes, as [`AgentStore::commit_batch`] returns them.
pub(crate) type Outcomes = Vec<std::result::Result<Applied, Refusal>>;

/// One open transaction of a backend: its SQL only. Dropped without
/// [`AgentTx::commit`], it rolls back.
#[async_trait]
pub(crate) trait AgentTx: Send {
    /// The head revision.
    async fn head(&mut self) -> Result<i64>;

    /// Agents per stored status.
    async fn status_counts(&mut self) -> Result<Vec<(String, i64)>>;

    /// The agents with one of `agent_ids` and one of `statuses` (empty: any),
    /// by agent id.
    async fn agents(&mut self, agent_ids: &[&str], statuses: &[&str]) -> Result<Vec<Agent>>;

    /// Moves each agent's `last_heartbeat_at` forward to its beat (one per
    /// agent, in agent-id order); unknown agents are ignored.
    async fn write_heartbeats(&mut self, beats: &[(&str, DateTime<Utc>)]) -> Result<()>;

    /// Through which revision the history was pruned, locked until commit.
    async fn lock_pruned_through(&mut self) -> Result<i64>;

    /// The newest revision that occurred before `before`.
    async fn newest_before(&mut self, before: DateTime<Utc>) -> Result<Option<i64>>;

    /// Deletes the transitions through `through` (how many), and records
    /// the history as pruned through it.
    async fn prune_through(&mut self, through: i64) -> Result<u64>;

    /// Deletes the records of claims made before `before` that are no
    /// agent's active claim (how many).
    async fn prune_claims(&mut self, before: DateTime<Utc>) -> Result<u64>;

    async fn commit(self: Box<Self>) -> Result<()>;
}

/// A backend's side of [`AgentStore`]: its transactions, its one-statement
/// reads on the last committed state, and its own batch writer
/// ([`AgentTxs::write_batch`]).
#[async_trait]
pub(crate) trait AgentTxs: Send + Sync + 'static {
    /// A write transaction (see the module documentation).
    async fn begin_write(&self) -> Result<Box<dyn AgentTx + '_>>;

    /// A read-only transaction on one snapshot.
    async fn begin_snapshot(&self) -> Result<Box<dyn AgentTx + '_>>;

    /// [`AgentStore::ping`].
    async fn probe(&self) -> Result<()>;

    /// [`AgentStore::commit_batch_known`] (`known` may be ignored), `now` at
    /// the stores' precision.
    async fn write_batch(
        &self,
        commands: &[Command],
        known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<Outcomes>;

    /// [`AgentStore::commit_pool`], `now` at the stores' precision.
    async fn write_pool(&self, command: &PoolCommand, now: DateTime<Utc>) -> Result<PoolCommitted>;

    /// [`AgentStore::quota_pool_states`].
    async fn pool_rows_all(&self) -> Result<Vec<(String, String)>>;

    /// [`AgentStore::quota_pool_members`]: `(pool, status, members, held)`.
    async fn pool_counts(&self) -> Result<Vec<(String, String, i64, i64)>>;

    /// [`AgentStore::pool_agents`].
    async fn pool_agents_of(&self, pool: &str) -> Result<Vec<Agent>>;

    async fn agent(&self, agent_id: &str) -> Result<Option<Agent>>;

    /// The page `query` selects, its statuses as `statuses` and at most
    /// `limit` (not negative) agents.
    async fn agents_page(
        &self,
        query: &AgentQuery,
        statuses: &[&str],
        limit: i64,
    ) -> Result<Vec<Agent>>;

    /// [`AgentStore::sweep_candidates`], `limit` not negative.
    async fn sweep(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>>;

    /// The claim recorded as `claim_id`.
    async fn claim(&self, claim_id: &str) -> Result<Option<Claim>>;

    /// Agents with an active claim (of `holder`, if given), by agent id,
    /// after `after`, at most `limit` (not negative).
    async fn claimed_page(
        &self,
        after: Option<&str>,
        holder: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Agent>>;

    /// The agents `selector` matches, counted by status and cordon
    /// ([`claims::MatchingRow`]), the selector's parameters numbered from 1.
    async fn matching(&self, selector: &SelectorSql) -> Result<Vec<MatchingRow>>;

    /// [`AgentStore::transitions_after`], `limit` not negative.
    async fn transitions(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>>;

    /// Pruned through, head.
    async fn bounds(&self) -> Result<(i64, i64)>;

    /// [`AgentStore::changes`].
    fn change_feed(&self) -> watch::Receiver<u64>;

    /// [`AgentStore::pool_stats`].
    fn pools(&self) -> Vec<PoolStats>;

    /// [`AgentStore::observe_pools`].
    fn observe(&self, metrics: &dyn Fn(&'static str) -> AcquireMetrics);

    /// How this backend spells a selector.
    fn dialect(&self) -> Dialect;
}

/// A backend that implements [`AgentTxs`] is an [`AgentStore`]: the flows below.
#[async_trait]
impl<S: AgentTxs> AgentStore for S {
    async fn ping(&self) -> Result<()> {
        self.probe().await
    }

    async fn commit_batch(&self, commands: &[Command], now: DateTime<Utc>) -> Result<Outcomes> {
        commit_batch(self, commands, None, now).await
    }

    async fn commit_batch_known(
        &self,
        commands: &[Command],
        known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<Outcomes> {
        commit_batch(self, commands, known, now).await
    }

    async fn commit_pool(
        &self,
        command: &PoolCommand,
        now: DateTime<Utc>,
    ) -> Result<PoolCommitted> {
        self.write_pool(command, at_micros(now)).await
    }

    async fn quota_pool_states(&self) -> Result<Vec<(PoolName, PoolState)>> {
        self.pool_rows_all()
            .await?
            .into_iter()
            .map(|(name, json)| Ok((pool_name(name)?, quota::pool_state(&json)?)))
            .collect()
    }

    async fn quota_pool_members(&self) -> Result<Vec<PoolMembers>> {
        self.pool_counts()
            .await?
            .into_iter()
            .map(|(pool, status, members, held)| {
                Ok(PoolMembers {
                    pool: pool_name(pool)?,
                    status: decode::status(&status)?,
                    members,
                    held,
                })
            })
            .collect()
    }

    async fn pool_agents(&self, pool: &PoolName) -> Result<Vec<Agent>> {
        self.pool_agents_of(pool.as_str()).await
    }

    async fn record_heartbeats(&self, beats: &[(String, DateTime<Utc>)]) -> Result<()> {
        record_heartbeats(self, beats).await
    }

    async fn get_agent(&self, agent_id: &str) -> Result<Agent> {
        self.agent(agent_id)
            .await?
            .ok_or_else(|| Error::agent_not_found(agent_id))
    }

    async fn list_agents(&self, query: &AgentQuery) -> Result<Vec<Agent>> {
        self.agents_page(query, &names(&query.statuses), query.limit.max(0))
            .await
    }

    async fn sweep_candidates(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>> {
        self.sweep(query, limit.max(0)).await
    }

    async fn find_claim(&self, claim_id: &str) -> Result<Option<Claim>> {
        self.claim(claim_id).await
    }

    async fn list_claims(&self, query: &ClaimQuery) -> Result<Vec<Claim>> {
        let agents = self
            .claimed_page(
                query.after_agent_id.as_deref(),
                query.holder.as_deref(),
                query.limit.max(0),
            )
            .await?;
        Ok(agents.into_iter().filter_map(|a| a.claim).collect())
    }

    async fn no_agent_available(&self, selector: &LabelSelector) -> Result<NoAgentAvailable> {
        let dialect = self.dialect();
        let rows = self
            .matching(&claims::selector_sql(selector, dialect, 1))
            .await?;
        claims::no_agent_available(rows)
    }

    async fn transitions_after(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>> {
        self.transitions(after, agent_id, limit.max(0)).await
    }

    async fn revision_bounds(&self) -> Result<RevisionBounds> {
        let (pruned_through, head) = self.bounds().await?;
        Ok(RevisionBounds {
            pruned_through,
            head,
        })
    }

    async fn snapshot(&self, filter: &WatchFilter) -> Result<(i64, Vec<Agent>)> {
        snapshot(self, filter).await
    }

    async fn prune_transitions(&self, before: DateTime<Utc>) -> Result<u64> {
        prune_transitions(self, before).await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.change_feed()
    }

    async fn count_by_status(&self) -> Result<StatusCounts> {
        count_by_status(self).await
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        self.pools()
    }

    fn observe_pools(&self, metrics: &dyn Fn(&'static str) -> AcquireMetrics) {
        self.observe(metrics)
    }
}

/// [`AgentStore::commit_batch_known`]: the backend's batch writer, at the
/// stores' precision, so that what the caller and the fan-out get is what a
/// read of the tables returns.
pub(crate) async fn commit_batch(
    store: &dyn AgentTxs,
    commands: &[Command],
    known: Option<Vec<Agent>>,
    now: DateTime<Utc>,
) -> Result<Outcomes> {
    let mut outcomes = store.write_batch(commands, known, at_micros(now)).await?;
    for o in outcomes.iter_mut().flatten() {
        for t in o
            .transition
            .iter_mut()
            .chain(o.other_transitions.iter_mut())
        {
            t.recovery_at = t.recovery_at.map(at_micros);
        }
    }
    Ok(outcomes)
}

/// [`AgentStore::record_heartbeats`].
pub(crate) async fn record_heartbeats(
    store: &dyn AgentTxs,
    beats: &[(String, DateTime<Utc>)],
) -> Result<()> {
    let latest = liveness::latest_beats(beats);
    if latest.is_empty() {
        return Ok(());
    }
    let mut tx = store.begin_write().await?;
    tx.write_heartbeats(&latest).await?;
    tx.commit().await
}

/// [`AgentStore::snapshot`].
pub(crate) async fn snapshot(
    store: &dyn AgentTxs,
    filter: &WatchFilter,
) -> Result<(i64, Vec<Agent>)> {
    // One snapshot: every transition updates the head and its agent in one
    // commit.
    let mut tx = store.begin_snapshot().await?;
    let head = tx.head().await?;
    let agent_ids: Vec<&str> = filter.agent_ids.iter().map(String::as_str).collect();
    let agents = tx.agents(&agent_ids, &names(&filter.statuses)).await?;
    tx.commit().await?;
    Ok((head, agents))
}

/// [`AgentStore::count_by_status`].
pub(crate) async fn count_by_status(store: &dyn AgentTxs) -> Result<StatusCounts> {
    // One snapshot, as in `snapshot`: the head and the counts agree.
    let mut tx = store.begin_snapshot().await?;
    let revision = tx.head().await?;
    let rows = tx.status_counts().await?;
    tx.commit().await?;
    decode::status_counts(revision, rows)
}

/// [`AgentStore::prune_transitions`].
pub(crate) async fn prune_transitions(store: &dyn AgentTxs, before: DateTime<Utc>) -> Result<u64> {
    let mut tx = store.begin_write().await?;
    // Concurrent pruners (other replicas) queue here.
    let pruned_through = tx.lock_pruned_through().await?;
    let newest_expired = tx.newest_before(before).await?;
    let Some(through) = transition::prune_through(newest_expired, pruned_through) else {
        return Ok(0);
    };
    let deleted = tx.prune_through(through).await?;
    // A claim's record goes with the history of its time (its id and its
    // idempotency key are forgotten then), unless the claim still runs.
    tx.prune_claims(before).await?;
    tx.commit().await?;
    Ok(deleted)
}
