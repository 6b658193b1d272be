//! Inferring when a quota- or billing-exhausted agent may run again.
//!
//! When a provider answers with a rate-limit or billing error the agent is
//! parked as EXHAUSTED until a recovery time. [`infer_recovery`] infers that
//! time from, in order of trust (the first source that yields a time wins):
//!
//! 1. an explicit time supplied by the caller,
//! 2. the standard `Retry-After` header (or its millisecond variant)
//!    ([`headers`]),
//! 3. provider reset headers: the unified Anthropic subscription family
//!    (`anthropic-ratelimit-unified-*`), then OpenAI `x-ratelimit-reset-*`
//!    and Anthropic `anthropic-ratelimit-*-reset` ([`headers`]),
//! 4. the message: a JSON body read as JSON ([`json`]), otherwise the prose
//!    ([`message`], with the date forms in [`dates`]),
//! 5. a configured default: the billing default for a billing stop
//!    ([`billing`]), otherwise the rate-limit default.
//!
//! A JSON body counts as [`RecoverySource::Message`]: it is what the caller
//! put in the message field, and its hint names the JSON field that decided.
//!
//! A billing stop (OpenAI `insufficient_quota` and friends, recognised from
//! codes and wording) is not a rate window: retrying soon will not help. Its
//! rate-window reset headers (step 3) are skipped, since they describe
//! request and token windows rather than the billing stop, and its hint
//! starts with `billing: <what was recognised>`.
//!
//! Wall-clock times without a date ("resets 2am") mean their next
//! occurrence in the zone the message names ("(America/Los_Angeles)") or
//! else in the caller's zone ([`RecoveryInput::time_zone`], see
//! [`resolve_time_zone`]).
//!
//! The module is pure: it performs no I/O and never reads the clock; `now` is
//! always passed in, which keeps it deterministic and easy to test.
//!
//! Two rules apply to every source except the explicit time and the default:
//! a time in the past means "recover now" and is clamped to `now`, while a
//! delay that is negative, not a number, or further away than
//! [`max_recovery_delay`] is treated as garbage and the next source is tried.
//! Nothing here may panic on any input: all date arithmetic is checked and
//! all string slicing happens on character boundaries.

use chrono::{DateTime, Duration, SecondsFormat, Utc};

pub mod billing;
pub mod dates;
pub mod headers;
pub mod json;
pub mod message;

pub use chrono_tz::Tz;

pub use dates::parse_http_date;
use headers::retry_after_from_headers;
pub use headers::{
    parse_go_duration, parse_provider_headers, parse_provider_reset, parse_retry_after,
    parse_retry_after_ms,
};
pub use message::{parse_human_duration, parse_message};

/// Where the recovery time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoverySource {
    /// Supplied by the caller.
    Explicit,
    /// `Retry-After` (or `retry-after-ms`).
    RetryAfterHeader,
    /// OpenAI `x-ratelimit-reset-*` or Anthropic `anthropic-ratelimit-*-reset`.
    ProviderResetHeader,
    /// The provider's error message.
    Message,
    /// Nothing usable: `now + default_recovery`.
    Default,
}

impl RecoverySource {
    /// Every source, in precedence order.
    pub const ALL: [RecoverySource; 5] = [
        RecoverySource::Explicit,
        RecoverySource::RetryAfterHeader,
        RecoverySource::ProviderResetHeader,
        RecoverySource::Message,
        RecoverySource::Default,
    ];

