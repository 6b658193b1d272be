//! Finds session files under the root: `<root>/<user>/<session>.jsonl`, and
//! the files in folders below a user's (a sub-agent's transcript:
//! `<root>/<user>/<session>/subagents/agent-*.jsonl`), down to
//! [`MAX_SESSION_DEPTH`]; hidden files and folders are passed over.
//!
//! Only regular files are taken. Symlinks are never followed (so none can lead
//! outside the root), and user directories with names that are not valid agent
//! ids are passed over; both are reported.

use std::fs;
use std::path::Path;

use crate::domain::pipeline::{MAX_SESSION_DEPTH, SessionFile, valid_path_segment, valid_user_dir};

#[derive(Debug, Default)]
pub struct Scan {
    /// Sorted by path.
    pub files: Vec<SessionFile>,
    pub skipped: Vec<String>,
    pub root_error: Option<String>,
}

/// Blocking: run it on a blocking thread.
pub fn scan(root: &Path) -> Scan {
    let mut scan = Scan::default();
    let users = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) => {
            scan.root_error = Some(format!("cannot read session root {}: {e}", root.display()));
            return scan;
        }
    };
    for entry in users.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            scan.skipped
                .push(format!("{:?}: name is not UTF-8", entry.file_name()));
            continue;
        };
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_symlink() {
            scan.skipped.push(format!("{name}: symlink, not followed"));
            continue;
        }
        if !kind.is_dir() {
            continue;
        }
        if !valid_user_dir(&name) {
            scan.skipped.push(format!(
                "{name}: not a valid user directory name (1 to 128 of A-Z a-z 0-9 . _ -, no leading dot)"
            ));
            continue;
        }
        scan_user(&entry.path(), &name, &mut scan);
    }
    scan.files.sort_by(|a, b| a.path.cmp(&b.path));
    scan
}

fn scan_user(dir: &Path, user: &str, scan: &mut Scan) {
    scan_folder(dir, user, "", 0, scan);
}

/// The session files of one folder of a user's (`rel`: its path below the
/// user's folder, empty or ending in `/`), and of the folders below it down
/// to [`MAX_SESSION_DEPTH`].
fn scan_folder(dir: &Path, user: &str, rel: &str, depth: usize, scan: &mut Scan) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            scan.skipped.push(format!("{user}/{rel}: cannot read: {e}"));
            return;
        }
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            scan.skipped.push(format!(
                "{user}/{rel}{:?}: name is not UTF-8",
                entry.file_name()
            ));
            continue;
        };
        if !valid_path_segment(&name) {
            continue;
        }
        // DirEntry::metadata does not follow symlinks.
        let Ok(meta) = entry.metadata() else { continue };
        if meta.file_type().is_symlink() {
            if name.ends_with(".jsonl") || depth < MAX_SESSION_DEPTH {
                scan.skipped
                    .push(format!("{user}/{rel}{name}: symlink, not followed"));
            }
            continue;
        }
        if meta.is_dir() {
            if depth < MAX_SESSION_DEPTH {
                scan_folder(
                    &entry.path(),
                    user,
                    &format!("{rel}{name}/"),
                    depth + 1,
                    scan,
                );
            }
            continue;
        }
        let Some(stem) = name.strip_suffix(".jsonl").filter(|s| !s.is_empty()) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .unwrap_or(0);
        scan.files.push(SessionFile {
            user: user.to_owned(),
            session: format!("{rel}{stem}"),
            path: format!("{user}/{rel}{name}"),
            size: meta.len(),
            mtime_ns,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fleetcare-scan-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_regular_jsonl_files_and_reports_what_it_passes_over() {
        let root = temp_root("basic");
        fs::create_dir_all(root.join("alice")).unwrap();
        fs::create_dir_all(root.join("bad name")).unwrap();
        fs::write(root.join("alice/s1.jsonl"), "{}\n").unwrap();
        fs::write(root.join("alice/notes.txt"), "x").unwrap();
        fs::write(root.join("bad name/s.jsonl"), "{}\n").unwrap();
        let outside = temp_root("outside");
        fs::write(outside.join("secret.jsonl"), "{}\n").unwrap();
        std::os::unix::fs::symlink(
            outside.join("secret.jsonl"),
            root.join("alice/escape.jsonl"),
        )
        .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("mallory")).unwrap();

        let scan = scan(&root);
        let paths: Vec<_> = scan.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["alice/s1.jsonl"]);
        assert_eq!(scan.files[0].session, "s1");
        assert_eq!(scan.files[0].size, 3);
        assert!(scan.files[0].mtime_ns > 0);
        let skipped = scan.skipped.join("\n");
        assert!(skipped.contains("bad name"), "{skipped}");
        assert!(skipped.contains("alice/escape.jsonl: symlink"), "{skipped}");
        assert!(skipped.contains("mallory: symlink"), "{skipped}");
        assert!(scan.root_error.is_none());
    }

    #[test]
    fn a_missing_root_is_reported_not_fatal() {
        let scan = scan(Path::new("/nonexistent/fleetcare/root"));
        assert!(scan.files.is_empty());
        assert!(
            scan.root_error
                .unwrap()
                .contains("/nonexistent/fleetcare/root")
        );
    }
}
