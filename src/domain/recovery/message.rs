//! Recovery times from a provider's error message written in prose.

use std::sync::LazyLock;

use chrono::{DateTime, Duration, Utc};
use regex::{Captures, Regex};

use super::dates::{RFC2822_BODY, iso_from_captures, rfc2822_from_captures};
use super::{
    MAX_DELAY_SECS, accept_time, after, leading_number, leading_word, seconds_to_duration,
};

// ---------------------------------------------------------------------------
// Provider error messages
// ---------------------------------------------------------------------------

/// "in" or "after" as whole words, followed by whitespace; the duration that
/// follows is parsed by hand in [`parse_duration_phrase`].
static RELATIVE_ANCHOR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(?:in|after)\s+").expect("static regex is valid"));

/// Verbs that may introduce "at <time>". The word "at" is required so that
/// e.g. "request made 2026-04-01T10:00:00Z" is not taken for a reset time.
const AT_VERBS: &str =
    r"(?:resets?|refresh(?:es)?|renews?|replenish(?:es)?|available|retry|again|lifts?|expires?)";

/// "resets at <ISO 8601>": `T` or a space between date and time, optional
/// seconds and fraction (dot or comma), optional zone (naive means UTC). The
/// trailing `\b` lets sentence punctuation follow without being consumed.
static AT_ISO: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?i)\b{AT_VERBS}\s+at\s+(?P<y>[0-9]{{4}})-(?P<mo>[0-9]{{2}})-(?P<d>[0-9]{{2}})(?:[t\s](?P<hh>[0-9]{{2}}):(?P<mi>[0-9]{{2}})(?::(?P<ss>[0-9]{{2}})(?:[.,](?P<frac>[0-9]+))?)?)?(?:\s*(?P<zone>z|utc|gmt|[+-][0-9]{{2}}(?::?[0-9]{{2}})?)\b)?"
    ))
    .expect("static regex is valid")
});

/// "resets at <RFC 2822 date>", weekday comma included.
static AT_RFC2822: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)\b{AT_VERBS}\s+at\s+{RFC2822_BODY}")).expect("static regex is valid")
});

/// Seconds per unit for durations written in prose. The whole word must
/// match, so "months" and "mice" are not minutes.
fn message_unit_seconds(unit: &str) -> Option<f64> {
    Some(match unit.to_lowercase().as_str() {
        "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => 1e-3,
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        "w" | "wk" | "wks" | "week" | "weeks" => 7.0 * 86_400.0,
        _ => return None,
    })
}

/// Parses a prose duration at the start of `s`: one or more
/// `<number> [space] <unit>` components, optionally separated by spaces,
/// commas or "and" ("12 mins", "1.5 hours", "1h30m", "1 hour and 30
/// minutes"). Returns total seconds and the byte length of the phrase, or
/// `None` if there is no duration or it is absurd.
fn parse_duration_phrase(s: &str) -> Option<(f64, usize)> {
    let mut pos = 0;
    let mut total = 0.0_f64;
    let mut end = None;
    while let Some((number, num_len)) = leading_number(&s[pos..]) {
        let after_num = pos + num_len;
        let unit_start = after_num + whitespace_len(&s[after_num..]);
        let (unit, unit_len) = leading_word(&s[unit_start..]);
        let Some(per_unit) = message_unit_seconds(unit) else {
            break;
        };
        total += number * per_unit;
        if !total.is_finite() || total > MAX_DELAY_SECS {
            return None;
        }
        let unit_end = unit_start + unit_len;
        end = Some(unit_end);
        pos = unit_end + separator_len(&s[unit_end..]);
    }
    let end = end?;
    // "in 5m3" is not a duration: the unit must end at a word boundary, and
    // a letter cannot follow (the whole letter run was the unit).
    if s[end..]
        .chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_')
    {
        return None;
    }
    Some((total, end))
}

fn whitespace_len(s: &str) -> usize {
    s.char_indices()
        .find(|(_, c)| !c.is_whitespace())
        .map_or(s.len(), |(i, _)| i)
}

/// Length of a separator between duration components: whitespace, an
/// optional comma, and an optional "and".
fn separator_len(s: &str) -> usize {
    let mut len = whitespace_len(s);
    if s[len..].starts_with(',') {
        len += 1;
        len += whitespace_len(&s[len..]);
    }
    let rest = &s[len..];
    if rest.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("and"))
        && rest[3..].starts_with(char::is_whitespace)
    {
        len += 3;
        len += whitespace_len(&s[len..]);
    }
    len
}

