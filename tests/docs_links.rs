//! Every relative link in the docs leads somewhere: README.md, CONTRIBUTING.md,
//! docs/**/*.md and clients/*/README.md are read, each markdown link
//! `[text](target)` whose target is relative (not `http(s)://`, not `mailto:`)
//! must name a file or directory that exists relative to the linking file, and
//! an `#anchor` (alone, or after a `.md` file) must be a heading of the target
//! file, slugged as GitHub does. Links inside fenced code blocks and code spans
//! are not links. Every broken link is printed with its file and line.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use regex::Regex;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The markdown files whose links are checked.
fn documents() -> Vec<PathBuf> {
    let root = repo();
    let mut files = vec![root.join("README.md"), root.join("CONTRIBUTING.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                files.push(path);
            }
        }
    }
    for entry in std::fs::read_dir(root.join("clients")).unwrap() {
        let readme = entry.unwrap().path().join("README.md");
        if readme.is_file() {
            files.push(readme);
        }
    }
    files.sort();
    files
}

/// The lines of a markdown file outside fenced code blocks, with their numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<&str> = None;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match fence {
            Some(marker) => {
                if trimmed.starts_with(marker) {
                    fence = None;
                }
            }
            None if trimmed.starts_with("```") => fence = Some("```"),
            None if trimmed.starts_with("~~~") => fence = Some("~~~"),
            None => lines.push((index + 1, line)),
        }
    }
    lines
}

/// The byte ranges of a line's code spans (`code`, ``code``).
fn code_spans(line: &str) -> Vec<std::ops::Range<usize>> {
    let bytes = line.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i] == b'`' {
            i += 1;
        }
        let run = i - start;
        // The closing run of the same length.
        let mut j = i;
        let mut closed = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let close = j;
                while j < bytes.len() && bytes[j] == b'`' {
                    j += 1;
                }
                if j - close == run {
                    closed = Some(j);
                    break;
                }
            } else {
                j += 1;
            }
        }
        match closed {
            Some(end) => {
                spans.push(start..end);
                i = end;
            }
            None => break,
        }
    }
    spans
}

/// GitHub's anchor for a heading: lower case, markdown links reduced to their
/// text, every character but letters, digits, spaces, `-` and `_` dropped,
/// spaces made `-`.
fn slug(heading: &str) -> String {
    let link = Regex::new(r"!?\[([^\]]*)\]\([^)]*\)").unwrap();
    let text = link.replace_all(heading, "$1");
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings; a repeated heading gets `-1`,
/// `-2`, ... as on GitHub.
fn anchors(text: &str) -> HashSet<String> {
    let heading = Regex::new(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$").unwrap();
    let mut seen = HashSet::new();
    for (_, line) in prose_lines(text) {
        if let Some(captures) = heading.captures(line) {
            let base = slug(&captures[1]);
            let mut anchor = base.clone();
            let mut n = 0;
            while seen.contains(&anchor) {
                n += 1;
                anchor = format!("{base}-{n}");
            }
            seen.insert(anchor);
        }
    }
    seen
}

/// Every broken relative link of one file, as `file:line: message`.
fn broken_links(file: &Path, root: &Path) -> Vec<String> {
    let link = Regex::new(r#"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)"#).unwrap();
    let text = std::fs::read_to_string(file).unwrap();
    let shown = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let mut broken = Vec::new();
    for (number, line) in prose_lines(&text) {
        let spans = code_spans(line);
        for captures in link.captures_iter(line) {
            let whole = captures.get(0).unwrap();
            if spans.iter().any(|span| span.contains(&whole.start())) {
                continue;
            }
            let target = &captures[1];
            let lower = target.to_ascii_lowercase();
            if target.is_empty()
                || lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("mailto:")
            {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target, None),
            };
            let resolved = if path.is_empty() {
                file.to_path_buf()
            } else {
                file.parent().unwrap().join(path)
            };
            if !resolved.exists() {
                broken.push(format!(
                    "{shown}:{number}: [{target}]: {} does not exist",
                    resolved.strip_prefix(root).unwrap_or(&resolved).display()
                ));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if resolved.extension().is_none_or(|ext| ext != "md") {
                continue;
            }
            let target_text = std::fs::read_to_string(&resolved).unwrap();
            if !anchors(&target_text).contains(anchor) {
                broken.push(format!(
                    "{shown}:{number}: [{target}]: no heading of {} has the anchor #{anchor}",
                    resolved.strip_prefix(root).unwrap_or(&resolved).display()
                ));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_docs_leads_somewhere() {
    let root = repo();
    let files = documents();
    assert!(files.len() >= 4, "found only {files:?}");
    let broken: Vec<String> = files
        .iter()
        .flat_map(|file| broken_links(file, &root))
        .collect();
    for line in &broken {
        eprintln!("{line}");
    }
    assert!(
        broken.is_empty(),
        "{} broken link(s) in the docs:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn anchors_are_slugged_as_github_does() {
    assert_eq!(
        slug("Moving from the embedded store to Postgres: `fleetcare copy`"),
        "moving-from-the-embedded-store-to-postgres-fleetcare-copy"
    );
    assert_eq!(
        slug("Callers, tokens and roles"),
        "callers-tokens-and-roles"
    );
    assert_eq!(slug("snake_case and dash-ed"), "snake_case-and-dash-ed");
    let text = "# A\n\n```\n# not a heading\n```\n\n## A\n### B: [link](x.md)\n";
    let found = anchors(text);
    assert!(found.contains("a") && found.contains("a-1") && found.contains("b-link"));
    assert!(!found.contains("not-a-heading"));
}

#[test]
fn a_broken_link_is_reported_with_its_file_and_line() {
    let dir = std::env::temp_dir().join(format!("fleetcare-docs-links-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("page.md");
    std::fs::write(
        &file,
        "# Page\n\n[ok](#page) [ok](page.md#page) [web](https://example.com/x)\n\
         [gone](missing.md)\n`[code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n\
         [bad anchor](#nope)\n",
    )
    .unwrap();
    let broken = broken_links(&file, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(broken.len(), 2, "{broken:#?}");
    assert!(
        broken[0].starts_with("page.md:4: [missing.md]"),
        "{}",
        broken[0]
    );
    assert!(
        broken[1].starts_with("page.md:10: [#nope]"),
        "{}",
        broken[1]
    );
}
