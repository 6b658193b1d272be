//! Self-healing for agent errors: classify an error, score how bad it is, and
//! plan a recovery that learns from past outcomes.
//!
//! Everything here is pure: no I/O, no clock, and randomness only through the
//! RNG the caller passes in, so the store and the gRPC layer decide what is
//! persisted and tests can replay any decision with a seeded RNG.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rand_distr::{Beta, Distribution};

/// Free-form key/value context attached to an error report. A `BTreeMap` so
/// that iteration order (and hence anything derived from it) is deterministic.
pub type Context = BTreeMap<String, String>;

/// Severity at or above which an error is treated as critical.
pub const CRITICAL_SEVERITY: f64 = 0.8;

/// Number of same-type events for one agent within [`RECURRENCE_WINDOW`] (the
/// current one included) at which an error counts as recurring.
pub const RECURRING_COUNT: i64 = 3;

/// How far back same-type events count towards [`RECURRING_COUNT`].
pub const RECURRENCE_WINDOW: Duration = Duration::hours(1);

/// Context keys that identify "the same kind" of error for learning purposes.
/// Kept sorted; [`context_signature`] sorts anyway so order here is not load-bearing.
pub const PATTERN_CONTEXT_KEYS: &[&str] = &["component", "operation", "provider", "tool"];

/// Longest value (in characters) kept per key in a context signature, so a
/// pathological value cannot blow up the store's index on the signature.
pub const SIGNATURE_VALUE_MAX_CHARS: usize = 64;

/// `Plan::reason` when nothing was learned yet and the heuristic was used as is.
pub const REASON_HEURISTIC: &str = "heuristic";
/// `Plan::reason` when Thompson sampling over learned evidence picked the strategy.
pub const REASON_LEARNED: &str = "learned";
/// `Plan::reason` when the safety gate replaced a too-risky choice with ESCALATE.
pub const REASON_HIGH_RISK: &str = "high_risk_recovery";
/// `Plan::reason` when every candidate's breaker was open and the plan went
/// to a person (ESCALATE) instead: a breaker never fails open.
pub const REASON_BREAKER_OPEN: &str = "breakers_open";

/// Case-insensitive, whitespace-tolerant lookup of a variant by its wire name.
/// Shared by every `parse` so that all enums accept the same spellings.
fn parse_by_name<T: Copy>(all: &[T], name_of: impl Fn(T) -> &'static str, s: &str) -> Option<T> {
    let s = s.trim();
    all.iter()
        .copied()
        .find(|v| name_of(*v).eq_ignore_ascii_case(s))
}

/// What went wrong, coarsely. Names match the Python seed's wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorType {
    ExecutionFailure,
    ResourceExhaustion,
    GoalConflict,
    CommunicationError,
    PerformanceDegradation,
    SafetyViolation,
    DependencyFailure,
    ConfigurationError,
    LearningFailure,
    Unknown,
}

impl ErrorType {
    pub const ALL: [ErrorType; 10] = [
        ErrorType::ExecutionFailure,
        ErrorType::ResourceExhaustion,
        ErrorType::GoalConflict,
        ErrorType::CommunicationError,
        ErrorType::PerformanceDegradation,
        ErrorType::SafetyViolation,
        ErrorType::DependencyFailure,
        ErrorType::ConfigurationError,
        ErrorType::LearningFailure,
        ErrorType::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::ExecutionFailure => "EXECUTION_FAILURE",
            ErrorType::ResourceExhaustion => "RESOURCE_EXHAUSTION",
            ErrorType::GoalConflict => "GOAL_CONFLICT",
            ErrorType::CommunicationError => "COMMUNICATION_ERROR",
            ErrorType::PerformanceDegradation => "PERFORMANCE_DEGRADATION",
            ErrorType::SafetyViolation => "SAFETY_VIOLATION",
            ErrorType::DependencyFailure => "DEPENDENCY_FAILURE",
            ErrorType::ConfigurationError => "CONFIGURATION_ERROR",
            ErrorType::LearningFailure => "LEARNING_FAILURE",
            ErrorType::Unknown => "UNKNOWN",
        }
    }

    /// Accepts the wire name in any ASCII case, surrounding whitespace ignored.
    pub fn parse(s: &str) -> Option<Self> {
        parse_by_name(&Self::ALL, Self::as_str, s)
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keyword table for [`classify`]. Order matters: the first row with a
/// matching keyword wins, so e.g. "timeout ... limit" is resource exhaustion.
const CLASSIFY_RULES: &[(&[&str], ErrorType)] = &[
    (
        &["resource", "limit", "exhausted"],
        ErrorType::ResourceExhaustion,
    ),
    (
        &["connection", "timeout", "network"],
        ErrorType::CommunicationError,
    ),
    (&["conflict", "goal"], ErrorType::GoalConflict),
    (&["performance", "slow"], ErrorType::PerformanceDegradation),
    (&["safety", "violation"], ErrorType::SafetyViolation),
    (&["config", "setting"], ErrorType::ConfigurationError),
    (&["execution", "failed"], ErrorType::ExecutionFailure),
];

/// Classify an error. A caller-supplied hint always wins (the agent usually
/// knows better than keyword matching); otherwise the lower-cased message is
/// matched by substring against [`CLASSIFY_RULES`] in order, like the seed did.
pub fn classify(message: &str, hint: Option<ErrorType>) -> ErrorType {
    if let Some(hint) = hint {
        return hint;
    }
    let lower = message.to_lowercase();
    CLASSIFY_RULES
        .iter()
        .find(|(keywords, _)| keywords.iter().any(|k| lower.contains(k)))
        .map_or(ErrorType::Unknown, |(_, t)| *t)
}

fn base_severity(error_type: ErrorType) -> f64 {
    match error_type {
        ErrorType::SafetyViolation => 0.9,
        ErrorType::ResourceExhaustion => 0.7,
        ErrorType::GoalConflict | ErrorType::DependencyFailure => 0.6,
        ErrorType::ExecutionFailure | ErrorType::ConfigurationError | ErrorType::Unknown => 0.5,
        ErrorType::PerformanceDegradation => 0.4,
        ErrorType::CommunicationError | ErrorType::LearningFailure => 0.3,
    }
}

/// Truthy flag values as agents send them ("true", "1", "yes"; any case).
fn is_truthy(value: &str) -> bool {
    let v = value.trim();
    ["true", "1", "yes"]
        .iter()
        .any(|t| v.eq_ignore_ascii_case(t))
}

/// Severity in [0, 1]: a per-type base, raised for errors in critical
/// operations (x1.5) and for errors that already burned several retries (x1.2).
pub fn severity(error_type: ErrorType, context: &Context) -> f64 {
    let mut s = base_severity(error_type);
    if context
        .get("critical_operation")
        .is_some_and(|v| is_truthy(v))
    {
        s *= 1.5;
    }
    // Unparseable retry counts are ignored rather than treated as an error:
    // the context is agent-supplied and best effort.
    if context
        .get("retry_count")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|n| n > 3)
    {
        s *= 1.2;
    }
    s.min(1.0)
}

