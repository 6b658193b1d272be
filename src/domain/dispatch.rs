//! Dispatch rules (issue 22): which agent a claim takes, what a claim and its
//! lease are, when a fencing token is accepted, and the operator overrides
//! (resume, delete, offline expiry). Pure: the store locks rows and the
//! runtime waits; every *whether* is decided here, with the clock passed in.
//!
//! `batch::plan` applies these decisions to the agents a batch locked; the
//! causes they record are [`agent::Cause`]'s (`CLAIMED`, `CLAIM_RELEASED`,
//! `CLAIM_EXPIRED`, `RESUMED`, `CORDONED`, `UNCORDONED`, `DELETED`, `EXPIRED`).

use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::domain::agent::{
    self, AgentState, AgentStatus, Cause, Decision, Event, SlotType, TransitionRefused,
};
use crate::domain::labels::{self, Labels};
use crate::domain::transition::{Agent, Claim};

/// The shortest lease a claim may ask for.
pub const MIN_CLAIM_LEASE: Duration = Duration::seconds(1);
/// The default of `--max-claim-lease`: the longest lease a claim may ask for.
pub const DEFAULT_MAX_CLAIM_LEASE: Duration = Duration::hours(1);
/// The longest a `ClaimAgent` waits for an agent. Longer requests are cut to
/// this, not refused: a waiting claim holds a stream and a queue slot, and five
/// minutes is well past what a client keeps an unary call open for (proxies
/// and load balancers commonly cut idle calls at 60 s to 10 min); a
/// scheduler wanting longer calls again.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::minutes(5);
/// The longest `request_id`, in characters.
pub const MAX_REQUEST_ID: usize = 128;
/// Requirements one selector may hold (`match_labels` entries and
/// `match_expressions` together): as many as an agent may carry labels.
pub const MAX_SELECTOR_REQUIREMENTS: usize = labels::MAX_LABELS;
/// Values one `In` / `NotIn` expression may list.
pub const MAX_SELECTOR_VALUES: usize = 64;
/// The default of `--offline-agent-retention`.
pub const DEFAULT_OFFLINE_AGENT_RETENTION: Duration = Duration::days(7);
/// The longest `claim_id` a call may name: an agent id (128 characters at
/// most), the separator and the claim's own part, with room to spare.
pub const MAX_CLAIM_ID: usize = 256;
/// Between the agent id and the claim's own part of a claim id; never in an
/// agent id (`[A-Za-z0-9._:-]`).
const CLAIM_ID_SEPARATOR: char = '/';

/// The id of a claim on `agent_id`, `unique` its own part (a UUID the
/// server draws): `<agent_id>/<unique>`. The agent is in the id so that
/// `RenewClaim` and `ReleaseClaim` know which agent's row to lock without
/// looking the claim up first; whether the claim is still that agent's
/// active one is decided on the locked row.
pub fn claim_id(agent_id: &str, unique: &str) -> String {
    format!("{agent_id}{CLAIM_ID_SEPARATOR}{unique}")
}

/// The agent a claim id names: `None` for an id not made by [`claim_id`]
/// (claims made before ids carried their agent are looked up in the store).
pub fn claim_agent(claim_id: &str) -> Option<&str> {
    let (agent, unique) = claim_id.rsplit_once(CLAIM_ID_SEPARATOR)?;
    (!agent.is_empty() && !unique.is_empty()).then_some(agent)
}

// ---------------------------------------------------------------------------
// Bad input

pub use crate::domain::invalid::InvalidArgument;

// ---------------------------------------------------------------------------
// Label selectors

/// How a [`Requirement`] compares an agent's label with its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// The agent has the key, with one of the values.
    In,
    /// The agent lacks the key, or has it with none of the values.
    NotIn,
    /// The agent has the key, whatever its value.
    Exists,
    /// The agent lacks the key.
    DoesNotExist,
}

impl Operator {
    pub const ALL: [Operator; 4] = [
        Operator::In,
        Operator::NotIn,
        Operator::Exists,
        Operator::DoesNotExist,
    ];

