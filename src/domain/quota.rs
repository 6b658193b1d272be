//! Quota pools (issue 23): agents that share a provider limit (an account,
//! a key, a model's allowance on it) are parked together when one of them
//! hits it, kept apart per limit window, and woken without a herd. Pure: the
//! store keeps pools and holds and the runtime sweeps; every *whether* and
//! *when* is decided here, with the clock passed in.
//!
//! The pieces, in the order a pool lives through them:
//!
//! - **Membership.** An agent lists its pools when it registers
//!   ([`pool_names`]: at most [`MAX_POOLS_PER_AGENT`], each a [`PoolName`]).
//!   Names are opaque and case-sensitive: `anthropic/acct-42` and
//!   `anthropic/acct-42/opus` are two pools, the slash implies no nesting, so
//!   an agent bound by both lists both. Registering again replaces the list:
//!   a pool left lets go of the agent ([`Member::on_release`]) and a parked
//!   pool joined parks it ([`Member::on_arrival`], from IDLE).
//! - **A report parks the pool.** `ReportExhausted` names a pool (or
//!   [`report_target`] picks the agent's only one); [`pool_report`] infers
//!   the deadline (`domain::recovery`, as for one agent) and the [`Window`]
//!   ([`infer_window`]), and [`PoolState::park`] records it per window, never
//!   shortening one. The reporter lands EXHAUSTED ([`Member::on_report`]) and
//!   every other member is decided by [`Member::on_pool_parked`]: IDLE ones
//!   are parked in the same commit, BUSY and ON_CALL ones when their slot
//!   ends and OFFLINE ones when they return ([`Member::on_arrival`], which
//!   also parks an agent registering into a parked pool).
//! - **Holds.** A member a pool parked is *held* by it until the pool
//!   releases it: the sweeper never wakes a held agent at its recovery time
//!   ([`Member::wakes`]), and an agent held by a pool and parked by its own
//!   report wakes when both have let go ([`Member::effective_recovery`]).
//!   Claims never take a member of a parked pool ([`Member::claimable`]).
//! - **Release without a herd.** When the last window lifts, the member
//!   parked longest goes first as a canary; the others follow once it has
//!   completed a work slot or after the canary timeout, each at an offset
//!   derived from its id and the pool's deadline, never faster than the
//!   release rate ([`release_schedule`], [`due_releases`]). Each release is a
//!   transition ([`Member::on_release`], cause `POOL_RELEASED`). A canary
//!   that hits the limit again parks the pool again, and nobody else wakes.
//! - **Operators** park a window until a time of their choosing
//!   ([`PoolState::operator_park`], which may shorten it) or release the pool
//!   now ([`PoolState::operator_release`]); the release still goes canary
//!   first.
//!
//! The causes pools record ([`PoolCause`]) are [`agent::Cause`]s
//! (`EXHAUSTED` for the reporter, `POOL_EXHAUSTED`, `POOL_RELEASED`), and
//! each such transition names its pool. `domain::batch` applies these
//! decisions inside a commit ([`Holds`] is what an agent row keeps of them).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::domain::agent::{
    self, AgentState, AgentStatus, Cause, Exhaustion, ExhaustionReason, ExhaustionReport,
};
use crate::domain::invalid::InvalidArgument;
use crate::domain::labels::Labels;
use crate::domain::recovery::{
    self, MAX_HINT_CHARS, RecoveryEstimate, RecoveryInput, RecoverySource, Tz,
};

/// The longest pool name, in characters (names are ASCII).
pub const MAX_POOL_NAME: usize = 128;
/// Pools one agent may be a member of: an account, a few models on it and
/// a key or two is well under this; a longer list is a mistake, and every
/// pool of an agent is read on each of its status changes.
pub const MAX_POOLS_PER_AGENT: usize = 16;
/// What a malformed pool name is told: the rule [`PoolName::is_valid`]
/// checks, in words.
pub const POOL_NAME_RULE: &str = "must be 1 to 128 characters of letters, digits and . _ : / -";

/// The default of `--pool-canary-timeout`: how long the other members wait
/// for the canary to complete a work slot. A minute covers a typical first
/// request of an agent (seconds to tens of seconds) with room to spare.
pub const DEFAULT_POOL_CANARY_TIMEOUT: Duration = Duration::seconds(60);
/// The longest `--pool-canary-timeout`: a canary that has not shown in an
/// hour whether the limit lifted says nothing more by waiting longer.
pub const MAX_POOL_CANARY_TIMEOUT: Duration = Duration::hours(1);
/// The default of `--pool-release-spread`: the members after the canary are
/// released over this long.
pub const DEFAULT_POOL_RELEASE_SPREAD: Duration = Duration::seconds(30);
/// The longest `--pool-release-spread`.
pub const MAX_POOL_RELEASE_SPREAD: Duration = Duration::hours(1);
/// The default of `--pool-release-rate`, agents per second. Each woken agent
/// starts with a burst of requests (its context, its first turn), so ten a
/// second keeps a pool's restart to a few tens of requests a second, well
/// inside any per-minute request limit; with the default spread that
/// releases up to 300 agents within the 30 s, and a larger pool takes longer
/// (1,000 agents: 100 s) rather than going faster.
pub const DEFAULT_POOL_RELEASE_RATE: u32 = 10;
/// The highest `--pool-release-rate`: beyond a thousand agents a second
/// the rate no longer protects a provider from a herd.
pub const MAX_POOL_RELEASE_RATE: u32 = 1000;

// ---------------------------------------------------------------------------
// Pool names and membership

/// A well-formed pool name: 1 to [`MAX_POOL_NAME`] characters of
/// `[A-Za-z0-9._:/-]` (`anthropic/acct-42`, `openai:org-7/gpt-4o`). Made by
/// [`pool_name`] only, so holding one means it was checked.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct PoolName(String);

impl TryFrom<String> for PoolName {
    type Error = String;

    /// A stored name, checked again as it is read.
    fn try_from(name: String) -> Result<Self, String> {
        if PoolName::is_valid(&name) {
            Ok(PoolName(name))
        } else {
            Err(format!("{} {POOL_NAME_RULE}", quoted(&name)))
        }
    }
}

impl From<PoolName> for String {
    fn from(name: PoolName) -> String {
        name.0
    }
}

impl PoolName {
    /// Whether `name` is well formed (see [`PoolName`]).
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_POOL_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for PoolName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A name as an error message quotes it: at most 64 characters, so a
/// megabyte of garbage is not echoed back.
fn quoted(name: &str) -> String {
    const SHOWN: usize = 64;
    if name.chars().count() <= SHOWN {
        format!("{name:?}")
    } else {
        let head: String = name.chars().take(SHOWN).collect();
        format!("{head:?}…")
    }
}

/// One pool name from request field `field` (`quota_pool`,
/// `quota_pools[2]`): refused naming the field when malformed (an empty name
/// included: a caller that means "none" leaves the field out).
pub fn pool_name(field: &str, name: &str) -> Result<PoolName, InvalidArgument> {
    if !PoolName::is_valid(name) {
        return Err(InvalidArgument {
            field: field.to_owned(),
            problem: format!("{} {POOL_NAME_RULE}", quoted(name)),
        });
    }
    Ok(PoolName(name.to_owned()))
}

/// An agent's pools from request field `field` (`quota_pools`), in the
/// order given: at most [`MAX_POOLS_PER_AGENT`], each well formed (refused
/// naming `field[i]`), none twice (a repeat is refused naming both indexes:
/// it is a caller's bug, not something to fold silently). Registering with
/// them replaces the agent's earlier list; an empty list leaves every pool.
pub fn pool_names<S: AsRef<str>>(
    field: &str,
    names: &[S],
) -> Result<Vec<PoolName>, InvalidArgument> {
    if names.len() > MAX_POOLS_PER_AGENT {
        return Err(InvalidArgument {
            field: field.to_owned(),
            problem: format!(
                "has {} entries, at most {MAX_POOLS_PER_AGENT} allowed",
                names.len()
            ),
        });
    }
    let mut out: Vec<PoolName> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let name = pool_name(&format!("{field}[{i}]"), name.as_ref())?;
        if let Some(first) = out.iter().position(|n| *n == name) {
            return Err(InvalidArgument {
                field: format!("{field}[{i}]"),
                problem: format!("{} repeats {field}[{first}]", quoted(name.as_str())),
            });
        }
        out.push(name);
    }
    Ok(out)
}

