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

use std::collections::HashSet;
use std::sync::LazyLock;

use chrono::{
    DateTime, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Utc,
};
use regex::{Captures, Regex};

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
const MAX_DELAY_SECS: f64 = 366.0 * 86_400.0;

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
fn accept_time(at: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
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
fn after(now: DateTime<Utc>, delay: Duration) -> Option<DateTime<Utc>> {
    now.checked_add_signed(delay)
}

/// Converts a number of seconds to a `Duration`, rejecting NaN, infinities,
/// negatives and anything beyond [`max_recovery_delay`].
fn seconds_to_duration(secs: f64) -> Option<Duration> {
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
fn bound_hint(hint: &str) -> String {
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
fn leading_number(s: &str) -> Option<(f64, usize)> {
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
fn leading_word(s: &str) -> (&str, usize) {
    let len = s
        .char_indices()
        .find(|(_, c)| !c.is_alphabetic())
        .map_or(s.len(), |(i, _)| i);
    (&s[..len], len)
}

// ---------------------------------------------------------------------------
// Retry-After
// ---------------------------------------------------------------------------

/// Finds the first usable `retry-after-ms` or `Retry-After` header.
///
/// `retry-after-ms` (sent by OpenAI and understood by its SDKs) is preferred
/// because it is more precise; repeated headers are tried in order and the
/// first one that parses wins.
fn retry_after_from_headers(
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
// HTTP / RFC 2822 dates
// ---------------------------------------------------------------------------

/// An RFC 2822 / RFC 850 style date, written leniently: optional weekday
/// (abbreviated or full, with or without comma), `-` or space separators,
/// 2-4 digit years, optional seconds and an optional zone. Lenient because
/// provider messages are written by humans and the old parser tripped over
/// the weekday comma.
const RFC2822_BODY: &str = r"(?:(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*\.?\s*,?\s*)?(?P<day>[0-9]{1,2})[\s-]+(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?[\s-]+(?P<year>[0-9]{2,4})\s+(?P<hh>[0-9]{1,2}):(?P<mi>[0-9]{2})(?::(?P<ss>[0-9]{2}))?(?:\s*(?P<zone>[+-][0-9]{4}|gmt|utc|ut|z|[ecmp][sd]t)\b)?";

/// A whole header value that is an RFC 2822-ish date, allowing trailing
/// punctuation.
static RFC2822_WHOLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)^\s*{RFC2822_BODY}[\s.,;)]*$")).expect("static regex is valid")
});

/// Parses an HTTP date (RFC 7231: IMF-fixdate, RFC 850 or asctime) or, more
/// leniently, any RFC 2822-ish date. A missing zone means UTC, and a weekday
/// that contradicts the date is ignored rather than failing the parse.
pub fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    let value = value.trim();
    if let Ok(dt) = DateTime::parse_from_rfc2822(value) {
        return Some(dt.with_timezone(&Utc));
    }
    if let Some(caps) = RFC2822_WHOLE.captures(value) {
        return rfc2822_from_captures(&caps);
    }
    // asctime: "Sun Nov  6 08:49:37 1994", always UTC.
    NaiveDateTime::parse_from_str(value, "%a %b %e %H:%M:%S %Y")
        .ok()
        .map(|naive| naive.and_utc())
}

/// Builds a UTC time from the named groups of [`RFC2822_BODY`].
fn rfc2822_from_captures(caps: &Captures<'_>) -> Option<DateTime<Utc>> {
    let num = |name: &str| -> Option<u32> { caps.name(name)?.as_str().parse().ok() };
    let month = match caps.name("mon")?.as_str().to_ascii_lowercase().as_str() {
        "jan" => 1,
        "feb" => 2,
        "mar" => 3,
        "apr" => 4,
        "may" => 5,
        "jun" => 6,
        "jul" => 7,
        "aug" => 8,
        "sep" => 9,
        "oct" => 10,
        "nov" => 11,
        "dec" => 12,
        _ => return None,
    };
    let year_text = caps.name("year")?.as_str();
    let year_num = num("year")?;
    // RFC 5322 obsolete years: two digits below 50 are 20xx, otherwise 19xx;
    // three digits are offset from 1900.
    let year = match year_text.len() {
        2 if year_num < 50 => 2000 + year_num,
        2 | 3 => 1900 + year_num,
        _ => year_num,
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, num("day")?)?;
    let time = NaiveTime::from_hms_opt(num("hh")?, num("mi")?, num("ss").unwrap_or(0))?;
    let offset_secs = match caps.name("zone").map(|z| z.as_str().to_ascii_lowercase()) {
        None => 0,
        Some(zone) => match zone.as_str() {
            "gmt" | "utc" | "ut" | "z" => 0,
            "edt" => -4 * 3600,
            "est" | "cdt" => -5 * 3600,
            "cst" | "mdt" => -6 * 3600,
            "mst" | "pdt" => -7 * 3600,
            "pst" => -8 * 3600,
            numeric => numeric_offset_secs(numeric)?,
        },
    };
    local_to_utc(date.and_time(time), offset_secs)
}