    /// The proto spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::In => "IN",
            Operator::NotIn => "NOT_IN",
            Operator::Exists => "EXISTS",
            Operator::DoesNotExist => "DOES_NOT_EXIST",
        }
    }

    /// Whether the operator takes values (`In`, `NotIn`) or must have none.
    pub fn takes_values(self) -> bool {
        matches!(self, Operator::In | Operator::NotIn)
    }

    /// The operator of expression `index` from its proto name: anything else
    /// (`OPERATOR_UNSPECIFIED`, a number this build does not know) is refused
    /// naming `selector.match_expressions[index].operator`.
    pub fn parse(index: usize, name: &str) -> Result<Operator, InvalidArgument> {
        Self::ALL
            .into_iter()
            .find(|op| op.as_str() == name)
            .ok_or_else(|| {
                InvalidArgument::new(
                    format!("{SELECTOR}.match_expressions[{index}].operator"),
                    format!("{name:?} is not one of IN, NOT_IN, EXISTS, DOES_NOT_EXIST"),
                )
            })
    }
}

/// One of a selector's `match_expressions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

impl Requirement {
    /// Kubernetes semantics: `NotIn` and `DoesNotExist` match an agent without the key.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// The request field a selector arrives in.
const SELECTOR: &str = "selector";

/// Which agents a claim may take: every `match_labels` pair and every
/// expression must hold (an empty selector matches every agent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether an agent with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector is well formed, refusing the first bad field:
    /// keys and values by the rules agents' labels follow
    /// ([`labels::key_is_valid`], [`labels::value_is_valid`]: a selector that
    /// names a key no agent can carry is a mistake, not an empty match);
    /// values required with `In`/`NotIn` (an empty list would match nothing,
    /// or everything) and refused with `Exists`/`DoesNotExist` (they would be
    /// ignored); at most [`MAX_SELECTOR_REQUIREMENTS`] requirements and
    /// [`MAX_SELECTOR_VALUES`] values each.
    pub fn validate(&self) -> Result<(), InvalidArgument> {
        let requirements = self.match_labels.len() + self.match_expressions.len();
        if requirements > MAX_SELECTOR_REQUIREMENTS {
            return Err(InvalidArgument::new(
                SELECTOR,
                format!(
                    "has {requirements} requirements, at most {MAX_SELECTOR_REQUIREMENTS} allowed"
                ),
            ));
        }
        for (key, value) in &self.match_labels {
            let field = format!("{SELECTOR}.match_labels");
            if !labels::key_is_valid(key) {
                return Err(InvalidArgument::new(
                    field,
                    format!("key {key:?} {}", labels::KEY_RULE),
                ));
            }
            if !labels::value_is_valid(value) {
                return Err(InvalidArgument::new(
                    field,
                    format!(
                        "value of {key:?} is longer than {} characters",
                        labels::MAX_LABEL_VALUE
                    ),
                ));
            }
        }
        for (i, r) in self.match_expressions.iter().enumerate() {
            let field = |name: &str| format!("{SELECTOR}.match_expressions[{i}].{name}");
            if r.key.is_empty() {
                return Err(InvalidArgument::new(field("key"), "is required"));
            }
            if !labels::key_is_valid(&r.key) {
                return Err(InvalidArgument::new(
                    field("key"),
                    format!("{:?} {}", r.key, labels::KEY_RULE),
                ));
            }
            let op = r.operator.as_str();
            match (r.operator.takes_values(), r.values.is_empty()) {
                (true, true) => {
                    return Err(InvalidArgument::new(
                        field("values"),
                        format!("must not be empty with operator {op}"),
                    ));
                }
                (false, false) => {
                    return Err(InvalidArgument::new(
                        field("values"),
                        format!("must be empty with operator {op}"),
                    ));
                }
                _ => {}
            }
            if r.values.len() > MAX_SELECTOR_VALUES {
                return Err(InvalidArgument::new(
                    field("values"),
                    format!(
                        "has {} entries, at most {MAX_SELECTOR_VALUES} allowed",
                        r.values.len()
                    ),
                ));
            }
            if let Some(v) = r.values.iter().position(|v| !labels::value_is_valid(v)) {
                return Err(InvalidArgument::new(
                    format!("{}[{v}]", field("values")),
                    format!("is longer than {} characters", labels::MAX_LABEL_VALUE),
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Claim requests

/// A claim's lease: at least [`MIN_CLAIM_LEASE`], at most `max_claim_lease`
/// (`--max-claim-lease`). Refused, not clamped: a holder must know how often
/// to renew, so it gets the lease it asked for or an error.
pub fn lease_duration(
    lease: Duration,
    max_claim_lease: Duration,
) -> Result<Duration, InvalidArgument> {
    if lease < MIN_CLAIM_LEASE {
        return Err(InvalidArgument::new(
            "lease_duration",
            format!(
                "is {} ms, at least {} s required",
                lease.num_milliseconds(),
                MIN_CLAIM_LEASE.num_seconds()
            ),
        ));
    }
    if lease > max_claim_lease {
        return Err(InvalidArgument::new(
            "lease_duration",
            format!(
                "is {} s, at most {} s allowed (--max-claim-lease)",
                lease.num_seconds(),
                max_claim_lease.num_seconds()
            ),
        ));
    }
    Ok(lease)
}

/// The `--max-claim-lease` setting: no shorter than the shortest lease, or no
/// claim could be made.
pub fn max_claim_lease_setting(max: Duration) -> Result<Duration, String> {
    if max < MIN_CLAIM_LEASE {
        return Err(format!(
            "--max-claim-lease must be at least {} s",
            MIN_CLAIM_LEASE.num_seconds()
        ));
    }
    Ok(max)
}

/// How long a claim waits: never negative (0 answers at once), at most
/// [`MAX_WAIT_TIMEOUT`] (longer is cut, see there).
pub fn wait_timeout(wait: Duration) -> Result<Duration, InvalidArgument> {
    if wait < Duration::zero() {
        return Err(InvalidArgument::new("wait_timeout", "must not be negative"));
    }
    Ok(wait.min(MAX_WAIT_TIMEOUT))
}

/// The idempotency key: at most [`MAX_REQUEST_ID`] characters; empty means
/// none (every call makes a new claim), hence `None`. A key is scoped to its
/// caller ([`IdempotencyKey`]), so no character set is imposed.
pub fn request_id(id: &str) -> Result<Option<&str>, InvalidArgument> {
    let chars = id.chars().count();
    if chars > MAX_REQUEST_ID {
        return Err(InvalidArgument::new(
            "request_id",
            format!("is {chars} characters, at most {MAX_REQUEST_ID} allowed"),
        ));
    }
    Ok((!id.is_empty()).then_some(id))
}

/// What makes two claims the same claim: the same `request_id` from the same
/// authenticated caller (another caller's equal id is another claim).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey {
    pub holder: String,
    pub request_id: String,
}

/// A `ClaimAgent` request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub selector: LabelSelector,
    pub slot_type: SlotType,
    pub lease_duration: Duration,
    pub wait_timeout: Duration,
    pub request_id: String,
}

impl ClaimRequest {
    /// Every field checked, in request order (`selector`, `lease_duration`,
    /// `wait_timeout`, `request_id`); the wait cut to [`MAX_WAIT_TIMEOUT`].
    pub fn validate(mut self, max_claim_lease: Duration) -> Result<ClaimRequest, InvalidArgument> {
        self.selector.validate()?;
        lease_duration(self.lease_duration, max_claim_lease)?;
        self.wait_timeout = wait_timeout(self.wait_timeout)?;
        request_id(&self.request_id)?;
        Ok(self)
    }

    /// The idempotency key of this request made by `holder`, if it has one.
    pub fn idempotency_key(&self, holder: &str) -> Option<IdempotencyKey> {
        (!self.request_id.is_empty()).then(|| IdempotencyKey {
            holder: holder.to_owned(),
            request_id: self.request_id.clone(),
        })
    }
}

// ---------------------------------------------------------------------------
// Choice

/// An agent as the choice sees it: the stored agent and whether it is cordoned.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub agent: &'a Agent,
    pub cordoned: bool,
}

impl Candidate<'_> {
    /// Whether a claim may take this agent: IDLE and not cordoned.
    pub fn claimable(&self) -> bool {
        !self.cordoned && self.agent.state.status == AgentStatus::Idle
    }

    /// Least recently used first: the earliest time it became IDLE (its last
    /// transition), ties broken by agent id, so the order is total.
    pub fn lru_key(&self) -> (DateTime<Utc>, &str) {
        (self.agent.last_transition_at, &self.agent.agent_id)
    }
}

/// The agent a claim takes from `candidates`: a claimable one (IDLE, not
/// cordoned) matching `selector`, idle longest (LRU: spreads work, and lets
/// an agent that just finished cool down). None: why, counted.
pub fn choose<'a>(
    selector: &LabelSelector,
    candidates: &[Candidate<'a>],
) -> Result<&'a Agent, NoAgentAvailable> {
    candidates
        .iter()
        .filter(|c| c.claimable() && selector.matches(&c.agent.labels))
        .min_by(|a, b| a.lru_key().cmp(&b.lru_key()))
        .map(|c| c.agent)
        .ok_or_else(|| NoAgentAvailable::count(selector, candidates))
}

/// Which waiting claim (`wait_timeout` > 0) a candidate that became
/// claimable goes to: the first of `waiters` (one replica's, in arrival order)
/// whose selector matches it, so that waiters are served first come, first
/// served and a waiter with a narrow selector is skipped, not a blocker.
/// `None`: nobody wants it (or it is not claimable).
pub fn waiter_for<'s>(
    waiters: impl IntoIterator<Item = &'s LabelSelector>,
    candidate: &Candidate<'_>,
) -> Option<usize> {
    if !candidate.claimable() {
        return None;
    }
    waiters
        .into_iter()
        .position(|s| s.matches(&candidate.agent.labels))
}