/// Whom a `ReportExhausted` parks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportTarget {
    /// The pool: every member, the reporter included ([`Member::on_report`]).
    Pool(PoolName),
    /// The agent alone, as before pools.
    Agent,
}

/// A report naming a pool the agent is not a member of: FAILED_PRECONDITION
/// (the name is well formed; the agent's membership says no).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct NotPoolMember {
    pub agent_id: String,
    pub pool: PoolName,
    /// The agent's pools.
    pub pools: Vec<PoolName>,
}

impl NotPoolMember {
    fn describe(&self) -> String {
        let head = format!(
            "agent {:?} is not a member of quota pool {:?}",
            self.agent_id,
            self.pool.as_str()
        );
        if self.pools.is_empty() {
            return format!("{head}; it is in no pool");
        }
        let pools: Vec<String> = self
            .pools
            .iter()
            .map(|p| format!("{:?}", p.as_str()))
            .collect();
        format!("{head}; its pools: {}", pools.join(", "))
    }
}

/// Whom a report of `agent_id` (a member of `pools`) parks, given the pool
/// it names (`None`: the field was empty): a named pool if the agent is a
/// member (else refused); with none named, the agent's only pool if it has
/// exactly one, else the agent alone. With several pools the report cannot
/// tell which limit was hit, and parking them all would strand agents of
/// pools that are fine.
pub fn report_target(
    agent_id: &str,
    requested: Option<&PoolName>,
    pools: &[PoolName],
) -> Result<ReportTarget, NotPoolMember> {
    match (requested, pools) {
        (Some(pool), _) if pools.contains(pool) => Ok(ReportTarget::Pool(pool.clone())),
        (Some(pool), _) => Err(NotPoolMember {
            agent_id: agent_id.to_owned(),
            pool: pool.clone(),
            pools: pools.to_vec(),
        }),
        (None, [only]) => Ok(ReportTarget::Pool(only.clone())),
        (None, _) => Ok(ReportTarget::Agent),
    }
}

// ---------------------------------------------------------------------------
// Windows

/// Which of a provider's limits a pool was parked for. A pool keeps each
/// apart: a per-minute limit lifting must not wake a pool whose weekly limit
/// is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Window {
    /// A rolling five-hour allowance (Claude's session limit).
    FiveHour,
    /// A weekly allowance (Claude's weekly limits, per model too).
    Weekly,
    /// A per-interval request limit (requests per minute or per day).
    Requests,
    /// A per-interval token limit (input, output or total tokens per minute
    /// or per day).
    Tokens,
    /// A billing stop: credits, a spend limit, an unpaid plan.
    Billing,
    /// Anything else, or nothing said.
    Other,
}

impl Window {
    pub const ALL: [Window; 6] = [
        Window::FiveHour,
        Window::Weekly,
        Window::Requests,
        Window::Tokens,
        Window::Billing,
        Window::Other,
    ];

