//! What the TOML files an operator writes (the auth file, the healing
//! policy) share: an error that names the line.

/// The 1-based line `offset` (a byte offset into `text`) is on.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A TOML parse error of `text` as one line: `line N: what`.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e.span().map(|s| line_of(text, s.start));
    let message = e.message().trim().to_owned();
    match line {
        Some(line) => format!("line {line}: {message}"),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_the_line_it_is_on() {
        let text = "a = 1\nb = \n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        assert!(toml_error(text, &e).starts_with("line 2: "), "{e}");
        assert_eq!(line_of("x\ny\nz", 4), 3);
        assert_eq!(line_of("x", 99), 1);
    }
}
