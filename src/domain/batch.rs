//! The pure half of group commit: deciding a whole batch of agent commands at once.
//!
//! The store locks every agent a batch names (in agent-id order), then, for a
//! batch with claims, the claimable agents its selectors match (skipping rows
//! others hold) and the claims made before under its idempotency keys, hands
//! them to [`plan_with`] with the commands in arrival order, and writes what
//! comes out in one transaction. Each command is decided by [`agent::decide`]
//! and the dispatch rules ([`dispatch`]) on the state the earlier commands of
//! the batch left, so two `StartWork` calls (or two claims) on one idle agent
//! in one batch still give one winner, and a refused command refuses only
//! itself.
//!
//! Revisions are not known while planning (the store takes the revision row last,
//! after the agent rows): transitions are numbered 1..n within the batch, and
//! [`Plan::finish`] shifts them by the head revision the store allocated, with
//! the fencing tokens of the claims made in the batch (a claim's token is the
//! revision of its CLAIMED transition).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

use crate::domain::agent::{
    self, AgentStatus, Cause, Decision, Event, ExhaustionReport, StatusChange, TransitionRefused,
};
use crate::domain::dispatch::{
    self, ClaimEnd, ClaimHeld, ClaimRequest, LabelSelector, StaleFencingToken,
};
use crate::domain::labels::Labels;
use crate::domain::quota::{NotPoolMember, PoolName, PoolState, Window};
use crate::domain::transition::{Agent, Claim, Transition};

mod pools;

pub use pools::{PoolCommand, PoolRows, held_members, parking_pools, plan_pool, pools_read};

