//! Post healing: detect social posts whose engagement has stalled (leaving
//! alone those seen too little to judge and those doing well), pick an
//! escalating intervention (comment, edit, thread), and guard against spam
//! with idempotency keys of a window, a per-window cap, per-action cooldowns
//! and bounded, jittered retries.
//!
//! Pure: the caller passes `now` and the RNG; the store persists records.

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use sha2::{Digest, Sha256};

/// One engagement snapshot of a post. Counters are cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricPoint {
    pub at: DateTime<Utc>,
    pub impressions: i64,
    pub engagements: i64,
}

/// Case-insensitive, whitespace-tolerant lookup of a variant by its wire name.
fn parse_by_name<T: Copy>(all: &[T], name_of: impl Fn(T) -> &'static str, s: &str) -> Option<T> {
    let s = s.trim();
    all.iter()
        .copied()
        .find(|v| name_of(*v).eq_ignore_ascii_case(s))
}

/// Implements `Display` via `as_str` so wire names have a single source.
macro_rules! display_via_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionType {
    Comment,
    Edit,
    Thread,
}

impl ActionType {
    pub const ALL: [ActionType; 3] = [ActionType::Comment, ActionType::Edit, ActionType::Thread];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionType::Comment => "comment",
            ActionType::Edit => "edit",
            ActionType::Thread => "thread",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        parse_by_name(&Self::ALL, Self::as_str, s)
    }
}

/// Intervention strength; each tier maps to one action (see [`Tier::action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Tier1,
    Tier2,
    Tier3,
}

impl Tier {
    /// The seed's fixed tier of each action (the inverse of [`Tier::action`]).
    pub fn of(action: ActionType) -> Tier {
        match action {
            ActionType::Comment => Tier::Tier1,
            ActionType::Edit => Tier::Tier2,
            ActionType::Thread => Tier::Tier3,
        }
    }

    pub const ALL: [Tier; 3] = [Tier::Tier1, Tier::Tier2, Tier::Tier3];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Tier1 => "tier_1",
            Tier::Tier2 => "tier_2",
            Tier::Tier3 => "tier_3",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        parse_by_name(&Self::ALL, Self::as_str, s)
    }

    pub fn number(self) -> i32 {
        match self {
            Tier::Tier1 => 1,
            Tier::Tier2 => 2,
            Tier::Tier3 => 3,
        }
    }

    /// The action each tier takes: the worse the stall, the louder the action.
    pub fn action(self) -> ActionType {
        match self {
            Tier::Tier1 => ActionType::Comment,
            Tier::Tier2 => ActionType::Edit,
            Tier::Tier3 => ActionType::Thread,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionStatus {
    Running,
    Succeeded,
    Failed,
}

impl ActionStatus {
    pub const ALL: [ActionStatus; 3] = [
        ActionStatus::Running,
        ActionStatus::Succeeded,
        ActionStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionStatus::Running => "RUNNING",
            ActionStatus::Succeeded => "SUCCEEDED",
            ActionStatus::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        parse_by_name(&Self::ALL, Self::as_str, s)
    }
}

/// Why a post may not be healed right now. Also usable as an error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum Ineligible {
    #[error("insufficient_samples")]
    InsufficientSamples,
    /// Fewer impressions gained over the window than `min_impressions`: too
    /// little exposure to judge the rate, so no stagnation verdict.
    #[error("low_exposure")]
    LowExposure,
    /// An engagement rate at or above `healthy_rate`: nothing to heal.
    #[error("healthy")]
    Healthy,
    #[error("duplicate_action")]
    DuplicateAction,
    #[error("window_frequency_exceeded")]
    WindowFrequencyExceeded,
    #[error("action_cooldown_active")]
    ActionCooldownActive,
}

impl Ineligible {
    pub const ALL: [Ineligible; 6] = [
        Ineligible::InsufficientSamples,
        Ineligible::LowExposure,
        Ineligible::Healthy,
        Ineligible::DuplicateAction,
        Ineligible::WindowFrequencyExceeded,
        Ineligible::ActionCooldownActive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Ineligible::InsufficientSamples => "insufficient_samples",
            Ineligible::LowExposure => "low_exposure",
            Ineligible::Healthy => "healthy",
            Ineligible::DuplicateAction => "duplicate_action",
            Ineligible::WindowFrequencyExceeded => "window_frequency_exceeded",
            Ineligible::ActionCooldownActive => "action_cooldown_active",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        parse_by_name(&Self::ALL, Self::as_str, s)
    }
}

display_via_as_str!(ActionType, Tier, ActionStatus);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostHealingConfig {
    /// How far back metrics and actions are considered; also the length of
    /// the windows idempotency keys belong to ([`key_window`]).
    pub window: Duration,
    /// Minimum metric points in the window before judging a post.
    pub min_samples: usize,
    /// Minimum impressions gained over the window before judging a post:
    /// below it the verdict is `low_exposure` (0 turns the floor off).
    pub min_impressions: i64,
    /// An engagement rate over the window at or above this is `healthy`: no
    /// action is proposed.
    pub healthy_rate: f64,
    /// Cap on actions per post per window, across all action types.
    pub max_actions_per_window: usize,
    pub cooldown_comment: Duration,
    pub cooldown_edit: Duration,
    pub cooldown_thread: Duration,
    /// How long a worker may hold a RUNNING record before it counts as timed out.
    pub claim_lease: Duration,
    pub max_attempts: i32,
    /// Delay before the first retry; doubles per attempt.
    pub retry_base: Duration,
    /// Cap on the (pre-jitter) retry delay.
    pub retry_max: Duration,
}

/// Default of `healthy_rate`: 5 %, the rate at which the stagnation score
/// reaches 0 (see [`stagnation`]), so by default a post the stagnation rule
/// does not score as stalled at all is left alone.
pub const DEFAULT_HEALTHY_RATE: f64 = 1.0 / HEALTHY_RATE_FACTOR as f64;

/// Default of `min_impressions`: below 100 new impressions one engagement
/// more or less moves the rate by a whole percentage point or more, which is
/// noise, not a trend.
pub const DEFAULT_MIN_IMPRESSIONS: i64 = 100;

impl Default for PostHealingConfig {
    fn default() -> Self {
        PostHealingConfig {
            window: Duration::minutes(90),
            min_samples: 3,
            min_impressions: DEFAULT_MIN_IMPRESSIONS,
            healthy_rate: DEFAULT_HEALTHY_RATE,
            max_actions_per_window: 2,
            cooldown_comment: Duration::minutes(30),
            cooldown_edit: Duration::hours(2),
            cooldown_thread: Duration::hours(3),
            claim_lease: Duration::minutes(15),
            max_attempts: 3,
            retry_base: Duration::seconds(60),
            retry_max: Duration::hours(1),
        }
    }
}

impl PostHealingConfig {
    pub fn cooldown(&self, a: ActionType) -> Duration {
        match a {
            ActionType::Comment => self.cooldown_comment,
            ActionType::Edit => self.cooldown_edit,
            ActionType::Thread => self.cooldown_thread,
        }
    }
}

/// `now - d`, saturating at the earliest representable instant instead of panicking.
fn sub_saturating(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now.checked_sub_signed(d)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `t + d`, saturating at the representable range instead of panicking.
fn add_saturating(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(if d < Duration::zero() {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// A stored action record as the store hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRecord {
    pub idempotency_key: String,
    pub post_id: String,
    pub action: ActionType,
    pub tier: Tier,
    pub status: ActionStatus,
    pub attempts: i32,
    pub error_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// Error code given to a RUNNING record whose lease ran out.
pub const LEASE_TIMEOUT_ERROR: &str = "timeout";

fn lease_expired(record: &ActionRecord, now: DateTime<Utc>) -> bool {
    record.status == ActionStatus::Running && record.lease_expires_at.is_some_and(|t| t <= now)
}

/// The record as of `now`: a RUNNING claim whose lease ended (at or before
/// `now`) is a failed attempt with error "timeout", updated when its lease
/// ended, so a crashed worker neither blocks the post nor hides a retry. The
/// store reads every record through this.
pub fn as_of(mut record: ActionRecord, now: DateTime<Utc>) -> ActionRecord {
    if lease_expired(&record, now) {
        let expired_at = record.lease_expires_at.unwrap_or(now);
        record.status = ActionStatus::Failed;
        record.error_code = Some(LEASE_TIMEOUT_ERROR.to_owned());
        record.attempts = record.attempts.saturating_add(1);
        record.updated_at = expired_at;
    }
    record
}

/// The record a claim at `now` writes under `key` (the evaluation's, see
/// [`evaluate`]): RUNNING with a lease, keeping the attempts of an earlier
/// record with the same key (read through [`as_of`], so an expired claim
/// counts as the attempt it was), created now if new.
pub fn claim(
    existing: Option<&ActionRecord>,
    key: &str,
    post_id: &str,
    stagnation: &Stagnation,
    now: DateTime<Utc>,
    lease: Duration,
) -> ActionRecord {
    ActionRecord {
        idempotency_key: key.to_owned(),
        post_id: post_id.to_owned(),
        action: stagnation.action,
        tier: stagnation.tier,
        status: ActionStatus::Running,
        attempts: existing.map_or(0, |r| r.attempts),
        error_code: None,
        created_at: existing.map_or(now, |r| r.created_at),
        updated_at: now,
        lease_expires_at: Some(add_saturating(now, lease)),
    }
}

/// A reported outcome applied to the record as stored (not as of now: a late
/// report of an expired claim is the attempt the claim was). Each report is an
/// attempt; RUNNING renews nothing, a lease is only granted by a claim.
pub fn apply_outcome(
    stored: ActionRecord,
    status: ActionStatus,
    error_code: Option<String>,
    now: DateTime<Utc>,
) -> ActionRecord {
    let lease_expires_at = match status {
        ActionStatus::Running => stored.lease_expires_at,
        ActionStatus::Succeeded | ActionStatus::Failed => None,
    };
    ActionRecord {
        status,
        error_code,
        attempts: stored.attempts.saturating_add(1),
        updated_at: now,
        lease_expires_at,
        ..stored
    }
}

/// A record first created by a reported outcome under `key` (an executor
/// that did not claim): attempts start at 0, [`apply_outcome`] then counts
/// the report.
pub fn reported(
    key: &str,
    post_id: &str,
    action: ActionType,
    tier: Tier,
    status: ActionStatus,
    now: DateTime<Utc>,
) -> ActionRecord {
    ActionRecord {
        idempotency_key: key.to_owned(),
        post_id: post_id.to_owned(),
        action,
        tier,
        status,
        attempts: 0,
        error_code: None,
        created_at: now,
        updated_at: now,
        lease_expires_at: None,
    }
}

/// Why a report for an unknown key may not create a record under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMismatch {
    /// The key is not the one its post, action and tier make (for the
    /// window a window key names).
    Hash { given: String, expected: String },
    /// A window key of a window other than the server's current one or the
    /// one before: a report creates records only for actions proposed now
    /// or in the window just ended, never for a window the caller picks.
    Window {
        given: String,
        window: i64,
        current: i64,
    },
}

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyMismatch::Hash { given, expected } => write!(
                f,
                "idempotency_key {given:?} does not match post_id, action_type and tier \
                 (expected {expected:?})"
            ),
            KeyMismatch::Window {
                given,
                window,
                current,
            } => write!(
                f,
                "idempotency_key {given:?} is for post window {window}, but a report creates a \
                 record only for the server's current post window ({current}) or the one before"
            ),
        }
    }
}

/// The record a report at `now` creates for the unknown `key` ([`reported`]),
/// if `key` is one its post, action and tier make: the seed's key
/// ([`idempotency_key`], so records of the seed's executor fit), or the
/// window key ([`window_key`]) of the current window of length `window` at
/// `now` or of the one before (an action proposed just before a window
/// ended is reported after it).
pub fn reported_as(
    key: &str,
    post_id: &str,
    action: ActionType,
    tier: Tier,
    status: ActionStatus,
    now: DateTime<Utc>,
    window: Duration,
) -> Result<ActionRecord, KeyMismatch> {
    let current = key_window(now, window);
    let expected = match key_form(key) {
        Some(KeyForm::Seed) => idempotency_key(post_id, action, tier),
        Some(KeyForm::Window(w)) => {
            if w != current && Some(w) != current.checked_sub(1) {
                return Err(KeyMismatch::Window {
                    given: key.to_owned(),
                    window: w,
                    current,
                });
            }
            window_key(post_id, action, tier, w)
        }
        None => window_key(post_id, action, tier, current),
    };
    if expected != key {
        return Err(KeyMismatch::Hash {
            given: key.to_owned(),
            expected,
        });
    }
    Ok(reported(key, post_id, action, tier, status, now))
}

/// Status as it should be acted on. A RUNNING record whose lease has expired
/// (at or before `now`) counts as FAILED with error "timeout", so a crashed
/// worker neither blocks the post forever nor hides a retry. A RUNNING record
/// without a lease stays RUNNING: nothing says its worker is gone.
pub fn effective(record: &ActionRecord, now: DateTime<Utc>) -> (ActionStatus, Option<String>) {
    if lease_expired(record, now) {
        (ActionStatus::Failed, Some(LEASE_TIMEOUT_ERROR.to_owned()))
    } else {
        (record.status, record.error_code.clone())
    }
}

/// How stalled a post is and which intervention that calls for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stagnation {
    /// Metric points used (those inside the window).
    pub samples: usize,
    /// Impressions gained over the window (last point's minus first's; 0
    /// when they did not grow), the exposure the rate is measured on.
    pub impressions: i64,
    /// New engagements per new impression over the window; 0 when impressions did not grow.
    pub engagement_rate: f64,
    /// 0 = healthy, 1 = fully stalled.
    pub score: f64,
    pub tier: Tier,
    pub action: ActionType,
}

