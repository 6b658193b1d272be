//! Inferring when a quota- or billing-exhausted agent may run again.
//!
//! When a provider answers with a rate-limit or billing error the agent is
//! parked as EXHAUSTED until a recovery time. This module infers that time
//! from, in order of trust:
//!
//! 1. an explicit time supplied by the caller,
//! 2. the standard `Retry-After` header (or its millisecond variant),
//! 3. provider-specific reset headers (OpenAI `x-ratelimit-reset-*`,
//!    Anthropic `anthropic-ratelimit-*-reset`),
//! 4. the provider's human-readable error message,
//! 5. a configured default.
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

mod dates;
mod headers;
mod message;

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

/// Infers when an exhausted agent may be retried.
///
/// `headers` are `(name, value)` pairs as received: names in any case, and a
/// name may repeat. See the module documentation for the order of sources.
pub fn infer_recovery(
    explicit: Option<DateTime<Utc>>,
    headers: &[(String, String)],
    message: &str,
    now: DateTime<Utc>,
    default_recovery: Duration,
) -> RecoveryEstimate {
    let estimate = |recovery_at, source, hint: String| RecoveryEstimate {
        recovery_at,
        source,
        hint: bound_hint(&hint),
    };

    // The caller knows best (e.g. an operator parked the agent until a given
    // time), so the explicit time is trusted as is apart from the past clamp.
    if let Some(at) = explicit {
        let hint = format!(
            "explicit {}",
            at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        );
        return estimate(at.max(now), RecoverySource::Explicit, hint);
    }

    if let Some((at, hint)) = retry_after_from_headers(headers, now) {
        return estimate(at, RecoverySource::RetryAfterHeader, hint);
    }

    if let Some((at, hint)) = parse_provider_headers(headers, now) {
        return estimate(at, RecoverySource::ProviderResetHeader, hint);
    }

    if let Some((at, text)) = parse_message(message, now) {
        return estimate(at, RecoverySource::Message, text);
    }

    // A negative default means "now"; an overflowing one saturates rather
    // than panicking.
    let at = now
        .checked_add_signed(default_recovery)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .max(now);
    let hint = format!("default {}", format_duration(default_recovery));
    estimate(at, RecoverySource::Default, hint)
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

    pub fn default_5h() -> Duration {
        Duration::hours(5)
    }

    pub fn infer(headers: &[(&str, &str)], message: &str) -> RecoveryEstimate {
        infer_recovery(None, &hdrs(headers), message, now(), default_5h())
    }

    pub fn msg(message: &str) -> Option<(DateTime<Utc>, String)> {
        parse_message(message, now())
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
        let r = infer_recovery(Some(at), &[], "", now(), default_5h());
        assert_eq!(r.recovery_at, at);
        assert_eq!(r.source, RecoverySource::Explicit);
        assert_eq!(r.hint, "explicit 2026-03-02T00:00:00Z");
    }

    #[test]
    fn explicit_in_the_past_clamps_to_now() {
        let r = infer_recovery(
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
        let r = infer_recovery(
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
        let r = infer(
            &[("content-type", "application/json")],
            "insufficient_quota",
        );
        assert_eq!(r.source, RecoverySource::Default);
        assert_eq!(r.recovery_at, now() + Duration::hours(5));
        assert_eq!(r.hint, "default 5h");

        let r = infer_recovery(None, &[], "", now(), Duration::seconds(90));
        assert_eq!(r.recovery_at, now() + Duration::seconds(90));
        assert_eq!(r.hint, "default 90s");
    }

    #[test]
    fn default_negative_or_huge_does_not_panic() {
        let r = infer_recovery(None, &[], "", now(), Duration::hours(-3));
        assert_eq!(r.recovery_at, now());
        assert_eq!(r.hint, "default -3h");
        let r = infer_recovery(None, &[], "", now(), Duration::MAX);
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
        let r = infer_recovery(
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
        ) {
            let now = DateTime::from_timestamp(now_secs, now_nanos).expect("in range");
            let r = infer_recovery(None, &headers, &message, now, default_5h());
            prop_assert!(r.recovery_at >= now);
            prop_assert!(r.recovery_at <= now + max_recovery_delay());
            prop_assert!(r.hint.chars().count() <= MAX_HINT_CHARS);
            if r.source == RecoverySource::Default {
                prop_assert_eq!(r.recovery_at, now + default_5h());
                prop_assert_eq!(r.hint.as_str(), "default 5h");
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
                    parse_message(input, now).map(|m| m.0),
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
            }
        }
    }
}