    /// The stored (and fixture) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoverySource::Explicit => "EXPLICIT",
            RecoverySource::RetryAfterHeader => "RETRY_AFTER_HEADER",
            RecoverySource::ProviderResetHeader => "PROVIDER_RESET_HEADER",
            RecoverySource::Message => "MESSAGE",
            RecoverySource::Default => "DEFAULT",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|source| source.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryEstimate {
    pub recovery_at: DateTime<Utc>,
    pub source: RecoverySource,
    /// The raw text that decided it, e.g. "retry-after: 30",
    /// "x-ratelimit-reset-tokens: 6m0s", "reset in 12 mins", "default 5h".
    /// Bounded to [`MAX_HINT_CHARS`] chars.
    pub hint: String,
}

/// Upper bound on the length of [`RecoveryEstimate::hint`], in chars. Hints
/// end up in logs and status output, and header values or messages are
/// attacker-sized, so they are truncated.
pub const MAX_HINT_CHARS: usize = 256;

/// Seconds in [`max_recovery_delay`]; kept as a float because the parsers
/// accumulate fractional components before converting to a `Duration`.
pub(super) const MAX_DELAY_SECS: f64 = 366.0 * 86_400.0;

/// The furthest into the future an inferred recovery may lie. Anything beyond
/// a year is far more likely a misparse (an epoch timestamp read as seconds,
/// "500 minutes" for "500ms", ...) than a real reset, so it is rejected.
pub fn max_recovery_delay() -> Duration {
    Duration::days(366)
}

/// Checks a caller's explicit recovery time against the parsers' horizon: a
/// time more than [`max_recovery_delay`] after `now` (the server's clock) is
/// refused with a message naming the bound; a past time is fine (it means now).
pub fn check_explicit_recovery(
    field: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    match accept_time(at, now) {
        Some(_) => Ok(at),
        None => Err(format!(
            "{field} {} is more than {} days ahead of the server's clock; at most {} allowed",
            at.to_rfc3339_opts(SecondsFormat::Secs, true),
            max_recovery_delay().num_days(),
            format_duration(max_recovery_delay()),
        )),
    }
}

/// Everything [`infer_recovery`] reads besides the clock.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryInput<'a> {
    /// The caller's explicit recovery time, trusted as is.
    pub explicit: Option<DateTime<Utc>>,
    /// `(name, value)` pairs as received: names in any case, and a name may repeat.
    pub headers: &'a [(String, String)],
    /// The provider's error text or JSON body.
    pub message: &'a str,
    /// The zone of wall-clock times that name none, already resolved (see
    /// [`resolve_time_zone`]).
    pub time_zone: Tz,
    /// How long a rate-limited agent is parked when nothing says.
    pub default_recovery: Duration,
    /// How long an agent at a billing stop is parked when nothing says.
    pub default_billing_recovery: Duration,
}

/// The inferred recovery, and whether the input shows a billing stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inference {
    pub estimate: RecoveryEstimate,
    /// What was recognised as a billing stop (a code such as
    /// `insufficient_quota`, or the wording), when it was.
    pub billing: Option<String>,
}

