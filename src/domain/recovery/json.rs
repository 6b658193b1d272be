//! Recovery times from a JSON error body or event, read as JSON, never by
//! regex over its text.
//!
//! Forms seen in the wild:
//! - Codex: `{"error":{"type":"usage_limit_reached","resets_at":1775317531,"resets_in_seconds":602705}}`
//! - Claude Code `--output-format stream-json`: `{"type":"rate_limit_event",
//!   "rate_limit_info":{"status":"rejected","resetsAt":1775317531,"rateLimitType":"five_hour"}}`
//!   (only `rejected` means exhausted: `allowed` and `allowed_warning`
//!   events come on every session and their reset is ignored);
//! - OpenAI and Anthropic API errors: `{"error":{"type":"insufficient_quota",
//!   "code":"insufficient_quota","message":"..."}}`.
//!
//! The fields are looked for in `error`, `rate_limit_info`,
//! `error.rate_limit_info` and the top level, in that order; the absolute
//! `resets_at` / `resetsAt` / `reset_at` (epoch seconds or milliseconds, or
//! RFC 3339) before the relative `resets_in_seconds` / `retry_after`. Then
//! the prose of a `message` field is read like any message. A body of
//! several lines, each a JSON object (a stream-json transcript), is read
//! object by object.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{Tz, accept_time, after, billing, epoch_to_time, message, seconds_to_duration};

/// What a JSON body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBody {
    /// The recovery time and a hint naming the field that gave it.
    pub recovery: Option<(DateTime<Utc>, String)>,
    /// A billing stop, recognised from a `code`/`type` or a `message`.
    pub billing: Option<String>,
}

/// Reads `message` as JSON: `None` when it is not a JSON object (or lines of
/// JSON objects), so the caller reads it as prose instead.
pub fn read(message: &str, now: DateTime<Utc>, tz: Tz) -> Option<JsonBody> {
    let objects = objects(message)?;
    let mut body = JsonBody {
        recovery: None,
        billing: None,
    };
    for object in &objects {
        let scopes = scopes(object);
        if body.billing.is_none() {
            body.billing = scopes.iter().find_map(|(_, scope)| billing_of(scope));
        }
        if body.recovery.is_none() {
            body.recovery = recovery_of(&scopes, now, tz);
        }
    }
    Some(body)
}

/// The JSON objects a message holds: one object, or lines of objects (a
/// stream-json transcript); `None` when it is not JSON (read as prose).
pub fn objects(message: &str) -> Option<Vec<Map<String, Value>>> {
    let trimmed = message.trim();
    if !trimmed.starts_with('{') {
        return None;
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(object)) => Some(vec![object]),
        Ok(_) => None,
        Err(_) => trimmed
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(|line| match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(object)) => Some(object),
                _ => None,
            })
            .collect(),
    }
}

/// The objects where the fields may sit, with the path used in hints.
pub fn scopes(top: &Map<String, Value>) -> Vec<(String, &Map<String, Value>)> {
    let mut scopes = Vec::new();
    if let Some(Value::Object(error)) = top.get("error") {
        scopes.push(("error.".to_owned(), error));
        if let Some(Value::Object(info)) = error.get("rate_limit_info") {
            scopes.push(("error.rate_limit_info.".to_owned(), info));
        }
    }
    if let Some(Value::Object(info)) = top.get("rate_limit_info") {
        scopes.push(("rate_limit_info.".to_owned(), info));
    }
    scopes.push((String::new(), top));
    scopes
}

/// `allowed` and `allowed_warning` say this limit is not what stopped the
/// agent: its reset means nothing here.
pub fn not_exhausted(scope: &Map<String, Value>) -> bool {
    matches!(
        scope.get("status").and_then(Value::as_str),
        Some(s) if s.eq_ignore_ascii_case("allowed") || s.eq_ignore_ascii_case("allowed_warning")
    )
}

fn billing_of(scope: &Map<String, Value>) -> Option<String> {
    ["code", "type"]
        .iter()
        .filter_map(|key| scope.get(*key).and_then(Value::as_str))
        .find_map(billing::code)
        .or_else(|| {
            scope
                .get("message")
                .and_then(Value::as_str)
                .and_then(billing::in_text)
        })
}

/// A number, or a string holding one.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|v| v.is_finite()),
        _ => None,
    }
}

fn absolute(value: &Value, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Some(epoch) = number(value) {
        return epoch_to_time(epoch, now);
    }
    let text = value.as_str()?;
    accept_time(
        DateTime::parse_from_rfc3339(text.trim())
            .ok()?
            .with_timezone(&Utc),
        now,
    )
}

fn relative(value: &Value, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    after(now, seconds_to_duration(number(value)?)?)
}