    /// The stored spelling, and the proto's without its prefix
    /// (`QUOTA_WINDOW_FIVE_HOUR`).
    pub fn as_str(self) -> &'static str {
        match self {
            Window::FiveHour => "FIVE_HOUR",
            Window::Weekly => "WEEKLY",
            Window::Requests => "REQUESTS",
            Window::Tokens => "TOKENS",
            Window::Billing => "BILLING",
            Window::Other => "OTHER",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// The exhaustion reason of an agent a pool parks for this window.
    pub fn reason(self) -> ExhaustionReason {
        match self {
            Window::Billing => ExhaustionReason::Billing,
            _ => ExhaustionReason::RateLimit,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The window a caller states in request field `field`, by its spelling
/// ([`Window::as_str`]): empty or `UNSPECIFIED` means not stated (infer it);
/// anything else is refused naming the field.
pub fn stated_window(field: &str, name: &str) -> Result<Option<Window>, InvalidArgument> {
    if name.is_empty() || name == "UNSPECIFIED" {
        return Ok(None);
    }
    Window::parse(name).map(Some).ok_or_else(|| {
        let names: Vec<&str> = Window::ALL.iter().map(|w| w.as_str()).collect();
        InvalidArgument {
            field: field.to_owned(),
            problem: format!("{} is not one of {}", quoted(name), names.join(", ")),
        }
    })
}

/// The window a report is for, and what said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowInference {
    pub window: Window,
    /// What decided: "stated by the caller", "billing: insufficient_quota",
    /// "anthropic-ratelimit-unified-representative-claim: five_hour",
    /// "x-ratelimit-reset-tokens: 6s", "rate_limit_info.rateLimitType:
    /// five_hour", "message: \"5-hour limit\"", "nothing names a window".
    /// At most [`MAX_HINT_CHARS`] characters.
    pub evidence: String,
}

impl WindowInference {
    fn new(window: Window, evidence: impl Into<String>) -> Self {
        WindowInference {
            window,
            evidence: bound(&evidence.into()),
        }
    }
}

/// Which window a report is for, from what it says, in order of trust:
///
/// 1. the window the caller states (it knows best: an operator, a runner
///    that read the provider's dashboard);
/// 2. a billing stop, as `domain::recovery` recognises one (codes such as
///    `insufficient_quota`, the wording), or the caller's reason BILLING;
/// 3. the headers: Claude's `anthropic-ratelimit-unified-representative-claim`
///    (`five_hour`, `seven_day`, `seven_day_opus`, ...), unless the unified
///    status says the subscription is not what stopped the agent; else the
///    reset header `domain::recovery` picks as deciding
///    ([`recovery::headers::parse_reset_headers`]: the exhausted limit when a
///    `remaining` header says which): `-5h-` and `-7d-` unified resets,
///    OpenAI's `x-ratelimit-reset-requests` / `-tokens`, Anthropic's
///    `anthropic-ratelimit-requests-reset` / `-tokens-reset`. So the window
///    is the limit whose reset the deadline came from;
/// 4. a JSON body's `rateLimitType` (Claude Code's `rate_limit_event`), in
///    the same places `domain::recovery` reads a body's fields, skipping
///    `allowed` and `allowed_warning` events; then the prose of its
///    `message` fields (a JSON body's other text is never searched);
/// 5. the prose: "5-hour limit", "session limit", "weekly limit", "requests
///    per minute" or "(RPM)", "tokens per minute" or "(TPM)" (the earliest
///    phrase in the text wins);
/// 6. else [`Window::Other`].
pub fn infer_window(
    report: &ExhaustionReport,
    stated: Option<Window>,
    now: DateTime<Utc>,
) -> WindowInference {
    if let Some(window) = stated {
        return WindowInference::new(window, "stated by the caller");
    }
    if let Some(what) = billing_stop(report, now) {
        return WindowInference::new(Window::Billing, format!("billing: {what}"));
    }
    if report.reason == ExhaustionReason::Billing {
        return WindowInference::new(Window::Billing, "reason BILLING");
    }
    window_from_headers(&report.headers, now)
        .or_else(|| window_from_message(&report.message))
        .unwrap_or_else(|| WindowInference::new(Window::Other, "nothing names a window"))
}

/// What `domain::recovery` recognises as a billing stop in the report, if
/// anything: its own verdict, so the two never disagree.
fn billing_stop(report: &ExhaustionReport, now: DateTime<Utc>) -> Option<String> {
    let input = RecoveryInput {
        explicit: None,
        headers: &report.headers,
        message: &report.message,
        time_zone: Tz::UTC,
        default_recovery: Duration::zero(),
        default_billing_recovery: Duration::zero(),
    };
    recovery::infer_recovery(&input, now).billing
}

/// A Claude limit name (`rateLimitType`, the representative claim) as a window.
fn claim_window(claim: &str) -> Option<Window> {
    let claim = claim.trim().to_ascii_lowercase();
    match claim.as_str() {
        "five_hour" => Some(Window::FiveHour),
        "seven_day" => Some(Window::Weekly),
        _ if claim.starts_with("seven_day_") => Some(Window::Weekly),
        _ => None,
    }
}

/// The window a reset header's (lower-case) name is for.
fn reset_header_window(name: &str) -> Option<Window> {
    if let Some(unified) = name.strip_prefix("anthropic-ratelimit-unified-") {
        let window = unified.strip_suffix("-reset")?;
        return if window == "5h" {
            Some(Window::FiveHour)
        } else if window.starts_with("7d") {
            Some(Window::Weekly)
        } else {
            None
        };
    }
    let kind = name.strip_prefix("x-ratelimit-reset-").or_else(|| {
        name.strip_prefix("anthropic-ratelimit-")?
            .strip_suffix("-reset")
    })?;
    if kind.starts_with("requests") {
        Some(Window::Requests)
    } else if kind.contains("tokens") {
        Some(Window::Tokens)
    } else {
        None
    }
}

fn window_from_headers(
    headers: &[(String, String)],
    now: DateTime<Utc>,
) -> Option<WindowInference> {
    let first = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name.trim().eq_ignore_ascii_case(wanted))
            .map(|(_, value)| value.trim())
    };
    // As in `recovery::headers::parse_unified_headers`: a status other than
    // `rejected` says the subscription did not stop the agent.
    let unified_live = first("anthropic-ratelimit-unified-status")
        .is_none_or(|status| status.eq_ignore_ascii_case("rejected"));
    if unified_live
        && let Some(claim) = first("anthropic-ratelimit-unified-representative-claim")
        && let Some(window) = claim_window(claim)
    {
        return Some(WindowInference::new(
            window,
            format!("anthropic-ratelimit-unified-representative-claim: {claim}"),
        ));
    }
    // The hint names the deciding header first: "<name>: <value>[ (claim)]".
    let (_, hint) = recovery::headers::parse_reset_headers(headers, now)?;
    let (name, _) = hint.split_once(':')?;
    let window = reset_header_window(&name.trim().to_ascii_lowercase())?;
    Some(WindowInference::new(window, hint))
}

/// Where a body's fields sit (as `domain::recovery::json` reads them), with
/// the path hints use, skipping `allowed` / `allowed_warning` scopes.
fn live_scopes(top: &Map<String, Value>) -> Vec<(String, &Map<String, Value>)> {
    let mut scopes = recovery::json::scopes(top);
    scopes.retain(|(_, scope)| !recovery::json::not_exhausted(scope));
    scopes
}

fn window_from_message(message: &str) -> Option<WindowInference> {
    let Some(objects) = recovery::json::objects(message) else {
        return window_from_prose(message)
            .map(|(window, phrase)| WindowInference::new(window, format!("message: {phrase:?}")));
    };
    let scopes: Vec<_> = objects.iter().flat_map(live_scopes).collect();
    let typed = scopes.iter().find_map(|(path, scope)| {
        ["rateLimitType", "rate_limit_type"].iter().find_map(|key| {
            let claim = scope.get(*key)?.as_str()?;
            let window = claim_window(claim)?;
            Some(WindowInference::new(
                window,
                format!("{path}{key}: {claim}"),
            ))
        })
    });
    typed.or_else(|| {
        scopes.iter().find_map(|(path, scope)| {
            let text = scope.get("message")?.as_str()?;
            let (window, phrase) = window_from_prose(text)?;
            Some(WindowInference::new(
                window,
                format!("{path}message: {phrase:?}"),
            ))
        })
    })
}

/// Phrases that name a window, lower-case. Claude Code says "5-hour limit"
/// and, in newer builds, "session limit" for the same window; OpenAI says
/// "on tokens per min (TPM)"; Anthropic's API "50 requests per minute",
/// "input tokens per minute" and "Number of request tokens has exceeded
/// your per-minute rate limit"; Gemini "requests per minute".
const WINDOW_PHRASES: [(&str, Window); 21] = [
    ("5-hour limit", Window::FiveHour),
    ("5 hour limit", Window::FiveHour),
    ("five-hour limit", Window::FiveHour),
    ("five hour limit", Window::FiveHour),
    ("5h limit", Window::FiveHour),
    ("session limit", Window::FiveHour),
    ("weekly limit", Window::Weekly),
    ("weekly usage limit", Window::Weekly),
    ("7-day limit", Window::Weekly),
    ("seven-day limit", Window::Weekly),
    ("requests per min", Window::Requests),
    ("requests per hour", Window::Requests),
    ("requests per day", Window::Requests),
    ("(rpm)", Window::Requests),
    ("(rpd)", Window::Requests),
    ("tokens per min", Window::Tokens),
    ("tokens per hour", Window::Tokens),
    ("tokens per day", Window::Tokens),
    ("(tpm)", Window::Tokens),
    ("(tpd)", Window::Tokens),
    ("request tokens", Window::Tokens),
];

/// The window the prose names (the earliest phrase of [`WINDOW_PHRASES`] in
/// it), with the phrase.
fn window_from_prose(text: &str) -> Option<(Window, &'static str)> {
    let lower = text.to_lowercase();
    WINDOW_PHRASES
        .iter()
        .filter_map(|(phrase, window)| lower.find(phrase).map(|at| (at, *window, *phrase)))
        .min_by_key(|(at, _, _)| *at)
        .map(|(_, window, phrase)| (window, phrase))
}

/// `text` cut to [`MAX_HINT_CHARS`] characters, the cut marked.
fn bound(text: &str) -> String {
    if text.chars().count() <= MAX_HINT_CHARS {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX_HINT_CHARS - 1).collect();
    out.push('…');
    out
}

// ---------------------------------------------------------------------------
// A pool's state

/// Where a window's deadline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkSource {
    /// A member's report, and where in it the deadline was read.
    Report(RecoverySource),
    /// `ParkPool`.
    Operator,
}

impl ParkSource {
    /// The stored spelling: the recovery source's, or `OPERATOR`.
    pub fn as_str(self) -> &'static str {
        match self {
            ParkSource::Report(source) => source.as_str(),
            ParkSource::Operator => "OPERATOR",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "OPERATOR" => Some(ParkSource::Operator),
            other => RecoverySource::parse(other).map(ParkSource::Report),
        }
    }

    /// The recovery source of the exhaustion a member parked by it shows: an
    /// operator's time counts as explicit.
    pub fn recovery_source(self) -> RecoverySource {
        match self {
            ParkSource::Report(source) => source,
            ParkSource::Operator => RecoverySource::Explicit,
        }
    }
}