/// Why no agent could be claimed (RESOURCE_EXHAUSTED, reason
/// `NO_AGENT_AVAILABLE`): the agents the selector matches, each counted once:
/// cordoned ones as `cordoned` whatever their status (they will not be
/// claimed however long one waits), the others by status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoAgentAvailable {
    pub matching: usize,
    /// Schedulable matching agents per status, in [`AgentStatus::ALL`] order.
    pub by_status: [usize; 5],
    pub cordoned: usize,
    /// The earliest recovery time of the schedulable EXHAUSTED ones.
    pub earliest_recovery: Option<DateTime<Utc>>,
}

impl NoAgentAvailable {
    /// Counts the agents of `candidates` that `selector` matches.
    pub fn count(selector: &LabelSelector, candidates: &[Candidate<'_>]) -> Self {
        Self::from_counts(
            candidates
                .iter()
                .filter(|c| selector.matches(&c.agent.labels))
                .map(|c| {
                    let recovery = c.agent.state.exhaustion.as_ref();
                    (
                        c.agent.state.status,
                        c.cordoned,
                        1,
                        recovery.map(|e| e.recovery.recovery_at),
                    )
                }),
        )
    }

    /// From counts of matching agents (a store's `GROUP BY`): per status and
    /// cordon, how many, and the earliest recovery time among them. Cordoned
    /// agents count as `cordoned` whatever their status; the earliest
    /// recovery is that of schedulable EXHAUSTED agents.
    pub fn from_counts(
        rows: impl IntoIterator<Item = (AgentStatus, bool, usize, Option<DateTime<Utc>>)>,
    ) -> Self {
        let mut out = NoAgentAvailable::default();
        for (status, cordoned, n, recovery) in rows {
            out.matching += n;
            if cordoned {
                out.cordoned += n;
                continue;
            }
            let slot = AgentStatus::ALL.iter().position(|s| *s == status);
            out.by_status[slot.unwrap_or_default()] += n;
            if status == AgentStatus::Exhausted
                && let Some(at) = recovery
            {
                out.earliest_recovery = Some(out.earliest_recovery.map_or(at, |e| e.min(at)));
            }
        }
        out
    }

    pub fn of_status(&self, status: AgentStatus) -> usize {
        AgentStatus::ALL
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.by_status[i])
    }

