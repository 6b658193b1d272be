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
//!
//! Two marks bound what a heartbeat answered from memory can miss or lose
//! (see `runtime::heartbeats` for the guarantees they give):
//! - `observed_through`, the revision through which this process has seen
//!   every committed transition (its own and other replicas'): a fresh agent
//!   is current as of it;
//! - `stored_through`, when the last successful flush took the pending
//!   heartbeats: every heartbeat recorded before it is in the store. A
//!   heartbeat is answered from memory only less than one flush interval
//!   after it ([`AgentCache::with_flush_window`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::domain::agent::{self, Event};
use crate::domain::dispatch::{Candidate, LabelSelector};
use crate::domain::transition::{Agent, Transition};
use crate::runtime::clock::Clock;
use crate::storage::{AgentQuery, AgentStore};

/// Heartbeats written per statement.
const FLUSH_CHUNK: usize = 10_000;
/// Agents read per page when the cache is filled at start-up.
const WARM_PAGE: i64 = 10_000;

struct Cached {
    agent: Agent,
    /// False once another replica committed a transition of this agent.
    fresh: bool,
    /// The newest revision of a transition of this agent seen here (0: none):
    /// a state older than it, committed here but completed late, is stale.
    newest_seen: i64,
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
    /// The newest transition seen of each agent not held here (registered or
    /// changed through another replica, not read yet).
    unheld: HashMap<String, i64>,
    /// When the last successful flush took `pending` (or when this cache was
    /// made, with nothing pending before): every heartbeat recorded earlier is
    /// in the store. `None` without a flush window.
    stored_through: Option<DateTime<Utc>>,
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

    /// Holds `agent` as read or committed: fresh unless a newer transition of
    /// it was seen here already (the fan-out may deliver a transition another
    /// replica committed after this one before this process completes its
    /// own commit).
    fn hold(&mut self, agent: Agent) {
        let id = &agent.agent_id;
        let newest_seen = self
            .agents
            .get(id)
            .map_or(0, |c| c.newest_seen)
            .max(self.unheld.remove(id).unwrap_or(0));
        let fresh = agent.revision >= newest_seen;
        self.set(Cached {
            agent,
            fresh,
            newest_seen,
        });
    }

    fn remove(&mut self, agent_id: &str) {
        self.unheld.remove(agent_id);
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
    /// The last successful flush began a flush interval ago or more: wait for
    /// the next one ([`AgentCache::flushes`]), or commit.
    Unflushed,
}

/// How long after the last successful flush began heartbeats are still
/// answered from memory: one flush interval, on the server's clock.
struct FlushWindow {
    clock: Clock,
    length: chrono::Duration,
}

/// The last known state of every agent, and the heartbeats waiting for a flush.
pub struct AgentCache {
    inner: Mutex<Inner>,
    /// False after a failed flush, until one succeeds.
    flushing_ok: AtomicBool,
    /// `None`: heartbeats are answered from memory however old the last
    /// flush (unit tests of other parts; the server always sets one).
    window: Option<FlushWindow>,
    /// Counts finished flushes, failed or not (heartbeats waiting for one watch it).
    /// Notified at the end of every flush (a `Notify`, not a watch channel:
    /// its waiters wake in the order they came, which the simulation's
    /// determinism needs; a watch channel wakes them in a random order).
    flushes: tokio::sync::Notify,
    /// The revision through which this process has seen every committed
    /// transition (0: none yet).
    observed_through: watch::Sender<i64>,
}

impl AgentCache {
    pub fn new() -> Arc<Self> {
        Arc::new(AgentCache::unbounded())
    }

    fn unbounded() -> Self {
        AgentCache {
            inner: Mutex::default(),
            flushing_ok: AtomicBool::new(true),
            window: None,
            flushes: tokio::sync::Notify::new(),
            observed_through: watch::channel(0).0,
        }
    }

    /// A cache that answers heartbeats from memory only less than `interval`
    /// after its last successful flush began (on `clock`), so that what a
    /// server that loses its store (or crashes) can lose is the heartbeats of
    /// less than one flush interval.
    pub fn with_flush_window(clock: Clock, interval: std::time::Duration) -> Arc<Self> {
        let mut cache = AgentCache::unbounded();
        let length = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
        cache
            .inner
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .stored_through = Some(clock.now());
        cache.window = Some(FlushWindow { clock, length });
        Arc::new(cache)
    }

    /// Notified at the end of every flush, failed or not (`notify_waiters`:
    /// a waiter must be enabled before the flush it waits for ends).
    pub fn flushes(&self) -> &tokio::sync::Notify {
        &self.flushes
    }

    /// The revision through which this process has seen every committed transition.
    pub fn observed_through(&self) -> i64 {
        *self.observed_through.borrow()
    }

    /// Every transition through `revision` is known seen (the fan-out
    /// publishes in revision order without gaps, and the cache was filled
    /// after `revision` was committed).
    pub fn seen_through(&self, revision: i64) {
        self.observed_through.send_if_modified(|through| {
            let moved = revision > *through;
            *through = (*through).max(revision);
            moved
        });
    }

