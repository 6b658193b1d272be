//! Parsing of Claude Code session transcripts (JSON Lines) into token-usage
//! entries and error records.
//!
//! Transcripts live under `<root>/<user>/<session>.jsonl`, one JSON object per
//! line. This module is pure: it takes a file's bytes and returns plain data.
//!
//! # Compatibility with `ccusage`
//!
//! Token accounting mirrors `ccusage` (checked against 18.0.11, whose loader
//! validates each line with a schema, then counts a `(message.id, requestId)`
//! pair once across all files, visiting files in order of their earliest
//! timestamp):
//!
//! * A line counts only if `message.usage.input_tokens` and `output_tokens`
//!   are present, the cache fields are absent or numbers, and the timestamp
//!   has Claude Code's form `YYYY-MM-DDTHH:MM:SS[.mmm]Z`. ccusage silently drops
//!   a line whose usage, timestamp, `message.id`, `message.model`,
//!   `requestId`, `sessionId`, `cwd`, `version`, `costUSD`,
//!   `isApiErrorMessage` or `message.content` has the wrong type (or is an
//!   empty id string); such lines are counted here as `malformed`, never as
//!   usage. A JSON `null` is a wrong type (ccusage's optional fields accept
//!   only an absent key).
//! * Within a file, and globally via [`dedup_across_files`], a
//!   `(message_id, request_id)` pair is counted once; an entry missing either
//!   id is never deduplicated.
//!
//! Known, deliberate differences (none occurs in Claude Code's own output):
//!
//! * ccusage accepts usage on any line type; here only `type == "assistant"`.
//! * ccusage accepts any JSON number (negative, fractional); here token counts
//!   must be non-negative integers that fit in `u64`, else the line is
//!   malformed.
//! * ccusage decodes invalid UTF-8 as U+FFFD and may count the line; here such
//!   a line is malformed.
//! * ccusage reads a last line without a newline; here it is an unfinished
//!   write left for the next run (`unfinished_tail_bytes`).
//! * A line is read in one pass for the fields these rules check (see
//!   `line`): a string in any other field is checked for JSON syntax but not
//!   decoded, so a lone surrogate escape there (`"\ud83d"`, which JavaScript
//!   writes for a cut emoji) does not make the line malformed, as it does not
//!   for ccusage; in a field the rules read it still does.
//! * ccusage orders files by the earliest timestamp of *any* line (and breaks
//!   ties by directory listing order); [`dedup_across_files`] only sees usage
//!   entries, so it orders by the earliest *entry* and breaks ties by label.
//!   The choice only decides which file (session) a duplicate is attributed
//!   to, never per-day or per-model totals.

mod line;

use std::borrow::Cow;
use std::collections::HashSet;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use line::Scalar;

/// Lines longer than this are skipped as malformed (a runaway line must not exhaust memory).
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Error messages are truncated to this many characters.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 4096;

/// One assistant turn's token usage, as recorded on one transcript line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEntry {
    /// 1-based line number in the file.
    pub line_no: u32,
    pub timestamp: DateTime<Utc>,
    /// The line's `sessionId`.
    pub session_id: Option<String>,
    pub message_id: Option<String>,
    pub request_id: Option<String>,
    pub model: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_tokens: u64,
    pub cache_read_tokens: u64,
}

/// An error an agent ran into, as recorded in its transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptError {
    pub line_no: u32,
    pub timestamp: DateTime<Utc>,
    /// Stable key within the file: the line's `uuid` if present, else "line:<n>" (+ ":<k>" for the k-th error of a line).
    ///
    /// The first error of a line gets the bare key; the k-th (k >= 2) gets
    /// `<base>:<k>`.
    pub key: String,
    pub kind: TranscriptErrorKind,
    /// The error text, truncated to 4096 chars (on a char boundary).
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranscriptErrorKind {
    ToolError,
    ApiError,
}

/// How the lines of one file were classified.
///
/// `lines == malformed + without_usage + usage` always holds, and both
/// [`extract_usage`] and [`extract_errors`] report the same counts for the
/// same bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineCounts {
    /// Complete lines seen (excluding a trailing unfinished line and blank lines).
    pub lines: u64,
    /// Not JSON objects, over MAX_LINE_BYTES, invalid UTF-8, or assistant usage with wrong types.
    pub malformed: u64,
    /// Valid JSON lines that carry no usage (including non-assistant lines).
    pub without_usage: u64,
    /// Lines with valid usage. A line repeating an earlier line's
    /// `(message_id, request_id)` counts here too, although its entry is
    /// merged into the first one (so `entries.len() <= usage`).
    pub usage: u64,
    /// Bytes of a trailing line with no final newline: an unfinished write, left for the next run, not an error.
    pub unfinished_tail_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageExtract {
    pub entries: Vec<UsageEntry>,
    pub counts: LineCounts,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorExtract {
    pub errors: Vec<TranscriptError>,
    pub counts: LineCounts,
}

/// Token sums over a set of entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_tokens: u64,
    pub cache_read_tokens: u64,
    /// Number of entries added.
    pub messages: u64,
}

impl UsageTotals {
    /// Input + output + cache creation + cache read tokens (saturating).
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_tokens)
            .saturating_add(self.cache_read_tokens)
    }

    /// Adds one entry (saturating).
    pub fn add(&mut self, e: &UsageEntry) {
        self.input_tokens = self.input_tokens.saturating_add(e.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(e.output_tokens);
        self.cache_creation_tokens = self
            .cache_creation_tokens
            .saturating_add(e.cache_creation_tokens);
        self.cache_read_tokens = self.cache_read_tokens.saturating_add(e.cache_read_tokens);
        self.messages = self.messages.saturating_add(1);
    }
}

/// Parses a whole file's bytes. Only `type == "assistant"` lines with message.usage (input_tokens and output_tokens numbers; cache fields optional, default 0) and a valid timestamp yield entries. Within ONE file, a repeated (message_id, request_id) pair (both present) keeps only its first line (ccusage semantics). Never panics.
pub fn extract_usage(content: &[u8]) -> UsageExtract {
    let mut entries = Vec::new();
    // Ids borrowed from the content: a repeated line allocates nothing.
    let mut seen: HashSet<(Cow<'_, str>, Cow<'_, str>)> = HashSet::new();
    let counts = scan(content, |line_no, text| {
        let (class, entry) = classify(text);
        if let Some(entry) = entry {
            let duplicate = match (&entry.message_id, &entry.request_id) {
                (Some(m), Some(r)) => !seen.insert((m.clone(), r.clone())),
                _ => false,
            };
            if !duplicate {
                entries.push(entry.into_entry(line_no));
            }
        }
        class
    });
    UsageExtract { entries, counts }
}

