//! Dates and times as providers write them.

use std::sync::LazyLock;

use chrono::{
    DateTime, Datelike, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc,
};
use chrono_tz::Tz;
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
    let month = month_number(caps.name("mon")?.as_str())?;
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

// ---------------------------------------------------------------------------
// Month names, 12-hour clocks and wall-clock times in a zone
// ---------------------------------------------------------------------------

/// `jan`, `January`, `Sept.` and so on: the month's number.
pub(super) fn month_number(name: &str) -> Option<u32> {
    let lower = name.to_ascii_lowercase();
    let month = match lower.get(..3)? {
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
    Some(month)
}

/// A clock time as written: `2am`, `12:50am`, `8:19 PM`, `14:00`. A 12-hour
/// time needs 1 to 12 hours; a 24-hour time needs its minutes (a bare "5" is
/// not a time).
pub(super) fn clock_time(
    hour: u32,
    minute: Option<u32>,
    second: Option<u32>,
    meridiem: Option<&str>,
) -> Option<NaiveTime> {
    let hour = match meridiem.map(|m| m.to_ascii_lowercase()) {
        Some(m) => {
            if !(1..=12).contains(&hour) {
                return None;
            }
            match (m.starts_with('p'), hour) {
                (false, 12) => 0,
                (true, 12) => 12,
                (false, h) => h,
                (true, h) => h + 12,
            }
        }
        None => {
            minute?;
            hour
        }
    };
    NaiveTime::from_hms_opt(hour, minute.unwrap_or(0), second.unwrap_or(0))
}

/// The instants a local time stands for in `tz`: one, two in a fold (the
/// clock repeats an hour when it falls back; earliest first), and in a gap
/// (a time the clock skips when it springs forward) the first valid instant
/// after it, found by stepping forward a minute at a time.
pub(super) fn local_instants(tz: Tz, naive: NaiveDateTime) -> Vec<DateTime<Utc>> {
    use chrono::offset::LocalResult;
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(at) => vec![at.with_timezone(&Utc)],
        LocalResult::Ambiguous(early, late) => {
            vec![early.with_timezone(&Utc), late.with_timezone(&Utc)]
        }
        LocalResult::None => (1..=MAX_GAP_MINUTES)
            .find_map(|m| {
                let later = naive.checked_add_signed(Duration::minutes(m))?;
                tz.from_local_datetime(&later).earliest()
            })
            .map(|at| vec![at.with_timezone(&Utc)])
            .unwrap_or_default(),
    }
}

/// No zone has ever skipped more than a day (Samoa, 2011).
const MAX_GAP_MINUTES: i64 = 25 * 60;

/// The earliest instant of a local date and time in `tz` (see
/// [`local_instants`] for folds and gaps).
pub(super) fn earliest_local(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    local_instants(tz, naive).into_iter().next()
}

/// The next occurrence of a wall-clock time in `tz`, strictly after `now`
/// and at most 24 hours ahead.
///
/// A time the clock skips that day means the first instant after the gap; a
/// time the clock shows twice means the first showing still ahead. Only on
/// the day a clock falls back can the next showing be more than 24 hours
/// away (the day is 25 hours long); such an answer is capped at 24 hours, as
/// a reset shown without a date lies within a day.
pub fn next_wall_clock(tz: Tz, time: NaiveTime, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let horizon = now.checked_add_signed(Duration::hours(24))?;
    let today = now.with_timezone(&tz).date_naive();
    let next = (-1..=2)
        .filter_map(|days| today.checked_add_signed(Duration::days(days)))
        .flat_map(|date| local_instants(tz, date.and_time(time)))
        .filter(|at| *at > now)
        .min()?;
    Some(next.min(horizon))
}

