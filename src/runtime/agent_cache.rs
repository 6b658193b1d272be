//! The agent cache: this process's last known state of every agent, and the
//! heartbeats acknowledged from memory that wait for a flush
//! ([`AgentCache::heartbeat`] decides them; `runtime::heartbeats` runs the
//! flusher and the observer that keep it current).
//!
//! The cache holds every agent this process knows, as of its last commit here or
//! its last read. A transition committed by another replica marks the agent stale
//! (the fan-out sees every committed transition), and a stale or unknown agent's
//! next heartbeat reads it again first. The committer (`runtime::committer`)
//! writes what it commits here; a batch whose agents are all known and fresh is
//! decided on this state. So is a batch's claims when this process knows
//! enough claimable agents: the cache keeps its fresh claimable agents in
//! the order claims take them ([`AgentCache::claim_candidates`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};

use crate::domain::agent::{self, Event};
use crate::domain::dispatch::{Candidate, LabelSelector};
use crate::domain::transition::{Agent, Transition};
use crate::storage::{AgentQuery, AgentStore};

/// Heartbeats written per statement.
const FLUSH_CHUNK: usize = 10_000;
/// Agents read per page when the cache is filled at start-up.
const WARM_PAGE: i64 = 10_000;

struct Cached {
    agent: Agent,
    /// False once another replica committed a transition of this agent.
    fresh: bool,
}

impl Cached {
    /// Its place among the claimable agents, if it is one (fresh, and
    /// claimable by the domain's rule), in the order claims take them.
    fn claimable_key(&self) -> Option<(DateTime<Utc>, String)> {
        let candidate = Candidate {
            agent: &self.agent,
            cordoned: self.agent.cordon_reason.is_some(),
        };
        (self.fresh && candidate.claimable())
            .then(|| (candidate.lru_key().0, self.agent.agent_id.clone()))
    }
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, Cached>,
    /// The fresh claimable agents, idle longest first (`Candidate::lru_key`).
    claimable: BTreeSet<(DateTime<Utc>, String)>,
    /// Heartbeats acknowledged from memory and not yet flushed: the latest per agent.
    pending: HashMap<String, DateTime<Utc>>,
}

impl Inner {
    /// Sets an agent's entry, keeping the claimable index in step.
    fn set(&mut self, cached: Cached) {
        let id = cached.agent.agent_id.clone();
        if let Some(old) = self.agents.get(&id).and_then(Cached::claimable_key) {
            self.claimable.remove(&old);
        }
        if let Some(key) = cached.claimable_key() {
            self.claimable.insert(key);
        }
        self.agents.insert(id, cached);
    }

    fn remove(&mut self, agent_id: &str) {
        if let Some(key) = self
            .agents
            .remove(agent_id)
            .and_then(|old| old.claimable_key())
        {
            self.claimable.remove(&key);
        }
        self.pending.remove(agent_id);
    }

    fn mark_stale(&mut self, agent_id: &str) {
        if let Some(cached) = self.agents.get_mut(agent_id) {
            if let Some(key) = cached.claimable_key() {
                self.claimable.remove(&key);
            }
            cached.fresh = false;
        }
    }
}

/// What a heartbeat found in memory.
pub enum FastHeartbeat {
    /// Acknowledged: the agent as it now stands.
    Acknowledged(Box<Agent>),
    /// This process does not know the agent's current state: read it first.
    Unknown,
    /// The heartbeat changes the agent's status, or flushing is failing: commit it.
    Commit,
}

/// The last known state of every agent, and the heartbeats waiting for a flush.
#[derive(Default)]
pub struct AgentCache {
    inner: Mutex<Inner>,
    /// False after a failed flush, until one succeeds.
    flushing_ok: AtomicBool,
}

