//! `fleetcare agents list|get|resume|cordon|uncordon|delete` and `fleetcare watch`.

use std::io::Write;

use super::table::Table;
use super::{AgentsArgs, AgentsCommand, CliError, StatusArg, WatchArgs, print};
use crate::views::{AgentView, TransitionView};
use fleetcare_client::{ResumingWatch, pb};

/// The largest page the server hands out; `list` follows every page.
const PAGE_SIZE: i32 = 1000;

pub async fn run(args: AgentsArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    let json = args.connection.json;
    match args.command {
        AgentsCommand::List { status, label } => {
            let mut request = pb::ListAgentsRequest {
                page_size: PAGE_SIZE,
                statuses: status.into_iter().map(|s| status_pb(s) as i32).collect(),
                labels: label.into_iter().collect(),
                ..Default::default()
            };
            let mut agents = Vec::new();
            loop {
                let page = clients
                    .agents
                    .list_agents(request.clone())
                    .await?
                    .into_inner();
                agents.extend(page.agents.iter().map(AgentView::from));
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            print(json, &agents, || agents_table(&agents))
        }
        AgentsCommand::Get { agent_id } => {
            let response = clients
                .agents
                .get_agent(pb::GetAgentRequest { agent_id })
                .await?
                .into_inner();
            let agent = AgentView::from(&response.agent.unwrap_or_default());
            print(json, &agent, || agent_details(&agent))
        }
        AgentsCommand::Resume { agent_id, reason } => {
            let response = clients
                .dispatch
                .resume_agent(pb::ResumeAgentRequest { agent_id, reason })
                .await?
                .into_inner();
            let transition = TransitionView::from(&response.transition.unwrap_or_default());
            print(json, &transition, || {
                format!("{}\n", transition_line(&transition))
            })
        }
        AgentsCommand::Cordon { agent_id, reason } => {
            let response = clients
                .dispatch
                .cordon_agent(pb::CordonAgentRequest { agent_id, reason })
                .await?
                .into_inner();
            let agent = AgentView::from(&response.agent.unwrap_or_default());
            let transition = response.transition.as_ref().map(TransitionView::from);
            print(json, &agent, || cordon_line(&agent, transition.as_ref()))
        }
        AgentsCommand::Uncordon { agent_id } => {
            let response = clients
                .dispatch
                .uncordon_agent(pb::UncordonAgentRequest { agent_id })
                .await?
                .into_inner();
            let agent = AgentView::from(&response.agent.unwrap_or_default());
            let transition = response.transition.as_ref().map(TransitionView::from);
            print(json, &agent, || cordon_line(&agent, transition.as_ref()))
        }
        AgentsCommand::Delete { agent_id } => {
            let response = clients
                .dispatch
                .delete_agent(pb::DeleteAgentRequest { agent_id })
                .await?
                .into_inner();
            let transition = TransitionView::from(&response.transition.unwrap_or_default());
            print(json, &transition, || {
                format!("{}\n", transition_line(&transition))
            })
        }
    }
}

/// What `cordon` / `uncordon` print: the transition made, or that the agent
/// was as asked already.
fn cordon_line(agent: &AgentView, transition: Option<&TransitionView>) -> String {
    match transition {
        Some(t) => format!("{}\n", transition_line(t)),
        None if agent.schedulable => format!("{} is schedulable already\n", agent.agent_id),
        None => format!("{} is cordoned already\n", agent.agent_id),
    }
}

/// `yes`, or `no` while cordoned.
fn schedulable(a: &AgentView) -> &'static str {
    if a.schedulable { "yes" } else { "no" }
}

fn status_pb(status: StatusArg) -> pb::AgentStatus {
    match status {
        StatusArg::Idle => pb::AgentStatus::Idle,
        StatusArg::Busy => pb::AgentStatus::Busy,
        StatusArg::OnCall => pb::AgentStatus::OnCall,
        StatusArg::Offline => pb::AgentStatus::Offline,
        StatusArg::Exhausted => pb::AgentStatus::Exhausted,
    }
}

fn agents_table(agents: &[AgentView]) -> String {
    let mut table = Table::new([
        "AGENT",
        "STATUS",
        "SINCE",
        "LAST HEARTBEAT",
        "SCHEDULABLE",
        "LABELS",
    ]);
    for a in agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.row(vec![
            a.agent_id.clone(),
            a.status.clone(),
            a.last_transition_at.clone().unwrap_or_default(),
            a.last_heartbeat_at.clone().unwrap_or_default(),
            schedulable(a).into(),
            labels.join(","),
        ]);
    }
    table.render()
}

fn agent_details(a: &AgentView) -> String {
    let mut lines = vec![
        ("agent", a.agent_id.clone()),
        ("status", a.status.clone()),
        ("revision", a.revision.to_string()),
        ("schedulable", schedulable(a).into()),
    ];
    if let Some(reason) = &a.cordon_reason {
        lines.push(("cordon reason", reason.clone()));
    }
    if let Some(claim) = &a.claim {
        lines.push(("claimed by", claim.holder.clone()));
        lines.push(("claim", claim.claim_id.clone()));
        lines.push(("fencing token", claim.fencing_token.to_string()));
        lines.push(("slot", claim.slot_type.clone()));
        if let Some(lease) = &claim.lease_expires_at {
            lines.push(("lease expires", lease.clone()));
        }
    }
    let optional = [
        ("registered", &a.registered_at),
        ("last heartbeat", &a.last_heartbeat_at),
        ("last transition", &a.last_transition_at),
        ("exhaustion reason", &a.exhaustion_reason),
        ("recovery at", &a.recovery_at),
        ("recovery source", &a.recovery_source),
        ("recovery hint", &a.recovery_hint),
    ];
    lines.extend(
        optional
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v))),
    );
    for pool in &a.quota_pools {
        lines.push(("quota pool", pool.clone()));
    }
    for pool in &a.held_by_pools {
        lines.push(("held by pool", pool.clone()));
    }
    for (k, v) in &a.labels {
        lines.push(("label", format!("{k}={v}")));
    }
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<18}{v}\n", format!("{k}:")))
        .collect()
}

