//! The pure half of group commit: deciding a whole batch of agent commands at once.
//!
//! The store locks every agent a batch names (in agent-id order), hands them to
//! [`plan`] with the commands in arrival order, and writes what comes out in one
//! transaction. Each command is decided by [`agent::decide`] on the state the
//! earlier commands of the batch left, so two `StartWork` calls on one idle agent
//! in one batch still give one winner and one refusal, and a refused command
//! refuses only itself.
//!
//! Revisions are not known while planning (the store takes the revision row last,
//! after the agent rows): transitions are numbered 1..n within the batch, and
//! [`Plan::finish`] shifts them by the head revision the store allocated.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use crate::domain::agent::{
    self, AgentStatus, Cause, Decision, Event, StatusChange, TransitionRefused,
};
use crate::domain::dispatch::{self, DispatchCause};
use crate::domain::labels::Labels;
use crate::domain::transition::{Agent, Transition};

/// One state-changing call on an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create the agent (IDLE, with a REGISTERED transition) or, for an existing
    /// one, replace its labels and count a heartbeat.
    Register {
        agent_id: String,
        labels: Labels,
        /// Who asked (a caller's name, or "sweeper"): the transition's actor.
        actor: String,
    },
    /// A state-machine event on an existing agent.
    Apply {
        agent_id: String,
        event: Event,
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
}

impl Command {
    pub fn agent_id(&self) -> &str {
        match self {
            Command::Register { agent_id, .. }
            | Command::Apply { agent_id, .. }
            | Command::Resume { agent_id, .. }
            | Command::Cordon { agent_id, .. }
            | Command::Uncordon { agent_id, .. } => agent_id,
        }
    }

    pub fn actor(&self) -> &str {
        match self {
            Command::Register { actor, .. }
            | Command::Apply { actor, .. }
            | Command::Resume { actor, .. }
            | Command::Cordon { actor, .. }
            | Command::Uncordon { actor, .. } => actor,
        }
    }

    /// Whether deciding it reads the agent's last heartbeat time (a sweep). That
    /// time moves without a transition (every replica flushes heartbeats), so
    /// such a command is decided on the stored row, never on a remembered state.
    pub fn reads_liveness(&self) -> bool {
        matches!(
            self,
            Command::Apply {
                event: Event::Sweep { .. },
                ..
            }
        )
    }

    /// The same command on behalf of `name`.
    pub fn by(mut self, name: &str) -> Command {
        match &mut self {
            Command::Register { actor, .. }
            | Command::Apply { actor, .. }
            | Command::Resume { actor, .. }
            | Command::Cordon { actor, .. }
            | Command::Uncordon { actor, .. } => {
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
}

/// What one command did: the agent as that command left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub agent: Agent,
    pub transition: Option<Transition>,
    pub created: bool,
}

/// The decisions of a batch, with revisions still relative to the batch (1..n).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Each command's outcome, and whether its agent snapshot's revision is
    /// relative to this batch (the agent had a transition in it by then).
    outcomes: Vec<Result<(Applied, bool), Refusal>>,
    agents: BTreeMap<String, Agent>,
    created: BTreeSet<String>,
    changed: BTreeSet<String>,
    /// Agents whose final `revision` is relative to this batch.
    renumbered: BTreeSet<String>,
    transitions: Vec<Transition>,
}

/// What the store writes for a batch, revisions final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writes {
    /// New agents (final state), in agent-id order.
    pub created: Vec<Agent>,
    /// Every agent whose row changed, new ones included (final state), in agent-id order.
    pub changed: Vec<Agent>,
    /// The transitions to append, in revision order.
    pub transitions: Vec<Transition>,
}

impl Plan {
    /// How many revisions the batch needs.
    pub fn transition_count(&self) -> usize {
        self.transitions.len()
    }

    /// New agents' ids, in order: the store inserts these rows before the rest.
    pub fn created_ids(&self) -> impl Iterator<Item = &str> {
        self.created.iter().map(String::as_str)
    }

