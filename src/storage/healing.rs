//! The healing store's flows, written once for every SQL backend.
//!
//! Each flow is a sequence: begin, lock, read, let the domain decide, write,
//! commit. It runs here over a [`HealingTx`], one open transaction of a
//! backend, which only runs that backend's SQL (`sqlite/healing.rs`,
//! `postgres/healing.rs`). The rows both backends read, and how they become
//! domain values, live here too ([`EventRow`], [`ActionRow`]); a backend says
//! only how it stores a time and a JSON document (`decode`'s [`StoredTime`],
//! [`StoredJson`]).
//!
//! What a backend's transactions guarantee (the flows rely on it):
//! - [`HealingTxs::begin_write`] serialises what must be: SQLite's one writer
//!   (`BEGIN IMMEDIATE`) serialises every write, so its locks are no-ops;
//!   Postgres takes them ([`HealingTx::lock_agent_errors`] an advisory lock,
//!   the `lock_`/locked reads `FOR UPDATE`);
//! - [`HealingTx::now`] is the store's clock for the whole transaction (the set
//!   clock when a test set one; otherwise SQLite's system clock, Postgres's
//!   `now()`, the transaction's start).

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use sqlx::FromRow;

use crate::domain::brakes::{
    self, BrakeStatus, Breaker, Census, Decision, HealingPolicy, NotPlanned, Numbers, Pause,
    PlanHistory, Scope, Share, Verdict,
};
use crate::domain::healing::{
    self, Context, ErrorType, Evidence, Plan, RecurrenceWindow, Strategy,
};
use crate::domain::healing_records::{
    self as records, ErrorEvent, HealingStatistics, NewErrorEvent, RecoveryAction,
    RecoveryAlreadyActive, RecoveryOutcome, RecoveryStatus, StoredStatusFilter,
};
use crate::error::{Error, Result};
use crate::storage::decode::{StoredJson, StoredTime};
use crate::storage::{
    DecisionQuery, ErrorEventQuery, HealingStore, Planner, RecoveryActionQuery, decode,
};

/// The columns of [`EventRow`], in its order.
pub(crate) const EVENT_COLUMNS: &str =
    "id, agent_id, message, context, error_type, severity, critical, recurring, occurred_at, actor";

/// The columns of [`ActionRow`]: the stored status; the flows let the domain
/// decide what a reader sees ([`seen_at`]).
pub(crate) const ACTION_COLUMNS: &str = "id, error_event_id, agent_id, error_type, \
     context_signature, strategy, chosen_strategy, parameters, estimated_duration_ms, \
     success_probability, risk, escalated, reason, status, created_at, lease_expires_at, \
     completed_at, duration_ms, details, actor, outcome_actor";

/// One row of `error_events`, `T` and `J` the backend's time and JSON.
#[derive(FromRow)]
pub(crate) struct EventRow<T, J> {
    id: i64,
    agent_id: String,
    message: String,
    context: J,
    error_type: String,
    severity: f64,
    critical: bool,
    recurring: bool,
    occurred_at: T,
    actor: String,
}

/// One row of `recovery_actions`, `T` and `J` the backend's time and JSON.
#[derive(FromRow)]
pub(crate) struct ActionRow<T, J> {
    id: i64,
    error_event_id: i64,
    agent_id: String,
    error_type: String,
    context_signature: String,
    strategy: String,
    chosen_strategy: String,
    parameters: J,
    estimated_duration_ms: i64,
    success_probability: f64,
    risk: f64,
    escalated: bool,
    reason: String,
    status: String,
    created_at: T,
    lease_expires_at: T,
    completed_at: Option<T>,
    duration_ms: Option<i64>,
    details: Option<String>,
    actor: String,
    outcome_actor: String,
}

/// The columns of [`DecisionRow`], in its order.
pub(crate) const DECISION_COLUMNS: &str = "id, error_event_id, agent_id, decided_at, verdict, \
     reason, message, strategy, recovery_action_id, fleet_counted, fleet_unhealthy, group_name, \
     group_counted, group_unhealthy, fleet_plans_last_minute, group_plans_last_minute, \
     agent_plans_in_window, actor";

/// One row of `healing_decisions`, `T` the backend's time.
#[derive(FromRow)]
pub(crate) struct DecisionRow<T> {
    id: i64,
    error_event_id: i64,
    agent_id: String,
    decided_at: T,
    verdict: String,
    reason: Option<String>,
    message: String,
    strategy: Option<String>,
    recovery_action_id: Option<i64>,
    fleet_counted: i64,
    fleet_unhealthy: i64,
    group_name: Option<String>,
    group_counted: i64,
    group_unhealthy: i64,
    fleet_plans_last_minute: i64,
    group_plans_last_minute: i64,
    agent_plans_in_window: i64,
    actor: String,
}

impl<T: StoredTime> TryFrom<DecisionRow<T>> for Decision {
    type Error = Error;

