//! `fleetcare.v1.SessionPipelineService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::auth::Action;
use crate::domain::pipeline::{
    RunStats, SessionRef, SessionState, SessionStatesQuery, SessionStatus, valid_session_path,
    valid_user_dir,
};
use crate::domain::pipeline_runs::{RunCursor, RunRecord, RunTrigger, RunsQuery, StartedBy};
use crate::domain::usage::{UsageGrouping, UsageQuery, UsageRow};
use crate::error::Error;
use crate::grpc::auth::{self, Guard};
use crate::grpc::callers::{CallerKey, WatchSlots};
use crate::grpc::convert::{duration, from_timestamp, timestamp};
use crate::grpc::validate::{self, PageCursor};
use crate::proto::v1 as pb;
use crate::proto::v1::session_pipeline_service_server::SessionPipelineService;
use crate::runtime::pipeline::{Pipeline, RunProgress};

pub struct SessionPipelineApi {
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    guard: Guard,
    watches: WatchSlots,
}

impl SessionPipelineApi {
    pub fn new(pipeline: Arc<Pipeline>, shutdown: CancellationToken, guard: Guard) -> Self {
        SessionPipelineApi {
            pipeline,
            shutdown,
            guard,
            watches: WatchSlots::default(),
        }
    }

    /// Bounds the watch streams each caller may hold open (shared with the
    /// agent-status watches: one budget per caller).
    pub fn with_watch_slots(mut self, watches: WatchSlots) -> Self {
        self.watches = watches;
        self
    }

    /// The processor by name: NOT_FOUND when none has it.
    fn known(&self, ProcessorName(name): ProcessorName) -> Result<String, Error> {
        self.pipeline
            .processors()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(n, _, _)| n.to_owned())
            .ok_or(Error::NotFound {
                kind: "processor",
                id: name,
            })
    }
}

/// A processor's name as a request gives it (whether one has it is checked after).
struct ProcessorName(String);

impl ProcessorName {
    fn parse(name: String) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(Error::invalid("name of the processor is required"));
        }
        Ok(ProcessorName(name))
    }
}

impl TryFrom<pb::RunProcessorRequest> for ProcessorName {
    type Error = Error;

    fn try_from(r: pb::RunProcessorRequest) -> Result<Self, Error> {
        let pb::RunProcessorRequest { name } = r;
        ProcessorName::parse(name)
    }
}

impl TryFrom<pb::WatchRunRequest> for ProcessorName {
    type Error = Error;

    fn try_from(r: pb::WatchRunRequest) -> Result<Self, Error> {
        let pb::WatchRunRequest { name } = r;
        ProcessorName::parse(name)
    }
}

/// ListRuns pages: 50 runs unless asked, at most 500.
pub const DEFAULT_RUNS_PAGE_SIZE: i64 = 50;
pub const MAX_RUNS_PAGE_SIZE: i64 = 500;

/// A ListRuns page token carries the previous page's last run: its start in
/// microseconds since the epoch and its id.
impl PageCursor for RunCursor {
    fn encode(&self) -> String {
        format!("{}.{}", self.started_at.timestamp_micros(), self.id)
    }

    fn decode(text: &str) -> Option<Self> {
        let (micros, id) = text.split_once('.')?;
        Some(RunCursor {
            started_at: chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.parse().ok().filter(|id| *id >= 0)?,
        })
    }
}

/// A decoded `ListRunsRequest`: the processor it names, if any, and the query.
/// (The request types are the client crate's, so a decoded request is a type
/// of this crate, not a tuple: the orphan rule.)
struct RunsRequest {
    name: Option<ProcessorName>,
    query: RunsQuery,
}

impl TryFrom<pb::ListRunsRequest> for RunsRequest {
    type Error = Error;

