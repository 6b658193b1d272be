//! A store's connection pool, timed where it hands out connections: every
//! query on the pool (`.fetch_all(&pool)`, `.execute(&pool)`, ...), every
//! `begin` and every `acquire` goes through [`TimedPool::acquire`], which
//! observes how long getting a connection took (waiting for a free one,
//! opening one, its liveness check) and counts the waits that ran out at
//! `--db-acquire-timeout`. sqlx measures neither, so it is done here, once,
//! for both backends; the call sites are the ones a plain `Pool` has.
//!
//! The occupancy (in use, idle) is read from the pool at scrape time
//! ([`PoolStats`], through `AgentStore::pool_stats`).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use sqlx::pool::{Pool, PoolConnection, PoolOptions};
use sqlx::{Connection, Database, Describe, Either, Error, Execute, Executor, Transaction};

/// Where one pool's acquisitions are recorded: its series of
/// `fleetcare_db_acquire_duration_seconds` and `fleetcare_db_acquire_timeouts_total`.
#[derive(Clone, Debug)]
pub struct AcquireMetrics {
    pub duration: Histogram,
    pub timeouts: Counter,
}

/// One database connection pool's occupancy, read at scrape time.
#[derive(Clone, Copy, Debug)]
pub struct PoolStats {
    pub pool: &'static str,
    /// Connections open (in use and idle).
    pub size: u32,
    pub idle: usize,
    /// The most it may open.
    pub max: u32,
}

/// A `sqlx::Pool` whose acquisitions are timed (see the module documentation).
/// Clones share the pool and the metrics.
pub struct TimedPool<DB: Database> {
    pool: Pool<DB>,
    /// Set once the server's registry is known (the store opens first).
    metrics: Arc<OnceLock<AcquireMetrics>>,
}

impl<DB: Database> Clone for TimedPool<DB> {
    fn clone(&self) -> Self {
        TimedPool {
            pool: self.pool.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<DB: Database> std::fmt::Debug for TimedPool<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedPool")
            .field("size", &self.pool.size())
            .field("idle", &self.pool.num_idle())
            .finish()
    }
}

impl<DB: Database> TimedPool<DB> {
    pub fn new(pool: Pool<DB>) -> Self {
        TimedPool {
            pool,
            metrics: Arc::default(),
        }
    }

    /// Records this pool's acquisitions from now on (the first call wins).
    pub fn observe(&self, metrics: AcquireMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// A connection from the pool, timed.
    pub async fn acquire(&self) -> Result<PoolConnection<DB>, Error> {
        let started = Instant::now();
        let acquired = self.pool.acquire().await;
        if let Some(metrics) = self.metrics.get() {
            metrics.duration.observe(started.elapsed().as_secs_f64());
            if matches!(acquired, Err(Error::PoolTimedOut)) {
                metrics.timeouts.inc();
            }
        }
        acquired
    }

    /// A transaction on a connection from the pool (as `Pool::begin`).
    pub async fn begin(&self) -> Result<Transaction<'static, DB>, Error> {
        Transaction::begin(self.acquire().await?, None).await
    }

    /// A transaction opened with `statement` (as `Pool::begin_with`).
    pub async fn begin_with(
        &self,
        statement: impl Into<Cow<'static, str>>,
    ) -> Result<Transaction<'static, DB>, Error> {
        Transaction::begin(self.acquire().await?, Some(statement.into())).await
    }

    /// The pool itself, for what is not a query: migrations, a listener's
    /// own connection.
    pub fn inner(&self) -> &Pool<DB> {
        &self.pool
    }

    /// This pool's occupancy, under the name `pool`.
    pub fn stats(&self, pool: &'static str) -> PoolStats {
        PoolStats {
            pool,
            size: self.size(),
            idle: self.num_idle(),
            max: self.options().get_max_connections(),
        }
    }

    pub fn size(&self) -> u32 {
        self.pool.size()
    }

    pub fn num_idle(&self) -> usize {
        self.pool.num_idle()
    }

    pub fn options(&self) -> &PoolOptions<DB> {
        self.pool.options()
    }

    pub fn connect_options(&self) -> Arc<<DB::Connection as Connection>::Options> {
        self.pool.connect_options()
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}

// As sqlx's own `Executor for &Pool`, with the acquisition timed.
impl<'p, DB: Database> Executor<'p> for &'_ TimedPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<DB::QueryResult, DB::Row>, Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        let pool = self.clone();
        Box::pin(async_stream::try_stream! {
            let mut conn = pool.acquire().await?;
            let mut rows = conn.fetch_many(query);
            while let Some(row) = rows.try_next().await? {
                yield row;
            }
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, Error>>
    where
        E: 'q + Execute<'q, DB>,
    {
        let pool = self.clone();
        Box::pin(async move { pool.acquire().await?.fetch_optional(query).await })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, Error>> {
        let pool = self.clone();
        Box::pin(async move { pool.acquire().await?.prepare_with(sql, parameters).await })
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<DB>, Error>> {
        let pool = self.clone();
        Box::pin(async move { pool.acquire().await?.describe(sql).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::exponential_buckets;
    use sqlx::sqlite::SqlitePoolOptions;

    #[tokio::test]
    async fn every_query_and_transaction_is_timed_and_a_wait_that_runs_out_counts() {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_millis(50))
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let pool = TimedPool::new(pool);
        let metrics = AcquireMetrics {
            duration: Histogram::new(exponential_buckets(0.0001, 2.0, 8)),
            timeouts: Counter::default(),
        };
        pool.observe(metrics.clone());
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1);
        sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        let tx = pool.begin().await.unwrap();
        // The only connection is in the transaction: the next wait runs out.
        let waited = sqlx::query("SELECT 1").execute(&pool).await.unwrap_err();
        assert!(matches!(waited, Error::PoolTimedOut), "{waited}");
        tx.commit().await.unwrap();
        let mut encoded = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("acquire", "", metrics.duration.clone());
        registry.register("timeouts", "", metrics.timeouts.clone());
        prometheus_client::encoding::text::encode(&mut encoded, &registry).unwrap();
        assert!(encoded.contains("acquire_count 4"), "{encoded}");
        assert!(encoded.contains("timeouts_total 1"), "{encoded}");
    }
}