    /// Waits up to `within` until every transition through `revision` is
    /// seen here; false if not by then.
    pub async fn caught_up(&self, revision: i64, within: std::time::Duration) -> bool {
        let mut through = self.observed_through.subscribe();
        tokio::time::timeout(within, through.wait_for(|t| *t >= revision))
            .await
            .is_ok_and(|seen| seen.is_ok())
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
        if let (Some(window), Some(stored)) = (&self.window, inner.stored_through)
            && now >= stored + window.length
        {
            return FastHeartbeat::Unflushed;
        }
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
            if old.agent.revision > agent.revision {
                // A newer state is held already (read since).
                return;
            }
            // A heartbeat acknowledged from memory may be newer than the row.
            let seen = old.agent.state.last_heartbeat_at;
            agent.state.last_heartbeat_at = agent.state.last_heartbeat_at.max(seen);
        }
        inner.hold(agent);
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
                inner.hold(agent);
            }
            None => inner.hold(agent),
        }
    }

    /// A committed transition, from any replica: the agent is stale unless this
    /// process already knows that revision.
    pub fn observed(&self, transition: &Transition) {
        // Revisions skipped: the fan-out fell behind by more than the
        // retention and published on after the pruned ones (found by the
        // simulation). What they did is unknown here.
        let through = self.observed_through();
        if through > 0 && transition.revision > through + 1 {
            self.all_stale();
        }
        self.observe(transition);
        self.seen_through(transition.revision);
    }

    fn observe(&self, transition: &Transition) {
        let mut inner = self.lock();
        if transition.ends_agent() {
            inner.remove(&transition.agent_id);
            return;
        }
        let id = &transition.agent_id;
        let newer = match inner.agents.get_mut(id) {
            Some(cached) => {
                cached.newest_seen = cached.newest_seen.max(transition.revision);
                cached.agent.revision < transition.revision
            }
            None => {
                let newest = inner.unheld.entry(id.clone()).or_insert(0);
                *newest = (*newest).max(transition.revision);
                false
            }
        };
        if newer {
            inner.mark_stale(id);
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

    /// The pending heartbeats, and when they were taken (with a window).
    fn take_pending(&self) -> (HashMap<String, DateTime<Utc>>, Option<DateTime<Utc>>) {
        let mut inner = self.lock();
        // Read under the lock: every heartbeat recorded before this time is taken.
        let at = self.window.as_ref().map(|w| w.clock.now());
        (std::mem::take(&mut inner.pending), at)
    }

    /// A flush that took the pending heartbeats at `taken` wrote them all.
    fn stored(&self, taken: Option<DateTime<Utc>>) {
        let mut inner = self.lock();
        if let Some(taken) = taken {
            inner.stored_through = Some(inner.stored_through.map_or(taken, |s| s.max(taken)));
        }
        self.flushing_ok.store(true, Ordering::Release);
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
        let flushed = self.write_pending(store).await;
        self.flushes.notify_waiters();
        flushed
    }

    async fn write_pending(&self, store: &dyn AgentStore) -> crate::error::Result<usize> {
        let (beats, taken) = self.take_pending();
        if beats.is_empty() {
            // Nothing was pending: everything recorded before `taken` is stored.
            self.stored(taken);
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
        self.stored(taken);
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

    fn started(id: &str, revision: i64) -> Transition {
        Transition {
            revision,
            agent_id: id.into(),
            from: Some(AgentStatus::Idle),
            to: AgentStatus::Busy,
            cause: Cause::WorkStarted,
            occurred_at: at(1),
            exhaustion_reason: None,
            recovery_at: None,
            actor: String::new(),
            quota_pool: None,
        }
    }

    #[test]
    fn a_commit_completed_after_a_newer_transition_was_seen_leaves_the_agent_stale() {
        let cache = AgentCache::new();
        let (idle, busy) = (AgentStatus::Idle, AgentStatus::Busy);
        cache.loaded(agent("a", "z1", idle, 0, 1));
        // This process committed revision 2; another replica then revision 3,
        // which the fan-out delivered (read from the table with 2) before
        // this process completed its own commit.
        cache.observed(&started("a", 2));
        cache.observed(&started("a", 3));
        cache.committed(&agent("a", "z1", busy, 1, 2));
        assert!(cache.known(["a"]).is_none(), "revision 2 is not current");
        cache.loaded(agent("a", "z1", idle, 2, 3));
        assert_eq!(cache.known(["a"]).unwrap()[0].revision, 3);
        // A commit completing after a newer read keeps the newer state.
        cache.committed(&agent("a", "z1", busy, 1, 2));
        assert_eq!(cache.known(["a"]).unwrap()[0].revision, 3);

        // Not held yet (registered elsewhere): what was seen of it still counts.
        cache.observed(&started("b", 5));
        cache.committed(&agent("b", "z1", idle, 0, 4));
        assert!(cache.known(["b"]).is_none());
        cache.loaded(agent("b", "z1", busy, 1, 5));
        assert!(cache.known(["b"]).is_some());
        assert_eq!(cache.observed_through(), 5);
    }

    /// The simulation's finding: a fan-out that fell behind by more than the
    /// retention publishes on after the pruned revisions; what they did is
    /// unknown, so nothing held stays current.
    #[test]
    fn revisions_skipped_by_the_fan_out_leave_every_agent_stale() {
        let cache = AgentCache::new();
        let idle = AgentStatus::Idle;
        cache.loaded(agent("a", "z1", idle, 0, 1));
        cache.loaded(agent("b", "z1", idle, 0, 2));
        cache.seen_through(2);
        cache.observed(&started("b", 3));
        assert!(cache.known(["a"]).is_some(), "contiguous: a stays current");
        // 4 to 6 were pruned before this fan-out read them (maybe a's).
        cache.observed(&started("b", 7));
        assert!(cache.known(["a"]).is_none());
        assert_eq!(cache.observed_through(), 7);
    }
}
