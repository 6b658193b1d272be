//! Bounds on everything a client sends, checked before anything is stored.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::domain::labels::{self as label_rules, Labels};
use crate::domain::recovery;
use crate::error::{Error, Result};
use crate::grpc::convert::from_timestamp;
use crate::proto::v1 as pb;

pub const MAX_AGENT_ID: usize = 128;
pub use crate::domain::labels::{MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS};
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_PAGE_SIZE: i64 = 100;
pub const MAX_PAGE_SIZE: i64 = 1000;
/// Agents one watch may name.
pub const MAX_WATCH_AGENTS: usize = 1000;

/// 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn agent_id(field: &str, id: &str) -> Result<String> {
    identifier(field, id, MAX_AGENT_ID, "")
}

pub const MAX_POST_ID: usize = 256;

/// 1 to 256 characters of `[A-Za-z0-9._:/-]`.
pub fn post_id(field: &str, id: &str) -> Result<String> {
    identifier(field, id, MAX_POST_ID, "/")
}

fn identifier(field: &str, id: &str, max: usize, extra: &str) -> Result<String> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    if id.len() > max {
        return Err(Error::invalid(format!(
            "{field} is {} characters, at most {max} allowed",
            id.len()
        )));
    }
    if let Some(bad) = id.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') || extra.contains(*c))
    }) {
        return Err(Error::invalid(format!(
            "{field} contains {bad:?}; only letters, digits and . _ : - {extra} are allowed"
        )));
    }
    Ok(id.to_owned())
}

/// Label keys: 1 to 63 characters of `[A-Za-z0-9._/-]`; values up to 256 characters.
pub fn labels(field: &str, labels: HashMap<String, String>) -> Result<Labels> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(format!(
            "{field} has {} entries, at most {MAX_LABELS} allowed",
            labels.len()
        )));
    }
    for (key, value) in &labels {
        if !label_rules::key_is_valid(key) {
            return Err(Error::invalid(format!(
                "{field} key {key:?} {}",
                label_rules::KEY_RULE
            )));
        }
        if !label_rules::value_is_valid(value) {
            return Err(Error::invalid(format!(
                "{field} value of {key:?} is longer than {MAX_LABEL_VALUE} characters"
            )));
        }
    }
    Ok(labels.into_iter().collect())
}

pub fn page_size(size: i32) -> Result<i64> {
    match i64::from(size) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::invalid("page_size must not be negative")),
        n => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// A revision given by a client: never negative.
pub fn revision(field: &str, revision: i64) -> Result<i64> {
    if revision < 0 {
        return Err(Error::invalid(format!("{field} must not be negative")));
    }
    Ok(revision)
}

/// Page tokens name the last item of the previous page. They are opaque to
/// clients; the prefix catches tokens from elsewhere.
pub fn encode_page_token(last: &str) -> String {
    format!("after:{last}")
}

pub fn decode_page_token(token: &str) -> Result<Option<&str>> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix("after:")
        .filter(|rest| !rest.is_empty())
        .map(Some)
        .ok_or_else(|| Error::invalid("page_token is not one this server issued"))
}

fn foreign_token() -> Error {
    Error::invalid("page_token is not one this server issued")
}

/// What a page token carries: the position of the previous page's last item.
pub trait PageCursor: Sized {
    fn encode(&self) -> String;
    /// `None` for text this server would not have issued.
    fn decode(text: &str) -> Option<Self>;
}

/// Ids (`before_id`): not negative.
impl PageCursor for i64 {
    fn encode(&self) -> String {
        self.to_string()
    }

    fn decode(text: &str) -> Option<Self> {
        text.parse::<i64>().ok().filter(|id| *id >= 0)
    }
}

/// The crate's one pagination helper: the page a client asks for (its size and
/// the cursor its token carries), and the cut of what the store returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest<C> {
    pub size: i64,
    pub after: Option<C>,
}

/// The cursor a page token carries (`None` for the first page);
/// INVALID_ARGUMENT for a token this server would not have issued.
pub fn page_cursor<C: PageCursor>(token: &str) -> Result<Option<C>> {
    decode_page_token(token)?
        .map(|text| C::decode(text).ok_or_else(foreign_token))
        .transpose()
}

impl<C: PageCursor> PageRequest<C> {
    pub fn decode(size: i32, token: &str) -> Result<Self> {
        Ok(PageRequest {
            size: page_size(size)?,
            after: page_cursor(token)?,
        })
    }

    /// How many items to ask the store for: one more than the page tells
    /// whether there is a next one.
    pub fn fetch_limit(&self) -> i64 {
        self.size + 1
    }

