//! The embedded store: one SQLite file, for a single server.
//!
//! The same tables and columns as Postgres (see `migrations/sqlite`), with
//! timestamps as integer microseconds. SQLite has one writer at a time: every
//! write runs on the one writer connection in `BEGIN IMMEDIATE` (taking the
//! write lock at the start, so a transaction never fails half way for want of
//! it), reads run on a pool of readers that see the last committed state (WAL).
//!
//! Durability: `journal_mode=WAL` with `synchronous=FULL`, so every commit is
//! fsynced to the WAL before it returns (with `NORMAL` a power loss could
//! drop the last commits, and a reply means durable).
//!
//! A single-node store: the process holds an exclusive lock on
//! `<file>.lock` for its lifetime, and a second server on the same file is
//! refused at start. Wake-ups for watchers are in-process (no other process
//! can write the file).
//!
//! A clean stop leaves everything in the file: once the last handle on the
//! store is gone (every writer finished), the lock on `<file>.lock` is let go,
//! the readers close, the writer runs `PRAGMA wal_checkpoint(TRUNCATE)` and
//! closes, and only then does [`SqliteStore::release_signal`] fire (the
//! server exits after it). A copy of `fleetcare.db` alone then holds every
//! acknowledged transition; after a crash the WAL still holds the last ones
//! (SQLite replays it at the next open).

mod agents;
pub mod copy;
mod healing;
mod pipeline;
mod post_healing;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::watch;

use crate::error::Error;
use crate::storage::StoreOptions;
use crate::storage::pool::TimedPool;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for SQLite's own locks (a checkpoint, a reader
/// opening) before giving up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The SQLite implementation of every store trait.
#[derive(Clone)]
pub struct SqliteStore {
    /// One connection: SQLite's single writer. `begin_write` takes it.
    writer: TimedPool<sqlx::Sqlite>,
    /// Readers (WAL: they never block the writer nor wait for it).
    readers: TimedPool<sqlx::Sqlite>,
    changes: watch::Sender<u64>,
    /// Processors running in this process (the only one on the file).
    running_processors: Arc<Mutex<HashSet<String>>>,
    path: PathBuf,
    /// Held for the store's lifetime: the single-node guarantee.
    file_lock: Arc<FileLock>,
    /// [`StoreOptions::clock`]: `None` is the system clock.
    clock: Option<crate::storage::Clock>,
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the database file at
    /// `path`, takes the single-node lock, and applies migrations.
    pub async fn open(path: &Path, store: &StoreOptions) -> Result<Self, Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Unavailable(format!(
                    "cannot create data directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let file_lock = lock_file(path)?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| Error::Internal(format!("sqlite options: {e}")))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // The writer's page cache: SQLite's default (2 MiB) holds little of
        // the usage tables' b-trees, so a first run over many sessions kept
        // re-reading their pages from the OS. 64 MiB, allocated as it fills.
        let writer_options = options
            .clone()
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "MEMORY");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(store.acquire_timeout)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(writer_options)
            .await
            .map_err(sqlite_error)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| Error::Internal(format!("migrations failed: {e}")))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(store.max_connections.max(2))
            .acquire_timeout(store.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await
            .map_err(sqlite_error)?;
        let (changes, _) = watch::channel(0);
        let (writer, readers) = (TimedPool::new(writer), TimedPool::new(readers));
        let (released_sender, released) = watch::channel(());
        Ok(SqliteStore {
            writer: writer.clone(),
            readers: readers.clone(),
            changes,
            running_processors: Default::default(),
            path: path.to_owned(),
            file_lock: Arc::new(FileLock {
                held: Some(Held {
                    file: Some(file_lock),
                    _released: released_sender,
                    writer,
                    readers,
                    path: path.to_owned(),
                }),
                released,
            }),
            clock: store.clock.clone(),
        })
    }

    /// Closes once every clone of this store is gone, the WAL is checkpointed
    /// into the file, and the file's lock is released (a server restarted in
    /// the same process can then open it).
    pub fn release_signal(&self) -> watch::Receiver<()> {
        self.file_lock.released.clone()
    }

    /// The store's clock ([`StoreOptions::clock`], else the system clock) at
    /// the store's precision (microseconds, as Postgres keeps them), so a time
    /// read back equals the time written.
    pub(crate) fn store_now(&self) -> DateTime<Utc> {
        truncate(self.clock.as_ref().map_or_else(Utc::now, |c| c.now()))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write transaction on the single writer, holding SQLite's write lock
    /// from its start. Dropped without `commit`, it rolls back.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, Error> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sqlite_error)
    }

    /// The reader pool (last committed state).
    pub(crate) fn readers(&self) -> &TimedPool<sqlx::Sqlite> {
        &self.readers
    }

