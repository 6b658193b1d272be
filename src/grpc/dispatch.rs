//! `fleetcare.v1.DispatchService`: decode, authorize, commit, encode. Its
//! transitions go through the group committer like every agent write.

use tonic::{Request, Response, Status};

use crate::domain::auth::{Action, Caller};
use crate::domain::batch::Command;
use crate::error::{Error, Result};
use crate::grpc::auth::{self, Guard};
use crate::grpc::trace::record_agent_id;
use crate::grpc::validate;
use crate::proto::v1 as pb;
use crate::proto::v1::dispatch_service_server::DispatchService;
use crate::runtime::agents::AgentWrites;

/// The longest `reason` an override takes, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

pub struct DispatchApi {
    writes: AgentWrites,
    guard: Guard,
}

impl DispatchApi {
    pub fn new(writes: AgentWrites, guard: Guard) -> Self {
        DispatchApi { writes, guard }
    }
}

/// A checked `ResumeAgentRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAgent {
    pub agent_id: String,
    pub reason: String,
}

impl TryFrom<pb::ResumeAgentRequest> for ResumeAgent {
    type Error = Error;

    fn try_from(request: pb::ResumeAgentRequest) -> Result<ResumeAgent> {
        let pb::ResumeAgentRequest { agent_id, reason } = request;
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        validate::bounded_text("reason", &reason, MAX_REASON_BYTES)?;
        Ok(ResumeAgent { agent_id, reason })
    }
}

/// A checked `CordonAgentRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CordonAgent {
    pub agent_id: String,
    pub reason: String,
}

impl TryFrom<pb::CordonAgentRequest> for CordonAgent {
    type Error = Error;

    fn try_from(request: pb::CordonAgentRequest) -> Result<CordonAgent> {
        let pb::CordonAgentRequest { agent_id, reason } = request;
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        validate::bounded_text("reason", &reason, MAX_REASON_BYTES)?;
        Ok(CordonAgent { agent_id, reason })
    }
}

impl DispatchApi {
    /// Authorizes and commits a cordon command: the agent as it left it and
    /// its transition (none when it was as asked already).
    async fn cordon(
        &self,
        caller: &Caller,
        action: Action,
        command: Command,
    ) -> Result<(pb::Agent, Option<pb::Transition>)> {
        record_agent_id(command.agent_id());
        self.guard
            .check_agent(caller, action, command.agent_id())
            .await?;
        let applied = self.writes.commit(command.by(&caller.name)).await?;
        if let Some(t) = &applied.transition {
            tracing::info!(
                agent_id = %applied.agent.agent_id,
                revision = t.revision,
                actor = %caller.name,
                cause = t.cause.as_str(),
                reason = applied.agent.cordon_reason.as_deref().unwrap_or_default(),
                "agent cordon changed"
            );
        }
        Ok((
            (&applied.agent).into(),
            applied.transition.as_ref().map(Into::into),
        ))
    }
}

#[tonic::async_trait]
impl DispatchService for DispatchApi {
    async fn resume_agent(
        &self,
        request: Request<pb::ResumeAgentRequest>,
    ) -> Result<Response<pb::ResumeAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let ResumeAgent { agent_id, reason } = request.into_inner().try_into()?;
        record_agent_id(&agent_id);
        self.guard
            .check_agent(&caller, Action::ResumeAgent, &agent_id)
            .await?;
        let command = Command::Resume {
            agent_id,
            actor: String::new(),
        };
        let applied = self.writes.commit(command.by(&caller.name)).await?;
        let transition = applied
            .transition
            .as_ref()
            .ok_or_else(|| Error::Internal("transition was not recorded".into()))?;
        // The transition has no place for a reason: the log keeps it.
        tracing::info!(
            agent_id = %applied.agent.agent_id,
            revision = transition.revision,
            actor = %caller.name,
            reason = %reason,
            "agent resumed"
        );
        Ok(Response::new(pb::ResumeAgentResponse {
            agent: Some((&applied.agent).into()),
            transition: Some(transition.into()),
        }))
    }

    async fn cordon_agent(
        &self,
        request: Request<pb::CordonAgentRequest>,
    ) -> Result<Response<pb::CordonAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let CordonAgent { agent_id, reason } = request.into_inner().try_into()?;
        let command = Command::Cordon {
            agent_id,
            reason,
            actor: String::new(),
        };
        let (agent, transition) = self.cordon(&caller, Action::CordonAgent, command).await?;
        Ok(Response::new(pb::CordonAgentResponse {
            agent: Some(agent),
            transition,
        }))
    }

    async fn uncordon_agent(
        &self,
        request: Request<pb::UncordonAgentRequest>,
    ) -> Result<Response<pb::UncordonAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::UncordonAgentRequest { agent_id } = request.into_inner();
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        let command = Command::Uncordon {
            agent_id,
            actor: String::new(),
        };
        let (agent, transition) = self.cordon(&caller, Action::UncordonAgent, command).await?;
        Ok(Response::new(pb::UncordonAgentResponse {
            agent: Some(agent),
            transition,
        }))
    }

    async fn claim_agent(
        &self,
        _request: Request<pb::ClaimAgentRequest>,
    ) -> Result<Response<pb::ClaimAgentResponse>, Status> {
        Err(Status::unimplemented("ClaimAgent"))
    }

    async fn renew_claim(
        &self,
        _request: Request<pb::RenewClaimRequest>,
    ) -> Result<Response<pb::RenewClaimResponse>, Status> {
        Err(Status::unimplemented("RenewClaim"))
    }

    async fn release_claim(
        &self,
        _request: Request<pb::ReleaseClaimRequest>,
    ) -> Result<Response<pb::ReleaseClaimResponse>, Status> {
        Err(Status::unimplemented("ReleaseClaim"))
    }

    async fn list_claims(
        &self,
        _request: Request<pb::ListClaimsRequest>,
    ) -> Result<Response<pb::ListClaimsResponse>, Status> {
        Err(Status::unimplemented("ListClaims"))
    }

    async fn delete_agent(
        &self,
        _request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        Err(Status::unimplemented("DeleteAgent"))
    }
}