fn recovery_of(
    scopes: &[(String, &Map<String, Value>)],
    now: DateTime<Utc>,
    tz: Tz,
) -> Option<(DateTime<Utc>, String)> {
    const ABSOLUTE: [&str; 3] = ["resets_at", "resetsAt", "reset_at"];
    const RELATIVE: [&str; 3] = ["resets_in_seconds", "retry_after", "retry_after_seconds"];
    let live = || scopes.iter().filter(|(_, scope)| !not_exhausted(scope));
    let field = |keys: &[&str], read: fn(&Value, DateTime<Utc>) -> Option<DateTime<Utc>>| {
        live().find_map(|(path, scope)| {
            keys.iter().find_map(|key| {
                let value = scope.get(*key)?;
                let at = read(value, now)?;
                Some((at, format!("{path}{key}: {value}")))
            })
        })
    };
    field(&ABSOLUTE, absolute)
        .or_else(|| field(&RELATIVE, relative))
        .or_else(|| {
            live().find_map(|(path, scope)| {
                let text = scope.get("message")?.as_str()?;
                let (at, hint) = message::parse_message(text, now, tz)?;
                Some((at, format!("{path}message: {hint}")))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::recovery::test_support::*;
    use chrono::Duration;

    fn body(text: &str) -> JsonBody {
        read(text, now(), Tz::UTC).expect("read as JSON")
    }

    #[test]
    fn codex_usage_limit_body() {
        let at = now() + Duration::days(6);
        let text = format!(
            r#"{{"error":{{"type":"usage_limit_reached","message":"The usage limit has been reached","resets_at":{},"resets_in_seconds":518400}}}}"#,
            at.timestamp()
        );
        let b = body(&text);
        assert_eq!(
            b.recovery,
            Some((at, format!("error.resets_at: {}", at.timestamp())))
        );
        assert_eq!(b.billing, None);
    }

    #[test]
    fn relative_seconds_when_no_absolute_time() {
        let b = body(r#"{"error":{"resets_in_seconds":602705}}"#);
        assert_eq!(b.recovery.unwrap().0, now() + Duration::seconds(602_705));
        let b = body(r#"{"retry_after":"30"}"#);
        assert_eq!(
            b.recovery,
            Some((now() + Duration::seconds(30), "retry_after: \"30\"".into()))
        );
    }

    #[test]
    fn stream_json_rejected_event_and_ignored_allowed_ones() {
        let at = now() + Duration::hours(3);
        let rejected = format!(
            r#"{{"type":"rate_limit_event","rate_limit_info":{{"status":"rejected","resetsAt":{},"rateLimitType":"five_hour"}},"session_id":"s"}}"#,
            at.timestamp()
        );
        assert_eq!(body(&rejected).recovery.unwrap().0, at);
        for status in ["allowed", "allowed_warning"] {
            let allowed = rejected.replace("rejected", status);
            assert_eq!(body(&allowed).recovery, None, "{status}");
        }
        // Top-level fields, as the issue shows them, work too.
        let flat = format!(
            r#"{{"type":"rate_limit_event","status":"rejected","resetsAt":{},"rateLimitType":"five_hour"}}"#,
            at.timestamp()
        );
        assert_eq!(body(&flat).recovery.unwrap().0, at);
    }

    #[test]
    fn lines_of_events_are_read_one_by_one() {
        let at = now() + Duration::hours(2);
        let stream = format!(
            "{}\n{}\n",
            r#"{"type":"rate_limit_event","rate_limit_info":{"status":"allowed_warning","resetsAt":1}}"#,
            format_args!(
                r#"{{"type":"rate_limit_event","rate_limit_info":{{"status":"rejected","resetsAt":{}}}}}"#,
                at.timestamp()
            )
        );
        assert_eq!(body(&stream).recovery.unwrap().0, at);
    }

    #[test]
    fn epoch_milliseconds_and_rfc3339_strings() {
        let at = now() + Duration::minutes(40);
        let ms = format!(r#"{{"resetsAt":{}}}"#, at.timestamp_millis());
        assert_eq!(body(&ms).recovery.unwrap().0, at);
        let iso = r#"{"error":{"resets_at":"2026-03-01T12:40:00Z"}}"#;
        assert_eq!(body(iso).recovery.unwrap().0, at);
    }

    #[test]
    fn billing_codes_and_message_prose() {
        let b = body(
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        );
        assert_eq!(b.billing.as_deref(), Some("insufficient_quota"));
        assert_eq!(b.recovery, None);
        let b = body(
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited, try again in 20 seconds"}}"#,
        );
        assert_eq!(
            b.recovery,
            Some((
                now() + Duration::seconds(20),
                "error.message: again in 20 seconds".into()
            ))
        );
    }

    #[test]
    fn the_text_of_a_json_body_is_never_searched() {
        // A duration sitting in a field that is not read does not count.
        let b = body(r#"{"detail":"try again in 5 minutes","resets_at":"soon"}"#);
        assert_eq!(b.recovery, None);
    }

    #[test]
    fn not_json_objects_are_left_to_the_prose_reader() {
        for text in [
            "",
            "try again in 5 minutes",
            "[1,2]",
            "{not json",
            "{\"a\":1}\nplain",
        ] {
            assert_eq!(read(text, now(), Tz::UTC), None, "{text:?}");
        }
        // Past and far-future epochs: now, and nothing.
        assert_eq!(body(r#"{"resets_at":1}"#).recovery.unwrap().0, now());
        assert_eq!(body(r#"{"resets_at":4102444800}"#).recovery, None);
    }
}