    fn try_from(row: DecisionRow<T>) -> Result<Decision> {
        let count = |n: i64| u32::try_from(n).map_err(|_| decode::corrupt("count", &n.to_string()));
        Ok(Decision {
            id: row.id,
            error_event_id: row.error_event_id,
            agent_id: row.agent_id,
            decided_at: row.decided_at.time(),
            verdict: Verdict::parse(&row.verdict)
                .ok_or_else(|| decode::corrupt("healing verdict", &row.verdict))?,
            reason: row.reason,
            message: row.message,
            strategy: row.strategy.as_deref().map(decode::strategy).transpose()?,
            recovery_action_id: row.recovery_action_id,
            numbers: Numbers {
                fleet: Census {
                    counted: count(row.fleet_counted)?,
                    unhealthy: count(row.fleet_unhealthy)?,
                },
                group: row.group_name,
                group_census: Census {
                    counted: count(row.group_counted)?,
                    unhealthy: count(row.group_unhealthy)?,
                },
                fleet_plans_last_minute: count(row.fleet_plans_last_minute)?,
                group_plans_last_minute: count(row.group_plans_last_minute)?,
                agent_plans_in_window: count(row.agent_plans_in_window)?,
            },
            actor: row.actor,
        })
    }
}

/// A count read from the store.
pub(crate) fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A census from the counts read.
pub(crate) fn census(counted: i64, unhealthy: i64) -> Census {
    Census {
        counted: count(counted),
        unhealthy: count(unhealthy),
    }
}

/// A stored breaker: error type, strategy, state, failures, since.
pub(crate) fn breaker_row<T: StoredTime>(
    (error_type, strategy, state, failures, since): (String, String, String, i64, Option<T>),
) -> Result<(ErrorType, Strategy, Breaker)> {
    let breaker = Breaker::from_parts(
        &state,
        u32::try_from(failures).unwrap_or(u32::MAX),
        since.map(StoredTime::time),
    )
    .ok_or_else(|| decode::corrupt("breaker state", &state))?;
    Ok((
        decode::error_type(&error_type)?,
        decode::strategy(&strategy)?,
        breaker,
    ))
}

/// A stored pause: scope, reason, by, at.
pub(crate) fn pause_row<T: StoredTime>(
    (scope, reason, by, at): (String, String, String, T),
) -> Result<Pause> {
    Ok(Pause {
        scope: Scope::parse_stored(&scope).ok_or_else(|| decode::corrupt("pause scope", &scope))?,
        reason,
        by,
        at: at.time(),
    })
}

impl<T: StoredTime, J: StoredJson<Context>> TryFrom<EventRow<T, J>> for ErrorEvent {
    type Error = Error;

    fn try_from(row: EventRow<T, J>) -> Result<ErrorEvent> {
        Ok(ErrorEvent {
            id: row.id,
            error_type: decode::error_type(&row.error_type)?,
            context: row.context.value("error context")?,
            agent_id: row.agent_id,
            message: row.message,
            severity: row.severity,
            critical: row.critical,
            recurring: row.recurring,
            occurred_at: row.occurred_at.time(),
            actor: row.actor,
            recovery: None,
        })
    }
}

/// The action as stored (see [`seen_at`] for what a reader sees).
impl<T: StoredTime, J: StoredJson<Context>> TryFrom<ActionRow<T, J>> for RecoveryAction {
    type Error = Error;

    fn try_from(row: ActionRow<T, J>) -> Result<RecoveryAction> {
        Ok(RecoveryAction {
            id: row.id,
            error_event_id: row.error_event_id,
            error_type: decode::error_type(&row.error_type)?,
            strategy: decode::strategy(&row.strategy)?,
            chosen_strategy: decode::strategy(&row.chosen_strategy)?,
            status: RecoveryStatus::parse(&row.status)
                .ok_or_else(|| decode::corrupt("recovery status", &row.status))?,
            parameters: row.parameters.value("recovery parameters")?,
            agent_id: row.agent_id,
            context_signature: row.context_signature,
            estimated_duration: Duration::milliseconds(row.estimated_duration_ms),
            success_probability: row.success_probability,
            risk: row.risk,
            escalated: row.escalated,
            reason: row.reason,
            created_at: row.created_at.time(),
            lease_expires_at: row.lease_expires_at.time(),
            completed_at: row.completed_at.map(StoredTime::time),
            duration: row.duration_ms.map(Duration::milliseconds),
            details: row.details,
            actor: row.actor,
            outcome_actor: row.outcome_actor,
        })
    }
}

/// A stored action as a reader at `now` sees it (an ACTIVE one whose lease
/// ran out is EXPIRED).
pub(crate) fn seen_at(mut action: RecoveryAction, now: DateTime<Utc>) -> RecoveryAction {
    action.status = action.status.as_of(action.lease_expires_at, now);
    action
}

