//! Billing stops: the provider will not serve this account again until
//! someone pays or raises a limit, so retrying soon does not help.
//!
//! Recognised from OpenAI's error codes (in a JSON body's `code` or `type`,
//! or as a whole word in the text) and from the wording providers use.

/// Error codes that mean a billing stop.
pub const BILLING_CODES: [&str; 4] = [
    "insufficient_quota",
    "billing_hard_limit_reached",
    "credit_balance_exhausted",
    "project_spend_limit_exceeded",
];

/// Phrases that mean a billing stop, lower-case.
const BILLING_WORDING: [&str; 6] = [
    "exceeded your current quota",
    "check your plan and billing details",
    "billing hard limit",
    "credit balance is too low",
    "credit balance is exhausted",
    "exceeded your spend limit",
];

/// The billing code `value` is, if it is one (any case).
pub fn code(value: &str) -> Option<String> {
    let value = value.trim();
    BILLING_CODES
        .iter()
        .find(|c| c.eq_ignore_ascii_case(value))
        .map(|c| (*c).to_owned())
}

/// What in `text` shows a billing stop: a code as a whole word, else a
/// phrase of the wording (quoted).
pub fn in_text(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let is_word_char = |c: char| c.is_alphanumeric() || c == '_';
    let as_word = |code: &str| {
        lower.match_indices(code).any(|(i, m)| {
            let before = lower[..i].chars().next_back();
            let after = lower[i + m.len()..].chars().next();
            !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
        })
    };
    if let Some(code) = BILLING_CODES.iter().find(|c| as_word(c)) {
        return Some((*code).to_owned());
    }
    BILLING_WORDING
        .iter()
        .find(|phrase| lower.contains(*phrase))
        .map(|phrase| format!("\"{phrase}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_recognised_as_whole_words_in_any_case() {
        for code in BILLING_CODES {
            assert_eq!(in_text(&format!("error: {code}.")).as_deref(), Some(code));
            assert_eq!(
                in_text(&code.to_uppercase()).as_deref(),
                Some(code),
                "{code}"
            );
        }
        assert_eq!(in_text("not_insufficient_quota_really"), None);
        assert_eq!(in_text("insufficient_quotas"), None);
        assert_eq!(in_text("rate limit reached, try again in 5s"), None);
        assert_eq!(in_text(""), None);
    }

    #[test]
    fn wording_is_recognised() {
        let openai = "You exceeded your current quota, please check your plan and billing details.";
        assert_eq!(
            in_text(openai).as_deref(),
            Some("\"exceeded your current quota\"")
        );
        let anthropic = "Your credit balance is too low to access the Anthropic API.";
        assert_eq!(
            in_text(anthropic).as_deref(),
            Some("\"credit balance is too low\"")
        );
    }

    #[test]
    fn codes_match_exactly() {
        assert_eq!(
            code(" Insufficient_Quota ").as_deref(),
            Some("insufficient_quota")
        );
        assert_eq!(code("rate_limit_exceeded"), None);
    }
}
