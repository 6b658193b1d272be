//! Recovery times from response headers: `Retry-After`, `retry-after-ms`, and
//! the providers' reset headers.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};

use super::dates::parse_http_date;
use super::{
    MAX_DELAY_SECS, accept_time, after, epoch_to_time, leading_number, leading_word,
    seconds_to_duration,
};

// ---------------------------------------------------------------------------
// Retry-After
// ---------------------------------------------------------------------------

/// Finds the first usable `retry-after-ms` or `Retry-After` header.
///
/// `retry-after-ms` (sent by OpenAI and understood by its SDKs) is preferred
/// because it is more precise; repeated headers are tried in order and the
/// first one that parses wins.
pub(super) fn retry_after_from_headers(
    headers: &[(String, String)],
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, String)> {
    let named = |wanted: &'static str| {
        headers
            .iter()
            .filter(move |(name, _)| name.trim().eq_ignore_ascii_case(wanted))
    };
    let from_ms = named("retry-after-ms").find_map(|(_, value)| {
        let value = value.trim();
        let at = parse_retry_after_ms(value, now)?;
        Some((at, format!("retry-after-ms: {value}")))
    });
    from_ms.or_else(|| {
        named("retry-after").find_map(|(_, value)| {
            let value = value.trim();
            let at = parse_retry_after(value, now)?;
            Some((at, format!("retry-after: {value}")))
        })
    })
}

/// Whether `s` is a plain non-negative decimal: digits, optionally followed
/// by a dot and more digits. Rejects signs, exponents, "inf" and "NaN", which
/// `f64::from_str` would otherwise accept.
fn is_plain_decimal(s: &str) -> bool {
    matches!(leading_number(s), Some((_, len)) if len == s.len())
        && s.as_bytes().first().is_some_and(u8::is_ascii_digit)
}

/// Parses a `Retry-After` value: delay seconds (`30`, or fractional `1.5`,
/// which some providers send) or an HTTP date. Returns the recovery time,
/// clamped to `now` if in the past.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let value = value.trim();
    if is_plain_decimal(value) {
        let delay = seconds_to_duration(value.parse().ok()?)?;
        return after(now, delay);
    }
    accept_time(parse_http_date(value)?, now)
}

/// Parses a `retry-after-ms` value (plain, possibly fractional milliseconds).
pub fn parse_retry_after_ms(value: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let value = value.trim();
    if !is_plain_decimal(value) {
        return None;
    }
    let ms: f64 = value.parse().ok()?;
    after(now, seconds_to_duration(ms / 1000.0)?)
}

// ---------------------------------------------------------------------------
// Go-style durations and provider reset headers
// ---------------------------------------------------------------------------

/// Seconds per unit for Go-style durations (`time.Duration.String()`), plus
/// days, which some providers emit for long windows.
fn go_unit_seconds(unit: &str) -> Option<f64> {
    Some(match unit {
        "ns" => 1e-9,
        "us" | "µs" | "μs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return None,
    })
}

/// Parses a Go-style duration such as `6m0s`, `1.5s`, `20ms`, `1h2m3s`, `0s`
/// or `2d`: one or more `<number><unit>` components with no spaces. A bare
/// `0` is accepted as Go does. Negative or absurd (> 366 days) durations are
/// rejected.
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let mut rest = value.strip_prefix('+').unwrap_or(value);
    if rest == "0" {
        return Some(Duration::zero());
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let (number, num_len) = leading_number(rest)?;
        // The whole letter run must be a unit, and "ms" is a unit of its
        // own, so "20ms" can never be read as 20 minutes.
        let (unit, unit_len) = leading_word(&rest[num_len..]);
        total += number * go_unit_seconds(unit)?;
        if !total.is_finite() || total > MAX_DELAY_SECS {
            return None;
        }
        rest = &rest[num_len + unit_len..];
    }
    seconds_to_duration(total)
}