    /// What to write with revisions still relative to the batch, for a store that
    /// allocates the revisions in the same statement as the writes: for each
    /// changed agent, whether its `revision` is relative (to be shifted by the
    /// base the store allocates) or an earlier batch's, kept as is.
    pub fn relative_writes(&self) -> (Writes, Vec<bool>) {
        let pick = |ids: &BTreeSet<String>| -> Vec<Agent> {
            ids.iter()
                .filter_map(|id| self.agents.get(id).cloned())
                .collect()
        };
        let changed = pick(&self.changed);
        let shift = changed
            .iter()
            .map(|a| self.renumbered.contains(&a.agent_id))
            .collect();
        let writes = Writes {
            created: pick(&self.created),
            changed,
            transitions: self.transitions.clone(),
        };
        (writes, shift)
    }

    /// Shifts the batch's revisions by `base` (the head revision before the batch)
    /// and returns what to write and each command's outcome.
    pub fn finish(self, base: i64) -> (Writes, Vec<Result<Applied, Refusal>>) {
        let mut agents = self.agents;
        for id in &self.renumbered {
            if let Some(agent) = agents.get_mut(id) {
                agent.revision += base;
            }
        }
        let pick = |ids: &BTreeSet<String>| -> Vec<Agent> {
            ids.iter()
                .filter_map(|id| agents.get(id).cloned())
                .collect()
        };
        let writes = Writes {
            created: pick(&self.created),
            changed: pick(&self.changed),
            transitions: self
                .transitions
                .into_iter()
                .map(|mut t| {
                    t.revision += base;
                    t
                })
                .collect(),
        };
        let outcomes = self
            .outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map(|(mut applied, relative)| {
                    if relative {
                        applied.agent.revision += base;
                    }
                    if let Some(t) = applied.transition.as_mut() {
                        t.revision += base;
                    }
                    applied
                })
            })
            .collect();
        (writes, outcomes)
    }
}

