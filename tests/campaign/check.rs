//! What the campaign recorded, fed to the history checker
//! (`tests/support/history.rs`, shared with the simulation): the clients'
//! calls, the watchers' streams, and the `transitions` table.

use fleetcare::domain::agent::{AgentStatus, Cause};

use crate::history::{self, History, Reply};
use crate::workload::{Call, Op, Outcome, Session, Tr};

fn status(s: &str) -> AgentStatus {
    AgentStatus::parse(s).unwrap_or_else(|| panic!("unknown status {s:?}"))
}

fn stored(t: &Tr) -> history::Stored {
    history::Stored {
        revision: t.revision,
        agent_id: t.agent_id.clone(),
        from: t.from.as_deref().map(status),
        to: status(&t.to),
        cause: Cause::parse(&t.cause).unwrap_or_else(|| panic!("unknown cause {:?}", t.cause)),
        actor: t.actor.clone(),
    }
}

fn op(op: Op) -> history::Op {
    match op {
        Op::Register => history::Op::Register,
        Op::Heartbeat => history::Op::Heartbeat,
        Op::StartWork | Op::StartOnCall | Op::InvalidStartWork => history::Op::StartWork,
        Op::FinishWork => history::Op::FinishWork,
        Op::ReportExhausted => history::Op::ReportExhausted,
        Op::MarkOffline => history::Op::MarkOffline,
    }
}

fn outcome(call: &Call) -> history::Outcome {
    match &call.outcome {
        Outcome::Failed(code) => history::Outcome::from_code(*code as i32),
        // A registration's reply names no transition: a new agent's is its
        // REGISTERED one, at the agent's revision; of an existing agent the
        // reply does not say whether it came back from OFFLINE
        // (HEARTBEAT_RESUMED) or changed nothing, so for the checker it is
        // a call of unknown effect.
        Outcome::Ok {
            created: Some(false),
            ..
        } => history::Outcome::Unknown(None),
        Outcome::Ok {
            transition,
            status: shown,
            revision,
            created,
        } => history::Outcome::Ok(Reply {
            revision: match created {
                Some(true) => Some(*revision),
                _ => transition.as_ref().map(|t| t.revision),
            },
            agent_revision: Some(*revision),
            status: Some(status(shown)),
            agent_id: None,
        }),
    }
}

pub fn history_of(calls: &[Call], table: &[Tr], sessions: &[Session]) -> History {
    History {
        calls: calls
            .iter()
            .map(|c| history::Call {
                client: if c.client == usize::MAX {
                    "setup".into()
                } else {
                    format!("client-{}", c.client)
                },
                op: op(c.op),
                agent_id: Some(c.agent_id.clone()),
                // A server without an auth file records "anonymous" for every
                // caller: the actor tells no client from another.
                actor: None,
                request_id: None,
                start: c.start,
                end: c.end,
                outcome: outcome(c),
            })
            .collect(),
        stored: table.iter().map(stored).collect(),
        watches: sessions
            .iter()
            .map(|s| history::WatchStream {
                watcher: format!("watcher-{}", s.watcher),
                since: s.resume_from,
                snapshot: false,
                agent_ids: None,
                received: s.received.iter().map(stored).collect(),
                position: s.position,
            })
            .collect(),
    }
}

/// The checker's report on the run.
pub fn check(calls: &[Call], table: &[Tr], sessions: &[Session]) -> history::Report {
    history::check(&history_of(calls, table, sessions))
}

/// Whether a call's error leaves its effect unknown (for the figures).
pub fn unknown(call: &Call) -> bool {
    matches!(outcome(call), history::Outcome::Unknown(_))
}

/// Plants a bug in each of three copies of a run's records (an acknowledged
/// transition missing from the table, a transition missing from a watch
/// stream, a stored transition no call made) and returns what the checker
/// failed to name: empty when the campaign's records are fed so that it sees.
pub fn missed_plants(calls: &[Call], table: &[Tr], sessions: &[Session]) -> Vec<String> {
    use history::Violation as V;
    let base = history_of(calls, table, sessions);
    let mut missed = Vec::new();

    let acked = base.calls.iter().rev().find_map(|c| match &c.outcome {
        history::Outcome::Ok(Reply {
            revision: Some(r), ..
        }) => Some(*r),
        _ => None,
    });
    match acked {
        Some(r) => {
            let mut lost = base.clone();
            lost.stored.retain(|row| row.revision != r);
            let report = history::check(&lost);
            if !report
                .violations
                .iter()
                .any(|v| matches!(v, V::AckMissing { revision, .. } if *revision == r))
            {
                missed.push(format!(
                    "acknowledged revision {r} removed from the table: {report}"
                ));
            }
        }
        None => missed.push("no acknowledged transition to plant a loss on".into()),
    }

    match base.watches.iter().position(|w| w.received.len() >= 3) {
        Some(n) => {
            let mut skipped = base.clone();
            skipped.watches[n].received.remove(1);
            let report = history::check(&skipped);
            if !report
                .violations
                .iter()
                .any(|v| matches!(v, V::WatchMismatch { stream, .. } if *stream == n))
            {
                missed.push(format!(
                    "a transition removed from watch stream {n}: {report}"
                ));
            }
        }
        None => missed.push("no watch stream to plant a skip on".into()),
    }

    let mut stray = base.clone();
    let head = stray.stored.last().map_or(0, |row| row.revision);
    stray.stored.push(history::Stored {
        revision: head + 1,
        agent_id: "agent-0".into(),
        from: None,
        to: AgentStatus::Idle,
        cause: Cause::Registered,
        actor: "anonymous".into(),
    });
    let report = history::check(&stray);
    if !report.violations.iter().any(
        |v| matches!(v, V::Unexplained { revision } | V::IllegalTransition { revision, .. } if *revision == head + 1),
    ) {
        missed.push(format!("a second registration of agent-0 stored: {report}"));
    }
    missed
}
