//! The store: the one place that knows where state lives.
//!
//! Everything above this module talks to the traits here, never to a
//! database directly (no SQL, no LISTEN/NOTIFY, no advisory locks). Two
//! backends implement every trait: `postgres` (several replicas on one
//! database) and `sqlite` (the embedded default, one server per file);
//! `memory` is the runtime's test double, compiled into test builds only
//! (and, through the `test-support` feature, into the simulation's). [`Stores::open`] picks one from
//! the configuration.

pub(crate) mod agents;
pub(crate) mod claims;
pub mod clock;
#[cfg(test)]
mod contract;
pub mod copy;
pub(crate) mod decode;
pub(crate) mod healing;
#[cfg(any(test, feature = "test-support"))]
pub mod memory;
mod options;
pub(crate) mod pipeline;
pub mod pool;
mod post_healing;
pub mod postgres;
pub mod quota;
pub(crate) mod sql_error;
pub mod sqlite;
mod usage_rollups;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use clock::Clock;
pub use options::{StoreLocation, StoreOptions};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use tokio::sync::watch;

use crate::domain::agent::AgentStatus;
use crate::domain::batch::{Applied, Command, Refusal};
use crate::domain::dispatch::{LabelSelector, NoAgentAvailable};
use crate::domain::healing::{ErrorType, Evidence, Plan};
use crate::domain::healing_records::{
    ErrorEvent, HealingStatistics, NewErrorEvent, RecoveryAction, RecoveryOutcome, RecoveryStatus,
    StoredAction,
};
use crate::domain::labels::Labels;
use crate::domain::liveness::SweepQuery;
use crate::domain::pipeline::{SessionFile, SessionState, SessionStatus};
use crate::domain::pipeline_runs::{NewRun, RunRecord, RunsQuery};
use crate::domain::post_healing::{ActionRecord, ActionStatus, ActionType, Evaluation, Tier};
use crate::domain::transcript::UsageEntry;
use crate::domain::transition::{Agent, Claim, RevisionBounds, Transition, WatchFilter};
use crate::error::Result;

/// Which agents `list_agents` returns, and where the page starts.
#[derive(Debug, Clone, Default)]
pub struct AgentQuery {
    /// Only agents whose id sorts after this one.
    pub after_agent_id: Option<String>,
    /// Empty: every status.
    pub statuses: Vec<AgentStatus>,
    /// Agents carrying every one of these labels.
    pub labels: Labels,
    pub limit: i64,
}

/// Which claims `list_claims` returns, and where the page starts.
#[derive(Debug, Clone, Default)]
pub struct ClaimQuery {
    /// Only claims on agents whose id sorts after this one.
    pub after_agent_id: Option<String>,
    /// Only this holder's claims.
    pub holder: Option<String>,
    pub limit: i64,
}

/// How many agents are in each status (statuses without agents left out), as
/// of `revision`: every transition up to it is counted, none after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub revision: i64,
    pub counts: Vec<(AgentStatus, i64)>,
}

impl StatusCounts {
    /// The count of one status (0 when it has no agents).
    pub fn of(&self, status: AgentStatus) -> i64 {
        self.counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }

    pub fn total(&self) -> i64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

/// The agent-status part of the store.
///
/// State changes arrive in batches (see `runtime::committer`): the store locks the
/// agents a batch names in agent-id order, lets [`batch::plan`] decide every
/// command, allocates the batch's revisions last, writes, and commits once.
/// The committer may have several batches committing at once (never two
/// naming one agent): each must still get consecutive revisions, the batches'
/// ranges in the order they commit, without gaps (Postgres: the revision row,
/// held to commit; SQLite and memory: one writer).
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    /// Succeeds when the store can serve requests.
    async fn ping(&self) -> Result<()>;