/// Parses one provider reset header value: an RFC 3339 timestamp
/// (Anthropic), a Go-style duration (OpenAI), a bare number of seconds, or an
/// HTTP date. All forms are tried for every provider because compatible
/// gateways mix them up.
pub fn parse_provider_reset(value: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let value = value.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return accept_time(at.with_timezone(&Utc), now);
    }
    if let Some(delay) = parse_go_duration(value) {
        return after(now, delay);
    }
    if is_plain_decimal(value) {
        // An epoch timestamp read as seconds is decades away and is rejected
        // here rather than misread.
        return after(now, seconds_to_duration(value.parse().ok()?)?);
    }
    accept_time(parse_http_date(value)?, now)
}

/// What a provider rate-limit header says about which limit.
enum ProviderHeader {
    Reset(String),
    Remaining(String),
    Other,
}

/// Classifies a lower-cased header name. The limit key is namespaced by
/// provider so that OpenAI "tokens" and Anthropic "tokens" never pair up.
fn classify_provider_header(name: &str) -> ProviderHeader {
    let non_empty = |kind: &str| !kind.is_empty();
    if let Some(kind) = name.strip_prefix("x-ratelimit-reset-")
        && non_empty(kind)
    {
        return ProviderHeader::Reset(format!("openai:{kind}"));
    }
    if let Some(kind) = name.strip_prefix("x-ratelimit-remaining-")
        && non_empty(kind)
    {
        return ProviderHeader::Remaining(format!("openai:{kind}"));
    }
    if let Some(middle) = name.strip_prefix("anthropic-ratelimit-")
        && !middle.starts_with("unified-")
    {
        if let Some(kind) = middle.strip_suffix("-reset")
            && non_empty(kind)
        {
            return ProviderHeader::Reset(format!("anthropic:{kind}"));
        }
        if let Some(kind) = middle.strip_suffix("-remaining")
            && non_empty(kind)
        {
            return ProviderHeader::Remaining(format!("anthropic:{kind}"));
        }
    }
    ProviderHeader::Other
}

/// Infers recovery from provider reset headers.
///
/// "The earliest reset that lifts the limit wins": when some `remaining`
/// header is 0, only the exhausted limits block us, and we must wait until
/// the last of them resets (the LATEST of their resets). Without that
/// information any reset may be the one that lifts us, so the EARLIEST wins.
/// If a limit is exhausted but none of the exhausted limits has a usable
/// reset, the other resets say nothing about when we recover, so this source
/// gives up and the caller falls through to the message.
///
/// Returns the time and a hint naming the deciding header.
pub fn parse_provider_headers(
    headers: &[(String, String)],
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, String)> {
    struct Reset {
        limit: String,
        at: DateTime<Utc>,
        hint: String,
    }
    let mut resets = Vec::new();
    let mut exhausted = HashSet::new();
    for (name, value) in headers {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        match classify_provider_header(&name) {
            ProviderHeader::Reset(limit) => {
                if let Some(at) = parse_provider_reset(value, now) {
                    let hint = format!("{name}: {value}");
                    resets.push(Reset { limit, at, hint });
                }
            }
            ProviderHeader::Remaining(limit) => {
                // Anything at or below zero means the limit is used up; a
                // value that does not parse tells us nothing.
                if value
                    .parse::<f64>()
                    .is_ok_and(|v| v.is_finite() && v <= 0.0)
                {
                    exhausted.insert(limit);
                }
            }
            ProviderHeader::Other => {}
        }
    }

    // Ties keep the first header seen so hints are deterministic.
    let chosen = if exhausted.is_empty() {
        resets
            .into_iter()
            .reduce(|best, r| if r.at < best.at { r } else { best })
    } else {
        resets
            .into_iter()
            .filter(|r| exhausted.contains(&r.limit))
            .reduce(|best, r| if r.at > best.at { r } else { best })
    }?;
    Some((chosen.at, chosen.hint))
}

