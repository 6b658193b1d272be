//! Dates and times as providers write them.

use std::sync::LazyLock;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use regex::{Captures, Regex};

// ---------------------------------------------------------------------------
// HTTP / RFC 2822 dates
// ---------------------------------------------------------------------------

/// An RFC 2822 / RFC 850 style date, written leniently: optional weekday
/// (abbreviated or full, with or without comma), `-` or space separators,
/// 2-4 digit years, optional seconds and an optional zone. Lenient because
/// provider messages are written by humans and the old parser tripped over
/// the weekday comma.
pub(super) const RFC2822_BODY: &str = r"(?:(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*\.?\s*,?\s*)?(?P<day>[0-9]{1,2})[\s-]+(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?[\s-]+(?P<year>[0-9]{2,4})\s+(?P<hh>[0-9]{1,2}):(?P<mi>[0-9]{2})(?::(?P<ss>[0-9]{2}))?(?:\s*(?P<zone>[+-][0-9]{4}|gmt|utc|ut|z|[ecmp][sd]t)\b)?";

/// A whole header value that is an RFC 2822-ish date, allowing trailing
/// punctuation.
pub(super) static RFC2822_WHOLE: LazyLock<Regex> = LazyLock::new(|| {
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
pub(super) fn rfc2822_from_captures(caps: &Captures<'_>) -> Option<DateTime<Utc>> {
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
pub(super) fn numeric_offset_secs(zone: &str) -> Option<i32> {
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
pub(super) fn local_to_utc(naive: NaiveDateTime, offset_secs: i32) -> Option<DateTime<Utc>> {
    let offset = FixedOffset::east_opt(offset_secs)?;
    Some(
        naive
            .and_local_timezone(offset)
            .single()?
            .with_timezone(&Utc),
    )
}

/// Builds a UTC time from the named groups of the message parser's "resets at <ISO 8601>" pattern.
pub(super) fn iso_from_captures(caps: &Captures<'_>) -> Option<DateTime<Utc>> {
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
