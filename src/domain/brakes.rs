//! Remediation brakes (issue 24): the limits that keep healing from turning
//! one fleet-wide fault into a restart storm. Pure: the store counts and
//! locks, the runtime reloads the policy; every *whether* is decided here,
//! with the clock passed in.
//!
//! Each plan is checked, in the transaction that records it, against:
//!
//! - **the pause** ([`Pause`]): the fleet, or one group, paused by an
//!   operator;
//! - **the unhealthy share** ([`HealingPolicy::max_unhealthy_percent`]): at
//!   most this share of the fleet, and of the agent's group (the value of
//!   its `group_by` label), may be unhealthy at once, the plan's agent
//!   counted as unhealthy once planned; never fewer than
//!   [`HealingPolicy::min_unhealthy`] (so a tiny group still heals one at a
//!   time). *Unhealthy* is under remediation (an active recovery) or
//!   OFFLINE: an agent under remediation is never counted as healthy (the
//!   hole machine-api-operator #902 fell into). EXHAUSTED agents (a quota,
//!   not a fault) count as neither and are never planned a recovery;
//! - **the rate**: at most [`HealingPolicy::max_plans_per_minute`] plans in
//!   the last minute fleet-wide, and [`HealingPolicy::max_group_plans_per_minute`]
//!   in the agent's group;
//! - **the agent's retry budget**: at most [`HealingPolicy::retry_budget`]
//!   plans per [`HealingPolicy::retry_window`], the count starting again
//!   once the agent has been healthy for [`HealingPolicy::min_healthy_period`];
//! - **the breaker** of the plan's (error type, strategy) ([`Breaker`]):
//!   after [`HealingPolicy::breaker_failures`] failures in a row fleet-wide it
//!   opens; after [`HealingPolicy::breaker_cooldown`] one plan goes through
//!   half-open, whose success closes it and whose failure opens it again. It
//!   never fails open: with every strategy's breaker open, the plan is
//!   braked, not handed out anyway.
//!
//! [`check`] answers the first brake that holds with the numbers it was
//! decided on ([`Braked`]): an EXHAUSTED agent, the pause, the agent's
//! budget (the agent's own, [`check_agent`]), then the rates and the share
//! (counted fleet-wide, [`check_counts`], only once the agent's passed); a
//! dry-run policy decides the same and records the plan without handing it
//! out.
//!
//! Two plans must not both pass with one slot left. A plan counts under
//! the lock slot of its agent ([`lock_slot`]), so at most [`LOCK_SLOTS`]
//! plans count at once; one whose counts leave room for all of them
//! ([`room_for_neighbours`]) is decided there, in parallel with the others;
//! one near a limit is decided again with every other plan locked out.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;

use crate::domain::agent::AgentStatus;
use crate::domain::config_file::{line_of, toml_error};
use crate::domain::labels::Labels;

/// The default share of a group that may be unhealthy at once, in percent
/// (Cluster API's `maxUnhealthy` is set near here; medik8s keeps 51 %
/// healthy).
pub const DEFAULT_MAX_UNHEALTHY_PERCENT: u32 = 40;
/// The default floor: whatever the share, this many may be unhealthy at once.
pub const DEFAULT_MIN_UNHEALTHY: u32 = 1;
/// The default fleet-wide rate of plans.
pub const DEFAULT_MAX_PLANS_PER_MINUTE: u32 = 60;
/// The default rate of plans per group.
pub const DEFAULT_MAX_GROUP_PLANS_PER_MINUTE: u32 = 20;
/// The default retry budget: plans per agent per window.
pub const DEFAULT_RETRY_BUDGET: u32 = 3;
/// The default retry window.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::hours(1);
/// The default healthy period after which an agent's budget starts again
/// (KubeadmControlPlane's `minHealthyPeriod`).
pub const DEFAULT_MIN_HEALTHY_PERIOD: Duration = Duration::hours(1);
/// The default failures in a row that open a breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// The default time an open breaker waits before letting one plan through.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::minutes(5);

