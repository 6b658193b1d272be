//! `fleetcare copy` on Postgres: the queries of [`TableStore`].

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row as _, Transaction};

use super::{MIGRATOR, connect_and_migrate};
use crate::error::{Error, Result};
use crate::storage::copy::{
    Bound, Kind, Row, TABLES, TableSpec, TableStore, Value, about, check_source_schema, copy_error,
    insert_sql, rows_per_statement, select_sql,
};
use crate::storage::{StoreLocation, StoreOptions};

/// Most bind parameters in one Postgres statement.
const MAX_BINDS: usize = 65_535;

/// How long the target waits for other sessions' locks on its tables.
const LOCK_TIMEOUT: &str = "10s";

/// A session on a Postgres database: a `REPEATABLE READ, READ ONLY`
/// transaction on a source, one write transaction on a target.
pub struct PgTables {
    tx: Transaction<'static, Postgres>,
    name: String,
    _pool: PgPool,
}

impl PgTables {
    /// Reads `url` in one snapshot, without creating or migrating anything.
    pub async fn source(url: &str, name: &str) -> Result<PgTables> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e| Error::invalid(format!("invalid --from URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000") => {
                    Error::FailedPrecondition(format!("the source {name} does not exist"))
                }
                other => copy_error(format!("cannot connect to the source {name}"))(other),
            })?;
        let mut tx = pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(copy_error(format!("cannot read {name}")))?;
        let applied: Vec<i64> = match sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await
        {
            Ok(versions) => versions,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                return Err(Error::FailedPrecondition(format!(
                    "the source {name} is not a fleetcare store (it has no migrations)"
                )));
            }
            Err(e) => return Err(copy_error(format!("cannot read {name}"))(e)),
        };
        check_source_schema(name, &applied, &MIGRATOR)?;
        Ok(PgTables {
            tx,
            name: name.to_owned(),
            _pool: pool,
        })
    }

    /// Creates and migrates `url` if needed and opens the write transaction,
    /// with every copied table locked against other writers.
    pub async fn target(url: &str, name: &str) -> Result<PgTables> {
        let options = StoreOptions {
            max_connections: 2,
            ..StoreOptions::new(StoreLocation::Postgres(url.to_owned()))
        };
        let pool = connect_and_migrate(&options)
            .await
            .map_err(|e| about(name, e))?;
        let mut tx = pool
            .begin()
            .await
            .map_err(copy_error(format!("cannot write {name}")))?;
        sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            .execute(&mut *tx)
            .await
            .map_err(copy_error(format!("cannot write {name}")))?;
        let tables: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
        sqlx::query(&format!(
            "LOCK TABLE {} IN EXCLUSIVE MODE",
            tables.join(", ")
        ))
        .execute(&mut *tx)
        .await
        .map_err(copy_error(format!(
            "cannot lock the tables of {name} (is a server writing to it?)"
        )))?;
        Ok(PgTables {
            tx,
            name: name.to_owned(),
            _pool: pool,
        })
    }
}