    /// Cuts `items` (fetched with [`PageRequest::fetch_limit`]) to the page and
    /// returns the next page's token, empty on the last page.
    pub fn finish<T>(&self, items: &mut Vec<T>, cursor: impl Fn(&T) -> C) -> String {
        let size = usize::try_from(self.size).unwrap_or(usize::MAX);
        if items.len() <= size {
            return String::new();
        }
        items.truncate(size);
        items
            .last()
            .map(|item| encode_page_token(&cursor(item).encode()))
            .unwrap_or_default()
    }
}

/// A request's fencing token: 0 is none; a negative one was never issued.
pub fn fencing_token(field: &str, token: i64) -> Result<Option<i64>> {
    match token {
        0 => Ok(None),
        t if t < 0 => Err(Error::invalid(format!(
            "{field} must not be negative (0: none)"
        ))),
        t => Ok(Some(t)),
    }
}

/// Free text with a byte bound.
pub fn bounded_text(field: &str, text: &str, max_bytes: usize) -> Result<()> {
    if text.len() > max_bytes {
        return Err(Error::invalid(format!(
            "{field} is {} bytes, at most {max_bytes} allowed",
            text.len()
        )));
    }
    Ok(())
}

pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_BYTES: usize = 128;
pub const MAX_CONTEXT_VALUE_BYTES: usize = 1024;

/// A free-form string map (error context): bounded in entries and sizes.
pub fn context(field: &str, map: HashMap<String, String>) -> Result<Labels> {
    if map.len() > MAX_CONTEXT_ENTRIES {
        return Err(Error::invalid(format!(
            "{field} has {} entries, at most {MAX_CONTEXT_ENTRIES} allowed",
            map.len()
        )));
    }
    for (key, value) in &map {
        if key.is_empty() || key.len() > MAX_CONTEXT_KEY_BYTES {
            return Err(Error::invalid(format!(
                "{field} keys must be 1 to {MAX_CONTEXT_KEY_BYTES} bytes"
            )));
        }
        if value.len() > MAX_CONTEXT_VALUE_BYTES {
            return Err(Error::invalid(format!(
                "{field} value of {key:?} is longer than {MAX_CONTEXT_VALUE_BYTES} bytes"
            )));
        }
    }
    Ok(map.into_iter().collect())
}

/// What a client reports about an exhausted agent, checked: the part
/// `ReportExhausted` and `ExplainRecovery` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryEvidence {
    pub explicit_recovery_at: Option<DateTime<Utc>>,
    pub headers: Vec<(String, String)>,
    pub message: String,
    /// The canonical IANA name, when one was given.
    pub time_zone: Option<String>,
}

/// Checks the evidence of an exhaustion report: at most [`MAX_HEADERS`]
/// headers of at most [`MAX_HEADER_BYTES`] each, a message of at most
/// [`MAX_MESSAGE_BYTES`], a valid `recovery_at` within the parsers' horizon
/// of the server's `now` ([`recovery::check_explicit_recovery`]), and a time
/// zone that is empty or an IANA name.
pub fn recovery_evidence(
    recovery_at: Option<prost_types::Timestamp>,
    headers: Vec<pb::Header>,
    message: String,
    time_zone: &str,
    now: DateTime<Utc>,
) -> Result<RecoveryEvidence> {
    let explicit_recovery_at = recovery_at
        .map(|ts| {
            let at = from_timestamp("recovery_at", ts)?;
            recovery::check_explicit_recovery("recovery_at", at, now).map_err(Error::invalid)
        })
        .transpose()?;
    if headers.len() > MAX_HEADERS {
        return Err(Error::invalid(format!(
            "headers has {} entries, at most {MAX_HEADERS} allowed",
            headers.len()
        )));
    }
    if let Some(h) = headers
        .iter()
        .find(|h| h.name.len() + h.value.len() > MAX_HEADER_BYTES)
    {
        return Err(Error::invalid(format!(
            "header {:?} is larger than {MAX_HEADER_BYTES} bytes",
            h.name.chars().take(64).collect::<String>()
        )));
    }
    bounded_text("message", &message, MAX_MESSAGE_BYTES)?;
    Ok(RecoveryEvidence {
        explicit_recovery_at,
        headers: headers.into_iter().map(|h| (h.name, h.value)).collect(),
        message,
        time_zone: time_zone_name("time_zone", time_zone)?,
    })
}