/// The remediation policy: one object, from `--healing-policy` and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealingPolicy {
    /// At most this percent of the fleet, and of each group, unhealthy at once.
    pub max_unhealthy_percent: u32,
    /// Whatever the share, this many may be unhealthy at once.
    pub min_unhealthy: u32,
    /// The label key whose values name the groups (`None`: the fleet only).
    pub group_by: Option<String>,
    pub max_plans_per_minute: u32,
    pub max_group_plans_per_minute: u32,
    pub retry_budget: u32,
    pub retry_window: Duration,
    pub min_healthy_period: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// Plans are decided and recorded, never handed out.
    pub dry_run: bool,
    /// The share, rate and budget brakes are checked (`false`: only the
    /// pauses, EXHAUSTED agents and the breakers hold, and nothing is
    /// counted; for measuring what the brakes cost, not for production).
    pub brakes: bool,
}

impl Default for HealingPolicy {
    fn default() -> Self {
        HealingPolicy {
            max_unhealthy_percent: DEFAULT_MAX_UNHEALTHY_PERCENT,
            min_unhealthy: DEFAULT_MIN_UNHEALTHY,
            group_by: None,
            max_plans_per_minute: DEFAULT_MAX_PLANS_PER_MINUTE,
            max_group_plans_per_minute: DEFAULT_MAX_GROUP_PLANS_PER_MINUTE,
            retry_budget: DEFAULT_RETRY_BUDGET,
            retry_window: DEFAULT_RETRY_WINDOW,
            min_healthy_period: DEFAULT_MIN_HEALTHY_PERIOD,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            dry_run: false,
            brakes: true,
        }
    }
}

impl HealingPolicy {
    /// A policy that brakes nothing a test or a bench did not ask for: every
    /// share allowed, rates and budgets out of reach, breakers that never
    /// open in practice (brakes "off").
    pub fn unbraked() -> HealingPolicy {
        HealingPolicy {
            max_unhealthy_percent: 100,
            min_unhealthy: 1_000_000,
            group_by: None,
            max_plans_per_minute: 1_000_000,
            max_group_plans_per_minute: 1_000_000,
            retry_budget: 1000,
            retry_window: Duration::seconds(1),
            min_healthy_period: DEFAULT_MIN_HEALTHY_PERIOD,
            breaker_failures: 1000,
            breaker_cooldown: Duration::seconds(1),
            dry_run: false,
            brakes: true,
        }
    }
}

/// The policy file as written: every key optional (the default, or the
/// flag's value, stands), durations in humantime (`90s`, `1h`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    max_unhealthy_percent: Option<toml::Spanned<i64>>,
    min_unhealthy: Option<toml::Spanned<i64>>,
    group_by: Option<toml::Spanned<String>>,
    max_plans_per_minute: Option<toml::Spanned<i64>>,
    max_group_plans_per_minute: Option<toml::Spanned<i64>>,
    retry_budget: Option<toml::Spanned<i64>>,
    retry_window: Option<toml::Spanned<String>>,
    min_healthy_period: Option<toml::Spanned<String>>,
    breaker_failures: Option<toml::Spanned<i64>>,
    breaker_cooldown: Option<toml::Spanned<String>>,
    dry_run: Option<bool>,
    brakes: Option<bool>,
}

/// The longest of the policy's durations.
const MAX_POLICY_DURATION: Duration = Duration::days(30);

/// The values each count of the policy may take.
fn range(key: &str) -> (i64, i64) {
    match key {
        "max_unhealthy_percent" => (0, 100),
        "min_unhealthy" => (0, 1_000_000),
        "retry_budget" | "breaker_failures" => (1, 1000),
        // max_plans_per_minute, max_group_plans_per_minute
        _ => (1, 1_000_000),
    }
}

impl HealingPolicy {
    /// Checks a policy made from flags: every count in its range, every
    /// duration from 1 s to 30 days; an error names the key through `name`
    /// (the flag it came from).
    pub fn checked(self, name: impl Fn(&str) -> String) -> Result<HealingPolicy, String> {
        let counts = [
            ("max_unhealthy_percent", self.max_unhealthy_percent),
            ("min_unhealthy", self.min_unhealthy),
            ("max_plans_per_minute", self.max_plans_per_minute),
            (
                "max_group_plans_per_minute",
                self.max_group_plans_per_minute,
            ),
            ("retry_budget", self.retry_budget),
            ("breaker_failures", self.breaker_failures),
        ];
        for (key, n) in counts {
            let (min, max) = range(key);
            if !(min..=max).contains(&i64::from(n)) {
                return Err(format!("{} must be {min} to {max}, not {n}", name(key)));
            }
        }
        let durations = [
            ("retry_window", self.retry_window),
            ("min_healthy_period", self.min_healthy_period),
            ("breaker_cooldown", self.breaker_cooldown),
        ];
        for (key, d) in durations {
            if d < Duration::seconds(1) || d > MAX_POLICY_DURATION {
                return Err(format!(
                    "{} must be a duration from 1s to 30days",
                    name(key)
                ));
            }
        }
        if let Some(key) = &self.group_by
            && (key.trim().is_empty() || key.len() > 63)
        {
            return Err(format!(
                "{} must be a label key of 1 to 63 characters",
                name("group_by")
            ));
        }
        Ok(self)
    }
}