    /// Applies `commands` in one transaction at server time `now`, each decided on
    /// the state the earlier ones left. `Err` means nothing was committed; otherwise
    /// every command has its own outcome (a refused one refuses only itself), and
    /// the transitions of the batch have consecutive revisions in command order.
    async fn commit_batch(
        &self,
        commands: &[Command],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Applied, Refusal>>>;

    /// [`AgentStore::commit_batch`], where `known` (when given) is this
    /// process's last known state of every agent the batch names. A store may
    /// decide the batch on it without reading the rows first, provided it
    /// writes only if every row still is as known (its `last_heartbeat_at`
    /// aside), and otherwise reads them as `commit_batch` does: the outcome is
    /// the same, in fewer round trips. By default, `commit_batch`.
    async fn commit_batch_known(
        &self,
        commands: &[Command],
        known: Option<Vec<Agent>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Applied, Refusal>>> {
        let _ = known;
        self.commit_batch(commands, now).await
    }

    /// Decides and commits one pool command (`ParkPool`, `ReleasePool`, the
    /// sweeper's settle) in one transaction: the pool's row, and for a park
    /// every member, locked. A pool no agent is a member of and never parked
    /// is refused NOT_FOUND.
    async fn commit_pool(
        &self,
        command: &crate::domain::batch::PoolCommand,
        now: DateTime<Utc>,
    ) -> Result<quota::PoolCommitted>;

    /// Every pool that was ever parked, in name order.
    async fn quota_pool_states(
        &self,
    ) -> Result<
        Vec<(
            crate::domain::quota::PoolName,
            crate::domain::quota::PoolState,
        )>,
    >;

    /// Every pool an agent lists, its members counted per status.
    async fn quota_pool_members(&self) -> Result<Vec<PoolMembers>>;

    /// The agents of `pool`: its members and the agents it holds or held in
    /// its current episode, by agent id.
    async fn pool_agents(&self, pool: &crate::domain::quota::PoolName) -> Result<Vec<Agent>>;

    /// Records liveness: each agent's `last_heartbeat_at` moves forward to the given
    /// time, never backwards (replicas may flush out of order). Status is never
    /// touched, and unknown agents are ignored.
    async fn record_heartbeats(&self, beats: &[(String, DateTime<Utc>)]) -> Result<()>;

    async fn get_agent(&self, agent_id: &str) -> Result<Agent>;

    async fn list_agents(&self, query: &AgentQuery) -> Result<Vec<Agent>>;

    /// Ids of the agents `query` selects (see [`SweepQuery::selects`]), at most `limit`.
    async fn sweep_candidates(&self, query: &SweepQuery, limit: i64) -> Result<Vec<String>>;

    /// The claim recorded as `claim_id`, active or ended (`None`: unknown,
    /// or pruned with the history of its time).
    async fn find_claim(&self, claim_id: &str) -> Result<Option<Claim>>;

    /// Active claims, by agent id.
    async fn list_claims(&self, query: &ClaimQuery) -> Result<Vec<Claim>>;

    /// Why no agent `selector` matches can be claimed: the matching agents
    /// counted (read after a claim found none; not part of its transaction).
    async fn no_agent_available(&self, selector: &LabelSelector) -> Result<NoAgentAvailable>;

    /// Transitions with a revision above `after`, in revision order.
    async fn transitions_after(
        &self,
        after: i64,
        agent_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Transition>>;

    async fn revision_bounds(&self) -> Result<RevisionBounds>;

    /// The matching agents as of one revision, read consistently.
    async fn snapshot(&self, filter: &WatchFilter) -> Result<(i64, Vec<Agent>)>;

    /// Deletes every transition up to the newest one that occurred before `before`
    /// (a prefix of the history, so a resumed watch sees a gap only as pruning).
    /// Returns how many were deleted.
    async fn prune_transitions(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Ticks whenever new transitions may have been committed that this
    /// process's committer did not hand to the fan-out itself (by another
    /// process on the same store), and after the store lost track (a
    /// reconnect): the receiver then re-reads from the history. A store may
    /// tick for its own commits too (the fan-out skips what it published).
    fn changes(&self) -> watch::Receiver<u64>;

    /// How many agents are in each status, as of one revision (read
    /// consistently, as [`AgentStore::snapshot`] is): what metrics scrapes and
    /// the dashboard's counts read, the dashboard then adding the transitions
    /// after that revision.
    async fn count_by_status(&self) -> Result<StatusCounts>;

    /// The occupancy of this store's connection pools (none for a store without).
    fn pool_stats(&self) -> Vec<pool::PoolStats> {
        Vec::new()
    }

    /// Times this store's connection acquisitions into the metrics `metrics`
    /// gives for each pool's name (`postgres`, `sqlite_writer`, ...).
    fn observe_pools(&self, metrics: &dyn Fn(&'static str) -> pool::AcquireMetrics) {
        let _ = metrics;
    }
}

/// One pool's members in one status (`AgentStore::quota_pool_members`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMembers {
    pub pool: crate::domain::quota::PoolName,
    pub status: AgentStatus,
    /// Members in that status.
    pub members: i64,
    /// Of them, the ones the pool holds.
    pub held: i64,
}

/// Decides a recovery plan from the event, the evidence learned for its kind
/// and the strategies the breakers close off, inside the store's transaction.
pub type Planner<'a> = Box<
    dyn FnOnce(&ErrorEvent, &[Evidence], &[crate::domain::healing::Strategy]) -> Plan + Send + 'a,
>;

/// Which healing decisions `list_healing_decisions` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    pub agent_id: Option<String>,
    pub error_event_id: Option<i64>,
    pub verdict: Option<crate::domain::brakes::Verdict>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// Which error events `list_error_events` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct ErrorEventQuery {
    pub agent_id: Option<String>,
    pub error_type: Option<ErrorType>,
    /// Only events with a smaller id (the previous page's last).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// Which recovery actions `list_recovery_actions` returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct RecoveryActionQuery {
    pub agent_id: Option<String>,
    /// The actions planned for this error event.
    pub error_event_id: Option<i64>,
    pub error_type: Option<ErrorType>,
    pub status: Option<RecoveryStatus>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// The agent-healing part of the store.
#[async_trait]
pub trait HealingStore: Send + Sync + 'static {
    /// Stores an error, marking it recurring from the agent's recent history.
    async fn record_error(&self, event: NewErrorEvent) -> Result<ErrorEvent>;

    /// Deletes the healing records older than `before` (`--healing-retention`):
    /// the recovery actions created before it that have ended, then the
    /// error events that occurred before it with no action left. Returns
    /// (events, actions) deleted. What the planner learned is kept.
    async fn prune_healing(&self, before: DateTime<Utc>) -> Result<(u64, u64)>;

    /// Plans and stores an ACTIVE recovery for the event's agent, unless one is
    /// already active (FAILED_PRECONDITION naming it). Expired ones are freed
    /// first. Then `policy`'s brakes, checked on what the same transaction
    /// counts (a braked or dry-run request is `Error::NotPlanned`); every
    /// decision is recorded. `actor` (who asked) is stored with it.
    async fn plan_recovery(
        &self,
        error_event_id: i64,
        lease: Duration,
        actor: &str,
        policy: &crate::domain::brakes::HealingPolicy,
        planner: Planner<'_>,
    ) -> Result<RecoveryAction>;

    /// Ends a recovery with its outcome and updates what was learned and the
    /// strategy's breaker, atomically.
    async fn record_recovery_outcome(
        &self,
        action_id: i64,
        outcome: RecoveryOutcome,
        policy: &crate::domain::brakes::HealingPolicy,
    ) -> Result<RecoveryAction>;

    /// The brakes as they stand under `policy`.
    async fn healing_brakes(
        &self,
        policy: &crate::domain::brakes::HealingPolicy,
    ) -> Result<crate::domain::brakes::BrakeStatus>;

    /// Pauses healing in `scope` (replacing its pause); the pause stored.
    async fn pause_healing(
        &self,
        scope: crate::domain::brakes::Scope,
        reason: &str,
        by: &str,
    ) -> Result<crate::domain::brakes::Pause>;

    /// Resumes healing in `scope`; whether it was paused.
    async fn resume_healing(&self, scope: &crate::domain::brakes::Scope) -> Result<bool>;

    /// Decisions on requests for plans, newest first.
    async fn list_healing_decisions(
        &self,
        query: &DecisionQuery,
    ) -> Result<Vec<crate::domain::brakes::Decision>>;

    async fn healing_statistics(&self) -> Result<HealingStatistics>;

    async fn list_error_events(&self, query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>>;

    async fn list_recovery_actions(
        &self,
        query: &RecoveryActionQuery,
    ) -> Result<Vec<RecoveryAction>>;
}

/// Judges a post from its action history at a given time, inside the store's
/// transaction (so a claim decided on that history is atomic).
pub type PostEvaluator<'a> =
    Box<dyn FnOnce(DateTime<Utc>, &[ActionRecord]) -> Evaluation + Send + 'a>;

/// A post's verdict, and the record this call claimed, if any.
#[derive(Debug, Clone)]
pub struct PostVerdict {
    pub evaluation: Evaluation,
    pub claimed: Option<StoredAction>,
}

/// An outcome reported for a post action. `new_record` creates the record when
/// the key is unknown.
#[derive(Debug, Clone)]
pub struct ActionOutcomeUpdate {
    pub idempotency_key: String,
    pub status: ActionStatus,
    pub outcome: Option<serde_json::Value>,
    pub error_code: Option<String>,
    pub new_record: Option<(String, ActionType, Tier)>,
    /// The post window (`--post-window`): a new record's window key must
    /// name the store's current window of this length or the one before.
    pub key_window: Duration,
    /// Who reports it (the record's `outcome_actor`, and its `actor` when the
    /// report creates it).
    pub actor: String,
}

/// Who a write of a post action record is by: the caller claiming it (its
/// `actor`) or reporting its outcome (its `outcome_actor`).
#[derive(Debug, Clone, Copy)]
pub enum Writer<'a> {
    Claim(&'a str),
    Report(&'a str),
}

impl<'a> Writer<'a> {
    pub fn claimed(self) -> Option<&'a str> {
        match self {
            Writer::Claim(actor) => Some(actor),
            Writer::Report(_) => None,
        }
    }

    pub fn reported(self) -> Option<&'a str> {
        match self {
            Writer::Report(actor) => Some(actor),
            Writer::Claim(_) => None,
        }
    }
}

/// The post-healing part of the store.
#[async_trait]
pub trait PostHealingStore: Send + Sync + 'static {
    /// Evaluates a post at `now` (the store's clock when `None`). With `claim_lease`,
    /// `actor` (the claiming caller's name) becomes the claimed record's `actor`.
    /// an eligible action is recorded RUNNING in the same transaction, serialised
    /// per post, so of many concurrent evaluators exactly one claims it.
    async fn evaluate_post(
        &self,
        post_id: &str,
        now: Option<DateTime<Utc>>,
        claim_lease: Option<Duration>,
        actor: &str,
        evaluate: PostEvaluator<'_>,
    ) -> Result<PostVerdict>;

    /// Updates (or creates) an action record; returns it and whether it was created.
    async fn record_action_outcome(
        &self,
        update: ActionOutcomeUpdate,
    ) -> Result<(StoredAction, bool)>;

    /// One action record, as of the store's clock, and that time.
    async fn get_action(&self, idempotency_key: &str) -> Result<(StoredAction, DateTime<Utc>)>;

    /// A post's records, newest first, after the given (created_at, key) cursor.
    async fn list_actions(
        &self,
        post_id: &str,
        before: Option<(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<StoredAction>>;
}

pub use crate::domain::usage::{UsageGrouping, UsageQuery, UsageRow};

/// A transcript error to record into the healing history.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscriptErrorEvent {
    /// Stable within the file, so reprocessing does not duplicate it.
    pub key: String,
    pub event: NewErrorEvent,
    pub occurred_at: DateTime<Utc>,
}

/// Where a processor writes one session's items. Each `replace_*` replaces
/// the items earlier processing of this file wrote, once the session's batch
/// commits (see [`SessionOutput`]).
#[async_trait]
pub trait SessionSink: Send {
    async fn replace_usage(&mut self, file: &SessionFile, entries: Vec<UsageEntry>) -> Result<()>;
    async fn replace_transcript_errors(
        &mut self,
        file: &SessionFile,
        errors: &[TranscriptErrorEvent],
    ) -> Result<()>;
}

/// What processing one session produced, held in memory until it commits
/// with the session's state ([`PipelineStore::commit_sessions`]). `None`:
/// the processor did not write that kind, its earlier items stay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionOutput {
    pub usage: Option<Vec<UsageEntry>>,
    pub transcript_errors: Option<Vec<TranscriptErrorEvent>>,
}

impl SessionOutput {
    /// Digests of the messages this output shares with other files (see
    /// [`crate::domain::usage::shared_key_digest`]).
    pub fn shared_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.usage
            .iter()
            .flatten()
            .filter_map(crate::domain::usage::shared_key_digest)
    }
}

#[async_trait]
impl SessionSink for SessionOutput {
    async fn replace_usage(&mut self, _file: &SessionFile, entries: Vec<UsageEntry>) -> Result<()> {
        self.usage = Some(entries);
        Ok(())
    }