/// NaN is not critical: a broken score must not page anyone by itself.
pub fn is_critical(severity: f64) -> bool {
    severity >= CRITICAL_SEVERITY
}

pub fn is_recurring(same_type_events_in_window_including_this: i64) -> bool {
    same_type_events_in_window_including_this >= RECURRING_COUNT
}

/// The instants whose same-type events count towards the recurrence of an
/// event at `at`: `after < occurred_at <= until`. The store counts the agent's
/// stored events of the type in these bounds; [`recurring_given`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecurrenceWindow {
    /// Exclusive lower bound.
    pub after: DateTime<Utc>,
    /// Inclusive upper bound: the event's own time.
    pub until: DateTime<Utc>,
}

impl RecurrenceWindow {
    /// Whether an event at `t` counts (what the store's count query computes).
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.after < t && t <= self.until
    }
}

/// The recurrence window of an event at `at` (saturating at the earliest
/// representable instant rather than panicking).
pub fn recurrence_window(at: DateTime<Utc>) -> RecurrenceWindow {
    RecurrenceWindow {
        after: at
            .checked_sub_signed(RECURRENCE_WINDOW)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
        until: at,
    }
}

/// Whether an event is recurring, given how many stored same-type events of
/// its agent fall in its [`recurrence_window`] (the event itself not counted).
pub fn recurring_given(earlier_in_window: i64) -> bool {
    is_recurring(earlier_in_window.saturating_add(1))
}

/// A recovery action the control plane can ask an agent runtime to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    Retry,
    Rollback,
    Reconfigure,
    Restart,
    Isolate,
    Escalate,
    Compensate,
    DegradeGracefully,
    WaitAndRetry,
    AlternativePath,
}