/// Reads a policy file over `base` (the defaults with the flags applied):
/// each key it sets replaces the base's. An error names the line and the key.
pub fn parse_policy(text: &str, base: &HealingPolicy) -> Result<HealingPolicy, String> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    let mut policy = base.clone();
    let at = |span: std::ops::Range<usize>, key: &str, problem: String| {
        format!("line {}: {key} {problem}", line_of(text, span.start))
    };
    let count = |v: &Option<toml::Spanned<i64>>, key: &str| {
        let (min, max) = range(key);
        v.as_ref()
            .map(|v| {
                let n = *v.get_ref();
                if (min..=max).contains(&n) {
                    Ok(n as u32)
                } else {
                    Err(at(
                        v.span(),
                        key,
                        format!("must be {min} to {max}, not {n}"),
                    ))
                }
            })
            .transpose()
    };
    let duration = |v: &Option<toml::Spanned<String>>, key: &str| {
        v.as_ref()
            .map(|v| {
                let parsed = humantime::parse_duration(v.get_ref())
                    .ok()
                    .and_then(|d| Duration::from_std(d).ok())
                    .filter(|d| *d > Duration::zero() && *d <= MAX_POLICY_DURATION);
                parsed.ok_or_else(|| {
                    at(
                        v.span(),
                        key,
                        format!(
                            "must be a duration from 1s to 30days (such as 90s or 1h), not {:?}",
                            v.get_ref()
                        ),
                    )
                })
            })
            .transpose()
    };
    if let Some(v) = count(&file.max_unhealthy_percent, "max_unhealthy_percent")? {
        policy.max_unhealthy_percent = v;
    }
    if let Some(v) = count(&file.min_unhealthy, "min_unhealthy")? {
        policy.min_unhealthy = v;
    }
    if let Some(v) = &file.group_by {
        let key = v.get_ref().trim();
        if key.is_empty() || key.len() > 63 {
            return Err(at(
                v.span(),
                "group_by",
                "must be a label key of 1 to 63 characters".into(),
            ));
        }
        policy.group_by = Some(key.to_owned());
    }
    if let Some(v) = count(&file.max_plans_per_minute, "max_plans_per_minute")? {
        policy.max_plans_per_minute = v;
    }
    if let Some(v) = count(
        &file.max_group_plans_per_minute,
        "max_group_plans_per_minute",
    )? {
        policy.max_group_plans_per_minute = v;
    }
    if let Some(v) = count(&file.retry_budget, "retry_budget")? {
        policy.retry_budget = v;
    }
    if let Some(v) = duration(&file.retry_window, "retry_window")? {
        policy.retry_window = v;
    }
    if let Some(v) = duration(&file.min_healthy_period, "min_healthy_period")? {
        policy.min_healthy_period = v;
    }
    if let Some(v) = count(&file.breaker_failures, "breaker_failures")? {
        policy.breaker_failures = v;
    }
    if let Some(v) = duration(&file.breaker_cooldown, "breaker_cooldown")? {
        policy.breaker_cooldown = v;
    }
    if let Some(v) = file.dry_run {
        policy.dry_run = v;
    }
    if let Some(v) = file.brakes {
        policy.brakes = v;
    }
    Ok(policy)
}

/// How many of a group (the fleet, or the agents of one `group_by` value)
/// are counted, as the store read them in the plan's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Census {
    /// Agents counted: every status but EXHAUSTED (a quota is not a fault).
    pub counted: u32,
    /// Of them, unhealthy: under remediation (an active recovery) or OFFLINE.
    pub unhealthy: u32,
}

/// A change of the census the stores keep (`agent_census`) for one scope:
/// the fleet (`key` and `value` empty) or one label pair. The census counts,
/// per scope, the agents and, of them, those OFFLINE and those EXHAUSTED:
/// what [`Census`] is made of, less what time changes (active recoveries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CensusChange {
    pub key: String,
    pub value: String,
    pub agents: i64,
    pub offline: i64,
    pub exhausted: i64,
}