    fn try_from(r: pb::ListRunsRequest) -> Result<Self, Error> {
        let pb::ListRunsRequest {
            processor,
            page_size,
            page_token,
        } = r;
        let name = (!processor.is_empty()).then_some(ProcessorName(processor));
        let limit = match i64::from(page_size) {
            0 => DEFAULT_RUNS_PAGE_SIZE,
            n if n < 0 => {
                return Err(Error::invalid(format!(
                    "page_size {n} must not be negative"
                )));
            }
            n => n.min(MAX_RUNS_PAGE_SIZE),
        };
        let before = validate::page_cursor::<RunCursor>(&page_token)?;
        let query = RunsQuery {
            processor: name.as_ref().map(|n| n.0.clone()),
            before,
            limit,
        };
        Ok(RunsRequest { name, query })
    }
}

fn started_by_to_pb(s: StartedBy) -> i32 {
    match s {
        StartedBy::Unknown => pb::RunTrigger::Unspecified as i32,
        StartedBy::Scheduler => pb::RunTrigger::Scheduler as i32,
        StartedBy::Call => pb::RunTrigger::Call as i32,
    }
}

fn run_to_pb(r: &RunRecord) -> pb::PipelineRun {
    pb::PipelineRun {
        id: r.id,
        processor: r.processor.clone(),
        trigger: started_by_to_pb(r.trigger.started_by),
        actor: r.trigger.actor.clone(),
        started_at: Some(timestamp(r.started_at)),
        finished_at: Some(timestamp(r.finished_at)),
        stats: Some(stats_to_pb(&r.stats)),
    }
}

fn user_filter(user: String) -> Result<Option<String>, Error> {
    match user.as_str() {
        "" => Ok(None),
        u if valid_user_dir(u) => Ok(Some(user)),
        u => Err(Error::invalid(format!(
            "user {u:?} is not a valid user name"
        ))),
    }
}

/// A decoded `ListSessionStatesRequest`.
struct SessionStatesRequest {
    name: ProcessorName,
    query: SessionStatesQuery,
}

impl TryFrom<pb::ListSessionStatesRequest> for SessionStatesRequest {
    type Error = Error;

    fn try_from(r: pb::ListSessionStatesRequest) -> Result<Self, Error> {
        let pb::ListSessionStatesRequest {
            processor,
            status,
            user,
            page_size,
            page_token,
        } = r;
        let name = ProcessorName::parse(processor)?;
        let query = SessionStatesQuery {
            processor: name.0.clone(),
            status: status_from_pb(status)?,
            user: user_filter(user)?,
            after_path: validate::decode_page_token(&page_token)?
                .map(|p| session_path(p.to_owned()))
                .transpose()?,
            limit: validate::page_size(page_size)?,
        };
        Ok(SessionStatesRequest { name, query })
    }
}

/// A decoded `RetrySessionRequest`.
struct RetrySession {
    name: ProcessorName,
    session: SessionRef,
}

impl TryFrom<pb::RetrySessionRequest> for RetrySession {
    type Error = Error;

    fn try_from(r: pb::RetrySessionRequest) -> Result<Self, Error> {
        let pb::RetrySessionRequest { processor, session } = r;
        let name = ProcessorName::parse(processor)?;
        let path = session_path(session)?;
        Ok(RetrySession {
            name: ProcessorName(name.0.clone()),
            session: SessionRef {
                processor: name.0,
                path,
            },
        })
    }
}

impl TryFrom<pb::GetUsageRequest> for UsageQuery {
    type Error = Error;

    fn try_from(r: pb::GetUsageRequest) -> Result<Self, Error> {
        let pb::GetUsageRequest {
            group_by,
            since,
            until,
            user,
        } = r;
        let group_by = match pb::UsageGrouping::try_from(group_by) {
            Ok(pb::UsageGrouping::Day) => UsageGrouping::Day,
            Ok(pb::UsageGrouping::Session) => UsageGrouping::Session,
            Ok(pb::UsageGrouping::Model) => UsageGrouping::Model,
            Ok(pb::UsageGrouping::User) => UsageGrouping::User,
            Ok(pb::UsageGrouping::Unspecified) | Err(_) => {
                return Err(Error::invalid(format!(
                    "group_by {group_by} is not one of USAGE_GROUPING_DAY, _SESSION, _MODEL or _USER"
                )));
            }
        };
        let since = since.map(|t| from_timestamp("since", t)).transpose()?;
        let until = until.map(|t| from_timestamp("until", t)).transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            return Err(Error::invalid("since must not be after until"));
        }
        Ok(UsageQuery {
            group_by,
            since,
            until,
            user: user_filter(user)?,
        })
    }
}