/// Start of the word right before `anchor` (e.g. "reset" in "reset in 12
/// mins"), so hints read naturally. Looks back only a short way: a huge run
/// of whitespace or a giant word is not worth keeping in a bounded hint.
fn preceding_word_start(text: &str, anchor: usize) -> usize {
    const LOOKBACK_CHARS: usize = 40;
    let mut chars = text[..anchor]
        .char_indices()
        .rev()
        .take(LOOKBACK_CHARS)
        .peekable();
    let mut saw_space = false;
    while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {
        saw_space = true;
    }
    let mut start = anchor;
    while let Some((i, _)) = chars.next_if(|(_, c)| c.is_alphanumeric()) {
        start = i;
    }
    if saw_space { start } else { anchor }
}

/// Finds a relative duration after "in" or "after" ("try again in 20
/// minutes", "retry after 500ms").
fn parse_relative_message(message: &str, now: DateTime<Utc>) -> Option<(DateTime<Utc>, String)> {
    RELATIVE_ANCHOR.find_iter(message).find_map(|anchor| {
        let (secs, len) = parse_duration_phrase(&message[anchor.end()..])?;
        let at = after(now, seconds_to_duration(secs)?)?;
        let start = preceding_word_start(message, anchor.start());
        Some((at, message[start..anchor.end() + len].to_owned()))
    })
}