/// How the kept census changes when agents move from `before` to `after`
/// (their status and labels; `None` absent: created or deleted), summed
/// per scope; the fleet's first, then by label pair; scopes left as they
/// were are left out (a move between IDLE, BUSY and ON_CALL changes none).
pub fn census_changes<'a>(
    moves: impl IntoIterator<
        Item = (
            Option<(AgentStatus, &'a Labels)>,
            Option<(AgentStatus, &'a Labels)>,
        ),
    >,
) -> Vec<CensusChange> {
    let counts = |status: AgentStatus| {
        (
            i64::from(status == AgentStatus::Offline),
            i64::from(status == AgentStatus::Exhausted),
        )
    };
    let mut sums: BTreeMap<(&str, &str), (i64, i64, i64)> = BTreeMap::new();
    let mut add = |side: Option<(AgentStatus, &'a Labels)>, sign: i64| {
        let Some((status, labels)) = side else {
            return;
        };
        let (offline, exhausted) = counts(status);
        let scopes =
            std::iter::once(("", "")).chain(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for scope in scopes {
            let sum = sums.entry(scope).or_default();
            sum.0 += sign;
            sum.1 += sign * offline;
            sum.2 += sign * exhausted;
        }
    };
    for (before, after) in moves {
        // Most moves (IDLE, BUSY, ON_CALL, labels kept) change nothing:
        // skipped before touching the sums.
        if let (Some((was, old)), Some((is, new))) = (before, after)
            && old == new
            && counts(was) == counts(is)
        {
            continue;
        }
        add(before, -1);
        add(after, 1);
    }
    sums.into_iter()
        .filter(|(_, sum)| *sum != (0, 0, 0))
        .map(
            |((key, value), (agents, offline, exhausted))| CensusChange {
                key: key.to_owned(),
                value: value.to_owned(),
                agents,
                offline,
                exhausted,
            },
        )
        .collect()
}

/// Whether an agent in `status` under remediation or not counts in a
/// census: EXHAUSTED agents count as neither healthy nor unhealthy.
pub fn counts(status: AgentStatus) -> bool {
    status != AgentStatus::Exhausted
}

/// Whether an agent counts as unhealthy: under remediation, or OFFLINE.
pub fn unhealthy(status: AgentStatus, under_remediation: bool) -> bool {
    counts(status) && (under_remediation || status == AgentStatus::Offline)
}

/// What a plan for one agent is checked on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub agent_status: AgentStatus,
    /// Whether the agent is counted unhealthy already (OFFLINE): planning it
    /// does not add one more.
    pub agent_unhealthy: bool,
    /// Its group (the value of its `group_by` label), if the policy groups.
    pub group: Option<&'a str>,
    pub fleet: Census,
    /// The census of its group (ignored without one).
    pub group_census: Census,
    /// Plans recorded in the last minute, fleet-wide and in its group.
    pub fleet_plans_last_minute: u32,
    pub group_plans_last_minute: u32,
    /// The agent's plans since its budget started again
    /// ([`budget_since`]), within the retry window.
    pub agent_plans_in_window: u32,
    /// The pauses in force.
    pub pauses: &'a [Pause],
}

/// An operator's `PauseHealing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub scope: Scope,
    pub reason: String,
    pub by: String,
    pub at: DateTime<Utc>,
}

/// What a brake or a pause applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Fleet,
    /// The agents whose `group_by` label has this value.
    Group(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Fleet => f.write_str("the fleet"),
            Scope::Group(g) => write!(f, "group {g:?}"),
        }
    }
}

/// Why a plan was braked, with the numbers it was decided on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Braked {
    #[error("agent is EXHAUSTED (a quota, not a fault): no recovery is planned")]
    Exhausted,
    #[error("healing is paused for {} by {}: {}", .0.scope, .0.by, .0.reason)]
    Paused(Pause),
    #[error(
        "{scope} has {unhealthy} of {counted} agents unhealthy; a plan would make {after}, above the {allowed} allowed"
    )]
    UnhealthyShare {
        scope: Scope,
        unhealthy: u32,
        counted: u32,
        after: u32,
        allowed: u32,
    },
    #[error("{scope} had {plans} plans in the last minute, at most {max} allowed")]
    RateLimited { scope: Scope, plans: u32, max: u32 },
    #[error("the agent had {plans} plans within {window}, its budget is {budget}")]
    RetryBudgetSpent {
        plans: u32,
        budget: u32,
        window: String,
    },
}

