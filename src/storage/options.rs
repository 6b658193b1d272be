//! Where a store is and how to reach it: what [`crate::storage::Stores::open`]
//! takes. The command line's flags (`config::DatabaseArgs`) convert into these;
//! the store knows nothing of clap.

use std::path::PathBuf;
use std::time::Duration;

use crate::storage::clock::Clock;

/// Which store a configuration selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A Postgres URL.
    Postgres(String),
    /// The path of an SQLite database file.
    Sqlite(PathBuf),
}

impl StoreLocation {
    /// Reads a store URL: `postgres://` or `postgresql://`, `sqlite://PATH`
    /// (or `sqlite:PATH`; query parameters are not accepted).
    pub fn parse(url: &str) -> Result<StoreLocation, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(url.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() || path.contains('?') || path == ":memory:" {
                return Err(format!(
                    "invalid database URL {url:?}: sqlite URLs name a file, as sqlite://PATH"
                ));
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        Err(format!(
            "invalid database URL {url:?}: expected postgres://... or sqlite://PATH"
        ))
    }

    /// The location as a URL that [`StoreLocation::parse`] reads back.
    pub fn url(&self) -> String {
        match self {
            StoreLocation::Postgres(url) => url.clone(),
            StoreLocation::Sqlite(path) => format!("sqlite://{}", path.display()),
        }
    }
}

/// How to open a store: where it is, the limits of its connection pools, and
/// its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    pub location: StoreLocation,
    /// Most connections this server opens to the database (`--db-max-connections`).
    pub max_connections: u32,
    /// How long a request waits for a database connection before UNAVAILABLE
    /// (`--db-acquire-timeout`).
    pub acquire_timeout: Duration,
    /// The clock the store decides expiry with (leases, claims, the time a
    /// stat was observed) and the server stamps state changes with. `None`:
    /// the store's own (Postgres: the database's `now()`, one clock for every
    /// replica; SQLite: the system clock) and the system clock for the
    /// server. Tests set a [`Clock::manual`] to advance time instead of
    /// sleeping; it is never a flag.
    pub clock: Option<Clock>,
}

impl StoreOptions {
    /// `--db-max-connections` unless told otherwise.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 20;
    /// `--db-acquire-timeout` unless told otherwise.
    pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

    /// The store at `location`, with the default limits.
    pub fn new(location: StoreLocation) -> StoreOptions {
        StoreOptions {
            location,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: Self::DEFAULT_ACQUIRE_TIMEOUT,
            clock: None,
        }
    }

    /// These options with `clock` as the store's clock.
    pub fn with_clock(self, clock: Clock) -> StoreOptions {
        StoreOptions {
            clock: Some(clock),
            ..self
        }
    }

    /// The store at `url` (see [`StoreLocation::parse`]), with the default limits.
    pub fn for_url(url: &str) -> Result<StoreOptions, String> {
        StoreLocation::parse(url).map(StoreOptions::new)
    }
}