/// Tool results marked as errors: a line whose message.content is an array containing {"type":"tool_result","is_error":true,"content": <string | array of {"type":"text","text":...}>} -> ToolError with that text.
/// API errors: a line with `"isApiErrorMessage": true` (Claude Code's assistant line for "API Error: 429 ..." / overloaded / usage limit) -> ApiError with the message text (content string or concatenated text blocks); also `type == "system"` lines with `"level": "error"` and a `content` string -> ApiError.
///
/// Text blocks are joined with `"\n"`. A line needs a valid RFC 3339
/// `timestamp` to yield errors. Within a line, tool errors come first (in
/// content order), then the API error. Never panics.
pub fn extract_errors(content: &[u8]) -> ErrorExtract {
    let mut errors = Vec::new();
    let counts = scan(content, |line_no, text| {
        // Classified as `extract_usage` classifies (the same counts); the
        // errors are read from the whole object.
        let (class, _) = classify(text);
        if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) {
            collect_errors(line_no, &obj, &mut errors);
        }
        class
    });
    ErrorExtract { errors, counts }
}

/// files: (file label, entries of that file). Deduplicates (message_id, request_id) globally keeping the occurrence from the file whose earliest entry timestamp is earliest (ties: file label order), then lowest line_no; entries missing an id are always kept.
///
/// The result is in visiting order: files by (earliest entry, label), then
/// entries by line number.
pub fn dedup_across_files<'a>(
    files: &'a [(String, Vec<UsageEntry>)],
) -> Vec<(&'a str, &'a UsageEntry)> {
    // (earliest entry timestamp, label, entries)
    type FileRef<'f> = (Option<DateTime<Utc>>, &'f str, &'f [UsageEntry]);
    let mut order: Vec<FileRef<'a>> = files
        .iter()
        .map(|(label, entries)| {
            let earliest = entries.iter().map(|e| e.timestamp).min();
            (earliest, label.as_str(), entries.as_slice())
        })
        .collect();
    // Files without entries contribute nothing; like ccusage, sort them last.
    order.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.1.cmp(b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(b.1),
    });

    let mut seen: HashSet<(&'a str, &'a str)> = HashSet::new();
    let mut out = Vec::new();
    for (_, label, entries) in order {
        let mut sorted: Vec<&'a UsageEntry> = entries.iter().collect();
        sorted.sort_by_key(|e| e.line_no);
        for e in sorted {
            let keep = match (e.message_id.as_deref(), e.request_id.as_deref()) {
                (Some(m), Some(r)) => seen.insert((m, r)),
                _ => true,
            };
            if keep {
                out.push((label, e));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Line scanning
// ---------------------------------------------------------------------------

/// What one line was classified as.
enum LineClass {
    Malformed,
    WithoutUsage,
    Usage,
}

/// Splits `content` into lines and hands every complete, non-blank line that
/// is UTF-8 text within [`MAX_LINE_BYTES`] to `on_line`, which classifies it
/// (other lines are malformed). Returns the counts.
fn scan<'c>(content: &'c [u8], mut on_line: impl FnMut(u32, &'c str) -> LineClass) -> LineCounts {
    let mut counts = LineCounts::default();
    let mut line_no: u32 = 0;
    let mut rest = content;
    while !rest.is_empty() {
        line_no = line_no.saturating_add(1);
        let Some(nl) = memchr::memchr(b'\n', rest) else {
            // No final newline: an unfinished write, left for the next run.
            counts.unfinished_tail_bytes = rest.len() as u64;
            break;
        };
        let raw = &rest[..nl];
        rest = &rest[nl + 1..];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        counts.lines += 1;
        let class = match std::str::from_utf8(raw) {
            Ok(text) if raw.len() <= MAX_LINE_BYTES => on_line(line_no, text),
            _ => LineClass::Malformed,
        };
        match class {
            LineClass::Malformed => counts.malformed += 1,
            LineClass::WithoutUsage => counts.without_usage += 1,
            LineClass::Usage => counts.usage += 1,
        }
    }
    counts
}

// ---------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------

/// The line carries usage but fails ccusage's schema.
struct Malformed;

/// A line's entry, its strings still borrowed from the line (owned only
/// where the JSON escaped them).
struct LineEntry<'a> {
    timestamp: DateTime<Utc>,
    session_id: Option<Cow<'a, str>>,
    message_id: Option<Cow<'a, str>>,
    request_id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    input_tokens: u64,
    output_tokens: u64,
    cache_creation_tokens: u64,
    cache_read_tokens: u64,
}

impl LineEntry<'_> {
    fn into_entry(self, line_no: u32) -> UsageEntry {
        UsageEntry {
            line_no,
            timestamp: self.timestamp,
            session_id: self.session_id.map(Cow::into_owned),
            message_id: self.message_id.map(Cow::into_owned),
            request_id: self.request_id.map(Cow::into_owned),
            model: self.model.map(Cow::into_owned),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_creation_tokens: self.cache_creation_tokens,
            cache_read_tokens: self.cache_read_tokens,
        }
    }
}

/// `Ok(None)`: no usage on this line. `Err`: usage present but invalid.
fn parse_usage(line: line::Line<'_>) -> Result<Option<LineEntry<'_>>, Malformed> {
    if line.r#type.as_ref().and_then(Scalar::as_str) != Some("assistant") {
        return Ok(None);
    }
    let Some(line::Message::Object(message)) = line.message else {
        return Ok(None);
    };
    let Some(usage) = message.usage else {
        return Ok(None);
    };
    let line::Usage::Object(usage) = usage else {
        return Err(Malformed);
    };

    let input_tokens = required_count(usage.input_tokens)?;
    let output_tokens = required_count(usage.output_tokens)?;
    let cache_creation_tokens = optional_count(usage.cache_creation_input_tokens)?;
    let cache_read_tokens = optional_count(usage.cache_read_input_tokens)?;
    if let Some(speed) = &usage.speed
        && !matches!(speed.as_str(), Some("standard" | "fast"))
    {
        return Err(Malformed);
    }

    let timestamp = line
        .timestamp
        .as_ref()
        .and_then(Scalar::as_str)
        .and_then(parse_claude_timestamp)
        .ok_or(Malformed)?;

    let message_id = optional_nonempty_str(message.id)?;
    let model = optional_nonempty_str(message.model)?;
    let request_id = optional_nonempty_str(line.request_id)?;
    let session_id = optional_nonempty_str(line.session_id)?;

    // The rest of ccusage's schema: fields it does not use for tokens but
    // whose wrong type makes it drop the line.
    if line.cwd.as_ref().is_some_and(|v| v.as_str().is_none()) {
        return Err(Malformed);
    }
    if let Some(v) = &line.version
        && !v.as_str().is_some_and(is_version)
    {
        return Err(Malformed);
    }
    if line.cost_usd.as_ref().is_some_and(|v| !v.is_number()) {
        return Err(Malformed);
    }
    if line
        .is_api_error_message
        .as_ref()
        .is_some_and(|v| !v.is_boolean())
    {
        return Err(Malformed);
    }
    if message.content.is_some_and(|ok| !ok.0) {
        return Err(Malformed);
    }

    Ok(Some(LineEntry {
        timestamp,
        session_id,
        message_id,
        request_id,
        model,
        input_tokens,
        output_tokens,
        cache_creation_tokens,
        cache_read_tokens,
    }))
}

/// How a line's text classifies for usage (the entry, when it has one).
fn classify(text: &str) -> (LineClass, Option<LineEntry<'_>>) {
    match line::parse(text).map(parse_usage) {
        None | Some(Err(Malformed)) => (LineClass::Malformed, None),
        Some(Ok(None)) => (LineClass::WithoutUsage, None),
        Some(Ok(Some(entry))) => (LineClass::Usage, Some(entry)),
    }
}

fn required_count(v: Option<Scalar<'_>>) -> Result<u64, Malformed> {
    v.as_ref().and_then(Scalar::as_u64).ok_or(Malformed)
}

fn optional_count(v: Option<Scalar<'_>>) -> Result<u64, Malformed> {
    match v {
        None => Ok(0),
        Some(v) => v.as_u64().ok_or(Malformed),
    }
}

fn optional_nonempty_str(v: Option<Scalar<'_>>) -> Result<Option<Cow<'_, str>>, Malformed> {
    match v {
        None => Ok(None),
        Some(Scalar::Str(s)) if s.is_empty() => Err(Malformed),
        Some(Scalar::Str(s)) => Ok(Some(s)),
        Some(_) => Err(Malformed),
    }
}

/// ccusage's version check: starts with `\d+\.\d+\.\d+`.
fn is_version(s: &str) -> bool {
    let mut parts = s.splitn(3, '.');
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let (Some(major), Some(minor), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    digits(major) && digits(minor) && rest.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// The timestamp form ccusage accepts for usage (what JavaScript's
/// `toISOString()` writes): `YYYY-MM-DDTHH:MM:SS` with optional `.mmm`, then `Z`.
fn parse_claude_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    let shape_ok = match b.len() {
        20 => b[19] == b'Z',
        24 => b[19] == b'.' && b[20..23].iter().all(u8::is_ascii_digit) && b[23] == b'Z',
        _ => false,
    };
    if !shape_ok {
        return None;
    }
    let digits_at = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    let seps_ok = b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':';
    if !seps_ok
        || !digits_at(0..4)
        || !digits_at(5..7)
        || !digits_at(8..10)
        || !digits_at(11..13)
        || !digits_at(14..16)
        || !digits_at(17..19)
    {
        return None;
    }
    let naive = NaiveDateTime::parse_from_str(&s[..s.len() - 1], "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    Some(naive.and_utc())
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

fn collect_errors(line_no: u32, obj: &Map<String, Value>, out: &mut Vec<TranscriptError>) {
    let Some(timestamp) = obj
        .get("timestamp")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
    else {
        return;
    };
    let message = obj.get("message").and_then(Value::as_object);

    let mut found: Vec<(TranscriptErrorKind, String)> = Vec::new();
    if let Some(Value::Array(blocks)) = message.and_then(|m| m.get("content")) {
        for block in blocks {
            let Value::Object(block) = block else {
                continue;
            };
            let is_tool_error = block.get("type").and_then(Value::as_str) == Some("tool_result")
                && block.get("is_error").and_then(Value::as_bool) == Some(true);
            if is_tool_error {
                let text = block.get("content").map(content_text).unwrap_or_default();
                found.push((TranscriptErrorKind::ToolError, text));
            }
        }
    }
    if obj.get("isApiErrorMessage").and_then(Value::as_bool) == Some(true) {
        let text = message
            .and_then(|m| m.get("content"))
            .map(content_text)
            .unwrap_or_default();
        found.push((TranscriptErrorKind::ApiError, text));
    } else if obj.get("type").and_then(Value::as_str) == Some("system")
        && obj.get("level").and_then(Value::as_str) == Some("error")
        && let Some(text) = obj.get("content").and_then(Value::as_str)
    {
        found.push((TranscriptErrorKind::ApiError, text.to_owned()));
    }

    let base = match obj.get("uuid").and_then(Value::as_str) {
        Some(uuid) if !uuid.is_empty() => uuid.to_owned(),
        _ => format!("line:{line_no}"),
    };
    for (i, (kind, text)) in found.into_iter().enumerate() {
        let key = if i == 0 {
            base.clone()
        } else {
            format!("{base}:{}", i + 1)
        };
        out.push(TranscriptError {
            line_no,
            timestamp,
            key,
            kind,
            message: truncate_chars(text, MAX_ERROR_MESSAGE_CHARS),
        });
    }
}

/// A content value's text: a string as is, or the `text` of an array's
/// `{"type":"text"}` blocks joined with newlines.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter_map(Value::as_object)
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect();
            texts.join("\n")
        }
        _ => String::new(),
    }
}

fn truncate_chars(mut s: String, max_chars: usize) -> String {
    if let Some((idx, _)) = s.char_indices().nth(max_chars) {
        s.truncate(idx);
    }
    s
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn assistant(mid: Option<&str>, rid: Option<&str>, t: &str, usage: Value) -> Value {
        let mut message = json!({
            "role": "assistant",
            "type": "message",
            "model": "claude-sonnet-4-20250514",
            "content": [{"type": "text", "text": "ok"}],
            "usage": usage,
        });
        if let Some(mid) = mid {
            message["id"] = json!(mid);
        }
        let mut line = json!({
            "type": "assistant",
            "sessionId": "s1",
            "uuid": format!("u-{t}"),
            "timestamp": t,
            "version": "2.1.3",
            "cwd": "/tmp",
            "message": message,
        });
        if let Some(rid) = rid {
            line["requestId"] = json!(rid);
        }
        line
    }

    fn usage(i: u64, o: u64, cc: u64, cr: u64) -> Value {
        json!({
            "input_tokens": i,
            "output_tokens": o,
            "cache_creation_input_tokens": cc,
            "cache_read_input_tokens": cr,
        })
    }

    fn jsonl(lines: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l.to_string().as_bytes());
            out.push(b'\n');
        }
        out
    }

    fn counts(lines: u64, malformed: u64, without_usage: u64, usage: u64) -> LineCounts {
        LineCounts {
            lines,
            malformed,
            without_usage,
            usage,
            unfinished_tail_bytes: 0,
        }
    }

    const T1: &str = "2026-03-14T23:50:05.000Z";
    const T2: &str = "2026-03-14T23:50:06.000Z";
    const T3: &str = "2026-03-14T23:50:07.000Z";

    #[test]
    fn basic_entry_fields() {
        let bytes = jsonl(&[assistant(
            Some("msg_1"),
            Some("req_1"),
            T1,
            usage(1, 2, 3, 4),
        )]);
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(1, 0, 0, 1));
        assert_eq!(
            x.entries,
            vec![UsageEntry {
                line_no: 1,
                timestamp: ts(T1),
                session_id: Some("s1".into()),
                message_id: Some("msg_1".into()),
                request_id: Some("req_1".into()),
                model: Some("claude-sonnet-4-20250514".into()),
                input_tokens: 1,
                output_tokens: 2,
                cache_creation_tokens: 3,
                cache_read_tokens: 4,
            }]
        );
    }

    #[test]
    fn dedup_within_file_keeps_first_line() {
        let bytes = jsonl(&[
            assistant(Some("msg_1"), Some("req_1"), T1, usage(1, 2, 3, 4)),
            assistant(Some("msg_1"), Some("req_1"), T2, usage(1, 2, 3, 4)),
            assistant(Some("msg_2"), Some("req_2"), T3, usage(5, 6, 0, 0)),
            // Same message id, other request: a different pair.
            assistant(Some("msg_1"), Some("req_9"), T3, usage(7, 8, 0, 0)),
        ]);
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(4, 0, 0, 4));
        let lines: Vec<u32> = x.entries.iter().map(|e| e.line_no).collect();
        assert_eq!(lines, vec![1, 3, 4]);
        assert_eq!(x.entries[0].timestamp, ts(T1));
    }

    #[test]
    fn missing_ids_never_deduped() {
        let bytes = jsonl(&[
            assistant(Some("msg_1"), None, T1, usage(1, 1, 0, 0)),
            assistant(Some("msg_1"), None, T2, usage(1, 1, 0, 0)),
            assistant(None, Some("req_1"), T1, usage(2, 2, 0, 0)),
            assistant(None, Some("req_1"), T2, usage(2, 2, 0, 0)),
            assistant(None, None, T3, usage(3, 3, 0, 0)),
            assistant(None, None, T3, usage(3, 3, 0, 0)),
        ]);
        let x = extract_usage(&bytes);
        assert_eq!(x.entries.len(), 6);
        assert_eq!(x.counts, counts(6, 0, 0, 6));
    }

    #[test]
    fn malformed_lines_counted() {
        let mut bytes = b"this is plain text\n".to_vec();
        bytes.extend_from_slice(
            b"{\"type\":\"assistant\",\"message\":{\"usage\":{\"input_tokens\":\n",
        );
        bytes.extend_from_slice(b"[1,2,3]\n");
        bytes.extend_from_slice(b"\"a string\"\n");
        bytes.extend_from_slice(b"null\n");
        bytes.extend_from_slice(&jsonl(&[assistant(
            Some("m"),
            Some("r"),
            T1,
            usage(1, 1, 1, 1),
        )]));
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(6, 5, 0, 1));
        assert_eq!(x.entries[0].line_no, 6);
    }

    #[test]
    fn non_assistant_lines_skipped() {
        let mut user = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        user["type"] = json!("user");
        let bytes = jsonl(&[
            user,
            json!({"type": "summary", "summary": "s", "leafUuid": "x"}),
            json!({"type": "system", "content": "hi", "level": "info", "timestamp": T1}),
            // assistant without usage, and assistant with a non-object message
            json!({"type": "assistant", "timestamp": T1, "message": {"content": []}}),
            json!({"type": "assistant", "timestamp": T1, "message": "text"}),
        ]);
        let x = extract_usage(&bytes);
        assert!(x.entries.is_empty());
        assert_eq!(x.counts, counts(5, 0, 5, 0));
    }

    #[test]
    fn unfinished_last_line_is_not_malformed() {
        let mut bytes = jsonl(&[assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1))]);
        let tail = b"{\"type\":\"assistant\",\"mess";
        bytes.extend_from_slice(tail);
        let x = extract_usage(&bytes);
        assert_eq!(
            x.counts,
            LineCounts {
                unfinished_tail_bytes: tail.len() as u64,
                ..counts(1, 0, 0, 1)
            }
        );
        // Even a complete object without its newline waits for the next run.
        let mut bytes = jsonl(&[]);
        bytes.extend_from_slice(
            assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1))
                .to_string()
                .as_bytes(),
        );
        let x = extract_usage(&bytes);
        assert!(x.entries.is_empty());
        assert_eq!(x.counts.lines, 0);
        assert_eq!(x.counts.unfinished_tail_bytes, bytes.len() as u64);
    }

    #[test]
    fn blank_lines_and_crlf() {
        let line = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1)).to_string();
        let bytes = format!("\n   \n{line}\r\n\r\n").into_bytes();
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(1, 0, 0, 1));
        assert_eq!(x.entries[0].line_no, 3);
    }

    #[test]
    fn over_long_line_is_malformed() {
        let mut big = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        big["padding"] = json!("x".repeat(MAX_LINE_BYTES));
        let bytes = jsonl(&[
            big,
            assistant(Some("m2"), Some("r2"), T2, usage(2, 2, 2, 2)),
        ]);
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(2, 1, 0, 1));
        assert_eq!(x.entries.len(), 1);
        assert_eq!(x.entries[0].line_no, 2);
    }

    #[test]
    fn line_of_exactly_max_bytes_is_accepted() {
        let mut line = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        line["padding"] = json!("");
        let len = line.to_string().len();
        line["padding"] = json!("x".repeat(MAX_LINE_BYTES - len));
        assert_eq!(line.to_string().len(), MAX_LINE_BYTES);
        let x = extract_usage(&jsonl(&[line]));
        assert_eq!(x.counts, counts(1, 0, 0, 1));
    }

    #[test]
    fn invalid_utf8_line_is_malformed() {
        let good = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1)).to_string();
        let bad = good.replace("ok", "o\u{1}k");
        let mut bytes = bad.into_bytes();
        let pos = bytes.iter().position(|&b| b == 1).unwrap();
        bytes[pos] = 0xFF;
        bytes.push(b'\n');
        bytes.extend_from_slice(good.as_bytes());
        bytes.push(b'\n');
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(2, 1, 0, 1));
        assert_eq!(x.entries[0].line_no, 2);
    }

    #[test]
    fn cache_fields_default_to_zero() {
        let bytes = jsonl(&[assistant(
            Some("m"),
            Some("r"),
            T1,
            json!({"input_tokens": 5, "output_tokens": 8, "service_tier": "standard"}),
        )]);
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(1, 0, 0, 1));
        let e = &x.entries[0];
        assert_eq!((e.input_tokens, e.output_tokens), (5, 8));
        assert_eq!((e.cache_creation_tokens, e.cache_read_tokens), (0, 0));
    }

    #[test]
    fn wrong_typed_usage_is_malformed() {
        let bad_usages = [
            json!({"input_tokens": "5", "output_tokens": 8}),
            json!({"input_tokens": 5}),
            json!({"output_tokens": 5}),
            json!({"input_tokens": 5, "output_tokens": null}),
            json!({"input_tokens": 5, "output_tokens": 8, "cache_read_input_tokens": null}),
            json!({"input_tokens": 5, "output_tokens": 8, "cache_creation_input_tokens": "1"}),
            json!({"input_tokens": -5, "output_tokens": 8}),
            json!({"input_tokens": 5.5, "output_tokens": 8}),
            json!({"input_tokens": 5, "output_tokens": 8, "speed": "warp"}),
            json!(null),
            json!([1, 2]),
        ];
        for u in bad_usages {
            let x = extract_usage(&jsonl(&[assistant(Some("m"), Some("r"), T1, u.clone())]));
            assert_eq!(x.counts, counts(1, 1, 0, 0), "usage {u}");
            assert!(x.entries.is_empty());
        }
    }

    #[test]
    fn ccusage_schema_violations_are_malformed() {
        let base = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        let edits: Vec<(&str, Value)> = vec![
            ("/timestamp", json!("2026-03-14T23:50:05+00:00")),
            ("/timestamp", json!("2026-03-14T23:50:05.000000Z")),
            ("/timestamp", json!("2026-13-14T23:50:05.000Z")),
            ("/timestamp", json!(12)),
            ("/requestId", json!("")),
            ("/requestId", json!(7)),
            ("/sessionId", json!(null)),
            ("/message/id", json!("")),
            ("/message/model", json!(4)),
            ("/version", json!("v2")),
            ("/cwd", json!(1)),
            ("/message/content", json!("plain")),
            ("/message/content", json!([{"type": "text", "text": 3}])),
        ];
        for (ptr, value) in edits {
            let mut line = base.clone();
            *line.pointer_mut(ptr).unwrap_or_else(|| panic!("{ptr}")) = value.clone();
            let x = extract_usage(&jsonl(&[line]));
            assert_eq!(x.counts, counts(1, 1, 0, 0), "{ptr} = {value}");
        }
        let mut no_ts = base.clone();
        no_ts.as_object_mut().unwrap().remove("timestamp");
        let mut extra = base.clone();
        extra["costUSD"] = json!("1");
        let mut api = base.clone();
        api["isApiErrorMessage"] = json!("yes");
        for line in [no_ts, extra, api] {
            assert_eq!(extract_usage(&jsonl(&[line])).counts, counts(1, 1, 0, 0));
        }
        // Accepted variants: no milliseconds, version with suffix, no model.
        let mut ok = base.clone();
        ok["timestamp"] = json!("2026-03-14T23:50:05Z");
        ok["version"] = json!("2.1.3-beta");
        ok["message"].as_object_mut().unwrap().remove("model");
        let x = extract_usage(&jsonl(&[ok]));
        assert_eq!(x.counts, counts(1, 0, 0, 1));
        assert_eq!(x.entries[0].model, None);
        assert_eq!(x.entries[0].timestamp, ts("2026-03-14T23:50:05Z"));
    }

    fn tool_result_line(uuid: Option<&str>, results: Value) -> Value {
        let mut line = json!({
            "type": "user",
            "timestamp": T1,
            "sessionId": "s1",
            "message": {"role": "user", "content": results},
        });
        if let Some(uuid) = uuid {
            line["uuid"] = json!(uuid);
        }
        line
    }

    #[test]
    fn tool_result_error_forms() {
        let bytes = jsonl(&[
            tool_result_line(
                Some("u-1"),
                json!([{"type": "tool_result", "tool_use_id": "t1", "is_error": true,
                        "content": "Exit code 1\nboom"}]),
            ),
            tool_result_line(
                Some("u-2"),
                json!([{"type": "tool_result", "tool_use_id": "t2", "is_error": true,
                        "content": [{"type": "text", "text": "first"},
                                    {"type": "image", "source": {}},
                                    {"type": "text", "text": "second"}]}]),
            ),
            // Not errors: is_error false / missing / a string, and a plain text block.
            tool_result_line(
                Some("u-3"),
                json!([{"type": "tool_result", "tool_use_id": "t3", "is_error": false, "content": "fine"},
                       {"type": "tool_result", "tool_use_id": "t4", "content": "fine"},
                       {"type": "tool_result", "tool_use_id": "t5", "is_error": "true", "content": "x"},
                       {"type": "text", "text": "is_error"}]),
            ),
            // Content is a plain string: no tool results.
            tool_result_line(Some("u-4"), json!("is_error: true")),
            // Missing content: empty message.
            tool_result_line(
                Some("u-5"),
                json!([{"type": "tool_result", "tool_use_id": "t6", "is_error": true}]),
            ),
        ]);
        let x = extract_errors(&bytes);
        assert_eq!(x.counts, counts(5, 0, 5, 0));
        let got: Vec<(u32, &str, TranscriptErrorKind, &str)> = x
            .errors
            .iter()
            .map(|e| (e.line_no, e.key.as_str(), e.kind, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    1,
                    "u-1",
                    TranscriptErrorKind::ToolError,
                    "Exit code 1\nboom"
                ),
                (2, "u-2", TranscriptErrorKind::ToolError, "first\nsecond"),
                (5, "u-5", TranscriptErrorKind::ToolError, ""),
            ]
        );
        assert!(x.errors.iter().all(|e| e.timestamp == ts(T1)));
    }

    #[test]
    fn api_error_forms() {
        let bytes = jsonl(&[
            json!({"type": "assistant", "uuid": "a-1", "timestamp": T1, "isApiErrorMessage": true,
                   "message": {"role": "assistant", "content": [
                       {"type": "text", "text": "API Error: 429 rate_limit_error"}]}}),
            json!({"type": "assistant", "uuid": "a-2", "timestamp": T2, "isApiErrorMessage": true,
                   "message": {"role": "assistant", "content": "API Error: 529 Overloaded"}}),
            json!({"type": "system", "uuid": "a-3", "timestamp": T3, "level": "error",
                   "content": "API Error: Request timed out. Retrying in 1 seconds"}),
            // Not errors.
            json!({"type": "system", "uuid": "a-4", "timestamp": T3, "level": "info", "content": "x"}),
            json!({"type": "system", "uuid": "a-5", "timestamp": T3, "level": "error"}),
            json!({"type": "assistant", "uuid": "a-6", "timestamp": T3, "isApiErrorMessage": false,
                   "message": {"content": "API Error"}}),
            json!({"type": "user", "uuid": "a-7", "timestamp": T3, "level": "error", "content": "x"}),
            // No valid timestamp: cannot be placed in time, skipped.
            json!({"type": "system", "uuid": "a-8", "level": "error", "content": "x"}),
        ]);
        let x = extract_errors(&bytes);
        let got: Vec<(&str, TranscriptErrorKind, &str)> = x
            .errors
            .iter()
            .map(|e| (e.key.as_str(), e.kind, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "a-1",
                    TranscriptErrorKind::ApiError,
                    "API Error: 429 rate_limit_error"
                ),
                (
                    "a-2",
                    TranscriptErrorKind::ApiError,
                    "API Error: 529 Overloaded"
                ),
                (
                    "a-3",
                    TranscriptErrorKind::ApiError,
                    "API Error: Request timed out. Retrying in 1 seconds"
                ),
            ]
        );
        assert_eq!(x.errors[1].timestamp, ts(T2));
        // Error timestamps accept any RFC 3339 form.
        let line = json!({"type": "system", "timestamp": "2026-03-15T01:00:00+01:00",
                          "level": "error", "content": "boom"});
        let x = extract_errors(&jsonl(&[line]));
        assert_eq!(x.errors[0].timestamp, ts("2026-03-15T00:00:00Z"));
    }

    #[test]
    fn error_keys_stable() {
        let two_errors = json!([
            {"type": "tool_result", "tool_use_id": "t1", "is_error": true, "content": "one"},
            {"type": "tool_result", "tool_use_id": "t2", "is_error": false, "content": "ok"},
            {"type": "tool_result", "tool_use_id": "t3", "is_error": true, "content": "two"},
        ]);
        let bytes = jsonl(&[
            json!({"type": "summary", "summary": "s"}),
            tool_result_line(Some("u-9"), two_errors.clone()),
            tool_result_line(None, two_errors.clone()),
            tool_result_line(Some(""), json!([two_errors[0].clone()])),
        ]);
        let x = extract_errors(&bytes);
        let keys: Vec<&str> = x.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["u-9", "u-9:2", "line:3", "line:3:2", "line:4"]);
        // Same bytes, same keys; appending lines does not change earlier keys.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&jsonl(&[tool_result_line(None, two_errors)]));
        let y = extract_errors(&longer);
        assert_eq!(&y.errors[..5], &x.errors[..]);
        assert_eq!(y.errors[5].key, "line:5");
        // Same counts as extract_usage.
        assert_eq!(extract_usage(&longer).counts, y.counts);
    }

    #[test]
    fn error_message_truncated_on_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE_CHARS + 10);
        let bytes = jsonl(
            &[json!({"type": "system", "timestamp": T1, "level": "error",
                                   "content": long})],
        );
        let x = extract_errors(&bytes);
        assert_eq!(x.errors[0].message.chars().count(), MAX_ERROR_MESSAGE_CHARS);
        assert_eq!(x.errors[0].message, "é".repeat(MAX_ERROR_MESSAGE_CHARS));
        let short = "ok".to_string();
        assert_eq!(truncate_chars(short.clone(), 4096), short);
    }

    #[test]
    fn totals() {
        let bytes = jsonl(&[
            assistant(Some("m1"), Some("r1"), T1, usage(1, 2, 3, 4)),
            assistant(Some("m2"), Some("r2"), T2, usage(10, 20, 30, 40)),
        ]);
        let mut t = UsageTotals::default();
        for e in &extract_usage(&bytes).entries {
            t.add(e);
        }
        assert_eq!(
            t,
            UsageTotals {
                input_tokens: 11,
                output_tokens: 22,
                cache_creation_tokens: 33,
                cache_read_tokens: 44,
                messages: 2
            }
        );
        assert_eq!(t.total_tokens(), 110);
        let max = UsageTotals {
            input_tokens: u64::MAX,
            output_tokens: 1,
            ..Default::default()
        };
        assert_eq!(max.total_tokens(), u64::MAX);
    }

    fn entry(line_no: u32, t: &str, mid: Option<&str>, rid: Option<&str>) -> UsageEntry {
        UsageEntry {
            line_no,
            timestamp: ts(t),
            session_id: None,
            message_id: mid.map(str::to_owned),
            request_id: rid.map(str::to_owned),
            model: None,
            input_tokens: u64::from(line_no),
            output_tokens: 0,
            cache_creation_tokens: 0,
            cache_read_tokens: 0,
        }
    }

    #[test]
    fn dedup_across_files_prefers_earliest_file() {
        let files = vec![
            // Resumed session: listed first, but starts later.
            (
                "alice/b.jsonl".to_string(),
                vec![
                    entry(2, "2026-03-14T23:55:04.000Z", Some("m3"), Some("r3")),
                    entry(3, "2026-03-15T00:05:00.000Z", Some("m5"), Some("r5")),
                    entry(4, "2026-03-14T23:50:05.000Z", Some("m0"), None),
                ],
            ),
            (
                "alice/a.jsonl".to_string(),
                vec![
                    entry(9, "2026-03-14T23:55:04.000Z", Some("m3"), Some("r3")),
                    entry(2, "2026-03-14T23:50:05.000Z", Some("m1"), Some("r1")),
                    entry(5, "2026-03-14T23:50:05.000Z", Some("m0"), None),
                ],
            ),
            ("alice/empty.jsonl".to_string(), vec![]),
        ];
        let got: Vec<(&str, u32)> = dedup_across_files(&files)
            .into_iter()
            .map(|(f, e)| (f, e.line_no))
            .collect();
        // b's earliest entry (line 4, 23:50:05) ties a's: label order decides.
        assert_eq!(
            got,
            vec![
                ("alice/a.jsonl", 2),
                ("alice/a.jsonl", 5),
                ("alice/a.jsonl", 9),
                ("alice/b.jsonl", 3),
                ("alice/b.jsonl", 4),
            ]
        );

        // Without the tie, the earlier file wins whatever its label.
        let mut files = files;
        files[0].1.pop();
        files[0]
            .1
            .push(entry(1, "2026-03-14T23:40:00.000Z", None, None));
        let got: Vec<(&str, u32)> = dedup_across_files(&files)
            .into_iter()
            .map(|(f, e)| (f, e.line_no))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alice/b.jsonl", 1),
                ("alice/b.jsonl", 2),
                ("alice/b.jsonl", 3),
                ("alice/a.jsonl", 2),
                ("alice/a.jsonl", 5),
            ]
        );
    }

    #[test]
    fn dedup_across_files_within_file_lowest_line() {
        // Entries not deduplicated by extract_usage (e.g. concatenated
        // batches) still keep the lowest line number.
        let files = vec![(
            "f".to_string(),
            vec![
                entry(7, T2, Some("m"), Some("r")),
                entry(3, T1, Some("m"), Some("r")),
            ],
        )];
        let got = dedup_across_files(&files);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.line_no, 3);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let u = extract_usage(&bytes);
            let e = extract_errors(&bytes);
            proptest::prop_assert_eq!(&u.counts, &e.counts);
            let c = &u.counts;
            proptest::prop_assert_eq!(c.lines, c.malformed + c.without_usage + c.usage);
        }

        #[test]
        fn json_ish_lines_never_panic(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(r#"{"type":"assistant","timestamp":"2026-03-14T23:50:05.000Z","requestId":"r","message":{"id":"m","usage":{"input_tokens":1,"output_tokens":2}}}"#.to_string()),
                    proptest::strategy::Just(r#"{"type":"user","uuid":"u","timestamp":"2026-03-14T23:50:05.000Z","message":{"content":[{"type":"tool_result","is_error":true,"content":[{"type":"text","text":"x"}]}]}}"#.to_string()),
                    proptest::strategy::Just(r#"{"type":"system","level":"error","timestamp":"2026-03-14T23:50:05Z","content":"x"}"#.to_string()),
                    "[ -~]{0,80}",
                ],
                0..20,
            ),
            tail in "[ -~]{0,20}",
        ) {
            let mut bytes = lines.join("\n").into_bytes();
            bytes.push(b'\n');
            bytes.extend_from_slice(tail.as_bytes());
            let u = extract_usage(&bytes);
            let e = extract_errors(&bytes);
            proptest::prop_assert_eq!(&u.counts, &e.counts);
            proptest::prop_assert_eq!(u.counts.unfinished_tail_bytes, tail.len() as u64);
            let files = vec![("a".to_string(), u.entries.clone()), ("b".to_string(), u.entries.clone())];
            let kept = dedup_across_files(&files);
            proptest::prop_assert!(kept.len() <= u.entries.len() * 2);
        }
    }

    /// The parser as it was, on a `serde_json::Value` per line: what the
    /// one-pass parser must agree with (it reads fewer strings, see `line`).
    mod reference {
        use super::super::{
            LineClass, LineCounts, MAX_LINE_BYTES, UsageEntry, is_version, parse_claude_timestamp,
        };
        use serde_json::{Map, Value};

        pub fn classify(line_no: u32, raw: &[u8]) -> (LineClass, Option<UsageEntry>) {
            let obj = match std::str::from_utf8(raw)
                .ok()
                .filter(|_| raw.len() <= MAX_LINE_BYTES)
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
            {
                Some(Value::Object(obj)) => obj,
                _ => return (LineClass::Malformed, None),
            };
            match parse_usage(line_no, &obj) {
                Ok(Some(e)) => (LineClass::Usage, Some(e)),
                Ok(None) => (LineClass::WithoutUsage, None),
                Err(()) => (LineClass::Malformed, None),
            }
        }

        /// Counts and entries (before the within-file de-duplication).
        pub fn extract(content: &[u8]) -> (LineCounts, Vec<UsageEntry>) {
            let mut counts = LineCounts::default();
            let mut entries = Vec::new();
            for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                if raw.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                counts.lines += 1;
                match classify(i as u32 + 1, raw) {
                    (LineClass::Malformed, _) => counts.malformed += 1,
                    (LineClass::WithoutUsage, _) => counts.without_usage += 1,
                    (LineClass::Usage, e) => {
                        counts.usage += 1;
                        entries.extend(e);
                    }
                }
            }
            (counts, entries)
        }

        fn parse_usage(line_no: u32, obj: &Map<String, Value>) -> Result<Option<UsageEntry>, ()> {
            if obj.get("type").and_then(Value::as_str) != Some("assistant") {
                return Ok(None);
            }
            let Some(Value::Object(message)) = obj.get("message") else {
                return Ok(None);
            };
            let Some(usage) = message.get("usage") else {
                return Ok(None);
            };
            let Value::Object(usage) = usage else {
                return Err(());
            };
            let input_tokens = required_count(usage, "input_tokens")?;
            let output_tokens = required_count(usage, "output_tokens")?;
            let cache_creation_tokens = optional_count(usage, "cache_creation_input_tokens")?;
            let cache_read_tokens = optional_count(usage, "cache_read_input_tokens")?;
            if let Some(speed) = usage.get("speed")
                && !matches!(speed.as_str(), Some("standard" | "fast"))
            {
                return Err(());
            }
            let timestamp = obj
                .get("timestamp")
                .and_then(Value::as_str)
                .and_then(parse_claude_timestamp)
                .ok_or(())?;
            let message_id = optional_nonempty_str(message, "id")?;
            let model = optional_nonempty_str(message, "model")?;
            let request_id = optional_nonempty_str(obj, "requestId")?;
            let session_id = optional_nonempty_str(obj, "sessionId")?;
            optional_str(obj, "cwd")?;
            if let Some(v) = obj.get("version")
                && !v.as_str().is_some_and(is_version)
            {
                return Err(());
            }
            if obj.get("costUSD").is_some_and(|v| !v.is_number()) {
                return Err(());
            }
            if obj
                .get("isApiErrorMessage")
                .is_some_and(|v| !v.is_boolean())
            {
                return Err(());
            }
            if let Some(content) = message.get("content") {
                let Value::Array(blocks) = content else {
                    return Err(());
                };
                for block in blocks {
                    let Value::Object(block) = block else {
                        return Err(());
                    };
                    optional_str(block, "text")?;
                }
            }
            Ok(Some(UsageEntry {
                line_no,
                timestamp,
                session_id,
                message_id,
                request_id,
                model,
                input_tokens,
                output_tokens,
                cache_creation_tokens,
                cache_read_tokens,
            }))
        }

        fn required_count(map: &Map<String, Value>, key: &str) -> Result<u64, ()> {
            map.get(key).and_then(Value::as_u64).ok_or(())
        }

        fn optional_count(map: &Map<String, Value>, key: &str) -> Result<u64, ()> {
            match map.get(key) {
                None => Ok(0),
                Some(v) => v.as_u64().ok_or(()),
            }
        }

        fn optional_str<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ()> {
            match map.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(()),
            }
        }

        fn optional_nonempty_str(
            map: &Map<String, Value>,
            key: &str,
        ) -> Result<Option<String>, ()> {
            match optional_str(map, key)? {
                None => Ok(None),
                Some("") => Err(()),
                Some(s) => Ok(Some(s.to_owned())),
            }
        }
    }

    /// A value of any JSON type, often of the type the schema wants.
    fn any_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("\"\"".to_string()),
            Just("\"assistant\"".to_string()),
            Just("\"assist\\u0061nt\"".to_string()),
            Just("\"user\"".to_string()),
            Just("\"standard\"".to_string()),
            Just("\"2026-03-14T23:50:05.000Z\"".to_string()),
            Just("\"2026-03-14T23:50:05Z\"".to_string()),
            Just("\"2.1.3\"".to_string()),
            Just("\"m\\n1\"".to_string()),
            Just("\"x\"".to_string()),
            Just("0".to_string()),
            Just("-0".to_string()),
            Just("7".to_string()),
            Just("-3".to_string()),
            Just("1.5".to_string()),
            Just("2e3".to_string()),
            Just("18446744073709551615".to_string()),
            Just("18446744073709551616".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("[{\"type\":\"text\",\"text\":\"hi\"}]".to_string()),
            Just("[{\"text\":1}]".to_string()),
            Just("[1]".to_string()),
            Just("[{\"type\":\"text\",\"text\":\"a\",\"text\":null}]".to_string()),
        ]
    }

    /// An object of some of `keys`, each with some value, a key now and then twice.
    fn object(
        keys: &'static [&'static str],
        inner: impl proptest::strategy::Strategy<Value = String>,
    ) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop::collection::vec((prop::sample::select(keys), inner), 0..keys.len() + 2).prop_map(
            |fields| {
                let body: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", body.join(","))
            },
        )
    }

    fn usage_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let count = prop_oneof![Just("12".to_string()), any_value()];
        prop_oneof![
            3 => object(
                &[
                    "input_tokens",
                    "output_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                    "speed",
                    "service_tier",
                ],
                count,
            ),
            1 => any_value(),
        ]
    }

    fn message_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let field = prop_oneof![usage_object(), any_value()];
        prop_oneof![
            4 => object(&["id", "model", "usage", "usage", "content", "role"], field),
            1 => any_value(),
        ]
    }

    fn line_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let field = prop_oneof![message_object(), any_value()];
        object(
            &[
                "type",
                "type",
                "message",
                "message",
                "timestamp",
                "requestId",
                "sessionId",
                "cwd",
                "version",
                "costUSD",
                "isApiErrorMessage",
                "uuid",
            ],
            field,
        )
    }

    /// A valid assistant line whose fields are now and then of another value or type.
    fn mutated_usage_line() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        fn or_any(valid: &'static str) -> impl Strategy<Value = String> {
            prop_oneof![6 => Just(valid.to_string()), 1 => any_value()]
        }
        (
            (
                or_any("\"assistant\""),
                or_any("\"2026-03-14T23:50:05.123Z\""),
                or_any("\"req_1\""),
                or_any("\"s1\""),
                or_any("\"/work\""),
                or_any("\"1.0.80\""),
            ),
            (
                or_any("\"msg_1\""),
                or_any("\"claude-sonnet-4\""),
                or_any("[{\"type\":\"text\",\"text\":\"ok\"},{\"type\":\"tool_use\",\"input\":{}}]"),
                or_any("3"),
                or_any("100"),
                or_any("20000"),
            ),
        )
            .prop_map(|((t, ts, rid, sid, cwd, ver), (mid, model, content, i, o, cr))| {
                format!(
                    r#"{{"parentUuid":null,"type":{t},"timestamp":{ts},"requestId":{rid},"sessionId":{sid},"cwd":{cwd},"version":{ver},"message":{{"id":{mid},"model":{model},"content":{content},"usage":{{"input_tokens":{i},"output_tokens":{o},"cache_read_input_tokens":{cr},"server_tool_use":{{"web_search_requests":0}}}}}}}}"#
                )
            })
    }

    #[test]
    fn strings_the_usage_rules_do_not_read_are_not_decoded() {
        // A lone surrogate escape: JSON.parse (and so ccusage) accepts it,
        // serde_json refuses to decode it. In text nobody reads, the line counts.
        let line = |text: &str, request: &str| {
            format!(
                r#"{{"type":"assistant","timestamp":"{T1}","requestId":"{request}","message":{{"id":"m","content":[{{"type":"tool_use","input":{{"q":"{text}"}}}}],"usage":{{"input_tokens":1,"output_tokens":2}}}}}}"#
            ) + "\n"
        };
        let x = extract_usage(line("cut \\ud83d", "r").as_bytes());
        assert_eq!((x.counts.usage, x.entries.len()), (1, 1));
        // In a field the rules read, the line is malformed as before.
        let x = extract_usage(line("ok", "r\\ud83d").as_bytes());
        assert_eq!((x.counts.malformed, x.entries.len()), (1, 0));
        // extract_errors classifies the same way.
        let e = extract_errors(line("cut \\ud83d", "r").as_bytes());
        assert_eq!(e.counts.usage, 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The same, on lines that mostly carry usage.
        #[test]
        fn the_one_pass_parser_agrees_on_usage_lines(
            lines in proptest::collection::vec(mutated_usage_line(), 1..6),
        ) {
            let mut bytes = lines.join("\n").into_bytes();
            bytes.push(b'\n');
            let (counts, mut entries) = reference::extract(&bytes);
            let mut seen = std::collections::HashSet::new();
            entries.retain(|e| match (&e.message_id, &e.request_id) {
                (Some(m), Some(r)) => seen.insert((m.clone(), r.clone())),
                _ => true,
            });
            let got = extract_usage(&bytes);
            proptest::prop_assert_eq!(&got.counts, &counts);
            proptest::prop_assert_eq!(&got.entries, &entries);
        }

        /// The one-pass parser classifies every line and reads every entry as
        /// the `Value` parser did.
        #[test]
        fn the_one_pass_parser_agrees_with_the_value_parser(
            lines in proptest::collection::vec(line_object(), 1..8),
        ) {
            let mut bytes = lines.join("\n").into_bytes();
            bytes.push(b'\n');
            let (counts, mut entries) = reference::extract(&bytes);
            let mut seen = std::collections::HashSet::new();
            entries.retain(|e| match (&e.message_id, &e.request_id) {
                (Some(m), Some(r)) => seen.insert((m.clone(), r.clone())),
                _ => true,
            });
            let got = extract_usage(&bytes);
            proptest::prop_assert_eq!(&got.counts, &counts);
            proptest::prop_assert_eq!(&got.entries, &entries);
        }
    }
}