/// One state-changing call on an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create the agent (IDLE, with a REGISTERED transition) or, for an existing
    /// one, replace its labels and count a heartbeat.
    Register {
        agent_id: String,
        labels: Labels,
        /// Replaces the agent's quota pools (an empty list leaves them all).
        quota_pools: Vec<PoolName>,
        /// Who asked (a caller's name, or "sweeper"): the transition's actor.
        actor: String,
    },
    /// A state-machine event on an existing agent. `FinishWork` and
    /// `ReportExhausted` carry the fencing token of the agent's claim
    /// ([`dispatch::check_fencing`]); any event that takes the agent out of
    /// its slot ends its claim ([`dispatch::ends_claim`]).
    Apply {
        agent_id: String,
        event: Event,
        /// The caller's fencing token (`None`: none given).
        fencing_token: Option<i64>,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// `ReportExhausted`: the agent hit a provider limit. With a quota pool
    /// (named, or the agent's only one: `quota::report_target`) the pool is
    /// parked and its IDLE members with it, in this commit
    /// (`domain::quota`); else the agent alone, as `Apply` with
    /// `Event::ReportExhausted` (which is this with neither pool nor window).
    ReportExhausted {
        agent_id: String,
        report: ExhaustionReport,
        /// `ReportExhaustedRequest.quota_pool` (`None`: empty).
        quota_pool: Option<PoolName>,
        /// `ReportExhaustedRequest.window` (`None`: inferred).
        window: Option<Window>,
        /// The caller's fencing token (`None`: none given).
        fencing_token: Option<i64>,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// The sweeper letting one member go in its pool's staggered release
    /// (`quota::due_releases`): `quota::Member::on_release`, the canary
    /// recorded on the pool when it is the first. Nothing when the pool no
    /// longer holds the agent (another replica released it) or is parked
    /// again.
    PoolRelease {
        pool: PoolName,
        agent_id: String,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// `ResumeAgent`: an EXHAUSTED agent back to IDLE now, decided by
    /// [`dispatch::resume_decision`] (cause RESUMED).
    Resume {
        agent_id: String,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// `CordonAgent`: out of rotation, status and work kept, decided by
    /// [`dispatch::cordon_decision`] (cause CORDONED, from == to; nothing
    /// when cordoned already).
    Cordon {
        agent_id: String,
        /// Stored as the agent's `cordon_reason`.
        reason: String,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// `UncordonAgent`: back in rotation (cause UNCORDONED, from == to;
    /// nothing when schedulable already).
    Uncordon {
        agent_id: String,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// `ClaimAgent`: the claimable agent idle longest among those the
    /// selector matches ([`dispatch::choose`]), to BUSY or ON_CALL (cause
    /// CLAIMED), or, for an idempotency key seen before, that claim again.
    Claim {
        /// The new claim's own part (the runtime draws it, unique): its id is
        /// [`dispatch::claim_id`] of the agent chosen and this.
        unique: String,
        request: ClaimRequest,
        /// Who asked: the claim's holder and the transition's actor.
        actor: String,
    },
    /// `RenewClaim`: a longer lease ([`dispatch::renew`]), no transition.
    RenewClaim {
        agent_id: String,
        claim_id: String,
        fencing_token: i64,
        lease: Duration,
        /// Who asked.
        actor: String,
    },
    /// `ReleaseClaim`: the claimed agent back to IDLE (cause CLAIM_RELEASED).
    ReleaseClaim {
        agent_id: String,
        claim_id: String,
        fencing_token: i64,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// `DeleteAgent`: the agent's last transition (cause DELETED, from ==
    /// to) and its row removed; refused while its claim's lease runs
    /// ([`dispatch::check_delete`]).
    Delete {
        agent_id: String,
        /// Who asked: the transition's actor.
        actor: String,
    },
    /// The sweeper looking at one agent: a claim whose lease ran out ends
    /// (CLAIM_EXPIRED); else the state machine's sweep (OFFLINE on silence,
    /// IDLE at the recovery time); else an agent OFFLINE for longer than
    /// `offline_retention` is deleted (cause EXPIRED). One transition per look.
    Sweep {
        agent_id: String,
        heartbeat_timeout: Duration,
        /// False during the start-up grace period.
        offline_allowed: bool,
        /// `--offline-agent-retention` (zero: agents are kept).
        offline_retention: Duration,
        /// Who asked: the transition's actor.
        actor: String,
    },
}

impl Command {
    /// The agent the command names; `None` for a claim, whose agent is chosen
    /// when the batch is decided.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            Command::Register { agent_id, .. }
            | Command::Apply { agent_id, .. }
            | Command::Resume { agent_id, .. }
            | Command::Cordon { agent_id, .. }
            | Command::Uncordon { agent_id, .. }
            | Command::RenewClaim { agent_id, .. }
            | Command::ReleaseClaim { agent_id, .. }
            | Command::Delete { agent_id, .. }
            | Command::ReportExhausted { agent_id, .. }
            | Command::PoolRelease { agent_id, .. }
            | Command::Sweep { agent_id, .. } => Some(agent_id),
            Command::Claim { .. } => None,
        }
    }

    pub fn actor(&self) -> &str {
        match self {
            Command::Register { actor, .. }
            | Command::Apply { actor, .. }
            | Command::Resume { actor, .. }
            | Command::Cordon { actor, .. }
            | Command::Uncordon { actor, .. }
            | Command::Claim { actor, .. }
            | Command::RenewClaim { actor, .. }
            | Command::ReleaseClaim { actor, .. }
            | Command::Delete { actor, .. }
            | Command::ReportExhausted { actor, .. }
            | Command::PoolRelease { actor, .. }
            | Command::Sweep { actor, .. } => actor,
        }
    }

    /// Whether it must be decided on the stored rows, never on a state this
    /// process remembers: a sweep reads the last heartbeat time, which moves
    /// without a transition (every replica flushes heartbeats); a pool's
    /// release reads its members' holds and the pool's schedule. (A claim may
    /// be decided on remembered candidates, which the store checks as it
    /// checks the agents a batch names; a claim they cannot serve is decided
    /// again on the stored rows: [`Plan::claim_unserved`].)
    pub fn needs_stored_rows(&self) -> bool {
        matches!(
            self,
            Command::Apply {
                event: Event::Sweep { .. },
                ..
            } | Command::Sweep { .. }
                | Command::PoolRelease { .. }
        )
    }

    /// The same command on behalf of `name`.
    pub fn by(mut self, name: &str) -> Command {
        match &mut self {
            Command::Register { actor, .. }
            | Command::Apply { actor, .. }
            | Command::Resume { actor, .. }
            | Command::Cordon { actor, .. }
            | Command::Uncordon { actor, .. }
            | Command::Claim { actor, .. }
            | Command::RenewClaim { actor, .. }
            | Command::ReleaseClaim { actor, .. }
            | Command::Delete { actor, .. }
            | Command::ReportExhausted { actor, .. }
            | Command::PoolRelease { actor, .. }
            | Command::Sweep { actor, .. } => {
                name.clone_into(actor);
            }
        }
        self
    }
}

/// Why one command of a batch was refused (the others are unaffected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("agent {0:?} not found")]
    UnknownAgent(String),
    #[error(transparent)]
    Transition(#[from] TransitionRefused),
    #[error(transparent)]
    StaleFencingToken(#[from] StaleFencingToken),
    #[error(transparent)]
    ClaimHeld(#[from] ClaimHeld),
    /// No claimable agent matches the claim's selector (the store counts
    /// why, outside the batch: [`dispatch::NoAgentAvailable`]).
    #[error("no agent available")]
    NoAgentAvailable,
    /// The agent is deleted by an earlier command of the same batch.
    #[error("agent {0:?} is being deleted; retry")]
    Deleting(String),
    /// A report named a quota pool the agent is not a member of.
    #[error(transparent)]
    NotPoolMember(#[from] NotPoolMember),
    /// `ResumeAgent` on an agent a quota pool holds: only the pool's
    /// release wakes it (`ReleasePool` to end the pool's windows now).
    #[error(
        "agent {agent_id:?} is held by quota pool {}; release the pool (ReleasePool) rather than the agent",
        pools.iter().map(|p| format!("{:?}", p.as_str())).collect::<Vec<_>>().join(", ")
    )]
    HeldByPool {
        agent_id: String,
        pools: Vec<PoolName>,
    },
    /// An operator's pool call named a pool no agent is a member of and
    /// none was ever parked.
    #[error("quota pool {0:?} not found: no agent is a member of it")]
    UnknownPool(String),
}

/// What one command did: the agent as that command left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub agent: Agent,
    pub transition: Option<Transition>,
    pub created: bool,
    /// For a claim command: the claim made (or made before, for a repeated
    /// idempotency key); for a renewal: the claim renewed.
    pub claim: Option<Claim>,
    /// Other agents the command changed (a report parking its pool's
    /// members), as the batch left them.
    pub others: Vec<Agent>,
    /// Their transitions, in revision order.
    pub other_transitions: Vec<Transition>,
}

/// The rows a batch with claims is decided on besides the agents it names
/// (see [`plan_with`]).
#[derive(Debug, Clone, Default)]
pub struct ClaimRows {
    /// Claimable agents (IDLE, schedulable) the claims' selectors match, as
    /// locked by the store for this batch: for the `n`-th claim of the
    /// batch, at least the `n` idle longest of its selector that no other
    /// transaction holds.
    pub candidates: Vec<Agent>,
    /// Claims made before under the batch's idempotency keys, each with its
    /// agent as stored now (`None`: deleted since).
    pub made: Vec<(Claim, Option<Agent>)>,
}

/// One command's outcome while planning: the revisions of its agent and of
/// its claim may be relative to the batch.
#[derive(Debug, Clone)]
struct Outcome {
    applied: Applied,
    /// The agent's revision is relative (it had a transition in the batch).
    relative_revision: bool,
    /// The claim's fencing token is relative (the claim was made in the batch).
    relative_claim: bool,
    /// Other agents it changed, and the indexes of their transitions.
    others: BTreeSet<String>,
    other_transitions: Vec<usize>,
}

/// The decisions of a batch, with revisions still relative to the batch (1..n).
#[derive(Debug, Clone)]
pub struct Plan {
    outcomes: Vec<Result<Outcome, Refusal>>,
    agents: BTreeMap<String, Agent>,
    created: BTreeSet<String>,
    changed: BTreeSet<String>,
    deleted: BTreeSet<String>,
    /// Agents whose final `revision` is relative to this batch.
    renumbered: BTreeSet<String>,
    /// Agents whose final claim was made in this batch (relative token).
    claimed: BTreeSet<String>,
    transitions: Vec<Transition>,
    /// The claims made in this batch, relative tokens, in order.
    claims: Vec<Claim>,
    /// The quota pools as the batch leaves them, and which it changed.
    pools: BTreeMap<PoolName, PoolState>,
    pools_changed: BTreeSet<PoolName>,
    /// Each agent's status and labels as the batch found it.
    before: BTreeMap<String, (AgentStatus, Labels)>,
}

/// What the store writes for a batch, revisions final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writes {
    /// New agents (final state), in agent-id order.
    pub created: Vec<Agent>,
    /// Every agent whose row changed, new ones included (final state), in agent-id order.
    pub changed: Vec<Agent>,
    /// Agents whose rows are removed, in agent-id order (none of them in `changed`).
    pub deleted: Vec<String>,
    /// The transitions to append, in revision order.
    pub transitions: Vec<Transition>,
    /// The claims made (recorded with their idempotency keys), in order.
    pub claims: Vec<Claim>,
    /// The quota pools whose state changed, in name order.
    pub pools: Vec<(PoolName, PoolState)>,
    /// How the brakes' census changes (`brakes::census_changes`), which a
    /// store that keeps it writes with the rest.
    pub census: Vec<crate::domain::brakes::CensusChange>,
}

/// Which values of [`Plan::relative_writes`] are relative to the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shifts {
    /// Per changed agent: its `revision` is relative.
    pub revision: Vec<bool>,
    /// Per changed agent: its claim's fencing token is relative.
    pub claim: Vec<bool>,
}

impl Plan {
    /// How many revisions the batch needs.
    pub fn transition_count(&self) -> usize {
        self.transitions.len()
    }

    /// Whether a claim found no agent: when decided on rows from memory, the
    /// store decides again on the stored ones before refusing.
    pub fn claim_unserved(&self) -> bool {
        self.outcomes
            .iter()
            .any(|o| matches!(o, Err(Refusal::NoAgentAvailable)))
    }

    /// New agents' ids, in order: the store inserts these rows before the rest.
    pub fn created_ids(&self) -> impl Iterator<Item = &str> {
        self.created.iter().map(String::as_str)
    }

    fn changed_pools(&self) -> Vec<(PoolName, PoolState)> {
        self.pools_changed
            .iter()
            .filter_map(|name| Some((name.clone(), self.pools.get(name)?.clone())))
            .collect()
    }

    /// How the batch changes the brakes' census: each changed or deleted
    /// agent from its stored status and labels to its final ones.
    fn census(&self) -> Vec<crate::domain::brakes::CensusChange> {
        let stored = |id: &String| self.before.get(id).map(|(s, l)| (*s, l));
        let changed = self.changed.iter().map(|id| {
            let after = self.agents.get(id).map(|a| (a.state.status, &a.labels));
            (stored(id), after)
        });
        let deleted = self.deleted.iter().map(|id| (stored(id), None));
        crate::domain::brakes::census_changes(changed.chain(deleted))
    }

    fn pick(&self, ids: &BTreeSet<String>) -> Vec<Agent> {
        ids.iter()
            .filter_map(|id| self.agents.get(id).cloned())
            .collect()
    }

    /// What to write with revisions still relative to the batch, for a store that
    /// allocates the revisions in the same statement as the writes: for each
    /// changed agent, whether its `revision` and its claim's token are
    /// relative (to be shifted by the base the store allocates) or an earlier
    /// batch's, kept as is. The claims' tokens are all relative.
    pub fn relative_writes(&self) -> (Writes, Shifts) {
        let changed = self.pick(&self.changed);
        let shifts = Shifts {
            revision: changed
                .iter()
                .map(|a| self.renumbered.contains(&a.agent_id))
                .collect(),
            claim: changed
                .iter()
                .map(|a| self.claimed.contains(&a.agent_id))
                .collect(),
        };
        let writes = Writes {
            created: self.pick(&self.created),
            changed,
            deleted: self.deleted.iter().cloned().collect(),
            transitions: self.transitions.clone(),
            claims: self.claims.clone(),
            pools: self.changed_pools(),
            census: self.census(),
        };
        (writes, shifts)
    }

    /// Shifts the batch's revisions by `base` (the head revision before the batch)
    /// and returns what to write and each command's outcome.
    pub fn finish(self, base: i64) -> (Writes, Vec<Result<Applied, Refusal>>) {
        let pools = self.changed_pools();
        let census = self.census();
        let mut agents = self.agents;
        for id in &self.renumbered {
            if let Some(agent) = agents.get_mut(id) {
                agent.revision += base;
            }
        }
        for id in &self.claimed {
            if let Some(claim) = agents.get_mut(id).and_then(|a| a.claim.as_mut()) {
                claim.fencing_token += base;
            }
        }
        let pick = |ids: &BTreeSet<String>| -> Vec<Agent> {
            ids.iter()
                .filter_map(|id| agents.get(id).cloned())
                .collect()
        };
        let transitions: Vec<Transition> = self
            .transitions
            .into_iter()
            .map(|mut t| {
                t.revision += base;
                t
            })
            .collect();
        let outcomes = self
            .outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map(|o| {
                    let mut applied = o.applied;
                    if o.relative_revision {
                        applied.agent.revision += base;
                    }
                    if let Some(t) = applied.transition.as_mut() {
                        t.revision += base;
                    }
                    if o.relative_claim {
                        if let Some(c) = applied.claim.as_mut() {
                            c.fencing_token += base;
                        }
                        if let Some(c) = applied.agent.claim.as_mut() {
                            c.fencing_token += base;
                        }
                    }
                    applied.others = pick(&o.others);
                    applied.other_transitions = o
                        .other_transitions
                        .iter()
                        .filter_map(|i| transitions.get(*i).cloned())
                        .collect();
                    applied
                })
            })
            .collect();
        let writes = Writes {
            created: pick(&self.created),
            changed: pick(&self.changed),
            deleted: self.deleted.into_iter().collect(),
            transitions,
            claims: self
                .claims
                .into_iter()
                .map(|mut c| {
                    c.fencing_token += base;
                    c
                })
                .collect(),
            pools,
            census,
        };
        (writes, outcomes)
    }
}