impl Braked {
    /// The stable reason a braked request is answered with.
    pub fn reason(&self) -> &'static str {
        match self {
            Braked::Exhausted => "HEALING_AGENT_EXHAUSTED",
            Braked::Paused(_) => "HEALING_PAUSED",
            Braked::UnhealthyShare { .. } => "HEALING_BRAKE_UNHEALTHY_SHARE",
            Braked::RateLimited { .. } => "HEALING_RATE_LIMITED",
            Braked::RetryBudgetSpent { .. } => "RETRY_BUDGET_SPENT",
        }
    }
}

/// How many of `counted` may be unhealthy at once: the share, rounded down,
/// never below the floor.
pub fn allowed_unhealthy(policy: &HealingPolicy, counted: u32) -> u32 {
    let share = u64::from(counted) * u64::from(policy.max_unhealthy_percent) / 100;
    (share as u32).max(policy.min_unhealthy)
}

fn share_brake(
    policy: &HealingPolicy,
    scope: Scope,
    census: Census,
    adds: u32,
) -> Result<(), Braked> {
    let allowed = allowed_unhealthy(policy, census.counted);
    let after = census.unhealthy + adds;
    if after > allowed {
        return Err(Braked::UnhealthyShare {
            scope,
            unhealthy: census.unhealthy,
            counted: census.counted,
            after,
            allowed,
        });
    }
    Ok(())
}

/// The first brake that holds for `request` under `policy`; `Ok` when the
/// plan may be made: [`check_agent`], then [`check_counts`].
pub fn check(policy: &HealingPolicy, request: &Request<'_>) -> Result<(), Braked> {
    check_agent(policy, request)?;
    check_counts(policy, request)
}

/// The brakes of the agent alone, checked before anything is counted
/// fleet-wide: an EXHAUSTED agent, the pauses, the agent's retry budget
/// (with the brakes off ([`HealingPolicy::brakes`]), the first two only).
pub fn check_agent(policy: &HealingPolicy, request: &Request<'_>) -> Result<(), Braked> {
    if !counts(request.agent_status) {
        return Err(Braked::Exhausted);
    }
    let group = request.group.filter(|_| policy.group_by.is_some());
    for pause in request.pauses {
        let applies = match &pause.scope {
            Scope::Fleet => true,
            Scope::Group(g) => group == Some(g.as_str()),
        };
        if applies {
            return Err(Braked::Paused(pause.clone()));
        }
    }
    if policy.brakes && request.agent_plans_in_window >= policy.retry_budget {
        return Err(Braked::RetryBudgetSpent {
            plans: request.agent_plans_in_window,
            budget: policy.retry_budget,
            window: crate::domain::recovery::format_duration(policy.retry_window),
        });
    }
    Ok(())
}

/// The brakes on what the fleet and the agent's group count: the rates,
/// then the unhealthy share.
pub fn check_counts(policy: &HealingPolicy, request: &Request<'_>) -> Result<(), Braked> {
    if !policy.brakes {
        return Ok(());
    }
    let group = request.group.filter(|_| policy.group_by.is_some());
    if request.fleet_plans_last_minute >= policy.max_plans_per_minute {
        return Err(Braked::RateLimited {
            scope: Scope::Fleet,
            plans: request.fleet_plans_last_minute,
            max: policy.max_plans_per_minute,
        });
    }
    if let Some(g) = group
        && request.group_plans_last_minute >= policy.max_group_plans_per_minute
    {
        return Err(Braked::RateLimited {
            scope: Scope::Group(g.to_owned()),
            plans: request.group_plans_last_minute,
            max: policy.max_group_plans_per_minute,
        });
    }
    let adds = u32::from(!request.agent_unhealthy);
    share_brake(policy, Scope::Fleet, request.fleet, adds)?;
    if let Some(g) = group {
        share_brake(
            policy,
            Scope::Group(g.to_owned()),
            request.group_census,
            adds,
        )?;
    }
    Ok(())
}

/// How many plans may hold a lock slot at once ([`lock_slot`]): a plan
/// counts under its agent's slot, so it may miss at most `LOCK_SLOTS - 1`
/// plans being made alongside it.
pub const LOCK_SLOTS: u32 = 16;