    async fn replace_transcript_errors(
        &mut self,
        _file: &SessionFile,
        errors: &[TranscriptErrorEvent],
    ) -> Result<()> {
        self.transcript_errors = Some(errors.to_vec());
        Ok(())
    }
}

/// One session's part of a batch: its items (none for a failed attempt,
/// whose earlier items stay) and the state the domain decided
/// (`domain::pipeline::processed` or `failed`).
#[derive(Debug, Clone)]
pub struct SessionWrite {
    pub file: SessionFile,
    pub output: SessionOutput,
    pub state: SessionState,
}

/// Decides a session's new state from its current one and the store's clock,
/// inside the store's transaction.
pub type StateUpdate<'a> =
    Box<dyn FnOnce(&SessionState, DateTime<Utc>) -> Result<SessionState> + Send + 'a>;

/// A processor's cluster-wide lock. Released by `release`, or whenever the guard
/// is dropped or its process dies.
#[async_trait]
pub trait ProcessorLock: Send {
    async fn release(self: Box<Self>);
}

/// The session-pipeline part of the store.
#[async_trait]
pub trait PipelineStore: Send + Sync + 'static {
    /// Every state of one processor (the scan compares them in memory).
    async fn session_states(&self, processor: &str) -> Result<Vec<SessionState>>;