    /// The message: "0 of 12 matching agents idle: 7 BUSY, 3 EXHAUSTED until
    /// 14:05 UTC, 2 cordoned". Statuses in the order BUSY, ON_CALL,
    /// EXHAUSTED, OFFLINE, then cordoned; zero counts left out. The recovery
    /// time is UTC, rounded up to the minute (so "until" is never early), with
    /// the date when it is not on `now`'s day.
    pub fn message(&self, now: DateTime<Utc>) -> String {
        let idle = self.of_status(AgentStatus::Idle);
        let head = format!("{idle} of {} matching agents idle", self.matching);
        if self.matching == 0 {
            return format!("{head}: no agent matches the selector");
        }
        let mut parts = Vec::new();
        for status in [
            AgentStatus::Busy,
            AgentStatus::OnCall,
            AgentStatus::Exhausted,
            AgentStatus::Offline,
        ] {
            let n = self.of_status(status);
            if n == 0 {
                continue;
            }
            match (status, self.earliest_recovery) {
                (AgentStatus::Exhausted, Some(at)) => {
                    parts.push(format!("{n} {status} until {}", until(at, now)));
                }
                _ => parts.push(format!("{n} {status}")),
            }
        }
        if self.cordoned > 0 {
            parts.push(format!("{} cordoned", self.cordoned));
        }
        format!("{head}: {}", parts.join(", "))
    }
}

