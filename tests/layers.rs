//! Imports go down only: every `crate::<module>` a file of `src/` names (and
//! every `super::` path that climbs out of its top-level module) must be
//! allowed by [`LAYERS`], which mirrors the table in docs/architecture.md
//! (section Layers; the two are compared here too). Inside a top-level
//! module, sibling modules do not import each other in a cycle, at any depth.
//! A violation is printed with its file and line.
//!
//! Comments, string and character literals are skipped; `use` groups
//! (`crate::{a, b::c}`) are expanded; inline modules (`mod tests { .. }`)
//! count for `super::`. `main.rs` is the binary (it imports the library as
//! `fleetcare::`, and may import everything) and is not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of the library, from the bottom, with the modules of
/// this crate it may import. A module may import only modules listed before
/// it, so the order has no cycle. Keep in step with docs/architecture.md.
const LAYERS: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("proto", &[]),
    ("error", &["domain"]),
    ("storage", &["domain", "error"]),
    ("processors", &["domain", "storage", "error"]),
    ("metrics", &["domain", "storage", "error"]),
    ("tls", &[]),
    ("config", &["storage", "tls"]),
    (
        "runtime",
        &[
            "domain",
            "storage",
            "processors",
            "metrics",
            "config",
            "proto",
            "error",
        ],
    ),
    (
        "grpc",
        &["domain", "storage", "runtime", "metrics", "proto", "error"],
    ),
    ("views", &["proto"]),
    (
        "http",
        &[
            "domain", "storage", "runtime", "metrics", "proto", "error", "grpc", "views",
        ],
    ),
    ("telemetry", &["config"]),
    (
        "cli",
        &["views", "proto", "config", "error", "domain", "storage"],
    ),
    ("startup", EVERYTHING),
];

/// A module that may import every other (the wiring).
const EVERYTHING: &[&str] = &["*"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn allowed(module: &str) -> Option<BTreeSet<&'static str>> {
    let position = LAYERS.iter().position(|(name, _)| *name == module)?;
    let (_, imports) = LAYERS[position];
    Some(if imports == EVERYTHING {
        LAYERS.iter().map(|(name, _)| *name).collect()
    } else {
        imports.iter().copied().collect()
    })
}

/// One `crate::`-rooted path a file names: its segments (as far as the
/// reference spells them, from the crate root) and the line.
#[derive(Debug, Clone)]
struct Reference {
    target: Vec<String>,
    line: usize,
}

