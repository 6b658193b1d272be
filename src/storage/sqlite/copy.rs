//! `fleetcare copy` on the embedded store: the queries of [`TableStore`].

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{Row as _, Sqlite, SqlitePool, Transaction};

use super::{
    BUSY_TIMEOUT, MIGRATOR, SqliteStore, day_text, from_micros, lock_file, micros, parse_day,
};
use crate::error::{Error, Result};
use crate::storage::copy::{
    Bound, Kind, Row, TableSpec, TableStore, Value, about, check_source_schema, copy_error,
    insert_sql, rows_per_statement, select_sql,
};
use crate::storage::{StoreLocation, StoreOptions};

/// Most bind parameters in one statement (SQLITE_MAX_VARIABLE_NUMBER of the
/// bundled SQLite).
const MAX_BINDS: usize = 32_766;

/// A session on an SQLite file, under the embedded store's lock: a read
/// transaction on a source, the write transaction on a target.
pub struct SqliteTables {
    tx: Transaction<'static, Sqlite>,
    name: String,
    /// The target's store (its lock, its writer).
    _store: Option<SqliteStore>,
    /// The source's pool and lock.
    _source: Option<(SqlitePool, std::fs::File)>,
}

/// The lock's refusal, said for a copy.
fn in_use(err: Error, name: &str) -> Error {
    match err {
        Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
            "the embedded store {name} is in use by a running fleetcare server: stop it, \
             then copy"
        )),
        other => other,
    }
}

impl SqliteTables {
    /// Reads the existing file at `path`, read-only and without migrating it.
    pub async fn source(path: &Path, name: &str) -> Result<SqliteTables> {
        if !path.is_file() {
            return Err(Error::FailedPrecondition(format!(
                "the source {name} does not exist"
            )));
        }
        let lock = lock_file(path).map_err(|e| in_use(e, name))?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| Error::Internal(format!("sqlite options: {e}")))?
            .filename(path)
            .read_only(true)
            .create_if_missing(false)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(copy_error(format!("cannot open the source {name}")))?;
        // Deferred: the snapshot is taken at the first read and held to the end.
        let mut tx = pool
            .begin()
            .await
            .map_err(copy_error(format!("cannot read {name}")))?;
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(db) if db.message().contains("no such table") => {
                Error::FailedPrecondition(format!(
                    "the source {name} is not a fleetcare store (it has no migrations)"
                ))
            }
            // Not a database file at all.
            sqlx::Error::Database(db) if db.message().contains("not a database") => {
                Error::FailedPrecondition(format!("the source {name} is not an SQLite database"))
            }
            other => copy_error(format!("cannot read {name}"))(other),
        })?;
        check_source_schema(name, &applied, &MIGRATOR)?;
        Ok(SqliteTables {
            tx,
            name: name.to_owned(),
            _store: None,
            _source: Some((pool, lock)),
        })
    }

    /// Opens (creating and migrating it if needed) the store at `path` and
    /// its write transaction.
    pub async fn target(path: &Path, name: &str) -> Result<SqliteTables> {
        let options = StoreOptions {
            max_connections: 2,
            ..StoreOptions::new(StoreLocation::Sqlite(path.to_path_buf()))
        };
        let store = SqliteStore::open(path, &options)
            .await
            .map_err(|e| about(name, in_use(e, name)))?;
        let tx = store.begin_write().await.map_err(|e| about(name, e))?;
        Ok(SqliteTables {
            tx,
            name: name.to_owned(),
            _store: Some(store),
            _source: None,
        })
    }
}

/// SQLite's parameters: `?`, bound in order.
fn param(sql: &mut String, _: usize) {
    sql.push('?');
}

fn bind<'q>(
    query: Query<'q, Sqlite, SqliteArguments<'q>>,
    value: &'q Value,
) -> Query<'q, Sqlite, SqliteArguments<'q>> {
    match value {
        Value::Null => query.bind(None::<i64>),
        Value::Text(s) => query.bind(s.as_str()),
        Value::Int(n) => query.bind(*n),
        Value::Float(x) => query.bind(*x),
        Value::Bool(b) => query.bind(i64::from(*b)),
        Value::Json(j) => query.bind(j.to_string()),
        Value::Timestamp(t) => query.bind(micros(*t)),
        Value::Date(d) => query.bind(day_text(*d)),
    }
}

