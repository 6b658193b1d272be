//! `fleetcare.v1.AgentStatusService`: decode, validate, call the store, encode.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::agent::{self, Event, ExhaustionReason, ExhaustionReport};
use crate::domain::transition::Labels;
use crate::domain::transition::{Agent, Transition, WatchFilter};
use crate::error::Error;
use crate::grpc::convert::{self, timestamp};
use crate::grpc::validate;
use crate::proto::v1 as pb;
use crate::proto::v1::agent_status_service_server::AgentStatusService;
use crate::runtime::fanout::TransitionFanout;
use crate::runtime::watch::{self, WatchEvent, WatchSpec};
use crate::storage::{AgentQuery, AgentStore};

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct AgentStatusSettings {
    pub default_recovery: chrono::Duration,
    pub default_billing_recovery: chrono::Duration,
    pub watch_progress_interval: Duration,
}

pub struct AgentStatusApi {
    store: Arc<dyn AgentStore>,
    fanout: TransitionFanout,
    settings: AgentStatusSettings,
    shutdown: CancellationToken,
}

impl AgentStatusApi {
    pub fn new(
        store: Arc<dyn AgentStore>,
        fanout: TransitionFanout,
        settings: AgentStatusSettings,
        shutdown: CancellationToken,
    ) -> Self {
        AgentStatusApi {
            store,
            fanout,
            settings,
            shutdown,
        }
    }

    /// A checked report with the server's defaults.
    fn report(
        &self,
        reason: ExhaustionReason,
        evidence: validate::RecoveryEvidence,
    ) -> ExhaustionReport {
        let validate::RecoveryEvidence {
            explicit_recovery_at,
            headers,
            message,
            time_zone,
        } = evidence;
        ExhaustionReport {
            reason,
            explicit_recovery_at,
            headers,
            message,
            time_zone,
            default_recovery: self.settings.default_recovery,
            default_billing_recovery: self.settings.default_billing_recovery,
        }
    }

    async fn apply(
        &self,
        agent_id: &str,
        event: Event,
    ) -> Result<(pb::Agent, Option<pb::Transition>), Error> {
        let agent_id = validate::agent_id("agent_id", agent_id)?;
        let (agent, transition) = self.store.apply(&agent_id, event).await?;
        Ok(encode(&agent, transition.as_ref()))
    }
}

fn encode(agent: &Agent, transition: Option<&Transition>) -> (pb::Agent, Option<pb::Transition>) {
    (agent.into(), transition.map(pb::Transition::from))
}