/// Parses `+HH`, `+HHMM` or `+HH:MM` (or `-`) into seconds east of UTC.
fn numeric_offset_secs(zone: &str) -> Option<i32> {
    let (sign, rest) = match zone.as_bytes().first()? {
        b'+' => (1, &zone[1..]),
        b'-' => (-1, &zone[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hh, mm) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (digits[..2].parse::<i32>().ok()?, digits[2..].parse().ok()?),
        _ => return None,
    };
    if hh >= 24 || mm >= 60 {
        return None;
    }
    Some(sign * (hh * 3600 + mm * 60))
}

/// Interprets a naive wall-clock time at a fixed offset and converts to UTC.
fn local_to_utc(naive: NaiveDateTime, offset_secs: i32) -> Option<DateTime<Utc>> {
    let offset = FixedOffset::east_opt(offset_secs)?;
    Some(
        naive
            .and_local_timezone(offset)
            .single()?
            .with_timezone(&Utc),
    )
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
    if let Some(middle) = name.strip_prefix("anthropic-ratelimit-") {
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

/// Builds a UTC time from the named groups of [`AT_ISO`].
fn iso_from_captures(caps: &Captures<'_>) -> Option<DateTime<Utc>> {
    let num = |name: &str| -> Option<u32> { caps.name(name)?.as_str().parse().ok() };
    let date = NaiveDate::from_ymd_opt(i32::try_from(num("y")?).ok()?, num("mo")?, num("d")?)?;
    // Fractions beyond nanoseconds are dropped, not rounded, so the value
    // always fits in a u32 and never rolls into the next second.
    let nanos = match caps.name("frac") {
        Some(frac) => {
            let digits: String = frac.as_str().chars().take(9).collect();
            format!("{digits:0<9}").parse().ok()?
        }
        None => 0,
    };
    let time = match caps.name("hh") {
        Some(_) => {
            NaiveTime::from_hms_nano_opt(num("hh")?, num("mi")?, num("ss").unwrap_or(0), nanos)?
        }
        None => NaiveTime::MIN,
    };
    let offset_secs = match caps.name("zone").map(|z| z.as_str().to_ascii_lowercase()) {
        None => 0,
        Some(zone) if matches!(zone.as_str(), "z" | "utc" | "gmt") => 0,
        Some(zone) => numeric_offset_secs(&zone)?,
    };
    local_to_utc(date.and_time(time), offset_secs)
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
    use proptest::prelude::*;

    fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test timestamp")
            .with_timezone(&Utc)
    }

    fn now() -> DateTime<Utc> {
        ts("2026-03-01T12:00:00Z")
    }

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn default_5h() -> Duration {
        Duration::hours(5)
    }

    fn infer(headers: &[(&str, &str)], message: &str) -> RecoveryEstimate {
        infer_recovery(None, &hdrs(headers), message, now(), default_5h())
    }

    fn msg(message: &str) -> Option<(DateTime<Utc>, String)> {
        parse_message(message, now())
    }

    fn msg_at(message: &str) -> DateTime<Utc> {
        msg(message)
            .unwrap_or_else(|| panic!("no match in {message:?}"))
            .0
    }

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

    #[test]
    fn static_regexes_compile() {
        // Force every lazily compiled pattern so a typo fails here, not in
        // production on the first rate-limit.
        assert!(RELATIVE_ANCHOR.is_match("in 5"));
        assert!(AT_ISO.is_match("resets at 2026-03-01"));
        assert!(AT_RFC2822.is_match("resets at 01 Mar 2026 10:00"));
        assert!(RFC2822_WHOLE.is_match("01 Mar 2026 10:00"));
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