/// The lock slot of an agent's plans (FNV-1a of its id, so every replica
/// agrees).
pub fn lock_slot(agent_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in agent_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % LOCK_SLOTS
}

/// Whether a plan that passed [`check_counts`] on counts read under its
/// lock slot passes however the plans made alongside it (at most
/// [`LOCK_SLOTS`] - 1, each adding one plan and one unhealthy agent) turn
/// out: every rate and share then has room for all of them. When not, the
/// plan must be decided with every other plan locked out.
pub fn room_for_neighbours(policy: &HealingPolicy, request: &Request<'_>) -> bool {
    if !policy.brakes {
        return true;
    }
    let others = LOCK_SLOTS - 1;
    let group = request.group.filter(|_| policy.group_by.is_some());
    let adds = u32::from(!request.agent_unhealthy);
    let share_room = |census: Census| {
        census.unhealthy + adds + others <= allowed_unhealthy(policy, census.counted)
    };
    request.fleet_plans_last_minute + 1 + others <= policy.max_plans_per_minute
        && share_room(request.fleet)
        && group.is_none_or(|_| {
            request.group_plans_last_minute + 1 + others <= policy.max_group_plans_per_minute
                && share_room(request.group_census)
        })
}

/// Since when an agent's plans count against its budget at `now`: the
/// window's start, or later when the agent has been healthy for the
/// healthy period since its last plan ended (`healthy_since`: when it last
/// became healthy, `None` while it is not).
pub fn budget_since(
    policy: &HealingPolicy,
    healthy_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let window_start = now - policy.retry_window;
    match healthy_since {
        Some(since) if now - since >= policy.min_healthy_period => window_start.max(since),
        _ => window_start,
    }
}

// ---------------------------------------------------------------------------
// Breakers

/// A breaker on one (error type, strategy), fleet-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Plans go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// No plan goes through until `since + cooldown`.
    Open { since: DateTime<Utc> },
    /// One plan went through at `trial_at`; no other until its outcome (or,
    /// if none comes, another cooldown).
    HalfOpen { trial_at: DateTime<Utc> },
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::Closed { failures: 0 }
    }
}

/// Whether a breaker lets a plan through at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The half-open trial: the plan goes through and the breaker becomes
    /// [`Breaker::HalfOpen`].
    Trial,
    /// Not until `until`.
    No {
        until: DateTime<Utc>,
    },
}

impl Breaker {
    pub fn admits(&self, policy: &HealingPolicy, now: DateTime<Utc>) -> Admit {
        match *self {
            Breaker::Closed { .. } => Admit::Yes,
            Breaker::Open { since } | Breaker::HalfOpen { trial_at: since } => {
                let until = since + policy.breaker_cooldown;
                if now >= until {
                    Admit::Trial
                } else {
                    Admit::No { until }
                }
            }
        }
    }

    /// The breaker after a plan went through on `admit`.
    pub fn after_admit(self, admit: Admit, now: DateTime<Utc>) -> Breaker {
        match admit {
            Admit::Trial => Breaker::HalfOpen { trial_at: now },
            _ => self,
        }
    }

    /// The breaker after a plan's outcome: a success closes it; a failure
    /// counts, opens it at the policy's count, and reopens a half-open one.
    pub fn after_outcome(
        self,
        succeeded: bool,
        policy: &HealingPolicy,
        now: DateTime<Utc>,
    ) -> Breaker {
        match (self, succeeded) {
            (_, true) => Breaker::Closed { failures: 0 },
            (Breaker::Closed { failures }, false) if failures + 1 >= policy.breaker_failures => {
                Breaker::Open { since: now }
            }
            (Breaker::Closed { failures }, false) => Breaker::Closed {
                failures: failures + 1,
            },
            (Breaker::HalfOpen { .. }, false) => Breaker::Open { since: now },
            (open @ Breaker::Open { .. }, false) => open,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self, Breaker::Closed { .. })
    }
}

/// The strategy a plan uses given the breakers: the first of `ranked` (the
/// planner's order, best first) whose breaker admits it, with how; `None`
/// when every one is open (the plan is braked or escalated: a breaker never
/// fails open).
pub fn choose_admitted<S: Ord + Copy>(
    ranked: &[S],
    breakers: &BTreeMap<S, Breaker>,
    policy: &HealingPolicy,
    now: DateTime<Utc>,
) -> Option<(S, Admit)> {
    ranked.iter().find_map(|s| {
        let admit = breakers
            .get(s)
            .copied()
            .unwrap_or_default()
            .admits(policy, now);
        (!matches!(admit, Admit::No { .. })).then_some((*s, admit))
    })
}

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------
// What the store keeps: decisions, pauses, breakers