impl AgentCache {
    pub fn new() -> Arc<Self> {
        Arc::new(AgentCache {
            inner: Mutex::default(),
            flushing_ok: AtomicBool::new(true),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many agents this process knows.
    pub fn len(&self) -> usize {
        self.lock().agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides a heartbeat at `now` in memory, and records it when it changes no status.
    pub fn heartbeat(&self, agent_id: &str, now: DateTime<Utc>) -> FastHeartbeat {
        if !self.flushing_ok.load(Ordering::Acquire) {
            return FastHeartbeat::Commit;
        }
        let mut inner = self.lock();
        let Some(cached) = inner.agents.get_mut(agent_id).filter(|c| c.fresh) else {
            return FastHeartbeat::Unknown;
        };
        let Ok(decision) = agent::decide(
            &cached.agent.state,
            &cached.agent.labels,
            Event::Heartbeat,
            now,
        ) else {
            return FastHeartbeat::Commit;
        };
        if decision.change.is_some() {
            return FastHeartbeat::Commit;
        }
        cached.agent.state = decision.state;
        let agent = cached.agent.clone();
        inner.pending.insert(agent_id.to_owned(), now);
        FastHeartbeat::Acknowledged(Box::new(agent))
    }

    /// An agent as this process committed it: exact, so fresh.
    pub fn committed(&self, agent: &Agent) {
        let mut inner = self.lock();
        let mut agent = agent.clone();
        if let Some(old) = inner.agents.get(&agent.agent_id) {
            // A heartbeat acknowledged from memory may be newer than the row.
            let seen = old.agent.state.last_heartbeat_at;
            agent.state.last_heartbeat_at = agent.state.last_heartbeat_at.max(seen);
        }
        inner.set(Cached { agent, fresh: true });
    }

    /// This process's state of every one of `ids`, if it holds a fresh one for
    /// each (for a batch decided without reading the rows: the store checks them).
    pub fn known<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Option<Vec<Agent>> {
        let inner = self.lock();
        let mut seen = std::collections::HashSet::new();
        let mut known: Vec<Agent> = Vec::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            let cached = inner.agents.get(id).filter(|c| c.fresh)?;
            known.push(cached.agent.clone());
        }
        Some(known)
    }

    /// An agent as read from the store. Kept unless this process already holds
    /// a fresh state at least as recent.
    pub fn loaded(&self, agent: Agent) {
        let mut inner = self.lock();
        let mut agent = agent;
        match inner.agents.get(&agent.agent_id) {
            Some(cached) if cached.fresh && cached.agent.revision >= agent.revision => {}
            Some(cached) if cached.agent.revision > agent.revision => {}
            Some(cached) => {
                let seen = cached.agent.state.last_heartbeat_at;
                agent.state.last_heartbeat_at = agent.state.last_heartbeat_at.max(seen);
                inner.set(Cached { agent, fresh: true });
            }
            None => inner.set(Cached { agent, fresh: true }),
        }
    }

    /// A committed transition, from any replica: the agent is stale unless this
    /// process already knows that revision.
    pub fn observed(&self, transition: &Transition) {
        let mut inner = self.lock();
        if transition.ends_agent() {
            inner.remove(&transition.agent_id);
            return;
        }
        if inner
            .agents
            .get(&transition.agent_id)
            .is_some_and(|cached| cached.agent.revision < transition.revision)
        {
            inner.mark_stale(&transition.agent_id);
        }
    }

    /// Transitions were missed: nothing known can be trusted to be current.
    pub fn all_stale(&self) {
        let mut inner = self.lock();
        inner.claimable.clear();
        for cached in inner.agents.values_mut() {
            cached.fresh = false;
        }
    }

    /// A deleted agent: forgotten, with its heartbeats not flushed yet (a
    /// heartbeat for it reads the store again, and is NOT_FOUND).
    pub fn forget(&self, agent_id: &str) {
        self.lock().remove(agent_id);
    }

    /// The candidates of a batch's claims from memory: for each claim's
    /// selector, in the batch's order, the fresh claimable agent it matches
    /// that is idle longest and not taken by an earlier claim, none of them
    /// in `busy` (the agents of the batches in flight, whose state here is
    /// not yet what they commit). Taken in the order the domain's choice
    /// takes them (`dispatch::choose`), each claim finds its own among them.
    /// `None` when this process does not know enough: the batch then reads
    /// them from the store, which also knows the agents other replicas freed
    /// since (stale here) and decides a refusal on what is stored.
    pub fn claim_candidates(
        &self,
        selectors: &[&LabelSelector],
        busy: &HashSet<String>,
    ) -> Option<Vec<Agent>> {
        let inner = self.lock();
        let mut chosen: Vec<Agent> = Vec::new();
        let mut taken: HashSet<&str> = HashSet::new();
        for selector in selectors {
            let agent = inner
                .claimable
                .iter()
                .filter(|(_, id)| !busy.contains(id) && !taken.contains(id.as_str()))
                .map(|(_, id)| &inner.agents[id].agent)
                .find(|agent| selector.matches(&agent.labels))?;
            taken.insert(&agent.agent_id);
            chosen.push(agent.clone());
        }
        Some(chosen)
    }

    /// The agent as this process last committed or read it.
    pub fn agent(&self, agent_id: &str) -> Option<Agent> {
        self.lock().agents.get(agent_id).map(|c| c.agent.clone())
    }

    /// The agent's labels as this process last committed or read them (labels
    /// change only by registration, which goes through a commit).
    pub fn labels(&self, agent_id: &str) -> Option<crate::domain::labels::Labels> {
        self.lock()
            .agents
            .get(agent_id)
            .map(|c| c.agent.labels.clone())
    }

    /// The latest heartbeat time this process knows for the agent, flushed or not.
    pub fn last_heartbeat(&self, agent_id: &str) -> Option<DateTime<Utc>> {
        let inner = self.lock();
        let pending = inner.pending.get(agent_id).copied();
        let cached = inner
            .agents
            .get(agent_id)
            .map(|c| c.agent.state.last_heartbeat_at);
        pending.max(cached)
    }

    fn take_pending(&self) -> HashMap<String, DateTime<Utc>> {
        std::mem::take(&mut self.lock().pending)
    }

    /// Puts back heartbeats a failed flush could not write (keeping the latest).
    fn restore_pending(&self, beats: HashMap<String, DateTime<Utc>>) {
        let mut inner = self.lock();
        for (id, at) in beats {
            let slot = inner.pending.entry(id).or_insert(at);
            *slot = (*slot).max(at);
        }
    }

    /// Writes every pending heartbeat to the store. On failure they are kept for
    /// the next flush, and heartbeats take the transactional path until one succeeds.
    pub async fn flush(&self, store: &dyn AgentStore) -> crate::error::Result<usize> {
        let beats = self.take_pending();
        if beats.is_empty() {
            return Ok(0);
        }
        let list: Vec<(String, DateTime<Utc>)> =
            beats.iter().map(|(id, at)| (id.clone(), *at)).collect();
        for chunk in list.chunks(FLUSH_CHUNK) {
            if let Err(error) = store.record_heartbeats(chunk).await {
                self.flushing_ok.store(false, Ordering::Release);
                self.restore_pending(beats);
                return Err(error);
            }
        }
        self.flushing_ok.store(true, Ordering::Release);
        Ok(list.len())
    }

    /// Fills the cache with every stored agent.
    pub async fn warm(&self, store: &dyn AgentStore) -> crate::error::Result<usize> {
        let mut after = None;
        let mut count = 0;
        loop {
            let page = store
                .list_agents(&AgentQuery {
                    after_agent_id: after.clone(),
                    limit: WARM_PAGE,
                    ..AgentQuery::default()
                })
                .await?;
            let full = page.len() as i64 == WARM_PAGE;
            after = page.last().map(|a| a.agent_id.clone());
            count += page.len();
            for agent in page {
                self.loaded(agent);
            }
            if !full {
                return Ok(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::domain::agent::{AgentStatus, Cause};
    use crate::domain::labels::Labels;

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::minutes(minute)
    }

    fn agent(id: &str, zone: &str, status: AgentStatus, since: i64, revision: i64) -> Agent {
        let (mut state, _) = agent::registered(at(0));
        state.status = status;
        Agent {
            agent_id: id.into(),
            labels: Labels::from([("zone".to_owned(), zone.to_owned())]),
            quota_pools: Vec::new(),
            pool_holds: Default::default(),
            registered_at: at(0),
            last_transition_at: at(since),
            revision,
            state,
            cordon_reason: None,
            claim: None,
        }
    }

    fn zone(z: &str) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::from([("zone".to_owned(), z.to_owned())]),
            match_expressions: Vec::new(),
        }
    }

    fn ids(agents: Option<Vec<Agent>>) -> Option<Vec<String>> {
        agents.map(|a| a.into_iter().map(|a| a.agent_id).collect())
    }

    #[test]
    fn claim_candidates_are_fresh_claimable_matching_agents_idle_longest_first() {
        let cache = AgentCache::new();
        let idle = AgentStatus::Idle;
        cache.loaded(agent("a", "z1", idle, 30, 1));
        cache.loaded(agent("b", "z1", idle, 10, 2));
        cache.loaded(agent("c", "z2", idle, 5, 3));
        cache.loaded(agent("d", "z1", AgentStatus::Busy, 1, 4));
        let mut cordoned = agent("e", "z1", idle, 2, 5);
        cordoned.cordon_reason = Some("maintenance".into());
        cache.loaded(cordoned);
        let none = HashSet::new();

        let z1 = zone("z1");
        assert_eq!(
            ids(cache.claim_candidates(&[&z1, &z1], &none)),
            Some(vec!["b".into(), "a".into()]),
            "IDLE, schedulable, in zone z1, idle longest first"
        );
        // More than it knows: the store decides.
        assert_eq!(cache.claim_candidates(&[&z1, &z1, &z1], &none), None);
        // An agent in a batch in flight is not offered.
        let busy = HashSet::from(["b".to_owned()]);
        assert_eq!(
            ids(cache.claim_candidates(&[&z1], &busy)),
            Some(vec!["a".into()])
        );
        // Each claim in order takes the one idle longest that it matches.
        let any = LabelSelector::default();
        assert_eq!(
            ids(cache.claim_candidates(&[&z1, &any, &z1], &none)),
            Some(vec!["b".into(), "c".into(), "a".into()])
        );

        // Claimed here: no longer a candidate; released here: the most
        // recently idle.
        let mut b = agent("b", "z1", AgentStatus::Busy, 40, 6);
        cache.committed(&b);
        assert_eq!(
            ids(cache.claim_candidates(&[&z1], &none)),
            Some(vec!["a".into()])
        );
        b.state.status = idle;
        b.last_transition_at = at(50);
        b.revision = 7;
        cache.committed(&b);
        assert_eq!(
            ids(cache.claim_candidates(&[&z1, &z1], &none)),
            Some(vec!["a".into(), "b".into()])
        );

        // Another replica's transition makes it stale: not offered until read
        // again; a deleted agent is gone; nothing after missed transitions.
        let transition = |id: &str, revision: i64, cause: Cause| Transition {
            revision,
            agent_id: id.into(),
            from: Some(idle),
            to: AgentStatus::Busy,
            cause,
            occurred_at: at(60),
            exhaustion_reason: None,
            recovery_at: None,
            actor: String::new(),
            quota_pool: None,
        };
        cache.observed(&transition("a", 8, Cause::Claimed));
        assert_eq!(
            ids(cache.claim_candidates(&[&z1], &none)),
            Some(vec!["b".into()])
        );
        cache.loaded(agent("a", "z1", idle, 70, 9));
        assert_eq!(
            ids(cache.claim_candidates(&[&z1, &z1], &none)),
            Some(vec!["b".into(), "a".into()])
        );
        cache.forget("b");
        assert_eq!(
            ids(cache.claim_candidates(&[&z1], &none)),
            Some(vec!["a".into()])
        );
        cache.all_stale();
        assert_eq!(cache.claim_candidates(&[&any], &none), None);
        assert_eq!(cache.claim_candidates(&[], &none), Some(Vec::new()));
    }
}