/// One window a pool is (or was) parked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPark {
    /// The window lifts at this instant.
    pub until: DateTime<Utc>,
    pub source: ParkSource,
    /// What decided the deadline (the recovery hint, or the operator's reason).
    pub hint: String,
    /// The reporting agent's id, or the operator's caller name.
    pub reported_by: String,
    pub reported_at: DateTime<Utc>,
}

impl WindowPark {
    /// The window a member's report parks: until the report's inferred
    /// recovery time, with its source and hint.
    pub fn from_report(exhaustion: &Exhaustion, reporter: &str, now: DateTime<Utc>) -> Self {
        WindowPark {
            until: exhaustion.recovery.recovery_at,
            source: ParkSource::Report(exhaustion.recovery.source),
            hint: exhaustion.recovery.hint.clone(),
            reported_by: reporter.to_owned(),
            reported_at: now,
        }
    }
}

/// A report for a pool, decided: the window, what it parks, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    pub window: Window,
    pub park: WindowPark,
    pub inference: WindowInference,
}

/// What `reporter`'s report (an agent with `labels`) at `now` parks its pool
/// with: the deadline exactly as for one agent ([`agent::exhaustion_of`]:
/// the same sources, zones and defaults) and the window [`infer_window`]
/// reads from the same report (`stated` winning).
pub fn pool_report(
    report: &ExhaustionReport,
    labels: &Labels,
    stated: Option<Window>,
    reporter: &str,
    now: DateTime<Utc>,
) -> PoolReport {
    let exhaustion = agent::exhaustion_of(report, labels, now);
    let inference = infer_window(report, stated, now);
    PoolReport {
        window: inference.window,
        park: WindowPark::from_report(&exhaustion, reporter, now),
        inference,
    }
}

/// The canary of a release: the first member let go, whose work shows
/// whether the limit really lifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    pub agent_id: String,
    pub released_at: DateTime<Utc>,
    /// When it completed a work slot after its release ([`completes_canary`]).
    pub completed_at: Option<DateTime<Utc>>,
}

/// A pool's hold on one member, as the member's row keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHold {
    /// The episode of the pool that parked it ([`PoolState::episode`]).
    pub episode: DateTime<Utc>,
    /// When the pool began to hold it.
    pub parked_at: DateTime<Utc>,
    /// When the release let it go (`None`: still held). Kept until the pool
    /// parks it again, so the release's schedule is computed over every
    /// member of the episode and does not move as they leave.
    pub released_at: Option<DateTime<Utc>>,
}

/// What an agent row keeps of its pools: each pool that parked it, and its
/// own exhaustion (a report that parked it alone) while a pool holds it
/// (then the row's exhaustion is what it shows, the later of the two;
/// unheld, the row's exhaustion is its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    pub pools: BTreeMap<PoolName, PoolHold>,
    pub own: Option<Exhaustion>,
}

impl Holds {
    /// Whether `pool` holds the agent now.
    pub fn held_by(&self, pool: &PoolName) -> bool {
        self.pools
            .get(pool)
            .is_some_and(|h| h.released_at.is_none())
    }

    /// Whether any pool holds the agent now.
    pub fn is_held(&self) -> bool {
        self.pools.values().any(|h| h.released_at.is_none())
    }

    /// The pools that hold it now, in name order.
    pub fn holding(&self) -> impl Iterator<Item = &PoolName> {
        self.pools
            .iter()
            .filter(|(_, h)| h.released_at.is_none())
            .map(|(name, _)| name)
    }

    /// Its own exhaustion, given the state it shows: kept apart while held,
    /// else the state's.
    pub fn own_exhaustion<'a>(&'a self, state: &'a AgentState) -> Option<&'a Exhaustion> {
        if self.is_held() {
            self.own.as_ref()
        } else {
            state.exhaustion.as_ref()
        }
    }

    /// `decision` applied: the pools that hold the agent afterwards
    /// (`holds`), the ones that newly do parked at `now` in their pool's
    /// current episode (`episodes`), the ones that let go released at
    /// `now`; `own` kept apart while anything holds it.
    pub fn after(
        &self,
        holds: &BTreeSet<PoolName>,
        own: Option<&Exhaustion>,
        episode_of: impl Fn(&PoolName) -> Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Holds {
        let mut pools = self.pools.clone();
        for name in holds {
            if !self.held_by(name) {
                pools.insert(
                    name.clone(),
                    PoolHold {
                        episode: episode_of(name).unwrap_or(now),
                        parked_at: now,
                        released_at: None,
                    },
                );
            }
        }
        for (name, hold) in &mut pools {
            if hold.released_at.is_none() && !holds.contains(name) {
                hold.released_at = Some(now);
            }
        }
        Holds {
            own: if holds.is_empty() { None } else { own.cloned() },
            pools,
        }
    }
}

/// What [`PoolState::park`] (or [`PoolState::operator_park`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// The deadline is not after `now`: nothing changed (a limit that
    /// already reset parks nobody).
    NotParked,
    /// The pool was not parked: a new episode starts. Its earlier windows
    /// (all lifted) and release progress are forgotten, so the members the
    /// last release let go no longer count as its held members; the ones it
    /// still holds stay held, with their parking times.
    NewEpisode,
    /// A window the pool was not parked for joins the live ones.
    Added,
    /// The window's deadline moved later.
    Extended,
    /// An operator's time moved the window's deadline earlier.
    Shortened,
    /// The window already ran at least as long: kept as it was.
    Kept,
}

/// One pool: the windows it is parked for, and how far the release of its
/// members has got. A pool is parked while any window's deadline is in the
/// future; once the last one passes, its members are released
/// ([`release_schedule`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Each window of the current episode, lifted ones included (the
    /// release reads the last deadline from them).
    pub windows: BTreeMap<Window, WindowPark>,
    /// The release's canary, once it was let go.
    pub canary: Option<Canary>,
    /// When the current episode began (its first window parked): the
    /// members it parked carry it ([`PoolHold::episode`]), so the release
    /// tells this episode's members from those an earlier one let go.
    pub episode: Option<DateTime<Utc>>,
    /// The release found no member left to let go: the sweeper stops
    /// looking at the pool until it is parked again.
    pub settled: bool,
}

impl PoolState {
    /// The windows still in force at `now`.
    fn live(&self, now: DateTime<Utc>) -> impl Iterator<Item = (Window, &WindowPark)> {
        self.windows
            .iter()
            .filter(move |(_, park)| park.until > now)
            .map(|(window, park)| (*window, park))
    }