/// A month and day without a year, at a local time: the occurrence nearest
/// to `now` (last year's, this year's or next year's), so that "Dec 28" read
/// on Dec 30 is two days ago (recovery now) and "Jan 2" read on Dec 30 is in
/// three days.
pub(super) fn nearest_month_day(
    tz: Tz,
    month: u32,
    day: u32,
    time: NaiveTime,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let year = now.with_timezone(&tz).year();
    [year - 1, year, year + 1]
        .into_iter()
        .filter_map(|y| NaiveDate::from_ymd_opt(y, month, day))
        .filter_map(|date| earliest_local(tz, date.and_time(time)))
        .min_by_key(|at| (*at - now).abs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recovery::test_support::ts;
    use proptest::prelude::*;

    fn tz(name: &str) -> Tz {
        name.parse().unwrap()
    }

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    #[test]
    fn twelve_hour_clocks() {
        assert_eq!(clock_time(12, Some(50), None, Some("a")), Some(hm(0, 50)));
        assert_eq!(clock_time(12, None, None, Some("P")), Some(hm(12, 0)));
        assert_eq!(clock_time(8, Some(19), None, Some("p")), Some(hm(20, 19)));
        assert_eq!(clock_time(2, None, None, Some("a")), Some(hm(2, 0)));
        assert_eq!(clock_time(14, Some(0), None, None), Some(hm(14, 0)));
        assert_eq!(clock_time(13, None, None, Some("p")), None);
        assert_eq!(clock_time(0, None, None, Some("a")), None);
        assert_eq!(clock_time(5, None, None, None), None);
        assert_eq!(clock_time(24, Some(0), None, None), None);
    }

    #[test]
    fn month_names_and_abbreviations() {
        assert_eq!(month_number("Jul"), Some(7));
        assert_eq!(month_number("SEPTEMBER"), Some(9));
        assert_eq!(month_number("ju"), None);
        assert_eq!(month_number("Foo"), None);
    }

    #[test]
    fn next_wall_clock_is_today_or_tomorrow() {
        let now = ts("2026-03-01T12:00:00Z");
        assert_eq!(
            next_wall_clock(Tz::UTC, hm(17, 0), now),
            Some(ts("2026-03-01T17:00:00Z"))
        );
        assert_eq!(
            next_wall_clock(Tz::UTC, hm(2, 0), now),
            Some(ts("2026-03-02T02:00:00Z"))
        );
        // Exactly now is not "next": that is tomorrow.
        assert_eq!(
            next_wall_clock(Tz::UTC, hm(12, 0), now),
            Some(ts("2026-03-02T12:00:00Z"))
        );
        // A zone whose local date is already tomorrow (02:00 on Mar 2 there).
        assert_eq!(
            next_wall_clock(tz("Pacific/Kiritimati"), hm(3, 0), now),
            Some(ts("2026-03-01T13:00:00Z"))
        );
    }

    #[test]
    fn a_time_the_clock_skips_is_the_first_instant_after_the_gap() {
        // Los Angeles springs forward on 2026-03-08: 02:00 PST becomes 03:00 PDT.
        let la = tz("America/Los_Angeles");
        let now = ts("2026-03-08T08:00:00Z"); // 00:00 PST
        assert_eq!(
            next_wall_clock(la, hm(2, 30), now),
            Some(ts("2026-03-08T10:00:00Z")) // 03:00 PDT
        );
        let gap = NaiveDate::from_ymd_opt(2026, 3, 8)
            .unwrap()
            .and_time(hm(2, 30));
        assert_eq!(earliest_local(la, gap), Some(ts("2026-03-08T10:00:00Z")));
    }

    #[test]
    fn a_time_the_clock_shows_twice_is_the_first_showing_ahead() {
        // Los Angeles falls back on 2026-11-01: 01:30 happens at 08:30Z and 09:30Z.
        let la = tz("America/Los_Angeles");
        let before = ts("2026-11-01T07:00:00Z");
        assert_eq!(
            next_wall_clock(la, hm(1, 30), before),
            Some(ts("2026-11-01T08:30:00Z"))
        );
        let between = ts("2026-11-01T09:00:00Z");
        assert_eq!(
            next_wall_clock(la, hm(1, 30), between),
            Some(ts("2026-11-01T09:30:00Z"))
        );
        let fold = NaiveDate::from_ymd_opt(2026, 11, 1)
            .unwrap()
            .and_time(hm(1, 30));
        assert_eq!(earliest_local(la, fold), Some(ts("2026-11-01T08:30:00Z")));
    }

    #[test]
    fn across_a_fall_back_day_the_answer_is_capped_at_24_hours() {
        // 02:31 PDT on Oct 31; 02:30 on Nov 1 is PST, 24h59m later.
        let la = tz("America/Los_Angeles");
        let now = ts("2026-10-31T09:31:00Z");
        assert_eq!(
            next_wall_clock(la, hm(2, 30), now),
            Some(now + Duration::hours(24))
        );
    }

    #[test]
    fn a_date_without_a_year_is_the_nearest_one() {
        let now = ts("2026-12-30T12:00:00Z");
        assert_eq!(
            nearest_month_day(Tz::UTC, 1, 2, hm(3, 0), now),
            Some(ts("2027-01-02T03:00:00Z"))
        );
        assert_eq!(
            nearest_month_day(Tz::UTC, 12, 28, hm(3, 0), now),
            Some(ts("2026-12-28T03:00:00Z"))
        );
        assert_eq!(nearest_month_day(Tz::UTC, 2, 30, hm(3, 0), now), None);
    }

    fn any_zone() -> impl Strategy<Value = Tz> {
        (0..chrono_tz::TZ_VARIANTS.len()).prop_map(|i| chrono_tz::TZ_VARIANTS[i])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any wall-clock time in any zone at any moment: strictly ahead and
        /// at most a day away, DST gaps and folds included.
        #[test]
        fn a_time_of_day_is_always_within_the_next_24_hours(
            zone in any_zone(),
            hour in 0u32..24,
            minute in 0u32..60,
            now_secs in 0_i64..4_102_444_800,
        ) {
            let now = DateTime::from_timestamp(now_secs, 0).expect("in range");
            let at = next_wall_clock(zone, hm(hour, minute), now).expect("an answer");
            prop_assert!(at > now, "{at} <= {now}");
            prop_assert!(at <= now + Duration::hours(24), "{at} too far from {now}");
        }
    }
}