/// Engagement rate at which a post counts as healthy (score 0): 5 %.
const HEALTHY_RATE_FACTOR: i128 = 20;
pub const TIER3_SCORE: f64 = 0.8;
pub const TIER2_SCORE: f64 = 0.55;

/// Measure stagnation from the metric points in `[now - window, now]`.
///
/// The score is computed as `(Δimpressions - 20·Δengagements) / Δimpressions`,
/// which equals `1 - 20·rate` but in exact integer arithmetic up to one final
/// division, so rates that sit exactly on a tier boundary (e.g. 1 engagement per
/// 100 impressions -> 0.8) land on the boundary instead of a rounding error away.
pub fn stagnation(
    points: &[MetricPoint],
    now: DateTime<Utc>,
    config: &PostHealingConfig,
) -> Result<Stagnation, Ineligible> {
    let since = sub_saturating(now, config.window);
    let mut window: Vec<&MetricPoint> = points
        .iter()
        .filter(|p| p.at >= since && p.at <= now)
        .collect();
    if window.len() < config.min_samples || window.is_empty() {
        return Err(Ineligible::InsufficientSamples);
    }
    // Tie-break equal timestamps by the counters so the result does not depend
    // on input order (counters are cumulative, so larger is later).
    window.sort_by_key(|p| (p.at, p.impressions, p.engagements));
    let (first, last) = match (window.first(), window.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Err(Ineligible::InsufficientSamples),
    };

    // i128: differences of arbitrary i64s, times 20, cannot overflow.
    let d_imp = i128::from(last.impressions) - i128::from(first.impressions);
    let d_eng = i128::from(last.engagements) - i128::from(first.engagements);
    let (engagement_rate, score) = if d_imp > 0 {
        let rate = d_eng as f64 / d_imp as f64;
        // Clamped: a negative engagement delta (counter reset) reads as fully stalled.
        let score = ((d_imp - HEALTHY_RATE_FACTOR * d_eng) as f64 / d_imp as f64).clamp(0.0, 1.0);
        (rate, score)
    } else {
        // No new impressions: nobody is seeing the post, fully stalled (with
        // an exposure floor, `evaluate` answers low_exposure before this).
        (0.0, 1.0)
    };
    let tier = if score >= TIER3_SCORE {
        Tier::Tier3
    } else if score >= TIER2_SCORE {
        Tier::Tier2
    } else {
        Tier::Tier1
    };
    Ok(Stagnation {
        samples: window.len(),
        impressions: i64::try_from(d_imp.max(0)).unwrap_or(i64::MAX),
        engagement_rate,
        score,
        tier,
        action: tier.action(),
    })
}

