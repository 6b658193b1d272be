//! The history of processor runs: what one recorded run holds (who or what
//! started it, when, its stats bounded for keeping), how a listing pages
//! (newest first, by `(started_at, id)`), and which runs retention removes.

use chrono::{DateTime, Duration, Utc};

use crate::domain::pipeline::RunStats;

/// A kept run holds at most this many of its session errors (the first ones).
pub const KEPT_ERRORS: usize = 10;

/// A kept session error's path and message are cut to this many characters.
pub const KEPT_ERROR_CHARS: usize = 500;

/// A kept run holds at most this many of the entries its scan passed over.
pub const KEPT_SKIPPED_ENTRIES: usize = 10;

/// The actor of the runs the scheduler starts.
pub const SCHEDULER: &str = "scheduler";

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartedBy {
    /// Not known: runs recorded before the history kept it.
    Unknown,
    /// The scheduler's tick.
    Scheduler,
    /// A `RunProcessor` call (the caller is the run's actor).
    Call,
}

impl StartedBy {
    pub const ALL: [StartedBy; 3] = [StartedBy::Unknown, StartedBy::Scheduler, StartedBy::Call];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StartedBy::Unknown => "",
            StartedBy::Scheduler => "scheduler",
            StartedBy::Call => "call",
        }
    }

    pub fn parse(s: &str) -> Option<StartedBy> {
        StartedBy::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Who or what starts a run: the scheduler, or a caller by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTrigger {
    pub started_by: StartedBy,
    /// The caller's name for a call, [`SCHEDULER`] for the scheduler.
    pub actor: String,
}

impl RunTrigger {
    pub fn scheduler() -> RunTrigger {
        RunTrigger {
            started_by: StartedBy::Scheduler,
            actor: SCHEDULER.to_owned(),
        }
    }

    /// A `RunProcessor` call by the caller named `actor`.
    pub fn call(actor: impl Into<String>) -> RunTrigger {
        RunTrigger {
            started_by: StartedBy::Call,
            actor: actor.into(),
        }
    }
}

/// A finished run, as it is kept: times at microseconds (what both stores
/// keep, so a cursor read back matches), the stats bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    pub processor: String,
    pub trigger: RunTrigger,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub stats: RunStats,
}

impl NewRun {
    /// The run of `processor` that `stats` describe, started and finished at
    /// the stats' times (`now` where one is missing).
    pub fn new(
        processor: &str,
        trigger: RunTrigger,
        stats: &RunStats,
        now: DateTime<Utc>,
    ) -> NewRun {
        let started_at = micros(stats.started_at.unwrap_or(now));
        let finished_at = micros(stats.finished_at.unwrap_or(now)).max(started_at);
        let mut kept = stats.clone();
        kept.errors = stats
            .errors
            .iter()
            .take(KEPT_ERRORS)
            .map(|(path, message)| (cut(path), cut(message)))
            .collect();
        kept.skipped_entries = stats
            .skipped_entries
            .iter()
            .take(KEPT_SKIPPED_ENTRIES)
            .map(|entry| cut(entry))
            .collect();
        kept.root_error = stats.root_error.as_deref().map(cut);
        kept.started_at = Some(started_at);
        kept.finished_at = Some(finished_at);
        NewRun {
            processor: processor.to_owned(),
            trigger,
            started_at,
            finished_at,
            stats: kept,
        }
    }
}

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: i64,
    pub processor: String,
    pub trigger: RunTrigger,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub stats: RunStats,
}

impl RunRecord {
    pub fn of(id: i64, run: NewRun) -> RunRecord {
        RunRecord {
            id,
            processor: run.processor,
            trigger: run.trigger,
            started_at: run.started_at,
            finished_at: run.finished_at,
            stats: run.stats,
        }
    }

    /// Where this run sorts in a listing.
    pub fn cursor(&self) -> RunCursor {
        RunCursor {
            started_at: self.started_at,
            id: self.id,
        }
    }
}

/// A run's place in the history: listings are newest first, by start, then
/// by id (ids break ties of runs started in the same microsecond).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunCursor {
    pub started_at: DateTime<Utc>,
    pub id: i64,
}

/// Which runs a listing returns: of one processor or all, older than the
/// cursor (the previous page's last run), at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunsQuery {
    pub processor: Option<String>,
    pub before: Option<RunCursor>,
    pub limit: i64,
}

impl RunsQuery {
    /// Whether `run` belongs to the listing (before the limit is applied).
    pub fn matches(&self, run: &RunRecord) -> bool {
        self.processor.as_ref().is_none_or(|p| *p == run.processor)
            && self.before.is_none_or(|before| run.cursor() < before)
    }
}

