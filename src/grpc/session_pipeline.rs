//! `fleetcare.v1.SessionPipelineService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::pipeline::{RunStats, SessionState, SessionStatus, valid_user_dir};
use crate::error::Error;
use crate::grpc::convert::{duration, from_timestamp, timestamp};
use crate::grpc::validate;
use crate::proto::v1 as pb;
use crate::proto::v1::session_pipeline_service_server::SessionPipelineService;
use crate::runtime::pipeline::{Pipeline, RunProgress};
use crate::storage::{UsageGrouping, UsageQuery, UsageRow};

pub struct SessionPipelineApi {
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
}

impl SessionPipelineApi {
    pub fn new(pipeline: Arc<Pipeline>, shutdown: CancellationToken) -> Self {
        SessionPipelineApi { pipeline, shutdown }
    }

    fn processor_name(&self, name: &str) -> Result<String, Error> {
        if name.is_empty() {
            return Err(Error::invalid("name of the processor is required"));
        }
        self.pipeline
            .processors()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(n, _, _)| n.to_owned())
            .ok_or_else(|| Error::NotFound {
                kind: "processor",
                id: name.to_owned(),
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
        total_tokens: r.input_tokens
            + r.output_tokens
            + r.cache_creation_tokens
            + r.cache_read_tokens,
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
fn session_path(path: &str) -> Result<String, Error> {
    let valid = path.split_once('/').is_some_and(|(user, file)| {
        valid_user_dir(user)
            && file.len() > ".jsonl".len()
            && file.ends_with(".jsonl")
            && !file.contains('/')
            && !file.starts_with('.')
    });
    if valid {
        Ok(path.to_owned())
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
        _request: Request<pb::ListProcessorsRequest>,
    ) -> Result<Response<pb::ListProcessorsResponse>, Status> {
        let store = self.pipeline.store();
        let last_runs = store.last_runs().await?;
        let mut processors = Vec::new();
        for (name, version, interval) in self.pipeline.processors() {
            let running =
                self.pipeline.is_running_here(name) || store.processor_locked(name).await?;
            let last = last_runs.iter().find(|(n, _)| n == name).map(|(_, s)| s);
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
        let name = self.processor_name(&request.into_inner().name)?;
        let stats = self.pipeline.run(&name).await?;
        Ok(Response::new(pb::RunProcessorResponse {
            stats: Some(stats_to_pb(&stats)),
        }))
    }

    type WatchRunStream = WatchRunStream;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let name = self.processor_name(&request.into_inner().name)?;
        let mut progress = self.pipeline.progress(&name)?;
        // Follow the run under way, or else the next one to start. Decided before
        // the call returns, so a run the client starts afterwards is the one followed.
        let current = progress.borrow_and_update().clone();
        let target_run = if current.running {
            current.run
        } else {
            current.run + 1
        };
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut last = current;
            loop {
                if last.run == target_run {
                    let message = progress_to_pb(&name, &last);
                    let finished = message.finished;
                    if tx.send(Ok(message)).await.is_err() || finished {
                        return;
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = progress.changed() => if changed.is_err() { return },
                }
                last = progress.borrow_and_update().clone();
                if last.run > target_run {
                    // A later run already started: the one followed is over.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_session_states(
        &self,
        request: Request<pb::ListSessionStatesRequest>,
    ) -> Result<Response<pb::ListSessionStatesResponse>, Status> {
        let pb::ListSessionStatesRequest {
            processor,
            status,
            user,
            page_size,
            page_token,
        } = request.into_inner();
        let processor = self.processor_name(&processor)?;
        let status = status_from_pb(status)?;
        let user = match user.as_str() {
            "" => None,
            u if valid_user_dir(u) => Some(u.to_owned()),
            u => return Err(Error::invalid(format!("user {u:?} is not a valid user name")).into()),
        };
        let limit = validate::page_size(page_size)?;
        let after = validate::decode_page_token(&page_token)?
            .map(session_path)
            .transpose()?;
        let mut states = self
            .pipeline
            .store()
            .list_session_states(
                &processor,
                status,
                user.as_deref(),
                after.as_deref(),
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
        let pb::RetrySessionRequest { processor, session } = request.into_inner();
        let processor = self.processor_name(&processor)?;
        let session = session_path(&session)?;
        let state = self
            .pipeline
            .store()
            .retry_session(&processor, &session)
            .await?;
        Ok(Response::new(pb::RetrySessionResponse {
            state: Some(state_to_pb(&state)),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let pb::GetUsageRequest {
            group_by,
            since,
            until,
            user,
        } = request.into_inner();
        let group_by = match pb::UsageGrouping::try_from(group_by) {
            Ok(pb::UsageGrouping::Day) => UsageGrouping::Day,
            Ok(pb::UsageGrouping::Session) => UsageGrouping::Session,
            Ok(pb::UsageGrouping::Model) => UsageGrouping::Model,
            Ok(pb::UsageGrouping::User) => UsageGrouping::User,
            Ok(pb::UsageGrouping::Unspecified) | Err(_) => {
                return Err(Error::invalid(
                    "group_by must be USAGE_GROUPING_DAY, _SESSION, _MODEL or _USER",
                )
                .into());
            }
        };
        let since = since.map(|t| from_timestamp("since", t)).transpose()?;
        let until = until.map(|t| from_timestamp("until", t)).transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            return Err(Error::invalid("since must not be after until").into());
        }
        let user = match user.as_str() {
            "" => None,
            u if valid_user_dir(u) => Some(u.to_owned()),
            u => return Err(Error::invalid(format!("user {u:?} is not a valid user name")).into()),
        };
        let rows = self
            .pipeline
            .store()
            .usage(&UsageQuery {
                group_by,
                since,
                until,
                user,
            })
            .await?;
        let totals = rows.iter().fold(None::<UsageRow>, |acc, r| {
            Some(match acc {
                None => UsageRow {
                    key: "total".into(),
                    ..r.clone()
                },
                Some(mut t) => {
                    t.input_tokens += r.input_tokens;
                    t.output_tokens += r.output_tokens;
                    t.cache_creation_tokens += r.cache_creation_tokens;
                    t.cache_read_tokens += r.cache_read_tokens;
                    t.messages += r.messages;
                    t.first_at = t.first_at.min(r.first_at);
                    t.last_at = t.last_at.max(r.last_at);
                    t.models.extend(r.models.iter().cloned());
                    t.models.sort();
                    t.models.dedup();
                    t
                }
            })
        });
        Ok(Response::new(pb::GetUsageResponse {
            rows: rows.iter().map(usage_to_pb).collect(),
            totals: totals.as_ref().map(usage_to_pb),
        }))
    }
}