/// Finds "resets at <time>" using `re`, trying every match in order until
/// one yields a valid, acceptable time.
fn parse_at_message(
    re: &Regex,
    build: fn(&Captures<'_>) -> Option<DateTime<Utc>>,
    message: &str,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, String)> {
    re.captures_iter(message).find_map(|caps| {
        let at = accept_time(build(&caps)?, now)?;
        Some((at, caps.get(0)?.as_str().to_owned()))
    })
}

/// Infers recovery from a provider's error message (case-insensitive).
///
/// Tried in order: a relative duration after "in"/"after", then "<verb> at
/// <ISO 8601>", then "<verb> at <RFC 2822 date>". Returns the recovery time
/// (past clamped to `now`) and the text that matched.
pub fn parse_message(message: &str, now: DateTime<Utc>) -> Option<(DateTime<Utc>, String)> {
    parse_relative_message(message, now)
        .or_else(|| parse_at_message(&AT_ISO, iso_from_captures, message, now))
        .or_else(|| parse_at_message(&AT_RFC2822, rfc2822_from_captures, message, now))
}

/// Parses a prose duration such as "12 mins", "500ms", "1h30m" or "1 hour and
/// 30 minutes" (the whole input must be the duration). Exposed for testing.
pub fn parse_human_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    match parse_duration_phrase(text)? {
        (secs, len) if len == text.len() => seconds_to_duration(secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recovery::test_support::*;
    use crate::domain::recovery::*;

    // --- message: relative durations ---------------------------------------

    #[test]
    fn message_relative_forms() {
        let cases = [
            ("Your quota will reset in 12 mins.", Duration::minutes(12)),
            ("Please retry after 30 seconds", Duration::seconds(30)),
            ("Limit resets again in 2 hours", Duration::hours(2)),
            ("Try again in 20 minutes.", Duration::minutes(20)),
            ("available in 2 days", Duration::days(2)),
            ("available in 1 day", Duration::days(1)),
            ("in 1.5 hours", Duration::minutes(90)),
            ("in 3 hrs", Duration::hours(3)),
            ("in 1 hr", Duration::hours(1)),
            ("in 45 secs", Duration::seconds(45)),
            ("in 45 sec", Duration::seconds(45)),
            ("in 10s", Duration::seconds(10)),
            ("in 5 m", Duration::minutes(5)),
            ("in 5min", Duration::minutes(5)),
            ("in 2h", Duration::hours(2)),
            ("in 2d", Duration::days(2)),
            ("in 2 weeks", Duration::weeks(2)),
            ("in 250 milliseconds", Duration::milliseconds(250)),
            ("IN 7 MINUTES", Duration::minutes(7)),
            ("(retry in 9s)", Duration::seconds(9)),
            ("in 0 seconds", Duration::zero()),
        ];
        for (text, delay) in cases {
            assert_eq!(msg_at(text), now() + delay, "{text:?}");
        }
    }

    #[test]
    fn message_500ms_is_half_a_second_not_500_minutes() {
        // The old parser matched "m" before "ms".
        assert_eq!(
            msg_at("retry after 500ms"),
            now() + Duration::milliseconds(500)
        );
        assert_eq!(
            msg_at("retry after 500 ms."),
            now() + Duration::milliseconds(500)
        );
    }

    #[test]
    fn message_try_again_in_20_minutes_with_hint() {
        let (at, hint) =
            msg("Rate limit reached for gpt-4 in organization org-x. Please try again in 20 minutes. Visit https://example.invalid")
                .expect("match");
        assert_eq!(at, now() + Duration::minutes(20));
        // "in organization" is skipped; the hint starts at the word before.
        assert_eq!(hint, "again in 20 minutes");
    }

    #[test]
    fn message_hint_includes_the_preceding_word() {
        assert_eq!(
            msg("reset in 12 mins").map(|m| m.1).as_deref(),
            Some("reset in 12 mins")
        );
        assert_eq!(
            msg("Quota: retry after 30 seconds, thanks")
                .map(|m| m.1)
                .as_deref(),
            Some("retry after 30 seconds")
        );
        assert_eq!(msg("in 5s").map(|m| m.1).as_deref(), Some("in 5s"));
    }

    #[test]
    fn message_compound_durations() {
        let ninety = now() + Duration::minutes(90);
        assert_eq!(msg_at("resets in 1h30m"), ninety);
        assert_eq!(msg_at("resets in 1 hour 30 minutes"), ninety);
        assert_eq!(msg_at("resets in 1 hour and 30 minutes"), ninety);
        assert_eq!(msg_at("resets in 1 hour, 30 minutes."), ninety);
        assert_eq!(msg_at("in 1h2m3s"), now() + Duration::seconds(3723));
        assert_eq!(
            msg("resets in 1 hour and 30 minutes, ok")
                .map(|m| m.1)
                .as_deref(),
            Some("resets in 1 hour and 30 minutes")
        );
        // "and" is only a separator as a whole word.
        assert_eq!(
            msg_at("in 1 hour and30 minutes"),
            now() + Duration::hours(1)
        );
        // A trailing non-duration component is left out of the match.
        assert_eq!(
            msg("in 5 minutes 3 mice").map(|m| m.1).as_deref(),
            Some("in 5 minutes")
        );
    }

    #[test]
    fn message_units_must_end_at_a_word_boundary() {
        for text in [
            "in 5 months",
            "in 3 mice",
            "in 2 hoursly",
            "in 4 daysx",
            "in 5m3",
            "in 10 sheep",
            "in 2026 we launched",
            "in -5 minutes",
            "in five minutes",
            "within 5 minutes", // "in" must be a whole word
            "retry after5 minutes",
        ] {
            assert_eq!(msg(text), None, "{text:?}");
        }
    }

    #[test]
    fn message_skips_earlier_non_duration_in() {
        assert_eq!(
            msg_at("in 3 mice land; retry in 4 secs"),
            now() + Duration::seconds(4)
        );
    }

    #[test]
    fn message_absurd_relative_duration_is_rejected() {
        assert_eq!(msg("retry in 400 days"), None);
        assert_eq!(msg("retry in 99999999999999999999999999999 hours"), None);
        let r = infer(&[], "retry in 400 days");
        assert_eq!(r.source, RecoverySource::Default);
    }

    #[test]
    fn message_handles_multibyte_text() {
        let (at, hint) = msg("Réessayez ☃ dans… retry in 5 minutes ✓").expect("match");
        assert_eq!(at, now() + Duration::minutes(5));
        assert_eq!(hint, "retry in 5 minutes");
        assert_eq!(msg("in 5 mé"), None);
        assert_eq!(msg("☃☃ in ☃"), None);
    }

    // --- message: ISO 8601 -------------------------------------------------

    #[test]
    fn message_iso_timestamps() {
        let ten = ts("2026-03-01T14:00:00Z");
        let cases = [
            ("Your limit resets at 2026-03-01T14:00:00Z", ten),
            ("resets at 2026-03-01T16:00:00+02:00", ten),
            ("resets at 2026-03-01T16:00:00+0200", ten),
            ("resets at 2026-03-01T09:00:00-05:00", ten),
            (
                "resets at 2026-03-01T14:00:00.750Z",
                ten + Duration::milliseconds(750),
            ),
            ("resets at 2026-03-01 14:00:00Z", ten),
            ("resets at 2026-03-01 14:00:00 UTC", ten),
            ("resets at 2026-03-01T14:00:00", ten),
            ("resets at 2026-03-01T14:00Z", ten),
            ("RESETS AT 2026-03-01t14:00:00z", ten),
            ("reset at 2026-03-01T14:00:00Z", ten),
            ("available at 2026-03-01T14:00:00Z", ten),
            ("retry at 2026-03-01T14:00:00Z", ten),
            ("try again at 2026-03-01T14:00:00Z", ten),
            ("resets at 2026-03-02", ts("2026-03-02T00:00:00Z")),
        ];
        for (text, expected) in cases {
            assert_eq!(msg_at(text), expected, "{text:?}");
        }
    }

    #[test]
    fn message_iso_trailing_punctuation_old_bug() {
        let ten = ts("2026-03-01T14:00:00Z");
        for text in [
            "resets at 2026-03-01T14:00:00Z.",
            "resets at 2026-03-01T14:00:00Z,",
            "(resets at 2026-03-01T14:00:00Z)",
            "resets at 2026-03-01T14:00:00Z; try later",
            "resets at 2026-03-01T14:00:00.",
            "resets at 2026-03-01T16:00:00+02:00.",
        ] {
            assert_eq!(msg_at(text), ten, "{text:?}");
        }
        assert_eq!(
            msg("Quota resets at 2026-03-01T14:00:00Z.")
                .map(|m| m.1)
                .as_deref(),
            Some("resets at 2026-03-01T14:00:00Z")
        );
    }

    #[test]
    fn message_iso_requires_at_and_a_valid_date() {
        assert_eq!(msg("resets 2026-03-01T14:00:00Z"), None);
        assert_eq!(msg("request made at 2026-03-01T14:00:00Z"), None);
        assert_eq!(msg("resets at 2026-13-01T14:00:00Z"), None);
        assert_eq!(msg("resets at 2026-03-01T25:00:00Z"), None);
        // An invalid first match does not hide a valid later one.
        assert_eq!(
            msg_at("resets at 2026-02-30T00:00:00Z or resets at 2026-03-01T14:00:00Z"),
            ts("2026-03-01T14:00:00Z")
        );
    }

    #[test]
    fn message_past_timestamp_clamps_to_now() {
        assert_eq!(msg_at("resets at 2020-01-01T00:00:00Z"), now());
        let r = infer(&[], "resets at Wed, 01 Jan 2020 00:00:00 GMT");
        assert_eq!(r.recovery_at, now());
        assert_eq!(r.source, RecoverySource::Message);
    }

    #[test]
    fn message_far_future_timestamp_is_rejected() {
        assert_eq!(msg("resets at 2099-01-01T00:00:00Z"), None);
    }

    // --- message: RFC 2822 -------------------------------------------------

    #[test]
    fn message_rfc2822_weekday_comma_old_bug() {
        let (at, hint) = msg("Quota resets at Sun, 01 Mar 2026 14:00:00 GMT").expect("match");
        assert_eq!(at, ts("2026-03-01T14:00:00Z"));
        assert_eq!(hint, "resets at Sun, 01 Mar 2026 14:00:00 GMT");
    }

    #[test]
    fn message_rfc2822_variants() {
        let ten = ts("2026-03-01T14:00:00Z");
        for text in [
            "resets at 01 Mar 2026 14:00:00 GMT",
            "resets at 1 Mar 2026 14:00:00 GMT",
            "resets at Sun, 01 Mar 2026 14:00:00 GMT.",
            "resets at Sun, 01 Mar 2026 14:00:00 GMT, then retry",
            "(resets at Sun, 01 Mar 2026 14:00:00 GMT)",
            "resets at sun, 01 mar 2026 14:00:00 gmt",
            "resets at Sunday, 01 March 2026 14:00:00 UTC",
            "resets at Sun, 01 Mar 2026 16:00:00 +0200",
            "resets at Sun, 01 Mar 2026 09:00:00 EST",
            "resets at Sun, 01 Mar 2026 14:00 GMT",
            "resets at Sun, 01 Mar 2026 14:00:00",
            // A weekday that contradicts the date is ignored, not fatal.
            "resets at Wed, 01 Mar 2026 14:00:00 GMT",
            "available at Sun, 01 Mar 2026 14:00:00 GMT",
        ] {
            assert_eq!(msg_at(text), ten, "{text:?}");
        }
    }

    #[test]
    fn message_relative_is_tried_before_absolute() {
        let (at, hint) =
            msg("resets at 2026-03-01T14:00:00Z; try again in 5 minutes").expect("match");
        assert_eq!(at, now() + Duration::minutes(5));
        assert_eq!(hint, "again in 5 minutes");
        // ISO is tried before RFC 2822.
        assert_eq!(
            msg_at("resets at Sun, 01 Mar 2026 15:00:00 GMT or resets at 2026-03-01T14:00:00Z"),
            ts("2026-03-01T14:00:00Z")
        );
    }

    #[test]
    fn static_regexes_compile() {
        // Force every lazily compiled pattern so a typo fails here, not in
        // production on the first rate-limit.
        assert!(RELATIVE_ANCHOR.is_match("in 5"));
        assert!(AT_ISO.is_match("resets at 2026-03-01"));
        assert!(AT_RFC2822.is_match("resets at 01 Mar 2026 10:00"));
        assert!(crate::domain::recovery::dates::RFC2822_WHOLE.is_match("01 Mar 2026 10:00"));
    }
}
