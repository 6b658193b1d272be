//! Recovery times from a provider's error message written in prose.

use std::sync::LazyLock;

use chrono::{DateTime, Duration, Utc};
use regex::{Captures, Regex};

use super::dates::{
    RFC2822_BODY, clock_time, earliest_local, iso_from_captures, month_number, nearest_month_day,
    next_wall_clock, rfc2822_from_captures,
};
use super::{
    MAX_DELAY_SECS, Tz, accept_time, after, epoch_to_time, leading_number, leading_word,
    parse_time_zone, seconds_to_duration,
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

/// What may introduce a wall-clock time or a date without "at" as well:
/// "resets 2am", "resets at 2am", "try again at 8:19 PM", "until 3pm".
const WALL_PREFIX: &str = r"\b(?:(?:resets?|renews?|refresh(?:es)?|lifts?)\s+(?:at\s+|on\s+)?|(?:available|retry|again|expires?)\s+at\s+|until\s+)";

/// A clock time: `2am`, `12:50am`, `8:19 PM`, `14:00`, `10:00:00`, then an
/// optional UTC marker and an optional IANA zone in parentheses, as Claude
/// Code writes it: `12:50am (America/Los_Angeles)`.
const CLOCK: &str = r"(?P<hh>[0-9]{1,2})(?::(?P<mi>[0-9]{2}))?(?::(?P<ss>[0-9]{2}))?(?:\s*(?P<ampm>[ap])\.?m\b\.?)?(?:\s*(?P<utc>utc|gmt|z)\b)?(?:\s*\(\s*(?P<zone>[a-z][a-z0-9_+-]*(?:/[a-z0-9_+-]+){0,2})\s*\))?";

/// "resets 2am", "resets 12:50am (America/Los_Angeles)", "try again at 8:19 PM".
static WALL_CLOCK: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i){WALL_PREFIX}{CLOCK}")).expect("static regex is valid")
});

/// A date with a month name, an optional ordinal and an optional year, then
/// a clock time: "try again at Jul 5th, 2026 8:19 PM", "resets Oct 9, 2am
/// (Europe/Berlin)", "resets on Mon, Jul 6 at 9:00".
static MONTH_DATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?i){WALL_PREFIX}(?:(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*\.?,?\s+)?(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+(?P<day>[0-9]{{1,2}})(?:st|nd|rd|th)?\b,?(?:\s+(?P<year>[0-9]{{4}})\b,?)?\s+(?:at\s+)?{CLOCK}"
    ))
    .expect("static regex is valid")
});

/// Claude Code's headless (`-p`) message: `Claude AI usage limit reached|<epoch seconds>`.
static LIMIT_EPOCH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:usage\s+)?limit\s+reached\s*\|\s*(?P<epoch>[0-9]{1,20})\b")
        .expect("static regex is valid")
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

/// The zone of a matched clock time: `UTC`/`GMT`/`Z` after it, else the
/// IANA zone named in parentheses, else (also for an unknown name) the
/// caller's zone.
fn clock_zone(caps: &Captures<'_>, caller: Tz) -> Tz {
    if caps.name("utc").is_some() {
        return Tz::UTC;
    }
    caps.name("zone")
        .and_then(|z| parse_time_zone(z.as_str()))
        .unwrap_or(caller)
}

/// The clock time of a [`CLOCK`] match.
fn clock_from_captures(caps: &Captures<'_>) -> Option<chrono::NaiveTime> {
    let num = |name: &str| -> Option<Option<u32>> {
        match caps.name(name) {
            Some(m) => m.as_str().parse().ok().map(Some),
            None => Some(None),
        }
    };
    clock_time(
        num("hh")??,
        num("mi")?,
        num("ss")?,
        caps.name("ampm").map(|m| m.as_str()),
    )
}

/// "resets 2am (America/Los_Angeles)": the next occurrence, within a day.
fn parse_wall_clock(message: &str, now: DateTime<Utc>, tz: Tz) -> Option<(DateTime<Utc>, String)> {
    WALL_CLOCK.captures_iter(message).find_map(|caps| {
        let time = clock_from_captures(&caps)?;
        let at = next_wall_clock(clock_zone(&caps, tz), time, now)?;
        Some((at, caps.get(0)?.as_str().trim_end().to_owned()))
    })
}