    /// Wakes watchers after a commit that appended transitions.
    pub(crate) fn tick_changes(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The lock on `<file>.lock`, released when the last clone of the store drops
/// it, after the clean stop's checkpoint (see the module's notes); `released`
/// then closes, which is what [`SqliteStore::release_signal`] awaits.
struct FileLock {
    /// Taken by `drop`.
    held: Option<Held>,
    /// A receiver of `Held::released`, cloned for whoever waits.
    released: watch::Receiver<()>,
}

/// What the last handle leaves to the clean stop.
struct Held {
    /// The lock itself: let go as soon as the last handle is (a store opened
    /// again in this process, by a test or `fleetcare copy`, may open the
    /// file while this one checkpoints; SQLite's own locks keep that safe).
    file: Option<std::fs::File>,
    /// Dropped last: its receivers then see the store released.
    _released: watch::Sender<()>,
    writer: TimedPool<sqlx::Sqlite>,
    readers: TimedPool<sqlx::Sqlite>,
    path: PathBuf,
}

impl Held {
    /// Closes the readers, moves the WAL into the file and empties it, closes
    /// the writer; then drops the release signal.
    async fn close(self) {
        self.readers.close().await;
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.writer)
            .await
        {
            // (busy, pages in the WAL, pages checkpointed)
            Ok((0, _, _)) => {
                tracing::debug!(path = %self.path.display(), "wal checkpointed on stop")
            }
            Ok((busy, log, done)) => tracing::warn!(
                path = %self.path.display(), busy, log, done,
                "wal not fully checkpointed on stop"
            ),
            Err(error) => tracing::warn!(
                path = %self.path.display(), %error,
                "wal checkpoint on stop failed"
            ),
        }
        self.writer.close().await;
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        drop(held.file.take());
        // The last handle is gone, so no write is under way or to come. The
        // checkpoint needs the runtime; without one (a drop outside it) the
        // pools close as they drop, and the WAL is replayed at the next open.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(held.close());
        }
    }
}

/// Takes the exclusive lock beside the database file, or refuses: a second
/// server on the same file would be a second writer nobody coordinates.
fn lock_file(db_path: &Path) -> Result<std::fs::File, Error> {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot open lock file {}: {e}",
                lock_path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::FailedPrecondition(format!(
            "the embedded store {} is in use by another fleetcare process (it is a \
             single-node store: run one server per file, or use Postgres for replicas)",
            db_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::Unavailable(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

/// A time at the store's precision.
pub(crate) fn truncate(at: DateTime<Utc>) -> DateTime<Utc> {
    from_micros(micros(at))
}

/// A time as stored: microseconds since the Unix epoch.
pub(crate) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// A stored time.
pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A stored optional time.
pub(crate) fn from_micros_opt(us: Option<i64>) -> Option<DateTime<Utc>> {
    us.map(from_micros)
}

/// A stored time: microseconds since the epoch.
impl crate::storage::decode::StoredTime for i64 {
    fn time(self) -> DateTime<Utc> {
        from_micros(self)
    }
}

/// A date as stored: `YYYY-MM-DD`.
pub(crate) fn day_text(day: NaiveDate) -> String {
    // Written once per message: plain digits rather than a format string
    // parsed every time (the same text for years 0 to 9999).
    match day.year() {
        year @ 0..=9999 => format!("{year:04}-{:02}-{:02}", day.month(), day.day()),
        _ => day.format("%Y-%m-%d").to_string(),
    }
}

/// A stored date.
pub(crate) fn parse_day(text: &str) -> Result<NaiveDate, Error> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|e| Error::Internal(format!("stored date {text:?} unreadable: {e}")))
}

/// Whether `err` is the violation of a UNIQUE or PRIMARY KEY constraint.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Maps an SQLite error to what it means for the client, in one place.
/// Callers that expect a specific constraint violation match it before this.
pub(crate) fn sqlite_error(err: sqlx::Error) -> Error {
    crate::storage::sql_error::map(err, "database unavailable", |db, err| {
        // Primary result codes (the low byte of the extended code).
        let code = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        match code? {
            // SQLITE_BUSY, SQLITE_LOCKED: the write lock stayed taken past
            // the busy timeout.
            5 | 6 => Some(Error::Unavailable(format!("database busy ({err})"))),
            // SQLITE_FULL: the disk is full.
            13 => Some(Error::ResourceExhausted("database disk is full".into())),
            // SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY.
            10 | 14 | 8 => Some(Error::Unavailable(format!("database unavailable ({err})"))),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoreLocation;

    #[test]
    fn times_round_trip_at_microsecond_precision() {
        let t = DateTime::parse_from_rfc3339("2026-12-01T10:11:12.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let back = from_micros(micros(t));
        assert_eq!(back, truncate(t));
        assert_eq!(back.timestamp_subsec_nanos(), 123_456_000);
    }

    #[test]
    fn days_round_trip() {
        let d = NaiveDate::from_ymd_opt(2026, 2, 3).unwrap();
        assert_eq!(day_text(d), "2026-02-03");
        assert_eq!(parse_day("2026-02-03").unwrap(), d);
        assert!(parse_day("yesterday").is_err());
        // The digits written by hand are chrono's, and sort as the days do.
        for (y, m, d) in [
            (5, 1, 9),
            (999, 12, 31),
            (2026, 10, 1),
            (9999, 12, 31),
            (10000, 1, 1),
        ] {
            let day = NaiveDate::from_ymd_opt(y, m, d).unwrap();
            assert_eq!(day_text(day), day.format("%Y-%m-%d").to_string());
            assert_eq!(parse_day(&day_text(day)).unwrap(), day);
        }
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("fleetcare-lock-{}", std::process::id()));
        let path = dir.join("fleetcare.db");
        let args = StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()));
        let first = SqliteStore::open(&path, &args).await.expect("first opens");
        let second = SqliteStore::open(&path, &args).await;
        match second {
            Err(Error::FailedPrecondition(message)) => {
                assert!(
                    message.contains("in use by another fleetcare process"),
                    "{message}"
                )
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a second store opened the same file"),
        }
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
