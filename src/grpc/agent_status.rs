//! `fleetcare.v1.AgentStatusService`: decode, validate, call the store, encode.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::agent::{self, ExhaustionReason, ExhaustionReport};
use crate::domain::auth::{Action, Caller};
use crate::domain::batch::{Applied, Command};
use crate::domain::labels::Labels;
use crate::domain::quota;
use crate::error::Error;
use crate::grpc::agent_requests::{AgentCursor, AgentId, ListAgents, ListTransitions};
use crate::grpc::auth::{self, Guard};
use crate::grpc::callers::{CallerKey, WatchSlot, WatchSlots};
use crate::grpc::codec::{FrameStream, WatchFrame, WireCache};
use crate::grpc::convert::{self, timestamp};
use crate::grpc::trace::record_agent_id;
use crate::grpc::validate;
use crate::proto::v1 as pb;
use crate::proto::v1::agent_status_service_server::AgentStatusService;
use crate::runtime::agents::AgentWrites;
use crate::runtime::fanout::TransitionFanout;
use crate::runtime::watch::{self, WatchEvent, WatchSpec};
use crate::storage::{AgentStore, StatusCounts};

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct AgentStatusSettings {
    pub default_recovery: chrono::Duration,
    pub default_billing_recovery: chrono::Duration,
    pub watch_progress_interval: Duration,
}

pub struct AgentStatusApi {
    store: Arc<dyn AgentStore>,
    writes: AgentWrites,
    fanout: TransitionFanout,
    settings: AgentStatusSettings,
    shutdown: CancellationToken,
    watches: WatchSlots,
    guard: Guard,
    /// Transitions encoded once for every watch stream of this server.
    wire: Arc<WireCache>,
}

impl AgentStatusApi {
    pub fn new(
        store: Arc<dyn AgentStore>,
        writes: AgentWrites,
        fanout: TransitionFanout,
        settings: AgentStatusSettings,
        shutdown: CancellationToken,
        guard: Guard,
    ) -> Self {
        AgentStatusApi {
            store,
            writes,
            fanout,
            settings,
            shutdown,
            guard,
            watches: WatchSlots::default(),
            wire: Arc::default(),
        }
    }

