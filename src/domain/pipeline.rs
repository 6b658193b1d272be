//! Session pipeline decisions: when a session file must be read, processed,
//! retried or given up on. Pure; the clock is passed in.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Where one session file stands for one processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionStatus {
    Processed,
    Failed,
    Dead,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Processed => "PROCESSED",
            SessionStatus::Failed => "FAILED",
            SessionStatus::Dead => "DEAD",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            SessionStatus::Processed,
            SessionStatus::Failed,
            SessionStatus::Dead,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }
}

/// A session file found by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFile {
    /// The user directory's name.
    pub user: String,
    /// The file's path below the user's folder without `.jsonl`: the session
    /// (`<session>`, or `<session>/subagents/agent-1` for a sub-agent's).
    pub session: String,
    /// `<user>/<file>.jsonl` (or deeper), relative to the root: the state's key.
    pub path: String,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// One processor's state for one session file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub processor: String,
    pub path: String,
    pub user: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub observed_at: DateTime<Utc>,
    pub sha256: String,
    pub processor_version: i32,
    pub processed_at: Option<DateTime<Utc>>,
    pub items_count: i64,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub status: SessionStatus,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// How much older than its observation a file's mtime must be for size and
/// mtime alone to prove it unchanged. Coarse filesystems tick in seconds.
pub const RACY_MARGIN: Duration = Duration::seconds(2);

/// What to do with a file before reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatVerdict {
    /// Unchanged since it was processed (or found dead): do not read it.
    Skip,
    /// Failed, and its next attempt is not due yet.
    Wait,
    /// Read and hash it, then decide with [`content_verdict`].
    Read,
}

fn stat_matches(state: &SessionState, file: &SessionFile) -> bool {
    state.size == file.size
        && state.mtime_ns == file.mtime_ns
        && DateTime::from_timestamp_nanos(file.mtime_ns) + RACY_MARGIN <= state.observed_at
}

/// Decides from the stat alone (no read), given the processor's current version.
pub fn stat_verdict(
    state: Option<&SessionState>,
    file: &SessionFile,
    version: i32,
    now: DateTime<Utc>,
) -> StatVerdict {
    let Some(state) = state else {
        return StatVerdict::Read;
    };
    if state.processor_version != version {
        return StatVerdict::Read;
    }
    match state.status {
        SessionStatus::Processed | SessionStatus::Dead if stat_matches(state, file) => {
            StatVerdict::Skip
        }
        SessionStatus::Failed
            if stat_matches(state, file) && state.next_attempt_at.is_some_and(|at| at > now) =>
        {
            StatVerdict::Wait
        }
        _ => StatVerdict::Read,
    }
}

/// What to do with a file once its content hash is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentVerdict {
    /// Same content as processed: only refresh the recorded stat.
    Unchanged,
    /// Dead and unchanged: stays dead (a changed hash gives it a fresh start).
    StillDead,
    /// Failed, same content, retry not due yet.
    Wait,
    Process,
}

pub fn content_verdict(
    state: Option<&SessionState>,
    sha256: &str,
    version: i32,
    now: DateTime<Utc>,
) -> ContentVerdict {
    let Some(state) = state.filter(|s| s.sha256 == sha256 && s.processor_version == version) else {
        return ContentVerdict::Process;
    };
    match state.status {
        SessionStatus::Processed => ContentVerdict::Unchanged,
        SessionStatus::Dead => ContentVerdict::StillDead,
        SessionStatus::Failed if state.next_attempt_at.is_some_and(|at| at > now) => {
            ContentVerdict::Wait
        }
        SessionStatus::Failed => ContentVerdict::Process,
    }
}

/// Retry policy for failing sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::seconds(30),
            max_delay: Duration::hours(6),
        }
    }
}

