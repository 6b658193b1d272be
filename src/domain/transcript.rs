//! Parsing of Claude Code session transcripts (JSON Lines) into token-usage
//! entries and error records.
//!
//! Transcripts live under `<root>/<user>/`, one JSON object per line: a
//! session's own file `<session>.jsonl`, and its sub-agents' files beside it
//! (`<session>/subagents/agent-*.jsonl`). This module is pure: it takes a
//! file's bytes and returns plain data.
//!
//! # What a line means (ccusage 20's rules)
//!
//! Token accounting follows ccusage 20 (its Rust loader, `adapter/claude`);
//! which copy of a message counts is decided in [`crate::domain::usage`].
//! Here, per line:
//!
//! * A `"type":"assistant"` line carries usage in `message.usage`; a
//!   `"type":"progress"` line carries a sub-agent's message in
//!   `data.message` (its `timestamp`, `isSidechain` and `message` are read
//!   there). `input_tokens` and `output_tokens` are required non-negative
//!   integers; the cache counts default to 0; when `usage.cache_creation`
//!   is an object, cache creation is its `ephemeral_5m_input_tokens` plus
//!   `ephemeral_1h_input_tokens` (ccusage's rule).
//! * Only the fields used are validated: `timestamp` (RFC 3339 with `Z` or
//!   an offset such as `+02:00`), `message.id` and `message.model` (strings,
//!   not empty), `isSidechain` (a boolean, or null), the usage counts. Any
//!   other field may hold anything.
//! * A line that cannot be read (NUL bytes, invalid UTF-8, not one JSON
//!   object, over [`MAX_LINE_BYTES`]) or whose used fields are invalid is
//!   skipped and counted in [`LineCounts::malformed`]; the rest of the file
//!   counts. No content fails a whole file.
//!
//! # Deliberate differences from ccusage 20
//!
//! * ccusage reads usage on a line of any type (or none); here only
//!   `assistant` and `progress` lines, the two Claude Code writes usage on.
//! * A last line without a final newline counts when it is a complete JSON
//!   object (a writer appends a whole line at once, and no proper prefix of
//!   an object parses); otherwise it is an unfinished write, left for the
//!   next run and not counted as skipped (ccusage skips it as bad JSON: the
//!   same totals).
//! * A line over [`MAX_LINE_BYTES`] is skipped (memory stays bounded);
//!   ccusage reads it.
//! * ccusage skips a line in which any of eleven field names (`id`, `cwd`,
//!   `model`, ...) is `null` anywhere, a leftover of its TypeScript schema,
//!   and requires `version` to look like a version; here a `null` or odd
//!   value in a field the rules do not read changes nothing.
//! * ccusage accepts a timestamp with 0 or 3 fraction digits only; here any
//!   RFC 3339 fraction.

mod line;

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use line::Scalar;

/// Lines longer than this are skipped (a runaway line must not exhaust memory).
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// Error messages are truncated to this many characters.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 4096;

/// One message's token usage, as recorded on one transcript line. A message
/// streamed in several content blocks is on several lines (same id), the
/// early ones with partial usage: every line is an entry, and
/// [`crate::domain::usage`] decides which copy counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEntry {
    /// 1-based line number in the file.
    pub line_no: u32,
    pub timestamp: DateTime<Utc>,
    pub message_id: Option<String>,
    pub model: Option<String>,
    /// `isSidechain: true`: a side question or sub-agent conversation, whose
    /// replays of parent messages must not count again.
    pub sidechain: bool,
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
    /// Complete lines seen (excluding an unfinished last line and blank lines).
    pub lines: u64,
    /// Skipped: unreadable (NUL bytes, invalid UTF-8, not a JSON object,
    /// over MAX_LINE_BYTES) or usage whose used fields are invalid.
    pub malformed: u64,
    /// Readable lines that carry no usage (including other line types).
    pub without_usage: u64,
    /// Lines with valid usage (every copy of a streamed message).
    pub usage: u64,
    /// Bytes of a last line with no final newline that is not (yet) a
    /// complete JSON object: an unfinished write, left for the next run.
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