    async fn list_session_states(
        &self,
        processor: &str,
        status: Option<SessionStatus>,
        user: Option<&str>,
        after_path: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SessionState>>;

    /// The content is unchanged: record the new stat and when it was observed.
    async fn refresh_stat(&self, processor: &str, file: &SessionFile) -> Result<()>;

    /// Commits several sessions (distinct files of one processor) in one
    /// transaction (group commit): each session's items replace its earlier
    /// ones and its state row is written, all of them or none. `Err` means
    /// nothing of the batch was kept; `Error::Conflict` (a serialization
    /// failure or deadlock with a concurrent batch) may simply be retried.
    async fn commit_sessions(&self, writes: &[SessionWrite]) -> Result<()>;

    /// Loads the session's state locked, lets `update` decide its new state at
    /// the store's clock, and writes it (NOT_FOUND when there is none).
    async fn update_session_state(
        &self,
        processor: &str,
        path: &str,
        update: StateUpdate<'_>,
    ) -> Result<SessionState>;

    /// The processor's lock, or `None` when another holder (any server) has it.
    async fn try_lock_processor(&self, processor: &str) -> Result<Option<Box<dyn ProcessorLock>>>;

    /// Whether any server holds the processor's lock.
    async fn processor_locked(&self, processor: &str) -> Result<bool>;

    /// Keeps a finished run in the history; returns its id.
    async fn record_run(&self, run: &NewRun) -> Result<i64>;

    /// The newest recorded run (by start, then id) of each processor that has one.
    async fn last_runs(&self) -> Result<Vec<RunRecord>>;

    /// Recorded runs, newest first (by start, then id): those `query` matches,
    /// at most `query.limit`.
    async fn list_runs(&self, query: &RunsQuery) -> Result<Vec<RunRecord>>;

    /// Deletes the runs started before `before`, except each processor's
    /// newest (see [`crate::domain::pipeline_runs::pruned`]); returns how many.
    async fn prune_runs(&self, before: DateTime<Utc>) -> Result<u64>;

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;

    /// The store's clock.
    async fn now(&self) -> Result<DateTime<Utc>>;
}

/// Every part of one store, behind its trait.
#[derive(Clone)]
pub struct Stores {
    pub agents: Arc<dyn AgentStore>,
    pub healing: Arc<dyn HealingStore>,
    pub posts: Arc<dyn PostHealingStore>,
    pub pipeline: Arc<dyn PipelineStore>,
    /// Where it is.
    pub location: StoreLocation,
    /// The server's clock: the one the store was opened with
    /// ([`StoreOptions::clock`]), else the system clock. The runtime stamps
    /// state changes with it, so a test's manual clock moves the store and
    /// the server together.
    pub clock: Clock,
    /// The embedded store's release signal (see [`Stores::released`]).
    released: Option<tokio::sync::watch::Receiver<()>>,
}

impl Stores {
    /// Opens the store `options` selects (creating it if needed) and applies
    /// its migrations; background work it needs (Postgres's listener) stops
    /// with `shutdown`.
    pub async fn open(options: &StoreOptions, shutdown: CancellationToken) -> Result<Stores> {
        let location = options.location.clone();
        let clock = options.clock.clone().unwrap_or_else(Clock::system);
        match &location {
            StoreLocation::Postgres(_) => {
                let store = Arc::new(postgres::PgStore::connect(options, shutdown).await?);
                Ok(Stores::of(store, location, clock, None))
            }
            StoreLocation::Sqlite(path) => {
                let store = Arc::new(sqlite::SqliteStore::open(path, options).await?);
                let released = store.release_signal();
                Ok(Stores::of(store, location, clock, Some(released)))
            }
        }
    }