/// Provider reset headers: the unified Anthropic family first (it names the
/// window that binds), then the per-limit resets of OpenAI and Anthropic.
pub fn parse_reset_headers(
    headers: &[(String, String)],
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, String)> {
    parse_unified_headers(headers, now).or_else(|| parse_provider_headers(headers, now))
}

/// The window a representative claim names, as it appears in the reset
/// header's name (`five_hour` binds `anthropic-ratelimit-unified-5h-reset`).
fn claim_window(claim: &str) -> String {
    match claim {
        "five_hour" => "5h".to_owned(),
        "seven_day" => "7d".to_owned(),
        other => match other.strip_prefix("seven_day_") {
            Some(model) => format!("7d_{model}"),
            None => other.to_owned(),
        },
    }
}

/// A unified reset value: epoch seconds (what Anthropic sends) or RFC 3339.
fn parse_unified_reset(value: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if is_plain_decimal(value) {
        return epoch_to_time(value.parse().ok()?, now);
    }
    accept_time(
        DateTime::parse_from_rfc3339(value)
            .ok()?
            .with_timezone(&Utc),
        now,
    )
}

/// The Claude subscription headers: `anthropic-ratelimit-unified-status`,
/// `-reset`, `-5h-reset`, `-7d-reset` (epoch seconds), per-window `-status`
/// and `-representative-claim`.
///
/// A status other than `rejected` (`allowed`, `allowed_warning`) says the
/// subscription is not what stopped the agent, so the family is ignored.
/// Otherwise the representative claim's reset wins; without a usable one,
/// the windows marked `rejected` must all lift (the latest of their resets),
/// and without those the earliest reset given is the one that lifts the
/// limit.
pub fn parse_unified_headers(
    headers: &[(String, String)],
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, String)> {
    let mut status = None;
    let mut claim = None;
    let mut rejected_windows = HashSet::new();
    // (window, at, hint); the window of the overall reset is "".
    let mut resets: Vec<(String, DateTime<Utc>, String)> = Vec::new();
    for (name, value) in headers {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        let Some(rest) = name.strip_prefix("anthropic-ratelimit-unified-") else {
            continue;
        };
        if rest == "status" {
            status.get_or_insert(value.to_ascii_lowercase());
        } else if rest == "representative-claim" {
            claim.get_or_insert(value.to_ascii_lowercase());
        } else if rest == "reset" {
            if let Some(at) = parse_unified_reset(value, now) {
                resets.push((String::new(), at, format!("{name}: {value}")));
            }
        } else if let Some(window) = rest.strip_suffix("-reset") {
            if let Some(at) = parse_unified_reset(value, now) {
                resets.push((window.to_owned(), at, format!("{name}: {value}")));
            }
        } else if let Some(window) = rest.strip_suffix("-status")
            && value.eq_ignore_ascii_case("rejected")
        {
            rejected_windows.insert(window.to_owned());
        }
    }
    if status.as_deref().is_some_and(|s| s != "rejected") {
        return None;
    }
    if let Some(claim) = &claim {
        let window = claim_window(claim);
        if let Some((_, at, hint)) = resets.iter().find(|(w, _, _)| *w == window) {
            return Some((*at, format!("{hint} ({claim})")));
        }
    }
    let blocking: Vec<_> = resets
        .iter()
        .filter(|(w, _, _)| rejected_windows.contains(w))
        .collect();
    // Ties keep the first header seen so hints are deterministic.
    let chosen = if blocking.is_empty() {
        resets
            .iter()
            .reduce(|best, r| if r.1 < best.1 { r } else { best })
    } else {
        blocking
            .into_iter()
            .reduce(|best, r| if r.1 > best.1 { r } else { best })
    }?;
    Some((chosen.1, chosen.2.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recovery::test_support::*;
    use crate::domain::recovery::*;

    // --- Retry-After -------------------------------------------------------

    #[test]
    fn retry_after_integer_seconds() {
        let r = infer(&[("retry-after", "30")], "");
        assert_eq!(r.recovery_at, now() + Duration::seconds(30));
        assert_eq!(r.source, RecoverySource::RetryAfterHeader);
        assert_eq!(r.hint, "retry-after: 30");
    }

    #[test]
    fn retry_after_fractional_seconds_old_bug() {
        // The old parser rejected "1.5"; it is 1500 ms.
        assert_eq!(
            parse_retry_after("1.5", now()),
            Some(now() + Duration::milliseconds(1500))
        );
        assert_eq!(
            parse_retry_after(" 0.25 ", now()),
            Some(now() + Duration::milliseconds(250))
        );
    }

    #[test]
    fn retry_after_http_date() {
        let r = infer(&[("Retry-After", "Sun, 01 Mar 2026 12:10:00 GMT")], "");
        assert_eq!(r.recovery_at, ts("2026-03-01T12:10:00Z"));
        assert_eq!(r.source, RecoverySource::RetryAfterHeader);
        assert_eq!(r.hint, "retry-after: Sun, 01 Mar 2026 12:10:00 GMT");
    }

    #[test]
    fn retry_after_http_date_in_the_past_clamps_to_now() {
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now()),
            Some(now())
        );
    }

    #[test]
    fn retry_after_obsolete_http_date_formats() {
        let expected = ts("2026-03-01T12:10:00Z");
        // RFC 850 and asctime, which RFC 7231 recipients must accept.
        assert_eq!(
            parse_retry_after("Sunday, 01-Mar-26 12:10:00 GMT", now()),
            Some(expected)
        );
        assert_eq!(
            parse_retry_after("Sun Mar  1 12:10:00 2026", now()),
            Some(expected)
        );
    }

    #[test]
    fn retry_after_rejects_garbage_negative_nan_and_absurd() {
        for bad in [
            "",
            "soon",
            "-5",
            "+5",
            "NaN",
            "inf",
            "1e3",
            "1.",
            ".5",
            "30 seconds",
            "99999999999999999999999999",
            "31708800", // 367 days
            "Wed, 21 Oct 2099 07:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now()), None, "{bad:?}");
        }
        // Exactly 366 days is still accepted.
        assert_eq!(
            parse_retry_after("31622400", now()),
            Some(now() + Duration::days(366))
        );
    }

    #[test]
    fn retry_after_name_is_case_insensitive() {
        for name in ["retry-after", "Retry-After", "RETRY-AFTER", " rEtRy-AfTeR "] {
            let r = infer(&[(name, "7")], "");
            assert_eq!(r.source, RecoverySource::RetryAfterHeader, "{name}");
            assert_eq!(r.recovery_at, now() + Duration::seconds(7));
        }
    }

    #[test]
    fn unparseable_retry_after_falls_through_to_message() {
        let r = infer(
            &[("Retry-After", "later")],
            "please try again in 20 minutes",
        );
        assert_eq!(r.source, RecoverySource::Message);
        assert_eq!(r.recovery_at, now() + Duration::minutes(20));
    }

    #[test]
    fn first_usable_repeated_retry_after_wins() {
        let r = infer(
            &[
                ("Retry-After", "bogus"),
                ("retry-after", "12"),
                ("retry-after", "99"),
            ],
            "",
        );
        assert_eq!(r.recovery_at, now() + Duration::seconds(12));
        assert_eq!(r.hint, "retry-after: 12");
    }

    #[test]
    fn retry_after_ms_is_preferred_and_in_milliseconds() {
        let r = infer(&[("Retry-After", "2"), ("Retry-After-Ms", "1500")], "");
        assert_eq!(r.recovery_at, now() + Duration::milliseconds(1500));
        assert_eq!(r.source, RecoverySource::RetryAfterHeader);
        assert_eq!(r.hint, "retry-after-ms: 1500");
        // An unusable retry-after-ms falls back to retry-after.
        let r = infer(&[("Retry-After", "2"), ("retry-after-ms", "-1")], "");
        assert_eq!(r.recovery_at, now() + Duration::seconds(2));
    }

    #[test]
    fn retry_after_beats_provider_headers_and_message() {
        let r = infer(
            &[("x-ratelimit-reset-tokens", "1s"), ("Retry-After", "30")],
            "try again in 1 second",
        );
        assert_eq!(r.source, RecoverySource::RetryAfterHeader);
        assert_eq!(r.recovery_at, now() + Duration::seconds(30));
    }

    // --- Go durations ------------------------------------------------------

    #[test]
    fn go_durations() {
        let cases = [
            ("6m0s", Duration::minutes(6)),
            ("1.5s", Duration::milliseconds(1500)),
            ("20ms", Duration::milliseconds(20)),
            ("1h2m3s", Duration::seconds(3723)),
            ("0s", Duration::zero()),
            ("0", Duration::zero()),
            ("2d", Duration::days(2)),
            ("2m59.56s", Duration::milliseconds(179_560)),
            ("1.5h", Duration::minutes(90)),
            ("250us", Duration::microseconds(250)),
            ("250µs", Duration::microseconds(250)),
            ("7ns", Duration::nanoseconds(7)),
            (".5s", Duration::milliseconds(500)),
            ("+3s", Duration::seconds(3)),
            ("366d", Duration::days(366)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_go_duration(text), Some(expected), "{text:?}");
        }
    }

    #[test]
    fn go_durations_rejected() {
        for bad in [
            "", "6", "s", "-1s", "1x", "1.s", "6m 0s", "367d", "1e3s", "5mo", "NaNs", "1h-2m",
            "９s",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    // --- provider reset headers --------------------------------------------

    #[test]
    fn openai_reset_header_with_hint() {
        let r = infer(&[("X-RateLimit-Reset-Tokens", "6m0s")], "");
        assert_eq!(r.source, RecoverySource::ProviderResetHeader);
        assert_eq!(r.recovery_at, now() + Duration::minutes(6));
        assert_eq!(r.hint, "x-ratelimit-reset-tokens: 6m0s");
    }

    #[test]
    fn anthropic_reset_header_rfc3339() {
        let r = infer(
            &[(
                "anthropic-ratelimit-output-tokens-reset",
                "2026-03-01T12:30:00+01:00",
            )],
            "",
        );
        assert_eq!(r.source, RecoverySource::ProviderResetHeader);
        // 12:30+01:00 is 11:30Z: in the past, so recovery is now.
        assert_eq!(r.recovery_at, now());

        let r = infer(
            &[(
                "anthropic-ratelimit-input-tokens-reset",
                "2026-03-01T12:30:00Z",
            )],
            "",
        );
        assert_eq!(r.recovery_at, ts("2026-03-01T12:30:00Z"));
        assert_eq!(
            r.hint,
            "anthropic-ratelimit-input-tokens-reset: 2026-03-01T12:30:00Z"
        );
    }

    #[test]
    fn any_anthropic_ratelimit_reset_header_counts() {
        let r = infer(
            &[(
                "anthropic-ratelimit-priority-input-tokens-reset",
                "2026-03-01T12:05:00Z",
            )],
            "",
        );
        assert_eq!(r.recovery_at, ts("2026-03-01T12:05:00Z"));
        // Names that only look similar do not.
        for name in [
            "anthropic-ratelimit-reset",
            "anthropic-ratelimit--reset",
            "x-ratelimit-reset-",
            "x-ratelimit-reset",
        ] {
            let r = infer(&[(name, "2026-03-01T12:05:00Z")], "");
            assert_eq!(r.source, RecoverySource::Default, "{name}");
        }
    }

    #[test]
    fn without_remaining_info_the_earliest_reset_wins() {
        let r = infer(
            &[
                ("x-ratelimit-reset-requests", "20s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("anthropic-ratelimit-tokens-reset", "2026-03-01T12:00:05Z"),
            ],
            "",
        );
        assert_eq!(r.recovery_at, now() + Duration::seconds(5));
        assert_eq!(
            r.hint,
            "anthropic-ratelimit-tokens-reset: 2026-03-01T12:00:05Z"
        );
    }

    #[test]
    fn with_no_remaining_at_zero_the_earliest_reset_wins() {
        let r = infer(
            &[
                ("x-ratelimit-remaining-requests", "10"),
                ("x-ratelimit-remaining-tokens", "1200"),
                ("x-ratelimit-reset-requests", "20s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
            "",
        );
        assert_eq!(r.recovery_at, now() + Duration::seconds(20));
        assert_eq!(r.hint, "x-ratelimit-reset-requests: 20s");
    }

    #[test]
    fn only_exhausted_limits_matter_even_if_others_reset_sooner() {
        let r = infer(
            &[
                ("x-ratelimit-remaining-requests", "99"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
            "",
        );
        assert_eq!(r.recovery_at, now() + Duration::minutes(6));
        assert_eq!(r.hint, "x-ratelimit-reset-tokens: 6m0s");
    }

    #[test]
    fn several_exhausted_limits_wait_for_the_latest() {
        let r = infer(
            &[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-03-01T12:40:00Z"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2026-03-01T12:10:00Z",
                ),
                ("anthropic-ratelimit-output-tokens-remaining", "5000"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2026-03-01T13:00:00Z",
                ),
            ],
            "",
        );
        assert_eq!(r.recovery_at, ts("2026-03-01T12:40:00Z"));
        assert_eq!(
            r.hint,
            "anthropic-ratelimit-requests-reset: 2026-03-01T12:40:00Z"
        );
    }

    #[test]
    fn remaining_does_not_pair_across_providers() {
        // OpenAI "tokens" at 0 says nothing about Anthropic "tokens".
        let r = infer(
            &[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "10m"),
                ("anthropic-ratelimit-tokens-reset", "2026-03-01T12:01:00Z"),
            ],
            "",
        );
        assert_eq!(r.recovery_at, now() + Duration::minutes(10));
    }

    #[test]
    fn exhausted_limit_without_reset_falls_through_to_message() {
        let r = infer(
            &[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-requests", "1s"),
            ],
            "retry after 3 minutes",
        );
        assert_eq!(r.source, RecoverySource::Message);
        assert_eq!(r.recovery_at, now() + Duration::minutes(3));
    }

    #[test]
    fn unparseable_provider_resets_are_skipped() {
        let r = infer(
            &[
                ("x-ratelimit-reset-tokens", "whenever"),
                ("x-ratelimit-reset-requests", "400d"),
                ("x-ratelimit-reset-images", "1m"),
            ],
            "",
        );
        assert_eq!(r.recovery_at, now() + Duration::minutes(1));
        assert_eq!(r.hint, "x-ratelimit-reset-images: 1m");
    }

    #[test]
    fn provider_reset_value_forms() {
        assert_eq!(
            parse_provider_reset("2.5", now()),
            Some(now() + Duration::milliseconds(2500))
        );
        // An epoch timestamp is not misread as a delay.
        assert_eq!(parse_provider_reset("1772366400", now()), None);
        assert_eq!(
            parse_provider_reset("2026-03-01T11:00:00Z", now()),
            Some(now())
        );
        assert_eq!(parse_provider_reset("2099-03-01T11:00:00Z", now()), None);
    }

    #[test]
    fn provider_headers_beat_message() {
        let r = infer(
            &[("x-ratelimit-reset-requests", "2m")],
            "try again in 1 second",
        );
        assert_eq!(r.source, RecoverySource::ProviderResetHeader);
        assert_eq!(r.recovery_at, now() + Duration::minutes(2));
    }

    // --- the unified Anthropic family ---------------------------------------

    fn epoch(at: DateTime<Utc>) -> String {
        at.timestamp().to_string()
    }

    #[test]
    fn unified_representative_claim_wins() {
        let five = now() + Duration::minutes(40);
        let seven = now() + Duration::days(4);
        for (claim, expected, header) in [
            ("five_hour", five, "anthropic-ratelimit-unified-5h-reset"),
            ("seven_day", seven, "anthropic-ratelimit-unified-7d-reset"),
        ] {
            let r = infer(
                &[
                    ("anthropic-ratelimit-unified-status", "rejected"),
                    ("anthropic-ratelimit-unified-5h-reset", &epoch(five)),
                    ("Anthropic-Ratelimit-Unified-7d-Reset", &epoch(seven)),
                    ("anthropic-ratelimit-unified-representative-claim", claim),
                ],
                "",
            );
            assert_eq!(r.source, RecoverySource::ProviderResetHeader);
            assert_eq!(r.recovery_at, expected, "{claim}");
            assert!(r.hint.starts_with(header), "{}", r.hint);
            assert!(r.hint.ends_with(&format!("({claim})")), "{}", r.hint);
        }
    }

    #[test]
    fn unified_without_claim_waits_for_the_rejected_windows_else_the_earliest() {
        let five = now() + Duration::minutes(40);
        let seven = now() + Duration::days(4);
        let r = infer(
            &[
                ("anthropic-ratelimit-unified-status", "rejected"),
                ("anthropic-ratelimit-unified-5h-status", "allowed"),
                ("anthropic-ratelimit-unified-5h-reset", &epoch(five)),
                ("anthropic-ratelimit-unified-7d-status", "rejected"),
                ("anthropic-ratelimit-unified-7d-reset", &epoch(seven)),
            ],
            "",
        );
        assert_eq!(r.recovery_at, seven);
        let r = infer(
            &[
                ("anthropic-ratelimit-unified-7d-reset", &epoch(seven)),
                ("anthropic-ratelimit-unified-5h-reset", &epoch(five)),
            ],
            "",
        );
        assert_eq!(r.recovery_at, five);
        // A claim naming a window with no reset falls back to the same rule.
        let r = infer(
            &[
                ("anthropic-ratelimit-unified-status", "rejected"),
                (
                    "anthropic-ratelimit-unified-representative-claim",
                    "seven_day_opus",
                ),
                ("anthropic-ratelimit-unified-reset", &epoch(five)),
            ],
            "",
        );
        assert_eq!(r.recovery_at, five);
    }

    #[test]
    fn unified_allowed_status_says_nothing_about_this_stop() {
        let five = now() + Duration::minutes(40);
        for status in ["allowed", "allowed_warning"] {
            let r = infer(
                &[
                    ("anthropic-ratelimit-unified-status", status),
                    ("anthropic-ratelimit-unified-5h-reset", &epoch(five)),
                ],
                "try again in 3 minutes",
            );
            assert_eq!(r.source, RecoverySource::Message, "{status}");
        }
    }

    #[test]
    fn unified_headers_are_not_read_as_per_limit_resets_and_retry_after_still_wins() {
        // An epoch is not a Go duration or RFC 3339: the generic reader would
        // reject it; the unified reader takes it.
        let at = now() + Duration::hours(2);
        let r = infer(&[("anthropic-ratelimit-unified-reset", &epoch(at))], "");
        assert_eq!(r.recovery_at, at);
        assert_eq!(
            parse_provider_headers(
                &hdrs(&[("anthropic-ratelimit-unified-reset", &epoch(at))]),
                now()
            ),
            None
        );
        let r = infer(
            &[
                ("anthropic-ratelimit-unified-reset", &epoch(at)),
                ("retry-after", "60"),
            ],
            "",
        );
        assert_eq!(r.source, RecoverySource::RetryAfterHeader);
        // Garbage and far-future values are skipped.
        let r = infer(
            &[
                ("anthropic-ratelimit-unified-reset", "soon"),
                ("anthropic-ratelimit-unified-5h-reset", "4102444800"),
            ],
            "",
        );
        assert_eq!(r.source, RecoverySource::Default);
    }
}
