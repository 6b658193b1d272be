//! Authorization at the gRPC edge.
//!
//! Every call to a fleetcare service carries its caller in the request's
//! extensions, put there by the admission layer (`grpc::guard::Admission`,
//! from `authorization: Bearer <token>`) before the call was routed. Each
//! handler then decodes its request and asks [`Guard`] whether its caller may
//! do that, on that agent: PERMISSION_DENIED naming what was refused, or on.

use std::sync::Arc;

use tonic::Request;

use crate::domain::auth::{self, Action, Caller};
use crate::domain::labels::Labels;
use crate::error::Error;
use crate::runtime::agent_cache::AgentCache;
use crate::storage::AgentStore;

/// The caller admission found (UNAUTHENTICATED if it did not run).
pub fn caller<T>(request: &Request<T>) -> Result<Arc<Caller>, Error> {
    request
        .extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Error::Unauthenticated("no caller".into()))
}

fn refused(denied: auth::Denied) -> Error {
    tracing::warn!(caller = %denied.caller, role = %denied.role, rpc = denied.rpc, detail = %denied.detail, "permission denied");
    Error::PermissionDenied(denied)
}

/// Authorization as the handlers ask for it: roles and agent scopes, and label
/// scopes checked on the agents' labels (from this process's agent cache,
/// else the store).
#[derive(Clone)]
pub struct Guard {
    cache: Arc<AgentCache>,
    agents: Arc<dyn AgentStore>,
}

impl Guard {
    pub fn new(cache: Arc<AgentCache>, agents: Arc<dyn AgentStore>) -> Guard {
        Guard { cache, agents }
    }

    /// A call on no agent, or on every agent (`agent_id` `None`), or checked
    /// by agent id only.
    pub fn check(
        &self,
        caller: &Caller,
        action: Action,
        agent_id: Option<&str>,
    ) -> Result<(), Error> {
        auth::authorize(caller, action, agent_id).map_err(refused)
    }

    /// A call on one agent: role, scope, and the caller's label scope on the
    /// agent's stored labels (an unknown agent is NOT_FOUND for such a caller).
    pub async fn check_agent(
        &self,
        caller: &Caller,
        action: Action,
        agent_id: &str,
    ) -> Result<(), Error> {
        self.check(caller, action, Some(agent_id))?;
        if !caller.checks_labels() {
            return Ok(());
        }
        let labels = match self.labels_of(agent_id).await? {
            Some(labels) => labels,
            None => return Err(Error::agent_not_found(agent_id)),
        };
        auth::authorize_labels(caller, action, agent_id, &labels).map_err(refused)
    }

    /// Several agents (a watch's filter): each must be allowed.
    pub async fn check_agents<'a>(
        &self,
        caller: &Caller,
        action: Action,
        agent_ids: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), Error> {
        let mut any = false;
        for agent_id in agent_ids {
            any = true;
            self.check_agent(caller, action, agent_id).await?;
        }
        if !any {
            self.check(caller, action, None)?;
        }
        Ok(())
    }

    /// A registration: the agent as it is (if it exists) and the labels it
    /// will carry must both be within the caller's label scope, so that a
    /// caller can neither take over another team's agent nor create one
    /// outside its labels.
    pub async fn check_register(
        &self,
        caller: &Caller,
        agent_id: &str,
        labels: &Labels,
    ) -> Result<(), Error> {
        let action = Action::RegisterAgent;
        self.check(caller, action, Some(agent_id))?;
        if !caller.checks_labels() {
            return Ok(());
        }
        auth::authorize_labels(caller, action, agent_id, labels).map_err(refused)?;
        if let Some(current) = self.labels_of(agent_id).await? {
            auth::authorize_labels(caller, action, agent_id, &current).map_err(refused)?;
        }
        Ok(())
    }

    async fn labels_of(&self, agent_id: &str) -> Result<Option<Labels>, Error> {
        if let Some(labels) = self.cache.labels(agent_id) {
            return Ok(Some(labels));
        }
        match self.agents.get_agent(agent_id).await {
            Ok(agent) => Ok(Some(agent.labels)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }
}
