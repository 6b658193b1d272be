//! Quota pools inside a batch: the decisions of `domain::quota` applied to
//! the agents the batch holds, in the same commit as the command that
//! caused them. A report parks its pool and every IDLE member with it; a
//! member arriving where it could take work (a slot ending, a return, a
//! registration) is parked while its pool is; the sweeper's release lets
//! one member go at a time; an operator parks or lifts a pool.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::{Command, Decision, Outcome, Plan, Planner, Refusal, push_transition};
use crate::domain::agent::{self, AgentStatus, ExhaustionReport, StatusChange};
use crate::domain::dispatch;
use crate::domain::quota::{
    self, HeldMember, Member, MemberPool, OnPark, Parked, PoolChange, PoolDecision, PoolName,
    PoolState, ReportTarget, Window,
};
use crate::domain::transition::Agent;

/// The quota pools a batch is decided on, as the store read them (locked).
#[derive(Debug, Clone, Default)]
pub struct PoolRows {
    /// Every pool of the batch's agents (memberships and holds) and every
    /// pool a command names, that has a row (a pool never parked has none).
    pub states: BTreeMap<PoolName, PoolState>,
    /// For a pool the batch may park (a report naming it, an operator's
    /// `ParkPool`): every member, locked, besides the agents the batch names.
    pub members: Vec<Agent>,
}

/// The pools `commands` may park, given the agents they name (as locked):
/// the pool of each report whose target is a pool (`quota::report_target`).
/// The store reads these pools' members for the batch.
pub fn parking_pools(commands: &[Command], agents: &[Agent]) -> BTreeSet<PoolName> {
    let mut out = BTreeSet::new();
    for command in commands {
        let (agent_id, requested) = match command {
            Command::ReportExhausted {
                agent_id,
                quota_pool,
                ..
            } => (agent_id, quota_pool.as_ref()),
            Command::Apply {
                agent_id,
                event: agent::Event::ReportExhausted(_),
                ..
            } => (agent_id, None),
            _ => continue,
        };
        let Some(agent) = agents.iter().find(|a| &a.agent_id == agent_id) else {
            continue;
        };
        if let Ok(ReportTarget::Pool(pool)) =
            quota::report_target(agent_id, requested, &agent.quota_pools)
        {
            out.insert(pool);
        }
    }
    out
}

/// Every pool the decisions of `commands` on `agents` may read: each
/// agent's memberships and holds, and the pools commands name.
pub fn pools_read(commands: &[Command], agents: &[Agent]) -> BTreeSet<PoolName> {
    let mut out: BTreeSet<PoolName> = agents
        .iter()
        .flat_map(|a| a.quota_pools.iter().chain(a.pool_holds.pools.keys()))
        .cloned()
        .collect();
    for command in commands {
        match command {
            Command::ReportExhausted {
                quota_pool: Some(pool),
                ..
            }
            | Command::PoolRelease { pool, .. } => {
                out.insert(pool.clone());
            }
            Command::Register { quota_pools, .. } => out.extend(quota_pools.iter().cloned()),
            _ => {}
        }
    }
    out
}

/// The members `pool` (in `state`) holds or let go in its current episode,
/// as its release reads them (`quota::release_schedule`), from its agents'
/// holds: a member still held from an earlier episode counts too.
pub fn held_members(pool: &PoolName, state: &PoolState, agents: &[Agent]) -> Vec<HeldMember> {
    agents
        .iter()
        .filter_map(|agent| {
            let hold = agent.pool_holds.pools.get(pool)?;
            let current = hold.released_at.is_none() || Some(hold.episode) == state.episode;
            current.then(|| HeldMember {
                agent_id: agent.agent_id.clone(),
                parked_at: hold.parked_at,
                offline: agent.state.status == AgentStatus::Offline,
                released_at: hold.released_at,
            })
        })
        .collect()
}

