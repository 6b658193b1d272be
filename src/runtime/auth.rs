//! The callers this server knows: the auth file's table (or, without one, the
//! anonymous operator), swapped atomically when the file changes.
//!
//! The file is polled (every [`RELOAD_INTERVAL`]) and re-read when its bytes
//! changed; a version that does not parse is logged and the previous table
//! kept, so a typo never locks everyone out. At start-up an unreadable or
//! invalid file is an error (naming the line).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio_util::sync::CancellationToken;

use crate::domain::auth::{self, Caller, CallerTable, TokenDigest};
use crate::error::Error;

/// How often the auth file is looked at for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

enum Table {
    /// No auth file: every caller is the anonymous operator.
    Open(Arc<Caller>),
    File(Vec<(TokenDigest, Arc<Caller>)>),
}

/// The current caller table, shared by every connection.
pub struct Callers {
    table: RwLock<Arc<Table>>,
}

impl Callers {
    /// Without an auth file.
    pub fn open() -> Arc<Callers> {
        Arc::new(Callers {
            table: RwLock::new(Arc::new(Table::Open(Arc::new(Caller::anonymous())))),
        })
    }

    /// From an auth file, re-read whenever its content changes (checked every
    /// `interval`) until `shutdown`. An error names the file and the line.
    pub fn watch(
        path: &Path,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<Arc<Callers>, Error> {
        let (callers, loaded) = Callers::load(path)?;
        callers.spawn_reload(path.to_owned(), loaded, interval, shutdown);
        Ok(callers)
    }

    /// From an auth file, and the bytes it was read from.
    fn load(path: &Path) -> Result<(Arc<Callers>, Vec<u8>), Error> {
        let (bytes, text) =
            super::file_watch::read("auth file", path).map_err(Error::InvalidArgument)?;
        let table = auth::parse_auth_file(&text)
            .map_err(|e| Error::InvalidArgument(format!("auth file {}: {e}", path.display())))?;
        tracing::info!(path = %path.display(), callers = table.callers.len(), "auth file loaded");
        let callers = Arc::new(Callers {
            table: RwLock::new(Arc::new(file_table(table))),
        });
        Ok((callers, bytes))
    }

    /// Whether calls need a token.
    pub fn required(&self) -> bool {
        matches!(*self.current(), Table::File(_))
    }

    fn current(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, table: CallerTable) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(file_table(table));
    }

    /// The caller an `authorization` header value names. Every caller's digest
    /// is compared, in constant time, so the time taken says nothing about
    /// which caller (if any) matched or how much of a digest did.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Caller>, Error> {
        let table = self.current();
        let callers = match &*table {
            Table::Open(anonymous) => return Ok(anonymous.clone()),
            Table::File(callers) => callers,
        };
        let header = authorization.ok_or_else(|| {
            Error::Unauthenticated(
                "a bearer token is required: send the metadata `authorization: Bearer <token>`"
                    .into(),
            )
        })?;
        let token = bearer(header).ok_or_else(|| {
            Error::Unauthenticated(
                "malformed authorization metadata: expected `Bearer <token>`".into(),
            )
        })?;
        let digest = auth::token_digest(token);
        let mut index = u64::MAX;
        for (i, (known, _)) in callers.iter().enumerate() {
            index.conditional_assign(&(i as u64), known.ct_eq(&digest));
        }
        usize::try_from(index)
            .ok()
            .and_then(|i| callers.get(i))
            .map(|(_, caller)| caller.clone())
            .ok_or_else(|| Error::Unauthenticated("unknown bearer token".into()))
    }

    /// Re-reads `path` whenever its content differs from `loaded`, until `shutdown`.
    fn spawn_reload(
        self: &Arc<Self>,
        path: PathBuf,
        loaded: Vec<u8>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let callers = self.clone();
        super::file_watch::spawn_reload("auth", path, loaded, interval, shutdown, move |text| {
            let table = auth::parse_auth_file(text)?;
            let count = table.callers.len();
            callers.replace(table);
            Ok(format!("{count} callers"))
        });
    }
}

fn file_table(table: CallerTable) -> Table {
    Table::File(
        table
            .callers
            .into_iter()
            .map(|(digest, caller)| (digest, Arc::new(caller)))
            .collect(),
    )
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 7235).
fn bearer(header: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &str) -> Arc<Callers> {
        let callers = Callers::open();
        callers.replace(auth::parse_auth_file(entries).unwrap());
        callers
    }

    fn entry(name: &str, token: &str) -> String {
        auth::caller_entry(name, auth::Role::Reader, &auth::token_digest(token), &[])
    }

    #[test]
    fn a_known_token_names_its_caller_and_anything_else_is_unauthenticated() {
        let callers = table(&format!("{}{}", entry("a", "ta"), entry("b", "tb")));
        assert!(callers.required());
        let who = |h: Option<&str>| {
            callers
                .authenticate(h.map(str::as_bytes))
                .map(|c| c.name.clone())
        };
        assert_eq!(who(Some("Bearer ta")).unwrap(), "a");
        assert_eq!(who(Some("bearer  tb ")).unwrap(), "b");
        for bad in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic ta"),
            Some("ta"),
            Some("Bearer garbage"),
        ] {
            assert!(
                matches!(who(bad), Err(Error::Unauthenticated(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn without_an_auth_file_everyone_is_the_anonymous_operator() {
        let callers = Callers::open();
        assert!(!callers.required());
        let caller = callers.authenticate(None).unwrap();
        assert_eq!(
            (caller.name.as_str(), caller.role),
            (auth::ANONYMOUS, auth::Role::Operator)
        );
    }

    #[tokio::test]
    async fn the_file_is_reloaded_on_change_and_a_broken_version_keeps_the_old_table() {
        let dir = std::env::temp_dir().join(format!("fleetcare-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.toml");
        std::fs::write(&path, entry("a", "ta")).unwrap();
        let shutdown = CancellationToken::new();
        let callers = Callers::watch(&path, Duration::from_millis(10), shutdown.clone()).unwrap();
        let known = |token: &str| {
            callers
                .authenticate(Some(format!("Bearer {token}").as_bytes()))
                .is_ok()
        };
        std::fs::write(&path, format!("{}{}", entry("a", "ta"), entry("b", "tb"))).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !known("tb") {
            assert!(tokio::time::Instant::now() < deadline, "reload not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::write(&path, "[[caller]\nbroken").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            known("ta") && known("tb"),
            "a broken file must keep the old table"
        );
        shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_invalid_file_at_start_is_an_error_naming_the_line() {
        let dir = std::env::temp_dir().join(format!("fleetcare-auth-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.toml");
        std::fs::write(&path, "\n[[caller]]\nname = \"x\"\nrole = \"king\"\n").unwrap();
        let error = Callers::load(&path).err().unwrap().to_string();
        assert!(error.contains("line 4"), "{error}");
        let missing = Callers::load(&dir.join("none.toml"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("cannot read auth file"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