/// `at` for a message: "14:05 UTC", or "2026-12-08 14:05 UTC" on another
/// day than `now`; rounded up to the minute.
fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let floor = at.duration_trunc(Duration::minutes(1)).unwrap_or(at);
    let up = if floor < at {
        floor + Duration::minutes(1)
    } else {
        floor
    };
    if up.date_naive() == now.date_naive() {
        up.format("%H:%M UTC").to_string()
    } else {
        up.format("%Y-%m-%d %H:%M UTC").to_string()
    }
}

// ---------------------------------------------------------------------------
// Claims, leases and fencing

/// The lease runs over `[claimed_at, lease_expires_at)`: at its expiry
/// instant the claim is over for everyone (holder and sweeper alike).
pub fn lease_expired(claim: &Claim, now: DateTime<Utc>) -> bool {
    now >= claim.lease_expires_at
}

/// The expiry of a lease of `lease` starting at `now` (saturating far in the future).
pub fn lease_end(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now.checked_add_signed(lease)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A new claim on `agent_id`, made by `holder` at `now`. Its fencing token is
/// the revision of its CLAIMED transition: revisions are global, strictly
/// increasing and allocated in the transaction that commits the claim, so
/// each claim of an agent gets a larger token than every earlier one (of any
/// agent even, and of an agent deleted and registered again) with no
/// counter of its own.
pub fn new_claim(
    claim_id: String,
    agent_id: &str,
    claim_revision: i64,
    request: &ClaimRequest,
    holder: String,
    now: DateTime<Utc>,
) -> Claim {
    Claim {
        claim_id,
        agent_id: agent_id.to_owned(),
        fencing_token: claim_revision,
        slot_type: request.slot_type,
        holder,
        request_id: request.request_id.clone(),
        claimed_at: now,
        lease_expires_at: lease_end(now, request.lease_duration),
    }
}

/// `RenewClaim`: the lease then runs `lease` from `now`, but never ends
/// earlier than it did: renewals are retried and may arrive out of order, and
/// a late short renewal must not cut a lease a later long one granted (to
/// give an agent back early there is `ReleaseClaim`). A lease already expired
/// cannot be renewed: the claim is over ([`StaleKind::LeaseExpired`]).
pub fn renew(
    claim: &Claim,
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<Claim, StaleFencingToken> {
    if lease_expired(claim, now) {
        return Err(StaleFencingToken {
            agent_id: claim.agent_id.clone(),
            presented: Some(claim.fencing_token),
            kind: StaleKind::LeaseExpired,
        });
    }
    Ok(Claim {
        lease_expires_at: claim.lease_expires_at.max(lease_end(now, lease)),
        ..claim.clone()
    })
}

/// Why a fencing token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleKind {
    /// A claim is active and the call carries no token.
    Missing,
    /// The token is older than the active claim's.
    Older { active: i64 },
    /// The token is newer than the active claim's: no such claim was ever
    /// made on this agent (tokens come from the agent's own claims, and the
    /// active one is its latest), so it is forged or meant for another agent.
    Unknown { active: i64 },
    /// The call carries a token but the agent has no active claim: the claim
    /// it names was released or expired.
    NoActiveClaim,
    /// The claim's lease ran out, even if the sweeper has not recorded it yet.
    LeaseExpired,
    /// A claim-addressed call names a claim that is not the agent's active one.
    ClaimEnded,
}

/// FAILED_PRECONDITION, reason `STALE_FENCING_TOKEN`: the call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct StaleFencingToken {
    pub agent_id: String,
    /// The token the call carried.
    pub presented: Option<i64>,
    pub kind: StaleKind,
}

