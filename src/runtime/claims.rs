//! Claims that wait (`ClaimAgent` with `wait_timeout`): this process's
//! waiting claims, served in arrival order, woken by the transition fan-out
//! (never by polling the table).
//!
//! A waiting claim joins the queue *before* its first attempt, so that an
//! agent freed between a failed attempt and the wait still wakes it. Each
//! transition that can make an agent claimable (to IDLE, or UNCORDONED) wakes
//! the first waiter, in arrival order, whose selector matches the agent as
//! this process knows it ([`dispatch::waiter_for`]; an agent it does not
//! know wakes the first waiter not woken yet). A woken waiter tries again; if
//! another claim (of any replica) took the agent first, it waits on, still
//! first in line. Other replicas' transitions arrive through the same
//! fan-out (NOTIFY), so a `FinishWork` on one replica wakes a claim waiting
//! on another.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::domain::agent::{AgentStatus, Cause};
use crate::domain::dispatch::{self, Candidate, LabelSelector};
use crate::domain::transition::Transition;
use crate::metrics::Metrics;
use crate::runtime::agent_cache::AgentCache;
use crate::runtime::fanout::TransitionFanout;

struct Waiter {
    selector: LabelSelector,
    notify: Arc<Notify>,
    /// Woken and not yet back to waiting: the next agent goes to another.
    woken: bool,
}

/// This process's waiting claims, by arrival.
pub struct ClaimWaiters {
    waiters: Mutex<BTreeMap<u64, Waiter>>,
    next: AtomicU64,
    cache: Arc<AgentCache>,
    metrics: Arc<Metrics>,
}

/// A place in the queue; leaving it (drop) takes the claim out. A claim
/// that leaves woken but without an agent (its caller went away, or its
/// wait ran out) passes the wake-up on to the next in line, so that the agent
/// that woke it does not stay idle while others wait.
pub struct Ticket {
    waiters: Arc<ClaimWaiters>,
    seq: u64,
    notify: Arc<Notify>,
    claimed: bool,
    /// Counted in `fleetcare_claims_waiting`: it has waited once (after a
    /// first attempt found no agent).
    counted: bool,
}

impl Ticket {
    /// The claim got an agent: leaving passes nothing on.
    pub fn claimed(mut self) {
        self.claimed = true;
    }

    /// Waits to be woken (at once if woken since the last wait).
    pub async fn woken(&mut self) {
        if !self.counted {
            self.counted = true;
            self.waiters.metrics.claims_waiting.inc();
        }
        self.notify.notified().await;
        self.waiters.rearm(self.seq);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiters = self.waiters.lock();
        let left = waiters.remove(&self.seq);
        if !self.claimed
            && left.is_some_and(|w| w.woken)
            && let Some(next) = waiters.values_mut().find(|w| !w.woken)
        {
            next.woken = true;
            next.notify.notify_one();
        }
        drop(waiters);
        if self.counted {
            self.waiters.metrics.claims_waiting.dec();
        }
    }
}