/// Parses a whole file's bytes: every line with valid usage is an entry, in
/// line order (copies of one message included). Never panics.
pub fn extract_usage(content: &[u8]) -> UsageExtract {
    let mut entries = Vec::new();
    let counts = scan(content, |line_no, text| {
        let (class, entry) = classify(text);
        if let Some(entry) = entry {
            entries.push(entry.into_entry(line_no));
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

// ---------------------------------------------------------------------------
// Line scanning
// ---------------------------------------------------------------------------

/// What one line was classified as.
enum LineClass {
    Malformed,
    WithoutUsage,
    Usage,
}

/// The line's text when it is UTF-8 within [`MAX_LINE_BYTES`].
fn line_text(raw: &[u8]) -> Option<&str> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|_| raw.len() <= MAX_LINE_BYTES)
}

/// Splits `content` into lines and hands every complete, non-blank line that
/// is UTF-8 text within [`MAX_LINE_BYTES`] to `on_line`, which classifies it
/// (other lines are malformed). A last line without a newline is complete
/// when it is one JSON object. Returns the counts.
fn scan<'c>(content: &'c [u8], mut on_line: impl FnMut(u32, &'c str) -> LineClass) -> LineCounts {
    let mut counts = LineCounts::default();
    let mut line_no: u32 = 0;
    let mut rest = content;
    while !rest.is_empty() {
        line_no = line_no.saturating_add(1);
        let raw = match memchr::memchr(b'\n', rest) {
            Some(nl) => {
                let raw = &rest[..nl];
                rest = &rest[nl + 1..];
                raw
            }
            None => {
                let raw = std::mem::take(&mut rest);
                if line_text(raw).and_then(line::parse).is_none() {
                    // An unfinished write (or trailing garbage): left for
                    // the next run.
                    if !raw.iter().all(u8::is_ascii_whitespace) {
                        counts.unfinished_tail_bytes = raw.len() as u64;
                    }
                    break;
                }
                raw
            }
        };
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        counts.lines += 1;
        let class = match line_text(raw) {
            Some(text) => on_line(line_no, text),
            None => LineClass::Malformed,
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

/// The line carries usage but a field the rules use is invalid.
struct Malformed;

/// A line's entry, its strings still borrowed from the line (owned only
/// where the JSON escaped them).
struct LineEntry<'a> {
    timestamp: DateTime<Utc>,
    message_id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    sidechain: bool,
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
            message_id: self.message_id.map(Cow::into_owned),
            model: self.model.map(Cow::into_owned),
            sidechain: self.sidechain,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_creation_tokens: self.cache_creation_tokens,
            cache_read_tokens: self.cache_read_tokens,
        }
    }
}

/// The line that carries the message: the line itself for an assistant
/// line, the reported sub-agent line for a progress line.
fn message_line(line: line::Line<'_>) -> Option<line::Line<'_>> {
    match line.r#type.as_ref().and_then(Scalar::as_str) {
        Some("assistant") => Some(line),
        Some("progress") => match line.data? {
            line::Data::Object {
                message: Some(line::Inner::Object(inner)),
            } => Some(*inner),
            _ => None,
        },
        _ => None,
    }
}

/// `Ok(None)`: no usage on this line. `Err`: usage present but invalid.
fn parse_usage(line: line::Line<'_>) -> Result<Option<LineEntry<'_>>, Malformed> {
    let Some(line) = message_line(line) else {
        return Ok(None);
    };
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
    let cache_creation_tokens = match usage.cache_creation {
        Some(line::CacheCreation::Object(c)) => optional_count(c.ephemeral_5m)?
            .checked_add(optional_count(c.ephemeral_1h)?)
            .ok_or(Malformed)?,
        Some(line::CacheCreation::NotObject) => return Err(Malformed),
        None | Some(line::CacheCreation::Null) => {
            optional_count(usage.cache_creation_input_tokens)?
        }
    };
    let cache_read_tokens = optional_count(usage.cache_read_input_tokens)?;

    let timestamp = line
        .timestamp
        .as_ref()
        .and_then(Scalar::as_str)
        .and_then(parse_timestamp)
        .ok_or(Malformed)?;
    let message_id = optional_nonempty_str(message.id)?;
    let model = optional_nonempty_str(message.model)?;
    let sidechain = match line.is_sidechain {
        None | Some(Scalar::Other) => false,
        Some(Scalar::Bool(b)) => b,
        Some(_) => return Err(Malformed),
    };

    Ok(Some(LineEntry {
        timestamp,
        message_id,
        model,
        sidechain,
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

/// An RFC 3339 timestamp (`Z` or an offset), as UTC.
fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
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
                message_id: Some("msg_1".into()),
                model: Some("claude-sonnet-4-20250514".into()),
                sidechain: false,
                input_tokens: 1,
                output_tokens: 2,
                cache_creation_tokens: 3,
                cache_read_tokens: 4,
            }]
        );
    }

    #[test]
    fn every_copy_of_a_streamed_message_is_an_entry() {
        // Which copy counts is the usage rollups' decision, not the parser's.
        let bytes = jsonl(&[
            assistant(Some("msg_1"), Some("req_1"), T1, usage(1, 2, 3, 4)),
            assistant(Some("msg_1"), Some("req_1"), T2, usage(1, 9, 3, 4)),
            assistant(None, None, T3, usage(3, 3, 0, 0)),
        ]);
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(3, 0, 0, 3));
        let got: Vec<(u32, u64)> = x
            .entries
            .iter()
            .map(|e| (e.line_no, e.output_tokens))
            .collect();
        assert_eq!(got, vec![(1, 2), (2, 9), (3, 3)]);
    }

    #[test]
    fn sidechain_copies_are_marked() {
        let mut side = assistant(Some("msg_1"), Some("req_side"), T1, usage(1, 1, 0, 50_000));
        side["isSidechain"] = json!(true);
        let mut main = assistant(Some("msg_2"), Some("req_2"), T2, usage(1, 1, 0, 0));
        main["isSidechain"] = json!(false);
        let mut null = assistant(Some("msg_3"), Some("req_3"), T3, usage(1, 1, 0, 0));
        null["isSidechain"] = json!(null);
        let mut bad = assistant(Some("msg_4"), Some("req_4"), T3, usage(1, 1, 0, 0));
        bad["isSidechain"] = json!("yes");
        let x = extract_usage(&jsonl(&[side, main, null, bad]));
        let got: Vec<bool> = x.entries.iter().map(|e| e.sidechain).collect();
        assert_eq!(got, vec![true, false, false]);
        assert_eq!(x.counts, counts(4, 1, 0, 3));
    }

    #[test]
    fn a_progress_line_carries_a_sub_agents_usage() {
        let inner = {
            let mut l = assistant(Some("msg_sub"), Some("req_sub"), T2, usage(2, 30, 0, 700));
            l["isSidechain"] = json!(true);
            l
        };
        let progress = json!({
            "type": "progress",
            "timestamp": T3,
            "data": {"type": "agent_progress", "message": inner},
        });
        // A progress line without a message, or with one that has no usage.
        let empty = json!({"type": "progress", "timestamp": T3, "data": {"type": "hook_progress"}});
        let no_usage = json!({"type": "progress", "data": {"message": {"type": "user", "timestamp": T1, "message": {"content": "hi"}}}});
        let odd = json!({"type": "progress", "data": "text"});
        let x = extract_usage(&jsonl(&[progress, empty, no_usage, odd]));
        assert_eq!(x.counts, counts(4, 0, 3, 1));
        let e = &x.entries[0];
        // The sub-agent line's own time and fields, not the progress line's.
        assert_eq!(
            (
                e.timestamp,
                e.message_id.as_deref(),
                e.sidechain,
                e.output_tokens,
                e.cache_read_tokens
            ),
            (ts(T2), Some("msg_sub"), true, 30, 700)
        );
    }

    #[test]
    fn timestamps_with_an_offset_are_read_as_utc() {
        let line = assistant(
            Some("m"),
            None,
            "2026-03-15T01:30:00.000+02:00",
            usage(1, 1, 0, 0),
        );
        let x = extract_usage(&jsonl(&[line]));
        assert_eq!(x.entries[0].timestamp, ts("2026-03-14T23:30:00Z"));
        for t in [
            "2026-03-14T23:50:05Z",
            "2026-03-14T23:50:05.123456Z",
            "2026-03-14T23:50:05-05:30",
        ] {
            let x = extract_usage(&jsonl(&[assistant(Some("m"), None, t, usage(1, 1, 0, 0))]));
            assert_eq!(x.counts, counts(1, 0, 0, 1), "{t}");
        }
    }

    #[test]
    fn cache_creation_by_lifetime_is_the_sum_of_its_parts() {
        let with_parts = json!({
            "input_tokens": 1, "output_tokens": 2,
            "cache_creation_input_tokens": 999,
            "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 12},
        });
        let null_parts = json!({
            "input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": 7,
            "cache_creation": null,
        });
        let x = extract_usage(&jsonl(&[
            assistant(Some("a"), None, T1, with_parts),
            assistant(Some("b"), None, T1, null_parts),
        ]));
        let got: Vec<u64> = x.entries.iter().map(|e| e.cache_creation_tokens).collect();
        assert_eq!(got, vec![42, 7]);
    }

    #[test]
    fn unreadable_lines_are_skipped_and_counted() {
        let mut bytes = b"this is plain text\n".to_vec();
        bytes.extend_from_slice(
            b"{\"type\":\"assistant\",\"message\":{\"usage\":{\"input_tokens\":\n",
        );
        bytes.extend_from_slice(b"[1,2,3]\n");
        bytes.extend_from_slice(b"\"a string\"\n");
        bytes.extend_from_slice(b"null\n");
        // The padding a crash leaves, on a line of its own and before a line.
        bytes.extend_from_slice(b"\0\0\0\0\0\0\n\0\0{\"type\":\"user\"}\n");
        bytes.extend_from_slice(&jsonl(&[assistant(
            Some("m"),
            Some("r"),
            T1,
            usage(1, 1, 1, 1),
        )]));
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(8, 7, 0, 1));
        assert_eq!(x.entries[0].line_no, 8);
    }

    #[test]
    fn a_nul_padded_file_counts_its_good_lines() {
        let good = |m: &str| assistant(Some(m), None, T1, usage(1, 1, 1, 1)).to_string();
        let bytes = format!(
            "{}\n{}\n{}\n{}",
            good("a"),
            "\0".repeat(4096),
            good("b"),
            "\0".repeat(512)
        )
        .into_bytes();
        let x = extract_usage(&bytes);
        let ids: Vec<&str> = x
            .entries
            .iter()
            .filter_map(|e| e.message_id.as_deref())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        // The padding line is skipped; the unterminated padding is left as an
        // unfinished tail.
        assert_eq!(x.counts.malformed, 1);
        assert_eq!(x.counts.unfinished_tail_bytes, 512);
        assert_eq!(extract_errors(&bytes).counts, x.counts);
    }

    #[test]
    fn other_line_types_carry_no_usage() {
        let mut user = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        user["type"] = json!("user");
        let mut untyped = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        untyped.as_object_mut().unwrap().remove("type");
        let bytes = jsonl(&[
            user,
            untyped,
            json!({"type": "summary", "summary": "s", "leafUuid": "x"}),
            json!({"type": "system", "content": "hi", "level": "info", "timestamp": T1}),
            // assistant without usage, and assistant with a non-object message
            json!({"type": "assistant", "timestamp": T1, "message": {"content": []}}),
            json!({"type": "assistant", "timestamp": T1, "message": "text"}),
        ]);
        let x = extract_usage(&bytes);
        assert!(x.entries.is_empty());
        assert_eq!(x.counts, counts(6, 0, 6, 0));
    }

    #[test]
    fn a_last_line_without_newline_counts_once_it_is_complete() {
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
        // A complete object without its newline is a whole line.
        let line = assistant(Some("m2"), Some("r"), T1, usage(1, 1, 1, 1)).to_string();
        let mut bytes = jsonl(&[assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1))]);
        bytes.extend_from_slice(line.as_bytes());
        let x = extract_usage(&bytes);
        assert_eq!(x.counts, counts(2, 0, 0, 2));
        assert_eq!(x.entries[1].line_no, 2);
        // Trailing blanks are no unfinished write.
        let x = extract_usage(b"   ");
        assert_eq!(x.counts, LineCounts::default());
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
    fn over_long_line_is_skipped() {
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
    fn invalid_utf8_line_is_skipped() {
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
    fn wrong_typed_usage_is_skipped() {
        let bad_usages = [
            json!({"input_tokens": "5", "output_tokens": 8}),
            json!({"input_tokens": 5}),
            json!({"output_tokens": 5}),
            json!({"input_tokens": 5, "output_tokens": null}),
            json!({"input_tokens": 5, "output_tokens": 8, "cache_read_input_tokens": null}),
            json!({"input_tokens": 5, "output_tokens": 8, "cache_creation_input_tokens": "1"}),
            json!({"input_tokens": -5, "output_tokens": 8}),
            json!({"input_tokens": 5.5, "output_tokens": 8}),
            json!({"input_tokens": 5, "output_tokens": 8, "cache_creation": 3}),
            json!({"input_tokens": 5, "output_tokens": 8, "cache_creation": {"ephemeral_5m_input_tokens": "1"}}),
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
    fn only_the_fields_used_are_validated() {
        let base = assistant(Some("m"), Some("r"), T1, usage(1, 1, 1, 1));
        // Invalid where the rules read: skipped.
        let invalid: Vec<(&str, Value)> = vec![
            ("/timestamp", json!("2026-13-14T23:50:05.000Z")),
            ("/timestamp", json!("yesterday")),
            ("/timestamp", json!(12)),
            ("/message/id", json!("")),
            ("/message/id", json!(null)),
            ("/message/id", json!(7)),
            ("/message/model", json!(4)),
            ("/message/model", json!("")),
        ];
        for (ptr, value) in invalid {
            let mut line = base.clone();
            *line.pointer_mut(ptr).unwrap_or_else(|| panic!("{ptr}")) = value.clone();
            let x = extract_usage(&jsonl(&[line]));
            assert_eq!(x.counts, counts(1, 1, 0, 0), "{ptr} = {value}");
        }
        let mut no_ts = base.clone();
        no_ts.as_object_mut().unwrap().remove("timestamp");
        assert_eq!(extract_usage(&jsonl(&[no_ts])).counts, counts(1, 1, 0, 0));
        // Anything in fields the rules do not read: counted.
        let unread: Vec<(&str, Value)> = vec![
            ("/requestId", json!("")),
            ("/requestId", json!(7)),
            ("/sessionId", json!(null)),
            ("/version", json!("v2")),
            ("/cwd", json!(1)),
            ("/cwd", json!(null)),
            ("/message/content", json!(null)),
            ("/message/content", json!("plain")),
            ("/message/content", json!([{"type": "text", "text": 3}])),
            ("/message/usage/speed", json!("warp")),
        ];
        for (ptr, value) in unread {
            let mut line = base.clone();
            match line.pointer_mut(ptr) {
                Some(slot) => *slot = value.clone(),
                None => {
                    let (parent, key) = ptr.rsplit_once('/').unwrap();
                    line.pointer_mut(parent).unwrap()[key] = value.clone();
                }
            }
            let x = extract_usage(&jsonl(&[line]));
            assert_eq!(x.counts, counts(1, 0, 0, 1), "{ptr} = {value}");
        }
        let mut extra = base.clone();
        extra["costUSD"] = json!("1");
        extra["isApiErrorMessage"] = json!("yes");
        assert_eq!(extract_usage(&jsonl(&[extra])).counts, counts(1, 0, 0, 1));
        // No model: counted without one.
        let mut ok = base.clone();
        ok["message"].as_object_mut().unwrap().remove("model");
        let x = extract_usage(&jsonl(&[ok]));
        assert_eq!(x.entries[0].model, None);
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
            // A tail is either a whole line or left for the next run.
            let tail_is_object = serde_json::from_str::<Map<String, Value>>(&tail).is_ok();
            let tail_is_blank = tail.bytes().all(|b| b.is_ascii_whitespace());
            let expected_tail = if tail_is_object || tail_is_blank { 0 } else { tail.len() as u64 };
            proptest::prop_assert_eq!(u.counts.unfinished_tail_bytes, expected_tail);
        }
    }

    /// The rules on a `serde_json::Value` per line: what the one-pass parser
    /// must agree with (it reads fewer strings, see `line`).
    mod reference {
        use super::super::{LineClass, LineCounts, MAX_LINE_BYTES, UsageEntry, parse_timestamp};
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

        /// Counts and entries (every line terminated).
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
            let line = match obj.get("type").and_then(Value::as_str) {
                Some("assistant") => obj,
                Some("progress") => match obj.get("data").and_then(|d| d.get("message")) {
                    Some(Value::Object(inner)) => inner,
                    _ => return Ok(None),
                },
                _ => return Ok(None),
            };
            let Some(Value::Object(message)) = line.get("message") else {
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
            let cache_creation_tokens = match usage.get("cache_creation") {
                None | Some(Value::Null) => optional_count(usage, "cache_creation_input_tokens")?,
                Some(Value::Object(parts)) => optional_count(parts, "ephemeral_5m_input_tokens")?
                    .checked_add(optional_count(parts, "ephemeral_1h_input_tokens")?)
                    .ok_or(())?,
                Some(_) => return Err(()),
            };
            let cache_read_tokens = optional_count(usage, "cache_read_input_tokens")?;
            let timestamp = line
                .get("timestamp")
                .and_then(Value::as_str)
                .and_then(parse_timestamp)
                .ok_or(())?;
            let message_id = optional_nonempty_str(message, "id")?;
            let model = optional_nonempty_str(message, "model")?;
            let sidechain = match line.get("isSidechain") {
                Some(Value::Bool(b)) => *b,
                None | Some(Value::Null | Value::Array(_) | Value::Object(_)) => false,
                Some(_) => return Err(()),
            };
            Ok(Some(UsageEntry {
                line_no,
                timestamp,
                message_id,
                model,
                sidechain,
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

        fn optional_nonempty_str(
            map: &Map<String, Value>,
            key: &str,
        ) -> Result<Option<String>, ()> {
            match map.get(key) {
                None => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Err(()),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(()),
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
            Just("false".to_string()),
            Just("\"2026-03-15T01:30:00.000+02:00\"".to_string()),
            Just("\"progress\"".to_string()),
            Just("{\"ephemeral_5m_input_tokens\":3,\"ephemeral_1h_input_tokens\":4}".to_string()),
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
                    "cache_creation",
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

    fn line_fields() -> &'static [&'static str] {
        &[
            "type",
            "type",
            "message",
            "message",
            "timestamp",
            "requestId",
            "isSidechain",
            "sessionId",
            "cwd",
            "version",
            "uuid",
        ]
    }

    /// A line, now and then a progress line reporting another line.
    fn line_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let field = prop_oneof![message_object(), any_value()];
        let inner = object(line_fields(), field.clone());
        let data = prop_oneof![
            inner.prop_map(|m| format!("{{\"message\":{m}}}")),
            any_value()
        ];
        let progress = (data, any_value())
            .prop_map(|(d, t)| format!("{{\"type\":\"progress\",\"timestamp\":{t},\"data\":{d}}}"));
        prop_oneof![3 => object(line_fields(), field), 1 => progress]
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
            let (counts, entries) = reference::extract(&bytes);
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
            let (counts, entries) = reference::extract(&bytes);
            let got = extract_usage(&bytes);
            proptest::prop_assert_eq!(&got.counts, &counts);
            proptest::prop_assert_eq!(&got.entries, &entries);
        }
    }
}