/// One row of `healing_patterns` for a plan: strategy, successes, failures,
/// total recovery milliseconds.
pub(crate) type EvidenceRow = (String, i64, i64, f64);

/// A milliseconds column.
pub(crate) fn millis(d: Duration) -> i64 {
    d.num_milliseconds()
}

/// A recovery action to insert, ACTIVE.
pub(crate) struct NewRecovery<'a> {
    pub event: &'a ErrorEvent,
    pub context_signature: &'a str,
    pub plan: &'a Plan,
    pub created_at: DateTime<Utc>,
    pub lease_expires_at: DateTime<Utc>,
    pub actor: &'a str,
}

/// What an outcome writes to its action.
pub(crate) struct Finish<'a> {
    pub status: RecoveryStatus,
    pub duration_ms: i64,
    pub details: &'a str,
    pub completed_at: DateTime<Utc>,
    pub actor: &'a str,
}

/// What an outcome adds to its pattern (created at zero when new).
pub(crate) struct Lesson<'a> {
    pub error_type: ErrorType,
    pub context_signature: &'a str,
    pub strategy: Strategy,
    pub successes: i64,
    pub failures: i64,
    pub recovery_ms: f64,
    pub at: DateTime<Utc>,
}

/// One open transaction of a backend: its SQL only. Dropped without
/// [`HealingTx::commit`], it rolls back.
#[async_trait]
pub(crate) trait HealingTx: Send {
    /// The store's clock, for this transaction.
    async fn now(&mut self) -> Result<DateTime<Utc>>;

    /// Serialises error reports of one agent until commit.
    async fn lock_agent_errors(&mut self, agent_id: &str) -> Result<()>;

    /// The agent's errors of `error_type` inside `window`.
    async fn count_errors(
        &mut self,
        agent_id: &str,
        error_type: ErrorType,
        window: RecurrenceWindow,
    ) -> Result<i64>;

    /// Inserts the event as reported at `at`.
    async fn insert_error(
        &mut self,
        event: &NewErrorEvent,
        critical: bool,
        recurring: bool,
        at: DateTime<Utc>,
    ) -> Result<ErrorEvent>;

    async fn error_event(&mut self, id: i64) -> Result<Option<ErrorEvent>>;

    /// The agent's action stored as ACTIVE (at most one: the partial unique
    /// index), locked until commit, as stored.
    async fn lock_active_recovery(&mut self, agent_id: &str) -> Result<Option<RecoveryAction>>;

    /// The action, locked until commit, as stored.
    async fn lock_recovery(&mut self, id: i64) -> Result<Option<RecoveryAction>>;

    async fn set_recovery_status(&mut self, id: i64, status: RecoveryStatus) -> Result<()>;

    /// What was learned for this kind of error in this context.
    async fn evidence(
        &mut self,
        error_type: ErrorType,
        context_signature: &str,
    ) -> Result<Vec<EvidenceRow>>;

