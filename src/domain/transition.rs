//! Agents and transitions as stored, and which of them a watcher wants.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use crate::domain::agent::{AgentState, AgentStatus, Cause, ExhaustionReason, SlotType};
use crate::domain::labels::Labels;
use crate::domain::quota::{Holds, PoolName};

/// One agent as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub agent_id: String,
    pub labels: Labels,
    pub registered_at: DateTime<Utc>,
    pub last_transition_at: DateTime<Utc>,
    /// Revision of the agent's last transition.
    pub revision: i64,
    pub state: AgentState,
    /// `Some` (the reason, maybe empty) while cordoned (`CordonAgent`): the
    /// agent keeps its status and work but is never claimed. `None`: schedulable.
    pub cordon_reason: Option<String>,
    /// The active claim (`ClaimAgent`), while it lasts: a claim lives as long
    /// as the work it took (`dispatch::ends_claim`).
    pub claim: Option<Claim>,
    /// The quota pools it shares limits with (`RegisterAgentRequest.quota_pools`,
    /// `domain::quota`), in the order registered; replaced by each registration.
    pub quota_pools: Vec<PoolName>,
    /// The pools that parked it and its own exhaustion while they hold it
    /// (`domain::quota::Holds`); empty for an agent no pool ever parked.
    pub pool_holds: Holds,
}

/// One claim on one agent (`ClaimAgent`). The rules are `domain::dispatch`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub claim_id: String,
    pub agent_id: String,
    /// The revision of the CLAIMED transition (`dispatch::fencing_token`).
    pub fencing_token: i64,
    pub slot_type: SlotType,
    /// The authenticated caller that made the claim.
    pub holder: String,
    /// The idempotency key it was made with (empty: none).
    pub request_id: String,
    pub claimed_at: DateTime<Utc>,
    pub lease_expires_at: DateTime<Utc>,
}

/// One durable status change. Revisions are global, strictly increasing and
/// gap-free: a transition's revision is allocated in the transaction that commits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub revision: i64,
    pub agent_id: String,
    /// `None` for a registration.
    pub from: Option<AgentStatus>,
    pub to: AgentStatus,
    pub cause: Cause,
    pub occurred_at: DateTime<Utc>,
    pub exhaustion_reason: Option<ExhaustionReason>,
    pub recovery_at: Option<DateTime<Utc>>,
    /// Who made the change: the caller's name (`domain::auth`), "sweeper" for
    /// the sweeper's; "" for transitions recorded before actors were.
    pub actor: String,
    /// The quota pool the transition is for (a report that parked it, a
    /// member parked or released by it); `None` for every other.
    pub quota_pool: Option<PoolName>,
}

impl Transition {
    /// Whether this is the agent's last transition: it was deleted (by a
    /// call, or by the sweeper after its OFFLINE retention).
    pub fn ends_agent(&self) -> bool {
        matches!(self.cause, Cause::Deleted | Cause::Expired)
    }
}

/// Which agents and transitions a watcher (or a snapshot) wants. Empty sets mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchFilter {
    pub agent_ids: HashSet<String>,
    pub statuses: HashSet<AgentStatus>,
}

impl WatchFilter {
    /// A transition matches when its agent is watched and its from or to status
    /// is watched: a watcher of IDLE sees agents both entering and leaving IDLE.
    pub fn matches_transition(&self, t: &Transition) -> bool {
        let agent_ok = self.agent_ids.is_empty() || self.agent_ids.contains(&t.agent_id);
        let status_ok = self.statuses.is_empty()
            || self.statuses.contains(&t.to)
            || t.from.is_some_and(|from| self.statuses.contains(&from));
        agent_ok && status_ok
    }

    /// A snapshot agent matches when it is watched and is in a watched status now.
    pub fn matches_agent(&self, a: &Agent) -> bool {
        let agent_ok = self.agent_ids.is_empty() || self.agent_ids.contains(&a.agent_id);
        let status_ok = self.statuses.is_empty() || self.statuses.contains(&a.state.status);
        agent_ok && status_ok
    }
}

/// The retained window of the transition history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevisionBounds {
    /// Every revision up to this one has been pruned (0: none).
    pub pruned_through: i64,
    /// The latest committed revision (0: none yet).
    pub head: i64,
}

impl RevisionBounds {
    /// The oldest revision still stored, or 0 when the history is empty.
    pub fn oldest_retained(&self) -> i64 {
        if self.head > self.pruned_through {
            self.pruned_through + 1
        } else {
            0
        }
    }

    /// Whether every transition after `since` is still stored (or yet to come).
    pub fn can_resume_from(&self, since: i64) -> bool {
        since >= self.pruned_through && since <= self.head
    }
}

/// Through which revision a prune deletes, given the newest revision that
/// occurred before its cutoff: times are not monotonic in revision (a batch's
/// clock reading, a transaction's start), so a prefix through that revision,
/// when it is past what was pruned already (`None`: nothing to prune).
pub fn prune_through(newest_expired: Option<i64>, pruned_through: i64) -> Option<i64> {
    newest_expired.filter(|through| *through > pruned_through)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn transition(agent: &str, from: Option<AgentStatus>, to: AgentStatus) -> Transition {
        Transition {
            revision: 1,
            agent_id: agent.into(),
            from,
            to,
            cause: Cause::WorkStarted,
            occurred_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            exhaustion_reason: None,
            recovery_at: None,
            actor: String::new(),
            quota_pool: None,
        }
    }

    #[test]
    fn empty_filter_matches_everything() {
        let f = WatchFilter::default();
        assert!(f.matches_transition(&transition("a", None, AgentStatus::Idle)));
    }

    #[test]
    fn status_filter_matches_entering_and_leaving() {
        let f = WatchFilter {
            statuses: [AgentStatus::Idle].into(),
            ..Default::default()
        };
        use AgentStatus::*;
        assert!(f.matches_transition(&transition("a", Some(Busy), Idle)));
        assert!(f.matches_transition(&transition("a", Some(Idle), Busy)));
        assert!(!f.matches_transition(&transition("a", Some(Busy), Offline)));
        assert!(!f.matches_transition(&transition("a", None, Busy)));
    }

    #[test]
    fn agent_filter_and_status_filter_both_apply() {
        let f = WatchFilter {
            agent_ids: ["a".to_string()].into(),
            statuses: [AgentStatus::Busy].into(),
        };
        use AgentStatus::*;
        assert!(f.matches_transition(&transition("a", Some(Idle), Busy)));
        assert!(!f.matches_transition(&transition("b", Some(Idle), Busy)));
        assert!(!f.matches_transition(&transition("a", Some(Idle), OnCall)));
    }

    #[test]
    fn resume_bounds() {
        let b = RevisionBounds {
            pruned_through: 10,
            head: 20,
        };
        assert_eq!(b.oldest_retained(), 11);
        assert!(!b.can_resume_from(9));
        assert!(b.can_resume_from(10));
        assert!(b.can_resume_from(20));
        assert!(!b.can_resume_from(21));
        let empty = RevisionBounds {
            pruned_through: 5,
            head: 5,
        };
        assert_eq!(empty.oldest_retained(), 0);
        assert!(empty.can_resume_from(5));
    }
}