/// The first 32 lowercase hex characters of SHA-256(`text`).
fn hex32(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(32);
    for byte in &digest[..16] {
        // Writing to a String cannot fail; format! avoids a fallible `write!`.
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Prefix of the seed's keys ([`idempotency_key`]).
pub const SEED_KEY_PREFIX: &str = "sheal_";
/// Prefix of window keys ([`window_key`]); never a seed key's, whose
/// `sheal_` is followed by hex.
pub const WINDOW_KEY_PREFIX: &str = "shealw_";

/// The seed's key, without a time part: "sheal_" + first 32 lowercase hex
/// chars of SHA-256("{post_id}:{action}:{tier}"), identical to the Python
/// implementation's keys. Claims no longer make them; records stored under
/// them are still read, reported on and counted ([`evaluate`]).
pub fn idempotency_key(post_id: &str, action: ActionType, tier: Tier) -> String {
    format!(
        "{SEED_KEY_PREFIX}{}",
        hex32(&format!("{post_id}:{}:{}", action.as_str(), tier.as_str()))
    )
}

/// The index of the window of length `window` that `at` falls in, counted
/// from the Unix epoch: floor(Unix time in ms / window in ms). Windows are
/// fixed (10:30 to 12:00 for 90 minutes), unlike the sliding window of the
/// action cap. A window under 1 ms counts as 1 ms.
pub fn key_window(at: DateTime<Utc>, window: Duration) -> i64 {
    at.timestamp_millis()
        .div_euclid(window.num_milliseconds().max(1))
}

/// The key of the action `tier` proposes for `post_id` in window `window`
/// ([`key_window`]): "shealw_{window}_" + first 32 lowercase hex chars of
/// SHA-256("{post_id}:{action}:{tier}:{window}"). A key belongs to one window,
/// so a tier that acted on a post may act on it again in a later window (the
/// cap and the cooldowns still apply).
pub fn window_key(post_id: &str, action: ActionType, tier: Tier, window: i64) -> String {
    format!(
        "{WINDOW_KEY_PREFIX}{window}_{}",
        hex32(&format!(
            "{post_id}:{}:{}:{window}",
            action.as_str(),
            tier.as_str()
        ))
    )
}

/// The two forms of idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyForm {
    /// The seed's "sheal_" + 32 hex, with no time part.
    Seed,
    /// "shealw_{window}_" + 32 hex, of the window it names.
    Window(i64),
}

fn is_hex32(text: &str) -> bool {
    text.len() == 32 && text.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
}

/// The form of a well-formed key, `None` for anything else (the window
/// written in canonical decimal: no sign but a minus, no leading zeros).
pub fn key_form(key: &str) -> Option<KeyForm> {
    if let Some(rest) = key.strip_prefix(WINDOW_KEY_PREFIX) {
        let (window, hex) = rest.split_once('_')?;
        let window: i64 = window.parse().ok()?;
        return (is_hex32(hex) && rest.starts_with(&format!("{window}_")))
            .then_some(KeyForm::Window(window));
    }
    key.strip_prefix(SEED_KEY_PREFIX)
        .filter(|hex| is_hex32(hex))
        .map(|_| KeyForm::Seed)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub eligible: bool,
    /// Set exactly when `eligible` is false.
    pub reason: Option<Ineligible>,
    /// The stagnation rule's result: present unless samples were
    /// insufficient or exposure low (so also for a healthy post, which gets
    /// no action).
    pub stagnation: Option<Stagnation>,
    /// Key of the action that would be (or was refused to be) taken: present
    /// exactly when an action is proposed (not for insufficient samples, low
    /// exposure or a healthy post).
    pub idempotency_key: Option<String>,
    /// Metric points inside the window (the seed's `sample_count`), set
    /// on every verdict, insufficient samples included.
    pub samples: usize,
    /// Impressions gained over the window (0 with insufficient samples).
    pub impressions: i64,
}

impl Evaluation {
    /// The stagnation whose tier and action are proposed, if an action is.
    pub fn proposed(&self) -> Option<&Stagnation> {
        self.idempotency_key.as_ref().and(self.stagnation.as_ref())
    }
}

/// Decide whether to heal `post_id` now. Verdicts, first one wins:
/// 1. insufficient_samples;
/// 2. low_exposure: fewer than `min_impressions` impressions gained over the
///    window, no stagnation verdict;
/// 3. healthy: an engagement rate at or above `healthy_rate` (the rate the
///    stagnation rule measured), no action proposed;
///
/// then the proposed action (the stagnation tier's, under the key of the
/// current window, [`window_key`] of [`key_window`] of `now`) meets the
/// guardrails, first failure wins:
/// 4. duplicate_action: this tier's action on the post is SUCCEEDED or
///    RUNNING (effective) in this window: the record with this key, or one
///    under the seed's key ([`idempotency_key`]) created in this window;
/// 5. window_frequency_exceeded: records created in the last window >= cap;
/// 6. action_cooldown_active: newest same-type record younger than its cooldown.
///
/// `history` is every record of this post. It is deliberately not re-filtered by
/// `post_id`: if the store ever mislabels a row, counting it errs toward not spamming.
/// Records dated in the future (clock skew) count as recent for the same reason.
pub fn evaluate(
    post_id: &str,
    points: &[MetricPoint],
    history: &[ActionRecord],
    now: DateTime<Utc>,
    config: &PostHealingConfig,
) -> Evaluation {
    let stag = match stagnation(points, now, config) {
        Ok(s) => s,
        Err(reason) => {
            let since = sub_saturating(now, config.window);
            return Evaluation {
                eligible: false,
                reason: Some(reason),
                stagnation: None,
                idempotency_key: None,
                samples: points
                    .iter()
                    .filter(|p| p.at >= since && p.at <= now)
                    .count(),
                impressions: 0,
            };
        }
    };
    let verdict = |reason, stagnation, idempotency_key| Evaluation {
        eligible: false,
        reason: Some(reason),
        stagnation,
        idempotency_key,
        samples: stag.samples,
        impressions: stag.impressions,
    };
    if stag.impressions < config.min_impressions {
        return verdict(Ineligible::LowExposure, None, None);
    }
    if stag.engagement_rate >= config.healthy_rate {
        return verdict(Ineligible::Healthy, Some(stag), None);
    }

    let window = key_window(now, config.window);
    let key = window_key(post_id, stag.action, stag.tier, window);
    let refuse = |reason| verdict(reason, Some(stag), Some(key.clone()));

    let seed_key = idempotency_key(post_id, stag.action, stag.tier);
    let duplicate = history.iter().any(|r| {
        let this_window = r.idempotency_key == key
            || (r.idempotency_key == seed_key && key_window(r.created_at, config.window) == window);
        this_window
            && matches!(
                effective(r, now).0,
                ActionStatus::Succeeded | ActionStatus::Running
            )
    });
    if duplicate {
        return refuse(Ineligible::DuplicateAction);
    }

    let since = sub_saturating(now, config.window);
    let recent = history.iter().filter(|r| r.created_at >= since).count();
    if recent >= config.max_actions_per_window {
        return refuse(Ineligible::WindowFrequencyExceeded);
    }

    let newest_same_type = history
        .iter()
        .filter(|r| r.action == stag.action)
        .map(|r| r.created_at)
        .max();
    if let Some(created) = newest_same_type {
        // Compare instants rather than subtracting: no overflow for extreme dates.
        if created > sub_saturating(now, config.cooldown(stag.action)) {
            return refuse(Ineligible::ActionCooldownActive);
        }
    }

    Evaluation {
        eligible: true,
        reason: None,
        stagnation: Some(stag),
        idempotency_key: Some(key),
        samples: stag.samples,
        impressions: stag.impressions,
    }
}

/// Error codes worth retrying: the failure was about the environment, not the action.
pub const TRANSIENT_ERRORS: &[&str] = &[
    "timeout",
    "rate_limit",
    "service_unavailable",
    "network_error",
];

pub const RETRY_REASON_TRANSIENT: &str = "transient_error";
pub const RETRY_REASON_NOT_FAILED: &str = "not_failed";
pub const RETRY_REASON_PERMANENT: &str = "permanent_error";
pub const RETRY_REASON_MAX_ATTEMPTS: &str = "max_attempts_reached";

/// Jitter bounds applied to the backoff delay, so workers that failed together
/// do not retry together.
pub const JITTER_MIN: f64 = 0.8;
pub const JITTER_MAX: f64 = 1.2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDecision {
    pub retry: bool,
    pub reason: String,
    /// Earliest retry time; `Some` exactly when `retry` is true.
    pub not_before: Option<DateTime<Utc>>,
}

fn is_transient(code: &str) -> bool {
    let code = code.trim();
    TRANSIENT_ERRORS
        .iter()
        .any(|t| t.eq_ignore_ascii_case(code))
}

/// Backoff before jitter: `min(retry_max, retry_base * 2^(attempts-1))`, in ms.
/// Done in f64 so any attempt count is fine (2^huge is +inf, then capped).
fn backoff_ms(attempts: i32, config: &PostHealingConfig) -> f64 {
    let base = config.retry_base.num_milliseconds().max(0) as f64;
    let max = config.retry_max.num_milliseconds().max(0) as f64;
    let exponent = attempts.saturating_sub(1).max(0);
    (base * 2f64.powi(exponent)).min(max)
}

/// Should this record be retried, and not before when?
///
/// Yes only if its effective status is FAILED with a transient error code and
/// it has attempts left. Checks, first failure wins: "not_failed",
/// "permanent_error" (unknown or missing codes are treated as permanent: retrying
/// what we do not understand risks duplicate posts), "max_attempts_reached".
/// The delay counts from `updated_at`, or from the lease expiry when the
/// record timed out (that is when it actually stopped), and is
/// `min(retry_max, retry_base * 2^(attempts-1))` times a jitter in [0.8, 1.2].
pub fn should_retry(
    record: &ActionRecord,
    now: DateTime<Utc>,
    config: &PostHealingConfig,
    rng: &mut impl Rng,
) -> RetryDecision {
    let no = |reason: &str| RetryDecision {
        retry: false,
        reason: reason.to_owned(),
        not_before: None,
    };
    let (status, code) = effective(record, now);
    if status != ActionStatus::Failed {
        return no(RETRY_REASON_NOT_FAILED);
    }
    if !code.as_deref().is_some_and(is_transient) {
        return no(RETRY_REASON_PERMANENT);
    }
    if record.attempts >= config.max_attempts {
        return no(RETRY_REASON_MAX_ATTEMPTS);
    }

    let from = match record.lease_expires_at {
        Some(expiry) if lease_expired(record, now) => expiry,
        _ => record.updated_at,
    };
    let jitter = rng.random_range(JITTER_MIN..=JITTER_MAX);
    // `as i64` saturates for huge floats; try_milliseconds rejects what chrono cannot hold.
    let delay_ms = (backoff_ms(record.attempts, config) * jitter).round() as i64;
    let delay = Duration::try_milliseconds(delay_ms).unwrap_or(Duration::MAX);
    RetryDecision {
        retry: true,
        reason: RETRY_REASON_TRANSIENT.to_owned(),
        not_before: Some(add_saturating(from, delay)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// 45 minutes into the 90-minute key window 323848 (12:00 to 13:30).
    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 6, 1, 12, 45, 0)
            .single()
            .expect("valid fixed date")
    }

    const WINDOW: i64 = 323_848;

    fn mins_ago(m: i64) -> DateTime<Utc> {
        now() - Duration::minutes(m)
    }

    fn pt(m_ago: i64, impressions: i64, engagements: i64) -> MetricPoint {
        MetricPoint {
            at: mins_ago(m_ago),
            impressions,
            engagements,
        }
    }

    /// Three in-window points going from (0,0) to (imp, eng).
    fn series(imp: i64, eng: i64) -> Vec<MetricPoint> {
        vec![pt(60, 0, 0), pt(30, imp / 2, eng / 2), pt(0, imp, eng)]
    }

    fn cfg() -> PostHealingConfig {
        PostHealingConfig::default()
    }

    /// A record claimed `created_mins_ago`, under the key of its window.
    fn rec(
        post: &str,
        action: ActionType,
        tier: Tier,
        status: ActionStatus,
        created_mins_ago: i64,
    ) -> ActionRecord {
        let window = key_window(mins_ago(created_mins_ago), cfg().window);
        ActionRecord {
            idempotency_key: window_key(post, action, tier, window),
            post_id: post.to_owned(),
            action,
            tier,
            status,
            attempts: 1,
            error_code: None,
            created_at: mins_ago(created_mins_ago),
            updated_at: mins_ago(created_mins_ago),
            lease_expires_at: None,
        }
    }

    #[test]
    fn enum_names_round_trip() {
        for a in ActionType::ALL {
            assert_eq!(ActionType::parse(a.as_str()), Some(a));
        }
        for t in Tier::ALL {
            assert_eq!(Tier::parse(t.as_str()), Some(t));
        }
        for s in ActionStatus::ALL {
            assert_eq!(ActionStatus::parse(s.as_str()), Some(s));
        }
        for i in Ineligible::ALL {
            assert_eq!(Ineligible::parse(i.as_str()), Some(i));
            assert_eq!(i.to_string(), i.as_str());
        }
        assert_eq!(Tier::ALL.map(Tier::number), [1, 2, 3]);
        assert_eq!(Tier::parse("tier_4"), None);
        assert_eq!(ActionStatus::parse("running"), Some(ActionStatus::Running));
    }

    #[test]
    fn default_config_and_cooldowns() {
        let c = cfg();
        assert_eq!(c.window, Duration::minutes(90));
        assert_eq!(c.min_samples, 3);
        assert_eq!(c.min_impressions, 100);
        assert_eq!(c.healthy_rate, 0.05);
        assert_eq!(c.max_actions_per_window, 2);
        assert_eq!(c.cooldown(ActionType::Comment), Duration::minutes(30));
        assert_eq!(c.cooldown(ActionType::Edit), Duration::hours(2));
        assert_eq!(c.cooldown(ActionType::Thread), Duration::hours(3));
        assert_eq!(c.claim_lease, Duration::minutes(15));
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.retry_base, Duration::seconds(60));
        assert_eq!(c.retry_max, Duration::hours(1));
    }

    #[test]
    fn window_filtering_ignores_old_and_future_points() {
        // The old point would make the post look healthy (lots of engagement
        // early on); the future point would too. Only the in-window ones count.
        let points = vec![
            pt(200, 0, 0),
            pt(90, 1000, 0), // exactly at the window edge: included
            pt(45, 1500, 0),
            pt(0, 2000, 0),
            MetricPoint {
                at: now() + Duration::minutes(5),
                impressions: 5000,
                engagements: 4000,
            },
        ];
        let s = stagnation(&points, now(), &cfg()).expect("enough samples");
        assert_eq!(s.samples, 3);
        assert_eq!(s.engagement_rate, 0.0);
        assert_eq!(s.score, 1.0);
        assert_eq!(s.tier, Tier::Tier3);
        assert_eq!(s.action, ActionType::Thread);

        // Drop the edge point just outside the window: now too few samples.
        let mut outside = points.clone();
        outside[1].at = mins_ago(91);
        assert_eq!(
            stagnation(&outside, now(), &cfg()),
            Err(Ineligible::InsufficientSamples)
        );
    }

    #[test]
    fn unsorted_input_is_sorted_by_time() {
        // Healthy post: 10 % engagement, given in reverse order.
        let mut points = series(1000, 100);
        points.reverse();
        let s = stagnation(&points, now(), &cfg()).expect("enough samples");
        assert_eq!(s.impressions, 1000);
        assert!((s.engagement_rate - 0.1).abs() < 1e-12);
        assert_eq!(s.score, 0.0);
        assert_eq!(s.tier, Tier::Tier1);
        assert_eq!(s.action, ActionType::Comment);
    }

    #[test]
    fn insufficient_samples() {
        assert_eq!(
            stagnation(&[], now(), &cfg()),
            Err(Ineligible::InsufficientSamples)
        );
        let two = [pt(10, 0, 0), pt(0, 10, 0)];
        assert_eq!(
            stagnation(&two, now(), &cfg()),
            Err(Ineligible::InsufficientSamples)
        );
        // min_samples of 0 still needs one point to measure anything.
        let zero = PostHealingConfig {
            min_samples: 0,
            ..cfg()
        };
        assert_eq!(
            stagnation(&[], now(), &zero),
            Err(Ineligible::InsufficientSamples)
        );
    }

    #[test]
    fn flat_impressions_mean_rate_zero() {
        let points = [pt(60, 500, 10), pt(30, 500, 20), pt(0, 500, 30)];
        let s = stagnation(&points, now(), &cfg()).expect("enough samples");
        assert_eq!(s.engagement_rate, 0.0);
        assert_eq!(s.score, 1.0);
        assert_eq!(s.impressions, 0);
        // Impressions going down (counter reset) is also "did not grow".
        let down = [pt(60, 500, 10), pt(30, 400, 20), pt(0, 300, 30)];
        assert_eq!(
            stagnation(&down, now(), &cfg()).map(|s| (s.engagement_rate, s.impressions)),
            Ok((0.0, 0)),
            "a counter going down gained nothing"
        );
    }

    #[test]
    fn tier_boundaries() {
        let tier = |imp, eng| stagnation(&series(imp, eng), now(), &cfg()).expect("enough samples");
        // rate 1 % -> score exactly 0.8 -> tier 3.
        let s = tier(100, 1);
        assert_eq!(s.score, 0.8);
        assert_eq!((s.tier, s.action), (Tier::Tier3, ActionType::Thread));
        // rate just above 1 % -> just below 0.8 -> tier 2.
        let s = tier(100_000, 1_001);
        assert!(s.score < 0.8 && s.score > 0.79);
        assert_eq!((s.tier, s.action), (Tier::Tier2, ActionType::Edit));
        // rate 2.25 % -> score exactly 0.55 -> tier 2.
        let s = tier(400, 9);
        assert_eq!(s.score, 0.55);
        assert_eq!(s.tier, Tier::Tier2);
        // just above 2.25 % -> just below 0.55 -> tier 1.
        let s = tier(400_000, 9_001);
        assert!(s.score < 0.55 && s.score > 0.54);
        assert_eq!((s.tier, s.action), (Tier::Tier1, ActionType::Comment));
        // 5 % and above -> score 0.
        assert_eq!(tier(100, 5).score, 0.0);
        assert_eq!(tier(100, 50).score, 0.0);
    }

    #[test]
    fn idempotency_key_matches_python() {
        let key = idempotency_key("p1", ActionType::Thread, Tier::Tier3);
        // From `printf 'p1:thread:tier_3' | sha256sum`.
        assert_eq!(key, "sheal_2304be7ef58ba8f0e6dd06cb68632a31");
        // Independently from sha2, so a change to the formatting code is caught.
        let hex: String = Sha256::digest(b"p1:thread:tier_3")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(key, format!("sheal_{}", &hex[..32]));
        assert_ne!(key, idempotency_key("p1", ActionType::Edit, Tier::Tier3));
        assert_ne!(key, idempotency_key("p2", ActionType::Thread, Tier::Tier3));
    }

    #[test]
    fn effective_status_and_expired_leases() {
        let mut r = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Running,
            20,
        );
        assert_eq!(effective(&r, now()), (ActionStatus::Running, None));
        r.lease_expires_at = Some(now() + Duration::minutes(1));
        assert_eq!(effective(&r, now()), (ActionStatus::Running, None));
        r.lease_expires_at = Some(now());
        assert_eq!(
            effective(&r, now()),
            (ActionStatus::Failed, Some("timeout".to_owned()))
        );
        // An expired lease on a finished record changes nothing.
        let mut done = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Succeeded,
            20,
        );
        done.lease_expires_at = Some(mins_ago(5));
        assert_eq!(effective(&done, now()), (ActionStatus::Succeeded, None));
        let mut failed = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Failed,
            20,
        );
        failed.error_code = Some("rate_limit".to_owned());
        assert_eq!(
            effective(&failed, now()),
            (ActionStatus::Failed, Some("rate_limit".to_owned()))
        );
    }

    #[test]
    fn a_claim_times_out_exactly_at_its_lease_end() {
        let mut r = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Running,
            20,
        );
        let end = mins_ago(5);
        r.lease_expires_at = Some(end);
        let before = as_of(r.clone(), end - Duration::microseconds(1));
        assert_eq!(before, r, "within its lease a claim is left alone");
        let timed_out = as_of(r.clone(), end);
        assert_eq!(timed_out.status, ActionStatus::Failed);
        assert_eq!(timed_out.error_code.as_deref(), Some(LEASE_TIMEOUT_ERROR));
        assert_eq!(
            timed_out.attempts, 2,
            "the expired claim counts as an attempt"
        );
        assert_eq!(timed_out.updated_at, end, "it stopped when its lease ended");
        assert_eq!(timed_out.lease_expires_at, Some(end));
        // The same rule as `effective`.
        assert_eq!(
            effective(&r, end),
            (timed_out.status, timed_out.error_code.clone())
        );
        // Without a lease, or finished, nothing changes.
        let mut no_lease = r.clone();
        no_lease.lease_expires_at = None;
        assert_eq!(as_of(no_lease.clone(), now()), no_lease);
        let mut done = r.clone();
        done.status = ActionStatus::Succeeded;
        assert_eq!(as_of(done.clone(), now()), done);
    }

    #[test]
    fn a_claim_keeps_the_attempts_of_the_record_it_reruns() {
        let stag = Stagnation {
            samples: 3,
            impressions: 1000,
            engagement_rate: 0.0,
            score: 1.0,
            tier: Tier::Tier3,
            action: ActionType::Thread,
        };
        let lease = Duration::minutes(15);
        let key = window_key("p1", ActionType::Thread, Tier::Tier3, WINDOW);
        let fresh = claim(None, &key, "p1", &stag, now(), lease);
        assert_eq!(fresh.idempotency_key, key);
        assert_eq!((fresh.status, fresh.attempts), (ActionStatus::Running, 0));
        assert_eq!((fresh.created_at, fresh.updated_at), (now(), now()));
        assert_eq!(fresh.lease_expires_at, Some(now() + lease));
        let mut old = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Running,
            40,
        );
        old.lease_expires_at = Some(mins_ago(25));
        assert_eq!(old.idempotency_key, key, "claimed earlier in this window");
        let expired = as_of(old.clone(), now());
        let rerun = claim(Some(&expired), &key, "p1", &stag, now(), lease);
        assert_eq!(rerun.attempts, 2, "1 reported + the expired claim");
        assert_eq!(rerun.created_at, old.created_at);
        assert_eq!(rerun.error_code, None);
    }

    #[test]
    fn each_reported_outcome_is_an_attempt_and_only_a_claim_grants_a_lease() {
        let mut running = rec(
            "p1",
            ActionType::Edit,
            Tier::Tier2,
            ActionStatus::Running,
            10,
        );
        running.lease_expires_at = Some(now() + Duration::minutes(5));
        let still = apply_outcome(running.clone(), ActionStatus::Running, None, now());
        assert_eq!(still.lease_expires_at, running.lease_expires_at);
        assert_eq!((still.attempts, still.updated_at), (2, now()));
        let failed = apply_outcome(
            running.clone(),
            ActionStatus::Failed,
            Some("rate_limit".into()),
            now(),
        );
        assert_eq!(failed.lease_expires_at, None);
        assert_eq!(failed.error_code.as_deref(), Some("rate_limit"));
        let new = reported(
            &running.idempotency_key,
            "p1",
            ActionType::Edit,
            Tier::Tier2,
            ActionStatus::Succeeded,
            now(),
        );
        assert_eq!(new.attempts, 0);
        assert_eq!(
            apply_outcome(new, ActionStatus::Succeeded, None, now()).attempts,
            1
        );
    }

    #[test]
    fn a_report_creates_a_record_only_under_its_own_key() {
        let window = cfg().window;
        let status = ActionStatus::Failed;
        let report = |key: &str, post: &str| {
            reported_as(
                key,
                post,
                ActionType::Edit,
                Tier::Tier2,
                status,
                now(),
                window,
            )
        };
        // The current window's key, the one before's, and the seed's key.
        for key in [
            window_key("p1", ActionType::Edit, Tier::Tier2, WINDOW),
            window_key("p1", ActionType::Edit, Tier::Tier2, WINDOW - 1),
            idempotency_key("p1", ActionType::Edit, Tier::Tier2),
        ] {
            assert_eq!(
                report(&key, "p1"),
                Ok(reported(
                    &key,
                    "p1",
                    ActionType::Edit,
                    Tier::Tier2,
                    status,
                    now()
                ))
            );
        }

        // Another post's key (each form) does not fit.
        for (key, expected) in [
            (
                window_key("p1", ActionType::Edit, Tier::Tier2, WINDOW),
                window_key("p2", ActionType::Edit, Tier::Tier2, WINDOW),
            ),
            (
                idempotency_key("p1", ActionType::Edit, Tier::Tier2),
                idempotency_key("p2", ActionType::Edit, Tier::Tier2),
            ),
        ] {
            let other = report(&key, "p2");
            assert_eq!(
                other,
                Err(KeyMismatch::Hash {
                    given: key.clone(),
                    expected: expected.clone()
                })
            );
            assert_eq!(
                other.unwrap_err().to_string(),
                format!(
                    "idempotency_key {key:?} does not match post_id, action_type and tier \
                     (expected {expected:?})"
                )
            );
        }

        // A window the caller picks, earlier or later, is refused.
        for w in [WINDOW - 2, WINDOW + 1, i64::MIN, i64::MAX] {
            let key = window_key("p1", ActionType::Edit, Tier::Tier2, w);
            let refused = report(&key, "p1");
            assert_eq!(
                refused,
                Err(KeyMismatch::Window {
                    given: key.clone(),
                    window: w,
                    current: WINDOW
                })
            );
            let message = refused.unwrap_err().to_string();
            assert!(
                message.contains(&format!("post window {w}"))
                    && message.contains(&format!("({WINDOW})")),
                "{message}"
            );
        }
    }

    #[test]
    fn tiers_and_actions_are_each_other_s_inverse() {
        for action in ActionType::ALL {
            assert_eq!(Tier::of(action).action(), action);
        }
        for tier in Tier::ALL {
            assert_eq!(Tier::of(tier.action()), tier);
        }
    }

    fn stalled() -> Vec<MetricPoint> {
        series(1000, 0) // score 1 -> thread, tier 3
    }

    #[test]
    fn eligible_when_no_guardrail_applies() {
        let e = evaluate("p1", &stalled(), &[], now(), &cfg());
        assert!(e.eligible);
        assert_eq!(e.reason, None);
        // From `printf 'p1:thread:tier_3:323848' | sha256sum`.
        assert_eq!(
            e.idempotency_key.as_deref(),
            Some("shealw_323848_71870e88c3db790e2665c1402632ff86")
        );
        assert_eq!(e.stagnation.map(|s| s.tier), Some(Tier::Tier3));
        assert_eq!(e.proposed(), e.stagnation.as_ref());
        assert_eq!((e.samples, e.impressions), (3, 1000));
    }

    #[test]
    fn refusal_insufficient_samples_comes_first() {
        // Even with a duplicate in history, missing samples is the reason.
        let history = [rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Succeeded,
            1,
        )];
        let e = evaluate("p1", &stalled()[..2], &history, now(), &cfg());
        assert!(!e.eligible);
        assert_eq!(e.reason, Some(Ineligible::InsufficientSamples));
        assert_eq!(e.stagnation, None);
        assert_eq!(e.idempotency_key, None);
        assert_eq!((e.samples, e.impressions), (2, 0));
    }

    #[test]
    fn refusal_duplicate_before_frequency_and_cooldown() {
        // Running duplicate, also two recent records and a same-type record:
        // every later rule would trip too, duplicate must win.
        let history = [
            rec(
                "p1",
                ActionType::Thread,
                Tier::Tier3,
                ActionStatus::Running,
                5,
            ),
            rec(
                "p1",
                ActionType::Comment,
                Tier::Tier1,
                ActionStatus::Succeeded,
                10,
            ),
        ];
        let e = evaluate("p1", &stalled(), &history, now(), &cfg());
        assert_eq!(e.reason, Some(Ineligible::DuplicateAction));
        assert!(e.stagnation.is_some() && e.idempotency_key.is_some());

        // Earlier in this window, the thread succeeded: a duplicate, whatever
        // the cooldown says.
        let no_cooldown = PostHealingConfig {
            cooldown_thread: Duration::zero(),
            ..cfg()
        };
        let succeeded = [rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Succeeded,
            40,
        )];
        for config in [cfg(), no_cooldown] {
            assert_eq!(
                evaluate("p1", &stalled(), &succeeded, now(), &config).reason,
                Some(Ineligible::DuplicateAction)
            );
        }

        // A failed record with the same key is not a duplicate (it may be retried).
        let failed = [rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Failed,
            40,
        )];
        let e = evaluate("p1", &stalled(), &failed, now(), &no_cooldown);
        assert!(e.eligible, "{e:?}");
        assert_eq!(e.idempotency_key, Some(failed[0].idempotency_key.clone()));
    }

    #[test]
    fn expired_lease_no_longer_blocks_as_duplicate() {
        let no_cooldown = PostHealingConfig {
            cooldown_thread: Duration::zero(),
            ..cfg()
        };
        let mut r = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Running,
            40,
        );
        r.lease_expires_at = Some(mins_ago(25));
        assert!(evaluate("p1", &stalled(), &[r.clone()], now(), &no_cooldown).eligible);
        r.lease_expires_at = Some(now() + Duration::minutes(1));
        assert_eq!(
            evaluate("p1", &stalled(), &[r], now(), &no_cooldown).reason,
            Some(Ineligible::DuplicateAction)
        );
    }

    #[test]
    fn refusal_window_frequency_before_cooldown() {
        // Two records in the window (any status, any type); one is a thread so
        // the cooldown would trip too: frequency must win.
        let history = [
            rec(
                "p1",
                ActionType::Comment,
                Tier::Tier1,
                ActionStatus::Failed,
                80,
            ),
            rec(
                "p1",
                ActionType::Thread,
                Tier::Tier2,
                ActionStatus::Succeeded,
                89,
            ),
        ];
        let e = evaluate("p1", &stalled(), &history, now(), &cfg());
        assert_eq!(e.reason, Some(Ineligible::WindowFrequencyExceeded));

        // One of them just outside the window: under the cap.
        let history = [
            rec(
                "p1",
                ActionType::Comment,
                Tier::Tier1,
                ActionStatus::Failed,
                80,
            ),
            rec(
                "p1",
                ActionType::Edit,
                Tier::Tier2,
                ActionStatus::Succeeded,
                91,
            ),
        ];
        assert!(evaluate("p1", &stalled(), &history, now(), &cfg()).eligible);

        // The cap is configurable.
        let one = PostHealingConfig {
            max_actions_per_window: 1,
            ..cfg()
        };
        assert_eq!(
            evaluate("p1", &stalled(), &history, now(), &one).reason,
            Some(Ineligible::WindowFrequencyExceeded)
        );
    }

    #[test]
    fn refusal_cooldown_per_action_type() {
        // Thread cooldown is 3 h; a thread (different tier -> different key) 2 h ago blocks.
        let thread_2h = [rec(
            "p1",
            ActionType::Thread,
            Tier::Tier2,
            ActionStatus::Failed,
            120,
        )];
        assert_eq!(
            evaluate("p1", &stalled(), &thread_2h, now(), &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
        let thread_3h = [rec(
            "p1",
            ActionType::Thread,
            Tier::Tier2,
            ActionStatus::Failed,
            180,
        )];
        assert!(evaluate("p1", &stalled(), &thread_3h, now(), &cfg()).eligible);
        // Only the newest same-type record matters.
        let both = [
            thread_3h[0].clone(),
            rec(
                "p1",
                ActionType::Thread,
                Tier::Tier1,
                ActionStatus::Failed,
                179,
            ),
        ];
        assert_eq!(
            evaluate("p1", &stalled(), &both, now(), &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
        // Other action types do not count toward the thread cooldown.
        let comment = [rec(
            "p1",
            ActionType::Comment,
            Tier::Tier1,
            ActionStatus::Succeeded,
            100,
        )];
        assert!(evaluate("p1", &stalled(), &comment, now(), &cfg()).eligible);

        // Comment (tier 1, rate 3 %: engaging, but under the healthy floor): 30 min cooldown.
        let healthy = series(1000, 30);
        let c29 = [rec(
            "p1",
            ActionType::Comment,
            Tier::Tier3,
            ActionStatus::Succeeded,
            29,
        )];
        assert_eq!(
            evaluate("p1", &healthy, &c29, now(), &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
        let c30 = [rec(
            "p1",
            ActionType::Comment,
            Tier::Tier3,
            ActionStatus::Succeeded,
            30,
        )];
        assert!(evaluate("p1", &healthy, &c30, now(), &cfg()).eligible);

        // Edit (tier 2): 2 h cooldown.
        let mid = series(400, 9);
        let e119 = [rec(
            "p1",
            ActionType::Edit,
            Tier::Tier1,
            ActionStatus::Succeeded,
            119,
        )];
        assert_eq!(
            evaluate("p1", &mid, &e119, now(), &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
        let e120 = [rec(
            "p1",
            ActionType::Edit,
            Tier::Tier1,
            ActionStatus::Succeeded,
            120,
        )];
        assert!(evaluate("p1", &mid, &e120, now(), &cfg()).eligible);
    }

    #[test]
    fn a_healthy_post_gets_no_action() {
        // 5 % (the default floor, where the score reaches 0) and above: healthy,
        // even with a running duplicate and a full window in the history.
        let history = [
            rec(
                "p1",
                ActionType::Comment,
                Tier::Tier1,
                ActionStatus::Running,
                5,
            ),
            rec(
                "p1",
                ActionType::Edit,
                Tier::Tier2,
                ActionStatus::Succeeded,
                10,
            ),
        ];
        for eng in [50, 51, 100, 1000] {
            let e = evaluate("p1", &series(1000, eng), &history, now(), &cfg());
            assert!(!e.eligible);
            assert_eq!(e.reason, Some(Ineligible::Healthy), "{eng}");
            assert_eq!(e.idempotency_key, None, "no action is proposed");
            assert_eq!(e.proposed(), None);
            let measured = e.stagnation.expect("the rate was measured");
            assert!((measured.engagement_rate - eng as f64 / 1000.0).abs() < 1e-12);
            assert_eq!(measured.score, 0.0);
            assert_eq!((e.samples, e.impressions), (3, 1000));
        }
        // Just under the floor: an engaging post still gets its comment.
        let e = evaluate("p1", &series(1000, 49), &[], now(), &cfg());
        assert!(e.eligible, "{e:?}");
        assert_eq!(e.proposed().map(|s| s.action), Some(ActionType::Comment));

        // The floor is configurable, and the same rate decides it.
        let lower = PostHealingConfig {
            healthy_rate: 0.02,
            ..cfg()
        };
        assert_eq!(
            evaluate("p1", &series(1000, 20), &[], now(), &lower).reason,
            Some(Ineligible::Healthy)
        );
        let e = evaluate("p1", &series(1000, 19), &[], now(), &lower);
        assert!(e.eligible);
        assert_eq!(e.proposed().map(|s| s.tier), Some(Tier::Tier2));
        assert_eq!(Ineligible::Healthy.to_string(), "healthy");
    }

    #[test]
    fn no_stagnation_verdict_under_the_exposure_floor() {
        // 99 new impressions (under the default 100), none engaging: no verdict.
        for (imp, eng) in [(99, 0), (0, 0), (50, 25), (98, 1)] {
            let e = evaluate("p1", &series(imp, eng), &[], now(), &cfg());
            assert!(!e.eligible);
            assert_eq!(e.reason, Some(Ineligible::LowExposure), "{imp}/{eng}");
            assert_eq!(e.stagnation, None, "no stagnation verdict");
            assert_eq!(e.idempotency_key, None);
            assert_eq!((e.samples, e.impressions), (3, imp));
        }
        // Flat or falling impressions gained nothing.
        let flat = [pt(60, 500, 10), pt(30, 500, 20), pt(0, 500, 30)];
        let down = [pt(60, 500, 10), pt(30, 400, 20), pt(0, 300, 30)];
        for points in [&flat, &down] {
            let e = evaluate("p1", points, &[], now(), &cfg());
            assert_eq!(
                (e.reason, e.impressions),
                (Some(Ineligible::LowExposure), 0)
            );
        }
        // At the floor the rule judges: a thread.
        let e = evaluate("p1", &series(100, 0), &[], now(), &cfg());
        assert!(e.eligible, "{e:?}");
        assert_eq!(e.proposed().map(|s| s.tier), Some(Tier::Tier3));
        // Insufficient samples still come first.
        assert_eq!(
            evaluate("p1", &series(10, 0)[..2], &[], now(), &cfg()).reason,
            Some(Ineligible::InsufficientSamples)
        );
        // 0 turns the floor off: no new impressions is a full stall again.
        let off = PostHealingConfig {
            min_impressions: 0,
            ..cfg()
        };
        let e = evaluate("p1", &flat, &[], now(), &off);
        assert!(e.eligible, "{e:?}");
        assert_eq!(e.proposed().map(|s| s.score), Some(1.0));
        assert_eq!(Ineligible::LowExposure.to_string(), "low_exposure");
    }

    #[test]
    fn window_keys_name_their_window() {
        let window = Duration::minutes(90);
        assert_eq!(key_window(now(), window), WINDOW);
        let start = Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap();
        assert_eq!(
            key_window(start, window),
            WINDOW,
            "a window includes its start"
        );
        assert_eq!(
            key_window(start - Duration::milliseconds(1), window),
            WINDOW - 1
        );
        assert_eq!(key_window(start + window, window), WINDOW + 1);
        assert_eq!(key_window(DateTime::<Utc>::UNIX_EPOCH, window), 0);
        assert_eq!(
            key_window(DateTime::<Utc>::UNIX_EPOCH - Duration::seconds(1), window),
            -1,
            "floor, not truncation"
        );
        assert_eq!(
            key_window(now(), Duration::zero()),
            now().timestamp_millis()
        );

        let key = window_key("p1", ActionType::Edit, Tier::Tier2, WINDOW);
        let hex: String = Sha256::digest(b"p1:edit:tier_2:323848")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(key, format!("shealw_323848_{}", &hex[..32]));
        assert_eq!(key_form(&key), Some(KeyForm::Window(WINDOW)));
        let seed = idempotency_key("p1", ActionType::Edit, Tier::Tier2);
        assert_eq!(key_form(&seed), Some(KeyForm::Seed));
        assert_ne!(
            key,
            window_key("p1", ActionType::Edit, Tier::Tier2, WINDOW + 1)
        );
        assert_ne!(
            key,
            window_key("p1", ActionType::Thread, Tier::Tier2, WINDOW)
        );
        let negative = window_key("p1", ActionType::Edit, Tier::Tier2, -7);
        assert!(negative.starts_with("shealw_-7_"), "{negative}");
        assert_eq!(key_form(&negative), Some(KeyForm::Window(-7)));
        for bad in [
            "",
            "sheal_",
            "shealw_1_",
            "shealw__0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(key_form(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_tier_that_succeeded_acts_again_in_a_later_window_within_cap_and_cooldown() {
        let stalled_at = |at: DateTime<Utc>| {
            vec![
                MetricPoint {
                    at: at - Duration::minutes(60),
                    impressions: 0,
                    engagements: 0,
                },
                MetricPoint {
                    at,
                    impressions: 1000,
                    engagements: 0,
                },
                MetricPoint {
                    at: at - Duration::minutes(30),
                    impressions: 500,
                    engagements: 0,
                },
            ]
        };
        let comment = |at: DateTime<Utc>| {
            let mut points = stalled_at(at);
            points[1].engagements = 30; // 3 %: tier 1
            points[2].engagements = 15;
            points
        };
        // A comment succeeded 40 minutes ago, in this window (N).
        let done = rec(
            "p1",
            ActionType::Comment,
            Tier::Tier1,
            ActionStatus::Succeeded,
            40,
        );
        let history = [done.clone()];
        let e = evaluate("p1", &comment(now()), &history, now(), &cfg());
        assert_eq!(e.reason, Some(Ineligible::DuplicateAction));
        assert_eq!(e.idempotency_key.as_ref(), Some(&done.idempotency_key));
        // Still window N at its last instant: still a duplicate.
        let last = now() + Duration::minutes(45) - Duration::milliseconds(1);
        assert_eq!(
            evaluate("p1", &comment(last), &history, last, &cfg()).reason,
            Some(Ineligible::DuplicateAction)
        );

        // Window N+1 (13:30): the comment may act again, under a new key.
        let next = now() + Duration::minutes(45);
        let e = evaluate("p1", &comment(next), &history, next, &cfg());
        assert!(e.eligible, "{e:?}");
        let key = e.idempotency_key.expect("a key");
        assert_eq!(
            key,
            window_key("p1", ActionType::Comment, Tier::Tier1, WINDOW + 1)
        );
        assert_ne!(key, done.idempotency_key);

        // ...while the cooldowns hold: a comment 20 minutes before the
        // boundary is in its 30-minute cooldown just after it.
        let recent = rec(
            "p1",
            ActionType::Comment,
            Tier::Tier1,
            ActionStatus::Succeeded,
            -25,
        );
        assert_eq!(key_window(recent.created_at, cfg().window), WINDOW);
        let early = now() + Duration::minutes(46);
        assert_eq!(
            evaluate("p1", &comment(early), &[recent], early, &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
        // A thread that succeeded in window N: in window N+1 not a duplicate
        // but within its 3 h cooldown; eligible once that passed.
        let thread = [rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Succeeded,
            40,
        )];
        assert_eq!(
            evaluate("p1", &stalled_at(next), &thread, next, &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
        let later = now() + Duration::minutes(141);
        let e = evaluate("p1", &stalled_at(later), &thread, later, &cfg());
        assert!(e.eligible, "{e:?}");
        assert_ne!(e.idempotency_key, Some(thread[0].idempotency_key.clone()));

        // ...and the cap holds: two actions in the last 90 minutes, one of
        // them in the window before, leave no room.
        let full = [
            done.clone(),
            rec(
                "p1",
                ActionType::Edit,
                Tier::Tier2,
                ActionStatus::Failed,
                -30,
            ),
        ];
        let at = now() + Duration::minutes(46);
        let e = evaluate("p1", &stalled_at(at), &full, at, &cfg());
        assert_eq!(e.reason, Some(Ineligible::WindowFrequencyExceeded));
    }

    #[test]
    fn records_under_seed_keys_still_count() {
        let seed = |mut r: ActionRecord| {
            r.idempotency_key = idempotency_key(&r.post_id, r.action, r.tier);
            r
        };
        let no_cooldown = PostHealingConfig {
            cooldown_thread: Duration::zero(),
            ..cfg()
        };
        // A thread that succeeded under the seed's key in this window: a duplicate.
        for status in [ActionStatus::Succeeded, ActionStatus::Running] {
            let history = [seed(rec("p1", ActionType::Thread, Tier::Tier3, status, 40))];
            assert_eq!(
                evaluate("p1", &stalled(), &history, now(), &no_cooldown).reason,
                Some(Ineligible::DuplicateAction),
                "{status:?}"
            );
            // With the cooldown on, the duplicate is still the reason given.
            assert_eq!(
                evaluate("p1", &stalled(), &history, now(), &cfg()).reason,
                Some(Ineligible::DuplicateAction)
            );
        }
        // Failed, or in an earlier window: the thread may act (under a window key).
        let failed = [seed(rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Failed,
            40,
        ))];
        let earlier = [seed(rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Succeeded,
            50,
        ))];
        for history in [failed, earlier] {
            let e = evaluate("p1", &stalled(), &history, now(), &no_cooldown);
            assert!(e.eligible, "{e:?}");
            assert_eq!(
                e.idempotency_key,
                Some(window_key("p1", ActionType::Thread, Tier::Tier3, WINDOW))
            );
        }
        // They count toward the cap and the cooldowns like any record.
        let two = [
            seed(rec(
                "p1",
                ActionType::Comment,
                Tier::Tier1,
                ActionStatus::Succeeded,
                80,
            )),
            seed(rec(
                "p1",
                ActionType::Edit,
                Tier::Tier2,
                ActionStatus::Failed,
                60,
            )),
        ];
        assert_eq!(
            evaluate("p1", &stalled(), &two, now(), &cfg()).reason,
            Some(Ineligible::WindowFrequencyExceeded)
        );
        let thread = [seed(rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Failed,
            100,
        ))];
        assert_eq!(
            evaluate("p1", &stalled(), &thread, now(), &cfg()).reason,
            Some(Ineligible::ActionCooldownActive)
        );
    }

    fn failed_with(code: Option<&str>, attempts: i32) -> ActionRecord {
        let mut r = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Failed,
            10,
        );
        r.error_code = code.map(str::to_owned);
        r.attempts = attempts;
        r
    }

    #[test]
    fn retry_only_transient_failures() {
        let mut rng = StdRng::seed_from_u64(1);
        for code in TRANSIENT_ERRORS {
            let d = should_retry(&failed_with(Some(code), 1), now(), &cfg(), &mut rng);
            assert!(d.retry, "{code}");
            assert_eq!(d.reason, "transient_error");
            assert!(d.not_before.is_some());
        }
        for code in [Some("content_rejected"), Some("auth_failed"), None] {
            let d = should_retry(&failed_with(code, 1), now(), &cfg(), &mut rng);
            assert!(!d.retry, "{code:?}");
            assert_eq!(d.reason, "permanent_error");
            assert_eq!(d.not_before, None);
        }
        for status in [ActionStatus::Running, ActionStatus::Succeeded] {
            let mut r = failed_with(Some("timeout"), 1);
            r.status = status;
            let d = should_retry(&r, now(), &cfg(), &mut rng);
            assert_eq!((d.retry, d.reason.as_str()), (false, "not_failed"));
        }
    }

    #[test]
    fn retry_attempts_cap() {
        let mut rng = StdRng::seed_from_u64(2);
        assert!(should_retry(&failed_with(Some("timeout"), 2), now(), &cfg(), &mut rng).retry);
        let d = should_retry(&failed_with(Some("timeout"), 3), now(), &cfg(), &mut rng);
        assert_eq!(
            (d.retry, d.reason.as_str()),
            (false, "max_attempts_reached")
        );
        assert!(
            !should_retry(
                &failed_with(Some("timeout"), i32::MAX),
                now(),
                &cfg(),
                &mut rng
            )
            .retry
        );
    }

    #[test]
    fn expired_lease_is_retried_from_lease_expiry() {
        let mut r = rec(
            "p1",
            ActionType::Thread,
            Tier::Tier3,
            ActionStatus::Running,
            60,
        );
        r.lease_expires_at = Some(mins_ago(45));
        let d = should_retry(&r, now(), &cfg(), &mut StdRng::seed_from_u64(3));
        assert!(d.retry);
        let nb = d.not_before.expect("retry has a time");
        let from = mins_ago(45);
        assert!(
            nb >= from + Duration::seconds(48) && nb <= from + Duration::seconds(72),
            "{nb}"
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jitter_bounded() {
        let config = PostHealingConfig {
            max_attempts: 100,
            ..cfg()
        };
        let mut rng = StdRng::seed_from_u64(4);
        let (mut lo_seen, mut hi_seen) = (f64::MAX, f64::MIN);
        for attempts in 1..=12 {
            let r = failed_with(Some("rate_limit"), attempts);
            let expected = (60.0 * 2f64.powi(attempts - 1)).min(3600.0);
            for _ in 0..200 {
                let d = should_retry(&r, now(), &config, &mut rng);
                let nb = d.not_before.expect("retry has a time");
                let secs = (nb - r.updated_at).num_milliseconds() as f64 / 1000.0;
                let factor = secs / expected;
                assert!(
                    (0.8 - 1e-6..=1.2 + 1e-6).contains(&factor),
                    "attempts {attempts}: {secs}s"
                );
                lo_seen = lo_seen.min(factor);
                hi_seen = hi_seen.max(factor);
            }
        }
        // The jitter actually varies across its range.
        assert!(lo_seen < 0.85 && hi_seen > 1.15, "{lo_seen}..{hi_seen}");
        // Growth: attempt 2 waits twice attempt 1 (before jitter), attempt 7+ is capped at 1 h.
        assert_eq!(backoff_ms(1, &config), 60_000.0);
        assert_eq!(backoff_ms(2, &config), 120_000.0);
        assert_eq!(backoff_ms(3, &config), 240_000.0);
        assert_eq!(backoff_ms(7, &config), 3_600_000.0);
        assert_eq!(backoff_ms(i32::MAX, &config), 3_600_000.0);
        assert_eq!(backoff_ms(0, &config), 60_000.0);
        assert_eq!(backoff_ms(i32::MIN, &config), 60_000.0);
    }

    #[test]
    fn extreme_configs_and_dates_do_not_panic() {
        let huge = PostHealingConfig {
            window: Duration::MAX,
            retry_base: Duration::MAX,
            retry_max: Duration::MAX,
            cooldown_thread: Duration::MAX,
            max_attempts: i32::MAX,
            ..cfg()
        };
        let mut r = failed_with(Some("timeout"), 5);
        r.updated_at = DateTime::<Utc>::MAX_UTC;
        let d = should_retry(
            &r,
            DateTime::<Utc>::MAX_UTC,
            &huge,
            &mut StdRng::seed_from_u64(5),
        );
        assert_eq!(d.not_before, Some(DateTime::<Utc>::MAX_UTC));
        let e = evaluate("p1", &stalled(), &[r], DateTime::<Utc>::MIN_UTC, &huge);
        assert!(!e.eligible);
        let negative = PostHealingConfig {
            window: Duration::MIN,
            retry_base: Duration::MIN,
            ..cfg()
        };
        let _ = evaluate("p1", &stalled(), &[], now(), &negative);
        let _ = should_retry(
            &failed_with(Some("timeout"), 1),
            now(),
            &negative,
            &mut StdRng::seed_from_u64(6),
        );
    }

    proptest! {
        #[test]
        fn stagnation_never_panics_and_score_in_range(
            raw in proptest::collection::vec((-10_000i64..10_000, any::<i64>(), any::<i64>()), 0..12),
            window_secs in any::<i64>(),
            min_samples in 0usize..6,
        ) {
            let points: Vec<MetricPoint> = raw
                .into_iter()
                .map(|(secs, impressions, engagements)| MetricPoint { at: now() + Duration::seconds(secs), impressions, engagements })
                .collect();
            let config = PostHealingConfig {
                window: Duration::try_seconds(window_secs).unwrap_or(Duration::MAX),
                min_samples,
                ..cfg()
            };
            if let Ok(s) = stagnation(&points, now(), &config) {
                prop_assert!((0.0..=1.0).contains(&s.score));
                prop_assert!(s.engagement_rate.is_finite());
                prop_assert!(s.samples >= min_samples.max(1));
                prop_assert_eq!(s.action, s.tier.action());
            }
            let e = evaluate("p", &points, &[], now(), &config);
            prop_assert_eq!(e.eligible, e.reason.is_none());
            prop_assert!(!e.eligible || e.proposed().is_some());
            prop_assert!(e.impressions >= 0);
        }
    }
}