/// Infers when an exhausted agent may be retried. See the module
/// documentation for the order of sources.
pub fn infer_recovery(input: &RecoveryInput<'_>, now: DateTime<Utc>) -> Inference {
    let body = json::read(input.message, now, input.time_zone);
    let billing = match &body {
        Some(body) => body.billing.clone(),
        None => billing::in_text(input.message),
    };
    let prefix = billing
        .as_ref()
        .map(|what| format!("billing: {what}; "))
        .unwrap_or_default();
    let estimate = |recovery_at, source, hint: String| RecoveryEstimate {
        recovery_at,
        source,
        hint: bound_hint(&format!("{prefix}{hint}")),
    };
    let estimate = (|| {
        // The caller knows best (e.g. an operator parked the agent until a
        // given time), so the explicit time is trusted as is apart from the
        // past clamp.
        if let Some(at) = input.explicit {
            let hint = format!(
                "explicit {}",
                at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
            return estimate(at.max(now), RecoverySource::Explicit, hint);
        }

        if let Some((at, hint)) = retry_after_from_headers(input.headers, now) {
            return estimate(at, RecoverySource::RetryAfterHeader, hint);
        }

        // Rate-window resets say when a window refills, not when a billing
        // stop lifts.
        if billing.is_none()
            && let Some((at, hint)) = headers::parse_reset_headers(input.headers, now)
        {
            return estimate(at, RecoverySource::ProviderResetHeader, hint);
        }

        let from_message = match &body {
            Some(body) => body.recovery.clone(),
            None => parse_message(input.message, now, input.time_zone),
        };
        if let Some((at, text)) = from_message {
            return estimate(at, RecoverySource::Message, text);
        }

        let default = match billing {
            Some(_) => input.default_billing_recovery,
            None => input.default_recovery,
        };
        // A negative default means "now"; an overflowing one saturates rather
        // than panicking.
        let at = now
            .checked_add_signed(default)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
            .max(now);
        let hint = format!("default {}", format_duration(default));
        estimate(at, RecoverySource::Default, hint)
    })();
    Inference { estimate, billing }
}

/// An IANA zone name (`America/Los_Angeles`, `Europe/London`, `UTC`), exact
/// or in another case. The database is compiled in (chrono-tz), so this does
/// not depend on the host's tzdata.
pub fn parse_time_zone(name: &str) -> Option<Tz> {
    let name = name.trim();
    if name.is_empty() || name.len() > 64 {
        return None;
    }
    name.parse::<Tz>().ok().or_else(|| {
        chrono_tz::TZ_VARIANTS
            .iter()
            .copied()
            .find(|tz| tz.name().eq_ignore_ascii_case(name))
    })
}

/// The agent label that names its zone.
pub const TIME_ZONE_LABEL: &str = "time_zone";

/// The zone for wall-clock times that name none: the request's zone, else
/// the agent's `time_zone` label, else UTC. An unknown name in the label is
/// ignored (labels are free-form); the request's zone is validated before it
/// gets here, and an unknown one is ignored likewise.
pub fn resolve_time_zone(request: Option<&str>, labels: &crate::domain::labels::Labels) -> Tz {
    request
        .and_then(parse_time_zone)
        .or_else(|| labels.get(TIME_ZONE_LABEL).and_then(|z| parse_time_zone(z)))
        .unwrap_or(Tz::UTC)
}

/// An epoch timestamp as providers send it: seconds, or milliseconds when
/// the number is too large to be seconds of this era. Accepted like any
/// absolute time (past means now, beyond the horizon is rejected).
pub(super) fn epoch_to_time(value: f64, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    // 1e11 s is the year 5138; anything above is milliseconds.
    let secs = if value >= 1e11 { value / 1000.0 } else { value };
    if secs >= 1e11 {
        return None;
    }
    let whole = secs.trunc() as i64;
    let nanos = ((secs - secs.trunc()) * 1e9) as u32;
    accept_time(
        DateTime::from_timestamp(whole, nanos.min(999_999_999))?,
        now,
    )
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Applies the two global rules to an absolute time: the past means now, and
/// more than [`max_recovery_delay`] ahead is rejected.
pub(super) fn accept_time(at: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if at <= now {
        return Some(now);
    }
    match now.checked_add_signed(max_recovery_delay()) {
        Some(limit) if at > limit => None,
        // If `now + limit` overflows, every representable time is in range.
        _ => Some(at),
    }
}

/// `now + delay`, or `None` if the result is not representable.
pub(super) fn after(now: DateTime<Utc>, delay: Duration) -> Option<DateTime<Utc>> {
    now.checked_add_signed(delay)
}

/// Converts a number of seconds to a `Duration`, rejecting NaN, infinities,
/// negatives and anything beyond [`max_recovery_delay`].
pub(super) fn seconds_to_duration(secs: f64) -> Option<Duration> {
    // A NaN or infinity is outside every range, so this rejects those too.
    if !(0.0..=MAX_DELAY_SECS).contains(&secs) {
        return None;
    }
    // At most 366 days is ~3.2e16 ns, well inside i64, so the cast is exact
    // enough and cannot saturate.
    Some(Duration::nanoseconds((secs * 1e9).round() as i64))
}

/// Truncates a hint to [`MAX_HINT_CHARS`] chars (not bytes, so multi-byte
/// text is never cut mid-character), marking the cut with an ellipsis.
pub(super) fn bound_hint(hint: &str) -> String {
    if hint.chars().count() <= MAX_HINT_CHARS {
        return hint.to_owned();
    }
    let mut out: String = hint.chars().take(MAX_HINT_CHARS - 1).collect();
    out.push('…');
    out
}

/// Formats a duration in the largest unit that represents it exactly, so
/// hints read "5h" or "90s" rather than "18000s" or "1m30s".
pub fn format_duration(d: Duration) -> String {
    let ms = d.num_milliseconds();
    if ms == 0 {
        return "0s".to_owned();
    }
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    for (unit_ms, suffix) in UNITS {
        if abs.is_multiple_of(unit_ms) {
            return format!("{sign}{}{suffix}", abs / unit_ms);
        }
    }
    format!("{sign}{abs}ms")
}

/// Parses an unsigned decimal number (`12`, `1.5`, `.5`) at the start of `s`.
/// Returns the value and the number of bytes consumed. Only ASCII digits are
/// accepted, so the returned length is always a char boundary.
pub(super) fn leading_number(s: &str) -> Option<(f64, usize)> {
    let bytes = s.as_bytes();
    let int_len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut len = int_len;
    if bytes.get(len) == Some(&b'.') {
        let frac_len = bytes[len + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        // "1." is not a number here: the dot is punctuation ("in 5.").
        if frac_len > 0 {
            len += 1 + frac_len;
        }
    }
    if len == 0 {
        return None;
    }
    s[..len].parse::<f64>().ok().map(|v| (v, len))
}

/// The maximal run of alphabetic chars at the start of `s`, and its byte
/// length. Taking the whole run is what makes units end at a word boundary:
/// "5 months" yields "months", which is not a unit, rather than "m".
pub(super) fn leading_word(s: &str) -> (&str, usize) {
    let len = s
        .char_indices()
        .find(|(_, c)| !c.is_alphabetic())
        .map_or(s.len(), |(i, _)| i);
    (&s[..len], len)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test timestamp")
            .with_timezone(&Utc)
    }

    pub fn now() -> DateTime<Utc> {
        ts("2026-03-01T12:00:00Z")
    }

    pub fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The inference with UTC as the caller's zone and a 24 h billing default.
    pub fn infer_utc(
        explicit: Option<DateTime<Utc>>,
        headers: &[(String, String)],
        message: &str,
        now: DateTime<Utc>,
        default_recovery: Duration,
    ) -> RecoveryEstimate {
        let input = RecoveryInput {
            explicit,
            headers,
            message,
            time_zone: Tz::UTC,
            default_recovery,
            default_billing_recovery: Duration::hours(24),
        };
        infer_recovery(&input, now).estimate
    }

    /// Expands the fixture's placeholders against `now`: `{epoch+N}` and
    /// `{epoch_ms+N}` are `now + N s` as epoch seconds or milliseconds, and
    /// `{codex_at+N}` is `now + N s` written as Codex writes it ("Jul 5th,
    /// 2026 8:19 PM") in the form's `time_zone` (UTC when unset).
    /// tests/api/recovery.rs has the same expansion for the RPC test.
    pub fn expand_template(text: &str, now: DateTime<Utc>, form: &serde_json::Value) -> String {
        let re = regex::Regex::new(r"\{(epoch|epoch_ms|codex_at)\+([0-9]+)\}").unwrap();
        re.replace_all(text, |caps: &regex::Captures<'_>| {
            let at = now + Duration::seconds(caps[2].parse().unwrap());
            match &caps[1] {
                "epoch" => at.timestamp().to_string(),
                "epoch_ms" => at.timestamp_millis().to_string(),
                _ => {
                    let zone: Tz = form["time_zone"].as_str().unwrap_or("UTC").parse().unwrap();
                    let local = at.with_timezone(&zone);
                    let day = chrono::Datelike::day(&local);
                    let suffix = match (day % 10, day % 100) {
                        (_, 11..=13) => "th",
                        (1, _) => "st",
                        (2, _) => "nd",
                        (3, _) => "rd",
                        _ => "th",
                    };
                    format!(
                        "{} {day}{suffix}, {}",
                        local.format("%b"),
                        local.format("%Y %-I:%M %p")
                    )
                }
            }
        })
        .into_owned()
    }

    pub fn default_5h() -> Duration {
        Duration::hours(5)
    }

    pub fn infer(headers: &[(&str, &str)], message: &str) -> RecoveryEstimate {
        infer_utc(None, &hdrs(headers), message, now(), default_5h())
    }

    pub fn msg(message: &str) -> Option<(DateTime<Utc>, String)> {
        parse_message(message, now(), Tz::UTC)
    }

    pub fn msg_at(message: &str) -> DateTime<Utc> {
        msg(message)
            .unwrap_or_else(|| panic!("no match in {message:?}"))
            .0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recovery::test_support::*;
    use proptest::prelude::*;

    // --- explicit ----------------------------------------------------------

    #[test]
    fn explicit_future_is_used_as_is() {
        let at = ts("2026-03-02T00:00:00Z");
        let r = infer_utc(Some(at), &[], "", now(), default_5h());
        assert_eq!(r.recovery_at, at);
        assert_eq!(r.source, RecoverySource::Explicit);
        assert_eq!(r.hint, "explicit 2026-03-02T00:00:00Z");
    }

    #[test]
    fn explicit_in_the_past_clamps_to_now() {
        let r = infer_utc(
            Some(ts("2020-01-01T00:00:00Z")),
            &[],
            "",
            now(),
            default_5h(),
        );
        assert_eq!(r.recovery_at, now());
        assert_eq!(r.source, RecoverySource::Explicit);
    }

    #[test]
    fn explicit_beats_every_other_source() {
        let at = ts("2026-03-01T13:00:00Z");
        let headers = hdrs(&[("Retry-After", "30"), ("x-ratelimit-reset-tokens", "6m0s")]);
        let r = infer_utc(
            Some(at),
            &headers,
            "try again in 2 hours",
            now(),
            default_5h(),
        );
        assert_eq!(r.recovery_at, at);
        assert_eq!(r.source, RecoverySource::Explicit);
    }

    // --- default -----------------------------------------------------------

    #[test]
    fn message_beats_default() {
        let r = infer(&[], "quota exceeded, reset in 12 mins");
        assert_eq!(r.source, RecoverySource::Message);
        assert_eq!(r.recovery_at, now() + Duration::minutes(12));
        assert_eq!(r.hint, "reset in 12 mins");
    }

    #[test]
    fn default_when_nothing_parses() {
        let r = infer(&[("content-type", "application/json")], "quota exceeded");
        assert_eq!(r.source, RecoverySource::Default);
        assert_eq!(r.recovery_at, now() + Duration::hours(5));
        assert_eq!(r.hint, "default 5h");

        let r = infer_utc(None, &[], "", now(), Duration::seconds(90));
        assert_eq!(r.recovery_at, now() + Duration::seconds(90));
        assert_eq!(r.hint, "default 90s");
    }

    #[test]
    fn default_negative_or_huge_does_not_panic() {
        let r = infer_utc(None, &[], "", now(), Duration::hours(-3));
        assert_eq!(r.recovery_at, now());
        assert_eq!(r.hint, "default -3h");
        let r = infer_utc(None, &[], "", now(), Duration::MAX);
        assert_eq!(r.recovery_at, DateTime::<Utc>::MAX_UTC);
        assert_eq!(r.source, RecoverySource::Default);
    }

    #[test]
    fn human_duration_formatting() {
        let cases = [
            (Duration::hours(5), "5h"),
            (Duration::seconds(90), "90s"),
            (Duration::minutes(90), "90m"),
            (Duration::days(2), "2d"),
            (Duration::milliseconds(1500), "1500ms"),
            (Duration::zero(), "0s"),
            (Duration::minutes(-1), "-1m"),
        ];
        for (d, expected) in cases {
            assert_eq!(format_duration(d), expected);
        }
    }

    // --- hints and edge cases ----------------------------------------------

    #[test]
    fn hints_are_bounded_to_256_chars() {
        let name = format!("x-ratelimit-reset-{}", "é".repeat(1000));
        let r = infer(&[(name.as_str(), "10s")], "");
        assert_eq!(r.source, RecoverySource::ProviderResetHeader);
        assert_eq!(r.hint.chars().count(), MAX_HINT_CHARS);
        assert!(r.hint.ends_with('…'));
        assert!(r.hint.starts_with("x-ratelimit-reset-éé"));
    }

    #[test]
    fn near_the_end_of_time_nothing_overflows() {
        let late = DateTime::<Utc>::MAX_UTC - Duration::seconds(10);
        let headers = hdrs(&[("retry-after", "30")]);
        let r = infer_utc(
            None,
            &headers,
            "try again in 30 seconds",
            late,
            default_5h(),
        );
        // Neither source is representable; the default saturates.
        assert_eq!(r.source, RecoverySource::Default);
        assert_eq!(r.recovery_at, DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn human_duration_parser() {
        assert_eq!(
            parse_human_duration("1 hour 30 minutes"),
            Some(Duration::minutes(90))
        );
        assert_eq!(
            parse_human_duration("500ms"),
            Some(Duration::milliseconds(500))
        );
        assert_eq!(parse_human_duration("5 months"), None);
        assert_eq!(parse_human_duration("5 minutes later"), None);
    }

    #[test]
    fn large_pathological_inputs_are_handled() {
        // A huge number is parsed (to a huge float) and rejected, not
        // overflowed; a later valid phrase is still found.
        let digits = format!("in {} minutes; retry in 4s", "9".repeat(100_000));
        assert_eq!(msg_at(&digits), now() + Duration::seconds(4));
        // Many components that together exceed the bound are rejected.
        assert_eq!(msg(&format!("in {}", "1d ".repeat(50_000))), None);
        // Many anchors with no duration, then one with.
        let anchors = format!("{}after 2h", "in x ".repeat(50_000));
        assert_eq!(msg_at(&anchors), now() + Duration::hours(2));
        assert_eq!(
            parse_go_duration(&"1s".repeat(100_000)),
            Some(Duration::seconds(100_000))
        );
    }

    // --- billing stops -----------------------------------------------------

    fn infer_in(
        explicit: Option<DateTime<Utc>>,
        headers: &[(&str, &str)],
        message: &str,
        zone: Tz,
    ) -> Inference {
        let headers = hdrs(headers);
        let input = RecoveryInput {
            explicit,
            headers: &headers,
            message,
            time_zone: zone,
            default_recovery: default_5h(),
            default_billing_recovery: Duration::hours(24),
        };
        infer_recovery(&input, now())
    }

    #[test]
    fn billing_stop_parks_for_the_billing_default_and_says_why() {
        let r = infer_in(None, &[], "Error code: 429 - insufficient_quota", Tz::UTC);
        assert_eq!(r.billing.as_deref(), Some("insufficient_quota"));
        assert_eq!(r.estimate.source, RecoverySource::Default);
        assert_eq!(r.estimate.recovery_at, now() + Duration::hours(24));
        assert_eq!(r.estimate.hint, "billing: insufficient_quota; default 1d");
        // A rate limit is not a billing stop.
        let r = infer_in(None, &[], "rate limit reached", Tz::UTC);
        assert_eq!(r.billing, None);
        assert_eq!(r.estimate.recovery_at, now() + default_5h());
    }

    #[test]
    fn billing_stop_skips_rate_window_resets_but_not_explicit_times() {
        let body = r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}"#;
        let windows = [("x-ratelimit-reset-requests", "20s")];
        let r = infer_in(None, &windows, body, Tz::UTC);
        assert_eq!(r.estimate.source, RecoverySource::Default);
        assert_eq!(r.estimate.recovery_at, now() + Duration::hours(24));
        let r = infer_in(None, &[("retry-after", "600")], body, Tz::UTC);
        assert_eq!(r.estimate.source, RecoverySource::RetryAfterHeader);
        assert_eq!(r.estimate.recovery_at, now() + Duration::minutes(10));
        assert_eq!(
            r.estimate.hint,
            "billing: insufficient_quota; retry-after: 600"
        );
        let at = ts("2026-03-05T00:00:00Z");
        let r = infer_in(Some(at), &windows, body, Tz::UTC);
        assert_eq!(r.estimate.source, RecoverySource::Explicit);
        assert_eq!(r.estimate.recovery_at, at);
        assert_eq!(r.billing.as_deref(), Some("insufficient_quota"));
    }

    // --- zones --------------------------------------------------------------

    #[test]
    fn the_zone_is_the_requests_else_the_agents_label_else_utc() {
        let labels = |zone: &str| -> crate::domain::labels::Labels {
            [(TIME_ZONE_LABEL.to_string(), zone.to_string())].into()
        };
        let la: Tz = "America/Los_Angeles".parse().unwrap();
        let london: Tz = "Europe/London".parse().unwrap();
        assert_eq!(
            resolve_time_zone(Some("America/Los_Angeles"), &labels("Europe/London")),
            la
        );
        assert_eq!(resolve_time_zone(None, &labels("Europe/London")), london);
        assert_eq!(resolve_time_zone(None, &labels("europe/london")), london);
        // An unknown label is ignored, not an error.
        assert_eq!(resolve_time_zone(None, &labels("Mars/Olympus")), Tz::UTC);
        assert_eq!(resolve_time_zone(None, &Default::default()), Tz::UTC);
    }

    #[test]
    fn zone_names_are_iana_names_in_any_case() {
        assert_eq!(parse_time_zone("UTC"), Some(Tz::UTC));
        assert_eq!(
            parse_time_zone("asia/colombo").map(|t| t.name()),
            Some("Asia/Colombo")
        );
        for bad in ["", "  ", "Mars/Olympus", "PDT", &"x".repeat(100)] {
            assert_eq!(parse_time_zone(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn epochs_in_seconds_and_milliseconds() {
        let at = now() + Duration::hours(1);
        assert_eq!(epoch_to_time(at.timestamp() as f64, now()), Some(at));
        assert_eq!(epoch_to_time(at.timestamp_millis() as f64, now()), Some(at));
        assert_eq!(epoch_to_time(1.0, now()), Some(now()));
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e20, 4_102_444_800.0] {
            assert_eq!(epoch_to_time(bad, now()), None, "{bad}");
        }
    }

    // --- the fixture of real forms ------------------------------------------

    #[test]
    fn every_form_in_the_fixture_is_read_as_expected() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/recovery/forms.json"))
                .expect("fixture is JSON");
        let fixed_now = ts(fixture["now"].as_str().unwrap());
        let forms = fixture["forms"].as_array().unwrap();
        assert!(forms.len() >= 20, "{} forms", forms.len());
        for form in forms {
            let name = form["name"].as_str().unwrap();
            assert!(!form["seen"].as_str().unwrap().is_empty(), "{name}");
            let expand = |text: &str| test_support::expand_template(text, fixed_now, form);
            let message = expand(form["message"].as_str().unwrap_or(""));
            let headers: Vec<(String, String)> = form["headers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_owned(),
                        expand(h[1].as_str().unwrap()),
                    )
                })
                .collect();
            let mut labels = crate::domain::labels::Labels::new();
            if let Some(zone) = form["agent_time_zone"].as_str() {
                labels.insert(TIME_ZONE_LABEL.into(), zone.into());
            }
            let input = RecoveryInput {
                explicit: None,
                headers: &headers,
                message: &message,
                time_zone: resolve_time_zone(form["time_zone"].as_str(), &labels),
                default_recovery: default_5h(),
                default_billing_recovery: Duration::hours(24),
            };
            let r = infer_recovery(&input, fixed_now);
            let expect = &form["expect"];
            assert_eq!(
                r.estimate.recovery_at,
                ts(expect["recovery_at"].as_str().unwrap()),
                "{name}: {r:?}"
            );
            let source = r.estimate.source.as_str();
            assert_eq!(source, expect["source"], "{name}: {r:?}");
            let caller = form["reason"].as_str().unwrap_or("RATE_LIMIT");
            let reason = if r.billing.is_some() {
                "BILLING"
            } else {
                caller
            };
            assert_eq!(reason, expect["reason"], "{name}: {r:?}");
            let hint = expand(expect["hint_contains"].as_str().unwrap());
            assert!(r.estimate.hint.contains(&hint), "{name}: {r:?}");
        }
    }

    // --- never panic -------------------------------------------------------

    /// Header names that exercise every branch, mixed with arbitrary ones.
    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Retry-After".to_owned()),
            Just("retry-after-ms".to_owned()),
            Just("x-ratelimit-reset-tokens".to_owned()),
            Just("x-ratelimit-remaining-tokens".to_owned()),
            Just("anthropic-ratelimit-requests-reset".to_owned()),
            Just("anthropic-ratelimit-requests-remaining".to_owned()),
            Just("anthropic-ratelimit-unified-status".to_owned()),
            Just("anthropic-ratelimit-unified-5h-reset".to_owned()),
            Just("anthropic-ratelimit-unified-7d-status".to_owned()),
            Just("anthropic-ratelimit-unified-representative-claim".to_owned()),
            any::<String>(),
        ]
    }

    /// Values that look almost right (so deep parser paths run) or are
    /// arbitrary.
    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{0,30}(\\.[0-9]{0,12})?",
            "([0-9.]{0,6}(ns|us|µs|ms|s|m|h|d|x)){0,5}",
            "-?[0-9]{1,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
            "(Mon, )?[0-9]{1,2} (Jan|Feb|Foo) [0-9]{2,4} [0-9]{1,2}:[0-9]{2}(:[0-9]{2})? (GMT|\\+[0-9]{4})?",
            any::<String>(),
        ]
    }

    fn message_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "(.{0,8} )?(in|after|IN) [0-9.]{0,25} ?(ms|m|min|h|hours?|d|days?|s|months|mice|µ|é)?[ ,.]?(and )?[0-9]{0,4}[a-zé]{0,3}.{0,6}",
            "(resets?|available|retry) at [0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]{0,20})?)?)? ?(Z|UTC|[+-][0-9]{2}:?[0-9]{2})?[.,;)]?",
            "resets at ([A-Za-z]{3}, )?[0-9]{1,2} [A-Za-z]{3} [0-9]{2,4} [0-9]{1,2}:[0-9]{2}(:[0-9]{2})? ?([A-Z]{1,3}|[+-][0-9]{4})?[.,]?",
            "(resets|try again at|until) ([A-Za-z]{3,9} [0-9]{1,2}(st|nd|rd|th)?,? ([0-9]{4})? ?)?[0-9]{1,2}(:[0-9]{2})? ?([ap]m|[AP]M)? ?(\\([A-Za-z_/]{0,30}\\))?",
            "(Claude AI usage )?limit reached\\|[0-9]{0,20}",
            "\\{\"(error|rate_limit_info)\":\\{\"(status|resets_at|resetsAt|resets_in_seconds|retry_after|code|message)\":(\"[a-z_ 0-9]{0,20}\"|-?[0-9]{0,20}(\\.[0-9]{0,5})?)\\}\\}",
            "(insufficient_quota|credit balance is too low|billing_hard_limit_reached) .{0,10}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn infer_recovery_never_panics_and_stays_in_bounds(
            headers in proptest::collection::vec((header_name(), header_value()), 0..6),
            message in message_text(),
            now_secs in 0_i64..4_102_444_800,
            now_nanos in 0_u32..1_000_000_000,
            zone in proptest::sample::select(chrono_tz::TZ_VARIANTS.to_vec()),
        ) {
            let now = DateTime::from_timestamp(now_secs, now_nanos).expect("in range");
            let input = RecoveryInput {
                explicit: None,
                headers: &headers,
                message: &message,
                time_zone: zone,
                default_recovery: default_5h(),
                default_billing_recovery: Duration::hours(24),
            };
            let inferred = infer_recovery(&input, now);
            let r = inferred.estimate;
            prop_assert!(r.recovery_at >= now);
            prop_assert!(r.recovery_at <= now + max_recovery_delay());
            prop_assert!(r.hint.chars().count() <= MAX_HINT_CHARS);
            if r.source == RecoverySource::Default {
                let default = if inferred.billing.is_some() { Duration::hours(24) } else { default_5h() };
                prop_assert_eq!(r.recovery_at, now + default);
                let expected = format!("default {}", format_duration(default));
                prop_assert!(r.hint.ends_with(&expected), "{}", r.hint);
            }
        }

        #[test]
        fn individual_parsers_never_panic(text in any::<String>(), value in header_value()) {
            let now = now();
            let limit = now + max_recovery_delay();
            for input in [text.as_str(), value.as_str()] {
                for at in [
                    parse_retry_after(input, now),
                    parse_retry_after_ms(input, now),
                    parse_provider_reset(input, now),
                    parse_message(input, now, Tz::UTC).map(|m| m.0),
                ]
                .into_iter()
                .flatten()
                {
                    prop_assert!(at >= now && at <= limit);
                }
                if let Some(d) = parse_go_duration(input) {
                    prop_assert!(d >= Duration::zero() && d <= max_recovery_delay());
                }
                if let Some(d) = parse_human_duration(input) {
                    prop_assert!(d >= Duration::zero() && d <= max_recovery_delay());
                }
                let _ = parse_http_date(input);
                let _ = parse_time_zone(input);
                let _ = billing::in_text(input);
                if let Some(body) = json::read(input, now, Tz::UTC)
                    && let Some((at, _)) = body.recovery
                {
                    prop_assert!(at >= now && at <= limit);
                }
            }
        }
    }
}