/// Runs that started before this are pruned (each processor's newest is kept
/// whatever its age).
pub fn prune_before(now: DateTime<Utc>, retention: std::time::Duration) -> DateTime<Utc> {
    Duration::from_std(retention)
        .ok()
        .and_then(|r| now.checked_sub_signed(r))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A run as a prune weighs it: its processor and its place in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAge {
    pub processor: String,
    pub cursor: RunCursor,
}

impl RunAge {
    pub fn of(run: &RunRecord) -> RunAge {
        RunAge {
            processor: run.processor.clone(),
            cursor: run.cursor(),
        }
    }
}

/// The ids a prune at `before` removes among `candidates`: those started
/// before it, except the newest run of each processor (`newest`: each
/// processor's newest run of the whole history, or any runs that include
/// them).
pub fn prune_ids(candidates: &[RunAge], newest: &[RunAge], before: DateTime<Utc>) -> Vec<i64> {
    candidates
        .iter()
        .filter(|r| r.cursor.started_at < before)
        .filter(|r| {
            newest
                .iter()
                .any(|n| n.processor == r.processor && n.cursor > r.cursor)
        })
        .map(|r| r.cursor.id)
        .collect()
}

/// Which of `runs` (a whole history) a prune at `before` removes.
pub fn pruned(runs: &[RunRecord], before: DateTime<Utc>) -> Vec<&RunRecord> {
    let ages: Vec<RunAge> = runs.iter().map(RunAge::of).collect();
    let ids = prune_ids(&ages, &ages, before);
    runs.iter().filter(|r| ids.contains(&r.id)).collect()
}

fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(KEPT_ERROR_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn record(id: i64, processor: &str, started: i64) -> RunRecord {
        RunRecord {
            id,
            processor: processor.into(),
            trigger: RunTrigger::scheduler(),
            started_at: at(started),
            finished_at: at(started + 1),
            stats: RunStats::default(),
        }
    }

    #[test]
    fn a_kept_run_holds_the_first_errors_cut_to_length_and_microsecond_times() {
        let mut stats = RunStats {
            started_at: Some(at(0) + Duration::nanoseconds(1_234_567)),
            finished_at: Some(at(2)),
            root_error: Some("r".repeat(KEPT_ERROR_CHARS + 20)),
            ..RunStats::default()
        };
        for i in 0..KEPT_ERRORS + 5 {
            stats
                .errors
                .push((format!("u/s{i}.jsonl"), "é".repeat(700)));
        }
        stats.skipped_entries = (0..30).map(|i| format!("entry {i}")).collect();
        let run = NewRun::new("usage", RunTrigger::call("alice"), &stats, at(9));
        assert_eq!(run.stats.errors.len(), KEPT_ERRORS);
        assert_eq!(run.stats.errors[0].0, "u/s0.jsonl");
        assert_eq!(run.stats.errors[9].0, "u/s9.jsonl");
        assert_eq!(
            run.stats.errors[0].1.chars().count(),
            KEPT_ERROR_CHARS + 1,
            "cut, with an ellipsis"
        );
        assert!(run.stats.errors[0].1.ends_with('…'));
        assert_eq!(run.stats.skipped_entries.len(), KEPT_SKIPPED_ENTRIES);
        assert_eq!(
            run.stats.root_error.as_ref().unwrap().chars().count(),
            KEPT_ERROR_CHARS + 1
        );
        assert_eq!(run.started_at, at(0) + Duration::microseconds(1_234));
        assert_eq!(run.stats.started_at, Some(run.started_at));
        assert_eq!(run.finished_at, at(2));
        assert_eq!(run.trigger.actor, "alice");
        assert_eq!(run.trigger.started_by, StartedBy::Call);
    }

    #[test]
    fn missing_times_are_now() {
        let run = NewRun::new(
            "usage",
            RunTrigger::scheduler(),
            &RunStats::default(),
            at(5),
        );
        assert_eq!((run.started_at, run.finished_at), (at(5), at(5)));
        assert_eq!(run.trigger.actor, SCHEDULER);
    }

    #[test]
    fn listings_go_newest_first_by_start_then_id() {
        let a = record(1, "usage", 10);
        let b = record(2, "usage", 10);
        let c = record(3, "errors", 5);
        assert!(b.cursor() > a.cursor());
        assert!(a.cursor() > c.cursor());
        let query = RunsQuery {
            processor: Some("usage".into()),
            before: Some(b.cursor()),
            limit: 10,
        };
        assert!(query.matches(&a));
        assert!(
            !query.matches(&b),
            "the cursor's own run is on the previous page"
        );
        assert!(!query.matches(&c), "another processor");
    }

    #[test]
    fn pruning_keeps_each_processors_newest_run_whatever_its_age() {
        let runs = [
            record(1, "usage", 0),
            record(2, "usage", 10),
            record(3, "errors", 5),
            record(4, "usage", 100),
        ];
        let ids = |before| -> Vec<i64> { pruned(&runs, before).iter().map(|r| r.id).collect() };
        assert_eq!(ids(at(50)), [1, 2], "errors' only run stays, however old");
        assert_eq!(ids(at(1000)), [1, 2], "usage's newest stays");
        assert_eq!(ids(at(5)), [1], "run 3 started at the cutoff, not before");
        assert_eq!(
            prune_before(at(100), std::time::Duration::from_secs(30)),
            at(70)
        );
        assert_eq!(
            prune_before(at(100), std::time::Duration::MAX),
            DateTime::<Utc>::MIN_UTC
        );
    }

    #[test]
    fn started_by_spellings_round_trip() {
        for s in StartedBy::ALL {
            assert_eq!(StartedBy::parse(s.as_str()), Some(s));
        }
        assert_eq!(StartedBy::parse("cron"), None);
    }
}
