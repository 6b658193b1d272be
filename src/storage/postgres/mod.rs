//! The Postgres store.

mod agents;
mod changes;
pub mod copy;
mod healing;
mod pipeline;
mod post_healing;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::storage::clock::at_micros;
use crate::storage::pool::TimedPool;
use crate::storage::{StoreLocation, StoreOptions};

/// Channel on which committed transitions are announced to other replicas.
const TRANSITIONS_CHANNEL: &str = "fleetcare_transitions";

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The Postgres implementation of every store trait.
#[derive(Clone)]
pub struct PgStore {
    pool: TimedPool<sqlx::Postgres>,
    changes: watch::Sender<u64>,
    /// The committer's own connections, idle ones (see `try_commit`):
    /// one per batch in flight, opened when a batch finds none idle. A pool
    /// acquire (with its liveness ping) per batch costs more than the batch.
    batch_conns: std::sync::Arc<std::sync::Mutex<Vec<sqlx::PgConnection>>>,
    /// This store's NOTIFY payload. The committer hands what this process
    /// commits to the fan-out itself, so the listener skips its own notifications.
    origin: std::sync::Arc<str>,
    /// [`StoreOptions::clock`]: `None` is the database's `now()`.
    clock: Option<crate::storage::Clock>,
}

impl PgStore {
    /// Connects (creating the database if needed), applies migrations, and starts
    /// listening for transitions committed by other replicas until `shutdown`.
    pub async fn connect(
        options: &StoreOptions,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let pool = connect_and_migrate(options).await?;
        let (changes, _) = watch::channel(0);
        let origin: std::sync::Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        changes::spawn_listener(pool.clone(), changes.clone(), origin.clone(), shutdown);
        Ok(PgStore {
            pool: TimedPool::new(pool),
            changes,
            batch_conns: Default::default(),
            origin,
            clock: options.clock.clone(),
        })
    }

    /// The clock set in [`StoreOptions::clock`], read now, at the database's
    /// precision (microseconds); `None` when the store runs on the
    /// database's own `now()`. What SQL binds in place of `now()`.
    pub(crate) fn set_now(&self) -> Option<DateTime<Utc>> {
        self.clock.as_ref().map(|clock| at_micros(clock.now()))
    }

    /// The store's clock, once per call: the clock set in
    /// [`StoreOptions::clock`], else the database's `now()` (the
    /// transaction's start, one clock for every replica).
    pub(crate) async fn now_in(
        &self,
        conn: &mut sqlx::PgConnection,
    ) -> Result<DateTime<Utc>, Error> {
        match self.set_now() {
            Some(now) => Ok(now),
            None => sqlx::query_scalar("SELECT now()")
                .fetch_one(conn)
                .await
                .map_err(db_error),
        }
    }

    pub fn pool(&self) -> &PgPool {
        self.pool.inner()
    }
}

/// Creates the database if it does not exist, opens a pool and applies the
/// embedded migrations (sqlx serialises concurrent migrators with an advisory lock).
pub async fn connect_and_migrate(store: &StoreOptions) -> Result<PgPool, Error> {
    let url = match &store.location {
        StoreLocation::Postgres(url) => url,
        other => {
            return Err(Error::invalid(format!(
                "not a Postgres URL: {}",
                other.url()
            )));
        }
    };
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::invalid(format!("invalid --database-url: {e}")))?;
    create_database_if_missing(&options).await?;
    // sqlx prepares every query once per connection, and after five executions
    // Postgres may switch a prepared statement to a generic plan, made on the
    // statistics of that moment and kept until the table is next analyzed.
    // Made while the tables were small (a new database, a fleet growing
    // faster than autovacuum analyzes), such a plan scans every agent: the
    // heartbeat flush and ListAgents took 13 to 33 ms at 100,000 agents on
    // connections that had run them on an empty database, against 0.1 ms
    // planned for their parameters. Planning every execution costs about
    // 50 us per query (docs/operations.md, Stores). The committer's own connection
    // chooses its plans itself (see `try_commit`). A `SET` after
    // connecting rather than a startup option: PgBouncer refuses startup
    // options it was not told to ignore.
    let pool = PgPoolOptions::new()
        .max_connections(store.max_connections)
        .acquire_timeout(store.acquire_timeout)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET plan_cache_mode = force_custom_plan")
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .connect_with(options)
        .await
        .map_err(db_error)?;
    MIGRATOR.run(&pool).await.map_err(migrate_error)?;
    Ok(pool)
}

/// Migrations cut off by a lost connection are the database being
/// unreachable, which the server waits out and retries (each migration is
/// one transaction, and those applied are recorded); any other failure is
/// final.
fn migrate_error(err: sqlx::migrate::MigrateError) -> Error {
    use sqlx::migrate::MigrateError as M;
    let message = err.to_string();
    match err {
        M::Execute(e) | M::ExecuteMigration(e, _) => match db_error(e) {
            Error::Unavailable(_) => {
                Error::Unavailable(format!("migrations interrupted: {message}"))
            }
            _ => Error::Internal(format!("migrations failed: {message}")),
        },
        _ => Error::Internal(format!("migrations failed: {message}")),
    }
}

async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), Error> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(db_error)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(db_error)?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another replica created it first.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(db_error(e)),
        }
    }
    Ok(())
}

/// What a client is told while the database refuses writes.
pub(crate) const READ_ONLY: &str = "database is read-only (a standby in recovery?)";

/// Maps a database error to what it means for the client, in one place.
/// Callers that expect a specific constraint violation match it before this.
pub(crate) fn db_error(err: sqlx::Error) -> Error {
    crate::storage::sql_error::map(err, "database unreachable", |db, _| {
        let code = db.code().unwrap_or_default();
        match code.as_ref() {
            // serialization failure, deadlock: the client may simply retry.
            "40001" => Some(Error::Conflict("serialization failure".into())),
            "40P01" => Some(Error::Conflict("deadlock detected".into())),
            // connection exceptions, admin shutdown, cannot connect now.
            c if c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03" => {
                Some(Error::Unavailable(format!("database unavailable ({code})")))
            }
            "53300" => Some(Error::Unavailable(
                "database has too many connections".into(),
            )),
            // read_only_sql_transaction: a standby in recovery (or a server
            // set read-only) behind the address; a failover may end it.
            "25006" => Some(Error::Unavailable(READ_ONLY.into())),
            _ => None,
        }
    })
}

/// How long the listener waits before reconnecting after a failure.
const LISTENER_RETRY: Duration = Duration::from_secs(1);