impl Strategy {
    pub const ALL: [Strategy; 10] = [
        Strategy::Retry,
        Strategy::Rollback,
        Strategy::Reconfigure,
        Strategy::Restart,
        Strategy::Isolate,
        Strategy::Escalate,
        Strategy::Compensate,
        Strategy::DegradeGracefully,
        Strategy::WaitAndRetry,
        Strategy::AlternativePath,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Retry => "RETRY",
            Strategy::Rollback => "ROLLBACK",
            Strategy::Reconfigure => "RECONFIGURE",
            Strategy::Restart => "RESTART",
            Strategy::Isolate => "ISOLATE",
            Strategy::Escalate => "ESCALATE",
            Strategy::Compensate => "COMPENSATE",
            Strategy::DegradeGracefully => "DEGRADE_GRACEFULLY",
            Strategy::WaitAndRetry => "WAIT_AND_RETRY",
            Strategy::AlternativePath => "ALTERNATIVE_PATH",
        }
    }

    /// Accepts the wire name in any ASCII case, surrounding whitespace ignored.
    pub fn parse(s: &str) -> Option<Self> {
        parse_by_name(&Self::ALL, Self::as_str, s)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Static description of a strategy before anything is learned about it.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyProfile {
    pub parameters: Context,
    pub estimated_duration: chrono::Duration,
    /// Prior belief in success; seeds the Beta prior in [`plan`].
    pub success_probability: f64,
    /// Risk of the action itself (side effects, lost work), before multipliers.
    pub base_risk: f64,
}

fn params(pairs: &[(&str, &str)]) -> Context {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Default parameters, duration, prior success and risk per strategy.
/// Durations and probabilities are judgement calls: cheap, local actions are
/// quick but less likely to fix things; human escalation is slow but reliable.
pub fn profile(strategy: Strategy) -> StrategyProfile {
    let (parameters, secs, success_probability, base_risk) = match strategy {
        Strategy::Retry => (
            params(&[("max_attempts", "3"), ("backoff_seconds", "5")]),
            30,
            0.6,
            0.2,
        ),
        Strategy::Rollback => (
            params(&[("target", "last_checkpoint"), ("preserve_logs", "true")]),
            120,
            0.7,
            0.3,
        ),
        Strategy::Reconfigure => (params(&[("scale_factor", "0.7")]), 180, 0.65, 0.4),
        Strategy::Restart => (
            params(&[("graceful", "true"), ("timeout_seconds", "60")]),
            120,
            0.75,
            0.5,
        ),
        Strategy::Isolate => (
            params(&[("quarantine", "true"), ("duration_minutes", "30")]),
            60,
            0.8,
            0.2,
        ),
        Strategy::Escalate => (
            params(&[("priority", "high"), ("notify", "true")]),
            300,
            0.9,
            0.1,
        ),
        Strategy::Compensate => (
            params(&[("mode", "undo_side_effects"), ("max_steps", "10")]),
            300,
            0.55,
            0.5,
        ),
        Strategy::DegradeGracefully => (
            params(&[("mode", "reduced_capability"), ("capacity_factor", "0.5")]),
            60,
            0.7,
            0.3,
        ),
        // Two waits of 30 s plus the work itself.
        Strategy::WaitAndRetry => (
            params(&[("wait_seconds", "30"), ("max_attempts", "2")]),
            90,
            0.65,
            0.2,
        ),
        Strategy::AlternativePath => (
            params(&[("max_alternatives", "2"), ("prefer", "fallback_provider")]),
            180,
            0.6,
            0.4,
        ),
    };
    StrategyProfile {
        parameters,
        estimated_duration: chrono::Duration::seconds(secs),
        success_probability,
        base_risk,
    }
}

/// What to do when nothing has been learned yet (the seed's rule table).
pub fn heuristic_strategy(error_type: ErrorType, critical: bool) -> Strategy {
    match error_type {
        ErrorType::ExecutionFailure => Strategy::Retry,
        ErrorType::ResourceExhaustion => Strategy::Reconfigure,
        ErrorType::CommunicationError => Strategy::WaitAndRetry,
        ErrorType::SafetyViolation => Strategy::Isolate,
        ErrorType::GoalConflict => Strategy::Rollback,
        _ if critical => Strategy::Escalate,
        _ => Strategy::Retry,
    }
}

/// Alternatives always worth exploring for a type, even with no evidence yet,
/// so the learner can discover them without someone first trying them by hand.
pub fn seeded_strategies(error_type: ErrorType) -> &'static [Strategy] {
    match error_type {
        ErrorType::ExecutionFailure => &[Strategy::Retry, Strategy::WaitAndRetry],
        ErrorType::ResourceExhaustion => &[Strategy::Reconfigure, Strategy::DegradeGracefully],
        ErrorType::CommunicationError => &[Strategy::Retry, Strategy::AlternativePath],
        _ => &[],
    }
}

/// Stable key for "the same kind of error": only the identifying context keys,
/// sorted, so unrelated context (request ids, timestamps) does not split the
/// evidence. Empty when none of the keys is present.
pub fn context_signature(context: &Context) -> String {
    let mut keys: Vec<&str> = PATTERN_CONTEXT_KEYS.to_vec();
    keys.sort_unstable();
    keys.iter()
        .filter_map(|k| {
            context.get(*k).map(|v| {
                // Truncate by chars, not bytes, so multi-byte values never split.
                let v: String = v.trim().chars().take(SIGNATURE_VALUE_MAX_CHARS).collect();
                format!("{k}={v}")
            })
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Evidence learned for one strategy for one (error type, context signature).
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub strategy: Strategy,
    pub successes: i64,
    pub failures: i64,
    /// Sum of recovery times over all uses (successful or not).
    pub total_recovery_secs: f64,
}

impl Evidence {
    /// Total recorded uses. Negative counts (corrupt rows) count as zero and the
    /// sum saturates, so this never panics or goes negative.
    pub fn uses(&self) -> i64 {
        self.successes.max(0).saturating_add(self.failures.max(0))
    }

    /// Mean time per use. Every attempt costs time whether it worked or not, so
    /// the mean is over all uses. `None` with no uses or a nonsensical total.
    pub fn mean_recovery_secs(&self) -> Option<f64> {
        let uses = self.uses();
        if uses <= 0 || !self.total_recovery_secs.is_finite() || self.total_recovery_secs < 0.0 {
            return None;
        }
        Some(self.total_recovery_secs / uses as f64)
    }
}

/// Knobs for [`plan`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannerConfig {
    /// Risk above which the chosen strategy is replaced by ESCALATE.
    pub safety_limit: f64,
    /// Weight of the profile's default success probability, in pseudo-observations.
    pub prior_strength: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            safety_limit: 0.7,
            prior_strength: 2.0,
        }
    }
}

pub struct PlanInput<'a> {
    pub error_type: ErrorType,
    pub critical: bool,
    pub recurring: bool,
    /// Evidence for this (error type, context signature); any order, duplicates summed.
    pub evidence: &'a [Evidence],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Final strategy (ESCALATE when the safety gate tripped).
    pub strategy: Strategy,
    /// What the learner picked before the gate.
    pub chosen: Strategy,
    pub parameters: Context,
    /// Learned mean recovery time of `chosen` if it has evidence, else its profile's.
    pub estimated_duration: chrono::Duration,
    /// Posterior mean success probability of `chosen`.
    pub success_probability: f64,
    /// Risk of `chosen`: base x1.3 if critical, x1.2 if recurring, capped at 1.0.
    pub risk: f64,
    pub escalated: bool,
    /// [`REASON_HEURISTIC`], [`REASON_LEARNED`] or [`REASON_HIGH_RISK`].
    pub reason: String,
}

/// Risk of running `strategy` for an error with these flags, in [0, 1].
pub fn risk(strategy: Strategy, critical: bool, recurring: bool) -> f64 {
    let mut r = profile(strategy).base_risk;
    if critical {
        r *= 1.3;
    }
    if recurring {
        r *= 1.2;
    }
    r.min(1.0)
}

/// Bounds on Beta parameters. Below the floor the distribution degenerates
/// (and `Beta::new` rejects 0); above the ceiling the posterior is a point mass
/// for all practical purposes, and huge parameters only risk numeric trouble
/// in the sampler. Scaling keeps the ratio, i.e. the posterior mean.
const BETA_PARAM_FLOOR: f64 = 1e-3;
const BETA_PARAM_CEILING: f64 = 1e6;