/// Empty (none), or an IANA zone name, returned in its canonical spelling.
pub fn time_zone_name(field: &str, zone: &str) -> Result<Option<String>> {
    if zone.is_empty() {
        return Ok(None);
    }
    match recovery::parse_time_zone(zone) {
        Some(tz) => Ok(Some(tz.name().to_owned())),
        None => Err(Error::invalid(format!(
            "{field} {:?} is not an IANA time zone (such as America/Los_Angeles or UTC)",
            zone.chars().take(64).collect::<String>()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids() {
        assert!(agent_id("agent_id", "worker-1.eu:a_b").is_ok());
        assert!(agent_id("agent_id", &"a".repeat(128)).is_ok());
        for bad in ["", "has space", "slash/y", "é", &"a".repeat(129)] {
            let err = agent_id("agent_id", bad).unwrap_err().to_string();
            assert!(err.contains("agent_id"), "{err}");
        }
    }

    #[test]
    fn label_bounds() {
        let ok: HashMap<_, _> = [("team".to_string(), "infra".to_string())].into();
        assert_eq!(labels("labels", ok).unwrap().len(), 1);
        let bad_key: HashMap<_, _> = [("".to_string(), "x".to_string())].into();
        assert!(labels("labels", bad_key).is_err());
        let long_value: HashMap<_, _> = [("k".to_string(), "v".repeat(257))].into();
        assert!(labels("labels", long_value).is_err());
        let many: HashMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels("labels", many).is_err());
    }

    #[test]
    fn pages_cut_one_past_the_size_and_carry_the_last_cursor() {
        let page = PageRequest::<i64>::decode(2, "").unwrap();
        assert_eq!((page.size, page.after, page.fetch_limit()), (2, None, 3));
        let mut items = vec![9_i64, 8, 7];
        let token = page.finish(&mut items, |id| *id);
        assert_eq!(items, [9, 8]);
        let next = PageRequest::<i64>::decode(2, &token).unwrap();
        assert_eq!(next.after, Some(8));
        let mut last = vec![7_i64];
        assert_eq!(
            next.finish(&mut last, |id| *id),
            "",
            "no page after the last"
        );
        for bad in ["8", "after:", "after:x", "after:-1", "before:8"] {
            let err = PageRequest::<i64>::decode(2, bad).unwrap_err().to_string();
            assert!(err.contains("page_token"), "{bad}: {err}");
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn recovery_evidence_bounds_and_zones() {
        let header = |name: &str, value: &str| pb::Header {
            name: name.into(),
            value: value.into(),
        };
        let ok = recovery_evidence(
            None,
            vec![header("retry-after", "5")],
            "m".into(),
            "america/los_angeles",
            Utc::now(),
        )
        .unwrap();
        assert_eq!(ok.time_zone.as_deref(), Some("America/Los_Angeles"));
        assert_eq!(ok.headers, [("retry-after".to_string(), "5".to_string())]);
        assert_eq!(
            recovery_evidence(None, vec![], String::new(), "", Utc::now())
                .unwrap()
                .time_zone,
            None
        );
        let err = recovery_evidence(None, vec![], String::new(), "Mars/Olympus", Utc::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("time_zone \"Mars/Olympus\""), "{err}");
        let many = (0..65).map(|i| header(&format!("h{i}"), "")).collect();
        let err = recovery_evidence(None, many, String::new(), "", Utc::now()).unwrap_err();
        assert!(err.to_string().contains("headers has 65 entries"), "{err}");
        let big = vec![header("x", &"v".repeat(MAX_HEADER_BYTES))];
        assert!(recovery_evidence(None, big, String::new(), "", Utc::now()).is_err());
        let long = "m".repeat(MAX_MESSAGE_BYTES + 1);
        let err = recovery_evidence(None, vec![], long, "", Utc::now()).unwrap_err();
        assert!(err.to_string().starts_with("message is"), "{err}");
    }

    #[test]
    fn recovery_at_is_bounded_by_the_parsers_horizon() {
        let now = Utc::now();
        let at = |days: i64| {
            let t = now + chrono::Duration::days(days);
            Some(prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: 0,
            })
        };
        for days in [-30, 0, 365] {
            assert!(recovery_evidence(at(days), vec![], String::new(), "", now).is_ok());
        }
        let year_9999 = Some(prost_types::Timestamp {
            seconds: 253_402_300_000,
            nanos: 0,
        });
        for far in [at(367), year_9999] {
            let err = recovery_evidence(far, vec![], String::new(), "", now)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("recovery_at") && err.contains("366 days"),
                "{err}"
            );
        }
    }
}
