//! `fleetcare pipeline list|run|runs` and `fleetcare usage`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::table::Table;
use super::{CliError, PipelineArgs, PipelineCommand, UsageArgs, UsageBy, print};
use crate::proto::timestamp;
use crate::views::{ProcessorView, RunStatsView, RunView, UsageRowView, UsageView};
use fleetcare_client::pb;

pub async fn run(args: PipelineArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    let json = args.connection.json;
    match args.command {
        PipelineCommand::List => {
            let response = clients
                .pipeline
                .list_processors(pb::ListProcessorsRequest {})
                .await?
                .into_inner();
            let processors: Vec<ProcessorView> = response
                .processors
                .iter()
                .map(ProcessorView::from)
                .collect();
            print(json, &processors, || processors_table(&processors))
        }
        PipelineCommand::Run { name } => {
            // Follow the run's progress while the unary call runs it. The
            // watch is opened first so it sees the run from its start; a
            // failed watch only costs the bar, never the run.
            let bar = if json {
                ProgressBar::hidden()
            } else {
                progress_bar(&name)
            };
            let mut watcher = clients.pipeline.clone();
            let watch_name = name.clone();
            let follow_bar = bar.clone();
            let progress = tokio::spawn(async move {
                let request = pb::WatchRunRequest { name: watch_name };
                let Ok(response) = watcher.watch_run(request).await else {
                    return;
                };
                let mut stream = response.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    let total = update.files_total.max(0) as u64;
                    if total > 0 && follow_bar.length() != Some(total) {
                        // The scan is done: from "scanning" to a bar of files.
                        follow_bar.set_style(files_style());
                        follow_bar.set_length(total);
                    }
                    follow_bar.set_position(update.files_done.max(0) as u64);
                    if update.finished {
                        break;
                    }
                }
            });
            let result = clients
                .pipeline
                .run_processor(pb::RunProcessorRequest { name })
                .await;
            progress.abort();
            bar.finish_and_clear();
            let stats = RunStatsView::from(&result?.into_inner().stats.unwrap_or_default());
            print(json, &stats, || run_summary(&stats))
        }
        PipelineCommand::Runs { processor, limit } => {
            // Pages of the server's size until the limit (or the last page).
            let limit = limit as usize;
            let mut runs: Vec<RunView> = Vec::new();
            let mut page_token = String::new();
            while runs.len() < limit {
                let page = clients
                    .pipeline
                    .list_runs(pb::ListRunsRequest {
                        processor: processor.clone().unwrap_or_default(),
                        page_size: i32::try_from(limit - runs.len()).unwrap_or(i32::MAX),
                        page_token,
                    })
                    .await?
                    .into_inner();
                runs.extend(page.runs.iter().map(RunView::from));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            runs.truncate(limit);
            print(json, &runs, || runs_table(&runs))
        }
    }
}

/// One line per run; its first error (and how many it had) at the end.
fn runs_table(runs: &[RunView]) -> String {
    let mut table = Table::new([
        "ID",
        "PROCESSOR",
        "STARTED",
        "BY",
        "TOOK",
        "SCANNED",
        "PROCESSED",
        "SKIPPED",
        "FAILED",
        "DEAD",
        "FIRST ERROR",
    ]);
    for r in runs {
        let by = match r.trigger.as_str() {
            "SCHEDULER" => "scheduler".to_string(),
            "CALL" => r.actor.clone(),
            _ => "unknown".to_string(),
        };
        let took = r
            .duration_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_default();
        let s = &r.stats;
        let first_error = match (&s.root_error, s.errors.first()) {
            (Some(root), _) => format!("root: {root}"),
            (None, Some(e)) if s.errors.len() > 1 => {
                format!("{}: {} (+{} more)", e.session, e.error, s.errors.len() - 1)
            }
            (None, Some(e)) => format!("{}: {}", e.session, e.error),
            (None, None) => String::new(),
        };
        table.row(vec![
            r.id.to_string(),
            r.processor.clone(),
            r.started_at.clone().unwrap_or_default(),
            by,
            took,
            s.scanned.to_string(),
            s.processed.to_string(),
            s.skipped.to_string(),
            s.failed.to_string(),
            s.dead.to_string(),
            first_error,
        ]);
    }
    table.render()
}