impl ClaimWaiters {
    /// Starts the waker on `fanout`; it stops with `shutdown`.
    pub fn start(
        fanout: &TransitionFanout,
        cache: Arc<AgentCache>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let waiters = Arc::new(ClaimWaiters {
            waiters: Mutex::default(),
            next: AtomicU64::new(0),
            cache,
            metrics,
        });
        let mut transitions = fanout.subscribe();
        let waker = waiters.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = transitions.recv() => received,
                };
                match received {
                    Ok(t) => waker.on_transition(&t),
                    // Missed some: every waiter looks again.
                    Err(broadcast::error::RecvError::Lagged(_)) => waker.wake_all(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        waiters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the queue for agents `selector` matches.
    pub fn enqueue(self: &Arc<Self>, selector: LabelSelector) -> Ticket {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock().insert(
            seq,
            Waiter {
                selector,
                notify: notify.clone(),
                woken: false,
            },
        );
        Ticket {
            waiters: self.clone(),
            seq,
            notify,
            claimed: false,
            counted: false,
        }
    }

    /// How many claims wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rearm(&self, seq: u64) {
        if let Some(w) = self.lock().get_mut(&seq) {
            w.woken = false;
        }
    }

    fn wake_all(&self) {
        for w in self.lock().values_mut() {
            w.woken = true;
            w.notify.notify_one();
        }
    }

    /// Wakes the first waiter that wants the agent `t` may have made claimable.
    fn on_transition(&self, t: &Transition) {
        let freed = (t.to == AgentStatus::Idle && !t.ends_agent()) || t.cause == Cause::Uncordoned;
        if !freed {
            return;
        }
        let mut waiters = self.lock();
        if waiters.is_empty() {
            return;
        }
        let pending: Vec<u64> = waiters
            .iter()
            .filter(|(_, w)| !w.woken)
            .map(|(seq, _)| *seq)
            .collect();
        let chosen = match self.cache.agent(&t.agent_id) {
            // As the transition left it (the cache may not have it yet).
            Some(mut agent) => {
                agent.state.status = t.to;
                if t.cause == Cause::Uncordoned {
                    agent.cordon_reason = None;
                }
                let candidate = Candidate {
                    cordoned: agent.cordon_reason.is_some(),
                    agent: &agent,
                };
                let selectors = pending.iter().map(|seq| &waiters[seq].selector);
                dispatch::waiter_for(selectors, &candidate).map(|i| pending[i])
            }
            // Unknown here (another replica's agent): the first in line looks.
            None => pending.first().copied(),
        };
        let Some(seq) = chosen else {
            return;
        };
        if let Some(w) = waiters.get_mut(&seq) {
            w.woken = true;
            w.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::AgentState;
    use chrono::Utc;

    fn waiters() -> Arc<ClaimWaiters> {
        Arc::new(ClaimWaiters {
            waiters: Mutex::default(),
            next: AtomicU64::new(0),
            cache: AgentCache::new(),
            metrics: Metrics::new(),
        })
    }

    fn agent(id: &str, team: &str, status: AgentStatus) -> crate::domain::transition::Agent {
        let now = Utc::now();
        crate::domain::transition::Agent {
            agent_id: id.into(),
            labels: [("team".to_string(), team.to_string())].into(),
            quota_pools: Vec::new(),
            pool_holds: Default::default(),
            registered_at: now,
            last_transition_at: now,
            revision: 1,
            state: AgentState {
                status,
                last_heartbeat_at: now,
                exhaustion: None,
            },
            cordon_reason: None,
            claim: None,
        }
    }

    fn freed(id: &str, cause: Cause) -> Transition {
        Transition {
            revision: 2,
            agent_id: id.into(),
            from: Some(AgentStatus::Busy),
            to: AgentStatus::Idle,
            cause,
            occurred_at: Utc::now(),
            exhaustion_reason: None,
            recovery_at: None,
            actor: String::new(),
            quota_pool: None,
        }
    }

    fn team(name: &str) -> LabelSelector {
        LabelSelector {
            match_labels: [("team".to_string(), name.to_string())].into(),
            match_expressions: vec![],
        }
    }

    /// Whether the ticket has a wake-up waiting (a permit: ready at the
    /// first poll, which a zero timeout still makes).
    async fn is_woken(ticket: &mut Ticket) -> bool {
        tokio::time::timeout(std::time::Duration::ZERO, ticket.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_freed_agent_wakes_the_first_waiter_that_wants_it_once() {
        let w = waiters();
        let mut narrow = w.enqueue(team("x"));
        let mut any = w.enqueue(LabelSelector::default());
        let mut later = w.enqueue(LabelSelector::default());
        assert_eq!(w.len(), 3);
        // Known here with team=y: the narrow waiter is skipped, not a blocker.
        w.cache.committed(&agent("y-1", "y", AgentStatus::Busy));
        w.on_transition(&freed("y-1", Cause::ClaimReleased));
        assert!(!is_woken(&mut narrow).await);
        assert!(is_woken(&mut any).await);
        assert!(!is_woken(&mut later).await, "one agent, one waiter");
        // A status change that frees nothing wakes nobody.
        let mut busy = freed("y-1", Cause::Claimed);
        busy.to = AgentStatus::Busy;
        w.on_transition(&busy);
        let mut deleted = freed("y-1", Cause::Deleted);
        deleted.from = Some(AgentStatus::Idle);
        w.on_transition(&deleted);
        assert!(!is_woken(&mut later).await);
        // An agent this process does not know wakes the first in line.
        w.on_transition(&freed("elsewhere", Cause::WorkFinished));
        assert!(is_woken(&mut narrow).await);
        // Woken, then gone without an agent: the wake-up passes on.
        w.on_transition(&freed("elsewhere", Cause::WorkFinished));
        drop(narrow);
        assert!(is_woken(&mut any).await, "passed on to the next in line");
        // Gone with an agent: nothing passes on.
        w.on_transition(&freed("elsewhere", Cause::WorkFinished));
        any.claimed();
        assert!(!is_woken(&mut later).await);
        drop(later);
        assert!(w.is_empty());
    }
}