/// An operator's or the sweeper's call on a whole pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolCommand {
    /// `ParkPool`: `window` held until `until` (`PoolState::operator_park`),
    /// IDLE members parked in the same commit.
    Park {
        pool: PoolName,
        window: Window,
        until: DateTime<Utc>,
        reason: String,
        actor: String,
    },
    /// `ReleasePool`: every window ends now (`PoolState::operator_release`);
    /// the sweeper then releases the members, canary first.
    Lift { pool: PoolName, actor: String },
    /// The sweeper found nobody left to release: it stops looking at the
    /// pool until it is parked again.
    Settle { pool: PoolName },
}

impl PoolCommand {
    pub fn pool(&self) -> &PoolName {
        match self {
            PoolCommand::Park { pool, .. }
            | PoolCommand::Lift { pool, .. }
            | PoolCommand::Settle { pool } => pool,
        }
    }

    /// Whether it may park the pool's members (the store then reads them).
    pub fn parks(&self) -> bool {
        matches!(self, PoolCommand::Park { .. })
    }
}

/// Decides a pool command on `rows` (the pool's state and, for a park,
/// every member, locked). `UnknownPool` when the pool has no row and no
/// member: an operator named a pool nobody is in. The plan writes the pool
/// (and the members a park parks); its outcomes are empty.
pub fn plan_pool(
    rows: PoolRows,
    command: &PoolCommand,
    now: DateTime<Utc>,
) -> Result<(Plan, Option<Parked>), Refusal> {
    let pool = command.pool().clone();
    // A row made for a park that found no member has no episode.
    let known =
        rows.states.get(&pool).is_some_and(|s| s.episode.is_some()) || !rows.members.is_empty();
    if !known && !matches!(command, PoolCommand::Settle { .. }) {
        return Err(Refusal::UnknownPool(pool.to_string()));
    }
    let mut p = Planner::new(Vec::new(), Vec::new(), rows, now);
    let mut parked = None;
    match command {
        PoolCommand::Park {
            window,
            until,
            reason,
            actor,
            ..
        } => {
            let state = p.pools.entry(pool.clone()).or_default();
            let outcome = state.operator_park(*window, *until, actor, reason, now);
            parked = Some(outcome);
            if !matches!(outcome, Parked::NotParked | Parked::Kept) {
                p.pools_changed.insert(pool.clone());
            }
            p.park_members(&pool, None, actor);
        }
        PoolCommand::Lift { .. } => {
            if let Some(state) = p.pools.get_mut(&pool)
                && state.operator_release(now)
            {
                p.pools_changed.insert(pool.clone());
            }
        }
        PoolCommand::Settle { .. } => {
            if let Some(state) = p.pools.get_mut(&pool)
                && !state.is_parked(now)
                && !state.settled
            {
                state.settled = true;
                p.pools_changed.insert(pool.clone());
            }
        }
    }
    Ok((p.into_plan(Vec::new()), parked))
}

/// A pool never parked: no windows, no canary.
static NEVER_PARKED: PoolState = PoolState {
    windows: BTreeMap::new(),
    canary: None,
    episode: None,
    settled: false,
};

