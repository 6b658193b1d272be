//! Agents and transitions in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::domain::agent::AgentStatus;
use crate::domain::batch::{self, Applied, ClaimRows, Command, Refusal};
use crate::domain::batch::{PoolCommand, PoolRows};
use crate::domain::dispatch::{Candidate, LabelSelector, NoAgentAvailable};
use crate::domain::liveness::SweepQuery;
use crate::domain::quota::{PoolName, PoolState};
use crate::domain::transition::{Agent, Claim, RevisionBounds, Transition, WatchFilter};
use crate::error::{Error, Result};
use crate::storage::quota::PoolCommitted;
use crate::storage::{AgentQuery, AgentStore, ClaimQuery, PoolMembers};

/// A commit's start or end, as [`MemoryStore::commit_log`] records them: the
/// agents its commands name, in command order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommitEvent {
    Started(Vec<String>),
    Finished(Vec<String>),
}

#[derive(Default)]
struct State {
    agents: BTreeMap<String, Agent>,
    /// Every claim made, by claim id.
    claims: BTreeMap<String, Claim>,
    transitions: BTreeMap<i64, Transition>,
    head: i64,
    pruned_through: i64,
    pools: BTreeMap<PoolName, PoolState>,
}

impl State {
    /// What a batch reads of pools here: every pool's state (nobody else
    /// holds them), and the members of the pools it may park.
    fn pool_rows(&self, commands: &[Command], existing: &[Agent]) -> PoolRows {
        let parking = batch::parking_pools(commands, existing);
        PoolRows {
            states: self.pools.clone(),
            members: self
                .agents
                .values()
                .filter(|a| parking.iter().any(|p| is_member(a, p)))
                .cloned()
                .collect(),
        }
    }

    /// Writes a batch's decisions; the number of transitions.
    fn write(&mut self, writes: batch::Writes) -> i64 {
        let count = writes.transitions.len() as i64;
        for agent in writes.changed {
            self.agents.insert(agent.agent_id.clone(), agent);
        }
        for agent_id in writes.deleted {
            self.agents.remove(&agent_id);
        }
        for claim in writes.claims {
            self.claims.insert(claim.claim_id.clone(), claim);
        }
        for t in writes.transitions {
            self.transitions.insert(t.revision, t);
        }
        for (name, pool) in writes.pools {
            self.pools.insert(name, pool);
        }
        self.head += count;
        count
    }
}

/// Whether `agent` is a member of `pool` or held (or was, this episode) by it.
fn is_member(agent: &Agent, pool: &PoolName) -> bool {
    agent.quota_pools.contains(pool) || agent.pool_holds.pools.contains_key(pool)
}

/// The agent part of the in-memory store.
pub struct MemoryStore {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    unavailable: AtomicBool,
    /// While set, commits do not tick the change signal.
    quiet: AtomicBool,
    batches: AtomicUsize,
    reads: AtomicUsize,
    /// Agents whose commits wait (see [`MemoryStore::hold`]).
    held: watch::Sender<BTreeSet<String>>,
    /// Every commit's start and end, once [`MemoryStore::commit_log`] was called.
    log: watch::Sender<Vec<CommitEvent>>,
    logging: AtomicBool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            state: Mutex::default(),
            changes: watch::channel(0).0,
            unavailable: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            batches: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            held: watch::channel(BTreeSet::new()).0,
            log: watch::channel(Vec::new()).0,
            logging: AtomicBool::new(false),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every call fails with UNAVAILABLE, as a store whose database is down.
    pub fn set_unavailable(&self, down: bool) {
        self.unavailable.store(down, Ordering::SeqCst);
    }