/// One line a transition: `rev time agent FROM -> TO cause`, then `by ACTOR`
/// when the record has one.
fn transition_line(t: &TransitionView) -> String {
    let line = format!(
        "{:>8}  {}  {}  {} -> {}  {}",
        t.revision,
        t.occurred_at.as_deref().unwrap_or("-"),
        t.agent_id,
        t.from,
        t.to,
        t.cause
    );
    let line = match t.quota_pool.as_str() {
        "" => line,
        pool => format!("{line}  pool {pool}"),
    };
    match t.actor.as_str() {
        "" => line,
        actor => format!("{line}  by {actor}"),
    }
}

pub async fn watch(args: WatchArgs) -> Result<(), CliError> {
    use pb::watch_transitions_response::Event;
    // Connect first, so an unreachable server is an error rather than a silent retry loop.
    let clients = args.connection.connect().await?;
    let mut watch = ResumingWatch::new(
        clients.agents,
        pb::WatchTransitionsRequest {
            since_revision: args.since,
            agent_ids: args.agents,
            ..Default::default()
        },
    )
    .on_disconnect(|error, revision| {
        let why = error.map_or("the server ended the stream", |e| e.message());
        eprintln!(
            "fleetcare: connection lost ({why}); reconnecting to resume after revision {revision}"
        );
    });
    let mut seen = 0u64;
    while args.count.is_none_or(|count| seen < count) {
        let before = watch.reconnects();
        let event = watch.next().await?;
        if watch.reconnects() > before {
            // Said on stderr, so stdout stays one transition a line.
            eprintln!(
                "fleetcare: reconnected, resuming after revision {}",
                watch.last_revision()
            );
        }
        let Event::Transition(transition) = event else {
            continue;
        };
        let view = TransitionView::from(&transition);
        let mut out = std::io::stdout().lock();
        if args.connection.json {
            serde_json::to_writer(&mut out, &view).map_err(std::io::Error::from)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", transition_line(&view))?;
        }
        out.flush()?;
        seen += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transition_is_one_line() {
        let t = TransitionView {
            revision: 42,
            agent_id: "a-1".into(),
            from: "IDLE".into(),
            to: "BUSY".into(),
            cause: "WORK_STARTED".into(),
            occurred_at: Some("2026-04-01T10:00:00.000Z".into()),
            recovery_at: None,
            actor: String::new(),
            quota_pool: String::new(),
        };
        assert_eq!(
            transition_line(&t),
            "      42  2026-04-01T10:00:00.000Z  a-1  IDLE -> BUSY  WORK_STARTED"
        );
        let by = TransitionView {
            actor: "alice".into(),
            ..t
        };
        assert!(transition_line(&by).ends_with("WORK_STARTED  by alice"));
        let pooled = TransitionView {
            cause: "POOL_EXHAUSTED".into(),
            quota_pool: "anthropic/acct-42".into(),
            ..by
        };
        assert!(
            transition_line(&pooled).ends_with("POOL_EXHAUSTED  pool anthropic/acct-42  by alice")
        );
    }

    #[test]
    fn agent_details_list_only_what_is_set() {
        let agent = AgentView::from(&pb::Agent {
            agent_id: "a-1".into(),
            status: pb::AgentStatus::Exhausted as i32,
            recovery_hint: "retry-after: 30".into(),
            labels: [("team".to_string(), "x".to_string())].into(),
            schedulable: true,
            ..Default::default()
        });
        assert_eq!(
            agent_details(&agent),
            "agent:            a-1\nstatus:           EXHAUSTED\nrevision:         0\n\
             schedulable:      yes\nrecovery hint:    retry-after: 30\nlabel:            team=x\n"
        );
        let cordoned = AgentView::from(&pb::Agent {
            agent_id: "a-2".into(),
            status: pb::AgentStatus::Busy as i32,
            cordon_reason: "disk".into(),
            ..Default::default()
        });
        assert_eq!(
            agent_details(&cordoned),
            "agent:            a-2\nstatus:           BUSY\nrevision:         0\n\
             schedulable:      no\ncordon reason:    disk\n"
        );
    }

    #[test]
    fn agent_details_show_the_claim_with_its_holder_and_lease() {
        let claimed = AgentView::from(&pb::Agent {
            agent_id: "a-3".into(),
            status: pb::AgentStatus::Busy as i32,
            schedulable: true,
            claim: Some(pb::Claim {
                claim_id: "c-9".into(),
                agent_id: "a-3".into(),
                fencing_token: 17,
                slot_type: pb::SlotType::Work as i32,
                holder: "sched-a".into(),
                lease_expires_at: Some(prost_types::Timestamp {
                    seconds: 1_775_037_600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            agent_details(&claimed),
            "agent:            a-3\nstatus:           BUSY\nrevision:         0\n\
             schedulable:      yes\nclaimed by:       sched-a\nclaim:            c-9\n\
             fencing token:    17\nslot:             WORK\n\
             lease expires:    2026-04-01T10:00:00.000Z\n"
        );
    }
}