impl Planner {
    /// The pools of `agent` as the decisions read them: its memberships and
    /// the pools that hold it.
    fn member_pools<'a>(
        pools: &'a BTreeMap<PoolName, PoolState>,
        agent: &'a Agent,
    ) -> Vec<MemberPool<'a>> {
        let mut names: Vec<&PoolName> = agent.quota_pools.iter().collect();
        for held in agent.pool_holds.holding() {
            if !names.contains(&held) {
                names.push(held);
            }
        }
        names
            .into_iter()
            .map(|name| MemberPool {
                name,
                state: pools.get(name).unwrap_or(&NEVER_PARKED),
                holds: agent.pool_holds.held_by(name),
            })
            .collect()
    }

    /// Whether the agent's pools would let the sweeper wake it.
    pub(super) fn member_wakes(&self, agent_id: &str) -> bool {
        let agent = &self.agents[agent_id];
        !agent.pool_holds.is_held()
            || Member {
                state: &agent.state,
                own: agent.pool_holds.own_exhaustion(&agent.state),
                pools: &Self::member_pools(&self.pools, agent),
            }
            .wakes(self.now)
    }

    /// `ReportExhausted`: the pool it targets parked with every IDLE member,
    /// or the agent alone.
    pub(super) fn report(
        &mut self,
        agent_id: &str,
        report: &ExhaustionReport,
        requested: Option<&PoolName>,
        window: Option<Window>,
        fencing_token: Option<i64>,
        actor: &str,
    ) -> Result<Outcome, Refusal> {
        let now = self.now;
        let agent = &self.agents[agent_id];
        dispatch::check_fencing(agent_id, agent.claim.as_ref(), fencing_token, now)?;
        let target = quota::report_target(agent_id, requested, &agent.quota_pools)?;
        if let ReportTarget::Pool(pool) = target {
            let decided = quota::pool_report(report, &agent.labels, window, agent_id, now);
            let state = self.pools.entry(pool.clone()).or_default();
            if !matches!(
                state.park(decided.window, decided.park, now),
                Parked::NotParked | Parked::Kept
            ) {
                self.pools_changed.insert(pool.clone());
            }
            let agent = &self.agents[agent_id];
            let pools = Self::member_pools(&self.pools, agent);
            let member = Member {
                state: &agent.state,
                own: agent.pool_holds.own_exhaustion(&agent.state),
                pools: &pools,
            };
            if let Some(decision) = member.on_report(&pool, now) {
                let own = member.own.cloned();
                let mut outcome = self.apply_pool(agent_id, decision, own.as_ref(), actor);
                let (others, transitions) = self.park_members(&pool, Some(agent_id), actor);
                outcome.others = others;
                outcome.other_transitions = transitions;
                return Ok(outcome);
            }
        }
        // The agent alone: its own exhaustion, shown as the later of it and
        // any pool still holding it.
        let agent = &self.agents[agent_id];
        let event = agent::Event::ReportExhausted(report.clone());
        let mut decision = agent::decide(&agent.state, &agent.labels, event, now)?;
        if agent.pool_holds.is_held() {
            let own = decision.state.exhaustion.clone();
            let pools = Self::member_pools(&self.pools, agent);
            let member = Member {
                state: &decision.state,
                own: own.as_ref(),
                pools: &pools,
            };
            decision.state.exhaustion = member.effective_recovery(now);
            let holds = agent.pool_holds.clone();
            let agent = self.agent_mut(agent_id);
            agent.pool_holds = quota::Holds {
                own,
                pools: holds.pools,
            };
        }
        Ok(self.apply(agent_id, decision, actor))
    }

    /// Every member of `pool` but `except` decided on the pool's parking
    /// (`Member::on_pool_parked`): the agents changed and their
    /// transitions' indexes.
    pub(super) fn park_members(
        &mut self,
        pool: &PoolName,
        except: Option<&str>,
        actor: &str,
    ) -> (BTreeSet<String>, Vec<usize>) {
        let now = self.now;
        let ids: Vec<String> = self
            .agents
            .values()
            .filter(|a| Some(a.agent_id.as_str()) != except && a.quota_pools.contains(pool))
            .map(|a| a.agent_id.clone())
            .collect();
        let mut others = BTreeSet::new();
        let mut transitions = Vec::new();
        for id in ids {
            let agent = &self.agents[&id];
            let pools = Self::member_pools(&self.pools, agent);
            let member = Member {
                state: &agent.state,
                own: agent.pool_holds.own_exhaustion(&agent.state),
                pools: &pools,
            };
            if let OnPark::Park(decision) = member.on_pool_parked(pool, now) {
                let own = member.own.cloned();
                let outcome = self.apply_pool(&id, decision, own.as_ref(), actor);
                others.insert(id);
                if let Some(t) = outcome.applied.transition {
                    transitions.push(t.revision as usize - 1);
                }
            }
        }
        (others, transitions)
    }

    /// A decision of the state machine (or of dispatch) for an agent that
    /// may arrive where it could take work: a member of a parked pool, or one
    /// a pool still holds, lands EXHAUSTED instead (`Member::on_arrival`);
    /// a canary that completed a work slot is recorded on its pool.
    pub(super) fn arrive(&mut self, agent_id: &str, decision: Decision, actor: &str) -> Outcome {
        let now = self.now;
        let agent = &self.agents[agent_id];
        if agent.quota_pools.is_empty() && agent.pool_holds.pools.is_empty() {
            return self.apply(agent_id, decision, actor);
        }
        if let Some(change) = &decision.change
            && quota::completes_canary(change.from, change.cause)
        {
            let names: Vec<PoolName> = Self::member_pools(&self.pools, agent)
                .iter()
                .map(|p| p.name.clone())
                .collect();
            for name in names {
                if let Some(state) = self.pools.get_mut(&name)
                    && state.canary_completed(agent_id, now)
                {
                    self.pools_changed.insert(name);
                }
            }
        }
        let agent = &self.agents[agent_id];
        let from = decision
            .change
            .as_ref()
            .map_or(agent.state.status, |c| c.from);
        let arrives = match decision.state.status {
            AgentStatus::Idle => true,
            AgentStatus::Exhausted => from == AgentStatus::Offline,
            _ => false,
        };
        if !arrives {
            return self.apply(agent_id, decision, actor);
        }
        let pools = Self::member_pools(&self.pools, agent);
        let member = Member {
            state: &agent.state,
            own: agent.pool_holds.own_exhaustion(&agent.state),
            pools: &pools,
        };
        let Some(pool_decision) = member.on_arrival(from, &decision.state, now) else {
            return self.apply(agent_id, decision, actor);
        };
        let own = member.own.cloned();
        match pool_decision.change {
            Some(_) => self.apply_pool(agent_id, pool_decision, own.as_ref(), actor),
            // The state machine's transition stands, with what the pools show.
            None => {
                let holds = self.holds_after(agent_id, &pool_decision, own.as_ref());
                self.agent_mut(agent_id).pool_holds = holds;
                self.apply(
                    agent_id,
                    Decision {
                        state: pool_decision.state,
                        change: decision.change,
                    },
                    actor,
                )
            }
        }
    }

    /// The sweeper's release of one member (`Command::PoolRelease`).
    pub(super) fn pool_release(&mut self, agent_id: &str, pool: &PoolName, actor: &str) -> Outcome {
        let now = self.now;
        let parked = self.pools.get(pool).is_none_or(|s| s.is_parked(now));
        if parked {
            return self.unchanged(agent_id);
        }
        let Some(index) = self.release_member(agent_id, pool, actor) else {
            return self.unchanged(agent_id);
        };
        if let Some(state) = self.pools.get_mut(pool)
            && state.canary_released(agent_id, now)
        {
            self.pools_changed.insert(pool.clone());
        }
        let mut outcome = self.unchanged(agent_id);
        outcome.applied.transition = self.transitions.get(index).cloned();
        outcome
    }

    /// `pool` lets go of the agent (`Member::on_release`): the index of
    /// the transition, `None` when the pool did not hold it.
    pub(super) fn release_member(
        &mut self,
        agent_id: &str,
        pool: &PoolName,
        actor: &str,
    ) -> Option<usize> {
        let agent = &self.agents[agent_id];
        let pools = Self::member_pools(&self.pools, agent);
        let member = Member {
            state: &agent.state,
            own: agent.pool_holds.own_exhaustion(&agent.state),
            pools: &pools,
        };
        let decision = member.on_release(pool, self.now)?;
        let own = member.own.cloned();
        let outcome = self.apply_pool(agent_id, decision, own.as_ref(), actor);
        outcome.applied.transition.map(|t| t.revision as usize - 1)
    }

    /// The holds the agent keeps after `decision` (`quota::Holds::after`).
    fn holds_after(
        &self,
        agent_id: &str,
        decision: &PoolDecision,
        own: Option<&agent::Exhaustion>,
    ) -> quota::Holds {
        let pools = &self.pools;
        self.agents[agent_id].pool_holds.after(
            &decision.holds,
            own,
            |name| pools.get(name).and_then(|s| s.episode),
            self.now,
        )
    }

    /// Writes a pool's decision to the agent: its state, its holds (`own`
    /// kept apart while held) and the pool's transition naming the pool.
    fn apply_pool(
        &mut self,
        agent_id: &str,
        decision: PoolDecision,
        own: Option<&agent::Exhaustion>,
        actor: &str,
    ) -> Outcome {
        let holds = self.holds_after(agent_id, &decision, own);
        let now = self.now;
        let agent = self.agent_mut(agent_id);
        if agent.pool_holds != holds {
            agent.pool_holds = holds;
            self.changed.insert(agent_id.to_owned());
        }
        let Some(PoolChange {
            from,
            to,
            cause,
            pool,
        }) = decision.change
        else {
            return self.apply(
                agent_id,
                Decision {
                    state: decision.state,
                    change: None,
                },
                actor,
            );
        };
        let agent = self
            .agents
            .get_mut(agent_id)
            .expect("the agent was looked up before");
        agent.state = decision.state;
        if dispatch::ends_claim(from, to) && agent.claim.take().is_some() {
            self.claimed.remove(agent_id);
        }
        let change = StatusChange {
            from,
            to,
            cause: cause.agent_cause(),
        };
        let since = agent.last_transition_at;
        let mut transition =
            push_transition(&mut self.transitions, agent, Some(change), actor, now);
        if from == to {
            // Status kept (a parked agent now also held, or let go while
            // something else holds it): the time it entered it stays.
            agent.last_transition_at = since;
        }
        transition.quota_pool = Some(pool.clone());
        if let Some(last) = self.transitions.last_mut() {
            last.quota_pool = Some(pool);
        }
        self.changed.insert(agent_id.to_owned());
        self.renumbered.insert(agent_id.to_owned());
        let mut outcome = self.unchanged(agent_id);
        outcome.applied.transition = Some(transition);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::domain::agent::{AgentState, Cause, ExhaustionReason};
    use crate::domain::batch::{Applied, plan_full};
    use crate::domain::labels::Labels;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
    }

    fn pool(name: &str) -> PoolName {
        quota::pool_name("pool", name).unwrap()
    }

    fn idle(id: &str, pools: &[&str]) -> Agent {
        Agent {
            agent_id: id.into(),
            labels: Labels::new(),
            quota_pools: pools.iter().map(|p| pool(p)).collect(),
            pool_holds: Default::default(),
            registered_at: t0(),
            last_transition_at: t0(),
            revision: 1,
            state: AgentState {
                status: AgentStatus::Idle,
                last_heartbeat_at: t0(),
                exhaustion: None,
            },
            cordon_reason: None,
            claim: None,
        }
    }

    fn report(id: &str, pool: Option<&str>, until: DateTime<Utc>) -> Command {
        Command::ReportExhausted {
            agent_id: id.into(),
            report: ExhaustionReport {
                reason: ExhaustionReason::RateLimit,
                explicit_recovery_at: Some(until),
                headers: vec![],
                message: String::new(),
                time_zone: None,
                default_recovery: Duration::hours(1),
                default_billing_recovery: Duration::hours(5),
            },
            quota_pool: pool.map(super::tests::pool),
            window: Some(Window::Requests),
            fencing_token: None,
            actor: "tester".into(),
        }
    }

    fn release(name: &str, id: &str) -> Command {
        Command::PoolRelease {
            pool: pool(name),
            agent_id: id.into(),
            actor: "sweeper".into(),
        }
    }

    fn sweep(id: &str) -> Command {
        Command::Sweep {
            agent_id: id.into(),
            heartbeat_timeout: Duration::days(1),
            offline_allowed: true,
            offline_retention: Duration::zero(),
            actor: "sweeper".into(),
        }
    }

    /// Decides `commands` on `agents` and `states`, and returns what the
    /// store would keep: the agents and pools as written, and the outcomes.
    fn decide(
        agents: &mut BTreeMap<String, Agent>,
        states: &mut BTreeMap<PoolName, PoolState>,
        commands: &[Command],
        at: DateTime<Utc>,
    ) -> Vec<Result<Applied, Refusal>> {
        let existing: Vec<Agent> = agents.values().cloned().collect();
        let rows = PoolRows {
            states: states.clone(),
            members: Vec::new(),
        };
        let plan = plan_full(existing, Default::default(), rows, commands, at);
        let (writes, outcomes) = plan.finish(100);
        for agent in writes.changed {
            agents.insert(agent.agent_id.clone(), agent);
        }
        states.extend(writes.pools);
        outcomes
    }

    #[test]
    fn an_agent_parked_by_its_own_report_and_a_pool_wakes_when_both_have_lifted() {
        let mut agents = BTreeMap::from([
            ("a".to_owned(), idle("a", &["p", "q"])),
            ("b".to_owned(), idle("b", &["p"])),
        ]);
        let mut states = BTreeMap::new();
        // a's own report (two pools: it parks a alone), for an hour.
        decide(
            &mut agents,
            &mut states,
            &[report("a", None, t0() + Duration::hours(1))],
            t0(),
        );
        assert!(!agents["a"].pool_holds.is_held());
        // b's report parks p for three hours: a is now held by it too,
        // and shows the later time.
        let three = t0() + Duration::hours(3);
        decide(
            &mut agents,
            &mut states,
            &[report("b", Some("p"), three)],
            t0(),
        );
        let a = &agents["a"];
        assert!(a.pool_holds.held_by(&pool("p")));
        assert_eq!(
            a.state.exhaustion.as_ref().unwrap().recovery.recovery_at,
            three
        );
        assert_eq!(
            a.pool_holds.own.as_ref().unwrap().recovery.recovery_at,
            t0() + Duration::hours(1),
            "its own exhaustion is kept apart"
        );
        // Its own has lifted: the sweeper does not wake it (the pool holds it).
        let two = t0() + Duration::hours(2);
        let swept = decide(&mut agents, &mut states, &[sweep("a")], two);
        assert_eq!(swept[0].as_ref().unwrap().transition, None);
        assert_eq!(agents["a"].state.status, AgentStatus::Exhausted);
        // The pool lifts and releases it: IDLE at once (its own lifted too).
        let after = three + Duration::seconds(1);
        let release = release("p", "a");
        let released = decide(
            &mut agents,
            &mut states,
            std::slice::from_ref(&release),
            after,
        );
        let t = released[0].as_ref().unwrap().transition.clone().unwrap();
        assert_eq!(
            (t.to, t.cause, t.quota_pool),
            (AgentStatus::Idle, Cause::PoolReleased, Some(pool("p")))
        );
        assert_eq!(agents["a"].state.exhaustion, None);
        // Once only.
        let again = decide(&mut agents, &mut states, &[release], after);
        assert_eq!(again[0].as_ref().unwrap().transition, None);
    }

    #[test]
    fn a_pool_released_before_the_agents_own_limit_leaves_it_exhausted_until_that() {
        let mut agents = BTreeMap::from([
            ("a".to_owned(), idle("a", &["p", "q"])),
            ("b".to_owned(), idle("b", &["p"])),
        ]);
        let mut states = BTreeMap::new();
        let three = t0() + Duration::hours(3);
        decide(&mut agents, &mut states, &[report("a", None, three)], t0());
        decide(
            &mut agents,
            &mut states,
            &[report("b", Some("p"), t0() + Duration::hours(1))],
            t0(),
        );
        let release = release("p", "a");
        let two = t0() + Duration::hours(2);
        let released = decide(&mut agents, &mut states, &[release], two);
        let t = released[0].as_ref().unwrap().transition.clone().unwrap();
        assert_eq!(
            (t.from, t.to, t.cause),
            (
                Some(AgentStatus::Exhausted),
                AgentStatus::Exhausted,
                Cause::PoolReleased
            )
        );
        let a = &agents["a"];
        assert!(!a.pool_holds.is_held());
        assert_eq!(
            a.state.exhaustion.as_ref().unwrap().recovery.recovery_at,
            three,
            "its own exhaustion is what it shows now"
        );
        // Its own limit lifts: the sweeper wakes it as any agent.
        let woken = decide(
            &mut agents,
            &mut states,
            &[sweep("a")],
            three + Duration::seconds(1),
        );
        let t = woken[0].as_ref().unwrap().transition.clone().unwrap();
        assert_eq!((t.to, t.cause), (AgentStatus::Idle, Cause::Recovered));
    }
}