    fn of<S>(
        store: Arc<S>,
        location: StoreLocation,
        clock: Clock,
        released: Option<tokio::sync::watch::Receiver<()>>,
    ) -> Stores
    where
        S: AgentStore + HealingStore + PostHealingStore + PipelineStore,
    {
        Stores {
            agents: store.clone(),
            healing: store.clone(),
            posts: store.clone(),
            pipeline: store,
            location,
            clock,
            released,
        }
    }

    /// Resolves once every handle on the store (these, and every background
    /// task's) is dropped: for the embedded store, when its single-node lock
    /// is released, so that another server may open the file; at once for
    /// Postgres, which several servers share anyway.
    pub fn released(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let receiver = self.released.clone();
        async move {
            if let Some(mut receiver) = receiver {
                while receiver.changed().await.is_ok() {}
            }
        }
    }
}

/// `fleetcare copy`'s source (see [`copy`]): a read-only, consistent session
/// on an existing store, which must be at this version's schema (a copy never
/// migrates its source). Which backend a location selects is decided here, as
/// for [`Stores::open`], so that `copy` and the backends' `copy` modules do
/// not import each other.
pub async fn open_copy_source(location: &StoreLocation) -> Result<Box<dyn copy::TableStore>> {
    let name = copy::display_name(location);
    Ok(match location {
        StoreLocation::Postgres(url) => {
            Box::new(postgres::copy::PgTables::source(url, &name).await?)
        }
        StoreLocation::Sqlite(path) => {
            Box::new(sqlite::copy::SqliteTables::source(path, &name).await?)
        }
    })
}

/// `fleetcare copy`'s target (see [`copy`]): the write session on a store,
/// created and migrated if needed.
pub async fn open_copy_target(location: &StoreLocation) -> Result<Box<dyn copy::TableStore>> {
    let name = copy::display_name(location);
    Ok(match location {
        StoreLocation::Postgres(url) => {
            Box::new(postgres::copy::PgTables::target(url, &name).await?)
        }
        StoreLocation::Sqlite(path) => {
            Box::new(sqlite::copy::SqliteTables::target(path, &name).await?)
        }
    })
}

/// Applies the migrations of the store `options` selects (`fleetcare migrate`).
pub async fn migrate(options: &StoreOptions) -> Result<StoreLocation> {
    match &options.location {
        StoreLocation::Postgres(_) => {
            postgres::connect_and_migrate(options).await?;
        }
        StoreLocation::Sqlite(path) => {
            sqlite::SqliteStore::open(path, options).await?;
        }
    }
    Ok(options.location.clone())
}