fn decode(table: &TableSpec, row: &SqliteRow) -> Result<Row> {
    let mut values = Vec::with_capacity(table.columns.len());
    for (i, (column, kind)) in table.columns.iter().enumerate() {
        let context = || format!("reading {}.{column}", table.name);
        let text = || {
            row.try_get::<Option<String>, _>(i)
                .map_err(copy_error(context()))
        };
        let int = || {
            row.try_get::<Option<i64>, _>(i)
                .map_err(copy_error(context()))
        };
        let value = match kind {
            Kind::Text => text()?.map(Value::Text),
            Kind::Int => int()?.map(Value::Int),
            Kind::Timestamp => int()?.map(|us| Value::Timestamp(from_micros(us))),
            Kind::Bool => int()?.map(|b| Value::Bool(b != 0)),
            Kind::Float => match row.try_get::<Option<f64>, _>(i) {
                Ok(x) => x.map(Value::Float),
                // An integer in a REAL column (SQLite keeps what it was given).
                Err(_) => int()?.map(|n| Value::Float(n as f64)),
            },
            Kind::Json => match text()? {
                None => None,
                Some(doc) => Some(Value::Json(serde_json::from_str(&doc).map_err(|e| {
                    Error::Internal(format!("{}: invalid JSON {doc:?}: {e}", context()))
                })?)),
            },
            Kind::Date => match text()? {
                None => None,
                Some(day) => Some(Value::Date(parse_day(&day).map_err(|_| {
                    Error::Internal(format!("{}: invalid date {day:?}", context()))
                })?)),
            },
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(values)
}

#[async_trait]
impl TableStore for SqliteTables {
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
        let columns: Vec<&str> = table.column_names().collect();
        let (sql, key) = select_sql(table, &columns.join(", "), bound, limit, param);
        let mut query = sqlx::query(&sql);
        for value in key {
            query = bind(query, value);
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
            for value in chunk.iter().flatten() {
                query = bind(query, value);
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

    /// `INTEGER PRIMARY KEY` ids continue from the largest by themselves.
    async fn finish_writes(&mut self) -> Result<()> {
        // The brakes' census, counted from the copied agents.
        sqlx::query(
            "INSERT INTO agent_census (label_key, label_value, agents, offline, exhausted)
             SELECT p.key, p.value, count(*), sum(p.status = 'OFFLINE'),
                    sum(p.status = 'EXHAUSTED')
             FROM (SELECT '' AS key, '' AS value, status FROM agents
                   UNION ALL
                   SELECT j.key, j.value, a.status FROM agents a, json_each(a.labels) j) p
             GROUP BY p.key, p.value",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::copy::Kind::{Bool, Date, Float, Int, Json, Text, Timestamp};
    use crate::storage::copy::TABLES;

    /// The table list is the SQLite schema, column for column and kind for kind.
    #[tokio::test]
    async fn the_tables_are_the_sqlite_schema() {
        use sqlx::Row as _;
        let dir =
            std::env::temp_dir().join(format!("fleetcare-copy-schema-{}", std::process::id()));
        let path = dir.join("fleetcare.db");
        let options = StoreOptions::new(StoreLocation::Sqlite(path.clone()));
        let store = SqliteStore::open(&path, &options).await.unwrap();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name",
        )
        .fetch_all(store.readers())
        .await
        .unwrap();
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| !crate::storage::copy::DERIVED.contains(&n.as_str()))
            .collect();
        let mut specs: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
        specs.sort();
        assert_eq!(names, specs);
        for table in TABLES {
            let columns = sqlx::query(&format!("PRAGMA table_info({})", table.name))
                .fetch_all(store.readers())
                .await
                .unwrap();
            let actual: Vec<(String, String)> = columns
                .iter()
                .map(|c| (c.get("name"), c.get("type")))
                .collect();
            let expected: Vec<(String, String)> = table
                .columns
                .iter()
                .map(|(name, kind)| {
                    let ty = match kind {
                        Text | Json | Date => "TEXT",
                        Int | Bool | Timestamp => "INTEGER",
                        Float => "REAL",
                    };
                    (name.to_string(), ty.to_string())
                })
                .collect();
            assert_eq!(actual, expected, "{}", table.name);
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