    /// When the pool lifts, as far as its windows say: the latest deadline
    /// still in the future (`None`: not parked).
    pub fn parked_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.live(now).map(|(_, park)| park.until).max()
    }

    /// Whether any window is still in force.
    pub fn is_parked(&self, now: DateTime<Utc>) -> bool {
        self.live(now).next().is_some()
    }

    /// The window that holds the pool longest (ties: the first in
    /// [`Window::ALL`] order), with its record.
    pub fn binding_window(&self, now: DateTime<Utc>) -> Option<(Window, &WindowPark)> {
        self.live(now)
            .reduce(|best, w| if w.1.until > best.1.until { w } else { best })
    }

    /// When the last window of the episode lifts (or lifted): the deadline
    /// a release is derived from. `None`: never parked.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.windows.values().map(|park| park.until).max()
    }

    /// Starts a new episode if the pool is not parked at `now`.
    fn start_episode_unless_parked(&mut self, now: DateTime<Utc>) -> bool {
        if self.is_parked(now) {
            return false;
        }
        self.windows.clear();
        self.canary = None;
        self.episode = Some(now);
        self.settled = false;
        true
    }

    /// A member's report: parks `window` until `park.until`, never
    /// shortening it: a later report with a later deadline extends the
    /// window, one with an earlier deadline keeps it (retried and delayed
    /// reports arrive out of order, and a shorter cooldown must not cut a
    /// longer one). Only an operator ([`Self::operator_park`],
    /// [`Self::operator_release`]) or time shortens a window. Other windows
    /// are kept apart and untouched. A report while the pool is releasing
    /// (a canary that hit the limit again) starts a new episode: the release
    /// stops, nobody else wakes.
    pub fn park(&mut self, window: Window, park: WindowPark, now: DateTime<Utc>) -> Parked {
        if park.until <= now {
            return Parked::NotParked;
        }
        if self.start_episode_unless_parked(now) {
            self.windows.insert(window, park);
            return Parked::NewEpisode;
        }
        match self.windows.get(&window) {
            Some(old) if old.until >= park.until => Parked::Kept,
            old => {
                let outcome = match old {
                    Some(old) if old.until > now => Parked::Extended,
                    _ => Parked::Added,
                };
                self.windows.insert(window, park);
                outcome
            }
        }
    }

    /// `ParkPool`: `window` held until exactly `until`, by `operator` for
    /// `reason`, whether that extends or shortens it (the operator's time is
    /// the truth; a time not after `now` lifts the window). Other windows
    /// are untouched. The caller checks `until` against the parsers' horizon
    /// ([`check_park_until`]).
    pub fn operator_park(
        &mut self,
        window: Window,
        until: DateTime<Utc>,
        operator: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Parked {
        let park = WindowPark {
            until,
            source: ParkSource::Operator,
            hint: bound(&format!("parked by {operator}: {reason}")),
            reported_by: operator.to_owned(),
            reported_at: now,
        };
        if until > now && self.start_episode_unless_parked(now) {
            self.windows.insert(window, park);
            return Parked::NewEpisode;
        }
        let outcome = match self.windows.get(&window) {
            None if until <= now => Parked::NotParked,
            None => Parked::Added,
            Some(old) if old.until <= now && until <= now => Parked::NotParked,
            Some(old) if old.until <= now => Parked::Added,
            Some(old) if until > old.until => Parked::Extended,
            Some(old) if until < old.until => Parked::Shortened,
            Some(_) => Parked::Kept,
        };
        if !matches!(outcome, Parked::NotParked | Parked::Kept) {
            self.windows.insert(window, park);
        }
        outcome
    }

    /// `ReleasePool`: every window still in force ends at `now`. The
    /// members are then released as after any lift, canary first (an
    /// operator's release does not make the provider's limit any less
    /// likely to bite a herd). Whether anything was in force.
    pub fn operator_release(&mut self, now: DateTime<Utc>) -> bool {
        let mut lifted = false;
        for park in self.windows.values_mut() {
            if park.until > now {
                park.until = now;
                lifted = true;
            }
        }
        lifted
    }

    /// Records `agent_id` released at `at` as the canary. Only the first
    /// counts (a second replica releasing the same canary changes nothing);
    /// whether this one did.
    pub fn canary_released(&mut self, agent_id: &str, at: DateTime<Utc>) -> bool {
        if self.canary.is_some() {
            return false;
        }
        self.canary = Some(Canary {
            agent_id: agent_id.to_owned(),
            released_at: at,
            completed_at: None,
        });
        true
    }

    /// Records that `agent_id` completed a work slot at `at`, if it is the
    /// canary and had not yet; whether this did.
    pub fn canary_completed(&mut self, agent_id: &str, at: DateTime<Utc>) -> bool {
        match &mut self.canary {
            Some(canary) if canary.agent_id == agent_id && canary.completed_at.is_none() => {
                canary.completed_at = Some(at.max(canary.released_at));
                true
            }
            _ => false,
        }
    }

    /// What a member this pool holds shows as its exhaustion: until the
    /// pool lifts (its binding window's deadline and source; the reason
    /// BILLING for a billing window), with a hint naming the pool and the
    /// window. A pool that has lifted but not yet released the member shows
    /// its last deadline. `None`: never parked.
    pub fn exhaustion(&self, pool: &PoolName, now: DateTime<Utc>) -> Option<Exhaustion> {
        let (window, park, state) = match self.binding_window(now) {
            Some((window, park)) => (window, park, "parked"),
            None => {
                let (window, park) = self
                    .windows
                    .iter()
                    .reduce(|best, w| if w.1.until > best.1.until { w } else { best })?;
                (*window, park, "lifted, releasing its members")
            }
        };
        Some(Exhaustion {
            reason: window.reason(),
            recovery: RecoveryEstimate {
                recovery_at: park.until,
                source: park.source.recovery_source(),
                hint: bound(&format!(
                    "quota pool {pool} {state} ({window}): {}",
                    park.hint
                )),
            },
        })
    }
}

/// Where a pool is in its life, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No window in force and nobody held: members take work.
    Open,
    /// A window is in force.
    Parked,
    /// The last window lifted; members are still being released.
    Releasing,
}

impl PoolState {
    /// The pool's phase at `now`, `held` of its members still held.
    pub fn phase(&self, held: i64, now: DateTime<Utc>) -> Phase {
        if self.is_parked(now) {
            Phase::Parked
        } else if held > 0 {
            Phase::Releasing
        } else {
            Phase::Open
        }
    }

    /// When the release next lets a member go, at `now`: the canary at once
    /// once the pool lifted, then the first member not yet released (`None`:
    /// parked, or nobody left).
    pub fn next_release(
        &self,
        members: &[HeldMember],
        settings: &ReleaseSettings,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let schedule = release_schedule(self, members, settings, now)?;
        if self.canary.is_none() {
            return schedule.canary.map(|_| now);
        }
        let released: BTreeSet<&str> = members
            .iter()
            .filter(|m| m.released_at.is_some())
            .map(|m| m.agent_id.as_str())
            .collect();
        schedule
            .releases
            .iter()
            .find(|(id, _)| !released.contains(id.as_str()))
            .map(|(_, at)| (*at).max(now))
    }
}

/// An operator's `until` for `ParkPool`: no further ahead of the server's
/// clock than an inferred recovery may be (`recovery::max_recovery_delay`),
/// refused naming the field; a past time is fine (it lifts the window).
pub fn check_park_until(
    field: &str,
    until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, InvalidArgument> {
    recovery::check_explicit_recovery(field, until, now).map_err(|message| InvalidArgument {
        field: field.to_owned(),
        problem: message
            .strip_prefix(field)
            .map_or(message.clone(), |rest| rest.trim_start().to_owned()),
    })
}

/// Whether a status change of the canary completes a work slot: a WORK
/// slot (BUSY) that ended as finished or released. An ON_CALL slot does no
/// provider work, and an expired claim shows nothing about the limit.
pub fn completes_canary(from: AgentStatus, cause: Cause) -> bool {
    from == AgentStatus::Busy && matches!(cause, Cause::WorkFinished | Cause::ClaimReleased)
}

// ---------------------------------------------------------------------------
// Members

/// The causes a pool records on its members' transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolCause {
    /// The reporter itself: its own report, `EXHAUSTED` as before pools (the
    /// transition names the pool).
    Reported,
    /// Parked because its pool is: IDLE at the report, or landing there later
    /// (a slot that ends, a return, a registration).
    PoolExhausted,
    /// Let go by its pool (to IDLE, or still EXHAUSTED or OFFLINE when
    /// something else holds it).
    PoolReleased,
}

impl PoolCause {
    pub const ALL: [PoolCause; 3] = [
        PoolCause::Reported,
        PoolCause::PoolExhausted,
        PoolCause::PoolReleased,
    ];