/// How long the rate brakes look back.
pub const RATE_WINDOW: Duration = Duration::minutes(1);

/// When an agent last became healthy, for its retry budget: the end of its
/// latest successful recovery (`last_success`), if no error of it was
/// reported after it (`errors_since`, the one being planned left out);
/// `None` while it is not healthy.
pub fn healthy_since(
    last_success: Option<DateTime<Utc>>,
    errors_since: u32,
) -> Option<DateTime<Utc>> {
    last_success.filter(|_| errors_since == 0)
}

/// What the store reads of an agent's plans for its retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanHistory {
    /// When its latest successful recovery ended.
    pub last_success: Option<DateTime<Utc>>,
    /// Its errors reported after that (the one being planned left out).
    pub errors_since_success: u32,
    /// Its plans since the retry window's start.
    pub plans_in_window: u32,
    /// Its plans since its latest success ended.
    pub plans_since_success: u32,
}

/// The agent's plans counted against its budget at `now`: those since
/// [`budget_since`].
pub fn budget_plans(policy: &HealingPolicy, history: &PlanHistory, now: DateTime<Utc>) -> u32 {
    let healthy = healthy_since(history.last_success, history.errors_since_success);
    let since = budget_since(policy, healthy, now);
    if since > now - policy.retry_window {
        history.plans_since_success
    } else {
        history.plans_in_window
    }
}

/// The numbers a decision was taken on, kept with it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Numbers {
    pub fleet: Census,
    /// The agent's group (when the policy groups and the agent has the label).
    pub group: Option<String>,
    pub group_census: Census,
    pub fleet_plans_last_minute: u32,
    pub group_plans_last_minute: u32,
    pub agent_plans_in_window: u32,
}

impl Request<'_> {
    /// The numbers of this request, to keep with its decision.
    pub fn numbers(&self) -> Numbers {
        Numbers {
            fleet: self.fleet,
            group: self.group.map(str::to_owned),
            group_census: self.group_census,
            fleet_plans_last_minute: self.fleet_plans_last_minute,
            group_plans_last_minute: self.group_plans_last_minute,
            agent_plans_in_window: self.agent_plans_in_window,
        }
    }
}

/// What became of a request for a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A recovery was planned and handed out.
    Planned,
    /// Decided as if planned and recorded, never handed out (the policy's
    /// `dry_run`).
    DryRun,
    /// A brake held: no plan.
    Braked,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Planned => "PLANNED",
            Verdict::DryRun => "DRY_RUN",
            Verdict::Braked => "BRAKED",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        [Verdict::Planned, Verdict::DryRun, Verdict::Braked]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// The reason a dry-run decision is answered with (`FAILED_PRECONDITION`:
/// nothing is handed out).
pub const REASON_DRY_RUN: &str = "HEALING_DRY_RUN";

/// One decision on a request for a plan, braked or not, as kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub id: i64,
    pub error_event_id: i64,
    pub agent_id: String,
    pub decided_at: DateTime<Utc>,
    pub verdict: Verdict,
    /// The brake's reason ([`Braked::reason`]) when braked.
    pub reason: Option<String>,
    /// What was decided, in words (the brake's message, or the plan).
    pub message: String,
    /// The strategy planned (also in a dry run).
    pub strategy: Option<crate::domain::healing::Strategy>,
    /// The recovery action handed out.
    pub recovery_action_id: Option<i64>,
    pub numbers: Numbers,
    /// Who asked.
    pub actor: String,
}

impl Scope {
    /// The scope as stored: `fleet` or `group:<value>`.
    pub fn stored(&self) -> String {
        match self {
            Scope::Fleet => "fleet".to_owned(),
            Scope::Group(g) => format!("group:{g}"),
        }
    }

    pub fn parse_stored(s: &str) -> Option<Scope> {
        match s {
            "fleet" => Some(Scope::Fleet),
            _ => s.strip_prefix("group:").map(|g| Scope::Group(g.to_owned())),
        }
    }

