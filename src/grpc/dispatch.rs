//! `fleetcare.v1.DispatchService`: decode, authorize, commit, encode. Its
//! transitions go through the group committer like every agent write.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain::agent::AgentStatus;
use crate::domain::auth::{Action, Caller};
use crate::domain::batch::{Applied, Command};
use crate::domain::dispatch::{
    self, ClaimRequest, LabelSelector, Operator, Requirement, StaleKind,
};
use crate::domain::transition::Claim;
use crate::error::{Error, Result};
use crate::grpc::agent_requests::AgentCursor;
use crate::grpc::auth::{self, Guard};
use crate::grpc::convert;
use crate::grpc::trace::record_agent_id;
use crate::grpc::validate;
use crate::grpc::validate::PageRequest;
use crate::metrics::{CLAIM_REFUSALS, Metrics, ReasonLabel};
use crate::proto::v1 as pb;
use crate::proto::v1::dispatch_service_server::DispatchService;
use crate::runtime::agents::AgentWrites;
use crate::runtime::claims::ClaimWaiters;
use crate::storage::{AgentStore, ClaimQuery};

/// The longest `reason` an override takes, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

pub struct DispatchApi {
    store: Arc<dyn AgentStore>,
    writes: AgentWrites,
    guard: Guard,
    waiters: Arc<ClaimWaiters>,
    settings: DispatchSettings,
    metrics: Arc<Metrics>,
}

/// The dispatch service's settings.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// `--max-claim-lease`.
    pub max_claim_lease: chrono::Duration,
}

