//! Decoding AgentStatusService requests: one `TryFrom` per request message into
//! what the domain and the runtime take. Every field is destructured, so a new
//! proto field does not compile until it is decided here; enum values are
//! matched exhaustively and an unknown one is refused.

use std::collections::HashSet;

use crate::domain::agent::Event;
use crate::domain::batch::Command;
use crate::domain::quota;
use crate::domain::transition::WatchFilter;
use crate::error::{Error, Result};
use crate::grpc::convert;
use crate::grpc::validate::{self, PageCursor, PageRequest};
use crate::proto::v1 as pb;
use crate::runtime::watch::WatchSpec;
use crate::storage::AgentQuery;

/// A page token's cursor over agents: the last agent id of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCursor(pub String);

impl PageCursor for AgentCursor {
    fn encode(&self) -> String {
        self.0.clone()
    }

    fn decode(text: &str) -> Option<Self> {
        validate::agent_id("page_token", text).ok().map(AgentCursor)
    }
}

impl TryFrom<pb::RegisterAgentRequest> for Command {
    type Error = Error;

    fn try_from(request: pb::RegisterAgentRequest) -> Result<Command> {
        let pb::RegisterAgentRequest {
            agent_id,
            labels,
            quota_pools,
        } = request;
        Ok(Command::Register {
            agent_id: validate::agent_id("agent_id", &agent_id)?,
            labels: validate::labels("labels", labels)?,
            quota_pools: quota::pool_names("quota_pools", &quota_pools)?,
            // Set by the handler from the caller (`Command::by`).
            actor: String::new(),
        })
    }
}

/// The agent a request names.
pub struct AgentId(pub String);

impl TryFrom<pb::GetAgentRequest> for AgentId {
    type Error = Error;

    fn try_from(request: pb::GetAgentRequest) -> Result<AgentId> {
        let pb::GetAgentRequest { agent_id } = request;
        validate::agent_id("agent_id", &agent_id).map(AgentId)
    }
}

impl TryFrom<pb::HeartbeatRequest> for AgentId {
    type Error = Error;

    fn try_from(request: pb::HeartbeatRequest) -> Result<AgentId> {
        let pb::HeartbeatRequest { agent_id } = request;
        validate::agent_id("agent_id", &agent_id).map(AgentId)
    }
}

fn apply(agent_id: &str, event: Event) -> Result<Command> {
    fenced(agent_id, event, None)
}

/// [`apply`] with the caller's fencing token.
fn fenced(agent_id: &str, event: Event, fencing_token: Option<i64>) -> Result<Command> {
    Ok(Command::Apply {
        agent_id: validate::agent_id("agent_id", agent_id)?,
        event,
        fencing_token,
        // Set by the handler from the caller (`Command::by`).
        actor: String::new(),
    })
}

impl TryFrom<pb::StartWorkRequest> for Command {
    type Error = Error;

    fn try_from(request: pb::StartWorkRequest) -> Result<Command> {
        let pb::StartWorkRequest {
            agent_id,
            slot_type,
        } = request;
        apply(
            &agent_id,
            Event::StartWork(convert::slot_from_pb(slot_type)?),
        )
    }
}

impl TryFrom<pb::FinishWorkRequest> for Command {
    type Error = Error;

    fn try_from(request: pb::FinishWorkRequest) -> Result<Command> {
        let pb::FinishWorkRequest {
            agent_id,
            fencing_token,
        } = request;
        let token = validate::fencing_token("fencing_token", fencing_token)?;
        fenced(&agent_id, Event::FinishWork, token)
    }
}

impl TryFrom<pb::MarkOfflineRequest> for Command {
    type Error = Error;

    fn try_from(request: pb::MarkOfflineRequest) -> Result<Command> {
        let pb::MarkOfflineRequest { agent_id } = request;
        apply(&agent_id, Event::MarkOffline)
    }
}

/// A page of agents.
pub struct ListAgents {
    pub page: PageRequest<AgentCursor>,
    pub query: AgentQuery,
}

impl TryFrom<pb::ListAgentsRequest> for ListAgents {
    type Error = Error;

    fn try_from(request: pb::ListAgentsRequest) -> Result<ListAgents> {
        let pb::ListAgentsRequest {
            page_size,
            page_token,
            statuses,
            labels,
        } = request;
        let page = PageRequest::<AgentCursor>::decode(page_size, &page_token)?;
        let statuses = statuses
            .into_iter()
            .map(|s| convert::status_from_pb("statuses", s))
            .collect::<Result<Vec<_>>>()?;
        let query = AgentQuery {
            after_agent_id: page.after.as_ref().map(|c| c.0.clone()),
            statuses,
            labels: validate::labels("labels", labels)?,
            limit: page.fetch_limit(),
        };
        Ok(ListAgents { page, query })
    }
}

impl TryFrom<pb::WatchTransitionsRequest> for WatchSpec {
    type Error = Error;

    fn try_from(request: pb::WatchTransitionsRequest) -> Result<WatchSpec> {
        let pb::WatchTransitionsRequest {
            since_revision,
            agent_ids,
            statuses,
            include_snapshot,
        } = request;
        let since_revision = validate::revision("since_revision", since_revision)?;
        if include_snapshot && since_revision != 0 {
            return Err(Error::invalid(
                "since_revision must be 0 with include_snapshot: the snapshot sets the starting revision",
            ));
        }
        if agent_ids.len() > validate::MAX_WATCH_AGENTS {
            return Err(Error::invalid(format!(
                "agent_ids has {} entries, at most {} allowed",
                agent_ids.len(),
                validate::MAX_WATCH_AGENTS
            )));
        }
        let agent_ids = agent_ids
            .iter()
            .map(|id| validate::agent_id("agent_ids", id))
            .collect::<Result<HashSet<_>>>()?;
        let statuses = statuses
            .into_iter()
            .map(|s| convert::status_from_pb("statuses", s))
            .collect::<Result<HashSet<_>>>()?;
        Ok(WatchSpec {
            since_revision,
            filter: WatchFilter {
                agent_ids,
                statuses,
            },
            include_snapshot,
        })
    }
}

/// A page of the transition history. A page token (a revision) replaces
/// `after_revision`.
pub struct ListTransitions {
    pub agent_id: Option<String>,
    pub page: PageRequest<i64>,
    pub after: i64,
}

impl TryFrom<pb::ListTransitionsRequest> for ListTransitions {
    type Error = Error;

    fn try_from(request: pb::ListTransitionsRequest) -> Result<ListTransitions> {
        let pb::ListTransitionsRequest {
            agent_id,
            after_revision,
            page_size,
            page_token,
        } = request;
        let agent_id = match agent_id.as_str() {
            "" => None,
            id => Some(validate::agent_id("agent_id", id)?),
        };
        let page = PageRequest::<i64>::decode(page_size, &page_token)?;
        let after = match page.after {
            Some(revision) => revision,
            None => validate::revision("after_revision", after_revision)?,
        };
        Ok(ListTransitions {
            agent_id,
            page,
            after,
        })
    }
}