/// "try again at Jul 5th, 2026 8:19 PM": a month-name date in the named or
/// the caller's zone; without a year, the occurrence nearest to now.
fn parse_month_date(message: &str, now: DateTime<Utc>, tz: Tz) -> Option<(DateTime<Utc>, String)> {
    MONTH_DATE.captures_iter(message).find_map(|caps| {
        let month = month_number(caps.name("mon")?.as_str())?;
        let day: u32 = caps.name("day")?.as_str().parse().ok()?;
        let time = clock_from_captures(&caps)?;
        let zone = clock_zone(&caps, tz);
        let at = match caps.name("year") {
            Some(year) => {
                let year: i32 = year.as_str().parse().ok()?;
                let date = chrono::NaiveDate::from_ymd_opt(year, month, day)?;
                earliest_local(zone, date.and_time(time))?
            }
            None => nearest_month_day(zone, month, day, time, now)?,
        };
        let at = accept_time(at, now)?;
        Some((at, caps.get(0)?.as_str().trim_end().to_owned()))
    })
}

/// "Claude AI usage limit reached|1796120688".
fn parse_limit_epoch(message: &str, now: DateTime<Utc>) -> Option<(DateTime<Utc>, String)> {
    LIMIT_EPOCH.captures_iter(message).find_map(|caps| {
        let epoch: f64 = caps.name("epoch")?.as_str().parse().ok()?;
        let at = epoch_to_time(epoch, now)?;
        Some((at, caps.get(0)?.as_str().to_owned()))
    })
}