impl StaleFencingToken {
    fn describe(&self) -> String {
        let agent = &self.agent_id;
        let token = self.presented.map_or_else(
            || "no fencing token".to_owned(),
            |t| format!("fencing token {t}"),
        );
        match self.kind {
            StaleKind::Missing => {
                format!("agent {agent:?} is claimed; the claim's fencing token is required")
            }
            StaleKind::Older { active } => {
                format!("{token} is stale: agent {agent:?} is claimed with fencing token {active}")
            }
            StaleKind::Unknown { active } => format!(
                "{token} was never issued for agent {agent:?}: its claim has fencing token {active}"
            ),
            StaleKind::NoActiveClaim => {
                format!("{token} is stale: agent {agent:?} has no active claim")
            }
            StaleKind::LeaseExpired => {
                format!("{token} is stale: the lease of its claim on agent {agent:?} has expired")
            }
            StaleKind::ClaimEnded => {
                format!("{token} is stale: its claim on agent {agent:?} has ended")
            }
        }
    }
}

/// The fencing check of `FinishWork` and `ReportExhausted` on `agent_id`,
/// whose active claim (as stored) is `active`, with the token the call
/// carries. Accepted: no claim and no token (an unclaimed agent, as before
/// dispatch), or the active claim's own token while its lease runs. Refused:
/// no token while a claim is active; an older or newer token; a token while
/// no claim is active (its claim ended); the right token after the lease
/// expired but before the sweeper freed the agent (expiry is an instant, not
/// whenever the sweeper gets to it).
pub fn check_fencing(
    agent_id: &str,
    active: Option<&Claim>,
    presented: Option<i64>,
    now: DateTime<Utc>,
) -> Result<(), StaleFencingToken> {
    let refuse = |kind| StaleFencingToken {
        agent_id: agent_id.to_owned(),
        presented,
        kind,
    };
    match (active, presented) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(refuse(StaleKind::NoActiveClaim)),
        (Some(_), None) => Err(refuse(StaleKind::Missing)),
        (Some(claim), Some(token)) => {
            let active = claim.fencing_token;
            if token < active {
                Err(refuse(StaleKind::Older { active }))
            } else if token > active {
                Err(refuse(StaleKind::Unknown { active }))
            } else if lease_expired(claim, now) {
                Err(refuse(StaleKind::LeaseExpired))
            } else {
                Ok(())
            }
        }
    }
}

/// The check of `RenewClaim` and `ReleaseClaim`, which name a claim (known
/// to exist: an unknown `claim_id` is NOT_FOUND, the store's answer) and
/// carry its token, on an agent whose active claim is `active`: the named
/// claim must be the active one, then [`check_fencing`] applies.
pub fn check_claim_call(
    agent_id: &str,
    active: Option<&Claim>,
    claim_id: &str,
    presented: i64,
    now: DateTime<Utc>,
) -> Result<(), StaleFencingToken> {
    match active {
        Some(claim) if claim.claim_id == claim_id => {
            check_fencing(agent_id, active, Some(presented), now)
        }
        _ => Err(StaleFencingToken {
            agent_id: agent_id.to_owned(),
            presented: Some(presented),
            kind: StaleKind::ClaimEnded,
        }),
    }
}

/// Whether a status change ends the agent's claim: any that leaves BUSY or
/// ON_CALL (finished, released, expired, exhausted, offline by a call or by
/// silence). A claim lives exactly as long as the work it took.
pub fn ends_claim(from: AgentStatus, to: AgentStatus) -> bool {
    let working = |s| matches!(s, AgentStatus::Busy | AgentStatus::OnCall);
    working(from) && !working(to)
}

// ---------------------------------------------------------------------------
// Decisions

/// A status change made by dispatch, with its own cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchDecision {
    pub state: AgentState,
    pub from: AgentStatus,
    pub to: AgentStatus,
    pub cause: Cause,
}

fn relabel(decision: Decision, cause: Cause) -> DispatchDecision {
    let change = decision
        .change
        .expect("the state machine changes status here");
    DispatchDecision {
        state: decision.state,
        from: change.from,
        to: change.to,
        cause,
    }
}

/// The claim's transition: exactly `StartWork(slot)` of the state machine
/// (IDLE only), recorded with cause CLAIMED.
pub fn claim_decision(
    state: &AgentState,
    labels: &Labels,
    slot: SlotType,
    now: DateTime<Utc>,
) -> Result<DispatchDecision, TransitionRefused> {
    agent::decide(state, labels, Event::StartWork(slot), now).map(|d| relabel(d, Cause::Claimed))
}