    /// The transition cause's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolCause::Reported => Cause::Exhausted.as_str(),
            PoolCause::PoolExhausted => "POOL_EXHAUSTED",
            PoolCause::PoolReleased => "POOL_RELEASED",
        }
    }

    /// The state machine's cause it is.
    pub fn agent_cause(self) -> Cause {
        match self {
            PoolCause::Reported => Cause::Exhausted,
            PoolCause::PoolExhausted => Cause::PoolExhausted,
            PoolCause::PoolReleased => Cause::PoolReleased,
        }
    }
}

impl fmt::Display for PoolCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition a pool makes, naming the pool. `from` may equal `to` (an
/// EXHAUSTED agent a pool now holds, or lets go of while something else
/// still holds it), as with other causes that keep the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolChange {
    pub from: AgentStatus,
    pub to: AgentStatus,
    pub cause: PoolCause,
    pub pool: PoolName,
}

/// A member's new state and the pools that hold it after a pool's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDecision {
    /// The state to write; its exhaustion is what the agent shows
    /// ([`Member::effective_recovery`]), its own is kept apart by the caller.
    pub state: AgentState,
    /// The transition to record. `None`: no transition of the pool's
    /// (where the state machine decided one, that one stands, with this state).
    pub change: Option<PoolChange>,
    /// Every pool that holds the member afterwards.
    pub holds: BTreeSet<PoolName>,
}

/// One pool of a member, as the decisions read it.
#[derive(Debug, Clone, Copy)]
pub struct MemberPool<'a> {
    pub name: &'a PoolName,
    /// The pool's state after whatever the commit did to it.
    pub state: &'a PoolState,
    /// Whether the pool holds the member: it parked it and has not released it.
    pub holds: bool,
}

/// A member agent as the pool decisions see it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub state: &'a AgentState,
    /// Its own exhaustion: a report that parked the agent alone, kept apart
    /// from its pools' (`state.exhaustion` is what it shows, the later of
    /// the two).
    pub own: Option<&'a Exhaustion>,
    /// Its pools (the current membership).
    pub pools: &'a [MemberPool<'a>],
}

/// What a pool's parking means for one member ([`Member::on_pool_parked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnPark {
    /// Decided in the same commit: an IDLE member to EXHAUSTED; an
    /// EXHAUSTED one now held by the pool too.
    Park(PoolDecision),
    /// BUSY or ON_CALL: it keeps its slot; [`Member::on_arrival`] parks it
    /// when the slot ends, if the pool still is.
    AtSlotEnd,
    /// OFFLINE: unchanged; [`Member::on_arrival`] parks it when it returns,
    /// if the pool still is.
    OnReturn,
    /// Nothing to do: the pool is not parked, the agent is not a member, or
    /// the pool already holds it.
    Unchanged,
}

impl<'a> Member<'a> {
    fn pool(&self, name: &PoolName) -> Option<&MemberPool<'a>> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The pools that hold the member now.
    pub fn holds(&self) -> BTreeSet<PoolName> {
        self.pools
            .iter()
            .filter(|p| p.holds)
            .map(|p| p.name.clone())
            .collect()
    }

    /// The pools of the member parked at `now`.
    fn parked(&self, now: DateTime<Utc>) -> impl Iterator<Item = &PoolName> {
        self.pools
            .iter()
            .filter(move |p| p.state.is_parked(now))
            .map(|p| p.name)
    }

    /// What the member shows while `holds` hold it: the latest of its own
    /// exhaustion and each holding pool's ([`PoolState::exhaustion`]); ties
    /// go to its own, then to pools in name order. `None`: nothing parks it.
    fn effective_with(&self, holds: &BTreeSet<PoolName>, now: DateTime<Utc>) -> Option<Exhaustion> {
        let mut pools: Vec<_> = self
            .pools
            .iter()
            .filter(|p| holds.contains(p.name))
            .collect();
        pools.sort_by_key(|p| p.name);
        self.own
            .cloned()
            .into_iter()
            .chain(pools.iter().filter_map(|p| p.state.exhaustion(p.name, now)))
            .reduce(|best, e| {
                if e.recovery.recovery_at > best.recovery.recovery_at {
                    e
                } else {
                    best
                }
            })
    }

    /// The member's effective recovery: its own exhaustion and every pool
    /// holding it, the latest deciding. What `GetAgent` shows; the agent
    /// wakes only when all of them let go ([`Self::wakes`]).
    pub fn effective_recovery(&self, now: DateTime<Utc>) -> Option<Exhaustion> {
        self.effective_with(&self.holds(), now)
    }

    /// Whether the sweeper may wake the member (EXHAUSTED to IDLE,
    /// RECOVERED) at `now`: its own exhaustion has lifted (or it has none)
    /// and no pool holds it. A pool lets go only through its release
    /// ([`Self::on_release`]), never by the clock alone: that is what keeps
    /// the herd apart.
    pub fn wakes(&self, now: DateTime<Utc>) -> bool {
        self.own.is_none_or(|e| e.recovery.recovery_at <= now)
            && self.pools.iter().all(|p| !p.holds)
    }

    /// Whether a claim may take the member, as far as pools go: none of its
    /// pools is parked and none holds it (status and cordon are
    /// `dispatch`'s). An IDLE member of a parked pool should not exist, but
    /// one resumed by an operator does, and must still not be claimed.
    pub fn claimable(&self, now: DateTime<Utc>) -> bool {
        self.pools
            .iter()
            .all(|p| !p.holds && !p.state.is_parked(now))
    }

    /// `pool` was just parked (its state in [`Self::pools`] is the parked
    /// one): what becomes of this member, other than the reporter. IDLE:
    /// EXHAUSTED now (cause `POOL_EXHAUSTED`), held, showing the pool's
    /// recovery. EXHAUSTED by its own report: held too, status unchanged; a
    /// transition (EXHAUSTED to EXHAUSTED, `POOL_EXHAUSTED`) only when the
    /// pool moves its recovery later, so watchers see the new time. A
    /// member the pool already holds is unchanged: a later report extending
    /// the pool does not write every member again (the pool's state is the
    /// truth, and only its release wakes them). BUSY, ON_CALL, OFFLINE:
    /// later ([`OnPark`]).
    pub fn on_pool_parked(&self, pool: &PoolName, now: DateTime<Utc>) -> OnPark {
        let Some(member_pool) = self.pool(pool) else {
            return OnPark::Unchanged;
        };
        if !member_pool.state.is_parked(now) || member_pool.holds {
            return OnPark::Unchanged;
        }
        let mut holds = self.holds();
        holds.insert(pool.clone());
        let shown = self.effective_with(&holds, now);
        let status = self.state.status;
        match status {
            AgentStatus::Busy | AgentStatus::OnCall => OnPark::AtSlotEnd,
            AgentStatus::Offline => OnPark::OnReturn,
            AgentStatus::Idle | AgentStatus::Exhausted => {
                let was = self
                    .state
                    .exhaustion
                    .as_ref()
                    .map(|e| e.recovery.recovery_at);
                let now_shown = shown.as_ref().map(|e| e.recovery.recovery_at);
                let change =
                    (status == AgentStatus::Idle || was != now_shown).then(|| PoolChange {
                        from: status,
                        to: AgentStatus::Exhausted,
                        cause: PoolCause::PoolExhausted,
                        pool: pool.clone(),
                    });
                OnPark::Park(PoolDecision {
                    state: AgentState {
                        status: AgentStatus::Exhausted,
                        last_heartbeat_at: self.state.last_heartbeat_at,
                        exhaustion: shown,
                    },
                    change,
                    holds,
                })
            }
        }
    }