    /// Inserts the action; `None` when the unique index of one ACTIVE per
    /// agent refused it (the transaction is then of no further use).
    async fn insert_recovery(&mut self, new: &NewRecovery<'_>) -> Result<Option<RecoveryAction>>;

    /// Ends the action; returns it as stored.
    async fn finish_recovery(&mut self, id: i64, finish: &Finish<'_>) -> Result<RecoveryAction>;

    /// Adds to the pattern's counts (inserting it when new).
    async fn learn(&mut self, lesson: &Lesson<'_>) -> Result<()>;

    /// Every error; the errors since `recent_since`; the actions stored as
    /// one of `filters`.
    async fn statistics_counts(
        &mut self,
        recent_since: DateTime<Utc>,
        filters: &[StoredStatusFilter],
    ) -> Result<(i64, i64, i64)>;

    /// Errors per stored type, by type.
    async fn errors_by_type(&mut self) -> Result<Vec<(String, i64)>>;

    /// Every pattern, by error type, context signature, strategy.
    async fn patterns(&mut self) -> Result<Vec<decode::PatternRow>>;

    /// The actions `query` selects, newest first, as stored; `status` the
    /// stored statuses its status filter means (`None`: any).
    async fn recovery_actions(
        &mut self,
        query: &RecoveryActionQuery,
        status: Option<&[StoredStatusFilter]>,
    ) -> Result<Vec<RecoveryAction>>;

    /// Every recovery action planned for one of `event_ids`, as stored.
    async fn actions_of_events(&mut self, event_ids: &[i64]) -> Result<Vec<RecoveryAction>>;

    /// Deletes the recovery actions created before `before` that have
    /// ended (not ACTIVE, or ACTIVE with a lease that ran out before it);
    /// how many.
    async fn delete_actions_before(&mut self, before: DateTime<Utc>) -> Result<u64>;

    /// Deletes the error events that occurred before `before` and have no
    /// recovery action left; how many.
    async fn delete_events_before(&mut self, before: DateTime<Utc>) -> Result<u64>;

    /// The rates (plans since `rate_since`, fleet-wide and in `group`), the
    /// census of the fleet and of `group` at `now` (see [`brakes::Census`];
    /// the fleet's also counts the agents not registered that are under
    /// remediation) and, when `budget` names an agent, what its retry budget
    /// is counted on; in one statement. The agents are not counted but read
    /// from `agent_census`, which triggers on `agents` keep (the migration
    /// `agent_census`): what this counts is the active recoveries and the
    /// last minute's plans.
    async fn brake_counts(
        &mut self,
        now: DateTime<Utc>,
        rate_since: DateTime<Utc>,
        group: Option<(&str, &str)>,
        budget: Option<BudgetQuery<'_>>,
    ) -> Result<BrakeCounts>;

    /// Takes `lock` (held until commit; SQLite's one writer serialises every
    /// write already, and takes none), then reads the agent's status and the
    /// value of its `group_by` label (`None` when it has none or no key is
    /// given); `None` when not registered. One statement.
    async fn brake_agent(
        &mut self,
        agent_id: &str,
        group_by: Option<&str>,
        lock: BrakeLock,
    ) -> Result<Option<(String, Option<String>)>>;

    /// Each group's census (`group_by` the label key), by group.
    async fn group_censuses(
        &mut self,
        now: DateTime<Utc>,
        group_by: &str,
    ) -> Result<Vec<(String, Census)>>;

    /// Agents with at least `at_least` recovery actions created since
    /// `since`, with their counts.
    async fn busiest_agents(
        &mut self,
        since: DateTime<Utc>,
        at_least: u32,
    ) -> Result<Vec<(String, u32)>>;

    async fn pauses(&mut self) -> Result<Vec<Pause>>;

    /// Stores the pause, replacing the scope's.
    async fn put_pause(&mut self, pause: &Pause) -> Result<()>;

    /// Whether the scope was paused.
    async fn delete_pause(&mut self, scope: &Scope) -> Result<bool>;

    /// The breakers stored (of one error type, or all), locked until commit
    /// when `lock`.
    async fn breakers(
        &mut self,
        error_type: Option<ErrorType>,
        lock: bool,
    ) -> Result<Vec<(ErrorType, Strategy, Breaker)>>;

    async fn put_breaker(
        &mut self,
        error_type: ErrorType,
        strategy: Strategy,
        breaker: &Breaker,
        at: DateTime<Utc>,
    ) -> Result<()>;

    /// Records a decision; its id.
    async fn insert_decision(&mut self, decision: &Decision) -> Result<i64>;

    async fn decisions(&mut self, query: &DecisionQuery) -> Result<Vec<Decision>>;

    /// Deletes the decisions taken before `before`; how many.
    async fn delete_decisions_before(&mut self, before: DateTime<Utc>) -> Result<u64>;

    async fn commit(self: Box<Self>) -> Result<()>;
}

/// What [`HealingTx::brake_counts`] counts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BrakeCounts {
    pub fleet: Census,
    pub group: Census,
    pub fleet_plans: u32,
    pub group_plans: u32,
    /// The agent's, when asked for (else empty).
    pub history: PlanHistory,
}

/// The row [`HealingTx::brake_counts`] reads, `T` a backend's stored time:
/// the fleet's counted and unhealthy, the group's, the fleet's and the
/// group's plans in the last minute, and the agent's history (latest
/// success, errors after it, plans in the window and since that success).
pub(crate) type BrakeRow<T> = (i64, i64, i64, i64, i64, i64, Option<T>, i64, i64, i64);

/// The counts of a [`BrakeRow`].
pub(crate) fn brake_counts<T: StoredTime>(row: BrakeRow<T>) -> BrakeCounts {
    BrakeCounts {
        fleet: census(row.0, row.1),
        group: census(row.2, row.3),
        fleet_plans: count(row.4),
        group_plans: count(row.5),
        history: PlanHistory {
            last_success: row.6.map(StoredTime::time),
            errors_since_success: count(row.7),
            plans_in_window: count(row.8),
            plans_since_success: count(row.9),
        },
    }
}

/// Whose plan history [`HealingTx::brake_counts`] reads: the agent's latest
/// success, its errors after it (`except` left out), its plans since
/// `window_start` and since that success.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BudgetQuery<'a> {
    pub agent_id: &'a str,
    pub except: i64,
    pub window_start: DateTime<Utc>,
}

/// How a plan holds the brakes' lock ([`plan_recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BrakeLock {
    /// The brakes are off: no lock.
    None,
    /// One lock slot (`brakes::lock_slot`), beside plans holding others.
    Slot(u32),
    /// Every slot: alone.
    All,
}

/// Opens a backend's transactions.
#[async_trait]
pub(crate) trait HealingTxs: Sync {
    /// Whether every write transaction runs alone (SQLite's one writer): the
    /// brakes then count exactly without locking.
    fn writes_serialised(&self) -> bool;