/// The file's text with comments, string literals and character literals
/// blanked (newlines kept, so offsets keep their lines).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && next == Some('r')))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
            && raw_string_start(&chars, i + usize::from(c == 'b') + 1).is_some()
        {
            let start = i + usize::from(c == 'b') + 1;
            let hashes = raw_string_start(&chars, start).unwrap();
            let mut j = start + hashes + 1;
            while j < chars.len() {
                if chars[j] == '"'
                    && chars[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|h| **h == '#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend(chars[i..j.min(chars.len())].iter().map(|c| blank(*c)));
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), or a lifetime.
            let end = if next == Some('\\') {
                chars
                    .get(i + 3..)
                    .and_then(|rest| rest.iter().position(|c| *c == '\''))
                    .map(|p| i + 3 + p)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    out.extend(chars[i..=end].iter().map(|c| blank(*c)));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// At `i`, `#*"` opening a raw string: how many `#`.
fn raw_string_start(chars: &[char], i: usize) -> Option<usize> {
    let hashes = chars[i.min(chars.len())..]
        .iter()
        .take_while(|c| **c == '#')
        .count();
    (chars.get(i + hashes) == Some(&'"')).then_some(hashes)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The `crate::` and `super::` paths of one file whose module path is `module`.
fn references(code: &str, module: &[String]) -> Vec<Reference> {
    let chars: Vec<char> = code.chars().collect();
    let line_at = |at: usize| chars[..at].iter().filter(|c| **c == '\n').count() + 1;
    // Inline modules: (where the body opens, where it closes, name).
    let mut inline = Vec::new();
    let mut opened: Vec<(usize, Option<String>)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '{' => {
                let name = inline_mod_name(&chars, i);
                opened.push((i, name));
            }
            '}' => {
                if let Some((start, Some(name))) = opened.pop() {
                    inline.push((start, i, name));
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let word_start = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == '$');
        let starts = |w: &str| chars[i..].iter().take(w.len()).copied().eq(w.chars());
        if !(word_start && (starts("crate::") || starts("$crate::") || starts("super::"))) {
            i += 1;
            continue;
        }
        let at = i;
        let mut base: Vec<String> = if starts("super::") {
            let mut here: Vec<String> = module.to_vec();
            let mut nested: Vec<&(usize, usize, String)> = inline
                .iter()
                .filter(|(open, close, _)| *open < at && at < *close)
                .collect();
            nested.sort_by_key(|(open, _, _)| *open);
            here.extend(nested.iter().map(|(_, _, name)| name.clone()));
            while chars[i..].iter().take(7).copied().eq("super::".chars()) {
                here.pop();
                i += 7;
            }
            here
        } else {
            i += if chars[i] == '$' { 8 } else { 7 };
            Vec::new()
        };
        let mut targets = Vec::new();
        i = path_tail(&chars, i, &mut base, &mut targets);
        let line = line_at(at);
        found.extend(targets.into_iter().map(|target| Reference { target, line }));
    }
    found
}

/// The name of the inline module whose body opens at `brace`, if it is one.
fn inline_mod_name(chars: &[char], brace: usize) -> Option<String> {
    let before: String = chars[..brace].iter().collect();
    let before = before.trim_end();
    let name_start = before.rfind(|c: char| !is_ident(c)).map_or(0, |p| p + 1);
    let name = &before[name_start..];
    let keyword = before[..name_start].trim_end();
    (!name.is_empty() && keyword.ends_with("mod") && {
        let k = &keyword[..keyword.len() - 3];
        k.is_empty() || !k.ends_with(is_ident)
    })
    .then(|| name.to_string())
}

/// Reads `a::b::{c, d::e}` from `i` on, appending to `prefix`; every complete
/// path goes to `out`. Returns where the path ends.
fn path_tail(
    chars: &[char],
    mut i: usize,
    prefix: &mut Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        if chars.get(i) == Some(&'{') {
            i += 1;
            loop {
                while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    i += 1;
                }
                match chars.get(i) {
                    None => return i,
                    Some('}') => return i + 1,
                    _ => {}
                }
                let mut item = prefix.clone();
                let before = i;
                i = path_tail(chars, i, &mut item, out);
                // Skip `as name` and anything else up to the next item.
                while chars.get(i).is_some_and(|c| *c != ',' && *c != '}') {
                    i += 1;
                }
                if i == before {
                    i += 1;
                }
            }
        }
        let start = i;
        while chars.get(i).is_some_and(|c| is_ident(*c) || *c == '*') {
            i += 1;
        }
        if i > start {
            prefix.push(chars[start..i].iter().collect());
        }
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') && i > start {
            i += 2;
            continue;
        }
        out.push(prefix.clone());
        return i;
    }
}

/// Every `.rs` file under `src/` but `main.rs`, with its module path.
fn sources() -> Vec<(PathBuf, Vec<String>)> {
    let src = repo().join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(&src).unwrap().with_extension("");
                let mut module: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if module == ["main"] {
                    continue;
                }
                if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                    module.pop();
                }
                files.push((path, module));
            }
        }
    }
    files.sort();
    files
}