/// The agents `commands` name, each once, in agent-id order (the order a
/// store locks their rows in, so that two batches cannot deadlock).
pub fn agent_ids(commands: &[Command]) -> Vec<&str> {
    let mut ids: Vec<&str> = commands.iter().filter_map(Command::agent_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The claims of `commands`, in order: each one's request.
pub fn claim_requests(commands: &[Command]) -> impl Iterator<Item = (&ClaimRequest, &str)> {
    commands.iter().filter_map(|c| match c {
        Command::Claim { request, actor, .. } => Some((request, actor.as_str())),
        _ => None,
    })
}

/// How many claimable agents a batch's claims may need per distinct selector
/// (the batch's candidates, read from the store or taken from memory): as
/// many as claims of the batch up to its last claim with that selector, since
/// each earlier claim, whatever its selector, may take one of them. Claims
/// `replayed` (an idempotency key already used) take none.
pub fn claim_limits(
    commands: &[Command],
    replayed: impl Fn(&ClaimRequest, &str) -> bool,
) -> Vec<(&LabelSelector, usize)> {
    let mut limits: Vec<(&LabelSelector, usize)> = Vec::new();
    for (n, (request, holder)) in claim_requests(commands).enumerate() {
        if replayed(request, holder) {
            continue;
        }
        match limits.iter_mut().find(|(s, _)| **s == request.selector) {
            Some((_, l)) => *l = n + 1,
            None => limits.push((&request.selector, n + 1)),
        }
    }
    limits
}

/// [`plan_with`] for a batch without claims.
pub fn plan(existing: Vec<Agent>, commands: &[Command], now: DateTime<Utc>) -> Plan {
    plan_with(existing, ClaimRows::default(), commands, now)
}

/// [`plan_full`] for a batch that touches no quota pool.
pub fn plan_with(
    existing: Vec<Agent>,
    rows: ClaimRows,
    commands: &[Command],
    now: DateTime<Utc>,
) -> Plan {
    plan_full(existing, rows, PoolRows::default(), commands, now)
}

/// Decides `commands` in order against `existing` (every agent the batch names
/// that exists, as locked by the store), for its claims `rows`, and for the
/// quota pools of its agents `pools` ([`PoolRows`]), at server time `now`.
pub fn plan_full(
    existing: Vec<Agent>,
    rows: ClaimRows,
    pools: PoolRows,
    commands: &[Command],
    now: DateTime<Utc>,
) -> Plan {
    let mut p = Planner::new(existing, rows.made, pools, now);
    // Candidates the batch also names are already there, as locked.
    for agent in rows.candidates {
        p.agents.entry(agent.agent_id.clone()).or_insert(agent);
    }
    p.before = found(&p.agents);
    let outcomes = commands.iter().map(|c| p.decide(c)).collect();
    p.into_plan(outcomes)
}

/// The status and labels of the agents a batch found.
fn found(agents: &BTreeMap<String, Agent>) -> BTreeMap<String, (AgentStatus, Labels)> {
    agents
        .iter()
        .map(|(id, a)| (id.clone(), (a.state.status, a.labels.clone())))
        .collect()
}

impl Planner {
    fn new(
        existing: Vec<Agent>,
        made: Vec<(Claim, Option<Agent>)>,
        pools: PoolRows,
        now: DateTime<Utc>,
    ) -> Planner {
        let mut agents: BTreeMap<String, Agent> = existing
            .into_iter()
            .map(|a| (a.agent_id.clone(), a))
            .collect();
        // Pool members the batch also names are already there, as locked.
        for agent in pools.members {
            agents.entry(agent.agent_id.clone()).or_insert(agent);
        }
        Planner {
            before: found(&agents),
            agents,
            created: BTreeSet::new(),
            changed: BTreeSet::new(),
            deleted: BTreeSet::new(),
            renumbered: BTreeSet::new(),
            claimed: BTreeSet::new(),
            transitions: Vec::new(),
            claims: Vec::new(),
            made,
            pools: pools.states,
            pools_changed: BTreeSet::new(),
            now,
        }
    }

    fn into_plan(self, outcomes: Vec<Result<Outcome, Refusal>>) -> Plan {
        Plan {
            outcomes,
            agents: self.agents,
            created: self.created,
            changed: self.changed,
            deleted: self.deleted,
            renumbered: self.renumbered,
            claimed: self.claimed,
            transitions: self.transitions,
            claims: self.claims,
            pools: self.pools,
            pools_changed: self.pools_changed,
            before: self.before,
        }
    }
}

/// The state of a batch being decided.
struct Planner {
    agents: BTreeMap<String, Agent>,
    created: BTreeSet<String>,
    changed: BTreeSet<String>,
    deleted: BTreeSet<String>,
    renumbered: BTreeSet<String>,
    claimed: BTreeSet<String>,
    transitions: Vec<Transition>,
    claims: Vec<Claim>,
    made: Vec<(Claim, Option<Agent>)>,
    pools: BTreeMap<PoolName, PoolState>,
    pools_changed: BTreeSet<PoolName>,
    /// Each agent's status and labels as the batch found it.
    before: BTreeMap<String, (AgentStatus, Labels)>,
    now: DateTime<Utc>,
}

impl Planner {
    fn decide(&mut self, command: &Command) -> Result<Outcome, Refusal> {
        let now = self.now;
        let actor = command.actor();
        let agent_id = match command {
            Command::Claim {
                unique, request, ..
            } => return self.claim(unique, request, actor),
            Command::Register {
                agent_id,
                labels,
                quota_pools,
                ..
            } => {
                return self.register(agent_id, labels, quota_pools, actor);
            }
            _ => command.agent_id().unwrap_or_default(),
        };
        if self.deleted.contains(agent_id) {
            return Err(Refusal::UnknownAgent(agent_id.to_owned()));
        }
        let Some(agent) = self.agents.get(agent_id) else {
            return Err(Refusal::UnknownAgent(agent_id.to_owned()));
        };
        match command {
            Command::Apply {
                event,
                fencing_token,
                ..
            } => {
                if let Event::ReportExhausted(report) = event {
                    return self.report(agent_id, report, None, None, *fencing_token, actor);
                }
                if matches!(event, Event::FinishWork) {
                    dispatch::check_fencing(agent_id, agent.claim.as_ref(), *fencing_token, now)?;
                }
                let decision = agent::decide(&agent.state, &agent.labels, event.clone(), now)?;
                Ok(self.arrive(agent_id, decision, actor))
            }
            Command::ReportExhausted {
                report,
                quota_pool,
                window,
                fencing_token,
                ..
            } => self.report(
                agent_id,
                report,
                quota_pool.as_ref(),
                *window,
                *fencing_token,
                actor,
            ),
            Command::PoolRelease { pool, .. } => Ok(self.pool_release(agent_id, pool, actor)),
            Command::Resume { .. } => {
                if agent.pool_holds.is_held() {
                    return Err(Refusal::HeldByPool {
                        agent_id: agent_id.to_owned(),
                        pools: agent.pool_holds.holding().cloned().collect(),
                    });
                }
                let resumed = dispatch::resume_decision(&agent.state)?;
                Ok(self.apply(agent_id, dispatched(resumed), actor))
            }
            Command::Cordon { .. } | Command::Uncordon { .. } => {
                let reason = match command {
                    Command::Cordon { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                let Some(cause) =
                    dispatch::cordon_decision(agent.cordon_reason.as_deref(), reason.is_some())
                else {
                    return Ok(self.unchanged(agent_id));
                };
                let agent = self.agent_mut(agent_id);
                agent.cordon_reason = reason;
                Ok(self.record_in_place(agent_id, cause, actor))
            }
            Command::RenewClaim {
                claim_id,
                fencing_token,
                lease,
                ..
            } => {
                let active = agent.claim.as_ref();
                dispatch::check_claim_call(agent_id, active, claim_id, *fencing_token, now)?;
                let renewed = active
                    .map(|c| dispatch::renew(c, *lease, now))
                    .transpose()?;
                let relative_claim = self.claimed.contains(agent_id);
                let agent = self.agent_mut(agent_id);
                agent.claim = renewed.clone();
                self.changed.insert(agent_id.to_owned());
                let mut outcome = self.unchanged(agent_id);
                outcome.applied.claim = renewed;
                outcome.relative_claim = relative_claim;
                Ok(outcome)
            }
            Command::ReleaseClaim {
                claim_id,
                fencing_token,
                ..
            } => {
                let active = agent.claim.as_ref();
                dispatch::check_claim_call(agent_id, active, claim_id, *fencing_token, now)?;
                let decision = dispatch::claim_end_decision(
                    &agent.state,
                    &agent.labels,
                    ClaimEnd::Released,
                    now,
                )?;
                Ok(self.arrive(agent_id, dispatched(decision), actor))
            }
            Command::Delete { .. } => {
                dispatch::check_delete(agent.claim.as_ref(), now)?;
                Ok(self.delete(agent_id, Cause::Deleted, actor))
            }
            Command::Sweep {
                heartbeat_timeout,
                offline_allowed,
                offline_retention,
                ..
            } => {
                if agent
                    .claim
                    .as_ref()
                    .is_some_and(|c| dispatch::lease_expired(c, now))
                {
                    let decision = dispatch::claim_end_decision(
                        &agent.state,
                        &agent.labels,
                        ClaimEnd::Expired,
                        now,
                    )?;
                    return Ok(self.arrive(agent_id, dispatched(decision), actor));
                }
                let event = Event::Sweep {
                    heartbeat_timeout: *heartbeat_timeout,
                    offline_allowed: *offline_allowed,
                };
                let decision = agent::decide(&agent.state, &agent.labels, event, now)?;
                if decision.change.is_none()
                    && dispatch::offline_expired(agent, *offline_retention, now)
                {
                    return Ok(self.delete(agent_id, Cause::Expired, actor));
                }
                // A pool lets go of its members only through its release.
                if !self.member_wakes(agent_id)
                    && decision.change.is_some_and(|c| c.cause == Cause::Recovered)
                {
                    return Ok(self.unchanged(agent_id));
                }
                Ok(self.arrive(agent_id, decision, actor))
            }
            Command::Claim { .. } | Command::Register { .. } => {
                unreachable!("decided above")
            }
        }
    }

    fn agent_mut(&mut self, agent_id: &str) -> &mut Agent {
        self.agents
            .get_mut(agent_id)
            .expect("the agent was looked up before")
    }

    fn register(
        &mut self,
        agent_id: &str,
        labels: &Labels,
        quota_pools: &[PoolName],
        actor: &str,
    ) -> Result<Outcome, Refusal> {
        if self.deleted.contains(agent_id) {
            return Err(Refusal::Deleting(agent_id.to_owned()));
        }
        if let Some(agent) = self.agents.get_mut(agent_id) {
            let mut left = Vec::new();
            if agent.labels != *labels || agent.quota_pools != quota_pools {
                left = agent
                    .pool_holds
                    .holding()
                    .filter(|p| !quota_pools.contains(p))
                    .cloned()
                    .collect();
                agent.labels = labels.clone();
                agent.quota_pools = quota_pools.to_vec();
                self.changed.insert(agent_id.to_owned());
            }
            // A pool it left lets go of it (its hold is the only thing
            // that still names the pool).
            let released: Vec<usize> = left
                .iter()
                .filter_map(|pool| self.release_member(agent_id, pool, actor))
                .collect();
            let agent = &self.agents[agent_id];
            let decision = agent::decide(&agent.state, &agent.labels, Event::Heartbeat, self.now)?;
            let mut outcome = self.arrive(agent_id, decision, actor);
            outcome.other_transitions.extend(released);
            return Ok(outcome);
        }
        let now = self.now;
        let (state, _) = agent::registered(now);
        let mut agent = Agent {
            agent_id: agent_id.to_owned(),
            labels: labels.clone(),
            registered_at: now,
            last_transition_at: now,
            revision: 0,
            state,
            cordon_reason: None,
            claim: None,
            quota_pools: quota_pools.to_vec(),
            pool_holds: Default::default(),
        };
        self.created.insert(agent_id.to_owned());
        self.changed.insert(agent_id.to_owned());
        self.renumbered.insert(agent_id.to_owned());
        let transition = push_transition(&mut self.transitions, &mut agent, None, actor, now);
        let idle = agent.state.clone();
        self.agents.insert(agent_id.to_owned(), agent.clone());
        // Registering into a parked pool parks it at once (after its
        // REGISTERED transition, in the same commit).
        let parked = self.arrive(
            agent_id,
            Decision {
                state: idle,
                change: None,
            },
            actor,
        );
        Ok(Outcome {
            applied: Applied {
                agent: parked.applied.agent,
                transition: Some(transition),
                created: true,
                claim: None,
                others: Vec::new(),
                other_transitions: Vec::new(),
            },
            relative_revision: true,
            relative_claim: false,
            others: BTreeSet::new(),
            other_transitions: parked
                .applied
                .transition
                .map(|t| vec![t.revision as usize - 1])
                .unwrap_or_default(),
        })
    }

    /// Writes `decision` to the agent (ending its claim when it leaves its
    /// slot) and records its transition, if any.
    fn apply(&mut self, agent_id: &str, decision: Decision, actor: &str) -> Outcome {
        let now = self.now;
        let agent = self
            .agents
            .get_mut(agent_id)
            .expect("the agent was looked up before");
        if decision.state != agent.state {
            self.changed.insert(agent_id.to_owned());
        }
        agent.state = decision.state;
        let transition = decision.change.map(|change| {
            if dispatch::ends_claim(change.from, change.to) && agent.claim.take().is_some() {
                self.claimed.remove(agent_id);
            }
            self.changed.insert(agent_id.to_owned());
            self.renumbered.insert(agent_id.to_owned());
            push_transition(&mut self.transitions, agent, Some(change), actor, now)
        });
        let mut outcome = self.unchanged(agent_id);
        outcome.applied.transition = transition;
        outcome
    }

    /// A transition that keeps the status (cordon, uncordon): from == to, and
    /// the time the status last changed stays (the longest-idle choice and
    /// offline expiry read it).
    fn record_in_place(&mut self, agent_id: &str, cause: Cause, actor: &str) -> Outcome {
        let now = self.now;
        let agent = self
            .agents
            .get_mut(agent_id)
            .expect("the agent was looked up before");
        let status = agent.state.status;
        let change = StatusChange {
            from: status,
            to: status,
            cause,
        };
        let since = agent.last_transition_at;
        let transition = push_transition(&mut self.transitions, agent, Some(change), actor, now);
        agent.last_transition_at = since;
        self.changed.insert(agent_id.to_owned());
        self.renumbered.insert(agent_id.to_owned());
        let mut outcome = self.unchanged(agent_id);
        outcome.applied.transition = Some(transition);
        outcome
    }

    /// The agent's last transition (from == to, `cause`), and its row removed.
    fn delete(&mut self, agent_id: &str, cause: Cause, actor: &str) -> Outcome {
        let mut outcome = self.record_in_place(agent_id, cause, actor);
        outcome.applied.agent.claim = None;
        self.agents.remove(agent_id);
        self.changed.remove(agent_id);
        self.created.remove(agent_id);
        self.renumbered.remove(agent_id);
        self.claimed.remove(agent_id);
        self.deleted.insert(agent_id.to_owned());
        outcome
    }

    /// The agent as it stands, for the command's caller.
    fn unchanged(&self, agent_id: &str) -> Outcome {
        let agent = self.agents[agent_id].clone();
        Outcome {
            relative_revision: self.renumbered.contains(agent_id),
            relative_claim: self.claimed.contains(agent_id),
            applied: Applied {
                agent,
                transition: None,
                created: false,
                claim: None,
                others: Vec::new(),
                other_transitions: Vec::new(),
            },
            others: BTreeSet::new(),
            other_transitions: Vec::new(),
        }
    }

    fn claim(
        &mut self,
        unique: &str,
        request: &ClaimRequest,
        holder: &str,
    ) -> Result<Outcome, Refusal> {
        let now = self.now;
        if let Some(key) = request.idempotency_key(holder) {
            let same = |c: &Claim| c.holder == key.holder && c.request_id == key.request_id;
            // Made earlier in this batch: the agent is this batch's.
            if let Some(made) = self.claims.iter().find(|c| same(c)).cloned() {
                let mut outcome = self.unchanged(&made.agent_id);
                outcome.applied.claim = Some(current(made, &outcome.applied.agent));
                outcome.relative_claim = true;
                return Ok(outcome);
            }
            if let Some((made, agent)) = self.made.iter().find(|(c, _)| same(c)).cloned() {
                // The agent as this batch sees it if it holds it, else as read.
                let agent = match self.agents.get(&made.agent_id) {
                    Some(locked) => Some(locked.clone()),
                    None if self.deleted.contains(&made.agent_id) => None,
                    None => agent,
                };
                let agent = agent.ok_or_else(|| Refusal::UnknownAgent(made.agent_id.clone()))?;
                let relative_revision = self.renumbered.contains(&made.agent_id);
                let relative_claim = self.claimed.contains(&made.agent_id);
                return Ok(Outcome {
                    applied: Applied {
                        claim: Some(current(made, &agent)),
                        agent,
                        transition: None,
                        created: false,
                        others: Vec::new(),
                        other_transitions: Vec::new(),
                    },
                    relative_revision,
                    relative_claim,
                    others: BTreeSet::new(),
                    other_transitions: Vec::new(),
                });
            }
        }
        let candidates: Vec<dispatch::Candidate<'_>> = self
            .agents
            .values()
            .map(|agent| dispatch::Candidate {
                agent,
                cordoned: agent.cordon_reason.is_some(),
            })
            .collect();
        let chosen = dispatch::choose(&request.selector, &candidates)
            .map_err(|_| Refusal::NoAgentAvailable)?
            .agent_id
            .clone();
        let agent = &self.agents[&chosen];
        let decision =
            dispatch::claim_decision(&agent.state, &agent.labels, request.slot_type, now)?;
        let mut outcome = self.apply(&chosen, dispatched(decision), holder);
        let revision = outcome
            .applied
            .transition
            .as_ref()
            .map_or(0, |t| t.revision);
        let claim = dispatch::new_claim(
            dispatch::claim_id(&chosen, unique),
            &chosen,
            revision,
            request,
            holder.to_owned(),
            now,
        );
        self.agent_mut(&chosen).claim = Some(claim.clone());
        self.claimed.insert(chosen.clone());
        self.claims.push(claim.clone());
        outcome.applied.agent.claim = Some(claim.clone());
        outcome.applied.claim = Some(claim);
        outcome.relative_claim = true;
        Ok(outcome)
    }
}

/// A claim made before, as it stands on `agent` now: with its current lease
/// while it is the agent's active claim, else as it was made (it has ended).
fn current(made: Claim, agent: &Agent) -> Claim {
    match &agent.claim {
        Some(active) if active.claim_id == made.claim_id => active.clone(),
        _ => made,
    }
}

/// A dispatch decision as the state machine's.
fn dispatched(decision: dispatch::DispatchDecision) -> Decision {
    Decision {
        state: decision.state,
        change: Some(StatusChange {
            from: decision.from,
            to: decision.to,
            cause: decision.cause,
        }),
    }
}

/// Appends the transition `change` makes (a registration when `None`) with the
/// next batch-relative revision, and moves the agent's revision to it.
fn push_transition(
    transitions: &mut Vec<Transition>,
    agent: &mut Agent,
    change: Option<StatusChange>,
    actor: &str,
    now: DateTime<Utc>,
) -> Transition {
    let revision = transitions.len() as i64 + 1;
    let to = agent.state.status;
    let exhaustion = agent
        .state
        .exhaustion
        .as_ref()
        .filter(|_| to == AgentStatus::Exhausted);
    let transition = Transition {
        revision,
        agent_id: agent.agent_id.clone(),
        from: change.map(|c| c.from),
        to,
        cause: change.map_or(Cause::Registered, |c| c.cause),
        occurred_at: now,
        exhaustion_reason: exhaustion.map(|e| e.reason),
        recovery_at: exhaustion.map(|e| e.recovery.recovery_at),
        actor: actor.to_owned(),
        quota_pool: None,
    };
    agent.revision = revision;
    agent.last_transition_at = now;
    transitions.push(transition.clone());
    transition
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{AgentState, SlotType};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
    }

    fn existing(id: &str, status: AgentStatus, revision: i64) -> Agent {
        let at = now() - Duration::minutes(1);
        Agent {
            agent_id: id.into(),
            labels: Labels::new(),
            quota_pools: Vec::new(),
            pool_holds: Default::default(),
            registered_at: at,
            last_transition_at: at,
            revision,
            state: AgentState {
                status,
                last_heartbeat_at: at,
                exhaustion: None,
            },
            cordon_reason: None,
            claim: None,
        }
    }

    fn apply(id: &str, event: Event) -> Command {
        Command::Apply {
            agent_id: id.into(),
            event,
            fencing_token: None,
            actor: "tester".into(),
        }
    }

    fn register(id: &str, team: &str) -> Command {
        Command::Register {
            agent_id: id.into(),
            labels: [("team".to_string(), team.to_string())].into(),
            quota_pools: Vec::new(),
            actor: String::new(),
        }
        .by("registrar")
    }

    #[test]
    fn two_start_work_calls_on_one_idle_agent_give_one_winner() {
        let commands = [
            apply("a", Event::StartWork(SlotType::Work)),
            apply("a", Event::StartWork(SlotType::OnCall)),
        ];
        let plan = plan(vec![existing("a", AgentStatus::Idle, 7)], &commands, now());
        assert_eq!(plan.transition_count(), 1);
        let (relative, shift) = plan.relative_writes();
        assert_eq!(relative.transitions[0].revision, 1);
        assert_eq!(shift.revision, [true]);
        let (writes, outcomes) = plan.finish(40);
        let won = outcomes[0].as_ref().expect("first call wins");
        assert_eq!(won.agent.state.status, AgentStatus::Busy);
        assert_eq!(won.transition.as_ref().map(|t| t.revision), Some(41));
        assert_eq!(won.agent.revision, 41);
        match &outcomes[1] {
            Err(Refusal::Transition(refused)) => assert_eq!(refused.current, AgentStatus::Busy),
            other => panic!("second call must be refused, got {other:?}"),
        }
        assert_eq!(writes.transitions.len(), 1);
        assert_eq!(writes.changed.len(), 1);
        assert_eq!(writes.changed[0].revision, 41);
    }

    #[test]
    fn a_refused_or_unknown_command_refuses_only_itself() {
        let commands = [
            apply("a", Event::FinishWork),
            apply("ghost", Event::Heartbeat),
            apply("b", Event::StartWork(SlotType::Work)),
        ];
        let agents = vec![
            existing("a", AgentStatus::Idle, 1),
            existing("b", AgentStatus::Idle, 2),
        ];
        let (writes, outcomes) = plan(agents, &commands, now()).finish(10);
        assert!(matches!(outcomes[0], Err(Refusal::Transition(_))));
        assert_eq!(outcomes[1], Err(Refusal::UnknownAgent("ghost".into())));
        let b = outcomes[2].as_ref().unwrap();
        assert_eq!(b.transition.as_ref().unwrap().revision, 11);
        assert_eq!(b.transition.as_ref().unwrap().actor, "tester");
        assert_eq!(
            writes
                .changed
                .iter()
                .map(|a| a.agent_id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
    }

    #[test]
    fn revisions_follow_arrival_order_and_each_caller_sees_its_own_step() {
        let commands = [
            apply("b", Event::StartWork(SlotType::Work)),
            apply("a", Event::StartWork(SlotType::Work)),
            apply("b", Event::FinishWork),
        ];
        let agents = vec![
            existing("a", AgentStatus::Idle, 3),
            existing("b", AgentStatus::Idle, 4),
        ];
        let (writes, outcomes) = plan(agents, &commands, now()).finish(100);
        let revisions: Vec<i64> = writes.transitions.iter().map(|t| t.revision).collect();
        assert_eq!(revisions, [101, 102, 103]);
        let first = outcomes[0].as_ref().unwrap();
        assert_eq!(first.agent.state.status, AgentStatus::Busy);
        assert_eq!(first.agent.revision, 101);
        let last = outcomes[2].as_ref().unwrap();
        assert_eq!(last.agent.state.status, AgentStatus::Idle);
        assert_eq!(last.agent.revision, 103);
        // The row written is the final state.
        let b = writes.changed.iter().find(|a| a.agent_id == "b").unwrap();
        assert_eq!((b.state.status, b.revision), (AgentStatus::Idle, 103));
    }

    #[test]
    fn registration_creates_once_and_a_repeat_in_the_same_batch_is_a_heartbeat() {
        let commands = [register("n", "infra"), register("n", "ops")];
        let plan = plan(vec![], &commands, now());
        assert_eq!(plan.created_ids().collect::<Vec<_>>(), ["n"]);
        let (writes, outcomes) = plan.finish(0);
        let first = outcomes[0].as_ref().unwrap();
        assert!(first.created);
        let t = first.transition.as_ref().unwrap();
        assert_eq!(
            (t.from, t.to, t.cause),
            (None, AgentStatus::Idle, Cause::Registered)
        );
        assert_eq!(t.revision, 1);
        assert_eq!(t.actor, "registrar");
        let second = outcomes[1].as_ref().unwrap();
        assert!(!second.created);
        assert_eq!(second.transition, None);
        assert_eq!(second.agent.labels["team"], "ops");
        assert_eq!(second.agent.revision, 1);
        assert_eq!(writes.created.len(), 1);
        assert_eq!(writes.created[0].labels["team"], "ops");
    }

    #[test]
    fn re_registering_an_existing_agent_replaces_labels_without_a_transition() {
        let plan = plan(
            vec![existing("a", AgentStatus::Busy, 9)],
            &[register("a", "infra")],
            now(),
        );
        assert_eq!(plan.transition_count(), 0);
        let (relative, shift) = plan.relative_writes();
        assert_eq!(
            (relative.changed[0].revision, shift.revision),
            (9, vec![false])
        );
        let (writes, outcomes) = plan.finish(50);
        let a = outcomes[0].as_ref().unwrap();
        assert_eq!(a.agent.revision, 9, "no transition: the revision stays");
        assert_eq!(a.agent.state.status, AgentStatus::Busy);
        assert_eq!(a.agent.state.last_heartbeat_at, now());
        assert_eq!(writes.changed[0].labels["team"], "infra");
    }

    fn resume(id: &str) -> Command {
        Command::Resume {
            agent_id: id.into(),
            actor: "op".into(),
        }
    }

    #[test]
    fn resume_moves_an_exhausted_agent_to_idle_and_refuses_any_other_status() {
        let mut parked = existing("a", AgentStatus::Exhausted, 3);
        parked.state.exhaustion = Some(agent::Exhaustion {
            reason: agent::ExhaustionReason::RateLimit,
            recovery: crate::domain::recovery::RecoveryEstimate {
                recovery_at: now() + Duration::hours(1),
                source: crate::domain::recovery::RecoverySource::Explicit,
                hint: "explicit".into(),
            },
        });
        let plan = plan(
            vec![parked, existing("b", AgentStatus::Busy, 4)],
            &[resume("a"), resume("a"), resume("b"), resume("ghost")],
            now(),
        );
        let (writes, outcomes) = plan.finish(10);
        let done = outcomes[0].as_ref().unwrap();
        let t = done.transition.as_ref().unwrap();
        assert_eq!(
            (t.from, t.to, t.cause, t.actor.as_str(), t.revision),
            (
                Some(AgentStatus::Exhausted),
                AgentStatus::Idle,
                Cause::Resumed,
                "op",
                11
            )
        );
        assert_eq!(done.agent.state.exhaustion, None);
        // The second, decided on the state the first left: refused, naming IDLE.
        let again = outcomes[1].as_ref().unwrap_err();
        assert_eq!(
            again.to_string(),
            "cannot resume: agent is IDLE, must be EXHAUSTED"
        );
        let busy = outcomes[2].as_ref().unwrap_err();
        assert_eq!(
            busy.to_string(),
            "cannot resume: agent is BUSY, must be EXHAUSTED"
        );
        assert_eq!(outcomes[3], Err(Refusal::UnknownAgent("ghost".into())));
        assert_eq!(writes.transitions.len(), 1);
        assert_eq!(writes.changed.len(), 1);
    }

    #[test]
    fn cordon_keeps_the_status_and_records_a_transition_from_it_to_it() {
        let cordon = |id: &str, reason: &str| Command::Cordon {
            agent_id: id.into(),
            reason: reason.into(),
            actor: "op".into(),
        };
        let uncordon = |id: &str| Command::Uncordon {
            agent_id: id.into(),
            actor: "op".into(),
        };
        let busy = existing("a", AgentStatus::Busy, 3);
        let since = busy.last_transition_at;
        let plan = plan(
            vec![busy, existing("b", AgentStatus::Idle, 4)],
            &[
                cordon("a", "disk"),
                cordon("a", "other"),
                uncordon("b"),
                cordon("ghost", ""),
                uncordon("a"),
            ],
            now(),
        );
        let (writes, outcomes) = plan.finish(10);
        let first = outcomes[0].as_ref().unwrap();
        let t = first.transition.as_ref().unwrap();
        assert_eq!(
            (t.from, t.to, t.cause, t.revision),
            (
                Some(AgentStatus::Busy),
                AgentStatus::Busy,
                Cause::Cordoned,
                11
            )
        );
        assert_eq!(first.agent.cordon_reason.as_deref(), Some("disk"));
        assert_eq!(first.agent.state.status, AgentStatus::Busy);
        assert_eq!(first.agent.last_transition_at, since);
        assert_eq!(first.agent.revision, 11);
        // Cordoned again: as is, first reason kept, no transition.
        let again = outcomes[1].as_ref().unwrap();
        assert_eq!(again.transition, None);
        assert_eq!(again.agent.cordon_reason.as_deref(), Some("disk"));
        // A schedulable agent uncordoned: nothing.
        let b = outcomes[2].as_ref().unwrap();
        assert_eq!((b.transition.as_ref(), b.agent.revision), (None, 4));
        assert_eq!(outcomes[3], Err(Refusal::UnknownAgent("ghost".into())));
        let back = outcomes[4].as_ref().unwrap();
        let t = back.transition.as_ref().unwrap();
        assert_eq!((t.cause, t.revision), (Cause::Uncordoned, 12));
        assert_eq!(back.agent.cordon_reason, None);
        assert_eq!(writes.transitions.len(), 2);
        assert_eq!(writes.changed.len(), 1);
    }

    #[test]
    fn a_command_that_changes_nothing_writes_nothing() {
        let plan = plan(
            vec![existing("a", AgentStatus::Offline, 2)],
            &[apply("a", Event::MarkOffline)],
            now(),
        );
        let (writes, outcomes) = plan.finish(5);
        assert!(writes.changed.is_empty() && writes.transitions.is_empty());
        assert_eq!(outcomes[0].as_ref().unwrap().agent.revision, 2);
    }

    // ---- claims

    fn idle_since(id: &str, minutes_ago: i64, revision: i64) -> Agent {
        let mut agent = existing(id, AgentStatus::Idle, revision);
        agent.last_transition_at = now() - Duration::minutes(minutes_ago);
        agent
    }

    fn claim_command(request_id: &str) -> Command {
        Command::Claim {
            unique: format!("claim-{request_id}"),
            request: ClaimRequest {
                selector: Default::default(),
                slot_type: SlotType::Work,
                lease_duration: Duration::seconds(30),
                wait_timeout: Duration::zero(),
                request_id: request_id.into(),
            },
            actor: "sched".into(),
        }
    }

    fn rows(candidates: Vec<Agent>) -> ClaimRows {
        ClaimRows {
            candidates,
            made: vec![],
        }
    }

    #[test]
    fn claims_take_the_longest_idle_agents_and_their_tokens_are_their_revisions() {
        let candidates = vec![
            idle_since("a", 1, 3),
            idle_since("b", 5, 4),
            idle_since("c", 3, 5),
        ];
        let commands = [
            claim_command("1"),
            claim_command("2"),
            claim_command("3"),
            claim_command("4"),
        ];
        let plan = plan_with(vec![], rows(candidates), &commands, now());
        let (relative, shifts) = plan.relative_writes();
        assert_eq!(
            shifts.claim,
            [true, true, true],
            "each claim made in this batch"
        );
        assert_eq!(relative.claims.len(), 3);
        let (writes, outcomes) = plan.finish(100);
        let taken: Vec<(String, i64)> = outcomes[..3]
            .iter()
            .map(|o| {
                let o = o.as_ref().unwrap();
                let claim = o.claim.clone().unwrap();
                assert_eq!(
                    Some(claim.fencing_token),
                    o.transition.as_ref().map(|t| t.revision)
                );
                assert_eq!(o.agent.claim.as_ref(), Some(&claim));
                assert_eq!(o.transition.as_ref().unwrap().cause, Cause::Claimed);
                (claim.agent_id, claim.fencing_token)
            })
            .collect();
        assert_eq!(
            taken,
            [
                ("b".to_string(), 101),
                ("c".to_string(), 102),
                ("a".to_string(), 103)
            ],
            "idle longest first"
        );
        assert_eq!(outcomes[3], Err(Refusal::NoAgentAvailable));
        let tokens: Vec<i64> = writes.claims.iter().map(|c| c.fencing_token).collect();
        assert_eq!(tokens, [101, 102, 103]);
        assert!(
            writes
                .changed
                .iter()
                .all(|a| a.claim.as_ref().unwrap().fencing_token == a.revision)
        );
    }

    #[test]
    fn a_claimed_agent_is_fenced_and_its_claim_ends_with_its_slot() {
        let claimed = plan_with(
            vec![],
            rows(vec![idle_since("a", 1, 3)]),
            &[claim_command("")],
            now(),
        );
        let (writes, _) = claimed.finish(10);
        let agent = writes.changed[0].clone();
        let token = agent.claim.as_ref().unwrap().fencing_token;
        let finish = |token| Command::Apply {
            agent_id: "a".into(),
            event: Event::FinishWork,
            fencing_token: token,
            actor: "runner".into(),
        };
        let cordon = Command::Cordon {
            agent_id: "a".into(),
            reason: "disk".into(),
            actor: "op".into(),
        };
        let plan = plan(
            vec![agent],
            &[
                finish(None),
                finish(Some(token - 1)),
                cordon,
                finish(Some(token)),
            ],
            now(),
        );
        let (writes, outcomes) = plan.finish(20);
        assert!(
            matches!(&outcomes[0], Err(Refusal::StaleFencingToken(s)) if s.presented.is_none())
        );
        assert!(matches!(&outcomes[1], Err(Refusal::StaleFencingToken(_))));
        // A cordon keeps the claim, and its token, while the revision moves.
        let cordoned = outcomes[2].as_ref().unwrap();
        assert_eq!(cordoned.agent.revision, 21);
        assert_eq!(cordoned.agent.claim.as_ref().unwrap().fencing_token, token);
        let done = outcomes[3].as_ref().unwrap();
        assert_eq!(done.agent.state.status, AgentStatus::Idle);
        assert_eq!(done.agent.claim, None);
        assert_eq!(writes.changed[0].claim, None);
    }

    #[test]
    fn a_repeated_key_replays_the_claim_made_before_or_in_the_batch() {
        let mut made = idle_since("a", 1, 3);
        let claim = Claim {
            claim_id: "old".into(),
            agent_id: "a".into(),
            fencing_token: 3,
            slot_type: SlotType::Work,
            holder: "sched".into(),
            request_id: "k".into(),
            claimed_at: now(),
            lease_expires_at: now() + Duration::seconds(30),
        };
        made.claim = None;
        let rows = ClaimRows {
            candidates: vec![idle_since("b", 1, 4)],
            made: vec![(claim.clone(), Some(made))],
        };
        let plan = plan_with(
            vec![],
            rows,
            &[claim_command("k"), claim_command("n"), claim_command("n")],
            now(),
        );
        let (writes, outcomes) = plan.finish(50);
        let replay = outcomes[0].as_ref().unwrap();
        assert_eq!(replay.claim.as_ref(), Some(&claim), "ended: as it was made");
        assert!(replay.transition.is_none());
        let new = outcomes[1].as_ref().unwrap().claim.clone().unwrap();
        let same = outcomes[2].as_ref().unwrap();
        assert_eq!(same.claim.as_ref(), Some(&new));
        assert!(same.transition.is_none());
        assert_eq!(new.fencing_token, 51);
        assert_eq!(writes.claims, [new]);
    }

    #[test]
    fn delete_waits_for_the_claim_and_sweeps_expire_leases_then_offline_agents() {
        let claimed = plan_with(
            vec![],
            rows(vec![idle_since("a", 1, 3)]),
            &[claim_command("")],
            now(),
        );
        let (writes, _) = claimed.finish(10);
        let held = writes.changed[0].clone();
        let mut offline = existing("o", AgentStatus::Offline, 2);
        offline.last_transition_at = now() - Duration::days(8);
        let delete = |id: &str| Command::Delete {
            agent_id: id.into(),
            actor: "op".into(),
        };
        let sweep = |id: &str| Command::Sweep {
            agent_id: id.into(),
            heartbeat_timeout: Duration::hours(1),
            offline_allowed: true,
            offline_retention: Duration::days(7),
            actor: "sweeper".into(),
        };
        let refused = plan(vec![held.clone(), offline.clone()], &[delete("a")], now())
            .finish(20)
            .1;
        assert!(matches!(&refused[0], Err(Refusal::ClaimHeld(h)) if h.holder == "sched"));

        let later = now() + Duration::seconds(31);
        let commands = [sweep("a"), sweep("o"), delete("a"), register("a", "x")];
        let (writes, outcomes) = plan(vec![held, offline], &commands, later).finish(20);
        let expired = outcomes[0].as_ref().unwrap();
        let t = expired.transition.as_ref().unwrap();
        assert_eq!(
            (t.cause, t.from, t.to),
            (
                Cause::ClaimExpired,
                Some(AgentStatus::Busy),
                AgentStatus::Idle
            )
        );
        let gone = outcomes[1].as_ref().unwrap().transition.as_ref().unwrap();
        assert_eq!(
            (gone.cause, gone.from, gone.to),
            (
                Cause::Expired,
                Some(AgentStatus::Offline),
                AgentStatus::Offline
            )
        );
        let deleted = outcomes[2].as_ref().unwrap().transition.as_ref().unwrap();
        assert_eq!(deleted.cause, Cause::Deleted);
        assert_eq!(outcomes[3], Err(Refusal::Deleting("a".into())));
        assert_eq!(writes.deleted, ["a", "o"]);
        assert!(writes.changed.is_empty(), "{:?}", writes.changed);
        assert_eq!(writes.transitions.len(), 3);
    }
}