    /// The reporter of a report that parked `pool`: EXHAUSTED whatever its
    /// status (a report ends a slot, as before pools), cause `EXHAUSTED`
    /// naming the pool, held by the pool like every other member, so it
    /// wakes with the pool's release and not before. The report is the
    /// pool's, not the agent's own: an operator releasing the pool releases
    /// the reporter too. `None` when the pool is not parked after the report
    /// (its deadline had passed): the report is then decided as one agent's.
    pub fn on_report(&self, pool: &PoolName, now: DateTime<Utc>) -> Option<PoolDecision> {
        let member_pool = self.pool(pool)?;
        if !member_pool.state.is_parked(now) {
            return None;
        }
        let mut holds = self.holds();
        holds.insert(pool.clone());
        Some(PoolDecision {
            state: AgentState {
                status: AgentStatus::Exhausted,
                last_heartbeat_at: self.state.last_heartbeat_at,
                exhaustion: self.effective_with(&holds, now),
            },
            change: Some(PoolChange {
                from: self.state.status,
                to: AgentStatus::Exhausted,
                cause: PoolCause::Reported,
                pool: pool.clone(),
            }),
            holds,
        })
    }

    /// The member arrives where it could take work while a pool of it may
    /// hold it: its slot ended (`from` BUSY or ON_CALL: `FinishWork`,
    /// `ReleaseClaim`, an expired lease), it came back (`from` OFFLINE: a
    /// heartbeat), or it registered (`from` IDLE: the registration's own
    /// transition, REGISTERED, is recorded first, in the same commit).
    /// `after` is what the state machine decided. Every pool of it parked at
    /// `now` holds it from now on, with the ones that already did; if any
    /// does, an IDLE `after` becomes EXHAUSTED (`POOL_EXHAUSTED`, naming the
    /// pool that holds it longest), and an EXHAUSTED one (its own exhaustion
    /// still running) shows the later recovery with the state machine's
    /// transition. `None`: nothing holds it, the state machine's decision
    /// stands.
    pub fn on_arrival(
        &self,
        from: AgentStatus,
        after: &AgentState,
        now: DateTime<Utc>,
    ) -> Option<PoolDecision> {
        let mut holds = self.holds();
        holds.extend(self.parked(now).cloned());
        if holds.is_empty() {
            return None;
        }
        let shown = self.effective_with(&holds, now);
        let change = match after.status {
            AgentStatus::Idle => {
                let binding = self
                    .pools
                    .iter()
                    .filter(|p| holds.contains(p.name))
                    .filter_map(|p| Some((p.state.exhaustion(p.name, now)?, p.name)))
                    .reduce(|best, p| {
                        let later = p.0.recovery.recovery_at > best.0.recovery.recovery_at;
                        let tie = p.0.recovery.recovery_at == best.0.recovery.recovery_at;
                        if later || (tie && p.1 < best.1) {
                            p
                        } else {
                            best
                        }
                    })
                    .map(|(_, name)| name.clone())?;
                Some(PoolChange {
                    from,
                    to: AgentStatus::Exhausted,
                    cause: PoolCause::PoolExhausted,
                    pool: binding,
                })
            }
            AgentStatus::Exhausted => None,
            _ => return None,
        };
        Some(PoolDecision {
            state: AgentState {
                status: AgentStatus::Exhausted,
                last_heartbeat_at: after.last_heartbeat_at,
                exhaustion: shown,
            },
            change,
            holds,
        })
    }

    /// `pool` releases the member (its turn in [`due_releases`], or it left
    /// the pool by registering without it). Always a transition, cause
    /// `POOL_RELEASED`: EXHAUSTED to IDLE when nothing else holds it and its
    /// own exhaustion has lifted; else EXHAUSTED to EXHAUSTED showing what
    /// still holds it (its own report, another pool); OFFLINE to OFFLINE,
    /// the exhaustion kept only for what still holds it (so its return is
    /// decided by that alone). `None` when the pool does not hold it (already
    /// released, by this replica or another: a release happens once).
    pub fn on_release(&self, pool: &PoolName, now: DateTime<Utc>) -> Option<PoolDecision> {
        if !self.pool(pool).is_some_and(|p| p.holds) {
            return None;
        }
        let status = self.state.status;
        if !matches!(status, AgentStatus::Exhausted | AgentStatus::Offline) {
            return None;
        }
        let mut holds = self.holds();
        holds.remove(pool);
        let rest = self.effective_with(&holds, now);
        let own_lifted = self.own.is_none_or(|e| e.recovery.recovery_at <= now);
        let to = match status {
            AgentStatus::Exhausted if holds.is_empty() && own_lifted => AgentStatus::Idle,
            other => other,
        };
        Some(PoolDecision {
            state: AgentState {
                status: to,
                last_heartbeat_at: self.state.last_heartbeat_at,
                exhaustion: if to == AgentStatus::Idle { None } else { rest },
            },
            change: Some(PoolChange {
                from: status,
                to,
                cause: PoolCause::PoolReleased,
                pool: pool.clone(),
            }),
            holds,
        })
    }
}

// ---------------------------------------------------------------------------
// The release

/// The three release settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseSettings {
    /// `--pool-canary-timeout`: how long the others wait for the canary.
    pub canary_timeout: Duration,
    /// `--pool-release-spread`: the others are released over this long.
    pub spread: Duration,
    /// `--pool-release-rate`: at most this many releases in any second.
    pub rate: u32,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        ReleaseSettings {
            canary_timeout: DEFAULT_POOL_CANARY_TIMEOUT,
            spread: DEFAULT_POOL_RELEASE_SPREAD,
            rate: DEFAULT_POOL_RELEASE_RATE,
        }
    }
}

impl ReleaseSettings {
    /// The three flags, each checked ([`pool_canary_timeout_setting`],
    /// [`pool_release_spread_setting`], [`pool_release_rate_setting`]).
    pub fn new(canary_timeout: Duration, spread: Duration, rate: u32) -> Result<Self, String> {
        Ok(ReleaseSettings {
            canary_timeout: pool_canary_timeout_setting(canary_timeout)?,
            spread: pool_release_spread_setting(spread)?,
            rate: pool_release_rate_setting(rate)?,
        })
    }

    /// The time between two releases: a second over the rate, rounded up
    /// to the microsecond (so never faster than the rate).
    fn step(&self) -> Duration {
        let rate = i64::from(self.rate.clamp(1, MAX_POOL_RELEASE_RATE));
        Duration::microseconds((1_000_000 + rate - 1) / rate)
    }
}

/// A duration flag from zero to `max`, refused naming the flag.
fn bounded_setting(flag: &str, value: Duration, max: Duration) -> Result<Duration, String> {
    if value < Duration::zero() {
        return Err(format!("{flag} must not be negative"));
    }
    if value > max {
        return Err(format!(
            "{flag} must be at most {}",
            recovery::format_duration(max)
        ));
    }
    Ok(value)
}

/// `--pool-canary-timeout`: zero (the others follow the canary at once,
/// still spread) to [`MAX_POOL_CANARY_TIMEOUT`].
pub fn pool_canary_timeout_setting(timeout: Duration) -> Result<Duration, String> {
    bounded_setting("--pool-canary-timeout", timeout, MAX_POOL_CANARY_TIMEOUT)
}

/// `--pool-release-spread`: zero (only the rate spreads them) to
/// [`MAX_POOL_RELEASE_SPREAD`].
pub fn pool_release_spread_setting(spread: Duration) -> Result<Duration, String> {
    bounded_setting("--pool-release-spread", spread, MAX_POOL_RELEASE_SPREAD)
}

