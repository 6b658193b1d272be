//! `errors`: tool errors and API errors found in transcripts, recorded into the
//! healing history for the agent named by the session's user and classified
//! as any reported error is.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ProcessError, Processed, SessionProcessor, parse_off_thread};
use crate::domain::healing::{self, Context};
use crate::domain::healing_records::NewErrorEvent;
use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::{TranscriptErrorKind, extract_errors};
use crate::storage::{SessionSink, TranscriptErrorEvent};

pub struct ErrorsProcessor;

#[async_trait]
impl SessionProcessor for ErrorsProcessor {
    fn name(&self) -> &'static str {
        "errors"
    }

    /// 2: a NUL byte no longer fails a file (its sessions left dead by
    /// one are read again).
    fn version(&self) -> i32 {
        2
    }

    async fn process(
        &self,
        file: &SessionFile,
        content: Arc<Vec<u8>>,
        sink: &mut dyn SessionSink,
    ) -> Result<Processed, ProcessError> {
        let extract = parse_off_thread(content, extract_errors).await?;
        let events: Vec<TranscriptErrorEvent> = extract
            .errors
            .into_iter()
            .map(|error| {
                let kind = match error.kind {
                    TranscriptErrorKind::ToolError => "tool_error",
                    TranscriptErrorKind::ApiError => "api_error",
                };
                let context: Context = [
                    ("source".to_string(), "transcript".to_string()),
                    ("session".to_string(), file.path.clone()),
                    ("kind".to_string(), kind.to_string()),
                ]
                .into();
                let error_type = healing::classify(&error.message, None);
                let severity = healing::severity(error_type, &context);
                TranscriptErrorEvent {
                    key: error.key,
                    occurred_at: error.timestamp,
                    event: NewErrorEvent {
                        agent_id: file.user.clone(),
                        message: error.message,
                        context,
                        error_type,
                        severity,
                        actor: crate::domain::auth::PIPELINE.to_owned(),
                    },
                }
            })
            .collect();
        sink.replace_transcript_errors(file, &events).await?;
        Ok(Processed {
            items: events.len() as i64,
            lines_skipped: extract.counts.malformed as i64,
        })
    }
}