/// Beta posterior of one candidate.
#[derive(Debug, Clone, Copy)]
struct Posterior {
    alpha: f64,
    beta: f64,
}

impl Posterior {
    fn new(prior_strength: f64, prior_p: f64, successes: i64, failures: i64) -> Self {
        let mut alpha = prior_strength * prior_p + successes.max(0) as f64;
        let mut beta = prior_strength * (1.0 - prior_p) + failures.max(0) as f64;
        let total = alpha + beta;
        if total > BETA_PARAM_CEILING {
            let scale = BETA_PARAM_CEILING / total;
            alpha *= scale;
            beta *= scale;
        }
        Posterior {
            alpha: alpha.max(BETA_PARAM_FLOOR),
            beta: beta.max(BETA_PARAM_FLOOR),
        }
    }

    fn mean(self) -> f64 {
        (self.alpha / (self.alpha + self.beta)).clamp(0.0, 1.0)
    }

    /// One Thompson draw; falls back to the mean if the sampler ever refuses,
    /// so a numeric corner case degrades to greedy choice instead of panicking.
    fn sample(self, rng: &mut impl Rng) -> f64 {
        match Beta::new(self.alpha, self.beta) {
            Ok(dist) => {
                let x = dist.sample(rng);
                if x.is_finite() { x } else { self.mean() }
            }
            Err(_) => self.mean(),
        }
    }
}

fn sanitized(config: &PlannerConfig) -> PlannerConfig {
    let default = PlannerConfig::default();
    PlannerConfig {
        // A NaN limit would make `risk > limit` always false, silently
        // disabling the gate; fall back to the default instead.
        safety_limit: if config.safety_limit.is_nan() {
            default.safety_limit
        } else {
            config.safety_limit
        },
        prior_strength: if config.prior_strength.is_finite() && config.prior_strength >= 0.0 {
            config.prior_strength
        } else {
            default.prior_strength
        },
    }
}

/// Plan a recovery.
///
/// Candidates: the heuristic strategy, the seeded alternatives for the type,
/// and every strategy with evidence. Each has a Beta posterior whose prior is
/// `prior_strength` pseudo-observations at the profile's success probability.
///
/// Favouring the heuristic (documented choice): on a cold start — no candidate
/// has any recorded use — the heuristic is returned deterministically, so a
/// fresh fleet behaves exactly like the seed's rule table and the RNG is not
/// consumed. Once any evidence exists, Thompson sampling picks the candidate
/// with the highest posterior draw; the heuristic is listed first and only a
/// strictly higher draw displaces a candidate, so exact ties go to it.
///
/// Then the safety gate: if the chosen strategy's risk exceeds the safety
/// limit, the plan becomes ESCALATE with escalate's parameters.
pub fn plan(input: &PlanInput, config: &PlannerConfig, rng: &mut impl Rng) -> Plan {
    plan_around(input, config, rng, &[])
}

/// [`plan`] without the strategies in `closed_off` (those whose breaker is
/// open, `domain::brakes`): the next best candidate takes a closed-off one's
/// place (on a cold start, the next in the heuristic's order; with evidence,
/// the best draw among the rest); with none left the plan is ESCALATE
/// ([`REASON_BREAKER_OPEN`]). ESCALATE is never closed off.
pub fn plan_around(
    input: &PlanInput,
    config: &PlannerConfig,
    rng: &mut impl Rng,
    closed_off: &[Strategy],
) -> Plan {
    let config = sanitized(config);
    let heuristic = heuristic_strategy(input.error_type, input.critical);

    // Merge duplicate rows per strategy so a store that returns one row per
    // day (or a buggy one returning duplicates) still counts every outcome.
    let mut merged: BTreeMap<Strategy, Evidence> = BTreeMap::new();
    for e in input.evidence {
        let m = merged.entry(e.strategy).or_insert(Evidence {
            strategy: e.strategy,
            successes: 0,
            failures: 0,
            total_recovery_secs: 0.0,
        });
        m.successes = m.successes.saturating_add(e.successes.max(0));
        m.failures = m.failures.saturating_add(e.failures.max(0));
        m.total_recovery_secs += e.total_recovery_secs;
    }

    // Candidate order matters only for tie-breaking: heuristic first.
    let mut candidates = vec![heuristic];
    for s in seeded_strategies(input.error_type)
        .iter()
        .copied()
        .chain(merged.keys().copied())
    {
        if !candidates.contains(&s) {
            candidates.push(s);
        }
    }

    let posterior = |s: Strategy| {
        let (succ, fail) = merged.get(&s).map_or((0, 0), |e| (e.successes, e.failures));
        Posterior::new(
            config.prior_strength,
            profile(s).success_probability,
            succ,
            fail,
        )
    };

    candidates.retain(|s| *s == Strategy::Escalate || !closed_off.contains(s));
    let Some(&first) = candidates.first() else {
        let escalate = profile(Strategy::Escalate);
        return Plan {
            strategy: Strategy::Escalate,
            chosen: Strategy::Escalate,
            parameters: escalate.parameters,
            estimated_duration: escalate.estimated_duration,
            success_probability: posterior(Strategy::Escalate).mean(),
            risk: risk(Strategy::Escalate, input.critical, input.recurring),
            escalated: true,
            reason: REASON_BREAKER_OPEN.to_owned(),
        };
    };
    let learned = candidates
        .iter()
        .any(|s| merged.get(s).is_some_and(|e| e.uses() > 0));
    let chosen = if learned {
        let mut best = first;
        let mut best_draw = f64::NEG_INFINITY;
        for &s in &candidates {
            let draw = posterior(s).sample(rng);
            if draw > best_draw {
                best = s;
                best_draw = draw;
            }
        }
        best
    } else {
        first
    };

    let chosen_profile = profile(chosen);
    let risk = risk(chosen, input.critical, input.recurring);
    let estimated_duration = merged
        .get(&chosen)
        .and_then(Evidence::mean_recovery_secs)
        .and_then(duration_from_secs)
        .unwrap_or(chosen_profile.estimated_duration);
    let success_probability = posterior(chosen).mean();

    let gated = risk > config.safety_limit && chosen != Strategy::Escalate;
    let (strategy, parameters, reason) = if gated {
        (
            Strategy::Escalate,
            profile(Strategy::Escalate).parameters,
            REASON_HIGH_RISK,
        )
    } else {
        (
            chosen,
            chosen_profile.parameters,
            if learned {
                REASON_LEARNED
            } else {
                REASON_HEURISTIC
            },
        )
    };

    Plan {
        strategy,
        chosen,
        parameters,
        estimated_duration,
        success_probability,
        risk,
        // Any plan that ends in ESCALATE hands the problem to a human, whether
        // the gate forced it or the heuristic/learner picked it.
        escalated: strategy == Strategy::Escalate,
        reason: reason.to_owned(),
    }
}