/// `--pool-release-rate`: 1 (zero would never release anyone) to
/// [`MAX_POOL_RELEASE_RATE`] agents a second.
pub fn pool_release_rate_setting(rate: u32) -> Result<u32, String> {
    if rate == 0 {
        return Err("--pool-release-rate must be at least 1 agent per second".into());
    }
    if rate > MAX_POOL_RELEASE_RATE {
        return Err(format!(
            "--pool-release-rate must be at most {MAX_POOL_RELEASE_RATE} agents per second"
        ));
    }
    Ok(rate)
}

/// A member held by a pool in its current episode, as its release reads it.
/// Members the release already let go stay listed (with `released_at`)
/// until the next episode: the schedule is computed over all of them, so it
/// does not move as they leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldMember {
    pub agent_id: String,
    /// When the pool began to hold it.
    pub parked_at: DateTime<Utc>,
    /// Whether it is OFFLINE (it cannot prove the limit lifted, so it is
    /// no canary while another can be).
    pub offline: bool,
    /// When the release let it go.
    pub released_at: Option<DateTime<Utc>>,
}

/// A stable hash of `(agent_id, deadline)` as a fraction of `spread`, in
/// `[0, spread)`, in whole microseconds. SHA-256 of a fixed layout (never
/// `DefaultHasher`, which differs between builds and processes), and the
/// deadline at the store's precision (microseconds), so every replica and
/// every version computes the same offset from what it reads back. A new
/// deadline (the pool parked again) gives each agent a new place.
pub fn release_offset(agent_id: &str, deadline: DateTime<Utc>, spread: Duration) -> Duration {
    let spread_us = spread.num_microseconds().unwrap_or(i64::MAX);
    if spread_us <= 0 {
        return Duration::zero();
    }
    let mut hash = Sha256::new();
    hash.update(b"fleetcare quota pool release v1\0");
    hash.update(agent_id.as_bytes());
    hash.update([0]);
    hash.update(deadline.timestamp_micros().to_be_bytes());
    let digest = hash.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    let fraction = u64::from_be_bytes(head);
    // fraction / 2^64 * spread: below spread, never equal.
    let offset = (u128::from(fraction) * spread_us as u128) >> 64;
    Duration::microseconds(offset as i64)
}

/// The canary among `members`: of those not yet released, an online one
/// if any, parked longest (the earliest `parked_at`), ties to the smallest
/// agent id. It has waited longest, and it is the one a provider's reset
/// most likely covers.
pub fn choose_canary(members: &[HeldMember]) -> Option<&HeldMember> {
    members
        .iter()
        .filter(|m| m.released_at.is_none())
        .min_by(|a, b| {
            (a.offline, a.parked_at, &a.agent_id).cmp(&(b.offline, b.parked_at, &b.agent_id))
        })
}

/// When each member of a lifted pool is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSchedule {
    /// When the last window lifted (the offsets' seed).
    pub deadline: DateTime<Utc>,
    /// The canary: the recorded one, or the one to release first.
    pub canary: Option<String>,
    /// When the others may start: the canary's completed work slot, or its
    /// release plus the canary timeout, whichever comes first. `None` until
    /// the canary is released.
    pub gate: Option<DateTime<Utc>>,
    /// Every member but the canary with its release instant (the released
    /// ones too), in release order. Empty until the gate is known.
    pub releases: Vec<(String, DateTime<Utc>)>,
}

/// The release of `state`'s held `members` at `now`, or `None` while the
/// pool is parked (nobody is released from a parked pool).
///
/// Each member's target is `gate + release_offset(id, deadline, spread)`.
/// Then the rate: releases sit on a grid of `1 s / rate` steps from the
/// gate, one per step, taken in target order (ties by id): a member whose
/// step is taken moves to the next free one, so no second holds more than
/// `rate` releases, the canary's included (the first step is at least one
/// step after it), and a pool larger than `rate × spread` simply takes
/// longer. Everything is derived from stored state (deadline, canary
/// times, member ids), so replicas agree without talking.
pub fn release_schedule(
    state: &PoolState,
    members: &[HeldMember],
    settings: &ReleaseSettings,
    now: DateTime<Utc>,
) -> Option<ReleaseSchedule> {
    if state.is_parked(now) {
        return None;
    }
    // A pool that holds members has windows; without any (a store repaired
    // by hand) the members still get a schedule rather than staying held.
    let deadline = state.deadline().unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let Some(canary) = &state.canary else {
        return Some(ReleaseSchedule {
            deadline,
            canary: choose_canary(members).map(|m| m.agent_id.clone()),
            gate: None,
            releases: Vec::new(),
        });
    };
    let timeout_end = canary
        .released_at
        .checked_add_signed(settings.canary_timeout)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let gate = canary
        .completed_at
        .map_or(timeout_end, |done| done.min(timeout_end));
    let step = settings.step();
    let step_us = step.num_microseconds().unwrap_or(1).max(1);
    let first_step = i64::from(gate - canary.released_at < step);
    let mut targets: Vec<(i64, &str)> = members
        .iter()
        .filter(|m| m.agent_id != canary.agent_id)
        .map(|m| {
            let offset = release_offset(&m.agent_id, deadline, settings.spread);
            let offset_us = offset.num_microseconds().unwrap_or(0);
            ((offset_us + step_us - 1) / step_us, m.agent_id.as_str())
        })
        .collect();
    targets.sort();
    targets.dedup_by(|a, b| a.1 == b.1);
    let mut next = first_step;
    let releases = targets
        .into_iter()
        .map(|(target, id)| {
            let index = target.max(next);
            next = index + 1;
            let at = gate
                .checked_add_signed(step * i32::try_from(index).unwrap_or(i32::MAX))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            (id.to_owned(), at)
        })
        .collect();
    Some(ReleaseSchedule {
        deadline,
        canary: Some(canary.agent_id.clone()),
        gate: Some(gate),
        releases,
    })
}

/// The members the sweeper releases at `now` (each through
/// [`Member::on_release`], the canary also through
/// [`PoolState::canary_released`]), in release order: nobody while the pool
/// is parked; once it lifts, the canary alone; after the gate, every
/// member whose instant has come. At most `rate` minus the releases
/// recorded in the last second, so a sweeper that fell behind catches up
/// at the rate, not in a burst. Released members are never due again.
pub fn due_releases(
    state: &PoolState,
    members: &[HeldMember],
    settings: &ReleaseSettings,
    now: DateTime<Utc>,
) -> Vec<String> {
    let Some(schedule) = release_schedule(state, members, settings, now) else {
        return Vec::new();
    };
    let released: BTreeSet<&str> = members
        .iter()
        .filter(|m| m.released_at.is_some())
        .map(|m| m.agent_id.as_str())
        .collect();
    let mut due: Vec<String> = match (&state.canary, schedule.canary) {
        (None, Some(canary)) => vec![canary],
        (None, None) => Vec::new(),
        (Some(_), _) => schedule
            .releases
            .into_iter()
            .filter(|(id, at)| *at <= now && !released.contains(id.as_str()))
            .map(|(id, _)| id)
            .collect(),
    };
    let second_ago = now - Duration::seconds(1);
    let recent = |at: DateTime<Utc>| at > second_ago && at <= now;
    let mut recent_releases = members
        .iter()
        .filter(|m| m.released_at.is_some_and(recent))
        .count();
    if let Some(canary) = &state.canary
        && recent(canary.released_at)
        && !members.iter().any(|m| m.agent_id == canary.agent_id)
    {
        recent_releases += 1;
    }
    let budget = (settings.rate as usize).saturating_sub(recent_releases);
    due.truncate(budget);
    due
}

#[cfg(test)]
mod tests;