    /// A write transaction (see the module documentation).
    async fn begin_write(&self) -> Result<Box<dyn HealingTx + '_>>;

    /// A transaction to read the last committed state in.
    async fn begin_read(&self) -> Result<Box<dyn HealingTx + '_>>;

    /// [`HealingStore::list_error_events`]: one statement on the last
    /// committed state (no transaction, no clock: nothing to share).
    async fn error_events(&self, query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>>;
}

/// A backend that opens [`HealingTxs`] is a [`HealingStore`]: the flows below.
#[async_trait]
impl<S: HealingTxs + Send + Sync + 'static> HealingStore for S {
    async fn record_error(&self, event: NewErrorEvent) -> Result<ErrorEvent> {
        record_error(self, event).await
    }

    async fn plan_recovery(
        &self,
        error_event_id: i64,
        lease: Duration,
        actor: &str,
        policy: &HealingPolicy,
        planner: Planner<'_>,
    ) -> Result<RecoveryAction> {
        plan_recovery(self, error_event_id, lease, actor, policy, planner).await
    }

    async fn record_recovery_outcome(
        &self,
        action_id: i64,
        outcome: RecoveryOutcome,
        policy: &HealingPolicy,
    ) -> Result<RecoveryAction> {
        record_recovery_outcome(self, action_id, outcome, policy).await
    }

    async fn healing_brakes(&self, policy: &HealingPolicy) -> Result<BrakeStatus> {
        healing_brakes(self, policy).await
    }

    async fn pause_healing(&self, scope: Scope, reason: &str, by: &str) -> Result<Pause> {
        let mut tx = self.begin_write().await?;
        let now = tx.now().await?;
        let pause = brakes::pause(scope, reason, by, now).map_err(Error::InvalidArgument)?;
        tx.put_pause(&pause).await?;
        tx.commit().await?;
        Ok(pause)
    }

    async fn resume_healing(&self, scope: &Scope) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let resumed = tx.delete_pause(scope).await?;
        tx.commit().await?;
        Ok(resumed)
    }

    async fn list_healing_decisions(&self, query: &DecisionQuery) -> Result<Vec<Decision>> {
        let mut tx = self.begin_read().await?;
        let decisions = tx.decisions(query).await?;
        tx.commit().await?;
        Ok(decisions)
    }

    async fn healing_statistics(&self) -> Result<HealingStatistics> {
        healing_statistics(self).await
    }

    async fn list_error_events(&self, query: &ErrorEventQuery) -> Result<Vec<ErrorEvent>> {
        list_error_events(self, query).await
    }

    async fn list_recovery_actions(
        &self,
        query: &RecoveryActionQuery,
    ) -> Result<Vec<RecoveryAction>> {
        list_recovery_actions(self, query).await
    }

    async fn prune_healing(&self, before: DateTime<Utc>) -> Result<(u64, u64)> {
        prune_healing(self, before).await
    }
}

/// [`HealingStore::list_error_events`]: the page, then the recoveries
/// planned for its events, each event showing its latest as a reader sees
/// it at the store's clock.
pub(crate) async fn list_error_events(
    store: &dyn HealingTxs,
    query: &ErrorEventQuery,
) -> Result<Vec<ErrorEvent>> {
    let mut events = store.error_events(query).await?;
    if events.is_empty() {
        return Ok(events);
    }
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    let mut tx = store.begin_read().await?;
    let now = tx.now().await?;
    let actions = tx.actions_of_events(&ids).await?;
    drop(tx);
    let mut latest: std::collections::HashMap<i64, RecoveryAction> = Default::default();
    for action in actions {
        match latest.get(&action.error_event_id) {
            Some(seen) if seen.id > action.id => {}
            _ => {
                latest.insert(action.error_event_id, action);
            }
        }
    }
    for event in &mut events {
        event.recovery = latest
            .remove(&event.id)
            .map(|a| seen_at(a, now))
            .map(|a| (a.id, a.status));
    }
    Ok(events)
}

/// [`HealingStore::prune_healing`]: the ended actions first (an event's
/// row is kept while an action refers to it), then the events left alone,
/// in one transaction. What was learned (`healing_patterns`) is kept.
pub(crate) async fn prune_healing(
    store: &dyn HealingTxs,
    before: DateTime<Utc>,
) -> Result<(u64, u64)> {
    let mut tx = store.begin_write().await?;
    let actions = tx.delete_actions_before(before).await?;
    let events = tx.delete_events_before(before).await?;
    tx.delete_decisions_before(before).await?;
    tx.commit().await?;
    Ok((events, actions))
}

/// [`HealingStore::record_error`].
pub(crate) async fn record_error(
    store: &dyn HealingTxs,
    event: NewErrorEvent,
) -> Result<ErrorEvent> {
    let mut tx = store.begin_write().await?;
    // Concurrent reports of one agent count each other.
    tx.lock_agent_errors(&event.agent_id).await?;
    let now = tx.now().await?;
    let earlier = tx
        .count_errors(
            &event.agent_id,
            event.error_type,
            healing::recurrence_window(now),
        )
        .await?;
    let stored = tx
        .insert_error(
            &event,
            healing::is_critical(event.severity),
            healing::recurring_given(earlier),
            now,
        )
        .await?;
    tx.commit().await?;
    Ok(stored)
}