/// A claim's end by `ReleaseClaim` (CLAIM_RELEASED) or by its lease
/// (CLAIM_EXPIRED): exactly `FinishWork` of the state machine.
pub fn claim_end_decision(
    state: &AgentState,
    labels: &Labels,
    cause: ClaimEnd,
    now: DateTime<Utc>,
) -> Result<DispatchDecision, TransitionRefused> {
    let cause = match cause {
        ClaimEnd::Released => Cause::ClaimReleased,
        ClaimEnd::Expired => Cause::ClaimExpired,
    };
    agent::decide(state, labels, Event::FinishWork, now).map(|d| relabel(d, cause))
}

/// How a claim ends by dispatch itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimEnd {
    Released,
    Expired,
}

// ---------------------------------------------------------------------------
// Operator overrides

/// `ResumeAgent`: an EXHAUSTED agent back to IDLE now, its exhaustion
/// forgotten (cause RESUMED). Any other status is refused naming it ("cannot
/// resume: agent is BUSY, must be EXHAUSTED"); an OFFLINE agent parked
/// before it went silent is refused too: it is not there to take work.
pub fn resume_decision(state: &AgentState) -> Result<DispatchDecision, TransitionRefused> {
    if state.status != AgentStatus::Exhausted {
        return Err(TransitionRefused {
            action: "resume",
            current: state.status,
            required: "EXHAUSTED",
        });
    }
    Ok(DispatchDecision {
        state: AgentState {
            status: AgentStatus::Idle,
            last_heartbeat_at: state.last_heartbeat_at,
            exhaustion: None,
        },
        from: AgentStatus::Exhausted,
        to: AgentStatus::Idle,
        cause: Cause::Resumed,
    })
}

/// What `CordonAgent` (`cordon` true) or `UncordonAgent` does to an agent
/// whose cordon is `current` (`None`: schedulable): the cause of the one
/// transition it makes (from and to its current status), or `None` when it
/// is already as asked. Cordoning a cordoned agent changes nothing, its first
/// reason included (idempotent, like re-registration): uncordon first to
/// give another.
pub fn cordon_decision(current: Option<&str>, cordon: bool) -> Option<Cause> {
    match (current.is_some(), cordon) {
        (false, true) => Some(Cause::Cordoned),
        (true, false) => Some(Cause::Uncordoned),
        (true, true) | (false, false) => None,
    }
}

/// `DeleteAgent` on an agent holding a live claim: FAILED_PRECONDITION.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot delete agent {agent_id:?}: it is claimed by {holder:?} (claim {claim_id}) until {lease_expires_at}; release the claim first"
)]
pub struct ClaimHeld {
    pub agent_id: String,
    pub claim_id: String,
    pub holder: String,
    pub lease_expires_at: DateTime<Utc>,
}

/// Whether an agent may be deleted: not while its claim's lease runs. A
/// claim whose lease has expired no longer holds the agent (as for
/// fencing); the store ends it with the deletion.
pub fn check_delete(active: Option<&Claim>, now: DateTime<Utc>) -> Result<(), ClaimHeld> {
    match active {
        Some(claim) if !lease_expired(claim, now) => Err(ClaimHeld {
            agent_id: claim.agent_id.clone(),
            claim_id: claim.claim_id.clone(),
            holder: claim.holder.clone(),
            lease_expires_at: claim.lease_expires_at,
        }),
        _ => Ok(()),
    }
}

/// Whether the sweeper deletes `agent` (cause EXPIRED) at `now`: OFFLINE
/// for strictly longer than `retention` since it went OFFLINE (its last
/// transition). A zero (or negative) retention keeps agents forever.
pub fn offline_expired(agent: &Agent, retention: Duration, now: DateTime<Utc>) -> bool {
    agent.state.status == AgentStatus::Offline
        && retention > Duration::zero()
        && now.signed_duration_since(agent.last_transition_at) > retention
}

/// What the sweeper asks the store for: OFFLINE agents whose last transition
/// is before this instant (`None`: retention off). Agrees with [`offline_expired`].
pub fn offline_expiry_cutoff(retention: Duration, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (retention > Duration::zero())
        .then(|| now.checked_sub_signed(retention))
        .flatten()
}

#[cfg(test)]
mod tests;