/// The agents `commands` name, each once, in agent-id order (the order a
/// store locks their rows in, so that two batches cannot deadlock).
pub fn agent_ids(commands: &[Command]) -> Vec<&str> {
    let mut ids: Vec<&str> = commands.iter().map(Command::agent_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Decides `commands` in order against `existing` (every agent the batch names
/// that exists, as locked by the store), at server time `now`.
pub fn plan(existing: Vec<Agent>, commands: &[Command], now: DateTime<Utc>) -> Plan {
    let mut agents: BTreeMap<String, Agent> = existing
        .into_iter()
        .map(|a| (a.agent_id.clone(), a))
        .collect();
    let mut created = BTreeSet::new();
    let mut changed = BTreeSet::new();
    let mut renumbered = BTreeSet::new();
    let mut transitions: Vec<Transition> = Vec::new();
    let mut outcomes = Vec::with_capacity(commands.len());

    for command in commands {
        let agent_id = command.agent_id();
        let (agent, event) = match command {
            Command::Register { labels, .. } => match agents.get_mut(agent_id) {
                Some(agent) => {
                    if agent.labels != *labels {
                        agent.labels = labels.clone();
                        changed.insert(agent_id.to_owned());
                    }
                    (agent, Some(Event::Heartbeat))
                }
                None => {
                    let (state, _) = agent::registered(now);
                    let agent = Agent {
                        agent_id: agent_id.to_owned(),
                        labels: labels.clone(),
                        registered_at: now,
                        last_transition_at: now,
                        revision: 0,
                        state,
                        cordon_reason: None,
                    };
                    created.insert(agent_id.to_owned());
                    changed.insert(agent_id.to_owned());
                    let agent = agents.entry(agent_id.to_owned()).or_insert(agent);
                    let transition =
                        push_transition(&mut transitions, agent, None, command.actor(), now);
                    renumbered.insert(agent_id.to_owned());
                    outcomes.push(Ok((snapshot(agent, Some(transition), true), true)));
                    continue;
                }
            },
            Command::Apply { event, .. } => match agents.get_mut(agent_id) {
                Some(agent) => (agent, Some(event.clone())),
                None => {
                    outcomes.push(Err(Refusal::UnknownAgent(agent_id.to_owned())));
                    continue;
                }
            },
            Command::Resume { .. } => match agents.get_mut(agent_id) {
                Some(agent) => (agent, None),
                None => {
                    outcomes.push(Err(Refusal::UnknownAgent(agent_id.to_owned())));
                    continue;
                }
            },
            Command::Cordon { .. } | Command::Uncordon { .. } => {
                let Some(agent) = agents.get_mut(agent_id) else {
                    outcomes.push(Err(Refusal::UnknownAgent(agent_id.to_owned())));
                    continue;
                };
                let reason = match command {
                    Command::Cordon { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                let transition = cordon(agent, reason).map(|change| {
                    changed.insert(agent_id.to_owned());
                    renumbered.insert(agent_id.to_owned());
                    // The status did not change: the time it last did stays
                    // (the longest-idle choice and offline expiry read it).
                    let since = agent.last_transition_at;
                    let t = push_transition(
                        &mut transitions,
                        agent,
                        Some(change),
                        command.actor(),
                        now,
                    );
                    agent.last_transition_at = since;
                    t
                });
                let relative = renumbered.contains(agent_id);
                outcomes.push(Ok((snapshot(agent, transition, false), relative)));
                continue;
            }
        };
        let decided = match event {
            Some(event) => agent::decide(&agent.state, &agent.labels, event, now),
            None => resume(&agent.state),
        };
        let decision = match decided {
            Ok(decision) => decision,
            Err(refused) => {
                outcomes.push(Err(refused.into()));
                continue;
            }
        };
        if decision.state != agent.state {
            changed.insert(agent_id.to_owned());
        }
        agent.state = decision.state;
        let transition = decision.change.map(|change| {
            renumbered.insert(agent_id.to_owned());
            push_transition(&mut transitions, agent, Some(change), command.actor(), now)
        });
        let relative = renumbered.contains(agent_id);
        outcomes.push(Ok((snapshot(agent, transition, false), relative)));
    }

    Plan {
        outcomes,
        agents,
        created,
        changed,
        renumbered,
        transitions,
    }
}

/// `Command::Resume` as a state-machine decision: the rule is dispatch's.
fn resume(state: &agent::AgentState) -> Result<Decision, TransitionRefused> {
    let resumed = dispatch::resume_decision(state)?;
    let cause = match resumed.cause {
        DispatchCause::Resumed => Cause::Resumed,
        other => unreachable!("resume_decision records {other}"),
    };
    Ok(Decision {
        state: resumed.state,
        change: Some(StatusChange {
            from: resumed.from,
            to: resumed.to,
            cause,
        }),
    })
}

/// `Command::Cordon` (`reason` given) or `Uncordon` on `agent`: sets its
/// cordon and returns the status change (from == to) to record, or `None`
/// when it is already as asked (the rule is dispatch's).
fn cordon(agent: &mut Agent, reason: Option<String>) -> Option<StatusChange> {
    let cause = dispatch::cordon_decision(agent.cordon_reason.as_deref(), reason.is_some())?;
    let cause = match cause {
        DispatchCause::Cordoned => Cause::Cordoned,
        DispatchCause::Uncordoned => Cause::Uncordoned,
        other => unreachable!("cordon_decision records {other}"),
    };
    agent.cordon_reason = reason;
    let status = agent.state.status;
    Some(StatusChange {
        from: status,
        to: status,
        cause,
    })
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
        cause: change.map_or(agent::Cause::Registered, |c| c.cause),
        occurred_at: now,
        exhaustion_reason: exhaustion.map(|e| e.reason),
        recovery_at: exhaustion.map(|e| e.recovery.recovery_at),
        actor: actor.to_owned(),
    };
    agent.revision = revision;
    agent.last_transition_at = now;
    transitions.push(transition.clone());
    transition
}

/// The agent as a command left it, for that command's caller.
fn snapshot(agent: &Agent, transition: Option<Transition>, created: bool) -> Applied {
    Applied {
        agent: agent.clone(),
        transition,
        created,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{AgentState, Cause, SlotType};
    use chrono::{Duration, TimeZone};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap()
    }

    fn existing(id: &str, status: AgentStatus, revision: i64) -> Agent {
        let at = now() - Duration::minutes(1);
        Agent {
            agent_id: id.into(),
            labels: Labels::new(),
            registered_at: at,
            last_transition_at: at,
            revision,
            state: AgentState {
                status,
                last_heartbeat_at: at,
                exhaustion: None,
            },
            cordon_reason: None,
        }
    }

    fn apply(id: &str, event: Event) -> Command {
        Command::Apply {
            agent_id: id.into(),
            event,
            actor: "tester".into(),
        }
    }

    fn register(id: &str, team: &str) -> Command {
        Command::Register {
            agent_id: id.into(),
            labels: [("team".to_string(), team.to_string())].into(),
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
        assert_eq!(shift, [true]);
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
        assert_eq!((relative.changed[0].revision, shift), (9, vec![false]));
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
}