/// Seconds to a `Duration`, refusing values a `Duration` cannot hold.
fn duration_from_secs(secs: f64) -> Option<chrono::Duration> {
    // Cap well inside chrono's range; a learned mean beyond a year is garbage anyway.
    const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;
    if !secs.is_finite() || !(0.0..=MAX_SECS).contains(&secs) {
        return None;
    }
    chrono::Duration::try_milliseconds((secs * 1000.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    // Not the prelude glob: it would shadow our `Strategy` with proptest's trait.
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as PropStrategy;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        params(pairs)
    }

    fn approx(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn closed_off_strategies_give_way_to_the_next_best_and_with_none_left_a_person() {
        let config = PlannerConfig::default();
        let mut rng = StdRng::seed_from_u64(3);
        let input = PlanInput {
            error_type: ErrorType::CommunicationError,
            critical: false,
            recurring: false,
            evidence: &[],
        };
        let open = plan(&input, &config, &mut rng);
        let heuristic = open.strategy;
        let around = plan_around(&input, &config, &mut rng, &[heuristic]);
        assert_ne!(around.strategy, heuristic);
        // A cold start takes the next candidate in the seeded order.
        let next = seeded_strategies(ErrorType::CommunicationError)
            .iter()
            .copied()
            .find(|s| *s != heuristic)
            .unwrap();
        assert_eq!(around.chosen, next);
        // Every breakered candidate closed off: ESCALATE (never the open one).
        let all: Vec<Strategy> = Strategy::ALL
            .into_iter()
            .filter(|s| *s != Strategy::Escalate)
            .collect();
        let none = plan_around(&input, &config, &mut rng, &all);
        assert_eq!(none.strategy, Strategy::Escalate);
        assert!(none.escalated);
        let learned = [Evidence {
            strategy: heuristic,
            successes: 50,
            failures: 0,
            total_recovery_secs: 50.0,
        }];
        let with_evidence = PlanInput {
            evidence: &learned,
            ..input
        };
        for _ in 0..20 {
            let p = plan_around(&with_evidence, &config, &mut rng, &[heuristic]);
            assert_ne!(p.chosen, heuristic);
        }
    }

    #[test]
    fn enum_names_round_trip() {
        for t in ErrorType::ALL {
            assert_eq!(ErrorType::parse(t.as_str()), Some(t));
            assert_eq!(ErrorType::parse(&t.as_str().to_lowercase()), Some(t));
        }
        for s in Strategy::ALL {
            assert_eq!(Strategy::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            Strategy::parse("DEGRADE_GRACEFULLY"),
            Some(Strategy::DegradeGracefully)
        );
        assert_eq!(Strategy::parse("nope"), None);
        assert_eq!(ErrorType::parse(""), None);
    }

    #[test]
    fn classification_follows_keyword_order() {
        let cases = [
            ("Resource quota hit", ErrorType::ResourceExhaustion),
            ("rate LIMIT reached", ErrorType::ResourceExhaustion),
            ("memory exhausted", ErrorType::ResourceExhaustion),
            ("connection reset", ErrorType::CommunicationError),
            ("request timeout", ErrorType::CommunicationError),
            ("network unreachable", ErrorType::CommunicationError),
            ("goal conflict detected", ErrorType::GoalConflict),
            ("slow response", ErrorType::PerformanceDegradation),
            ("safety check", ErrorType::SafetyViolation),
            ("policy violation", ErrorType::SafetyViolation),
            ("bad config value", ErrorType::ConfigurationError),
            ("setting missing", ErrorType::ConfigurationError),
            ("tool execution error", ErrorType::ExecutionFailure),
            ("step failed", ErrorType::ExecutionFailure),
            ("something odd", ErrorType::Unknown),
            ("", ErrorType::Unknown),
        ];
        for (msg, want) in cases {
            assert_eq!(classify(msg, None), want, "{msg}");
        }
        // Precedence: resource rules come before communication rules.
        assert_eq!(
            classify("timeout while waiting for limit", None),
            ErrorType::ResourceExhaustion
        );
        // ... and communication before execution.
        assert_eq!(
            classify("failed: connection refused", None),
            ErrorType::CommunicationError
        );
    }

    #[test]
    fn hint_wins() {
        assert_eq!(
            classify("memory exhausted", Some(ErrorType::LearningFailure)),
            ErrorType::LearningFailure
        );
        assert_eq!(
            classify("", Some(ErrorType::DependencyFailure)),
            ErrorType::DependencyFailure
        );
    }

    #[test]
    fn severity_table_multipliers_and_cap() {
        let empty = Context::new();
        let table = [
            (ErrorType::SafetyViolation, 0.9),
            (ErrorType::ResourceExhaustion, 0.7),
            (ErrorType::GoalConflict, 0.6),
            (ErrorType::DependencyFailure, 0.6),
            (ErrorType::ExecutionFailure, 0.5),
            (ErrorType::ConfigurationError, 0.5),
            (ErrorType::Unknown, 0.5),
            (ErrorType::PerformanceDegradation, 0.4),
            (ErrorType::CommunicationError, 0.3),
            (ErrorType::LearningFailure, 0.3),
        ];
        for (t, want) in table {
            assert!(approx(severity(t, &empty), want), "{t}");
        }
        for truthy in ["true", "TRUE", "1", "Yes"] {
            let c = ctx(&[("critical_operation", truthy)]);
            assert!(
                approx(severity(ErrorType::PerformanceDegradation, &c), 0.6),
                "{truthy}"
            );
        }
        for falsy in ["false", "0", "no", ""] {
            let c = ctx(&[("critical_operation", falsy)]);
            assert!(
                approx(severity(ErrorType::PerformanceDegradation, &c), 0.4),
                "{falsy}"
            );
        }
        let retries = ctx(&[("retry_count", "4")]);
        assert!(approx(severity(ErrorType::ExecutionFailure, &retries), 0.6));
        let three = ctx(&[("retry_count", "3")]);
        assert!(approx(severity(ErrorType::ExecutionFailure, &three), 0.5));
        let garbage = ctx(&[("retry_count", "many")]);
        assert!(approx(severity(ErrorType::ExecutionFailure, &garbage), 0.5));
        let both = ctx(&[("critical_operation", "true"), ("retry_count", "10")]);
        assert!(approx(severity(ErrorType::CommunicationError, &both), 0.54));
        // 0.9 * 1.5 * 1.2 would be 1.62: capped.
        assert_eq!(severity(ErrorType::SafetyViolation, &both), 1.0);
    }

    #[test]
    fn critical_and_recurring_thresholds() {
        assert!(is_critical(0.8));
        assert!(is_critical(1.0));
        assert!(!is_critical(0.799_999));
        assert!(!is_critical(f64::NAN));
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let w = recurrence_window(t);
        assert_eq!((w.after, w.until), (t - Duration::hours(1), t));
        assert!(
            !w.contains(t - Duration::hours(1)),
            "an hour ago exactly is out"
        );
        assert!(w.contains(t - Duration::hours(1) + Duration::microseconds(1)));
        assert!(w.contains(t));
        assert!(
            !w.contains(t + Duration::microseconds(1)),
            "later events do not count"
        );
        assert!(!recurring_given(1), "two with this one");
        assert!(recurring_given(2), "three with this one");
        assert!(recurring_given(i64::MAX));
        assert_eq!(
            recurrence_window(DateTime::<Utc>::MIN_UTC).after,
            DateTime::<Utc>::MIN_UTC
        );
        assert!(!is_recurring(2));
        assert!(is_recurring(3));
        assert!(is_recurring(i64::MAX));
        assert!(!is_recurring(i64::MIN));
    }

    #[test]
    fn heuristic_table() {
        use ErrorType as E;
        use Strategy as S;
        for critical in [false, true] {
            assert_eq!(heuristic_strategy(E::ExecutionFailure, critical), S::Retry);
            assert_eq!(
                heuristic_strategy(E::ResourceExhaustion, critical),
                S::Reconfigure
            );
            assert_eq!(
                heuristic_strategy(E::CommunicationError, critical),
                S::WaitAndRetry
            );
            assert_eq!(heuristic_strategy(E::SafetyViolation, critical), S::Isolate);
            assert_eq!(heuristic_strategy(E::GoalConflict, critical), S::Rollback);
        }
        for t in [
            E::Unknown,
            E::PerformanceDegradation,
            E::DependencyFailure,
            E::ConfigurationError,
            E::LearningFailure,
        ] {
            assert_eq!(heuristic_strategy(t, true), S::Escalate);
            assert_eq!(heuristic_strategy(t, false), S::Retry);
        }
    }

    #[test]
    fn profile_defaults() {
        let retry = profile(Strategy::Retry);
        assert_eq!(
            retry.parameters,
            ctx(&[("max_attempts", "3"), ("backoff_seconds", "5")])
        );
        assert_eq!(retry.estimated_duration, chrono::Duration::seconds(30));
        assert_eq!(
            profile(Strategy::WaitAndRetry).parameters,
            ctx(&[("wait_seconds", "30"), ("max_attempts", "2")])
        );
        assert_eq!(
            profile(Strategy::Reconfigure).parameters,
            ctx(&[("scale_factor", "0.7")])
        );
        assert_eq!(
            profile(Strategy::Escalate).parameters,
            ctx(&[("priority", "high"), ("notify", "true")])
        );
        let risks = [
            (Strategy::Retry, 0.2),
            (Strategy::Rollback, 0.3),
            (Strategy::Reconfigure, 0.4),
            (Strategy::Restart, 0.5),
            (Strategy::Isolate, 0.2),
            (Strategy::Escalate, 0.1),
            (Strategy::WaitAndRetry, 0.2),
            (Strategy::DegradeGracefully, 0.3),
            (Strategy::Compensate, 0.5),
            (Strategy::AlternativePath, 0.4),
        ];
        for (s, r) in risks {
            let p = profile(s);
            assert_eq!(p.base_risk, r, "{s}");
            assert!(!p.parameters.is_empty(), "{s}");
            assert!((0.0..=1.0).contains(&p.success_probability));
            assert!(p.estimated_duration > chrono::Duration::zero());
        }
    }

    #[test]
    fn context_signature_sorted_and_filtered() {
        let c = ctx(&[
            ("tool", " search "),
            ("request_id", "abc"),
            ("component", "planner"),
            ("timestamp", "123"),
        ]);
        assert_eq!(context_signature(&c), "component=planner,tool=search");
        assert_eq!(context_signature(&ctx(&[("request_id", "x")])), "");
        let long = "é".repeat(100);
        let sig = context_signature(&ctx(&[("provider", &long)]));
        assert_eq!(sig, format!("provider={}", "é".repeat(64)));
        let all = ctx(&[
            ("tool", "t"),
            ("provider", "p"),
            ("operation", "o"),
            ("component", "c"),
        ]);
        assert_eq!(
            context_signature(&all),
            "component=c,operation=o,provider=p,tool=t"
        );
    }

    #[test]
    fn evidence_helpers() {
        let e = Evidence {
            strategy: Strategy::Retry,
            successes: 3,
            failures: 1,
            total_recovery_secs: 40.0,
        };
        assert_eq!(e.uses(), 4);
        assert_eq!(e.mean_recovery_secs(), Some(10.0));
        let none = Evidence {
            strategy: Strategy::Retry,
            successes: 0,
            failures: 0,
            total_recovery_secs: 0.0,
        };
        assert_eq!(none.mean_recovery_secs(), None);
        let weird = Evidence {
            strategy: Strategy::Retry,
            successes: i64::MAX,
            failures: -5,
            total_recovery_secs: f64::NAN,
        };
        assert_eq!(weird.uses(), i64::MAX);
        assert_eq!(weird.mean_recovery_secs(), None);
    }

    fn plan_for(
        error_type: ErrorType,
        critical: bool,
        recurring: bool,
        evidence: &[Evidence],
    ) -> Plan {
        let input = PlanInput {
            error_type,
            critical,
            recurring,
            evidence,
        };
        plan(
            &input,
            &PlannerConfig::default(),
            &mut StdRng::seed_from_u64(7),
        )
    }

    #[test]
    fn cold_start_uses_heuristic() {
        let p = plan_for(ErrorType::ExecutionFailure, false, false, &[]);
        assert_eq!(p.strategy, Strategy::Retry);
        assert_eq!(p.chosen, Strategy::Retry);
        assert_eq!(p.reason, REASON_HEURISTIC);
        assert!(!p.escalated);
        assert_eq!(p.parameters, profile(Strategy::Retry).parameters);
        assert_eq!(p.estimated_duration, chrono::Duration::seconds(30));
        assert!(approx(p.success_probability, 0.6));
    }

    #[test]
    fn critical_unknown_escalates_via_heuristic() {
        let p = plan_for(ErrorType::Unknown, true, false, &[]);
        assert_eq!(p.strategy, Strategy::Escalate);
        assert_eq!(p.chosen, Strategy::Escalate);
        assert!(p.escalated);
        assert_eq!(p.reason, REASON_HEURISTIC);
    }

    #[test]
    fn safety_gate_trips_for_risky_restart() {
        // Restart was learned to work well, but it is risky for a critical, recurring error.
        // The other candidates are known to fail, so the learner's pick is
        // deterministic whatever the seed.
        let ev = [
            Evidence {
                strategy: Strategy::Restart,
                successes: 500,
                failures: 0,
                total_recovery_secs: 5000.0,
            },
            Evidence {
                strategy: Strategy::Retry,
                successes: 0,
                failures: 50,
                total_recovery_secs: 0.0,
            },
            Evidence {
                strategy: Strategy::Escalate,
                successes: 0,
                failures: 50,
                total_recovery_secs: 0.0,
            },
        ];
        let p = plan_for(ErrorType::DependencyFailure, true, true, &ev);
        assert_eq!(p.chosen, Strategy::Restart);
        assert!(approx(p.risk, 0.78), "{}", p.risk);
        assert_eq!(p.strategy, Strategy::Escalate);
        assert!(p.escalated);
        assert_eq!(p.reason, REASON_HIGH_RISK);
        assert_eq!(p.parameters, profile(Strategy::Escalate).parameters);
        // Duration and probability describe what the learner chose.
        assert_eq!(p.estimated_duration, chrono::Duration::seconds(10));
        assert!(p.success_probability > 0.99);

        // The same restart without the multipliers passes the gate.
        let p = plan_for(ErrorType::DependencyFailure, false, false, &ev);
        assert_eq!(p.strategy, Strategy::Restart);
        assert!(!p.escalated);
        assert_eq!(p.reason, REASON_LEARNED);
    }

    #[test]
    fn safety_gate_lets_low_risk_retry_through() {
        let p = plan_for(ErrorType::ExecutionFailure, true, true, &[]);
        assert_eq!(p.strategy, Strategy::Retry);
        assert!(approx(p.risk, 0.2 * 1.3 * 1.2), "{}", p.risk);
        assert!(!p.escalated);
        assert!(approx(risk(Strategy::Compensate, true, true), 0.78));
        assert!(approx(risk(Strategy::Retry, false, false), 0.2));
    }

    #[test]
    fn safety_limit_is_configurable() {
        let input = PlanInput {
            error_type: ErrorType::GoalConflict,
            critical: false,
            recurring: false,
            evidence: &[],
        };
        let strict = PlannerConfig {
            safety_limit: 0.25,
            ..PlannerConfig::default()
        };
        let p = plan(&input, &strict, &mut StdRng::seed_from_u64(1));
        assert_eq!(p.chosen, Strategy::Rollback);
        assert_eq!(p.strategy, Strategy::Escalate);
        // A NaN limit must not disable the gate: default 0.7 applies.
        let nan = PlannerConfig {
            safety_limit: f64::NAN,
            ..PlannerConfig::default()
        };
        let ev = [
            Evidence {
                strategy: Strategy::Restart,
                successes: 500,
                failures: 0,
                total_recovery_secs: 0.0,
            },
            Evidence {
                strategy: Strategy::Escalate,
                successes: 0,
                failures: 50,
                total_recovery_secs: 0.0,
            },
        ];
        let input = PlanInput {
            error_type: ErrorType::Unknown,
            critical: true,
            recurring: true,
            evidence: &ev,
        };
        let p = plan(&input, &nan, &mut StdRng::seed_from_u64(1));
        assert_eq!(p.chosen, Strategy::Restart);
        assert_eq!(p.strategy, Strategy::Escalate);
    }

    /// Success rates of the simulated world in the learning test.
    fn true_success_rate(s: Strategy) -> f64 {
        match s {
            Strategy::WaitAndRetry => 0.9,
            _ => 0.2,
        }
    }

    fn record(evidence: &mut Vec<Evidence>, s: Strategy, ok: bool, secs: f64) {
        let idx = match evidence.iter().position(|e| e.strategy == s) {
            Some(i) => i,
            None => {
                evidence.push(Evidence {
                    strategy: s,
                    successes: 0,
                    failures: 0,
                    total_recovery_secs: 0.0,
                });
                evidence.len() - 1
            }
        };
        let e = &mut evidence[idx];
        if ok {
            e.successes += 1;
        } else {
            e.failures += 1;
        }
        e.total_recovery_secs += secs;
    }

    #[test]
    fn learning_simulation_converges_to_better_strategy() {
        let config = PlannerConfig::default();
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut evidence: Vec<Evidence> = Vec::new();
            for _ in 0..50 {
                let input = PlanInput {
                    error_type: ErrorType::ExecutionFailure,
                    critical: false,
                    recurring: false,
                    evidence: &evidence,
                };
                let p = plan(&input, &config, &mut rng);
                let ok = rng.random_bool(true_success_rate(p.strategy));
                record(&mut evidence, p.strategy, ok, 30.0);
            }
            let input = PlanInput {
                error_type: ErrorType::ExecutionFailure,
                critical: false,
                recurring: false,
                evidence: &evidence,
            };
            let wins = (0..200)
                .filter(|_| plan(&input, &config, &mut rng).strategy == Strategy::WaitAndRetry)
                .count();
            assert!(
                wins >= 170,
                "seed {seed}: only {wins}/200 chose WAIT_AND_RETRY; evidence {evidence:?}"
            );
        }
    }

    #[test]
    fn failing_strategy_is_abandoned() {
        // The heuristic (RETRY) keeps failing; the learner must move away from it
        // even though the alternative has never been tried.
        let ev = [Evidence {
            strategy: Strategy::Retry,
            successes: 0,
            failures: 30,
            total_recovery_secs: 900.0,
        }];
        let input = PlanInput {
            error_type: ErrorType::ExecutionFailure,
            critical: false,
            recurring: false,
            evidence: &ev,
        };
        let mut rng = StdRng::seed_from_u64(42);
        let retries = (0..200)
            .filter(|_| plan(&input, &PlannerConfig::default(), &mut rng).chosen == Strategy::Retry)
            .count();
        assert!(retries <= 4, "RETRY still chosen {retries}/200 times");
    }

    #[test]
    fn huge_and_corrupt_evidence_is_handled() {
        let ev = [
            Evidence {
                strategy: Strategy::Restart,
                successes: i64::MAX,
                failures: i64::MAX,
                total_recovery_secs: f64::INFINITY,
            },
            Evidence {
                strategy: Strategy::Restart,
                successes: i64::MAX,
                failures: i64::MIN,
                total_recovery_secs: -1.0,
            },
            Evidence {
                strategy: Strategy::Compensate,
                successes: -3,
                failures: -3,
                total_recovery_secs: f64::NAN,
            },
        ];
        let input = PlanInput {
            error_type: ErrorType::Unknown,
            critical: false,
            recurring: false,
            evidence: &ev,
        };
        let cfg = PlannerConfig {
            safety_limit: f64::INFINITY,
            prior_strength: f64::NAN,
        };
        let p = plan(&input, &cfg, &mut StdRng::seed_from_u64(3));
        assert!((0.0..=1.0).contains(&p.success_probability));
        assert!((0.0..=1.0).contains(&p.risk));
    }

    fn strategy_strategy() -> impl PropStrategy<Value = Strategy> {
        (0..Strategy::ALL.len()).prop_map(|i| Strategy::ALL[i])
    }

    proptest! {
        #[test]
        fn plan_never_panics_and_stays_in_range(
            type_idx in 0..ErrorType::ALL.len(),
            critical: bool,
            recurring: bool,
            evidence in proptest::collection::vec(
                (strategy_strategy(), any::<i64>(), any::<i64>(), any::<f64>()),
                0..8,
            ),
            safety_limit: f64,
            prior_strength: f64,
            seed: u64,
        ) {
            let evidence: Vec<Evidence> = evidence
                .into_iter()
                .map(|(strategy, successes, failures, total_recovery_secs)| Evidence { strategy, successes, failures, total_recovery_secs })
                .collect();
            let input = PlanInput { error_type: ErrorType::ALL[type_idx], critical, recurring, evidence: &evidence };
            let cfg = PlannerConfig { safety_limit, prior_strength };
            let p = plan(&input, &cfg, &mut StdRng::seed_from_u64(seed));
            prop_assert!((0.0..=1.0).contains(&p.risk));
            prop_assert!((0.0..=1.0).contains(&p.success_probability));
            prop_assert!(p.estimated_duration >= chrono::Duration::zero());
            prop_assert_eq!(p.escalated, p.strategy == Strategy::Escalate);
        }

        #[test]
        fn classify_and_severity_never_panic(msg in ".*", crit in ".*", retries in ".*") {
            let t = classify(&msg, None);
            let c = ctx(&[("critical_operation", &crit), ("retry_count", &retries)]);
            let s = severity(t, &c);
            prop_assert!((0.0..=1.0).contains(&s));
            let _ = context_signature(&ctx(&[("tool", &msg)]));
        }
    }
}