/// What the brakes decide a plan on, read in the plan's transaction.
struct BrakeInputs {
    status: crate::domain::agent::AgentStatus,
    registered: bool,
    group: Option<String>,
    fleet: Census,
    group_census: Census,
    fleet_plans: u32,
    group_plans: u32,
    agent_plans: u32,
    pauses: Vec<Pause>,
}

impl BrakeInputs {
    /// The agent's group as (label key, value), when the policy groups.
    fn group_key<'a>(&'a self, policy: &'a HealingPolicy) -> Option<(&'a str, &'a str)> {
        policy.group_by.as_deref().zip(self.group.as_deref())
    }

    fn request(&self) -> brakes::Request<'_> {
        brakes::Request {
            agent_status: self.status,
            agent_unhealthy: brakes::unhealthy(self.status, false),
            group: self.group.as_deref(),
            fleet: self.fleet,
            group_census: self.group_census,
            fleet_plans_last_minute: self.fleet_plans,
            group_plans_last_minute: self.group_plans,
            agent_plans_in_window: self.agent_plans,
            pauses: &self.pauses,
        }
    }
}

/// Takes `lock`, then reads what the brakes decide a plan for `event`'s
/// agent on at `now`: its status and group and the pauses and, with the
/// brakes on, in one more statement, the rates, the census of the fleet and
/// of its group, and its budget.
async fn brake_inputs(
    tx: &mut dyn HealingTx,
    policy: &HealingPolicy,
    event: &ErrorEvent,
    now: DateTime<Utc>,
    lock: BrakeLock,
) -> Result<BrakeInputs> {
    let agent = &event.agent_id;
    let row = tx
        .brake_agent(agent, policy.group_by.as_deref(), lock)
        .await?;
    // An agent never registered counts as a healthy member of the fleet
    // (and of no group) until planned.
    let (status, group) = match &row {
        Some((status, group)) => (decode::status(status)?, group.clone()),
        None => (crate::domain::agent::AgentStatus::Idle, None),
    };
    let mut inputs = BrakeInputs {
        status,
        registered: row.is_some(),
        group,
        fleet: Census::default(),
        group_census: Census::default(),
        fleet_plans: 0,
        group_plans: 0,
        agent_plans: 0,
        pauses: tx.pauses().await?,
    };
    if policy.brakes {
        let budget = BudgetQuery {
            agent_id: agent,
            except: event.id,
            window_start: now - policy.retry_window,
        };
        let counts = tx
            .brake_counts(
                now,
                now - brakes::RATE_WINDOW,
                inputs.group_key(policy),
                Some(budget),
            )
            .await?;
        inputs.fleet = counts.fleet;
        if !inputs.registered {
            inputs.fleet.counted += 1;
        }
        inputs.group_census = counts.group;
        inputs.fleet_plans = counts.fleet_plans;
        inputs.group_plans = counts.group_plans;
        inputs.agent_plans = brakes::budget_plans(policy, &counts.history, now);
    }
    Ok(inputs)
}

/// Records a decision without a plan and commits it; the error to answer.
async fn not_planned(
    mut tx: Box<dyn HealingTx + '_>,
    decision: &Decision,
    reason: &'static str,
) -> Result<Option<RecoveryAction>> {
    let decision_id = tx.insert_decision(decision).await?;
    tx.commit().await?;
    Err(NotPlanned {
        verdict: decision.verdict,
        reason,
        message: decision.message.clone(),
        decision_id,
        agent_id: decision.agent_id.clone(),
    }
    .into())
}

/// [`HealingStore::plan_recovery`]: one active recovery per agent, then,
/// under the brakes' lock, the brakes (`domain::brakes`): the agent's own,
/// then the fleet's counts; then the plan around the open breakers; every
/// decision recorded, braked or not.
///
/// The lock: a plan counts under its agent's slot (`brakes::lock_slot`),
/// beside plans of other slots; when its counts leave no room for them
/// (`brakes::room_for_neighbours`), it is rolled back and decided again
/// under the lock of every slot. A backend whose writes are serialised
/// anyway (SQLite) counts exactly without either.
pub(crate) async fn plan_recovery(
    store: &dyn HealingTxs,
    error_event_id: i64,
    lease: Duration,
    actor: &str,
    policy: &HealingPolicy,
    planner: Planner<'_>,
) -> Result<RecoveryAction> {
    let mut planner = Some(planner);
    let mut alone = store.writes_serialised();
    loop {
        match plan_once(
            store,
            error_event_id,
            lease,
            actor,
            policy,
            &mut planner,
            alone,
        )
        .await?
        {
            Some(action) => return Ok(action),
            None => alone = true,
        }
    }
}