    /// While set, commits do not tick [`AgentStore::changes`]: as another
    /// replica's commits before its NOTIFY arrives, or this process's own
    /// commits on a store that leaves them to the committer.
    pub fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::SeqCst);
    }

    /// How many times transitions were read (`transitions_after`).
    pub fn transition_reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// How many batches have been committed.
    pub fn batches_committed(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }

    /// Until [`MemoryStore::release`], every commit naming `agent_id` waits
    /// before it does anything (a batch held in flight).
    pub fn hold(&self, agent_id: &str) {
        self.held.send_modify(|h| {
            h.insert(agent_id.to_owned());
        });
    }

    pub fn release(&self, agent_id: &str) {
        self.held.send_modify(|h| {
            h.remove(agent_id);
        });
    }

    /// Records, from now on, when each commit starts (before it waits for a
    /// held agent) and when it finishes.
    pub fn commit_log(&self) -> watch::Receiver<Vec<CommitEvent>> {
        self.logging.store(true, Ordering::SeqCst);
        self.log.subscribe()
    }

    fn record(&self, event: CommitEvent) {
        if self.logging.load(Ordering::SeqCst) {
            self.log.send_modify(|log| log.push(event));
        }
    }

    /// A batch, decided and applied under the state's lock (so batches
    /// committing at once are applied one after the other).
    fn commit_now(
        &self,
        commands: &[Command],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Applied, Refusal>>> {
        let mut state = self.lock()?;
        let existing: Vec<Agent> = commands
            .iter()
            .filter_map(|c| c.agent_id().and_then(|id| state.agents.get_key_value(id)))
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect::<BTreeMap<_, _>>()
            .into_values()
            .collect();
        // Every claimable agent is a candidate (nobody else holds rows here),
        // and every claim made is known.
        let rows = ClaimRows {
            candidates: state
                .agents
                .values()
                .filter(|a| a.cordon_reason.is_none() && a.state.status == AgentStatus::Idle)
                .cloned()
                .collect(),
            made: state
                .claims
                .values()
                .filter(|c| !c.request_id.is_empty())
                .map(|c| (c.clone(), state.agents.get(&c.agent_id).cloned()))
                .collect(),
        };
        let pools = state.pool_rows(commands, &existing);
        let plan = batch::plan_full(existing, rows, pools, commands, now);
        let (writes, outcomes) = plan.finish(state.head);
        let count = state.write(writes);
        drop(state);
        self.batches.fetch_add(1, Ordering::SeqCst);
        if count > 0 && !self.quiet.load(Ordering::SeqCst) {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(outcomes)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("memory store is down".into()));
        }
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[async_trait]
impl AgentStore for MemoryStore {
    async fn ping(&self) -> Result<()> {
        self.lock().map(|_| ())
    }

    async fn commit_pool(
        &self,
        command: &PoolCommand,
        now: DateTime<Utc>,
    ) -> Result<PoolCommitted> {
        let now = crate::storage::clock::at_micros(now);
        let mut state = self.lock()?;
        let pool = command.pool().clone();
        let rows = PoolRows {
            states: state.pools.clone(),
            members: state
                .agents
                .values()
                .filter(|a| is_member(a, &pool))
                .cloned()
                .collect(),
        };
        let before = rows.states.get(&pool).cloned();
        let (plan, parked) = batch::plan_pool(rows, command, now)?;
        let (writes, _) = plan.finish(state.head);
        let committed = crate::storage::quota::committed(&pool, before, parked, writes.clone());
        let count = state.write(writes);
        drop(state);
        if count > 0 && !self.quiet.load(Ordering::SeqCst) {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(committed)
    }

    async fn quota_pool_states(&self) -> Result<Vec<(PoolName, PoolState)>> {
        let state = self.lock()?;
        Ok(state
            .pools
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect())
    }

    async fn quota_pool_members(&self) -> Result<Vec<PoolMembers>> {
        let state = self.lock()?;
        let mut counts: BTreeMap<(PoolName, &'static str), (AgentStatus, i64, i64)> =
            BTreeMap::new();
        for agent in state.agents.values() {
            for pool in &agent.quota_pools {
                let status = agent.state.status;
                let entry = counts
                    .entry((pool.clone(), status.as_str()))
                    .or_insert((status, 0, 0));
                entry.1 += 1;
                entry.2 += i64::from(agent.pool_holds.held_by(pool));
            }
        }
        Ok(counts
            .into_iter()
            .map(|((pool, _), (status, members, held))| PoolMembers {
                pool,
                status,
                members,
                held,
            })
            .collect())
    }

    async fn pool_agents(&self, pool: &PoolName) -> Result<Vec<Agent>> {
        let state = self.lock()?;
        Ok(state
            .agents
            .values()
            .filter(|a| is_member(a, pool))
            .cloned()
            .collect())
    }

    async fn commit_batch(
        &self,
        commands: &[Command],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Applied, Refusal>>> {
        let agents: Vec<String> = commands
            .iter()
            .filter_map(|c| c.agent_id().map(str::to_owned))
            .collect();
        self.record(CommitEvent::Started(agents.clone()));
        let _ = self
            .held
            .subscribe()
            .wait_for(|held| !agents.iter().any(|a| held.contains(a)))
            .await;
        let outcomes = self.commit_now(commands, now);
        self.record(CommitEvent::Finished(agents));
        outcomes
    }

    async fn record_heartbeats(&self, beats: &[(String, DateTime<Utc>)]) -> Result<()> {
        let mut state = self.lock()?;
        for (id, at) in beats {
            if let Some(agent) = state.agents.get_mut(id) {
                agent.state.last_heartbeat_at = agent.state.last_heartbeat_at.max(*at);
            }
        }
        Ok(())
    }

    async fn find_claim(&self, claim_id: &str) -> Result<Option<Claim>> {
        Ok(self.lock()?.claims.get(claim_id).cloned())
    }

    async fn list_claims(&self, query: &ClaimQuery) -> Result<Vec<Claim>> {
        let state = self.lock()?;
        Ok(state
            .agents
            .values()
            .filter(|a| {
                query
                    .after_agent_id
                    .as_ref()
                    .is_none_or(|after| a.agent_id > *after)
            })
            .filter_map(|a| a.claim.clone())
            .filter(|c| query.holder.as_ref().is_none_or(|h| c.holder == *h))
            .take(query.limit.max(0) as usize)
            .collect())
    }

    async fn no_agent_available(&self, selector: &LabelSelector) -> Result<NoAgentAvailable> {
        let state = self.lock()?;
        let candidates: Vec<Candidate<'_>> = state
            .agents
            .values()
            .map(|agent| Candidate {
                agent,
                cordoned: agent.cordon_reason.is_some(),
            })
            .collect();
        Ok(NoAgentAvailable::count(selector, &candidates))
    }

    async fn get_agent(&self, agent_id: &str) -> Result<Agent> {
        self.lock()?
            .agents
            .get(agent_id)
            .cloned()
            .ok_or_else(|| Error::agent_not_found(agent_id))
    }

    async fn list_agents(&self, query: &AgentQuery) -> Result<Vec<Agent>> {
        let state = self.lock()?;
        Ok(state
            .agents
            .values()
            .filter(|a| {
                query
                    .after_agent_id
                    .as_deref()
                    .is_none_or(|after| a.agent_id.as_str() > after)
            })
            .filter(|a| query.statuses.is_empty() || query.statuses.contains(&a.state.status))
            .filter(|a| query.labels.iter().all(|(k, v)| a.labels.get(k) == Some(v)))
            .take(usize::try_from(query.limit).unwrap_or(0))
            .cloned()
            .collect())
    }

    async fn sweep_candidates(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>> {
        let state = self.lock()?;
        Ok(state
            .agents
            .values()
            .filter(|a| query.selects_agent(a))
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|a| a.agent_id.clone())
            .collect())
    }

    async fn transitions_after(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>> {
        let state = self.lock()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(state
            .transitions
            .range(after.saturating_add(1)..)
            .map(|(_, t)| t)
            .filter(|t| agent_id.is_none_or(|id| t.agent_id == id))
            .take(usize::try_from(limit).unwrap_or(0))
            .cloned()
            .collect())
    }

    async fn count_by_status(&self) -> Result<crate::storage::StatusCounts> {
        let state = self.lock()?;
        let mut counts: BTreeMap<&'static str, (crate::domain::agent::AgentStatus, i64)> =
            BTreeMap::new();
        for agent in state.agents.values() {
            let status = agent.state.status;
            counts.entry(status.as_str()).or_insert((status, 0)).1 += 1;
        }
        Ok(crate::storage::StatusCounts {
            revision: state.head,
            counts: counts.into_values().collect(),
        })
    }

    async fn revision_bounds(&self) -> Result<RevisionBounds> {
        let state = self.lock()?;
        Ok(RevisionBounds {
            pruned_through: state.pruned_through,
            head: state.head,
        })
    }

    async fn snapshot(&self, filter: &WatchFilter) -> Result<(i64, Vec<Agent>)> {
        let state = self.lock()?;
        let agents = state
            .agents
            .values()
            .filter(|a| filter.matches_agent(a))
            .cloned()
            .collect();
        Ok((state.head, agents))
    }

    async fn prune_transitions(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut state = self.lock()?;
        let Some(through) = state
            .transitions
            .values()
            .filter(|t| t.occurred_at < before)
            .map(|t| t.revision)
            .max()
            .filter(|t| *t > state.pruned_through)
        else {
            return Ok(0);
        };
        let keep = state.transitions.split_off(&(through + 1));
        let deleted = state.transitions.len() as u64;
        state.transitions = keep;
        state.pruned_through = through;
        let active: BTreeSet<String> = state
            .agents
            .values()
            .filter_map(|a| a.claim.as_ref().map(|c| c.claim_id.clone()))
            .collect();
        state
            .claims
            .retain(|id, c| c.claimed_at >= before || active.contains(id));
        Ok(deleted)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