    /// `WatchTransitions` as frames: each transition the bytes encoded once for
    /// every stream of this server (see `grpc::watch_route`, which serves it).
    pub async fn watch_frames(
        &self,
        request: Request<pb::WatchTransitionsRequest>,
    ) -> Result<Response<FrameStream>, Status> {
        let (slot, events) = self.open_watch(request).await?;
        let wire = self.wire.clone();
        let stream = ReceiverStream::new(events).map(move |item| {
            // The caller's slot is freed when the stream ends.
            let _slot = &slot;
            Ok(match item? {
                WatchEvent::Transition(t) => WatchFrame::Encoded(wire.transition(&t)),
                other => WatchFrame::Message(Box::new(watch_response(other))),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Checks and opens a watch: the caller's slot and the stream's events.
    async fn open_watch(
        &self,
        request: Request<pb::WatchTransitionsRequest>,
    ) -> Result<
        (
            WatchSlot,
            tokio::sync::mpsc::Receiver<crate::error::Result<WatchEvent>>,
        ),
        Status,
    > {
        let caller = auth::caller(&request)?;
        let slot = self.watches.acquire(CallerKey::of(&request))?;
        let spec: WatchSpec = request.into_inner().try_into()?;
        // An agent caller watches only agents of its scope, and must name them.
        self.guard
            .check_agents(&caller, Action::WatchTransitions, &spec.filter.agent_ids)
            .await?;
        let events = watch::open(
            self.store.clone(),
            &self.fanout,
            spec,
            self.settings.watch_progress_interval,
            self.shutdown.clone(),
        )
        .await?;
        Ok((slot, events))
    }

    /// Bounds the watch streams each caller may hold open.
    pub fn with_watch_slots(mut self, watches: WatchSlots) -> Self {
        self.watches = watches;
        self
    }

    /// Checks the caller on the command's agent, then commits it in its name.
    async fn commit_as(
        &self,
        caller: &Caller,
        action: Action,
        command: Command,
    ) -> Result<Applied, Error> {
        let agent_id = command.agent_id().unwrap_or_default();
        record_agent_id(agent_id);
        match &command {
            Command::Register {
                agent_id, labels, ..
            } => self.guard.check_register(caller, agent_id, labels).await?,
            _ => self.guard.check_agent(caller, action, agent_id).await?,
        }
        self.writes.commit(command.by(&caller.name)).await
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

    /// How many agents are in each status, as of one revision: the dashboard's
    /// counts. No RPC carries it (yet); it is authorized as `ListAgents`, the
    /// fleet-wide read it summarizes.
    pub async fn count_agents(&self, request: Request<()>) -> Result<StatusCounts, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ListAgents, None)?;
        Ok(self.store.count_by_status().await?)
    }
}

fn encode(applied: &Applied) -> (pb::Agent, Option<pb::Transition>) {
    (
        (&applied.agent).into(),
        applied.transition.as_ref().map(pb::Transition::from),
    )
}

/// A refused transition always records one; only a bug would get here without.
fn recorded(transition: Option<pb::Transition>) -> Result<pb::Transition, Status> {
    transition.ok_or_else(|| Error::Internal("transition was not recorded".into()).into())
}

/// One watch event as its message.
fn watch_response(event: WatchEvent) -> pb::WatchTransitionsResponse {
    use pb::watch_transitions_response::Event as E;
    let event = match event {
        WatchEvent::SnapshotAgent(agent) => E::SnapshotAgent((&*agent).into()),
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
    pb::WatchTransitionsResponse { event: Some(event) }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchTransitionsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentStatusService for AgentStatusApi {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let command = request.into_inner().try_into()?;
        let applied = self
            .commit_as(&caller, Action::RegisterAgent, command)
            .await?;
        if applied.created {
            tracing::info!(agent_id = %applied.agent.agent_id, "agent registered");
        }
        Ok(Response::new(pb::RegisterAgentResponse {
            agent: Some((&applied.agent).into()),
            created: applied.created,
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let caller = auth::caller(&request)?;
        let AgentId(agent_id) = request.into_inner().try_into()?;
        record_agent_id(&agent_id);
        self.guard
            .check_agent(&caller, Action::GetAgent, &agent_id)
            .await?;
        let agent = self
            .writes
            .with_latest_heartbeat(self.store.get_agent(&agent_id).await?);
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some((&agent).into()),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let ListAgents { page, query } = request.into_inner().try_into()?;
        self.guard.check(&caller, Action::ListAgents, None)?;
        let mut agents = self.store.list_agents(&query).await?;
        let next_page_token = page.finish(&mut agents, |a| AgentCursor(a.agent_id.clone()));
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|a| pb::Agent::from(&self.writes.with_latest_heartbeat(a)))
                .collect(),
            next_page_token,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = auth::caller(&request)?;
        let AgentId(agent_id) = request.into_inner().try_into()?;
        record_agent_id(&agent_id);
        self.guard
            .check_agent(&caller, Action::Heartbeat, &agent_id)
            .await?;
        let (applied, next) = self.writes.heartbeat(agent_id, &caller.name).await?;
        let (agent, transition) = encode(&applied);
        Ok(Response::new(pb::HeartbeatResponse {
            agent: Some(agent),
            transition,
            next_heartbeat_interval: Some(convert::duration(next)),
        }))
    }

    async fn start_work(
        &self,
        request: Request<pb::StartWorkRequest>,
    ) -> Result<Response<pb::StartWorkResponse>, Status> {
        let caller = auth::caller(&request)?;
        let command = request.into_inner().try_into()?;
        let applied = self.commit_as(&caller, Action::StartWork, command).await?;
        let (agent, transition) = encode(&applied);
        Ok(Response::new(pb::StartWorkResponse {
            agent: Some(agent),
            transition: Some(recorded(transition)?),
        }))
    }

    async fn finish_work(
        &self,
        request: Request<pb::FinishWorkRequest>,
    ) -> Result<Response<pb::FinishWorkResponse>, Status> {
        let caller = auth::caller(&request)?;
        let command = request.into_inner().try_into()?;
        let applied = self.commit_as(&caller, Action::FinishWork, command).await?;
        let (agent, transition) = encode(&applied);
        Ok(Response::new(pb::FinishWorkResponse {
            agent: Some(agent),
            transition: Some(recorded(transition)?),
        }))
    }

    async fn report_exhausted(
        &self,
        request: Request<pb::ReportExhaustedRequest>,
    ) -> Result<Response<pb::ReportExhaustedResponse>, Status> {
        let caller = auth::caller(&request)?;
        let pb::ReportExhaustedRequest {
            agent_id,
            reason,
            recovery_at,
            headers,
            message,
            time_zone,
            fencing_token,
            quota_pool,
            window,
        } = request.into_inner();
        let reason = convert::reason_from_pb(reason)?;
        let fencing_token = validate::fencing_token("fencing_token", fencing_token)?;
        let quota_pool = match quota_pool.as_str() {
            "" => None,
            name => Some(quota::pool_name("quota_pool", name).map_err(Error::from)?),
        };
        let window = convert::window_from_pb("window", window)?;
        let evidence = validate::recovery_evidence(
            recovery_at,
            headers,
            message,
            &time_zone,
            self.writes.now(),
        )?;
        let report = self.report(reason, evidence);
        let agent_id = validate::agent_id("agent_id", &agent_id)?;
        record_agent_id(&agent_id);
        self.guard
            .check_agent(&caller, Action::ReportExhausted, &agent_id)
            .await?;
        let command = Command::ReportExhausted {
            agent_id,
            report,
            quota_pool,
            window,
            fencing_token,
            actor: String::new(),
        };
        let applied = self.writes.commit(command.by(&caller.name)).await?;
        let (agent, transition) = encode(&applied);
        Ok(Response::new(pb::ReportExhaustedResponse {
            agent: Some(agent),
            transition: Some(recorded(transition)?),
        }))
    }

    async fn mark_offline(
        &self,
        request: Request<pb::MarkOfflineRequest>,
    ) -> Result<Response<pb::MarkOfflineResponse>, Status> {
        let caller = auth::caller(&request)?;
        let command = request.into_inner().try_into()?;
        let applied = self
            .commit_as(&caller, Action::MarkOffline, command)
            .await?;
        let (agent, transition) = encode(&applied);
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
        let (slot, events) = self.open_watch(request).await?;
        let stream = ReceiverStream::new(events).map(move |item| {
            // The caller's slot is freed when the stream ends.
            let _slot = &slot;
            Ok(watch_response(item?))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_transitions(
        &self,
        request: Request<pb::ListTransitionsRequest>,
    ) -> Result<Response<pb::ListTransitionsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let ListTransitions {
            agent_id,
            page,
            after,
        } = request.into_inner().try_into()?;
        match &agent_id {
            Some(id) => {
                record_agent_id(id);
                self.guard
                    .check_agent(&caller, Action::ListTransitions, id)
                    .await?
            }
            None => self.guard.check(&caller, Action::ListTransitions, None)?,
        }
        let bounds = self.store.revision_bounds().await?;
        let mut transitions = self
            .store
            .transitions_after(after, agent_id.as_deref(), page.fetch_limit())
            .await?;
        let next_page_token = page.finish(&mut transitions, |t| t.revision);
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
        let caller = auth::caller(&request)?;
        let pb::ExplainRecoveryRequest {
            reason,
            headers,
            message,
            time_zone,
            agent_id,
            recovery_at,
            window,
        } = request.into_inner();
        let reason = match reason {
            0 => ExhaustionReason::RateLimit,
            other => convert::reason_from_pb(other)?,
        };
        let stated = convert::window_from_pb("window", window)?;
        let evidence = validate::recovery_evidence(
            recovery_at,
            headers,
            message,
            &time_zone,
            self.writes.now(),
        )?;
        let labels = match agent_id.as_str() {
            "" => {
                self.guard.check(&caller, Action::ExplainRecovery, None)?;
                Labels::new()
            }
            id => {
                let id = validate::agent_id("agent_id", id)?;
                record_agent_id(&id);
                self.guard
                    .check_agent(&caller, Action::ExplainRecovery, &id)
                    .await?;
                self.store.get_agent(&id).await?.labels
            }
        };
        // The clock every write of this server decides with.
        let now = self.writes.now();
        let report = self.report(reason, evidence);
        let exhaustion = agent::exhaustion_of(&report, &labels, now);
        let window = quota::infer_window(&report, stated, now);
        Ok(Response::new(pb::ExplainRecoveryResponse {
            recovery_at: Some(timestamp(exhaustion.recovery.recovery_at)),
            recovery_source: convert::source_to_pb(exhaustion.recovery.source) as i32,
            recovery_hint: exhaustion.recovery.hint,
            reason: convert::reason_to_pb(exhaustion.reason) as i32,
            now: Some(timestamp(now)),
            window: convert::window_to_pb(window.window) as i32,
            window_evidence: window.evidence,
        }))
    }
}