/// A spinner until the scan has counted the files, then a bar of them.
/// indicatif draws on stderr and hides itself when stderr is not a terminal.
fn progress_bar(name: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    let style = ProgressStyle::with_template("{prefix} {spinner} scanning ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(name.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn files_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} files ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn processors_table(processors: &[ProcessorView]) -> String {
    let mut table = Table::new([
        "NAME",
        "VERSION",
        "EVERY",
        "RUNNING",
        "LAST RUN",
        "SCANNED",
        "PROCESSED",
        "FAILED",
    ]);
    for p in processors {
        let every = if p.interval_seconds > 0.0 {
            humantime::format_duration(Duration::from_secs_f64(p.interval_seconds)).to_string()
        } else {
            "on demand".into()
        };
        let last = p.last_run.as_ref();
        let count =
            |f: fn(&RunStatsView) -> i64| last.map(|s| f(s).to_string()).unwrap_or_default();
        table.row(vec![
            p.name.clone(),
            p.version.to_string(),
            every,
            if p.running { "yes" } else { "no" }.into(),
            p.last_run_at.clone().unwrap_or_else(|| "never".into()),
            count(|s| s.scanned),
            count(|s| s.processed),
            count(|s| s.failed),
        ]);
    }
    table.render()
}

fn run_summary(s: &RunStatsView) -> String {
    let mut out = format!(
        "scanned {}, processed {}, skipped {}, failed {}, dead {}; {} items extracted, {} lines skipped, {} files hashed ({} bytes)\n",
        s.scanned,
        s.processed,
        s.skipped,
        s.failed,
        s.dead,
        s.items_extracted,
        s.lines_skipped,
        s.files_hashed,
        s.bytes_hashed
    );
    if let Some(error) = &s.root_error {
        out.push_str(&format!("session root: {error}\n"));
    }
    for e in &s.errors {
        out.push_str(&format!("failed: {}: {}\n", e.session, e.error));
    }
    for entry in &s.skipped_entries {
        out.push_str(&format!("skipped: {entry}\n"));
    }
    out
}

pub async fn usage(args: UsageArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    let group_by = match args.by {
        UsageBy::Day => pb::UsageGrouping::Day,
        UsageBy::Session => pb::UsageGrouping::Session,
        UsageBy::Model => pb::UsageGrouping::Model,
        UsageBy::User => pb::UsageGrouping::User,
    };
    let response = clients
        .pipeline
        .get_usage(pb::GetUsageRequest {
            group_by: group_by as i32,
            since: args.since.map(timestamp),
            until: args.until.map(timestamp),
            user: args.user.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let view = UsageView::new(group_by, &response);
    print(args.connection.json, &view, || usage_table(&view))
}

fn usage_table(view: &UsageView) -> String {
    let mut table = Table::new([
        view.group_by.to_uppercase().as_str(),
        "INPUT",
        "OUTPUT",
        "CACHE CREATE",
        "CACHE READ",
        "TOTAL",
        "MESSAGES",
        "MODELS",
    ]);
    let mut add = |key: &str, r: &UsageRowView| {
        table.row(vec![
            key.to_string(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            r.cache_creation_tokens.to_string(),
            r.cache_read_tokens.to_string(),
            r.total_tokens.to_string(),
            r.messages.to_string(),
            r.models.join(","),
        ]);
    };
    for row in &view.rows {
        add(&row.key, row);
    }
    if let Some(totals) = &view.totals {
        add("TOTAL", totals);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_show_who_started_them_how_long_they_took_and_the_first_error() {
        let at = |s: i64| {
            Some(prost_types::Timestamp {
                seconds: s,
                nanos: 0,
            })
        };
        let run = |id, trigger: pb::RunTrigger, actor: &str, errors: Vec<pb::SessionError>| {
            RunView::from(&pb::PipelineRun {
                id,
                processor: "usage".into(),
                trigger: trigger as i32,
                actor: actor.into(),
                started_at: at(1_800_000_000),
                finished_at: Some(prost_types::Timestamp {
                    seconds: 1_800_000_002,
                    nanos: 500_000_000,
                }),
                stats: Some(pb::RunStats {
                    scanned: 3,
                    processed: 2,
                    failed: errors.len() as i64,
                    errors,
                    ..Default::default()
                }),
            })
        };
        let error = |session: &str| pb::SessionError {
            session: session.into(),
            error: "NUL byte".into(),
        };
        let runs = [
            run(
                7,
                pb::RunTrigger::Call,
                "alice",
                vec![error("bob/a.jsonl"), error("bob/b.jsonl")],
            ),
            run(6, pb::RunTrigger::Scheduler, "scheduler", vec![]),
            run(
                5,
                pb::RunTrigger::Unspecified,
                "",
                vec![error("bob/a.jsonl")],
            ),
        ];
        assert_eq!(runs[0].duration_ms, Some(2500));
        let table = runs_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID  PROCESSOR  STARTED"), "{table}");
        assert!(
            lines[1].contains(" alice ")
                && lines[1].contains(" 2.5s ")
                && lines[1].ends_with("bob/a.jsonl: NUL byte (+1 more)"),
            "{table}"
        );
        assert!(lines[2].contains(" scheduler "), "{table}");
        assert!(
            lines[3].contains(" unknown ") && lines[3].ends_with("bob/a.jsonl: NUL byte"),
            "{table}"
        );
    }

    #[test]
    fn usage_rows_end_with_the_totals() {
        let row = pb::UsageRow {
            key: "2026-04-01".into(),
            input_tokens: 10,
            output_tokens: 20,
            total_tokens: 30,
            messages: 2,
            models: vec!["m1".into()],
            ..Default::default()
        };
        let view = UsageView {
            group_by: "day".into(),
            rows: vec![UsageRowView::from(&row)],
            totals: Some(UsageRowView::from(&row)),
        };
        assert_eq!(
            usage_table(&view),
            "DAY         INPUT  OUTPUT  CACHE CREATE  CACHE READ  TOTAL  MESSAGES  MODELS\n\
             2026-04-01  10     20      0             0           30     2         m1\n\
             TOTAL       10     20      0             0           30     2         m1\n"
        );
    }
}