/// A refused transition always records one; only a bug would get here without.
fn recorded(transition: Option<pb::Transition>) -> Result<pb::Transition, Status> {
    transition.ok_or_else(|| Error::Internal("transition was not recorded".into()).into())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchTransitionsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentStatusService for AgentStatusApi {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let pb::RegisterAgentRequest { agent_id, labels } = request.into_inner();
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        let labels = validate::labels("labels", labels)?;
        let (agent, created, _) = self.store.register_agent(&agent_id, &labels).await?;
        if created {
            tracing::info!(agent_id = %agent_id, "agent registered");
        }
        Ok(Response::new(pb::RegisterAgentResponse {
            agent: Some((&agent).into()),
            created,
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let pb::GetAgentRequest { agent_id } = request.into_inner();
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        let agent = self.store.get_agent(&agent_id).await?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some((&agent).into()),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let pb::ListAgentsRequest {
            page_size,
            page_token,
            statuses,
            labels,
        } = request.into_inner();
        let limit = validate::page_size(page_size)?;
        let after = validate::decode_page_token(&page_token)?
            .map(|id| validate::agent_id("page_token", id))
            .transpose()?;
        let statuses = statuses
            .into_iter()
            .map(|s| convert::status_from_pb("statuses", s))
            .collect::<Result<Vec<_>, _>>()?;
        let query = AgentQuery {
            after_agent_id: after,
            statuses,
            labels: validate::labels("labels", labels)?,
            // One more than asked tells whether there is a next page.
            limit: limit + 1,
        };
        let mut agents = self.store.list_agents(&query).await?;
        let next_page_token = if agents.len() as i64 > limit {
            agents.truncate(limit as usize);
            agents
                .last()
                .map(|a| validate::encode_page_token(&a.agent_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(pb::Agent::from).collect(),
            next_page_token,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let pb::HeartbeatRequest { agent_id } = request.into_inner();
        let (agent, transition) = self.apply(&agent_id, Event::Heartbeat).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            agent: Some(agent),
            transition,
        }))
    }

    async fn start_work(
        &self,
        request: Request<pb::StartWorkRequest>,
    ) -> Result<Response<pb::StartWorkResponse>, Status> {
        let pb::StartWorkRequest {
            agent_id,
            slot_type,
        } = request.into_inner();
        let slot = convert::slot_from_pb(slot_type)?;
        let (agent, transition) = self.apply(&agent_id, Event::StartWork(slot)).await?;
        Ok(Response::new(pb::StartWorkResponse {
            agent: Some(agent),
            transition: Some(recorded(transition)?),
        }))
    }

    async fn finish_work(
        &self,
        request: Request<pb::FinishWorkRequest>,
    ) -> Result<Response<pb::FinishWorkResponse>, Status> {
        let pb::FinishWorkRequest { agent_id } = request.into_inner();
        let (agent, transition) = self.apply(&agent_id, Event::FinishWork).await?;
        Ok(Response::new(pb::FinishWorkResponse {
            agent: Some(agent),
            transition: Some(recorded(transition)?),
        }))
    }

    async fn report_exhausted(
        &self,
        request: Request<pb::ReportExhaustedRequest>,
    ) -> Result<Response<pb::ReportExhaustedResponse>, Status> {
        let pb::ReportExhaustedRequest {
            agent_id,
            reason,
            recovery_at,
            headers,
            message,
            time_zone,
        } = request.into_inner();
        let reason = convert::reason_from_pb(reason)?;
        let evidence = validate::recovery_evidence(recovery_at, headers, message, &time_zone)?;
        let report = self.report(reason, evidence);
        let (agent, transition) = self
            .apply(&agent_id, Event::ReportExhausted(report))
            .await?;
        Ok(Response::new(pb::ReportExhaustedResponse {
            agent: Some(agent),
            transition: Some(recorded(transition)?),
        }))
    }

    async fn mark_offline(
        &self,
        request: Request<pb::MarkOfflineRequest>,
    ) -> Result<Response<pb::MarkOfflineResponse>, Status> {
        let pb::MarkOfflineRequest { agent_id } = request.into_inner();
        let (agent, transition) = self.apply(&agent_id, Event::MarkOffline).await?;
        Ok(Response::new(pb::MarkOfflineResponse {
            agent: Some(agent),
            transition,
        }))
    }

    type WatchTransitionsStream = WatchStream;

    async fn watch_transitions(
        &self,
        request: Request<pb::WatchTransitionsRequest>,
    ) -> Result<Response<Self::WatchTransitionsStream>, Status> {
        let pb::WatchTransitionsRequest {
            since_revision,
            agent_ids,
            statuses,
            include_snapshot,
        } = request.into_inner();
        let since_revision = validate::revision("since_revision", since_revision)?;
        if include_snapshot && since_revision != 0 {
            return Err(Error::invalid(
                "since_revision must be 0 with include_snapshot: the snapshot sets the starting revision",
            )
            .into());
        }
        if agent_ids.len() > validate::MAX_WATCH_AGENTS {
            return Err(Error::invalid(format!(
                "agent_ids has {} entries, at most {} allowed",
                agent_ids.len(),
                validate::MAX_WATCH_AGENTS
            ))
            .into());
        }
        let agent_ids = agent_ids
            .iter()
            .map(|id| validate::agent_id("agent_ids", id))
            .collect::<Result<HashSet<_>, _>>()?;
        let statuses = statuses
            .into_iter()
            .map(|s| convert::status_from_pb("statuses", s))
            .collect::<Result<HashSet<_>, _>>()?;
        let spec = WatchSpec {
            since_revision,
            filter: WatchFilter {
                agent_ids,
                statuses,
            },
            include_snapshot,
        };
        let events = watch::open(
            self.store.clone(),
            &self.fanout,
            spec,
            self.settings.watch_progress_interval,
            self.shutdown.clone(),
        )
        .await?;
        let stream = ReceiverStream::new(events).map(|item| {
            use pb::watch_transitions_response::Event as E;
            let event = match item? {
                WatchEvent::SnapshotAgent(agent) => E::SnapshotAgent((&agent).into()),
                WatchEvent::SnapshotComplete {
                    revision,
                    agent_count,
                } => E::SnapshotComplete(pb::SnapshotComplete {
                    revision,
                    agent_count,
                }),
                WatchEvent::Transition(t) => E::Transition((&*t).into()),
                WatchEvent::Progress { revision } => E::Progress(pb::Progress { revision }),
            };
            Ok(pb::WatchTransitionsResponse { event: Some(event) })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_transitions(
        &self,
        request: Request<pb::ListTransitionsRequest>,
    ) -> Result<Response<pb::ListTransitionsResponse>, Status> {
        let pb::ListTransitionsRequest {
            agent_id,
            after_revision,
            page_size,
            page_token,
        } = request.into_inner();
        let agent_id = match agent_id.as_str() {
            "" => None,
            id => Some(validate::agent_id("agent_id", id)?),
        };
        let limit = validate::page_size(page_size)?;
        let after = match validate::decode_page_token(&page_token)? {
            Some(rev) => rev
                .parse::<i64>()
                .ok()
                .filter(|r| *r >= 0)
                .ok_or_else(|| Error::invalid("page_token is not one this server issued"))?,
            None => validate::revision("after_revision", after_revision)?,
        };
        let bounds = self.store.revision_bounds().await?;
        let mut transitions = self
            .store
            .transitions_after(after, agent_id.as_deref(), limit + 1)
            .await?;
        let next_page_token = if transitions.len() as i64 > limit {
            transitions.truncate(limit as usize);
            transitions
                .last()
                .map(|t| validate::encode_page_token(&t.revision.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTransitionsResponse {
            transitions: transitions.iter().map(pb::Transition::from).collect(),
            next_page_token,
            oldest_revision: bounds.oldest_retained(),
            head_revision: bounds.head,
        }))
    }

    async fn explain_recovery(
        &self,
        request: Request<pb::ExplainRecoveryRequest>,
    ) -> Result<Response<pb::ExplainRecoveryResponse>, Status> {
        let pb::ExplainRecoveryRequest {
            reason,
            headers,
            message,
            time_zone,
            agent_id,
            recovery_at,
        } = request.into_inner();
        let reason = match reason {
            0 => ExhaustionReason::RateLimit,
            other => convert::reason_from_pb(other)?,
        };
        let evidence = validate::recovery_evidence(recovery_at, headers, message, &time_zone)?;
        let labels = match agent_id.as_str() {
            "" => Labels::new(),
            id => {
                let id = validate::agent_id("agent_id", id)?;
                self.store.get_agent(&id).await?.labels
            }
        };
        // The server's clock; ReportExhausted uses the database's, which is
        // the same clock on any sane deployment.
        let now = chrono::Utc::now();
        let exhaustion = agent::exhaustion_of(&self.report(reason, evidence), &labels, now);
        Ok(Response::new(pb::ExplainRecoveryResponse {
            recovery_at: Some(timestamp(exhaustion.recovery.recovery_at)),
            recovery_source: convert::source_to_pb(exhaustion.recovery.source) as i32,
            recovery_hint: exhaustion.recovery.hint,
            reason: convert::reason_to_pb(exhaustion.reason) as i32,
            now: Some(timestamp(now)),
        }))
    }
}