/// One attempt of [`plan_recovery`]; `None` when its counts were taken
/// beside other plans and left them no room (nothing was kept).
async fn plan_once(
    store: &dyn HealingTxs,
    error_event_id: i64,
    lease: Duration,
    actor: &str,
    policy: &HealingPolicy,
    planner: &mut Option<Planner<'_>>,
    alone: bool,
) -> Result<Option<RecoveryAction>> {
    let mut tx = store.begin_write().await?;
    let now = tx.now().await?;
    let event = tx
        .error_event(error_event_id)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "error event",
            id: error_event_id.to_string(),
        })?;
    let stored_active = tx.lock_active_recovery(&event.agent_id).await?;
    // Free the agent from a recovery whose lease ran out without an outcome.
    if let Some(lapsed) = records::admit_plan(stored_active.as_ref(), now)? {
        tx.set_recovery_status(lapsed, RecoveryStatus::Expired)
            .await?;
    }
    let lock = match (policy.brakes, alone) {
        (false, _) => BrakeLock::None,
        (true, true) => BrakeLock::All,
        (true, false) => BrakeLock::Slot(brakes::lock_slot(&event.agent_id)),
    };
    let inputs = brake_inputs(&mut *tx, policy, &event, now, lock).await?;
    let mut braked = brakes::check_agent(policy, &inputs.request());
    if braked.is_ok() && policy.brakes {
        braked = brakes::check_counts(policy, &inputs.request());
        if braked.is_ok() && !alone && !brakes::room_for_neighbours(policy, &inputs.request()) {
            return Ok(None);
        }
    }
    let mut decision = Decision {
        id: 0,
        error_event_id,
        agent_id: event.agent_id.clone(),
        decided_at: now,
        verdict: Verdict::Braked,
        reason: None,
        message: String::new(),
        strategy: None,
        recovery_action_id: None,
        numbers: inputs.request().numbers(),
        actor: actor.to_owned(),
    };
    if let Err(braked) = braked {
        decision.reason = Some(braked.reason().to_owned());
        decision.message = braked.to_string();
        return not_planned(tx, &decision, braked.reason()).await;
    }
    let signature = healing::context_signature(&event.context);
    let evidence = tx
        .evidence(event.error_type, &signature)
        .await?
        .into_iter()
        .map(|(strategy, successes, failures, total_ms)| {
            Ok(Evidence {
                strategy: decode::strategy(&strategy)?,
                successes,
                failures,
                total_recovery_secs: total_ms / 1000.0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let breakers: Vec<(Strategy, Breaker)> = tx
        .breakers(Some(event.error_type), true)
        .await?
        .into_iter()
        .map(|(_, strategy, breaker)| (strategy, breaker))
        .collect();
    let closed_off = brakes::closed_off(&breakers, policy, now);
    let planner = planner
        .take()
        .ok_or_else(|| Error::Internal("the planner ran twice".into()))?;
    let plan = planner(&event, &evidence, &closed_off);
    decision.strategy = Some(plan.strategy);
    if policy.dry_run {
        decision.verdict = Verdict::DryRun;
        decision.reason = Some(brakes::REASON_DRY_RUN.to_owned());
        decision.message = format!(
            "dry run: {} would be planned ({}); nothing was handed out",
            plan.strategy.as_str(),
            plan.reason
        );
        return not_planned(tx, &decision, brakes::REASON_DRY_RUN).await;
    }
    // The half-open trial of an open breaker goes through this plan.
    if let Some((_, breaker)) = breakers.iter().find(|(s, _)| *s == plan.strategy) {
        let admit = breaker.admits(policy, now);
        let after = breaker.after_admit(admit, now);
        if after != *breaker {
            tx.put_breaker(event.error_type, plan.strategy, &after, now)
                .await?;
        }
    }
    let new = NewRecovery {
        event: &event,
        context_signature: &signature,
        plan: &plan,
        created_at: now,
        lease_expires_at: records::lease_expires_at(now, lease),
        actor,
    };
    if let Some(action) = tx.insert_recovery(&new).await? {
        decision.verdict = Verdict::Planned;
        decision.recovery_action_id = Some(action.id);
        decision.message = format!(
            "planned {} ({}) as recovery action {}",
            plan.strategy.as_str(),
            plan.reason,
            action.id
        );
        tx.insert_decision(&decision).await?;
        tx.commit().await?;
        return Ok(Some(seen_at(action, now)));
    }
    // The unique index of one ACTIVE per agent refused this one: a concurrent
    // plan committed first (on SQLite, whose one writer makes the check above
    // see any active recovery, a backstop: another process on the file).
    drop(tx);
    let mut tx = store.begin_read().await?;
    let now = tx.now().await?;
    let winner = tx.lock_active_recovery(&event.agent_id).await?;
    drop(tx);
    match winner {
        Some(active) if records::admit_plan(Some(&active), now).is_err() => {
            Err(RecoveryAlreadyActive::of(&active).into())
        }
        _ => Err(Error::Conflict(format!(
            "a concurrent recovery plan for agent {:?} won and is already over",
            event.agent_id
        ))),
    }
}

/// [`HealingStore::healing_brakes`]: the brakes as they stand, at one `now`.
pub(crate) async fn healing_brakes(
    store: &dyn HealingTxs,
    policy: &HealingPolicy,
) -> Result<BrakeStatus> {
    let mut tx = store.begin_read().await?;
    let now = tx.now().await?;
    let pauses = tx.pauses().await?;
    let breakers = tx
        .breakers(None, false)
        .await?
        .into_iter()
        .filter(|(_, _, b)| b.is_open())
        .collect();
    let share = |scope, census: Census| Share {
        scope,
        census,
        allowed: brakes::allowed_unhealthy(policy, census.counted),
    };
    let fleet = tx.brake_counts(now, now, None, None).await?.fleet;
    let mut shares = vec![share(Scope::Fleet, fleet)];
    if let Some(key) = &policy.group_by {
        for (group, census) in tx.group_censuses(now, key).await? {
            shares.push(share(Scope::Group(group), census));
        }
    }
    let mut spent = Vec::new();
    for (agent, _) in tx
        .busiest_agents(now - policy.retry_window, policy.retry_budget)
        .await?
    {
        let budget = BudgetQuery {
            agent_id: &agent,
            except: 0,
            window_start: now - policy.retry_window,
        };
        let history = tx.brake_counts(now, now, None, Some(budget)).await?.history;
        let plans = brakes::budget_plans(policy, &history, now);
        if plans >= policy.retry_budget {
            spent.push((agent, plans));
        }
    }
    tx.commit().await?;
    Ok(BrakeStatus {
        policy: policy.clone(),
        pauses,
        breakers,
        shares,
        spent,
        at: now,
    })
}

/// [`HealingStore::record_recovery_outcome`].
pub(crate) async fn record_recovery_outcome(
    store: &dyn HealingTxs,
    action_id: i64,
    outcome: RecoveryOutcome,
    policy: &HealingPolicy,
) -> Result<RecoveryAction> {
    let mut tx = store.begin_write().await?;
    let now = tx.now().await?;
    let current = tx
        .lock_recovery(action_id)
        .await?
        .ok_or_else(|| Error::NotFound {
            kind: "recovery action",
            id: action_id.to_string(),
        })?;
    let current = seen_at(current, now);
    let status = records::accept_outcome(&current, &outcome)?;
    let finished = tx
        .finish_recovery(
            action_id,
            &Finish {
                status,
                duration_ms: millis(outcome.duration),
                details: &outcome.details,
                completed_at: now,
                actor: &outcome.actor,
            },
        )
        .await?;
    // Learn for the strategy that was actually carried out.
    tx.learn(&Lesson {
        error_type: current.error_type,
        context_signature: &current.context_signature,
        strategy: current.strategy,
        successes: i64::from(outcome.success),
        failures: i64::from(!outcome.success),
        recovery_ms: millis(outcome.duration) as f64,
        at: now,
    })
    .await?;
    // The strategy's breaker, fleet-wide.
    if brakes::breakered(current.strategy) {
        let breaker = tx
            .breakers(Some(current.error_type), true)
            .await?
            .into_iter()
            .find(|(_, s, _)| *s == current.strategy)
            .map(|(_, _, b)| b)
            .unwrap_or_default();
        let after = breaker.after_outcome(outcome.success, policy, now);
        if after != breaker {
            tx.put_breaker(current.error_type, current.strategy, &after, now)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(seen_at(finished, now))
}

/// [`HealingStore::healing_statistics`].
pub(crate) async fn healing_statistics(store: &dyn HealingTxs) -> Result<HealingStatistics> {
    // One read transaction: every figure as of one `now`.
    let mut tx = store.begin_read().await?;
    let now = tx.now().await?;
    let counts = tx
        .statistics_counts(
            records::statistics_recent_since(now),
            &RecoveryStatus::Active.stored_as(now),
        )
        .await?;
    let by_type = tx.errors_by_type().await?;
    let patterns = tx.patterns().await?;
    tx.commit().await?;
    decode::healing_statistics(counts, by_type, patterns)
}

/// [`HealingStore::list_recovery_actions`].
pub(crate) async fn list_recovery_actions(
    store: &dyn HealingTxs,
    query: &RecoveryActionQuery,
) -> Result<Vec<RecoveryAction>> {
    // One read transaction: the filter and what a reader sees, at one `now`.
    let mut tx = store.begin_read().await?;
    let now = tx.now().await?;
    let filters = query.status.map(|status| status.stored_as(now));
    let rows = tx.recovery_actions(query, filters.as_deref()).await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|action| seen_at(action, now))
        .collect())
}