/// Infers recovery from a provider's error message (case-insensitive).
///
/// Tried in order: a relative duration after "in"/"after"; Claude Code's
/// headless "limit reached|<epoch>"; "<verb> at <ISO 8601>" (naive means
/// UTC); "<verb> at <RFC 2822 date>"; a month-name date with a clock time
/// ("try again at Jul 5th, 2026 8:19 PM"); a bare clock time ("resets 2am",
/// "resets 12:50am (America/Los_Angeles)"), its next occurrence. Month-name
/// dates and clock times are read in the zone named in parentheses, else in
/// `tz`, the caller's zone. Returns the recovery time (past clamped to
/// `now`) and the text that matched.
pub fn parse_message(message: &str, now: DateTime<Utc>, tz: Tz) -> Option<(DateTime<Utc>, String)> {
    parse_relative_message(message, now)
        .or_else(|| parse_limit_epoch(message, now))
        .or_else(|| parse_at_message(&AT_ISO, iso_from_captures, message, now))
        .or_else(|| parse_at_message(&AT_RFC2822, rfc2822_from_captures, message, now))
        .or_else(|| parse_month_date(message, now, tz))
        .or_else(|| parse_wall_clock(message, now, tz))
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

    // --- message: Claude Code and Codex -------------------------------------

    fn msg_in(message: &str, zone: &str) -> Option<(DateTime<Utc>, String)> {
        parse_message(message, now(), zone.parse().unwrap())
    }

    #[test]
    fn claude_code_wall_clock_resets() {
        // now is 2026-03-01T12:00:00Z: 04:00 in Los Angeles, 17:30 in Colombo.
        let cases = [
            (
                "5-hour limit reached ∙ resets 2am",
                "UTC",
                "2026-03-02T02:00:00Z",
                "resets 2am",
            ),
            (
                "5-hour limit reached ∙ resets 2am",
                "America/New_York",
                "2026-03-02T07:00:00Z",
                "resets 2am",
            ),
            (
                "5-hour limit reached ∙ resets 5pm",
                "UTC",
                "2026-03-01T17:00:00Z",
                "resets 5pm",
            ),
            (
                "You've hit your session limit · resets 12:50am (America/Los_Angeles)",
                "Asia/Tokyo",
                "2026-03-02T08:50:00Z",
                "resets 12:50am (America/Los_Angeles)",
            ),
            (
                "You've hit your weekly limit · resets 3am (Europe/London)",
                "UTC",
                "2026-03-02T03:00:00Z",
                "resets 3am (Europe/London)",
            ),
            (
                "You're out of extra usage · resets 11:30am (Asia/Colombo)",
                "UTC",
                "2026-03-02T06:00:00Z",
                "resets 11:30am (Asia/Colombo)",
            ),
            (
                "resets 11:30 AM (asia/colombo)",
                "UTC",
                "2026-03-02T06:00:00Z",
                "resets 11:30 AM (asia/colombo)",
            ),
            (
                "resets at 14:00",
                "UTC",
                "2026-03-01T14:00:00Z",
                "resets at 14:00",
            ),
            (
                "limit lifts at 3pm UTC",
                "Asia/Tokyo",
                "2026-03-01T15:00:00Z",
                "lifts at 3pm UTC",
            ),
            // An unknown zone in the text falls back to the caller's.
            (
                "resets 2am (Mars/Olympus)",
                "Europe/London",
                "2026-03-02T02:00:00Z",
                "resets 2am (Mars/Olympus)",
            ),
        ];
        for (text, zone, at, hint) in cases {
            assert_eq!(
                msg_in(text, zone),
                Some((ts(at), hint.to_owned())),
                "{text:?} in {zone}"
            );
        }
    }

    #[test]
    fn bare_numbers_after_resets_are_not_clock_times() {
        for text in [
            "resets 5",
            "resets 13pm",
            "resets 0am",
            "resets at 2026",
            "reset 25:00",
        ] {
            assert_eq!(msg(text), None, "{text:?}");
        }
    }

    #[test]
    fn claude_code_headless_epoch() {
        let at = now() + Duration::hours(3);
        let text = format!("Claude AI usage limit reached|{}", at.timestamp());
        let (got, hint) = msg(&text).expect("match");
        assert_eq!(got, at);
        assert_eq!(hint, format!("usage limit reached|{}", at.timestamp()));
        let ms = format!("Claude AI usage limit reached|{}", at.timestamp_millis());
        assert_eq!(msg_at(&ms), at);
        // Far beyond the horizon: not a time, so nothing.
        assert_eq!(msg("Claude AI usage limit reached|4102444800"), None);
    }

    #[test]
    fn codex_month_name_dates() {
        let cases = [
            (
                "You've hit your usage limit. Upgrade to Plus to continue using Codex (https://chatgpt.com/explore/plus), or try again at Mar 2nd, 2026 6:59 AM.",
                "America/Los_Angeles",
                "2026-03-02T14:59:00Z",
            ),
            (
                "try again at Jul 5th, 2026 8:19 PM.",
                "UTC",
                "2026-07-05T20:19:00Z",
            ),
            (
                "try again at July 5, 2026 8:19 pm",
                "Europe/London",
                "2026-07-05T19:19:00Z",
            ),
            (
                "resets Mar 3, 2am (Europe/Berlin)",
                "UTC",
                "2026-03-03T01:00:00Z",
            ),
            (
                "resets on Tue, Mar 3 at 9:00",
                "UTC",
                "2026-03-03T09:00:00Z",
            ),
            (
                "resets Mar 1st 2026 11:00 am",
                "UTC",
                "2026-03-01T12:00:00Z",
            ),
        ];
        for (text, zone, at) in cases {
            assert_eq!(msg_in(text, zone).map(|m| m.0), Some(ts(at)), "{text:?}");
        }
        assert_eq!(
            msg("try again at Jul 5th, 2026 8:19 PM.")
                .map(|m| m.1)
                .as_deref(),
            Some("again at Jul 5th, 2026 8:19 PM.")
        );
        // Impossible dates and far-away years read as nothing.
        assert_eq!(msg("try again at Feb 30th, 2026 8:19 PM"), None);
        assert_eq!(msg("try again at Jul 5th, 2099 8:19 PM"), None);
    }

    #[test]
    fn compound_codex_durations_still_work() {
        assert_eq!(
            msg(
                "You've hit your usage limit. Upgrade to Pro (https://chatgpt.com/explore/pro), or try again in 5 days 22 hours 11 minutes."
            ),
            Some((
                now() + Duration::days(5) + Duration::hours(22) + Duration::minutes(11),
                "again in 5 days 22 hours 11 minutes".to_owned()
            ))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// "resets <clock>" in any zone: always strictly ahead, at most a day.
        #[test]
        fn a_clock_time_in_a_message_is_within_the_next_24_hours(
            hour in 1u32..=12,
            minute in 0u32..60,
            pm in proptest::bool::ANY,
            zone in proptest::sample::select(chrono_tz::TZ_VARIANTS.to_vec()),
            now_secs in 0_i64..4_102_444_800,
        ) {
            let now = DateTime::from_timestamp(now_secs, 0).expect("in range");
            let text = format!(
                "limit reached ∙ resets {hour}:{minute:02}{} ({})",
                if pm { "pm" } else { "am" },
                zone.name()
            );
            let (at, _) = parse_message(&text, now, Tz::UTC).expect("a clock time");
            proptest::prop_assert!(at > now && at <= now + Duration::hours(24), "{text}: {at} from {now}");
        }
    }
}