/// The state after another failed attempt: FAILED with an exponential backoff
/// (base x 2^(attempts-1), capped), or DEAD once attempts reach the maximum.
/// A changed hash starts the count again.
pub fn after_failure(
    previous: Option<&SessionState>,
    sha256: &str,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> (i32, SessionStatus, Option<DateTime<Utc>>) {
    let earlier = previous
        .filter(|s| s.sha256 == sha256 && s.status != SessionStatus::Processed)
        .map_or(0, |s| s.attempts);
    let attempts = earlier.saturating_add(1);
    if attempts >= policy.max_attempts {
        return (attempts, SessionStatus::Dead, None);
    }
    let exponent = u32::try_from(attempts - 1).unwrap_or(0).min(30);
    let delay = policy
        .base_delay
        .checked_mul(1 << exponent)
        .unwrap_or(policy.max_delay)
        .min(policy.max_delay);
    (attempts, SessionStatus::Failed, Some(now + delay))
}

/// The state of a session just processed: PROCESSED, attempts reset.
pub fn processed(
    processor: &str,
    file: &SessionFile,
    sha256: &str,
    version: i32,
    items: i64,
    now: DateTime<Utc>,
) -> SessionState {
    SessionState {
        processor: processor.to_owned(),
        path: file.path.clone(),
        user: file.user.clone(),
        size: file.size,
        mtime_ns: file.mtime_ns,
        observed_at: now,
        sha256: sha256.to_owned(),
        processor_version: version,
        processed_at: Some(now),
        items_count: items,
        attempts: 0,
        last_error: None,
        status: SessionStatus::Processed,
        next_attempt_at: None,
    }
}

/// The state of a session after a failed attempt ([`after_failure`]); what an
/// earlier success recorded (when, how many items) stays.
#[allow(clippy::too_many_arguments)]
pub fn failed(
    previous: Option<&SessionState>,
    processor: &str,
    file: &SessionFile,
    sha256: &str,
    version: i32,
    error: &str,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> SessionState {
    let (attempts, status, next_attempt_at) = after_failure(previous, sha256, policy, now);
    SessionState {
        processor: processor.to_owned(),
        path: file.path.clone(),
        user: file.user.clone(),
        size: file.size,
        mtime_ns: file.mtime_ns,
        observed_at: now,
        sha256: sha256.to_owned(),
        processor_version: version,
        processed_at: previous.and_then(|p| p.processed_at),
        items_count: previous.map_or(0, |p| p.items_count),
        attempts,
        last_error: Some(error.to_owned()),
        status,
        next_attempt_at,
    }
}

/// Only FAILED or DEAD sessions can be requeued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "session {path:?} is PROCESSED for {processor}; only FAILED or DEAD sessions can be retried"
)]
pub struct RequeueRefused {
    pub processor: String,
    pub path: String,
}

/// RetrySession: a FAILED or DEAD session back to FAILED with no attempts, due now.
pub fn requeue(state: &SessionState, now: DateTime<Utc>) -> Result<SessionState, RequeueRefused> {
    match state.status {
        SessionStatus::Processed => Err(RequeueRefused {
            processor: state.processor.clone(),
            path: state.path.clone(),
        }),
        SessionStatus::Failed | SessionStatus::Dead => Ok(SessionState {
            status: SessionStatus::Failed,
            attempts: 0,
            next_attempt_at: Some(now),
            ..state.clone()
        }),
    }
}

/// Which session states ListSessionStates returns, and where the page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatesQuery {
    pub processor: String,
    /// None: every status.
    pub status: Option<SessionStatus>,
    pub user: Option<String>,
    /// Only sessions whose path sorts after this one.
    pub after_path: Option<String>,
    pub limit: i64,
}

/// One processor's state of one session, as RetrySession names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    pub processor: String,
    /// `<user>/<session>.jsonl`.
    pub path: String,
}

/// How many folders below a user's folder session files are looked for: a
/// sub-agent's transcript sits two below (`<session>/subagents/agent-*.jsonl`).
pub const MAX_SESSION_DEPTH: usize = 4;

/// A folder or file name the scan walks into: not empty, not hidden (so
/// never `.` or `..`).
pub fn valid_path_segment(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/')
}

/// A session key, as the scan names it: `<user>/<file>.jsonl`, or a file in
/// folders below the user's, at most [`MAX_SESSION_DEPTH`] deep
/// (`<user>/<session>/subagents/agent-1.jsonl`).
pub fn valid_session_path(path: &str) -> bool {
    let Some((user, rest)) = path.split_once('/') else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let (file, folders) = segments
        .split_last()
        .expect("split yields one part at least");
    valid_user_dir(user)
        && folders.len() <= MAX_SESSION_DEPTH
        && folders.iter().all(|f| valid_path_segment(f))
        && valid_path_segment(file)
        && file.len() > ".jsonl".len()
        && file.ends_with(".jsonl")
}

