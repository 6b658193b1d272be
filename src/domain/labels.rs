//! An agent's labels: free-form key/value pairs a caller attaches, read by
//! the state machine (`agent`), recovery-time inference (`recovery`: the
//! `time_zone` label), authorization scopes (`auth`), label selectors
//! (`dispatch`) and listings.
//!
//! What a well-formed key and value are is decided here once, for the labels
//! an agent registers with (`grpc::validate::labels`) and for the keys and
//! values a selector names (`dispatch::LabelSelector::validate`).

use std::collections::BTreeMap;

/// An agent's labels, ordered so that they print and compare stably.
pub type Labels = BTreeMap<String, String>;

/// Labels one agent may carry.
pub const MAX_LABELS: usize = 64;
/// The longest label key, in characters (keys are ASCII).
pub const MAX_LABEL_KEY: usize = 63;
/// The longest label value, in characters.
pub const MAX_LABEL_VALUE: usize = 256;

/// Whether `key` is a well-formed label key: 1 to [`MAX_LABEL_KEY`]
/// characters of `[A-Za-z0-9._/-]`.
pub fn key_is_valid(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_LABEL_KEY
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
}

/// Whether `value` is a well-formed label value: at most [`MAX_LABEL_VALUE`]
/// characters, any of them (the empty value included).
pub fn value_is_valid(value: &str) -> bool {
    value.chars().count() <= MAX_LABEL_VALUE
}

/// What a malformed key is told: the rule [`key_is_valid`] checks, in words.
pub const KEY_RULE: &str = "must be 1 to 63 characters of letters, digits and . _ / -";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values() {
        assert!(key_is_valid("team"));
        assert!(key_is_valid("example.com/zone-a_1"));
        assert!(!key_is_valid(""));
        assert!(!key_is_valid("with space"));
        assert!(!key_is_valid(&"k".repeat(MAX_LABEL_KEY + 1)));
        assert!(key_is_valid(&"k".repeat(MAX_LABEL_KEY)));
        assert!(value_is_valid(""));
        assert!(value_is_valid(&"é".repeat(MAX_LABEL_VALUE)));
        assert!(!value_is_valid(&"v".repeat(MAX_LABEL_VALUE + 1)));
        assert!(KEY_RULE.contains(&MAX_LABEL_KEY.to_string()));
    }
}