impl DispatchApi {
    pub fn new(
        store: Arc<dyn AgentStore>,
        writes: AgentWrites,
        guard: Guard,
        waiters: Arc<ClaimWaiters>,
        settings: DispatchSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        DispatchApi {
            store,
            writes,
            guard,
            waiters,
            settings,
            metrics,
        }
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
        let agent_id = command.agent_id().unwrap_or_default();
        record_agent_id(agent_id);
        self.guard.check_agent(caller, action, agent_id).await?;
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
        request: Request<pb::ClaimAgentRequest>,
    ) -> Result<Response<pb::ClaimAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let decoded = self.decode_claim(request.into_inner());
        let request = match decoded {
            Ok(request) => request,
            Err(error) => return Err(self.refused(error).into()),
        };
        if let Err(error) = self.guard.check(&caller, Action::ClaimAgent, None) {
            return Err(self.refused(error).into());
        }
        let applied = match self.claim(&caller, request).await {
            Ok(applied) => applied,
            Err(error) => return Err(self.refused(error).into()),
        };
        let claim = applied
            .claim
            .as_ref()
            .ok_or_else(|| Error::Internal("claim was not recorded".into()))?;
        record_agent_id(&claim.agent_id);
        if let Some(t) = &applied.transition {
            tracing::info!(
                agent_id = %claim.agent_id,
                claim_id = %claim.claim_id,
                fencing_token = claim.fencing_token,
                revision = t.revision,
                holder = %claim.holder,
                "agent claimed"
            );
        }
        Ok(Response::new(pb::ClaimAgentResponse {
            claim: Some(claim.into()),
            agent: Some((&applied.agent).into()),
            transition: applied.transition.as_ref().map(Into::into),
        }))
    }

    async fn renew_claim(
        &self,
        request: Request<pb::RenewClaimRequest>,
    ) -> Result<Response<pb::RenewClaimResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::RenewClaimRequest {
            claim_id,
            fencing_token,
            lease_duration,
        } = request.into_inner();
        let lease = self.lease("lease_duration", lease_duration)?;
        let (agent_id, fencing_token) = self
            .claimed(&caller, Action::RenewClaim, &claim_id, fencing_token)
            .await?;
        let command = Command::RenewClaim {
            agent_id,
            claim_id: claim_id.clone(),
            fencing_token,
            lease,
            actor: String::new(),
        };
        let committed = self.writes.commit(command.by(&caller.name)).await;
        let applied = self.known_claim(&claim_id, committed).await?;
        let claim = applied
            .claim
            .as_ref()
            .ok_or_else(|| Error::Internal("claim was not renewed".into()))?;
        Ok(Response::new(pb::RenewClaimResponse {
            claim: Some(claim.into()),
        }))
    }

    async fn release_claim(
        &self,
        request: Request<pb::ReleaseClaimRequest>,
    ) -> Result<Response<pb::ReleaseClaimResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::ReleaseClaimRequest {
            claim_id,
            fencing_token,
        } = request.into_inner();
        let (agent_id, fencing_token) = self
            .claimed(&caller, Action::ReleaseClaim, &claim_id, fencing_token)
            .await?;
        let command = Command::ReleaseClaim {
            agent_id,
            claim_id: claim_id.clone(),
            fencing_token,
            actor: String::new(),
        };
        let committed = self.writes.commit(command.by(&caller.name)).await;
        let applied = self.known_claim(&claim_id, committed).await?;
        let transition = applied
            .transition
            .as_ref()
            .ok_or_else(|| Error::Internal("transition was not recorded".into()))?;
        Ok(Response::new(pb::ReleaseClaimResponse {
            agent: Some((&applied.agent).into()),
            transition: Some(transition.into()),
        }))
    }

    async fn list_claims(
        &self,
        request: Request<pb::ListClaimsRequest>,
    ) -> Result<Response<pb::ListClaimsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::ListClaimsRequest {
            page_size,
            page_token,
            holder,
        } = request.into_inner();
        let page = PageRequest::<AgentCursor>::decode(page_size, &page_token)?;
        validate::bounded_text("holder", &holder, MAX_REASON_BYTES)?;
        self.guard.check(&caller, Action::ListClaims, None)?;
        let query = ClaimQuery {
            after_agent_id: page.after.as_ref().map(|c| c.0.clone()),
            holder: (!holder.is_empty()).then_some(holder),
            limit: page.fetch_limit(),
        };
        let mut claims = self.store.list_claims(&query).await?;
        let next_page_token = page.finish(&mut claims, |c| AgentCursor(c.agent_id.clone()));
        Ok(Response::new(pb::ListClaimsResponse {
            claims: claims.iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn delete_agent(
        &self,
        request: Request<pb::DeleteAgentRequest>,
    ) -> Result<Response<pb::DeleteAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::DeleteAgentRequest { agent_id } = request.into_inner();
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        record_agent_id(&agent_id);
        self.guard
            .check_agent(&caller, Action::DeleteAgent, &agent_id)
            .await?;
        let command = Command::Delete {
            agent_id,
            actor: String::new(),
        };
        let applied = self.writes.commit(command.by(&caller.name)).await?;
        let transition = applied
            .transition
            .as_ref()
            .ok_or_else(|| Error::Internal("transition was not recorded".into()))?;
        tracing::info!(
            agent_id = %transition.agent_id,
            revision = transition.revision,
            actor = %caller.name,
            "agent deleted"
        );
        Ok(Response::new(pb::DeleteAgentResponse {
            transition: Some(transition.into()),
        }))
    }
}

impl DispatchApi {
    /// A checked `ClaimAgentRequest`, refused naming the first bad field.
    fn decode_claim(&self, request: pb::ClaimAgentRequest) -> Result<ClaimRequest> {
        let pb::ClaimAgentRequest {
            selector,
            slot_type,
            lease_duration,
            wait_timeout,
            request_id,
        } = request;
        let selector = selector_from_pb(selector.unwrap_or_default())?;
        let slot_type = convert::slot_from_pb(slot_type)?;
        let lease_duration = match lease_duration {
            Some(d) => convert::from_duration("lease_duration", d)?,
            None => return Err(Error::invalid("lease_duration is required")),
        };
        let wait_timeout = match wait_timeout {
            Some(d) => convert::from_duration("wait_timeout", d)?,
            None => chrono::Duration::zero(),
        };
        let request = ClaimRequest {
            selector,
            slot_type,
            lease_duration,
            wait_timeout,
            request_id,
        };
        request
            .validate(self.settings.max_claim_lease)
            .map_err(|e| Error::invalid(e.to_string()))
    }

    /// A lease for `RenewClaim`, within the bounds a claim's is.
    fn lease(&self, field: &str, lease: Option<prost_types::Duration>) -> Result<chrono::Duration> {
        let lease = match lease {
            Some(d) => convert::from_duration(field, d)?,
            None => return Err(Error::invalid(format!("{field} is required"))),
        };
        dispatch::lease_duration(lease, self.settings.max_claim_lease)
            .map_err(|e| Error::invalid(e.to_string()))
    }

    /// The agent of the claim a call names, and the token it carries, the
    /// caller authorized on that agent. The agent is read from the claim id
    /// ([`dispatch::claim_agent`]): no lookup on the way in, the batch decides
    /// on the agent's locked row whether the claim is its active one (and
    /// [`Self::known_claim`] tells an unknown claim from an ended one). A
    /// claim made before ids carried their agent is looked up: NOT_FOUND for
    /// a claim no one made (or one pruned with the history of its time).
    async fn claimed(
        &self,
        caller: &Caller,
        action: Action,
        claim_id: &str,
        fencing_token: i64,
    ) -> Result<(String, i64)> {
        if claim_id.is_empty() {
            return Err(Error::invalid("claim_id is required"));
        }
        validate::bounded_text("claim_id", claim_id, dispatch::MAX_CLAIM_ID)?;
        let token = validate::fencing_token("fencing_token", fencing_token)?
            .ok_or_else(|| Error::invalid("fencing_token is required"))?;
        let agent_id = match dispatch::claim_agent(claim_id) {
            Some(agent_id) => agent_id.to_owned(),
            None => self.stored_claim(claim_id).await?.agent_id,
        };
        record_agent_id(&agent_id);
        self.guard.check_agent(caller, action, &agent_id).await?;
        Ok((agent_id, token))
    }

    /// The claim recorded as `claim_id`, or NOT_FOUND.
    async fn stored_claim(&self, claim_id: &str) -> Result<Claim> {
        self.store
            .find_claim(claim_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "claim",
                id: claim_id.to_owned(),
            })
    }

    /// A renewal's or release's answer, where a refusal because the named
    /// claim is not the agent's active one (or the agent is gone) becomes
    /// NOT_FOUND when no such claim was ever made: only refusals pay the
    /// lookup.
    async fn known_claim(&self, claim_id: &str, committed: Result<Applied>) -> Result<Applied> {
        let unknown = matches!(
            &committed,
            Err(Error::StaleFencingToken(stale)) if stale.kind == StaleKind::ClaimEnded
        ) || matches!(&committed, Err(Error::NotFound { kind: "agent", .. }));
        if unknown {
            self.stored_claim(claim_id).await?;
        }
        committed
    }

    /// Makes the claim: at once, or, with a wait, as soon as a matching agent
    /// is free (woken by the fan-out, in arrival order among this process's
    /// waiting claims), until the wait runs out.
    async fn claim(&self, caller: &Caller, request: ClaimRequest) -> Result<Applied> {
        let deadline =
            tokio::time::Instant::now() + request.wait_timeout.to_std().unwrap_or_default();
        // In line before the first attempt: an agent freed after it fails
        // still wakes this claim.
        let mut ticket = (request.wait_timeout > chrono::Duration::zero())
            .then(|| self.waiters.enqueue(request.selector.clone()));
        let command = Command::Claim {
            unique: uuid::Uuid::new_v4().simple().to_string(),
            request: request.clone(),
            actor: String::new(),
        }
        .by(&caller.name);
        let mut contended = 0;
        loop {
            match self.writes.commit(command.clone()).await {
                Err(Error::NoAgentAvailable(_)) => {}
                other => {
                    if let (Ok(_), Some(ticket)) = (&other, ticket) {
                        ticket.claimed();
                    }
                    return other;
                }
            }
            let counted = self.store.no_agent_available(&request.selector).await?;
            // Idle matching agents exist but were held by other transactions
            // at that instant (SKIP LOCKED): try again rather than refuse.
            if counted.of_status(AgentStatus::Idle) > 0 && contended < CONTENDED_ATTEMPTS {
                contended += 1;
                tokio::task::yield_now().await;
                continue;
            }
            let Some(ticket) = ticket.as_mut() else {
                return Err(Error::NoAgentAvailable(counted.message(self.writes.now())));
            };
            tokio::select! {
                // Woken at its deadline, a claim looks once more (and the
                // simulation's runs do not depend on tokio's coin).
                biased;
                _ = ticket.woken() => contended = 0,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Error::NoAgentAvailable(format!(
                        "{} (waited {} s)",
                        counted.message(self.writes.now()),
                        request.wait_timeout.num_seconds()
                    )));
                }
            }
        }
    }

    /// Counts a refused claim by its reason, and passes the error on.
    fn refused(&self, error: Error) -> Error {
        let reason = crate::grpc::status::reason(&error);
        if CLAIM_REFUSALS.contains(&reason) {
            self.metrics
                .claims_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        error
    }
}

/// How often a claim that found only contended idle agents tries again
/// before it is refused (or waits).
const CONTENDED_ATTEMPTS: usize = 3;

/// A `LabelSelector` as the domain's, refused naming the first bad field.
fn selector_from_pb(selector: pb::LabelSelector) -> Result<LabelSelector> {
    let pb::LabelSelector {
        match_labels,
        match_expressions,
    } = selector;
    let match_expressions = match_expressions
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let name = pb::SelectorOperator::try_from(r.operator)
                .map(|op| op.as_str_name().trim_start_matches("SELECTOR_OPERATOR_"))
                .unwrap_or("UNKNOWN");
            let operator = Operator::parse(i, name).map_err(|e| Error::invalid(e.to_string()))?;
            Ok(Requirement {
                key: r.key,
                operator,
                values: r.values,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LabelSelector {
        match_labels: match_labels.into_iter().collect(),
        match_expressions,
    })
}
