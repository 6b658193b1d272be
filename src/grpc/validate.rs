//! Bounds on everything a client sends, checked before anything is stored.

use std::collections::HashMap;

use crate::domain::transition::Labels;
use crate::error::{Error, Result};

pub const MAX_AGENT_ID: usize = 128;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 256;
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_PAGE_SIZE: i64 = 100;
pub const MAX_PAGE_SIZE: i64 = 1000;
/// Agents one watch may name.
pub const MAX_WATCH_AGENTS: usize = 1000;

/// 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn agent_id(field: &str, id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    if id.len() > MAX_AGENT_ID {
        return Err(Error::invalid(format!(
            "{field} is {} characters, at most {MAX_AGENT_ID} allowed",
            id.len()
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(Error::invalid(format!(
            "{field} contains {bad:?}; only letters, digits and . _ : - are allowed"
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
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
        if !key_ok {
            return Err(Error::invalid(format!(
                "{field} key {key:?} must be 1 to {MAX_LABEL_KEY} characters of letters, digits and . _ / -"
            )));
        }
        if value.chars().count() > MAX_LABEL_VALUE {
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
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }
}