    /// The scope a request names: the fleet for an empty group, the group
    /// otherwise, which the policy must group by.
    pub fn named(group: &str, policy: &HealingPolicy) -> Result<Scope, ScopeRefused> {
        let group = group.trim();
        if group.is_empty() {
            return Ok(Scope::Fleet);
        }
        if group.len() > crate::domain::labels::MAX_LABEL_VALUE {
            return Err(ScopeRefused::Invalid(format!(
                "group must be at most {} characters (a label value)",
                crate::domain::labels::MAX_LABEL_VALUE
            )));
        }
        match &policy.group_by {
            Some(_) => Ok(Scope::Group(group.to_owned())),
            None => Err(ScopeRefused::NoGroups(format!(
                "group {group:?} names no group: the healing policy has no group_by"
            ))),
        }
    }
}

/// Why a request's scope was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRefused {
    /// Malformed.
    Invalid(String),
    /// A group named while the policy groups nothing.
    NoGroups(String),
}

/// The longest pause reason kept.
pub const MAX_PAUSE_REASON: usize = 1024;

/// An operator's pause request, checked.
pub fn pause(scope: Scope, reason: &str, by: &str, at: DateTime<Utc>) -> Result<Pause, String> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err("reason is required: say why healing is paused".into());
    }
    if reason.len() > MAX_PAUSE_REASON {
        return Err(format!("reason must be at most {MAX_PAUSE_REASON} bytes"));
    }
    Ok(Pause {
        scope,
        reason: reason.to_owned(),
        by: by.to_owned(),
        at,
    })
}

impl Breaker {
    /// The breaker as stored: its state's name, failures in a row, and since
    /// when it is open (or its trial went through).
    pub fn parts(&self) -> (&'static str, u32, Option<DateTime<Utc>>) {
        match *self {
            Breaker::Closed { failures } => ("CLOSED", failures, None),
            Breaker::Open { since } => ("OPEN", 0, Some(since)),
            Breaker::HalfOpen { trial_at } => ("HALF_OPEN", 0, Some(trial_at)),
        }
    }

    pub fn from_parts(state: &str, failures: u32, since: Option<DateTime<Utc>>) -> Option<Breaker> {
        match (state, since) {
            ("CLOSED", _) => Some(Breaker::Closed { failures }),
            ("OPEN", Some(since)) => Some(Breaker::Open { since }),
            ("HALF_OPEN", Some(trial_at)) => Some(Breaker::HalfOpen { trial_at }),
            _ => None,
        }
    }
}

/// Whether an outcome of `strategy` counts on its breaker: ESCALATE hands
/// the agent to a person, which is never braked (it is where an open
/// breaker sends plans).
pub fn breakered(strategy: crate::domain::healing::Strategy) -> bool {
    strategy != crate::domain::healing::Strategy::Escalate
}

/// The strategies the breakers keep a plan from at `now` (every breakered
/// strategy whose breaker does not admit).
pub fn closed_off<S: Copy>(
    breakers: &[(S, Breaker)],
    policy: &HealingPolicy,
    now: DateTime<Utc>,
) -> Vec<S> {
    breakers
        .iter()
        .filter(|(_, b)| matches!(b.admits(policy, now), Admit::No { .. }))
        .map(|(s, _)| *s)
        .collect()
}

/// The share of one scope, as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub scope: Scope,
    pub census: Census,
    /// How many may be unhealthy at once ([`allowed_unhealthy`]).
    pub allowed: u32,
}

/// The brakes as they stand, for operators: the policy, the pauses, the
/// breakers not closed, each scope's unhealthy share, the agents whose
/// budget is spent.
#[derive(Debug, Clone, PartialEq)]
pub struct BrakeStatus {
    pub policy: HealingPolicy,
    pub pauses: Vec<Pause>,
    pub breakers: Vec<(
        crate::domain::healing::ErrorType,
        crate::domain::healing::Strategy,
        Breaker,
    )>,
    pub shares: Vec<Share>,
    /// Agents and their plans counted against the budget, at or over it.
    pub spent: Vec<(String, u32)>,
    pub at: DateTime<Utc>,
}

/// A request answered without a plan: braked (the brake's reason) or a dry
/// run ([`REASON_DRY_RUN`]); the decision was recorded as `decision_id`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (healing decision {decision_id})")]
pub struct NotPlanned {
    /// `Braked` or `DryRun`.
    pub verdict: Verdict,
    pub reason: &'static str,
    pub message: String,
    pub decision_id: i64,
    pub agent_id: String,
}
