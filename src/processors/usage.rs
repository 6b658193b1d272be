//! `usage`: token usage per assistant message, counted the way ccusage counts it.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ProcessError, SessionProcessor, ensure_text, parse_off_thread};
use crate::domain::pipeline::SessionFile;
use crate::domain::transcript::extract_usage;
use crate::storage::SessionSink;

pub struct UsageProcessor;

#[async_trait]
impl SessionProcessor for UsageProcessor {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn version(&self) -> i32 {
        1
    }

    async fn process(
        &self,
        file: &SessionFile,
        content: Arc<Vec<u8>>,
        sink: &mut dyn SessionSink,
    ) -> Result<i64, ProcessError> {
        ensure_text(&content)?;
        let extract = parse_off_thread(content, extract_usage).await?;
        if extract.counts.malformed > 0 {
            tracing::debug!(session = %file.path, malformed = extract.counts.malformed, "skipped malformed lines");
        }
        let items = extract.entries.len() as i64;
        sink.replace_usage(file, extract.entries).await?;
        Ok(items)
    }
}
