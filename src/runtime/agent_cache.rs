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
//! decided on this state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};

use crate::domain::agent::{self, Event};
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

#[derive(Default)]
struct Inner {
    agents: HashMap<String, Cached>,
    /// Heartbeats acknowledged from memory and not yet flushed: the latest per agent.
    pending: HashMap<String, DateTime<Utc>>,
}

/// What a heartbeat found in memory.
// Acknowledged is the common case and is returned at once, never stored:
// boxing the agent would cost a heartbeat an allocation to save stack bytes.
#[allow(clippy::large_enum_variant)]
pub enum FastHeartbeat {
    /// Acknowledged: the agent as it now stands.
    Acknowledged(Agent),
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
        FastHeartbeat::Acknowledged(agent)
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
        inner
            .agents
            .insert(agent.agent_id.clone(), Cached { agent, fresh: true });
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
        match inner.agents.get_mut(&agent.agent_id) {
            Some(cached) if cached.fresh && cached.agent.revision >= agent.revision => {}
            Some(cached) if cached.agent.revision > agent.revision => {}
            Some(cached) => {
                let seen = cached.agent.state.last_heartbeat_at;
                cached.agent = agent;
                cached.agent.state.last_heartbeat_at =
                    cached.agent.state.last_heartbeat_at.max(seen);
                cached.fresh = true;
            }
            None => {
                inner
                    .agents
                    .insert(agent.agent_id.clone(), Cached { agent, fresh: true });
            }
        }
    }

    /// A committed transition, from any replica: the agent is stale unless this
    /// process already knows that revision.
    pub fn observed(&self, transition: &Transition) {
        let mut inner = self.lock();
        if transition.ends_agent() {
            inner.agents.remove(&transition.agent_id);
            inner.pending.remove(&transition.agent_id);
            return;
        }
        if let Some(cached) = inner.agents.get_mut(&transition.agent_id)
            && cached.agent.revision < transition.revision
        {
            cached.fresh = false;
        }
    }

    /// Transitions were missed: nothing known can be trusted to be current.
    pub fn all_stale(&self) {
        for cached in self.lock().agents.values_mut() {
            cached.fresh = false;
        }
    }

    /// A deleted agent: forgotten, with its heartbeats not flushed yet (a
    /// heartbeat for it reads the store again, and is NOT_FOUND).
    pub fn forget(&self, agent_id: &str) {
        let mut inner = self.lock();
        inner.agents.remove(agent_id);
        inner.pending.remove(agent_id);
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