fn display(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn the_table_goes_down_only_and_names_every_module() {
    let mut below = BTreeSet::new();
    for (module, imports) in LAYERS {
        if *imports != EVERYTHING {
            for import in *imports {
                assert!(
                    below.contains(import),
                    "LAYERS: {module} may import {import}, which is not listed before it"
                );
            }
        }
        below.insert(*module);
    }
    let lib = std::fs::read_to_string(repo().join("src/lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        declared, below,
        "src/lib.rs's modules and LAYERS (tests/layers.rs) must name the same modules"
    );
}

#[test]
fn the_table_is_the_one_in_docs_architecture() {
    let doc = std::fs::read_to_string(repo().join("docs/architecture.md")).unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Layers"))
        .expect("docs/architecture.md has a Layers section");
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|n| n.trim_end_matches('/').trim_end_matches(".rs").to_string())
                .collect()
        };
        let imports = match cells.last().copied() {
            Some("everything") => BTreeSet::from(["*".to_string()]),
            Some("nothing") => BTreeSet::new(),
            Some(cell) => names(cell),
            None => continue,
        };
        for module in names(cells[0]) {
            documented.insert(module, imports.clone());
        }
    }
    let tested: BTreeMap<String, BTreeSet<String>> = LAYERS
        .iter()
        .map(|(m, i)| (m.to_string(), i.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(
        documented, tested,
        "the layer table of docs/architecture.md (left) and LAYERS in tests/layers.rs (right) differ"
    );
}

#[test]
fn imports_go_down_only() {
    let mut violations = Vec::new();
    for (path, module) in sources() {
        let Some(top) = module.first() else { continue };
        let Some(may) = allowed(top) else {
            violations.push(format!(
                "{}: module `{top}` is not in LAYERS (tests/layers.rs) nor in docs/architecture.md",
                display(&path)
            ));
            continue;
        };
        let code = code_only(&std::fs::read_to_string(&path).unwrap());
        for reference in references(&code, &module) {
            let Some(target) = reference.target.first() else {
                continue;
            };
            if target == top || !LAYERS.iter().any(|(m, _)| m == target) {
                continue;
            }
            if !may.contains(target.as_str()) {
                violations.push(format!(
                    "{}:{}: `{top}` imports `{target}` (crate::{}); docs/architecture.md (Layers) lets `{top}` import only: {}",
                    display(&path),
                    reference.line,
                    reference.target.join("::"),
                    may.iter().copied().collect::<Vec<_>>().join(", "),
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layer order:\n{}",
        violations.join("\n")
    );
}

/// Imports between the children of one module: (from, to) -> the first file
/// and line that makes it.
type SiblingEdges = BTreeMap<(String, String), (String, usize)>;

#[test]
fn sibling_modules_do_not_import_each_other_in_a_cycle() {
    // Edges between the children of one module (by file), at every depth.
    let mut edges: BTreeMap<Vec<String>, SiblingEdges> = BTreeMap::new();
    for (path, module) in sources() {
        let code = code_only(&std::fs::read_to_string(&path).unwrap());
        for reference in references(&code, &module) {
            let target = &reference.target;
            let common = module
                .iter()
                .zip(target)
                .take_while(|(a, b)| a == b)
                .count();
            if common < module.len().min(target.len()) && common >= 1 {
                let parent = module[..common].to_vec();
                edges
                    .entry(parent)
                    .or_default()
                    .entry((module[common].clone(), target[common].clone()))
                    .or_insert((display(&path), reference.line));
            }
        }
    }
    let mut cycles = Vec::new();
    for (parent, edges) in &edges {
        let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (from, to) in edges.keys() {
            next.entry(from).or_default().push(to);
        }
        let mut reported: BTreeSet<BTreeSet<&str>> = BTreeSet::new();
        // A child on a cycle reaches itself: walk breadth-first from each,
        // remembering the way, and print the cycle with each import's place.
        for start in next.keys().copied() {
            let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut closing = None;
            while let Some(at) = queue.pop_front() {
                for to in next.get(at).into_iter().flatten().copied() {
                    if to == start {
                        closing = Some(at);
                        break;
                    }
                    if !came_from.contains_key(to) {
                        came_from.insert(to, at);
                        queue.push_back(to);
                    }
                }
                if closing.is_some() {
                    break;
                }
            }
            let Some(last) = closing else { continue };
            let mut path = vec![start, last];
            let mut at = last;
            while at != start {
                at = came_from[at];
                path.push(at);
            }
            path.reverse(); // start, ..., last, start
            if !reported.insert(path.iter().copied().collect()) {
                continue;
            }
            let steps: Vec<String> = path
                .windows(2)
                .map(|w| {
                    let (file, line) = &edges[&(w[0].to_string(), w[1].to_string())];
                    format!("{} -> {} ({file}:{line})", w[0], w[1])
                })
                .collect();
            cycles.push(format!(
                "modules of `{}` import each other in a cycle: {}",
                parent.join("::"),
                steps.join(", ")
            ));
        }
    }
    assert!(cycles.is_empty(), "{}", cycles.join("\n"));
}

#[test]
fn the_scanner_reads_groups_supers_and_skips_comments_and_strings() {
    let module: Vec<String> = vec!["grpc".into(), "agent_status".into()];
    let code = code_only(
        r##"
use crate::{domain::agent::{Event, Labels}, error};
// use crate::http::Nothing;
/* use crate::cli::Nothing; */
const S: &str = "crate::views::Nothing";
const R: &str = r#"crate::views::Nothing"#;
fn f<'a>(c: char) -> bool { c == '{' || c == '\'' || c == '\u{7b}' }
pub(crate) fn g() -> super::super::metrics::Metrics { todo!() }
mod tests {
    use super::super::codec::FrameStream;
    use crate::storage::memory::*;
}
"##,
    );
    let found: Vec<(String, usize)> = references(&code, &module)
        .into_iter()
        .map(|r| (r.target.join("::"), r.line))
        .collect();
    assert_eq!(
        found,
        [
            ("domain::agent::Event".to_string(), 2),
            ("domain::agent::Labels".to_string(), 2),
            ("error".to_string(), 2),
            ("metrics::Metrics".to_string(), 8),
            ("grpc::codec::FrameStream".to_string(), 10),
            ("storage::memory::*".to_string(), 11),
        ]
    );
}