/// Up to this many errors are reported per run.
pub const MAX_REPORTED_ERRORS: usize = 20;

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStats {
    pub scanned: i64,
    pub processed: i64,
    pub skipped: i64,
    pub failed: i64,
    pub dead: i64,
    pub items_extracted: i64,
    /// Lines skipped as unreadable or invalid, over every processed file.
    #[serde(default)]
    pub lines_skipped: i64,
    pub files_hashed: i64,
    pub bytes_hashed: i64,
    /// (session path, error), the first [`MAX_REPORTED_ERRORS`].
    pub errors: Vec<(String, String)>,
    /// Entries the scan passed over, with why.
    pub skipped_entries: Vec<String>,
    pub root_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunStats {
    pub fn record_error(&mut self, session: &str, error: impl Into<String>) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push((session.to_owned(), error.into()));
        }
    }
}

/// User directories: 1 to 128 characters of `[A-Za-z0-9._-]`, not starting with a dot.
/// The same names are valid agent ids, so transcript errors land on the agent.
pub fn valid_user_dir(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 15, 12, 0, 0).unwrap()
    }

    fn file(size: u64, mtime: DateTime<Utc>) -> SessionFile {
        SessionFile {
            user: "alice".into(),
            session: "s1".into(),
            path: "alice/s1.jsonl".into(),
            size,
            mtime_ns: mtime.timestamp_nanos_opt().unwrap(),
        }
    }

    fn state(status: SessionStatus, f: &SessionFile, observed_at: DateTime<Utc>) -> SessionState {
        SessionState {
            processor: "usage".into(),
            path: f.path.clone(),
            user: f.user.clone(),
            size: f.size,
            mtime_ns: f.mtime_ns,
            observed_at,
            sha256: "abc".into(),
            processor_version: 1,
            processed_at: Some(observed_at),
            items_count: 3,
            attempts: 0,
            last_error: None,
            status,
            next_attempt_at: None,
        }
    }

    #[test]
    fn unchanged_stat_is_skipped_without_reading() {
        let f = file(100, now() - Duration::hours(1));
        let s = state(SessionStatus::Processed, &f, now() - Duration::minutes(30));
        assert_eq!(stat_verdict(Some(&s), &f, 1, now()), StatVerdict::Skip);
        assert_eq!(stat_verdict(None, &f, 1, now()), StatVerdict::Read);
        // A new processor version reprocesses everything.
        assert_eq!(stat_verdict(Some(&s), &f, 2, now()), StatVerdict::Read);
    }

    #[test]
    fn changed_size_or_mtime_is_read() {
        let f = file(100, now() - Duration::hours(1));
        let s = state(SessionStatus::Processed, &f, now() - Duration::minutes(30));
        let grown = SessionFile {
            size: 120,
            ..f.clone()
        };
        assert_eq!(stat_verdict(Some(&s), &grown, 1, now()), StatVerdict::Read);
        let touched = SessionFile {
            mtime_ns: f.mtime_ns + 1,
            ..f.clone()
        };
        assert_eq!(
            stat_verdict(Some(&s), &touched, 1, now()),
            StatVerdict::Read
        );
    }

    #[test]
    fn a_file_observed_within_its_own_mtime_tick_is_hashed_anyway() {
        let mtime = now() - Duration::minutes(5);
        let f = file(100, mtime);
        // Observed one second after its mtime: a rewrite in the same tick could hide.
        let s = state(SessionStatus::Processed, &f, mtime + Duration::seconds(1));
        assert_eq!(stat_verdict(Some(&s), &f, 1, now()), StatVerdict::Read);
        let s = state(SessionStatus::Processed, &f, mtime + RACY_MARGIN);
        assert_eq!(stat_verdict(Some(&s), &f, 1, now()), StatVerdict::Skip);
    }

    #[test]
    fn failed_sessions_wait_for_their_retry_time_and_dead_ones_stay_dead() {
        let f = file(100, now() - Duration::hours(1));
        let mut s = state(SessionStatus::Failed, &f, now() - Duration::minutes(30));
        s.next_attempt_at = Some(now() + Duration::minutes(1));
        assert_eq!(stat_verdict(Some(&s), &f, 1, now()), StatVerdict::Wait);
        assert_eq!(
            content_verdict(Some(&s), "abc", 1, now()),
            ContentVerdict::Wait
        );
        s.next_attempt_at = Some(now() - Duration::seconds(1));
        assert_eq!(stat_verdict(Some(&s), &f, 1, now()), StatVerdict::Read);
        assert_eq!(
            content_verdict(Some(&s), "abc", 1, now()),
            ContentVerdict::Process
        );

        let dead = state(SessionStatus::Dead, &f, now() - Duration::minutes(30));
        assert_eq!(stat_verdict(Some(&dead), &f, 1, now()), StatVerdict::Skip);
        assert_eq!(
            content_verdict(Some(&dead), "abc", 1, now()),
            ContentVerdict::StillDead
        );
        assert_eq!(
            content_verdict(Some(&dead), "new", 1, now()),
            ContentVerdict::Process
        );
    }

    #[test]
    fn same_content_is_unchanged_new_content_is_processed() {
        let f = file(100, now());
        let s = state(SessionStatus::Processed, &f, now());
        assert_eq!(
            content_verdict(Some(&s), "abc", 1, now()),
            ContentVerdict::Unchanged
        );
        assert_eq!(
            content_verdict(Some(&s), "abd", 1, now()),
            ContentVerdict::Process
        );
        assert_eq!(
            content_verdict(None, "abc", 1, now()),
            ContentVerdict::Process
        );
    }

    #[test]
    fn failures_back_off_exponentially_then_die() {
        let policy = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::seconds(10),
            max_delay: Duration::seconds(25),
        };
        let f = file(1, now());
        let mut s = state(SessionStatus::Failed, &f, now());
        let mut delays = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let (attempts, status, next) = after_failure(Some(&s), "abc", &policy, now());
            s.attempts = attempts;
            s.status = status;
            statuses.push(status);
            delays.push(next.map(|n| (n - now()).num_seconds()));
        }
        assert_eq!(delays, [Some(10), Some(20), Some(25), None]);
        assert_eq!(statuses.last(), Some(&SessionStatus::Dead));
        // A changed hash starts the count again.
        let (attempts, status, _) = after_failure(Some(&s), "other", &policy, now());
        assert_eq!((attempts, status), (1, SessionStatus::Failed));
    }

    #[test]
    fn requeue_resets_failed_and_dead_sessions_and_refuses_processed_ones() {
        let f = file(1, now());
        let mut dead = state(SessionStatus::Dead, &f, now());
        dead.attempts = 5;
        let back = requeue(&dead, now()).unwrap();
        assert_eq!(
            (back.status, back.attempts, back.next_attempt_at),
            (SessionStatus::Failed, 0, Some(now()))
        );
        // Due at once: the next run processes it.
        assert_eq!(
            content_verdict(Some(&back), "abc", 1, now()),
            ContentVerdict::Process
        );
        let done = state(SessionStatus::Processed, &f, now());
        assert!(requeue(&done, now()).is_err());
    }

    #[test]
    fn a_failure_keeps_what_the_last_success_recorded() {
        let f = file(1, now());
        let ok = processed("usage", &f, "abc", 1, 7, now());
        let bad = failed(
            Some(&ok),
            "usage",
            &f,
            "abd",
            1,
            "boom",
            &RetryPolicy::default(),
            now(),
        );
        assert_eq!((bad.items_count, bad.processed_at), (7, Some(now())));
        assert_eq!(
            (bad.status, bad.attempts, bad.last_error.as_deref()),
            (SessionStatus::Failed, 1, Some("boom"))
        );
    }

    #[test]
    fn user_directory_names() {
        for ok in ["alice", "bob.smith", "team_1-a"] {
            assert!(valid_user_dir(ok), "{ok}");
        }
        for bad in ["", ".hidden", "has space", "ü", &"a".repeat(129)] {
            assert!(!valid_user_dir(bad), "{bad}");
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            SessionStatus::Processed,
            SessionStatus::Failed,
            SessionStatus::Dead,
        ] {
            assert_eq!(SessionStatus::parse(s.as_str()), Some(s));
        }
    }
}