fn stats_to_pb(s: &RunStats) -> pb::RunStats {
    pb::RunStats {
        scanned: s.scanned,
        processed: s.processed,
        skipped: s.skipped,
        failed: s.failed,
        dead: s.dead,
        items_extracted: s.items_extracted,
        lines_skipped: s.lines_skipped,
        files_hashed: s.files_hashed,
        bytes_hashed: s.bytes_hashed,
        errors: s
            .errors
            .iter()
            .map(|(session, error)| pb::SessionError {
                session: session.clone(),
                error: error.clone(),
            })
            .collect(),
        started_at: s.started_at.map(timestamp),
        finished_at: s.finished_at.map(timestamp),
        skipped_entries: s.skipped_entries.clone(),
        root_error: s.root_error.clone().unwrap_or_default(),
    }
}

fn status_to_pb(s: SessionStatus) -> i32 {
    match s {
        SessionStatus::Processed => pb::SessionStatus::Processed as i32,
        SessionStatus::Failed => pb::SessionStatus::Failed as i32,
        SessionStatus::Dead => pb::SessionStatus::Dead as i32,
    }
}

fn status_from_pb(value: i32) -> Result<Option<SessionStatus>, Error> {
    match pb::SessionStatus::try_from(value) {
        Ok(pb::SessionStatus::Unspecified) => Ok(None),
        Ok(pb::SessionStatus::Processed) => Ok(Some(SessionStatus::Processed)),
        Ok(pb::SessionStatus::Failed) => Ok(Some(SessionStatus::Failed)),
        Ok(pb::SessionStatus::Dead) => Ok(Some(SessionStatus::Dead)),
        Err(_) => Err(Error::invalid(format!(
            "status {value} is not a session status"
        ))),
    }
}

fn state_to_pb(s: &SessionState) -> pb::SessionState {
    pb::SessionState {
        processor: s.processor.clone(),
        session: s.path.clone(),
        user: s.user.clone(),
        size: i64::try_from(s.size).unwrap_or(i64::MAX),
        mtime: Some(timestamp(chrono::DateTime::from_timestamp_nanos(
            s.mtime_ns,
        ))),
        sha256: s.sha256.clone(),
        processed_at: s.processed_at.map(timestamp),
        items_count: s.items_count,
        attempts: s.attempts,
        last_error: s.last_error.clone().unwrap_or_default(),
        status: status_to_pb(s.status),
        next_attempt_at: s.next_attempt_at.map(timestamp),
    }
}

fn usage_to_pb(r: &UsageRow) -> pb::UsageRow {
    pb::UsageRow {
        key: r.key.clone(),
        input_tokens: r.input_tokens,
        output_tokens: r.output_tokens,
        cache_creation_tokens: r.cache_creation_tokens,
        cache_read_tokens: r.cache_read_tokens,
        total_tokens: r.total_tokens(),
        messages: r.messages,
        first_at: Some(timestamp(r.first_at)),
        last_at: Some(timestamp(r.last_at)),
        models: r.models.clone(),
    }
}

fn progress_to_pb(name: &str, p: &RunProgress) -> pb::WatchRunResponse {
    pb::WatchRunResponse {
        name: name.to_owned(),
        files_total: p.files_total,
        files_done: p.files_done,
        bytes_hashed: p.bytes_hashed,
        finished: !p.running && p.stats.is_some(),
        stats: p.stats.as_ref().filter(|_| !p.running).map(stats_to_pb),
    }
}

/// A session key: `<user>/<file>.jsonl`, as the scan names it.
fn session_path(path: String) -> Result<String, Error> {
    if valid_session_path(&path) {
        Ok(path)
    } else {
        Err(Error::invalid(format!(
            "session {path:?} must be \"<user>/<session>.jsonl\""
        )))
    }
}

type WatchRunStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRunResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SessionPipelineService for SessionPipelineApi {
    async fn list_processors(
        &self,
        request: Request<pb::ListProcessorsRequest>,
    ) -> Result<Response<pb::ListProcessorsResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ListProcessors, None)?;
        let store = self.pipeline.store();
        let last_runs = store.last_runs().await?;
        let mut processors = Vec::new();
        for (name, version, interval) in self.pipeline.processors() {
            let running =
                self.pipeline.is_running_here(name) || store.processor_locked(name).await?;
            let last = last_runs
                .iter()
                .find(|r| r.processor == name)
                .map(|r| &r.stats);
            processors.push(pb::ProcessorInfo {
                name: name.to_owned(),
                interval: chrono::Duration::from_std(interval).ok().map(duration),
                running,
                last_run_at: last.and_then(|s| s.finished_at).map(timestamp),
                last_run: last.map(stats_to_pb),
                version,
            });
        }
        Ok(Response::new(pb::ListProcessorsResponse { processors }))
    }

    async fn run_processor(
        &self,
        request: Request<pb::RunProcessorRequest>,
    ) -> Result<Response<pb::RunProcessorResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::RunProcessor, None)?;
        let name = self.known(request.into_inner().try_into()?)?;
        let stats = self
            .pipeline
            .run(&name, RunTrigger::call(caller.name.clone()))
            .await?;
        Ok(Response::new(pb::RunProcessorResponse {
            stats: Some(stats_to_pb(&stats)),
        }))
    }

    type WatchRunStream = WatchRunStream;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::WatchRun, None)?;
        let slot = self.watches.acquire(CallerKey::of(&request))?;
        let name = self.known(request.into_inner().try_into()?)?;
        let progress = self.pipeline.follow_run(&name, self.shutdown.clone())?;
        let stream = ReceiverStream::new(progress).map(move |p| {
            // The caller's slot is freed when the stream ends.
            let _slot = &slot;
            Ok(progress_to_pb(&name, &p))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_session_states(
        &self,
        request: Request<pb::ListSessionStatesRequest>,
    ) -> Result<Response<pb::ListSessionStatesResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ListSessionStates, None)?;
        let SessionStatesRequest { name, query } = request.into_inner().try_into()?;
        let processor = self.known(name)?;
        let limit = query.limit;
        let mut states = self
            .pipeline
            .store()
            .list_session_states(
                &processor,
                query.status,
                query.user.as_deref(),
                query.after_path.as_deref(),
                limit + 1,
            )
            .await?;
        let next_page_token = if states.len() as i64 > limit {
            states.truncate(limit as usize);
            states
                .last()
                .map(|s| validate::encode_page_token(&s.path))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSessionStatesResponse {
            states: states.iter().map(state_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn retry_session(
        &self,
        request: Request<pb::RetrySessionRequest>,
    ) -> Result<Response<pb::RetrySessionResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::RetrySession, None)?;
        let RetrySession { name, session } = request.into_inner().try_into()?;
        let processor = self.known(name)?;
        let state = self
            .pipeline
            .retry_session(&processor, &session.path)
            .await?;
        Ok(Response::new(pb::RetrySessionResponse {
            state: Some(state_to_pb(&state)),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::GetUsage, None)?;
        let query: UsageQuery = request.into_inner().try_into()?;
        let (rows, totals) = self.pipeline.usage(&query).await?;
        Ok(Response::new(pb::GetUsageResponse {
            rows: rows.iter().map(usage_to_pb).collect(),
            totals: totals.as_ref().map(usage_to_pb),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let caller = auth::caller(&request)?;
        self.guard.check(&caller, Action::ListRuns, None)?;
        let RunsRequest { name, mut query } = request.into_inner().try_into()?;
        if let Some(name) = name {
            query.processor = Some(self.known(name)?);
        }
        let page = validate::PageRequest {
            size: query.limit,
            after: query.before,
        };
        query.limit = page.fetch_limit();
        let mut runs = self.pipeline.store().list_runs(&query).await?;
        let next_page_token = page.finish(&mut runs, RunRecord::cursor);
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(run_to_pb).collect(),
            next_page_token,
        }))
    }
}