/// The select list: integers and floats read at their widest.
fn select_list(table: &TableSpec) -> String {
    table
        .columns
        .iter()
        .map(|(name, kind)| match kind {
            Kind::Int => format!("{name}::int8"),
            Kind::Float => format!("{name}::float8"),
            _ => name.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Postgres's parameters: `$1`, `$2`, ...
fn param(sql: &mut String, i: usize) {
    // Writing to a String cannot fail.
    let _ = std::fmt::Write::write_fmt(sql, format_args!("${i}"));
}

fn bind<'q>(
    query: Query<'q, Postgres, PgArguments>,
    kind: Kind,
    value: &'q Value,
) -> Query<'q, Postgres, PgArguments> {
    match (kind, value) {
        (_, Value::Text(s)) => query.bind(s.as_str()),
        (_, Value::Int(n)) => query.bind(*n),
        (_, Value::Float(x)) => query.bind(*x),
        (_, Value::Bool(b)) => query.bind(*b),
        (_, Value::Json(j)) => query.bind(Json(j)),
        (_, Value::Timestamp(t)) => query.bind(*t),
        (_, Value::Date(d)) => query.bind(*d),
        (Kind::Text, Value::Null) => query.bind(None::<&str>),
        (Kind::Int, Value::Null) => query.bind(None::<i64>),
        (Kind::Float, Value::Null) => query.bind(None::<f64>),
        (Kind::Bool, Value::Null) => query.bind(None::<bool>),
        (Kind::Json, Value::Null) => query.bind(None::<Json<serde_json::Value>>),
        (Kind::Timestamp, Value::Null) => query.bind(None::<DateTime<Utc>>),
        (Kind::Date, Value::Null) => query.bind(None::<NaiveDate>),
    }
}

fn decode(table: &TableSpec, row: &PgRow) -> Result<Row> {
    let mut values = Vec::with_capacity(table.columns.len());
    for (i, (column, kind)) in table.columns.iter().enumerate() {
        let value = match kind {
            Kind::Text => row
                .try_get::<Option<String>, _>(i)
                .map(|v| v.map(Value::Text)),
            Kind::Int => row.try_get::<Option<i64>, _>(i).map(|v| v.map(Value::Int)),
            Kind::Float => row
                .try_get::<Option<f64>, _>(i)
                .map(|v| v.map(Value::Float)),
            Kind::Bool => row
                .try_get::<Option<bool>, _>(i)
                .map(|v| v.map(Value::Bool)),
            Kind::Json => row
                .try_get::<Option<serde_json::Value>, _>(i)
                .map(|v| v.map(Value::Json)),
            Kind::Timestamp => row
                .try_get::<Option<DateTime<Utc>>, _>(i)
                .map(|v| v.map(Value::Timestamp)),
            Kind::Date => row
                .try_get::<Option<NaiveDate>, _>(i)
                .map(|v| v.map(Value::Date)),
        }
        .map_err(copy_error(format!("reading {}.{column}", table.name)))?;
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(values)
}

#[async_trait]
impl TableStore for PgTables {
    async fn count(&mut self, table: &TableSpec) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", table.name))
            .fetch_one(&mut *self.tx)
            .await
            .map_err(copy_error(format!(
                "counting {} in {}",
                table.name, self.name
            )))?;
        Ok(n as u64)
    }

    async fn read(
        &mut self,
        table: &TableSpec,
        bound: Bound<'_>,
        limit: Option<usize>,
    ) -> Result<Vec<Row>> {
        let (sql, key) = select_sql(table, &select_list(table), bound, limit, param);
        let mut query = sqlx::query(&sql);
        for ((_, kind), value) in table.key_columns().into_iter().zip(key) {
            query = bind(query, kind, value);
        }
        let rows = query
            .fetch_all(&mut *self.tx)
            .await
            .map_err(copy_error(format!(
                "reading {} from {}",
                table.name, self.name
            )))?;
        rows.iter().map(|row| decode(table, row)).collect()
    }

    async fn write(&mut self, table: &TableSpec, rows: &[Row]) -> Result<()> {
        let width = table.columns.len();
        let per_statement = rows_per_statement(MAX_BINDS, width, rows.len());
        for chunk in rows.chunks(per_statement) {
            let sql = insert_sql(table, chunk.len(), param);
            let mut query = sqlx::query(&sql);
            for row in chunk {
                for ((_, kind), value) in table.columns.iter().zip(row) {
                    query = bind(query, *kind, value);
                }
            }
            query
                .execute(&mut *self.tx)
                .await
                .map_err(copy_error(format!(
                    "writing {} into {}",
                    table.name, self.name
                )))?;
        }
        Ok(())
    }

    async fn clear(&mut self, table: &TableSpec) -> Result<()> {
        sqlx::query(&format!("DELETE FROM {}", table.name))
            .execute(&mut *self.tx)
            .await
            .map_err(copy_error(format!(
                "clearing {} in {}",
                table.name, self.name
            )))?;
        Ok(())
    }

    async fn finish_writes(&mut self) -> Result<()> {
        for table in TABLES {
            let Some(column) = table.serial else { continue };
            let name = table.name;
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{name}', '{column}'), \
                 COALESCE(max({column}), 1), max({column}) IS NOT NULL) FROM {name}"
            ))
            .execute(&mut *self.tx)
            .await
            .map_err(copy_error(format!(
                "resetting the sequence of {name}.{column} in {}",
                self.name
            )))?;
        }
        // The brakes' census, counted from the copied agents.
        sqlx::query(
            "INSERT INTO agent_census (label_key, label_value, agents, offline, exhausted)
             SELECT p.k, p.v, count(*), count(*) FILTER (WHERE a.status = 'OFFLINE'),
                    count(*) FILTER (WHERE a.status = 'EXHAUSTED')
             FROM agents a
             CROSS JOIN LATERAL (SELECT '' AS k, '' AS v
                                 UNION ALL
                                 SELECT key, value FROM jsonb_each_text(a.labels)) p
             GROUP BY p.k, p.v",
        )
        .execute(&mut *self.tx)
        .await
        .map_err(copy_error(format!("counting the census in {}", self.name)))?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let name = self.name;
        self.tx
            .commit()
            .await
            .map_err(copy_error(format!("committing {name}")))
    }
}
